"""The identity graph on real Kafka and Redis: merges and their publication, alias,
merge protection, a crash between the steps of a merge, and two workers racing to
stitch the same people on different partitions."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import orjson
import pytest
import redis.asyncio as aioredis

from agents.identity.graph import plan_batch
from agents.identity.rules import IdentityRules
from agents.pipeline import Pipeline
from agents.profiles.store import find_profile_id, lookup_profile, read_profile, root_of
from schemas.events import Identifier
from streams.keys import ProfileKeys, new_profile_id
from streams.output import AiokafkaProducer
from streams.records import Record
from streams.topics import EVENTS_APP, EVENTS_POS, EVENTS_WEB, IDENTITY_MERGES, RESOLVED
from tests.conftest import identify, track, unique
from tests.integration.conftest import WorkerProcess, _redis_url_with_db, http_get, produce, start_group_at_end

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _settled(reader, message_ids: set[str]) -> None:
    await reader.collect(lambda r: orjson.loads(r.value)["messageId"] in message_ids, len(message_ids), timeout_s=60)


async def _get(worker, path: str) -> tuple[int, dict]:
    status, body = await asyncio.to_thread(http_get, worker.url + path)
    return status, orjson.loads(body) if body else {}


async def test_linking_two_profiles_merges_them_and_publishes_the_merge(worker, producer, topic_reader):
    resolved = await topic_reader(RESOLVED)
    merges = await topic_reader(IDENTITY_MERGES)
    anon, email = unique("anon"), f"{unique('bea')}@example.com"
    first = track(anonymousId=anon, event="Product Viewed", timestamp="2026-11-20T09:00:00Z")
    second = identify(userId=None, anonymousId=None, traits={"email": email, "plan": "gold"}, timestamp="2026-11-20T10:00:00Z")
    await produce(producer, EVENTS_WEB, [first])
    await _settled(resolved, {first["messageId"]})
    await produce(producer, EVENTS_POS, [second])
    await _settled(resolved, {second["messageId"]})
    _, older = await _get(worker, f"/v1/profiles?identifier=anonymous_id:{anon}")
    _, newer = await _get(worker, f"/v1/profiles?identifier=email:{email}")
    assert older["id"] != newer["id"] and older["id"] < newer["id"]

    link = identify(userId=None, anonymousId=anon, traits={"email": email, "name": "Bea"}, timestamp="2026-11-20T11:00:00Z")
    await produce(producer, EVENTS_WEB, [link])
    [record] = await merges.collect(lambda r: orjson.loads(r.value).get("absorbedId") == newer["id"], 1)
    merge = orjson.loads(record.value)
    assert merge["type"] == "cdp.profile.merged" and merge["survivorId"] == older["id"]
    assert merge["messageId"] == link["messageId"] and merge["identifier"] in (f"anonymous_id:{anon}", f"email:{email}")
    assert merge["id"].startswith("merge-") and merge["time"].endswith("Z")

    await _settled(resolved, {link["messageId"]})
    for identifier in (f"anonymous_id:{anon}", f"email:{email}"):
        status, profile = await _get(worker, f"/v1/profiles?identifier={identifier}")
        assert status == 200 and profile["id"] == older["id"]
    status, via_absorbed = await _get(worker, f"/v1/profiles/{newer['id']}")
    assert status == 200 and via_absorbed["id"] == older["id"], "the absorbed id leads to the survivor"
    survivor = via_absorbed
    assert {f"anonymous_id:{anon}", f"email:{email}"} <= set(survivor["identifiers"])
    assert survivor["eventCount"] == 3
    assert survivor["traits"]["plan"] == "gold" and survivor["traits"]["name"] == "Bea"
    assert survivor["firstSeen"] == "2026-11-20T09:00:00.000Z" and survivor["lastSeen"] == "2026-11-20T11:00:00.000Z"
    assert [m["absorbedId"] for m in survivor["merges"]] == [newer["id"]]
    assert survivor["identifierOrigins"][f"email:{email}"]["messageId"] == second["messageId"]


async def test_alias_links_previous_id_to_user_id(worker, producer, topic_reader):
    resolved = await topic_reader(RESOLVED)
    anon, user = unique("anon"), unique("user")
    browse = track(anonymousId=anon)
    alias = {"type": "alias", "messageId": unique("m"), "previousId": anon, "userId": user}
    await produce(producer, EVENTS_WEB, [browse])
    await _settled(resolved, {browse["messageId"]})
    await produce(producer, EVENTS_WEB, [alias])
    await _settled(resolved, {alias["messageId"]})
    _, by_anon = await _get(worker, f"/v1/profiles?identifier=anonymous_id:{anon}")
    _, by_user = await _get(worker, f"/v1/profiles?identifier=user_id:{user}")
    assert by_anon["id"] == by_user["id"]
    assert f"user_id:{user}" in by_anon["identifiers"]


async def test_merge_protection_keeps_two_user_ids_apart(worker, producer, topic_reader):
    resolved = await topic_reader(RESOLVED)
    merges = await topic_reader(IDENTITY_MERGES)
    email = f"{unique('cy')}@example.com"
    user_a, user_b = unique("A"), unique("B")
    await produce(producer, EVENTS_WEB, [a := identify(userId=user_a, traits={"email": email})])
    await _settled(resolved, {a["messageId"]})
    await produce(producer, EVENTS_APP, [b := identify(userId=user_b, traits={"email": email})])
    [note] = await merges.collect(lambda r: orjson.loads(r.value).get("messageId") == b["messageId"], 1)
    note = orjson.loads(note.value)
    assert note["type"] == "cdp.profile.merge_blocked" and note["limitedTypes"] == ["user_id"]
    assert note["identifier"] == f"email:{email}"

    await _settled(resolved, {b["messageId"]})
    _, pa = await _get(worker, f"/v1/profiles?identifier=user_id:{user_a}")
    _, pb = await _get(worker, f"/v1/profiles?identifier=user_id:{user_b}")
    _, pe = await _get(worker, f"/v1/profiles?identifier=email:{email}")
    assert pa["id"] != pb["id"], "two user_ids must not merge"
    assert pe["id"] == pa["id"], "the email stays with its first owner"
    assert f"email:{email}" not in pb["identifiers"]
    status, text = await asyncio.to_thread(http_get, worker.url + "/metrics")
    assert b'cdp_identity_merges_blocked_total{identifier_type="user_id"}' in text


def _record(event: dict, offset: int, topic: str = EVENTS_WEB) -> Record:
    return Record(topic, 0, offset, None, orjson.dumps(event), int(time.time() * 1000))


async def test_a_crash_between_merge_steps_is_finished_by_the_replay(infra, producer, metrics, topic_reader):
    """Run only the first step of a merge (the parent pointer), as if the worker died
    right after it; then replay the batch with a fresh pipeline."""
    settings = dataclasses.replace(infra, redis_url=_redis_url_with_db(infra.redis_url, 11))
    store = aioredis.from_url(settings.redis_url)
    await store.flushdb()
    merges = await topic_reader(IDENTITY_MERGES)
    pipeline = Pipeline(settings, store, AiokafkaProducer(producer), metrics)
    anon, email = unique("anon"), f"{unique('dee')}@example.com"
    await pipeline.handle([_record(track(anonymousId=anon), 1), _record(track(anonymousId=None, context={"traits": {"email": email}}), 2)])
    await pipeline.handle([_record(identify(userId=None, anonymousId=None, traits={"email": email, "vip": True}), 3)])
    by_anon = await find_profile_id(store, Identifier("anonymous_id", anon), "")
    by_email = await find_profile_id(store, Identifier("email", email), "")
    assert by_anon != by_email
    # Created in the same batch (same millisecond): the id's digest part decides.
    old, new = sorted([by_anon, by_email])

    link = _record(identify(userId=None, anonymousId=anon, traits={"email": email}), 4)
    # The dead worker's first step: plan and set the parent, nothing more.
    crashed = Pipeline(settings, store, AiokafkaProducer(producer), metrics)
    from agents.ingest.core import split_batch

    [item], _ = split_batch([link], default_region="US")
    view, _ = await crashed.identity.read_view([item.event])
    [plan] = plan_batch([item.event], view, crashed.rules, lambda i: new_profile_id(i, "", 0))
    assert await crashed.identity.set_parents(plan.merges, int(time.time() * 1000)) == []
    assert await root_of(store, new) == old
    assert await store.hget(ProfileKeys(new).meta, "fold_pending") == b"1"

    # Restart: the batch is replayed.
    result = await Pipeline(settings, store, AiokafkaProducer(producer), metrics).handle([link])
    assert result.processed == 1
    profile = await read_profile(store, new)
    assert profile["id"] == old
    assert profile["eventCount"] == 4, "2 + 1 events folded once, plus the link"
    assert profile["traits"]["vip"] is True
    assert {f"anonymous_id:{anon}", f"email:{email}"} <= set(profile["identifiers"])
    assert await store.hget(ProfileKeys(new).meta, "fold_pending") is None
    assert not any([await store.exists(k) for k in ProfileKeys(new).state()]), "no orphaned state"
    [note] = await merges.collect(lambda r: orjson.loads(r.value).get("absorbedId") == new, 1)
    assert orjson.loads(note.value)["survivorId"] == old

    # A replay of the whole thing again changes nothing.
    again = await Pipeline(settings, store, AiokafkaProducer(producer), metrics).handle([link])
    assert again.redelivered == 1
    assert (await read_profile(store, old))["eventCount"] == 4
    await store.aclose()


RACE_DB = 12
PEOPLE = 60


async def test_two_workers_racing_on_many_partitions_converge(infra, producer):
    """Each person first appears as three separate profiles (web: anonymous id; app:
    user id + device; till: loyalty card). Then three events that each carry the same
    new email, one per profile, arrive at the same moment on different partitions,
    handled by two workers of one group; one worker is SIGKILLed and restarted in the
    middle. Every person must end as one profile holding every identifier and every
    event exactly once, after exactly two merges, with no orphaned state."""
    settings = dataclasses.replace(
        infra, redis_url=_redis_url_with_db(infra.redis_url, RACE_DB), app_id=unique("streamcdp-race"), batch_max=20
    )
    store = aioredis.from_url(settings.redis_url)
    await store.flushdb()
    await start_group_at_end(settings, settings.app_id)
    workers = [WorkerProcess(settings, f"worker-race-{n}") for n in range(2)]
    for w in workers:
        w.start()
    rng = random.Random(11)
    people = [
        {"anon": unique("ra"), "email": f"{unique('re')}@example.com", "user": unique("ru"),
         "device": unique("rd"), "loyalty": unique("rl")}
        for _ in range(PEOPLE)
    ]

    def loyalty(p):
        return [{"id": p["loyalty"], "type": "loyalty_id"}]

    async def send_spread(events):
        for topic, event in events:
            await producer.send(topic, orjson.dumps(event), partition=rng.randrange(infra.topic_partitions))

    async def person_states(with_email: bool) -> list:
        states = []
        for p in people:
            ids = [f"anonymous_id:{p['anon']}", f"user_id:{p['user']}", f"device_id:{p['device']}", f"loyalty_id:{p['loyalty']}"]
            if with_email:
                ids.append(f"email:{p['email']}")
            states.append((ids, [await lookup_profile(store, i, hash_key="", default_region="US") for i in ids]))
        return states

    async def wait_until(done, with_email: bool, timeout_s: float) -> list:
        """Poll (bounded) until ``done(profiles)`` holds for every person. Each
        person's profiles are read one identifier at a time, so during a merge a
        person can look split or over-counted for a moment: decide per person."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = await person_states(with_email)
            if all(done(profiles) for _, profiles in states) or time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.5)

    try:
        for w in workers:
            await w.wait_ready()
        first = []
        for p in people:
            first += [
                (EVENTS_WEB, track(anonymousId=p["anon"], userId=None)),
                (EVENTS_APP, track(anonymousId=None, userId=p["user"], context={"device": {"id": p["device"]}})),
                (EVENTS_POS, track(anonymousId=None, userId=None, context={"externalIds": loyalty(p)})),
            ]
        await send_spread(first)
        await producer.flush()
        states = await wait_until(lambda prs: all(pr is not None and pr["eventCount"] >= 1 for pr in prs), False, 90)
        for ids, profiles in states:
            assert len({p["id"] for p in profiles}) == 3, f"{ids}: three profiles per person first"

        links = []
        for p in people:
            links += [
                (EVENTS_WEB, identify(anonymousId=p["anon"], userId=None, traits={"email": p["email"]})),
                (EVENTS_APP, track(anonymousId=None, userId=p["user"], context={"traits": {"email": p["email"]}})),
                (EVENTS_POS, track(anonymousId=None, userId=None, context={"traits": {"email": p["email"]}, "externalIds": loyalty(p)})),
            ]
        rng.shuffle(links)
        half = len(links) // 2
        await send_spread(links[:half])
        await producer.flush()
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        workers[0].kill()
        workers[0].start()
        await send_spread(links[half:])
        await producer.flush()
        await workers[0].wait_ready()

        states = await wait_until(
            lambda prs: all(prs) and len({p["id"] for p in prs}) == 1 and prs[0]["eventCount"] >= 6, True, 150
        )
        for ids, profiles in states:
            assert all(p is not None for p in profiles), f"an identifier of {ids} has no profile"
            assert len({p["id"] for p in profiles}) == 1, f"{ids} did not converge: {[p['id'] for p in profiles]}"
            assert profiles[0]["eventCount"] == 6, f"{ids}: {profiles[0]['eventCount']} events"
            assert set(ids) <= set(profiles[0]["identifiers"])
            assert len(profiles[0]["merges"]) == 2, f"{ids}: merges {profiles[0]['merges']}"

        roots = {profiles[0]["id"] for _, profiles in states}
        absorbed = {m["absorbedId"] for _, profiles in states for m in profiles[0]["merges"]}
        assert (len(roots), len(absorbed)) == (PEOPLE, 2 * PEOPLE), "three profiles per person, two merged away"
        # No orphans anywhere in the database: every absorbed profile is folded and
        # emptied, every root holds identifiers.
        async for key in store.scan_iter(match="cdp:p:*:meta", count=500):
            meta = {k.decode(): v.decode() for k, v in (await store.hgetall(key)).items()}
            profile_id = key.decode().split("{", 1)[1].split("}", 1)[0]
            if "merged_into" in meta:
                assert "fold_pending" not in meta, f"{profile_id}: fold never finished"
                assert not any([await store.exists(k) for k in ProfileKeys(profile_id).state()]), f"{profile_id}: state left behind"
            else:
                assert profile_id not in absorbed
                assert await store.hlen(ProfileKeys(profile_id).ids) > 0, f"{profile_id}: a root without identifiers"
    finally:
        for w in workers:
            w.stop()
        await store.aclose()


