"""One training step of the paper-size autoencoder: separable vs dense mid-flow blocks.

Builds the default-config model (``mmfusion/defaults/model.yaml``: 128x128x96,
5 levels, filters 2..32, kernel 5x6x5) for 2 modalities twice, ``separable: true``
and ``separable: false``, compiles both (Adam, BCE summed over modalities), and times
``train_on_batch`` (batch 1), alternating the two models so load from other processes
hits both alike. Prints seconds/step (median), the ratio, parameters, and the peak
resident memory of each phase (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; Linux only).

``--extra fold,sliced`` adds separable models with those depthwise implementations
(``fold`` = "dense") to the same alternation; ``--floor`` adds one whose depthwise
convolution is replaced by a per-channel scale (no spatial taps): the step time the
separable model would have with a free depthwise convolution, i.e. a lower bound for
any depthwise kernel.

Usage: ``OMP_NUM_THREADS=2 python bench/bench_train_step.py [--threads 2] [--steps 3]
[--input 128,128,96] [--implementation auto] [--extra fold] [--floor]``.
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


def main():
    args = _parse()
    tf = init_tensorflow(args.threads)
    import numpy as np
    from mmfusion.config import default_config
    from mmfusion.model.autoencoder import build_autoencoder, compile_autoencoder

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
    models, peaks, first = {}, {}, {}
    for name, separable, implementation in variants:
        cfg = dict(default_config()["model"], input_shape=shape, separable=separable,
                   depthwise_implementation=implementation)
        resettable = _reset_peak_rss()
        models[name] = compile_autoencoder(build_autoencoder(cfg, mods), 1e-3)
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
    print(f"{'mid-flow':>10} {'params':>10} {'s/step':>8} {'min':>8} {'1st step':>9} {'peak RSS GB':>12}")
    for name, model in models.items():
        print(f"{name:>10} {model.count_params():>10d} {statistics.median(times[name]):8.2f} "
              f"{min(times[name]):8.2f} {first[name]:9.1f} {peaks[name]:12.2f}")
    for name in models:
        if name == "dense":
            continue
        ratio = statistics.median(times[name]) / statistics.median(times["dense"])
        ratio_min = min(times[name]) / min(times["dense"])
        print(f"{name} / dense step time: {ratio:.2f} (median), {ratio_min:.2f} (min)")
    print(f"(peak RSS per phase = build + first step of that model; all models alive at "
          f"the end: {overall:.2f} GB)")


if __name__ == "__main__":
    main()
