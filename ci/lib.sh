# Shared helpers for the ci/ scripts: sourced, not run.

SPILLWAY_CACHE="${SPILLWAY_CACHE:-$HOME/.cache/spillway}"
SPILLWAY_CI_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TANSU_VERSION=0.6.0
# The build of Tansu the tests use: 0.6.0 with ci/tansu/storage.patch (its cache directory).
TANSU_BUILD="$TANSU_VERSION-spillway1"

step() { printf '\n==> %s\n' "$*"; }

apt_install() {
  step "apt-get install $*"
  if [[ -z "${SPILLWAY_APT_UPDATED:-}" ]]; then
    apt-get update -qq
    SPILLWAY_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# C toolchain and headers the bundled librdkafka build needs.
ensure_build_tools() {
  local missing=()
  command -v cc >/dev/null || missing+=(gcc)
  command -v g++ >/dev/null || missing+=(g++)
  command -v make >/dev/null || missing+=(make)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  command -v curl >/dev/null || missing+=(curl ca-certificates)
  command -v git >/dev/null || missing+=(git)
  dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
  if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
  rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
}

pg_bindir() {
  if [[ -n "${SPILLWAY_PG_BIN:-}" ]]; then echo "$SPILLWAY_PG_BIN"; return; fi
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" ]] && { echo "$d"; return; }
  done
  return 1
}

# PostgreSQL server binaries (initdb, postgres); the tests start their own clusters.
ensure_postgres() {
  pg_bindir >/dev/null || apt_install postgresql
  pg_bindir >/dev/null || { echo "PostgreSQL server binaries still missing after install" >&2; exit 1; }
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
}

tansu_bin() {
  if [[ -n "${SPILLWAY_TANSU_BIN:-}" ]]; then echo "$SPILLWAY_TANSU_BIN"; return; fi
  echo "$SPILLWAY_CACHE/tansu-$TANSU_BUILD/bin/tansu"
}

# A crate's published source from crates.io, checked against its SHA-256 and unpacked into DIR:
# fetch_crate NAME VERSION SHA256 DIR.
fetch_crate() {
  local name="$1" version="$2" sha="$3" dir="$4"
  local file="$dir/$name-$version.crate"
  curl -sSfL --retry 3 -o "$file" "https://static.crates.io/crates/$name/$version/download"
  if ! echo "$sha  $file" | sha256sum --check --quiet -; then
    echo "$name $version from crates.io does not have the expected SHA-256 $sha; nothing built" >&2
    exit 1
  fi
  tar xzf "$file" -C "$dir"
}

# The Tansu broker: 0.6.0 from crates.io with ci/tansu/storage.patch, which turns two panics
# that stopped its storage for every client into errors for the one request (the patch says
# which). Built once with the crate's own Cargo.lock and cached (about 15 minutes on 2 cores).
TANSU_SHA256=4fdd85473ec265140488cf8d55e82b844f5c051c8916fabdd4a71156ac053f6d
TANSU_STORAGE_SHA256=720d2ed8e6010c70f7f06e5af5a7274ebbf6e42fdcd9e46de542b10dc4d2f35d
ensure_tansu() {
  build_patched_tansu tansu "$(tansu_bin)" libsql storage.patch
}

# Tansu 0.6.0 built from crates.io with patches from ci/tansu applied to tansu-storage, into
# BIN, unless BIN is there and was built from the same patches (their SHA-256 is kept beside
# it), in $SPILLWAY_CACHE/NAME-build (removed after): build_patched_tansu NAME BIN FEATURES
# PATCH...
build_patched_tansu() {
  local name="$1" bin="$2" features="$3" work patch patch_sha
  shift 3
  patch_sha="$(cd "$SPILLWAY_CI_DIR/tansu" && cat "$@" | sha256sum | cut -d' ' -f1)"
  if [[ -x "$bin" && "$(cat "$bin.patch-sha256" 2>/dev/null)" == "$patch_sha" ]]; then return; fi
  step "building tansu $TANSU_VERSION (features $features) with ci/tansu/{$*} (first run only, long: ~15 min)"
  work="$SPILLWAY_CACHE/$name-build"
  rm -rf "$work"
  mkdir -p "$work"
  fetch_crate tansu "$TANSU_VERSION" "$TANSU_SHA256" "$work"
  fetch_crate tansu-storage "$TANSU_VERSION" "$TANSU_STORAGE_SHA256" "$work"
  for patch in "$@"; do
    (cd "$work/tansu-storage-$TANSU_VERSION" && git apply "$SPILLWAY_CI_DIR/tansu/$patch")
  done
  # Its own workspace (whatever Cargo.toml is above the cache), with the patched storage.
  printf '\n[workspace]\n\n[patch.crates-io]\ntansu-storage = { path = "../tansu-storage-%s" }\n' \
    "$TANSU_VERSION" >>"$work/tansu-$TANSU_VERSION/Cargo.toml"
  (cd "$work/tansu-$TANSU_VERSION" && CARGO_TARGET_DIR="$work/target" \
    cargo build --release --no-default-features --features "$features" --bin tansu)
  install -D -m 755 "$work/target/release/tansu" "$bin.new"
  mv "$bin.new" "$bin"
  echo "$patch_sha" >"$bin.patch-sha256"
  rm -rf "$work"
}

# The fast broker for benchmarks only (issue 15): the same Tansu 0.6.0 with its in-memory
# storage engine (`memory://`, feature dynostore) and ci/tansu/dynostore.patch, which fixes the
# two bugs that made that engine unfit to measure with (a fetch from inside a stored batch
# skipped it; the latest offset fell short of the last batch): ci/fast-broker.sh checks both.
# It loses everything on restart, so no fault test uses it. Built once and cached like Tansu
# (about 15 minutes); the test command does not build it.
FAST_BROKER_BUILD="$TANSU_VERSION-fast1"
fast_broker_bin() {
  if [[ -n "${SPILLWAY_FAST_BROKER_BIN:-}" ]]; then echo "$SPILLWAY_FAST_BROKER_BIN"; return; fi
  echo "$SPILLWAY_CACHE/tansu-$FAST_BROKER_BUILD/bin/tansu"
}
ensure_fast_broker() {
  # A binary named by SPILLWAY_FAST_BROKER_BIN is used as it is, never rebuilt over.
  if [[ -n "${SPILLWAY_FAST_BROKER_BIN:-}" ]]; then return; fi
  build_patched_tansu fast-broker "$(fast_broker_bin)" libsql,dynostore storage.patch dynostore.patch
}

SPILLWAY_PG_IMAGE="${SPILLWAY_DOCKER_PG_IMAGE:-spillway-postgres:15}"

# A Docker engine: Debian's docker.io, its daemon started with no bridge and no iptables, so
# containers share the host's network (everything stays on 127.0.0.1).
ensure_docker() {
  command -v dockerd >/dev/null || apt_install docker.io
  if ! docker info >/dev/null 2>&1; then
    step "starting dockerd (--bridge=none --iptables=false --ip-masq=false)"
    nohup dockerd --bridge=none --iptables=false --ip-masq=false >"${TMPDIR:-/tmp}/spillway-dockerd.log" 2>&1 &
    local i
    for ((i = 0; i < 60; i++)); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see ${TMPDIR:-/tmp}/spillway-dockerd.log" >&2; exit 1; }
  fi
}

# The Postgres image the docker backend uses: pulled when SPILLWAY_DOCKER_PG_IMAGE names another
# image (postgres:15 with a registry), else built locally (no registry here): a minimal
# Debian with postgresql-15 from debootstrap, imported, plus an entrypoint that behaves like the
# official image's (ci/docker/). Skipped when the image exists. About a minute.
ensure_pg_image() {
  docker image inspect "$SPILLWAY_PG_IMAGE" >/dev/null 2>&1 && return
  if [[ "$SPILLWAY_PG_IMAGE" != spillway-postgres:* ]]; then
    step "docker pull $SPILLWAY_PG_IMAGE"
    docker pull -q "$SPILLWAY_PG_IMAGE"
    return
  fi
  command -v debootstrap >/dev/null || apt_install debootstrap
  step "building the $SPILLWAY_PG_IMAGE image (debootstrap, once)"
  local root mirror
  if ! docker image inspect "$SPILLWAY_PG_IMAGE-base" >/dev/null 2>&1; then
    root="$(mktemp -d)"
    mirror="${SPILLWAY_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)}"
    debootstrap --variant=minbase --include=postgresql-15 bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    tar -C "$root" -c . | docker import - "$SPILLWAY_PG_IMAGE-base" >/dev/null
    rm -rf "$root"
  fi
  docker build -q -t "$SPILLWAY_PG_IMAGE" --build-arg "BASE=$SPILLWAY_PG_IMAGE-base" \
    -f ci/docker/postgres.Dockerfile ci/docker >/dev/null
}

# Prometheus and promtool, Debian's package: the alert rules' unit tests (promtool test rules)
# and the live alert test (the chaos suite starts its own server; none runs as a service).
ensure_prometheus() {
  command -v promtool >/dev/null && command -v prometheus >/dev/null && return
  apt_install prometheus
}

# Installs Debian 13's package PKG (a static Go binary) on this Debian 12: `docker compose` v2
# and buildx are not packaged for Debian 12 (it has only the Python docker-compose 1.29).
# apt fetches the .deb with a private list of trixie's packages; the system's sources stay as
# they are.
install_trixie_deb() {
  local pkg="$1" d mirror
  step "$pkg from Debian 13 (not packaged for Debian 12)"
  d="$(mktemp -d)"
  mkdir -p "$d/lists/partial"
  mirror="${SPILLWAY_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)}"
  echo "deb ${mirror:-http://deb.debian.org/debian} trixie main" >"$d/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$d/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$d/lists" -o "Dir::Cache::pkgcache=$d/pkg.bin"
    -o "Dir::Cache::srcpkgcache=$d/src.bin" -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq
  (cd "$d" && apt-get "${opts[@]}" download -qq "$pkg")
  dpkg -i "$d/${pkg}"_*.deb >/dev/null
  rm -rf "$d"
}

# `docker compose` and `docker buildx` (BuildKit builds only the stages an image needs, so the
# local image build never reaches for the registry's rust image).
ensure_compose() {
  docker compose version >/dev/null 2>&1 || install_trixie_deb docker-compose
  docker buildx version >/dev/null 2>&1 || install_trixie_deb docker-buildx
}

SPILLWAY_DEBIAN_IMAGE="${SPILLWAY_DEBIAN_IMAGE:-spillway-debian:bookworm}"

# The local stand-in for the registry's debian:bookworm-slim: a minimal Debian 12 from
# debootstrap with the services' shared libraries (OpenSSL, zlib) and CA certificates, imported.
# The service images take their libraries from it (deploy/Dockerfile's RUNTIME_IMAGE), and the
# local Tansu and Prometheus images are built on it. About a minute, once.
ensure_debian_image() {
  docker image inspect "$SPILLWAY_DEBIAN_IMAGE" >/dev/null 2>&1 && return
  command -v debootstrap >/dev/null || apt_install debootstrap
  step "building the $SPILLWAY_DEBIAN_IMAGE image (debootstrap, once)"
  local root mirror
  root="$(mktemp -d)"
  mirror="${SPILLWAY_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)}"
  debootstrap --variant=minbase --include=ca-certificates,libssl3 bookworm "$root" \
    "${mirror:-http://deb.debian.org/debian}" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - "$SPILLWAY_DEBIAN_IMAGE" >/dev/null
  rm -rf "$root"
}
