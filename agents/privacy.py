"""Privacy requests by identifier: access, delete, suppress and unsuppress (issue 6).

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
* ``suppress``: delete, and every identifier of the person (and the requested one,
  even when nobody has it) goes on the suppression list: its index key holds the
  marker ``SUPPRESSED`` instead of a profile id, so the hot path drops later events
  carrying it before anything is stored (``cdp_events_suppressed_total``). The list
  ``cdp:privacy:suppressed`` records each by its keyed hash only.
* ``unsuppress``: lifts the suppression that put the identifier on the list, for
  every identifier that same suppression listed.

Every request is idempotent and ends with a result record (``status`` ``completed``
or ``not_found``), published on ``cdp.privacy.events``, counted in
``cdp_privacy_requests_total`` and returned to the caller. The audit log line names
the request, its kind, the identifier's type and keyed hash, and the outcome: never
the identifier in clear text.

Order of a suppression, so that no event of the person is left stored: the markers
are set first, then the profile is wiped in one atomic step per profile (which
answers the identifiers it held at that moment: any it gained since the first read
are marked too). A profile step for the person either ran before the wipe (and is
wiped with the rest) or runs after it (DELETED: the worker reads the identifiers
again and finds the marker). If a suppression stops midway (Redis or Kafka failed),
its profile id is in the list entry, and running it again finishes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from hashlib import blake2b

import orjson

from agents.identity.fuzzy import MatchRecord
from agents.identity.matching import MatchStore
from agents.identity.store import RELEASE_CLAIM, SUPPRESSED, WIPE_PROFILE, is_suppressed, wipe_keys
from agents.profiles.model import ProfileModel
from agents.profiles.store import find_profile_id, read_profile, root_of
from agents.activation.destinations import Destinations
from agents.segments.engine import membership_exits
from agents.segments.store import due_key
from schemas.events import Identifier
from schemas.identifiers import parse_identifier
from streams.keys import IDENTIFIER_KEY, ProfileKeys, identifier_digest, identifier_key
from streams.output import deliver
from streams.records import OutboundMessage
from streams.topics import PRIVACY_EVENTS
from streams.texts import iso_ms, text

audit = logging.getLogger("streamcdp.audit")

KINDS = ("access", "delete", "suppress", "unsuppress")

# The suppression list: keyed hash of each suppressed identifier (``identifier_digest``)
# → ``SuppressionEntry.encode()``. No identifier in clear text.
SUPPRESSION_LIST_KEY = "cdp:privacy:suppressed"


@dataclass(frozen=True, slots=True)
class SuppressionEntry:
    """One identifier on the suppression list: its type, when and by which request
    it was listed, and the profile deleted by that request (None for a person
    nobody had a profile for). Encoded ``<type>|<ms>|<request id>|<profile id>``."""

    identifier_type: str
    at_ms: int
    request_id: str
    profile_id: str | None

    def encode(self) -> str:
        return f"{self.identifier_type}|{self.at_ms}|{self.request_id}|{self.profile_id or ''}"

    @classmethod
    def decode(cls, raw: bytes | str | None) -> SuppressionEntry | None:
        """The entry, or None for a missing or unreadable value.

        >>> SuppressionEntry.decode(b"email|1700000000000|privacy-ab|p_1")
        SuppressionEntry(identifier_type='email', at_ms=1700000000000, request_id='privacy-ab', profile_id='p_1')
        >>> SuppressionEntry.decode("phone|5|privacy-cd|").profile_id is None
        True
        """
        if raw is None:
            return None
        parts = text(raw).rsplit("|", 3)  # the type comes first and is the only free text
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        kind, at, request_id, profile_id = parts
        return cls(kind, int(at), request_id, profile_id or None)

    def same_suppression(self, other: SuppressionEntry) -> bool:
        """Listed by the same request, or for the same deleted profile (a request run
        again after it stopped midway lists the rest under a new request id)."""
        return self.request_id == other.request_id or (self.profile_id is not None and self.profile_id == other.profile_id)


class PrivacyService:
    def __init__(self, redis, producer, metrics, model: ProfileModel, *, hash_key: str, default_region: str,
                 destinations: Destinations | None = None) -> None:
        self.redis = redis
        # Where activation exits go, shaped as each destination may receive them.
        self.destinations = destinations if destinations is not None else Destinations.load()
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
        suppressed = is_suppressed(owner)
        if suppressed:
            owner = await self._left_behind(digest)
        profile_id = await root_of(self.redis, owner) if owner else None
        result = {
            "type": "cdp.privacy.request.completed", "id": request_id, "request": kind,
            "identifierType": identifier.type, "identifierHash": digest, "time": iso_ms(now_ms),
            "status": "not_found", "profileId": profile_id, "suppressed": suppressed,
        }
        document = None
        detail = ""
        if kind == "access":
            if profile_id is not None:
                document = await read_profile(self.redis, profile_id, self.model, now_ms=now_ms)
                result["status"] = "completed" if document else "not_found"
        elif kind == "delete":
            deleted = await self._delete(profile_id, now_ms) if profile_id is not None else None
            if deleted:
                result["status"] = "completed"
                result["absorbedIds"] = deleted["absorbedIds"]
        elif kind == "suppress":
            entry = SuppressionEntry(identifier.type, now_ms, request_id, None)
            deleted = await self._delete(profile_id, now_ms, suppress=(identifier, entry)) if profile_id is not None else None
            if deleted:
                result["absorbedIds"] = deleted["absorbedIds"]
                listed = deleted["listed"]
            else:
                # Nobody has a profile for it (or it was deleted already): the
                # identifier alone goes on the list, so the person stays blocked.
                result["profileId"] = None
                listed = await self._mark([identifier], entry)
            result.update(status="completed", suppressed=True, alreadySuppressed=suppressed, suppressedIdentifiers=listed)
            detail = f", {listed} identifier(s) listed"
        else:
            if suppressed and profile_id is not None:
                # A suppression that stopped midway left the profile: finish deleting it.
                await self._delete(profile_id, now_ms)
            listed = suppressed or await self.redis.hexists(SUPPRESSION_LIST_KEY, digest)
            lifted = await self._unsuppress(digest) if listed else 0
            if lifted:
                result.update(status="completed", suppressed=False, liftedIdentifiers=lifted)
                detail = f", {lifted} identifier(s) lifted"
        await deliver(self.producer, [OutboundMessage(PRIVACY_EVENTS, request_id.encode(), orjson.dumps(result))], self.metrics)
        self.metrics.privacy_requests.labels(kind, result["status"]).inc()
        audit.info(
            "privacy request %s: %s of %s:%s… -> %s (profile %s%s)",
            request_id, kind, identifier.type, digest[:12], result["status"], result["profileId"] or "-", detail,
        )
        if document is not None:
            result["profile"] = document
        return result

    async def _left_behind(self, digest: str) -> str | None:
        """For an identifier on the list: the profile its suppression was deleting,
        if that one still holds data (the request stopped midway); else None."""
        entry = SuppressionEntry.decode(await self.redis.hget(SUPPRESSION_LIST_KEY, digest))
        if entry is None or entry.profile_id is None:
            return None
        created, deleted = await self.redis.hmget(ProfileKeys(entry.profile_id).meta, "created_at", "deleted")
        return entry.profile_id if created is not None and deleted is None else None

    async def _mark(self, identifiers: list[Identifier], entry: SuppressionEntry) -> int:
        """Put identifiers on the suppression list: the list entry (kept if there is
        one: idempotent), then the marker in the index key, replacing any claim."""
        distinct = list(dict.fromkeys(identifiers))
        async with self.redis.pipeline(transaction=False) as pipe:
            for identifier in distinct:
                listed = SuppressionEntry(identifier.type, entry.at_ms, entry.request_id, entry.profile_id)
                pipe.hsetnx(SUPPRESSION_LIST_KEY, identifier_digest(identifier, self.hash_key), listed.encode())
                pipe.set(identifier_key(identifier, self.hash_key), SUPPRESSED)
            await pipe.execute()
        return len(distinct)

    async def _delete(
        self, profile_id: str, now_ms: int, *, suppress: tuple[Identifier, SuppressionEntry] | None = None
    ) -> dict | None:
        """Delete the profile and those merged into it; with ``suppress`` (the
        requested identifier and its list entry) their identifiers are listed first.
        None when the profile holds no data."""
        keys = ProfileKeys(profile_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.meta)
            pipe.hkeys(keys.ids)
            pipe.smembers(keys.folded)
            pipe.smembers(keys.match)
            pipe.hgetall(keys.segments)
            meta, ids, folded, match, segments = await pipe.execute()
        if not meta or b"created_at" not in meta or b"deleted" in meta:
            return None
        identifiers = sorted(text(i) for i in ids)
        absorbed = sorted(text(p) for p in folded)
        listed: set[Identifier] = set()
        entry = None
        if suppress is not None:
            requested, request_entry = suppress
            entry = SuppressionEntry(request_entry.identifier_type, now_ms, request_entry.request_id, profile_id)
            listed = {requested, *(_stored(i) for i in identifiers)}
            await self._mark(sorted(listed, key=str), entry)
        matching = MatchStore(self.redis, self.hash_key)
        block_keys: set[str] = set()
        for raw in match:
            try:
                block_keys.update(matching.block_keys(MatchRecord.from_json(raw)))
            except ValueError:
                continue
        # Exits for the memberships and activations, before the keys go (same ids on
        # a retry); each destination gets the identifiers it may receive, so that it
        # can remove the person.
        exits = membership_exits(
            profile_id, {text(k): text(v) for k, v in segments.items()}, identifiers, f"deleted:{profile_id}", now_ms,
            self.metrics, self.destinations,
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
            # Suppressed: downstream should refuse the person's data from now on too.
            "suppressed": suppress is not None,
        }
        await deliver(self.producer, exits + [OutboundMessage(PRIVACY_EVENTS, profile_id.encode(), orjson.dumps(notice))], self.metrics)
        owners = (profile_id, *absorbed)
        async with self.redis.pipeline(transaction=False) as pipe:
            if suppress is None:
                for stored in identifiers:
                    # Claims are made by the profile or one merged into it; never drop
                    # a suppression marker or another profile's claim.
                    pipe.eval(RELEASE_CLAIM, 1, identifier_key(_stored(stored), self.hash_key), *owners)
            for key in block_keys:
                pipe.srem(key, profile_id, *absorbed)
            wipes = len(pipe.command_stack)
            for gone in owners:
                gone_keys = wipe_keys(gone)
                pipe.eval(WIPE_PROFILE, len(gone_keys), *gone_keys, now_ms)
            for gone in owners:
                pipe.zrem(due_key(gone), gone)
            replies = await pipe.execute()
        # Identifiers the profiles gained after the first read (an event applied in
        # between): wiped with them, and listed or released like the others.
        held = {text(i) for reply in replies[wipes: wipes + len(owners)] for i in reply}
        late = sorted(held - set(identifiers))
        if late and entry is not None:
            listed.update(_stored(i) for i in late)
            await self._mark([_stored(i) for i in late], entry)
        elif late:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stored in late:
                    pipe.eval(RELEASE_CLAIM, 1, identifier_key(_stored(stored), self.hash_key), *owners)
                await pipe.execute()
        self.metrics.profiles_deleted.inc()
        return {"absorbedIds": absorbed, "listed": len(listed)}

    async def _unsuppress(self, digest: str) -> int:
        """Lift the suppression that listed ``identifier``: every identifier it listed
        leaves the list and its index key is freed (only if it still holds the
        marker). Returns how many were lifted."""
        entry = SuppressionEntry.decode(await self.redis.hget(SUPPRESSION_LIST_KEY, digest))
        group = [digest]
        if entry is not None:
            async for field, raw in self.redis.hscan_iter(SUPPRESSION_LIST_KEY, count=1000):
                other = SuppressionEntry.decode(raw)
                if other is not None and text(field) != digest and entry.same_suppression(other):
                    group.append(text(field))
        async with self.redis.pipeline(transaction=False) as pipe:
            for listed in group:
                pipe.eval(RELEASE_CLAIM, 1, IDENTIFIER_KEY % listed, SUPPRESSED)
                pipe.hdel(SUPPRESSION_LIST_KEY, listed)
            await pipe.execute()
        return len(group)


def _stored(stored: str) -> Identifier:
    """An identifier as a profile's ``ids`` hash stores it (``type:value``)."""
    kind, _, value = stored.partition(":")
    return Identifier(kind, value)
