"""The host-wide cap on API calls (tmapi_assets/call_slots.py) and the attempt writer that feeds DuckDB from a thread.

Real processes, real flocks, the sandbox over real HTTP.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import hold_lock
from tmapi_assets import pipeline
from tmapi_assets.call_slots import CallSlots
from tmapi_assets.client import AsyncTmapiClient, ClientSettings
from tmapi_assets.errors import WarehouseLockedError
from tmapi_assets.ids import WatchedItem
from tmapi_assets.sandbox import SandboxProcess
from tmapi_assets.warehouse import Warehouse

HOLD_SLOTS = """
import signal, sys, time
from pathlib import Path
from tmapi_assets.call_slots import CallSlots
slots = CallSlots(Path(sys.argv[1]), int(sys.argv[2]))
held = [slots.try_acquire() for _ in range(int(sys.argv[3]))]
print("held", held, flush=True)
time.sleep(60)
"""


def hold_slots(directory: Path, capacity: int, count: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SLOTS, str(directory), str(capacity), str(count)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("held") and "None" not in line, line
    return proc


def test_slots_are_exclusive_within_a_process(tmp_path):
    slots = CallSlots(tmp_path, 2)
    other = CallSlots(tmp_path, 2)  # a second client of the same process (another run's thread)
    first, second = slots.try_acquire(), other.try_acquire()
    assert {first, second} == {0, 1}
    assert slots.try_acquire() is None and other.try_acquire() is None
    other.release(second)
    assert slots.try_acquire() == second
    assert slots.held_here() == 2


def test_slots_held_by_another_process_count_and_are_freed_when_it_is_killed(tmp_path):
    holder = hold_slots(tmp_path, 3, 2)
    try:
        slots = CallSlots(tmp_path, 3)
        assert slots.try_acquire() is not None
        assert slots.try_acquire() is None  # 2 held elsewhere + 1 here = the cap
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert slots.try_acquire() is not None and slots.try_acquire() is not None  # the kernel dropped its flocks


def test_acquire_waits_for_a_slot_freed_by_another_process(tmp_path):
    holder = hold_slots(tmp_path, 1, 1)
    slots = CallSlots(tmp_path, 1)
    threading.Timer(0.3, holder.kill).start()
    started = time.monotonic()
    slot = asyncio.run(asyncio.wait_for(slots.acquire(), 10))
    holder.wait()
    assert slot == 0 and time.monotonic() - started >= 0.25 and slots.waits == 1


def test_a_released_slot_goes_to_the_same_runs_next_call_before_any_other_run(tmp_path):
    """Within an event-loop step a released slot stays with its run (the call its limiter just let through takes
    it); another run (here: a second instance, as from another thread) gets it only once nobody of the run asked."""

    async def scenario() -> None:
        older, newer = CallSlots(tmp_path, 1), CallSlots(tmp_path, 1)
        slot = await older.acquire()
        older.release(slot)
        assert newer.try_acquire() is None  # another run's thread at this very moment: the slot is kept
        assert await older.acquire() == slot  # the older run's next call
        older.release(slot)
        await asyncio.sleep(0)  # nobody of the older run asked within the step: back to the host
        assert newer.try_acquire() == slot
        newer.release(slot)

        # A caller already waiting gets the slot from the release itself, also when another run waits too.
        first = await older.acquire()
        waiting_here = asyncio.ensure_future(older.acquire())
        waiting_there = asyncio.ensure_future(newer.acquire())
        await asyncio.sleep(0.02)
        older.release(first)
        assert await waiting_here == first
        assert not waiting_there.done()
        older.release(first)
        await asyncio.sleep(0)  # back to the host: the other run's poll finds it
        assert await asyncio.wait_for(waiting_there, 2) == first
        newer.release(first)

        # A waiter cancelled as the slot was handed to it passes the slot on.
        first = await older.acquire()
        cancelled, next_one = asyncio.ensure_future(older.acquire()), asyncio.ensure_future(older.acquire())
        await asyncio.sleep(0)
        older.release(first)  # handed to `cancelled`, which has not run yet
        cancelled.cancel()
        assert await asyncio.wait_for(next_one, 2) == first
        older.release(first)
        await asyncio.sleep(0)
        assert older.held_here() == 0

    asyncio.run(scenario())


def test_a_release_from_another_event_loop_or_thread_goes_to_the_host(tmp_path):
    """An instance hands slots on only within its own loop: released from another loop (or from a thread without
    one), a slot goes back to the host, where a waiter's poll finds it. Nothing is handed across threads, and no
    slot ends up held twice. (Found by an attack: such a handover raced the waiter's poll, which then raised with
    both slots held.)"""
    slots, other = CallSlots(tmp_path, 2), CallSlots(tmp_path, 2)
    real_try_acquire, polls = slots.try_acquire, [0]
    held: dict[str, int] = {}

    async def release_in_another_loop() -> None:
        slots.release(held["by_another_loop"])

    def try_acquire_while_others_release():
        polls[0] += 1
        if polls[0] == 2:  # (1: acquire finds both taken) the waiter's first poll, after its future was not done
            for target in (lambda: other.release(held["by_another_process"]),
                           lambda: asyncio.run(release_in_another_loop())):
                thread = threading.Thread(target=target)
                thread.start()
                thread.join()
        return real_try_acquire()

    async def scenario() -> None:
        held["by_another_loop"] = await slots.acquire()  # (taken in this loop, released from another below)
        held["by_another_process"] = other.try_acquire()
        slots.try_acquire = try_acquire_while_others_release
        got = await asyncio.wait_for(slots.acquire(), 2)
        assert got in (0, 1) and slots.held_here() == 1  # the waiter's slot, and nothing else
        slots.release(got)
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert slots.held_here() == 0


ANSWER = json.loads((Path(__file__).parent / "fixtures" / "doc_example_full.json").read_text(encoding="utf-8"))


def test_overlapping_runs_the_older_one_makes_all_its_calls_first(tmp_path):
    """Two clients in two threads (two runs of one refresh), one cap of 2: once the older run holds the slots,
    the newer one's calls start only when the older one has none left waiting, and never more than 2 at once."""
    runs_in_call_order: list[str] = []  # the first digit of each item id called: its run
    in_flight = [0, 0]  # now, peak
    lock = threading.Lock()
    older_started = threading.Event()

    async def handler(request):
        with lock:
            runs_in_call_order.append(request.url.params["item_id"][0])
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        if len(runs_in_call_order) >= 2:
            older_started.set()
        await asyncio.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return httpx.Response(200, json=ANSWER)

    def run(first_digit: str, count: int, landed: list) -> None:
        async def main() -> None:
            settings = ClientSettings(base_url="http://api.test", api_token="test-token", concurrency=2)
            async with AsyncTmapiClient(settings, transport=httpx.MockTransport(handler),
                                        call_slots=CallSlots(tmp_path, 2)) as client:
                results = await client.fetch_many([WatchedItem(int(first_digit + "00000000000") + i)
                                                   for i in range(count)])
            landed.append(sum(r.ok for r in results))
        asyncio.run(main())

    landed_older, landed_newer = [], []
    older = threading.Thread(target=run, args=("1", 12, landed_older))
    older.start()
    assert older_started.wait(10)
    newer = threading.Thread(target=run, args=("2", 4, landed_newer))
    newer.start()
    older.join(30)
    newer.join(30)
    assert landed_older == [12] and landed_newer == [4]
    assert runs_in_call_order == ["1"] * 12 + ["2"] * 4
    assert in_flight[1] == 2
    assert CallSlots(tmp_path, 2).held_here() == 0  # every slot given back when the runs ended


