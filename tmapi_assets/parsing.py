"""The `data` object of a successful TMAPI "1688 sales statistics" response -> typed rows.

Plain Python (no Dagster, no DuckDB). Everything here is pure and deterministic: the same body always gives the same
rows, whatever the machine's local time zone (nothing here reads local time).

What the API sends (see docs and /work/shared/notes/tmapi-api-facts.md)::

    {"publish_time": "2024-06-27 09:22:26",          # China time, no zone
     "sales_quantity_30days": 3985,
     "sales_quantity_total": "1.5万+",                 # display text, approximate; sometimes mojibake "1.5ä¸‡+"
     "order_quantity_total": "3500+",
     "sales_trend": [{"date": "2025-06-24", "sales_quantity": 136, "order_quantity": 12}, ...],
     "price_trend": [{"date": "2025-06-24", "price_min": "11.0", "price_max": "11.0"}, ...]}

The same field may arrive as int or string; "no value" may arrive as null, "" or the string "null". Anything that
does not fit is refused with MalformedDataError naming the field (e.g. ``data.sales_trend[3].sales_quantity``) and a
short repr of the value. Display totals are the exception: they are free text for humans, so text we cannot read is
kept raw with lower_bound None instead of failing the whole response.

Hot path: parse_statistics() is written for ~10^5-10^6 rows per run: per-row work is type checks, dict look-ups in
small bounded caches (dates and price strings repeat a lot) and no regex.
"""

from __future__ import annotations

import math
import re
import reprlib
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from operator import attrgetter
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tmapi_assets.errors import TmapiError

__all__ = [
    "MAX_INT",
    "MAX_PRICE",
    "MAX_PRICE_DECIMALS",
    "SHANGHAI",
    "DisplayCount",
    "MalformedDataError",
    "ParsedStatistics",
    "PriceDay",
    "SalesDay",
    "Sum30Check",
    "TrendDay",
    "decode_body",
    "parse_display_count",
    "parse_price",
    "parse_publish_time",
    "parse_quantity",
    "parse_statistics",
    "parse_trend_date",
]

try:
    SHANGHAI = ZoneInfo("Asia/Shanghai")
except ZoneInfoNotFoundError:  # pragma: no cover - no tz database at all (slim image without tzdata)
    # China has had no DST since 1991: a fixed +08:00 is exact for every date this API can return.
    SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")  # type: ignore[assignment]

# Largest count we accept: a DuckDB BIGINT.
MAX_INT = 2**63 - 1
# Prices are CNY with 1-2 decimals; these limits refuse garbage and anything the warehouse's DECIMAL(18, 4) would
# have to round or could not hold.
MAX_PRICE = Decimal(10) ** 12
MAX_PRICE_DECIMALS = 4

_MIN_YEAR, _MAX_YEAR = 1900, 2199  # publish_time sanity range
_NULL_WORDS = frozenset({"", "null", "none", "undefined"})
_MAX_REPR = 80


# --------------------------------------------------------------------------------------------------------- errors


