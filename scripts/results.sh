#!/usr/bin/env bash
# Trains every kind of delta (and the full fine-tuning baseline) on the real USE-lite model through deltaserve's
# fine-tuning API, on three real classification data sets, and prints the tables of docs/RESULTS.md:
# best validation accuracy, trainable parameters (and their share of the model) and wall time per run.
#
#   bash scripts/results.sh
#
# Environment:
#   DATA_DIR   the shared data (../shared/data): glue-sst2/train.tsv, agnews/train_subset.tsv,
#              sentence-classification/TREC.train.all
#   BUILD_DIR  where the binaries are (build): either a build tree (server/deltaserve, client/deltactl) or a flat
#              folder holding deltaserve and deltactl; DELTASERVE / DELTACTL name the binaries directly
#   MODEL_DIR  the model (models/use-lite)
#   SUBSET     examples drawn from each training set (3000); VALIDATION_FRACTION of them (0.2) are held out,
#              stratified, as the validation split every accuracy below is measured on
#   EPOCHS (2), BATCH_SIZE (32), MAX_SEQ_LEN (64), SEED (1: the job seed; the subsample is fixed)
#   DATASETS   which data sets (sst2,agnews,trec); CONFIGS which rows (all of them, see below)
#   TRAINING_THREADS (2)  intra-op threads of the training job
#   KEEP_DIR   a folder to keep the prepared data, the server log and every job's JSON in (default: a temp folder,
#              removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-../shared/data}
BUILD_DIR=${BUILD_DIR:-build}
MODEL_DIR=${MODEL_DIR:-models/use-lite}
SUBSET=${SUBSET:-3000}
VALIDATION_FRACTION=${VALIDATION_FRACTION:-0.2}
EPOCHS=${EPOCHS:-2}
BATCH_SIZE=${BATCH_SIZE:-32}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-64}
SEED=${SEED:-1}
DATASETS=${DATASETS:-sst2,agnews,trec}
TRAINING_THREADS=${TRAINING_THREADS:-2}

pick() {  # the binary $1 of a build tree ($BUILD_DIR/$2/$1) or of a flat folder ($BUILD_DIR/$1)
  if [ -x "$BUILD_DIR/$2/$1" ]; then echo "$BUILD_DIR/$2/$1"; else echo "$BUILD_DIR/$1"; fi
}
DELTASERVE=${DELTASERVE:-$(pick deltaserve server)}
DELTACTL=${DELTACTL:-$(pick deltactl client)}
for b in "$DELTASERVE" "$DELTACTL"; do
  [ -x "$b" ] || { echo "results.sh: no executable $b (set BUILD_DIR, or DELTASERVE / DELTACTL)" >&2; exit 1; }
done
for f in glue-sst2/train.tsv agnews/train_subset.tsv sentence-classification/TREC.train.all; do
  [ -f "$DATA_DIR/$f" ] || { echo "results.sh: missing $DATA_DIR/$f (set DATA_DIR)" >&2; exit 1; }
done
command -v jq >/dev/null || { echo "results.sh: needs jq" >&2; exit 1; }

# The configurations: name | methods (comma separated; "full" = full fine-tuning, "" = the head alone) |
# method config JSON | peak learning rate | the head's peak learning rate ("" = the same). Learning rates: see
# docs/RESULTS.md (how they were chosen); the "-h" rows train the head at the linear probe's rate.
CONFIG_TABLE=$(cat <<'EOF'
head|||1e-2|
lora|lora|{"lora": {"rank": 8, "alpha": 16}}|2e-3|
adapter|adapter|{"adapter": {"bottleneck": 64, "placement": "pfeiffer"}}|2e-3|
bitfit|bitfit|{}|1e-2|
prompt|prompt|{"prompt": {"num_virtual_tokens": 20}}|3e-2|
lora+bitfit|lora,bitfit|{"lora": {"rank": 8, "alpha": 16}}|3e-3|
lora-h|lora|{"lora": {"rank": 8, "alpha": 16}}|2e-3|1e-2
adapter-h|adapter|{"adapter": {"bottleneck": 64, "placement": "pfeiffer"}}|2e-3|1e-2
lora+bitfit-h|lora,bitfit|{"lora": {"rank": 8, "alpha": 16}}|3e-3|1e-2
full|full||2e-4|
full-h|full||2e-4|1e-2
EOF
)
CONFIGS=${CONFIGS:-$(echo "$CONFIG_TABLE" | cut -d'|' -f1 | paste -sd,)}

