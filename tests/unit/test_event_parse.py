"""parse_event: every malformed kind gets its exact reason (and field), real payloads pass."""

from __future__ import annotations

import dataclasses
import doctest
import pickle
import random
import re
import time
from hashlib import blake2b
from typing import Any

import orjson
import pytest

import schemas.events
from schemas.errors import ConfigError, InvalidEvent, StreamCDPError
from schemas.events import (
    EVENT_TYPES,
    IDENTIFIER_PRIORITY,
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    MAX_TRAIT_NAME_LENGTH,
    TRAIT_NAME_FORBIDDEN,
    Event,
    Identifier,
    RejectReason,
    parse_event,
)

FALLBACK_MS = 1_700_000_000_000
R = RejectReason


def parse(raw: bytes, **kwargs: Any) -> Event:
    kwargs.setdefault("channel", "web")
    kwargs.setdefault("fallback_timestamp_ms", FALLBACK_MS)
    return parse_event(raw, **kwargs)


def dump(payload: Any) -> bytes:
    return orjson.dumps(payload)


def track(**fields: Any) -> bytes:
    """A minimal valid track event with ``fields`` set (None values are sent as null)."""
    payload: dict[str, Any] = {"type": "track", "event": "Order Completed", "userId": "u-1"}
    payload.update(fields)
    return dump(payload)


def without(raw: bytes, *keys: str) -> bytes:
    payload = orjson.loads(raw)
    for key in keys:
        payload.pop(key, None)
    return dump(payload)


def nested(depth: int) -> bytes:
    """A track event whose properties make the whole document ``depth`` levels deep."""
    inner = "1"
    for _ in range(depth - 1):
        inner = '{"a":' + inner + "}"
    return b'{"type":"track","event":"x","userId":"u","properties":' + inner.encode() + b"}"


