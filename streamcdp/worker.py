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
import logging
import time

import faust
import redis.asyncio as aioredis
from faust.web import Request, Response, View
from prometheus_client import generate_latest

from agents.pipeline import Pipeline
from agents.profiles.store import lookup_profile
from schemas.errors import InvalidIdentifier
from streams.app import create_app
from streams.metrics import Metrics
from streams.output import FaustProducer
from streams.records import Record
from streams.redis_client import connect
from streams.settings import Settings
from streams.topics import INBOUND

log = logging.getLogger(__name__)

# Prometheus text format 0.0.4 (aiohttp refuses a charset in content_type; it is UTF-8).
PROMETHEUS_TEXT = "text/plain; version=0.0.4"
_READY_PING_EVERY_S = 1.0
_LAG_EVERY_S = 5.0


class WorkerState:
    """What the agent, the timers and the views share inside one worker process."""

    def __init__(self, app: faust.App, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self._redis: aioredis.Redis | None = None
        self._pipeline: Pipeline | None = None
        self.next_offsets: dict[tuple[str, int], int] = {}
        self._redis_ok_at = 0.0
        self._lag_labels: set[tuple[str, str]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        # Created on first use, inside the worker's event loop.
        if self._redis is None:
            self._redis = connect(self.settings.redis_url, health_check_interval=10)
        return self._redis

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = Pipeline(self.settings, self.redis, FaustProducer(self.app), self.metrics)
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


def build_worker_app(settings: Settings, metrics: Metrics | None = None) -> tuple[faust.App, WorkerState]:
    app = create_app(settings)
    state = WorkerState(app, settings, metrics or Metrics())
    inbound = app.topic(*INBOUND, key_serializer="raw", value_serializer="raw")
    within_s = settings.batch_within_ms / 1000

    @app.agent(inbound, concurrency=1, name="streamcdp.hot_path")
    async def hot_path(stream):
        pipeline = state.pipeline
        async for events in stream.take_events(settings.batch_max, within=within_s):
            records = [record_of(e.message) for e in events]
            await pipeline.handle_safely(records)
            state.note_handled(records)

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

    async def _profile_response(view: View, id_or_identifier: str) -> Response:
        try:
            profile = await lookup_profile(
                state.redis, id_or_identifier, hash_key=settings.id_hash_key,
                default_region=settings.phone_default_region, model=state.pipeline.model,
            )
        except InvalidIdentifier as exc:
            return view.json({"error": str(exc)}, status=400)
        if profile is None:
            return view.json({"error": f"no profile for {id_or_identifier!r}"}, status=404)
        return view.json(profile)
