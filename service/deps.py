"""Request dependencies, defined once: the session (committed at the boundary), settings, auth."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from anyio import CancelScope
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth.models import ApiKey
from service.auth.service import authenticate, require_scope
from service.config import Settings
from service.dashboard.models import DashboardSession
from service.dashboard.service import current_login
from service.db import read_only_session, session_factory


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(request: Request, settings: SettingsDep) -> AsyncIterator[Session]:
    """One transaction per request, committed after the view returns and before the response is sent.

    The call first waits for its turn (``service.admission``: 503 ``overloaded`` when none comes),
    in the event loop, before it holds a thread or a connection. A GET reads in a read-only session.
    """
    async with request.app.state.admission.turn():
        read_only = request.method in ("GET", "HEAD")
        session = read_only_session(settings.database) if read_only else session_factory(settings.database)()
        try:
            yield session
        except BaseException:
            with CancelScope(shield=True):
                await run_in_threadpool(_end, session, commit=False)
            raise
        with CancelScope(shield=True):
            await run_in_threadpool(_end, session, commit=True)


def _end(session: Session, commit: bool) -> None:
    """Commit (or roll back) and close, in one thread hop."""
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


bearer = HTTPBearer(auto_error=False, description="an API key from `lethe keys create`")


def current_key(session: SessionDep,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey:
    return authenticate(session=session, token=credentials.credentials if credentials else None)


def scoped(scope: str):
    """A dependency that needs an API key with ``scope`` (or ``admin``): 401 without a key, 403 without the scope."""

    def dependency(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
        require_scope(key, scope)
        return key

    return Depends(dependency)


RequestsWriter = Annotated[ApiKey, scoped("requests:write")]
RequestsReader = Annotated[ApiKey, scoped("requests:read")]
ModelsWriter = Annotated[ApiKey, scoped("models:write")]
ModelsReader = Annotated[ApiKey, scoped("models:read")]
WebhooksWriter = Annotated[ApiKey, scoped("webhooks:write")]


SESSION_COOKIE = "lethe_session"


def dashboard_login(request: Request, session: SessionDep) -> DashboardSession:
    """The dashboard's login (a session cookie, not a bearer key); without one, a redirect to its login page."""
    return current_login(session=session, token=request.cookies.get(SESSION_COOKIE))


DashboardLogin = Annotated[DashboardSession, Depends(dashboard_login)]
