"""Input-pipeline throughput vs training-step consumption (issue 4, item 6c).

Writes synthetic shards (two modalities, gzip like the participant level) to a scratch
folder, then measures side by side in one process:

* reading one volume: h5py ``dset[...]`` vs :func:`mmfusion.learning.shard_data.read_volume`
  (direct chunk read + zlib outside h5py's lock);
* the full ``tf.data`` pipeline (read + normalize + batch) with 1 parallel call vs
  AUTOTUNE, in subjects/s;
* one training step of the real autoencoder (batch 1, after the trace), in subjects/s.

The ratio pipeline/step > 1 means the GPU (or CPU) is never starved by input.

    python bench/bench_input_pipeline.py [--subjects 8] [--shape 128 128 96] [--steps 5] [--no-model]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from mmfusion.learning import shard_data
from mmfusion.learning.intensity import PopulationNormalizer
from mmfusion.io.shards import Shard, shard_path, write_shard

MODALITIES = ["jac", "ndi"]


def write_shards(folder: Path, n: int, shape) -> list[Path]:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.8
    paths = []
    for i in range(n):
        images = {m: np.where(brain, np.sin(3 * grid[0] + i + j) + 0.1 * rng.standard_normal(shape, np.float32), 0)
                  .astype(np.float32) for j, m in enumerate(MODALITIES)}
        paths.append(write_shard(shard_path(folder, f"{i:03d}"), Shard(f"{i:03d}", "", images, brain, np.eye(4))))
    return paths


def rate(func, n_items: int, repeat: int = 2) -> float:
    """Best items/s over ``repeat`` runs of ``func()``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return n_items / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 96])
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--no-model", action="store_true", help="skip the training-step measurement")
    args = p.parse_args()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    print(f"device: {'GPU x%d' % len(gpus) if gpus else 'CPU only'}, grid {args.shape}, "
          f"{args.subjects} subjects x {len(MODALITIES)} modalities")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.subjects, args.shape)
        n_vol = len(paths) * len(MODALITIES)

        def h5py_read():
            for path in paths:
                with h5py.File(path) as h5:
                    for m in MODALITIES:
                        h5[m][...]

        def direct_read():
            for path in paths:
                for m in MODALITIES:
                    shard_data.read_volume(path, m)

        r_h5, r_direct = rate(h5py_read, n_vol), rate(direct_read, n_vol)
        print(f"read one volume, serial: h5py {r_h5:.1f} vol/s, read_volume {r_direct:.1f} vol/s "
              f"(x{r_direct / r_h5:.2f})")
        norm = PopulationNormalizer().fit(paths, MODALITIES, shard_data.read_volume)
        epochs = 3
        orders = shard_data.epoch_orders(len(paths), epochs, 0)
        pipe = {}
        for label, parallel in (("1 call", 1), ("AUTOTUNE", None)):
            ds = shard_data.make_dataset(paths, MODALITIES, norm, args.shape, 1, orders, parallel=parallel)
            pipe[label] = rate(lambda: [None for _ in ds], len(paths) * epochs)
        print(f"tf.data pipeline (read+normalize+batch): 1 parallel call {pipe['1 call']:.1f} subj/s, "
              f"AUTOTUNE {pipe['AUTOTUNE']:.1f} subj/s (x{pipe['AUTOTUNE'] / pipe['1 call']:.2f})")
        if args.no_model:
            return
        import keras

        from mmfusion.config import default_config
        from mmfusion.model.autoencoder import build_autoencoder, compile_autoencoder

        cfg = default_config()["model"]
        cfg["input_shape"] = list(args.shape)
        model = compile_autoencoder(build_autoencoder(cfg, MODALITIES), 1e-3)
        # take(1) ends the iteration cleanly (an abandoned iterator's worker threads crashed at exit)
        x, y = [batch for batch in shard_data.make_dataset(paths[:1], MODALITIES, norm, args.shape, 1).take(1)][0]
        start = time.perf_counter()
        model.train_on_batch(x, y)
        trace = time.perf_counter() - start
        step = rate(lambda: [model.train_on_batch(x, y) for _ in range(args.steps)], args.steps, repeat=1)
        keras.backend.clear_session()
        print(f"training step (batch 1, {model.count_params()} params): first call (trace) {trace:.1f} s, "
              f"then {step:.2f} subj/s ({1 / step:.3f} s/step)")
        print(f"pipeline AUTOTUNE / training step consumption: x{pipe['AUTOTUNE'] / step:.1f} "
              f"({'input is not' if pipe['AUTOTUNE'] > step else 'INPUT IS'} the bottleneck)")


if __name__ == "__main__":
    main()
