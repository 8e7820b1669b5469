"""A CIFAR-10 oracle: the reference package's recipe (its card's ``about.train``) retrained from
scratch on the train split without one class. The head keeps the class's logit, which no image is
labelled with (it gets only the recipe's label smoothing, as every wrong class does). The oracle
benchmark (oracle.py) measures the service's model against it.

    .venv/bin/python benchmarks/cifar_oracle.py --without airplane --threads 2

About 76 minutes on 2 CPU cores (18 epochs of 40,500 images, 228-308 s each with bf16 autocast on
an AVX-512 CPU). Each epoch is checkpointed beside the package, so a run that is stopped resumes where
it was; the package lands in the cache (LETHE_BENCH_CACHE), never in git.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.cifar import Cifar10, DataError, cache_root  # noqa: E402
from benchmarks.recipes import warmup_cosine  # noqa: E402
from worker.engine.images import normalise, read_images  # noqa: E402
from worker.engine.package import CARD_FILE, WEIGHTS_FILE, ModelCard, load_package, write_package  # noqa: E402
from worker.engine.runtime import Runtime, pick_runtime  # noqa: E402

# The recipe this trainer implements, as the reference card words it.
AUGMENT = "reflect-pad 4 random crop, horizontal flip"
OPTIMIZER = "AdamW, warm-up 2 epochs then cosine"
WARMUP_EPOCHS = 2
PAD = 4
RECIPE_KEYS = ("epochs", "batch", "lr", "weight_decay", "label_smoothing")


def recipe_of(card: dict[str, Any]) -> dict[str, Any]:
    """The card's training recipe, refused unless it is the one this trainer implements."""
    recipe = card.get("about", {}).get("train")
    if not isinstance(recipe, dict):
        raise DataError("the package's card has no training recipe (about.train)")
    if recipe.get("augment") != AUGMENT or recipe.get("optimizer") != OPTIMIZER:
        raise DataError(f"the card's recipe ({recipe.get('optimizer')!r}, {recipe.get('augment')!r}) is not the "
                        f"one this trainer implements ({OPTIMIZER!r}, {AUGMENT!r})")
    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise DataError(f"the card's recipe (about.train) lacks {', '.join(missing)}")
    return {k: recipe[k] for k in (*RECIPE_KEYS, "augment", "optimizer")}


def build_oracle(data: Cifar10, reference: Path, without: str, *, seed: int = 0, threads: int = 2,
                 out_dir: Path | None = None) -> Path:
    """Train the reference's recipe without ``without`` and write it as a package. A package (or a
    stopped run's checkpoint) already there is used only if it came from the same reference weights,
    recipe and seed."""
    loaded = load_package(reference)
    card = json.loads((Path(reference) / CARD_FILE).read_text())
    source = {"reference_weights_sha256": loaded.weights_sha256, "recipe": recipe_of(card) | {"seed": seed}}
    if without not in card["classes"]:
        raise DataError(f"no class {without!r} in the reference model (classes: {', '.join(card['classes'])})")
    out = out_dir or cache_root() / f"cifar-vit-without-{without}{f'-s{seed}' if seed else ''}"
    if (out / WEIGHTS_FILE).is_file():
        _same_source(json.loads((out / CARD_FILE).read_text()).get("about", {}), source, out)
        return out
    torch.set_num_threads(threads)
    runtime = pick_runtime("auto", "auto")
    images = read_images(str(data.train_without(without)), loaded.card.input)
    x, y = images.pixels, images.label_indices(loaded.card.classes)  # uint8 (N, C, H, W); labels among all 10
    checkpoints = out.with_name(out.name + ".checkpoint")
    started = time.perf_counter()
    model = _train(loaded.card, x, y, source, runtime, checkpoints)
    card["about"] = {
        "dataset": f"CIFAR-10 train split without {without} ({len(x)} images), from scratch: an oracle",
        **source, "train": source["recipe"] | {
            "precision": "bf16 autocast" if runtime.autocast_dtype == torch.bfloat16 else "fp32"},
        "training_seconds": round(time.perf_counter() - started, 1), "threads": threads,
        "test_accuracy_per_class": _per_class(model, loaded.card, data, runtime),
    }
    write_package(out, card, model.state_dict())
    shutil.rmtree(checkpoints, ignore_errors=True)
    return out


def _same_source(found: dict[str, Any], source: dict[str, Any], where: Path) -> None:
    if {k: found.get(k) for k in source} != source:
        raise DataError(f"{where}: trained from another reference, recipe or seed; remove it to train this one")


def _train(card: ModelCard, x: torch.Tensor, y: torch.Tensor, source: dict[str, Any], runtime: Runtime,
           checkpoints: Path) -> torch.nn.Module:
    import timm

    recipe = source["recipe"]
    torch.manual_seed(recipe["seed"])
    model = timm.create_model(card.architecture, pretrained=False, num_classes=len(card.classes), **card.kwargs)
    model.to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    per_epoch = -(-len(x) // recipe["batch"])
    schedule = warmup_cosine(optimizer, WARMUP_EPOCHS * per_epoch, recipe["epochs"] * per_epoch)
    generator = torch.Generator().manual_seed(recipe["seed"])
    first = 0
    state_file = checkpoints / "state.pt"
    if state_file.is_file():  # resume: the same run, from the end of its last whole epoch
        state = torch.load(state_file, weights_only=False)
        _same_source(state, source, state_file)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        first = state["epoch"]
    for epoch in range(first, recipe["epochs"]):
        model.train()
        started, total_loss = time.perf_counter(), 0.0
        for batch in torch.randperm(len(x), generator=generator).split(recipe["batch"]):
            inputs = normalise(_augment(x[batch], generator), card.input).to(runtime.device)
            with runtime.autocast():
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), y[batch].to(runtime.device),
                                   label_smoothing=recipe["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        checkpoints.mkdir(parents=True, exist_ok=True)
        torch.save({**source, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "generator": generator.get_state(), "epoch": epoch + 1},
                   checkpoints / "state.tmp")
        (checkpoints / "state.tmp").replace(state_file)  # a run stopped mid-write keeps the last whole epoch
        print(f"epoch {epoch + 1}/{recipe['epochs']}: loss {total_loss / len(x):.4f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return model.eval()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Reflect-pad by 4, a random crop of the original size, a horizontal flip with probability 1/2:
    uint8 in, uint8 out."""
    n, _, h, w = x.shape
    padded = F.pad(x.float(), (PAD, PAD, PAD, PAD), mode="reflect")
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    crops = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=g) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops.round().to(torch.uint8)


@torch.no_grad()
def _per_class(model: torch.nn.Module, card: ModelCard, data: Cifar10, runtime: Runtime) -> dict[str, float]:
    """Percent right per class on the test split's reported half (the oracle benchmark's audit set)."""
    images = read_images(str(data.half("test")), card.input)
    y = images.label_indices(card.classes)
    predicted = torch.cat([model(normalise(images.pixels[s:s + 500], card.input).to(runtime.device)).argmax(1).cpu()
                           for s in range(0, len(y), 500)])
    return {c: round(100 * (predicted[y == i] == i).float().mean().item(), 1) for i, c in enumerate(card.classes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cifar10")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "cifar10-vit-d6")
    parser.add_argument("--without", default="airplane")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        out = build_oracle(Cifar10.open(args.data), args.model, args.without, seed=args.seed, threads=args.threads)
    except DataError as exc:
        print(f"cifar_oracle.py: {exc}", file=sys.stderr)
        return 2
    about = json.loads((out / CARD_FILE).read_text())["about"]
    print(f"{out}\n{json.dumps(about['test_accuracy_per_class'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