async def test_fuzzy_matching_links_a_walk_in_without_shared_identifiers(infra, producer, metrics):
    """A CRM record with no identifier in common (a typo in the name, the phone
    written nationally) joins the known customer; a family member sharing the phone
    and address does not."""
    settings = dataclasses.replace(infra, redis_url=_redis_url_with_db(infra.redis_url, 11))
    store = aioredis.from_url(settings.redis_url)
    await store.flushdb()
    # Households share phone numbers: here the phone is a weak identifier.
    rules = IdentityRules.parse({**IdentityRules.load().to_document(), "identifiers": {
        **IdentityRules.load().to_document()["identifiers"], "phone": {"priority": 4, "limit": 5, "strong": False}}})
    pipeline = Pipeline(settings, store, AiokafkaProducer(producer), metrics, rules=rules)
    known = identify(userId=unique("u"), traits={
        "firstName": "Katharina", "lastName": "Schmidt", "birthday": "1984-03-07", "phone": "+14155550123",
        "address": {"street": "12 Elm Street", "postalCode": "94110", "city": "San Francisco"}})
    await pipeline.handle([_record(known, 1)])
    walk_in = identify(userId=None, context={"externalIds": [{"id": unique("crm"), "type": "crm_id"}]}, traits={
        "first_name": "Katharine", "last_name": "Schmidt", "dob": "1984-03-07", "phone": "(415) 555-0123",
        "street": "12 Elm St", "zip": "94110"})
    sister = identify(userId=None, context={"externalIds": [{"id": unique("crm"), "type": "crm_id"}]}, traits={
        "first_name": "Greta", "last_name": "Schmidt", "dob": "1990-11-21", "phone": "(415) 555-0123",
        "street": "12 Elm Street", "zip": "94110"})
    await pipeline.handle([_record(walk_in, 2), _record(sister, 3)])

    customer = await lookup_profile(store, f"user_id:{known['userId']}", hash_key="", default_region="US")
    crm_walk_in = walk_in["context"]["externalIds"][0]["id"]
    crm_sister = sister["context"]["externalIds"][0]["id"]
    assert f"crm_id:{crm_walk_in}" in customer["identifiers"], "the walk-in joins the known customer"
    assert f"crm_id:{crm_sister}" not in customer["identifiers"], "a family member sharing phone and address stays apart"
    assert customer["eventCount"] == 2
    assert metrics.identity_fuzzy_matches._value.get() == 1
    sisters = await lookup_profile(store, f"crm_id:{crm_sister}", hash_key="", default_region="US")
    assert "phone:+14155550123" not in sisters["identifiers"], "a weak identifier stays with its first owner"
    await store.aclose()
