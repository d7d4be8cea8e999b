"""The collector's pure request handling: body decoding and its caps, JSON shape,
per-message enrichment and limits, and partition keys."""

from __future__ import annotations

import gzip
import json
import re
import uuid
import zlib

import orjson
import pytest

from schemas.events import DATE_TIME_PATTERN, parse_event
from streamcdp.collector.messages import (
    MAX_BODY_BYTES,
    MAX_MESSAGE_BYTES,
    BadRequest,
    body_write_key,
    decode_body,
    parse_payload,
    partition_key,
    prepare,
    received_at,
)

NOW = "2026-11-23T10:00:00.123Z"


def _prepare(kind: str, payload: dict, **kwargs) -> list[dict]:
    return [orjson.loads(p.value) for p in prepare(kind, payload, received_at=NOW, **kwargs)]


def _track(**fields) -> dict:
    return {"type": "track", "event": "Product Viewed", "userId": "u-1", **fields}


def _message_of_size(size: int, **fields) -> dict:
    """A track message whose compact JSON is exactly ``size`` bytes."""
    message = {"type": "track", "event": "big", "userId": "u-big", "messageId": "m-1", "receivedAt": NOW,
               "properties": {"blob": ""}, **fields}
    message["properties"]["blob"] = "x" * (size - len(orjson.dumps(message)))
    assert len(orjson.dumps(message)) == size
    return message


# ------------------------------------------------------------------ body


class TestDecodeBody:
    def test_identity_passes_through(self):
        assert decode_body(b'{"a":1}', None) == b'{"a":1}'
        assert decode_body(b'{"a":1}', "identity") == b'{"a":1}'

    @pytest.mark.parametrize("encoding", ["gzip", "GZIP", " x-gzip "])
    def test_gzip(self, encoding):
        assert decode_body(gzip.compress(b'{"a":1}'), encoding) == b'{"a":1}'

    def test_deflate_is_the_zlib_format(self):
        assert decode_body(zlib.compress(b'{"a":1}'), "deflate") == b'{"a":1}'

    def test_concatenated_gzip_members_are_one_body(self):
        assert decode_body(gzip.compress(b'{"a":') + gzip.compress(b"1}"), "gzip") == b'{"a":1}'

    def test_a_gzip_bomb_stops_at_the_cap(self):
        bomb = gzip.compress(b"\0" * (50 * 1024 * 1024))  # 50 MB of zeros in ~50 KB
        assert len(bomb) < MAX_BODY_BYTES
        with pytest.raises(BadRequest) as caught:
            decode_body(bomb, "gzip")
        assert caught.value.code == "body_too_large" and caught.value.status == 400
        assert str(MAX_BODY_BYTES) in caught.value.message

    def test_a_body_that_inflates_to_exactly_the_cap_is_accepted(self):
        body = b" " * 1000
        assert decode_body(gzip.compress(body), "gzip", limit=1000) == body

    def test_a_raw_body_above_the_cap_is_refused_before_decoding(self):
        with pytest.raises(BadRequest) as caught:
            decode_body(b"x" * 101, "gzip", limit=100)
        assert caught.value.code == "body_too_large"
        assert "101 bytes" in caught.value.message and "100 bytes" in caught.value.message

    @pytest.mark.parametrize(
        "raw, encoding",
        [(b'{"a":1}', "gzip"), (gzip.compress(b'{"a":1}')[:-6], "gzip"), (b"\x1f\x8bnot gzip", "gzip"), (b"xx", "deflate")],
        ids=["plain json labelled gzip", "truncated gzip", "corrupt gzip", "corrupt deflate"],
    )
    def test_bad_compressed_data_is_a_400(self, raw, encoding):
        with pytest.raises(BadRequest) as caught:
            decode_body(raw, encoding)
        assert caught.value.code == "invalid_encoding" and caught.value.status == 400

    def test_an_unknown_encoding_is_a_415(self):
        with pytest.raises(BadRequest) as caught:
            decode_body(b"...", "br")
        assert caught.value.status == 415 and "br" in caught.value.message


