"""Shared fixtures: the digits data and a tiny ViT trained on it, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

# `make test` runs the suite in two processes (pytest-xdist, one per core). Each gets one torch
# thread, and so do the worker processes its tests start (they inherit it), so that busy threads
# never outnumber the cores: two per core make torch's threads spin and everything crawl.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from tests.digits import DigitsData, train_digits_vit, write_digits

pytest_plugins = ["tests.service_fixtures"]

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsData:
    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits_model(digits: DigitsData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model package: the digits ViT trained on ``digits.train``."""
    return train_digits_vit(digits, tmp_path_factory.mktemp("digits-model") / "pkg")


@pytest.fixture(scope="session")
def reference_model() -> Path:
    """The shared CIFAR-10 reference package; only the benchmark smoke tests need it."""
    path = SHARED / "models" / "cifar10-vit-d6"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"needs the shared reference model at {path} (only in the team's checkouts)")
    return path
