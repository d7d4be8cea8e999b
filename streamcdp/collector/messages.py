"""What the collector does to a request body before it reaches Kafka. Pure: no I/O.

``decode_body`` (gzip/deflate, with a cap on the decompressed size) → ``parse_payload``
(JSON object) → ``prepare`` (one :class:`Prepared` Kafka record per message: enriched,
size-checked, keyed by the message's best identifier).

>>> payload = parse_payload(b'{"batch":[{"type":"track","event":"x","userId":"u-1"}],"writeKey":"k"}')
>>> [p.key for p in prepare("batch", payload, received_at="2026-11-23T10:00:00.000Z")]
[b'user_id:u-1']

Everything a request can get wrong raises :class:`BadRequest` (a 4xx with a reason
code, a readable message and, in a batch, the index of the bad item). Validation
beyond that — required fields, identifier shapes, timestamps — is the worker's job:
it dead-letters a bad event with a reason instead of losing it.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

from schemas.codec import JSONDecodeError, dumps, loads
from schemas.errors import StreamCDPError
from schemas.events import EVENT_TYPES, MAX_DEPTH
from schemas.identifiers import collect_identifiers, normalize_id, normalize_type

#: Segment's documented limit per message ("32 KB"). The SDKs measure 32 << 10.
#: Checked on the message as the client sent it (compact JSON, before the collector
#: adds ``messageId``/``receivedAt``).
MAX_MESSAGE_BYTES = 32 * 1024
#: Segment's documented limit per batch request ("500 KB"); its Python SDK keeps
#: batches under 475,000 bytes, so 500,000 accepts everything an SDK sends. Applies
#: to the body after decompression, on every route.
MAX_BODY_BYTES = 500_000

#: The deepest nesting the JSON encoder writes (orjson; it reads up to 1024): a
#: message nested deeper is refused, the worker would refuse it anyway (MAX_DEPTH).
MAX_WRITE_DEPTH = 254

#: Route name → message type; ``"batch"`` carries a list of typed messages.
KINDS = (*sorted(EVENT_TYPES), "batch")

_TYPES_TEXT = ", ".join(sorted(EVENT_TYPES))
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer
_ZLIB_WBITS = zlib.MAX_WBITS  # "deflate" in HTTP means the zlib format (RFC 9110)


class BadRequest(StreamCDPError):
    """A request the collector refuses; the SDK drops it (it does not retry a 4xx).

    ``code`` is machine-readable (``invalid_json``, ``message_too_large``, ...),
    ``status`` the HTTP status, ``index`` the position of the bad item in a batch.
    """

    def __init__(self, code: str, message: str, *, status: int = 400, index: int | None = None) -> None:
        super().__init__(code, message, status, index)
        self.code = code
        self.message = message
        self.status = status
        self.index = index

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class Prepared:
    """One message ready for Kafka: partition key and JSON value."""

    key: bytes | None
    value: bytes


# ------------------------------------------------------------------------ body


def decode_body(raw: bytes, content_encoding: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, decompressed; :class:`BadRequest` if it is (or inflates to) more than ``limit`` bytes.

    Decompression stops at ``limit + 1`` bytes, so a gzip bomb costs at most that
    much memory.

    >>> import gzip
    >>> decode_body(gzip.compress(b'{"a":1}'), "gzip")
    b'{"a":1}'
    >>> decode_body(gzip.compress(b" " * 1000), "gzip", limit=100)
    Traceback (most recent call last):
    ...
    streamcdp.collector.messages.BadRequest: body_too_large: the body inflates to more than 100 bytes; the limit is 100 bytes per request
    """
    encoding = (content_encoding or "identity").strip().lower()
    if len(raw) > limit:
        raise body_too_large(f"the body is {len(raw)} bytes", limit)
    if encoding == "identity":
        return raw
    if encoding in ("gzip", "x-gzip"):
        wbits = _GZIP_WBITS
    elif encoding == "deflate":
        wbits = _ZLIB_WBITS
    else:
        raise BadRequest(
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or no encoding",
            status=415,
        )
    return _inflate(raw, wbits, encoding, limit)


