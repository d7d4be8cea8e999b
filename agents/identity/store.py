"""The identity graph in Redis: reads for the planner, and the merge steps.

Every step touches one hash slot, so the design holds on Redis Cluster:

| step | slot | what |
|---|---|---|
| read owners | identifier | ``GET cdp:id:{digest}`` per identifier |
| release stale | identifier | ``RELEASE_STALE``: only for claims naming a deleted profile |
| read nodes | profile | ``HMGET meta merged_into fold_pending`` + ``HKEYS ids``, only for events that may claim, merge or be refused (``_simple_root``) |
| ``SET_PARENT`` | absorbed | write-once ``merged_into`` + ``fold_pending``; refuses a second parent |
| read state | absorbed | traits, identifiers, dedupe records, computed traits, history, audit ... |
| ``FOLD`` | survivor | adds the absorbed state once (``folded`` set); refused on a merged profile |
| ``CLEANUP`` | absorbed | drops the moved state, clears ``fold_pending`` |

A crash between steps leaves ``fold_pending`` on the absorbed profile. Any later
resolution that reaches it (the replayed event that caused the merge always does)
finishes the fold; ``FOLD`` is idempotent and ``CLEANUP`` runs only after the fold
and the merge record's publication succeeded. A profile with a parent accepts no more
writes (``APPLY_EVENT`` and ``FOLD`` answer ``MOVED``), so nothing lands on it after
its state has been read for the fold.

An identifier on the suppression list (a ``suppress`` privacy request,
``agents/privacy.py``) has ``SUPPRESSED`` as its index value instead of a profile id.
Any event with such an identifier is *suppressed*: it gets no plan and nothing is
stored for it. The marker is never cached (so lifting a suppression takes effect on
every worker at once) and never reaches the planner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b

import orjson

from agents.identity.graph import GraphView, Merge, Node, candidates, identifiers_to_look_up
from agents.identity.rules import IdentityRules
from agents.profiles.lua import FUNCTIONS
from schemas.events import Event, Identifier
from streams.keys import ProfileKeys, identifier_key
from streams.records import OutboundMessage
from streams.topics import IDENTITY_MERGES
from streams.texts import iso_ms, text

_MAX_CHAIN_ROUNDS = 16
_MAX_FOLD_HOPS = 16
# Re-reads of owners a view may need after meeting deleted profiles.
_MAX_GONE_ROUNDS = 4

# The index value of an identifier on the suppression list. Profile ids start with
# "p_" (streams/keys.py), so this can never be taken for one.
SUPPRESSED = "~suppressed"

# KEYS: an identifier's index key. ARGV: a deleted profile's id.
# Drops the claim if it still names that profile; answers the key's value after.
RELEASE_STALE = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return false
end
return owner
"""

# KEYS: an identifier's index key. ARGV: profile ids.
# Drops the claim if it names one of them (never a suppression marker, never a claim
# another profile made meanwhile).
RELEASE_CLAIM = """
local owner = redis.call('GET', KEYS[1])
if not owner then return 0 end
for i = 1, #ARGV do
  if owner == ARGV[i] then return redis.call('DEL', KEYS[1]) end
end
return 0
"""

# KEYS: meta, ids, then every other state key of one profile (``wipe_keys``).
# ARGV: now_ms. In one atomic step: answers the identifiers the profile holds, drops
# every key and leaves the tombstone (``deleted``, ``deleted_at``: no personal data).
# A profile step (also atomic, on the same slot) therefore either ran before and is
# wiped with the rest, or runs after and is answered DELETED.
WIPE_PROFILE = """
local ids = redis.call('HKEYS', KEYS[2])
redis.call('DEL', unpack(KEYS))
redis.call('HSET', KEYS[1], 'deleted', '1', 'deleted_at', ARGV[1])
return ids
"""


