"""Computed traits: aggregates over a profile's events, kept up to date per event.

Definitions are data (``config/computed-traits.yaml``, or the file
``CDP_COMPUTED_TRAITS`` names; the language is in ``docs/computed-traits.md``)::

    computed_traits:
      - {name: order_count, aggregate: count, events: [Order Completed]}
      - name: total_spend
        aggregate: sum
        events: [Order Completed]
        property: properties.total
        per: properties.currency

Two pure halves, with Redis in between:

* :meth:`ComputedTraits.plan` turns one event into update operations on the
  profile's ``computed`` hash (``ADD``/``MIN``/``MAX``/``FIRST``/``LAST``/``SET``/
  ``WIN``; the Lua step in ``agents.profiles.lua`` applies them in the same atomic
  step as the event's de-duplication record, so a redelivered event adds nothing
  twice);
* :meth:`ComputedTraits.present` turns the stored fields back into the profile
  JSON's ``computedTraits`` (averages, window sums and RFM scores are derived here,
  at read time, because they depend on the clock).

Stored fields name their own merge rule by a prefix (``add:``, ``min:``, ``max:``,
``first:``, ``last:``, ``set:``, ``win:``), so folding two profiles after a
merge needs no configuration: sums add up, minima take the smaller, ``first``/``last``
keep the earlier/later event time, sets unite, window buckets add up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from schemas.errors import ConfigError
from schemas.events import Event
from streams.config_files import load_document
from streams.texts import iso_ms

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "config" / "computed-traits.yaml"
AGGREGATES = ("count", "sum", "avg", "min", "max", "first", "last", "distinct", "rfm")
_NEEDS_PROPERTY = {"sum", "avg", "min", "max", "distinct", "rfm", "first", "last"}
_WINDOWED = {"count", "sum", "avg"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Segment event conditions keep their counters beside the computed traits, as
# "win:c<12 hex>" / "add:c<12 hex>" (agents.segments.rules.EventCondition.id).
_CONDITION_NAME = re.compile(r"c[0-9a-f]{12}")
_DURATION = re.compile(r"\s*(\d+)\s*(s|m|h|d)\s*")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# Group and distinct values are kept short: they become hash fields and values.
MAX_TEXT = 64
OTHER_GROUP = "(other)"
NO_GROUP = "(none)"
# ASCII unit separator: joins the values of a ``distinct`` set in one hash value.
SEPARATOR = "\x1f"
# Default RFM scales: (recency days, frequency, monetary) thresholds for scores 5..2.
_RFM_DEFAULT = {"recency_days": [7, 30, 90, 180], "frequency": [16, 8, 4, 2], "monetary": [1000, 500, 250, 100]}

# Lua operation codes (agents/profiles/lua.py).
ADD, MIN, MAX, FIRST, LAST, SET, WIN = "add", "min", "max", "first", "last", "set", "win"


@dataclass(frozen=True, slots=True)
class RfmScale:
    """Thresholds for scores 5, 4, 3, 2 (anything else scores 1)."""

    recency_days: tuple[float, ...]  # ascending: at most this many days since the last event
    frequency: tuple[float, ...]  # descending: at least this many events
    monetary: tuple[float, ...]  # descending: at least this much in total

    def score(self, days: float, count: float, total: float) -> dict:
        recency = 5 - next((i for i, d in enumerate(self.recency_days) if days <= d), 4)
        frequency = 5 - next((i for i, f in enumerate(self.frequency) if count >= f), 4)
        monetary = 5 - next((i for i, m in enumerate(self.monetary) if total >= m), 4)
        return {
            "recency": recency, "frequency": frequency, "monetary": monetary,
            "score": f"{recency}{frequency}{monetary}",
            "daysSinceLast": round(days, 2), "count": _number(count), "total": _number(total),
        }


@dataclass(frozen=True, slots=True)
class ComputedTrait:
    name: str
    aggregate: str
    events: frozenset[str] | None  # None: every event
    paths: tuple[tuple[str, ...], ...]  # the property, or several (first/last: an object of them)
    per: tuple[str, ...] | None  # group by this path
    where: tuple[tuple[tuple[str, ...], frozenset], ...]
    within_ms: int | None
    buckets: int
    limit: int  # most distinct values / groups kept
    rfm: RfmScale | None = None

    @property
    def bucket_ms(self) -> int:
        assert self.within_ms is not None
        return max(1000, -(-self.within_ms // self.buckets))


def event_name(event: Event) -> str:
    """The name events are selected and grouped by: a track call's ``event``; for
    the other calls their type (``page``, ``screen``, ``identify``, ...)."""
    return event.event if event.type == "track" and event.event else event.type


def resolve(event: Event, path: tuple[str, ...]) -> list:
    """Every value at ``path`` in the event, through lists (``properties.products.category``
    gives one value per product). The first segment may be ``event`` (the event's
    name, see :func:`event_name`), ``channel`` (the input channel), ``type``, or a
    top-level field of the payload (``properties``, ``context``, ``traits``, ...);
    ``traits`` means the event's merged user traits."""
    head = path[0]
    if head == "event" and len(path) == 1:
        return [event_name(event)]
    if head == "channel" and len(path) == 1:
        return [event.channel]
    if head == "properties":
        roots = [event.properties]
    elif head == "traits":
        roots = [event.traits]
    elif head == "context":
        roots = [event.context]
    else:
        roots = [event.payload.get(head)]
    for segment in path[1:]:
        found = []
        for value in roots:
            _descend(value, segment, found)
        if not found:
            return []
        roots = found
    out: list = []
    for value in roots:
        if isinstance(value, list):
            out.extend(v for v in value if v is not None)
        elif value is not None:
            out.append(value)
    return out


