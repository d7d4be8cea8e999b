"""The segment stage: incremental evaluation, commits, change events, expiry.

Per batch (``Pipeline`` calls it after the profile step):

1. the profile step already updated each event's condition counters (windowed counts
   and sums, kept as computed fields ``win:<condition id>`` / ``add:<condition id>``)
   and answered the profile's state after the event, for the events that affect a
   segment (``SegmentIndex.affected_by``);
2. per profile, in batch order, each affected segment is evaluated on the state after
   each event; a change of membership is a transition caused by that event;
3. one ``COMMIT`` per profile writes the memberships, if the profile's revision is
   still the one evaluated (else its state is read again and evaluated again), and
   marks each event's de-duplication record with the transitions it caused;
4. the transitions are published on ``cdp.segment-changes`` as CloudEvents with
   deterministic ids; a redelivered event re-publishes what its record says.

Windowed conditions change with the clock alone: after each commit the profile is
scheduled (a sorted set per shard, by the time its next counter bucket leaves a
window) and the worker's timer re-evaluates due profiles (``expire_due``).

Activation (docs/activation.md): a profile is activated at a destination a segment
names while it is a member and its consent covers the destination's purposes. Those
activations are kept beside the memberships (field ``<segment>><destination>``) and
re-derived whenever memberships change, the event records a consent choice, or the
timer, a merge or a back-fill evaluates the profile; each change is one more
transition, published on ``cdp.activations.<destination>`` with only what that
destination may receive, and marked on the causing event's record like the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from agents.activation.destinations import Destination, consent_of
from agents.profiles.computed import ADD, WIN, _buckets
from agents.profiles.model import CONSENT_PREFIX, ProfileModel, unflatten
from agents.segments import rules as segment_rules
from agents.segments.store import (
    CLAIM_DUE, COMMIT, DUE_KEY, DUE_SHARDS, FINISH_DUE, LEASE_MS, READ_STATE, commit_call, due_key, state_keys,
)
from schemas.events import Event
from streams.keys import ProfileKeys, message_field
from streams.metrics import Metrics
from streams.records import OutboundMessage
from streams.topics import SEGMENT_CHANGES
from streams.texts import iso_ms, text

log = logging.getLogger(__name__)

ENTERED, EXITED = "cdp.segment.entered", "cdp.segment.exited"
# Not published: a segment entry a destination did not get for want of consent.
BLOCKED = "blocked"
# Joins a segment id and a destination name in an activation's field (neither has it).
ACTIVATION = ">"
_BUCKETS = 30
_MAX_COMMIT_ROUNDS = 8


def bucket_ms(within_ms: int) -> int:
    return max(1000, -(-within_ms // _BUCKETS))


@dataclass(slots=True)
class State:
    """A profile's state as the segment stage needs it."""

    profile_id: str
    rev: str
    traits: dict[str, bytes]
    computed: dict[str, str]
    segments: dict[str, str]  # segment id (or "<segment>><destination>") → "version|entered ms"
    identifiers: list[str]
    # Worked out once per state when first needed (change events read them per transition).
    _nested: dict | None = None
    _computed_view: object = None

    @classmethod
    def from_reply(cls, profile_id: str, rev, traits, computed, segments, identifiers) -> "State":
        return cls(
            profile_id, text(rev), _pairs(traits, raw=True), _pairs(computed), _pairs(segments),
            sorted(_texts(identifiers)),
        )

    def nested_traits(self) -> dict:
        """The traits as nested objects (consent left out)."""
        if self._nested is None:
            traits = {}
            for name, raw in self.traits.items():
                if not name.startswith(CONSENT_PREFIX):
                    at, _, value = raw.partition(b"|")
                    traits[name] = (int(at), orjson.loads(value))
            self._nested = unflatten(traits)
        return self._nested

    def computed_view(self, model: ProfileModel, now_ms: int):
        if self._computed_view is None:
            self._computed_view = model.computed.lazy(self.computed, now_ms)
        return self._computed_view


