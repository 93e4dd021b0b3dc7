"""One training step of the paper-size autoencoder: separable vs dense mid-flow blocks.

Builds the default-config model (``mmfusion/defaults/model.yaml``: 128x128x96,
5 levels, filters 2..32, kernel 5x6x5) for 2 modalities twice, ``separable: true``
and ``separable: false``, compiles both (Adam, BCE summed over modalities), and times
``train_on_batch`` (batch 1), alternating the two models so load from other processes
hits both alike. Prints seconds/step (median), the ratio, parameters, the
multiply-adds of the convolutions in one forward pass (GMAC; the backward pass costs
about twice that) and their ratio, i.e. the step-time ratio if only convolution
arithmetic counted, and the peak
resident memory of each phase (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; Linux only).

``--extra fold,sliced`` adds separable models with those depthwise implementations
(``fold`` = "dense") to the same alternation; ``--floor`` adds one whose depthwise
convolution is replaced by a per-channel scale (no spatial taps): the step time the
separable model would have with a free depthwise convolution, i.e. a lower bound for
any depthwise kernel. ``--no-dropout`` adds a twin of every model with ``dropout: 0``
(suffix ``-nodrop``): what the shared Dropout layers cost each model. ``--keras-bn`` adds
a twin of the separable and the dense model built with Keras' own BatchNormalization
instead of the fused :class:`~mmfusion.model.batchnorm.BatchNorm3D` (suffix ``-kbn``).

Usage: ``OMP_NUM_THREADS=2 python bench/bench_train_step.py [--threads 2] [--steps 3]
[--input 128,128,96] [--implementation auto] [--extra fold] [--floor] [--no-dropout]
[--keras-bn]``.
"""
from __future__ import annotations

import argparse
import statistics
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after 1 warm-up)")
    p.add_argument("--input", type=str, default="128,128,96")
    p.add_argument("--implementation", type=str, default="auto",
                   help="depthwise implementation of the separable model")
    p.add_argument("--extra", type=str, default="",
                   help="comma-separated further depthwise implementations to time (fold = dense)")
    p.add_argument("--floor", action="store_true",
                   help="also time the separable model with a free depthwise conv (lower bound)")
    p.add_argument("--no-dropout", action="store_true",
                   help="also time every model with dropout 0 (suffix -nodrop)")
    p.add_argument("--keras-bn", action="store_true",
                   help="also time separable and dense with keras.layers.BatchNormalization (-kbn)")
    return p.parse_args()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


from _common import init_tensorflow, time_steps  # noqa: E402  (bench/ is on sys.path)


def forward_macs(model) -> int:
    """Multiply-adds of the convolutions in one forward pass of ``model`` at batch 1.

    Conv3D: voxels * taps * C_in * C_out; SeparableConv3D: voxels * taps * C_in * m
    (depthwise) + voxels * C_in * m * filters (pointwise); 'same' padding (output grid =
    input grid), padded taps counted (they are computed). The ``--floor`` model is counted
    like the separable one (its depthwise taps are not computed).
    """
    import math

    import keras
    from mmfusion.model.layers import SeparableConv3D

    total = 0
    for layer in model.layers:
        if not isinstance(layer, (SeparableConv3D, keras.layers.Conv3D)):
            continue
        voxels = math.prod(int(v) for v in layer.output.shape[1:4])
        c_in = int(layer.input.shape[-1])
        taps = math.prod(layer.kernel_size)
        if isinstance(layer, SeparableConv3D):
            mid = c_in * layer.depth_multiplier
            total += voxels * (taps * mid + mid * layer.filters)
        else:
            total += voxels * taps * c_in * layer.filters
    return total


