"""Privacy requests against a real Redis and Kafka: access returns everything held,
delete leaves no trace of the person anywhere in Redis, is idempotent, exits the
memberships and tells downstream; a later event for the same email is a new person,
also on a worker that still had the deleted profile cached. Suppress deletes and
then drops every later event carrying one of the person's identifiers before
anything is stored (on a pipeline, on a real worker, and when the suppression lands
between an event's read and its claim); unsuppress lifts it."""

from __future__ import annotations

import time

import orjson
import pytest

from agents.identity.store import SUPPRESSED
from agents.pipeline import Pipeline
from agents.privacy import SUPPRESSION_LIST_KEY, PrivacyService, SuppressionEntry
from agents.profiles.computed import ComputedTraits
from agents.profiles.store import find_profile_id, lookup_profile
from agents.segments.registry import SegmentRegistry
from schemas.events import Identifier
from streams.keys import ProfileKeys, identifier_digest, identifier_key
from streams.output import AiokafkaProducer
from streams.records import Record
from streams.topics import EVENTS_POS, EVENTS_WEB, PRIVACY_EVENTS, RESOLVED, SEGMENT_CHANGES
from tests.conftest import identify, track, unique
from tests.integration.conftest import redis_texts

pytestmark = pytest.mark.asyncio(loop_scope="session")

_offsets = iter(range(60_000_000, 70_000_000))


def record(event: dict, topic: str = EVENTS_WEB) -> Record:
    return Record(topic, 0, next(_offsets), None, orjson.dumps(event), int(time.time() * 1000))


async def test_access_then_delete_leaves_no_trace(infra, redis, producer, metrics, topic_reader):
    registry = SegmentRegistry(ComputedTraits.load())
    registry.loaded.set()
    seg = unique("members").lower()
    registry.apply_record(seg.encode(), orjson.dumps({"id": seg, "version": 2, "rule": {"trait": "tier", "eq": "gold"}}))
    pipeline = Pipeline(infra, redis, AiokafkaProducer(producer), metrics, registry=registry)
    email = f"{unique('zoe')}@example.com"
    phone = "+1415555" + str(int(time.time() * 1000) % 10_000).rjust(4, "0")
    surname = unique("Quixotica")
    anon, card = unique("anon"), unique("LC")
    # A web visitor and a till customer, linked into one person by a later event.
    await pipeline.handle([record(track(anonymousId=anon, event="Product Viewed"))])
    await pipeline.handle([record(track(anonymousId=None, event="Order Completed",
                                        properties={"total": 40, "currency": "EUR"},
                                        context={"externalIds": [{"id": card, "type": "loyalty_id"}],
                                                 "traits": {"email": email}}), EVENTS_POS)])
    await pipeline.handle([record(identify(userId=None, anonymousId=anon,
                                           traits={"email": email, "phone": phone, "firstName": "Zoe",
                                                   "lastName": surname, "tier": "gold", "birthday": "1991-02-03"}))])
    privacy = PrivacyService(redis, AiokafkaProducer(producer), metrics, pipeline.model, hash_key="", default_region="US")

    access = await privacy.handle("access", f"email:{email.upper()}")
    assert access["status"] == "completed"
    held = access["profile"]
    assert {f"email:{email}", f"anonymous_id:{anon}", f"loyalty_id:{card}"} <= set(held["identifiers"])
    assert held["traits"]["lastName"] == surname and held["computedTraits"]["order_count"] == 1
    assert held["segments"] == [seg] and held["merges"] and held["recentEvents"]
    assert "Zoe" not in orjson.dumps({k: v for k, v in access.items() if k != "profile"}).decode()

    changes = await topic_reader(SEGMENT_CHANGES)
    notices = await topic_reader(PRIVACY_EVENTS)
    deleted = await privacy.handle("delete", f"phone:{phone}")
    assert deleted["status"] == "completed" and deleted["absorbedIds"]
    profile_id = deleted["profileId"]
    # Nothing of the person is left: not the email, phone, name, loyalty card or anonymous id.
    leftovers = [(k, v) for k, v in await redis_texts(redis)
                 if any(s.encode() in v for s in (email, phone, surname, card, anon))]
    assert leftovers == []
    [exit_event] = await changes.collect(lambda r: r.key == profile_id.encode(), 1)
    assert orjson.loads(exit_event.value)["type"] == "cdp.segment.exited"
    found = await notices.collect(lambda r: b"cdp.profile.deleted" in r.value and r.key == profile_id.encode(), 1)
    assert f"email:{email}" in orjson.loads(found[0].value)["identifiers"]
    # Idempotent: a second request finds nobody; access too.
    assert (await privacy.handle("delete", f"email:{email}"))["status"] == "not_found"
    assert (await privacy.handle("access", f"email:{email}"))["status"] == "not_found"

    # The same email again, on the worker that still has the old profile cached: a new person.
    again = await pipeline.handle([record(identify(userId=None, anonymousId=anon, traits={"email": email}))])
    assert again.processed == 1
    fresh = await privacy.handle("access", f"email:{email}")
    assert fresh["status"] == "completed" and fresh["profileId"] != profile_id
    assert fresh["profile"]["eventCount"] == 1 and "lastName" not in fresh["profile"]["traits"]


