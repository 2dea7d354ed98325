# syntax=docker/dockerfile:1
#
# subgate: the gateway (`subgate`) and the load generator (`subgate-loadgen`)
# in one small image.
#
#   docker build -t subgate .
#   docker run --rm -p 8080:8080 subgate              # one in-memory node
#   docker run --rm subgate schema                    # any subcommand
#   docker run --rm --entrypoint subgate-loadgen subgate --help
#
# The image listens on 0.0.0.0:8080 (SUBGATE__SERVER__HOST below) and runs
# as the unprivileged user 65532. Without SUBGATE_ENV it starts the
# development configuration; a fleet sets SUBGATE_ENV=production,
# SUBGATE__AUTH__JWT_SECRET and SUBGATE__REDIS__URL (see docker-compose.yml).

# ---------------------------------------------------------------- build ----
# The toolchain the project builds with, on the same Debian release as the
# runtime stage, so the binary needs no newer glibc than the runtime has.
FROM rust:1.95.0-slim-bookworm AS build

WORKDIR /src

# make: the jemalloc allocator (tikv-jemalloc-sys) builds its C sources with
# it; pinned to bookworm's version, like the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*

# The image's binaries are built once per release and shipped many times, so
# they get the slow, thorough build: symbols stripped (a third of the file),
# whole-program LTO in one codegen unit (smaller, usually a little faster;
# the link takes minutes longer). Set here rather than in Cargo.toml so that
# local release builds stay quick to link and keep symbols for profiling.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_RELEASE_LTO=fat \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
    CARGO_TERM_COLOR=never

# Dependencies in their own layer, rebuilt only when Cargo.toml or Cargo.lock
# change. A stub of each of the package's three targets (the library, the
# server and the load generator) is enough for cargo to compile every
# dependency. This rather than cargo-chef: chef would first have to be
# compiled itself (one more pinned tool and a minute per cold build) to do
# what three stub files do for a single-package crate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/subgate-loadgen \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/subgate-loadgen/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src \
        target/release/subgate target/release/subgate-loadgen \
        target/release/deps/subgate-* target/release/deps/subgate_loadgen-* \
        target/release/deps/libsubgate-* \
        target/release/.fingerprint/subgate-*

# The real sources. The stubs' build records were removed above, so cargo
# rebuilds the crate itself whatever the copied files' timestamps are.
COPY src ./src
RUN cargo build --release --locked \
    && ./target/release/subgate --help >/dev/null

# -------------------------------------------------------------- runtime ----
# distroless/cc rather than debian-slim: the binaries need glibc and
# libgcc_s and nothing else (no OpenSSL: neither the Redis client nor the
# load generator's HTTP client is built with TLS), and distroless/cc is
# exactly that plus CA certificates, tzdata and a passwd with `nonroot`:
# about 24 MB against debian-slim's 75 MB, which is what can keep the image
# near the 40 MB target, and no shell or package manager for an intruder to
# use. The
# HEALTHCHECK is the binary itself, so nothing needs a shell. Distroless
# publishes no versioned tags: `cc-debian12` pins the Debian release (the
# one the build stage uses) and `nonroot` the variant; pin a digest on top
# (`FROM gcr.io/distroless/cc-debian12:nonroot@sha256:…`) where builds must
# be byte-for-byte reproducible.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="subgate" \
      org.opencontainers.image.description="A horizontally scalable GraphQL subscription gateway (and its load generator, subgate-loadgen)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

# The node reads config/default.toml and config/$SUBGATE_ENV.toml from its
# working directory. Owned by root and not writable by the node's user: the
# configuration is part of the image, overridden by environment variables or
# by a file mounted over config/production.toml (as the Kubernetes manifests
# do), never by the node.
WORKDIR /app
COPY config/default.toml config/production.toml /app/config/
COPY --from=build /src/target/release/subgate /src/target/release/subgate-loadgen /usr/local/bin/

# Loopback is the binary's safe default on a host; inside a container the
# node must be reachable from other containers, so the image listens on all
# interfaces. Documented in README ("Container image").
ENV SUBGATE__SERVER__HOST=0.0.0.0

# 65532 is distroless's `nonroot`; numeric so that Kubernetes' runAsNonRoot
# can verify it without reading /etc/passwd.
USER 65532:65532

EXPOSE 8080

# SIGTERM starts the drain (readyz 503, WebSockets closed 1001, exit within
# server.drain_timeout_seconds); it is Docker's default, stated so nobody
# changes it to SIGKILL-like behaviour by accident.
STOPSIGNAL SIGTERM

# No shell and no curl in the image: the binary probes its own /healthz on
# 127.0.0.1 and the configured port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/subgate", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/subgate"]
CMD ["serve"]
