"""The warehouse: raw storage, normalise + upsert, KPIs in SQL, lock discipline. No network."""

import json
import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import hold_lock
from tmapi_assets import pipeline
from tmapi_assets.client import Attempt
from tmapi_assets.errors import Outcome, WarehouseError, WarehouseLockedError
from tmapi_assets.ids import WatchedItem
from tmapi_assets.warehouse import ROW_GROUP_ROWS, Warehouse

FIXTURE = Path(__file__).parent / "fixtures" / "doc_example_full.json"
DOC_ITEM = WatchedItem(652702302959)


def doc_body() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def attempt(item: WatchedItem, body: dict | bytes | None, *, outcome=Outcome.SUCCESS, status=200,
            at: datetime | None = None, n: int = 1) -> Attempt:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode() if body else b""
    return Attempt(
        item=item, attempt=n, fetched_at=at or datetime.now(timezone.utc), elapsed_ms=12.5, http_status=status,
        api_code=200 if outcome in (Outcome.SUCCESS, Outcome.NO_DATA) else status, outcome=outcome, body=raw,
        request_url=f"http://127.0.0.1/1688/item/statistics/sales?item_id={item.item_id}", message=None,
    )


def shifted(body: dict, days: int, sales_factor: int = 1) -> dict:
    """The same response seen `days` later: every date moved, sales scaled (so overlapping days differ)."""
    body = json.loads(json.dumps(body))
    for key in ("sales_trend", "price_trend"):
        for row in body["data"][key]:
            row["date"] = (date.fromisoformat(row["date"]) + timedelta(days=days)).isoformat()
            if key == "sales_trend":
                row["sales_quantity"] *= sales_factor
    return body


@pytest.fixture
def warehouse(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "tmapi.duckdb", lock_timeout_s=2)


def test_doc_example_lands_with_the_documented_figures(warehouse):
    warehouse.record_attempts([attempt(DOC_ITEM, doc_body())], run_id="r1")
    summary = pipeline.normalise_items(warehouse, [DOC_ITEM])
    warehouse.refresh_kpis([DOC_ITEM])
    assert (summary.items, summary.sales_rows, summary.price_rows) == (1, 30, 29)
    stats = warehouse.query("SELECT * FROM tmapi.item_statistics").iloc[0]
    assert stats.sales_quantity_30days == 3985 and stats.sum30_observed == 3985 and bool(stats.sum30_ok)
    assert stats.sales_quantity_total_lower_bound == 15000 and bool(stats.sales_quantity_total_is_lower_bound)
    assert stats.sales_quantity_total_raw == "1.5万+"
    assert stats.order_quantity_total_lower_bound == 3500 and bool(stats.order_quantity_total_is_lower_bound)
    # publish_time "2024-06-27 09:22:26" is China time: 01:22:26 UTC.
    assert stats.publish_time.to_pydatetime() == datetime(2024, 6, 27, 1, 22, 26, tzinfo=timezone.utc)
    assert warehouse.query("SELECT sum(sales_quantity) s FROM tmapi.sales_trend_daily").s[0] == 3985


