#!/usr/bin/env bash
# The mesh data-path benchmark (direct vs a Capstan sidecar pair vs an HAProxy mTLS pair,
# and a plain-TCP HAProxy pair as the floor of any proxy pair),
# on release builds, against the cluster KUBECONFIG names or a local one started here.
# Prints figures and ratios; raw numbers land in target/bench-mesh.json.
#
#   hack/bench-mesh.sh --profile callgrind   instructions per request of each sidecar
#                                            (they run under valgrind; slow but exact)
#   hack/bench-mesh.sh --profile strace      system calls of each sidecar at 1,000 rps
#   hack/bench-mesh.sh --profile perf        the pair alone: CPU per request and RSS at
#                                            1,000 rps, then a perf profile (kernel too)
#   hack/bench-mesh.sh --profile segments    TCP segments per request in each pod
#                                            (pure ACKs beyond the messages themselves)
#   hack/bench-mesh.sh --profile bulk        bulk transfers through the pair, CPU per GB
#                                            of each sidecar, then a perf profile of one
# CAPSTAN_BENCH_PROFILE_RATE=0 profiles the open loop instead of 1,000 rps.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

"$ROOT/hack/cluster.sh" build
debian_package haproxy
debian_package iptables
say "release builds"
cargo build --release --locked -p capstan-engine -p capstan-tests --bins
# The sidecar as it ships: its own profile (Cargo.toml, [profile.sidecar]).
cargo build --profile sidecar --locked -p capstan-sidecar
export CAPSTAN_SIDECAR_BIN=${CAPSTAN_SIDECAR_BIN:-$ROOT/target/sidecar/capstan-sidecar}

use_cluster "${CAPSTAN_BENCH_CLUSTER:-capstan-bench}"
if [ -n "$CAPSTAN_STARTED_CLUSTER" ] && [ "${CAPSTAN_KEEP_CLUSTER:-}" != 1 ]; then
  export CAPSTAN_CLUSTER_NAME=$CAPSTAN_STARTED_CLUSTER
  trap '"$ROOT/hack/cluster.sh" down' EXIT
fi
export CAPSTAN_BIN_PROFILE=release
if [ "${1:-}" = "--profile" ]; then
  export CAPSTAN_BENCH_PROFILE=${2:?callgrind, strace, perf, segments or bulk}
  if [ "$CAPSTAN_BENCH_PROFILE" = callgrind ]; then
    # The harness runs target/$CAPSTAN_BIN_PROFILE/<bin>: the same binaries, the sidecar
    # wrapped in valgrind (its output folder writable by the proxy's UID). Counters are
    # dumped at each /metrics scrape (vgdb cannot reach a process idle in epoll here).
    export CAPSTAN_CALLGRIND_DIR=$ROOT/target/callgrind-out
    mkdir -p "$ROOT/target/callgrind" && rm -rf "$CAPSTAN_CALLGRIND_DIR"
    mkdir -m 1777 "$CAPSTAN_CALLGRIND_DIR"
    for bin in "$ROOT"/target/release/capstan-*; do
      [ -f "$bin" ] && [ -x "$bin" ] && ln -sf "$bin" "$ROOT/target/callgrind/"
    done
    rm -f "$ROOT/target/callgrind/capstan-sidecar"
    cat >"$ROOT/target/callgrind/capstan-sidecar" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --vgdb=no --dump-before='*MetricEncoder::encode_histogram' --callgrind-out-file=$CAPSTAN_CALLGRIND_DIR/callgrind.out.%p $CAPSTAN_SIDECAR_BIN "\$@"
WRAP
    chmod 755 "$ROOT/target/callgrind/capstan-sidecar"
    export CAPSTAN_SIDECAR_BIN=$ROOT/target/callgrind/capstan-sidecar
    export CAPSTAN_BIN_PROFILE=callgrind
  else
    export CAPSTAN_BENCH_PROFILE_RATE=${CAPSTAN_BENCH_PROFILE_RATE:-1000}
  fi
fi
cargo bench --locked -p capstan-tests --bench mesh_dataplane
