"""SIGKILL the worker mid-stream, restart it, and check that nothing was lost and
nothing counted twice: every profile's event count, computed traits (order count,
spend per currency, counts per event name) and history equal the values computed
here from the input, and every input event has a resolved output (duplicates only
as redeliveries of the same record, which carry the same messageId)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter

import orjson
import pytest
import redis.asyncio as aioredis

from agents.profiles.store import lookup_profile
from streams.topics import EVENTS_APP, EVENTS_WEB, RESOLVED
from tests.conftest import identify, track, unique
from tests.integration.conftest import WorkerProcess, _redis_url_with_db, start_group_at_end

pytestmark = pytest.mark.asyncio(loop_scope="session")

CRASH_DB = 13
USERS = 40
EVENTS = 3000
KILLS = 2


async def profiles_of(store, users, settings) -> dict[str, dict | None]:
    return {
        user: await lookup_profile(store, f"user_id:{user}", hash_key=settings.id_hash_key, default_region="US")
        for user in users
    }


def expected_profile(events: list[dict]) -> dict:
    """What the profile of these events must show, computed from the input alone."""
    spend: dict[str, float] = {}
    names: Counter[str] = Counter()
    for event in events:
        names[event.get("event") or event["type"]] += 1
        if event.get("event") == "Order Completed":
            currency = event["properties"]["currency"]
            spend[currency] = round(spend.get(currency, 0) + event["properties"]["total"], 2)
    newest = sorted(events, key=lambda e: e["timestamp"], reverse=True)[:20]
    return {
        "eventCount": len(events),
        "order_count": names["Order Completed"],
        "total_spend": spend,
        "event_counts": dict(names),
        "history": [e["messageId"] for e in newest],
    }


def shown(profile: dict | None) -> dict | None:
    if profile is None:
        return None
    computed = profile["computedTraits"]
    return {
        "eventCount": profile["eventCount"],
        "order_count": computed["order_count"],
        "total_spend": {c: round(v, 2) for c, v in computed["total_spend"].items()},
        "event_counts": computed["event_counts"],
        "history": [e["messageId"] for e in profile["recentEvents"]],
    }


async def applied_counts(store, users, settings) -> dict[str, int]:
    counts = {}
    for user in users:
        profile = await lookup_profile(store, f"user_id:{user}", hash_key=settings.id_hash_key, default_region="US")
        counts[user] = profile["eventCount"] if profile else 0
    return counts


async def applied_total(store, users, settings) -> int:
    return sum((await applied_counts(store, users, settings)).values())


async def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(infra, producer, topic_reader):
    settings = dataclasses.replace(
        infra, redis_url=_redis_url_with_db(infra.redis_url, CRASH_DB), app_id=unique("streamcdp-crash"), batch_max=200
    )
    store = aioredis.from_url(settings.redis_url)
    await store.flushdb()
    resolved = await topic_reader(RESOLVED)
    await start_group_at_end(settings, settings.app_id)
    worker = WorkerProcess(settings, "worker-crash")
    worker.start()
    await worker.wait_ready()

    rng = random.Random(7)
    users = [unique("crash-u") for _ in range(USERS)]
    expected: Counter[str] = Counter()
    sent: dict[str, list[dict]] = {user: [] for user in users}
    message_ids: set[str] = set()
    clock = iter(range(10**6))
    chunks = 30
    kill_at = {chunks * (k + 1) // (KILLS + 1) for k in range(KILLS)}
    try:
        for chunk in range(chunks):
            batch = []
            for _ in range(EVENTS // chunks):
                user = rng.choice(users)
                roll = rng.random()
                if roll < 0.2:
                    event = identify(userId=user, traits={"n": rng.randint(0, 9)})
                elif roll < 0.4:
                    event = track(userId=user, anonymousId=None, event="Order Completed", properties={
                        "total": rng.randint(100, 9999) / 100, "currency": rng.choice(("EUR", "USD"))})
                else:
                    event = track(userId=user, anonymousId=None)
                # Distinct event times (sent shuffled within a chunk), so the
                # expected history is exact.
                second = next(clock)
                event["timestamp"] = f"2026-11-20T{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}.{rng.randint(0, 999):03d}Z"
                batch.append((user, event))
                sent[user].append(event)
                expected[user] += 1
                message_ids.add(event["messageId"])
            rng.shuffle(batch)
            for user, event in batch:
                await producer.send(rng.choice((EVENTS_WEB, EVENTS_APP)), orjson.dumps(event), key=user.encode())
            await producer.flush()
            if chunk in kill_at:
                # Kill only once the worker is applying this session's events, at a
                # random moment inside the stream.
                applied = await applied_total(store, users, settings)
                for _ in range(200):
                    if await applied_total(store, users, settings) > applied:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                worker.kill()
                worker.start()
                await worker.wait_ready()
            else:
                await asyncio.sleep(0.05)

        counts: dict[str, int] = {}
        for _ in range(300):  # wait (bounded) until every event is applied
            counts = await applied_counts(store, users, settings)
            if sum(counts.values()) >= EVENTS:
                break
            await asyncio.sleep(0.5)
        assert counts == dict(expected), "every profile's event count must equal its input exactly"
        profiles = await profiles_of(store, users, settings)
        for user in users:
            assert shown(profiles[user]) == expected_profile(sent[user]), f"{user}: computed traits or history differ from the input"

        found = await resolved.collect(lambda r: orjson.loads(r.value)["messageId"] in message_ids, EVENTS, timeout_s=60)
        await resolved.drain(quiet_s=2.0)
        ours = [orjson.loads(r.value) for r in resolved.seen if orjson.loads(r.value)["messageId"] in message_ids]
        assert {o["messageId"] for o in ours} == message_ids, "every event has a resolved output"
        by_id: dict[str, set] = {}
        for o in ours:
            by_id.setdefault(o["messageId"], set()).add((o["source"]["topic"], o["source"]["partition"], o["source"]["offset"]))
        assert all(len(origins) == 1 for origins in by_id.values()), "a repeated output is only ever a redelivery of one record"
        assert len(found) >= EVENTS
    finally:
        worker.stop()
        await store.aclose()
