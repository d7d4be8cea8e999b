"""The segments a worker knows, from the compacted topic ``cdp.segment-definitions``.

``streamcdp segments apply FILE`` publishes a definition keyed by its id; ``segments
delete ID`` publishes a tombstone. Every worker reads the whole topic at start (the
hot path waits until it has caught up) and then follows it, so a new or changed
segment reaches every worker without a restart. Each change swaps in a new immutable
:class:`SegmentSet`; listeners (the back-fill) hear about new and changed segments.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import orjson

from agents.activation.destinations import Destinations
from agents.profiles.computed import ComputedTraits, event_name
from agents.segments import rules
from schemas.errors import ConfigError
from schemas.events import Event

log = logging.getLogger(__name__)


class SegmentSet:
    """Segments by id and their index (``agents.segments.rules.SegmentIndex``)."""

    def __init__(self, segments: Mapping[str, object], computed: ComputedTraits) -> None:
        self.segments = dict(segments)
        self._index = rules.SegmentIndex(list(self.segments.values()), computed)
        # Whether a consent choice can change anything: some segment names a destination.
        self.activating = any(getattr(s, "destinations", ()) for s in self.segments.values())

    def affected_by(self, event: Event, *, new_profile: bool = False):
        return self._index.affected_by(event, new_profile=new_profile)

    def conditions(self):
        return self._index.conditions()

    def conditions_for(self, event: Event):
        return self._index.conditions_for(event_name(event))


class Retired:
    """A deleted segment, for the sweep that exits its members: never holds."""

    chosen_traits: tuple = ()

    def __init__(self, segment_id: str, version: int) -> None:
        self.id = segment_id
        self.version = version
        self.fingerprint = f"retired:{segment_id}@{version}"

    def evaluate(self, view) -> bool:
        return False


class SegmentRegistry:
    def __init__(self, computed: ComputedTraits, destinations: Destinations | None = None) -> None:
        self.computed = computed
        # The destinations this worker activates (config/destinations.yaml); a segment
        # naming another one is still evaluated, but not activated there.
        self.destinations = destinations if destinations is not None else Destinations()
        self._unknown: set[tuple[str, str]] = set()
        self.index = SegmentSet({}, computed)
        self.loaded = asyncio.Event()
        self._listeners: list[Callable[[object], None]] = []

    def unknown_destination(self, segment_id: str, name: str) -> None:
        """Log once per segment and destination that the destination is not configured."""
        if (segment_id, name) not in self._unknown:
            self._unknown.add((segment_id, name))
            log.warning(
                "segment %s names destination %r, which this worker's destinations file does not define; "
                "its members are not activated there", segment_id, name,
            )

    def listen(self, callback: Callable[[object], None]) -> None:
        """``callback(segment)`` for every new or changed segment, once loaded."""
        self._listeners.append(callback)

    def apply_record(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the definitions topic: a definition, or a tombstone."""
        segment_id = key.decode() if key else None
        if value is None:
            if segment_id and segment_id in self.index.segments:
                segments = dict(self.index.segments)
                retired = Retired(segment_id, segments.pop(segment_id).version)
                self.index = SegmentSet(segments, self.computed)
                log.info("segment %s deleted", segment_id)
                if self.loaded.is_set():
                    for listener in self._listeners:
                        listener(retired)  # its members exit
            return
        try:
            segment = rules.parse_segment(
                orjson.loads(value), source=f"cdp.segment-definitions key {segment_id!r}", computed=self.computed
            )
        except (ConfigError, ValueError) as exc:
            log.error("ignoring a bad segment definition: %s", exc)
            return
        held = self.index.segments.get(segment.id)
        if held is not None and held.fingerprint == segment.fingerprint:
            return
        self.index = SegmentSet({**self.index.segments, segment.id: segment}, self.computed)
        log.info("segment %s version %s %s", segment.id, segment.version, "changed" if held else "added")
        if self.loaded.is_set():
            for listener in self._listeners:
                listener(segment)
