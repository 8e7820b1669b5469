"""What a worker does with a model's queue: lease it, run the engine, gate, publish, record.

The database, not the broker, decides what runs. A worker leases the *model* (one run per model
at a time, by a conditional UPDATE), takes every queued request of that model as one coalesced
batch, renews the lease from a heartbeat thread while the engine runs, and publishes version n+1
and moves ``current`` in one transaction. If it dies, its leases expire and ``sweep`` puts the
requests back in the queue: a request can be delayed, never lost.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update

from service.config import Settings, get_unlearn_settings
from service.db import session_scope, utcnow
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.deletion_requests.transitions import record, transition
from service.errors import ServiceError
from service.registry.models import ModelVersion, RegisteredModel
from service.registry.service import dispose_superseded, publish_version
from worker.run_folders import make_run_folder, remove_stale_run_folders_safely
from service.registry.storage import artifact_store
from service.sources import LocalSources

log = logging.getLogger("lethe.worker")


@dataclass
class Batch:
    """The requests one run serves, with what the run needs to know (ids and values, no ORM rows)."""

    model_id: str
    model_name: str
    version_id: str
    version: int
    eval_set_uri: str | None
    anchor_set_uri: str | None
    forgotten_earlier: list[str]  # classes the starting version has forgotten already
    requests: dict[str, tuple[str, str, int]]  # request id -> (class, forget uri, seed)

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(c for c, _, _ in self.requests.values()))


# --- leasing -----------------------------------------------------------------------------------

def claim_batch(settings: Settings, model_id: str, worker_id: str) -> Batch | None:
    """Lease the model and mark all its queued requests running; None when another worker holds it."""
    with session_scope(settings.database) as session:
        now = utcnow()
        expires = now + timedelta(seconds=settings.lease_seconds)
        leased = session.execute(
            update(RegisteredModel)
            .where(RegisteredModel.id == model_id,
                   or_(RegisteredModel.run_lease_owner.is_(None), RegisteredModel.run_lease_expires_at < now,
                       RegisteredModel.run_lease_owner == worker_id))
            .values(run_lease_owner=worker_id, run_lease_expires_at=expires)
        ).rowcount
        if not leased:
            return None
        model = session.get(RegisteredModel, model_id)
        session.refresh(model)
        # Locked rows are skipped, not waited for: a request a caller is canceling right now is
        # either canceled before this claim sees it or claimed before the cancel reads it (then the
        # cancel finds it running and asks the run to stop). Never both.
        queued = session.scalars(select(DeletionRequest).where(
            DeletionRequest.model_id == model_id, DeletionRequest.status == S.QUEUED)
            .order_by(DeletionRequest.created_at).with_for_update(skip_locked=True)).all()
        if not queued:
            model.run_lease_owner = model.run_lease_expires_at = None
            return None
        version = session.get(ModelVersion, model.current_version_id)
        for request in queued:
            transition(session=session, request=request, to=S.RUNNING, actor=f"worker:{worker_id}",
                       detail={"version": version.version, "batch": len(queued)})
            request.attempts += 1
            request.lease_owner, request.lease_expires_at = worker_id, expires
        return Batch(model_id=model_id, model_name=model.name, version_id=version.id, version=version.version,
                     eval_set_uri=model.eval_set_uri, anchor_set_uri=model.anchor_set_uri, forgotten_earlier=list(version.classes_forgotten),
                     requests={r.id: (r.forget_class, r.forget_uri, r.seed) for r in queued})


def renew_leases(settings: Settings, batch: Batch, worker_id: str) -> bool:
    """Heartbeat: extend the model's and the requests' leases; False when the lease was lost."""
    with session_scope(settings.database) as session:
        expires = utcnow() + timedelta(seconds=settings.lease_seconds)
        held = session.execute(update(RegisteredModel).where(
            RegisteredModel.id == batch.model_id, RegisteredModel.run_lease_owner == worker_id)
            .values(run_lease_expires_at=expires)).rowcount
        session.execute(update(DeletionRequest).where(
            DeletionRequest.id.in_(list(batch.requests)), DeletionRequest.lease_owner == worker_id)
            .values(lease_expires_at=expires))
        return bool(held)


def release_model(session, model_id: str, worker_id: str) -> None:
    session.execute(update(RegisteredModel).where(
        RegisteredModel.id == model_id, RegisteredModel.run_lease_owner == worker_id)
        .values(run_lease_owner=None, run_lease_expires_at=None))


def held_rows(session, batch: Batch, worker_id: str) -> dict[str, DeletionRequest]:
    """The batch's requests this worker still runs, locked until the transaction ends. A request
    the sweep re-queued (lease expired) or that another worker now runs is not among them: this
    worker leaves it alone."""
    rows = session.scalars(select(DeletionRequest).where(
        DeletionRequest.id.in_(list(batch.requests)), DeletionRequest.status == S.RUNNING,
        DeletionRequest.lease_owner == worker_id).with_for_update()).all()
    lost = set(batch.requests) - {r.id for r in rows}
    if lost:
        log.warning("model %s: %d request(s) of the batch are no longer this worker's; left as they are",
                    batch.model_name, len(lost), extra={"model": batch.model_name, "deletion_requests": sorted(lost)})
    return {r.id: r for r in rows}


class Heartbeat(threading.Thread):
    """While the engine runs: renews the leases every third of their length, and answers the
    engine's per-step "should I stop?" from the database at most once a second."""

    def __init__(self, settings: Settings, batch: Batch, worker_id: str) -> None:
        super().__init__(daemon=True, name="lethe-heartbeat")
        self.settings, self.batch, self.worker_id = settings, batch, worker_id
        self.stopped = threading.Event()
        self.lost = False
        self.last_cancel_check, self.canceled = 0.0, False
        self.training_recorded = False

    def run(self) -> None:
        while not self.stopped.wait(self.settings.lease_seconds / 3):
            try:
                self.lost = not renew_leases(self.settings, self.batch, self.worker_id)
            except Exception:  # a database hiccup: try again next beat; the lease has slack
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self.canceled and now - self.last_cancel_check >= 1.0:
            self.last_cancel_check = now
            self.canceled = cancel_requested(self.settings, self.batch)
        return self.lost or self.canceled

    def on_progress(self, progress) -> None:
        if not self.training_recorded:  # one audit event, not one per step (nor per fold of the holdout check)
            self.training_recorded = True
            with session_scope(self.settings.database) as session:
                for row in session.scalars(select(DeletionRequest).where(DeletionRequest.id.in_(list(self.batch.requests)))):
                    record(session=session, request=row, event="training_started", actor=f"worker:{self.worker_id}",
                           detail={"loss": progress.loss, "forget_acc": progress.forget_acc})


