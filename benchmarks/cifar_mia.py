"""Where CIFAR-10's MIA miss comes from: the loss-based attack's two sides, read model by model.

The attack (worker/engine/evidence.py, ``loss_mia``) is a threshold on each image's log-loss against
the forgotten class, forget images (members) against the audit half's unseen images of the class.
For the CIFAR-10 reference and airplane (its first 500 training images), this prints and records,
for the original, its row reset without any training, the service's setting and a few changes to it:
each side's mean and spread of log-loss, the MIA at four seeds (the subsample and the folds), the
probe at four fold seeds, and Acc_r. With ``--faces`` also the face model's head-row cosines (the
engine's template check, ``ForgetSetFacts.row_cosine``) for all 15 people, against CIFAR-10's.

    .venv/bin/python benchmarks/cifar_mia.py --threads 2      # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.cifar import Cifar10, DataError  # noqa: E402
from benchmarks.faces import YaleFaces, build_face_model  # noqa: E402
from service.config import UnlearnSettings  # noqa: E402
from worker.engine import ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn  # noqa: E402
from worker.engine.evidence import loss_mia, per_image_loss, probe_accuracy  # noqa: E402
from worker.engine.head import reset_class_rows  # noqa: E402
from worker.engine.images import normalise, read_images  # noqa: E402
from worker.engine.metrics import forget_retain_accuracy, predict  # noqa: E402
from worker.engine.package import build_model, load_package  # noqa: E402
from worker.engine.runtime import pick_runtime  # noqa: E402
from worker.engine.unlearn import forget_set_facts  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SEEDS = (0, 1, 2, 3)
# Changes to the service's setting for a 500-image set (its logit-only setting: the reference's rows
# are not templates); None: the original with its row reset, untrained.
SETTINGS: dict[str, dict[str, Any] | None] = {
    "reset-only": None,
    "service": {},
    "temperature-0.1": {"target_temperature": 0.1},
    "temperature-2": {"target_temperature": 2.0},
    "past-the-stop-40": {"max_forget_prob": 1e-9, "max_steps": 40},
    "no-reset": {"reset_head_rows": False},
    "no-reset-p0.05": {"reset_head_rows": False, "max_forget_prob": 0.05},
    "every-block-no-reset": {"reset_head_rows": False, "adapter_blocks": "all"},
}


def sides(model: torch.nn.Module, members: torch.Tensor, non_members: torch.Tensor, index: int) -> dict[str, float]:
    """Each side's log-loss against the class: mean and standard deviation."""
    found = {}
    for side, images in (("members", members), ("non_members", non_members)):
        log_loss = per_image_loss(model, images, index, 256).clamp_min(1e-300).log()
        found[f"{side}_mean"], found[f"{side}_sd"] = round(log_loss.mean().item(), 4), round(log_loss.std().item(), 4)
    return found


def measure(model: torch.nn.Module, members: torch.Tensor, audit: torch.Tensor, labels: torch.Tensor,
            index: int) -> dict[str, Any]:
    model.eval()
    non_members = audit[labels == index]
    _, acc_r = forget_retain_accuracy(predict(model, audit, pick_runtime("auto", "fp32"), 512), labels, [index])
    return {"acc_r": round(acc_r, 2), **sides(model, members, non_members, index),
            "mia": [round(loss_mia(model, members, non_members, index, seed=s).accuracy, 2) for s in SEEDS],
            "probe": [round(probe_accuracy(model, audit, labels, index, seed=s).accuracy, 2) for s in SEEDS]}


def face_cosines(faces: Path, threads: int) -> dict[str, float]:
    data = YaleFaces.open(faces)
    model = build_face_model(data, threads=threads)
    specs = tuple(ForgetSpec(c, str(data.forget(c))) for c in data.classes)
    return {c: f.row_cosine for c, f in forget_set_facts(str(model), specs, with_row_cosine=True).items()}


def render(record: dict[str, Any]) -> str:
    lines = ["| model | Acc_r | log-loss, members | log-loss, unseen | MIA (seeds 0-3) | probe (fold seeds 0-3) | steps |",
             "|---|---|---|---|---|---|---|"]
    for name, m in record["models"].items():
        lines.append(f"| {name} | {m['acc_r']:.1f} | {m['members_mean']:.3f} ± {m['members_sd']:.2f} | "
                     f"{m['non_members_mean']:.3f} ± {m['non_members_sd']:.2f} | "
                     f"{', '.join(f'{v:.1f}' for v in m['mia'])} | {', '.join(f'{v:.1f}' for v in m['probe'])} | "
                     f"{m.get('steps', '')} |")
    if record.get("face_row_cosines"):
        values = record["face_row_cosines"].values()
        lines += ["", f"Face model head-row cosines (15 people): {min(values):.2f}-{max(values):.2f}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", type=Path, default=SHARED / "datasets" / "cifar10")
    parser.add_argument("--cifar-model", type=Path, default=SHARED / "models" / "cifar10-vit-d6")
    parser.add_argument("--faces", type=Path, default=None, help="also the face model's head-row cosines (Yale faces)")
    parser.add_argument("--class", dest="cls", default="airplane")
    parser.add_argument("--forget-images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "cifar_mia.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        data = Cifar10.open(args.cifar)
        package = load_package(args.cifar_model)
    except (DataError, OSError) as exc:
        print(f"cifar_mia: {exc}", file=sys.stderr)
        return 2
    card, index = package.card, package.card.class_index(args.cls)
    forget_source = data.forget(args.cls, args.forget_images)
    members = normalise(read_images(str(forget_source), card.input).pixels, card.input)
    audit_set = read_images(str(data.half("test")), card.input)
    audit, labels = normalise(audit_set.pixels, card.input), audit_set.label_indices(card.classes)
    inputs = UnlearnInputs(model=str(args.cifar_model), forget=(ForgetSpec(args.cls, str(forget_source)),))
    base = UnlearnSettings().engine_settings(args.forget_images)  # the logit-only setting: rows not templates
    original = build_model(card, package.state_dict)
    record: dict[str, Any] = {"class": args.cls, "forget_images": args.forget_images, "base_setting": base,
                              "models": {"original": measure(original, members, audit, labels, index)}}
    for name, change in SETTINGS.items():
        if change is None:
            model = copy.deepcopy(original)
            reset_class_rows(model, [index])
            steps = 0
        else:
            result = unlearn(inputs, replace(UnlearnConfig(seed=0, **base), **change))
            model, steps = build_model(card, result.state_dict), result.report.steps
        record["models"][name] = {**measure(model, members, audit, labels, index), "steps": steps, "change": change}
        print(name, record["models"][name], flush=True)
    if args.faces:
        record["face_row_cosines"] = face_cosines(args.faces, args.threads)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(record))
    print(render(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