def reject(raw: bytes, **kwargs: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        parse(raw, **kwargs)
    return caught.value


# --------------------------------------------------------------------- rejects

MALFORMED: list[tuple[str, bytes, RejectReason, str | None]] = [
    ("empty bytes", b"", R.EMPTY, None),
    ("whitespace only", b" \r\n\t  ", R.EMPTY, None),
    ("non-UTF-8 bytes", b"\xff\xfe{\x00\"type\x00", R.INVALID_UTF8, None),
    ("non-UTF-8 inside a string", b'{"type":"track","event":"caf\xe9","userId":"u"}', R.INVALID_UTF8, None),
    ("UTF-8 encoded surrogate", b'{"type":"track","event":"\xed\xa0\x80","userId":"u"}', R.INVALID_UTF8, None),
    ("truncated JSON", b'{"type":"track","event":"Order Compl', R.INVALID_JSON, None),
    ("trailing garbage", b'{"type":"track"} {"type":"page"}', R.INVALID_JSON, None),
    ("single quotes", b"{'type':'track'}", R.INVALID_JSON, None),
    ("byte order mark", b'\xef\xbb\xbf{"type":"track","event":"x","userId":"u"}', R.INVALID_JSON, None),
    ("lone surrogate escape", b'{"type":"track","event":"\\ud800","userId":"u"}', R.INVALID_JSON, None),
    ("NaN literal", b'{"type":"track","event":"x","userId":"u","properties":{"total":NaN}}', R.INVALID_JSON, None),
    ("Infinity literal", b'{"type":"track","event":"x","userId":"u","properties":{"t":Infinity}}', R.INVALID_JSON, None),
    ("number overflowing a double", b'{"type":"track","event":"x","userId":"u","properties":{"t":1e400}}', R.INVALID_JSON, None),
    ("integer beyond 64 bits", b'{"type":"track","event":"x","userId":"u","properties":{"id":123456789012345678901234567890}}', R.INVALID_JSON, None),
    ("integer just above 2**64-1", b'{"type":"track","event":"x","userId":"u","properties":{"id":18446744073709551616}}', R.INVALID_JSON, None),
    ("integer just below -2**63", b'{"type":"track","event":"x","userId":"u","properties":{"id":-9223372036854775809}}', R.INVALID_JSON, None),
    ("JSON array", b'[{"type":"track","event":"x","userId":"u"}]', R.NOT_AN_OBJECT, None),
    ("JSON string", b'"track"', R.NOT_AN_OBJECT, None),
    ("JSON null", b"null", R.NOT_AN_OBJECT, None),
    ("JSON number", b"42", R.NOT_AN_OBJECT, None),
    ("JSON true", b"true", R.NOT_AN_OBJECT, None),
    ("1000-deep nesting", nested(1000), R.TOO_DEEP, None),
    ("2000-deep nesting (beyond orjson's own limit)", nested(2000), R.TOO_DEEP, None),
    ("33-deep nesting", nested(MAX_DEPTH + 1), R.TOO_DEEP, None),
    ("33-deep arrays", b'{"type":"track","event":"x","userId":"u","properties":{"a":' + b"[" * 31 + b"]" * 31 + b"}}", R.TOO_DEEP, None),
    ("33 KB payload", track(properties={"blob": "x" * 33 * 1024}), R.OVERSIZE, None),
    ("missing type", without(track(), "type"), R.UNKNOWN_TYPE, "type"),
    ("unknown type foo", track(type="foo"), R.UNKNOWN_TYPE, "type"),
    ("type in upper case", track(type="Track"), R.UNKNOWN_TYPE, "type"),
    ("type as number", track(type=1), R.UNKNOWN_TYPE, "type"),
    ("type as null", track(type=None), R.UNKNOWN_TYPE, "type"),
    ("type as list", track(type=["track"]), R.UNKNOWN_TYPE, "type"),
    ("userId as number", track(userId=17), R.SCHEMA_VIOLATION, "userId"),
    ("userId as boolean", track(userId=True), R.SCHEMA_VIOLATION, "userId"),
    ("userId longer than 256", track(userId="u" * 257), R.SCHEMA_VIOLATION, "userId"),
    ("anonymousId as object", track(anonymousId={"id": "a-9"}), R.SCHEMA_VIOLATION, "anonymousId"),
    ("messageId as number", track(messageId=12345), R.SCHEMA_VIOLATION, "messageId"),
    ("groupId as number on track", track(groupId=5), R.SCHEMA_VIOLATION, "groupId"),
    ("track without event", without(track(), "event"), R.SCHEMA_VIOLATION, "event"),
    ("track with event null", track(event=None), R.SCHEMA_VIOLATION, "event"),
    ("event as empty string", track(event=""), R.SCHEMA_VIOLATION, "event"),
    ("event as whitespace", track(event="   "), R.SCHEMA_VIOLATION, "event"),
    ("event as number", track(event=7), R.SCHEMA_VIOLATION, "event"),
    ("page name as number", dump({"type": "page", "userId": "u", "name": 3}), R.SCHEMA_VIOLATION, "name"),
    ("alias without previousId", dump({"type": "alias", "userId": "u-1"}), R.SCHEMA_VIOLATION, "previousId"),
    ("alias with blank previousId", dump({"type": "alias", "userId": "u-1", "previousId": " "}), R.SCHEMA_VIOLATION, "previousId"),
    ("alias without userId", dump({"type": "alias", "previousId": "a-9"}), R.SCHEMA_VIOLATION, "userId"),
    ("group without groupId", dump({"type": "group", "userId": "u-1", "traits": {"name": "Acme"}}), R.SCHEMA_VIOLATION, "groupId"),
    ("properties as list", track(properties=[1, 2]), R.SCHEMA_VIOLATION, "properties"),
    ("traits as string", dump({"type": "identify", "userId": "u", "traits": "vip"}), R.SCHEMA_VIOLATION, "traits"),
    ("integrations as boolean", track(integrations=True), R.SCHEMA_VIOLATION, "integrations"),
    ("context as array", track(context=[]), R.SCHEMA_VIOLATION, "context"),
    ("context.traits as string", track(context={"traits": "vip"}), R.SCHEMA_VIOLATION, "context.traits"),
    ("context.device as string", track(context={"device": "iPhone"}), R.SCHEMA_VIOLATION, "context.device"),
    ("context.device.id as number", track(context={"device": {"id": 99}}), R.SCHEMA_VIOLATION, "context.device.id"),
    ("externalIds not a list", track(context={"externalIds": {"id": "L-1", "type": "loyalty_id"}}), R.SCHEMA_VIOLATION, "context.externalIds"),
    ("externalIds item not an object", track(context={"externalIds": ["L-1"]}), R.SCHEMA_VIOLATION, "context.externalIds[0]"),
    ("externalIds item without type", track(context={"externalIds": [{"id": "L-1", "type": "loyalty_id"}, {"id": "L-2"}]}), R.SCHEMA_VIOLATION, "context.externalIds[1].type"),
    ("externalIds item without id", track(context={"externalIds": [{"type": "loyalty_id"}]}), R.SCHEMA_VIOLATION, "context.externalIds[0].id"),
    ("externalIds id as number", track(context={"externalIds": [{"id": 1, "type": "loyalty_id"}]}), R.SCHEMA_VIOLATION, "context.externalIds[0].id"),
    ("externalIds type blank", track(context={"externalIds": [{"id": "L-1", "type": "  "}]}), R.SCHEMA_VIOLATION, "context.externalIds[0].type"),
    ("externalIds type with colon", track(context={"externalIds": [{"id": "L-1", "type": "a:b"}]}), R.SCHEMA_VIOLATION, "context.externalIds[0].type"),
    ("externalIds collection as number", track(context={"externalIds": [{"id": "L-1", "type": "t", "collection": 1}]}), R.SCHEMA_VIOLATION, "context.externalIds[0].collection"),
    ("bad timestamp string", track(timestamp="yesterday"), R.SCHEMA_VIOLATION, "timestamp"),
    ("date-only timestamp", track(timestamp="2026-11-20"), R.SCHEMA_VIOLATION, "timestamp"),
    ("timestamp as number", track(timestamp=1795168800000), R.SCHEMA_VIOLATION, "timestamp"),
    ("impossible date", track(originalTimestamp="2026-02-30T10:00:00Z"), R.SCHEMA_VIOLATION, "originalTimestamp"),
    ("hour 24", track(receivedAt="2026-11-20T24:00:00Z"), R.SCHEMA_VIOLATION, "receivedAt"),
    ("bad sentAt", track(sentAt="2026-11-20T10:00:00 PST"), R.SCHEMA_VIOLATION, "sentAt"),
    ("trait name with a dot", dump({"type": "identify", "userId": "u", "traits": {"address.city": "Oslo"}}), R.INVALID_TRAIT_NAME, "traits"),
    ("nested trait name with a dot", dump({"type": "identify", "userId": "u", "traits": {"address": {"geo": {"lat.deg": 1}}}}), R.INVALID_TRAIT_NAME, "traits.address.geo"),
    ("context.traits name starting with $", track(context={"traits": {"$set": 1}}), R.INVALID_TRAIT_NAME, "context.traits"),
    ("empty trait name", dump({"type": "identify", "userId": "u", "traits": {"": 1}}), R.INVALID_TRAIT_NAME, "traits"),
    ("trait name of 129 characters", dump({"type": "identify", "userId": "u", "traits": {"n" * 129: 1}}), R.INVALID_TRAIT_NAME, "traits"),
    ("trait name with a newline", dump({"type": "identify", "userId": "u", "traits": {"plan\n": 1}}), R.INVALID_TRAIT_NAME, "traits"),
    ("identify with only an invalid email", dump({"type": "identify", "traits": {"email": "ann at example"}}), R.INVALID_IDENTIFIER, "traits.email"),
    ("email without @ beside a userId", dump({"type": "identify", "userId": "u", "traits": {"email": "n/a"}}), R.INVALID_IDENTIFIER, "traits.email"),
    ("unusable phone in context.traits", track(context={"traits": {"phone": "call me"}}), R.INVALID_IDENTIFIER, "context.traits.phone"),
    ("page with no ids at all", dump({"type": "page", "name": "Home", "properties": {"path": "/"}}), R.NO_IDENTIFIER, None),
    ("blank ids only", track(userId="  ", anonymousId=""), R.NO_IDENTIFIER, None),
    ("group traits email is the group's", dump({"type": "group", "groupId": "g-1", "traits": {"email": "ops@acme.com"}}), R.NO_IDENTIFIER, None),
]


@pytest.mark.parametrize(("raw", "reason", "field"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_event_is_rejected_with_exact_reason(raw: bytes, reason: RejectReason, field: str | None) -> None:
    error = reject(raw)
    assert error.reason is reason
    assert error.field == field
    assert error.detail and len(error.detail) < 400


def test_malformed_corpus_covers_every_reason() -> None:
    assert len(MALFORMED) >= 25
    assert {c[2] for c in MALFORMED} == set(RejectReason)


def test_ten_megabyte_payload_is_rejected_before_parsing() -> None:
    raw = b'{"type":"track","event":"x","userId":"u","properties":{"blob":"' + b"x" * (10 * 1024 * 1024) + b'"}}'
    started = time.perf_counter()
    error = reject(raw)
    elapsed = time.perf_counter() - started
    assert error.reason is R.OVERSIZE
    assert str(len(raw)) in error.detail and str(MAX_EVENT_BYTES) in error.detail
    assert elapsed < 0.01  # no parsing, no copying


def test_size_limit_is_inclusive() -> None:
    base = track(properties={"blob": ""})
    at_limit = track(properties={"blob": "x" * (MAX_EVENT_BYTES - len(base))})
    assert len(at_limit) == MAX_EVENT_BYTES
    assert parse(at_limit).event == "Order Completed"
    over = track(properties={"blob": "x" * (MAX_EVENT_BYTES - len(base) + 1)})
    assert reject(over).reason is R.OVERSIZE


def test_depth_limit_is_inclusive() -> None:
    assert parse(nested(MAX_DEPTH)).properties
    assert reject(nested(MAX_DEPTH + 1)).reason is R.TOO_DEEP
    # many brackets but shallow: the walk runs and finds nothing wrong
    wide = track(properties={"items": [{"a": [1]} for _ in range(100)]})
    assert len(parse(wide).properties["items"]) == 100


def test_invalid_utf8_detail_names_the_byte_position() -> None:
    error = reject(b'{"type":"track","event":"caf\xe9","userId":"u"}')
    assert "byte 28" in error.detail and "0xe9" in error.detail


def test_invalid_json_detail_is_orjson_message() -> None:
    error = reject(b'{"type":"track","event":"Order Compl')
    assert error.detail.startswith("unexpected end of data")


def test_unknown_type_detail_names_the_value_truncated() -> None:
    error = reject(track(type="x" * 500))
    assert "xxxx" in error.detail and len(error.detail) < 200
    assert "track" in error.detail  # lists what is expected
    assert "'foo'" in reject(track(type="foo")).detail
    assert "missing" in reject(without(track(), "type")).detail


def test_schema_violation_detail_is_readable() -> None:
    error = reject(track(userId=17))
    assert error.detail == "must be a string or null, got number"
    assert str(error) == "schema_violation at userId: must be a string or null, got number"
    assert reject(track(anonymousId={"a": 1})).detail.endswith("got object")
    assert reject(track(properties=[1])).detail.endswith("got array")


def test_no_identifier_detail_explains_the_unusable_email() -> None:
    error = reject(dump({"type": "identify", "traits": {"email": "ann at example"}}))
    assert "traits.email 'ann at example' is not a usable email" in error.detail


def test_big_integers_inside_strings_are_fine() -> None:
    event = parse(track(properties={"order_id": "123456789012345678901234567890", "max": 18446744073709551615}))
    assert event.properties["order_id"] == "123456789012345678901234567890"
    assert event.properties["max"] == 2**64 - 1


def test_invalid_event_is_data() -> None:
    error = reject(track(userId=17))
    assert isinstance(error, StreamCDPError)
    assert isinstance(error.reason, str) and error.reason == "schema_violation"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.detail, copy.field) == (error.reason, error.detail, error.field)


def test_unknown_default_region_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse(track(), default_region="XX")


def test_random_corruption_never_escapes_as_anything_but_invalid_event() -> None:
    """The worker never stops on bad input: every mutation parses or is rejected."""
    rng = random.Random(20261120)
    seed = SPEC_EXAMPLE
    outcomes = {True: 0, False: 0}
    for _ in range(3000):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.4:
                data[position] = rng.randrange(256)
            elif choice < 0.7:
                del data[position]
            else:
                data.insert(position, rng.choice(b'{}[]":,0\\ \xff'))
        try:
            parse(bytes(data))
            outcomes[True] += 1
        except InvalidEvent:
            outcomes[False] += 1
    assert outcomes[True] and outcomes[False]


# -------------------------------------------------------------------- accepts

SPEC_EXAMPLE = dump(
    {
        "type": "track",
        "messageId": "8c0f1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
        "timestamp": "2026-11-20T10:00:00Z",
        "userId": "u-17",
        "anonymousId": "a-9",
        "event": "Order Completed",
        "properties": {
            "order_id": "o1",
            "total": 129.5,
            "currency": "EUR",
            "products": [{"sku": "s1", "category": "baby", "price": 40}],
        },
        "context": {
            "channel": "pos",
            "traits": {"email": "Ann@Example.com"},
            "externalIds": [{"id": "L-1", "type": "loyalty_id"}],
            "consent": {"categoryPreferences": {"marketing": True}},
        },
    }
)
MS_2026_11_20_10 = 1_795_168_800_000  # 2026-11-20T10:00:00Z


def test_spec_section_2_example() -> None:
    event = parse(SPEC_EXAMPLE, channel="pos")
    assert event.type == "track"
    assert event.message_id == "8c0f1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
    assert event.timestamp_ms == MS_2026_11_20_10
    assert event.channel == "pos"
    assert event.event == "Order Completed"
    assert event.name is None
    assert (event.user_id, event.anonymous_id, event.previous_id, event.group_id) == ("u-17", "a-9", None, None)
    assert event.traits == {"email": "Ann@Example.com"}  # traits keep what was sent
    assert event.properties["products"][0]["category"] == "baby"
    assert event.context["consent"] == {"categoryPreferences": {"marketing": True}}
    assert event.payload == orjson.loads(SPEC_EXAMPLE)
    assert [str(i) for i in event.identifiers] == [
        "user_id:u-17",
        "email:ann@example.com",
        "loyalty_id:L-1",
        "anonymous_id:a-9",
    ]
    assert event.best_identifier() == Identifier("user_id", "u-17")


def test_channel_comes_from_the_argument_not_the_payload() -> None:
    event = parse(SPEC_EXAMPLE, channel="web")
    assert event.channel == "web"
    assert event.context["channel"] == "pos"


# Shapes captured from segment-analytics-python 2.4 (one message of a /v1/batch body).
SEGMENT_TRACK = dump(
    {
        "integrations": {},
        "anonymousId": None,
        "properties": {"plan": "pro", "revenue": 49.0},
        "timestamp": "2026-11-23T00:54:07.003+00:00",
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "userId": "u-42",
        "type": "track",
        "event": "Subscription Started",
        "messageId": "0d1b5a5c-53f5-4c6c-9e0b-1c2f7f8f4a11",
    }
)
SEGMENT_IDENTIFY = dump(
    {
        "integrations": {},
        "anonymousId": None,
        "timestamp": "2026-11-23T00:54:07.004+00:00",
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "type": "identify",
        "userId": "u-42",
        "traits": {"email": "Bob@Example.org", "phone": "(415) 555-0199", "name": "Bob"},
        "messageId": "7f0c3d25-8b1e-4f51-a7a6-2a4f6a0d6b22",
    }
)
SEGMENT_PAGE = dump(
    {
        "integrations": {},
        "anonymousId": "a-77",
        "properties": {"url": "https://shop.example/strollers"},
        "timestamp": "2026-11-23T00:54:07.005+00:00",
        "category": None,
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "userId": None,
        "type": "page",
        "name": "Strollers",
        "messageId": "c2b8a0c5-2f1d-4a8e-b4b3-5e6f7a8b9c33",
    }
)
SEGMENT_GROUP = dump(
    {
        "integrations": {},
        "anonymousId": None,
        "timestamp": "2026-11-23T00:54:07.006+00:00",
        "groupId": "acme",
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "userId": "u-42",
        "traits": {"name": "Acme Inc", "email": "billing@acme.example"},
        "type": "group",
        "messageId": "e4d1f6a7-9b0c-4d2e-8f3a-6b7c8d9e0f44",
    }
)
SEGMENT_ALIAS = dump(
    {
        "integrations": {},
        "previousId": "a-77",
        "timestamp": "2026-11-23T00:54:07.007+00:00",
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "userId": "u-42",
        "type": "alias",
        "messageId": "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c55",
    }
)
# Shapes captured from rudder-sdk-python 2.1.9: identify traits only in context.traits,
# "channel": "server", integrations {"All": true}, microsecond timestamps.
RUDDER_IDENTIFY = dump(
    {
        "integrations": {"All": True},
        "anonymousId": None,
        "timestamp": "2026-11-23T00:54:08.266051+00:00",
        "context": {
            "traits": {"email": " Carol@Example.NET ", "plan": "free"},
            "library": {"name": "rudder-analytics-python", "version": "2.1.9"},
        },
        "type": "identify",
        "userId": "u-43",
        "messageId": "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d66",
        "channel": "server",
    }
)
RUDDER_TRACK = dump(
    {
        "integrations": {"All": True},
        "anonymousId": "a-78",
        "properties": {"sku": "s1"},
        "timestamp": "2026-11-23T00:54:08.266051+00:00",
        "context": {"library": {"name": "rudder-analytics-python", "version": "2.1.9"}},
        "userId": None,
        "type": "track",
        "event": "Product Viewed",
        "messageId": "6c7d8e9f-0a1b-4c2d-9e3f-4a5b6c7d8e77",
        "channel": "server",
    }
)


def test_segment_sdk_track() -> None:
    event = parse(SEGMENT_TRACK)
    assert event.anonymous_id is None
    assert event.timestamp_ms == 1_795_395_247_003  # 2026-11-23T00:54:07.003Z
    assert event.identifiers == (Identifier("user_id", "u-42"),)
    assert event.context["library"]["name"] == "analytics-python"


def test_segment_sdk_identify_uses_top_level_traits() -> None:
    event = parse(SEGMENT_IDENTIFY)
    assert event.traits["name"] == "Bob"
    assert [str(i) for i in event.identifiers] == ["user_id:u-42", "email:bob@example.org", "phone:+14155550199"]


def test_segment_sdk_page() -> None:
    event = parse(SEGMENT_PAGE)
    assert event.name == "Strollers" and event.event is None
    assert event.user_id is None
    assert event.identifiers == (Identifier("anonymous_id", "a-77"),)


def test_segment_sdk_group_keeps_group_traits_out_of_user_traits() -> None:
    event = parse(SEGMENT_GROUP)
    assert event.group_id == "acme"
    assert event.traits == {}
    assert event.payload["traits"]["name"] == "Acme Inc"
    assert event.identifiers == (Identifier("user_id", "u-42"),)  # not billing@acme.example


def test_segment_sdk_alias() -> None:
    event = parse(SEGMENT_ALIAS)
    assert (event.user_id, event.previous_id) == ("u-42", "a-77")
    assert [str(i) for i in event.identifiers] == ["user_id:u-42", "previous_id:a-77"]


def test_rudderstack_sdk_identify_uses_context_traits() -> None:
    event = parse(RUDDER_IDENTIFY)
    assert event.timestamp_ms == 1_795_395_248_266  # sub-millisecond part floored
    assert event.traits == {"email": " Carol@Example.NET ", "plan": "free"}
    assert [str(i) for i in event.identifiers] == ["user_id:u-43", "email:carol@example.net"]
    assert event.payload["channel"] == "server"


def test_rudderstack_sdk_track() -> None:
    event = parse(RUDDER_TRACK)
    assert event.identifiers == (Identifier("anonymous_id", "a-78"),)
    assert event.properties == {"sku": "s1"}


def test_every_event_type_is_accepted() -> None:
    payloads = {
        "track": {"event": "x"},
        "identify": {},
        "page": {},
        "screen": {"name": "Home"},
        "group": {"groupId": "g"},
        "alias": {"previousId": "a"},
    }
    assert set(payloads) == EVENT_TYPES
    for event_type, extra in payloads.items():
        assert parse(dump({"type": event_type, "userId": "u", **extra})).type == event_type


# ------------------------------------------------------------- messageId rules


def test_message_id_defaults_to_a_hash_of_the_raw_bytes() -> None:
    raw = without(SEGMENT_TRACK, "messageId")
    first, again = parse(raw), parse(raw)
    assert first.message_id == again.message_id == "cdp-" + blake2b(raw, digest_size=16).hexdigest()
    assert len(first.message_id) == 4 + 32
    other = parse(raw.replace(b"u-42", b"u-43"))
    assert other.message_id != first.message_id


def test_null_or_blank_message_id_counts_as_absent() -> None:
    assert parse(track(messageId=None)).message_id.startswith("cdp-")
    assert parse(track(messageId="  ")).message_id.startswith("cdp-")
    assert parse(track(messageId=" m-1 ")).message_id == "m-1"


# ------------------------------------------------------------- timestamp rules


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"timestamp": "2026-11-20T10:00:00Z", "originalTimestamp": "2026-11-20T09:00:00Z", "receivedAt": "2026-11-20T11:00:00Z"}, MS_2026_11_20_10),
        ({"originalTimestamp": "2026-11-20T10:00:00Z", "receivedAt": "2026-11-20T11:00:00Z"}, MS_2026_11_20_10),
        ({"receivedAt": "2026-11-20T10:00:00Z", "sentAt": "2026-11-20T12:00:00Z"}, MS_2026_11_20_10),
        ({"sentAt": "2026-11-20T12:00:00Z"}, FALLBACK_MS),  # sentAt is not event time
        ({}, FALLBACK_MS),
        ({"timestamp": None, "originalTimestamp": "2026-11-20T10:00:00Z"}, MS_2026_11_20_10),
        ({"timestamp": "2026-11-20T10:00:00"}, MS_2026_11_20_10),  # naive means UTC
        ({"timestamp": "2026-11-20 10:00:00"}, MS_2026_11_20_10),
        ({"timestamp": "2026-11-20T10:00Z"}, MS_2026_11_20_10),
        ({"timestamp": "2026-11-20T11:30:00+01:30"}, MS_2026_11_20_10),
        ({"timestamp": "2026-11-20T05:00:00-0500"}, MS_2026_11_20_10),
        ({"timestamp": "2026-11-20T12:00:00+02"}, MS_2026_11_20_10),
        ({"timestamp": "2026-11-20T10:00:00.999999999Z"}, MS_2026_11_20_10 + 999),  # nanoseconds (Java)
        ({"timestamp": "1970-01-01T00:00:00Z"}, 0),
        ({"timestamp": "1969-12-31T23:59:59.999Z"}, -1),
    ],
)
def test_timestamp_fallback_order_and_formats(fields: dict, expected: int) -> None:
    assert parse(track(**fields)).timestamp_ms == expected