def cancel_requested(settings: Settings, batch: Batch) -> bool:
    with session_scope(settings.database) as session:
        return bool(session.scalar(select(DeletionRequest.id).where(
            DeletionRequest.id.in_(list(batch.requests)), DeletionRequest.cancel_requested.is_(True)).limit(1)))


# --- one run -----------------------------------------------------------------------------------

def process_model(settings: Settings, model_id: str, worker_id: str) -> int:
    """Serve the model's queue until it is empty; returns the number of batches run."""
    runs = 0
    while (batch := claim_batch(settings, model_id, worker_id)) is not None:
        run_batch(settings, batch, worker_id)
        runs += 1
    return runs


def run_batch(settings: Settings, batch: Batch, worker_id: str) -> None:
    from worker.engine import UnlearningCancelled

    remove_stale_run_folders_safely()
    workdir, workdir_lock = make_run_folder()
    heartbeat = Heartbeat(settings, batch, worker_id)
    heartbeat.start()
    fields, started, outcome = run_fields(batch, worker_id), time.monotonic(), "finished"
    log.info("run started: model %s version %d, %d request(s)", batch.model_name, batch.version,
             len(batch.requests), extra=fields)
    try:
        current = materialise_version(settings, batch, workdir / "current")
        sources = LocalSources(settings.allowed_data_roots, workdir / "sources")  # s3:// sets are downloaded here
        rejected = check_sources(settings, batch, current, sources)
        runnable = {rid: spec for rid, spec in batch.requests.items() if rid not in rejected}
        result = unlearn_batch(settings, batch, runnable, current, workdir, heartbeat, sources) if runnable else None
        finish(settings, batch, worker_id, rejected, runnable, result)
    except UnlearningCancelled:
        outcome = "canceled"
        settle_cancellation(settings, batch, worker_id)
    except Exception as exc:  # fails the run with its message; the lease is released
        outcome = "failed"
        log.exception("run failed for model %s", batch.model_name, extra=fields)
        settle_all(settings, batch, worker_id, S.FAILED, error=f"{type(exc).__name__}: {exc}")
    finally:
        heartbeat.stop()
        # Adapters never leave memory; the folder holds the temporary files (the version's weights,
        # downloaded forget sets, the candidate).
        shutil.rmtree(workdir, ignore_errors=True)
        os.close(workdir_lock)
        seconds = round(time.monotonic() - started, 3)
        log.info("run %s: model %s in %.1f s", outcome, batch.model_name, seconds,
                 extra={**fields, "outcome": outcome, "seconds": seconds})


