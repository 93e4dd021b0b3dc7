"""Choice of the TensorFlow distribution strategy for training (one per process).

Read from the environment (``slurm/group.sbatch`` sets the ``MMFUSION_*`` ones, see
docs/hpc.md, "Several GPUs, several nodes")::

    MMFUSION_TF_STRATEGY   default | mirrored | multiworker; unset or empty: automatic
    MMFUSION_TF_PORT_BASE  first gRPC port of the workers under SLURM (default 8888)
    MMFUSION_NUM_GPUS      GPUs per node; only informs the automatic choice when set
    TF_CONFIG              a TensorFlow cluster spec (JSON); with more than one task it
                           means ``multiworker`` and gives the workers' addresses
    SLURM_JOB_NUM_NODES / SLURM_NNODES   more than one node means ``multiworker``
    MMFUSION_GPU_MEMORY_MB  a per-process memory limit on every visible GPU, so that several
                           training processes share one GPU without fighting over its memory
                           (``slurm/group.sbatch`` sets it when it packs N folds on a GPU;
                           TF_FORCE_GPU_ALLOW_GROWTH=true, TensorFlow's own switch, grows the
                           memory on demand instead; under the JAX backend the same role is
                           played by XLA_PYTHON_CLIENT_PREALLOCATE/XLA_PYTHON_CLIENT_MEM_FRACTION)

Automatic choice: ``multiworker`` when TF_CONFIG lists several tasks or the SLURM job
spans several nodes; ``mirrored`` when more than one GPU is visible; else ``default``.
``multiworker`` uses ``tf.distribute.MultiWorkerMirroredStrategy`` with the cluster
from TF_CONFIG when set, else ``SlurmClusterResolver(port_base=MMFUSION_TF_PORT_BASE)``.

A MultiWorkerMirroredStrategy must be created before any other TensorFlow op runs in
the process: call :func:`make_strategy` early (it is cached, later calls are free).

:func:`sync_batchnorm` decides whether BatchNormalization layers average their batch
statistics over all replicas (config key ``model.sync_batchnorm``).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Mapping

from mmfusion.errors import ConfigError
from mmfusion.runlog import get_logger

log = get_logger(__name__)
STRATEGY_ENV = "MMFUSION_TF_STRATEGY"
PORT_BASE_ENV = "MMFUSION_TF_PORT_BASE"
NUM_GPUS_ENV = "MMFUSION_NUM_GPUS"
GPU_MEMORY_ENV = "MMFUSION_GPU_MEMORY_MB"
STRATEGIES = ("default", "mirrored", "multiworker")
SYNC_BATCHNORM_KEY = "model.sync_batchnorm"
DEFAULT_PORT_BASE = 8888


def _tf_config_tasks(environ: Mapping[str, str]) -> int:
    """Number of tasks in TF_CONFIG's cluster (0 when unset)."""
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
        return sum(len(tasks) for tasks in cluster.values())
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"environment TF_CONFIG is not a valid cluster spec ({exc}); fix or unset it") from None


def _slurm_nodes(environ: Mapping[str, str]) -> int:
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        value = environ.get(key, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def strategy_name(environ: Mapping[str, str] | None = None, n_gpus: int | None = None) -> str:
    """'default', 'mirrored' or 'multiworker' (see the module docstring).

    ``n_gpus`` (visible GPUs) is looked up with TensorFlow only when it is needed.
    """
    environ = os.environ if environ is None else environ
    chosen = environ.get(STRATEGY_ENV, "").strip().lower()
    if chosen:
        if chosen not in STRATEGIES:
            raise ConfigError(f"environment {STRATEGY_ENV}={chosen!r}: use one of {', '.join(STRATEGIES)} or unset it")
        return chosen
    if _tf_config_tasks(environ) > 1 or _slurm_nodes(environ) > 1:
        return "multiworker"
    if n_gpus is None:
        declared = environ.get(NUM_GPUS_ENV, "").strip()
        n_gpus = int(declared) if declared.isdigit() else _visible_gpus()
    return "mirrored" if n_gpus > 1 else "default"


def _visible_gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def cluster_resolver(environ: Mapping[str, str] | None = None):
    """TFConfigClusterResolver when TF_CONFIG is set, else SlurmClusterResolver(port_base)."""
    import tensorflow as tf

    environ = os.environ if environ is None else environ
    resolvers = tf.distribute.cluster_resolver
    if environ.get("TF_CONFIG", "").strip():
        return resolvers.TFConfigClusterResolver()
    port = environ.get(PORT_BASE_ENV, "").strip() or str(DEFAULT_PORT_BASE)
    if not port.isdigit():
        raise ConfigError(f"environment {PORT_BASE_ENV}={port!r}: must be a port number")
    return resolvers.SlurmClusterResolver(port_base=int(port))


def _multiworker_class():
    """MultiWorkerMirroredStrategy whose ``reduce`` also accepts nests (dicts) of values.

    Keras 3.15's ``fit`` first reduces one data batch (``strategy.reduce('MEAN', batch)``)
    to build the model symbolically; with several workers TensorFlow's collective reduce
    takes one value only and fails on the autoencoder's dict inputs ("Attempt to convert
    a value ({'in_a': PerReplica ...}) with an unsupported type"). Reducing leaf by leaf
    is what the single-worker strategies do. Keras also reduces the per-step scalar
    losses with ``axis=0``, which fails on scalars ("Invalid reduction dimension 0 for
    input with 0 dimensions"); for scalars the reduction over replicas alone is meant.
    """
    import tensorflow as tf

    class NestedReduceMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            if isinstance(value, (dict, list, tuple)):
                parent = super()
                return tf.nest.map_structure(lambda v: parent.reduce(reduce_op, v, axis), value)
            if axis is not None and self.experimental_local_results(value)[0].shape.rank == 0:
                axis = None
            return super().reduce(reduce_op, value, axis)

    return NestedReduceMultiWorkerMirroredStrategy


def limit_gpu_memory(environ: Mapping[str, str] | None = None) -> int | None:
    """Apply ``MMFUSION_GPU_MEMORY_MB`` (one logical device of that many MB per visible GPU,
    before the GPUs are initialized); returns the limit, None when unset or without GPUs."""
    import tensorflow as tf

    environ = os.environ if environ is None else environ
    raw = environ.get(GPU_MEMORY_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"environment {GPU_MEMORY_ENV}={raw!r}: must be a positive number of MB")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=int(raw))])
    if gpus:
        log.info("GPU memory limited to %s MB per GPU for this process (%s)", raw, GPU_MEMORY_ENV)
    return int(raw) if gpus else None


