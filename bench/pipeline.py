"""``python -m bench.pipeline``: the hot path's throughput and latency, shape by shape, beside its baselines, in one run.

All shapes read the same generated input (``--events`` events, about 600 bytes each,
1% malformed), pre-produced before each throughput measurement, on the same broker:

a. raw aiokafka passthrough: ``getmany`` + ``send`` per record + ``gather``, commit
   per batch (the ceiling of any consume-produce loop in Python here);
b. a bare faust agent that only consumes, on faust's own transport (``kafka://``),
   ``take_events(500, within=0.01)``, in its own process (faust's per-record ceiling);
b'. the same bare agent on streamcdp's batch transport (``kafka+batch://``): one
   message per partition fetch (the transport's own ceiling);
c. ``Pipeline.handle`` driven by a plain aiokafka ``getmany`` loop, commit per batch;
d. the real worker, ``python -m streamcdp.cli worker``, in its own process, on
   faust's own transport (``CDP_KAFKA_TRANSPORT=faust``);
e. the same worker on the batch transport (``CDP_KAFKA_TRANSPORT=batch``, the default).

Throughput clocks start when the first batch is in hand; for (d) and (e), events
done (processed + dead-lettered) per second between the first and the last poll of
the worker's /metrics. Latency (a, d, e): fresh events offered at ``--rate``
events/s for ``--latency-seconds``, from just before each is handed to the producer
until its output is read by a consumer here.

Exits 0 when every measurement completed, 1 when one failed (its row says why), 130
on Ctrl-C (child processes, topics and the bench Redis database are cleaned up).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from prometheus_client import generate_latest

from agents.pipeline import Pipeline
from bench.common import (
    Child,
    Watch,
    active_groups,
    assign_at_end,
    commit_group_at_end,
    consumer,
    create_topics,
    delete_groups,
    faust_env,
    histogram_percentiles,
    latencies_ms,
    load_average,
    machine_facts,
    message_id_of,
    offer,
    partitions_of,
    percentiles,
    prometheus_samples,
    sample_sum,
    scrape,
    wait_for_quiet,
    with_db,
)
from streamcdp.generate import DEFAULT_GAP_MS, encode, generate_events, inbound_topic, send_events
from streams.metrics import Metrics
from streams.redis_client import HiredisConnection, connect
from streams.output import AiokafkaProducer
from streams.records import OutboundMessage, Record
from streams.settings import Settings
from streams.topics import DEAD_LETTER, INBOUND, PRODUCER_MAX_REQUEST_BYTES, RESOLVED, delete_topics, ensure_topics

CHANNELS = ("web", "app", "pos")


@dataclass
class Options:
    events: int = 50_000
    rate: float = 1000.0
    latency_seconds: float = 10.0
    partitions: int = 8
    bad_ratio: float = 0.01
    seed: int = 0
    redis_db: int = 14
    quiet_wait_s: float = 60.0  # how long (d), (e) wait for other consumer groups to go idle


@dataclass
class Row:
    shape: str
    events_per_s: float | None = None
    redis_per_event: float | None = None
    redis_per_batch: float | None = None
    latency_ms: list[float] | None = None
    error: str | None = None


@dataclass
class Report:
    facts: list[tuple[str, str]] = field(default_factory=list)
    rows: dict[str, Row] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(r.error for r in self.rows.values())


@dataclass
class Run:
    """One benchmark run: its settings, names and shared clients."""

    options: Options
    settings: Settings
    workdir: Path
    producer: AIOKafkaProducer
    redis: aioredis.Redis
    report: Report
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    inputs: list = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    faust_apps: list[str] = field(default_factory=list)

    def topic(self, name: str) -> str:
        return f"bench.{self.run_id}.{name}"

    def input_topic(self, channel: str) -> str:
        return self.topic(f"in.{channel}")

    @property
    def input_topics(self) -> list[str]:
        return [self.input_topic(c) for c in CHANNELS]

    @property
    def own_topics(self) -> list[str]:
        return self.input_topics + [self.topic(n) for n in ("out.passthrough", "out.pipeline", "dead-letter", "out.other")]

    def group(self, name: str) -> str:
        group = f"streamcdp-bench-{self.run_id}-{name}"
        self.groups.append(group)
        return group

    @property
    def throughput_timeout_s(self) -> float:
        return 60 + self.options.events / 500


async def run_all(options: Options) -> Report:
    base = Settings.from_env()
    settings = Settings.from_env(redis_url=with_db(base.redis_url, options.redis_db))
    report = Report()
    redis = connect(settings.redis_url, health_check_interval=10)
    info = await redis.info("server")
    report.facts = machine_facts(f"{info['redis_version']} (CDP_BENCH_REDIS_DB={options.redis_db})")
    await ensure_topics(settings)  # the worker's topics, for (d)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers(), acks="all", linger_ms=0, max_request_size=PRODUCER_MAX_REQUEST_BYTES
    )
    await producer.start()
    run = Run(options, settings, Path(tempfile.mkdtemp(prefix="streamcdp-bench-")), producer, redis, report)
    try:
        await create_topics(settings, run.own_topics, options.partitions)
        now_ms = int(time.time() * 1000)
        run.inputs = list(
            generate_events(
                options.events, seed=options.seed, start_ms=now_ms - int(options.events * DEFAULT_GAP_MS), bad_ratio=options.bad_ratio
            )
        )
        sizes = [len(encode(v)) for _, v in run.inputs]
        started = time.perf_counter()
        await send_events(producer, run.inputs, topic_of=run.input_topic)
        produce_rate = len(run.inputs) / (time.perf_counter() - started)
        malformed = sum(1 for _, v in run.inputs if isinstance(v, bytes))
        report.notes.append(
            f"Input: {len(run.inputs):,} generated events (seed {options.seed}), mean {sum(sizes) / len(sizes):.0f} B, "
            f"{malformed} malformed; 3 channel topics x {options.partitions} partitions; "
            f"pre-produced by one aiokafka producer at {produce_rate:,.0f} events/s."
        )
        await _measure(run, "a", "(a) raw aiokafka passthrough: getmany(500) + send each + gather, commit per batch", raw_passthrough)
        await _measure(
            run, "b", "(b) bare faust agent, consume only, faust's own transport (kafka://): take_events(500, within=0.01)",
            faust_consume_only("faust"),
        )
        await _measure(
            run, "b'", "(b') bare faust agent, consume only, batch transport (kafka+batch://): one message per fetch",
            faust_consume_only("batch"),
        )
        await _measure(run, "c", "(c) streamcdp Pipeline.handle in a plain aiokafka getmany(500) loop, commit per batch", pipeline_loop)
        await _measure(
            run, "d", "(d) streamcdp worker, faust's own transport (kafka://, take_events), own process", real_worker("faust")
        )
        await _measure(run, "e", "(e) streamcdp worker, batch transport (kafka+batch://, the default), own process", real_worker("batch"))
        await _measure(run, "a", None, raw_passthrough_latency)
        _targets(run.report)
        report.notes.append(f"Machine {load_average()} at the end.")
    finally:
        Child.stop_all()
        await producer.stop()
        await delete_topics(settings, run.own_topics + [f"{app}-__assignor-__leader" for app in run.faust_apps])
        await delete_groups(settings, run.groups)
        await redis.flushdb()
        await redis.aclose()
        shutil.rmtree(run.workdir, ignore_errors=True)
    return report


async def _measure(run: Run, key: str, shape: str | None, step: Callable[[Run, Row], Awaitable[None]]) -> None:
    row = run.report.rows.setdefault(key, Row(shape or key))
    try:
        await step(run, row)
    except (asyncio.TimeoutError, TimeoutError) as exc:
        row.error = f"{step.__name__}: timed out {exc}".strip()
    except Exception as exc:  # noqa: BLE001 - one broken shape must not hide the others
        row.error = f"{step.__name__}: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- a plain aiokafka loop


BatchHandler = Callable[[dict], Awaitable[int]]


async def consume_loop(c, handle: BatchHandler, *, batch_max: int, count: int | None) -> tuple[int, float]:
    """getmany → ``handle`` → commit the batch, until ``count`` events (or cancelled).

    Returns the events handled and the seconds from the first batch in hand to the end.
    """
    handled = 0
    first = 0.0
    while count is None or handled < count:
        fetched = await c.getmany(timeout_ms=500, max_records=batch_max)
        if not fetched:
            continue
        if not first:
            first = time.perf_counter()
        handled += await handle(fetched)
        await c.commit({tp: records[-1].offset + 1 for tp, records in fetched.items()})
    return handled, time.perf_counter() - first


def passthrough(producer: AIOKafkaProducer, out_topic: str) -> BatchHandler:
    async def handle(fetched: dict) -> int:
        futures = [await producer.send(out_topic, r.value, key=r.key) for records in fetched.values() for r in records]
        await asyncio.gather(*futures)
        return len(futures)

    return handle


async def _input_consumer(run: Run, group: str, *, at_end: bool = False):
    c = consumer(run.settings, group, fetch_max_wait_ms=100)
    await c.start()
    partitions = await partitions_of(run.settings, run.input_topics)
    if at_end:
        await assign_at_end(c, partitions)
    else:
        c.assign(partitions)
    return c


async def raw_passthrough(run: Run, row: Row) -> None:
    c = await _input_consumer(run, run.group("passthrough"))
    try:
        loop = consume_loop(c, passthrough(run.producer, run.topic("out.passthrough")), batch_max=500, count=len(run.inputs))
        handled, seconds = await asyncio.wait_for(loop, run.throughput_timeout_s)
    finally:
        await c.stop()
    row.events_per_s = handled / seconds
    row.redis_per_event = 0.0


class _Redirect:
    """Sends the pipeline's outputs to this run's own topics instead of the product's."""

    def __init__(self, inner: AiokafkaProducer, topics: dict[str, str], other: str) -> None:
        self._inner = inner
        self._topics = topics
        self._other = other

    async def enqueue(self, message: OutboundMessage):
        return await self._inner.enqueue(replace(message, topic=self._topics.get(message.topic, self._other)))


