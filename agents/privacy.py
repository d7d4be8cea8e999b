"""Privacy requests: access and delete, by identifier (issue 6, part).

* ``access``: everything held about the person as one JSON document (the profile:
  identifiers with their origins, traits, computed traits, consent, recent events,
  memberships, merge history).
* ``delete``: every key of the person's profile and of the profiles merged into it,
  their identifier index keys and fuzzy-matching block entries, and their expiry
  schedule entries are removed; the profile keeps only a tombstone ``meta`` hash
  (``deleted``, ``deleted_at``: no personal data), so that a worker still holding the
  profile id in its caches is told (``APPLY_EVENT`` answers DELETED) and resolves the
  event again, as a new person. Memberships exit (``cdp.segment-changes``, cause
  ``deleted``) and a ``cdp.profile.deleted`` message goes to ``cdp.privacy.events``
  so that downstream systems can delete too.

Every request is idempotent and ends with a result record (``status`` ``completed``
or ``not_found``), published on ``cdp.privacy.events`` and returned to the caller.
The audit log line names the request, its kind, the identifier's type and keyed
hash, and the outcome: never the identifier in clear text.
"""

from __future__ import annotations

import logging
import time
from hashlib import blake2b

import orjson

from agents.identity.fuzzy import MatchRecord
from agents.identity.matching import MatchStore
from agents.profiles.model import ProfileModel
from agents.profiles.store import find_profile_id, read_profile, root_of
from agents.segments.engine import membership_exits
from agents.segments.store import due_key
from schemas.events import Identifier
from schemas.identifiers import parse_identifier
from streams.keys import ProfileKeys, identifier_digest, identifier_key
from streams.output import deliver
from streams.records import OutboundMessage
from streams.topics import PRIVACY_EVENTS
from streams.texts import iso_ms, text

audit = logging.getLogger("streamcdp.audit")

KINDS = ("access", "delete")


class PrivacyService:
    def __init__(self, redis, producer, metrics, model: ProfileModel, *, hash_key: str, default_region: str) -> None:
        self.redis = redis
        self.producer = producer
        self.metrics = metrics
        self.model = model
        self.hash_key = hash_key
        self.default_region = default_region

    async def handle(self, kind: str, identifier_text: str) -> dict:
        """Run one request; returns its result record (with the document for access)."""
        if kind not in KINDS:
            raise ValueError(f"unknown request type {kind!r}; expected one of {', '.join(KINDS)}")
        identifier = self.model.sensitive.protect_identifier(parse_identifier(identifier_text, self.default_region))
        now_ms = int(time.time() * 1000)
        digest = identifier_digest(identifier, self.hash_key)
        request_id = "privacy-" + blake2b(f"{kind}|{digest}|{now_ms}".encode(), digest_size=12).hexdigest()
        owner = await find_profile_id(self.redis, identifier, self.hash_key)
        profile_id = await root_of(self.redis, owner) if owner else None
        result = {
            "type": "cdp.privacy.request.completed", "id": request_id, "request": kind,
            "identifierType": identifier.type, "identifierHash": digest, "time": iso_ms(now_ms),
            "status": "not_found", "profileId": profile_id,
        }
        document = None
        if profile_id is not None:
            if kind == "access":
                document = await read_profile(self.redis, profile_id, self.model, now_ms=now_ms)
                result["status"] = "completed" if document else "not_found"
            else:
                deleted = await self._delete(profile_id, now_ms)
                result["status"] = "completed" if deleted else "not_found"
                if deleted:
                    result["absorbedIds"] = deleted["absorbedIds"]
        await deliver(self.producer, [OutboundMessage(PRIVACY_EVENTS, request_id.encode(), orjson.dumps(result))], self.metrics)
        audit.info(
            "privacy request %s: %s of %s:%s… -> %s (profile %s)",
            request_id, kind, identifier.type, digest[:12], result["status"], profile_id or "-",
        )
        if document is not None:
            result["profile"] = document
        return result

    async def _delete(self, profile_id: str, now_ms: int) -> dict | None:
        keys = ProfileKeys(profile_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.meta)
            pipe.hkeys(keys.ids)
            pipe.smembers(keys.folded)
            pipe.smembers(keys.match)
            pipe.hgetall(keys.segments)
            meta, ids, folded, match, segments = await pipe.execute()
        if not meta or b"created_at" not in meta:
            return None
        identifiers = sorted(text(i) for i in ids)
        absorbed = sorted(text(p) for p in folded)
        matching = MatchStore(self.redis, self.hash_key)
        block_keys: set[str] = set()
        for raw in match:
            try:
                block_keys.update(matching.block_keys(MatchRecord.from_json(raw)))
            except ValueError:
                continue
        # Exits for the memberships, before the keys go (same ids on a retry).
        exits = membership_exits(
            profile_id, {text(k): text(v) for k, v in segments.items()}, [], f"deleted:{profile_id}", now_ms, self.metrics
        )
        notice = {
            "type": "cdp.profile.deleted",
            "id": "deleted-" + blake2b(profile_id.encode(), digest_size=12).hexdigest(),
            "time": iso_ms(now_ms),
            "profileId": profile_id,
            "absorbedIds": absorbed,
            # Downstream systems find the person by these; the topic needs the ACLs
            # of personal data (docs/privacy.md).
            "identifiers": identifiers,
        }
        await deliver(self.producer, exits + [OutboundMessage(PRIVACY_EVENTS, profile_id.encode(), orjson.dumps(notice))], self.metrics)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stored in identifiers:
                kind, _, value = stored.partition(":")
                pipe.delete(identifier_key(Identifier(kind, value), self.hash_key))
            for key in block_keys:
                pipe.srem(key, profile_id, *absorbed)
            for gone in (profile_id, *absorbed):
                gone_keys = ProfileKeys(gone)
                pipe.delete(gone_keys.meta, *gone_keys.state())
                pipe.hset(gone_keys.meta, mapping={"deleted": "1", "deleted_at": now_ms})
                pipe.zrem(due_key(gone), gone)
            await pipe.execute()
        self.metrics.profiles_deleted.inc()
        return {"absorbedIds": absorbed}
