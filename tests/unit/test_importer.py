"""``streamcdp import``, the parts without Kafka: reading CSV/JSONL rows and turning
each into an identify event (or a reported error)."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import orjson
import pytest

from schemas.events import parse_event
import streamcdp.importer
from streamcdp.importer import (
    Built,
    Failed,
    ImportFileError,
    build_event,
    detect_format,
    file_digest,
    prepare,
    read_rows,
    topic_for,
)

HASH = "0123456789abcdef" * 2
NOW_ISO = "2026-11-20T10:00:00.000Z"


def build(row: dict, line: int = 2, **kwargs) -> Built | Failed:
    return build_event(row, line=line, file_hash=HASH, channel="crm", now_iso=NOW_ISO, now_ms=1_795_168_800_000, **kwargs)


def event_of(built: Built) -> dict:
    assert isinstance(built, Built), built
    return orjson.loads(built.value)


# ------------------------------------------------------------------ row → event


def test_identifier_columns_map_to_the_segment_fields():
    built = build({
        "user_id": " u-17 ", "email": "Ann@Example.com", "phone": "+1 415 555 0100",
        "external_id.crm_id": "C-1", "external_id.Loyalty ID": "L-9", "plan": "gold",
    })
    event = event_of(built)
    assert event["type"] == "identify"
    assert event["userId"] == "u-17"
    assert event["traits"] == {"email": "Ann@Example.com", "phone": "+1 415 555 0100", "plan": "gold"}
    assert event["context"]["externalIds"] == [{"id": "C-1", "type": "crm_id"}, {"id": "L-9", "type": "loyalty_id"}]
    assert "anonymousId" not in event
    assert built.key == b"user_id:u-17"  # the strongest identifier
    assert not built.for_matching


def test_every_event_passes_the_ingest_gate_with_its_identifiers():
    built = build({"email": "ann@example.com", "external_id.crm_id": "C-1"})
    parsed = parse_event(built.value, channel="crm", fallback_timestamp_ms=0)
    assert [str(i) for i in parsed.identifiers] == ["email:ann@example.com", "crm_id:C-1"]
    assert parsed.channel == "crm"


def test_message_id_is_deterministic_per_file_and_line():
    first, again, other_line = build({"email": "a@example.com"}), build({"email": "a@example.com"}), build({"email": "a@example.com"}, line=3)
    assert event_of(first)["messageId"] == event_of(again)["messageId"] == f"import-{HASH[:20]}-2"
    assert event_of(other_line)["messageId"] != event_of(first)["messageId"]


def test_timestamp_column_is_the_event_time_else_now():
    assert event_of(build({"email": "a@example.com"}))["timestamp"] == NOW_ISO
    event = event_of(build({"email": "a@example.com", "timestamp": "2025-01-02T03:04:05Z"}))
    assert event["timestamp"] == "2025-01-02T03:04:05Z" and "timestamp" not in event["traits"]


def test_empty_cells_and_nulls_are_skipped_nested_values_kept():
    event = event_of(build({"email": "a@example.com", "plan": "", "score": None, "address": {"city": "Oslo"}, "tags": ["a", "b"], "vip": True, "n": 3}))
    assert event["traits"] == {"email": "a@example.com", "address": {"city": "Oslo"}, "tags": ["a", "b"], "vip": True, "n": 3}


def test_a_row_without_identifier_but_matchable_fields_gets_an_import_anonymous_id():
    built = build({"first_name": "Ann", "last_name": "Lee", "dob": "1984-03-07"}, line=9)
    event = event_of(built)
    assert event["anonymousId"] == f"import:{HASH[:20]}:9"
    assert built.for_matching and built.key == f"anonymous_id:import:{HASH[:20]}:9".encode()
    assert build({"first_name": "Ann", "last_name": "Lee", "dob": "1984-03-07"}, line=9).value == built.value


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"plan": "gold"}, "no identifier (user_id, email, phone or external_id.<type>) and not enough to match on"),
        ({"first_name": "Ann"}, "not enough to match on"),
        ({"email": "not-an-email"}, "email 'not-an-email' is not a usable email address"),
        ({"phone": "1-800-FLOWERS"}, "phone '1-800-FLOWERS' is not a phone number"),
        ({"user_id": {"id": 1}}, "user_id must be a string"),
        ({"external_id.crm_id": ["x"]}, "external_id.crm_id must be a string"),
        ({"external_id.": "x"}, "write external ids as external_id.<type>"),
        ({"email": "a@example.com", "timestamp": "yesterday"}, "ingest would reject the event: schema_violation at timestamp"),
        ({"user_id": "u" * 300}, "ingest would reject the event"),
        ({"email": "a@example.com", "notes": "x" * 40_000}, "ingest would reject the event: oversize"),
    ],
)
def test_bad_rows_fail_with_a_reason_and_their_line(row, error):
    failed = build(row, line=12)
    assert isinstance(failed, Failed) and failed.line == 12
    assert error in failed.error


def test_numeric_ids_from_jsonl_become_strings():
    event = event_of(build({"user_id": 17, "external_id.crm_id": 42, "phone": 4155550100}))
    assert event["userId"] == "17" and event["context"]["externalIds"] == [{"id": "42", "type": "crm_id"}]
    assert event["traits"]["phone"] == 4155550100


def test_phone_region_applies_to_national_numbers():
    assert isinstance(build({"phone": "020 7946 0958"}), Failed)
    built = build({"phone": "020 7946 0958"}, default_region="GB")
    assert built.key == b"phone:+442079460958"


# ------------------------------------------------------------------ reading files


def test_detect_format():
    assert detect_format("people.CSV", None) == "csv"
    assert detect_format("people.jsonl", None) == "jsonl"
    assert detect_format("people.ndjson", None) == "jsonl"
    assert detect_format("people.txt", "csv") == "csv"
    with pytest.raises(ImportFileError, match=re.escape("--format csv|jsonl")):
        detect_format("people.json", None)
    with pytest.raises(ImportFileError, match="unknown format 'xml'"):
        detect_format("people.csv", "xml")


def test_csv_rows_with_line_numbers_dotted_columns_and_bad_rows(tmp_path: Path):
    path = tmp_path / "people.csv"
    path.write_bytes(
        "\ufeffemail,first_name,address.city,address.postalCode\n"
        "ann@example.com, Ann ,Oslo,0150\n"
        "\n"
        '"bob@example.com","Bob\nby",,\n'
        "cat@example.com,Cat,Rome,00100,extra\n".encode()
        + b"dan@example.com,D\xffn,,\n"
        + b"eve@example.com\n"
    )
    rows = list(read_rows(str(path), "csv"))
    assert rows[0] == (2, {"email": "ann@example.com", "first_name": "Ann", "address": {"city": "Oslo", "postalCode": "0150"}}, None)
    assert rows[1] == (4, {"email": "bob@example.com", "first_name": "Bob\nby"}, None)  # a quoted cell over two lines
    assert rows[2] == (6, None, "the row has 5 cells, the header 4")
    assert rows[3] == (7, None, "the row is not valid UTF-8")
    assert rows[4] == (8, {"email": "eve@example.com"}, None)  # short rows: missing cells are empty
    assert len(rows) == 5


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("email,,plan", "column 2 of the header has no name"),
        ("email,plan,plan", "column 'plan' appears twice"),
        ("email,external_id.", "write external ids as external_id.<type>"),
        ("email,address,address.city", "column 'address' clashes with the nested columns address.*"),
    ],
)
def test_csv_header_errors_fail_the_file(tmp_path: Path, header, message):
    path = tmp_path / "bad.csv"
    path.write_text(header + "\nann@example.com,x,y\n")
    with pytest.raises(ImportFileError, match=re.escape(message)):
        list(read_rows(str(path), "csv"))


def test_empty_csv_fails_the_file(tmp_path: Path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ImportFileError, match="needs a header row"):
        list(read_rows(str(path), "csv"))


def test_jsonl_rows_keep_types_and_report_bad_lines(tmp_path: Path):
    path = tmp_path / "people.jsonl"
    path.write_bytes(b'{"email":"a@example.com","n":1,"address":{"city":"Oslo"}}\n\nnot json\n[1]\n{"email":"b@example.com"}')
    rows = list(read_rows(str(path), "jsonl"))
    assert rows[0] == (1, {"email": "a@example.com", "n": 1, "address": {"city": "Oslo"}}, None)
    assert rows[1][0] == 3 and rows[1][1] is None and rows[1][2].startswith("not valid JSON")
    assert rows[2] == (4, None, "a line must be a JSON object, got list")
    assert rows[3] == (5, {"email": "b@example.com"}, None)


def test_prepare_hashes_the_content(tmp_path: Path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(b'{"email":"a@example.com"}\n')
    second.write_bytes(b'{"email":"a@example.com"}\n')
    fmt, digest, rows = prepare(str(first), None, "crm", now_ms=0)
    _, same, rows_again = prepare(str(second), None, "crm", now_ms=0)
    assert fmt == "jsonl" and digest == same == file_digest(str(second))
    assert [r.value for r in rows] == [r.value for r in rows_again]
    with pytest.raises(ImportFileError, match="file not found"):
        prepare(str(tmp_path / "missing.csv"), None, "crm")


def test_topic_for_checks_the_channel():
    assert topic_for("crm") == "cdp.events.crm"
    with pytest.raises(ImportFileError, match="the worker does not read cdp.events.nowhere"):
        topic_for("nowhere")
    with pytest.raises(ImportFileError, match="lower-case letters"):
        topic_for("CRM data")


def test_docstring_examples():
    result = doctest.testmod(streamcdp.importer, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