if [ -n "${KEEP_DIR:-}" ]; then W=$(mkdir -p "$KEEP_DIR" && realpath "$KEEP_DIR"); else W=$(mktemp -d); fi
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  if [ -z "${KEEP_DIR:-}" ]; then rm -rf "$W"; fi
}
trap cleanup EXIT

# --- data: a fixed random subsample of each training set -------------------------------------------------------
# shuf with a constant random source is deterministic (same coreutils => same subsample).
sample() { shuf -n "$SUBSET" --random-source=<(yes); }
mkdir -p "$W/data"
# SST-2: "sentence<TAB>label" with a header.
{ printf 'sentence\tlabel\n'; tail -n +2 "$DATA_DIR/glue-sst2/train.tsv" | sample; } > "$W/data/sst2.tsv"
# AG News: "text<TAB>label" (World / Sports / Business / Sci/Tech), no header: submitted with --no_header.
sample < "$DATA_DIR/agnews/train_subset.tsv" > "$W/data/agnews.tsv"
# TREC: "<label> <question>" per line, Latin-1 (one line has a 0xA0 byte): to UTF-8 "text<TAB>label".
{ printf 'text\tlabel\n'; iconv -f ISO-8859-1 -t UTF-8 "$DATA_DIR/sentence-classification/TREC.train.all" |
    sed -E 's/^([0-9]+) (.*)$/\2\t\1/' | sample; } > "$W/data/trec.tsv"

data_flags() {
  case $1 in
    sst2) echo "--data=$W/data/sst2.tsv" ;;
    agnews) echo "--data=$W/data/agnews.tsv --no_header --text_column=0 --label_column=1" ;;
    trec) echo "--data=$W/data/trec.tsv" ;;
  esac
}
dataset_title() {
  case $1 in
    sst2) echo "GLUE SST-2 (2 classes)" ;;
    agnews) echo "AG News (4 classes)" ;;
    trec) echo "TREC question type (6 classes)" ;;
  esac
}

# --- one server ---------------------------------------------------------------------------------------------------
"$DELTASERVE" --model_dir="$MODEL_DIR" --store_dir="$W/store" --jobs_dir="$W/jobs" --listen=127.0.0.1:0 \
  --metrics_listen=127.0.0.1:0 --port_file="$W/ports" --allow_full_finetuning \
  --training_threads="$TRAINING_THREADS" > "$W/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do [ -s "$W/ports" ] && break; sleep 0.2; done
[ -s "$W/ports" ] || { echo "results.sh: the server did not start:" >&2; cat "$W/server.log" >&2; exit 1; }
SERVER=127.0.0.1:$(cut -d' ' -f1 "$W/ports")

echo "# deltaserve fine-tuning results, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(uname -m)"
echo "# model $MODEL_DIR; $SUBSET examples per data set (${VALIDATION_FRACTION} held out for validation);" \
     "$EPOCHS epochs, batch $BATCH_SIZE, max_seq_len $MAX_SEQ_LEN, seed $SEED, $TRAINING_THREADS training threads"

