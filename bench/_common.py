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
