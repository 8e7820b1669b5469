"""Model packages: a folder with ``model.safetensors`` (the state dict) and ``model.json`` (the card).

The card says how to build the network (``timm.create_model(architecture, num_classes=len(classes),
**kwargs)``), what each output logit means (``classes[i]``) and how to preprocess an image
(``input``). Weights are read with safetensors only, never with pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from worker.engine.errors import ConfigError, ModelPackageError

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
CHANNEL_MODES = {"RGB": 3, "L": 1}
FORBIDDEN_KWARGS = frozenset({"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                              "pretrained_strict", "features_only"})  # card ``input.channels`` -> number of image channels


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input tensor."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]  # one per channel
    std: tuple[float, ...]
    channels: str  # a Pillow mode: "RGB" or "L"

    @classmethod
    def from_dict(cls, raw: Any) -> InputSpec:
        if not isinstance(raw, dict):
            raise ModelPackageError("card field 'input' must be an object with size, mean, std, channels")
        channels = raw.get("channels", "RGB")
        if channels not in CHANNEL_MODES:
            raise ModelPackageError(f"card input.channels must be one of {sorted(CHANNEL_MODES)}, got {channels!r}")
        n = CHANNEL_MODES[channels]
        size, mean, std = raw.get("size"), raw.get("mean"), raw.get("std")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
            raise ModelPackageError(f"card input.size must be [height, width] in pixels, got {size!r}")
        for name, values in (("mean", mean), ("std", std)):
            if not (isinstance(values, list) and len(values) == n and all(_is_number(v) for v in values)):
                raise ModelPackageError(f"card input.{name} must list {n} numbers for {channels}, got {values!r}")
        if any(v <= 0 for v in std):
            raise ModelPackageError(f"card input.std must be positive, got {std!r}")
        return cls(size=(size[0], size[1]), mean=tuple(map(float, mean)), std=tuple(map(float, std)), channels=channels)


@dataclass(frozen=True)
class ModelCard:
    """The parsed card; ``raw`` keeps every field (``about``, ``lineage`` ...) for copying forward."""

    architecture: str
    kwargs: dict[str, Any]
    classes: tuple[str, ...]
    input: InputSpec
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, raw: Any) -> ModelCard:
        if not isinstance(raw, dict):
            raise ModelPackageError("the card must be a JSON object")
        architecture, kwargs, classes = raw.get("architecture"), raw.get("kwargs", {}), raw.get("classes")
        if not isinstance(architecture, str) or not architecture:
            raise ModelPackageError("card field 'architecture' must name a timm architecture")
        if not isinstance(kwargs, dict):
            raise ModelPackageError("card field 'kwargs' must be an object")
        if "num_classes" in kwargs or "pretrained" in kwargs:
            raise ModelPackageError("card kwargs may not set num_classes (it is len(classes)) or pretrained")
        loaders = sorted(FORBIDDEN_KWARGS & set(kwargs))
        if loaders:  # these make timm read files (checkpoint_path is a torch.load of a pickle)
            raise ModelPackageError(f"card kwargs may not set {', '.join(loaders)}: weights come from model.safetensors only")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
            raise ModelPackageError("card field 'classes' must be a non-empty list of class names")
        if len(set(classes)) != len(classes):
            raise ModelPackageError("card field 'classes' has duplicate names")
        lineage = raw.get("lineage", [])
        if not (isinstance(lineage, list) and all(isinstance(e, dict) for e in lineage)
                and all(_is_names(e.get("classes_forgotten", [])) for e in lineage)):
            raise ModelPackageError("card field 'lineage' must be a list of objects (classes_forgotten: names)")
        spec = InputSpec.from_dict(raw.get("input"))
        in_chans = kwargs.get("in_chans", 3)
        if in_chans != CHANNEL_MODES[spec.channels]:
            raise ModelPackageError(
                f"card input.channels {spec.channels!r} gives {CHANNEL_MODES[spec.channels]} channels "
                f"but the model takes in_chans={in_chans}"
            )
        return cls(architecture=architecture, kwargs=copy.deepcopy(kwargs), classes=tuple(classes), input=spec,
                   raw=copy.deepcopy(raw))

    def class_index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise ConfigError(f"class {name!r} is not one of the model's classes: {', '.join(self.classes)}") from None

    def with_lineage(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The card as a dict with one more ``lineage`` entry (earlier entries are kept in order)."""
        raw = copy.deepcopy(self.raw)
        raw["lineage"] = [*raw.get("lineage", []), entry]
        return raw

    @property
    def forgotten_classes(self) -> list[str]:
        """Classes forgotten by earlier versions, from the card's lineage."""
        seen: list[str] = []
        for entry in self.raw.get("lineage", []):
            seen += [c for c in entry.get("classes_forgotten", []) if c not in seen]
        return seen


