"""Identifier normalisation, parsing and ranking (schemas/identifiers.py)."""

from __future__ import annotations

import doctest

import pytest

import schemas.codec
import schemas.errors
import schemas.identifiers
from schemas.errors import ConfigError, InvalidIdentifier, StreamCDPError
from schemas.identifiers import (
    BUILTIN_TYPES,
    IDENTIFIER_PRIORITY,
    MAX_ID_LENGTH,
    PHONE_REGIONS,
    Identifier,
    collect_identifiers,
    identifier_rank,
    normalize_email,
    normalize_id,
    normalize_identifier,
    normalize_phone,
    normalize_type,
    parse_identifier,
)

# ------------------------------------------------------------------------ email


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ann@example.com", "ann@example.com"),
        ("Ann@Example.COM", "ann@example.com"),
        ("  ann@example.com\t\n", "ann@example.com"),
        ("\u00a0ann@example.com\u3000", "ann@example.com"),  # non-breaking / ideographic space
        ("ａｎｎ@ｅｘａｍｐｌｅ.ｃｏｍ", "ann@example.com"),  # full-width letters: NFKC
        ("ＡＮＮ@EXAMPLE.COM", "ann@example.com"),
        ("ann.lee+news@example.co.uk", "ann.lee+news@example.co.uk"),  # dots and +tags kept
        ("a.b@gmail.com", "a.b@gmail.com"),
        ("josé@exämple.de", "josé@exämple.de"),  # internationalised addresses are kept
    ],
)
def test_normalize_email_accepts_and_normalises(raw: str, expected: str) -> None:
    assert normalize_email(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "ann",
        "ann@",
        "@example.com",
        "ann@localhost",  # no dot in the domain
        "ann@@example.com",
        "ann@exa@mple.com",
        "ann lee@example.com",
        "ann@exa mple.com",
        "ann@example.",
        "ann@.example.com",
        "ann@example..com",
        "ann@example.c",  # one-letter top-level label
        "a" * 250 + "@example.com",  # longer than 254
    ],
)
def test_normalize_email_rejects_what_is_not_an_address(raw: str) -> None:
    assert normalize_email(raw) is None


def test_normalize_email_rejects_non_strings() -> None:
    assert normalize_email(None) is None  # type: ignore[arg-type]
    assert normalize_email(42) is None  # type: ignore[arg-type]


# ------------------------------------------------------------------------ phone


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("(415) 555-0100", "US", "+14155550100"),
        ("415.555.0100", "US", "+14155550100"),
        ("1-415-555-0100", "US", "+14155550100"),  # NANP trunk "1" dropped
        ("+1 415 555 0100", "US", "+14155550100"),
        ("011 44 20 7946 0958", "US", "+442079460958"),  # NANP international prefix
        ("+44 20 7946 0958", "US", "+442079460958"),
        ("+44 (0)20 7946 0958", "US", "+442079460958"),  # the UK "(0)" convention
        ("0044 20 7946 0958", "US", "+442079460958"),
        ("0044 20 7946 0958", "DE", "+442079460958"),
        ("020 7946 0958", "GB", "+442079460958"),
        ("030 1234567", "DE", "+49301234567"),
        ("030/1234567", "DE", "+49301234567"),
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("06 1234 5678", "NL", "+31612345678"),
        ("06 1234 5678", "IT", "+390612345678"),  # Italy keeps the leading 0
        ("0412 345 678", "AU", "+61412345678"),
        ("0011 44 20 7946 0958", "AU", "+442079460958"),  # Australia's international prefix
        ("090-1234-5678", "JP", "+819012345678"),
        ("8 912 345 67 89", "RU", "+79123456789"),  # Russian trunk prefix 8
        ("tel:+1-415-555-0100", "US", "+14155550100"),
        ("TEL: +1 415 555 0100", "US", "+14155550100"),
        ("+1\u2013415\u2013555\u20130100", "US", "+14155550100"),  # en dashes
        ("＋１ ４１５ ５５５ ０１００", "US", "+14155550100"),  # full-width digits
        ("(415) 555-0100", "us", "+14155550100"),  # region code is case-insensitive
    ],
)
def test_normalize_phone_to_e164(raw: str, region: str, expected: str) -> None:
    assert normalize_phone(raw, region) == expected


