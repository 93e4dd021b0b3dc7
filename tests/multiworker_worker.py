"""Helper process for tests/test_multiworker.py: train the small autoencoder a few steps.

Usage: ``python tests/multiworker_worker.py OUT.npz (multiworker|reference)``.

multiworker: the strategy comes from :func:`mmfusion.distribute.make_strategy` (TF_CONFIG
set by the test: 2 workers, 1 CPU replica each, per-worker batch 1).
reference: ONE process, ``MirroredStrategy`` over 2 logical CPU devices, so that the
global batch (2) is split into the same per-replica batches (1) as with 2 workers. The
split matters: BatchNormalization normalizes with per-replica batch statistics, so a
plain batch-2 step is a different function; the gradients are then summed over replicas
and divided by the global batch in both runs.

Writes OUT.npz: v<i>_r<r> (model variable i as held by local replica r; variables such
as BatchNormalization's moving statistics are per replica), trainable (bool per
variable), moved (largest change of a trainable value during training), loss (the epoch's mean loss) and chief (1 if this process is the chief).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

SEED = 1234
STEPS = 3
GLOBAL_BATCH = 2
MODEL_CFG = {"input_shape": [16, 16, 12], "levels": 2, "filters": [2, 4], "kernel_size": [3, 3, 3],
             "embedding_filters": 4, "skip_connections": True, "separable": True, "dropout": 0.0, "l2": 5e-5}
MODALITIES = ["a"]


def make_strategy(mode: str):
    import tensorflow as tf

    if mode == "multiworker":
        from mmfusion.distribute import make_strategy as from_env

        return from_env()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def synthetic_data():
    """(inputs, targets): {in_<m>: (STEPS*GLOBAL_BATCH, 16, 16, 12, 1)} in [0, 1]."""
    import numpy as np

    rng = np.random.default_rng(7)
    n = STEPS * GLOBAL_BATCH
    vols = {m: rng.uniform(0.05, 0.95, (n, *MODEL_CFG["input_shape"], 1)).astype(np.float32) for m in MODALITIES}
    return {f"in_{m}": v for m, v in vols.items()}, {f"rec_{m}": v for m, v in vols.items()}


def main(out_path: str, mode: str) -> None:
    strategy = make_strategy(mode)  # first: MultiWorkerMirroredStrategy must precede other TF ops
    import keras
    import numpy as np
    import tensorflow as tf

    from mmfusion.distribute import is_chief
    from mmfusion.model.autoencoder import build_autoencoder, compile_autoencoder

    tf.config.experimental.enable_op_determinism()
    keras.config.disable_traceback_filtering()
    inputs, targets = synthetic_data()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(GLOBAL_BATCH).with_options(options)
    with strategy.scope():
        keras.utils.set_random_seed(SEED)
        model = build_autoencoder(MODEL_CFG, MODALITIES)
        compile_autoencoder(model, 1e-2)
    initial = [np.asarray(v.numpy()) for v in model.trainable_variables]
    history = model.fit(dataset, epochs=1, steps_per_epoch=STEPS, shuffle=False, verbose=0)
    arrays = {}
    for i, var in enumerate(model.variables):
        for r, local in enumerate(strategy.experimental_local_results(var.value)):
            arrays[f"v{i:05d}_r{r}"] = np.asarray(local.numpy())
    arrays["trainable"] = np.asarray([var.trainable for var in model.variables])
    arrays["moved"] = np.asarray(max(float(np.abs(np.asarray(v.numpy()) - w0).max())
                                     for v, w0 in zip(model.trainable_variables, initial)))
    arrays["loss"] = np.asarray(history.history["loss"], np.float64)
    arrays["chief"] = np.asarray(int(is_chief(strategy)))
    np.savez(out_path + ".tmp.npz", **arrays)
    os.replace(out_path + ".tmp.npz", out_path)
    print(f"{mode}: {strategy.num_replicas_in_sync} replicas, loss {arrays['loss']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
