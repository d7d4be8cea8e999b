"""The faust App, built from Settings (never at import time)."""

from __future__ import annotations

import faust

from streams.settings import Settings
from streams.topics import PRODUCER_MAX_REQUEST_BYTES

# Records in one fetch of one partition: big enough that a busy partition fills a
# batch in one fetch, small enough to bound memory and latency.
_MAX_POLL_RECORDS = 2000


def create_app(settings: Settings) -> faust.App:
    return faust.App(
        settings.app_id,
        broker=settings.kafka_url(),
        store="memory://",
        autodiscover=False,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=_MAX_POLL_RECORDS,
        # Inbound events are ≤ 32 KiB when valid, but bigger ones must still be read
        # (to dead-letter them): let one fetch carry up to 16 MiB per partition.
        consumer_max_fetch_size=16 * 1024 * 1024,
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,
        producer_acks=-1,
        producer_linger_ms=1,
        # Offsets are committed often so that a restart replays little.
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=8192,
        # A crashed worker's partitions wait this long before another takes them.
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_s / 10),
        web_in_thread=False,
    )
