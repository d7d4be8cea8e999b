"""The hot path's throughput and latency, beside its baselines, in one run.

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
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from prometheus_client import generate_latest

from agents.pipeline import Pipeline
from bench.common import (
    Child,
    Collector,
    active_groups,
    assign_at_end,
    child_env,
    commit_group_at_end,
    consumer,
    create_topics,
    delete_groups,
    delete_topics,
    free_port,
    http_get,
    load_average,
    machine_facts,
    message_id_of,
    partitions_of,
    percentiles,
    prometheus_samples,
    sample_sum,
)
from streamcdp.generate import DEFAULT_GAP_MS, encode, generate_events, inbound_topic, send_events
from streams.metrics import Metrics
from streams.redis_client import HiredisConnection, connect
from streams.output import AiokafkaProducer
from streams.records import OutboundMessage, Record
from streams.settings import Settings
from streams.topics import DEAD_LETTER, INBOUND, PRODUCER_MAX_REQUEST_BYTES, RESOLVED, ensure_topics

CHANNELS = ("web", "app", "pos")
# How long (d) waits for other consumer groups on the broker to go idle first.
QUIET_WAIT_S = 60.0


@dataclass
class Options:
    events: int = 50_000
    rate: float = 1000.0
    latency_seconds: float = 10.0
    partitions: int = 8
    bad_ratio: float = 0.01
    seed: int = 0
    redis_db: int = 14


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


def _with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


async def run_all(options: Options) -> Report:
    base = Settings.from_env()
    settings = Settings.from_env(redis_url=_with_db(base.redis_url, options.redis_db))
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


async def _faust_consume_only(run: Run, row: Row, transport: str) -> None:
    app_id = run.group(f"faust-consume-{transport}")
    run.faust_apps.append(app_id)
    result = run.workdir / f"faust-consume-{transport}.json"
    child = Child(
        [sys.executable, "-m", "bench.faust_consume", "--topics", ",".join(run.input_topics),
         "--count", str(len(run.inputs)), "--result", str(result)],
        _faust_env(run, app_id, CDP_KAFKA_TRANSPORT=transport),
        run.workdir / f"faust-consume-{transport}.log",
        run.workdir,
    )
    try:
        deadline = time.monotonic() + run.throughput_timeout_s
        while not result.exists():
            if not child.alive():
                raise RuntimeError(f"exited with {child.process.returncode}:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result after {run.throughput_timeout_s:.0f}s:\n{child.tail()}")
            await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(child.stop)
    measured = orjson.loads(result.read_bytes())
    row.events_per_s = measured["events"] / measured["seconds"]
    row.redis_per_event = 0.0


def _faust_env(run: Run, app_id: str, **extra: str) -> dict[str, str]:
    return child_env(
        **extra,
        CDP_KAFKA_BOOTSTRAP=run.settings.kafka_bootstrap,
        CDP_REDIS_URL=run.settings.redis_url,
        CDP_APP_ID=app_id,
        CDP_WEB_PORT=str(free_port()),
        CDP_WEB_HOST="127.0.0.1",
        CDP_LOG_FORMAT="json",
    )


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
    others = await _wait_for_quiet(run.settings, QUIET_WAIT_S)
    await commit_group_at_end(run.settings, app_id, INBOUND)
    await send_events(run.producer, run.inputs)
    env = _faust_env(run, app_id, CDP_KAFKA_TRANSPORT=transport)
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
            samples = await _scrape(metrics_url)
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
        after = await _scrape(metrics_url)
        inside = _histogram_percentiles(before, after, "cdp_event_latency_seconds")
        if inside:
            during = {key: value - before.get(key, 0.0) for key, value in after.items()}
            commits = _histogram_percentiles({}, after, "cdp_kafka_commit_seconds")
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


async def _wait_for_quiet(settings: Settings, timeout_s: float) -> list[str]:
    """Give other consumer groups (test sessions' workers) up to ``timeout_s`` to go
    idle, since they would get (d)'s input too; return those still active."""
    deadline = time.monotonic() + timeout_s
    while True:
        others = await active_groups(settings, "streamcdp-bench-")
        if not others or time.monotonic() > deadline:
            return others
        await asyncio.sleep(2.0)


async def _scrape(url: str) -> dict:
    status, body = await asyncio.to_thread(http_get, url, 2.0)
    return prometheus_samples(body.decode()) if status == 200 else {}


def _histogram_percentiles(before: dict, after: dict, name: str, qs=(50, 95, 99)) -> list[float] | None:
    """Percentiles (ms) of the observations made between two scrapes, linear within buckets."""
    buckets = sorted(
        (float(dict(labels)["le"]), value - before.get((n, labels), 0.0))
        for (n, labels), value in after.items()
        if n == name + "_bucket"
    )
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    found = []
    for q in qs:
        rank = total * q / 100
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if bound == float("inf"):
                    found.append(lower_bound * 1000)
                else:
                    share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
                    found.append((lower_bound + share * (bound - lower_bound)) * 1000)
                break
            lower_bound, lower_count = bound, count
    return found


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
    ids = [v["messageId"] for _, v in events]
    sent: dict[str, float] = {}
    in_order = iter(ids)
    collector = Collector(run.settings, [output_topic], key_of)
    collector.expected = set(ids)
    await collector.start()
    try:
        await send_events(
            run.producer, events, topic_of=topic_of, rate=options.rate, on_ack=lambda _, at: sent.__setitem__(next(in_order), at)
        )
        await collector.wait_for(len(ids), 15.0, alive=alive)
    finally:
        await collector.stop()
    latencies = [(collector.seen[k][0] - sent[k]) * 1000 for k in ids if k in collector.seen]
    if not latencies:
        raise RuntimeError("no output seen for the offered events")
    missing = len(ids) - len(latencies)
    run.report.notes.append(
        f"({label}) latency: {len(ids):,} events offered at {options.rate:,.0f}/s for {options.latency_seconds:.0f}s; "
        f"{len(latencies):,} outputs seen{f', {missing} MISSING' if missing else ''}; max {max(latencies):.1f} ms."
    )
    return percentiles(latencies)
