#!/usr/bin/env bash
# Makes sure the base image of the lottery images exists in the local Docker
# image store, for machines that cannot reach an image registry.
#
#   docker/build-base-image.sh [IMAGE]        (default debian:bookworm-slim)
#
# 1. The image is already there: nothing to do.
# 2. `docker pull` works: use the registry's image.
# 3. Otherwise, for debian:<suite>[-slim], build it: debootstrap a minbase
#    rootfs from Debian's package archive (which such machines do reach),
#    trim it the way Debian's official slim image is trimmed, and
#    `docker import` it under the same name. Any other image is an error that
#    says what to do.
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian),
# DEBIAN_SECURITY_MIRROR (default http://deb.debian.org/debian-security),
# DOCKER (default docker), FORCE_DEBOOTSTRAP=1 to skip the pull.
set -euo pipefail

IMAGE=${1:-debian:bookworm-slim}
DOCKER=${DOCKER:-docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
pull_timeout_s=120

say() { echo "docker-base: $*"; }
die() { echo "docker-base: ERROR: $*" >&2; exit 1; }

if ! $DOCKER info >/dev/null 2>&1; then
  die "no Docker engine answers ('$DOCKER info' fails): install docker.io (or Docker Engine) and start it (systemctl start docker, or as root: dockerd >/var/log/dockerd.log 2>&1 &)"
fi

if $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
  say "$IMAGE is present ($($DOCKER image inspect -f '{{.Id}}' "$IMAGE" | cut -c1-19))"
  exit 0
fi

if [ "${FORCE_DEBOOTSTRAP:-0}" != 1 ]; then
  say "pulling $IMAGE"
  if timeout "$pull_timeout_s" $DOCKER pull -q "$IMAGE"; then
    exit 0
  fi
  say "pull failed (no registry reachable?); building $IMAGE locally with debootstrap"
fi

# Only Debian images can be rebuilt from Debian's archive.
if [[ ! "$IMAGE" =~ ^(docker\.io/)?(library/)?debian:([a-z]+)(-slim)?$ ]]; then
  die "cannot pull $IMAGE and only debian:<suite>[-slim] can be built locally; pull or load $IMAGE, or pass BASE_IMAGE=debian:bookworm-slim"
fi
SUITE=${BASH_REMATCH[3]}

if [ "$(id -u)" != 0 ]; then
  die "debootstrap needs root: run 'sudo $0 $IMAGE' (or 'sudo make docker-base')"
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null ||
    die "could not install debootstrap (apt-get install debootstrap)"
fi

WORK=$(mktemp -d /var/tmp/lottery-rootfs.XXXXXX)
ROOTFS="$WORK/rootfs"
cleanup() {
  # debootstrap may leave /proc or /sys mounted when it fails half-way.
  for m in proc sys dev/pts dev; do
    mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
  done
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

say "debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes)"
if ! debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
  tail -20 "$WORK/debootstrap.log" >&2
  die "debootstrap failed (is $MIRROR reachable?)"
fi

# What Debian's official slim images do: no docs, man pages or translations,
# no apt caches, no suggested packages.
mkdir -p "$ROOTFS/etc/dpkg/dpkg.cfg.d" "$ROOTFS/etc/apt/apt.conf.d"
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' >"$ROOTFS/etc/apt/apt.conf.d/docker-no-languages"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$ROOTFS/etc/apt/apt.conf.d/docker-autoremove-suggests"

# The same sources as the official image, so apt-get works in builds.
rm -f "$ROOTFS/etc/apt/sources.list"
cat >"$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/cache/debconf/*-old \
  "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/* \
  "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/*
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
# Docker provides these at run time.
rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hostname"
: >"$ROOTFS/etc/hostname"

say "importing the rootfs as $IMAGE"
tar --numeric-owner --xattrs -C "$ROOTFS" -c . |
  $DOCKER import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR (lottery docker/build-base-image.sh)" \
    - "$IMAGE" >/dev/null
say "built $IMAGE: $($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
