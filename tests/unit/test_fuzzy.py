"""The fuzzy matching model (pure): normalisation, match records, blocking keys,
scoring, best match, and the config file."""

from __future__ import annotations

import doctest
import random
from pathlib import Path

import pytest
import yaml

import agents.identity.fuzzy
from agents.identity.fuzzy import (
    DEFAULT_CONFIG_PATH,
    MatchConfig,
    MatchRecord,
    best_match,
    blocking_keys,
    explain,
    match_record,
    normalize_dob,
    normalize_postcode,
    normalize_street,
    normalize_text,
    score,
    split_name,
)
from schemas.errors import ConfigError

CONFIG = MatchConfig.builtin()


def rec(**fields) -> MatchRecord:
    return MatchRecord(**fields)


ANN = rec(given_name="ann", surname="lee", dob="1984-03-07", street="12 pinkerton cct", postcode="2135", city="richlands", phone="+14155550100")


# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Zoë  O'Brien ", "zoe obrien"),
        ("MÜLLER-LÜDENSCHEIDT", "muller ludenscheidt"),
        ("Straße", "strasse"),
        ("Łukasz Ørsted", "lukasz orsted"),
        ("José\tGarcía", "jose garcia"),
        ("Ｊｏｈｎ", "john"),  # full-width letters
        ("Иван Петров", "иван петров"),  # other scripts are kept
        ("Ελένη", "ελενη"),
        ("...", None),
        ("", None),
        (None, None),
        (["ann"], None),
        (42, "42"),
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ann Lee", ("ann", "lee")),
        ("Lee, Ann", ("ann", "lee")),
        ("Dr. Anna Maria van der Berg", ("anna maria", "van der berg")),
        ("Mrs Ann", ("ann", None)),
        ("Cher", ("cher", None)),
        ("Ludwig von Beethoven", ("ludwig", "von beethoven")),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_split_name(raw, expected):
    assert split_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1984-03-07", "1984-03-07"),
        ("1984-3-7", "1984-03-07"),
        ("1984/03/07", "1984-03-07"),
        ("1984-03-07T00:00:00Z", "1984-03-07"),
        ("19840307", "1984-03-07"),
        (19840307, "1984-03-07"),
        ("07.03.1984", "1984-03-07"),  # dots: day first
        ("25/03/1984", "1984-03-25"),  # unambiguous: 25 is the day
        ("03/25/1984", "1984-03-25"),
        ("07/07/1984", "1984-07-07"),
        ("03/07/1984", None),  # 3 July or 7 March: refused
        ("1984-02-30", None),
        ("1800-01-01", None),
        ("yesterday", None),
        ("", None),
        (True, None),
    ],
)
def test_normalize_dob(raw, expected):
    assert normalize_dob(raw) == expected


def test_normalize_postcode_and_street():
    assert normalize_postcode(" sw1a 1aa ") == "sw1a1aa"
    assert normalize_postcode("94107-1234") == "94107"
    assert normalize_postcode(2135) == "2135"
    assert normalize_postcode("  ") is None
    assert normalize_street("12 Pinkerton Circuit") == "12 pinkerton cct"
    assert normalize_street("221B Baker Street") == normalize_street("221b baker st.")
    assert normalize_street(None) is None


# ------------------------------------------------------------------ match records


def test_match_record_from_segment_reserved_traits():
    record = match_record(
        {
            "firstName": "Ann",
            "lastName": "Lee",
            "birthday": "1984-03-07T00:00:00.000Z",
            "address": {"street": "12 Pinkerton Circuit", "city": "Richlands", "postalCode": "2135", "country": "AU"},
            "phone": "(415) 555-0100",
            "email": "ann@example.com",
        }
    )
    assert record == ANN


def test_match_record_from_crm_spellings():
    record = match_record(
        {"given_name": "Ann", "surname": "Lee", "date_of_birth": "19840307", "street_number": "12",
         "address_1": "pinkerton circuit", "suburb": "Richlands", "postcode": "2135", "Mobile": "+1 415 555 0100"}
    )
    assert record == ANN
    other = match_record({"First Name": "Ann", "Last Name": "Lee", "DOB": "1984-03-07", "zip": "2135", "street_address": "12 Pinkerton Cct"})
    assert (other.given_name, other.surname, other.dob, other.street, other.postcode) == ("ann", "lee", "1984-03-07", "12 pinkerton cct", "2135")


