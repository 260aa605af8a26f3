#!/usr/bin/env bash
# The jobs benchmark (issue 17, point 6): N Jobs of 10 groups against the same pods as
# plain Deployments in the same run, on a few hundred kwok nodes in two datacenters, with
# a release build of capstan-controller running as a process: time until every pod is
# Running (ratio to the native path), reconciles per second, the controller's CPU and RSS
# (peak, and while it watches all the pods), how each grows with N, and a canary promote
# across 100 Jobs. Prints figures and ratios; raw numbers land in target/bench-jobs.json
# (the controller's log in target/bench-jobs-controller.log). Never part of the test
# suite; docs/bench-jobs.md has the last run's figures.
#
#   CAPSTAN_BENCH_JOBS=100,1000,5000   the sizes, run in order (5,000 Jobs are 50,000 pods:
#                                      give a 2-core machine 100,1000)
#   CAPSTAN_BENCH_NODES=300            kwok nodes added for the run (removed after)
#   CAPSTAN_BENCH_CANARY_JOBS=100      Jobs in the canary promote (0 skips it)
#   CAPSTAN_BENCH_CLUSTER=bench-jobs   the local cluster started when KUBECONFIG names none
#   CAPSTAN_BENCH_OUT=bench-jobs       names target/<out>.json and target/<out>-controller.log
#   (CAPSTAN_BENCH_JOBS= with nothing runs the canary promote alone)
#
# Both paths' pods are created by kube-controller-manager's ReplicaSet controller. At its
# default client rate limit (20 requests/s per controller) that alone would take minutes
# per thousand pods on either path and hide what Capstan adds, so a cluster started here
# runs its components without client rate limits (CAPSTAN_CLUSTER_UNTHROTTLED); on an
# existing cluster both paths share whatever limits it has.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

"$ROOT/hack/cluster.sh" build
say "release builds"
cargo build --release --locked -p capstan-controllers --bins

export CAPSTAN_CLUSTER_UNTHROTTLED=1
use_cluster "${CAPSTAN_BENCH_CLUSTER:-bench-jobs}"
if [ -n "$CAPSTAN_STARTED_CLUSTER" ] && [ "${CAPSTAN_KEEP_CLUSTER:-}" != 1 ]; then
  export CAPSTAN_CLUSTER_NAME=$CAPSTAN_STARTED_CLUSTER
  trap '"$ROOT/hack/cluster.sh" down' EXIT
fi
export CAPSTAN_BIN_PROFILE=release
say "Jobs against Deployments (sizes ${CAPSTAN_BENCH_JOBS:-100,1000,5000}, ${CAPSTAN_BENCH_NODES:-300} nodes)"
cargo bench --locked -p capstan-tests --bench jobs
