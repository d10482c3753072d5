#!/usr/bin/env bash
# Keeps deploy/Dockerfile honest without a Docker engine: what its build stage runs and copies exists in this
# build, the runtime package list (scripts/runtime_packages.sh) covers the binaries and holds no -dev package, and
# every flag its ENTRYPOINT/CMD passes is a flag the server knows. With a reachable Docker daemon it also runs
# `docker build --check`.
#
#   bash tests/deploy/dockerfile_test.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
SRC=${1:?source dir}
BUILD=${2:?build dir}
DOCKERFILE="$SRC/deploy/Dockerfile"
fail=0
err() { echo "dockerfile_test: $*" >&2; fail=1; }

[ -f "$DOCKERFILE" ] || { err "$DOCKERFILE is missing"; exit 1; }
grep -q 'bash scripts/setup.sh build' "$DOCKERFILE" || err "the build stage must run the README's setup (scripts/setup.sh build)"
grep -q 'scripts/runtime_packages.sh' "$DOCKERFILE" || err "the runtime stage must install scripts/runtime_packages.sh's list"
grep -q '^USER 10001' "$DOCKERFILE" || err "the runtime stage must run as the non-root user 10001"
[ -f "$SRC/.dockerignore" ] || err ".dockerignore is missing (the build context would carry build trees)"

# The targets it builds exist.
targets=$(sed -n 's/.*BUILD_TARGETS="\([^"]*\)".*/\1/p' "$DOCKERFILE")
[ -n "$targets" ] || err "no BUILD_TARGETS in the build stage"
known=$(cmake --build "$BUILD" --target help 2>/dev/null || true)
for t in $targets; do
  grep -q -- "\.\.\. $t\$" <<<"$known" || err "BUILD_TARGETS names $t, which is not a CMake target"
done

# What it copies out of the build tree exists here (the same relative paths).
for rel in $(grep -o 'build/[A-Za-z0-9_/.-]*' "$DOCKERFILE" | sort -u); do
  [ -e "$BUILD/${rel#build/}" ] || err "the Dockerfile copies $rel, which this build does not produce"
done
if [ -d "$SRC/models/use-lite" ]; then
  for rel in $(grep -o 'models/use-lite/[A-Za-z0-9_.-]*' "$DOCKERFILE" | sort -u); do
    [ -e "$SRC/$rel" ] || err "the Dockerfile copies $rel, which scripts/get_use_lite.sh does not write"
  done
fi

# The runtime packages: computed from the binaries, installed here, no development packages, and together they
# provide every shared library the binaries load.
bins=("$BUILD/server/deltaserve" "$BUILD/client/deltactl" "$BUILD/tools/deltaserve-pack")
if pkgs=$(bash "$SRC/scripts/runtime_packages.sh" "${bins[@]}"); then
  for p in $pkgs; do
    case "$p" in *-dev) err "runtime package $p is a development package";; esac
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || err "runtime package $p is not a Debian package installed here"
  done
  for must in libtorch1.13 libgrpc++1.51 libprotobuf32 libabsl20220623 libc6; do
    grep -qx "$must" <<<"$pkgs" || err "runtime packages lack $must"
  done
  echo "dockerfile_test: runtime packages: $(tr '\n' ' ' <<<"$pkgs")"
else
  err "scripts/runtime_packages.sh failed"
fi
for b in "${bins[@]}"; do
  if ldd "$b" | grep -q "not found"; then err "$b has unresolved libraries"; fi
done

# Every flag in ENTRYPOINT and CMD is a flag of the server.
helpfull=$("$BUILD/server/deltaserve" --helpfull 2>&1 || true)
for flag in $(sed -n '/^\(ENTRYPOINT\|CMD\)/,/[^\\]$/p' "$DOCKERFILE" | grep -o -- '"--[a-z_]*' | tr -d '"' | sort -u); do
  grep -q -- "^ *$flag " <<<"$helpfull" || err "the Dockerfile passes $flag, which deltaserve does not know"
done

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  (cd "$SRC" && docker build --check -f deploy/Dockerfile .) || err "docker build --check failed"
else
  echo "dockerfile_test: no Docker daemon here: docker build --check skipped (static checks only)"
fi

[ $fail = 0 ] && echo "dockerfile_test: OK"
exit $fail
