# syntax=docker/dockerfile:1
#
# fhirwall image: built with the Rust toolchain, run on distroless
# (glibc, libgcc, CA certificates; no shell, no package manager, no curl).
#
#   docker build -t fhirwall .
#
# At run time it expects (see docs/deploy.md):
#   /etc/fhirwall/config.yaml   the configuration (mounted read-only)
#   /etc/fhirwall/policies/     policy files, with `policies: {dir: policies}`
#   /var/log/fhirwall/          writable by uid 10001, for `audit: {sink: file,
#                               path: /var/log/fhirwall/audit.jsonl}`; mount a
#                               durable or shipped volume here
# Ports: 8080 FHIR proxy (`listen`), 9901 admin (`admin.listen`: /metrics,
# /healthz, /readyz). Both must listen on 0.0.0.0 inside a container.
#
# No HEALTHCHECK: the image has no HTTP client to run one. Probe the admin
# port from outside instead (Kubernetes: liveness GET /healthz, readiness
# GET /readyz; see deploy/kubernetes/deployment.yaml).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# flate2 with the pure-Rust zlib backend, patched in by Cargo.toml.
COPY vendor ./vendor
# Cargo.toml declares [[bench]] targets: cargo refuses a manifest whose
# targets are missing, so the benches come along (they are not built).
COPY benches ./benches
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin fhirwall \
 && install -D -m 0755 target/release/fhirwall /out/bin/fhirwall
# Directories of the runtime image (it has no shell to make them):
# /etc/fhirwall/policies owned by root, /var/log/fhirwall by the runtime user.
RUN install -d -m 0755 /out/etc/fhirwall/policies \
 && install -d -m 0750 -o 10001 -g 10001 /out/varlog/fhirwall

# The `nonroot` variant; USER below sets fhirwall's own uid. Pin by digest
# in production (gcr.io/distroless/cc-debian12:nonroot@sha256:...).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/fhirwall /usr/local/bin/fhirwall
COPY --from=build /out/etc/ /etc/
COPY --from=build --chown=10001:10001 /out/varlog/ /var/log/
USER 10001:10001
EXPOSE 8080 9901
# Audit records must outlive the container: mount a named volume or a
# host directory owned by uid 10001 here.
VOLUME ["/var/log/fhirwall"]
ENTRYPOINT ["/usr/local/bin/fhirwall"]
CMD ["--log-json", "run", "--config", "/etc/fhirwall/config.yaml"]
