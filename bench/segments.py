"""``python -m bench.segments``: the segment benchmark of issue 12.

The real worker (``python -m streamcdp.cli worker``, batch transport, its own process,
consumer group and Redis database) on generated traffic (``streamcdp.generate``),
once with no segment of ours and once with ``--segments`` (100) segments applied,
beside its baselines measured in the same run on the same input:

a. raw aiokafka passthrough (``bench.pipeline.raw_passthrough``);
b. a bare faust agent that only consumes, faust's own transport
   (``bench.pipeline.faust_consume_only``);
w0. the worker, no segment of this benchmark on ``cdp.segment-definitions``;
w100. the worker with the segments applied: generated from the shapes of
   ``config/segments/*.yaml`` (high spenders, cart abandoners, lapsed customers,
   category buyers without a product, open support ticket, prospects, upsell
   candidates) plus engaged browsers and trait/computed-trait segments, with varied
   thresholds, windows, event names and categories; each validated with
   ``parse_segment`` and published with ``streams.segment_definitions.publish``.

Throughput: ``--events`` events produced to ``cdp.events.*`` once the worker is up
(definitions loaded, back-fills done), clocked by polling its /metrics from the
first poll after the last send to the last event done (processed + dead-lettered).
Latency: fresh events offered at ``--rate`` for ``--latency-seconds``; from the
input record's timestamp (set by the producer) to the event's first segment change
on ``cdp.segment-changes`` (``data.causeEventId``) and to its record on
``cdp.events.resolved`` (``messageId``), as read by a consumer here.

Cleans up on exit, Ctrl-C and SIGTERM included: the segments are deleted
(tombstones), the worker stopped, the bench topics and consumer groups deleted and
the Redis database flushed. Exits 0 when the measurements completed (a missed target
is not a failure), 1 when one failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from agents.profiles.computed import ComputedTraits
from agents.segments.backfill import DONE_KEY
from agents.segments.rules import parse_segment
from bench.common import (
    Child,
    active_groups,
    assign_at_end,
    commit_group_at_end,
    consumer,
    create_topics,
    delete_groups,
    delete_topics,
    load_average,
    machine_facts,
    partitions_of,
    percentiles,
    sample_sum,
)
from bench.pipeline import (
    Options,
    Row,
    Run,
    _batch_note,
    _faust_env,
    _histogram_percentiles,
    _scrape,
    _with_db,
    faust_consume_only,
    raw_passthrough,
    raw_passthrough_latency,
)
from streamcdp.generate import DEFAULT_GAP_MS, generate_events, send_events
from streams import segment_definitions
from streams.keys import PROFILE_SEGMENTS_KEY
from streams.redis_client import connect
from streams.settings import Settings
from streams.topics import INBOUND, PRODUCER_MAX_REQUEST_BYTES, RESOLVED, SEGMENT_CHANGES, ensure_topics

# Segment ids of this benchmark: bench-seg-<unix seconds>-<run>-<nnn>. The time lets
# a later run delete what a killed run left behind (older than STALE_AFTER_S).
ID_PREFIX = "bench-seg-"
STALE_AFTER_S = 900
PUBLISH_CONCURRENCY = 10
READY_TIMEOUT_S = 60.0
TARGET_P99_MS = 100.0
TARGET_VS_FAUST = 0.8


@dataclass
class SegmentOptions:
    events: int = 20_000
    rate: float = 1000.0
    latency_seconds: float = 12.0
    segments: int = 100
    partitions: int = 8
    seed: int = 0
    redis_db: int = 14
    quiet_wait_s: float = 15.0
    passthrough_latency: bool = True


@dataclass
class WorkerRow:
    shape: str
    segments_known: int | None = None
    events_per_s: float | None = None
    changes_per_event: float | None = None
    latency_change_ms: list[float] | None = None
    latency_resolved_ms: list[float] | None = None
    error: str | None = None


@dataclass
class SegmentReport:
    facts: list[tuple[str, str]] = field(default_factory=list)
    a: Row = field(default_factory=lambda: Row("(a) raw aiokafka passthrough: getmany(500) + send each + gather, commit per batch"))
    b: Row = field(default_factory=lambda: Row("(b) bare faust agent, consume only, faust's own transport: take_events(500, within=0.01)"))
    workers: dict[str, WorkerRow] = field(default_factory=dict)
    segment_names: dict[str, str] = field(default_factory=dict)  # id -> name, for the notes
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.a.error or self.b.error or any(w.error for w in self.workers.values()))


# ---------------------------------------------------------------- the segments


_CURRENCIES = ("USD", "EUR", "GBP")
_CATEGORIES = ("baby", "toys", "electronics", "home", "fashion", "sports", "beauty", "grocery")
# (category bought, product name part not bought), from streamcdp.generate's catalogue.
_WITHOUT = (
    ("baby", "Stroller"), ("baby", "Monitor"), ("toys", "Train"), ("toys", "Blocks"), ("electronics", "Earbuds"),
    ("electronics", "Speaker"), ("home", "Pan"), ("home", "Duvet"), ("fashion", "Jacket"), ("fashion", "Sweater"),
    ("sports", "Yoga"), ("beauty", "Serum"), ("grocery", "Espresso"), ("baby", "Nappy"), ("electronics", "Charger"),
)
_COUNTRIES = (("US",), ("GB",), ("DE",), ("FR",), ("DE", "FR"))
_NO_TICKET = {"not": {"event": "Support Ticket Opened", "within": "3d"}}
_OPEN_TICKET = {"event": "Support Ticket Opened", "count": {"gt": {"event": "Support Ticket Closed"}}}


def _high_spenders() -> list[tuple[str, dict, list]]:
    # config/segments/high-spenders.yaml: the computed total per currency over a threshold.
    return [
        (f"high spenders {cur} {t}+", {"trait": f"computed.total_spend.{cur}", "gte": t}, ["email", "firstName", "computed.total_spend"])
        for cur in _CURRENCIES for t in (100, 250, 500, 1000, 2500)
    ]


def _cart_abandoners() -> list[tuple[str, dict, list]]:
    # cart-abandoners.yaml: added to the cart within a window, no order in it.
    out = []
    for window in ("15m", "1h", "6h", "1d", "3d"):
        for category in (None, "baby", "electronics"):
            added: dict = {"event": "Product Added", "within": window}
            if category:
                added["where"] = {"properties.category": category}
            rule = {"all": [added, {"not": {"event": "Order Completed", "within": window}}]}
            out.append((f"cart abandoners {window}" + (f" {category}" if category else ""), rule, ["email", "firstName"]))
    return out


def _lapsed() -> list[tuple[str, dict, list]]:
    # lapsed-customers.yaml: ordered (at least n times) ever, not within a window.
    out = []
    for n, windows in ((1, ("1h", "1d", "7d", "14d", "30d", "60d", "90d")), (2, ("7d", "30d", "90d"))):
        for window in windows:
            ever: dict = {"event": "Order Completed"}
            if n > 1:
                ever["count"] = {"gte": n}
            rule = {"all": [ever, {"not": {"event": "Order Completed", "within": window}}]}
            out.append((f"lapsed {window} ({n}+ orders)", rule, ["email", "firstName", "computed.last_order"]))
    return out


def _buyers_without() -> list[tuple[str, dict, list]]:
    # baby-buyers-without-stroller.yaml: bought in a category, never a given product.
    return [
        (
            f"{category} buyers without {name}",
            {"all": [
                {"event": "Order Completed", "where": {"properties.products.category": category}},
                {"not": {"event": "Order Completed", "where": {"properties.products.name": {"contains": name}}}},
            ]},
            ["email", "firstName"],
        )
        for category, name in _WITHOUT
    ]


def _open_ticket() -> list[tuple[str, dict, list]]:
    # open-support-ticket.yaml: more tickets opened than closed (no such events in
    # generated traffic: indexed, never evaluated).
    out = [("open support ticket", _OPEN_TICKET, ["email"])]
    for window in ("7d", "30d"):
        out.append((f"open support ticket {window}", {
            "event": "Support Ticket Opened", "within": window,
            "count": {"gt": {"event": "Support Ticket Closed", "within": window}},
        }, ["email"]))
    out.append(("urgent ticket", {"event": "Support Ticket Opened", "where": {"properties.priority": ["high", "urgent"]}, "within": "1d"}, ["email"]))
    out.append(("repeat ticket openers", {"event": "Support Ticket Opened", "within": "30d", "count": {"gte": 3}}, ["email"]))
    return out


def _prospects() -> list[tuple[str, dict, list]]:
    # stroller-prospects.yaml: recent category buyers of a region, no ticket in 3 days.
    out = []
    for i, category in enumerate(_CATEGORIES[:5]):
        for j, countries in enumerate(_COUNTRIES[:2]):
            window = ("30d", "90d")[(i + j) % 2]
            out.append((f"{category} prospects {'/'.join(countries)} {window}", {"all": [
                {"event": "Order Completed", "where": {"properties.products.category": {"eq": category}}, "within": window, "count": {"gte": 1}},
                {"trait": "country", "in": list(countries)},
                _NO_TICKET,
            ]}, ["email", "firstName"]))
    return out


def _upsell() -> list[tuple[str, dict, list]]:
    # upsell-candidates.yaml: repeat customers with an email and no open ticket.
    out = []
    for n in (2, 3, 5, 8, 12):
        out.append((f"upsell {n}+ orders", {"all": [
            {"trait": "computed.order_count", "gte": n},
            {"trait": "email", "exists": True},
            {"not": {"any": [{"event": "Support Ticket Opened", "within": "3d"}, _OPEN_TICKET]}},
        ]}, ["email", "firstName", "computed.order_count"]))
    for category in _CATEGORIES[:5]:
        out.append((f"cross-sell beyond {category}", {"all": [
            {"trait": "computed.product_categories", "contains": category},
            {"trait": "computed.order_count", "gte": 2},
            _NO_TICKET,
        ]}, ["email", "computed.product_categories"]))
    return out


def _browsers() -> list[tuple[str, dict, list]]:
    # Engaged browsers: products viewed in a window (a category's), over a count.
    out = []
    for window, n in (("10m", 3), ("1h", 5), ("1d", 10), ("7d", 20)):
        out.append((f"browsers {n}+ views {window}", {"event": "Product Viewed", "within": window, "count": {"gte": n}}, ["email"]))
    for category, window, n in (("baby", "1h", 2), ("electronics", "1h", 2), ("fashion", "1d", 3), ("home", "1d", 3), ("toys", "7d", 3)):
        out.append((f"{category} browsers {n}+ views {window}", {
            "event": "Product Viewed", "where": {"properties.category": category}, "within": window, "count": {"gte": n},
        }, ["email"]))
    out.append(("window shoppers 1d", {"all": [
        {"event": ["Product Viewed", "page", "screen"], "within": "1d", "count": {"gte": 8}},
        {"not": {"event": "Order Completed", "within": "7d"}},
    ]}, ["email"]))
    return out


def _traits() -> list[tuple[str, dict, list]]:
    # Plain and computed traits: regions, contact details, channels, order value.
    out = [(f"customers in {'/'.join(c)}", {"trait": "country", "in": list(c)}, ["email"]) for c in _COUNTRIES[:4]]
    out += [
        ("reachable by phone", {"all": [{"trait": "phone", "exists": True}, {"trait": "email", "exists": True}]}, ["email", "phone"]),
        ("app and store shoppers", {"all": [
            {"trait": "computed.channels_used", "contains": "app"}, {"trait": "computed.channels_used", "contains": "pos"},
        ]}, ["email", "computed.channels_used"]),
        ("big basket EUR", {"trait": "computed.average_order_value.EUR", "gte": 150}, ["email"]),
        ("big basket USD", {"trait": "computed.average_order_value.USD", "gte": 150}, ["email"]),
        ("last order in store", {"trait": "computed.last_order.value.channel", "eq": "pos"}, ["email", "computed.last_order"]),
        ("big spenders this week", {"event": "Order Completed", "within": "7d", "sum": {"property": "properties.total", "gte": 300}}, ["email"]),
    ]
    return out


FAMILIES: tuple[Callable[[], list], ...] = (
    _high_spenders, _cart_abandoners, _lapsed, _buyers_without, _open_ticket, _prospects, _upsell, _browsers, _traits,
)


def segment_documents(count: int, tag: str) -> list[dict]:
    """``count`` segment documents with ids ``bench-seg-<tag>-<nnn>``: the families
    above, in turn, each taken once before any is repeated with a new id."""
    shapes = [shape for family in FAMILIES for shape in family()]
    out = []
    for i in range(count):
        name, rule, traits = shapes[i % len(shapes)]
        out.append({
            "id": f"{ID_PREFIX}{tag}-{i:03d}",
            "version": 1,
            "name": f"bench: {name}" + (f" (copy {i // len(shapes)})" if i >= len(shapes) else ""),
            "destinations": ["email"],
            "traits": traits,
            "rule": rule,
        })
    return out


async def _publish_all(settings: Settings, items: list[tuple[str, dict | None]]) -> None:
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def one(segment_id: str, document: dict | None) -> None:
        async with gate:
            await segment_definitions.publish(settings, segment_id, document)

    await asyncio.gather(*(one(i, d) for i, d in items))


async def _delete_stale(settings: Settings) -> list[str]:
    """Tombstones for segments a killed run of this benchmark left behind."""
    now = time.time()
    stale = []
    for segment_id in await segment_definitions.read_all(settings):
        if not segment_id.startswith(ID_PREFIX):
            continue
        try:
            born = int(segment_id[len(ID_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if now - born > STALE_AFTER_S:
            stale.append(segment_id)
    if stale:
        await _publish_all(settings, [(s, None) for s in stale])
    return stale


# ---------------------------------------------------------------- measuring


class _Watch:
    """Reads one output topic from its end; for each expected key (``key_of``) notes
    when it was first read here and how many records carried it."""

    def __init__(self, settings: Settings, topic: str, key_of: Callable, expected: set, label_of: Callable | None = None) -> None:
        self.settings = settings
        self.label_of = label_of
        self.labels: dict = {}  # label_of(record) -> records, of the expected keys
        self.topic = topic
        self.key_of = key_of
        self.expected = expected
        self.first: dict = {}
        self.counts: dict = {}
        self.others = 0  # records of this topic not caused by the expected events
        self._consumer = consumer(settings, None, fetch_max_wait_ms=50)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await assign_at_end(self._consumer, await partitions_of(self.settings, [self.topic]))
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batches.values():
                for record in records:
                    key = self.key_of(record)
                    if key in self.expected:
                        self.counts[key] = self.counts.get(key, 0) + 1
                        self.first.setdefault(key, now)
                        if self.label_of is not None:
                            label = self.label_of(record)
                            self.labels[label] = self.labels.get(label, 0) + 1
                    else:
                        self.others += 1

    def check(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


def _cause_of(record) -> str | None:
    try:
        return orjson.loads(record.value)["data"]["causeEventId"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def _segment_name_of(names: dict[str, str]) -> Callable:
    def label(record) -> str:
        try:
            body = orjson.loads(record.value)
            segment_id = body["data"]["segmentId"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return "?"
        kind = "+" if body.get("type", "").endswith("entered") else "-"
        return f"{names.get(segment_id, segment_id)} {kind}"

    return label


def _message_id_of(record) -> str | None:
    try:
        return orjson.loads(record.value).get("messageId")
    except (orjson.JSONDecodeError, AttributeError):
        return None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


async def _redis_cpu(redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _memberships(redis, prefix: str) -> tuple[int, int, int]:
    """(profiles, memberships in segments whose id starts with ``prefix``, distinct
    such segments with a member) in the database, by SCAN."""
    profiles = memberships = 0
    segments: set[str] = set()
    async for key in redis.scan_iter(match=PROFILE_SEGMENTS_KEY % "*", count=500):
        ids = [k.decode() for k in await redis.hkeys(key)]
        ours = [i for i in ids if i.startswith(prefix)]
        profiles += 1
        memberships += len(ours)
        segments.update(ours)
    return profiles, memberships, len(segments)


def _transitions(samples: dict) -> float:
    return sum(v for (n, labels), v in samples.items() if n == "cdp_segment_transitions_total")


def _done(samples: dict) -> float:
    return sample_sum(samples, "cdp_events_processed_total") + sample_sum(samples, "cdp_dead_letters_total")


def _gauge(samples: dict, name: str) -> float | None:
    values = [v for (n, _), v in samples.items() if n == name]
    return values[0] if values else None


async def _wait_until_ready(run: Run, worker: Child, url: str, at_least: int) -> int:
    """Until the worker is ready (/readyz: in its group, definitions read), knows at
    least ``at_least`` segments and has
    back-filled every one it knows (over an empty database: at once). Returns how
    many segments it knows."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if not worker.alive():
            raise RuntimeError(f"the worker exited with {worker.process.returncode}:\n{worker.tail()}")
        samples = await _scrape(url)
        known = _gauge(samples, "cdp_segments_defined")
        if _gauge(samples, "cdp_worker_ready") == 1 and known is not None and known >= at_least:
            # Every known segment back-filled (or a zero-segment worker is up), and the
            # gauge read again to catch definitions that arrived meanwhile.
            if await run.redis.hlen(DONE_KEY) >= known:
                again = _gauge(await _scrape(url), "cdp_segments_defined")
                if again == known:
                    return int(known)
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not ready after {READY_TIMEOUT_S:.0f}s (knows {known} segments):\n{worker.tail()}")
        await asyncio.sleep(0.25)


