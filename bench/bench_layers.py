"""Forward+backward time (min of interleaved repeats) of separable 3D convolutions at every shape of the paper model.

For each (grid, channels) where the paper model runs a ``sep conv`` (mid-flow blocks:
encoder C = filters[i], decoder C = 2*filters[i] after the skip concat) this prints,
measured side by side in one process (batch 1, float32, kernel 5x6x5, 'same', C->C):

* ``auto``/``fold``/``sliced``/``split``/``numba``: :class:`mmfusion.model.layers.SeparableConv3D`
  with each implementation (``auto`` = what the layer picks, ``fold`` = "dense",
  depthwise and pointwise folded into one conv3d kernel; ``numba`` = numba kernels,
  CPU only: ``nan`` on GPU);
* ``grp+pw``: ``keras.layers.Conv3D(C, groups=C)`` + pointwise ``Conv3D(C, 1)``;
* ``dense``: ``keras.layers.Conv3D(C)`` (C-fold more FLOPs than the depthwise part);

and the ratios ``grp+pw / auto``, ``dense / auto`` and ``fold / numba`` (> 1 means the
latter is faster).

Usage: ``OMP_NUM_THREADS=2 python bench/bench_layers.py [--threads 2] [--repeats 3]
[--levels 5] [--skip grp,split]``.
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
    p.add_argument("--skip", type=str, default="",
                   help="comma-separated contenders not to run, e.g. 'grp,split' (shown as nan)")
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

    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    device = "GPU" if on_gpu else f"CPU ({args.threads} threads)"
    print(f"# forward+backward seconds, batch 1, float32, kernel {kernel}, device {device}")
    head = (f"{'grid':>13} {'C':>3} {'pick':>7} {'auto':>8} {'fold':>8} {'sliced':>8} {'split':>8} {'numba':>8} "
            f"{'grp+pw':>8} {'dense':>8} {'grp/auto':>9} {'dense/auto':>10} {'fold/numba':>10}")
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    for grid, channels in cases:
        x = tf.constant(rng.random((1,) + grid + (channels,), dtype=np.float32))
        voxels = grid[0] * grid[1] * grid[2]
        big = voxels >= 64 * 64 * 48
        rounds = args.repeats if big else 4 * args.repeats  # small grids: cheap, noisier
        grp_rep = args.grouped_repeats if big else rounds
        contenders = {
            "auto": lambda: SeparableConv3D(channels, kernel),
            "fold": lambda: SeparableConv3D(channels, kernel, implementation="dense"),
            "sliced": lambda: SeparableConv3D(channels, kernel, implementation="sliced"),
            "split": lambda: SeparableConv3D(channels, kernel, implementation="split"),
            "numba": lambda: SeparableConv3D(channels, kernel, implementation="numba"),
            "grp": lambda: keras.Sequential([
                keras.layers.Conv3D(channels, kernel, padding="same", groups=channels),
                keras.layers.Conv3D(channels, 1),
            ]),
            "dense": lambda: keras.layers.Conv3D(channels, kernel, padding="same"),
        }
        skip = set(filter(None, args.skip.split(","))) | ({"numba"} if on_gpu else set())
        steps = {name: make_step(build(), x) for name, build in contenders.items() if name not in skip}
        res = interleaved(steps, x, rounds, {"grp"}, grp_rep)
        res = {name: res.get(name, float("nan")) for name in contenders}
        pick = choose_implementation(x.shape, kernel, 1, channels)
        print(
            f"{'x'.join(map(str, grid)):>13} {channels:>3} {pick:>7} {res['auto']:8.3f} {res['fold']:8.3f} {res['sliced']:8.3f} "
            f"{res['split']:8.3f} {res['numba']:8.3f} {res['grp']:8.3f} {res['dense']:8.3f} "
            f"{res['grp'] / res['auto']:9.1f} {res['dense'] / res['auto']:10.2f} "
            f"{res['fold'] / res['numba']:10.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
