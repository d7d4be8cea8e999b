#!/usr/bin/env bash
# Local Kafka (KRaft, single node) and Redis for development, tests and the demo,
# on a machine without Docker. No mock: a real Apache Kafka broker whose jars come
# from Maven Central (run with the machine's Java) and a real redis-server.
#
#   deploy/local/infra.sh up        start both (idempotent), wait until they answer
#   deploy/local/infra.sh down      stop what our pid files name; keep the data
#   deploy/local/infra.sh down --wipe   (or: clean) stop, then delete the data too
#   deploy/local/infra.sh status    running? answering? exit 0 only if both answer
#
# State (all under the repo root, both gitignored):
#   .run/kafka/   server.properties, data/ (KRaft log dirs), kafka.pid, server.log, stdout.log
#   .run/redis/   redis.pid, appendonlydir/ (AOF), redis.log
#   .cache/kafka/ classpath.txt (from maven-dependency-plugin:build-classpath), pom.sha256, mvn.log
#
# Environment:
#   CDP_LOCAL_KAFKA_PORT (9092), CDP_LOCAL_KAFKA_CONTROLLER_PORT (9093),
#   CDP_LOCAL_REDIS_PORT (6379), CDP_LOCAL_INFRA_TIMEOUT (90, seconds per service),
#   CDP_KAFKA_BOOTSTRAP / CDP_REDIS_URL: when set and pointing somewhere other than
#   the local default, that service is not started here, only checked.
#   MAVEN_OPTS is passed to Maven as usual (e.g. -Dmaven.repo.local=/tmp/m2).
set -eEuo pipefail
# A failing command that set -e stops on must not end the script silently.
trap 'printf "infra: ERROR: unexpected failure (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN="$ROOT/.run"
KDIR="$RUN/kafka"
RDIR="$RUN/redis"
KCACHE="$ROOT/.cache/kafka"
POM="$ROOT/deploy/local/kafka/pom.xml"
LOG4J="$ROOT/deploy/local/kafka/log4j.properties"

KAFKA_PORT="${CDP_LOCAL_KAFKA_PORT:-9092}"
KAFKA_CPORT="${CDP_LOCAL_KAFKA_CONTROLLER_PORT:-9093}"
REDIS_PORT="${CDP_LOCAL_REDIS_PORT:-6379}"
TIMEOUT="${CDP_LOCAL_INFRA_TIMEOUT:-90}"
HOST=127.0.0.1

# The probes need only the standard library; the system python starts ~3x faster than
# a pyenv shim, which matters for polling.
PYTHON="$(command -v /usr/bin/python3 || command -v python3 || true)"

KAFKA_PID="$KDIR/kafka.pid"
REDIS_PID="$RDIR/redis.pid"

# ---------------------------------------------------------------------------
# output helpers