def test_normalize_phone_defaults_to_us() -> None:
    assert normalize_phone("(415) 555-0100") == "+14155550100"


@pytest.mark.parametrize(
    ("raw", "region"),
    [
        ("1-800-FLOWERS", "US"),  # letters
        ("415 555 0100 x12", "US"),  # extension
        ("phone", "US"),
        ("", "US"),
        ("   ", "US"),
        ("+", "US"),
        ("12345", "US"),  # too short
        ("555-0100", "US"),  # a 7-digit local NANP number is not a full number
        ("+1 234", "US"),  # too short even with a country code
        ("+1234567890123456", "US"),  # 16 digits: longer than E.164 allows
        ("+44 20 7946 0958 1234 5", "US"),
        ("+0 123 456 789", "US"),  # no country calling code starts with 0
        ("+1 415 +555 0100", "US"),
        ("٤١٥٥٥٥٠١٠٠", "US"),  # non-ASCII (Arabic-Indic) digits are not supported
    ],
)
def test_normalize_phone_rejects_unusable_numbers(raw: str, region: str) -> None:
    assert normalize_phone(raw, region) is None


def test_normalize_phone_unknown_region_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown phone region 'XX'"):
        normalize_phone("020 7946 0958", "XX")
    # even for a number already in international form: misconfiguration fails loudly
    with pytest.raises(ConfigError):
        normalize_phone("+44 20 7946 0958", "Atlantis")


def test_phone_region_table_is_sane() -> None:
    assert len(PHONE_REGIONS) >= 40
    for code, region in PHONE_REGIONS.items():
        assert len(code) == 2 and code.isupper()
        assert region.calling_code.isdigit() and region.calling_code[0] != "0"
        assert region.trunk_prefix == "" or region.trunk_prefix.isdigit()
        assert all(idd.isdigit() for idd in region.idd_prefixes)
        if region.national_length is not None:
            low, high = region.national_length
            assert 1 <= low <= high <= 15 - len(region.calling_code)


# -------------------------------------------------------------------- ids, types


def test_normalize_id() -> None:
    assert normalize_id("  u-17 ") == "u-17"
    assert normalize_id("U-17") == "U-17"  # ids keep their case
    assert normalize_id("") is None
    assert normalize_id(" \t ") is None
    assert normalize_id("x" * MAX_ID_LENGTH) == "x" * MAX_ID_LENGTH
    assert normalize_id("x" * (MAX_ID_LENGTH + 1)) is None
    assert normalize_id(17) is None  # type: ignore[arg-type]


def test_normalize_type() -> None:
    assert normalize_type("loyalty_id") == "loyalty_id"
    assert normalize_type("  Loyalty ID ") == "loyalty_id"
    assert normalize_type("Loyalty   Card\tNumber") == "loyalty_card_number"
    assert normalize_type("android.id") == "android.id"
    assert normalize_type("") is None
    assert normalize_type("   ") is None
    assert normalize_type("a:b") is None
    assert normalize_type("t" * 65) is None


def test_normalize_identifier_dispatches_by_type() -> None:
    assert normalize_identifier("email", " A@B.co ") == Identifier("email", "a@b.co")
    assert normalize_identifier("phone", "+1 415 555 0100") == Identifier("phone", "+14155550100")
    assert normalize_identifier("phone", 14155550100) == Identifier("phone", "+14155550100")
    assert normalize_identifier("loyalty_id", " L-1 ") == Identifier("loyalty_id", "L-1")
    assert normalize_identifier("email", "nope") is None
    assert normalize_identifier("phone", True) is None
    assert normalize_identifier("user_id", 17) is None


