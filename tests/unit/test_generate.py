"""The synthetic traffic generator: deterministic, valid where meant to be, and
realistic enough that one person shows up on web, app and POS."""

from __future__ import annotations

from collections import Counter, defaultdict

import orjson
import pytest

from schemas.errors import InvalidEvent
from schemas.events import parse_event
from streamcdp.generate import (
    CHANNELS,
    DEFAULT_START_MS,
    MALFORMED_REASONS,
    Malformed,
    encode,
    generate_events,
    record_key,
)


def parsed(events):
    return [(channel, parse_event(encode(value), channel=channel, fallback_timestamp_ms=0)) for channel, value in events]


def test_same_seed_same_events_other_seed_other_events():
    first = [(c, encode(v)) for c, v in generate_events(2000, seed=7, bad_ratio=0.02)]
    again = [(c, encode(v)) for c, v in generate_events(2000, seed=7, bad_ratio=0.02)]
    other = [(c, encode(v)) for c, v in generate_events(2000, seed=8, bad_ratio=0.02)]
    assert first == again
    assert first != other


def test_message_ids_unique_and_tied_to_start_time():
    events = [v for _, v in generate_events(5000, seed=1)]
    ids = [v["messageId"] for v in events]
    assert len(set(ids)) == len(ids)
    later = [v["messageId"] for _, v in generate_events(5000, seed=1, start_ms=DEFAULT_START_MS + 1)]
    assert not set(ids) & set(later)


def test_every_good_event_parses_and_every_malformed_one_is_rejected_with_its_reason():
    reasons = Counter()
    good = 0
    for channel, value in generate_events(6000, seed=3, bad_ratio=0.05):
        if isinstance(value, Malformed):
            with pytest.raises(InvalidEvent) as rejected:
                parse_event(bytes(value), channel=channel, fallback_timestamp_ms=0)
            assert str(rejected.value.reason) == value.reason
            assert record_key(value) is None
            reasons[value.reason] += 1
        else:
            event = parse_event(encode(value), channel=channel, fallback_timestamp_ms=0)
            assert record_key(value) == str(event.best_identifier()).encode()
            good += 1
    assert set(reasons) == set(MALFORMED_REASONS)
    assert 0.03 < sum(reasons.values()) / 6000 < 0.07
    assert good > 5500


def test_no_malformed_records_unless_asked():
    assert not any(isinstance(v, Malformed) for _, v in generate_events(3000, seed=3))


def test_malformed_records_replace_events_without_changing_the_others():
    clean = list(generate_events(2000, seed=5))
    dirty = list(generate_events(2000, seed=5, bad_ratio=0.1))
    assert [c for c, _ in clean] == [c for c, _ in dirty]
    kept = [(a, b) for (_, a), (_, b) in zip(clean, dirty) if not isinstance(b, Malformed)]
    assert len(kept) < 2000 and all(a == b for a, b in kept)


def test_channel_mix_sizes_and_event_time_order():
    events = list(generate_events(10000, seed=11))
    channels = Counter(c for c, _ in events)
    assert set(channels) == set(CHANNELS)
    assert all(channels[c] > 500 for c in CHANNELS)
    sizes = sorted(len(encode(v)) for _, v in events)
    assert 300 <= sizes[len(sizes) // 2] <= 700
    times = [e.timestamp_ms for _, e in parsed(events)]
    assert times == sorted(times) and times[0] >= DEFAULT_START_MS


def test_orders_carry_products_categories_currency_and_total():
    orders = [(c, v) for c, v in generate_events(5000, seed=2) if v.get("event") == "Order Completed"]
    assert {c for c, _ in orders} == set(CHANNELS)
    for _, order in orders:
        props = order["properties"]
        assert props["products"] and all(p["category"] and p["price"] > 0 for p in props["products"])
        assert props["currency"] in {"USD", "GBP", "EUR"}
        assert props["total"] == pytest.approx(sum(p["price"] * p["quantity"] for p in props["products"]))


def test_pos_events_identify_by_email_or_loyalty_card_app_events_by_user_and_device():
    for channel, event in parsed(generate_events(5000, seed=4)):
        types = {i.type for i in event.identifiers}
        if channel == "pos":
            assert event.context["channel"] == "pos"
            assert types & {"email", "loyalty_id"} and not types & {"anonymous_id", "user_id"}
        elif channel == "app":
            assert {"user_id", "device_id"} <= types
        else:
            assert "anonymous_id" in types


def test_the_same_people_appear_on_web_app_and_pos():
    """Link events that share an identifier (union-find): many people span all channels."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    events = parsed(generate_events(20000, seed=9))
    for _, event in events:
        keys = [str(i) for i in event.identifiers]
        for other in keys[1:]:
            parent[root(other)] = root(keys[0])
    channels_of = defaultdict(set)
    for channel, event in events:
        channels_of[root(str(event.identifiers[0]))].add(channel)
    everywhere = [r for r, seen in channels_of.items() if seen == set(CHANNELS)]
    assert len(everywhere) >= 100
    # ... and POS purchases link to web profiles both through the email and the loyalty card.
    linked_by = Counter()
    for channel, event in events:
        if channel == "pos":
            kinds = {i.type for i in event.identifiers}
            if "web" in channels_of[root(str(event.identifiers[0]))]:
                linked_by["loyalty_id" if kinds == {"loyalty_id"} else "email"] += 1
    assert linked_by["loyalty_id"] > 0 and linked_by["email"] > 0


def test_emails_are_typed_as_people_type_them_but_normalise_to_one_identifier():
    raw_emails = defaultdict(set)
    for _, event in parsed(generate_events(20000, seed=6)):
        email = event.traits.get("email")
        if email is not None:
            normalised = next(i.value for i in event.identifiers if i.type == "email")
            raw_emails[normalised].add(email)
    assert any(len(spellings) > 1 for spellings in raw_emails.values())


def test_values_encode_as_segment_spec_json():
    channel, value = next(iter(generate_events(1, seed=0)))
    decoded = orjson.loads(encode(value))
    assert decoded["type"] in {"page", "track", "identify", "screen"}
    assert decoded["messageId"] and decoded["timestamp"].endswith("Z")
