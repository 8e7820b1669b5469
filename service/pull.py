"""`lethe pull`: the consumer side. An inference service keeps the current version of a model in a
folder, swaps to a new one atomically, deletes the old one (it still encodes what was forgotten),
and acknowledges what it serves, so that the erasure can be shown to have propagated.

The folder (``--into``)::

    current -> v3-1f2e3d4c5b6a        a symlink, swapped with one rename: a reader sees a whole package
    v3-1f2e3d4c5b6a/model.safetensors
    v3-1f2e3d4c5b6a/model.json        the card, as the registry holds it
    v3-1f2e3d4c5b6a/version.json      {"model", "version", "sha256", "size"}
    .pull-state.json                  what is served and whether it was acknowledged
    .pull.lock                        held during a poll: one lethe pull per folder
    .partial/                         downloads in progress (resumed with Range after a crash)

A poll: ``GET /models/current`` with ``If-None-Match`` (304: nothing new); a new version's weights
are downloaded to ``.partial`` (resumed where a killed download stopped), their size and sha256
checked against the registry's, written as a versioned folder, ``current`` swapped to it, the
``--on-update`` command run (a reload), the previous folder deleted, and the version acknowledged.
A refused or corrupt download leaves ``current`` as it was. Only httpx: a service embeds this
without the database, the web framework or the engine (an import contract says so).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

log = logging.getLogger("lethe.pull")

STATE = ".pull-state.json"
LOCK = ".pull.lock"
PARTIAL = ".partial"
CURRENT = "current"
CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_OURS = re.compile(r"v\d+-[0-9a-f]{12}|\.staging-v\d+-[0-9a-f]{12}-.+")  # folders this module made


class PullError(Exception):
    """A poll that could not bring the folder to the current version; the folder is as it was."""


@dataclass(frozen=True)
class Pull:
    """Where to pull from and into. ``consumer``: the name it was registered under (None: pull
    without acknowledging). ``on_update``: a shell command run after each swap, with
    LETHE_MODEL_DIR, LETHE_MODEL_VERSION and LETHE_MODEL_SHA256 set, stopped after
    ``on_update_timeout`` seconds; the version is acknowledged only once it exits 0."""

    url: str
    api_key: str
    model: str
    into: Path
    consumer: str | None = None
    on_update: str | None = None
    on_update_timeout: float = 300.0
    timeout: float = 30.0


@dataclass
class Outcome:
    version: int
    sha256: str
    updated: bool  # a new version was put in place by this poll
    acknowledged: bool
    deleted: list[str] = field(default_factory=list)  # folders of earlier versions removed


class Puller:
    def __init__(self, pull: Pull, client: httpx.Client | None = None) -> None:
        self.pull = pull
        self.into = Path(pull.into)
        self.client = client or httpx.Client(base_url=pull.url.rstrip("/"), timeout=pull.timeout,
                                             headers={"Authorization": f"Bearer {pull.api_key}"})

    # --- one poll ------------------------------------------------------------------------------

    def once(self) -> Outcome:
        """Bring the folder to the model's current version and acknowledge it. Raises PullError,
        for whatever went wrong (the server, its answer, the disk): a daemon logs it and polls again."""
        try:
            self.into.mkdir(parents=True, exist_ok=True)
            with _folder_lock(self.into):
                return self._poll()
        except OSError as exc:
            raise PullError(f"{self.into}: {exc.strerror or exc} ({type(exc).__name__}); the current model is "
                            "untouched") from exc

    def _poll(self) -> Outcome:
        state = self._state()
        headers = {"If-None-Match": f'"{state["sha256"]}"'} if state.get("sha256") and self._served_dir() else {}
        answer = self._get("/models/current", params={"model": self.pull.model}, headers=headers)
        if answer.status_code == 304:
            return self._settle(state, updated=False)
        version, sha256, size, url = self._current(answer)
        weights = self._download(url, sha256, size)
        card = self._get(f"/models/{self.pull.model}/versions/{version}/card").content
        folder = self._install(version, sha256, size, weights, card)
        state = {"model": self.pull.model, "version": version, "sha256": sha256, "folder": folder.name,
                 "hook_ok": self.pull.on_update is None, "acknowledged": False}
        self._write_state(state)
        return self._settle(state, updated=True)

    def _current(self, answer: httpx.Response) -> tuple[int, str, int, str]:
        """The answer's version, sha256, size and download path, each checked before it names a
        file or a URL: a broken or hostile server must not steer a path or the API key elsewhere."""
        try:
            body = answer.json()
            version, sha256, size, url = body["version"], body["sha256"], body["size"], body["download_url"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PullError(f"GET /models/current did not answer a model version ({type(exc).__name__}: {exc})") from exc
        if url is None:
            raise PullError(f"version {version} of {self.pull.model} has no weights to download")
        checks = (isinstance(version, int) and not isinstance(version, bool) and version >= 1,
                  isinstance(sha256, str) and _SHA256.fullmatch(sha256) is not None,
                  isinstance(size, int) and not isinstance(size, bool) and size >= 0,
                  isinstance(url, str) and url == f"/models/{self.pull.model}/versions/{version}/weights")
        if not all(checks):
            raise PullError("GET /models/current answered a version, sha256, size or download URL that is not "
                            "this model's; nothing was downloaded")
        return version, sha256, size, url

    def _settle(self, state: dict, updated: bool) -> Outcome:
        """After the swap (this poll's or an interrupted earlier one's): reload, delete the old
        folders, acknowledge. Each step is recorded, so a crash repeats only what is left."""
        if not state.get("hook_ok"):
            self._run_hook(state)
            state["hook_ok"] = True
            self._write_state(state)
        deleted = self._delete_old(state["folder"])
        if self.pull.consumer and not state.get("acknowledged"):
            self._acknowledge(state["version"], state["sha256"])
            state["acknowledged"] = True
            self._write_state(state)
        return Outcome(state["version"], state["sha256"], updated, bool(state.get("acknowledged")), deleted)

    # --- download ------------------------------------------------------------------------------

    def _download(self, url: str, sha256: str, size: int) -> Path:
        """The weights in ``.partial/<sha256>``, checked; resumed from what an earlier poll left."""
        partial = self.into / PARTIAL
        partial.mkdir(exist_ok=True)
        for other in partial.iterdir():  # a version superseded before its download finished
            if other.name != sha256:
                other.unlink()
        target = partial / sha256
        have = target.stat().st_size if target.exists() else 0
        if have > size:
            target.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha256}"'} if 0 < have < size else {}
        if have < size:
            try:
                self._fetch(url, headers, target, have, size)
            except httpx.HTTPError as exc:  # what arrived stays in .partial: the next poll resumes from it
                raise PullError(f"downloading the weights of {sha256[:12]}… stopped after "
                                f"{target.stat().st_size if target.exists() else 0} of {size} bytes "
                                f"({exc or type(exc).__name__}); the next poll resumes") from exc
        got, digest = target.stat().st_size, _file_sha256(target)  # what is on disk is what gets served
        if got != size or digest != sha256:
            target.unlink()  # never resumed from: its bytes are wrong
            raise PullError(f"the downloaded weights do not match the registry (size {got} of {size}, sha256 "
                            f"{digest[:12]}… not {sha256[:12]}…); the current model is untouched")
        return target

    def _fetch(self, url: str, headers: dict[str, str], target: Path, have: int, size: int) -> None:
        """Append the rest of the weights to ``target`` (all of them, if the server sends them whole)."""
        with self.client.stream("GET", url, headers=headers, follow_redirects=True) as response:
            if response.status_code not in (200, 206):
                response.read()
                raise PullError(f"downloading version weights: HTTP {response.status_code} {_detail(response)}")
            if response.status_code == 200:  # the server sent the whole file (again)
                have = 0
            with target.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                for chunk in response.iter_bytes():  # as it arrives: what came before a cut is kept
                    if f.tell() + len(chunk) > size:  # never more than the registry says: a full disk serves nobody
                        break
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())

    # --- the folder ----------------------------------------------------------------------------

    def _install(self, version: int, sha256: str, size: int, weights: Path, card: bytes) -> Path:
        """A complete versioned folder, then ``current`` swapped to it with one rename."""
        name = f"v{version}-{sha256[:12]}"
        folder = self.into / name
        if not folder.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=self.into))
            os.replace(weights, staging / "model.safetensors")
            _write(staging / "model.json", card)
            _write(staging / "version.json", json.dumps(
                {"model": self.pull.model, "version": version, "sha256": sha256, "size": size}).encode())
            os.chmod(staging, 0o755)
            os.replace(staging, folder)
        link = self.into / f".{CURRENT}.{os.getpid()}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(name)
        os.replace(link, self.into / CURRENT)
        _fsync_dir(self.into)
        return folder

    def _delete_old(self, keep: str) -> list[str]:
        deleted = []
        for path in self.into.iterdir():
            if path.is_dir() and not path.is_symlink() and path.name != keep and _OURS.fullmatch(path.name):
                shutil.rmtree(path)
                deleted.append(path.name)
        return sorted(deleted)

    def _served_dir(self) -> Path | None:
        link = self.into / CURRENT
        return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None

    def _state(self) -> dict:
        path = self.into / STATE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise PullError(f"{path} cannot be read ({exc}); remove it to pull afresh") from exc
        if state.get("model") != self.pull.model:
            raise PullError(f"{self.into} holds model {state.get('model')!r}, not {self.pull.model!r}")
        return state

    def _write_state(self, state: dict) -> None:
        _write(self.into / STATE, json.dumps(state, indent=2).encode())

    # --- the service ---------------------------------------------------------------------------

    def _run_hook(self, state: dict) -> None:
        if self.pull.on_update is None:
            return
        env = {**os.environ, "LETHE_MODEL_DIR": str(self.into.absolute() / CURRENT),
               "LETHE_MODEL_VERSION": str(state["version"]), "LETHE_MODEL_SHA256": state["sha256"]}
        try:
            done = subprocess.run(self.pull.on_update, shell=True, env=env, check=False,
                                  timeout=self.pull.on_update_timeout)
        except subprocess.TimeoutExpired as exc:
            raise PullError(f"--on-update ran past {self.pull.on_update_timeout:g} s and was stopped; version "
                            f"{state['version']} is in place but not acknowledged (the hook runs again on the next "
                            "poll)") from exc
        if done.returncode != 0:
            raise PullError(f"--on-update exited {done.returncode}; version {state['version']} is in place but not "
                            "acknowledged (the hook runs again on the next poll)")

    def _acknowledge(self, version: int, sha256: str) -> None:
        response = self._request("PUT", f"/models/{self.pull.model}/consumers/{self.pull.consumer}",
                                 json={"version": version, "sha256": sha256})
        if response.status_code != 200:
            raise PullError(f"acknowledging version {version}: HTTP {response.status_code} {_detail(response)}")

    def _get(self, path: str, **kwargs) -> httpx.Response:
        response = self._request("GET", path, **kwargs)
        if response.status_code not in (200, 304):
            raise PullError(f"GET {path}: HTTP {response.status_code} {_detail(response)}")
        return response

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise PullError(f"{method} {self.pull.url.rstrip('/')}{path}: {exc or type(exc).__name__}") from exc

    # --- polling -------------------------------------------------------------------------------

    def forever(self, every: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Poll every ``every`` seconds; a failed poll is logged and tried again on the next."""
        while not stop():
            try:
                outcome = self.once()
                if outcome.updated:
                    log.info("serving %s version %d (%s)", self.pull.model, outcome.version, outcome.sha256[:12])
            except PullError as exc:
                log.error("%s", exc)
            deadline = time.monotonic() + every
            while time.monotonic() < deadline and not stop():
                time.sleep(min(0.5, every))


@contextmanager
def _folder_lock(into: Path):
    """One poll at a time per folder: a second ``lethe pull`` on it fails its poll, never shares a download."""
    with open(into / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PullError(f"another lethe pull is polling {into}; one per folder") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail") or body.get("title") or body)[:200] if isinstance(body, dict) else str(body)[:200]


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: a temporary file beside it, fsynced, renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
