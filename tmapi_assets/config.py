"""Settings read from the environment, in one place. Plain Python.

Every setting has a default that runs the project against the local sandbox, so a new user needs none of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import httpx

from tmapi_assets.errors import InvalidInputError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The sandbox's default address and token (see tmapi_assets/sandbox); the real API is one setting away:
# TMAPI_BASE_URL=http://api.tmapi.top (or https://api.tmapi.io) and TMAPI_API_TOKEN=<your token>.
SANDBOX_PORT = 8765
SANDBOX_BASE_URL = f"http://127.0.0.1:{SANDBOX_PORT}"
SANDBOX_TOKEN = "sandbox-token"
REAL_API_BASE_URL = "http://api.tmapi.top"


def data_dir() -> Path:
    return Path(os.environ.get("TMAPI_DATA_DIR", PROJECT_ROOT / "data"))


def duckdb_path() -> Path:
    return Path(os.environ.get("TMAPI_DUCKDB_PATH", data_dir() / "tmapi.duckdb"))


def read_copy_path() -> Path | None:
    """The published read-only copy for BI tools and dbt ('' disables publishing)."""
    value = os.environ.get("TMAPI_READ_COPY_PATH")
    if value == "":
        return None
    return Path(value) if value else data_dir() / "tmapi_read.duckdb"


def fresh_within_hours() -> float:
    """An item fetched successfully this recently costs no call on the next refresh unless forced."""
    return env_float("TMAPI_FRESH_WITHIN_HOURS", 20.0)


def duckdb_lock_timeout_s() -> float:
    """How long one DuckDB write waits for another process holding the file."""
    return env_float("TMAPI_DUCKDB_LOCK_TIMEOUT_S", 60.0)


def watchlist_path() -> Path:
    return Path(os.environ.get("TMAPI_WATCHLIST", data_dir() / "watchlist.csv"))


def base_url() -> str:
    return os.environ.get("TMAPI_BASE_URL", SANDBOX_BASE_URL)


def api_token() -> str:
    """TMAPI_API_TOKEN; the sandbox's token only when the API is local, so it never goes to the real API."""
    token = os.environ.get("TMAPI_API_TOKEN", "")
    if not token and is_local(base_url()):
        return SANDBOX_TOKEN
    return token


def is_local(url: str) -> bool:
    return httpx.URL(url).host in ("127.0.0.1", "localhost", "::1") if "://" in url else False


def api_concurrency() -> int:
    """TMAPI_CONCURRENCY: the API's concurrency cap, calls in flight on this machine across all runs."""
    return env_int("TMAPI_CONCURRENCY", 4)


def auth_mode() -> str:
    """TMAPI_AUTH_MODE: 'query' (?apiToken=) or 'header' (apikey:)."""
    value = os.environ.get("TMAPI_AUTH_MODE", "") or "query"
    if value not in ("query", "header"):
        raise InvalidInputError(f"TMAPI_AUTH_MODE={value!r}: use 'query' (?apiToken=...) or 'header' (apikey: ...)")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    return _env_number(name, default, float, "a number", minimum)


def env_int(name: str, default: int, minimum: int = 1) -> int:
    return _env_number(name, default, int, "a whole number", minimum)


def _env_number(name: str, default, kind, what: str, minimum):
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = kind(value)
    except ValueError:
        raise InvalidInputError(f"{name}={value!r} is not {what}; unset it to use the default {default}") from None
    if not math.isfinite(number) or number < minimum:  # "inf", "nan", 0 calls in flight, ...
        raise InvalidInputError(f"{name}={value!r} must be {what} >= {minimum}; unset it to use the default {default}")
    return number
