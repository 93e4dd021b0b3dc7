"""Training throughput of the paper-size autoencoder on an accelerator, any Keras 3 backend.

For each configuration (mid-flow variant x dtype policy x batch size) this builds the
default-config model (``mmfusion/defaults/model.yaml``: 2 modalities, 128x128x96, 5 levels,
filters 2..32, kernel 5x6x5), compiles it exactly as the group level does
(``compile_autoencoder``: Adam 1e-3, BCE summed over modalities; Keras wraps the optimizer
in a ``LossScaleOptimizer`` under ``mixed_float16``), runs 2 warm-up steps (compilation,
autotuning) and times ``--steps`` calls of ``train_on_batch`` on random inputs in [0, 1].
``train_on_batch`` returns the loss as a host value, so every timed step is synchronized.
Prints seconds per step, subjects per second and the accelerator's peak memory.

A second table (``--layers``) times forward+backward of one ``SeparableConv3D`` per
(grid, channels) of the paper model for each depthwise implementation that runs on the
backend, to choose the GPU rule of ``mmfusion.model.layers.choose_implementation``.

Variants: ``separable`` (``depthwise_implementation: auto``), ``separable-grouped``
(``grouped``: one grouped convolution, cuDNN's depthwise kernels on GPU), ``dense`` (dense
Conv3D mid-flow blocks). Precisions: ``float32``, ``mixed_float16``, ``mixed_bfloat16``.

Usage: ``KERAS_BACKEND=jax python bench/bench_gpu_throughput.py [--steps 20]
[--configs separable:float32:1,dense:float32:1] [--layers] [--jsonl results.jsonl]``
(the backend is whatever ``KERAS_BACKEND`` selects; TensorFlow by default).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIGS = (
    "separable:float32:1,separable:mixed_float16:1,dense:float32:1,dense:mixed_float16:1,"
    "separable-grouped:float32:1,separable:mixed_bfloat16:1,separable:float32:4"
)
LAYER_CASES = ((128, 128, 96, 2), (128, 128, 96, 4), (64, 64, 48, 8), (32, 32, 24, 16),
               (16, 16, 12, 32), (8, 8, 6, 64))
MODALITIES = ("JAC", "NDI")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated variant:precision:batch triples")
    p.add_argument("--input", default="128,128,96")
    p.add_argument("--layers", action="store_true", help="also time single separable layers")
    p.add_argument("--jsonl", type=Path, help="append one JSON line per result here")
    return p.parse_args()


# ----------------------------------------------------------------------------- backend
def _backend_name() -> str:
    import keras

    return keras.backend.backend()


def _device_name() -> str:
    backend = _backend_name()
    if backend == "jax":
        import jax

        dev = jax.devices()[0]
        return f"{dev.platform}:{getattr(dev, 'device_kind', dev)}"
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return str(gpus[0]) if gpus else "cpu"


def _reset_peak() -> None:
    backend = _backend_name()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            tf.config.experimental.reset_memory_stats("GPU:0")


def _peak_gb() -> float:
    """Peak accelerator memory in GB (JAX: since process start; others: since the reset)."""
    backend = _backend_name()
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use", float("nan")) / 1e9
        if backend == "torch":
            import torch

            return torch.cuda.max_memory_allocated() / 1e9
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 1e9
    except Exception:  # noqa: BLE001 - CPU or a backend without memory stats
        return float("nan")


# ----------------------------------------------------------------------------- model bench
def _model_config(variant: str, shape) -> dict:
    from mmfusion.config import default_config

    cfg = dict(default_config()["model"], input_shape=list(shape))
    cfg["separable"] = variant != "dense"
    cfg["depthwise_implementation"] = "grouped" if variant == "separable-grouped" else "auto"
    cfg["sync_batchnorm"] = False  # one device; "auto" would query a TensorFlow strategy
    return cfg


def bench_model(variant: str, precision: str, batch: int, steps: int, shape) -> dict:
    """Time ``steps`` training steps of one configuration; return a result record."""
    import keras
    import numpy as np

    from mmfusion.model.autoencoder import build_autoencoder, compile_autoencoder

    keras.backend.clear_session()
    keras.config.set_dtype_policy(precision)
    _reset_peak()
    model = compile_autoencoder(build_autoencoder(_model_config(variant, shape), list(MODALITIES)))
    rng = np.random.default_rng(0)
    x = {f"in_{m}": rng.random((batch, *shape, 1), dtype=np.float32) for m in MODALITIES}
    y = {f"rec_{m}": x[f"in_{m}"] for m in MODALITIES}
    t0 = time.perf_counter()
    for _ in range(2):
        model.train_on_batch(x, y)
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    keras.config.set_dtype_policy("float32")
    step = statistics.median(times)
    return {
        "kind": "model", "variant": variant, "precision": precision, "batch": batch,
        "params": int(model.count_params()), "s_per_step": step, "s_min": min(times),
        "subjects_per_s": batch / step, "warmup_s": warmup, "peak_gb": _peak_gb(),
        "loss": float(np.asarray(loss if not isinstance(loss, (list, tuple)) else loss[0])),
    }


# ----------------------------------------------------------------------------- layer bench
def _implementations() -> tuple[str, ...]:
    return ("dense", "grouped", "sliced") if _backend_name() == "tensorflow" else ("dense", "grouped")


def bench_layer(case, implementation: str, repeats: int = 10) -> dict:
    """Forward+backward (one SGD step) of one SeparableConv3D, filters = channels."""
    import keras
    import numpy as np

    from mmfusion.model.layers import SeparableConv3D

    keras.backend.clear_session()
    *grid, channels = case
    inp = keras.Input(shape=(*grid, channels))
    out = SeparableConv3D(channels, (5, 6, 5), implementation=implementation)(inp)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(1e-6), loss="mse")
    x = np.random.default_rng(0).random((1, *grid, channels), dtype=np.float32)
    for _ in range(2):
        model.train_on_batch(x, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.train_on_batch(x, x)
        times.append(time.perf_counter() - t0)
    return {"kind": "layer", "grid": "x".join(map(str, grid)), "channels": channels,
            "implementation": implementation, "ms": 1e3 * statistics.median(times)}


# ----------------------------------------------------------------------------- main
def _emit(record: dict, jsonl: Path | None) -> None:
    if jsonl is not None:
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def main() -> None:
    args = _parse()
    shape = [int(v) for v in args.input.split(",")]
    print(f"# backend {_backend_name()}, device {_device_name()}, input {args.input}, "
          f"2 modalities, {args.steps} timed steps (median)", flush=True)
    print(f"{'variant':>18} {'precision':>15} {'batch':>5} {'params':>9} {'s/step':>8} "
          f"{'subj/s':>7} {'warm-up s':>9} {'peak GB':>8}", flush=True)
    for triple in args.configs.split(","):
        variant, precision, batch = triple.split(":")
        try:
            rec = bench_model(variant, precision, int(batch), args.steps, shape)
        except Exception as exc:  # noqa: BLE001 - report and go on (e.g. out of memory)
            print(f"{variant:>18} {precision:>15} {batch:>5} FAILED: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}", flush=True)
            continue
        _emit(rec, args.jsonl)
        print(f"{variant:>18} {precision:>15} {rec['batch']:>5} {rec['params']:>9} "
              f"{rec['s_per_step']:8.4f} {rec['subjects_per_s']:7.2f} {rec['warmup_s']:9.1f} "
              f"{rec['peak_gb']:8.2f}", flush=True)
    if not args.layers:
        return
    print("# one SeparableConv3D (filters = channels, kernel 5x6x5), forward+backward, ms (median)")
    impls = _implementations()
    print(f"{'grid':>12} {'C':>3} " + " ".join(f"{i:>9}" for i in impls), flush=True)
    for case in LAYER_CASES:
        row = []
        for impl in impls:
            try:
                rec = bench_layer(case, impl)
                _emit(rec, args.jsonl)
                row.append(f"{rec['ms']:9.2f}")
            except Exception as exc:  # noqa: BLE001
                row.append(f"{'ERR':>9}")
                print(f"# {case} {impl}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        print(f"{'x'.join(map(str, case[:3])):>12} {case[3]:>3} " + " ".join(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
