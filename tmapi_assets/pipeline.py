"""The pipeline's steps as plain Python: fetch (API -> raw_responses) and normalise (raw_responses -> trends, KPIs).

Dagster assets and the CLI's `reparse` call these; neither holds logic of its own. No Dagster import here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tmapi_assets import config
from tmapi_assets.call_slots import CallSlots
from tmapi_assets.client import AsyncTmapiClient, Attempt, ClientSettings, FetchResult, HaltSignal
from tmapi_assets.errors import OUTCOME_ACTION, Action, ApiError
from tmapi_assets.ids import WatchedItem
from tmapi_assets.halt import PersistentHalt
from tmapi_assets.parsing import MalformedDataError, decode_body, parse_display_count, parse_statistics
from tmapi_assets.spool import Spool, orphans
from tmapi_assets.warehouse import Observation, Warehouse

log = logging.getLogger(__name__)

ProgressCallback = Callable[[WatchedItem, str], None]  # (item, final outcome) once per item
_progress_listener: ProgressCallback | None = None


def set_progress_listener(listener: ProgressCallback | None) -> None:
    """The CLI registers a progress bar here; in-process Dagster runs report to it."""
    global _progress_listener
    _progress_listener = listener


def _report(item: WatchedItem, outcome: str) -> None:
    if _progress_listener is not None:
        _progress_listener(item, outcome)


class AttemptSink:
    """Where every HTTP attempt goes: first the crash-safe spool (at once), then tmapi.raw_responses in bulk
    transactions (every `batch` attempts or `interval_s` seconds, and at close).

    A paid answer is on disk the moment it arrives, before anything parses it. The DuckDB writes happen on a
    writer thread, so the event loop making the calls never waits for DuckDB (a flush blocking the loop left every
    API slot idle for its duration). Each flush takes the answers gathered so far with their spool segment; the
    next answer opens a new segment; a segment is deleted once its answers are in DuckDB.
    If a flush fails (the file is locked by another process), its answers are tried again with the next flush; if
    the last flush fails, the segments stay on disk, unlocked, and the step's retry or the next run loads them.
    """

    def __init__(self, warehouse: Warehouse, run_id: str | None, batch: int = 200, interval_s: float = 2.0):
        self.warehouse, self.run_id, self.batch, self.interval_s = warehouse, run_id, batch, interval_s
        self._segment: Spool | None = None  # opened with the first answer after each flush
        self._pending_ids: list[str] = []
        self._pending: list[Attempt] = []
        self._unstored: list[tuple[Spool, list[Attempt], list[str]]] = []  # taken by the writer, not yet in DuckDB
        self._wake = threading.Condition()
        self._closing = False
        self.written = 0
        self._writer = threading.Thread(target=self._write_loop, name="tmapi-attempt-writer", daemon=True)
        self._writer.start()

    def add(self, attempt: Attempt) -> None:
        with self._wake:
            if self._segment is None:
                self._segment = Spool(spool_dir(), self.run_id)
            self._pending_ids.append(self._segment.append(attempt))
            self._pending.append(attempt)
            if len(self._pending) >= self.batch:
                self._wake.notify()

    def _take_pending(self) -> None:
        """Move what was gathered so far, with its spool segment, to the writer's list (call holding _wake)."""
        if self._pending:
            assert self._segment is not None
            self._unstored.append((self._segment, self._pending, self._pending_ids))
            self._segment, self._pending, self._pending_ids = None, [], []

    def _store(self) -> None:
        """Write every taken batch to DuckDB in one transaction; delete their segments. Raises on failure."""
        batches, self._unstored = self._unstored, []
        if not batches:
            return
        try:
            attempts = [a for _, batch, _ in batches for a in batch]
            ids = [i for _, _, batch_ids in batches for i in batch_ids]
            self.written += self.warehouse.record_attempts(attempts, self.run_id, ids)
        except BaseException:
            self._unstored = batches + self._unstored  # kept (and still spooled) for the next flush
            raise
        for segment, _, _ in batches:
            segment.close()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                if not self._closing:
                    self._wake.wait(self.interval_s)
                if self._closing:
                    return  # close() does the last flush on its own thread
                self._take_pending()
            try:
                self._store()
            except Exception as exc:  # noqa: BLE001 (the answers are spooled; the next flush or close() retries)
                log.warning("answers not stored in DuckDB yet, kept in the spool and retried: %s", exc)

    def close(self) -> None:
        """Stop the writer and flush everything, then remove the spool. If the last flush raises (DuckDB locked),
        the segments stay, unlocked, for the step's retry or the next run: an answer paid for is never bought
        again."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._writer.join()
        with self._wake:
            self._take_pending()
        try:
            self._store()
        except BaseException:
            for segment, _, _ in self._unstored:
                segment.release()
            raise


def spool_dir() -> Path:
    return config.data_dir() / "spool"


def api_slots_dir() -> Path:
    return config.data_dir() / "api_slots"


def recover_spooled_answers(warehouse: Warehouse) -> int:
    """Load answers spooled by runs that died before storing them (idempotent). Returns answers loaded."""
    loaded = 0
    for path, records in orphans(spool_dir()):
        by_run: dict[str | None, list[tuple[str, Attempt]]] = {}
        for response_id, run_id, attempt in records:
            by_run.setdefault(run_id, []).append((response_id, attempt))
        for run_id, rows in by_run.items():
            warehouse.record_attempts([a for _, a in rows], run_id, [i for i, _ in rows])
            loaded += len(rows)
        path.unlink(missing_ok=True)
        log.warning("loaded %d answer(s) spooled by an interrupted run from %s", len(records), path.name)
    return loaded


@dataclass
class FetchSummary:
    requested: int = 0
    skipped_fresh: list[WatchedItem] = field(default_factory=list)
    landed: list[WatchedItem] = field(default_factory=list)  # success or no-data, stored
    failed: dict[WatchedItem, str] = field(default_factory=dict)  # item -> error text
    halted: list[WatchedItem] = field(default_factory=list)  # not called because the run halted
    calls: int = 0
    recovered: int = 0  # answers of an interrupted earlier run loaded from the spool
    halt_error: ApiError | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.halted and self.halt_error is None


def fetch_items(
    items: Sequence[WatchedItem],
    *,
    settings: ClientSettings,
    warehouse: Warehouse,
    run_id: str | None,
    force: bool = False,
    fresh_within: timedelta | None = timedelta(hours=20),
    halt: HaltSignal | None = None,
) -> FetchSummary:
    """Fetch items concurrently (bounded by settings.concurrency) and store every attempt verbatim.

    Items with a successful response younger than `fresh_within` cost no call unless `force`; an item this run
    already landed (a retried step) never costs a second call.
    """
    summary = FetchSummary(requested=len(items))
    # Answers a killed run paid for count before anything else: they may make items fresh.
    summary.recovered = recover_spooled_answers(warehouse)
    halt = halt if halt is not None else PersistentHalt(run_id)
    if halt.is_set:  # halted by an earlier run: no call at all
        summary.halt_error = halt.error
        summary.halted = list(items)
        for item in items:
            _report(item, "halted")
        return summary
    since = None if force or fresh_within is None else datetime.now(timezone.utc) - fresh_within
    fresh = warehouse.fetched_since(items, since, run_id)
    summary.skipped_fresh = [i for i in items if i in fresh]
    for item in summary.skipped_fresh:
        _report(item, "fresh")
    todo = [i for i in items if i not in fresh]
    if not todo:
        return summary

    sink = AttemptSink(warehouse, run_id)

    def on_attempt(attempt: Attempt) -> None:
        sink.add(attempt)
        if OUTCOME_ACTION[attempt.outcome] is not Action.RETRY or attempt.attempt >= settings.max_attempts:
            _report(attempt.item, attempt.outcome.value)

    # The API's cap holds across every run on this machine: each call also takes one of its host-wide slots.
    call_slots = CallSlots(api_slots_dir(), settings.concurrency)

    async def run() -> list[FetchResult]:
        async with AsyncTmapiClient(settings, halt=halt, on_attempt=on_attempt, call_slots=call_slots) as client:
            return await client.fetch_many(todo)

    try:
        results = asyncio.run(run())
    finally:
        sink.close()  # whatever happened, every paid answer received is stored (or left in the spool)
    for result in results:
        summary.calls += len(result.attempts)
        if result.ok:
            summary.landed.append(result.item)
        elif result.outcome == "halted":
            summary.halted.append(result.item)
            _report(result.item, "halted")
        else:
            summary.failed[result.item] = str(result.error)
    if halt.is_set:  # the first error that halted calls (this run's, or another run's via the halt file)
        summary.halt_error = halt.error
    return summary


@dataclass
class NormaliseSummary:
    items: int = 0
    sales_rows: int = 0
    price_rows: int = 0
    no_data: list[WatchedItem] = field(default_factory=list)
    missing: list[WatchedItem] = field(default_factory=list)  # no successful response stored yet
    parse_errors: dict[WatchedItem, str] = field(default_factory=dict)


def normalise_items(
    warehouse: Warehouse,
    items: Sequence[WatchedItem] | None = None,
    chunk_size: int = 2000,
    *,
    in_sql: bool = True,
) -> NormaliseSummary:
    """Parse the newest successful stored response of each item (every item when None); upsert statistics and
    trends (KPIs are Warehouse.refresh_kpis).

    Bodies of the plain documented shape are parsed and loaded in bulk inside DuckDB
    (Warehouse.load_stored_responses); every other body goes through parsing.parse_statistics, which reads the
    lenient forms ("12" for 12, " 11.0", duplicate dates, ...) or names the field it cannot read. Both give the
    same rows for the same body; in_sql=False sends every body through Python (tests compare the two).
    Never calls the API: run it again after a parser fix to rebuild everything from tmapi.raw_responses.
    """
    summary = NormaliseSummary()
    if in_sql:
        loaded = warehouse.load_stored_responses(items, _read_display)
        summary.items, summary.sales_rows, summary.price_rows = loaded.items, loaded.sales_rows, loaded.price_rows
        summary.no_data, summary.missing = loaded.no_data, loaded.missing
        if not loaded.left_to_python:
            return summary
        items = loaded.left_to_python
    stored = warehouse.latest_successes(items)
    if items is not None:
        have = {s.item for s in stored}
        summary.missing += [i for i in items if i not in have]
    for start in range(0, len(stored), chunk_size):
        observations: list[Observation] = []
        for response in stored[start : start + chunk_size]:
            try:
                # A body that was not valid UTF-8 is stored as text with U+FFFD and its exact bytes: refused here.
                text = response.body if response.exact_bytes is None else decode_body(response.exact_bytes)
                payload = _json_object(text)
                parsed = parse_statistics(payload.get("data"))
            except (MalformedDataError, ValueError) as exc:
                summary.parse_errors[response.item] = (
                    f"item {response.item}: stored response {response.response_id} cannot be parsed ({exc}); "
                    "it is kept in tmapi.raw_responses: fix the parser and run `tmapi-assets reparse`"
                )
                continue
            if parsed is None:
                summary.no_data.append(response.item)
            observations.append(Observation(response.item, response.response_id, response.fetched_at, parsed))
        loaded_rows = warehouse.load_observations(observations)
        summary.items += loaded_rows["items"]
        summary.sales_rows += loaded_rows["sales_rows"]
        summary.price_rows += loaded_rows["price_rows"]
    return summary


def _read_display(text: str) -> tuple[int | None, bool | None] | None:
    """A display total for the SQL path: (lower bound, approximate?), None if the Python path must refuse it."""
    try:
        count = parse_display_count(text)
    except MalformedDataError:
        return None
    return count.lower_bound, count.is_lower_bound


def _first_key_wins(pairs: list[tuple[str, object]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        obj.setdefault(key, value)
    return obj


def _json_object(body: str) -> dict:
    # Stored bodies are text; a BOM may have come with them. A key repeated in one object: the first counts, as in
    # DuckDB's JSON reader (the SQL path), so both paths read the same body the same way.
    try:
        payload = json.loads(body.lstrip("\ufeff"), object_pairs_hook=_first_key_wins)
    except RecursionError:
        raise MalformedDataError("response body is nested too deeply to be a sales statistics answer") from None
    if not isinstance(payload, dict):
        raise MalformedDataError("response body is not a JSON object")
    return payload
