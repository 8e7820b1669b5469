"""Artifact storage: weights files content-addressed by sha256, written atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class ArtifactStore:
    """``root/<sha[:2]>/<sha>.safetensors``; a file appears under its final name complete or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.safetensors"

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def new_incoming(self) -> Path:
        """A fresh temporary file on the store's filesystem (so the final rename is atomic)."""
        incoming = self.root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=incoming, suffix=".part")
        os.close(fd)
        return Path(name)

    def put(self, source: Path) -> tuple[str, int]:
        """Move a file written under ``new_incoming()`` into place; returns (sha256, size)."""
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        sha256, size = digest.hexdigest(), source.stat().st_size
        target = self.path_for(sha256)
        if target.is_file():
            source.unlink()  # same content stored already
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(source, 0o644)
            os.replace(source, target)
        return sha256, size

    def delete(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def check(self) -> None:
        """Readiness: the folder exists (or can be made) and takes a file; OSError otherwise."""
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ready-"):
            pass
