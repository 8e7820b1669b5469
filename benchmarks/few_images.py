"""Forgetting from few images: a face model, few-image CIFAR-10 and the digits model, side by side.

    .venv/bin/python benchmarks/few_images.py --domain faces --threads 1      # 15 people x 3 seeds, every variant
    .venv/bin/python benchmarks/few_images.py --domain cifar --sizes 10 20 50 --seeds 0 --threads 1
    .venv/bin/python benchmarks/few_images.py --domain digits --sizes 8 all
    .venv/bin/python benchmarks/few_images.py --report-only

The case a CIFAR-10 table with 500 images per class hides: a request carries a handful of images
of one person, the run forgets exactly those arrays, and the person's other photos are still
recognised. Each (domain, variant, class, seed, forget-set size) is one task and one result file
under ``--results``/few_images-runs (resumable; processes side by side claim tasks with lock files,
as paper_table.py does). What a task measures:

- held-out Acc_f: the forgotten class's accuracy on images no run ever saw (faces: the person's 2
  test photos; CIFAR-10: the class's images of the test half; digits: the test split);
- the others' Acc_r drop: the other classes' accuracy on the same held-out set, original minus new;
- leave-some-out (faces, 7 of 9): the 2 training photos the run did not get, scored;
- with ``--holdout-variants``: the engine's generalisation check (3 folds), to see whether it flags
  the runs whose held-out Acc_f is high.

Anchors (images of none of the model's classes, for the ``*anchor*`` variants): CIFAR-10 images for
the face and digits models, the Yale faces for the CIFAR-10 model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.cifar import Cifar10, DataError, cache_root, write_manifest  # noqa: E402
from benchmarks.faces import YaleFaces, build_face_model  # noqa: E402
from benchmarks.paper_table import _write_json, claim  # noqa: E402
from worker.engine import EngineError, ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn  # noqa: E402
from worker.engine.images import read_images  # noqa: E402
from worker.engine.metrics import accuracy, eval_logits, forget_retain_accuracy  # noqa: E402
from worker.engine.package import build_model, load_package  # noqa: E402
from worker.engine.runtime import pick_runtime  # noqa: E402

DOMAINS = ("faces", "cifar", "digits")
DEFAULT_SIZES = {"faces": [9, 7], "cifar": [10, 20, 50], "digits": [8, None]}
HOLDOUT_FOLDS = 3
LATE = {"lr": 3e-3, "adapter_blocks": "later-half"}
LATE_ALL_LINEAR = {"lr": 1e-3, "adapter_blocks": "later-half", "targets": ("qkv", "proj", "fc1", "fc2")}


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    anchor: bool = False  # gets the domain's anchor images
    note: str = ""


VARIANTS = {v.name: v for v in (
    Variant("lora-bounded", "lora-bounded", note="the paper's method exactly (qkv of every block, lr 1e-2)"),
    Variant("lora-kl", "lora-kl", {"lr": 3e-3}, note="qkv of every block"),
    Variant("lora-kl-late", "lora-kl", LATE, note="the service's default until now"),
    Variant("lora-adv", "lora-adv", {"lr": 1e-2}),
    Variant("ng-lora", "ng-lora", {"lr": 3e-3}),
    Variant("ng-l1", "ng-l1", {"lr": 1e-4, "l1_weight": 1e-4}),
    Variant("bounded-l1", "bounded-l1", {"lr": 5e-5}),
    Variant("late-aug", "lora-kl", LATE | {"augment": True}),
    Variant("late-aug-views", "lora-kl", LATE | {"augment": True, "confirm_views": 4}),
    Variant("late-anchor", "lora-kl", LATE, anchor=True),
    Variant("late-linear", "lora-kl", LATE_ALL_LINEAR, note="qkv, proj, fc1, fc2 of the later half, lr 1e-3"),
    Variant("late-linear-aug", "lora-kl", LATE_ALL_LINEAR | {"augment": True}),
    Variant("late-linear-anchor", "lora-kl", LATE_ALL_LINEAR, anchor=True),
    Variant("late-linear-aug-anchor", "lora-kl", LATE_ALL_LINEAR | {"augment": True}, anchor=True),
    Variant("late-margin", "lora-kl", LATE | {"max_forget_prob": 0.05}),
    Variant("late-linear-margin", "lora-kl", LATE_ALL_LINEAR | {"max_forget_prob": 0.05}),
    Variant("late-linear-aug-margin", "lora-kl", LATE_ALL_LINEAR | {"augment": True, "max_forget_prob": 0.05}),
    Variant("late-linear-aug-anchor-views", "lora-kl", LATE_ALL_LINEAR | {"augment": True, "confirm_views": 4},
            anchor=True),
)}


@dataclass(frozen=True)
class Task:
    domain: str
    variant: str
    class_name: str
    seed: int
    forget_images: int | None  # None: every training image of the class
    holdout: bool = False  # also run the engine's generalisation check

    @property
    def key(self) -> str:
        check = "-holdout" if self.holdout else ""
        return f"{self.domain}/{self.variant}/{self.class_name}-s{self.seed}-n{self.forget_images or 'all'}{check}"


# --- the three domains ------------------------------------------------------------------------

class Domain(ABC):
    """A model package, the held-out set it is scored on, forget sets of any size and an anchor."""

    name: str
    package: Path

    @abstractmethod
    def forget(self, class_name: str, count: int | None) -> Path: ...

    @abstractmethod
    def test(self) -> Path: ...

    @abstractmethod
    def anchor(self) -> Path: ...

    def held_back(self, class_name: str, count: int | None) -> Path | None:
        """Training images of the class the run was not given, when the domain can say (faces)."""
        return None


class Faces(Domain):
    name = "faces"

    def __init__(self, args: argparse.Namespace) -> None:
        self.data = YaleFaces.open(args.faces)
        self.cifar_dir = args.cifar
        self.package = args.faces_model or build_face_model(self.data, threads=torch.get_num_threads())

    def forget(self, class_name: str, count: int | None) -> Path:
        return self.data.forget(class_name, count)

    def test(self) -> Path:
        return self.data.test()

    def anchor(self) -> Path:
        return cifar_anchor(self.cifar_dir)

    def held_back(self, class_name: str, count: int | None) -> Path | None:
        return self.data.held_back(class_name, count) if count and count < 9 else None


class Cifar(Domain):
    name = "cifar"

    def __init__(self, args: argparse.Namespace) -> None:
        self.data = Cifar10.open(args.cifar)
        self.package = args.cifar_model
        self.faces_dir = args.faces
        self.per_class = args.cifar_eval_per_class

    def forget(self, class_name: str, count: int | None) -> Path:
        return self.data.forget(class_name, count)

    def test(self) -> Path:
        return self.data.half("test", self.per_class)

    def anchor(self) -> Path:
        return self.faces_dir  # the 165 Yale faces: CIFAR-10 has no class of people


class Digits(Domain):
    """The tests' digits ViT (service/demo_model.py), built once in the cache."""

    name = "digits"

    def __init__(self, args: argparse.Namespace) -> None:
        from service.demo_model import train_digits_vit, write_digits

        root = cache_root() / "digits"
        if not (root / "model" / "model.safetensors").is_file():
            data = write_digits(root / "data")
            train_digits_vit(data, root / "model")
        self.root, self.package = root, root / "model"
        self.cifar_dir = args.cifar

    def forget(self, class_name: str, count: int | None) -> Path:
        if count is None:
            return self.root / "data" / "train" / class_name
        names = sorted(p.name for p in (self.root / "data" / "train" / class_name).iterdir())[:count]
        return write_manifest(self.root / f"forget-{class_name}-{count}.csv",
                              [(f"data/train/{class_name}/{n}", "") for n in names])

    def test(self) -> Path:
        return self.root / "data" / "test"

    def anchor(self) -> Path:
        return cifar_anchor(self.cifar_dir)


