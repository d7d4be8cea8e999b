"""Replaying dead letters (streamcdp/replay.py) on real Kafka, Redis and a real worker:
a record the worker dead-lettered goes back to its source topic and partition,
filtered by reason and time window; a dry run produces nothing; an event whose
cause was fixed is processed, and replaying it again changes nothing."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamcdp.replay import REPLAY_HEADER, ReplayError, parse_time, replay, run_replay
from streams.deadletter import header_map
from streams.topics import DEAD_LETTER, EVENTS_APP, EVENTS_WEB
from tests.conftest import identify, unique
from tests.integration.conftest import http_get, produce

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def _by_key(key: bytes):
    return lambda record: record.key == key


async def _metric(worker, name: str, **labels) -> float:
    _, body = await asyncio.to_thread(http_get, worker.url + "/metrics")
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def _wait_for(check, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.25)


async def test_a_dead_letter_is_replayed_to_its_source_partition_with_filters(worker, producer, topic_reader):
    dead = await topic_reader(DEAD_LETTER)
    web = await topic_reader(EVENTS_WEB)
    key = unique("replay-k").encode()
    bad_schema = orjson.dumps({"type": "track", "event": "Replay Me", "userId": 17, "marker": unique("m")})
    bad_json = b'{"type":"track","event":"x"' + unique("m").encode()
    [meta_schema, _] = await produce(producer, EVENTS_WEB, [bad_schema, bad_json], key=key)

    letters = await dead.collect(_by_key(key), 2, timeout_s=60)
    assert len(letters) == 2, f"the worker dead-lettered {len(letters)} of 2"
    by_reason = {header_map(r.headers)["cdp.dlq.reason"]: r for r in letters}
    assert set(by_reason) == {"schema_violation", "invalid_json"}
    letter = by_reason["schema_violation"]
    stamps = [int(header_map(r.headers)["cdp.dlq.timestamp"]) for r in letters]
    window = {"since": _iso(min(stamps)), "until": _iso(max(stamps) + 1)}

    # A dry run counts and produces nothing (checked below: exactly one copy arrives).
    counted = await replay(worker.settings, reason="schema_violation", dry_run=True, **window)
    assert counted.dry_run and counted.replayed == 0
    assert counted.selected >= 1 and set(counted.by_reason) == {"schema_violation"}

    done = await replay(worker.settings, reason="schema_violation", **window)
    assert done.selected == counted.selected and done.replayed == done.selected
    assert set(done.by_reason) == {"schema_violation"} and set(done.by_topic) == {EVENTS_WEB}
    assert not done.limit_reached

    def replayed_copy(record) -> bool:
        return record.key == key and REPLAY_HEADER in header_map(record.headers)

    copies = await web.collect(replayed_copy, 1, timeout_s=30)
    await web.drain(quiet_s=1.0)
    copies = [r for r in web.seen if replayed_copy(r)]
    assert len(copies) == 1, "one copy of the schema_violation record, none of the invalid_json one"
    [copy] = copies
    assert copy.value == bad_schema
    assert copy.partition == meta_schema.partition, "replayed onto its original partition"
    assert header_map(copy.headers)[REPLAY_HEADER] == f"{DEAD_LETTER}/{letter.partition}/{letter.offset}"

    # The worker handles the replayed record: still invalid, so a new dead letter
    # whose source is the replayed copy.
    def from_copy(record) -> bool:
        h = header_map(record.headers)
        return record.key == key and h.get("cdp.dlq.source.offset") == str(copy.offset) and h.get(
            "cdp.dlq.source.partition"
        ) == str(copy.partition)

    again = await dead.collect(from_copy, 1, timeout_s=60)
    assert len(again) == 1 and again[0].value == bad_schema


async def test_a_fixed_dead_letter_is_processed_and_a_second_replay_changes_nothing(worker, producer, capsys):
    reason = unique("fixed_bug")  # a reason of this test's own: no other dead letter matches it
    user = unique("u")
    event = identify(userId=user, traits={"name": "Replayed"})
    now_ms = int(time.time() * 1000)
    headers = [
        ("cdp.dlq.reason", reason.encode()),
        ("cdp.dlq.detail", b"rejected by a bug that is fixed now"),
        ("cdp.dlq.source.topic", EVENTS_APP.encode()),
        ("cdp.dlq.source.partition", b"0"),
        ("cdp.dlq.source.offset", b"0"),
        ("cdp.dlq.timestamp", str(now_ms).encode()),
    ]
    await producer.send_and_wait(DEAD_LETTER, orjson.dumps(event), key=user.encode(), headers=headers)
    since = _iso(now_ms - 1000)

    # The command's own output: one JSON summary on stdout.
    code = await asyncio.to_thread(run_replay, worker.settings, reason=reason, since=since, dry_run=True)
    assert code == 0
    printed = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["dryRun"] is True and printed["selected"] == 1 and printed["replayed"] == 0
    assert printed["byReason"] == {reason: 1} and printed["byTopic"] == {EVENTS_APP: 1}

    first = await replay(worker.settings, reason=reason, since=since)
    assert (first.selected, first.replayed) == (1, 1)

    async def profile():
        status, body = await asyncio.to_thread(http_get, f"{worker.url}/v1/profiles?identifier=user_id:{user}")
        return orjson.loads(body) if status == 200 else None

    found = await _wait_for(profile, 60, "the replayed event's profile")
    assert found["eventCount"] == 1 and found["traits"]["name"] == "Replayed"

    resends = await _metric(worker, "cdp_events_duplicate_total", kind="resend")
    second = await replay(worker.settings, reason=reason, since=since)
    assert (second.selected, second.replayed) == (1, 1)

    async def dropped():
        return await _metric(worker, "cdp_events_duplicate_total", kind="resend") > resends

    await _wait_for(dropped, 60, "the second replay to be dropped as a duplicate")
    assert (await profile())["eventCount"] == 1, "a replayed event that went through is not counted twice"

    limited = await replay(worker.settings, reason=reason, since=since, limit=0, dry_run=True)
    assert limited.selected == 0 and limited.limit_reached


async def test_replay_refuses_bad_arguments(infra):
    with pytest.raises(ReplayError, match="not a time"):
        await replay(infra, since="yesterday", dry_run=True)
    with pytest.raises(ReplayError, match="window is empty"):
        await replay(infra, since="2026-11-20T10:00:00Z", until="2026-11-20T09:00:00Z", dry_run=True)
    with pytest.raises(ReplayError, match="limit"):
        await replay(infra, limit=-1, dry_run=True)
    with pytest.raises(ReplayError, match="does not exist"):
        await replay(infra, source=unique("cdp.no-such-topic"), dry_run=True)


async def test_parse_time() -> None:
    assert parse_time("2026-11-20T10:00:00Z", 0) == parse_time("2026-11-20T11:00:00+01:00", 0)
    assert parse_time("2026-11-20T10:00:00", 0) == parse_time("2026-11-20T10:00:00.000Z", 0)
    assert parse_time("2026-11-20", 0) == parse_time("2026-11-20T00:00:00Z", 0)
    assert parse_time("30m", 3_600_000) == 1_800_000
    with pytest.raises(ReplayError):
        parse_time("30", 0)  # a bare number is ambiguous: give a unit or a date
