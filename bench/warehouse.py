"""Warehouse speed (issue 3, point 7): `python -m bench.warehouse [--responses 10000] [--days 365]`.

(i) Load: R synthetic successful responses (the sandbox's own bodies: 30 sales rows + 29 price rows each) are stored
    as raw rows with `Warehouse.record_attempts`, then the project's path `pipeline.normalise_items(warehouse)` (read
    the newest success per item back, parse, bulk upsert statistics + sales + prices) is timed, and compared (the
    target) with a plain load of the same stored responses: on another copy of the same file, opened with DuckDB's
    defaults, the bodies parsed once by DuckDB's JSON reader into typed columns (no checks) and one
    `INSERT INTO ... SELECT` per table, in one transaction. Also shown, not a target since 2026-12-04: the write
    alone, the same rows from already-typed staging tables in memory into a fresh file with the same DDL (it skips
    the parsing every load of stored responses needs, which alone costs about as much as that write).
    Three rounds, each on a fresh copy of the stored responses; medians are compared.
    A second normalise over the loaded tables (every row conflicts: the real upsert) is timed too, against
    `INSERT ... ON CONFLICT DO UPDATE` from the same staging tables.
(ii) KPIs: sales_trend_daily and price_trend_daily filled in SQL with R items x D days (item_history then counted
    from them, timed apart: loads keep it up to date); `Warehouse.refresh_kpis()`
    (all items) against one plain `SELECT item_id, spec_id, sum(sales_quantity), count(*) ... GROUP BY ALL` over
    the sales table. Each is run 3 times; medians are compared.
(iii) Ledger (`--only ledger`, not in the default run; not a target itself, it explains the rss-scan one): the
    project's `Warehouse.record_attempts` appends batches of synthetic answers to an empty raw_responses, as the
    runs' ledger flushes do, up to --ledger-rows rows, and reports the peak RSS increase of each append by how many
    rows were stored before it, four ways in the same run: the project's row groups (warehouse.ROW_GROUP_ROWS),
    8,192-row ones, DuckDB's default row groups (122,880 rows), and DuckDB's default with its row-group vacuum off
    (`SET GLOBAL max_vacuum_tasks = 0`), with the row groups and file size each way left behind.
Targets: normalise + upsert <= 2x the plain bulk load of the stored responses; KPI recompute <= 2x the plain scan.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import duckdb

from bench.common import append_markdown, exact_command, item_keys, log, status_kb
from tmapi_assets import pipeline
from tmapi_assets.client import Attempt
from tmapi_assets.errors import Outcome
from tmapi_assets.ids import WatchedItem
from tmapi_assets.sandbox.app import success_body
from tmapi_assets.warehouse import ROW_GROUP_ROWS, Warehouse

SCHEMA_SQL = Path(sys.modules["tmapi_assets.warehouse"].__file__).with_name("schema.sql")
WINDOW_END = date(2025, 7, 23)  # fixed: the same bodies every run


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _plain_load(plain_path: Path, project_path: Path) -> dict:
    """The cheapest load of the rows normalise_items wrote into project_path: a fresh file with the same DDL,
    typed staging tables in memory, one INSERT INTO ... SELECT per table in one transaction (timed); then the same
    rows again as INSERT ... ON CONFLICT DO UPDATE (timed); then the sales rows alone into an emptied table."""
    conn = duckdb.connect(str(plain_path))
    try:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(SCHEMA_SQL.read_text(encoding="utf-8"))
        conn.execute(f"ATTACH '{project_path}' AS proj (READ_ONLY)")
        for table, staged in (("item_statistics", "staged_stats"), ("sales_trend_daily", "staged_sales"),
                              ("price_trend_daily", "staged_prices")):
            conn.execute(f"CREATE TEMP TABLE {staged} AS SELECT * FROM proj.tmapi.{table}")
        conn.execute("DETACH proj")
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("staged_stats", "staged_sales", "staged_prices")}

        def plain_insert() -> None:
            conn.execute("BEGIN TRANSACTION")
            conn.execute("INSERT INTO tmapi.item_statistics SELECT * FROM staged_stats")
            conn.execute("INSERT INTO tmapi.sales_trend_daily SELECT * FROM staged_sales")
            conn.execute("INSERT INTO tmapi.price_trend_daily SELECT * FROM staged_prices")
            conn.execute("COMMIT")

        t_plain, _ = _timed(plain_insert)

        def plain_upsert() -> None:
            conn.execute("BEGIN TRANSACTION")
            conn.execute("""INSERT INTO tmapi.item_statistics SELECT * FROM staged_stats
                            ON CONFLICT DO UPDATE SET fetched_at = excluded.fetched_at,
                                                      updated_at = excluded.updated_at""")
            conn.execute("""INSERT INTO tmapi.sales_trend_daily SELECT * FROM staged_sales
                            ON CONFLICT DO UPDATE SET sales_quantity = excluded.sales_quantity,
                                order_quantity = excluded.order_quantity, fetched_at = excluded.fetched_at""")
            conn.execute("""INSERT INTO tmapi.price_trend_daily SELECT * FROM staged_prices
                            ON CONFLICT DO UPDATE SET price_min = excluded.price_min,
                                price_max = excluded.price_max, fetched_at = excluded.fetched_at""")
            conn.execute("COMMIT")

        t_plain_upsert, _ = _timed(plain_upsert)
        conn.execute("DELETE FROM tmapi.sales_trend_daily")
        conn.execute("CHECKPOINT")
        t_plain_sales, _ = _timed(lambda: conn.execute("INSERT INTO tmapi.sales_trend_daily SELECT * FROM staged_sales"))
    finally:
        conn.close()
    plain_path.unlink()
    return {"insert": t_plain, "upsert": t_plain_upsert, "sales_only": t_plain_sales, "counts": counts}


# The documented body, typed by DuckDB's JSON reader: what a plain load of stored responses reads (no checks).
_PLAIN_SHAPE = (
    '{"data": {"publish_time": "VARCHAR", "sales_quantity_30days": "BIGINT", "sales_quantity_total": "VARCHAR", '
    '"order_quantity_total": "VARCHAR", '
    '"sales_trend": [{"date": "DATE", "sales_quantity": "BIGINT", "order_quantity": "BIGINT"}], '
    '"price_trend": [{"date": "DATE", "price_min": "DECIMAL(18, 4)", "price_max": "DECIMAL(18, 4)"}]}}'
)


def _plain_load_from_bodies(path: Path) -> tuple[float, dict]:
    """The plain load of the stored responses in `path` (a copy of the file normalise_items starts from), timed:
    DuckDB's defaults, the bodies parsed once into typed columns, one INSERT INTO ... SELECT per table, one
    transaction. No checks, no upsert, display totals kept as raw text. Returns (seconds, rows per table)."""
    conn = duckdb.connect(str(path))
    try:
        conn.execute("SET TimeZone = 'UTC'")

        def load() -> None:
            conn.execute("BEGIN TRANSACTION")
            conn.execute(f"""CREATE TEMP TABLE docs AS
                             SELECT item_id, spec_id, response_id, fetched_at, from_json(body, '{_PLAIN_SHAPE}').data AS d
                             FROM tmapi.raw_responses WHERE outcome = 'success'""")
            conn.execute("""INSERT INTO tmapi.item_statistics (item_id, spec_id, has_data, publish_time,
                                sales_quantity_30days, sales_quantity_total_raw, order_quantity_total_raw, sales_rows,
                                price_rows, duplicate_dates, response_id, fetched_at, updated_at)
                            SELECT item_id, spec_id, true,
                                   timezone('Asia/Shanghai', strptime(d.publish_time, '%Y-%m-%d %H:%M:%S')),
                                   d.sales_quantity_30days, d.sales_quantity_total, d.order_quantity_total,
                                   len(d.sales_trend), len(d.price_trend), 0, response_id, fetched_at, now()
                            FROM docs""")
            conn.execute("""INSERT INTO tmapi.sales_trend_daily
                            SELECT item_id, spec_id, r.date, r.sales_quantity, r.order_quantity, fetched_at
                            FROM (SELECT item_id, spec_id, fetched_at, unnest(d.sales_trend) AS r FROM docs)""")
            conn.execute("""INSERT INTO tmapi.price_trend_daily
                            SELECT item_id, spec_id, r.date, r.price_min, r.price_max, fetched_at
                            FROM (SELECT item_id, spec_id, fetched_at, unnest(d.price_trend) AS r FROM docs)""")
            conn.execute("COMMIT")

        seconds, _ = _timed(load)
        counts = {t: conn.execute(f"SELECT count(*) FROM tmapi.{t}").fetchone()[0]
                  for t in ("item_statistics", "sales_trend_daily", "price_trend_daily")}
    finally:
        conn.close()
    path.unlink()
    return seconds, counts


def bench_load(tmp: Path, responses: int, repeats: int = 3) -> dict:
    keys = item_keys(responses)
    log(f"load: generating {responses} synthetic response bodies")
    t_gen, bodies = _timed(lambda: [success_body(k, "", WINDOW_END) for k in keys])
    now = datetime.now(timezone.utc)
    attempts = [
        Attempt(item=WatchedItem(int(k)), attempt=1, fetched_at=now, elapsed_ms=200.0, http_status=200,
                api_code=200, outcome=Outcome.SUCCESS, body=b,
                request_url=f"http://127.0.0.1:8765/1688/item/statistics/sales?item_id={k}", message="success")
        for k, b in zip(keys, bodies)
    ]
    del bodies
    raw = Warehouse(tmp / "raw.duckdb")
    raw.ensure_schema()

    t = time.perf_counter()
    stored = sum(raw.record_attempts(attempts[i : i + 1000], "bench-warehouse")
                 for i in range(0, len(attempts), 1000))
    t_store = time.perf_counter() - t
    attempts.clear()  # the bodies are in DuckDB now
    norm_times, renorm_times, plain_times, upsert_times, sales_only_times, bodies_times = [], [], [], [], [], []
    for k in range(repeats):
        # each round on its own copies of the stored responses, so every first load meets empty tables
        bodies_path = tmp / f"plain-bodies-{k}.duckdb"
        shutil.copy(raw.path, bodies_path)
        t_bodies, bodies_counts = _plain_load_from_bodies(bodies_path)
        bodies_times.append(t_bodies)
        project_path = tmp / f"project-{k}.duckdb"
        shutil.copy(raw.path, project_path)
        project = Warehouse(project_path)
        t_norm, summary = _timed(lambda: pipeline.normalise_items(project))
        t_renorm, summary2 = _timed(lambda: pipeline.normalise_items(project))
        norm_times.append(t_norm)
        renorm_times.append(t_renorm)
        plain = _plain_load(tmp / f"plain-{k}.duckdb", project_path)
        counts = plain.pop("counts")
        plain_times.append(plain["insert"])
        upsert_times.append(plain["upsert"])
        sales_only_times.append(plain["sales_only"])
        if list(bodies_counts.values()) != [counts["staged_stats"], counts["staged_sales"], counts["staged_prices"]]:
            raise SystemExit(f"the plain load wrote other rows than normalise_items: {bodies_counts} vs {counts}")
        log(f"load: round {k + 1}: normalise_items {t_norm:.2f} s, again {t_renorm:.2f} s; plain load of the "
            f"bodies {t_bodies:.2f} s; plain INSERT of typed rows {plain['insert']:.2f} s, plain upsert "
            f"{plain['upsert']:.2f} s")
        project_path.unlink()
    median = statistics.median
    return {
        "responses": responses, "generate_s": t_gen, "store_raw_s": t_store, "repeats": repeats,
        "normalise_s": median(norm_times), "renormalise_s": median(renorm_times),
        "plain_insert_s": median(plain_times), "plain_upsert_s": median(upsert_times),
        "plain_sales_only_s": median(sales_only_times),
        "normalise_all": norm_times, "plain_all": plain_times,
        "plain_bodies_s": median(bodies_times), "plain_bodies_all": bodies_times,
        "items": summary.items, "sales_rows": summary.sales_rows, "price_rows": summary.price_rows,
        "parse_errors": len(summary.parse_errors) + len(summary2.parse_errors), "staged": counts,
    }


def bench_kpis(tmp: Path, items: int, days: int, repeats: int = 3) -> dict:
    path = tmp / "kpis.duckdb"
    wh = Warehouse(path)
    log(f"kpis: filling {items} items x {days} days of sales and prices in SQL")
    with wh.connect() as conn:
        conn.execute(f"""INSERT INTO tmapi.item_statistics (item_id, spec_id, has_data, publish_time,
                             sales_quantity_30days, sales_rows, price_rows, duplicate_dates, response_id,
                             fetched_at, updated_at)
                         SELECT 1688000000000 + i, '', true, TIMESTAMPTZ '2023-03-01 02:00:00+00' + i * INTERVAL 1 MINUTE,
                                0, 30, 29, 0, 'bench-' || i, now(), now()
                         FROM range({items}) t(i)""")
        conn.execute(f"""INSERT INTO tmapi.sales_trend_daily
                         SELECT 1688000000000 + i, '', DATE '{WINDOW_END}' - {days - 1} + d::INTEGER,
                                (hash(i, d) % 500)::BIGINT AS s, (hash(i, d, 1) % 100)::BIGINT, now()
                         FROM range({items}) t(i), range({days}) u(d)""")
        conn.execute(f"""INSERT INTO tmapi.price_trend_daily
                         SELECT 1688000000000 + i, '', DATE '{WINDOW_END}' - {days - 1} + d::INTEGER,
                                CAST(1 + (hash(i, d // 20) % 100000) / 100.0 AS DECIMAL(18, 4)),
                                CAST(2 + (hash(i, d // 20) % 100000) / 100.0 AS DECIMAL(18, 4)), now()
                         FROM range({items}) t(i), range({days}) u(d)""")
        conn.execute("CHECKPOINT")
        rows = conn.execute("SELECT count(*) FROM tmapi.sales_trend_daily").fetchone()[0]
    # The rows were written behind the loads' back, so item_history (which every load keeps up to date from the rows
    # it writes, inside the load benchmarked above) is counted once from all of them: timed, not compared.
    t_history, _ = _timed(wh.rebuild_item_history)
    kpi_times, scan_times = [], []
    kpi_rows = 0

    def connect_only() -> None:
        with wh.connect():
            pass

    t_connect = min(_timed(connect_only)[0] for _ in range(3))
    for k in range(repeats):
        t, kpi_rows = _timed(lambda: wh.refresh_kpis())
        kpi_times.append(t)
        conn = duckdb.connect()
        try:
            conn.execute(f"ATTACH '{path}' AS wh (READ_ONLY)")
            t, out = _timed(lambda: conn.execute(
                "SELECT item_id, spec_id, sum(sales_quantity), count(*) FROM wh.tmapi.sales_trend_daily "
                "GROUP BY ALL").fetchall())
            scan_times.append(t)
        finally:
            conn.close()
        log(f"kpis: round {k + 1}: refresh_kpis {kpi_times[-1]:.2f} s, plain GROUP BY {scan_times[-1]:.2f} s")
    return {"items": items, "days": days, "sales_rows": rows, "kpi_rows": kpi_rows,
            "refresh_kpis_s": statistics.median(kpi_times), "scan_s": statistics.median(scan_times),
            "refresh_kpis_all": kpi_times, "scan_all": scan_times, "connect_s": t_connect, "history_s": t_history}


def _rss_mb() -> float:
    return status_kb(os.getpid())[0] / 1024


def _peak_rss_during(fn) -> tuple[float, float, object]:
    """(seconds, peak RSS increase in MB sampled every 5 ms while fn runs, fn's result)."""
    import threading

    start, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb() - start)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds, out = _timed(fn)
    finally:
        done.set()
        sampler.join()
    return seconds, peak[0], out


def bench_history(tmp: Path, items: int, answers: int) -> dict:
    """normalise_items for `items` items whose raw_responses hold `answers` successful answers each (a long-kept
    ledger: one answer per daily refresh), against the same items with one stored answer each."""
    keys = [WatchedItem(int(k)) for k in item_keys(items)]
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    log(f"history: storing {items} items x {answers} answers")
    long_kept, fresh = Warehouse(tmp / "history.duckdb"), Warehouse(tmp / "history-1.duckdb")
    for day in range(answers):
        end = date(2025, 1, 1) + timedelta(days=day)
        batch = [Attempt(item=k, attempt=1, fetched_at=start + timedelta(days=day), elapsed_ms=200.0,
                         http_status=200, api_code=200, outcome=Outcome.SUCCESS,
                         body=success_body(str(k.item_id), "", end), request_url="http://127.0.0.1/", message="success")
                 for k in keys]
        long_kept.record_attempts(batch, f"bench-day-{day}")
        if day == answers - 1:
            fresh.record_attempts(batch, f"bench-day-{day}")
    results = {}
    for name, warehouse in (("one", fresh), ("many", long_kept)):
        warehouse.ensure_schema()
        seconds, rss, summary = _peak_rss_during(lambda: pipeline.normalise_items(warehouse, keys))
        results[name] = (seconds, rss, summary.items)
        log(f"history: {name}: normalise_items {seconds:.2f} s, peak RSS +{rss:.0f} MB ({summary.items} items)")
    return {"items": items, "answers": answers, **results}


# (name, rows per row group, DuckDB setting for the variant)
LEDGER_VARIANTS = (
    (f"project ({ROW_GROUP_ROWS})", ROW_GROUP_ROWS, None),
    ("8192", 8192, None),  # (the size tried before ROW_GROUP_ROWS)
    ("DuckDB (122880)", 122_880, None),
    ("vacuum off (122880)", 122_880, "SET GLOBAL max_vacuum_tasks = 0"),
)


def bench_ledger(tmp: Path, rows: int, batch: int) -> dict:
    """Peak RSS increase of each ledger append (Warehouse.record_attempts of `batch` answers) as raw_responses grows
    to `rows` rows, each way of LEDGER_VARIANTS. The bodies of a batch are made before its append
    (outside the measured window) and dropped after it, so the process holds one batch at a time."""
    results = {}
    for name, row_group_rows, setting in LEDGER_VARIANTS:
        warehouse = Warehouse(tmp / f"ledger-{name.split()[0]}.duckdb", row_group_rows=row_group_rows)
        warehouse.ensure_schema()
        if setting:  # instance-wide: every later session of this process's shared DuckDB instance
            with warehouse.connect() as conn:
                conn.execute(setting)
        appends = []  # (rows stored before, peak RSS increase MB, seconds)
        now = datetime.now(timezone.utc)
        log(f"ledger ({name}): appending {rows} answers in batches of {batch}")
        try:
            for index, key_batch in enumerate(_chunks(item_keys(rows), batch)):
                attempts = [Attempt(item=WatchedItem(int(k)), attempt=1, fetched_at=now, elapsed_ms=200.0,
                                    http_status=200, api_code=200, outcome=Outcome.SUCCESS,
                                    body=_fresh_body(k), request_url="http://127.0.0.1/", message="success")
                            for k in key_batch]
                seconds, rss, _ = _peak_rss_during(lambda: warehouse.record_attempts(attempts, "bench-ledger"))
                appends.append((index * batch, rss, seconds))
        finally:
            if setting:
                with warehouse.connect() as conn:
                    conn.execute("RESET GLOBAL max_vacuum_tasks")
        row_groups = warehouse.records(
            "SELECT count(DISTINCT row_group_id) AS n FROM pragma_storage_info('tmapi.raw_responses')")[0]["n"]
        results[name] = {"appends": appends, "row_groups": row_groups,
                         "file_mb": warehouse.path.stat().st_size / 2**20}
        worst = max(appends[1:], key=lambda a: a[1])  # (the first append also loads pandas and DuckDB's JSON)
        log(f"ledger ({name}): worst append +{worst[1]:.0f} MB after {worst[0]} rows; {row_groups} row groups")
    return {"rows": rows, "batch": batch, **results}


def _chunks(values: list, size: int):
    for i in range(0, len(values), size):
        yield values[i : i + size]


def _fresh_body(key: str) -> bytes:
    # success_body keeps its last 8,192 bodies (lru_cache): the bench would hold tens of MB it does not measure.
    return success_body.__wrapped__(key, "", WINDOW_END)


def report(load: dict | None, kpis: dict | None, history: dict | None = None,
           ledger: dict | None = None) -> tuple[str, str]:
    """(text, markdown)"""
    lines, md = [], []
    if history:
        (t1, r1, _), (tn, rn, _) = history["one"], history["many"]
        lines += [
            f"normalise_items of {history['items']} items, newest answer of each (not a target; does it grow with "
            "the ledger's history?):",
            f"  1 stored answer per item                 {t1:8.2f} s, peak RSS +{r1:.0f} MB",
            f"  {history['answers']:<3} stored answers per item               {tn:8.2f} s, peak RSS +{rn:.0f} MB   ratio {tn / t1:.1f}x",
        ]
        md += [
            f"History: `normalise_items` of {history['items']} items (the newest answer of each) when raw_responses "
            f"holds 1 vs {history['answers']} answers per item (not a target: the cost must not grow with the kept "
            "ledger).", "",
            "| stored answers per item | s | peak RSS increase MB |", "|---|---|---|",
            f"| 1 | {t1:.2f} | {r1:.0f} |",
            f"| {history['answers']} | {tn:.2f} | {rn:.0f} |", "",
        ]
    if load:
        ratio = load["normalise_s"] / load["plain_bodies_s"]
        ratio_write = load["normalise_s"] / load["plain_insert_s"]
        ratio2 = load["renormalise_s"] / load["plain_upsert_s"]
        lines += [
            f"load of {load['responses']} stored responses ({load['items']} items, {load['sales_rows']} sales rows, "
            f"{load['price_rows']} price rows; parse errors {load['parse_errors']}):",
            f"  project normalise_items (read back + parse + bulk upsert), first load   {load['normalise_s']:8.2f} s"
            f"  (median of {load['repeats']}: {', '.join(f'{t:.2f}' for t in load['normalise_all'])})",
            f"  plain load of the same stored responses (parse once + INSERT ... SELECT) {load['plain_bodies_s']:8.2f} s"
            f"   ratio {ratio:.1f}x (target <= 2x)  (runs {', '.join(f'{t:.2f}' for t in load['plain_bodies_all'])})",
            f"  plain INSERT INTO ... SELECT of the rows already typed (write only)      {load['plain_insert_s']:8.2f} s"
            f"   ratio {ratio_write:.1f}x (not a target)  (runs {', '.join(f'{t:.2f}' for t in load['plain_all'])})",
            f"  project normalise_items again (every row an update)                     {load['renormalise_s']:8.2f} s",
            f"  plain INSERT ... ON CONFLICT DO UPDATE of the same rows                 {load['plain_upsert_s']:8.2f} s"
            f"   ratio {ratio2:.1f}x",
            f"  (plain INSERT of the {load['sales_rows']} sales rows alone {load['plain_sales_only_s']:.2f} s; "
            f"generating bodies {load['generate_s']:.1f} s; storing raw rows with record_attempts "
            f"{load['store_raw_s']:.1f} s, not compared)",
        ]
        md += [
            f"Load: {load['responses']} stored responses = {load['sales_rows']} sales + {load['price_rows']} price "
            f"rows + {load['items']} statistics rows; median of {load['repeats']} rounds (normalise_items: "
            f"{', '.join(f'{t:.2f}' for t in load['normalise_all'])} s; plain load of the bodies: "
            f"{', '.join(f'{t:.2f}' for t in load['plain_bodies_all'])} s; plain INSERT of typed rows: "
            f"{', '.join(f'{t:.2f}' for t in load['plain_all'])} s).", "",
            "| path | s | ratio |", "|---|---|---|",
            f"| `pipeline.normalise_items` (read back + parse + check + upsert), empty tables | "
            f"{load['normalise_s']:.2f} | {ratio:.1f}x |",
            f"| plain load of the same stored responses: parsed once by DuckDB's JSON reader into typed columns, "
            f"`INSERT INTO … SELECT` per table (target baseline) | {load['plain_bodies_s']:.2f} | 1x |",
            f"| plain `INSERT INTO … SELECT` from typed staging tables, same rows, same DDL (write only, no parse; "
            f"not a target) | {load['plain_insert_s']:.2f} | normalise {ratio_write:.1f}x this |",
            f"| `pipeline.normalise_items` again (every row conflicts) | {load['renormalise_s']:.2f} | {ratio2:.1f}x |",
            f"| plain `INSERT … ON CONFLICT DO UPDATE`, same rows | {load['plain_upsert_s']:.2f} | 1x |",
            "",
            f"Not compared: generating the bodies {load['generate_s']:.1f} s; `record_attempts` of the raw rows "
            f"{load['store_raw_s']:.1f} s; plain INSERT of the sales rows alone {load['plain_sales_only_s']:.2f} s.",
            "",
        ]
    if kpis:
        ratio = kpis["refresh_kpis_s"] / kpis["scan_s"]
        lines += [
            f"KPIs over {kpis['items']} items x {kpis['days']} days ({kpis['sales_rows']} sales rows, same in prices):",
            f"  Warehouse.refresh_kpis() (all items)              {kpis['refresh_kpis_s']:8.2f} s  "
            f"(runs {', '.join(f'{t:.2f}' for t in kpis['refresh_kpis_all'])})",
            f"  plain SELECT ... sum(), count(*) ... GROUP BY ALL {kpis['scan_s']:8.2f} s  "
            f"(runs {', '.join(f'{t:.2f}' for t in kpis['scan_all'])})   ratio {ratio:.1f}x (target <= 2x)",
            f"  (of which opening a Warehouse connection, fixed cost: {kpis['connect_s']:.3f} s)",
            f"  (not compared: item_history counted once from all rows, as `reparse` does: {kpis['history_s']:.2f} s; "
            "loads keep it up to date)",
        ]
        md += [
            f"KPIs: {kpis['items']} items × {kpis['days']} days ({kpis['sales_rows']} rows in each trend table), "
            "median of 3.", "",
            "| path | s | ratio |", "|---|---|---|",
            f"| `Warehouse.refresh_kpis()` (all items; {kpis['kpi_rows']} KPI rows) | {kpis['refresh_kpis_s']:.2f} | "
            f"{ratio:.1f}x |",
            f"| plain `SELECT item_id, spec_id, sum(sales_quantity), count(*) … GROUP BY ALL` | {kpis['scan_s']:.2f} "
            "| 1x |", "",
            f"`refresh_kpis` includes opening a Warehouse connection (ATTACH; fixed cost {kpis['connect_s']:.3f} s). "
            "It reads the last 31 days of each trend and `tmapi.item_history` (days stored, date bounds, lowest price), "
            "which every load keeps up to date from the rows it writes (inside the load timed above); the rows here "
            "are written in SQL behind the loads' back, so item_history is counted once from all of them first, as "
            f"`tmapi-assets reparse` does: {kpis['history_s']:.2f} s, not compared.",
            "",
        ]
    if ledger:
        n, buckets = ledger["rows"], 5
        bounds = [round(n * k / buckets) for k in range(buckets + 1)]
        header = " | ".join(f"{bounds[k]}-{bounds[k + 1]}" for k in range(buckets))
        lines.append(f"ledger appends of {ledger['batch']} answers to raw_responses, worst peak RSS increase by rows "
                     f"stored before the append (the first append, which loads modules, left out):")
        md += [f"Ledger: `Warehouse.record_attempts` of {ledger['batch']} answers at a time into an empty "
               f"raw_responses until it holds {n} rows; the worst peak RSS increase of one append (MB) and the "
               "slowest append (s), by rows stored before it; the project's row groups vs 8,192-row and DuckDB's "
               "default ones, and DuckDB's default with its row-group vacuum off, same run (not a target: it "
               "shows where the rss-scan growth came from).", "",
               f"| rows per row group | {header} | row groups | file MB |", "|---|" + "---|" * (buckets + 2)]
        for name, _, _ in LEDGER_VARIANTS:
            r = ledger[name]
            worst, slowest = [], []
            for k in range(buckets):
                part = [a for a in r["appends"][1:] if bounds[k] <= a[0] < bounds[k + 1]]
                worst.append(max((a[1] for a in part), default=0.0))
                slowest.append(max((a[2] for a in part), default=0.0))
            cells = " | ".join(f"+{w:.0f} MB, {t:.2f} s" for w, t in zip(worst, slowest))
            lines.append(f"  {name:<20} {cells}; {r['row_groups']} row groups, file {r['file_mb']:.0f} MB")
            md.append(f"| {name} | {cells} | {r['row_groups']} | {r['file_mb']:.0f} |")
        md.append("")
    targets = []
    if load:
        r = load["normalise_s"] / load["plain_bodies_s"]
        targets.append(f"{'PASS' if r <= 2 else 'FAIL'}  normalise + upsert <= 2x the plain bulk load of the same "
                       f"stored responses: {r:.1f}x (write-only baseline, not a target: "
                       f"{load['normalise_s'] / load['plain_insert_s']:.1f}x)")
    if kpis:
        r = kpis["refresh_kpis_s"] / kpis["scan_s"]
        targets.append(f"{'PASS' if r <= 2 else 'FAIL'}  KPI recompute <= 2x the plain scan: {r:.1f}x")
    if targets:
        lines += ["Targets (issue 3):"] + [f"  {t}" for t in targets]
        md += ["Targets:", ""] + [f"- `{t}`" for t in targets] + [""]
    return "\n".join(lines), "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.warehouse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", type=int, default=10_000, help="stored responses = KPI items (default 10000)")
    p.add_argument("--days", type=int, default=365, help="days of history per item for the KPI bench (365)")
    p.add_argument("--quick", action="store_true", help="1000 responses, 90 days")
    p.add_argument("--only", choices=["load", "kpis", "history", "ledger"], default=None,
                   help="one part (ledger runs only when named)")
    p.add_argument("--ledger-rows", type=int, default=70_000, help="ledger part: rows appended (default 70000)")
    p.add_argument("--ledger-batch", type=int, default=200,
                   help="ledger part: answers per append (default 200: a refresh's flush, pipeline.AttemptSink)")
    p.add_argument("--history-answers", type=int, default=100,
                   help="stored answers per item for the history part (default 100, 200 items)")
    p.add_argument("--record", action="store_true", help="append the results to docs/benchmarks.md")
    p.add_argument("--markdown-out", default=None, help="also write the markdown results to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp DuckDB files")
    args = p.parse_args(argv)
    if args.quick:
        args.responses, args.days = 1000, 90
    tmp = Path(tempfile.mkdtemp(prefix="tmapi-bench-warehouse-"))
    started = time.monotonic()
    try:
        load = bench_load(tmp, args.responses) if args.only in (None, "load") else None
        kpis = bench_kpis(tmp, args.responses, args.days) if args.only in (None, "kpis") else None
        history = bench_history(tmp, 200, args.history_answers) if args.only in (None, "history") else None
        ledger = bench_ledger(tmp, args.ledger_rows, args.ledger_batch) if args.only == "ledger" else None
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    text, md = report(load, kpis, history, ledger)
    print("\n" + "=" * 100 + "\nwarehouse benchmark\n" + text, flush=True)
    md_section = f"### Warehouse (`bench.warehouse`)\n\n{md}"
    if args.markdown_out:
        Path(args.markdown_out).write_text(md_section + "\n", encoding="utf-8")
    if args.record:
        append_markdown("warehouse benchmark (bench.warehouse)", exact_command("bench.warehouse"),
                        f"Took {(time.monotonic() - started) / 60:.1f} min.\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
