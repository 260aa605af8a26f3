#!/usr/bin/env bash
# Fuzzes capstan-mesh's untrusted-input parsers with cargo-fuzz (libFuzzer): the HTTP
# path normalizer, the intention matcher and the X509-SVID validator (mesh/fuzz).
# Not part of hack/test.sh; the seed corpora are replayed there by
# `cargo test -p capstan-mesh --test fuzz_seeds`.
#
#   hack/fuzz.sh                 every target for 120 s
#   hack/fuzz.sh 600 svid        one target for 10 minutes
#
# Runs on a stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags, and
# `-s none` skips the sanitizers, whose runtimes only nightly ships (Rust's safe code
# needs no AddressSanitizer to find panics, overflows and runaway allocations).
# New interesting inputs go to a scratch corpus under mesh/fuzz/target/, never into the
# committed seeds; a crash is saved in mesh/fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CARGO_FUZZ_VERSION=0.13.1
seconds=${1:-120}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(path policy svid)

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

cd "$ROOT/mesh"
export RUSTC_BOOTSTRAP=1
status=0
for target in "${targets[@]}"; do
  scratch="fuzz/target/corpus/$target"
  mkdir -p "$scratch"
  say "fuzzing $target for ${seconds}s"
  # -rss_limit_mb: a regex or certificate that makes the process balloon is a finding.
  if ! cargo fuzz run --sanitizer none "$target" "$scratch" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1; then
    say "$target FAILED: see mesh/fuzz/artifacts/$target/"
    status=1
  fi
done
exit $status
