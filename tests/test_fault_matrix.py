"""The fault matrix (issue 4): every field case and every network fault, served by the sandbox OVER REAL HTTP (no
MockTransport), fetched with AsyncTmapiClient through pipeline.fetch_items into a temporary Warehouse.

1. every case of responses.json: the stored raw rows, retried or not (counted at the sandbox), halted or not, and
   the error text of permanent failures;
2. faults beyond the cases: connection refused and connect timeout, headers that never come, a body dripping past
   the deadline, resets mid-body, keep-alive connections closed by the server, HTML gateway pages, a BOM, `code`
   as a string, a 50 MB body refused with bounded memory, non-UTF-8 bytes in a 200;
3. scale: 1,000 items against 20 % transient faults, every item landed once, attempts <= 1.3 per item.

Run with `pytest -s` to see the measured figures.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from conftest import load_field_cases

from tmapi_assets import pipeline
from tmapi_assets.client import OVERSIZED_PREFIX_BYTES, AsyncTmapiClient, ClientSettings, FetchResult
from tmapi_assets.errors import Outcome, RunHaltedError
from tmapi_assets.ids import WatchedItem
from tmapi_assets.sandbox import SandboxProcess
from tmapi_assets.warehouse import Warehouse

pytestmark = pytest.mark.timeout(120)

CASES, CASES_MISSING = load_field_cases("responses.json")

MAX_ATTEMPTS = 3
FIRST, SECOND = WatchedItem(100000000011), WatchedItem(100000000022)

SUCCESS_BODY = {
    "code": 200,
    "msg": "success",
    "data": {
        "publish_time": "2024-06-27 09:22:26",
        "sales_quantity_30days": 136,
        "sales_quantity_total": "1.5万+",
        "order_quantity_total": "3500+",
        "sales_trend": [{"date": "2025-06-24", "sales_quantity": 136, "order_quantity": 12}],
        "price_trend": [{"date": "2025-06-24", "price_min": "11.0", "price_max": "12.5"}],
    },
}

# What each case of responses.json must give over real HTTP: (outcome, retried, halts the run).
# A case added to the file without an entry here fails its test: decide what it means, then add it.
EXPECT: dict[str, tuple[Outcome, bool, bool]] = {
    "success": (Outcome.SUCCESS, False, False),
    "no-data": (Outcome.NO_DATA, False, False),
    "417": (Outcome.TRANSIENT, True, False),
    "499": (Outcome.TRANSIENT, True, False),
    "503": (Outcome.TRANSIENT, True, False),
    "500": (Outcome.TRANSIENT, True, False),
    "422": (Outcome.ITEM_ERROR, False, False),
    "439": (Outcome.QUOTA, False, True),
    "439-in-200": (Outcome.QUOTA, False, True),
    "gateway-no-key": (Outcome.AUTH, False, True),
    "gateway-no-route": (Outcome.CONFIG, False, True),
    "html-502": (Outcome.TRANSIENT, True, False),
    "empty-200": (Outcome.MALFORMED, True, False),
}


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def sandbox_api():
    with SandboxProcess(port=0) as api:
        yield api


@pytest.fixture
def warehouse(tmp_path, monkeypatch, sandbox_api) -> Warehouse:
    """A fresh warehouse and data dir (spool, halt file) for each test; the sandbox's scripts and stats cleared."""
    monkeypatch.setenv("TMAPI_DATA_DIR", str(tmp_path))
    sandbox_api.reset()
    return Warehouse(tmp_path / "tmapi.duckdb", lock_timeout_s=10)


def client_settings(base_url: str, token: str, **overrides: Any) -> ClientSettings:
    values: dict[str, Any] = dict(
        base_url=base_url, api_token=token, max_attempts=MAX_ATTEMPTS, backoff_base_s=0.005, backoff_max_s=0.02,
        timeout_s=5.0, connect_timeout_s=2.0, concurrency=1,
    )
    values.update(overrides)
    return ClientSettings(**values)


def fetch(sandbox_api, warehouse: Warehouse, items: list[WatchedItem], **overrides: Any) -> pipeline.FetchSummary:
    settings = client_settings(sandbox_api.base_url, sandbox_api.token, **overrides)
    return pipeline.fetch_items(items, settings=settings, warehouse=warehouse, run_id="fault-matrix", force=True)


