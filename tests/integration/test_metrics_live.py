"""The metrics the Grafana dashboard and the alert rules use, on a real worker and a
real collector: each one is on /metrics, and the traffic sent here moves the ones it
must move.

The first worker test runs on the session's real worker subprocess (``worker``
fixture); the activation and privacy test starts a worker of its own, with the
privacy API's token and a Redis database of its own; the collector runs as
`streamcdp collector` in a subprocess, as users run it. Traffic: valid events (new
profiles, a merge, a merge refused by merge protection, a fuzzy match, a resend of a
messageId, a segment entered and left by its window), malformed records; segment
members with and without marketing consent for a segment feeding the ``email``
destination, a suppress request and the suppressed person's next events; collector
requests answered 200, 400 and 401. Every wait is bounded; nothing here measures
speed.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from streams.deadletter import header_map
from streams.segment_definitions import publish
from streams.settings import Settings
from streams.topics import DEAD_LETTER, EVENTS_WEB, IDENTITY_MERGES, INBOUND, PRIVACY_EVENTS, RESOLVED
from tests import monitoring_refs as refs
from tests.conftest import identify, track, unique
from tests.integration.conftest import (
    CollectorProcess,
    WorkerProcess,
    _redis_url_with_db,
    http_get,
    produce,
    start_group_at_end,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

STAGES = ("ingest", "identity", "profile", "segments", "output")
ACTIVATIONS_EMAIL = "cdp.activations.email"
#: The Redis database of this module's own worker (the other test modules use 9-15).
METRICS_DB = 8

#: Metric families the dashboard or the alerts use that the activation and privacy
#: test moves (the first worker test's traffic does not).
ACTIVATION_AND_PRIVACY = frozenset({
    "cdp_activations", "cdp_activations_consent_blocked", "cdp_events_suppressed", "cdp_privacy_requests",
    "cdp_profiles_deleted",
})
#: Gauges (checked for presence and sane values) and failure counters (no failure
#: is provoked here; they must exist at zero).
GAUGES = frozenset({
    "cdp_consumer_lag_events", "cdp_worker_ready", "cdp_segments_defined", "cdp_segment_expiry_backlog_profiles",
    "cdp_segment_expiry_delay_seconds", "cdp_segment_backfills_running",
})
FAILURE_COUNTERS = frozenset({"cdp_identity_conflicts", "cdp_redis_errors", "cdp_kafka_produce_errors"})


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


class _TokenWorker(WorkerProcess):
    """The worker with the privacy API's bearer token set."""

    def __init__(self, settings: Settings, name: str, token: str) -> None:
        super().__init__(settings, name)
        self.token = token

    def env(self) -> dict[str, str]:
        return {**super().env(), "CDP_ADMIN_TOKEN": self.token}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def metrics_worker(infra: Settings):
    """A worker of this module's own: the privacy API needs a token the session
    worker does not have, and a Redis database of its own keeps its state and its
    counters apart from any other worker reading the same topics (the session
    worker, or another test run's). Those other workers publish their own results
    for the events sent here too, so output checks below look for this worker's
    (its profile ids) or accept duplicates."""
    settings = dataclasses.replace(
        infra, redis_url=_redis_url_with_db(infra.redis_url, METRICS_DB), app_id=unique("streamcdp-metrics")
    )
    store = aioredis.from_url(settings.redis_url)
    try:
        await store.flushdb()
    finally:
        await store.aclose()
    await start_group_at_end(settings, settings.app_id)
    process = _TokenWorker(settings, "worker-metrics", token=unique("admin"))
    process.start()
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def probe_segments(infra: Settings):
    """Ids of the segments a test defines; deleted (tombstoned) when it ends, passed or not."""
    defined: list[str] = []
    yield defined
    for segment_id in defined:
        await publish(infra, segment_id, None)


