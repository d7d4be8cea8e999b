"""``python -m bench.whole``: the whole pipeline in one table (issue 14), the headline of ``make bench``.

Ingest to segment change, with 100 segments applied, on realistic traffic from
``streamcdp.generate``, beside two baselines measured in the same run on the same
input and the same broker. Rows:

a. raw aiokafka consume-and-produce passthrough (``bench.pipeline.raw_passthrough``,
   in this process);
b. a bare faust agent that only consumes, faust's own transport
   (``bench.faust_consume``, its own process);
w100. the real worker (``python -m bench.counted_worker``: ``streamcdp worker``
   counting its Redis requests), batch transport, with the segments of
   ``bench.segments`` applied, its own consumer group and Redis database;
w100×2. two such worker processes in one consumer group on the same input: the
   total and each worker's share;
w0 (``--zero``, not by default). one worker with none of the benchmark's segments.

Columns, for each row:

* events/s sustained: (a) from the first batch in hand to the last commit; (b)
  inside the agent from its first batch to the last event; workers: events done
  (processed + dead-lettered) per second between the first poll of their /metrics
  after the input was produced that finds events done and the last one;
* p50/p95/p99 latency at each offered rate (``--rates``, default 1,000 and 5,000
  events/s, ``--latency-seconds`` each, fresh events): from the input record's
  timestamp (arrival on the input topic) to (a) its copy read here from the output
  topic, (b) the agent having it in hand, workers: its first segment change on
  ``cdp.segment-changes`` (``data.causeEventId``) read here (only the events that
  caused one count);
* Redis round trips per event: requests written to Redis by the worker process
  (commands sent alone or whole pipelines, the timer's and back-fills' included)
  over events done, during the throughput run; beside it, in brackets, the round
  trips the hot path declares (``cdp_redis_call_duration_seconds_count``);
* CPU seconds per 1,000 events during the throughput run: the worker process (for
  (a) this process, for (b) the agent's process);
* Redis bytes per profile: ``MEMORY USAGE`` (``SAMPLES 0``) of every key in the
  bench database after the throughput run, over the live profiles (not merged
  away), besides the profiles' bounded history and in total; ``INFO memory``
  ``used_memory`` growth over the run is reported beside it in the notes.

Then the issue's targets beside the figures, met or missed (a missed target is
reported, not a failure), the machine, and notes. Cleans up on exit, Ctrl-C and
SIGTERM: segments deleted (tombstones), workers stopped, bench topics and consumer
groups deleted, the Redis database flushed. Exits 0 when the measurements
completed, 1 when one failed, 130 when interrupted.
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

from aiokafka import AIOKafkaProducer

from agents.profiles.computed import ComputedTraits
from agents.segments.backfill import DONE_KEY
from agents.segments.rules import parse_segment
from bench import segments as seg
from bench.common import (
    Child,
    Watch,
    active_groups,
    commit_group_at_end,
    cpu_seconds,
    create_topics,
    delete_groups,
    faust_env,
    gauge,
    group_state,
    histogram_percentiles,
    latencies_ms,
    load_average,
    machine_facts,
    message_id_of,
    offer,
    percentiles,
    sample_by_label,
    sample_sum,
    samples_delta,
    scrape,
    wait_for_quiet,
    with_db,
)
from bench.counted_worker import REQUESTS_GAUGE
from bench.pipeline import BareAgent, Options, Run, _batch_note, _input_consumer, consume_loop, passthrough, raw_passthrough
from bench.pipeline import Row as PipelineRow
from streamcdp.generate import DEFAULT_GAP_MS, generate_events, send_events
from streams.metrics import LATENCY_BUCKETS
from streams.settings import Settings
from streams.topics import INBOUND, PRODUCER_MAX_REQUEST_BYTES, RESOLVED, SEGMENT_CHANGES, delete_topics, ensure_topics

# The targets, for the worker with the segments (one process).
TARGET_VS_RAW = 0.25
TARGET_P99_MS = 100.0
TARGET_P99_RATE = 1000.0
TARGET_REDIS_PER_EVENT = 2.0
TARGET_BYTES_PER_PROFILE = 2048
# A worker back-fills every segment it knows at once; those that fail (redis-py's pool
# of 100 connections, say) are retried every 30 s (streamcdp.segment_runtime).
READY_TIMEOUT_S = 150.0
PROFILE_KEY_PREFIX = "cdp:p:{"
MEMORY_BATCH = 500
IDLE_S = 2.0  # how long the workers' idle Redis requests are counted before the input


@dataclass
class WholeOptions:
    events: int = 20_000
    segments: int = 100
    rates: tuple[float, ...] = (1000.0, 5000.0)
    latency_seconds: float = 5.0
    workers: tuple[int, ...] = (1, 2)  # worker processes per group, one row each, all with the segments
    zero: bool = False  # also one worker with none of the benchmark's segments
    partitions: int = 8
    seed: int = 0
    redis_db: int = 14
    quiet_wait_s: float = 15.0


# ---------------------------------------------------------------- figures


def key_kind(key: str) -> str:
    """What a key of the bench database holds: a profile key's suffix (``meta``,
    ``traits``, ``history``, ...), ``id index`` (identifier → profile),
    ``match blocks`` (fuzzy-matching blocking index) or ``other`` (global state:
    the segment timer, back-fills, ...)."""
    if key.startswith(PROFILE_KEY_PREFIX):
        closing = key.find("}:", len(PROFILE_KEY_PREFIX))
        if closing > 0:
            return key[closing + 2:]
    if key.startswith("cdp:id:"):
        return "id index"
    if key.startswith("cdp:blk:"):
        return "match blocks"
    return "other"


@dataclass
class Memory:
    """Redis memory of the bench database after a throughput run."""

    profiles: int  # live profiles (not merged away, not tombstones)
    keys: int
    by_kind: dict[str, int]  # bytes (MEMORY USAGE) of all keys of each kind
    used_memory_growth: int | None = None  # INFO used_memory, after - before (server-wide)

    def per_profile(self, *kinds: str) -> float:
        return sum(self.by_kind.get(k, 0) for k in kinds) / self.profiles if self.profiles else 0.0

    @property
    def total(self) -> float:
        return sum(self.by_kind.values()) / self.profiles if self.profiles else 0.0

    @property
    def history(self) -> float:
        return self.per_profile("history")

    @property
    def besides_history(self) -> float:
        return self.total - self.history


@dataclass
class Row:
    key: str
    shape: str
    events_per_s: float | None = None
    latency: dict[float, list[float]] = field(default_factory=dict)  # offered rate -> p50/p95/p99 ms
    redis_per_event: float | None = None  # requests written to Redis per event
    redis_declared_per_event: float | None = None  # cdp_redis_call_duration_seconds_count per event
    cpu_per_1000: float | None = None  # CPU seconds per 1,000 events
    memory: Memory | None = None
    error: str | None = None
    part_of: str | None = None  # one worker of the group row ``part_of``


@dataclass
class Report:
    facts: list[tuple[str, str]] = field(default_factory=list)
    rows: dict[str, Row] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    segment_names: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(r.error for r in self.rows.values())

    def note(self, text: str) -> None:
        self.notes.append(text)


def worker_label(segments: int, workers: int) -> str:
    return f"w{segments}" + (f"×{workers}" if workers > 1 else "")


# ---------------------------------------------------------------- targets


@dataclass
class Verdict:
    target: str
    figure: str
    met: bool | None  # None: not measured


def verdicts(report: Report, options: WholeOptions) -> list[Verdict]:
    """The issue's targets for the worker with the segments (one process), with the
    figures of the other worker rows beside its own."""
    rows = report.rows
    headline = rows.get(worker_label(options.segments, 1))
    groups = [r for r in rows.values() if r.key.startswith(f"w{options.segments}×") and r.part_of is None]
    a = rows.get("a")
    out = []

    def share(row: Row) -> float | None:
        return row.events_per_s / a.events_per_s if row.events_per_s and a and a.events_per_s else None

    main = share(headline) if headline else None
    others = "".join(f"; ({r.key}) {share(r):.2f}×" for r in groups if share(r) is not None)
    out.append(Verdict(
        f"events/s ≥ {TARGET_VS_RAW:.0%} of raw passthrough (a)",
        (f"({headline.key}) {main:.2f}× (a)" + others) if main is not None else "not measured",
        None if main is None else main >= TARGET_VS_RAW,
    ))
    p99 = headline.latency.get(TARGET_P99_RATE) if headline else None
    out.append(Verdict(
        f"p99 < {TARGET_P99_MS:.0f} ms at {TARGET_P99_RATE:,.0f} events/s (to the segment change)",
        f"({headline.key}) {p99[2]:,.1f} ms" if p99 else "not measured",
        None if not p99 else p99[2] < TARGET_P99_MS,
    ))
    rt = headline.redis_per_event if headline else None
    out.append(Verdict(
        f"≤ {TARGET_REDIS_PER_EVENT:g} Redis round trips per event, amortised",
        f"({headline.key}) {rt:.4f}" if rt is not None else "not measured",
        None if rt is None else rt <= TARGET_REDIS_PER_EVENT,
    ))
    memory = headline.memory if headline else None
    out.append(Verdict(
        f"≤ {TARGET_BYTES_PER_PROFILE / 1024:g} KiB Redis per profile besides its history",
        (f"({headline.key}) {memory.besides_history:,.0f} B "
         f"(of which de-duplication records {memory.per_profile('seen'):,.0f} B)") if memory and memory.profiles else "not measured",
        None if not (memory and memory.profiles) else memory.besides_history <= TARGET_BYTES_PER_PROFILE,
    ))
    return out


# ---------------------------------------------------------------- rendering


def fmt_rate(row: Row) -> str:
    if row.events_per_s:
        return f"{row.events_per_s:,.0f}"
    return "failed" if row.error else "—"


def fmt_ms(values: list[float] | None) -> str:
    return " / ".join(f"{v:,.1f}" for v in values) if values else "—"


def fmt_histogram_ms(values: list[float] | None) -> str:
    """Percentiles read from a worker histogram: those past its top bucket (10 s)
    are only known to be at least that."""
    if not values:
        return "—"
    top = LATENCY_BUCKETS[-1] * 1000
    return " / ".join(f"≥ {top:,.0f}" if v >= top else f"{v:,.1f}" for v in values)


def fmt_ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}×" if value and base else "—"


def fmt_redis(row: Row) -> str:
    if row.redis_per_event is None:
        return "—"
    if row.redis_per_event == 0 and row.redis_declared_per_event is None:
        return "0"
    text = f"{row.redis_per_event:.4f}"
    if row.redis_declared_per_event is not None:
        text += f" ({row.redis_declared_per_event:.4f})"
    return text


def fmt_memory(memory: Memory | None) -> str:
    if memory is None or not memory.profiles:
        return "—"
    return f"{memory.besides_history:,.0f} / {memory.total:,.0f}"


def cells(row: Row, rates: tuple[float, ...], a: Row | None, b: Row | None) -> list[str]:
    shape = f"  {row.shape}" if row.part_of else row.shape
    base_a = a.events_per_s if a else None
    base_b = b.events_per_s if b else None
    return [
        shape, fmt_rate(row), fmt_ratio(row.events_per_s, base_a), fmt_ratio(row.events_per_s, base_b),
        *(fmt_ms(row.latency.get(rate)) for rate in rates),
        fmt_redis(row),
        f"{row.cpu_per_1000:.3f}" if row.cpu_per_1000 is not None else "—",
        fmt_memory(row.memory),
    ]


def header(rates: tuple[float, ...]) -> list[str]:
    return [
        "row", "events/s sustained", "vs (a)", "vs (b)",
        *(f"p50 / p95 / p99 ms at {rate:,.0f}/s" for rate in rates),
        "Redis round trips/event (declared)", "CPU s per 1,000 events", "Redis B per profile: besides history / total",
    ]


def table(lines_of: list[list[str]]) -> list[str]:
    head, *body = lines_of
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    out += ["| " + " | ".join(cells_) + " |" for cells_ in body]
    return out


def render(report: Report, options: WholeOptions, seconds: float) -> str:
    rows = report.rows
    a, b = rows.get("a"), rows.get("b")
    lines = [f"streamcdp: the whole pipeline, ingest to segment change, {options.segments} segments (bench.whole)", ""]
    lines += [f"  {name:<10} {value}" for name, value in report.facts]
    lines.append("")
    lines += table([header(options.rates)] + [cells(r, options.rates, a, b) for r in rows.values()])
    lines += ["", f"Targets (issue 14), for (w{options.segments}); a missed target is reported, not a failure:", ""]
    lines += ["| target | figure | |", "|---|---|---|"]
    for v in verdicts(report, options):
        lines.append(f"| {v.target} | {v.figure} | {'not measured' if v.met is None else ('met' if v.met else 'MISSED')} |")
    lines += ["", "What the columns mean:"]
    lines += [
        "- latency: from the input record's timestamp (arrival on the input topic) to (a) its copy read here from the "
        "output topic; (b) the agent having it in hand; workers: the event's first segment change on "
        "cdp.segment-changes read here (only events that caused a change count; see the notes for how many).",
        "- Redis round trips/event: requests written to Redis by the worker process (a command alone or a whole "
        "pipeline; timer, back-fills and health checks included) over events done in the throughput run; in brackets "
        "the round trips the hot path declares (cdp_redis_call_duration_seconds_count). (a), (b) do not use Redis.",
        "- CPU: the worker process's user + system seconds over the throughput run, per 1,000 events; (a): this "
        "process (consumer and producer); (b): the agent's process.",
        "- Redis B per profile: MEMORY USAGE (SAMPLES 0) of every key in the bench database after the throughput run "
        "over the live profiles; besides history = all of it except the profiles' bounded event history "
        "(de-duplication records, identifier index and segment state included).",
        "",
        "Notes:",
    ]
    lines += [f"- {note}" for note in report.notes]
    lines += [f"- ({r.key}) FAILED: {r.error}" for r in rows.values() if r.error]
    lines.append(f"- Total bench time {seconds:.0f} s.")
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring: baselines


def latency_events(rate: float, seconds: float, seed: int) -> list:
    """Fresh events (new message ids) for one latency run at ``rate``."""
    return list(generate_events(int(rate * seconds), seed=seed, start_ms=int(time.time() * 1000), mean_gap_ms=1000 / rate))


async def measure_raw_throughput(run: Run, row: Row, options: WholeOptions) -> None:
    """(a): throughput over the input, and this process's CPU meanwhile."""
    measured = PipelineRow(row.shape)
    cpu = time.process_time()
    await raw_passthrough(run, measured)
    cpu = time.process_time() - cpu
    row.events_per_s, row.redis_per_event = measured.events_per_s, 0.0
    row.cpu_per_1000 = 1000 * cpu / len(run.inputs)


