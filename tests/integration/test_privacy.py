"""Privacy requests against a real Redis and Kafka: access returns everything held,
delete leaves no trace of the person anywhere in Redis, is idempotent, exits the
memberships and tells downstream; a later event for the same email is a new person,
also on a worker that still had the deleted profile cached."""

from __future__ import annotations

import time

import orjson
import pytest

from agents.pipeline import Pipeline
from agents.privacy import PrivacyService
from agents.profiles.computed import ComputedTraits
from agents.segments.registry import SegmentRegistry
from streams.output import AiokafkaProducer
from streams.records import Record
from streams.topics import EVENTS_POS, EVENTS_WEB, PRIVACY_EVENTS, SEGMENT_CHANGES
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
    finally:
        worker.stop()
