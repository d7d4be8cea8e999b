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
# Profile keys; ``%s`` is the profile id, the hash tag of all of them.
# meta: id, created_at, updated_at, first/last seen, event_count; after a merge
# merged_into (write-once parent pointer), merged_at, merge_identifier, merge_event,
# and fold_pending until the profile's state has been folded into the survivor.
PROFILE_META_KEY = PREFIX + ":p:{%s}:meta"
PROFILE_TRAITS_KEY = PREFIX + ":p:{%s}:traits"  # trait name → JSON value
PROFILE_TRAITS_TS_KEY = PREFIX + ":p:{%s}:traits_ts"  # trait name → event time (ms) of that value
PROFILE_IDS_KEY = PREFIX + ":p:{%s}:ids"  # set of "type:value"
PROFILE_ID_ORIGIN_KEY = PREFIX + ":p:{%s}:id_origin"  # "type:value" → JSON {messageId, channel, at}
# Applied messageIds → "topic/partition/offset|received ms", and the same ids by
# time for expiry (CDP_DEDUPE_TTL). On the profile's slot, so the de-duplication
# record and the update are one atomic step; hashes rather than a key per message so
# a merge can carry them over to the surviving profile.
PROFILE_SEEN_KEY = PREFIX + ":p:{%s}:seen"
PROFILE_SEEN_BY_TIME_KEY = PREFIX + ":p:{%s}:seen_at"
PROFILE_FOLDED_KEY = PREFIX + ":p:{%s}:folded"  # ids of profiles already folded into this one
PROFILE_MERGES_KEY = PREFIX + ":p:{%s}:merges"  # audit: JSON merge records, newest first
# Fuzzy matching: the profile's normalised match records (name, dob, address, phone)
# as JSON, compared with records that carry no known identifier.
PROFILE_MATCH_KEY = PREFIX + ":p:{%s}:match"

_MAX_MESSAGE_ID_IN_KEY = 128


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
    traits_ts = property(lambda self: self._key(PROFILE_TRAITS_TS_KEY))
    ids = property(lambda self: self._key(PROFILE_IDS_KEY))
    id_origin = property(lambda self: self._key(PROFILE_ID_ORIGIN_KEY))
    seen = property(lambda self: self._key(PROFILE_SEEN_KEY))
    seen_at = property(lambda self: self._key(PROFILE_SEEN_BY_TIME_KEY))
    folded = property(lambda self: self._key(PROFILE_FOLDED_KEY))
    merges = property(lambda self: self._key(PROFILE_MERGES_KEY))
    match = property(lambda self: self._key(PROFILE_MATCH_KEY))

    def state(self) -> list[str]:
        """Every key holding the profile's state (not its meta): what a merge moves."""
        return [self.traits, self.traits_ts, self.ids, self.id_origin, self.seen, self.seen_at, self.folded, self.merges, self.match]


def message_field(message_id: str) -> str:
    """A messageId as a hash field, bounded in length."""
    if len(message_id) > _MAX_MESSAGE_ID_IN_KEY:
        return "h:" + blake2b(message_id.encode(), digest_size=16).hexdigest()
    return message_id