class TestParsePayload:
    @pytest.mark.parametrize(
        "body",
        [b"", b"  \n", b"{bad", b'{"a":1', b'{"a":NaN}', b"\xff\xfe{}", b"[" * 2000 + b"]" * 2000, b'{"a":1}{"b":2}'],
        ids=["empty", "whitespace", "garbage", "truncated", "NaN", "not utf-8", "too deep", "two documents"],
    )
    def test_malformed_json_is_invalid_json(self, body):
        with pytest.raises(BadRequest) as caught:
            parse_payload(body)
        assert caught.value.code == "invalid_json" and caught.value.status == 400

    @pytest.mark.parametrize("body", [b"[]", b'"x"', b"1", b"null", b"true"])
    def test_a_non_object_is_refused(self, body):
        with pytest.raises(BadRequest) as caught:
            parse_payload(body)
        assert caught.value.code == "not_an_object"

    def test_an_object(self):
        assert parse_payload(b' {"batch": []} ') == {"batch": []}

    def test_write_key_in_the_body(self):
        assert body_write_key({"writeKey": "k1"}) == "k1"
        assert body_write_key({"writeKey": ""}) is None
        assert body_write_key({"writeKey": 7}) is None
        assert body_write_key({}) is None


# ------------------------------------------------------------- enrichment


class TestEnrichment:
    def test_received_at_is_utc_milliseconds_and_the_worker_accepts_its_shape(self):
        value = received_at()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value)
        assert re.fullmatch(DATE_TIME_PATTERN, value)

    def test_message_id_and_received_at_are_added_when_missing(self):
        (message,) = _prepare("track", _track())
        assert uuid.UUID(message["messageId"]).version == 4
        assert message["receivedAt"] == NOW

    @pytest.mark.parametrize("missing", [None, ""])
    def test_an_empty_message_id_counts_as_missing(self, missing):
        (message,) = _prepare("track", _track(messageId=missing))
        assert uuid.UUID(message["messageId"])

    def test_values_the_client_sent_are_kept(self):
        (message,) = _prepare("track", _track(messageId="m-7", receivedAt="2026-11-20T10:00:00Z"))
        assert message["messageId"] == "m-7"
        assert message["receivedAt"] == "2026-11-20T10:00:00Z"

    def test_each_message_of_a_batch_gets_its_own_id(self):
        messages = _prepare("batch", {"batch": [_track(), _track()]})
        assert messages[0]["messageId"] != messages[1]["messageId"]

    def test_the_route_sets_the_type(self):
        assert _prepare("identify", {"userId": "u-1"})[0]["type"] == "identify"
        assert _prepare("page", {"type": "track", "userId": "u-1"})[0]["type"] == "page"

    def test_write_keys_never_reach_kafka(self):
        (single,) = _prepare("track", _track(writeKey="secret"))
        batch = _prepare("batch", {"batch": [_track(writeKey="secret")], "writeKey": "secret"})
        assert "writeKey" not in single and "writeKey" not in batch[0]

    def test_batch_context_and_integrations_apply_to_every_message(self):
        payload = {
            "batch": [_track(context={"ip": "10.0.0.1"}), _track(), _track(integrations={"All": False})],
            "context": {"ip": "10.0.0.9", "device": {"type": "phone"}},
            "integrations": {"All": True},
        }
        first, second, third = _prepare("batch", payload)
        assert first["context"] == {"ip": "10.0.0.1", "device": {"type": "phone"}}  # the message's own keys win
        assert second["context"] == {"ip": "10.0.0.9", "device": {"type": "phone"}}
        assert third["integrations"] == {"All": False}
        assert second["integrations"] == {"All": True}

    def test_the_server_channel_is_noted_unless_the_message_has_one(self):
        plain, own, without = _prepare(
            "batch",
            {"batch": [_track(context={"ip": "1"}), _track(context={"channel": "kiosk"}), _track()]},
            channel_note="server",
        )
        assert plain["context"] == {"ip": "1", "channel": "server"}
        assert own["context"] == {"channel": "kiosk"}
        assert without["context"] == {"channel": "server"}
        assert "context" not in _prepare("track", _track())[0]

    def test_batch_order_is_kept(self):
        messages = _prepare("batch", {"batch": [_track(event=f"e{i}") for i in range(50)]})
        assert [m["event"] for m in messages] == [f"e{i}" for i in range(50)]

    def test_an_empty_batch_has_nothing_to_store(self):
        assert prepare("batch", {"batch": []}, received_at=NOW) == []


