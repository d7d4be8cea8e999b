"""Every Kafka topic streamcdp reads or writes, declared once.

Inbound events arrive per channel on ``cdp.events.{web,app,pos,crm}``. Rejected input
goes to ``cdp.events.dead-letter`` with the original bytes; each accepted event is
republished with its profile id on ``cdp.events.resolved``. The other outbound
topics are filled by later stages (identity merges, segment changes, privacy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from streams.settings import Settings

log = logging.getLogger(__name__)

EVENTS_WEB = "cdp.events.web"
EVENTS_APP = "cdp.events.app"
EVENTS_POS = "cdp.events.pos"
# Bulk imports (`streamcdp import FILE --channel crm`) arrive here.
EVENTS_CRM = "cdp.events.crm"
INBOUND = (EVENTS_WEB, EVENTS_APP, EVENTS_POS, EVENTS_CRM)
DEAD_LETTER = "cdp.events.dead-letter"
RESOLVED = "cdp.events.resolved"
IDENTITY_MERGES = "cdp.identity.merges"
SEGMENT_CHANGES = "cdp.segment-changes"
SEGMENT_DEFINITIONS = "cdp.segment-definitions"
PRIVACY_EVENTS = "cdp.privacy.events"

# The largest message the dead-letter topic takes: the biggest input the broker may
# hold plus room for our headers. Inbound events above 32 KiB are rejected, but they
# still reach the dead-letter topic whole, so nothing is lost.
DEAD_LETTER_MAX_BYTES = 20 * 1024 * 1024
# Producers must be allowed to send a dead letter of that size.
PRODUCER_MAX_REQUEST_BYTES = DEAD_LETTER_MAX_BYTES + 1024 * 1024

_CHANNELS = {EVENTS_WEB: "web", EVENTS_APP: "app", EVENTS_POS: "pos", EVENTS_CRM: "crm"}


def channel_of(topic: str) -> str:
    """The channel an inbound topic carries: ``cdp.events.pos`` → ``pos``."""
    channel = _CHANNELS.get(topic)
    if channel is not None:
        return channel
    return topic.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    compacted: bool = False
    config: dict[str, str] = field(default_factory=dict)


def all_topics(activation_topics: tuple[str, ...] = ()) -> tuple[TopicSpec, ...]:
    """Every topic; ``activation_topics``: the configured destinations' topics
    (``cdp.activations.<name>``, docs/activation.md)."""
    return (
        *(TopicSpec(name) for name in INBOUND),
        TopicSpec(DEAD_LETTER, config={"max.message.bytes": str(DEAD_LETTER_MAX_BYTES)}),
        TopicSpec(RESOLVED),
        TopicSpec(IDENTITY_MERGES),
        TopicSpec(SEGMENT_CHANGES),
        TopicSpec(SEGMENT_DEFINITIONS, compacted=True),
        TopicSpec(PRIVACY_EVENTS),
        *(TopicSpec(name) for name in activation_topics),
    )


async def ensure_topics(
    settings: Settings, specs: tuple[TopicSpec, ...] | None = None, *, timeout_s: float = 60.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    faust ignores a source topic missing from the cluster metadata (its agent then
    never runs), so the worker calls this before it starts. Retries until the
    broker answers or ``timeout_s`` passes.
    """
    specs = all_topics() if specs is None else specs
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [s for s in specs if s.name not in existing]
            if missing:
                await _create(admin, settings, missing)
            return [s.name for s in missing]
        except KafkaConnectionError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionError(
                    f"Kafka at {settings.kafka_bootstrap} did not answer within {timeout_s:.0f}s: {exc}"
                ) from exc
            log.warning("Kafka not reachable yet (%s); retrying", exc)
            await asyncio.sleep(1.0)
        finally:
            await admin.close()


async def delete_topics(settings: Settings, names: Iterable[str]) -> None:
    """Delete those of ``names`` that exist (benchmarks' and tests' own topics)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, settings: Settings, specs: list[TopicSpec]) -> None:
    new = []
    for spec in specs:
        config = dict(spec.config)
        if spec.compacted:
            config["cleanup.policy"] = "compact"
        new.append(
            NewTopic(
                spec.name,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication,
                topic_configs=config,
            )
        )
    try:
        response = await admin.create_topics(new)
    except TopicAlreadyExistsError:
        return  # another worker created them first
    for name, code, message in _topic_errors(response):
        if code not in (0, TopicAlreadyExistsError.errno):
            raise RuntimeError(f"could not create topic {name}: error {code} {message}")
    log.info("created topics %s", ", ".join(s.name for s in specs))


def _topic_errors(response) -> list[tuple[str, int, str]]:
    rows = []
    for item in getattr(response, "topic_errors", []):
        name, code = item[0], item[1]
        message = item[2] if len(item) > 2 else ""
        rows.append((name, code, message or ""))
    return rows
