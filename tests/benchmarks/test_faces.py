"""benchmarks/faces.py: the Yale faces sets, fixed by file name, and a tiny build of the face model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import faces
from benchmarks.faces import DataError, YaleFaces, build_face_model
from tests.conftest import SHARED
from worker.engine.images import read_images
from worker.engine.package import build_model, load_package

PEOPLE = tuple(f"subject{i:02d}" for i in range(1, 16))


@pytest.fixture(scope="module")
def data(bench_cache: Path) -> YaleFaces:
    path = SHARED / "datasets" / "yalefaces"
    if not (path / "train").is_dir():
        pytest.skip(f"needs the shared Yale faces at {path} (only in the team's checkouts)")
    return YaleFaces.open(path)


@pytest.fixture(scope="module")
def tiny_model(data: YaleFaces, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_face_model(data, tmp_path_factory.mktemp("faces") / "pkg", epochs=1)


def rows(manifest: Path) -> list[tuple[str, str]]:
    with open(manifest, newline="") as f:
        return [(r["path"], r["label"]) for r in csv.DictReader(f)]


def test_the_people_are_the_train_folders(data):
    assert data.classes == PEOPLE


def test_the_forget_sets_are_the_first_train_images_of_the_person_by_name(data):
    every = rows(data.forget("subject03"))
    assert len(every) == 9 and all(label == "" and path.startswith("train/subject03/") for path, label in every)
    assert [p for p, _ in every] == sorted(p for p, _ in every)
    assert rows(data.forget("subject03", 7)) == every[:7]


def test_the_held_back_images_are_the_rest_of_the_persons_train_images_labelled(data):
    held = rows(data.held_back("subject03", keep=7))
    assert len(held) == 2 and all(label == "subject03" for _, label in held)
    assert {p for p, _ in held} | {p for p, _ in rows(data.forget("subject03", 7))} == {p for p, _ in
                                                                                         rows(data.forget("subject03"))}
    assert not {p for p, _ in held} & {p for p, _ in rows(data.forget("subject03", 7))}
    with pytest.raises(DataError, match="keep must be 1..8"):
        data.held_back("subject03", keep=9)


def test_test_and_train_are_labelled_with_every_person(data):
    test, train = rows(data.test()), rows(data.train())
    assert len(test) == 30 and len(train) == 135
    assert all(sum(label == p for _, label in test) == 2 for p in PEOPLE)
    assert all(sum(label == p for _, label in train) == 9 for p in PEOPLE)


def test_a_missing_or_malformed_folder_or_person_is_a_clear_error(data, tmp_path):
    with pytest.raises(DataError, match="Yale faces folder not found"):
        YaleFaces.open(tmp_path / "nowhere")
    (tmp_path / "bad" / "train" / "subject01").mkdir(parents=True)
    (tmp_path / "bad" / "test").mkdir()
    with pytest.raises(DataError, match="subject01 has none"):
        YaleFaces.open(tmp_path / "bad")
    with pytest.raises(DataError, match="no person 'subject99'"):
        data.forget("subject99")
    assert faces.main(["--data", str(tmp_path / "nowhere")]) == 2


def test_a_tiny_build_writes_a_loadable_package_that_reads_the_sets(data, tiny_model):
    package = load_package(tiny_model)
    assert package.card.classes == PEOPLE and package.card.input.channels == "L"
    about = package.card.raw["about"]
    assert about["recipe"]["epochs"] == 1 and set(about["test_accuracy_per_person"]) == set(PEOPLE)
    model = build_model(package.card, package.state_dict)
    images = read_images(str(data.forget("subject01", 7)), package.card.input)
    assert tuple(images.pixels.shape) == (7, 1, *package.card.input.size)
    assert model(images.pixels.float()).shape == (7, 15)
    test = read_images(str(data.test()), package.card.input)
    assert test.label_indices(package.card.classes).bincount().tolist() == [2] * 15


def test_a_built_package_is_found_again_and_never_overwritten_by_another_recipe(data, tiny_model, capsys):
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert build_face_model(data, tiny_model, epochs=1) == tiny_model
    assert (tiny_model / "model.safetensors").read_bytes() == weights
    with pytest.raises(DataError, match="another recipe"):
        build_face_model(data, tiny_model, epochs=2)
    assert faces.main(["--out", str(tiny_model), "--seed", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"faces.py: {tiny_model}")
    assert json.loads((tiny_model / "model.json").read_text())["about"]["recipe"]["seed"] == 0
