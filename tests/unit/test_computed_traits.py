"""Computed traits: configuration, the per-event plan, and read-time presentation.

The Lua half (applying the plan, folding) is exercised against a real Redis in
tests/integration/test_profiles.py."""

from __future__ import annotations

import orjson
import pytest

from agents.profiles.computed import DEFAULT_PATH, ComputedTraits, event_name, resolve
from schemas.errors import ConfigError
from schemas.events import parse_event

DAY = 86_400_000
T0 = 1_763_600_000_000  # 2025-11-20


def ev(**fields):
    payload = {"type": "track", "userId": "u1", "messageId": "m1", "timestamp": "2026-11-20T10:00:00Z", **fields}
    return parse_event(orjson.dumps(payload), channel="web", fallback_timestamp_ms=0, default_region="US")


def order(total, currency="EUR", categories=("baby",), order_id="o1", **extra):
    products = [{"sku": f"s{i}", "category": c, "price": 1} for i, c in enumerate(categories)]
    return ev(event="Order Completed", properties={"order_id": order_id, "total": total, "currency": currency, "products": products}, **extra)


def ops(traits: ComputedTraits, event) -> list[tuple]:
    flat = traits.plan(event)
    return [tuple(flat[i:i + 5]) for i in range(0, len(flat), 5)]


def apply(stored: dict, traits: ComputedTraits, event) -> None:
    """A Python mirror of the Lua ops for the presentation tests (no groups limit)."""
    for op, field, group, value, extra in ops(traits, event):
        if group:
            field = f"{field}|{group}"
        if op == "add":
            stored[field] = str(float(stored.get(field, 0)) + float(value))
        elif op in ("min", "max"):
            held = stored.get(field)
            if held is None or (float(value) < float(held) if op == "min" else float(value) > float(held)):
                stored[field] = str(value)
        elif op in ("first", "last"):
            ts, _, value = value.decode().partition("|")
            held = stored.get("at" + field)
            if held is None or (int(ts) < int(held) if op == "first" else int(ts) >= int(held)):
                stored[field], stored["at" + field] = value, ts
        elif op == "set":
            items = stored[field].split("\x1f") if field in stored else []
            if value not in items and len(items) < extra:
                items.append(value)
            stored[field] = "\x1f".join(items)
        elif op == "win":
            bucket, _ = extra.split(",")
            buckets = dict(p.split("=") for p in stored.get(field, "").split(";") if p)
            buckets[bucket] = str(float(buckets.get(bucket, 0)) + float(value))
            stored[field] = ";".join(f"{b}={a}" for b, a in buckets.items())


def test_the_shipped_file_parses_and_has_the_issue_s_traits():
    traits = ComputedTraits.load(DEFAULT_PATH)
    names = {t.name for t in traits.traits}
    assert {"event_counts", "channels_used", "order_count", "total_spend", "average_order_value", "last_order",
            "product_categories", "rfm"} <= names


def test_resolve_goes_through_lists_and_knows_the_special_roots():
    e = order(30, categories=("baby", "toys"))
    assert resolve(e, ("properties", "products", "category")) == ["baby", "toys"]
    assert resolve(e, ("event",)) == ["Order Completed"]
    assert resolve(e, ("channel",)) == ["web"]
    assert resolve(e, ("properties", "missing")) == []
    assert event_name(ev(type="page", name="Home")) == "page"


def test_plan_and_present_the_usual_traits():
    traits = ComputedTraits.load(DEFAULT_PATH)
    stored: dict = {}
    apply(stored, traits, order(100, "EUR", ("baby",), order_id="o1", timestamp="2026-11-01T00:00:00Z"))
    apply(stored, traits, order(50, "EUR", ("baby", "toys"), order_id="o2", timestamp="2026-11-10T00:00:00Z"))
    apply(stored, traits, order(20, "USD", ("shoes",), order_id="o3", timestamp="2026-11-05T00:00:00Z"))
    apply(stored, traits, ev(event="Product Viewed", properties={"sku": "s"}))
    now = parse_event(b'{"type":"track","event":"x","userId":"u","timestamp":"2026-11-20T00:00:00Z"}', channel="web",
                      fallback_timestamp_ms=0, default_region="US").timestamp_ms
    shown = traits.present(stored, now)
    assert shown["order_count"] == 3
    assert shown["event_counts"] == {"Order Completed": 3, "Product Viewed": 1}
    assert shown["total_spend"] == {"EUR": 150, "USD": 20}
    assert shown["average_order_value"] == {"EUR": 75, "USD": 20}
    # The latest by event time, not by arrival: o2 (Nov 10) although o3 came later.
    assert shown["last_order"]["value"] == {"order_id": "o2", "total": 50, "currency": "EUR", "channel": "web"}
    assert shown["last_order"]["at"] == "2026-11-10T00:00:00.000Z"
    assert shown["product_categories"] == ["baby", "toys", "shoes"]
    assert shown["channels_used"] == ["web"]
    assert shown["orders_30d"] == 3
    assert shown["rfm"]["frequency"] == 2 and shown["rfm"]["recency"] == 4  # 3 orders; 10 days since the last
    assert shown["rfm"]["total"] == 170 and shown["rfm"]["score"] == "422"


