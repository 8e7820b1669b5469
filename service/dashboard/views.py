"""Dashboard pages: thin views over ``service.dashboard.service`` and the deletion-request service."""

from __future__ import annotations

import csv
import io
import secrets
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service.dashboard import service
from service.deletion_requests import service as requests_service
from service.consumers.propagation import confirmations
from service.deletion_requests.models import FINISHED, RequestStatus
from service.auth.service import has_scope, require_scope
from service.deps import SESSION_COOKIE, DashboardLogin, SessionDep, SettingsDep
from service.db import utcnow
from service.errors import Forbidden, InvalidInput, ServiceError
from service.registry.service import NAME_PATTERN
from service.webhooks import service as webhooks

HERE = Path(__file__).parent
LOGIN_CSRF_COOKIE = "lethe_login_csrf"
MODELS_SCOPE = "models:read"
CSV_SPOOL_BYTES = 4 * 2**20  # an export larger than this goes to a temporary file
WEBHOOKS_SCOPE = "webhooks:write"  # the webhooks API's own scope: their URLs and logs are the operator's
# Everything the pages load comes from this app: no CDNs, no inline script or style.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/dashboard", include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")
static_files = StaticFiles(directory=HERE / "static")


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} %"


templates.env.filters.update(when=when, size=size, pct=pct)
templates.env.globals.update(statuses=[s.value for s in RequestStatus])


def render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    context.setdefault("refresh_seconds", request.app.state.settings.dashboard_refresh_seconds)
    user = context.get("user")
    context["can_read_models"] = user is not None and has_scope(user.api_key, MODELS_SCOPE)
    context["can_manage_webhooks"] = user is not None and has_scope(user.api_key, WEBHOOKS_SCOPE)
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def same_origin(request: Request) -> None:
    """Refuse a form posted from another site (belt and braces beside SameSite cookies and CSRF tokens)."""
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
        raise Forbidden("cross-site form submissions are refused")


