"""Minimal identity resolution: which profile each event of a batch belongs to.

This is the backbone's first version; the incremental identity graph (merges, merge
protection, concurrency) replaces it. The rule here:

* every identifier of an event except ``previous_id`` is claimed for one profile,
  write-once (``SET NX`` on the identifier's own key);
* an event belongs to the profile that owns its highest-priority identifier already
  owned (by Redis or by an earlier event of the same batch); an ``alias`` event's
  ``previousId`` is looked up as a ``user_id`` and as an ``anonymous_id``;
* an event whose identifiers are all new starts a profile whose id derives from its
  best identifier, so replaying the batch creates the same profile.

Two known profiles linked by one event are not merged yet: the event goes to the
owner of its highest-priority identifier and its other identifiers stay where they
are.

Pure: the caller looks the owners up in Redis and writes the claims.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from schemas.events import Event, Identifier

PREVIOUS_ID = "previous_id"
# The identifier types an alias's previousId may have been seen as.
_PREVIOUS_ID_AS = ("user_id", "anonymous_id")


@dataclass(frozen=True, slots=True)
class Assignment:
    profile_id: str
    new_profile: bool
    claims: tuple[Identifier, ...]  # identifiers not owned before this event; claim them for profile_id


def lookup_candidates(event: Event) -> list[Identifier]:
    """The identifiers whose owners decide ``event``'s profile, in priority order."""
    found: list[Identifier] = []
    for identifier in event.identifiers:
        if identifier.type == PREVIOUS_ID:
            found.extend(Identifier(t, identifier.value) for t in _PREVIOUS_ID_AS)
        else:
            found.append(identifier)
    return found


def identifiers_to_look_up(events: Iterable[Event]) -> list[Identifier]:
    """Distinct identifiers of a batch whose owners must be read, first-seen order."""
    seen: dict[Identifier, None] = {}
    for event in events:
        for identifier in lookup_candidates(event):
            seen.setdefault(identifier, None)
    return list(seen)


def assign(
    events: Sequence[Event],
    owners: Mapping[Identifier, str | None],
    new_profile_id: Callable[[Identifier], str],
) -> list[Assignment]:
    """Decide each event's profile, in order; later events see earlier claims."""
    known: dict[Identifier, str] = {i: p for i, p in owners.items() if p is not None}
    assignments: list[Assignment] = []
    for event in events:
        profile_id = next((known[i] for i in lookup_candidates(event) if i in known), None)
        new_profile = profile_id is None
        if profile_id is None:
            profile_id = new_profile_id(event.best_identifier())
        claims = tuple(i for i in event.identifiers if i.type != PREVIOUS_ID and i not in known)
        for identifier in claims:
            known[identifier] = profile_id
        assignments.append(Assignment(profile_id, new_profile, claims))
    return assignments
