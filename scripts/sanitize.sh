#!/usr/bin/env bash
# The test suite under sanitizers (docs/SECURITY.md, "Sanitizers").
#
#   bash scripts/sanitize.sh asan            # AddressSanitizer + UndefinedBehaviorSanitizer (gcc), whole suite
#   bash scripts/sanitize.sh asan -R Auth    # extra arguments go to ctest (here: only tests matching "Auth")
#   ABSL_TSAN_PREFIX=/opt/absl-tsan bash scripts/sanitize.sh tsan   # ThreadSanitizer (see the caveat below)
#
# Builds the project in build-<kind> (BUILD_DIR overrides) with the sanitizer on everything compiled here, then runs
# ctest there. LibTorch, gRPC, Abseil, OpenBLAS and the other system libraries are Debian's and not instrumented:
# ASan still sees every heap access our code makes (it replaces malloc process-wide), UBSan checks our code only.
#
# ThreadSanitizer caveat: Debian's Abseil is not built with TSan, so TSan cannot see the happens-before edges of
# absl::Mutex and would report every field guarded by one as a race. `tsan` therefore needs an Abseil built with
# -fsanitize=thread: set ABSL_TSAN_PREFIX to its install prefix (the script passes it to CMake first); without it the
# script refuses to run rather than print thousands of false reports. Build one from Debian's own source package:
#   add a deb-src line for bookworm, `apt-get source abseil`, then in abseil-20220623.1/:
#   cmake -S . -B /tmp/absl-tsan-build -DCMAKE_CXX_STANDARD=17 -DABSL_PROPAGATE_CXX_STD=ON -DBUILD_SHARED_LIBS=ON \
#     -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" -DCMAKE_INSTALL_PREFIX=/opt/absl-tsan
#   cmake --build /tmp/absl-tsan-build && cmake --install /tmp/absl-tsan-build
# Debian's gRPC links Debian's Abseil, and two Abseils in one process do not mix, so the tsan run covers the test
# binaries that do not link gRPC: tenants and tokens, the authenticator's reload thread, the request limiter, the
# audit log, the delta store (memory, filesystem, faults), the batcher and scheduler, the delta cache, datasets,
# metrics, the inference engine's batch runner with deltas, the trainer (yield to serving, cancel) and the job
# manager's workers (TSAN_TARGETS overrides the list). LibTorch and libgomp stay uninstrumented (OMP_NUM_THREADS=1).
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
    TSAN_TARGETS=${TSAN_TARGETS:-"tenants_test authenticator_test request_limiter_test audit_log_test ref_table_test
      store_names_test memory_store_test fault_store_test fs_store_test batcher_test scheduler_test delta_cache_test
      dataset_test metrics_test scheduler_metrics_test inference_engine_test engine_delta_test trainer_test
      job_manager_test"}
    # LibTorch's OpenMP regions run in Debian's libgomp, which TSan cannot see into: one thread per op.
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
if [ "$KIND" = tsan ]; then
  # shellcheck disable=SC2086
  cmake --build "$BUILD_DIR" -j "$JOBS" --target $TSAN_TARGETS
else
  cmake --build "$BUILD_DIR" -j "$JOBS"
fi

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
# Abseil's own futex word in a reused thread identity (Waiter::Post on memory LowLevelAlloc mmap'ed for another
# thread) is reported with Debian's gcc even in a TSan-built Abseil: a false positive inside Abseil, suppressed by
# its function, never a frame of ours.
TSAN_SUPP="$PWD/$BUILD_DIR/tsan.supp"
cat > "$TSAN_SUPP" <<'SUPP_EOF'
race:synchronization_internal::Waiter::Post
race:synchronization_internal::Waiter::Wait
SUPP_EOF
export ASAN_OPTIONS=${ASAN_OPTIONS:-"detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0"}
export LSAN_OPTIONS=${LSAN_OPTIONS:-"suppressions=$SUPP:print_suppressions=0"}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-"print_stacktrace=1:halt_on_error=1"}
export TSAN_OPTIONS=${TSAN_OPTIONS:-"halt_on_error=0:second_deadlock_stack=1:suppressions=$TSAN_SUPP"}

echo "sanitize.sh: running the suite" >&2
start=$(date +%s)
status=0
if [ "$KIND" = tsan ]; then
  export LD_LIBRARY_PATH="$ABSL_TSAN_PREFIX/lib:${LD_LIBRARY_PATH:-}"
  for t in $TSAN_TARGETS; do
    bin=$(find "$BUILD_DIR/tests" -type f -name "$t" -perm -u+x | head -1)
    echo "sanitize.sh: tsan: $t" >&2
    "$bin" "$@" > "$BUILD_DIR/$t.tsan.log" 2>&1 || { status=$?; echo "sanitize.sh: $t FAILED (see $BUILD_DIR/$t.tsan.log)" >&2; }
    grep -q "WARNING: ThreadSanitizer" "$BUILD_DIR/$t.tsan.log" && { status=1; echo "sanitize.sh: $t: TSan report" >&2; }
    tail -1 "$BUILD_DIR/$t.tsan.log" >&2
  done
else
  (cd "$BUILD_DIR" && ctest --timeout "$CTEST_TIMEOUT" -j "$JOBS" --output-on-failure "$@") || status=$?
fi
echo "sanitize.sh: $KIND suite finished in $(( $(date +%s) - start )) s with status $status" >&2
exit $status
