"""Consumer endpoints: registered by an operator (models:write), acknowledged by the consumer's own key."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from service.consumers import service
from service.deps import ModelsReader, ModelsWriter, SessionDep
from service.registry.service import get_model

router = APIRouter(prefix="/models/{name}/consumers", tags=["consumers"])


class ConsumerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    api_key: str = Field(min_length=1, max_length=200, description="the name of the API key it acknowledges with")


class Acknowledge(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="of the weights it loaded")


class Served(BaseModel):
    version: int
    sha256: str
    since: datetime
    until: datetime | None = None
    by: str


class ConsumerPublic(BaseModel):
    name: str
    api_key: str
    created_at: datetime
    serving: Served | None = Field(description="its last acknowledgement; None: it has acknowledged nothing yet")
    lagging: bool = Field(description="it serves a version older than current (or none)")


def _served(ack, until=None) -> Served:
    return Served(version=ack.version, sha256=ack.sha256, since=ack.at, until=until, by=ack.by)


def _public(s: service.Serving) -> ConsumerPublic:
    return ConsumerPublic(name=s.consumer.name, api_key=s.consumer.api_key_name, created_at=s.consumer.created_at,
                          serving=_served(s.last) if s.last else None, lagging=s.lagging)


@router.post("", status_code=201, response_model=ConsumerPublic, summary="Register an inference service of the model")
def create(name: str, body: ConsumerCreate, session: SessionDep, key: ModelsWriter) -> ConsumerPublic:
    model = get_model(session=session, name=name)
    consumer = service.register(session=session, model=model, name=body.name, api_key_name=body.api_key,
                                actor=f"api-key:{key.name}")
    return _public(next(s for s in service.serving(session=session, model=model) if s.consumer.id == consumer.id))


@router.get("", response_model=list[ConsumerPublic], summary="The model's consumers, the version each serves, since when")
def listing(name: str, session: SessionDep, _key: ModelsReader) -> list[ConsumerPublic]:
    return [_public(s) for s in service.serving(session=session, model=get_model(session=session, name=name))]


@router.put("/{consumer}", response_model=Served, summary="A consumer acknowledges the version it now serves")
def acknowledge(name: str, consumer: str, body: Acknowledge, session: SessionDep, key: ModelsReader) -> Served:
    model = get_model(session=session, name=name)
    row = service.get(session=session, model=model, name=consumer)
    return _served(service.acknowledge(session=session, model=model, consumer=row, version=body.version,
                                       sha256=body.sha256, key=key))


@router.delete("/{consumer}", status_code=204, summary="Remove a decommissioned consumer (its history stays)")
def remove(name: str, consumer: str, session: SessionDep, key: ModelsWriter) -> Response:
    """Requests that waited only for this consumer become propagated in the same transaction."""
    model = get_model(session=session, name=name)
    service.remove(session=session, model=model, consumer=service.get(session=session, model=model, name=consumer),
                   actor=f"api-key:{key.name}")
    return Response(status_code=204)


@router.get("/{consumer}/acknowledgements", response_model=list[Served],
            summary="Every version the consumer served, from when to when, oldest first")
def history(name: str, consumer: str, session: SessionDep, _key: ModelsReader) -> list[Served]:
    row = service.get(session=session, model=get_model(session=session, name=name), name=consumer, removed_too=True)
    return [_served(ack, until) for ack, until in service.history(session=session, consumer=row)]
