"""The sandbox API over real HTTP (httpx against SandboxThread; one test with SandboxProcess)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from tmapi_assets.sandbox import SandboxConfig, SandboxProcess, SandboxThread, synthetic
from tmapi_assets.sandbox.server import build_parser, config_from_args

FIXTURE = Path(__file__).resolve().parents[1] / "tmapi_assets" / "sandbox" / "doc_example_full.json"
SHARED_FIXTURE = Path("/work/shared/fixtures/doc_example_full.json")
TODAY = date(2025, 7, 24)
TOKEN = "sandbox-token"
PRICE = re.compile(r"\d+\.\d{1,2}")


@pytest.fixture(scope="module")
def sb():
    with SandboxThread(SandboxConfig(port=0, today=TODAY)) as server:
        yield server


@pytest.fixture()
def client(sb):
    sb.reset()
    with httpx.Client(base_url=sb.base_url, timeout=10) as c:
        yield c


def get(client, item, spec=None, token=TOKEN, **extra):
    params = {"item_id": item, **extra}
    if spec is not None:
        params["spec_id"] = spec
    if token is not None:
        params["apiToken"] = token
    return client.get("/1688/item/statistics/sales", params=params)


def display_lower_bound(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(万|亿)?(\+)?", text)
    assert m, text
    return float(m.group(1)) * {None: 1, "万": 10_000, "亿": 100_000_000}[m.group(2)]


# -- success bodies -------------------------------------------------------------------------------------------------


def test_doc_example_byte_exact(client):
    r = get(client, 652702302959)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content == FIXTURE.read_bytes()
    if SHARED_FIXTURE.exists():
        assert r.content == SHARED_FIXTURE.read_bytes()
    assert r.json()["data"]["sales_quantity_total"] == "1.5万+"


def check_history(data: dict, end: date) -> None:
    sales, prices = data["sales_trend"], data["price_trend"]
    assert len(sales) == 30 and len(prices) == 29
    sales_dates = [date.fromisoformat(row["date"]) for row in sales]
    assert sales_dates == [end - timedelta(days=29 - i) for i in range(30)]
    assert [row["date"] for row in prices] == [row["date"] for row in sales[:29]]  # ends one day earlier
    for row in sales:
        assert isinstance(row["sales_quantity"], int) and isinstance(row["order_quantity"], int)
        assert 0 <= row["order_quantity"] <= row["sales_quantity"]
    for row in prices:
        assert PRICE.fullmatch(row["price_min"]) and PRICE.fullmatch(row["price_max"]), row
        assert float(row["price_max"]) >= float(row["price_min"]) > 0
    total_30 = sum(row["sales_quantity"] for row in sales)
    assert data["sales_quantity_30days"] == total_30
    orders_30 = sum(row["order_quantity"] for row in sales)
    assert display_lower_bound(data["sales_quantity_total"]) >= total_30
    assert display_lower_bound(data["order_quantity_total"]) >= orders_30
    published = datetime.strptime(data["publish_time"], "%Y-%m-%d %H:%M:%S")
    assert published.date() < sales_dates[0]


@pytest.mark.parametrize("item,spec", [(1234567890123, None), (652702302959, "5b8f3a9c0d1e2f3a4b5c6d7e8f9a0b1c"),
                                       (610947572360, "sku_1-A"), (9223372036854775807, None)])  # fmt: skip
def test_synthetic_shape_and_invariants(client, item, spec):
    r = get(client, item, spec)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == 200 and body["msg"] == "success"
    check_history(body["data"], TODAY - timedelta(days=1))
    again = get(client, item, spec)
    assert again.content == r.content  # deterministic


def test_synthetic_utf8_not_escaped(client):
    # Find an item whose total is shown in 万 and check the raw bytes carry UTF-8, not \\u escapes.
    for item in range(610000000001, 610000000400):
        data = synthetic.history(item, "", TODAY - timedelta(days=1))
        if data and "万" in data["sales_quantity_total"]:
            raw = get(client, item).content
            assert "万".encode("utf-8") in raw and b"\\u" not in raw
            return
    pytest.fail("no item with a 万 total in 400 ids")


def test_windows_of_two_days_agree_on_shared_dates():
    items = [("1234567890123", ""), ("610947572360", "abc"), ("777777777777", "")]
    with SandboxThread(SandboxConfig(port=0, today=date(2025, 7, 24))) as a, SandboxThread(
        SandboxConfig(port=0, today=date(2025, 7, 30))
    ) as b:
        for item, spec in items:
            params = {"item_id": item, "spec_id": spec, "apiToken": TOKEN}
            da = httpx.get(a.api_url, params=params).json()["data"]
            db = httpx.get(b.api_url, params=params).json()["data"]
            assert da["sales_trend"][-1]["date"] == "2025-07-23" and db["sales_trend"][-1]["date"] == "2025-07-29"
            for key in ("sales_trend", "price_trend"):
                rows_a = {row["date"]: row for row in da[key]}
                rows_b = {row["date"]: row for row in db[key]}
                shared = rows_a.keys() & rows_b.keys()
                assert len(shared) >= 23
                assert all(rows_a[d] == rows_b[d] for d in shared)
            assert da["publish_time"] == db["publish_time"]


def test_synthetic_realism_across_items():
    end = date(2025, 7, 23)
    scales, zero_days, price_changes, spreads = [], 0, 0, 0
    for i in range(200):
        data = synthetic.history(100000000001 + 7919 * i, "", end)
        if data is None:
            continue
        check_history(data, end)
        scales.append(data["sales_quantity_30days"] / 30)
        zero_days += sum(row["sales_quantity"] == 0 for row in data["sales_trend"])
        price_changes += len({row["price_min"] for row in data["price_trend"]}) > 1
        spreads += any(row["price_min"] != row["price_max"] for row in data["price_trend"])
    assert min(scales) < 3 and max(scales) > 1000  # 0-3 a day ... thousands a day
    assert zero_days > 0 and price_changes > 5 and spreads > 5


def test_today_defaults_to_china_date():
    with SandboxThread(SandboxConfig(port=0)) as server:
        data = httpx.get(server.api_url, params={"item_id": 1234567890123, "apiToken": TOKEN}).json()["data"]
    china_today = (datetime.now(timezone.utc) + timedelta(hours=8)).date()
    assert data["sales_trend"][-1]["date"] == (china_today - timedelta(days=1)).isoformat()


def test_special_items(client):
    r = get(client, 1234560000)
    assert r.status_code == 200 and r.json() == {"code": 200, "msg": "success", "data": None}
    data = get(client, 1234560001).json()["data"]
    assert data["sales_quantity_30days"] == 0 and all(row["sales_quantity"] == 0 for row in data["sales_trend"])
    assert data["sales_quantity_total"] == "0" and len(data["price_trend"]) == 29
    r = get(client, 1234560422)
    assert r.status_code == 422 and r.json()["code"] == 422


# -- gateway, auth, parameters --------------------------------------------------------------------------------------


def test_auth(client):
    r = get(client, 1234567890123, token=None)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.json() == {"message": "No API key found in request"}
    r = get(client, 1234567890123, token="")
    assert r.status_code == 401 and r.json() == {"message": "No API key found in request"}
    r = get(client, 1234567890123, token="wrong-token")
    assert r.status_code == 401 and r.json() == {"message": "Invalid authentication credentials"}
    r = get(client, 1234567890123, token="sandbox-exhausted-token")
    assert r.status_code == 439
    assert r.json() == {"code": 439, "msg": "Subscription expired or insufficient balance", "data": None}
    r = client.get("/1688/item/statistics/sales", params={"item_id": 1234567890123}, headers={"apikey": TOKEN})
    assert r.status_code == 200 and r.json()["code"] == 200
    r = client.get("/1688/item/statistics/sales", params={"item_id": 1}, headers={"apikey": "nope"})
    assert r.status_code == 401


@pytest.mark.parametrize(
    "item,spec",
    [("abc", None), ("0", None), ("-5", None), ("012345", None), ("1" * 20, None), ("9223372036854775808", None),
     ("", None), ("1.5", None), ("123", "a/b"), ("123", "x" * 65), ("123", "spec id")],
)  # fmt: skip
def test_bad_parameters_give_422(client, item, spec):
    r = get(client, item, spec)
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == 422 and body["msg"].startswith("Parameter error") and body["data"] is None


def test_missing_item_id_gives_422(client):
    r = client.get("/1688/item/statistics/sales", params={"apiToken": TOKEN})
    assert r.status_code == 422


def test_unknown_route_gives_gateway_404(client):
    for path in ("/", "/1688/item/statistics", "/1688/item/statistics/sales/", "/v2/x?apiToken=sandbox-token"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        assert r.json() == {"message": "no Route matched with those values"}
    r = client.post("/1688/item/statistics/sales", params={"item_id": 1, "apiToken": TOKEN})
    assert r.status_code == 404


# -- latency, concurrency, faults -----------------------------------------------------------------------------------


async def _fire(url: str, n: int, params_of=lambda i: {"item_id": 1234567890123, "apiToken": TOKEN}) -> list:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=30) as c:
        return await asyncio.gather(*(c.get(url, params=params_of(i)) for i in range(n)))


def test_latency_is_non_blocking():
    with SandboxThread(SandboxConfig(port=0, today=TODAY, latency_ms=300, latency_jitter_ms=50)) as server:
        start = time.perf_counter()
        one = httpx.get(server.api_url, params={"item_id": 1, "apiToken": TOKEN})
        assert one.status_code == 200 and time.perf_counter() - start >= 0.245
        start = time.perf_counter()
        responses = asyncio.run(_fire(server.api_url, 60))
        elapsed = time.perf_counter() - start
        assert all(r.status_code == 200 for r in responses)
        assert elapsed < 2.0  # 60 concurrent x ~300 ms, served in parallel (serially it would take 18 s)
        assert server.stats()["peak_in_flight"] > 20


def test_concurrency_limit():
    with SandboxThread(SandboxConfig(port=0, today=TODAY, latency_ms=200, concurrency_limit=3)) as server:
        responses = asyncio.run(_fire(server.api_url, 20))
        codes = Counter(r.status_code for r in responses)
        assert codes[503] >= 1 and codes[200] >= 3 and codes[200] + codes[503] == 20
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.json() == {
            "code": 503,
            "msg": "API request concurrency limit exceeded, please reduce concurrency.",
            "data": None,
        }
        stats = server.stats()
        assert stats["peak_in_flight"] == 3
        assert stats["peak_in_flight_all"] > 3
        assert stats["in_flight"] == 0 and stats["requests_total"] == 20
        assert stats["by_status"] == {str(k): v for k, v in codes.items()}


def test_fault_rate_mix_and_determinism():
    with SandboxThread(SandboxConfig(port=0, today=TODAY, fault_rate=0.4, seed=7)) as server:
        with httpx.Client(timeout=10) as c:

            def run() -> list[int]:
                return [c.get(server.api_url, params={"item_id": 1234567890123, "apiToken": TOKEN}).status_code
                        for _ in range(150)]  # fmt: skip

            codes = run()
            counts = Counter(codes)
            assert set(counts) == {200, 417, 499, 500, 503}
            assert 0.25 <= 1 - counts[200] / 150 <= 0.55
            r = None
            for _ in range(50):
                r = c.get(server.api_url, params={"item_id": 1234567890123, "apiToken": TOKEN})
                if r.status_code == 499:
                    break
            assert r.json() == {"code": 499, "msg": "Please try again or set your request timeout to 60 seconds.",
                                "data": None}  # fmt: skip
            server.reset()  # re-seeds: same sequence again
            assert run() == codes
            # Errors that are not successes are not turned into faults.
            bad = [c.get(server.api_url, params={"item_id": "x", "apiToken": TOKEN}).status_code for _ in range(20)]
            assert set(bad) == {422}


# -- scripted responses, stats --------------------------------------------------------------------------------------


def test_scripted_responses_in_order_then_normal(sb, client):
    sb.script(
        4242,
        [
            {"status": 417, "body": {"code": 417, "msg": "Failed to retrieve data"}},
            {"status": 200, "body_text": "", "content_type": "text/html"},
            {"status": 502, "body_text": "<html><body><h1>502 Bad Gateway</h1></body></html>",
             "content_type": "text/html"},
            {"status": 200, "body": {"code": 439, "msg": "insufficient balance"}, "sleep_ms": 150},
        ],
    )  # fmt: skip
    sb.script(4242, [{"status": 500, "body": {"code": 500}}], spec_id="s1")
    r = get(client, 4242)
    assert r.status_code == 417 and r.json() == {"code": 417, "msg": "Failed to retrieve data"}
    r = get(client, 4242, "s1")  # the spec has its own queue
    assert r.status_code == 500
    r = get(client, 4242)
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"].startswith("text/html")
    r = get(client, 4242)
    assert r.status_code == 502 and b"502 Bad Gateway" in r.content
    start = time.perf_counter()
    r = get(client, 4242)
    assert time.perf_counter() - start >= 0.14
    assert r.status_code == 200 and r.json() == {"code": 439, "msg": "insufficient balance"}
    r = get(client, 4242)
    assert r.status_code == 200 and r.json()["code"] == 200 and r.json()["data"]["sales_trend"]
    assert sb.stats()["scripts_pending"] == {}


def test_script_wildcard_and_reset(sb, client):
    sb.script("*", [{"status": 503, "body": {"code": 503}}])
    assert get(client, 99).status_code == 503
    assert get(client, 99).status_code == 200
    sb.script(99, [{"status": 417, "body": {}}])
    sb.reset()
    assert get(client, 99).status_code == 200
    with pytest.raises(RuntimeError, match="400"):
        sb.script(99, [{"kind": "nonsense"}])


def test_script_stalls_and_disconnects(sb, client):
    sb.script(77, [{"kind": "stall_headers"}, {"kind": "disconnect"}, {"kind": "stall_body", "sleep_ms": 100,
                   "body_text": '{"code": 200'}, {"kind": "large_body", "size_bytes": 300_000}])  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        client.get("/1688/item/statistics/sales", params={"item_id": 77, "apiToken": TOKEN}, timeout=0.3)
    with pytest.raises(httpx.RemoteProtocolError):
        get(client, 77)
    with pytest.raises(httpx.RemoteProtocolError):
        get(client, 77)
    r = get(client, 77)
    assert r.status_code == 200 and len(r.content) == 300_000 and r.json()["code"] == 200
    time.sleep(0.1)
    stats = sb.stats()
    assert stats["in_flight"] == 0 and stats["unanswered"] == 2  # the stall (client gave up) and the disconnect
    sb.script(78, [{"kind": "stall_headers", "sleep_ms": 100}])
    r = get(client, 78)
    assert r.status_code == 504 and r.json() == {"message": "The upstream server is timing out"}


def test_stats_counts(sb, client):
    get(client, 1234567890123)
    get(client, 1234567890123, "abc")
    get(client, 1, token="bad")
    client.get("/nowhere")
    client.get("/_sandbox/stats")  # not counted
    stats = sb.stats()
    assert stats["requests_total"] == 4
    assert stats["by_status"] == {"200": 2, "401": 1, "404": 1}
    assert stats["by_item"] == {"1234567890123": 1, "1234567890123:abc": 1, "1": 1}
    assert stats["in_flight"] == 0 and stats["peak_in_flight"] == 1


# -- secrets, process, CLI -------------------------------------------------------------------------------------------


def test_token_never_logged(caplog, capfd):
    secret = "tok-SECRET-5f3a9"
    caplog.set_level(logging.DEBUG)
    with SandboxThread(SandboxConfig(port=0, today=TODAY, token=secret, log_level="debug", fault_rate=0.3)) as s:
        s.script(5, [{"kind": "disconnect"}, {"kind": "stall_body", "sleep_ms": 50, "body_text": "{"},
                     {"status": 500, "body_text": "boom"}])  # fmt: skip
        with httpx.Client(timeout=5) as c:
            for item in (5, 5, 5, 5, 1234567890123, "bad", 1230000):
                try:
                    c.get(s.api_url, params={"item_id": item, "apiToken": secret})
                except httpx.HTTPError:
                    pass
            c.get(s.api_url, params={"item_id": 1}, headers={"apikey": secret})
            c.get(s.base_url + "/x", params={"apiToken": secret})
    out, err = capfd.readouterr()
    # The client side (httpx/httpcore) logs request URLs itself; everything else here is the server's.
    server_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.name.startswith("uvicorn") for r in server_records)  # the server did log (debug level)
    assert all(secret not in r.getMessage() and secret not in str(r.args) for r in server_records)
    assert secret not in out and secret not in err


def test_subprocess_sandbox(tmp_path):
    secret = "proc-secret-token-9d1"
    err_file = (tmp_path / "stderr.txt").open("w+")
    start = time.perf_counter()
    with SandboxProcess(SandboxConfig(port=0, today=TODAY, token=secret), stderr=err_file) as proc:
        startup = time.perf_counter() - start
        r = httpx.get(proc.api_url, params={"item_id": 652702302959, "apiToken": secret})
        assert r.status_code == 200 and r.content == FIXTURE.read_bytes()
        proc.script(5, [{"status": 417, "body": {"code": 417}}])
        assert httpx.get(proc.api_url, params={"item_id": 5, "apiToken": secret}).status_code == 417
        assert proc.stats()["by_status"] == {"200": 1, "417": 1}
        cmdline = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()
        assert secret.encode() not in cmdline  # the token goes through the environment
    assert proc.returncode == 0
    assert startup < 5.0, startup  # typically ~0.3 s
    err_file.seek(0)
    assert secret not in err_file.read()


def test_cli_options():
    args = build_parser().parse_args(
        ["--host", "0.0.0.0", "--port", "9000", "--latency-ms", "500", "--latency-jitter-ms", "100",
         "--concurrency-limit", "5", "--fault-rate", "0.1", "--seed", "3", "--token", "t",
         "--exhausted-token", "e", "--today", "2025-07-24"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg == SandboxConfig(host="0.0.0.0", port=9000, latency_ms=500, latency_jitter_ms=100,
                                concurrency_limit=5, fault_rate=0.1, seed=3, token="t", exhausted_token="e",
                                today=date(2025, 7, 24))  # fmt: skip
    with pytest.raises(ValueError):
        SandboxConfig(fault_rate=1.5)
    assert json.loads(FIXTURE.read_text(encoding="utf-8"))["data"]["sales_quantity_30days"] == 3985
