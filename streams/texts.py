"""Two conversions every reader of Redis replies needs: bytes to text, and event or
wall-clock milliseconds to the ISO 8601 form the JSON outputs use."""

from __future__ import annotations

from datetime import datetime, timezone


def text(value: bytes | str | int | float) -> str:
    """A Redis reply item (bytes) as text; other values through ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def iso_ms(ms: int | str | bytes | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC with milliseconds
    (``2026-11-20T10:00:00.000Z``); None stays None."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