# ------------------------------------------------------------- parse_identifier


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("email:Ann@Example.com", Identifier("email", "ann@example.com")),
        (" email : Ann@Example.com ", Identifier("email", "ann@example.com")),
        ("phone:+1 415 555 0100", Identifier("phone", "+14155550100")),
        ("phone:(415) 555-0100", Identifier("phone", "+14155550100")),
        ("loyalty_id:L-1", Identifier("loyalty_id", "L-1")),
        ("Loyalty ID:L-1", Identifier("loyalty_id", "L-1")),
        ("user_id:u-17", Identifier("user_id", "u-17")),
        ("userId:u-17", Identifier("user_id", "u-17")),
        ("anonymousId:a-9", Identifier("anonymous_id", "a-9")),
        ("device_id:d-1", Identifier("device_id", "d-1")),
        ("user_id:a:b", Identifier("user_id", "a:b")),  # only the first colon separates
        ("crm_contact:0031", Identifier("crm_contact", "0031")),  # unknown type: external
    ],
)
def test_parse_identifier(text: str, expected: Identifier) -> None:
    assert parse_identifier(text) == expected


def test_parse_identifier_uses_the_default_region_for_phones() -> None:
    assert parse_identifier("phone:020 7946 0958", "GB") == Identifier("phone", "+442079460958")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ann@example.com", "has no type"),
        ("email:", "empty value"),
        ("email:   ", "empty value"),
        (":value", "empty or invalid type"),
        ("   :value", "empty or invalid type"),
        ("email:not-an-email", "not a valid email address"),
        ("phone:call me", "not a phone number"),
        ("user_id:" + "x" * 300, "longer than 256"),
    ],
)
def test_parse_identifier_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidIdentifier, match=message):
        parse_identifier(text)


def test_parse_identifier_error_is_a_streamcdp_error() -> None:
    with pytest.raises(StreamCDPError):
        parse_identifier("nocolon")


def test_identifier_str_round_trips_through_parse() -> None:
    for identifier in (
        Identifier("email", "ann@example.com"),
        Identifier("phone", "+442079460958"),
        Identifier("loyalty_id", "L-1"),
    ):
        assert str(identifier) == f"{identifier.type}:{identifier.value}"
        assert parse_identifier(str(identifier)) == identifier


def test_identifier_is_frozen_and_hashable() -> None:
    identifier = Identifier("email", "a@b.co")
    with pytest.raises(AttributeError):
        identifier.value = "x"  # type: ignore[misc]
    assert {identifier, Identifier("email", "a@b.co")} == {identifier}


# ------------------------------------------------------------------- ranking


def test_identifier_rank_follows_priority() -> None:
    assert [identifier_rank(t) for t in IDENTIFIER_PRIORITY] == list(range(len(IDENTIFIER_PRIORITY)))
    assert identifier_rank("user_id") < identifier_rank("email") < identifier_rank("phone")
    assert identifier_rank("loyalty_id") == identifier_rank("external") == IDENTIFIER_PRIORITY.index("external")
    assert identifier_rank("phone") < identifier_rank("loyalty_id") < identifier_rank("device_id")
    assert identifier_rank("anonymous_id") < identifier_rank("previous_id")
    assert BUILTIN_TYPES == set(IDENTIFIER_PRIORITY) - {"external"}


def test_collect_identifiers_orders_dedupes_and_skips() -> None:
    collected = collect_identifiers(
        [
            ("previous_id", "p-1"),
            ("anonymous_id", "a-9"),
            ("loyalty_id", "L-1"),
            ("crm_id", "C-1"),
            ("email", "Ann@Example.com"),
            ("email", " ann@example.com "),  # same after normalisation
            ("email", "broken"),  # not an identifier, silently skipped
            ("phone", "(415) 555-0100"),
            ("device_id", "d-1"),
            ("user_id", "u-17"),
            ("user_id", "u-17"),
            ("loyalty_id", "L-0"),
        ]
    )
    assert [str(i) for i in collected] == [
        "user_id:u-17",
        "email:ann@example.com",
        "phone:+14155550100",
        "crm_id:C-1",
        "loyalty_id:L-1",
        "loyalty_id:L-0",  # equal types keep input order
        "device_id:d-1",
        "anonymous_id:a-9",
        "previous_id:p-1",
    ]
    assert collect_identifiers([]) == ()
    assert collect_identifiers([("email", "x"), ("user_id", "  ")]) == ()


@pytest.mark.parametrize("module", [schemas.identifiers, schemas.errors, schemas.codec], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted and not result.failed
