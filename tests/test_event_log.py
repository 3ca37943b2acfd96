"""The batching event log (tmapi_assets/dagster_event_log.py) stores exactly what Dagster's stock sqlite event log
stores, in fewer transactions; and the project's instance (dagster.yaml) uses it."""

import sqlite3
from pathlib import Path

from dagster import AssetKey, DagsterEventType, DagsterInstance
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from tmapi_assets.dagster_event_log import BatchingSqliteEventLogStorage
from tmapi_assets.defs.runner import refresh
from tmapi_assets.ids import WatchedItem
from tmapi_assets.watchlist import add_items

ASSETS = ["raw_responses", "item_statistics", "sales_trend_daily", "price_trend_daily", "item_kpis"]
ITEMS = [WatchedItem(652702302959), WatchedItem(610947572360), WatchedItem(1000012345678),
         WatchedItem(652702302959, "5b2a1c4d"), WatchedItem(624282357434), WatchedItem(755667788990)]


def _index_tables(base_dir: Path) -> dict[str, list[tuple]]:
    """Every row of the cross-run index shard, in id order (what the UI and asset queries read)."""
    conn = sqlite3.connect(base_dir / "index.db")
    try:
        return {
            "event_logs": conn.execute(
                "SELECT id, run_id, event, dagster_event_type, asset_key, partition, step_key "
                "FROM event_logs ORDER BY id").fetchall(),
            "asset_keys": conn.execute(
                "SELECT asset_key, last_materialization, last_run_id, last_materialization_timestamp "
                "FROM asset_keys ORDER BY asset_key").fetchall(),
            "asset_event_tags": conn.execute(
                "SELECT event_id, asset_key, key, value FROM asset_event_tags ORDER BY id").fetchall(),
        }
    finally:
        conn.close()


def _run_rows(base_dir: Path, run_id: str) -> list[tuple]:
    conn = sqlite3.connect(base_dir / f"{run_id}.db")
    try:
        return conn.execute("SELECT id, event, dagster_event_type, asset_key, partition FROM event_logs "
                            "ORDER BY id").fetchall()
    finally:
        conn.close()


def test_project_instance_uses_the_batching_event_log_with_one_planned_event_per_asset(project):
    from tmapi_assets.cli import _prepare_dagster_home

    _prepare_dagster_home()  # the project's dagster.yaml, as every tmapi-assets command installs it
    add_items(project / "watchlist.csv", ITEMS)
    outcome = refresh(None, progress=False)
    assert outcome.ok, outcome.summary_text()

    instance = DagsterInstance.get()
    assert isinstance(instance.event_log_storage, BatchingSqliteEventLogStorage)
    keys = {i.partition_key for i in ITEMS}
    planned = [e for e in instance.all_logs(outcome.run_ids[0], of_type=DagsterEventType.ASSET_MATERIALIZATION_PLANNED)]
    assert len(planned) == len(ASSETS)  # one per asset, not one per asset and item
    for event in planned:
        assert set(event.dagster_event.event_specific_data.partitions_subset.get_partition_keys()) == keys
    for name in ASSETS:
        key = AssetKey(["tmapi", name])
        assert instance.get_materialized_partitions(key) == keys
        assert instance.get_latest_materialization_event(key).run_id == outcome.run_ids[0]
        assert instance.get_asset_records([key])[0].asset_entry.last_run_id == outcome.run_ids[0]


def test_batched_writes_store_the_same_rows_as_the_stock_event_log(project, tmp_path):
    """Replay one real run's events into a stock storage (one event at a time) and into the batching storage (each
    run of consecutive asset events as one batch, as Dagster hands them over): every row is identical."""
    # Dagster's stock instance (no event_log_storage in dagster.yaml): one planned event per asset and item.
    (project / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    add_items(project / "watchlist.csv", ITEMS)
    outcome = refresh(None, progress=False)
    assert type(DagsterInstance.get().event_log_storage) is SqliteEventLogStorage
    assert outcome.ok, outcome.summary_text()
    run_id = outcome.run_ids[0]
    events = DagsterInstance.get().all_logs(run_id)
    asset_types = {DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_MATERIALIZATION_PLANNED}
    assert sum(1 for e in events if e.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION) == \
        len(ASSETS) * len(ITEMS)

    stock_dir, batching_dir = tmp_path / "stock", tmp_path / "batching"
    stock = SqliteEventLogStorage(str(stock_dir))
    batching = BatchingSqliteEventLogStorage(str(batching_dir))
    for event in events:
        stock.store_event(event)
    batch: list = []
    batches = 0
    for event in events + [None]:
        if event is not None and event.dagster_event_type in asset_types and (
                not batch or batch[0].dagster_event_type == event.dagster_event_type):
            batch.append(event)
            continue
        if batch:
            batching.store_event_batch(batch)
            batches += 1
            batch = []
        if event is not None and event.dagster_event_type in asset_types:
            batch = [event]
        elif event is not None:
            batching.store_event(event)
    assert batches >= 2  # planned and materialised events went through the batch path

    assert _run_rows(batching_dir, run_id) == _run_rows(stock_dir, run_id)
    stock_index, batching_index = _index_tables(stock_dir), _index_tables(batching_dir)
    assert len(stock_index["event_logs"]) > 2 * len(ASSETS) * len(ITEMS)
    assert batching_index == stock_index


def test_a_mixed_batch_stores_its_asset_events_together_and_the_same_rows(project, tmp_path):
    """A batch mixing run, step, check and asset events (a run's planned events are assets' and checks'): the runs
    of consecutive asset events are written together, everything else one by one, and the rows are the stock's."""
    add_items(project / "watchlist.csv", ITEMS[:2])
    outcome = refresh(None, progress=False)
    events = DagsterInstance.get().all_logs(outcome.run_ids[0])
    stock_dir, batching_dir = tmp_path / "stock", tmp_path / "batching"
    stock = SqliteEventLogStorage(str(stock_dir))
    batching = BatchingSqliteEventLogStorage(str(batching_dir))
    for event in events:
        stock.store_event(event)
    written_together: list[int] = []
    store_group = batching._store_asset_events
    batching._store_asset_events = lambda group: (written_together.append(len(group)), store_group(group))
    batching.store_event_batch(events)  # run events, step events, checks and asset events together
    assert max(written_together) >= len(ASSETS)  # the planned events of the assets, between the checks'
    assert sum(written_together) == sum(1 for e in events if e.dagster_event_type in
                                        {DagsterEventType.ASSET_MATERIALIZATION,
                                         DagsterEventType.ASSET_MATERIALIZATION_PLANNED})
    assert _run_rows(batching_dir, outcome.run_ids[0]) == _run_rows(stock_dir, outcome.run_ids[0])
    assert _index_tables(batching_dir) == _index_tables(stock_dir)
