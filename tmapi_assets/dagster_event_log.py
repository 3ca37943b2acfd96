"""Dagster's sqlite event log, made affordable for runs over hundreds of partitions.

A refresh run covers up to TMAPI_PARTITIONS_PER_RUN items; Dagster records one "materialization planned" and one
"materialized" event per item and asset (5 assets). The stock SqliteEventLogStorage writes each event on its own:
a new SQLAlchemy engine, two sqlite files, two commits (fsync) and an upsert of the asset's row, ~9 ms per event on
our test machine, so the bookkeeping of a 1,000-item refresh took ~4× longer than its API calls (docs/benchmarks.md).

This subclass changes two things, nothing else (same files, same tables, same rows; the UI and `dagster` CLI read
them as usual):

1. One planned event per asset and run, carrying the run's partition subset, instead of one per partition. This is
   the documented Dagster behaviour behind DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS (what Dagster+ and
   Postgres instances do). The price, as Dagster documents it: when a whole run fails, its partitions are not
   marked "failed" in the UI. Item failures never fail a run here anyway (the raw_items_landed check reports them),
   and a failed run is visible in the Runs page.
2. A batch of asset events (the per-partition materializations of one output, which Dagster hands over as a batch
   when DAGSTER_EVENT_BATCH_SIZE > 0) is written in one transaction per sqlite file instead of one per event.
3. Schema facts that only a migration can change are read once per process, not on every call: whether a secondary
   index migration is complete (as Dagster's own ConsolidatedSqliteEventLogStorage caches it) and whether the asset
   table has a column. Stock reads them ~12 times per run, each a sqlite connection under the storage's lock that
   every run's event writes share (~40 of the ~100 connections after a refresh's last API call). Only "yes" is kept
   (a column or an index never goes away; a "no" is asked again), and upgrade/wipe forget everything.

It is selected in dagster.yaml (event_log_storage); Dagster is pinned to one version in pyproject.toml because this
builds on its sqlite storage internals, and tests/test_event_log.py checks the rows against the stock class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from dagster._config import Field, StringSource
from dagster._core.events import ASSET_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

# Dagster only hands per-partition events over in batches when this is set (it is read when events are stored).
EVENT_BATCH_SIZE = "1000"
os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", EVENT_BATCH_SIZE)


def default_base_dir() -> str:
    """Where Dagster's default storage keeps per-run event logs: $DAGSTER_HOME/history/runs/."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise RuntimeError("DAGSTER_HOME is not set: run Dagster through `tmapi-assets dev` / `make dev`, "
                           "or set DAGSTER_HOME to the folder holding dagster.yaml (data/dagster_home)")
    return os.path.join(home, "history", "runs", "")


class BatchingSqliteEventLogStorage(SqliteEventLogStorage):
    def __init__(self, base_dir: str | None = None, inst_data=None):
        self._completed_secondary_indexes: set[str] = set()  # set before super(): its __init__ may reindex
        self._asset_key_columns: set[str] = set()
        super().__init__(base_dir or default_base_dir(), inst_data=inst_data)

    def has_secondary_index(self, name: str) -> bool:
        if name in self._completed_secondary_indexes:
            return True
        found = super().has_secondary_index(name)
        if found:
            self._completed_secondary_indexes.add(name)
        return found

    def enable_secondary_index(self, name: str) -> None:
        super().enable_secondary_index(name)
        self._completed_secondary_indexes.discard(name)  # read again, as written

    def _has_asset_key_col_on_connection(self, conn, column_name: str) -> bool:
        if column_name in self._asset_key_columns:
            return True
        found = super()._has_asset_key_col_on_connection(conn, column_name)
        if found:
            self._asset_key_columns.add(column_name)
        return found

    def has_asset_key_col(self, column_name: str) -> bool:
        if column_name in self._asset_key_columns:  # without opening a connection
            return True
        return super().has_asset_key_col(column_name)

    def _forget_schema(self) -> None:
        self._completed_secondary_indexes.clear()
        self._asset_key_columns.clear()

    def upgrade(self) -> None:
        self._forget_schema()
        super().upgrade()
        self._forget_schema()

    def wipe(self) -> None:
        self._forget_schema()
        super().wipe()
        self._forget_schema()

    @classmethod
    def config_type(cls):
        return {"base_dir": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)

    @property
    def supports_partition_subset_in_asset_materialization_planned_events(self) -> bool:
        return True

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """Each run of consecutive asset events of one run in one transaction per file; any other event on its own,
        as stock, in the same order. (A run's planned events come as one batch of its assets' and its checks'
        planned events: the checks' used to send the whole batch down the one-by-one path.)"""
        group: list[EventLogEntry] = []
        for event in events:
            if _batchable(event) and (not group or event.run_id == group[0].run_id):
                group.append(event)
                continue
            self._store_asset_events(group)
            group = []
            if _batchable(event):
                group.append(event)
            else:
                self.store_event(event)
        self._store_asset_events(group)

    def _store_asset_events(self, events: Sequence[EventLogEntry]) -> None:
        if len(events) <= 1:
            for event in events:
                self.store_event(event)
            return
        rows = [self._event_to_row(event) for event in events]  # serialised once, for both files
        with self.run_connection(events[0].run_id) as conn:
            conn.execute(SqlEventLogStorageTable.insert(), rows)
        with self.index_transaction() as conn:
            # One executemany that returns the new ids in the rows' order (SQLite >= 3.35), not one INSERT each.
            inserted = conn.execute(
                SqlEventLogStorageTable.insert().returning(SqlEventLogStorageTable.c.id, sort_by_parameter_order=True),
                rows)
            event_ids = [row[0] for row in inserted]
            self._store_asset_event_tags(conn, events, event_ids)
            # The asset's row keeps its latest event of each kind: writing only the last one of each kind in the
            # batch leaves the same values as writing every one in order.
            last_of_kind = {}
            for event, event_id in zip(events, event_ids):
                last_of_kind[(event.get_dagster_event().asset_key, event.dagster_event_type)] = (event, event_id)
            for event, event_id in sorted(last_of_kind.values(), key=lambda pair: pair[1]):
                self._store_asset_event(conn, event, event_id)


def _batchable(event: EventLogEntry) -> bool:
    """An asset event (what Dagster batches: per-partition materializations, planned events)."""
    return (event.is_dagster_event
            and event.dagster_event_type in ASSET_EVENTS
            and event.get_dagster_event().asset_key is not None)
