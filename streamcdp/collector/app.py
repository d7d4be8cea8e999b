"""The collector's aiohttp application: the Segment HTTP Tracking API, health and metrics.

| route | answer |
|---|---|
| ``POST /v1/{track,identify,page,screen,group,alias}`` | one message; ``type`` from the path |
| ``POST /v1/batch`` | ``{"batch": [...]}`` |
| ``POST /v1/{t,i,p,s,g,a,b}`` | analytics.js short paths (``text/plain`` bodies welcome) |
| the same paths without ``/v1`` | |
| ``GET /healthz`` | 200 while the process serves |
| ``GET /readyz`` | 200 when Kafka answers, else 503 |
| ``GET /metrics`` | Prometheus text format |

An ingest request is answered ``200 {"success": true}`` only after Kafka
acknowledged every message in it; 503 when it did not (SDKs retry); 400/401/415
with ``{"success": false, "code": ..., "message": ...}`` otherwise (SDKs drop the
batch). Cross-origin browser requests are allowed: the write key, not the origin,
is the credential.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas.errors import StreamCDPError
from streamcdp.collector.auth import CHANNEL_TOPICS, Source, Unauthorized, WriteKeys, key_from_authorization
from streamcdp.collector.messages import (
    KINDS,
    MAX_BODY_BYTES,
    BadRequest,
    Prepared,
    body_too_large,
    body_write_key,
    decode_body,
    parse_payload,
    prepare,
    received_at,
)
from streamcdp.collector.metrics import CollectorMetrics

log = logging.getLogger(__name__)

#: analytics.js short paths (``/b`` is its batching dispatcher).
SHORT_PATHS = {"t": "track", "i": "identify", "p": "page", "s": "screen", "g": "group", "a": "alias", "b": "batch"}
SOURCE_HEADER = "cdp-source"
_SUCCESS = b'{"success":true}'
_JSON = "application/json"


class KafkaUnavailable(StreamCDPError):
    """Kafka did not acknowledge every message of a request: answered 503."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(cause, detail)
        self.cause = cause  # not_connected, timeout, kafka_error
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.cause}: {self.detail}"


class InFlight:
    """Requests being handled, so that shutdown can wait for them: aiohttp's own
    graceful shutdown drops a request whose body is still arriving."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is in flight; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


IN_FLIGHT = web.AppKey("in_flight", InFlight)


class Sink(Protocol):
    """Where accepted messages go (the Kafka producer in production)."""

    def ready(self) -> tuple[bool, str]:
        """Whether Kafka answers, and why not."""

    async def send_all(self, topic: str, records: Sequence[Prepared], headers: list[tuple[str, bytes]]) -> None:
        """Return once every record is acknowledged; raise :class:`KafkaUnavailable` otherwise."""


def create_app(
    keys: WriteKeys,
    sink: Sink,
    metrics: CollectorMetrics,
    *,
    default_region: str = "US",
    topics: Mapping[str, str] = CHANNEL_TOPICS,
) -> web.Application:
    """The collector app. Serve it with ``auto_decompress=False`` (see ``server.py``):
    the collector inflates bodies itself, with a size cap. ``topics`` maps a write
    key's channel to its topic (the benchmark points it at a topic of its own)."""
    in_flight = InFlight()
    app = web.Application(middlewares=[_observe(metrics, in_flight)])
    app[IN_FLIGHT] = in_flight
    ingest = Ingest(keys, sink, metrics, default_region, topics)
    for prefix in ("/v1", ""):
        for kind in KINDS:
            _add_ingest(app, f"{prefix}/{kind}", ingest.handler(kind))
        for short, kind in SHORT_PATHS.items():
            _add_ingest(app, f"{prefix}/{short}", ingest.handler(kind))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz(sink))
    app.router.add_get("/metrics", _metrics(metrics))
    app.on_response_prepare.append(_allow_cross_origin)
    return app


def _add_ingest(app: web.Application, path: str, handler: Callable[[web.Request], Awaitable[web.Response]]) -> None:
    app.router.add_post(path, handler)
    app.router.add_route("OPTIONS", path, _preflight)