async def measure_worker(run: Run, row: WorkerRow, label: str, at_least: int, options: SegmentOptions) -> None:
    """Start a worker, wait until it is ready, measure throughput, then latency."""
    report: SegmentReport = run.report  # type: ignore[assignment]
    await run.redis.flushdb()
    app_id = run.group(f"worker-{label}")
    run.faust_apps.append(app_id)
    others = await _wait_for_quiet(run.settings, options.quiet_wait_s)
    await commit_group_at_end(run.settings, app_id, INBOUND)
    env = _faust_env(run, app_id, CDP_KAFKA_TRANSPORT="batch")
    url = f"http://127.0.0.1:{env['CDP_WEB_PORT']}/metrics"
    worker = Child([sys.executable, "-m", "streamcdp.cli", "worker"], env, run.workdir / f"worker-{label}.log", run.workdir)
    try:
        row.segments_known = await _wait_until_ready(run, worker, url, at_least)
        cpu_before, redis_cpu_before = _cpu_seconds(worker.process.pid), await _redis_cpu(run.redis)
        started = time.perf_counter()
        await send_events(run.producer, run.inputs)
        produce_s = time.perf_counter() - started
        first: tuple[float, float] | None = None
        deadline = time.monotonic() + run.throughput_timeout_s
        while True:
            if not worker.alive():
                raise RuntimeError(f"the worker exited with {worker.process.returncode}:\n{worker.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done after {run.throughput_timeout_s:.0f}s:\n{worker.tail()}")
            samples = await _scrape(url)
            now, done = time.perf_counter(), _done(samples)
            if first is None and done > 0:
                first = (now, done)
            if done >= len(run.inputs):
                break
            await asyncio.sleep(0.2)
        if done - first[1] < len(run.inputs) / 2:
            raise RuntimeError(f"the worker did {first[1]:,.0f} of {len(run.inputs):,} events while they were produced")
        row.events_per_s = (done - first[1]) / (now - first[0])
        cpu_after, redis_cpu_after = _cpu_seconds(worker.process.pid), await _redis_cpu(run.redis)
        changes = _transitions(samples)
        row.changes_per_event = changes / done if done else None
        census = ""
        if at_least:
            profiles, members, populated = await _memberships(run.redis, ID_PREFIX)
            census = (f"; after it, {members:,} memberships of our segments over {profiles:,} profiles with some "
                      f"membership, {populated} of our {at_least} segments with members")
        cpu_note = ""
        if cpu_before is not None and cpu_after is not None:
            cpu_note = (
                f"; CPU per 1,000 events: worker {1e6 * (cpu_after - cpu_before) / done:.0f} ms, "
                f"Redis server {1e6 * (redis_cpu_after - redis_cpu_before) / done:.0f} ms"
            )
        report.notes.append(
            f"({label}) throughput: the worker knew {row.segments_known} segments; {sample_sum(samples, 'cdp_events_processed_total'):,.0f} "
            f"processed + {sample_sum(samples, 'cdp_dead_letters_total'):,.0f} dead-lettered of {len(run.inputs):,} "
            f"(produced in {produce_s:.1f} s; clock from the first poll after the last send that found events done, at {first[1]:,.0f}); "
            f"{changes:,.0f} segment changes ({row.changes_per_event:.3f}/event){census}; "
            f"{sample_sum(samples, 'cdp_segment_expiry_checks_total'):,.0f} profiles re-evaluated by the expiry timer; "
            f"{_batch_note(samples)}{cpu_note}."
        )
        before = samples
        cpu_before, wall_before = _cpu_seconds(worker.process.pid), time.perf_counter()
        await _offered(run, row, label, options, alive=worker.alive)
        cpu_after, wall = _cpu_seconds(worker.process.pid), time.perf_counter() - wall_before
        after = await _scrape(url)
        if cpu_before is not None and cpu_after is not None:
            inside_cpu = f"; the worker's CPU busy {(cpu_after - cpu_before) / wall:.0%} of the {wall:.0f} s"
        else:
            inside_cpu = ""
        known_after = _gauge(after, "cdp_segments_defined")
        if known_after is not None and known_after != row.segments_known:
            report.notes.append(
                f"({label}) the worker knew {row.segments_known} segments when measuring began and {known_after:.0f} at the "
                "end: someone else applied or deleted segments on cdp.segment-definitions meanwhile."
            )
        during = {key: value - before.get(key, 0.0) for key, value in after.items()}
        inside = _histogram_percentiles(before, after, "cdp_event_latency_seconds")
        inside_note = ("; the worker's own histogram (record timestamp to outputs acked): p50/p95/p99 "
                       + " / ".join(f"{v:.1f}" for v in inside) + " ms") if inside else ""
        report.notes.append(
            f"({label}) during the latency run: {_batch_note(during)}; {_transitions(during):,.0f} segment changes "
            f"({_transitions(during) / max(_done(during), 1):.3f}/event), "
            f"{sample_sum(during, 'cdp_segment_expiry_checks_total'):,.0f} profiles re-evaluated by the expiry timer{inside_cpu}{inside_note}."
        )
        others += [g for g in await active_groups(run.settings, "streamcdp-bench-") if g not in others]
    finally:
        await asyncio.to_thread(worker.stop)
    if others:
        report.notes.append(
            f"({label}) other consumer groups were active: {', '.join(others)}. Whatever reads cdp.events.* processed the "
            "bench's input too and shared the CPU (and, with these segments, may have published some of the changes first)."
        )


