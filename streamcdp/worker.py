"""The worker: the faust app with the hot-path agent and the worker's HTTP API.

Composition root: the only module that wires settings, Redis, Kafka, metrics and the
stages together. Routes on ``CDP_WEB_PORT``:

| route | answer |
|---|---|
| ``GET /metrics`` | Prometheus text format |
| ``GET /healthz`` | 200 while the process and its event loop run |
| ``GET /readyz`` | 200 once the hot path runs and Redis answers, else 503 |
| ``GET /v1/profiles/{profile_id}`` | the profile, or 404 with a JSON error |
| ``GET /v1/profiles?identifier=type:value`` | the profile owning that identifier |
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import orjson

import faust
import redis.asyncio as aioredis
from faust.sensors import Sensor
from faust.web import Request, Response, View
from prometheus_client import generate_latest

from agents.pipeline import Pipeline
from agents.privacy import PrivacyService
from agents.profiles.store import lookup_profile
from schemas.errors import InvalidIdentifier
from streams.app import create_app, uses_batch_transport
from streams.batch_transport import batch_topic
from streams.metrics import Metrics
from streams.output import FaustProducer
from streams.records import Record
from streams.redis_client import connect_hot_path
from streamcdp.segment_runtime import BACKFILL_CHECK_EVERY_S, EXPIRE_EVERY_S, SegmentRuntime
from streams.settings import Settings
from streams.topics import INBOUND

log = logging.getLogger(__name__)

# Prometheus text format 0.0.4 (aiohttp refuses a charset in content_type; it is UTF-8).
PROMETHEUS_TEXT = "text/plain; version=0.0.4"
_READY_PING_EVERY_S = 1.0
_LAG_EVERY_S = 5.0
# Retry pause after a batch failed outside the pipeline's own per-record isolation.
_RETRY_START_S = 0.5
_RETRY_MAX_S = 30.0
# How often a lingering batch looks for more fetches.
_LINGER_POLL_S = 0.001


class WorkerState:
    """What the agent, the timers and the views share inside one worker process."""

    def __init__(self, app: faust.App, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self._redis: aioredis.Redis | None = None
        self._pipeline: Pipeline | None = None
        self.segments = SegmentRuntime(settings)
        metrics.precreate_destinations(self.segments.registry.destinations)
        self.next_offsets: dict[tuple[str, int], int] = {}
        self._redis_ok_at = 0.0
        self._lag_labels: set[tuple[str, str]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        # Created on first use, inside the worker's event loop.
        if self._redis is None:
            self._redis = connect_hot_path(self.settings.redis_url)
        return self._redis

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = Pipeline(
                self.settings, self.redis, FaustProducer(self.app), self.metrics, registry=self.segments.registry
            )
            self.segments.attach(self._pipeline)
        return self._pipeline

    def note_handled(self, records: list[Record]) -> None:
        for record in records:
            self.next_offsets[(record.topic, record.partition)] = record.offset + 1

    async def ready(self) -> tuple[bool, str]:
        if self._pipeline is None:
            return False, "hot path not started"
        now = time.monotonic()
        if now - self._redis_ok_at > _READY_PING_EVERY_S:
            try:
                await asyncio.wait_for(self.redis.ping(), timeout=1.0)
            except Exception as exc:  # noqa: BLE001 - reported as not ready
                return False, f"redis: {type(exc).__name__}: {exc}"
            self._redis_ok_at = now
        if self.app.rebalancing or not self.app.tables.recovery.completed.is_set():
            return False, "joining the consumer group"
        if not self.segments.registry.loaded.is_set():
            return False, "reading the segment definitions"
        return True, "ok"

    def update_lag(self) -> None:
        """Lag per assigned input partition; series of partitions this worker no
        longer owns are removed, so they do not linger at a stale value."""
        consumer = self.app.consumer
        current: set[tuple[str, str]] = set()
        for tp in consumer.assignment():
            if tp.topic not in INBOUND:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            position = self.next_offsets.get((tp.topic, tp.partition))
            if position is None:
                continue
            labels = (tp.topic, str(tp.partition))
            current.add(labels)
            self.metrics.consumer_lag.labels(*labels).set(max(0, highwater - position))
        for labels in self._lag_labels - current:
            self.metrics.consumer_lag.remove(*labels)
        self._lag_labels = current


def record_of(message) -> Record:
    """A faust message (raw serializers) as a transport-neutral Record."""
    timestamp = message.timestamp
    return Record(
        message.topic,
        message.partition,
        message.offset,
        message.key,
        message.value,
        int(timestamp * 1000) if timestamp else int(time.time() * 1000),
    )


class CommitTimer(Sensor):
    """Times faust's offset commits (``cdp_kafka_commit_seconds``), either transport.

    faust calls these hooks around every commit round, also around rounds that find
    nothing new to commit; those are not observed (faust's ``_committed_offset``,
    the offsets it last committed, did not change)."""

    def __init__(self, metrics: Metrics, **kwargs) -> None:
        super().__init__(**kwargs)
        self._histogram = metrics.commit_latency

    def on_commit_initiated(self, consumer) -> tuple[float, dict]:
        return time.perf_counter(), dict(consumer._committed_offset)  # noqa: SLF001

    def on_commit_completed(self, consumer, state) -> None:
        started, before = state
        if consumer._committed_offset != before:  # noqa: SLF001
            self._histogram.observe(time.perf_counter() - started)


def build_worker_app(settings: Settings, metrics: Metrics | None = None) -> tuple[faust.App, WorkerState]:
    """The worker's faust app: the hot-path agent over the inbound topics, the lag
    timer and the HTTP routes.

    With the batch transport (``CDP_KAFKA_TRANSPORT=batch``) each partition fetch
    arrives as one event carrying a list of Records; the fetches already queued when
    the agent is free are merged into one batch (at most ``CDP_BATCH_MERGE``
    fetches, stopping once ``CDP_BATCH_MAX`` records are in; ``CDP_BATCH_LINGER_MS``
    lets it wait that long for more). With faust's own
    transport records arrive one by one and ``take_events(CDP_BATCH_MAX,
    within=CDP_BATCH_WITHIN_MS)`` batches them. Either way the same
    ``Pipeline.handle_safely`` gets the batch, and events are acked only after it
    returned: every effect stored and every output acknowledged.
    """
    app = create_app(settings)
    state = WorkerState(app, settings, metrics or Metrics())
    app.sensors.add(CommitTimer(state.metrics))
    within_s = settings.batch_within_ms / 1000

    async def handle(records: list[Record]) -> None:
        """``handle_safely`` until it returns. It dead-letters what fails inside; if
        something escapes it anyway, the batch is retried (effects are idempotent),
        never acked as if it had been handled."""
        pause = _RETRY_START_S
        while True:
            try:
                await state.pipeline.handle_safely(records)
                break
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - retried; the events stay unacked
                first = records[0].origin if records else "-"
                log.exception("batch of %d records from %s failed; retrying in %.1fs", len(records), first, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX_S)
        state.note_handled(records)

    if uses_batch_transport(settings):
        inbound = batch_topic(app, *INBOUND)
        linger_s = settings.batch_linger_ms / 1000

        @app.agent(inbound, concurrency=1, name="streamcdp.hot_path")
        async def hot_path(stream):
            state.pipeline  # created now: /readyz reports ready from here on
            log.info("hot path on the batch transport (%s): one message per partition fetch", app.conf.broker[0])
            manual = stream.noack()  # acked below, only once handled
            channel = manual.channel
            fetches = manual.events().__aiter__()
            while True:
                try:
                    events = [await fetches.__anext__()]
                except StopAsyncIteration:
                    return
                size = len(events[0].value)
                # Merge the fetches already waiting; wait for more only up to
                # CDP_BATCH_LINGER_MS after the first (0: never). Batches grow with the
                # load and stay small when it is light.
                deadline = time.monotonic() + linger_s
                while len(events) < settings.batch_merge and size < settings.batch_max:
                    if channel.empty():
                        if time.monotonic() >= deadline:
                            break
                        await asyncio.sleep(_LINGER_POLL_S)
                        continue
                    events.append(await fetches.__anext__())
                    size += len(events[-1].value)
                await handle([record for event in events for record in event.value])
                for event in events:
                    await manual.ack(event)

    else:
        inbound = app.topic(*INBOUND, key_serializer="raw", value_serializer="raw")

        @app.agent(inbound, concurrency=1, name="streamcdp.hot_path")
        async def hot_path(stream):
            state.pipeline  # created now: /readyz reports ready from here on
            log.info("hot path on faust's own transport (%s): take_events", app.conf.broker[0])
            async for events in stream.take_events(settings.batch_max, within=within_s):
                await handle([record_of(e.message) for e in events])

    @app.task
    async def follow_segment_definitions():
        await state.segments.follow()

    @app.timer(EXPIRE_EVERY_S)
    async def expire_segment_windows():
        state.pipeline  # the segment stage lives in the pipeline
        await state.segments.expire()

    @app.timer(BACKFILL_CHECK_EVERY_S, on_leader=False)
    async def check_segment_backfills():
        state.segments.check_backfills()

    @app.timer(_LAG_EVERY_S)
    async def export_lag():
        state.update_lag()

    _add_routes(app, state)
    return app, state


def _add_routes(app: faust.App, state: WorkerState) -> None:
    settings = state.settings

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            ready, _ = await state.ready()
            state.metrics.up.set(1 if ready else 0)
            return self.bytes(generate_latest(state.metrics.registry), content_type=PROMETHEUS_TEXT)

    @app.page("/healthz")
    class HealthView(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/readyz")
    class ReadyView(View):
        async def get(self, request: Request) -> Response:
            ready, why = await state.ready()
            return self.json({"status": "ready" if ready else "not ready", "detail": why}, status=200 if ready else 503)

    @app.page("/v1/profiles/{profile_id}")
    class ProfileView(View):
        async def get(self, request: Request, profile_id: str) -> Response:
            return await _profile_response(self, profile_id)

    @app.page("/v1/profiles")
    class ProfileLookupView(View):
        async def get(self, request: Request) -> Response:
            identifier = request.query.get("identifier")
            if not identifier:
                return self.json({"error": "query parameter 'identifier' is required, e.g. ?identifier=email:ann@example.com"}, status=400)
            return await _profile_response(self, identifier)

    @app.page("/v1/privacy/requests")
    class PrivacyView(View):
        async def post(self, request: Request) -> Response:
            token = settings.admin_token
            given = request.headers.get("Authorization", "")
            if not token:
                return self.json({"error": "the privacy API is off: set CDP_ADMIN_TOKEN"}, status=403)
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return self.json({"error": "missing or wrong bearer token"}, status=401)
            try:
                body = orjson.loads(await request.read())
                kind, identifier = body["type"], body["identifier"]
                if not isinstance(kind, str) or not isinstance(identifier, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return self.json(
                    {"error": 'expected {"type": "access", "delete", "suppress" or "unsuppress", "identifier": "type:value"}'},
                    status=400,
                )
            pipeline = state.pipeline
            service = PrivacyService(state.redis, pipeline.producer, state.metrics, pipeline.model,
                                     hash_key=settings.id_hash_key, default_region=settings.phone_default_region,
                                     destinations=state.segments.registry.destinations)
            try:
                result = await service.handle(kind, identifier)
            except (InvalidIdentifier, ValueError) as exc:
                return self.json({"error": str(exc)}, status=400)
            return self.json(result, status=200 if result["status"] == "completed" else 404)

    async def _profile_response(view: View, id_or_identifier: str) -> Response:
        try:
            # The worker's Redis client has no per-reply timeout (the hot path times
            # whole round trips); a read for the API gets its own bound.
            async with asyncio.timeout(5.0):
                profile = await lookup_profile(
                    state.redis, id_or_identifier, hash_key=settings.id_hash_key,
                    default_region=settings.phone_default_region, model=state.pipeline.model,
                )
        except InvalidIdentifier as exc:
            return view.json({"error": str(exc)}, status=400)
        except TimeoutError:
            return view.json({"error": "Redis did not answer in time"}, status=503)
        if profile is None:
            return view.json({"error": f"no profile for {id_or_identifier!r}"}, status=404)
        return view.json(profile)
