"""Deterministic, realistic synthetic sales/price histories for the sandbox API.

Every number is a pure function of (item_id, spec_id, date) -- never of the time of the request -- so two fetches made
on consecutive days return overlapping 30-day windows that agree on every shared date, exactly like the real API is
expected to. Randomness comes from ``hashlib.blake2b`` of ``f"{item}:{spec}:{date}"`` (a stream of hash words for the
daily sales; one hash word per date for price changes; a seeded ``random.Random`` for the per-item profile).

Shape of one history (mirrors the real doc example of item 652702302959):

* ``sales_trend``: 30 daily rows ``{"date", "sales_quantity", "order_quantity"}`` ending on ``end`` (the sandbox passes
  "yesterday" in China time); ``order_quantity <= sales_quantity`` (pieces >= orders).
* ``price_trend``: 29 daily rows ``{"date", "price_min", "price_max"}`` starting on the same date and ending one day
  earlier; prices are strings with 1 or 2 decimals ("11.0", "12.5", "8.99"), ``price_max >= price_min``.
* ``sales_quantity_30days`` = sum of the 30 daily ``sales_quantity``.
* ``sales_quantity_total`` / ``order_quantity_total``: display strings ("12", "350+", "3500+", "1.5万+", "12万+",
  "100000+", "1.2亿+") whose lower bound is >= the matching 30-day sum.
* ``publish_time``: "YYYY-MM-DD HH:MM:SS" (China time, no zone), before the first trend date.

Realism: items differ by orders of magnitude (some sell 0-3 pieces a day, others thousands), pieces per order vary
(wholesale), there are zero-sales days (stock-outs, and naturally for slow items), occasional bulk-order spikes (sales
jump while orders barely move, as on 2025-07-14 in the doc example), a weekly rhythm and a slow trend, and prices that
change on some days and then stay (a change persists until the next one; changes are looked for up to 120 days back).

Special item ids (the rule looks at the item id only, whatever the spec):

* item id ending in ``0000``: the item has no statistics -> ``data`` is ``None`` (``"data": null``).
* item id ending in ``0001``: a listed item that never sells: every day 0 sales / 0 orders, totals ``"0"``;
  the price trend is normal.
* item id ending in ``0422`` is handled by the app (HTTP 422), not here.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from datetime import date, datetime, timedelta
from functools import lru_cache

SALES_DAYS = 30  # rows in sales_trend
PRICE_DAYS = 29  # rows in price_trend (same first date, ends one day earlier)
_PRICE_LOOKBACK_DAYS = 120

NO_DATA_SUFFIX = "0000"
NEVER_SELLS_SUFFIX = "0001"


def _seed(*parts: object) -> int:
    text = ":".join(map(str, parts))
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _rng(*parts: object) -> random.Random:
    return random.Random(_seed(*parts))


class _Profile:
    """Per (item, spec) constants: scale, pieces per order, price, publish date, rhythms."""

    __slots__ = (
        "item",
        "spec",
        "never_sells",
        "orders_per_day",
        "pieces_per_order",
        "spike_prob",
        "stockout_prob",
        "weekly_amp",
        "weekly_phase",
        "trend_amp",
        "trend_period",
        "trend_phase",
        "base_price_cents",
        "price_spread",
        "price_change_prob",
        "publish_anchor",
        "publish_clock",
        "history_factor",
        "big_number_style",
    )

    def __init__(self, item: str, spec: str) -> None:
        r = _rng(item, spec, "profile")
        self.item = item
        self.spec = spec
        self.never_sells = item.endswith(NEVER_SELLS_SUFFIX)

        # Scale tiers: tiny (a few pieces a week), small, medium, large (thousands of pieces a day).
        tier = r.random()
        if tier < 0.25:
            lo, hi = 0.05, 1.5
        elif tier < 0.60:
            lo, hi = 1.5, 20.0
        elif tier < 0.90:
            lo, hi = 20.0, 300.0
        else:
            lo, hi = 300.0, 4000.0
        self.orders_per_day = math.exp(r.uniform(math.log(lo), math.log(hi)))
        # 1688 is wholesale: mostly 1-8 pieces per order, some items sold by the dozen or hundred.
        if r.random() < 0.8:
            self.pieces_per_order = math.exp(r.uniform(0.0, math.log(8.0)))
        else:
            self.pieces_per_order = math.exp(r.uniform(math.log(10.0), math.log(120.0)))
        self.spike_prob = r.uniform(0.02, 0.09)
        self.stockout_prob = r.choice((0.0, 0.0, 0.01, 0.03, 0.06))
        self.weekly_amp = r.uniform(0.0, 0.3)
        self.weekly_phase = r.uniform(0.0, 2 * math.pi)
        self.trend_amp = r.uniform(0.0, 0.45)
        self.trend_period = r.uniform(45.0, 240.0)
        self.trend_phase = r.uniform(0.0, 2 * math.pi)

        # Prices: 0.3 .. 800 yuan with typical endings.
        raw = math.exp(r.uniform(math.log(0.3), math.log(800.0)))
        self.base_price_cents = _typical_price_cents(raw, r)
        spread_chance = 0.15 if spec else 0.55
        self.price_spread = 0.0 if r.random() >= spread_chance else r.uniform(0.05, 2.0)
        self.price_change_prob = r.choice((0.0, 0.02, 0.04, 0.08, 0.15))

        # Publish date: fixed per item (2018-01-01 .. ~2024-09), clock time fixed too.
        self.publish_anchor = date(2018, 1, 1) + timedelta(days=r.randrange(0, 2450))
        self.publish_clock = (r.randrange(0, 24), r.randrange(0, 60), r.randrange(0, 60))
        # How strongly the (unseen) history before the window adds to the totals.
        self.history_factor = r.uniform(0.15, 1.0)
        self.big_number_style = "wan" if r.random() < 0.7 else "plain"

    # -- time-dependent pieces -------------------------------------------------------------------------------------

    def mean_orders(self, day: date) -> float:
        n = day.toordinal()
        weekly = 1.0 + self.weekly_amp * math.sin(2 * math.pi * (n % 7) / 7 + self.weekly_phase)
        trend = 1.0 + self.trend_amp * math.sin(2 * math.pi * n / self.trend_period + self.trend_phase)
        return max(0.0, self.orders_per_day * weekly * trend)

    def publish_date(self, first_trend_date: date) -> date:
        if self.publish_anchor < first_trend_date:
            return self.publish_anchor
        # Only reached with a `today` pinned before ~2024-10: keep publish_time before the window.
        return first_trend_date - timedelta(days=1 + _seed(self.item, self.spec, "late-publish") % 400)


def _typical_price_cents(raw: float, r: random.Random) -> int:
    """A price in cents with a typical ending: 3.47 / 3.5, 12.0 / 12.5 / 12.8 / 12.99, 158.0 / 158.9."""
    if raw < 10:
        price = round(raw, 2) if r.random() < 0.5 else round(raw * 2) / 2
    elif raw < 100:
        price = math.floor(raw) + r.choice((0.0, 0.5, 0.8, 0.99))
    else:
        price = math.floor(raw) + (0.0 if r.random() < 0.6 else 0.9)
    return max(10, round(price * 100))


class _HashStream:
    """Uniform numbers from blake2b(key + counter): cheaper to start than a seeded random.Random, and stable."""

    __slots__ = ("key", "counter", "words", "index")

    def __init__(self, key: str) -> None:
        self.key = key.encode("utf-8")
        self.counter = 0
        self.words: tuple[int, ...] = ()
        self.index = 8

    def random(self) -> float:
        if self.index == 8:
            digest = hashlib.blake2b(self.key + b"#%d" % self.counter, digest_size=64).digest()
            self.words = _EIGHT_WORDS.unpack(digest)
            self.counter += 1
            self.index = 0
        word = self.words[self.index]
        self.index += 1
        return word / 18446744073709551616.0  # 2**64

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def expovariate(self, rate: float) -> float:
        return -math.log(1.0 - self.random()) / rate

    def gauss(self, mu: float, sigma: float) -> float:
        u1 = 1.0 - self.random()
        return mu + sigma * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * self.random())


_EIGHT_WORDS = struct.Struct(">8Q")


def _poisson(r: _HashStream, mean: float) -> int:
    """Poisson draw: inversion with one uniform for small means, normal approximation for large ones."""
    if mean <= 0:
        return 0
    if mean < 30:
        u = r.random()
        k, p = 0, math.exp(-mean)
        cumulative = p
        while cumulative < u and k < 200:
            k += 1
            p *= mean / k
            cumulative += p
        return k
    return max(0, round(r.gauss(mean, math.sqrt(mean))))


@lru_cache(maxsize=4096)
def _profile(item: str, spec: str) -> _Profile:
    return _Profile(item, spec)


def daily_sales(item: str, spec: str, day: date) -> tuple[int, int]:
    """(sales_quantity, order_quantity) of one (item, spec) on one China date."""
    p = _profile(item, spec)
    if p.never_sells:
        return 0, 0
    r = _HashStream(f"{item}:{spec}:{day}")
    if r.random() < p.stockout_prob:
        return 0, 0
    mean = p.mean_orders(day)
    orders = _poisson(r, mean)
    if orders <= 12:
        # Each order has at least one piece; the extra pieces are exponential per order (their sum is a Gamma draw:
        # -log of a product of uniforms), around the item's pieces-per-order.
        product = 1.0
        for _ in range(orders):
            product *= 1.0 - r.random()
        sales = orders + round(max(0.0, p.pieces_per_order - 0.5) * -math.log(product)) if orders else 0
    else:
        sales = max(orders, round(orders * p.pieces_per_order * r.uniform(0.75, 1.3)))
    if r.random() < p.spike_prob:
        # A bulk buyer: sales jump, orders barely move.
        bulk = round(p.pieces_per_order * r.uniform(4.0, 30.0) * max(1.0, math.sqrt(mean)))
        sales += max(2, bulk)
        orders += 1
    return sales, min(orders, sales)


def _price_block(item: str, spec: str, block: int) -> bytes:
    """64 hash bytes = one 8-byte word per day for the 8 days of block `block` (ordinal // 8)."""
    return hashlib.blake2b(f"{item}:{spec}:price:{block}".encode(), digest_size=64).digest()


def _price_levels(item: str, spec: str, first: date, days: int, change_prob: float) -> list[float]:
    """Price level (factor of the base price) of each of `days` dates from `first`.

    A date is a change day when its hash word says so (top 32 bits); the level it sets (low 32 bits: -20% .. +20%)
    holds until the next change day. Change days are looked for up to _PRICE_LOOKBACK_DAYS before `first`, so the
    level of a date does not depend on the window it is seen in (unless no change happened for that long).
    """
    if change_prob <= 0:
        return [1.0] * days
    threshold = int(change_prob * 2**32)
    blocks: dict[int, bytes] = {}

    def change(ordinal: int) -> float | None:
        block, index = divmod(ordinal, 8)
        data = blocks.get(block)
        if data is None:
            data = blocks[block] = _price_block(item, spec, block)
        word = data[index * 8 : index * 8 + 8]
        if int.from_bytes(word[:4], "big") < threshold:
            return 0.8 + 0.4 * (int.from_bytes(word[4:], "big") / 2.0**32)
        return None

    first_ordinal = first.toordinal()
    level = 1.0
    for ordinal in range(first_ordinal - 1, first_ordinal - 1 - _PRICE_LOOKBACK_DAYS, -1):  # latest earlier change
        found = change(ordinal)
        if found is not None:
            level = found
            break
    levels: list[float] = []
    for ordinal in range(first_ordinal, first_ordinal + days):
        found = change(ordinal)
        if found is not None:
            level = found
        levels.append(level)
    return levels


def _format_cents(cents: int) -> str:
    """1100 -> '11.0', 1250 -> '12.5', 899 -> '8.99' (two decimals, a trailing zero dropped)."""
    yuan, rest = divmod(cents, 100)
    return f"{yuan}.{rest // 10}" if rest % 10 == 0 else f"{yuan}.{rest:02d}"


def price_rows(item: str, spec: str, first: date, days: int) -> list[dict[str, str]]:
    p = _profile(item, spec)
    base_cents = p.base_price_cents
    spread = 1.0 + p.price_spread
    rows: list[dict[str, str]] = []
    for offset, level in enumerate(_price_levels(item, spec, first, days, p.price_change_prob)):
        low = max(1, round(base_cents * level))
        high = max(low, round(low * spread / 10) * 10) if p.price_spread > 0 else low
        day = first + timedelta(days=offset)
        rows.append({"date": day.isoformat(), "price_min": _format_cents(low), "price_max": _format_cents(high)})
    return rows


def _floor_to(n: int, step: int) -> int:
    return n // step * step


def _display_value(n: int, style: str, round_up: bool) -> tuple[int, str]:
    """Round n to the display precision; returns (numeric lower bound, text)."""

    def rnd(step: int) -> int:
        return -(-n // step) * step if round_up else _floor_to(n, step)

    if n < 100:
        return n, str(n)
    if n < 1000:
        v = rnd(10)
        return v, f"{v}+"
    if n < 10_000:
        v = rnd(100)
        return v, f"{v}+"
    if n >= 100_000_000:
        v = rnd(10_000_000)
        return v, f"{v / 100_000_000:.1f}".rstrip("0").rstrip(".") + "亿+"
    if style == "plain":
        step = 10 ** (len(str(n)) - 2)  # two significant digits: 120000+, 100000+
        v = rnd(step)
        return v, f"{v}+"
    if n < 100_000:
        v = rnd(1000)
        return v, f"{v / 10_000:.1f}".rstrip("0").rstrip(".") + "万+"
    v = rnd(10_000)
    return v, f"{v // 10_000}万+"


def display_total(n: int, at_least: int, style: str = "wan") -> str:
    """Display string for a total, whose lower bound is >= at_least (falls back to rounding up)."""
    value, text = _display_value(n, style, round_up=False)
    if value < at_least:
        _, text = _display_value(max(n, at_least), style, round_up=True)
    return text


def history(item_id: int | str, spec_id: str, end: date) -> dict | None:
    """The `data` object for (item, spec) with sales rows ending on `end` (China date); None = no statistics."""
    item = str(item_id)
    spec = spec_id or ""
    if item.endswith(NO_DATA_SUFFIX):
        return None
    p = _profile(item, spec)
    first = end - timedelta(days=SALES_DAYS - 1)
    sales_trend = []
    sum_sales = sum_orders = 0
    for offset in range(SALES_DAYS):
        day = first + timedelta(days=offset)
        s, o = daily_sales(item, spec, day)
        sum_sales += s
        sum_orders += o
        sales_trend.append({"date": day.isoformat(), "sales_quantity": s, "order_quantity": o})
    publish = p.publish_date(first)
    days_before = max(0, (first - publish).days)
    if p.never_sells:
        total_sales = total_orders = 0
    else:
        # Expected cumulative volume before the window (items ramp up, so scaled down), plus the window itself.
        ramp = p.history_factor * days_before
        total_orders = int(p.orders_per_day * ramp) + sum_orders
        total_sales = max(total_orders, int(p.orders_per_day * p.pieces_per_order * ramp) + sum_sales)
    h, m, s = p.publish_clock
    publish_time = datetime(publish.year, publish.month, publish.day, h, m, s).strftime("%Y-%m-%d %H:%M:%S")
    return {
        "publish_time": publish_time,
        "sales_quantity_30days": sum_sales,
        "sales_quantity_total": display_total(total_sales, sum_sales, p.big_number_style),
        "order_quantity_total": display_total(total_orders, sum_orders, p.big_number_style),
        "sales_trend": sales_trend,
        "price_trend": price_rows(item, spec, first, PRICE_DAYS),
    }