def _inflate(raw: bytes, wbits: int, encoding: str, limit: int) -> bytes:
    out = bytearray()
    data = raw
    while data:  # a gzip body may hold several members, one after the other
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise BadRequest("invalid_encoding", f"the body is not valid {encoding} data ({exc})") from None
        if len(out) > limit:
            raise body_too_large(f"the body inflates to more than {limit} bytes", limit)
        if not inflater.eof:
            raise BadRequest("invalid_encoding", f"the {encoding} body is truncated")
        data = inflater.unused_data if wbits == _GZIP_WBITS else b""
    return bytes(out)


def body_too_large(detail: str, limit: int = MAX_BODY_BYTES) -> BadRequest:
    """The error for a body above ``limit`` bytes; ``detail`` says how big it is."""
    return BadRequest("body_too_large", f"{detail}; the limit is {limit} bytes per request")


def parse_payload(body: bytes) -> dict:
    """The body as a JSON object; :class:`BadRequest` for anything else.

    >>> parse_payload(b'[1]')
    Traceback (most recent call last):
    ...
    streamcdp.collector.messages.BadRequest: not_an_object: the body must be a JSON object, got an array
    """
    if not body.strip():
        raise BadRequest("invalid_json", "the body is empty; send a JSON object")
    try:
        payload = loads(body)
    except JSONDecodeError as exc:
        raise BadRequest("invalid_json", f"the body is not valid JSON: {exc}") from None
    if type(payload) is not dict:
        raise BadRequest("not_an_object", f"the body must be a JSON object, got {_json_type(payload)}")
    return payload


def body_write_key(payload: dict) -> str | None:
    """The ``writeKey`` field analytics.js (and the Segment SDK) put in the body."""
    key = payload.get("writeKey")
    return key if type(key) is str and key else None


# -------------------------------------------------------------------- messages


