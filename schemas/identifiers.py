"""Identifiers: what they are, how each kind is normalised, and in which order they rank.

Pure functions, no I/O. The ingest stage uses them to extract identifiers from an
event; the CLI and the read API use :func:`parse_identifier` for lookups such as
``streamcdp profile get email:Ann@Example.com``; the CSV/JSONL import and the
identity stage reuse :func:`normalize_identifier` and :func:`collect_identifiers`.

>>> parse_identifier("email: Ann@Example.com ")
Identifier(type='email', value='ann@example.com')
>>> str(parse_identifier("phone:(415) 555-0100"))
'phone:+14155550100'
>>> collect_identifiers([("anonymous_id", "a-9"), ("email", "not-an-email"), ("user_id", " u-17 ")])
(Identifier(type='user_id', value='u-17'), Identifier(type='anonymous_id', value='a-9'))

Every ``normalize_*`` function returns ``None`` for a value that is not a usable
identifier; whether that is an error is the caller's decision (in an event an
unusable email is just a trait; in a lookup it is :class:`InvalidIdentifier`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from schemas.errors import ConfigError, InvalidIdentifier

__all__ = [
    "IDENTIFIER_PRIORITY",
    "BUILTIN_TYPES",
    "MAX_ID_LENGTH",
    "MAX_EMAIL_LENGTH",
    "MAX_TYPE_LENGTH",
    "PHONE_REGIONS",
    "Identifier",
    "PhoneRegion",
    "normalize_email",
    "normalize_phone",
    "normalize_id",
    "normalize_type",
    "normalize_identifier",
    "collect_identifiers",
    "parse_identifier",
    "identifier_rank",
    "phone_region",
]

#: Strongest first. "external" stands for every ``context.externalIds`` type (e.g.
#: ``loyalty_id``); among themselves external types sort by type name.
IDENTIFIER_PRIORITY: tuple[str, ...] = (
    "user_id",
    "email",
    "phone",
    "external",
    "device_id",
    "anonymous_id",
    "previous_id",
)
#: The identifier types with a meaning of their own; any other type is "external".
BUILTIN_TYPES = frozenset(t for t in IDENTIFIER_PRIORITY if t != "external")

#: Longest id value kept (user ids, anonymous ids, device ids, external ids, ...).
#: Ids become Redis keys; anything longer is a bug upstream (a JWT in userId, ...).
MAX_ID_LENGTH = 256
#: RFC 5321 limit on a forward path, the practical maximum of an email address.
MAX_EMAIL_LENGTH = 254
#: Longest identifier type name (``loyalty_id``, ``ga_client_id``, ...).
MAX_TYPE_LENGTH = 64

_RANK: dict[str, int] = {t: i for i, t in enumerate(IDENTIFIER_PRIORITY)}
_EXTERNAL_RANK = _RANK["external"]

# Human spellings accepted by parse_identifier (CLI/API input only).
_TYPE_ALIASES = {
    "userid": "user_id",
    "anonymousid": "anonymous_id",
    "anonymous": "anonymous_id",
    "deviceid": "device_id",
    "previousid": "previous_id",
    "mail": "email",
    "phone_number": "phone",
}


@dataclass(frozen=True, slots=True)
class Identifier:
    """One normalised identifier, e.g. ``Identifier("email", "ann@example.com")``.

    ``type`` is ``user_id``, ``anonymous_id``, ``email``, ``phone``, ``device_id``,
    ``previous_id`` or an external type such as ``loyalty_id``; ``value`` is already
    normalised, so two identifiers are the same person-key exactly when they are equal.
    """

    type: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def identifier_rank(identifier_type: str) -> int:
    """Position of a type in :data:`IDENTIFIER_PRIORITY`; unknown types rank as "external".

    >>> identifier_rank("user_id"), identifier_rank("loyalty_id"), identifier_rank("previous_id")
    (0, 3, 6)
    """
    return _RANK.get(identifier_type, _EXTERNAL_RANK)


# --------------------------------------------------------------------------- ids


def normalize_id(value: str) -> str | None:
    """Trim an id; ``None`` if empty or longer than :data:`MAX_ID_LENGTH` characters.

    Ids are otherwise kept exactly (case matters: ``U-17`` and ``u-17`` differ).

    >>> normalize_id("  u-17 "), normalize_id("   "), normalize_id("x" * 257)
    ('u-17', None, None)
    """
    if type(value) is not str:
        return None
    value = value.strip()
    if not value or len(value) > MAX_ID_LENGTH:
        return None
    return value


def normalize_type(text: str) -> str | None:
    """Normalise an identifier type name: trim, lower-case, inner whitespace → ``_``.

    ``None`` when the result is empty, longer than :data:`MAX_TYPE_LENGTH` or contains
    ``:`` (the separator of the ``type:value`` form).

    >>> normalize_type(" Loyalty ID "), normalize_type("android.id"), normalize_type("a:b")
    ('loyalty_id', 'android.id', None)
    """
    if type(text) is not str:
        return None
    name = "_".join(text.lower().split())
    if not name or len(name) > MAX_TYPE_LENGTH or ":" in name:
        return None
    return name


# ------------------------------------------------------------------------- email

# local@domain.tld: one "@", no whitespace, a domain of dot-separated non-empty
# labels with at least one dot, and a top-level label of two or more characters.
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)*\.[^@\s.]{2,}")


def normalize_email(value: str) -> str | None:
    """NFKC, trim, lower-case; ``None`` unless it looks like ``local@domain.tld``.

    Dots and ``+tags`` are kept: ``a.b+news@gmail.com`` stays distinct from
    ``ab@gmail.com`` (stripping them is a Gmail rule, not an email rule).

    >>> normalize_email("  Ann@Example.COM "), normalize_email("ann@localhost")
    ('ann@example.com', None)
    """
    if type(value) is not str:
        return None
    if not value.isascii():  # NFKC leaves ASCII unchanged: skip it on the common path
        value = unicodedata.normalize("NFKC", value)
    value = value.strip().lower()
    if len(value) > MAX_EMAIL_LENGTH or _EMAIL.fullmatch(value) is None:
        return None
    return value


# ------------------------------------------------------------------------- phone


class PhoneRegion(NamedTuple):
    """Dialling facts for one region (ISO 3166-1 alpha-2 code)."""

    calling_code: str  # country calling code, e.g. "44"
    trunk_prefix: str  # national trunk prefix dropped from national numbers, "" if none
    idd_prefixes: tuple[str, ...] = ()  # international prefixes besides "00"
    national_length: tuple[int, int] | None = None  # (min, max) digits of a national
    #                                       significant number, where it is fixed and well known


_NANP = PhoneRegion("1", "1", ("011",), (10, 10))

#: The regions the phone normaliser knows. Not every country: a region missing here
#: raises ConfigError when used as a default region; numbers written in international
#: form ("+..." or "00...") are accepted from every country whatever the default.
PHONE_REGIONS: dict[str, PhoneRegion] = {
    # North American Numbering Plan: "1" is both the calling code and the trunk prefix.
    "US": _NANP,
    "CA": _NANP,
    "PR": _NANP,
    # Europe
    "GB": PhoneRegion("44", "0", (), (9, 10)),
    "IE": PhoneRegion("353", "0"),
    "DE": PhoneRegion("49", "0"),
    "AT": PhoneRegion("43", "0"),
    "CH": PhoneRegion("41", "0", (), (9, 9)),
    "FR": PhoneRegion("33", "0", (), (9, 9)),
    "BE": PhoneRegion("32", "0", (), (8, 9)),
    "NL": PhoneRegion("31", "0", (), (9, 9)),
    "LU": PhoneRegion("352", ""),
    "ES": PhoneRegion("34", "", (), (9, 9)),
    "PT": PhoneRegion("351", "", (), (9, 9)),
    "IT": PhoneRegion("39", ""),  # the leading 0 of Italian numbers is part of the number
    "GR": PhoneRegion("30", "", (), (10, 10)),
    "SE": PhoneRegion("46", "0"),
    "NO": PhoneRegion("47", "", (), (8, 8)),
    "DK": PhoneRegion("45", "", (), (8, 8)),
    "FI": PhoneRegion("358", "0"),
    "PL": PhoneRegion("48", "", (), (9, 9)),
    "CZ": PhoneRegion("420", "", (), (9, 9)),
    "HU": PhoneRegion("36", "06"),
    "RO": PhoneRegion("40", "0"),
    "UA": PhoneRegion("380", "0"),
    "RU": PhoneRegion("7", "8", ("810",)),
    "TR": PhoneRegion("90", "0"),
    "IL": PhoneRegion("972", "0"),
    # Middle East and Africa
    "AE": PhoneRegion("971", "0"),
    "SA": PhoneRegion("966", "0"),
    "EG": PhoneRegion("20", "0"),
    "ZA": PhoneRegion("27", "0"),
    "NG": PhoneRegion("234", "0", ("009",)),
    # Asia-Pacific
    "IN": PhoneRegion("91", "0"),
    "CN": PhoneRegion("86", "0"),
    "JP": PhoneRegion("81", "0", ("010",)),
    "KR": PhoneRegion("82", "0", ("001", "002")),
    "TW": PhoneRegion("886", "0", ("002",)),
    "HK": PhoneRegion("852", "", ("001",), (8, 8)),
    "SG": PhoneRegion("65", "", ("000", "001", "008"), (8, 8)),
    "MY": PhoneRegion("60", "0"),
    "TH": PhoneRegion("66", "0", ("001",)),
    "PH": PhoneRegion("63", "0"),
    "ID": PhoneRegion("62", "0", ("001", "007")),
    "VN": PhoneRegion("84", "0"),
    "AU": PhoneRegion("61", "0", ("0011",), (9, 9)),
    "NZ": PhoneRegion("64", "0"),
    # Latin America
    "MX": PhoneRegion("52", "", (), (10, 10)),
    "BR": PhoneRegion("55", "0"),
    "AR": PhoneRegion("54", "0"),
    "CL": PhoneRegion("56", ""),
    "CO": PhoneRegion("57", ""),
}

# Separators people write inside phone numbers; deleted before looking at digits.
_PHONE_SEPARATORS = str.maketrans(
    "", "", " \t\n\r\f\v.-()/\u00a0\u2007\u202f\u2010\u2011\u2012\u2013\u2014\u2015\u2212"
)
_E164_MIN_DIGITS = 8
_E164_MAX_DIGITS = 15


def phone_region(region: str) -> PhoneRegion:
    """The :class:`PhoneRegion` for an ISO 3166-1 alpha-2 code; ConfigError if unknown.

    >>> phone_region("gb").calling_code
    '44'
    """
    found = PHONE_REGIONS.get(region)
    if found is None:
        found = PHONE_REGIONS.get(region.upper()) if type(region) is str else None
        if found is None:
            known = ", ".join(sorted(PHONE_REGIONS))
            raise ConfigError(
                f"unknown phone region {region!r}: use an ISO 3166-1 alpha-2 code, one of {known}"
            )
    return found


def normalize_phone(value: str, default_region: str = "US") -> str | None:
    """Normalise a phone number to E.164 (``"+<digits>"``), or ``None`` if unusable.

    A small table-driven normaliser, not libphonenumber:

    * deletes spaces, dots, dashes, slashes, parentheses and a leading ``tel:``;
      ``+44 (0)20 ...`` loses the ``(0)``;
    * ``+`` or ``00`` (or the region's own international prefix, e.g. ``011`` in
      North America) means the number is already international;
    * otherwise it is national: the region's trunk prefix is dropped (``0`` in most
      of Europe, ``1`` for an 11-digit NANP number) and its calling code prepended;
    * letters, extensions and anything not 8–15 digits long in the end give ``None``.

    Limits: there is no per-number validity metadata, so a number of plausible length
    that no operator ever assigned is accepted; a national number that already
    includes its country code without ``+``/``00`` gets the code twice; carrier
    selection codes (Brazil) and Argentina's mobile ``15``/``9`` rules are not
    applied. An unknown ``default_region`` raises :class:`ConfigError`.

    >>> normalize_phone("(415) 555-0100"), normalize_phone("020 7946 0958", "GB")
    ('+14155550100', '+442079460958')
    >>> normalize_phone("0044 20 7946 0958"), normalize_phone("1-800-FLOWERS")
    ('+442079460958', None)
    """
    region = phone_region(default_region)
    if type(value) is not str:
        return None
    if not value.isascii():  # full-width digits and the like become ASCII
        value = unicodedata.normalize("NFKC", value)
    text = value.strip()
    if text[:4].lower() == "tel:":
        text = text[4:].lstrip()
    if "(0)" in text and (text[:1] == "+" or text[:2] == "00"):
        text = text.replace("(0)", "", 1)
    text = text.translate(_PHONE_SEPARATORS)
    if not text:
        return None

    if text[0] == "+":
        digits = text[1:]
        international = True
    else:
        digits = text
        international = False
        for idd in region.idd_prefixes:
            if text.startswith(idd):
                digits, international = text[len(idd) :], True
                break
        else:
            if text.startswith("00"):
                digits, international = text[2:], True

    if not digits.isdigit() or not digits.isascii():
        return None  # letters, a second "+", "x123" extensions, non-ASCII digits
    if international:
        if digits[0] == "0":
            return None  # no country calling code starts with 0
    else:
        trunk = region.trunk_prefix
        if region is _NANP:
            if len(digits) == 11 and digits[0] == "1":
                digits = digits[1:]
        elif trunk and digits.startswith(trunk):
            digits = digits[len(trunk) :]
        if region.national_length is not None:
            low, high = region.national_length
            if not low <= len(digits) <= high:
                return None
        digits = region.calling_code + digits
    if not _E164_MIN_DIGITS <= len(digits) <= _E164_MAX_DIGITS:
        return None
    return "+" + digits


# --------------------------------------------------------------- dispatch & order


def _normalized_value(identifier_type: str, value: object, default_region: str) -> str | None:
    if identifier_type == "email":
        return normalize_email(value) if type(value) is str else None
    if identifier_type == "phone":
        if type(value) is int:
            value = str(value)
        return normalize_phone(value, default_region) if type(value) is str else None
    return normalize_id(value) if type(value) is str else None


# Identifier is a frozen dataclass: its generated __init__ goes through
# object.__setattr__ per field. On the hot path we fill the two slots directly;
# the result is an ordinary Identifier (same class, equality, hash and repr).
_new_object = object.__new__
_set_type = Identifier.__dict__["type"].__set__
_set_value = Identifier.__dict__["value"].__set__


def _make_identifier(identifier_type: str, value: str) -> Identifier:
    identifier = _new_object(Identifier)
    _set_type(identifier, identifier_type)
    _set_value(identifier, value)
    return identifier


def normalize_identifier(identifier_type: str, value: object, default_region: str = "US") -> Identifier | None:
    """Normalise ``value`` as an identifier of ``identifier_type`` (already normalised).

    ``email`` and ``phone`` use their own normalisers, every other type
    :func:`normalize_id`. A phone given as a JSON integer is accepted. Returns
    ``None`` when the value is not usable.

    >>> normalize_identifier("phone", 4155550100)
    Identifier(type='phone', value='+14155550100')
    """
    normalised = _normalized_value(identifier_type, value, default_region)
    if normalised is None:
        return None
    return _make_identifier(identifier_type, normalised)


def collect_identifiers(
    candidates: Iterable[tuple[str, object]], default_region: str = "US"
) -> tuple[Identifier, ...]:
    """Normalise ``(type, raw value)`` pairs into deduplicated, priority-ordered identifiers.

    Unusable values are skipped. Order: :data:`IDENTIFIER_PRIORITY`; external types by
    type name; equal types keep their input order.

    >>> collect_identifiers([("loyalty_id", "L-1"), ("crm_id", "9"), ("email", "A@B.co"), ("email", "a@b.co")])
    (Identifier(type='email', value='a@b.co'), Identifier(type='crm_id', value='9'), Identifier(type='loyalty_id', value='L-1'))
    """
    kept: list[tuple[int, str, int, str, str]] = []
    seen: set[tuple[str, str]] = set()
    in_order = True
    previous: tuple[int, str] = (-1, "")
    for identifier_type, raw in candidates:
        # _normalized_value, inlined for the common plain-id case (hot path).
        if identifier_type == "email" or identifier_type == "phone":
            value = _normalized_value(identifier_type, raw, default_region)
            if value is None:
                continue
        else:
            if type(raw) is not str:
                continue
            value = raw.strip()
            if not value or len(value) > MAX_ID_LENGTH:
                continue
        key = (identifier_type, value)
        if key in seen:
            continue
        seen.add(key)
        rank = _RANK.get(identifier_type, _EXTERNAL_RANK)
        order = (rank, identifier_type if rank == _EXTERNAL_RANK else "")
        if order < previous:
            in_order = False
        previous = order
        kept.append((rank, order[1], len(kept), identifier_type, value))
    if not in_order:
        kept.sort()  # (rank, external type, input position) is unique: a stable priority order
    return tuple([_make_identifier(item[3], item[4]) for item in kept])


def parse_identifier(text: str, default_region: str = "US") -> Identifier:
    """Parse ``"type:value"`` from a CLI argument or an API query into an :class:`Identifier`.

    The type is normalised like an externalIds type (``"Loyalty ID"`` → ``loyalty_id``;
    ``userId``/``anonymousId``/``deviceId``/``previousId`` are accepted as spellings of
    the built-in types); any other type is an external type. The value is normalised
    for its type. Raises :class:`InvalidIdentifier` with a message naming the problem.

    >>> parse_identifier("email:Ann@Example.com")
    Identifier(type='email', value='ann@example.com')
    >>> parse_identifier("loyalty_id:L-1")
    Identifier(type='loyalty_id', value='L-1')
    """
    if type(text) is not str:
        raise InvalidIdentifier(f"an identifier must be a string 'type:value', got {type(text).__name__}")
    type_text, colon, value = text.partition(":")
    if not colon:
        raise InvalidIdentifier(
            f"identifier {_clip(text)!r} has no type: write it as type:value, e.g. email:ann@example.com"
        )
    identifier_type = normalize_type(type_text)
    if identifier_type is None:
        raise InvalidIdentifier(
            f"identifier {_clip(text)!r} has an empty or invalid type before ':'"
            f" (at most {MAX_TYPE_LENGTH} characters)"
        )
    identifier_type = _TYPE_ALIASES.get(identifier_type, identifier_type)
    if not value.strip():
        raise InvalidIdentifier(f"identifier {_clip(text)!r} has an empty value after '{identifier_type}:'")
    identifier = normalize_identifier(identifier_type, value, default_region)
    if identifier is None:
        if identifier_type == "email":
            problem = "is not a valid email address (expected local@domain.tld)"
        elif identifier_type == "phone":
            problem = f"is not a phone number that normalises to E.164 (default region {default_region})"
        else:
            problem = f"is longer than {MAX_ID_LENGTH} characters"
        raise InvalidIdentifier(f"{identifier_type} value {_clip(value.strip())!r} {problem}")
    return identifier


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
