#!/usr/bin/env bash
# CI: build the Docker image from the Dockerfile as users get it and run it for real.
#
#   bash .ci/container_run.sh          (root, Debian bookworm; called by .ci/run)
#
# 1. Debian's engine (docker.io), started without touching the host network
#    (--iptables=false --ip-masq=false --bridge=none; builds use --network host), unless a
#    daemon answers already. If it cannot start, this script fails and prints its log.
# 2. The base image: .ci/make_base_image.sh makes a local stand-in for the Dockerfile's FROM
#    (no Docker Hub here); the published image is built FROM the real one.
# 3. docker build (the default builder of the docker CLI; the Dockerfile has no BuildKit-only
#    syntax), wall time, image size and the size of each layer.
# 4. The image run as its non-root user (uid 1000) with --network none: --version, --help,
#    the offline import check, simulate a tiny cohort, template + participant + group with
#    tests/data/tiny_config.yaml on bind-mounted folders, the refused write into a root-owned
#    bind mount (exit 73); then the outputs: every shard validates with the package's own
#    reader (inside the image), the report exists, the outputs belong to uid 1000.
# 5. The CPU-only variant (--build-arg TENSORFLOW=tensorflow): built, its size next to the GPU
#    one's, --version and the offline imports (MMFUSION_CI_CPU_IMAGE=0 leaves it out, and says so).
# Everything it makes is removed at the end: the images, their build cache, the folders,
# and the daemon if it started it.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(cat version)
image=mmfusion:$version
section_start=$(date +%s)
scratch=$(mktemp -d /tmp/mmfusion-ci-container-XXXXXX)
chmod 755 "$scratch"
dockerd_pid=
cleanup() {
    set +e
    if docker info >/dev/null 2>&1; then
        docker rmi -f "$image" "$image-cpu" >/dev/null 2>&1
        # the CI stand-in only (a real python image pulled by someone else stays)
        base=$(awk 'toupper($1) == "FROM" { print $2; exit }' Dockerfile)
        [ "$(docker image inspect -f '{{ index .Config.Labels "mmfusion.ci-base" }}' "$base" 2>/dev/null)" = 1 ] \
            && docker rmi -f "$base" >/dev/null 2>&1
        docker container prune -f >/dev/null 2>&1  # a build's intermediate container, if interrupted
        docker image prune -f >/dev/null 2>&1
        docker builder prune -f >/dev/null 2>&1
    fi
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null
        wait "$dockerd_pid" 2>/dev/null
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

say() { echo "container: $*"; }

echo "== container engine"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
if docker info >/dev/null 2>&1; then
    say "a docker daemon answers already: $(docker version -f '{{.Server.Version}}')"
else
    dockerd --iptables=false --ip-masq=false --bridge=none >"$scratch/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "container: the docker daemon did not start; its log:" >&2
        tail -30 "$scratch/dockerd.log" >&2
        exit 1
    fi
    say "dockerd $(docker version -f '{{.Server.Version}}') started (pid $dockerd_pid, no iptables/bridge)"
fi

echo "== base image"
bash .ci/make_base_image.sh

build() {  # TAG [docker build args...]: build, print wall time and size; the log on failure
    local tag=$1 start rc
    shift
    start=$(date +%s)
    set +e
    DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build --network host -t "$tag" \
        --build-arg VERSION="$version" "$@" . >"$scratch/build-${tag//[:\/]/_}.log" 2>&1
    rc=$?
    set -e
    if [ "$rc" != 0 ]; then
        tail -40 "$scratch/build-${tag//[:\/]/_}.log" >&2
        say "build $tag: FAILED (exit $rc) after $(( $(date +%s) - start )) s"
        exit 1
    fi
    say "build $tag: exit 0, wall $(( $(date +%s) - start )) s, image size $(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.2f GB", $1 / 1e9 }')"
}

echo "== docker build $image"
build "$image"
echo "layers of $image (docker history; the largest first):"
docker history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$image" \
    | awk -F'\t' '$1 != "0B" { sub(/^\/bin\/sh -c (#\(nop\) )?/, "", $2); printf "  %9s  %.110s\n", $1, $2 }' \
    | sort -k1,1 -h -r
echo "what dominates the package layer (du -sm in site-packages; nvidia/ = the CUDA wheels):"
docker run --rm --network none --entrypoint sh "$image" -c \
    'cd /usr/local/lib/python3*/*-packages && du -sm . && du -sm -- * | sort -rn | head -6' \
    | awk '{ printf "  %6s MB  %s\n", $1, ($2 == "." ? "all of site-packages" : $2) }'
