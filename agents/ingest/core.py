"""Ingest: turn raw input records into typed events or reasons for rejecting them.

Pure: no I/O. The caller sends every rejection to the dead-letter topic.

>>> from streams.records import Record
>>> ok, bad = split_batch([Record("cdp.events.web", 0, 7, None, b"{}", 0)], default_region="US")
>>> bad[0].reason, bad[0].record.offset
('unknown_type', 7)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from schemas.errors import InvalidEvent
from schemas.events import Event, RejectReason, parse_event
from streams.records import Record
from streams.topics import channel_of


# Dead-letter reason for a record our own code failed on (a bug, not bad input).
PROCESSING_ERROR = "processing_error"


@dataclass(frozen=True, slots=True)
class Accepted:
    record: Record
    event: Event
    # False once the pipeline's byte screen found no sensitive name in the record
    # (SensitivePolicy.might_contain): later steps then skip the protection walk.
    sensitive_possible: bool = True


@dataclass(frozen=True, slots=True)
class Rejected:
    record: Record
    reason: str
    detail: str
    field: str | None = None


def validate(record: Record, *, default_region: str) -> Accepted | Rejected:
    """Parse and validate one record."""
    if record.value is None:
        return Rejected(record, RejectReason.EMPTY.value, "record has no value (tombstone)")
    try:
        event = parse_event(
            record.value,
            channel=channel_of(record.topic),
            fallback_timestamp_ms=record.timestamp_ms,
            default_region=default_region,
        )
    except InvalidEvent as exc:
        return Rejected(record, str(exc.reason), exc.detail, exc.field)
    except Exception as exc:  # noqa: BLE001 - a parser bug must not stop the worker
        return Rejected(record, PROCESSING_ERROR, f"unexpected {type(exc).__name__} while parsing: {exc}"[:500])
    return Accepted(record, event)


def split_batch(records: Sequence[Record], *, default_region: str) -> tuple[list[Accepted], list[Rejected]]:
    """Validate a batch; keep input order within each list."""
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    for record in records:
        result = validate(record, default_region=default_region)
        (accepted if type(result) is Accepted else rejected).append(result)  # type: ignore[arg-type]
    return accepted, rejected
