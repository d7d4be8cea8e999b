"""Integration fixtures: the real Kafka broker and Redis server that `make test`
started (``deploy/local/infra.sh``), reached through ``CDP_KAFKA_BOOTSTRAP`` and
``CDP_REDIS_URL``. If they cannot be reached the suite fails loudly; nothing is
skipped and nothing is mocked.

Isolation on shared topics: each test uses fresh identifiers and messageIds and
reads outputs from the offsets that were at the end when it started. Tests use their
own Redis database (``CDP_TEST_REDIS_DB``, default 15), flushed once per session.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.activation.destinations import Destinations
from streams.metrics import Metrics
from streams.settings import Settings
from streams.topics import INBOUND, PRODUCER_MAX_REQUEST_BYTES, all_topics, ensure_topics

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".run" / "tests"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


def _redis_url_with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def settings() -> Settings:
    base = Settings.from_env()
    db = int(os.environ.get("CDP_TEST_REDIS_DB", "15"))
    return Settings.from_env(
        redis_url=_redis_url_with_db(base.redis_url, db),
        app_id=f"streamcdp-test-{uuid.uuid4().hex[:8]}",
        batch_within_ms=5,
    )


@pytest_asyncio.fixture(scope="session")
async def infra(settings: Settings) -> Settings:
    """Checks that Kafka and Redis answer and that every topic exists."""
    client = aioredis.from_url(settings.redis_url)
    try:
        await asyncio.wait_for(client.ping(), timeout=10)
    except Exception as exc:
        pytest.fail(f"Redis at {settings.redacted()['redis_url']} does not answer ({exc}); run `make infra`", pytrace=False)
    finally:
        await client.aclose()
    try:
        await ensure_topics(settings, all_topics(tuple(Destinations.load().topics())), timeout_s=60)
    except Exception as exc:
        pytest.fail(f"Kafka at {settings.kafka_bootstrap} does not answer ({exc}); run `make infra`", pytrace=False)
    return settings


@pytest_asyncio.fixture(scope="session")
async def redis(infra: Settings):
    client = aioredis.from_url(infra.redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest_asyncio.fixture(scope="session")
async def producer(infra: Settings):
    p = AIOKafkaProducer(
        bootstrap_servers=infra.bootstrap_servers(),
        max_request_size=PRODUCER_MAX_REQUEST_BYTES,
        acks="all",
        linger_ms=1,
    )
    await p.start()
    yield p
    await p.stop()


async def produce(producer: AIOKafkaProducer, topic: str, values: list, key: bytes | None = None) -> list:
    """Produce values (dicts are JSON-encoded, bytes sent as they are); return their metadata."""
    futures = []
    for value in values:
        raw = value if isinstance(value, (bytes, bytearray)) or value is None else orjson.dumps(value)
        futures.append(await producer.send(topic, raw, key=key))
    return list(await asyncio.gather(*futures))


class TopicReader:
    """Reads a topic from the offsets at its end when the reader was created."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.seen: list = []

    async def collect(self, predicate: Callable, count: int, timeout_s: float = 30.0) -> list:
        """Records for which ``predicate(record)`` holds, until ``count`` are found."""
        found = [r for r in self.seen if predicate(r)]
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            batches = await self.consumer.getmany(timeout_ms=200)
            for records in batches.values():
                self.seen.extend(records)
                found.extend(r for r in records if predicate(r))
        return found

    async def drain(self, quiet_s: float = 1.0) -> None:
        """Read until nothing new arrives for ``quiet_s``."""
        while True:
            batches = await self.consumer.getmany(timeout_ms=int(quiet_s * 1000))
            if not batches:
                return
            for records in batches.values():
                self.seen.extend(records)


