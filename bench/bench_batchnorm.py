"""BatchNormalization in training: Keras' layer vs mmfusion's fused BatchNorm3D, side by side.

At every (grid, channels) where the paper model (default config, 2 modalities) runs a
BatchNormalization, times forward+backward (min over interleaved repeats, batch 1,
float32, training=True) of ``keras.layers.BatchNormalization`` and
:class:`mmfusion.model.batchnorm.BatchNorm3D`, and the error of each one's float32
``gamma`` gradient against a float64 computation (upstream gradient uniform in [0, 1),
input uniform in [0, 1)). Also prints the step's total: the times weighted by how many
BatchNormalization layers the model has at each shape.

Usage: ``OMP_NUM_THREADS=2 python bench/bench_batchnorm.py [--threads 2] [--repeats 5]``.
"""
from __future__ import annotations

import argparse
import collections
import time

from _common import init_tensorflow  # bench/ is on sys.path


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args()


def _bn_shapes():
    """Counter {(d1, d2, d3, C): number of BatchNormalization layers} of the paper model."""
    from mmfusion.config import default_config
    from mmfusion.model.autoencoder import build_autoencoder
    import keras

    model = build_autoencoder(default_config()["model"], ["JAC", "NDI"])
    return collections.Counter(tuple(int(v) for v in layer.output.shape[1:])
                               for layer in model.layers
                               if isinstance(layer, keras.layers.BatchNormalization))


def main():
    args = _parse()
    tf = init_tensorflow(args.threads)
    import keras
    import numpy as np
    from mmfusion.model.batchnorm import BatchNorm3D

    shapes = _bn_shapes()
    rng = np.random.default_rng(0)
    print(f"# BatchNormalization forward+backward in training, batch 1, float32, "
          f"{args.threads} threads, min of {args.repeats}")
    print(f"{'grid x C':>18} {'layers':>6} {'keras ms':>9} {'fused ms':>9} {'speed-up':>8} "
          f"{'keras dgamma err':>16} {'fused dgamma err':>16}")
    total = {"keras": 0.0, "fused": 0.0}
    for shape, count in sorted(shapes.items(), key=lambda kv: -np.prod(kv[0])):
        x = tf.constant(rng.random((1, *shape), dtype=np.float32))
        dy = tf.constant(rng.random((1, *shape), dtype=np.float32))
        x64 = x.numpy().astype(np.float64).reshape(-1, shape[-1])
        xhat = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3)
        exact = (dy.numpy().astype(np.float64).reshape(-1, shape[-1]) * xhat).sum(0)
        steps, errors = {}, {}
        for name, cls in (("keras", keras.layers.BatchNormalization), ("fused", BatchNorm3D)):
            layer = cls()
            layer.build(x.shape)

            @tf.function
            def step(inp, layer=layer):
                with tf.GradientTape() as tape:
                    tape.watch(inp)
                    loss = tf.reduce_sum(layer(inp, training=True) * dy)
                return tape.gradient(loss, [inp, layer.gamma])

            errors[name] = float(np.abs(step(x)[1].numpy() - exact).max())
            steps[name] = step
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(x)[0].numpy()
                times[name].append(time.perf_counter() - t0)
        best = {name: min(t) * 1e3 for name, t in times.items()}
        for name in total:
            total[name] += best[name] * count
        label = "x".join(map(str, shape))
        print(f"{label:>18} {count:6d} {best['keras']:9.2f} {best['fused']:9.2f} "
              f"{best['keras'] / best['fused']:8.2f} {errors['keras']:16.3g} {errors['fused']:16.3g}")
    print(f"all BatchNormalization layers of one training step: keras {total['keras'] / 1e3:.3f} s, "
          f"fused {total['fused'] / 1e3:.3f} s ({total['keras'] / total['fused']:.2f}x)")


if __name__ == "__main__":
    main()
