#!/usr/bin/env bash
# The test suite under sanitizers (docs/SECURITY.md, "Sanitizers").
#
#   bash scripts/sanitize.sh asan            # AddressSanitizer + UndefinedBehaviorSanitizer (gcc), whole suite
#   bash scripts/sanitize.sh asan -R Auth    # extra arguments go to ctest (here: only tests matching "Auth")
#   ABSL_TSAN_PREFIX=/opt/absl-tsan bash scripts/sanitize.sh tsan   # ThreadSanitizer, 19 binaries (see below)
#   ABSL_TSAN_PREFIX=/opt/absl-tsan GRPC_TSAN_PREFIX=/opt/grpc-tsan bash scripts/sanitize.sh tsan   # whole suite
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
#     -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" -DCMAKE_INSTALL_PREFIX=/opt/absl-tsan \
#     -DCMAKE_INSTALL_RPATH=/opt/absl-tsan/lib
#   cmake --build /tmp/absl-tsan-build && cmake --install /tmp/absl-tsan-build
# (The RUNPATH makes each Abseil library find its Abseil dependencies in the prefix even without LD_LIBRARY_PATH;
# RUNPATH is not transitive, so without it a binary's indirect Abseil dependencies would be Debian's.)
# Debian's gRPC links Debian's Abseil, and two Abseils in one process do not mix. Without GRPC_TSAN_PREFIX the tsan
# run therefore covers only the test binaries that do not link gRPC: tenants and tokens, the authenticator's reload
# thread, the request limiter, the audit log, the delta store (memory, filesystem, faults), the batcher and
# scheduler, the delta cache, datasets, metrics, the inference engine's batch runner with deltas, the trainer (yield
# to serving, cancel) and the job manager's workers (TSAN_TARGETS overrides the list), in build-tsan.
#
# Whole suite under TSan (build-tsan-full): set GRPC_TSAN_PREFIX to a gRPC rebuilt from Debian's source package
# against the TSan Abseil, with -fsanitize=thread (about 30 min with `make -j2` on 2 shared cores). As root:
#   apt-get install libprotoc-dev           # grpc_cpp_plugin's build needs it (same protobuf 3.21.12 as Debian's)
#   cd /tmp && apt-get source grpc          # 1.51.1 with Debian's patches, like the installed libgrpc++-dev
#   # optional: let ccache serve the *_unsecure twins (same sources, only -D<target>_EXPORTS differs; unused):
#   printf '%s\n' 'cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL set_target_properties grpc_unsecure PROPERTIES DEFINE_SYMBOL grpc_EXPORTS)' \
#     'cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL set_target_properties grpc++_unsecure PROPERTIES DEFINE_SYMBOL grpc___EXPORTS)' \
#     > /tmp/grpc-tsan-hooks.cmake
#   F="-fsanitize=thread -fno-omit-frame-pointer -O1 -g"
#   cmake -S /tmp/grpc-1.51.1 -B /tmp/grpc-tsan-build -DCMAKE_BUILD_TYPE= -DCMAKE_CXX_STANDARD=17 \
#     -DCMAKE_C_FLAGS="$F" -DCMAKE_CXX_FLAGS="$F" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread \
#     -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread -DCMAKE_C_COMPILER_LAUNCHER=ccache \
#     -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_PROJECT_INCLUDE=/tmp/grpc-tsan-hooks.cmake \
#     -DCMAKE_PREFIX_PATH=/opt/absl-tsan -DCMAKE_INSTALL_PREFIX=/opt/grpc-tsan \
#     -DCMAKE_INSTALL_RPATH="/opt/grpc-tsan/lib;/opt/absl-tsan/lib" -DBUILD_SHARED_LIBS=ON -DgRPC_BUILD_TESTS=OFF \
#     -DgRPC_ABSL_PROVIDER=package -DgRPC_CARES_PROVIDER=package -DgRPC_PROTOBUF_PROVIDER=package \
#     -DgRPC_RE2_PROVIDER=package -DgRPC_SSL_PROVIDER=package -DgRPC_ZLIB_PROVIDER=package \
#     -DgRPC_BACKWARDS_COMPATIBILITY_MODE=OFF -DgRPC_BUILD_GRPC_CPP_PLUGIN=ON -DgRPC_BUILD_GRPC_CSHARP_PLUGIN=OFF \
#     -DgRPC_BUILD_GRPC_NODE_PLUGIN=OFF -DgRPC_BUILD_GRPC_OBJECTIVE_C_PLUGIN=OFF -DgRPC_BUILD_GRPC_PHP_PLUGIN=OFF \
#     -DgRPC_BUILD_GRPC_PYTHON_PLUGIN=OFF -DgRPC_BUILD_GRPC_RUBY_PLUGIN=OFF
#   cd /tmp/grpc-tsan-build && nice -n 19 make -j2 grpc && nice -n 19 make -j2 && make install
# (`make grpc` first so that the unsecure twins come from ccache instead of compiling in lockstep with it.) Only
# gRPC links Abseil in our processes (protobuf 3.21, re2 20220601, c-ares, prometheus-cpp 1.0 and LibTorch do not),
# so those stay Debian's. The script points CMake at both prefixes (gRPC_DIR, absl_DIR), checks with ldd that every
# binary it built loads gRPC and Abseil from them, and runs the whole ctest suite with both on LD_LIBRARY_PATH.
# Every TSan process, including the deltaserve servers the integration tests start (whose stderr the tests keep in
# temporary directories), writes its reports to <build>/tsan-reports/ (TSAN_OPTIONS log_path), which the script
# checks after the run. python_client_test runs in a second ctest pass without LD_LIBRARY_PATH: Debian's Python
# grpcio links Debian's Abseil, which a TSan Abseil on the path would replace (libtsan cannot be dlopen'ed); the
# deltaserve it starts finds the TSan libraries through its RUNPATH. deploy_dockerfile (the image's Debian package
# list, which the TSan libraries are in none of) is skipped. LibTorch and libgomp stay uninstrumented
# (OMP_NUM_THREADS=1, which deltaserve's --threads=0 honours).
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
    if [ -n "${GRPC_TSAN_PREFIX:-}" ] && [ ! -f "$GRPC_TSAN_PREFIX/lib/cmake/grpc/gRPCConfig.cmake" ]; then
      echo "sanitize.sh: GRPC_TSAN_PREFIX=$GRPC_TSAN_PREFIX has no lib/cmake/grpc/gRPCConfig.cmake; see the comment" \
           "at the top of this script" >&2
      exit 2
    fi
    FLAGS="-fsanitize=thread -fno-omit-frame-pointer"
    if [ -z "${GRPC_TSAN_PREFIX:-}" ]; then
      TSAN_TARGETS=${TSAN_TARGETS:-"tenants_test authenticator_test request_limiter_test audit_log_test ref_table_test
        store_names_test memory_store_test fault_store_test fs_store_test batcher_test scheduler_test delta_cache_test
        dataset_test metrics_test scheduler_metrics_test inference_engine_test engine_delta_test trainer_test
        job_manager_test"}
    fi
    # LibTorch's OpenMP regions run in Debian's libgomp, which TSan cannot see into: one thread per op.
    export OMP_NUM_THREADS=1
    ;;
  *)
    echo "usage: bash scripts/sanitize.sh asan|tsan [ctest arguments...]" >&2
    exit 2
    ;;
