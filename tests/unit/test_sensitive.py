"""Sensitive traits: protected form, name matching, traversal, encryption, config."""

from __future__ import annotations

import base64
import copy
import doctest
import subprocess
import sys
from hashlib import blake2b

import orjson
import pytest

import agents.profiles.sensitive
from agents.profiles.sensitive import DEFAULT_SENSITIVE_TRAITS, SensitivePolicy, normalize_name
from schemas.errors import ConfigError
from schemas.identifiers import Identifier

KEY_B64 = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY_B64 = base64.b64encode(bytes(range(1, 33))).decode()
SECRETS = {"national": "NI-88-1234-X9", "passport": "P9981772Q", "iban": "DE89370400440532013000", "ssn": "078-05-1120"}


def policy(section: dict | None = None, *, key: str = KEY_B64, hash_key: str = "test-hash-key") -> SensitivePolicy:
    return SensitivePolicy.from_config(section, hash_key=hash_key, encryption_key_b64=key)


def dump(value: object) -> bytes:
    return orjson.dumps(value)


def assert_no_clear_text(value: object, secrets=SECRETS.values()) -> None:
    text = dump(value)
    for secret in secrets:
        assert secret.encode() not in text, secret
        assert orjson.dumps(secret)[1:-1] not in text


# ---------------------------------------------------------------- names


def test_defaults() -> None:
    assert set(DEFAULT_SENSITIVE_TRAITS) == {
        "national_id", "passport", "passport_number", "bank_account", "iban", "ssn", "tax_id"
    }
    for section in (None, {}, {"traits": None}):
        assert policy(section).names == tuple(sorted(DEFAULT_SENSITIVE_TRAITS))
    p = policy()
    assert all(p.is_sensitive(name) for name in DEFAULT_SENSITIVE_TRAITS)
    assert not any(p.is_sensitive(name) for name in ("email", "phone", "first_name", "plan", "passport_country", "id"))


@pytest.mark.parametrize(
    "name",
    ["passport_number", "passportNumber", "PassportNumber", "PASSPORT_NUMBER", "passport-number", "Passport Number",
     "passport  number", " passport_number ", "passport__number", "_passport_number_", "passport\tnumber"],
)
def test_name_spellings_are_equivalent(name: str) -> None:
    assert policy().is_sensitive(name)
    assert normalize_name(name) == "passport_number"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("IBAN", "iban"), ("iban", "iban"), ("SSN", "ssn"), ("taxID", "tax_id"), ("TaxId", "tax_id"),
     ("nationalID", "national_id"), ("bankAccount", "bank_account"), ("SSNNumber", "ssn_number"),
     ("passport2", "passport2"), ("address", "address")],
)
def test_normalize_name(name: str, expected: str) -> None:
    assert normalize_name(name) == expected


def test_configured_names_are_normalised_and_replace_the_defaults() -> None:
    p = policy({"traits": ["Driver-License", "taxId"]})
    assert p.names == ("driver_license", "tax_id")
    assert p.is_sensitive("driverLicense") and p.is_sensitive("driver license") and p.is_sensitive("TAX_ID")
    assert not p.is_sensitive("passport")


def test_an_empty_list_makes_nothing_sensitive_and_costs_nothing() -> None:
    p = policy({"traits": []})
    traits = {"national_id": "x", "nested": {"passport": "y"}}
    assert p.protect_traits(traits) is traits and p.redact(traits) is traits
    assert p.protect_identifier(Identifier("passport", "P1")) == Identifier("passport", "P1")


def test_the_name_cache_is_bounded_and_never_changes_a_verdict() -> None:
    p = policy()
    for index in range(10_000):
        assert not p.is_sensitive(f"trait_{index}")
    assert len(p._clean) <= 4096
    assert p.is_sensitive("passportNumber") and p.is_sensitive("passportNumber")
    assert not p.is_sensitive("trait_9999")


# ------------------------------------------------------------ traversal


def test_nothing_sensitive_returns_the_same_object() -> None:
    p = policy()
    for traits in ({}, {"plan": "pro"}, {"address": {"city": "Oslo"}, "tags": ["a", {"b": [1, {"c": 2}]}], "n": None}):
        assert p.protect_traits(traits) is traits
        assert p.redact(traits) is traits


