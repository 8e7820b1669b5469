"""Training: the engine forgets the batch's classes still known; classes forgotten by earlier
requests are re-checked on the candidate (and forgotten again in the same run if needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from service.config import get_unlearn_settings
from service.db import session_scope
from service.deletion_requests.models import FULFILLED, DeletionRequest
from service.errors import ServiceError
from worker.runs.batch import RunContext
from worker.runs.gate import GateVerdict, gate_errors
from worker.runs.prepare import class_sets, engine_settings, forget_accuracy, own_forget_facts


@dataclass(frozen=True)
class BatchResult:
    report: dict[str, Any] | None  # the engine's report; None when no training was needed
    already_forgotten: dict[str, float]  # class -> forget-set accuracy on the current version
    package: Path | None  # the candidate version, written under the run's folder
    gate: GateVerdict
    rechecks: dict[str, Any]  # earlier classes re-checked on the candidate
    own_before: dict[str, float] = field(default_factory=dict)  # request id -> its own set's accuracy, current version
    own_after: dict[str, float] = field(default_factory=dict)  # ... and on the candidate (the requests trained for)
    own_sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> its set's images and sha256
    request_classes: dict[str, str] = field(default_factory=dict)  # request id -> its class
    # request id -> its own set on the trained network, before the head rows were reset: what the gate
    # judges (the reset alone puts every set at 0 %)
    own_trained: dict[str, float] = field(default_factory=dict)


def unlearn_batch(ctx: RunContext, runnable: dict[str, tuple[str, str, int]], current: Path) -> BatchResult:
    """Forget the batch's classes that the current version still knows; re-check earlier ones.

    Two requests for one class are trained on together (the union of their sets), and each is
    verified on its own set: a request never completes on figures measured on someone else's images."""
    target = get_unlearn_settings().target_forget_acc
    own = own_forget_facts(ctx, current, runnable)
    before = {r: f.accuracy for r, f in own.items()}
    own_sets = {r: {"images": f.images, "sha256": f.digest} for r, f in own.items()}
    sets = class_sets(runnable)
    # A class is already forgotten only when every request's own set says so.
    already = {c: max(before[r] for r, (rc, _, _) in runnable.items() if rc == c) for c in sets}
    already = {c: acc for c, acc in already.items() if acc <= target}
    to_forget = {c: uris for c, uris in sets.items() if c not in already}
    if not to_forget:
        return BatchResult(None, already, None, GateVerdict(), {}, before, {}, own_sets)
    seed = max(seed for _, _, seed in runnable.values())
    # The setting (few images or many; template head rows or not) follows this batch's own forget sets
    # (different photos, copies counted once), not earlier classes forgotten again, whose rows are reset.
    knobs = engine_settings(ctx, current, to_forget)
    report, candidate = run_engine(ctx, current, to_forget, seed, knobs, ctx.workdir / "candidate")
    with ctx.timings.phase("re-check earlier classes"):
        rechecks = recheck_earlier(ctx, candidate, exclude=set(to_forget), target=target)
    regressed = {c: [r["uri"]] for c, r in rechecks.items() if r["status"] == "not_forgotten"}
    if regressed:  # forget those again, in the same run, from the same starting version
        knobs = engine_settings(ctx, current, to_forget, again=regressed)  # reset rows: not templates
        report, candidate = run_engine(ctx, current, {**to_forget, **regressed}, seed, knobs,
                                       ctx.workdir / "candidate-2")
        with ctx.timings.phase("re-check earlier classes"):
            again = recheck_earlier(ctx, candidate, exclude=set(to_forget), target=target)
        for cls, check in again.items():
            rechecks[cls] = {**check, "forgotten_again": cls in regressed}
    report["rechecks"] = {c: {k: v for k, v in r.items() if k != "uri"} for c, r in rechecks.items()}
    trained = {r: spec for r, spec in runnable.items() if spec[0] in to_forget}
    with ctx.timings.phase("measure own sets on candidate"):
        after = {r: f.accuracy for r, f in own_forget_facts(ctx, candidate, trained).items()}
    own_trained = own_trained_accuracy(report, to_forget, trained)
    verdict = gate_errors(ctx.settings, ctx.batch, report, target, requested=set(to_forget))
    for request_id, acc in own_trained.items():
        if acc > target:  # this request's own photos, apart from the class's union
            verdict.per_request[request_id] = [f"its own forget set is still {acc:.1f}% recognised (target {target}%)"]
    return BatchResult(report, already, candidate, verdict, rechecks, before, after, own_sets,
                       {r: spec[0] for r, spec in runnable.items()}, own_trained)


