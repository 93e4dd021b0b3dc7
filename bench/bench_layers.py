"""Forward+backward time (min of interleaved repeats) of separable 3D convolutions at every shape of the paper model.

For each (grid, channels) where the paper model runs a ``sep conv`` (mid-flow blocks:
encoder C = filters[i], decoder C = 2*filters[i] after the skip concat) this prints,
measured side by side in one process (batch 1, float32, kernel 5x6x5, 'same', C->C):

* ``auto``/``fold``/``sliced``/``split``: :class:`mmfusion.model.layers.SeparableConv3D`
  with each implementation (``auto`` = what the layer picks, ``fold`` = "dense",
  depthwise and pointwise folded into one conv3d kernel);
* ``grp+pw``: ``keras.layers.Conv3D(C, groups=C)`` + pointwise ``Conv3D(C, 1)``;
* ``dense``: ``keras.layers.Conv3D(C)`` (C-fold more FLOPs than the depthwise part);

and the ratios ``grp+pw / auto`` and ``dense / auto`` (> 1 means ours is faster).

Usage: ``OMP_NUM_THREADS=2 python bench/bench_layers.py [--threads 2] [--repeats 3]
[--skip-grouped-above VOXELS]``.
"""
from __future__ import annotations

import argparse
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved rounds at the two largest grids (4x that below)")
    p.add_argument("--grouped-repeats", type=int, default=1,
                   help="repeats for the (slow) grouped conv at the two largest grids")
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--base", type=str, default="128,128,96")
    p.add_argument("--filters", type=str, default="2,4,8,16,32")
    return p.parse_args()


from _common import init_tensorflow  # noqa: E402  (bench/ is on sys.path)


def main():
    args = _parse()
    tf = init_tensorflow(args.threads)
    import keras
    import numpy as np
    from mmfusion.model.layers import SeparableConv3D, choose_implementation

    base = tuple(int(v) for v in args.base.split(","))
    filters = [int(v) for v in args.filters.split(",")]
    kernel = (5, 6, 5)
    cases = []
    for level in range(args.levels):
        grid = tuple(d // 2**level for d in base)
        for channels in (filters[level], 2 * filters[level]):
            cases.append((grid, channels))

    def make_step(layer, x):
        layer(x)  # build

        @tf.function
        def step(inp):
            with tf.GradientTape() as tape:
                tape.watch(inp)
                loss = tf.reduce_sum(layer(inp))
            return tape.gradient(loss, [inp] + layer.trainable_weights)

        step(x)  # trace + warm-up
        return step

    def interleaved(steps: dict, x, repeats: int, slow: set, slow_repeats: int) -> dict:
        """Time the contenders round-robin (so load from other processes hits all
        alike); return the min over rounds (the least disturbed run)."""
        def once(step, n):
            t0 = time.perf_counter()
            for _ in range(n):
                out = step(x)
            out[0].numpy()
            return (time.perf_counter() - t0) / n

        # calls per measurement so that one lasts >= 50 ms (ms-scale timings are noise)
        inner = {name: max(1, int(0.05 / max(once(step, 1), 1e-4))) for name, step in steps.items()}
        times = {name: [] for name in steps}
        for rnd in range(repeats):
            for name, step in steps.items():
                if name in slow and rnd >= slow_repeats:
                    continue
                times[name].append(once(step, inner[name]))
        return {name: min(v) for name, v in times.items()}

    device = "GPU" if tf.config.list_logical_devices("GPU") else f"CPU ({args.threads} threads)"
    print(f"# forward+backward seconds, batch 1, float32, kernel {kernel}, device {device}")
    head = f"{'grid':>13} {'C':>3} {'pick':>7} {'auto':>8} {'fold':>8} {'sliced':>8} {'split':>8} {'grp+pw':>8} {'dense':>8} {'grp/auto':>9} {'dense/auto':>10}"
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    for grid, channels in cases:
        x = tf.constant(rng.random((1,) + grid + (channels,), dtype=np.float32))
        voxels = grid[0] * grid[1] * grid[2]
        big = voxels >= 64 * 64 * 48
        rounds = args.repeats if big else 4 * args.repeats  # small grids: cheap, noisier
        grp_rep = args.grouped_repeats if big else rounds
        grouped = keras.Sequential([
            keras.layers.Conv3D(channels, kernel, padding="same", groups=channels),
            keras.layers.Conv3D(channels, 1),
        ])
        steps = {
            "auto": make_step(SeparableConv3D(channels, kernel), x),
            "fold": make_step(SeparableConv3D(channels, kernel, implementation="dense"), x),
            "sliced": make_step(SeparableConv3D(channels, kernel, implementation="sliced"), x),
            "split": make_step(SeparableConv3D(channels, kernel, implementation="split"), x),
            "grp": make_step(grouped, x),
            "dense": make_step(keras.layers.Conv3D(channels, kernel, padding="same"), x),
        }
        res = interleaved(steps, x, rounds, {"grp"}, grp_rep)
        pick = choose_implementation(x.shape, kernel, 1, channels)
        print(
            f"{'x'.join(map(str, grid)):>13} {channels:>3} {pick:>7} {res['auto']:8.3f} {res['fold']:8.3f} {res['sliced']:8.3f} "
            f"{res['split']:8.3f} {res['grp']:8.3f} {res['dense']:8.3f} "
            f"{res['grp'] / res['auto']:9.1f} {res['dense'] / res['auto']:10.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
