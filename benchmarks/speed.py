"""Speed and memory of unlearning on the CIFAR-10 reference model: ours against full fine-tuning.

    .venv/bin/python benchmarks/speed.py                         # the paper-table rows that matter, on airplane
    .venv/bin/python benchmarks/speed.py --batch-size 128 --out /tmp/b128.json    # one option, every method alike
    .venv/bin/python benchmarks/speed.py --no-prefix-cache --out /tmp/uncached.json
    .venv/bin/python benchmarks/speed.py --variants lora-bounded --forget-images 50 --max-steps 2

Every variant of the paper table forgets the same forget set (the first N train images of the
class) with the same verified stopping rule, at its setting there: its fixed settings and, for a
tuned variant, the point its grid chose, when the result files exist (``--tuned-from``). Each run happens in a fresh
child process, so its peak resident set (VmHWM) is its own; on CUDA the peak is the allocator's.
Options (``--precision``, ``--batch-size``, ``--threads``) apply to every method alike, so the ratios
stay fair; a variant whose paper-table setting fixes its batch size keeps it (it is that variant). Reported per method: seconds per step, steps to target, unlearning and total seconds,
peak memory, trainable parameters, gradient and optimizer-state bytes; and each against ``ng-l1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.cifar import Cifar10, DataError  # noqa: E402
from benchmarks.cli import count, entry_point, output_path, write_json  # noqa: E402
from benchmarks.paper_table import VARIANTS  # noqa: E402
from worker.engine import METHODS, EngineError, ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn  # noqa: E402

BASELINE = "ng-l1"
TUNABLE = ("lr", "l1_weight")  # what the paper table's grid may have chosen
FIXED = ("lr", "l1_weight", "adapter_blocks", "targets", "rank", "batch_size")  # what a variant may fix (not selection)
# The variants this script can run as the paper table does: retain-free, stopped by the forget-set rule.
MEASURABLE = [name for name, v in VARIANTS.items()
              if not METHODS[v.method].uses_retain and not v.fixed.get("select_on_eval")]


def tuned_settings(name: str, runs: Path) -> dict[str, Any]:
    """The paper-table variant's fixed settings and its grid's choice (when the grid is complete)."""
    from benchmarks import paper_table

    variant = VARIANTS[name]
    settings = {k: v for k, v in variant.fixed.items() if k in FIXED}
    if not variant.grid or not runs.is_dir():
        return settings
    points = [r for r in paper_table.load_runs(runs / "grid" / name) if r["phase"] == "grid"]
    if len(points) < len(paper_table.grid_points(variant)):
        return settings
    chosen = paper_table.best_grid_point(points)["settings"]
    return settings | {k: v for k, v in chosen.items() if k in TUNABLE}


def measure_one(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """One run in this process (the child's job)."""
    forget_set = Cifar10.open(args.data).forget(args.class_name, args.forget_images)
    config = UnlearnConfig(method=VARIANTS[args.one].method, seed=args.seed, max_steps=args.max_steps,
                           precision=args.precision, device=args.device, cache_frozen_prefix=args.prefix_cache,
                           **({"batch_size": args.batch_size} | settings))  # a variant's own batch size stays its own
    started = time.perf_counter()
    result = unlearn(UnlearnInputs(model=str(args.model), forget=(ForgetSpec(args.class_name, str(forget_set)),)),
                     config)
    wall = time.perf_counter() - started
    report = result.report
    steps_run = max(report.steps_run, 1)
    gradient_bytes = report.trainable_parameters * 4  # fp32 master weights, so fp32 gradients
    return {
        "method": args.one, "engine_method": report.method,
        "settings": {k: report.config[k] for k in ("lr", "l1_weight", "batch_size", "adapter_blocks",
                                                  "cache_frozen_prefix")},
        "device": report.device, "precision": report.precision, "threads": torch.get_num_threads(),
        "steps": report.steps, "steps_run": report.steps_run, "target_met": report.target_met,
        "forget_acc_before": report.forget_acc_before[args.class_name],
        "forget_acc_after": report.forget_acc_after[args.class_name],
        "unlearning_seconds": report.seconds, "seconds_per_step": round(report.seconds / steps_run, 3),
        "total_seconds": report.total_seconds, "wall_seconds": round(wall, 3),
        "run_peak_mib": _mib(report.peak_memory_bytes),
        "process_peak_rss_mib": _mib(_status_bytes("VmHWM")),
        "cuda_peak_mib": _mib(torch.cuda.max_memory_allocated()) if report.device.startswith("cuda") else None,
        "trainable_parameters": report.trainable_parameters, "gradient_bytes": gradient_bytes,
        "optimizer_state_bytes": report.optimizer_state_bytes,
        "gradient_and_optimizer_bytes": gradient_bytes + report.optimizer_state_bytes,
    }


def run_child(args: argparse.Namespace, method: str, settings: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", method, "--settings", json.dumps(settings),
               "--model", str(args.model), "--data", str(args.data), "--class", args.class_name,
               "--forget-images", str(args.forget_images), "--max-steps", str(args.max_steps),
               "--seed", str(args.seed), "--precision", args.precision, "--device", args.device,
               "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else []) \
        + ([] if args.prefix_cache else ["--no-prefix-cache"])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise EngineError(f"{method}: {last.removeprefix('speed: error: ')}")
    return json.loads(done.stdout)


def with_ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each method's figures divided by the baseline's (when the baseline ran)."""
    base = next((r for r in results if r["method"] == BASELINE), None)
    ratios = {}
    if base is not None:
        for r in results:
            if r is base:
                continue
            ratios[r["method"]] = {
                key: round(r[key] / base[key], 4) if r[key] is not None and base[key] else None
                for key in ("unlearning_seconds", "seconds_per_step", "total_seconds", "process_peak_rss_mib",
                            "cuda_peak_mib", "gradient_and_optimizer_bytes", "trainable_parameters")
            }
    return {"baseline": BASELINE if base else None, "ratios": ratios}


@entry_point("speed")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "cifar10-vit-d6")
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cifar10",
                        help="folder with train.tar and test.tar")
    parser.add_argument("--class", dest="class_name", default="airplane",
                        help="default: airplane (cat, the grid class, is forgotten in 3 steps by anything)")
    parser.add_argument("--forget-images", type=count(1), default=500)
    parser.add_argument("--variants", nargs="+",
                        default=["lora-bounded", "lora-kl", "lora-kl-late", "lora-kl-late-3e-3", BASELINE],
                        choices=MEASURABLE, metavar="VARIANT",
                        help="paper_table.py variants (default: %(default)s)")
    parser.add_argument("--tuned-from", type=Path, default=REPO / "benchmarks" / "results" / "paper_table-runs",
                        help="paper_table.py's result files, for each method's tuned lr and lambda")
    parser.add_argument("--max-steps", type=count(1), default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=count(1), default=UnlearnConfig.batch_size)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=count(1), default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="run a frozen front every step (to measure what caching it saves)")
    parser.add_argument("--out", type=output_path, default=REPO / "benchmarks" / "results" / "speed.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run this method, print JSON
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.tuned_from.is_dir():
        parser.error(f"--tuned-from {args.tuned_from}: no such folder of paper_table.py result files")
    args.variants = list(dict.fromkeys(args.variants))  # each once: the ratios are keyed by name
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not (args.model / "model.json").is_file():
            raise DataError(f"{args.model}: reference model package not found (pass --model)")
        if args.one:
            print(json.dumps(measure_one(args, json.loads(args.settings))))
            return 0
        Cifar10.open(args.data).images("train", args.class_name)  # extract once, before any child is timed
        results = []
        for name in args.variants:
            settings = tuned_settings(name, args.tuned_from)
            results.append(run_child(args, name, settings))
            print(_one_line(results[-1]), flush=True)
    except (DataError, EngineError) as exc:
        print(f"speed: error: {exc}", file=sys.stderr)
        return 2
    figures = {
        "model": args.model.name, "class": args.class_name, "forget_images": args.forget_images,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__, "options": {"batch_size": args.batch_size, "precision": args.precision,
                                                "threads": args.threads or torch.get_num_threads(),
                                                "prefix_cache": args.prefix_cache},
        "results": results,
    } | with_ratios(results)
    write_json(args.out, figures)
    print(json.dumps(figures["ratios"], indent=2))
    return 0


def _one_line(r: dict[str, Any]) -> str:
    return (f"{r['method']}: {r['steps']} steps, {r['seconds_per_step']} s/step, {r['unlearning_seconds']} s "
            f"({r['total_seconds']} s in all), peak RSS {r['process_peak_rss_mib']} MiB, "
            f"grad+optimizer {r['gradient_and_optimizer_bytes'] / 2**20:.2f} MiB, forget set "
            f"{r['forget_acc_before']:.1f} -> {r['forget_acc_after']:.1f} %")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _mib(value: int | None) -> float | None:
    return round(value / 2**20, 1) if value is not None else None


if __name__ == "__main__":
    sys.exit(main())
