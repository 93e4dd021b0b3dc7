"""Synchronized vs plain BatchNormalization in the autoencoder: exactness and step time.

Builds the default-config model (``mmfusion/defaults/model.yaml``, 2 modalities; input
from ``--input``) twice in one process, ``model.sync_batchnorm: false`` and ``true``, with
the same seed (same initial weights, checked), compiled as the group level does
(``compile_autoencoder``, Adam 1e-3). Under ``--replicas R`` the models live in a
``MirroredStrategy`` over R logical CPU devices (the CPU split R ways; this bench does
not split a GPU); with R = 1 the default strategy (a GPU when TensorFlow sees one).

Prints, for one replica or R replicas:
* the largest difference of the training-mode outputs (``model(x, training=True)``)
  and of the weights after the timed steps between the two models (R = 1: how far the
  synchronized formula E[x^2] - E[x]^2 is from the two-pass variance; R > 1: how far the
  per-replica statistics are from the global-batch ones);
* seconds per ``train_on_batch`` step (median over ``--steps``, the two models
  alternating so other load hits both alike) and the ratio synchronized / plain.

Usage: ``OMP_NUM_THREADS=2 python bench/bench_sync_batchnorm.py [--input 64,64,64]
[--batch 2] [--steps 5] [--replicas 1] [--threads 2]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import init_tensorflow, time_steps  # noqa: E402

MODALITIES = ("JAC", "NDI")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default="128,128,96", help="voxels, divisible by 2**levels (32)")
    p.add_argument("--batch", type=int, default=2, help="global batch (a multiple of --replicas)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (after 1 warm-up)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def _strategy(tf, replicas: int):
    """Default strategy (1) or MirroredStrategy over ``replicas`` logical CPU devices."""
    if replicas == 1:
        return tf.distribute.get_strategy(), "default strategy"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices), f"{replicas} logical CPUs"


def main():
    args = _parse()
    tf = init_tensorflow(args.threads)
    strategy, where = _strategy(tf, args.replicas)
    import keras
    import numpy as np

    from mmfusion.config import default_config
    from mmfusion.model.autoencoder import build_autoencoder, compile_autoencoder

    shape = [int(v) for v in args.input.split(",")]
    rng = np.random.default_rng(0)
    x = {f"in_{m}": rng.uniform(0.05, 0.95, (args.batch, *shape, 1)).astype(np.float32) for m in MODALITIES}
    y = {f"rec_{m}": v for m, v in zip(MODALITIES, x.values())}
    models, first = {}, {}
    for name, sync in (("plain", False), ("synchronized", True)):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            cfg = dict(default_config()["model"], input_shape=shape, sync_batchnorm=sync)
            models[name] = compile_autoencoder(build_autoencoder(cfg, list(MODALITIES)), 1e-3)
        bns = [lay for lay in models[name].layers if isinstance(lay, keras.layers.BatchNormalization)]
        assert all(lay.synchronized is sync for lay in bns)
    plain, synced = models["plain"], models["synchronized"]
    assert all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), synced.get_weights()))
    if args.replicas == 1:  # one replica: the same function, up to the variance formula
        out_p, out_s = plain(x, training=True), synced(x, training=True)
        out_diff = max(float(np.abs(np.asarray(out_p[k]) - np.asarray(out_s[k])).max()) for k in out_p)
    else:
        out_diff = float("nan")
    for name, model in models.items():
        t0 = time.perf_counter()
        model.train_on_batch(x, y)  # trace + warm-up
        first[name] = time.perf_counter() - t0
    times = time_steps(models, x, y, args.steps)
    w_diff = max(float(np.abs(a - b).max()) for a, b in zip(plain.get_weights(), synced.get_weights()))
    device = "GPU" if tf.config.list_physical_devices("GPU") else f"CPU ({args.threads} threads)"
    n_bn = sum(isinstance(lay, keras.layers.BatchNormalization) for lay in synced.layers)
    print(f"# {where} on {device}; 2 modalities, input {'x'.join(map(str, shape))}, global batch "
          f"{args.batch}, {n_bn} BatchNorm layers, {args.steps} timed steps each (median)")
    print(f"{'BatchNorm':>13} {'s/step':>8} {'min':>8} {'1st step':>9}")
    for name in models:
        print(f"{name:>13} {statistics.median(times[name]):8.3f} {min(times[name]):8.3f} {first[name]:9.1f}")
    ratio = statistics.median(times["synchronized"]) / statistics.median(times["plain"])
    print(f"synchronized / plain step time: {ratio:.3f} (median), "
          f"{min(times['synchronized']) / min(times['plain']):.3f} (min)")
    print(f"max |difference| training-mode outputs before training: {out_diff:.3g}; "
          f"weights after {args.steps + 1} steps: {w_diff:.3g}")


if __name__ == "__main__":
    main()
