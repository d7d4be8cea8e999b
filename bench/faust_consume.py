"""Baselines (b): a bare faust agent that only consumes, in its own process.

The app is streamcdp's own (``streams.app.create_app``: same consumer, producer and
web settings as the worker, uvloop as ``streamcdp worker`` uses); only the agent's
body differs: it counts events. ``CDP_KAFKA_TRANSPORT`` picks the transport as for
the worker: ``faust`` (faust's own, one message per record, ``take_events(--batch,
within=--within-ms)``) or ``batch`` (one message per partition fetch, counted by
its records). Once it has seen ``--count`` events it writes ``{"events",
"seconds", "batches"}`` to ``--result`` (seconds from the first batch in hand to
the last) and idles until stopped.

    python -m bench.faust_consume --topics T1,T2 --count N --result FILE
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
    args = parser.parse_args()

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    settings = Settings.from_env()
    app = create_app(settings)
    topics = args.topics.split(",")
    seen = batches = 0
    first = 0.0
    reported = False

    def count(events: int) -> None:
        nonlocal seen, batches, first, reported
        if not seen:
            first = time.perf_counter()
        seen += events
        batches += 1
        if seen >= args.count and not reported:
            result = {"events": seen, "seconds": time.perf_counter() - first, "batches": batches}
            with open(args.result + ".tmp", "wb") as out:
                out.write(orjson.dumps(result))
            os.replace(args.result + ".tmp", args.result)
            reported = True

    if uses_batch_transport(settings):

        @app.agent(batch_topic(app, *topics), concurrency=1, name="bench.consume_only")
        async def consume_fetches(stream):
            async for fetch in stream:
                count(len(fetch))

    else:

        @app.agent(app.topic(*topics, key_serializer="raw", value_serializer="raw"), concurrency=1, name="bench.consume_only")
        async def consume_records(stream):
            async for events in stream.take_events(args.batch, within=args.within_ms / 1000):
                count(len(events))

    worker = faust.Worker(app, loglevel="warn", quiet=True, redirect_stdouts=False, loop=asyncio.new_event_loop())
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
