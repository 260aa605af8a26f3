# One image with every Capstan binary: capstan-controller, capstan-webhook, capstan-engine,
# and capstan-sidecar built with the sidecar profile (fat LTO, panic=abort: see Cargo.toml).
#   docker build -t capstan:0.1.0 .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && cargo build --profile sidecar --locked -p capstan-sidecar \
 && mkdir -p /out \
 && cp target/release/capstan-controller target/release/capstan-webhook target/release/capstan-engine /out/ \
 && cp target/sidecar/capstan-sidecar /out/

# Debian 12 slim, the distribution the build stage's glibc comes from, with the programs
# the binaries run: `capstan-sidecar init` (the injected capstan-init container) runs
# iptables and ip6tables, which Debian's iptables package provides (nft backend by
# default, legacy beside it) with the libraries and extensions they load. distroless has
# no package manager to add them with, and copying them in by hand would miss those.
# e2e_binaries' the_image_has_every_program_the_code_runs checks this list against every
# program the code starts.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/capstan-controller"]
