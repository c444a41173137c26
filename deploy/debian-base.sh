#!/usr/bin/env bash
# Builds a Debian base image for deploy/Containerfile from Debian's packages,
# where no public container registry is reachable (only a Debian mirror):
#
#   sudo bash deploy/debian-base.sh [IMAGE]      # IMAGE: localhost/pylm-base:bookworm
#   podman build -f deploy/Containerfile --build-arg BASE=localhost/pylm-base:bookworm -t pylm .
#
# A minimal bookworm (debootstrap's minbase) with python3 and its venv module,
# imported into podman as IMAGE. Needs root, debootstrap and podman
# (sudo apt-get install debootstrap podman); takes about a minute. MIRROR
# overrides the Debian mirror.
set -euo pipefail
image=${1:-localhost/pylm-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root: sudo bash $0" >&2; exit 1; }
rootfs=$(mktemp -d /tmp/pylm-base.XXXXXX)
trap 'rm -rf --one-file-system "$rootfs"' EXIT
echo "debootstrap: a minimal Debian bookworm with python3 into $rootfs ($mirror)"
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
echo "importing it into podman as $image"
tar -C "$rootfs" -c . | podman import --quiet - "$image" >/dev/null
echo "$image"
