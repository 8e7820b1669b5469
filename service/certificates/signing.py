"""The keys that sign certificates: Ed25519, one active at a time, in a folder.

Why a folder and not the database: whoever can read a private key can forge certificates, and a
database is read by many (backups, replicas, the dashboard's own queries). The folder holds, per key,
``<kid>.jwk.json`` (the public key, published for ever) and, for the active key only,
``<kid>.private.pem`` (mode 0600); ``active`` names the active key. Rotating writes a new key,
makes it active and deletes the old private key: certificates signed with it stay verifiable, and
no new one can be signed with it. ``kid`` is the key's RFC 7638 thumbprint.

JWS and JWK come from joserfc (Authlib's maintained successor: typed, RFC 7515/7517/7638/8037 and
RFC 9864's fully specified "Ed25519" algorithm). Canonical JSON is RFC 8785 (the ``rfc8785``
package, Trail of Bits): a verifier may re-serialise the statements and compare bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import rfc8785
from joserfc import jws
from joserfc.jwk import OKPKey

from service.errors import SigningUnavailable

ALGORITHM = "Ed25519"  # RFC 9864's name for EdDSA with Ed25519 (the same signature as the older "EdDSA")
TYPE = "lethe-certificate+jws"


class SigningKeys:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def sign(self, statements: dict[str, Any], *, may_create: bool = True) -> tuple[str, str]:
        """(kid, compact JWS) of the statements' canonical JSON, signed with the active key, made on
        first use only when ``may_create``: once certificates exist, a missing key is an outage to
        fix (a restored folder, or an explicit rotation), not a reason to sign with a stranger."""
        kid, key = self.active(may_create=may_create)
        token = jws.serialize_compact({"alg": ALGORITHM, "kid": kid, "typ": TYPE}, rfc8785.dumps(statements), key,
                                      algorithms=[ALGORITHM])
        return kid, token

    def active(self, *, may_create: bool = True) -> tuple[str, OKPKey]:
        with self._locked():
            kid = self._active_kid()
            if kid is None and not may_create:
                raise SigningUnavailable(f"{self.folder}: no active signing key, though certificates were signed "
                                         "before: restore the folder, or run lethe keys signing rotate to start a new key")
            if kid is None:
                kid = self._new_key()
            try:
                return kid, OKPKey.import_key((self.folder / f"{kid}.private.pem").read_bytes())
            except FileNotFoundError:
                raise SigningUnavailable(f"{self.folder}: the active key {kid} has no private key; "
                                         "run lethe keys signing rotate") from None
            except (OSError, ValueError) as exc:
                raise SigningUnavailable(f"{self.folder}: the active key {kid} cannot be read ({exc})") from None

    def rotate(self) -> tuple[str | None, str]:
        """(retired kid or None, new kid). The retired key's private half is deleted; its public half stays."""
        with self._locked():
            old = self._active_kid()
            new = self._new_key()
            if old is not None:
                (self.folder / f"{old}.private.pem").unlink(missing_ok=True)
            return old, new

    def jwks(self) -> dict[str, Any]:
        """Every key ever active, public halves only (RFC 7517 JWK Set), the active one first."""
        try:
            if not self.folder.is_dir():
                return {"keys": []}
            active = self._active_kid()
            keys = [json.loads(path.read_text()) for path in sorted(self.folder.glob("*.jwk.json"))]
        except (OSError, ValueError) as exc:
            raise SigningUnavailable(f"{self.folder}: the public keys cannot be read ({exc})") from None
        keys.sort(key=lambda k: k.get("kid") != active)
        return {"keys": keys}

    def describe(self) -> list[dict[str, Any]]:
        """Each key's kid, whether it is active and whether its private half is still here."""
        active = self._active_kid() if self.folder.is_dir() else None
        return [{"kid": k["kid"], "active": k["kid"] == active,
                 "private_key": (self.folder / f"{k['kid']}.private.pem").exists()} for k in self.jwks()["keys"]]

    def _active_kid(self) -> str | None:
        try:
            return (self.folder / "active").read_text().strip() or None
        except FileNotFoundError:
            return None

    def _new_key(self) -> str:
        key = OKPKey.generate_key("Ed25519")
        kid = key.thumbprint()
        public = {**key.as_dict(private=False), "kid": kid, "use": "sig", "alg": ALGORITHM}
        private = self.folder / f"{kid}.private.pem"
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.as_pem(private=True))
        _write_atomically(self.folder / f"{kid}.jwk.json", json.dumps(public, indent=2) + "\n")
        _write_atomically(self.folder / "active", kid + "\n")
        return kid

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One key change at a time, across the API's processes and the CLI: two processes signing
        their first certificate at once must not make two keys."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SigningUnavailable(f"{self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)


def _write_atomically(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)
