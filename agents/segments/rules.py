"""The segment rule language (SPEC section 5), pure: no I/O, no clock.

A segment is a document (YAML or JSON; the reference is ``docs/segments.md``)::

    id: stroller-prospects
    version: 3
    rule:
      all:
        - event: Order Completed
          where: {properties.products.category: {eq: baby}}
          within: 90d
          count: {gte: 1}
        - trait: total_spend
          gte: 100
        - not: {event: Support Ticket Opened, within: 3d}

* :func:`parse_segment` validates a document into a :class:`Segment` or raises
  :class:`InvalidSegment` naming the path inside the document and the problem.
* Every event condition becomes an :class:`EventCondition` whose ``id`` is derived
  from its content, so identical conditions of different segments share one counter.
  The caller keeps, per profile and condition, the windowed count or sum of the
  matching events (:meth:`EventCondition.amount` says what an event adds,
  :meth:`EventCondition.bucket` / :meth:`EventCondition.total` /
  :meth:`EventCondition.expires_at` define the time buckets).
* :meth:`Segment.evaluate` decides membership from a :class:`ProfileView`: the
  profile's traits, its presented computed traits and those counters as of now.
* :class:`SegmentIndex` answers, per event, which segments may have changed for the
  event's profile (:meth:`SegmentIndex.affected_by`) and which counters the event
  feeds (:meth:`SegmentIndex.updates`).
* :func:`change_id` gives entered/exited events deterministic ids.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b

import orjson

# _descend: the walk of agents.profiles.computed.resolve (through lists, None is absent).
from agents.profiles.computed import ComputedTraits, _descend, _numeric, event_name, resolve
from schemas.errors import ConfigError
from schemas.events import Event

__all__ = [
    "BUCKETS", "CHANGE_KINDS", "MAX_DEPTH", "MAX_NODES", "THRESHOLD_OPS", "VALUE_OPS",
    "AllOf", "AnyOf", "EventCondition", "EventTest", "InvalidSegment", "Not", "ProfileView",
    "Segment", "SegmentIndex", "TraitTest", "Where", "change_id", "parse_segment",
]

SEGMENT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DESTINATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Deepest nesting of rule nodes (the rule itself is level 1).
MAX_DEPTH = 16
#: Most rule nodes in one segment (every all/any/not/trait/event node and every
#: event reference in a threshold counts one).
MAX_NODES = 256
MAX_IN_VALUES = 1000  # values of one `in` list
MAX_TEXT = 1024  # characters of a text value, name or path
MAX_WHERE = 16  # paths of one where
MAX_CHOSEN_TRAITS = 64
MAX_DESTINATIONS = 32
MAX_NUMBER = 1e15  # |numbers| in rules (JSON-safe, exact as integers)
MAX_WINDOW_MS = 3650 * 86_400_000
#: Windowed counters are kept in time buckets of ``within / BUCKETS`` (at least
#: MIN_BUCKET_MS): an event stops counting between ``within`` and ``within`` + one
#: bucket after its event time.
BUCKETS = 30
MIN_BUCKET_MS = 1000
VALUE_OPS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "contains", "exists")
THRESHOLD_OPS = ("eq", "ne", "gt", "gte", "lt", "lte")
CHANGE_KINDS = ("entered", "exited")
NODE_KINDS = ("all", "any", "not", "trait", "event")
# Part of every condition id: bump it when the meaning of a condition changes, so
# new ids never reuse counters kept under the old meaning.
_LANGUAGE = 1
# Computed-trait parts whose value moves with the clock (a timer cannot see them).
_CLOCK_RFM = frozenset({"recency", "score", "daysSinceLast"})
_WINDOW = re.compile(r"\s*(\d+)\s*(s|m|h|d)\s*")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NUMBER_TEXT = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*")
_TOP_KEYS = ("id", "version", "name", "description", "destinations", "traits", "rule")
_CACHE_MAX = 10_000


class InvalidSegment(ConfigError):
    """A segment document that cannot be applied. ``path`` is where in the document
    (``rule.all[0].within``; empty for the document itself), ``problem`` what is
    wrong, ``segment_id`` the document's id when it had a valid one."""

    def __init__(self, message: str, segment_id: str | None = None, path: str = "", problem: str = ""):
        super().__init__(message, segment_id, path, problem)
        self.message = message
        self.segment_id = segment_id
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return self.message


