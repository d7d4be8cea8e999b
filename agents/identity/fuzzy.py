"""Fuzzy matching of people without a shared strong identifier. Pure: no I/O.

A CRM import row or a POS walk-in often carries no identifier the graph has seen,
only a name, a date of birth, an address or a phone number. This module turns such
traits into a normalised :class:`MatchRecord`, derives the short *blocking keys*
under which candidates are filed (``agents/identity/matching.py`` keeps them in
Redis), and scores a record against a candidate profile's records.

>>> config = MatchConfig.builtin()
>>> ann = match_record({"firstName": "Ann", "lastName": "Müller", "birthday": "1984-03-07"})
>>> ann
MatchRecord(given_name='ann', surname='muller', dob='1984-03-07', street=None, postcode=None, city=None, phone=None)
>>> typo = match_record({"first_name": "Anne", "surname": "Mueller", "dob": "19840307"})
>>> round(score(ann, typo, config), 3) >= config.threshold
True
>>> other = match_record({"first_name": "Ann", "surname": "Muller", "dob": "1990-11-02"})
>>> score(ann, other, config) < config.threshold  # a different date of birth is a conflict
True

The score (see :func:`score`, ``docs/matching.md``) is a Fellegi-Sunter style sum of
per-field log2 Bayes factors, turned into a probability with a prior. Missing fields
add nothing; an outright conflict (another date of birth, another phone, another
given name) subtracts. Fields a household shares (surname, street, postcode, city,
phone) count together only up to ``household_cap``, so a family sharing a phone and
an address is not one person.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import date
from functools import lru_cache
from pathlib import Path

import jellyfish
import orjson


from schemas.errors import ConfigError
from streams.config_files import load_document
from schemas.identifiers import normalize_phone

__all__ = [
    "MatchRecord",
    "MatchConfig",
    "FieldRule",
    "DEFAULT_CONFIG_PATH",
    "match_record",
    "normalize_text",
    "normalize_dob",
    "normalize_postcode",
    "normalize_street",
    "blocking_keys",
    "score",
    "explain",
    "best_match",
]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "matching.yaml"

# ------------------------------------------------------------------ the record


@dataclass(frozen=True, slots=True)
class MatchRecord:
    """The normalised fields fuzzy matching compares; ``None`` when absent.

    Text is lower-case words (accents dropped) separated by single spaces; ``dob`` is
    ``YYYY-MM-DD``; ``postcode`` has no spaces; ``phone`` is E.164.
    """

    given_name: str | None = None
    surname: str | None = None
    dob: str | None = None
    street: str | None = None
    postcode: str | None = None
    city: str | None = None
    phone: str | None = None

    def to_json(self) -> bytes:
        """Compact JSON of the present fields, in field order: equal records give
        equal bytes (so a Redis SET of them deduplicates).

        >>> MatchRecord(given_name="ann", dob="1984-03-07").to_json()
        b'{"given_name":"ann","dob":"1984-03-07"}'
        """
        return orjson.dumps({name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None})

    @classmethod
    def from_json(cls, raw: bytes | str) -> "MatchRecord":
        """The record ``to_json`` wrote; unknown keys are ignored, wrong types raise ValueError."""
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"a match record must be a JSON object, got {type(data).__name__}")
        values = {}
        for name in _FIELDS:
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"match record field {name} must be a string, got {type(value).__name__}")
            values[name] = value
        return cls(**values)


_FIELDS = tuple(f.name for f in fields(MatchRecord))

# ------------------------------------------------------------- normalisation

# Letters NFKD does not decompose into ASCII.
_LETTERS = str.maketrans({"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"})
_APOSTROPHES = str.maketrans("", "", "'’`´ʼ")
_NOT_WORD = re.compile(r"[\W_]+")


def normalize_text(value: object) -> str | None:
    """NFKD with accents (combining marks) dropped, lower case, apostrophes dropped,
    any other punctuation a space, whitespace collapsed. Letters of other scripts are
    kept (``Иван`` stays ``иван``). ``None`` for non-strings and empty results.

    >>> normalize_text("  O'Brien-Núñez, Zoë ")
    'obrien nunez zoe'
    >>> normalize_text("Straße"), normalize_text("ＪＯＨＮ"), normalize_text("Иван"), normalize_text("---")
    ('strasse', 'john', 'иван', None)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.lower().translate(_LETTERS).translate(_APOSTROPHES)
    if not text.isascii():
        decomposed = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower().translate(_LETTERS)
    text = _NOT_WORD.sub(" ", text).strip()
    return text or None