def run_fields(batch: Batch, worker_id: str) -> dict[str, Any]:
    """What a run's log lines carry (``extra=``: fields of their own in JSON logs)."""
    return {"model": batch.model_name, "version": batch.version, "deletion_requests": list(batch.requests),
            "classes": batch.classes, "worker": worker_id}


def check_sources(settings: Settings, batch: Batch, package: Path, sources: LocalSources) -> dict[str, str]:
    """Requests whose forget set cannot be used, with the reason: outside the data roots once
    symlinks are resolved, missing, unreadable, a class the version does not have, or (with the
    generalisation check on) one image, which the check cannot hold any image of back."""
    from worker.engine import EngineError
    from worker.engine.images import count_images

    rejected = {}
    for request_id, (cls, uri, _seed) in batch.requests.items():
        try:
            forget_accuracy(package, {cls: uri}, sources)
            if settings.gate_holdout_folds and count_images(str(sources.path(uri))) < 2:
                rejected[request_id] = ("forget set too small for the generalisation check (1 image): "
                                        "send at least 2 images of the class")
        except ServiceError as exc:
            rejected[request_id] = exc.detail
        except EngineError as exc:
            rejected[request_id] = str(exc)
    return rejected


@dataclass(frozen=True)
class BatchResult:
    report: dict[str, Any] | None  # the engine's report; None when no training was needed
    already_forgotten: dict[str, float]  # class -> forget-set accuracy on the current version
    package: Path | None  # the candidate version, written under the run's folder
    gate_errors: list[str]
    rechecks: dict[str, Any]  # earlier classes re-checked on the candidate
    own_before: dict[str, float] = field(default_factory=dict)  # request id -> its own set's accuracy, current version
    own_after: dict[str, float] = field(default_factory=dict)  # ... and on the candidate (the requests trained for)


def class_sets(requests: dict[str, tuple[str, str, int]]) -> dict[str, list[str]]:
    """Each class's forget sets, one per request (a set two requests share counted once), in request order."""
    sets: dict[str, list[str]] = {}
    for cls, uri, _seed in requests.values():
        if uri not in sets.setdefault(cls, []):
            sets[cls].append(uri)
    return sets


def unlearn_batch(settings: Settings, batch: Batch, runnable: dict[str, tuple[str, str, int]], current: Path,
                  workdir: Path, heartbeat: Heartbeat, sources: LocalSources) -> BatchResult:
    """Forget the batch's classes that the current version still knows; re-check earlier ones.

    Two requests for one class are trained on together (the union of their sets), and each is
    verified on its own set: a request never completes on figures measured on someone else's images."""
    target = get_unlearn_settings().target_forget_acc
    before = own_forget_accuracy(current, runnable, sources)
    sets = class_sets(runnable)
    # A class is already forgotten only when every request's own set says so.
    already = {c: max(before[r] for r, (rc, _, _) in runnable.items() if rc == c) for c in sets}
    already = {c: acc for c, acc in already.items() if acc <= target}
    to_forget = {c: uris for c, uris in sets.items() if c not in already}
    if not to_forget:
        return BatchResult(None, already, None, [], {}, before, {})
    from worker.engine.images import count_images

    seed = max(seed for _, _, seed in runnable.values())
    # The setting (few images or many) follows this batch's own forget sets, not earlier classes forgotten again.
    smallest = min(sum(count_images(str(sources.path(u))) for u in uris) for uris in to_forget.values())
    report, candidate = run_engine(settings, batch, current, to_forget, seed, smallest, workdir / "candidate",
                                   heartbeat, sources)
    rechecks = recheck_earlier(settings, batch, candidate, exclude=set(to_forget), target=target, sources=sources)
    regressed = {c: [r["uri"]] for c, r in rechecks.items() if r["status"] == "not_forgotten"}
    if regressed:  # forget those again, in the same run, from the same starting version
        report, candidate = run_engine(settings, batch, current, {**to_forget, **regressed}, seed, smallest,
                                       workdir / "candidate-2", heartbeat, sources)
        for cls, check in recheck_earlier(settings, batch, candidate, exclude=set(to_forget), target=target,
                                          sources=sources).items():
            rechecks[cls] = {**check, "forgotten_again": cls in regressed}
    report["rechecks"] = {c: {k: v for k, v in r.items() if k != "uri"} for c, r in rechecks.items()}
    trained = {r: spec for r, spec in runnable.items() if spec[0] in to_forget}
    after = own_forget_accuracy(candidate, trained, sources)
    errors = gate_errors(settings, batch, report, target, requested=set(to_forget))
    errors += [f"deletion request {r}: its own forget set is still {acc:.1f}% recognised (target {target}%)"
               for r, acc in after.items() if acc > target]
    return BatchResult(report, already, candidate, errors, rechecks, before, after)


