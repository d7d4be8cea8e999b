"""Live profiles against a real Redis: traits by event time, computed traits,
history, consent, redelivery, merge folding, sensitive traits and the read API."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import time

import orjson
import pytest
import pytest_asyncio

from agents.pipeline import Pipeline
from agents.profiles.model import ProfileModel
from agents.profiles.store import lookup_profile, read_profile
from streams.keys import ProfileKeys
from streams.output import AiokafkaProducer
from streams.records import Record
from streams.topics import EVENTS_POS, EVENTS_WEB
from tests.conftest import identify, track, unique
from tests.integration.conftest import ROOT, http_get, redis_texts

pytestmark = pytest.mark.asyncio(loop_scope="session")

_offsets = iter(range(20_000_000, 30_000_000))


def record(event: dict, topic: str = EVENTS_WEB) -> Record:
    return Record(topic, 0, next(_offsets), None, orjson.dumps(event), int(time.time() * 1000))


def at(day: int, hour: int = 10) -> str:
    return f"2026-11-{day:02d}T{hour:02d}:00:00Z"


def order(user: str, total: float, day: int, currency: str = "EUR", categories=("baby",), **fields) -> dict:
    products = [{"sku": f"sku-{c}", "category": c, "price": total} for c in categories]
    return track(
        userId=user, anonymousId=None, event="Order Completed", timestamp=at(day),
        properties={"order_id": unique("o"), "total": total, "currency": currency, "products": products}, **fields,
    )


@pytest_asyncio.fixture
async def pipeline(infra, redis, producer, metrics):
    return Pipeline(infra, redis, AiokafkaProducer(producer), metrics)


async def profile_of(redis, identifier: str, **kwargs) -> dict:
    profile = await lookup_profile(redis, identifier, hash_key="", default_region="US", **kwargs)
    assert profile is not None, f"no profile for {identifier}"
    return profile


async def test_traits_keep_the_latest_by_event_time_per_field_and_nested(pipeline, redis):
    user = unique("u")
    newer = identify(userId=user, timestamp=at(10), traits={"plan": "gold", "address": {"city": "Oslo", "street": "Main 1"}})
    older = identify(userId=user, timestamp=at(5), traits={"plan": "free", "age": 40, "address": {"city": "Bergen", "zip": "5003"}})
    await pipeline.handle([record(newer)])
    await pipeline.handle([record(older)])  # late: older values lose, new fields land
    profile = await profile_of(redis, f"user_id:{user}")
    assert profile["traits"] == {"plan": "gold", "age": 40, "address": {"city": "Oslo", "street": "Main 1", "zip": "5003"}}
    # A later event replaces one leaf only.
    await pipeline.handle([record(identify(userId=user, timestamp=at(11), traits={"address": {"city": "Trondheim"}}))])
    profile = await profile_of(redis, f"user_id:{user}")
    assert profile["traits"]["address"] == {"city": "Trondheim", "street": "Main 1", "zip": "5003"}


async def test_computed_traits_history_and_consent(pipeline, redis):
    user = unique("u")
    events = [
        order(user, 100, 1, categories=("baby", "toys")),
        order(user, 50, 3, currency="USD", categories=("shoes",)),
        order(user, 30, 2, categories=("baby",)),
        track(userId=user, anonymousId=None, event="Product Viewed", timestamp=at(4), properties={"sku": "x"}),
        identify(userId=user, timestamp=at(2), traits={"email": "ann@example.com"},
                 context={"consent": {"categoryPreferences": {"marketing": True, "ads": False}}}),
        identify(userId=user, timestamp=at(1), traits={}, context={"consent": {"categoryPreferences": {"marketing": False}}}),
    ]
    await pipeline.handle([record(e, EVENTS_POS if i == 1 else EVENTS_WEB) for i, e in enumerate(events)])
    profile = await profile_of(redis, f"user_id:{user}")
    computed = profile["computedTraits"]
    assert computed["order_count"] == 3
    assert computed["total_spend"] == {"EUR": 130, "USD": 50}
    assert computed["average_order_value"] == {"EUR": 65, "USD": 50}
    assert computed["event_counts"] == {"Order Completed": 3, "Product Viewed": 1, "identify": 2}
    assert sorted(computed["channels_used"]) == ["pos", "web"]
    assert sorted(computed["product_categories"]) == ["baby", "shoes", "toys"]
    assert computed["last_order"]["value"]["total"] == 50 and computed["last_order"]["at"] == "2026-11-03T10:00:00.000Z"
    assert computed["rfm"]["count"] == 3 and computed["rfm"]["total"] == 180
    # Consent: the latest choice by event time per purpose, with its source event.
    assert profile["consent"]["marketing"]["granted"] is True
    assert profile["consent"]["marketing"]["messageId"] == events[4]["messageId"]
    assert profile["consent"]["ads"]["granted"] is False
    # History: newest event time first, whatever the arrival order.
    assert [e["timestamp"][:10] for e in profile["recentEvents"]] == [
        "2026-11-04", "2026-11-03", "2026-11-02", "2026-11-02", "2026-11-01", "2026-11-01"]
    assert profile["recentEvents"][0]["event"] == "Product Viewed"
    assert profile["recentEvents"][0]["properties"] == {"sku": "x"}
    assert profile["segments"] == []


async def test_history_is_bounded_and_keeps_the_newest(infra, redis, producer, metrics):
    model = dataclasses.replace(ProfileModel.load(infra), history_length=5)
    pipeline = Pipeline(infra, redis, AiokafkaProducer(producer), metrics, model=model)
    user = unique("u")
    days = [7, 3, 9, 1, 12, 5, 11, 2, 8, 10]
    await pipeline.handle([record(track(userId=user, anonymousId=None, timestamp=at(d), properties={"day": d})) for d in days])
    await pipeline.handle([record(track(userId=user, anonymousId=None, timestamp=at(4), properties={"day": 4}))])  # too old to enter
    profile = await profile_of(redis, f"user_id:{user}", model=model)
    assert [e["properties"]["day"] for e in profile["recentEvents"]] == [12, 11, 10, 9, 8]
    assert await redis.llen(ProfileKeys(profile["id"]).history) == 5


async def test_a_redelivered_or_resent_event_changes_nothing(pipeline, redis):
    user = unique("u")
    event = order(user, 40, 5)
    first = record(event)
    await pipeline.handle([first])
    before = await profile_of(redis, f"user_id:{user}")
    await pipeline.handle([first])  # the same record again: a replay
    await pipeline.handle([record(event)])  # the same messageId in another record: a resend
    after = await profile_of(redis, f"user_id:{user}")
    for field in ("eventCount", "computedTraits", "recentEvents", "traits"):
        assert after[field] == before[field], field


async def test_merge_folds_everything_into_the_survivor_once(pipeline, redis):
    web, pos_card = unique("a"), unique("L")
    # Two strangers: a web visitor (anonymous) and a loyalty card at the till.
    await pipeline.handle([record(track(anonymousId=web, timestamp=at(2), event="Order Completed",
                                        properties={"total": 10, "currency": "EUR", "products": [{"category": "toys"}]},
                                        context={"traits": {"first_name": "Ann"}}))])
    await pipeline.handle([record(track(anonymousId=None, timestamp=at(6), event="Order Completed",
                                        properties={"total": 32, "currency": "EUR", "products": [{"category": "baby"}]},
                                        context={"externalIds": [{"id": pos_card, "type": "loyalty_id"}],
                                                 "traits": {"first_name": "Anne"}}), EVENTS_POS)])
    a = await profile_of(redis, f"anonymous_id:{web}")
    b = await profile_of(redis, f"loyalty_id:{pos_card}")
    assert a["id"] != b["id"]
    # One event carrying both identifiers merges them.
    link = track(anonymousId=web, timestamp=at(4), event="Signed In", context={"externalIds": [{"id": pos_card, "type": "loyalty_id"}]})
    link_record = record(link)
    await pipeline.handle([link_record])
    merged = await profile_of(redis, f"anonymous_id:{web}")
    assert merged == await profile_of(redis, f"loyalty_id:{pos_card}")
    survivor, absorbed = (a, b) if a["id"] < b["id"] else (b, a)
    assert merged["id"] == survivor["id"]
    assert merged["eventCount"] == 3
    assert merged["computedTraits"]["order_count"] == 2
    assert merged["computedTraits"]["total_spend"] == {"EUR": 42}
    assert sorted(merged["computedTraits"]["product_categories"]) == ["baby", "toys"]
    assert merged["computedTraits"]["last_order"]["value"]["total"] == 32
    assert merged["traits"]["first_name"] == "Anne"  # the later event's value
    assert merged["firstSeen"].startswith("2026-11-02") and merged["lastSeen"].startswith("2026-11-06")
    assert [e["event"] for e in merged["recentEvents"]] == ["Order Completed", "Signed In", "Order Completed"]
    # The absorbed profile is gone but for its forwarding pointer.
    for key in ProfileKeys(absorbed["id"]).state():
        assert not await redis.exists(key), key
    # A replayed merge (the same record again) and a late event for the absorbed profile.
    await pipeline.handle([link_record])
    late = track(anonymousId=None, timestamp=at(7), event="Order Completed",
                 properties={"total": 8, "currency": "EUR"}, context={"externalIds": [{"id": pos_card, "type": "loyalty_id"}]})
    await pipeline.handle([record(late, EVENTS_POS)])
    again = await profile_of(redis, f"loyalty_id:{pos_card}")
    assert again["id"] == survivor["id"]
    assert again["eventCount"] == 4 and again["computedTraits"]["order_count"] == 3
    assert again["computedTraits"]["total_spend"] == {"EUR": 50}
    assert (await read_profile(redis, absorbed["id"]))["id"] == survivor["id"]


async def test_sensitive_traits_never_reach_redis_in_clear_text(infra, redis, producer, metrics):
    key = base64.b64encode(bytes(range(32))).decode()
    settings = dataclasses.replace(infra, sensitive_key=key)
    model = ProfileModel.load(settings)
    pipeline = Pipeline(settings, redis, AiokafkaProducer(producer), metrics, model=model)
    user = unique("u")
    secrets = {"national": "NI-88-1234-X9", "passport": "P9981772Q", "iban": "DE89370400440532013000"}
    await pipeline.handle([
        record(identify(userId=user, traits={"national_id": secrets["national"], "bank": {"iban": secrets["iban"]}, "plan": "pro"})),
        record(track(userId=user, anonymousId=None, event="Document Checked",
                     properties={"passportNumber": secrets["passport"]},
                     context={"externalIds": [{"id": secrets["passport"], "type": "passport"}]})),
    ])
    profile = await profile_of(redis, f"user_id:{user}", model=model)
    assert profile["traits"]["plan"] == "pro"
    protected = profile["traits"]["national_id"]
    assert protected["sensitive"] is True and "hash" in protected and "encrypted" in protected
    assert model.sensitive.reveal(protected) == secrets["national"]
    # The person is found by the passport as an identifier, through its keyed hash.
    assert (await profile_of(redis, f"passport:{secrets['passport']}", model=model))["id"] == profile["id"]
    # No clear-text copy anywhere in Redis (this test's database holds other tests' data too).
    found = [(name, secret) for name, value in await redis_texts(redis)
             for secret in secrets.values() if secret.encode() in value]
    assert found == []


async def test_read_api_and_cli(worker, redis, producer):
    user = unique("u")
    await producer.send_and_wait(EVENTS_WEB, orjson.dumps(order(user, 12.5, 9)))
    base = worker.url
    body = b""
    for _ in range(100):
        status, body = http_get(f"{base}/v1/profiles?identifier=user_id:{user}")
        if status == 200:
            break
        time.sleep(0.1)
    profile = json.loads(body)
    assert profile["computedTraits"]["order_count"] == 1 and profile["recentEvents"][0]["event"] == "Order Completed"
    status, by_id = http_get(f"{base}/v1/profiles/{profile['id']}")
    assert status == 200 and json.loads(by_id)["id"] == profile["id"]
    status, missing = http_get(f"{base}/v1/profiles/p_000000000000000000000")
    assert status == 404 and "error" in json.loads(missing)
    env = dict(os.environ, CDP_REDIS_URL=worker.settings.redis_url)
    cli = subprocess.run([sys.executable, "-m", "streamcdp.cli", "profile", "get", f"user_id:{user}"],
                         capture_output=True, cwd=ROOT, env=env, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["computedTraits"]["total_spend"] == {"EUR": 12.5}


async def test_known_identifiers_skip_profile_reads_and_a_merge_elsewhere_is_followed(infra, redis, producer, metrics):
    """Events whose identifiers all belong to one profile are applied without reading
    profiles; when another worker merges that profile meanwhile, the event is
    answered MOVED and lands on the survivor."""
    from streams.metrics import Metrics

    ours = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    other = Pipeline(infra, redis, AiokafkaProducer(producer), Metrics())
    old_user, anon = unique("u"), unique("a")
    await ours.handle([record(track(userId=old_user, anonymousId=None, timestamp=at(1)))])  # the older profile
    await ours.handle([record(track(anonymousId=anon, timestamp=at(2)))])  # a younger one
    young = (await profile_of(redis, f"anonymous_id:{anon}"))["id"]
    # Warm: our caches now know anon's owner; a further event takes the shortcut.
    await ours.handle([record(track(anonymousId=anon, timestamp=at(3)))])
    # Another worker links the two: the young profile is merged into the old one.
    await other.handle([record(track(userId=old_user, anonymousId=anon, timestamp=at(4)))])
    moved_before = metrics.identity_conflicts.labels("moved")._value.get()
    await ours.handle([record(track(anonymousId=anon, timestamp=at(5), event="After Merge"))])
    # MOVED proves the shortcut: reading the young profile would have shown its parent.
    assert metrics.identity_conflicts.labels("moved")._value.get() == moved_before + 1
    merged = await profile_of(redis, f"user_id:{old_user}")
    assert merged["id"] != young and merged["eventCount"] == 5
    assert merged["recentEvents"][0]["event"] == "After Merge"
    # Now settled: the next event goes straight to the survivor, no MOVED.
    await ours.handle([record(track(anonymousId=anon, timestamp=at(6)))])
    await ours.handle([record(track(anonymousId=anon, timestamp=at(7)))])
    assert metrics.identity_conflicts.labels("moved")._value.get() == moved_before + 1
    assert (await profile_of(redis, f"anonymous_id:{anon}"))["eventCount"] == 7


async def test_window_buckets_in_lua_add_append_prune_and_take_late_events(redis):
    from agents.profiles.lua import FUNCTIONS

    script = FUNCTIONS + """
window_add(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return redis.call('HGET', KEYS[1], ARGV[1])
"""
    key = f"cdp:test:{{{unique('w')}}}"
    steps = [
        ((10, 3, 1), "10=1"),
        ((10, 3, 2), "10=3"),  # the newest bucket again
        ((11, 3, 1.5), "10=3;11=1.5"),  # a newer bucket
        ((13, 3, 1), "11=1.5;13=1"),  # newer still: bucket 10 falls out (keep 3)
        ((12, 3, 5), "11=1.5;12=5;13=1"),  # a late event in its place
        ((9, 3, 1), "11=1.5;12=5;13=1"),  # older than any window: dropped
        ((13, 3, -1), "11=1.5;12=5;13=0"),
    ]
    for (bucket, keep, amount), expected in steps:
        assert (await redis.eval(script, 1, key, "win:x", bucket, keep, amount)).decode() == expected
    await redis.delete(key)