class _CountingConnection(HiredisConnection):
    """Counts socket writes: one per command sent alone, one per pipeline."""

    writes = 0

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        _CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


async def pipeline_loop(run: Run, row: Row) -> None:
    await run.redis.flushdb()
    metrics = Metrics()
    outputs = _Redirect(
        AiokafkaProducer(run.producer),
        {RESOLVED: run.topic("out.pipeline"), DEAD_LETTER: run.topic("dead-letter")},
        run.topic("out.other"),
    )
    redis = connect(run.settings.redis_url, health_check_interval=10, connection_class=_CountingConnection)
    pipeline = Pipeline(run.settings, redis, outputs, metrics)
    totals = {"processed": 0, "dead_lettered": 0, "resent": 0}

    async def handle(fetched: dict) -> int:
        batch = [Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for rs in fetched.values() for r in rs]
        result = await pipeline.handle_safely(batch)
        for name in totals:
            totals[name] += getattr(result, name)
        return len(batch)

    c = await _input_consumer(run, run.group("pipeline"))
    try:
        loop = consume_loop(c, handle, batch_max=run.settings.batch_max, count=len(run.inputs))
        handled, seconds = await asyncio.wait_for(loop, run.throughput_timeout_s)
    finally:
        await c.stop()
        await redis.aclose()
    row.events_per_s = handled / seconds
    samples = prometheus_samples(generate_latest(metrics.registry).decode())
    _redis_figures(row, samples)
    batches = sample_sum(samples, "cdp_batch_size_events_count") or 1
    run.report.notes.append(
        f"(c) check: {totals['processed']:,} processed + {totals['dead_lettered']:,} dead-lettered "
        f"(+ {totals['resent']} resent) of {handled:,} input; {_batch_note(samples)}; Redis socket writes "
        f"(commands or pipelines sent, connection set-up included) {_CountingConnection.writes / handled:.4f}/event, "
        f"{_CountingConnection.writes / batches:.1f}/batch."
    )


