"""``streamcdp import FILE --channel crm``: CSV or JSONL rows in as identify events.

Each row becomes one Segment ``identify`` event on ``cdp.events.<channel>``:

* identifier columns: ``user_id`` (or ``userId``) → ``userId``; ``email`` and
  ``phone`` → ``traits.email`` / ``traits.phone``; ``external_id.<type>`` →
  ``context.externalIds[{id, type}]``;
* ``timestamp`` (ISO-8601) is the event time; without it, the time of the import;
* every other column is a trait. Empty cells (and JSON nulls) are skipped. In CSV,
  cells are strings, trimmed; a dotted column name nests (``address.city`` →
  ``traits.address.city``). In JSONL, values keep their JSON types and nesting.

``messageId`` is ``import-<content digest>-<line>``: the same file imported again
gives the same ids, and the worker drops the duplicates. A row with no identifier
but enough for fuzzy matching (a name and a date of birth, a street with a
postcode, or a phone; see ``agents/identity/fuzzy.py``) gets an ``anonymousId``
``import:<content digest>:<line>`` so that it passes ingest; matching then decides
its profile.

Bad rows (a line that is not JSON, a row with more cells than the header, an email
or phone that cannot be used, no identifier and nothing to match on, an event
ingest would reject ...) are reported with their line number and counted; the good
rows are sent all the same. The summary is one JSON object on stdout; errors are
also listed on stderr. Exit status: 0 when every row was sent, 1 when a row failed.

Rows are produced keyed by the event's strongest identifier, with ``acks=all``; the
command returns once the broker acknowledged every sent row.
"""

from __future__ import annotations

import asyncio
import csv
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from hashlib import blake2b
from pathlib import Path

import orjson

from agents.identity.fuzzy import match_record
from schemas.errors import InvalidEvent, StreamCDPError
from schemas.events import parse_event
from schemas.identifiers import normalize_email, normalize_phone, normalize_type
from streams.settings import Settings

__all__ = [
    "ImportFileError",
    "Built",
    "Failed",
    "FORMATS",
    "detect_format",
    "file_digest",
    "read_rows",
    "build_event",
    "prepare",
    "import_file",
    "run_import",
]

FORMATS = ("csv", "jsonl")
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_CHANNEL = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_EXTERNAL_PREFIX = "external_id."
_USER_ID_COLUMNS = ("user_id", "userId")
MAX_ERRORS_SHOWN = 100
_SEND_WINDOW = 1000


class ImportFileError(StreamCDPError):
    """The file as a whole cannot be imported (missing, unknown format, bad header)."""


@dataclass(frozen=True, slots=True)
class Built:
    """A row turned into an event, ready to produce."""

    line: int
    value: bytes
    key: bytes
    for_matching: bool  # no identifier: sent with an import anonymousId for fuzzy matching


@dataclass(frozen=True, slots=True)
class Failed:
    line: int
    error: str


# ------------------------------------------------------------------ reading


def detect_format(path: str, fmt: str | None) -> str:
    """``fmt`` if given, else from the extension (.csv; .jsonl or .ndjson)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ImportFileError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    found = _EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise ImportFileError(
            f"cannot tell the format of {path!r} from its extension: name it .csv, .jsonl or .ndjson,"
            " or pass --format csv|jsonl"
        )
    return found


def file_digest(path: str) -> str:
    """BLAKE2b-128 of the file's bytes, hex: what makes message ids repeatable."""
    digest = blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise ImportFileError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ImportFileError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise ImportFileError(f"cannot read {path}: permission denied") from None
    return digest.hexdigest()


