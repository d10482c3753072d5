#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang, AddressSanitizer + UndefinedBehaviorSanitizer) and runs each
# for a while on a copy of its seed corpus (docs/SECURITY.md, "Fuzzing").
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Each target runs on $WORK_DIR/<target>/corpus (seeded from tests/fuzz/corpus/<target>/, kept between runs) with
# tests/fuzz/dict/<target>.dict when there is one.
#     SECONDS_PER_TARGET  default 600; 0 only builds and replays the seed corpora
#     TARGET              e.g. delta_pack wordpiece (default: every tests/fuzz/*_fuzzer.cc)
#
# Environment: BUILD_DIR (default build-fuzz), WORK_DIR (default $BUILD_DIR/fuzz-work: the growing corpora, the
# logs and any crash files; never the repository), JOBS (build jobs, default: cores), RSS_LIMIT_MB (default 4096),
# FUZZ_ARGS (more libFuzzer flags, e.g. "-jobs=2 -workers=2").
#
# Installs clang and its sanitizer / libFuzzer runtimes with apt-get when they are missing (the normal build does
# not need them). Prints a summary table (also in $WORK_DIR/summary.md) and exits non-zero when any target found
# a crash, a leak, a timeout or an out-of-memory; the reproducer stays in $WORK_DIR/<target>/ and
# `$BUILD_DIR/tests/fuzz/<target>_fuzzer <file>` replays it. A fixed bug's reproducer belongs in
# tests/fuzz/corpus/<target>/, where ctest replays it in every build.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
SECONDS_PER_TARGET=${1:-600}
shift || true
BUILD_DIR=${BUILD_DIR:-build-fuzz}
WORK_DIR=${WORK_DIR:-$BUILD_DIR/fuzz-work}
JOBS=${JOBS:-$(nproc)}
RSS_LIMIT_MB=${RSS_LIMIT_MB:-4096}

if [ $# -gt 0 ]; then
  TARGETS=("$@")
else
  TARGETS=()
  for f in tests/fuzz/*_fuzzer.cc; do
    t=$(basename "$f" _fuzzer.cc)
    TARGETS+=("$t")
  done
fi
for t in "${TARGETS[@]}"; do
  [ -f "tests/fuzz/${t}_fuzzer.cc" ] || { echo "fuzz: no target $t (tests/fuzz/${t}_fuzzer.cc)" >&2; exit 2; }
done

# clang, and the runtimes -fsanitize=fuzzer,address,undefined links (Debian: libclang-rt-<version>-dev).
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
  echo "fuzz: installing $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" \
    >/tmp/deltaserve-fuzz-apt.log 2>&1 ||
    { echo "fuzz: apt-get could not install $* (see /tmp/deltaserve-fuzz-apt.log)" >&2; exit 1; }
}
if ! command -v clang++ >/dev/null 2>&1; then apt_install clang; fi
if [ ! -f "$(clang++ -print-file-name=libclang_rt.fuzzer-x86_64.a)" ]; then
  CLANG_MAJOR=$(clang++ -dumpversion | cut -d. -f1)
  apt_install "libclang-rt-${CLANG_MAJOR}-dev"
fi

echo "fuzz: configuring $BUILD_DIR (clang, DS_BUILD_FUZZERS=ON)"
CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDS_BUILD_FUZZERS=ON >/dev/null
BINARIES=()
for t in "${TARGETS[@]}"; do BINARIES+=("${t}_fuzzer"); done
echo "fuzz: building ${BINARIES[*]} ($JOBS jobs)"
cmake --build "$BUILD_DIR" -j "$JOBS" --target "${BINARIES[@]}"

mkdir -p "$WORK_DIR"
WORK_DIR=$(cd "$WORK_DIR" && pwd)
export DS_SOURCE_DIR="$ROOT"
# Leaks are reported (libFuzzer checks every input whose mallocs and frees do not match); UBSan stops at the first
# report with a stack trace.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

SUMMARY="$WORK_DIR/summary.md"
{
  echo "| target | seconds | executions | exec/s | coverage (edges) | features | corpus | result |"
  echo "|---|---:|---:|---:|---:|---:|---:|---|"
} >"$SUMMARY"
FAILED=0
for t in "${TARGETS[@]}"; do
  bin="$BUILD_DIR/tests/fuzz/${t}_fuzzer"
  dir="$WORK_DIR/$t"
  mkdir -p "$dir/corpus"
  cp -n "tests/fuzz/corpus/$t/"* "$dir/corpus/" 2>/dev/null || true
  log="$dir/fuzz.log"
  before=$(ls "$dir" | grep -cE '^(crash|leak|timeout|oom|slow-unit)-' || true)
  start=$(date +%s)
  rc=0
  dict=()
  if [ -f "tests/fuzz/dict/$t.dict" ]; then dict=(-dict="tests/fuzz/dict/$t.dict"); fi
  if [ "$SECONDS_PER_TARGET" -gt 0 ]; then
    echo "fuzz: $t for ${SECONDS_PER_TARGET}s (log: $log)"
    # shellcheck disable=SC2086
    "$bin" "$dir/corpus" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb="$RSS_LIMIT_MB" -timeout=10 \
      -print_final_stats=1 -artifact_prefix="$dir/" "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1 || rc=$?
  else
    echo "fuzz: $t: replaying its corpus (log: $log)"
    "$bin" -runs=0 -rss_limit_mb="$RSS_LIMIT_MB" -timeout=10 -print_final_stats=1 -artifact_prefix="$dir/" \
      "$dir/corpus" >"$log" 2>&1 || rc=$?
  fi
  elapsed=$(( $(date +%s) - start ))
  execs=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  speed=$(grep -oE 'stat::average_exec_per_sec: +[0-9]+' "$log" | tail -1 | awk '{print $2}')
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  corpus=$(ls "$dir/corpus" | wc -l)
  after=$(ls "$dir" | grep -cE '^(crash|leak|timeout|oom|slow-unit)-' || true)
  if [ "$rc" -eq 0 ]; then
    result="ok"
  else
    FAILED=1
    kind=$(grep -oE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer|UndefinedBehaviorSanitizer)[^ ]*( [a-z-]+)?' \
      "$log" | head -1 || true)
    [ -n "$kind" ] || kind=$(grep -oE 'runtime error|FUZZ_CHECK failed|deadly signal' "$log" | head -1 || true)
    files=$(ls -t "$dir" | grep -E '^(crash|leak|timeout|oom)-' | head -3 | sed "s|^|$dir/|" | tr '\n' ' ')
    result="FAILED (rc $rc${kind:+: $kind}; $((after - before)) new artifact(s): ${files:-none})"
  fi
  echo "| $t | $elapsed | ${execs:-?} | ${speed:-?} | ${cov:-?} | ${ft:-?} | $corpus | $result |" >>"$SUMMARY"
  echo "fuzz: $t: $result"
done

echo
cat "$SUMMARY"
if [ "$FAILED" -ne 0 ]; then
  echo "fuzz: some targets failed; the logs and reproducers are in $WORK_DIR" >&2
  exit 1
fi
