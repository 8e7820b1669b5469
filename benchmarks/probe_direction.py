"""Where the probe's residual knowledge sits on the CIFAR-10 reference model, and what it asks of
a method (the probe target of oracle.py).

The probe (worker/engine/evidence.py) is a logistic regression on standardised pre-logit features.
The question: how much of what it finds in the original, beyond a retrained model (the oracle), lies
along one direction, the class's mean feature minus the other classes', and could a run without
retain data remove it there? Per class, on the test half (the audit split of oracle.py):

- the probe as the models are: the original, the service's default run (seed 0), and the oracle
  when cifar_oracle.py's package is in the benchmark cache;
- the same features with that direction **erased** (every image's component along it set to the
  same value: a rank-1 linear concept erasure), the direction taken on the *other* half of the test
  split (the selection half, "val"), never on the images the probe is scored on;
- what an edit of the class's images alone can do: those images **moved** along it to the other
  classes' level (by their own measured offset: the best case), and every component **halved**;
- retain-free estimates of the direction: the forget set's mean feature minus an estimate of the
  other classes' mean from what such a run has (nothing, noise inputs, the anchor photos of none of
  the classes, inputs synthesised from the model by inversion), each one's cosine to the held-out
  direction, and the probe after erasing along it.

Each row gives Acc_r with the class's logit masked: the head applied to the changed features, each
other-class image read as the best of the kept classes (oracle.py's Acc_r counts a guess of the
class as wrong, so its figures are a point or two lower).

    .venv/bin/python benchmarks/probe_direction.py --classes airplane automobile --threads 2

About 4 minutes a class on 2 cores (one default run, features of 10,500 images per model, 90 inputs
synthesised). Figures go to ``results/probe_direction.{json,md}``.
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

from benchmarks.cifar import Cifar10, DataError, cache_root  # noqa: E402
from service.config import UnlearnSettings  # noqa: E402
from worker.engine import ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn  # noqa: E402
from worker.engine.evidence import features, probe_on_features  # noqa: E402
from worker.engine.images import normalise, read_images  # noqa: E402
from worker.engine.losses import class_direction as engine_direction, invert_classes  # noqa: E402
from worker.engine.package import WEIGHTS_FILE, ModelCard, build_model, load_package  # noqa: E402
from worker.engine.unlearn import forget_set_facts  # noqa: E402

SYNTHETIC_PER_CLASS = 10  # inverted inputs per kept class for the "synthetic" estimate (the engine's prototypes: 16)
BATCH = 512  # images per forward pass


# --- the feature edits (pure) ------------------------------------------------------------------

def class_direction(x: torch.Tensor, labels: torch.Tensor, index: int) -> torch.Tensor:
    """The unit vector from the other classes' mean feature to the class's: (N, D) -> (D,). The
    engine's erasure (UnlearnConfig.erase_weight) aims along the same one when it forgets one class
    (with several, its others are the kept classes only)."""
    return engine_direction(x, labels == index, labels != index)[0]


def scaled_along(x: torch.Tensor, direction: torch.Tensor, level: torch.Tensor, factor: float) -> torch.Tensor:
    """Every row's component along ``direction`` (a unit vector), taken from ``level``'s, times
    ``factor``: 0 sets them all to the level's (a rank-1 erasure); 0.5 halves them."""
    return x - (1.0 - factor) * ((x - level) @ direction)[:, None] * direction[None]