def test_kpis_match_an_independent_computation_from_the_fixture(warehouse):
    data = doc_body()["data"]
    warehouse.record_attempts([attempt(DOC_ITEM, doc_body())], run_id="r1")
    pipeline.normalise_items(warehouse, [DOC_ITEM])
    warehouse.refresh_kpis([DOC_ITEM])
    [kpi] = warehouse.records("SELECT * FROM tmapi.item_kpis")
    kpi = type("Row", (), kpi)

    sales = sorted(data["sales_trend"], key=lambda r: r["date"])
    prices = sorted(data["price_trend"], key=lambda r: r["date"])
    last_sales = date.fromisoformat(sales[-1]["date"])
    last_price = date.fromisoformat(prices[-1]["date"])
    in_window = lambda r, n: date.fromisoformat(r["date"]) > last_sales - timedelta(days=n)  # noqa: E731
    assert kpi.units_7d == sum(r["sales_quantity"] for r in sales if in_window(r, 7))
    assert kpi.units_30d == 3985
    orders = sum(r["order_quantity"] for r in sales if in_window(r, 30))
    assert kpi.orders_30d == orders
    assert kpi.units_per_order_30d == (Decimal(3985) / Decimal(orders)).quantize(Decimal("0.0001"))
    assert kpi.zero_sales_days_30d == sum(1 for r in sales if r["sales_quantity"] == 0)
    assert kpi.latest_price_min == Decimal(prices[-1]["price_min"])
    assert kpi.latest_price_max == Decimal(prices[-1]["price_max"])
    assert kpi.lowest_price_min == min(Decimal(r["price_min"]) for r in prices)
    assert kpi.last_observed_date == max(last_sales, last_price)
    assert kpi.days_since_publish == (max(last_sales, last_price) - date(2024, 6, 27)).days
    assert kpi.history_days == 30


def test_prices_are_stored_as_decimal_not_float(warehouse):
    warehouse.record_attempts([attempt(DOC_ITEM, doc_body())], run_id="r1")
    pipeline.normalise_items(warehouse, [DOC_ITEM])
    types = warehouse.query(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'tmapi' AND column_name IN ('price_min', 'price_max')"
    )
    assert set(types.data_type) == {"DECIMAL(18,4)"}
    with warehouse.connect() as conn:
        value = conn.execute("SELECT price_min FROM tmapi.price_trend_daily LIMIT 1").fetchone()[0]
    assert isinstance(value, Decimal)


def test_reloading_the_same_response_never_duplicates(warehouse):
    for _ in range(3):
        warehouse.record_attempts([attempt(DOC_ITEM, doc_body())], run_id="r")
        pipeline.normalise_items(warehouse, [DOC_ITEM])
        warehouse.refresh_kpis([DOC_ITEM])
    counts = warehouse.table_counts()
    assert counts == {"raw_responses": 3, "item_statistics": 1, "sales_trend_daily": 30, "price_trend_daily": 29,
                      "item_history": 1, "item_kpis": 1}


def test_history_grows_past_the_window_and_newer_responses_win(warehouse):
    t0 = datetime(2025, 7, 24, 1, tzinfo=timezone.utc)
    warehouse.record_attempts([attempt(DOC_ITEM, doc_body(), at=t0)], run_id="day1")
    pipeline.normalise_items(warehouse, [DOC_ITEM])
    # Ten days later the window has moved: 10 new dates, 20 overlapping ones with revised (doubled) sales.
    later = shifted(doc_body(), 10, sales_factor=2)
    warehouse.record_attempts([attempt(DOC_ITEM, later, at=t0 + timedelta(days=10))], run_id="day11")
    pipeline.normalise_items(warehouse, [DOC_ITEM])
    assert warehouse.table_counts()["sales_trend_daily"] == 40
    newest = {r["date"]: r["sales_quantity"] for r in later["data"]["sales_trend"]}
    stored = warehouse.query("SELECT CAST(date AS VARCHAR) d, sales_quantity q FROM tmapi.sales_trend_daily")
    for d, q in zip(stored.d, stored.q):
        if d in newest:
            assert q == newest[d]


def test_an_older_response_loaded_late_does_not_overwrite_newer_values(warehouse):
    t0 = datetime(2025, 7, 24, 1, tzinfo=timezone.utc)
    newer = shifted(doc_body(), 0, sales_factor=3)
    warehouse.record_attempts([attempt(DOC_ITEM, newer, at=t0 + timedelta(hours=5))], run_id="a")
    pipeline.normalise_items(warehouse, [DOC_ITEM])
    from tmapi_assets.parsing import parse_statistics
    from tmapi_assets.warehouse import Observation

    older = Observation(DOC_ITEM, "old", t0, parse_statistics(doc_body()["data"]))
    warehouse.load_observations([older])
    assert warehouse.query("SELECT sum(sales_quantity) s FROM tmapi.sales_trend_daily").s[0] == 3 * 3985


