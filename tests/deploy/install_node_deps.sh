#!/usr/bin/env bash
# Installs the node packages of the deploy tests (tests/deploy/package-lock.json: kubernetes-models,
# @kubernetes-models/prometheus-operator, js-yaml) into tests/deploy/node_modules with `npm ci`, only when they are
# missing or older than the lock file. Source it for the function, or run it:
#   bash tests/deploy/install_node_deps.sh
# Without npm it says so and returns 0: the tests that need the packages then skip.
deploy_install_node_deps() {
  local dir
  dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [ -f "$dir/node_modules/.package-lock.json" ] && [ -d "$dir/node_modules/kubernetes-models" ] &&
     [ ! "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "install_node_deps: npm not found; the node-based deploy tests will skip (apt-get install npm)" >&2
    return 0
  fi
  echo "install_node_deps: npm ci in $dir"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  deploy_install_node_deps
fi