FETCH_IN_CHILD = """
import asyncio, json, sys
from pathlib import Path
from tmapi_assets.call_slots import CallSlots
from tmapi_assets.client import AsyncTmapiClient, ClientSettings
from tmapi_assets.ids import WatchedItem
base, token, slots_dir, first = sys.argv[1:5]
async def main():
    settings = ClientSettings(base_url=base, api_token=token, concurrency=3)
    async with AsyncTmapiClient(settings, call_slots=CallSlots(Path(slots_dir), 3)) as client:
        results = await client.fetch_many([WatchedItem(int(first) + 7 * i) for i in range(30)])
    print(json.dumps(sum(r.ok for r in results)))
asyncio.run(main())
"""


def test_two_processes_and_a_thread_together_never_exceed_the_cap(tmp_path):
    """Three clients (two processes, plus a thread here) with 3 calls in flight each, one cap of 3: the sandbox,
    which has no cap of its own here, never sees more than 3 requests at once."""
    with SandboxProcess(latency_ms=40, concurrency_limit=0) as api:
        children = [subprocess.Popen([sys.executable, "-c", FETCH_IN_CHILD, api.base_url, api.token, str(tmp_path),
                                      str(first)], stdout=subprocess.PIPE, text=True)
                    for first in (1000000000001, 2000000000001)]

        async def here() -> int:
            settings = ClientSettings(base_url=api.base_url, api_token=api.token, concurrency=3)
            async with AsyncTmapiClient(settings, call_slots=CallSlots(tmp_path, 3)) as client:
                results = await client.fetch_many([WatchedItem(3000000000001 + 7 * i) for i in range(30)])
            return sum(r.ok for r in results)

        landed_here = asyncio.run(here())
        landed = [json.loads(c.communicate(timeout=120)[0]) for c in children] + [landed_here]
        stats = api.stats()
    assert landed == [30, 30, 30]
    assert stats["requests_total"] == 90
    assert 2 <= stats["peak_in_flight_all"] <= 3  # calls overlapped across processes, never above the cap


