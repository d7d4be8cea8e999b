"""What an event contributes to its profile (pure): traits, consent, computed-trait
operations and a history entry, as the arguments of the profile's Lua step.

Options come from ``config/profile.yaml`` (or the file ``CDP_PROFILE_CONFIG`` names)::

    history:
      length: 20                 # newest events kept per profile; 0 keeps none
      max_properties_bytes: 512  # larger properties are left out of the entry
    sensitive:
      traits: [national_id, passport, ...]   # never stored in clear text
    consent:
      traits: {email_opt_in: marketing}      # identify trait → consent purpose

and the computed traits from ``config/computed-traits.yaml`` (``CDP_COMPUTED_TRAITS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from agents.profiles.computed import ComputedTraits, event_name
from agents.profiles.sensitive import SensitivePolicy
from schemas.errors import ConfigError
from schemas.events import Event
from streams.config_files import load_document

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "config" / "profile.yaml"
# Consent per purpose lives beside the traits, under names no trait can have
# (trait names may not start with "$"), so it follows the same latest-wins rule.
CONSENT_PREFIX = "$consent."
MAX_PURPOSE = 64
_MAX_HISTORY = 1000


@dataclass(frozen=True, slots=True)
class ProfileModel:
    computed: ComputedTraits
    sensitive: SensitivePolicy
    history_length: int = 20
    history_properties_bytes: int = 512
    # Identify traits that record a consent choice (true/false): trait name → purpose.
    consent_traits: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(cls, settings) -> "ProfileModel":
        """From the files ``settings`` names (the shipped ones by default)."""
        source = settings.profile_config or str(DEFAULT_PATH)
        document = load_document(settings.profile_config or None, DEFAULT_PATH, "profile options") or {}
        return cls.parse(
            document, ComputedTraits.load(settings.computed_traits or None),
            hash_key=settings.id_hash_key, encryption_key_b64=settings.sensitive_key, source=source,
        )

    @classmethod
    def parse(
        cls, document: object, computed: ComputedTraits, *, hash_key: str = "", encryption_key_b64: str = "",
        source: str = "profile options",
    ) -> "ProfileModel":
        if not isinstance(document, Mapping) or set(document) - {"history", "sensitive", "consent"}:
            raise ConfigError(f"{source}: expected a mapping with the keys history, sensitive and/or consent")
        history = document.get("history") or {}
        if not isinstance(history, Mapping) or set(history) - {"length", "max_properties_bytes"}:
            raise ConfigError(f"{source}: history: expected a mapping with length and/or max_properties_bytes")
        length = history.get("length", 20)
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= _MAX_HISTORY:
            raise ConfigError(f"{source}: history.length: expected a whole number from 0 to {_MAX_HISTORY}, got {length!r}")
        size = history.get("max_properties_bytes", 512)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 32768:
            raise ConfigError(f"{source}: history.max_properties_bytes: expected a whole number from 0 to 32768, got {size!r}")
        sensitive = SensitivePolicy.from_config(
            document.get("sensitive"), hash_key=hash_key, encryption_key_b64=encryption_key_b64, source=f"{source}: sensitive"
        )
        for trait in computed.traits:
            for path in (*trait.paths, *((trait.per,) if trait.per else ())):
                # Only counting stores nothing of the values themselves.
                if any(sensitive.is_sensitive(part) for part in path) and trait.aggregate != "count":
                    raise ConfigError(
                        f"computed trait {trait.name}: {'.'.join(path)} is a sensitive field; "
                        f"aggregate {trait.aggregate} would store its values in clear text"
                    )
                if trait.per is path and any(sensitive.is_sensitive(part) for part in path):
                    raise ConfigError(f"computed trait {trait.name}: per {'.'.join(path)} would store sensitive values as group names")
        return cls(computed, sensitive, length, size, _consent_traits(document.get("consent"), f"{source}: consent"))

    def traits_of(self, event: Event, *, plain: bool = False) -> list[tuple[str, bytes]]:
        """The event's traits by dotted path (``address.city``), sensitive ones
        protected, and its consent choices as ``$consent.<purpose>``: (name, JSON).
        ``plain``: the event is known to hold no sensitive name (``might_contain``)."""
        out: list[tuple[str, bytes]] = []
        if event.traits:
            _flatten(event.traits if plain else self.sensitive.protect_traits(event.traits), "", out)
        for purpose, granted in self.consent_of(event):
            out.append((CONSENT_PREFIX + purpose, orjson.dumps([granted, event.message_id, event.channel])))
        return out

    def consent_of(self, event: Event) -> list[tuple[str, bool]]:
        """The consent choices an event records: ``context.consent.categoryPreferences``
        and, on identify events, the traits ``consent.traits`` maps to a purpose
        (where both name a purpose, the categoryPreferences entry wins)."""
        found: dict[str, bool] = {}
        if self.consent_traits and event.type == "identify" and event.traits:
            for trait, purpose in self.consent_traits:
                granted = event.traits.get(trait)
                if isinstance(granted, bool):
                    found[purpose] = granted
        consent = event.context.get("consent") if event.context else None
        if isinstance(consent, dict):
            preferences = consent.get("categoryPreferences")
            if isinstance(preferences, dict):
                for purpose, granted in preferences.items():
                    if isinstance(granted, bool) and valid_purpose(purpose):
                        found[purpose] = granted
        return list(found.items())

    def history_entry(self, event: Event, *, plain: bool = False) -> bytes:
        """``"<event ms>|<JSON>"``, or b"" when history is off."""
        if self.history_length == 0:
            return b""
        entry = {"messageId": event.message_id, "type": event.type, "event": event_name(event), "channel": event.channel}
        if event.properties:
            properties = orjson.dumps(event.properties if plain else self.sensitive.redact(event.properties))
            if len(properties) <= self.history_properties_bytes:
                return b"%d|%s,\"properties\":%s}" % (event.timestamp_ms, orjson.dumps(entry)[:-1], properties)
            entry["propertiesOmitted"] = True
        return b"%d|%s" % (event.timestamp_ms, orjson.dumps(entry))


def _flatten(traits: dict, prefix: str, out: list) -> None:
    for name, value in traits.items():
        # A protected sensitive value ({"sensitive": true, "hash": ...}) is one leaf.
        if isinstance(value, dict) and value and value.get("sensitive") is not True:
            _flatten(value, f"{prefix}{name}.", out)
        else:
            out.append((prefix + name, orjson.dumps(value)))


def _consent_traits(raw: object, at: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or set(raw) - {"traits"}:
        raise ConfigError(f"{at}: expected a mapping with the key traits (identify trait → consent purpose)")
    traits = raw.get("traits") or {}
    if not isinstance(traits, Mapping):
        raise ConfigError(f"{at}.traits: expected identify trait name → consent purpose, e.g. {{email_opt_in: marketing}}")
    out = []
    for trait, purpose in traits.items():
        if not isinstance(trait, str) or not trait or not isinstance(purpose, str) or not valid_purpose(purpose):
            raise ConfigError(f"{at}.traits.{trait}: expected a purpose name (1-{MAX_PURPOSE} printable characters, no '|')")
        out.append((trait, purpose))
    return tuple(out)


def valid_purpose(purpose: str) -> bool:
    """A consent purpose name an event can record (and a destination can need)."""
    return 0 < len(purpose) <= MAX_PURPOSE and purpose.isprintable() and "|" not in purpose


def unflatten(fields: Mapping[str, tuple[int, object]]) -> dict:
    """Dotted trait paths back into nested objects. Where a path is both a value and
    an object (``address`` set as text, later ``address.city``), the one written by
    the later event wins."""
    out: dict = {}
    for name, (_, value) in sorted(fields.items(), key=lambda item: (item[1][0], item[0])):
        parts = name.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return _sorted(out)


def _sorted(tree: dict) -> dict:
    return {k: _sorted(v) if isinstance(v, dict) else v for k, v in sorted(tree.items())}
