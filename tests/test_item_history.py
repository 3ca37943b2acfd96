"""tmapi.item_history, kept up to date by every load from the rows it wrote, must always equal what all stored rows
say; the KPIs that read it (and only the last 31 days of each trend) must equal the KPI definitions. No network."""

import random
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from tmapi_assets.ids import WatchedItem
from tmapi_assets.parsing import parse_statistics
from tmapi_assets.warehouse import Observation, Warehouse

from test_warehouse import _kpis_by_hand

# The definitions of item_history's columns, straight from the trend tables.
HISTORY_BY_DEFINITION = """
WITH sales AS (
    SELECT item_id, spec_id, count(*) AS sales_days, min(date) AS first_sales_date, max(date) AS last_sales_date
    FROM tmapi.sales_trend_daily GROUP BY ALL),
priced AS (SELECT * FROM tmapi.price_trend_daily WHERE price_min IS NOT NULL),
prices AS (
    SELECT item_id, spec_id, count(*) AS price_days, min(date) AS first_price_date, max(date) AS last_price_date,
           min(price_min) AS lowest_price_min
    FROM priced GROUP BY ALL),
lowest AS (
    SELECT item_id, spec_id, max(date) AS lowest_price_date
    FROM priced p WHERE price_min = (SELECT min(price_min) FROM priced q WHERE q.item_id = p.item_id
                                                                        AND q.spec_id = p.spec_id)
    GROUP BY ALL)
SELECT item_id, spec_id, coalesce(sales_days, 0) AS sales_days, first_sales_date, last_sales_date,
       coalesce(price_days, 0) AS price_days, first_price_date, last_price_date, lowest_price_min, lowest_price_date
FROM sales FULL JOIN prices USING (item_id, spec_id) LEFT JOIN lowest USING (item_id, spec_id)
ORDER BY item_id, spec_id
"""
KEPT = "SELECT * FROM tmapi.item_history ORDER BY item_id, spec_id"


def observation(item: WatchedItem, n: int, fetched_at: datetime, sales: list[tuple], prices: list[tuple]) -> Observation:
    """A parsed response with these trend rows: sales (date, pieces, orders), prices (date, price_min, price_max)."""
    parsed = parse_statistics({
        "publish_time": "2024-03-01 10:00:00",
        "sales_quantity_30days": sum(q for _, q, _ in sales),
        "sales_quantity_total": "1.5万+",
        "order_quantity_total": 120,
        "sales_trend": [{"date": d.isoformat(), "sales_quantity": q, "order_quantity": o} for d, q, o in sales],
        "price_trend": [{"date": d.isoformat(), "price_min": None if lo is None else str(lo),
                         "price_max": None if hi is None else str(hi)} for d, lo, hi in prices],
    })
    return Observation(item, f"resp-{item.item_id}-{n}", fetched_at, parsed)


@pytest.fixture
def warehouse(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "tmapi.duckdb", lock_timeout_s=2)


def test_history_kept_by_loads_equals_the_definitions_after_every_load(warehouse):
    """Random loads of overlapping 30-day windows: days revised up and down, prices removed and restored, the
    lowest price's day raised, windows after a gap of weeks, older responses arriving late (they lose), an item with
    prices only. After each load, item_history equals its definition over all rows, and at the end the KPIs of the
    items with sales equal theirs."""
    rng = random.Random(20261204)
    items = [WatchedItem(1688000000100 + n, "" if n % 3 else "f0e1d2c3b4a5968778695a4b3c2d1e0f") for n in range(5)]
    items.append(WatchedItem(1688000000199))  # prices only: never a sales row
    today = {item: date(2025, 1, 1) for item in items}
    clock = datetime(2025, 1, 1, tzinfo=timezone.utc)
    for n in range(100):
        item = rng.choice(items)
        today[item] += timedelta(days=rng.choice([0, 1, 1, 2, 5, 45]))  # 45: a gap longer than the window
        clock += timedelta(hours=1)
        fetched_at = clock - timedelta(days=3) if rng.random() < 0.1 else clock  # late: older than what is stored
        days = [today[item] - timedelta(days=d) for d in range(rng.choice([1, 7, 30])) if rng.random() < 0.9]
        sales = [(d, rng.choice([0, 1, 5, 40]), rng.randint(0, 4)) for d in days if item != items[-1]]
        prices = [(d, None if rng.random() < 0.15 else Decimal(rng.choice(["8.00", "9.90", "12.50"])),
                   Decimal("20.00")) for d in days if rng.random() < 0.95]
        warehouse.load_observations([observation(item, n, fetched_at, sales, prices)])
        assert warehouse.records(KEPT) == warehouse.records(HISTORY_BY_DEFINITION), f"after load {n} ({item})"

    assert warehouse.refresh_kpis() == len(items)
    kpis = {(r["item_id"], r["spec_id"]): r for r in warehouse.records("SELECT * FROM tmapi.item_kpis")}
    for item in items[:-1]:  # (_kpis_by_hand needs sales rows)
        key = (item.item_id, item.spec_id)
        sales = [tuple(r.values()) for r in warehouse.records(
            "SELECT date, sales_quantity, order_quantity FROM tmapi.sales_trend_daily WHERE item_id = ? AND spec_id = ?",
            list(key))]
        prices = [tuple(r.values()) for r in warehouse.records(
            "SELECT date, price_min, price_max FROM tmapi.price_trend_daily WHERE item_id = ? AND spec_id = ?",
            list(key))]
        for column, value in _kpis_by_hand(sales, prices).items():
            if column.startswith("price_change_pct"):
                assert float(kpis[key][column]) == pytest.approx(value, abs=1e-4), (item, column)
            else:
                assert kpis[key][column] == value, (item, column)


