"""Where a run's seconds go: named phases, timed by the run itself.

Phases nest ("train / selection evaluation" runs inside "train"), and each phase's seconds are its
own, without the phases nested in it: the figures add up to the time covered, so a reader sees
which step to remove rather than the same second counted under three names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Timings:
    """Seconds (exclusive of nested phases) and how many times each phase ran, in the order phases
    first ran. Not thread-safe: one per run."""

    SEPARATOR = " / "

    def __init__(self) -> None:
        self._phases: dict[str, list[float]] = {}  # name -> [seconds, count]
        self._stack: list[list[float]] = []  # per open phase: [nested seconds]
        self._names: list[str] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name``, nested under whichever phases are open."""
        full = self.SEPARATOR.join([*self._names, name])
        self._phases.setdefault(full, [0.0, 0])
        self._names.append(name)
        self._stack.append([0.0])
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            nested = self._stack.pop()[0]
            self._names.pop()
            entry = self._phases[full]
            entry[0] += elapsed - nested
            entry[1] += 1
            if self._stack:
                self._stack[-1][0] += elapsed

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{phase: {"seconds": s, "count": n}}: phases that ran, in the order they first started."""
        return {name: {"seconds": round(seconds, 3), "count": int(count)}
                for name, (seconds, count) in self._phases.items() if count}

    @property
    def total_seconds(self) -> float:
        return round(sum(seconds for seconds, _ in self._phases.values()), 3)

