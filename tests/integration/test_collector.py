"""The collector end to end: `streamcdp collector` in a subprocess on real Kafka, fed
by the real Segment and RudderStack Python SDKs from PyPI and by raw HTTP; events
land on the write key's topic and reach a profile through a real worker.

Also: authentication, limits, malformed bodies, gzip (and a gzip bomb), health and
metrics, 503 when Kafka does not answer, a clean SIGTERM that finishes the request
in flight, refusing to start without write keys, and no key in the logs.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import pytest_asyncio

from streams.settings import Settings
from streams.topics import EVENTS_APP, EVENTS_POS, EVENTS_WEB
from tests.conftest import unique
from tests.integration.conftest import ROOT, CollectorProcess, free_port, http_get

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Fresh keys per run: the no-key-in-logs check looks for these exact strings.
KEYS = {channel: unique(f"wk_{channel}") for channel in ("web", "app", "pos", "server")}


def _keys_env(tmp_dir: Path) -> dict[str, str]:
    """Three keys in CDP_WRITE_KEYS, the app key in a YAML file with a source name."""
    keys_file = tmp_dir / "collector-keys.yaml"
    keys_file.write_text(f'"{KEYS["app"]}": {{source: test-ios-app, channel: app}}\n')
    return {
        "CDP_WRITE_KEYS": f"{KEYS['web']}=web,{KEYS['pos']}=pos,{KEYS['server']}=server",
        "CDP_WRITE_KEYS_FILE": str(keys_file),
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def collector(infra: Settings, tmp_path_factory):
    process = CollectorProcess("collector", infra.kafka_bootstrap, _keys_env(tmp_path_factory.mktemp("keys")))
    process.start()
    try:
        await process.wait_for("/readyz")
        yield process
    finally:
        process.terminate()


@pytest_asyncio.fixture(loop_scope="session")
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def _basic(key: str) -> str:
    """The Authorization header both SDKs send: Basic base64("KEY:")."""
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


async def _post(http, url: str, body, *, key: str | None = None, headers: dict | None = None):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {**({"Authorization": _basic(key)} if key else {}), **(headers or {})}
    async with http.post(url, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def _by_key(key: str):
    wanted = key.encode()
    return lambda record: record.key == wanted


async def _profile(worker, identifier: str, *, min_events: int, timeout_s: float = 60.0) -> dict:
    """The worker's profile for ``identifier`` once it has ``min_events`` events."""
    deadline = time.monotonic() + timeout_s
    body = b""
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(http_get, f"{worker.url}/v1/profiles?identifier={identifier}")
        if status == 200 and orjson.loads(body)["eventCount"] >= min_events:
            return orjson.loads(body)
        await asyncio.sleep(0.25)
    pytest.fail(f"no profile with {min_events} events for {identifier} after {timeout_s}s (last: {body[:300]!r})")


# --------------------------------------------------------------- the SDKs

CALL_TYPES = ["alias", "group", "identify", "page", "screen", "track"]


def _every_call(sdk, user_id: str, email: str) -> None:
    """The six calls, through an SDK module (same signatures in both SDKs)."""
    sdk.identify(user_id=user_id, traits={"email": email, "name": "Ann"})
    sdk.track(user_id=user_id, event="Order Completed", properties={"order_id": "o1", "total": 129.5})
    sdk.page(user_id=user_id, category="Docs", name="Home", properties={"url": "https://example.com/"})
    sdk.screen(user_id=user_id, category="App", name="Basket")
    sdk.group(user_id=user_id, group_id="g-1", traits={"name": "ACME"})
    sdk.alias(previous_id=f"{user_id}-before", user_id=user_id)


def _segment_send(url: str, key: str, user_id: str, email: str) -> list:
    """segment-analytics-python as its README configures it, in its default
    (background, batching) mode, flushed."""
    from segment import analytics

    errors: list = []
    analytics.write_key = key
    analytics.host = url
    analytics.sync_mode = False
    analytics.on_error = lambda error, batch: errors.append(error)
    analytics.default_client = None
    try:
        _every_call(analytics, user_id, email)
        analytics.flush()
    finally:
        analytics.shutdown()
        analytics.default_client = None
    return errors


def _rudderstack_send(url: str, key: str, user_id: str, email: str) -> None:
    """rudder-sdk-python as its README configures it (gzip on by default), one
    request per call (sync mode raises on any error)."""
    import rudderstack.analytics as ra

    assert ra.gzip is True
    ra.write_key = key
    ra.dataPlaneUrl = url
    ra.sync_mode = True
    ra.default_client = None
    try:
        _every_call(ra, user_id, email)
    finally:
        ra.default_client = None