def test_sensitive_values_at_every_depth_are_replaced_and_the_input_is_untouched() -> None:
    p = policy()
    traits = {
        "plan": "pro",
        "national_id": SECRETS["national"],
        "bank": {"iban": SECRETS["iban"], "name": "ACME Bank"},
        "documents": [{"kind": "id card", "passportNumber": SECRETS["passport"]}, "plain", [{"SSN": SECRETS["ssn"]}]],
        "address": {"city": "Oslo"},
    }
    before = copy.deepcopy(traits)
    out = p.protect_traits(traits)
    assert traits == before  # untouched
    assert out is not traits
    assert out["plan"] == "pro" and out["bank"]["name"] == "ACME Bank" and out["documents"][1] == "plain"
    assert out["address"] is traits["address"]  # unchanged branches are shared, not copied
    for protected in (out["national_id"], out["bank"]["iban"], out["documents"][0]["passportNumber"], out["documents"][2][0]["SSN"]):
        assert protected["sensitive"] is True and protected["hash"].startswith("blake2b:")
    assert_no_clear_text(out)
    assert p.reveal(out["documents"][2][0]["SSN"]) == SECRETS["ssn"]


def test_a_sensitive_name_protects_its_whole_value() -> None:
    p = policy()
    out = p.protect_traits({"passport": {"number": SECRETS["passport"], "country": "DE"}, "ssn": 78051120, "iban": None})
    assert set(out["passport"]) == {"sensitive", "hash", "encrypted"}
    assert p.reveal(out["passport"]) == {"number": SECRETS["passport"], "country": "DE"}
    assert p.reveal(out["ssn"]) == 78051120
    assert p.reveal(out["iban"]) is None and out["iban"]["sensitive"] is True  # null is a value too
    assert_no_clear_text(out)


def test_redact_covers_payloads_and_external_ids() -> None:
    p = policy()
    payload = {
        "type": "track", "event": "Document Checked", "userId": "u-1",
        "properties": {"passportNumber": SECRETS["passport"], "checked": True},
        "traits": {"national_id": SECRETS["national"]},
        "context": {
            "traits": {"bank_account": {"iban": SECRETS["iban"]}},
            "externalIds": [{"id": f" {SECRETS['ssn']} ", "type": "ssn"}, {"id": "L-1", "type": "loyalty_id"}],
        },
    }
    before = copy.deepcopy(payload)
    out = p.redact(payload)
    assert payload == before
    assert_no_clear_text(out)
    ssn_entry, loyalty_entry = out["context"]["externalIds"]
    # the id stays a string: the identifier's hashed value (trimmed, as identifiers are)
    assert ssn_entry == {"id": p.protect_identifier(Identifier("ssn", SECRETS["ssn"])).value, "type": "ssn"}
    assert loyalty_entry is payload["context"]["externalIds"][1]
    assert out["properties"]["checked"] is True and out["event"] == "Document Checked"


def test_external_id_entries_with_other_types_or_shapes_are_kept() -> None:
    p = policy()
    for obj in ({"id": "x", "type": "loyalty_id"}, {"id": 5, "type": "passport"}, {"id": "x", "type": 3},
                {"type": "passport", "number": "n"}):
        assert p.redact({"a": [obj]})["a"][0] == obj


# --------------------------------------------------------- protected form


def test_protected_form_shape_with_and_without_a_key() -> None:
    with_key = policy()
    protected = with_key.protect_value(SECRETS["iban"])
    assert list(protected) == ["sensitive", "hash", "encrypted"]
    algorithm, digest = protected["hash"].split(":")
    assert algorithm == "blake2b" and len(digest) == 64 and int(digest, 16) >= 0
    blob = base64.b64decode(protected["encrypted"], validate=True)
    assert blob[0] == 1 and len(blob) == 1 + 12 + len(dump(SECRETS["iban"])) + 16

    without_key = policy(key="")
    assert without_key.encrypts is False and with_key.encrypts is True
    bare = without_key.protect_value(SECRETS["iban"])
    assert bare == {"sensitive": True, "hash": protected["hash"]}  # same hash key: same hash
    assert without_key.reveal(bare) is None
    assert without_key.reveal(protected) is None  # no key: cannot reveal
    assert with_key.reveal(bare) is None  # nothing encrypted
    out = without_key.protect_traits({"national_id": SECRETS["national"]})
    assert "encrypted" not in out["national_id"]
    assert_no_clear_text(out)


