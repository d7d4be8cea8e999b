"""The one exception tree of streamcdp.

Every error that streamcdp raises on purpose derives from :class:`StreamCDPError`,
so a caller can catch "anything of ours" without catching programming errors::

    StreamCDPError
     ├── ConfigError          bad or missing configuration (fail at start-up, loudly)
     ├── InvalidEvent         an inbound event we reject; carries a RejectReason,
     │                        a readable detail and the JSON path of the bad field,
     │                        which the ingest stage turns into a dead-letter record
     └── InvalidIdentifier    an identifier that cannot be used, e.g. "email:" with
                              an empty value in a lookup from the CLI or the API

Errors are data here: an :class:`InvalidEvent` is expected on the hot path (bad
input is normal in a CDP), so it is cheap to build and never carries a traceback
worth logging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # schemas.events imports this module; avoid the cycle at runtime
    from schemas.events import RejectReason

__all__ = ["StreamCDPError", "ConfigError", "InvalidEvent", "InvalidIdentifier"]


class StreamCDPError(Exception):
    """Root of every error streamcdp raises on purpose."""


class ConfigError(StreamCDPError):
    """Configuration is missing or wrong (an unknown phone region, a bad URL, ...)."""


class InvalidEvent(StreamCDPError):
    """An inbound event that is rejected and belongs on the dead-letter topic.

    ``reason`` is the machine-readable code (a :class:`~schemas.events.RejectReason`,
    a ``str`` subclass), ``detail`` a short human-readable explanation and ``field``
    the JSON path of the offending field (``"context.externalIds[1].type"``) for
    schema violations, else ``None``.

    >>> from schemas.events import RejectReason
    >>> str(InvalidEvent(RejectReason.SCHEMA_VIOLATION, "must be a string, got number", "userId"))
    'schema_violation at userId: must be a string, got number'
    """

    __slots__ = ("reason", "detail", "field")

    def __init__(self, reason: RejectReason, detail: str, field: str | None = None):
        # Passing everything to Exception keeps the error picklable (cls(*args)).
        super().__init__(reason, detail, field)
        self.reason = reason
        self.detail = detail
        self.field = field

    def __str__(self) -> str:
        if self.field is None:
            return f"{self.reason}: {self.detail}"
        return f"{self.reason} at {self.field}: {self.detail}"


class InvalidIdentifier(StreamCDPError):
    """An identifier that cannot be used (malformed ``type:value``, empty value, ...)."""
