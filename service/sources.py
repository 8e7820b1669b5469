"""Forget-set and evaluation-set references: ``file://`` and ``s3://`` URIs confined to ``LETHE_DATA_ROOTS``.

Checked twice: lexically when a request is accepted (``..`` segments are collapsed first, so
``/data/../etc`` is ``/etc`` and ``s3://b/sets/../other`` is ``s3://b/other``), and again by the
worker just before it reads them: a ``file://`` path after resolving symlinks, an ``s3://`` one
lexically again (S3 has no links) before its objects are downloaded into the run's own folder. The
engine only ever reads local paths.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from typing import TYPE_CHECKING

from service.errors import InvalidInput
from service.registry.storage import CHUNK, is_not_found, s3_client
from service.s3_uris import S3Location, split_s3_uri

if TYPE_CHECKING:
    from service.config import Settings
    from worker.engine.images import ReadLimits

MAX_URI_LENGTH = 4096
MANIFEST_SUFFIXES = (".csv", ".jsonl")

Root = Path | S3Location


def read_limits(settings: Settings, also_within: tuple[Path, ...] = ()) -> ReadLimits:
    """What one image set may hold (LETHE_MAX_IMAGE_BYTES, _PIXELS, _MAX_SOURCE_IMAGES, _BYTES, _PIXELS) and where
    its files must lie once opened (the local data roots, symlinks resolved, and ``also_within``: a run's
    folder of downloaded s3:// sets): the same for a run's reads and a registration's check."""
    from worker.engine.images import ReadLimits

    within = tuple(str(root.resolve()) for root in (*settings.allowed_data_roots, *also_within)
                   if isinstance(root, Path))
    return ReadLimits(max_images=settings.max_source_images, max_image_bytes=settings.max_image_bytes,
                      max_source_bytes=settings.max_source_bytes, max_pixels=settings.max_source_pixels,
                      max_image_pixels=settings.max_image_pixels,
                      within=within)


class OutsideDataRoots(InvalidInput):
    code, title = "outside_data_roots", "Reference outside the allowed data roots"


class UnreadableSource(InvalidInput):
    """An S3 reference with nothing under it, or one the store refuses to list or read."""


def parse_file_uri(uri: str) -> Path:
    """The absolute path of a ``file:///...`` URI, with ``..`` collapsed; 422 for anything else."""
    _check_length(uri)
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise InvalidInput(f"unsupported URI scheme {parsed.scheme or '(none)'!r}: use file:///absolute/path "
                           "or s3://bucket/key")
    if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
        raise InvalidInput("a file URI names a local absolute path: file:///absolute/path")
    path = unquote(parsed.path)
    if not path.startswith("/") or "\x00" in path:
        raise InvalidInput("a file URI names a local absolute path: file:///absolute/path")
    return Path(os.path.normpath(path))


def parse_s3_uri(uri: str) -> S3Location:
    """``s3://bucket/key`` with ``.``, ``..`` and empty segments of the key collapsed; 422 for anything else.

    The key is taken literally (no percent-decoding), as S3 tools do.
    """
    _check_length(uri)
    try:
        location = split_s3_uri(uri)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    key = posixpath.normpath("/" + location.key).lstrip("/")  # normpath keeps a leading "//"
    return S3Location(location.bucket, "" if key == "." else key)


def parse_reference(uri: str) -> Path | S3Location:
    if isinstance(uri, str) and uri.startswith("s3://"):
        return parse_s3_uri(uri)
    return parse_file_uri(uri)


def _check_length(uri: str) -> None:
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_LENGTH or "\x00" in uri:
        raise InvalidInput("a reference must be a file:///absolute/path or s3://bucket/key URI")


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _inside_s3(location: S3Location, roots: list[S3Location]) -> bool:
    return any(location.bucket == root.bucket and (not root.key or location.key == root.key
                                                   or location.key.startswith(root.key + "/")) for root in roots)


def check_data_root(uri: str, roots: list[Root]) -> Path | S3Location:
    """Lexical check at submission: the reference, once ``..`` is collapsed, lies inside a data root."""
    reference = parse_reference(uri)
    if isinstance(reference, S3Location):
        s3_roots = [r for r in roots if isinstance(r, S3Location)]
        if not _inside_s3(reference, s3_roots):
            raise OutsideDataRoots(f"{reference} is outside the allowed data roots: {_describe(s3_roots)}")
        return reference
    normalised = [Path(os.path.normpath(root)) for root in roots if isinstance(root, Path)]
    if not _inside(reference, normalised):
        raise OutsideDataRoots(f"{reference} is outside the allowed data roots: {_describe(normalised)}")
    return reference


def _describe(roots: list) -> str:
    return ", ".join(map(str, roots)) or "none configured (set LETHE_DATA_ROOTS)"


def resolve_in_data_root(uri: str, roots: list[Root]) -> Path | S3Location:
    """The worker's check: a local path, symlinks resolved, still lies inside a real data root; an
    S3 reference (no links there) lies inside an S3 root."""
    if uri.startswith("s3://"):
        return check_data_root(uri, roots)
    path = parse_file_uri(uri).resolve()
    if not _inside(path, [root.resolve() for root in roots if isinstance(root, Path)]):
        # Where the link points is not said: it lies outside what the caller may see.
        raise OutsideDataRoots(f"{uri} leads outside the allowed data roots (through a symbolic link)")
    return path


class LocalSources:
    """A run's references as local paths for the engine: each checked against the data roots, a
    ``file://`` one used in place, an ``s3://`` one downloaded once under ``folder``, which the
    caller deletes when the run ends (no copy of forget-set images outlives the run)."""

    def __init__(self, roots: list[Root], folder: Path, client_factory=s3_client) -> None:
        self.roots, self.folder, self.client_factory = roots, folder, client_factory
        self.client = None
        self.downloaded: dict[S3Location, Path] = {}

    def path(self, uri: str) -> Path:
        reference = resolve_in_data_root(uri, self.roots)
        if isinstance(reference, Path):
            # The path checked, symlinks resolved: a link swapped after the check changes nothing, and
            # every file is checked again once opened (ReadLimits.within).
            return reference
        if reference not in self.downloaded:
            if self.client is None:
                self.client = self.client_factory()
            target = self.folder / str(len(self.downloaded))
            self.downloaded[reference] = download_s3(self.client, reference, target, self.roots)
        return self.downloaded[reference]


def download_s3(client, location: S3Location, target: Path, roots: list[Root]) -> Path:
    """Copy an S3 reference under the (new) folder ``target``; returns the local path the engine reads.

    The reference is a "folder" (every object under ``key/``), or one object: an archive, or a
    ``.csv``/``.jsonl`` manifest together with the images its ``path`` column names (those inside
    the manifest's folder and the data roots; the engine reports any other row). Local names
    keep the key's last segment, because the engine labels images by their folder's name.
    UnreadableSource when nothing is there or the store refuses; connection errors propagate.
    """
    from botocore.exceptions import ClientError

    name = PurePosixPath(location.key).name or location.bucket
    try:
        prefix = f"{location.key}/" if location.key else ""
        keys = [k for k in _list(client, location.bucket, prefix) if not k.endswith("/")]
        if keys:
            for key in keys:
                _download(client, location.bucket, key, target / name, key[len(prefix):])
            return target / name
        if not location.key:
            raise UnreadableSource(f"{location} holds no objects")
        local = _download(client, location.bucket, location.key, target, name)
        if name.lower().endswith(MANIFEST_SUFFIXES):
            folder = posixpath.dirname(location.key)
            s3_roots = [r for r in roots if isinstance(r, S3Location)]
            for relative in _manifest_paths(local):
                key = posixpath.normpath(posixpath.join(folder, relative))
                inside = key.startswith(folder + "/") if folder else ".." not in PurePosixPath(key).parts
                if relative.startswith("/") or not inside or not _inside_s3(S3Location(location.bucket, key), s3_roots):
                    continue
                try:
                    _download(client, location.bucket, key, target, key[len(folder) + 1 if folder else 0:])
                except ClientError as exc:
                    if not is_not_found(exc):
                        raise  # a missing image is the engine's to report, with its row number
        return local
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if is_not_found(exc) or code in ("NoSuchBucket", "AccessDenied", "403"):
            raise UnreadableSource(f"{location} cannot be read: {code}") from None
        raise


def _list(client, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def _download(client, bucket: str, key: str, folder: Path, relative: str) -> Path:
    """One object to ``folder/relative``; a relative name that would leave ``folder`` is refused."""
    parts = PurePosixPath(relative).parts
    if not parts or any(part in ("", ".", "..") for part in parts) or relative.startswith("/"):
        raise UnreadableSource(f"s3://{bucket}/{key}: a key with '.' or '..' segments cannot be copied locally")
    local = folder.joinpath(*parts)
    body = client.get_object(Bucket=bucket, Key=key)["Body"]  # one request (download_file makes two)
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "wb") as f:
            for chunk in body.iter_chunks(CHUNK):
                f.write(chunk)
    except (NotADirectoryError, IsADirectoryError, FileExistsError):
        raise UnreadableSource(f"s3://{bucket}/{key}: is both an object and a folder") from None
    finally:
        body.close()
    return local


def _manifest_paths(manifest: Path) -> list[str]:
    """The ``path`` column of a manifest (the engine validates the rest when it reads it)."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
        if manifest.name.lower().endswith(".csv"):
            return [row["path"] for row in csv.DictReader(io.StringIO(text)) if row.get("path")]
        rows = (json.loads(line) for line in text.splitlines() if line.strip())
        return [row["path"] for row in rows if isinstance(row, dict) and isinstance(row.get("path"), str)]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return []  # the engine reports what is wrong with it
