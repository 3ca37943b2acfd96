"""Tests of tmapi_assets.client: every documented/seen API answer, retries, halts, limits, redaction, real sockets."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import random
import socket
import socketserver
import struct
import threading
import time
from typing import Any, Callable

import httpx
import pytest
from conftest import load_field_cases

from tmapi_assets.client import (
    OVERSIZED_PREFIX_BYTES,
    AdaptiveLimiter,
    AsyncTmapiClient,
    Attempt,
    ClientSettings,
    FetchResult,
    HaltSignal,
    TmapiClient,
)
from tmapi_assets.errors import ApiError, InvalidInputError, Outcome, RunHaltedError
from tmapi_assets.ids import WatchedItem

TOKEN = "tok-SECRET-123"
BASE = "http://tmapi.test"
ITEM = WatchedItem(652702302959)
ITEMS = [WatchedItem(100000000001 + i) for i in range(5)]

SUCCESS_BODY = {
    "code": 200,
    "msg": "success",
    "data": {
        "publish_time": "2024-06-27 09:22:26",
        "sales_quantity_30days": 3985,
        "sales_quantity_total": "1.5万+",
        "order_quantity_total": "3500+",
        "sales_trend": [{"date": "2025-06-24", "sales_quantity": 136, "order_quantity": 12}],
        "price_trend": [{"date": "2025-06-24", "price_min": "11.0", "price_max": "11.0"}],
    },
}

# ------------------------------------------------------------------------------------------------ helpers

CASES, CASES_MISSING = load_field_cases("responses.json")


def settings(**overrides: Any) -> ClientSettings:
    values: dict[str, Any] = dict(
        base_url=BASE,
        api_token=TOKEN,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        max_attempts=3,
        timeout_s=5.0,
        connect_timeout_s=5.0,
        concurrency=4,
    )
    values.update(overrides)
    return ClientSettings(**values)


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(
        status,
        headers={"content-type": "application/json", **(headers or {})},
        content=json.dumps(body, ensure_ascii=False).encode("utf-8"),
    )


def case_response(case: dict) -> httpx.Response:
    if "body" in case:
        content = json.dumps(case["body"], ensure_ascii=False).encode("utf-8")
    else:
        content = case.get("body_text", "").encode("utf-8")
    return httpx.Response(case["status"], headers={"content-type": case["content_type"]}, content=content)


class Recorder:
    """A transport handler that counts calls, keeps the requests, and answers from a script."""

    def __init__(self, answer: Callable[[httpx.Request, int], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request, len(self.requests))

    @property
    def calls(self) -> int:
        return len(self.requests)

    def calls_for(self, item: WatchedItem) -> int:
        return sum(1 for r in self.requests if r.url.params.get("item_id") == str(item.item_id))


def run_fetch(
    mode: str,
    cfg: ClientSettings,
    handler: Callable,
    items: list[WatchedItem],
    *,
    halt: HaltSignal | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
    rng: random.Random | None = None,
) -> tuple[list[FetchResult], list[float], Any]:
    """Fetch items through the sync client (one by one) or the async one (fetch_many); returns results, sleeps."""
    sleeps: list[float] = []
    if mode == "sync":
        with TmapiClient(cfg, transport=httpx.MockTransport(handler), halt=halt, on_attempt=on_attempt,
                         sleep=sleeps.append, rng=rng) as client:
            return [client.fetch(item) for item in items], sleeps, client

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)
        await asyncio.sleep(0)

    async def main() -> tuple[list[FetchResult], AsyncTmapiClient]:
        async with AsyncTmapiClient(cfg, transport=httpx.MockTransport(handler), halt=halt, on_attempt=on_attempt,
                                    sleep=fake_sleep, rng=rng) as client:
            return await client.fetch_many(items), client

    results, client = asyncio.run(main())
    return results, sleeps, client


MODES = ["sync", "async"]

# ------------------------------------------------------------------------------------------------ every case

# What each case of responses.json must give. A case added to the file without an entry here fails
# test_every_case_has_an_expectation: decide what it means, then add it.
EXPECT: dict[str, dict[str, Any]] = {
    "success": dict(outcome=Outcome.SUCCESS, retried=False, halt=False, texts=()),
    "no-data": dict(outcome=Outcome.NO_DATA, retried=False, halt=False, texts=()),
    "417": dict(outcome=Outcome.TRANSIENT, retried=True, halt=False,
                texts=("HTTP 417", "code 417", "Failed to retrieve data", "try again later")),
    "499": dict(outcome=Outcome.TRANSIENT, retried=True, halt=False,
                texts=("HTTP 499", "timeout", "try again later")),
    "503": dict(outcome=Outcome.TRANSIENT, retried=True, halt=False,
                texts=("HTTP 503", "concurrency limit exceeded", "try again later")),
    "500": dict(outcome=Outcome.TRANSIENT, retried=True, halt=False,
                texts=("HTTP 500", "Unexpected error", "try again later")),
    "422": dict(outcome=Outcome.ITEM_ERROR, retried=False, halt=False,
                texts=("HTTP 422", "code 422", "Parameter error", "not retried")),
    "439": dict(outcome=Outcome.QUOTA, retried=False, halt=True,
                texts=("HTTP 439", "code 439", "Subscription expired or insufficient balance",
                       "top up the TMAPI balance", "tmapi-assets resume")),
    "439-in-200": dict(outcome=Outcome.QUOTA, retried=False, halt=True,
                       texts=("HTTP 200", "code 439", "insufficient balance", "top up the TMAPI balance",
                              "tmapi-assets resume")),
    "gateway-no-key": dict(outcome=Outcome.AUTH, retried=False, halt=True,
                           texts=("HTTP 401", "No API key found in request", "TMAPI_API_TOKEN")),
    "gateway-no-route": dict(outcome=Outcome.CONFIG, retried=False, halt=True,
                             texts=("HTTP 404", "no Route matched with those values", "TMAPI_BASE_URL")),
    "html-502": dict(outcome=Outcome.TRANSIENT, retried=True, halt=False,
                     texts=("HTTP 502", "<html><body><h1>502 Bad Gateway</h1></body></html>", "try again later")),
    "empty-200": dict(outcome=Outcome.MALFORMED, retried=True, halt=False,
                      texts=("HTTP 200", "empty body", "not taken as 'no sales'", "try again later")),
}


def test_every_case_has_an_expectation() -> None:
    if CASES_MISSING:
        pytest.skip(CASES_MISSING)
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names in responses.json"
    missing = [n for n in names if n not in EXPECT]
    assert not missing, f"cases in responses.json with no expectation in test_client.EXPECT: {missing}"


@pytest.mark.skipif(bool(CASES_MISSING), reason=CASES_MISSING or "")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict, mode: str) -> None:
    expect = EXPECT[case["name"]]
    # concurrency 1: the second item's call cannot be in flight with the first's (it may run during a backoff).
    cfg = settings(max_attempts=3, concurrency=1)
    recorder = Recorder(lambda request, n: case_response(case))
    seen: list[Attempt] = []
    halt = HaltSignal()
    first, second = ITEMS[0], ITEMS[1]

    results, sleeps, _ = run_fetch(mode, cfg, recorder, [first, second], halt=halt, on_attempt=seen.append)
    result = results[0]

    # Outcome, retries, halt.
    assert result.outcome == expect["outcome"], result
    calls = cfg.max_attempts if expect["retried"] else 1
    assert recorder.calls_for(first) == calls
    assert [a.attempt for a in result.attempts] == list(range(1, calls + 1))
    assert len(sleeps) >= (calls - 1)
    assert halt.is_set is expect["halt"]
    if expect["halt"]:
        # Stops further calls at once: the next item is not called at all.
        assert recorder.calls == 1
        assert results[1].outcome == "halted" and results[1].attempts == []
        assert isinstance(results[1].error, RunHaltedError)
        assert isinstance(result.error, RunHaltedError)
        assert halt.error is not None and halt.error.outcome is expect["outcome"]
    else:
        # Other items go on (and get the same answer here).
        assert results[1].outcome == expect["outcome"]
        assert recorder.calls_for(second) == calls

    # Every attempt was handed to on_attempt, in order, and is stored verbatim.
    assert [a for a in seen if a.item == first] == result.attempts
    raw = case_response(case).content
    for attempt in result.attempts:
        assert attempt.item == first
        assert attempt.http_status == case["status"]
        assert attempt.body == raw
        assert attempt.outcome == expect["outcome"]
        assert attempt.fetched_at.tzinfo is not None and attempt.fetched_at.utcoffset().total_seconds() == 0
        assert attempt.elapsed_ms >= 0
        assert "apiToken=***" in attempt.request_url and TOKEN not in attempt.request_url
        body = case.get("body")
        expected_code = body.get("code") if isinstance(body, dict) else None
        assert attempt.api_code == expected_code

    # Payload and error.
    if expect["outcome"] in (Outcome.SUCCESS, Outcome.NO_DATA):
        assert result.ok and result.error is None
        assert result.payload == case["body"]
        if expect["outcome"] is Outcome.NO_DATA:
            assert result.payload["data"] is None
    else:
        assert not result.ok and result.payload is None
        assert isinstance(result.error, ApiError)
        text = str(result.error)
        assert str(first) in text
        for fragment in expect["texts"]:
            assert fragment.lower() in text.lower(), f"{fragment!r} not in {text!r}"
        assert TOKEN not in text
        assert result.error.outcome is expect["outcome"]
        assert result.error.item == str(first)
        assert result.error.http_status == case["status"]


# ------------------------------------------------------------------------------------------------ bodies


@pytest.mark.parametrize("mode", MODES)
def test_code_as_string_200(mode: str) -> None:
    body = {**SUCCESS_BODY, "code": "200"}
    results, _, _ = run_fetch(mode, settings(), Recorder(lambda r, n: json_response(body)), [ITEM])
    assert results[0].outcome is Outcome.SUCCESS
    assert results[0].attempts[0].api_code == 200
    assert results[0].payload["data"]["sales_quantity_total"] == "1.5万+"


@pytest.mark.parametrize("mode", MODES)
def test_code_as_string_439_halts(mode: str) -> None:
    recorder = Recorder(lambda r, n: json_response({"code": "439", "msg": "余额不足"}))
    halt = HaltSignal()
    results, _, _ = run_fetch(mode, settings(concurrency=1), recorder, ITEMS[:3], halt=halt)
    assert results[0].outcome is Outcome.QUOTA and results[0].attempts[0].api_code == 439
    assert "余额不足" in str(results[0].error)
    assert [r.outcome for r in results[1:]] == ["halted", "halted"]
    assert recorder.calls == 1 and halt.is_set


@pytest.mark.parametrize("mode", MODES)
def test_utf8_bom_is_stripped_and_body_kept_verbatim(mode: str) -> None:
    raw = b"\xef\xbb\xbf" + json.dumps(SUCCESS_BODY, ensure_ascii=False).encode("utf-8")
    results, _, _ = run_fetch(mode, settings(), Recorder(lambda r, n: httpx.Response(200, content=raw)), [ITEM])
    assert results[0].outcome is Outcome.SUCCESS
    assert results[0].attempts[0].body == raw
    assert results[0].payload["data"]["sales_quantity_total"] == "1.5万+"


@pytest.mark.parametrize("mode", MODES)
def test_utf8_without_charset_is_not_read_as_latin1(mode: str) -> None:
    raw = json.dumps(SUCCESS_BODY, ensure_ascii=False).encode("utf-8")
    answer = lambda r, n: httpx.Response(200, headers={"content-type": "text/plain"}, content=raw)  # noqa: E731
    results, _, _ = run_fetch(mode, settings(), Recorder(answer), [ITEM])
    assert results[0].payload["data"]["sales_quantity_total"] == "1.5万+"  # not "1.5ä¸‡+"


@pytest.mark.parametrize("mode", MODES)
def test_invalid_utf8_on_200_is_malformed_and_retried(mode: str) -> None:
    raw = b'{"code": 200, "msg": "\xff\xfe", "data": null}'
    recorder = Recorder(lambda r, n: httpx.Response(200, content=raw))
    results, _, _ = run_fetch(mode, settings(max_attempts=2), recorder, [ITEM])
    result = results[0]
    assert result.outcome is Outcome.MALFORMED and recorder.calls == 2
    assert result.attempts[0].body == raw
    assert "not valid UTF-8" in str(result.error)
    assert not result.ok and result.payload is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "body, problem",
    [
        ({"code": 200, "msg": "success", "data": []}, "array"),
        ({"code": 200, "msg": "success", "data": "null"}, "string"),
        ({"code": 200, "msg": "success", "data": 0}, "number"),
        ({"code": 200, "msg": "success"}, "no `data`"),
        ([{"code": 200}], "array"),
        ("success", "string"),
    ],
    ids=["data-list", "data-string", "data-number", "data-missing", "body-list", "body-string"],
)
def test_wrong_shape_is_malformed(mode: str, body: Any, problem: str) -> None:
    recorder = Recorder(lambda r, n: json_response(body))
    results, _, _ = run_fetch(mode, settings(max_attempts=2), recorder, [ITEM])
    assert results[0].outcome is Outcome.MALFORMED and recorder.calls == 2
    assert problem in str(results[0].error)
    assert results[0].payload is None


@pytest.mark.parametrize("mode", MODES)
def test_non_json_200_is_malformed(mode: str) -> None:
    recorder = Recorder(lambda r, n: httpx.Response(200, content=b"<html>maintenance</html>"))
    results, _, _ = run_fetch(mode, settings(max_attempts=2), recorder, [ITEM])
    assert results[0].outcome is Outcome.MALFORMED
    assert "<html>maintenance</html>" in str(results[0].error)


@pytest.mark.parametrize("mode", MODES)
def test_gzip_body_is_decompressed(mode: str) -> None:
    raw = json.dumps(SUCCESS_BODY, ensure_ascii=False).encode("utf-8")
    def answer(request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response(200, headers={"content-encoding": "gzip"}, content=gzip.compress(raw))

    results, _, _ = run_fetch(mode, settings(), Recorder(answer), [ITEM])
    assert results[0].outcome is Outcome.SUCCESS
    assert results[0].attempts[0].body == raw


@pytest.mark.parametrize("mode", MODES)
def test_broken_gzip_is_malformed(mode: str) -> None:
    answer = lambda r, n: httpx.Response(  # noqa: E731
        200, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip at all")
    )
    recorder = Recorder(answer)
    results, _, _ = run_fetch(mode, settings(max_attempts=2), recorder, [ITEM])
    assert results[0].outcome is Outcome.MALFORMED and recorder.calls == 2


class ChunkStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body of `total` bytes produced lazily in `chunk` byte pieces; counts what was produced."""

    def __init__(self, total: int, chunk: int) -> None:
        self.total, self.chunk, self.produced = total, chunk, 0

    def _next(self) -> bytes | None:
        if self.produced >= self.total:
            return None
        size = min(self.chunk, self.total - self.produced)
        self.produced += size
        return b"x" * size

    def __iter__(self):
        while (piece := self._next()) is not None:
            yield piece

    async def __aiter__(self):
        while (piece := self._next()) is not None:
            yield piece


