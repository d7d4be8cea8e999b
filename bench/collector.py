"""Collector throughput: ``POST /v1/batch`` with 100-event batches, beside a baseline.

    .venv/bin/python -m bench.collector [--seconds 10] [--concurrency 16] [--batch 100]

Two servers, each in its own process on loopback, measured one after the other in
the same run with the same client and the same request bodies:

* baseline: a minimal aiohttp endpoint that reads the body, parses the JSON and
  answers ``{"success": true}`` (uvloop, like the collector);
* the collector: the collector's own ``serve()`` (routes, write-key check,
  enrichment, the idempotent ``acks="all"`` producer), producing every event to the
  real Kafka (``CDP_KAFKA_BOOTSTRAP``) before answering. Its channel points at a
  topic of the benchmark's own, created and deleted here, so that workers consuming
  ``cdp.events.*`` (yours, or a test run's) do not receive benchmark traffic.

The client (aiohttp, ``--concurrency`` keep-alive connections) runs in this
process. On a small machine client, servers and broker share the cores: read the
ratio, not the absolute figures, and run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field

import orjson

from bench.common import ROOT, Child, child_env, create_topics, free_port, http_get, load_average
from streams.settings import Settings
from streams.topics import delete_topics

LOG_DIR = ROOT / ".run" / "bench"
WARMUP_S = 2.0
DISTINCT_BODIES = 64


# ------------------------------------------------------------------ payload


def make_bodies(count: int, batch: int, write_key: str, seed: int = 7) -> list[bytes]:
    """Request bodies shaped like the Segment Python SDK's: ``{"batch": [...], "sentAt", "writeKey"}``."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        events = []
        for _ in range(batch):
            user = f"u-{rng.randrange(10_000)}"
            events.append(
                {
                    "type": "track",
                    "event": rng.choice(["Product Viewed", "Product Added", "Order Completed"]),
                    "userId": user,
                    "anonymousId": None,
                    "messageId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "timestamp": "2026-11-23T10:00:00.000+00:00",
                    "properties": {"sku": f"s{rng.randrange(500)}", "price": rng.randrange(5, 300), "currency": "EUR"},
                    "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
                    "integrations": {},
                }
            )
        bodies.append(orjson.dumps({"batch": events, "sentAt": "2026-11-23T10:00:00.100+00:00", "writeKey": write_key}))
    return bodies


# ------------------------------------------------------------------ servers


