"""The warehouse: ALL SQL and DuckDB access of the project lives here (DDL in schema.sql, KPIs in kpis.sql).

Plain Python (no Dagster). Rules it keeps:
- writes are bulk (a DataFrame scanned by DuckDB), never row by row, each in one short transaction;
- the file is attached per unit of work and detached at once: never held across network calls, so other
  processes (BI tools, dbt, a second run) get the file between our writes;
- DuckDB allows one writing process per file: opening waits a bounded time, then raises WarehouseLockedError
  naming the PID that holds the file.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from tmapi_assets import config
from tmapi_assets.errors import Outcome, WarehouseError, WarehouseLockedError
from tmapi_assets.ids import WatchedItem
from tmapi_assets.parsing import MAX_INT

if TYPE_CHECKING:
    import pandas as pd

    from tmapi_assets.client import Attempt
    from tmapi_assets.parsing import ParsedStatistics

SCHEMA = "tmapi"
# The file is attached under this alias: opened directly, data/tmapi.duckdb is a catalog named "tmapi" holding a
# schema named "tmapi", and DuckDB rejects "tmapi.table" as ambiguous. (Readers: see docs/schema.md.)
CATALOG = "warehouse"
TABLES = (
    "raw_responses",
    "item_statistics",
    "sales_trend_daily",
    "price_trend_daily",
    "item_history",
    "item_kpis",
)
_SUCCESS_OUTCOMES = (Outcome.SUCCESS.value, Outcome.NO_DATA.value)
# Rows per row group of every table this project writes (DuckDB's default: 122,880). Each write leaves a small row
# group (each ledger flush: several per run); a later checkpoint (every DETACH) merges them, in steps, into groups
# of this size, building each merged group in memory. At the default that meant every stored answer body of up to
# 122,880 rows: a 200-answer flush took +400 MB once raw_responses held ~60,000 answers (a week of a 10,000-item
# watch list), and kept growing. At 4,096 it stays at ~+75 MB (~+145 MB at 8,192), which is what keeps a refresh's
# peak memory from growing with the watch list; the price: a full KPI recompute ~25% slower than at 8,192
# (docs/benchmarks.md). DuckDB does not store the size in the file: it applies to the writes of the session that
# ATTACHes with it, so every ATTACH of the warehouse file for writing gives it (the read copy is written whole,
# nothing to merge). Row groups written before are kept as they are.
ROW_GROUP_ROWS = 4096
_LOCK_PID = re.compile(r"PID (\d+)")


_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.RLock:
    key = os.path.realpath(path)
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.RLock())


# One in-memory DuckDB instance per process for every unit of work: each is a cursor on it (its own session: USE,
# TimeZone, temp tables) that attaches the file under an alias of its own and detaches it at the end. Starting a
# DuckDB instance costs ~20 ms, and a 1,000-item refresh opened ~60 (~1.2 s, much of it on the runs' critical path);
# ATTACH + DETACH cost ~3 ms. DETACH checkpoints and releases the file's lock, as closing an instance did.
_SHARED: dict[str, Any] = {"instance": None, "pid": None}
_SHARED_GUARD = threading.Lock()
_ALIASES = itertools.count(1)


def _shared_session() -> tuple[duckdb.DuckDBPyConnection, str]:
    """(a new cursor on this process's DuckDB instance, a catalog alias no other unit of work uses)."""
    with _SHARED_GUARD:
        if _SHARED["instance"] is None or _SHARED["pid"] != os.getpid():  # (a forked child starts its own)
            _SHARED["instance"], _SHARED["pid"] = duckdb.connect(), os.getpid()
        return _SHARED["instance"].cursor(), f"{CATALOG}_{next(_ALIASES)}"


def _end_shared_session(conn: duckdb.DuckDBPyConnection, alias: str) -> None:
    try:
        with suppress(duckdb.TransactionException):  # "no transaction is active": the usual case
            conn.execute("ROLLBACK")  # what a unit of work that failed left uncommitted
        conn.execute("USE memory")
        conn.execute(f"DETACH {alias}")
    except duckdb.Error:
        # The file may still be attached, and locked, in that instance: the next unit of work starts a new one, and
        # this one ends (releasing the file) when its last cursor closes.
        with _SHARED_GUARD:
            _SHARED["instance"] = None
        raise
    finally:
        conn.close()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _holder_description(message: str) -> str:
    """'PID 1234 (python -m dbt …)' from DuckDB's lock error text, as far as /proc tells."""
    match = _LOCK_PID.search(message)
    if not match:
        return "another process"
    pid = match.group(1)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    return f"PID {pid}" + (f" ({cmdline[:120]})" if cmdline else "")


@dataclass(frozen=True)
class StoredResponse:
    """A successful raw response read back for parsing."""

    item: WatchedItem
    response_id: str
    fetched_at: datetime
    body: str
    exact_bytes: bytes | None = None  # set when the body was not valid UTF-8 (then `body` has U+FFFD in places)


@dataclass(frozen=True)
class Observation:
    """One parsed response, ready to load. parsed None = the API said data: null (no statistics)."""

    item: WatchedItem
    response_id: str
    fetched_at: datetime
    parsed: ParsedStatistics | None


# A display total as read by parsing.parse_display_count: (lower bound, approximate?), or None when the Python
# parser must handle the whole response (the text is refused there, with its reason).
DisplayReader = Callable[[str], "tuple[int | None, bool | None] | None"]


@dataclass
class StoredLoad:
    """What Warehouse.load_stored_responses did."""

    items: int = 0  # statistics rows written
    sales_rows: int = 0
    price_rows: int = 0
    no_data: list[WatchedItem] = field(default_factory=list)
    left_to_python: list[WatchedItem] = field(default_factory=list)  # bodies not of the plain shape
    missing: list[WatchedItem] = field(default_factory=list)  # asked for, but no successful response stored


# The plain, documented body shape, read by DuckDB's JSON reader in two passes: the response's own fields (the trends
# only as lists of NULLs: whether each is a list, and how long), then both trends, straight into typed rows. Leaves
# are read as text and checked below exactly as strictly as the Python parser would; the two display totals stay
# JSON (their type matters).
_BODY_SHAPE = (
    '{"data": {"publish_time": "VARCHAR", "sales_quantity_30days": "VARCHAR", "sales_quantity_total": "JSON", '
    '"order_quantity_total": "JSON", "sales_trend": ["NULL"], "price_trend": ["NULL"]}}'
)
_TRENDS_SHAPE = (
    '{"data": {"sales_trend": [{"date": "VARCHAR", "sales_quantity": "VARCHAR", "order_quantity": "VARCHAR"}], '
    '"price_trend": [{"date": "VARCHAR", "price_min": "VARCHAR", "price_max": "VARCHAR"}]}}'
)

# Each value is checked as strictly as the Python parser checks it; a body with anything else (a quantity "12.0",
# " 12" or "012", a price "11,0", a date "2025-6-24", a repeated date, more than 30 sales rows, a display total that
# is a float, ...) goes to the Python parser whole. Written-back casts ("is it its own canonical text?") instead of
# regular expressions where possible: these run on every value.
_QUANTITY_OK = "({0} IS NULL OR (TRY_CAST({0} AS BIGINT) >= 0 AND CAST(TRY_CAST({0} AS BIGINT) AS VARCHAR) = {0}))"
_PRICE_OK = r"({0} IS NULL OR regexp_full_match({0}, '0*[0-9]{{1,12}}(\.[0-9]{{1,4}})?'))"
# (length 10: DuckDB also writes back "infinity", "10000-01-01" and "0001-01-01 (BC)" unchanged)
_DATE_OK = "(length({0}) = 10 AND CAST(TRY_CAST({0} AS DATE) AS VARCHAR) = {0})"
# Publish times before 1992 go to Python (the reference): China had summer time 1986-91 and local mean time before
# 1901, where two tz databases could disagree.
_PUBLISH_OK = r"""(publish_time_text IS NULL
    OR (regexp_full_match(publish_time_text, '[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}')
        AND year(try_strptime(publish_time_text, '%Y-%m-%d %H:%M:%S')) BETWEEN 1992 AND 2199))"""
_DISPLAY_TYPE_OK = """(coalesce({0}_total_type, 'NULL') IN ('NULL', 'VARCHAR')
    OR ({0}_total_type = 'UBIGINT' AND TRY_CAST({0}_total_json AS BIGINT) IS NOT NULL))"""
# The response's own fields (per response, in the parse).
_BODY_OK = " AND ".join([
    _PUBLISH_OK,
    _QUANTITY_OK.format("sales_30_text"),
    _DISPLAY_TYPE_OK.format("sales"),
    _DISPLAY_TYPE_OK.format("order"),
    "sales_rows <= 30",  # so the 30-day check sums every row
])
# The trend rows, checked one row at a time once unnested (in norm_rows, next to the typed values they load), then
# per response (norm_trend_checks): every row passes, no date is repeated, the daily sales sum to at most MAX_INT.
# A response any of these fails goes to Python whole, as one _BODY_OK fails does.
_SALES_ROW_OK = " AND ".join(
    ["sales_date_ok", _QUANTITY_OK.format("s.sales_quantity"), _QUANTITY_OK.format("s.order_quantity")])
# (a price_max equal to its price_min passes exactly when that one does: its regular expression is skipped, CASE
# evaluating a branch only on the rows that take it)
# A price row's date is mostly its sales row's (same_date): then it is checked and cast once.
_PRICE_ROW_OK = " AND ".join([
    f"CASE WHEN same_date THEN sales_date_ok ELSE {_DATE_OK.format('p.date')} END", _PRICE_OK.format("p.price_min"),
    f"CASE WHEN p.price_max = p.price_min THEN true ELSE {_PRICE_OK.format('p.price_max')} END"])

# The newest successful response per (item, spec), as row ids. Only the narrow key columns are scanned: the bodies
# are then read for those rows alone (raw_responses keeps every answer ever paid for; carrying every body of an
# item's history through a window cost 0.4 s and 400 MB per 200 items at 300 answers each).
_NEWEST_SUCCESS_ROWS = f"""
    SELECT arg_max(r.rowid, (r.fetched_at, r.response_id)) FROM tmapi.raw_responses r {{scope}}
    WHERE r.outcome IN {_SUCCESS_OUTCOMES} GROUP BY r.item_id, r.spec_id"""

# Step 1: the newest successful response per item, parsed and checked: norm_responses, one row per response (kind:
# 'data', 'no_data' (data null or absent) or 'python'); then norm_rows, its trend rows typed and checked, of the
# 'data' ones, sales and price side by side (DuckDB unnests lists of one SELECT together, the shorter padded with
# NULLs). Storing the trends as nested lists of text, to unnest later, cost more than reading the bodies twice.
# json_type() parses a body again, so it runs only where the reader left a container NULL (data or a trend absent,
# null, or of the wrong type). A NULL list element gives no row: the rows then fall short of the list's length.
_NORMALISE_PARSE_SQL = """
CREATE OR REPLACE TEMP TABLE norm_responses AS
WITH picked AS MATERIALIZED (  -- (materialized: parsing in the same pipeline as the row-id filter was 1.7x slower)
    SELECT r.rowid AS raw_rowid, r.response_id, r.item_id, r.spec_id, r.fetched_at, r.body, r.body_bytes
    FROM tmapi.raw_responses r WHERE r.rowid IN ({newest_rows})
),
newest AS (
    SELECT raw_rowid, response_id, item_id, spec_id, fetched_at, body,
           CASE WHEN body_bytes IS NULL THEN TRY(from_json(body, '{shape}')) END AS doc
    FROM picked
),
typed AS (
    SELECT *,
           CASE WHEN doc IS NOT NULL
                     AND (doc.data IS NULL OR doc.data.sales_trend IS NULL OR doc.data.price_trend IS NULL)
                THEN json_type(body, ['$', '$.data', '$.data.sales_trend', '$.data.price_trend']) END AS types
    FROM newest
),
parsed AS (
    SELECT raw_rowid, response_id, item_id, spec_id, fetched_at,
        CASE
            WHEN doc IS NULL THEN 'python'                   -- not JSON, or not UTF-8
            WHEN types IS NULL THEN 'data'
            WHEN types[1] IS DISTINCT FROM 'OBJECT' THEN 'python'
            WHEN coalesce(types[2], 'NULL') = 'NULL' THEN 'no_data'
            WHEN types[2] <> 'OBJECT' OR coalesce(types[3], 'NULL') NOT IN ('NULL', 'ARRAY')
                 OR coalesce(types[4], 'NULL') NOT IN ('NULL', 'ARRAY') THEN 'python'
            ELSE 'data'
        END AS shape_kind,
        doc.data.publish_time                                    AS publish_time_text,
        doc.data.sales_quantity_30days                           AS sales_30_text,
        json_type(doc.data.sales_quantity_total)                 AS sales_total_type,
        CAST(doc.data.sales_quantity_total AS VARCHAR)           AS sales_total_json,
        doc.data.sales_quantity_total ->> '$'                    AS sales_total_text,
        json_type(doc.data.order_quantity_total)                 AS order_total_type,
        CAST(doc.data.order_quantity_total AS VARCHAR)           AS order_total_json,
        doc.data.order_quantity_total ->> '$'                    AS order_total_text,
        coalesce(len(doc.data.sales_trend), 0)                   AS sales_rows,
        coalesce(len(doc.data.price_trend), 0)                   AS price_rows
    FROM typed
)
SELECT * EXCLUDE (shape_kind),
       CASE WHEN shape_kind = 'data' AND NOT coalesce({body_ok}, false) THEN 'python' ELSE shape_kind END AS kind
FROM parsed;

CREATE OR REPLACE TEMP TABLE norm_rows AS
SELECT item_id, spec_id, fetched_at,
       s IS NOT NULL                                         AS is_sales,
       sales_date,
       TRY_CAST(s.sales_quantity AS BIGINT)                  AS sales_quantity,
       TRY_CAST(s.order_quantity AS BIGINT)                  AS order_quantity,
       coalesce({sales_row_ok}, false)                       AS sales_row_ok,
       p IS NOT NULL                                         AS is_price,
       CASE WHEN same_date THEN sales_date ELSE TRY_CAST(p.date AS DATE) END AS price_date,
       TRY_CAST(p.price_min AS DECIMAL(18, 4))               AS price_min,
       TRY_CAST(p.price_max AS DECIMAL(18, 4))               AS price_max,
       coalesce({price_row_ok}, false)                       AS price_row_ok
FROM (SELECT *, TRY_CAST(s.date AS DATE) AS sales_date, {sales_date_ok} AS sales_date_ok, p.date = s.date AS same_date
      FROM (SELECT item_id, spec_id, fetched_at, unnest(d.sales_trend) AS s, unnest(d.price_trend) AS p
            FROM (SELECT item_id, spec_id, fetched_at, TRY(from_json(body, '{trends_shape}')).data AS d
                  FROM tmapi.raw_responses
                  WHERE rowid IN (SELECT raw_rowid FROM norm_responses WHERE kind = 'data'))))
"""

# Step 2, once norm_display(text, readable, lower_bound, is_lower_bound) holds the Python reading of every display
# text: text it refuses sends its body to Python; the trends are checked per response; then the typed rows to upsert.
_DISPLAY_COLUMNS = """
    CASE {0}_total_type WHEN 'UBIGINT' THEN {0}_total_json WHEN 'VARCHAR' THEN {0}_total_text END
                                                                          AS {0}_quantity_total_raw,
    CASE {0}_total_type WHEN 'UBIGINT' THEN CAST({0}_total_json AS BIGINT) WHEN 'VARCHAR' THEN {0}_display.lower_bound
    END                                                                   AS {0}_quantity_total_lower_bound,
    CASE {0}_total_type WHEN 'UBIGINT' THEN false WHEN 'VARCHAR' THEN {0}_display.is_lower_bound
    END                                                                   AS {0}_quantity_total_is_lower_bound"""
_UNREADABLE_DISPLAY = """({0}_total_type = 'VARCHAR' AND NOT EXISTS (
    SELECT 1 FROM norm_display d WHERE d.text = {0}_total_text AND d.readable))"""
# No date repeated in a trend: proved cheaply when date - rowid is the same on every row of it (rowids differ, so the
# dates do: the usual case, consecutive days stored in order); counted otherwise. (count(DISTINCT) skips NULL dates,
# as list_distinct did on the texts; a NULL date, or a text that is not its own date's, fails its row's check.)
_TREND_CHECKS = """
    count(*) FILTER (is_{0})                                                AS {0}_n,
    coalesce(bool_and({0}_row_ok) FILTER (is_{0}), true)                    AS {0}_rows_ok,
    coalesce(min(({0}_date - DATE '2000-01-01') - rowid) FILTER (is_{0})
             = max(({0}_date - DATE '2000-01-01') - rowid) FILTER (is_{0}), count(*) FILTER (is_{0}) = 0)
                                                                            AS {0}_dates_unique"""
_DATES_UNIQUE = """UPDATE norm_trend_checks t SET {0}_dates_unique = d.dates_unique
FROM (SELECT item_id, spec_id, count(DISTINCT {0}_date) = count(*) AS dates_unique
      FROM norm_rows SEMI JOIN (SELECT item_id, spec_id FROM norm_trend_checks WHERE NOT {0}_dates_unique)
           USING (item_id, spec_id)
      WHERE is_{0} GROUP BY item_id, spec_id) d
WHERE t.item_id = d.item_id AND t.spec_id = d.spec_id"""
_NORMALISE_ROWS_SQL = f"""
UPDATE norm_responses SET kind = 'python'
WHERE kind = 'data' AND ({_UNREADABLE_DISPLAY.format("sales")} OR {_UNREADABLE_DISPLAY.format("order")});

CREATE OR REPLACE TEMP TABLE norm_trend_checks AS
SELECT item_id, spec_id, {_TREND_CHECKS.format("sales")}, {_TREND_CHECKS.format("price")},
       coalesce(sum(sales_quantity) FILTER (is_sales), 0)                  AS sales_sum
FROM norm_rows GROUP BY item_id, spec_id;

{_DATES_UNIQUE.format("sales")};

{_DATES_UNIQUE.format("price")};

UPDATE norm_responses n SET kind = 'python'
FROM (SELECT n.raw_rowid FROM norm_responses n LEFT JOIN norm_trend_checks t USING (item_id, spec_id)
      WHERE n.kind = 'data' AND NOT (
          coalesce(t.sales_n, 0) = n.sales_rows AND coalesce(t.price_n, 0) = n.price_rows  -- (see norm_rows)
          AND coalesce(t.sales_rows_ok AND t.sales_dates_unique AND t.sales_sum <= {MAX_INT}
                       AND t.price_rows_ok AND t.price_dates_unique, true))) bad
WHERE n.raw_rowid = bad.raw_rowid;

DELETE FROM norm_rows r USING norm_responses n
WHERE n.kind <> 'data' AND r.item_id = n.item_id AND r.spec_id = n.spec_id;

CREATE OR REPLACE TEMP VIEW norm_sales_rows AS
SELECT item_id, spec_id, sales_date AS date, sales_quantity, order_quantity, fetched_at FROM norm_rows WHERE is_sales;

CREATE OR REPLACE TEMP VIEW norm_price_rows AS
SELECT item_id, spec_id, price_date AS date, price_min, price_max, fetched_at FROM norm_rows WHERE is_price;

CREATE OR REPLACE TEMP TABLE norm_statistics AS
WITH typed AS (
    SELECT n.*, CAST(n.sales_30_text AS BIGINT) AS sales_30,
           timezone('Asia/Shanghai', strptime(n.publish_time_text, '%Y-%m-%d %H:%M:%S')) AS publish_at,
           coalesce(t.sales_sum, 0) AS sales_sum
    FROM norm_responses n LEFT JOIN norm_trend_checks t USING (item_id, spec_id) WHERE n.kind IN ('data', 'no_data')
)
SELECT
    n.item_id, n.spec_id,
    n.kind = 'data'                                                           AS has_data,
    n.publish_at                                                              AS publish_time,
    n.sales_30                                                                AS sales_quantity_30days,
    {_DISPLAY_COLUMNS.format("sales")},
    {_DISPLAY_COLUMNS.format("order")},
    n.sales_rows                                                              AS sales_rows,
    n.price_rows                                                              AS price_rows,
    0                                                                         AS duplicate_dates,
    CASE WHEN n.kind = 'data' THEN n.sales_sum END                            AS sum30_observed,
    CASE WHEN n.kind = 'data' THEN n.sales_sum = n.sales_30 END               AS sum30_ok,
    n.response_id, n.fetched_at
FROM typed n
LEFT JOIN norm_display sales_display ON n.sales_total_type = 'VARCHAR' AND sales_display.text = n.sales_total_text
LEFT JOIN norm_display order_display ON n.order_total_type = 'VARCHAR' AND order_display.text = n.order_total_text
"""


# The upsert, shared by both paths: a newer response wins per key. The source rows that win (no stored row, or one
# fetched no later) are staged once with what was stored under their key; then an UPDATE of the keys already stored and
# a plain INSERT of the others: in DuckDB this is faster than INSERT ... ON CONFLICT DO UPDATE, which probes the key
# index row by row, whether the table is empty or every row conflicts. The staged rows (upserted_<table>) are what
# the item_history upkeep reads.
_UPSERT_KEYS = {
    "item_statistics": ("item_id", "spec_id"),
    "sales_trend_daily": ("item_id", "spec_id", "date"),
    "price_trend_daily": ("item_id", "spec_id", "date"),
}
_STORED_COLUMNS = {"price_trend_daily": ("price_min",)}  # kept as stored_<column> in upserted_<table>


@contextmanager
def _transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _upsert_responses(conn: duckdb.DuckDBPyConnection, statistics: str, sales: str, prices: str) -> None:
    """Upsert parsed responses, and keep item_history up to date, in one transaction, so readers see each response
    whole or not at all."""
    with _transaction(conn):
        _upsert(conn, "item_statistics", statistics)
        _upsert(conn, "sales_trend_daily", sales)
        _upsert(conn, "price_trend_daily", prices)
        _update_item_history(conn)


def _table_columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """The columns of tmapi.`table` in the attached warehouse, in order."""
    return [c for (c,) in conn.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() AND schema_name = ? "
        "AND table_name = ? ORDER BY column_index", [SCHEMA, table]).fetchall()]