def rows(warehouse: Warehouse, item: WatchedItem) -> list[dict[str, Any]]:
    return warehouse.records(
        "SELECT * FROM tmapi.raw_responses WHERE item_id = ? AND spec_id = ? ORDER BY attempt",
        [item.item_id, item.spec_id])


def raw_count(warehouse: Warehouse) -> int:
    return warehouse.records("SELECT count(*) AS n FROM tmapi.raw_responses")[0]["n"]


def calls(stats: dict[str, Any], item: WatchedItem) -> int:
    return stats["by_item"].get(str(item), 0)


def stored_text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


def assert_token_free(warehouse: Warehouse, token: str) -> None:
    leaked = warehouse.records(
        "SELECT count(*) AS n FROM tmapi.raw_responses WHERE contains(request_url, ?) OR contains(message, ?)",
        [token, token])[0]["n"]
    assert leaked == 0
    urls = warehouse.records("SELECT DISTINCT request_url FROM tmapi.raw_responses")
    assert all("apiToken=***" in r["request_url"] for r in urls)


def assert_error_text(text: str, item: WatchedItem, status: int | None, *fragments: str) -> None:
    """A permanent failure says which item, which HTTP status (or that there was none) and what the API said."""
    assert str(item) in text, text
    assert (f"HTTP {status}" if status is not None else "no HTTP answer") in text, text
    for fragment in fragments:
        assert fragment.lower() in text.lower(), f"{fragment!r} not in {text!r}"


def statistics_row(warehouse: Warehouse, item: WatchedItem) -> dict[str, Any] | None:
    found = warehouse.records("SELECT * FROM tmapi.item_statistics WHERE item_id = ? AND spec_id = ?",
                              [item.item_id, item.spec_id])
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------ 1. every case


def case_script(case: dict) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": case["status"], "content_type": case["content_type"]}
    if "body" in case:
        entry["body"] = case["body"]
    else:
        entry["body_text"] = case.get("body_text", "")
    return entry


def case_bytes(case: dict) -> bytes:
    """Exactly what the sandbox sends for the case (and what the raw row must keep)."""
    if "body" in case:
        return json.dumps(case["body"], ensure_ascii=False).encode("utf-8")
    return case.get("body_text", "").encode("utf-8")


def case_message(case: dict) -> str | None:
    """The API's own words in the case: the body's msg, else the gateway's message."""
    body = case.get("body")
    if isinstance(body, dict):
        if body.get("msg") is not None:
            return str(body["msg"])
        if isinstance(body.get("message"), str):
            return body["message"]
    return None


