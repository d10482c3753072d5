#!/usr/bin/env bash
# Starts a deltaserve on free local ports, load-tests it with deltaserve-loadgen, and stops it: the quickest way
# to see what one server sustains with many tenants' tasks (docs/BENCHMARKS.md, "Multi-tenant serving").
#
#   bash scripts/loadtest.sh [deltaserve-loadgen flags...]
#   bash scripts/loadtest.sh --tasks=1000 --zipf_s=1 --concurrency=1,8,32
#   SERVER_FLAGS="--delta_cache_bytes=50000000" bash scripts/loadtest.sh --mode=open --qps=100,200 --concurrency=256
#
# Environment: BUILD_DIR (build), MODEL_DIR (models/use-lite), SERVER_FLAGS (extra deltaserve flags),
# STORE_DIR (default: a temporary directory, removed at exit). To test a server that already runs, call
# build/client/deltaserve-loadgen --server=HOST:PORT --metrics=HOST:PORT directly.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
MODEL_DIR=${MODEL_DIR:-models/use-lite}
WORK=$(mktemp -d)
STORE_DIR=${STORE_DIR:-$WORK/store}
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

for bin in "$BUILD_DIR/server/deltaserve" "$BUILD_DIR/client/deltaserve-loadgen"; do
  [ -x "$bin" ] || { echo "loadtest.sh: $bin is missing: run 'bash scripts/setup.sh build' (or set BUILD_DIR)" >&2; exit 1; }
done
# shellcheck disable=SC2086
"$BUILD_DIR/server/deltaserve" --model_dir="$MODEL_DIR" --store_dir="$STORE_DIR" --listen=127.0.0.1:0 \
  --metrics_listen=127.0.0.1:0 --port_file="$WORK/ports" ${SERVER_FLAGS:-} 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 600); do
  [ -s "$WORK/ports" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "loadtest.sh: the server did not start:" >&2; cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.2
done
read -r GRPC_PORT METRICS_PORT _ < "$WORK/ports"
echo "loadtest.sh: deltaserve on 127.0.0.1:$GRPC_PORT (metrics :$METRICS_PORT), flags: ${SERVER_FLAGS:-none}" >&2
"$BUILD_DIR/client/deltaserve-loadgen" --server="127.0.0.1:$GRPC_PORT" --metrics="127.0.0.1:$METRICS_PORT" \
  --model_dir="$MODEL_DIR" "$@"
