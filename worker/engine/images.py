"""Image sources: one reader for forget sets, evaluation sets and retain sets.

A source is a path or ``file://`` URI of
- a directory of images, searched recursively (hidden files and folders are ignored);
- a ``.tar``, ``.tar.gz`` or ``.tgz`` archive of images, read in place;
- a manifest, ``.csv`` or ``.jsonl``, with a ``path`` column (relative to the manifest) and an
  optional ``label`` column.
An image's label is the manifest's ``label`` or else the name of its parent folder
(``test/cat/0001.jpg`` and ``cat/0001.jpg`` are both ``cat``).

Every image is decoded and resized once, up front, into one uint8 tensor, so that a bad file fails
the run before any training starts and no step decodes anything again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from worker.engine.errors import ImageSourceError, UnlearningCancelled
from worker.engine.package import InputSpec

@dataclass(frozen=True)
class ReadLimits:
    """What one image source may hold; past any of these the source is refused before more is read
    (a 1 MB .tar.gz whose members inflate to gigabytes, a folder of a million files). The service sets
    them from LETHE_MAX_IMAGE_BYTES, _MAX_SOURCE_IMAGES, _MAX_SOURCE_BYTES and _MAX_SOURCE_PIXELS."""

    max_images: int = 200_000
    max_image_bytes: int = 64 * 1024**2  # one file or archive member
    max_source_bytes: int = 8 * 1024**3  # every file or member, decompressed
    max_pixels: int = 20_000_000_000  # decoded pixels (width x height, before resizing) of the whole source
    # One image's pixels: a 0.5 MB PNG of 13,000 x 13,000 decodes to 0.5 GB. 50 MP holds any camera's photo.
    max_image_pixels: int = 50_000_000
    # Real paths every file read must lie in once opened (the data roots); () for anywhere. Checked on
    # the open file, so a symlink swapped after a caller's check cannot lead the read elsewhere.
    within: tuple[str, ...] = ()


class _Budget:
    """A source's running totals against its limits."""

    def __init__(self, uri: str, limits: ReadLimits) -> None:
        self.uri, self.limits = uri, limits
        self.images = self.bytes = self.pixels = 0

    def add_image(self) -> None:
        self.images += 1
        if self.images > self.limits.max_images:
            raise ImageSourceError(f"{self.uri}: more than {self.limits.max_images} images (the limit per source)")

    def add_bytes(self, name: str, size: int) -> None:
        if size > self.limits.max_image_bytes:
            raise ImageSourceError(f"{name}: {size} bytes, more than the {self.limits.max_image_bytes} an image may have")
        self.bytes += size
        if self.bytes > self.limits.max_source_bytes:
            raise ImageSourceError(f"{self.uri}: more than {self.limits.max_source_bytes} bytes of images (the limit "
                                   "per source)")

    def add_pixels(self, name: str, count: int) -> None:
        if count > self.limits.max_image_pixels:
            raise ImageSourceError(f"{name}: {count} pixels, more than the {self.limits.max_image_pixels} an image "
                                   "may have")
        self.pixels += count
        if self.pixels > self.limits.max_pixels:
            raise ImageSourceError(f"{self.uri}: more than {self.limits.max_pixels} pixels of images (the limit per "
                                   f"source), reached at {name}")


def open_regular(path: Path, within: tuple[str, ...] = ()) -> io.BufferedReader:
    """Open a file for reading only if it is a regular file (a FIFO named ``x.tar`` would block the
    reader forever, a device would never end) lying in one of ``within``. Both are checked on the
    opened file itself, so nothing can be swapped between the check and the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except OSError as exc:
        raise ImageSourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageSourceError(f"{path}: not a regular file")
    if within and not _lies_in(_opened_path(fd, path), within):
        os.close(fd)
        raise ImageSourceError(f"{path}: leads outside the allowed data roots")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _opened_path(fd: int, path: Path) -> str:
    """Where an open file really is: Linux names it in /proc; elsewhere, the path resolved now."""
    proc = f"/proc/self/fd/{fd}"
    return os.readlink(proc) if os.path.islink(proc) else os.path.realpath(path)


def _lies_in(real: str, roots: tuple[str, ...]) -> bool:
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _read_regular(path: Path, budget: _Budget) -> bytes:
    with open_regular(path, budget.limits.within) as f:
        budget.add_bytes(str(path), os.fstat(f.fileno()).st_size)
        return f.read(budget.limits.max_image_bytes + 1)


# Pillow's PPM plugin also reads PGM and PBM.
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "WEBP")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class ImageEntry:
    """One image of a source, not decoded yet."""

    name: str  # shown in error messages: a path relative to the source
    label: str | None
    read_bytes: Callable[[], bytes]


@dataclass(frozen=True)
class ImageSet:
    """Decoded images: ``pixels`` is uint8 (N, C, H, W) at the card's size and channels."""

    source: str
    pixels: torch.Tensor
    labels: tuple[str | None, ...]
    skipped: tuple[str, ...]  # names of undecodable files, when skipping was asked for
    duplicates: int = 0  # exact copies of another image of the set, dropped (forget sets)
    # Each image's sha256 over its file's bytes, as read: what evaluation halves and forget-set
    # digests are computed from (anyone can recompute it from the files; no decoder involved).
    sha256: tuple[str, ...] = ()
    digest: str = ""  # set_digest of every file read (copies dropped from ``pixels`` included)
    # A set read from several sources (one class's forget sets of several requests): bool (S, N),
    # which images each source holds (an image two sources share is kept once, in both rows).
    members: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def label_indices(self, classes: tuple[str, ...]) -> torch.Tensor:
        """Each image's class index; fails on a missing label or one the model does not know."""
        unlabelled = [i for i, label in enumerate(self.labels) if label is None]
        if unlabelled:
            raise ImageSourceError(f"{self.source}: {len(unlabelled)} image(s) have no label (no parent folder or label column)")
        unknown = sorted({label for label in self.labels if label not in classes})
        if unknown:
            raise ImageSourceError(f"{self.source}: labels not among the model's classes: {', '.join(unknown[:5])}")
        index = {name: i for i, name in enumerate(classes)}
        return torch.tensor([index[label] for label in self.labels], dtype=torch.long)


