#!/usr/bin/env bash
# GPU numbers for docs/performance.md: paper-model training throughput (fp32 / mixed
# precision, separable / dense mid-flow) and single-layer timings, one process per
# model configuration (so each peak-memory figure is that configuration's own).
# Usage: bench/run_gpu_bench.sh OUT_DIR   (KERAS_BACKEND selects the backend; jax if unset)
set -uo pipefail
out=${1:?usage: bench/run_gpu_bench.sh OUT_DIR}
mkdir -p "$out"
export KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import keras, sys; print('python', sys.version.split()[0], 'keras', keras.__version__, 'backend', keras.backend.backend())" | tee -a "$out/device.txt"
run() {  # $1 = timeout seconds, rest = bench arguments
    local limit=$1; shift
    timeout "$limit" python3 "$here/bench_gpu_throughput.py" --jsonl "$out/gpu.jsonl" "$@" 2>&1 \
        | grep -v -E 'Warning|WARNING|oneDNN|absl|cuda_dnn|computation_placer' | tee -a "$out/gpu.txt"
}
for cfg in separable:float32:1 separable:mixed_float16:1 dense:float32:1 dense:mixed_float16:1; do
    run 80 --steps 15 --configs "$cfg"
done
run 110 --steps 15 --configs separable-grouped:float32:1 --layers
for cfg in separable:mixed_bfloat16:1 separable:float32:4; do
    run 80 --steps 15 --configs "$cfg"
done
