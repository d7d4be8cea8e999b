"""Fuzz the ingest stage (issue 14, item 4): random bytes and mutated valid events
(fields dropped or replaced, wrong types, huge strings, deep nesting, unicode,
NaN/Infinity, 64-bit overflows, bad timestamps, bad identifiers, corrupted bytes;
``tests/integration/fuzz_inputs.py``) through ``parse_event`` and ``split_batch``.

No input makes them raise anything but ``InvalidEvent``; every record gets exactly
one verdict, accepted (a well-formed Event) or rejected with one of the documented
reasons, never ``processing_error`` (a parser bug); the verdict is the same when
asked twice. Hypothesis runs derandomized with a fixed number of examples.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from agents.ingest.core import Accepted, Rejected, split_batch
from schemas.errors import InvalidEvent
from schemas.events import EVENT_TYPES, Event, Identifier, RejectReason, parse_event
from streams.records import Record
from tests.integration.fuzz_inputs import event_bytes, fuzz

FALLBACK_MS = 1_795_168_800_000
REASONS = {reason.value for reason in RejectReason}


def verdict(raw: bytes) -> Event | InvalidEvent:
    try:
        return parse_event(raw, channel="app", fallback_timestamp_ms=FALLBACK_MS, default_region="DE")
    except InvalidEvent as exc:
        return exc


def check_event(event: Event) -> None:
    assert event.type in EVENT_TYPES
    assert event.channel == "app"
    assert isinstance(event.message_id, str) and event.message_id
    assert type(event.timestamp_ms) is int
    assert event.identifiers and all(isinstance(i, Identifier) and i.type and i.value for i in event.identifiers)
    assert len(set(event.identifiers)) == len(event.identifiers)
    for field in ("traits", "properties", "context", "payload"):
        assert isinstance(getattr(event, field), dict)
    if event.type == "track":
        assert isinstance(event.event, str) and event.event.strip()


@fuzz(1500)
@given(event_bytes())
def test_parse_event_accepts_or_rejects_with_a_documented_reason(raw):
    first = verdict(raw)
    if isinstance(first, InvalidEvent):
        assert str(first.reason) in REASONS
        assert isinstance(first.detail, str) and first.detail
        assert first.field is None or isinstance(first.field, str)
        again = verdict(raw)
        assert isinstance(again, InvalidEvent) and (again.reason, again.detail, again.field) == (first.reason, first.detail, first.field)
        return
    check_event(first)
    again = verdict(raw)
    assert isinstance(again, Event)
    assert dataclasses.astuple(again) == dataclasses.astuple(first), "the same bytes give the same event"


@fuzz(250)
@given(st.lists(event_bytes() | st.none(), max_size=25))
def test_split_batch_gives_every_record_exactly_one_verdict(values):
    records = [Record("cdp.events.pos", 3, 1000 + i, None, value, FALLBACK_MS) for i, value in enumerate(values)]
    accepted, rejected = split_batch(records, default_region="US")
    assert len(accepted) + len(rejected) == len(records)
    assert [a.record.offset for a in accepted] == sorted(a.record.offset for a in accepted), "input order kept"
    assert [r.record.offset for r in rejected] == sorted(r.record.offset for r in rejected), "input order kept"
    assert {a.record.offset for a in accepted} | {r.record.offset for r in rejected} == {r.offset for r in records}
    for item in accepted:
        assert isinstance(item, Accepted)
        check_event(dataclasses.replace(item.event, channel="app"))
        assert item.event.channel == "pos"
    for item in rejected:
        assert isinstance(item, Rejected)
        assert item.reason in REASONS, f"{item.reason}: {item.detail}"  # never processing_error
        assert item.detail
        if item.record.value is None:
            assert item.reason == "empty"
