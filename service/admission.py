"""Admission: how many API calls of one process use the database at once, and what the others do.

Why this exists: FastAPI runs a sync view and each sync dependency in a thread pool (40 threads),
one hop each. A call that had checked out a database connection in one hop needed a thread for its
next; in a burst of more calls than connections, every thread was taken by a call waiting for a
connection, held by a call waiting for a thread. Nothing moved until the pool's 30 s timeout, and
most of the burst answered 500 (~41 simultaneous calls on SQLite, ~60 on Postgres). On SQLite every
transaction also took the write lock, so a lock holder waiting for a thread stalled every writer.

Here a call waits for its turn *before* it takes a thread or a connection, in the event loop, where
waiting costs a coroutine. At most ``LETHE_API_DB_CONCURRENCY`` calls hold a session, and the pool
has a connection for each, so an admitted call never waits for one and runs to its end. A call that
waits longer than ``LETHE_API_QUEUE_SECONDS``, or arrives when ``LETHE_API_MAX_WAITING`` already
wait, is answered 503 ``overloaded`` with ``Retry-After``: it changed nothing.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from service.errors import Overloaded


@dataclass
class _Turns:
    """One event loop's share: asyncio primitives belong to the loop that made them (uvicorn has one
    per process; each test client its own)."""

    semaphore: asyncio.Semaphore
    waiting: int = 0


@dataclass
class Admission:
    limit: int
    max_waiting: int
    wait_seconds: float
    _by_loop: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _turns(self) -> _Turns:
        loop = asyncio.get_running_loop()
        with self._lock:
            turns = self._by_loop.get(loop)
            if turns is None:
                turns = self._by_loop[loop] = _Turns(asyncio.Semaphore(self.limit))
            return turns

    def waiting(self) -> int:
        with self._lock:
            return sum(turns.waiting for turns in self._by_loop.values())

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold one of the ``limit`` turns for the block; Overloaded when none comes in time."""
        turns = self._turns()
        if turns.semaphore.locked():
            if turns.waiting >= self.max_waiting:
                raise Overloaded(f"{turns.waiting} calls are already waiting; retry after a pause")
            turns.waiting += 1
            try:
                async with asyncio.timeout(self.wait_seconds):
                    await turns.semaphore.acquire()
            except TimeoutError:
                raise Overloaded(f"no turn within {self.wait_seconds:g} s (LETHE_API_QUEUE_SECONDS); "
                                 "retry after a pause") from None
            finally:
                turns.waiting -= 1
        else:
            await turns.semaphore.acquire()
        try:
            yield
        finally:
            turns.semaphore.release()