@pytest.mark.skipif(bool(CASES_MISSING), reason=CASES_MISSING or "")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_over_real_http(case: dict, sandbox_api, warehouse: Warehouse) -> None:
    if case["name"] not in EXPECT:
        pytest.fail(f"case {case['name']!r} of responses.json has no expectation in test_fault_matrix.EXPECT")
    outcome, retried, halts = EXPECT[case["name"]]
    # Both items get the case's answer for every attempt; concurrency 1, so SECOND's first call can only start
    # after FIRST's first answer is decided (a halt then stops it before any call).
    for item in (FIRST, SECOND):
        sandbox_api.script(item.item_id, [case_script(case)] * MAX_ATTEMPTS)

    summary = fetch(sandbox_api, warehouse, [FIRST, SECOND])
    stats = sandbox_api.stats()
    expected_calls = MAX_ATTEMPTS if retried else 1

    # Retried or not, counted where the calls arrive; every call is one raw row (the cost ledger is complete).
    assert calls(stats, FIRST) == expected_calls
    assert raw_count(warehouse) == stats["requests_total"] == summary.calls

    stored = rows(warehouse, FIRST)
    assert [r["attempt"] for r in stored] == list(range(1, expected_calls + 1))
    body = case_bytes(case)
    api_code = case["body"].get("code") if isinstance(case.get("body"), dict) else None
    message = case_message(case)
    for row in stored:
        assert row["outcome"] == outcome.value
        assert row["http_status"] == case["status"]
        assert row["api_code"] == api_code
        assert row["body"] == stored_text(body)  # verbatim
        assert row["body_bytes"] is None  # valid UTF-8: the text is the exact body
        assert row["body_size"] == len(body)
        assert row["run_id"] == "fault-matrix"
        if message is not None:
            assert row["message"] == message  # the API's msg is kept as it came
        elif outcome not in (Outcome.SUCCESS, Outcome.NO_DATA):
            assert row["message"], "a failure without the API's words must say what was wrong"
    assert_token_free(warehouse, sandbox_api.token)

    # Halted or not.
    if halts:
        assert calls(stats, SECOND) == 0 and rows(warehouse, SECOND) == []  # no call after it in the run
        assert summary.halted == [SECOND]
        assert isinstance(summary.halt_error, RunHaltedError) and summary.halt_error.outcome is outcome
        assert "tmapi-assets resume" in str(summary.halt_error)
    else:
        assert summary.halt_error is None and summary.halted == []
        assert calls(stats, SECOND) == expected_calls  # other items go on
        assert [r["outcome"] for r in rows(warehouse, SECOND)] == [outcome.value] * expected_calls

    # Landed, or failed with a text naming the item, the HTTP status and the API's msg.
    if outcome in (Outcome.SUCCESS, Outcome.NO_DATA):
        assert summary.landed == [FIRST, SECOND] and summary.failed == {}
    else:
        assert FIRST not in summary.landed
        words = message if message is not None else stored[-1]["message"]
        assert_error_text(summary.failed[FIRST], FIRST, case["status"], words)
        assert sandbox_api.token not in summary.failed[FIRST]

    # Downstream: only a real answer becomes an observation; an error is never read as "no sales".
    pipeline.normalise_items(warehouse, [FIRST])
    stats_row = statistics_row(warehouse, FIRST)
    if outcome is Outcome.SUCCESS:
        assert stats_row is not None and stats_row["has_data"]
    elif outcome is Outcome.NO_DATA:
        assert stats_row is not None and not stats_row["has_data"] and stats_row["sales_rows"] == 0
    else:
        assert stats_row is None


# ------------------------------------------------------------------------------------------------ 2. network faults


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_a_retried_network_error(sandbox_api, warehouse):
    base = f"http://127.0.0.1:{closed_port()}"
    settings = client_settings(base, sandbox_api.token)
    summary = pipeline.fetch_items([FIRST], settings=settings, warehouse=warehouse, run_id="refused", force=True)
    stored = rows(warehouse, FIRST)
    assert [r["outcome"] for r in stored] == [Outcome.NETWORK.value] * MAX_ATTEMPTS
    assert all(r["http_status"] is None and r["api_code"] is None and r["body_size"] == 0 for r in stored)
    assert all("ConnectError" in r["message"] for r in stored)
    assert summary.halt_error is None  # a network problem is not a halt
    assert_error_text(summary.failed[FIRST], FIRST, None, "ConnectError", base)