def serve_baseline(port: int) -> None:
    """The baseline server (run in a subprocess): parse JSON, answer success."""
    import uvloop
    from aiohttp import web

    async def batch(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=b'{"success":true}', content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/v1/batch", batch)
    app.router.add_get("/readyz", ready)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_collector(port: int, topic: str, write_key: str) -> None:
    """The collector (run in a subprocess) as ``run_collector`` runs it, with one
    write key whose channel's topic is the benchmark's."""
    import uvloop

    from streamcdp.collector.auth import Source, WriteKeys
    from streamcdp.collector.server import serve
    from streams.logs import configure

    settings = Settings.from_env(collector_port=port, web_host="127.0.0.1", log_level="warn")
    configure(settings.log_format, settings.log_level)
    keys = WriteKeys({write_key: Source("bench", "web")})
    uvloop.install()
    asyncio.run(serve(settings, keys, topics={"web": topic}))


class Server:
    """A server subprocess, its URL and log."""

    def __init__(self, name: str, argv: list[str], port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.child = Child([sys.executable, *argv], child_env(), LOG_DIR / f"{name}.log", ROOT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise RuntimeError(f"{self.name} exited; log:\n{self.child.tail()}")
            if http_get(self.url + "/readyz", 2.0)[0] == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s; log:\n{self.child.tail()}")

    def metric(self, name: str) -> float | None:
        status, body = http_get(self.url + "/metrics")
        for line in body.decode().splitlines() if status == 200 else ():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> None:
        self.child.stop()


# ------------------------------------------------------------------- client


@dataclass
class Result:
    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: dict[int, int] = field(default_factory=dict)  # status (0: connection error) → count

    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile_ms(self, q: float) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[int(q) - 1] * 1000


async def load(url: str, bodies: list[bytes], write_key: str, *, seconds: float, concurrency: int, name: str) -> Result:
    """``concurrency`` keep-alive clients posting for ``seconds`` after a warm-up."""
    import aiohttp

    result = Result(name)
    auth = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": auth}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        start = time.perf_counter()
        measure_from = start + WARMUP_S
        stop_at = measure_from + seconds

        async def client(offset: int) -> None:
            i = offset
            while (now := time.perf_counter()) < stop_at:
                body = bodies[i % len(bodies)]
                i += 1
                try:
                    async with session.post(url + "/v1/batch", data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status = 0
                done = time.perf_counter()
                if now < measure_from:
                    continue
                if status == 200:
                    result.latencies.append(done - now)
                else:
                    result.failures[status] = result.failures.get(status, 0) + 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
        result.seconds = time.perf_counter() - measure_from
    return result


# -------------------------------------------------------------------- main


def report(
    results: list[Result], batch: int, body_bytes: float, args: argparse.Namespace, stored: float | None, load: str
) -> str:
    lines = [
        f"collector benchmark: POST /v1/batch, {batch} events per request (~{body_bytes / 1024:.0f} KB),"
        f" {args.concurrency} concurrent keep-alive clients, {args.seconds:.0f} s each after {WARMUP_S:.0f} s"
        f" warm-up, loopback",
        f"{os.cpu_count()} cores shared by client, servers and Kafka; {load} at start",
        "",
        f"{'target':<44}{'requests/s':>12}{'events/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'non-200':>9}",
    ]
    for r in results:
        lines.append(
            f"{r.name:<44}{r.requests_per_s():>12,.0f}{r.requests_per_s() * batch:>12,.0f}"
            f"{r.percentile_ms(50):>9.1f}{r.percentile_ms(99):>9.1f}{sum(r.failures.values()):>9}"
        )
    if len(results) == 2 and results[0].requests_per_s():
        lines.append(f"{'collector / baseline':<44}{results[1].requests_per_s() / results[0].requests_per_s():>12.2f}")
    if stored is not None:
        lines.append("")
        lines.append(
            f"events the collector reported as acknowledged by Kafka (whole run, warm-up included): {stored:,.0f}"
        )
    for r in results:
        if r.failures:
            lines.append(f"{r.name}: non-200 answers by status (0 = connection error): {r.failures}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per target (default 10)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--batch", type=int, default=100, help="events per request (default 100)")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-collector", nargs=3, metavar=("PORT", "TOPIC", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return 0
    if args.serve_collector:
        port, topic, key = args.serve_collector
        serve_collector(int(port), topic, key)
        return 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    import uvloop

    settings = Settings.from_env()
    write_key = "bench-" + uuid.uuid4().hex[:12]
    topic = "bench.collector." + uuid.uuid4().hex[:8]
    bodies = make_bodies(DISTINCT_BODIES, args.batch, write_key)
    load_at_start = load_average()
    asyncio.run(create_topics(settings, [topic], settings.topic_partitions))
    baseline_port, collector_port = free_port(), free_port()
    servers = [
        Server("baseline", ["-m", "bench.collector", "--serve-baseline", str(baseline_port)], baseline_port),
        Server("collector", ["-m", "bench.collector", "--serve-collector", str(collector_port), topic, write_key],
               collector_port),
    ]
    names = [
        "aiohttp endpoint, JSON parse only",
        f"streamcdp collector -> Kafka, {settings.topic_partitions} partitions",
    ]
    results = []
    try:
        for server in servers:
            server.wait_ready()
        for name, server in zip(names, servers):
            results.append(uvloop.run(load(server.url, bodies, write_key, seconds=args.seconds,
                                           concurrency=args.concurrency, name=name)))
        stored = servers[1].metric('cdp_collector_events_received_total{channel="web"}')
    finally:
        for server in servers:
            server.stop()
        asyncio.run(delete_topics(settings, [topic]))
    print(report(results, args.batch, statistics.mean(map(len, bodies)), args, stored, load_at_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
