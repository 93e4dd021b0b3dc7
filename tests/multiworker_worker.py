"""Helper process for tests/test_multiworker.py: train the small autoencoder a few steps.

Usage: ``python tests/multiworker_worker.py OUT.npz (multiworker|reference)``.

multiworker: the strategy comes from :func:`mmfusion.learning.distribute.make_strategy` (TF_CONFIG
set by the test: 2 workers, 1 CPU replica each, per-worker batch 1); ``model.sync_batchnorm:
auto`` then builds synchronized BatchNormalization (statistics of the global batch).
reference: ONE process, the default strategy (one replica), the same global batch of 2;
``auto`` builds the plain BatchNormalization layer.

Writes OUT.npz: v<i> (model variable i, BatchNormalization moving statistics included),
o<i> (optimizer variable i: iterations, Adam moments), trainable (bool per model
variable), synchronized (the ``synchronized`` flag of every BatchNormalization layer),
moved / moved_stats (largest change of a trainable / non-trainable value during
training), loss (the epoch's mean
loss), chief (1 if this process is the chief), rec_<m> / embedding (inference outputs of
the trained model on the training inputs, (6, 16, 16, 12, 1) / (6, 192)). The chief also
saves the trained model as OUT.keras (``model.save``).
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
LEARNING_RATE = 1e-2
# Adam's epsilon (default 1e-7). The biases of the convolutions before a BatchNorm have a
# gradient that is 0 up to rounding (~1e-8 here); Adam divides it by its own magnitude,
# so with 1e-7 their steps are rounding noise of size ~lr and differ between any two
# ways of summing the same numbers. 1e-4 scales those steps down 1000x and leaves the
# other weights' steps (gradients >> 1e-4) as they are.
ADAM_EPSILON = 1e-4


def make_strategy(mode: str):
    import tensorflow as tf

    if mode == "multiworker":
        from mmfusion.learning.distribute import make_strategy as from_env

        return from_env()
    return tf.distribute.get_strategy()


def synthetic_data():
    """(inputs, targets): {in_<m>: (STEPS*GLOBAL_BATCH, 16, 16, 12, 1)} in [0, 1]."""
    import numpy as np

    rng = np.random.default_rng(7)
    n = STEPS * GLOBAL_BATCH
    vols = {m: rng.uniform(0.05, 0.95, (n, *MODEL_CFG["input_shape"], 1)).astype(np.float32) for m in MODALITIES}
    return {f"in_{m}": v for m, v in vols.items()}, {f"rec_{m}": v for m, v in vols.items()}


def _local_value(strategy, var):
    """The variable's value on this process (one replica per process in both modes)."""
    import numpy as np

    local = strategy.experimental_local_results(getattr(var, "value", var))
    assert len(local) == 1, f"{var.path}: {len(local)} local replicas, expected 1"
    return np.asarray(local[0].numpy())


def main(out_path: str, mode: str) -> None:
    strategy = make_strategy(mode)  # first: MultiWorkerMirroredStrategy must precede other TF ops
    import keras
    import numpy as np
    import tensorflow as tf

    from mmfusion.learning.distribute import is_chief
    from mmfusion.model.autoencoder import build_autoencoder, compile_autoencoder, embedding_model

    tf.config.experimental.enable_op_determinism()
    keras.config.disable_traceback_filtering()
    inputs, targets = synthetic_data()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(GLOBAL_BATCH).with_options(options)
    with strategy.scope():
        keras.utils.set_random_seed(SEED)
        model = build_autoencoder({**MODEL_CFG, "sync_batchnorm": "auto"}, MODALITIES)
        compile_autoencoder(model, LEARNING_RATE)
        model.optimizer.epsilon = ADAM_EPSILON
    initial = [np.asarray(v.numpy()) for v in model.variables]
    history = model.fit(dataset, epochs=1, steps_per_epoch=STEPS, shuffle=False, verbose=0)
    arrays = {f"v{i:05d}": _local_value(strategy, var) for i, var in enumerate(model.variables)}
    arrays.update({f"o{i:05d}": _local_value(strategy, var) for i, var in enumerate(model.optimizer.variables)})
    arrays["trainable"] = np.asarray([var.trainable for var in model.variables])
    arrays["synchronized"] = np.asarray([layer.synchronized for layer in model.layers
                                         if isinstance(layer, keras.layers.BatchNormalization)])
    change = [float(np.abs(np.asarray(v.numpy()) - w0).max()) for v, w0 in zip(model.variables, initial)]
    arrays["moved"] = np.asarray(max(c for c, v in zip(change, model.variables) if v.trainable))
    arrays["moved_stats"] = np.asarray(max(c for c, v in zip(change, model.variables) if not v.trainable))
    arrays["loss"] = np.asarray(history.history["loss"], np.float64)
    arrays["chief"] = np.asarray(int(is_chief(strategy)))
    arrays.update({k: np.asarray(v) for k, v in model(inputs, training=False).items()})
    arrays["embedding"] = np.asarray(embedding_model(model)(inputs, training=False))
    if arrays["chief"]:
        model.save(out_path + ".tmp.keras")
        os.replace(out_path + ".tmp.keras", out_path[: -len(".npz")] + ".keras")
    np.savez(out_path + ".tmp.npz", **arrays)
    os.replace(out_path + ".tmp.npz", out_path)
    print(f"{mode}: {strategy.num_replicas_in_sync} replicas, loss {arrays['loss']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
