"""The FastAPI application: routers, error mapping, body limits, request ids, health, readiness and metrics."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.admission import Admission
from service.config import Settings, get_settings
from service.errors import PROBLEM_JSON, install_error_handlers, problem
from service.logs import RequestLogging
from service.metrics import HttpMetricsMiddleware, make_registry
from service.queue import after_commit_wakeup, send_wakeup
from service.readiness import check_broker, check_database, run_checks
from service.registry.storage import artifact_store

MAX_JSON_BODY = 64 * 1024  # deletion requests are small; uploads go through POST /models

DESCRIPTION = """
Make trained image classifiers forget a class (GDPR Art. 17 / CCPA erasure) by low-rank unlearning.

Authenticate with `Authorization: Bearer <key>` (keys come from `lethe keys create`). Errors are
`application/problem+json` (RFC 9457) with a stable `code`.
"""


class BodySizeLimit:
    """413 for request bodies over the limit, whether announced by Content-Length or sent chunked.

    JSON bodies are small, so one without a Content-Length is read here (up to the limit) and
    replayed to the app; uploads are counted again while they are copied (registry views).
    """

    def __init__(self, app, json_limit: int, upload_limit: int) -> None:
        self.app, self.json_limit, self.upload_limit = app, json_limit, upload_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        is_upload = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.upload_limit if is_upload else self.json_limit
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await self.reject(scope, send, limit)
            return await self.app(scope, receive, send)
        if is_upload:
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self.reject(scope, send, limit)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def reject(scope, send, limit: int) -> None:
        body = problem(413, "payload_too_large", "Payload too large", f"request bodies are limited to {limit} bytes",
                       instance=scope.get("path"))
        await JSONResponse(body, status_code=413, media_type=PROBLEM_JSON)(scope, None, send)


def create_app(settings: Settings | None = None, enqueue: Callable[[str], None] | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Lethe", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.store = artifact_store(settings)
    app.state.admission = Admission(limit=settings.api_db_concurrency, max_waiting=settings.api_max_waiting,
                                    wait_seconds=settings.api_queue_seconds)
    registry, http_metrics = make_registry(settings)
    if enqueue is None:
        def enqueue(request_id: str) -> None:
            send_wakeup(settings, request_id)

    app.state.enqueue = after_commit_wakeup(enqueue, on_failure=http_metrics.enqueue_failures.inc)
    install_error_handlers(app)

    from service.certificates.views import router as certificates_router
    from service.consumers.views import router as consumers_router
    from service.webhooks.views import router as webhooks_router
    from service.dashboard.views import html_error, router as dashboard_router, static_files
    from service.deletion_requests.views import router as requests_router
    from service.registry.views import router as registry_router

    app.include_router(registry_router)
    app.include_router(consumers_router)
    app.include_router(requests_router)
    app.include_router(certificates_router)
    app.include_router(webhooks_router)
    app.include_router(dashboard_router)
    app.mount("/dashboard/static", static_files, name="dashboard-static")
    app.state.html_error = html_error

    # The last added runs first: request ids and access lines cover everything, 413s included.
    app.add_middleware(BodySizeLimit, json_limit=MAX_JSON_BODY, upload_limit=settings.max_upload_bytes + (1 << 20))
    app.add_middleware(HttpMetricsMiddleware, metrics=http_metrics)
    app.add_middleware(RequestLogging)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: database, broker and artifact store reachable")
    def readyz():
        """200 when every check passes, else 503; each check's outcome either way. Answers within a few
        seconds even when a backend hangs. No key needed, like /healthz."""
        checks = run_checks({"database": lambda: check_database(settings.database),
                             "broker": lambda: check_broker(settings.broker),
                             "artifacts": app.state.store.check})
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                            status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        """Prometheus text format. No key needed, like /healthz: it shows counts, never a request.

        Requests by status, at risk, overdue, pending work, run durations and current versions are
        read from the database at scrape time (the same on every replica); HTTP counters and latency
        are this process's own.
        """
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
