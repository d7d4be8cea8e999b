"""``python -m bench.profile_memory``: Redis memory per profile.

Builds N typical profiles through the real hot path (``Pipeline.handle`` against the
real Redis): each person has 3 identifiers (user_id, email, anonymous_id), 10 traits,
5 computed traits (order count, spend per currency, last order, categories bought,
event counts per name) and 20 events, so a history of 20. Then prints, per profile:

* Redis's own ``used_memory`` growth divided by N (everything, allocator included);
* ``MEMORY USAGE`` of each key of the profile, by key, averaged over a sample;
* the same split as the issue asks it: the profile besides its history and its
  de-duplication records, the history, and the de-duplication records (one per
  event within ``CDP_DEDUPE_TTL``, 7 days by default);
* baseline, measured in the same run: the profile's JSON document (as the read API
  returns it) stored as one Redis string per profile, the naive layout.

Outputs of the hot path are not produced (``CDP_EMIT_RESOLVED=false``): this
measures memory, not Kafka.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time

import orjson

from agents.pipeline import Pipeline
from agents.profiles.computed import ComputedTraits
from agents.profiles.model import ProfileModel
from agents.profiles.store import read_profile
from bench.common import machine_facts
from streams.keys import ProfileKeys
from streams.metrics import Metrics
from streams.records import Record
from streams.redis_client import connect
from streams.settings import Settings
from streams.topics import EVENTS_APP, EVENTS_POS, EVENTS_WEB

FIVE_COMPUTED = {"computed_traits": [
    {"name": "order_count", "aggregate": "count", "events": ["Order Completed"]},
    {"name": "total_spend", "aggregate": "sum", "events": ["Order Completed"], "property": "properties.total", "per": "properties.currency"},
    {"name": "last_order", "aggregate": "last", "events": ["Order Completed"],
     "property": ["properties.order_id", "properties.total", "properties.currency"]},
    {"name": "product_categories", "aggregate": "distinct", "events": ["Order Completed"], "property": "properties.products.category"},
    {"name": "event_counts", "aggregate": "count", "per": "event"},
]}
CATEGORIES = ["baby", "toys", "shoes", "books", "garden", "kitchen", "sports"]
EVENT_NAMES = ["Product Viewed", "Product Added", "Cart Viewed", "Checkout Started"]


class _NoOutput:
    async def enqueue(self, message):
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def person_events(index: int, rng: random.Random, start_ms: int) -> list[dict]:
    user, anon = f"mem-u-{index}", f"mem-a-{index:08x}"
    traits = {
        "email": f"person.{index}@example.com", "first_name": rng.choice(["Ann", "Bo", "Chen", "Dana"]),
        "last_name": rng.choice(["Smith", "Berg", "Okafor", "Rossi"]), "plan": rng.choice(["free", "pro"]),
        "city": rng.choice(["Oslo", "Berlin", "Lyon"]), "country": "NO", "birthday": "1990-04-01",
        "newsletter": True, "age": rng.randint(18, 80), "company": "Acme",
    }
    events = [{"type": "identify", "userId": user, "anonymousId": anon, "traits": traits}]
    for _ in range(19):
        if rng.random() < 0.25:
            products = [{"sku": f"s{rng.randint(1, 999)}", "category": rng.choice(CATEGORIES), "price": 20} for _ in range(rng.randint(1, 3))]
            events.append({"type": "track", "userId": user, "event": "Order Completed", "properties": {
                "order_id": f"o-{rng.getrandbits(48):012x}", "total": round(rng.uniform(10, 300), 2),
                "currency": rng.choice(["EUR", "EUR", "USD"]), "products": products}})
        else:
            events.append({"type": "track", "userId": user, "anonymousId": anon, "event": rng.choice(EVENT_NAMES),
                           "properties": {"sku": f"s{rng.randint(1, 999)}", "price": 20}})
    for n, event in enumerate(events):
        event["messageId"] = f"{index:06d}-{n:02d}-{rng.getrandbits(64):016x}"
        event["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime((start_ms + n * 3_600_000) / 1000))
    return events


async def measure(settings: Settings, profiles: int) -> dict:
    redis = connect(settings.redis_url)
    await redis.flushdb()
    server = await redis.info("server")
    model = ProfileModel.load(settings)
    model = ProfileModel(ComputedTraits.parse(FIVE_COMPUTED), model.sensitive, 20, model.history_properties_bytes)
    pipeline = Pipeline(settings, redis, _NoOutput(), Metrics(), model=model)
    rng = random.Random(1)
    start_ms = int(time.time() * 1000) - 30 * 86_400_000
    before = int((await redis.info("memory"))["used_memory"])
    offset = 0
    records: list[Record] = []
    for index in range(profiles):
        for event in person_events(index, rng, start_ms):
            records.append(Record(rng.choice((EVENTS_WEB, EVENTS_APP, EVENTS_POS)), 0, offset, None, orjson.dumps(event), start_ms))
            offset += 1
        if len(records) >= 500:
            await pipeline.handle(records)
            records = []
    if records:
        await pipeline.handle(records)
    after = int((await redis.info("memory"))["used_memory"])

    sample = [f"mem-u-{i}" for i in rng.sample(range(profiles), min(profiles, 200))]
    by_key: dict[str, list[int]] = {}
    documents = []
    for user in sample:
        profile_id = (await redis.get(_id_key(settings, user))).decode()
        keys = ProfileKeys(profile_id)
        for name in ("meta", "traits", "ids", "computed", "history", "seen", "match"):
            usage = await redis.memory_usage(getattr(keys, name)) or 0
            by_key.setdefault(name, []).append(usage)
        documents.append(orjson.dumps(await read_profile(redis, profile_id, model)))
    identifier_keys = []
    for user in sample[:50]:
        identifier_keys.append(await redis.memory_usage(_id_key(settings, user)) or 0)

    # Baseline: the same profiles as one JSON string each.
    await redis.flushdb()
    base_before = int((await redis.info("memory"))["used_memory"])
    for index, document in enumerate(documents):
        await redis.set(f"bench:profile-json:{{p{index}}}", document)
    base_after = int((await redis.info("memory"))["used_memory"])
    await redis.flushdb()
    await redis.aclose()
    mean = {name: statistics.fmean(values) for name, values in by_key.items()}
    return {
        "profiles": profiles,
        "redis_version": f"{server['redis_version']} (hash-max-listpack-value {await _config(settings, 'hash-max-listpack-value')})",
        "used_memory_per_profile": (after - before) / profiles,
        "by_key": mean,
        "identifier_key": statistics.fmean(identifier_keys),
        "json_per_profile": (base_after - base_before) / len(documents),
        "json_bytes": statistics.fmean(len(d) for d in documents),
    }


async def _config(settings: Settings, name: str) -> str:
    redis = connect(settings.redis_url)
    try:
        return (await redis.config_get(name)).get(name, "?")
    finally:
        await redis.aclose()


def _id_key(settings: Settings, user: str) -> str:
    from schemas.events import Identifier
    from streams.keys import identifier_key

    return identifier_key(Identifier("user_id", user), settings.id_hash_key)


def report(figures: dict) -> str:
    k = figures["by_key"]
    core = k["meta"] + k["traits"] + k["ids"] + k["computed"] + k.get("match", 0)
    ids = 3 * figures["identifier_key"]
    lines = [
        f"Redis memory per profile ({figures['profiles']:,} profiles: 3 identifiers, 10 traits, 5 computed traits, 20 events)",
        f"  used_memory growth / profiles      {figures['used_memory_per_profile']:8,.0f} B  (everything: keys, index, blocking"
        " keys, allocator; server-wide, so only right when nothing else writes to this Redis meanwhile)",
        "  MEMORY USAGE by key (mean of a sample):",
    ]
    for name in ("meta", "traits", "ids", "computed", "match", "history", "seen"):
        lines.append(f"    {name:<10} {k[name]:8,.0f} B")
    lines += [
        f"    3 identifier index keys {ids:8,.0f} B",
        f"  profile besides history and de-duplication records: {core:,.0f} B"
        f" (+ {ids:,.0f} B identifier index = {core + ids:,.0f} B; aim < 2,048 B)",
        f"  history (20 events): {k['history']:,.0f} B;  de-duplication records (20 within the TTL): {k['seen']:,.0f} B",
        f"  baseline: the profile's JSON ({figures['json_bytes']:,.0f} B) as one string: {figures['json_per_profile']:,.0f} B per profile",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=2000, help="profiles to build (default 2,000)")
    parser.add_argument("--redis-db", type=int, default=14, help="Redis database to use and flush (default 14)")
    args = parser.parse_args(argv)
    base = Settings.from_env()
    url = base.redis_url.rsplit("/", 1)[0] + f"/{args.redis_db}"
    settings = Settings.from_env(redis_url=url, emit_resolved=False)
    figures = asyncio.run(measure(settings, args.profiles))
    for name, value in machine_facts(figures["redis_version"]):
        print(f"{name:<10} {value}")
    print(report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
