"""Registry payloads, named by role."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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


class ModelUpdate(BaseModel):
    """The sets to replace; ``null`` removes one; a field left out is kept."""

    model_config = ConfigDict(extra="forbid")

    eval_set: str | None = Field(None, max_length=4096, description="file:// or s3:// URI of a labelled validation split")
    anchor_set: str | None = Field(None, max_length=4096, description="file:// or s3:// URI of unlabelled images of none "
                                   "of the model's classes")


class ModelEventPublic(BaseModel):
    at: datetime
    actor: str
    event: str
    detail: dict[str, Any] | None


class ModelPublic(BaseModel):
    name: str
    created_at: datetime
    current_version: int
    eval_set: str | None
    anchor_set: str | None
    events: list[ModelEventPublic]  # every change of its sets, oldest first
