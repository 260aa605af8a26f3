#!/usr/bin/env bash
# The secrets engine's benchmark: KV v2 reads and writes, PostgreSQL credentials and PKI
# certificates per second through the HTTPS API (release builds, a real cluster, a real
# PostgreSQL), the time from a secret's change to the new value in a synced Secret and in an
# agent's file, and the barrier against raw AES-256-GCM. Prints figures and ratios; raw
# numbers land in target/bench-secrets.json. CAPSTAN_BENCH_ONLY: see below.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

"$ROOT/hack/cluster.sh" build
debian_package postgresql
# CAPSTAN_BENCH_ONLY=kv_read,... runs only those API operations (and skips the barrier
# and delivery benchmarks unless it names `barrier` or `delivery`): for profiling one.
if [ -z "${CAPSTAN_BENCH_ONLY:-}" ] || [[ ",$CAPSTAN_BENCH_ONLY," == *,barrier,* ]]; then
  say "the barrier against raw AES-256-GCM"
  cargo bench --locked -p capstan-engine --bench barrier
fi
say "release builds"
cargo build --release --locked -p capstan-engine -p capstan-tests --bins

use_cluster "${CAPSTAN_BENCH_CLUSTER:-capstan-bench}"
if [ -n "$CAPSTAN_STARTED_CLUSTER" ] && [ "${CAPSTAN_KEEP_CLUSTER:-}" != 1 ]; then
  export CAPSTAN_CLUSTER_NAME=$CAPSTAN_STARTED_CLUSTER
  trap '"$ROOT/hack/cluster.sh" down' EXIT
fi
export CAPSTAN_BIN_PROFILE=release
cargo bench --locked -p capstan-tests --bench secrets_engine
if [ -z "${CAPSTAN_BENCH_ONLY:-}" ] || [[ ",$CAPSTAN_BENCH_ONLY," == *,delivery,* ]]; then
  say "a secret's change to the new value in a SecretSync's Secret and an agent's file"
  cargo build --release --locked -p capstan-controllers -p capstan-sidecar --bins
  cargo bench --locked -p capstan-tests --bench secret_delivery
fi
