#!/usr/bin/env bash
# Make the two images the Dockerfile's FROM lines name, from Debian's packages and
# PyPI only, for a builder that cannot (or must not) pull from a container registry:
#
#   python:${PYTHON_VERSION}-slim-bookworm  Debian 12 (mmdebstrap, minbase) with its
#                                           python3, laid out like the official image
#   ghcr.io/astral-sh/uv:${UV_VERSION}      /uv and /uvx from the PyPI `uv` wheel of
#                                           that version (the same static musl binary)
#
# Versions come from the Dockerfile's ARG lines. Needs root, podman, buildah,
# mmdebstrap and python3 with pip (apt-get install podman buildah mmdebstrap).
#
#   deploy/image/base-images.sh             # make both if missing or made by another recipe
#   deploy/image/base-images.sh --force     # make both again
#
# Debian 12's python3 is 3.11 (3.11.2 with Debian's security fixes), so only
# PYTHON_VERSION=3.11 can be made here. podman and buildah flags (--root,
# --storage-driver) pass through CONTAINERS_STORAGE_CONF; see docs/deploy.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

force=false
[ "${1:-}" = "--force" ] && force=true

arg() { sed -n "s/^ARG $1=//p" Dockerfile; }
python_version="$(arg PYTHON_VERSION)"
uv_version="$(arg UV_VERSION)"
python_image="docker.io/library/python:${python_version}-slim-bookworm"
uv_image="ghcr.io/astral-sh/uv:${uv_version}"
# An image made by this recipe carries its hash: a changed recipe makes it again.
recipe="$(sha256sum "$0" | cut -c1-16)"

current() {  # current IMAGE: made by this recipe?
    [ "$(podman image inspect --format '{{index .Labels "org.vellum-sidecar.base-recipe"}}' "$1" 2>/dev/null)" = "$recipe" ]
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if $force || ! current "$python_image"; then
    if [ "$python_version" != "3.11" ]; then
        echo "base-images.sh: Debian 12 ships Python 3.11, not $python_version" >&2
        exit 1
    fi
    start=$SECONDS
    # minbase: the Essential packages plus apt (dpkg, passwd's useradd, bash); the
    # official slim image's extra packages (ca-certificates, netbase, tzdata); the
    # same documentation, manual and locale trimming as Debian's slim images.
    mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates,netbase,tzdata \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        --customize-hook='for n in python3.11 python3 python; do ln -s /usr/bin/python3.11 "$1/usr/local/bin/$n"; done' \
        bookworm "$work/python.tar"
    # The official image's interpreter is /usr/local/bin/python3.11 (built from
    # source); here /usr/local/bin's links point at Debian's, so PATH lookups and
    # the venvs uv makes (home = /usr/local/bin) look the same.
    podman import --quiet \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "ENV PYTHON_VERSION=$python_version" \
        --change "LABEL org.vellum-sidecar.base-recipe=$recipe" \
        --change 'CMD ["python3"]' \
        "$work/python.tar" "$python_image" >/dev/null
    echo "made $python_image in $((SECONDS - start)) s: $(podman image inspect --format '{{.Size}}' "$python_image") bytes"
fi

if $force || ! current "$uv_image"; then
    start=$SECONDS
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform musllinux_1_1_x86_64 --python-version 3.11 --dest "$work/wheel" "uv==$uv_version"
    python3 -m zipfile -e "$work"/wheel/uv-*.whl "$work/uv"
    scripts="$work/uv/uv-$uv_version.data/scripts"
    chmod 0755 "$scripts/uv" "$scripts/uvx"
    container="$(buildah from scratch)"
    buildah copy --quiet "$container" "$scripts/uv" "$scripts/uvx" / >/dev/null
    buildah config --entrypoint '["/uv"]' --label "org.vellum-sidecar.base-recipe=$recipe" "$container"
    buildah commit --quiet --rm "$container" "$uv_image" >/dev/null
    echo "made $uv_image in $((SECONDS - start)) s: $(podman image inspect --format '{{.Size}}' "$uv_image") bytes"
fi
