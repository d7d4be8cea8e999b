"""Bad input at volume (issue 14, item 4), end to end on real Kafka and Redis.

1. The whole hot path: random bytes and mutated valid events
   (``fuzz_inputs.event_bytes``), with redeliveries (the same record again) and
   resends (the same bytes at another offset) mixed in, through ``Pipeline.handle``
   in batches of varied size. No exception; per batch, processed + dead-lettered +
   resent + suppressed = the batch; over all, the dead letters are exactly the
   records ingest rejects, each on the dead-letter topic with its reason, and every
   processed event has its resolved record.
2. The running collector (``streamcdp collector``): random and mutated bodies on
   every route, plain, gzip, truncated, with odd encodings and sometimes a wrong
   key. It answers 200 or 4xx, never 5xx; each answer is the one its request
   handling gives for that body (``decode_body`` → ``parse_payload`` → ``prepare``);
   the messages of the 200s are exactly the records on its topic; its metrics count
   the same; it stays up.

Hypothesis draws the inputs derandomized with a fixed number of examples: the same
inputs every run, bounded in time. Outputs go to this test's own topics, so no other
worker or test reads them.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import random
import time
from collections import Counter

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agents.ingest.core import split_batch
from agents.pipeline import Pipeline
from agents.profiles.computed import ComputedTraits
from agents.segments.registry import SegmentRegistry
from schemas.events import RejectReason
from streamcdp.collector.app import SHORT_PATHS
from streamcdp.collector.messages import BadRequest, decode_body, parse_payload, prepare
from streams.deadletter import header_map
from streams.metrics import Metrics
from streams.records import Record
from streams.redis_client import connect_hot_path
from streams.settings import Settings
from streams.topics import DEAD_LETTER, EVENTS_APP, EVENTS_POS, EVENTS_WEB, IDENTITY_MERGES, RESOLVED, SEGMENT_CHANGES
from tests.conftest import unique
from tests.integration.conftest import ROOT, CollectorProcess, _redis_url_with_db, http_get
from tests.integration.fuzz_inputs import corpus, event_bytes, request_bodies

pytestmark = pytest.mark.asyncio(loop_scope="session")

FUZZ_DB = 14
PIPELINE_RECORDS = 600
REQUESTS = 300
REASONS = {reason.value for reason in RejectReason}
OUTPUT_TOPICS = (DEAD_LETTER, RESOLVED, IDENTITY_MERGES, SEGMENT_CHANGES)


# ------------------------------------------------------------------ private topics


async def create(settings: Settings, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=1, replication_factor=1) for n in names])
        for _ in range(300):
            described = await admin.describe_topics(names)
            if all(t["error_code"] == 0 and t["partitions"] and t["partitions"][0]["leader"] >= 0 for t in described):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topics {names} have no leader")
    finally:
        await admin.close()


async def delete(settings: Settings, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        await admin.delete_topics([n for n in names if n in set(await admin.list_topics())])
    finally:
        await admin.close()


async def read_all(settings: Settings, topic: str, timeout_s: float = 30.0) -> list:
    """Every record of a one-partition topic, up to its end now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers(), enable_auto_commit=False,
                                fetch_max_bytes=64 * 1024 * 1024)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, 0)  # not seek_to_beginning: it races the reset that assign() started
        records: list = []
        deadline = time.monotonic() + timeout_s
        while await consumer.position(tp) < end and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(r for r in batch if r.offset < end)
        return records
    finally:
        await consumer.stop()


class PrivateOutputs:
    """The pipeline's producer: each output goes to ``<prefix><its topic>``; a topic
    the test did not expect goes to ``<prefix>unexpected`` and is noted."""

    def __init__(self, producer: AIOKafkaProducer, prefix: str) -> None:
        self.producer = producer
        self.prefix = prefix
        self.unexpected: list[str] = []

    async def enqueue(self, message):
        topic = message.topic
        if topic not in OUTPUT_TOPICS:
            self.unexpected.append(topic)
            topic = "unexpected"
        return await self.producer.send(self.prefix + topic, message.value, key=message.key,
                                        headers=list(message.headers) or None)


# ------------------------------------------------------------------ 1. the hot path


def fuzzed_records() -> list[Record]:
    """The corpus as records on the three inbound topics, then redeliveries of some
    (same topic, partition and offset) and resends of others (same bytes, new offset)."""
    rng = random.Random(14)
    topics = (EVENTS_WEB, EVENTS_APP, EVENTS_POS)
    now_ms = 1_795_168_800_000
    records = [Record(rng.choice(topics), 0, 90_000_000 + i, None, value, now_ms + i)
               for i, value in enumerate(corpus(event_bytes(), PIPELINE_RECORDS))]
    again = rng.sample(records, 40)
    resent = [Record(r.topic, 1, 91_000_000 + i, r.key, r.value, r.timestamp_ms) for i, r in enumerate(rng.sample(records, 40))]
    mixed = again + resent
    rng.shuffle(mixed)
    return records + mixed


