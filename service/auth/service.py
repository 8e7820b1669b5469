"""API keys: created with scopes, stored as sha256 hashes, checked on every request."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth.models import ApiKey
from service.db import utcnow
from service.errors import Forbidden, InvalidInput, Unauthenticated

SCOPES = ("requests:write", "requests:read", "models:read", "models:write", "webhooks:write", "admin")
KEY_PREFIX = "lethe_"


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain sha256 is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(*, session: Session, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the key itself, which is shown once and never stored."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidInput(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}")
    if session.scalar(select(ApiKey).where(ApiKey.name == name)):
        raise InvalidInput(f"an API key named {name!r} exists already")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, prefix=key[: len(KEY_PREFIX) + 6], key_sha256=hash_key(key), scopes=sorted(set(scopes)))
    session.add(row)
    session.flush()
    return row, key


def authenticate(*, session: Session, token: str | None) -> ApiKey:
    """The active key behind an ``Authorization: Bearer <key>`` token, or 401."""
    if not token or not token.strip():
        raise Unauthenticated("send an API key as 'Authorization: Bearer <key>'")
    row = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == hash_key(token.strip())))
    if row is None or row.revoked_at is not None:
        raise Unauthenticated("unknown or revoked API key")
    return row


def has_scope(key: ApiKey, scope: str) -> bool:
    return scope in key.scopes or "admin" in key.scopes


def require_scope(key: ApiKey, scope: str) -> None:
    if not has_scope(key, scope):
        raise Forbidden(f"this endpoint needs the {scope!r} scope", required_scope=scope)


def revoke_key(*, session: Session, name: str) -> ApiKey:
    row = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise InvalidInput(f"no API key named {name!r}")
    row.revoked_at = row.revoked_at or utcnow()
    session.flush()
    return row
