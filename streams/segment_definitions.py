"""The compacted topic ``cdp.segment-definitions``: publishing, listing, following.

Key: the segment id. Value: the definition as JSON (as applied, validated), or no
value (a tombstone) for a deleted segment. Compaction keeps the latest per id, so
reading the topic from the beginning gives the current set.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.settings import Settings
from streams.topics import SEGMENT_DEFINITIONS

log = logging.getLogger(__name__)


async def publish(settings: Settings, segment_id: str, document: dict | None) -> None:
    """Publish a definition (or, with None, a tombstone) and wait for the broker."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), acks="all")
    await producer.start()
    try:
        value = None if document is None else orjson.dumps(document)
        await producer.send_and_wait(SEGMENT_DEFINITIONS, value, key=segment_id.encode())
    finally:
        await producer.stop()


async def _assigned(settings: Settings) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers(), group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    partitions = None
    for _ in range(50):
        partitions = consumer.partitions_for_topic(SEGMENT_DEFINITIONS)
        if partitions:
            break
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    if not partitions:
        await consumer.stop()
        raise ConnectionError(f"topic {SEGMENT_DEFINITIONS} not found (run `streamcdp topics create`)")
    tps = [TopicPartition(SEGMENT_DEFINITIONS, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return consumer, tps


async def read_all(settings: Settings) -> dict[str, dict]:
    """The current definitions: the latest value per key, tombstones removed."""
    consumer, tps = await _assigned(settings)
    current: dict[str, dict] = {}
    try:
        end = await consumer.end_offsets(tps)
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    key = record.key.decode() if record.key else ""
                    if record.value is None:
                        current.pop(key, None)
                    else:
                        current[key] = orjson.loads(record.value)
        return current
    finally:
        await consumer.stop()


async def follow(settings: Settings, registry, stop: asyncio.Event | None = None) -> None:
    """Feed every record of the topic to ``registry.apply_record``, from the
    beginning; set ``registry.loaded`` once caught up with the end seen at start."""
    while stop is None or not stop.is_set():
        try:
            consumer, tps = await _assigned(settings)
        except Exception as exc:  # noqa: BLE001 - Kafka not there yet: try again
            log.warning("segment definitions: %s; retrying", exc)
            await asyncio.sleep(2.0)
            continue
        try:
            end = await consumer.end_offsets(tps)
            while stop is None or not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        registry.apply_record(record.key, record.value)
                if not registry.loaded.is_set() and all([await consumer.position(tp) >= end[tp] for tp in tps]):
                    registry.loaded.set()
                    log.info("segment definitions loaded: %d segments", len(registry.index.segments))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep following after a broker hiccup
            log.warning("segment definitions: %s: %s; reconnecting", type(exc).__name__, exc)
            await asyncio.sleep(1.0)
        finally:
            await consumer.stop()