def _redis_figures(row: Row, samples: dict) -> None:
    round_trips = sample_sum(samples, "cdp_redis_call_duration_seconds_count")
    events = sample_sum(samples, "cdp_batch_size_events_sum")
    batches = sample_sum(samples, "cdp_batch_size_events_count")
    if events:
        row.redis_per_event = round_trips / events
    if batches:
        row.redis_per_batch = round_trips / batches


def _batch_note(samples: dict) -> str:
    """Batches, their mean size, and the mean time of each stage per batch."""
    events = sample_sum(samples, "cdp_batch_size_events_sum")
    batches = sample_sum(samples, "cdp_batch_size_events_count")
    if not batches:
        return "no batches"
    stages = [
        f"{dict(labels)['stage']} {1000 * value / batches:.1f}"
        for (name, labels), value in samples.items()
        if name == "cdp_stage_duration_seconds_sum"
    ]
    return f"{batches:,.0f} batches, mean {events / batches:.0f} events, ms per batch: {', '.join(stages)}"


# ---------------------------------------------------------------- faust, in child processes


def faust_consume_only(transport: str) -> Callable[[Run, Row], Awaitable[None]]:
    """(b) with ``transport`` ``faust``, (b') with ``batch``."""

    async def step(run: Run, row: Row) -> None:
        await _faust_consume_only(run, row, transport)

    step.__name__ = f"faust_consume_only[{transport}]"
    return step


