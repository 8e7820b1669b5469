"""Dashboard fixtures: a logged-in browser-like client and the seeded requests."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import make_key
from tests.service.dashboard.seed import Seeded, seed

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def log_in(client: TestClient, authorization: dict[str, str], next: str | None = None):
    """Log in through the form, as a browser does; returns the POST's response."""
    page = client.get("/dashboard/login", params={"next": next} if next else None)
    key = authorization["Authorization"].removeprefix("Bearer ")
    return client.post("/dashboard/login", data={"api_key": key, "csrf_token": csrf_of(page.text),
                                                  "next": next or ""}, follow_redirects=False)


@pytest.fixture
def seeded(client, admin, digits, digits_model, backend) -> Seeded:
    return seed(client, admin, digits, digits_model, backend.settings)


@pytest.fixture
def writer(client, backend) -> dict[str, str]:
    """Logged in (on ``client``) with a key that can read and write requests; returns its headers."""
    key = make_key(backend.settings, "requests:read", "requests:write")
    assert log_in(client, key).status_code == 303
    return key


@pytest.fixture
def reader(client, backend) -> dict[str, str]:
    """Logged in (on ``client``) with a read-only key (requests and models)."""
    key = make_key(backend.settings, "requests:read", "models:read")
    assert log_in(client, key).status_code == 303
    return key