async def test_segment_sdk_events_reach_the_web_topic_and_a_profile(collector, worker, topic_reader):
    topic = await topic_reader(EVENTS_WEB)
    user_id, email = unique("u-seg"), f"{unique('ann')}@example.com"

    errors = await asyncio.to_thread(_segment_send, collector.url, KEYS["web"], user_id, email)

    assert errors == []
    records = await topic.collect(_by_key(f"user_id:{user_id}"), 6)
    messages = [orjson.loads(r.value) for r in records]
    assert sorted(m["type"] for m in messages) == CALL_TYPES
    for record, message in zip(records, messages):
        assert "writeKey" not in message  # the Segment SDK puts it in every body
        assert message["receivedAt"].endswith("Z") and message["messageId"]
        assert message["context"]["library"]["name"] == "analytics-python"
        assert dict(record.headers)["cdp-source"] == b"web"
    identify = next(m for m in messages if m["type"] == "identify")
    assert identify["traits"]["email"] == email

    profile = await _profile(worker, f"user_id:{user_id}", min_events=6)
    assert f"email:{email}" in profile["identifiers"]


async def test_rudderstack_sdk_gzip_events_reach_the_app_topic_and_a_profile(collector, worker, topic_reader):
    topic = await topic_reader(EVENTS_APP)
    user_id, email = unique("u-rs"), f"{unique('bob')}@example.com"

    await asyncio.to_thread(_rudderstack_send, collector.url, KEYS["app"], user_id, email)

    records = await topic.collect(_by_key(f"user_id:{user_id}"), 6)
    messages = [orjson.loads(r.value) for r in records]
    assert sorted(m["type"] for m in messages) == CALL_TYPES
    assert all(m["channel"] == "server" and m["integrations"] == {"All": True} for m in messages)
    assert {dict(r.headers)["cdp-source"] for r in records} == {b"test-ios-app"}  # named in the YAML file
    identify = next(m for m in messages if m["type"] == "identify")
    assert identify["context"]["traits"]["email"] == email  # RudderStack puts traits only here

    # the traits in context reach the profile: it is found by the email too
    profile = await _profile(worker, f"email:{email}", min_events=6)
    assert f"user_id:{user_id}" in profile["identifiers"]


@pytest.mark.parametrize("sdk", ["segment", "rudderstack"])
async def test_a_wrong_key_through_the_sdk_is_a_401_it_understands(collector, sdk):
    if sdk == "segment":
        from segment.analytics.client import Client
        from segment.analytics.request import APIError
    else:
        from rudderstack.analytics.client import Client
        from rudderstack.analytics.request import APIError
    client = Client(write_key="not-a-key", host=collector.url, sync_mode=True)
    with pytest.raises(APIError) as caught:
        await asyncio.to_thread(client.track, user_id="u-1", event="x")
    assert caught.value.status == 401
    assert caught.value.code == "invalid_write_key"  # read from our JSON error


# --------------------------------------------------------- raw HTTP, auth


async def test_a_wrong_key_is_401(collector, http):
    status, body = await _post(http, f"{collector.url}/v1/track", {"event": "x", "userId": "u"}, key="nope")
    assert status == 401
    assert body == {"success": False, "code": "invalid_write_key", "message": "the write key is not valid"}


async def test_no_key_is_401(collector, http):
    status, body = await _post(http, f"{collector.url}/v1/track", {"event": "x", "userId": "u"})
    assert status == 401 and body["code"] == "missing_write_key"


async def test_a_bearer_token_is_401(collector, http):
    status, body = await _post(
        http, f"{collector.url}/v1/batch", {"batch": []}, headers={"Authorization": "Bearer abc"}
    )
    assert status == 401 and body["code"] == "unsupported_authorization"


async def test_analytics_js_short_path_with_the_key_in_a_text_plain_body(collector, http, topic_reader):
    topic = await topic_reader(EVENTS_POS)
    anonymous_id = unique("a-js")
    message = {"type": "track", "event": "Till Opened", "anonymousId": anonymous_id, "writeKey": KEYS["pos"],
               "sentAt": "2026-11-23T10:00:00.000Z", "context": {"library": {"name": "analytics.js"}}}
    async with http.post(
        f"{collector.url}/v1/t", data=orjson.dumps(message), headers={"Content-Type": "text/plain;charset=UTF-8"}
    ) as response:
        assert response.status == 200
        assert await response.json(content_type=None) == {"success": True}

    (record,) = await topic.collect(_by_key(f"anonymous_id:{anonymous_id}"), 1)
    stored = orjson.loads(record.value)
    assert stored["event"] == "Till Opened" and "writeKey" not in stored


