"""Registered models and their immutable, sequentially numbered versions (MLflow's model)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.db import Base, UTCDateTime, utcnow


def new_id() -> str:
    return str(uuid.uuid4())


class RegisteredModel(Base):
    """A model name; ``current_version_id`` is the alias ``current``. Locking this row serialises runs."""

    __tablename__ = "registered_models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    eval_set_uri: Mapped[str | None] = mapped_column(Text)
    # Unlabelled images of none of the model's classes: runs hold the original's outputs on them.
    anchor_set_uri: Mapped[str | None] = mapped_column(Text)
    current_version_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("model_versions.id", use_alter=True, name="fk_registered_models_current_version"))
    run_lease_owner: Mapped[str | None] = mapped_column(String(128))  # the worker running this model now
    run_lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Fencing token: +1 at every claim. A worker settles or publishes only while the token it claimed
    # with is still the model's, so one that stalled past its lease can write nothing after a new claim.
    run_lease_token: Mapped[int] = mapped_column(Integer, nullable=False, default=0)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", foreign_keys="ModelVersion.model_id", order_by="ModelVersion.version")
    current_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[current_version_id], post_update=True)


class ModelVersion(Base):
    """One immutable set of weights: version 1 is the upload, n+1 is unlearned from n."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(String(36), ForeignKey("registered_models.id"))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    classes_forgotten: Mapped[list[str]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the run's report summary, Acc_r history
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disposed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # weights deleted; row kept for audit

    model: Mapped[RegisteredModel] = relationship(back_populates="versions", foreign_keys=[model_id])


class ModelEvent(Base):
    """Append-only: a change to a model's settings (its evaluation or anchor set), who made it, when."""

    __tablename__ = "model_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # No foreign key, as audit_events: the trail must outlive what it describes.
    model_id: Mapped[str] = mapped_column(String(36), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    event: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