def test_match_record_splits_a_full_name_and_uses_the_phone_region():
    record = match_record({"name": "Lee, Ann", "phone": "020 7946 0958"}, default_region="GB")
    assert (record.given_name, record.surname, record.phone) == ("ann", "lee", "+442079460958")


def test_match_record_needs_a_name_and_something_to_match_on():
    assert match_record({"firstName": "Ann", "lastName": "Lee"}) is None  # a name only
    assert match_record({"birthday": "1984-03-07", "phone": "+14155550100"}) is None  # no name
    assert match_record({"firstName": "Ann", "address": {"street": "12 Pinkerton Cct"}}) is None  # street, no postcode
    assert match_record({"firstName": "Ann", "postcode": "2135"}) is None
    assert match_record({"firstName": "Ann", "phone": "not a phone"}) is None
    assert match_record({"lastName": "Lee", "address": {"street": "12 Pinkerton Cct", "postalCode": "2135"}}) is not None
    assert match_record({"firstName": "Ann", "dob": "03/07/1984"}) is None  # ambiguous date: no dob
    assert match_record("not a mapping") is None  # type: ignore[arg-type]
    assert match_record({"firstName": {"nested": 1}, "dob": "1984-03-07"}) is None


def test_match_record_json_is_compact_stable_and_round_trips():
    assert ANN.to_json() == (
        b'{"given_name":"ann","surname":"lee","dob":"1984-03-07","street":"12 pinkerton cct",'
        b'"postcode":"2135","city":"richlands","phone":"+14155550100"}'
    )
    assert MatchRecord.from_json(ANN.to_json()) == ANN
    sparse = rec(surname="lee", phone="+14155550100")
    assert sparse.to_json() == b'{"surname":"lee","phone":"+14155550100"}'
    assert MatchRecord.from_json(sparse.to_json().decode()) == sparse
    assert MatchRecord.from_json(b'{"surname":"lee","future_field":1}') == rec(surname="lee")
    with pytest.raises(ValueError):
        MatchRecord.from_json(b"[1]")
    with pytest.raises(ValueError):
        MatchRecord.from_json(b'{"surname":7}')


# ------------------------------------------------------------------ blocking keys


def test_blocking_keys_are_short_typed_sorted_and_deterministic():
    keys = blocking_keys(ANN)
    assert keys == sorted(set(keys))
    assert {k.split(":", 1)[0] for k in keys} == {"ny", "sx", "db", "nm", "ad", "ph"}
    assert all(len(k) < 40 for k in keys)
    assert blocking_keys(MatchRecord.from_json(ANN.to_json())) == keys


def test_blocking_keys_survive_typos_swaps_and_moves():
    shares = lambda a, b: bool(set(blocking_keys(a)) & set(blocking_keys(b)))  # noqa: E731
    assert shares(ANN, rec(given_name="anne", surname="lea", dob="1984-03-07"))
    assert shares(ANN, rec(given_name="lee", surname="ann", dob="1984-03-07"))  # swapped
    assert shares(ANN, rec(given_name="ann", surname="lee", street="9 other st", postcode="9999", phone="+14155550100"))  # moved
    assert shares(ANN, rec(given_name="anna", surname="leigh", street="12 pinkerton cct", postcode="2135"))
    assert not shares(ANN, rec(given_name="bob", surname="smith", dob="1970-01-02", postcode="4000"))


def test_names_in_other_scripts_match_and_block():
    a = match_record({"firstName": "Иван", "lastName": "Петров", "birthday": "1980-01-02"})
    b = match_record({"firstName": "Иван", "lastName": "Петрв", "birthday": "1980-01-02"})
    assert set(blocking_keys(a)) & set(blocking_keys(b))
    assert score(a, b, CONFIG) >= CONFIG.threshold


def test_a_record_with_only_a_name_and_phone_has_keys():
    assert "ph:+14155550100" in blocking_keys(rec(given_name="ann", phone="+14155550100"))


# ------------------------------------------------------------------ scoring


def matches(a: MatchRecord, b: MatchRecord) -> bool:
    return score(a, b, CONFIG) >= CONFIG.threshold


def test_identical_records_match_with_a_score_near_one():
    assert score(ANN, ANN, CONFIG) > 0.9999


