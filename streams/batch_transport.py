"""A faust transport that hands an agent each partition fetch as ONE message.

faust turns every Kafka record into its own message, event and queue hop before an
agent sees it; on our machines that per-record path caps a process near 5k events/s
however the agent is written (``../shared/NOTES.md``, faust section). This transport
keeps everything else of faust (group membership, rebalancing, offset commits,
producer, tables, timers, web, ordinary per-record agents) and changes one thing for
the topics declared with :func:`batch_topic`: the records that one ``getmany`` call
returned for one partition become a single message whose value is the list of those
records as :class:`streams.records.Record`, and whose offset is the offset of the
last of them. Acking that message means "every record of the fetch is done", so the
offset faust commits after it is last offset + 1. Other topics are delivered as
faust always does.

It is selected by the broker URL's scheme, ``kafka+batch://host:port``; faust looks
transports up by scheme (``faust.transport.drivers``), and importing this module
registers it. ``streams.app.create_app`` uses it when ``CDP_KAFKA_TRANSPORT=batch``.

**What it overrides, and why.** These are private methods of faust-streaming
0.15.3 (pinned exactly in ``pyproject.toml``); ``tests/unit/test_batch_transport.py``
fails with a clear message when their shape changes.

``Consumer._getmany(active_partitions, timeout)``
    faust's fetch step returns ``{tp: [records]}``; for a batch topic the list is
    replaced by one :class:`_Fetch` holding it, so faust's per-record loop (drain,
    conductor, stream) runs once per fetch instead of once per record.

``Consumer._to_message(tp, record)``
    builds the faust message for a :class:`_Fetch` (value = the list of Records,
    offset = the last record's) and marks the offsets before that last one
    (``first .. last-1``) as an offset gap: faust's commit bookkeeping
    (``_new_offset``) counts gap offsets as done once a later offset of the partition
    is acked, so they are committed together with the fetch's message and never
    before it. Called right before the message is handed to the agent's stream.

``Consumer._add_gap(tp, offset_from, offset_to)``
    faust calls it when a delivered offset does not follow the previous one (for us:
    every fetch of more than one record) and marks ``offset_from .. offset_to``
    *inclusive*, i.e. it also counts the just-delivered message's own offset as done
    before that message is acked; it also starts at ``committed + 1`` although the
    committed offset is the next offset to read. Both are off by one; the corrected
    version marks ``max(offset_from, committed) .. offset_to - 1``, so the committed
    offset is exactly the last processed offset + 1.

``AIOKafkaConsumerThread._create_worker_consumer(transport)``
    faust's driver hard-codes ``fetch_max_wait_ms=1500`` (and leaves
    ``fetch_min_bytes=1``); the aiokafka consumer it builds is adjusted before it
    starts (private ``_fetch_max_wait_ms`` / ``_fetch_min_bytes`` of aiokafka 0.14),
    because these two settings bound how long the broker may hold a fetch to gather
    more records (with min bytes 1, the default, it answers as soon as any record is
    there). ``Consumer._new_consumer_thread`` is overridden only to create that
    thread class.

The consumer also reads faust's private bookkeeping ``_committed_offset`` and
``_gap`` (the unit test drives them through faust's own ``ack`` and ``_new_offset``).

**What the agent must do.** A batch message is acked as one: an agent must handle
failures per record (dead letters), never let an exception end its iteration with
records half done, and ack only after the whole list's effects are stored. faust
counts gap offsets as done as soon as a later offset of the partition is acked, so
a partition's messages must be acked in the order they arrived: one agent with
``concurrency=1`` per batch topic. faust's sensors count one message per fetch:
count events yourself.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

import faust
from faust.serializers import codecs
from faust.transport import drivers
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, ConsumerMessage

from streams.records import Record

SCHEME = "kafka+batch"
#: The faust-streaming version whose private consumer methods this module overrides.
FAUST_VERSION = "0.15.3"
#: The pass-through codec of batch topics (their values are already lists of Records).
CODEC = "cdp-batch"


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """How long the broker may hold a fetch, and how many bytes it waits for."""

    max_wait_ms: int = 10
    min_bytes: int = 1


class _PassThrough(codecs.Codec):
    """A batch message's value is a Python list, not bytes: hand it over untouched."""

    def _loads(self, s: Any) -> Any:
        return s

    def _dumps(self, s: Any) -> Any:
        return s


