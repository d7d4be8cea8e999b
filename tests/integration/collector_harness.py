"""`streamcdp collector` writing to a test's own topic.

    CDP_TEST_COLLECTOR_TOPIC=test.fuzz.x python -m tests.integration.collector_harness

It runs the real collector (``streamcdp.cli collector``: settings and write keys
from the environment, the HTTP server, the Kafka producer) with every channel's
topic replaced by ``CDP_TEST_COLLECTOR_TOPIC`` in this process only, as the
benchmark does through ``serve(topics=...)``: what a test sends (fuzzed bodies, say)
never reaches the shared ``cdp.events.*`` topics other workers read.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    topic = os.environ["CDP_TEST_COLLECTOR_TOPIC"]
    import streamcdp.collector.server as server
    from streamcdp.collector.auth import CHANNEL_TOPICS

    serve = server.serve

    async def serve_to_topic(settings, keys, stop=None, *, topics=None):
        return await serve(settings, keys, stop, topics={channel: topic for channel in CHANNEL_TOPICS})

    server.serve = serve_to_topic
    from streamcdp.cli import main as cli

    return cli(["collector"])


if __name__ == "__main__":
    sys.exit(main())
