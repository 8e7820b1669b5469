"""`lethe pull`: a consumer's folder always holds one whole, checked version behind ``current``;
a new version replaces the old one (deleted: it still encodes what was forgotten) and is
acknowledged; a download cut off resumes where it stopped; corrupt bytes, a failing reload hook or
a refusal leave what is served untouched (embedded default and Postgres, the real app)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.cli import EXIT_BAD_INPUT, EXIT_PULL_FAILED
from service.db import session_scope
from service.pull import PARTIAL, Pull, PullError, Puller
from service.registry.models import RegisteredModel
from service.registry.service import current_version, publish_version
from service.registry.storage import artifact_store
from tests.service.consumers.test_propagation import key_name
from tests.service_fixtures import make_key, registered_digits


@pytest.fixture
def model(client, admin, digits_model) -> dict:
    return registered_digits(client, admin, digits_model)


@pytest.fixture
def consumer(backend, client, admin, model) -> dict[str, str]:
    """The headers of a consumer "search" of the digits model (its own models:read key)."""
    headers = make_key(backend.settings, "models:read")
    assert client.post("/models/digits/consumers", headers=admin,
                       json={"name": "search", "api_key": key_name(backend, headers)}).status_code == 201
    return headers


def puller(client: TestClient, headers: dict[str, str], into: Path, http: httpx.Client | None = None, **extra
           ) -> Puller:
    pull = Pull(url=str(client.base_url), api_key=headers["Authorization"].removeprefix("Bearer "), model="digits",
                into=into, consumer="search", **extra)
    return Puller(pull, http or TestClient(client.app, headers=headers))


def served(into: Path) -> dict:
    """What ``current`` holds, checked whole: its version file, and the weights' sha256."""
    folder = (into / "current").resolve()
    facts = json.loads((folder / "version.json").read_text())
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == facts["sha256"]
    assert json.loads((folder / "model.json").read_text())["classes"]
    return {**facts, "folder": folder.name}


