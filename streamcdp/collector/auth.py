"""Write keys: which source and channel a request comes from.

Keys are configured in ``CDP_WRITE_KEYS`` (``KEY=channel,KEY2=channel``) and/or a
YAML file named by ``CDP_WRITE_KEYS_FILE``::

    # write key: {source: a name for logs and headers, channel: web | app | pos | server}
    "wk_3f9c0b6e1d": {source: shop-website, channel: web}
    "wk_77a1e09c4f": {source: ios-app, channel: app}
    "wk_0c5d2a9b88": pos            # short form: the channel; the source is named after it

A client sends its key as the HTTP basic-auth user name with an empty password (both
Python SDKs do) or, without an ``Authorization`` header, as ``writeKey`` in the body
(analytics.js). Keys are compared in constant time (SHA-256 digests, every entry
compared) and never logged: logs and error messages name a key by
:func:`fingerprint` at most.

With no key configured the collector refuses to start, unless
``CDP_COLLECTOR_ALLOW_ANONYMOUS=true``: then a request without a key — and, when no
keys are configured at all, every request — counts as source ``anonymous`` on
channel ``web``. A key that is presented but unknown is still refused when keys
are configured.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from schemas.errors import ConfigError, StreamCDPError
from streams.topics import EVENTS_APP, EVENTS_POS, EVENTS_WEB

ENV_KEYS = "CDP_WRITE_KEYS"
ENV_KEYS_FILE = "CDP_WRITE_KEYS_FILE"
ENV_ALLOW_ANONYMOUS = "CDP_COLLECTOR_ALLOW_ANONYMOUS"

#: Channel of a write key → inbound topic. Server-side sources (back ends sending
#: with the Python SDKs) describe web and app users alike; they go to the web topic
#: and keep ``context.channel = "server"`` so their origin stays visible.
CHANNEL_TOPICS: dict[str, str] = {
    "web": EVENTS_WEB,
    "app": EVENTS_APP,
    "pos": EVENTS_POS,
    "server": EVENTS_WEB,
}
_CHANNELS_TEXT = ", ".join(CHANNEL_TOPICS)


class Unauthorized(StreamCDPError):
    """A missing, malformed or unknown write key: answered 401."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a request comes from: a named source on a channel."""

    name: str
    channel: str
    #: :func:`fingerprint` of the key, for logs; "-" for the anonymous source.
    key_id: str = "-"

    @property
    def topic(self) -> str:
        return CHANNEL_TOPICS[self.channel]

    @property
    def channel_note(self) -> str | None:
        """The ``context.channel`` to add to messages lacking one (``server`` only)."""
        return "server" if self.channel == "server" else None


ANONYMOUS = Source("anonymous", "web")


def fingerprint(key: str) -> str:
    """A short, one-way name for a key in logs: ``key-`` and 8 hex digits of SHA-256.

    >>> fingerprint("secret")
    'key-2bb80d53'
    """
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class WriteKeys:
    """The configured keys; :meth:`authenticate` maps a presented key to its :class:`Source`."""

    def __init__(self, sources: Mapping[str, Source], *, allow_anonymous: bool = False) -> None:
        if not sources and not allow_anonymous:
            raise ConfigError(
                f"no write keys configured: set {ENV_KEYS}=KEY=channel,... or {ENV_KEYS_FILE}=keys.yaml"
                f" (channels: {_CHANNELS_TEXT}), or {ENV_ALLOW_ANONYMOUS}=true to accept every request"
                " without a key as channel web"
            )
        # Only digests are kept: the keys themselves are not needed after start-up.
        self._entries = tuple((_digest(key), source) for key, source in sources.items())
        self.allow_anonymous = allow_anonymous

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WriteKeys":
        """Keys from ``CDP_WRITE_KEYS`` and ``CDP_WRITE_KEYS_FILE``; ConfigError when wrong."""
        env = os.environ if env is None else env
        sources = parse_keys_env(env.get(ENV_KEYS, ""))
        path = env.get(ENV_KEYS_FILE, "").strip()
        if path:
            for key, source in load_keys_file(Path(path)).items():
                if key in sources and sources[key].channel != source.channel:
                    raise ConfigError(
                        f"write key {source.key_id} is in both {ENV_KEYS} (channel {sources[key].channel})"
                        f" and {path} (channel {source.channel}); keep one"
                    )
                sources[key] = source
        return cls(sources, allow_anonymous=_flag(env.get(ENV_ALLOW_ANONYMOUS, ""), ENV_ALLOW_ANONYMOUS))

    def sources(self) -> list[Source]:
        """The configured sources (with key fingerprints), for the start-up log line."""
        return [source for _, source in self._entries]

    def authenticate(self, key: str | None) -> Source:
        """The source of ``key``; :class:`Unauthorized` when it is missing or unknown."""
        if key is None:
            if self.allow_anonymous:
                return ANONYMOUS
            raise Unauthorized(
                "missing_write_key",
                "no write key: send it as the HTTP basic auth user name (password empty)",
            )
        presented = _digest(key)
        found = None
        for digest, source in self._entries:  # every entry, so timing says nothing
            if hmac.compare_digest(presented, digest):
                found = source
        if found is not None:
            return found
        if self.allow_anonymous and not self._entries:
            return ANONYMOUS
        raise Unauthorized("invalid_write_key", "the write key is not valid")

    def __repr__(self) -> str:
        return f"WriteKeys({len(self._entries)} keys, allow_anonymous={self.allow_anonymous})"


