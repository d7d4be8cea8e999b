"""The batch transport (streams/batch_transport.py) end to end, on real Kafka and Redis.

1. The same input through the worker on the batch transport and on faust's own
   transport gives the same Redis state (every profile, compared without its
   time-dependent fields and profile ids) and the same outputs (resolved records per
   messageId, dead letters per source offset).
2. The batch worker's metrics count events, not fetches; its committed offsets are
   exactly the end of its input (last processed + 1) once it is idle.

Each worker reads private input topics (``transport_harness``), so no other worker on
the broker sees the input. Redis databases 10 (batch) and 9 (faust).
"""

from __future__ import annotations

import asyncio
import re

import orjson
import pytest
import redis.asyncio as aioredis

from agents.profiles.store import lookup_profile, read_profile
from streams.topics import DEAD_LETTER, RESOLVED, delete_topics
from tests.conftest import unique
from tests.integration.transport_support import (
    HarnessWorker,
    assert_outputs_once_per_event,
    create_topics,
    dead_letters_from,
    make_traffic,
    private_producer,
    metric,
    resolved_by_id,
    send,
    settings_for,
    wait_committed_at_end,
    wait_counts,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

BATCH_DB = 10
FAUST_DB = 9
EVENTS = 1500
PEOPLE = 120

_PROFILE_ID = re.compile(r"^p_[0-9A-Za-z_-]+$")
# Fields that depend on when the worker ran, not on the input.
_TIME_FIELDS = {"id", "createdAt", "updatedAt", "at", "mergedAt"}


def normalised(value):
    """``value`` without processing-time fields, profile ids replaced by ``p_*``."""
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items() if k not in _TIME_FIELDS}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    if isinstance(value, str) and _PROFILE_ID.match(value):
        return "p_*"
    return value


async def run_worker(infra, topic_reader, *, transport: str, db: int, topics: list[str], traffic) -> dict:
    """One worker over the whole input: its profiles, outputs and metrics."""
    settings = settings_for(infra, db=db, app_id=unique(f"streamcdp-bt-{transport}"))
    store = aioredis.from_url(settings.redis_url)
    resolved = await topic_reader(RESOLVED)
    letters = await topic_reader(DEAD_LETTER)
    worker = HarnessWorker(settings, f"worker-bt-{transport}", topics, transport=transport)
    worker.start()
    try:
        await worker.wait_ready()
        counts = await wait_counts(store, traffic, settings)
        assert counts == dict(traffic.expected), f"{transport}: every profile's event count must equal its input"
        await resolved.collect(lambda r: orjson.loads(r.value).get("messageId") in traffic.message_ids, len(traffic.message_ids))
        await letters.collect(lambda r: True, traffic.malformed, timeout_s=10)
        await resolved.drain(quiet_s=1.0)
        await letters.drain(quiet_s=0.5)
        offsets = await wait_committed_at_end(settings, settings.app_id, topics)
        for _ in range(40):  # the lag gauge is refreshed every 5 s
            samples = await worker.metrics()
            if any(name == "cdp_consumer_lag_events" for name, _ in samples):
                break
            await asyncio.sleep(0.5)
        profiles = {}
        for person in traffic.people:
            profile = await lookup_profile(store, f"user_id:{person.user}", hash_key=settings.id_hash_key, default_region="US")
            profiles[person.user] = profile
        by_id = resolved_by_id(resolved.seen, traffic.message_ids)
        outputs = {}
        for message_id, records in by_id.items():
            owner = await read_profile(store, records[0]["profileId"])
            outputs[message_id] = {**normalised(records[0]), "owner": owner["identifiers"] if owner else None}
        return {
            "settings": settings,
            "profiles": profiles,
            "resolved": by_id,
            "outputs": outputs,
            "dead_letters": {
                (h["cdp.dlq.source.topic"], h["cdp.dlq.source.partition"], h["cdp.dlq.source.offset"]): h["cdp.dlq.reason"]
                for h in dead_letters_from(letters.seen, topics)
            },
            "offsets": offsets,
            "metrics": samples,
            "log": worker.log_text(),
        }
    finally:
        worker.stop()
        await store.aclose()


async def test_batch_and_faust_transports_give_the_same_state_and_outputs(infra, topic_reader):
    topics = await create_topics(infra, "bt-same")
    try:
        traffic = make_traffic(topics, EVENTS, people=PEOPLE, seed=13, anonymous_first=True, malformed_every=97)
        async with private_producer(infra) as producer:
            await send(producer, traffic.events)
        for db in (BATCH_DB, FAUST_DB):
            await aioredis.from_url(settings_for(infra, db=db, app_id="x").redis_url).flushdb()

        batch = await run_worker(infra, topic_reader, transport="batch", db=BATCH_DB, topics=topics, traffic=traffic)
        faust = await run_worker(infra, topic_reader, transport="faust", db=FAUST_DB, topics=topics, traffic=traffic)

        assert "hot path on the batch transport (kafka+batch://" in batch["log"], "the batch worker ran on the batch transport"
        assert "hot path on faust's own transport (kafka://" in faust["log"], "the faust worker ran on faust's transport"
        for run in (batch, faust):
            assert all(p is not None for p in run["profiles"].values())
            assert_outputs_once_per_event(run["resolved"], traffic.message_ids)
            assert len(run["dead_letters"]) == traffic.malformed
            assert run["offsets"]["committed"] == run["offsets"]["ends"], "committed = last processed + 1 on every partition"

        assert {u: normalised(p) for u, p in batch["profiles"].items()} == {
            u: normalised(p) for u, p in faust["profiles"].items()
        }, "the same profiles (without processing times and ids)"
        assert batch["outputs"] == faust["outputs"], "the same resolved record for every event"
        assert batch["dead_letters"] == faust["dead_letters"], "the same dead letters, with the same reasons"

        # Metrics in events, not fetches.
        samples = batch["metrics"]
        total = len(traffic.events)
        assert metric(samples, "cdp_events_consumed_total") == total
        for topic in topics:
            assert metric(samples, "cdp_events_consumed_total", topic=topic) == sum(1 for t, _, _ in traffic.events if t == topic)
        assert metric(samples, "cdp_batch_size_events_sum") == total
        batches = metric(samples, "cdp_batch_size_events_count")
        assert 0 < batches < total, "records arrive in batches"
        assert metric(samples, "cdp_kafka_commit_seconds_count") >= 1, "commits are timed"
        lag = {labels: v for (name, labels), v in samples.items() if name == "cdp_consumer_lag_events"}
        assert {dict(labels)["topic"] for labels in lag} == set(topics), "lag per input partition"
        assert len(lag) == 3 * 4 and not any(lag.values()), f"one series per partition, all caught up: {lag}"
    finally:
        await delete_topics(infra, topics)
