"""Several training processes on one device: aggregate training throughput for N = 1, 2, 4 ...

Each of N processes builds the autoencoder (``mmfusion.model``, config ``--config``'s
``model`` section, 2 modalities, batch 1), warms up (the first steps trace/compile), waits
at a barrier for the others, then runs ``train_on_batch`` for ``--seconds`` of wall time.
The aggregate throughput is the steps of all processes in that common window divided by
its length (subjects/s, batch 1). ``--threads`` CPU threads in all are split evenly
between the N processes (``OMP_NUM_THREADS``/TensorFlow intra-op threads = threads // N).
On a GPU the processes share the device's memory the way ``slurm/group.sbatch`` sets it
up for packed folds (``TF_FORCE_GPU_ALLOW_GROWTH``, ``XLA_PYTHON_CLIENT_PREALLOCATE=false``,
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.9/N``). The backend is ``KERAS_BACKEND`` (TensorFlow if unset).

    python bench/bench_packing.py --procs 1 2 4 --config tests/data/tiny_config.yaml --jsonl out.jsonl
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path


def _worker(rank: int, n: int, threads: int, model_cfg: dict, warmup: int, seconds: float, barrier, queue) -> None:
    os.environ.update(OMP_NUM_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads),
                      TF_CPP_MIN_LOG_LEVEL="2", TF_FORCE_GPU_ALLOW_GROWTH="true",
                      XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / n:.3f}")
    import numpy as np
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from mmfusion.model.autoencoder import build_autoencoder, compile_autoencoder

    modalities = ["jac", "ndi"]
    model = build_autoencoder(model_cfg, modalities)
    compile_autoencoder(model, 1e-4)
    rng = np.random.default_rng(rank)
    shape = (1, *model_cfg["input_shape"], 1)
    x = {f"in_{m}": rng.random(shape, dtype=np.float32) for m in modalities}
    y = {f"rec_{m}": x[f"in_{m}"] for m in modalities}
    t0 = time.perf_counter()
    for _ in range(warmup):
        model.train_on_batch(x, y)
    compile_s = time.perf_counter() - t0
    barrier.wait()
    start = time.perf_counter()
    steps = 0
    while time.perf_counter() - start < seconds:
        model.train_on_batch(x, y)
        steps += 1
    queue.put({"rank": rank, "steps": steps, "seconds": time.perf_counter() - start, "warmup_s": compile_s})


def measure(n: int, threads: int, model_cfg: dict, warmup: int, seconds: float) -> dict:
    """N processes at once -> {'procs', 'threads_per_proc', 'subjects_per_s' (aggregate), ...}."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    per = max(1, threads // n)
    procs = [ctx.Process(target=_worker, args=(r, n, per, model_cfg, warmup, seconds, barrier, queue))
             for r in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    per_proc = [r["steps"] / r["seconds"] for r in results]
    return {"procs": n, "threads_per_proc": per, "subjects_per_s": round(sum(per_proc), 3),
            "per_process_subjects_per_s": [round(v, 3) for v in per_proc],
            "s_per_step_per_process": round(n / sum(per_proc), 4),
            "warmup_s_max": round(max(r["warmup_s"] for r in results), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads in all")
    p.add_argument("--config", type=Path, help="YAML whose model section is used (default: the paper's model)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seconds", type=float, default=30.0, help="the common timed window")
    p.add_argument("--jsonl", type=Path)
    args = p.parse_args()
    from mmfusion.config import load_config

    model_cfg = load_config(args.config)["model"] if args.config else load_config(None)["model"]
    import keras

    device = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
              "cpus": len(os.sched_getaffinity(0)), "backend": keras.backend.backend(),
              "input_shape": model_cfg["input_shape"]}
    print(json.dumps(device))
    for n in args.procs:
        row = {**device, **measure(n, args.threads, model_cfg, args.warmup, args.seconds)}
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
