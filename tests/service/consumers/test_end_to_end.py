"""The loop closed, with real processes: `lethe serve`, `lethe worker --beat` (which relays
webhooks from the outbox), two `lethe pull` consumers and a webhook receiver on 127.0.0.1. A request stays
``completed`` until both consumers pulled and acknowledged its version, then becomes
``propagated``; a consumer killed mid-download never serves a partial model and resumes; the
receiver, which fails its first answers, gets each event under one delivery id, signed with the
webhook's secret (embedded default and Postgres)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook as Verifier, WebhookVerificationError

from tests.service.consumers.test_propagation import key_name
from tests.service.test_pull import served
from tests.service.webhooks.test_webhooks import Receiver
from tests.service_fixtures import LOGIT_ONLY, make_key, register_digits, request_body, wait_for, with_env


class SlowLink:
    """A TCP proxy to the API that, once ``slow`` is set, passes the answers on at ``rate`` bytes
    a second, so that a download lasts long enough to kill the process that makes it; it records
    each request's first lines (method, path, Range)."""

    def __init__(self, upstream_port: int, rate: int) -> None:
        self.upstream_port, self.rate, self.requests = upstream_port, rate, []
        self.slow = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        try:
            while data := source.recv(16384 if throttled else 65536):
                if not throttled:
                    self.requests.append(data.decode("latin-1").split("\r\n\r\n")[0])
                sink.sendall(data)
                if throttled and self.slow.is_set():
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


class PullProcess:
    def __init__(self, url: str, key: str, consumer: str, into: Path, log: Path) -> None:
        self.into, self.log_path = into, log
        env = {**os.environ, "LETHE_API_KEY": key, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "pull", "--model", "digits", "--into", str(into), "--consumer",
             consumer, "--url", url, "--every", "1"], env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def backend(backend):
    return with_env(backend, LETHE_WEBHOOK_ALLOWED_HOSTS="127.0.0.1", LETHE_WEBHOOK_POLL_SECONDS="1",
                    LETHE_WEBHOOK_FIRST_RETRY_SECONDS="1")


def test_a_request_propagates_only_once_both_consumers_pulled_and_acknowledged_its_version(
        backend, client, admin, digits, digits_model, start_api, start_worker, tmp_path):
    receiver = Receiver([500, 500, 500])  # the first delivery (version 1 published) fails three times
    pulls: list[PullProcess] = []
    link = None
    try:
        hook = client.post("/webhooks", headers=admin, json={
            "url": receiver.url,
            "events": ["deletion_request.completed", "deletion_request.propagated", "model.version_published"]})
        assert hook.status_code == 201, hook.text
        refused = client.post("/webhooks", headers=admin, json={"url": "http://10.0.0.7/hook",
                                                                "events": ["deletion_request.propagated"]})
        assert refused.status_code == 422 and refused.json()["code"] == "webhook_target_refused"
        assert register_digits(client, admin, digits_model).status_code == 201
        keys = {name: make_key(backend.settings, "models:read") for name in ("search", "ranking")}
        for name, headers in keys.items():
            assert client.post("/models/digits/consumers", headers=admin,
                               json={"name": name, "api_key": key_name(backend, headers)}).status_code == 201
        api = start_api()
        link = SlowLink(api.port, rate=100_000)  # ranking's network: ~8 s for the digits model's 0.8 MB
        token = {name: h["Authorization"].removeprefix("Bearer ") for name, h in keys.items()}
        folders = {"search": tmp_path / "search", "ranking": tmp_path / "ranking"}
        pulls.append(PullProcess(api.base, token["search"], "search", folders["search"], tmp_path / "search.log"))
        pulls.append(PullProcess(link.url, token["ranking"], "ranking", folders["ranking"], tmp_path / "ranking.log"))

        def serving(name: str) -> int | None:
            (found,) = [c for c in client.get("/models/digits/consumers", headers=admin).json() if c["name"] == name]
            return found["serving"]["version"] if found["serving"] else None

        wait_for(lambda: serving("search") == 1 and serving("ranking") == 1, 90,
                 message=f"both consumers on version 1; logs:\n{pulls[0].output()}\n{pulls[1].output()}")

        link.slow.set()
        request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
        worker = start_worker(**LOGIT_ONLY)

        def status() -> str:
            return client.get(f"/deletion-requests/{request_id}", headers=admin).json()["status"]

        wait_for(lambda: status() in ("completed", "propagated", "failed", "rejected"), 240,
                 message=f"the run; worker log:\n{worker.output()[-3000:]}")
        v2 = client.get("/models/current", headers=admin).json()
        assert v2["version"] == 2
        # ranking is mid-download of version 2: killed there, it still serves version 1, whole.
        partial = folders["ranking"] / ".partial" / v2["sha256"]
        wait_for(lambda: partial.exists() and 0 < partial.stat().st_size < v2["size"], 60,
                 message=f"ranking's download under way; log:\n{pulls[1].output()}")
        pulls[1].kill()
        assert served(folders["ranking"])["version"] == 1
        wait_for(lambda: serving("search") == 2, 60, message="search on version 2")
        assert status() == "completed" and serving("ranking") == 1  # ranking still answers with version 1
        kept = partial.stat().st_size

        pulls.append(PullProcess(link.url, token["ranking"], "ranking", folders["ranking"], tmp_path / "ranking.log"))
        wait_for(lambda: status() == "propagated", 90, message=f"propagated; ranking log:\n{pulls[2].output()}")
        assert served(folders["ranking"])["version"] == 2 and served(folders["search"])["version"] == 2
        for folder in folders.values():  # version 1 still encoded the class: gone from both hosts
            assert [p.name for p in folder.iterdir() if p.name.startswith("v")] == [served(folder)["folder"]]
        assert any(f"range: bytes={kept}-" in r.lower() for r in link.requests), "ranking resumed its download"

        # Each event once per delivery id (the receiver de-duplicates by it), signed with this secret only.
        wait_for(lambda: {"deletion_request.completed", "deletion_request.propagated"} <= {
            json.loads(r["body"])["type"] for r in receiver.received[3:]}, 60, message="both events delivered")
        by_id: dict[str, set[str]] = {}
        for sent in receiver.received:
            Verifier(hook.json()["secret"]).verify(sent["body"], sent["headers"])
            by_id.setdefault(sent["headers"]["webhook-id"], set()).add(sent["body"])
            with pytest.raises(WebhookVerificationError):
                Verifier("whsec_" + "QUJD" * 8).verify(sent["body"], sent["headers"])
        assert all(len(bodies) == 1 for bodies in by_id.values())  # a retry is the same message
        events = [json.loads(next(iter(b))) for b in by_id.values()]
        assert sorted(e["type"] for e in events) == ["deletion_request.completed", "deletion_request.propagated",
                                                     "model.version_published", "model.version_published"]
        assert sorted(e["data"]["version"] for e in events if e["type"] == "model.version_published") == [1, 2]
        assert {e["data"]["id"] for e in events if e["type"].startswith("deletion_request.")} == {request_id}
        sent_ids = [r["headers"]["webhook-id"] for r in receiver.received]
        assert len(sent_ids) == len(by_id) + 3  # the three answers of 500 were retried, nothing else sent twice
    finally:
        for pull in pulls:
            pull.kill()
        if link is not None:
            link.close()
        receiver.close()
