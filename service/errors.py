"""Domain exceptions, and their one mapping to RFC 9457 problem responses (``application/problem+json``).

Service code raises these; only ``install_error_handlers`` knows about HTTP. Every problem has a
stable machine-readable ``code``.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

PROBLEM_JSON = "application/problem+json"


class ServiceError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    @property
    def headers(self) -> dict[str, str] | None:
        return None


class InvalidInput(ServiceError):
    status, code, title = 422, "invalid_input", "Invalid input"


class NotFound(ServiceError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(ServiceError):
    status, code, title = 409, "conflict", "Conflict"


class InvalidTransition(Conflict):
    code, title = "invalid_transition", "Status does not allow this"


class AttemptsExhausted(Conflict):
    code, title = "attempts_exhausted", "Ran too many times"


class NotCertifiable(Conflict):
    code, title = "not_certifiable", "Only a completed request has a certificate"


class IdempotencyMismatch(InvalidInput):
    code, title = "idempotency_key_reused", "Idempotency-Key reused with a different body"


class Gone(ServiceError):
    status, code, title = 410, "gone", "Gone"


class Unauthenticated(ServiceError):
    status, code, title = 401, "unauthenticated", "Authentication required"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class LoginRequired(Unauthenticated):
    """The dashboard's answer to a missing or expired login: a redirect to its login page."""

    code, title = "login_required", "Login required"


class Forbidden(ServiceError):
    status, code, title = 403, "forbidden", "Missing scope"


class PayloadTooLarge(ServiceError):
    status, code, title = 413, "payload_too_large", "Payload too large"


RETRY_AFTER_SECONDS = 5


class Unavailable(ServiceError):
    """A backend is down, full or busy: nothing was changed, and the same call can be sent again
    after ``Retry-After`` seconds. The code names the backend, so the caller's operator knows where
    to look."""

    status, code, title = 503, "unavailable", "Service unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}


class Overloaded(Unavailable):
    code, title = "overloaded", "Too many calls at once"


class DatabaseUnavailable(Unavailable):
    code, title = "database_unavailable", "Database unavailable"


class SigningUnavailable(Unavailable):
    code, title = "signing_unavailable", "Certificate signing keys unavailable"


class StorageFull(Unavailable):
    code, title = "storage_full", "Storage full"


class ArtifactError(OSError):
    """The artifact store cannot keep or give back an artifact (unreachable, refused, or a checksum
    mismatch). An OSError, so callers that handle file errors handle it too; the API answers 503."""


class StorageUnavailable(Unavailable):
    code, title = "storage_unavailable", "Artifact store unavailable"


def problem(status: int, code: str, title: str, detail: str, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    body = {"type": f"https://lethe.dev/problems/{code}", "title": title, "status": status, "detail": detail,
            "code": code, **extra}
    if instance:
        body["instance"] = instance
    return body


def database_unavailable(exc: Exception) -> Unavailable:
    """What a driver error means to the caller: the database is down or busy (nothing was written),
    or, SQLite's way of saying it, its disk is full."""
    text = str(exc)
    if "disk is full" in text:
        return StorageFull("the database's disk is full; nothing was written")
    if "no such table" in text or ("relation \"" in text and "does not exist" in text):
        return DatabaseUnavailable("the database has no Lethe schema, or an old one (run lethe db upgrade); "
                                   "nothing was written")
    return DatabaseUnavailable("the database did not answer (down, restarting, busy or not a database); "
                               "nothing was written")


def install_error_handlers(app) -> None:
    """Map domain errors, validation errors and HTTP errors to problem+json; never a bare 500 body."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def respond(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        body.setdefault("instance", request.url.path)
        html_error = getattr(request.app.state, "html_error", None)
        if html_error is not None and request.url.path.startswith("/dashboard"):
            page = html_error(request, status, body)  # people, not programs, read the dashboard's errors
            page.headers.update(headers or {})
            return page
        return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return respond(request, exc.status, problem(exc.status, exc.code, exc.title, exc.detail, **exc.extra),
                       exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
        return respond(request, 422, problem(422, "invalid_input", "Invalid input", detail, errors=errors))

    from sqlalchemy.exc import DataError
    from sqlalchemy.orm.exc import StaleDataError

    @app.exception_handler(StaleDataError)
    async def _lost_race(request: Request, exc: StaleDataError):
        # A compare-and-set update found the row changed since it was read (another call, a worker).
        return respond(request, 409, problem(409, "conflict", "Conflict",
                                             "the resource changed while this call was handled; read it again "
                                             "and retry if still needed"))

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError):
        return respond(request, 422, problem(422, "invalid_input", "Invalid input",
                                             "a value could not be stored or compared (e.g. a NUL character)"))

    @app.exception_handler(OverflowError)
    async def _out_of_range(request: Request, exc: OverflowError):
        # A number or date the database (or UTC) cannot hold; the edges validate the known ones.
        return respond(request, 422, problem(422, "invalid_input", "Invalid input",
                                             "a number or date is out of the range this service can store"))

    from sqlalchemy.exc import DatabaseError, IntegrityError, InterfaceError, TimeoutError as PoolTimeout

    @app.exception_handler(IntegrityError)
    async def _lost_insert_race(request: Request, exc: IntegrityError):
        # A unique row another call inserted first, where the service did not expect the race.
        return respond(request, 409, problem(409, "conflict", "Conflict",
                                             "another call created the same thing at the same moment; read it "
                                             "and retry if still needed"))

    # OperationalError (down, locked, no such table) and the rest of DatabaseError ("file is not a
    # database"): the database cannot serve this call; DataError and IntegrityError have their own.
    @app.exception_handler(DatabaseError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def _database_down(request: Request, exc: Exception):
        unavailable = database_unavailable(exc)
        logging.getLogger("lethe.api").warning("%s on %s: %s", unavailable.code, request.url.path,
                                               type(getattr(exc, "orig", None) or exc).__name__)
        return await _service_error(request, unavailable)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            logging.getLogger("lethe.api").warning("storage full on %s: %s", request.url.path, exc.strerror)
            return await _service_error(request, StorageFull("no space left to store this; free space or retry "
                                                             "later"))
        if isinstance(exc, ArtifactError):  # the store is unreachable or refused (S3 down, credentials)
            logging.getLogger("lethe.api").warning("artifact store unavailable on %s: %s", request.url.path,
                                                   exc.strerror)
            return await _service_error(request, StorageUnavailable("the artifact store did not answer; retry "
                                                                    "later"))
        return _internal_error(request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return _internal_error(request)

    def _internal_error(request: Request):
        logging.getLogger("lethe.api").exception("unhandled error on %s", request.url.path)
        return respond(request, 500, problem(500, "internal_error", "Internal error",
                                             "the server failed to handle this request; it was logged"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        return respond(request, exc.status_code, problem(exc.status_code, code, str(exc.detail), str(exc.detail)),
                       getattr(exc, "headers", None))
