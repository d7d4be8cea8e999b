#!/usr/bin/env bash
# `make run`: the worker and the collector in the foreground; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop INT TERM EXIT
if [ -z "${CDP_WRITE_KEYS:-}" ] && [ -z "${CDP_WRITE_KEYS_FILE:-}" ]; then
  # Local demo only: a well-known write key, announced. Set CDP_WRITE_KEYS for anything else.
  export CDP_WRITE_KEYS="dev=web"
  echo "streamcdp: CDP_WRITE_KEYS not set; the collector accepts the demo write key 'dev' (channel web)" >&2
fi
echo "streamcdp: worker on http://127.0.0.1:${CDP_WEB_PORT:-6066} (/metrics, /readyz, /v1/profiles), collector on http://127.0.0.1:${CDP_COLLECTOR_PORT:-8088} (/v1/batch ...)"
"$BIN/streamcdp" collector & pids+=($!)
"$BIN/streamcdp" worker & pids+=($!)
# Return (and stop the other) as soon as either exits.
wait -n