@dataclass(frozen=True, slots=True)
class Transition:
    profile_id: str
    segment_id: str
    version: int
    kind: str  # ENTERED / EXITED / BLOCKED
    cause: str  # the causing event's messageId, or "expiry:<ms>", "merge:<absorbed>", "definition:<id>@<v>"
    cause_event: str | None
    destination: str | None = None  # an activation's destination; None for the membership itself


class SegmentEngine:
    def __init__(self, redis, model: ProfileModel, registry, metrics: Metrics, script: Callable) -> None:
        self.redis = redis
        self.model = model
        self.registry = registry
        self.metrics = metrics
        self._script = script  # Pipeline._script: Lua source → SHA
        self._conditions: dict = {}
        self._conditions_for = None  # the SegmentSet _conditions was built from
        self._segment_fields: dict[str, tuple[str, ...]] = {}  # by segment fingerprint

    # ---------------------------------------------------------------- per event

    @property
    def index(self):
        return self.registry.index

    def ops(self, event: Event) -> tuple[list, tuple[str, ...] | bool]:
        """The counter operations of ``event`` and whether its profile's state is
        wanted back (some segment is affected by it): False, or the counter fields
        of the conditions the affected segments read (the others are not answered)."""
        index = self.index
        ops: list = []
        for condition in index.conditions_for(event):
            amount = condition.amount(event)
            if amount is None:
                continue
            if condition.within_ms is not None:
                size = bucket_ms(condition.within_ms)
                keep = -(-condition.within_ms // size) + 1
                ops.extend((WIN, f"win:{condition.id}", "", amount, f"{event.timestamp_ms // size},{keep}"))
            else:
                ops.extend((ADD, f"add:{condition.id}", "", amount, 1))
        # A superset: segments true for an empty profile count if the event creates one.
        affected = index.affected_by(event, new_profile=True)
        if affected:
            fields = self._fields
            return ops, tuple({f for segment in affected for f in fields(segment)})
        # A consent choice may change where the profile's memberships are activated.
        if index.activating and self.model.consent_of(event):
            return ops, ()
        return ops, False

    def _fields(self, segment) -> tuple[str, ...]:
        """The counter fields of a segment's event conditions (cached per segment)."""
        fields = self._segment_fields.get(segment.fingerprint)
        if fields is None:
            fields = self._segment_fields[segment.fingerprint] = tuple(
                f"{'win' if c.within_ms is not None else 'add'}:{c.id}" for c in segment.event_conditions()
            )
        return fields

    # ---------------------------------------------------------------- a batch

    async def after_apply(self, items: Sequence, profile_ids: Sequence[str], replies: Sequence, now_ms: int) -> list[OutboundMessage]:
        """Evaluate, commit and publish for a batch's applied events.

        ``items``: the accepted events (``.event``, ``.record``); ``replies``: the
        profile step's answer per event (None when it was dropped as a resend)."""
        index = self.index
        by_profile: dict[str, list[tuple[Event, list, list]]] = {}
        replay: list[tuple[Event, str, str]] = []
        # Per profile, the revisions its applied events left, in order (all of them,
        # also those of events that affect no segment and answered no state).
        revs: dict[str, list[tuple[int, bool]]] = {}
        for item, profile_id, reply in zip(items, profile_ids, replies):
            if reply is None:
                continue
            status = int(reply[0])
            event = item.event
            if status == 2:  # redelivered: publish what its record says it caused
                replay.append((event, profile_id, text(reply[1])))
                continue
            if status not in (1, 4):
                continue
            revs.setdefault(profile_id, []).append((int(reply[1]), len(reply) >= 6))
            if len(reply) < 6:
                continue  # no segment is affected by it
            affected = index.affected_by(event, new_profile=status == 4)
            by_profile.setdefault(profile_id, []).append((event, affected, list(reply[1:])))
        transitions: list[Transition] = []
        states: dict[str, State] = {}
        todo: dict[str, tuple[State, list[tuple[Event, list, State]]]] = {}
        for profile_id, entries in by_profile.items():
            steps = [(event, affected, State.from_reply(profile_id, *answer)) for event, affected, answer in entries]
            last = steps[-1][2]
            last.rev = _own_revision(last.rev, revs[profile_id])
            todo[profile_id] = (last, steps)
        if replay:
            transitions.extend(await self._replay(replay, todo, now_ms))
        transitions.extend(await self._evaluate_and_commit(todo, states, now_ms))
        return await self._messages(transitions, states, now_ms)

    async def _replay(self, replay, todo, now_ms: int) -> list[Transition]:
        """Redelivered events: re-publish their recorded transitions; an event whose
        evaluation was never committed (a crash in between) is evaluated now."""
        out: list[Transition] = []
        fresh: list[tuple[Event, str]] = []
        for event, profile_id, record in replay:
            marker = record.partition("|e")[2] if "|e" in record else None
            if marker is None:
                if self.index.affected_by(event):
                    fresh.append((event, profile_id))
                continue
            for part in filter(None, marker.split(",")):
                field, _, rest = part.partition("@")
                version, kind = rest[:-1], rest[-1]
                segment_id, _, destination = field.partition(ACTIVATION)
                out.append(Transition(profile_id, segment_id, int(version), ENTERED if kind == "+" else EXITED,
                                      event.message_id, event.message_id, destination or None))
        if fresh:
            read = await self.read_states(sorted({p for _, p in fresh}))
            for event, profile_id in fresh:
                state = read.get(profile_id)
                if state is None:
                    continue
                entry = todo.setdefault(profile_id, (state, []))
                entry[1].append((event, self.index.affected_by(event), state))
        return out

    async def _evaluate_and_commit(self, todo, states: dict[str, State], now_ms: int) -> list[Transition]:
        out: list[Transition] = []
        for _ in range(_MAX_COMMIT_ROUNDS):
            if not todo:
                return out
            commits = []
            for profile_id, (last, steps) in todo.items():
                membership = dict(steps[0][2].segments)
                start = dict(membership)
                marks: list[tuple[str, str]] = []
                found: list[Transition] = []
                for event, affected, state in steps:
                    pseudo = isinstance(event, _Cause)
                    caused = self._evaluate(state, affected, membership, event.message_id,
                                            None if pseudo else event.message_id, now_ms)
                    if caused or pseudo or (self.index.activating and self.model.consent_of(event)):
                        entered = {t.segment_id for t in caused if t.kind == ENTERED}
                        caused.extend(self._activate(state, membership, entered, event.message_id,
                                                     None if pseudo else event.message_id, now_ms))
                    found.extend(caused)
                    if not pseudo:
                        marks.append((message_field(event.message_id), _marker(caused)))
                changes = _changes(start, membership)
                commits.append((profile_id, last, changes, marks, found))
            sha = await self._script(COMMIT)
            async with self.redis.pipeline(transaction=False) as pipe:
                for profile_id, last, changes, marks, _ in commits:
                    keys, args = commit_call(profile_id, last.rev, changes, marks)
                    pipe.evalsha(sha, len(keys), *keys, *args)
                replies = await pipe.execute()
            stale: list[str] = []
            for (profile_id, last, _, _, found), reply in zip(commits, replies):
                code = int(reply[0])
                if code == 1:
                    out.extend(found)
                    states[profile_id] = last
                elif code == 0:
                    stale.append(profile_id)
                    self.metrics.identity_conflicts.labels("segment_rev").inc()
                # 5: merged away meanwhile; the fold re-evaluates the survivor.
            await self._schedule([states[p] for p, *_ in commits if p in states], now_ms)
            if not stale:
                return out
            # Someone changed the profile between our read and our commit: read it
            # again and evaluate every segment our events affect, on the new state.
            fresh = await self.read_states(stale)
            next_todo = {}
            for profile_id in stale:
                state = fresh.get(profile_id)
                if state is None:
                    continue
                _, steps = todo[profile_id]
                affected = {s.id: s for _, segs, _ in steps for s in segs}
                event = steps[-1][0]
                next_todo[profile_id] = (state, [(event, list(affected.values()), state)])
            todo = next_todo
        raise RuntimeError("segment commits kept meeting concurrent changes")

    def _evaluate(self, state: State, segments, membership: dict[str, str], cause: str, cause_event: str | None,
                  now_ms: int) -> list[Transition]:
        """Evaluate ``segments`` on ``state``; update ``membership``; the transitions."""
        if not segments:
            return []
        view = self.view_of(state, now_ms)
        found = []
        for segment in segments:
            member = bool(segment.evaluate(view))
            held = membership.get(segment.id)
            if member and held is None:
                membership[segment.id] = f"{segment.version}|{now_ms}"
                found.append(Transition(state.profile_id, segment.id, segment.version, ENTERED, cause, cause_event))
            elif not member and held is not None:
                del membership[segment.id]
                found.append(Transition(state.profile_id, segment.id, segment.version, EXITED, cause, cause_event))
            elif member and not held.startswith(f"{segment.version}|"):
                membership[segment.id] = f"{segment.version}|{held.split('|', 2)[1]}"  # still a member
        return found

    def _activate(self, state: State, membership: dict[str, str], entered: set[str], cause: str,
                  cause_event: str | None, now_ms: int) -> list[Transition]:
        """Re-derive the profile's activations from its memberships and consent;
        update ``membership`` (which holds both); the transitions, and a BLOCKED one
        per destination an entry (a segment in ``entered``) did not reach for want
        of consent."""
        segments = self.index.segments
        destinations = self.registry.destinations
        consent = None
        wanted: dict[str, int] = {}
        blocked: list[tuple[str, int, str]] = []
        for segment_id in membership:
            if ACTIVATION in segment_id:
                continue
            segment = segments.get(segment_id)
            if segment is None or not segment.destinations:
                continue
            for name in segment.destinations:
                destination = destinations.get(name)
                if destination is None:
                    self.registry.unknown_destination(segment_id, name)
                    continue
                if consent is None:
                    consent = consent_of(state.traits)
                if destination.consented(consent):
                    wanted[segment_id + ACTIVATION + name] = segment.version
                elif segment_id in entered:
                    blocked.append((segment_id, segment.version, name))
        found = []
        for field in [f for f in membership if ACTIVATION in f and f not in wanted]:
            segment_id, _, name = field.partition(ACTIVATION)
            version = int(membership.pop(field).split("|", 1)[0] or 0)
            found.append(Transition(state.profile_id, segment_id, version, EXITED, cause, cause_event, name))
        for field, version in wanted.items():
            held = membership.get(field)
            segment_id, _, name = field.partition(ACTIVATION)
            if held is None:
                membership[field] = f"{version}|{now_ms}"
                found.append(Transition(state.profile_id, segment_id, version, ENTERED, cause, cause_event, name))
            elif not held.startswith(f"{version}|"):
                membership[field] = f"{version}|{held.split('|', 2)[1]}"
        found.extend(Transition(state.profile_id, segment_id, version, BLOCKED, cause, cause_event, name)
                     for segment_id, version, name in blocked)
        return found

    def view_of(self, state: State, now_ms: int):
        counters = LazyCounters(self._conditions_by_id(), state.computed, now_ms)
        return segment_rules.ProfileView(
            traits=state.nested_traits(), computed=state.computed_view(self.model, now_ms), counters=counters,
        )

    async def recover(self, items: Sequence, profile_ids: Sequence[str], replies: Sequence, now_ms: int) -> list[OutboundMessage]:
        """After a failure inside ``after_apply``. A profile's commit marks the records
        of all its events at once: where they carry the mark, the commit happened and
        its transitions are published again from the records (as for a redelivery);
        where they do not, the profile is evaluated again on the states the profile
        step answered, so no transition between two events of the batch is lost."""
        wanted = [k for k, reply in enumerate(replies) if reply is not None]
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in wanted:
                pipe.hget(ProfileKeys(profile_ids[k]).seen, message_field(items[k].event.message_id))
            records = await pipe.execute()
        committed = {profile_ids[k] for k, record in zip(wanted, records) if record is not None and b"|e" in record}
        synthetic: list = [None] * len(items)
        for k, record in zip(wanted, records):
            if profile_ids[k] not in committed and int(replies[k][0]) != 2:
                synthetic[k] = replies[k]
            elif record is not None:
                synthetic[k] = [2, record]
        return await self.after_apply(items, profile_ids, synthetic, now_ms)

    async def exit_absorbed(self, absorbed: Sequence[str], now_ms: int) -> list[OutboundMessage]:
        """Exits for the memberships of profiles merged away (before their cleanup)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile_id in absorbed:
                keys = ProfileKeys(profile_id)
                pipe.hgetall(keys.segments)
                pipe.hkeys(keys.ids)
            replies = await pipe.execute()
        out = []
        for index, profile_id in enumerate(absorbed):
            memberships, ids = replies[2 * index], replies[2 * index + 1]
            out.extend(membership_exits(
                profile_id, _pairs(memberships), sorted(text(i) for i in ids), f"merge:{profile_id}", now_ms, self.metrics,
                self.registry.destinations,
            ))
        return out

    def _conditions_by_id(self) -> dict:
        index = self.index
        if self._conditions_for is not index:
            self._conditions = {c.id: c for c in index.conditions()}
            self._conditions_for = index
        return self._conditions

    # ---------------------------------------------------------------- reads

    async def read_states(self, profile_ids: Sequence[str]) -> dict[str, State]:
        """The current state of each profile that exists and was not merged away."""
        sha = await self._script(READ_STATE)
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile_id in profile_ids:
                keys = state_keys(profile_id)
                pipe.evalsha(sha, len(keys), *keys)
            replies = await pipe.execute()
        out = {}
        for profile_id, (rev, parent, traits, computed, segments, ids, created) in zip(profile_ids, replies):
            if text(parent) or not text(created):
                continue
            out[profile_id] = State.from_reply(profile_id, rev, traits, computed, segments, ids)
        return out

    async def evaluate_profiles(self, profile_ids: Sequence[str], segments, cause: str, now_ms: int) -> list[OutboundMessage]:
        """Evaluate ``segments`` (or, with None, every segment) for whole profiles:
        expiry, merges, back-fill. Commits and returns the change events."""
        states = await self.read_states(profile_ids)
        chosen = list(self.index.segments.values()) if segments is None else list(segments)
        todo = {}
        for profile_id, state in states.items():
            # A pseudo-event carries the cause through the commit (no record to mark).
            todo[profile_id] = (state, [(_Cause(cause), chosen, state)])
        committed: dict[str, State] = {}
        transitions = await self._evaluate_and_commit(todo, committed, now_ms)
        return await self._messages(transitions, committed, now_ms)

    # ---------------------------------------------------------------- expiry

    async def _schedule(self, states: Sequence[State], now_ms: int) -> None:
        """Schedule each profile for when one of its windowed counters next changes."""
        if not states:
            return
        conditions = self._conditions_by_id()
        entries = []
        for state in states:
            due = next_due(state.computed, conditions, now_ms)
            if due is not None:
                entries.append((state.profile_id, due))
        if entries:
            async with self.redis.pipeline(transaction=False) as pipe:
                for profile_id, due in entries:
                    pipe.zadd(due_key(profile_id), {profile_id: due}, lt=True)
                await pipe.execute()

    async def schedule_now(self, profile_ids: Sequence[str], now_ms: int) -> None:
        """Have every segment re-evaluated for these profiles at once (after a merge)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile_id in profile_ids:
                pipe.zadd(due_key(profile_id), {profile_id: now_ms}, lt=True)
            await pipe.execute()

    async def expire_due(self, now_ms: int, limit: int = 200) -> list[OutboundMessage]:
        """Claim due profiles (leased), re-evaluate every segment for them, and
        schedule them again. Returns the change events (for the caller to publish)."""
        claim = await self._script(CLAIM_DUE)
        lease = now_ms + LEASE_MS
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(DUE_SHARDS):
                pipe.evalsha(claim, 1, DUE_KEY % shard, now_ms, lease, limit)
            replies = await pipe.execute()
        profile_ids = sorted({text(p) for members, _, _ in replies for p in members})
        self.metrics.segment_expiry_backlog.set(sum(int(left) for _, left, _ in replies))
        oldest = [int(float(at)) for _, _, at in replies if text(at)]
        self.metrics.segment_expiry_delay.set(max(0.0, (now_ms - min(oldest)) / 1000) if oldest else 0.0)
        if not profile_ids:
            return []
        messages = await self.evaluate_profiles(profile_ids, None, f"expiry:{now_ms}", now_ms)
        states = await self.read_states(profile_ids)
        conditions = self._conditions_by_id()
        finish = await self._script(FINISH_DUE)
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile_id in profile_ids:
                state = states.get(profile_id)
                due = next_due(state.computed, conditions, now_ms) if state is not None else None
                pipe.evalsha(finish, 1, due_key(profile_id), profile_id, lease, "" if due is None else due)
            await pipe.execute()
        self.metrics.segment_expiry_checks.inc(len(profile_ids))
        return messages

    # ---------------------------------------------------------------- output

    async def _messages(self, transitions: Sequence[Transition], states: dict[str, State], now_ms: int) -> list[OutboundMessage]:
        if not transitions:
            return []
        missing = sorted({t.profile_id for t in transitions} - states.keys())
        if missing:
            states = {**states, **await self.read_states(missing)}
        out = []
        destinations = self.registry.destinations
        for transition in transitions:
            state = states.get(transition.profile_id)
            if transition.destination is None:
                segment = self.index.segments.get(transition.segment_id)
                self.metrics.segment_transitions.labels(transition.segment_id, _kind(transition)).inc()
                chosen = pick_traits(segment.chosen_traits, state, self.model, now_ms) if segment is not None else {}
                out.append(change_message(transition, chosen, state, now_ms))
                continue
            destination = destinations.get(transition.destination)
            if transition.kind == BLOCKED:
                self.metrics.activations_blocked.labels(transition.destination).inc()
                continue
            self.metrics.activations.labels(transition.destination, _kind(transition)).inc()
            out.append(activation_message(transition, destination, state, self.model, now_ms))
        return out


class _Cause:
    """Stands in for an event when an evaluation has no causing event."""

    __slots__ = ("message_id",)

    def __init__(self, cause: str) -> None:
        self.message_id = cause


def membership_exits(profile_id: str, memberships: dict[str, str], identifiers: list[str], cause: str, now_ms: int,
                     metrics: Metrics, destinations: Mapping[str, Destination] | None = None) -> list[OutboundMessage]:
    """An exited change event for each of a profile's memberships (segment id →
    "version|entered ms"), caused by ``cause`` (a merge or a deletion), not by
    an event; and an exit for each of its activations, on its destination's topic,
    with the identifiers that destination may receive (``destinations``; none when
    the destination is not configured here)."""
    state = State(profile_id, "", {}, {}, memberships, identifiers)
    out = []
    for field, value in sorted(memberships.items()):
        version = int(value.split("|", 1)[0] or 0)
        segment_id, _, name = field.partition(ACTIVATION)
        transition = Transition(profile_id, segment_id, version, EXITED, cause, None, name or None)
        if not name:
            metrics.segment_transitions.labels(segment_id, "exited").inc()
            out.append(change_message(transition, {}, state, now_ms))
            continue
        metrics.activations.labels(name, "exited").inc()
        destination = destinations.get(name) if destinations is not None else None
        out.append(activation_message(transition, destination, state, None, now_ms))
    return out


def next_due(computed: dict[str, str], conditions: dict, now_ms: int) -> int | None:
    """When the first windowed counter of this profile next loses a bucket (only the
    windowed counters the profile has are looked at)."""
    due = None
    for field, raw in computed.items():
        if not field.startswith("win:"):
            continue
        condition = conditions.get(field[4:])
        if condition is None or condition.within_ms is None:
            continue  # a computed trait's window, or a condition no segment has now
        size = bucket_ms(condition.within_ms)
        horizon = now_ms - condition.within_ms
        for bucket, amount in _buckets(raw):
            if amount and (bucket + 1) * size > horizon:
                at = (bucket + 1) * size + condition.within_ms
                due = at if due is None else min(due, at)
                break  # buckets are stored oldest first
    return due


class LazyCounters(Mapping):
    """Condition id → its count or sum as of now, worked out when a rule reads it."""

    def __init__(self, conditions: dict, computed: dict[str, str], now_ms: int) -> None:
        self._conditions = conditions
        self._computed = computed
        self._now = now_ms
        self._done: dict[str, float] = {}

    def __getitem__(self, condition_id: str) -> float:
        value = self._done.get(condition_id)
        if value is not None:
            return value
        condition = self._conditions[condition_id]
        if condition.within_ms is not None:
            size = bucket_ms(condition.within_ms)
            horizon = self._now - condition.within_ms
            value = sum(
                amount for bucket, amount in _buckets(self._computed.get(f"win:{condition_id}", ""))
                if (bucket + 1) * size > horizon
            )
        else:
            value = float(self._computed.get(f"add:{condition_id}", 0))
        self._done[condition_id] = value
        return value

    def get(self, condition_id: str, default=None):
        # Mapping.get goes through __getitem__ and a KeyError; rules call this per read.
        if condition_id in self._done:
            return self._done[condition_id]
        if condition_id not in self._conditions:
            return default
        return self[condition_id]

    def __iter__(self):
        return iter(self._conditions)

    def __len__(self) -> int:
        return len(self._conditions)


def pick_traits(names: Sequence[str], state: State | None, model: ProfileModel | None, now_ms: int) -> dict:
    """The named traits of a profile (dotted paths, ``computed.<name>[.<part>]``)
    that it has, keyed by the name as given."""
    if not names or state is None:
        return {}
    nested = state.nested_traits()
    computed = state.computed_view(model, now_ms) if model is not None else {}
    out = {}
    for name in names:
        parts = name.split(".")
        node: object = nested
        if parts[0] == "computed" and len(parts) > 1:
            node, parts = computed, parts[1:]
        for part in parts:
            node = node.get(part) if isinstance(node, Mapping) and part in node else None
            if node is None:
                break
        if node is not None:
            out[name] = node
    return out


def _kind(transition: Transition) -> str:
    return "entered" if transition.kind == ENTERED else "exited"


def _cloud_event(transition: Transition, source: str, subject_id: str, data: dict, now_ms: int) -> dict:
    return {
        "specversion": "1.0",
        "id": segment_rules.change_id(
            transition.profile_id, subject_id, transition.version, _kind(transition), transition.cause,
        ),
        "source": source,
        "type": transition.kind,
        "subject": transition.profile_id,
        "time": iso_ms(now_ms),
        "datacontenttype": "application/json",
        "data": data,
    }


def _cause(transition: Transition) -> str:
    return transition.cause.split(":", 1)[0] if transition.cause_event is None else "event"


def change_message(transition: Transition, chosen: dict, state: State | None, now_ms: int) -> OutboundMessage:
    """A CloudEvents 1.0 structured-mode JSON message, keyed by profile id."""
    body = _cloud_event(transition, "streamcdp/segments", transition.segment_id, {
        "segmentId": transition.segment_id,
        "segmentVersion": transition.version,
        "profileId": transition.profile_id,
        "identifiers": state.identifiers if state is not None else [],
        "traits": chosen,
        "causeEventId": transition.cause_event,
        "cause": _cause(transition),
    }, now_ms)
    return OutboundMessage(SEGMENT_CHANGES, transition.profile_id.encode(), orjson.dumps(body), cause=transition.cause_event)


def activation_message(transition: Transition, destination: Destination | None, state: State | None,
                       model: ProfileModel | None, now_ms: int) -> OutboundMessage:
    """The same CloudEvents shape on ``cdp.activations.<destination>``, with only the
    identifiers and traits the destination may receive (none when it is not
    configured: an exit after its configuration was removed)."""
    name = transition.destination
    identifiers = destination.identifiers_of(state.identifiers) if destination is not None and state is not None else []
    traits = pick_traits(destination.traits, state, model, now_ms) if destination is not None else {}
    body = _cloud_event(transition, f"streamcdp/activations/{name}", transition.segment_id + ACTIVATION + name, {
        "destination": name,
        "segmentId": transition.segment_id,
        "segmentVersion": transition.version,
        "profileId": transition.profile_id,
        "identifiers": identifiers,
        "traits": traits,
        "causeEventId": transition.cause_event,
        "cause": _cause(transition),
    }, now_ms)
    topic = destination.topic if destination is not None else f"cdp.activations.{name}"
    return OutboundMessage(topic, transition.profile_id.encode(), orjson.dumps(body), cause=transition.cause_event)


def _own_revision(evaluated: str, revs: Sequence[tuple[int, bool]]) -> str:
    """The revision to commit an evaluation at: that of the last state evaluated,
    moved on over the batch's later events of the profile that answered no state
    (they affect no segment) as long as the revisions follow one another (nobody
    else changed the profile in between); a gap leaves it, so the commit is refused
    and the profile evaluated again."""
    rev = int(evaluated)
    later = False
    for value, has_state in revs:
        if later:
            if value != rev + 1:
                break
            rev = value
        elif value == int(evaluated) and has_state:
            later = True
    return str(rev)


def _marker(transitions: Sequence[Transition]) -> str:
    return ",".join(
        f"{t.segment_id}{ACTIVATION + t.destination if t.destination else ''}@{t.version}{'+' if t.kind == ENTERED else '-'}"
        for t in transitions if t.kind != BLOCKED
    )


def _changes(start: dict[str, str], end: dict[str, str]) -> list[tuple[str, bool, str]]:
    changes = [(segment_id, True, value) for segment_id, value in end.items() if start.get(segment_id) != value]
    changes.extend((segment_id, False, "") for segment_id in start.keys() - end.keys())
    return changes


def _pairs(flat, raw: bool = False) -> dict:
    """A Redis hash reply (a flat list, or a dict) as a dict of text (values kept as
    bytes with ``raw``)."""
    if isinstance(flat, dict):
        return {text(k): (v if raw else text(v)) for k, v in flat.items()}
    if raw:
        return dict(zip(_texts(flat[::2]), flat[1::2]))
    items = _texts(flat)
    return dict(zip(items[::2], items[1::2]))


def _texts(items) -> list[str]:
    """Redis reply items as text, decoded in one go (NUL joins them: no key or value
    of ours holds one; JSON escapes it). Falls back item by item otherwise."""
    if not items:
        return []
    try:
        joined = b"\0".join(items)
    except TypeError:
        return [text(i) for i in items]
    if joined.count(b"\0") != len(items) - 1:
        return [text(i) for i in items]
    return joined.decode().split("\0")
