"""``streamcdp import`` into the real Kafka: CSV and JSONL rows arrive on
cdp.events.crm as identify events, keyed by their strongest identifier; importing
the same file again gives the same messageIds; bad rows are reported, good rows
sent all the same."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from streamcdp.importer import run_import
from streams.topics import EVENTS_CRM
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _summary(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return orjson.loads(out[-1])


async def _arrived(reader, prefix: str, count: int) -> list[dict]:
    records = await reader.collect(lambda r: orjson.loads(r.value)["messageId"].startswith(prefix), count, timeout_s=30)
    return [{"key": r.key, **orjson.loads(r.value)} for r in records]


async def test_csv_rows_arrive_as_identify_events(infra, topic_reader, tmp_path: Path, capsys):
    reader = await topic_reader(EVENTS_CRM)
    run = uuid.uuid4().hex[:8]
    digits = str(uuid.uuid4().int)[:4]
    path = tmp_path / "crm.csv"
    path.write_text(
        "user_id,email,phone,external_id.crm_id,first_name,last_name,dob,address.city,address.postalCode,timestamp\n"
        f"u-{run},Ann.{run}@Example.com,,C-{run}-1,Ann,Lee,1984-03-07,Oslo,0150,2026-01-02T03:04:05Z\n"
        f",,,,Bob{run},Smith,19700102,,,\n"
        f",not-an-email,,C-{run}-3,,,,,,\n"
        f",,+1 415 555 {digits},,Cat,Kim,,,,\n"
    )
    status = await asyncio.to_thread(run_import, infra, str(path), "crm", None)
    summary = _summary(capsys)
    assert status == 1  # one row failed
    assert summary["rows"] == 4 and summary["sent"] == 3 and summary["failed"] == 1 and summary["for_matching"] == 1
    assert summary["errors"] == [{"line": 4, "error": "email 'not-an-email' is not a usable email address"}]
    assert summary["topic"] == EVENTS_CRM and summary["format"] == "csv"

    prefix = f"import-{summary['content_hash'][:20]}-"
    events = {e["messageId"]: e for e in await _arrived(reader, prefix, 3)}
    assert sorted(events) == [prefix + "2", prefix + "3", prefix + "5"]
    ann = events[prefix + "2"]
    assert ann["type"] == "identify" and ann["userId"] == f"u-{run}" and ann["key"] == f"user_id:u-{run}".encode()
    assert ann["timestamp"] == "2026-01-02T03:04:05Z"
    assert ann["traits"] == {
        "email": f"Ann.{run}@Example.com", "first_name": "Ann", "last_name": "Lee", "dob": "1984-03-07",
        "address": {"city": "Oslo", "postalCode": "0150"},
    }
    assert ann["context"]["externalIds"] == [{"id": f"C-{run}-1", "type": "crm_id"}]
    bob = events[prefix + "3"]
    assert bob["anonymousId"] == f"import:{summary['content_hash'][:20]}:3" and "userId" not in bob
    assert bob["key"] == f"anonymous_id:{bob['anonymousId']}".encode()
    cat = events[prefix + "5"]
    assert cat["key"].startswith(b"phone:+1415555")


async def test_jsonl_rows_keep_nesting_and_reimport_repeats_message_ids(infra, topic_reader, tmp_path: Path, capsys):
    reader = await topic_reader(EVENTS_CRM)
    run = uuid.uuid4().hex[:8]
    path = tmp_path / "crm.jsonl"
    path.write_bytes(
        orjson.dumps({"email": f"zed.{run}@example.com", "plan": "gold", "address": {"city": "Oslo"}, "tags": ["a"], "age": 41}) + b"\n"
        + b"{broken\n"
        + b"\n"
        + orjson.dumps({"external_id.loyalty_id": f"L-{run}", "vip": True, "note": None}) + b"\n"
    )
    first = await asyncio.to_thread(run_import, infra, str(path), "crm", None)
    summary = _summary(capsys)
    assert first == 1 and summary["sent"] == 2 and summary["failed"] == 1
    assert summary["errors"][0]["line"] == 2 and summary["errors"][0]["error"].startswith("not valid JSON")

    prefix = f"import-{summary['content_hash'][:20]}-"
    events = await _arrived(reader, prefix, 2)
    by_line = {e["messageId"].rsplit("-", 1)[1]: e for e in events}
    assert by_line["1"]["traits"] == {"email": f"zed.{run}@example.com", "plan": "gold", "address": {"city": "Oslo"}, "tags": ["a"], "age": 41}
    assert by_line["4"]["traits"] == {"vip": True}
    assert by_line["4"]["context"]["externalIds"] == [{"id": f"L-{run}", "type": "loyalty_id"}]

    again = await asyncio.to_thread(run_import, infra, str(path), "crm", "jsonl")
    assert again == 1 and _summary(capsys)["content_hash"] == summary["content_hash"]
    both = await _arrived(reader, prefix, 4)
    ids = sorted(e["messageId"] for e in both)
    assert ids == sorted([prefix + "1", prefix + "4"] * 2)  # the same ids: the worker drops the repeats


async def test_a_clean_file_exits_zero_through_the_cli(infra, tmp_path: Path):
    path = tmp_path / "clean.csv"
    path.write_text(f"email,plan\nclean.{uuid.uuid4().hex[:8]}@example.com,gold\n")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "streamcdp.cli", "import", str(path), "--channel", "crm"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CDP_KAFKA_BOOTSTRAP": infra.kafka_bootstrap},
    )
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["sent"] == 1 and summary["failed"] == 0 and summary["errors"] == []


async def test_file_level_errors_exit_two_and_name_the_problem(infra, tmp_path: Path):
    cases = {
        str(tmp_path / "missing.csv"): "file not found",
        str(tmp_path / "people.xml"): "cannot tell the format",
    }
    (tmp_path / "people.xml").write_text("<x/>")
    for path, message in cases.items():
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "streamcdp.cli", "import", path],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 2 and message in done.stderr
