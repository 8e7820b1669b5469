"""The dashboard in a real headless browser (Debian's chromium driven by Playwright), against a real
``lethe serve`` process: log in with the keyboard, read the badges, filter to overdue, open a request,
cancel it, watch the table refresh itself, and look right at 1280 px and on a phone.

Screenshots go to ``$LETHE_SCREENSHOT_DIR`` when set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import make_key, request_body, wait_for
from tests.service.dashboard.seed import BADGES, seed
from tests.service_fixtures import free_port

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)


def browser_or_skip():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt install chromium)")
    from playwright.sync_api import sync_playwright

    return sync_playwright



@pytest.fixture
def server(backend, tmp_path):
    """``lethe serve`` on a free port, on the test's database; yields its base URL."""
    port = free_port()
    env = {**os.environ, **backend.env, "LETHE_DASHBOARD_REFRESH_SECONDS": "1"}
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None  # died: stop waiting, the assertion below says so

    wait_for(up, timeout=60, message="lethe serve")
    assert process.poll() is None, (tmp_path / "serve.log").read_text()
    yield base
    process.terminate()
    process.wait(timeout=20)
    log.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("LETHE_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_an_operator_triages_the_morning_queue_in_a_real_browser(client, admin, digits, digits_model, backend,
                                                                   server, shots):
    sync_playwright = browser_or_skip()
    from playwright.sync_api import expect

    ids = seed(client, admin, digits, digits_model, backend.settings).ids
    operator = make_key(backend.settings, "requests:read", "requests:write", "models:read")["Authorization"].removeprefix("Bearer ")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            # Logged out: the dashboard sends us to its login form; log in with the keyboard alone.
            page.goto(f"{server}/dashboard/requests")
            expect(page).to_have_url(f"{server}/dashboard/login?next=%2Fdashboard%2Frequests")
            expect(page.get_by_label("API key")).to_be_focused()
            page.keyboard.type(operator)
            page.keyboard.press("Enter")
            expect(page).to_have_url(f"{server}/dashboard/requests")
            page.keyboard.press("Tab")
            expect(page.get_by_role("link", name="Skip to content")).to_be_focused()

            # Every seeded request, with the right deadline badge (none for the finished one).
            for external_id, expected in BADGES.items():
                row = page.locator(f'tr[data-request="{ids[external_id]}"]')
                expect(row).to_contain_text(external_id)
                if expected is None:
                    expect(row.locator(".badge")).to_have_count(0)
                    expect(row.locator(".status")).to_have_text("propagated")
                else:
                    text, tone = expected
                    expect(row.locator(".badge")).to_have_text(text)
                    expect(row.locator(".badge")).to_have_class(f"badge tone-{tone}")
            assert page.locator(".badge.tone-red").evaluate("e => getComputedStyle(e).color") == "rgb(160, 27, 20)"
            page.screenshot(path=shots / "requests-1280.png", full_page=True)

            # The table refreshes itself without a reload when a request arrives.
            page.evaluate("window.__stillTheSamePage = true")
            body = request_body(digits, "arrived-while-watching", "5")
            assert httpx.post(f"{server}/deletion-requests", json=body,
                              headers=admin).status_code == 202
            expect(page.locator("tbody tr", has_text="arrived-while-watching")).to_have_count(1, timeout=10_000)
            assert page.evaluate("window.__stillTheSamePage") is True

            # Filter to overdue.
            page.get_by_label("Overdue only").check()
            page.get_by_role("button", name="Apply").click()
            expect(page).to_have_url(f"{server}/dashboard/requests?status=&model=&sort=due&overdue=1")
            expect(page.locator("tbody tr")).to_have_count(1)
            expect(page.locator("tbody tr")).to_contain_text("overdue")
            page.screenshot(path=shots / "requests-overdue.png", full_page=True)

            # Open it and cancel it, with a reason.
            page.get_by_role("link", name="overdue", exact=True).click()
            expect(page.get_by_role("heading", level=1)).to_contain_text("overdue")
            expect(page.locator(".timeline > li")).to_have_count(2)  # created, queued
            page.get_by_label("Reason for cancelling").fill("the data subject withdrew the request")
            page.get_by_role("button", name="Cancel request").click()
            expect(page.get_by_role("status")).to_have_text("The request was canceled.")
            expect(page.locator("h1 .status")).to_have_text("canceled")
            expect(page.locator(".timeline > li").last).to_contain_text("the data subject withdrew the request")
            expect(page.get_by_role("button", name="Cancel request")).to_have_count(0)
            page.screenshot(path=shots / "request-canceled.png", full_page=True)

            # The completed request shows its evidence; the models page its version chain and chart.
            page.goto(f"{server}/dashboard/requests/{ids['done']}")
            expect(page.locator("table.metrics")).to_contain_text("0.7 %")
            page.screenshot(path=shots / "request-completed.png", full_page=True)
            page.get_by_role("link", name="Models").click()
            expect(page.locator("#digits-v2")).to_contain_text("current")
            expect(page.locator("figure.chart circle")).to_have_count(2)
            page.screenshot(path=shots / "models-1280.png", full_page=True)

            # Phone width: nothing spills off the screen sideways.
            page.set_viewport_size({"width": 390, "height": 844})
            page.goto(f"{server}/dashboard/requests")
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=shots / "requests-phone.png", full_page=True)
            page.goto(f"{server}/dashboard/requests/{ids['done']}")
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=shots / "request-phone.png", full_page=True)

            # Log out: the dashboard is closed again.
            page.get_by_role("button", name="Log out").click()
            expect(page).to_have_url(f"{server}/dashboard/login")
            page.goto(f"{server}/dashboard/requests")
            expect(page).to_have_url(f"{server}/dashboard/login?next=%2Fdashboard%2Frequests")
            assert errors == []  # no script errors, no resource refused by the content security policy
        finally:
            browser.close()
    assert sorted(p.name for p in shots.glob("*.png")) == sorted(
        ["models-1280.png", "request-canceled.png", "request-completed.png", "request-phone.png",
         "requests-1280.png", "requests-overdue.png", "requests-phone.png"])
