#!/usr/bin/env bash
# The test suite under sanitizers (docs/SECURITY.md, "Sanitizers").
#
#   bash scripts/sanitize.sh asan            # AddressSanitizer + UndefinedBehaviorSanitizer (gcc), whole suite
#   bash scripts/sanitize.sh asan -R Auth    # extra arguments go to ctest (here: only tests matching "Auth")
#   bash scripts/sanitize.sh tsan -L unit    # ThreadSanitizer (see the caveat below)
#
# Builds the project in build-<kind> (BUILD_DIR overrides) with the sanitizer on everything compiled here, then runs
# ctest there. LibTorch, gRPC, Abseil, OpenBLAS and the other system libraries are Debian's and not instrumented:
# ASan still sees every heap access our code makes (it replaces malloc process-wide), UBSan checks our code only.
#
# ThreadSanitizer caveat: Debian's Abseil is not built with TSan, so TSan cannot see the happens-before edges of
# absl::Mutex and would report every field guarded by one as a race. `tsan` therefore needs an Abseil built with
# -fsanitize=thread: set ABSL_TSAN_PREFIX to its install prefix (the script passes it to CMake first); without it the
# script refuses to run rather than print thousands of false reports. Debian's libgomp has the same problem for
# OpenMP regions; the tsan run sets OMP_NUM_THREADS=1 so that LibTorch runs ops on the calling thread.
#
# Environment: BUILD_DIR, JOBS (nproc), CTEST_TIMEOUT (1800 s per test: everything is 2-15x slower).
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=${1:-asan}
shift || true
JOBS=${JOBS:-$(nproc)}
CTEST_TIMEOUT=${CTEST_TIMEOUT:-1800}

case "$KIND" in
  asan)
    FLAGS="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    ;;
  tsan)
    if [ -z "${ABSL_TSAN_PREFIX:-}" ]; then
      echo "sanitize.sh: tsan needs an Abseil built with -fsanitize=thread (set ABSL_TSAN_PREFIX); see the comment" \
           "at the top of this script and docs/SECURITY.md" >&2
      exit 2
    fi
    FLAGS="-fsanitize=thread -fno-omit-frame-pointer"
    export OMP_NUM_THREADS=1
    ;;
  *)
    echo "usage: bash scripts/sanitize.sh asan|tsan [ctest arguments...]" >&2
    exit 2
    ;;
esac

BUILD_DIR=${BUILD_DIR:-build-$KIND}
CMAKE_ARGS=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS=$FLAGS" "-DCMAKE_C_FLAGS=$FLAGS"
            "-DCMAKE_EXE_LINKER_FLAGS=$FLAGS" "-DCMAKE_SHARED_LINKER_FLAGS=$FLAGS")
if [ -n "${ABSL_TSAN_PREFIX:-}" ]; then CMAKE_ARGS+=("-DCMAKE_PREFIX_PATH=$ABSL_TSAN_PREFIX"); fi
if command -v ccache >/dev/null 2>&1; then CMAKE_ARGS+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi

echo "sanitize.sh: configuring $BUILD_DIR ($KIND: $FLAGS)" >&2
cmake "${CMAKE_ARGS[@]}" >/dev/null
echo "sanitize.sh: building with $JOBS jobs" >&2
cmake --build "$BUILD_DIR" -j "$JOBS"

# Leaks of the system libraries' process-lifetime singletons (not ours): suppressed by library, never by our code.
SUPP="$PWD/$BUILD_DIR/lsan.supp"
cat > "$SUPP" <<'SUPP_EOF'
leak:libtorch
leak:libc10
leak:libgomp
leak:libopenblas
leak:libprotobuf
leak:libgrpc
leak:libabsl
leak:libpython
SUPP_EOF
export ASAN_OPTIONS=${ASAN_OPTIONS:-"detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0"}
export LSAN_OPTIONS=${LSAN_OPTIONS:-"suppressions=$SUPP:print_suppressions=0"}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-"print_stacktrace=1:halt_on_error=1"}
export TSAN_OPTIONS=${TSAN_OPTIONS:-"halt_on_error=1:second_deadlock_stack=1"}

echo "sanitize.sh: running the suite" >&2
start=$(date +%s)
status=0
(cd "$BUILD_DIR" && ctest --timeout "$CTEST_TIMEOUT" -j "$JOBS" --output-on-failure "$@") || status=$?
echo "sanitize.sh: $KIND suite finished in $(( $(date +%s) - start )) s with status $status" >&2
exit $status
