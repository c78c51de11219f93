# Multi-stage build: compile paysync (librdkafka is built from source by rdkafka-sys),
# then copy the single binary into a small runtime image that runs as a non-root user.
FROM rust:1.85-bookworm AS build
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
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s CMD ["/bin/sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464"]
ENTRYPOINT ["/usr/local/bin/paysync"]
CMD ["run"]
