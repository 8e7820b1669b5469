"""Prometheus metrics: the service's state, read from the database at scrape time, and this process's HTTP traffic.

Everything that describes deletion requests, runs and models is computed from the database when
``/metrics`` is scraped, so every API replica answers the same and the workers need no metrics
server. Only the HTTP counters and latencies are this process's own. Each app gets a registry of
its own (never the global one), so many apps in one process do not collide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import session_scope, utcnow
from service.deletion_requests import run_durations
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.registry.models import ModelVersion, RegisteredModel

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "(unmatched)"  # 404s and requests refused before routing, e.g. too large

log = logging.getLogger("lethe.metrics")


# --- the service's state, from the database -------------------------------------------------------

class DatabaseCollector(Collector):
    """Deletion requests by status, at risk and overdue, pending work, run durations and each model's
    current version; ``lethe_database_up`` 0 (and nothing else) when the database cannot be read."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        try:
            with session_scope(self.settings.database) as session:
                families = list(database_metrics(session))
        except Exception as exc:  # a scrape reports the outage instead of failing with a 500
            log.warning("metrics: the database could not be read: %s: %s", type(exc).__name__,
                        (str(exc).splitlines() or [""])[0])
            families = []
        yield GaugeMetricFamily("lethe_database_up", "1 when this scrape could read the database",
                                value=1 if families else 0)
        yield from families


def database_metrics(session: Session) -> Iterator[Metric]:
    from service.dashboard.service import counts  # the dashboard's numbers: one rule for at risk and overdue

    totals = counts(session=session, model=None)
    by_status = GaugeMetricFamily("lethe_deletion_requests", "Deletion requests by status", labels=["status"])
    for status, count in totals.by_status.items():
        by_status.add_metric([status], count)
    yield by_status
    yield GaugeMetricFamily("lethe_deletion_requests_at_risk",
                            "Requests not yet propagated (or ended) with less than 25 % of their window left, "
                            "not yet overdue",
                            value=totals.at_risk)
    yield GaugeMetricFamily("lethe_deletion_requests_overdue", "Requests not yet propagated (or ended) past their due date",
                            value=totals.overdue)
    yield GaugeMetricFamily("lethe_pending_requests", "Requests waiting for or in a run (queued + running)",
                            value=totals.by_status[S.QUEUED] + totals.by_status[S.RUNNING])
    yield GaugeMetricFamily("lethe_unpropagated_requests", "Completed requests some consumer of their model does "
                            "not serve yet", value=totals.by_status[S.COMPLETED])
    yield from queue_metrics(session)
    yield run_duration_histogram(session)
    versions = GaugeMetricFamily("lethe_model_current_version", "The version the alias current points at",
                                 labels=["model"])
    for name, version in session.execute(
            select(RegisteredModel.name, ModelVersion.version)
            .join(ModelVersion, ModelVersion.id == RegisteredModel.current_version_id)
            .order_by(RegisteredModel.name)):
        versions.add_metric([name], version)
    yield versions


def queue_metrics(session: Session) -> Iterator[Metric]:
    models, oldest = session.execute(
        select(func.count(DeletionRequest.model_id.distinct()), func.min(DeletionRequest.queued_at))
        .where(DeletionRequest.status == S.QUEUED)).one()
    yield GaugeMetricFamily("lethe_models_with_queued_requests", "Models with queued requests (a run each)",
                            value=models)
    yield GaugeMetricFamily("lethe_oldest_queued_request_age_seconds",
                            "How long the longest-waiting queued request has waited (0: none queued)",
                            value=(utcnow() - oldest).total_seconds() if oldest else 0)


def run_duration_histogram(session: Session) -> HistogramMetricFamily:
    """Wall time of the runs that ended (running -> completed or failed), from the counters each run's
    end adds to (``run_durations``): every run, a retried request's earlier runs included."""
    durations = run_durations.read(session)
    return HistogramMetricFamily(
        "lethe_run_duration_seconds", "Wall time of the unlearning runs that ended (running -> completed or "
        "failed), one observation per run and request",
        buckets=[*((format_bound(b), c) for b, c in durations.cumulative), ("+Inf", durations.count)],
        sum_value=durations.total_seconds)


def format_bound(bound: float) -> str:
    return str(float(bound))


# --- this process's HTTP traffic ------------------------------------------------------------------

class HttpMetrics:
    """Requests by method, route template and status, and their latency, in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("lethe_http_requests", "HTTP requests handled by this process",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("lethe_http_request_duration_seconds", "HTTP request latency in this process",
                                 ["method", "route"], registry=registry)
        self.enqueue_failures = Counter("lethe_enqueue_failures", "Wake-ups the broker refused after a request "
                                        "was committed (it stays queued; the sweep wakes it)", registry=registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "OTHER"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


def route_template(scope) -> str:
    """The matched route's template (``/deletion-requests/{request_id}``), never the raw path: one
    series per route, not one per id."""
    # Starlette's router records the matched route in the scope; a mount's template ends in {path}.
    return getattr(scope.get("route"), "path_format", None) or UNMATCHED_ROUTE


class HttpMetricsMiddleware:
    """ASGI middleware that counts every HTTP request by route template (after routing has set it)."""

    def __init__(self, app, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def recording_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except BaseException:
            status = 500
            raise
        finally:
            self.metrics.observe(scope["method"], route_template(scope), status, time.perf_counter() - started)


def make_registry(settings: Settings) -> tuple[CollectorRegistry, HttpMetrics]:
    """A registry of the app's own: the database collector, this process's HTTP metrics and its CPU/memory."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(settings))
    ProcessCollector(registry=registry)
    return registry, HttpMetrics(registry)
