"""The worker's segment runtime: back-fills of many segments applied at once run a
few at a time (each holds a Redis connection), and every one of them runs."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
import pytest

from streamcdp import segment_runtime
from streams.settings import Settings


@pytest.mark.asyncio
async def test_backfills_of_many_segments_run_a_few_at_a_time(monkeypatch):
    running, most, done = 0, 0, []

    async def fake_backfill(engine, redis, producer, metrics, segment):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001)
        running -= 1
        done.append(segment.id)
        return True

    monkeypatch.setattr(segment_runtime.backfills, "backfill", fake_backfill)
    runtime = segment_runtime.SegmentRuntime(Settings())
    runtime.attach(SimpleNamespace(segments=object(), redis=None, producer=None, metrics=None))
    runtime.registry.loaded.set()
    ids = [f"s{i:03d}" for i in range(40)]
    for segment_id in ids:
        runtime.registry.apply_record(segment_id.encode(), orjson.dumps(
            {"id": segment_id, "version": 1, "rule": {"trait": "plan", "eq": "pro"}}))
    await asyncio.gather(*runtime._backfills.values())
    assert sorted(done) == ids
    assert most == segment_runtime.BACKFILLS_AT_ONCE


@pytest.mark.asyncio
async def test_the_timer_reloads_the_scripts_after_redis_lost_them():
    from redis.exceptions import NoScriptError

    from streams.metrics import Metrics

    calls = {"expire": 0, "forgot": 0}

    class Engine:
        async def expire_due(self, now_ms):
            calls["expire"] += 1
            if calls["forgot"] == 0:
                raise NoScriptError("No matching script")
            return []

    def forget():
        calls["forgot"] += 1

    runtime = segment_runtime.SegmentRuntime(Settings())
    runtime.attach(SimpleNamespace(segments=Engine(), metrics=Metrics(), producer=None, forget_scripts=forget))
    runtime.registry.loaded.set()
    runtime._checked = True
    await runtime.expire()  # meets the restarted Redis: forgets the scripts
    await runtime.expire()  # and works again
    assert calls == {"expire": 2, "forgot": 1}
