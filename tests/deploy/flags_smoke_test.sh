#!/usr/bin/env bash
# The Kubernetes flag files start the real server: deploy/k8s/base/deltaserve.flags + overlays/single/overlay.flags,
# with only the cluster's paths and ports mapped to this machine (127.0.0.1, free ports, a temporary data dir, the
# repository's model and example tenants file). Then it probes like the kubelet (health port: liveness,
# readiness), checks that authentication is on, drains like the preStop hook (SIGUSR1) and stops like Kubernetes
# (SIGTERM): exit 0 well within the pod's terminationGracePeriodSeconds.
#
#   bash tests/deploy/flags_smoke_test.sh SOURCE_DIR DELTASERVE DELTACTL
set -uo pipefail
SRC=${1:?source dir}
SERVER=${2:?deltaserve binary}
CTL=${3:?deltactl binary}
MODEL=${DS_USE_LITE_DIR:-$SRC/models/use-lite}
[ -f "$MODEL/model.safetensors" ] || { echo "SKIP: no converted use-lite model (bash scripts/setup.sh build)"; exit 77; }
WORK=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
map() {
  sed -e 's#0\.0\.0\.0:[0-9]*#127.0.0.1:0#' -e "s#/var/lib/deltaserve#$WORK/data#g" -e "s#/var/cache/deltaserve#$WORK/cache#g" \
      -e "s#/etc/deltaserve/tenants.json#$SRC/deploy/k8s/base/tenants.json#" -e "s#/opt/deltaserve/models/use-lite#$MODEL#" "$1"
}
map "$SRC/deploy/k8s/base/deltaserve.flags" > "$WORK/deltaserve.flags"
map "$SRC/deploy/k8s/overlays/single/overlay.flags" > "$WORK/overlay.flags"
mkdir -p "$WORK/data"
"$SERVER" --flagfile="$WORK/deltaserve.flags" --flagfile="$WORK/overlay.flags" --port_file="$WORK/ports" \
  > "$WORK/log" 2>&1 &
pid=$!
for _ in $(seq 600); do [ -s "$WORK/ports" ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
[ -s "$WORK/ports" ] || { echo "FAIL: the server did not start with the shipped flags:"; cat "$WORK/log"; exit 1; }
read -r GRPC METRICS HEALTH < "$WORK/ports"
fail=0
check() {  # expected-exit description command...
  local want=$1 what=$2; shift 2
  "$@" > "$WORK/out" 2>&1; local got=$?
  if [ "$got" = "$want" ]; then echo "ok: $what"; else echo "FAIL: $what (exit $got, wanted $want): $(cat "$WORK/out")"; fail=1; fi
}
[ "$HEALTH" -gt 0 ] 2>/dev/null || { echo "FAIL: no health port (--health_listen)"; exit 1; }
check 0 "liveness SERVING on the health port" "$CTL" --server=127.0.0.1:$HEALTH health liveness
check 0 "readiness SERVING on the health port" "$CTL" --server=127.0.0.1:$HEALTH health readiness
check 1 "authentication is on (the example tenants file has no tokens)" "$CTL" --server=127.0.0.1:$GRPC embed hello
grep -q UNAUTHENTICATED "$WORK/out" || { echo "FAIL: wanted UNAUTHENTICATED: $(cat "$WORK/out")"; fail=1; }
metrics=$(curl -s "http://127.0.0.1:$METRICS/metrics")  # whole, not piped into grep -q (SIGPIPE under pipefail)
grep -q '^deltaserve_ready 1' <<<"$metrics" && echo "ok: metrics say ready" ||
  { echo "FAIL: metrics do not say deltaserve_ready 1"; fail=1; }
kill -USR1 $pid
sleep 0.5
check 1 "preStop SIGUSR1: readiness NOT_SERVING" "$CTL" --server=127.0.0.1:$HEALTH health readiness
check 0 "preStop SIGUSR1: liveness still SERVING" "$CTL" --server=127.0.0.1:$HEALTH health liveness
start=$(date +%s)
kill -TERM $pid
wait $pid; code=$?
pid=""
took=$(( $(date +%s) - start ))
grace=$(sed -n 's/^ *terminationGracePeriodSeconds: *\([0-9]*\).*/\1/p' "$SRC/deploy/k8s/base/deployment.yaml")
if [ "$code" = 0 ] && [ "$took" -lt "${grace:-60}" ]; then echo "ok: SIGTERM: exit 0 after ${took} s (grace ${grace} s)"
else echo "FAIL: SIGTERM: exit $code after ${took} s (grace ${grace} s)"; tail -5 "$WORK/log"; fail=1; fi
[ -f "$WORK/data/audit.log" ] && echo "ok: the audit log is on the data volume" || { echo "FAIL: no audit log at the overlay's path"; fail=1; }
exit $fail
