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
# Profile hashes; ``%s`` is the profile id, the hash tag of all of them.
PROFILE_META_KEY = PREFIX + ":p:{%s}:meta"  # id, created_at, updated_at, first/last seen, counters
PROFILE_TRAITS_KEY = PREFIX + ":p:{%s}:traits"  # trait name → JSON value
PROFILE_TRAITS_TS_KEY = PREFIX + ":p:{%s}:traits_ts"  # trait name → event time (ms) of that value
PROFILE_IDS_KEY = PREFIX + ":p:{%s}:ids"  # set of "type:value"
# One key per applied messageId, with a TTL (CDP_DEDUPE_TTL): on the profile's slot
# so that the de-duplication record and the update are one atomic step.
PROFILE_SEEN_KEY = PREFIX + ":p:{%s}:seen:%s"

_MAX_MESSAGE_ID_IN_KEY = 128


def identifier_digest(identifier: Identifier, hash_key: str) -> str:
    digest = blake2b(str(identifier).encode(), digest_size=16, key=hash_key.encode()[:64])
    return digest.hexdigest()


def identifier_key(identifier: Identifier, hash_key: str) -> str:
    return IDENTIFIER_KEY % identifier_digest(identifier, hash_key)


def new_profile_id(identifier: Identifier, hash_key: str) -> str:
    """The id a profile first seen with ``identifier`` gets: deterministic, so a
    replayed batch creates the same profile, and opaque (no personal data)."""
    digest = blake2b(b"profile\x00" + str(identifier).encode(), digest_size=10, key=hash_key.encode()[:64])
    return "p_" + digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ProfileKeys:
    """The keys of one profile, all on the profile id's hash slot."""

    profile_id: str

    @property
    def meta(self) -> str:
        return PROFILE_META_KEY % self.profile_id

    @property
    def traits(self) -> str:
        return PROFILE_TRAITS_KEY % self.profile_id

    @property
    def traits_ts(self) -> str:
        return PROFILE_TRAITS_TS_KEY % self.profile_id

    @property
    def ids(self) -> str:
        return PROFILE_IDS_KEY % self.profile_id

    def seen(self, message_id: str) -> str:
        if len(message_id) > _MAX_MESSAGE_ID_IN_KEY:
            message_id = "h:" + blake2b(message_id.encode(), digest_size=16).hexdigest()
        return PROFILE_SEEN_KEY % (self.profile_id, message_id)