async def test_privacy_cli_and_http_api_need_their_token(worker, infra, producer):
    import asyncio
    import os
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from tests.integration.conftest import ROOT

    email = f"{unique('cli')}@example.com"
    await producer.send_and_wait(EVENTS_WEB, orjson.dumps(identify(traits={"email": email, "plan": "pro"})))
    env = dict(os.environ, CDP_REDIS_URL=infra.redis_url, CDP_KAFKA_BOOTSTRAP=infra.kafka_bootstrap)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "streamcdp.cli", "privacy", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    for _ in range(50):
        done = await asyncio.to_thread(cli, "access", f"email:{email}")
        if done.returncode == 0:
            break
        await asyncio.sleep(0.2)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["profile"]["traits"]["plan"] == "pro"
    gone = await asyncio.to_thread(cli, "delete", f"email:{email}")
    assert gone.returncode == 0 and orjson.loads(gone.stdout)["status"] == "completed"
    assert (await asyncio.to_thread(cli, "access", f"email:{email}")).returncode == 3
    assert (await asyncio.to_thread(cli, "access", "email:not-an-email")).returncode == 2

    # The session worker runs without CDP_ADMIN_TOKEN: the API refuses everyone.
    request = urllib.request.Request(f"{worker.url}/v1/privacy/requests", method="POST",
                                     data=orjson.dumps({"type": "access", "identifier": f"email:{email}"}),
                                     headers={"Authorization": "Bearer guess"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
    assert refused.value.code == 403


async def test_privacy_http_api_with_the_token(infra, producer, monkeypatch):
    import asyncio
    import dataclasses
    import urllib.error
    import urllib.request

    from tests.integration.conftest import WorkerProcess, start_group_at_end

    settings = dataclasses.replace(infra, app_id=unique("streamcdp-privacy"))
    monkeypatch.setenv("CDP_ADMIN_TOKEN", "s3cret-admin-token")
    await start_group_at_end(settings, settings.app_id)
    worker = WorkerProcess(settings, "worker-privacy")
    worker.start()
    try:
        await worker.wait_ready()
        email = f"{unique('http')}@example.com"
        await producer.send_and_wait(EVENTS_WEB, orjson.dumps(identify(traits={"email": email})))

        def post(body: dict, token: str) -> tuple[int, dict]:
            request = urllib.request.Request(f"{worker.url}/v1/privacy/requests", method="POST", data=orjson.dumps(body),
                                             headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return answer.status, orjson.loads(answer.read())
            except urllib.error.HTTPError as error:
                return error.code, orjson.loads(error.read())

        assert (await asyncio.to_thread(post, {"type": "access", "identifier": f"email:{email}"}, "wrong"))[0] == 401
        assert (await asyncio.to_thread(post, {"type": "erase"}, "s3cret-admin-token"))[0] == 400
        status, body = 0, {}
        for _ in range(50):
            status, body = await asyncio.to_thread(post, {"type": "access", "identifier": f"email:{email}"}, "s3cret-admin-token")
            if status == 200:
                break
            await asyncio.sleep(0.2)
        assert status == 200 and body["profile"]["identifiers"]
        status, body = await asyncio.to_thread(post, {"type": "delete", "identifier": f"email:{email}"}, "s3cret-admin-token")
        assert status == 200 and body["status"] == "completed"
        status, body = await asyncio.to_thread(post, {"type": "delete", "identifier": f"email:{email}"}, "s3cret-admin-token")
        assert status == 404 and body["status"] == "not_found"
        # Suppressing an identifier nobody holds (any more) still lists it; lifting it twice finds nothing the second time.
        status, body = await asyncio.to_thread(post, {"type": "suppress", "identifier": f"email:{email}"}, "s3cret-admin-token")
        assert status == 200 and (body["status"], body["profileId"], body["suppressedIdentifiers"]) == ("completed", None, 1)
        status, body = await asyncio.to_thread(post, {"type": "unsuppress", "identifier": f"email:{email}"}, "s3cret-admin-token")
        assert status == 200 and body["liftedIdentifiers"] == 1
        status, body = await asyncio.to_thread(post, {"type": "unsuppress", "identifier": f"email:{email}"}, "s3cret-admin-token")
        assert status == 404 and body["status"] == "not_found"
    finally:
        worker.stop()


# ------------------------------------------------------------------ suppression


def _phone() -> str:
    return "+1415555" + str(int(time.time() * 1000) % 10_000).rjust(4, "0")


def _letters(prefix: str) -> str:
    """A name no other test uses (letters only: names are normalised for matching)."""
    import uuid

    return prefix + "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:10])


def _resolved_ids(outputs) -> list[str]:
    return [orjson.loads(m.value)["messageId"] for m in outputs if m.topic == RESOLVED]


async def _profile_of(redis, identifier: str) -> dict | None:
    return await lookup_profile(redis, identifier, hash_key="", default_region="US")


async def test_suppress_deletes_and_drops_every_later_event_of_the_person(infra, redis, producer, metrics, topic_reader):
    pipeline = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    privacy = PrivacyService(redis, AiokafkaProducer(producer), metrics, pipeline.model, hash_key="", default_region="US")
    email, phone, anon = f"{unique('sup')}@example.com", _phone(), unique("anon")
    given, surname = _letters("Zelda"), _letters("Quarrington")
    home = {"firstName": given, "lastName": surname, "birthday": "1979-05-06",
            "address": {"street": "7 Orchard Lane", "postalCode": "94110", "city": "San Francisco"}}
    crm = unique("crm")
    await pipeline.handle([record(track(anonymousId=anon, event="Product Viewed"))])
    await pipeline.handle([record(identify(userId=None, anonymousId=anon, traits={"email": email, "phone": phone, **home}))])
    # A CRM record with none of the person's identifiers joins them by fuzzy matching.
    walk_in = identify(userId=None, context={"externalIds": [{"id": crm, "type": "crm_id"}]}, traits={**home, "firstName": given + "e"})
    await pipeline.handle([record(walk_in)])
    person = await _profile_of(redis, f"email:{email}")
    assert f"crm_id:{crm}" in person["identifiers"] and person["eventCount"] == 3
    profile_id = person["id"]

    notices = await topic_reader(PRIVACY_EVENTS)
    done = await privacy.handle("suppress", f"email:{email}")
    assert done["status"] == "completed" and done["profileId"] == profile_id and done["suppressed"] is True
    assert done["suppressedIdentifiers"] == 4 and done["alreadySuppressed"] is False  # email, phone, anon, crm id
    assert metrics.privacy_requests.labels("suppress", "completed")._value.get() == 1

    # (a) Nothing of the person is left in clear text: only keyed hashes are listed.
    secrets = (email, phone, anon, crm, given, surname)
    assert [(k, v) for k, v in await redis_texts(redis) if any(x.encode() in v for x in secrets)] == []
    listed = {}
    for kind, value in (("email", email), ("phone", phone), ("anonymous_id", anon), ("crm_id", crm)):
        identifier = Identifier(kind, value)
        assert await redis.get(identifier_key(identifier, "")) == SUPPRESSED.encode()
        entry = SuppressionEntry.decode(await redis.hget(SUPPRESSION_LIST_KEY, identifier_digest(identifier, "")))
        assert (entry.identifier_type, entry.request_id, entry.profile_id) == (kind, done["id"], profile_id)
        listed[kind] = entry
    # The deleted profile is named nowhere but in its tombstone and the list entries:
    # no identifier, no fuzzy-matching block points to it.
    naming = {k for k, v in await redis_texts(redis) if profile_id.encode() in v}
    assert naming == {ProfileKeys(profile_id).meta.encode(), SUPPRESSION_LIST_KEY.encode()}
    assert (await redis.hgetall(ProfileKeys(profile_id).meta)).keys() == {b"deleted", b"deleted_at"}
    found = await notices.collect(lambda r: r.key in (done["id"].encode(), profile_id.encode()), 2)
    by_type = {orjson.loads(r.value)["type"]: orjson.loads(r.value) for r in found}
    assert by_type["cdp.privacy.request.completed"]["status"] == "completed"
    assert by_type["cdp.profile.deleted"]["suppressed"] is True
    assert email not in orjson.dumps(by_type["cdp.privacy.request.completed"]).decode()

    # (b, c) Later events with the email, the phone, only the anonymous id, an alias
    # from the anonymous id, or the email beside brand-new identifiers: all dropped,
    # none stored or published; another person's event in the same batch goes through.
    new_user, new_anon, other = unique("u"), unique("anon"), unique("anon")
    dropped = [
        track(anonymousId=None, context={"traits": {"email": email.upper()}}),
        track(anonymousId=None, context={"traits": {"phone": phone}}),
        track(anonymousId=anon, event="Checkout Started"),
        {"type": "alias", "messageId": unique("m"), "timestamp": "2026-11-20T10:00:00Z", "userId": new_user, "previousId": anon},
        identify(userId=new_user, anonymousId=new_anon, traits={"email": email, "lastName": surname, "plan": "pro"}),
    ]
    passed = track(anonymousId=other)
    before = metrics.events_suppressed._value.get()
    result = await pipeline.handle([record(e) for e in dropped] + [record(passed)])
    assert (result.suppressed, result.processed, result.dead_lettered) == (len(dropped), 1, 0)
    assert metrics.events_suppressed._value.get() == before + len(dropped)
    assert metrics.events_processed._value.get() == 4  # the person's three events and the walk-in before, the other's now
    assert _resolved_ids(result.outputs) == [passed["messageId"]]
    for identifier in (f"user_id:{new_user}", f"anonymous_id:{new_anon}"):
        assert await find_profile_id(redis, Identifier(*identifier.split(":", 1)), "") is None, identifier
    assert (await _profile_of(redis, f"anonymous_id:{other}"))["eventCount"] == 1
    assert [(k, v) for k, v in await redis_texts(redis) if any(x.encode() in v for x in (*secrets, new_user, new_anon))] == []

    # Fuzzy matching finds no one for the person's name and address now: a new
    # walk-in (no listed identifier, so not suppressed) is someone new.
    crm2 = unique("crm")
    again = await pipeline.handle([record({**walk_in, "messageId": unique("m"),
                                           "context": {"externalIds": [{"id": crm2, "type": "crm_id"}]}})])
    assert again.processed == 1
    stranger = await _profile_of(redis, f"crm_id:{crm2}")
    assert stranger["id"] != profile_id and stranger["identifiers"] == [f"crm_id:{crm2}"] and stranger["eventCount"] == 1

    # (d) Idempotent: the same request again changes nothing and has its own record.
    twice = await privacy.handle("suppress", f"email:{email}")
    assert twice["status"] == "completed" and twice["profileId"] is None and twice["id"] != done["id"]
    assert twice["alreadySuppressed"] is True and twice["suppressedIdentifiers"] == 1
    for kind, value in (("email", email), ("phone", phone), ("anonymous_id", anon), ("crm_id", crm)):
        digest = identifier_digest(Identifier(kind, value), "")
        assert SuppressionEntry.decode(await redis.hget(SUPPRESSION_LIST_KEY, digest)) == listed[kind]
    [record_twice] = await notices.collect(lambda r: r.key == twice["id"].encode(), 1)
    assert orjson.loads(record_twice.value)["alreadySuppressed"] is True
    assert metrics.privacy_requests.labels("suppress", "completed")._value.get() == 2
    # Access and delete find nobody, say so, and leave the suppression in place.
    for kind in ("access", "delete"):
        answer = await privacy.handle(kind, f"phone:{phone}")
        assert (answer["status"], answer["suppressed"]) == ("not_found", True)
    assert await redis.get(identifier_key(Identifier("phone", phone), "")) == SUPPRESSED.encode()


async def test_suppressing_someone_unknown_blocks_their_first_events(infra, redis, producer, metrics):
    pipeline = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    privacy = PrivacyService(redis, AiokafkaProducer(producer), metrics, pipeline.model, hash_key="", default_region="US")
    email = f"{unique('never')}@example.com"
    done = await privacy.handle("suppress", f"email:{email}")
    assert (done["status"], done["profileId"], done["suppressedIdentifiers"]) == ("completed", None, 1)
    anon = unique("anon")
    result = await pipeline.handle([record(identify(userId=None, anonymousId=anon, traits={"email": email, "plan": "pro"}))])
    assert (result.suppressed, result.processed) == (1, 0) and result.outputs == []
    assert await find_profile_id(redis, Identifier("anonymous_id", anon), "") is None


async def test_unsuppress_lifts_every_identifier_of_the_suppression(infra, redis, producer, metrics):
    pipeline = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    privacy = PrivacyService(redis, AiokafkaProducer(producer), metrics, pipeline.model, hash_key="", default_region="US")
    email, anon = f"{unique('lift')}@example.com", unique("anon")
    await pipeline.handle([record(identify(userId=None, anonymousId=anon, traits={"email": email}))])
    assert (await privacy.handle("suppress", f"anonymous_id:{anon}"))["suppressedIdentifiers"] == 2
    assert (await pipeline.handle([record(track(anonymousId=None, context={"traits": {"email": email}}))])).suppressed == 1

    lifted = await privacy.handle("unsuppress", f"email:{email}")
    assert (lifted["status"], lifted["liftedIdentifiers"], lifted["suppressed"]) == ("completed", 2, False)
    for identifier in (Identifier("email", email), Identifier("anonymous_id", anon)):
        assert await redis.get(identifier_key(identifier, "")) is None
        assert not await redis.hexists(SUPPRESSION_LIST_KEY, identifier_digest(identifier, ""))
    # Their events are accepted again, as a new person (the old data stays deleted).
    result = await pipeline.handle([record(identify(userId=None, anonymousId=anon, traits={"email": email}))])
    assert (result.processed, result.suppressed) == (1, 0)
    assert (await _profile_of(redis, f"email:{email}"))["eventCount"] == 1
    # Not on the list any more: nothing to lift, and the new profile is left alone.
    assert (await privacy.handle("unsuppress", f"email:{email}"))["status"] == "not_found"
    assert (await _profile_of(redis, f"email:{email}"))["eventCount"] == 1
    assert metrics.privacy_requests.labels("unsuppress", "not_found")._value.get() == 1


async def test_a_suppression_cut_short_is_finished_by_running_it_again(infra, redis, producer, metrics):
    pipeline = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    privacy = PrivacyService(redis, AiokafkaProducer(producer), metrics, pipeline.model, hash_key="", default_region="US")
    email, anon, surname = f"{unique('cut')}@example.com", unique("anon"), _letters("Halfway")
    await pipeline.handle([record(identify(userId=None, anonymousId=anon, traits={"email": email, "lastName": surname}))])
    profile_id = (await _profile_of(redis, f"email:{email}"))["id"]
    # What a suppression does first, and where one stopped by a crash would leave it:
    # the identifiers listed, the profile not deleted yet.
    entry = SuppressionEntry("email", int(time.time() * 1000), "privacy-cut-short", profile_id)
    await privacy._mark([Identifier("email", email), Identifier("anonymous_id", anon)], entry)
    held = await privacy.handle("access", f"email:{email}")
    assert (held["status"], held["suppressed"], held["profileId"]) == ("completed", True, profile_id)
    assert held["profile"]["traits"]["lastName"] == surname
    again = await privacy.handle("suppress", f"anonymous_id:{anon}")
    assert (again["status"], again["profileId"], again["alreadySuppressed"]) == ("completed", profile_id, True)
    assert [(k, v) for k, v in await redis_texts(redis) if any(x.encode() in v for x in (email, anon, surname))] == []
    assert SuppressionEntry.decode(
        await redis.hget(SUPPRESSION_LIST_KEY, identifier_digest(Identifier("email", email), ""))) == entry


def _suppress_during_resolution(pipeline: Pipeline, privacy: PrivacyService, identifier: str) -> None:
    """Make a suppression land between the first identity read of the next batch
    and its claims: a real request against the real Redis, at a fixed point."""
    resolve = pipeline.resolver.resolve
    calls = []

    async def resolve_then_suppress(*args):
        plans = await resolve(*args)
        if not calls:
            calls.append((await privacy.handle("suppress", identifier))["status"])
        return plans

    pipeline.resolver.resolve = resolve_then_suppress


async def test_a_suppression_between_read_and_claim_leaves_nothing_of_a_new_person(infra, redis, producer, metrics):
    pipeline = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    privacy = PrivacyService(redis, AiokafkaProducer(producer), metrics, pipeline.model, hash_key="", default_region="US")
    email, anon, surname = f"{unique('race')}@example.com", unique("anon"), _letters("Raceworth")
    _suppress_during_resolution(pipeline, privacy, f"email:{email}")
    visit = track(anonymousId=anon)
    signup = identify(userId=None, anonymousId=anon, traits={"email": email, "lastName": surname})
    # Both are planned onto one new profile, claiming the anonymous id and the email;
    # the email's claim meets the marker: that profile is wiped, the visit is applied
    # again on a profile of its own and the sign-up is dropped.
    result = await pipeline.handle([record(visit), record(signup)])
    assert (result.processed, result.suppressed) == (1, 1)
    assert _resolved_ids(result.outputs) == [visit["messageId"]]
    visitor = await _profile_of(redis, f"anonymous_id:{anon}")
    assert visitor["identifiers"] == [f"anonymous_id:{anon}"] and visitor["eventCount"] == 1
    assert "lastName" not in visitor["traits"]
    assert [(k, v) for k, v in await redis_texts(redis) if email.encode() in v or surname.encode() in v] == []
    assert await redis.get(identifier_key(Identifier("email", email), "")) == SUPPRESSED.encode()


async def test_a_suppression_between_read_and_claim_on_a_known_person(infra, redis, producer, metrics):
    """The documented limit (docs/privacy.md): an event already applied to an
    existing profile when its new identifier turns out suppressed stays applied
    there; the identifier is not attached to that profile and nothing is published."""
    pipeline = Pipeline(infra, redis, AiokafkaProducer(producer), metrics)
    privacy = PrivacyService(redis, AiokafkaProducer(producer), metrics, pipeline.model, hash_key="", default_region="US")
    email, anon = f"{unique('race')}@example.com", unique("anon")
    await pipeline.handle([record(track(anonymousId=anon))])
    _suppress_during_resolution(pipeline, privacy, f"email:{email}")
    result = await pipeline.handle([record(identify(userId=None, anonymousId=anon, traits={"email": email}))])
    assert (result.processed, result.suppressed) == (0, 1) and result.outputs == []
    visitor = await _profile_of(redis, f"anonymous_id:{anon}")
    assert visitor["identifiers"] == [f"anonymous_id:{anon}"]
    assert visitor["eventCount"] == 2  # the limit: the event's changes stay on the profile it joined
    assert await redis.get(identifier_key(Identifier("email", email), "")) == SUPPRESSED.encode()


async def test_a_worker_drops_suppressed_events_commits_them_and_moves_on(worker, infra, producer, redis):
    import asyncio
    import os
    import subprocess
    import sys

    from aiokafka import TopicPartition
    from prometheus_client.parser import text_string_to_metric_families

    from tests.integration.conftest import ROOT, http_get
    from tests.integration.transport_support import committed_offsets

    email, phone, anon = f"{unique('wrk')}@example.com", _phone(), unique("anon")
    key = unique("k").encode()  # one partition: the worker handles these in order
    await producer.send_and_wait(EVENTS_WEB, orjson.dumps(identify(userId=None, anonymousId=anon, traits={"email": email, "phone": phone})), key=key)
    for _ in range(150):
        if await find_profile_id(redis, Identifier("email", email), ""):
            break
        await asyncio.sleep(0.2)
    env = dict(os.environ, CDP_REDIS_URL=infra.redis_url, CDP_KAFKA_BOOTSTRAP=infra.kafka_bootstrap)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "streamcdp.cli", "privacy", "suppress", f"email:{email}"],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = orjson.loads(done.stdout)
    assert answer["status"] == "completed" and answer["suppressedIdentifiers"] == 3 and answer["profileId"]

    async def suppressed_total() -> float:
        status, body = await asyncio.to_thread(http_get, worker.url + "/metrics")
        assert status == 200
        return sum(s.value for f in text_string_to_metric_families(body.decode()) if f.name == "cdp_events_suppressed"
                   for s in f.samples if s.name == "cdp_events_suppressed_total")

    before = await suppressed_total()
    dropped = [track(anonymousId=None, context={"traits": {"email": email}}),
               track(anonymousId=None, context={"traits": {"phone": phone}}),
               track(anonymousId=anon)]
    sent = [await producer.send_and_wait(EVENTS_WEB, orjson.dumps(e), key=key) for e in dropped]
    other = unique("anon")
    await producer.send_and_wait(EVENTS_WEB, orjson.dumps(track(anonymousId=other)), key=key)
    for _ in range(150):  # the next person's event, behind the dropped ones on the partition
        if await find_profile_id(redis, Identifier("anonymous_id", other), ""):
            break
        await asyncio.sleep(0.2)
    assert await find_profile_id(redis, Identifier("anonymous_id", other), ""), worker.tail()
    assert await suppressed_total() == before + len(dropped)
    assert await find_profile_id(redis, Identifier("anonymous_id", anon), "") == SUPPRESSED
    assert await _profile_of(redis, f"anonymous_id:{anon}") is None
    # Dropped by policy, not failed: their offsets are committed with the rest.
    tp = TopicPartition(EVENTS_WEB, sent[-1].partition)
    committed = None
    for _ in range(150):
        committed = (await committed_offsets(infra, infra.app_id, [tp]))[tp]
        if committed is not None and committed > sent[-1].offset:
            break
        await asyncio.sleep(0.2)
    assert committed is not None and committed > sent[-1].offset