async def test_the_hot_path_processes_or_dead_letters_every_fuzzed_record(infra):
    settings = dataclasses.replace(infra, redis_url=_redis_url_with_db(infra.redis_url, FUZZ_DB))
    store = aioredis.from_url(settings.redis_url)
    await store.flushdb()  # this test's own database: the corpus is the same every run
    prefix = f"test.{unique('fuzz')}."
    await create(settings, [prefix + t for t in (*OUTPUT_TOPICS, "unexpected")])
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), acks="all", linger_ms=2,
                                max_request_size=16 * 1024 * 1024)
    await producer.start()
    client = connect_hot_path(settings.redis_url)
    try:
        registry = SegmentRegistry(ComputedTraits.load())
        registry.loaded.set()
        for document in (
            {"id": "fuzz-plan", "version": 1, "rule": {"trait": "plan", "eq": "pro"}},
            {"id": "fuzz-busy", "version": 1, "rule": {"event": "*", "count": {"gte": 3}}},
            {"id": "fuzz-spend", "version": 1, "rule": {"event": "Order Completed", "within": "30d",
                                                        "sum": {"property": "properties.total", "gte": 50}}},
            {"id": "fuzz-mail", "version": 1, "rule": {"all": [{"trait": "email", "exists": True},
                                                               {"trait": "computed.order_count", "gte": 1}]}},
        ):
            registry.apply_record(document["id"].encode(), orjson.dumps(document))
        outputs = PrivateOutputs(producer, prefix)
        metrics = Metrics()
        pipeline = Pipeline(settings, client, outputs, metrics, registry=registry)
        records = fuzzed_records()
        accepted, rejected = split_batch(records, default_region=settings.phone_default_region)
        assert accepted and rejected and len(accepted) + len(rejected) == len(records)

        rng = random.Random(41)
        totals: Counter = Counter()
        dead_letters = resolved = 0
        position = 0
        while position < len(records):
            batch = records[position : position + rng.randint(1, 60)]
            position += len(batch)
            result = await asyncio.wait_for(pipeline.handle(batch), timeout=120)  # any exception fails the test
            assert result.processed + result.dead_lettered + result.resent + result.suppressed == len(batch), result
            for name in ("processed", "dead_lettered", "resent", "suppressed", "redelivered"):
                totals[name] += getattr(result, name)
            dead_letters += sum(1 for m in result.outputs if m.topic == DEAD_LETTER)
            resolved += sum(1 for m in result.outputs if m.topic == RESOLVED)

        assert totals["processed"] + totals["dead_lettered"] + totals["resent"] + totals["suppressed"] == len(records)
        assert totals["dead_lettered"] == len(rejected), "exactly the records ingest rejects are dead-lettered"
        assert totals["processed"] + totals["resent"] + totals["suppressed"] == len(accepted)
        assert totals["suppressed"] == 0 and totals["redelivered"] > 0 and totals["resent"] > 0
        assert dead_letters == totals["dead_lettered"] and resolved == totals["processed"]
        assert outputs.unexpected == [], f"outputs to topics the test did not expect: {set(outputs.unexpected)}"

        letters = await read_all(settings, prefix + DEAD_LETTER)
        assert len(letters) == len(rejected), "every dead letter is on the dead-letter topic"
        reasons = Counter(header_map(r.headers)["cdp.dlq.reason"] for r in letters)
        assert set(reasons) <= REASONS, f"dead letters without a documented reason: {reasons}"
        assert reasons == Counter(r.reason for r in rejected)
        for letter in letters:
            headers = header_map(letter.headers)
            assert headers["cdp.dlq.detail"] and headers["cdp.dlq.source.topic"] in (EVENTS_WEB, EVENTS_APP, EVENTS_POS)
        published = await read_all(settings, prefix + RESOLVED)
        assert len(published) == totals["processed"]
        sample = metrics.registry.get_sample_value
        assert sum(sample("cdp_events_consumed_total", {"topic": t}) or 0 for t in (EVENTS_WEB, EVENTS_APP, EVENTS_POS)) == len(records)
        assert sum(sample("cdp_dead_letters_total", {"reason": r}) or 0 for r in reasons) == len(rejected)
    finally:
        await client.aclose()
        await producer.stop()
        await store.aclose()
        await delete(settings, [prefix + t for t in (*OUTPUT_TOPICS, "unexpected")])


# ------------------------------------------------------------------ 2. the collector