@pytest.mark.parametrize(
    "other",
    [
        rec(given_name="anne", surname="leee", dob="1984-03-07"),  # typos in both names
        rec(given_name="nan", surname="lee", dob="1984-03-07", phone="+14155550100"),  # letters swapped
        rec(given_name="a", surname="lee", dob="1984-03-07", postcode="2135"),  # an initial
        rec(given_name="ann", surname="lee", dob="1984-07-03", street="12 pinkerton cct", postcode="2135"),  # day/month swapped
        rec(given_name="ann", surname="lee", dob="1984-03-08", phone="+14155550100"),  # one digit
        rec(given_name="ann", surname="lee", street="12 pinkerton cct", postcode="2135"),  # no dob
        rec(given_name="ann", surname="lee", phone="+14155550100"),  # phone only
    ],
)
def test_typo_d_and_partial_records_of_the_same_person_match(other):
    assert matches(ANN, other), explain(ANN, other, CONFIG)


def test_swapped_given_name_and_surname_match():
    swapped = rec(given_name="lee", surname="ann", dob="1984-03-07", postcode="2135")
    parts = explain(ANN, swapped, CONFIG)
    assert parts["names_swapped"] == 1.0 and parts["swap_penalty"] == -CONFIG.swap_penalty
    assert matches(ANN, swapped)


def test_a_conflicting_date_of_birth_does_not_match():
    other = rec(given_name="ann", surname="lee", dob="1990-11-02", street="12 pinkerton cct", postcode="2135", city="richlands")
    assert explain(ANN, other, CONFIG)["dob"] == CONFIG.dob.differ
    assert not matches(ANN, other)


def test_a_family_sharing_phone_and_address_does_not_merge():
    child = rec(given_name="mia", surname="lee", dob="2012-06-01", street="12 pinkerton cct", postcode="2135", city="richlands", phone="+14155550100")
    spouse_no_dob = rec(given_name="tom", surname="lee", street="12 pinkerton cct", postcode="2135", city="richlands", phone="+14155550100")
    assert not matches(ANN, child)
    assert not matches(ANN, spouse_no_dob)
    assert explain(ANN, spouse_no_dob, CONFIG)["household"] == CONFIG.household_cap


def test_twins_with_other_given_names_do_not_merge():
    twin = rec(given_name="beth", surname="lee", dob="1984-03-07", street="12 pinkerton cct", postcode="2135", city="richlands")
    assert not matches(ANN, twin)


def test_the_same_name_with_nothing_else_in_common_does_not_match():
    assert not matches(rec(given_name="ann", surname="lee", dob="1984-03-07"), rec(given_name="ann", surname="lee", phone="+14155550199"))
    assert not matches(rec(given_name="ann", surname="lee", dob="1984-03-07"), rec(given_name="ann", surname="lee", street="1 main st", postcode="2000"))
    # the same name in the same postcode and town, nothing personal in common
    same_area = rec(given_name="ann", surname="lee", phone="+14155550199", postcode="2135", city="richlands")
    assert not matches(rec(given_name="ann", surname="lee", dob="1984-03-07", postcode="2135", city="richlands"), same_area)


def test_missing_fields_neither_help_nor_hurt_and_conflicts_hurt():
    base = rec(given_name="ann", surname="lee", dob="1984-03-07")
    with_phone = rec(given_name="ann", surname="lee", dob="1984-03-07", phone="+14155550100")
    other_phone = rec(given_name="ann", surname="lee", dob="1984-03-07", phone="+14155550199")
    assert score(base, with_phone, CONFIG) == score(base, base, CONFIG)
    assert score(with_phone, other_phone, CONFIG) < score(base, other_phone, CONFIG)


def test_score_is_symmetric_bounded_and_deterministic():
    rng = random.Random(7)
    pool = [
        ANN,
        rec(given_name="lee", surname="ann", dob="1984-07-03"),
        rec(given_name="anne", surname=None, phone="+14155550100"),
        rec(given_name=None, surname="lee", street="12 pinkerton cct", postcode="2153"),
        rec(given_name="bob", surname="lee", dob="1984-03-07", city="richland"),
    ]
    for _ in range(50):
        a, b = rng.choice(pool), rng.choice(pool)
        value = score(a, b, CONFIG)
        assert 0.0 <= value <= 1.0
        assert value == score(b, a, CONFIG) == score(a, b, CONFIG)


# ------------------------------------------------------------------ best match


