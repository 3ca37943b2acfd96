"""The sandbox ASGI app: a Starlette app that answers like TMAPI's 1688 sales statistics API and its Kong gateway.

Order in which a request to ``GET /1688/item/statistics/sales`` is handled:

1. Gateway: any other path or method -> 404 ``{"message": "no Route matched with those values"}``; no token
   (``apiToken`` query parameter, else ``apikey`` header) -> 401 ``{"message": "No API key found in request"}``;
   unknown token -> 401 ``{"message": "Invalid authentication credentials"}``. Gateway answers are immediate
   (no latency) and use ``application/json; charset=utf-8``.
2. Concurrency: with ``concurrency_limit`` N > 0, a request arriving while N requests are in flight gets 503 at once
   and is not counted as in flight.
3. A scripted response queued for this (item_id, spec_id) (or for the wildcard item ``"*"``), if any, is popped and
   returned (after its ``sleep_ms``, else after the configured latency).
4. Otherwise, after the configured latency: the exhausted token -> 439; bad item_id/spec_id -> 422; item ids ending in
   ``0422`` -> 422 (an item the API refuses); then a ``fault_rate`` share of the remaining (successful) answers is
   replaced by a transient fault (417/499/500/503, chosen by ``random.Random(seed)``); the rest succeed with HTTP 200.

Success bodies: item 652702302959 without spec returns the bytes of the real doc example (``doc_example_full.json``
in this package) unchanged; everything else is synthetic (see ``synthetic.py``: item ids ending in ``0000`` give
``"data": null``, ending in ``0001`` an item that never sells), with the 30-day window ending "yesterday" in China time
of the configured ``today`` (default: the current China date, evaluated per request).

Control endpoints (no token, not counted in stats):

* ``GET  /_sandbox/stats``  -> counters (see ``SandboxState.snapshot``).
* ``POST /_sandbox/reset``  -> clears scripts and stats and re-seeds the fault and jitter generators.
* ``POST /_sandbox/script`` -> ``{"item_id": "123", "spec_id": "", "responses": [...]}`` appends responses that the
  next requests for (item, spec) get, one each, in order. Each response is an object:

  - ``{"status": 417, "body": {...}}``: JSON body (``application/json``; ``content_type`` may override);
  - ``{"status": 200, "body_text": "", "content_type": "text/html"}``: raw text body (UTF-8 unless ``charset``
    is given as an encoding name, e.g. ``"charset": "gbk"``);
  - optional on any entry: ``"sleep_ms"`` (delay before answering, replaces the configured latency) and
    ``"headers"`` (extra response headers);
  - ``{"kind": "stall_headers"}``: sends nothing until ``sleep_ms`` (default 1 hour) has passed, then answers with
    the entry's status/body if it has one, else like Kong on an upstream timeout (504
    ``{"message": "The upstream server is timing out"}``); ends early when the client disconnects or the server
    stops (the connection is then closed);
  - ``{"kind": "stall_body", "status": 200, "body_text": "{\\"code\\": 200"}``: sends headers (with a
    Content-Length larger than what follows) and the start of the body, then stalls like ``stall_headers``;
  - ``{"kind": "disconnect"}``: closes the connection without any answer (after ``sleep_ms``/latency);
  - ``{"kind": "large_body", "size_bytes": 5000000}``: a 200 ``application/json`` body of that many bytes;
  - ``{"kind": "drip", "body_text": "...", "chunk_bytes": 1, "interval_ms": 100}``: sends the headers (with the
    right Content-Length), then the body ``chunk_bytes`` at a time with ``interval_ms`` between chunks (a slow
    body that never trips a per-read timeout); ends early when the client disconnects or the server stops;
  - optional on ``disconnect`` and ``stall_body``: ``"reset": true`` closes with a TCP RST (SO_LINGER 0) instead
    of a FIN;
  - optional on a plain response: ``"close_after_ms": 0``: after the complete answer (no ``Connection: close``
    header), the server closes the keep-alive connection if no further request reached the app on it within that
    many ms: a keep-alive idle timeout shorter than the client's pool (with its race against a new request).

  ``item_id`` ``"*"`` queues responses for whatever item comes next (used after the item's own queue is empty).

The token is never logged or echoed by the app.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from collections import Counter, deque
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tmapi_assets.errors import InvalidInputError
from tmapi_assets.ids import parse_item_id, parse_spec_id
from tmapi_assets.sandbox import synthetic

if TYPE_CHECKING:  # pragma: no cover
    from tmapi_assets.sandbox.server import SandboxConfig

API_PATH = "/1688/item/statistics/sales"
DOC_EXAMPLE_ITEM = "652702302959"
DOC_EXAMPLE_BYTES = (Path(__file__).with_name("doc_example_full.json")).read_bytes()
CHINA_TZ = timezone(timedelta(hours=8), "Asia/Shanghai")  # no DST in China since 1991
REFUSED_ITEM_SUFFIX = "0422"

GATEWAY_CT = b"application/json; charset=utf-8"
API_CT = b"application/json"

MSG_NO_ROUTE = "no Route matched with those values"
MSG_NO_KEY = "No API key found in request"
MSG_BAD_KEY = "Invalid authentication credentials"
MSG_439 = "Subscription expired or insufficient balance"
MSG_417 = "Failed to retrieve data, please try again or contact customer service."
MSG_499 = "Please try again or set your request timeout to 60 seconds."
MSG_500 = "Unexpected error, please contact customer service."
MSG_503 = "API request concurrency limit exceeded, please reduce concurrency."

_STALL_DEFAULT_S = 3600.0
_SCRIPT_KINDS = {"respond", "stall_headers", "stall_body", "disconnect", "large_body", "drip"}


def china_today() -> date:
    return datetime.now(CHINA_TZ).date()


def _api_body(code: int, msg: str, data: Any = None) -> bytes:
    return json.dumps({"code": code, "msg": msg, "data": data}, ensure_ascii=False).encode("utf-8")


def _gateway_body(message: str) -> bytes:
    return json.dumps({"message": message}).encode("utf-8")


_GW_404 = _gateway_body(MSG_NO_ROUTE)
_GW_NO_KEY = _gateway_body(MSG_NO_KEY)
_GW_BAD_KEY = _gateway_body(MSG_BAD_KEY)
_GW_504 = _gateway_body("The upstream server is timing out")
_BODY_439 = _api_body(439, MSG_439)
_BODY_503 = _api_body(503, MSG_503)
_FAULTS: tuple[tuple[int, bytes], ...] = (
    (417, _api_body(417, MSG_417)),
    (499, _api_body(499, MSG_499)),
    (500, _api_body(500, MSG_500)),
    (503, _BODY_503),
)


@lru_cache(maxsize=8192)
def success_body(item: str, spec: str, end: date) -> bytes:
    """The HTTP 200 body for (item, spec) with the sales window ending on `end`."""
    if item == DOC_EXAMPLE_ITEM and not spec:
        return DOC_EXAMPLE_BYTES
    data = synthetic.history(item, spec, end)
    return json.dumps({"code": 200, "msg": "success", "data": data}, ensure_ascii=False).encode("utf-8")


async def _send_bytes(send, status: int, body: bytes, content_type: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Script:
    """One validated scripted response."""

    __slots__ = ("kind", "status", "body", "has_body", "content_type", "sleep_s", "headers", "size", "chunk",
                 "interval_s", "reset", "close_after_s")

    def __init__(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ValueError("each response must be a JSON object")
        kind = raw.get("kind", "respond")
        if kind not in _SCRIPT_KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {sorted(_SCRIPT_KINDS)}")
        self.kind = kind
        status = raw.get("status", 200)
        if not isinstance(status, int) or not 100 <= status <= 999:
            raise ValueError(f"status must be an integer 100..999, got {status!r}")
        self.status = status
        sleep_ms = raw.get("sleep_ms")
        if sleep_ms is not None and (not isinstance(sleep_ms, (int, float)) or sleep_ms < 0):
            raise ValueError("sleep_ms must be a non-negative number")
        self.sleep_s = None if sleep_ms is None else float(sleep_ms) / 1000.0
        headers = raw.get("headers") or {}
        if not isinstance(headers, dict):
            raise ValueError("headers must be an object")
        self.headers = [(str(k).lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
        self.size = int(raw.get("size_bytes", 0) or 0)
        self.chunk = int(raw.get("chunk_bytes", 1) or 1)
        interval_ms = raw.get("interval_ms", 100)
        close_after_ms = raw.get("close_after_ms")
        for name, value in (("interval_ms", interval_ms), ("close_after_ms", close_after_ms)):
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{name} must be a non-negative number")
        if self.chunk < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.interval_s = float(interval_ms) / 1000.0
        self.close_after_s = None if close_after_ms is None else float(close_after_ms) / 1000.0
        self.reset = bool(raw.get("reset", False))
        self.has_body = "body_text" in raw or "body" in raw
        if "body_text" in raw:
            text = raw["body_text"]
            if not isinstance(text, str):
                raise ValueError("body_text must be a string")
            self.body = text.encode(raw.get("charset") or "utf-8")
            self.content_type = str(raw.get("content_type", "text/plain"))
        elif "body" in raw:
            self.body = json.dumps(raw["body"], ensure_ascii=False).encode("utf-8")
            self.content_type = str(raw.get("content_type", "application/json"))
        else:
            self.body = b""
            self.content_type = str(raw.get("content_type", "application/json"))


class SandboxState:
    """Mutable server state: counters, scripts, random generators. Touched only from the server's event loop."""

    def __init__(self, config: "SandboxConfig") -> None:
        self.config = config
        self.scripts: dict[tuple[str, str], deque[_Script]] = {}
        self.abort: asyncio.Event | None = None  # set on shutdown so that stalled requests end
        self.idle_close: dict[Any, object] = {}  # connection (client address) -> pending close_after_ms marker
        self.reset()

    def reset(self) -> None:
        self.scripts.clear()
        self.idle_close.clear()
        self.requests_total = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.in_flight_all = 0
        self.peak_in_flight_all = 0
        self.unanswered = 0  # admitted requests closed without a complete answer (client gone, script, shutdown)
        self.by_status: Counter[str] = Counter()
        self.by_item: Counter[str] = Counter()
        self.fault_rng = random.Random(self.config.seed)
        self.jitter_rng = random.Random(f"jitter:{self.config.seed}")

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "in_flight_all": self.in_flight_all,
            "peak_in_flight_all": self.peak_in_flight_all,
            "unanswered": self.unanswered,
            "by_status": dict(self.by_status),
            "by_item": dict(self.by_item),
            "scripts_pending": {f"{i}:{s}" if s else i: len(q) for (i, s), q in self.scripts.items() if q},
        }

    def pop_script(self, item: str, spec: str) -> _Script | None:
        for key in ((item, spec), ("*", "")):
            queue = self.scripts.get(key)
            if queue:
                entry = queue.popleft()
                if not queue:
                    del self.scripts[key]
                return entry
        return None

    def latency_s(self) -> float:
        ms = self.config.latency_ms
        jitter = self.config.latency_jitter_ms
        if jitter:
            ms += self.jitter_rng.uniform(-jitter, jitter)
        return max(0.0, ms) / 1000.0

    def window_end(self) -> date:
        today = self.config.today or china_today()
        return today - timedelta(days=1)


