#!/usr/bin/env bash
# docs/OPERATIONS.md documents every flag of the server: each flag `deltaserve --helpfull` lists from
# server/main.cc appears there as `--name`.
#
#   bash tests/deploy/ops_flags_test.sh SOURCE_DIR DELTASERVE_BINARY
set -uo pipefail
SRC=${1:?source dir}
BIN=${2:?deltaserve binary}
flags=$("$BIN" --helpfull 2>&1 | awk '/Flags from .*server\/main.cc/ {f=1; next} /Flags from/ {f=0} f' |
        sed -n 's/^ *--\([a-z0-9_]*\) .*/\1/p')
[ -n "$flags" ] || { echo "ops_flags_test: no flags from server/main.cc in --helpfull"; exit 1; }
fail=0
for f in $flags; do
  grep -q -- "--$f\b" "$SRC/docs/OPERATIONS.md" || { echo "ops_flags_test: --$f is not in docs/OPERATIONS.md"; fail=1; }
done
[ $fail = 0 ] && echo "ops_flags_test: all $(wc -w <<<"$flags") flags documented"
exit $fail
