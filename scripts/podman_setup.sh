#!/usr/bin/env bash
# One-time machine setup for building and running the lookalike container with podman on a
# machine without a Docker daemon or a reachable container registry (see ../shared/CONTAINERS.md).
# Idempotent: every step is skipped when its result is already there. Needs root (apt, podman).
#
#   scripts/podman_setup.sh            # then: scripts/container_smoke.sh
#
# What it does:
#   1. apt-get install podman runc debootstrap (if podman is missing);
#   2. writes $LOOKALIKE_CTR_DIR/containers.conf (runc, cgroupfs, lower ulimits: podman's
#      defaults, crun and its ulimits, fail in this environment) and a pip.conf that makes pip
#      inside `podman build` verify TLS with this machine's CA bundle;
#   3. makes the base image `docker.io/library/debian:bookworm-slim` locally with debootstrap
#      (minbase, trimmed like the official slim variant) when it is not in podman's store, so
#      `FROM debian:bookworm-slim` builds without any container registry.
# Env: LOOKALIKE_CTR_DIR (default /tmp/lookalike-ctr), DEBIAN_MIRROR (default
# http://deb.debian.org/debian), LOOKALIKE_REBUILD_BASE=1 (replace a base image not made here). Use the config it writes with
#   export CONTAINERS_CONF=$LOOKALIKE_CTR_DIR/containers.conf
set -euo pipefail

CTR_DIR=${LOOKALIKE_CTR_DIR:-/tmp/lookalike-ctr}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=docker.io/library/debian:bookworm-slim
HOST_CA=/etc/ssl/certs/ca-certificates.crt

die() { echo "podman_setup: error: $*" >&2; exit 1; }
say() { echo "podman_setup: $*"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, and podman builds/runs as root on these machines)"
t0=$(date +%s)

# 1. packages
need=()
for cmd in podman runc debootstrap; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ "${#need[@]}" -gt 0 ]; then
  say "installing ${need[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null \
    || die "apt-get install podman runc debootstrap failed"
else
  say "podman, runc and debootstrap already installed"
fi

# 2. configuration
mkdir -p "$CTR_DIR"
conf="$CTR_DIR/containers.conf"
want_conf='[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"'
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want_conf" ]; then
  printf '%s\n' "$want_conf" > "$conf.tmp" && mv "$conf.tmp" "$conf"
  say "wrote $conf"
fi
[ -f "$HOST_CA" ] || die "$HOST_CA not found: pip inside the build needs this machine's CA bundle"
printf '[global]\ncert = /run/host-ca.crt\n' > "$CTR_DIR/pip.conf"
export CONTAINERS_CONF="$conf"

# 3. base image
# Made like the official image's "slim" variant (debuerreotype): dpkg skips docs, man pages and
# locales, and apt keeps no package caches, so `FROM debian:bookworm-slim` layers are as small here
# as with the registry's image. BASE_VERSION labels the recipe: an image of ours with an older label
# is rebuilt; an image from elsewhere (e.g. pulled from a registry) is kept.
BASE_VERSION=2
have=""
if podman image exists "$BASE_IMAGE"; then
  have=$(podman image inspect --format '{{index .Config.Labels "org.lookalike.base"}}' "$BASE_IMAGE" 2>/dev/null || true)
  [ "$have" = "<no value>" ] && have=""
fi
if podman image exists "$BASE_IMAGE" && { [ "$have" = "$BASE_VERSION" ] || { [ -z "$have" ] && [ "${LOOKALIKE_REBUILD_BASE:-0}" != 1 ]; }; }; then
  say "base image $BASE_IMAGE already present${have:+ (lookalike recipe v$have)}"
else
  rootfs="$CTR_DIR/rootfs"
  rm -rf "$rootfs"
  say "debootstrap --variant=minbase bookworm from $MIRROR (about 20-60 s)"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CTR_DIR/debootstrap.log" 2>&1 \
    || die "debootstrap failed, see $CTR_DIR/debootstrap.log"
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
DPKG
  cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  echo 'Acquire::Languages "none";' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' > "$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{groff,info,linda,lintian,locale,man}/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/var/cache/debconf/*-old
  tar --numeric-owner -C "$rootfs" -c . \
    | podman import -q --change 'CMD ["/bin/bash"]' --change "LABEL org.lookalike.base=$BASE_VERSION" \
        - "$BASE_IMAGE" >/dev/null \
    || die "podman import of the base image failed"
  rm -rf "$rootfs"
  say "imported $BASE_IMAGE ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi
podman run --rm --pull=never "$BASE_IMAGE" true || die "podman cannot run $BASE_IMAGE (see the messages above)"
say "ready in $(( $(date +%s) - t0 )) s; use: export CONTAINERS_CONF=$conf"