@pytest.mark.parametrize("in_sql", [True, False])
def test_the_newest_successful_answer_counts_whatever_order_they_were_stored_in(warehouse, in_sql):
    t0 = datetime(2025, 7, 24, 1, tzinfo=timezone.utc)
    newest, older = shifted(doc_body(), 0, sales_factor=5), shifted(doc_body(), 0, sales_factor=2)
    warehouse.record_attempts([attempt(DOC_ITEM, newest, at=t0 + timedelta(days=2))], run_id="stored-first")
    warehouse.record_attempts([attempt(DOC_ITEM, older, at=t0 + timedelta(days=1)),
                               attempt(DOC_ITEM, doc_body(), at=t0),
                               attempt(DOC_ITEM, {"code": 503, "msg": "busy"}, outcome=Outcome.TRANSIENT, status=503,
                                       at=t0 + timedelta(days=3))], run_id="stored-later")
    pipeline.normalise_items(warehouse, [DOC_ITEM], in_sql=in_sql)
    assert warehouse.query("SELECT sum(sales_quantity) s FROM tmapi.sales_trend_daily").s[0] == 5 * 3985
    assert warehouse.records("SELECT fetched_at FROM tmapi.item_statistics")[0]["fetched_at"] == t0 + timedelta(days=2)


def test_no_data_response_is_an_empty_observation_not_a_crash(warehouse):
    item = WatchedItem(624282357434)
    warehouse.record_attempts([attempt(item, {"code": 200, "msg": "success", "data": None}, outcome=Outcome.NO_DATA)],
                              run_id="r")
    summary = pipeline.normalise_items(warehouse, [item])
    warehouse.refresh_kpis([item])
    assert summary.no_data == [item]
    stats = warehouse.query("SELECT has_data, sales_rows FROM tmapi.item_statistics").iloc[0]
    assert not stats.has_data and stats.sales_rows == 0
    assert len(warehouse.query("SELECT * FROM tmapi.item_kpis")) == 1


def test_spec_ids_are_separate_keys_and_never_null(warehouse):
    spec = WatchedItem(652702302959, "5b2a1c4d")
    warehouse.record_attempts([attempt(DOC_ITEM, doc_body()), attempt(spec, shifted(doc_body(), 0, 2))], run_id="r")
    pipeline.normalise_items(warehouse, [DOC_ITEM, spec])
    per_key = warehouse.query(
        "SELECT spec_id, sum(sales_quantity) s FROM tmapi.sales_trend_daily GROUP BY spec_id ORDER BY spec_id")
    assert list(per_key.spec_id) == ["", "5b2a1c4d"] and list(per_key.s) == [3985, 7970]
    assert warehouse.query("SELECT count(*) n FROM tmapi.sales_trend_daily WHERE spec_id IS NULL").n[0] == 0


def test_unparseable_stored_response_is_reported_and_kept(warehouse):
    bad = doc_body()
    bad["data"]["sales_trend"][3]["date"] = "2025-13-45"
    warehouse.record_attempts([attempt(DOC_ITEM, bad)], run_id="r")
    summary = pipeline.normalise_items(warehouse, [DOC_ITEM])
    assert DOC_ITEM in summary.parse_errors and "reparse" in summary.parse_errors[DOC_ITEM]
    assert warehouse.table_counts()["raw_responses"] == 1
    assert warehouse.table_counts()["sales_trend_daily"] == 0


def test_non_utf8_body_is_kept_byte_exact(warehouse):
    raw = b'{"code": 500, "msg": "\xff\xfe broken"}'
    warehouse.record_attempts([attempt(DOC_ITEM, raw, outcome=Outcome.TRANSIENT, status=500)], run_id="r")
    with warehouse.connect() as conn:
        body, exact = conn.execute("SELECT body, body_bytes FROM tmapi.raw_responses").fetchone()
    assert exact == raw and "broken" in body


