"""The watchlist: data/watchlist.csv with columns item_id, spec_id, note. Plain Python.

Edited by hand or with `tmapi-assets watch`. Reading is forgiving where that is safe (a UTF-8 BOM, blank lines,
surrounding spaces, duplicate rows) and strict where it is not: a bad row is reported with its line number and
left out, and the good rows still work. Nothing here calls the API.
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


def parse_watchlist(text: str, source: str = "watchlist") -> Watchlist:
    """Parse CSV text. Rows are (item_id[, spec_id[, note]]); a header row is optional; '#' starts a comment."""
    text = text.lstrip("\ufeff")
    result = Watchlist()
    seen: set[WatchedItem] = set()
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if line_no == 1 and cells[0].lower() == "item_id":
            continue  # header
        spec = cells[1] if len(cells) > 1 else ""
        note = ",".join(cells[2:]) if len(cells) > 2 else ""
        try:
            # ITEM:SPEC in the first column is accepted too (the CLI's form).
            item = WatchedItem.from_partition_key(cells[0]) if not spec else WatchedItem(cells[0], spec)
        except InvalidInputError as exc:
            result.problems.append(f"{source} line {line_no}: {exc}; row skipped")
            continue
        if item in seen:
            continue
        seen.add(item)
        result.entries.append(WatchlistEntry(item, note))
    return result


def read_watchlist(path: Path) -> Watchlist:
    """Read the watchlist file; a missing file is an empty watchlist."""
    if not path.exists():
        return Watchlist()
    return parse_watchlist(path.read_text(encoding="utf-8-sig"), source=str(path))


def write_watchlist(path: Path, entries: list[WatchlistEntry]) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for entry in entries:
        writer.writerow([entry.item.item_id, entry.item.spec_id, entry.note])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".watchlist.", suffix=".csv")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)


def add_items(path: Path, items: list[WatchedItem], note: str = "") -> list[WatchedItem]:
    """Add items not yet watched; returns the ones added."""
    current = read_watchlist(path)
    known = set(current.items)
    added = [i for i in dict.fromkeys(items) if i not in known]
    write_watchlist(path, current.entries + [WatchlistEntry(i, note) for i in added])
    return added


def remove_items(path: Path, items: list[WatchedItem]) -> list[WatchedItem]:
    """Remove items; returns the ones that were there. Their stored history is kept in DuckDB."""
    current = read_watchlist(path)
    drop = set(items)
    write_watchlist(path, [e for e in current.entries if e.item not in drop])
    return [e.item for e in current.entries if e.item in drop]
