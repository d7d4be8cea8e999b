"""Fuzz the collector's request handling without the network (issue 14, item 4):
random and mutated bodies, on every route, plain, gzip-compressed, truncated or
with odd encodings (``tests/integration/fuzz_inputs.py``), through what the
collector does before Kafka: ``decode_body`` → ``parse_payload`` → ``prepare``.

Every body is either refused with a ``BadRequest`` (a 4xx with a code; the SDK
drops it) or turned into exactly one record per message, each a JSON object with
a type, a messageId and a receivedAt, which the worker's ingest then accepts or
rejects with a documented reason. Nothing else is raised. The end-to-end version,
against a running collector, is ``tests/integration/test_fuzz.py``.
"""

from __future__ import annotations

import orjson
from hypothesis import given

from agents.ingest.core import split_batch
from schemas.events import EVENT_TYPES, RejectReason
from streamcdp.collector.app import SHORT_PATHS
from streamcdp.collector.messages import MAX_MESSAGE_BYTES, BadRequest, decode_body, parse_payload, prepare
from streams.records import Record
from tests.integration.fuzz_inputs import fuzz, request_bodies

REASONS = {reason.value for reason in RejectReason}
CODES = {
    "body_too_large", "invalid_encoding", "unsupported_encoding", "invalid_json", "not_an_object", "invalid_batch",
    "invalid_message", "unknown_type", "message_too_large", "too_deep",
}


def kind_of(route: str) -> str:
    name = route.rsplit("/", 1)[1]
    return SHORT_PATHS.get(name, name)


@fuzz(600)
@given(request_bodies())
def test_a_body_is_refused_with_a_code_or_becomes_one_record_per_message(request):
    route, raw, headers = request
    kind = kind_of(route)
    try:
        payload = parse_payload(decode_body(raw, headers.get("Content-Encoding")))
        items = payload.get("batch") if kind == "batch" else None
        records = prepare(kind, payload, received_at="2026-11-23T10:00:00.000Z", channel_note="server")
    except BadRequest as exc:
        assert exc.code in CODES, exc
        assert exc.status in (400, 415)
        assert exc.message
        return
    assert len(records) == (len(items) if kind == "batch" else 1)
    for record in records:
        message = orjson.loads(record.value)
        assert type(message) is dict
        assert message["type"] in EVENT_TYPES and (kind == "batch" or message["type"] == kind)
        assert message["messageId"] and message["receivedAt"]
        assert "writeKey" not in message
        assert record.key is None or (isinstance(record.key, bytes) and b":" in record.key)
        assert len(record.value) <= MAX_MESSAGE_BYTES + 200  # the limit, plus what the collector adds
    # Downstream, the worker's ingest has a verdict for each of them.
    accepted, rejected = split_batch(
        [Record("cdp.events.web", 0, i, r.key, r.value, 0) for i, r in enumerate(records)], default_region="US"
    )
    assert len(accepted) + len(rejected) == len(records)
    assert all(r.reason in REASONS for r in rejected), [(r.reason, r.detail) for r in rejected]


def test_a_message_nested_too_deep_to_store_is_refused_not_a_crash():
    """Found by the fuzz test: orjson reads 1024 levels but writes only 254, so such a
    message passed parse_payload and then made prepare raise TypeError (HTTP 500)."""
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    for kind, payload in (("track", {"userId": "u", "event": "x", "properties": {"d": deep}}),
                          ("batch", {"batch": [{"type": "track", "userId": "u", "event": "x"}, {"type": "page", "p": deep}]})):
        try:
            prepare(kind, payload, received_at="2026-11-23T10:00:00.000Z")
        except BadRequest as exc:
            assert (exc.code, exc.status) == ("too_deep", 400)
            assert exc.index == (1 if kind == "batch" else None)
        else:
            raise AssertionError("a message nested 300 levels deep was accepted")
