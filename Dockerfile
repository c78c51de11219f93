# Multi-stage build: compile paysync (librdkafka is built from source by rdkafka-sys),
# then copy the single binary into a small runtime image that runs as a non-root user.
# The build image is the `rust-version` of Cargo.toml (the highest minimum among the
# locked dependencies); CI fails when the two disagree (tests/container/check_stack.py).
FROM rust:1.89.0-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY schemas ./schemas
COPY benches ./benches
RUN cargo build --release --locked --bin paysync \
 && strip target/release/paysync

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin paysync
COPY --from=build /src/target/release/paysync /usr/local/bin/paysync
USER 10001:10001
EXPOSE 9464 9465
# Health, not a port: GET /healthz on the configured http.listen (exit 0 on 200).
# The image has no shell tools for this; paysync asks itself.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/paysync", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/paysync"]
CMD ["run"]
