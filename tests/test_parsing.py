"""tmapi_assets.parsing: known input -> right value, hostile input -> MalformedDataError, same result in every TZ."""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tmapi_assets.errors import TmapiError
from tmapi_assets.parsing import (
    MAX_INT,
    SHANGHAI,
    DisplayCount,
    MalformedDataError,
    ParsedStatistics,
    PriceDay,
    SalesDay,
    Sum30Check,
    TrendDay,
    decode_body,
    parse_display_count,
    parse_price,
    parse_publish_time,
    parse_quantity,
    parse_statistics,
    parse_trend_date,
)

# The shared fixtures and cases: the repo's copy (tests/fixtures, tests/cases) first, else /work/shared.
HERE = Path(__file__).resolve().parent
SHARED_DIRS = (HERE, Path("/work/shared"))


def shared_path(relative: str) -> Path:
    for root in SHARED_DIRS:
        if (root / relative).exists():
            return root / relative
    pytest.skip(f"{relative} not found under {[str(root) for root in SHARED_DIRS]}")


def _id(value: object) -> str:
    """Short test id; repr() of a 5000-digit int raises in Python 3.11."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"int{value.bit_length()}bits"
    text = repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


# ------------------------------------------------------------------------------------------------- known inputs

# /work/shared/cases/count_strings.json, verbatim: [input, lower_bound, is_lower_bound].
COUNT_CASES = [
    ["1.5万+", 15000, True],
    ["1.5ä¸‡+", 15000, True],
    ["3500+", 3500, True],
    ["100000+", 100000, True],
    ["7K+", 7000, True],
    ["1.2w+", 12000, True],
    ["已售6.4万+件", 64000, True],
    ["20 万+", 200000, True],
    ["1 亿+", 100000000, True],
    ["12,559", 12559, False],
    ["198358", 198358, False],
    ["0", 0, False],
    [3985, 3985, False],
    ["", None, None],
    [None, None, None],
]

# The doc's full example (/work/shared/fixtures/doc_example_full.json): 30 sales rows, 29 price rows.
DOC_SALES = [
    ("2025-06-24", 136, 12), ("2025-06-25", 157, 35), ("2025-06-26", 351, 56), ("2025-06-27", 32, 27),
    ("2025-06-28", 145, 50), ("2025-06-29", 33, 19), ("2025-06-30", 65, 40), ("2025-07-01", 44, 25),
    ("2025-07-02", 63, 22), ("2025-07-03", 43, 36), ("2025-07-04", 71, 41), ("2025-07-05", 57, 28),
    ("2025-07-06", 34, 23), ("2025-07-07", 129, 50), ("2025-07-08", 58, 22), ("2025-07-09", 58, 34),
    ("2025-07-10", 80, 24), ("2025-07-11", 559, 29), ("2025-07-12", 96, 49), ("2025-07-13", 32, 26),
    ("2025-07-14", 1188, 34), ("2025-07-15", 38, 24), ("2025-07-16", 37, 18), ("2025-07-17", 69, 36),
    ("2025-07-18", 60, 35), ("2025-07-19", 90, 43), ("2025-07-20", 77, 43), ("2025-07-21", 78, 38),
    ("2025-07-22", 61, 37), ("2025-07-23", 44, 31),
]  # fmt: skip


def doc_full_body() -> dict:
    return {
        "code": 200,
        "msg": "success",
        "data": {
            "publish_time": "2024-06-27 09:22:26",
            "sales_quantity_30days": 3985,
            "sales_quantity_total": "1.5万+",
            "order_quantity_total": "3500+",
            "sales_trend": [{"date": d, "sales_quantity": s, "order_quantity": o} for d, s, o in DOC_SALES],
            "price_trend": [{"date": d, "price_min": "11.0", "price_max": "11.0"} for d, _, _ in DOC_SALES[:29]],
        },
    }


def doc_short_mojibake_body() -> dict:
    body = doc_full_body()
    body["data"]["sales_quantity_total"] = "1.5ä¸‡+"
    body["data"]["sales_trend"] = body["data"]["sales_trend"][:3]
    body["data"]["price_trend"] = body["data"]["price_trend"][:3]
    return body


def data() -> dict:
    return doc_full_body()["data"]


def shared_json(relative: str):
    return json.loads(shared_path(relative).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- display counts


@pytest.mark.parametrize(("value", "lower_bound", "is_lower_bound"), COUNT_CASES, ids=_id)
def test_count_strings(value, lower_bound, is_lower_bound):
    parsed = parse_display_count(value)
    assert parsed.lower_bound == lower_bound
    assert parsed.is_lower_bound is is_lower_bound
    assert parsed.raw == (None if value is None else str(value))  # raw kept verbatim (mojibake too)


def test_every_shared_count_case_passes():
    cases = shared_json("cases/count_strings.json")["cases"]
    assert cases == COUNT_CASES  # our copy is the shared file
    for value, lower_bound, is_lower_bound in cases:
        parsed = parse_display_count(value)
        assert (parsed.lower_bound, parsed.is_lower_bound) == (lower_bound, is_lower_bound), value


def test_count_keeps_raw_and_uses_exact_decimal_arithmetic():
    assert parse_display_count("1.5ä¸‡+") == DisplayCount("1.5ä¸‡+", 15000, True)
    assert parse_display_count(3985) == DisplayCount("3985", 3985, False)
    assert parse_display_count("") == DisplayCount("", None, None)
    assert parse_display_count(None) == DisplayCount(None, None, None)
    # 1.1 * 10000 in floats is 11000.000000000002; 0.29 * 100 is 28.999999999999996
    assert parse_display_count("1.1万+").lower_bound == 11000
    assert parse_display_count("2.9万+").lower_bound == 29000
    assert parse_display_count("0.29万").lower_bound == 2900
    assert parse_display_count("1.23456万+").lower_bound == 12345  # floors below the unit's precision
    assert type(parse_display_count("1.5万+").lower_bound) is int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2万", (20000, True)),  # a unit display is rounded, so approximate even without '+'
        ("3千+", (3000, True)),
        ("1万以上", (10000, True)),
        ("3百万+", (3_000_000, True)),
        ("10亿+", (1_000_000_000, True)),
        ("１．５万＋", (15000, True)),  # full-width forms
        ("1.5Ã¤Â¸Â‡+", (15000, True)),  # mojibake applied twice
        ("  3500+ ", (3500, True)),
        ("1,234,567", (1234567, False)),
        ("lots", (None, None)),
        ("null", (None, None)),
        (" ", (None, None)),
        ("12.5", (None, None)),  # a fractional piece count without unit is not a count
        ("-5", (None, None)),
        ("1-2万", (None, None)),  # two numbers: ambiguous, not guessed
        ("1,5万", (None, None)),  # decimal comma: ambiguous
        ("12,55", (None, None)),
        ("9" * 30, (None, None)),  # beyond BIGINT
        ("9" * 200, (None, None)),
        ("ä¸‡", (None, None)),
    ],
)
def test_display_text_variants(value, expected):
    parsed = parse_display_count(value)
    assert (parsed.lower_bound, parsed.is_lower_bound) == expected
    assert parsed.raw == value


@pytest.mark.parametrize(
    "value", [True, False, [1], {"a": 1}, -1, 1.5, float("nan"), 10**30, object(), "x" * 201, "1万\ud800+"], ids=_id
)
def test_display_count_wrong_json_types_raise(value):
    with pytest.raises(MalformedDataError):
        parse_display_count(value)


def test_display_count_integral_float():
    assert parse_display_count(3.0) == DisplayCount("3.0", 3, False)


# ----------------------------------------------------------------------------------------------- prices, counts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("11.0", Decimal("11.0")),
        ("11.00", Decimal("11.00")),
        ("0.5", Decimal("0.5")),
        (" 12.34 ", Decimal("12.34")),
        ("0", Decimal(0)),
        (12, Decimal(12)),
        (12.5, Decimal("12.5")),
        (0.1, Decimal("0.1")),  # via str(): never the binary expansion
        (Decimal("7.25"), Decimal("7.25")),
        ("0.1234", Decimal("0.1234")),  # MAX_PRICE_DECIMALS = 4, the warehouse's DECIMAL(18, 4)
        ("999999999999.99", Decimal("999999999999.99")),
        (None, None),
        ("", None),
        (" ", None),
        ("null", None),
        ("NULL", None),
        ("None", None),
    ],
)
def test_parse_price(value, expected):
    result = parse_price(value)
    assert result == expected
    if expected is not None:
        assert type(result) is Decimal
        assert str(result) == str(expected)


@pytest.mark.parametrize(
    "value",
    [
        "-1.0", -1, -0.5, "NaN", "nan", float("nan"), float("inf"), "inf", "Infinity", Decimal("NaN"),
        "abc", "1.2.3", "1,234.00", "12.", ".5", "1e3", "1_000", "¥11.0", "١١", "+11.0",
        True, False, [], {}, ["11.0"], {"v": "11.0"}, "9" * 5000, 10**30, "1." + "0" * 20, "0.12345", 0.12345, "1000000000000",
    ],
    ids=_id,
)  # fmt: skip
def test_parse_price_rejects(value):
    with pytest.raises(MalformedDataError) as info:
        parse_price(value)
    assert "price" in str(info.value)
    assert len(info.value.value_repr) <= 80


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (12, 12), ("12", 12), (" 12 ", 12), (0, 0), ("0", 0), (12.0, 12), ("12.0", 12), (Decimal(5), 5),
        ("0012", 12), (2**63 - 1, 2**63 - 1), (None, None), ("", None), ("null", None), ("NULL", None),
    ],
)  # fmt: skip
def test_parse_quantity(value, expected):
    assert parse_quantity(value) == expected
    if expected is not None:
        assert type(parse_quantity(value)) is int


@pytest.mark.parametrize(
    "value",
    [
        True, False, -1, "-1", 1.5, "1.5", float("nan"), float("inf"), "abc", "1,000", "1e3", "１２", "٣",
        2**63, "9" * 20, "9" * 5000, 10**5000, [], {}, [1], {"n": 1},
    ],
    ids=_id,
)  # fmt: skip
def test_parse_quantity_rejects(value):
    with pytest.raises(MalformedDataError) as info:
        parse_quantity(value)
    assert len(info.value.value_repr) <= 80


# ---------------------------------------------------------------------------------------------- dates and times


def test_parse_trend_date():
    assert parse_trend_date("2025-06-24") == date(2025, 6, 24)
    assert parse_trend_date("2024-02-29") == date(2024, 2, 29)
    assert type(parse_trend_date("2025-06-24")) is date


@pytest.mark.parametrize(
    "value",
    [
        "2025-13-01", "2025-02-29", "2025-06-31", "2025-00-10", "2025-6-24", "20250624", "2025/06/24",
        "2025-06-24 00:00:00", "2025-06-24T00:00:00", " 2025-06-24", "2025-W26-2", "２０２５-06-24", "",
        None, 20250624, True, [], {"date": "2025-06-24"},
    ],
    ids=_id,
)  # fmt: skip
def test_parse_trend_date_rejects(value):
    with pytest.raises(MalformedDataError):
        parse_trend_date(value)


def test_publish_time_is_china_time():
    parsed = parse_publish_time("2024-06-27 09:22:26")
    assert parsed == datetime(2024, 6, 27, 9, 22, 26, tzinfo=SHANGHAI)
    assert parsed == datetime(2024, 6, 27, 1, 22, 26, tzinfo=UTC)
    assert parsed.utcoffset() == timedelta(hours=8)
    assert parse_publish_time("2024-06-27") == datetime(2024, 6, 27, tzinfo=SHANGHAI)
    assert parse_publish_time("2024-06-27T09:22:26") == parsed
    assert parse_publish_time("2024/06/27 09:22:26") == parsed
    assert parse_publish_time("2024-06-27T01:22:26Z") == parsed  # an explicit zone is honoured
    assert parse_publish_time("2024-06-27T01:22:26Z").tzinfo is SHANGHAI
    assert parse_publish_time("2024-06-27 09:22:26.250") == parsed + timedelta(milliseconds=250)
    for empty in (None, "", " ", "null", "NULL", "0000-00-00 00:00:00"):
        assert parse_publish_time(empty) is None


@pytest.mark.parametrize(
    "value",
    [
        "garbage", "2024-13-01", "2024-02-30 10:00:00", "2024-06-27 25:00:00", "2024-06-27 09", "20240627",
        "2024-06-27 09:22:26 extra", "27/06/2024", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00",
        "1066-10-14 09:00:00", "2024-06-27 09:22:26+25:00", 1719451346, 1719451346.0, True, [], {},
    ],
    ids=_id,
)  # fmt: skip
def test_publish_time_rejects(value):
    with pytest.raises(MalformedDataError) as info:
        parse_publish_time(value)
    assert "publish_time" in str(info.value)


# ------------------------------------------------------------------------------------------------ full bodies


def test_doc_example_full():
    parsed = parse_statistics(data())
    assert isinstance(parsed, ParsedStatistics)
    assert len(parsed.sales_trend) == 30
    assert len(parsed.price_trend) == 29
    assert parsed.sales_trend[0] == SalesDay(date(2025, 6, 24), 136, 12)
    assert parsed.sales_trend[-1] == SalesDay(date(2025, 7, 23), 44, 31)
    assert parsed.price_trend[-1] == PriceDay(date(2025, 7, 22), Decimal("11.0"), Decimal("11.0"))
    assert parsed.sales_quantity_30days == 3985
    assert parsed.sum30 == Sum30Check(expected=3985, observed=3985, rows=30, ok=True)
    assert parsed.sales_quantity_total == DisplayCount("1.5万+", 15000, True)
    assert (parsed.order_quantity_total.lower_bound, parsed.order_quantity_total.is_lower_bound) == (3500, True)
    assert parsed.publish_time == datetime(2024, 6, 27, 1, 22, 26, tzinfo=UTC)
    assert parsed.publish_time.utcoffset() == timedelta(hours=8)
    assert parsed.duplicate_dates == 0
    joined = parsed.joined_trend()
    assert len(joined) == 30
    assert joined[0] == TrendDay(date(2025, 6, 24), 136, 12, Decimal("11.0"), Decimal("11.0"))
    assert joined[-1] == TrendDay(date(2025, 7, 23), 44, 31, None, None)
    assert [row.date for row in joined] == sorted(row.date for row in joined)
    assert all(row.sales_quantity >= row.order_quantity for row in parsed.sales_trend)  # pieces >= orders


def test_doc_example_mojibake_short():
    parsed = parse_statistics(doc_short_mojibake_body()["data"])
    assert parsed.sales_quantity_total == DisplayCount("1.5ä¸‡+", 15000, True)
    assert len(parsed.sales_trend) == 3 and len(parsed.price_trend) == 3
    assert parsed.sum30 == Sum30Check(expected=3985, observed=136 + 157 + 351, rows=3, ok=False)  # not fatal


def test_shared_fixture_files_match():
    full = shared_json("fixtures/doc_example_full.json")
    assert full == doc_full_body()
    assert shared_json("fixtures/doc_example_short_mojibake.json") == doc_short_mojibake_body()


def test_shared_fixture_files_from_bytes():
    for name in ("doc_example_full.json", "doc_example_short_mojibake.json"):
        path = shared_path(f"fixtures/{name}")
        body = json.loads(decode_body(path.read_bytes()))
        parsed = parse_statistics(body["data"])
        assert parsed.sales_quantity_total.lower_bound == 15000


def test_shared_success_case():
    cases = {case["name"]: case for case in shared_json("cases/responses.json")["cases"]}
    parsed = parse_statistics(cases["success"]["body"]["data"])
    assert parsed.sum30 == Sum30Check(1, 1, 1, True)
    assert parsed.sales_quantity_total == DisplayCount("1+", 1, True)
    assert parse_statistics(cases["no-data"]["body"]["data"]) is None


def test_no_data_is_none_and_missing_fields_are_empty():
    assert parse_statistics(None) is None
    parsed = parse_statistics({})
    assert parsed.publish_time is None
    assert parsed.sales_quantity_30days is None
    assert parsed.sales_quantity_total == DisplayCount(None, None, None)
    assert parsed.sales_trend == () and parsed.price_trend == ()
    assert parsed.sum30 == Sum30Check(expected=None, observed=0, rows=0, ok=None)
    assert parsed.joined_trend() == []
    nulls = parse_statistics({"sales_trend": None, "price_trend": None, "sales_quantity_30days": "null"})
    assert nulls.sales_trend == () and nulls.sales_quantity_30days is None


def test_strings_where_ints_expected_and_null_strings():
    body = data()
    body["sales_quantity_30days"] = "3985"
    body["sales_quantity_total"] = 15000
    body["sales_trend"][0] = {"date": "2025-06-24", "sales_quantity": "136", "order_quantity": "12"}
    body["sales_trend"][1] = {"date": "2025-06-25", "sales_quantity": "null", "order_quantity": ""}
    body["price_trend"][0] = {"date": "2025-06-24", "price_min": 11, "price_max": 11.5}
    body["price_trend"][1] = {"date": "2025-06-25", "price_min": "null", "price_max": None}
    body["price_trend"][2] = {"date": "2025-06-26"}  # keys absent
    parsed = parse_statistics(body)
    assert parsed.sales_quantity_30days == 3985
    assert parsed.sales_quantity_total == DisplayCount("15000", 15000, False)
    assert parsed.sales_trend[0] == SalesDay(date(2025, 6, 24), 136, 12)
    assert parsed.sales_trend[1] == SalesDay(date(2025, 6, 25), None, None)
    assert parsed.price_trend[0] == PriceDay(date(2025, 6, 24), Decimal(11), Decimal("11.5"))
    assert parsed.price_trend[1] == PriceDay(date(2025, 6, 25), None, None)
    assert parsed.price_trend[2] == PriceDay(date(2025, 6, 26), None, None)
    assert parsed.sum30 == Sum30Check(3985, 3985 - 157, 30, False)  # None counts as 0


def test_unsorted_input_is_sorted_and_joined_on_date_not_position():
    body = data()
    body["sales_trend"].reverse()
    body["price_trend"] = body["price_trend"][::2][::-1]  # every other day, reversed
    parsed = parse_statistics(body)
    assert [r.date for r in parsed.sales_trend] == sorted(r.date for r in parsed.sales_trend)
    assert [r.date for r in parsed.price_trend] == sorted(r.date for r in parsed.price_trend)
    assert parsed.sales_trend == parse_statistics(data()).sales_trend
    assert parsed.sum30.ok is True
    joined = parsed.joined_trend()
    assert len(joined) == 30
    by_date = {row.date: row for row in joined}
    assert by_date[date(2025, 6, 24)].price_min == Decimal("11.0")
    assert by_date[date(2025, 6, 25)].price_min is None
    assert by_date[date(2025, 6, 25)].sales_quantity == 157


def test_join_covers_dates_only_in_price_trend():
    parsed = parse_statistics(
        {
            "sales_trend": [{"date": "2025-01-02", "sales_quantity": 5, "order_quantity": 1}],
            "price_trend": [{"date": "2025-01-01", "price_min": "1.0", "price_max": "2.0"}],
        }
    )
    assert parsed.joined_trend() == [
        TrendDay(date(2025, 1, 1), None, None, Decimal("1.0"), Decimal("2.0")),
        TrendDay(date(2025, 1, 2), 5, 1, None, None),
    ]


def test_duplicate_dates_identical_collapse_silently():
    body = data()
    body["sales_trend"].append(dict(body["sales_trend"][3]))
    body["sales_trend"].insert(0, {"date": "2025-06-24", "sales_quantity": "136", "order_quantity": 12})
    body["price_trend"].append(dict(body["price_trend"][0]))
    parsed = parse_statistics(body)
    assert len(parsed.sales_trend) == 30 and len(parsed.price_trend) == 29
    assert parsed.duplicate_dates == 0
    assert parsed.sum30.ok is True


def test_duplicate_dates_conflicting_last_wins():
    body = data()
    body["sales_trend"].append({"date": "2025-06-24", "sales_quantity": 999, "order_quantity": 1})
    body["price_trend"].insert(0, {"date": "2025-07-01", "price_min": "9.0", "price_max": "9.0"})
    parsed = parse_statistics(body)
    assert len(parsed.sales_trend) == 30 and len(parsed.price_trend) == 29
    assert parsed.sales_trend[0] == SalesDay(date(2025, 6, 24), 999, 1)  # last in the array wins
    assert parsed.price_trend[7] == PriceDay(date(2025, 7, 1), Decimal("11.0"), Decimal("11.0"))  # the later one
    assert parsed.duplicate_dates == 2
    assert parsed.sum30.observed == 3985 - 136 + 999
    assert parsed.sum30.ok is False
    assert parse_statistics(body) == parsed  # deterministic


def test_sum30_uses_last_30_dates():
    rows = [{"date": f"2025-05-{d:02d}", "sales_quantity": 1000, "order_quantity": 1} for d in range(1, 31)]
    body = data()
    body["sales_trend"] = rows + body["sales_trend"]  # 60 rows, older ones first
    parsed = parse_statistics(body)
    assert len(parsed.sales_trend) == 60
    assert parsed.sum30 == Sum30Check(3985, 3985, 30, True)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(sales_trend="nope"), "data.sales_trend"),
        (lambda d: d.update(price_trend={"date": "2025-06-24"}), "data.price_trend"),
        (lambda d: d["sales_trend"].__setitem__(4, ["2025-06-28", 1, 1]), "data.sales_trend[4]"),
        (lambda d: d["price_trend"].__setitem__(2, None), "data.price_trend[2]"),
        (lambda d: d["sales_trend"][5].pop("date"), "data.sales_trend[5].date"),
        (lambda d: d["sales_trend"][5].update(date=None), "data.sales_trend[5].date"),
        (lambda d: d["sales_trend"][6].update(date="2025-13-01"), "data.sales_trend[6].date"),
        (lambda d: d["price_trend"][7].update(date="2025-02-30"), "data.price_trend[7].date"),
        (lambda d: d["sales_trend"][8].update(date=20250702), "data.sales_trend[8].date"),
        (lambda d: d["sales_trend"][9].update(sales_quantity=True), "data.sales_trend[9].sales_quantity"),
        (lambda d: d["sales_trend"][9].update(order_quantity=-3), "data.sales_trend[9].order_quantity"),
        (lambda d: d["sales_trend"][9].update(sales_quantity=10**30), "data.sales_trend[9].sales_quantity"),
        (lambda d: d["sales_trend"][9].update(sales_quantity=1.5), "data.sales_trend[9].sales_quantity"),
        (lambda d: d["sales_trend"][9].update(sales_quantity={"x": [1, {"y": 2}]}), "data.sales_trend[9].sales_quantity"),
        (lambda d: d["price_trend"][3].update(price_min="-11.0"), "data.price_trend[3].price_min"),
        (lambda d: d["price_trend"][3].update(price_max="NaN"), "data.price_trend[3].price_max"),
        (lambda d: d["price_trend"][3].update(price_max=False), "data.price_trend[3].price_max"),
        (lambda d: d["price_trend"][3].update(price_max=[[["11.0"]]]), "data.price_trend[3].price_max"),
        (lambda d: d.update(sales_quantity_30days="3,985"), "data.sales_quantity_30days"),
        (lambda d: d.update(sales_quantity_30days=-1), "data.sales_quantity_30days"),
        (lambda d: d.update(publish_time="yesterday"), "data.publish_time"),
        (lambda d: d.update(sales_quantity_total=["1.5万+"]), "data.sales_quantity_total"),
        (lambda d: d.update(order_quantity_total=True), "data.order_quantity_total"),
    ],
)  # fmt: skip
def test_hostile_data_names_the_field(mutate, field):
    body = data()
    mutate(body)
    with pytest.raises(MalformedDataError) as info:
        parse_statistics(body)
    err = info.value
    assert err.field == field
    assert str(err).startswith(field + ": ")
    assert isinstance(err, TmapiError) and isinstance(err, ValueError)
    if err.value_repr is not None:
        assert len(err.value_repr) <= 80


@pytest.mark.parametrize("value", ["x", 1, [data()], True, "null"], ids=_id)
def test_data_not_an_object(value):
    with pytest.raises(MalformedDataError) as info:
        parse_statistics(value)
    assert info.value.field == "data"


def test_huge_values_have_short_reprs():
    body = data()
    body["sales_trend"][0]["sales_quantity"] = "9" * 100_000
    with pytest.raises(MalformedDataError) as info:
        parse_statistics(body)
    assert len(info.value.value_repr) <= 80
    assert len(str(info.value)) < 300
    body = data()
    body["sales_trend"][0]["sales_quantity"] = 10**5000  # repr() of this int raises in Python 3.11
    with pytest.raises(MalformedDataError) as info:
        parse_statistics(body)
    assert "bits" in info.value.value_repr
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    body = data()
    body["price_trend"][0]["price_min"] = deep
    with pytest.raises(MalformedDataError) as info:
        parse_statistics(body)
    assert len(info.value.value_repr) <= 80


def test_unknown_keys_are_ignored():
    body = data()
    body["extra"] = {"anything": [1, 2]}
    body["sales_trend"][0]["note"] = "x"
    assert parse_statistics(body) == parse_statistics(data())


def test_results_are_frozen_and_picklable():
    parsed = parse_statistics(data())
    with pytest.raises(AttributeError):
        parsed.sales_trend[0].sales_quantity = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(parsed)) == parsed
    assert hash(parsed.sales_trend[0]) == hash(SalesDay(date(2025, 6, 24), 136, 12))
    assert repr(parsed.sales_trend[0]) == repr(SalesDay(date(2025, 6, 24), 136, 12))
    err = MalformedDataError("must not be negative", field="data.x", value=-1)
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.field, again.value_repr) == (str(err), "data.x", "-1")


def test_input_is_not_mutated():
    body = data()
    body["sales_trend"].reverse()
    snapshot = copy.deepcopy(body)
    parse_statistics(body)
    assert body == snapshot


_FUZZ_ATOMS = [
    None, True, False, 0, -1, 1, 2**63, 10**40, 1.5, -0.0, float("nan"), float("inf"), "", " ", "null", "x", "11.0",
    "-11.0", "2025-06-24", "2025-13-01", "1.5万+", "1.5ä¸‡+", "\ud800", "\x00", "９", "1e5", "NaN", [], {}, [1],
    {"a": None}, "9" * 5000, Decimal("1E+1000000"), Decimal("NaN"), Decimal(-1), "٣", "2024-06-27 09:22:26",
]  # fmt: skip


def _fuzz(value, rng):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            roll = rng.random()
            if roll < 0.05:
                continue  # drop the key
            out[key] = rng.choice(_FUZZ_ATOMS) if roll < 0.2 else _fuzz(item, rng)
        return out
    if isinstance(value, list):
        out = [_fuzz(item, rng) for item in value]
        if out and rng.random() < 0.1:
            out.append(rng.choice(out))
        if rng.random() < 0.1:
            rng.shuffle(out)
        return out
    return value


def test_fuzzed_bodies_parse_or_raise_malformed_only():
    rng = random.Random(20250624)
    outcomes = {"ok": 0, "malformed": 0}
    for _ in range(3000):
        try:
            parse_statistics(_fuzz(data(), rng)).joined_trend()
            outcomes["ok"] += 1
        except MalformedDataError as err:
            assert err.field and err.field.startswith("data")
            assert err.value_repr is None or len(err.value_repr) <= 80
            outcomes["malformed"] += 1
    assert outcomes["malformed"] > 0


# ------------------------------------------------------------------------------------------------------- bodies


def test_decode_body():
    raw = json.dumps(doc_full_body(), ensure_ascii=False).encode("utf-8")
    assert json.loads(decode_body(raw)) == doc_full_body()
    assert decode_body(b"\xef\xbb\xbf" + raw) == raw.decode("utf-8")  # BOM stripped
    assert decode_body(bytearray(b"{}")) == "{}"
    assert decode_body(b"") == ""
    assert decode_body("\ufeff{}") == "{}"


@pytest.mark.parametrize("raw", [b'{"a": "\xff"}', "1.5万+".encode("gbk"), "{}".encode("utf-16"), b"\xe4\xb8"])
def test_decode_body_rejects_invalid_utf8(raw):
    with pytest.raises(MalformedDataError) as info:
        decode_body(raw)
    assert "not valid UTF-8" in str(info.value)


def test_decode_body_rejects_non_bytes():
    with pytest.raises(MalformedDataError):
        decode_body(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- time zones


def test_results_do_not_depend_on_local_time_zone():
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is POSIX only")
    saved = os.environ.get("TZ")
    results = []
    try:
        for zone in ("UTC", "America/Los_Angeles", "Asia/Shanghai", "Pacific/Kiritimati"):
            os.environ["TZ"] = zone
            time.tzset()
            parsed = parse_statistics(data())
            results.append(
                (
                    parsed,
                    parsed.joined_trend(),
                    parsed.publish_time.isoformat(),
                    parsed.publish_time.timestamp(),
                    parse_trend_date("2025-06-24"),
                    parse_publish_time("2024-06-27").isoformat(),
                )
            )
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()
    assert all(result == results[0] for result in results)
    assert results[0][2] == "2024-06-27T09:22:26+08:00"
    assert results[0][3] == datetime(2024, 6, 27, 1, 22, 26, tzinfo=UTC).timestamp()
    assert results[0][0].sales_trend[0].date == date(2025, 6, 24)


# -------------------------------------------------------------------------------------------------- throughput


def test_parse_throughput_sanity():
    """Loose guard against a pathological slowdown; the real target (10,000 responses < 1 s) is measured by hand."""
    text = json.dumps(data())
    bodies = [json.loads(text) for _ in range(2000)]
    start = time.perf_counter()
    for body in bodies:
        parse_statistics(body)
    assert time.perf_counter() - start < 2.0


def test_daily_sales_that_add_up_past_bigint_are_refused_not_overflowed():
    rows = [{"date": f"2025-06-2{d}", "sales_quantity": MAX_INT, "order_quantity": 1} for d in (4, 5)]
    with pytest.raises(MalformedDataError) as caught:
        parse_statistics({"sales_trend": rows})
    assert caught.value.field == "data.sales_trend" and "more than" in caught.value.problem
    assert parse_statistics({"sales_trend": rows[:1]}).sum30.observed == MAX_INT  # one such day is a count