# --- the runs -----------------------------------------------------------------------------------------------------
mkdir -p "$W/results"
shell_words() {  # the arguments as one could type them: single quotes around those with special characters
  local a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./=:,+@%-]*$ ]]; then printf ' %s' "$a"; else printf " '%s'" "${a//\'/\'\\\'\'}"; fi
  done
}
IFS=, read -r -a datasets <<< "$DATASETS"
IFS=, read -r -a configs <<< "$CONFIGS"
for ds in "${datasets[@]}"; do
  for cfg in "${configs[@]}"; do
    line=$(echo "$CONFIG_TABLE" | awk -F'|' -v n="$cfg" '$1 == n')
    [ -n "$line" ] || { echo "results.sh: unknown config $cfg" >&2; exit 1; }
    IFS='|' read -r name methods mconfig lr head_lr <<< "$line"
    args=(--server="$SERVER" tune submit --task="$ds-${name//+/-}" $(data_flags "$ds") --epochs="$EPOCHS"
          --batch_size="$BATCH_SIZE" --lr="$lr" --max_seq_len="$MAX_SEQ_LEN"
          --validation_fraction="$VALIDATION_FRACTION" --seed="$SEED" --watch --json)
    if [ "$methods" = full ]; then args+=(--full)
    elif [ -n "$methods" ]; then args+=(--method="$methods"); fi
    if [ -n "$mconfig" ] && [ "$mconfig" != "{}" ]; then args+=(--method_config="$mconfig"); fi
    if [ -n "$head_lr" ]; then args+=(--head_lr="$head_lr"); lr="$lr / $head_lr"; fi
    { printf '+ deltactl'; shell_words "${args[@]}"; echo; } | sed "s|$W|\$W|g" >&2
    out="$W/results/$ds.$name.json"
    if ! "$DELTACTL" "${args[@]}" > "$out" 2> "$W/results/$ds.$name.err"; then
      echo "results.sh: $ds $name failed:" >&2; cat "$W/results/$ds.$name.err" >&2
    fi
    jq -c --arg ds "$ds" --arg name "$name" --arg lr "$lr" '{ds: $ds, name: $name, lr: $lr, state: .state,
      acc: ([.evals[]?.metrics.accuracy] | max), best_epoch: .best_epoch, accs: [.evals[]?.metrics.accuracy],
      trainable: (.trainable_parameters | tonumber? // 0), model: (.model_parameters | tonumber? // 0),
      secs: (((.finished_unix_micros | tonumber? // 0) - (.started_unix_micros | tonumber? // 0)) / 1e6),
      error: .error_message}' "$out" 2>/dev/null | tee -a "$W/results/all.jsonl" >&2 ||
      echo "{\"ds\": \"$ds\", \"name\": \"$name\", \"lr\": \"$lr\", \"state\": \"no result\"}" >> "$W/results/all.jsonl"
  done
done

# --- the tables ---------------------------------------------------------------------------------------------------
# jq: a fraction as a percentage with one decimal ("82.0"), two for the parameter share.
JQ_DEFS='def pct: (. * 1000 | round) as $x | (if $x < 0 then "-" else "" end) + "\($x | fabs / 10 | floor).\($x | fabs % 10)";
  def share: (. * 10000 | round) as $x | "\($x / 100 | floor).\($x % 100 / 10 | floor)\($x % 10)";'
for ds in "${datasets[@]}"; do
  echo
  echo "### $(dataset_title "$ds")"
  echo
  echo "| method | lr | val. accuracy (per epoch) | trainable params | % of model | wall s |"
  echo "|---|---:|---:|---:|---:|---:|"
  jq -r --arg ds "$ds" "$JQ_DEFS"' select(.ds == $ds) |
    if .state == "JOB_STATE_SUCCEEDED" then
      "| \(.name) | \(.lr) | **\(.acc | pct)** (\(.accs | map(pct) | join(", "))) | \(.trainable) | \(if .model > 0 then (.trainable / .model | share) else "?" end) | \(.secs | round) |"
    else "| \(.name) | \(.lr) | \(.state): \(.error // "") | | | |" end' "$W/results/all.jsonl"
done

# --- the verdict: the best delta at <= 2 % trainable parameters against the better full fine-tuning row -----------
echo
echo "| data set | full fine-tuning (the better row) | best delta at <= 2 % params | its accuracy | gap (points) | within 3 points |"
echo "|---|---:|---|---:|---:|---|"
for ds in "${datasets[@]}"; do
  jq -rs --arg ds "$ds" "$JQ_DEFS"' map(select(.ds == $ds and .state == "JOB_STATE_SUCCEEDED")) as $r |
    ($r | map(select(.name | startswith("full"))) | max_by(.acc)) as $full |
    ($r | map(select((.name | startswith("full") | not) and .name != "head" and .model > 0 and
                     .trainable / .model <= 0.02))
        | max_by(.acc)) as $best |
    if $full == null or $best == null then "| \($ds) | ? | ? | ? | ? | ? |" else
    "| \($ds) | \($full.acc | pct) | \($best.name) (\($best.trainable / $best.model | share) %) | \($best.acc | pct) | \($full.acc - $best.acc | pct) | \(if $full.acc - $best.acc <= 0.03 then "yes" else "no" end) |" end' \
    "$W/results/all.jsonl"
done
echo
jq -rs '"Training time, all runs: \(map(.secs // 0) | add | round) s."' "$W/results/all.jsonl"