def set_threads(threads: int | None) -> None:
    """TensorFlow's intra-op threads of this process (``--omp-nthreads``), before its runtime
    starts. Op determinism makes a run repeatable at a given thread count, not across thread
    counts: two runs that must agree bit for bit (the plain group level and its steps) need
    the same count."""
    import tensorflow as tf

    if not threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    except RuntimeError as exc:  # the runtime already started (e.g. several levels in one process)
        log.warning("TensorFlow threads not set to %s: %s", threads, exc)


@functools.lru_cache(maxsize=1)
def make_strategy():
    """The process's ``tf.distribute.Strategy`` (created once, then cached).

    default: ``tf.distribute.get_strategy()``; mirrored: ``MirroredStrategy()`` over
    the visible GPUs; multiworker: ``MultiWorkerMirroredStrategy`` (gRPC ring
    collectives between the workers, NCCL within a node's GPUs when there are GPUs).
    """
    import tensorflow as tf

    limit_gpu_memory()
    name = strategy_name()
    if name == "multiworker":
        resolver = cluster_resolver()
        strategy = _multiworker_class()(cluster_resolver=resolver)
        log.info("training with MultiWorkerMirroredStrategy: task %s/%s, %d replica(s) in sync",
                 resolver.task_type, resolver.task_id, strategy.num_replicas_in_sync)
        return strategy
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        log.info("training with MirroredStrategy on %d replica(s)", strategy.num_replicas_in_sync)
        return strategy
    return tf.distribute.get_strategy()


def task_info(strategy=None) -> tuple[str | None, int | None]:
    """(task_type, task_id) of this process in a multi-worker cluster, else (None, None)."""
    strategy = make_strategy() if strategy is None else strategy
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, None
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy=None) -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster.

    The chief is the task of type 'chief', or worker 0 when the cluster has no 'chief'.
    Only the chief writes outputs.
    """
    strategy = make_strategy() if strategy is None else strategy
    task_type, task_id = task_info(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def parse_sync_batchnorm(setting: bool | str | None) -> bool | str:
    """``config['model']['sync_batchnorm']`` -> True, False or ``"auto"`` (also for null).

    Strings are case-insensitive (``"True"``, ``"auto"``). Raises ConfigError otherwise.
    """
    if isinstance(setting, str) and setting.strip().lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[setting.strip().lower()]
    if isinstance(setting, bool):
        return setting
    if setting is not None:
        raise ConfigError(f"config {SYNC_BATCHNORM_KEY}={setting!r}: use auto (or null), true or false")
    return "auto"


def sync_batchnorm(setting: bool | str | None = "auto", strategy=None) -> bool:
    """Whether BatchNormalization layers are built with ``synchronized=True``.

    ``setting`` is ``config['model']['sync_batchnorm']``: ``None`` or ``"auto"`` (True when the
    strategy, by default the one whose scope is entered, has more than one replica in
    sync), ``True``/``"true"`` or ``False``/``"false"``. Synchronized layers all-reduce
    the per-channel sum, sum of squares and count over the replicas, so the statistics
    (and the moving mean/variance every replica updates) are those of the global batch.
    With one replica ``auto`` keeps the plain layer (two-pass variance): the
    synchronized layer would still use the one-pass E[x^2] - E[x]^2, which is not the
    same function to the last bit (``bench/bench_sync_batchnorm.py``: training-mode
    outputs differ by ~3e-5 on one CPU) and gains nothing. Raises ConfigError on any
    other value.
    """
    setting = parse_sync_batchnorm(setting)
    if isinstance(setting, bool):
        return setting
    import tensorflow as tf

    strategy = tf.distribute.get_strategy() if strategy is None else strategy
    return int(strategy.num_replicas_in_sync) > 1
