"""The watchlist: data/watchlist.csv with columns item_id, spec_id, note. Plain Python.

Edited by hand or with `tmapi-assets watch`. Reading is forgiving where that is safe (a UTF-8 BOM, UTF-16 from
Excel, blank lines, surrounding spaces, duplicate rows) and strict where it is not: a bad row (or a line that is not
UTF-8) is reported with its line number and left out, and the good rows still work. `watch add`/`remove` change
only the lines they add or remove: comments and rows waiting to be fixed stay. Nothing here calls the API.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tmapi_assets.errors import InvalidInputError
from tmapi_assets.ids import WatchedItem

COLUMNS = ("item_id", "spec_id", "note")


@dataclass(frozen=True)
class WatchlistEntry:
    item: WatchedItem
    note: str = ""


@dataclass
class Watchlist:
    entries: list[WatchlistEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "line 7: item id 'abc' is not valid: ..."

    @property
    def items(self) -> list[WatchedItem]:
        return [e.item for e in self.entries]


def _decode_lines(data: bytes) -> list[tuple[bytes, str | None]]:
    """The file's physical lines: (raw bytes with their line ending, text or None if the line is not UTF-8).

    UTF-8 with or without a BOM; UTF-16 with a BOM (what Excel's "Unicode text" saves) is read whole."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            return [(line, None) for line in data.splitlines(keepends=True)]
        return [(line.encode("utf-8"), line) for line in text.splitlines(keepends=True)]
    lines = []
    for n, line in enumerate(data.splitlines(keepends=True)):
        try:
            text = line.decode("utf-8-sig" if n == 0 else "utf-8")
        except UnicodeDecodeError:
            text = None
        lines.append((line, text))
    return lines


def _parse_lines(lines: list[tuple[bytes, str | None]], source: str) -> tuple[Watchlist, list[WatchedItem | None]]:
    """The watchlist, and for each physical line the item it holds (None: blank, comment, header or bad row).

    One row per line: a note cannot span lines, so an unclosed quote never swallows the rows after it."""
    result = Watchlist()
    per_line: list[WatchedItem | None] = []
    seen: set[WatchedItem] = set()
    header_allowed = True
    for line_no, (_raw, text) in enumerate(lines, start=1):
        per_line.append(None)
        if text is None:
            result.problems.append(f"{source} line {line_no}: not UTF-8 text; save the file as \"CSV UTF-8\"; "
                                   "row skipped")
            continue
        cells = [c.strip() for c in next(csv.reader([text.rstrip("\r\n")]), [])]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if header_allowed and cells[0].lower().lstrip("\ufeff") == "item_id":
            header_allowed = False
            continue  # header
        header_allowed = False
        spec = cells[1] if len(cells) > 1 else ""
        note = ",".join(cells[2:]) if len(cells) > 2 else ""
        try:
            # ITEM:SPEC in the first column is accepted too (the CLI's form).
            item = WatchedItem.from_partition_key(cells[0]) if not spec else WatchedItem(cells[0], spec)
        except InvalidInputError as exc:
            hint = " (columns are separated by commas, not ';')" if ";" in cells[0] else ""
            result.problems.append(f"{source} line {line_no}: {exc}{hint}; row skipped")
            continue
        per_line[-1] = item
        if item in seen:
            continue
        seen.add(item)
        result.entries.append(WatchlistEntry(item, note))
    return result, per_line


def parse_watchlist(text: str, source: str = "watchlist") -> Watchlist:
    """Parse CSV text. Rows are (item_id[, spec_id[, note]]), one per line; a header row is optional; '#' starts a
    comment."""
    return _parse_lines(_decode_lines(text.encode("utf-8")), source)[0]


def read_watchlist(path: Path) -> Watchlist:
    """Read the watchlist file; a missing file is an empty watchlist."""
    if not path.exists():
        return Watchlist()
    return _parse_lines(_decode_lines(path.read_bytes()), str(path))[0]


def _row(item: WatchedItem, note: str) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([item.item_id, item.spec_id, " ".join(note.split())])
    return buffer.getvalue().encode("utf-8")


def _replace_file(path: Path, data: bytes) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file; keep the file's permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".watchlist.", suffix=".csv")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read_raw(path: Path) -> list[tuple[bytes, str | None]]:
    return _decode_lines(path.read_bytes()) if path.exists() else []


def add_items(path: Path, items: list[WatchedItem], note: str = "") -> list[WatchedItem]:
    """Add items not yet watched, as new lines at the end; every existing line (comments, rows that need fixing)
    stays as it is. Returns the ones added."""
    lines = _read_raw(path)
    current, _ = _parse_lines(lines, str(path))
    known = set(current.items)
    added = [i for i in dict.fromkeys(items) if i not in known]
    if not added:
        return []
    head = b"".join(raw for raw, _ in lines)
    if not head.strip():
        head = (",".join(COLUMNS) + "\n").encode("utf-8")
    elif not head.endswith((b"\n", b"\r")):
        head += b"\n"
    _replace_file(path, head + b"".join(_row(i, note) for i in added))
    return added


def remove_items(path: Path, items: list[WatchedItem]) -> list[WatchedItem]:
    """Remove the lines of these items (every other line stays as it is); returns the ones that were there.
    Their stored history is kept in DuckDB."""
    lines = _read_raw(path)
    current, per_line = _parse_lines(lines, str(path))
    drop = set(items)
    kept = [raw for (raw, _), item in zip(lines, per_line) if item not in drop]
    if len(kept) != len(lines):
        _replace_file(path, b"".join(kept))
    return [i for i in current.items if i in drop]
