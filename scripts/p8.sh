#!/usr/bin/env bash
# P8 (docs/BENCHMARKS.md, "Fine-tuning"): serving latency while a fine-tuning job trains on the same server, vs
# idle, at the same offered load.
#
#   bash scripts/p8.sh                         # binaries from build/ (BUILD_DIR)
#   DELTASERVE=/tmp/ds-bin/deltaserve DELTACTL=/tmp/ds-bin/deltactl LOADGEN=/tmp/ds-bin/deltaserve-loadgen \
#     bash scripts/p8.sh
#   BIN_DIR=/tmp/ds-bin bash scripts/p8.sh     # the same: a flat directory holding the three binaries
#
# It starts a deltaserve on free local ports (--training_threads=1 --training_nice=10, the defaults, spelled out),
# pushes TASKS packs with the load generator, measures capacity with a short closed loop (CAPACITY_CONCURRENCY
# clients), and takes QPS = half of it (or QPS when set). Then, at that offered load (open loop, Poisson arrivals,
# DURATION_S seconds each, same seed):
#   idle  -  busy  -  idle   [ - busy - idle ... with ROUNDS > 1 ]
# where "busy" runs while a fine-tuning job (METHOD on TRAIN_DATA, epochs enough to outlast the measurement) is
# RUNNING with its step count advancing; the job is cancelled after each busy phase. The verdict compares each busy
# p99 with the mean p99 of the idle runs around it (goal: <= 1.5).
#
# Environment: BUILD_DIR (build), BIN_DIR (a flat directory with the binaries), DELTASERVE, DELTACTL, LOADGEN
# (binaries, overriding the two above), MODEL_DIR (models/use-lite), TASKS (100), METHODS (lora: the packs served),
# QPS (0 = half the measured capacity), CAPACITY_CONCURRENCY (16), DURATION_S (20), ROUNDS (1), IN_FLIGHT (64:
# the open loop's most requests in flight), METHOD (lora: the job's delta method), METHOD_CONFIG (JSON, optional),
# TRAIN_DATA (default: the first 8,000 lines of ../shared/data/glue-sst2/train.tsv when present, else a generated
# dataset), SERVER_FLAGS (extra deltaserve flags), KEEP=1 to keep the work directory (server log, JSON reports).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
if [ -n "${BIN_DIR:-}" ]; then
  DELTASERVE=${DELTASERVE:-$BIN_DIR/deltaserve}
  DELTACTL=${DELTACTL:-$BIN_DIR/deltactl}
  LOADGEN=${LOADGEN:-$BIN_DIR/deltaserve-loadgen}
fi
DELTASERVE=${DELTASERVE:-$BUILD_DIR/server/deltaserve}
DELTACTL=${DELTACTL:-$BUILD_DIR/client/deltactl}
LOADGEN=${LOADGEN:-$BUILD_DIR/client/deltaserve-loadgen}
MODEL_DIR=${MODEL_DIR:-models/use-lite}
TASKS=${TASKS:-100}
METHODS=${METHODS:-lora}
QPS=${QPS:-0}
CAPACITY_CONCURRENCY=${CAPACITY_CONCURRENCY:-16}
DURATION_S=${DURATION_S:-20}
ROUNDS=${ROUNDS:-1}
IN_FLIGHT=${IN_FLIGHT:-64}
METHOD=${METHOD:-lora}
METHOD_CONFIG=${METHOD_CONFIG:-}
PY=${PYTHON:-python3}

for bin in "$DELTASERVE" "$DELTACTL" "$LOADGEN"; do
  [ -x "$bin" ] || { echo "p8.sh: $bin is missing: build it (bash scripts/setup.sh build) or set BIN_DIR / DELTASERVE / DELTACTL / LOADGEN" >&2; exit 1; }
done

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "p8.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
log() { echo "p8.sh: $*" >&2; }

# The training data: real sentences when the shared SST-2 copy is there, else generated ones (two classes told
# apart by a keyword, so that the job learns something).
if [ -z "${TRAIN_DATA:-}" ]; then
  if [ -f ../shared/data/glue-sst2/train.tsv ]; then
    head -n 8001 ../shared/data/glue-sst2/train.tsv > "$WORK/train.tsv"
  else
    "$PY" - "$WORK/train.tsv" <<'PY'
