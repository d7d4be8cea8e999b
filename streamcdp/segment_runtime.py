"""The segment stage's background work inside a worker: following the definitions
topic, the expiry timer, and back-fills.

The worker creates one :class:`SegmentRuntime`; its registry goes to the
``Pipeline`` (which then evaluates segments in the hot path), and the worker's
timers call :meth:`expire` and :meth:`check_backfills`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import NoScriptError

from agents.activation.destinations import Destinations
from agents.profiles.computed import ComputedTraits
from agents.segments import backfill as backfills
from agents.segments.registry import SegmentRegistry
from streams import segment_definitions
from streams.output import deliver
from streams.settings import Settings

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 0.5
BACKFILL_CHECK_EVERY_S = 30.0
# Back-fills a worker runs at once (the others wait their turn): each holds a Redis
# connection and competes with live traffic; hundreds of segments applied together
# would otherwise exhaust the client's connection pool.
BACKFILLS_AT_ONCE = 4


class SegmentRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = SegmentRegistry(
            ComputedTraits.load(settings.computed_traits or None), Destinations.load(settings.destinations or None)
        )
        self.registry.listen(self._changed)
        self._pipeline = None
        self._backfills: dict[str, asyncio.Task] = {}
        self._checked = False
        self._series: set[str] = set()  # segments whose transition series exist
        self._backfill_slots: asyncio.Semaphore | None = None

    def attach(self, pipeline) -> None:
        self._pipeline = pipeline

    async def follow(self) -> None:
        """Follow cdp.segment-definitions for the worker's life."""
        await segment_definitions.follow(self.settings, self.registry)

    async def expire(self) -> None:
        """Re-evaluate the profiles whose windowed counters run out now."""
        pipeline = self._pipeline
        if pipeline is None or pipeline.segments is None or not self.registry.loaded.is_set():
            return
        segments = self.registry.index.segments
        new = segments.keys() - self._series
        if new:
            pipeline.metrics.precreate_segments(new)
            self._series.update(new)
        pipeline.metrics.segments_defined.set(len(segments))
        if not self._checked:  # the first tick after the definitions are loaded
            self._checked = True
            self.check_backfills()
        try:
            messages = await pipeline.segments.expire_due(int(time.time() * 1000))
            await deliver(pipeline.producer, messages, pipeline.metrics)
        except Exception as exc:  # noqa: BLE001 - leased entries come back after the lease
            if isinstance(exc, NoScriptError):
                pipeline.forget_scripts()  # Redis restarted: load the scripts again next time
            pipeline.metrics.redis_errors.labels("segments").inc()
            log.warning("segment expiry failed (%s: %s); the due profiles are retried", type(exc).__name__, exc)

    def check_backfills(self) -> None:
        """Start back-fills not done yet (at start, and again when one's worker died)."""
        if self._pipeline is None or not self.registry.loaded.is_set():
            return
        for segment in list(self.registry.index.segments.values()):
            self._changed(segment)

    def _changed(self, segment) -> None:
        pipeline = self._pipeline
        if pipeline is None:
            return
        running = self._backfills.get(segment.id)
        if running is not None and not running.done():
            return  # it notices a newer version itself and stops; the next check resumes
        self._backfills[segment.id] = asyncio.get_running_loop().create_task(self._backfill(segment))

    async def _backfill(self, segment) -> None:
        pipeline = self._pipeline
        if self._backfill_slots is None:
            self._backfill_slots = asyncio.Semaphore(BACKFILLS_AT_ONCE)
        try:
            async with self._backfill_slots:
                await backfills.backfill(pipeline.segments, pipeline.redis, pipeline.producer, pipeline.metrics, segment)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried by the periodic check
            if isinstance(exc, NoScriptError):
                pipeline.forget_scripts()
            log.warning("back-fill of segment %s failed (%s: %s); retried later", segment.id, type(exc).__name__, exc)
