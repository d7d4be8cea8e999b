"""The identity graph's planner: which profile each event lands on, what it claims,
which profiles it merges and which merges the rules refuse. Pure: no I/O.

The graph lives in Redis (see ``agents/identity/store.py``) as:

* identifier → the profile that first claimed it (write-once);
* profile → parent profile (write-once; set when the profile is absorbed by a merge).

A profile's root is found by following parents. Parents always point from a larger
profile id to a smaller one, and profile ids sort by creation time, so the older
profile survives a merge and no cycle can form, whatever workers do concurrently.

Per event (identifiers in rule-priority order, see ``IdentityRules``):

1. each identifier owned by a profile brings that profile's root into the event's
   group, unless the union of identifiers would exceed a type's limit: then it is
   *blocked* (the profiles stay apart);
2. each unowned identifier is claimed for the group, unless that exceeds a limit;
3. no root at all: a new profile, named after the event's best identifier;
4. the group's smallest (oldest) root survives; the others merge into it.

The planner updates its view as it goes, so later events of a batch see earlier
claims and merges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from agents.identity.rules import IdentityRules
from schemas.events import Event, Identifier

PREVIOUS_ID = "previous_id"
# An alias's previousId may have been seen as either of these.
_PREVIOUS_ID_AS = ("user_id", "anonymous_id")
_MAX_CHAIN = 64


@dataclass(frozen=True, slots=True)
class Node:
    """A profile as read from Redis."""

    profile_id: str
    parent: str | None = None
    identifiers: frozenset[str] = frozenset()
    fold_pending: bool = False
    # Deleted by a privacy request: only a tombstone is left; it owns nothing.
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Merge:
    absorbed: str
    survivor: str
    identifier: str  # "type:value" that linked the two
    message_id: str  # the event that linked them


@dataclass(frozen=True, slots=True)
class Blocked:
    identifier: str  # "type:value" kept apart
    owner: str | None  # the profile holding it; None for a new identifier refused
    profile_id: str  # where the event went instead
    types: tuple[str, ...]  # the types whose limit a merge would exceed
    message_id: str


@dataclass(frozen=True, slots=True)
class Plan:
    profile_id: str
    claims: tuple[Identifier, ...]
    merges: tuple[Merge, ...] = ()
    blocked: tuple[Blocked, ...] = ()
    # Identifiers of the event that belong to the profile after this event (claimed
    # now or already its own); never one kept apart or owned by another profile.
    keeps: tuple[Identifier, ...] = ()


class GraphView:
    """Owners and parents known to the planner; updated while a batch is planned."""

    def __init__(self, owners: Mapping[Identifier, str | None], nodes: Mapping[str, Node]) -> None:
        self.owner: dict[Identifier, str] = {i: p for i, p in owners.items() if p}
        self.parent: dict[str, str] = {p: n.parent for p, n in nodes.items() if n.parent}
        self.ids: dict[str, set[str]] = {p: set(n.identifiers) for p, n in nodes.items()}

    def add_nodes(self, nodes: Mapping[str, Node]) -> None:
        """Learn more profiles (e.g. fuzzy-match candidates); known ones are kept."""
        for profile_id, node in nodes.items():
            if profile_id in self.ids or profile_id in self.parent:
                continue
            if node.parent:
                self.parent[profile_id] = node.parent
            self.ids[profile_id] = set(node.identifiers)

    def root(self, profile_id: str) -> str:
        for _ in range(_MAX_CHAIN):
            parent = self.parent.get(profile_id)
            if parent is None:
                return profile_id
            profile_id = parent
        raise RuntimeError(f"parent chain longer than {_MAX_CHAIN} at {profile_id}")


def candidates(event: Event, rules: IdentityRules) -> list[tuple[Identifier, bool]]:
    """The event's identifiers in rule-priority order, each with whether it may be
    claimed. An alias's previousId is looked up as user_id and anonymous_id, last,
    and never claimed."""
    own = [i for i in event.identifiers if i.type != PREVIOUS_ID]
    own.sort(key=lambda i: rules.priority(i.type))  # stable: schema order breaks ties
    found = [(i, True) for i in own]
    for identifier in event.identifiers:
        if identifier.type == PREVIOUS_ID:
            found.extend((Identifier(t, identifier.value), False) for t in _PREVIOUS_ID_AS)
    return found


def identifiers_to_look_up(events: Iterable[Event], rules: IdentityRules) -> list[Identifier]:
    """Distinct identifiers whose owners the batch needs, first-seen order."""
    seen: dict[Identifier, None] = {}
    for event in events:
        for identifier, _ in candidates(event, rules):
            seen.setdefault(identifier, None)
    return list(seen)


def plan_batch(
    events: Sequence[Event],
    view: GraphView,
    rules: IdentityRules,
    new_profile_id: Callable[[Identifier], str],
) -> list[Plan]:
    return [plan_event(event, view, rules, new_profile_id) for event in events]


def has_known_identifier(event: Event, view: GraphView, rules: IdentityRules) -> bool:
    """Whether any strong identifier of ``event`` already belongs to a profile."""
    return any(identifier in view.owner and rules.strong(identifier.type) for identifier, _ in candidates(event, rules))


def plan_event(
    event: Event,
    view: GraphView,
    rules: IdentityRules,
    new_profile_id: Callable[[Identifier], str],
    matched: str | None = None,
) -> Plan:
    """Plan one event and record its effects in ``view``.

    ``matched``: a profile the fuzzy matcher found for an event none of whose
    identifiers is known; the event joins it (merge protection still applies)
    instead of starting a new profile. It never merges two profiles."""
    group: list[str] = []
    group_ids: set[str] = set()
    cause: dict[str, str] = {}
    claims: list[Identifier] = []
    refused: list[tuple[str, str | None, tuple[str, ...]]] = []
    weak_owned: list[tuple[Identifier, str]] = []
    for identifier, claimable in candidates(event, rules):
        text = str(identifier)
        owner = view.owner.get(identifier)
        if owner is not None and not rules.strong(identifier.type):
            weak_owned.append((identifier, view.root(owner)))
            continue
        if owner is not None:
            root = view.root(owner)
            if root in group:
                continue
            union = group_ids | view.ids.get(root, set()) | {text}
            bad = rules.violations(union)
            if bad and group_ids:
                refused.append((text, root, tuple(bad)))
                continue
            group.append(root)
            group_ids = union
            cause[root] = text
        elif claimable:
            if text in group_ids:
                continue
            union = group_ids | {text}
            bad = rules.violations(union)
            if bad:
                refused.append((text, None, tuple(bad)))
                continue
            claims.append(identifier)
            group_ids = union

    if not group and matched is not None:
        root = view.root(matched)
        if not rules.violations(group_ids | view.ids.get(root, set())):
            group.append(root)
    if not group:
        best = claims[0] if claims else event.best_identifier()
        group.append(new_profile_id(best))
    survivor = min(group)
    merges = tuple(Merge(r, survivor, cause[r], event.message_id) for r in group if r != survivor)

    survivor_ids = view.ids.setdefault(survivor, set())
    for merge in merges:
        view.parent[merge.absorbed] = survivor
        survivor_ids |= view.ids.pop(merge.absorbed, set())
    for identifier in claims:
        view.owner[identifier] = survivor
        survivor_ids.add(str(identifier))
    blocked = tuple(Blocked(text, owner, survivor, types, event.message_id) for text, owner, types in refused)
    held_apart = {text for text, _, _ in refused}
    weak_elsewhere = {i for i, root in weak_owned if view.root(root) != survivor}
    keeps = tuple(
        i for i in event.identifiers
        if i.type != PREVIOUS_ID and str(i) not in held_apart and i not in weak_elsewhere
    )
    return Plan(survivor, tuple(claims), merges, blocked, keeps)
