"""``streamcdp dlq replay``: send dead letters back to the topic they came from.

A dead letter holds the rejected record's original key and bytes, and headers
saying why and where from (``streams/deadletter.py``). After the cause is fixed (a
validation bug or a limit in streamcdp, a phone region, identity rules), replaying
hands those records to the workers again:

1. read the dead-letter topic from the first record of the time window (or its
   beginning) up to the end it had when the replay started, with a consumer of its
   own: no consumer group, manual assignment, nothing committed, so the workers'
   group is never touched and a run can be repeated;
2. keep the records whose ``cdp.dlq.reason`` header is one of ``reason`` (comma
   separated) and whose ``cdp.dlq.timestamp`` (when they were rejected) lies in
   ``[since, until)``;
3. produce each one's original key and value to its ``cdp.dlq.source.topic``, on
   its original partition, in the order it was dead-lettered, with ``acks=all`` and
   an idempotent producer, adding the header ``cdp.replay.of`` =
   ``<dead-letter topic>/<partition>/<offset>``;
4. print one JSON summary: what was read, selected and replayed, by reason and by
   topic, and what was skipped and why.

Safe to repeat: an event that was in fact processed before (same ``messageId``;
an event without one gets a digest of its bytes) is dropped by the worker's
de-duplication within ``CDP_DEDUPE_TTL``. A record that is still invalid is
dead-lettered again, as a new dead letter, rejected after the replay: give
``until`` (the time the fix was deployed) so that a second run selects the same set
and not those new copies. ``dry_run`` reads and counts, and produces nothing.

Only records whose source is an inbound topic (``cdp.events.*``) are replayed.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from schemas.errors import StreamCDPError
from streams.deadletter import header_map
from streams.logs import configure
from streams.settings import Settings, parse_duration
from streams.topics import DEAD_LETTER, DEAD_LETTER_MAX_BYTES, INBOUND, PRODUCER_MAX_REQUEST_BYTES

__all__ = ["ReplayError", "ReplaySummary", "parse_time", "replay", "run_replay", "REPLAY_HEADER"]

#: Header added to every replayed record: where in the dead-letter topic it came from.
REPLAY_HEADER = "cdp.replay.of"
#: The dead-letter topic is searched from this long before ``since`` (by record
#: timestamp), so that a record produced a little after it was rejected is not missed.
_SEEK_SLACK_MS = 60_000
#: Records in flight to Kafka before the replay waits for their acknowledgements.
_SEND_WINDOW = 500
#: A partition that yields nothing for this long, though its end is not reached, is an error.
_STALL_S = 30.0
_CLIENT_ID = "streamcdp-replay"


class ReplayError(StreamCDPError):
    """A replay that cannot run as asked (bad time, unknown topic, ...)."""


@dataclass
class ReplaySummary:
    source: str
    dry_run: bool
    reasons: list[str] | None
    since: str | None
    until: str | None
    read: int = 0
    selected: int = 0
    replayed: int = 0
    limit_reached: bool = False
    by_reason: Counter = field(default_factory=Counter)
    by_topic: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "dryRun": self.dry_run,
            "filter": {"reasons": self.reasons, "since": self.since, "until": self.until},
            "read": self.read,
            "selected": self.selected,
            "replayed": self.replayed,
            "limitReached": self.limit_reached,
            "byReason": dict(sorted(self.by_reason.items())),
            "byTopic": dict(sorted(self.by_topic.items())),
            "skipped": dict(sorted(self.skipped.items())),
        }


_RELATIVE = re.compile(r"^\s*\d+\s*(ms|s|m|h|d)\s*$")


def parse_time(text: str, now_ms: int) -> int:
    """Milliseconds since the epoch for ``since``/``until``.

    An ISO-8601 time (``2026-11-20T10:00:00Z``, ``2026-11-20T10:00:00.250+01:00``,
    ``2026-11-20``; without an offset it is UTC), or a duration before now (``90s``,
    ``30m``, ``2h``, ``7d``).

    >>> parse_time("2026-11-20T10:00:00Z", 0)
    1795168800000
    >>> parse_time("2h", 10_000_000)
    2800000
    """
    text = text.strip()
    if _RELATIVE.match(text):
        return now_ms - int(parse_duration(text) * 1000)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ReplayError(
            f"not a time: {text!r} (give an ISO-8601 time such as 2026-11-20T10:00:00Z, or a duration "
            "before now such as 30m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rejected_at(headers: dict[str, str], record_timestamp_ms: int) -> int:
    try:
        return int(headers["cdp.dlq.timestamp"])
    except (KeyError, ValueError):
        return record_timestamp_ms


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


async def replay(
    settings: Settings,
    *,
    source: str = DEAD_LETTER,
    reason: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
) -> ReplaySummary:
    """Replay the dead letters of ``source`` that match; return the summary."""
    now_ms = int(time.time() * 1000)
    reasons = sorted({r.strip() for r in reason.split(",") if r.strip()}) if reason else None
    since_ms = parse_time(since, now_ms) if since else None
    until_ms = parse_time(until, now_ms) if until else None
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        raise ReplayError(f"the window is empty: until ({until}) must be later than since ({since})")
    if limit is not None and limit < 0:
        raise ReplayError(f"limit must be >= 0, got {limit}")
    # The summary shows the window as absolute times, so a later run can reuse it.
    summary = ReplaySummary(source, dry_run, reasons, _iso(since_ms), _iso(until_ms))
    wanted = set(reasons) if reasons else None

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers(),
        group_id=None,
        enable_auto_commit=False,
        client_id=_CLIENT_ID,
        max_partition_fetch_bytes=DEAD_LETTER_MAX_BYTES + 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    producer: AIOKafkaProducer | None = None
    try:
        await _start(consumer.start(), settings)
        # aiokafka has no public call for a topic's partitions short of subscribing.
        cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001
        partitions = [TopicPartition(source, p) for p in sorted(cluster.partitions_for_topic(source) or ())]
        if not partitions:
            raise ReplayError(f"topic {source} does not exist in Kafka at {settings.kafka_bootstrap}")
        target_partitions = {t: len(cluster.partitions_for_topic(t) or ()) for t in INBOUND}
        target_partitions = {t: n for t, n in target_partitions.items() if n}
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await _start_offsets(consumer, partitions, ends, since_ms)
        pending = {tp for tp in partitions if starts[tp] < ends[tp]}
        for tp in pending:
            consumer.seek(tp, starts[tp])

        if not dry_run:
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.bootstrap_servers(),
                acks="all",
                enable_idempotence=True,
                max_request_size=PRODUCER_MAX_REQUEST_BYTES,
                linger_ms=5,
                client_id=_CLIENT_ID,
            )
            await _start(producer.start(), settings)
        in_flight: list[asyncio.Future] = []

        last_progress = time.monotonic()
        while pending and not summary.limit_reached:
            batches = await consumer.getmany(*pending, timeout_ms=1000, max_records=_SEND_WINDOW)
            if batches:
                last_progress = time.monotonic()
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    summary.read += 1
                    message = _select(record, wanted, since_ms, until_ms, target_partitions, summary)
                    if message is None:
                        continue
                    if limit is not None and summary.selected >= limit:
                        summary.limit_reached = True
                        break
                    summary.selected += 1
                    topic, partition = message
                    summary.by_reason[header_map(record.headers).get("cdp.dlq.reason", "")] += 1
                    summary.by_topic[topic] += 1
                    if producer is not None:
                        in_flight.append(await producer.send(
                            topic, record.value if record.value is not None else b"", key=record.key,
                            partition=partition,
                            headers=[(REPLAY_HEADER, f"{source}/{record.partition}/{record.offset}".encode())],
                        ))
                if summary.limit_reached:
                    break
            if len(in_flight) >= _SEND_WINDOW:
                await _acknowledged(in_flight, summary)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            if pending and time.monotonic() - last_progress > _STALL_S:
                raise ConnectionError(
                    f"no progress reading {source} for {_STALL_S:.0f}s; {summary.replayed} replayed so far "
                    "(running the same replay again is safe)"
                )
        await _acknowledged(in_flight, summary)
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()
    return summary


def _select(record, wanted, since_ms, until_ms, target_partitions, summary) -> tuple[str, int | None] | None:
    """(topic, partition) to replay ``record`` to, or None when it is filtered out or skipped."""
    headers = header_map(record.headers)
    if wanted is not None and headers.get("cdp.dlq.reason") not in wanted:
        return None
    at = _rejected_at(headers, record.timestamp)
    if (since_ms is not None and at < since_ms) or (until_ms is not None and at >= until_ms):
        return None
    topic = headers.get("cdp.dlq.source.topic")
    if not topic:
        summary.skipped["no_source_topic"] += 1
        return None
    if topic not in target_partitions:
        summary.skipped["source_not_inbound"] += 1
        return None
    partition = _int(headers.get("cdp.dlq.source.partition"))
    if partition is None or not 0 <= partition < target_partitions[topic]:
        partition = None  # the partition is gone: let the key choose, as the producer's partitioner would
    return topic, partition


async def _start_offsets(consumer, partitions, ends, since_ms) -> dict:
    if since_ms is None:
        return await consumer.beginning_offsets(partitions)
    found = await consumer.offsets_for_times({tp: max(0, since_ms - _SEEK_SLACK_MS) for tp in partitions})
    return {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in partitions}


async def _acknowledged(in_flight: list[asyncio.Future], summary: ReplaySummary) -> None:
    if not in_flight:
        return
    results = await asyncio.gather(*in_flight, return_exceptions=True)
    in_flight.clear()
    failed = [r for r in results if isinstance(r, BaseException)]
    summary.replayed += len(results) - len(failed)
    if failed:
        raise ConnectionError(
            f"Kafka did not acknowledge {len(failed)} replayed records ({type(failed[0]).__name__}: {failed[0]}); "
            f"{summary.replayed} replayed so far (running the same replay again is safe)"
        )


async def _start(starting, settings: Settings) -> None:
    try:
        await asyncio.wait_for(starting, 30)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise ConnectionError(f"Kafka at {settings.kafka_bootstrap} does not answer: {exc}") from None


def run_replay(
    settings: Settings,
    *,
    source: str = DEAD_LETTER,
    reason: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
) -> int:
    """``streamcdp dlq replay``: replay, print the JSON summary on stdout, return 0.

    Raises :class:`ReplayError` for a bad argument or an unknown topic and
    ``ConnectionError`` when Kafka does not answer or acknowledge (the CLI turns
    them into exit codes 2 and 4).
    """
    configure(settings.log_format, "warn")
    summary = asyncio.run(
        replay(settings, source=source, reason=reason, since=since, until=until, limit=limit, dry_run=dry_run)
    )
    sys.stdout.write(orjson.dumps(summary.to_dict()).decode() + "\n")
    return 0
