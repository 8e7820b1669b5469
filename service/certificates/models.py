"""Certificates as issued: kept, so that what was handed out can be shown later, and re-issued only
when what a certificate says has changed."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class Certificate(Base):
    __tablename__ = "certificates"
    # One certificate per statements: two calls issuing at once keep one.
    __table_args__ = (UniqueConstraint("request_id", "content_sha256"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    request_id: Mapped[str] = mapped_column(String(36), index=True)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kid: Mapped[str] = mapped_column(String(64))  # the signing key's RFC 7638 thumbprint
    # sha256 of the certificate's statements (everything but its id and issue time): the same
    # statements are not signed twice.
    content_sha256: Mapped[str] = mapped_column(String(64))
    token: Mapped[str] = mapped_column(Text)  # the JWS, compact serialisation