def own_forget_accuracy(package: Path, requests: dict[str, tuple[str, str, int]], sources: LocalSources
                        ) -> dict[str, float]:
    """Each request's accuracy on its own forget set under the package."""
    return {r: forget_accuracy(package, {cls: uri}, sources)[cls] for r, (cls, uri, _seed) in requests.items()}


def run_engine(settings: Settings, batch: Batch, current: Path, classes: dict[str, list[str]], seed: int,
               smallest: int, out: Path, heartbeat: Heartbeat, sources: LocalSources) -> tuple[dict[str, Any], Path]:
    from worker.engine import ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn

    config = UnlearnConfig(seed=seed, select_on_eval=batch.eval_set_uri is not None,
                           holdout_folds=settings.gate_holdout_folds, holdout_images=settings.gate_holdout_images,
                           **get_unlearn_settings().engine_settings(smallest))
    paths = {c: [str(sources.path(u)) for u in uris] for c, uris in classes.items()}
    inputs = UnlearnInputs(model=str(current),
                           forget=tuple(ForgetSpec(c, first, tuple(more)) for c, (first, *more) in paths.items()),
                           eval_source=str(sources.path(batch.eval_set_uri)) if batch.eval_set_uri else None,
                           anchor_source=str(sources.path(batch.anchor_set_uri)) if batch.anchor_set_uri else None)
    result = unlearn(inputs, config, on_progress=heartbeat.on_progress, should_cancel=heartbeat.should_cancel)
    result.save(str(out))
    report = result.report.to_dict()
    report.pop("history", None)
    return report, out


def recheck_earlier(settings: Settings, batch: Batch, candidate: Path, exclude: set[str],
                    target: float, sources: LocalSources) -> dict[str, dict[str, Any]]:
    """Every class forgotten by an earlier completed request, measured on the candidate while its
    forget set is still readable; otherwise recorded as unverifiable."""
    from worker.engine import EngineError

    with session_scope(settings.database) as session:
        earlier = session.execute(select(DeletionRequest.forget_class, DeletionRequest.forget_uri).where(
            DeletionRequest.model_id == batch.model_id, DeletionRequest.status == S.COMPLETED)
            .order_by(DeletionRequest.finished_at.desc())).all()
    checks: dict[str, dict[str, Any]] = {}
    for cls, uri in earlier:
        if cls in exclude or checks.get(cls, {}).get("status") in ("forgotten", "not_forgotten"):
            continue
        try:
            acc = forget_accuracy(candidate, {cls: uri}, sources)[cls]
        except (ServiceError, EngineError):
            checks.setdefault(cls, {"status": "unverifiable", "uri": uri})
            continue
        checks[cls] = {"status": "forgotten" if acc <= target else "not_forgotten", "forget_acc": acc, "uri": uri}
    return checks


def materialise_version(settings: Settings, batch: Batch, folder: Path) -> Path:
    """The current version as a package folder the engine can read: the weights linked from a folder store,
    downloaded (and checked against their sha256) from S3."""
    import json

    with session_scope(settings.database) as session:
        version = session.get(ModelVersion, batch.version_id)
        card, sha256 = version.card, version.sha256
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(card))
    artifact_store(settings).fetch(sha256, folder / "model.safetensors")
    return folder


