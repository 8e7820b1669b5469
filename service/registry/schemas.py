"""Registry payloads, named by role."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class RequestRef(BaseModel):
    id: str
    external_id: str
    forget_class: str


class ModelVersionPublic(BaseModel):
    model: str
    version: int
    sha256: str
    size: int
    created_at: datetime
    current: bool
    classes: list[str]
    classes_forgotten: list[str]
    deletion_requests: list[RequestRef]
    metrics: dict[str, Any] | None
    superseded_at: datetime | None
    disposed_at: datetime | None
    download_url: str | None  # None once the weights are disposed of


class ModelVersionList(BaseModel):
    model: str
    versions: list[ModelVersionPublic]