async def _offered(run: Run, row: WorkerRow, label: str, options: SegmentOptions, *, alive: Callable[[], bool]) -> None:
    """Fresh events at ``options.rate``: latency from each input record's timestamp to
    its first segment change and to its resolved record, read here."""
    count = int(options.rate * options.latency_seconds)
    events = list(generate_events(count, seed=options.seed, start_ms=int(time.time() * 1000), mean_gap_ms=1000 / options.rate))
    ids = [v["messageId"] for _, v in events]
    expected = set(ids)
    stamped: dict[str, float] = {}
    in_order = iter(ids)
    changes = _Watch(run.settings, SEGMENT_CHANGES, _cause_of, expected, _segment_name_of(run.report.segment_names))
    resolved = _Watch(run.settings, RESOLVED, _message_id_of, expected)
    await changes.start()
    await resolved.start()
    try:
        await send_events(
            run.producer, events, rate=options.rate,
            on_ack=lambda metadata, _: stamped.__setitem__(next(in_order), metadata.timestamp / 1000),
        )
        # Every event has a resolved record; the changes of the last ones follow theirs.
        deadline = time.monotonic() + 15.0
        while len(resolved.first) < len(ids) and time.monotonic() < deadline:
            changes.check()
            resolved.check()
            if not alive():
                raise RuntimeError("the worker stopped")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
    finally:
        await changes.stop()
        await resolved.stop()
    to_resolved = [(resolved.first[k] - stamped[k]) * 1000 for k in ids if k in resolved.first]
    to_change = [(changes.first[k] - stamped[k]) * 1000 for k in ids if k in changes.first]
    if not to_resolved:
        raise RuntimeError("no resolved record seen for the offered events")
    row.latency_resolved_ms = percentiles(to_resolved)
    if to_change:
        row.latency_change_ms = percentiles(to_change)
    missing = len(ids) - len(to_resolved)
    total_changes = sum(changes.counts.values())
    note = (
        f"({label}) latency: {len(ids):,} events offered at {options.rate:,.0f}/s for {options.latency_seconds:.0f} s; "
        f"{len(to_resolved):,} resolved records seen{f', {missing} MISSING' if missing else ''} (max {max(to_resolved):.0f} ms); "
        f"{len(to_change):,} events caused {total_changes:,} segment changes ({total_changes / len(ids):.3f}/event)"
        + (f", max {max(to_change):.0f} ms to the first" if to_change else "")
        + (f"; {changes.others:,} other changes on the topic meanwhile (expiry timers, other workers)" if changes.others else "")
        + "."
    )
    if changes.labels:
        top = sorted(changes.labels.items(), key=lambda kv: -kv[1])[:6]
        note += " Most changes (+ entered, - exited): " + ", ".join(f"{name} {n:,}" for name, n in top) + "."
    if row.events_per_s and row.events_per_s < options.rate:
        note += (f" The offered rate is more than this worker sustained ({row.events_per_s:,.0f}/s): it fell behind for "
                 "the whole run, so this latency is mostly the growing backlog.")
    run.report.notes.append(note)


