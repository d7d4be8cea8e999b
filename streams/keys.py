"""The Redis key layout: every key streamcdp writes is built here.

Hash tags (the part in braces) decide the Redis Cluster slot. Every key of one
profile carries ``{p_...}``, the profile id, so one Lua script may update a
profile's hashes and its de-duplication record atomically on one slot. Each
identifier's index key is tagged by its own digest: it lives on its own slot and is
claimed with a single-key ``SET NX``.

Identifier values (emails, phone numbers) never appear in key names: index keys are
named by a keyed BLAKE2b digest of ``type:value`` (key: ``CDP_ID_HASH_KEY``), so a
key listing or a ``MONITOR`` trace does not expose personal data. Changing that key
orphans the existing index: set it once per deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b

from schemas.events import Identifier

PREFIX = "cdp"
# Identifier → profile id. Written once (SET NX), so it can be cached.
IDENTIFIER_KEY = PREFIX + ":id:{%s}"
# Profile keys; ``%s`` is the profile id, the hash tag of all of them. Hashes and
# lists rather than a key per item: small ones are stored compactly (listpack), and
# one profile's state is a handful of keys a merge can move and a deletion can drop.
#
# meta: id, created_at, updated_at, first/last seen, event_count, seen_sweep (when
# old de-duplication records are dropped next); after a merge merged_into
# (write-once parent pointer), merged_at, merge_identifier, merge_event, and
# fold_pending until the profile's state has been folded into the survivor.
PROFILE_META_KEY = PREFIX + ":p:{%s}:meta"
# Trait path (``address.city``) → "<event ms>|<JSON value>"; consent choices as
# ``$consent.<purpose>`` → "<event ms>|[granted, messageId, channel]".
PROFILE_TRAITS_KEY = PREFIX + ":p:{%s}:traits"
# Identifier "type:value" → where the profile got it: "<event ms>|<channel>|<messageId>".
PROFILE_IDS_KEY = PREFIX + ":p:{%s}:ids"
# Applied messages: digest of the messageId → "<digest of topic/partition/offset>|<received ms>",
# then "|e<transitions>" once the segment stage has committed what the event changed
# (so a redelivery re-publishes exactly those changes).
# On the profile's slot, so the de-duplication record and the update are one atomic
# step; records older than CDP_DEDUPE_TTL are swept out now and then.
PROFILE_SEEN_KEY = PREFIX + ":p:{%s}:seen"
# Computed traits: fields named "<merge rule>:<name>[.<part>][|<group>]"
# (agents/profiles/computed.py, agents/profiles/lua.py).
PROFILE_COMPUTED_KEY = PREFIX + ":p:{%s}:computed"
# Recent events, newest event time first, bounded: "<event ms>|<JSON summary>".
PROFILE_HISTORY_KEY = PREFIX + ":p:{%s}:history"
# Segments the profile is a member of: segment id → membership details (written by
# the segment stage; dropped with the profile, never folded: membership is re-evaluated).
PROFILE_SEGMENTS_KEY = PREFIX + ":p:{%s}:segments"
PROFILE_FOLDED_KEY = PREFIX + ":p:{%s}:folded"  # ids of profiles already folded into this one
PROFILE_MERGES_KEY = PREFIX + ":p:{%s}:merges"  # audit: JSON merge records, newest first
# Fuzzy matching: the profile's normalised match records (name, dob, address, phone)
# as JSON, compared with records that carry no known identifier.
PROFILE_MATCH_KEY = PREFIX + ":p:{%s}:match"



def identifier_digest(identifier: Identifier, hash_key: str) -> str:
    digest = blake2b(str(identifier).encode(), digest_size=16, key=hash_key.encode()[:64])
    return digest.hexdigest()


def identifier_key(identifier: Identifier, hash_key: str) -> str:
    return IDENTIFIER_KEY % identifier_digest(identifier, hash_key)


def new_profile_id(identifier: Identifier, hash_key: str, now_ms: int) -> str:
    """The id of a profile created now for ``identifier``: ``p_`` + creation time
    (ms, 9 base-36 digits) + a keyed digest of the identifier.

    Ids sort by creation time, so "the older profile survives a merge" is a plain
    comparison of ids, and the ids reveal no personal data. A replayed batch finds
    the profile through its claimed identifiers, so the id need not repeat."""
    digest = blake2b(b"profile\x00" + str(identifier).encode(), digest_size=6, key=hash_key.encode()[:64])
    return "p_" + _base36(now_ms).rjust(9, "0") + digest.hexdigest()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if number == 0:
            return text


@dataclass(frozen=True, slots=True)
class ProfileKeys:
    """The keys of one profile, all on the profile id's hash slot."""

    profile_id: str

    def _key(self, template: str) -> str:
        return template % self.profile_id

    meta = property(lambda self: self._key(PROFILE_META_KEY))
    traits = property(lambda self: self._key(PROFILE_TRAITS_KEY))
    ids = property(lambda self: self._key(PROFILE_IDS_KEY))
    seen = property(lambda self: self._key(PROFILE_SEEN_KEY))
    computed = property(lambda self: self._key(PROFILE_COMPUTED_KEY))
    history = property(lambda self: self._key(PROFILE_HISTORY_KEY))
    segments = property(lambda self: self._key(PROFILE_SEGMENTS_KEY))
    folded = property(lambda self: self._key(PROFILE_FOLDED_KEY))
    merges = property(lambda self: self._key(PROFILE_MERGES_KEY))
    match = property(lambda self: self._key(PROFILE_MATCH_KEY))

    def state(self) -> list[str]:
        """Every key holding the profile's state (not its meta): what a merge moves."""
        return [
            self.traits, self.ids, self.seen, self.computed, self.history, self.segments,
            self.folded, self.merges, self.match,
        ]


def message_field(message_id: str) -> str:
    """A messageId as a de-duplication field: a 64-bit digest (16 hex digits).
    Records are per profile, so a collision would need two of one person's events
    in the same week to share 64 bits by chance."""
    return blake2b(message_id.encode(), digest_size=8).hexdigest()


def origin_digest(origin: str) -> str:
    """A record's ``topic/partition/offset`` as 8 hex digits: enough to tell a
    redelivery of the same record from a resend in another one."""
    return blake2b(origin.encode(), digest_size=4).hexdigest()