async def measure_raw_latency(run: Run, row: Row, options: WholeOptions) -> None:
    """(a): latency at each offered rate, a consumer from the end of the input topics."""
    out = run.topic("out.passthrough")
    c = await _input_consumer(run, run.group("passthrough-latency"), at_end=True)
    loop = asyncio.create_task(consume_loop(c, passthrough(run.producer, out), batch_max=500, count=None))
    try:
        for rate in options.rates:
            watch = Watch(run.settings, [out], message_id_of)
            events = latency_events(rate, options.latency_seconds, options.seed)
            offered = await offer(run.producer, events, rate, [watch], topic_of=run.input_topic, drain_s=15.0,
                                  alive=lambda: not loop.done())
            found = latencies_ms(offered.arrived, watch.first, offered.ids)
            if not found:
                raise RuntimeError(f"no output seen for the events offered at {rate:,.0f}/s")
            row.latency[rate] = percentiles(found)
            run.report.note(_latency_note("a", offered, rate, found, "copies"))
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await c.stop()


async def measure_faust(run: Run, row: Row, options: WholeOptions) -> None:
    """(b): throughput over the input, then its consumption latency at each rate.
    Before (a)'s latency runs, which add events to the same input topics: the agent
    reads them from the start and times the events that follow the input."""
    counts = [int(rate * options.latency_seconds) for rate in options.rates]
    agent = BareAgent(run, "faust", tuple(counts))
    try:
        measured = await agent.throughput()
        row.events_per_s = measured["events"] / measured["seconds"]
        row.redis_per_event = 0.0
        if measured.get("cpu_seconds") is not None:
            row.cpu_per_1000 = 1000 * measured["cpu_seconds"] / measured["events"]
        for phase, rate in enumerate(options.rates, start=1):
            events = latency_events(rate, options.latency_seconds, options.seed)
            started = time.perf_counter()
            await send_events(run.producer, events, topic_of=run.input_topic, rate=rate)
            sent_s = time.perf_counter() - started
            result = await agent.latency(phase, 30.0 + len(events) / 1000)
            row.latency[rate] = result["latency_ms"]
            run.report.note(
                f"(b) latency at {rate:,.0f}/s: {len(events):,} events offered in {sent_s:.1f} s, {result['events']:,} "
                f"timed by the agent; max {result['max_ms']:,.0f} ms."
            )
    finally:
        await agent.stop()


