"""The hiredis-packing Redis client against the real Redis: the commands the hot
path uses, multi-word commands and binary values."""

import pytest

from streams.redis_client import HiredisConnection, connect

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_hiredis_packing_client_speaks_redis(infra):
    client = connect(infra.redis_url)
    try:
        assert isinstance(client.connection_pool.connection_kwargs, dict)
        assert client.connection_pool.connection_class is HiredisConnection
        sha = await client.script_load("return {KEYS[1], ARGV[1], ARGV[2]}")  # "SCRIPT LOAD": two words
        assert await client.evalsha(sha, 1, "k{t}", b"\xff\x00bin", 42) == [b"k{t}", b"\xff\x00bin", b"42"]
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("cdp:test:{rc}", b"v", nx=True, get=True)
            pipe.hset("cdp:test:{rc}:h", mapping={"a": 1.5, "b": "x"})
            pipe.hgetall("cdp:test:{rc}:h")
            pipe.delete("cdp:test:{rc}", "cdp:test:{rc}:h")
            replies = await pipe.execute()
        assert replies[2] == {b"a": b"1.5", b"b": b"x"}
        assert (await client.config_get("appendonly"))["appendonly"] in ("yes", "no")  # "CONFIG GET"
    finally:
        await client.aclose()