def _upsert(conn: duckdb.DuckDBPyConnection, table: str, source: str) -> None:
    """Upsert `source` (a relation with the table's columns; item_statistics: all but updated_at) into `table`;
    the rows written stay in temp table upserted_<table>, with is_new and the stored values of _STORED_COLUMNS."""
    keys = _UPSERT_KEYS[table]
    columns = _table_columns(conn, table)
    casts = {"publish_time": "CAST(s.publish_time AS TIMESTAMPTZ)", "updated_at": "now()",
             "price_min": "CAST(s.price_min AS DECIMAL(18, 4))", "price_max": "CAST(s.price_max AS DECIMAL(18, 4))"}
    values = ", ".join(f"{casts.get(c, f's.{c}')} AS {c}" for c in columns)
    stored = "".join(f", t.{c} AS stored_{c}" for c in _STORED_COLUMNS.get(table, ()))
    key_list = ", ".join(keys)
    stored_list = ", ".join([*keys, "fetched_at", *_STORED_COLUMNS.get(table, ())])
    staged = f"upserted_{table}"
    # The stored keys are narrowed to the source's items before the join: DuckDB builds its hash table on the
    # stored side, and over the whole table it cost memory in proportion to the warehouse (+16 MB per run at 10,000
    # items), not to the rows loaded.
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE {staged} AS "
        f"SELECT {values}, t.fetched_at IS NULL AS is_new{stored} FROM {source} s "
        f"LEFT JOIN (SELECT {stored_list} FROM {SCHEMA}.{table} "
        f"           SEMI JOIN (SELECT DISTINCT item_id, spec_id FROM {source}) USING (item_id, spec_id)) t "
        f"USING ({key_list}) WHERE t.fetched_at IS NULL OR s.fetched_at >= t.fetched_at"
    )
    match = " AND ".join(f"t.{k} = u.{k}" for k in keys)
    sets = ", ".join(f"{c} = u.{c}" for c in columns if c not in keys)
    if conn.execute(f"SELECT count(*) FILTER (WHERE NOT is_new) FROM {staged}").fetchall()[0][0]:
        conn.execute(f"UPDATE {SCHEMA}.{table} t SET {sets} FROM {staged} u WHERE {match} AND NOT u.is_new")
    conn.execute(f"INSERT INTO {SCHEMA}.{table} ({', '.join(columns)}) "
                 f"SELECT {', '.join(columns)} FROM {staged} WHERE is_new")


