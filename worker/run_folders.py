"""Run folders: where a run keeps its temporary files, and the clean-up of those a killed run left.

A run folder holds personal data (downloaded forget sets) and is removed when its run ends. A
worker killed mid-run cannot do that, so the next run on the host (or a worker starting there)
removes the folders no live run holds: each run keeps an exclusive lock on a file in its folder for
its whole life, which the kernel releases when the process dies (PID reuse after a container restart
cannot fake it, and runs in other PID spaces sharing the folder are safe). The name says which host
made it; a folder on another host's shared temporary folder is never judged here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger("lethe.worker")

RUN_FOLDER = re.compile(r"^lethe-run-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")
RUN_LOCK = ".run.lock"


def run_folder_prefix() -> str:
    return f"lethe-run-{socket.gethostname()}-{os.getpid()}-"


def make_run_folder() -> tuple[Path, int]:
    """A new run folder and an open descriptor holding its lock; close it after removing the folder."""
    folder = Path(tempfile.mkdtemp(prefix=run_folder_prefix()))
    lock = os.open(folder / RUN_LOCK, os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return folder, lock


def remove_stale_run_folders(parent: Path | None = None) -> list[Path]:
    """Remove this host's run folders that no live run holds; returns them."""
    parent = Path(parent or tempfile.gettempdir())
    host, removed = socket.gethostname(), []
    for folder in parent.glob("lethe-run-*"):
        match = RUN_FOLDER.match(folder.name)
        if match is None or match["host"] != host or not abandoned(folder, int(match["pid"])):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.warning("removed the run folder %s left by a run that is gone (process %s)", folder, match["pid"])
    return removed


def abandoned(folder: Path, pid: int) -> bool:
    """No live run holds the folder's lock (a folder without one: its process is gone)."""
    try:
        lock = os.open(folder / RUN_LOCK, os.O_RDONLY)
    except FileNotFoundError:  # just made, not locked yet; or from before locks
        return not process_alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: a live run
        return False
    finally:
        os.close(lock)
    return True


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's; or no such PID: never delete on doubt
        return True
    return True


def remove_stale_run_folders_safely() -> None:
    """The clean-up never stops a run or a worker from starting."""
    try:
        remove_stale_run_folders()
    except Exception:
        log.exception("could not clean up stale run folders")