# ----------------------------------------------------------- traits & identifiers


def test_traits_merge_top_level_over_context_traits() -> None:
    event = parse(
        dump(
            {
                "type": "identify",
                "userId": "u",
                "traits": {"plan": "pro", "name": "Ann"},
                "context": {"traits": {"plan": "free", "city": "Berlin"}},
            }
        )
    )
    assert event.traits == {"plan": "pro", "name": "Ann", "city": "Berlin"}
    assert event.payload["context"]["traits"] == {"plan": "free", "city": "Berlin"}  # untouched


def test_missing_containers_are_empty_dicts() -> None:
    event = parse(dump({"type": "identify", "userId": "u", "traits": None, "context": None, "properties": None}))
    assert (event.traits, event.properties, event.context) == ({}, {}, {})
    assert event.traits is not event.properties  # fresh, not a shared module-level dict


def test_identifiers_from_every_source_in_priority_order_deduplicated() -> None:
    event = parse(
        dump(
            {
                "type": "alias",
                "userId": " u-17 ",
                "previousId": "a-9",
                "anonymousId": "a-9",
                "traits": {"email": "ANN@example.com", "phone": "+1 (415) 555-0100"},
                "context": {
                    "traits": {"email": "ann@example.com ", "phone": 4155550100},
                    "device": {"id": "dev-1"},
                    "externalIds": [
                        {"id": "L-1", "type": "Loyalty ID", "collection": "users", "encoding": "none"},
                        {"id": " C-9 ", "type": "crm_id"},
                        {"id": "ann@example.com", "type": "email"},
                        {"id": "   ", "type": "blank_id"},
                    ],
                },
            }
        )
    )
    assert [str(i) for i in event.identifiers] == [
        "user_id:u-17",
        "email:ann@example.com",
        "phone:+14155550100",
        "crm_id:C-9",
        "loyalty_id:L-1",
        "device_id:dev-1",
        "anonymous_id:a-9",
        "previous_id:a-9",
    ]
    assert [identifier.type for identifier in event.identifiers] == sorted(
        (identifier.type for identifier in event.identifiers),
        key=lambda t: IDENTIFIER_PRIORITY.index(t) if t in IDENTIFIER_PRIORITY else IDENTIFIER_PRIORITY.index("external"),
    )
    assert event.user_id == "u-17"