# item_history rows (into temp table history_rows) of the items in temp table history_scope, recounted from all their
# stored rows (of every item when {scope} is empty): the rebuild, and the fallback of the upkeep below.
_HISTORY_REBUILD_SQL = """
CREATE OR REPLACE TEMP TABLE history_rows AS
WITH sales AS (
    SELECT item_id, spec_id, count(*) AS sales_days, min(date) AS first_sales_date, max(date) AS last_sales_date
    FROM tmapi.sales_trend_daily {scope} GROUP BY item_id, spec_id
),
prices AS (
    SELECT item_id, spec_id, count(*) AS price_days, min(date) AS first_price_date, max(date) AS last_price_date,
           min(price_min) AS lowest_price_min
    FROM tmapi.price_trend_daily {scope} WHERE price_min IS NOT NULL GROUP BY item_id, spec_id
),
lowest AS (
    SELECT p.item_id, p.spec_id, max(p.date) AS lowest_price_date
    FROM tmapi.price_trend_daily p JOIN prices l
      ON p.item_id = l.item_id AND p.spec_id = l.spec_id AND p.price_min = l.lowest_price_min
    GROUP BY p.item_id, p.spec_id
)
SELECT item_id, spec_id, coalesce(sales_days, 0) AS sales_days, first_sales_date, last_sales_date,
       coalesce(price_days, 0) AS price_days, first_price_date, last_price_date, lowest_price_min, lowest_price_date
FROM sales FULL JOIN prices USING (item_id, spec_id) LEFT JOIN lowest USING (item_id, spec_id)
"""