def source_path(uri: str) -> Path:
    """A local path from a plain path or a ``file://`` URI; other schemes are refused."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageSourceError(f"{uri}: file URIs must name a local path (file:///...)")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ImageSourceError(f"{uri}: unsupported image source scheme {parsed.scheme!r} (use a path or file://)")
    return Path(uri)


def list_images(uri: str, limits: ReadLimits = ReadLimits()) -> Iterator[ImageEntry]:
    """The images of a source, in a stable order, without decoding them (``limits`` are checked
    as they are listed and read)."""
    return _listed(uri, _Budget(uri, limits))


def _listed(uri: str, budget: _Budget) -> Iterator[ImageEntry]:
    path = source_path(uri)
    if path.is_dir():
        entries = _directory_entries(path, budget)
    elif not path.exists():
        raise ImageSourceError(f"{uri}: no such file or directory")
    elif path.name.lower().endswith(ARCHIVE_SUFFIXES):
        entries = _archive_entries(path, budget)
    elif path.name.lower().endswith(MANIFEST_SUFFIXES):
        entries = _manifest_entries(path, budget)
    else:
        raise ImageSourceError(f"{uri}: not a directory, a .tar/.tar.gz archive or a .csv/.jsonl manifest")
    for entry in entries:
        budget.add_image()
        yield entry


def count_images(uri: str, limits: ReadLimits = ReadLimits()) -> int:
    """How many images a source lists (without decoding them)."""
    return sum(1 for _ in list_images(uri, limits))


def read_images(uri: str, spec: InputSpec, *, skip_bad: bool = False, limits: ReadLimits = ReadLimits(),
                should_stop: Callable[[], bool] | None = None) -> ImageSet:
    """Decode every image of a source into one uint8 tensor at the card's size and channels.

    Args:
        uri: a path or ``file://`` URI of a directory, archive or manifest.
        spec: the model card's input specification.
        skip_bad: skip (and list in ``skipped``) files that are not decodable images, instead of
            failing on the first one.
        limits: what the source may hold (ImageSourceError past any).
        should_stop: asked before each image; True raises UnlearningCancelled (a cancel, or the
            run's time limit, reaches a long read too).
    """
    arrays: list[np.ndarray] = []
    labels: list[str | None] = []
    skipped: list[str] = []
    hashes: list[str] = []
    budget = _Budget(uri, limits)
    for entry in _listed(uri, budget):
        if should_stop is not None and should_stop():
            raise UnlearningCancelled(f"stopped while reading {uri}")
        try:
            data = _read(entry)
            arrays.append(_decode(entry.name, data, spec, budget))
        except ImageSourceError:
            if not skip_bad:
                raise
            skipped.append(entry.name)
            continue
        labels.append(entry.label)
        hashes.append(hashlib.sha256(data).hexdigest())
    if not arrays:
        detail = f" ({len(skipped)} undecodable file(s) skipped)" if skipped else ""
        raise ImageSourceError(f"{uri}: no images found{detail}")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    return ImageSet(source=uri, pixels=pixels, labels=tuple(labels), skipped=tuple(skipped), sha256=tuple(hashes),
                    digest=set_digest(hashes))


def set_digest(hashes) -> str:
    """One sha256 for a set of images: over their files' sha256s (lowercase hex), each once, sorted,
    each followed by a newline. File order, names and copies do not change it, and a requester can
    recompute it from their own files: ``sha256sum * | cut -c1-64 | sort -u | sha256sum``."""
    return hashlib.sha256("".join(f"{h}\n" for h in sorted(set(hashes))).encode()).hexdigest()


@dataclass(frozen=True)
class ImageReader:
    """How a run reads its sources: the limits each must keep, whether undecodable files are skipped,
    and what is asked before each image (see ``read_images``)."""

    limits: ReadLimits = ReadLimits()
    skip_bad: bool = False
    should_stop: Callable[[], bool] | None = None

    def read(self, uri: str, spec: InputSpec) -> ImageSet:
        return read_images(uri, spec, skip_bad=self.skip_bad, limits=self.limits, should_stop=self.should_stop)


def normalise(pixels: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1] and standardised with the card's mean and std."""
    mean = torch.tensor(spec.mean, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def _read(entry: ImageEntry) -> bytes:
    try:
        return entry.read_bytes()
    except OSError as exc:
        raise ImageSourceError(f"{entry.name}: cannot read ({exc.strerror or exc})") from None


def _decode(name: str, data: bytes, spec: InputSpec, budget: _Budget) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
            budget.add_pixels(name, image.size[0] * image.size[1])  # from the header, before decoding
            image = to_8_bit(image).convert(spec.channels)
            height, width = spec.size
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError:  # its message is PIL's repr of our buffer, a memory address
        raise ImageSourceError(f"{name}: not a decodable JPEG/PNG/BMP/PGM/WebP image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageSourceError(f"{name}: not a decodable JPEG/PNG/BMP/PGM/WebP image ({exc})") from None
    return array[:, :, None] if array.ndim == 2 else array


def to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grey images (PNG, PGM) scaled to 8 bits; Pillow's own conversion would clip them to white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        shift = 8 if values.max(initial=0) > 255 else 0
        return Image.fromarray(np.clip(values >> shift, 0, 255).astype(np.uint8), mode="L")
    return image


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)


def _directory_entries(root: Path, budget: _Budget) -> Iterator[ImageEntry]:
    real_root = root.resolve()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if _is_hidden(relative.parts):
            continue
        if not path.resolve().is_relative_to(real_root):
            raise ImageSourceError(f"{path}: links outside the source folder {root}")
        # A file directly in the source folder takes the folder's own name as its label.
        label = relative.parent.name or root.resolve().name or None
        yield ImageEntry(name=str(path), label=label, read_bytes=lambda p=path: _read_regular(p, budget))


def _archive_entries(path: Path, budget: _Budget) -> Iterator[ImageEntry]:
    source = open_regular(path, budget.limits.within)
    try:
        archive = tarfile.open(fileobj=source, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        source.close()
        raise ImageSourceError(f"{path}: not a readable tar archive ({exc})") from None
    with source, archive:
        try:
            for member in archive:  # streams: .tar.gz archives are read once, front to back
                relative = PurePosixPath(member.name)
                if not member.isfile() or _is_hidden(relative.parts):
                    continue
                name = f"{path}:{member.name}"
                budget.add_bytes(name, member.size)  # the header's size: checked before it is inflated
                data = archive.extractfile(member).read(budget.limits.max_image_bytes + 1)
                yield ImageEntry(name=name, label=relative.parent.name or None, read_bytes=lambda d=data: d)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ImageSourceError(f"{path}: archive is corrupt ({exc})") from None


def _manifest_rows(path: Path, within: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    try:
        with io.TextIOWrapper(open_regular(path, within), encoding="utf-8-sig", newline="") as f:  # -sig: a BOM
            if path.name.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise ImageSourceError(f"{path}: manifest has no 'path' column")
                for line, row in enumerate(reader, start=2):
                    yield line, row
            else:
                for line, text in enumerate(f, start=1):
                    if not text.strip():
                        continue
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise ImageSourceError(f"{path}:{line}: not a JSON object ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise ImageSourceError(f"{path}:{line}: not a JSON object")
                    yield line, row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ImageSourceError(f"{path}: cannot read manifest ({exc})") from None


def _manifest_entries(path: Path, budget: _Budget) -> Iterator[ImageEntry]:
    base = path.parent
    real_base = base.resolve()
    for line, row in _manifest_rows(path, budget.limits.within):
        relative = row.get("path")
        if not isinstance(relative, str) or not relative:
            raise ImageSourceError(f"{path}:{line}: row has no 'path'")
        image_path = base / relative
        if not image_path.resolve().is_relative_to(real_base):  # absolute paths, '..' and links out
            raise ImageSourceError(f"{path}:{line}: {relative!r} is outside the manifest's folder")
        if not image_path.is_file():
            raise ImageSourceError(f"{path}:{line}: image {relative!r} not found")
        label = row.get("label")
        label = str(label) if label not in (None, "") else (image_path.parent.name or None)
        yield ImageEntry(name=str(image_path), label=label, read_bytes=lambda p=image_path: _read_regular(p, budget))