echo "== the image run as its user (uid 1000), --network none"
data=$scratch/data
mkdir -p "$data"
chown 1000:1000 "$data"
cp tests/data/tiny_config.yaml "$scratch/tiny_config.yaml"
chmod 644 "$scratch/tiny_config.yaml"
ro_out=$scratch/root_owned
mkdir -p "$ro_out"
failed=0
in_image() {  # NAME EXPECTED_EXIT docker-run-args...: run, print its exit status and wall time
    local name=$1 expected=$2 start rc
    shift 2
    start=$(date +%s)
    set +e
    docker run --rm --network none -v "$data:/data" -v "$scratch/tiny_config.yaml:/config/tiny.yaml:ro" \
        "$@" >"$scratch/$name.log" 2>&1
    rc=$?
    set -e
    say "$name: exit $rc (expected $expected), wall $(( $(date +%s) - start )) s"
    if [ "$rc" != "$expected" ]; then
        tail -30 "$scratch/$name.log" | sed 's/^/    /'
        failed=1
        return 1
    fi
}
common=(--config /config/tiny.yaml --seed 3 --omp-nthreads 2 --skip-bids-validation)
in_image version 0 "$image" --version && grep -qx "mmfusion $version" "$scratch/version.log" \
    || { say "--version printed: $(head -c 200 "$scratch/version.log")"; failed=1; }
in_image help 0 "$image" && grep -q "^usage: mmfusion " "$scratch/help.log" \
    && grep -q "analysis_level" "$scratch/help.log" \
    || { say "the default command (--help) printed no usage"; failed=1; }
in_image offline-imports 0 --entrypoint python "$image" -c \
    "import mmfusion, tensorflow, ants, numba.np.ufunc.omppool, nilearn.datasets as d; d.load_mni152_template(resolution=1); print('mmfusion', mmfusion.__version__, 'tensorflow', tensorflow.__version__, 'numba omp layer ok')" \
    && tail -1 "$scratch/offline-imports.log" | sed 's/^/    /'
in_image simulate 0 "$image" simulate /data/bids --n-subjects 6 --n-strata 2 --voxel-size 4 --seed 3
in_image template 0 "$image" /data/bids /data/out template "${common[@]}"
in_image participant 0 "$image" /data/bids /data/out participant "${common[@]}"
in_image group 0 "$image" /data/bids /data/out group --modalities jac ndi "${common[@]}"
# the write refused in a root-owned bind mount: the one line and exit 73 (the user's fix: --user)
in_image simulate-into-root-owned-mount 73 -v "$ro_out:/rootowned" "$image" simulate /rootowned/sim --n-subjects 2 --n-strata 1 \
    && { [ "$(wc -l < "$scratch/simulate-into-root-owned-mount.log")" = 1 ] \
         || { say "exit 73 but not one line:"; cat "$scratch/simulate-into-root-owned-mount.log"; failed=1; }; } \
    && sed 's/^/    /' "$scratch/simulate-into-root-owned-mount.log"

echo "== the outputs"
if [ "$failed" = 0 ]; then
    in_image check-shards 0 --entrypoint python "$image" -c '
import glob
from mmfusion.io.shards import read_shard
paths = sorted(glob.glob("/data/out/shards/sub-*.h5"))
assert len(paths) == 6, paths
for p in paths:
    s = read_shard(p)  # validates schema, grid and finiteness
    assert set(s.images) == {"t1", "jac", "fa", "ndi"} and s.mask.any(), p
print(f"{len(paths)} shards validate")' && sed 's/^/    /' "$scratch/check-shards.log"
    report=$data/out/mmfusion_report.html
    if [ -s "$report" ] && grep -q "Key results" "$report"; then
        say "report: $(du -k "$report" | cut -f1) kB, has its key results"
    else
        say "report $report missing or without key results"
        failed=1
    fi
    foreign=$(find "$data" ! -uid 1000 | head -5)
    if [ -z "$foreign" ]; then
        say "every output belongs to uid 1000 ($(find "$data" | wc -l) files and folders)"
    else
        say "outputs not owned by uid 1000: $foreign"
        failed=1
    fi
fi
if [ "${MMFUSION_CI_CPU_IMAGE:-1}" = 1 ]; then
    echo "== the CPU-only variant: docker build $image-cpu (--build-arg TENSORFLOW=tensorflow)"
    build "$image-cpu" --build-arg TENSORFLOW=tensorflow
    say "image sizes: $image $(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.2f GB", $1 / 1e9 }'), $image-cpu $(docker image inspect -f '{{.Size}}' "$image-cpu" | awk '{ printf "%.2f GB", $1 / 1e9 }')"
    in_image cpu-version 0 "$image-cpu" --version
    in_image cpu-offline-imports 0 --entrypoint python "$image-cpu" -c \
        "import importlib.util as u, mmfusion, tensorflow, ants, numba.np.ufunc.omppool, nilearn.datasets as d; d.load_mni152_template(resolution=1); assert u.find_spec('nvidia') is None, 'CUDA wheels in the CPU image'; print('mmfusion', mmfusion.__version__, 'tensorflow', tensorflow.__version__, 'no CUDA wheels')" \
        && tail -1 "$scratch/cpu-offline-imports.log" | sed 's/^/    /'
else
    say "CPU-only variant NOT built (MMFUSION_CI_CPU_IMAGE=0)"
fi
say "section wall $(( $(date +%s) - section_start )) s"
[ "$failed" = 0 ] || { say "FAILED (see the lines above)"; exit 1; }