class Ingest:
    """The ingest routes: authenticate, decode, enrich, produce, answer."""

    def __init__(
        self, keys: WriteKeys, sink: Sink, metrics: CollectorMetrics, default_region: str, topics: Mapping[str, str]
    ) -> None:
        self.keys = keys
        self.topics = topics
        self.sink = sink
        self.metrics = metrics
        self.default_region = default_region

    def handler(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self.ingest(kind, request)

        return handle

    async def ingest(self, kind: str, request: web.Request) -> web.Response:
        try:
            header_key = key_from_authorization(request.headers.get("Authorization"))
            # Refuse a wrong header key before reading the body.
            source = self.keys.authenticate(header_key) if header_key is not None else None
            raw = await _read_body(request, MAX_BODY_BYTES)
            payload = parse_payload(decode_body(raw, request.headers.get("Content-Encoding")))
            if source is None:
                source = self.keys.authenticate(body_write_key(payload))
            records = prepare(
                kind,
                payload,
                received_at=received_at(),
                default_region=self.default_region,
                channel_note=source.channel_note,
            )
            if records:
                await self.sink.send_all(self.topics[source.channel], records, [(SOURCE_HEADER, source.name.encode())])
        except Unauthorized as exc:
            return self._refuse(401, exc.code, exc.message, headers={"WWW-Authenticate": 'Basic realm="streamcdp"'})
        except BadRequest as exc:
            return self._refuse(exc.status, exc.code, exc.message, index=exc.index)
        except KafkaUnavailable as exc:
            self.metrics.produce_errors.labels(exc.cause).inc()
            log.debug("answering 503: %s", exc)
            return _error(503, "kafka_unavailable", f"events not stored, retry later ({exc.detail})")
        self._count(source, len(records))
        return web.Response(body=_SUCCESS, content_type=_JSON)

    def _count(self, source: Source, events: int) -> None:
        if events:
            self.metrics.events.labels(source.channel).inc(events)

    def _refuse(self, status: int, code: str, message: str, **extra) -> web.Response:
        self.metrics.rejected.labels(code).inc()
        return _error(status, code, message, **extra)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refusing anything above ``limit`` bytes without reading on."""
    length = request.content_length
    if length is not None and length > limit:
        raise body_too_large(f"the body is {length} bytes", limit)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise body_too_large(f"the body is more than {limit} bytes", limit)
    return bytes(body)


def _error(
    status: int, code: str, message: str, *, index: int | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    # "code" and "message" are what the Segment and RudderStack SDKs read from an error.
    body: dict[str, object] = {"success": False, "code": code, "message": message}
    if index is not None:
        body["index"] = index
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


# ------------------------------------------------------------- other routes


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


def _readyz(sink: Sink) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def readyz(request: web.Request) -> web.Response:
        ok, reason = sink.ready()
        if ok:
            return web.Response(body=b'{"status":"ready"}', content_type=_JSON)
        return web.Response(
            status=503, body=orjson.dumps({"status": "not ready", "reason": reason}), content_type=_JSON
        )

    return readyz


def _metrics(metrics: CollectorMetrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return serve


async def _preflight(request: web.Request) -> web.Response:
    requested = request.headers.get("Access-Control-Request-Headers", "Content-Type, Authorization")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": requested,
            "Access-Control-Max-Age": "86400",
        },
    )


async def _allow_cross_origin(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin")
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"


# --------------------------------------------------------------- middleware


def _observe(metrics: CollectorMetrics, in_flight: InFlight):
    """Count every answer by route and status, time it, track it as in flight, and
    answer 404/405 in JSON."""

    @web.middleware
    async def observe(request: web.Request, handler):
        start = time.perf_counter()
        in_flight.enter()
        info = request.match_info
        route = info.route.resource.canonical if info.route.resource is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            if status in (404, 405):
                return _error(status, "not_found" if status == 404 else "method_not_allowed", exc.reason)
            raise
        finally:
            in_flight.leave()
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)

    return observe
