"""``python -m bench.counted_worker``: ``streamcdp worker``, counting its Redis round trips.

The real worker (``streamcdp.cli worker``, same settings, same code) with one
addition: every request written to a Redis connection of this process (one command
sent alone, or one whole pipeline or transaction; health-check PINGs and the
timer's, back-fills' and the API's requests included) adds one to
``cdp_bench_redis_requests``, a gauge on the worker's own ``/metrics``. The worker's
``cdp_redis_call_duration_seconds`` counts the round trips the hot path declares
(one per ``Pipeline._redis`` step); the segment stage's own round trips are not
among them, so the benchmark reports this count as the figure and the declared one
beside it. The cost is one Python call per request.
"""

from __future__ import annotations

import sys

REQUESTS_GAUGE = "cdp_bench_redis_requests"
_requests = 0


def install() -> None:
    """Count requests on every asyncio Redis connection, and expose the count on
    every ``streams.metrics.Metrics`` registry created from now on."""
    from prometheus_client import Gauge
    from redis.asyncio.connection import AbstractConnection

    import streams.metrics

    send = AbstractConnection.send_packed_command

    async def counted(self, command, check_health: bool = True) -> None:
        global _requests
        _requests += 1
        await send(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]

    init = streams.metrics.Metrics.__init__

    def metrics_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        gauge = Gauge(REQUESTS_GAUGE, "Requests written to Redis connections by this process (bench).", registry=self.registry)
        gauge.set_function(lambda: _requests)

    streams.metrics.Metrics.__init__ = metrics_init  # type: ignore[method-assign]


def main() -> int:
    install()
    from streamcdp.cli import main as cli

    return cli(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
