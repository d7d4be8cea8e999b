"""Bad input for the fuzz tests (hypothesis strategies): random bytes, and valid
events mutated the ways producers get them wrong: fields dropped or replaced,
wrong types, huge strings, deep nesting, unicode oddities, NaN/Infinity and
integers beyond 64 bits, bad timestamps, bad identifiers, truncated or corrupted
bytes. Pure (no I/O); used by ``tests/unit/test_fuzz_*.py`` and
``tests/integration/test_fuzz.py``.

Every strategy is bounded in size; the tests run them derandomized with a fixed
number of examples (:data:`FUZZ`), so a run is reproducible and bounded in time.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from streamcdp.generate import generate_events
from tests.conftest import identify, track

#: Reproducible and bounded: the same examples every run, no example database,
#: no per-example deadline (the machine is shared), no shrinking needed to report.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(examples: int) -> settings:
    """:data:`FUZZ` with ``examples`` examples."""
    return settings(FUZZ, max_examples=examples)


def _base_events() -> list[dict]:
    """Valid events of every type and shape the product accepts."""
    generated = [value for _, value in generate_events(80, seed=11, people=12) if isinstance(value, dict)]
    by_hand = [
        track(userId="u-1", event="Order Completed", properties={"total": 12.5, "currency": "EUR", "products": [{"sku": "a", "price": 1}]}),
        identify(userId="u-2", traits={"email": "Ann@Example.com", "phone": "+1 415 555 0100", "address": {"city": "Oslo"}}),
        {"type": "page", "anonymousId": "a-1", "name": "Home", "properties": {"url": "https://shop.example/"},
         "timestamp": "2026-11-20T10:00:00+01:00", "context": {"ip": "10.0.0.1"}},
        {"type": "screen", "userId": "u-3", "name": "Basket", "context": {"device": {"id": "dev-9", "type": "ios"}},
         "originalTimestamp": "2026-11-20 10:00:00.123456"},
        {"type": "group", "userId": "u-4", "groupId": "g-1", "traits": {"name": "ACME", "employees": 40}},
        {"type": "alias", "userId": "u-5", "previousId": "a-5", "messageId": "m-alias-5"},
        {"type": "track", "event": "Till Opened", "context": {
            "externalIds": [{"id": "L-77", "type": "loyalty_id", "collection": "users", "encoding": "none"}],
            "traits": {"email": "pos@example.com"}}},
        {"type": "identify", "userId": "u-6", "context": {"traits": {"phone": 4155550100, "consent": {"email": True}}}},
    ]
    return generated + by_hand


BASE_EVENTS: list[dict] = _base_events()

# Fields worth aiming at: the ones parse_event checks, and where identifiers live.
FIELDS = (
    ("type",), ("event",), ("name",), ("userId",), ("anonymousId",), ("previousId",), ("groupId",), ("messageId",),
    ("timestamp",), ("originalTimestamp",), ("sentAt",), ("receivedAt",), ("traits",), ("traits", "email"),
    ("traits", "phone"), ("traits", "address"), ("properties",), ("properties", "total"), ("properties", "currency"),
    ("properties", "products"), ("context",), ("context", "traits"), ("context", "traits", "email"),
    ("context", "device"), ("context", "device", "id"), ("context", "externalIds"), ("integrations",), ("writeKey",),
    ("batch",),
)

HUGE = 40_000  # characters: beyond the 32 KiB message limit once encoded

special_strings = st.sampled_from([
    "", " ", "\t\n", "\u0000", "\u0000abc", "\u200b", "\u202egnp.exe", "\ufeff", "😀" * 20, "Ωμέγα", "日本語のテキスト",
    "a.b", "$set", "x" * 129, "null", "undefined", "NaN", "Infinity", "-0", "1e309", "9" * 30, "💩@example.com",
    "<script>alert(1)</script>", "'; DROP TABLE users; --", "%s%s%n", "../../etc/passwd", "\\", '"', "{}", "[]",
])
bad_timestamps = st.one_of(
    st.sampled_from([
        "2026-02-30T10:00:00Z", "2026-13-01T00:00:00Z", "2026-11-20T24:00:00Z", "2026-11-20T10:61:00Z",
        "0000-01-01T00:00:00Z", "0001-01-01T00:00:00-14:00", "9999-12-31T23:59:59+14:00", "9999-12-31T23:59:59.999999999-23:59",
        "2026-11-20T10:00:00+99:99", "2026-11-20T10:00:00+24:00", "2026-11-20", "10:00:00", "2026-11-20T10:00:00.1234567890Z",
        "2026-11-20T10:00:00ZZ", "2026-11-20t10:00:00z", "1700000000", "now", "", "2026-11-20T10:00:00+0530",
        "2026-11-20 10:00", "１２３４-05-06T07:08:09Z", "2026-11-20T10:00:00\n",
    ]),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet="0123456789-T:Z.+ ", max_size=30),
)
bad_identifiers = st.one_of(
    st.sampled_from([
        "not-an-email", "@example.com", "ann@", "ann@@example.com", "ann@example", "ann@ex ample.com", "ANN@EXAMPLE.COM",
        " ann@example.com ", "ann+tag@example.co.uk", "ä@ü.de", "a" * 300 + "@example.com", "+1", "+999999999999999999",
        "555-0100", "+44 20 7946 0958", "0049 30 123456", "phone", "+1 (415) 555-0100 ext. 7", "0", "-1",
    ]),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.text(max_size=40),
)


def nested(depth: int, leaf: Any = 1) -> Any:
    value: Any = leaf
    for level in range(depth):
        value = {"n": value} if level % 2 else [value]
    return value


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 64 bits too
    st.floats(allow_nan=True, allow_infinity=True),  # NaN/Infinity: not JSON, sent anyway
    st.text(max_size=30),
    special_strings,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12) | special_strings, inner, max_size=4),
    max_leaves=12,
)
odd_values = st.one_of(
    json_values,
    bad_timestamps,
    bad_identifiers,
    st.integers(min_value=1, max_value=HUGE).map(lambda n: "x" * n),
    st.integers(min_value=10, max_value=600).map(nested),
    st.dictionaries(special_strings | st.text(max_size=5), json_scalars, min_size=1, max_size=6),
    st.lists(st.fixed_dictionaries({"id": bad_identifiers, "type": special_strings | st.text(max_size=8)}), max_size=3),
)


def encode(value: Any, ascii_only: bool = False) -> bytes:
    """JSON as a sloppy producer writes it: NaN/Infinity and big integers included.
    Lone surrogates, which no encoder writes as UTF-8, become replacement marks
    (ASCII-only output keeps them as \\ud800 escapes)."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "replace")