def is_suppressed(owner: str | bytes | None) -> bool:
    """Whether an identifier index value is the suppression marker (not a profile id).

    >>> is_suppressed(b"~suppressed"), is_suppressed("p_0abc"), is_suppressed(None)
    (True, False, False)
    """
    return owner is not None and text(owner) == SUPPRESSED


def suppressed_events(
    events: Sequence[Event], owners: Mapping[Identifier, str | None], rules: IdentityRules
) -> list[bool]:
    """Per event, whether any identifier it is looked up by (an alias's previousId
    too) is on the suppression list. Pure."""
    if SUPPRESSED not in owners.values():
        return [False] * len(events)
    return [any(owners.get(i) == SUPPRESSED for i, _ in candidates(e, rules)) for e in events]


def wipe_keys(profile_id: str) -> list[str]:
    """The KEYS of ``WIPE_PROFILE`` for one profile."""
    keys = ProfileKeys(profile_id)
    return [keys.meta, keys.ids, *(k for k in keys.state() if k != keys.ids)]


SET_PARENT = """
-- KEYS: meta of the absorbed profile. ARGV: survivor, now_ms, identifier, message_id
if redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then return {0, ''} end
local parent = redis.call('HGET', KEYS[1], 'merged_into')
if parent then
  if parent == ARGV[1] then return {1} end
  return {0, parent}
end
redis.call('HSET', KEYS[1], 'merged_into', ARGV[1], 'merged_at', ARGV[2],
           'merge_identifier', ARGV[3], 'merge_event', ARGV[4], 'fold_pending', '1')
return {1}
"""

FOLD = FUNCTIONS + """
-- KEYS: survivor meta, traits, ids, seen, computed, history, folded, merges, match
-- ARGV: absorbed, survivor, now_ms, merge_record, event_count, first_seen, last_seen,
--       history_length, then counted sections: traits (name, value), ids (id, origin),
--       seen (field, value), computed (field, value), history entries, folded ids,
--       merge records (newest first), match records
local parent = redis.call('HGET', KEYS[1], 'merged_into')
if parent then return {5, parent} end
if redis.call('SISMEMBER', KEYS[7], ARGV[1]) == 1 then return {2} end
if redis.call('HSETNX', KEYS[1], 'created_at', ARGV[3]) == 1 then
  redis.call('HSET', KEYS[1], 'id', ARGV[2])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[1], 'event_count', ARGV[5]) end
if ARGV[6] ~= '' then
  local first = redis.call('HGET', KEYS[1], 'first_seen')
  if (not first) or tonumber(ARGV[6]) < tonumber(first) then redis.call('HSET', KEYS[1], 'first_seen', ARGV[6]) end
end
if ARGV[7] ~= '' then
  local last = redis.call('HGET', KEYS[1], 'last_seen')
  if (not last) or tonumber(ARGV[7]) > tonumber(last) then redis.call('HSET', KEYS[1], 'last_seen', ARGV[7]) end
end
local history_length = tonumber(ARGV[8])
local i = 9
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do set_latest(KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]); i = i + 2 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]); i = i + 2 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do merge_computed(KEYS[5], ARGV[i], ARGV[i + 1]); i = i + 2 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do history_insert(KEYS[6], ARGV[i], history_length); i = i + 1 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do redis.call('SADD', KEYS[7], ARGV[i]); i = i + 1 end
redis.call('SADD', KEYS[7], ARGV[1])
n = tonumber(ARGV[i]); i = i + 1
local records = {}
for _ = 1, n do table.insert(records, 1, ARGV[i]); i = i + 1 end
for _, record in ipairs(records) do redis.call('LPUSH', KEYS[8], record) end
redis.call('LPUSH', KEYS[8], ARGV[4])
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  if redis.call('SCARD', KEYS[9]) < 32 then redis.call('SADD', KEYS[9], ARGV[i]) end
  i = i + 1
end
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return {1}
"""

