"""Logging, configured in one place: text or JSON lines, each carrying the id of the API request behind it.

The id comes from the caller's ``X-Request-ID`` (when it is a sane token) or is made here; the API
returns it, and it travels with the Celery message so that a worker's lines for the run it starts
carry the same id (``worker.celery_app``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TextIO

from service.config import Settings

REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

request_id_var: ContextVar[str | None] = ContextVar("lethe_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and goes into the JSON.
STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "request_id", "taskName"}

log = logging.getLogger("lethe.http")


def sane_request_id(value: object) -> str:
    """``value`` when it is 1-128 characters of [A-Za-z0-9._-]; otherwise a new id (header injection,
    log forging and unbounded labels all start with a caller-chosen string)."""
    if isinstance(value, str) and SANE_REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return request_id_var.get()


@contextmanager
def request_context(request_id: str | None) -> Iterator[str]:
    """Log lines inside the block carry ``request_id`` (made sane; a new one when missing)."""
    value = sane_request_id(request_id)
    token = request_id_var.set(value)
    try:
        yield value
    finally:
        request_id_var.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id (``None`` outside a request or task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (ISO 8601, UTC), level, logger, message, request_id, the
    record's ``extra=`` fields, and ``exception`` / ``stack`` as strings."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


def configure_logging(settings: Settings, level: str | int | None = None, stream: TextIO | None = None
                      ) -> logging.Handler:
    """Send every log record to one handler on the root logger, in ``settings.log_format``.

    Idempotent: a second call replaces the handler the first installed (Celery calls it again in
    its worker). ``level`` overrides ``settings.log_level``; ``stream`` defaults to the process's
    real stderr, which Celery's stdout redirection never replaces. Returns the handler.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "lethe", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.__stderr__)
    handler.lethe = True
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else (level or settings.log_level).upper())
    return handler


class RequestLogging:
    """ASGI middleware: a request id per request (the caller's ``X-Request-ID`` when sane), set for
    the request's log lines, returned in ``X-Request-ID``, and one access line per request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        supplied = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = sane_request_id(supplied)
        # Not reset when the app raises: the unhandled-error handler outside this middleware logs
        # with it. Each ASGI request runs in a context of its own, so it does not leak to the next.
        token = request_id_var.set(request_id)
        started, status = time.perf_counter(), 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            access_line(scope, 500, started)
            raise
        access_line(scope, status, started)
        request_id_var.reset(token)


def access_line(scope, status: int, started: float) -> None:
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    # The path as sent (still percent-encoded): a decoded one could put a line break into a text log.
    method, path = scope["method"], (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    log.info("%s %s %d %.1f ms", method, path, status, duration_ms,
             extra={"method": method, "path": path, "status": status, "duration_ms": duration_ms})