def test_previous_id_is_an_identifier_on_alias_only() -> None:
    event = parse(track(previousId="a-1"))
    assert event.previous_id is None
    assert all(identifier.type != "previous_id" for identifier in event.identifiers)


def test_an_empty_email_counts_as_absent() -> None:
    event = parse(dump({"type": "identify", "userId": "u", "traits": {"email": "", "phone": None}}))
    assert event.identifiers == (Identifier("user_id", "u"),)


def test_a_phone_uses_the_default_region() -> None:
    event = parse(dump({"type": "identify", "traits": {"phone": "020 7946 0958"}}), default_region="GB")
    assert event.identifiers == (Identifier("phone", "+442079460958"),)


def test_unknown_top_level_fields_are_allowed() -> None:
    event = parse(track(version=2, _metadata={"bundled": []}, writeKey="k"))
    assert event.payload["version"] == 2


def test_event_is_an_ordinary_frozen_dataclass() -> None:
    event = parse(SPEC_EXAMPLE)
    rebuilt = Event(**{f.name: getattr(event, f.name) for f in dataclasses.fields(Event)})
    assert rebuilt == event and repr(rebuilt) == repr(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.user_id = "x"  # type: ignore[misc]
    assert orjson.loads(orjson.dumps(event))["identifiers"][0] == {"type": "user_id", "value": "u-17"}


# ----------------------------------------------------------------- trait names


def identify_with(traits: Any = None, context_traits: Any = None, **fields: Any) -> bytes:
    payload: dict[str, Any] = {"type": "identify", "userId": "u-1", **fields}
    if traits is not None:
        payload["traits"] = traits
    if context_traits is not None:
        payload["context"] = {"traits": context_traits}
    return dump(payload)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", ["''", "is empty"]),
        ("n" * 129, ["is 129 characters long", "limit is 128", "…"]),
        ("address.city", ["'address.city'", "contains '.'", "dotted path", '{"address": {"city": ...}}']),
        ("$set", ["'$set'", "starts with '$'", "reserved"]),
        ("a\tb", ["'a\\tb'", "U+0009"]),
        ("a\nb", ["'a\\nb'", "U+000A"]),
        ("plan\n", ["U+000A"]),
        ("\x00", ["U+0000"]),
        ("a\x1fb", ["U+001F"]),
        ("a\x7fb", ["U+007F"]),
        ("a\x85b", ["U+0085"]),
        ("a\x9fb", ["U+009F"]),
    ],
)
def test_bad_trait_names_are_refused_with_a_readable_detail(name: str, words: list[str]) -> None:
    error = reject(identify_with({"plan": "pro", name: 1}))
    assert error.reason is R.INVALID_TRAIT_NAME and error.field == "traits"
    assert error.detail.startswith("trait name ")
    for word in words:
        assert word in error.detail, (word, error.detail)
    assert len(error.detail) < 200
    assert str(error).startswith("invalid_trait_name at traits: trait name ")


