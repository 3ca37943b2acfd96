"""In-process refresh through Dagster, for the CLI: the same job, assets and checks the UI runs, recorded in the
same instance (run history, partitions), executed in this process over contiguous partition ranges."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from dataclasses import dataclass, field

from dagster import DagsterInstance
from tqdm import tqdm

from tmapi_assets import config, pipeline
from tmapi_assets.defs import build_definitions
from tmapi_assets.defs.assets import FORCE_TAG, PARTITIONS_PER_RUN
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
from tmapi_assets.errors import InvalidInputError, Outcome, RunHaltedError, WarehouseLockedError
from tmapi_assets.halt import read_halt
from tmapi_assets.ids import WatchedItem
from tmapi_assets.warehouse import Warehouse
from tmapi_assets.watchlist import read_watchlist

_HALTING = {Outcome.QUOTA.value, Outcome.AUTH.value, Outcome.CONFIG.value}
_LANDED = {Outcome.SUCCESS.value, Outcome.NO_DATA.value}


@dataclass
class RefreshOutcome:
    items: int = 0
    run_ids: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
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
        for item in self.not_landed[:30]:
            lines.append(f"  FAILED {item}: {self.errors.get(item) or self.final[item]}")
        if len(self.not_landed) > 30:
            lines.append(f"  … and {len(self.not_landed) - 30} more (see tmapi.raw_responses)")
        missing = self.items - len(self.final)
        if missing:
            lines.append(f"  {missing} item(s) were not attempted (a run failed or the API halted)")
        for run_id in self.failed_runs:
            lines.append(f"  run {run_id} failed: see `make dev` (Runs) or data/dagster_home for its logs")
        return "\n".join(lines)


def sync_partitions(instance: DagsterInstance, wanted: list[str]) -> list[str]:
    """Make the dynamic partitions equal the watchlist (new keys appended in watchlist order)."""
    existing = instance.get_dynamic_partitions(watched_items.name)
    new = [k for k in wanted if k not in set(existing)]
    removed = [k for k in existing if k not in set(wanted)]
    if removed:
        for key in removed:
            instance.delete_dynamic_partition(watched_items.name, key)
    if new:
        instance.add_dynamic_partitions(watched_items.name, new)
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
    instance = DagsterInstance.get()
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
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    # disable=None: a bar on a terminal, nothing in CI logs.
    bar = tqdm(total=len(pending), unit="item", disable=None if progress else True)
    reported: dict[WatchedItem, str] = {}

    def on_item(item: WatchedItem, final: str) -> None:
        reported[item] = final
        bar.update(1)

    pipeline.set_progress_listener(on_item)
    try:
        for first, last in contiguous_ranges(all_keys, pending, partitions_per_run):
            tags = {RANGE_START_TAG: first, RANGE_END_TAG: last, LAUNCHED_BY_TAG: "cli",
                    PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
            if force:
                tags[FORCE_TAG] = "true"
            result = job.execute_in_process(instance=instance, tags=tags, run_config=run_config, raise_on_error=False)
            outcome.run_ids.append(result.run_id)
            if not result.success:
                outcome.failed_runs.append(result.run_id)
            if _HALTING & set(reported.values()):
                break  # quota, credentials or URL: every further call would fail the same way
    finally:
        pipeline.set_progress_listener(None)
        bar.close()

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
