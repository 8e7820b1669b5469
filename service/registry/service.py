"""Registry: register base models, publish versions, move the ``current`` alias, dispose of old weights."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import utcnow
from service.deletion_requests.models import DeletionRequest
from service.errors import Conflict, Gone, InvalidInput, NotFound, Overloaded
from service.registry.models import ModelEvent, ModelVersion, RegisteredModel
from service.registry.package_check import (ChecksBusy, PackageLimits, PackageRejected, SetRejected, check_package,
                                            check_sets)
from service.registry.storage import ArtifactStore
from service.sources import Root, check_data_root, resolve_in_data_root
from service.webhooks.service import emit

if TYPE_CHECKING:
    from worker.engine.images import ReadLimits

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RESERVED_NAMES = {"current"}


class InvalidModelPackage(InvalidInput):
    code, title = "invalid_model_package", "Model package rejected"


def check_model_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name or "") or name in RESERVED_NAMES:
        raise InvalidInput(f"model name {name!r} must match {NAME_PATTERN.pattern} and not be 'current'")
    return name


def validate_package(card_bytes: bytes, weights_path: Path, limits: PackageLimits, sets: dict[str, Path],
                     image_limits: ReadLimits) -> dict[str, Any]:
    """The card, once its network loaded the weights strictly and each local set read as a run would
    read it, checked in a child process with a time and memory limit (``package_check``); 422 otherwise."""
    try:
        return check_package(card_bytes, weights_path, limits, sets, image_limits)
    except ChecksBusy as exc:
        raise Overloaded(str(exc)) from None
    except SetRejected as exc:
        raise InvalidInput(str(exc)) from None
    except PackageRejected as exc:
        raise InvalidModelPackage(str(exc)) from None


def local_sets(sets: dict[str, str | None], data_roots: list[Root]) -> dict[str, Path]:
    """Every set given checked inside the data roots (symlinks resolved, and the resolved path never
    echoed); the local ones as paths, for the check that reads them. An s3:// set is read by the first
    run (its listing can take minutes)."""
    local = {}
    for role, uri in sets.items():
        if uri is None:
            continue
        try:
            check_data_root(uri, data_roots)
            if not uri.startswith("s3://"):
                local[role] = resolve_in_data_root(uri, data_roots)
        except InvalidInput as exc:
            raise type(exc)(f"{role}: {exc.detail}") from None
    return local


def register_model(*, session: Session, store: ArtifactStore, name: str, card_bytes: bytes, weights_path: Path,
                   eval_set: str | None, data_roots: list[Root], limits: PackageLimits, image_limits: ReadLimits,
                   anchor_set: str | None = None) -> ModelVersion:
    """A new model as version 1, with ``current`` pointing at it. ``weights_path`` goes into the store
    (stored and verified before the row that names it is written). The package and the sets are
    checked before the session is used: the check takes seconds, and must not hold the database."""
    check_model_name(name)
    sets = local_sets({"eval_set": eval_set, "anchor_set": anchor_set}, data_roots)
    card = validate_package(card_bytes, weights_path, limits, sets, image_limits)
    if session.scalar(select(RegisteredModel).where(RegisteredModel.name == name)):
        raise Conflict(f"a model named {name!r} is registered already")
    sha256, size = store.put(weights_path)
    model = RegisteredModel(name=name, eval_set_uri=eval_set, anchor_set_uri=anchor_set)
    try:
        with session.begin_nested():  # a concurrent registration of the same name may win
            session.add(model)
            session.flush()
    except IntegrityError:
        raise Conflict(f"a model named {name!r} is registered already") from None
    version = ModelVersion(model_id=model.id, version=1, sha256=sha256, size=size, card=card, classes_forgotten=[])
    session.add(version)
    session.flush()
    model.current_version_id = version.id
    session.flush()
    announce_version(session, model, version)
    return version


SETTABLE = ("eval_set", "anchor_set")


def check_model_sets(*, card: dict[str, Any], changes: dict[str, str | None], data_roots: list[Root],
                     limits: PackageLimits, image_limits: ReadLimits) -> None:
    """Before ``update_model``, with no transaction open (it reads every image): the new sets read as a
    run of a model with this card would read them (422 otherwise)."""
    sets = local_sets(changes, data_roots)
    if sets:
        try:
            check_sets(card, sets, limits, image_limits)
        except ChecksBusy as exc:
            raise Overloaded(str(exc)) from None
        except PackageRejected as exc:
            raise InvalidInput(str(exc)) from None


def update_model(*, session: Session, name: str, changes: dict[str, str | None], actor: str) -> RegisteredModel:
    """Replace (or, with None, remove) a model's evaluation or anchor set; each change an audit event.
    The model's next run reads the new set; a run in progress keeps the one it started with."""
    model = get_model(session=session, name=name)
    for role, uri in changes.items():
        column = f"{role}_uri"
        before = getattr(model, column)
        if before == uri:
            continue
        setattr(model, column, uri)
        session.add(ModelEvent(model_id=model.id, actor=actor, event=f"{role}_replaced" if uri else f"{role}_removed",
                               detail={"from": before, "to": uri}))
    session.flush()
    return model


def model_events(*, session: Session, model: RegisteredModel) -> list[ModelEvent]:
    return list(session.scalars(select(ModelEvent).where(ModelEvent.model_id == model.id).order_by(ModelEvent.id)))