def forget_accuracy(package: Path, specs: dict[str, str], sources: LocalSources) -> dict[str, float]:
    """Each class's accuracy on its forget set under the given package (OutsideDataRoots, UnreadableSource
    or the engine's error when a set cannot be read)."""
    from worker.engine import ForgetSpec, forget_set_accuracies

    return forget_set_accuracies(str(package), tuple(ForgetSpec(c, str(sources.path(u))) for c, u in specs.items()))


def gate_errors(settings: Settings, batch: Batch, report: dict[str, Any], target: float,
                requested: set[str]) -> list[str]:
    """Why the candidate may not be published (empty: it may). The generalisation check judges the
    batch's own classes (``requested``): an earlier class forgotten again is judged by its re-check."""
    errors = []
    if not report["target_met"]:
        worst = max(report["forget_acc_after"].values())
        errors.append(f"forget-set accuracy {worst:.1f}% did not reach the {target}% target")
    not_forgotten = [c for c, r in report.get("rechecks", {}).items() if r["status"] == "not_forgotten"]
    if not_forgotten:
        errors.append(f"earlier classes no longer forgotten: {', '.join(not_forgotten)}")
    errors += holdout_errors(settings, report.get("holdout"), requested)
    evaluation = report.get("evaluation")
    if evaluation:
        if evaluation["acc_f_after"] > settings.gate_max_eval_forget_acc:
            errors.append(f"held-out Acc_f {evaluation['acc_f_after']:.1f}% exceeds "
                          f"{settings.gate_max_eval_forget_acc}%")
        drop = cumulative_retain_drop(settings, batch, evaluation, forgotten=set(report["classes"]))
        report["cumulative_retain_drop"] = drop
        if drop > settings.gate_max_retain_drop:
            errors.append(f"cumulative Acc_r drop {drop:.1f} points exceeds {settings.gate_max_retain_drop}")
    return errors


def holdout_errors(settings: Settings, holdout: dict[str, Any] | None, classes: set[str] | None = None) -> list[str]:
    """The generalisation check: held-back forget images, never trained on, must be forgotten too.
    A set too small to hold any image back cannot show that, so it fails too: a run that forgot
    one photo has not shown it forgot the person."""
    if not holdout:
        return []
    errors = []
    for cls, acc in holdout["forget_acc"].items():
        if classes is not None and cls not in classes:
            continue
        if acc is None:
            errors.append(f"forget set too small for the generalisation check ({holdout['held_back'][cls]} image(s) "
                          "held back; send at least 2 images)")
        elif acc > settings.gate_max_holdout_forget_acc:
            errors.append(f"forgetting did not generalise: {acc:.1f}% of {holdout['held_back'][cls]} held-back forget "
                          f"images still recognised (gate {settings.gate_max_holdout_forget_acc}%)")
    return errors


def cumulative_retain_drop(settings: Settings, batch: Batch, evaluation: dict[str, Any], forgotten: set[str]) -> float:
    """Mean per-class accuracy of version 1 minus the candidate's, over the classes still retained."""
    with session_scope(settings.database) as session:
        first = session.scalar(select(ModelVersion).where(ModelVersion.model_id == batch.model_id,
                                                          ModelVersion.version == 1))
        base = (first.metrics or {}).get("per_class_accuracy")
        if base is None:  # the first run measures version 1 as its "before"
            base = evaluation["per_class_before"]
            first.metrics = {**(first.metrics or {}), "per_class_accuracy": base}
    gone = forgotten | set(batch.forgotten_earlier)
    retained = [c for c, acc in evaluation["per_class_after"].items()
                if c not in gone and acc is not None and base.get(c) is not None]
    if not retained:
        return 0.0
    before = sum(base[c] for c in retained) / len(retained)
    after = sum(evaluation["per_class_after"][c] for c in retained) / len(retained)
    return round(before - after, 3)


# --- recording the outcome ------------------------------------------------------------------------

