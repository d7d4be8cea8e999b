"""Producing a batch's outputs: enqueue all, then wait for every acknowledgement.

The hot path never awaits one send before starting the next: it enqueues every
message of a batch, then waits for all of them together. It returns only when every
message is acknowledged by the broker, so the caller acks its input only after its
outputs are stored (at-least-once). A failed send is retried with backoff until it
succeeds; the worker does not drop output and does not die on a broker outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from aiokafka.errors import MessageSizeTooLargeError

from streams.metrics import Metrics
from streams.records import OutboundMessage
from streams.topics import DEAD_LETTER

log = logging.getLogger(__name__)

_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 5.0
# A dead letter the broker refuses as too large is sent again cut to this size, with
# headers saying so; the whole record still sits at its source offset.
_TRUNCATED_BYTES = 512 * 1024


class Producer(Protocol):
    async def enqueue(self, message: OutboundMessage) -> Awaitable[Any]:
        """Hand ``message`` to the client's buffer; return its delivery future."""


class AiokafkaProducer:
    """Adapter for a started ``aiokafka.AIOKafkaProducer``."""

    def __init__(self, producer) -> None:
        self._producer = producer

    async def enqueue(self, message: OutboundMessage) -> Awaitable[Any]:
        return await self._producer.send(
            message.topic, message.value, key=message.key, headers=list(message.headers) or None
        )


class FaustProducer:
    """Adapter for a faust app's producer (shares its connection and flushing)."""

    def __init__(self, app) -> None:
        self._app = app

    async def enqueue(self, message: OutboundMessage) -> Awaitable[Any]:
        return await self._app.producer.send(
            message.topic, message.key, message.value, None, None, list(message.headers) or None
        )


async def deliver(producer: Producer, messages: Sequence[OutboundMessage], metrics: Metrics) -> None:
    """Produce ``messages`` and return once the broker acknowledged all of them."""
    pending = list(messages)
    backoff = _BACKOFF_START_S
    while pending:
        futures = [await _enqueue(producer, m) for m in pending]
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed: list[OutboundMessage] = []
        for message, result in zip(pending, results):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                metrics.kafka_errors.labels(message.topic).inc()
                failed.append(_shrunk(message) if isinstance(result, MessageSizeTooLargeError) else message)
                log.warning("produce to %s failed (%s: %s); retrying", message.topic, type(result).__name__, result)
            else:
                metrics.events_produced.labels(message.topic).inc()
        pending = failed
        if pending:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)


async def _enqueue(producer: Producer, message: OutboundMessage) -> Awaitable[Any]:
    try:
        return await producer.enqueue(message)
    except Exception as exc:  # noqa: BLE001 - turned into a failed future, retried by deliver()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        future.set_exception(exc)
        return future


def _shrunk(message: OutboundMessage) -> OutboundMessage:
    """A dead letter too large for the broker, cut (its record stays at its source
    offset). Other outputs are never cut: a cut JSON document would be a broken one;
    they are bounded by the 32 KiB input limit, so this cannot happen to them short
    of a broker limit set below that, which the produce-error alert reports."""
    if message.topic != DEAD_LETTER or len(message.value) <= _TRUNCATED_BYTES:
        return message
    headers = message.headers + (
        ("cdp.dlq.truncated", b"true"),
        ("cdp.dlq.original_bytes", str(len(message.value)).encode()),
    )
    log.error(
        "message for %s too large for the broker (%d bytes); sending the first %d bytes, "
        "the whole record stays at its source offset",
        message.topic, len(message.value), _TRUNCATED_BYTES,
    )
    return OutboundMessage(message.topic, message.key, message.value[:_TRUNCATED_BYTES], headers)