class TestShape:
    @pytest.mark.parametrize("batch", [None, {}, "x", 1])
    def test_batch_must_be_a_list(self, batch):
        payload = {} if batch is None else {"batch": batch}
        with pytest.raises(BadRequest) as caught:
            prepare("batch", payload, received_at=NOW)
        assert caught.value.code == "invalid_batch"

    @pytest.mark.parametrize("item", [3, "track", None, [], True])
    def test_an_item_that_is_not_an_object_is_named_by_index(self, item):
        with pytest.raises(BadRequest) as caught:
            prepare("batch", {"batch": [_track(), _track(), item]}, received_at=NOW)
        assert caught.value.code == "invalid_message" and caught.value.index == 2
        assert "batch[2]" in caught.value.message

    @pytest.mark.parametrize("item_type", [None, "foo", 7, "Track"])
    def test_an_unknown_type_is_named_by_index(self, item_type):
        item = {"event": "x", "userId": "u"} if item_type is None else {"type": item_type, "userId": "u"}
        with pytest.raises(BadRequest) as caught:
            prepare("batch", {"batch": [item]}, received_at=NOW)
        assert caught.value.code == "unknown_type" and caught.value.index == 0
        assert "track" in caught.value.message  # names the allowed types

    def test_one_bad_item_refuses_the_whole_batch_before_anything_is_prepared(self):
        items = [_track(), 3]
        with pytest.raises(BadRequest):
            prepare("batch", {"batch": items}, received_at=NOW)
        assert "messageId" not in items[0]

    def test_everything_else_is_left_to_the_worker(self):
        # a track without event, a userId as number: the worker dead-letters them with a reason
        messages = _prepare("batch", {"batch": [{"type": "track", "userId": 17}, {"type": "alias"}]})
        assert len(messages) == 2


class TestMessageSize:
    def test_a_message_of_exactly_32_kb_is_accepted(self):
        (message,) = prepare("track", _message_of_size(MAX_MESSAGE_BYTES), received_at=NOW)
        assert len(message.value) == MAX_MESSAGE_BYTES

    def test_what_the_collector_adds_does_not_count(self):
        message = _message_of_size(MAX_MESSAGE_BYTES)
        del message["messageId"], message["receivedAt"]
        message["properties"]["blob"] += "x" * (MAX_MESSAGE_BYTES - len(orjson.dumps(message)))
        assert len(orjson.dumps(message)) == MAX_MESSAGE_BYTES
        (prepared,) = prepare("track", message, received_at=NOW)
        assert len(prepared.value) > MAX_MESSAGE_BYTES

    def test_one_byte_more_is_refused_with_the_limit_named(self):
        with pytest.raises(BadRequest) as caught:
            prepare("track", _message_of_size(MAX_MESSAGE_BYTES + 1), received_at=NOW)
        assert caught.value.code == "message_too_large" and caught.value.status == 400
        assert "32768 bytes (32 KB)" in caught.value.message and caught.value.index is None

    def test_a_33_kb_message_in_a_batch_is_named_by_index(self):
        payload = {"batch": [_track(), _message_of_size(33 * 1024)]}
        with pytest.raises(BadRequest) as caught:
            prepare("batch", payload, received_at=NOW)
        assert caught.value.code == "message_too_large" and caught.value.index == 1
        assert "batch[1]" in caught.value.message

    def test_sdk_sized_messages_are_measured_compactly(self):
        # The SDKs measure json.dumps (with spaces): what they let through, we accept.
        message = _message_of_size(MAX_MESSAGE_BYTES - 100)
        assert len(json.dumps(message)) > len(orjson.dumps(message))
        prepare("track", message, received_at=NOW)


