"""Identity rules: per identifier type, a priority and a limit per profile.

Loaded from YAML (``config/identity-rules.yaml``, or the file ``CDP_IDENTITY_RULES``
names) and validated with errors that name the path and the problem.

>>> rules = IdentityRules.parse({"identifiers": {"user_id": {"priority": 1, "limit": 1}}})
>>> rules.limit("user_id"), rules.limit("anything_else")
(1, 10)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schemas.errors import ConfigError
from streams.config_files import load_document

DEFAULT_RULES_PATH = Path(__file__).resolve().parents[2] / "config" / "identity-rules.yaml"
_BUILTIN = {
    "identifiers": {
        "user_id": {"priority": 1, "limit": 1},
        "loyalty_id": {"priority": 2, "limit": 1},
        "email": {"priority": 3, "limit": 5},
        "phone": {"priority": 4, "limit": 5, "strong": False},
        "device_id": {"priority": 5, "limit": 100},
        "anonymous_id": {"priority": 6, "limit": 1000},
    },
    "default": {"priority": 10, "limit": 10},
}


@dataclass(frozen=True, slots=True)
class TypeRule:
    priority: int
    limit: int
    # A weak identifier is kept on the profile that first had it (lookups find it)
    # but never links two events by itself: households share phone numbers.
    strong: bool = True


@dataclass(frozen=True, slots=True)
class IdentityRules:
    types: Mapping[str, TypeRule] = field(default_factory=dict)
    default: TypeRule = TypeRule(10, 10)

    @classmethod
    def builtin(cls) -> "IdentityRules":
        return cls.parse(_BUILTIN)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "IdentityRules":
        """Rules from ``path``; the shipped file when None (built-in if it is absent)."""
        document = load_document(path, DEFAULT_RULES_PATH, "identity rules")
        if document is None:
            return cls.builtin()
        return cls.parse(document, source=str(path or DEFAULT_RULES_PATH))

    @classmethod
    def parse(cls, document: object, *, source: str = "identity rules") -> "IdentityRules":
        if not isinstance(document, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping with 'identifiers'")
        unknown = set(document) - {"identifiers", "default"}
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        identifiers = document.get("identifiers") or {}
        if not isinstance(identifiers, Mapping):
            raise ConfigError(f"{source}: 'identifiers' must be a mapping of type → {{priority, limit}}")
        types = {str(name): _rule(value, f"{source}: identifiers.{name}") for name, value in identifiers.items()}
        default = _rule(document.get("default", {"priority": 10, "limit": 10}), f"{source}: default")
        return cls(types, default)

    def rule(self, identifier_type: str) -> TypeRule:
        return self.types.get(identifier_type, self.default)

    def limit(self, identifier_type: str) -> int:
        return self.rule(identifier_type).limit

    def priority(self, identifier_type: str) -> int:
        return self.rule(identifier_type).priority

    def strong(self, identifier_type: str) -> bool:
        return self.rule(identifier_type).strong

    def to_document(self) -> dict:
        """The rules as the YAML document they parse from."""
        def rule(r: TypeRule) -> dict:
            return {"priority": r.priority, "limit": r.limit, "strong": r.strong}

        return {"identifiers": {t: rule(r) for t, r in self.types.items()}, "default": rule(self.default)}

    def violations(self, identifiers: Iterable[str]) -> list[str]:
        """Types whose count of distinct ``type:value`` identifiers exceeds the limit."""
        counts = Counter(i.split(":", 1)[0] for i in set(identifiers))
        return sorted(t for t, n in counts.items() if n > self.limit(t))


def _rule(value: object, path: str) -> TypeRule:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: must be a mapping with 'priority' and 'limit'")
    unknown = set(value) - {"priority", "limit", "strong"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    priority, limit = value.get("priority"), value.get("limit")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigError(f"{path}.priority: must be an integer, got {priority!r}")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"{path}.limit: must be an integer >= 1, got {limit!r}")
    strong = value.get("strong", True)
    if not isinstance(strong, bool):
        raise ConfigError(f"{path}.strong: must be true or false, got {strong!r}")
    return TypeRule(priority, limit, strong)
