"""The evaluation set cut in two by its images' content: a selection half chooses the checkpoint, an
audit half judges it. And the forget set's digest, which a requester recomputes from their files."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from worker.engine import ConfigError, ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn
from worker.engine.halves import split_halves
from worker.engine.images import read_images, set_digest
from worker.engine.package import load_package
from worker.engine.unlearn import read_forget_set


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_split_follows_the_images_content_not_their_order():
    labels = [str(i % 3) for i in range(60)]
    hashes = [digest(f"image {i}") for i in range(60)]
    audit = dict(zip(hashes, split_halves(labels, hashes).audit.tolist()))
    order = list(range(60))
    random.Random(0).shuffle(order)
    shuffled = split_halves([labels[i] for i in order], [hashes[i] for i in order]).audit.tolist()
    assert shuffled == [audit[hashes[i]] for i in order]


def test_each_class_is_split_evenly_the_audit_half_first():
    labels = ["a"] * 7 + ["b"] * 4 + ["c"]
    halves = split_halves(labels, [digest(str(i)) for i in range(len(labels))])
    audited = Counter(label for label, a in zip(labels, halves.audit.tolist()) if a)
    assert audited == {"a": 4, "b": 2, "c": 1}  # a class of one image is audited, not selected on
    assert halves.selection.sum() == len(labels) - halves.audit.sum()


def test_copies_of_one_file_share_a_half():
    hashes = [digest(str(i)) for i in range(10)]
    labels = ["a"] * 10
    with_copies = split_halves(labels + ["a"] * 3, hashes + hashes[:3]).audit.tolist()
    assert with_copies[10:] == with_copies[:3]
    assert with_copies[:10] == split_halves(labels, hashes).audit.tolist()  # copies move no other image


def test_a_label_and_a_digest_are_needed_per_image():
    with pytest.raises(ValueError):
        split_halves(["a", "b"], [digest("x")])


def copy_renamed(source: Path, target: Path) -> None:
    """The same images under other names, in another order on disk."""
    for cls in sorted(p.name for p in source.iterdir()):
        (target / cls).mkdir(parents=True)
        for i, image in enumerate(sorted((source / cls).iterdir(), reverse=True)):
            shutil.copy(image, target / cls / f"renamed-{i:04d}{image.suffix}")


def halves_by_file(folder: Path, spec) -> dict[str, bool]:
    images = read_images(str(folder), spec)
    return dict(zip(images.sha256, split_halves(images.labels, images.sha256).audit.tolist()))


def test_renaming_and_reordering_the_files_moves_no_image_to_the_other_half(digits, digits_model, tmp_path):
    spec = load_package(digits_model).card.input
    copy_renamed(digits.test, tmp_path / "renamed")
    assert halves_by_file(tmp_path / "renamed", spec) == halves_by_file(digits.test, spec)


def test_a_run_selects_on_one_half_and_reports_on_the_other(digits, digits_model):
    inputs = UnlearnInputs(model=str(digits_model), forget=(ForgetSpec("3", str(digits.train_class("3"))),),
                           eval_source=str(digits.test))
    total = len(read_images(str(digits.test), load_package(digits_model).card.input))
    config = UnlearnConfig(method="lora-kl", adapter_blocks="later-half", select_on_eval=True, eval_halves=True,
                           max_steps=5, patience=1)
    report = unlearn(inputs, config).report
    assert report.evaluation.half == "audit" and report.selection["half"] == "selection"
    assert report.evaluation.images + report.selection["images"] == total
    assert abs(report.evaluation.images - report.selection["images"]) <= 10  # one image per class at most
    whole = unlearn(inputs, UnlearnConfig(method="lora-kl", adapter_blocks="later-half", select_on_eval=True,
                                          max_steps=5, patience=1)).report
    assert whole.evaluation.half == "whole" and whole.evaluation.images == whole.selection["images"] == total


def test_halves_need_an_evaluation_set(digits, digits_model):
    inputs = UnlearnInputs(model=str(digits_model), forget=(ForgetSpec("3", str(digits.train_class("3"))),))
    with pytest.raises(ConfigError, match="eval_halves"):
        unlearn(inputs, UnlearnConfig(eval_halves=True))


# --- the forget set's digest ---------------------------------------------------------------------

def test_the_digest_ignores_order_names_and_copies():
    hashes = [digest(str(i)) for i in range(5)]
    assert set_digest(hashes) == set_digest(list(reversed(hashes)) + hashes[:2])
    assert set_digest(hashes) != set_digest(hashes[:4])


def test_a_requester_recomputes_the_digest_from_their_files_with_coreutils(digits, digits_model, tmp_path):
    if shutil.which("sha256sum") is None:
        pytest.skip("coreutils' sha256sum is not installed")
    folder = digits.train_class("3")
    shell = f"sha256sum {folder}/* | cut -c1-64 | sort -u | sha256sum"
    by_coreutils = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True).stdout.split()[0]
    report = unlearn(UnlearnInputs(model=str(digits_model), forget=(ForgetSpec("3", str(folder)),)),
                     UnlearnConfig(method="lora-kl", adapter_blocks="later-half", max_steps=1)).report
    assert report.forget_set_sha256 == {"3": by_coreutils}


def test_the_digest_covers_every_file_read_even_a_copy_dropped_before_training(digits, digits_model, tmp_path):
    """A re-encoded copy (same pixels, other bytes) is trained on once but was given, so it is in the digest."""
    folder = tmp_path / "3"
    shutil.copytree(digits.train_class("3"), folder)
    first = sorted(folder.iterdir())[0]
    with Image.open(first) as image:
        image.save(folder / "re-encoded.png", compress_level=0)
    assert (folder / "re-encoded.png").read_bytes() != first.read_bytes()
    files = [hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()]
    given = read_forget_set(ForgetSpec("3", str(folder)), load_package(digits_model).card.input)
    assert given.duplicates == 1 and len(given.sha256) == len(files) - 1
    assert given.digest == set_digest(files)
