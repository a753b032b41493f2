# The `weir` command in a small runtime image: build with `docker build -t weir .`, run with a
# pipeline mounted at /etc/weir/pipeline.yaml (see deploy/compose.yaml, docs/deployment.md).
# Checked in the tests: the binary copied is the one `cargo build --release -p weir-cli`
# makes, and the default command's arguments parse.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weir-cli

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/weir --create-home weir \
    && mkdir -p /etc/weir
COPY --from=build /src/target/release/weir /usr/local/bin/weir
USER 10001
WORKDIR /var/lib/weir
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD curl -fsS http://127.0.0.1:9464/healthz || exit 1
ENTRYPOINT ["weir"]
CMD ["run", "/etc/weir/pipeline.yaml", "--metrics-addr", "0.0.0.0:9464", "--no-progress"]
