#!/usr/bin/env bash
# The mesh data-path benchmark (direct vs a Capstan sidecar pair vs an HAProxy mTLS pair),
# on release builds, against the cluster KUBECONFIG names or a local one started here.
# Prints figures and ratios; raw numbers land in target/bench-mesh.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

"$ROOT/hack/cluster.sh" build
for tool in haproxy iptables; do
  if ! command -v "$tool" >/dev/null && [ ! -x "/usr/sbin/$tool" ]; then
    say "installing $tool (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$tool" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$tool" >/dev/null; }
  fi
done
say "release builds"
cargo build --release --locked -p capstan-sidecar -p capstan-engine -p capstan-tests --bins

use_cluster "${CAPSTAN_BENCH_CLUSTER:-capstan-bench}"
if [ -n "$CAPSTAN_STARTED_CLUSTER" ] && [ "${CAPSTAN_KEEP_CLUSTER:-}" != 1 ]; then
  export CAPSTAN_CLUSTER_NAME=$CAPSTAN_STARTED_CLUSTER
  trap '"$ROOT/hack/cluster.sh" down' EXIT
fi
export CAPSTAN_BIN_PROFILE=release
cargo bench --locked -p capstan-tests --bench mesh_dataplane
