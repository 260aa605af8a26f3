#!/usr/bin/env bash
# Runs every test Capstan has: formatting and lints, unit tests, then the end-to-end
# suite against a real Kubernetes control plane (the cluster KUBECONFIG names if one
# answers, else a local one this script starts from hack/cluster.sh and stops again).
#
#   CAPSTAN_KEEP_CLUSTER=1 hack/test.sh   leave the local test cluster running afterwards
#   hack/test.sh -- <filter>              pass a name filter to the end-to-end tests
#   CAPSTAN_TEST_CLUSTER=name hack/test.sh  use another local cluster name (parallel work)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
started=$SECONDS

filter=()
if [ "${1:-}" = "--" ]; then shift; filter=("$@"); fi

# Dependencies first (deny.toml: licenses, duplicate versions, sources, advisories), with
# a pinned cargo-deny built once into the cache (a few minutes; later runs reuse it).
CARGO_DENY_VERSION=0.20.2
cargo_deny_root=$CACHE/cargo-deny-$CARGO_DENY_VERSION
if [ ! -x "$cargo_deny_root/bin/cargo-deny" ]; then
  say "building cargo-deny $CARGO_DENY_VERSION into ${cargo_deny_root#"$ROOT"/} (first run only)"
  rm -rf "$cargo_deny_root.partial"
  cargo install --locked --quiet cargo-deny --version "$CARGO_DENY_VERSION" --root "$cargo_deny_root.partial"
  mv "$cargo_deny_root.partial" "$cargo_deny_root"
fi
export PATH="$cargo_deny_root/bin:$PATH"
# Advisories need the RustSec database, which only GitHub serves: no package registry
# ships it. Fetch it where GitHub answers, else use a copy fetched before; with neither
# (CI's network reaches only the registries) the other three checks run and we say so.
advisory_dbs=${CARGO_HOME:-$HOME/.cargo}/advisory-dbs
if timeout 60 cargo deny --locked fetch db >/dev/null 2>&1 || compgen -G "$advisory_dbs/*/.git" >/dev/null; then
  say "cargo deny check (licenses, bans, sources, advisories)"
  cargo deny --locked check --disable-fetch --hide-inclusion-graph
else
  say "cargo deny check (licenses, bans, sources); advisories NOT checked: the RustSec database is out of reach and $advisory_dbs holds no copy"
  cargo deny --locked check --hide-inclusion-graph licenses bans sources
fi

say "building the control-plane binaries (cached after the first run)"
"$ROOT/hack/cluster.sh" build

# The mesh's data-path tests set up the transparent redirect with iptables inside their
# network namespaces, as the injected init container does in a pod.
debian_package iptables

# The database secrets engine's tests run a real PostgreSQL server on loopback.
debian_package postgresql

# V14's test steps the engine's wall clock with libfaketime.
debian_package faketime

# The secrets engine's end-to-end tests drive it with hvac, a real Vault client (PyPI),
# pinned with its dependencies in tests/python/requirements.txt.
if ! cmp -s "$ROOT/tests/python/requirements.txt" "$ROOT/.cache/venv/installed.txt"; then
  say "installing hvac into .cache/venv"
  python3 -m venv "$ROOT/.cache/venv"
  "$ROOT/.cache/venv/bin/pip" install -q -r "$ROOT/tests/python/requirements.txt"
  cp "$ROOT/tests/python/requirements.txt" "$ROOT/.cache/venv/installed.txt"
fi

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo build"
cargo build --workspace --locked
say "unit tests"
cargo test --workspace --exclude capstan-tests --locked
say "scenario list (docs/scenarios.md against the ids the code cites)"
cargo test -p capstan-tests --locked --test scenario_list

use_cluster "${CAPSTAN_TEST_CLUSTER:-capstan-test}"
if [ -n "$CAPSTAN_STARTED_CLUSTER" ]; then
  # The suite may restart this cluster's API server (failure scenario K2).
  export CAPSTAN_CLUSTER_CONTROL="$ROOT/hack/cluster.sh"
  export CAPSTAN_CLUSTER_NAME=$CAPSTAN_STARTED_CLUSTER
  if [ "${CAPSTAN_KEEP_CLUSTER:-}" != 1 ]; then
    # Stop the cluster whatever happened; a `down` that leaves a process behind fails the run.
    teardown() {
      local rc=$?
      "$ROOT/hack/cluster.sh" down || rc=1
      exit $rc
    }
    trap teardown EXIT
  fi
fi

say "end-to-end tests against $(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
# One at a time: they share the cluster-wide controller Lease and chart release.
cargo test -p capstan-tests --locked -- --test-threads=1 "${filter[@]}"
say "all tests passed in $((SECONDS - started))s"
