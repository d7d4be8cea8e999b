"""Fuzzy-matching state in Redis: each profile's match records and the blocks.

Two kinds of keys, every command on one key (so Redis Cluster is fine):

| key | type | what |
|---|---|---|
| ``cdp:p:{<profile>}:match`` | SET | the profile's match records (``MatchRecord.to_json``) |
| ``cdp:blk:{<digest>}`` | SET | the profiles filed under one blocking key |

The match set carries the profile's hash tag, like every key of the profile, so a
merge folds it into the survivor with the rest of the profile's state. A block key
is named by a keyed BLAKE2b digest of the blocking key (key: ``CDP_ID_HASH_KEY``):
blocking keys contain names, dates of birth and phone numbers, and key names must
not.

Both sets are bounded: a block takes no new profile once it holds ``max_block``
(a *hot* block: a very common name with a common birth year, a call centre's phone
number written into many records, ...). Those profiles stay findable through their
other keys; a hot block only stops growing. A profile keeps at most
``max_records`` distinct match records (its first ones).

Profile ids in blocks are those the records were filed under; a profile merged
since is still listed under its old id. ``candidates`` returns ids as stored, and
the caller resolves them to their roots (``records_of`` reads the match records of
the roots in one round trip).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from hashlib import blake2b

from agents.identity.fuzzy import MatchRecord, blocking_keys
from streams.texts import text

log = logging.getLogger(__name__)

# Per profile: SET of MatchRecord JSON. The profile id is the hash tag, so it moves
# with the profile's state in a merge.
MATCH_SET_KEY = "cdp:p:{%s}:match"
# Per blocking key: SET of profile ids. %s: keyed digest of the blocking key, so no
# personal data appears in key names.
BLOCK_KEY = "cdp:blk:{%s}"

DEFAULT_MAX_CANDIDATES = 50
DEFAULT_MAX_BLOCK = 500
DEFAULT_MAX_RECORDS = 32

# SADD unless the set already holds ARGV[2] members: a bounded set, one key.
BOUNDED_SADD = """
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  return redis.call('SADD', KEYS[1], ARGV[1])
end
return -1
"""


def block_key(blocking_key: str, hash_key: str) -> str:
    """The Redis key of one block: a keyed digest, never the blocking key itself.

    >>> block_key("ph:+14155550100", "secret")[:8]
    'cdp:blk:'
    """
    digest = blake2b(b"block\x00" + blocking_key.encode(), digest_size=16, key=hash_key.encode()[:64])
    return BLOCK_KEY % digest.hexdigest()


def rank_candidates(members: Sequence[Sequence[bytes | str]], limit: int) -> list[str]:
    """Profile ids from a record's blocks, most shared keys first, then by id; at most ``limit``.

    >>> rank_candidates([[b"p2", b"p1"], [b"p2"], [b"p3"]], 2)
    ['p2', 'p1']
    """
    shared: Counter = Counter()
    for block in members:
        shared.update({text(m) for m in block})
    ranked = sorted(shared.items(), key=lambda item: (-item[1], item[0]))
    return [profile_id for profile_id, _ in ranked[:limit]]


class LocalBlocks:
    """The same blocks, bounds and ranking as :class:`MatchStore`, in memory (pure).

    For records not in Redis yet (the earlier events of a batch: compare a record
    only with those sharing a blocking key, not with the whole batch) and for the
    offline evaluation in ``bench/identity_accuracy.py``.

    >>> from agents.identity.fuzzy import MatchRecord
    >>> local = LocalBlocks()
    >>> local.remember("p_1", MatchRecord(given_name="ann", surname="lee", dob="1984-03-07"))
    >>> [p for p, _ in local.candidates(MatchRecord(given_name="anne", surname="lee", dob="1984-03-07"))]
    ['p_1']
    """

    def __init__(
        self,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        *,
        max_block: int = DEFAULT_MAX_BLOCK,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self.blocks: dict[str, set[str]] = {}
        self.records: dict[str, list[MatchRecord]] = {}
        self.max_candidates = max_candidates
        self.max_block = max_block
        self.max_records = max_records

    def candidates(self, record: MatchRecord) -> list[tuple[str, list[MatchRecord]]]:
        """Profiles sharing a blocking key with ``record``, ranked as MatchStore ranks them."""
        ranked = rank_candidates([self.blocks.get(k, ()) for k in blocking_keys(record)], self.max_candidates)
        return [(p, sorted(self.records.get(p, []), key=MatchRecord.to_json)) for p in ranked]

    def remember(self, profile_id: str, record: MatchRecord) -> None:
        records = self.records.setdefault(profile_id, [])
        if record not in records and len(records) < self.max_records:
            records.append(record)
        for key in blocking_keys(record):
            block = self.blocks.setdefault(key, set())
            if len(block) < self.max_block:
                block.add(profile_id)


class MatchStore:
    """Blocks and match records over an asyncio Redis client (bytes or str replies)."""

    def __init__(
        self,
        redis,
        hash_key: str,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        *,
        max_block: int = DEFAULT_MAX_BLOCK,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        if max_candidates < 1 or max_block < 1 or max_records < 1:
            raise ValueError("max_candidates, max_block and max_records must be >= 1")
        self.redis = redis
        self.hash_key = hash_key
        self.max_candidates = max_candidates
        self.max_block = max_block
        self.max_records = max_records

    def block_keys(self, record: MatchRecord) -> list[str]:
        """The Redis keys of the record's blocks."""
        return [block_key(k, self.hash_key) for k in blocking_keys(record)]

    async def candidates(self, records: Sequence[MatchRecord]) -> list[list[tuple[str, list[MatchRecord]]]]:
        """Per record, the profiles sharing one of its blocking keys (at most
        ``max_candidates``, most shared keys first), each with its match records.

        Two round trips for the whole list: ``SMEMBERS`` of every block, then
        ``SMEMBERS`` of every candidate's match set. A candidate merged into another
        profile since has an empty list here: resolve it to its root and read the
        root's records with :meth:`records_of`."""
        if not records:
            return []
        keys_of = [self.block_keys(r) for r in records]
        distinct = list(dict.fromkeys(k for keys in keys_of for k in keys))
        if not distinct:
            return [[] for _ in records]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in distinct:
                pipe.smembers(key)
            replies = await pipe.execute()
        members = dict(zip(distinct, replies))
        chosen = [rank_candidates([members[k] for k in keys], self.max_candidates) for keys in keys_of]
        found = await self.records_of(list(dict.fromkeys(p for ids in chosen for p in ids)))
        return [[(p, found[p]) for p in ids] for ids in chosen]

    async def records_of(self, profile_ids: Sequence[str]) -> dict[str, list[MatchRecord]]:
        """The match records of each profile, in one round trip (sorted by JSON, so
        the order is stable)."""
        if not profile_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile_id in profile_ids:
                pipe.smembers(MATCH_SET_KEY % profile_id)
            replies = await pipe.execute()
        found: dict[str, list[MatchRecord]] = {}
        for profile_id, raw in zip(profile_ids, replies):
            parsed = []
            for item in sorted(raw):
                try:
                    parsed.append(MatchRecord.from_json(item))
                except ValueError as exc:
                    # Only this module writes these sets; a bad member is a bug or a
                    # hand edit: it is left out of matching and reported.
                    log.error("unreadable match record in %s (%s): %r", MATCH_SET_KEY % profile_id, exc, item[:200])
            found[profile_id] = parsed
        return found

    def remember(self, pipe, profile_id: str, record: MatchRecord) -> None:
        """Queue on a redis-py pipeline: add ``record`` to the profile's match set and
        file the profile under each of the record's blocks, both bounded (see the
        module doc). Idempotent; one key per command."""
        pipe.eval(BOUNDED_SADD, 1, MATCH_SET_KEY % profile_id, record.to_json(), self.max_records)
        for key in self.block_keys(record):
            pipe.eval(BOUNDED_SADD, 1, key, profile_id, self.max_block)
