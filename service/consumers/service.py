"""Registering consumers and recording what they serve."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth.models import ApiKey
from service.auth.service import has_scope
from service.consumers.models import Acknowledgement, Consumer
from service.consumers.propagation import live_consumers, propagate, served_again
from service.db import utcnow
from service.deletion_requests.models import DeletionRequest
from service.errors import Conflict, Forbidden, InvalidInput, NotFound
from service.registry.models import ModelVersion, RegisteredModel
from service.registry.service import NAME_PATTERN


class VersionMismatch(InvalidInput):
    code, title = "version_mismatch", "Not a version of this model"


@dataclass(frozen=True)
class Serving:
    """What a consumer serves now: its last acknowledgement, and whether current has moved past it."""

    consumer: Consumer
    last: Acknowledgement | None
    current_version: int

    @property
    def lagging(self) -> bool:
        return self.last is None or self.last.version < self.current_version


def register(*, session: Session, model: RegisteredModel, name: str, api_key_name: str, actor: str) -> Consumer:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput("a consumer's name is 1-64 lowercase letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit")
    key = session.scalar(select(ApiKey).where(ApiKey.name == api_key_name))
    if key is None:
        raise InvalidInput(f"no API key named {api_key_name!r}: create it first (lethe keys create)")
    if not has_scope(key, "models:read"):  # it could never read the version it should acknowledge
        raise InvalidInput(f"the key {api_key_name!r} lacks models:read, which a consumer needs to pull and acknowledge")
    existing = session.scalar(select(Consumer).where(Consumer.model_id == model.id, Consumer.name == name))
    if existing is not None and existing.removed_at is None:
        raise Conflict(f"model {model.name} has a consumer named {name!r} already")
    if existing is not None:
        # The same service back: its history stays, but it serves nothing until it acknowledges
        # again (what it said before its removal may no longer be true).
        existing.removed_at, existing.api_key_name, existing.created_by = None, api_key_name, actor
        existing.created_at = utcnow()
        return existing
    consumer = Consumer(model_id=model.id, name=name, api_key_name=api_key_name, created_by=actor)
    session.add(consumer)
    session.flush()  # two calls racing: the loser's IntegrityError is a 409 (service/errors.py)
    return consumer


def remove(*, session: Session, model: RegisteredModel, consumer: Consumer, actor: str) -> list[DeletionRequest]:
    """A decommissioned service: no longer awaited (its history stays). Requests that waited only
    for it propagate now; returned."""
    consumer.removed_at = utcnow()
    session.flush()
    return propagate(session=session, model_id=model.id, actor=actor)


def get(*, session: Session, model: RegisteredModel, name: str, removed_too: bool = False) -> Consumer:
    consumer = session.scalar(select(Consumer).where(Consumer.model_id == model.id, Consumer.name == name))
    if consumer is None or (consumer.removed_at is not None and not removed_too):
        raise NotFound(f"model {model.name} has no consumer named {name!r}")
    return consumer


def acknowledge(*, session: Session, model: RegisteredModel, consumer: Consumer, version: int, sha256: str,
                key: ApiKey) -> Acknowledgement:
    """The consumer now serves ``version`` (checked against the registry: that version of this
    model, with these weights). Only the consumer's own key (or an admin) may say so."""
    if key.name != consumer.api_key_name and not has_scope(key, "admin"):
        raise Forbidden(f"only the key {consumer.api_key_name!r} acknowledges for consumer {consumer.name!r}")
    row = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == version))
    if row is None or row.sha256 != sha256.lower():
        raise VersionMismatch(f"model {model.name} has no version {version} with sha256 {sha256}")
    ack = Acknowledgement(consumer_id=consumer.id, version_id=row.id, version=row.version, sha256=row.sha256,
                          at=utcnow(), by=key.name)
    session.add(ack)
    session.flush()
    actor = f"consumer:{consumer.name}"
    propagate(session=session, model_id=model.id, actor=actor)
    served_again(session=session, model_id=model.id, consumer=consumer.name, version=row.version, actor=actor)
    return ack


def serving(*, session: Session, model: RegisteredModel) -> list[Serving]:
    current = session.get(ModelVersion, model.current_version_id)
    consumers = live_consumers(session, model.id)
    return [Serving(c, _last(session, c), current.version if current else 0) for c in consumers]


def history(*, session: Session, consumer: Consumer) -> list[tuple[Acknowledgement, datetime | None]]:
    """Every acknowledgement, oldest first, with when the next one replaced it (None: still served)."""
    acks = session.scalars(select(Acknowledgement).where(Acknowledgement.consumer_id == consumer.id)
                           .order_by(Acknowledgement.id)).all()
    return [(a, acks[i + 1].at if i + 1 < len(acks) else None) for i, a in enumerate(acks)]


def _last(session: Session, consumer: Consumer) -> Acknowledgement | None:
    return session.scalar(select(Acknowledgement).where(Acknowledgement.consumer_id == consumer.id,
                                                        Acknowledgement.at >= consumer.created_at)
                          .order_by(Acknowledgement.id.desc()).limit(1))
