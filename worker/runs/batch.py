"""The batch a run serves and the context every step of the run gets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.config import Settings
from service.deletion_requests.personal_data import scrub
from service.sources import LocalSources, read_limits

if TYPE_CHECKING:
    from worker.runs.leases import Heartbeat


@dataclass
class Batch:
    """The requests one run serves, with what the run needs to know (ids and values, no ORM rows)."""

    model_id: str
    model_name: str
    lease_token: int  # the model's fencing token this batch was claimed with
    version_id: str
    version: int
    eval_set_uri: str | None
    anchor_set_uri: str | None
    forgotten_earlier: list[str]  # classes the starting version has forgotten already
    requests: dict[str, tuple[str, str, int]]  # request id -> (class, forget uri, seed)

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(c for c, _, _ in self.requests.values()))

    def scrubbed(self, text: str, *folders) -> str:
        """``text`` (an error, a traceback) without the batch's class names and forget-set references,
        nor paths under ``folders`` (the run's folder, where sets are downloaded): for logs and events."""
        return scrub(text, classes=self.classes, uris=[u for _, u, _ in self.requests.values()], folders=folders)


@dataclass(frozen=True)
class RunContext:
    """One run: who runs which batch, its folder and forget-set sources, the heartbeat the engine reports to."""

    settings: Settings
    batch: Batch
    worker_id: str
    workdir: Path
    sources: LocalSources  # s3:// sets are downloaded under the run's folder
    heartbeat: Heartbeat
    # Where the run's seconds go (worker.engine.timings.Timings; the engine times its own phases in it)
    timings: Any
    # Forget-set facts read once per run: (package, class, sets) -> ForgetSetFacts (see prepare.facts)
    facts: dict[tuple, Any] = field(default_factory=dict)

    @property
    def reader(self):
        """How the run reads images: the settings' limits, stopping when the heartbeat says so (a
        cancel, a lost lease, LETHE_RUN_TIMEOUT), between images too."""
        from worker.engine.images import ImageReader

        return ImageReader(read_limits(self.settings, also_within=(self.sources.folder,)),
                           should_stop=self.heartbeat.should_cancel)


def run_fields(batch: Batch, worker_id: str) -> dict[str, Any]:
    """What a run's log lines carry (``extra=``: fields of their own in JSON logs)."""
    # Request ids, never class names: a class is often a person (service/deletion_requests/personal_data.py).
    return {"model": batch.model_name, "version": batch.version, "deletion_requests": list(batch.requests),
            "worker": worker_id}