CLEANUP = """
-- KEYS: absorbed meta, then its state keys. ARGV: now_ms
if redis.call('HGET', KEYS[1], 'fold_pending') ~= '1' then return 0 end
redis.call('DEL', unpack(KEYS, 2))
redis.call('HDEL', KEYS[1], 'event_count', 'first_seen', 'last_seen', 'updated_at', 'fold_pending', 'seen_sweep')
redis.call('HSET', KEYS[1], 'folded_at', ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class GraphRead:
    """What ``read_graph`` found for a batch."""

    view: GraphView
    pending: list[Node]  # profiles found with an unfinished fold
    suppressed: list[bool]  # per event: it carries an identifier on the suppression list


@dataclass(frozen=True, slots=True)
class AbsorbedState:
    profile_id: str
    parent: str
    meta: dict[str, str]
    traits: dict[str, bytes]  # name → "<ms>|<JSON>"
    ids: dict[str, bytes]  # identifier → origin
    seen: dict[str, bytes]
    computed: dict[str, bytes]
    history: list[bytes]
    folded: list[str]
    merges: list[bytes]
    match: list[bytes]


class IdentityStore:
    """Redis I/O of the identity graph. Each method is one pipelined round trip
    (``read_view`` one per level of merge chain, usually two)."""

    def __init__(
        self, redis, rules: IdentityRules, hash_key: str, *, history_length: int = 20, cache_size: int = 200_000
    ) -> None:
        self.redis = redis
        self.history_length = history_length
        self.rules = rules
        self.hash_key = hash_key
        self._sha: dict[str, str] = {}
        # identifier → the profile that claimed it. Claims are write-once, so a known
        # owner never changes and needs no reading again. (Deleting a person's data
        # must drop their identifiers from this cache on every worker.)
        self._owners: dict[Identifier, str] = {}
        self._cache_size = cache_size
        # absorbed profile → its parent, for merges seen *settled* (fold and cleanup
        # done: no fold_pending). Parents are write-once and a settled merge has
        # nothing left to finish, so these never go stale.
        self._settled: dict[str, str] = {}
        # Profiles an APPLY_EVENT found merged away (MOVED): read them before
        # trusting the caches about them again.
        self._suspect: set[str] = set()

    def suspect(self, profile_id: str) -> None:
        """``profile_id`` was found merged away: resolve its events the full way."""
        if len(self._suspect) < 100_000:
            self._suspect.add(profile_id)

    def forget_profile(self, profile_id: str) -> None:
        """``profile_id`` was deleted: drop every cached claim and merge naming it."""
        for identifier in [i for i, p in self._owners.items() if p == profile_id]:
            del self._owners[identifier]
        for absorbed in [a for a, p in self._settled.items() if p == profile_id or a == profile_id]:
            del self._settled[absorbed]
        self.suspect(profile_id)

    def _settled_root(self, profile_id: str) -> str:
        settled = self._settled
        for _ in range(_MAX_FOLD_HOPS):
            parent = settled.get(profile_id)
            if parent is None:
                return profile_id
            profile_id = parent
        return profile_id

    def _simple_root(self, event: Event, owners: dict[Identifier, str | None]) -> str | None:
        """The profile ``event`` lands on when that needs no reading of profiles:
        every identifier is owned, all by one profile (or by profiles whose merge
        into it is settled), that profile is not suspected of a newer merge, and one
        identifier is strong (so fuzzy matching has no say). Else None.

        Such an event claims nothing, merges nothing and adds no identifier the
        profile does not have, so no limit can apply. If the profile has been
        merged meanwhile, its ``APPLY_EVENT`` answers MOVED and the event is
        resolved again the full way."""
        root = None
        strong = False
        for identifier, _ in candidates(event, self.rules):
            owner = owners.get(identifier)
            if owner is None:
                return None
            found = self._settled_root(owner)
            if found in self._suspect or (root is not None and found != root):
                return None
            root = found
            strong = strong or self.rules.strong(identifier.type)
        return root if strong else None

    def remember_owner(self, identifier: Identifier, profile_id: str) -> None:
        owners = self._owners
        if len(owners) >= self._cache_size:
            for stale in list(owners)[: self._cache_size // 4]:  # oldest first (insertion order)
                del owners[stale]
        owners[identifier] = profile_id

    async def _script(self, source: str) -> str:
        sha = self._sha.get(source)
        if sha is None:
            sha = self._sha[source] = await self.redis.script_load(source)
        return sha

    def forget_scripts(self) -> None:
        self._sha.clear()

    async def read_view(self, events: Sequence[Event]) -> tuple[GraphView, list[Node]]:
        """``read_graph``'s view and pending folds."""
        read = await self.read_graph(events)
        return read.view, read.pending

    async def read_graph(self, events: Sequence[Event]) -> GraphRead:
        """Owners of the batch's identifiers and every profile on their chains; also
        the profiles found with an unfinished fold, and which events are suppressed
        (those are left out of the view: nothing is read or planned for them)."""
        cached = self._owners
        owners: dict[Identifier, str | None] = {}
        lookup = []
        for identifier in identifiers_to_look_up(events, self.rules):
            owner = cached.get(identifier)
            if owner is None:
                lookup.append(identifier)
            else:
                owners[identifier] = owner
        if lookup:
            async with self.redis.pipeline(transaction=False) as pipe:
                for identifier in lookup:
                    pipe.get(identifier_key(identifier, self.hash_key))
                values = await pipe.execute()
            for identifier, value in zip(lookup, values):
                owner = owners[identifier] = text(value) if value is not None else None
                if owner is not None and owner != SUPPRESSED:
                    self.remember_owner(identifier, owner)
        nodes: dict[str, Node] = {}
        for round_ in range(_MAX_GONE_ROUNDS):
            suppressed = suppressed_events(events, owners, self.rules)
            # Profiles are read only for the events that may claim, merge or be
            # refused; none for suppressed events.
            wanted: set[str] = set()
            shortcut: set[str] = set()
            for event, barred in zip(events, suppressed):
                if barred:
                    continue
                event_owners = [owners.get(i) for i, _ in candidates(event, self.rules)]
                if self._simple_root(event, owners) is None:
                    wanted.update(p for p in event_owners if p)
                else:
                    shortcut.update(event_owners)
            nodes.update(await self.read_nodes(wanted, known=nodes))
            # Settled merges on the shortcut events' chains, so the planner finds roots.
            for profile_id in shortcut:
                while profile_id in self._settled and profile_id not in nodes:
                    nodes[profile_id] = Node(profile_id, self._settled[profile_id])
                    profile_id = self._settled[profile_id]
            gone = {p for p, n in nodes.items() if n.deleted}
            if not gone:
                break
            # A deleted person's profiles own nothing any more (these came from caches,
            # or are claims left pointing at the tombstone).
            for profile_id in gone:
                self.forget_profile(profile_id)
                del nodes[profile_id]
            if round_ == _MAX_GONE_ROUNDS - 1:
                # Deletions keep racing this read: take what they owned as free; a
                # claim that loses is resolved again.
                owners = {i: (None if o in gone else o) for i, o in owners.items()}
                break
            # Drop those claims and read the identifiers again: they may be free,
            # another profile's by now, or suppressed.
            stale = [(i, o) for i, o in owners.items() if o in gone]
            for (identifier, _), value in zip(stale, await self._release_stale(stale)):
                owner = owners[identifier] = text(value) if value is not None else None
                if owner is not None and owner != SUPPRESSED:
                    self.remember_owner(identifier, owner)
        pending_folds = [n for n in nodes.values() if n.fold_pending and n.parent]
        planned = {i: o for i, o in owners.items() if o != SUPPRESSED}
        return GraphRead(GraphView(planned, nodes), pending_folds, suppressed)

    async def _release_stale(self, stale: Sequence[tuple[Identifier, str]]) -> list:
        """One round trip: drop each claim still naming its deleted profile; the
        current index value of each identifier."""
        if not stale:
            return []
        sha = await self._script(RELEASE_STALE)
        async with self.redis.pipeline(transaction=False) as pipe:
            for identifier, profile_id in stale:
                pipe.evalsha(sha, 1, identifier_key(identifier, self.hash_key), profile_id)
            return await pipe.execute()

    async def read_nodes(self, wanted: set[str], known: dict[str, Node] | None = None) -> dict[str, Node]:
        """``wanted`` profiles and every profile on their merge chains (one round trip
        per level of chain), skipping those in ``known``."""
        nodes: dict[str, Node] = {}
        known = known or {}
        for _ in range(_MAX_CHAIN_ROUNDS):
            wanted = wanted - nodes.keys() - known.keys()
            if not wanted:
                return nodes
            order = sorted(wanted)
            async with self.redis.pipeline(transaction=False) as pipe:
                for profile_id in order:
                    keys = ProfileKeys(profile_id)
                    pipe.hmget(keys.meta, "merged_into", "fold_pending", "deleted")
                    pipe.hkeys(keys.ids)
                replies = await pipe.execute()
            wanted = set()
            for index, profile_id in enumerate(order):
                (parent, pending, deleted), ids = replies[2 * index], replies[2 * index + 1]
                if deleted is not None:
                    nodes[profile_id] = Node(profile_id, deleted=True)
                    continue
                node = Node(
                    profile_id,
                    text(parent) if parent is not None else None,
                    frozenset(text(i) for i in ids),
                    pending is not None and text(pending) == "1",
                )
                nodes[profile_id] = node
                self._suspect.discard(profile_id)
                if node.parent:
                    wanted.add(node.parent)
                    if not node.fold_pending and len(self._settled) < self._cache_size:
                        self._settled[profile_id] = node.parent
        raise RuntimeError("merge chains deeper than expected; refusing to guess")

    async def set_parents(self, merges: Sequence[Merge], now_ms: int) -> list[str]:
        """Point each absorbed profile at its survivor. Returns the absorbed ids that
        already had another parent (someone merged them concurrently: plan again)."""
        sha = await self._script(SET_PARENT)
        async with self.redis.pipeline(transaction=False) as pipe:
            for merge in merges:
                pipe.evalsha(sha, 1, ProfileKeys(merge.absorbed).meta, merge.survivor, now_ms, merge.identifier, merge.message_id)
            replies = await pipe.execute()
        return [m.absorbed for m, r in zip(merges, replies) if int(r[0]) != 1]

    async def read_absorbed(self, profile_ids: Sequence[str]) -> list[AbsorbedState]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile_id in profile_ids:
                keys = ProfileKeys(profile_id)
                pipe.hgetall(keys.meta)
                pipe.hgetall(keys.traits)
                pipe.hgetall(keys.ids)
                pipe.hgetall(keys.seen)
                pipe.hgetall(keys.computed)
                pipe.lrange(keys.history, 0, -1)
                pipe.smembers(keys.folded)
                pipe.lrange(keys.merges, 0, -1)
                pipe.smembers(keys.match)
            replies = await pipe.execute()
        states = []
        for index, profile_id in enumerate(profile_ids):
            meta, traits, ids, seen, computed, history, folded, merges, match = replies[9 * index: 9 * index + 9]
            meta = {text(k): text(v) for k, v in meta.items()}
            states.append(
                AbsorbedState(
                    profile_id, meta.get("merged_into", ""), meta,
                    {text(k): v for k, v in traits.items()}, {text(k): v for k, v in ids.items()},
                    {text(k): v for k, v in seen.items()}, {text(k): v for k, v in computed.items()},
                    list(history), sorted(text(f) for f in folded), list(merges), sorted(match),
                )
            )
        return states

    async def fold(self, states: Sequence[AbsorbedState], targets: Sequence[str], now_ms: int) -> list[tuple[int, str | None]]:
        """Run ``FOLD`` of each state into its target; (status, parent-if-moved) each."""
        sha = await self._script(FOLD)
        async with self.redis.pipeline(transaction=False) as pipe:
            for state, target in zip(states, targets):
                keys = ProfileKeys(target)
                args = fold_args(state, target, now_ms, self.history_length)
                pipe.evalsha(sha, 9, keys.meta, keys.traits, keys.ids, keys.seen, keys.computed, keys.history,
                             keys.folded, keys.merges, keys.match, *args)
            replies = await pipe.execute()
        return [(int(r[0]), text(r[1]) if len(r) > 1 else None) for r in replies]

    async def cleanup(self, profile_ids: Sequence[str], now_ms: int) -> None:
        sha = await self._script(CLEANUP)
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile_id in profile_ids:
                keys = ProfileKeys(profile_id)
                state = keys.state()
                pipe.evalsha(sha, 1 + len(state), keys.meta, *state, now_ms)
            await pipe.execute()