esac
# The whole suite under TSan: both prefixes known (GRPC_TSAN_PREFIX set).
TSAN_FULL=0
if [ "$KIND" = tsan ] && [ -n "${GRPC_TSAN_PREFIX:-}" ]; then TSAN_FULL=1; fi

if [ "$TSAN_FULL" = 1 ]; then BUILD_DIR=${BUILD_DIR:-build-tsan-full}; else BUILD_DIR=${BUILD_DIR:-build-$KIND}; fi
case "$BUILD_DIR" in /*) BUILD_ABS=$BUILD_DIR ;; *) BUILD_ABS=$PWD/$BUILD_DIR ;; esac
CMAKE_ARGS=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS=$FLAGS" "-DCMAKE_C_FLAGS=$FLAGS"
            "-DCMAKE_EXE_LINKER_FLAGS=$FLAGS" "-DCMAKE_SHARED_LINKER_FLAGS=$FLAGS")
if [ "$TSAN_FULL" = 1 ]; then
  # Explicit *_DIR as well, so that a cache configured before the prefixes existed cannot keep Debian's.
  CMAKE_ARGS+=("-DCMAKE_PREFIX_PATH=$GRPC_TSAN_PREFIX;$ABSL_TSAN_PREFIX" "-DgRPC_DIR=$GRPC_TSAN_PREFIX/lib/cmake/grpc"
               "-Dabsl_DIR=$ABSL_TSAN_PREFIX/lib/cmake/absl")
elif [ -n "${ABSL_TSAN_PREFIX:-}" ]; then
  CMAKE_ARGS+=("-DCMAKE_PREFIX_PATH=$ABSL_TSAN_PREFIX")
fi
if command -v ccache >/dev/null 2>&1; then CMAKE_ARGS+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi

echo "sanitize.sh: configuring $BUILD_DIR ($KIND: $FLAGS)" >&2
cmake "${CMAKE_ARGS[@]}" >/dev/null
echo "sanitize.sh: building with $JOBS jobs" >&2
if [ "$KIND" = tsan ] && [ "$TSAN_FULL" = 0 ]; then
  # shellcheck disable=SC2086
  cmake --build "$BUILD_DIR" -j "$JOBS" --target $TSAN_TARGETS
else
  cmake --build "$BUILD_DIR" -j "$JOBS"
fi

# Leaks of the system libraries' process-lifetime singletons (not ours): suppressed by library, never by our code.
SUPP="$BUILD_ABS/lsan.supp"
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
TSAN_SUPP="$BUILD_ABS/tsan.supp"
cat > "$TSAN_SUPP" <<'SUPP_EOF'
race:synchronization_internal::Waiter::Post
race:synchronization_internal::Waiter::Wait
SUPP_EOF
# Whole-suite run only (gRPC instrumented, real servers and clients), each for reports whose racing accesses are in
# third-party code:
# - CRYPTO_THREAD_lock_free: OpenSSL (Debian's libcrypto, uninstrumented) destroys a lock once its own atomic
#   refcount, which TSan cannot see, drops to zero (gRPC's TLS endpoint teardown).
# - std::ctype<char>::narrow: libstdc++ fills a per-locale cache lazily; concurrent std::regex compiles store
#   identical bytes (GCC PR 77704, benign by design).
# - libgomp.so: threads that Debian's libgomp (uninstrumented) starts for LibTorch's OpenMP regions; TSan cannot
#   see its fork/join barriers. Only servers started with an explicit --threads=2 have them (OMP_NUM_THREADS=1).
# - libdnnl.so: oneDNN inside LibTorch (uninstrumented) publishes its cached primitives through atomics TSan
#   cannot see (concurrent forward passes of the BERT model).
# - thread:libgpr.so: gRPC's own threads (grpc_core::Thread, e.g. the resolver executor), which grpc_shutdown joins
#   asynchronously, can still be unjoined when a short-lived client such as deltactl exits: a "thread leak" of gRPC's.
if [ "$TSAN_FULL" = 1 ]; then
  cat >> "$TSAN_SUPP" <<'SUPP_EOF'
race:CRYPTO_THREAD_lock_free
race:std::ctype<char>::narrow
race:libgomp.so
race:libdnnl.so
thread:libgpr.so
SUPP_EOF
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-"detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0"}
export LSAN_OPTIONS=${LSAN_OPTIONS:-"suppressions=$SUPP:print_suppressions=0"}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-"print_stacktrace=1:halt_on_error=1"}
TSAN_OPTIONS_BASE="halt_on_error=0:second_deadlock_stack=1:suppressions=$TSAN_SUPP"
REPORTS="$BUILD_ABS/tsan-reports"
if [ "$TSAN_FULL" = 1 ]; then
  # Every TSan process (test binaries and the servers and tools they start) writes its reports to
  # $REPORTS/report.<exe>.<pid>: the integration tests keep the servers' stderr in temporary directories.
  rm -rf "$REPORTS" && mkdir -p "$REPORTS"
  # ignore_noninstrumented_modules: memcpy and friends called from uninstrumented libraries (LibTorch on libgomp's
  # threads, whose stacks end inside LibTorch) are not checked, like the rest of those libraries' accesses.
  TSAN_OPTIONS_BASE="$TSAN_OPTIONS_BASE:log_path=$REPORTS/report:log_exe_name=1:ignore_noninstrumented_modules=1"
fi
export TSAN_OPTIONS=${TSAN_OPTIONS:-$TSAN_OPTIONS_BASE}

status=0
if [ "$TSAN_FULL" = 1 ]; then
  export LD_LIBRARY_PATH="$GRPC_TSAN_PREFIX/lib:$ABSL_TSAN_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # Every executable built here must load gRPC and Abseil from the prefixes, never Debian's copies.
  bad=0; checked=0
  while IFS= read -r bin; do
    file -b "$bin" | grep -q '^ELF' || continue
    checked=$((checked + 1))
    for env in "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" "LD_LIBRARY_PATH="; do  # with the path, and through RUNPATH alone
      wrong=$(env "$env" ldd "$bin" | awk '$1 ~ /^lib(absl_|grpc|gpr|upb|address_sorting)/ {print $1" => "$3}' |
              grep -v -e " => $GRPC_TSAN_PREFIX/lib/" -e " => $ABSL_TSAN_PREFIX/lib/" || true)
      if [ -n "$wrong" ]; then bad=1; echo "sanitize.sh: $bin ($env) loads: $(echo "$wrong" | tr "\n" " ")" >&2; fi
    done
  done < <(find "$BUILD_DIR" -path "$BUILD_DIR/CMakeFiles" -prune -o -type f -perm -u+x ! -name '*.so*' -print)
  if [ "$bad" != 0 ]; then echo "sanitize.sh: uninstrumented gRPC or Abseil would be loaded; stopping" >&2; exit 1; fi
  echo "sanitize.sh: $checked executables load gRPC and Abseil from $GRPC_TSAN_PREFIX and $ABSL_TSAN_PREFIX" >&2
fi

echo "sanitize.sh: running the suite" >&2
start=$(date +%s)
if [ "$KIND" = tsan ] && [ "$TSAN_FULL" = 0 ]; then
  export LD_LIBRARY_PATH="$ABSL_TSAN_PREFIX/lib:${LD_LIBRARY_PATH:-}"
  for t in $TSAN_TARGETS; do
    bin=$(find "$BUILD_DIR/tests" -type f -name "$t" -perm -u+x | head -1)
    echo "sanitize.sh: tsan: $t" >&2
    "$bin" "$@" > "$BUILD_DIR/$t.tsan.log" 2>&1 || { status=$?; echo "sanitize.sh: $t FAILED (see $BUILD_DIR/$t.tsan.log)" >&2; }
    grep -q "WARNING: ThreadSanitizer" "$BUILD_DIR/$t.tsan.log" && { status=1; echo "sanitize.sh: $t: TSan report" >&2; }
    tail -1 "$BUILD_DIR/$t.tsan.log" >&2
  done
elif [ "$TSAN_FULL" = 1 ]; then
  # Debian's Python grpcio links Debian's Abseil: python_client_test runs without LD_LIBRARY_PATH (second pass,
  # only when no ctest arguments narrow the run). deploy_dockerfile maps every shared library of the binaries to a
  # Debian package for the image; the TSan builds of gRPC and Abseil belong to none, so it cannot pass here.
  (cd "$BUILD_DIR" && ctest --timeout "$CTEST_TIMEOUT" -j "$JOBS" --output-on-failure \
     -E '^(python_client_test|deploy_dockerfile)$' "$@") || status=$?
  if [ $# -eq 0 ]; then
    (cd "$BUILD_DIR" && env -u LD_LIBRARY_PATH ctest --timeout "$CTEST_TIMEOUT" --output-on-failure \
       -R '^python_client_test$') || status=$?
  fi
  reports=$(grep -l "ThreadSanitizer" "$REPORTS"/* 2>/dev/null || true)
  if [ -n "$reports" ]; then
    status=1
    echo "sanitize.sh: TSan reports in $(echo "$reports" | wc -l) process(es):" >&2
    for f in $reports; do echo "  $f: $(grep -h '^SUMMARY: ThreadSanitizer' "$f" | sort | uniq -c | head -5 | tr '\n' ';')" >&2; done
  else
    echo "sanitize.sh: no TSan report in any process (test binaries and the servers they start)" >&2
  fi
else
  (cd "$BUILD_DIR" && ctest --timeout "$CTEST_TIMEOUT" -j "$JOBS" --output-on-failure "$@") || status=$?
fi
echo "sanitize.sh: $KIND suite finished in $(( $(date +%s) - start )) s with status $status" >&2
exit $status