def test_best_match_picks_the_best_profile_over_its_records():
    typo = rec(given_name="anne", surname="lee", dob="1984-03-07")
    candidates = [
        ("p_2", [rec(given_name="bob", surname="smith", dob="1970-01-01")]),
        ("p_3", [rec(given_name="ann", surname="lee", phone="+10000000000"), ANN]),
    ]
    found = best_match(typo, candidates, CONFIG)
    assert found is not None and found[0] == "p_3" and found[1] >= CONFIG.threshold
    assert best_match(typo, list(reversed(candidates)), CONFIG) == found


def test_best_match_breaks_ties_by_the_smallest_profile_id():
    candidates = [("p_9", [ANN]), ("p_1", [ANN]), ("p_5", [ANN])]
    assert best_match(ANN, candidates, CONFIG)[0] == "p_1"


def test_best_match_returns_none_below_threshold_or_without_candidates():
    stranger = rec(given_name="zed", surname="quinn", dob="1999-12-31")
    assert best_match(stranger, [("p_1", [ANN])], CONFIG) is None
    assert best_match(ANN, [], CONFIG) is None
    assert best_match(ANN, [("p_1", [])], CONFIG) is None


def test_a_profile_with_a_conflicting_dob_is_not_joined_through_another_record():
    # p_1 knows Ann born 1984 at one address; a second record without dob was added
    # at another address. A record born 1990 at that second address is someone else.
    profile = [ANN, rec(given_name="ann", surname="lee", street="4 new st", postcode="4000", phone="+14155550100")]
    newcomer = rec(given_name="ann", surname="lee", dob="1990-11-02", street="4 new st", postcode="4000", phone="+14155550100")
    assert matches(profile[1], newcomer)
    assert best_match(newcomer, [("p_1", profile)], CONFIG) is None


# ------------------------------------------------------------------ config


def test_the_shipped_config_is_the_builtin_model():
    assert MatchConfig.load() == MatchConfig.builtin()
    assert MatchConfig.load(DEFAULT_CONFIG_PATH) == MatchConfig.builtin()
    assert MatchConfig.parse(CONFIG.to_document()) == CONFIG
    assert 0 < CONFIG.threshold < 1


def _document(**changes) -> dict:
    document = CONFIG.to_document()
    for dotted, value in changes.items():
        target = document
        *parents, leaf = dotted.split("__")
        for part in parents:
            target = target[part]
        if value is ...:
            del target[leaf]
        else:
            target[leaf] = value
    return document


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"threshold": 1.5}, "threshold must be within (0, 1)"),
        ({"threshold": "high"}, "threshold must be a number"),
        ({"threshold": True}, "threshold must be a number"),
        ({"threshold": ...}, "missing key(s) threshold"),
        ({"colour": "blue"}, "unknown key(s) colour"),
        ({"household_cap": 0}, "household_cap must be > 0"),
        ({"swap_penalty": -1}, "swap_penalty must be >= 0"),
        ({"fields__dob__fuzzy": 1}, "fields.dob: unknown key(s) fuzzy"),
        ({"fields__given_name__differ": 2}, "fields.given_name.differ must be <= 0"),
        ({"fields__surname__agree": -1}, "fields.surname.agree must be > 0"),
        ({"fields__street__close": 9}, "fields.street: weights must not increase"),
        ({"fields__city__close_at": 1.2}, "fields.city.close_at must be within (0, 1]"),
        ({"fields__surname__fuzzy_at": 0.95}, "fields.surname: fuzzy_at (0.95) must not exceed close_at"),
        ({"fields__phone": ...}, "fields: missing key(s) phone"),
        ({"fields__phone__agree": ...}, "fields.phone: 'agree' and 'differ' are required"),
        ({"fields__nickname": {"agree": 1, "differ": 0}}, "fields: unknown key(s) nickname"),
        ({"fields": [1]}, "fields must be a mapping"),
    ],
)
def test_config_validation_names_the_bad_key(changes, message):
    with pytest.raises(ConfigError) as error:
        MatchConfig.parse(_document(**changes), source="m.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("m.yaml")


def test_config_load_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        MatchConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("threshold: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        MatchConfig.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("0.9\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        MatchConfig.load(scalar)
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text(yaml.safe_dump(_document(threshold=0.95)))
    assert MatchConfig.load(str(tuned)).threshold == 0.95
    assert CONFIG.with_threshold(0.9).threshold == 0.9
    with pytest.raises(ConfigError):
        CONFIG.with_threshold(0)


def test_docstring_examples():
    result = doctest.testmod(agents.identity.fuzzy, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
