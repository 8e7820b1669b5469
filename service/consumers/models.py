"""A model's consumers and their acknowledgements."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class Consumer(Base):
    __tablename__ = "model_consumers"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    model_id: Mapped[str] = mapped_column(String(36), ForeignKey("registered_models.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    api_key_name: Mapped[str] = mapped_column(String(200))  # the key it acknowledges with
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    # Removed (decommissioned): no longer awaited before a request propagates; its history stays.
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Acknowledgement(Base):
    """A consumer serves ``version`` from ``at`` until its next acknowledgement."""

    __tablename__ = "consumer_acknowledgements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    consumer_id: Mapped[str] = mapped_column(String(36), ForeignKey("model_consumers.id"), index=True)
    version_id: Mapped[str] = mapped_column(String(36), ForeignKey("model_versions.id"))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    by: Mapped[str] = mapped_column(String(200))  # the API key that acknowledged
