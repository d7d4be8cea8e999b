"""Back-fill: evaluate a new or changed segment over every existing profile.

Runs in the background of a worker, a chunk of profiles at a time with a pause in
between, so live traffic keeps its pace. One worker does it per segment version: it
holds a lease in Redis (``cdp:seg:backfill:{<segment id>}``, renewed while it works);
if it dies, the lease runs out and another worker (its periodic check) starts over,
which is harmless because evaluation is idempotent. A finished back-fill is recorded
in ``cdp:seg:backfilled`` (segment id → version), so restarts do not repeat it.

A deleted segment is swept the same way: its members exit (``cause`` ``deleted``).

What a back-fill can know: traits, computed traits and the segment's event
conditions as counted so far. Conditions new with this segment start counting when
the segment reaches the workers; events from before are not counted (streamcdp keeps
a bounded history, not every event).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from agents.segments.registry import Retired
from streams.keys import PREFIX
from streams.output import deliver

log = logging.getLogger(__name__)

DONE_KEY = PREFIX + ":seg:backfilled"
LEASE_KEY = PREFIX + ":seg:backfill:{%s}"
LEASE_MS = 60_000
_META_PATTERN = PREFIX + ":p:*:meta"


def _profile_id(key) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return text[text.index("{") + 1:text.index("}")]


async def backfill(engine, redis, producer, metrics, segment, *, chunk: int = 200, pause_s: float = 0.02) -> bool:
    """Back-fill ``segment``; False when it was done already or another worker has it."""
    retired = isinstance(segment, Retired)
    mark = f"deleted@{segment.version}" if retired else str(segment.version)
    done = await redis.hget(DONE_KEY, segment.id)
    if done is not None and done.decode() == mark:
        return False
    lease = LEASE_KEY % segment.id
    token = f"{segment.version}|{uuid.uuid4().hex}"
    if not await redis.set(lease, token, nx=True, px=LEASE_MS):
        return False
    cause = f"{'deleted' if retired else 'definition'}:{segment.id}@{segment.version}"
    started = time.monotonic()
    seen = 0
    metrics.segment_backfills_running.inc()
    try:
        cursor = 0
        while True:
            cursor, keys = await redis.scan(cursor, match=_META_PATTERN, count=chunk)
            profile_ids = sorted({_profile_id(k) for k in keys})
            if profile_ids:
                current = engine.index.segments.get(segment.id)
                if (current is not None) if retired else (current is None or current.version != segment.version):
                    log.info("segment %s changed during its back-fill; the new version takes over", segment.id)
                    return False
                messages = await engine.evaluate_profiles(profile_ids, [segment], cause, int(time.time() * 1000))
                await deliver(producer, messages, metrics)
                seen += len(profile_ids)
                metrics.segment_backfill_profiles.labels(segment.id).inc(len(profile_ids))
            if await redis.get(lease) != token.encode():
                log.warning("lost the back-fill lease of segment %s; another worker continues", segment.id)
                return False
            await redis.pexpire(lease, LEASE_MS)
            if cursor == 0:
                break
            await asyncio.sleep(pause_s)
        await redis.hset(DONE_KEY, segment.id, mark)
        log.info("segment %s version %s %s over %d profiles in %.1fs", segment.id, segment.version,
                 "swept (deleted)" if retired else "back-filled", seen, time.monotonic() - started)
        return True
    finally:
        metrics.segment_backfills_running.dec()
        if await redis.get(lease) == token.encode():
            await redis.delete(lease)
