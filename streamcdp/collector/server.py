"""Running the collector: the HTTP server on ``CDP_COLLECTOR_PORT`` and its Kafka producer.

The server answers at once, even before Kafka does: until the producer is
connected, ingest routes answer 503 (SDKs retry) and ``/readyz`` says why. The
producer is idempotent with ``acks="all"``: an acknowledged message is on every
in-sync replica, and the producer's own retries never write it twice (a batch an SDK
sends again after a 503 is de-duplicated by the worker, by ``messageId``). On
SIGINT/SIGTERM the server stops accepting, lets requests in flight finish (their
messages are acknowledged or answered 503), then flushes and closes the producer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import signal
import time
from collections.abc import Mapping, Sequence

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from streamcdp.collector.app import IN_FLIGHT, KafkaUnavailable, create_app
from streamcdp.collector.auth import CHANNEL_TOPICS, WriteKeys
from streamcdp.collector.messages import Prepared
from streamcdp.collector.metrics import CollectorMetrics
from streams.logs import configure
from streams.settings import Settings
from streams.topics import INBOUND, PRODUCER_MAX_REQUEST_BYTES, all_topics, ensure_topics

log = logging.getLogger(__name__)

#: Longest wait for Kafka's acknowledgement before answering 503. The SDKs give up
#: on a request after 15 s; answering first lets them retry rather than time out.
PRODUCE_TIMEOUT_S = 10.0
#: Longest wait for one attempt to reach Kafka at start-up (topics, then producer).
CONNECT_TIMEOUT_S = 10.0
#: How often the producer's metadata is refreshed to judge readiness; readiness
#: lapses when no refresh succeeded for three periods.
HEALTH_EVERY_S = 2.0
#: How long the producer waits to fill a batch: a request's messages, and those of
#: concurrent requests, share produce requests.
LINGER_MS = 5
#: Largest record batch per partition; one 500 KB request fits in a few.
MAX_BATCH_BYTES = 256 * 1024
_RECONNECT_MAX_S = 5.0
_METADATA_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 15.0


class KafkaSink:
    """The collector's producer, connected in the background, and its readiness."""

    def __init__(
        self,
        settings: Settings,
        *,
        produce_timeout_s: float = PRODUCE_TIMEOUT_S,
        health_every_s: float = HEALTH_EVERY_S,
    ) -> None:
        self.settings = settings
        self.produce_timeout_s = produce_timeout_s
        self.health_every_s = health_every_s
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task | None = None
        self._metadata_ok_at: float | None = None
        self._problem = "not connected to Kafka yet"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="collector-kafka")

    async def stop(self) -> None:
        """Stop the background task, then flush and close the producer."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), _STOP_TIMEOUT_S)
            except TimeoutError:
                log.error("Kafka producer did not flush within %.0fs; closing anyway", _STOP_TIMEOUT_S)

    def ready(self) -> tuple[bool, str]:
        if self._producer is None:
            return False, self._problem
        ok_at = self._metadata_ok_at
        if ok_at is None or time.monotonic() - ok_at > 3 * self.health_every_s:
            return False, self._problem
        return True, ""

    async def send_all(self, topic: str, records: Sequence[Prepared], headers: list[tuple[str, bytes]]) -> None:
        producer = self._producer
        if producer is None:
            raise KafkaUnavailable("not_connected", self._problem)
        deadline = asyncio.get_running_loop().time() + self.produce_timeout_s
        futures = await self._enqueue(producer, topic, records, headers, deadline)
        await self._acknowledged(futures, deadline)

    async def _enqueue(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        records: Sequence[Prepared],
        headers: list[tuple[str, bytes]],
        deadline: float,
    ) -> list[asyncio.Future]:
        futures: list[asyncio.Future] = []
        try:
            async with asyncio.timeout_at(deadline):
                # Partitions chosen here, once per request, as the default partitioner
                # would: aiokafka's own choice re-reads the metadata per message.
                partitions = sorted(await producer.partitions_for(topic))
                keyless = random.choice(partitions)  # a request's keyless messages stay together
                for record in records:  # send() waits only when the producer's buffer is full
                    partition = keyless if record.key is None else partitions[_slot(record.key, len(partitions))]
                    futures.append(
                        await producer.send(topic, record.value, key=record.key, partition=partition, headers=headers)
                    )
        except TimeoutError:
            _abandon(futures)
            raise KafkaUnavailable("timeout", f"Kafka took no messages for {self.produce_timeout_s:.0f}s") from None
        except KafkaError as exc:
            _abandon(futures)
            raise KafkaUnavailable("kafka_error", f"{type(exc).__name__}: {exc}") from None
        return futures

    async def _acknowledged(self, futures: list[asyncio.Future], deadline: float) -> None:
        if not futures:
            return
        # asyncio.wait, unlike gather, does not cancel what is still pending at the deadline.
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        done, pending = await asyncio.wait(futures, timeout=timeout)
        if pending:
            _abandon(pending)
            raise KafkaUnavailable("timeout", f"Kafka did not acknowledge within {self.produce_timeout_s:.0f}s")
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            raise KafkaUnavailable(
                "kafka_error", f"{len(failed)} of {len(futures)} messages not acknowledged: {type(failed[0]).__name__}"
            )

    # ------------------------------------------------------------ background

    async def _run(self) -> None:
        backoff = 0.5
        while self._producer is None:
            try:
                self._producer = await self._connect()
            except (KafkaError, OSError, TimeoutError) as exc:  # ConnectionError is an OSError
                self._problem = f"cannot reach Kafka at {self.settings.kafka_bootstrap}: {exc}"
                log.warning("%s; retrying in %.1fs", self._problem, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RECONNECT_MAX_S)
        log.info("producing to Kafka at %s", self.settings.kafka_bootstrap)
        while True:
            await self._check_metadata()
            await asyncio.sleep(self.health_every_s)

    async def _connect(self) -> AIOKafkaProducer:
        # Create the inbound topics with streamcdp's partition count before the
        # first send could auto-create them with the broker's default.
        inbound = tuple(spec for spec in all_topics() if spec.name in INBOUND)
        await asyncio.wait_for(
            ensure_topics(self.settings, inbound, timeout_s=CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S * 2
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers(),
            acks="all",
            enable_idempotence=True,
            max_request_size=PRODUCER_MAX_REQUEST_BYTES,
            linger_ms=LINGER_MS,
            max_batch_size=MAX_BATCH_BYTES,
            client_id="streamcdp-collector",
        )
        try:
            await asyncio.wait_for(producer.start(), CONNECT_TIMEOUT_S)
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def _check_metadata(self) -> None:
        was_ready = self.ready()[0]
        try:
            cluster = await asyncio.wait_for(self._producer.client.fetch_all_metadata(), _METADATA_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            self._problem = f"Kafka at {self.settings.kafka_bootstrap} does not answer: {type(exc).__name__}: {exc}"
            if was_ready:
                log.warning("%s; not ready", self._problem)
            return
        missing = [topic for topic in INBOUND if topic not in cluster.topics()]
        if missing:
            self._problem = f"topics missing in Kafka: {', '.join(missing)}"
            return
        self._metadata_ok_at = time.monotonic()
        if not was_ready:
            log.info("Kafka answers; ready")


@functools.lru_cache(maxsize=65_536)
def _slot(key: bytes, count: int) -> int:
    """Kafka's default partitioner (murmur2 of the key), memoised: the same people
    send again and again, and aiokafka's pure-Python murmur2 costs ~4 µs a call."""
    return (murmur2(key) & 0x7FFFFFFF) % count