def test_views_join_on_date_and_count_calls(warehouse):
    warehouse.record_attempts([attempt(DOC_ITEM, doc_body())], run_id="r")
    pipeline.normalise_items(warehouse, [DOC_ITEM])
    daily = warehouse.query("SELECT * FROM tmapi.item_daily ORDER BY date")
    assert len(daily) == 30 and daily.price_min.isna().sum() == 1  # the last sales day has no price row
    calls = warehouse.query("SELECT sum(calls) c FROM tmapi.api_calls_daily")
    assert calls.c[0] == 1


def test_a_failed_publish_says_what_to_do_and_keeps_the_previous_copy(warehouse, tmp_path, monkeypatch):
    import os

    warehouse.record_attempts([attempt(DOC_ITEM, doc_body())], run_id="r")
    pipeline.normalise_items(warehouse, [DOC_ITEM])
    copy = tmp_path / "read" / "copy.duckdb"
    warehouse.publish_read_copy(copy)
    before = copy.read_bytes()
    warehouse.record_attempts([attempt(WatchedItem(624282357434), doc_body())], run_id="r2")
    real_replace = os.replace

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WarehouseError, match="No space left on device.*unchanged.*tmapi-assets publish"):
        warehouse.publish_read_copy(copy)
    monkeypatch.setattr(os, "replace", real_replace)
    assert copy.read_bytes() == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.duckdb"]  # no staging file left behind


def test_a_publish_under_a_file_is_a_clear_error(warehouse, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WarehouseError, match="could not publish the read copy.*tmapi-assets publish"):
        warehouse.publish_read_copy(blocker / "copy.duckdb")


def test_freshness_query(warehouse):
    now = datetime.now(timezone.utc)
    other = WatchedItem(624282357434)
    warehouse.record_attempts([attempt(DOC_ITEM, doc_body(), at=now - timedelta(hours=2)),
                               attempt(other, doc_body(), at=now - timedelta(hours=30))], run_id="r")
    assert warehouse.fetched_since([DOC_ITEM, other], now - timedelta(hours=20)) == {DOC_ITEM}


def test_locked_file_fails_within_the_timeout_naming_the_holder(tmp_path):
    path = tmp_path / "tmapi.duckdb"
    Warehouse(path).ensure_schema()
    holder = hold_lock(path, seconds=60)
    try:
        started = time.monotonic()
        with pytest.raises(WarehouseLockedError) as info:
            Warehouse(path, lock_timeout_s=1.0).table_counts()
        waited = time.monotonic() - started
        assert 0.9 <= waited < 10
        assert f"PID {holder.pid}" in str(info.value) and "run again" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    assert Warehouse(path).table_counts()["raw_responses"] == 0  # usable again once the holder is gone