class _Bad(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


# ---------------------------------------------------------------------------------
# Values: reading them from traits and events, comparing them.


def _to_number(text: str) -> float | None:
    """A text holding a number (``" 19.90 "``), else None."""
    if _NUMBER_TEXT.fullmatch(text) is None:
        return None
    number = float(text)
    return number if math.isfinite(number) else None


def _as_number(value) -> float | None:
    kind = type(value)
    if kind is int or kind is float:
        return float(value) if math.isfinite(value) else None
    if kind is str:
        return _to_number(value)
    return None


def _walk(root, path: tuple[str, ...]) -> list:
    """The values at ``path`` below ``root``, through lists; a list at the end of
    the path stays one value (ops look into it). ``root`` may be any Mapping (the
    engine passes lazily computed traits); below it, JSON dicts and lists."""
    if not isinstance(root, dict) and isinstance(root, Mapping) and path:
        child = root.get(path[0])
        if child is None:
            return []
        root, path = child, path[1:]
    nodes = [root]
    for part in path:
        found: list = []
        for value in nodes:
            _descend(value, part, found)
        if not found:
            return found
        nodes = found
    return nodes


def _event_leaves(event: Event, path: tuple[str, ...]) -> list:
    """What :func:`agents.profiles.computed.resolve` finds, before it flattens the
    lists found at the end of the path (``contains`` looks into those)."""
    head = path[0]
    if len(path) == 1:
        if head == "event":
            return [event_name(event)]
        if head == "channel":
            return [event.channel]
    if head == "properties":
        root = event.properties
    elif head == "traits":
        root = event.traits
    elif head == "context":
        root = event.context
    else:
        root = event.payload.get(head)
    if root is None:
        return []
    if len(path) == 1:
        return [root]
    return _walk(root, path[1:])


def _trait_getter(path: tuple[str, ...]) -> Callable[[Mapping | None], list]:
    """Values of a (computed) trait path in a nested mapping; a flat mapping keyed
    by the dotted path (``{"address.city": "Oslo"}``) works too."""
    if len(path) == 1:
        key = path[0]

        def get_one(root: Mapping | None) -> list:
            if not root:
                return []
            value = root.get(key)
            return [] if value is None else [value]

        return get_one
    dotted = ".".join(path)

    def get(root: Mapping | None) -> list:
        if not root:
            return []
        found = _walk(root, path)
        if not found:
            value = root.get(dotted)
            if value is not None:
                return [value]
        return found

    return get


def _equality(value) -> Callable[[object], bool]:
    """``v == value`` with the language's typing: numbers equal numbers and texts
    holding that number; texts equal equal texts (exactly, case-sensitive) and, when
    the text is a number, numbers; true/false only true/false."""
    if value is True or value is False:
        return lambda v: v is value
    if type(value) is str:
        number = _to_number(value)

        def text_eq(v) -> bool:
            kind = type(v)
            if kind is str:
                return v == value
            return number is not None and (kind is int or kind is float) and v == number

        return text_eq
    number = float(value)

    def number_eq(v) -> bool:
        kind = type(v)
        if kind is int or kind is float:
            return v == number
        return kind is str and _to_number(v) == number

    return number_eq


def _membership(values: list) -> Callable[[object], bool]:
    texts = frozenset(v for v in values if type(v) is str)
    numbers = frozenset(float(v) for v in values if type(v) in (int, float))
    numbers_as_text = frozenset(n for n in map(_to_number, texts) if n is not None)
    bools = frozenset(v for v in values if type(v) is bool)

    def member(v) -> bool:
        kind = type(v)
        if kind is str:
            return v in texts or (bool(numbers) and _to_number(v) in numbers)
        if kind is int or kind is float:
            return v in numbers or v in numbers_as_text
        if kind is bool:
            return v in bools
        return False

    return member


def _any_value(test: Callable[[object], bool]) -> Callable[[list], bool]:
    """True when some value passes ``test``; lists at the end of the path count
    element by element."""

    def check(leaves: list) -> bool:
        for value in leaves:
            if type(value) is list:
                for item in value:
                    if test(item):
                        return True
            elif test(value):
                return True
        return False

    return check


_ORDER = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}
_THRESHOLD = {**_ORDER, "eq": lambda a, b: a == b, "ne": lambda a, b: a != b}


def _compile_op(op: str, value) -> Callable[[list], bool]:
    """A test of the raw values found at a path (see :func:`_walk`)."""
    if op == "eq":
        return _any_value(_equality(value))
    if op == "ne":
        eq = _any_value(_equality(value))
        return lambda leaves: not eq(leaves)
    if op == "in":
        return _any_value(_membership(value))
    if op in _ORDER:
        compare, bound = _ORDER[op], float(value)

        def ordered(v) -> bool:
            number = _as_number(v)
            return number is not None and compare(number, bound)

        return _any_value(ordered)
    if op == "contains":
        element = _equality(value)
        text = value if type(value) is str else None

        def contains(leaves: list) -> bool:
            for leaf in leaves:
                kind = type(leaf)
                if kind is list:
                    for item in leaf:
                        if element(item):
                            return True
                elif kind is str and text is not None and text in leaf:
                    return True
            return False

        return contains
    if op == "exists":
        wanted = bool(value)

        def exists(leaves: list) -> bool:
            found = False
            for leaf in leaves:
                if type(leaf) is list:
                    if any(item is not None for item in leaf):
                        found = True
                        break
                elif leaf is not None:
                    found = True
                    break
            return found is wanted

        return exists
    raise AssertionError(op)


# ---------------------------------------------------------------------------------
# The model.


@dataclass(frozen=True, slots=True)
class ProfileView:
    """What a segment is evaluated on. ``traits``: the profile's traits, nested
    (``{"address": {"city": "Oslo"}}``; a flat ``{"address.city": "Oslo"}`` works
    too); ``computed``: the profile JSON's ``computedTraits``; ``counters``: per
    :attr:`EventCondition.id`, the condition's count or sum as of now (a missing id
    is 0)."""

    traits: Mapping = field(default_factory=dict)
    computed: Mapping = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, eq=False)
