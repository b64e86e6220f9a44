# Build: docker build -t fhirwall .
# Run:   docker run --rm -p 8080:8080 -p 9901:9901 \
#          -v "$PWD/config.yaml:/etc/fhirwall/config.yaml:ro" fhirwall
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin fhirwall

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home fhirwall
COPY --from=build /src/target/release/fhirwall /usr/local/bin/fhirwall
USER 10001
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/fhirwall"]
CMD ["run", "--config", "/etc/fhirwall/config.yaml"]