def safe_next(target: str | None) -> str:
    """Only a path of this dashboard, so the login page cannot be used to redirect elsewhere."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return "/dashboard/requests"


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def table_query(status: str | None, model: str | None, overdue: str | None, sort: str | None,
                page: int) -> service.TableQuery:
    return service.TableQuery(status=status or None, model=model or None, overdue=overdue in FLAG_ON,
                              sort=sort or "due", page=page)


StatusParam = Annotated[str | None, Query(max_length=16)]
ModelParam = Annotated[str | None, Query(max_length=64, pattern=f"^$|{NAME_PATTERN.pattern}")]
FLAG_ON, FLAG_OFF = ("1", "true", "on"), ("", "0", "false", "off")  # a checkbox sends "1" or nothing
FlagParam = Annotated[str | None, Query(pattern=f"^({'|'.join(FLAG_ON + FLAG_OFF)})$")]
SortParam = Annotated[str | None, Query(max_length=16)]
PageParam = Annotated[int, Query(ge=1, le=1_000_000)]


def html_error(request: Request, status: int, body: dict) -> Response:
    """Errors on dashboard paths are pages (or a redirect to log in), not problem+json."""
    if status == 401:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.url.path.endswith("/live"):  # the table's refresh: reload the whole page instead
            target = request.headers.get("x-dashboard-page", "/dashboard/requests")
        elif request.method != "GET":  # a form's action cannot be fetched: come back to the page it was on
            path = request.url.path
            target = path.rsplit("/", 1)[0] if path.endswith(("/cancel", "/retry")) else "/dashboard/requests"
        return see_other("/dashboard/login?" + urlencode({"next": safe_next(target)}))
    return render(request, "error.html", status_code=status, title=body.get("title", "Error"),
                  detail=body.get("detail", ""), status=status, user=None)


# --- login ----------------------------------------------------------------------------------------

@router.get("", response_class=HTMLResponse)
def home() -> RedirectResponse:
    return see_other("/dashboard/requests")


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: Annotated[str | None, Query(max_length=2000)] = None) -> HTMLResponse:
    return render_login(request, next)


def render_login(request: Request, next: str | None, error: str | None = None, status_code: int = 200) -> HTMLResponse:
    # A login form has no session yet, so its CSRF token is a double-submitted cookie.
    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", status_code=status_code, next=safe_next(next), csrf_token=token,
                      error=error, user=None)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/dashboard/login",
                        secure=request.url.scheme == "https")
    return response


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, session: SessionDep, settings: SettingsDep,
          api_key: Annotated[str, Form(max_length=200)] = "", csrf_token: Annotated[str, Form(max_length=100)] = "",
          next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    try:
        same_origin(request)
        service.check_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token)
        _row, token = service.login(session=session, api_key=api_key, hours=settings.dashboard_session_hours)
    except ServiceError as exc:  # shown on the login form itself, with a fresh token
        return render_login(request, next, error=exc.detail, status_code=exc.status)
    response = see_other(safe_next(next))
    response.set_cookie(SESSION_COOKIE, token, max_age=int(settings.dashboard_session_hours * 3600), httponly=True,
                        samesite="strict", path="/dashboard", secure=request.url.scheme == "https")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/dashboard/login")
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, user: DashboardLogin,
           csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    same_origin(request)
    service.check_csrf(user.csrf_token, csrf_token)
    service.logout(session=session, token=request.cookies.get(SESSION_COOKIE))
    response = see_other("/dashboard/login")
    response.delete_cookie(SESSION_COOKIE, path="/dashboard", httponly=True, samesite="strict")
    return response


# --- requests -------------------------------------------------------------------------------------

def table_context(session, query: service.TableQuery) -> dict:
    return {"query": query, "page": service.request_page(session=session, query=query),
            "counts": service.counts(session=session, model=query.model), "sorts": service.SORTS,
            "models": service.model_names(session=session), "now": utcnow()}


@router.get("/requests", response_class=HTMLResponse)
def requests_page(request: Request, session: SessionDep, user: DashboardLogin, status: StatusParam = None,
                  model: ModelParam = None, overdue: FlagParam = None, sort: SortParam = None,
                  page: PageParam = 1) -> HTMLResponse:
    query = table_query(status, model, overdue, sort, page)
    return render(request, "requests.html", user=user, section="requests", **table_context(session, query))


@router.get("/requests/live", response_class=HTMLResponse)
def requests_live(request: Request, session: SessionDep, user: DashboardLogin, status: StatusParam = None,
                  model: ModelParam = None, overdue: FlagParam = None, sort: SortParam = None,
                  page: PageParam = 1) -> HTMLResponse:
    """The counts and the table alone, fetched every few seconds by dashboard.js."""
    query = table_query(status, model, overdue, sort, page)
    return render(request, "_requests_live.html", user=user, **table_context(session, query))


@router.get("/requests.csv")
def requests_csv(session: SessionDep, _user: DashboardLogin, status: StatusParam = None, model: ModelParam = None,
                 overdue: FlagParam = None, sort: SortParam = None) -> Response:
    query = table_query(status, model, overdue, sort, 1)
    # Written whole inside the request's session and its admission turn (a body streamed from the
    # database would outlive both: an outage midway would cut the file short after a 200), to a
    # file, not memory: 200,000 rows are ~40 MB. The response then streams the file.
    spool = tempfile.SpooledTemporaryFile(max_size=CSV_SPOOL_BYTES, mode="w+b")
    text = io.TextIOWrapper(spool, encoding="utf-8", newline="", write_through=True)
    writer = csv.writer(text)
    writer.writerow(service.CSV_COLUMNS)
    writer.writerows(service.csv_rows(session=session, query=query))
    text.detach()
    size = spool.tell()
    spool.seek(0)
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    return SpooledFileResponse(spool, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="deletion-requests-{stamp}.csv"',
        "Content-Length": str(size), **SECURITY_HEADERS})


class SpooledFileResponse(StreamingResponse):
    """Streams a spooled file and closes it however the stream ends: left to the garbage collector,
    a download the client dropped midway held its file (and its disk) until the next collection."""

    def __init__(self, spool, **kwargs) -> None:
        self.spool = spool
        super().__init__(_chunks(spool), **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.spool.close()  # no read is in flight: a cancelled thread hop is waited for


def _chunks(spool, size: int = 256 * 1024) -> Iterator[bytes]:
    while chunk := spool.read(size):
        yield chunk


@router.get("/requests/{request_id}", response_class=HTMLResponse)
def request_detail(request: Request, request_id: str, session: SessionDep, user: DashboardLogin,
                   done: Annotated[str | None, Query(max_length=20)] = None) -> HTMLResponse:
    row = requests_service.get_request(session=session, request_id=request_id)
    [table_row] = service.request_rows([row], utcnow())
    writer = service.can_write(user.api_key)
    return render(request, "request_detail.html", user=user, section="requests", row=table_row, r=row, metrics=row.metrics or {},
                  done=done, confirmations=confirmations(session, row),
                  can_cancel=writer and row.status not in FINISHED and not row.cancel_requested,
                  can_retry=writer and row.status == RequestStatus.FAILED)


@router.get("/requests/{request_id}/certificate", response_class=HTMLResponse)
def certificate_page(request: Request, request_id: str, session: SessionDep, settings: SettingsDep,
                     user: DashboardLogin) -> HTMLResponse:
    """The request's certificate as a page that prints as a document."""
    row = requests_service.get_request(session=session, request_id=request_id)
    issued, statements = issued_certificate(request, session, settings, row)
    return render(request, "certificate.html", user=user, section="requests", r=row, issued=issued,
                  statements=statements)