codecs.register(CODEC, _PassThrough())

# Per app: the topics delivered in batches and the fetch options.
_batch_topics: "weakref.WeakKeyDictionary[faust.App, frozenset[str]]" = weakref.WeakKeyDictionary()
_fetch_options: "weakref.WeakKeyDictionary[faust.App, FetchOptions]" = weakref.WeakKeyDictionary()


def broker_url(bootstrap_servers: list[str]) -> str:
    """``kafka+batch://h1:9092;h2:9092``."""
    return f"{SCHEME}://" + ";".join(bootstrap_servers)


def configure(app: faust.App, fetch: FetchOptions) -> None:
    """Fetch options for ``app``'s consumer (before the app starts)."""
    _fetch_options[app] = fetch


def batch_topic(app: faust.App, *names: str, maxsize: int | None = None) -> faust.types.TopicT:
    """Declare ``names`` as batch topics of ``app``: an agent on the returned topic
    receives one event per partition fetch, whose value is a list of Records.

    ``maxsize`` bounds the fetches queued for the agent (default: the app's
    ``stream_buffer_maxsize``): each holds up to ``broker_max_poll_records`` records.
    """
    if app.conf.broker_consumer[0].scheme != SCHEME:
        raise ValueError(f"batch topics need the {SCHEME}:// broker, not {app.conf.broker_consumer[0]}")
    _batch_topics[app] = _batch_topics.get(app, frozenset()) | frozenset(names)
    return app.topic(*names, key_serializer=CODEC, value_serializer=CODEC, maxsize=maxsize)


class _Fetch:
    """Stands in for one aiokafka ``ConsumerRecord``: what one fetch returned for one
    partition of a batch topic."""

    __slots__ = ("records",)

    def __init__(self, records: list) -> None:
        self.records = records


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        options = _fetch_options.get(self.app, FetchOptions())
        # Read by AIOKafkaConsumer.start() when it builds its Fetcher.
        consumer._fetch_max_wait_ms = options.max_wait_ms  # noqa: SLF001
        consumer._fetch_min_bytes = options.min_bytes  # noqa: SLF001
        return consumer


class Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        records = await super()._getmany(active_partitions, timeout)
        batched = _batch_topics.get(self.app)
        if not records or not batched:
            return records
        return {tp: [_Fetch(rs)] if rs and tp.topic in batched else rs for tp, rs in records.items()}

    def _to_message(self, tp: TP, record: Any) -> ConsumerMessage:
        if type(record) is not _Fetch:
            return super()._to_message(tp, record)
        records = record.records
        first, last = records[0].offset, records[-1].offset
        committed = self._committed_offset.get(tp)
        start = first if committed is None else max(first, committed)
        if start < last:
            gaps = self._gap[tp]
            gaps.addi(start, last)  # first .. last-1: done when `last` is acked
            gaps.merge_overlaps()
        now_ms = int(time.time() * 1000)
        value = [
            Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp if r.timestamp is not None else now_ms)
            for r in records
        ]
        tail = records[-1]
        return ConsumerMessage(
            tp.topic,
            tp.partition,
            last,
            (tail.timestamp or now_ms) / 1000.0,
            tail.timestamp_type,
            [],
            None,
            value,  # type: ignore[arg-type]
            None,
            0,
            sum(r.serialized_value_size or 0 for r in records),
            tp,
            generation_id=self.app.consumer_generation_id,
        )

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # faust: offsets max(offset_from, committed + 1) .. offset_to inclusive.
        committed = self._committed_offset.get(tp)
        if committed is not None:
            offset_from = max(offset_from, committed)
        if offset_from < offset_to:
            gaps = self._gap[tp]
            gaps.addi(offset_from, offset_to)  # excludes offset_to: it is acked on its own
            gaps.merge_overlaps()


class Transport(faust_aiokafka.Transport):
    """faust's aiokafka transport with the batch-delivering :class:`Consumer`."""

    Consumer = Consumer


drivers.TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
