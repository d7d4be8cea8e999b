"""`streamcdp worker` with two test hooks, for the batch transport's integration tests.

    python -m tests.integration.transport_harness

It runs the real worker (``streamcdp.cli worker``: settings from CDP_* variables,
topics ensured, the faust worker, real Kafka and Redis) after applying, in this
process only:

``CDP_TEST_INBOUND=t1,t2``
    read these input topics instead of ``cdp.events.{web,app,pos,crm}``. Each test
    gets private input topics, so no other worker on the shared broker (a test
    session's, a developer's) processes its input or publishes outputs for it.
``CDP_TEST_POISON=marker``
    ``Pipeline.handle`` raises for any batch holding a record whose value contains
    ``marker``: the pipeline's own isolation must then handle the batch's records one
    by one and dead-letter the poisoned ones (``processing_error``).
``CDP_TEST_ESCAPE=marker`` and ``CDP_TEST_ESCAPE_TIMES=n``
    ``Pipeline.handle_safely`` itself raises, the first ``n`` times it gets a batch
    holding ``marker``: the worker must not ack that batch (it retries it).
"""

from __future__ import annotations

import os
import sys


def _install_hooks() -> None:
    from agents.pipeline import Pipeline

    inbound = os.environ.get("CDP_TEST_INBOUND")
    if inbound:
        import streamcdp.worker
        import streams.topics

        topics = tuple(t.strip() for t in inbound.split(",") if t.strip())
        streamcdp.worker.INBOUND = topics
        streams.topics.INBOUND = topics

    poison = os.environ.get("CDP_TEST_POISON", "").encode()
    if poison:
        handle = Pipeline.handle

        async def poisoned_handle(self, batch):
            if any(poison in (record.value or b"") for record in batch):
                raise RuntimeError("injected fault: poisoned record in the batch")
            return await handle(self, batch)

        Pipeline.handle = poisoned_handle

    escape = os.environ.get("CDP_TEST_ESCAPE", "").encode()
    if escape:
        handle_safely = Pipeline.handle_safely
        left = [int(os.environ.get("CDP_TEST_ESCAPE_TIMES", "1"))]

        async def escaping_handle_safely(self, batch):
            if left[0] > 0 and any(escape in (record.value or b"") for record in batch):
                left[0] -= 1
                raise RuntimeError("injected fault: escaped handle_safely")
            return await handle_safely(self, batch)

        Pipeline.handle_safely = escaping_handle_safely


def main() -> int:
    _install_hooks()
    from streamcdp.cli import main as cli

    return cli(["worker"])


if __name__ == "__main__":
    sys.exit(main())
