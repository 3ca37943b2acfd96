"""The Dagster assets against the sandbox over real HTTP: refresh, idempotence, freshness, failures, halts,
and the sensor and schedule that drive refreshes."""

from datetime import datetime, timezone

import pytest
from dagster import DagsterInstance, build_schedule_context, build_sensor_context

from tmapi_assets.defs import automation
from tmapi_assets.defs.automation import RANGE_END_TAG, RANGE_START_TAG, contiguous_ranges
from tmapi_assets.defs.partitions import watched_items
from tmapi_assets.defs.runner import refresh
from tmapi_assets.ids import WatchedItem
from tmapi_assets.warehouse import Warehouse
from tmapi_assets.watchlist import add_items

DOC_ITEM = WatchedItem(652702302959)
ITEMS = [DOC_ITEM, WatchedItem(610947572360), WatchedItem(1000012345678), WatchedItem(652702302959, "5b2a1c4d"),
         WatchedItem(624282357434)]


@pytest.fixture
def project(project):
    """The shared fresh project (conftest.py), watching ITEMS."""
    add_items(project / "watchlist.csv", ITEMS)
    return project


def test_refresh_lands_every_item_over_real_http(project, sandbox_api):
    outcome = refresh(None, progress=False)
    assert outcome.ok, outcome.summary_text()
    assert outcome.landed == len(ITEMS) and outcome.calls == len(ITEMS)
    assert len(outcome.run_ids) == 1  # one run for all partitions, not one per item
    assert sandbox_api.stats()["requests_total"] == len(ITEMS)

    warehouse = Warehouse(project / "tmapi.duckdb")
    doc = warehouse.records(
        "SELECT * FROM tmapi.item_statistics WHERE item_id = 652702302959 AND spec_id = ''")[0]
    assert doc["sales_quantity_total_lower_bound"] == 15000 and doc["sales_quantity_total_is_lower_bound"]
    assert doc["order_quantity_total_lower_bound"] == 3500
    rows = warehouse.records(
        """SELECT (SELECT count(*) FROM tmapi.sales_trend_daily WHERE item_id = 652702302959 AND spec_id = '') s,
                  (SELECT count(*) FROM tmapi.price_trend_daily WHERE item_id = 652702302959 AND spec_id = '') p,
                  (SELECT sum(sales_quantity) FROM tmapi.sales_trend_daily
                   WHERE item_id = 652702302959 AND spec_id = '') total""")[0]
    assert rows == {"s": 30, "p": 29, "total": 3985}
    assert warehouse.table_counts()["item_kpis"] == len(ITEMS)
    # Every stored URL is token-free.
    urls = warehouse.records("SELECT request_url FROM tmapi.raw_responses")
    assert all(sandbox_api.token not in r["request_url"] for r in urls)

    # Dagster knows which partitions are materialised, and the checks ran and passed.
    instance = DagsterInstance.get()
    from dagster import AssetKey

    for name in ("raw_responses", "sales_trend_daily", "price_trend_daily", "item_statistics", "item_kpis"):
        assert instance.get_materialized_partitions(AssetKey(["tmapi", name])) == {i.partition_key for i in ITEMS}
    run = instance.get_run_by_id(outcome.run_ids[0])
    assert run.is_success
    checks = [
        e for e in instance.all_logs(run.run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert len(checks) == 3 and all(e.dagster_event.event_specific_data.passed for e in checks)


def test_second_refresh_costs_no_call_and_changes_no_row(project, sandbox_api):
    assert refresh(None, progress=False).ok
    warehouse = Warehouse(project / "tmapi.duckdb")
    before = warehouse.table_counts()
    calls_before = sandbox_api.stats()["requests_total"]

    again = refresh(None, progress=False)
    assert again.ok and again.calls == 0 and again.fresh == len(ITEMS)
    assert sandbox_api.stats()["requests_total"] == calls_before
    assert warehouse.table_counts() == before

    forced = refresh(None, force=True, progress=False)
    assert forced.ok and forced.calls == len(ITEMS)
    after = warehouse.table_counts()
    assert after["raw_responses"] == before["raw_responses"] + len(ITEMS)
    assert {k: v for k, v in after.items() if k != "raw_responses"} == \
           {k: v for k, v in before.items() if k != "raw_responses"}


def test_failures_are_per_item_and_a_rerun_fetches_only_what_is_missing(project, sandbox_api):
    bad = WatchedItem(777700000422)  # the sandbox answers 422 for ids ending in 0422
    flaky = WatchedItem(610947572360)
    add_items(project / "watchlist.csv", [bad])
    sandbox_api.script(flaky.item_id, [{"status": 417, "body": {"code": 417, "msg": "Failed to retrieve data"}},
                                       {"status": 200, "content_type": "text/html", "body_text": ""}])
    outcome = refresh(None, progress=False)
    assert not outcome.ok
    assert outcome.not_landed == [bad]
    assert "422" in outcome.errors[bad] and "Parameter error" in outcome.errors[bad]
    assert outcome.landed == len(ITEMS)
    assert outcome.calls == len(ITEMS) + 1 + 2  # the flaky item took 3 attempts; 422 is never retried
    assert "FAILED 777700000422" in outcome.summary_text()
    # The checks (evaluated in the steps that write what they check) say so: raw_items_landed fails naming the
    # item, the others pass.
    instance = DagsterInstance.get()
    results = {
        e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data
        for run_id in outcome.run_ids for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert {name: r.passed for name, r in results.items()} == {
        "raw_items_landed": False, "sum30_matches": True, "price_min_not_above_max": True}
    assert results["raw_items_landed"].metadata["missing_items"].value == "777700000422"

    calls_before = sandbox_api.stats()["requests_total"]
    rerun = refresh(None, progress=False)
    assert rerun.fresh == len(ITEMS) and rerun.not_landed == [bad]
    assert sandbox_api.stats()["requests_total"] == calls_before + 1  # only the missing item was called


def test_quota_halt_stops_every_further_call(project, sandbox_api, monkeypatch):
    monkeypatch.setenv("TMAPI_API_TOKEN", "sandbox-exhausted-token")
    outcome = refresh(None, progress=False)
    assert not outcome.ok
    assert outcome.failed_runs  # the raw step failed visibly, without retries
    assert outcome.calls <= 4  # at most the calls already in flight when the first 439 came back
    assert sandbox_api.stats()["requests_total"] == outcome.calls
    assert any("439" in str(e) or "quota" in str(e).lower() for e in outcome.errors.values())


def test_refresh_of_named_items_and_refusal_of_unwatched(project, sandbox_api):
    outcome = refresh([DOC_ITEM], progress=False)
    assert outcome.ok and outcome.landed == 1 and sandbox_api.stats()["requests_total"] == 1
    from tmapi_assets.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="not on the watchlist"):
        refresh([WatchedItem(123456789)], progress=False)
    assert sandbox_api.stats()["requests_total"] == 1


def test_sensor_adds_partitions_and_requests_first_fetch(project):
    instance = DagsterInstance.get()
    context = build_sensor_context(instance=instance)
    result = automation.watchlist_sensor(context)
    [add] = result.dynamic_partitions_requests
    assert list(add.partition_keys) == [i.partition_key for i in ITEMS]
    [run] = result.run_requests
    assert (run.tags[RANGE_START_TAG], run.tags[RANGE_END_TAG]) == (ITEMS[0].partition_key, ITEMS[-1].partition_key)

    instance.add_dynamic_partitions(watched_items.name, list(add.partition_keys))
    assert "unchanged" in automation.watchlist_sensor(build_sensor_context(instance=instance)).skip_message


def test_schedule_launches_runs_over_ranges_in_china_time(project):
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions(watched_items.name, [i.partition_key for i in ITEMS])
    when = datetime(2026, 12, 3, 22, 0, tzinfo=timezone.utc)  # 06:00 on 4 Dec in Shanghai
    context = build_schedule_context(instance=instance, scheduled_execution_time=when)
    requests = automation.daily_refresh(context)
    assert [r.run_key for r in requests] == ["daily-2026-12-04:0"]
    assert automation.daily_refresh.execution_timezone == "Asia/Shanghai"


def test_contiguous_ranges_chunk_and_split():
    keys = [str(100 + i) for i in range(10)]
    assert contiguous_ranges(keys, keys, 4) == [("100", "103"), ("104", "107"), ("108", "109")]
    assert contiguous_ranges(keys, ["101", "102", "105", "109", "999"], 10) == [("101", "102"), ("105", "105"),
                                                                              ("109", "109")]
    assert contiguous_ranges(keys, [], 4) == []


def test_the_cli_splits_only_the_last_range_into_smaller_final_runs():
    from tmapi_assets.defs.runner import tapered

    keys = [str(1000 + i) for i in range(500)]
    ranges = tapered(contiguous_ranges(keys, keys, 200), keys, min_items=10)
    sizes = [keys.index(last) - keys.index(first) + 1 for first, last in ranges]
    assert sizes == [200, 200, 60, 25, 15]  # the last 100: 60 + 25 + 15, every key once, in order
    assert [k for first, last in ranges for k in keys[keys.index(first):keys.index(last) + 1]] == keys
    assert tapered([("1000", "1019")], keys, min_items=16) == [("1000", "1019")]  # pieces too small: unchanged
    assert tapered([], keys, min_items=16) == []


def test_a_refresh_is_few_runs_of_many_items_under_one_concurrency_cap(project, sandbox_api, monkeypatch):
    more = [WatchedItem(1000000000000 + 13 * i) for i in range(25)]
    add_items(project / "watchlist.csv", more)
    monkeypatch.setenv("TMAPI_CONCURRENCY", "3")
    outcome = refresh(None, progress=False, partitions_per_run=10)
    total = len(ITEMS) + len(more)
    assert outcome.ok and outcome.landed == total
    assert len(outcome.run_ids) == 3  # ceil(30 / 10) runs, not 30
    stats = sandbox_api.stats()
    assert stats["requests_total"] == total and outcome.calls == total  # one paid call per item
    assert 2 <= stats["peak_in_flight"] <= 3  # calls really overlapped, never above the configured cap
    ledger = Warehouse(project / "tmapi.duckdb").records(
        "SELECT outcome, sum(calls) AS calls FROM tmapi.api_calls_daily GROUP BY outcome ORDER BY outcome")
    # 1000000000000 ends in 0000: the sandbox's item without statistics (data: null), a landed no-data answer.
    assert ledger == [{"outcome": "no_data", "calls": 1}, {"outcome": "success", "calls": total - 1}]


def test_the_cli_overlaps_its_runs_and_still_prints_its_summary(project, sandbox_api):
    """`tmapi-assets refresh` as users run it: runs overlap in threads of one process (their output is not
    captured by Dagster, which would redirect the process's stdout), the summary reaches the terminal, the cap holds."""
    import os
    import subprocess
    import sys

    add_items(project / "watchlist.csv", [WatchedItem(1000000000000 + 17 * i) for i in range(1, 16)])
    env = dict(os.environ, TMAPI_PARTITIONS_PER_RUN="4", TMAPI_CONCURRENCY="2")
    proc = subprocess.run([sys.executable, "-m", "tmapi_assets.cli", "refresh", "--quiet"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refresh: 20 item(s) in 5 Dagster run(s)" in proc.stdout
    assert "landed 20, fresh (no call) 0, not landed 0" in proc.stdout
    assert "API calls made 20 (1.00 per landed item)" in proc.stdout
    assert 1 <= sandbox_api.stats()["peak_in_flight_all"] <= 2
    records = sorted(DagsterInstance.get().get_run_records(), key=lambda r: r.start_time)
    assert len(records) == 5 and all(r.dagster_run.is_success for r in records)
    overlaps = sum(later.start_time < earlier.end_time for earlier, later in zip(records, records[1:]))
    assert overlaps >= 1  # the next run started before the previous one ended


def test_the_cli_pauses_garbage_collection_only_for_its_start_up(project, sandbox_api, monkeypatch):
    """run_refresh turns cyclic GC off while Dagster loads; it is on again once runs start, and after an error."""
    import gc

    from tmapi_assets import cli, pipeline

    seen_during_runs = []
    fetch_items = pipeline.fetch_items
    monkeypatch.setattr(pipeline, "fetch_items", lambda *a, **k: (seen_during_runs.append(gc.isenabled()),
                                                                  fetch_items(*a, **k))[1])
    add_items(project / "watchlist.csv", ITEMS[:2])
    assert cli.run_refresh([WatchedItem(999999999999)], quiet=True) == 2  # not watched: an error before any run
    assert gc.isenabled()
    frozen_before = gc.get_freeze_count()
    try:
        assert cli.run_refresh(None, quiet=True) == 0
        assert gc.get_freeze_count() > frozen_before  # what start-up loaded was frozen
    finally:
        gc.unfreeze()
    assert seen_during_runs == [True] and gc.isenabled()
    gc.disable()  # a caller that had it off (an embedding program) gets it back off
    try:
        assert cli.run_refresh([WatchedItem(999999999999)], quiet=True) == 2
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_ui_run_publishes_the_read_copy_and_a_cli_run_leaves_it_to_the_refresh(project, sandbox_api):
    from tmapi_assets.defs import build_definitions
    from tmapi_assets.defs.assets import PUBLISH_TAG

    instance = DagsterInstance.get()
    instance.add_dynamic_partitions(watched_items.name, [i.partition_key for i in ITEMS])
    job = build_definitions().resolve_job_def(automation.refresh_job.name)
    copy = project / "tmapi_read.duckdb"
    tags = {RANGE_START_TAG: ITEMS[0].partition_key, RANGE_END_TAG: ITEMS[1].partition_key}
    assert job.execute_in_process(instance=instance, tags={**tags, PUBLISH_TAG: "false"}).success
    assert not copy.exists()
    assert job.execute_in_process(instance=instance, tags=tags).success  # as launched from the UI or the daemon
    assert Warehouse(copy).table_counts()["item_kpis"] == 2


def test_the_cli_instance_reads_dynamic_partitions_once_and_sees_its_own_changes(project):
    from tmapi_assets.defs.runner import cli_instance

    instance = cli_instance()
    storage = instance._event_storage  # noqa: SLF001 - counting what reaches sqlite
    reads = []
    original = storage.get_dynamic_partitions
    storage.get_dynamic_partitions = lambda name: reads.append(name) or original(name)
    instance.add_dynamic_partitions(watched_items.name, ["1", "2"])
    for _ in range(5):
        assert instance.get_dynamic_partitions(watched_items.name) == ["1", "2"]
        assert instance.has_dynamic_partition(watched_items.name, "2")
    assert len(reads) == 1
    instance.delete_dynamic_partition(watched_items.name, "1")
    assert instance.get_dynamic_partitions(watched_items.name) == ["2"]
    assert not instance.has_dynamic_partition(watched_items.name, "1") and len(reads) == 2


def test_two_refreshes_adding_the_same_new_keys_at_once_both_go_on(project):
    """Two refreshes started together both add the watchlist's new keys: the slower one's insert hits sqlite's
    UNIQUE constraint. It reads the keys again and adds only what is still missing, instead of failing."""
    from tmapi_assets.defs.runner import cli_instance, sync_partitions

    instance = cli_instance()
    storage = instance._event_storage  # noqa: SLF001 - the race happens below the instance
    original, calls = storage.add_dynamic_partitions, []

    def racing_add(name, keys):
        calls.append(list(keys))
        if len(calls) == 1:  # the other refresh got there first with two of the keys
            original(name, list(keys)[:2])
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: dynamic_partitions")
        return original(name, keys)

    storage.add_dynamic_partitions = racing_add
    assert sync_partitions(instance, ["1", "2", "3"]) == ["1", "2", "3"]
    assert calls == [["1", "2", "3"], ["3"]]


def test_a_tls_context_that_cannot_be_built_leaves_no_stray_traceback(monkeypatch):
    """The refresh builds the shared TLS context in a thread at start-up; if it fails there (SSL_CERT_FILE pointing
    nowhere), each run's client raises it where its step reports it: the thread itself prints nothing."""
    import threading

    from tmapi_assets import client
    from tmapi_assets.defs import runner

    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/ca.pem")
    monkeypatch.setattr(client, "_tls", [])
    uncaught = []  # what would be printed as "Exception in thread ..."
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    thread = threading.Thread(target=runner._build_tls_context)
    thread.start()
    thread.join()
    assert uncaught == []
    with pytest.raises(OSError):
        client.tls_context()  # the error itself is not lost: the run's client meets it


def test_a_check_or_the_kpis_alone_from_the_ui_make_no_api_call(project, sandbox_api):
    """The checks are evaluated inside the raw and normalising steps, but each asset and check can still be run
    alone, as from the UI's asset graph: the KPIs, or raw_items_landed, without a single paid call."""
    from dagster import AssetCheckKey

    from tmapi_assets.defs import build_definitions
    from tmapi_assets.defs.automation import refresh_job
    from tmapi_assets.defs.partitions import KPIS, RAW

    assert refresh(None, progress=False).ok
    calls = sandbox_api.stats()["requests_total"]
    instance = DagsterInstance.get()
    job = build_definitions().resolve_job_def(refresh_job.name)
    first, last = ITEMS[0].partition_key, ITEMS[-1].partition_key
    tags = {RANGE_START_TAG: first, RANGE_END_TAG: last}

    only_kpis = job.execute_in_process(instance=instance, tags=tags, asset_selection=[KPIS])
    assert only_kpis.success
    assert {m.asset_key for m in only_kpis.asset_materializations_for_node("normalised_tables")} == {KPIS}
    landed = AssetCheckKey(RAW, "raw_items_landed")
    only_check = job.get_subset(asset_selection=set(), asset_check_selection={landed}).execute_in_process(
        instance=instance, tags=tags)
    assert only_check.success
    evaluations = only_check.get_asset_check_evaluations()
    assert [(e.asset_check_key, e.passed) for e in evaluations] == [(landed, True)]
    assert only_check.asset_materializations_for_node("raw_responses") == []
    assert sandbox_api.stats()["requests_total"] == calls
