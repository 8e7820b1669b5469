"""``lethe demo``: the whole product on one machine with nothing configured.

Builds the digits ViT (cached in ``$LETHE_HOME/demo``), migrates the embedded database, starts the
API and a worker, registers the model with its held-out images (validation and test splits), submits a deletion request for
one digit, waits for it and prints what changed; then keeps serving until interrupted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.config import get_settings

DEMO_MODEL = "digits-demo"


def run_demo(host: str, port: int, forget_class: str, exit_when_done: bool, timeout: float) -> int:
    settings = get_settings()
    demo_dir = settings.home / "demo"
    data, package, held_out = build_demo_model(demo_dir)
    env = {**os.environ, "LETHE_HOME": str(settings.home)}
    roots = [r for r in env.get("LETHE_DATA_ROOTS", "").split(":") if r]
    if not any(Path(r).resolve() in [data.root.resolve(), *data.root.resolve().parents] for r in roots):
        env["LETHE_DATA_ROOTS"] = ":".join([*roots, str(data.root)])
    os.environ.update(env)
    get_settings.cache_clear()
    settings = get_settings()

    from service.auth.service import create_key
    from service.db import session_scope, upgrade_schema

    say(f"database: {settings.database}")
    upgrade_schema(settings.database)
    with session_scope(settings.database) as session:
        _row, key = create_key(session=session, name=f"demo-{int(time.time() * 1000)}", scopes=["admin"])
    processes = start_services(host, port, env, settings.home)
    base = f"http://{host}:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            wait_ready(client, processes, timeout=120)
            ensure_registered(client, package, held_out)
            body = {"external_id": f"demo-{int(time.time())}", "model": DEMO_MODEL, "forget_class": forget_class,
                    "forget_set": {"uri": f"file://{data.train_class(forget_class)}"}}
            accepted = client.post("/deletion-requests", json=body)
            accepted.raise_for_status()
            location = accepted.headers["location"]
            say(f"submitted deletion request {location} (forget digit {forget_class}); waiting for the worker ...")
            result = wait_finished(client, location, timeout)
            report(client, base, location, result, key)
            if exit_when_done:
                return 0 if result["status"] in ("completed", "propagated") else 1
            say("serving until interrupted (Ctrl-C)")
            while all(p.poll() is None for p in processes):
                time.sleep(1)
            return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def build_demo_model(demo_dir: Path):
    from service.demo_model import DigitsData, train_digits_vit, write_digits

    data = DigitsData(demo_dir / "data")
    if not (data.test / "9").is_dir():
        say(f"writing the digits data set to {data.root}")
        write_digits(data.root)
    held_out = held_out_set(data)
    package = demo_dir / "model"
    if not (package / "model.safetensors").is_file():
        say("training the demo ViT on the digits (about 20 s) ...")
        train_digits_vit(data, package)
    return data, package, held_out


def held_out_set(data) -> Path:
    """The validation and test splits together, as the model's evaluation set (hard links). The
    service cuts it in halves (selection, audit) and gates on the audit half: with one split, 18
    images of a digit, the 5 % held-out gate could not tell none recognised from one (5.6 %)."""
    folder = data.root / "held-out"
    if not (folder / "9").is_dir():
        staging = data.root / ".held-out"
        shutil.rmtree(staging, ignore_errors=True)
        for split in (data.val, data.test):
            for image in split.glob("*/*.png"):
                (staging / image.parent.name).mkdir(parents=True, exist_ok=True)
                os.link(image, staging / image.parent.name / f"{split.name}-{image.name}")
        os.replace(staging, folder)
    return folder


def start_services(host: str, port: int, env: dict[str, str], home: Path) -> list[subprocess.Popen]:
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "service.cli"]
    api = subprocess.Popen([*command, "serve", "--host", host, "--port", str(port)], env=env,
                           stdout=open(logs / "api.log", "w"), stderr=subprocess.STDOUT)
    worker = subprocess.Popen([*command, "worker", "--beat"], env=env,
                              stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT)
    say(f"started the API (pid {api.pid}) and a worker (pid {worker.pid}); logs in {logs}")
    return [api, worker]


def wait_ready(client: httpx.Client, processes: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit("lethe: error: the API or the worker exited; see the logs")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("lethe: error: the API did not become ready")


def ensure_registered(client: httpx.Client, package: Path, eval_set: Path) -> None:
    if client.get("/models/current", params={"model": DEMO_MODEL}).status_code == 200:
        return
    with open(package / "model.json", "rb") as card, open(package / "model.safetensors", "rb") as weights:
        response = client.post("/models", data={"name": DEMO_MODEL, "eval_set": f"file://{eval_set}"},
                               files={"card": card, "weights": weights})
    response.raise_for_status()
    say(f"registered {DEMO_MODEL} version 1 (sha256 {response.json()['sha256'][:16]}...)")


def wait_finished(client: httpx.Client, location: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(location).json()
        if body["status"] not in ("received", "queued", "running"):
            return body
        time.sleep(1)
    raise SystemExit(f"lethe: error: the request did not finish within {timeout:.0f} s")


def report(client: httpx.Client, base: str, location: str, result: dict, key: str) -> None:
    say(f"request status: {result['status']}" + (f" ({result['error']})" if result.get("error") else ""))
    metrics = result.get("metrics") or {}
    for cls, after in (metrics.get("forget_acc_after") or {}).items():
        trained = (metrics.get("forget_acc_trained") or {}).get(cls)
        reset = f" ({trained:.1f}% before its head row was reset)" if (metrics.get("config") or {}).get(
            "reset_head_rows") and trained is not None else ""
        say(f"  forget-set accuracy of digit {cls}: {metrics['forget_acc_before'][cls]:.1f}% -> {after:.1f}%{reset}")
    evaluation = metrics.get("evaluation")
    if evaluation:
        say(f"  held-out Acc_f (forgotten digit): {evaluation['acc_f_before']:.1f}% -> {evaluation['acc_f_after']:.1f}%")
        say(f"  held-out Acc_r (other digits):    {evaluation['acc_r_before']:.1f}% -> {evaluation['acc_r_after']:.1f}%")
    current = client.get("/models/current", params={"model": DEMO_MODEL}).json()
    say(f"current version: {current['version']}, sha256 {current['sha256']}")
    say("look at:")
    say(f"  {base}{location}")
    say(f"  {base}/models/current?model={DEMO_MODEL}")
    say(f"  {base}{current['download_url']}")
    say(f"  {base}/docs   (the OpenAPI schema)")
    say(f"  {base}/dashboard   (the ops dashboard: log in with the key below)")
    say(f"API key for these URLs (admin scope): {key}")


def say(message: str) -> None:
    print(f"lethe demo: {message}", flush=True)