def _descend(value, segment: str, into: list) -> None:
    if isinstance(value, dict):
        child = value.get(segment)
        if child is not None:
            into.append(child)
    elif isinstance(value, list):
        for item in value:
            _descend(item, segment, into)


def _numeric(values: Iterable) -> list[float]:
    numbers = []
    for value in values:
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                continue
        else:
            continue
        if math.isfinite(number):
            numbers.append(number)
    return numbers


def _text(value) -> str | None:
    """A scalar as group or set text (None for objects, lists and empty text)."""
    if isinstance(value, str):
        text = value.strip().replace(SEPARATOR, " ")
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = _format(value)
    else:
        return None
    return text[:MAX_TEXT] or None


def _format(number: float) -> str:
    if isinstance(number, float) and number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def _number(value: float) -> int | float:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return round(value, 6) if isinstance(value, float) else value


class ComputedTraits:
    """The configured computed traits, indexed by the event names they read."""

    def __init__(self, traits: Sequence[ComputedTrait]) -> None:
        self.traits = tuple(traits)
        self.by_name = {t.name: t for t in self.traits}
        self.names = frozenset(self.by_name)
        self._every: list[ComputedTrait] = [t for t in self.traits if t.events is None]
        self._by_event: dict[str, list[ComputedTrait]] = {}
        for trait in self.traits:
            for name in trait.events or ():
                self._by_event.setdefault(name, []).append(trait)
        # Per event name: the traits that read it, in configuration order.
        self._cache: dict[str, tuple[ComputedTrait, ...]] = {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ComputedTraits":
        document = load_document(path, DEFAULT_PATH, "computed traits")
        if document is None:
            return cls([])
        return cls.parse(document, source=str(path or DEFAULT_PATH))

    @classmethod
    def parse(cls, document: object, source: str = "computed traits") -> "ComputedTraits":
        if not isinstance(document, Mapping) or set(document) - {"computed_traits"}:
            raise ConfigError(f"{source}: expected a mapping with one key, computed_traits")
        entries = document.get("computed_traits") or []
        if not isinstance(entries, list):
            raise ConfigError(f"{source}: computed_traits must be a list")
        traits, seen = [], set()
        for index, entry in enumerate(entries):
            trait = _parse_trait(entry, f"{source}: computed_traits[{index}]")
            if trait.name in seen:
                raise ConfigError(f"{source}: computed_traits[{index}].name: {trait.name!r} is defined twice")
            seen.add(trait.name)
            traits.append(trait)
        return cls(traits)

    def _for(self, name: str) -> tuple[ComputedTrait, ...]:
        found = self._cache.get(name)
        if found is None:
            wanted = set(map(id, self._by_event.get(name, ()))) | set(map(id, self._every))
            found = tuple(t for t in self.traits if id(t) in wanted)
            if len(self._cache) < 10_000:
                self._cache[name] = found
        return found

    def plan(self, event: Event) -> list:
        """The update operations of ``event``, flat: ``(op, field, group, value, extra)``
        per operation, as the Lua step reads them."""
        ops: list = []
        for trait in self._for(event_name(event)):
            if trait.where and not all(_matches(resolve(event, path), allowed) for path, allowed in trait.where):
                continue
            _plan_one(trait, event, ops)
        return ops

    def present(self, fields: Mapping[str, str], now_ms: int) -> dict:
        """``computedTraits`` of the profile JSON from the stored fields."""
        stored = _Stored(fields)
        return {trait.name: _present_one(trait, stored, now_ms) for trait in self.traits}

    def lazy(self, fields: Mapping[str, str], now_ms: int) -> "LazyComputed":
        """The same values as :meth:`present`, each worked out when first read
        (segment rules read a few of them, for many events)."""
        return LazyComputed(self, fields, now_ms)


class LazyComputed(Mapping):
    def __init__(self, traits: "ComputedTraits", fields: Mapping[str, str], now_ms: int) -> None:
        self._by_name = traits.by_name
        self._names = traits.names
        self._fields = fields
        self._now = now_ms
        self._stored: _Stored | None = None
        self._done: dict = {}

    def __getitem__(self, name: str):
        if name in self._done:
            return self._done[name]
        trait = self._by_name[name]
        if self._stored is None:
            self._stored = _Stored(self._fields, self._names)
        value = self._done[name] = _present_one(trait, self._stored, self._now)
        return value

    def get(self, name: str, default=None):
        # Mapping.get goes through __getitem__ and a KeyError; segment rules call this per read.
        if name in self._done:
            return self._done[name]
        if name not in self._by_name:
            return default
        return self[name]

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


def _matches(values: list, allowed: frozenset) -> bool:
    return any((_text(v) if not isinstance(v, str) else v) in allowed for v in values)


def _plan_one(trait: ComputedTrait, event: Event, ops: list) -> None:
    name, kind, ts = trait.name, trait.aggregate, event.timestamp_ms
    values = resolve(event, trait.paths[0]) if trait.paths and len(trait.paths) == 1 else None
    group = ""
    if trait.per is not None:
        found = [t for t in map(_text, resolve(event, trait.per)) if t]
        group = found[0] if found else NO_GROUP
    limit = trait.limit
    if kind == "count":
        if values is not None and not values:
            return
        if trait.within_ms is not None:
            ops.extend(_window(trait, f"win:{name}", ts, 1))
        else:
            ops.extend((ADD, f"add:{name}", group, 1, limit))
    elif kind in ("sum", "avg"):
        numbers = _numeric(values or ())
        if not numbers:
            return
        total = sum(numbers)
        if kind == "sum":
            if trait.within_ms is not None:
                ops.extend(_window(trait, f"win:{name}", ts, total))
            else:
                ops.extend((ADD, f"add:{name}", group, total, limit))
        elif trait.within_ms is not None:
            ops.extend(_window(trait, f"win:{name}.sum", ts, total))
            ops.extend(_window(trait, f"win:{name}.n", ts, len(numbers)))
        else:
            ops.extend((ADD, f"add:{name}.sum", group, total, limit))
            ops.extend((ADD, f"add:{name}.n", group, len(numbers), limit))
    elif kind in ("min", "max"):
        numbers = _numeric(values or ())
        if numbers:
            ops.extend((kind, f"{kind}:{name}", group, min(numbers) if kind == "min" else max(numbers), limit))
    elif kind in ("first", "last"):
        if len(trait.paths) > 1:
            picked = {}
            for path in trait.paths:
                found = resolve(event, path)
                if found:
                    picked[path[-1]] = found[0] if len(found) == 1 else found
            if not picked:
                return
            value = picked
        else:
            if not values:
                return
            value = values[0] if len(values) == 1 else values
        ops.extend((kind, f"{kind}:{name}", group, b"%d|%s" % (ts, orjson.dumps(value)), limit))
    elif kind == "distinct":
        seen = []
        for text in map(_text, values or ()):
            if text and text not in seen:
                seen.append(text)
        for text in seen:
            ops.extend((SET, f"set:{name}", "", text, limit))
    elif kind == "rfm":
        numbers = _numeric(values or ())
        ops.extend((ADD, f"add:{name}.n", "", 1, limit))
        if numbers:
            ops.extend((ADD, f"add:{name}.sum", "", sum(numbers), limit))
        ops.extend((MAX, f"max:{name}.at", "", ts, limit))


def _window(trait: ComputedTrait, field: str, ts: int, amount: float) -> tuple:
    size = trait.bucket_ms
    keep = -(-trait.within_ms // size) + 1
    return (WIN, field, "", amount, f"{ts // size},{keep}")


class _Stored:
    """Stored fields, parsed once: kind → name(.part) → group → raw value.
    ``names``: only fields of these computed traits are kept (a profile also holds
    the segment conditions' counters in the same hash)."""

    def __init__(self, fields: Mapping[str, str], names: frozenset[str] | None = None) -> None:
        self.by: dict[tuple[str, str], dict[str, str]] = {}
        for field, value in fields.items():
            kind, _, rest = field.partition(":")
            name, _, group = rest.partition("|")
            if names is not None and name.partition(".")[0] not in names:
                continue
            self.by.setdefault((kind, name), {})[group] = value

    def get(self, kind: str, name: str) -> dict[str, str]:
        return self.by.get((kind, name), {})


def _present_one(trait: ComputedTrait, stored: _Stored, now_ms: int):
    name, kind = trait.name, trait.aggregate
    grouped = trait.per is not None

    def shape(values: dict[str, object], default):
        if grouped:
            return dict(sorted(values.items()))
        return values.get("", default)

    if trait.within_ms is not None:
        horizon = now_ms - trait.within_ms
        size = trait.bucket_ms

        def window_sum(field: str) -> float:
            total = 0.0
            for bucket, amount in _buckets(stored.get("win", field).get("", "")):
                if (bucket + 1) * size > horizon:
                    total += amount
            return total

        if kind == "avg":
            n = window_sum(f"{name}.n")
            return _number(window_sum(f"{name}.sum") / n) if n else None
        return _number(window_sum(name))
    if kind in ("count", "sum"):
        return shape({g: _number(float(v)) for g, v in stored.get("add", name).items()}, 0)
    if kind == "avg":
        sums, counts = stored.get("add", f"{name}.sum"), stored.get("add", f"{name}.n")
        return shape({g: _number(float(sums.get(g, 0)) / float(n)) for g, n in counts.items() if float(n)}, None)
    if kind in ("min", "max"):
        return shape({g: _number(float(v)) for g, v in stored.get(kind, name).items()}, None)
    if kind in ("first", "last"):
        out = {}
        times = stored.get("at" + kind, name)
        for group, value in stored.get(kind, name).items():
            ts = times.get(group)
            out[group] = {"value": orjson.loads(value), "at": iso_ms(int(ts)) if ts is not None else None}
        return shape(out, None)
    if kind == "distinct":
        raw = stored.get("set", name).get("")
        return raw.split(SEPARATOR) if raw else []
    if kind == "rfm":
        at = stored.get("max", f"{name}.at").get("")
        if at is None:
            return None
        count = float(stored.get("add", f"{name}.n").get("", 0))
        total = float(stored.get("add", f"{name}.sum").get("", 0))
        days = max(0.0, (now_ms - float(at)) / 86_400_000)
        return trait.rfm.score(days, count, total)
    raise AssertionError(kind)


def _buckets(raw: str) -> list[tuple[int, float]]:
    out = []
    for part in raw.split(";"):
        if part:
            bucket, _, amount = part.partition("=")
            out.append((int(bucket), float(amount)))
    return out


def parse_window(text: object, where: str) -> int:
    """``30d`` → milliseconds (units s, m, h, d)."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(f"{where}: {text!r} is not a window; use a positive number with s, m, h or d (e.g. 30d)")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def _path(text: object, where: str) -> tuple[str, ...]:
    if not isinstance(text, str) or not text.strip() or any(not p for p in text.strip().split(".")):
        raise ConfigError(f"{where}: expected a dotted path such as properties.total, got {text!r}")
    return tuple(text.strip().split("."))


_KEYS = {"name", "aggregate", "event", "events", "property", "per", "where", "within", "buckets", "limit", "scale", "description"}


def _parse_trait(entry: object, where: str) -> ComputedTrait:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with name and aggregate")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; known: {', '.join(sorted(_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}.name: {name!r} is not a name (letters, digits and _, at most 64, not starting with a digit)")
    if _CONDITION_NAME.fullmatch(name):
        raise ConfigError(f"{where}.name: {name!r} looks like a segment condition's counter (c + 12 hex digits); choose another name")
    where = f"{where} ({name})"
    aggregate = entry.get("aggregate")
    if aggregate not in AGGREGATES:
        raise ConfigError(f"{where}.aggregate: {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    if "event" in entry and "events" in entry:
        raise ConfigError(f"{where}: give event or events, not both")
    events = entry.get("events", entry.get("event"))
    if events is None or events == "*":
        selected = None
    else:
        if isinstance(events, str):
            events = [events]
        if not isinstance(events, list) or not events or not all(isinstance(e, str) and e.strip() for e in events):
            raise ConfigError(f"{where}.events: expected an event name or a list of them, got {events!r}")
        selected = frozenset(e.strip() for e in events)
    prop = entry.get("property")
    if prop is None:
        paths: tuple = ()
    elif isinstance(prop, list) and aggregate in ("first", "last") and prop:
        paths = tuple(_path(p, f"{where}.property[{i}]") for i, p in enumerate(prop))
    else:
        paths = (_path(prop, f"{where}.property"),)
    if aggregate in _NEEDS_PROPERTY and not paths:
        raise ConfigError(f"{where}.property: aggregate {aggregate} needs a property (e.g. properties.total)")
    per = _path(entry["per"], f"{where}.per") if entry.get("per") is not None else None
    if per is not None and aggregate in ("distinct", "rfm"):
        raise ConfigError(f"{where}.per: aggregate {aggregate} cannot be grouped")
    within = None
    if entry.get("within") is not None:
        if aggregate not in _WINDOWED:
            raise ConfigError(f"{where}.within: only {', '.join(sorted(_WINDOWED))} take a window, not {aggregate}")
        if per is not None:
            raise ConfigError(f"{where}.within: a windowed trait cannot also be grouped with per")
        within = parse_window(entry["within"], f"{where}.within")
    buckets = entry.get("buckets", 30)
    if not isinstance(buckets, int) or isinstance(buckets, bool) or not 1 <= buckets <= 120:
        raise ConfigError(f"{where}.buckets: expected a whole number from 1 to 120, got {buckets!r}")
    limit = entry.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
        raise ConfigError(f"{where}.limit: expected a whole number from 1 to 1000, got {limit!r}")
    conditions = []
    raw_where = entry.get("where") or {}
    if not isinstance(raw_where, Mapping):
        raise ConfigError(f"{where}.where: expected a mapping of path to value (or list of values)")
    for path, allowed in raw_where.items():
        values = allowed if isinstance(allowed, list) else [allowed]
        texts = [_text(v) if not isinstance(v, str) else v for v in values]
        if not values or any(t is None for t in texts):
            raise ConfigError(f"{where}.where.{path}: expected a scalar value or a list of them, got {allowed!r}")
        conditions.append((_path(path, f"{where}.where"), frozenset(texts)))
    scale = None
    if aggregate == "rfm":
        scale = _parse_scale(entry.get("scale") or {}, f"{where}.scale")
    elif entry.get("scale") is not None:
        raise ConfigError(f"{where}.scale: only aggregate rfm takes a scale")
    return ComputedTrait(name, aggregate, selected, paths, per, tuple(conditions), within, buckets, limit, scale)


def _parse_scale(raw: object, where: str) -> RfmScale:
    if not isinstance(raw, Mapping) or set(raw) - set(_RFM_DEFAULT):
        raise ConfigError(f"{where}: expected a mapping with recency_days, frequency and/or monetary")
    parts = []
    for key, default in _RFM_DEFAULT.items():
        values = raw.get(key, default)
        if (
            not isinstance(values, list) or len(values) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values)
        ):
            raise ConfigError(f"{where}.{key}: expected 4 non-negative numbers (thresholds for scores 5, 4, 3, 2)")
        ordered = sorted(values) if key == "recency_days" else sorted(values, reverse=True)
        if list(values) != ordered:
            direction = "ascending" if key == "recency_days" else "descending"
            raise ConfigError(f"{where}.{key}: thresholds must be {direction} (score 5 first), got {values}")
        parts.append(tuple(float(v) for v in values))
    return RfmScale(*parts)
