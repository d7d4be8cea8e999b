"""Sensitive traits: never stored in clear text (pure, no I/O).

Traits classed sensitive (by default ``national_id``, ``passport``,
``passport_number``, ``bank_account``, ``iban``, ``ssn``, ``tax_id``; the
``sensitive:`` section of ``config/profile.yaml`` replaces the list) are replaced,
wherever they occur, by a *protected form*::

    {"sensitive": true, "hash": "blake2b:<64 hex>", "encrypted": "<base64>"}

* ``hash``: a keyed hash of the value, for matching and lookups without clear text
  (two profiles with the same passport number carry the same hash). Keyed BLAKE2b,
  32-byte digest, key ``CDP_ID_HASH_KEY`` (the key of the identifier index, see
  streams/keys.py), personalisation ``cdp.sensitive`` so these digests never equal
  an index key's digest. The value is first serialised canonically with orjson, so
  ``123`` and ``"123"`` hash differently, and the same value always hashes the same,
  in every process. An empty ``CDP_ID_HASH_KEY`` (development) still gives a keyed
  hash, with the empty key, which is a plain BLAKE2b: anyone can then recompute it,
  and a short value such as a 9-digit SSN can be found by trying every candidate. Set
  the key in production.
* ``encrypted``: only when ``CDP_SENSITIVE_KEY`` is set (base64 of 32 bytes):
  AES-256-GCM of the same canonical JSON, base64 of ``version byte (1) | 12-byte
  random nonce | ciphertext | 16-byte tag``, with the ``hash`` string as associated
  data, so a ciphertext moved beside another hash, or any changed byte, fails to
  decrypt (:meth:`SensitivePolicy.reveal` raises ValueError). The random nonce makes
  two encryptions of one value differ; compare values by ``hash``.

Names are compared normalised (:func:`normalize_name`): case-insensitively, with
``-``, spaces and ``_`` equivalent and camelCase split, so ``passportNumber``,
``Passport-Number`` and ``passport_number`` are one name. A sensitive name protects
its whole value, whatever it is (a string, a number, an object). Objects are searched
at any depth, including objects inside lists. Objects shaped like a Segment
``externalIds`` entry whose ``type`` is a sensitive name (``{"type": "passport",
"id": "P99"}``) have their ``id`` replaced by ``"h:" + hash_text(id.strip())``, the
same value :meth:`SensitivePolicy.protect_identifier` gives the identifier.

Protection is applied to raw input once: a value that already looks protected is
protected again.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from hashlib import blake2b

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.errors import ConfigError
from schemas.identifiers import Identifier

__all__ = ["DEFAULT_SENSITIVE_TRAITS", "HASH_ALGORITHM", "SensitivePolicy", "normalize_name"]

DEFAULT_SENSITIVE_TRAITS: tuple[str, ...] = (
    "national_id",
    "passport",
    "passport_number",
    "bank_account",
    "iban",
    "ssn",
    "tax_id",
)
#: The prefix of every ``hash`` of a protected form.
HASH_ALGORITHM = "blake2b"

_PERSON = b"cdp.sensitive"
_DIGEST_SIZE = 32
_KEY_SIZE = 32
_NONCE_SIZE = 12
_TAG_SIZE = 16
_VERSION = b"\x01"
_HASHED_ID = re.compile(r"h:[0-9a-f]{%d}" % (2 * _DIGEST_SIZE))
_MAX_CACHED_NAMES = 4096
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[-_\s]+")
_dict = dict
_list = list


def normalize_name(name: str) -> str:
    """The form names are compared in: camelCase split, lower case, runs of ``-``,
    ``_`` and whitespace as one ``_``, none at either end.

    >>> [normalize_name(n) for n in ("passportNumber", "Passport-Number", " passport  number ", "IBAN", "taxID", "SSNNumber")]
    ['passport_number', 'passport_number', 'passport_number', 'iban', 'tax_id', 'ssn_number']
    """
    return _SEPARATORS.sub("_", _CAMEL.sub("_", name)).strip("_").lower()


class SensitivePolicy:
    """Which traits are sensitive, and how they are protected (see the module doc).

    Build it with :meth:`from_config`. Thread-safe; its only state besides the keys is
    a bounded cache of name verdicts.
    """

    __slots__ = ("_names", "_hasher", "_aead", "_clean", "_hot", "_tokens")

    def __init__(self, names: frozenset[str], *, hash_key: bytes, encryption_key: bytes | None = None):
        self._names = names
        # BLAKE2b takes at most 64 key bytes (streams/keys.py truncates the same way);
        # keyed once here, copied per hash.
        self._hasher = blake2b(digest_size=_DIGEST_SIZE, key=hash_key[:64], person=_PERSON)
        self._aead = AESGCM(encryption_key) if encryption_key is not None else None
        # Raw names already judged: not sensitive / sensitive. Bounded; only speed depends on them.
        self._clean: set[str] = set()
        self._hot: set[str] = set()
        # The first word of each name, lower case: however a producer spells the key
        # (national_id, nationalId, NATIONAL-ID), its JSON holds that word.
        self._tokens = tuple(sorted({name.split("_")[0].encode() for name in names}))

    @classmethod
    def from_config(
        cls, section: dict | None, *, hash_key: str, encryption_key_b64: str = "", source: str = "config"
    ) -> "SensitivePolicy":
        """From the ``sensitive:`` mapping of config/profile.yaml, ``{"traits": [...]}``.

        ``None``, ``{}`` or no ``traits`` key: the defaults. A list replaces the
        defaults (an empty list: nothing is sensitive). ``hash_key`` is
        ``CDP_ID_HASH_KEY`` (may be empty), ``encryption_key_b64`` ``CDP_SENSITIVE_KEY``
        (empty: no encryption). Anything malformed raises ConfigError naming ``source``.
        """
        names: tuple[str, ...] = DEFAULT_SENSITIVE_TRAITS
        if section is not None:
            if not isinstance(section, Mapping):
                raise ConfigError(f"{source}: expected a mapping with the key traits, got {_kind(section)}")
            unknown = sorted(str(key) for key in section if key != "traits")
            if unknown:
                raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; expected only traits")
            if section.get("traits") is not None:
                listed = section["traits"]
                if not isinstance(listed, (list, tuple)):
                    raise ConfigError(f"{source}: traits: expected a list of trait names, got {_kind(listed)}")
                for index, name in enumerate(listed):
                    if not isinstance(name, str) or not normalize_name(name):
                        raise ConfigError(
                            f"{source}: traits[{index}]: expected a non-blank trait name, got {name!r}"
                        )
                    if "." in name:
                        raise ConfigError(
                            f"{source}: traits[{index}]: {name!r} is a path; list plain names"
                            " (a sensitive name is protected at any depth)"
                        )
                names = tuple(listed)
        if not isinstance(hash_key, str):
            raise ConfigError(f"{source}: the hash key (CDP_ID_HASH_KEY) must be text")
        return cls(
            frozenset(normalize_name(name) for name in names),
            hash_key=hash_key.encode(),
            encryption_key=_decode_key(encryption_key_b64, source),
        )

    # ---------------------------------------------------------------- queries

    @property
    def names(self) -> tuple[str, ...]:
        """The sensitive names, normalised and sorted."""
        return tuple(sorted(self._names))

    @property
    def encrypts(self) -> bool:
        """True when an encryption key is configured (protected forms carry ``encrypted``)."""
        return self._aead is not None

    def __repr__(self) -> str:  # never the keys
        return f"SensitivePolicy(names={self.names!r}, encrypts={self.encrypts})"

    def is_sensitive(self, name: str) -> bool:
        """Whether a trait (or identifier type) of this name is sensitive."""
        if name in self._clean:
            return False
        if name in self._hot:
            return True
        verdict = normalize_name(name) in self._names
        cache = self._hot if verdict else self._clean
        if len(cache) < _MAX_CACHED_NAMES:
            cache.add(name)
        return verdict

    def might_contain(self, raw: bytes) -> bool:
        """False only when the event's JSON ``raw`` cannot hold a sensitive name:
        none of the names' first words occurs in it (case-insensitively) and it has
        no ``\\u`` escape (which could spell a key differently). A cheap screen
        before :meth:`protect_traits` / :meth:`redact` walk the event."""
        if not self._tokens:
            return False
        lowered = raw.lower()
        if b"\\u" in lowered:
            return True
        return any(token in lowered for token in self._tokens)

    # ------------------------------------------------------------- protection

    def protect_traits(self, traits: dict) -> dict:
        """``traits`` with every sensitive-named value, at any depth of nested objects
        and of objects inside lists, replaced by its protected form. The input is
        never changed; when nothing is sensitive the same object is returned."""
        if not self._names or not traits:
            return traits
        return self._protect_dict(traits)

    def redact(self, obj: dict) -> dict:
        """The same as :meth:`protect_traits`, for event properties and whole payloads
        (history entries, republished events)."""
        if not self._names or not obj:
            return obj
        return self._protect_dict(obj)

    def protect_value(self, value: object) -> dict:
        """``{"sensitive": True, "hash": "blake2b:<hex>"}``, plus ``"encrypted"`` when
        an encryption key is configured."""
        data = orjson.dumps(value)
        digest = f"{HASH_ALGORITHM}:{self._digest(data)}"
        if self._aead is None:
            return {"sensitive": True, "hash": digest}
        nonce = os.urandom(_NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, data, digest.encode())
        return {"sensitive": True, "hash": digest, "encrypted": base64.b64encode(_VERSION + nonce + sealed).decode()}

    def reveal(self, protected: dict) -> object | None:
        """The clear value of a protected form: needs the encryption key and an
        ``encrypted`` entry, else None. Raises ValueError when the form was altered
        (or encrypted with another key)."""
        if not isinstance(protected, Mapping) or protected.get("sensitive") is not True:
            raise ValueError("not a protected value")
        sealed = protected.get("encrypted")
        if self._aead is None or sealed is None:
            return None
        digest = protected.get("hash")
        if not isinstance(sealed, str) or not isinstance(digest, str):
            raise ValueError("malformed protected value")
        try:
            blob = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("malformed protected value: encrypted is not base64") from None
        if len(blob) < 1 + _NONCE_SIZE + _TAG_SIZE or blob[:1] != _VERSION:
            raise ValueError("malformed protected value: unknown format")
        try:
            data = self._aead.decrypt(blob[1 : 1 + _NONCE_SIZE], blob[1 + _NONCE_SIZE :], digest.encode())
        except InvalidTag:
            raise ValueError("protected value does not decrypt: altered, or encrypted with another key") from None
        return orjson.loads(data)

    def protect_identifier(self, identifier: Identifier) -> Identifier:
        """For an identifier of a sensitive type (an externalIds entry of type
        ``national_id``, say): ``Identifier(type, "h:" + hash_text(value))``, so it is
        linked and looked up by its keyed hash only. Other identifiers, and values
        already in that form, are returned unchanged."""
        if not self._names or not self.is_sensitive(identifier.type):
            return identifier
        if _HASHED_ID.fullmatch(identifier.value):
            return identifier
        return Identifier(identifier.type, "h:" + self.hash_text(identifier.value))

    def hash_text(self, text: str) -> str:
        """The keyed hash of a text value, in hex: the digest part of
        ``protect_value(text)["hash"]`` (so an identifier's ``h:`` value and a trait
        holding the same string match)."""
        return self._digest(orjson.dumps(text))

    # ---------------------------------------------------------------- helpers

    def _digest(self, data: bytes) -> str:
        hasher = self._hasher.copy()
        hasher.update(data)
        return hasher.hexdigest()

    def _protect_dict(self, obj: dict) -> dict:
        """``obj`` itself when nothing in it is sensitive, else a protected copy: one
        set lookup per name (names already judged not sensitive) and a type check per
        value."""
        out = None
        clean = self._clean
        for name, value in obj.items():
            if name not in clean and self.is_sensitive(name):
                if out is None:
                    out = dict(obj)
                out[name] = self.protect_value(value)  # the whole value, whatever it is
                continue
            kind = type(value)
            if kind is _dict:
                if not value:
                    continue
                inner = self._protect_dict(value)
            elif kind is _list:
                if not value:
                    continue
                inner = self._protect_list(value)
            else:
                continue
            if inner is not value:
                if out is None:
                    out = dict(obj)
                out[name] = inner
        if "id" in obj and "type" in obj:
            out = self._protect_external_id(obj, out)
        return obj if out is None else out

    def _protect_external_id(self, obj: dict, out: dict | None) -> dict | None:
        """An object shaped like an externalIds entry with a sensitive ``type``: its
        ``id`` becomes the identifier's hashed value (``"h:<hex>"``, a string still)."""
        kind = obj["type"]
        ext_id = obj["id"]
        if (
            type(kind) is str
            and type(ext_id) is str
            and self.is_sensitive(kind)
            and (out is None or out["id"] is ext_id)  # not already replaced as a sensitive name
            and not _HASHED_ID.fullmatch(ext_id)
        ):
            if out is None:
                out = dict(obj)
            out["id"] = "h:" + self.hash_text(ext_id.strip())
        return out

    def _protect_list(self, items: list) -> list:
        out = None
        for index, item in enumerate(items):
            kind = type(item)
            if kind is _dict and item:
                inner = self._protect_dict(item)
            elif kind is _list and item:
                inner = self._protect_list(item)
            else:
                continue
            if inner is not item:
                if out is None:
                    out = list(items)
                out[index] = inner
        return items if out is None else out


def _decode_key(text: str, source: str) -> bytes | None:
    if not isinstance(text, str):
        raise ConfigError(f"{source}: the encryption key (CDP_SENSITIVE_KEY) must be text")
    text = text.strip()
    if not text:
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: the encryption key (CDP_SENSITIVE_KEY) is not valid base64") from None
    if len(key) != _KEY_SIZE:
        raise ConfigError(
            f"{source}: the encryption key (CDP_SENSITIVE_KEY) must be {_KEY_SIZE} bytes (AES-256) once"
            f" base64-decoded, got {len(key)}; make one with: head -c 32 /dev/urandom | base64"
        )
    return key


def _kind(value: object) -> str:
    return type(value).__name__
