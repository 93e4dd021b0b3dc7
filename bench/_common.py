"""Shared set-up for the bench scripts (run as ``python bench/<name>.py``)."""
import os


def init_tensorflow(threads: int):
    """Limit TensorFlow (and OpenMP) to ``threads`` CPU threads; return the ``tf`` module."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return tf


def time_steps(models: dict, x, y, steps: int) -> dict[str, list[float]]:
    """Seconds per ``train_on_batch(x, y)`` of each model, the models alternating step by
    step (so load from other processes hits them alike); ``steps`` rounds."""
    import time

    times = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - t0)
    return times
