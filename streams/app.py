"""The faust App, built from Settings (never at import time).

``CDP_KAFKA_TRANSPORT`` picks the consumer: ``batch`` (default) uses
``streams.batch_transport`` (``kafka+batch://``), whose batch topics reach an agent as
one message per partition fetch; ``faust`` uses faust's own ``kafka://`` transport,
one message per record. Everything else of the app is the same either way.
"""

from __future__ import annotations

import faust

from streams import batch_transport
from streams.settings import Settings
from streams.topics import PRODUCER_MAX_REQUEST_BYTES

# faust's per-record transport queues up to this many records per agent stream.
_STREAM_BUFFER_RECORDS = 8192
# The batch transport queues fetches instead, each up to CDP_KAFKA_MAX_POLL_RECORDS
# records: a short queue keeps memory bounded (aiokafka prefetches the next fetch
# meanwhile anyway).
_STREAM_BUFFER_FETCHES = 16


def uses_batch_transport(settings: Settings) -> bool:
    return settings.kafka_transport == "batch"


def broker_url(settings: Settings) -> str:
    if uses_batch_transport(settings):
        return batch_transport.broker_url(settings.bootstrap_servers())
    return settings.kafka_url()


def create_app(settings: Settings) -> faust.App:
    batch = uses_batch_transport(settings)
    app = faust.App(
        settings.app_id,
        broker=broker_url(settings),
        store="memory://",
        autodiscover=False,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        consumer_auto_offset_reset="earliest",
        # Records one fetch hands over (over all partitions): big enough that a busy
        # partition fills a batch in one fetch, small enough to bound memory and latency.
        broker_max_poll_records=settings.kafka_max_poll_records,
        # Inbound events are ≤ 32 KiB when valid, but bigger ones must still be read
        # (to dead-letter them): let one fetch carry up to 16 MiB per partition.
        consumer_max_fetch_size=16 * 1024 * 1024,
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,
        producer_acks=-1,
        producer_linger_ms=1,
        # Offsets are committed often so that a restart replays little.
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=_STREAM_BUFFER_FETCHES if batch else _STREAM_BUFFER_RECORDS,
        # A crashed worker's partitions wait this long before another takes them.
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_s / 10),
        web_in_thread=False,
    )
    if batch:
        batch_transport.configure(
            app,
            batch_transport.FetchOptions(
                max_wait_ms=settings.kafka_fetch_max_wait_ms, min_bytes=settings.kafka_fetch_min_bytes
            ),
        )
    return app
