"""One run, start to end: claim, prepare, train, gate, settle (see the package's docstring)."""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback

from sqlalchemy import select

from service.config import Settings
from service.db import session_scope
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.errors import ServiceError
from service.sources import LocalSources
from worker.run_folders import make_run_folder, remove_stale_run_folders_safely
from worker.runs.batch import Batch, RunContext, run_fields
from worker.runs.leases import Heartbeat, claim_batch
from worker.runs.prepare import check_sources, materialise_version
from worker.runs.settle import finish, settle_cancellation, settle_failure
from worker.runs.train import unlearn_batch

log = logging.getLogger("lethe.worker")


def process_model(settings: Settings, model_id: str, worker_id: str) -> str | None:
    """Run one batch of the model's queue; returns a request still queued for it (the next wake-up),
    or None. One batch per wake-up, so that a worker alternates between models with waiting work
    instead of draining one model's queue while the others wait."""
    batch = claim_batch(settings, model_id, worker_id)
    if batch is None:  # nothing queued, or another worker runs the model: it wakes the next run itself
        return None
    run_batch(settings, batch, worker_id)
    with session_scope(settings.database) as session:
        return session.scalar(select(DeletionRequest.id).where(
            DeletionRequest.model_id == model_id, DeletionRequest.status == S.QUEUED)
            .order_by(DeletionRequest.created_at).limit(1))


def run_batch(settings: Settings, batch: Batch, worker_id: str) -> None:
    from worker.engine import EngineError, UnlearningCancelled
    import torch

    from worker.engine.timings import Timings

    remove_stale_run_folders_safely()
    workdir, workdir_lock = make_run_folder()
    heartbeat = Heartbeat(settings, batch, worker_id)
    heartbeat.start()
    timings = Timings()
    ctx = RunContext(settings, batch, worker_id, workdir, LocalSources(settings.allowed_data_roots, workdir / "sources"),
                     heartbeat, timings)
    fields, started, outcome = run_fields(batch, worker_id), time.monotonic(), "finished"
    log.info("run started: model %s version %d, %d request(s)", batch.model_name, batch.version,
             len(batch.requests), extra=fields)
    try:
        with timings.phase("fetch version"):
            current = materialise_version(ctx, workdir / "current")
        heartbeat.check()
        with timings.phase("check forget sets"):
            rejected = check_sources(ctx, current)
        heartbeat.check()
        runnable = {rid: spec for rid, spec in batch.requests.items() if rid not in rejected}
        result = unlearn_batch(ctx, runnable, current) if runnable else None
        heartbeat.check()
        finish(settings, batch, worker_id, rejected, runnable, result, timings)
    except UnlearningCancelled:
        if heartbeat.timed_out and not (heartbeat.canceled or heartbeat.lost):
            outcome = "timed out"
            settle_failure(settings, batch, worker_id, error=f"the run took longer than LETHE_RUN_TIMEOUT "
                                                             f"({settings.run_timeout:g} s)")
        else:
            outcome = "canceled"
            settle_cancellation(settings, batch, worker_id)
    except Exception as exc:  # fails the run with its message; the lease is released
        outcome = "failed"
        expected = isinstance(exc, (EngineError, ServiceError))  # bad input: its message is the whole story
        # The log gets the traceback of a bug, never a class name or forget-set path (they reach
        # messages through file names and engine errors): the request's own row keeps the whole error.
        told = "".join(traceback.format_exception_only(exc) if expected else traceback.format_exception(exc))
        log.error("run failed for model %s: %s", batch.model_name, batch.scrubbed(told.rstrip(), workdir), extra=fields)
        settle_failure(settings, batch, worker_id, error=str(exc) if expected else f"{type(exc).__name__}: {exc}")
    finally:
        heartbeat.stop()
        # Adapters never leave memory; the folder holds the temporary files (the version's weights,
        # downloaded forget sets, the candidate).
        shutil.rmtree(workdir, ignore_errors=True)
        os.close(workdir_lock)
        seconds = round(time.monotonic() - started, 3)
        # Each phase's seconds and count (benchmarks/request_latency.py reads them from this line).
        log.info("run %s: model %s in %.1f s", outcome, batch.model_name, seconds,
                 extra={**fields, "outcome": outcome, "seconds": seconds, "timings": timings.to_dict(),
                        "torch_threads": torch.get_num_threads()})