@pytest.mark.parametrize(
    "name",
    [
        "plan", "first_name", "First Name", "loyalty-tier", "createdAt", "price$", "a$b$", "prénom", "名前",
        "emoji 🎉", "a\u00a0b", "a\u2028b", " leading space", "n" * MAX_TRAIT_NAME_LENGTH, "0", "-", "#", "@id",
    ],
)
def test_good_trait_names_pass(name: str) -> None:
    traits = {name: 1, "nested": {name: {name: [1]}}}
    assert parse(identify_with(traits, context_traits={name: 2})).traits[name] == 1


def test_trait_names_are_checked_at_every_level_of_nested_objects() -> None:
    deep_traits: dict[str, Any] = {"ok": 1}
    node = deep_traits
    for level in range(10):
        node[f"l{level}"] = {"x": level}
        node = node[f"l{level}"]
    assert parse(identify_with(deep_traits)).traits["l0"]["l1"]["x"] == 1
    node["bad.name"] = 1
    error = reject(identify_with(deep_traits))
    assert error.field == "traits." + ".".join(f"l{level}" for level in range(10))
    # a sibling object checked after a clean one
    error = reject(identify_with({"a": {"b": 1}, "c": {"d": {"$e": 1}}, "f": 1}))
    assert error.field == "traits.c.d" and "'$e'" in error.detail


