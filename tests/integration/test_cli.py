"""The `streamcdp` command as users run it, against the real Redis and Kafka."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import orjson
import pytest

from streams.topics import EVENTS_WEB, RESOLVED
from tests.conftest import identify, unique
from tests.integration.conftest import ROOT, produce

pytestmark = pytest.mark.asyncio(loop_scope="session")


def cli(settings, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, CDP_REDIS_URL=settings.redis_url, CDP_KAFKA_BOOTSTRAP=settings.kafka_bootstrap)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "streamcdp.cli", *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )


async def test_profile_get_by_identifier_and_by_id(worker, producer, topic_reader, infra):
    resolved = await topic_reader(RESOLVED)
    email = f"{unique('ann')}@example.com"
    event = identify(traits={"email": f" {email.upper()} ", "name": "Ann"})
    await produce(producer, EVENTS_WEB, [event])
    [out] = await resolved.collect(lambda r: orjson.loads(r.value)["messageId"] == event["messageId"], 1)

    done = await asyncio.to_thread(cli, infra, "profile", "get", f"email:{email.upper()}")
    assert done.returncode == 0, done.stderr
    profile = orjson.loads(done.stdout)
    assert profile["id"] == orjson.loads(out.value)["profileId"]
    assert profile["traits"]["name"] == "Ann"
    assert f"email:{email}" in profile["identifiers"]

    by_id = await asyncio.to_thread(cli, infra, "profile", "get", profile["id"])
    assert by_id.returncode == 0 and orjson.loads(by_id.stdout) == profile


async def test_cli_errors_name_the_problem_and_exit_non_zero(infra):
    missing = await asyncio.to_thread(cli, infra, "profile", "get", f"email:{unique('nobody')}@example.com")
    assert missing.returncode == 3 and "no profile" in missing.stderr

    bad = await asyncio.to_thread(cli, infra, "profile", "get", "not-an-identifier")
    assert bad.returncode == 2 and bad.stderr.strip()

    config = await asyncio.to_thread(cli, infra, "profile", "get", "user_id:x", env={"CDP_WEB_PORT": "http"})
    assert config.returncode == 2 and "CDP_WEB_PORT" in config.stderr

    down = await asyncio.to_thread(cli, infra, "profile", "get", "user_id:x", env={"CDP_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert down.returncode == 4 and "Redis" in down.stderr

    usage = await asyncio.to_thread(cli, infra)
    assert usage.returncode == 2 and "commands" in usage.stderr

    for args in (["--help"], ["worker", "--help"], ["profile", "get", "--help"], ["topics", "list"]):
        assert (await asyncio.to_thread(cli, infra, *args)).returncode == 0, args
