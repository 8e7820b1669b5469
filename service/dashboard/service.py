"""Dashboard logic: logins, the requests table, CSV rows, version chains. Plain functions; callers commit."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.auth.models import ApiKey
from service.auth.service import authenticate, has_scope, hash_key, require_scope
from service.consumers.service import Serving, serving
from service.dashboard.models import DashboardSession
from service.db import utcnow
from service.deletion_requests.models import DeletionRequest, RequestStatus
from service.deletion_requests.service import WITH_NAMES, RequestFilter, deadline_state, filtered
from service.errors import Forbidden, InvalidInput, LoginRequired
from service.registry.models import ModelVersion, RegisteredModel
from service.registry.service import incorporated_requests

READ_SCOPE, WRITE_SCOPE = "requests:read", "requests:write"
PAGE_SIZE = 25
SORTS = {  # name -> (label, ORDER BY); id breaks ties so pages never overlap
    "due": ("Due date, soonest first", (DeletionRequest.due_at.asc(), DeletionRequest.id)),
    "-due": ("Due date, latest first", (DeletionRequest.due_at.desc(), DeletionRequest.id)),
    "-received": ("Received, newest first", (DeletionRequest.received_at.desc(), DeletionRequest.id)),
}


# --- logins ---------------------------------------------------------------------------------------

def login(*, session: Session, api_key: str, hours: float) -> tuple[DashboardSession, str]:
    """A new login for a key with ``requests:read``; returns the row and the cookie token (never stored)."""
    key = authenticate(session=session, token=api_key)
    require_scope(key, READ_SCOPE)
    now = utcnow()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    token = secrets.token_urlsafe(32)
    row = DashboardSession(token_sha256=hash_key(token), api_key_id=key.id, csrf_token=secrets.token_urlsafe(32),
                           created_at=now, expires_at=now + timedelta(hours=hours))
    session.add(row)
    session.flush()
    return row, token


def current_login(*, session: Session, token: str | None) -> DashboardSession:
    """The live login behind a session cookie; a missing, expired, logged-out or revoked one is LoginRequired."""
    row = session.get(DashboardSession, hash_key(token)) if token else None
    if row is None or row.expires_at <= utcnow() or row.api_key.revoked_at is not None:
        raise LoginRequired("log in with an API key that has the requests:read scope")
    return row


def logout(*, session: Session, token: str | None) -> None:
    if token:
        session.execute(delete(DashboardSession).where(DashboardSession.token_sha256 == hash_key(token)))


def can_write(key: ApiKey) -> bool:
    return has_scope(key, WRITE_SCOPE)


def check_csrf(expected: str | None, submitted: str | None) -> None:
    """Forms echo a per-login token; a cross-site form cannot know it."""
    if not expected or not submitted or not secrets.compare_digest(expected, submitted):
        raise Forbidden("the form's security token is missing or stale; reload the page and try again")


def require_writer(login_row: DashboardSession) -> None:
    require_scope(login_row.api_key, WRITE_SCOPE)


# --- the requests table ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TableQuery:
    """What the table shows: the API's filters (status, model, overdue), a sort and a page."""

    status: str | None = None
    model: str | None = None
    overdue: bool = False
    sort: str = "due"
    page: int = 1

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in {s.value for s in RequestStatus}:
            raise InvalidInput(f"unknown status {self.status!r}")
        if self.sort not in SORTS:
            raise InvalidInput(f"unknown sort {self.sort!r}; one of {', '.join(SORTS)}")
        if self.page < 1:
            raise InvalidInput("page numbers start at 1")

    @property
    def filters(self) -> RequestFilter:
        return RequestFilter(status=[self.status] if self.status else None, model=self.model,
                             overdue=True if self.overdue else None)

    def params(self, **changes: Any) -> dict[str, str]:
        """Query parameters for a link to this view with ``changes``; defaults left out."""
        values = {"status": self.status, "model": self.model, "overdue": "1" if self.overdue else None,
                  "sort": self.sort if self.sort != "due" else None, "page": self.page if self.page > 1 else None}
        values.update(changes)
        return {k: str(v) for k, v in values.items() if v not in (None, "", False)}


