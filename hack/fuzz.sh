#!/usr/bin/env bash
# Fuzzes the untrusted-input parsers with cargo-fuzz (libFuzzer): capstan-mesh's HTTP
# path normalizer, intention matcher and X509-SVID validator (mesh/fuzz), and
# capstan-engine's policy parser and matcher, barrier envelope and Shamir combine
# (engine/fuzz), capstan-sidecar's mux frame reader (sidecar/fuzz) and capstan-jobspec's
# Nomad jobspec converter (jobspec/fuzz). Not part of hack/test.sh; the seed corpora are
# replayed there by `cargo test -p capstan-mesh --test fuzz_seeds`, `-p capstan-engine
# --test fuzz_seeds`, `-p capstan-sidecar --test fuzz_seeds` and `-p capstan-jobspec
# --test fuzz_seeds`.
#
#   hack/fuzz.sh                       every target for 120 s
#   hack/fuzz.sh 600 svid              one target for 10 minutes (a bare name is mesh's)
#   hack/fuzz.sh 300 engine/policy     one of the engine's targets
#
# Runs on a stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags, and
# `-s none` skips the sanitizers, whose runtimes only nightly ships (Rust's safe code
# needs no AddressSanitizer to find panics, overflows and runaway allocations).
# New interesting inputs go to a scratch corpus under <crate>/fuzz/target/, never into the
# committed seeds; a crash is saved in <crate>/fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CARGO_FUZZ_VERSION=0.13.1
seconds=${1:-120}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(mesh/path mesh/policy mesh/svid engine/barrier engine/policy engine/shamir sidecar/mux jobspec/convert)

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

export RUSTC_BOOTSTRAP=1
status=0
for spec in "${targets[@]}"; do
  case $spec in
    */*) crate=${spec%%/*} target=${spec#*/} ;;
    *) crate=mesh target=$spec ;;
  esac
  cd "$ROOT/$crate"
  scratch="fuzz/target/corpus/$target"
  mkdir -p "$scratch"
  say "fuzzing $crate/$target for ${seconds}s"
  # -rss_limit_mb: a regex or certificate that makes the process balloon is a finding.
  if ! cargo fuzz run --sanitizer none "$target" "$scratch" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1; then
    say "$crate/$target FAILED: see $crate/fuzz/artifacts/$target/"
    status=1
  fi
done
exit $status
