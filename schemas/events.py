"""Inbound events: the typed :class:`Event` and :func:`parse_event`, the ingest gate.

``parse_event`` turns one raw Kafka value (a Segment Spec JSON object, as sent by
the Segment and RudderStack SDKs) into an immutable :class:`Event`, or raises
:class:`~schemas.errors.InvalidEvent` carrying a :class:`RejectReason`, a readable
detail and the JSON path of the bad field: everything the dead-letter record needs.

>>> ev = parse_event(
...     b'{"type":"track","event":"Order Completed","userId":" u-17 ",'
...     b'"timestamp":"2026-11-20T10:00:00Z","context":{"traits":{"email":"Ann@Example.com"}}}',
...     channel="pos", fallback_timestamp_ms=0)
>>> ev.user_id, ev.timestamp_ms, [str(i) for i in ev.identifiers]
('u-17', 1795168800000, ['user_id:u-17', 'email:ann@example.com'])
>>> parse_event(b'{"type":"track","userId":17,"event":"x"}', channel="web", fallback_timestamp_ms=0)
Traceback (most recent call last):
...
schemas.errors.InvalidEvent: schema_violation at userId: must be a string or null, got number

The checks run in a fixed order, cheapest and most fundamental first, so every bad
message gets exactly one, predictable reason: empty → oversize → invalid UTF-8 →
invalid JSON → not an object → too deep → unknown type → schema violation →
invalid trait name → invalid identifier → no identifier.
``schemas/json/event.schema.json`` states the same contract as JSON Schema for
producers; ``tests/unit/test_schema_conformance.py`` keeps the two in step.

Hot path: no jsonschema, no recursion, precompiled patterns, and the containers of
the parsed payload are shared with the Event rather than copied (treat them as
read-only).
"""

from __future__ import annotations

import json as _stdlib_json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from hashlib import blake2b

import orjson

from schemas.errors import InvalidEvent
from schemas.identifiers import (
    IDENTIFIER_PRIORITY,
    MAX_ID_LENGTH,
    MAX_TYPE_LENGTH,
    Identifier,
    collect_identifiers,
    normalize_identifier,
    normalize_type,
    phone_region,
)

__all__ = [
    "RejectReason",
    "MAX_EVENT_BYTES",
    "MAX_DEPTH",
    "EVENT_TYPES",
    "DATE_TIME_PATTERN",
    "MAX_TRAIT_NAME_LENGTH",
    "TRAIT_NAME_FORBIDDEN",
    "IDENTIFIER_PRIORITY",
    "Identifier",
    "Event",
    "parse_event",
]


class RejectReason(StrEnum):
    """Why ingest rejected an event: the ``cdp.dlq.reason`` header of its dead letter."""

    EMPTY = "empty"
    OVERSIZE = "oversize"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    TOO_DEEP = "too_deep"
    UNKNOWN_TYPE = "unknown_type"
    SCHEMA_VIOLATION = "schema_violation"
    NO_IDENTIFIER = "no_identifier"
    INVALID_IDENTIFIER = "invalid_identifier"
    INVALID_TRAIT_NAME = "invalid_trait_name"


#: Segment's documented per-message limit; checked before anything is parsed.
MAX_EVENT_BYTES = 32 * 1024
#: Deepest allowed nesting of objects and arrays; the top-level object is depth 1.
MAX_DEPTH = 32
EVENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})

#: The date-time shape accepted for timestamp, originalTimestamp, sentAt, receivedAt:
#: ISO-8601 extended date, "T" or a space, hh:mm[:ss[.fraction]], optional offset
#: ("Z", "+hh", "+hhmm" or "+hh:mm"); no offset means UTC. The same pattern is in
#: schemas/json/event.schema.json. Values must also be real dates (no 2026-02-30).
DATE_TIME_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}"
    r"(?::[0-9]{2}(?:\.[0-9]{1,9})?)?(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?$"
)