def merge_record(state: AbsorbedState, survivor: str) -> dict:
    """The audit/merge message for ``state`` folded into ``survivor``; its id is
    deterministic, so consumers can drop a republished copy."""
    meta = state.meta
    merged_at = meta.get("merged_at") or "0"
    return {
        "type": "cdp.profile.merged",
        "id": "merge-" + blake2b(f"{state.profile_id}>{state.parent}".encode(), digest_size=12).hexdigest(),
        "time": iso_ms(merged_at),
        "absorbedId": state.profile_id,
        "survivorId": survivor,
        "identifier": meta.get("merge_identifier"),
        "messageId": meta.get("merge_event"),
    }


def fold_args(state: AbsorbedState, survivor: str, now_ms: int, history_length: int) -> list:
    meta = state.meta
    args: list = [
        state.profile_id, survivor, now_ms, orjson.dumps(merge_record(state, survivor)),
        int(meta.get("event_count") or 0), meta.get("first_seen", ""), meta.get("last_seen", ""), history_length,
    ]
    for section in (state.traits, state.ids, state.seen, computed_for_fold(state.computed)):
        args.append(len(section))
        for name, value in section.items():
            args.extend((name, value))
    for items in (state.history, state.folded, state.merges, state.match):
        args.append(len(items))
        args.extend(items)
    return args