def new_version(backend, digits_model: Path) -> dict:
    """Version n+1 of the digits model, as a worker publishes it (other weights: the file's bytes
    with its safetensors metadata changed, so that its sha256 differs)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(digits_model / "model.safetensors")
    weights = backend.settings.home / "next.safetensors"
    save_file(tensors, str(weights), metadata={"lethe": uuid.uuid4().hex})
    store = artifact_store(backend.settings)
    incoming = store.new_incoming()
    os.replace(weights, incoming)
    sha256, size = store.put(incoming)
    with session_scope(backend.settings.database) as session:
        model = session.scalar(select(RegisteredModel))
        parent = current_version(session=session, model=model)
        version = publish_version(session=session, model_id=model.id, sha256=sha256, size=size, card=parent.card,
                                  classes_forgotten=["3"], metrics={})
        return {"version": version.version, "sha256": sha256}


def acknowledged(client, admin) -> list[int]:
    return [a["version"] for a in client.get("/models/digits/consumers/search/acknowledgements", headers=admin).json()]


def test_the_first_poll_puts_the_current_version_in_place_and_acknowledges_it(
        client, admin, model, consumer, tmp_path):
    into = tmp_path / "models"
    outcome = puller(client, consumer, into).once()
    assert (outcome.version, outcome.updated, outcome.acknowledged) == (1, True, True)
    assert served(into)["sha256"] == model["sha256"] and (into / "current").is_symlink()
    assert acknowledged(client, admin) == [1]
    # Nothing new: a 304, nothing downloaded or acknowledged again.
    again = puller(client, consumer, into).once()
    assert (again.updated, again.acknowledged) == (False, True) and acknowledged(client, admin) == [1]


def test_a_new_version_replaces_the_old_which_is_deleted_and_the_request_waits_for_the_acknowledgement(
        backend, client, admin, model, consumer, digits_model, tmp_path):
    into = tmp_path / "models"
    puller(client, consumer, into).once()
    first = served(into)["folder"]
    v2 = new_version(backend, digits_model)
    outcome = puller(client, consumer, into).once()
    assert (outcome.version, outcome.updated, outcome.deleted) == (2, True, [first])
    assert served(into)["sha256"] == v2["sha256"] and not (into / first).exists()
    assert sorted(p.name for p in into.iterdir() if not p.name.startswith(".")) == ["current", served(into)["folder"]]
    assert acknowledged(client, admin) == [1, 2]


def test_corrupt_bytes_are_refused_and_what_is_served_stays(backend, client, admin, model, consumer, digits_model,
                                                           tmp_path):
    into = tmp_path / "models"
    puller(client, consumer, into).once()
    before = served(into)
    v2 = new_version(backend, digits_model)
    stored = artifact_store(backend.settings).local_path(v2["sha256"])
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the store's copy rotted
    stored.write_bytes(bytes(data))
    with pytest.raises(PullError, match="do not match the registry"):
        puller(client, consumer, into).once()
    assert served(into) == before and acknowledged(client, admin) == [1]
    assert list((into / PARTIAL).iterdir()) == []  # never resumed from


class CutOff(httpx.BaseTransport):
    """The network between the consumer and the API: the first weights download breaks after
    ``after`` bytes (a killed process or a dropped connection); what was sent, and the Range asked
    for each time, are recorded."""

    def __init__(self, inner: httpx.BaseTransport, after: int) -> None:
        self.inner, self.after, self.ranges = inner, after, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not request.url.path.endswith("/weights"):
            return response
        self.ranges.append(request.headers.get("range"))
        if len(self.ranges) > 1:
            return response
        cut, stream = self.after, response.stream

        class Broken(httpx.SyncByteStream):
            def __iter__(self):
                sent = 0
                for chunk in stream:
                    if sent + len(chunk) >= cut:
                        yield chunk[:cut - sent]
                        raise httpx.ReadError("connection reset by peer")
                    sent += len(chunk)
                    yield chunk

        return httpx.Response(response.status_code, headers=response.headers, stream=Broken())


def test_a_download_cut_off_resumes_where_it_stopped_and_never_leaves_a_partial_model(
        backend, client, admin, model, consumer, digits_model, tmp_path, start_api):
    api = start_api()
    into = tmp_path / "models"
    network = CutOff(httpx.HTTPTransport(), after=300_000)
    http = httpx.Client(base_url=api.base, headers=consumer, transport=network)
    with pytest.raises(PullError):
        puller(client, consumer, into, http).once()
    assert not (into / "current").exists()  # nothing half-written is ever served
    assert (into / PARTIAL / model["sha256"]).stat().st_size == 300_000
    outcome = puller(client, consumer, into, http).once()
    assert network.ranges == [None, "bytes=300000-"]  # resumed, not started again
    assert outcome.version == 1 and served(into)["sha256"] == model["sha256"]
    assert acknowledged(client, admin) == [1]


def test_a_failing_reload_hook_keeps_the_version_unacknowledged_until_it_succeeds(
        backend, client, admin, model, consumer, digits_model, tmp_path):
    into = tmp_path / "models"
    flag = tmp_path / "reloaded"
    hook = f'test -f {tmp_path}/hook-ok && echo "$LETHE_MODEL_VERSION $LETHE_MODEL_SHA256" > {flag}'
    with pytest.raises(PullError, match="--on-update exited 1"):
        puller(client, consumer, into, on_update=hook).once()
    assert served(into)["version"] == 1 and acknowledged(client, admin) == []
    (tmp_path / "hook-ok").touch()
    outcome = puller(client, consumer, into, on_update=hook).once()
    assert (outcome.updated, outcome.acknowledged) == (False, True)  # nothing downloaded again
    assert flag.read_text().split() == ["1", model["sha256"]] and acknowledged(client, admin) == [1]


def test_a_folder_of_another_model_is_refused(client, model, consumer, tmp_path):
    into = tmp_path / "models"
    into.mkdir()
    (into / ".pull-state.json").write_text(json.dumps({"model": "faces", "version": 1}))
    with pytest.raises(PullError, match="holds model 'faces'"):
        puller(client, consumer, into).once()


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # the command line, the same on either backend
def test_the_command_says_what_went_wrong_in_one_line_with_its_exit_code(backend, client, model, consumer, tmp_path,
                                                                        start_api):
    command = [sys.executable, "-m", "service.cli", "pull", "--model", "digits", "--into", str(tmp_path / "m"),
               "--consumer", "search", "--once"]
    env = {k: v for k, v in os.environ.items() if k != "LETHE_API_KEY"}
    no_key = subprocess.run([*command, "--url", "http://127.0.0.1:9"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert no_key.returncode == EXIT_BAD_INPUT and no_key.stderr.count("\n") == 1
    key = consumer["Authorization"].removeprefix("Bearer ")
    down = subprocess.run([*command, "--url", "http://127.0.0.1:9"], env={**env, "LETHE_API_KEY": key},
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == EXIT_PULL_FAILED and down.stderr.startswith("lethe: error: GET http://127.0.0.1:9")
    assert down.stderr.count("\n") == 1 and "Traceback" not in down.stderr
    api = start_api()
    done = subprocess.run([*command, "--url", api.base], env={**env, "LETHE_API_KEY": key}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "now serving digits version 1" in done.stderr and "acknowledged" in done.stderr
    assert served(tmp_path / "m")["version"] == 1


class Answering(httpx.BaseTransport):
    """A server that answers GET /models/current with ``body`` (a broken or hostile registry)."""

    def __init__(self, body: bytes, content_type: str = "application/json") -> None:
        self.body, self.content_type, self.paths = body, content_type, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return httpx.Response(200, content=self.body, headers={"content-type": self.content_type})


GOOD = {"version": 2, "sha256": "a" * 64, "size": 10, "download_url": "/models/digits/versions/2/weights"}


@pytest.mark.parametrize("body", [
    b"<html>502 Bad Gateway</html>", b"[1, 2]", json.dumps({**GOOD, "sha256": None}).encode(),
    json.dumps({k: v for k, v in GOOD.items() if k != "size"}).encode(),
    json.dumps({**GOOD, "size": "10"}).encode(),
    json.dumps({**GOOD, "sha256": "/tmp/victim"}).encode(),  # a path, not a digest
    json.dumps({**GOOD, "version": "1/../../escaped"}).encode(),
    json.dumps({**GOOD, "download_url": "https://elsewhere.example/steal-the-key"}).encode(),
], ids=["html", "list", "no sha256", "no size", "size as text", "sha256 a path", "version a path", "foreign url"])
def test_an_answer_that_is_not_this_models_version_is_a_failed_poll_that_touches_nothing(tmp_path, body):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    server = Answering(body)
    pull = Pull(url="http://registry", api_key="k", model="digits", into=tmp_path / "m", consumer="search")
    with pytest.raises(PullError):
        Puller(pull, httpx.Client(base_url="http://registry", transport=server)).once()
    assert server.paths == ["/models/current"]  # nothing downloaded, nothing acknowledged
    assert victim.read_text() == "keep me" and not (tmp_path / "m" / "current").exists()


def test_a_daemon_logs_a_failed_poll_and_polls_again(tmp_path, caplog):
    server = Answering(b"<html>502 Bad Gateway</html>", "text/html")
    pull = Pull(url="http://registry", api_key="k", model="digits", into=tmp_path / "m")
    Puller(pull, httpx.Client(base_url="http://registry", transport=server)).forever(
        0.01, stop=lambda: len(server.paths) >= 3)
    assert len(server.paths) == 3 and "did not answer a model version" in caplog.text


def test_one_poll_at_a_time_per_folder(client, model, consumer, tmp_path):
    into = tmp_path / "models"
    into.mkdir()
    import fcntl
    with open(into / ".pull.lock", "a") as held:  # another lethe pull is polling
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PullError, match="another lethe pull"):
            puller(client, consumer, into).once()
    assert puller(client, consumer, into).once().version == 1


def test_a_hook_that_hangs_is_stopped_and_the_version_stays_unacknowledged(client, admin, model, consumer, tmp_path):
    into = tmp_path / "models"
    with pytest.raises(PullError, match="ran past 0.5 s"):
        puller(client, consumer, into, on_update="sleep 30", on_update_timeout=0.5).once()
    assert served(into)["version"] == 1 and acknowledged(client, admin) == []
