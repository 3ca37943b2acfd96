"""Token hygiene (the token never appears anywhere) and partition keys that survive the UI's GraphQL API."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dagster import DagsterInstance
from dagster._serdes import serialize_value

from conftest import install_dagster_yaml
from tmapi_assets.client import ClientSettings
from tmapi_assets.defs.partitions import watched_items
from tmapi_assets.defs.runner import refresh
from tmapi_assets.errors import RunHaltedError
from tmapi_assets.ids import WatchedItem
from tmapi_assets.sandbox import SandboxProcess
from tmapi_assets.warehouse import Warehouse
from tmapi_assets.watchlist import add_items

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-SECRET-9f3a7c-hygiene"
EXHAUSTED = "tok-EXHAUSTED-5b1e-hygiene"


def warehouse_text(path: Path) -> str:
    """Every value of every table and view, as text (BLOBs included)."""
    warehouse = Warehouse(path)
    tables = warehouse.records(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'tmapi'")
    chunks = []
    for row in tables:
        for record in warehouse.records(f"SELECT * FROM tmapi.{row['table_name']}"):
            chunks.append(repr(record))
    return "\n".join(chunks)


def test_the_token_appears_nowhere(tmp_path, monkeypatch, caplog, capfd):
    with SandboxProcess(latency_ms=20, concurrency_limit=8, token=TOKEN, exhausted_token=EXHAUSTED) as api:
        monkeypatch.setenv("TMAPI_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        monkeypatch.setenv("TMAPI_BASE_URL", api.base_url)
        monkeypatch.setenv("TMAPI_API_TOKEN", TOKEN)
        monkeypatch.setenv("TMAPI_MAX_ATTEMPTS", "3")
        install_dagster_yaml(tmp_path / "dagster_home")
        caplog.set_level(logging.DEBUG)  # httpx logs every URL at INFO and httpcore every step at DEBUG

        good = [WatchedItem(1000000000000 + 7 * i) for i in range(6)]
        bad = WatchedItem(777700000422)  # 422 from the sandbox
        add_items(tmp_path / "watchlist.csv", good + [bad])
        for item, script in zip(good, [
            [{"status": 417, "body": {"code": 417, "msg": "Failed to retrieve data"}}],
            [{"status": 503, "body": {"code": 503, "msg": "concurrency limit exceeded"}}],
            [{"status": 502, "content_type": "text/html", "body_text": "<html><h1>502 Bad Gateway</h1></html>"}],
            [{"status": 200, "content_type": "application/json", "body_text": ""}],
            [{"kind": "disconnect"}],
            # An error page and a msg echoing the token (a gateway quoting the request URL): stored masked.
            [{"status": 500, "content_type": "text/html", "body_text": f"<p>GET /sales?apiToken={TOKEN} failed</p>"},
             {"status": 500, "body": {"code": 500, "msg": f"internal error ({TOKEN}), apiToken={TOKEN}"}}],
        ]):
            api.script(item.item_id, script)
        errors = []
        outcome = refresh(None, progress=False, log_level="DEBUG")  # successes, every error kind, retries
        errors += list(outcome.errors.values()) + [outcome.summary_text()]
        assert outcome.landed == len(good) and bad in outcome.not_landed

        # A crash: a refresh killed mid-run (its spool is loaded by the next run).
        add_items(tmp_path / "watchlist.csv", [WatchedItem(1000000000100 + i) for i in range(6)])
        env = dict(os.environ)
        proc = subprocess.Popen([sys.executable, "-m", "tmapi_assets.cli", "refresh", "--verbose"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((tmp_path / "spool").glob(f"{proc.pid}-*.jsonl")):
            time.sleep(0.01)
        time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        crash_output = proc.communicate()[0].decode(errors="replace")

        # Quota: the exhausted token halts the run and is persisted.
        monkeypatch.setenv("TMAPI_API_TOKEN", EXHAUSTED)
        add_items(tmp_path / "watchlist.csv", [WatchedItem(1000000000200)])
        halted = refresh(None, progress=False, log_level="DEBUG")
        errors += list(halted.errors.values()) + [halted.summary_text()]
        with pytest.raises(RunHaltedError) as info:
            refresh(None, progress=False)
        errors.append(str(info.value))
        errors.append(repr(ClientSettings(base_url=api.base_url, api_token=TOKEN)))

        instance = DagsterInstance.get()
        event_log = "\n".join(serialize_value(e) for run in instance.get_runs() for e in instance.all_logs(run.run_id))
        captured = capfd.readouterr()
        files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    assert event_log and caplog.text and files  # the scan has material to look at
    assert "HTTP Request" in caplog.text  # httpx really logged the calls...
    for secret in (TOKEN, EXHAUSTED):
        assert secret not in caplog.text  # ...without the token
        assert secret not in captured.out and secret not in captured.err
        assert secret not in crash_output
        assert secret not in event_log
        assert secret not in warehouse_text(tmp_path / "tmapi.duckdb")
        assert all(secret not in text for text in errors)
        leaking = [str(p) for p, data in files.items() if secret.encode() in data]
        assert leaking == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_partition_keys_round_trip_through_the_ui_graphql_api(tmp_path):
    """The keys the UI shows (and sends back when launching a backfill) are the keys we made."""
    keys = [WatchedItem.from_partition_key(k).partition_key for k in (
        "652702302959", "1000012345678", "9223372036854775807",
        "652702302959:5b2a1c4d8e9f00112233445566778899", "652702302959:A-b_9", "1:x")]
    home = install_dagster_yaml(tmp_path / "dagster_home")
    env = dict(os.environ, DAGSTER_HOME=str(home), TMAPI_DATA_DIR=str(tmp_path))
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        DagsterInstance.get().add_dynamic_partitions(watched_items.name, keys)
    finally:
        os.environ.pop("DAGSTER_HOME")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-w", str(ROOT / "workspace.yaml"), "-p", str(port),
         "-h", "127.0.0.1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        query = """{ assetNodeOrError(assetKey: {path: ["tmapi", "raw_responses"]}) {
                       ... on AssetNode { partitionKeysByDimension { partitionKeys } } } }"""
        deadline, answer = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=5).json()
                if answer.get("data", {}).get("assetNodeOrError", {}).get("partitionKeysByDimension"):
                    break
            except (httpx.HTTPError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        [dimension] = answer["data"]["assetNodeOrError"]["partitionKeysByDimension"]
        assert dimension["partitionKeys"] == keys
        assert [WatchedItem.from_partition_key(k).partition_key for k in dimension["partitionKeys"]] == keys
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