def _short_repr(value: object) -> str:
    """repr(value) cut to at most 80 characters, cheap even for huge or deeply nested values."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
            text = f"<int with {value.bit_length()} bits>"
        else:
            text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a repr must never hide the real error
        text = f"<{type(value).__name__}>"
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return text


_REPR = reprlib.Repr()
_REPR.maxstring = _MAX_REPR
_REPR.maxother = _MAX_REPR
_REPR.maxlong = 60
_REPR.maxlevel = 3
_NO_VALUE = object()


class MalformedDataError(TmapiError, ValueError):
    """A successful response whose body or `data` does not have the documented shape.

    ``field`` is the path of the offending value (``data.sales_trend[3].date``), ``problem`` what is wrong with it and
    ``value_repr`` a short (<= 80 chars) repr of the value as received (None when there is no single value to show).
    """

    def __init__(self, problem: str, *, field: str | None = None, value: object = _NO_VALUE) -> None:
        self.problem = problem
        self.field = field
        self.value_repr = None if value is _NO_VALUE else _short_repr(value)
        super().__init__(self._text())

    def _text(self) -> str:
        text = f"{self.field}: {self.problem}" if self.field else self.problem
        if self.value_repr is not None:
            text += f" (got {self.value_repr})"
        return text

    def at(self, prefix: str) -> MalformedDataError:
        """The same error with its field path placed under ``prefix`` (e.g. 'data.sales_trend[3]')."""
        new = MalformedDataError(self.problem, field=f"{prefix}.{self.field}" if self.field else prefix)
        new.value_repr = self.value_repr
        new.args = (new._text(),)
        return new

    def __reduce__(self):  # keep it picklable despite the keyword-only constructor
        return (_rebuild_error, (self.problem, self.field, self.value_repr))


def _rebuild_error(problem: str, field: str | None, value_repr: str | None) -> MalformedDataError:
    err = MalformedDataError(problem, field=field)
    err.value_repr = value_repr
    err.args = (err._text(),)
    return err


# ----------------------------------------------------------------------------------------------------------- body


def decode_body(raw: bytes) -> str:
    """Decode a response body as UTF-8 (the only encoding JSON allows), dropping a leading UTF-8 BOM.

    Invalid UTF-8 raises MalformedDataError; the body is never guessed into another encoding (that is how "1.5万+"
    becomes "1.5ä¸‡+" in the first place).
    """
    if isinstance(raw, str):
        return raw.removeprefix("\ufeff")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedDataError("body must be bytes", field="body", value=raw)
    try:
        return bytes(raw).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = max(exc.start - 10, 0)
        snippet = bytes(exc.object[start : exc.start + 10])
        raise MalformedDataError(
            f"body is not valid UTF-8 (byte {exc.start} of {len(exc.object)}: {exc.reason}; bytes around it "
            f"{snippet!r}); the response cannot be trusted, retry or report it"
        ) from None


# -------------------------------------------------------------------------------------------------- display counts


@dataclass(frozen=True, slots=True)
class DisplayCount:
    """A total as 1688 displays it ("1.5万+"), with the number it stands for.

    raw: the value as the API sent it (str(int) for numbers; mojibake kept as sent), None when absent/null.
    lower_bound: the number the display stands for (15000 for "1.5万+"); None when absent or unreadable.
    is_lower_bound: True for an approximate display ("+" or a 千/万/亿/k/w unit), False for an exact number,
        None when lower_bound is None.
    """

    raw: str | None
    lower_bound: int | None
    is_lower_bound: bool | None


_UNIT = {
    "千": 1_000,
    "k": 1_000,
    "K": 1_000,
    "万": 10_000,
    "w": 10_000,
    "W": 10_000,
    "百万": 1_000_000,
    "千万": 10_000_000,
    "亿": 100_000_000,
}
_DIGIT_TOKEN = re.compile(r"[0-9]+(?:[.,][0-9]+)*")
_NUMBER = re.compile(r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")
_SUFFIX = re.compile(r"\s*(百万|千万|千|万|亿|[kKwW](?![A-Za-z]))?\s*(\+|以上|多)?")
_MAX_NUMBER_TOKEN = 40
_MAX_DISPLAY_TEXT = 200  # the raw text is stored as sent; a "total" longer than this is garbage
_DISPLAY_CACHE: dict[str, DisplayCount] = {}
_CACHE_LIMIT = 4096


def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" or "\uf900" <= ch <= "\ufaff" for ch in text)


def _unmojibake_once(text: str) -> str | None:
    """Undo one round of 'UTF-8 bytes decoded as Windows-1252 (or Latin-1)'. None when that is not what it is."""
    try:
        data = text.encode("cp1252")
    except UnicodeEncodeError:
        # cp1252 leaves 0x81 0x8D 0x8F 0x90 0x9D undefined; decoders map them (and Latin-1 maps 0x80-0x9F) to C1
        # controls U+0080-U+009F. Encode char by char: cp1252 where possible, else the Latin-1 byte.
        out = bytearray()
        for ch in text:
            try:
                out += ch.encode("cp1252")
            except UnicodeEncodeError:
                if ord(ch) > 0xFF:
                    return None
                out.append(ord(ch))
        data = bytes(out)
    try:
        fixed = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return fixed if fixed != text else None


def _repair_mojibake(text: str) -> str:
    """'1.5ä¸‡+' -> '1.5万+' when the repair yields CJK text; any other text comes back unchanged."""
    if text.isascii() or _has_cjk(text) or not any("\u00c2" <= ch <= "\u00f4" for ch in text):
        return text
    current = text
    for _ in range(3):  # also undoes double mojibake
        fixed = _unmojibake_once(current)
        if fixed is None:
            return text
        if _has_cjk(fixed):
            return fixed
        current = fixed
    return text


def _read_display(text: str) -> tuple[int, bool] | None:
    """(lower bound, approximate?) for display text, or None when it does not hold exactly one readable number."""
    text = _repair_mojibake(text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)  # full-width digits, '＋', '，'
    tokens = list(_DIGIT_TOKEN.finditer(text))
    if len(tokens) != 1:
        return None  # no number, or several ("1-2万", "12 34", "1,5万"): ambiguous, do not guess
    token = tokens[0]
    number = token.group()
    if len(number) > _MAX_NUMBER_TOKEN or not _NUMBER.fullmatch(number):
        return None
    before = text[: token.start()].rstrip()
    if before.endswith(("-", ".", "−")):
        return None  # negative or ".5": not a count
    suffix = _SUFFIX.match(text, token.end())
    unit, plus = suffix.group(1), suffix.group(2)
    value = Decimal(number.replace(",", ""))
    if unit is None:
        if "." in number:
            return None  # "12.5" pieces: not a count
        lower = int(value)
    else:
        lower = int(value * _UNIT[unit])  # exact Decimal arithmetic; int() floors a non-negative value
    if lower > MAX_INT:
        return None
    return lower, bool(plus) or unit is not None


def parse_display_count(value: object) -> DisplayCount:
    """'1.5万+' -> DisplayCount('1.5万+', 15000, True); 3985 -> DisplayCount('3985', 3985, False).

    None -> all None; text without a readable number -> DisplayCount(text, None, None) (kept, not an error).
    Wrong JSON types (bool, list, object), negative or fractional numbers raise MalformedDataError.
    """
    if value is None:
        return DisplayCount(None, None, None)
    if type(value) is str:
        cached = _DISPLAY_CACHE.get(value)
        if cached is not None:
            return cached
        if len(value) > _MAX_DISPLAY_TEXT:
            raise MalformedDataError(
                f"is longer than {_MAX_DISPLAY_TEXT} characters: not a display total",
                field="display count",
                value=value,
            )
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # json.loads lets lone surrogates ("\ud800") through; they cannot be stored
                raise MalformedDataError("is not valid Unicode text", field="display count", value=value) from None
        read = _read_display(value)
        result = DisplayCount(value, None, None) if read is None else DisplayCount(value, read[0], read[1])
        if len(_DISPLAY_CACHE) >= _CACHE_LIMIT:
            _DISPLAY_CACHE.clear()
        _DISPLAY_CACHE[value] = result
        return result
    if isinstance(value, str):  # str subclass
        return parse_display_count(str(value))
    number = _integral_number(value, "display count")
    return DisplayCount(str(value), number, False)


# ---------------------------------------------------------------------------------------------- numbers and prices


def _integral_number(value: object, what: str) -> int:
    """A JSON number (int, integral float, integral Decimal) as a non-negative int <= MAX_INT; else raise."""
    if isinstance(value, bool):
        raise MalformedDataError("must be a number, not a boolean", field=what, value=value)
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise MalformedDataError("must be a whole number", field=what, value=value)
        number = int(value)
    elif isinstance(value, Decimal):
        if not value.is_finite() or value != value.to_integral_value():
            raise MalformedDataError("must be a whole number", field=what, value=value)
        if value.adjusted() > 19:  # before int(): Decimal('1E+1000000') would build a million-digit int
            raise MalformedDataError(f"is too large (more than {MAX_INT})", field=what, value=value)
        number = int(value)
    else:
        raise MalformedDataError(
            f"must be a number or numeric string, not {type(value).__name__}", field=what, value=value
        )
    if number < 0:
        raise MalformedDataError("must not be negative", field=what, value=value)
    if number > MAX_INT:
        raise MalformedDataError(f"is too large (more than {MAX_INT})", field=what, value=value)
    return number


def parse_quantity(value: object) -> int | None:
    """A count of pieces/orders: 12, "12", 12.0, "12.0" -> 12; None, "", "null" -> None.

    Negative, fractional, boolean, too large (> MAX_INT) or non-numeric values raise MalformedDataError.
    """
    if type(value) is int and 0 <= value <= MAX_INT:
        return value
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            digits = text.lstrip("0") or "0"
            if len(digits) > 19 or int(digits) > MAX_INT:  # length first: int() of 5000 digits raises
                raise MalformedDataError(f"is too large (more than {MAX_INT})", field="quantity", value=value)
            return int(digits)
        if text.casefold() in _NULL_WORDS:
            return None
        head, dot, tail = text.partition(".")
        if dot and head.isascii() and head.isdigit() and tail and tail.isascii() and tail.strip("0") == "":
            return parse_quantity(head)  # "12.0"
        if text.startswith("-") and text[1:].strip().replace(".", "", 1).isdigit():
            raise MalformedDataError("must not be negative", field="quantity", value=value)
        raise MalformedDataError("is not a whole number", field="quantity", value=value)
    return _integral_number(value, "quantity")


_PRICE_CACHE: dict[str, Decimal | None] = {}
_MISS = object()


def _check_price(price: Decimal, value: object) -> Decimal:
    if not price.is_finite():
        raise MalformedDataError("must be a finite number", field="price", value=value)
    if price < 0:
        raise MalformedDataError("must not be negative", field="price", value=value)
    if price >= MAX_PRICE:
        raise MalformedDataError(f"is too large (at least {MAX_PRICE})", field="price", value=value)
    exponent = price.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_PRICE_DECIMALS:
        raise MalformedDataError(f"has more than {MAX_PRICE_DECIMALS} decimals", field="price", value=value)
    return price


def _parse_price_text(value: str) -> Decimal | None:
    text = value.strip()
    head, dot, tail = text.partition(".")
    if text.isascii() and head.isdigit() and (not dot or tail.isdigit()):
        if len(head.lstrip("0")) > 12:
            raise MalformedDataError(f"is too large (at least {MAX_PRICE})", field="price", value=value)
        if len(tail) > MAX_PRICE_DECIMALS:
            raise MalformedDataError(f"has more than {MAX_PRICE_DECIMALS} decimals", field="price", value=value)
        return Decimal(text)
    if text.casefold() in _NULL_WORDS:
        return None
    if text.startswith("-"):
        try:
            Decimal(text)
        except InvalidOperation:
            pass
        else:
            raise MalformedDataError("must not be negative", field="price", value=value)
    raise MalformedDataError("is not a decimal number like '11.0'", field="price", value=value)


def parse_price(value: object) -> Decimal | None:
    """'11.0' -> Decimal('11.0'); 12 / 12.5 -> Decimal('12') / Decimal('12.5'); None, '', ' ', 'null' -> None.

    Negative, NaN, infinite, boolean, non-numeric, > MAX_PRICE or > MAX_PRICE_DECIMALS decimals raise
    MalformedDataError. Never goes through float for strings.
    """
    if type(value) is str:
        cached = _PRICE_CACHE.get(value, _MISS)
        if cached is not _MISS:
            return cached  # type: ignore[return-value]
        result = _parse_price_text(value)
        if len(_PRICE_CACHE) >= _CACHE_LIMIT:
            _PRICE_CACHE.clear()
        if len(value) <= 40:
            _PRICE_CACHE[value] = result
        return result
    if value is None:
        return None
    if isinstance(value, bool):
        raise MalformedDataError("must be a number, not a boolean", field="price", value=value)
    if isinstance(value, str):
        return _parse_price_text(str(value))
    if isinstance(value, int):
        if value > MAX_PRICE:
            raise MalformedDataError(f"is too large (at least {MAX_PRICE})", field="price", value=value)
        return _check_price(Decimal(value), value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedDataError("must be a finite number", field="price", value=value)
        return _check_price(Decimal(str(value)), value)  # str(): the shortest repr, "12.5" not 12.5000000000001
    if isinstance(value, Decimal):
        return _check_price(value, value)
    raise MalformedDataError(
        f"must be a number or numeric string, not {type(value).__name__}", field="price", value=value
    )


# ------------------------------------------------------------------------------------------------- dates and times

_DATE_CACHE: dict[str, date] = {}


def _strict_date(text: str) -> date:
    """'YYYY-MM-DD' exactly (no time, no spaces, no other layout); ValueError otherwise."""
    if (
        len(text) != 10
        or text[4] != "-"
        or text[7] != "-"
        or not text.isascii()
        or not (text[:4] + text[5:7] + text[8:]).isdigit()
    ):
        raise ValueError("not YYYY-MM-DD")
    return date(int(text[:4]), int(text[5:7]), int(text[8:]))


def parse_trend_date(value: object) -> date:
    """'2025-06-24' -> date(2025, 6, 24). A China calendar date: never converted through any time zone.

    Anything but a real 'YYYY-MM-DD' date (None, '', '2025-13-01', '2025-6-24', '2025-06-24 00:00:00', numbers)
    raises MalformedDataError.
    """
    if type(value) is str:
        cached = _DATE_CACHE.get(value)
        if cached is not None:
            return cached
        try:
            result = _strict_date(value)
        except ValueError:
            raise MalformedDataError(
                "must be a real calendar date written YYYY-MM-DD", field="date", value=value
            ) from None
        if len(_DATE_CACHE) >= _CACHE_LIMIT:
            _DATE_CACHE.clear()
        _DATE_CACHE[value] = result
        return result
    if value is None:
        raise MalformedDataError("is missing", field="date", value=value)
    if isinstance(value, str):
        return parse_trend_date(str(value))
    raise MalformedDataError(f"must be a 'YYYY-MM-DD' string, not {type(value).__name__}", field="date", value=value)


def parse_publish_time(value: object) -> datetime | None:
    """'2024-06-27 09:22:26' (China time, no zone) -> datetime(2024, 6, 27, 9, 22, 26, tzinfo=SHANGHAI).

    Also 'YYYY-MM-DD' (midnight China time), ISO 'YYYY-MM-DDTHH:MM[:SS[.ffffff]]', 'YYYY/MM/DD ...', and an explicit
    offset ('...+08:00', '...Z'), which is honoured and converted to SHANGHAI. None, '', 'null' and the MySQL zero
    date '0000-00-00 00:00:00' -> None. Anything else raises MalformedDataError.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedDataError(
            f"must be a 'YYYY-MM-DD HH:MM:SS' string, not {type(value).__name__}",
            field="publish_time",
            value=value,
        )
    text = value.strip()
    size = len(text)
    if size >= 10 and text[4] == "/" and text[7] == "/":
        text = f"{text[:4]}-{text[5:7]}-{text[8:]}"
    try:
        # Only the extended layouts: fromisoformat alone would also take '20240627', '2024-W26-4', '2024-06-27 09'.
        if not (
            10 <= size <= 40
            and text[4] == "-"
            and text[7] == "-"
            and text.isascii()
            and text[:4].isdigit()
            and (size == 10 or (text[10] in " T" and size >= 16 and text[13] == ":"))
        ):
            raise ValueError("layout")
        if text.startswith("0000-00-00"):
            return None  # MySQL's "zero date": no value
        parsed = datetime.fromisoformat(text)  # validates digits, calendar date and time; takes 'Z' and offsets
        if not _MIN_YEAR <= parsed.year <= _MAX_YEAR:
            raise ValueError("year out of range")  # also keeps UTC conversions (DuckDB, .timestamp()) in range
        return parsed.replace(tzinfo=SHANGHAI) if parsed.tzinfo is None else parsed.astimezone(SHANGHAI)
    except (ValueError, OverflowError):
        if text.casefold() in _NULL_WORDS:
            return None
        raise MalformedDataError(
            "must be a China time written 'YYYY-MM-DD HH:MM:SS' (year 1900-2199)", field="publish_time", value=value
        ) from None


