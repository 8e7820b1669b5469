"""Deletion-request payloads, named by role."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator

NO_NUL = r"^[^\x00]*$"  # Postgres text cannot hold NUL


def in_utc(value: datetime) -> datetime:
    """An aware datetime moved to UTC; ValueError for one UTC cannot hold (9999-12-31T23:59-14:00)."""
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("out of range once moved to UTC") from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(in_utc)]


class ForgetSetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str = Field(max_length=4096, description="file:///... or s3://bucket/... inside LETHE_DATA_ROOTS: the class's images")


class DeletionRequestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    external_id: str = Field(min_length=1, max_length=200, pattern=NO_NUL, description="the caller's id; unique per model")
    model: str = Field(min_length=1, max_length=64, pattern=NO_NUL)
    forget_class: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    forget_set: ForgetSetRef
    received_at: UtcDatetime | None = Field(None, description="when the request reached the controller; default now")

    @field_validator("received_at")
    @classmethod
    def _plausible_time(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.year < 1970:
            raise ValueError("received_at must be after 1970")
        return value


class ExtendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    days: int = Field(ge=1, le=60, description="added to due_at; at most 60 days in all (GDPR Art. 12(3))")
    reason: str = Field(min_length=3, max_length=2000, pattern=NO_NUL)


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=2000, pattern=NO_NUL)


class AuditEventPublic(BaseModel):
    at: datetime
    actor: str
    event: str
    from_status: str | None
    to_status: str | None
    detail: dict[str, Any] | None


class DeletionRequestAccepted(BaseModel):
    id: str
    status: str
    due_at: datetime


class DeletionRequestPublic(BaseModel):
    id: str
    external_id: str
    model: str
    forget_class: str
    forget_set: ForgetSetRef
    status: str
    received_at: datetime
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    due_at: datetime
    days_left: int | None = Field(description="whole days until due_at (negative when overdue); None once finished")
    at_risk: bool
    overdue: bool
    extended_days: int
    attempts: int
    fulfilled_version: int | None
    metrics: dict[str, Any] | None
    error: str | None
    redacted_at: datetime | None = Field(None, description="when its class name and forget set were replaced by "
                                         "'redacted' (LETHE_REDACT_AFTER_DAYS after it finished)")
    events: list[AuditEventPublic] = []


class DeletionRequestPage(BaseModel):
    items: list[DeletionRequestPublic]
    next_cursor: str | None
