"""Faults while events stream in, against a real worker process, real Kafka and Redis.

1. Redis, with its append-only file, is paused (slow), then killed (SIGKILL) and
   later stopped (SIGTERM), each time restarted on the same port and directory,
   while the worker handles a stream of events. While Redis is away the worker
   stays up, says so (``/readyz`` 503, ``cdp_worker_ready`` 0) and stops consuming
   (no batch taken in, no offset committed, the backlog grows in Kafka) instead of
   dropping or buffering events; when Redis returns it recovers by itself.
2. The Kafka broker is stopped for longer than the collector's produce timeout and
   started again, while a producer streams events and an SDK-like client posts a
   batch to the collector: the collector answers 503 and is not ready while the
   broker is away, and takes the same batch (retried, same messageIds) once it is
   back; the worker carries on.
3. A second worker joins the consumer group mid-stream and leaves again (the
   transport tests check counts and outputs for this; here also segments).
4. Redis dies exactly between a batch's profile step and its segment step (one
   batch, in process): the retried segment step must publish every transition.

After 1-3, every profile's event count, computed traits (order count, spend per
currency, counts per event name) and history equal the values computed here from
the input alone; every membership of two segments is right (a trait segment that
people enter and leave many times, an event-count segment they enter at their 3rd
probe event and leave at their 6th); and every transition is published: per person
and segment, the published changes (one per CloudEvents id: a repeat is a
redelivery with the same id) are exactly the transitions of the input, in order.

The Redis and Kafka restarts use a private redis-server and a private broker
(``private_infra``): the shared ones are never stopped. Tests 1 and 3 read private
input topics on the shared broker (``transport_harness``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import random
import shutil
import signal
import time

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agents.pipeline import Pipeline
from agents.profiles.computed import ComputedTraits
from agents.profiles.store import lookup_profile
from agents.segments.registry import SegmentRegistry
from agents.segments.rules import parse_segment
from streams.metrics import Metrics
from streams.output import AiokafkaProducer
from streams.records import Record
from streams.redis_client import connect_hot_path
from streams.segment_definitions import publish
from streams.settings import Settings
from streams.topics import EVENTS_APP, EVENTS_POS, EVENTS_WEB, INBOUND, SEGMENT_CHANGES, all_topics, delete_topics, ensure_topics
from tests.conftest import identify, track, unique
from tests.integration.conftest import ROOT, CollectorProcess, http_get
from tests.integration.private_infra import PrivateKafka, PrivateRedis
from tests.integration.test_worker_crash import expected_profile, shown
from tests.integration.transport_support import (
    HarnessWorker,
    committed_offsets,
    create_topics,
    end_offsets,
    metric,
    settings_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

USERS = 40
CHUNK = 50
SHARED_DB = 10  # the join/leave test's Redis database (the transport tests' one)


# ------------------------------------------------------------------ segments


@dataclasses.dataclass(frozen=True)
class Probes:
    """Two segments of this test, and the trait and event name that drive them."""

    tier_trait: str
    probe_event: str
    tier_segment: str
    count_segment: str

    @classmethod
    def fresh(cls) -> "Probes":
        tag = unique("f").split("-")[1]
        return cls(f"tier_{tag}", f"Fault Probe {tag}", f"fault-tier-{tag}", f"fault-count-{tag}")

    def documents(self) -> list[dict]:
        return [
            {"id": self.tier_segment, "version": 1, "rule": {"trait": self.tier_trait, "eq": "pro"}},
            {"id": self.count_segment, "version": 1,
             "rule": {"event": self.probe_event, "count": {"gte": 3, "lt": 6}}},
        ]

    async def apply(self, settings: Settings) -> None:
        """Validate and publish both, as ``streamcdp segments apply`` does."""
        computed = ComputedTraits.load(settings.computed_traits or None)
        for document in self.documents():
            segment = parse_segment(document, source="test", computed=computed)
            await publish(settings, segment.id, segment.document)

    async def remove(self, settings: Settings) -> None:
        for segment_id in (self.tier_segment, self.count_segment):
            await publish(settings, segment_id, None)

    @property
    def ids(self) -> set[str]:
        return {self.tier_segment, self.count_segment}


# ------------------------------------------------------------------ traffic


class Traffic:
    """Events of ``USERS`` people, made as they are sent. Each person's events go to
    one topic with one key (per-partition order) and carry increasing, distinct
    event times, so profiles, histories and segment transitions follow from the
    input alone."""

    def __init__(self, topics: list[str], probes: Probes, seed: int) -> None:
        self.rng = random.Random(seed)
        self.probes = probes
        self.people = [(unique("fu"), topics[i % len(topics)]) for i in range(USERS)]
        self.sent: dict[str, list[dict]] = {user: [] for user, _ in self.people}
        self.count = 0
        self._ms = 1_795_132_800_000  # 2026-11-20T00:00:00Z

    def chunk(self, size: int) -> list[tuple[str, bytes, bytes]]:
        rng, probes = self.rng, self.probes
        out = []
        for _ in range(size):
            user, topic = rng.choice(self.people)
            roll = rng.random()
            if roll < 0.15:
                traits = {"n": rng.randint(0, 9), probes.tier_trait: rng.choice(("pro", "free"))}
                event = identify(userId=user, traits=traits)
            elif roll < 0.3:
                event = track(userId=user, anonymousId=None, event="Order Completed", properties={
                    "total": rng.randint(100, 9999) / 100, "currency": rng.choice(("EUR", "USD"))})
            elif roll < 0.37:
                event = track(userId=user, anonymousId=None, event=probes.probe_event)
            else:
                event = track(userId=user, anonymousId=None)
            self._ms += rng.randint(1, 20)
            event["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self._ms // 1000)) + f".{self._ms % 1000:03d}Z"
            self.sent[user].append(event)
            out.append((topic, user.encode(), orjson.dumps(event)))
        self.count += size
        return out

    def expected_changes(self) -> tuple[dict[tuple[str, str], list[tuple[int, str]]], dict[str, set[str]]]:
        """Per (person, segment), the transitions in input order as (position of the
        causing event among the person's events, entered/exited); and each person's
        memberships at the end."""
        probes = self.probes
        changes: dict[tuple[str, str], list[tuple[int, str]]] = {}
        final: dict[str, set[str]] = {}
        for user, events in self.sent.items():
            member = {probes.tier_segment: False, probes.count_segment: False}
            probes_seen = 0
            for position, event in enumerate(events):
                now = dict(member)
                if event["type"] == "identify" and probes.tier_trait in event["traits"]:
                    now[probes.tier_segment] = event["traits"][probes.tier_trait] == "pro"
                if event.get("event") == probes.probe_event:
                    probes_seen += 1
                    now[probes.count_segment] = 3 <= probes_seen < 6
                for segment, held in now.items():
                    if held != member[segment]:
                        changes.setdefault((user, segment), []).append((position, "entered" if held else "exited"))
                member = now
            final[user] = {segment for segment, held in member.items() if held}
        return changes, final


async def send_chunk(producer: AIOKafkaProducer, chunk: list[tuple[str, bytes, bytes]], deadline_s: float = 90.0) -> int:
    """Send a chunk until every record of it is acknowledged; a chunk that failed is
    sent again whole (its records keep their messageIds: the worker drops the
    copies as resends). Returns how many times it was sent."""
    deadline = time.monotonic() + deadline_s
    attempts = 0
    while True:
        attempts += 1
        try:
            futures = [await producer.send(topic, value, key=key) for topic, key, value in chunk]
            await asyncio.gather(*futures)
            return attempts
        except Exception:  # noqa: BLE001 - the broker is away: send the chunk again
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


class Feeder:
    """Streams the traffic at about ``rate`` events/s until ``stop()`` was called
    and at least ``minimum`` events were sent."""

    def __init__(self, producer: AIOKafkaProducer, traffic: Traffic, rate: float, minimum: int) -> None:
        self.producer = producer
        self.traffic = traffic
        self.rate = rate
        self.minimum = minimum
        self.resends = 0
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        started = time.monotonic()
        while not (self._stop.is_set() and self.traffic.count >= self.minimum):
            self.resends += await send_chunk(self.producer, self.traffic.chunk(CHUNK)) - 1
            ahead = self.traffic.count / self.rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def sent_after(self, count: int, timeout_s: float = 60.0) -> None:
        """Until at least ``count`` more events were sent (the stream goes on)."""
        target = self.traffic.count + count
        deadline = time.monotonic() + timeout_s
        while self.traffic.count < target:
            assert not self.task.done(), "the feeder stopped"
            assert time.monotonic() < deadline, "the feeder is stuck"
            await asyncio.sleep(0.05)

    async def finish(self) -> None:
        self._stop.set()
        await self.task

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()


@dataclasses.dataclass
class Producer:
    bootstrap: str

    async def __aenter__(self) -> AIOKafkaProducer:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2, enable_idempotence=True)
        await self.producer.start()
        return self.producer

    async def __aexit__(self, *exc) -> None:
        await self.producer.stop()


# ------------------------------------------------------------------ reading outputs


async def topic_ends(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        for _ in range(50):
            partitions = consumer.partitions_for_topic(topic)
            if partitions:
                break
            await consumer._client.force_metadata_update()  # noqa: SLF001 - metadata of a new topic
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or ())]
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def read_since(bootstrap: str, topic: str, starts: dict[int, int]) -> list:
    """The records of ``topic`` from ``starts`` to the ends it has now."""
    ends = await topic_ends(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_bytes=64 * 1024 * 1024)
    await consumer.start()
    records = []
    try:
        tps = [TopicPartition(topic, p) for p in ends if ends[p] > starts.get(p, 0)]
        if not tps:
            return records
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, starts.get(tp.partition, 0))
        left = {tp: ends[tp.partition] for tp in tps}
        deadline = time.monotonic() + 30
        while left and time.monotonic() < deadline:
            for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                for record in batch:
                    if record.offset < left.get(tp, 0):
                        records.append(record)
                if await consumer.position(tp) >= left.get(tp, 0):
                    left.pop(tp, None)
        return records
    finally:
        await consumer.stop()


# ------------------------------------------------------------------ checks


async def profiles_of(store, users, settings) -> dict[str, dict | None]:
    return {
        user: await lookup_profile(store, f"user_id:{user}", hash_key=settings.id_hash_key, default_region="US")
        for user in users
    }


async def wait_applied(store, traffic: Traffic, settings: Settings, timeout_s: float = 90.0) -> dict[str, int]:
    """Per-user event counts once they add up to what was sent (or at the deadline)."""
    total = traffic.count
    deadline = time.monotonic() + timeout_s
    while True:
        profiles = await profiles_of(store, traffic.sent, settings)
        counts = {user: p["eventCount"] if p else 0 for user, p in profiles.items()}
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.5)


async def check_results(store, traffic: Traffic, settings: Settings, bootstrap: str, change_starts: dict[int, int],
                        *, exact_changes: bool = True) -> None:
    """Counters, computed traits, histories, segment transitions and memberships,
    all against the input. ``exact_changes=False``: a profile's transitions may be
    merged into their net change where a Redis outage fell between a batch's profile
    step and its segment commit (docs/segments.md, "Guarantees")."""
    counts = await wait_applied(store, traffic, settings)
    expected_counts = {user: len(events) for user, events in traffic.sent.items()}
    assert counts == expected_counts, "every profile's event count must equal its input exactly"
    profiles = await profiles_of(store, traffic.sent, settings)
    for user, events in traffic.sent.items():
        assert shown(profiles[user]) == expected_profile(events), f"{user}: computed traits or history differ from the input"

    probes = traffic.probes
    expected, final = traffic.expected_changes()
    assert sum(map(len, expected.values())) > 2 * USERS, "the input makes many transitions"
    user_of = {p["id"]: user for user, p in profiles.items()}
    # Until the changes match, or nothing new was published for 4 s (every event is
    # applied by now; only the last batches' outputs may still be on their way).
    deadline = time.monotonic() + 60
    last, quiet_since = None, time.monotonic()
    while True:
        published = await segment_changes(bootstrap, change_starts, probes, user_of, traffic)
        problems = compare_changes(expected, published) if exact_changes else net_changes(expected, published)
        if published != last:
            last, quiet_since = published, time.monotonic()
        if not problems or time.monotonic() - quiet_since > 4 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    profiles = await profiles_of(store, traffic.sent, settings)
    for user, profile in profiles.items():
        assert set(profile["segments"]) & probes.ids == final[user], f"{user}: memberships differ from the input"
    assert not problems, f"{len(problems)} of {len(expected)} (person, segment) transition sequences differ " \
        f"from the input, e.g.:\n" + "\n".join(problems[:4])


async def segment_changes(bootstrap: str, starts: dict[int, int], probes: Probes, user_of: dict[str, str],
                          traffic: Traffic) -> dict[tuple[str, str], dict[str, tuple[int, str]]]:
    """The published changes of the test's segments for its people: per (person,
    segment), CloudEvents id → (position of the cause event among the person's
    events, kind). One id must always stand for the same change."""
    position = {e["messageId"]: i for events in traffic.sent.values() for i, e in enumerate(events)}
    published: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}
    bodies: dict[str, tuple] = {}
    for record in await read_since(bootstrap, SEGMENT_CHANGES, starts):
        body = orjson.loads(record.value)
        data = body["data"]
        if data["segmentId"] not in probes.ids or body["subject"] not in user_of:
            continue
        kind = body["type"].rsplit(".", 1)[1]
        content = (body["subject"], data["segmentId"], data["segmentVersion"], kind, data["causeEventId"], data["cause"])
        assert bodies.setdefault(body["id"], content) == content, f"one CloudEvents id, two different changes: {body}"
        cause = position.get(data["causeEventId"], -1)  # -1: not caused by an input event (timer, back-fill)
        published.setdefault((user_of[body["subject"]], data["segmentId"]), {})[body["id"]] = (cause, kind)
    return published


def net_changes(expected: dict[tuple[str, str], list[tuple[int, str]]],
                published: dict[tuple[str, str], dict[str, tuple[int, str]]]) -> list[str]:
    """What differs, per (person, segment), when transitions may be merged into their
    net change: the published ones, ordered by cause, alternate entered / exited
    from entered, end where the expected ones end, and are no more than expected."""
    problems = []
    for key in sorted(expected.keys() | published.keys()):
        want = [kind for _, kind in expected.get(key, [])]
        got = [kind for _, kind in sorted(published.get(key, {}).values())]
        alternating = all(kind == ("entered" if i % 2 == 0 else "exited") for i, kind in enumerate(got))
        if not alternating or len(got) > len(want) or len(got) % 2 != len(want) % 2:
            problems.append(f"{key}: expected {expected.get(key, [])}, published {sorted(published.get(key, {}).values())}")
    return problems


def compare_changes(expected: dict[tuple[str, str], list[tuple[int, str]]],
                    published: dict[tuple[str, str], dict[str, tuple[int, str]]]) -> list[str]:
    """What differs, per (person, segment). The published changes, one per distinct
    id (a duplicate with the same id is a redelivery), ordered by their cause, must
    be exactly the expected transitions; each may name as its cause the event that
    made it or a later event of the person (the worker evaluates a batch's events
    of one profile together when the profile changed under it), but never one at or
    after the cause of the next expected transition."""
    problems = []
    for key in sorted(expected.keys() | published.keys()):
        want = expected.get(key, [])
        got = sorted(published.get(key, {}).values())
        if [kind for _, kind in got] != [kind for _, kind in want]:
            problems.append(f"{key}: expected {want}, published {got}")
            continue
        bounds = [position for position, _ in want[1:]] + [10**9]
        if any(not (w <= g < bound) for (w, _), (g, _), bound in zip(want, got, bounds)):
            problems.append(f"{key}: expected {want}, published with causes {got}")
    return problems


# ------------------------------------------------------------------ helpers


def remove_worker_data(app_id: str) -> None:
    """faust's data directory of a test's worker group (``<app id>-data`` in the
    directory the worker ran in)."""
    shutil.rmtree(ROOT / f"{app_id}-data", ignore_errors=True)


def store_client(url: str) -> aioredis.Redis:
    """The test's own Redis client: it reconnects across a Redis restart."""
    return aioredis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 20),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


