"""Transport-neutral records: what the hot path reads and what it writes.

The batch core takes ``Record``s whether they come from faust's ``stream.take``,
from a batch-delivering transport or from a plain aiokafka loop in a benchmark, and
returns ``OutboundMessage``s for whichever producer the caller has.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record as read from an input topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int

    @property
    def origin(self) -> str:
        """``topic/partition/offset``: where this record sits in Kafka, for dead
        letters, logs, and telling a redelivery from a resend."""
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    # The messageId of the input event that caused it (segment changes), for the
    # arrival-to-change latency; not sent.
    cause: str | None = None
