#!/usr/bin/env bash
# CI only: make a local stand-in for the Dockerfile's base image (python:3.11.7-slim-bookworm)
# on a machine that cannot reach Docker Hub, and tag it exactly as the Dockerfile's FROM, so
# `docker build .` builds the Dockerfile users get, unchanged.
#
#   bash .ci/make_base_image.sh            (root; needs debootstrap and a running docker daemon)
#
# Debian bookworm's python3 is 3.11, like the official image. The stand-in provides what the
# Dockerfile uses from the official one: `python` and `pip` on PATH, pip installs allowed
# system-wide (Debian's PEP 668 marker removed), `useradd`, CA certificates, C.UTF-8.
# The machine's local CA certificates (/usr/local/share/ca-certificates, the ones
# update-ca-certificates installs) go into THIS CI-only base and pip is pointed at the system
# bundle, so pip inside the build trusts an HTTPS proxy that intercepts the package index.
# They are never part of the published image: that one is built FROM Docker Hub's image.
# The stand-in carries the label mmfusion.ci-base=1; an image with that tag but without the
# label (a real python image pulled earlier) is left alone and the script stops.
set -euo pipefail
tag=$(awk 'toupper($1) == "FROM" { print $2; exit }' "$(dirname "$0")/../Dockerfile")
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ -n "$tag" ] || { echo "make_base_image.sh: no FROM line in the Dockerfile" >&2; exit 1; }
if docker image inspect "$tag" >/dev/null 2>&1; then
    if [ "$(docker image inspect -f '{{ index .Config.Labels "mmfusion.ci-base" }}' "$tag")" = 1 ]; then
        echo "base image $tag: the CI stand-in exists already ($(docker image inspect -f '{{.Id}}' "$tag" | cut -c1-19))"
        exit 0
    fi
    echo "base image $tag exists and is not the CI stand-in: left as it is, nothing to make"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "make_base_image.sh: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d /tmp/mmfusion-base-XXXXXX)
cleanup() {  # debootstrap mounts /proc and /sys in the root while it works: unmount them first
    awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r umount -l
    rm -rf "$root" "$root.log"
}
trap cleanup EXIT
start=$(date +%s)
echo "== debootstrap --variant=minbase bookworm ($mirror) -> $root"
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$mirror" > "$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; echo "make_base_image.sh: debootstrap failed (log above)" >&2; exit 1; }
# the machine's local CAs (CI-only layer), then the system bundle rebuilt inside the root
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
chroot "$root" update-ca-certificates >/dev/null
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
echo "== docker import -> $tag"
tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'LABEL mmfusion.ci-base=1' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
docker run --rm --network none "$tag" sh -c 'python --version && pip --version && command -v useradd' \
    | sed 's/^/  /'
echo "base image $tag: made in $(( $(date +%s) - start )) s, $(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