def _latency_note(label: str, offered, rate: float, found: list[float], what: str) -> str:
    missing = len(offered.ids) - len(found)
    achieved = len(offered.ids) / offered.seconds if offered.seconds else 0.0
    return (
        f"({label}) latency at {rate:,.0f}/s: {len(offered.ids):,} events offered in {offered.seconds:.1f} s "
        f"({achieved:,.0f}/s achieved); {len(found):,} {what} seen{f', {missing:,} MISSING' if missing else ''}; "
        f"max {max(found):,.0f} ms."
    )


# ---------------------------------------------------------------- measuring: workers


class WorkerGroup:
    """``workers`` processes of ``bench.counted_worker`` in one consumer group."""

    def __init__(self, run: Run, label: str, workers: int) -> None:
        self.run = run
        self.label = label
        self.app_id = run.group(f"worker-{label.replace('×', 'x')}")
        run.faust_apps.append(self.app_id)
        self.children: list[Child] = []
        self.urls: list[str] = []
        self.count = workers

    def start(self) -> None:
        for i in range(1, self.count + 1):
            env = faust_env(self.run.settings, self.app_id, CDP_KAFKA_TRANSPORT="batch")
            cwd = self.run.workdir / f"worker-{self.app_id}-{i}"
            cwd.mkdir(exist_ok=True)  # faust keeps <app id>-data in its working directory
            self.children.append(Child(
                [sys.executable, "-m", "bench.counted_worker"], env, self.run.workdir / f"worker-{self.app_id}-{i}.log", cwd,
            ))
            self.urls.append(f"http://127.0.0.1:{env['CDP_WEB_PORT']}/metrics")

    def alive(self) -> bool:
        return all(c.alive() for c in self.children)

    def check(self) -> None:
        for i, c in enumerate(self.children, start=1):
            if not c.alive():
                raise RuntimeError(f"worker {i} exited with {c.process.returncode}:\n{c.tail()}")

    async def scrape(self) -> list[dict]:
        return [await scrape(url) for url in self.urls]

    def cpu(self) -> list[float | None]:
        return [cpu_seconds(c.process.pid) for c in self.children]

    async def wait_until_ready(self, ours: list[str]) -> int:
        """Until every worker is ready (/readyz: in its group, definitions read) and
        knows our segments (``ids``: their transition series exist on its /metrics),
        each of them is back-filled (over the flushed database: at once), and (two or
        more workers) the group is stable with all of them; twice in a row. Returns
        how many segments the workers know (others' included)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        previous = None
        while True:
            self.check()
            samples = await self.scrape()
            known = [gauge(s, "cdp_segments_defined") for s in samples]
            state = None
            ready = all(gauge(s, "cdp_worker_ready") == 1 and known_segments(s).issuperset(ours) for s in samples)
            if ready and await _backfilled(self.run.redis, ours):
                state = (await group_state(self.run.settings, self.app_id)) if self.count > 1 else ("Stable", 1)
                if state == ("Stable", self.count) and previous == state:
                    return int(max(k or 0 for k in known))
                previous = state
            else:
                previous = None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"workers not ready after {READY_TIMEOUT_S:.0f}s (know {known} segments, group {state}):\n"
                    + "\n".join(c.tail(10) for c in self.children)
                )
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(c.stop) for c in self.children))


def known_segments(samples: dict) -> set[str]:
    """Segment ids a worker knows: those with a ``cdp_segment_transitions_total``
    series (created, at zero, when a segment arrives)."""
    return set(sample_by_label(samples, "cdp_segment_transitions_total", "segment"))


async def _backfilled(redis, ids: list[str]) -> bool:
    return not ids or all(v is not None for v in await redis.hmget(DONE_KEY, ids))


async def redis_memory(redis) -> Memory:
    """MEMORY USAGE of every key of the database, by kind, and its live profiles."""
    by_kind: dict[str, int] = {}
    keys = profiles = 0
    pending: list[str] = []
    metas: list[str] = []

    async def flush() -> None:
        nonlocal keys
        pipe = redis.pipeline(transaction=False)
        for key in pending:
            pipe.memory_usage(key, samples=0)
        for key, usage in zip(pending, await pipe.execute(raise_on_error=False)):
            if isinstance(usage, int):
                kind = key_kind(key)
                by_kind[kind] = by_kind.get(kind, 0) + usage
                keys += 1
        pending.clear()

    async for raw in redis.scan_iter(count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        pending.append(key)
        if key.startswith(PROFILE_KEY_PREFIX) and key.endswith("}:meta"):
            metas.append(key)
        if len(pending) >= MEMORY_BATCH:
            await flush()
    await flush()
    for start in range(0, len(metas), MEMORY_BATCH):
        pipe = redis.pipeline(transaction=False)
        for key in metas[start:start + MEMORY_BATCH]:
            pipe.hmget(key, "merged_into", "deleted")
        # Live: neither merged away nor a tombstone (a deleted profile, or one a
        # worker wiped after losing every claim of it to another worker).
        profiles += sum(1 for merged, deleted in await pipe.execute() if not merged and not deleted)
    return Memory(profiles, keys, by_kind)


def _memory_note(label: str, memory: Memory) -> str:
    kinds = sorted(memory.by_kind.items(), key=lambda kv: -kv[1])
    growth = (
        f"; INFO used_memory grew {memory.used_memory_growth / memory.profiles:,.0f} B per profile over the run "
        "(server-wide: other databases' writes meanwhile count too)"
    ) if memory.used_memory_growth is not None and memory.profiles else ""
    return (
        f"({label}) Redis memory: {memory.keys:,} keys, {memory.profiles:,} live profiles; bytes per profile by kind: "
        + ", ".join(f"{kind} {size / memory.profiles:,.0f}" for kind, size in kinds)
        + f"; total {memory.total:,.0f}, history {memory.history:,.0f}, besides history {memory.besides_history:,.0f}{growth}."
    )


def _redis_per_op(delta: dict, events: float) -> str:
    ops = sample_by_label(delta, "cdp_redis_call_duration_seconds_count", "op")
    return ", ".join(f"{op} {count / events:.4f}" for op, count in sorted(ops.items()) if count) or "none"


async def measure_workers(
    run: Run, row: Row, workers: int, segments: list, published: list[str], options: WholeOptions,
) -> None:
    """Start ``workers`` worker processes in one group; once they are ready, apply
    ``segments`` (their ids are added to ``published`` until they are deleted again,
    after the row) and wait until every worker knows them and they are back-filled;
    measure throughput (and CPU, Redis requests, memory), then latency at each rate.

    The segments are published once the workers run, not before: a worker starts
    the back-fills of all the segments it knows at once, and with more than ~100
    (ours and other sessions') redis-py's pool (100 connections) refuses some of
    them, again at each retry."""
    report: Report = run.report  # type: ignore[assignment]
    label = row.key
    ours = [s.id for s in segments]
    await run.redis.flushdb()
    used_before = int((await run.redis.info("memory"))["used_memory"])
    group = WorkerGroup(run, label, workers)
    others = await wait_for_quiet(run.settings, options.quiet_wait_s)
    await commit_group_at_end(run.settings, group.app_id, INBOUND)
    parts: list[Row] = []
    if workers > 1:
        for i in range(1, workers + 1):
            part = report.rows[f"{label}/{i}"] = Row(f"{label}/{i}", f"worker {i} of ({label})", part_of=label)
            parts.append(part)
    group.start()
    try:
        started = time.perf_counter()
        await group.wait_until_ready([])
        up_s = time.perf_counter() - started
        if segments:
            published.extend(ours)
            started = time.perf_counter()
            await seg.publish_all(run.settings, [(s.id, s.document) for s in segments])
            publish_s = time.perf_counter() - started
            known = await group.wait_until_ready(ours)
            report.note(
                f"({label}) workers ready {up_s:.1f} s after start; {len(ours)} segments published in {publish_s:.1f} s, "
                f"known and back-filled by all {time.perf_counter() - started:.1f} s after the first was sent."
            )
        else:
            known = await group.wait_until_ready([])
        # Requests made while idle (the window timer, health checks): a cost per
        # second, not per event, included in the figure per event below.
        idle, idle_started = await group.scrape(), time.perf_counter()
        await asyncio.sleep(IDLE_S)
        before = await group.scrape()
        idle_s = time.perf_counter() - idle_started
        idle_requests = [gauge(samples_delta(i, b), REQUESTS_GAUGE) for i, b in zip(idle, before)]
        cpu_before, redis_cpu_before = group.cpu(), await seg.redis_cpu(run.redis)
        started = time.perf_counter()
        await send_events(run.producer, run.inputs)
        produce_s = time.perf_counter() - started
        first: tuple[float, list[float]] | None = None
        deadline = time.monotonic() + run.throughput_timeout_s
        while True:
            group.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done after {run.throughput_timeout_s:.0f}s")
            samples = await group.scrape()
            now, done = time.perf_counter(), [seg.events_done(s) for s in samples]
            if first is None and sum(done) > 0:
                first = (now, done)
            if sum(done) >= len(run.inputs):
                break
            await asyncio.sleep(0.2)
        cpu_after, redis_cpu_after = group.cpu(), await seg.redis_cpu(run.redis)
        counted = sum(done) - sum(first[1])
        if counted < len(run.inputs) / 2:
            raise RuntimeError(f"the workers did {sum(first[1]):,.0f} of {len(run.inputs):,} events while they were produced")
        seconds = now - first[0]
        row.events_per_s = counted / seconds
        deltas = [samples_delta(b, a) for b, a in zip(before, samples)]
        events = [seg.events_done(d) for d in deltas]  # per worker, since just before the input was produced
        total = sum(events) or 1.0
        requests = [gauge(d, REQUESTS_GAUGE) for d in deltas]
        if all(r is not None for r in requests):
            row.redis_per_event = sum(requests) / total
        row.redis_declared_per_event = sum(sample_sum(d, "cdp_redis_call_duration_seconds_count") for d in deltas) / total
        cpu = [(a - b) if a is not None and b is not None else None for a, b in zip(cpu_after, cpu_before)]
        if all(c is not None for c in cpu):
            row.cpu_per_1000 = 1000 * sum(cpu) / total
        for i, part in enumerate(parts):
            part.events_per_s = (done[i] - first[1][i]) / seconds
            if cpu[i] is not None and events[i]:
                part.cpu_per_1000 = 1000 * cpu[i] / events[i]
            if requests[i] is not None and events[i]:
                part.redis_per_event = requests[i] / events[i]
                part.redis_declared_per_event = sample_sum(deltas[i], "cdp_redis_call_duration_seconds_count") / events[i]
        memory = await redis_memory(run.redis)
        memory.used_memory_growth = int((await run.redis.info("memory"))["used_memory"]) - used_before
        row.memory = memory
        merged = {k: sum(d.get(k, 0.0) for d in deltas) for k in set().union(*deltas)}
        changes = seg.transitions(merged)
        census = ""
        if ours:
            profiles, members, populated = await seg.memberships(run.redis, set(ours))
            census = (f"; after it, {members:,} memberships of our segments over {profiles:,} profiles with some, "
                      f"{populated} of our {len(ours)} segments with members")
        share = (" Events per worker: " + ", ".join(f"{e:,.0f}" for e in events) + ".") if workers > 1 else ""
        if all(r is not None for r in requests):
            share += (f" Redis requests: {sum(requests):,.0f} over the throughput run ({sum(requests) / (now - started):,.0f}/s)")
            if all(r is not None for r in idle_requests):
                share += f"; while idle just before it, {sum(idle_requests) / idle_s:,.0f}/s (window timer, health checks)"
            share += "."
        report.note(
            f"({label}) throughput: {workers} worker process{'es' if workers > 1 else ''}, knowing {known} segments "
            f"({known - len(ours)} of them not this benchmark's); "
            f"{sample_sum(merged, 'cdp_events_processed_total'):,.0f} processed + {sample_sum(merged, 'cdp_dead_letters_total'):,.0f} "
            f"dead-lettered of {len(run.inputs):,} (produced in {produce_s:.1f} s; clocked over {seconds:.1f} s from "
            f"{sum(first[1]):,.0f} done); {changes:,.0f} segment changes ({changes / total:.3f}/event){census}; "
            f"{sample_sum(merged, 'cdp_segment_expiry_checks_total'):,.0f} profiles re-evaluated by the expiry timer; "
            f"{_batch_note(merged)}; Redis round trips declared per event by op: {_redis_per_op(merged, total)}; "
            f"Redis server CPU {1000 * (redis_cpu_after - redis_cpu_before) / total:,.3f} s per 1,000 events.{share}"
        )
        report.note(_memory_note(label, memory))
        for rate in options.rates:
            await _worker_latency(run, row, group, rate, options)
        others += [g for g in await active_groups(run.settings, "streamcdp-bench-") if g not in others]
    finally:
        await group.stop()
        if segments:
            await seg.publish_all(run.settings, [(i, None) for i in ours])
            published[:] = [i for i in published if i not in set(ours)]
    if others:
        report.note(
            f"({label}) other consumer groups were active: {', '.join(others)}. Whatever reads cdp.events.* processed the "
            "bench's input too and shared the CPU (and, with these segments, may have published some of the changes first)."
        )


async def _worker_latency(run: Run, row: Row, group: WorkerGroup, rate: float, options: WholeOptions) -> None:
    report: Report = run.report  # type: ignore[assignment]
    label = row.key
    events = latency_events(rate, options.latency_seconds, options.seed)
    changes = Watch(run.settings, [SEGMENT_CHANGES], seg.cause_of, label_of=seg.segment_name_of(report.segment_names))
    resolved = Watch(run.settings, [RESOLVED], message_id_of)
    sustained = max(row.events_per_s or 100.0, 100.0)
    drain_s = 20.0 + 1.5 * len(events) / sustained
    before, cpu_before, wall = await group.scrape(), group.cpu(), time.perf_counter()
    offered = await offer(
        run.producer, events, rate, [changes, resolved], complete=resolved, drain_s=drain_s, settle_s=1.0, alive=group.alive,
    )
    wall = time.perf_counter() - wall
    after, cpu_after = await group.scrape(), group.cpu()
    to_change = latencies_ms(offered.arrived, changes.first, offered.ids)
    to_resolved = latencies_ms(offered.arrived, resolved.first, offered.ids)
    if not to_resolved:
        raise RuntimeError(f"no resolved record seen for the events offered at {rate:,.0f}/s")
    if to_change:
        row.latency[rate] = percentiles(to_change)
    missing = len(offered.ids) - len(to_resolved)
    total_changes = sum(changes.counts.values())
    achieved = len(offered.ids) / offered.seconds if offered.seconds else 0.0
    inside = [histogram_percentiles(b, a, "cdp_segment_change_latency_seconds") for b, a in zip(before, after)]
    busy = [(a - b) / wall for a, b in zip(cpu_after, cpu_before) if a is not None and b is not None]
    note = (
        f"({label}) latency at {rate:,.0f}/s: {len(offered.ids):,} events offered in {offered.seconds:.1f} s "
        f"({achieved:,.0f}/s achieved); resolved records seen for {len(to_resolved):,}"
        f"{f' ({missing:,} MISSING)' if missing else ''}, p50/p95/p99 {fmt_ms(percentiles(to_resolved))} ms; "
        f"{len(to_change):,} events caused {total_changes:,} segment changes"
        + (f", max {max(to_change):,.0f} ms to the first" if to_change else "")
        + (f"; {changes.others:,} other changes on the topic meanwhile (timers, other workers)" if changes.others else "")
        + "".join(
            f"; worker {i}'s own histogram (arrival to change acked) p50/p95/p99 {fmt_histogram_ms(p)} ms" for i, p in enumerate(inside, 1) if p
        )
        + (("; worker CPU busy " + ", ".join(f"{b:.0%}" for b in busy) + f" of the {wall:.0f} s") if busy else "")
        + "."
    )
    if changes.labels:
        top = sorted(changes.labels.items(), key=lambda kv: -kv[1])[:5]
        note += " Most changes (+ entered, - exited): " + ", ".join(f"{name} {n:,}" for name, n in top) + "."
    if row.events_per_s and row.events_per_s < rate:
        note += (f" The offered rate is more than these workers sustain ({row.events_per_s:,.0f}/s): they fall behind, "
                 "so this latency is mostly the backlog growing.")
    report.note(note)


# ---------------------------------------------------------------- the run


async def _step(row: Row, name: str, step) -> None:
    try:
        await step
    except (asyncio.TimeoutError, TimeoutError) as exc:
        row.error = f"{name}: timed out {exc}".strip()
    except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
        row.error = f"{name}: {type(exc).__name__}: {exc}"


async def run_all(options: WholeOptions) -> Report:
    base = Settings.from_env()
    settings = Settings.from_env(redis_url=with_db(base.redis_url, options.redis_db))
    report = Report()
    from streams.redis_client import connect

    redis = connect(settings.redis_url, health_check_interval=10)
    info = await redis.info("server")
    report.facts = machine_facts(f"{info['redis_version']} (CDP_BENCH_REDIS_DB={options.redis_db})")
    await ensure_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers(), acks="all", linger_ms=0, max_request_size=PRODUCER_MAX_REQUEST_BYTES
    )
    await producer.start()
    pipeline_options = Options(events=options.events, partitions=options.partitions, seed=options.seed, redis_db=options.redis_db)
    run = Run(pipeline_options, settings, Path(tempfile.mkdtemp(prefix="streamcdp-bench-whole-")), producer, redis, report)  # type: ignore[arg-type]
    published: list[str] = []
    try:
        stale = await seg.delete_stale(settings)
        if stale:
            report.note(f"Deleted {len(stale)} segments left behind by an earlier run that was killed.")
        computed = ComputedTraits.load(settings.computed_traits or None)

        def make_segments(label: str) -> list:
            """A fresh set of the benchmark's segments (new ids) for one row."""
            tag = f"{int(time.time())}-{run.run_id}{label}"
            made = [parse_segment(d, source="bench segment", computed=computed)
                    for d in seg.segment_documents(options.segments, tag)]
            report.segment_names.update({s.id: (s.name or s.id).removeprefix("bench: ") for s in made})
            return made

        segments = make_segments("")
        await create_topics(settings, run.own_topics, options.partitions)
        now_ms = int(time.time() * 1000)
        run.inputs = list(generate_events(
            options.events, seed=options.seed, start_ms=now_ms - int(options.events * DEFAULT_GAP_MS),
            bad_ratio=pipeline_options.bad_ratio,
        ))
        await send_events(producer, run.inputs, topic_of=run.input_topic)
        kinds: dict[str, int] = {}
        for _, value in run.inputs:
            kind = "malformed" if isinstance(value, bytes) else value.get("event") or value["type"]
            kinds[kind] = kinds.get(kind, 0) + 1
        report.note(
            f"Input: {len(run.inputs):,} generated events (seed {options.seed}): "
            + ", ".join(f"{k} {v / len(run.inputs):.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            + f"; the same events for every row's throughput; latency runs offer {options.latency_seconds:g} s of fresh "
            f"events at each rate. {len(segments)} segments from {len(seg.FAMILIES)} families (config/segments shapes, "
            f"browsers, traits), {sum(len(s.event_conditions()) for s in segments)} event conditions "
            f"({len({c.id for s in segments for c in s.event_conditions()})} distinct), "
            f"{sum(len(s.windowed_conditions()) for s in segments)} windowed."
        )
        a = report.rows["a"] = Row("a", "(a) raw aiokafka passthrough: getmany(500), send each, gather, commit per batch")
        await _step(a, "raw passthrough", measure_raw_throughput(run, a, options))
        b = report.rows["b"] = Row("b", "(b) bare faust agent, consume only, faust's own transport: take_events(500, within=0.01)")
        await _step(b, "bare faust agent", measure_faust(run, b, options))
        if not a.error:
            await _step(a, "raw passthrough latency", measure_raw_latency(run, a, options))
        if options.zero:
            zero = report.rows["w0"] = Row("w0", "(w0) streamcdp worker, batch transport, none of the benchmark's segments")
            await _step(zero, "worker[0]", measure_workers(run, zero, 1, [], published, options))
        for workers in options.workers:
            label = worker_label(len(segments), workers)
            shape = (f"({label}) streamcdp worker, batch transport, {len(segments)} segments" if workers == 1 else
                     f"({label}) {workers} streamcdp workers, one consumer group, {len(segments)} segments: total")
            row = report.rows[label] = Row(label, shape)
            ours = segments if workers == options.workers[0] else make_segments(f"x{workers}")
            await _step(row, f"workers[{workers}]", measure_workers(run, row, workers, ours, published, options))
        report.note(f"Machine {load_average()} at the end.")
    finally:
        with contextlib.suppress(Exception):
            # Shielded: a second cancellation must not leave the segments behind.
            if published:
                await asyncio.shield(seg.publish_all(settings, [(i, None) for i in published]))
        Child.stop_all()
        await producer.stop()
        await delete_topics(settings, run.own_topics + [f"{app}-__assignor-__leader" for app in run.faust_apps])
        await delete_groups(settings, run.groups)
        await redis.flushdb()
        await redis.aclose()
        shutil.rmtree(run.workdir, ignore_errors=True)
    return report


# ---------------------------------------------------------------- command line


def _numbers(kind: Callable[[str], float | int]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError("a comma-separated list of positive numbers")
        return values

    return parse


def parser(prog: str = "python -m bench.whole") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = WholeOptions()
    p.add_argument("--events", type=int, default=d.events, help=f"throughput input events (default {d.events:,})")
    p.add_argument("--segments", type=int, default=d.segments, help=f"segments applied (default {d.segments})")
    p.add_argument("--rates", type=_numbers(float), default=d.rates,
                   help="offered rates of the latency runs, events/s, comma-separated (default 1000,5000)")
    p.add_argument("--latency-seconds", type=float, default=d.latency_seconds,
                   help=f"length of each latency run (default {d.latency_seconds:g})")
    p.add_argument("--workers", type=_numbers(int), default=d.workers,
                   help="worker processes per group, one row each, comma-separated (default 1,2)")
    p.add_argument("--zero", action="store_true", help="also a row for one worker with none of the benchmark's segments")
    p.add_argument("--partitions", type=int, default=d.partitions, help="partitions of the bench input topics of (a), (b)")
    p.add_argument("--seed", type=int, default=d.seed, help="generator seed (default 0)")
    p.add_argument("--redis-db", type=int, default=int(os.environ.get("CDP_BENCH_REDIS_DB", d.redis_db)),
                   help="Redis database the workers use; flushed (default CDP_BENCH_REDIS_DB or 14)")
    p.add_argument("--quiet-wait", type=float, default=d.quiet_wait_s,
                   help=f"seconds to wait for other consumer groups to go idle before each worker row (default {d.quiet_wait_s:g})")


def options_from(args: argparse.Namespace) -> WholeOptions:
    return WholeOptions(
        events=args.events, segments=args.segments, rates=tuple(args.rates), latency_seconds=args.latency_seconds,
        workers=tuple(dict.fromkeys(args.workers)), zero=args.zero, partitions=args.partitions, seed=args.seed,
        redis_db=args.redis_db, quiet_wait_s=args.quiet_wait,
    )


def check(options: WholeOptions) -> str | None:
    """Why these options cannot run, or None."""
    if options.events < 1000:
        return "--events must be >= 1000"
    if options.latency_seconds <= 0:
        return "--latency-seconds must be > 0"
    if not 1 <= options.segments <= 999:
        return "--segments must be 1..999"
    return None


async def _main(options: WholeOptions) -> Report:
    task = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_all(options)


def run(options: WholeOptions, prog: str = "bench.whole") -> tuple[int, Report | None]:
    """Run and print the table; (exit code, report)."""
    import uvloop

    # aiokafka logs retried, harmless hiccups (NotLeaderForPartition on a topic just
    # created) as warnings; the table is the output.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(_main(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{prog}: interrupted; workers stopped, segments deleted, bench topics deleted", file=sys.stderr)
        return 130, None
    finally:
        Child.stop_all()
    print(render(report, options, time.monotonic() - started), flush=True)
    return (1 if report.failed else 0), report


def main(argv: list[str] | None = None, prog: str = "python -m bench.whole") -> int:
    args = parser(prog).parse_args(argv)
    options = options_from(args)
    problem = check(options)
    if problem:
        print(f"{prog}: {problem}", file=sys.stderr)
        return 2
    return run(options, prog)[0]


if __name__ == "__main__":
    sys.exit(main())
