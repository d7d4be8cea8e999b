"""event.schema.json and parse_event must agree: one corpus, two judges.

Every case runs through both ``parse_event`` and ``jsonschema`` (draft 2020-12)
against ``schemas/json/event.schema.json``. Where JSON Schema can decide (types,
required fields, patterns, lengths) the two verdicts must be equal. Rules JSON
Schema cannot state well (size, depth, "at least one usable identifier", email and
phone validity, calendar-valid dates, 64-bit integers) are marked ``BEYOND`` and left
out of the comparison, not out of the corpus: for those the schema must accept
and parse_event must reject, which is exactly what the schema's description says.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from schemas.errors import InvalidEvent
from schemas.events import (
    DATE_TIME_PATTERN,
    EVENT_TYPES,
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    MAX_TRAIT_NAME_LENGTH,
    TRAIT_NAME_FORBIDDEN,
    RejectReason,
    parse_event,
)
from schemas.identifiers import MAX_ID_LENGTH, MAX_TYPE_LENGTH

SCHEMA = orjson.loads(resources.files("schemas").joinpath("json/event.schema.json").read_bytes())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)

BEYOND = "beyond JSON Schema"  # marks cases whose verdict the schema cannot reach


@dataclass(frozen=True)
class Case:
    name: str
    document: Any  # a JSON value (dumped with orjson) or raw bytes
    valid: bool
    beyond_schema: bool = False

    @property
    def raw(self) -> bytes:
        return self.document if isinstance(self.document, bytes) else orjson.dumps(self.document)


def ok(name: str, document: Any) -> Case:
    return Case(name, document, True)


def bad(name: str, document: Any, beyond: str | None = None) -> Case:
    return Case(name, document, False, beyond_schema=beyond == BEYOND)


LIB_SEGMENT = {"library": {"name": "analytics-python", "version": "2.4.0"}}
LIB_RUDDER = {"library": {"name": "rudder-analytics-python", "version": "2.1.9"}}


def seg(event_type: str, **fields: Any) -> dict:
    """A message shaped like segment-analytics-python 2.4 output."""
    message = {
        "integrations": {},
        "anonymousId": None,
        "timestamp": "2026-11-23T00:54:07.003+00:00",
        "context": dict(LIB_SEGMENT),
        "type": event_type,
        "messageId": "0d1b5a5c-53f5-4c6c-9e0b-1c2f7f8f4a11",
    }
    message.update(fields)
    return message


def rudder(event_type: str, **fields: Any) -> dict:
    """A message shaped like rudder-sdk-python 2.1.9 output."""
    message = {
        "integrations": {"All": True},
        "anonymousId": "a-78",
        "timestamp": "2026-11-23T00:54:08.266051+00:00",
        "context": dict(LIB_RUDDER),
        "type": event_type,
        "messageId": "6c7d8e9f-0a1b-4c2d-9e3f-4a5b6c7d8e77",
        "channel": "server",
    }
    message.update(fields)
    return message


def deep(depth: int) -> dict:
    inner: Any = 1
    for _ in range(depth - 1):
        inner = {"a": inner}
    return {"type": "track", "event": "x", "userId": "u", "properties": inner}


CORPUS: list[Case] = [
    # --- valid: real SDK shapes of every type
    ok("spec example", {
        "type": "track", "messageId": "m-1", "timestamp": "2026-11-20T10:00:00Z", "userId": "u-17",
        "anonymousId": "a-9", "event": "Order Completed",
        "properties": {"order_id": "o1", "total": 129.5, "currency": "EUR",
                       "products": [{"sku": "s1", "category": "baby", "price": 40}]},
        "context": {"channel": "pos", "traits": {"email": "Ann@Example.com"},
                    "externalIds": [{"id": "L-1", "type": "loyalty_id"}],
                    "consent": {"categoryPreferences": {"marketing": True}}}}),
    ok("segment track", seg("track", userId="u-42", event="Subscription Started", properties={"plan": "pro"})),
    ok("segment identify", seg("identify", userId="u-42", traits={"email": "bob@example.org", "phone": "4155550199"})),
    ok("segment page", seg("page", userId=None, anonymousId="a-77", name="Strollers", category=None, properties={})),
    ok("segment page without name", seg("page", userId="u-42", name=None, category=None, properties={})),
    ok("segment screen", seg("screen", userId="u-42", name="Home", category=None, properties={})),
    ok("segment group", seg("group", userId="u-42", groupId="acme", traits={"name": "Acme"})),
    ok("segment alias", seg("alias", userId="u-42", previousId="a-77")),
    ok("rudder track", rudder("track", userId=None, event="Product Viewed", properties={"sku": "s1"})),
    ok("rudder identify", rudder("identify", userId="u-43",
                                 context={**LIB_RUDDER, "traits": {"email": "carol@example.net"}})),
    ok("rudder page", rudder("page", userId="u-43", name="Home", category=None, properties={})),
    ok("rudder screen", rudder("screen", userId="u-43", name="Settings", properties={})),
    ok("rudder group", rudder("group", userId="u-43", groupId="g-9", traits={})),
    ok("rudder alias", rudder("alias", userId="u-43", previousId="a-78")),
    ok("analytics.js style", {
        "type": "page", "anonymousId": "5c1f2a3b", "originalTimestamp": "2026-11-20T10:00:00.123Z",
        "sentAt": "2026-11-20T10:00:00.456Z", "receivedAt": "2026-11-20T10:00:01.000Z",
        "context": {"page": {"path": "/"}, "userAgent": "Mozilla/5.0", "device": {"id": "d-1", "type": "ios"}},
        "properties": {"path": "/"}, "_metadata": {"bundled": ["Segment.io"]}}),
    ok("only a device id", {"type": "screen", "context": {"device": {"id": "idfa-1"}}}),
    ok("only an external id", {"type": "identify", "context": {"externalIds": [
        {"id": "L-1", "type": "loyalty_id", "collection": "users", "encoding": "none"}]}}),
    ok("only a valid email", {"type": "identify", "traits": {"email": "ann@example.com"}}),
    ok("only a phone", {"type": "identify", "context": {"traits": {"phone": "+44 20 7946 0958"}}}),
    ok("nulls everywhere optional", {"type": "track", "event": "x", "userId": "u", "anonymousId": None,
                                     "messageId": None, "groupId": None, "properties": None, "traits": None,
                                     "context": None, "integrations": None, "timestamp": None}),
    ok("naive timestamp", {"type": "track", "event": "x", "userId": "u", "timestamp": "2026-11-20T10:00:00"}),
    ok("nanosecond timestamp", {"type": "track", "event": "x", "userId": "u",
                                "timestamp": "2026-11-20T10:00:00.123456789Z"}),
    ok("id of exactly 256 characters", {"type": "track", "event": "x", "userId": "u" * MAX_ID_LENGTH}),
    ok("unknown extra fields", {"type": "track", "event": "x", "userId": "u", "version": 2, "writeKey": "k"}),
    ok("event field ignored on identify", {"type": "identify", "userId": "u", "event": 5}),
    ok("name field ignored on track", {"type": "track", "event": "x", "userId": "u", "name": 5}),
    ok("blank userId with anonymousId", {"type": "track", "event": "x", "userId": " ", "anonymousId": "a"}),
    ok("depth exactly 32", deep(MAX_DEPTH)),
    # --- trait names (every level of nested objects in traits / context.traits)
    ok("nested traits", {"type": "identify", "userId": "u",
                         "traits": {"address": {"city": "Berlin", "geo": {"lat": 52.5}}, "plan": None}}),
    ok("trait names with spaces, dashes, unicode, inner $", {"type": "identify", "userId": "u", "traits": {
        "First Name": "Ann", "loyalty-tier": "gold", "prénom": "Ann", "名前": "x", "price$": 1, "a\u00a0b": 2}}),
    ok("trait name of exactly 128 characters", {"type": "identify", "userId": "u",
                                                "traits": {"t" * MAX_TRAIT_NAME_LENGTH: 1}}),
    ok("objects inside trait arrays are values", {"type": "identify", "userId": "u",
                                                  "traits": {"children": [{"first.name": "Bo", "$x": 1, "": 2}]}}),
    ok("dotted names in properties are fine", {"type": "track", "event": "x", "userId": "u",
                                               "properties": {"a.b": 1, "$c": 2, "": 3}}),
    # --- invalid, decidable by the schema
    bad("missing type", {"event": "x", "userId": "u"}),
    bad("unknown type", {"type": "foo", "userId": "u"}),
    bad("type as number", {"type": 1, "userId": "u"}),
    bad("userId as number", seg("track", userId=42, event="x")),
    bad("anonymousId as object", {"type": "track", "event": "x", "anonymousId": {"id": "a"}}),
    bad("messageId as number", {"type": "track", "event": "x", "userId": "u", "messageId": 7}),
    bad("userId too long", {"type": "track", "event": "x", "userId": "u" * (MAX_ID_LENGTH + 1)}),
    bad("track without event", seg("track", userId="u-42")),
    bad("track with empty event", {"type": "track", "event": "", "userId": "u"}),
    bad("track with blank event", {"type": "track", "event": " \t", "userId": "u"}),
    bad("track with event null", {"type": "track", "event": None, "userId": "u"}),
    bad("page name as number", {"type": "page", "userId": "u", "name": 1}),
    bad("alias without previousId", seg("alias", userId="u-42")),
    bad("alias with blank previousId", seg("alias", userId="u-42", previousId="  ")),
    bad("alias without userId", {"type": "alias", "previousId": "a-1"}),
    bad("alias with null userId", seg("alias", userId=None, previousId="a-1")),
    bad("group without groupId", seg("group", userId="u-42", traits={})),
    bad("group with empty groupId", seg("group", userId="u-42", groupId="")),
    bad("properties as list", {"type": "track", "event": "x", "userId": "u", "properties": []}),
    bad("traits as string", {"type": "identify", "userId": "u", "traits": "vip"}),
    bad("integrations as bool", {"type": "track", "event": "x", "userId": "u", "integrations": True}),
    bad("context as string", {"type": "track", "event": "x", "userId": "u", "context": "web"}),
    bad("context.traits as string", {"type": "track", "event": "x", "userId": "u", "context": {"traits": "vip"}}),
    bad("context.device as list", {"type": "track", "event": "x", "userId": "u", "context": {"device": []}}),
    bad("context.device.id as number", {"type": "track", "event": "x", "context": {"device": {"id": 5}}}),
    bad("externalIds as object", {"type": "identify", "userId": "u", "context": {"externalIds": {}}}),
    bad("externalIds item as string", {"type": "identify", "userId": "u", "context": {"externalIds": ["L-1"]}}),
    bad("externalIds item without type", {"type": "identify", "context": {"externalIds": [{"id": "L-1"}]}}),
    bad("externalIds item without id", {"type": "identify", "userId": "u",
                                        "context": {"externalIds": [{"type": "loyalty_id"}]}}),
    bad("externalIds blank type", {"type": "identify", "userId": "u",
                                   "context": {"externalIds": [{"id": "L", "type": " "}]}}),
    bad("externalIds type with colon", {"type": "identify", "userId": "u",
                                        "context": {"externalIds": [{"id": "L", "type": "x:y"}]}}),
    bad("externalIds type too long", {"type": "identify", "userId": "u",
                                      "context": {"externalIds": [{"id": "L", "type": "t" * (MAX_TYPE_LENGTH + 1)}]}}),
    bad("externalIds encoding as number", {"type": "identify", "userId": "u",
                                           "context": {"externalIds": [{"id": "L", "type": "t", "encoding": 1}]}}),
    bad("timestamp as number", {"type": "track", "event": "x", "userId": "u", "timestamp": 1795168800000}),
    bad("timestamp words", {"type": "track", "event": "x", "userId": "u", "timestamp": "yesterday"}),
    bad("timestamp date only", {"type": "track", "event": "x", "userId": "u", "timestamp": "2026-11-20"}),
    bad("timestamp RFC 2822", {"type": "track", "event": "x", "userId": "u",
                               "timestamp": "Fri, 20 Nov 2026 10:00:00 GMT"}),
    bad("timestamp lower-case z", {"type": "track", "event": "x", "userId": "u",
                                   "timestamp": "2026-11-20T10:00:00z"}),
    bad("sentAt with trailing space", {"type": "track", "event": "x", "userId": "u",
                                       "sentAt": "2026-11-20T10:00:00Z "}),
    bad("trait name with a dot", {"type": "identify", "userId": "u", "traits": {"address.city": "Berlin"}}),
    bad("nested trait name with a dot", {"type": "identify", "userId": "u",
                                         "traits": {"address": {"geo": {"lat.deg": 52}}}}),
    bad("context.traits name with a dot", {"type": "track", "event": "x", "userId": "u",
                                           "context": {"traits": {"a.b": 1}}}),
    bad("trait name starting with $", {"type": "identify", "userId": "u", "traits": {"$set": {"plan": "pro"}}}),
    bad("nested trait name starting with $", {"type": "identify", "userId": "u",
                                              "context": {"traits": {"address": {"$city": "Oslo"}}}}),
    bad("empty trait name", {"type": "identify", "userId": "u", "traits": {"": 1}}),
    bad("trait name too long", {"type": "identify", "userId": "u", "traits": {"t" * (MAX_TRAIT_NAME_LENGTH + 1): 1}}),
    bad("trait name with a newline", {"type": "identify", "userId": "u", "traits": {"plan\nx": 1}}),
    bad("trait name ending in a newline", {"type": "identify", "userId": "u", "traits": {"plan\n": 1}}),
    bad("trait name with a tab", {"type": "identify", "userId": "u", "traits": {"\tplan": 1}}),
    bad("trait name with NUL", {"type": "identify", "userId": "u", "traits": {"a\u0000": 1}}),
    bad("trait name with DEL", {"type": "identify", "userId": "u", "traits": {"a\u007fb": 1}}),
    bad("trait name with a C1 control", {"type": "identify", "userId": "u", "traits": {"a\u0085b": 1}}),
    bad("group trait name with a dot", {"type": "group", "userId": "u", "groupId": "g", "traits": {"a.b": 1}}),
    bad("top level array", [{"type": "track", "event": "x", "userId": "u"}]),
    bad("top level string", "track"),
    bad("top level null", None),
    # --- invalid, beyond what JSON Schema can state (kept in the corpus, not compared)
    bad("no identifier at all", {"type": "page", "name": "Home"}, BEYOND),
    bad("only an invalid email", {"type": "identify", "traits": {"email": "ann at example"}}, BEYOND),
    bad("only an invalid phone", {"type": "identify", "traits": {"phone": "call me"}}, BEYOND),
    bad("group traits are the group's", {"type": "group", "groupId": "g", "traits": {"email": "a@b.co"}}, BEYOND),
    bad("impossible calendar date", {"type": "track", "event": "x", "userId": "u",
                                     "timestamp": "2026-02-30T10:00:00Z"}, BEYOND),
    bad("depth 33", deep(MAX_DEPTH + 1), BEYOND),
    bad("over 32 KiB", {"type": "track", "event": "x", "userId": "u",
                        "properties": {"blob": "x" * MAX_EVENT_BYTES}}, BEYOND),
    bad("integer beyond 64 bits", b'{"type":"track","event":"x","userId":"u","properties":{"n":123456789012345678901234}}',
        BEYOND),
]


def _code_verdict(case: Case) -> tuple[bool, InvalidEvent | None]:
    try:
        parse_event(case.raw, channel="web", fallback_timestamp_ms=0)
    except InvalidEvent as error:
        return False, error
    return True, None


def _schema_errors(case: Case) -> list[str]:
    instance = orjson.loads(case.raw) if not isinstance(case.document, bytes) else _lossless(case.raw)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in VALIDATOR.iter_errors(instance)]


def _lossless(raw: bytes) -> Any:
    return json.loads(raw)  # the stdlib keeps big integers exact


def test_corpus_is_large_and_mixed() -> None:
    assert len(CORPUS) >= 40
    assert len({case.name for case in CORPUS}) == len(CORPUS)
    valid_types = {case.document["type"] for case in CORPUS if case.valid}
    assert valid_types == EVENT_TYPES
    assert sum(case.valid for case in CORPUS) >= 20
    assert sum(not case.valid and not case.beyond_schema for case in CORPUS) >= 20


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_parse_event_and_schema_agree(case: Case) -> None:
    code_valid, error = _code_verdict(case)
    assert code_valid == case.valid, f"parse_event: expected valid={case.valid}, got {error}"
    schema_errors = _schema_errors(case)
    if case.beyond_schema:
        # The schema cannot say it, so it accepts; parse_event is the stricter judge.
        assert not schema_errors, schema_errors
        assert error is not None and error.reason in {
            RejectReason.NO_IDENTIFIER,
            RejectReason.INVALID_IDENTIFIER,
            RejectReason.SCHEMA_VIOLATION,
            RejectReason.TOO_DEEP,
            RejectReason.OVERSIZE,
            RejectReason.INVALID_JSON,
        }
        return
    assert (not schema_errors) == case.valid, (
        f"schema says {'valid' if not schema_errors else schema_errors}, parse_event says "
        f"{'valid' if code_valid else error}"
    )


def test_trait_name_verdicts_carry_the_new_reason() -> None:
    for case in CORPUS:
        if "trait name" in case.name and not case.valid:
            _, error = _code_verdict(case)
            assert error is not None and error.reason is RejectReason.INVALID_TRAIT_NAME, case.name


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_constants_match_the_code() -> None:
    defs = SCHEMA["$defs"]
    assert set(SCHEMA["properties"]["type"]["enum"]) == EVENT_TYPES
    assert defs["dateTime"]["pattern"] == DATE_TIME_PATTERN
    assert defs["optionalId"]["maxLength"] == MAX_ID_LENGTH
    assert defs["externalId"]["properties"]["id"]["maxLength"] == MAX_ID_LENGTH
    assert defs["externalId"]["properties"]["type"]["maxLength"] == MAX_TYPE_LENGTH
    assert defs["traitName"]["maxLength"] == MAX_TRAIT_NAME_LENGTH
    assert defs["traitName"]["not"]["pattern"] == TRAIT_NAME_FORBIDDEN
    for traits in (SCHEMA["properties"]["traits"], SCHEMA["properties"]["context"]["properties"]["traits"]):
        assert traits["$ref"] == "#/$defs/traits"
    description = SCHEMA["description"]
    assert str(MAX_EVENT_BYTES) in description and f"{MAX_DEPTH} levels" in description


def test_schema_examples_pass_both_judges() -> None:
    for example in SCHEMA["examples"]:
        assert VALIDATOR.is_valid(example)
        parse_event(orjson.dumps(example), channel="pos", fallback_timestamp_ms=0)


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-20T10:00:00Z",
        "2026-11-23T00:54:07.003+00:00",
        "2026-11-23T00:54:08.266051+00:00",
        "2026-11-20 10:00",
        "2026-11-20T10:00:00-0530",
        "2026-11-20T10:00:00+01",
    ],
)
def test_date_time_pattern_accepts_what_sdks_send(value: str) -> None:
    assert re.search(DATE_TIME_PATTERN, value)
