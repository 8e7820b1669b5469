"""Selection on an evaluation set with the few-image margin, on the CIFAR-10 reference model: how
often no checkpoint reaches the margin, and what the fallback keeps then (UnlearningLoop.run).

    .venv/bin/python benchmarks/selection_fallback.py --threads 2

Each class of the reference package forgets its first ``--forget-images`` (20) training images with
the service's few-image setting (UnlearnSettings.engine_settings), selecting on the selection half of
``--eval-per-class`` (100) test images a class, judged on the audit half, as a worker runs a request
on a model registered with an evaluation set (without the generalisation check and the evidence,
which do not change the selection). A run whose selection fell back (``selected_by`` = target) is
run again as before the fallback existed (no margin judged: the last step's weights kept), to put the
two side by side. About 20-30 s a run on 2 cores. Figures go to ``results/selection_fallback.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from benchmarks.cifar import Cifar10, DataError, write_manifest  # noqa: E402
from service.config import UnlearnSettings  # noqa: E402
from worker.engine import ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn  # noqa: E402
from worker.engine.loop import UnlearningLoop  # noqa: E402
from worker.engine.package import load_package  # noqa: E402

SELECTION_PHASE = "engine / unlearn / selection evaluation"


def run(inputs: UnlearnInputs, config: UnlearnConfig) -> dict[str, Any]:
    started = time.perf_counter()
    report = unlearn(inputs, config).report
    evaluation = report.evaluation
    return {"selected_by": report.selection["selected_by"], "step": report.steps, "steps_run": report.steps_run,
            "stop_rule_met": report.stop_rule_met, "target_met": report.target_met,
            # The trained network's Acc_f, as the gate reads it: the row reset alone puts the served one at 0.
            "acc_f": evaluation.acc_f_trained if evaluation.acc_f_trained is not None else evaluation.acc_f_after,
            "acc_r": evaluation.acc_r_after, "seconds": round(time.perf_counter() - started, 1),
            "selection_seconds": report.timings.get(SELECTION_PHASE, {}).get("seconds")}


def without_fallback(inputs: UnlearnInputs, config: UnlearnConfig) -> dict[str, Any]:
    """The run as selection made it before the fallback: no margin judged beyond the stop rule's own."""
    kept = UnlearningLoop.has_margin
    UnlearningLoop.has_margin = property(lambda self: False)
    try:
        return run(inputs, config)
    finally:
        UnlearningLoop.has_margin = kept


def render(record: dict[str, Any]) -> str:
    lines = [f"Forget sets of {record['forget_images']} images, selection on {record['eval_images']} test images "
             f"(halves), seed {record['seed']}: {summary(record['runs'])}", "",
             "| class | selected by | step / run | audit Acc_f | audit Acc_r | s | before the fallback: step, Acc_f, Acc_r |",
             "|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        old = r.get("before_fallback")
        before = f"{old['step']}, {old['acc_f']:.1f}, {old['acc_r']:.1f}" if old else ""
        lines.append(f"| {r['class']} | {r['selected_by']} | {r['step']} / {r['steps_run']} | {r['acc_f']:.1f} | "
                     f"{r['acc_r']:.1f} | {r['seconds']} | {before} |")
    return "\n".join(lines) + "\n"


def summary(runs: list[dict[str, Any]]) -> str:
    fell_back = sum(r["selected_by"] == "target" for r in runs)
    return f"{fell_back} of {len(runs)} runs reached no checkpoint at the margin"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", type=Path, default=SHARED / "datasets" / "cifar10")
    parser.add_argument("--cifar-model", type=Path, default=SHARED / "models" / "cifar10-vit-d6")
    parser.add_argument("--classes", nargs="+", default=None, help="default: every class of the model")
    parser.add_argument("--forget-images", type=int, default=20)
    parser.add_argument("--eval-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "selection_fallback.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        data = Cifar10.open(args.cifar)
        classes = args.classes or list(load_package(args.cifar_model).card.classes)
    except (DataError, OSError) as exc:
        print(f"selection_fallback: {exc}", file=sys.stderr)
        return 2
    rows = [(p, c) for c in data.classes for p in data.images("test", c)[:args.eval_per_class]]
    eval_set = write_manifest(data.root / f"eval-{len(rows)}.csv", rows)
    knobs = UnlearnSettings().engine_settings(args.forget_images)
    config = UnlearnConfig(seed=args.seed, select_on_eval=True, eval_halves=True, **knobs)
    record: dict[str, Any] = {"forget_images": args.forget_images, "eval_images": len(rows), "seed": args.seed,
                              "setting": knobs, "runs": []}
    for cls in classes:
        inputs = UnlearnInputs(model=str(args.cifar_model), eval_source=str(eval_set),
                               forget=(ForgetSpec(cls, str(data.forget(cls, args.forget_images))),))
        found = {"class": cls, **run(inputs, config)}
        if found["selected_by"] == "target":
            found["before_fallback"] = without_fallback(inputs, config)
        record["runs"].append(found)
        print(json.dumps(found), flush=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(record))
    print(render(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