@dataclass(frozen=True)
class ModelPackage:
    """A package read from disk: card, weights and the sha256 of the weights file."""

    path: Path
    card: ModelCard
    state_dict: dict[str, torch.Tensor]
    weights_sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(path: Path) -> ModelCard:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelPackageError(f"{path}: card not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"{path}: not a readable JSON card ({exc})") from None
    return ModelCard.from_dict(raw)


def tensor_count(path: Path) -> int:
    """How many tensors a safetensors file holds, from its header alone."""
    try:
        with safe_open(str(path), "pt", device="cpu") as weights:
            return len(weights.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelPackageError(f"{path}: not a safetensors file ({exc})") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict; anything else (a pickle, a truncated file) is refused."""
    if not Path(path).is_file():
        raise ModelPackageError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelPackageError(f"{path}: not a safetensors file ({exc})") from None


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Read a package folder; the network is not built yet (see ``build_model``)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelPackageError(f"{root}: model package folder not found")
    card = read_card(root / CARD_FILE)
    weights_path = root / WEIGHTS_FILE
    state_dict = read_weights(weights_path)
    return ModelPackage(path=root, card=card, state_dict=state_dict, weights_sha256=sha256_file(weights_path))


def build_model(card: ModelCard, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Build the card's timm network (never pretrained), load the weights strictly, and check that
    an input of the card's size goes through it.

    The network is first built on the ``meta`` device (no memory) to compare its shapes with the
    weights, so a card asking for an enormous network fails before allocating it.
    """
    import timm  # deferred: importing timm costs ~1 s and card validation does not need it

    if not timm.is_model(card.architecture):
        raise ModelPackageError(f"unknown timm architecture {card.architecture!r}")
    with torch.device("meta"):
        skeleton = _create(timm, card)
    _check_fit(card, skeleton.state_dict(), state_dict)
    model = _create(timm, card)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, CHANNEL_MODES[card.input.channels], *card.input.size))
    except Exception as exc:  # e.g. input.size disagreeing with kwargs.img_size
        raise ModelPackageError(f"a {card.input.size[0]}x{card.input.size[1]} {card.input.channels} input does not "
                                f"go through {card.architecture} with the card's kwargs: {type(exc).__name__}: {exc}") from None
    return model


def parameter_count(card: ModelCard, *, max_parameters: int | None = None, max_tensors: int | None = None) -> int:
    """How many parameters the card's network has, counted on the meta device: nothing is allocated.

    With ``max_parameters`` or ``max_tensors``, the count stops as soon as the network being built
    passes either (ModelPackageError): building a card of ``"depth": 100000`` takes minutes even on the
    meta device, and its 1.2 million parameter tensors could never load the weights file's few hundred.
    """
    import timm
    from torch.nn.modules.module import register_module_parameter_registration_hook

    if not timm.is_model(card.architecture):
        raise ModelPackageError(f"unknown timm architecture {card.architecture!r}")
    seen = {"tensors": 0, "parameters": 0}

    def count(_module, _name, parameter) -> None:
        seen["tensors"] += 1
        seen["parameters"] += parameter.numel() if parameter is not None else 0
        if max_tensors is not None and seen["tensors"] > max_tensors:
            raise ModelPackageError(f"the card's network has more parameter tensors than the {max_tensors} the "
                                    "weights could fill: it cannot be these weights' network")
        if max_parameters is not None and seen["parameters"] > max_parameters:
            raise ModelPackageError(f"the card's network has more than {max_parameters} parameters "
                                    "(LETHE_MAX_MODEL_PARAMETERS)")

    hook = register_module_parameter_registration_hook(count) if max_parameters or max_tensors else None
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in _create(timm, card).parameters())
    finally:
        if hook is not None:
            hook.remove()


def _create(timm, card: ModelCard) -> torch.nn.Module:
    try:
        return timm.create_model(card.architecture, pretrained=False, num_classes=len(card.classes), **card.kwargs)
    except ModelPackageError:  # a bound of parameter_count's, passed while building
        raise
    except Exception as exc:  # arbitrary kwargs reach timm's constructors: any failure is the card's
        raise ModelPackageError(f"cannot build {card.architecture} with kwargs {card.kwargs}: "
                                f"{type(exc).__name__}: {exc}") from None


def _check_fit(card: ModelCard, expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label} {_preview(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
        raise ModelPackageError(f"weights do not fit {card.architecture} with the card's kwargs: " + "; ".join(parts))


def check_output_folder(out_dir: str | os.PathLike[str]) -> Path:
    """A package may be written to a folder that does not exist yet, or is empty; never over another."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelPackageError(f"{out}: output folder exists and is not empty")
    return out


def write_package(out_dir: str | os.PathLike[str], card: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> str:
    """Write a package atomically (a reader sees all of it or none of it); returns the weights' sha256.

    The folder must not exist yet, or be empty: an existing model is never overwritten.
    """
    out = check_output_folder(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp and safetensors create private files; a package is as readable as anything else written.
        staging.chmod(0o777 & ~umask)
        for written in staging.iterdir():
            written.chmod(0o666 & ~umask)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sha256_file(out / WEIGHTS_FILE)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _preview(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
