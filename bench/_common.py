"""Shared set-up for the bench scripts (run as ``python bench/<name>.py``)."""
import argparse
import os


def cluster_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the benches on synthetic clustered data (``--n`` subjects in
    ``--clusters`` clusters, ``--threads``); the description is ``doc``'s first line."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    return p


def limit_threads(threads: int) -> None:
    """OpenMP (numpy's BLAS, numba) to ``threads`` threads unless OMP_NUM_THREADS is set;
    call before numpy is imported."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def init_tensorflow(threads: int):
    """Limit TensorFlow (and OpenMP) to ``threads`` CPU threads; return the ``tf`` module."""
    limit_threads(threads)
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