@dataclass(frozen=True)
class Badge:
    text: str
    tone: str  # "ok", "amber" (under 25 % of the window left) or "red" (overdue)


@dataclass(frozen=True)
class Row:
    request: DeletionRequest
    badge: Badge | None  # None for finished requests
    version: int | None


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    total: int
    page: int
    pages: int
    first: int  # 1-based position of the first row shown
    last: int


def badge(request: DeletionRequest, now: datetime | None = None) -> Badge | None:
    """"12 days left" / "3 days overdue" for requests still to be done; nothing for finished ones."""
    days_left, at_risk, overdue = deadline_state(request, now)
    if days_left is None:
        return None
    if overdue:
        n = -days_left
        return Badge(f"{n} day{'s' if n != 1 else ''} overdue", "red")
    text = "due today" if days_left == 0 else f"{days_left} day{'s' if days_left != 1 else ''} left"
    return Badge(text, "amber" if at_risk else "ok")


def request_rows(requests: list[DeletionRequest], now: datetime) -> list[Row]:
    return [Row(r, badge(r, now), r.fulfilled_version.version if r.fulfilled_version else None) for r in requests]


def request_page(*, session: Session, query: TableQuery) -> Page:
    now = utcnow()
    selection = filtered(query.filters, now)
    total = session.scalar(select(func.count()).select_from(selection.subquery()))
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(query.page, pages)
    requests = session.scalars(selection.options(*WITH_NAMES).order_by(*SORTS[query.sort][1])
                               .offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)).all()
    first = (page - 1) * PAGE_SIZE + 1 if requests else 0
    return Page(request_rows(list(requests), now), total, page, pages, first, first + len(requests) - 1)


@dataclass(frozen=True)
class Counts:
    by_status: dict[str, int]  # every status, zeros included, in lifecycle order
    at_risk: int
    overdue: int


def counts(*, session: Session, model: str | None) -> Counts:
    """Requests per status (of one model or all), and how many active ones are at risk or overdue."""
    now = utcnow()
    base = filtered(RequestFilter(model=model), now).subquery()
    found = dict(session.execute(select(base.c.status, func.count()).group_by(base.c.status)).all())

    def count(**flag: bool) -> int:
        return session.scalar(select(func.count()).select_from(filtered(RequestFilter(model=model, **flag), now)
                                                               .subquery()))

    return Counts({s.value: found.get(s.value, 0) for s in RequestStatus}, count(at_risk=True), count(overdue=True))


def model_names(*, session: Session) -> list[str]:
    return list(session.scalars(select(RegisteredModel.name).order_by(RegisteredModel.name)))


# --- CSV export -----------------------------------------------------------------------------------

CSV_COLUMNS = ("id", "external_id", "model", "forget_class", "status", "received_at", "due_at", "days_left",
               "at_risk", "overdue", "extended_days", "fulfilled_version", "finished_at", "attempts", "error")