def test_connect_timeout_is_a_retried_network_error(sandbox_api, warehouse):
    """A listener whose accept queue is full: the kernel drops our SYNs, so connect() hangs until the timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # never accepted: they fill the queue
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        time.sleep(0.05)
        settings = client_settings(f"http://127.0.0.1:{port}", sandbox_api.token, connect_timeout_s=0.2,
                                   timeout_s=0.5)
        started = time.perf_counter()
        summary = pipeline.fetch_items([FIRST], settings=settings, warehouse=warehouse, run_id="ct", force=True)
        seconds = time.perf_counter() - started
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    stored = rows(warehouse, FIRST)
    assert [r["outcome"] for r in stored] == [Outcome.NETWORK.value] * MAX_ATTEMPTS
    assert all(r["http_status"] is None and "ConnectTimeout" in r["message"] for r in stored)
    assert all(150 <= r["elapsed_ms"] < 1500 for r in stored)  # the connect timeout, not the read timeout
    assert seconds < 5
    assert_error_text(summary.failed[FIRST], FIRST, None, "ConnectTimeout")


def test_headers_that_never_come_time_out_and_are_retried(sandbox_api, warehouse):
    """Headers stall past timeout_s: FIRST stalls every time and fails; SECOND stalls once, then lands."""
    sandbox_api.script(FIRST.item_id, [{"kind": "stall_headers"}] * MAX_ATTEMPTS)
    sandbox_api.script(SECOND.item_id, [{"kind": "stall_headers"}])
    started = time.perf_counter()
    summary = fetch(sandbox_api, warehouse, [FIRST, SECOND], timeout_s=0.3, connect_timeout_s=0.5, concurrency=2)
    seconds = time.perf_counter() - started
    first, second = rows(warehouse, FIRST), rows(warehouse, SECOND)
    assert [r["outcome"] for r in first] == [Outcome.NETWORK.value] * MAX_ATTEMPTS
    assert all(r["http_status"] is None and "ReadTimeout" in r["message"] for r in first)
    assert all(250 <= r["elapsed_ms"] < 2000 for r in first)
    assert [r["outcome"] for r in second] == [Outcome.NETWORK.value, Outcome.SUCCESS.value]
    assert summary.landed == [SECOND]
    assert_error_text(summary.failed[FIRST], FIRST, None, "ReadTimeout")
    stats = sandbox_api.stats()
    assert calls(stats, FIRST) == MAX_ATTEMPTS and calls(stats, SECOND) == 2
    assert raw_count(warehouse) == stats["requests_total"]
    assert seconds < 5


def test_a_body_dripping_past_the_deadline_is_cut_off(sandbox_api, warehouse):
    """Each chunk comes well within the read timeout, but the whole answer would take 2.5 s: the client gives up at
    its deadline (connect_timeout_s + timeout_s = 0.6 s). A drip fast enough to finish in time lands."""
    body = json.dumps(SUCCESS_BODY, ensure_ascii=False).encode("utf-8")
    slow = {"kind": "drip", "body": SUCCESS_BODY, "chunk_bytes": max(1, len(body) // 25), "interval_ms": 100}
    quick = {**slow, "interval_ms": 5}
    sandbox_api.script(FIRST.item_id, [slow] * 2)
    sandbox_api.script(SECOND.item_id, [quick])
    summary = fetch(sandbox_api, warehouse, [FIRST, SECOND], timeout_s=0.4, connect_timeout_s=0.2, concurrency=2,
                    max_attempts=2)
    first, second = rows(warehouse, FIRST), rows(warehouse, SECOND)
    assert [r["outcome"] for r in first] == [Outcome.NETWORK.value] * 2
    for row in first:
        assert row["http_status"] == 200  # the headers had come
        assert "not complete after 0.6 s" in row["message"]
        assert 550 <= row["elapsed_ms"] < 1500  # stopped at the deadline, not after the whole 2.5 s
        assert 0 < row["body_size"] < len(body) and body.startswith(row["body"].encode("utf-8"))
    assert [r["outcome"] for r in second] == [Outcome.SUCCESS.value]
    assert second[0]["body"] == body.decode("utf-8")
    assert summary.landed == [SECOND]
    assert_error_text(summary.failed[FIRST], FIRST, 200, "not complete")


@pytest.mark.parametrize(
    "fault, error, status",
    [
        ({"kind": "stall_body", "sleep_ms": 100, "reset": True}, "ReadError", 200),  # RST mid-body
        ({"kind": "stall_body", "sleep_ms": 100}, "RemoteProtocolError", 200),  # FIN mid-body
        ({"kind": "disconnect", "reset": True}, "ReadError", None),  # RST before any answer
        ({"kind": "disconnect"}, "RemoteProtocolError", None),  # FIN before any answer
    ],
    ids=["rst-mid-body", "fin-mid-body", "rst-no-answer", "fin-no-answer"],
)
def test_a_connection_dropped_mid_answer_is_retried(fault, error, status, sandbox_api, warehouse):
    prefix = '{"code": 200, "msg": "success", "data": {"sales_trend": ['
    entry = {**fault, "body_text": prefix} if fault["kind"] == "stall_body" else fault
    sandbox_api.script(FIRST.item_id, [entry])  # then the sandbox's normal success
    summary = fetch(sandbox_api, warehouse, [FIRST])
    stored = rows(warehouse, FIRST)
    assert [r["outcome"] for r in stored] == [Outcome.NETWORK.value, Outcome.SUCCESS.value]
    dropped = stored[0]
    assert dropped["http_status"] == status and error in dropped["message"]
    assert dropped["body"] == (prefix if status else "")  # what had arrived is kept
    assert summary.landed == [FIRST]
    assert raw_count(warehouse) == sandbox_api.stats()["requests_total"] == 2


@pytest.mark.parametrize(
    "extra, closing, max_failed_per_item",
    [
        ({"headers": {"connection": "close"}}, range(30), 0),  # said so: the client must not reuse the connection
        ({"close_after_ms": 0}, range(30), 1),  # closed as soon as idle, between calls: the pool must notice
        ({"close_after_ms": 2}, (5, 15, 25), 1),  # an idle timeout racing the client's next call
    ],
    ids=["connection-close-header", "idle-close-0ms", "idle-close-racing"],
)
def test_keep_alive_connections_closed_by_the_server_between_calls(extra, closing, max_failed_per_item, sandbox_api,
                                                                   warehouse):
    """After an answer the server closes the connection: announced (`Connection: close`), or silently once it is
    idle (a keep-alive timeout shorter than the client's pool, for every item or, racing the next call, for a few).
    Each item must land without a failed attempt, or with one call lost to the close (no answer at all) and
    retried (the retry comes after the other items, on a connection no close is pending on)."""
    batch = [WatchedItem(200000000101 + i) for i in range(30)]  # no special ids (…0000 is "no data")
    for i in closing:
        sandbox_api.script(batch[i].item_id, [{"status": 200, "body": SUCCESS_BODY, **extra}])
    summary = fetch(sandbox_api, warehouse, batch, concurrency=1)
    assert summary.landed == batch and summary.failed == {}
    per_item = warehouse.records(
        """SELECT item_id, count(*) AS n, list(outcome ORDER BY attempt) AS outcomes,
                  list(http_status ORDER BY attempt) AS statuses, list(message ORDER BY attempt) AS messages
           FROM tmapi.raw_responses GROUP BY item_id""")
    assert len(per_item) == len(batch)
    lost = 0
    for row in per_item:
        failed = row["n"] - 1
        lost += failed
        assert failed <= max_failed_per_item, row
        assert row["outcomes"] == [Outcome.NETWORK.value] * failed + [Outcome.SUCCESS.value], row
        assert row["statuses"][:failed] == [None] * failed, row  # the lost calls got no answer at all
    # Every attempt is a row; a request sent on a connection the server was closing may never reach the app.
    assert raw_count(warehouse) == len(batch) + lost
    assert len(batch) <= sandbox_api.stats()["requests_total"] <= raw_count(warehouse)
    print(f"\nkeep-alive {extra}: {len(batch)} items landed, {lost} call(s) lost to a closed connection and retried")


@pytest.mark.parametrize(
    "status, entry, words",
    [
        (502, {"status": 502, "content_type": "text/html",
               "body_text": "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
                            "</h1></center><hr><center>nginx</center></body></html>"}, "502 Bad Gateway"),
        (504, {"status": 504, "content_type": "text/html; charset=utf-8",
               "body_text": "<!DOCTYPE html><html><body><h1>504 Gateway Time-out</h1>The server didn't respond in "
                            "time.</body></html>"}, "504 Gateway Time-out"),
        (504, {"kind": "stall_headers", "sleep_ms": 20}, "The upstream server is timing out"),  # Kong's own 504
    ],
    ids=["html-502", "html-504", "kong-504"],
)
def test_gateway_error_pages_are_transient(status, entry, words, sandbox_api, warehouse):
    sandbox_api.script(FIRST.item_id, [entry] * MAX_ATTEMPTS)
    sandbox_api.script(SECOND.item_id, [entry])  # then the sandbox's normal success
    summary = fetch(sandbox_api, warehouse, [FIRST, SECOND])
    first, second = rows(warehouse, FIRST), rows(warehouse, SECOND)
    assert [r["outcome"] for r in first] == [Outcome.TRANSIENT.value] * MAX_ATTEMPTS
    assert all(r["http_status"] == status and r["api_code"] is None and words in r["message"] for r in first)
    if "body_text" in entry:
        assert all(r["body"] == entry["body_text"] for r in first)
    assert [r["outcome"] for r in second] == [Outcome.TRANSIENT.value, Outcome.SUCCESS.value]
    assert summary.landed == [SECOND]
    assert_error_text(summary.failed[FIRST], FIRST, status, words)


def test_json_with_a_utf8_bom_is_a_success(sandbox_api, warehouse):
    text = "\ufeff" + json.dumps(SUCCESS_BODY, ensure_ascii=False)
    sandbox_api.script(FIRST.item_id, [{"status": 200, "content_type": "application/json", "body_text": text}])
    summary = fetch(sandbox_api, warehouse, [FIRST])
    [row] = rows(warehouse, FIRST)
    assert row["outcome"] == Outcome.SUCCESS.value and row["api_code"] == 200
    assert row["body"] == text and row["body_bytes"] is None  # stored as sent, BOM included
    assert row["body_size"] == len(text.encode("utf-8")) and text.encode("utf-8").startswith(b"\xef\xbb\xbf")
    assert summary.landed == [FIRST]
    pipeline.normalise_items(warehouse, [FIRST])
    stats_row = statistics_row(warehouse, FIRST)
    assert stats_row["has_data"] and stats_row["sales_quantity_total_lower_bound"] == 15000


@pytest.mark.parametrize("code, outcome", [("200", Outcome.SUCCESS), ("439", Outcome.QUOTA)])
def test_code_as_a_string(code, outcome, sandbox_api, warehouse):
    body = {**SUCCESS_BODY, "code": code}
    if outcome is Outcome.QUOTA:
        body = {"code": code, "msg": "insufficient balance", "data": None}
    sandbox_api.script(FIRST.item_id, [{"status": 200, "body": body}])
    summary = fetch(sandbox_api, warehouse, [FIRST, SECOND])
    [row] = rows(warehouse, FIRST)
    assert row["outcome"] == outcome.value and row["api_code"] == int(code)
    assert row["body"] == json.dumps(body, ensure_ascii=False)
    if outcome is Outcome.SUCCESS:
        assert summary.landed == [FIRST, SECOND]
        pipeline.normalise_items(warehouse, [FIRST])
        assert statistics_row(warehouse, FIRST)["has_data"]
    else:
        assert summary.halted == [SECOND] and calls(sandbox_api.stats(), SECOND) == 0
        assert_error_text(summary.failed[FIRST], FIRST, 200, "code 439", "insufficient balance")


MIB = 2**20
BIG = 50_000_000


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _fetch_one_with_client(settings: ClientSettings, item: WatchedItem) -> FetchResult:
    async def run() -> FetchResult:
        async with AsyncTmapiClient(settings) as client:
            return await client.fetch(item)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def big_body(sandbox_api, tmp_path_factory) -> dict[str, Any]:
    """Refuse over-cap bodies (default max_body_bytes, 8 MiB) and measure the Python peak (tracemalloc) of the
    client alone and of pipeline.fetch_items (client + spool + DuckDB write), plus the process's peak RSS growth of
    one fetch_items without tracemalloc. Shared by the two memory tests below."""
    data_dir = tmp_path_factory.mktemp("big-body")
    cap = ClientSettings().max_body_bytes
    settings = client_settings(sandbox_api.base_url, sandbox_api.token, max_body_bytes=cap)
    warehouse = Warehouse(data_dir / "tmapi.duckdb", lock_timeout_s=10)
    out: dict[str, Any] = {"cap": cap, "warehouse": warehouse}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMAPI_DATA_DIR", str(data_dir))
        sandbox_api.reset()
        warehouse.ensure_schema()

        def pipeline_fetch(size: int, run_id: str) -> pipeline.FetchSummary:
            sandbox_api.script(FIRST.item_id, [{"kind": "large_body", "size_bytes": size}])
            return pipeline.fetch_items([FIRST], settings=settings, warehouse=warehouse, run_id=run_id, force=True)

        pipeline_fetch(1000, "warm-up")  # imports, connections, schema: not part of the measurement
        gc.collect()
        rss_before = _rss_kib("VmRSS") if _reset_peak_rss() else None
        started = time.perf_counter()
        out["summary"] = pipeline_fetch(BIG, "rss")
        out["seconds"] = time.perf_counter() - started
        rss_peak = _rss_kib("VmHWM")
        out["rss_growth"] = None if rss_before is None or rss_peak is None else (rss_peak - rss_before) * 1024

        gc.collect()
        tracemalloc.start()  # peaks are counted from what was allocated when each measurement began
        try:
            sandbox_api.script(FIRST.item_id, [{"kind": "large_body", "size_bytes": BIG}])
            out["client_result"] = _fetch_one_with_client(settings, FIRST)
            out["client_peak"] = tracemalloc.get_traced_memory()[1]
            for size, key in ((cap + 4 * MIB, "pipeline_peak_12mb"), (BIG, "pipeline_peak_50mb")):
                gc.collect()
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                pipeline_fetch(size, key)
                out[key] = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        out["calls"] = calls(sandbox_api.stats(), FIRST)
        out["rows"] = warehouse.records(
            "SELECT run_id, attempt, outcome, http_status, body_size, left(body, 60) AS head "
            "FROM tmapi.raw_responses WHERE run_id != 'warm-up' ORDER BY fetched_at")
    growth = "n/a" if out["rss_growth"] is None else f"{out['rss_growth'] / MIB:.1f} MiB"
    print(f"\n50 MB body refused at max_body_bytes {cap} ({out['seconds']:.2f} s): Python peak (tracemalloc) "
          f"client alone {out['client_peak'] / MIB:.1f} MiB, fetch_items {out['pipeline_peak_50mb'] / MIB:.1f} MiB "
          f"(12 MB body: {out['pipeline_peak_12mb'] / MIB:.1f} MiB); process peak RSS growth of fetch_items {growth}")
    return out


def test_a_50mb_body_is_refused_oversized_and_never_read_past_the_cap(big_body):
    cap = big_body["cap"]
    assert cap == 8 * MIB
    result = big_body["client_result"]
    assert result.outcome == Outcome.OVERSIZED and len(result.attempts) == 1
    assert 0 < len(result.attempts[0].body) <= OVERSIZED_PREFIX_BYTES  # only a prefix is kept, to see what it was
    # One call per fetch (never retried), each stored once with the prefix up to the cap.
    assert big_body["calls"] == 5  # warm-up, RSS run, client alone, 12 MB, 50 MB
    stored = [r for r in big_body["rows"] if r["run_id"] != "warm-up"]
    assert [r["attempt"] for r in stored] == [1, 1, 1]
    assert all(r["outcome"] == Outcome.OVERSIZED.value and r["http_status"] == 200 for r in stored)
    assert all(0 < r["body_size"] <= OVERSIZED_PREFIX_BYTES
               # the first chunk read, however the network split it (43 bytes at times, when refused on Content-Length)
               and r["head"].startswith('{"code":200,"msg":"success","data":{"pad":"') for r in stored), \
        [(r["run_id"], r["body_size"], r["head"]) for r in stored]
    summary = big_body["summary"]
    assert summary.landed == [] and summary.halted == [] and summary.halt_error is None
    assert_error_text(summary.failed[FIRST], FIRST, 200, "too large", "max_body_bytes=8388608")
    # Bounded: what the refusal costs depends on the cap, not on the body (12 MB and 50 MB cost the same) ...
    assert abs(big_body["pipeline_peak_50mb"] - big_body["pipeline_peak_12mb"]) < 2 * MIB
    # ... and far below the body's size.
    assert big_body["client_peak"] < 20 * MIB
    assert big_body["pipeline_peak_50mb"] < 20 * MIB


def test_non_utf8_bytes_in_a_200_are_malformed_retried_and_kept_byte_exact(sandbox_api, warehouse):
    text = json.dumps({"code": 200, "msg": "成功", "data": {"sales_quantity_total": "1.5万+"}}, ensure_ascii=False)
    gbk = text.encode("gbk")
    entry = {"status": 200, "content_type": "application/json", "body_text": text, "charset": "gbk"}
    sandbox_api.script(FIRST.item_id, [entry] * MAX_ATTEMPTS)
    sandbox_api.script(SECOND.item_id, [entry])  # then the sandbox's normal success
    summary = fetch(sandbox_api, warehouse, [FIRST, SECOND])
    first, second = rows(warehouse, FIRST), rows(warehouse, SECOND)
    assert [r["outcome"] for r in first] == [Outcome.MALFORMED.value] * MAX_ATTEMPTS
    for row in first:
        assert row["http_status"] == 200 and "not valid UTF-8" in row["message"]
        assert row["body_bytes"] == gbk  # byte-exact
        assert row["body"] == gbk.decode("utf-8", errors="replace") and row["body_size"] == len(gbk)
    assert [r["outcome"] for r in second] == [Outcome.MALFORMED.value, Outcome.SUCCESS.value]
    assert second[0]["body_bytes"] == gbk and second[1]["body_bytes"] is None
    assert summary.landed == [SECOND]
    assert_error_text(summary.failed[FIRST], FIRST, 200, "not valid UTF-8", "not taken as 'no sales'")
    pipeline.normalise_items(warehouse, [FIRST, SECOND])
    assert statistics_row(warehouse, FIRST) is None and statistics_row(warehouse, SECOND)["has_data"]


# ------------------------------------------------------------------------------------------------ 3. scale


def scale_items(n: int) -> list[WatchedItem]:
    out: list[WatchedItem] = []
    i = 0
    while len(out) < n:
        item_id = 3000000000000 + 7919 * i
        i += 1
        if str(item_id).endswith(("0000", "0001", "0422")):  # the sandbox's special items
            continue
        out.append(WatchedItem(item_id))
    return out


@pytest.mark.timeout(180)
def test_1000_items_with_20_percent_faults_land_once_each(tmp_path, monkeypatch):
    monkeypatch.setenv("TMAPI_DATA_DIR", str(tmp_path))
    batch = scale_items(1000)
    warehouse = Warehouse(tmp_path / "tmapi.duckdb", lock_timeout_s=10)
    with SandboxProcess(port=0, fault_rate=0.2, latency_ms=5, concurrency_limit=16, seed=4) as api:
        settings = ClientSettings(base_url=api.base_url, api_token=api.token, concurrency=8, max_attempts=6,
                                  backoff_base_s=0.01, backoff_max_s=0.2)
        started = time.perf_counter()
        summary = pipeline.fetch_items(batch, settings=settings, warehouse=warehouse, run_id="scale", force=True)
        fetched_s = time.perf_counter() - started
        normalised = pipeline.normalise_items(warehouse, batch)
        warehouse.refresh_kpis(batch)
        seconds = time.perf_counter() - started
        stats = api.stats()

    counts = warehouse.table_counts()
    attempts = counts["raw_responses"]
    dup = warehouse.records(
        """SELECT
             (SELECT count(*) - count(DISTINCT response_id) FROM tmapi.raw_responses) AS raw_pk,
             (SELECT count(*) - count(DISTINCT (run_id, item_id, spec_id, attempt)) FROM tmapi.raw_responses)
                 AS raw_attempts,
             (SELECT count(*) FROM (SELECT item_id FROM tmapi.raw_responses WHERE outcome IN ('success', 'no_data')
                                    GROUP BY item_id, spec_id HAVING count(*) > 1)) AS paid_twice,
             (SELECT count(*) - count(DISTINCT (item_id, spec_id)) FROM tmapi.item_statistics) AS statistics_pk,
             (SELECT count(*) - count(DISTINCT (item_id, spec_id, date)) FROM tmapi.sales_trend_daily) AS sales_pk,
             (SELECT count(*) - count(DISTINCT (item_id, spec_id, date)) FROM tmapi.price_trend_daily) AS prices_pk,
             (SELECT count(*) - count(DISTINCT (item_id, spec_id)) FROM tmapi.item_kpis) AS kpis_pk""")[0]
    duplicates = sum(dup.values())
    landed = len(summary.landed)
    ratio = attempts / len(batch)
    by_status = dict(sorted(stats["by_status"].items()))
    print(f"\nscale: landed {landed}/{len(batch)}, attempts {attempts} (sandbox requests {stats['requests_total']}), "
          f"ratio {ratio:.3f}, duplicates {duplicates} {dup}, statuses {by_status}, "
          f"fetch {fetched_s:.1f} s, fetch+normalise+kpis {seconds:.1f} s")

    assert landed == len(batch) and not summary.failed and not summary.halted and summary.halt_error is None
    assert attempts == stats["requests_total"] == summary.calls  # every paid call stored, nothing else
    assert sum(v for k, v in stats["by_status"].items() if k != "200") > 0.1 * len(batch)  # the faults were real
    assert attempts <= 1.3 * len(batch)
    assert duplicates == 0, dup
    assert normalised.items == len(batch) and not normalised.parse_errors and not normalised.missing
    assert counts["item_statistics"] == counts["item_kpis"] == len(batch)
    assert counts["sales_trend_daily"] == normalised.sales_rows == 30 * len(batch)
    assert counts["price_trend_daily"] == normalised.price_rows == 29 * len(batch)
    successes = warehouse.records(
        "SELECT count(DISTINCT item_id) AS n FROM tmapi.raw_responses WHERE outcome = 'success'")[0]["n"]
    assert successes == len(batch)