def deep_bytes(depth: int) -> bytes:
    """A track event whose properties nest ``depth`` levels (beyond what Python's
    own encoder can write, up to past orjson's 1024 limit)."""
    return (b'{"type":"track","event":"Deep","userId":"u-deep","properties":{"d":'
            + b"[" * depth + b"1" + b"]" * depth + b"}}")


def _paths(value: Any, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    """Key paths in a JSON value (objects only, a few levels)."""
    found = []
    if isinstance(value, dict) and depth < 4:
        for key, inner in value.items():
            found.append((*prefix, key))
            found.extend(_paths(inner, (*prefix, key), depth + 1))
    return found


def _set(event: dict, path: tuple, value: Any) -> None:
    node = event
    for key in path[:-1]:
        inner = node.get(key)
        if not isinstance(inner, dict):
            inner = node[key] = {}
        node = inner
    node[path[-1]] = value


def _drop(event: dict, path: tuple) -> None:
    node = event
    for key in path[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


@st.composite
def mutated_events(draw) -> dict:
    """A valid event with one to four fields dropped, replaced or added."""
    event = copy.deepcopy(draw(st.sampled_from(BASE_EVENTS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        existing = _paths(event)
        path = draw(st.sampled_from(list(FIELDS) + existing)) if existing else draw(st.sampled_from(FIELDS))
        action = draw(st.sampled_from(("drop", "set", "set", "add")))
        if action == "drop":
            _drop(event, path)
        elif action == "set":
            _set(event, path, draw(odd_values))
        else:
            _set(event, (*path[:-1], draw(special_strings | st.text(max_size=10))), draw(odd_values))
    return event


@st.composite
def corrupted_bytes(draw) -> bytes:
    """A valid (or mutated) event's bytes, then truncated, spliced or bit-flipped."""
    raw = bytearray(encode(draw(st.sampled_from(BASE_EVENTS) | mutated_events())))
    kind = draw(st.sampled_from(("truncate", "insert", "flip", "latin1", "tokens")))
    if not raw:
        return b""
    at = draw(st.integers(min_value=0, max_value=len(raw) - 1))
    if kind == "truncate":
        return bytes(raw[:at])
    if kind == "insert":
        return bytes(raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:])
    if kind == "flip":
        raw[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        return bytes(raw)
    if kind == "latin1":
        return bytes(raw).replace(b'"type"', b'"\xe9type"', 1)
    token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"123456789012345678901234567890", b"null"]))
    return bytes(raw).replace(b"1", token, 1) if b"1" in raw else bytes(raw) + token


def event_bytes() -> st.SearchStrategy[bytes]:
    """What may arrive as a Kafka record value: random bytes, valid events, mutated
    events (sometimes ASCII-escaped), corrupted bytes, odd top-level JSON."""
    return st.one_of(
        st.binary(max_size=200),
        st.sampled_from(BASE_EVENTS).map(encode),
        mutated_events().map(encode),
        st.tuples(mutated_events(), st.booleans()).map(lambda pair: encode(*pair)),
        corrupted_bytes(),
        st.integers(min_value=25, max_value=1_500).map(deep_bytes),
        json_values.map(encode),
        st.sampled_from([b"", b" ", b"\n\t ", b"{}", b"[]", b"null", b"0", b'"x"', b"\xef\xbb\xbf{}", b"\x00" * 10]),
    )


@st.composite
def request_bodies(draw) -> tuple[str, bytes, dict[str, str]]:
    """(route, body, extra headers) for the collector: batches and single messages,
    valid, mutated or random, sometimes gzip-compressed or with odd encodings."""
    import gzip

    route = draw(st.sampled_from(["/v1/batch", "/batch", "/v1/b", "/v1/track", "/v1/identify", "/v1/page", "/v1/screen",
                                  "/v1/group", "/v1/alias", "/t", "/v1/i"]))
    if route in ("/v1/batch", "/batch", "/v1/b"):
        items = draw(st.lists(st.sampled_from(BASE_EVENTS) | mutated_events() | json_values, max_size=6))
        body: Any = {"batch": items}
        if draw(st.booleans()):
            body["context"] = draw(odd_values)
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            body = draw(json_values)  # not even a batch
    else:
        body = draw(st.sampled_from(BASE_EVENTS) | mutated_events() | json_values)
    raw = encode(body, ascii_only=draw(st.booleans()))
    shape = draw(st.sampled_from(("json", "json", "json", "raw", "corrupt", "gzip", "bad-gzip", "odd-encoding")))
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "text/plain;charset=UTF-8", "application/octet-stream"]))}
    if shape == "raw":
        raw = draw(st.binary(max_size=300))
    elif shape == "corrupt":
        raw = draw(corrupted_bytes())
    elif shape == "gzip":
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    elif shape == "bad-gzip":
        raw = gzip.compress(raw)[: draw(st.integers(min_value=0, max_value=20))]
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate"]))
    elif shape == "odd-encoding":
        headers["Content-Encoding"] = draw(st.sampled_from(["br", "compress", "identity", " GZIP ", "x-gzip,gzip"]))
    return route, raw, headers


def corpus(strategy: st.SearchStrategy, examples: int) -> list:
    """``examples`` values of ``strategy``, the same on every run (hypothesis,
    derandomized): for tests that send them somewhere in one go."""
    found: list = []

    @settings(FUZZ, max_examples=examples, phases=[Phase.generate])
    @given(strategy)
    def collect(value):
        found.append(value)

    collect()
    return found