def cifar_anchor(data_dir: Path) -> Path:
    """50 CIFAR-10 images per class (500): no faces and no digits among them."""
    return Cifar10.open(data_dir).half("val", per_class=50)


def open_domain(name: str, args: argparse.Namespace) -> Domain:
    return {"faces": Faces, "cifar": Cifar, "digits": Digits}[name](args)


# --- the runner -------------------------------------------------------------------------------

class Bench:
    def __init__(self, domain: Domain, args: argparse.Namespace) -> None:
        self.domain, self.args = domain, args
        self.runs = args.results / "few_images-runs"
        self.card = load_package(domain.package).card
        self.runtime = pick_runtime("auto", "auto")

    @cached_property
    def scored(self) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_images(str(self.domain.test()), self.card.input)
        return images.pixels, images.label_indices(self.card.classes)

    @cached_property
    def original(self) -> torch.Tensor:
        package = load_package(self.domain.package)
        return self.predict(build_model(package.card, package.state_dict), self.scored[0])

    def predict(self, model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        logits = eval_logits(model.to(self.runtime.device), pixels, self.runtime, 512, self.card.input)
        return logits.argmax(1).cpu()

    def execute(self, task: Task) -> dict[str, Any]:
        variant = VARIANTS[task.variant]
        settings = dict(variant.settings) | ({"holdout_folds": HOLDOUT_FOLDS} if task.holdout else {})
        record: dict[str, Any] = {"task": task.key, "domain": task.domain, "variant": task.variant,
                                  "method": variant.method, "class": task.class_name, "seed": task.seed,
                                  "forget_images": task.forget_images, "holdout_check": task.holdout,
                                  "anchor": variant.anchor, "threads": torch.get_num_threads(),
                                  "host": socket.gethostname()}
        config = UnlearnConfig(method=variant.method, seed=task.seed, max_steps=self.args.max_steps, **settings)
        inputs = UnlearnInputs(model=str(self.domain.package),
                               forget=(ForgetSpec(task.class_name, str(self.domain.forget(task.class_name,
                                                                                          task.forget_images))),),
                               anchor_source=str(self.domain.anchor()) if variant.anchor else None)
        try:
            result = unlearn(inputs, config)
        except EngineError as exc:
            return record | {"error": f"{type(exc).__name__}: {exc}"}
        report = result.report
        model = build_model(self.card, result.state_dict)
        pixels, labels = self.scored
        forgotten = [self.card.class_index(task.class_name)]
        acc_f, acc_r = forget_retain_accuracy(self.predict(model, pixels), labels, forgotten)
        base_f, base_r = forget_retain_accuracy(self.original, labels, forgotten)
        record |= {"config": report.config, "steps": report.steps, "target_met": report.target_met,
                   "seconds": report.seconds, "total_seconds": report.total_seconds,
                   "forget_set_size": report.forget_set_size[task.class_name],
                   "forget_set_acc_after": report.forget_acc_after[task.class_name],
                   "acc_f": acc_f, "acc_r": acc_r, "original_acc_f": base_f, "original_acc_r": base_r,
                   "held_out_images": int((labels == forgotten[0]).sum())}
        held_back = self.domain.held_back(task.class_name, task.forget_images)
        if held_back is not None:
            images = read_images(str(held_back), self.card.input)
            record["held_back_acc"] = accuracy(self.predict(model, images.pixels),
                                               torch.full((len(images),), forgotten[0]))
        if report.holdout is not None:
            record["holdout"] = {"forget_acc": report.holdout.forget_acc[task.class_name],
                                 "held_back": report.holdout.held_back[task.class_name],
                                 "folds_run": report.holdout.folds_run, "steps": report.holdout.steps,
                                 "seconds": report.holdout.seconds}
        return record

    def work(self, tasks: list[Task]) -> int:
        ran = 0
        for i, task in enumerate(tasks):
            path, lock = self.runs / f"{task.key}.json", self.runs / f"{task.key}.lock"
            if path.is_file() or not claim(lock):
                continue
            try:
                started = time.perf_counter()
                record = self.execute(task)
                record["wall_seconds"] = round(time.perf_counter() - started, 2)
                _write_json(path, record)
                ran += 1
                print(f"[{i + 1}/{len(tasks)}] {task.key}: {_one_line(record)}", flush=True)
            finally:
                lock.unlink(missing_ok=True)
        return ran


def plan(args: argparse.Namespace, classes: list[str]) -> list[Task]:
    """Seed by seed, so a partial run covers every variant and class before the next seed."""
    return [Task(args.domain, v, c, s, n, holdout=v in args.holdout_variants)
            for s in args.seeds for n in args.sizes for v in args.variants for c in classes]


# --- the report -------------------------------------------------------------------------------

def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (domain, forget-set size, variant, holdout check)."""
    rows = []
    groups = sorted({(r["domain"], r["forget_images"] or 10**9, r["variant"], r["holdout_check"]) for r in records},
                    key=lambda g: (DOMAINS.index(g[0]), g[1], list(VARIANTS).index(g[2]) if g[2] in VARIANTS else 99, g[3]))
    for domain, size, variant, check in groups:
        runs = [r for r in records if (r["domain"], r["forget_images"] or 10**9, r["variant"], r["holdout_check"]) ==
                (domain, size, variant, check)]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append({"domain": domain, "forget_images": size, "variant": variant, "runs": len(runs), "errors": len(runs)})
            continue
        per_class = {}
        for r in ok:
            per_class.setdefault(r["class"], []).append(r["acc_f"])
        drops = [r["original_acc_r"] - r["acc_r"] for r in ok]
        row = {"domain": domain, "forget_images": None if size == 10**9 else size, "variant": variant,
               "holdout_check": check, "runs": len(runs), "errors": len(runs) - len(ok),
               "classes": len(per_class), "seeds": len({r["seed"] for r in ok}),
               "acc_f": statistics.fmean(r["acc_f"] for r in ok),
               "worst_class_acc_f": max(statistics.fmean(v) for v in per_class.values()),
               "runs_acc_f_over_50": sum(r["acc_f"] > 50 for r in ok),
               "original_acc_f": statistics.fmean(r["original_acc_f"] for r in ok),
               "drop": statistics.fmean(drops), "worst_drop": max(drops),
               "target_missed": sum(not r["target_met"] for r in ok),
               "steps": statistics.fmean(r["steps"] for r in ok), "seconds": statistics.fmean(r["seconds"] for r in ok)}
        if any("held_back_acc" in r for r in ok):
            row["held_back_acc"] = statistics.fmean(r["held_back_acc"] for r in ok if "held_back_acc" in r)
        checked = [r for r in ok if r.get("holdout") and r["holdout"]["forget_acc"] is not None]
        if checked:
            row["holdout"] = holdout_summary(checked)
        rows.append(row)
    return rows


def holdout_summary(runs: list[dict[str, Any]], gates: tuple[float, ...] = (0.0, 15.0, 25.0, 34.0, 50.0)) -> dict[str, Any]:
    """How the generalisation check's figure tracks the held-out Acc_f: for each candidate gate
    threshold, the runs it would fail, and the runs it passes whose held-out Acc_f is still above
    50 % (the silent failures the check exists to catch)."""
    return {"mean_holdout_acc": statistics.fmean(r["holdout"]["forget_acc"] for r in runs),
            "seconds": statistics.fmean(r["holdout"]["seconds"] for r in runs),
            "gates": [{"max_holdout_acc": g,
                       "failed": sum(r["holdout"]["forget_acc"] > g for r in runs),
                       "passed_but_held_out_over_50": sum(r["holdout"]["forget_acc"] <= g and r["acc_f"] > 50 for r in runs),
                       "passed_but_held_out_over_0": sum(r["holdout"]["forget_acc"] <= g and r["acc_f"] > 0 for r in runs)}
                      for g in gates], "runs": len(runs)}


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Forgetting from few images: faces, few-image CIFAR-10, digits", "",
             f"Generated {meta['generated']} on {meta['machine']}. Held-out Acc_f: the forgotten class on images no "
             "run saw (faces: each person's 2 test photos; CIFAR-10: the test half; digits: the test split); "
             "*worst class*: the class with the highest Acc_f, mean over seeds; *drop*: the other classes' Acc_r, "
             "original minus new (points), mean and worst run; *held back*: leave-some-out, the training photos "
             "the run was not given.", ""]
    for domain in DOMAINS:
        mine = [r for r in rows if r["domain"] == domain]
        if not mine:
            continue
        lines += [f"## {domain}", "",
                  "| forget images | variant | classes × seeds | held-out Acc_f | worst class | runs > 50 % | "
                  "drop | worst drop | held back | missed | steps | s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if "acc_f" not in r:
                lines.append(f"| {r['forget_images']} | {r['variant']} | {r['runs']} errors | | | | | | | | | |")
                continue
            name = r["variant"] + (" (+check)" if r["holdout_check"] else "")
            held_back = f"{r['held_back_acc']:.1f}" if "held_back_acc" in r else "–"
            lines.append(f"| {r['forget_images'] or 'all'} | {name} | {r['classes']} × {r['seeds']} | {r['acc_f']:.1f} | "
                         f"{r['worst_class_acc_f']:.1f} | {r['runs_acc_f_over_50']} | {r['drop']:.2f} | "
                         f"{r['worst_drop']:.2f} | {held_back} | {r['target_missed']} | {r['steps']:.1f} | {r['seconds']:.2f} |")
        checks = [r for r in mine if "holdout" in r]
        if checks:
            lines += ["", f"Generalisation check ({HOLDOUT_FOLDS} folds), {domain}: runs failed at each gate threshold, "
                      "and runs passed while their held-out Acc_f is above 50 % / above 0 %.", "",
                      "| forget images | variant | runs | mean check Acc_f | check s | " +
                      " | ".join(f"≤ {g['max_holdout_acc']:g} %: failed / passed >50 / passed >0"
                                 for g in checks[0]["holdout"]["gates"]) + " |",
                      "|---|---|---|---|---|" + "---|" * len(checks[0]["holdout"]["gates"])]
            for r in checks:
                h = r["holdout"]
                lines.append(f"| {r['forget_images'] or 'all'} | {r['variant']} | {h['runs']} | {h['mean_holdout_acc']:.1f} | "
                             f"{h['seconds']:.2f} | " + " | ".join(
                                 f"{g['failed']} / {g['passed_but_held_out_over_50']} / {g['passed_but_held_out_over_0']}"
                                 for g in h["gates"]) + " |")
        lines.append("")
    notes = [f"- `{v.name}`: {v.note}" for v in VARIANTS.values() if v.note]
    return "\n".join(lines + ["## Variants", ""] + notes + [
        "- `*aug*`: random crops (side ≥ 0.8), mirror, exposure and contrast ±20 % of the forget images at every step; "
        "`*views*`: the stop rule also needs 4 fixed random views per image forgotten; `*margin*`: the stop rule "
        "also needs the class's probability ≤ 0.05 on every forget image; `*anchor*`: KL to the original "
        "(forgotten classes masked) on images of no class of the model; `late`: adapters in the later half of the blocks."]) + "\n"


def _one_line(record: dict[str, Any]) -> str:
    if "error" in record:
        return record["error"]
    check = f", check {record['holdout']['forget_acc']:.0f}%" if record.get("holdout") else ""
    return (f"{record['steps']} steps, Acc_f {record['acc_f']:.1f}, drop {record['original_acc_r'] - record['acc_r']:.2f}"
            f"{check}, {record['wall_seconds']} s")


# --- command line -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", choices=DOMAINS, default="faces")
    parser.add_argument("--faces", type=Path, default=SHARED / "datasets" / "yalefaces")
    parser.add_argument("--faces-model", type=Path, default=None,
                        help="a face model package (default: faces.py's, built once in the cache)")
    parser.add_argument("--cifar", type=Path, default=SHARED / "datasets" / "cifar10")
    parser.add_argument("--cifar-model", type=Path, default=SHARED / "models" / "cifar10-vit-d6")
    parser.add_argument("--cifar-eval-per-class", type=int, default=200,
                        help="test-half images per class the CIFAR-10 runs are scored on (of 500)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--holdout-variants", nargs="*", default=[], choices=list(VARIANTS), metavar="VARIANT",
                        help="variants that also run the generalisation check (as separate tasks)")
    parser.add_argument("--classes", nargs="+", default=None, help="default: every class of the model")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sizes", nargs="+", default=None, help="forget images per class, or 'all'")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.sizes = [None if s == "all" else int(s) for s in args.sizes] if args.sizes else DEFAULT_SIZES[args.domain]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = args.results / "few_images-runs"
    try:
        if not args.report_only:
            domain = open_domain(args.domain, args)
            bench = Bench(domain, args)
            classes = args.classes or list(bench.card.classes)
            bench.original  # noqa: B018  (before the tasks: every task compares with it)
            tasks = plan(args, classes)
            tasks += [Task(t.domain, t.variant, t.class_name, t.seed, t.forget_images) for t in tasks if t.holdout]
            bench.work(tasks)
    except (DataError, EngineError) as exc:
        print(f"few_images: error: {exc}", file=sys.stderr)
        return 2
    records = [json.loads(p.read_text()) for p in sorted(runs.rglob("*.json"))] if runs.is_dir() else []
    rows = summarise(records)
    meta = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    _write_json(args.results / "few_images.json", {"meta": meta, "rows": rows})
    (args.results / "few_images.md").write_text(render_markdown(rows, meta))
    print(f"report: {args.results / 'few_images.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
