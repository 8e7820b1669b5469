"""Model packages: the card, the safetensors weights, building the network and writing a package."""

import copy
import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from worker.engine.errors import ConfigError, ModelPackageError
from worker.engine.package import (
    InputSpec,
    ModelCard,
    build_model,
    load_package,
    read_card,
    read_weights,
    write_package,
)

CARD = {
    "architecture": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2},
    "classes": ["a", "b", "c"],
    "input": {"size": [8, 8], "mean": [0.5], "std": [0.5], "channels": "L"},
}


def card(**changes) -> dict:
    """A copy of the tiny card with top-level fields replaced (``None`` removes a field)."""
    raw = copy.deepcopy(CARD)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def with_input(**changes) -> dict:
    return card(input={**CARD["input"], **changes})


def with_kwargs(**changes) -> dict:
    return card(kwargs={**CARD["kwargs"], **changes})


def tiny_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(CARD["architecture"], pretrained=False, num_classes=3, **CARD["kwargs"])
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_package(root: Path, raw_card=None, state_dict=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.json").write_text(json.dumps(CARD if raw_card is None else raw_card))
    save_file(tiny_state_dict() if state_dict is None else state_dict, str(root / "model.safetensors"))
    return root


def staging_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --- reading a valid package -------------------------------------------------------------------


def test_a_valid_card_parses_into_architecture_kwargs_classes_and_input():
    parsed = ModelCard.from_dict(card())
    assert parsed.architecture == "vit_tiny_patch16_224"
    assert parsed.kwargs == CARD["kwargs"]
    assert parsed.classes == ("a", "b", "c")
    assert parsed.input == InputSpec(size=(8, 8), mean=(0.5,), std=(0.5,), channels="L")


def test_channels_default_to_rgb_with_three_input_channels():
    raw = card(kwargs={k: v for k, v in CARD["kwargs"].items() if k != "in_chans"},
               input={"size": [8, 8], "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]})
    assert ModelCard.from_dict(raw).input.channels == "RGB"


def test_a_valid_package_loads_with_the_sha256_of_its_weights_file(tmp_path):
    root = make_package(tmp_path / "pkg")
    package = load_package(root)
    assert package.path == root
    assert package.card.classes == ("a", "b", "c")
    assert package.weights_sha256 == hashlib.sha256((root / "model.safetensors").read_bytes()).hexdigest()
    assert package.state_dict.keys() == tiny_state_dict().keys()


def test_build_model_gives_a_network_holding_exactly_the_saved_weights(tmp_path):
    saved = tiny_state_dict()
    package = load_package(make_package(tmp_path / "pkg", state_dict=saved))
    model = build_model(package.card, package.state_dict)
    assert not model.training
    built = model.state_dict()
    assert built.keys() == saved.keys()
    assert all(torch.equal(built[k], saved[k]) for k in saved)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_read_card_reads_a_card_file(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(card(about="a tiny model")))
    parsed = read_card(path)
    assert parsed.classes == ("a", "b", "c")
    assert parsed.raw["about"] == "a tiny model"


# --- invalid cards -----------------------------------------------------------------------------


def test_a_card_that_is_not_json_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "model.json"
    path.write_text("{architecture: vit")
    with pytest.raises(ModelPackageError, match=r"model\.json: not a readable JSON card"):
        read_card(path)


def test_a_card_that_is_not_a_json_object_is_refused():
    with pytest.raises(ModelPackageError, match="the card must be a JSON object"):
        ModelCard.from_dict(["vit_tiny_patch16_224"])


@pytest.mark.parametrize("raw, message", [
    (card(architecture=None), "card field 'architecture' must name a timm architecture"),
    (card(architecture=""), "card field 'architecture' must name a timm architecture"),
    (card(kwargs=[1, 2]), "card field 'kwargs' must be an object"),
    (card(classes=None), "card field 'classes' must be a non-empty list of class names"),
    (card(classes=[]), "card field 'classes' must be a non-empty list of class names"),
    (card(classes=["a", ""]), "card field 'classes' must be a non-empty list of class names"),
    (card(classes=["a", "b", "a"]), "card field 'classes' has duplicate names"),
    (card(input=None), "card field 'input' must be an object"),
    (with_input(size=[8]), r"card input\.size must be \[height, width\] in pixels, got \[8\]"),
    (with_input(size=[8, 0]), r"card input\.size must be \[height, width\] in pixels"),
    (with_input(size=[8, 8.5]), r"card input\.size must be \[height, width\] in pixels"),
    (with_input(mean=[0.5, 0.5, 0.5]), r"card input\.mean must list 1 numbers for L, got \[0\.5, 0\.5, 0\.5\]"),
    (with_input(std=["x"]), r"card input\.std must list 1 numbers for L"),
    (with_input(std=[0]), r"card input\.std must be positive, got \[0\]"),
    (with_input(std=[-0.5]), r"card input\.std must be positive"),
    (with_input(channels="CMYK"), r"card input\.channels must be one of \['L', 'RGB'\], got 'CMYK'"),
    (with_kwargs(in_chans=3), r"card input\.channels 'L' gives 1 channels but the model takes in_chans=3"),
    (with_kwargs(num_classes=3), "card kwargs may not set num_classes"),
    (with_kwargs(pretrained=True), "card kwargs may not set num_classes .* or pretrained"),
    (with_input(size=[True, 8]), r"card input\.size must be \[height, width\] in pixels"),
    (with_input(std=[float("nan")]), r"card input\.std must list 1 numbers for L"),
    (with_input(mean=[float("inf")]), r"card input\.mean must list 1 numbers for L"),
    (card(lineage={"classes_forgotten": ["a"]}), "card field 'lineage' must be a list of objects"),
    (card(lineage=["a"]), "card field 'lineage' must be a list of objects"),
])
def test_an_invalid_card_is_refused_with_a_helpful_message(raw, message):
    with pytest.raises(ModelPackageError, match=message):
        ModelCard.from_dict(raw)


def test_an_invalid_card_in_a_package_fails_the_load(tmp_path):
    root = make_package(tmp_path / "pkg", raw_card=card(classes=["a", "a", "b"]))
    with pytest.raises(ModelPackageError, match="duplicate names"):
        load_package(root)


# --- architectures and weights -----------------------------------------------------------------


def test_an_unknown_architecture_is_refused():
    with pytest.raises(ModelPackageError, match="unknown timm architecture 'no_such_net'"):
        build_model(ModelCard.from_dict(card(architecture="no_such_net")), tiny_state_dict())


def test_kwargs_the_architecture_cannot_take_are_refused():
    parsed = ModelCard.from_dict(with_kwargs(embed_dim=30, num_heads=4))  # 30 is not divisible by 4
    with pytest.raises(ModelPackageError, match="cannot build vit_tiny_patch16_224 with kwargs"):
        build_model(parsed, tiny_state_dict())


def test_weights_missing_a_key_are_refused_naming_the_key():
    weights = tiny_state_dict()
    del weights["head.bias"]
    with pytest.raises(ModelPackageError, match=r"weights do not fit vit_tiny_patch16_224 .*: missing head\.bias$"):
        build_model(ModelCard.from_dict(card()), weights)


def test_weights_with_an_extra_key_are_refused_naming_the_key():
    weights = {**tiny_state_dict(), "extra.weight": torch.zeros(2)}
    with pytest.raises(ModelPackageError, match=r"unexpected extra\.weight$"):
        build_model(ModelCard.from_dict(card()), weights)


def test_weights_of_the_wrong_shape_are_refused_naming_the_key():
    weights = tiny_state_dict()
    weights["head.weight"] = torch.zeros(4, 32)  # a four-class head for a three-class card
    with pytest.raises(ModelPackageError, match=r"wrong shape head\.weight$"):
        build_model(ModelCard.from_dict(card()), weights)


def test_many_misfitting_keys_are_previewed_with_a_count():
    weights = {f"extra.{i}": torch.zeros(1) for i in range(6)} | tiny_state_dict()
    with pytest.raises(ModelPackageError, match=r"unexpected extra\.0, extra\.1, extra\.2, extra\.3 \(\+2 more\)"):
        build_model(ModelCard.from_dict(card()), weights)


def test_a_pickle_named_model_safetensors_is_refused(tmp_path):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "model.json").write_text(json.dumps(CARD))
    torch.save(tiny_state_dict(), root / "model.safetensors")
    with pytest.raises(ModelPackageError, match=r"model\.safetensors: not a safetensors file"):
        load_package(root)


def test_a_truncated_weights_file_is_refused(tmp_path):
    root = make_package(tmp_path / "pkg")
    data = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelPackageError, match="not a safetensors file"):
        read_weights(root / "model.safetensors")


def test_a_missing_weights_file_is_refused(tmp_path):
    root = make_package(tmp_path / "pkg")
    (root / "model.safetensors").unlink()
    with pytest.raises(ModelPackageError, match=r"model\.safetensors: weights file not found"):
        load_package(root)


def test_a_missing_card_is_refused(tmp_path):
    root = make_package(tmp_path / "pkg")
    (root / "model.json").unlink()
    with pytest.raises(ModelPackageError, match=r"model\.json: card not found"):
        load_package(root)


def test_a_missing_package_folder_is_refused(tmp_path):
    with pytest.raises(ModelPackageError, match="model package folder not found"):
        load_package(tmp_path / "nope")


# --- classes and lineage -----------------------------------------------------------------------


def test_class_index_gives_the_position_of_a_class():
    assert ModelCard.from_dict(card()).class_index("c") == 2


def test_class_index_of_an_unknown_class_lists_the_classes():
    with pytest.raises(ConfigError, match="class 'z' is not one of the model's classes: a, b, c"):
        ModelCard.from_dict(card()).class_index("z")


def test_with_lineage_appends_entries_in_order_without_changing_the_card():
    original = ModelCard.from_dict(card(lineage=[{"method": "first"}]))
    before = copy.deepcopy(original.raw)
    updated = original.with_lineage({"method": "second"})
    assert updated["lineage"] == [{"method": "first"}, {"method": "second"}]
    assert original.raw == before
    assert ModelCard.from_dict(updated).with_lineage({"method": "third"})["lineage"] == [
        {"method": "first"}, {"method": "second"}, {"method": "third"}]


def test_with_lineage_starts_a_lineage_on_a_card_without_one():
    original = ModelCard.from_dict(card())
    assert original.with_lineage({"method": "x"})["lineage"] == [{"method": "x"}]
    assert "lineage" not in original.raw


def test_with_lineage_copies_deeply_so_edits_to_the_result_do_not_reach_the_card():
    original = ModelCard.from_dict(card(lineage=[{"classes_forgotten": ["a"]}]))
    updated = original.with_lineage({"classes_forgotten": ["b"]})
    updated["lineage"][0]["classes_forgotten"].append("c")
    assert original.raw["lineage"] == [{"classes_forgotten": ["a"]}]


def test_forgotten_classes_union_the_lineage_in_order():
    raw = card(lineage=[{"classes_forgotten": ["b"]}, {"method": "noop"}, {"classes_forgotten": ["a", "b"]}])
    assert ModelCard.from_dict(raw).forgotten_classes == ["b", "a"]


def test_a_card_without_lineage_has_forgotten_no_classes():
    assert ModelCard.from_dict(card()).forgotten_classes == []


# --- writing a package -------------------------------------------------------------------------


def test_write_package_writes_weights_and_card_and_returns_the_weights_sha256(tmp_path):
    out = tmp_path / "out" / "pkg"
    digest = write_package(out, card(about="written"), tiny_state_dict())
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert digest == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((out / "model.json").read_text())["about"] == "written"
    assert load_package(out).weights_sha256 == digest
    assert staging_leftovers(out.parent) == []


def test_a_written_package_round_trips_through_load_and_build(tmp_path):
    saved = tiny_state_dict()
    write_package(tmp_path / "pkg", card(), saved)
    package = load_package(tmp_path / "pkg")
    built = build_model(package.card, package.state_dict).state_dict()
    assert all(torch.equal(built[k], saved[k]) for k in saved)


def test_write_package_refuses_a_non_empty_folder_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ModelPackageError, match="output folder exists and is not empty"):
        write_package(out, card(), tiny_state_dict())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert staging_leftovers(tmp_path) == []


