"""Registry endpoints: register a base model, read the current version, list versions, download weights."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from service.deps import ModelsReader, ModelsWriter, SessionDep, SettingsDep
from service.errors import InvalidInput, PayloadTooLarge
from service.registry import service
from service.registry.models import ModelVersion, RegisteredModel
from service.registry.service import InvalidModelPackage
from service.registry.schemas import (ModelEventPublic, ModelPublic, ModelUpdate, ModelVersionList, ModelVersionPublic,
                                      RequestRef)
from service.registry.package_check import limits_from
from service.sources import read_limits
from service.registry.storage import ArtifactStore

router = APIRouter(tags=["models"])


class WeightsFileResponse(FileResponse):
    """A weights file from the local store. Starlette reads files in 64 KiB chunks, each read a hop
    to a worker thread and each chunk a pass through the middleware; weights are tens of MB, and
    1 MiB chunks served a 25 MB file about 1.7x faster here (~700 against ~420 MB/s, api_load.py)."""

    chunk_size = 1 << 20

    def __init__(self, *args, honour_range: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.honour_range = honour_range

    async def __call__(self, scope, receive, send) -> None:
        if not self.honour_range:  # RFC 9110 14.2: a Range the server does not take is ignored (200, whole file)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        await super().__call__(scope, receive, send)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: ``*`` matches any current representation, and If-None-Match compares weakly
    (``W/"x"`` matches ``"x"``)."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in [t.removeprefix("W/") for t in tags]


def store_of(request: Request) -> ArtifactStore:
    return request.app.state.store


def to_public(session, model: RegisteredModel, version: ModelVersion) -> ModelVersionPublic:
    requests = service.incorporated_requests(session=session, version=version)
    disposed = version.disposed_at is not None
    return ModelVersionPublic(
        model=model.name, version=version.version, sha256=version.sha256, size=version.size,
        created_at=version.created_at, current=model.current_version_id == version.id,
        classes=list(version.card.get("classes", [])), classes_forgotten=list(version.classes_forgotten),
        deletion_requests=[RequestRef(id=r.id, external_id=r.external_id, forget_class=r.forget_class) for r in requests],
        metrics=version.metrics, superseded_at=version.superseded_at, disposed_at=version.disposed_at,
        download_url=None if disposed else f"/models/{model.name}/versions/{version.version}/weights",
    )


@router.post("/models", status_code=201, response_model=ModelVersionPublic,
             summary="Register a base model as version 1 (multipart: name, card, weights, optional eval_set, anchor_set)")
def register_model(request: Request, response: Response, session: SessionDep, settings: SettingsDep,
                   _key: ModelsWriter, name: Annotated[str, Form(description="^[a-z0-9][a-z0-9._-]{0,63}$, not 'current'")],
                   card: Annotated[UploadFile, File(description="model.json")],
                   weights: Annotated[UploadFile, File(description="model.safetensors")],
                   eval_set: Annotated[str | None, Form(description="file:// URI of a labelled validation split")] = None,
                   anchor_set: Annotated[str | None, Form(description="file:// or s3:// URI of unlabelled images of none "
                                                          "of the model's classes (e.g. CIFAR-10 images for a face model)")] = None,
                   ) -> ModelVersionPublic:
    # End the key lookup's transaction: copying and checking the package take seconds, and must not
    # hold the database meanwhile (on SQLite, its write lock: every other writer would wait).
    session.commit()
    store = store_of(request)
    incoming = store.new_incoming()
    try:
        copy_limited(weights, incoming, settings.max_upload_bytes)
        version = service.register_model(session=session, store=store, name=name, card_bytes=read_card(card),
                                         weights_path=incoming, eval_set=eval_set or None, anchor_set=anchor_set or None,
                                         data_roots=settings.allowed_data_roots, limits=limits_from(settings),
                                         image_limits=read_limits(settings))
    finally:
        incoming.unlink(missing_ok=True)
    model = session.get(RegisteredModel, version.model_id)
    response.headers["Location"] = f"/models/{model.name}/versions/1"
    return to_public(session, model, version)


MAX_CARD_BYTES = 1 << 20


def read_card(card: UploadFile) -> bytes:
    data = card.file.read(MAX_CARD_BYTES + 1)
    if len(data) > MAX_CARD_BYTES:  # refused whole, rather than cut and then "not JSON"
        raise InvalidModelPackage(f"the card is larger than {MAX_CARD_BYTES} bytes; a model card is a few KB")
    return data


def copy_limited(upload: UploadFile, target, limit: int) -> None:
    with open(target, "wb") as out:
        copied = 0
        for chunk in iter(lambda: upload.file.read(1 << 20), b""):
            copied += len(chunk)
            if copied > limit:
                raise PayloadTooLarge(f"weights larger than the {limit}-byte limit (LETHE_MAX_UPLOAD_BYTES)")
            out.write(chunk)


def model_public(session, model: RegisteredModel) -> ModelPublic:
    return ModelPublic(name=model.name, created_at=model.created_at,
                       current_version=service.current_version(session=session, model=model).version,
                       eval_set=model.eval_set_uri, anchor_set=model.anchor_set_uri,
                       events=[ModelEventPublic(at=e.at, actor=e.actor, event=e.event, detail=e.detail)
                               for e in service.model_events(session=session, model=model)])


@router.get("/models/current", response_model=ModelVersionPublic,
            summary="The current version of a model; ETag is its sha256 (If-None-Match gives 304)")
def get_current(request: Request, session: SessionDep, _key: ModelsReader,
                model: Annotated[str | None, Query(description="model name; optional when only one exists")] = None):
    registered = service.resolve_model(session=session, name=model)
    version = service.current_version(session=session, model=registered)
    etag = f'"{version.sha256}"'
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    body = to_public(session, registered, version)
    return Response(body.model_dump_json(), media_type="application/json", headers={"ETag": etag})


# After /models/current: 'current' is a reserved name, never a model's.
@router.get("/models/{name}", response_model=ModelPublic, summary="A model: its current version, its sets, their changes")
def get_model(name: str, session: SessionDep, _key: ModelsReader) -> ModelPublic:
    return model_public(session, service.get_model(session=session, name=name))


@router.patch("/models/{name}", response_model=ModelPublic,
              summary="Replace or remove a model's evaluation or anchor set (checked as a run reads it; audited)")
def update_model(name: str, body: ModelUpdate, session: SessionDep, settings: SettingsDep,
                 key: ModelsWriter) -> ModelPublic:
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    if not changes:
        raise InvalidInput("give eval_set or anchor_set (null removes it)")
    card = service.current_version(session=session, model=service.get_model(session=session, name=name)).card
    session.commit()  # the check reads every image of the new sets: seconds, with no transaction open
    service.check_model_sets(card=card, changes=changes, data_roots=settings.allowed_data_roots,
                             limits=limits_from(settings), image_limits=read_limits(settings))
    model = service.update_model(session=session, name=name, changes=changes, actor=f"api-key:{key.name}")
    return model_public(session, model)


@router.get("/models/{name}/versions", response_model=ModelVersionList, summary="Every version of a model, oldest first")
def list_versions(name: str, session: SessionDep, _key: ModelsReader) -> ModelVersionList:
    model = service.get_model(session=session, name=name)
    return ModelVersionList(model=model.name, versions=[to_public(session, model, v) for v in model.versions])


@router.get("/models/{name}/versions/{version}/card", summary="The version's model card (model.json): what a "
            "consumer needs beside the weights to build the model")
def get_card(name: str, version: int, session: SessionDep, _key: ModelsReader) -> Response:
    row = service.get_version(session=session, name=name, version=version)
    return Response(json.dumps(row.card, indent=2), media_type="application/json", headers={"ETag": f'"{row.sha256}"'})


@router.get("/models/{name}/versions/{version}/weights", response_class=FileResponse,
            summary="The version's model.safetensors (Range supported; If-None-Match gives 304; 410 once "
                    "disposed of; 307 to a presigned URL with LETHE_ARTIFACTS_REDIRECT on an S3 store)")
def download_weights(name: str, version: int, request: Request, session: SessionDep, settings: SettingsDep,
                     _key: ModelsReader):
    row = service.get_version(session=session, name=name, version=version)
    service.check_weights_kept(version=row)
    store = store_of(request)
    headers = {"ETag": f'"{row.sha256}"', "X-Checksum-Sha256": row.sha256}
    if etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    if (path := store.local_path(row.sha256)) is not None:
        # One byte range, as the remote store gives; anything else is ignored (RFC 9110 allows it)
        # rather than answered 400 text/plain.
        honour_range = parse_range(request.headers.get("range"), row.size) is not None
        return WeightsFileResponse(path, media_type="application/octet-stream", filename="model.safetensors",
                                   headers=headers, honour_range=honour_range)
    if settings.artifacts_redirect and request.method == "GET":  # HEAD: a presigned GET URL would refuse it
        url = store.presigned_url(row.sha256, settings.artifacts_presign_seconds)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={**headers, "Cache-Control": "no-store"})
    return stream_weights(request, store, row, headers)


def stream_weights(request: Request, store, row: ModelVersion, headers: dict[str, str]) -> Response:
    """The weights from a remote store, in chunks, with one byte range when asked for one (as FileResponse does)."""
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Disposition": 'attachment; filename="model.safetensors"'}
    byte_range = parse_range(request.headers.get("range"), row.size)
    if byte_range == "unsatisfiable":
        return Response(status_code=416, headers={"Content-Range": f"bytes */{row.size}"})
    first, last = byte_range or (0, row.size - 1)
    status = 206 if byte_range else 200
    if byte_range:
        headers["Content-Range"] = f"bytes {first}-{last}/{row.size}"
    if request.method == "HEAD":
        return Response(status_code=status, media_type="application/octet-stream",
                        headers={**headers, "Content-Length": str(last - first + 1)})
    download = store.open(row.sha256, first, last if byte_range else None)

    def chunks():
        try:
            yield from download.chunks
        finally:
            download.close()

    return StreamingResponse(chunks(), status_code=status, media_type="application/octet-stream",
                             headers={**headers, "Content-Length": str(download.length)})


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range as (first, last), "unsatisfiable", or None for the whole file (no header,
    several ranges, or one that does not parse: RFC 9110 lets a server ignore those)."""
    if not header or not header.strip().lower().startswith("bytes=") or "," in header:
        return None
    start, _, end = header.strip()[6:].partition("-")
    try:
        if not start.strip():  # suffix: the last N bytes
            suffix = int(end)
            return (max(0, size - suffix), size - 1) if suffix > 0 and size else "unsatisfiable"
        first, last = int(start), int(end) if end.strip() else size - 1
    except ValueError:
        return None
    if first < 0 or last < first:
        return None
    return (first, min(last, size - 1)) if first < size else "unsatisfiable"


@router.head("/models/{name}/versions/{version}/weights", include_in_schema=False)
def head_weights(name: str, version: int, request: Request, session: SessionDep, settings: SettingsDep,
                 _key: ModelsReader):
    return download_weights(name, version, request, session, settings, _key)