def _abandon(futures) -> None:
    """Futures nobody awaits any more: they may still complete (at-least-once, the
    worker de-duplicates by messageId); retrieve their outcome so asyncio stays quiet."""
    for future in futures:
        future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


# ------------------------------------------------------------------ process


def run_collector(settings: Settings) -> int:
    """Run the collector in the foreground until SIGINT/SIGTERM; return the exit code.

    Raises :class:`~schemas.errors.ConfigError` for bad write-key configuration
    (before anything is started).
    """
    configure(settings.log_format, settings.log_level)
    keys = WriteKeys.from_env()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        uvloop = None
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(serve(settings, keys))


async def serve(
    settings: Settings,
    keys: WriteKeys,
    stop: asyncio.Event | None = None,
    *,
    topics: Mapping[str, str] = CHANNEL_TOPICS,
) -> int:
    """Serve until ``stop`` is set (default: until SIGINT/SIGTERM); ``topics`` maps
    channels to topics (default: the inbound topics)."""
    metrics = CollectorMetrics()
    sink = KafkaSink(settings)
    metrics.kafka_ready.set_function(lambda: 1.0 if sink.ready()[0] else 0.0)
    app = create_app(keys, sink, metrics, default_region=settings.phone_default_region, topics=topics)
    runner = web.AppRunner(
        app,
        auto_decompress=False,  # the collector inflates bodies itself, with a size cap
        access_log=None,
        shutdown_timeout=PRODUCE_TIMEOUT_S + 2,  # what is left after our own wait below
    )
    own_signals = stop is None
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        sink.start()
        site = web.TCPSite(runner, settings.web_host, settings.collector_port, backlog=1024)
        await site.start()
        sources = ", ".join(f"{s.name}/{s.channel} ({s.key_id})" for s in keys.sources()) or "none"
        log.info(
            "collector listening on http://%s:%d; write keys: %s; anonymous requests %s",
            settings.web_host, settings.collector_port, sources,
            "accepted as channel web" if keys.allow_anonymous else "refused",
        )
        await stop.wait()
        if own_signals:
            # Shutting down already: a repeated SIGTERM/SIGINT (a process manager
            # insisting) must not cut the flush short or turn a clean exit into -15.
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
        log.info("stopping: finishing %d requests in flight, then flushing the producer", app[IN_FLIGHT].count)
        await site.stop()  # no new connections; open ones may finish their requests
        grace_s = PRODUCE_TIMEOUT_S + 2
        if not await app[IN_FLIGHT].wait_idle(grace_s):
            log.warning("%d requests still in flight after %.0fs; closing them", app[IN_FLIGHT].count, grace_s)
    finally:
        await runner.cleanup()
        await sink.stop()
    return 0