@pytest.mark.parametrize("mode", MODES)
def test_oversized_body_is_refused_with_bounded_memory(mode: str) -> None:
    cap, chunk, total = 1024 * 1024, 64 * 1024, 20 * 1024 * 1024
    streams: list[ChunkStream] = []

    def answer(request: httpx.Request, n: int) -> httpx.Response:
        streams.append(ChunkStream(total, chunk))
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=streams[-1])

    recorder = Recorder(answer)
    results, _, _ = run_fetch(mode, settings(max_body_bytes=cap), recorder, [ITEM])
    result = results[0]
    assert result.outcome is Outcome.OVERSIZED
    assert recorder.calls == 1  # never retried
    body = result.attempts[0].body
    assert len(body) == OVERSIZED_PREFIX_BYTES  # only a prefix is kept, to show what the answer was
    assert streams[0].produced <= cap + 2 * chunk  # stopped reading: the other 19 MB were never produced
    assert "max_body_bytes" in str(result.error) and not result.ok


@pytest.mark.parametrize("mode", MODES)
def test_body_exactly_at_cap_is_read(mode: str) -> None:
    raw = json.dumps(SUCCESS_BODY).encode()
    results, _, _ = run_fetch(mode, settings(max_body_bytes=len(raw)),
                              Recorder(lambda r, n: httpx.Response(200, content=raw)), [ITEM])
    assert results[0].outcome is Outcome.SUCCESS


class TrickleStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that arrives one byte every `pause` seconds: never trips a per-read timeout."""

    def __init__(self, pieces: int, pause: float) -> None:
        self.pieces, self.pause, self.produced = pieces, pause, 0

    def __iter__(self):
        for _ in range(self.pieces):
            time.sleep(self.pause)
            self.produced += 1
            yield b" "

    async def __aiter__(self):
        for _ in range(self.pieces):
            await asyncio.sleep(self.pause)
            self.produced += 1
            yield b" "


@pytest.mark.parametrize("mode", MODES)
def test_trickling_body_hits_the_whole_answer_deadline(mode: str) -> None:
    streams: list[TrickleStream] = []

    def answer(request: httpx.Request, n: int) -> httpx.Response:
        streams.append(TrickleStream(pieces=100, pause=0.02))
        return httpx.Response(200, stream=streams[-1])

    recorder = Recorder(answer)
    cfg = settings(timeout_s=0.15, connect_timeout_s=0.05, max_attempts=2)  # deadline 0.2 s, trickle lasts 2 s
    started = time.monotonic()
    results, _, _ = run_fetch(mode, cfg, recorder, [ITEM])
    assert time.monotonic() - started < 1.5
    result = results[0]
    assert result.outcome is Outcome.NETWORK and recorder.calls == 2
    assert "not complete after" in result.attempts[0].message
    assert all(s.produced < 100 for s in streams)


# ------------------------------------------------------------------------------------------------ network, retries


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout,
                                      httpx.RemoteProtocolError, httpx.ReadError])
def test_network_errors_are_retried(mode: str, exc_type: type[Exception]) -> None:
    def answer(request: httpx.Request, n: int) -> httpx.Response:
        raise exc_type("boom", request=request)

    recorder = Recorder(answer)
    results, sleeps, _ = run_fetch(mode, settings(max_attempts=3), recorder, [ITEM])
    result = results[0]
    assert result.outcome is Outcome.NETWORK and recorder.calls == 3 and len(sleeps) == 2
    assert all(a.http_status is None and a.body == b"" for a in result.attempts)
    assert result.attempts[0].message == f"{exc_type.__name__}: boom"
    assert "after 3 attempts" in str(result.error) and "try again later" in str(result.error)


@pytest.mark.parametrize("mode", MODES)
def test_recovers_after_transient_errors(mode: str) -> None:
    def answer(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            raise httpx.ConnectError("refused", request=request)
        if n == 2:
            return json_response({"code": 500, "msg": "Unexpected error"}, status=500)
        return json_response(SUCCESS_BODY)

    recorder = Recorder(answer)
    results, _, _ = run_fetch(mode, settings(max_attempts=4), recorder, [ITEM])
    result = results[0]
    assert result.outcome is Outcome.SUCCESS and result.ok and result.error is None
    assert [a.outcome for a in result.attempts] == [Outcome.NETWORK, Outcome.TRANSIENT, Outcome.SUCCESS]
    assert result.payload == SUCCESS_BODY


@pytest.mark.parametrize("mode", MODES)
def test_retry_after_is_honoured_and_capped(mode: str) -> None:
    def answer(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            return json_response({"code": 503, "msg": "busy"}, status=503, headers={"retry-after": "7"})
        if n == 2:
            return json_response({"code": 503, "msg": "busy"}, status=503, headers={"retry-after": "100"})
        return json_response(SUCCESS_BODY)

    results, sleeps, _ = run_fetch(mode, settings(max_attempts=3, backoff_max_s=20.0, backoff_base_s=0.001),
                                   Recorder(answer), [ITEM])
    assert results[0].outcome is Outcome.SUCCESS
    assert sleeps == [7.0, 20.0]


class UpperBound(random.Random):
    def uniform(self, a: float, b: float) -> float:  # always the largest delay full jitter may pick
        return b


@pytest.mark.parametrize("mode", MODES)
def test_backoff_grows_exponentially_and_is_capped(mode: str) -> None:
    recorder = Recorder(lambda r, n: json_response({"code": 500, "msg": "x"}, status=500))
    cfg = settings(max_attempts=6, backoff_base_s=1.0, backoff_max_s=8.0)
    results, sleeps, _ = run_fetch(mode, cfg, recorder, [ITEM], rng=UpperBound())
    assert recorder.calls == 6
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 8.0]  # no sleep after the last attempt


def test_backoff_is_jittered_within_bounds() -> None:
    cfg = settings(max_attempts=5, backoff_base_s=1.0, backoff_max_s=6.0)
    delays: dict[int, list[float]] = {i: [] for i in range(4)}
    for seed in range(40):
        results, sleeps, _ = run_fetch("sync", cfg, Recorder(lambda r, n: httpx.Response(502)), [ITEM],
                                       rng=random.Random(seed))
        assert len(sleeps) == 4
        for i, delay in enumerate(sleeps):
            delays[i].append(delay)
    for i, values in delays.items():
        bound = min(6.0, 2.0**i)
        assert all(0.0 <= v <= bound for v in values)
        assert len(set(values)) > 30  # jittered, not a fixed schedule
        assert max(values) > bound * 0.7  # and spread over the window
    assert sum(delays[3]) > sum(delays[0])  # growing on average


# ------------------------------------------------------------------------------------------------ halt


def test_async_no_call_after_the_439_completes() -> None:
    events: list[tuple] = []
    first = ITEMS[0]

    async def handler(request: httpx.Request) -> httpx.Response:
        item_id = int(request.url.params["item_id"])
        events.append(("start", item_id))
        if item_id == first.item_id:
            await asyncio.sleep(0.02)
            events.append(("end", item_id))
            return json_response({"code": 439, "msg": "Subscription expired or insufficient balance"}, status=439)
        await asyncio.sleep(0.1)
        events.append(("end", item_id))
        return json_response(SUCCESS_BODY)

    halt = HaltSignal()

    async def main() -> list[FetchResult]:
        async with AsyncTmapiClient(settings(concurrency=2), transport=httpx.MockTransport(handler), halt=halt,
                                    on_attempt=lambda a: events.append(("attempt", a.item.item_id, a.outcome))) as c:
            return await c.fetch_many(ITEMS)

    results = asyncio.run(main())
    quota_done = events.index(("attempt", first.item_id, Outcome.QUOTA))
    assert not [e for e in events[quota_done:] if e[0] == "start"], events
    assert [e for e in events if e[0] == "start"] == [("start", ITEMS[0].item_id), ("start", ITEMS[1].item_id)]
    assert results[0].outcome is Outcome.QUOTA
    assert results[1].outcome is Outcome.SUCCESS  # was in flight: finished
    for r in results[2:]:
        assert r.outcome == "halted" and r.attempts == [] and r.halted and not r.ok
        assert isinstance(r.error, RunHaltedError) and r.error.outcome is Outcome.QUOTA
        assert "top up the tmapi balance" in str(r.error).lower() and str(r.item) in str(r.error)
    assert halt.error is results[0].error


def test_sync_no_call_after_the_439() -> None:
    recorder = Recorder(lambda r, n: json_response({"code": 439, "msg": "insufficient balance"}, status=439))
    results, _, _ = run_fetch("sync", settings(), recorder, ITEMS)
    assert recorder.calls == 1
    assert [r.outcome for r in results] == [Outcome.QUOTA] + ["halted"] * 4


@pytest.mark.parametrize("mode", MODES)
def test_halt_during_backoff_returns_halted_without_calling(mode: str) -> None:
    halt = HaltSignal()
    recorder = Recorder(lambda r, n: json_response({"code": 503, "msg": "busy"}, status=503))
    cause = RunHaltedError("quota gone elsewhere", outcome=Outcome.QUOTA)

    def set_halt(delay: float) -> None:
        halt.set(cause)

    async def aset_halt(delay: float) -> None:
        halt.set(cause)

    if mode == "sync":
        with TmapiClient(settings(), transport=httpx.MockTransport(recorder), halt=halt, sleep=set_halt) as c:
            result = c.fetch(ITEM)
    else:
        async def main() -> FetchResult:
            async with AsyncTmapiClient(settings(), transport=httpx.MockTransport(recorder), halt=halt,
                                        sleep=aset_halt) as c:
                return await c.fetch(ITEM)
        result = asyncio.run(main())
    assert recorder.calls == 1
    assert result.outcome == "halted" and len(result.attempts) == 1
    assert result.attempts[0].outcome is Outcome.TRANSIENT
    assert "quota gone elsewhere" in str(result.error) and "after 1 attempt" in str(result.error)


@pytest.mark.parametrize("mode", MODES)
def test_default_sleep_wakes_up_on_halt(mode: str) -> None:
    halt = HaltSignal()
    recorder = Recorder(lambda r, n: json_response({"code": 503, "msg": "busy"}, status=503,
                                                   headers={"retry-after": "10"}))
    cfg = settings(backoff_max_s=10.0)
    timer = threading.Timer(0.2, lambda: halt.set(RunHaltedError("stop", outcome=Outcome.AUTH)))
    timer.start()
    started = time.monotonic()
    try:
        if mode == "sync":
            with TmapiClient(cfg, transport=httpx.MockTransport(recorder), halt=halt) as c:
                result = c.fetch(ITEM)
        else:
            async def main() -> FetchResult:
                async with AsyncTmapiClient(cfg, transport=httpx.MockTransport(recorder), halt=halt) as c:
                    return await c.fetch(ITEM)
            result = asyncio.run(main())
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5
    assert result.outcome == "halted" and recorder.calls == 1


@pytest.mark.parametrize("mode", MODES)
def test_two_clients_share_one_halt(mode: str) -> None:
    halt = HaltSignal()
    first = Recorder(lambda r, n: json_response({"message": "No API key found in request"}, status=401))
    second = Recorder(lambda r, n: json_response(SUCCESS_BODY))
    r1, _, _ = run_fetch(mode, settings(), first, [ITEMS[0]], halt=halt)
    r2, _, _ = run_fetch(mode, settings(), second, ITEMS[1:3], halt=halt)
    assert r1[0].outcome is Outcome.AUTH and halt.is_set
    assert second.calls == 0
    assert [r.outcome for r in r2] == ["halted", "halted"]
    assert all("TMAPI_API_TOKEN" in str(r.error) for r in r2)


def test_threads_sharing_a_halt_stop_calling() -> None:
    halt = HaltSignal()
    lock = threading.Lock()
    calls_after_halt = []

    def answer(request: httpx.Request, n: int) -> httpx.Response:
        with lock:
            if halt.is_set:
                calls_after_halt.append(request.url.params["item_id"])
        if request.url.params["item_id"] == str(ITEMS[0].item_id):
            return json_response({"code": 439, "msg": "balance"}, status=439)
        time.sleep(0.01)
        return json_response(SUCCESS_BODY)

    recorder = Recorder(answer)
    items = [WatchedItem(200000000000 + i) for i in range(40)]
    with TmapiClient(settings(), transport=httpx.MockTransport(recorder), halt=halt) as client:
        first = client.fetch(ITEMS[0])
        threads = [threading.Thread(target=client.fetch, args=(it,)) for it in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert first.outcome is Outcome.QUOTA
    assert recorder.calls == 1 and calls_after_halt == []


# ------------------------------------------------------------------------------------------------ concurrency


def test_fetch_many_keeps_input_order() -> None:
    items = [WatchedItem(300000000000 + i) for i in range(12)]

    async def handler(request: httpx.Request) -> httpx.Response:
        i = int(request.url.params["item_id"]) - 300000000000
        await asyncio.sleep(0.002 * (12 - i))  # later items answer first
        body = {**SUCCESS_BODY, "data": {**SUCCESS_BODY["data"], "sales_quantity_30days": i}}
        return json_response(body)

    async def main() -> list[FetchResult]:
        async with AsyncTmapiClient(settings(concurrency=6), transport=httpx.MockTransport(handler)) as c:
            return await c.fetch_many(items)

    results = asyncio.run(main())
    assert [r.item for r in results] == items
    assert [r.payload["data"]["sales_quantity_30days"] for r in results] == list(range(12))


def test_in_flight_never_exceeds_concurrency() -> None:
    state = {"now": 0, "peak": 0}
    rng = random.Random(1)

    async def handler(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        try:
            await asyncio.sleep(rng.uniform(0, 0.005))
        finally:
            state["now"] -= 1
        if rng.random() < 0.3:
            return json_response({"code": 500, "msg": "x"}, status=500)
        return json_response(SUCCESS_BODY)

    async def main() -> tuple[list[FetchResult], AdaptiveLimiter]:
        async with AsyncTmapiClient(settings(concurrency=3, max_attempts=4),
                                    transport=httpx.MockTransport(handler)) as c:
            return await c.fetch_many([WatchedItem(400000000000 + i) for i in range(40)]), c.limiter

    results, limiter = asyncio.run(main())
    assert state["peak"] == 3 and limiter.peak_in_flight == 3
    assert len(results) == 40


def test_client_halves_concurrency_once_on_a_503_burst_and_climbs_back() -> None:
    state = {"calls": 0, "now": 0, "peak": 0}
    limits: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        state["calls"] += 1
        n = state["calls"]
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        if n <= 4:
            return json_response({"code": 503, "msg": "concurrency limit exceeded"}, status=503)
        return json_response(SUCCESS_BODY)

    async def fake_sleep(delay: float) -> None:
        await asyncio.sleep(0)

    async def main() -> tuple[list[FetchResult], AdaptiveLimiter]:
        async with AsyncTmapiClient(settings(concurrency=4), transport=httpx.MockTransport(handler),
                                    sleep=fake_sleep) as c:
            c._core.on_attempt = lambda a: limits.append(c.limiter.current)
            return await c.fetch_many([WatchedItem(500000000000 + i) for i in range(16)]), c.limiter

    results, limiter = asyncio.run(main())
    assert all(r.ok for r in results)
    assert limiter.decreases == 1  # four 503s from calls in flight together: halved once, 4 -> 2
    assert min(limits) == 2.0
    assert limiter.current == 4.0  # probed back up to the maximum
    assert state["peak"] <= 4 and limiter.peak_in_flight <= 4


def test_limiter_aimd() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(8)
        assert limiter.current == 8 and limiter.limit == 8
        gens = [await limiter.acquire() for _ in range(8)]
        assert limiter.in_flight == 8 and limiter.peak_in_flight == 8
        # A burst of 503s from calls already in flight: one decrease.
        cut = [limiter.on_overload(g) for g in gens]
        assert cut == [True] + [False] * 7
        assert limiter.current == 4 and limiter.decreases == 1
        for _ in range(8):
            limiter.release()
        # A call started after the decrease that gets a 503 halves again, down to 1 at least.
        g = await limiter.acquire()
        assert limiter.on_overload(g) and limiter.current == 2
        limiter.release()
        for _ in range(5):
            g = await limiter.acquire()
            limiter.on_overload(g)
            limiter.release()
        assert limiter.current == 1 and limiter.limit == 1
        # Additive increase: about +1 per `current` successes, never above the maximum.
        for _ in range(200):
            limiter.on_success()
            assert limiter.current <= 8
        assert limiter.current == 8

    asyncio.run(main())


def test_limiter_blocks_above_a_lowered_limit_and_survives_cancellation() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(4)
        gens = [await limiter.acquire() for _ in range(4)]
        limiter.on_overload(gens[0])  # limit 2, 4 in flight
        got: list[int] = []

        async def taker(i: int) -> None:
            async with limiter:
                got.append(i)
                await asyncio.sleep(0.01)

        waiting = [asyncio.create_task(taker(i)) for i in range(3)]
        cancelled = asyncio.create_task(taker(99))
        await asyncio.sleep(0.01)
        assert got == []
        limiter.release()  # 3 in flight: still above 2
        await asyncio.sleep(0)
        assert got == []
        cancelled.cancel()
        limiter.release()  # 2 in flight: still not below the limit
        await asyncio.sleep(0)
        assert got == []
        limiter.release()  # 1 in flight: one may go
        await asyncio.sleep(0)
        assert got == [0]
        limiter.release()
        await asyncio.gather(*waiting)
        await asyncio.gather(cancelled, return_exceptions=True)
        assert sorted(got) == [0, 1, 2]
        assert limiter.in_flight == 0 and limiter.peak_in_flight == 4

    asyncio.run(main())


# ------------------------------------------------------------------------------------------------ auth, redaction


@pytest.mark.parametrize("mode", MODES)
def test_query_auth_mode(mode: str) -> None:
    recorder = Recorder(lambda r, n: json_response(SUCCESS_BODY))
    run_fetch(mode, settings(auth_mode="query"), recorder, [WatchedItem(652702302959, "abc123")])
    request = recorder.requests[0]
    assert request.url.path == "/1688/item/statistics/sales"
    assert dict(request.url.params) == {"item_id": "652702302959", "spec_id": "abc123", "apiToken": TOKEN}
    assert "apikey" not in request.headers


@pytest.mark.parametrize("mode", MODES)
def test_header_auth_mode(mode: str) -> None:
    recorder = Recorder(lambda r, n: json_response(SUCCESS_BODY))
    results, _, _ = run_fetch(mode, settings(auth_mode="header"), recorder, [ITEM])
    request = recorder.requests[0]
    assert request.headers["apikey"] == TOKEN
    assert dict(request.url.params) == {"item_id": str(ITEM.item_id)}
    assert TOKEN not in str(request.url)
    assert results[0].attempts[0].request_url == f"{BASE}/1688/item/statistics/sales?item_id={ITEM.item_id}"


def test_empty_token_sends_no_credentials_and_says_so() -> None:
    recorder = Recorder(lambda r, n: json_response({"message": "No API key found in request"}, status=401))
    results, _, _ = run_fetch("sync", settings(api_token=""), recorder, [ITEM])
    assert "apiToken" not in str(recorder.requests[0].url) and "apikey" not in recorder.requests[0].headers
    assert "TMAPI_API_TOKEN" in str(results[0].error) and "it is empty" in str(results[0].error)


def test_base_url_with_path_prefix_and_trailing_slash() -> None:
    recorder = Recorder(lambda r, n: json_response(SUCCESS_BODY))
    run_fetch("sync", settings(base_url="http://host.test/prefix/"), recorder, [ITEM])
    assert recorder.requests[0].url.path == "/prefix/1688/item/statistics/sales"


@pytest.mark.parametrize("mode", MODES)
def test_token_never_leaks(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def answer(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:  # an exception whose text carries the URL (httpx's usually do not; be safe anyway)
            raise httpx.ConnectError(f"cannot connect to {request.url}", request=request)
        if n == 2:  # a gateway echoing the token
            return json_response({"code": 503, "msg": f"busy, key {TOKEN}"}, status=503)
        return json_response({"message": f"Invalid authentication credentials apiToken={TOKEN}"}, status=401)

    recorder = Recorder(answer)
    results, _, client = run_fetch(mode, settings(max_attempts=3), recorder, [ITEM, ITEMS[0]])
    assert recorder.calls == 3 and TOKEN in str(recorder.requests[0].url)  # it was sent...
    assert "HTTP Request: GET" in caplog.text  # httpx's own log line went through the handlers
    assert "apiToken=***" in caplog.text
    assert TOKEN not in caplog.text  # ...but never shown
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
    for result in results:
        assert TOKEN not in str(result.error) and TOKEN not in repr(result.error)
        assert TOKEN not in str(result.error.api_msg)
        for attempt in result.attempts:
            assert TOKEN not in attempt.request_url and TOKEN not in (attempt.message or "")
    assert results[0].outcome is Outcome.AUTH
    assert "***" in (results[0].attempts[0].message or "")
    cfg = settings()
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg) and "api_token='***'" in repr(cfg)
    assert TOKEN not in repr(client)
    assert "api_token=''" in repr(settings(api_token=""))


def test_log_records_with_tracebacks_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings()  # registers the token
    try:
        raise RuntimeError(f"failed GET {BASE}/x?apiToken={TOKEN}")
    except RuntimeError:
        logging.getLogger("tmapi_assets.client").exception("oops %s", TOKEN)
    assert "oops ***" in caplog.text and "apiToken=***" in caplog.text
    assert TOKEN not in caplog.text


def test_settings_are_validated() -> None:
    with pytest.raises(InvalidInputError, match="base_url"):
        ClientSettings(base_url="api.tmapi.top")
    with pytest.raises(InvalidInputError, match="auth_mode"):
        ClientSettings(auth_mode="cookie")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="max_attempts"):
        ClientSettings(max_attempts=0)
    with pytest.raises(InvalidInputError, match="concurrency"):
        ClientSettings(concurrency=0)
    assert ClientSettings(base_url="https://api.tmapi.io/").base_url == "https://api.tmapi.io"


def test_programming_errors_raise() -> None:
    with TmapiClient(settings(), transport=httpx.MockTransport(lambda r: json_response(SUCCESS_BODY))) as c:
        with pytest.raises(TypeError):
            c.fetch(652702302959)  # type: ignore[arg-type]


def test_on_attempt_sees_each_attempt_before_the_next_call() -> None:
    order: list[str] = []

    def answer(request: httpx.Request, n: int) -> httpx.Response:
        order.append(f"call {n}")
        return json_response({"code": 417, "msg": "x"}, status=417) if n < 3 else json_response(SUCCESS_BODY)

    run_fetch("sync", settings(), Recorder(answer), [ITEM], on_attempt=lambda a: order.append(f"seen {a.attempt}"))
    assert order == ["call 1", "seen 1", "call 2", "seen 2", "call 3", "seen 3"]


# ------------------------------------------------------------------------------------------------ real sockets


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, behaviour: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = behaviour
        self.connections = 0
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        srv = self.server
        with srv.lock:
            srv.connections += 1
        reader = self.request.makefile("rb")
        while True:
            line = reader.readline()
            if not line:
                return
            while reader.readline() not in (b"\r\n", b"\n", b""):
                pass
            with srv.lock:
                srv.requests.append(line.decode("latin-1").split(" ")[1])
            body = json.dumps(SUCCESS_BODY, ensure_ascii=False).encode("utf-8")
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            if srv.behaviour == "ok":
                self.request.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                continue
            # Headers and the start of the body, then trouble.
            self.request.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            if srv.behaviour == "stall":
                srv.stop.wait(10)
                return
            if srv.behaviour == "reset":
                time.sleep(0.05)
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.request.close()  # RST
                return


@pytest.fixture
def server_factory():
    servers: list[_Server] = []

    def start(behaviour: str) -> _Server:
        srv = _Server(behaviour)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("mode", MODES)
def test_real_http_keep_alive_reuse_and_no_token_in_debug_logs(mode: str, server_factory, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    srv = server_factory("ok")
    cfg = settings(base_url=srv.base_url, concurrency=1)
    items = [WatchedItem(600000000000 + i) for i in range(3)]
    if mode == "sync":
        with TmapiClient(cfg) as client:
            results = [client.fetch(item) for item in items]
    else:
        async def main() -> list[FetchResult]:
            async with AsyncTmapiClient(cfg) as client:
                return await client.fetch_many(items)
        results = asyncio.run(main())
    assert all(r.outcome is Outcome.SUCCESS for r in results)
    assert results[0].payload["data"]["sales_quantity_total"] == "1.5万+"
    assert len(srv.requests) == 3 and srv.connections == 1  # one connection, kept alive
    assert all(f"apiToken={TOKEN}" in path for path in srv.requests)
    assert "httpcore" in caplog.text or "connect_tcp" in caplog.text  # real transport debug logs were captured
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_real_http_stall_after_headers_is_a_retried_network_error(mode: str, server_factory) -> None:
    srv = server_factory("stall")
    cfg = settings(base_url=srv.base_url, timeout_s=0.3, max_attempts=2)
    started = time.monotonic()
    results, _, _ = run_fetch_real(mode, cfg, [ITEM])
    result = results[0]
    assert time.monotonic() - started < 5
    assert result.outcome is Outcome.NETWORK and len(result.attempts) == 2 and len(srv.requests) == 2
    first = result.attempts[0]
    assert first.http_status == 200 and first.body == json.dumps(SUCCESS_BODY, ensure_ascii=False).encode()[:10]
    assert "ReadTimeout" in (first.message or "")
    assert "try again later" in str(result.error)


@pytest.mark.parametrize("mode", MODES)
def test_real_http_reset_mid_body_is_a_retried_network_error(mode: str, server_factory) -> None:
    srv = server_factory("reset")
    cfg = settings(base_url=srv.base_url, max_attempts=2)
    results, _, _ = run_fetch_real(mode, cfg, [ITEM])
    result = results[0]
    assert result.outcome is Outcome.NETWORK and len(result.attempts) == 2 and len(srv.requests) == 2
    first = result.attempts[0]
    assert first.http_status == 200 and len(first.body) == 10  # headers came, then the reset mid-body
    assert first.message.startswith(("ReadError", "RemoteProtocolError")), first.message
    assert "after the headers and 10 body bytes" in first.message
    assert not result.ok and TOKEN not in str(result.error)


def test_real_http_connection_refused_is_a_network_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results, _, _ = run_fetch_real("sync", settings(base_url=f"http://127.0.0.1:{port}", max_attempts=2), [ITEM])
    assert results[0].outcome is Outcome.NETWORK and len(results[0].attempts) == 2
    assert results[0].attempts[0].http_status is None


def run_fetch_real(mode: str, cfg: ClientSettings, items: list[WatchedItem]):
    sleeps: list[float] = []
    if mode == "sync":
        with TmapiClient(cfg, sleep=sleeps.append) as client:
            return [client.fetch(item) for item in items], sleeps, client

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)

    async def main():
        async with AsyncTmapiClient(cfg, sleep=fake_sleep) as client:
            return await client.fetch_many(items), client

    results, client = asyncio.run(main())
    return results, sleeps, client