@pytest_asyncio.fixture
async def topic_reader(infra: Settings):
    consumers: list[AIOKafkaConsumer] = []

    async def open_reader(topic: str) -> TopicReader:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=infra.bootstrap_servers(),
            enable_auto_commit=False,
            max_partition_fetch_bytes=32 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        await consumer.start()
        partitions = await _partitions(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the end offsets now, before the test produces
            await consumer.position(tp)
        consumers.append(consumer)
        return TopicReader(consumer)

    yield open_reader
    for consumer in consumers:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    for _ in range(50):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        await consumer._client.force_metadata_update()  # noqa: SLF001 - metadata for a new topic
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions in the metadata")


async def start_group_at_end(settings: Settings, group_id: str, topics=INBOUND) -> None:
    """Commit ``group_id``'s offsets at the current end of ``topics``, so that a new
    worker group starts with this test session's input, not with earlier runs'."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers(), group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [tp for t in topics for tp in await _partitions(consumer, t)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.commit({tp: offset for tp, offset in ends.items()})
    finally:
        await consumer.stop()


class WorkerProcess:
    """`streamcdp worker` in a subprocess, as users run it."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = RUN_DIR / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CDP_KAFKA_BOOTSTRAP=self.settings.kafka_bootstrap,
            CDP_REDIS_URL=self.settings.redis_url,
            CDP_APP_ID=self.settings.app_id,
            CDP_WEB_PORT=str(self.port),
            CDP_WEB_HOST="127.0.0.1",
            CDP_BATCH_WITHIN_MS=str(self.settings.batch_within_ms),
            CDP_BATCH_MAX=str(self.settings.batch_max),
            # Short, so a SIGKILLed worker's partitions move on quickly in tests.
            CDP_KAFKA_SESSION_TIMEOUT="8s",
            CDP_LOG_FORMAT="json",
            CDP_LOG_LEVEL="info",
        )
        return env

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamcdp.cli", "worker"],
            cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}; log:\n{self.tail()}")
            status, _ = await asyncio.to_thread(http_get, self.url + "/readyz")
            if status == 200:
                return
            await asyncio.sleep(0.25)
        raise RuntimeError(f"worker not ready after {timeout_s}s; log:\n{self.tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class CollectorProcess:
    """`streamcdp collector` in a subprocess, as users run it."""

    def __init__(self, name: str, kafka_bootstrap: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = RUN_DIR / f"{name}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CDP_WRITE_KEYS", "CDP_COLLECTOR"))},
            "CDP_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "CDP_COLLECTOR_PORT": str(self.port),
            "CDP_WEB_HOST": "127.0.0.1",
            "CDP_LOG_FORMAT": "json",
            "CDP_LOG_LEVEL": "debug",
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamcdp.cli", "collector"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    async def wait_for(self, path: str, status: int = 200, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"collector exited with {self.process.returncode}; log:\n{self.tail()}")
            if (await asyncio.to_thread(http_get, self.url + path, 2.0))[0] == status:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"collector {path} not {status} after {timeout_s}s; log:\n{self.tail()}")

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the exit code (SIGKILL and fail if it does not exit in time)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
                pytest.fail(f"collector ignored SIGTERM for {timeout_s}s; log:\n{self.tail()}")
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


@pytest_asyncio.fixture(scope="session")
async def worker(infra: Settings, redis):
    """One worker for the session, its consumer group starting at the topics' end."""
    await start_group_at_end(infra, infra.app_id)
    process = WorkerProcess(infra, "worker")
    process.start()
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


async def redis_texts(redis) -> list[tuple[bytes, bytes]]:
    """Every key name and value in the database, as bytes."""
    found = []
    async for name in redis.scan_iter(count=1000):
        kind = (await redis.type(name)).decode()
        if kind == "string":
            values = [await redis.get(name)]
        elif kind == "hash":
            values = [x for kv in (await redis.hgetall(name)).items() for x in kv]
        elif kind == "list":
            values = await redis.lrange(name, 0, -1)
        elif kind == "set":
            values = list(await redis.smembers(name))
        elif kind == "zset":
            values = [m for m, _ in await redis.zrange(name, 0, -1, withscores=True)]
        else:
            values = []
        found.extend((name, v if isinstance(v, bytes) else str(v).encode()) for v in [name, *values])
    return found
