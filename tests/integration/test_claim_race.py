"""Two workers racing to create the same new person (real Redis): the one whose
claim of the identifier loses must not leave behind a profile of its own holding
the event without any identifier (invisible to access and delete requests, and
counted as one more person); the event lands on the winner's profile, once."""

from __future__ import annotations

import time

import orjson
import pytest

from agents.pipeline import Pipeline
from agents.profiles.store import lookup_profile, read_profile
from streams.output import AiokafkaProducer
from streams.records import Record
from streams.topics import EVENTS_APP, EVENTS_WEB
from tests.conftest import identify, track, unique

pytestmark = pytest.mark.asyncio(loop_scope="session")

_offsets = iter(range(60_000_000, 70_000_000))


def record(event: dict, topic: str = EVENTS_WEB) -> Record:
    return Record(topic, 0, next(_offsets), None, orjson.dumps(event), int(time.time() * 1000))


async def test_the_worker_losing_a_claim_leaves_no_profile_behind(infra, redis, producer, metrics):
    first = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    second = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    user, surname = unique("u"), unique("Racer")
    on_web = identify(userId=user, traits={"lastName": surname})
    on_app = track(userId=user, anonymousId=None, event="App Opened")

    # The first worker plans a new profile for the user; before it claims the
    # identifier, the second worker creates the person and claims it.
    resolve = first.resolver.resolve
    raced = []

    async def resolve_then_race(*args):
        plans = await resolve(*args)
        if not raced:
            raced.append(await second.handle([record(on_app, EVENTS_APP)]))
        return plans

    first.resolver.resolve = resolve_then_race
    result = await first.handle([record(on_web)])
    assert raced[0].processed == 1 and result.processed == 1
    person = await lookup_profile(redis, f"user_id:{user}", hash_key="", default_region="US")
    assert person["eventCount"] == 2 and person["traits"]["lastName"] == surname
    assert {e["messageId"] for e in person["recentEvents"]} == {on_web["messageId"], on_app["messageId"]}
    # No other live profile holds either event or the name.
    holders = []
    async for key in redis.scan_iter(match="cdp:p:*:meta", count=1000):
        profile_id = key.decode()[len("cdp:p:{"):-len("}:meta")]
        if profile_id == person["id"]:
            continue
        other = await read_profile(redis, profile_id)
        if other is not None and other["id"] == profile_id and (
            surname in orjson.dumps(other).decode() or on_web["messageId"] in orjson.dumps(other).decode()
        ):
            holders.append(profile_id)
    assert holders == []
    assert metrics.registry.get_sample_value("cdp_identity_conflicts_total", {"kind": "claim"}) >= 1
