"""benchmarks/cifar.py: the image sets every benchmark run reads, fixed by seeds, extracted once."""

from __future__ import annotations

import csv
import tarfile
from pathlib import Path

import pytest

from benchmarks.cifar import Cifar10, DataError
from tests.benchmarks.conftest import write_archives

CLASSES = ("ant", "bee", "cow")


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cifar10:
    monkeypatch.setenv("LETHE_BENCH_CACHE", str(tmp_path / "cache"))
    return Cifar10.open(write_archives(tmp_path / "archives", CLASSES, train=6, test=4))


def rows(manifest: Path) -> list[tuple[str, str]]:
    with open(manifest, newline="") as f:
        return [(r["path"], r["label"]) for r in csv.DictReader(f)]


def test_the_classes_are_the_train_archives_folders(data):
    assert data.classes == CLASSES


def test_the_forget_set_is_the_first_images_of_the_class_by_name(data):
    assert [p for p, _ in rows(data.forget("bee", 3))] == ["train/bee/0000.jpg", "train/bee/0001.jpg",
                                                           "train/bee/0002.jpg"]
    assert len(rows(data.forget("bee", None))) == 6


def test_the_retain_sample_holds_no_image_of_the_forgotten_class_and_never_changes(data):
    first = rows(data.retain("ant", count=5))
    assert len(first) == 5 and all(label != "ant" and path.startswith("train/") for path, label in first)
    assert rows(data.retain("ant", count=5)) == first
    assert rows(data.retain("cow", count=5)) != first


def test_the_halves_cut_every_class_of_the_test_split_into_two_disjoint_fixed_halves(data):
    val, test = rows(data.half("val")), rows(data.half("test"))
    assert not set(val) & set(test)
    assert len(val) + len(test) == 3 * 4
    assert all(sum(label == c for _, label in half) == 2 for half in (val, test) for c in CLASSES)
    assert rows(data.half("val")) == val
    assert len(rows(data.half("test", per_class=1))) == 3


def test_the_archives_are_extracted_once(data, tmp_path, monkeypatch):
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("extracted again"))
    assert Cifar10.open(tmp_path / "archives") == data


def test_other_archives_get_a_cache_of_their_own(data, tmp_path):
    other = Cifar10.open(write_archives(tmp_path / "other", ("elk", "owl"), train=2, test=2))
    assert other.classes == ("elk", "owl") and other.root != data.root
    assert Cifar10.open(tmp_path / "archives").classes == CLASSES


def test_a_forget_set_of_no_images_is_refused_and_never_named_like_the_whole_class(data):
    with pytest.raises(DataError, match="at least one image"):
        data.forget("bee", 0)
    assert data.forget("bee", None).name == "forget-bee-all.csv"


def test_a_missing_archive_or_class_is_a_clear_error(tmp_path, monkeypatch, data):
    monkeypatch.setenv("LETHE_BENCH_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match=r"train\.tar: not found \(pass --data\)"):
        Cifar10.open(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no class 'yak'"):
        data.forget("yak", 3)
