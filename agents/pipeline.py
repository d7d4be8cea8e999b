"""The hot path: ``Pipeline.handle(batch)`` runs every stage over one batch.

The logical stages (ingest → identity → profile → outputs) run fused, a batch at a
time, because each state change is an atomic, idempotent single-slot Redis step and
every extra Kafka hop would cost throughput. Per batch:

1. ingest (pure): parse and validate each record; rejects become dead letters.
2. identity: ONE pipelined Redis round trip reads the owners of the batch's
   identifiers; assignment to profiles is pure.
3. profile: ONE pipelined Redis round trip claims new identifiers (``SET NX``) and
   runs the ``APPLY_EVENT`` Lua step per event (dedupe + update, atomic per event).
4. outputs: dead letters and ``cdp.events.resolved`` records are enqueued without
   awaiting each, then awaited together.

``handle`` returns when every effect of the batch is stored and every output is
acknowledged, so the caller may then commit the batch's offsets. Each record ends
either processed, dead-lettered with a reason, dropped as a producer's resend, or
*suppressed*: one of its identifiers is on the suppression list (docs/privacy.md),
so nothing is stored or published for it (``cdp_events_suppressed_total`` counts
it). An unexpected error inside a step for one event dead-letters that event
(``processing_error``); Redis or Kafka being unavailable is retried with backoff
and never acks anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agents.identity import fuzzy
from agents.identity.graph import Plan
from agents.identity.matching import BOUNDED_SADD, MatchStore
from agents.identity.resolver import IdentityResolver
from agents.identity.rules import IdentityRules
from agents.identity.store import RELEASE_CLAIM, SUPPRESSED, WIPE_PROFILE, IdentityStore, wipe_keys
from agents.ingest.core import PROCESSING_ERROR, Accepted, Rejected, split_batch
from agents.profiles.model import ProfileModel
from agents.profiles.sensitive import SensitivePolicy
from agents.profiles.store import APPLY_EVENT, ApplyStatus, apply_event_call
from agents.segments.engine import SegmentEngine
from agents.segments.registry import SegmentRegistry
from schemas.events import Event, Identifier
from streams.deadletter import dead_letter
from streams.keys import ProfileKeys, identifier_key
from streams.metrics import Metrics
from streams.output import Producer, deliver
from streams.records import OutboundMessage, Record
from streams.settings import Settings
from streams.topics import DEAD_LETTER, RESOLVED, SEGMENT_CHANGES

log = logging.getLogger(__name__)

STORE_ERROR = "store_error"
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 5.0
# A Redis round trip (one pipelined batch step) taking longer counts as an outage.
_ROUND_TRIP_TIMEOUT_S = 10.0
# Rounds of re-resolution a batch may need when other workers merge or claim under it.
_MAX_ROUNDS = 8


@dataclass(slots=True)
class BatchResult:
    processed: int = 0
    dead_lettered: int = 0
    redelivered: int = 0
    resent: int = 0
    # Dropped because an identifier is on the suppression list: acked, nothing stored.
    suppressed: int = 0
    outputs: list[OutboundMessage] = field(default_factory=list)


class Pipeline:
    """The fused hot path over a Redis client and an output producer."""

    def __init__(
        self,
        settings: Settings,
        redis,
        producer: Producer,
        metrics: Metrics,
        *,
        rules: IdentityRules | None = None,
        match_config: fuzzy.MatchConfig | None = None,
        model: ProfileModel | None = None,
        registry: SegmentRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.rules = rules if rules is not None else IdentityRules.load(settings.identity_rules or None)
        self.match_config = match_config if match_config is not None else fuzzy.MatchConfig.load(settings.matching_config or None)
        self.model = model if model is not None else ProfileModel.load(settings)
        self.identity = IdentityStore(redis, self.rules, settings.id_hash_key, history_length=self.model.history_length)
        self.matching = MatchStore(redis, settings.id_hash_key)
        self.resolver = IdentityResolver(
            self.identity, self.matching, self.rules, self.match_config, producer, metrics, hash_key=settings.id_hash_key
        )
        self.redis = redis
        self.producer = producer
        self.metrics = metrics
        self._clock = clock
        self._scripts: dict[str, str] = {}  # Lua source → SHA, loaded once per connection life
        self.segments = SegmentEngine(redis, self.model, registry, metrics, self._script) if registry is not None else None
        self.resolver.segments = self.segments
        self._dedupe_ttl_s = max(1, int(settings.dedupe_ttl_s))
        self.ready = False

    async def handle(self, batch: Sequence[Record]) -> BatchResult:
        """Process one batch; return when its effects are stored and outputs acked."""
        result = BatchResult()
        if not batch:
            return result
        if self.segments is not None and not self.segments.registry.loaded.is_set():
            # Evaluate nothing before every known segment definition is read.
            log.info("waiting for the segment definitions before the first batch")
            await self.segments.registry.loaded.wait()
        metrics = self.metrics
        metrics.batch_size.observe(len(batch))
        for record in batch:
            metrics.events_consumed.labels(record.topic).inc()
        now_ms = int(self._clock() * 1000)

        started = time.perf_counter()
        accepted, rejected = split_batch(batch, default_region=self.settings.phone_default_region)
        accepted = self._protect_identifiers(accepted)
        metrics.stage_latency.labels("ingest").observe(time.perf_counter() - started)

        outputs = [self._dead_letter(r, now_ms) for r in rejected]
        if accepted:
            outputs.extend(await self._resolve_and_apply(accepted, now_ms, result))
        result.dead_lettered = sum(1 for m in outputs if m.topic == DEAD_LETTER)

        started = time.perf_counter()
        await deliver(self.producer, outputs, metrics)
        metrics.stage_latency.labels("output").observe(time.perf_counter() - started)

        done_ms = self._clock() * 1000
        metrics.events_processed.inc(result.processed)
        for record in batch:
            metrics.end_to_end_latency.observe(max(0.0, (done_ms - record.timestamp_ms) / 1000))
        self._observe_change_latency(accepted, outputs, done_ms)
        result.outputs = outputs
        return result

    def _observe_change_latency(self, accepted: list[Accepted], outputs: list[OutboundMessage], done_ms: float) -> None:
        """Arrival on the input topic (the record's timestamp) → its segment changes
        acknowledged by Kafka, once per change."""
        arrived: dict[str, int] | None = None
        histogram = self.metrics.segment_change_latency
        for message in outputs:
            if message.cause is None or message.topic != SEGMENT_CHANGES:
                continue
            if arrived is None:
                arrived = {item.event.message_id: item.record.timestamp_ms for item in accepted}
            at = arrived.get(message.cause)
            if at is not None:
                histogram.observe(max(0.0, (done_ms - at) / 1000))

    async def handle_safely(self, batch: Sequence[Record]) -> BatchResult:
        """``handle``, but an unexpected error never loses or silently acks a record.

        The batch is acked as a whole by its caller, so if ``handle`` fails on
        something other than an outage (a bug met by some input), each record is
        handled alone; a record that still fails goes to the dead-letter topic with
        reason ``processing_error``. Effects are idempotent, so records of the batch
        that had been applied before the failure are not applied twice.
        """
        try:
            return await self.handle(batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - isolated below, record by record
            log.exception("batch of %d failed; handling its records one by one", len(batch))
        total = BatchResult()
        for record in batch:
            try:
                one = await self.handle([record])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - dead-lettered with the reason
                log.exception("record %s failed; dead-lettering it", record.origin)
                message = self._dead_letter(
                    Rejected(record, PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"[:500]),
                    int(self._clock() * 1000),
                )
                await deliver(self.producer, [message], self.metrics)
                total.dead_lettered += 1
                continue
            total.processed += one.processed
            total.dead_lettered += one.dead_lettered
            total.redelivered += one.redelivered
            total.resent += one.resent
            total.suppressed += one.suppressed
            total.outputs.extend(one.outputs)
        return total

    def _protect_identifiers(self, accepted: list[Accepted]) -> list[Accepted]:
        """Screen each record once for sensitive names (the answer rides on the
        Accepted for the later steps); identifiers of a sensitive type (an
        externalIds entry of type national_id, say) are linked and stored by their
        keyed hash only."""
        sensitive = self.model.sensitive
        protect = sensitive.protect_identifier
        out = []
        for item in accepted:
            if not sensitive.might_contain(item.record.value):
                out.append(Accepted(item.record, item.event, False))
                continue
            identifiers = item.event.identifiers
            protected = tuple(protect(i) for i in identifiers)
            out.append(item if protected == identifiers else Accepted(item.record, replace(item.event, identifiers=protected)))
        return out

    async def _resolve_and_apply(
        self, accepted: list[Accepted], now_ms: int, result: BatchResult
    ) -> list[OutboundMessage]:
        """Identity, then the profile step, repeated for the events whose profile was
        merged away under them (MOVED) or deleted (DELETED), or whose new identifier
        another worker claimed first (they are resolved again, which merges the two
        profiles if allowed) or was suppressed meanwhile. Events with an identifier
        on the suppression list get no plan: nothing is stored or sent for them."""
        outputs: list[OutboundMessage] = []
        first: list[ApplyStatus | Exception | None] = [None] * len(accepted)
        answer: list[list | None] = [None] * len(accepted)
        profile_of: list[str] = [""] * len(accepted)
        suppressed = [False] * len(accepted)
        region = self.settings.phone_default_region
        match_records = [fuzzy.match_record(a.event.traits, region) if a.event.traits else None for a in accepted]
        todo = list(range(len(accepted)))
        # New profile ids carry the planning time: after a purge, later rounds plan
        # with a later one, so the wiped (tombstoned) id is not planned again.
        round_ms = now_ms
        for _ in range(_MAX_ROUNDS):
            if not todo:
                break
            records = [match_records[i] for i in todo]
            started = time.perf_counter()
            plans, notes = await self._redis(
                "identity", self.resolver.resolve, [accepted[i].event for i in todo], records, round_ms
            )
            outputs.extend(notes)
            self.metrics.stage_latency.labels("identity").observe(time.perf_counter() - started)
            live = [k for k, plan in enumerate(plans) if plan is not None]
            if len(live) < len(todo):
                for k, plan in enumerate(plans):
                    if plan is None:
                        suppressed[todo[k]] = True
                todo = [todo[k] for k in live]
                plans = [plans[k] for k in live]
                records = [records[k] for k in live]
                if not todo:
                    break
            items = [accepted[i] for i in todo]
            started = time.perf_counter()
            replies, lost, barred, orphans = await self._redis("profile", self._apply, items, plans, records, round_ms)
            self.metrics.stage_latency.labels("profile").observe(time.perf_counter() - started)
            purge = self._to_purge(items, plans, replies, barred) if any(barred) else set()
            purge |= orphans - {m.survivor for plan in plans for m in plan.merges}
            again = []
            released: list[tuple[Identifier, str]] = []
            for k, i in enumerate(todo):
                reply = replies[k]
                if plans[k].profile_id in purge:
                    # Its profile was made this round and is wiped (another worker
                    # claimed all its identifiers first, or one was suppressed
                    # meanwhile): the event starts afresh.
                    if lost[k]:
                        self.metrics.identity_conflicts.labels("claim").inc()
                    first[i], answer[i], profile_of[i] = None, None, ""
                    again.append(i)
                    continue
                if isinstance(reply, Exception):
                    first[i] = reply
                    continue
                status = ApplyStatus(int(reply[0]))
                if status is ApplyStatus.MOVED:
                    self.metrics.identity_conflicts.labels("moved").inc()
                    self.identity.suspect(plans[k].profile_id)
                    again.append(i)
                    continue
                if status is ApplyStatus.DELETED:
                    # Deleted by a privacy request after this worker cached it: forget
                    # it, take back what this round claimed for it, and start afresh.
                    self.metrics.identity_conflicts.labels("deleted").inc()
                    self.identity.forget_profile(plans[k].profile_id)
                    released.extend((identifier, plans[k].profile_id) for identifier in plans[k].claims)
                    again.append(i)
                    continue
                if first[i] is None:
                    first[i] = status
                    answer[i] = reply
                    profile_of[i] = plans[k].profile_id
                if lost[k]:
                    self.metrics.identity_conflicts.labels("claim").inc()
                    again.append(i)
            if purge:
                await self._redis("profile", self._purge, purge, plans, records, round_ms)
                round_ms += 1
            if released:
                await self._redis("identity", self._release_claims, released)
            todo = again
        if todo:
            raise RuntimeError(f"identity of {len(todo)} events did not settle in {_MAX_ROUNDS} rounds")

        for k, (item, status, profile_id) in enumerate(zip(accepted, first, profile_of)):
            if suppressed[k]:
                result.suppressed += 1
                self.metrics.events_suppressed.inc()
                continue
            if isinstance(status, Exception):
                log.error("store step failed for %s: %s", item.record.origin, status)
                outputs.append(self._dead_letter(Rejected(item.record, STORE_ERROR, str(status)), now_ms))
                continue
            if status is ApplyStatus.RESENT:
                result.resent += 1
                self.metrics.duplicates.labels("resend").inc()
                continue
            if status is ApplyStatus.REDELIVERED:
                result.redelivered += 1
                self.metrics.duplicates.labels("redelivery").inc()
            elif status is ApplyStatus.APPLIED_NEW:
                self.metrics.profiles_created.inc()
            result.processed += 1
            if self.settings.emit_resolved:
                outputs.append(resolved_message(item, profile_id, self.model.sensitive))
        if self.segments is not None:
            started = time.perf_counter()
            kept = [
                a if isinstance(f, ApplyStatus) and f is not ApplyStatus.RESENT and not s else None
                for a, f, s in zip(answer, first, suppressed)
            ]
            outputs.extend(await self._segment_step(accepted, profile_of, kept, now_ms))
            self.metrics.stage_latency.labels("segments").observe(time.perf_counter() - started)
        return outputs

    def _to_purge(self, items: list[Accepted], plans: list[Plan], replies: list, barred: list[bool]) -> set[str]:
        """After a claim met the suppression marker (the identifier was suppressed
        between this round's read and its claim): the profiles to wipe, those this
        round created for such an event (and merged nothing into). An event that
        was applied to an existing profile cannot be taken back out of it: its
        changes stay there (docs/privacy.md, "Limits")."""
        created = {
            plan.profile_id for plan, reply in zip(plans, replies)
            if not isinstance(reply, Exception) and int(reply[0]) == ApplyStatus.APPLIED_NEW
        }
        survivors = {m.survivor for plan in plans for m in plan.merges}
        purge: set[str] = set()
        for item, plan, reply, hit in zip(items, plans, replies, barred):
            if not hit:
                continue
            if plan.profile_id in created and plan.profile_id not in survivors:
                purge.add(plan.profile_id)
            elif not isinstance(reply, Exception) and int(reply[0]) in (ApplyStatus.APPLIED, ApplyStatus.APPLIED_NEW):
                log.warning(
                    "record %s has an identifier suppressed while it was being resolved; it was already applied "
                    "to profile %s, where its changes stay", item.record.origin, plan.profile_id,
                )
        return purge

    async def _purge(self, purge: set[str], plans: list[Plan], records: list[fuzzy.MatchRecord | None], now_ms: int) -> None:
        """Wipe profiles this round made that hold nobody (every claim lost to another
        worker, or an identifier suppressed meanwhile): the
        tombstone first (a worker that cached one is answered DELETED), then the
        claims made for them and their fuzzy-matching block entries. One round trip."""
        wipe = await self._script(WIPE_PROFILE)
        release = await self._script(RELEASE_CLAIM)
        hash_key = self.settings.id_hash_key
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile_id in sorted(purge):
                keys = wipe_keys(profile_id)
                pipe.evalsha(wipe, len(keys), *keys, now_ms)
            for plan, record in zip(plans, records):
                if plan.profile_id not in purge:
                    continue
                for identifier in plan.claims:
                    pipe.evalsha(release, 1, identifier_key(identifier, hash_key), plan.profile_id)
                if record is not None:
                    for key in self.matching.block_keys(record):
                        pipe.srem(key, plan.profile_id)
            await pipe.execute()
        for profile_id in purge:
            self.identity.forget_profile(profile_id)

    async def _segment_step(self, accepted, profile_of, replies, now_ms: int) -> list[OutboundMessage]:
        """Evaluate and commit segments. If Redis fails midway, what was committed is
        found again in the events' de-duplication records (as for a redelivery), so
        no transition is lost or published differently."""
        try:
            return await self.segments.after_apply(accepted, profile_of, replies, now_ms)
        except (RedisConnectionError, RedisTimeoutError, TimeoutError, NoScriptError, OSError) as exc:
            if isinstance(exc, NoScriptError):
                self.forget_scripts()
            self.metrics.redis_errors.labels("segments").inc()
            log.warning("segment step failed (%s: %s); recovering from the records", type(exc).__name__, exc)
        return await self._redis("segments", self.segments.recover, accepted, profile_of, replies, now_ms)

    async def _apply(
        self, items: list[Accepted], plans: list[Plan], match_records: list[fuzzy.MatchRecord | None], now_ms: int
    ) -> tuple[list, list[bool], list[bool]]:
        """One pipelined round trip: claims (SET NX GET) and one APPLY_EVENT per event.

        Returns one reply per event (the Lua reply, or the exception Redis answered
        for that event's step); per event, whether another profile won one of its
        claims (that identifier is then taken off this profile, and the event is
        resolved again); and per event, whether one of its claims met the
        suppression marker (suppressed since the owners were read)."""
        apply_sha = await self._script(APPLY_EVENT)
        block_sha = await self._script(BOUNDED_SADD)
        hash_key = self.settings.id_hash_key
        positions: list[int] = []
        claim_at: list[tuple[int, int, Identifier]] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for k, (item, plan, record) in enumerate(zip(items, plans, match_records)):
                for identifier in plan.claims:
                    claim_at.append((k, len(pipe.command_stack), identifier))
                    pipe.set(identifier_key(identifier, hash_key), plan.profile_id, nx=True, get=True)
                extra_ops, want_state = self.segments.ops(item.event) if self.segments is not None else ((), False)
                keys, args = apply_event_call(
                    item.event, plan.profile_id, item.record.origin, plan.keeps,
                    model=self.model, dedupe_ttl_s=self._dedupe_ttl_s, now_ms=now_ms,
                    plain=not item.sensitive_possible,
                    extra_ops=extra_ops, want_state=want_state,
                    match_record=record.to_json() if record is not None else b"",
                )
                positions.append(len(pipe.command_stack))
                pipe.evalsha(apply_sha, len(keys), *keys, *args)
                if record is not None:
                    # File the profile under the record's blocking keys (each its own
                    # slot); a block may name a profile merged away later: readers
                    # resolve it to its root.
                    for key in self.matching.block_keys(record):
                        pipe.evalsha(block_sha, 1, key, plan.profile_id, self.matching.max_block)
            replies = await pipe.execute(raise_on_error=False)
        event_replies = [replies[p] for p in positions]
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its script cache (restart, SCRIPT FLUSH): nothing of this
            # step ran but the idempotent claims; _redis() reloads and runs it again.
            raise NoScriptError("a Lua script of the profile step is not loaded")
        lost = [False] * len(items)
        barred = [False] * len(items)
        lost_ids: list[tuple[str, Identifier]] = []
        won: set[str] = set()  # profiles that won a claim this round
        for k, position, identifier in claim_at:
            owner = replies[position]
            if isinstance(owner, Exception):
                raise owner
            owner = plans[k].profile_id if owner is None else owner.decode()
            if owner == SUPPRESSED:
                barred[k] = True  # never cached: see IdentityStore.read_graph
            else:
                self.identity.remember_owner(identifier, owner)
            if owner != plans[k].profile_id:
                lost[k] = True
                lost_ids.append((plans[k].profile_id, identifier))
            else:
                won.add(owner)
        if lost_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                for profile_id, identifier in lost_ids:
                    pipe.hdel(ProfileKeys(profile_id).ids, str(identifier))
                await pipe.execute()
        # A profile made this round that won none of its claims (another worker
        # claimed every identifier first) holds nobody: it is wiped and its events
        # resolved again, onto the winner's profile.
        orphans = {
            plan.profile_id for plan, reply, hit in zip(plans, event_replies, lost)
            if hit and plan.profile_id not in won and not isinstance(reply, Exception)
            and int(reply[0]) == ApplyStatus.APPLIED_NEW
        }
        return event_replies, lost, barred, orphans

    async def _release_claims(self, claims: list[tuple[Identifier, str]]) -> None:
        """Delete identifier claims that point at a deleted profile (never a
        suppression marker)."""
        sha = await self._script(RELEASE_CLAIM)
        async with self.redis.pipeline(transaction=False) as pipe:
            for identifier, profile_id in claims:
                pipe.evalsha(sha, 1, identifier_key(identifier, self.settings.id_hash_key), profile_id)
            await pipe.execute()

    def forget_scripts(self) -> None:
        """Load every Lua script again on next use (Redis restarted or flushed its
        script cache); the timer and back-fills call this when they meet it."""
        self._scripts.clear()
        self.identity.forget_scripts()

    async def _script(self, source: str) -> str:
        sha = self._scripts.get(source)
        if sha is None:
            sha = self._scripts[source] = await self.redis.script_load(source)
        return sha

    async def _redis(self, op: str, step, *args):
        """Run one Redis round trip, retrying on connection trouble until it works."""
        backoff = _BACKOFF_START_S
        while True:
            started = time.perf_counter()
            try:
                # One timer per round trip: the hot path's client reads without a
                # per-reply socket timeout (redis-py arms one per reply otherwise).
                async with asyncio.timeout(_ROUND_TRIP_TIMEOUT_S):
                    value = await step(*args)
            except (RedisConnectionError, RedisTimeoutError, TimeoutError, NoScriptError, OSError) as exc:
                if isinstance(exc, NoScriptError):
                    # Redis restarted or flushed its script cache: load every script again.
                    self.forget_scripts()
                self.metrics.redis_errors.labels(op).inc()
                self.ready = False
                log.warning("Redis %s step failed (%s: %s); retrying in %.1fs", op, type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            except ResponseError as exc:
                # A whole-round-trip error that is not about one event (e.g. OOM,
                # READONLY replica): not the input's fault, so retry as well.
                self.metrics.redis_errors.labels(op).inc()
                log.error("Redis %s step refused (%s); retrying in %.1fs", op, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            self.metrics.redis_latency.labels(op).observe(time.perf_counter() - started)
            self.ready = True
            return value

    def _dead_letter(self, rejected: Rejected, now_ms: int) -> OutboundMessage:
        self.metrics.dead_letters.labels(rejected.reason).inc()
        return dead_letter(rejected.record, rejected.reason, rejected.detail, rejected.field, now_ms)


def resolved_message(item: Accepted, profile_id: str, sensitive: SensitivePolicy) -> OutboundMessage:
    """The accepted event, republished with its profile id, keyed by profile id;
    sensitive traits and properties are replaced by their protected form."""
    payload = item.event.payload
    if item.sensitive_possible:
        payload = sensitive.redact(payload)
    event: Event = item.event
    record = item.record
    value = orjson.dumps(
        {
            "profileId": profile_id,
            "messageId": event.message_id,
            "type": event.type,
            "channel": event.channel,
            "timestamp": event.timestamp_ms,
            "identifiers": [str(i) for i in event.identifiers],
            "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
            "event": payload,
        }
    )
    return OutboundMessage(RESOLVED, profile_id.encode(), value)
