"""Benchmark fixtures: a cache folder of the session's own, and the shared CIFAR-10 archives."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import SHARED


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$LETHE_BENCH_CACHE`` for the whole session: the archives are extracted once, never into ~."""
    path = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LETHE_BENCH_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def cifar10(reference_model: Path, bench_cache: Path) -> Path:
    """The shared CIFAR-10 folder (train.tar, test.tar); skipped where ../shared is absent."""
    path = SHARED / "datasets" / "cifar10"
    if not (path / "train.tar").is_file():
        pytest.skip(f"needs the shared CIFAR-10 archives at {path} (only in the team's checkouts)")
    return path


def write_archives(folder: Path, classes: tuple[str, ...], train: int, test: int) -> Path:
    """``train.tar`` and ``test.tar`` laid out like the shared CIFAR-10 ones, with tiny JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        with tarfile.open(folder / f"{split}.tar", "w") as tar:
            for c, name in enumerate(classes):
                for i in range(count):
                    buffer = io.BytesIO()
                    Image.new("RGB", (8, 8), (c * 40, i * 10 % 256, 0)).save(buffer, "JPEG")
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)
    return folder
