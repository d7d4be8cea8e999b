"""The labelled synthetic record-linkage set behind bench/identity_accuracy.py."""

from __future__ import annotations

import doctest
from collections import Counter

import orjson

from agents.identity.fuzzy import match_record
import streamcdp.linkage_data
from streamcdp.linkage_data import generate_linkage_set, import_rows, main


def test_the_same_seed_gives_the_same_records():
    assert generate_linkage_set(5, households=50) == generate_linkage_set(5, households=50)
    assert generate_linkage_set(5, households=50) != generate_linkage_set(6, households=50)


def test_records_have_unique_ids_repeat_people_and_are_matchable():
    records = generate_linkage_set(1, households=200)
    assert len({r.record_id for r in records}) == len(records)
    per_person = Counter(r.entity for r in records)
    assert max(per_person.values()) > 1 and min(per_person.values()) == 1
    assert all(match_record(r.traits) is not None for r in records)


def test_the_set_has_the_damage_it_promises():
    records = generate_linkage_set(0, households=400)
    spellings = Counter(next(k for k in ("firstName", "first_name", "name") if k in r.traits) for r in records)
    assert set(spellings) == {"firstName", "first_name", "name"}
    by_household: dict[str, set[str]] = {}
    for r in records:
        phone = r.traits.get("phone")
        if phone:
            digits = "".join(ch for ch in phone if ch.isdigit())[-10:]
            by_household.setdefault(digits, set()).add(r.entity)
    assert any(len(people) > 1 for people in by_household.values())  # a shared family phone


def test_main_writes_import_rows_and_truth(tmp_path, capsys):
    rows, truth = tmp_path / "rows.jsonl", tmp_path / "truth.csv"
    assert main([str(rows), str(truth), "--seed", "2", "--households", "10"]) == 0
    lines = rows.read_bytes().splitlines()
    expected = list(import_rows(generate_linkage_set(2, 10)))
    assert [orjson.loads(line) for line in lines] == expected
    assert all("external_id.crm_id" in row for row in expected)
    assert truth.read_text().splitlines()[0] == "crm_id,entity"
    assert orjson.loads(capsys.readouterr().out)["records"] == len(lines)


def test_docstring_examples():
    result = doctest.testmod(streamcdp.linkage_data, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_benchmark_scoring_examples():
    import bench.identity_accuracy

    result = doctest.testmod(bench.identity_accuracy)
    assert result.attempted > 0 and result.failed == 0