def computed_for_fold(fields: dict[str, bytes]) -> dict[str, bytes]:
    """Computed fields as ``FOLD`` merges them: a ``first:``/``last:`` value joined
    with its event time (kept apart in ``atfirst:``/``atlast:``)."""
    out = {}
    for name, value in fields.items():
        if name.startswith(("atfirst:", "atlast:")):
            continue
        if name.startswith(("first:", "last:")):
            at = fields.get("at" + name)
            if at is None:
                continue
            value = (at if isinstance(at, bytes) else str(at).encode()) + b"|" + value
        out[name] = value
    return out


def merge_message(state: AbsorbedState, survivor: str) -> OutboundMessage:
    return OutboundMessage(IDENTITY_MERGES, survivor.encode(), orjson.dumps(merge_record(state, survivor)))


def blocked_message(blocked, now_ms: int) -> OutboundMessage:
    record = {
        "type": "cdp.profile.merge_blocked",
        "id": "blocked-" + blake2b(f"{blocked.message_id}|{blocked.identifier}".encode(), digest_size=12).hexdigest(),
        "time": iso_ms(now_ms),
        "profileId": blocked.profile_id,
        "otherProfileId": blocked.owner,
        "identifier": blocked.identifier,
        "limitedTypes": list(blocked.types),
        "messageId": blocked.message_id,
    }
    return OutboundMessage(IDENTITY_MERGES, blocked.profile_id.encode(), orjson.dumps(record))
