"""The Redis client the worker and the CLI use.

redis-py's asyncio connection packs every command in pure Python, which on our large
pipelines cost about a fifth of the hot path (profiled). hiredis ships a C packer;
this connection class uses it. redis-py also arms a timer per reply for its
``socket_timeout`` (5 s by default since redis-py 8): ``connect_hot_path`` turns it
off, and the hot path bounds each whole round trip instead (agents/pipeline.py).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection

try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    _pack = None


class _HiredisPacking:
    def pack_command(self, *args):
        """Same contract as redis-py's: a list of byte chunks. Like redis-py, a
        command name of several words ("SCRIPT LOAD") is sent as separate words."""
        first = args[0]
        if isinstance(first, str) and " " in first:
            args = (*first.split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        return [_pack(args)]


class HiredisConnection(_HiredisPacking, Connection):
    """A TCP connection whose commands are packed by hiredis."""


class HiredisSSLConnection(_HiredisPacking, SSLConnection):
    """A TLS connection whose commands are packed by hiredis."""


def connect(url: str, **options) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` (redis:// or rediss://)."""
    if _pack is not None and "connection_class" not in options:
        if url.startswith("rediss://"):
            options["connection_class"] = HiredisSSLConnection
        elif url.startswith("redis://"):
            options["connection_class"] = HiredisConnection
    return aioredis.from_url(url, **options)


def connect_hot_path(url: str, **options) -> aioredis.Redis:
    """The client for ``Pipeline``: no per-reply read timeout (the pipeline times
    each round trip), a connect timeout, and periodic health checks."""
    options.setdefault("socket_timeout", None)
    options.setdefault("socket_connect_timeout", 5)
    options.setdefault("health_check_interval", 10)
    return connect(url, **options)
