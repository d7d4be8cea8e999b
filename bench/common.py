"""What the benchmarks share: topics, consumer groups, output collection, child
processes, percentiles and the machine's facts."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ topics, groups


async def create_topics(settings: Settings, names: Iterable[str], partitions: int, timeout_s: float = 30.0) -> None:
    """Create topics and wait until every partition has a leader."""
    names = list(names)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
        deadline = time.monotonic() + timeout_s
        while True:
            described = await admin.describe_topics(names)
            if all(
                t["error_code"] == 0 and len(t["partitions"]) == partitions and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {names} have no leaders after {timeout_s:.0f}s")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def delete_topics(settings: Settings, names: Iterable[str]) -> None:
    """Delete those of ``names`` that exist."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


async def delete_groups(settings: Settings, groups: Iterable[str]) -> None:
    """Best effort: remove consumer groups (and their committed offsets) that we made.

    aiokafka's admin client has no ``delete_consumer_groups``; DeleteGroups is sent
    to each group's coordinator directly.
    """
    from aiokafka.protocol.admin import DeleteGroupsRequest

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        for group in groups:
            try:
                node = await admin.find_coordinator(group)
                await admin._send_request(DeleteGroupsRequest([group]), node_id=node)  # noqa: SLF001
            except Exception:  # noqa: BLE001 - leftover groups expire with the offsets retention
                pass
    finally:
        await admin.close()


async def active_groups(settings: Settings, ignore_prefix: str) -> list[str]:
    """Consumer groups with members right now, except ours: e.g. a test session's
    worker that also reads ``cdp.events.*`` and so also processes the bench's input."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    active = []
    try:
        for name, _ in await admin.list_consumer_groups():
            if name.startswith(ignore_prefix):
                continue
            try:  # one at a time: aiokafka fails to decode some multi-group answers
                described = await admin.describe_consumer_groups([name])
            except Exception:  # noqa: BLE001 - a group that vanished meanwhile, say
                continue
            active += [f"{g[1]} ({g[2]})" for r in described for g in r.groups if g[2] not in ("Empty", "Dead")]
    finally:
        await admin.close()
    return active


async def partitions_of(settings: Settings, topics: Iterable[str]) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]


def consumer(settings: Settings, group_id: str | None, **options) -> AIOKafkaConsumer:
    options.setdefault("enable_auto_commit", False)
    options.setdefault("auto_offset_reset", "earliest")
    return AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers(), group_id=group_id, **options)


async def commit_group_at_end(settings: Settings, group_id: str, topics: Iterable[str]) -> None:
    """Commit ``group_id``'s offsets at the current end of ``topics``, so that a worker
    in that group starts with what is produced from now on."""
    partitions = await partitions_of(settings, topics)
    c = consumer(settings, group_id)
    await c.start()
    try:
        c.assign(partitions)
        await c.commit(await c.end_offsets(partitions))
    finally:
        await c.stop()


async def assign_at_end(c: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
    """Assign and position at the end, resolved now (before anything new is produced)."""
    c.assign(partitions)
    await c.seek_to_end(*partitions)
    for tp in partitions:
        await c.position(tp)


# ------------------------------------------------------------------ outputs


def message_id_of(record) -> str | None:
    """``messageId`` of a passed-through event or of a ``cdp.events.resolved`` record."""
    try:
        return orjson.loads(record.value).get("messageId")
    except (orjson.JSONDecodeError, AttributeError):
        return None


class Collector:
    """Reads output topics from their current end and notes, for each expected key,
    when it became visible here and the output record's own timestamp."""

    def __init__(self, settings: Settings, topics: list[str], key_of: Callable) -> None:
        self.settings = settings
        self.topics = topics
        self.key_of = key_of
        self.expected: set = set()
        self.seen: dict = {}  # key -> (wall-clock arrival s, record timestamp ms)
        self._consumer = consumer(settings, None, fetch_max_wait_ms=100)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await assign_at_end(self._consumer, await partitions_of(self.settings, self.topics))
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batches.values():
                for record in records:
                    key = self.key_of(record)
                    if key in self.expected and key not in self.seen:
                        self.seen[key] = (now, record.timestamp)

    async def wait_for(self, count: int, timeout_s: float, alive: Callable[[], bool] | None = None) -> bool:
        """Wait until ``count`` expected keys were seen; False on timeout. Raises if
        the collector or (``alive``) the thing under test stopped."""
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < count:
            if self._task is not None and self._task.done():
                self._task.result()  # raises what stopped it
            if alive is not None and not alive():
                raise RuntimeError("the process under test stopped")
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


def percentiles(values: list[float], qs=(50, 95, 99)) -> list[float]:
    """Nearest-rank percentiles."""
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))] for q in qs]


# ------------------------------------------------------------------ child processes


class Child:
    """A child process in its own session, stopped (the whole group) on ``stop()``."""

    running: set["Child"] = set()

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        Child.running.add(self)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        Child.running.discard(self)
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.running):
            child.stop(grace_s=5.0)


def child_env(**variables: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(variables)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def prometheus_samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample_sum(samples: dict[tuple[str, tuple], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


# ------------------------------------------------------------------ the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def kafka_version() -> str:
    """The version of a broker running on this machine, from its jar's name."""
    pattern = re.compile(rb"kafka_2\.\d+-([0-9][0-9.]*[0-9])\.jar")
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found = pattern.search(cmdline.read_bytes())
        except OSError:
            continue
        if found:
            return found.group(1).decode() + " (local broker)"
    return "unknown (broker not on this machine)"


def load_average() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def code_version() -> str:
    """The commit measured, and how many files of the tree differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    changed = len(status.stdout.splitlines())
    return f"commit {head.stdout.strip() or '?'}" + (f" + {changed} changed/new files in the working tree" if changed else "")


def machine_facts(redis_version: str) -> list[tuple[str, str]]:
    versions = ", ".join(f"{p} {_version(p)}" for p in ("aiokafka", "faust-streaming", "redis", "hiredis", "orjson", "uvloop"))
    return [
        ("CPU", f"{_cpu_model()}; nproc {len(os.sched_getaffinity(0))}; {_memory()} RAM"),
        ("OS", platform.platform()),
        ("Python", sys.version.split()[0] + f" ({platform.python_implementation()})"),
        ("Load", load_average() + " at start (other work on the machine skews every figure)"),
        ("Kafka", kafka_version()),
        ("Redis", redis_version),
        ("Libraries", versions),
        ("Code", code_version()),
    ]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