def _other_process_reads(path: Path, sql: str) -> str:
    """What another process (a BI tool, dbt) gets from the file right now: its answer, or its error's last line."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import duckdb; print(duckdb.connect({str(path)!r}).execute("
                           f"{sql!r}).fetchall())"], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


def test_each_unit_of_work_releases_the_file_checkpointed(warehouse):
    """Units of work share one DuckDB instance in the process, but each attaches the file and detaches it: between
    them another process can open the file, and it finds every committed row in the file itself (no WAL left)."""
    warehouse.record_attempts([attempt(DOC_ITEM, doc_body())], "run-1")
    assert not Path(f"{warehouse.path}.wal").exists()
    assert _other_process_reads(warehouse.path, "SELECT count(*) FROM tmapi.tmapi.raw_responses") == "[(1,)]"
    with pytest.raises(RuntimeError, match="boom"):  # a unit of work that fails in the middle of a transaction
        with warehouse.connect() as conn:
            conn.execute("BEGIN TRANSACTION")
            conn.execute("DELETE FROM tmapi.raw_responses")
            raise RuntimeError("boom")
    assert _other_process_reads(warehouse.path, "SELECT count(*) FROM tmapi.tmapi.raw_responses") == "[(1,)]"
    assert warehouse.table_counts()["raw_responses"] == 1


def test_ledger_row_groups_stay_small_so_a_checkpoint_never_rebuilds_many_bodies_in_memory(tmp_path):
    """Each ledger flush leaves a small row group and checkpoints merge them: into groups of ROW_GROUP_ROWS (which
    bounds the memory a merge takes, docs/benchmarks.md), not DuckDB's default of 122,880 rows."""
    def row_groups_after_appends(warehouse: Warehouse) -> list[int]:
        for batch in range(16):
            warehouse.record_attempts(
                [attempt(WatchedItem(1 + batch * 1000 + k), b'{"code": 200, "data": null}') for k in range(1000)],
                f"run-{batch}")
        return [r["n"] for r in warehouse.records(
            "SELECT row_group_id, max(count) AS n FROM pragma_storage_info('tmapi.raw_responses') "
            "WHERE column_name = 'body' GROUP BY ALL ORDER BY ALL")]

    project = row_groups_after_appends(Warehouse(tmp_path / "project.duckdb", lock_timeout_s=2))
    assert sum(project) == 16_000 and max(project) <= ROW_GROUP_ROWS
    assert len(project) < 16  # (the small groups are still merged, up to that size)
    duckdb_default = row_groups_after_appends(Warehouse(tmp_path / "default.duckdb", row_group_rows=122_880))
    assert max(duckdb_default) > ROW_GROUP_ROWS  # what the setting prevents


