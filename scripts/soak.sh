#!/usr/bin/env bash
# Soak test (not part of CI; docs/OPERATIONS.md): one server, many tenants' tasks of mixed methods, an open-loop
# load at 80 % of the capacity measured first, for 30 minutes, while the hottest task's `latest` label moves every
# minute (a new version is pushed under load). Passes when no request fails and the server's RSS grows less than
# 5 % between the end of the warm-up (the first 5 minutes) and the end.
#
#   bash scripts/soak.sh                      # 30 minutes
#   SOAK_MINUTES=10 SOAK_TASKS=500 bash scripts/soak.sh
#
# Environment: BUILD_DIR (build), MODEL_DIR (models/use-lite), SOAK_MINUTES (30), SOAK_WARMUP_MINUTES (5),
# SOAK_TASKS (200), SOAK_LOAD (0.8 of capacity), SERVER_FLAGS (extra deltaserve flags). Writes its report and the
# RSS samples to $SOAK_OUT (default: soak-<date>/ under /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
MODEL_DIR=${MODEL_DIR:-models/use-lite}
MINUTES=${SOAK_MINUTES:-30}
WARMUP=${SOAK_WARMUP_MINUTES:-5}
TASKS=${SOAK_TASKS:-200}
LOAD=${SOAK_LOAD:-0.8}
OUT=${SOAK_OUT:-/tmp/soak-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
SERVER_PID=""
LOAD_PID=""
cleanup() {
  [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null || true
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
for bin in server/deltaserve client/deltaserve-loadgen client/deltactl; do
  [ -x "$BUILD_DIR/$bin" ] || { echo "soak.sh: $BUILD_DIR/$bin is missing: bash scripts/setup.sh build" >&2; exit 1; }
done

# shellcheck disable=SC2086
"$BUILD_DIR/server/deltaserve" --model_dir="$MODEL_DIR" --store_dir="$WORK/store" --listen=127.0.0.1:0 \
  --metrics_listen=127.0.0.1:0 --port_file="$WORK/ports" ${SERVER_FLAGS:-} 2>"$OUT/server.log" &
SERVER_PID=$!
for _ in $(seq 1 600); do
  [ -s "$WORK/ports" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "soak.sh: the server did not start" >&2; cat "$OUT/server.log" >&2; exit 1; }
  sleep 0.2
done
read -r GRPC_PORT METRICS_PORT _ < "$WORK/ports"
SERVER=127.0.0.1:$GRPC_PORT
LG=("$BUILD_DIR/client/deltaserve-loadgen" --server="$SERVER" --metrics="127.0.0.1:$METRICS_PORT"
    --model_dir="$MODEL_DIR" --tasks="$TASKS" --methods=mixed --zipf_s=1 --json)
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status"; }

echo "soak.sh: pushing $TASKS tasks and measuring capacity (closed loop, 16 clients, 60 s)" >&2
"${LG[@]}" --setup=push --mode=closed --concurrency=16 --warmup_s=10 --duration_s=60 > "$OUT/capacity.json"
CAPACITY=$(/usr/bin/python3 -c '
import json, sys
def find(x):
    if isinstance(x, dict):
        if "requests_per_second" in x: return x["requests_per_second"]
        for v in x.values():
            r = find(v)
            if r is not None: return r
    if isinstance(x, list):
        for v in x:
            r = find(v)
            if r is not None: return r
print(find(json.load(open(sys.argv[1]))))' "$OUT/capacity.json")
QPS=$(/usr/bin/python3 -c "print(round($CAPACITY * $LOAD, 1))")
echo "soak.sh: capacity $CAPACITY requests/s; soaking at $QPS requests/s for $MINUTES minutes" >&2

"${LG[@]}" --setup=existing --mode=open --qps="$QPS" --concurrency=256 --warmup_s=0 \
  --duration_s=$((MINUTES * 60)) > "$OUT/soak.json" 2> "$OUT/loadgen.log" &
LOAD_PID=$!

# Every minute: a new version of the hottest task (Zipf rank 0) goes in under load, which moves its `latest`.
HOT=lg-task-00000
echo "minute rss_kb" > "$OUT/rss.txt"
RSS_WARM=""
for minute in $(seq 1 "$MINUTES"); do
  sleep 60
  kill -0 "$LOAD_PID" 2>/dev/null || break
  donor=$(printf 'lg-task-%05d' $(( (minute % (TASKS - 1)) + 1 )))
  "$BUILD_DIR/client/deltactl" --server="$SERVER" pull "$donor" --output="$WORK/next.dpack" > /dev/null
  "$BUILD_DIR/client/deltactl" --server="$SERVER" push "$WORK/next.dpack" --task="$HOT" --progress=false \
    >> "$OUT/label-moves.log"
  rss=$(rss_kb)
  echo "$minute $rss" >> "$OUT/rss.txt"
  [ "$minute" -eq "$WARMUP" ] && RSS_WARM=$rss
  echo "soak.sh: minute $minute/$MINUTES, RSS $((rss / 1024)) MiB, latest of $HOT moved" >&2
done
wait "$LOAD_PID" || true
LOAD_PID=""
RSS_END=$(rss_kb)
/usr/bin/python3 - "$OUT" "${RSS_WARM:-$RSS_END}" "$RSS_END" <<'EOF'
import json, sys
out, warm, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = json.load(open(out + "/soak.json"))
def steps(x):
    if isinstance(x, dict):
        if "requests_per_second" in x: yield x
        for v in x.values(): yield from steps(v)
    elif isinstance(x, list):
        for v in x: yield from steps(v)
step = next(steps(report))
growth = (end - warm) / warm
ok = step["errors"] == 0 and growth < 0.05
summary = {"requests": step["requests"], "errors": step["errors"], "errors_by_code": step["errors_by_code"],
           "requests_per_second": step["requests_per_second"], "latency_ms": step["latency_ms"],
           "rss_after_warmup_mib": warm // 1024, "rss_end_mib": end // 1024, "rss_growth": round(growth, 4),
           "verdict": "PASS" if ok else "FAIL"}
json.dump(summary, open(out + "/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
sys.exit(0 if ok else 1)
EOF