def _post(url: str, body: dict, token: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, method="POST", data=orjson.dumps(body),
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, orjson.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


async def _profile(worker: WorkerProcess, identifier: str) -> tuple[int, dict]:
    status, body = await asyncio.to_thread(
        http_get, f"{worker.url}/v1/profiles?identifier={urllib.parse.quote(identifier)}"
    )
    return status, orjson.loads(body) if body else {}


def _promql_regex(expr: str, label: str, op: str = "=~") -> re.Pattern:
    """The regular expression a selector of ``expr`` matches ``label`` with (PromQL
    string escapes undone; Prometheus anchors label regexes at both ends)."""
    match = re.search(rf'\b{label}\s*{re.escape(op)}\s*"((?:[^"\\]|\\.)*)"', expr)
    assert match, f"no {label}{op}\"...\" in {expr}"
    return re.compile(re.sub(r"\\(.)", r"\1", match.group(1)))


async def _applied(worker: WorkerProcess, resolved, events: list[tuple[dict, str]], timeout_s: float = 60) -> dict[str, str]:
    """Wait until ``worker`` applied each (event, one of its identifiers): its profile
    API finds the identifier, and cdp.events.resolved carries the event with that
    profile id (another worker reading the topics publishes its own ids). Returns
    messageId → profile id."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, str] = {}
    pending = list(events)
    while pending and time.monotonic() < deadline:
        await resolved.collect(lambda r: False, 1, timeout_s=0.3)  # read what arrived
        published = {(body.get("messageId"), body.get("profileId")) for body in (orjson.loads(r.value) for r in resolved.seen)}
        still = []
        for event, identifier in pending:
            status, profile = await _profile(worker, identifier)
            if status == 200 and (event["messageId"], profile["id"]) in published:
                found[event["messageId"]] = profile["id"]
            else:
                still.append((event, identifier))
        pending = still
    assert not pending, f"not applied by the worker after {timeout_s:.0f}s: {[i for _, i in pending]}"
    return found


async def _collect_until(reader, predicate, value, wanted: set, timeout_s: float = 60) -> set:
    """Read records matching ``predicate`` until their ``value``s cover ``wanted``
    (duplicates from other workers allowed); returns the values seen."""
    deadline = time.monotonic() + timeout_s
    values: set = set()
    while not wanted <= values and time.monotonic() < deadline:
        found = await reader.collect(predicate, len(reader.seen) + 1, timeout_s=0.5)
        values = {value(r) for r in found}
    return values


async def test_worker_exports_and_moves_every_metric_the_dashboard_and_alerts_use(
    metrics_worker, producer, topic_reader, probe_segments
):
    worker = metrics_worker
    used = _used(refs.worker_series())
    assert len(used) >= 15, f"the dashboard and alerts use only {sorted(used)} of the worker's metrics?"
    before = await scrape(worker.url)
    assert used <= before.series, f"missing on the worker's /metrics: {sorted(used - before.series)}"

    resolved = await topic_reader(RESOLVED)
    merges = await topic_reader(IDENTITY_MERGES)
    dead = await topic_reader(DEAD_LETTER)

    # Two profiles, then an event linking them: a merge.
    anon, email = unique("anon"), f"{unique('mx')}@example.com"
    first = track(anonymousId=anon)
    second = identify(userId=None, anonymousId=None, traits={"email": email})
    await produce(producer, EVENTS_WEB, [first, second])
    await _applied(worker, resolved, [(first, f"anonymous_id:{anon}"), (second, f"email:{email}")])
    link = identify(userId=None, anonymousId=anon, traits={"email": email})
    await produce(producer, EVENTS_WEB, [link])

    # Two user ids sharing an email: merge protection refuses the link.
    shared = f"{unique('shared')}@example.com"
    user_a = identify(userId=unique("A"), traits={"email": shared})
    await produce(producer, EVENTS_WEB, [user_a])
    await _applied(worker, resolved, [(user_a, f"user_id:{user_a['userId']}"), (link, f"email:{email}")])
    user_b = identify(userId=unique("B"), traits={"email": shared})
    await produce(producer, EVENTS_WEB, [user_b])

    # A known person, then an event with only a new anonymous id and the same name
    # and date of birth: fuzzy matching joins it to that person.
    given, surname = _letters("given"), _letters("sur")
    person = identify(userId=unique("F"), traits={"firstName": given, "lastName": surname, "birthday": "1980-05-17"})
    await produce(producer, EVENTS_WEB, [person])
    await _applied(worker, resolved, [(person, f"user_id:{person['userId']}")])
    walk_in = identify(userId=None, anonymousId=unique("walkin"),
                       traits={"firstName": given, "lastName": surname, "birthday": "1980-05-17"})
    await produce(producer, EVENTS_WEB, [walk_in])

    # A segment only this test's probe enters, through a 2 s window: it enters, then
    # the window timer makes it exit. Publishing it back-fills the profiles made above
    # (which also says that the worker knows it).
    probe = unique("probe")
    segment_id = probe.lower()
    await publish(worker.settings, segment_id, {"id": segment_id, "version": 1, "rule": {"all": [
        {"trait": "probe", "eq": probe}, {"event": "Probe Seen", "within": "2s"}]}})
    probe_segments.append(segment_id)

    async def segment_known() -> list[str]:
        now = await scrape(worker.url)
        moved = now.value("cdp_segment_backfill_profiles_total", segment=segment_id) >= 1
        return [] if moved else [f"cdp_segment_backfill_profiles_total{{segment={segment_id}}}"]

    await eventually(segment_known, 30, "the worker to follow cdp.segment-definitions")
    seen = track(event="Probe Seen", timestamp=_now_iso(), context={"traits": {"probe": probe}})
    await produce(producer, EVENTS_WEB, [seen])

    # A resend of an applied messageId (another record), and malformed records.
    resend = dict(first)
    key = unique("bad").encode()
    await produce(producer, EVENTS_WEB, [resend])
    await produce(producer, EVENTS_WEB, [b'{"type":"track"', b'{"type":"page","name":"Home"}'], key=key)

    profile_of = await _applied(worker, resolved, [
        (user_b, f"user_id:{user_b['userId']}"), (walk_in, f"anonymous_id:{walk_in['anonymousId']}"),
        (person, f"user_id:{person['userId']}"),
    ])
    assert profile_of[walk_in["messageId"]] == profile_of[person["messageId"]], "the walk-in was not matched"
    merge_kinds = await _collect_until(
        merges, lambda r: orjson.loads(r.value).get("messageId") in (link["messageId"], user_b["messageId"]),
        lambda r: orjson.loads(r.value)["type"], {"cdp.profile.merged", "cdp.profile.merge_blocked"},
    )
    assert merge_kinds == {"cdp.profile.merged", "cdp.profile.merge_blocked"}
    reasons = await _collect_until(dead, lambda r: r.key == key, lambda r: header_map(r.headers)["cdp.dlq.reason"],
                                   {"invalid_json", "no_identifier"})
    assert reasons == {"invalid_json", "no_identifier"}

    # What this traffic must have moved on this worker (polled: the resend has no
    # output, and outputs seen above may be another worker's).
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
        ("cdp_segment_change_latency_seconds_count", {}, 1),  # the probe's entry, caused by an event
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

    await eventually(not_moved, 30, "the worker's counters to move")

    # Every metric family the dashboard or the alerts use is checked: moved by this
    # traffic, by the activation and privacy test's, or a gauge or failure counter.
    moved_families = {refs.worker_series()[name] for name, _, _ in must_grow}
    for series in used:
        family = refs.worker_series()[series]
        if family in ACTIVATION_AND_PRIVACY | GAUGES | FAILURE_COUNTERS:
            continue  # checked by the next test, or below
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


# ------------------------------------------------------------------ activation and privacy


async def test_worker_moves_the_activation_and_privacy_metrics(metrics_worker, producer, topic_reader, probe_segments):
    worker = metrics_worker
    used = _used(refs.worker_series())
    assert {refs.worker_series()[s] for s in used} >= ACTIVATION_AND_PRIVACY | GAUGES
    before = await scrape(worker.url)
    assert used <= before.series, f"missing on the worker's /metrics: {sorted(used - before.series)}"
    to_email = await topic_reader(ACTIVATIONS_EMAIL)

    def grown(after: Scrape, wanted: list[tuple[str, dict, float]]) -> list[str]:
        return [
            f"{name}{labels or ''} +{after.value(name, **labels) - before.value(name, **labels):g} (want +{delta})"
            for name, labels, delta in wanted
            if after.value(name, **labels) - before.value(name, **labels) < delta
        ]

    # A profile first, so that the back-fill of the segment below has one to
    # evaluate: that count moving says the worker knows the segment.
    seed = unique("seed")
    await produce(producer, EVENTS_WEB, [identify(userId=seed, traits={"plan": "free"})])

    async def seed_stored() -> list[str]:
        return [] if (await _profile(worker, f"user_id:{seed}"))[0] == 200 else [f"a profile for user_id:{seed}"]

    await eventually(seed_stored, 30, "the worker to store the seed profile")

    # A segment feeding the email destination (config/destinations.yaml: purpose
    # marketing, unknown consent denied) that only this test's people enter.
    probe = unique("probe")
    segment_id = probe.lower()
    await publish(worker.settings, segment_id, {"id": segment_id, "version": 1, "destinations": ["email"],
                                                "rule": {"trait": "probe", "eq": probe}})
    probe_segments.append(segment_id)

    async def segment_known() -> list[str]:
        return grown(await scrape(worker.url), [("cdp_segment_backfill_profiles_total", {"segment": segment_id}, 1)])

    await eventually(segment_known, 30, "the worker to follow cdp.segment-definitions")

    # Both enter; only the one who granted marketing is activated at email.
    consenting, refusing = unique("ua"), unique("ub")
    consenting_email, refusing_email = f"{consenting}@example.com", f"{refusing}@example.com"
    await produce(producer, EVENTS_WEB, [
        identify(userId=consenting, traits={"email": consenting_email, "probe": probe},
                 context={"consent": {"categoryPreferences": {"marketing": True}}}),
        identify(userId=refusing, traits={"email": refusing_email, "probe": probe}),
    ])
    entries = [
        ("cdp_segment_transitions_total", {"kind": "entered"}, 2),
        ("cdp_segment_change_latency_seconds_count", {}, 2),
        ("cdp_activations_total", {"destination": "email", "kind": "entered"}, 1),
        ("cdp_activations_consent_blocked_total", {"destination": "email"}, 1),
        ("cdp_events_produced_total", {"topic": ACTIVATIONS_EMAIL}, 1),
    ]

    async def not_entered() -> list[str]:
        return grown(await scrape(worker.url), entries)

    await eventually(not_entered, 30, "the entries and activations to be counted")
    # (Other segments, defined meanwhile by other tests, may hold them too.)
    status, member = await _profile(worker, f"email:{consenting_email}")
    assert status == 200 and segment_id in member["segments"], member
    assert f"{segment_id}>email" in member["activations"], member
    status, blocked = await _profile(worker, f"email:{refusing_email}")
    assert status == 200 and segment_id in blocked["segments"], blocked
    assert f"{segment_id}>email" not in blocked["activations"], blocked
    after = await scrape(worker.url)

    def for_segment(r) -> bool:
        return orjson.loads(r.value)["data"]["segmentId"] == segment_id

    def has_email(body: dict, address: str) -> bool:
        return {"type": "email", "value": address} in body["data"]["identifiers"]

    found = await to_email.collect(lambda r: for_segment(r) and r.key == member["id"].encode(), 1, timeout_s=30)
    assert found, f"no activation of {member['id']} on {ACTIVATIONS_EMAIL}"
    entered = orjson.loads(found[0].value)
    assert entered["type"] == "cdp.segment.entered" and has_email(entered, consenting_email)

    # The alert on activation delivery selects these topics by the label value
    # the worker counts produce results under, and names the destination from it.
    rules = {rule["alert"]: rule["expr"] for rule in refs.alert_rules()}
    activation_alert, generic_alert = rules["StreamcdpActivationDeliveryErrors"], rules["StreamcdpKafkaProduceErrors"]
    topics = {ls["topic"] for ls in after.labels("cdp_events_produced_total")}
    assert ACTIVATIONS_EMAIL in topics
    selected = {t for t in topics if _promql_regex(activation_alert, "topic").fullmatch(t)}
    assert ACTIVATIONS_EMAIL in selected and selected == {t for t in topics if t.startswith("cdp.activations.")}
    assert not _promql_regex(generic_alert, "topic", "!~").fullmatch(RESOLVED)
    assert _promql_regex(generic_alert, "topic", "!~").fullmatch(ACTIVATIONS_EMAIL)
    extract = re.search(r'"destination",\s*"\$1",\s*"topic",\s*"((?:[^"\\]|\\.)*)"', activation_alert)
    assert extract and re.fullmatch(re.sub(r"\\(.)", r"\1", extract.group(1)), ACTIVATIONS_EMAIL).group(1) == "email"

    # Suppress the activated member over the worker's privacy API: the profile is
    # deleted, email gets the exit, and the person's next events are dropped.
    url = f"{worker.url}/v1/privacy/requests"
    status, body = await asyncio.to_thread(_post, url, {"type": "suppress", "identifier": f"email:{consenting_email}"}, "wrong")
    assert status == 401, body
    status, body = await asyncio.to_thread(
        _post, url, {"type": "suppress", "identifier": f"email:{consenting_email}"}, worker.token)
    assert status == 200 and body["status"] == "completed" and body["profileId"] == member["id"], body
    assert body["suppressedIdentifiers"] == 2  # the email and the user id
    await produce(producer, EVENTS_WEB, [
        track(userId=consenting, anonymousId=None, event="Probe Seen"),
        identify(userId=None, anonymousId=None, traits={"email": consenting_email, "probe": probe}),
    ])
    privacy = [
        ("cdp_privacy_requests_total", {"kind": "suppress", "status": "completed"}, 1),
        ("cdp_profiles_deleted_total", {}, 1),
        ("cdp_events_suppressed_total", {}, 2),
        ("cdp_activations_total", {"destination": "email", "kind": "exited"}, 1),
        ("cdp_segment_transitions_total", {"kind": "exited"}, 1),
        ("cdp_events_produced_total", {"topic": PRIVACY_EVENTS}, 2),  # the deletion notice and the result
    ]

    async def not_suppressed() -> list[str]:
        return grown(await scrape(worker.url), privacy)

    await eventually(not_suppressed, 30, "the suppression and the dropped events to be counted")
    assert (await _profile(worker, f"email:{consenting_email}"))[0] == 404
    assert (await _profile(worker, f"user_id:{consenting}"))[0] == 404
    found = await to_email.collect(lambda r: for_segment(r) and r.key == member["id"].encode()
                                   and orjson.loads(r.value)["type"] == "cdp.segment.exited", 1, timeout_s=30)
    assert found, f"no exit of {member['id']} on {ACTIVATIONS_EMAIL}"
    exited = orjson.loads(found[0].value)
    assert exited["data"]["cause"] == "deleted" and has_email(exited, consenting_email)
    # The person without consent was never sent to email.
    assert not [r for r in to_email.seen if has_email(orjson.loads(r.value), refusing_email)]

    # The segment gauges: the back-fills started for the probe segment are done,
    # the worker counts its segments, and the timer's view is reported.
    async def gauges_settled() -> list[str]:
        now = await scrape(worker.url)
        missing = [] if now.value("cdp_segment_backfills_running") == 0 else ["cdp_segment_backfills_running == 0"]
        if now.value("cdp_segments_defined") < 1:
            missing.append("cdp_segments_defined >= 1")
        return missing

    await eventually(gauges_settled, 30, "the worker's segment gauges")
    final = await scrape(worker.url)
    assert final.value("cdp_segment_expiry_backlog_profiles") >= 0
    assert final.value("cdp_segment_expiry_delay_seconds") >= 0
    assert final.value("cdp_worker_ready") == 1

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
