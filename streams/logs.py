"""Logging setup: readable text by default, one JSON object per line on request.

``CDP_LOG_FORMAT=json`` gives lines like
``{"ts":"2026-11-23T10:00:00.123Z","level":"warning","logger":"agents.pipeline","msg":"..."}``
for log shippers. Secrets are never logged by streamcdp's own code.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import orjson

_LEVELS = {"crit": "CRITICAL", "error": "ERROR", "warn": "WARNING", "info": "INFO", "debug": "DEBUG"}
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra=`` fields are kept as keys."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def python_level(level: str) -> str:
    """``warn`` (faust's spelling) → ``WARNING`` (logging's)."""
    return _LEVELS.get(level, level.upper())


def logging_config(log_format: str, level: str) -> dict:
    """A ``logging.config.dictConfig`` dict for the chosen format and level."""
    formatter = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {"format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": python_level(level)},
        # aiokafka logs every retriable broker hiccup at WARNING/ERROR; keep them
        # but not its INFO chatter.
        "loggers": {"aiokafka": {"level": "WARNING"}},
    }


def configure(log_format: str, level: str) -> None:
    """Configure logging for commands that do not run a faust worker."""
    import logging.config

    logging.config.dictConfig(logging_config(log_format, level))