async def test_every_route_and_its_short_and_unprefixed_forms(collector, http, topic_reader):
    topic = await topic_reader(EVENTS_WEB)
    paths = {
        "track": ["/v1/track", "/track", "/v1/t", "/t"],
        "identify": ["/v1/identify", "/identify", "/v1/i", "/i"],
        "page": ["/v1/page", "/page", "/v1/p", "/p"],
        "screen": ["/v1/screen", "/screen", "/v1/s", "/s"],
        "group": ["/v1/group", "/group", "/v1/g", "/g"],
        "alias": ["/v1/alias", "/alias", "/v1/a", "/a"],
    }
    user_id = unique("u-routes")
    sent = []
    for kind, routes in paths.items():
        for path in routes:
            message_id = unique("m")
            sent.append((message_id, kind))
            status, _ = await _post(http, collector.url + path, {"userId": user_id, "messageId": message_id,
                                                                  "event": "x"}, key=KEYS["web"])
            assert status == 200, path
    for path in ("/v1/batch", "/batch", "/v1/b", "/b"):
        message_id = unique("m")
        sent.append((message_id, "track"))
        body = {"batch": [{"type": "track", "userId": user_id, "messageId": message_id, "event": "x"}]}
        assert (await _post(http, collector.url + path, body, key=KEYS["web"]))[0] == 200, path

    records = await topic.collect(_by_key(f"user_id:{user_id}"), len(sent))
    assert sorted((m["messageId"], m["type"]) for m in map(orjson.loads, (r.value for r in records))) == sorted(sent)


async def test_a_server_key_goes_to_the_web_topic_marked_server(collector, http, topic_reader):
    topic = await topic_reader(EVENTS_WEB)
    user_id = unique("u-srv")
    status, _ = await _post(http, f"{collector.url}/v1/identify", {"userId": user_id}, key=KEYS["server"])
    assert status == 200
    (record,) = await topic.collect(_by_key(f"user_id:{user_id}"), 1)
    assert orjson.loads(record.value)["context"] == {"channel": "server"}


# ----------------------------------------------------- raw HTTP, bad input


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"batch": [', b"", b"\xff\xfe", b'{"batch":[{"type":"track","n":NaN}]}'],
    ids=["garbage", "truncated", "empty", "not utf-8", "NaN"],
)
async def test_malformed_json_is_400(collector, http, body):
    status, answer = await _post(http, f"{collector.url}/v1/batch", body, key=KEYS["web"])
    assert status == 400 and answer["code"] == "invalid_json" and answer["success"] is False


async def test_a_batch_item_that_is_not_an_event_is_400_with_its_index(collector, http):
    body = {"batch": [{"type": "track", "event": "x", "userId": "u"}, {"type": "purchase", "userId": "u"}]}
    status, answer = await _post(http, f"{collector.url}/v1/batch", body, key=KEYS["web"])
    assert status == 400 and answer["code"] == "unknown_type" and answer["index"] == 1
    status, answer = await _post(http, f"{collector.url}/v1/batch", {"batch": [[]]}, key=KEYS["web"])
    assert status == 400 and answer["code"] == "invalid_message" and answer["index"] == 0


async def test_a_33_kb_message_is_400(collector, http):
    message = {"userId": "u-big", "event": "big", "properties": {"blob": "x" * (33 * 1024)}}
    status, answer = await _post(http, f"{collector.url}/v1/track", message, key=KEYS["web"])
    assert status == 400 and answer["code"] == "message_too_large"
    assert "32768 bytes (32 KB)" in answer["message"]


async def test_a_501_kb_batch_is_400(collector, http):
    item = {"type": "track", "userId": "u-big", "event": "big", "properties": {"blob": "x" * 10_000}}
    body = orjson.dumps({"batch": [item] * 52})
    assert 501 * 1000 < len(body) < 600 * 1000 and len(body) > 501 * 1024
    status, answer = await _post(http, f"{collector.url}/v1/batch", body, key=KEYS["web"])
    assert status == 400 and answer["code"] == "body_too_large"
    assert "500000 bytes" in answer["message"]


async def test_a_gzip_body_is_accepted(collector, http, topic_reader):
    topic = await topic_reader(EVENTS_WEB)
    user_id = unique("u-gz")
    body = gzip.compress(orjson.dumps({"batch": [{"type": "track", "event": "Zipped", "userId": user_id}]}))
    status, answer = await _post(
        http, f"{collector.url}/v1/batch", body, key=KEYS["web"], headers={"Content-Encoding": "gzip"}
    )
    assert (status, answer) == (200, {"success": True})
    (record,) = await topic.collect(_by_key(f"user_id:{user_id}"), 1)
    assert orjson.loads(record.value)["event"] == "Zipped"


async def test_a_gzip_bomb_is_400_and_the_collector_carries_on(collector, http):
    bomb = gzip.compress(b"[" + b" " * (200 * 1024 * 1024))  # 200 MB inflated, ~200 KB sent
    status, answer = await _post(
        http, f"{collector.url}/v1/batch", bomb, key=KEYS["web"], headers={"Content-Encoding": "gzip"}
    )
    assert status == 400 and answer["code"] == "body_too_large"
    assert (await asyncio.to_thread(http_get, collector.url + "/healthz"))[0] == 200


