"""Speed and memory of one unlearning run on the shared CIFAR-10 reference model.

    .venv/bin/python benchmarks/engine_speed.py                     # 500 'cat' images, defaults
    .venv/bin/python benchmarks/engine_speed.py --forget-images 50 --max-steps 2 --out /tmp/speed.json

Forget images come from the train split (the model's training data, as a deletion request's
would); they are extracted once from the archive into a cache folder outside the repository
(``$LETHE_BENCH_CACHE``, default ``~/.cache/lethe/benchmarks``). The figures are those of the
engine's own report: steps, unlearning seconds, seconds per step, peak memory of the run,
trainable parameters and optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from worker.engine import EngineError, ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn  # noqa: E402


def cache_root() -> Path:
    return Path(os.environ.get("LETHE_BENCH_CACHE", Path.home() / ".cache" / "lethe" / "benchmarks"))


def extract_class_images(archive: Path, split: str, class_name: str, count: int | None) -> Path:
    """The first ``count`` images (by name) of ``split/class_name`` in the archive, in a cache folder."""
    if not archive.is_file():
        raise EngineError(f"{archive}: CIFAR-10 archive not found (pass --data)")
    target = cache_root() / f"cifar10-{split}-{class_name}-{count or 'all'}"
    if target.is_dir() and any(target.iterdir()):
        return target
    staging = target.with_name(target.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    prefix = f"{split}/{class_name}/"
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar if m.isfile() and m.name.startswith(prefix)), key=lambda m: m.name)
        if not members:
            raise EngineError(f"{archive}: no images under {prefix}")
        for member in members[:count]:
            (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "cifar10-vit-d6")
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cifar10" / "train.tar")
    parser.add_argument("--class", dest="class_name", default="cat")
    parser.add_argument("--forget-images", type=int, default=500)
    parser.add_argument("--method", default="lora-bounded")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "engine_speed.json")
    args = parser.parse_args(argv)
    try:
        if not (args.model / "model.json").is_file():
            raise EngineError(f"{args.model}: reference model package not found (pass --model)")
        forget_dir = extract_class_images(args.data, "train", args.class_name, args.forget_images)
        config = UnlearnConfig(method=args.method, seed=args.seed, max_steps=args.max_steps,
                               precision=args.precision, device=args.device)
        started = time.perf_counter()
        result = unlearn(UnlearnInputs(model=str(args.model), forget=(ForgetSpec(args.class_name, str(forget_dir)),)),
                         config)
        wall = time.perf_counter() - started
    except EngineError as exc:
        print(f"engine_speed: error: {exc}", file=sys.stderr)
        return 2
    report = result.report
    figures = {
        "model": args.model.name,
        "class": args.class_name,
        "forget_images": report.forget_set_size[args.class_name],
        "method": report.method,
        "device": report.device,
        "precision": report.precision,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "steps": report.steps,
        "steps_run": report.steps_run,
        "target_met": report.target_met,
        "forget_acc_before": report.forget_acc_before[args.class_name],
        "forget_acc_after": report.forget_acc_after[args.class_name],
        "unlearning_seconds": report.seconds,
        "seconds_per_step": round(report.seconds / max(report.steps_run, 1), 3),
        "total_seconds": report.total_seconds,
        "wall_seconds": round(wall, 3),
        "peak_memory_mib": round(report.peak_memory_bytes / 2**20, 1) if report.peak_memory_bytes is not None else None,
        "trainable_parameters": report.trainable_parameters,
        "optimizer_state_bytes": report.optimizer_state_bytes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
