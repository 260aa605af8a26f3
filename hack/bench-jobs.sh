#!/usr/bin/env bash
# The jobs benchmark (issue 17, point 6): N Jobs of 10 groups against the same pods as
# plain Deployments in the same run, on a few hundred kwok nodes, with a release build of
# capstan-controller: time until every pod is Running (ratio to the native path),
# reconciles per second, the controller's CPU and RSS (peak, and while it watches all the
# pods), how each grows with N, and a canary promote across 100 Jobs. Prints figures and
# ratios; raw numbers land in target/bench-jobs.json. Never part of the test suite.
#
#   CAPSTAN_BENCH_JOBS=100,1000,5000   the sizes, run in order (default 100,1000)
#   CAPSTAN_BENCH_NODES=300            kwok nodes added for the run (removed after)
#   CAPSTAN_BENCH_CANARY_JOBS=100      Jobs in the canary promote (0 skips it)
#
# Both paths' pods are created by kube-controller-manager's ReplicaSet controller, which
# the local cluster runs with its default client rate limit (20 requests/s, bursts of 30):
# that bounds both at the same rate, so the ratio compares what Capstan adds on top, and
# 10 pods per Job take about half a second per Job on either path.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

"$ROOT/hack/cluster.sh" build
say "release builds"
cargo build --release --locked -p capstan-controllers --bins

use_cluster "${CAPSTAN_BENCH_CLUSTER:-capstan-bench}"
if [ -n "$CAPSTAN_STARTED_CLUSTER" ] && [ "${CAPSTAN_KEEP_CLUSTER:-}" != 1 ]; then
  export CAPSTAN_CLUSTER_NAME=$CAPSTAN_STARTED_CLUSTER
  trap '"$ROOT/hack/cluster.sh" down' EXIT
fi
export CAPSTAN_BIN_PROFILE=release
say "Jobs against Deployments (sizes ${CAPSTAN_BENCH_JOBS:-100,1000}, ${CAPSTAN_BENCH_NODES:-300} nodes)"
cargo bench --locked -p capstan-tests --bench jobs