# The upkeep after an upsert, from the rows it wrote alone (upserted_*: O(rows loaded), not O(history)). Exact: rows
# are never deleted, so counts grow by the new keys (prices: by the days that gained a price, less those that lost
# one) and the date bounds widen. What a merge cannot know is what is left when a stored extreme is overwritten (the
# lowest price's day raised or unpriced, the first or last priced day unpriced): those items go to history_scope and
# are recounted from their rows (_HISTORY_REBUILD_SQL).
_HISTORY_MERGE_SQL = """
CREATE OR REPLACE TEMP TABLE history_scope AS
SELECT DISTINCT p.item_id, p.spec_id
FROM upserted_price_trend_daily p JOIN tmapi.item_history h USING (item_id, spec_id)
WHERE p.stored_price_min IS NOT NULL
  AND ((p.date = h.lowest_price_date AND (p.price_min IS NULL OR p.price_min > h.lowest_price_min))
       OR (p.price_min IS NULL AND p.date IN (h.first_price_date, h.last_price_date)));

CREATE OR REPLACE TEMP TABLE history_rows AS
WITH sales AS (
    SELECT item_id, spec_id, count(*) FILTER (WHERE is_new) AS new_days, min(date) AS first_date,
           max(date) AS last_date
    FROM upserted_sales_trend_daily GROUP BY item_id, spec_id
),
prices AS (
    SELECT item_id, spec_id,
           count(*) FILTER (WHERE price_min IS NOT NULL AND stored_price_min IS NULL)
             - count(*) FILTER (WHERE price_min IS NULL AND stored_price_min IS NOT NULL) AS new_days,
           min(date) FILTER (WHERE price_min IS NOT NULL) AS first_date,
           max(date) FILTER (WHERE price_min IS NOT NULL) AS last_date,
           min(price_min) AS lowest
    FROM upserted_price_trend_daily GROUP BY item_id, spec_id
),
price_lowest AS (  -- the newest loaded day at the loaded lowest price
    SELECT p.item_id, p.spec_id, max(p.date) AS lowest_date
    FROM upserted_price_trend_daily p JOIN prices l
      ON p.item_id = l.item_id AND p.spec_id = l.spec_id AND p.price_min = l.lowest
    GROUP BY p.item_id, p.spec_id
),
loaded AS (
    SELECT item_id, spec_id FROM sales UNION SELECT item_id, spec_id FROM prices
    EXCEPT SELECT item_id, spec_id FROM history_scope
)
SELECT loaded.item_id, loaded.spec_id,
       coalesce(h.sales_days, 0) + coalesce(s.new_days, 0)                  AS sales_days,
       least(h.first_sales_date, s.first_date)                              AS first_sales_date,
       greatest(h.last_sales_date, s.last_date)                             AS last_sales_date,
       coalesce(h.price_days, 0) + coalesce(p.new_days, 0)                  AS price_days,
       least(h.first_price_date, p.first_date)                              AS first_price_date,
       greatest(h.last_price_date, p.last_date)                             AS last_price_date,
       least(h.lowest_price_min, p.lowest)                                  AS lowest_price_min,
       CASE WHEN p.lowest IS NULL THEN h.lowest_price_date
            WHEN h.lowest_price_min IS NULL OR p.lowest < h.lowest_price_min THEN pl.lowest_date
            WHEN p.lowest = h.lowest_price_min THEN greatest(h.lowest_price_date, pl.lowest_date)
            ELSE h.lowest_price_date END                                    AS lowest_price_date
FROM loaded
LEFT JOIN tmapi.item_history h USING (item_id, spec_id)
LEFT JOIN sales s USING (item_id, spec_id)
LEFT JOIN prices p USING (item_id, spec_id)
LEFT JOIN price_lowest pl USING (item_id, spec_id)
-- (a new item whose rows are unpriced days alone has nothing to describe yet: no row, as a recount gives)
WHERE coalesce(h.sales_days, 0) + coalesce(s.new_days, 0) > 0 OR coalesce(h.price_days, 0) + coalesce(p.new_days, 0) > 0
"""


