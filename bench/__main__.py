"""``python -m bench`` (``make bench``): the whole-pipeline table first, then the other benchmarks.

First the headline: ``bench.whole``, the whole pipeline (ingest to segment change,
100 segments) beside the raw aiokafka passthrough and a bare faust agent, with the
issue's targets met or missed; this command takes its options. Then each other
benchmark of this package as its own command, its report printed as it comes:
``bench.pipeline`` (the hot path shape by shape, smaller than its own default so
that the whole command stays near 10 minutes), ``bench.collector``,
``bench.identity_accuracy``, ``bench.profile_memory``. ``--skip`` leaves some out,
``--headline-only`` all of them.

Exits 0 when every measurement completed (a missed target is not a failure), 1
when one failed, 130 on Ctrl-C (child processes, segments, topics and the bench
Redis database are cleaned up).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench import whole
from bench.common import ROOT

# The other benchmarks, run after the headline table, with their arguments.
OTHER_BENCHMARKS: dict[str, list[str]] = {
    "bench.pipeline": ["--events", "10000", "--latency-seconds", "5", "--quiet-wait", "10"],
    "bench.collector": [],
    "bench.identity_accuracy": [],
    "bench.profile_memory": [],
}
REDIS_DB_OPTION = ("bench.pipeline", "bench.profile_memory")  # these take the bench's --redis-db too
OTHER_TIMEOUT_S = 420


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    whole.add_arguments(parser)
    parser.add_argument("--skip", default="", metavar="MODULES",
                        help=f"comma-separated benchmarks not to run after the table, of: {', '.join(OTHER_BENCHMARKS)}")
    parser.add_argument("--headline-only", action="store_true", help="only the whole-pipeline table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = skip - set(OTHER_BENCHMARKS)
    options = whole.options_from(args)
    problem = whole.check(options) or (f"--skip: unknown {', '.join(sorted(unknown))}" if unknown else None)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    code, _ = whole.run(options, prog="bench")
    if code == 130:
        return code
    failed = code != 0
    if not args.headline_only:
        for module, arguments in OTHER_BENCHMARKS.items():
            if module in skip:
                continue
            if module in REDIS_DB_OPTION:
                arguments = [*arguments, "--redis-db", str(options.redis_db)]
            failed |= not _run_other(module, arguments)
    return 1 if failed else 0


def _run_other(module: str, arguments: list[str]) -> bool:
    print(f"\n$ python -m {module} {' '.join(arguments)}".rstrip(), flush=True)
    try:
        done = subprocess.run([sys.executable, "-m", module, *arguments], cwd=ROOT, timeout=OTHER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"bench: {module} did not finish within {OTHER_TIMEOUT_S} s", file=sys.stderr)
        return False
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if done.returncode != 0:
        print(f"bench: {module} exited with {done.returncode}", file=sys.stderr)
    return done.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