def get_model(*, session: Session, name: str) -> RegisteredModel:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise NotFound(f"no model named {name!r}")  # not a valid name: never stored
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if model is None:
        raise NotFound(f"no model named {name!r}")
    return model


def resolve_model(*, session: Session, name: str | None) -> RegisteredModel:
    """The named model; without a name, the only one registered."""
    if name is not None:
        return get_model(session=session, name=name)
    models = session.scalars(select(RegisteredModel).limit(2)).all()
    if not models:
        raise NotFound("no model is registered")
    if len(models) > 1:
        raise InvalidInput("several models are registered: name one with ?model=NAME")
    return models[0]


def current_version(*, session: Session, model: RegisteredModel) -> ModelVersion:
    return session.get(ModelVersion, model.current_version_id)


def incorporated_requests(*, session: Session, version: ModelVersion) -> list[DeletionRequest]:
    """The erasures a version carries: those fulfilled by it or by an earlier version of its chain."""
    return list(session.scalars(
        select(DeletionRequest).join(ModelVersion, ModelVersion.id == DeletionRequest.fulfilled_version_id)
        .where(ModelVersion.model_id == version.model_id, ModelVersion.version <= version.version)
        .order_by(DeletionRequest.finished_at, DeletionRequest.id)))


MAX_VERSION = 2**31 - 1


def get_version(*, session: Session, name: str, version: int) -> ModelVersion:
    model = get_model(session=session, name=name)
    # Versions count from 1 in a 32-bit column: a number outside cannot name one (and would overflow
    # the driver, 10**22 on SQLite).
    in_range = 1 <= version <= MAX_VERSION
    row = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                    ModelVersion.version == version)) if in_range else None
    if row is None:
        raise NotFound(f"model {name!r} has no version {version}")
    return row


def check_weights_kept(*, version: ModelVersion) -> None:
    """410 once a superseded version's weights were deleted; its row (and sha256) stays."""
    if version.disposed_at is not None:
        raise Gone(f"version {version.version} was superseded and its weights deleted at "
                   f"{version.disposed_at.isoformat()}; sha256 {version.sha256} stays on record")


def lock_model(*, session: Session, model_id: str) -> RegisteredModel:
    """Lock the model's row for the rest of the transaction: version numbers and the alias move one at a time."""
    return session.scalar(select(RegisteredModel).where(RegisteredModel.id == model_id).with_for_update())


def announce_version(session: Session, model: RegisteredModel, version: ModelVersion) -> None:
    """The webhook event of a new version, into the outbox in this transaction (no class names:
    how many classes it forgets, not which)."""
    emit(session, "model.version_published", {"model": model.name, "version": version.version,
                                              "sha256": version.sha256, "size": version.size,
                                              "classes_forgotten": len(version.classes_forgotten or [])})


def publish_version(*, session: Session, model_id: str, sha256: str, size: int, card: dict[str, Any],
                    classes_forgotten: list[str], metrics: dict[str, Any]) -> ModelVersion:
    """Version n+1 and ``current`` moved to it, in the caller's transaction."""
    model = lock_model(session=session, model_id=model_id)
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id)) or 0
    previous = session.get(ModelVersion, model.current_version_id)
    version = ModelVersion(model_id=model_id, version=latest + 1, sha256=sha256, size=size, card=card,
                           classes_forgotten=classes_forgotten, metrics=metrics)
    session.add(version)
    session.flush()
    if previous is not None:
        previous.superseded_at = utcnow()
    model.current_version_id = version.id
    session.flush()
    announce_version(session, model, version)
    return version


def remove_orphans(*, settings, store: ArtifactStore, grace_hours: float) -> tuple[int, int]:
    """Weights no version names (a registration or run that crashed between storing them and
    committing its row: for a registration, a copy of the base model in which every person is still
    recognisable), and unfinished uploads, older than the grace period; returns (files, parts) removed.
    The grace period covers the time between a put and the commit that names it; each candidate is
    looked at again (named now? written again since the listing?) just before it is deleted."""
    from service.db import session_scope

    cutoff = utcnow() - timedelta(hours=grace_hours)
    with session_scope(settings.database) as session:
        named = set(session.scalars(select(ModelVersion.sha256).where(ModelVersion.disposed_at.is_(None))))
    candidates = [sha256 for sha256, written in store.stored() if sha256 not in named and written < cutoff]
    removed = 0
    for sha256 in candidates:
        with session_scope(settings.database) as session:
            if session.scalar(select(ModelVersion.id).where(ModelVersion.sha256 == sha256,
                                                            ModelVersion.disposed_at.is_(None)).limit(1)):
                continue
        written = store.written(sha256)
        if written is not None and written < cutoff:
            store.delete(sha256)
            removed += 1
    return removed, store.remove_stale_parts(cutoff)


def dispose_superseded(*, session: Session, store: ArtifactStore, retention_hours: float) -> list[ModelVersion]:
    """Delete the weights of versions superseded longer than the retention period; rows stay for the audit."""
    cutoff = utcnow() - timedelta(hours=retention_hours)
    expired = session.scalars(select(ModelVersion).where(
        ModelVersion.superseded_at.is_not(None), ModelVersion.superseded_at <= cutoff,
        ModelVersion.disposed_at.is_(None))).all()
    for version in expired:
        version.disposed_at = utcnow()
        still_used = session.scalar(select(func.count()).select_from(ModelVersion).where(
            ModelVersion.sha256 == version.sha256, ModelVersion.disposed_at.is_(None)))
        if not still_used:
            store.delete(version.sha256)
    session.flush()
    return expired