def csv_safe(value: Any) -> str:
    """Text a spreadsheet will not run as a formula (external ids and errors come from outside)."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return str(value)  # numbers and booleans stay as they are (-3 days left is a number)


def csv_rows(*, session: Session, query: TableQuery, batch: int = 1000) -> Iterator[list[str]]:
    """Every request matching the table's filters, in its order (all pages), as CSV cells.

    One statement, streamed ``batch`` rows at a time (a server-side cursor on Postgres), of plain
    columns: no ORM objects and no page offsets, so 200,000 rows take seconds and no more memory
    than a batch (paging by OFFSET with an ORM row per request took 199 s, benchmarks/scale.py)."""
    now = utcnow()
    columns = select(DeletionRequest.id, DeletionRequest.external_id, RegisteredModel.name.label("model"),
                     DeletionRequest.forget_class, DeletionRequest.status, DeletionRequest.received_at,
                     DeletionRequest.due_at, DeletionRequest.at_risk_from, DeletionRequest.extended_days,
                     ModelVersion.version.label("fulfilled_version"), DeletionRequest.finished_at,
                     DeletionRequest.attempts, DeletionRequest.error) \
        .join(RegisteredModel, RegisteredModel.id == DeletionRequest.model_id) \
        .outerjoin(ModelVersion, ModelVersion.id == DeletionRequest.fulfilled_version_id)
    criteria = filtered(query.filters, now).whereclause
    if criteria is not None:
        columns = columns.where(criteria)
    for r in session.execute(columns.order_by(*SORTS[query.sort][1]).execution_options(yield_per=batch)):
        days_left, at_risk, overdue = deadline_state(r, now)
        yield [csv_safe(v) for v in (
            r.id, r.external_id, r.model, r.forget_class, r.status, r.received_at, r.due_at, days_left, at_risk,
            overdue, r.extended_days, r.fulfilled_version, r.finished_at, r.attempts, r.error)]


# --- models and their version chains --------------------------------------------------------------

@dataclass(frozen=True)
class VersionRow:
    version: ModelVersion
    current: bool
    requests: list[DeletionRequest]  # every erasure this version carries
    retain_accuracy: float | None  # mean per-class accuracy on the evaluation set, classes still predicted


@dataclass(frozen=True)
class ModelChain:
    model: RegisteredModel
    versions: list[VersionRow]  # newest first
    chart: RetainChart | None
    consumers: list[ConsumerRow] = field(default_factory=list)


@dataclass(frozen=True)
class ConsumerRow:
    """A consumer as the models page shows it: what it serves, since when, and how far behind current."""

    serving: Serving

    @property
    def badge(self) -> tuple[str, str]:
        """(text, tone): current is ok; one version behind is amber; further behind, or nothing
        acknowledged, is red (an older version still holds what later requests erased)."""
        last = self.serving.last
        if last is None:
            return "nothing acknowledged", "red"
        behind = self.serving.current_version - last.version
        if behind <= 0:
            return "serves current", "ok"
        return f"{behind} version{'s' if behind > 1 else ''} behind", "amber" if behind == 1 else "red"


def retain_accuracy(version: ModelVersion) -> float | None:
    """Mean per-class accuracy over the classes this version still predicts, where it was measured.

    Version 1 is measured by the first run with an evaluation set; version n+1 by the run that made it.
    """
    metrics = version.metrics or {}
    per_class = (metrics.get("evaluation") or {}).get("per_class_after") if version.version > 1 \
        else metrics.get("per_class_accuracy")
    if not per_class:
        return None
    kept = [acc for cls, acc in per_class.items() if cls not in version.classes_forgotten and acc is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass(frozen=True)
class RetainChart:
    """An SVG line chart of retain accuracy per version, laid out here so the template only draws it."""

    width: int
    height: int
    points: list[tuple[float, float, int, float]]  # x, y, version, accuracy
    y_ticks: list[tuple[float, float]]  # y, accuracy
    low: float
    high: float

    @property
    def polyline(self) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in self.points)


def retain_chart(measured: list[tuple[int, float]], width: int = 480, height: int = 160) -> RetainChart | None:
    """Versions and accuracies -> chart geometry; the y axis spans the data (at least 5 points), not 0-100."""
    if not measured:
        return None
    accs = [acc for _, acc in measured]
    low, high = min(accs), max(accs)
    pad = max(0.0, 5.0 - (high - low)) / 2
    low, high = max(0.0, low - pad - 0.5), min(100.0, high + pad + 0.5)
    left, right, top, bottom = 44, 16, 12, 28
    first, last = measured[0][0], measured[-1][0]

    def x(version: int) -> float:
        return left + (version - first) / (last - first) * (width - left - right) if last > first \
            else (left + width - right) / 2

    def y(acc: float) -> float:
        return top + (high - acc) / (high - low) * (height - top - bottom)

    ticks = [low + (high - low) * i / 4 for i in range(5)]
    return RetainChart(width, height, [(x(v), y(a), v, a) for v, a in measured], [(y(t), t) for t in ticks], low, high)


def model_chains(*, session: Session) -> list[ModelChain]:
    chains = []
    for model in session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)):
        rows = [VersionRow(v, v.id == model.current_version_id, incorporated_requests(session=session, version=v),
                           retain_accuracy(v)) for v in model.versions]
        measured = [(r.version.version, r.retain_accuracy) for r in rows if r.retain_accuracy is not None]
        chains.append(ModelChain(model, rows[::-1], retain_chart(measured),
                                 [ConsumerRow(c) for c in serving(session=session, model=model)]))
    return chains