def own_trained_accuracy(report: dict[str, Any], sets: dict[str, list[str]],
                         requests: dict[str, tuple[str, str, int]]) -> dict[str, float]:
    """Each request's own set on the trained network, before any head row was reset: the engine's
    figure for that set among its class's sources (``sets``, the order the engine was given them)."""
    by_source = report["forget_source_acc_trained"]
    return {r: by_source[cls][sets[cls].index(uri)] for r, (cls, uri, _seed) in requests.items()}


# The generalisation check's and the evidence's seed, the same for every run: a retry trains with a new
# seed, but a check that failed is a measurement, and drawing new ones until one passes would make it
# meaningless.
CHECK_SEED = 0


def run_engine(ctx: RunContext, current: Path, classes: dict[str, list[str]], seed: int, knobs: dict[str, Any],
               out: Path) -> tuple[dict[str, Any], Path]:
    from worker.engine import ForgetSpec, UnlearnInputs, unlearn

    settings, batch, sources = ctx.settings, ctx.batch, ctx.sources
    config = run_config(settings, seed, knobs, with_eval_set=batch.eval_set_uri is not None)
    paths = {c: [str(sources.path(u)) for u in uris] for c, uris in classes.items()}
    inputs = UnlearnInputs(model=str(current),
                           forget=tuple(ForgetSpec(c, first, tuple(more)) for c, (first, *more) in paths.items()),
                           eval_source=str(sources.path(batch.eval_set_uri)) if batch.eval_set_uri else None,
                           anchor_source=str(sources.path(batch.anchor_set_uri)) if batch.anchor_set_uri else None,
                           read_limits=ctx.reader.limits)
    result = unlearn(inputs, config, on_progress=ctx.heartbeat.on_progress, should_cancel=ctx.heartbeat.should_cancel,
                     timings=ctx.timings)
    with ctx.timings.phase("write candidate"):
        result.save(str(out))
    report = result.report.to_dict()
    report.pop("history", None)
    return report, out


def run_config(settings, seed: int, knobs: dict[str, Any], with_eval_set: bool):
    """The engine's config for a run: the method's setting for its forget sets (``knobs``,
    UnlearnSettings.engine_settings), the generalisation check, and with an evaluation set, selection
    on one half, the gate and the evidence on the other."""
    from worker.engine import UnlearnConfig

    return UnlearnConfig(seed=seed, select_on_eval=with_eval_set, eval_halves=with_eval_set, evidence=with_eval_set,
                         holdout_folds=settings.gate_holdout_folds, holdout_images=settings.gate_holdout_images,
                         check_seed=CHECK_SEED, **knobs)


def recheck_earlier(ctx: RunContext, candidate: Path, exclude: set[str], target: float) -> dict[str, dict[str, Any]]:
    """Every class forgotten by an earlier completed request, measured on the candidate while its
    forget set is still readable; otherwise recorded as unverifiable."""
    from worker.engine import EngineError

    with session_scope(ctx.settings.database) as session:
        earlier = session.execute(select(DeletionRequest.forget_class, DeletionRequest.forget_uri).where(
            DeletionRequest.model_id == ctx.batch.model_id, DeletionRequest.status.in_(FULFILLED),
            DeletionRequest.redacted_at.is_(None))  # a redacted request's forget set is no longer known
            .order_by(DeletionRequest.finished_at.desc())).all()
    checks: dict[str, dict[str, Any]] = {}
    for cls, uri in earlier:
        if cls in exclude or checks.get(cls, {}).get("status") in ("forgotten", "not_forgotten"):
            continue
        try:
            acc = forget_accuracy(ctx, candidate, {cls: uri})[cls]
        except (ServiceError, EngineError):
            checks.setdefault(cls, {"status": "unverifiable", "uri": uri})
            continue
        checks[cls] = {"status": "forgotten" if acc <= target else "not_forgotten", "forget_acc": acc, "uri": uri}
    return checks
