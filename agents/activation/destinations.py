"""Destinations: where segment memberships are activated, and what each may receive.

Pure: parsing ``config/destinations.yaml`` (``CDP_DESTINATIONS`` names another file),
the consent test, and the shaping of what a destination is sent. A destination:

* ``purposes``: the consent purposes (``context.consent.categoryPreferences`` keys,
  or identify traits mapped to a purpose in ``config/profile.yaml``) that must all
  be granted before a profile is activated there; names compare ignoring case;
* ``unknown_consent``: ``deny`` (the default: no recorded choice, no activation, as
  GDPR's opt-in requires) or ``allow`` (an opt-out regime such as the CCPA's: only a
  recorded refusal blocks);
* ``identifiers``: identifier type → ``clear`` or ``sha256`` (the hex SHA-256 of the
  normalised value, as ad platforms' customer matching expects; emails are
  lower-cased and phones are E.164 already). Types not listed are never sent;
* ``traits``: the traits (dotted paths, ``computed.<name>``) it may receive.

Each destination has its own topic, ``cdp.activations.<name>``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agents.profiles.model import CONSENT_PREFIX, MAX_PURPOSE, valid_purpose
from schemas.errors import ConfigError
from streams.config_files import load_document

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "config" / "destinations.yaml"
TOPIC_PREFIX = "cdp.activations."
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # as a segment's destinations list allows
_FORMS = ("clear", "sha256")
_KEYS = ("purposes", "unknown_consent", "identifiers", "traits", "description")


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    purposes: tuple[str, ...]  # lower case
    allow_unknown: bool
    identifiers: tuple[tuple[str, str], ...]  # (type, form), in configured order
    traits: tuple[str, ...]

    @property
    def topic(self) -> str:
        return TOPIC_PREFIX + self.name

    def consented(self, consent: Mapping[str, bool]) -> bool:
        """Whether ``consent`` (purpose in lower case → granted) covers every purpose."""
        for purpose in self.purposes:
            granted = consent.get(purpose)
            if granted is None:
                if not self.allow_unknown:
                    return False
            elif not granted:
                return False
        return True

    def identifiers_of(self, identifiers: Iterable[str]) -> list[dict]:
        """The profile's identifiers (``type:value``) this destination may receive,
        in the form it receives them."""
        forms = dict(self.identifiers)
        out = []
        for stored in identifiers:
            kind, _, value = stored.partition(":")
            form = forms.get(kind)
            if form is None or not value:
                continue
            if form == "sha256":
                out.append({"type": kind, "sha256": hashlib.sha256(value.encode()).hexdigest()})
            else:
                out.append({"type": kind, "value": value})
        return out


class Destinations(Mapping):
    """Configured destinations by name."""

    def __init__(self, destinations: Iterable[Destination] = ()) -> None:
        self._by_name = {d.name: d for d in destinations}

    def __getitem__(self, name: str) -> Destination:
        return self._by_name[name]

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def topics(self) -> list[str]:
        return [d.topic for d in self._by_name.values()]

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Destinations":
        """From ``path``, or the shipped ``config/destinations.yaml``."""
        document = load_document(path or None, DEFAULT_PATH, "destinations")
        return cls.parse(document or {}, source=str(path or DEFAULT_PATH))

    @classmethod
    def parse(cls, document: object, source: str = "destinations") -> "Destinations":
        if not isinstance(document, Mapping) or set(document) - {"destinations"}:
            raise ConfigError(f"{source}: expected a mapping with one key, destinations")
        entries = document.get("destinations") or {}
        if not isinstance(entries, Mapping):
            raise ConfigError(f"{source}: destinations must map a name to its options")
        return cls(_destination(name, options, f"{source}: destinations.{name}") for name, options in entries.items())


def _destination(name: object, options: object, at: str) -> Destination:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{at}: a destination name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not isinstance(options, Mapping):
        raise ConfigError(f"{at}: expected a mapping of options ({', '.join(_KEYS)})")
    unknown = set(options) - set(_KEYS)
    if unknown:
        raise ConfigError(f"{at}: unknown option {sorted(unknown)[0]!r}; expected {', '.join(_KEYS)}")
    purposes = options.get("purposes")
    if isinstance(purposes, str):
        purposes = [purposes]
    if not isinstance(purposes, list) or not purposes:
        raise ConfigError(f"{at}.purposes: name the consent purpose(s) this destination needs, e.g. [marketing]")
    for purpose in purposes:
        if not isinstance(purpose, str) or not purpose.strip() or not valid_purpose(purpose.strip()):
            raise ConfigError(f"{at}.purposes: {purpose!r} is not a purpose name (1-{MAX_PURPOSE} printable characters, no '|')")
    unknown_consent = options.get("unknown_consent", "deny")
    if unknown_consent not in ("deny", "allow"):
        raise ConfigError(f"{at}.unknown_consent: expected deny or allow, got {unknown_consent!r}")
    identifiers = options.get("identifiers") or {}
    if not isinstance(identifiers, Mapping):
        raise ConfigError(f"{at}.identifiers: expected identifier type → clear or sha256, e.g. {{email: sha256}}")
    for kind, form in identifiers.items():
        if form not in _FORMS:
            raise ConfigError(f"{at}.identifiers.{kind}: expected clear or sha256, got {form!r}")
    traits = options.get("traits") or []
    if not isinstance(traits, list) or not all(isinstance(t, str) and t.strip() for t in traits):
        raise ConfigError(f"{at}.traits: expected a list of trait names (dotted paths, computed.<name>)")
    return Destination(
        name,
        tuple(dict.fromkeys(p.strip().lower() for p in purposes)),
        unknown_consent == "allow",
        tuple((str(kind).strip().lower(), form) for kind, form in identifiers.items()),
        tuple(t.strip() for t in traits),
    )


def consent_of(traits: Mapping[str, bytes]) -> dict[str, bool]:
    """Purpose (lower case) → granted, from a profile's stored traits
    (``$consent.<purpose>`` = ``"<ms>|[granted, messageId, channel]"``); where two
    spellings of a purpose differ, the later choice wins."""
    latest: dict[str, tuple[int, bool]] = {}
    for name, raw in traits.items():
        if not name.startswith(CONSENT_PREFIX):
            continue
        at, _, value = raw.partition(b"|")
        granted = value.startswith(b"[true")
        if not granted and not value.startswith(b"[false"):
            continue
        purpose = name[len(CONSENT_PREFIX):].lower()
        held = latest.get(purpose)
        when = int(at or 0)
        if held is None or when >= held[0]:
            latest[purpose] = (when, granted)
    return {purpose: granted for purpose, (_, granted) in latest.items()}