#: Longest trait name accepted, in characters (code points).
MAX_TRAIT_NAME_LENGTH = 128
#: What a trait name must not contain, as a regular expression that finds it: a "."
#: (reserved: profiles store nested traits by dotted path, ``address.city``, and
#: segment rules address them that way), a control character (C0, DEL, C1:
#: U+0000-U+001F, U+007F-U+009F), or a leading "$" (reserved). A name must also be
#: non-empty and at most MAX_TRAIT_NAME_LENGTH long. This applies at every level of
#: ``traits`` / ``context.traits`` (the keys of nested objects too; objects inside
#: arrays are values and are not checked). The ``traitName`` rule of
#: schemas/json/event.schema.json uses the same pattern under "not": a pattern for
#: the valid names would need an end anchor, and "$" also matches before a final
#: newline in Python's re (so jsonschema would accept "name\n").
TRAIT_NAME_FORBIDDEN = r"[.\u0000-\u001f\u007f-\u009f]|^\$"

_DATE_TIME = re.compile(DATE_TIME_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_UTC = timezone.utc
_TYPES_TEXT = ", ".join(sorted(EVENT_TYPES))
_JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
_DETAIL_PREVIEW = 60

# One bytes.translate pass serves two cheap pre-checks:
# * orjson turns integers outside [-2**63, 2**64) into lossy floats instead of failing;
#   such an integer needs at least 19 digits in a row, so with every digit mapped to
#   "0" a plain substring search finds the (rare) candidates;
# * with "[" mapped to "{", one count bounds the nesting depth from above, so most
#   events skip the walk over the parsed tree.
_SCAN_TABLE = bytes(0x30 if 0x30 <= b <= 0x39 else 0x7B if b == 0x5B else b for b in range(256))
_LONG_DIGIT_RUN = b"0" * 19
_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1

_TIMESTAMP_FIELDS = ("timestamp", "originalTimestamp", "receivedAt", "sentAt")

# Trait names found valid so far. Producers send the same few dozen names again and
# again, so one C-level issuperset() call clears a whole traits object; only names
# not seen before get the exact check. Bounded: when full, new valid names are still
# accepted, just checked each time. Only valid names enter, so the cache never
# changes a verdict.
_VALID_NAMES: set[str] = set()
_VALID_NAMES_MAX = 4096
_all_known = _VALID_NAMES.issuperset
_CONTROL_CHAR = re.compile("[\\x00-\\x1f\\x7f-\\x9f]")
_dict = dict


@dataclass(frozen=True, slots=True)
class Event:
    """One validated inbound event.

    ``traits``, ``properties``, ``context`` and ``payload`` share structure with the
    parsed JSON; treat them as read-only.
    """

    type: str
    #: ``messageId``; when absent ``"cdp-" + blake2b(raw bytes, 16).hexdigest()``, so a
    #: redelivery of the same bytes deduplicates.
    message_id: str
    #: Event time in ms since the epoch: ``timestamp``, else ``originalTimestamp``,
    #: else ``receivedAt``, else the Kafka record time given to parse_event.
    timestamp_ms: int
    #: Source channel from the topic (web/app/pos); ``context.channel`` stays in context.
    channel: str
    event: str | None  # track event name
    name: str | None  # page/screen name
    user_id: str | None  # trimmed; None if absent or empty
    anonymous_id: str | None
    previous_id: str | None  # alias only
    group_id: str | None
    #: User traits: top-level ``traits`` merged over ``context.traits`` (top level wins).
    #: On group events top-level ``traits`` are the group's, so only ``context.traits``.
    traits: dict
    properties: dict
    context: dict
    #: Normalised, deduplicated, strongest first (IDENTIFIER_PRIORITY); never empty.
    identifiers: tuple[Identifier, ...]
    payload: dict  # the whole parsed JSON object, untouched

    def best_identifier(self) -> Identifier:
        """The strongest identifier (``identifiers[0]``)."""
        return self.identifiers[0]


# A frozen dataclass's generated __init__ sets each field through object.__setattr__,
# which costs about as much as the rest of the happy path's field checks. parse_event
# fills the slots directly instead; the result is an ordinary Event. The order is
# dataclasses.fields(Event), asserted by the unit tests.
_EVENT_SLOTS = tuple(Event.__dict__[name].__set__ for name in Event.__slots__)
_new_object = object.__new__


def _new_event(*values: object) -> Event:
    event = _new_object(Event)
    for set_slot, value in zip(_EVENT_SLOTS, values):
        set_slot(event, value)
    return event


# ---------------------------------------------------------------------- helpers


def _json_type(value: object) -> str:
    kind = type(value)
    return _JSON_TYPE_NAMES.get(kind, kind.__name__)


def _preview(value: object) -> str:
    """A short, printable rendering of a JSON value for a detail message."""
    if type(value) is str:
        text = value if len(value) <= _DETAIL_PREVIEW else value[:_DETAIL_PREVIEW] + "…"
        return repr(text)
    text = orjson.dumps(value).decode()
    return text if len(text) <= _DETAIL_PREVIEW else text[:_DETAIL_PREVIEW] + "…"


def _violation(field: str, detail: str) -> InvalidEvent:
    return InvalidEvent(RejectReason.SCHEMA_VIOLATION, detail, field)


def _id_field(container: dict, key: str, path: str) -> str | None:
    """An id-like field: string (≤ MAX_ID_LENGTH chars) or null; blank counts as absent."""
    value = container.get(key)
    if value is None:
        return None
    if type(value) is not str:
        raise _violation(path, f"must be a string or null, got {_json_type(value)}")
    if len(value) > MAX_ID_LENGTH:
        raise _violation(path, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    return value.strip() or None


def _object_field(container: dict, key: str, path: str) -> dict | None:
    value = container.get(key)
    if value is None or type(value) is dict:
        return value
    raise _violation(path, f"must be an object or null, got {_json_type(value)}")


def _string_field(container: dict, key: str, path: str) -> str | None:
    value = container.get(key)
    if value is None or type(value) is str:
        return value
    raise _violation(path, f"must be a string or null, got {_json_type(value)}")


def _time_field(payload: dict, key: str) -> datetime | None:
    value = payload.get(key)
    if value is None:
        return None
    if type(value) is not str:
        raise _violation(key, f"must be an ISO-8601 date-time string or null, got {_json_type(value)}")
    if _DATE_TIME.fullmatch(value) is None:
        raise _violation(
            key, f"must be an ISO-8601 date-time such as 2026-11-20T10:00:00Z, got {_preview(value)}"
        )
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:  # right shape, impossible value: month 13, Feb 30, ...
        raise _violation(key, f"is not a valid date-time ({exc}): {_preview(value)}") from None
    return moment


def _to_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return (moment - _EPOCH) // _ONE_MS  # exact integer arithmetic, floors sub-ms


def _too_deep(root: object) -> bool:
    """True if containers nest deeper than MAX_DEPTH (root is depth 1); no recursion."""
    stack = [(root, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        children = node.values() if type(node) is dict else node
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                if depth >= MAX_DEPTH:
                    return True
                if child:
                    push((child, depth + 1))
    return False


def _out_of_range_integer(raw: bytes) -> str | None:
    """The first JSON integer outside 64 bits in ``raw`` (valid JSON), else None."""
    found: list[str] = []

    def parse_int(text: str) -> int:
        digits = len(text) - (text[0] == "-")
        # Compare by length first: int() refuses > 4300 digits.
        if digits > 20 or not _MIN_INT <= int(text) <= _MAX_INT:
            found.append(text)
            return 0
        return int(text)

    _stdlib_json.loads(raw, parse_int=parse_int)
    return found[0] if found else None


def _decode_error(raw: bytes, exc: orjson.JSONDecodeError) -> InvalidEvent:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return InvalidEvent(
            RejectReason.INVALID_UTF8,
            f"invalid UTF-8 at byte {bad.start} (0x{raw[bad.start]:02x}): {bad.reason}",
        )
    message = str(exc)
    if message.startswith("depth limit exceeded"):  # orjson's own limit (1024)
        return InvalidEvent(
            RejectReason.TOO_DEEP, f"objects/arrays nest deeper than {MAX_DEPTH} levels ({message})"
        )
    if len(message) > 200:
        message = message[:199] + "…"
    return InvalidEvent(RejectReason.INVALID_JSON, message)


def _external_ids(context: dict) -> list[tuple[str, str]]:
    """Validate ``context.externalIds``; return its ``(normalised type, id)`` pairs."""
    items = context.get("externalIds")
    if items is None:
        return []
    if type(items) is not list:
        raise _violation("context.externalIds", f"must be an array or null, got {_json_type(items)}")
    pairs = []
    for index, item in enumerate(items):
        if type(item) is not dict:
            raise _violation(
                f"context.externalIds[{index}]",
                f"must be an object with string id and type, got {_json_type(item)}",
            )
        ext_id = item.get("id")
        ext_type = item.get("type")
        if type(ext_id) is not str or len(ext_id) > MAX_ID_LENGTH:
            raise _external_id_violation(index, "id", ext_id)
        if type(ext_type) is not str:
            raise _external_id_violation(index, "type", ext_type)
        normalised = normalize_type(ext_type) if len(ext_type) <= MAX_TYPE_LENGTH else None
        if normalised is None:
            raise _external_id_violation(index, "type", ext_type)
        if len(item) > 2:
            for optional in ("collection", "encoding"):
                value = item.get(optional)
                if value is not None and type(value) is not str:
                    raise _external_id_violation(index, optional, value)
        pairs.append((normalised, ext_id))
    return pairs


def _external_id_violation(index: int, key: str, value: object) -> InvalidEvent:
    path = f"context.externalIds[{index}].{key}"
    if value is None:
        return _violation(path, "is required")
    if type(value) is not str:
        optional = key in ("collection", "encoding")
        return _violation(path, f"must be a string{' or null' if optional else ''}, got {_json_type(value)}")
    if key == "id":
        return _violation(path, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    return _violation(
        path,
        f"must be a non-blank name of at most {MAX_TYPE_LENGTH} characters without ':', got {_preview(value)}",
    )


def _trait_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid trait name, or None if it is one."""
    if not name:
        return "is empty"
    if len(name) > MAX_TRAIT_NAME_LENGTH:
        return f"is {len(name)} characters long; the limit is {MAX_TRAIT_NAME_LENGTH}"
    control = _CONTROL_CHAR.search(name)
    if control is not None:
        return f"contains the control character U+{ord(control.group()):04X}"
    if "." in name:
        return (
            "contains '.', which is reserved (nested traits are stored by dotted path):"
            ' send an object instead, e.g. {"address": {"city": ...}}'
        )
    if name[0] == "$":
        return "starts with '$', which is reserved"
    return None


def _check_trait_names(traits: dict, path: str) -> None:
    """Raise INVALID_TRAIT_NAME for the first bad key of ``traits`` or of an object
    nested in it; ``path`` names ``traits`` in the event (``traits``, ``context.traits``)
    and becomes the error's field, extended for nested objects (``traits.address``).

    Per object: one issuperset() against the known-valid names and one scan of the
    value types for nested objects, both in C; a flat object of names seen before
    costs just these two calls."""
    if not _all_known(traits):
        _check_new_names(traits, path)
    if _dict in map(type, traits.values()):
        _check_nested_trait_names(traits, path)


def _check_nested_trait_names(traits: dict, path: str) -> None:
    """The nested objects of ``traits``, depth first, without recursion. Objects
    inside arrays are values, not traits, and are not checked."""
    pending = None
    while True:
        for name, value in traits.items():
            if type(value) is _dict and value:
                inner = path + "." + name
                if not _all_known(value):
                    _check_new_names(value, inner)
                if _dict in map(type, value.values()):
                    if pending is None:
                        pending = []
                    pending.append((value, inner))
        if not pending:
            return
        traits, path = pending.pop()


def _check_new_names(traits: dict, path: str) -> None:
    for name in traits:
        if name in _VALID_NAMES:
            continue
        problem = _trait_name_problem(name)
        if problem is not None:
            raise InvalidEvent(RejectReason.INVALID_TRAIT_NAME, f"trait name {_preview(name)} {problem}", path)
        if len(_VALID_NAMES) < _VALID_NAMES_MAX:
            _VALID_NAMES.add(name)


def _no_identifier(trait_sources: list[tuple[str, dict]], default_region: str) -> InvalidEvent:
    notes = []
    for prefix, traits in trait_sources:
        for key in ("email", "phone"):
            value = traits.get(key)
            if value is not None and normalize_identifier(key, value, default_region) is None:
                notes.append(f"{prefix}.{key} {_preview(value)} is not a usable {key}")
    detail = (
        "no usable identifier: send userId, anonymousId, traits.email, traits.phone,"
        " context.device.id or context.externalIds"
    )
    if notes:
        detail += " (" + "; ".join(notes) + ")"
    return InvalidEvent(RejectReason.NO_IDENTIFIER, detail)


# ------------------------------------------------------------------- the gate


def parse_event(raw: bytes, *, channel: str, fallback_timestamp_ms: int, default_region: str = "US") -> Event:
    """Validate one raw Kafka value and return the typed Event, or raise InvalidEvent(reason, detail, field).

    ``channel`` is the source channel (web/app/pos, from the topic);
    ``fallback_timestamp_ms`` the Kafka record time, used when the event carries no
    time of its own; ``default_region`` the phone region for national numbers (an
    unknown region raises :class:`~schemas.errors.ConfigError`).
    """
    phone_region(default_region)  # fail loudly on bad configuration, not on bad input

    # 1. Bytes.
    if not raw or raw.isspace():
        raise InvalidEvent(RejectReason.EMPTY, "the message is empty" if not raw else "the message is only whitespace")
    size = len(raw)
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(RejectReason.OVERSIZE, f"the message is {size} bytes; the limit is {MAX_EVENT_BYTES} bytes")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(raw, exc) from None
    scan = raw.translate(_SCAN_TABLE)
    if _LONG_DIGIT_RUN in scan:
        too_big = _out_of_range_integer(raw)
        if too_big is not None:
            raise InvalidEvent(
                RejectReason.INVALID_JSON, f"integer {_preview(too_big)[1:-1]} does not fit in 64 bits"
            )

    # 2. Structure.
    if type(payload) is not dict:
        raise InvalidEvent(
            RejectReason.NOT_AN_OBJECT, f"the message must be a JSON object, got {_json_type(payload)}"
        )
    # Fewer brackets than the limit cannot nest too deep: skip the walk for most events.
    if scan.count(b"{") > MAX_DEPTH and _too_deep(payload):
        raise InvalidEvent(RejectReason.TOO_DEEP, f"objects/arrays nest deeper than {MAX_DEPTH} levels")
    event_type = payload.get("type")
    if type(event_type) is not str or event_type not in EVENT_TYPES:
        if event_type is None:
            detail = f"'type' is missing; expected one of {_TYPES_TEXT}"
        else:
            detail = f"unknown event type {_preview(event_type)}; expected one of {_TYPES_TEXT}"
        raise InvalidEvent(RejectReason.UNKNOWN_TYPE, detail, "type")

    # 3. Schema.
    message_id = _id_field(payload, "messageId", "messageId")
    user_id = _id_field(payload, "userId", "userId")
    anonymous_id = _id_field(payload, "anonymousId", "anonymousId")
    previous_id = _id_field(payload, "previousId", "previousId")
    group_id = _id_field(payload, "groupId", "groupId")

    event_name = None
    name = None
    if event_type == "track":
        event_name = payload.get("event")
        if type(event_name) is not str:
            detail = (
                "is required for track events"
                if event_name is None
                else f"must be a string, got {_json_type(event_name)}"
            )
            raise _violation("event", detail)
        if not event_name.strip():
            raise _violation("event", "must not be empty for track events")
    elif event_type == "page" or event_type == "screen":
        name = _string_field(payload, "name", "name") or None
    elif event_type == "alias":
        if previous_id is None:
            raise _violation("previousId", "is required (non-empty) for alias events")
        if user_id is None:
            raise _violation("userId", "is required (non-empty) for alias events")
    elif event_type == "group":
        if group_id is None:
            raise _violation("groupId", "is required (non-empty) for group events")
    if event_type != "alias":
        previous_id = None

    properties = _object_field(payload, "properties", "properties")
    top_traits = _object_field(payload, "traits", "traits")
    _object_field(payload, "integrations", "integrations")

    context = _object_field(payload, "context", "context")
    context_traits = None
    device_id = None
    external = ()
    if context:
        context_traits = _object_field(context, "traits", "context.traits")
        device = _object_field(context, "device", "context.device")
        if device:
            device_id = _id_field(device, "id", "context.device.id")
        if "externalIds" in context:
            external = _external_ids(context)

    timestamp_ms = fallback_timestamp_ms
    chosen = None
    for key in _TIMESTAMP_FIELDS:
        if key in payload:
            moment = _time_field(payload, key)
            if chosen is None and moment is not None and key != "sentAt":
                chosen = moment
    if chosen is not None:
        timestamp_ms = _to_ms(chosen)

    # Trait names, at every level of nested objects; on group events too (there the
    # top-level traits describe the group, but the same naming rules apply).
    if top_traits:
        _check_trait_names(top_traits, "traits")
    if context_traits:
        _check_trait_names(context_traits, "context.traits")

    # 4. Traits and identifiers. Top-level traits of a group call describe the group.
    if event_type == "group":
        top_traits = None
    if top_traits and context_traits:
        traits = {**context_traits, **top_traits}
    else:
        traits = top_traits or context_traits or {}

    candidates: list[tuple[str, object]] = []
    if user_id is not None:
        candidates.append(("user_id", user_id))
    trait_sources = []
    if top_traits:
        trait_sources.append(("traits", top_traits))
    if context_traits:
        trait_sources.append(("context.traits", context_traits))
    for key in ("email", "phone"):
        for prefix, source in trait_sources:
            value = source.get(key)
            if value is None or value == "":
                continue
            if normalize_identifier(key, value, default_region) is None:
                # An identifier field that cannot be used is refused rather than
                # ignored: it would otherwise slip into traits and never link.
                raise InvalidEvent(
                    RejectReason.INVALID_IDENTIFIER,
                    f"{prefix}.{key} {_preview(value)} is not a usable {key}"
                    + (" (expected local@domain.tld)" if key == "email" else f" (E.164, default region {default_region})"),
                    f"{prefix}.{key}",
                )
            candidates.append((key, value))
    candidates.extend(external)
    if device_id is not None:
        candidates.append(("device_id", device_id))
    if anonymous_id is not None:
        candidates.append(("anonymous_id", anonymous_id))
    if previous_id is not None:
        candidates.append(("previous_id", previous_id))
    identifiers = collect_identifiers(candidates, default_region)
    if not identifiers:
        raise _no_identifier(trait_sources, default_region)

    if message_id is None:
        message_id = "cdp-" + blake2b(raw, digest_size=16).hexdigest()

    return _new_event(
        event_type,
        message_id,
        timestamp_ms,
        channel,
        event_name,
        name,
        user_id,
        anonymous_id,
        previous_id,
        group_id,
        traits,
        properties if properties is not None else {},
        context if context is not None else {},
        identifiers,
        payload,
    )
