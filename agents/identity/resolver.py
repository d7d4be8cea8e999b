"""Identity resolution for a batch: read the graph, match, plan, merge and fold.

The pipeline calls ``IdentityResolver.resolve`` once per round; this module holds
the orchestration of the identity steps (see ``graph.py`` for the pure rules,
``store.py`` for the Redis steps, ``fuzzy.py``/``matching.py`` for matching).
"""

from __future__ import annotations

from agents.identity import fuzzy
from agents.identity.graph import GraphView, Plan, has_known_identifier, plan_event
from agents.identity.matching import LocalBlocks, MatchStore
from agents.identity.rules import IdentityRules
from agents.identity.store import AbsorbedState, IdentityStore, blocked_message, merge_message
from schemas.events import Event
from streams.keys import new_profile_id
from streams.metrics import Metrics
from streams.output import Producer, deliver
from streams.records import OutboundMessage

# Rounds a batch may need when other workers merge under it.
MAX_ROUNDS = 8
_MOVED = 5  # the FOLD script's answer when its target was merged away


class IdentityResolver:
    def __init__(
        self,
        store: IdentityStore,
        matching: MatchStore,
        rules: IdentityRules,
        match_config: fuzzy.MatchConfig,
        producer: Producer,
        metrics: Metrics,
        *,
        hash_key: str,
    ) -> None:
        self.store = store
        self.matching = matching
        self.rules = rules
        self.match_config = match_config
        self.producer = producer
        self.metrics = metrics
        self.hash_key = hash_key
        self.segments = None  # the segment stage (SegmentEngine), when segments are on

    async def resolve(
        self, events: list[Event], match_records: list[fuzzy.MatchRecord | None], now_ms: int
    ) -> tuple[list[Plan | None], list[OutboundMessage]]:
        """Plan the events' profiles; set parents and finish folds for the merges.
        Returns the plans (None for an event with an identifier on the suppression
        list: nothing is to be stored for it) and the merge-blocked notices to publish."""
        for _ in range(MAX_ROUNDS):
            read = await self.store.read_graph(events)
            view, pending = read.view, read.pending
            live = [k for k, barred in enumerate(read.suppressed) if not barred]
            live_events = [events[k] for k in live]
            live_records = [match_records[k] for k in live]
            candidates = await self._match_candidates(live_events, live_records, view)
            live_plans = self._plan(live_events, live_records, candidates, view, now_ms)
            merges = list({(m.absorbed, m.survivor): m for p in live_plans for m in p.merges}.values())
            if merges and await self.store.set_parents(merges, now_ms):
                self.metrics.identity_conflicts.labels("parent").inc()
                continue  # someone merged one of them meanwhile: read and plan again
            absorbed = list(dict.fromkeys([m.absorbed for m in merges] + [n.profile_id for n in pending]))
            if absorbed:
                await self.fold(absorbed, now_ms)
            notes = []
            for plan in live_plans:
                for blocked in plan.blocked:
                    for identifier_type in blocked.types:
                        self.metrics.identity_merges_blocked.labels(identifier_type).inc()
                    notes.append(blocked_message(blocked, now_ms))
            plans: list[Plan | None] = [None] * len(events)
            for k, plan in zip(live, live_plans):
                plans[k] = plan
            return plans, notes
        raise RuntimeError(f"identity plan kept meeting concurrent merges ({MAX_ROUNDS} rounds)")

    async def _match_candidates(
        self, events: list[Event], match_records: list[fuzzy.MatchRecord | None], view: GraphView
    ) -> dict[int, dict[str, list[fuzzy.MatchRecord]]]:
        """Fuzzy-match candidates, by root profile, for the events that carry a match
        record and no known identifier (two or three round trips, only then)."""
        wanted = [k for k, (e, r) in enumerate(zip(events, match_records)) if r is not None and not has_known_identifier(e, view, self.rules)]
        if not wanted:
            return {}
        found = await self.matching.candidates([match_records[k] for k in wanted])
        profile_ids = {p for per_event in found for p, _ in per_event}
        view.add_nodes(await self.store.read_nodes(profile_ids, known={p: None for p in view.ids}))
        by_event: dict[int, dict[str, list[fuzzy.MatchRecord]]] = {}
        for k, per_event in zip(wanted, found):
            by_root: dict[str, list[fuzzy.MatchRecord]] = {}
            for profile_id, records in per_event:
                by_root.setdefault(view.root(profile_id), []).extend(records)
            by_event[k] = by_root
        # A candidate merged away has no records of its own (they moved to its root).
        missing = {root for by_root in by_event.values() for root, records in by_root.items() if not records}
        if missing:
            records_of = await self.matching.records_of(sorted(missing))
            for by_root in by_event.values():
                for root in missing & by_root.keys():
                    by_root[root] = records_of.get(root, [])
        return by_event

    def _plan(
        self,
        events: list[Event],
        match_records: list[fuzzy.MatchRecord | None],
        candidates: dict[int, dict[str, list[fuzzy.MatchRecord]]],
        view: GraphView,
        now_ms: int,
    ) -> list[Plan]:
        """Plan each event in order; an event with no known identifier may join the
        profile its match record matches best (in Redis, or earlier in this batch)."""
        hash_key = self.hash_key
        plans: list[Plan] = []
        earlier = LocalBlocks()  # this batch's records, blocked like those in Redis
        for k, event in enumerate(events):
            record = match_records[k]
            matched = None
            if record is not None and not has_known_identifier(event, view, self.rules):
                by_root = {root: list(records) for root, records in candidates.get(k, {}).items()}
                for profile_id, others in earlier.candidates(record):
                    by_root.setdefault(view.root(profile_id), []).extend(others)
                best = fuzzy.best_match(record, sorted(by_root.items()), self.match_config) if by_root else None
                if best is not None:
                    matched = best[0]
                    self.metrics.identity_fuzzy_matches.inc()
            plan = plan_event(event, view, self.rules, lambda i: new_profile_id(i, hash_key, now_ms), matched)
            plans.append(plan)
            if record is not None:
                earlier.remember(plan.profile_id, record)
        return plans

    async def fold(self, absorbed: list[str], now_ms: int) -> None:
        """Fold each absorbed profile into its root, publish the merge, clean up."""
        states = [s for s in await self.store.read_absorbed(absorbed) if s.meta.get("fold_pending") == "1"]
        targets = [s.parent for s in states]
        done: list[tuple[AbsorbedState, str, int]] = []
        for _ in range(MAX_ROUNDS):
            if not states:
                break
            replies = await self.store.fold(states, targets, now_ms)
            moved_states, moved_targets = [], []
            for state, target, (code, parent) in zip(states, targets, replies):
                if code == _MOVED:
                    moved_states.append(state)
                    moved_targets.append(parent)
                else:
                    done.append((state, target, code))
            states, targets = moved_states, moved_targets
        if states:
            raise RuntimeError("a fold kept being redirected; merge chain still moving")
        messages = [merge_message(s, t) for s, t, _ in done]
        if self.segments is not None and done:
            # The absorbed profiles leave their segments; the survivors are
            # re-evaluated on every segment by the expiry timer, right away.
            messages.extend(await self.segments.exit_absorbed([s.profile_id for s, _, _ in done], now_ms))
            await self.segments.schedule_now(sorted({t for _, t, _ in done}), now_ms)
        await deliver(self.producer, messages, self.metrics)
        self.metrics.identity_merges.inc(sum(1 for _, _, code in done if code == 1))
        await self.store.cleanup([s.profile_id for s, _, _ in done], now_ms)
