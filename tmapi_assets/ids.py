"""Watched item identity: validation of item and spec ids, and the Dagster partition key they map to.

Plain Python (no Dagster import). An item is watched as a whole (no spec) or as one SKU spec of it.
"No spec" is stored as the empty string, never NULL, so that (item_id, spec_id, date) works as a key in DuckDB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tmapi_assets.errors import InvalidInputError

# 1688 item ids are 12-13 digit numbers today; 19 digits is the most a DuckDB BIGINT holds.
_ITEM_ID = re.compile(r"[1-9][0-9]{0,18}")
# Spec ids seen are 32-hex SKU ids. Letters, digits, '_' and '-' keep partition keys safe in the Dagster UI
# (which reserves ',', '[', ']', '...' and '|') and in URLs.
_SPEC_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_KEY_SEPARATOR = ":"
_OFFER_URL = re.compile(r"^https?://[^/]*1688\.com/offer/([1-9][0-9]{0,18})\.html", re.IGNORECASE)
_MAX_ITEM_ID = 2**63 - 1


def parse_item_id(value: object) -> int:
    """Return a valid item id as int, or raise InvalidInputError saying what is wrong."""
    text = str(value).strip() if value is not None else ""
    if not text:
        raise InvalidInputError("item id is empty; give the numeric 1688 item id, e.g. 652702302959")
    if not _ITEM_ID.fullmatch(text) or int(text) > _MAX_ITEM_ID:
        raise InvalidInputError(
            f"item id {text[:40]!r} is not valid: it must be a whole number from 1 to {_MAX_ITEM_ID} without sign "
            "or leading zero, e.g. 652702302959 (the number in detail.1688.com/offer/<id>.html)"
        )
    return int(text)


def parse_spec_id(value: object) -> str:
    """Return a valid spec id ('' for none), or raise InvalidInputError."""
    if value is None:
        return ""
    text = str(value).strip()
    if text == "":
        return ""
    if not _SPEC_ID.fullmatch(text):
        raise InvalidInputError(
            f"spec id {text[:80]!r} is not valid: use 1-64 letters, digits, '_' or '-' "
            "(the SKU specid from the item-detail API, usually 32 hex characters)"
        )
    return text


@dataclass(frozen=True, order=True)
class WatchedItem:
    """One watched (item, spec) pair; spec_id '' means the item as a whole."""

    item_id: int
    spec_id: str = ""

    def __post_init__(self) -> None:
        # Re-validate so that no invalid id can be built by hand and reach an API call.
        object.__setattr__(self, "item_id", parse_item_id(self.item_id))
        object.__setattr__(self, "spec_id", parse_spec_id(self.spec_id))

    @property
    def partition_key(self) -> str:
        """'652702302959' or '652702302959:<spec>': reversible with from_partition_key."""
        if self.spec_id:
            return f"{self.item_id}{_KEY_SEPARATOR}{self.spec_id}"
        return str(self.item_id)

    @classmethod
    def from_partition_key(cls, key: str) -> "WatchedItem":
        """Parse 'ITEM' or 'ITEM:SPEC' (the CLI's and the partition key's form)."""
        text = str(key).strip()
        item_text, sep, spec_text = text.partition(_KEY_SEPARATOR)
        if sep and not spec_text:
            raise InvalidInputError(f"{text!r}: nothing after ':'; write ITEM or ITEM:SPEC")
        return cls(parse_item_id(item_text), parse_spec_id(spec_text))

    parse = from_partition_key

    @classmethod
    def from_user_input(cls, text: str) -> "WatchedItem":
        """ITEM, ITEM:SPEC, or an item page URL as copied from the browser (detail.1688.com/offer/ITEM.html)."""
        match = _OFFER_URL.search(str(text))
        return cls(int(match.group(1))) if match else cls.from_partition_key(text)

    def __str__(self) -> str:
        return self.partition_key