# ------------------------------------------------------------------------------------------------------ trend rows


@dataclass(frozen=True, slots=True)
class SalesDay:
    date: date
    sales_quantity: int | None
    order_quantity: int | None


@dataclass(frozen=True, slots=True)
class PriceDay:
    date: date
    price_min: Decimal | None
    price_max: Decimal | None


@dataclass(frozen=True, slots=True)
class TrendDay:
    """Sales and price of one China date; joined on the date (full outer join), never by position."""

    date: date
    sales_quantity: int | None
    order_quantity: int | None
    price_min: Decimal | None
    price_max: Decimal | None


@dataclass(frozen=True, slots=True)
class Sum30Check:
    """Does Σ daily sales_quantity over the last 30 trend rows equal sales_quantity_30days? Informative, not fatal."""

    expected: int | None  # sales_quantity_30days
    observed: int  # Σ sales_quantity (None counted as 0) over the last 30 rows (by date) of sales_trend
    rows: int  # rows summed (<= 30)
    ok: bool | None  # None when expected is None


@dataclass(frozen=True, slots=True)
class ParsedStatistics:
    publish_time: datetime | None
    sales_quantity_30days: int | None
    sales_quantity_total: DisplayCount
    order_quantity_total: DisplayCount
    sales_trend: tuple[SalesDay, ...]  # sorted by date, one row per date
    price_trend: tuple[PriceDay, ...]  # sorted by date, one row per date
    duplicate_dates: int  # conflicting rows dropped because a later row had the same date (identical repeats: 0)
    sum30: Sum30Check

    def joined_trend(self) -> list[TrendDay]:
        """Full outer join of sales_trend and price_trend on date, sorted by date."""
        sales = {row.date: row for row in self.sales_trend}
        prices = {row.date: row for row in self.price_trend}
        joined = []
        for day in sorted(sales.keys() | prices.keys()):
            s = sales.get(day)
            p = prices.get(day)
            joined.append(
                TrendDay(
                    day,
                    s.sales_quantity if s else None,
                    s.order_quantity if s else None,
                    p.price_min if p else None,
                    p.price_max if p else None,
                )
            )
        return joined