def key_from_authorization(header: str | None) -> str | None:
    """The write key in an ``Authorization: Basic base64(KEY:)`` header, or ``None`` without one.

    >>> key_from_authorization("Basic " + base64.b64encode(b"wk_1:").decode())
    'wk_1'
    """
    if header is None or not header.strip():
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized(
            "unsupported_authorization",
            f"Authorization scheme {scheme[:20]!r} is not supported; use Basic with the write key as user name",
        )
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("invalid_authorization", "the Basic credentials are not valid base64 of 'KEY:'") from None
    user, _, _password = decoded.partition(":")
    return user or None


# ------------------------------------------------------------------- parsing


def parse_keys_env(text: str) -> dict[str, Source]:
    """``KEY=channel,KEY2=channel`` → key → Source (source named after the channel).

    Errors name the entry by position, never the key.

    >>> parse_keys_env("k1=web, k2=pos")["k2"].channel
    'pos'
    """
    sources: dict[str, Source] = {}
    for position, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        key, equals, channel = (part.strip() for part in entry.partition("="))
        where = f"{ENV_KEYS} entry {position}"
        if not equals:
            raise ConfigError(f"{where} has no '=': write KEY=channel (channels: {_CHANNELS_TEXT})")
        _check_key(key, where)
        channel = _channel(channel, where)
        source = Source(channel, channel, fingerprint(key))
        if key in sources and sources[key].channel != source.channel:
            raise ConfigError(f"{where}: write key {source.key_id} is listed twice with different channels")
        sources[key] = source
    return sources


def load_keys_file(path: Path) -> dict[str, Source]:
    """The YAML file ``key: {source: NAME, channel: CHANNEL}`` → key → Source."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{ENV_KEYS_FILE}={path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{ENV_KEYS_FILE}={path}: not valid YAML ({exc})") from None
    if document is None:
        return {}
    if type(document) is not dict:
        raise ConfigError(f"{ENV_KEYS_FILE}={path}: expected a mapping of write key to {{source, channel}}")
    sources: dict[str, Source] = {}
    for position, (key, entry) in enumerate(document.items(), start=1):
        where = f"{path} entry {position}"
        if type(key) is not str:
            raise ConfigError(f"{where}: the write key must be a string (quote it in the YAML)")
        _check_key(key, where)
        if type(entry) is str:
            entry = {"channel": entry}
        if type(entry) is not dict:
            raise ConfigError(f"{where}: expected {{source: NAME, channel: CHANNEL}}")
        unknown = set(entry) - {"source", "channel"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        channel = _channel(entry.get("channel"), where)
        name = entry.get("source", channel)
        if type(name) is not str or not name.strip():
            raise ConfigError(f"{where}: 'source' must be a non-empty string")
        sources[key] = Source(name.strip(), channel, fingerprint(key))
    return sources


def _check_key(key: str, where: str) -> None:
    if not key:
        raise ConfigError(f"{where}: the write key is empty")
    if ":" in key or any(c.isspace() for c in key):
        raise ConfigError(f"{where}: a write key cannot contain ':' or whitespace (it is a basic-auth user name)")


def _channel(value: object, where: str) -> str:
    channel = value.strip().lower() if type(value) is str else ""
    if channel not in CHANNEL_TOPICS:
        raise ConfigError(f"{where}: channel {value!r} is not one of {_CHANNELS_TEXT}")
    return channel


def _flag(text: str, variable: str) -> bool:
    value = text.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{variable}={text!r}: not a boolean (use true or false)")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
