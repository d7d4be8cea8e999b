"""Prometheus metrics of the collector, created against an injected registry.

Label values are bounded by what the collector itself defines: its routes (one
value per registered path, ``unmatched`` for the rest), HTTP status codes, the
write-key channels and its own reason codes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streams.metrics import LATENCY_BUCKETS


class CollectorMetrics:
    """The collector's metrics; one instance per registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cdp_collector_requests_total", "HTTP requests answered, by route and status code.",
            ["route", "code"], registry=r,
        )
        self.latency = Histogram(
            "cdp_collector_request_duration_seconds",
            "From a request's arrival until its answer (for ingest routes: until Kafka acknowledged it).",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.events = Counter(
            "cdp_collector_events_received_total",
            "Events acknowledged by Kafka and answered 200, by the write key's channel.",
            ["channel"], registry=r,
        )
        self.rejected = Counter(
            "cdp_collector_rejected_total",
            "Requests refused with a 4xx, by reason code (invalid_json, message_too_large, invalid_write_key, ...).",
            ["reason"], registry=r,
        )
        self.produce_errors = Counter(
            "cdp_collector_produce_errors_total",
            "Requests answered 503 because Kafka did not acknowledge every message, by cause"
            " (not_connected, timeout, kafka_error).",
            ["cause"], registry=r,
        )
        self.kafka_ready = Gauge(
            "cdp_collector_kafka_ready", "1 while the producer is connected and metadata is fresh.", registry=r
        )
