"""Shared test helpers (no network here: integration fixtures live in
``tests/integration/conftest.py``)."""

from __future__ import annotations

import uuid

import orjson
import pytest


def unique(prefix: str = "t") -> str:
    """A value no other test (or earlier run) uses: keeps tests on shared topics apart."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def track(**fields) -> dict:
    """A valid track event; keyword arguments override or add fields."""
    event = {
        "type": "track",
        "messageId": unique("m"),
        "timestamp": "2026-11-20T10:00:00Z",
        "anonymousId": unique("a"),
        "event": "Product Viewed",
        "properties": {"sku": "s1"},
    }
    event.update(fields)
    return event


def identify(**fields) -> dict:
    event = {
        "type": "identify",
        "messageId": unique("m"),
        "timestamp": "2026-11-20T10:00:00Z",
        "userId": unique("u"),
        "traits": {},
    }
    event.update(fields)
    return event


@pytest.fixture
def make_track():
    return track


@pytest.fixture
def dumps():
    return orjson.dumps