@router.get("/requests/{request_id}/certificate.jws")
def certificate_download(request: Request, request_id: str, session: SessionDep, settings: SettingsDep,
                         _user: DashboardLogin) -> Response:
    row = requests_service.get_request(session=session, request_id=request_id)
    issued, _ = issued_certificate(request, session, settings, row)
    return Response(issued.token, media_type="application/jose", headers={
        "Content-Disposition": f'attachment; filename="certificate-{row.id}.jws"', **SECURITY_HEADERS})


def issued_certificate(request: Request, session, settings, row):
    from service.certificates import service as certificates
    from service.certificates.views import issuer

    issued = certificates.certificate(session, settings, row, issuer(request, settings))
    return issued, certificates.statements_of(issued)


@router.post("/requests/{request_id}/cancel")
def cancel(request: Request, request_id: str, session: SessionDep, user: DashboardLogin,
           csrf_token: Annotated[str, Form(max_length=100)] = "",
           reason: Annotated[str, Form(max_length=500)] = "") -> Response:
    same_origin(request)
    service.check_csrf(user.csrf_token, csrf_token)
    service.require_writer(user)
    if not reason.strip():  # the dashboard asks why: the audit trail is what an auditor reads
        raise InvalidInput("give a reason for the cancellation; it is written to the audit trail")
    row = requests_service.get_request(session=session, request_id=request_id, for_update=True)
    requests_service.cancel(session=session, request=row, actor=f"dashboard:{user.api_key.name}",
                            reason=reason.strip())
    return see_other(f"/dashboard/requests/{row.id}?done=cancel")


@router.post("/requests/{request_id}/retry")
def retry(request: Request, request_id: str, session: SessionDep, user: DashboardLogin,
          csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    same_origin(request)
    service.check_csrf(user.csrf_token, csrf_token)
    service.require_writer(user)
    row = requests_service.get_request(session=session, request_id=request_id, for_update=True)
    requests_service.retry(session=session, settings=request.app.state.settings, request=row,
                           actor=f"dashboard:{user.api_key.name}", enqueue=request.app.state.enqueue)
    return see_other(f"/dashboard/requests/{row.id}?done=retry")


# --- models ---------------------------------------------------------------------------------------

@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: SessionDep, user: DashboardLogin) -> HTMLResponse:
    require_scope(user.api_key, MODELS_SCOPE)  # the registry's own scope, as in the API
    return render(request, "models.html", user=user, section="models", chains=service.model_chains(session=session))


# --- webhooks -------------------------------------------------------------------------------------

@router.get("/webhooks", response_class=HTMLResponse)
def webhooks_page(request: Request, session: SessionDep, user: DashboardLogin,
                  done: Annotated[str | None, Query(max_length=20)] = None) -> HTMLResponse:
    """Each live webhook and its last deliveries: status, attempts, answer, latency, error."""
    require_scope(user.api_key, WEBHOOKS_SCOPE)
    hooks = [(w, webhooks.deliveries(session=session, webhook_id=w.id, limit=50))
             for w in webhooks.listing(session=session)]
    return render(request, "webhooks.html", user=user, section="webhooks", hooks=hooks, done=done)


@router.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver")
def redeliver(request: Request, webhook_id: str, delivery_id: int, session: SessionDep, user: DashboardLogin,
              csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    same_origin(request)
    service.check_csrf(user.csrf_token, csrf_token)
    require_scope(user.api_key, WEBHOOKS_SCOPE)
    webhooks.redeliver(session=session, webhook_id=webhook_id, delivery_id=delivery_id)
    return see_other(f"/dashboard/webhooks?done=redeliver#delivery-{delivery_id}")