say()  { printf 'infra: %s\n' "$*"; }
warn() { printf 'infra: WARNING: %s\n' "$*" >&2; }
die() {
  # Loud on purpose: these messages end CI runs, so they must be impossible to miss.
  {
    printf '\n'
    printf 'infra: ************************************************************\n'
    printf 'infra: ERROR: %s\n' "$1"
    shift
    [[ $# -eq 0 ]] || printf 'infra:        %s\n' "$@"
    printf 'infra: ************************************************************\n'
  } >&2
  exit 1
}
now() { printf '%s' "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }'; }

tail_logs() { # FILE... : last 40 lines of each existing file, to stderr
  local f
  for f in "$@"; do
    [[ -s "$f" ]] || continue
    printf -- '----- last 40 lines of %s -----\n' "${f#"$ROOT"/}" >&2
    tail -n 40 "$f" >&2
  done
}

# ---------------------------------------------------------------------------
# probes (python3 stdlib only; no client library needed before the venv exists)

# probe kafka HOST PORT [--coordinator]
#   Sends a Metadata request and succeeds once the broker lists itself (i.e. it is
#   registered and unfenced, not merely accepting TCP). With --coordinator it also
#   sends FindCoordinator: the first one makes the broker create __consumer_offsets,
#   and it answers without error only once that topic has a leader. Waiting for it
#   spares clients the GroupCoordinatorNotAvailable they would otherwise hit right
#   after start. Request versions (Metadata v4, FindCoordinator v1) are supported by
#   Kafka 2.x through 4.x.
# probe redis HOST PORT [PASSWORD] [USER]   PING (after AUTH if a password is given)
probe() {
  "$PYTHON" - "$@" <<'PY'
import socket, struct, sys

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf

def kafka_call(s, api_key, version, body, corr):
    client = b"streamcdp-infra"
    header = struct.pack(">hhih", api_key, version, corr, len(client)) + client
    msg = header + body
    s.sendall(struct.pack(">i", len(msg)) + msg)
    size, = struct.unpack(">i", recv_exact(s, 4))
    resp = recv_exact(s, size)
    if struct.unpack(">i", resp[:4])[0] != corr:
        raise ValueError("correlation id mismatch")
    return resp[4:]

def kstr(b, o):
    n, = struct.unpack(">h", b[o:o + 2])
    o += 2
    if n < 0:
        return None, o
    return b[o:o + n].decode(), o + n

def kafka(host, port, coordinator):
    with socket.create_connection((host, port), timeout=3) as s:
        s.settimeout(5)
        # Metadata v4: topics = [] (none), allow_auto_topic_creation = false
        r = kafka_call(s, 3, 4, struct.pack(">ib", 0, 0), 1)
        o = 4  # throttle_time_ms
        nbrokers, = struct.unpack(">i", r[o:o + 4])
        if nbrokers < 1:
            return "broker answers but lists no brokers yet"
        if coordinator:
            group = b"streamcdp-infra-probe"
            # FindCoordinator v1: key, key_type 0 (group)
            r = kafka_call(s, 10, 1, struct.pack(">h", len(group)) + group + b"\x00", 2)
            err, = struct.unpack(">h", r[4:6])
            if err != 0:
                return "group coordinator not available yet (error %d)" % err
    return None

def redis(host, port, password=None, user=None):
    def cmd(*args):
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a.encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        return out
    with socket.create_connection((host, port), timeout=3) as s:
        s.settimeout(5)
        f = s.makefile("rb")
        if password:
            s.sendall(cmd("AUTH", user, password) if user else cmd("AUTH", password))
            line = f.readline()
            if not line.startswith(b"+OK"):
                return "AUTH failed: %r" % line.strip()
        s.sendall(cmd("PING"))
        line = f.readline()
        if not line.startswith(b"+PONG"):
            return "PING answered %r" % line.strip()
    return None

try:
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "kafka":
        problem = kafka(host, port, "--coordinator" in sys.argv[4:])
    else:
        rest = sys.argv[4:] + [None, None]
        problem = redis(host, port, rest[0] or None, rest[1] or None)
except (OSError, ValueError, struct.error) as e:
    problem = "%s: %s" % (type(e).__name__, e)
if problem:
    print(problem, file=sys.stderr)
    sys.exit(1)
PY
}

port_open() { # HOST PORT: something accepts TCP connections there
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# pid_alive PIDFILE PATTERN: the pid file names a live process whose command line
# contains PATTERN. The pattern only guards against a recycled pid; we never look
# processes up by name.
pid_alive() {
  local pid
  [[ -f "$1" ]] || return 1
  pid="$(tr -dc '0-9' <"$1")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  # (no `| grep -q`: with pipefail, an early-exiting grep can fail the pipeline)
  [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"$2"* ]]
}
pid_of() { tr -dc '0-9' <"$1"; }

# wait_until SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.5 s
# If WAIT_PIDFILE/WAIT_PATTERN are set, stop early when that process dies.
wait_until() {
  local limit="$1" what="$2" start="$EPOCHREALTIME" last=""
  shift 2
  while true; do
    if last="$("$@" 2>&1)"; then return 0; fi
    if [[ -n "${WAIT_PIDFILE:-}" ]] && [[ -f "$WAIT_PIDFILE" ]] && ! pid_alive "$WAIT_PIDFILE" "$WAIT_PATTERN"; then
      warn "$what: the process died while starting (last probe: ${last:-none})"
      return 1
    fi
    if awk -v a="$start" -v b="$EPOCHREALTIME" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
      warn "$what: no answer after ${limit} s (last probe: ${last:-none})"
      return 1
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------
# where the services are: local, or somewhere else given by CDP_* variables

# Prints "HOST PORT" of the first bootstrap server.
kafka_target() {
  local b="${CDP_KAFKA_BOOTSTRAP:-$HOST:$KAFKA_PORT}"
  b="${b#kafka://}"; b="${b%%,*}"
  printf '%s %s\n' "${b%:*}" "${b##*:}"
}
kafka_is_local() {
  local h p
  read -r h p < <(kafka_target)
  [[ ( "$h" == 127.0.0.1 || "$h" == localhost ) && "$p" == "$KAFKA_PORT" ]]
}

# REDIS_HOST REDIS_TPORT REDIS_PASSWORD REDIS_USER: from CDP_REDIS_URL when set
# (parsed once, at start), else the local instance.
REDIS_HOST="$HOST" REDIS_TPORT="$REDIS_PORT" REDIS_PASSWORD="" REDIS_USER=""
parse_redis_url() {
  [[ -n "${CDP_REDIS_URL:-}" ]] || return 0
  local parsed
  parsed="$("$PYTHON" - "$CDP_REDIS_URL" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or 6379,
      urllib.parse.unquote(u.password or "") or "-", urllib.parse.unquote(u.username or "") or "-")
PY
)" || die "cannot parse CDP_REDIS_URL='$CDP_REDIS_URL' (expected redis://[user:password@]host:port/db)"
  read -r REDIS_HOST REDIS_TPORT REDIS_PASSWORD REDIS_USER <<<"$parsed"
  [[ "$REDIS_PASSWORD" == - ]] && REDIS_PASSWORD=""
  [[ "$REDIS_USER" == - ]] && REDIS_USER=""
  return 0
}
redis_is_local() {
  [[ ( "$REDIS_HOST" == 127.0.0.1 || "$REDIS_HOST" == localhost ) && "$REDIS_TPORT" == "$REDIS_PORT" ]]
}
probe_redis_target() {
  probe redis "$REDIS_HOST" "$REDIS_TPORT" "$REDIS_PASSWORD" "$REDIS_USER"
}
# shellcheck disable=SC2120  # optional --coordinator
probe_kafka_target() {
  local h p
  read -r h p < <(kafka_target)
  probe kafka "$h" "$p" "$@"
}

# ---------------------------------------------------------------------------
# Kafka

# Resolves the broker class path with Maven into .cache/kafka/classpath.txt, unless
# the cached one was made from the same pom and every jar in it still exists.
kafka_classpath() {
  local sum jar ok=1
  command -v java >/dev/null || die "java not found on PATH: the local Kafka broker needs a JDK (17 is what we test with)." \
    "On Debian: apt-get install -y openjdk-17-jre-headless"
  command -v mvn >/dev/null || die "mvn not found on PATH: Maven resolves the Kafka broker's jars from Maven Central." \
    "On Debian: apt-get install -y maven"
  mkdir -p "$KCACHE"
  sum="$(sha256sum "$POM" | cut -d' ' -f1)"
  if [[ -s "$KCACHE/classpath.txt" && "$(cat "$KCACHE/pom.sha256" 2>/dev/null)" == "$sum" ]]; then
    local jars
    IFS=: read -r -a jars <"$KCACHE/classpath.txt" || true  # no trailing newline
    for jar in "${jars[@]}"; do
      [[ -f "$jar" ]] || { ok=0; break; }
    done
    [[ $ok == 1 ]] && return 0
    say "kafka: cached class path names a missing jar, resolving again"
  fi
  local t0; t0="$(now)"
  say "kafka: resolving the broker's jars with Maven (~60 MB download into an empty Maven repo) ..."
  rm -f "$KCACHE/classpath.txt"
  # The plugin is named in full (not `dependency:`): a prefix lookup needs the
  # repository's metadata on every run, the full coordinates do not once cached.
  if ! mvn -B -q -Dstyle.color=never -f "$POM" \
         org.apache.maven.plugins:maven-dependency-plugin:3.8.1:build-classpath \
         -Dmdep.outputFile="$KCACHE/classpath.txt" >"$KCACHE/mvn.log" 2>&1; then
    tail_logs "$KCACHE/mvn.log"
    if grep -qiE 'UnknownHost|Could not transfer|Connect(ion)? (timed out|refused)|Connect to .* failed|Network is unreachable|Could not resolve|No plugin found' "$KCACHE/mvn.log"; then
      die "Maven could not download the Kafka jars: Maven Central cannot be reached (see above, full log: .cache/kafka/mvn.log)." \
          "Check the network / proxy settings (~/.m2/settings.xml), or set CDP_KAFKA_BOOTSTRAP to a running broker."
    fi
    die "Maven failed to resolve the Kafka broker class path (see above, full log: .cache/kafka/mvn.log)."
  fi
  [[ -s "$KCACHE/classpath.txt" ]] || die "Maven succeeded but wrote no class path to .cache/kafka/classpath.txt"
  printf '%s\n' "$sum" >"$KCACHE/pom.sha256"
  say "kafka: class path resolved in $(since "$t0")"
}

write_server_properties() {
  cat >"$KDIR/server.properties" <<EOF
# Written by deploy/local/infra.sh on every start; edit the script, not this file.
# Single-node KRaft: one process is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CPORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CPORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KDIR/data

# One replica of everything; internal topics small so they are created quickly.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
default.replication.factor=1
min.insync.replicas=1

# Tests join consumer groups constantly: no 3 s wait before the first rebalance.
group.initial.rebalance.delay.ms=0
num.partitions=8
# Topics are created explicitly (admin client); a typo must not create a topic.
auto.create.topics.enable=false
# Tests send 10 MB payloads.
message.max.bytes=16777216
replica.fetch.max.bytes=16777216
EOF
}

kafka_up() {
  if ! kafka_is_local; then
    say "kafka: CDP_KAFKA_BOOTSTRAP=$CDP_KAFKA_BOOTSTRAP is not local, not starting one; checking it answers"
    wait_until 15 "kafka at $CDP_KAFKA_BOOTSTRAP" probe_kafka_target \
      || die "Kafka at CDP_KAFKA_BOOTSTRAP=$CDP_KAFKA_BOOTSTRAP does not answer." \
             "Start it, or unset CDP_KAFKA_BOOTSTRAP to use the local broker."
    return 0
  fi
  mkdir -p "$KDIR/data"
  if pid_alive "$KAFKA_PID" kafka.Kafka; then
    if [[ "$(cat "$KDIR/ports" 2>/dev/null)" != "$KAFKA_PORT $KAFKA_CPORT" ]]; then
      die "kafka: already running (pid $(pid_of "$KAFKA_PID")) on ports $(cat "$KDIR/ports" 2>/dev/null)," \
          "but ports $KAFKA_PORT $KAFKA_CPORT were asked for. Run '$0 down' first."
    fi
    say "kafka: already running (pid $(pid_of "$KAFKA_PID"))"
    return 0
  fi
  rm -f "$KAFKA_PID"
  local p
  for p in "$KAFKA_PORT" "$KAFKA_CPORT"; do
    if port_open "$HOST" "$p"; then
      die "kafka: port $HOST:$p is already in use by a process that is not ours (no live .run/kafka/kafka.pid)." \
          "Stop it, or pick other ports: CDP_LOCAL_KAFKA_PORT / CDP_LOCAL_KAFKA_CONTROLLER_PORT," \
          "or point CDP_KAFKA_BOOTSTRAP at it if it is a Kafka broker you want to use."
    fi
  done

  kafka_classpath
  local cp; cp="$(cat "$KCACHE/classpath.txt")"
  write_server_properties
  printf '%s %s\n' "$KAFKA_PORT" "$KAFKA_CPORT" >"$KDIR/ports"

  # Logging options for every JVM we start: log4j 1 (reload4j) config, log dir.
  local logopts=(-Dlog4j.configuration="file:$LOG4J" -Dkafka.logs.dir="$KDIR")
  # Format the KRaft storage once; meta.properties marks a formatted log dir.
  if [[ ! -f "$KDIR/data/meta.properties" ]]; then
    local uuid
    uuid="$(java "${logopts[@]}" -cp "$cp" kafka.tools.StorageTool random-uuid 2>>"$KDIR/stdout.log")" \
      || { tail_logs "$KDIR/stdout.log"; die "kafka: StorageTool random-uuid failed"; }
    java "${logopts[@]}" -cp "$cp" kafka.tools.StorageTool format -t "$uuid" -c "$KDIR/server.properties" \
      >>"$KDIR/stdout.log" 2>&1 \
      || { tail_logs "$KDIR/stdout.log"; die "kafka: formatting the storage in .run/kafka/data failed"; }
    say "kafka: formatted new storage, cluster id $uuid"
  fi

  printf '=== %s start ===\n' "$(date -Is)" >>"$KDIR/stdout.log"
  # setsid: own session, so a Ctrl-C in the terminal (or a signal to make's process
  # group) does not take the broker down with it. setsid and nohup exec in place
  # (the background child is never a process-group leader), so $! is the java pid;
  # pid_alive checks the command line right after.
  setsid nohup java -Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true "${logopts[@]}" \
    -cp "$cp" kafka.Kafka "$KDIR/server.properties" </dev/null >>"$KDIR/stdout.log" 2>&1 9>&- &
  local pid=$!
  printf '%s\n' "$pid" >"$KAFKA_PID"
  sleep 0.2
  pid_alive "$KAFKA_PID" kafka.Kafka || {
    rm -f "$KAFKA_PID"; tail_logs "$KDIR/stdout.log" "$KDIR/server.log"; die "kafka: the broker exited at once"; }
  say "kafka: started (pid $pid)"
}

# ---------------------------------------------------------------------------
# Redis

install_redis() {
  command -v redis-server >/dev/null && return 0
  [[ "$(id -u)" == 0 ]] || die "redis-server is not installed and we are not root, so apt cannot install it." \
    "Install it (apt-get install -y redis-server) or set CDP_REDIS_URL to a running Redis."
  command -v apt-get >/dev/null || die "redis-server is not installed and there is no apt-get to install it with." \
    "Install Redis 7 yourself or set CDP_REDIS_URL to a running Redis."
  say "redis: redis-server not found, installing it with apt ..."
  local t0; t0="$(now)"
  # Debian's postinst would start its own redis on port 6379; policy-rc.d exiting
  # 101 ("action forbidden") stops invoke-rc.d / deb-systemd-invoke from doing so.
  # Only ours is removed afterwards: an existing policy-rc.d is left as it is.
  local policy=/usr/sbin/policy-rc.d created=0 rc=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# temporary, from streamcdp deploy/local/infra.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created=1
  fi
  mkdir -p "$RDIR"
  { DEBIAN_FRONTEND=noninteractive apt-get update &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; } >"$RDIR/apt.log" 2>&1 || rc=$?
  [[ $created == 1 ]] && rm -f "$policy"
  if [[ $rc != 0 ]]; then
    tail_logs "$RDIR/apt.log"
    die "apt-get could not install redis-server (exit $rc; full log: .run/redis/apt.log)." \
        "Install it by hand, or set CDP_REDIS_URL to a running Redis."
  fi
  command -v redis-server >/dev/null || die "apt-get reported success but redis-server is still not on PATH"
  say "redis: installed $(redis-server --version | awk '{sub(/^v=/, "", $3); print $3}') in $(since "$t0")"
}

redis_up() {
  if ! redis_is_local; then
    say "redis: CDP_REDIS_URL is not local, not starting one; checking it answers"
    wait_until 15 "redis at CDP_REDIS_URL" probe_redis_target \
      || die "Redis at CDP_REDIS_URL does not answer. Start it, or unset CDP_REDIS_URL to use the local one."
    return 0
  fi
  mkdir -p "$RDIR"
  if pid_alive "$REDIS_PID" redis-server; then
    if [[ "$(cat "$RDIR/ports" 2>/dev/null)" != "$REDIS_PORT" ]]; then
      die "redis: already running (pid $(pid_of "$REDIS_PID")) on port $(cat "$RDIR/ports" 2>/dev/null)," \
          "but port $REDIS_PORT was asked for. Run '$0 down' first."
    fi
    say "redis: already running (pid $(pid_of "$REDIS_PID"))"
    return 0
  fi
  rm -f "$REDIS_PID"
  if port_open "$HOST" "$REDIS_PORT"; then
    die "redis: port $HOST:$REDIS_PORT is already in use by a process that is not ours (no live .run/redis/redis.pid)." \
        "Stop it (Debian's own service: systemctl stop redis-server), or set CDP_LOCAL_REDIS_PORT," \
        "or point CDP_REDIS_URL at it if it is a Redis you want to use."
  fi
  install_redis
  printf '%s\n' "$REDIS_PORT" >"$RDIR/ports"
  # --save "": no RDB snapshots; durability comes from the AOF (fsync every second).
  redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes \
    --pidfile "$REDIS_PID" --dir "$RDIR" --logfile "$RDIR/redis.log" \
    --appendonly yes --appendfsync everysec --save "" 9>&- \
    || { tail_logs "$RDIR/redis.log"; die "redis: redis-server failed to start"; }
  # Daemonized: the pid file appears once the child is up.
  wait_until 10 "redis pid file" test -s "$REDIS_PID" \
    || { tail_logs "$RDIR/redis.log"; die "redis: no pid file after start"; }
  say "redis: started (pid $(pid_of "$REDIS_PID"))"
}

# ---------------------------------------------------------------------------
# commands

cmd_up() {
  local t0 t; t0="$(now)"
  # Redis first: it is quick, and any apt install happens before the JVM competes
  # for the two cores.
  redis_up
  kafka_up

  t="$(now)"
  WAIT_PIDFILE="$REDIS_PID" WAIT_PATTERN=redis-server \
    wait_until "$TIMEOUT" redis probe_redis_target \
    || { tail_logs "$RDIR/redis.log"; die "redis did not answer PING within ${TIMEOUT} s (logs above)"; }
  if kafka_is_local; then
    WAIT_PIDFILE="$KAFKA_PID" WAIT_PATTERN=kafka.Kafka \
      wait_until "$TIMEOUT" kafka probe_kafka_target --coordinator \
      || { tail_logs "$KDIR/server.log" "$KDIR/stdout.log"
           die "kafka did not become ready within ${TIMEOUT} s (logs above; broker still running: see '$0 status')"; }
  fi
  say "ready after $(since "$t0") (waiting for answers: $(since "$t"))"
  local h p
  read -r h p < <(kafka_target)
  printf 'kafka: %s:%s\n' "$h" "$p"
  if redis_is_local; then
    printf 'redis: redis://%s:%s/0\n' "$HOST" "$REDIS_PORT"
  else
    printf 'redis: redis://%s:%s (from CDP_REDIS_URL)\n' "$REDIS_HOST" "$REDIS_TPORT"
  fi
}

# stop NAME PIDFILE PATTERN: SIGTERM, up to 30 s, then SIGKILL
stop() {
  local name="$1" pidfile="$2" pattern="$3" pid i t0
  if [[ ! -f "$pidfile" ]]; then
    say "$name: not running (no pid file)"
    return 0
  fi
  pid="$(pid_of "$pidfile")"
  if ! pid_alive "$pidfile" "$pattern"; then
    say "$name: not running (stale pid file for pid ${pid:-?} removed)"
    rm -f "$pidfile"
    return 0
  fi
  t0="$(now)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    warn "$name: pid $pid still running 30 s after SIGTERM, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$pidfile"
  say "$name: stopped pid $pid in $(since "$t0")"
}

cmd_down() {
  local wipe=0 a
  for a in "$@"; do
    case "$a" in
      --wipe) wipe=1 ;;
      *) die "down: unknown option '$a' (only --wipe)" ;;
    esac
  done
  stop kafka "$KAFKA_PID" kafka.Kafka
  stop redis "$REDIS_PID" redis-server
  if [[ $wipe == 1 ]]; then
    # Only our own directories: .run/ may hold other components' state.
    rm -rf "$KDIR" "$RDIR"
    say "wiped .run/kafka and .run/redis (the cached class path in .cache/kafka is kept)"
  fi
}

cmd_status() {
  local rc=0 h p what
  if kafka_is_local; then
    if pid_alive "$KAFKA_PID" kafka.Kafka; then what="running (pid $(pid_of "$KAFKA_PID"))"; else what="not running"; fi
  else
    what="not managed here (CDP_KAFKA_BOOTSTRAP=$CDP_KAFKA_BOOTSTRAP)"
  fi
  read -r h p < <(kafka_target)
  if probe_kafka_target 2>/dev/null; then
    printf 'kafka: %s, answering at %s:%s\n' "$what" "$h" "$p"
  else
    printf 'kafka: %s, NOT answering at %s:%s\n' "$what" "$h" "$p"; rc=3
  fi
  if redis_is_local; then
    if pid_alive "$REDIS_PID" redis-server; then what="running (pid $(pid_of "$REDIS_PID"))"; else what="not running"; fi
    h="redis://$HOST:$REDIS_PORT/0"
  else
    what="not managed here (CDP_REDIS_URL)"
    h="redis://$REDIS_HOST:$REDIS_TPORT"
  fi
  if probe_redis_target 2>/dev/null; then
    printf 'redis: %s, answering at %s\n' "$what" "$h"
  else
    printf 'redis: %s, NOT answering at %s\n' "$what" "$h"; rc=3
  fi
  return $rc
}

usage() {
  # The comment block at the top of this file, without the shebang.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

# Serialise up/down/clean: two `make infra` at once must not start two brokers.
# The lock lives on fd 9; the daemons we start get `9>&-`, otherwise they would
# inherit the open file and hold the lock for as long as they run.
lock() {
  mkdir -p "$RUN"
  exec 9>"$RUN/infra.lock"
  flock -w 180 9 || die "another infra.sh up/down has held .run/infra.lock for 3 minutes"
}

main() {
  local cmd="${1:-}"
  [[ -n "$PYTHON" ]] || die "python3 not found on PATH: the readiness probes need it (standard library only)"
  parse_redis_url
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    up) lock; cmd_up "$@" ;;
    down) lock; cmd_down "$@" ;;
    clean) lock; cmd_down --wipe ;;
    status) cmd_status || exit $? ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
