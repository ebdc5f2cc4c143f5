#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, built locally with debootstrap and imported
# with `docker import`: for machines that cannot pull python:3.11-slim from a registry (the
# Makefile's `docker` target calls this only when the pull fails).
#   bash docker/make_base.sh [TAG] [MIRROR]
set -euo pipefail
TAG=${1:-hybrid-llm-base:bookworm}
MIRROR=${2:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d /tmp/hybrid-llm-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR"
# apt caches and lists are not needed at run time
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$TAG"
echo "built $TAG"
