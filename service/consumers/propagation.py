"""When an erasure is done: a completed request becomes ``propagated`` once every registered
consumer of its model has acknowledged serving the version that fulfilled it, or a later one
(versions form one chain, n+1 made from n, so a later version carries every earlier erasure).

Checked where the answer can change: a request completes, a consumer acknowledges, a consumer is
removed; and by the sweep, which catches what none of those saw (requests completed before
consumers existed, a crash between commit and check)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.consumers.models import Acknowledgement, Consumer
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.deletion_requests.transitions import record, transition
from service.registry.models import ModelVersion
from service.registry.service import lock_model

log = logging.getLogger("lethe.consumers")
NO_CONSUMERS = "the model has no registered consumers: no inference service reported serving an earlier version"


@dataclass(frozen=True)
class Confirmation:
    """Whether a consumer serves a version that carries an erasure: ``version`` is what it serves
    now, ``since`` when it last moved onto such a version (it may have gone back and forth)."""

    consumer: str
    confirmed: bool
    version: int | None
    since: datetime | None

    def to_dict(self) -> dict:
        return {"consumer": self.consumer, "confirmed": self.confirmed, "version": self.version,
                "since": self.since.isoformat() if self.since else None}


def live_consumers(session: Session, model_id: str) -> list[Consumer]:
    return list(session.scalars(select(Consumer).where(Consumer.model_id == model_id, Consumer.removed_at.is_(None))
                                .order_by(Consumer.created_at, Consumer.id)))


def confirmations(session: Session, request: DeletionRequest) -> list[Confirmation]:
    """Per live consumer of the request's model: does it serve a version that carries this erasure?"""
    if request.fulfilled_version_id is None:
        return []
    consumers = live_consumers(session, request.model_id)
    return _confirm(consumers, _served(session, consumers), _needed(request))


def propagate(*, session: Session, model_id: str, actor: str) -> list[DeletionRequest]:
    """Move every completed request of the model that all its live consumers now serve to
    ``propagated``, in the caller's transaction. The model's row is locked first: two consumers
    acknowledging at once must not each miss the other's acknowledgement and leave it completed."""
    lock_model(session=session, model_id=model_id)
    # Ids and the versions needed, not whole rows: a model's backlog of completed requests is read
    # at every sweep, and most of it waits on the same consumer (10,000 rows took 2.4 s a sweep).
    completed = session.execute(
        select(DeletionRequest.id, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == DeletionRequest.fulfilled_version_id)
        .where(DeletionRequest.model_id == model_id, DeletionRequest.status == S.COMPLETED)
        .order_by(DeletionRequest.finished_at, DeletionRequest.id)).all()
    if not completed:
        return []
    consumers = live_consumers(session, model_id)
    served = _served(session, consumers)
    by_version: dict[int, list[Confirmation]] = {}
    moved = []
    for request_id, needed in completed:
        if needed not in by_version:
            by_version[needed] = _confirm(consumers, served, needed)
        confirmed = by_version[needed]
        if not all(c.confirmed for c in confirmed):
            continue
        detail = {"version": needed, "consumers": [c.to_dict() for c in confirmed]}
        if not consumers:
            detail["note"] = NO_CONSUMERS
        request = session.get(DeletionRequest, request_id)
        transition(session=session, request=request, to=S.PROPAGATED, actor=actor, detail=detail)
        moved.append(request)
    return moved


def served_again(*, session: Session, model_id: str, consumer: str, version: int, actor: str) -> list[str]:
    """A consumer now serves a version older than the one that fulfilled propagated requests: it
    answers with their classes again. Their status stays (the erasure was shown done), and each gets
    an audit event saying so, which their certificates then state; returns their ids."""
    back = list(session.scalars(
        select(DeletionRequest).join(ModelVersion, ModelVersion.id == DeletionRequest.fulfilled_version_id)
        .where(DeletionRequest.model_id == model_id, DeletionRequest.status == S.PROPAGATED,
               ModelVersion.version > version)))
    for request in back:
        record(session=session, request=request, event="served_again", actor=actor,
               detail={"consumer": consumer, "version": version})
    if back:
        log.warning("consumer %s of model %s went back to version %d: %d propagated request(s) are served again",
                    consumer, model_id, version, len(back))
    return [r.id for r in back]


def _needed(request: DeletionRequest) -> int:
    return request.fulfilled_version.version


def _served(session: Session, consumers: list[Consumer]) -> dict[str, list[tuple[int, datetime]]]:
    """Each consumer's acknowledgements since it was (last) registered, as (version, when), oldest first."""
    served: dict[str, list[tuple[int, datetime]]] = {c.id: [] for c in consumers}
    since = {c.id: c.created_at for c in consumers}
    rows = session.execute(select(Acknowledgement.consumer_id, Acknowledgement.version, Acknowledgement.at)
                           .where(Acknowledgement.consumer_id.in_(list(served))).order_by(Acknowledgement.id))
    for consumer_id, version, at in rows:
        if at >= since[consumer_id]:
            served[consumer_id].append((version, at))
    return served


def _confirm(consumers: list[Consumer], served: dict[str, list[tuple[int, datetime]]], needed: int
             ) -> list[Confirmation]:
    out = []
    for c in consumers:
        acks = served[c.id]
        since = None
        for version, at in reversed(acks):  # the unbroken run of acknowledgements at or past ``needed``
            if version < needed:
                break
            since = at
        out.append(Confirmation(c.name, since is not None, acks[-1][0] if acks else None, since))
    return out