class Where:
    """A compiled ``where``: ``source`` is its canonical form
    (``{path: {op: value}}``), ``matches(event)`` the predicate."""

    source: dict
    matches: Callable[[Event], bool] = field(repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class EventCondition:
    """The state one event condition needs: a count or a sum of the events named
    ``events`` (None: every event) that pass ``where``, over the last ``within_ms``
    (None: all time). Equal conditions (same canonical content) have the same ``id``,
    wherever they appear; two conditions are equal when their ids are."""

    id: str
    events: frozenset[str] | None
    where: Where | None
    within_ms: int | None
    measure: str  # "count" or "sum"
    property: tuple[str, ...] | None  # the summed path (measure "sum")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EventCondition) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @classmethod
    def make(
        cls, events: frozenset[str] | None, where: Where | None, within_ms: int | None,
        property: tuple[str, ...] | None = None,
    ) -> "EventCondition":
        measure = "count" if property is None else "sum"
        canonical = _condition_canonical(events, where, within_ms, property)
        digest = blake2b(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS), digest_size=6).hexdigest()
        return cls("c" + digest, events, where, within_ms, measure, property)

    def canonical(self) -> dict:
        """The content the id is derived from (JSON)."""
        return _condition_canonical(self.events, self.where, self.within_ms, self.property)

    def matches(self, event: Event) -> bool:
        """The event is one of ``events`` and passes ``where``."""
        if self.events is not None and event_name(event) not in self.events:
            return False
        return self.where is None or self.where.matches(event)

    def amount(self, event: Event) -> float | None:
        """What ``event`` adds to this condition's counter: 1 for a count; for a sum
        the total of the numbers at ``property`` (numbers, or texts holding one; every
        value found through lists). None when the event does not match, or a sum
        finds no number (nothing to add)."""
        if not self.matches(event):
            return None
        if self.property is None:
            return 1.0
        numbers = _numeric(resolve(event, self.property))
        return float(sum(numbers)) if numbers else None

    # Time (windowed conditions only; all-time ones never expire).

    @property
    def bucket_ms(self) -> int | None:
        """Width of the time buckets a windowed counter is kept in."""
        if self.within_ms is None:
            return None
        return max(MIN_BUCKET_MS, -(-self.within_ms // BUCKETS))

    def bucket(self, timestamp_ms: int) -> int:
        """The bucket an event at ``timestamp_ms`` is counted in (all time: 0)."""
        size = self.bucket_ms
        return 0 if size is None else timestamp_ms // size

    def expires_at(self, timestamp_ms: int) -> int | None:
        """When an event at ``timestamp_ms`` stops counting (ms), None for all time.
        An event whose expiry is not after now adds nothing."""
        size = self.bucket_ms
        if size is None:
            return None
        return (timestamp_ms // size + 1) * size + self.within_ms

    def total(self, buckets: Mapping[int, float], now_ms: int) -> float:
        """The counter as of ``now_ms`` from ``{bucket: amount}``."""
        size = self.bucket_ms
        if size is None:
            return float(sum(buckets.values()))
        horizon = now_ms - self.within_ms
        return float(sum(amount for bucket, amount in buckets.items() if (bucket + 1) * size > horizon))

    def next_expiry(self, buckets: Iterable[int], now_ms: int) -> int | None:
        """The earliest time after ``now_ms`` at which a bucket leaves the window
        (when the counter next goes down by itself), None if never."""
        size = self.bucket_ms
        if size is None:
            return None
        times = [(bucket + 1) * size + self.within_ms for bucket in buckets]
        later = [t for t in times if t > now_ms]
        return min(later) if later else None


def _condition_canonical(events, where, within_ms, prop) -> dict:
    return {
        "v": _LANGUAGE,
        "events": "*" if events is None else sorted(events),
        "where": None if where is None else where.source,
        "within_ms": within_ms,
        "sum": None if prop is None else ".".join(prop),
    }


@dataclass(frozen=True, slots=True)
class AllOf:
    children: tuple


@dataclass(frozen=True, slots=True)
class AnyOf:
    children: tuple


@dataclass(frozen=True, slots=True)
class Not:
    child: object


@dataclass(frozen=True, slots=True)
class TraitTest:
    """``{trait: path, op: value, ...}``. ``computed``: the path reads the profile's
    computed traits (the document wrote ``computed.<path>``)."""

    path: tuple[str, ...]
    computed: bool
    ops: tuple[tuple[str, object], ...]
    tests: tuple[Callable[[list], bool], ...] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class EventTest:
    """An event condition and its threshold: ``(op, number or EventCondition)``, all
    of which must hold for the condition's counter."""

    condition: EventCondition
    threshold: tuple[tuple[str, object], ...]


def _compile(node) -> Callable[[ProfileView], bool]:
    if isinstance(node, (AllOf, AnyOf)):
        parts = tuple(_compile(child) for child in node.children)
        if len(parts) == 1:
            return parts[0]
        if isinstance(node, AllOf):
            def all_of(view) -> bool:
                for part in parts:
                    if not part(view):
                        return False
                return True

            return all_of

        def any_of(view) -> bool:
            for part in parts:
                if part(view):
                    return True
            return False

        return any_of
    if isinstance(node, Not):
        inner = _compile(node.child)
        return lambda view: not inner(view)
    if isinstance(node, TraitTest):
        get, tests, computed = _trait_getter(node.path), node.tests, node.computed
        if len(tests) == 1:
            test = tests[0]
            if computed:
                return lambda view: test(get(view.computed))
            return lambda view: test(get(view.traits))

        def trait(view) -> bool:
            leaves = get(view.computed if computed else view.traits)
            for test in tests:
                if not test(leaves):
                    return False
            return True

        return trait
    if isinstance(node, EventTest):
        cid = node.condition.id
        checks = tuple(
            (_THRESHOLD[op], bound.id if isinstance(bound, EventCondition) else None,
             None if isinstance(bound, EventCondition) else float(bound))
            for op, bound in node.threshold
        )
        if len(checks) == 1 and checks[0][1] is None:
            compare, _, bound = checks[0]
            return lambda view: compare(view.counters.get(cid, 0.0), bound)

        def event(view) -> bool:
            counters = view.counters
            value = counters.get(cid, 0.0)
            for compare, ref, bound in checks:
                if not compare(value, counters.get(ref, 0.0) if ref is not None else bound):
                    return False
            return True

        return event
    raise AssertionError(node)


_EMPTY = ProfileView()


class Segment:
    """A parsed, validated segment. ``document`` is the definition as given (plain
    JSON types): publish that. ``fingerprint`` changes whenever the document does."""

    __slots__ = (
        "id", "version", "name", "description", "destinations", "chosen_traits", "rule", "document",
        "fingerprint", "holds_for_empty_profile", "_evaluate", "_conditions", "_trait_names", "_computed_names",
        "_event_names", "_every_event",
    )

    def __init__(
        self, id: str, version: int, rule, *, name: str | None = None, description: str | None = None,
        destinations: tuple[str, ...] = (), chosen_traits: tuple[str, ...] = (), document: dict | None = None,
    ) -> None:
        self.id = id
        self.version = version
        self.name = name
        self.description = description
        self.destinations = destinations
        self.chosen_traits = chosen_traits
        self.rule = rule
        self.document = document if document is not None else {"id": id, "version": version}
        self.fingerprint = blake2b(orjson.dumps(self.document, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()
        self._evaluate = _compile(rule)
        conditions: dict[str, EventCondition] = {}
        traits: set[str] = set()
        computed: set[str] = set()
        for node in _nodes(rule):
            if isinstance(node, EventTest):
                conditions.setdefault(node.condition.id, node.condition)
                for _, bound in node.threshold:
                    if isinstance(bound, EventCondition):
                        conditions.setdefault(bound.id, bound)
            elif isinstance(node, TraitTest):
                (computed if node.computed else traits).add(node.path[0])
        self._conditions = tuple(conditions.values())
        self._trait_names = frozenset(traits)
        self._computed_names = frozenset(computed)
        self._every_event = any(c.events is None for c in self._conditions)
        self._event_names = frozenset(name for c in self._conditions for name in (c.events or ()))
        self.holds_for_empty_profile = self._evaluate(_EMPTY)

    def __repr__(self) -> str:
        return f"Segment(id={self.id!r}, version={self.version})"

    def evaluate(self, view: ProfileView) -> bool:
        """Whether a profile in ``view`` is a member. Never raises for any trait
        values (a comparison with a value of another type is simply false)."""
        return self._evaluate(view)

    def event_conditions(self) -> list[EventCondition]:
        """Every distinct event condition, including those a threshold compares
        with, in document order."""
        return list(self._conditions)

    def windowed_conditions(self) -> list[EventCondition]:
        """The conditions with ``within``: their counters go down with time, so a
        profile can enter or leave without an event (the caller schedules it)."""
        return [c for c in self._conditions if c.within_ms is not None]

    def trait_names(self) -> frozenset[str]:
        """Top-level profile trait names read (``address`` for ``address.city``)."""
        return self._trait_names

    def computed_names(self) -> frozenset[str]:
        """Computed trait names read (``total_spend`` for ``computed.total_spend.EUR``)."""
        return self._computed_names

    def event_names(self) -> frozenset[str]:
        """Event names the event conditions count (see also :attr:`reads_every_event`)."""
        return self._event_names

    @property
    def reads_every_event(self) -> bool:
        """An event condition counts every event (``event: "*"``)."""
        return self._every_event


def _nodes(node) -> Iterator:
    yield node
    if isinstance(node, (AllOf, AnyOf)):
        for child in node.children:
            yield from _nodes(child)
    elif isinstance(node, Not):
        yield from _nodes(node.child)


# ---------------------------------------------------------------------------------
# Parsing.


def parse_segment(document: object, source: str = "segment", *, computed: ComputedTraits | None = None) -> Segment:
    """A validated :class:`Segment`, or :class:`InvalidSegment` with a message
    ``"<source> <id>: <path>: <problem>"``. With ``computed`` (the configured
    computed traits), ``computed.<name>`` must name one of them, and one whose value
    does not move with the clock (windowed traits, RFM recency and score)."""
    segment_id: str | None = None
    try:
        if not isinstance(document, Mapping):
            raise _Bad("", f"expected a mapping with id, version and rule, got {_kind(document)}")
        raw_id = document.get("id")
        if not isinstance(raw_id, str) or not SEGMENT_ID.fullmatch(raw_id):
            problem = "missing" if raw_id is None else f"{_show(raw_id)} is not a segment id"
            raise _Bad("id", f"{problem} (lowercase letters, digits, '.', '_' and '-', at most 64, starting with a letter or digit)")
        segment_id = raw_id
        _known_keys(document, _TOP_KEYS, "", "a segment has id, version, rule and optionally name, description, destinations, traits")
        version = document.get("version")
        if version is None:
            raise _Bad("version", "missing (a positive whole number, raised with every change)")
        if type(version) is not int or version < 1 or version > 2**53:
            raise _Bad("version", f"{_show(version)} is not a positive whole number")
        name = _optional_text(document, "name")
        description = _optional_text(document, "description")
        destinations = _names(document.get("destinations"), "destinations", MAX_DESTINATIONS, DESTINATION, "a destination name")
        chosen = _chosen_traits(document.get("traits"), computed)
        if "rule" not in document:
            raise _Bad("rule", "missing (a rule node: all, any, not, trait or event)")
        rule = _Parser(computed).node(document["rule"], "rule", 1)
    except _Bad as bad:
        head = source if segment_id is None else f"{source} {segment_id}"
        message = f"{head}: {bad.path}: {bad.problem}" if bad.path else f"{head}: {bad.problem}"
        raise InvalidSegment(message, segment_id, bad.path, bad.problem) from None
    return Segment(
        segment_id, version, rule, name=name, description=description, destinations=destinations,
        chosen_traits=chosen, document=_plain(document),
    )


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a text"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _show(value) -> str:
    text = repr(value) if not isinstance(value, (Mapping, list)) else _kind(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _known_keys(raw: Mapping, allowed: Iterable[str], at: str, what: str) -> None:
    allowed = tuple(allowed)
    for key in raw:
        if key not in allowed:
            hint = ""
            if isinstance(key, str):
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
            raise _Bad(at, f"unknown key {_show(key)}{hint}; {what}")


def _optional_text(document: Mapping, key: str) -> str | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _Bad(key, f"expected a text of at most {MAX_TEXT} characters, got {_show(value)}")
    return value


def _names(raw, at: str, limit: int, pattern: re.Pattern, what: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list):
            raise _Bad(at, f"expected a list of names, got {_kind(raw)}")
    if len(raw) > limit:
        raise _Bad(at, f"at most {limit} entries, got {len(raw)}")
    seen: list[str] = []
    for index, name in enumerate(raw):
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise _Bad(f"{at}[{index}]", f"{_show(name)} is not {what} (letters, digits, '.', '_' and '-', at most 64)")
        if name in seen:
            raise _Bad(f"{at}[{index}]", f"{name!r} is listed twice")
        seen.append(name)
    return tuple(seen)


def _path(raw, at: str, what: str) -> tuple[str, ...]:
    if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_TEXT:
        raise _Bad(at, f"expected {what}, got {_show(raw)}")
    parts = tuple(raw.strip().split("."))
    if any(not part for part in parts):
        raise _Bad(at, f"{raw!r} has an empty part; expected {what}")
    return parts


def _chosen_traits(raw, computed: ComputedTraits | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _Bad("traits", f"expected a list of trait names (the traits change events carry), got {_kind(raw)}")
    if len(raw) > MAX_CHOSEN_TRAITS:
        raise _Bad("traits", f"at most {MAX_CHOSEN_TRAITS} traits, got {len(raw)}")
    out: list[str] = []
    for index, name in enumerate(raw):
        at = f"traits[{index}]"
        path = _path(name, at, "a trait name or dotted path (address.city, computed.order_count)")
        if path[0] == "computed":
            if len(path) < 2:
                raise _Bad(at, "computed needs a computed trait name: computed.<name>")
            _check_computed(path[1:], computed, at)
        text = ".".join(path)
        if text in out:
            raise _Bad(at, f"{text!r} is listed twice")
        out.append(text)
    return tuple(out)


def _check_computed(path: tuple[str, ...], computed: ComputedTraits | None, at: str) -> None:
    if computed is None:
        return
    by_name = {trait.name: trait for trait in computed.traits}
    trait = by_name.get(path[0])
    if trait is None:
        known = ", ".join(sorted(by_name)) or "none"
        raise _Bad(at, f"{path[0]!r} is not a computed trait (defined: {known})")
    if trait.within_ms is not None:
        raise _Bad(at, (
            f"computed.{trait.name} is windowed: its value changes with the clock, but a segment is only "
            "re-evaluated on events for it; use an event condition with within instead"
        ))
    if trait.aggregate == "rfm" and len(path) > 1 and path[1] in _CLOCK_RFM:
        raise _Bad(at, (
            f"computed.{'.'.join(path)} changes with the clock (days since the last event), but a segment is only "
            "re-evaluated on events for it; use frequency, monetary, count or total, or an event condition with within"
        ))


def _scalar(value, at: str, allow_bool: bool = True):
    """A text, number or true/false, canonical (integral numbers as int)."""
    if value is None:
        raise _Bad(at, "null is not a value here; use exists: false for a missing or null value")
    if isinstance(value, bool):
        if allow_bool:
            return value
        raise _Bad(at, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return _number(value, at)
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise _Bad(at, f"text longer than {MAX_TEXT} characters")
        return value
    raise _Bad(at, f"expected a text, number or true/false, got {_kind(value)}")


def _number(value, at: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(at, f"expected a number, got {_show(value)}")
    if not math.isfinite(value) or abs(value) > MAX_NUMBER:
        raise _Bad(at, f"{_show(value)} is not a number from -1e15 to 1e15")
    number = float(value)
    return int(number) if number.is_integer() else number


def _value_op(op: str, value, at: str):
    """The canonical operand of ``op`` (raises _Bad for a wrong one)."""
    if op in ("eq", "ne", "contains"):
        return _scalar(value, at)
    if op in _ORDER:
        return _number(value, at)
    if op == "exists":
        if not isinstance(value, bool):
            raise _Bad(at, f"expected true or false, got {_show(value)}")
        return value
    if op == "in":
        if not isinstance(value, list) or not value:
            raise _Bad(at, f"expected a non-empty list of values, got {_show(value)}")
        if len(value) > MAX_IN_VALUES:
            raise _Bad(at, f"at most {MAX_IN_VALUES} values, got {len(value)}")
        items = {}
        for index, item in enumerate(value):
            canonical = _scalar(item, f"{at}[{index}]")
            items[orjson.dumps(canonical)] = canonical
        return [items[key] for key in sorted(items)]
    raise AssertionError(op)


_TRAIT_WHAT = f"a trait condition takes trait and one or more of {', '.join(VALUE_OPS)}"
_EVENT_KEYS = ("event", "where", "within", "count", "sum")
_EVENT_WHAT = "an event condition takes event and optionally where, within, and count or sum"
_REF_KEYS = ("event", "where", "within", "property")


class _Parser:
    def __init__(self, computed: ComputedTraits | None) -> None:
        self.computed = computed
        self.count = 0

    def _count(self, at: str) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            raise _Bad(at, f"the rule has more than {MAX_NODES} nodes")

    def node(self, raw, at: str, depth: int):
        self._count(at)
        if depth > MAX_DEPTH:
            raise _Bad(at, f"rule nodes nested deeper than {MAX_DEPTH} levels")
        if not isinstance(raw, Mapping):
            raise _Bad(at, f"expected a rule node (a mapping with all, any, not, trait or event), got {_show(raw)}")
        kinds = [kind for kind in NODE_KINDS if kind in raw]
        if not kinds:
            if any(key in raw for key in _EVENT_KEYS):
                raise _Bad(at, "missing event (an event condition names the event it counts)")
            if any(key in raw for key in VALUE_OPS):
                raise _Bad(at, "missing trait (a trait condition names the trait it compares)")
            keys = ", ".join(map(_show, raw)) or "nothing"
            raise _Bad(at, f"expected a rule node with one of all, any, not, trait or event; got {keys}")
        if len(kinds) > 1:
            raise _Bad(at, f"a rule node is one of all, any, not, trait or event, not {' and '.join(kinds)} (combine them with all)")
        kind = kinds[0]
        if kind in ("all", "any"):
            _known_keys(raw, (kind,), at, f"an {kind} node takes only {kind}: [rule nodes]")
            items = raw[kind]
            if not isinstance(items, list) or not items:
                raise _Bad(f"{at}.{kind}", f"expected a non-empty list of rule nodes, got {_show(items)}")
            children = tuple(self.node(item, f"{at}.{kind}[{i}]", depth + 1) for i, item in enumerate(items))
            return AllOf(children) if kind == "all" else AnyOf(children)
        if kind == "not":
            _known_keys(raw, ("not",), at, "a not node takes only not: <rule node>")
            return Not(self.node(raw["not"], f"{at}.not", depth + 1))
        if kind == "trait":
            return self.trait(raw, at)
        return self.event(raw, at)

    def trait(self, raw: Mapping, at: str) -> TraitTest:
        _known_keys(raw, ("trait", *VALUE_OPS), at, _TRAIT_WHAT)
        path = _path(raw["trait"], f"{at}.trait", "a trait name or dotted path (total_spend, address.city, computed.order_count)")
        computed = path[0] == "computed"
        if computed:
            if len(path) < 2:
                raise _Bad(f"{at}.trait", "computed needs a computed trait name: computed.<name>")
            path = path[1:]
            _check_computed(path, self.computed, f"{at}.trait")
        ops = tuple((op, _value_op(op, raw[op], f"{at}.{op}")) for op in VALUE_OPS if op in raw)
        if not ops:
            raise _Bad(at, f"a trait condition needs an operator: one or more of {', '.join(VALUE_OPS)}")
        return TraitTest(path, computed, ops, tuple(_compile_op(op, value) for op, value in ops))

    def _condition(self, raw: Mapping, at: str, prop: tuple[str, ...] | None) -> EventCondition:
        if "event" not in raw:
            raise _Bad(at, "missing event (an event name, a list of them, or \"*\" for every event)")
        events = _events(raw["event"], f"{at}.event")
        where = _where(raw["where"], f"{at}.where") if "where" in raw else None
        within = _window(raw["within"], f"{at}.within") if "within" in raw else None
        return EventCondition.make(events, where, within, prop)

    def event(self, raw: Mapping, at: str) -> EventTest:
        _known_keys(raw, _EVENT_KEYS, at, _EVENT_WHAT)
        if "count" in raw and "sum" in raw:
            raise _Bad(at, "give count or sum, not both")
        prop = None
        if "sum" in raw:
            spec, spec_at = raw["sum"], f"{at}.sum"
            if not isinstance(spec, Mapping):
                raise _Bad(spec_at, f"expected {{property: path, <op>: number}}, got {_show(spec)}")
            _known_keys(spec, ("property", *THRESHOLD_OPS), spec_at, f"sum takes property and one or more of {', '.join(THRESHOLD_OPS)}")
            if "property" not in spec:
                raise _Bad(spec_at, "missing property (the path of the numbers to add up, e.g. properties.total)")
            prop = _path(spec["property"], f"{spec_at}.property", "a dotted path such as properties.total")
        elif "count" in raw:
            spec, spec_at = raw["count"], f"{at}.count"
            if not isinstance(spec, Mapping):
                raise _Bad(spec_at, f"expected {{<op>: number}} (e.g. {{gte: 2}}), got {_show(spec)}")
            _known_keys(spec, THRESHOLD_OPS, spec_at, f"count takes one or more of {', '.join(THRESHOLD_OPS)}")
        else:
            spec, spec_at = None, at
        condition = self._condition(raw, at, prop)
        if spec is None:
            return EventTest(condition, (("gte", 1),))
        threshold = []
        for op in THRESHOLD_OPS:
            if op in spec:
                threshold.append((op, self.bound(spec[op], f"{spec_at}.{op}", prop is None)))
        if not threshold:
            raise _Bad(spec_at, f"needs an operator: one or more of {', '.join(THRESHOLD_OPS)}")
        return EventTest(condition, tuple(threshold))

    def bound(self, raw, at: str, is_count: bool):
        """A number, or another event measure to compare with: ``{event, where,
        within}`` counts, with ``property`` it sums."""
        if isinstance(raw, Mapping):
            self._count(at)
            _known_keys(raw, _REF_KEYS, at, "a compared measure takes event and optionally where, within, property (to sum)")
            prop = _path(raw["property"], f"{at}.property", "a dotted path such as properties.total") if "property" in raw else None
            return self._condition(raw, at, prop)
        number = _number(raw, at)
        if is_count and number < 0:
            raise _Bad(at, f"a count is never negative, got {number}")
        return number


def _events(raw, at: str) -> frozenset[str] | None:
    if raw == "*":
        return None
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names:
        raise _Bad(at, f"expected an event name or a non-empty list of them, got {_show(raw)}")
    out = set()
    for index, name in enumerate(names):
        where = at if isinstance(raw, str) else f"{at}[{index}]"
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_TEXT:
            raise _Bad(where, f"expected an event name, got {_show(name)}")
        if name.strip() == "*":
            raise _Bad(where, "\"*\" (every event) stands alone, not in a list")
        out.add(name.strip())
    return frozenset(out)


def _window(raw, at: str) -> int:
    match = _WINDOW.fullmatch(raw) if isinstance(raw, str) else None
    if match is None or int(match.group(1)) == 0:
        raise _Bad(at, f"{_show(raw)} is not a window (use a whole number with s, m, h or d, e.g. 90d)")
    ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if ms > MAX_WINDOW_MS:
        raise _Bad(at, f"{_show(raw)} is longer than 3650d; leave within out to count all time")
    return ms


def _where(raw, at: str) -> Where:
    if not isinstance(raw, Mapping) or not raw:
        raise _Bad(at, f"expected a mapping of path to value, list of values or {{op: value}}, got {_show(raw)}")
    if len(raw) > MAX_WHERE:
        raise _Bad(at, f"at most {MAX_WHERE} paths, got {len(raw)}")
    source: dict[str, dict] = {}
    items = []
    for key, spec in raw.items():
        key_at = f"{at}[{key}]" if isinstance(key, str) else at
        path = _path(key, key_at, "a dotted path into the event (properties.total, context.channel, event)")
        text = ".".join(path)
        key_at = f"{at}[{text}]"
        if text in source:
            raise _Bad(key_at, "this path is given twice")
        if isinstance(spec, Mapping):
            if not spec:
                raise _Bad(key_at, f"expected a value, a list of values or {{op: value}} with op one of {', '.join(VALUE_OPS)}")
            _known_keys(spec, VALUE_OPS, key_at, f"a where test takes one or more of {', '.join(VALUE_OPS)}")
            ops = tuple((op, _value_op(op, spec[op], f"{key_at}.{op}")) for op in VALUE_OPS if op in spec)
        elif isinstance(spec, list):
            ops = (("in", _value_op("in", spec, key_at)),)
        else:
            ops = (("eq", _scalar(spec, key_at)),)
        source[text] = dict(ops)
        items.append((path, tuple(_compile_op(op, value) for op, value in ops)))
    return Where({k: source[k] for k in sorted(source)}, _where_predicate(tuple(items)))


def _where_predicate(items: tuple) -> Callable[[Event], bool]:
    if len(items) == 1 and len(items[0][1]) == 1:
        path, (test,) = items[0]
        return lambda event: test(_event_leaves(event, path))

    def matches(event: Event) -> bool:
        for path, tests in items:
            leaves = _event_leaves(event, path)
            for test in tests:
                if not test(leaves):
                    return False
        return True

    return matches


# ---------------------------------------------------------------------------------
# The index.


class SegmentIndex:
    """Segments by what can change their outcome, immutable (build a new one with
    :meth:`with_segment` / :meth:`without`; ~100 segments rebuild in well under a
    millisecond). ``computed``: the configured computed traits, so a condition on
    ``computed.<name>`` is re-evaluated on exactly the events that feed it (without
    it, on every event)."""

    __slots__ = (
        "_segments", "_by_id", "_computed", "_every", "_by_event", "_by_trait", "_empty", "_conditions",
        "_conditions_every", "_conditions_by_event", "_cache", "_condition_cache",
    )

    def __init__(self, segments: Iterable[Segment] = (), computed: ComputedTraits | None = None) -> None:
        by_id: dict[str, Segment] = {}
        for segment in segments:
            by_id[segment.id] = segment  # a later definition of an id replaces an earlier one
        self._segments = tuple(by_id[key] for key in sorted(by_id))
        self._by_id = {segment.id: segment for segment in self._segments}
        self._computed = computed
        feeds = {trait.name: trait.events for trait in computed.traits} if computed is not None else None
        every: set[int] = set()
        by_event: dict[str, set[int]] = {}
        by_trait: dict[str, set[int]] = {}
        empty: set[int] = set()
        conditions: dict[str, EventCondition] = {}
        for position, segment in enumerate(self._segments):
            if segment.reads_every_event:
                every.add(position)
            for name in segment.event_names():
                by_event.setdefault(name, set()).add(position)
            for name in segment.trait_names():
                by_trait.setdefault(name, set()).add(position)
            for name in segment.computed_names():
                if feeds is None:
                    every.add(position)
                elif name in feeds:
                    events = feeds[name]
                    if events is None:
                        every.add(position)
                    else:
                        for event in events:
                            by_event.setdefault(event, set()).add(position)
                # A name the configuration does not define never changes.
            if segment.holds_for_empty_profile:
                empty.add(position)
            for condition in segment.event_conditions():
                conditions.setdefault(condition.id, condition)
        self._every = frozenset(every)
        self._by_event = {name: frozenset(found) for name, found in by_event.items()}
        self._by_trait = {name: frozenset(found) for name, found in by_trait.items()}
        self._empty = frozenset(empty)
        self._conditions = tuple(conditions.values())
        self._conditions_every = tuple(c for c in self._conditions if c.events is None)
        by_name: dict[str, list[EventCondition]] = {}
        for condition in self._conditions:
            for name in condition.events or ():
                by_name.setdefault(name, []).append(condition)
        self._conditions_by_event = {name: tuple(found) for name, found in by_name.items()}
        self._cache: dict[tuple, tuple[Segment, ...]] = {}
        self._condition_cache: dict[str, tuple[EventCondition, ...]] = {}

    @property
    def segments(self) -> tuple[Segment, ...]:
        """All segments, by id."""
        return self._segments

    @property
    def computed(self) -> ComputedTraits | None:
        return self._computed

    def __len__(self) -> int:
        return len(self._segments)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self._segments)

    def __contains__(self, segment_id: object) -> bool:
        return segment_id in self._by_id

    def get(self, segment_id: str) -> Segment | None:
        return self._by_id.get(segment_id)

    def with_segment(self, segment: Segment) -> "SegmentIndex":
        """A new index with ``segment`` added, or replacing the one with its id."""
        return SegmentIndex((*self._segments, segment), self._computed)

    def without(self, segment_id: str) -> "SegmentIndex":
        """A new index without the segment ``segment_id`` (the same one if absent)."""
        if segment_id not in self._by_id:
            return self
        return SegmentIndex((s for s in self._segments if s.id != segment_id), self._computed)

    def affected_by(self, event: Event, *, new_profile: bool = False) -> tuple[Segment, ...]:
        """The segments whose outcome ``event`` may change for its profile, by id:
        those counting this event name (or every event), those reading a trait the
        event carries (top-level name of ``traits`` / ``context.traits``), those
        reading a computed trait this event feeds. ``new_profile``: the event created
        the profile, so segments that hold for an empty profile are added too."""
        name = event_name(event)
        traits = event.traits
        key = (name, tuple(traits) if traits else (), new_profile)
        found = self._cache.get(key)
        if found is not None:
            return found
        positions = set(self._every)
        positions.update(self._by_event.get(name, ()))
        if traits:
            by_trait = self._by_trait
            for trait in traits:
                positions.update(by_trait.get(trait, ()))
        if new_profile:
            positions.update(self._empty)
        segments = self._segments
        found = tuple(segments[p] for p in sorted(positions))
        if len(self._cache) < _CACHE_MAX:
            self._cache[key] = found
        return found

    def conditions(self) -> list[EventCondition]:
        """Every distinct event condition of every segment."""
        return list(self._conditions)

    def conditions_for(self, name: str) -> tuple[EventCondition, ...]:
        """The conditions that count events called ``name`` (before their where)."""
        found = self._condition_cache.get(name)
        if found is None:
            found = self._conditions_every + self._conditions_by_event.get(name, ())
            if len(self._condition_cache) < _CACHE_MAX:
                self._condition_cache[name] = found
        return found

    def updates(self, event: Event) -> list[tuple[EventCondition, float]]:
        """The counters ``event`` feeds and what it adds to each."""
        out = []
        for condition in self.conditions_for(event_name(event)):
            amount = condition.amount(event)
            if amount is not None:
                out.append((condition, amount))
        return out


def change_id(profile_id: str, segment_id: str, version: int, kind: str, cause: str) -> str:
    """The id of a membership change event (32 hex): the same transition of the same
    profile, segment version and cause (the causing event's messageId, or a timer's
    or back-fill's own cause text) always gets the same id."""
    if kind not in CHANGE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(CHANGE_KINDS)}, got {kind!r}")
    text = "\x1f".join((profile_id, segment_id, str(int(version)), kind, cause))
    return blake2b(text.encode(), digest_size=16).hexdigest()