class HarnessCollector(CollectorProcess):
    """`streamcdp collector` writing every channel to ``topic`` (collector_harness)."""

    def __init__(self, name: str, settings: Settings, topic: str, key: str) -> None:
        super().__init__(name, settings.kafka_bootstrap, {"CDP_WRITE_KEYS": f"{key}=web", "CDP_TEST_COLLECTOR_TOPIC": topic,
                                                          "CDP_LOG_LEVEL": "info"})

    def start(self) -> None:
        import subprocess
        import sys

        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.collector_harness"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )


def expected_answer(route: str, raw: bytes, headers: dict[str, str]) -> tuple[int, str | None, int]:
    """(status, error code, messages stored) the collector must give this request
    (with the right key), from its own request handling."""
    name = route.rsplit("/", 1)[1]
    kind = SHORT_PATHS.get(name, name)
    try:
        payload = parse_payload(decode_body(raw, headers.get("Content-Encoding")))
        return 200, None, len(prepare(kind, payload, received_at="2026-11-23T10:00:00.000Z"))
    except BadRequest as exc:
        return exc.status, exc.code, 0


def metric_values(text: str, name: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def test_the_collector_answers_every_fuzzed_request_and_stores_exactly_what_it_accepted(infra):
    topic = f"test.{unique('fuzz-collector')}"
    await create(infra, [topic])
    key = unique("wk_fuzz")
    collector = HarnessCollector("collector-fuzz", infra, topic, key)
    collector.start()
    rng = random.Random(3)
    try:
        await collector.wait_for("/readyz")
        requests = corpus(request_bodies(), REQUESTS)
        good = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
        # Refused before the body is read (a header without a key would let the body speak first).
        wrong = ["Basic " + base64.b64encode(b"nope:").decode(), "Bearer x", "Basic !!!", "Basic " + "A" * 5000]
        answers: list[tuple[int, dict, tuple[str, bytes, dict], bool]] = []
        limit = asyncio.Semaphore(8)

        async def send(session, route, raw, headers):
            authorised = rng.random() > 0.08
            headers = {**headers, "Authorization": good if authorised else rng.choice(wrong)}
            async with limit:
                async with session.post(collector.url + route, data=raw, headers=headers) as response:
                    body = await response.read()
            try:
                answer = orjson.loads(body)
            except orjson.JSONDecodeError:
                answer = {"raw": body[:200].decode(errors="replace")}
            answers.append((response.status, answer, (route, raw, headers), authorised))

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60), auto_decompress=False) as session:
            await asyncio.gather(*(send(session, route, raw, headers) for route, raw, headers in requests))

        statuses = Counter(status for status, _, _, _ in answers)
        assert not [a for a in answers if a[0] >= 500], f"5xx answers: {[a[:2] for a in answers if a[0] >= 500][:3]}"
        assert set(statuses) <= {200, 400, 401, 415}, statuses
        assert statuses[200] > REQUESTS // 10 and statuses[400] > REQUESTS // 10, statuses
        answers = [(status, answer, expected_answer(*request), authorised) for status, answer, request, authorised in answers]
        for status, answer, (want, code, _), authorised in answers:
            if not authorised:
                assert status == 401, (status, answer)
            elif want == 200:
                assert (status, answer) == (200, {"success": True})
            else:
                assert (status, answer.get("code")) == (want, code), (status, answer, code)
                assert answer["success"] is False and answer["message"]
        stored = sum(n for status, _, (_, _, n), _ in answers if status == 200)
        assert stored > 0

        records = await read_all(infra, topic)
        assert len(records) == stored, "the topic holds exactly the messages of the requests answered 200"
        assert all(dict(r.headers)["cdp-source"] == b"web" for r in records)
        assert all(orjson.loads(r.value)["messageId"] for r in records)

        status, text = await asyncio.to_thread(http_get, collector.url + "/metrics")
        assert status == 200
        routes = {route for route, _, _ in requests}
        requests_by_code: Counter = Counter()
        for labels, value in metric_values(text.decode(), "cdp_collector_requests_total").items():
            if dict(labels)["route"] in routes:
                requests_by_code[int(dict(labels)["code"])] += int(value)
        assert requests_by_code == statuses, "the request metric counts every answer"
        received = metric_values(text.decode(), "cdp_collector_events_received_total")
        assert sum(received.values()) == stored
        assert collector.process.poll() is None, "the collector is still running"
        assert (await asyncio.to_thread(http_get, collector.url + "/healthz"))[0] == 200
        assert (await asyncio.to_thread(http_get, collector.url + "/readyz"))[0] == 200
        assert "Traceback" not in collector.log_text(), collector.tail()
    finally:
        assert collector.terminate() == 0
        await delete(infra, [topic])