def _update_item_history(conn: duckdb.DuckDBPyConnection) -> None:
    """Bring item_history up to date with the rows the last _upsert of each trend table wrote."""
    for statement in _HISTORY_MERGE_SQL.split(";\n\n"):
        conn.execute(statement)
    _store_history_rows(conn, replacing="history_rows")
    if conn.execute("SELECT count(*) FROM history_scope").fetchall()[0][0]:
        conn.execute(_HISTORY_REBUILD_SQL.format(scope="SEMI JOIN history_scope USING (item_id, spec_id)"))
        # (every item of the scope: one left with no sales row and no priced day has no row any more)
        _store_history_rows(conn, replacing="history_scope")


def _store_history_rows(conn: duckdb.DuckDBPyConnection, replacing: str | None) -> None:
    """history_rows into item_history, after deleting the rows of the items in temp table `replacing` (all rows when
    None). (DELETE + INSERT: INSERT OR REPLACE probes the key index row by row, 3x slower for 10,000 items.)"""
    conn.execute("DELETE FROM tmapi.item_history" if replacing is None else
                 f"DELETE FROM tmapi.item_history h USING {replacing} r "
                 "WHERE h.item_id = r.item_id AND h.spec_id = r.spec_id")
    conn.execute("INSERT INTO tmapi.item_history SELECT * FROM history_rows")


# The reference prices (kpis.sql) of the items in kpi_gap_items, from all their stored rows: price_min on the latest
# day at least N days before the newest priced day; with no such day, the oldest price.
_KPI_GAP_REFERENCES_SQL = """
CREATE OR REPLACE TEMP TABLE kpi_gap_references AS
SELECT p.item_id, p.spec_id,
       coalesce(arg_max(p.price_min, p.date) FILTER (WHERE p.date <= g.last_price_date - 7),
                arg_min(p.price_min, p.date))                                       AS reference_price_7d,
       coalesce(arg_max(p.price_min, p.date) FILTER (WHERE p.date <= g.last_price_date - 30),
                arg_min(p.price_min, p.date))                                       AS reference_price_30d
FROM tmapi.price_trend_daily p JOIN kpi_gap_items g USING (item_id, spec_id)
WHERE p.price_min IS NOT NULL AND {any_gap}  -- (false: DuckDB folds the query to no rows, scanning nothing)
GROUP BY p.item_id, p.spec_id
"""

_HISTORY_MISSING_SQL = """
SELECT NOT EXISTS (FROM tmapi.item_history)
       AND (EXISTS (FROM tmapi.sales_trend_daily) OR EXISTS (FROM tmapi.price_trend_daily))"""


def _rebuild_item_history(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(_HISTORY_REBUILD_SQL.format(scope=""))
    _store_history_rows(conn, replacing=None)


def _scope_table(conn: duckdb.DuckDBPyConnection, name: str, items: Iterable[WatchedItem]) -> None:
    """Temp table `name`(item_id, spec_id) holding `items` (no pandas: this runs before a refresh's first call)."""
    items = list(dict.fromkeys(items))
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE {name} AS "
        "SELECT unnest(CAST($ids AS BIGINT[])) AS item_id, unnest(CAST($specs AS VARCHAR[])) AS spec_id",
        {"ids": [i.item_id for i in items], "specs": [i.spec_id for i in items]},
    )


def _int_array(values: list[int | None]) -> pd.arrays.IntegerArray:
    import pandas as pd  # lazily: not needed before a refresh's first API call
    return pd.array(values, dtype="Int64")