def main():
    args = _parse()
    tf = init_tensorflow(args.threads)
    import numpy as np
    from mmfusion.config import default_config
    import keras
    from mmfusion.model import blocks
    from mmfusion.model.autoencoder import build_autoencoder, compile_autoencoder
    from mmfusion.model.batchnorm import BatchNorm3D

    shape = [int(v) for v in args.input.split(",")]
    mods = ["JAC", "NDI"]
    rng = np.random.default_rng(0)
    x = {f"in_{m}": rng.random((1, *shape, 1), dtype=np.float32) for m in mods}
    y = {f"rec_{m}": x[f"in_{m}"] for m in mods}

    variants = [("separable", True, args.implementation), ("dense", False, "auto")]
    for extra in filter(None, args.extra.split(",")):
        variants.append((f"sep-{extra}", True, "dense" if extra == "fold" else extra))
    if args.floor:
        from mmfusion.model import layers

        # per-channel scale instead of the depthwise conv: same graph minus the taps
        layers._FUNCS["floor"] = lambda x, kernel, padding: x * kernel[0, 0, 0, :, 0]
        layers.IMPLEMENTATIONS = layers.IMPLEMENTATIONS + ("floor",)
        variants.append(("sep-floor", True, "floor"))
    variants = [(name, separable, implementation, None, False)
                for name, separable, implementation in variants]
    if args.no_dropout:
        variants += [(f"{name}-nodrop", separable, implementation, 0.0, False)
                     for name, separable, implementation, _, _ in variants]
    if args.keras_bn:
        variants += [(f"{name}-kbn", separable, implementation, None, True)
                     for name, separable, implementation, _, _ in variants[:2]]
    models, peaks, first = {}, {}, {}
    for name, separable, implementation, dropout, keras_bn in variants:
        cfg = dict(default_config()["model"], input_shape=shape, separable=separable,
                   depthwise_implementation=implementation)
        if dropout is not None:
            cfg["dropout"] = dropout
        resettable = _reset_peak_rss()
        blocks.BatchNorm3D = keras.layers.BatchNormalization if keras_bn else BatchNorm3D
        models[name] = compile_autoencoder(build_autoencoder(cfg, mods), 1e-3)
        blocks.BatchNorm3D = BatchNorm3D
        t0 = time.perf_counter()
        models[name].train_on_batch(x, y)  # trace + warm-up
        first[name] = time.perf_counter() - t0
        peaks[name] = _peak_rss_gb() if resettable else float("nan")

    times = time_steps(models, x, y, args.steps)
    # peak of the whole run (both models alive) for reference
    overall = _peak_rss_gb()

    device = "GPU" if tf.config.list_logical_devices("GPU") else f"CPU ({args.threads} threads)"
    print(f"# one training step, batch 1, 2 modalities, input {'x'.join(map(str, shape))}, "
          f"kernel 5x6x5, device {device}, {args.steps} timed steps each (median)")
    print(f"{'mid-flow':>16} {'params':>10} {'s/step':>8} {'min':>8} {'1st step':>9} {'peak RSS GB':>12} {'GMAC fwd':>9}")
    for name, model in models.items():
        print(f"{name:>16} {model.count_params():>10d} {statistics.median(times[name]):8.2f} "
              f"{min(times[name]):8.2f} {first[name]:9.1f} {peaks[name]:12.2f} "
              f"{forward_macs(model) / 1e9:9.2f}")
    for name in models:
        base = next((f"dense{sfx}" for sfx in ("-nodrop", "-kbn") if name.endswith(sfx)), "dense")
        if name == base:
            continue
        ratio = statistics.median(times[name]) / statistics.median(times[base])
        ratio_min = min(times[name]) / min(times[base])
        macs = forward_macs(models[name]) / forward_macs(models[base])
        print(f"{name} / {base} step time: {ratio:.2f} (median), {ratio_min:.2f} (min); "
              f"convolution multiply-adds: {macs:.2f}")
    print(f"(peak RSS per phase = build + first step of that model; all models alive at "
          f"the end: {overall:.2f} GB)")


if __name__ == "__main__":
    main()
