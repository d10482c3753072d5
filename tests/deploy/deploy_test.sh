#!/usr/bin/env bash
# The deploy tests (ctest label `deploy`, tests/deploy/CMakeLists.txt):
#   deploy_test.sh render   REPO   kubectl kustomize renders deploy/k8s/{base,overlays/*,monitoring}
#   deploy_test.sh validate REPO [DELTASERVE_BINARY]   schemas + semantics of every rendered object (node)
#   deploy_test.sh copies   REPO   deploy/k8s/monitoring's copies equal their sources (sync.sh)
#   deploy_test.sh prom-config REPO | prom-rules REPO | prom-test REPO   promtool check config / check rules / test rules
#   deploy_test.sh runbooks REPO   every alert's runbook anchor is a heading of docs/OPERATIONS.md
# Exit 77 (ctest SKIP_RETURN_CODE) when the tool a test needs is missing.
set -uo pipefail
what=${1:?usage: deploy_test.sh WHAT REPO [...]}
repo=$(cd "${2:?repository root}" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
k8s=$repo/deploy/k8s
prom=$repo/deploy/prometheus
SKIP=77

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "SKIP: $1 not found${2:+ ($2)}"; exit $SKIP; }
}

case "$what" in
  render)
    need kubectl "kubectl 1.27+ with kustomize v5"
    fail=0
    for d in base overlays/single overlays/replicated monitoring; do
      if out=$(kubectl kustomize "$k8s/$d" 2>&1); then
        echo "ok: kubectl kustomize deploy/k8s/$d ($(grep -c '^kind:' <<<"$out") objects)"
      else
        echo "FAIL: kubectl kustomize deploy/k8s/$d:"; echo "$out"; fail=1
      fi
    done
    exit $fail
    ;;
  validate)
    need kubectl "kubectl 1.27+ with kustomize v5"
    need node "apt-get install nodejs"
    if [ ! -d "$here/node_modules/kubernetes-models" ]; then
      echo "SKIP: tests/deploy/node_modules missing: run bash tests/deploy/install_node_deps.sh"
      exit $SKIP
    fi
    exec node "$here/validate_k8s.js" "$repo" "${3:-}"
    ;;
  copies)
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    bash "$k8s/monitoring/sync.sh" "$tmp" >/dev/null || { echo "FAIL: sync.sh"; exit 1; }
    fail=0
    if cmp -s "$repo/deploy/grafana/deltaserve-dashboard.json" "$k8s/monitoring/deltaserve-dashboard.json"; then
      echo "ok: monitoring/deltaserve-dashboard.json == deploy/grafana/deltaserve-dashboard.json (byte for byte)"
    else
      echo "FAIL: deploy/k8s/monitoring/deltaserve-dashboard.json differs from deploy/grafana: run deploy/k8s/monitoring/sync.sh"
      fail=1
    fi
    if cmp -s "$tmp/prometheusrule.yaml" "$k8s/monitoring/prometheusrule.yaml"; then
      echo "ok: monitoring/prometheusrule.yaml is sync.sh's rendering of deploy/prometheus/alerts.yml"
    else
      echo "FAIL: deploy/k8s/monitoring/prometheusrule.yaml is stale: run deploy/k8s/monitoring/sync.sh"
      diff "$tmp/prometheusrule.yaml" "$k8s/monitoring/prometheusrule.yaml" | head -20
      fail=1
    fi
    exit $fail
    ;;
  prom-config)
    need promtool "apt-get install prometheus"
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    if out=$(promtool check config "$prom/prometheus.yml" 2>&1); then
      echo "$out"; exit 0
    fi
    if grep -q "field kubernetes_sd_configs not found" <<<"$out"; then
      # Debian's Prometheus is built without Kubernetes discovery: check everything else, with the pod discovery
      # replaced by a file discovery (the relabelling is still checked).
      echo "note: this promtool has no kubernetes_sd_configs (Debian build): checking the rest"
      cp "$prom/alerts.yml" "$tmp/"
      sed -e 's/^    kubernetes_sd_configs:$/    file_sd_configs:/' -e 's/^      - role: pod$/      - files: [targets.json]/' \
        "$prom/prometheus.yml" > "$tmp/prometheus.yml"
      grep -q '^    file_sd_configs:$' "$tmp/prometheus.yml" || { echo "FAIL: could not rewrite kubernetes_sd_configs"; exit 1; }
      echo '[]' > "$tmp/targets.json"
      promtool check config "$tmp/prometheus.yml"; exit $?
    fi
    echo "$out"; exit 1
    ;;
  prom-rules)
    need promtool "apt-get install prometheus"
    promtool check rules "$prom/alerts.yml" || exit 1
    # The Operator's copy holds the same rules: check its spec too.
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    sed -n '/^spec:$/,$p' "$k8s/monitoring/prometheusrule.yaml" | tail -n +2 | sed 's/^  //' > "$tmp/rules.yml"
    promtool check rules "$tmp/rules.yml"
    ;;
  prom-test)
    need promtool "apt-get install prometheus"
    cd "$prom" && promtool test rules alerts_test.yml || exit 1
    # Every alert has a firing and a non-firing case in alerts_test.yml.
    fail=0
    for a in $(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' alerts.yml); do
      fires=$(awk -v a="$a" '/alertname:/ {cur=$2} /exp_alerts: *\[\]/ {next} /exp_alerts:$/ && cur==a {n++} END {print n+0}' alerts_test.yml)
      quiet=$(awk -v a="$a" '/alertname:/ {cur=$2} /exp_alerts: *\[\]/ && cur==a {n++} END {print n+0}' alerts_test.yml)
      if [ "$fires" -lt 1 ] || [ "$quiet" -lt 1 ]; then
        echo "FAIL: $a has $fires firing and $quiet non-firing cases in alerts_test.yml (want >= 1 each)"; fail=1
      else
        echo "ok: $a: $fires firing, $quiet non-firing case(s)"
      fi
    done
    exit $fail
    ;;
  runbooks)
    ops=$repo/docs/OPERATIONS.md
    # GitHub's anchors: the heading's text, lower case, punctuation but - and _ dropped, spaces as -.
    anchors=$(sed -n 's/^#\{1,6\} \+//p' "$ops" | tr 'A-Z' 'a-z' | sed -e 's/[^a-z0-9 _-]//g' -e 's/ /-/g')
    fail=0
    while read -r alert anchor; do
      if grep -qxF "$anchor" <<<"$anchors"; then echo "ok: $alert -> docs/OPERATIONS.md#$anchor"
      else echo "FAIL: $alert: runbook docs/OPERATIONS.md#$anchor is no heading of docs/OPERATIONS.md"; fail=1; fi
    done < <(awk '/- alert:/ {a=$3} /runbook: docs\/OPERATIONS.md#/ {split($2, p, "#"); print a, p[2]}' "$prom/alerts.yml")
    exit $fail
    ;;
  *) echo "deploy_test.sh: unknown test $what" >&2; exit 2 ;;
esac
