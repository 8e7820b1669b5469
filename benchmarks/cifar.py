"""CIFAR-10 for the benchmarks: the shared archives, extracted once into a cache folder outside the
repository, and the image sets the benchmarks use, written as manifests the engine reads.

    data = Cifar10.open(Path("../shared/datasets/cifar10"))
    data.forget("cat", 500)       # manifest of the first 500 'cat' train images (by file name)
    data.retain("cat")            # 5,000 train images of the other classes, a fixed random sample
    data.half("val"), data.half("test")   # the test split cut once into two stratified halves

Every set is a pure function of its arguments and the fixed seeds below, so every method, seed and
session sees the same images.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

SPLIT_SEED = 20261128  # cuts the test split into validation / test halves; never change it
RETAIN_SEED = 0  # draws the retain sample of the methods that use retain data
SPLITS = ("train", "test")


class DataError(Exception):
    """A benchmark's input is missing or unusable; the scripts print it as one line."""


def cache_root() -> Path:
    return Path(os.environ.get("LETHE_BENCH_CACHE", Path.home() / ".cache" / "lethe" / "benchmarks"))


def source_cache(name: str, *sources: Path) -> Path:
    """The cache folder for a dataset read from ``sources``: another source (another ``--data``, an
    archive replaced since) gets a folder of its own, never the images extracted from the first."""
    stamps = []
    for source in sources:
        try:
            stat = source.stat()
        except OSError:
            raise DataError(f"{source}: not found (pass --data)") from None
        stamps.append(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return cache_root() / f"{name}-{hashlib.sha256(chr(10).join(stamps).encode()).hexdigest()[:12]}"


def set_name(kind: str, count: int | None) -> str:
    """A forget set's manifest name: the first ``count`` images, or all of them (None)."""
    if count is not None and count < 1:
        raise DataError(f"a forget set needs at least one image, not {count}")
    return f"{kind}-{'all' if count is None else count}"


@dataclass(frozen=True)
class Cifar10:
    """The extracted dataset: ``root/<split>/<class>/<name>.jpg`` plus manifests in ``root``."""

    root: Path
    classes: tuple[str, ...]

    @classmethod
    def open(cls, data_dir: Path) -> Cifar10:
        """Extract ``data_dir/{train,test}.tar`` into the cache (once) and list the classes."""
        root = source_cache("cifar10", *(data_dir / f"{split}.tar" for split in SPLITS))
        for split in SPLITS:
            _extract(data_dir / f"{split}.tar", root, split)
        classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
        if not classes:
            raise DataError(f"{data_dir}: the train archive holds no class folders")
        return cls(root=root, classes=classes)

    def images(self, split: str, class_name: str) -> list[str]:
        """Paths (relative to ``root``) of one class's images in a split, sorted by name."""
        folder = self.root / split / class_name
        if not folder.is_dir():
            raise DataError(f"no class {class_name!r} in CIFAR-10 (classes: {', '.join(self.classes)})")
        return sorted(f"{split}/{class_name}/{p.name}" for p in folder.iterdir() if p.suffix == ".jpg")

    def forget(self, class_name: str, count: int | None) -> Path:
        """The forget set: the first ``count`` train images of the class (None: all 5,000)."""
        name = set_name(f"forget-{class_name}", count)
        return self._manifest(name, [(p, "") for p in self.images("train", class_name)[:count]])

    def retain(self, excluded: str, count: int = 5000) -> Path:
        """A fixed random sample of the train images of every class but ``excluded``, labelled."""
        pool = [(p, c) for c in self.classes if c != excluded for p in self.images("train", c)]
        sample = random.Random(f"{RETAIN_SEED}:{excluded}").sample(pool, min(count, len(pool)))
        return self._manifest(f"retain-without-{excluded}-{count}", sorted(sample))

    def train_without(self, excluded: str) -> Path:
        """Every train image of every class but ``excluded``, labelled: an oracle's training set."""
        self.images("train", excluded)  # refuses a class the dataset lacks
        return self._manifest(f"train-without-{excluded}",
                              [(p, c) for c in self.classes if c != excluded for p in self.images("train", c)])

    def half(self, which: str, per_class: int | None = None) -> Path:
        """The validation ("val", for selection only) or test ("test", reported) half of the test
        split: each class's test images shuffled with ``SPLIT_SEED`` and cut in two; ``per_class``
        keeps only the first images of each class's half (smoke runs)."""
        if which not in ("val", "test"):
            raise ValueError(which)
        rows = []
        for c in self.classes:
            paths = self.images("test", c)
            random.Random(f"{SPLIT_SEED}:{c}").shuffle(paths)
            cut = len(paths) // 2
            rows += [(p, c) for p in sorted((paths[:cut] if which == "val" else paths[cut:])[:per_class])]
        return self._manifest(f"{which}-half" + (f"-{per_class}" if per_class else ""), rows)

    def _manifest(self, name: str, rows: list[tuple[str, str]]) -> Path:
        return write_manifest(self.root / f"{name}.csv", rows)


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A manifest the engine reads: ``path,label`` rows, paths relative to the manifest's folder."""
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    with open(staging, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    staging.replace(path)  # atomic: a parallel benchmark process never reads half a manifest
    return path


def _extract(archive: Path, root: Path, split: str) -> None:
    if (root / split / ".complete").is_file():
        return
    if not archive.is_file():
        raise DataError(f"{archive}: CIFAR-10 archive not found (pass --data)")
    staging = root / f".{split}.{os.getpid()}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{archive}: cannot extract ({exc})") from None
    if not (staging / split).is_dir():
        raise DataError(f"{archive}: expected a top-level {split}/ folder")
    (staging / split / ".complete").touch()
    try:
        (staging / split).rename(root / split)
    except OSError:  # another process finished first
        pass
    shutil.rmtree(staging, ignore_errors=True)