def test_windows_drop_old_buckets_at_read_time():
    traits = ComputedTraits.parse({"computed_traits": [
        {"name": "views_1h", "aggregate": "count", "events": ["Product Viewed"], "within": "1h"},
        {"name": "spend_5s", "aggregate": "sum", "events": ["Order Completed"], "property": "properties.total", "within": "5s", "buckets": 5},
    ]})
    stored: dict = {}
    apply(stored, traits, ev(event="Product Viewed", timestamp="2026-11-20T10:00:00Z"))
    apply(stored, traits, ev(event="Product Viewed", timestamp="2026-11-20T10:50:00Z"))
    apply(stored, traits, order(7, timestamp="2026-11-20T10:50:00Z"))
    at_1050 = ev(event="x", timestamp="2026-11-20T10:50:00Z").timestamp_ms
    assert traits.present(stored, at_1050)["views_1h"] == 2
    assert traits.present(stored, at_1050 + 30 * 60_000)["views_1h"] == 1
    # Buckets are 1h / 30 = 2 min: an event leaves the window at most one bucket late.
    assert traits.present(stored, at_1050 + 61 * 60_000)["views_1h"] == 1
    assert traits.present(stored, at_1050 + 62 * 60_000)["views_1h"] == 0
    assert traits.present(stored, at_1050 + 2_000)["spend_5s"] == 7
    assert traits.present(stored, at_1050 + 6_000)["spend_5s"] == 0


def test_where_filters_and_numeric_strings():
    traits = ComputedTraits.parse({"computed_traits": [
        {"name": "eur_orders", "aggregate": "sum", "event": "Order Completed", "property": "properties.total",
         "where": {"properties.currency": "EUR"}},
        {"name": "biggest", "aggregate": "max", "event": "Order Completed", "property": "properties.total"},
        {"name": "smallest", "aggregate": "min", "event": "Order Completed", "property": "properties.total"},
    ]})
    assert [o[0] for o in ops(traits, order(10, "USD"))] == ["max", "min"]
    assert ops(traits, order("12.5", "EUR"))[0] == ("add", "add:eur_orders", "", 12.5, 50)
    assert ops(traits, order("n/a", "EUR")) == []  # no number: nothing to add, compare or count


def test_non_matching_events_plan_nothing():
    traits = ComputedTraits.parse({"computed_traits": [{"name": "orders", "aggregate": "count", "events": ["Order Completed"]}]})
    assert traits.plan(ev(event="Product Viewed")) == []
    assert traits.plan(ev(type="identify", traits={"email": "a@b.co"})) == []


def test_grouped_ops_carry_group_and_limit():
    traits = ComputedTraits.parse({"computed_traits": [{"name": "per_name", "aggregate": "count", "per": "event", "limit": 3}]})
    assert ops(traits, ev(event="Signed Up")) == [("add", "add:per_name", "Signed Up", 1, 3)]
    assert ops(traits, ev(type="page", name="Home")) == [("add", "add:per_name", "page", 1, 3)]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x", "aggregate": "median"}, "aggregate: 'median' is not one of"),
        ({"name": "1x", "aggregate": "count"}, "name: '1x' is not a name"),
        ({"name": "x", "aggregate": "sum"}, "needs a property"),
        ({"name": "x", "aggregate": "count", "within": "30 days"}, "within: '30 days' is not a window"),
        ({"name": "x", "aggregate": "min", "property": "properties.a", "within": "1d"}, "only avg, count, sum take a window"),
        ({"name": "x", "aggregate": "count", "per": "event", "within": "1d"}, "cannot also be grouped"),
        ({"name": "x", "aggregate": "count", "events": []}, "events: expected an event name"),
        ({"name": "x", "aggregate": "count", "colour": "red"}, "unknown key(s) colour"),
        ({"name": "x", "aggregate": "sum", "property": "properties..total"}, "expected a dotted path"),
        ({"name": "x", "aggregate": "rfm", "property": "properties.total", "scale": {"frequency": [1, 2, 3, 4]}}, "must be descending"),
        ({"name": "x", "aggregate": "count", "limit": 0}, "limit: expected a whole number"),
    ],
)
def test_bad_definitions_are_refused_with_the_path(entry, message):
    with pytest.raises(ConfigError) as caught:
        ComputedTraits.parse({"computed_traits": [{"name": "ok", "aggregate": "count"}, entry]}, source="f.yaml")
    assert "f.yaml: computed_traits[1]" in str(caught.value)
    assert message in str(caught.value)


def test_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match="defined twice"):
        ComputedTraits.parse({"computed_traits": [{"name": "a", "aggregate": "count"}, {"name": "a", "aggregate": "count"}]})
