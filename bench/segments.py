"""The segments the benchmarks apply, and ``python -m bench.segments``.

100 segments (``--segments``) generated from the shapes of ``config/segments/*.yaml``
(high spenders, cart abandoners, lapsed customers, category buyers without a
product, open support ticket, prospects, upsell candidates) plus engaged browsers
and trait/computed-trait segments, with varied thresholds, windows, event names and
categories; each validated with ``parse_segment`` and published with
``streams.segment_definitions.publish`` under an id ``bench-seg-<unix s>-<run>-<nnn>``
(the time lets a later run delete what a killed run left, after
``STALE_AFTER_S``).

``python -m bench.segments`` is issue 12's view of the whole-pipeline benchmark
(``bench.whole``): the worker with none of these segments (w0) beside the worker
with them (w100), one worker process, and the baselines; same options as
``python -m bench.whole``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import orjson

from bench.common import sample_sum
from streams import segment_definitions
from streams.keys import PROFILE_SEGMENTS_KEY
from streams.settings import Settings

ID_PREFIX = "bench-seg-"
STALE_AFTER_S = 900
PUBLISH_CONCURRENCY = 10


# ---------------------------------------------------------------- the segments


_CURRENCIES = ("USD", "EUR", "GBP")
_CATEGORIES = ("baby", "toys", "electronics", "home", "fashion", "sports", "beauty", "grocery")
# (category bought, product name part not bought), from streamcdp.generate's catalogue.
_WITHOUT = (
    ("baby", "Stroller"), ("baby", "Monitor"), ("toys", "Train"), ("toys", "Blocks"), ("electronics", "Earbuds"),
    ("electronics", "Speaker"), ("home", "Pan"), ("home", "Duvet"), ("fashion", "Jacket"), ("fashion", "Sweater"),
    ("sports", "Yoga"), ("beauty", "Serum"), ("grocery", "Espresso"), ("baby", "Nappy"), ("electronics", "Charger"),
)
_COUNTRIES = (("US",), ("GB",), ("DE",), ("FR",), ("DE", "FR"))
_NO_TICKET = {"not": {"event": "Support Ticket Opened", "within": "3d"}}
_OPEN_TICKET = {"event": "Support Ticket Opened", "count": {"gt": {"event": "Support Ticket Closed"}}}


def _high_spenders() -> list[tuple[str, dict, list]]:
    # config/segments/high-spenders.yaml: the computed total per currency over a threshold.
    return [
        (f"high spenders {cur} {t}+", {"trait": f"computed.total_spend.{cur}", "gte": t}, ["email", "firstName", "computed.total_spend"])
        for cur in _CURRENCIES for t in (100, 250, 500, 1000, 2500)
    ]


def _cart_abandoners() -> list[tuple[str, dict, list]]:
    # cart-abandoners.yaml: added to the cart within a window, no order in it.
    out = []
    for window in ("15m", "1h", "6h", "1d", "3d"):
        for category in (None, "baby", "electronics"):
            added: dict = {"event": "Product Added", "within": window}
            if category:
                added["where"] = {"properties.category": category}
            rule = {"all": [added, {"not": {"event": "Order Completed", "within": window}}]}
            out.append((f"cart abandoners {window}" + (f" {category}" if category else ""), rule, ["email", "firstName"]))
    return out


def _lapsed() -> list[tuple[str, dict, list]]:
    # lapsed-customers.yaml: ordered (at least n times) ever, not within a window.
    out = []
    for n, windows in ((1, ("1h", "1d", "7d", "14d", "30d", "60d", "90d")), (2, ("7d", "30d", "90d"))):
        for window in windows:
            ever: dict = {"event": "Order Completed"}
            if n > 1:
                ever["count"] = {"gte": n}
            rule = {"all": [ever, {"not": {"event": "Order Completed", "within": window}}]}
            out.append((f"lapsed {window} ({n}+ orders)", rule, ["email", "firstName", "computed.last_order"]))
    return out


def _buyers_without() -> list[tuple[str, dict, list]]:
    # baby-buyers-without-stroller.yaml: bought in a category, never a given product.
    return [
        (
            f"{category} buyers without {name}",
            {"all": [
                {"event": "Order Completed", "where": {"properties.products.category": category}},
                {"not": {"event": "Order Completed", "where": {"properties.products.name": {"contains": name}}}},
            ]},
            ["email", "firstName"],
        )
        for category, name in _WITHOUT
    ]


def _open_ticket() -> list[tuple[str, dict, list]]:
    # open-support-ticket.yaml: more tickets opened than closed (no such events in
    # generated traffic: indexed, never evaluated).
    out = [("open support ticket", _OPEN_TICKET, ["email"])]
    for window in ("7d", "30d"):
        out.append((f"open support ticket {window}", {
            "event": "Support Ticket Opened", "within": window,
            "count": {"gt": {"event": "Support Ticket Closed", "within": window}},
        }, ["email"]))
    out.append(("urgent ticket", {"event": "Support Ticket Opened", "where": {"properties.priority": ["high", "urgent"]}, "within": "1d"}, ["email"]))
    out.append(("repeat ticket openers", {"event": "Support Ticket Opened", "within": "30d", "count": {"gte": 3}}, ["email"]))
    return out


def _prospects() -> list[tuple[str, dict, list]]:
    # stroller-prospects.yaml: recent category buyers of a region, no ticket in 3 days.
    out = []
    for i, category in enumerate(_CATEGORIES[:5]):
        for j, countries in enumerate(_COUNTRIES[:2]):
            window = ("30d", "90d")[(i + j) % 2]
            out.append((f"{category} prospects {'/'.join(countries)} {window}", {"all": [
                {"event": "Order Completed", "where": {"properties.products.category": {"eq": category}}, "within": window, "count": {"gte": 1}},
                {"trait": "country", "in": list(countries)},
                _NO_TICKET,
            ]}, ["email", "firstName"]))
    return out


def _upsell() -> list[tuple[str, dict, list]]:
    # upsell-candidates.yaml: repeat customers with an email and no open ticket.
    out = []
    for n in (2, 3, 5, 8, 12):
        out.append((f"upsell {n}+ orders", {"all": [
            {"trait": "computed.order_count", "gte": n},
            {"trait": "email", "exists": True},
            {"not": {"any": [{"event": "Support Ticket Opened", "within": "3d"}, _OPEN_TICKET]}},
        ]}, ["email", "firstName", "computed.order_count"]))
    for category in _CATEGORIES[:5]:
        out.append((f"cross-sell beyond {category}", {"all": [
            {"trait": "computed.product_categories", "contains": category},
            {"trait": "computed.order_count", "gte": 2},
            _NO_TICKET,
        ]}, ["email", "computed.product_categories"]))
    return out


def _browsers() -> list[tuple[str, dict, list]]:
    # Engaged browsers: products viewed in a window (a category's), over a count.
    out = []
    for window, n in (("10m", 3), ("1h", 5), ("1d", 10), ("7d", 20)):
        out.append((f"browsers {n}+ views {window}", {"event": "Product Viewed", "within": window, "count": {"gte": n}}, ["email"]))
    for category, window, n in (("baby", "1h", 2), ("electronics", "1h", 2), ("fashion", "1d", 3), ("home", "1d", 3), ("toys", "7d", 3)):
        out.append((f"{category} browsers {n}+ views {window}", {
            "event": "Product Viewed", "where": {"properties.category": category}, "within": window, "count": {"gte": n},
        }, ["email"]))
    out.append(("window shoppers 1d", {"all": [
        {"event": ["Product Viewed", "page", "screen"], "within": "1d", "count": {"gte": 8}},
        {"not": {"event": "Order Completed", "within": "7d"}},
    ]}, ["email"]))
    return out


def _traits() -> list[tuple[str, dict, list]]:
    # Plain and computed traits: regions, contact details, channels, order value.
    out = [(f"customers in {'/'.join(c)}", {"trait": "country", "in": list(c)}, ["email"]) for c in _COUNTRIES[:4]]
    out += [
        ("reachable by phone", {"all": [{"trait": "phone", "exists": True}, {"trait": "email", "exists": True}]}, ["email", "phone"]),
        ("app and store shoppers", {"all": [
            {"trait": "computed.channels_used", "contains": "app"}, {"trait": "computed.channels_used", "contains": "pos"},
        ]}, ["email", "computed.channels_used"]),
        ("big basket EUR", {"trait": "computed.average_order_value.EUR", "gte": 150}, ["email"]),
        ("big basket USD", {"trait": "computed.average_order_value.USD", "gte": 150}, ["email"]),
        ("last order in store", {"trait": "computed.last_order.value.channel", "eq": "pos"}, ["email", "computed.last_order"]),
        ("big spenders this week", {"event": "Order Completed", "within": "7d", "sum": {"property": "properties.total", "gte": 300}}, ["email"]),
    ]
    return out


FAMILIES: tuple[Callable[[], list], ...] = (
    _high_spenders, _cart_abandoners, _lapsed, _buyers_without, _open_ticket, _prospects, _upsell, _browsers, _traits,
)


def segment_documents(count: int, tag: str) -> list[dict]:
    """``count`` segment documents with ids ``bench-seg-<tag>-<nnn>``: the families
    above, in turn, each taken once before any is repeated with a new id."""
    shapes = [shape for family in FAMILIES for shape in family()]
    out = []
    for i in range(count):
        name, rule, traits = shapes[i % len(shapes)]
        out.append({
            "id": f"{ID_PREFIX}{tag}-{i:03d}",
            "version": 1,
            "name": f"bench: {name}" + (f" (copy {i // len(shapes)})" if i >= len(shapes) else ""),
            "destinations": ["email"],
            "traits": traits,
            "rule": rule,
        })
    return out


async def publish_all(settings: Settings, items: list[tuple[str, dict | None]]) -> None:
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def one(segment_id: str, document: dict | None) -> None:
        async with gate:
            await segment_definitions.publish(settings, segment_id, document)

    await asyncio.gather(*(one(i, d) for i, d in items))


async def delete_stale(settings: Settings) -> list[str]:
    """Tombstones for segments a killed run of this benchmark left behind."""
    now = time.time()
    stale = []
    for segment_id in await segment_definitions.read_all(settings):
        if not segment_id.startswith(ID_PREFIX):
            continue
        try:
            born = int(segment_id[len(ID_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if now - born > STALE_AFTER_S:
            stale.append(segment_id)
    if stale:
        await publish_all(settings, [(s, None) for s in stale])
    return stale


# ---------------------------------------------------------------- reading outputs and metrics


def cause_of(record) -> str | None:
    try:
        return orjson.loads(record.value)["data"]["causeEventId"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def segment_name_of(names: dict[str, str]) -> Callable:
    def label(record) -> str:
        try:
            body = orjson.loads(record.value)
            segment_id = body["data"]["segmentId"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return "?"
        kind = "+" if body.get("type", "").endswith("entered") else "-"
        return f"{names.get(segment_id, segment_id)} {kind}"

    return label


async def redis_cpu(redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def memberships(redis, ours: set[str]) -> tuple[int, int, int]:
    """(profiles with a membership, memberships in the segments ``ours``, distinct
    such segments with a member) in the database, by SCAN."""
    profiles = members = 0
    segments: set[str] = set()
    async for key in redis.scan_iter(match=PROFILE_SEGMENTS_KEY % "*", count=500):
        found = [i for i in (k.decode() for k in await redis.hkeys(key)) if i in ours]
        profiles += 1
        members += len(found)
        segments.update(found)
    return profiles, members, len(segments)


def transitions(samples: dict) -> float:
    return sum(v for (n, labels), v in samples.items() if n == "cdp_segment_transitions_total")


def events_done(samples: dict) -> float:
    return sample_sum(samples, "cdp_events_processed_total") + sample_sum(samples, "cdp_dead_letters_total")


def main(argv: list[str] | None = None) -> int:
    from bench import whole

    return whole.main(["--zero", "--workers", "1", *(sys.argv[1:] if argv is None else argv)], prog="python -m bench.segments")


if __name__ == "__main__":
    sys.exit(main())