class BareAgent:
    """``bench.faust_consume`` in a child process on the run's input topics: its
    throughput over the run's input, then (``latency_phases``) its consumption
    latency over each of the next phases of events."""

    def __init__(self, run: Run, transport: str, latency_phases: tuple[int, ...] = ()) -> None:
        self.run = run
        app_id = run.group(f"faust-consume-{transport}")
        run.faust_apps.append(app_id)
        self.result = run.workdir / f"faust-consume-{transport}.json"
        self.child = Child(
            [sys.executable, "-m", "bench.faust_consume", "--topics", ",".join(run.input_topics),
             "--count", str(len(run.inputs)), "--result", str(self.result),
             "--latency-phases", ",".join(str(n) for n in latency_phases)],
            faust_env(run.settings, app_id, CDP_KAFKA_TRANSPORT=transport),
            run.workdir / f"faust-consume-{transport}.log",
            run.workdir,
        )

    async def _read(self, path: Path, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if not self.child.alive():
                raise RuntimeError(f"exited with {self.child.process.returncode}:\n{self.child.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {path.name} after {timeout_s:.0f}s:\n{self.child.tail()}")
            await asyncio.sleep(0.1)
        return orjson.loads(path.read_bytes())

    async def throughput(self) -> dict:
        """``{"events", "seconds", "batches", "cpu_seconds"}`` over the run's input."""
        return await self._read(self.result, self.run.throughput_timeout_s)

    async def latency(self, phase: int, timeout_s: float) -> dict:
        """``{"events", "latency_ms", "max_ms"}`` of phase ``phase`` (from 1)."""
        return await self._read(Path(f"{self.result}.latency{phase}"), timeout_s)

    async def stop(self) -> None:
        await asyncio.to_thread(self.child.stop)


async def _faust_consume_only(run: Run, row: Row, transport: str) -> None:
    agent = BareAgent(run, transport)
    try:
        measured = await agent.throughput()
    finally:
        await agent.stop()
    row.events_per_s = measured["events"] / measured["seconds"]
    row.redis_per_event = 0.0


def real_worker(transport: str) -> Callable[[Run, Row], Awaitable[None]]:
    """(d) with ``transport`` ``faust``, (e) with ``batch``."""
    label = {"faust": "d", "batch": "e"}[transport]

    async def step(run: Run, row: Row) -> None:
        await _real_worker(run, row, transport, label)

    step.__name__ = f"real_worker[{transport}]"
    return step


async def _real_worker(run: Run, row: Row, transport: str, label: str) -> None:
    """(d)/(e) throughput, then latency at the offered rate, with one worker process.

    The worker reads the product's input topics, where another worker (a test
    session's, say) may read the same records and publish resolved records for them
    too. So throughput comes from the bench worker's own /metrics (events done:
    processed + dead-lettered), polled; latency is measured outside (first resolved
    record per messageId) and, as a cross-check, from the worker's own
    ``cdp_event_latency_seconds`` histogram.
    """
    await run.redis.flushdb()
    app_id = run.group(f"worker-{transport}")
    run.faust_apps.append(app_id)
    others = await wait_for_quiet(run.settings, run.options.quiet_wait_s)
    await commit_group_at_end(run.settings, app_id, INBOUND)
    await send_events(run.producer, run.inputs)
    env = faust_env(run.settings, app_id, CDP_KAFKA_TRANSPORT=transport)
    metrics_url = f"http://127.0.0.1:{env['CDP_WEB_PORT']}/metrics"
    worker = Child([sys.executable, "-m", "streamcdp.cli", "worker"], env, run.workdir / f"worker-{transport}.log", run.workdir)
    try:
        first: tuple[float, float] | None = None
        deadline = time.monotonic() + run.throughput_timeout_s
        while True:
            if not worker.alive():
                raise RuntimeError(f"the worker exited with {worker.process.returncode}:\n{worker.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done after {run.throughput_timeout_s:.0f}s:\n{worker.tail()}")
            samples = await scrape(metrics_url)
            now = time.perf_counter()
            done = sample_sum(samples, "cdp_events_processed_total") + sample_sum(samples, "cdp_dead_letters_total")
            if done and first is None:
                first = (now, done)
            if done >= len(run.inputs):
                break
            await asyncio.sleep(0.2)
        row.events_per_s = (done - first[1]) / (now - first[0])
        _redis_figures(row, samples)
        run.report.notes.append(
            f"({label}) check, the worker's /metrics: {sample_sum(samples, 'cdp_events_processed_total'):,.0f} processed + "
            f"{sample_sum(samples, 'cdp_dead_letters_total'):,.0f} dead-lettered of {len(run.inputs):,} input "
            f"({sample_sum(samples, 'cdp_events_duplicate_total'):,.0f} duplicates); {_batch_note(samples)}; "
            "events/s from polling it every 0.2 s."
        )
        before = samples
        row.latency_ms = await offered_load(
            run, latency_events(run.options), RESOLVED, inbound_topic, message_id_of, label=label, alive=worker.alive
        )
        after = await scrape(metrics_url)
        inside = histogram_percentiles(before, after, "cdp_event_latency_seconds")
        if inside:
            during = {key: value - before.get(key, 0.0) for key, value in after.items()}
            commits = histogram_percentiles({}, after, "cdp_kafka_commit_seconds")
            commit_note = (
                f"; offset commits over the whole run: {sample_sum(after, 'cdp_kafka_commit_seconds_count'):,.0f}, "
                "p50/p99 " + " / ".join(f"{v:.1f}" for v in commits[::2]) + " ms"
            ) if commits else ""
            run.report.notes.append(
                f"({label}) latency inside the worker (record timestamp to outputs acked, its histogram's buckets "
                "interpolated): p50/p95/p99 " + " / ".join(f"{v:.1f}" for v in inside) + " ms; "
                f"during the latency run: {_batch_note(during)}{commit_note}."
            )
        others += [g for g in await active_groups(run.settings, "streamcdp-bench-") if g not in others]
    finally:
        await asyncio.to_thread(worker.stop)
    if others:
        run.report.notes.append(
            f"({label}) other consumer groups were active: {', '.join(others)}. Whatever reads cdp.events.* processed "
            "the bench's input too, shared the CPU, and may have published the first resolved record of some "
            "latency events."
        )


def _targets(report: Report) -> None:
    """Issue 13's targets: the worker on the batch transport (e) at least 25% of the
    raw passthrough (a) and at least 2x the bare faust agent (b); p99 < 100 ms at
    the offered rate."""
    rows = report.rows
    e, a, b = (rows.get(k) for k in ("e", "a", "b"))
    if not (e and e.events_per_s and a and a.events_per_s and b and b.events_per_s):
        return
    vs_a, vs_b = e.events_per_s / a.events_per_s, e.events_per_s / b.events_per_s
    verdict = [
        f"(e)/(a) = {vs_a:.2f} (target >= 0.25: {'met' if vs_a >= 0.25 else 'NOT met'})",
        f"(e)/(b) = {vs_b:.2f} (target >= 2: {'met' if vs_b >= 2 else 'NOT met'})",
    ]
    if e.latency_ms:
        verdict.append(f"(e) p99 {e.latency_ms[2]:.1f} ms (target < 100: {'met' if e.latency_ms[2] < 100 else 'NOT met'})")
    d = rows.get("d")
    if d and d.events_per_s:
        verdict.append(f"(e)/(d) = {e.events_per_s / d.events_per_s:.2f}")
    report.notes.append("Targets: " + "; ".join(verdict) + ".")


# ---------------------------------------------------------------- latency


async def raw_passthrough_latency(run: Run, row: Row) -> None:
    c = await _input_consumer(run, run.group("passthrough-latency"), at_end=True)
    out = run.topic("out.passthrough")
    loop = asyncio.create_task(consume_loop(c, passthrough(run.producer, out), batch_max=500, count=None))
    try:
        row.latency_ms = await offered_load(
            run, latency_events(run.options), out, run.input_topic, message_id_of, label="a", alive=lambda: not loop.done()
        )
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await c.stop()


def latency_events(options: Options) -> list:
    """Fresh events (new message ids, the same people) for one latency run."""
    count = int(options.rate * options.latency_seconds)
    return list(generate_events(count, seed=options.seed, start_ms=int(time.time() * 1000), mean_gap_ms=1000 / options.rate))


async def offered_load(
    run: Run, events: list, output_topic: str, topic_of: Callable[[str], str], key_of: Callable,
    *, label: str, alive: Callable[[], bool],
) -> list[float]:
    """Offer ``events`` at ``rate``; p50/p95/p99 in ms from just before each send to
    its output (``key_of(record)`` = its messageId) being read here."""
    options = run.options
    watch = Watch(run.settings, [output_topic], key_of)
    offered = await offer(run.producer, events, options.rate, [watch], topic_of=topic_of, drain_s=15.0, alive=alive)
    latencies = latencies_ms(offered.sent_at, watch.first, offered.ids)
    if not latencies:
        raise RuntimeError("no output seen for the offered events")
    missing = len(offered.ids) - len(latencies)
    run.report.notes.append(
        f"({label}) latency: {len(offered.ids):,} events offered at {options.rate:,.0f}/s for {options.latency_seconds:.0f}s; "
        f"{len(latencies):,} outputs seen{f', {missing} MISSING' if missing else ''}; max {max(latencies):.1f} ms."
    )
    return percentiles(latencies)


# ---------------------------------------------------------------- the report


COLUMNS = ("shape", "events/s", "vs raw passthrough (a)", "vs bare faust (b)", "Redis round trips/event", "p50/p95/p99 ms at {rate}/s")


def render(report: Report, options: Options, seconds: float) -> str:
    lines = ["streamcdp hot path, shape by shape (bench.pipeline)", ""]
    lines += [f"  {name:<10} {value}" for name, value in report.facts]
    lines.append("")
    header = [c.format(rate=f"{options.rate:,.0f}") for c in COLUMNS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    baseline, faust = report.rows.get("a"), report.rows.get("b")
    for row in report.rows.values():
        lines.append("| " + " | ".join(_cells(row, baseline, faust)) + " |")
    lines.append("")
    lines += [f"- {note}" for note in report.notes]
    lines += [f"- {row.shape}: FAILED: {row.error}" for row in report.rows.values() if row.error]
    lines.append(f"- Total bench time {seconds:.0f} s.")
    return "\n".join(lines)


def _ratio(row: Row, baseline: Row | None) -> str:
    if row.events_per_s and baseline is not None and baseline.events_per_s:
        return f"{row.events_per_s / baseline.events_per_s:.2f}×"
    return "—"


def _cells(row: Row, baseline: Row | None, faust: Row | None) -> list[str]:
    rate = f"{row.events_per_s:,.0f}" if row.events_per_s else ("failed" if row.error else "—")
    if row.redis_per_event is None:
        redis = "—"
    elif row.redis_per_event == 0:
        redis = "0"
    else:
        redis = f"{row.redis_per_event:.4f}"
        if row.redis_per_batch:
            redis += f" ({row.redis_per_batch:.1f}/batch)"
    latency = " / ".join(f"{v:.1f}" for v in row.latency_ms) if row.latency_ms else "—"
    return [row.shape, rate, _ratio(row, baseline), _ratio(row, faust), redis, latency]


def _parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=defaults.events, help=f"input events (default {defaults.events:,})")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="offered rate of the latency runs, events/s (default 1000)")
    parser.add_argument("--latency-seconds", type=float, default=defaults.latency_seconds, help="length of each latency run (default 10)")
    parser.add_argument("--partitions", type=int, default=defaults.partitions, help="partitions of each bench input topic (default 8)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed (default 0)")
    parser.add_argument("--quiet-wait", type=float, default=defaults.quiet_wait_s,
                        help=f"seconds (d) and (e) wait for other consumer groups to go idle (default {defaults.quiet_wait_s:.0f})")
    parser.add_argument(
        "--redis-db", type=int, default=int(os.environ.get("CDP_BENCH_REDIS_DB", defaults.redis_db)),
        help="Redis database the benchmarks use and flush (default CDP_BENCH_REDIS_DB or 14)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = _parser().parse_args(argv)
    if args.events < 1000 or args.rate <= 0 or args.latency_seconds <= 0:
        print("bench.pipeline: --events must be >= 1000, --rate and --latency-seconds > 0", file=sys.stderr)
        return 2
    options = Options(
        events=args.events, rate=args.rate, latency_seconds=args.latency_seconds,
        partitions=args.partitions, seed=args.seed, redis_db=args.redis_db, quiet_wait_s=args.quiet_wait,
    )
    # aiokafka logs retried, harmless hiccups (NotLeaderForPartition on a topic just
    # created) as warnings; the table is the output.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(run_all(options))
    except KeyboardInterrupt:
        print("bench.pipeline: interrupted; child processes stopped, bench topics deleted", file=sys.stderr)
        return 130
    finally:
        Child.stop_all()
    print(render(report, options, time.monotonic() - started), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
