# syntax=docker/dockerfile:1
# One image for every worldline role: `docker run worldline <subcommand>`.
# It has no curl: container healthchecks run `worldline probe <url>`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Every query is built at run time (no sqlx `query!` macros, no .sqlx data), so
# the build needs no database. SQLX_OFFLINE keeps it so: a checked macro added
# later fails this build until its `cargo sqlx prepare` data is committed.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin worldline \
    && install -m 0755 target/release/worldline /usr/local/bin/worldline

FROM debian:bookworm-slim AS runtime
# libssl3: librdkafka's TLS; ca-certificates: TLS to managed Kafka and PostgreSQL.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 worldline \
    && useradd --system --uid 10001 --gid worldline --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin worldline
COPY --from=build /usr/local/bin/worldline /usr/local/bin/worldline
USER worldline:worldline
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/worldline"]
CMD ["--help"]
