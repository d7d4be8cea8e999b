"""The worker end to end on real Kafka and Redis: malformed input is dead-lettered
whole with a reason, valid input reaches a profile and the resolved topic, and the
worker keeps going."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from streams.deadletter import header_map
from streams.topics import DEAD_LETTER, EVENTS_APP, EVENTS_POS, EVENTS_WEB, RESOLVED
from tests.conftest import identify, track, unique
from tests.integration.conftest import http_get, produce

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _deep(depth: int) -> bytes:
    return b'{"type":"track","event":"x","userId":"u","p":' + b"[" * depth + b"]" * depth + b"}"


def _big(size: int) -> bytes:
    head = b'{"type":"track","event":"big","userId":"u-big","properties":{"blob":"'
    return head + b"x" * (size - len(head) - 3) + b'"}}'


# (name, raw value, expected reason, expected field or None)
MALFORMED = [
    ("empty", b"", "empty", None),
    ("whitespace", b"  \n ", "empty", None),
    ("tombstone", None, "empty", None),
    ("non-utf8", b'{"type":"track","event":"\xff\xfe"}', "invalid_utf8", None),
    ("binary garbage", bytes(range(256)), "invalid_utf8", None),
    ("truncated json", b'{"type":"track","event":"x"', "invalid_json", None),
    ("NaN literal", b'{"type":"track","event":"x","userId":"u","n":NaN}', "invalid_json", None),
    ("int beyond 64 bits", b'{"type":"track","event":"x","userId":"u","n":123456789012345678901234567890}', "invalid_json", None),
    ("json array", b"[1,2,3]", "not_an_object", None),
    ("json string", b'"hello"', "not_an_object", None),
    ("json null", b"null", "not_an_object", None),
    ("json number", b"42", "not_an_object", None),
    ("1000-deep nesting", _deep(1000), None, None),  # orjson's own limit or ours: either reason is correct
    ("33-deep nesting", _deep(33), "too_deep", None),
    ("10 MB payload", _big(10 * 1024 * 1024), "oversize", None),
    ("33 KB payload", _big(33 * 1024), "oversize", None),
    ("missing type", b'{"event":"x","userId":"u"}', "unknown_type", None),
    ("unknown type", b'{"type":"foo","userId":"u"}', "unknown_type", None),
    ("type as number", b'{"type":7,"userId":"u"}', "unknown_type", None),
    ("userId as number", b'{"type":"track","event":"x","userId":17}', "schema_violation", "userId"),
    ("anonymousId as object", b'{"type":"track","event":"x","anonymousId":{"a":1}}', "schema_violation", "anonymousId"),
    ("track without event", b'{"type":"track","userId":"u"}', "schema_violation", "event"),
    ("alias without previousId", b'{"type":"alias","userId":"u"}', "schema_violation", "previousId"),
    ("properties as list", b'{"type":"track","event":"x","userId":"u","properties":[1]}', "schema_violation", "properties"),
    ("context.traits as string", b'{"type":"track","event":"x","userId":"u","context":{"traits":"x"}}', "schema_violation", "context.traits"),
    ("externalIds not a list", b'{"type":"track","event":"x","userId":"u","context":{"externalIds":{"id":"1"}}}', "schema_violation", "context.externalIds"),
    ("bad timestamp", b'{"type":"track","event":"x","userId":"u","timestamp":"yesterday"}', "schema_violation", "timestamp"),
    ("dotted trait name", b'{"type":"identify","userId":"u","traits":{"address":{"zip.code":"0150"}}}', "invalid_trait_name", "traits.address"),
    ("no identifier", b'{"type":"page","name":"Home"}', "no_identifier", None),
]


async def test_every_malformed_kind_is_dead_lettered_whole_and_the_worker_goes_on(worker, producer, topic_reader, redis):
    dead = await topic_reader(DEAD_LETTER)
    resolved = await topic_reader(RESOLVED)
    key = unique("k").encode()
    metadata = await produce(producer, EVENTS_WEB, [raw for _, raw, _, _ in MALFORMED], key=key)
    # A valid event after all of them: the worker must still be alive to handle it.
    good = track(userId=unique("u"))
    await produce(producer, EVENTS_WEB, [good])

    offsets = {(m.partition, m.offset): case for m, case in zip(metadata, MALFORMED)}

    def ours(record) -> bool:
        h = header_map(record.headers)
        return h.get("cdp.dlq.source.topic") == EVENTS_WEB and (
            int(h["cdp.dlq.source.partition"]), int(h["cdp.dlq.source.offset"])
        ) in offsets

    letters = await dead.collect(ours, len(MALFORMED), timeout_s=60)
    assert len(letters) == len(MALFORMED), f"got {len(letters)} of {len(MALFORMED)} dead letters"
    for record in letters:
        h = header_map(record.headers)
        name, raw, reason, field = offsets[(int(h["cdp.dlq.source.partition"]), int(h["cdp.dlq.source.offset"]))]
        assert record.value == (raw or b""), f"{name}: dead letter must carry the original bytes"
        assert record.key == key, name
        if reason is None:
            assert h["cdp.dlq.reason"] in ("too_deep", "invalid_json"), name
        else:
            assert h["cdp.dlq.reason"] == reason, f"{name}: {h}"
        if field is not None:
            assert h.get("cdp.dlq.field") == field, f"{name}: {h}"
        assert h["cdp.dlq.detail"], f"{name}: a readable detail is required"

    found = await resolved.collect(lambda r: orjson.loads(r.value)["messageId"] == good["messageId"], 1)
    assert len(found) == 1
    status, _ = await asyncio.to_thread(http_get, worker.url + "/healthz")
    assert status == 200
    assert worker.process.poll() is None


async def _profile(worker, identifier: str, timeout_s: float = 30.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        status, body = await asyncio.to_thread(http_get, f"{worker.url}/v1/profiles?identifier={identifier}")
        if status == 200:
            return orjson.loads(body)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no profile for {identifier}: {status} {body[:200]!r}")
        await asyncio.sleep(0.2)


async def test_one_person_across_web_app_and_pos_is_one_profile(worker, producer):
    anon, user, device = unique("anon"), unique("user"), unique("dev")
    email = f"{unique('ann')}@Example.com"
    loyalty = unique("L")
    await produce(producer, EVENTS_WEB, [track(anonymousId=anon, event="Product Viewed")], key=anon.encode())
    await _profile(worker, f"anonymous_id:{anon}")
    await produce(producer, EVENTS_WEB, [identify(anonymousId=anon, userId=user, traits={"email": f"  {email} ", "name": "Ann"})], key=anon.encode())
    await _profile(worker, f"user_id:{user}")
    await produce(producer, EVENTS_APP, [track(userId=user, anonymousId=None, event="App Opened", context={"device": {"id": device}})], key=user.encode())
    await _profile(worker, f"device_id:{device}")
    await produce(
        producer,
        EVENTS_POS,
        [track(anonymousId=None, userId=None, event="Order Completed", properties={"total": 40, "currency": "EUR"},
               context={"traits": {"email": email.upper()}, "externalIds": [{"id": loyalty, "type": "loyalty_id", "collection": "users", "encoding": "none"}]})],
        key=loyalty.encode(),
    )
    by_loyalty = await _profile(worker, f"loyalty_id:{loyalty}")

    ids = {f"anonymous_id:{anon}", f"user_id:{user}", f"device_id:{device}", f"loyalty_id:{loyalty}", f"email:{email.lower()}"}
    profiles = [await _profile(worker, i) for i in sorted(ids)]
    assert {p["id"] for p in profiles} == {by_loyalty["id"]}, "every identifier must find the same profile"
    assert ids <= set(by_loyalty["identifiers"])
    assert by_loyalty["traits"]["name"] == "Ann"
    assert by_loyalty["eventCount"] == 4


async def test_resent_message_id_changes_nothing_twice(worker, producer, topic_reader):
    resolved = await topic_reader(RESOLVED)
    user = unique("u")
    event = identify(userId=user, traits={"plan": "pro"})
    await produce(producer, EVENTS_WEB, [event, event], key=user.encode())  # a producer resends: two records
    later = track(userId=user, event="Marker")  # same key, same partition: handled after both copies
    await produce(producer, EVENTS_WEB, [later], key=user.encode())
    await resolved.collect(lambda r: orjson.loads(r.value)["messageId"] == later["messageId"], 1)
    await resolved.drain(quiet_s=1.0)
    copies = [r for r in resolved.seen if orjson.loads(r.value)["messageId"] == event["messageId"]]
    assert len(copies) == 1, "the resent copy is dropped, not republished"
    profile = await _profile(worker, f"user_id:{user}")
    assert profile["eventCount"] == 2


async def test_late_event_does_not_overwrite_a_newer_trait(worker, producer, topic_reader):
    resolved = await topic_reader(RESOLVED)
    user = unique("u")
    newer = identify(userId=user, timestamp="2026-11-20T12:00:00Z", traits={"plan": "gold", "city": "Berlin"})
    older = identify(userId=user, timestamp="2026-11-20T09:00:00Z", traits={"plan": "free", "age": 41})
    await produce(producer, EVENTS_WEB, [newer, older], key=user.encode())
    await resolved.collect(lambda r: orjson.loads(r.value)["messageId"] == older["messageId"], 1)
    profile = await _profile(worker, f"user_id:{user}")
    assert profile["traits"] == {"plan": "gold", "city": "Berlin", "age": 41}
    assert profile["firstSeen"] == "2026-11-20T09:00:00.000Z"
    assert profile["lastSeen"] == "2026-11-20T12:00:00.000Z"


async def test_profile_api_errors_are_json(worker):
    status, body = await asyncio.to_thread(http_get, f"{worker.url}/v1/profiles?identifier=email:{unique('nobody')}@example.com")
    assert status == 404 and "error" in orjson.loads(body)
    status, body = await asyncio.to_thread(http_get, f"{worker.url}/v1/profiles/p_0000000000")
    assert status == 404 and "error" in orjson.loads(body)
    status, body = await asyncio.to_thread(http_get, f"{worker.url}/v1/profiles?identifier=nonsense")
    assert status == 400 and "error" in orjson.loads(body)
    status, body = await asyncio.to_thread(http_get, f"{worker.url}/v1/profiles")
    assert status == 400


async def test_metrics_health_and_json_logs(worker, producer, topic_reader):
    resolved = await topic_reader(RESOLVED)
    event = track(userId=unique("u"))
    await produce(producer, EVENTS_WEB, [event, b"not json"])
    await resolved.collect(lambda r: orjson.loads(r.value)["messageId"] == event["messageId"], 1)
    status, body = await asyncio.to_thread(http_get, worker.url + "/metrics")
    assert status == 200
    text = body.decode()
    for name in (
        "cdp_events_consumed_total",
        "cdp_events_processed_total",
        "cdp_events_produced_total",
        'cdp_dead_letters_total{reason="invalid_json"}',
        "cdp_event_latency_seconds_bucket",
        "cdp_redis_call_duration_seconds_count",
        "cdp_batch_size_events_bucket",
    ):
        assert name in text, name
    processed = [l for l in text.splitlines() if l.startswith("cdp_events_processed_total ")]
    assert processed and float(processed[0].split()[-1]) >= 1
    status, body = await asyncio.to_thread(http_get, worker.url + "/readyz")
    assert status == 200 and orjson.loads(body)["status"] == "ready"
    lines = [l for l in worker.log_path.read_text().splitlines() if l.startswith("{")]
    assert lines, "CDP_LOG_FORMAT=json must give JSON lines"
    for line in lines[:50]:
        entry = orjson.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(entry)
