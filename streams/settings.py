"""Runtime configuration, read from environment variables with working local defaults.

Settings are built explicitly (``Settings.from_env()``) by the composition root and
passed down; nothing in this package reads the environment at import time. A value
that cannot be parsed fails loudly with :class:`schemas.errors.ConfigError` naming
the variable.

| variable | default | meaning |
|---|---|---|
| CDP_KAFKA_BOOTSTRAP | localhost:9092 | Kafka bootstrap servers, comma separated |
| CDP_REDIS_URL | redis://localhost:6379/0 | Redis URL (``rediss://`` for TLS) |
| CDP_TOPIC_PARTITIONS | 8 | partitions of every topic streamcdp creates |
| CDP_TOPIC_REPLICATION | 1 | replication factor of the topics it creates |
| CDP_WEB_PORT | 6066 | worker HTTP port (/metrics, /healthz, /readyz, /v1/profiles) |
| CDP_WEB_HOST | 0.0.0.0 | worker HTTP bind address |
| CDP_COLLECTOR_PORT | 8088 | HTTP collector port |
| CDP_APP_ID | streamcdp | faust app id = Kafka consumer group |
| CDP_PHONE_DEFAULT_REGION | US | region for phone numbers written without a country code |
| CDP_DEDUPE_TTL | 7d | how long a messageId is remembered for de-duplication |
| CDP_BATCH_MAX | 500 | most events handled as one batch (batch transport: merging stops there; one fetch, up to CDP_KAFKA_MAX_POLL_RECORDS, is never split) |
| CDP_BATCH_WITHIN_MS | 10 | faust transport: longest wait to fill a batch (the batch transport never waits) |
| CDP_EMIT_RESOLVED | true | publish each accepted event with its profile id on cdp.events.resolved |
| CDP_ID_HASH_KEY | (empty) | secret key for the keyed hashes that name identifier keys in Redis |
| CDP_KAFKA_SESSION_TIMEOUT | 30s | how long the group waits for a silent (crashed) worker before moving its partitions |
| CDP_KAFKA_TRANSPORT | batch | ``batch``: each partition fetch reaches the hot path as one message (``kafka+batch://``, streams/batch_transport.py); ``faust``: faust's own per-record transport (``kafka://``) with ``take_events`` |
| CDP_KAFKA_FETCH_MAX_WAIT | 10ms | batch transport: longest time the broker holds a fetch to gather ``CDP_KAFKA_FETCH_MIN_BYTES`` |
| CDP_KAFKA_FETCH_MIN_BYTES | 1 | batch transport: bytes the broker waits for before answering a fetch (1 = answer as soon as there is any) |
| CDP_KAFKA_MAX_POLL_RECORDS | 2000 | most records one fetch hands over (per call, over all partitions) |
| CDP_BATCH_LINGER_MS | 0 | batch transport: how long a batch may wait for more fetches after its first (0 = only merge what is already queued) |
| CDP_BATCH_MERGE | 64 | batch transport: most partition fetches merged into one hot-path batch; only fetches already queued are merged (no wait), until CDP_BATCH_MAX records are in; 1 = each fetch alone |
| CDP_IDENTITY_RULES | config/identity-rules.yaml | identity rules: per identifier type a priority and a limit |
| CDP_MATCHING_CONFIG | config/matching.yaml | fuzzy matching model: field weights and threshold |
| CDP_PROFILE_CONFIG | config/profile.yaml | profile options: history length, sensitive traits |
| CDP_COMPUTED_TRAITS | config/computed-traits.yaml | computed trait definitions |
| CDP_DESTINATIONS | config/destinations.yaml | activation destinations: consent purposes, what each may receive |
| CDP_SENSITIVE_KEY | (empty) | base64 of a 32-byte AES-256-GCM key: sensitive traits are also kept encrypted |
| CDP_ADMIN_TOKEN | (empty) | bearer token of the privacy API (POST /v1/privacy/requests); empty: refused |
| CDP_LOG_FORMAT | text | ``json`` for one JSON object per log line |
| CDP_LOG_LEVEL | info | crit, error, warn, info, debug |
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlsplit, urlunsplit

from schemas.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
LOG_LEVELS = ("crit", "error", "warn", "info", "debug")


def parse_duration(text: str) -> float:
    """Seconds in ``"30"``, ``"250ms"``, ``"5s"``, ``"10m"``, ``"2h"`` or ``"7d"``.

    >>> parse_duration("7d")
    604800.0
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 30s, 10m, 2h, 7d)")
    return float(int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _milliseconds(text: str) -> int:
    """Whole milliseconds in a duration (``"10ms"``, ``"1s"``; a bare number is ms)."""
    if text.strip().isdigit():
        return int(text.strip())
    return round(parse_duration(text) * 1000)


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError(f"not a TCP port: {value}")
    return value


def _choice(*allowed: str):
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}; got {text!r}")
        return value

    return parse


