"""Dashboard logins: a server-side session per browser, so a logout or a revoked key ends it at once."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.auth.models import ApiKey
from service.db import Base, UTCDateTime, utcnow


class DashboardSession(Base):
    """The cookie holds a random token; only its sha256 is stored (like the API keys)."""

    __tablename__ = "dashboard_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(String(36), ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))  # echoed by every form of this session
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    api_key: Mapped[ApiKey] = relationship()
