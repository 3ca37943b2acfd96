"""Keep the TMAPI token out of every URL, message and log line we produce.

Plain Python (no Dagster import). Three tools:

- ``redact_url(url)``: the URL with every ``apiToken`` query value (any letter case) replaced by ``***``.
- ``register_secret(value)`` / ``redact_text(text)``: a process-wide registry of secret strings; ``redact_text``
  replaces each registered secret (also in its percent-encoded forms) and every ``apiToken=...`` query value by
  ``***``; ``redact_bytes`` does the same to a response body before it is stored.
- ``install_log_redaction()``: idempotent; puts a ``logging.Filter`` on the loggers of httpx, httpcore and this
  project that rewrites each record's message (and formatted traceback) into its redacted form before any handler
  sees it. httpx logs ``HTTP Request: GET http://...?apiToken=SECRET "HTTP/1.1 200 OK"`` at INFO for every call.

Why filters on named loggers and not on handlers: a logger's filters run in ``Logger.handle`` before the record is
passed to any handler (root, Dagster's, pytest's caplog, handlers added later). But a logger's filters only see the
records created on that very logger, not records propagating from its children, so each logger that httpx and
httpcore actually log to is listed in ``REDACTED_LOGGERS``.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

MASK = "***"

# The loggers httpx/httpcore create records on (httpcore uses one child logger per module), and ours.
REDACTED_LOGGERS: tuple[str, ...] = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.connection_pool",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
    "tmapi_assets",
    "tmapi_assets.client",
)

# apiToken=VALUE in a query string (any case; also the apikey / api_token spellings), up to the next separator.
_QUERY_TOKEN = re.compile(r"(?i)(\b(?:api_?token|apikey)=)[^&#\s\"'<>()\[\],;]*")
_TOKEN_KEYS = frozenset({"apitoken", "api_token", "apikey"})

_lock = threading.Lock()
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Remember ``value`` as a secret: ``redact_text`` replaces it (and its URL-encoded forms) with ``***``."""
    global _secret_pattern
    if value is None:
        return
    value = str(value)
    if not value.strip():
        return
    variants = {value, quote(value, safe=""), quote_plus(value, safe="")}
    with _lock:
        if variants <= _secrets:
            return
        _secrets.update(variants)
        # Longest first, so that a secret containing another one is replaced as a whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_pattern = re.compile("|".join(re.escape(s) for s in ordered))


def redact_text(text: Any) -> str:
    """``text`` (made a str) with every registered secret and every ``apiToken=...`` value replaced by ``***``."""
    if not isinstance(text, str):
        text = str(text)
    pattern = _secret_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return _QUERY_TOKEN.sub(lambda m: m.group(1) + MASK, text)


def redact_bytes(data: bytes) -> bytes:
    """``data`` with every registered secret (as UTF-8) replaced by ``***``: for response bodies, which are stored,
    and which an API or gateway may echo the token in (an error page quoting the request URL)."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        encoded = secret.encode("utf-8")
        if encoded in data:
            data = data.replace(encoded, MASK.encode("ascii"))
    return data


def redact_url(url: Any) -> str:
    """The URL as a string with every ``apiToken`` query value (case-insensitive) and any password replaced by ``***``.

    Accepts a str or an ``httpx.URL``; the rest of the URL is kept as it was (same order, same encoding).
    """
    text = str(url)
    base, hash_sign, fragment = text.partition("#")
    path, question, query = base.partition("?")
    path = _redact_userinfo(path)
    if question:
        pairs = []
        for pair in query.split("&"):
            key, eq, _value = pair.partition("=")
            if eq and unquote_plus(key).strip().lower() in _TOKEN_KEYS:
                pairs.append(f"{key}={MASK}")
            else:
                pairs.append(pair)
        query = "&".join(pairs)
    return redact_text(f"{path}{question}{query}{hash_sign}{fragment}")


def _redact_userinfo(url_without_query: str) -> str:
    scheme, sep, rest = url_without_query.partition("://")
    if not sep:
        return url_without_query
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url_without_query
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:{MASK}@{host}{slash}{path}"


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (msg % args) and formatted traceback into their redacted form. Never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API name
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what we can show, redacted
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = redact_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_FILTER = RedactingFilter()
_installed: set[str] = set()


def install_log_redaction(extra_loggers: tuple[str, ...] = ()) -> None:
    """Add the redacting filter to the httpx/httpcore/tmapi_assets loggers (and ``extra_loggers``). Idempotent."""
    with _lock:
        for name in (*REDACTED_LOGGERS, *extra_loggers):
            if name in _installed:
                continue
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
            _installed.add(name)