def moved(x: torch.Tensor, mine: torch.Tensor, direction: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    """The rows ``mine`` alone moved along ``direction`` by ``by`` (a scalar): what an edit trained on
    the class's images alone does, the others left where they were."""
    out = x.clone()
    out[mine] = out[mine] + by * direction[None]
    return out


def edits(x: torch.Tensor, labels: torch.Tensor, held: torch.Tensor, held_labels: torch.Tensor,
          index: int) -> list[tuple[str, torch.Tensor]]:
    """The features ``x`` as they are and under each edit. The direction and the other classes'
    level come from ``held`` (other images of every class), never from the images the probe scores;
    the move of the class alone is the exception, by design: its size is the scored images' own
    offset, the best case for an edit of the class's images alone."""
    direction, level = class_direction(held, held_labels, index), held[held_labels != index].mean(0)
    mine = labels == index
    offset = ((x[mine].mean(0) - level) @ direction).item()
    return [("none", x),
            ("direction erased", scaled_along(x, direction, level, 0.0)),
            ("class alone moved to the others' level", moved(x, mine, direction, torch.tensor(-offset))),
            ("every component halved", scaled_along(x, direction, level, 0.5))]


def kept_accuracy(x: torch.Tensor, labels: torch.Tensor, index: int, weight: torch.Tensor,
                  bias: torch.Tensor) -> float:
    """Acc_r of a linear head on features, the class's logit masked: the other classes' images, each
    read as the best of the kept classes (oracle.py's Acc_r counts a guess of the class as wrong)."""
    logits = x @ weight.T + bias
    logits[:, index] = float("-inf")
    others = labels != index
    return round(100.0 * (logits[others].argmax(1) == labels[others]).float().mean().item(), 2)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


# --- one class ---------------------------------------------------------------------------------

def measure(data: Cifar10, model_dir: Path, anchor: Path, cls: str, forget_images: int, seed: int) -> dict[str, Any]:
    loaded = load_package(model_dir)
    card, index = loaded.card, loaded.card.class_index(cls)
    test, val = (read_images(str(data.half(h)), card.input) for h in ("test", "val"))
    labels, val_labels = test.label_indices(card.classes), val.label_indices(card.classes)
    test_pixels, val_pixels = normalise(test.pixels, card.input), normalise(val.pixels, card.input)
    forget_source = data.forget(cls, forget_images)
    forget_pixels = normalise(read_images(str(forget_source), card.input).pixels, card.input)

    models = {"original": build_model(card, loaded.state_dict).eval()}
    inputs = UnlearnInputs(model=str(model_dir), forget=(ForgetSpec(cls, str(forget_source)),))
    facts = forget_set_facts(str(model_dir), inputs.forget, with_row_cosine=True)[cls]
    service = unlearn(inputs, UnlearnConfig(seed=seed, **UnlearnSettings().engine_settings(facts.distinct, facts.row_cosine)))
    models["service"] = build_model(card, service.state_dict).eval()
    oracle_dir = cache_root() / f"cifar-vit-without-{cls}"
    if (oracle_dir / WEIGHTS_FILE).is_file():  # trained by cifar_oracle.py; never trained here
        oracle = load_package(oracle_dir)
        models["oracle"] = build_model(oracle.card, oracle.state_dict).eval()

    rows: list[dict[str, Any]] = []
    estimates: dict[str, float] = {}
    for name, model in models.items():
        x, held = features(model, test_pixels, BATCH), features(model, val_pixels, BATCH)
        w, b = model.head.weight.detach(), model.head.bias.detach()
        changed = edits(x, labels, held, val_labels, index)
        if name == "original":
            direction = class_direction(held, val_labels, index)  # the held-out direction the estimates are judged against
            forget_mean = features(model, forget_pixels, BATCH).mean(0)
            for source, estimate_level in _retain_free_levels(model, card, anchor, index, seed).items():
                estimate = _unit(forget_mean - estimate_level)
                estimates[source] = round(torch.dot(estimate, direction).item(), 3)
                changed.append((f"erased along forget mean - {source}", scaled_along(x, estimate, estimate_level, 0.0)))
        rows += [{"model": name, "edit": edit, "probe": round(probe_on_features(f, labels, index, seed=seed).accuracy, 1),
                  "acc_r": kept_accuracy(f, labels, index, w, b)} for edit, f in changed]
    return {"class": cls, "seed": seed, "forget_images": forget_images, "service_steps": service.report.steps,
            "direction_cosine": estimates, "rows": rows}


def _retain_free_levels(model: torch.nn.Module, card: ModelCard, anchor: Path, index: int, seed: int) -> dict[str, torch.Tensor]:
    """Estimates of the other classes' mean feature from what a run without retain data has."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(card.input.mean), *card.input.size)
    mean, std = torch.tensor(card.input.mean), torch.tensor(card.input.std)
    low, high = -mean / std, (1 - mean) / std
    kept = torch.tensor([c for c in range(len(card.classes)) if c != index]).repeat_interleave(SYNTHETIC_PER_CLASS)
    noise = low.view(1, -1, 1, 1) + (high - low).view(1, -1, 1, 1) * torch.rand((len(kept), *shape), generator=generator)
    anchor_pixels = normalise(read_images(str(anchor), card.input).pixels, card.input)
    synthetic = invert_classes(model, kept, shape, low, high, generator)
    return {"zero": torch.zeros(model.head.weight.shape[1]),
            "noise inputs": features(model, noise, BATCH).mean(0),
            "anchor photos": features(model, anchor_pixels, BATCH).mean(0),
            "synthetic inputs": features(model, synthetic, BATCH).mean(0)}


# --- the report --------------------------------------------------------------------------------

def render(records: list[dict[str, Any]]) -> str:
    lines = ["# Where the probe's residual knowledge sits (CIFAR-10 reference model)", "",
             "Probe: the engine's (cross-validated, standardised features) on the test half, scored on the class; "
             "Acc_r: the model's head on the changed features, the class's logit masked (not oracle.py's Acc_r). The direction: the class's "
             "mean feature minus the other classes', taken on the selection half (val).", ""]
    for record in records:
        lines += [f"## {record['class']} (seed {record['seed']}, {record['forget_images']} forget images, "
                  f"default run {record['service_steps']} steps)", "",
                  "| model | features | probe | Acc_r (class logit masked) |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['edit']} | {r['probe']:.1f} | {r['acc_r']:.1f} |" for r in record["rows"]]
        lines += ["", "Cosine of each retain-free estimate to the held-out direction: " + ", ".join(
            f"{k} {v:.2f}" for k, v in record["direction_cosine"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", nargs="+", default=["airplane"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--forget-images", type=int, default=500)
    parser.add_argument("--cifar", type=Path, default=SHARED / "datasets" / "cifar10")
    parser.add_argument("--cifar-model", type=Path, default=SHARED / "models" / "cifar10-vit-d6")
    parser.add_argument("--anchor", type=Path, default=SHARED / "datasets" / "yalefaces" / "train",
                        help="photos of none of the classes (oracle.py's CIFAR-10 anchor)")
    parser.add_argument("--out", type=Path, default=RESULTS / "probe_direction.json")
    args = parser.parse_args(argv)
    try:
        if not args.anchor.is_dir() or not args.cifar_model.is_dir():
            raise DataError(f"needs {args.cifar_model} and {args.anchor} (../shared)")
        data = Cifar10.open(args.cifar)
    except DataError as exc:
        print(f"probe_direction: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    records = [measure(data, args.cifar_model, args.anchor, c, args.forget_images, args.seed) for c in args.classes]
    args.out.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1), "records": records},
                                   indent=2) + "\n")
    text = render(records)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
