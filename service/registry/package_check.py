"""Checking an uploaded model package away from the API's own process, with a time and memory limit.

Why: the check builds the network the card describes and loads the weights into it. A card is
anyone's JSON: ``"depth": 100000`` ran 11 minutes and took 7.8 GB inside the API process (and, on
SQLite, held the database), and 100,000 nested arrays raised a RecursionError. So the check runs in
a child process forked from a server that imported torch and timm once (multiprocessing's
forkserver: a fork costs milliseconds, and the API's threads are never forked). The child gets
``LETHE_PACKAGE_CHECK_MEMORY_BYTES`` of heap (RLIMIT_DATA), is killed after
``LETHE_PACKAGE_CHECK_SECONDS``, and refuses a card whose network has more than
``LETHE_MAX_MODEL_PARAMETERS`` parameters, counted on the meta device before anything is allocated.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.config import Settings
    from worker.engine.images import ReadLimits


@dataclass(frozen=True)
class PackageLimits:
    max_parameters: int
    seconds: float
    memory_bytes: int
    at_once: int = 2


class PackageRejected(Exception):
    """The package is not one the registry can take; the message says why, for the uploader."""


class SetRejected(PackageRejected):
    """An evaluation or anchor set that every run of the model would fail on."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(f"{role}: {message}")
        self.role = role


def check_package(card_bytes: bytes, weights_path: Path, limits: PackageLimits, sets: dict[str, Path] | None = None,
                  image_limits: ReadLimits | None = None) -> dict[str, Any]:
    """The card (as a dict) when its network loads the weights strictly and each of ``sets`` (role ->
    local path: "eval_set", "anchor_set") reads as a run would read it; PackageRejected otherwise."""
    return _in_child(_check_package, (card_bytes, str(weights_path), limits.max_parameters, sets or {},
                                      image_limits), limits)


def check_sets(card: dict[str, Any], sets: dict[str, Path], limits: PackageLimits, image_limits: ReadLimits) -> None:
    """Each set (role -> local path) reads as a run of a model with this card would read it; SetRejected otherwise."""
    _in_child(_check_sets, (card, sets, image_limits), limits)


class ChecksBusy(Exception):
    """As many packages as LETHE_PACKAGE_CHECKS_AT_ONCE are being checked in this process already."""


@lru_cache
def _slots(at_once: int) -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(at_once)


def _in_child(check, args: tuple, limits: PackageLimits):
    # Each check holds one of the API's database turns while it runs: a few at a time, so uploads
    # can never take every turn (and every core) from the rest of the API.
    slots = _slots(limits.at_once)
    if not slots.acquire(blocking=False):
        raise ChecksBusy(f"{limits.at_once} uploads are being checked already (LETHE_PACKAGE_CHECKS_AT_ONCE)")
    try:
        return _run_child(check, args, limits)
    finally:
        slots.release()


def _run_child(check, args: tuple, limits: PackageLimits):
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(check, args, limits.memory_bytes, sender), daemon=True,
                            name="lethe-package-check")
    child.start()
    sender.close()
    try:
        if not receiver.poll(limits.seconds):
            raise PackageRejected(f"checking the package took longer than {limits.seconds:g} s "
                                  "(LETHE_PACKAGE_CHECK_SECONDS): does the card ask for a far bigger network "
                                  "than the weights hold, or a set for far more images?")
        outcome = receiver.recv()
    except EOFError:  # the child died without an answer: the kernel killed it, out of memory
        raise PackageRejected(f"checking the package needed more than {limits.memory_bytes} bytes "
                              "(LETHE_PACKAGE_CHECK_MEMORY_BYTES)") from None
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()
    if "role" in outcome:
        raise SetRejected(outcome["role"], outcome["error"])
    if "error" in outcome:
        raise PackageRejected(outcome["error"])
    return outcome["value"]


@lru_cache(maxsize=1)
def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "timm", "worker.engine.package", "worker.engine.images"])
    return context


def _child(check, args: tuple, memory_bytes: int, sender) -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    try:
        sender.send({"value": check(*args)})
    except MemoryError:
        sender.send({"error": f"checking the package needed more than {memory_bytes} bytes "
                              "(LETHE_PACKAGE_CHECK_MEMORY_BYTES)"})
    except SetRejected as exc:
        sender.send({"role": exc.role, "error": str(exc).removeprefix(f"{exc.role}: ")})
    except PackageRejected as exc:
        sender.send({"error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - whatever a hostile package raises is the package's fault
        sender.send({"error": f"the package could not be checked ({type(exc).__name__}: {str(exc)[:200]})"})
    finally:
        sender.close()


def _check_package(card_bytes: bytes, weights_path: str, max_parameters: int, sets: dict[str, Path],
                   image_limits: ReadLimits | None) -> dict[str, Any]:
    card = validate(card_bytes, Path(weights_path), max_parameters)
    _check_sets(card, sets, image_limits)
    return card


def _check_sets(card: dict[str, Any], sets: dict[str, Path], image_limits: ReadLimits | None) -> None:
    """As a run reads them: within the limits, every file decodable; an evaluation set's images
    labelled with the model's classes (a run scores them by label)."""
    from worker.engine import EngineError
    from worker.engine.images import ReadLimits, read_images
    from worker.engine.package import ModelCard

    parsed = ModelCard.from_dict(card)
    for role, path in sets.items():
        try:
            images = read_images(str(path), parsed.input, limits=image_limits or ReadLimits())
            if role == "eval_set":
                missing = len(parsed.classes) - len(set(images.label_indices(parsed.classes).tolist()))
        except EngineError as exc:
            raise SetRejected(role, str(exc)) from None
        # A run scores the class it forgets on the set: one without a class would fail that request.
        if role == "eval_set" and missing:
            raise SetRejected(role, f"holds no images of {missing} of the model's {len(parsed.classes)} classes: "
                                    "a request to forget one of them would fail")


def validate(card_bytes: bytes, weights_path: Path, max_parameters: int) -> dict[str, Any]:
    """Parse the card, count its network's parameters without allocating them, and load the weights
    strictly into it."""
    import torch

    from worker.engine import EngineError
    from worker.engine.package import ModelCard, build_model, parameter_count, read_weights, tensor_count

    torch.set_num_threads(1)
    try:
        card = ModelCard.from_dict(json.loads(card_bytes.decode("utf-8")))
        # Both bounds stop the build as soon as it passes them, in milliseconds: a strict load needs
        # the network's tensors to be the file's (slack for modules that re-register a parameter).
        parameter_count(card, max_parameters=max_parameters, max_tensors=tensor_count(weights_path) + 64)
        build_model(card, read_weights(weights_path))
    except RecursionError:
        raise PackageRejected("the card is nested too deeply to be a model card") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageRejected(f"card is not JSON: {exc}") from None
    except EngineError as exc:
        if "bad_alloc" in str(exc) or "MemoryError" in str(exc):  # torch's out-of-memory, wrapped as the card's
            raise MemoryError from None
        raise PackageRejected(str(exc).replace(str(weights_path), "weights")) from None
    return card.raw


def limits_from(settings: Settings) -> PackageLimits:
    return PackageLimits(max_parameters=settings.max_model_parameters, seconds=settings.package_check_seconds,
                         memory_bytes=settings.package_check_memory_bytes, at_once=settings.package_checks_at_once)