def test_raising_the_lowest_price_day_recounts_the_lowest_from_all_rows(warehouse):
    item, day = WatchedItem(1688000000200), date(2025, 7, 1)
    at = datetime(2025, 7, 1, tzinfo=timezone.utc)
    first = [(day - timedelta(days=d), Decimal(p), Decimal("30")) for d, p in ((40, "7.00"), (20, "5.00"), (0, "9.00"))]
    warehouse.load_observations([observation(item, 1, at, [], first)])
    [history] = warehouse.records(KEPT)
    assert (history["lowest_price_min"], history["lowest_price_date"]) == (Decimal("5.00"), day - timedelta(days=20))
    # the 5.00 day is revised to 11.00: the lowest is now the 7.00 day, 40 days back, which this load did not carry
    warehouse.load_observations([observation(item, 2, at + timedelta(hours=1), [],
                                             [(day - timedelta(days=20), Decimal("11.00"), Decimal("30"))])])
    [history] = warehouse.records(KEPT)
    assert (history["lowest_price_min"], history["lowest_price_date"]) == (Decimal("7.00"), day - timedelta(days=40))
    # the last priced day loses its price: the last priced day moves back
    warehouse.load_observations([observation(item, 3, at + timedelta(hours=2), [], [(day, None, None)])])
    [history] = warehouse.records(KEPT)
    assert (history["last_price_date"], history["price_days"]) == (day - timedelta(days=20), 2)
    assert warehouse.records(KEPT) == warehouse.records(HISTORY_BY_DEFINITION)


def test_an_item_whose_only_priced_day_loses_its_price_leaves_item_history(warehouse):
    """Prices only, no sales rows: once its one priced day is unpriced, nothing is left to describe (and the KPIs
    have no lowest price and no last observed day for it)."""
    item, day, at = WatchedItem(1688000000250), date(2025, 7, 1), datetime(2025, 7, 1, tzinfo=timezone.utc)
    warehouse.load_observations([observation(item, 1, at, [], [(day, Decimal("5.00"), Decimal("9.00"))])])
    assert [r["price_days"] for r in warehouse.records(KEPT)] == [1]
    warehouse.load_observations([observation(item, 2, at + timedelta(hours=1), [], [(day, None, Decimal("9.00"))])])
    assert warehouse.records(KEPT) == warehouse.records(HISTORY_BY_DEFINITION) == []
    warehouse.refresh_kpis([item])
    [kpi] = warehouse.records("SELECT * FROM tmapi.item_kpis")
    assert (kpi["lowest_price_min"], kpi["last_observed_date"], kpi["history_days"]) == (None, None, 0)


def test_a_new_item_with_unpriced_days_alone_gets_no_row_as_a_recount_gives_none(warehouse):
    item, at = WatchedItem(1688000000260), datetime(2025, 7, 1, tzinfo=timezone.utc)
    warehouse.load_observations([observation(item, 1, at, [], [(date(2025, 7, 1), None, Decimal("9.00"))])])
    assert warehouse.records(KEPT) == warehouse.records(HISTORY_BY_DEFINITION) == []
    warehouse.rebuild_item_history()
    assert warehouse.records(KEPT) == []


def test_a_warehouse_from_before_item_history_gets_it_on_first_write(warehouse, tmp_path):
    item = WatchedItem(1688000000300)
    at = datetime(2025, 7, 1, tzinfo=timezone.utc)
    rows = [(date(2025, 6, 1) + timedelta(days=d), Decimal("4.50") + d, Decimal("9")) for d in range(10)]
    warehouse.load_observations([observation(item, 1, at, [(d, 3, 1) for d, _, _ in rows], rows)])
    expected = warehouse.records(KEPT)
    with warehouse.connect() as conn:
        conn.execute("DROP TABLE tmapi.item_history")  # as a file written by an earlier version
    reopened = Warehouse(warehouse.path, lock_timeout_s=2)
    assert reopened.records(KEPT) == expected
    assert expected[0]["sales_days"] == 10 and expected[0]["lowest_price_date"] == date(2025, 6, 1)
