"""Prometheus metrics of a worker, created against an injected registry.

Names follow Prometheus conventions: a ``cdp_`` prefix, base units, ``_total`` for
counters, ``_seconds`` for latency histograms, and label sets bounded by the
topics, reasons and stages streamcdp itself defines.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 0.5 ms to 10 s: the hot path's steps are sub-millisecond
# to tens of milliseconds; the tail matters for the p99 alert.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)


class Metrics:
    """The worker's metrics; one instance per registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "cdp_events_consumed_total", "Records read from an input topic.", ["topic"], registry=r
        )
        self.events_produced = Counter(
            "cdp_events_produced_total", "Records delivered to an output topic.", ["topic"], registry=r
        )
        self.events_processed = Counter(
            "cdp_events_processed_total",
            "Events that passed every stage and whose effects are stored and published.",
            registry=r,
        )
        self.dead_letters = Counter(
            "cdp_dead_letters_total", "Input records sent to the dead-letter topic.", ["reason"], registry=r
        )
        self.duplicates = Counter(
            "cdp_events_duplicate_total",
            "Events whose messageId was already applied: 'redelivery' (same topic/partition/"
            "offset, outputs re-sent) or 'resend' (another record, dropped).",
            ["kind"],
            registry=r,
        )
        self.profiles_created = Counter(
            "cdp_profiles_created_total", "Profiles created.", registry=r
        )
        self.identity_merges = Counter(
            "cdp_identity_merges_total", "Profiles merged into another (folds completed).", registry=r
        )
        self.identity_merges_blocked = Counter(
            "cdp_identity_merges_blocked_total",
            "Links refused by merge protection, by the identifier type whose limit they would exceed.",
            ["identifier_type"],
            registry=r,
        )
        self.identity_fuzzy_matches = Counter(
            "cdp_identity_fuzzy_matches_total",
            "Events without a known identifier linked to a profile by fuzzy matching.",
            registry=r,
        )
        self.identity_conflicts = Counter(
            "cdp_identity_conflicts_total",
            "Times a batch's identity plan met a concurrent change (lost claim, second parent, "
            "merged target) and was resolved again.",
            ["kind"],
            registry=r,
        )
        self.batch_size = Histogram(
            "cdp_batch_size_events",
            "Events per handled batch (with the batch transport: the records of one or "
            "more partition fetches).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "cdp_stage_duration_seconds",
            "Time a batch spends in one stage of the hot path.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "cdp_event_latency_seconds",
            "From an event's arrival on its input topic (record timestamp) until its "
            "effects are stored and its outputs delivered.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_latency = Histogram(
            "cdp_redis_call_duration_seconds",
            "Duration of one pipelined Redis round trip.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "cdp_redis_errors_total", "Redis round trips that failed (retried).", ["op"], registry=r
        )
        self.kafka_errors = Counter(
            "cdp_kafka_produce_errors_total", "Produce attempts that failed (retried).", ["topic"], registry=r
        )
        self.consumer_lag = Gauge(
            "cdp_consumer_lag_events",
            "Records in a partition not yet handled by this worker (high watermark minus "
            "next offset to handle).",
            ["topic", "partition"],
            registry=r,
        )
        self.commit_latency = Histogram(
            "cdp_kafka_commit_seconds",
            "Duration of one offset commit of the input topics (acked offsets gathered, "
            "producer flushed, OffsetCommit answered); rounds with nothing new to commit "
            "are not observed.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.profiles_deleted = Counter(
            "cdp_profiles_deleted_total", "Profiles deleted by privacy requests.", registry=r
        )
        self.segment_transitions = Counter(
            "cdp_segment_transitions_total",
            "Segment membership changes published on cdp.segment-changes, by segment and kind (entered/exited); "
            "the segment label is bounded by the segments defined.",
            ["segment", "kind"],
            registry=r,
        )
        self.segment_expiry_checks = Counter(
            "cdp_segment_expiry_checks_total",
            "Profiles re-evaluated by the segment timer (a windowed counter changed with time, or a merge).",
            registry=r,
        )
        self.segment_backfill_profiles = Counter(
            "cdp_segment_backfill_profiles_total",
            "Profiles evaluated by the back-fill of a new or changed segment, per segment.",
            ["segment"],
            registry=r,
        )
        self.segment_change_latency = Histogram(
            "cdp_segment_change_latency_seconds",
            "From an event's arrival on its input topic (record timestamp) until the segment change it "
            "caused is acknowledged on cdp.segment-changes; one observation per change.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.segment_expiry_backlog = Gauge(
            "cdp_segment_expiry_backlog_profiles",
            "Profiles due for a window re-evaluation and not yet claimed by a worker's timer (all shards).",
            registry=r,
        )
        self.segment_expiry_delay = Gauge(
            "cdp_segment_expiry_delay_seconds",
            "How late the oldest unclaimed window re-evaluation is (0 when none is due).",
            registry=r,
        )
        self.segment_backfills_running = Gauge(
            "cdp_segment_backfills_running", "Back-fills (or sweeps of deleted segments) this worker is running.",
            registry=r,
        )
        self.segments_defined = Gauge(
            "cdp_segments_defined", "Segments this worker knows from cdp.segment-definitions.", registry=r
        )
        self.activations = Counter(
            "cdp_activations_total",
            "Entered/exited messages sent to a destination's cdp.activations.<destination> topic.",
            ["destination", "kind"],
            registry=r,
        )
        self.activations_blocked = Counter(
            "cdp_activations_consent_blocked_total",
            "Segment entries not sent to a destination because the profile's consent does not cover its purpose.",
            ["destination"],
            registry=r,
        )
        self.events_suppressed = Counter(
            "cdp_events_suppressed_total",
            "Events dropped before anything was stored because an identifier is on the suppression list.",
            registry=r,
        )
        self.privacy_requests = Counter(
            "cdp_privacy_requests_total",
            "Privacy requests answered, by kind (access/delete/suppress/unsuppress) and status (completed/not_found).",
            ["kind", "status"],
            registry=r,
        )
        self.up = Gauge("cdp_worker_ready", "1 while the worker is ready to process events.", registry=r)
        self._precreate()

    def precreate_segments(self, segment_ids) -> None:
        """The transition series of these segments, at zero (a new segment's first
        burst then shows in rate())."""
        for segment_id in segment_ids:
            for kind in ("entered", "exited"):
                self.segment_transitions.labels(segment_id, kind)

    def precreate_destinations(self, names) -> None:
        """The series of the configured activation destinations, at zero (their
        topics are ``cdp.activations.<name>``)."""
        for name in names:
            topic = f"cdp.activations.{name}"
            self.events_produced.labels(topic)
            self.kafka_errors.labels(topic)
            self.activations_blocked.labels(name)
            for kind in ("entered", "exited"):
                self.activations.labels(name, kind)

    def _precreate(self) -> None:
        """Create the known label sets at zero, so a series exists before its first
        increment and rate() sees that first burst."""
        from schemas.events import RejectReason
        from streams.topics import DEAD_LETTER, IDENTITY_MERGES, INBOUND, PRIVACY_EVENTS, RESOLVED, SEGMENT_CHANGES

        for topic in INBOUND:
            self.events_consumed.labels(topic)
        for topic in (RESOLVED, DEAD_LETTER, IDENTITY_MERGES, SEGMENT_CHANGES, PRIVACY_EVENTS):
            self.events_produced.labels(topic)
            self.kafka_errors.labels(topic)
        for reason in (*(r.value for r in RejectReason), "processing_error", "store_error"):
            self.dead_letters.labels(reason)
        for kind in ("redelivery", "resend"):
            self.duplicates.labels(kind)
        for kind in ("claim", "parent", "moved", "deleted", "segment_rev"):
            self.identity_conflicts.labels(kind)
        for kind in ("access", "delete", "suppress", "unsuppress"):
            for status in ("completed", "not_found"):
                self.privacy_requests.labels(kind, status)
        for stage in ("ingest", "identity", "profile", "segments", "output"):
            self.stage_latency.labels(stage)
        for op in ("identity", "profile", "segments"):
            self.redis_latency.labels(op)
            self.redis_errors.labels(op)
