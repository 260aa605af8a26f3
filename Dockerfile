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

# distroless/cc: glibc and libgcc for the Rust binaries, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/capstan-controller"]