# ------------------------------------------------------------ partition key


class TestPartitionKey:
    @pytest.mark.parametrize(
        "message, key",
        [
            ({"userId": "u-17", "anonymousId": "a-9", "traits": {"email": "a@b.co"}}, b"user_id:u-17"),
            ({"userId": "  u-17 "}, b"user_id:u-17"),
            ({"userId": 17}, b"user_id:17"),
            ({"userId": "", "anonymousId": "a-9"}, b"anonymous_id:a-9"),
            ({"userId": None, "anonymousId": "a-9", "traits": {"email": "a@b.co"}}, b"anonymous_id:a-9"),
            ({"traits": {"email": " Ann@Example.COM "}}, b"email:ann@example.com"),
            ({"context": {"traits": {"email": "ann@example.com"}}}, b"email:ann@example.com"),
            ({"traits": {"email": "not-an-email", "phone": "(415) 555-0100"}}, b"phone:+14155550100"),
            ({"context": {"externalIds": [{"id": "L-1", "type": "Loyalty ID"}], "device": {"id": "d-1"}}},
             b"loyalty_id:L-1"),
            ({"context": {"device": {"id": "d-1"}}}, b"device_id:d-1"),
            ({"type": "alias", "previousId": "old-1"}, b"previous_id:old-1"),
        ],
    )
    def test_the_best_identifier(self, message, key):
        assert partition_key(message) == key

    @pytest.mark.parametrize(
        "message",
        [{}, {"userId": "   "}, {"userId": {"a": 1}}, {"traits": "x"}, {"context": {"externalIds": "x"}},
         {"context": {"externalIds": [1, {"id": "x"}]}}, {"context": []}],
    )
    def test_no_usable_identifier_gives_no_key(self, message):
        assert partition_key(message) is None

    def test_national_phone_numbers_use_the_default_region(self):
        assert partition_key({"traits": {"phone": "020 7946 0958"}}, "GB") == b"phone:+442079460958"

    def test_prepared_records_carry_the_key(self):
        (record,) = prepare("identify", {"anonymousId": "a-1"}, received_at=NOW)
        assert record.key == b"anonymous_id:a-1"


# --------------------------------------------------- contract with the worker


def test_prepared_sdk_messages_pass_the_workers_gate():
    """What the collector produces from SDK payloads is what the worker accepts."""
    segment = {
        "batch": [
            {"type": "identify", "userId": "u-1", "traits": {"email": "Ann@Example.com"}, "anonymousId": None,
             "integrations": {}, "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
             "timestamp": "2026-11-23T00:54:07.003+00:00", "messageId": "m-1"},
            {"type": "screen", "userId": "u-1", "name": "Home", "properties": {},
             "timestamp": "2026-11-23T00:54:08.266051+00:00", "channel": "server"},
        ],
        "sentAt": "2026-11-23T00:54:08.300000+00:00",
        "writeKey": "k",
    }
    records = prepare("batch", segment, received_at=received_at())
    events = [parse_event(r.value, channel="web", fallback_timestamp_ms=0) for r in records]
    assert [e.type for e in events] == ["identify", "screen"]
    assert events[0].message_id == "m-1"
    assert str(events[0].identifiers[1]) == "email:ann@example.com"
    assert events[1].message_id == orjson.loads(records[1].value)["messageId"]
