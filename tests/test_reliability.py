"""Nothing lost, nothing leaked: quota halt, crash safety, DuckDB lock discipline, time zones.

These run the real pipeline against the sandbox over real HTTP; the kill and lock tests use real processes.
"""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from dagster import DagsterInstance, build_schedule_context, build_sensor_context

from conftest import hold_lock, install_dagster_yaml
from tmapi_assets import halt as halt_state
from tmapi_assets.cli import main as cli
from tmapi_assets.client import AsyncTmapiClient, ClientSettings
from tmapi_assets.defs import automation
from tmapi_assets.defs.runner import refresh
from tmapi_assets.errors import Outcome, RunHaltedError, WarehouseLockedError
from tmapi_assets.ids import WatchedItem
from tmapi_assets.sandbox import SandboxProcess
from tmapi_assets.warehouse import Warehouse
from tmapi_assets.watchlist import add_items

ROOT = Path(__file__).resolve().parents[1]


def items(n: int, start: int = 0) -> list[WatchedItem]:
    return [WatchedItem(1000000000000 + 7919 * (start + i)) for i in range(n)]


def env_for(project: Path, sandbox_api, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TMAPI_DATA_DIR=str(project), DAGSTER_HOME=str(project / "dagster_home"), TMAPI_BASE_URL=sandbox_api.base_url,
        TMAPI_API_TOKEN=sandbox_api.token, PYTHONUNBUFFERED="1", **extra,
    )
    return env


def stored_successes(warehouse: Warehouse) -> dict[str, int]:
    rows = warehouse.records(
        """SELECT item_id, spec_id, count(*) AS n FROM tmapi.raw_responses
           WHERE outcome IN ('success', 'no_data') GROUP BY ALL""")
    return {str(WatchedItem(r["item_id"], r["spec_id"])): r["n"] for r in rows}


# ------------------------------------------------------------------------------------------------ quota and auth halt
def test_quota_halt_is_persisted_skips_automation_and_resume_fetches_only_what_is_missing(project, sandbox_api,
                                                                                            monkeypatch):
    first, later = items(3), items(4, start=100)
    add_items(project / "watchlist.csv", first)
    assert refresh(None, progress=False).ok

    add_items(project / "watchlist.csv", later)
    monkeypatch.setenv("TMAPI_API_TOKEN", "sandbox-exhausted-token")
    sandbox_api.reset()
    halted = refresh(None, progress=False)
    assert not halted.ok
    calls_at_halt = sandbox_api.stats()["requests_total"]
    assert 1 <= calls_at_halt <= 4  # only calls already in flight when the first 439 came back (concurrency 4)
    record = halt_state.read_halt()
    assert record is not None and record.outcome == Outcome.QUOTA.value and "resume" in record.describe()

    # Everything that would call the API now refuses, with the reason, and calls nothing.
    with pytest.raises(RunHaltedError, match="halted"):
        refresh(None, progress=False)
    instance = DagsterInstance.get()
    sensor_result = automation.watchlist_sensor(build_sensor_context(instance=instance))
    assert not sensor_result.run_requests and "halted" in sensor_result.skip_reason.skip_message
    schedule_result = automation.daily_refresh(build_schedule_context(instance=instance))
    assert "halted" in schedule_result.skip_message
    status = CliRunner().invoke(cli, ["status"])
    assert "quota_exhausted" in status.output and "tmapi-assets resume" in status.output
    assert sandbox_api.stats()["requests_total"] == calls_at_halt

    # The operator tops up and resumes: only the items not yet landed are fetched.
    assert "cleared" in CliRunner().invoke(cli, ["resume"]).output
    monkeypatch.setenv("TMAPI_API_TOKEN", sandbox_api.token)
    sandbox_api.reset()
    resumed = refresh(None, progress=False)
    assert resumed.ok and resumed.fresh == len(first) and resumed.landed == len(later)
    assert sandbox_api.stats()["requests_total"] == len(later)


