"""Segment membership in Redis: the commit step, state reads, and the expiry schedule.

Every step touches one hash slot:

| step | slot | what |
|---|---|---|
| ``APPLY_EVENT`` (profiles) | profile | updates the event conditions' counters with the event, answers the state |
| ``READ_STATE`` | profile | rev, traits, computed fields, memberships, in one atomic read |
| ``COMMIT`` | profile | applies membership changes if the profile's ``rev`` is still the one evaluated; marks the events' de-duplication records with the transitions they caused |
| ``CLAIM_DUE`` / ``FINISH_DUE`` | schedule shard | leases profiles whose windowed counters change now, then re-schedules or drops them |

Optimistic concurrency: an evaluation carries the revision of the state it read;
``COMMIT`` refuses it when another step changed the profile since (the evaluation is
done again on a fresh read), so two workers never publish contradicting transitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b

from streams.keys import PREFIX, ProfileKeys

DUE_SHARDS = 16
DUE_KEY = PREFIX + ":seg:due:{%d}"
# How long a claimed schedule entry is leased to the worker that claimed it.
LEASE_MS = 30_000

READ_STATE = """
-- KEYS: meta, traits, computed, segments, ids
return {redis.call('HGET', KEYS[1], 'rev') or '0', redis.call('HGET', KEYS[1], 'merged_into') or '',
        redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4]),
        redis.call('HKEYS', KEYS[5]), redis.call('HGET', KEYS[1], 'created_at') or ''}
"""

COMMIT = """
-- KEYS: meta, segments, seen
-- Counts the rev up, so a second evaluation of the same state cannot commit too.
-- ARGV: expected rev, n_changes, (segment id, '1' member | '0' not, value) * n,
--       n_marks, (message field, transitions text) * n_marks
if redis.call('HGET', KEYS[1], 'merged_into') then return {5} end
if (redis.call('HGET', KEYS[1], 'rev') or '0') ~= ARGV[1] then return {0} end
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  if ARGV[i + 1] == '1' then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  else
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
  i = i + 3
end
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local held = redis.call('HGET', KEYS[3], ARGV[i])
  if held and not string.find(held, '|e', 1, true) then
    redis.call('HSET', KEYS[3], ARGV[i], held .. '|e' .. ARGV[i + 1])
  end
  i = i + 2
end
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return {1}
"""

CLAIM_DUE = """
-- KEYS: a schedule shard. ARGV: now_ms, lease_until_ms, limit
-- Answers {claimed members, due entries left unclaimed, due time of the oldest ('' = none due)}.
local oldest = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, 1)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return {due, redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1]), oldest[2] or ''}
"""

FINISH_DUE = """
-- KEYS: a schedule shard. ARGV: member, lease_until_ms, next due ms ('' = none)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
elseif ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[1], 'LT', ARGV[3], ARGV[1])
end
return 1
"""


def due_key(profile_id: str) -> str:
    """The schedule shard of a profile (its own slot, not the profile's)."""
    shard = blake2b(profile_id.encode(), digest_size=2).digest()[0] % DUE_SHARDS
    return DUE_KEY % shard


def state_keys(profile_id: str) -> list[str]:
    keys = ProfileKeys(profile_id)
    return [keys.meta, keys.traits, keys.computed, keys.segments, keys.ids]


def commit_call(profile_id: str, rev: str, changes: Sequence[tuple[str, bool, str]], marks: Sequence[tuple[str, str]]):
    keys = ProfileKeys(profile_id)
    args: list[object] = [rev, len(changes)]
    for segment_id, member, value in changes:
        args.extend((segment_id, "1" if member else "0", value))
    args.append(len(marks))
    for field, text in marks:
        args.extend((field, text))
    return [keys.meta, keys.segments, keys.seen], args
