# tokenvault container image: a locked release build, run from a minimal, shell-less,
# non-root runtime image. The Helm chart's defaults match it: image `tokenvault`
# (tag = the chart's appVersion), command `tokenvault`, UID/GID 10001, read-only root
# filesystem (the vault writes only to its data directory, a mounted volume).
#
#   docker build -t tokenvault:0.1.0 .
#
# The mock PSP (`tokenvault mock-psp`) is a test tool: never point production at it.

# ---- build ----------------------------------------------------------------------
FROM rust:1.88-slim-bookworm AS build
WORKDIR /src
# The manifest names the test and bench targets, so they must be present to build.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY benches ./benches
# sled, vendored with one patch (vendor/README.md).
COPY vendor ./vendor
RUN cargo build --release --locked --bin tokenvault \
    && strip target/release/tokenvault

# ---- runtime --------------------------------------------------------------------
# distroless "cc": glibc and libgcc only; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tokenvault /usr/local/bin/tokenvault
# Numeric, matching the chart's securityContext (runAsUser/runAsGroup 10001).
USER 10001:10001
WORKDIR /var/lib/tokenvault
EXPOSE 8443
ENTRYPOINT ["/usr/local/bin/tokenvault"]
CMD ["serve", "--config", "/etc/tokenvault/tokenvault.toml"]
