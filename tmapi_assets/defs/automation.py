"""The refresh job, the daily schedule, and the sensor that keeps partitions in step with the watchlist.

Runs cover contiguous ranges of the dynamic partition keys (in the order they were added), up to
PARTITIONS_PER_RUN keys each: a refresh of N items launches ceil(N / PARTITIONS_PER_RUN) runs, not N.
"""


import os
import socket
from collections.abc import Sequence
from zoneinfo import ZoneInfo

from dagster import (
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    schedule,
    sensor,
)

from tmapi_assets import config
from tmapi_assets.defs.assets import FORCE_TAG, PARTITIONS_PER_RUN
from tmapi_assets.defs.partitions import watched_items
from tmapi_assets.halt import read_halt
from tmapi_assets.watchlist import read_watchlist

CHINA = ZoneInfo("Asia/Shanghai")
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
LAUNCHED_BY_TAG, PID_TAG, HOST_TAG = "tmapi/launched_by", "tmapi/pid", "tmapi/host"

refresh_job = define_asset_job(
    "refresh_watched_items",
    selection=AssetSelection.all(),  # partitioned by watched_items, inferred from the assets
    description="Fetch, normalise and compute KPIs for a range of watched items.",
)


def contiguous_ranges(all_keys: Sequence[str], selected: Sequence[str], max_per_run: int) -> list[tuple[str, str]]:
    """(first, last) key ranges covering exactly `selected`, each contiguous in `all_keys` and ≤ max_per_run long."""
    position = {key: i for i, key in enumerate(all_keys)}
    indices = sorted({position[k] for k in selected if k in position})
    ranges: list[tuple[str, str]] = []
    start = prev = None
    for index in indices:
        if start is None:
            start = prev = index
        elif index == prev + 1 and index - start < max_per_run:
            prev = index
        else:
            ranges.append((all_keys[start], all_keys[prev]))
            start = prev = index
    if start is not None:
        ranges.append((all_keys[start], all_keys[prev]))
    return ranges


def range_run_requests(
    all_keys: Sequence[str], selected: Sequence[str], *, run_key_prefix: str | None, force: bool = False
) -> list[RunRequest]:
    requests = []
    for n, (first, last) in enumerate(contiguous_ranges(all_keys, selected, PARTITIONS_PER_RUN)):
        tags = {RANGE_START_TAG: first, RANGE_END_TAG: last}
        if force:
            tags[FORCE_TAG] = "true"
        requests.append(
            RunRequest(run_key=f"{run_key_prefix}:{n}" if run_key_prefix else None, job_name=refresh_job.name, tags=tags)
        )
    return requests


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_cli_runs(instance: DagsterInstance) -> list[str]:
    """Mark runs whose CLI process was killed as failed and free their pool slots.

    An in-process run killed with SIGKILL stays STARTED for ever and keeps its slot in the tmapi_api pool, which
    would block every later run's API step. No daemon watches CLI processes, so each refresh (and the watchlist
    sensor) checks: a run launched here whose process is gone is dead.
    """
    reaped = []
    records = instance.get_run_records(
        filters=RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING],
                           tags={LAUNCHED_BY_TAG: "cli", HOST_TAG: socket.gethostname()}),
    )
    for record in records:
        run = record.dagster_run
        pid = int(run.tags.get(PID_TAG, "0") or 0)
        if pid and pid != os.getpid() and not _alive(pid):
            instance.report_run_failed(run, message=f"the refresh process (PID {pid}) was killed; marked failed")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            reaped.append(run.run_id)
    return reaped


@schedule(
    job=refresh_job,
    cron_schedule="0 6 * * *",
    execution_timezone=CHINA.key,  # 1688's day; the API's daily figures for yesterday are complete by then
    default_status=DefaultScheduleStatus.RUNNING,
    description="Daily refresh of every watched item, in runs of up to TMAPI_PARTITIONS_PER_RUN items.",
)
def daily_refresh(context: ScheduleEvaluationContext):
    halt = read_halt()
    if halt is not None:
        return SkipReason(halt.describe())
    keys = context.instance.get_dynamic_partitions(watched_items.name)
    if not keys:
        return SkipReason("the watchlist is empty: add items with `tmapi-assets watch add ITEM`")
    # The run key names the China day, whatever zone the scheduled time comes in.
    day = context.scheduled_execution_time.astimezone(CHINA).strftime("%Y-%m-%d")
    return range_run_requests(keys, keys, run_key_prefix=f"daily-{day}")


@sensor(
    job=refresh_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition for each item added to data/watchlist.csv (and requests its first fetch); "
    "removes partitions of items taken off it (their stored history stays in DuckDB).",
)
def watchlist_sensor(context: SensorEvaluationContext):
    for run_id in reap_dead_cli_runs(context.instance):
        context.log.warning(f"run {run_id}: its `tmapi-assets refresh` process was killed; marked failed")
    watchlist = read_watchlist(config.watchlist_path())
    for problem in watchlist.problems:
        context.log.warning(problem)
    existing = context.instance.get_dynamic_partitions(watched_items.name)
    existing_set = set(existing)
    wanted = [item.partition_key for item in watchlist.items]
    wanted_set = set(wanted)
    new = [k for k in wanted if k not in existing_set]
    removed = [k for k in existing if k not in wanted_set]
    requests = []
    if new:
        requests.append(watched_items.build_add_request(new))
    if removed:
        requests.append(watched_items.build_delete_request(removed))
    halt = read_halt()
    if halt is not None:  # keep the partitions in step, but request no fetch while calls are halted
        return SensorResult(dynamic_partitions_requests=requests, skip_reason=halt.describe())
    if not requests:
        return SkipReason(f"watchlist unchanged ({len(wanted)} items)")
    # New keys are appended in this order, so they form contiguous ranges after the existing ones.
    future_keys = [k for k in existing if k not in set(removed)] + new
    return SensorResult(
        run_requests=range_run_requests(future_keys, new, run_key_prefix=None),
        dynamic_partitions_requests=requests,
    )