def test_a_halt_in_one_run_stops_another_run_within_one_call(project, sandbox_api):
    """Two runs (two PersistentHalt signals sharing only the halt file): the second stops within one call."""
    settings = ClientSettings(base_url=sandbox_api.base_url, api_token=sandbox_api.token, concurrency=1,
                              backoff_base_s=0.01)
    run_b_items = items(40, start=300)
    calls_after_halt = []

    async def run_b():
        halt_b = halt_state.PersistentHalt("run-b")

        def on_attempt(attempt):
            if halt_state.read_halt() is not None:
                calls_after_halt.append(attempt)

        async with AsyncTmapiClient(settings, halt=halt_b, on_attempt=on_attempt) as client:
            return await client.fetch_many(run_b_items)

    async def run_a_halts_later():
        await asyncio.sleep(0.3)
        halt_a = halt_state.PersistentHalt("run-a")
        bad = ClientSettings(base_url=sandbox_api.base_url, api_token="sandbox-exhausted-token", max_attempts=1)
        async with AsyncTmapiClient(bad, halt=halt_a) as client:
            return await client.fetch(items(1, start=999)[0])

    async def both():
        return await asyncio.gather(run_b(), run_a_halts_later())

    results_b, result_a = asyncio.run(both())
    assert result_a.outcome == Outcome.QUOTA
    assert len(calls_after_halt) <= 1  # at most the call that was already in flight
    halted_b = [r for r in results_b if r.halted]
    assert halted_b and all(not r.attempts for r in halted_b[1:])  # stopped mid-run; later items were never called
    assert all("halted" in str(r.error) for r in results_b if r.halted)


# ------------------------------------------------------------------------------------------------ crash safety
def consistent_snapshot(db: Path) -> dict[str, int]:
    """Open the file as a reader would after a crash and check that no partial response is visible."""
    conn = duckdb.connect()
    conn.execute(f"ATTACH '{db}' AS wh (READ_ONLY)")
    # Every statistics row reflects a whole response: all its sales and price rows carry its fetched_at.
    partial = conn.execute(
        """SELECT s.item_id, s.sales_rows, s.price_rows,
                  (SELECT count(*) FROM wh.tmapi.sales_trend_daily t
                   WHERE t.item_id = s.item_id AND t.spec_id = s.spec_id AND t.fetched_at = s.fetched_at) AS sales,
                  (SELECT count(*) FROM wh.tmapi.price_trend_daily p
                   WHERE p.item_id = s.item_id AND p.spec_id = s.spec_id AND p.fetched_at = s.fetched_at) AS prices
           FROM wh.tmapi.item_statistics s
           WHERE sales != s.sales_rows OR prices != s.price_rows""").fetchall()
    assert partial == []
    orphans = conn.execute(
        """SELECT count(*) FROM wh.tmapi.sales_trend_daily t
           ANTI JOIN wh.tmapi.item_statistics s USING (item_id, spec_id)""").fetchone()[0]
    assert orphans == 0  # no trend rows without the statistics row of the same transaction
    counts = {t: conn.execute(f"SELECT count(*) FROM wh.tmapi.{t}").fetchone()[0]
              for t in ("raw_responses", "item_statistics", "sales_trend_daily")}
    conn.close()
    return counts


def kill_phase(project: Path, batch: list[WatchedItem]) -> str:
    """How far this round's items got: none fetched / some fetched / all fetched / normalised / KPIs."""
    spooled = sum(1 for path in (project / "spool").glob("*.jsonl") for _ in path.open("rb"))
    conn = duckdb.connect()
    conn.execute(f"ATTACH '{project / 'tmapi.duckdb'}' AS wh (READ_ONLY)")
    ids = [i.item_id for i in batch]
    raw, stats, kpis = (conn.execute(f"SELECT count(DISTINCT item_id) FROM wh.tmapi.{t} WHERE list_contains(?, item_id)",
                                     [ids]).fetchone()[0] for t in ("raw_responses", "item_statistics", "item_kpis"))
    conn.close()
    if kpis == len(batch):
        return "done"
    if stats == len(batch):
        return "after trends, before KPIs"
    if raw == len(batch):
        return "after raw, before trends"
    if raw or spooled:
        return "during fetch"
    return "before fetch"