class Warehouse:
    """The DuckDB file the pipeline writes and everyone else reads."""

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout_s: float | None = None,
                 row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.path = Path(path)
        self.lock_timeout_s = config.duckdb_lock_timeout_s() if lock_timeout_s is None else lock_timeout_s
        self.row_group_rows = row_group_rows  # (benchmarks compare DuckDB's default, 122,880)
        self._schema_ready = False

    # ------------------------------------------------------------------ connections
    @contextmanager
    def connect(self, *, read_only: bool = False, own_instance: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; waits up to lock_timeout_s for another thread of this process, then for
        another process, to release the file. own_instance: a DuckDB instance of its own, for work that changes
        instance-wide settings (threads, memory_limit); otherwise a session on the process's shared instance."""
        # One process cannot attach one file twice at once ("Unique file handle conflict"): threads of a process
        # (runs of one refresh, the attempt writer) take turns, like other processes do through DuckDB's lock.
        lock = _process_lock(self.path)
        if not lock.acquire(timeout=self.lock_timeout_s):
            raise WarehouseLockedError(
                f"DuckDB file {self.path} stayed in use by another thread of this process (PID {os.getpid()}) for "
                f"{self.lock_timeout_s:.0f} s; nothing was lost: this step can be retried."
            )
        try:
            with self._connect_file(read_only=read_only, own_instance=own_instance) as conn:
                yield conn
        finally:
            lock.release()

    @contextmanager
    def _connect_file(self, *, read_only: bool, own_instance: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise WarehouseError(f"DuckDB file {self.path} does not exist yet: run `tmapi-assets refresh` first")
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            conn, alias = (duckdb.connect(), CATALOG) if own_instance else _shared_session()
            try:
                options = "READ_ONLY" if read_only else f"ROW_GROUP_SIZE {int(self.row_group_rows)}"
                conn.execute(f"ATTACH {_quote(str(self.path))} AS {alias} ({options})")
                conn.execute(f"USE {alias}")
                break
            except duckdb.IOException as exc:  # "Could not set lock on file ... (PID n)"
                conn.close()
                if "lock" not in str(exc).lower():
                    raise WarehouseError(f"cannot open DuckDB file {self.path}: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise WarehouseLockedError(
                        f"DuckDB file {self.path} is locked by {_holder_description(str(exc))}; waited "
                        f"{self.lock_timeout_s:g} s. DuckDB allows one writing process: close that program "
                        "(or point BI tools at the published read-only copy) and run again. Nothing was lost: "
                        "this step can be retried."
                    ) from exc
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())) * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 2.0)
            except BaseException:  # not a DuckDB file, a broken one, ...: nothing is attached
                conn.close()
                raise
        try:
            # Our own SQL never depends on the host's zone: China dates are computed explicitly.
            conn.execute("SET TimeZone = 'UTC'")
            if not read_only and not self._schema_ready:
                conn.execute(_sql("schema.sql"))
                if conn.execute(_HISTORY_MISSING_SQL).fetchall()[0][0]:  # a file written before item_history existed
                    with _transaction(conn):
                        _rebuild_item_history(conn)
                self._schema_ready = True
            yield conn
        finally:
            if own_instance:
                conn.close()
            else:
                _end_shared_session(conn, alias)

    def ensure_schema(self) -> None:
        with self.connect():
            pass

    # ------------------------------------------------------------------ raw responses (and the cost ledger)
    def record_attempts(
        self, attempts: Sequence[Attempt], run_id: str | None, response_ids: Sequence[str] | None = None
    ) -> int:
        """Append HTTP attempts verbatim to tmapi.raw_responses, in one transaction. Returns rows offered.

        response_ids (from the spool) make this idempotent: a row already stored is not stored twice."""
        import pandas as pd  # lazily: not needed before a refresh's first API call
        if not attempts:
            return 0
        ids = list(response_ids) if response_ids is not None else [str(uuid.uuid4()) for _ in attempts]
        texts: list[str] = []
        exact: list[bytes | None] = []
        for attempt in attempts:
            try:
                texts.append(attempt.body.decode("utf-8"))
                exact.append(None)
            except UnicodeDecodeError:
                texts.append(attempt.body.decode("utf-8", errors="replace"))
                exact.append(bytes(attempt.body))
        frame = pd.DataFrame(
            {
                "response_id": ids,
                "run_id": [run_id] * len(attempts),
                "item_id": pd.array([a.item.item_id for a in attempts], dtype="int64"),
                "spec_id": [a.item.spec_id for a in attempts],
                "attempt": pd.array([a.attempt for a in attempts], dtype="int32"),
                "fetched_at": pd.to_datetime([a.fetched_at for a in attempts], utc=True),
                "elapsed_ms": [float(a.elapsed_ms) for a in attempts],
                "http_status": _int_array([a.http_status for a in attempts]),
                "api_code": _int_array([a.api_code for a in attempts]),
                "outcome": [Outcome(a.outcome).value for a in attempts],
                "message": [a.message for a in attempts],
                "request_url": [a.request_url for a in attempts],
                "body": texts,
                "body_bytes": exact,
                "body_size": pd.array([len(a.body) for a in attempts], dtype="int64"),
            }
        )
        with self.connect() as conn:
            conn.register("staged_attempts", frame)
            conn.execute(
                "INSERT INTO tmapi.raw_responses BY NAME SELECT * FROM staged_attempts ON CONFLICT DO NOTHING"
            )
        return len(frame)

    def latest_successes(self, items: Sequence[WatchedItem] | None = None) -> list[StoredResponse]:
        """The newest successful response per (item, spec): of the given items, or of every item when None."""
        scope = "SEMI JOIN scope USING (item_id, spec_id)" if items is not None else ""
        query = f"""
            SELECT r.item_id, r.spec_id, r.response_id, r.fetched_at, r.body, r.body_bytes
            FROM tmapi.raw_responses r
            WHERE r.rowid IN ({_NEWEST_SUCCESS_ROWS.format(scope=scope)})
            ORDER BY r.item_id, r.spec_id
        """
        with self.connect() as conn:
            if items is not None:
                _scope_table(conn, "scope", items)
            rows = conn.execute(query).fetchall()
        return [
            StoredResponse(WatchedItem(item_id, spec_id), response_id, fetched_at, body, exact)
            for item_id, spec_id, response_id, fetched_at, body, exact in rows
        ]

    def fetched_since(
        self, items: Sequence[WatchedItem], since: datetime | None, run_id: str | None = None
    ) -> set[WatchedItem]:
        """Items with a successful response at or after `since`, or made by run `run_id` (the freshness skip; a
        forced run passes since=None and its own run id, so a retried step never pays twice for an item)."""
        if not items or (since is None and run_id is None):
            return set()
        with self.connect() as conn:
            _scope_table(conn, "scope", items)
            rows = conn.execute(
                f"""SELECT DISTINCT item_id, spec_id FROM tmapi.raw_responses
                    SEMI JOIN scope USING (item_id, spec_id)
                    WHERE outcome IN {_SUCCESS_OUTCOMES}
                      AND (fetched_at >= ? OR run_id = ?)""",
                [since, run_id],
            ).fetchall()
        return {WatchedItem(item_id, spec_id) for item_id, spec_id in rows}

    def up_to_date(self, items: Sequence[WatchedItem], since: datetime) -> set[WatchedItem]:
        """Items needing no work: a success at or after `since` that is already normalised and has KPIs."""
        if not items or not self.path.exists():
            return set()
        with self.connect() as conn:
            _scope_table(conn, "scope", items)
            rows = conn.execute(
                f"""WITH latest AS (
                        SELECT item_id, spec_id, response_id, fetched_at FROM tmapi.raw_responses
                        SEMI JOIN scope USING (item_id, spec_id)
                        WHERE outcome IN {_SUCCESS_OUTCOMES}
                        QUALIFY row_number() OVER (
                            PARTITION BY item_id, spec_id ORDER BY fetched_at DESC, response_id DESC) = 1)
                    SELECT l.item_id, l.spec_id FROM latest l
                    JOIN tmapi.item_statistics s USING (item_id, spec_id)
                    JOIN tmapi.item_kpis k USING (item_id, spec_id)
                    WHERE l.fetched_at >= ? AND s.response_id = l.response_id""",
                [since],
            ).fetchall()
        return {WatchedItem(item_id, spec_id) for item_id, spec_id in rows}

    def run_outcomes(self, run_ids: Sequence[str]) -> tuple[int, dict[WatchedItem, tuple[str, str | None]]]:
        """(calls made by these runs, item -> (outcome, message) of its last attempt in them)."""
        if not run_ids or not self.path.exists():
            return 0, {}
        with self.connect() as conn:
            calls = conn.execute(
                "SELECT count(*) FROM tmapi.raw_responses WHERE list_contains(?, run_id)", [list(run_ids)]
            ).fetchone()[0]
            rows = conn.execute(
                """SELECT item_id, spec_id, outcome, http_status, message FROM tmapi.raw_responses
                   WHERE list_contains(?, run_id)
                   QUALIFY row_number() OVER (PARTITION BY item_id, spec_id
                                              ORDER BY (outcome IN ('success', 'no_data')) DESC, fetched_at DESC) = 1""",
                [list(run_ids)],
            ).fetchall()
        outcomes = {}
        for item_id, spec_id, outcome, http_status, message in rows:
            status = f"HTTP {http_status}" if http_status is not None else "no HTTP answer"
            outcomes[WatchedItem(item_id, spec_id)] = (outcome, f"{outcome} ({status}): {message}")
        return calls, outcomes

    # ------------------------------------------------------------------ normalised tables
    def load_stored_responses(
        self, items: Sequence[WatchedItem] | None, read_display: DisplayReader
    ) -> StoredLoad:
        """Normalise the newest successful stored response of each item (every item when None) in SQL: parse the
        body with DuckDB's JSON reader, check it, and upsert statistics and trends in one transaction.

        This is the bulk path; pipeline.normalise_items is its only caller. It takes only bodies of the plain,
        documented shape (see _NORMALISE_PARSE_SQL) and leaves every other one, untouched, to the Python parser
        (parsing.parse_statistics), which either reads it or names what is wrong. For every body the SQL takes,
        it writes exactly the rows the Python parser would (tests/test_normalise_sql.py compares both on a corpus
        of plain and hostile bodies). Display totals ("1.5万+") are read by `read_display`, once per distinct text.
        """
        loaded = StoredLoad()
        with self.connect() as conn:
            scope = ""
            if items is not None:
                _scope_table(conn, "norm_scope", items)
                scope = "SEMI JOIN norm_scope USING (item_id, spec_id)"
            for statement in _NORMALISE_PARSE_SQL.format(
                    newest_rows=_NEWEST_SUCCESS_ROWS.format(scope=scope), shape=_BODY_SHAPE, body_ok=_BODY_OK,
                    trends_shape=_TRENDS_SHAPE, sales_date_ok=_DATE_OK.format("s.date"), sales_row_ok=_SALES_ROW_OK,
                    price_row_ok=_PRICE_ROW_OK).split(';\n\n'):
                conn.execute(statement)
            texts = conn.execute(
                """SELECT sales_total_text FROM norm_responses WHERE sales_total_type = 'VARCHAR'
                   UNION SELECT order_total_text FROM norm_responses WHERE order_total_type = 'VARCHAR'"""
            ).fetchall()
            readings = [(text, read_display(text)) for (text,) in texts]
            conn.execute(
                """CREATE OR REPLACE TEMP TABLE norm_display AS
                   SELECT unnest(CAST($text AS VARCHAR[])) AS text, unnest(CAST($readable AS BOOLEAN[])) AS readable,
                          unnest(CAST($lower AS BIGINT[])) AS lower_bound,
                          unnest(CAST($approximate AS BOOLEAN[])) AS is_lower_bound""",
                {"text": [t for t, _ in readings], "readable": [r is not None for _, r in readings],
                 "lower": [r[0] if r else None for _, r in readings],
                 "approximate": [r[1] if r else None for _, r in readings]},
            )
            for statement in _NORMALISE_ROWS_SQL.split(';\n\n'):
                conn.execute(statement)
            _upsert_responses(conn, "norm_statistics", "norm_sales_rows", "norm_price_rows")
            for item_id, spec_id, kind in conn.execute(
                "SELECT item_id, spec_id, kind FROM norm_responses WHERE kind <> 'data' ORDER BY ALL"
            ).fetchall():
                (loaded.no_data if kind == "no_data" else loaded.left_to_python).append(WatchedItem(item_id, spec_id))
            loaded.items, loaded.sales_rows, loaded.price_rows = conn.execute(
                """SELECT count(*), coalesce(sum(sales_rows), 0), coalesce(sum(price_rows), 0) FROM norm_statistics"""
            ).fetchone()
            if items is not None:
                have = set(map(tuple, conn.execute("SELECT item_id, spec_id FROM norm_responses").fetchall()))
                loaded.missing = [i for i in dict.fromkeys(items) if (i.item_id, i.spec_id) not in have]
        return loaded

    def load_observations(self, observations: Sequence[Observation]) -> dict[str, int]:
        """Upsert statistics and daily trends of parsed responses in one transaction, so readers see each
        response either whole or not at all. Newer responses win per (item, spec, date)."""
        if not observations:
            return {"items": 0, "sales_rows": 0, "price_rows": 0}
        stats, sales, prices = _observation_frames(observations)
        with self.connect() as conn:
            conn.register("staged_stats", stats)
            conn.register("staged_sales", sales)
            conn.register("staged_prices", prices)
            _upsert_responses(conn, "staged_stats", "staged_sales", "staged_prices")
        return {"items": len(stats), "sales_rows": len(sales), "price_rows": len(prices)}

    def rebuild_item_history(self) -> int:
        """Recount tmapi.item_history from every stored trend row (loads keep it up to date; `reparse` rebuilds it
        anyway, and a file from before it existed gets it on first write). Returns its rows."""
        with self.connect() as conn:
            with _transaction(conn):
                _rebuild_item_history(conn)
            return conn.execute("SELECT count(*) FROM tmapi.item_history").fetchall()[0][0]

    def refresh_kpis(self, items: Sequence[WatchedItem] | None = None) -> int:
        """Recompute tmapi.item_kpis for the given items (all stored items when None)."""
        with self.connect() as conn:
            if items is None:
                conn.execute(
                    """CREATE OR REPLACE TEMP TABLE kpi_scope AS
                       SELECT item_id, spec_id FROM tmapi.item_statistics
                       UNION SELECT item_id, spec_id FROM tmapi.item_history"""
                )
            else:
                _scope_table(conn, "kpi_scope", items)
            with _transaction(conn):
                count = self._refresh_kpis(conn, every_item=items is None)
        return count

    @staticmethod
    def _refresh_kpis(conn: duckdb.DuckDBPyConnection, *, every_item: bool = False) -> int:
        in_scope = "" if every_item else "SEMI JOIN kpi_scope USING (item_id, spec_id)"
        # Items with a day missing between their first and last priced day: their reference prices may lie before
        # the 31 days kpis.sql reads, so they are looked up in all their rows (usually no item, then no scan).
        conn.execute(f"""CREATE OR REPLACE TEMP TABLE kpi_gap_items AS
                         SELECT item_id, spec_id, first_price_date, last_price_date FROM tmapi.item_history {in_scope}
                         WHERE price_days < date_diff('day', first_price_date, last_price_date) + 1""")
        any_gap = conn.execute("SELECT EXISTS (FROM kpi_gap_items)").fetchall()[0][0]
        conn.execute(_KPI_GAP_REFERENCES_SQL.format(any_gap="true" if any_gap else "false"))
        # kpis.sql gives every item in scope a row. Rows already stored are updated in place, the others inserted:
        # DELETE + INSERT of the same keys churned the key index (a full recompute 0.05 -> 0.075 s at 10,000 items).
        conn.execute(f"CREATE OR REPLACE TEMP TABLE kpi_rows AS {_sql('kpis.sql').replace('{in_scope}', in_scope)}")
        sets = ", ".join(f"{c} = r.{c}" for c in _table_columns(conn, "item_kpis") if c not in ("item_id", "spec_id"))
        conn.execute(f"UPDATE tmapi.item_kpis k SET {sets} FROM kpi_rows r "
                     "WHERE k.item_id = r.item_id AND k.spec_id = r.spec_id")
        conn.execute("INSERT INTO tmapi.item_kpis BY NAME "
                     "SELECT * FROM kpi_rows ANTI JOIN tmapi.item_kpis USING (item_id, spec_id)")
        return conn.execute("SELECT count(*) FROM kpi_scope").fetchall()[0][0]

    # ------------------------------------------------------------------ the read-only copy for BI tools and dbt
    def publish_read_copy(self, target: str | os.PathLike[str]) -> Path:
        """Write a consistent copy of the whole warehouse to `target`, atomically replacing the previous copy.

        BI tools and dbt read the copy, never the live file, so they never block the pipeline's writes (DuckDB
        allows one writing process, and a reader of the live file would hold a lock). A reader that has the old
        copy open keeps reading it; the next open sees the new one.

        Every table and view is copied, but raw_responses without its bodies (body, body_bytes are NULL there):
        the bodies are the pipeline's (reparse), they grow without end, and copying them after every run made
        each publish cost time and memory in proportion to all history ever fetched.

        The copied tables have the live file's columns, types, NOT NULLs and rows, but no PRIMARY KEY: readers never
        write, and building the key indexes was most of a publish's memory (+55 MB at 10,000 items, growing with the
        warehouse; now +32 MB, with DuckDB held to one thread and a 64 MB limit while it copies: 3 million ledger
        rows, +0 MB).
        """
        target = Path(target)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.unlink(missing_ok=True)
            with self.connect(own_instance=True) as conn:
                conn.execute("SET threads = 1")
                conn.execute("SET memory_limit = '64MB'")
                conn.execute(f"ATTACH {_quote(str(staging))} AS published")
                conn.execute(f"COPY FROM DATABASE {CATALOG} TO published (SCHEMA)")  # the views, and the schema
                not_null = conn.execute(
                    "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ? AND schema_name = ? "
                    "AND NOT is_nullable ORDER BY ALL", [CATALOG, SCHEMA]).fetchall()
                for table in TABLES:
                    columns = (" REPLACE (CAST(NULL AS VARCHAR) AS body, CAST(NULL AS BLOB) AS body_bytes)"
                               if table == "raw_responses" else "")
                    conn.execute(f"CREATE OR REPLACE TABLE published.{SCHEMA}.{table} AS "
                                 f"SELECT *{columns} FROM {SCHEMA}.{table}")
                for table, column in not_null:  # NOT NULL as in the live file (CREATE TABLE AS drops it)
                    conn.execute(f"ALTER TABLE published.{SCHEMA}.{table} ALTER COLUMN {column} SET NOT NULL")
                conn.execute("DETACH published")
            os.replace(staging, target)
        except (duckdb.Error, OSError) as exc:  # (a locked live file is a WarehouseLockedError from connect())
            raise WarehouseError(
                f"could not publish the read copy {target} ({type(exc).__name__}: {exc}); the live warehouse and "
                "the previous copy are unchanged: free disk space if that is what failed, then `tmapi-assets publish`"
            ) from exc
        finally:
            with suppress(OSError):  # (a target under a file: the error above already says so)
                staging.unlink(missing_ok=True)
                Path(f"{staging}.wal").unlink(missing_ok=True)
        return target

    # ------------------------------------------------------------------ reads for checks, CLI and tests
    def table_counts(self) -> dict[str, int]:
        with self.connect() as conn:
            return {t: conn.execute(f"SELECT count(*) FROM {SCHEMA}.{t}").fetchone()[0] for t in TABLES}

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read query and return a DataFrame (for the CLI, checks and tests)."""
        with self.connect() as conn:
            return conn.execute(sql, params or []).df()

    def records(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run a read query and return rows as dicts with exact Python types (Decimal stays Decimal)."""
        with self.connect() as conn:
            cursor = conn.execute(sql, params or [])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def kpis(self, items: Sequence[WatchedItem] | None = None) -> pd.DataFrame:
        with self.connect() as conn:
            where = ""
            if items is not None:
                _scope_table(conn, "scope", items)
                where = "SEMI JOIN scope USING (item_id, spec_id)"
            return conn.execute(
                f"""SELECT k.*, s.sales_quantity_total_raw, s.sales_quantity_30days, s.sum30_ok
                    FROM tmapi.item_kpis k LEFT JOIN tmapi.item_statistics s USING (item_id, spec_id)
                    {where} ORDER BY k.item_id, k.spec_id"""
            ).df()

    def sum30_mismatches(self, items: Sequence[WatchedItem] | None = None) -> pd.DataFrame:
        """Items whose Σ of the last 30 daily sales differs from sales_quantity_30days (as last observed)."""
        return self._scoped(
            """SELECT item_id, spec_id, sales_quantity_30days, sum30_observed FROM tmapi.item_statistics
               {scope} WHERE sum30_ok = false ORDER BY item_id, spec_id""",
            items,
        )

    def price_order_violations(self, items: Sequence[WatchedItem] | None = None) -> pd.DataFrame:
        """Days where price_min > price_max."""
        return self._scoped(
            """SELECT item_id, spec_id, date, price_min, price_max FROM tmapi.price_trend_daily
               {scope} WHERE price_min > price_max ORDER BY item_id, spec_id, date""",
            items,
        )

    def _scoped(self, template: str, items: Sequence[WatchedItem] | None) -> pd.DataFrame:
        with self.connect() as conn:
            scope = ""
            if items is not None:
                _scope_table(conn, "scope", items)
                scope = "SEMI JOIN scope USING (item_id, spec_id)"
            return conn.execute(template.format(scope=scope)).df()


