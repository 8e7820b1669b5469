"""Forget-set and evaluation-set references: ``file://`` URIs confined to ``LETHE_DATA_ROOTS``.

Checked twice: lexically when a request is accepted (``..`` segments are collapsed first, so
``/data/../etc`` is ``/etc``), and again by the worker after resolving symlinks, just before it
opens the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from service.errors import InvalidInput

MAX_URI_LENGTH = 4096


class OutsideDataRoots(InvalidInput):
    code, title = "outside_data_roots", "Reference outside the allowed data roots"


def parse_file_uri(uri: str) -> Path:
    """The absolute path of a ``file:///...`` URI, with ``..`` collapsed; 422 for anything else."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_LENGTH or "\x00" in uri:
        raise InvalidInput("a reference must be a file:///absolute/path URI")
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise InvalidInput(f"unsupported URI scheme {parsed.scheme or '(none)'!r}: use file:///absolute/path")
    if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
        raise InvalidInput("a file URI names a local absolute path: file:///absolute/path")
    path = unquote(parsed.path)
    if not path.startswith("/") or "\x00" in path:
        raise InvalidInput("a file URI names a local absolute path: file:///absolute/path")
    return Path(os.path.normpath(path))


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_data_root(uri: str, roots: list[Path]) -> Path:
    """Lexical check at submission: the path, once ``..`` is collapsed, lies inside a data root."""
    path = parse_file_uri(uri)
    normalised = [Path(os.path.normpath(root)) for root in roots]
    if not _inside(path, normalised):
        allowed = ", ".join(map(str, normalised)) or "none configured (set LETHE_DATA_ROOTS)"
        raise OutsideDataRoots(f"{path} is outside the allowed data roots: {allowed}")
    return path


def resolve_in_data_root(uri: str, roots: list[Path]) -> Path:
    """The worker's check: the real path, symlinks resolved, still lies inside a real data root."""
    path = parse_file_uri(uri).resolve()
    if not _inside(path, [root.resolve() for root in roots]):
        raise OutsideDataRoots(f"{uri} resolves to {path}, outside the allowed data roots")
    return path
