"""Baselines (b): a bare faust agent that only consumes, in its own process.

The app is streamcdp's own (``streams.app.create_app``: same consumer, producer and
web settings as the worker, uvloop as ``streamcdp worker`` uses); only the agent's
body differs: it counts events. ``CDP_KAFKA_TRANSPORT`` picks the transport as for
the worker: ``faust`` (faust's own, one message per record, ``take_events(--batch,
within=--within-ms)``) or ``batch`` (one message per partition fetch, counted by
its records). Once it has seen ``--count`` events it writes ``{"events",
"seconds", "batches", "cpu_seconds"}`` to ``--result`` (seconds and this process's
CPU seconds from the first batch in hand to the last).

Then, with ``--latency-phases N1,N2,...``, it times the events that follow, phase
by phase: for each of the next N1 events, from its record's timestamp (arrival on
the input topic) to the agent having it in hand, and writes ``{"events",
"latency_ms": [p50, p95, p99], "max_ms"}`` to ``FILE.latency1`` once it has seen
them; then the next N2 to ``FILE.latency2``; and so on. It idles until stopped.

    python -m bench.faust_consume --topics T1,T2 --count N --result FILE [--latency-phases N1,N2]
Configuration (app id, web port, bootstrap) from CDP_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import orjson


def main() -> None:
    import faust
    import uvloop

    from streams.app import create_app, uses_batch_transport
    from streams.batch_transport import batch_topic
    from streams.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m bench.faust_consume")
    parser.add_argument("--topics", required=True, help="comma-separated input topics")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--within-ms", type=float, default=10.0)
    parser.add_argument("--latency-phases", default="", help="comma-separated event counts (see above)")
    args = parser.parse_args()
    phases = [int(n) for n in args.latency_phases.split(",") if n.strip()]

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    settings = Settings.from_env()
    app = create_app(settings)
    topics = args.topics.split(",")
    seen = batches = 0
    first = cpu_first = 0.0
    reported = False
    phase = 0  # index into phases of the latency phase running
    timed: list[float] = []

    def write(path: str, result: dict) -> None:
        with open(path + ".tmp", "wb") as out:
            out.write(orjson.dumps(result))
        os.replace(path + ".tmp", path)

    def count(events: int, timestamps_ms) -> None:
        nonlocal seen, batches, first, cpu_first, reported, phase
        if not seen:
            first, cpu_first = time.perf_counter(), time.process_time()
        if reported and phase < len(phases):
            now = time.time()
            timed.extend(now * 1000 - t for t in timestamps_ms())
            while phase < len(phases) and len(timed) >= phases[phase]:
                mine, timed[:] = timed[:phases[phase]], timed[phases[phase]:]
                write(f"{args.result}.latency{phase + 1}", {"events": len(mine), "latency_ms": _percentiles(mine), "max_ms": max(mine)})
                phase += 1
            return
        seen += events
        batches += 1
        if seen >= args.count and not reported:
            write(args.result, {
                "events": seen, "seconds": time.perf_counter() - first, "batches": batches,
                "cpu_seconds": time.process_time() - cpu_first,
            })
            reported = True

    if uses_batch_transport(settings):

        @app.agent(batch_topic(app, *topics), concurrency=1, name="bench.consume_only")
        async def consume_fetches(stream):
            async for fetch in stream:
                count(len(fetch), lambda: [r.timestamp for r in fetch])

    else:

        @app.agent(app.topic(*topics, key_serializer="raw", value_serializer="raw"), concurrency=1, name="bench.consume_only")
        async def consume_records(stream):
            async for events in stream.take_events(args.batch, within=args.within_ms / 1000):
                count(len(events), lambda: [e.message.timestamp * 1000 for e in events])

    worker = faust.Worker(app, loglevel="warn", quiet=True, redirect_stdouts=False, loop=asyncio.new_event_loop())
    worker.execute_from_commandline()


def _percentiles(values: list[float], qs=(50, 95, 99)) -> list[float]:
    """Nearest-rank, as bench.common.percentiles (not imported: this child stays light)."""
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))] for q in qs]


if __name__ == "__main__":
    main()