async def _wait_for_quiet(settings: Settings, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        others = await active_groups(settings, "streamcdp-bench-")
        if not others or time.monotonic() > deadline:
            return others
        await asyncio.sleep(2.0)


async def _step(row, name: str, step) -> None:
    try:
        await step
    except (asyncio.TimeoutError, TimeoutError) as exc:
        row.error = f"{name}: timed out {exc}".strip()
    except Exception as exc:  # noqa: BLE001 - one broken shape must not hide the others
        row.error = f"{name}: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- the run


async def run_all(options: SegmentOptions) -> SegmentReport:
    base = Settings.from_env()
    settings = Settings.from_env(redis_url=_with_db(base.redis_url, options.redis_db))
    report = SegmentReport()
    redis = connect(settings.redis_url, health_check_interval=10)
    info = await redis.info("server")
    report.facts = machine_facts(f"{info['redis_version']} (CDP_BENCH_REDIS_DB={options.redis_db})")
    await ensure_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers(), acks="all", linger_ms=0, max_request_size=PRODUCER_MAX_REQUEST_BYTES
    )
    await producer.start()
    pipeline_options = Options(
        events=options.events, rate=options.rate, latency_seconds=options.latency_seconds,
        partitions=options.partitions, seed=options.seed, redis_db=options.redis_db,
    )
    run = Run(pipeline_options, settings, Path(tempfile.mkdtemp(prefix="streamcdp-bench-seg-")), producer, redis, report)  # type: ignore[arg-type]
    published: list[str] = []
    try:
        stale = await _delete_stale(settings)
        if stale:
            report.notes.append(f"Deleted {len(stale)} segments left behind by an earlier run that was killed.")
        computed = ComputedTraits.load(settings.computed_traits or None)
        documents = segment_documents(options.segments, f"{int(time.time())}-{run.run_id}")
        segments = [parse_segment(d, source="bench segment", computed=computed) for d in documents]
        report.segment_names = {s.id: (s.name or s.id).removeprefix("bench: ") for s in segments}
        await create_topics(settings, run.own_topics, options.partitions)
        now_ms = int(time.time() * 1000)
        run.inputs = list(generate_events(
            options.events, seed=options.seed, start_ms=now_ms - int(options.events * DEFAULT_GAP_MS), bad_ratio=pipeline_options.bad_ratio,
        ))
        await send_events(producer, run.inputs, topic_of=run.input_topic)
        kinds: dict[str, int] = {}
        for _, value in run.inputs:
            kind = "malformed" if isinstance(value, bytes) else value.get("event") or value["type"]
            kinds[kind] = kinds.get(kind, 0) + 1
        report.notes.append(
            f"Input: {len(run.inputs):,} generated events (seed {options.seed}): "
            + ", ".join(f"{k} {v / len(run.inputs):.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            + f"; {len(segments)} segments from {len(FAMILIES)} families (config/segments shapes, browsers, traits), "
            f"{sum(len(s.event_conditions()) for s in segments)} event conditions "
            f"({len({c.id for s in segments for c in s.event_conditions()})} distinct), "
            f"{sum(len(s.windowed_conditions()) for s in segments)} windowed."
        )
        await _step(report.a, "raw_passthrough", raw_passthrough(run, report.a))
        await _step(report.b, "faust_consume_only", faust_consume_only("faust")(run, report.b))
        zero = report.workers["w0"] = WorkerRow("(w0) streamcdp worker, batch transport, none of our segments")
        await _step(zero, "worker[0]", measure_worker(run, zero, "w0", 0, options))
        full = report.workers["w"] = WorkerRow(f"(w{len(segments)}) streamcdp worker, batch transport, {len(segments)} segments")
        # Published just before the worker starts and deleted as soon as it stops: every
        # worker on the broker evaluates (and back-fills) them meanwhile.
        published = [s.id for s in segments]
        started = time.perf_counter()
        await _publish_all(settings, [(s.id, s.document) for s in segments])
        report.notes.append(f"Published {len(segments)} segments in {time.perf_counter() - started:.1f} s.")
        await _step(full, f"worker[{len(segments)}]", measure_worker(run, full, f"w{len(segments)}", len(segments), options))
        await _publish_all(settings, [(i, None) for i in published])
        published = []
        if options.passthrough_latency:
            await _step(report.a, "raw_passthrough_latency", raw_passthrough_latency(run, report.a))
        report.notes.append(f"Machine {load_average()} at the end.")
    finally:
        with contextlib.suppress(Exception):
            # Shielded: a second cancellation must not leave the segments behind.
            if published:
                await asyncio.shield(_publish_all(settings, [(i, None) for i in published]))
        Child.stop_all()
        await producer.stop()
        await delete_topics(settings, run.own_topics + [f"{app}-__assignor-__leader" for app in run.faust_apps])
        await delete_groups(settings, run.groups)
        await redis.flushdb()
        await redis.aclose()
        shutil.rmtree(run.workdir, ignore_errors=True)
    return report


# ---------------------------------------------------------------- the report


def _ms(values: list[float] | None) -> str:
    return " / ".join(f"{v:.1f}" for v in values) if values else "—"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}×" if value and base else "—"


