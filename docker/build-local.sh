#!/usr/bin/env bash
# Build docker/Dockerfile with podman from a locally made base (no image registry needed), then check the image:
# `reid-batch validate` of the demo manifest and a tiny CPU job (docker/smoke.yaml), both as the image's non-root
# user on a read-only root filesystem, as Kubernetes runs it.
#
#   docker/build-local.sh [--tag TAG] [--keep DIR] [--no-check]
#
# The base stands in for pytorch/pytorch:*-runtime: Debian bookworm from debootstrap plus a virtual environment
# with the torch and torchvision versions of $PYTHON's environment (CUDA builds run on CPU too). Its wheels are
# fetched once with `pip download` into a cache; the Debian and base images are reused while their inputs are
# unchanged, so a rebuild only redoes the package layer. Needs root (debootstrap, podman), podman, debootstrap.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tag=reid-batch:local
keep=""
check=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --keep) keep=$2; shift 2 ;;
        --no-check) check=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "docker/build-local.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

step() { echo "== $* ($(date +%T))" >&2; }
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "docker/build-local.sh: $tool is not installed" >&2; exit 2; }
done
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=python3
cache=${REID_BATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reid-batch}/container
mkdir -p "$cache"

# podman on this kind of host: runc (crun rejects hybrid cgroups), cgroupfs (no systemd), ulimits root may set.
if [[ -z ${CONTAINERS_CONF:-} ]]; then
    export CONTAINERS_CONF=$cache/containers.conf
    cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
fi

torch_version=${TORCH_VERSION:-$("$python" -c "from importlib.metadata import version; print(version('torch').split('+')[0])")}
torchvision_version=${TORCHVISION_VERSION:-$("$python" -c "from importlib.metadata import version; print(version('torchvision').split('+')[0])")}
mapfile -t requirements < <("$python" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
)
requirements+=("torch==$torch_version" "torchvision==$torchvision_version" "setuptools>=68" "wheel")
key() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }

wheels=$cache/wheels-$(key "${requirements[@]}")
if [[ ! -e $wheels/.complete ]]; then
    step "downloading wheels into $wheels"
    rm -rf "$wheels"
    "$python" -m pip download --quiet --only-binary=:all: --dest "$wheels" "${requirements[@]}"
    touch "$wheels/.complete"
fi

debian=localhost/reid-batch-debian:bookworm
if ! podman image exists "$debian"; then
    step "debootstrap bookworm -> $debian"
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    tar -C "$rootfs" -c . | podman import --quiet - "$debian" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

base=localhost/reid-batch-base:torch$torch_version-$(key "$torchvision_version" "$(cat "$repo/docker/local-base.Containerfile")")
if ! podman image exists "$base"; then
    step "building $base (torch $torch_version, torchvision $torchvision_version)"
    podman build --quiet --network=none --volume "$wheels:/wheels:ro" --build-arg DEBIAN_IMAGE="$debian" \
        --build-arg TORCH_VERSION="$torch_version" --build-arg TORCHVISION_VERSION="$torchvision_version" \
        -f "$repo/docker/local-base.Containerfile" -t "$base" "$repo/docker" >/dev/null
fi

step "building $tag from $base"
previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
podman build --quiet --network=none --volume "$wheels:/wheels:ro" --build-arg BASE_IMAGE="$base" \
    --build-arg PIP_EXTRA_ARGS="--no-index --find-links /wheels" -f "$repo/docker/Dockerfile" -t "$tag" "$repo" >/dev/null
# The image this tag replaced would otherwise stay behind, untagged, at every rebuild.
if [[ -n $previous && $previous != $(podman image inspect --format '{{.Id}}' "$tag") ]]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
(( check )) || exit 0

# As Kubernetes runs it: the image's user, a read-only root filesystem, writable /tmp and working directory.
# shellcheck disable=SC2054 # the commas belong to --tmpfs's option list
run=(podman run --rm --network=none --read-only --tmpfs /tmp:rw,exec --security-opt=no-new-privileges --cap-drop=ALL)
step "checking $tag"
uid=$("${run[@]}" --entrypoint id "$tag" -u)
[[ $uid != 0 ]] || { echo "docker/build-local.sh: the image runs as root" >&2; exit 1; }
"${run[@]}" --workdir /opt/reid-batch "$tag" validate manifests/demo.yaml

work=${keep:-$(mktemp -d)}
mkdir -p "$work"
cp "$repo/docker/smoke.yaml" "$work/smoke.yaml"
chown "$uid:$uid" "$work"
step "tiny CPU job (docker/smoke.yaml) in $work"
"${run[@]}" --volume "$work:/work" "$tag" run smoke.yaml
[[ -n $keep ]] || rm -rf "$work"
step "ok: $tag (user $uid)"
