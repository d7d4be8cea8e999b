"""Starting the worker process: topics first, then the faust worker."""

from __future__ import annotations

import asyncio
import logging

from streams.logs import logging_config
from streams.settings import Settings
from streams.topics import all_topics, ensure_topics

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> int:
    """Run the worker in the foreground until SIGINT/SIGTERM; return the exit code."""
    import faust

    from streamcdp.worker import build_worker_app

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        uvloop = None
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    # faust ignores a source topic that does not exist: create them before it starts.
    from agents.activation.destinations import Destinations

    activation = tuple(Destinations.load(settings.destinations or None).topics())
    asyncio.run(ensure_topics(settings, all_topics(activation)))
    app, _state = build_worker_app(settings)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_format, settings.log_level),
        redirect_stdouts=False,
        loop=asyncio.new_event_loop(),
    )
    worker.execute_from_commandline()  # exits the process via sys.exit
    return 0
