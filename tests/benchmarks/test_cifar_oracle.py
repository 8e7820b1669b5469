"""benchmarks/cifar_oracle.py: the reference card's recipe, retrained without one class, resumable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import cifar_oracle
from benchmarks.cifar import Cifar10, DataError
from tests.benchmarks.conftest import write_archives
from worker.engine.package import CARD_FILE, load_package, write_package

CLASSES = ("ant", "bee", "cow")
RECIPE = {"epochs": 2, "batch": 4, "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1,
          "augment": cifar_oracle.AUGMENT, "optimizer": cifar_oracle.OPTIMIZER, "seed": 0}


def reference_card(recipe: dict | None = None) -> dict:
    card = {"architecture": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
            "classes": list(CLASSES),
            "input": {"size": [8, 8], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channels": "RGB"}}
    return card | ({"about": {"train": recipe}} if recipe is not None else {})


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cifar10:
    monkeypatch.setenv("LETHE_BENCH_CACHE", str(tmp_path / "cache"))
    return Cifar10.open(write_archives(tmp_path / "archives", CLASSES, train=6, test=4))


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    import timm

    card = reference_card({k: v for k, v in RECIPE.items() if k != "seed"})
    model = timm.create_model(card["architecture"], num_classes=len(CLASSES), **card["kwargs"])
    write_package(tmp_path / "reference", card, model.state_dict())
    return tmp_path / "reference"


def test_the_oracle_is_the_cards_recipe_on_every_class_but_one_and_keeps_every_logit(data, reference, tmp_path):
    out = cifar_oracle.build_oracle(data, reference, "bee", threads=1, out_dir=tmp_path / "oracle")
    oracle, original = load_package(out), load_package(reference)
    assert oracle.card.classes == CLASSES  # the head keeps the class: no image is labelled with it
    with open(data.train_without("bee"), newline="") as f:
        labels = {row["label"] for row in csv.DictReader(f)}
    assert labels == {"ant", "cow"}
    assert any(not torch.equal(oracle.state_dict[k], original.state_dict[k]) for k in original.state_dict)
    about = json.loads((out / CARD_FILE).read_text())["about"]
    assert about["reference_weights_sha256"] == original.weights_sha256 and "without bee" in about["dataset"]
    assert set(about["test_accuracy_per_class"]) == set(CLASSES)
    assert not (tmp_path / "oracle.checkpoint").exists()  # the checkpoints go once the package is written
    assert cifar_oracle.build_oracle(data, reference, "bee", out_dir=tmp_path / "oracle") == out  # cached
    with pytest.raises(DataError, match="another reference, recipe or seed"):
        cifar_oracle.build_oracle(data, reference, "bee", seed=1, out_dir=tmp_path / "oracle")


def _source(reference: Path) -> dict:
    return {"reference_weights_sha256": load_package(reference).weights_sha256, "recipe": RECIPE}


def test_a_stopped_training_resumes_as_if_it_had_never_stopped(reference, tmp_path, monkeypatch):
    package = load_package(reference)
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 2] * 4)
    runtime = cifar_oracle.pick_runtime("cpu", "fp32")
    source = _source(reference)
    whole = cifar_oracle._train(package.card, images, labels, source, runtime, tmp_path / "whole")

    class Stopped(Exception):
        pass

    def stop_after_the_first_epoch(message, **_):
        if message.startswith("epoch 1/"):
            raise Stopped

    monkeypatch.setattr(cifar_oracle, "print", stop_after_the_first_epoch, raising=False)
    with pytest.raises(Stopped):
        cifar_oracle._train(package.card, images, labels, source, runtime, tmp_path / "stopped")
    monkeypatch.undo()
    resumed = cifar_oracle._train(package.card, images, labels, source, runtime, tmp_path / "stopped")
    assert torch.load(tmp_path / "stopped" / "state.pt", weights_only=False)["epoch"] == 2
    for name, weights in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], weights), name
    with pytest.raises(DataError, match="another reference, recipe or seed"):
        cifar_oracle._train(package.card, images, labels, source | {"recipe": RECIPE | {"lr": 1e-2}}, runtime,
                            tmp_path / "stopped")


def test_a_card_without_this_recipe_is_refused(data, tmp_path):
    for name, card in (("none", reference_card(None)),
                       ("other", reference_card(RECIPE | {"augment": "RandAugment"})),
                       ("short", reference_card({k: v for k, v in RECIPE.items() if k != "lr"}))):
        write_package(tmp_path / name, card, {})
        with pytest.raises(DataError, match="recipe"):
            cifar_oracle.build_oracle(data, tmp_path / name, "bee", out_dir=tmp_path / f"{name}-oracle")


def test_a_class_the_reference_lacks_is_refused(data, reference, tmp_path):
    with pytest.raises(DataError, match="no class 'elk'"):
        cifar_oracle.build_oracle(data, reference, "elk", out_dir=tmp_path / "oracle")


def test_each_augmented_image_is_a_crop_of_the_reflect_padded_image_flipped_or_not():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    views = cifar_oracle._augment(images, torch.Generator().manual_seed(0))
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")
    flipped = 0
    for view, pad in zip(views.float(), padded):
        crops = [pad[:, y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
        plain = any(torch.equal(view, c) for c in crops)
        mirrored = any(torch.equal(view, c.flip(-1)) for c in crops)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert views.dtype == torch.uint8 and 0 < flipped < 32