async def get(url: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(http_get, url, 3.0)


async def wait_status(url: str, status: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    last = (0, b"")
    while time.monotonic() < deadline:
        last = await get(url)
        if last[0] == status:
            return last[1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer {status} within {timeout_s}s (last: {last[0]} {last[1][:200]!r})")


async def wait_progress(store, traffic: Traffic, settings: Settings, timeout_s: float = 30.0) -> None:
    """Until the worker applies events it had not applied when this was called."""
    before = sum((await wait_applied(store, traffic, settings, timeout_s=0)).values())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum((await wait_applied(store, traffic, settings, timeout_s=0)).values()) > before:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker applied nothing new")


async def group_position(settings: Settings, group: str, topics: list[str]) -> tuple[int, int]:
    """(sum of the group's committed offsets, sum of the topics' end offsets)."""
    ends = await end_offsets(settings, topics)
    committed = await committed_offsets(settings, group, ends)
    return sum(c or 0 for c in committed.values()), sum(ends.values())


# ------------------------------------------------------------------ 1. Redis


async def test_redis_slow_killed_and_restarted_mid_stream(infra, tmp_path):
    probes = Probes.fresh()
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    await server.wait_ready()
    topics = await create_topics(infra, "fault-redis")
    settings = dataclasses.replace(infra, redis_url=server.url, app_id=unique("streamcdp-fault-redis"))
    store = store_client(settings.redis_url)
    await probes.apply(settings)
    change_starts = await topic_ends(settings.kafka_bootstrap, SEGMENT_CHANGES)
    traffic = Traffic(topics, probes, seed=31)
    worker = HarnessWorker(settings, "worker-fault-redis", topics)
    worker.start()
    feeder = None
    try:
        await worker.wait_ready()
        async with Producer(settings.kafka_bootstrap) as producer:
            feeder = Feeder(producer, traffic, rate=250, minimum=4000)
            await wait_progress(store, traffic, settings)

            # Slow: Redis holds its connections but answers nothing.
            server.pause()
            try:
                body = await wait_status(worker.url + "/readyz", 503, timeout_s=15)
                assert b"redis" in body, body
            finally:
                server.resume()
            await wait_status(worker.url + "/readyz", 200, timeout_s=30)
            await feeder.sent_after(300)
            await wait_progress(store, traffic, settings)

            # Down: SIGKILL. The worker must hold on, say so, and stop consuming.
            errors_before = metric(await worker.metrics(), "cdp_redis_errors_total")
            server.stop(signal.SIGKILL)
            body = await wait_status(worker.url + "/readyz", 503, timeout_s=15)
            assert b"redis" in body, body
            await asyncio.sleep(2.0)  # the batch in flight is stuck retrying; the last commit is done
            first = await worker.metrics()
            committed_1, ends_1 = await group_position(settings, settings.app_id, topics)
            await feeder.sent_after(500)  # input keeps arriving meanwhile
            second = await worker.metrics()
            committed_2, ends_2 = await group_position(settings, settings.app_id, topics)
            assert worker.process.poll() is None, f"the worker died while Redis was down:\n{worker.tail()}"
            assert metric(first, "cdp_worker_ready") == 0 and metric(second, "cdp_worker_ready") == 0
            assert metric(second, "cdp_events_consumed_total") == metric(first, "cdp_events_consumed_total"), \
                "no batch is taken in while Redis is down"
            assert committed_2 == committed_1, "nothing is acked while Redis is down"
            assert ends_2 - committed_2 >= ends_1 - committed_1 + 500, "the backlog stays in Kafka"
            assert metric(second, "cdp_redis_errors_total") > errors_before, "the failed round trips are counted"
            server.start()
            await server.wait_ready()
            await wait_status(worker.url + "/readyz", 200, timeout_s=30)
            assert metric(await worker.metrics(), "cdp_worker_ready") == 1
            await wait_progress(store, traffic, settings)
            committed_3, _ = await group_position(settings, settings.app_id, topics)
            for _ in range(100):
                if committed_3 > committed_2:
                    break
                await asyncio.sleep(0.1)
                committed_3, _ = await group_position(settings, settings.app_id, topics)
            assert committed_3 > committed_2, "the worker commits again once Redis is back"

            # Down again: SIGTERM (Redis writes its AOF and exits), back after 2 s.
            await feeder.sent_after(300)
            server.stop(signal.SIGTERM)
            await wait_status(worker.url + "/readyz", 503, timeout_s=15)
            await asyncio.sleep(2.0)
            server.start()
            await server.wait_ready()
            await wait_status(worker.url + "/readyz", 200, timeout_s=30)
            await feeder.finish()
        assert worker.process.poll() is None, f"the worker exited during the test:\n{worker.tail()}"
        # A round trip cut by the kill may have run in Redis without its answer
        # arriving: those events come back as redeliveries whose segment commit never
        # happened, and are evaluated on the profile's current state.
        await check_results(store, traffic, settings, settings.kafka_bootstrap, change_starts, exact_changes=False)
        assert "Redis" in worker.log_text() and "retrying" in worker.log_text()
    except AssertionError as exc:
        raise AssertionError(f"{exc} (worker log {worker.log_path}; redis log {server.log_path})") from exc
    finally:
        if feeder is not None:
            feeder.cancel()
        worker.stop()
        await store.aclose()
        server.stop(signal.SIGKILL)
        await probes.remove(settings)
        await delete_topics(infra, topics)
        remove_worker_data(settings.app_id)


# ------------------------------------------------------------------ 2. Kafka


async def test_kafka_broker_restart_mid_stream(infra, tmp_path):
    broker = PrivateKafka(tmp_path / "kafka")
    broker.start()
    worker = collector = feeder = None
    store = store_client(settings_for(infra, db=SHARED_DB, app_id="x").redis_url)
    try:
        await broker.wait_ready()
        settings = settings_for(
            infra, db=SHARED_DB, app_id=unique("streamcdp-fault-kafka"), kafka_bootstrap=broker.bootstrap, topic_partitions=4
        )
        await ensure_topics(settings, all_topics(), timeout_s=60)
        probes = Probes.fresh()
        await probes.apply(settings)
        topics = [EVENTS_WEB, EVENTS_APP, EVENTS_POS]
        traffic = Traffic(topics, probes, seed=47)
        write_key = unique("wk")
        collector = CollectorProcess("collector-fault-kafka", broker.bootstrap, {"CDP_WRITE_KEYS": f"{write_key}=web"})
        collector.start()
        worker = HarnessWorker(settings, "worker-fault-kafka", list(INBOUND), CDP_TOPIC_PARTITIONS="4")
        worker.start()
        await worker.wait_ready()
        await collector.wait_for("/readyz")
        # What an SDK sends: a batch with its own messageIds, sent again after a 503.
        sdk_user = unique("sdk")
        sdk_batch = {"batch": [
            {"type": "track", "event": "Posted", "userId": sdk_user, "messageId": unique("m"),
             "timestamp": "2026-11-21T10:00:00.000Z"} for _ in range(5)
        ]}

        async with Producer(broker.bootstrap) as producer:
            feeder = Feeder(producer, traffic, rate=250, minimum=3000)
            await wait_progress(store, traffic, settings)
            broker.stop(signal.SIGTERM)
            # Longer than the collector's produce timeout (10 s) without a broker: 503.
            status, answer = await post(collector.url, write_key, sdk_batch)
            assert status == 503 and answer["code"] == "kafka_unavailable", (status, answer)
            body = await wait_status(collector.url + "/readyz", 503, timeout_s=15)
            assert b"Kafka" in body, body
            assert worker.process.poll() is None, f"the worker died while the broker was down:\n{worker.tail()}"
            broker.start()
            await broker.wait_ready()
            await wait_status(collector.url + "/readyz", 200, timeout_s=30)
            status, answer = await post(collector.url, write_key, sdk_batch)  # the SDK retries
            assert (status, answer) == (200, {"success": True})
            await feeder.sent_after(500)
            await feeder.finish()
        await wait_status(worker.url + "/readyz", 200, timeout_s=60)
        assert worker.process.poll() is None, f"the worker exited during the test:\n{worker.tail()}"
        await check_results(store, traffic, settings, broker.bootstrap, {})
        sdk_profile = await lookup_profile(store, f"user_id:{sdk_user}", hash_key=settings.id_hash_key, default_region="US")
        assert sdk_profile is not None and sdk_profile["eventCount"] == 5, "the retried batch counts once"
    except AssertionError as exc:
        logs = f"worker log {worker.log_path if worker else '-'}; broker log {broker.directory / 'server.log'}"
        raise AssertionError(f"{exc} ({logs})") from exc
    finally:
        if feeder is not None:
            feeder.cancel()
        if worker is not None:
            worker.stop()
        if collector is not None and collector.process is not None:
            collector.terminate()
        await store.aclose()
        broker.remove()
        if worker is not None:
            remove_worker_data(worker.settings.app_id)


async def post(url: str, key: str, body: dict) -> tuple[int, dict]:
    """POST a batch as the SDKs do (Basic auth with the write key)."""
    import aiohttp

    auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(f"{url}/v1/batch", data=orjson.dumps(body),
                                headers={"Authorization": auth, "Content-Type": "application/json"}) as response:
            return response.status, await response.json(content_type=None)


# ------------------------------------------------------------------ 3. rebalance


async def test_a_second_worker_joining_and_leaving_keeps_segments_right(infra):
    probes = Probes.fresh()
    topics = await create_topics(infra, "fault-join")
    settings = settings_for(infra, db=SHARED_DB, app_id=unique("streamcdp-fault-join"))
    store = store_client(settings.redis_url)
    await probes.apply(settings)
    change_starts = await topic_ends(settings.kafka_bootstrap, SEGMENT_CHANGES)
    traffic = Traffic(topics, probes, seed=53)
    first = HarnessWorker(settings, "worker-fault-join-1", topics)
    second = HarnessWorker(settings, "worker-fault-join-2", topics)
    first.start()
    feeder = None
    try:
        await first.wait_ready()
        async with Producer(settings.kafka_bootstrap) as producer:
            feeder = Feeder(producer, traffic, rate=250, minimum=3500)
            await wait_progress(store, traffic, settings)
            second.start()
            await second.wait_ready()
            deadline = time.monotonic() + 30
            while metric(await second.metrics(), "cdp_events_processed_total") == 0:
                assert time.monotonic() < deadline, "the second worker got no partitions"
                await asyncio.sleep(0.2)
            await feeder.sent_after(300)
            second.stop()  # SIGTERM: it leaves the group; its partitions go back to the first
            assert second.process.returncode == 0, f"the second worker did not stop cleanly:\n{second.tail()}"
            await feeder.sent_after(300)
            await feeder.finish()
        # A worker that loses a partition in a rebalance between a batch's profile
        # step and its segment commit leaves those events to the new owner as
        # redeliveries without a commit: their transitions may be merged into the net
        # change (docs/segments.md, "Guarantees").
        await check_results(store, traffic, settings, settings.kafka_bootstrap, change_starts, exact_changes=False)
    finally:
        if feeder is not None:
            feeder.cancel()
        second.stop()
        first.stop()
        await store.aclose()
        await probes.remove(settings)
        await delete_topics(infra, topics)
        remove_worker_data(settings.app_id)


# ------------------------------------------------------------------ 4. Redis dies between two steps


async def test_redis_dying_between_the_profile_and_the_segment_step_loses_no_transition(infra, producer, tmp_path):
    """One batch of one person's three identify calls (tier pro, free, pro): three
    transitions. Redis is killed after the profile step applied the batch and
    before the segment step, and comes back half a second later: the pipeline
    retries, and must publish the same three transitions (each with its own cause)."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    await server.wait_ready()
    settings = dataclasses.replace(infra, redis_url=server.url)
    client = connect_hot_path(server.url)  # the worker's client
    registry = SegmentRegistry(ComputedTraits.load())
    registry.loaded.set()
    probes = Probes.fresh()
    for document in probes.documents():
        registry.apply_record(document["id"].encode(), orjson.dumps(document))
    pipeline = Pipeline(settings, client, AiokafkaProducer(producer), Metrics(), registry=registry)
    apply_segments = pipeline.segments.after_apply
    restarted: list[asyncio.Task] = []

    async def restart_soon() -> None:
        await asyncio.sleep(0.5)
        server.start()

    async def redis_dies_first(*args):
        if not restarted:  # the fault, once: the profile step is done, the segment step not begun
            server.stop(signal.SIGKILL)
            restarted.append(asyncio.create_task(restart_soon()))
        return await apply_segments(*args)

    pipeline.segments.after_apply = redis_dies_first
    user = unique("u")
    events = [
        identify(userId=user, traits={probes.tier_trait: tier}, timestamp=f"2026-11-20T10:00:00.00{i}Z")
        for i, tier in enumerate(("pro", "free", "pro"))
    ]
    records = [Record(EVENTS_WEB, 0, 70_000_000 + i, user.encode(), orjson.dumps(e), int(time.time() * 1000))
               for i, e in enumerate(events)]
    try:
        result = await asyncio.wait_for(pipeline.handle(records), timeout=60)
        await restarted[0]
        assert result.processed == 3 and result.dead_lettered == 0
        profile = await lookup_profile(client, f"user_id:{user}", hash_key=settings.id_hash_key, default_region="US")
        assert profile["eventCount"] == 3 and profile["segments"] == [probes.tier_segment]
        cause = {e["messageId"]: i for i, e in enumerate(events)}
        published = [
            (orjson.loads(m.value)["type"].rsplit(".", 1)[1], cause[orjson.loads(m.value)["data"]["causeEventId"]])
            for m in result.outputs if m.topic == SEGMENT_CHANGES
        ]
        assert published == [("entered", 0), ("exited", 1), ("entered", 2)], \
            "every transition of the batch is published with its own cause after Redis came back"
    finally:
        await client.aclose()
        server.stop(signal.SIGKILL)
