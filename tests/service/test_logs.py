"""Structured logs: JSON lines with a request id that runs from the API's X-Request-ID to the worker's run."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.logs import configure_logging, current_request_id, request_context
from tests.service_fixtures import register_digits, request_body, wait_for

GENERATED = re.compile(r"[0-9a-f]{32}")


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def access(self) -> list[dict]:
        return [line for line in self.lines() if line["logger"] == "lethe.http"]


def capture(settings: Settings, log_format: str = "json") -> Iterator[Captured]:
    captured, root = Captured(), logging.getLogger()
    level = root.level
    handler = configure_logging(settings.model_copy(update={"log_format": log_format}), stream=captured.stream)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
def json_log(tmp_path) -> Iterator[Captured]:
    yield from capture(Settings(home=tmp_path))


@pytest.fixture
def app_client(tmp_path) -> Iterator[TestClient]:
    """An app on an embedded home; enough for endpoints that need no tables."""
    with TestClient(create_app(Settings(home=tmp_path), enqueue=lambda _id: None)) as client:
        yield client


def test_each_request_logs_one_json_line_with_its_id(app_client, json_log):
    response = app_client.get("/healthz", headers={"X-Request-ID": "trace-42.a_B"})
    assert response.headers["x-request-id"] == "trace-42.a_B"
    [line] = json_log.access()
    assert line["request_id"] == "trace-42.a_B"
    assert (line["method"], line["path"], line["status"], line["level"]) == ("GET", "/healthz", 200, "INFO")
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert "GET /healthz 200" in line["message"]
    when = datetime.fromisoformat(line["timestamp"])
    assert when.utcoffset().total_seconds() == 0 and abs((datetime.now(timezone.utc) - when).total_seconds()) < 60


@pytest.mark.parametrize("supplied", ["x" * 129, "has space", "semi;colon", "../etc", "", "é", "tab\there"])
def test_an_unsafe_request_id_is_replaced_by_a_new_one(app_client, json_log, supplied):
    response = app_client.get("/healthz", headers={"X-Request-ID": supplied.encode()})
    returned = response.headers["x-request-id"]
    assert GENERATED.fullmatch(returned) and returned != supplied
    assert json_log.access()[0]["request_id"] == returned


def test_a_request_without_an_id_gets_a_new_one_each_time(app_client, json_log):
    first, second = (app_client.get("/healthz").headers["x-request-id"] for _ in range(2))
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second
    assert [line["request_id"] for line in json_log.access()] == [first, second]


def test_the_longest_acceptable_id_is_kept(app_client):
    assert app_client.get("/healthz", headers={"X-Request-ID": "a" * 128}).headers["x-request-id"] == "a" * 128


def test_work_is_enqueued_with_the_api_requests_id(backend, admin, digits, digits_model, json_log):
    seen = []

    def enqueue(request_id: str) -> None:
        seen.append(current_request_id())
        logging.getLogger("lethe.test").info("enqueued %s", request_id, extra={"deletion_request": request_id})

    with TestClient(create_app(backend.settings, enqueue=enqueue)) as client:
        assert register_digits(client, admin, digits_model).status_code == 201
        response = client.post("/deletion-requests", headers={**admin, "X-Request-ID": "erasure-7"},
                               json=request_body(digits))
    assert response.status_code == 202 and seen == ["erasure-7"]
    [line] = [line for line in json_log.lines() if line["logger"] == "lethe.test"]
    assert line["request_id"] == "erasure-7" and line["deletion_request"] == response.json()["id"]


def test_an_unhandled_error_is_logged_with_the_request_id_and_its_traceback(tmp_path, json_log):
    app = create_app(Settings(home=tmp_path), enqueue=lambda _id: None)

    def explode():
        raise RuntimeError("boom")

    app.add_api_route("/explode", explode)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/explode", headers={"X-Request-ID": "bad-1"}).status_code == 500
    [error] = [line for line in json_log.lines() if line["logger"] == "lethe.api"]
    assert error["level"] == "ERROR" and error["request_id"] == "bad-1"
    assert "Traceback" in error["exception"] and "RuntimeError: boom" in error["exception"]
    assert json_log.access()[0]["status"] == 500


def test_extra_fields_become_keys_and_odd_values_become_strings(json_log):
    with request_context("job-3"):
        logging.getLogger("lethe.test").warning("done", extra={"seconds": 1.5, "where": Path("/srv/x")})
    [line] = json_log.lines()
    assert line == {**line, "message": "done", "level": "WARNING", "request_id": "job-3", "seconds": 1.5,
                    "where": "/srv/x"}
    assert "exception" not in line


def test_lines_outside_any_request_have_a_null_request_id(json_log):
    logging.getLogger("lethe.test").info("idle")
    assert json_log.lines()[0]["request_id"] is None


def test_text_logs_show_the_request_id_too(tmp_path):
    for captured in capture(Settings(home=tmp_path), log_format="text"):
        with request_context("trace-9"):
            logging.getLogger("lethe.test").info("hello")
        logging.getLogger("lethe.test").info("bye")
        first, second = captured.stream.getvalue().splitlines()
    assert first.endswith("INFO lethe.test [trace-9] hello") and second.endswith("INFO lethe.test [-] bye")


def test_configuring_twice_keeps_one_handler(tmp_path):
    root = logging.getLogger()
    before = len(root.handlers)
    for _ in capture(Settings(home=tmp_path)):
        configure_logging(Settings(home=tmp_path, log_format="json"), stream=io.StringIO())
        assert len(root.handlers) == before + 1
        for handler in [h for h in root.handlers if getattr(h, "lethe", False)]:
            root.removeHandler(handler)


def test_an_unknown_log_level_is_refused(tmp_path):
    with pytest.raises(ValueError):
        Settings(home=tmp_path, log_level="LOUD")
    assert Settings(home=tmp_path, log_level="debug").log_level == "DEBUG"


def test_a_worker_logs_the_api_requests_id_in_json_for_the_run_it_performs(backend, admin, digits, digits_model,
                                                                          start_worker, monkeypatch):
    monkeypatch.setenv("LETHE_LOG_FORMAT", "json")  # the worker process inherits it
    worker = start_worker(beat=False)  # no sweep: only the API's own message can start the run
    with TestClient(create_app(backend.settings)) as client:  # the real enqueue: a Celery message
        assert register_digits(client, admin, digits_model).status_code == 201
        accepted = client.post("/deletion-requests", headers={**admin, "X-Request-ID": "erasure-e2e-1"},
                               json=request_body(digits))
    assert accepted.status_code == 202 and accepted.headers["x-request-id"] == "erasure-e2e-1"
    request_id = accepted.json()["id"]

    def run_lines() -> list[dict]:
        lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
        return [line for line in lines if line["logger"] == "lethe.worker"]

    def finished_run() -> list[dict]:
        lines = run_lines()
        return lines if any(line["message"].startswith("run finished") for line in lines) else []

    lines = wait_for(finished_run, timeout=240, message=f"the run's last line; worker log:\n{worker.output()[-3000:]}")
    started = next(line for line in lines if line["message"].startswith("run started"))
    published = next(line for line in lines if "published" in line["message"])
    ended = next(line for line in lines if line["message"].startswith("run finished"))
    for line in (started, published, ended):
        assert line["request_id"] == "erasure-e2e-1", line
    assert started["model"] == "digits" and started["version"] == 1 and started["deletion_requests"] == [request_id]
    assert published["published_version"] == 2
    assert ended["outcome"] == "finished" and ended["seconds"] > 0
