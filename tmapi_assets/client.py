"""HTTP client for TMAPI's 1688 sales statistics endpoint: one item in, one FetchResult (with every attempt) out.

Plain Python + httpx (no Dagster import). Layering: ids, errors, redact only.

- Every HTTP call is one ``Attempt`` (exactly a row of tmapi.raw_responses): the verbatim body bytes, the redacted URL,
  the outcome decided by ``errors.classify`` (THE table). ``on_attempt`` sees each attempt as soon as it completes.
- Bodies are read as bytes, streamed, capped at ``max_body_bytes`` (OVERSIZED keeps the prefix), decoded as UTF-8
  ourselves (a BOM is stripped; httpx's .text/.json are never used: they may decode as Latin-1).
- RETRY outcomes (transient, malformed, network) are retried up to ``max_attempts`` calls in total, with exponential
  backoff and full jitter (``Retry-After`` on 503/429 wins, capped). FAIL_ITEM is never retried.
- HALT_RUN (439 quota, auth) and CONFIG_ERROR (404 no route) set the shared ``HaltSignal``: from then on no client
  sharing it makes a call; items waiting for a slot or in a backoff sleep come back as outcome ``"halted"``.
- ``fetch`` never raises for API or network problems: the FetchResult carries an ``ApiError`` whose text names the
  item, the HTTP status, the API code and message, and says what to do. It never contains the token.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import math
import random
import ssl
import threading
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Literal, Sequence

import httpx

from tmapi_assets.call_slots import CallSlots
from tmapi_assets.errors import (
    OUTCOME_ACTION,
    Action,
    ApiError,
    InvalidInputError,
    Outcome,
    RunHaltedError,
    classify,
)
from tmapi_assets.ids import WatchedItem
from tmapi_assets.redact import (
    MASK,
    install_log_redaction,
    redact_bytes,
    redact_text,
    redact_url,
    register_secret,
)

__all__ = [
    "SALES_PATH",
    "AdaptiveLimiter",
    "AsyncTmapiClient",
    "Attempt",
    "ClientSettings",
    "FetchResult",
    "HaltSignal",
    "TmapiClient",
]

logger = logging.getLogger("tmapi_assets.client")

SALES_PATH = "/1688/item/statistics/sales"
MESSAGE_MAX_CHARS = 500
SNIPPET_CHARS = 200
OVERSIZED_PREFIX_BYTES = 64 * 1024  # what is kept of a body over max_body_bytes
_BOM = b"\xef\xbb\xbf"
_OVERLOAD_STATUSES = frozenset({429, 503})  # "reduce concurrency" / rate limited: the limiter backs off
_USER_AGENT = f"tmapi-assets/0.1 httpx/{httpx.__version__}"


_tls_lock = threading.Lock()
_tls: list[ssl.SSLContext] = []


def tls_context() -> ssl.SSLContext:
    """httpx's default TLS settings (certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR), built once per process: each
    client built its own, loading the CA bundle (~30 ms), and a refresh builds a client per run. (A lock, not a
    cache decorator: a caller arriving while another thread builds it waits for that one instead of building two.)"""
    with _tls_lock:
        if not _tls:
            _tls.append(httpx.create_ssl_context())
        return _tls[0]


HALTED: Literal["halted"] = "halted"


# --------------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, repr=False)
class ClientSettings:
    """How to reach TMAPI and how hard to try. ``repr``/``str`` never show the token."""

    base_url: str = "http://api.tmapi.top"
    api_token: str = ""  # never printed: repr shows '***'
    auth_mode: Literal["query", "header"] = "query"  # query: ?apiToken=...; header: apikey: ...
    timeout_s: float = 60.0  # the API's own advice for 499
    connect_timeout_s: float = 10.0
    max_attempts: int = 4  # per item, including the first
    backoff_base_s: float = 0.5  # full jitter: sleep uniform(0, min(backoff_max_s, base * 2**(n-1)))
    backoff_max_s: float = 20.0
    max_body_bytes: int = 8 * 1024 * 1024  # a larger body is refused (OVERSIZED) and not read further
    concurrency: int = 4  # max in-flight calls of one AsyncTmapiClient

    def __post_init__(self) -> None:
        register_secret(self.api_token)  # whatever happens later, log filters and error texts mask it
        base = str(self.base_url).strip().rstrip("/")
        object.__setattr__(self, "base_url", base)
        problems = []
        if not (base.startswith("http://") or base.startswith("https://")) or len(base) <= len("https://"):
            problems.append(f"base_url {redact_url(base)!r} must start with http:// or https:// (TMAPI_BASE_URL)")
        if self.auth_mode not in ("query", "header"):
            problems.append(f"auth_mode {self.auth_mode!r} must be 'query' or 'header'")
        for name in ("timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0")
        for name in ("backoff_base_s", "backoff_max_s"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0")
        for name in ("max_attempts", "concurrency", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1")
        if problems:
            raise InvalidInputError("invalid TMAPI client settings: " + "; ".join(problems))

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_token":
                value = MASK if value else ""
            parts.append(f"{f.name}={value!r}")
        return f"ClientSettings({', '.join(parts)})"

    __str__ = __repr__

    @property
    def sales_url(self) -> str:
        return self.base_url + SALES_PATH


# --------------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Attempt:
    """One HTTP call: exactly what tmapi.raw_responses stores, one row per attempt."""

    item: WatchedItem
    attempt: int  # 1-based
    fetched_at: datetime  # aware UTC, when the answer (or error) arrived
    elapsed_ms: float
    http_status: int | None  # None when no HTTP answer (connect error, timeout before the headers)
    api_code: int | None  # body `code` as int (string "439" -> 439), None when absent
    outcome: Outcome
    body: bytes  # verbatim bytes as received (b"" when none); for OVERSIZED only the first OVERSIZED_PREFIX_BYTES
    request_url: str  # REDACTED url (token removed)
    message: str | None  # body msg / gateway message / what was wrong / network error text; redacted, <= 500 chars

    @property
    def action(self) -> Action:
        return OUTCOME_ACTION[self.outcome]


@dataclass
class FetchResult:
    item: WatchedItem
    attempts: list[Attempt]
    # The last attempt's outcome; "halted" when the run's halt stopped this item before it got a final answer
    # (no call at all, or a retry not made).
    outcome: Outcome | Literal["halted"]
    payload: dict | None  # the parsed JSON body (code/msg/data) of the successful attempt, else None
    error: ApiError | None  # set when not SUCCESS/NO_DATA: says what went wrong and what to do

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.SUCCESS, Outcome.NO_DATA)

    @property
    def halted(self) -> bool:
        return self.outcome == HALTED


# --------------------------------------------------------------------------------------------------------- halt


class HaltSignal:
    """Shared, thread-safe flag: once set (quota, auth, wrong base URL), no client sharing it makes any further call.

    The first error set is kept. Listeners (used by the clients' backoff sleeps) are told when it is set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._error: ApiError | None = None
        self._listeners: list[Callable[[], None]] = []

    def set(self, error: ApiError) -> bool:
        """Set the halt with ``error``; returns False (and keeps the first error) if it was already set."""
        with self._lock:
            if self._error is not None:
                return False
            self._error = error
            self._event.set()
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:  # a listener must never break the halt itself
                logger.exception("halt listener failed")
        return True

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def error(self) -> ApiError | None:
        return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or ``timeout`` seconds passed; True if set."""
        return self._event.wait(timeout)

    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` (from the setting thread) when the halt is set; returns a function removing it."""
        with self._lock:
            if self._error is None:
                self._listeners.append(callback)
                registered = True
            else:
                registered = False
        if not registered:
            callback()
            return lambda: None

        def remove() -> None:
            with self._lock:
                try:
                    self._listeners.remove(callback)
                except ValueError:
                    pass

        return remove

    def __repr__(self) -> str:
        return f"HaltSignal(set={self.is_set})"


# --------------------------------------------------------------------------------------------------------- limiter


class AdaptiveLimiter:
    """AIMD concurrency limiter for the async client (one event loop; not thread-safe).

    Starts at ``limit`` and never goes above it. On an overload answer (503 "reduce concurrency", 429) the limit is
    halved (``max(1, floor(current / 2))``), but only by a call that started after the previous decrease: a burst of
    503s from calls that were already in flight together halves the limit once, not once per call. Each success adds
    ``1 / current`` (about +1 per window of successful calls), probing back up to the maximum.

    ``async with limiter as generation:`` holds one slot; pass ``generation`` to ``on_overload``.
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be an integer >= 1")
        self.max_limit = limit
        self._current = float(limit)
        self._in_flight = 0
        self._generation = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.peak_in_flight = 0
        self.decreases = 0

    @property
    def current(self) -> float:
        """The adaptive limit (float; ``limit`` is the whole number of slots it allows)."""
        return self._current

    @property
    def limit(self) -> int:
        return max(1, math.floor(self._current))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def generation(self) -> int:
        return self._generation

    async def acquire(self) -> int:
        """Wait for a slot (FIFO); returns the limiter generation at the moment the slot was obtained."""
        if not self._waiters and self._in_flight < self.limit:
            self._take()
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # _grant() takes the slot for us before waking us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.release()  # granted, but we will not use it: pass it on
                else:
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass
                raise
        return self._generation

    def release(self) -> None:
        self._in_flight -= 1
        self._grant()

    def on_overload(self, generation: int) -> bool:
        """A call that got its slot at ``generation`` was told to reduce concurrency. True if the limit was cut."""
        if generation != self._generation:
            return False  # same burst as an earlier decrease
        before = self._current
        self._current = float(max(1, math.floor(self._current / 2)))
        self._generation += 1
        self.decreases += 1
        logger.info("TMAPI asked to reduce concurrency: limit %.2f -> %d", before, self.limit)
        return True

    def on_success(self) -> None:
        if self._current < self.max_limit:
            self._current = min(float(self.max_limit), self._current + 1.0 / self._current)
            self._grant()

    def _take(self) -> None:
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def _grant(self) -> None:
        while self._waiters and self._in_flight < self.limit:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while waiting
                continue
            self._take()
            waiter.set_result(None)

    async def __aenter__(self) -> int:
        return await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimiter(current={self._current:.2f}, max={self.max_limit}, in_flight={self._in_flight}, "
            f"peak_in_flight={self.peak_in_flight}, decreases={self.decreases})"
        )


# --------------------------------------------------------------------------------------------------------- core


@dataclass
class _Raw:
    """What came back from one call, before interpretation."""

    status: int | None = None
    headers: httpx.Headers | None = None
    body: bytearray = field(default_factory=bytearray)
    oversized: bool = False
    undecodable: bool = False  # content-encoding (gzip...) could not be decoded
    error: BaseException | None = None  # network error / timeout


class _DeadlineExceeded(Exception):
    pass


def _to_code(value: Any) -> int | None:
    """The body `code` as an int: 200, "200", 200.0 -> 200; anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit() and text.isascii():
            return int(text)
    return None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _snippet(body: bytes, limit: int = SNIPPET_CHARS) -> str:
    text = body[: limit * 4].decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _clip(text: str | None, limit: int = MESSAGE_MAX_CHARS) -> str | None:
    if text is None:
        return None
    text = redact_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_exception(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


class _Core:
    """Everything the sync and async clients share: requests, interpretation, retry decisions, error texts."""

    def __init__(
        self,
        settings: ClientSettings,
        halt: HaltSignal | None,
        on_attempt: Callable[[Attempt], None] | None,
        rng: random.Random | None,
    ) -> None:
        if not isinstance(settings, ClientSettings):
            raise TypeError("settings must be a ClientSettings")
        install_log_redaction()
        self.settings = settings
        self.halt = halt if halt is not None else HaltSignal()
        self.on_attempt = on_attempt
        self.rng = rng if rng is not None else random.Random()
        self.timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        # Between body chunks we also check a whole-answer deadline (a server trickling bytes never hits the
        # per-read timeout).
        self.deadline_s = settings.connect_timeout_s + settings.timeout_s

    # ---- request

    def build_request(self, client: httpx.Client | httpx.AsyncClient, item: WatchedItem) -> httpx.Request:
        if not isinstance(item, WatchedItem):
            raise TypeError(f"item must be a WatchedItem, not {type(item).__name__}")
        params: dict[str, str] = {"item_id": str(item.item_id)}
        if item.spec_id:
            params["spec_id"] = item.spec_id
        headers = {"accept": "application/json"}
        token = self.settings.api_token
        if token:
            if self.settings.auth_mode == "query":
                params["apiToken"] = token
            else:
                headers["apikey"] = token
        return client.build_request("GET", self.settings.sales_url, params=params, headers=headers)

    def add_chunk(self, raw: _Raw, chunk: bytes, started: float) -> bool:
        """Append a body chunk within the cap; returns False when reading must stop (oversized).

        An oversized answer keeps only its first OVERSIZED_PREFIX_BYTES (enough to see what it was): memory stays
        bounded by the cap while reading, and nothing large is copied or stored afterwards."""
        declared = raw.headers.get("content-length", "") if raw.headers is not None and not raw.body else ""
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raw.body += chunk[:OVERSIZED_PREFIX_BYTES]  # refused on its announced size: read no further
            raw.oversized = True
            return False
        room = self.settings.max_body_bytes - len(raw.body)
        if len(chunk) > room:
            del raw.body[OVERSIZED_PREFIX_BYTES:]
            raw.oversized = True
            return False
        raw.body += chunk
        if time.perf_counter() - started > self.deadline_s:
            raise _DeadlineExceeded(f"the answer was not complete after {self.deadline_s:g} s")
        return True

    # ---- interpretation

    def interpret(
        self, item: WatchedItem, number: int, raw: _Raw, started: float, url: str
    ) -> tuple[Attempt, dict | None]:
        fetched_at = datetime.now(timezone.utc)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        body = redact_bytes(bytes(raw.body))  # stored verbatim, but for the token if the API echoed it

        if raw.error is not None:
            message = _describe_exception(raw.error)
            if raw.status is not None:
                message = f"{message}, after the headers and {len(body)} body bytes"
            attempt = Attempt(item, number, fetched_at, elapsed_ms, raw.status, None, Outcome.NETWORK, body, url,
                              _clip(message))
            return attempt, None

        status = raw.status
        assert status is not None
        if raw.oversized:
            message = f"body larger than max_body_bytes={self.settings.max_body_bytes}; stopped reading it"
            attempt = Attempt(item, number, fetched_at, elapsed_ms, status, None, Outcome.OVERSIZED, body, url,
                              _clip(message))
            return attempt, None

        parsed, problem = self._parse(body, raw.undecodable)
        body_code: int | None = None
        gateway_message: str | None = None
        api_msg: str | None = None
        data_ok = False
        if isinstance(parsed, dict):
            body_code = _to_code(parsed.get("code"))
            if parsed.get("msg") is not None:
                api_msg = str(parsed["msg"])
            if "code" not in parsed and isinstance(parsed.get("message"), str):
                gateway_message = parsed["message"]
            if "data" not in parsed:
                problem = "the JSON body has no `data`"
            else:
                data = parsed["data"]
                data_ok = data is None or isinstance(data, dict)
                if not data_ok:
                    problem = f"`data` is a JSON {_json_type(data)}, expected an object or null"
        elif parsed is not None and problem is None:
            problem = f"the JSON body is a {_json_type(parsed)}, expected an object"

        outcome = classify(status, body_code, gateway_message, data_ok)
        payload: dict | None = None
        if outcome is Outcome.SUCCESS:
            assert isinstance(parsed, dict)
            payload = parsed
            if parsed.get("data") is None:
                outcome = Outcome.NO_DATA

        if api_msg is not None:
            message = api_msg
        elif gateway_message is not None:
            message = gateway_message
        else:
            message = None
        if problem is not None and (outcome is Outcome.MALFORMED or message is None):
            if outcome not in (Outcome.SUCCESS, Outcome.NO_DATA):
                message = problem if message is None else f"{problem} (msg: {message})"
        attempt = Attempt(item, number, fetched_at, elapsed_ms, status, body_code, outcome, body, url, _clip(message))
        return attempt, payload

    @staticmethod
    def _parse(body: bytes, undecodable: bool) -> tuple[Any, str | None]:
        """(parsed JSON or None, what is wrong or None)."""
        if undecodable:
            return None, f"the body could not be decompressed; it starts: {_snippet(body)!r}"
        if body.startswith(_BOM):
            body = body[len(_BOM):]
        if not body.strip():
            return None, "empty body"
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"the body is not valid UTF-8 (byte {exc.start}); it starts: {_snippet(body)!r}"
        try:
            return json.loads(text), None
        except (ValueError, RecursionError):
            return None, f"the body is not JSON; it starts: {_snippet(body)!r}"

    # ---- decisions

    def complete(self, attempt: Attempt, attempts: list[Attempt], retry_after: float | None) -> float | None:
        """Record a finished attempt: set the halt if needed, hand it to on_attempt, and decide.

        Returns the backoff delay before the next attempt, or None when this was the last one.
        """
        attempts.append(attempt)
        action = attempt.action
        if action in (Action.HALT_RUN, Action.CONFIG_ERROR):
            # First, so that no other call starts while on_attempt runs.
            if self.halt.set(self.error_for(attempt.item, attempts)):
                logger.error("%s", self.halt.error)
        if self.on_attempt is not None:
            self.on_attempt(attempt)
        logger.debug(
            "item %s attempt %d: %s (HTTP %s, code %s) in %.0f ms",
            attempt.item, attempt.attempt, attempt.outcome.value, attempt.http_status, attempt.api_code,
            attempt.elapsed_ms,
        )
        if action is not Action.RETRY or attempt.attempt >= self.settings.max_attempts:
            return None
        return self.backoff(attempt, retry_after)

    def backoff(self, attempt: Attempt, retry_after: float | None = None) -> float:
        s = self.settings
        if retry_after is not None:
            delay = min(s.backoff_max_s, retry_after)
            source = "Retry-After"
        else:
            delay = self.rng.uniform(0.0, min(s.backoff_max_s, s.backoff_base_s * 2 ** (attempt.attempt - 1)))
            source = "backoff"
        logger.info(
            "item %s attempt %d/%d: %s (HTTP %s, code %s: %s); retrying in %.2f s (%s)",
            attempt.item, attempt.attempt, s.max_attempts, attempt.outcome.value, attempt.http_status,
            attempt.api_code, attempt.message, delay, source,
        )
        return delay

    def finish(self, item: WatchedItem, attempts: list[Attempt], payload: dict | None) -> FetchResult:
        last = attempts[-1]
        if last.outcome in (Outcome.SUCCESS, Outcome.NO_DATA):
            return FetchResult(item, attempts, last.outcome, payload, None)
        if last.action in (Action.HALT_RUN, Action.CONFIG_ERROR):
            # The error complete() put in the halt signal, unless another item halted the run first: then our own.
            error = self.halt.error
            if error is None or error.item != str(item):
                error = self.error_for(item, attempts)
        else:
            error = self.error_for(item, attempts)
            logger.warning("%s", error)
        return FetchResult(item, attempts, last.outcome, None, error)

    def halted(self, item: WatchedItem, attempts: list[Attempt]) -> FetchResult:
        cause = self.halt.error
        outcome = cause.outcome if cause is not None else Outcome.QUOTA
        done = f" after {len(attempts)} attempt(s)" if attempts else ""
        text = f"item {item} was not fetched{done}: no further API call is made because the run was halted"
        text += f": {cause}" if cause is not None else "."
        logger.info("item %s: run halted, no call made", item)
        return FetchResult(item, attempts, HALTED, None,
                           RunHaltedError(redact_text(text), outcome=outcome, item=str(item),
                                          api_msg=cause.api_msg if cause is not None else None))

    def error_for(self, item: WatchedItem, attempts: list[Attempt]) -> ApiError:
        last = attempts[-1]
        n = len(attempts)
        what = f"HTTP {last.http_status}" if last.http_status is not None else "no HTTP answer"
        if last.api_code is not None:
            what += f", code {last.api_code}"
        if last.message:
            what += f": {last.message}"
        tries = f"after {n} attempt{'s' if n != 1 else ''}"
        o = last.outcome
        s = self.settings
        if o is Outcome.QUOTA:
            text = (f"TMAPI quota exhausted (item {item}: {what}). The subscription expired or the balance is used "
                    "up; no further API call is made in this run. Top up the TMAPI balance, then run "
                    "`tmapi-assets resume`.")
        elif o is Outcome.AUTH:
            sent_as = "the apiToken query parameter" if s.auth_mode == "query" else "the apikey header"
            if not s.api_token:
                sent_as = "nothing: it is empty"
            text = (f"TMAPI refused the credentials (item {item}: {what}). No further API call is made in this run. "
                    f"Check TMAPI_API_TOKEN (sent as {sent_as}), then run `tmapi-assets resume`.")
        elif o is Outcome.CONFIG:
            text = (f"TMAPI has no such endpoint (item {item}: {what}; request {last.request_url}). No further API "
                    f"call is made in this run. Check TMAPI_BASE_URL (now {s.base_url!r}), then run "
                    "`tmapi-assets resume`.")
        elif o is Outcome.ITEM_ERROR:
            text = (f"TMAPI rejected item {item} ({what}). Not retried; the other items go on. Check that the item "
                    "id (and spec id) exist on 1688.")
        elif o is Outcome.OVERSIZED:
            text = (f"TMAPI's answer for item {item} is too large ({what}). Not retried; the other items go on. "
                    "Raise max_body_bytes if such answers are expected.")
        elif o is Outcome.MALFORMED:
            text = (f"TMAPI sent an unusable answer for item {item} {tries} ({what}); it was not taken as 'no "
                    "sales'. Try again later; report it to TMAPI if it persists.")
        elif o is Outcome.NETWORK:
            text = (f"Could not get an answer from TMAPI for item {item} {tries} ({what}). Check the network and "
                    f"TMAPI_BASE_URL (now {s.base_url!r}), or try again later.")
        else:  # TRANSIENT
            text = f"TMAPI gave a temporary error for item {item} {tries} ({what}). Try again later."
        cls = RunHaltedError if last.action in (Action.HALT_RUN, Action.CONFIG_ERROR) else ApiError
        return cls(redact_text(text), outcome=o, item=str(item), http_status=last.http_status,
                   api_msg=_clip(last.message))

    @staticmethod
    def is_overload(attempt: Attempt) -> bool:
        return attempt.outcome is Outcome.TRANSIENT and (
            attempt.http_status in _OVERLOAD_STATUSES or attempt.api_code in _OVERLOAD_STATUSES
        )


def _retry_after(raw: _Raw) -> float | None:
    """Seconds from a Retry-After header on a 503/429 answer, else None."""
    if raw.status not in _OVERLOAD_STATUSES or raw.headers is None:
        return None
    value = raw.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


# --------------------------------------------------------------------------------------------------------- sync


class TmapiClient:
    """Synchronous client (httpx.Client). Use as a context manager, or call close()."""

    def __init__(
        self,
        settings: ClientSettings,
        *,
        transport: httpx.BaseTransport | None = None,
        halt: HaltSignal | None = None,
        on_attempt: Callable[[Attempt], None] | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._core = _Core(settings, halt, on_attempt, rng)
        self.settings = settings
        self.halt = self._core.halt
        # Default sleep wakes up as soon as the halt is set (a halted run does not wait out a 20 s backoff).
        self._sleep = sleep if sleep is not None else self.halt.wait
        self._client = httpx.Client(
            transport=transport, timeout=self._core.timeout, follow_redirects=False, headers={"user-agent": _USER_AGENT},
            verify=tls_context(),
        )

    def __enter__(self) -> "TmapiClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"TmapiClient({self.settings!r})"

    def fetch(self, item: WatchedItem) -> FetchResult:
        """Fetch one item's sales statistics, retrying transient outcomes. Never raises for API/network problems."""
        core = self._core
        attempts: list[Attempt] = []
        for number in range(1, self.settings.max_attempts + 1):
            if self.halt.is_set:
                return core.halted(item, attempts)
            attempt, payload, retry_after = self._call(item, number)
            delay = core.complete(attempt, attempts, retry_after)
            if delay is None:
                return core.finish(item, attempts, payload)
            if delay > 0:
                self._sleep(delay)
        raise AssertionError("unreachable: the last attempt always finishes")

    def fetch_many(self, items: Sequence[WatchedItem]) -> list[FetchResult]:
        """Fetch items one after the other; after a halt, the rest come back "halted" without a call."""
        return [self.fetch(item) for item in items]

    def _call(self, item: WatchedItem, number: int) -> tuple[Attempt, dict | None, float | None]:
        core = self._core
        request = core.build_request(self._client, item)
        url = redact_url(request.url)
        raw = _Raw()
        started = time.perf_counter()
        try:
            response = self._client.send(request, stream=True)
            try:
                raw.status, raw.headers = response.status_code, response.headers
                for chunk in response.iter_bytes():
                    if not core.add_chunk(raw, chunk, started):
                        break
            finally:
                response.close()
        except httpx.DecodingError as exc:
            if raw.status is None:  # no answer to speak of
                raw.error = exc
            else:
                raw.undecodable = True
        except (httpx.TransportError, _DeadlineExceeded) as exc:
            raw.error = exc
        attempt, payload = core.interpret(item, number, raw, started, url)
        return attempt, payload, _retry_after(raw)


# --------------------------------------------------------------------------------------------------------- async


class AsyncTmapiClient:
    """Asynchronous client (httpx.AsyncClient) with an AdaptiveLimiter. Use as an async context manager.

    One instance belongs to one event loop.
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        halt: HaltSignal | None = None,
        on_attempt: Callable[[Attempt], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
        limiter: AdaptiveLimiter | None = None,
        call_slots: CallSlots | None = None,
    ) -> None:
        self._core = _Core(settings, halt, on_attempt, rng)
        self.call_slots = call_slots  # the host-wide cap shared with other runs (None: this client's limiter only)
        self.settings = settings
        self.halt = self._core.halt
        self.limiter = limiter if limiter is not None else AdaptiveLimiter(settings.concurrency)
        self._sleep = sleep if sleep is not None else self._halt_aware_sleep
        limits = httpx.Limits(max_connections=max(settings.concurrency, self.limiter.max_limit),
                              max_keepalive_connections=max(settings.concurrency, self.limiter.max_limit))
        self._client = httpx.AsyncClient(
            transport=transport, timeout=self._core.timeout, follow_redirects=False, limits=limits,
            headers={"user-agent": _USER_AGENT}, verify=tls_context(),
        )

    async def __aenter__(self) -> "AsyncTmapiClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.call_slots is not None:
            self.call_slots.return_spare()
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"AsyncTmapiClient({self.settings!r}, {self.limiter!r})"

    async def _halt_aware_sleep(self, delay: float) -> None:
        if self.halt.is_set:
            return
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        remove = self.halt.add_listener(lambda: loop.call_soon_threadsafe(woken.set))
        try:
            await asyncio.wait_for(woken.wait(), delay)
        except asyncio.TimeoutError:
            pass
        finally:
            remove()

    async def fetch(self, item: WatchedItem) -> FetchResult:
        """Fetch one item (holding a limiter slot only during each call). Never raises for API/network problems."""
        core = self._core
        limiter = self.limiter
        attempts: list[Attempt] = []
        for number in range(1, self.settings.max_attempts + 1):
            if self.halt.is_set:
                return core.halted(item, attempts)
            generation = await limiter.acquire()
            host_slot = None
            try:
                if self.call_slots is not None:
                    host_slot = await self.call_slots.acquire()
                if self.halt.is_set:  # set while we waited for the slot
                    return core.halted(item, attempts)
                attempt, payload, retry_after = await self._call(item, number)
                if core.is_overload(attempt):
                    limiter.on_overload(generation)
                elif attempt.outcome in (Outcome.SUCCESS, Outcome.NO_DATA):
                    limiter.on_success()
                # Still holding the slot: a halt is set before anyone waiting for a slot can start a call.
                delay = core.complete(attempt, attempts, retry_after)
            finally:
                limiter.release()  # first: the call it lets through takes this host slot (call_slots.py)
                if host_slot is not None:
                    self.call_slots.release(host_slot)
            if delay is None:
                return core.finish(item, attempts, payload)
            if delay > 0:
                await self._sleep(delay)
        raise AssertionError("unreachable: the last attempt always finishes")

    async def fetch_many(self, items: Sequence[WatchedItem]) -> list[FetchResult]:
        """Fetch items concurrently (bounded by the limiter); results in input order.

        After a halt, items not yet called come back "halted" without a call.
        """
        tasks = [asyncio.ensure_future(self.fetch(item)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _call(self, item: WatchedItem, number: int) -> tuple[Attempt, dict | None, float | None]:
        core = self._core
        request = core.build_request(self._client, item)
        url = redact_url(request.url)
        raw = _Raw()
        started = time.perf_counter()
        try:
            response = await self._client.send(request, stream=True)
            try:
                raw.status, raw.headers = response.status_code, response.headers
                async for chunk in response.aiter_bytes():
                    if not core.add_chunk(raw, chunk, started):
                        break
            finally:
                await response.aclose()
        except httpx.DecodingError as exc:
            if raw.status is None:  # no answer to speak of
                raw.error = exc
            else:
                raw.undecodable = True
        except (httpx.TransportError, _DeadlineExceeded) as exc:
            raw.error = exc
        attempt, payload = core.interpret(item, number, raw, started, url)
        return attempt, payload, _retry_after(raw)