# Hot-loop construction of the frozen, slotted row classes: object.__new__ plus the slot descriptors' __set__
# (what the generated __init__ does through object.__setattr__, at about half the cost). Same objects, same
# equality/hash/repr; the public constructors stay the normal dataclass ones.
_new = object.__new__
_set_sales_date = SalesDay.date.__set__  # type: ignore[attr-defined]
_set_sales_quantity = SalesDay.sales_quantity.__set__  # type: ignore[attr-defined]
_set_order_quantity = SalesDay.order_quantity.__set__  # type: ignore[attr-defined]
_set_price_date = PriceDay.date.__set__  # type: ignore[attr-defined]
_set_price_min = PriceDay.price_min.__set__  # type: ignore[attr-defined]
_set_price_max = PriceDay.price_max.__set__  # type: ignore[attr-defined]


def _trend_rows(data: dict, key: str) -> list:
    rows = data.get(key)
    if rows is None:
        return []
    if not isinstance(rows, list):
        raise MalformedDataError("must be a list of rows", field=f"data.{key}", value=rows)
    return rows


def _bad_row(key: str, index: int, row: object) -> MalformedDataError:
    return MalformedDataError("row must be an object", field=f"data.{key}[{index}]", value=row)


def _row_date(row: dict, key: str, index: int) -> date:
    if "date" not in row:
        raise MalformedDataError("is missing", field=f"data.{key}[{index}].date")
    try:
        return parse_trend_date(row["date"])
    except MalformedDataError as exc:
        raise exc.at(f"data.{key}[{index}]") from None