def test_units_of_work_on_two_files_at_once_and_a_publish_do_not_meet(tmp_path):
    """Two warehouses used by two threads at the same moment each see their own file; the publish's instance-wide
    settings (one thread, 64 MB) stay in its own DuckDB instance."""
    import threading

    first, second = Warehouse(tmp_path / "a.duckdb"), Warehouse(tmp_path / "b.duckdb")
    second.record_attempts([attempt(DOC_ITEM, doc_body()), attempt(WatchedItem(610947572360), doc_body())], "r")
    first.ensure_schema()
    inside, seen = threading.Barrier(2, timeout=30), {}

    def count(name: str, warehouse: Warehouse) -> None:
        with warehouse.connect() as conn:
            inside.wait()  # both files attached at once
            seen[name] = conn.execute("SELECT count(*) FROM tmapi.raw_responses").fetchone()[0]

    threads = [threading.Thread(target=count, args=(n, w)) for n, w in (("a", first), ("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": 0, "b": 2}
    with second.connect() as conn:
        default_threads = conn.execute("SELECT current_setting('threads')").fetchone()[0]
    second.publish_read_copy(tmp_path / "read.duckdb")
    with second.connect() as conn:
        assert conn.execute("SELECT current_setting('threads')").fetchone()[0] == default_threads
        assert conn.execute("SELECT current_setting('TimeZone')").fetchone()[0] == "UTC"


def _kpis_by_hand(sales: list[tuple], prices: list[tuple]) -> dict:
    """The KPI definitions (kpis.sql's header) computed in Python for one item's rows: sales (date, pieces, orders),
    prices (date, price_min, price_max)."""
    out = {}
    last_sales = max(d for d, _, _ in sales)
    window = [r for r in sales if r[0] > last_sales - timedelta(days=30)]
    out["units_7d"] = sum(q for d, q, _ in sales if d > last_sales - timedelta(days=7))
    out["units_30d"] = sum(q for _, q, _ in window)
    out["orders_30d"] = sum(o for _, _, o in window)
    out["zero_sales_days_30d"] = sum(1 for _, q, _ in window if q == 0)
    out["history_days"] = len(sales)
    priced = sorted(r for r in prices if r[1] is not None)
    last_price = priced[-1][0]
    out["latest_price_min"], out["latest_price_max"] = priced[-1][1], priced[-1][2]
    for n in (7, 30):
        before = [r for r in priced if r[0] <= last_price - timedelta(days=n)]
        reference = (before[-1] if before else priced[0])[1]
        out[f"price_change_pct_{n}d"] = round(100 * float(out["latest_price_min"] - reference) / float(reference), 4)
    out["lowest_price_min"] = min(p for _, p, _ in priced)
    out["lowest_price_date"] = max(d for d, p, _ in priced if p == out["lowest_price_min"])
    out["last_observed_date"] = max(last_sales, last_price)
    return out


def test_kpis_over_long_gappy_histories_match_the_definitions_for_all_items_and_for_some(warehouse):
    """History longer than the windows, gaps (a reference day that is not exactly 7 or 30 days back), histories
    shorter than 7 days, unpriced days, a lowest price seen twice: the SQL gives the definitions' values, whether
    the KPIs are recomputed for every item (no scope joins) or for a few (the others are left as they were)."""
    import random

    rng = random.Random(7)
    end, rows_sales, rows_prices, expected = date(2025, 7, 23), [], [], {}
    for n in range(25):
        item = WatchedItem(1688000000000 + n, "" if n % 5 else "spec-a")
        days = sorted(rng.sample(range(400), rng.choice([1, 3, 6, 40, 120, 300])))
        sales = [(end - timedelta(days=d), rng.choice([0, 0, 3, 17, 250]), rng.randint(0, 9)) for d in days]
        prices = [(end - timedelta(days=d), None if rng.random() < 0.1 else Decimal(rng.choice(["9.90", "12.50", "8.00",
                   "15.25"])), Decimal("99.00")) for d in days]
        if all(p is None for _, p, _ in prices):
            prices[0] = (prices[0][0], Decimal("10.00"), Decimal("99.00"))
        rows_sales += [(item.item_id, item.spec_id, *r) for r in sales]
        rows_prices += [(item.item_id, item.spec_id, *r) for r in prices]
        expected[(item.item_id, item.spec_id)] = _kpis_by_hand(sales, prices)
    import pandas as pd

    sales_frame = pd.DataFrame(rows_sales, columns=["item_id", "spec_id", "date", "sales_quantity", "order_quantity"])
    price_frame = pd.DataFrame(rows_prices, columns=["item_id", "spec_id", "date", "price_min", "price_max"])
    with warehouse.connect() as conn:
        conn.register("sales_frame", sales_frame)
        conn.register("price_frame", price_frame)
        conn.execute("INSERT INTO tmapi.sales_trend_daily SELECT *, now() FROM sales_frame")
        conn.execute("INSERT INTO tmapi.price_trend_daily SELECT item_id, spec_id, date, CAST(price_min AS "
                     "DECIMAL(18, 4)), CAST(price_max AS DECIMAL(18, 4)), now() FROM price_frame")
    warehouse.rebuild_item_history()  # (rows written behind the loads' back)
    columns = sorted(next(iter(expected.values())))

    def stored() -> dict:
        return {(r["item_id"], r["spec_id"]): {c: r[c] for c in columns}
                for r in warehouse.records("SELECT * FROM tmapi.item_kpis")}

    assert warehouse.refresh_kpis() == len(expected)
    every_item = stored()
    for key, by_hand in expected.items():
        got = every_item[key]
        for column in columns:
            if column.startswith("price_change_pct"):
                assert float(got[column]) == pytest.approx(by_hand[column], abs=1e-4), (key, column)
            else:
                assert got[column] == by_hand[column], (key, column)
    some = [WatchedItem(*key) for key in list(expected)[:6]]
    with warehouse.connect() as conn:
        conn.execute("UPDATE tmapi.item_kpis SET units_7d = -1")  # stale values the scoped recompute must leave
    assert warehouse.refresh_kpis(some) == 6
    scoped = stored()
    for key in expected:
        if WatchedItem(*key) in some:
            assert scoped[key] == every_item[key]
        else:
            assert scoped[key]["units_7d"] == -1
