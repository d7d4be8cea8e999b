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

Traits: per field, the value of the latest event by event time wins; a late event
carrying an older value does not overwrite a newer one (ties: the later applied).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from enum import IntEnum

import orjson

from schemas.events import Event, Identifier
from schemas.identifiers import parse_identifier
from streams.keys import ProfileKeys, identifier_key, message_field

APPLY_EVENT = """
-- KEYS: meta, traits, traits_ts, ids, id_origin, seen, seen_at, match
-- ARGV: origin, dedupe_ttl_ms, event_ms, now_ms, profile_id, message_field,
--       id_origin_json, match_record_json (or ''), n_traits, (name, json) * n_traits,
--       identifier...
local parent = redis.call('HGET', KEYS[1], 'merged_into')
if parent then return {5, parent} end
local seen = redis.call('HGET', KEYS[6], ARGV[6])
if seen then
  if string.sub(seen, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then return {2} end
  return {3}
end
redis.call('HSET', KEYS[6], ARGV[6], ARGV[1] .. '|' .. ARGV[4])
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[6])
local expired = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', tonumber(ARGV[4]) - tonumber(ARGV[2]), 'LIMIT', 0, 16)
if #expired > 0 then
  redis.call('HDEL', KEYS[6], unpack(expired))
  redis.call('ZREM', KEYS[7], unpack(expired))
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
if ARGV[8] ~= '' and redis.call('SCARD', KEYS[8]) < 32 then redis.call('SADD', KEYS[8], ARGV[8]) end
local n = tonumber(ARGV[9])
local i = 10
for _ = 1, n do
  local name = ARGV[i]
  local held = redis.call('HGET', KEYS[3], name)
  if (not held) or ts >= tonumber(held) then
    redis.call('HSET', KEYS[2], name, ARGV[i + 1])
    redis.call('HSET', KEYS[3], name, ARGV[3])
  end
  i = i + 2
end
for j = i, #ARGV do
  if redis.call('SADD', KEYS[4], ARGV[j]) == 1 then
    redis.call('HSETNX', KEYS[5], ARGV[j], ARGV[7])
  end
end
return {status}
"""


class ApplyStatus(IntEnum):
    APPLIED = 1
    REDELIVERED = 2
    RESENT = 3
    APPLIED_NEW = 4
    MOVED = 5  # the profile was merged into another: resolve again and retry there


def apply_event_call(
    event: Event,
    profile_id: str,
    origin: str,
    identifiers: Sequence[Identifier],
    *,
    dedupe_ttl_s: int,
    now_ms: int,
    match_record: bytes = b"",
) -> tuple[list[str], list[object]]:
    """KEYS and ARGV of ``APPLY_EVENT`` for one event (pure).

    ``identifiers``: those the event adds to the profile (the ones it claimed or
    already held there; never the ones merge protection kept apart).
    ``match_record``: the event's fuzzy-match record (JSON), if it has one."""
    keys = ProfileKeys(profile_id)
    id_origin = orjson.dumps({"messageId": event.message_id, "channel": event.channel, "at": event.timestamp_ms})
    args: list[object] = [
        origin, dedupe_ttl_s * 1000, event.timestamp_ms, now_ms, profile_id,
        message_field(event.message_id), id_origin, match_record, len(event.traits),
    ]
    for name, value in event.traits.items():
        args.append(name)
        args.append(orjson.dumps(value))
    args.extend(str(i) for i in identifiers)
    return [keys.meta, keys.traits, keys.traits_ts, keys.ids, keys.id_origin, keys.seen, keys.seen_at, keys.match], args


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
        profile_id = _text(parent)
    raise RuntimeError(f"merge chain longer than {max_hops} hops at {profile_id}")


async def read_profile(redis, profile_id: str) -> dict | None:
    """The profile as a JSON-ready dict (the survivor, if ``profile_id`` was merged
    into another), or None when there is none."""
    profile_id = await root_of(redis, profile_id)
    keys = ProfileKeys(profile_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.meta)
        pipe.hgetall(keys.traits)
        pipe.hgetall(keys.id_origin)
        pipe.smembers(keys.ids)
        pipe.lrange(keys.merges, 0, -1)
        meta, traits, origins, ids, merges = await pipe.execute()
    if not meta or b"created_at" not in meta:
        return None
    meta = {_text(k): _text(v) for k, v in meta.items()}
    origins = {_text(k): orjson.loads(v) for k, v in origins.items()}
    return {
        "id": profile_id,
        "identifiers": sorted(_text(i) for i in ids),
        "traits": {_text(k): orjson.loads(v) for k, v in sorted(traits.items())},
        "createdAt": _iso(meta.get("created_at")),
        "updatedAt": _iso(meta.get("updated_at")),
        "firstSeen": _iso(meta.get("first_seen")),
        "lastSeen": _iso(meta.get("last_seen")),
        "eventCount": _int(meta.get("event_count")) or 0,
        "identifierOrigins": {
            i: {"messageId": o.get("messageId"), "channel": o.get("channel"), "at": _iso(o.get("at"))}
            for i, o in sorted(origins.items())
        },
        "merges": [orjson.loads(m) for m in merges],
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _int(value: str | None) -> int | None:
    return int(value) if value is not None else None


def _iso(ms: str | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC with milliseconds."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")



async def lookup_profile(redis, id_or_identifier: str, *, hash_key: str, default_region: str) -> dict | None:
    """A profile by its id (``p_...``) or by an identifier (``email:ann@example.com``).

    Raises InvalidIdentifier for text that is neither."""
    text = id_or_identifier.strip()
    if text.startswith("p_") and ":" not in text:
        return await read_profile(redis, text)
    profile_id = await find_profile_id(redis, parse_identifier(text, default_region), hash_key)
    return None if profile_id is None else await read_profile(redis, profile_id)