def _row_value(parse, row: dict, name: str, key: str, index: int):
    try:
        return parse(row.get(name))
    except MalformedDataError as exc:
        raise MalformedDataError(exc.problem, field=f"data.{key}[{index}].{name}", value=row.get(name)) from None


def _field(parse, data: dict, name: str):
    try:
        return parse(data.get(name))
    except MalformedDataError as exc:
        raise MalformedDataError(exc.problem, field=f"data.{name}", value=data.get(name)) from None


def _slow_sales_row(row: object, index: int) -> tuple[date, int | None, int | None]:
    if not isinstance(row, dict):
        raise _bad_row("sales_trend", index, row)
    return (
        _row_date(row, "sales_trend", index),
        _row_value(parse_quantity, row, "sales_quantity", "sales_trend", index),
        _row_value(parse_quantity, row, "order_quantity", "sales_trend", index),
    )


def _slow_price_row(row: object, index: int) -> tuple[date, Decimal | None, Decimal | None]:
    if not isinstance(row, dict):
        raise _bad_row("price_trend", index, row)
    return (
        _row_date(row, "price_trend", index),
        _row_value(parse_price, row, "price_min", "price_trend", index),
        _row_value(parse_price, row, "price_max", "price_trend", index),
    )


# The two hot loops. Fast path: the date string and price strings are in the caches (filled only with values the
# strict parsers accepted, keyed by str) and the quantities are plain in-range ints. Anything else (cache miss,
# missing key, unhashable or wrong-typed value, a row that is not a dict) raises KeyError/TypeError or fails the int
# test and goes through the general parsers, which fill the caches or raise MalformedDataError naming the row.


