#!/usr/bin/env bash
# The whole pipeline on a built-in simulated dataset: simulate -> template -> participant
# (every subject, one call each, as a SLURM array would) -> group. Prints the report path.
# Usage: scripts/run_demo.sh [WORK_DIR]   (default ./demo_out; env DEMO_SUBJECTS, DEMO_CONFIG)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-demo_out}
n=${DEMO_SUBJECTS:-18}
config=${DEMO_CONFIG:-$here/scripts/demo_config.yaml}
mkdir -p "$work"
work=$(cd "$work" && pwd)
bids="$work/bids"
out="$work/derivatives"
start=$(date +%s)
[ -d "$bids" ] || mmfusion simulate "$bids" --n-subjects "$n" --n-strata 3 --voxel-size 3 --seed 1
mmfusion "$bids" "$out" template --config "$config" --seed 1
for sub in $(cd "$bids" && ls -d sub-* | sed 's/sub-//'); do
  mmfusion "$bids" "$out" participant --participant-label "$sub" --config "$config" --seed 1 --skip-bids-validation
done
mmfusion "$bids" "$out" group --modalities jac ndi --config "$config" --seed 1 --skip-bids-validation
echo "demo finished in $(( $(date +%s) - start )) s"
echo "report: $out/mmfusion_report.html"