def finish(settings: Settings, batch: Batch, worker_id: str, rejected: dict[str, str],
           runnable: dict[str, tuple[str, str, int]], result: BatchResult | None) -> None:
    actor = f"worker:{worker_id}"
    sha256 = size = card = None
    if result is not None and result.package is not None and not result.gate_errors:
        import json

        store = artifact_store(settings)
        incoming = store.new_incoming()
        shutil.move(result.package / "model.safetensors", incoming)
        sha256, size = store.put(incoming)
        card = json.loads((result.package / "model.json").read_text())
    with session_scope(settings.database) as session:
        fenced = not still_leased(session, batch, worker_id)
        if not fenced:
            rows = held_rows(session, batch, worker_id)
            for request_id, reason in rejected.items():
                if request_id in rows:
                    transition(session=session, request=rows[request_id], to=S.REJECTED, actor=actor,
                               detail={"error": reason})
                    rows[request_id].error = reason
            if result is not None:
                settle_result(session, batch, rows, runnable, result, sha256, size, card, actor)
            release_model(session, batch.model_id, worker_id)
    if fenced:
        log.warning("model %s: the model's lease was lost during the run (or a version was published meanwhile); "
                    "the run's outcome is discarded and its requests left to whoever holds them",
                    batch.model_name, extra=run_fields(batch, worker_id))
        if sha256 is not None:
            discard_unreferenced(settings, sha256)


def still_leased(session, batch: Batch, worker_id: str) -> bool:
    """Whether this worker may still settle the batch: it holds the model's lease and the version it
    started from is still current. The model row stays locked until the transaction ends."""
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.id == batch.model_id).with_for_update())
    return model.run_lease_owner == worker_id and model.current_version_id == batch.version_id


def discard_unreferenced(settings: Settings, sha256: str) -> None:
    """Delete a candidate's stored weights that no version names (a fenced-out run's)."""
    with session_scope(settings.database) as session:
        named = session.scalar(select(ModelVersion.id).where(ModelVersion.sha256 == sha256).limit(1))
    if named is None:
        artifact_store(settings).delete(sha256)


def settle_result(session, batch: Batch, rows: dict[str, DeletionRequest], runnable, result: BatchResult,
                  sha256: str | None, size: int | None, card: dict[str, Any] | None, actor: str) -> None:
    current = session.get(ModelVersion, batch.version_id)
    if result.report is not None and result.gate_errors:
        log.warning("model %s: the candidate missed the publish gate: %s", batch.model_name,
                    "; ".join(result.gate_errors), extra={"model": batch.model_name, "gate": result.gate_errors})
        for request_id in runnable.keys() & rows.keys():
            row = rows[request_id]
            transition(session=session, request=row, to=S.FAILED, actor=actor, detail={"gate": result.gate_errors})
            row.error, row.metrics = "; ".join(result.gate_errors), request_metrics(result, request_id)
        return
    fulfilled = current
    if result.report is not None:
        forgotten = list(dict.fromkeys([*current.classes_forgotten, *result.report["classes"]]))
        fulfilled = publish_version(session=session, model_id=batch.model_id, sha256=sha256, size=size,
                                    card=card, classes_forgotten=forgotten, metrics=summarise(result.report))
        log.info("model %s: version %d published, forgetting %s", batch.model_name, fulfilled.version,
                 ", ".join(result.report["classes"]),
                 extra={"model": batch.model_name, "published_version": fulfilled.version, "sha256": sha256,
                        "deletion_requests": list(runnable), "training_seconds": result.report.get("seconds")})
    for request_id, (cls, _uri, _seed) in runnable.items():
        row = rows.get(request_id)
        if row is None:  # no longer this worker's: whoever runs it now settles it
            continue
        if cls in result.already_forgotten:
            record(session=session, request=row, event="already_forgotten", actor=actor,
                   detail={"version": current.version, "forget_acc": result.already_forgotten[cls]})
            row.metrics = {"already_forgotten": True, "forget_acc": result.already_forgotten[cls],
                           "version": current.version}
        else:
            row.metrics = request_metrics(result, request_id)
        row.fulfilled_version_id = fulfilled.id
        transition(session=session, request=row, to=S.COMPLETED, actor=actor, detail={"version": fulfilled.version})