async def test_health_readiness_metrics_and_cors(collector, http):
    assert (await asyncio.to_thread(http_get, collector.url + "/healthz"))[0] == 200
    status, body = await asyncio.to_thread(http_get, collector.url + "/readyz")
    assert status == 200 and orjson.loads(body) == {"status": "ready"}

    async with http.options(
        f"{collector.url}/v1/batch",
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    ) as preflight:
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]

    status, body = await asyncio.to_thread(http_get, collector.url + "/metrics")
    text = body.decode()
    assert status == 200
    assert 'cdp_collector_requests_total{code="200",route="/v1/batch"}' in text
    assert 'cdp_collector_events_received_total{channel="web"}' in text
    assert 'cdp_collector_rejected_total{reason="invalid_json"}' in text
    assert "cdp_collector_request_duration_seconds_bucket" in text
    assert "cdp_collector_kafka_ready 1.0" in text


async def test_no_write_key_is_ever_logged(collector):
    text = collector.log_text()
    assert "collector listening" in text
    for key in KEYS.values():
        assert key not in text


# ------------------------------------------------------------- lifecycle


async def test_kafka_unavailable_is_503_and_not_ready(infra, http, tmp_path):
    dead_kafka = f"127.0.0.1:{free_port()}"  # nothing listens there
    process = CollectorProcess("collector-no-kafka", dead_kafka, _keys_env(tmp_path))
    process.start()
    try:
        await process.wait_for("/healthz", timeout_s=30)
        started = time.monotonic()
        body = {"batch": [{"type": "track", "event": "x", "userId": unique("u")}]}
        status, answer = await _post(http, f"{process.url}/v1/batch", body, key=KEYS["web"])
        assert time.monotonic() - started < 12  # at most the produce timeout, never the SDK's 15 s
        assert status == 503 and answer["code"] == "kafka_unavailable"
        status, ready = await asyncio.to_thread(http_get, process.url + "/readyz")
        assert status == 503 and "Kafka" in orjson.loads(ready)["reason"]
    finally:
        assert process.terminate(timeout_s=40) == 0


async def test_sigterm_finishes_the_request_in_flight_then_exits_0(infra, topic_reader, tmp_path):
    topic = await topic_reader(EVENTS_WEB)
    process = CollectorProcess("collector-sigterm", infra.kafka_bootstrap, _keys_env(tmp_path))
    process.start()
    await process.wait_for("/readyz")
    user_id = unique("u-term")
    body = orjson.dumps({"batch": [{"type": "track", "event": f"e{i}", "userId": user_id} for i in range(20)]})
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {_basic(KEYS['web'])}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()

    def request_across_sigterm() -> bytes:
        with socket.create_connection(("127.0.0.1", process.port), timeout=30) as sock:
            sock.sendall(head + body[:100])
            time.sleep(1.0)  # headers parsed, handler waiting for the body (generous: the machine may be loaded)
            os.killpg(process.process.pid, signal.SIGTERM)  # the request is half sent
            time.sleep(0.5)
            sock.sendall(body[100:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    answer = await asyncio.to_thread(request_across_sigterm)
    assert answer.startswith(b"HTTP/1.1 200"), (answer[:300], process.tail())
    assert answer.endswith(b'{"success":true}')
    code = process.process.wait(timeout=40)  # already stopping: no second signal
    assert code == 0, f"exit code {code}; log:\n{process.tail()}"
    assert len(await topic.collect(_by_key(f"user_id:{user_id}"), 20)) == 20
    assert "stopping" in process.log_text()


async def test_without_write_keys_it_refuses_to_start(infra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_WRITE_KEYS", "CDP_COLLECTOR"))}
    env["CDP_COLLECTOR_PORT"] = str(free_port())
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "streamcdp.cli", "collector"],
        cwd=ROOT, env=env, capture_output=True, timeout=60,
    )
    assert result.returncode == 2
    assert b"no write keys configured" in result.stderr and b"CDP_COLLECTOR_ALLOW_ANONYMOUS" in result.stderr


async def test_anonymous_mode_accepts_requests_without_a_key(infra, http, topic_reader):
    topic = await topic_reader(EVENTS_WEB)
    process = CollectorProcess("collector-anonymous", infra.kafka_bootstrap, {"CDP_COLLECTOR_ALLOW_ANONYMOUS": "true"})
    process.start()
    try:
        await process.wait_for("/readyz")
        user_id = unique("u-anon")
        status, _ = await _post(http, f"{process.url}/v1/track", {"event": "x", "userId": user_id})
        assert status == 200
        (record,) = await topic.collect(_by_key(f"user_id:{user_id}"), 1)
        assert dict(record.headers)["cdp-source"] == b"anonymous"
    finally:
        assert process.terminate() == 0