import random, sys
random.seed(8)
fill = "the a movie film story plot actors was is very quite rather long short new old".split()
pos, neg = "good great wonderful fine lovely".split(), "bad awful dull poor boring".split()
with open(sys.argv[1], "w") as f:
    f.write("sentence\tlabel\n")
    for i in range(8000):
        words = random.choices(fill, k=random.randint(6, 24))
        words.insert(random.randrange(len(words) + 1), random.choice(pos if i % 2 else neg))
        f.write(" ".join(words) + "\t" + str(i % 2) + "\n")
PY
  fi
  TRAIN_DATA="$WORK/train.tsv"
fi

# shellcheck disable=SC2086
"$DELTASERVE" --model_dir="$MODEL_DIR" --store_dir="$WORK/store" --jobs_dir="$WORK/jobs" --listen=127.0.0.1:0 \
  --metrics_listen=127.0.0.1:0 --port_file="$WORK/ports" --training_threads=1 --training_nice=10 \
  ${SERVER_FLAGS:-} 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 600); do
  [ -s "$WORK/ports" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "p8.sh: the server did not start:" >&2; cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.2
done
read -r GRPC_PORT METRICS_PORT _ < "$WORK/ports"
SERVER=127.0.0.1:$GRPC_PORT
log "deltaserve on $SERVER (metrics :$METRICS_PORT); load average: $(cut -d' ' -f1-3 /proc/loadavg)"

LG=("$LOADGEN" --server="$SERVER" --metrics="127.0.0.1:$METRICS_PORT" --model_dir="$MODEL_DIR" --tasks="$TASKS"
    --methods="$METHODS" --json)
CTL=("$DELTACTL" --server="$SERVER")

# Field of a loadgen report's first step, or of a job: python one-liners on the JSON files.
step_field() { "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1]))["steps"][0]; v=s
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$1" "$2"; }
job_field() { "$PY" -c 'import json,sys; v=json.loads(sys.stdin.read())
for k in sys.argv[1].split("."): v=v.get(k, 0) if isinstance(v, dict) else 0
print(v)' "$1"; }

log "pushing $TASKS packs and measuring capacity ($CAPACITY_CONCURRENCY clients, closed loop, 10 s)"
"${LG[@]}" --setup=push --mode=closed --concurrency="$CAPACITY_CONCURRENCY" --duration_s=10 \
  >"$WORK/capacity.json" 2>"$WORK/capacity.log"
CAPACITY=$(step_field "$WORK/capacity.json" requests_per_second)
if [ "$QPS" = 0 ]; then QPS=$("$PY" -c "import sys; print(max(1, round(float(sys.argv[1]) / 2)))" "$CAPACITY"); fi
log "capacity $CAPACITY req/s (p99 $(step_field "$WORK/capacity.json" latency_ms.p99) ms); offered load: $QPS req/s"

RUNS=()
measure() {  # NAME: one open-loop run at QPS
  "${LG[@]}" --setup=existing --mode=open --qps="$QPS" --concurrency="$IN_FLIGHT" --duration_s="$DURATION_S" \
    >"$WORK/$1.json" 2>"$WORK/$1.log"
  RUNS+=("$1")
  log "$1: $(step_field "$WORK/$1.json" requests_per_second) req/s, p50 $(step_field "$WORK/$1.json" latency_ms.p50) ms, p99 $(step_field "$WORK/$1.json" latency_ms.p99) ms; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

JOB=""
start_job() {
  local args=(tune submit --task=p8-job --data="$TRAIN_DATA" --method="$METHOD" --epochs=1000 --json)
  [ -n "$METHOD_CONFIG" ] && args+=(--method_config="$METHOD_CONFIG")
  JOB=$("${CTL[@]}" "${args[@]}" | job_field job.id)
  log "job $JOB submitted ($METHOD on $(($(wc -l < "$TRAIN_DATA") - 1)) examples); waiting for its steps to advance"
  local first="" step state
  for _ in $(seq 1 600); do
    state=$("${CTL[@]}" tune get "$JOB" --json | job_field state)
    step=$("${CTL[@]}" tune get "$JOB" --json | job_field progress.step)
    case "$state" in JOB_STATE_FAILED|JOB_STATE_CANCELLED|JOB_STATE_SUCCEEDED)
      echo "p8.sh: job $JOB ended ($state) before the measurement:" >&2; "${CTL[@]}" tune get "$JOB" >&2; exit 1;; esac
    if [ "$state" = JOB_STATE_RUNNING ] && [ "$step" -gt 0 ]; then
      if [ -z "$first" ]; then first=$step; elif [ "$step" -gt "$first" ]; then return 0; fi
    fi
    sleep 0.5
  done
  echo "p8.sh: job $JOB did not start training within 5 minutes" >&2; exit 1
}
stop_job() {
  "${CTL[@]}" tune cancel "$JOB" >/dev/null
  for _ in $(seq 1 600); do
    [ "$("${CTL[@]}" tune get "$JOB" --json | job_field state)" = JOB_STATE_CANCELLED ] && return 0
    sleep 0.2
  done
  echo "p8.sh: job $JOB did not stop" >&2; exit 1
}

measure idle1
for r in $(seq 1 "$ROUNDS"); do
  start_job
  STEP0=$("${CTL[@]}" tune get "$JOB" --json | job_field progress.step); T0=$(date +%s.%N)
  measure "busy$r"
  STEP1=$("${CTL[@]}" tune get "$JOB" --json | job_field progress.step); T1=$(date +%s.%N)
  STATE=$("${CTL[@]}" tune get "$JOB" --json | job_field state)
  [ "$STATE" = JOB_STATE_RUNNING ] || { echo "p8.sh: job $JOB was $STATE at the end of busy$r" >&2; exit 1; }
  echo "$STEP0 $STEP1 $T0 $T1" > "$WORK/busy$r.steps"
  log "busy$r: the job trained $((STEP1 - STEP0)) steps meanwhile"
  stop_job
  measure "idle$((r + 1))"
done

"$PY" - "$WORK" "$QPS" "$CAPACITY" "$ROUNDS" <<'PY'
import json, os, sys
work, qps, capacity, rounds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def step(name):
    return json.load(open(os.path.join(work, name + ".json")))["steps"][0]
print(f"\nP8: open loop at {qps:g} req/s (capacity {capacity:.1f} req/s, closed loop), Poisson arrivals\n")
print("| run | req/s | p50 ms | p95 ms | p99 ms | max ms | errors | rows per batch | forward ms | training steps/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
names = ["idle1"] + [n for r in range(1, rounds + 1) for n in (f"busy{r}", f"idle{r + 1}")]
for n in names:
    s = step(n); lat = s["latency_ms"]; ss = s.get("server_side", {})
    train = "-"
    if n.startswith("busy"):
        s0, s1, t0, t1 = open(os.path.join(work, n + ".steps")).read().split()
        train = f"{(int(s1) - int(s0)) / (float(t1) - float(t0)):.2f}"
    print(f"| {n} | {s['requests_per_second']:.1f} | {lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | "
          f"{lat['max']:.1f} | {s['errors']} | {ss.get('mean_batch_rows', 0):.2f} | {ss.get('mean_forward_ms', 0):.1f} | {train} |")
print()
worst = 0
for r in range(1, rounds + 1):
    idle = [step(f"idle{r}")["latency_ms"], step(f"idle{r + 1}")["latency_ms"]]
    busy = step(f"busy{r}")["latency_ms"]
    ratio = busy["p99"] / ((idle[0]["p99"] + idle[1]["p99"]) / 2)
    p50 = busy["p50"] / ((idle[0]["p50"] + idle[1]["p50"]) / 2)
    worst = max(worst, ratio)
    print(f"round {r}: busy p99 / idle p99 = {ratio:.2f} (p50: {p50:.2f})")
print(f"VERDICT: P8 = {worst:.2f} (goal <= 1.5): {'met' if worst <= 1.5 else 'NOT met'}")
PY
log "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