def test_objects_inside_arrays_and_empty_objects_are_values_not_traits() -> None:
    traits = {"children": [{"first.name": "Bo"}, {"": 1, "$x": [{"a.b": 1}]}], "empty": {}, "tags": ["a.b", "$c"]}
    assert parse(identify_with(traits)).traits["children"][0] == {"first.name": "Bo"}


def test_trait_names_in_context_traits_are_checked_and_named() -> None:
    error = reject(identify_with({"plan": "pro"}, context_traits={"address": {"zip.code": "0150"}}))
    assert (error.reason, error.field) == (R.INVALID_TRAIT_NAME, "context.traits.address")
    # top-level traits first: both bad, the top-level one is reported
    error = reject(identify_with({"a.b": 1}, context_traits={"c.d": 1}))
    assert error.field == "traits" and "'a.b'" in error.detail


def test_group_traits_follow_the_same_naming_rules() -> None:
    raw = dump({"type": "group", "userId": "u", "groupId": "g", "traits": {"billing.plan": "pro"}})
    assert reject(raw).reason is R.INVALID_TRAIT_NAME


def test_properties_and_other_objects_may_use_any_key() -> None:
    event = parse(track(properties={"a.b": 1, "$c": 2, "": 3, "x\ny": 4}, context={"page": {"a.b": 1}}))
    assert event.properties["a.b"] == 1


