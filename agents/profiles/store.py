"""The profile in Redis: one atomic, idempotent Lua step per event, and reads.

``APPLY_EVENT`` runs on the profile's hash slot. It records the event's messageId
and applies the event in the same step, so a redelivered event changes nothing a
second time. It tells the caller which case it met:

* ``APPLIED`` (or ``APPLIED_NEW`` when it created the profile);
* ``REDELIVERED``: the messageId was applied from this same record (topic/partition/
  offset) before: a replay after a crash or rebalance. Outputs are sent again (they
  carry deterministic ids), because the first run may have stopped before sending.
* ``RESENT``: the messageId was applied from another record: a producer resent it.
  Dropped.

In the same step the event updates the profile: traits (per field, by dotted path
for nested objects, the value of the latest event by event time wins; a late event
carrying an older value does not overwrite a newer one; ties: the later applied),
consent per purpose (the same rule), computed traits (``agents.profiles.computed``),
the bounded history (newest event time first), the profile's identifiers and its
counters. The layout is in docs/state-layout.md.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from enum import IntEnum

import orjson

from agents.profiles.lua import FUNCTIONS
from agents.profiles.model import CONSENT_PREFIX, ProfileModel, unflatten
from schemas.events import Event, Identifier
from schemas.identifiers import parse_identifier
from streams.keys import ProfileKeys, identifier_key, message_field, origin_digest
from streams.texts import iso_ms, text

APPLY_EVENT = FUNCTIONS + """
-- KEYS: meta, traits, ids, seen, computed, history, match, segments
-- ARGV: origin, dedupe_ttl_ms, event_ms, now_ms, profile_id, message_field,
--       id_origin, match_record (or ''), history_entry (or ''), history_length,
--       want_state ('1': answer with the profile's state after the event),
--       n_traits, (name, json) * n_traits, n_ops, (op, field, group, value, extra) * n_ops,
--       n_wanted, condition field * n_wanted, identifier...
-- Answers {status, rev[, traits, computed, segments, identifiers]}; a redelivery {2, its seen record}.
-- The computed fields answered leave out the segment conditions' counters
-- ("win:c<12 hex>", "add:c<12 hex>") other than the wanted ones.
local head = redis.call('HMGET', KEYS[1], 'merged_into', 'deleted')
if head[1] then return {5, head[1]} end
if head[2] then return {6} end
local seen = redis.call('HGET', KEYS[4], ARGV[6])
if seen then
  if string.sub(seen, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then return {2, seen} end
  return {3}
end
local now = tonumber(ARGV[4])
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[4], ARGV[6], ARGV[1] .. '|' .. ARGV[4])
local sweep = redis.call('HGET', KEYS[1], 'seen_sweep')
if not sweep then
  redis.call('HSET', KEYS[1], 'seen_sweep', fmt(now + ttl))
elseif now >= tonumber(sweep) then
  sweep_seen(KEYS[4], now - ttl)
  redis.call('HSET', KEYS[1], 'seen_sweep', fmt(now + math.max(math.floor(ttl / 8), 1000)))
end
local ts = tonumber(ARGV[3])
local status = 1
if redis.call('HSETNX', KEYS[1], 'created_at', ARGV[4]) == 1 then
  redis.call('HSET', KEYS[1], 'id', ARGV[5])
  status = 4
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'event_count', 1)
local first = redis.call('HGET', KEYS[1], 'first_seen')
if (not first) or ts < tonumber(first) then redis.call('HSET', KEYS[1], 'first_seen', ARGV[3]) end
local last = redis.call('HGET', KEYS[1], 'last_seen')
if (not last) or ts > tonumber(last) then redis.call('HSET', KEYS[1], 'last_seen', ARGV[3]) end
if ARGV[8] ~= '' and redis.call('SCARD', KEYS[7]) < 32 then redis.call('SADD', KEYS[7], ARGV[8]) end
if ARGV[9] ~= '' then history_insert(KEYS[6], ARGV[9], tonumber(ARGV[10])) end
local n = tonumber(ARGV[12])
local i = 13
for _ = 1, n do
  set_latest(KEYS[2], ARGV[i], ARGV[3] .. '|' .. ARGV[i + 1])
  i = i + 2
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  apply_op(KEYS[5], ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
  i = i + 5
end
n = tonumber(ARGV[i]); i = i + 1
local wanted = {}
for _ = 1, n do wanted[ARGV[i]] = true; i = i + 1 end
for j = i, #ARGV do redis.call('HSETNX', KEYS[3], ARGV[j], ARGV[7]) end
-- The profile's revision: every change of its state counts it up (FOLD too), so a
-- segment evaluation can tell whether the state it saw is still the current one.
local rev = redis.call('HINCRBY', KEYS[1], 'rev', 1)
if ARGV[11] == '1' then
  local all, computed = redis.call('HGETALL', KEYS[5]), {}
  for k = 1, #all, 2 do
    local f = all[k]
    if #f ~= 17 or string.sub(f, 4, 5) ~= ':c' or wanted[f] then
      computed[#computed + 1] = f
      computed[#computed + 1] = all[k + 1]
    end
  end
  return {status, rev, redis.call('HGETALL', KEYS[2]), computed, redis.call('HGETALL', KEYS[8]), redis.call('HKEYS', KEYS[3])}
end
return {status, rev}
"""


class ApplyStatus(IntEnum):
    APPLIED = 1
    REDELIVERED = 2
    RESENT = 3
    APPLIED_NEW = 4
    MOVED = 5  # the profile was merged into another: resolve again and retry there
    DELETED = 6  # the person's data was deleted (a privacy request): resolve again, as a new person


def apply_event_call(
    event: Event,
    profile_id: str,
    origin: str,
    identifiers: Sequence[Identifier],
    *,
    model: ProfileModel,
    dedupe_ttl_s: int,
    now_ms: int,
    match_record: bytes = b"",
    plain: bool = False,
    extra_ops: Sequence[object] = (),
    want_state: bool | Sequence[str] = False,
) -> tuple[list[str], list[object]]:
    """KEYS and ARGV of ``APPLY_EVENT`` for one event (pure).

    ``identifiers``: those the event adds to the profile (the ones it claimed or
    already held there; never the ones merge protection kept apart).
    ``match_record``: the event's fuzzy-match record (JSON), if it has one.
    ``plain``: the event holds no sensitive name (skips the protection walk).
    ``extra_ops``: more computed-field operations (the segment stage's counters).
    ``want_state``: answer with the profile's traits, computed fields and
    memberships after the event (for segment evaluation); a sequence names the
    segment conditions' counter fields wanted (the others are left out)."""
    keys = ProfileKeys(profile_id)
    args: list[object] = [
        origin_digest(origin), dedupe_ttl_s * 1000, event.timestamp_ms, now_ms, profile_id,
        message_field(event.message_id), identifier_origin(event), match_record,
        model.history_entry(event, plain=plain), model.history_length,
        b"0" if want_state is False or want_state is None else b"1",
    ]
    traits = model.traits_of(event, plain=plain)
    args.append(len(traits))
    for name, value in traits:
        args.append(name)
        args.append(value)
    ops = model.computed.plan(event)
    args.append((len(ops) + len(extra_ops)) // 5)
    args.extend(ops)
    args.extend(extra_ops)
    wanted = () if isinstance(want_state, bool) else want_state
    args.append(len(wanted))
    args.extend(wanted)
    args.extend(str(i) for i in identifiers)
    return [keys.meta, keys.traits, keys.ids, keys.seen, keys.computed, keys.history, keys.match, keys.segments], args


def identifier_origin(event: Event) -> bytes:
    """Where the profile first got an identifier: ``"<event ms>|<channel>|<messageId>"``."""
    return b"%d|%s|%s" % (event.timestamp_ms, event.channel.encode(), event.message_id.encode())


async def find_profile_id(redis, identifier: Identifier, hash_key: str) -> str | None:
    """The profile that claimed ``identifier`` (maybe merged since; see ``root_of``)."""
    value = await redis.get(identifier_key(identifier, hash_key))
    return value.decode() if isinstance(value, bytes) else value


async def root_of(redis, profile_id: str, max_hops: int = 64) -> str:
    """Follow merge pointers from ``profile_id`` to the surviving profile."""
    for _ in range(max_hops):
        parent = await redis.hget(ProfileKeys(profile_id).meta, "merged_into")
        if parent is None:
            return profile_id
        profile_id = text(parent)
    raise RuntimeError(f"merge chain longer than {max_hops} hops at {profile_id}")


async def read_profile(redis, profile_id: str, model: ProfileModel | None = None, *, now_ms: int | None = None) -> dict | None:
    """The profile as a JSON-ready dict (the survivor, if ``profile_id`` was merged
    into another), or None when there is none. ``model``: the worker's profile
    configuration (computed traits are presented by it); the shipped one by default."""
    model = model or default_model()
    profile_id = await root_of(redis, profile_id)
    keys = ProfileKeys(profile_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.meta)
        pipe.hgetall(keys.traits)
        pipe.hgetall(keys.ids)
        pipe.hgetall(keys.computed)
        pipe.lrange(keys.history, 0, -1)
        pipe.hkeys(keys.segments)
        pipe.lrange(keys.merges, 0, -1)
        meta, stored_traits, ids, computed, history, segments, merges = await pipe.execute()
    if not meta or b"created_at" not in meta:
        return None
    meta = {text(k): text(v) for k, v in meta.items()}
    traits: dict[str, tuple[int, object]] = {}
    consent: dict[str, dict] = {}
    for name, raw in stored_traits.items():
        name = text(name)
        at, _, value = raw.partition(b"|")
        if name.startswith(CONSENT_PREFIX):
            granted, message_id, channel = orjson.loads(value)
            consent[name[len(CONSENT_PREFIX):]] = {"granted": granted, "at": iso_ms(at), "messageId": message_id, "channel": channel}
        else:
            traits[name] = (int(at), orjson.loads(value))
    origins = {}
    for identifier, raw in sorted(ids.items()):
        at, channel, message_id = text(raw).split("|", 2)
        origins[text(identifier)] = {"messageId": message_id, "channel": channel, "at": iso_ms(at)}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return {
        "id": profile_id,
        "identifiers": sorted(origins),
        "traits": unflatten(traits),
        "computedTraits": model.computed.present({text(k): text(v) for k, v in computed.items()}, now_ms),
        "consent": dict(sorted(consent.items())),
        "segments": sorted(text(s) for s in segments if b">" not in s),
        # Where its memberships are activated: "<segment>><destination>" (docs/activation.md).
        "activations": sorted(text(s) for s in segments if b">" in s),
        "createdAt": iso_ms(meta.get("created_at")),
        "updatedAt": iso_ms(meta.get("updated_at")),
        "firstSeen": iso_ms(meta.get("first_seen")),
        "lastSeen": iso_ms(meta.get("last_seen")),
        "eventCount": _int(meta.get("event_count")) or 0,
        "recentEvents": [history_item(entry) for entry in history],
        "identifierOrigins": origins,
        "merges": [orjson.loads(m) for m in merges],
    }


@functools.cache
def default_model() -> ProfileModel:
    """The profile model of the shipped configuration files and default settings."""
    from streams.settings import Settings

    return ProfileModel.load(Settings())


def history_item(entry: bytes) -> dict:
    at, _, body = entry.partition(b"|")
    item = orjson.loads(body)
    item["timestamp"] = iso_ms(at)
    return item


def _int(value: str | None) -> int | None:
    return int(value) if value is not None else None




async def lookup_profile(
    redis, id_or_identifier: str, *, hash_key: str, default_region: str, model: ProfileModel | None = None
) -> dict | None:
    """A profile by its id (``p_...``) or by an identifier (``email:ann@example.com``).

    Raises InvalidIdentifier for text that is neither."""
    text = id_or_identifier.strip()
    if text.startswith("p_") and ":" not in text:
        return await read_profile(redis, text, model)
    model = model or default_model()
    identifier = model.sensitive.protect_identifier(parse_identifier(text, default_region))
    profile_id = await find_profile_id(redis, identifier, hash_key)
    return None if profile_id is None else await read_profile(redis, profile_id, model)
