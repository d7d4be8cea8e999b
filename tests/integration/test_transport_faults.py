"""At-least-once on the batch transport, under faults, on real Kafka and Redis.

- SIGKILL the worker at random moments while events stream in, several times,
  restart it each time: every profile's event count equals its input exactly
  (nothing missing, nothing counted twice), every event has a resolved output
  (repeated only as redeliveries of the same record), and the group's committed
  offsets end exactly at the end of the input.
- A second worker joins the group mid-stream, takes partitions, and leaves again:
  the same checks.
- An exception while handling never acks events silently: a record that makes the
  batch fail is dead-lettered with its reason and the rest are processed; an
  exception that escapes the pipeline's own isolation makes the worker retry the
  batch, not ack it. On both transports.

Each test has private input topics (``transport_harness``); Redis database 10.
"""

from __future__ import annotations

import asyncio
import random
import time

import orjson
import pytest
import redis.asyncio as aioredis

from streams.topics import DEAD_LETTER, RESOLVED, delete_topics
from tests.conftest import unique
from tests.integration.transport_support import (
    HarnessWorker,
    Traffic,
    assert_outputs_once_per_event,
    create_topics,
    dead_letters_from,
    make_traffic,
    private_producer,
    metric,
    profile_counts,
    resolved_by_id,
    send,
    settings_for,
    wait_committed_at_end,
    wait_counts,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

DB = 10


async def stream(producer, traffic: Traffic, rate: float) -> None:
    """Produce the traffic at about ``rate`` events/s, in chunks of 50."""
    events = traffic.events
    started = time.monotonic()
    for i in range(0, len(events), 50):
        await send(producer, events[i : i + 50])
        ahead = (i + 50) / rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def wait_progress(store, traffic: Traffic, settings, timeout_s: float = 30.0) -> None:
    """Until the worker applies events it had not applied when this was called."""
    before = sum((await profile_counts(store, traffic.expected, settings)).values())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum((await profile_counts(store, traffic.expected, settings)).values()) > before:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker applied nothing new")


async def check_everything_once(store, resolved, traffic: Traffic, settings, topics) -> None:
    counts = await wait_counts(store, traffic, settings)
    assert counts == dict(traffic.expected), "every profile's event count must equal its input exactly"
    await resolved.collect(lambda r: orjson.loads(r.value).get("messageId") in traffic.message_ids, len(traffic.message_ids))
    await resolved.drain(quiet_s=1.0)
    assert_outputs_once_per_event(resolved_by_id(resolved.seen, traffic.message_ids), traffic.message_ids)
    offsets = await wait_committed_at_end(settings, settings.app_id, topics)
    assert offsets["committed"] == offsets["ends"], "committed offsets = last processed + 1 on every partition"


async def test_sigkill_at_random_moments_loses_nothing_and_counts_nothing_twice(infra, topic_reader):
    async with private_producer(infra) as producer:
        await _sigkill_at_random_moments(infra, topic_reader, producer)


async def _sigkill_at_random_moments(infra, topic_reader, producer):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    topics = await create_topics(infra, "bt-kill")
    settings = settings_for(infra, db=DB, app_id=unique("streamcdp-bt-kill"))
    store = aioredis.from_url(settings.redis_url)
    resolved = await topic_reader(RESOLVED)
    traffic = make_traffic(topics, 5000, people=60, seed=seed)
    # Lingering for more fetches (CDP_BATCH_LINGER_MS) must not change what is acked.
    worker = HarnessWorker(settings, "worker-bt-kill", topics, CDP_BATCH_LINGER_MS="5")
    worker.start()
    feeding = None
    try:
        await worker.wait_ready()
        feeding = asyncio.create_task(stream(producer, traffic, rate=250))
        for _ in range(3):
            await wait_progress(store, traffic, settings)
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            worker.kill()
            worker.start()
            await worker.wait_ready()
        await feeding
        await check_everything_once(store, resolved, traffic, settings, topics)
        assert worker.log_text().count("hot path on the batch transport") == 4, "four incarnations, three kills"
        outputs = sum(len(v) for v in resolved_by_id(resolved.seen, traffic.message_ids).values())
        assert outputs > len(traffic.message_ids), "the kills hit handled but uncommitted records (redelivered)"
    except AssertionError as exc:
        raise AssertionError(f"{exc} (random seed {seed}; worker log {worker.log_path})") from exc
    finally:
        if feeding is not None and not feeding.done():
            feeding.cancel()
        worker.stop()
        await store.aclose()
        await delete_topics(infra, topics)


async def test_a_second_worker_joining_and_leaving_loses_nothing(infra, topic_reader):
    async with private_producer(infra) as producer:
        await _second_worker_joins_and_leaves(infra, topic_reader, producer)


async def _second_worker_joins_and_leaves(infra, topic_reader, producer):
    topics = await create_topics(infra, "bt-join")
    settings = settings_for(infra, db=DB, app_id=unique("streamcdp-bt-join"))
    store = aioredis.from_url(settings.redis_url)
    resolved = await topic_reader(RESOLVED)
    traffic = make_traffic(topics, 4000, people=60, seed=21)
    first = HarnessWorker(settings, "worker-bt-join-1", topics)
    second = HarnessWorker(settings, "worker-bt-join-2", topics)
    first.start()
    feeding = None
    try:
        await first.wait_ready()
        feeding = asyncio.create_task(stream(producer, traffic, rate=300))
        await wait_progress(store, traffic, settings)
        second.start()
        await second.wait_ready()
        deadline = time.monotonic() + 30
        while metric(await second.metrics(), "cdp_events_processed_total") == 0:
            assert time.monotonic() < deadline, "the second worker got no partitions"
            await asyncio.sleep(0.2)
        second.stop()  # SIGTERM: leaves the group; its partitions go back to the first
        assert second.process.returncode == 0, f"the second worker did not stop cleanly:\n{second.tail()}"
        await feeding
        await check_everything_once(store, resolved, traffic, settings, topics)
        assert metric(await first.metrics(), "cdp_events_processed_total") > 0
    finally:
        if feeding is not None and not feeding.done():
            feeding.cancel()
        second.stop()
        first.stop()
        await store.aclose()
        await delete_topics(infra, topics)


@pytest.mark.parametrize("transport", ["batch", "faust"])
async def test_an_exception_in_handling_never_acks_silently(infra, topic_reader, transport):
    async with private_producer(infra) as producer:
        await _exception_in_handling(infra, topic_reader, producer, transport)


async def _exception_in_handling(infra, topic_reader, producer, transport):
    topics = await create_topics(infra, f"bt-fault-{transport}")
    settings = settings_for(infra, db=DB, app_id=unique(f"streamcdp-bt-fault-{transport}"))
    store = aioredis.from_url(settings.redis_url)
    resolved = await topic_reader(RESOLVED)
    letters = await topic_reader(DEAD_LETTER)
    poison, escape = unique("boom-poison"), unique("boom-escape")
    marks = {n: poison for n in (40, 140, 290, 410, 560)}
    marks[300] = escape
    traffic = make_traffic(topics, 600, people=40, seed=5, marks=marks)
    poisoned = traffic.marked[poison]
    for user, message_id in poisoned:  # these end on the dead-letter topic, not on a profile
        traffic.expected[user] -= 1
        traffic.message_ids.discard(message_id)
    worker = HarnessWorker(
        settings, f"worker-bt-fault-{transport}", topics, transport=transport,
        CDP_TEST_POISON=poison, CDP_TEST_ESCAPE=escape, CDP_TEST_ESCAPE_TIMES="2",
    )
    worker.start()
    try:
        await worker.wait_ready()
        await send(producer, traffic.events)
        await check_everything_once(store, resolved, traffic, settings, topics)
        await letters.collect(lambda r: True, len(poisoned), timeout_s=15)
        await letters.drain(quiet_s=0.5)
        dead = dead_letters_from(letters.seen, topics)
        poisoned_ids = {m for _, m in poisoned}
        assert {orjson.loads(r.value)["messageId"] for r in letters.seen if r.value and poison.encode() in r.value} == poisoned_ids
        assert len(dead) == len(poisoned), "exactly the poisoned records are dead-lettered"
        assert {h["cdp.dlq.reason"] for h in dead} == {"processing_error"}
        assert all("injected fault" in h["cdp.dlq.detail"] for h in dead)
        [(escape_user, escape_id)] = traffic.marked[escape]
        assert escape_id in traffic.message_ids
        log = worker.log_text()
        assert log.count("failed; retrying") >= 2, "an escaped exception is retried, not acked"
    finally:
        worker.stop()
        await store.aclose()
        await delete_topics(infra, topics)