def test_trait_name_checks_come_after_schema_and_before_identifiers() -> None:
    # a schema violation elsewhere wins over a bad trait name
    assert reject(identify_with({"a.b": 1}, userId=17)).reason is R.SCHEMA_VIOLATION
    # a bad trait name wins over an unusable email or a missing identifier
    assert reject(identify_with({"a.b": 1, "email": "not an email"})).reason is R.INVALID_TRAIT_NAME
    assert reject(dump({"type": "identify", "traits": {"a.b": 1}})).reason is R.INVALID_TRAIT_NAME


def test_long_bad_trait_names_are_truncated_in_the_detail() -> None:
    error = reject(identify_with({"x" * 5000 + ".": 1}))
    assert "5001 characters" in error.detail and len(error.detail) < 200


def test_trait_name_rule_matches_the_schema_pattern_on_random_names() -> None:
    """The parser's rule and TRAIT_NAME_FORBIDDEN/length (the schema's traitName) agree."""
    forbidden = re.compile(TRAIT_NAME_FORBIDDEN)
    alphabet = "ab_-. $\t\n\x00\x1f\x7f\x80\x85\x9f\xa0é名🎉"
    rng = random.Random(4)
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 2, 3, 5, 127, 128, 129])))
        schema_ok = 1 <= len(name) <= MAX_TRAIT_NAME_LENGTH and forbidden.search(name) is None
        try:
            parse(identify_with({name: 1}))
            parser_ok = True
        except InvalidEvent as error:
            assert error.reason is R.INVALID_TRAIT_NAME
            parser_ok = False
        assert parser_ok == schema_ok, repr(name)


def test_the_valid_name_cache_never_changes_a_verdict() -> None:
    names = schemas.events._VALID_NAMES
    saved = set(names)
    try:
        names.clear()
        for index in range(schemas.events._VALID_NAMES_MAX + 50):
            parse(identify_with({f"t{index}": 1}))
        assert len(names) == schemas.events._VALID_NAMES_MAX  # bounded
        assert parse(identify_with({"beyond_the_cache": 1})).traits == {"beyond_the_cache": 1}
        assert "beyond_the_cache" not in names
        assert reject(identify_with({"t1": 1, "t2.x": 1})).reason is R.INVALID_TRAIT_NAME
        assert not any("." in name for name in names)
    finally:
        names.clear()
        names.update(saved)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(schemas.events)
    assert result.attempted and not result.failed