def received_at(now: datetime | None = None) -> str:
    """``receivedAt`` as the Segment Spec writes it: UTC, milliseconds, ``Z``.

    >>> received_at(datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=timezone.utc))
    '2026-11-23T10:00:00.123Z'
    """
    moment = now if now is not None else datetime.now(timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def prepare(
    kind: str,
    payload: dict,
    *,
    received_at: str,
    default_region: str = "US",
    channel_note: str | None = None,
) -> list[Prepared]:
    """Turn the body of a ``kind`` request into Kafka records, in order.

    ``kind`` is ``"batch"`` or a message type (from the route, which then sets
    ``type``). Each message loses a ``writeKey`` field, gets a ``messageId`` (uuid4)
    and ``receivedAt`` when it has none, inherits the batch's top-level ``context``
    and ``integrations`` (its own keys win), and gets ``context.channel =
    channel_note`` when given and it has no channel of its own.
    """
    if kind == "batch":
        items = payload.get("batch")
        if type(items) is not list:
            raise BadRequest("invalid_batch", "'batch' must be an array of messages")
        shared = {
            name: value
            for name in ("context", "integrations")
            if type(value := payload.get(name)) is dict and value
        }
        for index, item in enumerate(items):
            _check_item(item, index)
        return [
            _prepare_one(item, index, shared, received_at, default_region, channel_note)
            for index, item in enumerate(items)
        ]
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown route kind {kind!r}")  # a programming error, not input
    payload["type"] = kind
    return [_prepare_one(payload, None, {}, received_at, default_region, channel_note)]


def _check_item(item: object, index: int) -> None:
    if type(item) is not dict:
        raise BadRequest(
            "invalid_message", f"batch[{index}] must be a JSON object, got {_json_type(item)}", index=index
        )
    event_type = item.get("type")
    if type(event_type) is not str or event_type not in EVENT_TYPES:
        what = "has no 'type'" if event_type is None else f"has unknown type {str(event_type)[:40]!r}"
        raise BadRequest("unknown_type", f"batch[{index}] {what}; expected one of {_TYPES_TEXT}", index=index)


def _prepare_one(
    message: dict,
    index: int | None,
    shared: dict,
    received: str,
    default_region: str,
    channel_note: str | None,
) -> Prepared:
    message.pop("writeKey", None)
    for name, value in shared.items():
        own = message.get(name)
        if own is None:
            message[name] = value
        elif type(own) is dict:
            message[name] = {**value, **own}
    added = 0  # bytes the collector adds, not counted against the client's limit
    if not message.get("messageId"):
        message["messageId"] = str(uuid.uuid4())
        added += _field_bytes("messageId", message["messageId"])
    if not message.get("receivedAt"):
        message["receivedAt"] = received
        added += _field_bytes("receivedAt", received)
    if channel_note is not None:
        context = message.get("context")
        if context is None:
            message["context"] = {"channel": channel_note}
        elif type(context) is dict and "channel" not in context:
            message["context"] = {**context, "channel": channel_note}
    try:
        value = dumps(message)
    except TypeError:  # orjson writes at most 254 levels of nesting (it reads 1024)
        where = "the message" if index is None else f"batch[{index}]"
        raise BadRequest(
            "too_deep",
            f"{where} nests objects/arrays more than {MAX_WRITE_DEPTH} levels deep"
            f" (the worker accepts {MAX_DEPTH})",
            index=index,
        ) from None
    size = len(value) - added
    if size > MAX_MESSAGE_BYTES:
        where = "the message" if index is None else f"batch[{index}]"
        raise BadRequest(
            "message_too_large",
            f"{where} is {size} bytes; the limit is {MAX_MESSAGE_BYTES} bytes (32 KB) per message",
            index=index,
        )
    return Prepared(partition_key(message, default_region), value)


def _field_bytes(name: str, value: str) -> int:
    # ',"name":"value"' in compact JSON (ids and timestamps need no escaping)
    return len(name) + len(value) + 6


# ---------------------------------------------------------------- partitioning


def partition_key(message: dict, default_region: str = "US") -> bytes | None:
    """The Kafka key: the message's best identifier as ``type:value``, else ``None``.

    ``userId`` first, then ``anonymousId`` (so a browser's events before and after
    sign-in stay on one partition as long as it sends one), then email, phone,
    external ids, device id and ``previousId`` in the order of
    :data:`schemas.identifiers.IDENTIFIER_PRIORITY`. Values are normalised like the
    worker normalises them. ``None`` lets the producer spread the message; the
    worker dead-letters it when it has no identifier at all.

    >>> partition_key({"userId": " u-17 ", "anonymousId": "a-9"})
    b'user_id:u-17'
    >>> partition_key({"traits": {"email": "Ann@Example.com"}})
    b'email:ann@example.com'
    """
    for field, id_type in (("userId", "user_id"), ("anonymousId", "anonymous_id")):
        value = message.get(field)
        if type(value) is int:
            value = str(value)
        if type(value) is str:
            normalised = normalize_id(value)
            if normalised is not None:
                return f"{id_type}:{normalised}".encode()
    found = collect_identifiers(_other_candidates(message), default_region)
    return str(found[0]).encode() if found else None


def _other_candidates(message: dict) -> list[tuple[str, object]]:
    candidates: list[tuple[str, object]] = []
    context = message.get("context")
    context = context if type(context) is dict else {}
    for traits in (message.get("traits"), context.get("traits")):
        if type(traits) is dict:
            candidates.extend((name, traits[name]) for name in ("email", "phone") if name in traits)
    external = context.get("externalIds")
    if type(external) is list:
        for item in external:
            if type(item) is dict and (id_type := normalize_type(item.get("type"))) is not None:
                candidates.append((id_type, item.get("id")))
    device = context.get("device")
    if type(device) is dict and "id" in device:
        candidates.append(("device_id", device["id"]))
    if "previousId" in message:
        candidates.append(("previous_id", message["previousId"]))
    return candidates


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "a boolean"
    if type(value) in (int, float):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)
