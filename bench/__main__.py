"""``python -m bench`` (``make bench``): run every benchmark.

First the hot path beside its baselines (``bench.pipeline``, one table), then each
other benchmark module of this package as its own command (``python -m
bench.collector``), its report printed as it comes. Exits 0 when every measurement
completed, 1 when one failed (its row or report says why), 130 on Ctrl-C (child
processes, topics and the bench Redis database are cleaned up).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time

import uvloop

from bench.common import ROOT, Child
from bench.pipeline import Options, Report, Row, run_all

# Benchmarks with a command line of their own, run after the pipeline's table.
OTHER_BENCHMARKS = ("bench.collector", "bench.identity_accuracy", "bench.profile_memory", "bench.segments")
OTHER_TIMEOUT_S = 300
COLUMNS = ("shape", "events/s", "vs raw passthrough (a)", "vs bare faust (b)", "Redis round trips/event", "p50/p95/p99 ms at {rate}/s")


def _parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=defaults.events, help=f"input events (default {defaults.events:,})")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="offered rate of the latency runs, events/s (default 1000)")
    parser.add_argument("--latency-seconds", type=float, default=defaults.latency_seconds, help="length of each latency run (default 10)")
    parser.add_argument("--partitions", type=int, default=defaults.partitions, help="partitions of each bench input topic (default 8)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed (default 0)")
    parser.add_argument(
        "--redis-db", type=int, default=int(os.environ.get("CDP_BENCH_REDIS_DB", defaults.redis_db)),
        help="Redis database the benchmarks use and flush (default CDP_BENCH_REDIS_DB or 14)",
    )
    parser.add_argument("--pipeline-only", action="store_true", help=f"skip {', '.join(OTHER_BENCHMARKS)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.events < 1000 or args.rate <= 0 or args.latency_seconds <= 0:
        print("bench: --events must be >= 1000, --rate and --latency-seconds > 0", file=sys.stderr)
        return 2
    options = Options(
        events=args.events, rate=args.rate, latency_seconds=args.latency_seconds,
        partitions=args.partitions, seed=args.seed, redis_db=args.redis_db,
    )
    # aiokafka logs retried, harmless hiccups (NotLeaderForPartition on a topic just
    # created) as warnings; the table is the output.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(run_all(options))
    except KeyboardInterrupt:
        print("bench: interrupted; child processes stopped, bench topics deleted", file=sys.stderr)
        return 130
    finally:
        Child.stop_all()
    print(render(report, options, time.monotonic() - started), flush=True)
    failed = report.failed
    if not args.pipeline_only:
        for module in OTHER_BENCHMARKS:
            failed |= not _run_other(module)
    return 1 if failed else 0


def _run_other(module: str) -> bool:
    print(f"\n$ python -m {module}", flush=True)
    try:
        done = subprocess.run([sys.executable, "-m", module], cwd=ROOT, timeout=OTHER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"bench: {module} did not finish within {OTHER_TIMEOUT_S} s", file=sys.stderr)
        return False
    if done.returncode != 0:
        print(f"bench: {module} exited with {done.returncode}", file=sys.stderr)
    return done.returncode == 0


def render(report: Report, options: Options, seconds: float) -> str:
    lines = ["streamcdp benchmarks", ""]
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


if __name__ == "__main__":
    sys.exit(main())
