"""A crash-safe spool for paid API answers, between the network and DuckDB. Plain Python.

Each answer is appended to a JSON-lines file the moment it arrives (a write() to the page cache: it survives the
process being killed), then moved to tmapi.raw_responses in batches. A spool file whose writer died (its flock is
free) is loaded by the next run before it calls the API; response ids make that load idempotent.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from tmapi_assets.client import Attempt
from tmapi_assets.errors import Outcome
from tmapi_assets.ids import WatchedItem


def _encode(response_id: str, run_id: str | None, attempt: Attempt) -> bytes:
    record = {
        "response_id": response_id,
        "run_id": run_id,
        "item": attempt.item.partition_key,
        "attempt": attempt.attempt,
        "fetched_at": attempt.fetched_at.isoformat(),
        "elapsed_ms": attempt.elapsed_ms,
        "http_status": attempt.http_status,
        "api_code": attempt.api_code,
        "outcome": attempt.outcome.value,
        "body_b64": base64.b64encode(attempt.body).decode("ascii"),
        "request_url": attempt.request_url,
        "message": attempt.message,
    }
    return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


def _decode(line: bytes) -> tuple[str, str | None, Attempt]:
    record = json.loads(line)
    attempt = Attempt(
        item=WatchedItem.from_partition_key(record["item"]),
        attempt=record["attempt"],
        fetched_at=datetime.fromisoformat(record["fetched_at"]),
        elapsed_ms=record["elapsed_ms"],
        http_status=record["http_status"],
        api_code=record["api_code"],
        outcome=Outcome(record["outcome"]),
        body=base64.b64decode(record["body_b64"]),
        request_url=record["request_url"],
        message=record["message"],
    )
    return record["response_id"], record["run_id"], attempt


class Spool:
    """The spool file of one writer; held under an exclusive flock for as long as the writer lives."""

    def __init__(self, directory: Path, run_id: str | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.path = directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def append(self, attempt: Attempt) -> str:
        """Write one answer; returns its response id."""
        response_id = str(uuid.uuid4())
        os.write(self._fd, _encode(response_id, self.run_id, attempt))
        return response_id

    def close(self) -> None:
        """Remove the file: call only after everything in it is in DuckDB."""
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            self.release()

    def release(self) -> None:
        """Keep the file but drop its lock: the next run (or this step's retry) loads it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def orphans(directory: Path) -> Iterator[tuple[Path, list[tuple[str, str | None, Attempt]]]]:
    """Spool files whose writer is gone, with their answers (a torn last line is skipped). Yields while holding the
    file's lock, so two recovering processes never load the same file at once; delete it after loading."""
    if not directory.exists():
        return
    for path in sorted(directory.glob("*.jsonl")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            if not path.exists():
                continue  # loaded and removed by another process just now
            records = []
            with os.fdopen(os.dup(fd), "rb") as handle:
                for line in handle:
                    try:
                        records.append(_decode(line))
                    except (ValueError, KeyError):
                        continue  # the line being written when the writer was killed
            yield path, records
        finally:
            os.close(fd)