def read_rows(path: str, fmt: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line, row, None)`` per row, or ``(line, None, error)`` for a row that
    cannot be read; blank lines are skipped. Raises ImportFileError for a bad header."""
    if fmt == "jsonl":
        yield from _jsonl_rows(path)
    else:
        yield from _csv_rows(path)


def _jsonl_rows(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield line, None, f"not valid JSON ({exc})"
                continue
            if not isinstance(row, dict):
                yield line, None, f"a line must be a JSON object, got {type(row).__name__}"
                continue
            yield line, row, None


def _csv_rows(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    # surrogateescape: a byte that is not UTF-8 fails its own row, not the file.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise ImportFileError(f"{path} is empty: a CSV import needs a header row") from None
        except csv.Error as exc:
            raise ImportFileError(f"{path}: the header row is not valid CSV ({exc})") from None
        columns = [c.strip() for c in header]
        _check_header(path, columns)
        previous_end = reader.line_num
        while True:
            start = previous_end + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                previous_end = reader.line_num
                yield start, None, f"not valid CSV ({exc})"
                continue
            previous_end = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(columns):
                yield start, None, f"the row has {len(cells)} cells, the header {len(columns)}"
                continue
            if any(_has_surrogates(c) for c in cells):
                yield start, None, "the row is not valid UTF-8"
                continue
            row: dict = {}
            for name, cell in zip(columns, cells):
                value = cell.strip()
                if value:
                    _put_dotted(row, name, value)
            yield start, row, None


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _check_header(path: str, columns: list[str]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(columns, start=1):
        if not name:
            raise ImportFileError(f"{path}: column {index} of the header has no name")
        if name in seen:
            raise ImportFileError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
        if name.startswith(_EXTERNAL_PREFIX) and normalize_type(name[len(_EXTERNAL_PREFIX):]) is None:
            raise ImportFileError(f"{path}: column {name!r}: write external ids as external_id.<type>, e.g. external_id.crm_id")
    nested = {c.split(".", 1)[0] for c in columns if "." in c and not c.startswith(_EXTERNAL_PREFIX)}
    clash = sorted(nested & set(columns))
    if clash:
        raise ImportFileError(f"{path}: column {clash[0]!r} clashes with the nested columns {clash[0]}.*")


def _put_dotted(row: dict, name: str, value: str) -> None:
    """``address.city`` → ``row["address"]["city"]``; external ids stay flat."""
    if "." not in name or name.startswith(_EXTERNAL_PREFIX):
        row[name] = value
        return
    *parents, leaf = name.split(".")
    target = row
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


# ------------------------------------------------------------------ building


def _digest(text: str) -> str:
    return blake2b(text.encode(), digest_size=10).hexdigest()


def build_event(
    row: Mapping[str, object],
    *,
    line: int,
    file_hash: str,
    channel: str,
    now_iso: str,
    now_ms: int,
    default_region: str = "US",
) -> Built | Failed:
    """One row → one identify event, validated by the same gate as ingest (pure).

    >>> built = build_event({"email": "Ann@Example.com", "plan": "gold"}, line=2, file_hash="ab" * 16,
    ...                     channel="crm", now_iso="2026-11-20T10:00:00.000Z", now_ms=0)
    >>> built.key, orjson.loads(built.value)["traits"]
    (b'email:ann@example.com', {'email': 'Ann@Example.com', 'plan': 'gold'})
    >>> build_event({"plan": "gold"}, line=3, file_hash="ab" * 16, channel="crm",
    ...             now_iso="2026-11-20T10:00:00.000Z", now_ms=0).error[:40]
    'no identifier (user_id, email, phone or '
    """
    traits: dict = {}
    external: list[dict] = []
    user_id: str | None = None
    timestamp: object = None
    for name, value in row.items():
        if value is None or value == "" or value == {} or value == []:
            continue
        if name in _USER_ID_COLUMNS:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                return Failed(line, f"{name} must be a string, got {type(value).__name__}")
            user_id = value.strip()
        elif name.startswith(_EXTERNAL_PREFIX):
            id_type = normalize_type(name[len(_EXTERNAL_PREFIX):])
            if id_type is None:
                return Failed(line, f"{name!r}: write external ids as external_id.<type>")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                return Failed(line, f"{name} must be a string, got {type(value).__name__}")
            external.append({"id": value.strip(), "type": id_type})
        elif name == "timestamp":
            timestamp = value
        elif name == "email":
            if not isinstance(value, str) or normalize_email(value) is None:
                return Failed(line, f"email {_clip(value)!r} is not a usable email address")
            traits[name] = value
        elif name == "phone":
            text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(text, str) or normalize_phone(text, default_region) is None:
                return Failed(line, f"phone {_clip(value)!r} is not a phone number (E.164, or national in {default_region})")
            traits[name] = value
        else:
            traits[name] = value

    event: dict = {
        "type": "identify",
        "messageId": f"import-{file_hash[:20]}-{line}",
        "timestamp": timestamp if timestamp is not None else now_iso,
        "traits": traits,
        "context": {"library": {"name": "streamcdp-import", "version": "1"}},
    }
    if user_id:
        event["userId"] = user_id
    if external:
        event["context"]["externalIds"] = external
    strong = bool(user_id) or "email" in traits or "phone" in traits or bool(external)
    for_matching = False
    if not strong:
        if match_record(traits, default_region) is None:
            return Failed(
                line,
                "no identifier (user_id, email, phone or external_id.<type>) and not enough to match on"
                " (a name plus a date of birth, a street with a postcode, or a phone)",
            )
        event["anonymousId"] = f"import:{file_hash[:20]}:{line}"
        for_matching = True
    value = orjson.dumps(event)
    try:
        parsed = parse_event(value, channel=channel, fallback_timestamp_ms=now_ms, default_region=default_region)
    except InvalidEvent as exc:
        return Failed(line, f"ingest would reject the event: {exc}")
    return Built(line, value, str(parsed.best_identifier()).encode(), for_matching)


def _clip(value: object, limit: int = 60) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def prepare(path: str, fmt: str | None, channel: str, *, default_region: str = "US", now_ms: int | None = None) -> tuple[str, str, Iterator[Built | Failed]]:
    """Format, content digest, and the rows as events (read lazily)."""
    resolved = detect_format(path, fmt)
    file_hash = file_digest(path)
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    now_iso = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def rows() -> Iterator[Built | Failed]:
        for line, row, error in read_rows(path, resolved):
            if error is not None:
                yield Failed(line, error)
                continue
            yield build_event(
                row, line=line, file_hash=file_hash, channel=channel,
                now_iso=now_iso, now_ms=now_ms, default_region=default_region,
            )

    return resolved, file_hash, rows()


# ------------------------------------------------------------------ sending


@dataclass(slots=True)
class Summary:
    file: str
    format: str
    channel: str
    topic: str
    content_hash: str
    rows: int = 0
    sent: int = 0
    failed: int = 0
    for_matching: int = 0
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        shown = self.errors[:MAX_ERRORS_SHOWN]
        return {
            "file": self.file, "format": self.format, "channel": self.channel, "topic": self.topic,
            "rows": self.rows, "sent": self.sent, "failed": self.failed, "for_matching": self.for_matching,
            "content_hash": self.content_hash, "seconds": round(self.seconds, 3),
            "errors": shown, "errors_not_shown": len(self.errors) - len(shown),
        }


def topic_for(channel: str) -> str:
    """``cdp.events.<channel>``, which must be a topic the worker reads."""
    from streams.topics import INBOUND

    if not isinstance(channel, str) or not _CHANNEL.match(channel):
        raise ImportFileError(f"channel {channel!r}: use lower-case letters, digits, '-' or '_', e.g. crm")
    topic = f"cdp.events.{channel}"
    if topic not in INBOUND:
        readable = ", ".join(t.rsplit(".", 1)[-1] for t in INBOUND)
        raise ImportFileError(f"channel {channel!r}: the worker does not read {topic} (channels: {readable})")
    return topic


async def import_file(settings: Settings, path: str, channel: str, fmt: str | None, *, on_error=None) -> Summary:
    """Produce the file's rows; return the summary once every sent row is acknowledged.

    ``on_error(failed)`` is called for each bad row as it is met."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from streams.topics import PRODUCER_MAX_REQUEST_BYTES, TopicSpec, ensure_topics

    topic = topic_for(channel)
    resolved, file_hash, rows = prepare(path, fmt, channel, default_region=settings.phone_default_region)
    summary = Summary(path, resolved, channel, topic, file_hash)
    started = time.monotonic()
    await ensure_topics(settings, (TopicSpec(topic),), timeout_s=30)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers(), acks="all", linger_ms=5,
        max_request_size=PRODUCER_MAX_REQUEST_BYTES,
    )
    try:
        await producer.start()
        pending = []
        for item in rows:
            summary.rows += 1
            if isinstance(item, Failed):
                summary.failed += 1
                summary.errors.append({"line": item.line, "error": item.error})
                if on_error is not None:
                    on_error(item)
                continue
            pending.append(await producer.send(topic, item.value, key=item.key))
            summary.for_matching += item.for_matching
            if len(pending) >= _SEND_WINDOW:
                await asyncio.gather(*pending)
                summary.sent += len(pending)
                pending.clear()
        await asyncio.gather(*pending)
        summary.sent += len(pending)
    except KafkaError as exc:
        raise ConnectionError(
            f"Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}: {exc} ({summary.sent} rows acknowledged"
            " before the failure; importing the same file again is safe, duplicates are dropped)"
        ) from exc
    finally:
        await producer.stop()
    summary.seconds = time.monotonic() - started
    return summary


def run_import(settings: Settings, path: str, channel: str, fmt: str | None) -> int:
    """The ``streamcdp import`` command: 0 when every row was sent, 1 when some failed."""

    def report(failed: Failed) -> None:
        print(f"streamcdp import: {path}:{failed.line}: {failed.error}", file=sys.stderr)

    summary = asyncio.run(import_file(settings, path, channel, fmt, on_error=report))
    sys.stdout.write(orjson.dumps(summary.to_dict()).decode() + "\n")
    return 1 if summary.failed else 0