def _region(text: str) -> str:
    value = text.strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", value):
        raise ValueError(f"not an ISO 3166 alpha-2 region code: {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str = "localhost:9092"
    redis_url: str = "redis://localhost:6379/0"
    topic_partitions: int = 8
    topic_replication: int = 1
    web_port: int = 6066
    web_host: str = "0.0.0.0"
    collector_port: int = 8088
    app_id: str = "streamcdp"
    phone_default_region: str = "US"
    dedupe_ttl_s: float = 7 * 86400.0
    batch_max: int = 500
    batch_within_ms: int = 10
    emit_resolved: bool = True
    id_hash_key: str = ""
    identity_rules: str = ""
    matching_config: str = ""
    #: Profile options (history, sensitive traits): YAML; "" = config/profile.yaml defaults.
    profile_config: str = ""
    #: Computed trait definitions: YAML; "" = the shipped config/computed-traits.yaml.
    computed_traits: str = ""
    #: Activation destinations: YAML; "" = the shipped config/destinations.yaml.
    destinations: str = ""
    #: Base64 of a 32-byte AES-256-GCM key; when set, sensitive traits are also kept encrypted.
    sensitive_key: str = ""
    #: Bearer token for the worker's privacy API; empty = the API refuses every request.
    admin_token: str = ""
    kafka_session_timeout_s: float = 30.0
    #: ``batch`` (streams/batch_transport.py) or ``faust`` (faust's own kafka:// transport).
    kafka_transport: str = "batch"
    kafka_fetch_max_wait_ms: int = 10
    kafka_fetch_min_bytes: int = 1
    kafka_max_poll_records: int = 2000
    batch_merge: int = 64
    batch_linger_ms: int = 0
    log_format: str = "text"
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from ``env`` (default: ``os.environ``); ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, (variable, parse) in _ENV.items():
            raw = env.get(variable)
            if raw is None or raw == "":
                continue
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{variable}={raw!r}: {exc}") from None
        values.update(overrides)
        return cls(**values)

    def kafka_url(self) -> str:
        """The bootstrap list as a faust broker URL (``kafka://h1:9092;h2:9092``)."""
        return "kafka://" + ";".join(s.strip() for s in self.kafka_bootstrap.split(","))

    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap.split(",") if s.strip()]

    def redacted(self) -> dict[str, object]:
        """The settings for logs and ``--help`` output, secrets masked."""
        shown: dict[str, object] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "redis_url":
                value = mask_url_password(str(value))
            elif field.name in ("id_hash_key", "sensitive_key", "admin_token"):
                value = "***" if value else ""
            shown[field.name] = value
        return shown


def mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


_ENV = {
    "kafka_bootstrap": ("CDP_KAFKA_BOOTSTRAP", str.strip),
    "redis_url": ("CDP_REDIS_URL", str.strip),
    "topic_partitions": ("CDP_TOPIC_PARTITIONS", _positive_int),
    "topic_replication": ("CDP_TOPIC_REPLICATION", _positive_int),
    "web_port": ("CDP_WEB_PORT", _port),
    "web_host": ("CDP_WEB_HOST", str.strip),
    "collector_port": ("CDP_COLLECTOR_PORT", _port),
    "app_id": ("CDP_APP_ID", str.strip),
    "phone_default_region": ("CDP_PHONE_DEFAULT_REGION", _region),
    "dedupe_ttl_s": ("CDP_DEDUPE_TTL", parse_duration),
    "batch_max": ("CDP_BATCH_MAX", _positive_int),
    "batch_within_ms": ("CDP_BATCH_WITHIN_MS", _positive_int),
    "emit_resolved": ("CDP_EMIT_RESOLVED", _bool),
    "id_hash_key": ("CDP_ID_HASH_KEY", str),
    "identity_rules": ("CDP_IDENTITY_RULES", str.strip),
    "matching_config": ("CDP_MATCHING_CONFIG", str.strip),
    "profile_config": ("CDP_PROFILE_CONFIG", str.strip),
    "computed_traits": ("CDP_COMPUTED_TRAITS", str.strip),
    "destinations": ("CDP_DESTINATIONS", str.strip),
    "sensitive_key": ("CDP_SENSITIVE_KEY", str.strip),
    "admin_token": ("CDP_ADMIN_TOKEN", str.strip),
    "kafka_session_timeout_s": ("CDP_KAFKA_SESSION_TIMEOUT", parse_duration),
    "kafka_transport": ("CDP_KAFKA_TRANSPORT", _choice("batch", "faust")),
    "kafka_fetch_max_wait_ms": ("CDP_KAFKA_FETCH_MAX_WAIT", _milliseconds),
    "kafka_fetch_min_bytes": ("CDP_KAFKA_FETCH_MIN_BYTES", _positive_int),
    "kafka_max_poll_records": ("CDP_KAFKA_MAX_POLL_RECORDS", _positive_int),
    "batch_merge": ("CDP_BATCH_MERGE", _positive_int),
    "batch_linger_ms": ("CDP_BATCH_LINGER_MS", _milliseconds),
    "log_format": ("CDP_LOG_FORMAT", _choice("text", "json")),
    "log_level": ("CDP_LOG_LEVEL", _choice(*LOG_LEVELS)),
}