def test_write_package_refuses_an_existing_file_at_the_output_path(tmp_path):
    out = tmp_path / "pkg"
    out.write_text("a file")
    with pytest.raises(ModelPackageError, match="output folder exists and is not empty"):
        write_package(out, card(), tiny_state_dict())
    assert out.read_text() == "a file"


def test_write_package_accepts_an_existing_empty_folder(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    write_package(out, card(), tiny_state_dict())
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert staging_leftovers(tmp_path) == []


def test_a_failed_write_leaves_no_package_and_no_staging_folder(tmp_path):
    out = tmp_path / "pkg"
    with pytest.raises(TypeError):
        write_package(out, card(about=object()), tiny_state_dict())  # the card is not JSON-serialisable
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_into_an_empty_folder_leaves_that_folder_as_it_was(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    with pytest.raises(AttributeError):
        write_package(out, card(), {"weight": "not a tensor"})
    assert out.is_dir() and list(out.iterdir()) == []
    assert staging_leftovers(tmp_path) == []


def test_a_card_does_not_change_when_the_dict_it_came_from_does():
    raw = card()
    parsed = ModelCard.from_dict(raw)
    raw["lineage"] = [{"classes_forgotten": ["a"]}]
    raw["kwargs"]["depth"] = 12
    assert parsed.forgotten_classes == [] and parsed.kwargs["depth"] == 1


def test_a_written_package_is_as_readable_as_any_new_folder(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        write_package(tmp_path / "out", card(), tiny_state_dict())
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (tmp_path / "out").iterdir())


def test_kwargs_that_make_timm_read_files_are_refused():
    with pytest.raises(ModelPackageError, match="may not set checkpoint_path"):
        ModelCard.from_dict(with_kwargs(checkpoint_path="/etc/passwd"))


def test_an_input_size_the_network_cannot_take_is_refused_at_load(tmp_path):
    package = make_package(tmp_path / "pkg", raw_card=with_input(size=[16, 16]))
    loaded = load_package(package)
    with pytest.raises(ModelPackageError, match="16x16 L input does not go through"):
        build_model(loaded.card, loaded.state_dict)
