"""One cap on concurrent API calls for every process of this machine that uses the same data dir. Plain Python.

The API answers 503 above a few concurrent requests, whoever sends them. Each Dagster run has its own client and
its own in-run limit; what keeps the sum under the cap is this: `capacity` slot files under data/api_slots/, and a
call is made only while holding an exclusive flock on one of them.

Why flock: the kernel drops the lock when its holder dies (SIGKILL included), so a crashed run never keeps a slot;
and flock locks belong to an open file description, so two tasks of the same process conflict like two processes
(a per-process table keeps them from sharing one descriptor). The cap is per host: runs on other machines (a
Kubernetes run launcher) need the Dagster pool limit instead (README, "How many calls at once").

A slot released by a call goes first to the next call of the same `CallSlots` (one per run): to a caller already
waiting, or to the one the run's limiter has just let through, which asks for it within the same event-loop step.
Only then does it go back to the host. So while runs overlap, the older run keeps its slots until its queue is
empty and the newer one gets what it gives up: the older run's calls end first and its writes overlap the newer
run's calls. (Left to chance, the two shared the slots; the penultimate run of a refresh sometimes finished its
calls after the final one, and the two runs' writes, after the last call, made the refresh ~0.4 s longer.) The
price: a run of another process waits for a run that holds every slot until its queue is empty (one run's items).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections import deque
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
        # Meant for one event loop (the run's): slots a finished call left for the next one, and callers waiting
        # (futures of _loop, the loop they wait in; a release from elsewhere gives its slot to the host instead).
        self._spare: deque[int] = deque()
        self._waiting: deque[asyncio.Future[int]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

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
        """Give the slot up: to a caller of this instance waiting for one, else to the next caller of this event-loop
        step (the limiter's next call, resumed by the release that came before this one), else to the host."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in an event loop: nobody can be about to ask
            loop = None
        if loop is None or loop is not self._loop:
            self._close(slot)
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():  # done: cancelled while waiting
                waiter.set_result(slot)
                return
        self._spare.append(slot)
        loop.call_soon(self._return_if_spare, slot)  # runs after the callbacks already queued (the resumed caller)

    def _return_if_spare(self, slot: int) -> None:
        if slot in self._spare:
            self._spare.remove(slot)
            self._close(slot)

    def return_spare(self) -> None:
        """Give back every slot kept for a next call (the client calls this when it closes, in case its loop ends
        before the callbacks that would have)."""
        while self._spare:
            self._close(self._spare.popleft())

    def _close(self, slot: int) -> None:
        with CallSlots._process_lock:
            fd = CallSlots._held.pop((self.directory, slot), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    async def acquire(self) -> int:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use (or a new loop): what was kept for the old one goes to the host
            self.return_spare()
            self._waiting.clear()
            self._loop = loop
        if self._spare:
            return self._spare.popleft()
        slot = None if self._waiting else self.try_acquire()
        if slot is not None:
            return slot
        self.waits += 1
        # Wait for a slot this instance's calls hand on, and poll for one freed elsewhere (flock has no async wait).
        handed: asyncio.Future[int] = loop.create_future()
        self._waiting.append(handed)
        delay = _POLL_FIRST_S
        try:
            while True:
                await asyncio.wait((handed,), timeout=delay)
                if handed.done():
                    return handed.result()
                slot = self.try_acquire()
                if slot is not None:
                    if handed in self._waiting:
                        self._waiting.remove(handed)
                    return slot
                delay = min(_POLL_MAX_S, delay * 2)
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self.release(handed.result())  # handed to us as we were cancelled: pass it on
            elif handed in self._waiting:
                self._waiting.remove(handed)
            raise

    def held_here(self) -> int:
        with CallSlots._process_lock:
            return sum(1 for directory, _ in CallSlots._held if directory == self.directory)

    def __repr__(self) -> str:
        return f"CallSlots({self.directory!r}, capacity={self.capacity})"