def _observation_frames(observations: Sequence[Observation]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Columnar frames for the bulk upsert. Prices travel as decimal strings and are cast to DECIMAL in SQL."""
    stats: dict[str, list[Any]] = {
        k: []
        for k in (
            "item_id spec_id has_data publish_time sales_quantity_30days "
            "sales_quantity_total_raw sales_quantity_total_lower_bound sales_quantity_total_is_lower_bound "
            "order_quantity_total_raw order_quantity_total_lower_bound order_quantity_total_is_lower_bound "
            "sales_rows price_rows duplicate_dates sum30_observed sum30_ok response_id fetched_at"
        ).split()
    }
    sales: dict[str, list[Any]] = {k: [] for k in "item_id spec_id date sales_quantity order_quantity fetched_at".split()}
    prices: dict[str, list[Any]] = {k: [] for k in "item_id spec_id date price_min price_max fetched_at".split()}
    for obs in observations:
        item_id, spec_id, parsed = obs.item.item_id, obs.item.spec_id, obs.parsed
        stats["item_id"].append(item_id)
        stats["spec_id"].append(spec_id)
        stats["has_data"].append(parsed is not None)
        stats["response_id"].append(obs.response_id)
        stats["fetched_at"].append(obs.fetched_at)
        if parsed is None:
            for key in list(stats)[3:-2]:
                stats[key].append(0 if key in ("sales_rows", "price_rows", "duplicate_dates") else None)
            continue
        stats["publish_time"].append(parsed.publish_time.astimezone(timezone.utc) if parsed.publish_time else None)
        stats["sales_quantity_30days"].append(parsed.sales_quantity_30days)
        for prefix, count in (("sales", parsed.sales_quantity_total), ("order", parsed.order_quantity_total)):
            stats[f"{prefix}_quantity_total_raw"].append(count.raw)
            stats[f"{prefix}_quantity_total_lower_bound"].append(count.lower_bound)
            stats[f"{prefix}_quantity_total_is_lower_bound"].append(count.is_lower_bound)
        stats["sales_rows"].append(len(parsed.sales_trend))
        stats["price_rows"].append(len(parsed.price_trend))
        stats["duplicate_dates"].append(parsed.duplicate_dates)
        stats["sum30_observed"].append(parsed.sum30.observed)
        stats["sum30_ok"].append(parsed.sum30.ok)
        n_sales, n_prices = len(parsed.sales_trend), len(parsed.price_trend)
        sales["item_id"] += [item_id] * n_sales
        sales["spec_id"] += [spec_id] * n_sales
        sales["fetched_at"] += [obs.fetched_at] * n_sales
        for day in parsed.sales_trend:
            sales["date"].append(day.date)
            sales["sales_quantity"].append(day.sales_quantity)
            sales["order_quantity"].append(day.order_quantity)
        prices["item_id"] += [item_id] * n_prices
        prices["spec_id"] += [spec_id] * n_prices
        prices["fetched_at"] += [obs.fetched_at] * n_prices
        for day in parsed.price_trend:
            prices["date"].append(day.date)
            prices["price_min"].append(None if day.price_min is None else str(day.price_min))
            prices["price_max"].append(None if day.price_max is None else str(day.price_max))
    return _frame(stats), _frame(sales), _frame(prices)


_INT_COLUMNS = {
    "item_id", "sales_quantity_30days", "sales_quantity_total_lower_bound", "order_quantity_total_lower_bound",
    "sales_rows", "price_rows", "duplicate_dates", "sum30_observed", "sales_quantity", "order_quantity",
}
_BOOL_COLUMNS = {"has_data", "sum30_ok", "sales_quantity_total_is_lower_bound", "order_quantity_total_is_lower_bound"}


def _frame(columns: dict[str, list[Any]]) -> pd.DataFrame:
    """Typed DataFrame: nullable ints/bools stay nullable; timestamps are UTC; strings stay strings."""
    import pandas as pd  # lazily: not needed before a refresh's first API call
    data: dict[str, Any] = {}
    for name, values in columns.items():
        if name in _INT_COLUMNS:
            data[name] = pd.array(values, dtype="Int64")
        elif name in _BOOL_COLUMNS:
            data[name] = pd.array(values, dtype="boolean")
        elif name in ("fetched_at", "publish_time"):
            data[name] = pd.to_datetime(pd.Series(values, dtype="object"), utc=True)
        elif name == "date":
            data[name] = pd.Series(values, dtype="object")
        else:
            data[name] = pd.Series(values, dtype="object")
    return pd.DataFrame(data)
