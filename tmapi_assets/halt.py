"""The API halt, persisted: after a quota (439), credential or wrong-URL answer, no process makes another call until an
operator runs `tmapi-assets resume` or the configured time passes. Plain Python.

The halt lives in a small JSON file (data/api_halt.json), not in DuckDB: sensors, schedules and every run in flight
can read it at any moment without waiting for the warehouse's write lock. A run checks it before each API call, so
other runs stop within one call of the first halt.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tmapi_assets import config
from tmapi_assets.client import HaltSignal
from tmapi_assets.errors import ApiError, Outcome, RunHaltedError

DEFAULT_HALT_HOURS = 12.0

_WHAT_TO_DO = {
    Outcome.QUOTA.value: "top up the TMAPI balance or renew the subscription, then run `tmapi-assets resume`",
    Outcome.AUTH.value: "check TMAPI_API_TOKEN (and TMAPI_AUTH_MODE), then run `tmapi-assets resume`",
    Outcome.CONFIG.value: "check TMAPI_BASE_URL, then run `tmapi-assets resume`",
}


def halt_path() -> Path:
    return config.data_dir() / "api_halt.json"


def halt_hours() -> float:
    return config.env_float("TMAPI_HALT_HOURS", DEFAULT_HALT_HOURS)


@dataclass(frozen=True)
class HaltRecord:
    outcome: str  # errors.Outcome value: quota_exhausted, auth_error or config_error
    message: str  # the error text (token-free)
    since: str  # ISO instant (UTC)
    until: str  # ISO instant (UTC) after which calls may be tried again
    run_id: str | None = None

    @property
    def what_to_do(self) -> str:
        return _WHAT_TO_DO.get(self.outcome, "run `tmapi-assets resume` once the cause is fixed")

    def active(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(timezone.utc)) < datetime.fromisoformat(self.until)

    def describe(self) -> str:
        return (
            f"API calls halted since {self.since} ({self.outcome}): {self.message.rstrip('.')}. "
            f"Calls resume automatically after {self.until}; to resume earlier: {self.what_to_do}."
        )

    def as_error(self) -> RunHaltedError:
        return RunHaltedError(self.describe(), outcome=Outcome(self.outcome))


def read_halt(path: Path | None = None) -> HaltRecord | None:
    """The active halt, or None. An expired or unreadable file counts as no halt (and says so once, when cleared)."""
    path = path or halt_path()
    try:
        record = HaltRecord(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return None
    return record if record.active() else None


def write_halt(error: ApiError, run_id: str | None = None, path: Path | None = None) -> HaltRecord:
    """Persist a halt (atomically: a reader never sees half a file). Keeps an existing active halt."""
    path = path or halt_path()
    existing = read_halt(path)
    if existing is not None:
        return existing
    now = datetime.now(timezone.utc)
    record = HaltRecord(
        outcome=error.outcome.value,
        message=str(error)[:1000],
        since=now.isoformat(timespec="seconds"),
        until=(now + timedelta(hours=halt_hours())).isoformat(timespec="seconds"),
        run_id=run_id,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".api_halt.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(asdict(record), handle, ensure_ascii=False, indent=1)
    os.replace(tmp, path)
    return record


def clear_halt(path: Path | None = None) -> HaltRecord | None:
    """Remove the halt; returns the record that was there (active or not)."""
    path = path or halt_path()
    try:
        record = HaltRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, TypeError):
        record = None
    path.unlink(missing_ok=True)
    return record


class PersistentHalt(HaltSignal):
    """A HaltSignal that is also set by a halt file written by any other process, and writes one when set here."""

    def __init__(self, run_id: str | None = None, path: Path | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.path = path or halt_path()

    @property
    def is_set(self) -> bool:
        if super().is_set:
            return True
        # One stat() per API call: cheap, and it makes another run's halt stop this one within one call.
        if self.path.exists():
            record = read_halt(self.path)
            if record is not None:
                super().set(record.as_error())
                return True
        return False

    def set(self, error: ApiError) -> bool:
        first = super().set(error)
        if first:
            write_halt(error, self.run_id, self.path)
        return first
