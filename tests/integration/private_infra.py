"""A Redis server and a Kafka broker of a test's own, for fault tests that stop and
restart them (``test_faults.py``). The shared instances of ``deploy/local/infra.sh``
(``.run/kafka``, ``.run/redis``, ports 9092/9093/6379) are never touched: each
private instance has its own free ports, its own data directory under the test's
temporary directory, and its own process (started here, stopped here, by pid).

* :class:`PrivateRedis`: ``redis-server`` in the foreground, AOF on (fsync every
  second, no RDB snapshots, as infra.sh runs the shared one). ``stop(SIGKILL)`` then
  ``start()`` restarts it on the same port and directory, so it reloads its AOF.
* :class:`PrivateKafka`: a single-node KRaft broker (broker and controller in one
  JVM) from the jars infra.sh already resolved (``.cache/kafka/classpath.txt``), with
  a small heap. The storage is formatted once; ``stop()`` and ``start()`` keep it.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

from tests.integration.conftest import ROOT, free_port

KAFKA_CLASSPATH = ROOT / ".cache" / "kafka" / "classpath.txt"
KAFKA_LOG4J = ROOT / "deploy" / "local" / "kafka" / "log4j.properties"
# Small and quick to start: the broker shares two cores with the shared broker,
# Redis, workers and the tests. C1 only and the serial collector cut start-up CPU.
KAFKA_JVM_OPTIONS = ("-Xms128m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true")


class _Process:
    """A child process in its own session, logging to ``log_path``."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], cwd: Path) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Send ``sig`` to the process (only ours, by pid) and wait for it to exit;
        SIGKILL if it has not after ``timeout_s``."""
        if not self.running:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def pause(self) -> None:
        """SIGSTOP: the process holds its connections but answers nothing."""
        if self.running:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGCONT)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class PrivateRedis(_Process):
    """``redis-server`` on a free port with its AOF in ``directory``."""

    def __init__(self, directory: Path, db: int = 0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory / "redis.log")
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        # The log goes to stdout (our log file), so the process needs no --logfile.
        self._spawn(
            [
                "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                "--protected-mode", "no",
            ],
            self.directory,
        )

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until it answers PING (after loading its AOF)."""
        client = aioredis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if not self.running:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.tail()}")
                try:
                    if await client.ping():
                        return
                except Exception:  # noqa: BLE001 - not up yet (refused, or loading the AOF)
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} not answering after {timeout_s}s:\n{self.tail()}")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()


class PrivateKafka(_Process):
    """A single-node KRaft broker on free ports with its log dirs in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory / "stdout.log")
        self.directory = directory
        self.port = free_port()
        self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.properties = directory / "server.properties"
        if not KAFKA_CLASSPATH.is_file():
            raise RuntimeError(f"{KAFKA_CLASSPATH} is missing: run `make infra` once (it resolves the broker's jars)")
        self.classpath = KAFKA_CLASSPATH.read_text().strip()
        self._formatted = False

    def _java(self, *args: str) -> list[str]:
        return [
            "java", *KAFKA_JVM_OPTIONS, f"-Dlog4j.configuration=file:{KAFKA_LOG4J}",
            f"-Dkafka.logs.dir={self.directory}", "-cp", self.classpath, *args,
        ]

    def _write_properties(self) -> None:
        host = "127.0.0.1"
        self.properties.write_text(
            "\n".join([
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@{host}:{self.controller_port}",
                f"listeners=PLAINTEXT://{host}:{self.port},CONTROLLER://{host}:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://{host}:{self.port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={self.directory / 'data'}",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "default.replication.factor=1",
                "min.insync.replicas=1",
                "group.initial.rebalance.delay.ms=0",
                "num.partitions=4",
                "auto.create.topics.enable=false",
                "message.max.bytes=16777216",
                "replica.fetch.max.bytes=16777216",
                # Few threads: it is a test broker on a busy 2-core machine.
                "num.network.threads=2",
                "num.io.threads=2",
                "background.threads=2",
                "log.cleaner.threads=1",
                "",
            ])
        )

    def _format(self) -> None:
        # A KRaft cluster id is 16 random bytes in URL-safe base64 without padding
        # (what `StorageTool random-uuid` prints); made here to spare a JVM start.
        # Like Kafka's Uuid.randomUuid, never one starting with "-": the tool's
        # argument parser would take it for an option (1 run in 64 failed so).
        cluster_id = "-"
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        done = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.properties)),
            cwd=self.directory, capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"formatting the private broker's storage failed:\n{done.stdout}\n{done.stderr}")
        self._formatted = True

    def start(self) -> None:
        if not self._formatted:
            self._write_properties()
            self._format()
        self._spawn(self._java("kafka.Kafka", str(self.properties)), self.directory)

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until the broker lists itself and its group coordinator answers (as
        infra.sh's readiness probe)."""
        deadline = time.monotonic() + timeout_s
        problem = "not probed"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"the private broker exited with {self.process.returncode}:\n{self.tail()}")
            problem = await asyncio.to_thread(_probe_kafka, "127.0.0.1", self.port)
            if problem is None:
                return
            await asyncio.sleep(0.25)
        raise RuntimeError(f"the private broker is not ready after {timeout_s}s ({problem}):\n{self.tail()}")

    def server_log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)


# ------------------------------------------------------------------ kafka probe


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def _kafka_call(sock: socket.socket, api_key: int, version: int, body: bytes, correlation: int) -> bytes:
    client = b"streamcdp-test-probe"
    header = struct.pack(">hhih", api_key, version, correlation, len(client)) + client
    message = header + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    if struct.unpack(">i", response[:4])[0] != correlation:
        raise ValueError("correlation id mismatch")
    return response[4:]


def _probe_kafka(host: str, port: int) -> str | None:
    """None once the broker lists itself in Metadata (v4) and FindCoordinator (v1)
    answers without error; else what is missing."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.settimeout(5)
            reply = _kafka_call(sock, 3, 4, struct.pack(">ib", 0, 0), 1)
            (brokers,) = struct.unpack(">i", reply[4:8])
            if brokers < 1:
                return "no brokers listed yet"
            group = b"streamcdp-test-probe"
            reply = _kafka_call(sock, 10, 1, struct.pack(">h", len(group)) + group + b"\x00", 2)
            (error,) = struct.unpack(">h", reply[4:6])
            if error:
                return f"group coordinator not available (error {error})"
    except (OSError, ValueError, struct.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None

