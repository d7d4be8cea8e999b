"""Dead letters: rejected input, kept whole, with the reason beside it.

A dead letter's value is the original record's bytes, unchanged, and its key the
original key, so fixing a producer and replaying the topic needs no decoding. Why
and where it came from travel in headers (the convention of Kafka Connect's
``errors.deadletterqueue.context.headers.enable``):

| header | value |
|---|---|
| ``cdp.dlq.reason`` | reason code, e.g. ``schema_violation`` |
| ``cdp.dlq.detail`` | readable explanation |
| ``cdp.dlq.field`` | JSON path of the failing field, when there is one |
| ``cdp.dlq.source.topic`` / ``.partition`` / ``.offset`` | where the record was read |
| ``cdp.dlq.timestamp`` | when it was rejected, ms since the epoch |
"""

from __future__ import annotations

from streams.records import OutboundMessage, Record
from streams.topics import DEAD_LETTER

_MAX_DETAIL_BYTES = 1024


def dead_letter(record: Record, reason: str, detail: str, field: str | None, now_ms: int) -> OutboundMessage:
    headers = [
        ("cdp.dlq.reason", reason.encode()),
        ("cdp.dlq.detail", detail.encode("utf-8", "replace")[:_MAX_DETAIL_BYTES]),
        ("cdp.dlq.source.topic", record.topic.encode()),
        ("cdp.dlq.source.partition", str(record.partition).encode()),
        ("cdp.dlq.source.offset", str(record.offset).encode()),
        ("cdp.dlq.timestamp", str(now_ms).encode()),
    ]
    if field:
        headers.append(("cdp.dlq.field", field.encode("utf-8", "replace")[:_MAX_DETAIL_BYTES]))
    return OutboundMessage(DEAD_LETTER, record.key, record.value or b"", tuple(headers))


def header_map(headers) -> dict[str, str]:
    """Dead-letter headers as ``{name: text}`` (for tools and tests)."""
    return {name: (value or b"").decode("utf-8", "replace") for name, value in headers or ()}