def _parse_sales(rows: list) -> tuple[dict[date, SalesDay], int]:
    by_date: dict[date, SalesDay] = {}
    conflicts = 0
    date_cache = _DATE_CACHE
    new, set_date, set_sales, set_orders = _new, _set_sales_date, _set_sales_quantity, _set_order_quantity
    for index, row in enumerate(rows):
        try:
            day = date_cache[row["date"]]
            sales = row["sales_quantity"]
            orders = row["order_quantity"]
        except (KeyError, TypeError):
            day, sales, orders = _slow_sales_row(row, index)
        else:
            if (
                type(sales) is not int
                or type(orders) is not int
                or not 0 <= sales <= MAX_INT
                or not 0 <= orders <= MAX_INT
                or type(row) is not dict  # a dict subclass / Mapping: take the checked path
            ):
                day, sales, orders = _slow_sales_row(row, index)
        item = new(SalesDay)
        set_date(item, day)
        set_sales(item, sales)
        set_orders(item, orders)
        if day in by_date and by_date[day] != item:
            conflicts += 1  # the later row wins
        by_date[day] = item
    return by_date, conflicts


def _parse_prices(rows: list) -> tuple[dict[date, PriceDay], int]:
    by_date: dict[date, PriceDay] = {}
    conflicts = 0
    date_cache = _DATE_CACHE
    price_cache = _PRICE_CACHE
    new, set_date, set_min, set_max = _new, _set_price_date, _set_price_min, _set_price_max
    for index, row in enumerate(rows):
        try:
            day = date_cache[row["date"]]
            low = price_cache[row["price_min"]]
            high = price_cache[row["price_max"]]
        except (KeyError, TypeError):
            day, low, high = _slow_price_row(row, index)
        else:
            if type(row) is not dict:
                day, low, high = _slow_price_row(row, index)
        item = new(PriceDay)
        set_date(item, day)
        set_min(item, low)
        set_max(item, high)
        if day in by_date and by_date[day] != item:
            conflicts += 1  # the later row wins
        by_date[day] = item
    return by_date, conflicts


