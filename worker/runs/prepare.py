"""Before training: the current version as a package the engine reads, and each request's forget
set checked (readable, inside the data roots, of a class the version has) and measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.db import session_scope
from service.errors import ServiceError
from service.registry.models import ModelVersion
from service.registry.storage import artifact_store
from worker.runs.batch import RunContext


def materialise_version(ctx: RunContext, folder: Path) -> Path:
    """The current version as a package folder the engine can read: the weights linked from a folder store,
    downloaded (and checked against their sha256) from S3."""
    with session_scope(ctx.settings.database) as session:
        version = session.get(ModelVersion, ctx.batch.version_id)
        card, sha256 = version.card, version.sha256
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(card))
    artifact_store(ctx.settings).fetch(sha256, folder / "model.safetensors")
    return folder


def check_sources(ctx: RunContext, package: Path) -> dict[str, str]:
    """Requests whose forget set cannot be used, with the reason: outside the data roots once
    symlinks are resolved, missing, unreadable, a class the version does not have, or (with the
    generalisation check on) one photo, which the check cannot hold any image of back: copies of one
    photo (re-encoded, resized, renamed) count once."""
    from worker.engine import EngineError

    rejected = {}
    for request_id, (cls, uri, _seed) in ctx.batch.requests.items():
        try:
            read = facts(ctx, package, cls, [uri])  # raises when the set cannot be read
            if ctx.settings.gate_holdout_folds and read.distinct < 2:
                rejected[request_id] = ("forget set too small for the generalisation check (1 different photo): "
                                        "send at least 2 different photos of the class (3 or more give the check "
                                        "a fair chance)")
        except ServiceError as exc:
            rejected[request_id] = exc.detail
        except EngineError as exc:
            rejected[request_id] = str(exc)
    return rejected


def forget_accuracy(ctx: RunContext, package: Path, specs: dict[str, str]) -> dict[str, float]:
    """Each class's accuracy on its forget set under the given package (OutsideDataRoots, UnreadableSource
    or the engine's error when a set cannot be read)."""
    from worker.engine import ForgetSpec, forget_set_accuracies

    return forget_set_accuracies(str(package), tuple(ForgetSpec(c, str(ctx.sources.path(u))) for c, u in specs.items()),
                                 reader=ctx.reader)


def facts(ctx: RunContext, package: Path, cls: str, uris: list[str]):
    """The engine's facts of a class's sets (together) under a package, read once per run: the
    source check, the "already forgotten?" check and the run's setting share one read."""
    from worker.engine import ForgetSpec
    from worker.engine.unlearn import forget_set_facts

    key = (str(package), cls, tuple(uris))
    if key not in ctx.facts:
        first, *more = (str(ctx.sources.path(u)) for u in uris)
        ctx.facts[key] = forget_set_facts(str(package), (ForgetSpec(cls, first, tuple(more)),), reader=ctx.reader,
                                          with_row_cosine=True)[cls]
    return ctx.facts[key]


def engine_settings(ctx: RunContext, package: Path, sets: dict[str, list[str]],
                    again: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The unlearning setting for these classes' sets under the package (UnlearnSettings.engine_settings):
    by the smallest class's different photos (copies counted once: few images or many) and the lowest
    head-row cosine (whether the model's rows are its classes' templates). ``again``: earlier classes
    trained again in the same run; their rows were reset, so they count for the rows, not the size."""
    from service.config import get_unlearn_settings

    found = [facts(ctx, package, cls, uris) for cls, uris in sets.items()]
    rows = found + [facts(ctx, package, cls, uris) for cls, uris in (again or {}).items()]
    return get_unlearn_settings().engine_settings(min(f.distinct for f in found), min(f.row_cosine for f in rows))


def own_forget_facts(ctx: RunContext, package: Path, requests: dict[str, tuple[str, str, int]]) -> dict[str, Any]:
    """Each request's own forget set under the package: its accuracy, images and digest."""
    return {r: facts(ctx, package, cls, [uri]) for r, (cls, uri, _seed) in requests.items()}


def class_sets(requests: dict[str, tuple[str, str, int]]) -> dict[str, list[str]]:
    """Each class's forget sets, one per request (a set two requests share counted once), in request order."""
    sets: dict[str, list[str]] = {}
    for cls, uri, _seed in requests.values():
        if uri not in sets.setdefault(cls, []):
            sets[cls].append(uri)
    return sets