@pytest.mark.timeout(600)
def test_sigkill_at_20_random_moments_loses_nothing_and_lands_every_item_once(tmp_path):
    """Each round adds new items and kills `tmapi-assets refresh` with SIGKILL at a random moment (start-up, fetch,
    DuckDB writes, between raw and trends). After each kill the file opens and shows no partial response; at the end
    one clean refresh lands every item, each paid answer stored exactly once."""
    rng = random.Random(20261203)
    with SandboxProcess(latency_ms=150, concurrency_limit=8) as sandbox_api:
        env = env_for(tmp_path, sandbox_api, TMAPI_CONCURRENCY="2", TMAPI_DUCKDB_LOCK_TIMEOUT_S="10",
                      TMAPI_STEP_RETRY_DELAY_S="0.2")
        install_dagster_yaml(tmp_path / "dagster_home")
        watched: list[WatchedItem] = []
        killed, phases = 0, []
        for round_no in range(20):
            new = items(4, start=1000 + 10 * round_no)
            add_items(tmp_path / "watchlist.csv", new)
            watched += new
            proc = subprocess.Popen([sys.executable, "-m", "tmapi_assets.cli", "refresh", "--quiet"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            # The windows are what a round lasts here: ~1.5 s of start-up, then ~1 s from the first call to the exit
            # (4 new items, the rest fresh). Wider ones let most kills land after the exit (9 of 20 once).
            if round_no % 4 == 0:
                time.sleep(rng.uniform(0.3, 1.8))  # during start-up
            else:  # from the moment the API calls begin (the spool file appears): fetch, writes, trends, KPIs
                deadline = time.monotonic() + 120
                while proc.poll() is None and time.monotonic() < deadline and not any(
                        (tmp_path / "spool").glob(f"{proc.pid}-*.jsonl")):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed += 1
            proc.wait()
            if (tmp_path / "tmapi.duckdb").exists():
                consistent_snapshot(tmp_path / "tmapi.duckdb")
                phases.append(kill_phase(tmp_path, new))
        assert killed >= 10  # most rounds were really interrupted
        print("phase reached by each round's items when killed:", dict(Counter(phases)))
        assert len(set(phases)) >= 2  # the kills fell in different phases

        final = subprocess.run([sys.executable, "-m", "tmapi_assets.cli", "refresh", "--quiet"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stdout + final.stderr
        counts = consistent_snapshot(tmp_path / "tmapi.duckdb")
        warehouse = Warehouse(tmp_path / "tmapi.duckdb")
        successes = stored_successes(warehouse)
        assert set(successes) == {str(i) for i in watched}
        assert set(successes.values()) == {1}  # every paid answer stored once; none re-bought after a kill
        assert counts["item_statistics"] == len(watched)
        assert counts["sales_trend_daily"] == warehouse.records(
            "SELECT count(DISTINCT (item_id, spec_id, date)) AS n FROM tmapi.sales_trend_daily")[0]["n"]
        assert not list((tmp_path / "spool").glob("*.jsonl"))  # every spooled answer was loaded


def test_answers_spooled_by_a_killed_run_are_loaded_not_bought_again(project, sandbox_api):
    """A run killed after answers arrived but before they reached DuckDB: the next run loads them from the spool."""
    batch = items(5, start=500)
    add_items(project / "watchlist.csv", batch)
    code = (
        "import os, signal\n"
        "from tmapi_assets import pipeline\n"
        "from tmapi_assets.warehouse import Warehouse\n"
        "# DuckDB writes never happen in this process: it dies right after the answers are spooled.\n"
        "Warehouse.record_attempts = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from tmapi_assets.client import ClientSettings\n"
        "from tmapi_assets.ids import WatchedItem\n"
        f"items = [WatchedItem(i) for i in {[i.item_id for i in batch]}]\n"
        f"settings = ClientSettings(base_url={sandbox_api.base_url!r}, api_token={sandbox_api.token!r})\n"
        f"pipeline.fetch_items(items, settings=settings, warehouse=Warehouse({str(project / 'tmapi.duckdb')!r}),"
        " run_id='killed')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env_for(project, sandbox_api), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert sandbox_api.stats()["requests_total"] == 5
    assert len(list((project / "spool").glob("*.jsonl"))) == 1

    outcome = refresh(None, progress=False)
    assert outcome.ok and outcome.fresh == 5 and outcome.calls == 0
    assert sandbox_api.stats()["requests_total"] == 5  # nothing bought twice
    warehouse = Warehouse(project / "tmapi.duckdb")
    assert stored_successes(warehouse) == {str(i): 1 for i in batch}
    assert warehouse.table_counts()["item_statistics"] == 5


def test_reparse_rebuilds_everything_from_raw_without_calling_the_api(project, sandbox_api):
    add_items(project / "watchlist.csv", items(4, start=700))
    assert refresh(None, progress=False).ok
    warehouse = Warehouse(project / "tmapi.duckdb")
    before = warehouse.table_counts()
    kpis_before = warehouse.records("SELECT * EXCLUDE (computed_at) FROM tmapi.item_kpis ORDER BY item_id")
    with warehouse.connect() as conn:  # a parser bug corrupted everything downstream of raw
        for table in ("item_statistics", "sales_trend_daily", "price_trend_daily", "item_kpis"):
            conn.execute(f"DELETE FROM tmapi.{table}")
    calls = sandbox_api.stats()["requests_total"]
    result = CliRunner().invoke(cli, ["reparse"])
    assert result.exit_code == 0, result.output
    assert warehouse.table_counts() == before
    assert warehouse.records("SELECT * EXCLUDE (computed_at) FROM tmapi.item_kpis ORDER BY item_id") == kpis_before
    assert sandbox_api.stats()["requests_total"] == calls


# ------------------------------------------------------------------------------------------------ DuckDB locks
def test_a_bi_tool_holding_the_file_makes_the_step_wait_fail_retry_and_land(project, sandbox_api, monkeypatch):
    monkeypatch.setenv("TMAPI_DUCKDB_LOCK_TIMEOUT_S", "1")
    monkeypatch.setenv("TMAPI_STEP_RETRY_DELAY_S", "1")
    batch = items(6, start=800)
    add_items(project / "watchlist.csv", batch)
    Warehouse(project / "tmapi.duckdb").ensure_schema()
    holder = hold_lock(project / "tmapi.duckdb", seconds=10, read_only=True)
    try:
        outcome = refresh(None, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert outcome.ok, outcome.summary_text()
    assert sandbox_api.stats()["requests_total"] == len(batch)  # the answers waited in the spool: none re-bought
    run = DagsterInstance.get().get_run_by_id(outcome.run_ids[0])
    step_failures = [e for e in DagsterInstance.get().all_logs(run.run_id)
                     if e.dagster_event and e.dagster_event.event_type_value == "STEP_UP_FOR_RETRY"]
    assert step_failures and "locked by PID" in str(step_failures[0].dagster_event.event_specific_data)


def test_lock_error_names_the_holder_and_is_retryable(tmp_path):
    path = tmp_path / "tmapi.duckdb"
    Warehouse(path).ensure_schema()
    holder = hold_lock(path, seconds=30)
    try:
        with pytest.raises(WarehouseLockedError, match=f"PID {holder.pid}"):
            Warehouse(path, lock_timeout_s=0.5).table_counts()
    finally:
        holder.kill()
        holder.wait()


def test_two_refreshes_at_once_both_land(project, sandbox_api):
    first, second = items(8, start=900), items(8, start=950)
    add_items(project / "watchlist.csv", first + second)
    env = env_for(project, sandbox_api, TMAPI_DUCKDB_LOCK_TIMEOUT_S="30")
    procs = [subprocess.Popen([sys.executable, "-m", "tmapi_assets.cli", "refresh", "--quiet",
                               *[str(i) for i in batch]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for batch in (first, second)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    warehouse = Warehouse(project / "tmapi.duckdb")
    assert stored_successes(warehouse) == {str(i): 1 for i in first + second}
    assert warehouse.table_counts()["item_kpis"] == 16


def test_readers_use_the_published_copy_and_never_block_the_pipeline(project, sandbox_api):
    add_items(project / "watchlist.csv", items(3, start=1100))
    assert refresh(None, progress=False).ok
    copy = project / "tmapi_read.duckdb"
    reader = duckdb.connect(str(copy), read_only=True)  # a BI tool keeps the copy open all day
    try:
        assert reader.execute("SELECT count(*) FROM tmapi.item_kpis").fetchone()[0] == 3
        # The ledger is there (views too), the verbatim bodies stay in the live file.
        assert reader.execute("SELECT count(*), count(body), count(body_bytes) FROM tmapi.raw_responses"
                              ).fetchone() == (3, 0, 0)
        assert reader.execute("SELECT sum(calls) FROM tmapi.api_calls_daily").fetchone()[0] == 3
        # Every table and view, with the live file's columns, types and NOT NULLs (only the keys are left out).
        columns = ("SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
                   "WHERE table_schema = 'tmapi' ORDER BY ALL")
        with duckdb.connect(str(project / "tmapi.duckdb"), read_only=True) as live:
            assert reader.execute(columns).fetchall() == live.execute(columns).fetchall()
        add_items(project / "watchlist.csv", items(2, start=1200))
        assert refresh(None, progress=False).ok  # not blocked by the reader
        assert reader.execute("SELECT count(*) FROM tmapi.item_kpis").fetchone()[0] == 3  # its snapshot
    finally:
        reader.close()
    with duckdb.connect(str(copy), read_only=True) as fresh_reader:
        assert fresh_reader.execute("SELECT count(*) FROM tmapi.item_kpis").fetchone()[0] == 5


# ------------------------------------------------------------------------------------------------ time zones
def test_host_time_zone_never_moves_a_day(tmp_path):
    """The same stored responses give identical rows whatever TZ the host runs in."""
    fixture = ROOT / "tests" / "fixtures" / "doc_example_full.json"
    script = (
        "import json, sys\n"
        "from datetime import datetime, timezone\n"
        "from tmapi_assets import pipeline\n"
        "from tmapi_assets.client import Attempt\n"
        "from tmapi_assets.errors import Outcome\n"
        "from tmapi_assets.ids import WatchedItem\n"
        "from tmapi_assets.warehouse import Warehouse\n"
        "w = Warehouse(sys.argv[1])\n"
        f"body = open({str(fixture)!r}, 'rb').read()\n"
        "at = datetime(2025, 7, 23, 17, 30, tzinfo=timezone.utc)  # 01:30 on 24 July in China\n"
        "a = Attempt(WatchedItem(652702302959), 1, at, 1.0, 200, 200, Outcome.SUCCESS, body, 'u', None)\n"
        "w.record_attempts([a], 'tz', ['r1'])\n"
        "pipeline.normalise_items(w)\n"
        "w.refresh_kpis()\n"
        "rows = {t: w.records(f'SELECT * FROM tmapi.{t} ORDER BY ALL') for t in\n"
        "        ('item_statistics', 'sales_trend_daily', 'price_trend_daily', 'item_kpis', 'api_calls_daily')}\n"
        "for t in ('item_statistics', 'item_kpis'):\n"
        "    for r in rows[t]: r.pop('updated_at', None); r.pop('computed_at', None)\n"
        "print(json.dumps(rows, default=str, sort_keys=True))\n"
    )
    dumps = {}
    for zone in ("UTC", "America/Los_Angeles", "Asia/Shanghai"):
        env = dict(os.environ, TZ=zone)
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{zone.replace('/', '_')}.duckdb")],
                             env=env, capture_output=True, text=True, check=True).stdout
        dumps[zone] = json.loads(out)
    assert dumps["UTC"] == dumps["America/Los_Angeles"] == dumps["Asia/Shanghai"]
    assert dumps["UTC"]["api_calls_daily"][0]["call_date_cn"] == "2025-07-24"
    assert dumps["UTC"]["sales_trend_daily"][0]["date"] == "2025-06-24"
    assert dumps["UTC"]["item_statistics"][0]["publish_time"].startswith("2024-06-27 01:22:26")


def test_cli_commands_say_what_is_wrong_instead_of_a_traceback(project, sandbox_api, monkeypatch):
    add_items(project / "watchlist.csv", items(2, start=1300))
    assert refresh(None, progress=False).ok
    monkeypatch.setenv("TMAPI_DUCKDB_LOCK_TIMEOUT_S", "0.5")
    holder = hold_lock(project / "tmapi.duckdb", seconds=30)
    try:
        for command in (["kpis"], ["reparse"], ["publish"]):
            result = CliRunner().invoke(cli, command)
            assert result.exit_code == 2, (command, result.output)
            assert f"error: DuckDB file {project / 'tmapi.duckdb'} is locked by PID {holder.pid}" in result.output
            assert "Traceback" not in result.output
    finally:
        holder.kill()
        holder.wait()
    for name, value, expected in (("TMAPI_CONCURRENCY", "abc", "TMAPI_CONCURRENCY='abc' is not a whole number"),
                                  ("TMAPI_DUCKDB_LOCK_TIMEOUT_S", "soon", "is not a number"),
                                  ("TMAPI_AUTH_MODE", "bogus", "use 'query' (?apiToken=...) or 'header'"),
                                  ("TMAPI_CONCURRENCY", "0", "TMAPI_CONCURRENCY='0' must be a whole number >= 1"),
                                  ("TMAPI_MAX_ATTEMPTS", "-1", "must be a whole number >= 1"),
                                  ("TMAPI_FRESH_WITHIN_HOURS", "nan", "must be a number >= 0"),
                                  ("TMAPI_DUCKDB_LOCK_TIMEOUT_S", "inf", "must be a number >= 0")):
        monkeypatch.setenv(name, value)
        result = CliRunner().invoke(cli, ["refresh", "--force", "--quiet"])
        monkeypatch.delenv(name)
        assert result.exit_code == 2 and expected in result.output, (name, result.output)
    assert sandbox_api.stats()["requests_total"] == 2  # none of the refused refreshes called the API


def test_settings_read_at_import_and_a_closed_stdout_still_end_cleanly(project, sandbox_api):
    """Settings read when Dagster's definitions load get the same one-line error; a shell that closed stdout
    (`>&-`) does not turn a finished command into a failure."""
    for name, value in (("TMAPI_PARTITIONS_PER_RUN", "abc"), ("TMAPI_STEP_RETRY_DELAY_S", "-5")):
        proc = subprocess.run([sys.executable, "-m", "tmapi_assets.cli", "refresh", "--quiet"], capture_output=True,
                              text=True, timeout=120, env=env_for(project, sandbox_api, **{name: value}))
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {name}="), (name, proc.stderr)
        assert "Traceback" not in proc.stderr
    for closed in (">&-", "2>&-"):
        proc = subprocess.run(f'"{sys.executable}" -m tmapi_assets.cli status {closed}', shell=True,
                              capture_output=closed == "2>&-", timeout=60, env=env_for(project, sandbox_api))
        assert proc.returncode == 0, closed


def test_a_refresh_blocked_by_a_lock_says_so_in_a_few_lines(project, sandbox_api):
    """The whole refresh finds the live file held by another program: a short summary naming the holder, the run
    failure in one line, the items grouped, no stack trace (those are in the UI and with --verbose)."""
    batch = items(12, start=1400)
    add_items(project / "watchlist.csv", batch)
    Warehouse(project / "tmapi.duckdb").ensure_schema()
    holder = hold_lock(project / "tmapi.duckdb", seconds=120, read_only=True)
    try:  # a process of its own: the step retry delay is read when Dagster's definitions are imported
        proc = subprocess.run([sys.executable, "-m", "tmapi_assets.cli", "refresh", "--quiet"], capture_output=True,
                              text=True, timeout=120, env=env_for(project, sandbox_api, TMAPI_DUCKDB_LOCK_TIMEOUT_S="0.3",
                                                                  TMAPI_STEP_RETRY_DELAY_S="0.1"))
    finally:
        holder.kill()
        holder.wait()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 8, output
    assert f"locked by PID {holder.pid}" in output
    assert "failed: raw_responses: DuckDB file" in output
    assert "FAILED 12 items (" in output
    assert sandbox_api.stats()["requests_total"] == 0  # nothing bought while answers could not be stored
    assert refresh(None, progress=False).ok
    assert sandbox_api.stats()["requests_total"] == len(batch)
