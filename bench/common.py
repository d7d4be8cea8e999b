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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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


async def wait_for_quiet(settings: Settings, timeout_s: float, ignore_prefix: str = "streamcdp-bench-") -> list[str]:
    """Give other consumer groups (test sessions' workers, which would also read the
    input a real worker gets on ``cdp.events.*``) up to ``timeout_s`` to go idle;
    return those still active."""
    deadline = time.monotonic() + timeout_s
    while True:
        others = await active_groups(settings, ignore_prefix)
        if not others or time.monotonic() > deadline:
            return others
        await asyncio.sleep(2.0)


async def group_state(settings: Settings, group: str) -> tuple[str, int]:
    """A consumer group's state ("Stable", "PreparingRebalance", ...) and members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    for response in described:
        for g in response.groups:
            if g[1] == group:
                return g[2], len(g[-1])
    return "Dead", 0


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


class Watch:
    """Reads one or more output topics from their current end; for each expected key
    (``key_of(record)``) notes when it was first read here (wall clock, s) and how
    many records carried it; ``label_of`` (optional) tallies the expected records by
    label. Records of keys not expected are counted in ``others``."""

    def __init__(
        self, settings: Settings, topics: list[str], key_of: Callable, expected: set | None = None,
        label_of: Callable | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.key_of = key_of
        self.label_of = label_of
        self.expected: set = expected if expected is not None else set()
        self.first: dict = {}  # key -> wall-clock time first read here
        self.counts: dict = {}  # key -> records carrying it
        self.labels: dict = {}  # label_of(record) -> records, of the expected keys
        self.others = 0
        self._consumer = consumer(settings, None, fetch_max_wait_ms=50)
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
                    if key in self.expected:
                        self.counts[key] = self.counts.get(key, 0) + 1
                        self.first.setdefault(key, now)
                        if self.label_of is not None:
                            label = self.label_of(record)
                            self.labels[label] = self.labels.get(label, 0) + 1
                    else:
                        self.others += 1

    def check(self) -> None:
        """Raise what stopped the reading task, if it stopped."""
        if self._task is not None and self._task.done():
            self._task.result()

    async def wait_for(self, count: int, timeout_s: float, alive: Callable[[], bool] | None = None) -> bool:
        """Wait until ``count`` expected keys were seen; False on timeout. Raises if
        the reader or (``alive``) the thing under test stopped."""
        deadline = time.monotonic() + timeout_s
        while len(self.first) < count:
            self.check()
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


def latencies_ms(arrived: dict, seen: dict, keys: Iterable) -> list[float]:
    """Milliseconds from ``arrived[k]`` to ``seen[k]`` (both wall-clock seconds) for
    the keys in both, in the order of ``keys``."""
    return [(seen[k] - arrived[k]) * 1000 for k in keys if k in seen and k in arrived]


@dataclass
class Offered:
    """What one offered-load run sent: message ids in order, and for each the wall
    clock just before it was handed to the producer and its input record's
    timestamp (arrival on the input topic; CreateTime, set by the producer)."""

    ids: list[str]
    sent_at: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # from the first send to the last acknowledgement


async def offer(
    producer, events: list, rate: float, watches: list[Watch], *, topic_of: Callable[[str], str] | None = None,
    complete: Watch | None = None, drain_s: float = 15.0, settle_s: float = 0.0, alive: Callable[[], bool] | None = None,
) -> Offered:
    """Produce ``events`` at ``rate`` events/s while ``watches`` read their outputs
    (each expecting the events' messageIds); then wait up to ``drain_s`` until
    ``complete`` (default the first watch) has seen every event, and ``settle_s``
    more for the others. The watches are stopped on return."""
    from streamcdp.generate import inbound_topic, send_events

    ids = [value["messageId"] for _, value in events]
    offered = Offered(ids)
    in_order = iter(ids)

    def acked(metadata, sent_at: float) -> None:
        key = next(in_order)
        offered.sent_at[key] = sent_at
        offered.arrived[key] = metadata.timestamp / 1000 if metadata.timestamp and metadata.timestamp > 0 else sent_at

    for watch in watches:
        watch.expected = set(ids)
    started = []
    try:
        for watch in watches:
            await watch.start()
            started.append(watch)
        clock = time.perf_counter()
        await send_events(producer, events, topic_of=topic_of or inbound_topic, rate=rate, on_ack=acked)
        offered.seconds = time.perf_counter() - clock
        await (complete or watches[0]).wait_for(len(ids), drain_s, alive=alive)
        if settle_s:
            await asyncio.sleep(settle_s)
        for watch in watches:
            watch.check()
    finally:
        for watch in started:
            await watch.stop()
    return offered


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


def faust_env(settings: Settings, app_id: str, **extra: str) -> dict[str, str]:
    """Environment of a faust child (a worker, the bare agent): ``settings``' broker
    and Redis, its own app id (= consumer group) and web port, JSON logs."""
    return child_env(
        **extra,
        CDP_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        CDP_REDIS_URL=settings.redis_url,
        CDP_APP_ID=app_id,
        CDP_WEB_PORT=str(free_port()),
        CDP_WEB_HOST="127.0.0.1",
        CDP_LOG_FORMAT="json",
    )


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux), None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def with_db(url: str, db: int) -> str:
    """``url`` (redis://...) with database ``db``."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


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


def sample_by_label(samples: dict[tuple[str, tuple], float], name: str, label: str) -> dict[str, float]:
    """Sum of ``name``'s samples per value of one label."""
    out: dict[str, float] = {}
    for (n, labels), value in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out


def gauge(samples: dict[tuple[str, tuple], float], name: str) -> float | None:
    """The value of an unlabelled gauge, None if absent."""
    values = [v for (n, _), v in samples.items() if n == name]
    return values[0] if values else None


def samples_delta(before: dict, after: dict) -> dict:
    """``after - before`` per series (counters and histograms: what happened between
    two scrapes; gauges: their change)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


async def scrape(url: str) -> dict:
    """A /metrics page as samples; {} when it does not answer 200."""
    status, body = await asyncio.to_thread(http_get, url, 2.0)
    return prometheus_samples(body.decode()) if status == 200 else {}


def histogram_percentiles(before: dict, after: dict, name: str, qs=(50, 95, 99)) -> list[float] | None:
    """Percentiles (ms) of the observations of histogram ``name`` made between two
    scrapes, linear within buckets; None without observations."""
    by_bound: dict[float, float] = {}  # summed over the histogram's other labels
    for (n, labels), value in after.items():
        if n == name + "_bucket":
            bound = float(dict(labels)["le"])
            by_bound[bound] = by_bound.get(bound, 0.0) + value - before.get((n, labels), 0.0)
    buckets = sorted(by_bound.items())
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    found = []
    for q in qs:
        rank = total * q / 100
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if bound == float("inf"):
                    found.append(lower_bound * 1000)
                else:
                    share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
                    found.append((lower_bound + share * (bound - lower_bound)) * 1000)
                break
            lower_bound, lower_count = bound, count
    return found


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
