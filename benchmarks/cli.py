"""What the benchmark scripts' command lines share.

A benchmark runs for minutes to hours, so a bad argument has to be refused before the run, not
found after it: counts and durations are checked by their argparse types, the output path before
anything starts (and written atomically, so a failed or interrupted write never truncates the
figures already there), a database URL when it is parsed. SIGTERM is treated as Ctrl-C, so the
scripts' own clean-up (throw-away databases, servers, workers, folders) runs either way, and an
interrupted run ends with one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse type: a whole number at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    parse.__name__ = "count"  # argparse names the type in its message
    return parse


def seconds(text: str) -> float:
    """An argparse type: a finite duration above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a duration above zero")
    return value


def output_path(text: str) -> Path:
    """An argparse type: a file the run can write its figures to (its folder is created if missing)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; name the file to write")
    folder = writable_folder(str(path.parent))
    return folder / path.name


def writable_folder(text: str) -> Path:
    """An argparse type: a folder that exists or can be created, and that this process can write in."""
    folder = Path(text)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create {folder} ({exc.strerror or exc})") from None
    try:  # a file of its own, not os.access: root passes that check even where nothing can be written
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write in {folder} ({exc.strerror or exc})") from None
    return folder


def database_url(text: str) -> str:
    """An argparse type: a URL SQLAlchemy can parse (whether the server answers is found later)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(text)
    except ArgumentError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a database URL "
                                         "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres)") from None
    return text


def write_json(path: Path, data: Any, **dumps: Any) -> None:
    """Write ``data`` as JSON through a temporary file in the same folder, then rename it into place."""
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(json.dumps(data, indent=2, **dumps) + "\n")
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def entry_point(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a script's ``main``: SIGTERM raises KeyboardInterrupt like Ctrl-C (so ``finally`` blocks
    clean up), and an interrupted run prints one line and returns 130."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            handles = threading.current_thread() is threading.main_thread()  # where signals are delivered
            previous = signal.signal(signal.SIGTERM, _interrupt) if handles else None
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted; what it started was cleaned up", file=sys.stderr)
                return 130
            finally:
                if handles:
                    signal.signal(signal.SIGTERM, previous)

        return run

    return wrap


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