def test_hash_is_canonical_deterministic_and_keyed() -> None:
    p = policy()
    assert p.protect_value(123)["hash"] != p.protect_value("123")["hash"]
    assert p.protect_value({"a": 1, "b": 2})["hash"] == p.protect_value({"a": 1, "b": 2})["hash"]
    assert p.protect_value("x")["hash"] == p.protect_value("x")["hash"]
    assert p.protect_value("x")["encrypted"] != p.protect_value("x")["encrypted"]  # random nonce
    other = policy(hash_key="another-key")
    assert other.protect_value("x")["hash"] != p.protect_value("x")["hash"]
    # documented construction: keyed BLAKE2b-256 of the orjson bytes, personalised
    expected = blake2b(b'"x"', digest_size=32, key=b"test-hash-key", person=b"cdp.sensitive").hexdigest()
    assert p.protect_value("x")["hash"] == "blake2b:" + expected
    assert p.hash_text("x") == expected


def test_an_empty_hash_key_still_hashes() -> None:
    p = policy(hash_key="")
    digest = p.hash_text(SECRETS["ssn"])
    assert len(digest) == 64 and SECRETS["ssn"] not in digest
    assert digest == blake2b(dump(SECRETS["ssn"]), digest_size=32, person=b"cdp.sensitive").hexdigest()


