"""In-process refresh through Dagster, for the CLI: the same job, assets and checks the UI runs, recorded in the
same instance (run history, partitions), executed in this process over contiguous partition ranges."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from collections import Counter, deque
from datetime import datetime, timedelta, timezone
from dataclasses import dataclass, field

from dagster import DagsterEventType, DagsterInstance
from dagster._core.instance.ref import InstanceRef
from tqdm import tqdm

from tmapi_assets import client, config, pipeline
from tmapi_assets.defs import build_definitions
from tmapi_assets.defs.assets import FORCE_TAG, PARTITIONS_PER_RUN, PUBLISH_TAG, short_list
from tmapi_assets.defs.automation import (
    HOST_TAG,
    LAUNCHED_BY_TAG,
    PID_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    contiguous_ranges,
    reap_dead_cli_runs,
    refresh_job,
)
from tmapi_assets.defs.partitions import watched_items
from tmapi_assets.errors import InvalidInputError, Outcome, RunHaltedError, TmapiError, WarehouseLockedError
from tmapi_assets.halt import read_halt
from tmapi_assets.ids import WatchedItem
from tmapi_assets.warehouse import Warehouse
from tmapi_assets.watchlist import read_watchlist

_HALTING = {Outcome.QUOTA.value, Outcome.AUTH.value, Outcome.CONFIG.value}
_LANDED = {Outcome.SUCCESS.value, Outcome.NO_DATA.value}
MAX_OVERLAPPING_RUNS = 3
NEXT_RUN_LEAD_S = 1.0  # about what a run takes from its start to its first API call
# The last range is split into runs of these shares: the bookkeeping after a run's last call (Dagster events,
# KPIs, checks: ~1 s + ~7 ms per item) is hidden behind the next run's calls, except the final run's, so that one
# is kept small. 200 items -> runs of 120, 50 and 30.
FINAL_RUN_SHARES = (0.6, 0.25, 0.15)


class _Pace:
    """Items reported final over the whole refresh: how many per second over the last few seconds (counted from the
    refresh's start until it has run that long, so an early burst of answers does not look like a fast pace).

    The pace is the refresh's, not one run's: the runs share the API's cap, so the calls a run has left finish at
    the pace of the API. (Measured from each run's own start, a short run looked slow for its first second, the
    next run started late and the API sat partly idle before the final run, 0.3-0.6 s of a 1,000-item refresh.)"""

    WINDOW_S = 3.0

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.times: deque[float] = deque()

    def tick(self) -> None:
        self.times.append(time.monotonic())

    def rate(self) -> float:
        now = time.monotonic()
        while self.times and now - self.times[0] > self.WINDOW_S:
            self.times.popleft()
        return len(self.times) / max(min(now - self.started, self.WINDOW_S), 1e-3)


@dataclass
class RefreshOutcome:
    items: int = 0
    run_ids: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
    run_failures: dict[str, str] = field(default_factory=dict)  # failed run id -> what failed, from its event log
    final: dict[WatchedItem, str] = field(default_factory=dict)  # item -> final outcome (or "fresh")
    errors: dict[WatchedItem, str] = field(default_factory=dict)  # item -> last error message from the ledger
    calls: int = 0
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        return Counter(self.final.values())

    @property
    def landed(self) -> int:
        return sum(1 for o in self.final.values() if o in _LANDED)

    @property
    def fresh(self) -> int:
        return self.counts["fresh"]

    @property
    def not_landed(self) -> list[WatchedItem]:
        return [i for i, o in self.final.items() if o not in _LANDED and o != "fresh"]

    @property
    def ok(self) -> bool:
        return not self.failed_runs and not self.not_landed and len(self.final) == self.items

    def summary_text(self) -> str:
        lines = [
            f"refresh: {self.items} item(s) in {len(self.run_ids)} Dagster run(s), {self.elapsed_s:.1f} s",
            f"  landed {self.landed}, fresh (no call) {self.fresh}, not landed {len(self.not_landed)}",
            f"  API calls made {self.calls}"
            + (f" ({self.calls / self.landed:.2f} per landed item)" if self.landed else ""),
        ]
        lines += [f"  note: {problem}" for problem in self.problems]
        for run_id in self.failed_runs:
            reason = self.run_failures.get(run_id) or "see its logs in the UI (`make dev`, Runs)"
            lines.append(f"  run {run_id} failed: {reason}")
        # Items that failed the same way are one line (a locked file or a dead run fails hundreds at once).
        by_error: dict[str, list[WatchedItem]] = {}
        for item in self.not_landed:
            by_error.setdefault(self.errors.get(item) or self.final[item], []).append(item)
        for error, items in sorted(by_error.items(), key=lambda kv: -len(kv[1]))[:30]:
            if len(items) == 1:
                lines.append(f"  FAILED {items[0]}: {error}")
            else:
                lines.append(f"  FAILED {len(items)} items ({short_list(items, limit=5)}): {error}")
        if len(by_error) > 30:
            lines.append(f"  … and {len(by_error) - 30} more errors (see tmapi.raw_responses)")
        missing = self.items - len(self.final)
        if missing:
            lines.append(f"  {missing} item(s) were not attempted (a run failed or the API halted)")
        return "\n".join(lines)


def _run_failure(instance: DagsterInstance, run_id: str) -> str | None:
    """The first step failure of a run, in one line (the summary says what broke without a stack trace)."""
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE):
        error = entry.dagster_event.step_failure_data.error
        if error is not None:
            while error.cause is not None and error.cls_name in ("RetryRequestedFromPolicy",
                                                                  "DagsterExecutionStepExecutionError"):
                error = error.cause
            message = error.message.strip().splitlines()[0]
            prefix = f"{error.cls_name}: "  # Dagster writes "module.Class: text"
            if prefix in message:
                message = message.split(prefix, 1)[1]
            return f"{entry.step_key}: {message}"
    return None


def cli_instance() -> DagsterInstance:
    """The project's instance ($DAGSTER_HOME), made safe for runs in threads of one process.

    No stdout/stderr capture: Dagster captures a run's output by redirecting the process's file descriptors 1 and 2
    (through a `tee` subprocess per run); overlapping runs redirected each other's output, and the CLI's own (the
    summary) ended up in a run's log file. Nothing is lost: the runs' logs are in the event log, and on the console.
    """
    ref = InstanceRef.from_dir(
        os.environ["DAGSTER_HOME"],
        overrides={"compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager",
                                    "class": "NoOpComputeLogManager"}},
    )
    instance = _retry_start_up_race(lambda: DagsterInstance.from_ref(ref))
    # Each run's start calls logging.config.dictConfig for the python_logs handlers of dagster.yaml (this project
    # has none). dictConfig takes every handler's lock while holding logging's module lock: with runs in threads it
    # deadlocked against another run's thread that was inside a handler (storing an event) and asked for the module
    # lock. No yaml-defined handlers, no dictConfig.
    instance.get_yaml_python_handlers = lambda: []
    _cache_dynamic_partitions(instance)
    return instance


# What sqlite says when another command started at the same moment on the same DAGSTER_HOME did it first: created
# Dagster's tables ("table ... already exists") or added the same new partition keys ("UNIQUE constraint failed").
_START_UP_RACES = ("already exists", "UNIQUE constraint failed")


def _retry_start_up_race(action, attempts: int = 5):
    """action(), again (after 0.2, 0.4, ... s) while it loses one of those races; its result."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors, whatever the storage wraps them in
            if attempt == attempts - 1 or not any(race in str(exc) for race in _START_UP_RACES):
                raise
            time.sleep(0.2 * (attempt + 1))


def _cache_dynamic_partitions(instance: DagsterInstance) -> None:
    """Read the dynamic partition keys once per refresh instead of ~60 times per run.

    Every run asked the instance for all keys of the watched_items partitions about 23 times and whether a key
    exists about 40 times, each a sqlite query returning the whole watchlist: with 10,000 items, ~0.9 s and tens of
    MB per run, growing with the watchlist. The keys change only through this instance (sync_partitions, at the
    start) or through the UI's sensor, which only adds keys this refresh does not run.
    """
    cache: dict[str, tuple[list[str], frozenset[str]]] = {}
    lock = threading.Lock()
    read_keys, add_keys, delete_key = (instance.get_dynamic_partitions, instance.add_dynamic_partitions,
                                       instance.delete_dynamic_partition)

    def cached(name: str) -> tuple[list[str], frozenset[str]]:
        with lock:
            if name not in cache:
                keys = list(read_keys(name))
                cache[name] = (keys, frozenset(keys))
            return cache[name]

    def get_dynamic_partitions(partitions_def_name: str) -> list[str]:
        return list(cached(partitions_def_name)[0])  # a copy: callers may keep or change their list

    def has_dynamic_partition(partitions_def_name: str, partition_key: str) -> bool:
        return partition_key in cached(partitions_def_name)[1]

    def add_dynamic_partitions(partitions_def_name: str, partition_keys) -> None:
        with lock:
            cache.pop(partitions_def_name, None)
        add_keys(partitions_def_name, partition_keys)

    def delete_dynamic_partition(partitions_def_name: str, partition_key: str) -> None:
        with lock:
            cache.pop(partitions_def_name, None)
        delete_key(partitions_def_name, partition_key)

    instance.get_dynamic_partitions = get_dynamic_partitions
    instance.has_dynamic_partition = has_dynamic_partition
    instance.add_dynamic_partitions = add_dynamic_partitions
    instance.delete_dynamic_partition = delete_dynamic_partition


def _build_tls_context() -> None:
    """client.tls_context() ahead of the runs; quietly: if it fails (SSL_CERT_FILE pointing nowhere), each run's
    client fails the same way and its step says so, without a stray thread traceback on the console."""
    try:
        client.tls_context()
    except Exception:  # noqa: BLE001 - raised again, with its context, where a run builds its client
        pass


def _start_up_done() -> None:
    """Garbage collection back on if the CLI turned it off for start-up (cli.run_refresh). What start-up loaded
    (modules, definitions, the instance) lives as long as the process: frozen, later passes do not walk it again."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def tapered(ranges: list[tuple[str, str]], all_keys: list[str], min_items: int) -> list[tuple[str, str]]:
    """The ranges with the last one split by FINAL_RUN_SHARES, unless its pieces would be under min_items."""
    if not ranges:
        return ranges
    position = {key: i for i, key in enumerate(all_keys)}
    start, end = position[ranges[-1][0]], position[ranges[-1][1]]
    size = end - start + 1
    sizes = [round(size * share) for share in FINAL_RUN_SHARES[:-1]]
    sizes.append(size - sum(sizes))
    if min(sizes) < min_items:
        return ranges
    pieces = []
    for n in sizes:
        pieces.append((all_keys[start], all_keys[start + n - 1]))
        start += n
    return ranges[:-1] + pieces


def sync_partitions(instance: DagsterInstance, wanted: list[str]) -> list[str]:
    """Make the dynamic partitions equal the watchlist (new keys appended in watchlist order)."""
    existing = instance.get_dynamic_partitions(watched_items.name)
    new = [k for k in wanted if k not in set(existing)]
    removed = [k for k in existing if k not in set(wanted)]
    if removed:
        for key in removed:
            instance.delete_dynamic_partition(watched_items.name, key)
    def add_missing() -> None:
        # After a lost race the failed add has dropped the cache: this reads the keys the other refresh added.
        existing = set(instance.get_dynamic_partitions(watched_items.name))
        missing = [k for k in new if k not in existing]
        if missing:
            instance.add_dynamic_partitions(watched_items.name, missing)

    if new:
        _retry_start_up_race(add_missing)
    return instance.get_dynamic_partitions(watched_items.name)


def refresh(
    items: list[WatchedItem] | None,
    *,
    force: bool = False,
    progress: bool = True,
    log_level: str = "WARNING",
    partitions_per_run: int = PARTITIONS_PER_RUN,
) -> RefreshOutcome:
    started = time.monotonic()
    outcome = RefreshOutcome()
    watchlist = read_watchlist(config.watchlist_path())
    outcome.problems = list(watchlist.problems)
    wanted = [i.partition_key for i in watchlist.items]
    if items is None:
        selected = wanted
    else:
        not_watched = [str(i) for i in items if i.partition_key not in set(wanted)]
        if not_watched:
            raise InvalidInputError(
                f"not on the watchlist: {', '.join(not_watched)}; add them with `tmapi-assets watch add ITEM` first"
            )
        selected = [i.partition_key for i in items]
    outcome.items = len(selected)
    if not selected:
        raise InvalidInputError(f"the watchlist {config.watchlist_path()} is empty: `tmapi-assets watch add ITEM`")

    halt = read_halt()
    if halt is not None:
        raise RunHaltedError(halt.describe(), outcome=Outcome(halt.outcome))
    # The TLS context the runs' clients share (~40 ms to build, most of it in OpenSSL without the GIL) is built on
    # the other core while Dagster's storage modules load.
    threading.Thread(target=_build_tls_context, name="tmapi-tls-context", daemon=True).start()
    instance = cli_instance()
    reap_dead_cli_runs(instance)
    all_keys = sync_partitions(instance, wanted)
    warehouse = Warehouse(config.duckdb_path())

    pending = selected
    if not force:
        # Items fetched within the freshness window and already normalised need no run at all (a run would cost
        # Dagster bookkeeping for nothing). Answers a killed run paid for are loaded first: they count.
        try:
            pipeline.recover_spooled_answers(warehouse)
            since = datetime.now(timezone.utc) - timedelta(hours=config.fresh_within_hours())
            done = warehouse.up_to_date([WatchedItem.from_partition_key(k) for k in selected], since)
        except WarehouseLockedError as exc:  # the runs' steps wait and retry; they also skip fresh items
            outcome.problems.append(f"could not check freshness up front: {exc}")
            done = set()
        pending = [k for k in selected if WatchedItem.from_partition_key(k) not in done]
        outcome.final.update({item: "fresh" for item in done})

    job = build_definitions().resolve_job_def(refresh_job.name)  # resources from the environment now
    _start_up_done()
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    ranges = tapered(contiguous_ranges(all_keys, pending, partitions_per_run), all_keys,
                     min_items=2 * config.api_concurrency())
    position = {key: i for i, key in enumerate(all_keys)}
    range_of = {key: n for n, (first, last) in enumerate(ranges)
                for key in all_keys[position[first]:position[last] + 1]}
    sizes = Counter(range_of.values())
    done_in_range: Counter = Counter()  # range -> items reported final
    pace = _Pace()
    # disable=None: a bar on a terminal, nothing in CI logs.
    bar = tqdm(total=len(pending), unit="item", disable=None if progress else True)
    reported: dict[WatchedItem, str] = {}
    halted: list[str] = []  # a final outcome that stops every further call (quota, credentials, URL)
    changed = threading.Condition()

    def on_item(item: WatchedItem, final: str) -> None:
        with changed:
            reported[item] = final
            if final in _HALTING:
                halted.append(final)
            done_in_range[range_of.get(item.partition_key, -1)] += 1
            pace.tick()
            bar.update(1)
            changed.notify_all()

    def execute(first: str, last: str) -> None:
        # The read copy is published once, after the last run: each run copying the whole warehouse cost ~0.4 s
        # per run at 10,000 items, growing with the warehouse.
        tags = {RANGE_START_TAG: first, RANGE_END_TAG: last, LAUNCHED_BY_TAG: "cli",
                PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), PUBLISH_TAG: "false"}
        if force:
            tags[FORCE_TAG] = "true"
        try:
            result = job.execute_in_process(instance=instance, tags=tags, run_config=run_config, raise_on_error=False)
            reason = None if result.success else _run_failure(instance, result.run_id)
            with changed:
                outcome.run_ids.append(result.run_id)
                if not result.success:
                    outcome.failed_runs.append(result.run_id)
                    outcome.run_failures[result.run_id] = reason
        except BaseException as exc:  # Dagster itself failed: raised in the main thread once every run has ended
            crashes.append(exc)
        finally:
            with changed:
                changed.notify_all()

    # Runs overlap: the next run starts when the current one has about NEXT_RUN_LEAD_S of calls left, so its
    # start-up happens while those calls finish, its own calls follow on at once, and the current run's writes and
    # checks happen while the next one calls the API. The host-wide call slots (call_slots.py) keep the overlapping runs'
    # calls under TMAPI_CONCURRENCY together; at most MAX_OVERLAPPING_RUNS are alive at once.
    lead_items = 2 * config.api_concurrency()

    def nearly_done(n: int, thread: threading.Thread) -> bool:
        """The run's remaining calls take about as long as a run takes to start (at the recent pace), or less."""
        left = sizes[n] - done_in_range[n]
        return not thread.is_alive() or left <= lead_items or left <= pace.rate() * NEXT_RUN_LEAD_S

    threads: list[threading.Thread] = []
    crashes: list[BaseException] = []
    pipeline.set_progress_listener(on_item)
    try:
        for n, (first, last) in enumerate(ranges):
            thread = threading.Thread(target=execute, args=(first, last), name=f"tmapi-run-{n}", daemon=True)
            thread.start()
            threads.append(thread)
            with changed:
                while not halted:
                    alive = sum(t.is_alive() for t in threads)
                    if nearly_done(n, thread) and alive < MAX_OVERLAPPING_RUNS:
                        break
                    changed.wait(0.5)
                if halted:
                    break  # quota, credentials or URL: every further call would fail the same way
        for thread in threads:
            thread.join()
        if crashes:
            raise crashes[0]
    finally:
        pipeline.set_progress_listener(None)
        bar.close()

    read_copy = config.read_copy_path()
    if read_copy is not None and outcome.run_ids:
        try:
            warehouse.publish_read_copy(read_copy)
        except TmapiError as exc:
            outcome.problems.append(f"the read copy {read_copy} was not refreshed ({exc}); the next refresh "
                                    "publishes it, or run `tmapi-assets publish`")

    # What landed is what the ledger holds, not what the runs reported on the way.
    try:
        outcome.calls, stored = warehouse.run_outcomes(outcome.run_ids)
    except WarehouseLockedError as exc:
        outcome.problems.append(f"the summary below is what the runs reported, unchecked: {exc}")
        stored = {}
    for key in pending:
        item = WatchedItem.from_partition_key(key)
        if item in stored:
            outcome.final[item] = stored[item][0]
            if stored[item][0] not in _LANDED:
                outcome.errors[item] = stored[item][1]
        elif reported.get(item) == "fresh" or (not stored and reported.get(item) in _LANDED and
                                                 not outcome.failed_runs):
            outcome.final[item] = reported[item]
        else:
            outcome.final[item] = reported.get(item, "not attempted")
            outcome.errors[item] = (
                "halted: no call made" if reported.get(item) == "halted"
                else "no answer stored: its run failed or was stopped (see the run's logs in the UI)")
    outcome.elapsed_s = time.monotonic() - started
    return outcome