def test_a_lock_taken_during_the_fetch_loses_no_paid_answer(tmp_path, monkeypatch):
    """A BI tool opens the live file while answers arrive: every answer received is kept (spool), none is bought
    twice, and the next run loads them all. (A flush on the event loop used to cancel calls already answered.)"""
    monkeypatch.setenv("TMAPI_DATA_DIR", str(tmp_path))
    db = tmp_path / "tmapi.duckdb"
    warehouse = Warehouse(db, lock_timeout_s=0.5)
    warehouse.ensure_schema()
    batch = [WatchedItem(1000000000000 + 7919 * i) for i in range(1, 25)]
    with SandboxProcess(latency_ms=80, concurrency_limit=8) as api:
        settings = ClientSettings(base_url=api.base_url, api_token=api.token, concurrency=2)
        holder = None

        def take_the_file_once_answers_arrive() -> None:
            nonlocal holder
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(p.stat().st_size for p in (tmp_path / "spool").glob("*")):
                time.sleep(0.01)
            holder = hold_lock(db, seconds=8, read_only=True)

        watcher = threading.Thread(target=take_the_file_once_answers_arrive)
        (tmp_path / "spool").mkdir()
        watcher.start()
        try:
            with pytest.raises(WarehouseLockedError):
                pipeline.fetch_items(batch, settings=settings, warehouse=warehouse, run_id="r1")
        finally:
            watcher.join()
            if holder is not None:
                holder.kill()
                holder.wait()
        answered = api.stats()["by_status"].get("200", 0)
        spooled = sum(len(p.read_bytes().splitlines()) for p in (tmp_path / "spool").glob("*.jsonl"))
        assert answered == len(batch) and api.stats()["requests_total"] == len(batch)
        assert spooled + count_stored(warehouse) == len(batch) and spooled > 0

        summary = pipeline.fetch_items(batch, settings=settings, warehouse=warehouse, run_id="r2")
        assert summary.recovered == spooled and summary.calls == 0 and len(summary.skipped_fresh) == len(batch)
        assert api.stats()["requests_total"] == len(batch)  # nothing bought twice
    assert count_stored(warehouse) == len(batch)
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


def count_stored(warehouse: Warehouse) -> int:
    if not warehouse.path.exists():
        return 0
    [row] = warehouse.records("SELECT count(*) AS n FROM tmapi.raw_responses WHERE outcome = 'success'")
    return row["n"]
