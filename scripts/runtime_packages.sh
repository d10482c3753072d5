#!/usr/bin/env bash
# Prints the Debian packages a slim runtime image needs to run the given binaries: the packages that ship the
# shared libraries each binary names directly (its ELF NEEDED entries; apt brings their own dependencies), plus
# what the server loads or uses at run time without naming it: the fast BLAS libraries --blas re-executes onto
# and the CA certificates of TLS clients. One package per line, sorted. deploy/Dockerfile's runtime stage
# installs exactly this list; tests/deploy checks it.
#
#   bash scripts/runtime_packages.sh build/server/deltaserve build/client/deltactl ...
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: bash scripts/runtime_packages.sh BINARY..." >&2
  exit 2
fi

# The package that owns a file, trying the path as given and as resolved (Debian 12's dpkg database may name
# /lib/... or /usr/lib/... for the same file).
owner() {
  local f=$1 real
  real=$(readlink -f "$f")
  for p in "$f" "$real" "${f#/usr}" "/usr$f" "${real#/usr}" "/usr$real"; do
    if out=$(dpkg -S "$p" 2>/dev/null); then
      echo "${out%%:*}"
      return 0
    fi
  done
  echo "runtime_packages: no Debian package owns $f" >&2
  return 1
}

{
  for bin in "$@"; do
    [ -x "$bin" ] || { echo "runtime_packages: $bin is not an executable" >&2; exit 1; }
    # soname -> path as the dynamic loader resolves it for this binary.
    declare -A path_of=()
    while read -r soname arrow path _; do
      [ "$arrow" = "=>" ] && [ -n "$path" ] && [ "$path" != "not" ] && path_of[$soname]=$path
    done < <(ldd "$bin")
    while read -r soname; do
      path=${path_of[$soname]:-}
      [ -n "$path" ] || { echo "runtime_packages: $bin needs $soname, which the loader cannot find" >&2; exit 1; }
      owner "$path"
    done < <(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    unset path_of
  done
  # Loaded by --blas (server/service/platform.cc) through LD_LIBRARY_PATH, and the CA bundle for TLS clients.
  echo libopenblas0-openmp
  echo libblis4-openmp
  echo ca-certificates
} | sort -u
