"""Several workers on several machines: two ``lethe worker`` processes with nothing local in common
(each its own LETHE_HOME and temporary folder), sharing only Postgres, Redis and the S3 store.

Both consume the one queue; each model's versions stay strictly sequential whichever worker runs
them, and a worker killed mid-run loses nothing: a surviving one takes the run over once the sweep
re-queues it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.deletion_requests.models import AuditEvent
from service.registry.models import ModelVersion, RegisteredModel
from tests.service_fixtures import LOGIT_ONLY, register_digits, request_body, wait_for, with_s3

FINISHED = {"completed", "propagated", "failed", "rejected", "canceled"}
MODELS = ("digits-a", "digits-b")


@pytest.fixture
def backend(backend, s3):
    return with_s3(backend, s3)


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def training_started(backend, request_id: str) -> bool:
    with session_scope(backend.settings.database) as session:
        return bool(session.scalar(select(AuditEvent.id).where(AuditEvent.request_id == request_id,
                                                               AuditEvent.event == "training_started")))


def chains(backend) -> dict[str, list[tuple[int, str, str | None]]]:
    """Per model: (version, sha256, parent sha256) in version order."""
    with session_scope(backend.settings.database) as session:
        rows = session.execute(select(RegisteredModel.name, ModelVersion).join(
            ModelVersion, ModelVersion.model_id == RegisteredModel.id).order_by(ModelVersion.version)).all()
        return {name: [(v.version, v.sha256, (v.metrics or {}).get("parent_sha256")) for n, v in rows if n == name]
                for name in MODELS}


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # machines share a database server, not a file
def test_two_workers_share_one_queue_keep_versions_sequential_and_a_killed_one_loses_nothing(
        backend, client, admin, digits, digits_model, s3, start_worker, tmp_path):
    for name in MODELS:
        assert register_digits(client, admin, digits_model, name=name).status_code == 201
    forget = {cls: s3.upload_folder(digits.train_class(cls), f"forget-sets/class-{cls}/{cls}") for cls in "12"}
    homes = {}
    for machine in ("a", "b"):
        homes[machine] = tmp_path / f"machine-{machine}"
        (homes[machine] / "tmp").mkdir(parents=True)
    # Only machine a runs the sweep, so it is the one that re-queues the run of the worker killed on b.
    workers = {m: start_worker(beat=m == "a", LETHE_HOME=str(homes[m]), TMPDIR=str(homes[m] / "tmp"), **LOGIT_ONLY)
               for m in ("a", "b")}

    def machine_of(worker_id: str) -> str:
        pid = int(worker_id.rsplit(":", 1)[1])
        return next(m for m, w in workers.items() if parent_pid(pid) == w.process.pid)

    def logs() -> str:
        return "\n".join(f"--- machine {m}:\n{w.output()[-2500:]}" for m, w in workers.items())

    def post(model: str, cls: str, external_id: str) -> str:
        body = request_body(digits, external_id=external_id, forget_class=cls, model=model, uri=forget[cls])
        return client.post("/deletion-requests", headers=admin, json=body).json()["id"]

    def wait_finished(request_ids: list[str]) -> dict[str, dict]:
        def done():
            bodies = {i: client.get(f"/deletion-requests/{i}", headers=admin).json() for i in request_ids}
            return bodies if all(b["status"] in FINISHED for b in bodies.values()) else None
        return wait_for(done, 300, message=f"requests to finish\n{logs()}")

    wait_for(lambda: all("ready." in w.output() for w in workers.values()), 120, message=f"workers\n{logs()}")
    # One request per model, posted together while both machines wait on the queue: each machine
    # takes one (a busy machine takes no second message), however short the runs are.
    a1, b1 = post("digits-a", "1", "a-1"), post("digits-b", "1", "b-1")
    round_one = wait_finished([a1, b1])
    assert {machine_of(ran_by(round_one[a1])), machine_of(ran_by(round_one[b1]))} == {"a", "b"}, \
        f"both workers consume the one queue\n{logs()}"
    # Both machines published a version: each request was completed by the worker that ran it.
    for request_id in (a1, b1):
        assert round_one[request_id]["status"] == "propagated", round_one[request_id]
        assert completed_by(round_one[request_id]) == ran_by(round_one[request_id])
    assert machine_of(completed_by(round_one[a1])) != machine_of(completed_by(round_one[b1]))

    # Again, and whichever machine runs the next request is killed as soon as it trains. Whoever
    # survives must finish it; the sweep re-queues it, so when the sweeping machine (a) was the one
    # killed, a new machine with the sweep joins, as an operator's restart would bring it back.
    a2 = post("digits-a", "2", "a-2")
    wait_for(lambda: training_started(backend, a2), 120, interval=0.05, message=f"a-2 to train\n{logs()}")
    victim = machine_of(ran_by(client.get(f"/deletion-requests/{a2}", headers=admin).json()))
    workers[victim].kill()
    if victim == "a":
        homes["c"] = tmp_path / "machine-c"
        (homes["c"] / "tmp").mkdir(parents=True)
        workers["c"] = start_worker(beat=True, LETHE_HOME=str(homes["c"]), TMPDIR=str(homes["c"] / "tmp"), **LOGIT_ONLY)
    b2 = post("digits-b", "2", "b-2")

    results = wait_finished([a1, b1, a2, b2])
    assert [r["status"] for r in results.values()] == ["propagated"] * 4, \
        [(r["status"], r["error"]) for r in results.values()]
    assert any("expired" in str((e["detail"] or {}).get("reason", "")) for e in results[a2]["events"]), \
        f"the kill landed after the run on {victim} had finished"
    assert machine_of(completed_by(results[a2])) != victim, "a surviving machine took over the killed run"

    # Each model: versions 1, 2, 3, each trained from the one before; current forgets both classes.
    stored = s3.keys("artifacts/")
    for name, chain in chains(backend).items():
        assert [v for v, _, _ in chain] == [1, 2, 3], (name, chain)
        assert [parent for _, _, parent in chain[1:]] == [sha for _, sha, _ in chain[:-1]], (name, chain)
        assert all(f"artifacts/{sha[:2]}/{sha}.safetensors" in stored for _, sha, _ in chain), (name, stored)
        current = client.get("/models/current", headers=admin, params={"model": name}).json()
        assert current["version"] == 3 and sorted(current["classes_forgotten"]) == ["1", "2"], current
    # Nothing of the runs stayed on the machines: no local artifacts anywhere, no run folder on the
    # survivors. The killed machine's run folder (forget-set images) stays until a worker starts there again.
    assert not any((home / "artifacts").exists() for home in homes.values())
    # (A run fenced out by a lease that expired under load may still be ending: its folder goes with it.)
    def left() -> dict[str, list[str]]:
        return {m: sorted(p.name for p in (homes[m] / "tmp").glob("lethe-*")) for m in homes if m != victim}

    wait_for(lambda: not any(left().values()), 60, message=f"run folders to be removed: {left()}\n{logs()}")
    assert list((homes[victim] / "tmp").glob("lethe-run-*")), "the killed run left its folder"
    restarted = start_worker(beat=False, LETHE_HOME=str(homes[victim]), TMPDIR=str(homes[victim] / "tmp"),
                             **LOGIT_ONLY)
    wait_for(lambda: "ready." in restarted.output(), 120, message=f"the restarted worker\n{restarted.output()}")
    assert list((homes[victim] / "tmp").glob("lethe-run-*")) == [], restarted.output()[-2000:]


def ran_by(result: dict) -> str:
    return [e["actor"] for e in result["events"] if e["event"] == "status:running"][-1].removeprefix("worker:")


def completed_by(result: dict) -> str:
    return next(e["actor"] for e in result["events"] if e["event"] == "status:completed").removeprefix("worker:")
