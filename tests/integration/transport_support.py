"""What the batch transport's integration tests share: workers on private input
topics (``transport_harness``), the topics themselves, traffic, and the checks of
at-least-once (per-profile counts, outputs, committed offsets)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agents.profiles.store import lookup_profile
from streams.deadletter import header_map
from streams.settings import Settings
from tests.conftest import identify, track, unique
from tests.integration.conftest import ROOT, WorkerProcess, _redis_url_with_db, http_get

CHANNELS = ("web", "app", "pos")


def settings_for(base: Settings, *, db: int, app_id: str, **changes) -> Settings:
    return dataclasses.replace(base, redis_url=_redis_url_with_db(base.redis_url, db), app_id=app_id, **changes)


class HarnessWorker(WorkerProcess):
    """The real worker (``python -m tests.integration.transport_harness``) reading
    ``topics`` instead of the product's input topics, on ``transport``."""

    def __init__(self, settings: Settings, name: str, topics: list[str], *, transport: str = "batch", **env: str) -> None:
        super().__init__(settings, name)
        self.topics = topics
        self.transport = transport
        self.extra_env = env

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(CDP_KAFKA_TRANSPORT=self.transport, CDP_TEST_INBOUND=",".join(self.topics), **self.extra_env)
        return env

    def start(self) -> None:
        # A fresh log for each test's worker, appended to across its restarts.
        log = open(self.log_path, "ab" if self.process is not None else "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.transport_harness"],
            cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        status, body = await asyncio.to_thread(http_get, self.url + "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


# ------------------------------------------------------------------ topics


async def create_topics(settings: Settings, prefix: str, partitions: int = 4) -> list[str]:
    """Fresh input topics ``test.<prefix>.<id>.{web,app,pos}``, leaders elected."""
    run = unique(prefix)
    names = [f"test.{run}.{channel}" for channel in CHANNELS]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
        for _ in range(300):
            described = await admin.describe_topics(names)
            if all(
                t["error_code"] == 0 and len(t["partitions"]) == partitions and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ):
                return names
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topics {names} have no leaders")
    finally:
        await admin.close()


async def end_offsets(settings: Settings, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers(), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - metadata of new topics
            partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        return await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings, group: str, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers(), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()


async def wait_committed_at_end(settings: Settings, group: str, topics: list[str], timeout_s: float = 30.0) -> dict:
    """Committed offsets of ``group`` once they equal the end of every partition of
    ``topics`` (or, after ``timeout_s``, whatever they are): exactly last processed + 1."""
    ends = await end_offsets(settings, topics)
    deadline = time.monotonic() + timeout_s
    while True:
        # An empty partition has nothing committed (None): its end is 0.
        committed = {tp: 0 if c is None else c for tp, c in (await committed_offsets(settings, group, ends)).items()}
        if committed == ends or time.monotonic() > deadline:
            return {"committed": committed, "ends": ends}
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------ traffic


@dataclasses.dataclass
class Person:
    user: str
    anon: str
    topic: str
    key: bytes


@dataclasses.dataclass
class Traffic:
    """Generated events: each person's events go to one topic with one key, so their
    order is the same whoever reads them (per-partition order)."""

    people: list[Person]
    events: list[tuple[str, bytes, bytes]]  # (topic, key, value)
    expected: Counter  # user -> events that must be counted on their profile
    message_ids: set[str]
    malformed: int = 0
    marked: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)  # marker -> [(user, messageId)]


def make_traffic(topics: list[str], count: int, *, people: int, seed: int, anonymous_first: bool = False,
                 malformed_every: int = 0, marks: dict[int, str] | None = None) -> Traffic:
    """``count`` events of ``people`` people; event ``n`` carries ``marks[n]`` in its
    properties (the harness's fault markers); every ``malformed_every``-th is
    truncated JSON."""
    rng = random.Random(seed)
    crowd = []
    for i in range(people):
        user = unique(f"tp{i}")
        crowd.append(Person(user, unique("anon"), topics[i % len(topics)], user.encode()))
    seen: Counter = Counter()  # events so far per person
    events: list[tuple[str, bytes, bytes]] = []
    expected: Counter = Counter()
    ids: set[str] = set()
    malformed = 0
    marked: dict[str, list[tuple[str, str]]] = {}
    for n in range(count):
        person = rng.choice(crowd)
        if malformed_every and n % malformed_every == malformed_every - 1:
            events.append((person.topic, person.key, b'{"type":"track","event":"x"'))  # truncated JSON
            malformed += 1
            continue
        if anonymous_first and not seen[person.user]:
            # Browsing before signing in: a profile of the anonymous id alone, linked
            # to the user by the identify that follows.
            event = track(anonymousId=person.anon, properties={"step": "landing"})
        elif seen[person.user] <= int(anonymous_first) or rng.random() < 0.2:
            event = identify(
                userId=person.user, anonymousId=person.anon,
                traits={"email": f"{person.user}@example.com", "n": rng.randint(0, 9), "plan": rng.choice(["a", "b"])},
            )
        else:
            event = track(userId=person.user, anonymousId=None, properties={"n": rng.randint(0, 99)})
        seen[person.user] += 1
        if marks and n in marks:
            event.setdefault("properties", {})["marker"] = marks[n]
            marked.setdefault(marks[n], []).append((person.user, event["messageId"]))
        events.append((person.topic, person.key, orjson.dumps(event)))
        expected[person.user] += 1
        ids.add(event["messageId"])
    return Traffic(crowd, events, expected, ids, malformed, marked)


@contextlib.asynccontextmanager
async def private_producer(settings: Settings):
    """A producer for a test's private topics, stopped with the test (a session-wide
    producer would keep asking for the metadata of topics deleted after the test)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), acks="all", linger_ms=1)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def send(producer, events: list[tuple[str, bytes, bytes]]) -> None:
    futures = [await producer.send(topic, value, key=key) for topic, key, value in events]
    await asyncio.gather(*futures)


# ------------------------------------------------------------------ checks


async def profile_counts(store: aioredis.Redis, users: Iterable[str], settings: Settings) -> dict[str, int]:
    counts = {}
    for user in users:
        profile = await lookup_profile(store, f"user_id:{user}", hash_key=settings.id_hash_key, default_region="US")
        counts[user] = profile["eventCount"] if profile else 0
    return counts


async def wait_counts(store, traffic: Traffic, settings: Settings, timeout_s: float = 60.0) -> dict[str, int]:
    """Per-user event counts, once they add up to the input (or after ``timeout_s``)."""
    total = sum(traffic.expected.values())
    deadline = time.monotonic() + timeout_s
    while True:
        counts = await profile_counts(store, traffic.expected, settings)
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.5)


def resolved_by_id(records, message_ids: set[str]) -> dict[str, list[dict]]:
    """The resolved records of ``message_ids``, by messageId."""
    found: dict[str, list[dict]] = {}
    for record in records:
        value = orjson.loads(record.value)
        if value.get("messageId") in message_ids:
            found.setdefault(value["messageId"], []).append(value)
    return found


def dead_letters_from(records, topics: Iterable[str]) -> list[dict[str, str]]:
    """The dead-letter headers of records read from ``topics``."""
    wanted = set(topics)
    letters = []
    for record in records:
        headers = header_map(record.headers)
        if headers.get("cdp.dlq.source.topic") in wanted:
            letters.append(headers)
    return letters


def assert_outputs_once_per_event(resolved: dict[str, list[dict]], message_ids: set[str]) -> None:
    missing = message_ids - set(resolved)
    assert not missing, f"{len(missing)} events have no resolved output, e.g. {sorted(missing)[:3]}"
    for message_id, outputs in resolved.items():
        origins = {(o["source"]["topic"], o["source"]["partition"], o["source"]["offset"]) for o in outputs}
        assert len(origins) == 1, f"{message_id}: outputs from several records {origins}: only redeliveries may repeat"