class SalesEndpoint:
    """Raw ASGI endpoint for GET /1688/item/statistics/sales (fast path; no Request/Response objects)."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        arrived = time.monotonic()
        st = self.state
        cfg = st.config
        st.requests_total += 1
        st.in_flight_all += 1
        st.peak_in_flight_all = max(st.peak_in_flight_all, st.in_flight_all)
        status = 0
        if st.idle_close:
            st.idle_close.pop(_connection_key(scope), None)  # a new request: the connection is not idle
        try:
            if scope["method"] != "GET":
                status = 404
                await _send_bytes(send, 404, _GW_404, GATEWAY_CT)
                return
            request = Request(scope)
            params = request.query_params
            raw_item = params.get("item_id", "")
            raw_spec = params.get("spec_id", "")
            item_key = raw_item.strip()[:40] + (f":{raw_spec.strip()[:70]}" if raw_spec.strip() else "")
            if item_key:
                st.by_item[item_key] += 1

            token = params.get("apiToken") or request.headers.get("apikey") or ""
            if not token:
                status = 401
                await _send_bytes(send, 401, _GW_NO_KEY, GATEWAY_CT)
                return
            if token != cfg.token and token != cfg.exhausted_token:
                status = 401
                await _send_bytes(send, 401, _GW_BAD_KEY, GATEWAY_CT)
                return

            limit = cfg.concurrency_limit
            if limit and st.in_flight >= limit:
                status = 503
                await _send_bytes(send, 503, _BODY_503, API_CT)
                return
            st.in_flight += 1
            st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
            try:
                status = await self._admitted(scope, receive, send, token, raw_item.strip(), raw_spec.strip(),
                                              arrived)
            finally:
                st.in_flight -= 1
        finally:
            st.in_flight_all -= 1
            if status:
                st.by_status[str(status)] += 1
            else:
                st.unanswered += 1

    async def _admitted(self, scope, receive, send, token: str, item: str, spec: str, arrived: float) -> int:
        """Handle an admitted request; returns the status sent (0 when nothing was sent)."""
        st = self.state
        cfg = st.config
        script = st.pop_script(item, spec)
        if script is not None:
            return await self._scripted(scope, receive, send, script)

        status, body = self._answer(token, item, spec)
        # The configured latency is the API's service time: what this server spent so far counts towards it.
        if not await self._pause(receive, st.latency_s() - (time.monotonic() - arrived)):
            await _drop_connection(receive, send)
            return 0
        await _send_bytes(send, status, body, API_CT)
        return status

    def _answer(self, token: str, item: str, spec: str) -> tuple[int, bytes]:
        """(status, body) of an unscripted request."""
        st = self.state
        cfg = st.config
        if token == cfg.exhausted_token:
            return 439, _BODY_439
        try:
            item_id = parse_item_id(item)
        except InvalidInputError:
            return 422, _api_body(422, "Parameter error: item_id")
        try:
            spec_id = parse_spec_id(spec)
        except InvalidInputError:
            return 422, _api_body(422, "Parameter error: spec_id")
        if str(item_id).endswith(REFUSED_ITEM_SUFFIX):
            return 422, _api_body(422, "Parameter error: item_id")
        if cfg.fault_rate > 0 and st.fault_rng.random() < cfg.fault_rate:
            return st.fault_rng.choice(_FAULTS)
        return 200, success_body(str(item_id), spec_id, st.window_end())

    async def _scripted(self, scope, receive, send, script: _Script) -> int:
        st = self.state
        delay = script.sleep_s
        if script.kind == "stall_body":
            declared = max(len(script.body) + 1024, script.size)
            headers = [
                (b"content-type", script.content_type.encode("latin-1")),
                (b"content-length", str(declared).encode()),
                *script.headers,
            ]
            await send({"type": "http.response.start", "status": script.status, "headers": headers})
            await send({"type": "http.response.body", "body": script.body, "more_body": True})
            await self._pause(receive, _STALL_DEFAULT_S if delay is None else delay)
            await _drop_connection(receive, send, reset=script.reset)  # the body stays incomplete
            return script.status
        if script.kind == "stall_headers":
            if not await self._pause(receive, _STALL_DEFAULT_S if delay is None else delay):
                await _drop_connection(receive, send)
                return 0
            if script.has_body:
                await self._send_script(send, script)
                return script.status
            await _send_bytes(send, 504, _GW_504, GATEWAY_CT)  # what Kong says when the upstream times out
            return 504
        if not await self._pause(receive, st.latency_s() if delay is None else delay):
            await _drop_connection(receive, send)
            return 0
        if script.kind == "disconnect":
            await _drop_connection(receive, send, reset=script.reset)
            return 0
        if script.kind == "large_body":
            await self._send_large(send, script)
            return script.status
        if script.kind == "drip":
            return script.status if await self._send_drip(receive, send, script) else 0
        await self._send_script(send, script)
        if script.close_after_s is not None:
            _close_if_idle(st, scope, receive, script.close_after_s)
        return script.status

    @staticmethod
    async def _send_script(send, script: _Script) -> None:
        await _send_bytes(send, script.status, script.body, script.content_type.encode("latin-1"), script.headers)

    async def _send_large(self, send, script: _Script) -> None:
        size = max(script.size, 2)
        head = b'{"code":200,"msg":"success","data":{"pad":"'
        tail = b'"}}'
        pad = max(0, size - len(head) - len(tail))
        headers = [(b"content-type", API_CT), (b"content-length", str(len(head) + pad + len(tail)).encode())]
        await send({"type": "http.response.start", "status": script.status, "headers": headers + script.headers})
        await send({"type": "http.response.body", "body": head, "more_body": True})
        chunk = b"x" * 65536
        while pad > 0:
            n = min(pad, len(chunk))
            await send({"type": "http.response.body", "body": chunk[:n], "more_body": True})
            pad -= n
        await send({"type": "http.response.body", "body": tail})

    async def _send_drip(self, receive, send, script: _Script) -> bool:
        """Send the body a chunk at a time with pauses; False if it ended early (client gone, server stopping)."""
        headers = [(b"content-type", script.content_type.encode("latin-1")),
                   (b"content-length", str(len(script.body)).encode()), *script.headers]
        await send({"type": "http.response.start", "status": script.status, "headers": headers})
        body = script.body
        for start in range(0, len(body), script.chunk):
            if start and not await self._pause(receive, script.interval_s):
                await _drop_connection(receive, send)
                return False
            last = start + script.chunk >= len(body)
            chunk = body[start:start + script.chunk]
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        if not body:
            await send({"type": "http.response.body", "body": b""})
        return True

    async def _pause(self, receive, seconds: float) -> bool:
        """Sleep without blocking the loop. False if the client went away or the server is stopping."""
        if seconds <= 0:
            return True
        abort = self.state.abort
        if abort is None:
            abort = self.state.abort = asyncio.Event()
        if abort.is_set():
            return False
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        stopping = asyncio.ensure_future(abort.wait())
        try:
            done, _ = await asyncio.wait((disconnect, stopping), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            stopping.cancel()
        return not done


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _drop_connection(receive, send, reset: bool = False) -> None:
    """Close the client connection without (completing) an answer (``reset``: with a TCP RST, not a FIN).

    ASGI has no "abort" message; uvicorn's receive() is a bound method of its request cycle, which holds the
    transport. Closing it marks the cycle disconnected, so uvicorn neither logs nor sends a 500 afterwards. Without
    that handle, fall back to a response that declares a body and never sends it (uvicorn then closes the
    connection, logging one error line that contains no URL or token).
    """
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        if not transport.is_closing():
            sock = transport.get_extra_info("socket") if reset else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        for _ in range(3):  # let connection_lost run so the cycle sees the disconnect
            await asyncio.sleep(0)
        return
    try:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
    except Exception:  # pragma: no cover - already gone
        pass


def _connection_key(scope) -> Any:
    client = scope.get("client")
    return tuple(client) if client else None


def _close_if_idle(state: SandboxState, scope, receive, seconds: float) -> None:
    """Close the connection (a FIN, like an expired keep-alive) ``seconds`` after the answer, unless another request
    reached the app on it meanwhile."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    key = _connection_key(scope)
    if transport is None or key is None:  # pragma: no cover - not uvicorn
        return
    marker = object()
    state.idle_close[key] = marker

    def close() -> None:
        if state.idle_close.get(key) is marker:
            del state.idle_close[key]
            if not transport.is_closing():
                transport.close()

    asyncio.get_running_loop().call_later(seconds, close)