_sales_quantity = attrgetter("sales_quantity")


def _sorted_rows(by_date: dict) -> tuple:
    return tuple(map(by_date.__getitem__, sorted(by_date)))


def parse_statistics(data: object) -> ParsedStatistics | None:
    """The response's `data` value -> ParsedStatistics; None (the item has no statistics) -> None.

    Missing or null trend lists give empty tuples; missing scalar fields give None. Trend rows are sorted by date with
    one row per date: identical repeats collapse silently, conflicting repeats keep the LAST row of the array and are
    counted in duplicate_dates. Raises MalformedDataError (naming the field and row index) for anything else.
    """
    if data is None:
        return None
    if not isinstance(data, dict):
        raise MalformedDataError("must be an object or null", field="data", value=data)

    publish_time = _field(parse_publish_time, data, "publish_time")
    sales_30 = _field(parse_quantity, data, "sales_quantity_30days")
    sales_total = _field(parse_display_count, data, "sales_quantity_total")
    order_total = _field(parse_display_count, data, "order_quantity_total")

    sales_by_date, sales_conflicts = _parse_sales(_trend_rows(data, "sales_trend"))
    prices_by_date, price_conflicts = _parse_prices(_trend_rows(data, "price_trend"))
    sales_trend = _sorted_rows(sales_by_date)
    price_trend = _sorted_rows(prices_by_date)

    last = sales_trend[-30:]
    observed = sum(filter(None, map(_sales_quantity, last)))  # None counts as 0
    if observed > MAX_INT:
        raise MalformedDataError(
            f"the daily sales_quantity of the last {len(last)} rows add up to more than {MAX_INT}: not real counts",
            field="data.sales_trend",
        )
    sum30 = Sum30Check(
        expected=sales_30,
        observed=observed,
        rows=len(last),
        ok=None if sales_30 is None else observed == sales_30,
    )
    return ParsedStatistics(
        publish_time=publish_time,
        sales_quantity_30days=sales_30,
        sales_quantity_total=sales_total,
        order_quantity_total=order_total,
        sales_trend=sales_trend,
        price_trend=price_trend,
        duplicate_dates=sales_conflicts + price_conflicts,
        sum30=sum30,
    )
