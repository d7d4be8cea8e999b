"""The batch transport against the faust internals it overrides (streams/batch_transport.py).

These tests fail with a message naming what changed when faust-streaming or
aiokafka is upgraded: the overridden private methods' signatures, the attributes
they use, and the drain loop's call of ``_add_gap``. The bookkeeping test drives a
real (unstarted) faust consumer through the same steps as faust's drain loop and
checks the offset faust would commit: exactly the last processed offset + 1.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from importlib import metadata

import aiokafka
import faust
import pytest
from aiokafka.structs import ConsumerRecord
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from streams import batch_transport
from streams.app import broker_url, create_app
from streams.records import Record
from streams.settings import Settings

UPGRADE_HINT = (
    "streams/batch_transport.py overrides private faust/aiokafka internals that changed; "
    "re-read the new versions' code, adapt the overrides, then update this test"
)


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_faust_is_the_pinned_version() -> None:
    assert faust.__version__ == batch_transport.FAUST_VERSION, (
        f"faust-streaming {faust.__version__} installed, the batch transport was written for "
        f"{batch_transport.FAUST_VERSION}: {UPGRADE_HINT}"
    )
    assert metadata.version("faust-streaming") == batch_transport.FAUST_VERSION
    assert aiokafka.__version__.startswith("0.14."), f"aiokafka {aiokafka.__version__}: {UPGRADE_HINT}"


@pytest.mark.parametrize(
    ("owner", "name", "params"),
    [
        (faust_consumer.ThreadDelegateConsumer, "_getmany", ["self", "active_partitions", "timeout"]),
        (faust_aiokafka.Consumer, "_to_message", ["self", "tp", "record"]),
        (faust_consumer.Consumer, "_add_gap", ["self", "tp", "offset_from", "offset_to"]),
        (faust_consumer.Consumer, "_new_offset", ["self", "tp"]),
        (faust_aiokafka.Consumer, "_new_consumer_thread", ["self"]),
        (faust_aiokafka.AIOKafkaConsumerThread, "_create_worker_consumer", ["self", "transport"]),
    ],
)
def test_overridden_methods_keep_their_shape(owner, name, params) -> None:
    method = getattr(owner, name, None)
    assert method is not None, f"{owner.__qualname__}.{name} is gone: {UPGRADE_HINT}"
    assert _params(method) == params, f"{owner.__qualname__}.{name}{inspect.signature(method)}: {UPGRADE_HINT}"
    assert inspect.iscoroutinefunction(method) == (name in ("_getmany", "_add_gap")), (
        f"{owner.__qualname__}.{name} changed between sync and async: {UPGRADE_HINT}"
    )


def test_consumer_message_and_record_fields() -> None:
    params = _params(faust.types.ConsumerMessage.__init__)
    assert params[:13] == [
        "self", "topic", "partition", "offset", "timestamp", "timestamp_type", "headers", "key", "value",
        "checksum", "serialized_key_size", "serialized_value_size", "tp",
    ], f"ConsumerMessage{inspect.signature(faust.types.ConsumerMessage.__init__)}: {UPGRADE_HINT}"
    assert "generation_id" in params
    fields = set(inspect.signature(ConsumerRecord).parameters)
    assert {"topic", "partition", "offset", "timestamp", "timestamp_type", "key", "value", "serialized_value_size"} <= fields


def test_drain_loop_still_reports_gaps_the_way_the_correction_assumes() -> None:
    source = inspect.getsource(faust_consumer.Consumer._drain_messages)
    assert "await self._add_gap(tp, r_offset + 1, offset)" in source, f"faust's drain loop changed: {UPGRADE_HINT}"
    assert re.search(r"yield tp, to_message\(tp, record\)", inspect.getsource(faust_consumer.Consumer.getmany)), (
        f"faust's getmany no longer converts each fetched record right before yielding it: {UPGRADE_HINT}"
    )
    fetch = inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer)
    assert "fetch_max_wait_ms=1500" in fetch, (
        "faust's driver no longer hard-codes fetch_max_wait_ms=1500: the override may be unnecessary or wrong; "
        + UPGRADE_HINT
    )


def test_aiokafka_reads_fetch_options_from_the_attributes_the_transport_sets() -> None:
    source = inspect.getsource(aiokafka.AIOKafkaConsumer.start)
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in source, UPGRADE_HINT
    assert "fetch_min_bytes=self._fetch_min_bytes" in source, UPGRADE_HINT

    async def build():
        return aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=7, fetch_min_bytes=3)

    consumer = asyncio.run(build())
    assert (consumer._fetch_max_wait_ms, consumer._fetch_min_bytes) == (7, 3), UPGRADE_HINT


def test_the_scheme_selects_the_batch_transport_and_settings_choose_it() -> None:
    batch = Settings.from_env({}, kafka_bootstrap="k1:9092,k2:9092")
    assert broker_url(batch) == "kafka+batch://k1:9092;k2:9092"
    assert broker_url(Settings.from_env({"CDP_KAFKA_TRANSPORT": "faust"})) == "kafka://localhost:9092"
    app = create_app(batch)
    assert isinstance(app.transport, batch_transport.Transport)
    assert isinstance(app.consumer, batch_transport.Consumer)
    plain = create_app(Settings.from_env({"CDP_KAFKA_TRANSPORT": "faust"}))
    assert type(plain.transport) is faust_aiokafka.Transport
    with pytest.raises(ValueError, match="kafka\\+batch"):
        batch_transport.batch_topic(plain, "t")


def test_fetch_settings_parse() -> None:
    s = Settings.from_env(
        {"CDP_KAFKA_FETCH_MAX_WAIT": "25ms", "CDP_KAFKA_FETCH_MIN_BYTES": "4096", "CDP_KAFKA_MAX_POLL_RECORDS": "500", "CDP_BATCH_MERGE": "4"}
    )
    assert (s.kafka_fetch_max_wait_ms, s.kafka_fetch_min_bytes, s.kafka_max_poll_records, s.batch_merge) == (25, 4096, 500, 4)
    assert Settings.from_env({"CDP_KAFKA_FETCH_MAX_WAIT": "1s"}).kafka_fetch_max_wait_ms == 1000
    assert Settings.from_env({"CDP_KAFKA_FETCH_MAX_WAIT": "40"}).kafka_fetch_max_wait_ms == 40
    assert Settings.from_env({"CDP_BATCH_LINGER_MS": "5ms"}).batch_linger_ms == 5
    assert Settings().batch_linger_ms == 0


# ------------------------------------------------------------------ offset bookkeeping


TOPIC = "cdp.test.batch"


def _record(offset: int) -> ConsumerRecord:
    return ConsumerRecord(
        topic=TOPIC, partition=0, offset=offset, timestamp=1_700_000_000_000 + offset, timestamp_type=0,
        key=b"k", value=b"v%d" % offset, checksum=None, serialized_key_size=1, serialized_value_size=2, headers=(),
    )


class Drain:
    """faust's drain loop and commit bookkeeping on a real, unstarted batch consumer:
    the steps of ``Consumer._drain_messages`` (gap check, delivery, read offset),
    ``Consumer.ack`` and ``Consumer._new_offset``."""

    def __init__(self, committed: int | None) -> None:
        app = create_app(Settings.from_env({}, app_id="unit-batch-transport"))
        batch_transport.batch_topic(app, TOPIC)
        app.topics._acking_topics.add(TOPIC)  # done by the conductor when an agent subscribes
        self.consumer = app.consumer
        self.tp = TP(TOPIC, 0)
        # After assignment faust seeks to the committed offset (perform_seek).
        self.consumer._committed_offset[self.tp] = committed
        self.consumer._read_offset[self.tp] = committed
        self.messages = []

    async def deliver(self, offsets: list[int]):
        consumer, tp = self.consumer, self.tp
        fetched = {tp: [_record(o) for o in offsets]}
        [wrapped] = ({tp: [batch_transport._Fetch(rs)] for tp, rs in fetched.items()})[tp]
        message = consumer._to_message(tp, wrapped)
        r_offset = consumer._read_offset[tp]
        offset = message.offset
        assert r_offset is None or offset >= r_offset
        gap = offset - (r_offset or 0)
        if gap > 1 and r_offset:
            await consumer._add_gap(tp, r_offset + 1, offset)
        consumer._read_offset[tp] = offset
        self.messages.append(message)
        return message

    def ack(self, message) -> None:
        assert self.consumer.ack(message)

    def commit(self) -> int | None:
        offset = self.consumer._new_offset(self.tp)
        if offset is not None and self.consumer._should_commit(self.tp, offset):
            self.consumer._committed_offset[self.tp] = offset
            return offset
        return None


def test_a_fetch_becomes_one_message_of_records() -> None:
    async def run():
        drain = Drain(committed=10)
        message = await drain.deliver([10, 11, 12])
        assert (message.offset, message.key) == (12, None)
        assert message.value == [Record(TOPIC, 0, o, b"k", b"v%d" % o, 1_700_000_000_000 + o) for o in (10, 11, 12)]
        assert message.timestamp == pytest.approx((1_700_000_000_000 + 12) / 1000)

    asyncio.run(run())


@pytest.mark.parametrize("committed", [None, 0, 1, 10])
def test_committed_offset_is_last_processed_plus_one(committed) -> None:
    start = committed or 0

    async def run():
        drain = Drain(committed)
        first = await drain.deliver(list(range(start, start + 5)))
        assert drain.commit() is None, "nothing is committed before the fetch's message is acked"
        drain.ack(first)
        assert drain.commit() == start + 5
        second = await drain.deliver([start + 5])  # a fetch of one record
        third = await drain.deliver(list(range(start + 6, start + 9)))
        assert drain.commit() is None
        drain.ack(second)
        assert drain.commit() == start + 6, "the next fetch's records are not done before its message is acked"
        drain.ack(third)
        assert drain.commit() == start + 9
        # A gap between fetches (transaction markers, compaction): offsets start+9, +10 do not exist.
        fourth = await drain.deliver(list(range(start + 11, start + 14)))
        assert drain.commit() is None
        drain.ack(fourth)
        assert drain.commit() == start + 14

    asyncio.run(run())


def test_merged_fetches_acked_in_order_commit_after_the_last() -> None:
    """faust counts gap offsets as done once a later offset is acked, so a partition's
    messages must be acked in order: one agent of concurrency 1 per batch topic, as
    the worker has (merged fetches are acked in arrival order)."""

    async def run():
        drain = Drain(committed=100)
        a = await drain.deliver([100, 101])
        b = await drain.deliver([102, 103, 104])
        assert drain.commit() is None
        drain.ack(a)
        assert drain.commit() == 102
        drain.ack(b)
        assert drain.commit() == 105

    asyncio.run(run())


def test_other_topics_are_delivered_record_by_record() -> None:
    async def run():
        app = create_app(Settings.from_env({}, app_id="unit-batch-transport-2"))
        batch_transport.batch_topic(app, TOPIC)
        message = app.consumer._to_message(TP("other", 0), _record(5))
        assert (message.offset, message.value) == (5, b"v5")

    asyncio.run(run())