def request_metrics(result: BatchResult, request_id: str) -> dict[str, Any]:
    """The run's evidence, with this request's own forget set measured apart from its class's union."""
    metrics = summarise(result.report)
    if request_id in result.own_after:
        metrics["own_forget_set"] = {"forget_acc_before": result.own_before[request_id],
                                     "forget_acc_after": result.own_after[request_id]}
    return metrics


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("method", "config", "classes", "forget_set_size", "steps", "seconds", "forget_acc_before",
            "forget_acc_after", "target_met", "stop_rule_met", "evaluation", "cumulative_retain_drop", "parent_sha256",
            "trainable_parameters", "peak_memory_bytes", "device", "precision", "rechecks", "holdout",
            "anchor_images")
    return {k: report[k] for k in keep if k in report}


def settle_all(settings: Settings, batch: Batch, worker_id: str, status: S, error: str) -> None:
    with session_scope(settings.database) as session:
        for row in held_rows(session, batch, worker_id).values():
            transition(session=session, request=row, to=status, actor=f"worker:{worker_id}", detail={"error": error})
            row.error = error
        release_model(session, batch.model_id, worker_id)


def settle_cancellation(settings: Settings, batch: Batch, worker_id: str) -> None:
    """Canceled requests end; the others of the batch go back to the queue for the next run."""
    with session_scope(settings.database) as session:
        for row in held_rows(session, batch, worker_id).values():
            to = S.CANCELED if row.cancel_requested else S.QUEUED
            transition(session=session, request=row, to=to, actor=f"worker:{worker_id}",
                       detail={"reason": "canceled during the run" if to == S.CANCELED else "batch canceled"})
        release_model(session, batch.model_id, worker_id)


# --- the periodic sweep ---------------------------------------------------------------------------

def sweep(settings: Settings, enqueue) -> dict[str, int]:
    """Re-queue requests whose worker died, wake idle queues, flag deadlines, dispose of old weights."""
    now = utcnow()
    counts = {"requeued": 0, "woken": 0, "at_risk": 0, "overdue": 0, "disposed": 0}
    wake: set[str] = set()
    with session_scope(settings.database) as session:
        for row in session.scalars(select(DeletionRequest).where(DeletionRequest.status == S.RUNNING,
                                                                 DeletionRequest.lease_expires_at < now)
                                   .with_for_update(skip_locked=True)):  # a worker settling it now goes first
            transition(session=session, request=row, to=S.QUEUED, actor="sweep",
                       detail={"reason": f"lease of {row.lease_owner} expired"})
            counts["requeued"] += 1
            wake.add(row.id)
        session.execute(update(RegisteredModel).where(RegisteredModel.run_lease_expires_at < now)
                        .values(run_lease_owner=None, run_lease_expires_at=None))
        # One wake-up per model with waiting work, in case its message was lost.
        oldest_per_model: dict[str, str] = {}
        for model_id, request_id in session.execute(select(DeletionRequest.model_id, DeletionRequest.id).where(
                DeletionRequest.status == S.QUEUED).order_by(DeletionRequest.created_at)):
            oldest_per_model.setdefault(model_id, request_id)
        wake |= set(oldest_per_model.values())
        counts["woken"] = len(wake)
        flag_deadlines(session, now, counts)
        counts["disposed"] = len(dispose_superseded(session=session, store=artifact_store(settings),
                                                    retention_hours=settings.retention_hours))
    for request_id in wake:
        enqueue(request_id)
    return counts


def flag_deadlines(session, now, counts: dict[str, int]) -> None:
    """Once per request: an audit event when it becomes at risk and when it becomes overdue."""
    active = DeletionRequest.status.in_([S.RECEIVED, S.QUEUED, S.RUNNING])
    for row in session.scalars(select(DeletionRequest).where(active, DeletionRequest.at_risk_from <= now)):
        flagged = {e.event for e in row.events}
        if row.due_at < now and "overdue" not in flagged:
            record(session=session, request=row, event="overdue", actor="sweep", detail={"due_at": row.due_at.isoformat()})
            log.warning("deletion request %s (%s) is overdue since %s", row.id, row.external_id, row.due_at)
            counts["overdue"] += 1
        elif row.due_at >= now and "at_risk" not in flagged:
            record(session=session, request=row, event="at_risk", actor="sweep", detail={"due_at": row.due_at.isoformat()})
            log.warning("deletion request %s (%s) is at risk: due %s", row.id, row.external_id, row.due_at)
            counts["at_risk"] += 1
