"""``Pipeline.handle`` in-process, on the real Redis and a real Kafka producer:
redelivery versus resend, outputs acked before return, and a Redis outage during a
batch (a second, private redis-server that the test stops and starts)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import time

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from agents.pipeline import Pipeline
from agents.profiles.store import lookup_profile
from streams.output import AiokafkaProducer
from streams.records import Record
from streams.topics import EVENTS_WEB, IDENTITY_MERGES, RESOLVED
from tests.conftest import identify, track, unique
from tests.integration.conftest import RUN_DIR, free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")


def record(event: dict, offset: int, partition: int = 0) -> Record:
    return Record(EVENTS_WEB, partition, offset, None, orjson.dumps(event), int(time.time() * 1000))


@pytest_asyncio.fixture
async def pipeline(infra, redis, producer, metrics):
    return Pipeline(infra, redis, AiokafkaProducer(producer), metrics)


async def test_redelivery_resends_outputs_but_changes_nothing(pipeline, redis, topic_reader):
    resolved = await topic_reader(RESOLVED)
    user = unique("u")
    event = identify(userId=user, traits={"plan": "pro"})
    first = await pipeline.handle([record(event, 10_000_001)])
    assert (first.processed, first.redelivered, first.resent) == (1, 0, 0)

    again = await pipeline.handle([record(event, 10_000_001)])  # same record: a replay
    assert (again.processed, again.redelivered) == (1, 1)
    assert [m.topic for m in again.outputs] == [RESOLVED]

    copy = await pipeline.handle([record(event, 10_000_002)])  # another record: a resend
    assert (copy.processed, copy.resent, copy.outputs) == (0, 1, [])

    profile = await lookup_profile(redis, f"user_id:{user}", hash_key="", default_region="US")
    assert profile["eventCount"] == 1
    outs = await resolved.collect(lambda r: orjson.loads(r.value)["messageId"] == event["messageId"], 2)
    assert len(outs) == 2 and outs[0].value == outs[1].value, "a replayed output is identical"
    assert pipeline.metrics.duplicates.labels("redelivery")._value.get() == 1
    assert pipeline.metrics.duplicates.labels("resend")._value.get() == 1


async def test_a_batch_mixing_good_and_bad_ends_each_record_somewhere(pipeline):
    good = [track(userId=unique("u")) for _ in range(5)]
    records = [record(e, 20_000_000 + i) for i, e in enumerate(good)]
    records.insert(2, Record(EVENTS_WEB, 0, 20_000_100, None, b"{oops", 0))
    result = await pipeline.handle(records)
    assert (result.processed, result.dead_lettered) == (5, 1)
    assert len(result.outputs) == 6


async def test_two_round_trips_per_batch(pipeline):
    before = {op: pipeline.metrics.redis_latency.labels(op)._sum.get() for op in ("identity", "profile")}
    counts = lambda: sum(  # noqa: E731
        s.value for m in pipeline.metrics.redis_latency.collect() for s in m.samples if s.name.endswith("_count")
    )
    start = counts()
    await pipeline.handle([record(track(userId=unique("u")), 30_000_000 + i) for i in range(200)])
    assert counts() - start == 2
    assert all(pipeline.metrics.redis_latency.labels(op)._sum.get() > before[op] for op in before)


@pytest_asyncio.fixture
async def private_redis():
    """A redis-server of our own, on a free port, that the test may stop."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server must be installed (make infra installs it)"
    port = free_port()
    workdir = RUN_DIR / f"redis-{port}"
    workdir.mkdir(parents=True, exist_ok=True)

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    class Server:
        url = f"redis://127.0.0.1:{port}/0"
        process = start()

        async def wait_up(self):
            client = aioredis.from_url(self.url)
            try:
                for _ in range(100):
                    try:
                        await client.ping()
                        return
                    except Exception:  # noqa: BLE001 - not up yet
                        await asyncio.sleep(0.05)
                raise RuntimeError("private redis did not start")
            finally:
                await client.aclose()

        def stop(self):
            self.process.terminate()
            self.process.wait(timeout=10)

        def restart(self):
            self.process = start()

    server = Server()
    await server.wait_up()
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


async def test_redis_outage_holds_the_batch_until_redis_is_back(infra, producer, metrics, private_redis):
    settings = dataclasses.replace(infra, redis_url=private_redis.url)
    client = aioredis.from_url(private_redis.url, socket_connect_timeout=0.5, socket_timeout=1.0)
    pipeline = Pipeline(settings, client, AiokafkaProducer(producer), metrics)
    user = unique("u")
    await pipeline.handle([record(track(userId=user), 40_000_000)])

    private_redis.stop()
    batch = [record(track(userId=user), 40_000_001 + i) for i in range(3)]
    task = asyncio.create_task(pipeline.handle(batch))
    await asyncio.sleep(1.5)
    assert not task.done(), "a batch must not complete (and so be acked) while Redis is down"
    assert metrics.redis_errors.labels("identity")._value.get() + metrics.redis_errors.labels("profile")._value.get() >= 1
    assert pipeline.ready is False

    private_redis.restart()
    result = await asyncio.wait_for(task, timeout=60)
    assert result.processed == 3 and pipeline.ready
    profile = await lookup_profile(client, f"user_id:{user}", hash_key="", default_region="US")
    assert profile["eventCount"] == 4, "AOF kept the first event; the held batch was applied once"
    await client.aclose()


async def test_script_flush_is_survived(pipeline, redis):
    """Redis forgetting its scripts (restart without AOF of scripts, SCRIPT FLUSH)
    must not wedge the worker: every script is loaded again."""
    user, email = unique("u"), f"{unique('sf')}@example.com"
    await pipeline.handle([record(track(userId=user), 50_000_000)])
    await pipeline.handle([record(track(anonymousId=None, userId=None, context={"traits": {"email": email}}), 50_000_001)])
    await redis.script_flush()
    # links the two profiles: needs SET_PARENT, FOLD, CLEANUP and APPLY_EVENT again
    result = await asyncio.wait_for(
        pipeline.handle([record(track(userId=user, anonymousId=None, context={"traits": {"email": email}}), 50_000_002)]), 30
    )
    assert result.processed == 1
    profile = await lookup_profile(redis, f"email:{email}", hash_key="", default_region="US")
    assert profile["eventCount"] == 3 and f"user_id:{user}" in profile["identifiers"]


async def test_a_blocked_merge_notice_is_not_counted_as_a_dead_letter(pipeline):
    email = f"{unique('bl')}@example.com"
    await pipeline.handle([record(identify(userId=unique("A"), traits={"email": email}), 60_000_000)])
    result = await pipeline.handle([record(identify(userId=unique("B"), traits={"email": email}), 60_000_001)])
    assert (result.processed, result.dead_lettered) == (1, 0)
    assert [orjson.loads(m.value)["type"] for m in result.outputs if m.topic == IDENTITY_MERGES] == ["cdp.profile.merge_blocked"]
