"""One cap on concurrent API calls for every process of this machine that uses the same data dir. Plain Python.

The API answers 503 above a few concurrent requests, whoever sends them. Each Dagster run has its own client and
its own in-run limit; what keeps the sum under the cap is this: `capacity` slot files under data/api_slots/, and a
call is made only while holding an exclusive flock on one of them.

Why flock: the kernel drops the lock when its holder dies (SIGKILL included), so a crashed run never keeps a slot;
and flock locks belong to an open file description, so two tasks of the same process conflict like two processes
(a per-process table keeps them from sharing one descriptor). The cap is per host: runs on other machines (a
Kubernetes run launcher) need the Dagster pool limit instead (README, "How many calls at once").
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from pathlib import Path

# Waiting for a slot polls (flock has no async wait): 1 ms, doubling to 8 ms. Slots are only contended while two
# runs overlap; the polls cost one non-blocking flock per free-looking slot.
_POLL_FIRST_S = 0.001
_POLL_MAX_S = 0.008


class CallSlots:
    """`capacity` host-wide slots; `async with slots:` holds one for the duration of a call."""

    _process_lock = threading.Lock()
    _held: dict[tuple[str, int], int] = {}  # (directory, slot) -> fd, slots held by this process

    def __init__(self, directory: Path, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError("capacity must be an integer >= 1")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = str(directory.resolve())
        self.capacity = capacity
        self.waits = 0  # acquisitions that found every slot taken at first
        self._next = 0

    def try_acquire(self) -> int | None:
        """Take a free slot now (its number), or None if all `capacity` are held here or by other processes."""
        with CallSlots._process_lock:
            for offset in range(self.capacity):
                slot = (self._next + offset) % self.capacity
                key = (self.directory, slot)
                if key in CallSlots._held:
                    continue
                fd = os.open(os.path.join(self.directory, f"slot-{slot}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                CallSlots._held[key] = fd
                self._next = (slot + 1) % self.capacity
                return slot
        return None

    def release(self, slot: int) -> None:
        with CallSlots._process_lock:
            fd = CallSlots._held.pop((self.directory, slot), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    async def acquire(self) -> int:
        slot = self.try_acquire()
        if slot is not None:
            return slot
        self.waits += 1
        delay = _POLL_FIRST_S
        while (slot := self.try_acquire()) is None:
            await asyncio.sleep(delay)
            delay = min(_POLL_MAX_S, delay * 2)
        return slot

    def held_here(self) -> int:
        with CallSlots._process_lock:
            return sum(1 for directory, _ in CallSlots._held if directory == self.directory)

    def __repr__(self) -> str:
        return f"CallSlots({self.directory!r}, capacity={self.capacity})"
