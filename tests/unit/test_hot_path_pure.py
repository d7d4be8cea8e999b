"""Pure parts of the hot path: ingest split, dead-letter records, key layout, the
arguments of the profile Lua step, resolved messages, JSON logs."""

import logging

import orjson

from agents.ingest.core import PROCESSING_ERROR, Accepted, Rejected, split_batch, validate
from agents.pipeline import resolved_message
from agents.profiles.store import apply_event_call, default_model
from schemas.events import Identifier, parse_event
from streams.deadletter import dead_letter, header_map
from streams.keys import ProfileKeys, identifier_key, message_field, new_profile_id, origin_digest
from streams.logs import JsonFormatter, logging_config
from streams.records import Record
from streams.topics import DEAD_LETTER, RESOLVED, channel_of


def rec(value, offset=0, topic="cdp.events.pos"):
    return Record(topic, 2, offset, b"k", value, 1_700_000_000_000)


def test_split_keeps_order_and_reasons():
    ok = orjson.dumps({"type": "track", "event": "x", "userId": "u"})
    accepted, rejected = split_batch([rec(b"{", 0), rec(ok, 1), rec(None, 2)], default_region="US")
    assert [a.record.offset for a in accepted] == [1]
    assert accepted[0].event.channel == "pos"
    assert [(r.record.offset, r.reason) for r in rejected] == [(0, "invalid_json"), (2, "empty")]


def test_a_parser_crash_becomes_a_processing_error_dead_letter(monkeypatch):
    import agents.ingest.core as core

    def boom(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(core, "parse_event", boom)
    result = validate(rec(b"{}"), default_region="US")
    assert isinstance(result, Rejected) and result.reason == PROCESSING_ERROR
    assert "KeyError" in result.detail


def test_dead_letter_keeps_bytes_and_says_why():
    r = rec(b"\xff\x00raw", offset=42)
    m = dead_letter(r, "invalid_utf8", "byte 0", None, 5)
    assert (m.topic, m.key, m.value) == (DEAD_LETTER, b"k", b"\xff\x00raw")
    h = header_map(m.headers)
    assert h["cdp.dlq.reason"] == "invalid_utf8"
    assert (h["cdp.dlq.source.topic"], h["cdp.dlq.source.partition"], h["cdp.dlq.source.offset"]) == ("cdp.events.pos", "2", "42")
    assert "cdp.dlq.field" not in h
    assert header_map(dead_letter(r, "schema_violation", "bad", "userId", 5).headers)["cdp.dlq.field"] == "userId"


def test_keys_share_the_profile_slot_and_hide_identifier_values():
    keys = ProfileKeys("p_abc")
    tags = {k[k.index("{"):k.index("}") + 1] for k in (keys.meta, *keys.state())}
    assert tags == {"{p_abc}"}
    email = Identifier("email", "ann@example.com")
    key = identifier_key(email, "")
    assert "ann" not in key and key.startswith("cdp:id:{")
    assert identifier_key(email, "") != identifier_key(email, "other-secret")
    assert len(message_field("x" * 1000)) == len(message_field("m1")) == 16


def test_profile_ids_sort_by_creation_time_and_hide_the_identifier():
    email = Identifier("email", "ann@example.com")
    older, newer = new_profile_id(email, "", 1_700_000_000_000), new_profile_id(email, "", 1_700_000_000_001)
    assert older < newer
    assert new_profile_id(email, "", 5) == new_profile_id(email, "", 5) != new_profile_id(Identifier("email", "bob@example.com"), "", 5)
    assert "ann" not in older and older.startswith("p_") and len(older) == 2 + 9 + 12


def test_apply_event_arguments():
    event = parse_event(
        orjson.dumps({"type": "alias", "userId": "u1", "previousId": "a1", "messageId": "m1",
                      "timestamp": "2026-11-20T10:00:00Z",
                      "context": {"traits": {"plan": "pro", "address": {"city": "Oslo"}},
                                  "consent": {"categoryPreferences": {"marketing": False, "bad": "yes"}}}}),
        channel="web", fallback_timestamp_ms=0,
    )
    model = default_model()
    keys, args = apply_event_call(event, "p_1", "t/0/5", [Identifier("user_id", "u1")], model=model, dedupe_ttl_s=60, now_ms=99)
    k = ProfileKeys("p_1")
    assert keys == [k.meta, k.traits, k.ids, k.seen, k.computed, k.history, k.match, k.segments]
    assert args[:6] == [origin_digest("t/0/5"), 60_000, event.timestamp_ms, 99, "p_1", message_field("m1")]
    assert args[6] == b"%d|web|m1" % event.timestamp_ms
    assert args[7] == b""
    at, _, entry = args[8].partition(b"|")
    assert int(at) == event.timestamp_ms
    assert orjson.loads(entry) == {"messageId": "m1", "type": "alias", "event": "alias", "channel": "web"}
    assert args[9:11] == [model.history_length, b"0"]
    # Nested traits by dotted path; consent beside them; non-boolean consent ignored.
    assert args[11:18] == [3, "plan", b'"pro"', "address.city", b'"Oslo"', "$consent.marketing", b'[false,"m1","web"]']
    n_ops = args[18]
    assert n_ops == len(model.computed.plan(event)) // 5 and n_ops >= 1  # event_counts, channels_used
    assert args[19 + 5 * n_ops:] == [0, "user_id:u1"]  # no condition fields wanted, then the identifiers
    # With segment state wanted: the answer's condition counters are only the named ones.
    _, wanting = apply_event_call(event, "p_1", "t/0/5", [Identifier("user_id", "u1")], model=model, dedupe_ttl_s=60,
                                  now_ms=99, want_state=("win:c0123456789ab",))
    assert wanting[10] == b"1" and wanting[19 + 5 * n_ops:] == [1, "win:c0123456789ab", "user_id:u1"]


def test_resolved_message_carries_profile_and_source():
    raw = orjson.dumps({"type": "track", "event": "x", "userId": "u", "messageId": "m9"})
    [item], _ = split_batch([rec(raw, 7)], default_region="US")
    assert isinstance(item, Accepted)
    m = resolved_message(item, "p_9", default_model().sensitive)
    body = orjson.loads(m.value)
    assert (m.topic, m.key) == (RESOLVED, b"p_9")
    assert body["profileId"] == "p_9" and body["messageId"] == "m9"
    assert body["source"] == {"topic": "cdp.events.pos", "partition": 2, "offset": 7}
    assert body["event"]["event"] == "x"


def test_channel_of():
    assert channel_of("cdp.events.web") == "web"
    assert channel_of("cdp.events.crm") == "crm"


def test_json_log_lines():
    record = logging.LogRecord("agents.pipeline", logging.WARNING, __file__, 1, "hello %s", ("there",), None)
    record.topic = "cdp.events.web"
    line = orjson.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello there" and line["level"] == "warning" and line["topic"] == "cdp.events.web"
    assert line["ts"].endswith("Z")
    assert logging_config("json", "warn")["root"]["level"] == "WARNING"