def test_hash_is_stable_across_processes() -> None:
    code = (
        "from agents.profiles.sensitive import SensitivePolicy as P;"
        "print(P.from_config(None, hash_key='test-hash-key').hash_text('P9981772Q'))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == policy().hash_text("P9981772Q")


@pytest.mark.parametrize("value", ["P9981772Q", "", "ünïcødé ✓", 0, -7, 3.25, True, None, [1, "a"], {"k": {"n": [1]}}])
def test_encryption_round_trip(value: object) -> None:
    p = policy()
    assert p.reveal(p.protect_value(value)) == value
    # another process with the same keys reveals it too (no per-process state)
    same = SensitivePolicy.from_config(None, hash_key="test-hash-key", encryption_key_b64=KEY_B64)
    assert same.reveal(p.protect_value(value)) == value


def test_tampering_is_detected() -> None:
    p = policy()
    protected = p.protect_value(SECRETS["passport"])
    blob = bytearray(base64.b64decode(protected["encrypted"]))
    for position in (1, 13, len(blob) - 1):  # nonce, ciphertext, tag
        changed = bytearray(blob)
        changed[position] ^= 1
        with pytest.raises(ValueError):
            p.reveal({**protected, "encrypted": base64.b64encode(bytes(changed)).decode()})
    other = p.protect_value("something else")
    with pytest.raises(ValueError):  # a ciphertext moved beside another hash
        p.reveal({**protected, "hash": other["hash"]})
    with pytest.raises(ValueError):
        p.reveal({**protected, "encrypted": "not base64!"})
    with pytest.raises(ValueError):
        p.reveal({**protected, "encrypted": base64.b64encode(b"\x02" + bytes(blob[1:])).decode()})
    with pytest.raises(ValueError):
        p.reveal({**protected, "encrypted": base64.b64encode(b"\x01short").decode()})
    with pytest.raises(ValueError):  # encrypted with another key
        policy(key=OTHER_KEY_B64).reveal(protected)
    with pytest.raises(ValueError):
        p.reveal({"hash": protected["hash"]})  # not a protected form
    with pytest.raises(ValueError):
        p.reveal("P9981772Q")  # type: ignore[arg-type]


# ------------------------------------------------------------ identifiers


def test_protect_identifier() -> None:
    p = policy()
    plain = Identifier("loyalty_id", "L-1")
    assert p.protect_identifier(plain) is plain
    assert p.protect_identifier(Identifier("email", "ann@example.com")) == Identifier("email", "ann@example.com")
    hashed = p.protect_identifier(Identifier("passport", SECRETS["passport"]))
    assert hashed.type == "passport" and hashed.value == "h:" + p.hash_text(SECRETS["passport"])
    assert SECRETS["passport"] not in str(hashed)
    assert p.protect_identifier(Identifier("passport_number", "X")).value.startswith("h:")
    assert p.protect_identifier(hashed) == hashed  # idempotent: a lookup by the hashed form works
    # a trait and an identifier holding the same string carry the same digest
    assert p.protect_value(SECRETS["passport"])["hash"].split(":")[1] == hashed.value[2:]
    assert p.protect_identifier(Identifier("passport", "P1")) == policy(key="").protect_identifier(Identifier("passport", "P1"))


# ----------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("section", "words"),
    [
        (["national_id"], ["mapping"]),
        ("national_id", ["mapping"]),
        ({"traits": "national_id"}, ["traits", "list"]),
        ({"traits": {"national_id": True}}, ["traits", "list"]),
        ({"traits": ["ok", 5]}, ["traits[1]", "5"]),
        ({"traits": ["ok", ""]}, ["traits[1]"]),
        ({"traits": ["  - _ "]}, ["traits[0]"]),
        ({"traits": ["address.national_id"]}, ["traits[0]", "path"]),
        ({"traits": [], "fields": ["x"]}, ["unknown", "fields"]),
    ],
)
def test_bad_config_names_the_source_and_the_problem(section: object, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        SensitivePolicy.from_config(section, hash_key="", source="config/profile.yaml: sensitive")  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith("config/profile.yaml: sensitive: ")
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("not base64!", ["CDP_SENSITIVE_KEY", "base64"]),
        (base64.b64encode(bytes(16)).decode(), ["CDP_SENSITIVE_KEY", "32 bytes", "got 16"]),
        (base64.b64encode(bytes(33)).decode(), ["got 33"]),
        ("QUJD", ["got 3"]),
    ],
)
def test_bad_encryption_key(key: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        SensitivePolicy.from_config(None, hash_key="", encryption_key_b64=key, source="env")
    message = str(caught.value)
    assert message.startswith("env: ")
    for word in words:
        assert word in message
    assert key not in message or len(key) < 8  # the key itself is not echoed


def test_key_with_surrounding_whitespace_is_accepted_and_repr_hides_keys() -> None:
    p = SensitivePolicy.from_config(None, hash_key="hash-secret", encryption_key_b64=f" {KEY_B64}\n")
    assert p.encrypts
    text = repr(p)
    assert "hash-secret" not in text and KEY_B64 not in text and "national_id" in text


def test_docstring_examples_run() -> None:
    result = doctest.testmod(agents.profiles.sensitive)
    assert result.attempted and not result.failed


# ---------------------------------------------------------------- the screen


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"type":"track","event":"Product Viewed","properties":{"sku":"s1"}}', False),
        (b'{"traits":{"nationalId":"x"}}', True),
        (b'{"traits":{"PASSPORT-NUMBER":"x"}}', True),
        (b'{"context":{"externalIds":[{"type":"iban","id":"x"}]}}', True),
        (b'{"traits":{"\\u006eational_id":"x"}}', True),  # an escaped key: walk it
        (b'{"properties":{"tax":1.5}}', True),  # a false alarm costs only the walk
    ],
)
def test_might_contain_screens_events_without_sensitive_names(raw, expected) -> None:
    assert policy().might_contain(raw) is expected


def test_every_sensitive_name_passes_the_screen_in_any_spelling() -> None:
    p = policy({"traits": ["national_id", "bankAccount", "SSN", "tax-id"]})
    for spelling in ("national_id", "NationalID", "national-id", "BANK_ACCOUNT", "bankaccount", "ssn", "TaxId"):
        assert p.might_contain(b'{"traits":{"%s":"x"}}' % spelling.encode()), spelling
    assert not policy({"traits": []}).might_contain(b'{"traits":{"passport":"x"}}')