# Titles dropped when a full ``name`` is split; particles that start a surname.
_TITLES = frozenset({"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "dame", "herr", "frau", "mme", "mlle"})
_PARTICLES = frozenset({"van", "von", "de", "der", "den", "da", "di", "du", "del", "della", "dos", "das", "le", "la", "st", "bin", "ibn", "al", "el", "ter", "ten", "mac"})


def split_name(value: object) -> tuple[str | None, str | None]:
    """Split a full name into (given name, surname).

    ``"Surname, Given"`` when there is a comma; otherwise the last word is the
    surname, together with the particles right before it (van, von, de, ...).
    Titles (Mr, Dr, ...) are dropped. One word is taken as a given name.

    >>> split_name("Dr. Anna Maria van der Berg"), split_name("Lee, Ann"), split_name("Cher")
    (('anna maria', 'van der berg'), ('ann', 'lee'), ('cher', None))
    """
    if not isinstance(value, str):
        return None, None
    if "," in value:
        surname, _, given = value.partition(",")
        return normalize_text(given), normalize_text(surname)
    words = [w for w in (normalize_text(value) or "").split() if w not in _TITLES]
    if not words:
        return None, None
    if len(words) == 1:
        return words[0], None
    start = len(words) - 1
    while start > 1 and words[start - 1] in _PARTICLES:
        start -= 1
    return " ".join(words[:start]), " ".join(words[start:])


_DOB_ISO = re.compile(r"^(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?:[T ].*)?$")
_DOB_COMPACT = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DOB_DAY_FIRST_DOTS = re.compile(r"^(\d{1,2})\.(\d{1,2})\.(\d{4})$")
_DOB_SLASHES = re.compile(r"^(\d{1,2})[/-](\d{1,2})[/-](\d{4})$")
_MIN_YEAR = 1870
_MAX_YEAR = 2100


def normalize_dob(value: object) -> str | None:
    """A date of birth as ``YYYY-MM-DD``, or ``None`` if it cannot be read safely.

    Accepted: ``YYYY-MM-DD`` (also with ``/`` or ``.``, and with a time part, which is
    dropped), ``YYYYMMDD`` (string or integer), ``DD.MM.YYYY`` (dots are day-first
    everywhere). ``DD/MM/YYYY`` and ``MM/DD/YYYY`` cannot be told apart, so a
    slash (or dash) date with the year last is accepted only when it is unambiguous:
    one of the first two numbers is above 12 (that one is the day), or both are equal.
    ``03/04/1980`` gives ``None``: a wrong date of birth would be a conflict, which
    is worse than no date. The date must exist and the year be within 1870..2100.

    >>> [normalize_dob(v) for v in ("1980-4-3", "19800403", 19800403, "03.04.1980", "25/12/1980", "12/25/1980", "03/04/1980", "1980-02-30")]
    ['1980-04-03', '1980-04-03', '1980-04-03', '1980-04-03', '1980-12-25', '1980-12-25', None, None]
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    match = _DOB_ISO.match(text) or _DOB_COMPACT.match(text)
    if match:
        year, month, day = (int(g) for g in match.groups())
    elif match := _DOB_DAY_FIRST_DOTS.match(text):
        day, month, year = (int(g) for g in match.groups())
    elif match := _DOB_SLASHES.match(text):
        first, second, year = (int(g) for g in match.groups())
        if first > 12 >= second or first == second:
            day, month = first, second
        elif second > 12 >= first:
            day, month = second, first
        else:
            return None
    else:
        return None
    if not _MIN_YEAR <= year <= _MAX_YEAR:
        return None
    try:
        return date(year, month, day).isoformat()
    except ValueError:
        return None


_ZIP_PLUS_4 = re.compile(r"^(\d{5})-?\d{4}$")


def normalize_postcode(value: object) -> str | None:
    """Lower-case letters and digits only; a US ZIP+4 keeps its first five digits.

    >>> normalize_postcode("SW1A 1AA"), normalize_postcode("94107-1234"), normalize_postcode(2135)
    ('sw1a1aa', '94107', '2135')
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    zip4 = _ZIP_PLUS_4.match(text)
    if zip4:
        return zip4.group(1)
    text = (normalize_text(text) or "").replace(" ", "")
    return text or None


# Street types written in full and abbreviated: one spelling each (the short one).
_STREET_WORDS = {
    "street": "st", "str": "st", "strasse": "str", "road": "rd", "avenue": "ave", "av": "ave",
    "drive": "dr", "place": "pl", "crescent": "cres", "cresent": "cres", "court": "ct",
    "lane": "ln", "boulevard": "blvd", "circuit": "cct", "parade": "pde", "terrace": "tce",
    "highway": "hwy", "square": "sq", "close": "cl", "grove": "gr", "way": "wy",
    "north": "n", "south": "s", "east": "e", "west": "w", "apartment": "apt", "unit": "u",
}


def normalize_street(value: object) -> str | None:
    """Normalised text with street-type words shortened (Street → st, Road → rd, ...).

    >>> normalize_street("12 Pinkerton Circuit"), normalize_street("12, pinkerton cct.")
    ('12 pinkerton cct', '12 pinkerton cct')
    """
    text = normalize_text(value)
    if text is None:
        return None
    return " ".join(_STREET_WORDS.get(word, word) for word in text.split())


def _key(name: object) -> str:
    """A trait name folded for lookup: ``firstName``, ``first_name``, ``First Name`` → ``firstname``."""
    return re.sub(r"[^a-z0-9]", "", name.lower()) if isinstance(name, str) else ""


# Trait names per field, folded by _key. Segment's reserved traits first, then common
# CRM spellings. The first present, non-empty one wins.
_GIVEN = ("firstname", "givenname", "forename", "first", "fname")
_SURNAME = ("lastname", "surname", "familyname", "last", "lname")
_FULL_NAME = ("name", "fullname")
_DOB = ("birthday", "dob", "dateofbirth", "birthdate")
_STREET = ("street", "streetaddress", "address1", "addressline1", "line1", "address")
_STREET_NUMBER = ("streetnumber", "housenumber", "streetno", "houseno")
_POSTCODE = ("postalcode", "postcode", "zip", "zipcode", "postal", "plz")
_CITY = ("city", "suburb", "town", "locality")
_PHONE = ("phone", "phonenumber", "mobile", "mobilephone", "mobilenumber", "telephone", "tel", "cell")


def _first(source: Mapping[str, object], names: tuple[str, ...]) -> object:
    for name in names:
        value = source.get(name)
        if value is not None and value != "" and not isinstance(value, (dict, list)):
            return value
    return None


def match_record(traits: Mapping[str, object], default_region: str = "US") -> MatchRecord | None:
    """The match record in a profile's traits, or ``None`` when there is too little.

    Names are read from Segment's reserved traits (``firstName``, ``lastName``,
    ``name`` split by :func:`split_name`, ``birthday``, ``address`` {street, city,
    postalCode}, ``phone``) and common CRM spellings (``first_name``,
    ``given_name``, ``surname``, ``dob``, ``date_of_birth``, ``postcode``, ``zip``,
    ``street_address``, ``address_1``, ``street_number``, ``suburb``, ...), in any
    case or separator style. Fields inside an ``address`` object take precedence over
    top-level ones. ``default_region`` is the phone region for national numbers.

    Enough to match on means: a given name or a surname, and at least one of a date
    of birth, a street with a postcode, or a phone number.

    >>> match_record({"name": "Ann Lee", "phone": "(415) 555-0100"})
    MatchRecord(given_name='ann', surname='lee', dob=None, street=None, postcode=None, city=None, phone='+14155550100')
    >>> match_record({"name": "Ann Lee", "address": {"city": "Oslo"}}) is None
    True
    """
    if not isinstance(traits, Mapping):
        return None
    flat: dict[str, object] = {}
    address: dict[str, object] = {}
    for name, value in traits.items():
        folded = _key(name)
        if folded == "address" and isinstance(value, Mapping):
            address = {_key(k): v for k, v in value.items()}
        else:
            flat.setdefault(folded, value)

    given = normalize_text(_first(flat, _GIVEN))
    surname = normalize_text(_first(flat, _SURNAME))
    if given is None and surname is None:
        given, surname = split_name(_first(flat, _FULL_NAME))

    street_raw = _first(address, _STREET) or _first(flat, _STREET)
    number = _first(address, _STREET_NUMBER) or _first(flat, _STREET_NUMBER)
    street = normalize_street(street_raw)
    if street is not None and number is not None:
        number_text = normalize_text(number)
        if number_text and not street.startswith(number_text + " "):
            street = f"{number_text} {street}"
    postcode = normalize_postcode(_first(address, _POSTCODE) or _first(flat, _POSTCODE))
    city = normalize_text(_first(address, _CITY) or _first(flat, _CITY))
    dob = normalize_dob(_first(flat, _DOB))
    phone_raw = _first(flat, _PHONE)
    if isinstance(phone_raw, int) and not isinstance(phone_raw, bool):
        phone_raw = str(phone_raw)
    phone = normalize_phone(phone_raw, default_region) if isinstance(phone_raw, str) else None

    if given is None and surname is None:
        return None
    if dob is None and phone is None and (street is None or postcode is None):
        return None
    return MatchRecord(given, surname, dob, street, postcode, city, phone)


# ----------------------------------------------------------------- blocking


def _compact(name: str) -> str:
    return name.replace(" ", "")


def blocking_keys(record: MatchRecord) -> list[str]:
    """The blocking keys a record is filed under and looked up by (sorted, distinct).

    Candidates for a record are the profiles sharing at least one key. Each key
    survives a different kind of damage, so together they keep recall high while each
    block stays small:

    ==============================  ==================================================
    ``ny:<NYSIIS(name)>:<year>``     per name (given and surname, so swapped names
                                     still meet): a typo that keeps the sound, with the
                                     birth year
    ``sx:<Soundex(name)>:<postcode>`` per name: the same, for records without a date
                                     of birth, or with a wrong one
    ``db:<dob>:<initial>``           per name initial: a date of birth with either
                                     initial, for names typed badly
    ``nm:<Metaphone pair>``          both names' Metaphone codes, sorted: a person who
                                     moved and whose dob is missing or wrong
    ``ad:<postcode>:<no>:<letter>``  postcode, house number and the street name's first
                                     letter: both names badly typed, no date of birth
    ``ph:<phone>``                   the phone number: survives every name change
    ==============================  ==================================================

    Names are taken without spaces; phonetic codes come from jellyfish. A block
    holds everyone sharing the key, so common names and shared family phones make
    big blocks; ``MatchStore`` stops filling a block at a bound, and ranks
    candidates by the number of keys they share.

    >>> ann = MatchRecord(given_name="ann", surname="lee", dob="1984-03-07", street="12 pinkerton cct", postcode="2135", phone="+14155550100")
    >>> blocking_keys(ann)  # doctest: +NORMALIZE_WHITESPACE
    ['ad:2135:12:p', 'db:1984-03-07:a', 'db:1984-03-07:l', 'nm:AN|L', 'ny:AN:1984', 'ny:LY:1984',
     'ph:+14155550100', 'sx:A500:2135', 'sx:L000:2135']
    """
    keys: set[str] = set()
    names = [_compact(n) for n in (record.given_name, record.surname) if n]
    year = record.dob[:4] if record.dob else None
    for name in names:
        if year:
            keys.add(f"ny:{jellyfish.nysiis(name)}:{year}")
        if record.postcode:
            keys.add(f"sx:{jellyfish.soundex(name)}:{record.postcode}")
        if record.dob:
            keys.add(f"db:{record.dob}:{name[0]}")
    if len(names) == 2:
        codes = sorted(jellyfish.metaphone(name) or name for name in names)
        keys.add(f"nm:{codes[0]}|{codes[1]}")
    if record.street and record.postcode:
        words = record.street.split(" ")
        if len(words) > 1 and words[0].isdigit():
            keys.add(f"ad:{record.postcode}:{words[0]}:{words[1][0]}")
    if record.phone:
        keys.add(f"ph:{record.phone}")
    return sorted(keys)


# ------------------------------------------------------------------ config


@dataclass(frozen=True, slots=True)
class FieldRule:
    """Weights (log2 Bayes factors) of one field's comparison levels.

    ``agree``: equal after normalisation. ``close``: Jaro-Winkler similarity at least
    ``close_at`` (names, street, city), or one typo (date of birth: one digit,
    two adjacent digits swapped, or day and month swapped; postcode: one edit;
    phone: the same last 8 digits). ``fuzzy``: Jaro-Winkler at least ``fuzzy_at``; for names also the same NYSIIS
    code, one name being the other's initial, or two adjacent letters swapped.
    ``differ``: none of these, an outright conflict (negative or zero).
    """

    agree: float
    close: float = 0.0
    fuzzy: float = 0.0
    differ: float = 0.0
    close_at: float = 0.92
    fuzzy_at: float = 0.85


# Which levels each field has; a key outside its field's list is a ConfigError.
_FIELD_KEYS = {
    "given_name": ("agree", "close", "fuzzy", "differ", "close_at", "fuzzy_at"),
    "surname": ("agree", "close", "fuzzy", "differ", "close_at", "fuzzy_at"),
    "dob": ("agree", "close", "differ"),
    "street": ("agree", "close", "fuzzy", "differ", "close_at", "fuzzy_at"),
    "postcode": ("agree", "close", "differ"),
    "city": ("agree", "close", "differ", "close_at"),
    "phone": ("agree", "close", "differ"),
}
_TOP_KEYS = ("threshold", "prior", "swap_penalty", "household_cap", "fields")

# The built-in model, the same as the shipped config/matching.yaml (a unit test keeps
# them equal). Tuned on FEBRL 4 and the synthetic set of streamcdp.linkage_data with
# bench/identity_accuracy.py; see docs/matching.md.
_BUILTIN: dict = {
    "threshold": 0.8,
    "prior": -14.0,
    "swap_penalty": 1.0,
    "household_cap": 12.0,
    "fields": {
        "given_name": {"agree": 6.0, "close": 4.0, "fuzzy": 1.5, "differ": -10.0, "close_at": 0.92, "fuzzy_at": 0.85},
        "surname": {"agree": 6.0, "close": 4.0, "fuzzy": 1.5, "differ": -5.0, "close_at": 0.92, "fuzzy_at": 0.85},
        "dob": {"agree": 11.0, "close": 3.0, "differ": -12.0},
        "street": {"agree": 6.0, "close": 4.0, "fuzzy": 1.0, "differ": -2.0, "close_at": 0.92, "fuzzy_at": 0.85},
        "postcode": {"agree": 2.5, "close": 1.0, "differ": -1.5},
        "city": {"agree": 1.0, "close": 0.5, "differ": -0.5, "close_at": 0.92},
        "phone": {"agree": 9.0, "close": 3.0, "differ": -3.0},
    },
}


@dataclass(frozen=True, slots=True)
class MatchConfig:
    """The matching model's parameters (``config/matching.yaml``).

    ``threshold``: the least :func:`score` that links a record to a profile.
    ``prior``: log2 of the prior odds that a blocked candidate is the same person.
    ``swap_penalty``: subtracted when the names only agree crosswise (given ↔ surname).
    ``household_cap``: the most that surname, street, postcode, city and phone add
    together (members of a household share them).
    """

    threshold: float
    prior: float
    swap_penalty: float
    household_cap: float
    given_name: FieldRule
    surname: FieldRule
    dob: FieldRule
    street: FieldRule
    postcode: FieldRule
    city: FieldRule
    phone: FieldRule

    @classmethod
    def builtin(cls) -> "MatchConfig":
        return cls.parse(_BUILTIN, source="built-in matching config")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "MatchConfig":
        """The model in ``path`` (the ``CDP_MATCHING_CONFIG`` file); the shipped
        ``config/matching.yaml`` when None (the built-in model if it is absent)."""
        document = load_document(path, DEFAULT_CONFIG_PATH, "matching config")
        if document is None:
            return cls.builtin()
        return cls.parse(document, source=str(path or DEFAULT_CONFIG_PATH))

    @classmethod
    def parse(cls, document: object, *, source: str = "matching config") -> "MatchConfig":
        """Validate a parsed document; every error names the bad key.

        Every top-level key and every field is required, so that a config file says
        everything the model does."""
        if not isinstance(document, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping with {', '.join(_TOP_KEYS)}")
        _no_unknown(document, _TOP_KEYS, source)
        _required(document, _TOP_KEYS, source)
        threshold = _number(document["threshold"], f"{source}: threshold")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"{source}: threshold must be within (0, 1), got {threshold}")
        prior = _number(document["prior"], f"{source}: prior")
        swap_penalty = _number(document["swap_penalty"], f"{source}: swap_penalty")
        if swap_penalty < 0:
            raise ConfigError(f"{source}: swap_penalty must be >= 0, got {swap_penalty}")
        household_cap = _number(document["household_cap"], f"{source}: household_cap")
        if household_cap <= 0:
            raise ConfigError(f"{source}: household_cap must be > 0, got {household_cap}")
        table = document["fields"]
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: fields must be a mapping of field name → weights")
        _no_unknown(table, tuple(_FIELD_KEYS), f"{source}: fields")
        _required(table, tuple(_FIELD_KEYS), f"{source}: fields")
        rules = {name: _field_rule(table[name], name, f"{source}: fields.{name}") for name in _FIELD_KEYS}
        return cls(threshold, prior, swap_penalty, household_cap, **rules)

    def with_threshold(self, threshold: float) -> "MatchConfig":
        """A copy with another threshold (for tuning)."""
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold must be within (0, 1), got {threshold}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["threshold"] = threshold
        return MatchConfig(**values)

    def to_document(self) -> dict:
        """The config as the YAML document ``parse`` reads."""
        rules = {}
        for name, keys in _FIELD_KEYS.items():
            rule = getattr(self, name)
            rules[name] = {key: getattr(rule, key) for key in keys}
        return {
            "threshold": self.threshold, "prior": self.prior, "swap_penalty": self.swap_penalty,
            "household_cap": self.household_cap, "fields": rules,
        }


def _no_unknown(mapping: Mapping, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")


def _required(mapping: Mapping, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return float(value)


def _field_rule(value: object, name: str, where: str) -> FieldRule:
    keys = _FIELD_KEYS[name]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping with {', '.join(keys)}")
    _no_unknown(value, keys, where)
    if "agree" not in value or "differ" not in value:
        raise ConfigError(f"{where}: 'agree' and 'differ' are required")
    numbers = {key: _number(value[key], f"{where}.{key}") for key in keys if key in value}
    rule = FieldRule(**numbers)
    if rule.agree <= 0:
        raise ConfigError(f"{where}.agree must be > 0, got {rule.agree}")
    if rule.differ > 0:
        raise ConfigError(f"{where}.differ must be <= 0 (a conflict never helps), got {rule.differ}")
    levels = [rule.agree, rule.close] + ([rule.fuzzy] if "fuzzy" in keys else []) + [rule.differ]
    if any(a < b for a, b in zip(levels, levels[1:])):
        raise ConfigError(f"{where}: weights must not increase from agree to differ, got {levels}")
    for key in ("close_at", "fuzzy_at"):
        if key in keys and not 0.0 < getattr(rule, key) <= 1.0:
            raise ConfigError(f"{where}.{key} must be within (0, 1], got {getattr(rule, key)}")
    if "fuzzy_at" in keys and rule.fuzzy_at > rule.close_at:
        raise ConfigError(f"{where}: fuzzy_at ({rule.fuzzy_at}) must not exceed close_at ({rule.close_at})")
    return rule


# ------------------------------------------------------------------ scoring


_AGREE, _CLOSE, _FUZZY, _DIFFER = range(4)


@lru_cache(maxsize=1 << 16)
def _nysiis(name: str) -> str:
    """NYSIIS of a name without spaces; cached, as the same names are compared often."""
    return jellyfish.nysiis(_compact(name))


def _weight(rule: FieldRule, level: int) -> float:
    return (rule.agree, rule.close, rule.fuzzy, rule.differ)[level]


def _name_level(x: str, y: str, close_at: float, fuzzy_at: float) -> int:
    if x == y:
        return _AGREE
    similarity = jellyfish.jaro_winkler_similarity(x, y)
    if similarity >= close_at:
        return _CLOSE
    first_x, first_y = x.split(" ", 1)[0], y.split(" ", 1)[0]
    if first_x == first_y and len(first_x) > 1:  # "mary ann" / "mary"
        return _CLOSE
    if (
        similarity >= fuzzy_at
        or _nysiis(x) == _nysiis(y)
        or (len(first_x) == 1 or len(first_y) == 1) and first_x[0] == first_y[0]
        or _transposed(x, y)
    ):
        return _FUZZY
    return _DIFFER


def _name_weight(x: str, y: str, rule: FieldRule) -> float:
    return _weight(rule, _name_level(x, y, rule.close_at, rule.fuzzy_at))


def _transposed(x: str, y: str) -> bool:
    """Two adjacent letters swapped ("ann" / "nan"): Jaro-Winkler is harsh on short
    names typed this way."""
    return len(x) == len(y) and sorted(x) == sorted(y) and jellyfish.damerau_levenshtein_distance(x, y) == 1


def _dob_typo(a: str, b: str) -> bool:
    """One digit wrong, two adjacent digits swapped, or day and month swapped."""
    x, y = a.replace("-", ""), b.replace("-", "")
    diff = [i for i in range(8) if x[i] != y[i]]
    if len(diff) == 1:
        return True
    if len(diff) == 2 and diff[1] == diff[0] + 1 and x[diff[0]] == y[diff[1]] and x[diff[1]] == y[diff[0]]:
        return True
    return x[:4] == y[:4] and x[4:6] == y[6:8] and x[6:8] == y[4:6]


def _similar_weight(x: str, y: str, rule: FieldRule, has_fuzzy: bool) -> float:
    if x == y:
        return rule.agree
    similarity = jellyfish.jaro_winkler_similarity(x, y)
    if similarity >= rule.close_at:
        return rule.close
    if has_fuzzy and similarity >= rule.fuzzy_at:
        return rule.fuzzy
    return rule.differ


def _crossed(a: MatchRecord, b: MatchRecord, config: MatchConfig) -> tuple[float | None, float | None]:
    """Crosswise name weights (given, surname): a.given ↔ b.surname and a.surname ↔
    b.given. Which of each pair is the given name is unknown, so the two pairs get
    the given-name and surname weights the way that gives the lower total."""
    g, s = config.given_name, config.surname
    same_cutoffs = g.close_at == s.close_at and g.fuzzy_at == s.fuzzy_at
    pairs = []
    for x, y in ((a.given_name, b.surname), (a.surname, b.given_name)):
        if x and y:
            level = _name_level(x, y, g.close_at, g.fuzzy_at)
            other = level if same_cutoffs else _name_level(x, y, s.close_at, s.fuzzy_at)
            pairs.append((_weight(g, level), _weight(s, other)))
        else:
            pairs.append(None)
    first, second = pairs
    options = (
        (first[0] if first else None, second[1] if second else None),  # a's given name is a given name
        (second[0] if second else None, first[1] if first else None),  # a's given name is a surname
    )
    return min(options, key=lambda o: (o[0] or 0.0) + (o[1] or 0.0))


def _weigh(a: MatchRecord, b: MatchRecord, config: MatchConfig, parts: dict[str, float] | None) -> float:
    """The total log2 odds of ``score``; fills ``parts`` when given (``explain``)."""
    given = surname = None
    if a.given_name and b.given_name:
        given = _name_weight(a.given_name, b.given_name, config.given_name)
    if a.surname and b.surname:
        surname = _name_weight(a.surname, b.surname, config.surname)
    straight = (given or 0.0) + (surname or 0.0)
    swapped = False
    cross_1 = a.given_name and b.surname
    cross_2 = a.surname and b.given_name
    if cross_1 or cross_2:
        # Skip the crosswise comparison when it cannot beat the straight one.
        best = max(config.given_name.agree, config.surname.agree)
        if (best if cross_1 else 0.0) + (best if cross_2 else 0.0) - config.swap_penalty > straight:
            crossed_given, crossed_surname = _crossed(a, b, config)
            if (crossed_given or 0.0) + (crossed_surname or 0.0) - config.swap_penalty > straight:
                given, surname, swapped = crossed_given, crossed_surname, True

    dob = street = postcode = city = phone = None
    if a.dob and b.dob:
        rule = config.dob
        dob = rule.agree if a.dob == b.dob else rule.close if _dob_typo(a.dob, b.dob) else rule.differ
    if a.street and b.street:
        street = _similar_weight(a.street, b.street, config.street, True)
    if a.postcode and b.postcode:
        rule = config.postcode
        if a.postcode == b.postcode:
            postcode = rule.agree
        elif jellyfish.damerau_levenshtein_distance(a.postcode, b.postcode) == 1:
            postcode = rule.close
        else:
            postcode = rule.differ
    if a.city and b.city:
        city = _similar_weight(a.city, b.city, config.city, False)
    if a.phone and b.phone:
        rule = config.phone
        phone = rule.agree if a.phone == b.phone else rule.close if a.phone[-8:] == b.phone[-8:] else rule.differ

    positive = negative = 0.0
    for weight in (surname, street, postcode, city, phone):
        if weight is not None:
            if weight > 0:
                positive += weight
            else:
                negative += weight
    household = negative + min(positive, config.household_cap)
    penalty = config.swap_penalty if swapped else 0.0
    total = config.prior + (given or 0.0) + (dob or 0.0) - penalty + household
    if parts is not None:
        for name, weight in (("given_name", given), ("surname", surname), ("dob", dob), ("street", street),
                             ("postcode", postcode), ("city", city), ("phone", phone)):
            if weight is not None:
                parts[name] = weight
        if swapped:
            parts["swap_penalty"] = -penalty
        parts["names_swapped"] = 1.0 if swapped else 0.0
        parts["household"] = household
        parts["total"] = total
    return total


def explain(a: MatchRecord, b: MatchRecord, config: MatchConfig) -> dict[str, float]:
    """The weight each field contributed to ``score(a, b)``, and the totals.

    Keys: the fields both records have (names as finally paired);
    ``names_swapped`` 1.0 when the names counted crosswise, with ``swap_penalty``;
    ``household`` the capped sum of surname, street, postcode, city and phone;
    ``total`` the log2 odds.

    >>> explain(MatchRecord("ann", "lee", "1984-03-07"), MatchRecord("lee", "ann", "1984-03-07"), MatchConfig.builtin())
    {'given_name': 6.0, 'surname': 6.0, 'dob': 11.0, 'swap_penalty': -1.0, 'names_swapped': 1.0, 'household': 6.0, 'total': 8.0}
    """
    parts: dict[str, float] = {}
    _weigh(a, b, config, parts)
    return parts


def score(a: MatchRecord, b: MatchRecord, config: MatchConfig) -> float:
    """How likely ``a`` and ``b`` are the same person, 0..1.

    ``1 / (1 + 2 ** -(prior + Σ weights))``: each field both records have adds the
    weight of its comparison level (see :class:`FieldRule`): Jaro-Winkler for names,
    street and city; exact, one-typo or conflict for date of birth and postcode;
    exact or not for phone. Names are compared straight and crosswise; the better
    pairing counts (crosswise minus ``swap_penalty``). Surname, street, postcode, city
    and phone together add at most ``household_cap``; their negative weights are
    never capped. A field missing on either side adds nothing.
    """
    total = _weigh(a, b, config, None)
    if total > 60:
        return 1.0
    if total < -60:
        return 0.0
    return 1.0 / (1.0 + 2.0 ** -total)


def best_match(
    record: MatchRecord,
    candidates: Sequence[tuple[str, Sequence[MatchRecord]]],
    config: MatchConfig,
) -> tuple[str, float] | None:
    """The candidate profile ``record`` belongs to, with its score, or ``None``.

    A profile's score is the best score over its records, except that a record of
    the profile whose date of birth conflicts with ``record``'s (the ``differ``
    level) caps it at that record's score: a profile never gathers two dates of
    birth, however well another of its records matches. The best profile at or
    above ``config.threshold`` wins; equal scores go to the smallest profile id (the
    oldest, as in merges), so the result does not depend on the candidates' order.
    """
    best: tuple[str, float] | None = None
    for profile_id, records in candidates:
        top = 0.0
        cap = 1.0
        for other in records:
            value = score(record, other, config)
            top = max(top, value)
            if record.dob and other.dob and record.dob != other.dob and not _dob_typo(record.dob, other.dob):
                cap = min(cap, value)
        top = min(top, cap)
        if top < config.threshold:
            continue
        if best is None or top > best[1] or (top == best[1] and profile_id < best[0]):
            best = (profile_id, top)
    return best