def render(report: SegmentReport, options: SegmentOptions, seconds: float) -> str:
    a, b = report.a, report.b
    rate = f"{options.rate:,.0f}"
    lines = ["streamcdp segment benchmark (issue 12)", ""]
    lines += [f"  {name:<10} {value}" for name, value in report.facts]
    lines += ["", (
        f"| shape | events/s | vs raw passthrough (a) | vs bare faust (b) | segment changes/event | "
        f"p50/p95/p99 ms to segment change at {rate}/s | p50/p95/p99 ms to resolved record ((a): its copy) at {rate}/s |"
    ), "|---|---:|---:|---:|---:|---:|---:|"]
    for row in (a, b):
        events = f"{row.events_per_s:,.0f}" if row.events_per_s else ("failed" if row.error else "—")
        latency = _ms(row.latency_ms)
        lines.append(f"| {row.shape} | {events} | {_ratio(row.events_per_s, a.events_per_s)} | "
                     f"{_ratio(row.events_per_s, b.events_per_s)} | — | — | {latency} |")
    for row in report.workers.values():
        events = f"{row.events_per_s:,.0f}" if row.events_per_s else ("failed" if row.error else "—")
        changes = f"{row.changes_per_event:.3f}" if row.changes_per_event is not None else "—"
        shape = row.shape + (f" (knew {row.segments_known})" if row.segments_known is not None else "")
        lines.append(f"| {shape} | {events} | {_ratio(row.events_per_s, a.events_per_s)} | {_ratio(row.events_per_s, b.events_per_s)} | "
                     f"{changes} | {_ms(row.latency_change_ms)} | {_ms(row.latency_resolved_ms)} |")
    lines.append("")
    lines += [f"- {note}" for note in report.notes]
    full, zero = report.workers.get("w"), report.workers.get("w0")
    verdict = []
    if full and full.latency_change_ms:
        p99 = full.latency_change_ms[2]
        verdict.append(f"p99 to segment change at {rate}/s {p99:.1f} ms (target < {TARGET_P99_MS:.0f}: {'met' if p99 < TARGET_P99_MS else 'NOT met'})")
    if full and full.events_per_s and b.events_per_s:
        share = full.events_per_s / b.events_per_s
        verdict.append(f"throughput {share:.2f}× (b) (target >= {TARGET_VS_FAUST}: {'met' if share >= TARGET_VS_FAUST else 'NOT met'})")
    if full and zero and full.events_per_s and zero.events_per_s:
        verdict.append(f"with the segments {full.events_per_s / zero.events_per_s:.2f}× the throughput without")
    if verdict:
        lines.append("- Targets (issue 12): " + "; ".join(verdict) + ". A missed target is reported, not a failure.")
    failures = [(r.shape, r.error) for r in (a, b, *report.workers.values()) if r.error]
    lines += [f"- {shape}: FAILED: {error}" for shape, error in failures]
    lines.append(f"- Total bench time {seconds:.0f} s.")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = SegmentOptions()
    parser = argparse.ArgumentParser(prog="python -m bench.segments", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=d.events, help=f"throughput input events (default {d.events:,})")
    parser.add_argument("--segments", type=int, default=d.segments, help=f"segments applied (default {d.segments})")
    parser.add_argument("--rate", type=float, default=d.rate, help="offered rate of the latency runs, events/s (default 1000)")
    parser.add_argument("--latency-seconds", type=float, default=d.latency_seconds, help=f"length of each latency run (default {d.latency_seconds:.0f})")
    parser.add_argument("--partitions", type=int, default=d.partitions, help="partitions of the bench input topics of (a), (b)")
    parser.add_argument("--seed", type=int, default=d.seed, help="generator seed (default 0)")
    parser.add_argument("--redis-db", type=int, default=int(os.environ.get("CDP_BENCH_REDIS_DB", d.redis_db)),
                        help="Redis database the workers use; flushed (default CDP_BENCH_REDIS_DB or 14)")
    parser.add_argument("--quiet-wait", type=float, default=d.quiet_wait_s,
                        help="seconds to wait for other consumer groups to go idle before each worker run (default 15)")
    parser.add_argument("--no-passthrough-latency", action="store_true", help="skip the raw passthrough's latency run")
    return parser


async def _main(options: SegmentOptions) -> SegmentReport:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_all(options)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.events < 1000 or args.rate <= 0 or args.latency_seconds <= 0 or not 1 <= args.segments <= 999:
        print("bench.segments: --events >= 1000, --rate and --latency-seconds > 0, --segments 1..999", file=sys.stderr)
        return 2
    options = SegmentOptions(
        events=args.events, rate=args.rate, latency_seconds=args.latency_seconds, segments=args.segments,
        partitions=args.partitions, seed=args.seed, redis_db=args.redis_db, quiet_wait_s=args.quiet_wait,
        passthrough_latency=not args.no_passthrough_latency,
    )
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    import uvloop

    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(_main(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench.segments: interrupted; worker stopped, segments deleted, bench topics deleted", file=sys.stderr)
        return 130
    finally:
        Child.stop_all()
    print(render(report, options, time.monotonic() - started), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
