# shellcheck shell=bash
# What scripts/podman-smoke and scripts/podman-rig share: podman's flags on
# this kind of machine, the packages they need, the stand-in base image and
# the Dockerfile's runtime stage built on it. Sourced from the repository's
# root, after the caller has defined say() and fail().
#
#   PODMAN             podman with the flags every call here needs
#   PODMAN_BASE_IMAGE  the stand-in base: debootstrap --variant=minbase
#                      bookworm, imported once and cached
#   podman_need_root
#   podman_apt_install [CMD=PACKAGE ...]   install what is missing
#   podman_base_image WORKDIR              import (and first debootstrap) it
#   podman_runtime_stage WORKDIR BIN LOADGEN_BIN
#                      writes WORKDIR/ctx: the runtime stage's Containerfile
#                      and the build context it copies from

PODMAN_TOOLS_DIR="${SUBGATE_TOOLS_DIR:-$PWD/.tools}"
PODMAN_CACHE="$PODMAN_TOOLS_DIR/podman"
PODMAN_BASE_IMAGE="localhost/subgate-smoke-base:bookworm-minbase"
# podman's own flags: runc (crun is not in Debian 12's default path for
# podman here), cgroupfs (no systemd to manage cgroups).
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)

podman_need_root() {
  if [ "$(id -u)" != 0 ]; then fail "run as root (rootful podman with runc)"; fi
}

# podman_apt_install podman=podman runc=runc /usr/lib/podman/netavark=netavark
# Each argument is a command (or an absolute path) and the Debian package
# that provides it; the packages whose command is missing are installed in
# one apt run. Another apt on this machine is waited for, not fought.
podman_apt_install() {
  local need=() spec cmd pkg
  for spec in "$@"; do
    cmd="${spec%%=*}"
    pkg="${spec#*=}"
    if [[ "$cmd" == /* ]]; then
      [ -e "$cmd" ] || need+=("$pkg")
    else
      command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
    fi
  done
  [ ${#need[@]} -gt 0 ] || return 0
  say "apt: ${need[*]}"
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends "${need[@]}" >/dev/null
}

# The stand-in base: a minimal Debian 12 root filesystem, made once
# (debootstrap, cached as a tarball) and imported into podman's storage.
podman_base_image() {
  local work="$1" tarball mirror rootfs
  "${PODMAN[@]}" image exists "$PODMAN_BASE_IMAGE" && return 0
  tarball="$PODMAN_CACHE/bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    mirror="$(grep -rhoE '(URIs:|deb) +http[^ ]*debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
      grep -v security | head -1 | awk '{print $2}' || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    say "debootstrap --variant=minbase bookworm from $mirror (first run only)"
    mkdir -p "$PODMAN_CACHE"
    rootfs="$work/rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
      { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  say "podman import $tarball"
  "${PODMAN[@]}" import "$tarball" "$PODMAN_BASE_IMAGE" >/dev/null
}

# The runtime stage, ready for `podman build WORKDIR/ctx`. No base image can
# be pulled here, so the two stages are stood in for: the build stage by the
# binaries given (stripped, as the image strips them), distroless/cc by
# $PODMAN_BASE_IMAGE. Everything else is the Dockerfile's runtime stage as
# written: its instructions from the last FROM on, with only the FROM line
# and the COPY --from=build source paths rewritten.
podman_runtime_stage() {
  local work="$1" bin="$2" loadgen_bin="$3" ctx last_from
  ctx="$work/ctx"
  rm -rf "$ctx"
  mkdir -p "$ctx/src/target/release" "$ctx/config"
  strip -o "$ctx/src/target/release/subgate" "$bin"
  strip -o "$ctx/src/target/release/subgate-loadgen" "$loadgen_bin"
  cp config/default.toml config/production.toml "$ctx/config/"
  last_from="$(grep -n '^FROM ' Dockerfile | tail -1 | cut -d: -f1)"
  tail -n "+$last_from" Dockerfile |
    sed -e "1s#^FROM .*#FROM $PODMAN_BASE_IMAGE#" -e 's#^COPY --from=build /src/#COPY src/#' >"$ctx/Containerfile"
  grep -q "^FROM $PODMAN_BASE_IMAGE" "$ctx/Containerfile" || fail "could not rewrite the runtime stage's FROM"
  ! grep -q -- '--from=' "$ctx/Containerfile" || fail "a COPY --from is left in the runtime stage"
}