async def _gateway_404(scope, receive, send) -> None:
    await _send_bytes(send, 404, _GW_404, GATEWAY_CT)


class _CountedNotFound:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        self.state.requests_total += 1
        self.state.by_status["404"] += 1
        await _gateway_404(scope, receive, send)


def create_app(config: "SandboxConfig") -> Starlette:
    """Build the sandbox app for a config (see tmapi_assets.sandbox.server.SandboxConfig)."""
    state = SandboxState(config)

    async def stats(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    async def script(request: Request) -> Response:
        try:
            payload = json.loads(await request.body() or b"null")
            if not isinstance(payload, dict):
                raise ValueError("body must be a JSON object")
            item = str(payload.get("item_id", "")).strip()
            if not item:
                raise ValueError("item_id is required ('*' for any item)")
            spec = str(payload.get("spec_id") or "").strip()
            responses = payload.get("responses")
            if not isinstance(responses, list) or not responses:
                raise ValueError("responses must be a non-empty list")
            entries = [_Script(r) for r in responses]
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        key = ("*", "") if item == "*" else (item, spec)
        state.scripts.setdefault(key, deque()).extend(entries)
        return JSONResponse({"queued": len(entries), "pending": len(state.scripts[key])})

    app = Starlette(
        routes=[
            Route("/_sandbox/stats", stats, methods=["GET"]),
            Route("/_sandbox/reset", reset, methods=["POST"]),
            Route("/_sandbox/script", script, methods=["POST"]),
            Route(API_PATH, SalesEndpoint(state), methods=None),
            Route("/{path:path}", _CountedNotFound(state), methods=None),
        ],
    )
    app.router.redirect_slashes = False  # the catch-all route answers like the gateway instead
    app.state.sandbox = state
    return app
