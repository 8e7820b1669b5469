"""`lethe serve` as it runs in production: behind a TLS proxy, with its settings from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.service_fixtures import free_port

REPO = Path(__file__).resolve().parents[2]



def serve(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=REPO,
                               env={**os.environ, "LETHE_HOME": str(tmp_path / "home"), **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            httpx.get(f"{base}/healthz", timeout=1)
            return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"lethe serve did not start: {process.communicate()[0][-2000:]}")


def login_cookie(base: str) -> str:
    response = httpx.get(f"{base}/dashboard/login", headers={"X-Forwarded-Proto": "https"})
    assert response.status_code == 200
    return response.headers["set-cookie"]


@pytest.mark.parametrize(("trusted", "secure"), [(None, True), ("127.0.0.0/8", True), ("10.1.2.3,192.168.0.0/16", False)])
def test_the_dashboard_cookie_is_secure_behind_a_trusted_tls_proxy_only(tmp_path, trusted, secure):
    process, base = serve(tmp_path, **({"LETHE_FORWARDED_ALLOW_IPS": trusted} if trusted else {}))
    try:
        assert ("; secure" in login_cookie(base).lower()) is secure
    finally:
        process.terminate()
        process.wait(20)


def test_a_bad_setting_stops_serve_with_one_line_naming_the_variable(tmp_path):
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "LETHE_HOME": str(tmp_path), "LETHE_FORWARDED_ALLOW_IPS": "proxy.internal"},
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("lethe: error: invalid setting LETHE_FORWARDED_ALLOW_IPS: 'proxy.internal' "
                                   "is not an IP address, a CIDR range or *")
