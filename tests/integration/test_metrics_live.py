"""The metrics the Grafana dashboard and the alert rules use, on a real worker and a
real collector: each one is on /metrics, and the traffic sent here moves the ones it
must move.

The worker is the session's real worker subprocess (``worker`` fixture); the
collector runs as `streamcdp collector` in a subprocess, as users run it. Traffic:
valid events (new profiles, a merge, a merge refused by merge protection, a fuzzy
match, a resend of a messageId), malformed records, and collector requests answered 200, 400 and
401. Every wait is bounded; nothing here measures speed.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from streams.deadletter import header_map
from streams.segment_definitions import publish
from streams.settings import Settings
from streams.topics import DEAD_LETTER, EVENTS_WEB, IDENTITY_MERGES, INBOUND, RESOLVED
from tests import monitoring_refs as refs
from tests.conftest import identify, track, unique
from tests.integration.conftest import CollectorProcess, http_get, produce

pytestmark = pytest.mark.asyncio(loop_scope="session")

STAGES = ("ingest", "identity", "profile", "segments", "output")


class Scrape:
    """One /metrics answer: which series exist, and their values summed over labels."""

    def __init__(self, text: str) -> None:
        self.series: set[str] = set()
        self.samples: list[tuple[str, dict, float]] = []
        for family in text_string_to_metric_families(text):
            if family.type == "counter":
                self.series.add(f"{family.name}_total")
            elif family.type == "histogram":
                self.series |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
            else:
                self.series.add(family.name)
            self.samples.extend((s.name, s.labels, s.value) for s in family.samples)

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, ls, v in self.samples if n == name and all(ls.get(k) == x for k, x in labels.items()))

    def labels(self, name: str) -> list[dict]:
        return [ls for n, ls, _ in self.samples if n == name]


def _now_iso() -> str:
    moment = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment * 1000) % 1000:03d}Z"


async def scrape(url: str) -> Scrape:
    status, body = await asyncio.to_thread(http_get, url + "/metrics")
    assert status == 200, f"{url}/metrics answered {status}"
    return Scrape(body.decode())


async def eventually(check: Callable[[], Awaitable[list[str]]], timeout_s: float, what: str) -> None:
    """Retry ``check`` (which returns what is still missing) until it returns nothing."""
    deadline = time.monotonic() + timeout_s
    missing: list[str] = []
    while time.monotonic() < deadline:
        missing = await check()
        if not missing:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: still not true after {timeout_s:.0f}s: {missing}")


def _letters(prefix: str) -> str:
    """A name no other test uses (letters only: names are normalised)."""
    return prefix.capitalize() + "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:10])


def _used(series: dict[str, str]) -> set[str]:
    """Series of this process that the dashboard or the alerts use."""
    return (refs.dashboard_metric_names() | refs.alert_metric_names()) & set(series)


# ------------------------------------------------------------------ worker


async def test_worker_exports_and_moves_every_metric_the_dashboard_and_alerts_use(worker, producer, topic_reader):
    used = _used(refs.worker_series())
    assert len(used) >= 15, f"the dashboard and alerts use only {sorted(used)} of the worker's metrics?"
    before = await scrape(worker.url)
    assert used <= before.series, f"missing on the worker's /metrics: {sorted(used - before.series)}"

    resolved = await topic_reader(RESOLVED)
    merges = await topic_reader(IDENTITY_MERGES)
    dead = await topic_reader(DEAD_LETTER)

    async def settled(*events: dict) -> None:
        ids = {e["messageId"] for e in events}
        found = await resolved.collect(lambda r: orjson.loads(r.value)["messageId"] in ids, len(ids), timeout_s=60)
        assert len(found) == len(ids), f"{len(found)} of {len(ids)} events reached {RESOLVED}"

    # Two profiles, then an event linking them: a merge.
    anon, email = unique("anon"), f"{unique('mx')}@example.com"
    first = track(anonymousId=anon)
    second = identify(userId=None, anonymousId=None, traits={"email": email})
    await produce(producer, EVENTS_WEB, [first, second])
    await settled(first, second)
    link = identify(userId=None, anonymousId=anon, traits={"email": email})
    await produce(producer, EVENTS_WEB, [link])

    # Two user ids sharing an email: merge protection refuses the link.
    shared = f"{unique('shared')}@example.com"
    user_a = identify(userId=unique("A"), traits={"email": shared})
    await produce(producer, EVENTS_WEB, [user_a])
    await settled(user_a, link)
    user_b = identify(userId=unique("B"), traits={"email": shared})
    await produce(producer, EVENTS_WEB, [user_b])

    # A known person, then an event with only a new anonymous id and the same name
    # and date of birth: fuzzy matching joins it to that person.
    given, surname = _letters("given"), _letters("sur")
    person = identify(userId=unique("F"), traits={"firstName": given, "lastName": surname, "birthday": "1980-05-17"})
    await produce(producer, EVENTS_WEB, [person])
    await settled(person)
    walk_in = identify(userId=None, anonymousId=unique("walkin"),
                       traits={"firstName": given, "lastName": surname, "birthday": "1980-05-17"})
    await produce(producer, EVENTS_WEB, [walk_in])

    # A segment only this test's probe enters, through a 2 s window: it enters, then
    # the window timer makes it exit. Publishing it back-fills the profiles made above.
    probe = unique("probe")
    segment_id = probe.lower()
    await publish(worker.settings, segment_id, {"id": segment_id, "version": 1, "rule": {"all": [
        {"trait": "probe", "eq": probe}, {"event": "Probe Seen", "within": "2s"}]}})
    await asyncio.sleep(1.0)  # the worker follows cdp.segment-definitions
    seen = track(event="Probe Seen", timestamp=_now_iso(), context={"traits": {"probe": probe}})
    await produce(producer, EVENTS_WEB, [seen])

    # A resend of an applied messageId (another record), and malformed records.
    resend = dict(first)
    key = unique("bad").encode()
    await produce(producer, EVENTS_WEB, [resend])
    await produce(producer, EVENTS_WEB, [b'{"type":"track"', b'{"type":"page","name":"Home"}'], key=key)

    await settled(user_b, walk_in)
    profile_of = {orjson.loads(r.value)["messageId"]: orjson.loads(r.value)["profileId"] for r in resolved.seen}
    assert profile_of[walk_in["messageId"]] == profile_of[person["messageId"]], "the walk-in was not matched"
    notes = await merges.collect(
        lambda r: orjson.loads(r.value).get("messageId") in (link["messageId"], user_b["messageId"]), 2, timeout_s=60
    )
    assert {orjson.loads(r.value)["type"] for r in notes} == {"cdp.profile.merged", "cdp.profile.merge_blocked"}
    letters = await dead.collect(lambda r: r.key == key, 2, timeout_s=60)
    assert {header_map(r.headers)["cdp.dlq.reason"] for r in letters} == {"invalid_json", "no_identifier"}

    # What this traffic must have moved (the worker counts before it acknowledges,
    # so the outputs seen above imply the counters; the resend has no output: wait).
    must_grow = [
        ("cdp_events_consumed_total", {"topic": EVENTS_WEB}, 10),
        ("cdp_events_processed_total", {}, 7),
        ("cdp_events_produced_total", {"topic": RESOLVED}, 7),
        ("cdp_events_produced_total", {"topic": IDENTITY_MERGES}, 2),
        ("cdp_events_produced_total", {"topic": DEAD_LETTER}, 2),
        ("cdp_dead_letters_total", {"reason": "invalid_json"}, 1),
        ("cdp_dead_letters_total", {"reason": "no_identifier"}, 1),
        ("cdp_events_duplicate_total", {"kind": "resend"}, 1),
        ("cdp_profiles_created_total", {}, 3),
        ("cdp_identity_merges_total", {}, 1),
        ("cdp_identity_merges_blocked_total", {"identifier_type": "user_id"}, 1),
        ("cdp_identity_fuzzy_matches_total", {}, 1),
        ("cdp_event_latency_seconds_count", {}, 10),
        ("cdp_batch_size_events_count", {}, 1),
        ("cdp_redis_call_duration_seconds_count", {}, 1),
        ("cdp_kafka_commit_seconds_count", {}, 1),  # offsets committed (every second) after the batches
        *(("cdp_stage_duration_seconds_count", {"stage": stage}, 1) for stage in STAGES),
        ("cdp_segment_transitions_total", {"kind": "entered"}, 1),
        ("cdp_segment_transitions_total", {"kind": "exited"}, 1),  # by the window timer
        ("cdp_segment_expiry_checks_total", {}, 1),
        ("cdp_segment_backfill_profiles_total", {"segment": segment_id}, 1),
    ]

    async def not_moved() -> list[str]:
        after = await scrape(worker.url)
        return [
            f"{name}{labels or ''} +{after.value(name, **labels) - before.value(name, **labels):g} (want +{delta})"
            for name, labels, delta in must_grow
            if after.value(name, **labels) - before.value(name, **labels) < delta
        ]

    try:
        await eventually(not_moved, 30, "the worker's counters to move")
    finally:
        await publish(worker.settings, segment_id, None)

    # Every metric family the dashboard shows that this traffic moves is among them.
    moved_families = {refs.worker_series()[name] for name, _, _ in must_grow}
    for series in used:
        family = refs.worker_series()[series]
        if family in ("cdp_identity_conflicts", "cdp_redis_errors", "cdp_kafka_produce_errors",
                      "cdp_consumer_lag_events", "cdp_worker_ready"):
            continue  # failure counters (no failure here) and gauges, checked below
        assert family in moved_families, f"{series} is on the dashboard but this test does not check that it moves"

    # Gauges: the worker is ready, and reports its lag per inbound partition it owns
    # (refreshed every 5 s).
    async def gauges_missing() -> list[str]:
        after = await scrape(worker.url)
        missing = []
        if after.value("cdp_worker_ready") != 1:
            missing.append("cdp_worker_ready == 1")
        lag = after.labels("cdp_consumer_lag_events")
        if not any(ls.get("topic") == EVENTS_WEB and ls.get("partition", "").isdigit() for ls in lag):
            missing.append(f"cdp_consumer_lag_events{{topic={EVENTS_WEB}}}")
        if any(ls.get("topic") not in INBOUND for ls in lag):
            missing.append("lag reported only for inbound topics")
        return missing

    await eventually(gauges_missing, 20, "the worker's gauges")
    after = await scrape(worker.url)
    assert all(after.value("cdp_consumer_lag_events", **ls) >= 0 for ls in after.labels("cdp_consumer_lag_events"))
    # Failure counters exist (at zero or more) even when nothing failed.
    assert {"cdp_redis_errors_total", "cdp_kafka_produce_errors_total", "cdp_identity_conflicts_total"} <= after.series


# ------------------------------------------------------------------ collector


@pytest_asyncio.fixture(loop_scope="session")
async def collector(infra: Settings):
    key = unique("wk_metrics")
    process = CollectorProcess("collector-metrics", infra.kafka_bootstrap, {"CDP_WRITE_KEYS": f"{key}=web"})
    process.start()
    try:
        await process.wait_for("/readyz")
        yield process, key
    finally:
        process.terminate()


async def test_collector_exports_and_moves_every_metric_the_dashboard_and_alerts_use(collector):
    process, key = collector
    used = _used(refs.collector_series())
    assert "cdp_collector_requests_total" in used and "cdp_collector_kafka_ready" in used
    before = await scrape(process.url)
    assert used <= before.series, f"missing on the collector's /metrics: {sorted(used - before.series)}"

    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"not-a-key:").decode()}
    event = {"userId": unique("u"), "event": "Metrics Checked", "properties": {}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for body, headers, expected in (
            (orjson.dumps(event), auth, 200),
            (orjson.dumps({"batch": [{**event, "type": "track"}, {**event, "type": "track"}]}), auth, 200),
            (b'{"userId": ', auth, 400),
            (orjson.dumps(event), wrong, 401),
        ):
            path = "/v1/batch" if body.startswith(b'{"batch"') else "/v1/track"
            async with http.post(process.url + path, data=body, headers=headers) as response:
                assert response.status == expected, await response.text()

    after = await scrape(process.url)
    must_grow = [
        ("cdp_collector_requests_total", {"code": "200"}, 2),
        ("cdp_collector_requests_total", {"code": "400"}, 1),
        ("cdp_collector_requests_total", {"code": "401"}, 1),
        ("cdp_collector_events_received_total", {"channel": "web"}, 3),
        ("cdp_collector_rejected_total", {"reason": "invalid_json"}, 1),
        ("cdp_collector_rejected_total", {"reason": "invalid_write_key"}, 1),
        ("cdp_collector_request_duration_seconds_count", {}, 4),
    ]
    for name, labels, delta in must_grow:
        grown = after.value(name, **labels) - before.value(name, **labels)
        assert grown >= delta, f"{name}{labels} grew by {grown:g}, expected at least {delta}"
    assert after.value("cdp_collector_kafka_ready") == 1
    assert any(ls.get("route") == "/v1/track" for ls in after.labels("cdp_collector_request_duration_seconds_bucket"))
    # No 5xx happened; the series the 5xx alert divides by exist with a code label.
    assert {ls["code"] for ls in after.labels("cdp_collector_requests_total")} >= {"200", "400", "401"}
