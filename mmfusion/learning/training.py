"""Group-level learning: normalization, k-fold CV, final model, embeddings, reconstructions.

Entry point: :func:`learn` (called by :func:`mmfusion.levels.group.run_learning`); it
returns the ids and float32 embeddings of every shard in memory, with the paths of what
it wrote. Outputs, all under ``output_dir/group``::

    cv/folds.tsv                  subject, session, fold (held-out fold of each shard)
    cv/metrics_{mse,normdiff,cnr}.tsv   subject, session, fold, modality, variant, value
    cv/summary.tsv                metric, modality, variant, median and MAD across folds
    cv/training_curves.tsv        model, epoch, loss, val_loss, per-modality losses
    cv/fold_embeddings.h5         every shard embedded by each fold's model (k, n, D) and by
                                  each fold's PCA baseline (k, n, c): the stability analysis
    figures/cv_<metric>.png, figures/training_curves.png, figures/reconstructions.png
    model/final.keras, final.weights.h5, normalization.json, model.json
    checkpoints/<fold-01|final>/<variant>/{state.json, variables.npz, best.npz}
    embeddings.tsv                participant_id, session, emb_0000 .. emb_<D-1> (%.9g: exact float32)
    embeddings.h5                 participant_id (n,), session (n,), embedding (n, D) float32
    baseline/embeddings.tsv       participant_id, session, emb_0000 .. : PCA scores of the
                                  normalized images (mmfusion.learning.baseline), fitted on all shards
    reconstructions/<key>_desc-{real,rec}_<modality>.nii.gz  (normalized [0, 1] scale)

Variants: ``with_skips`` is the configured model (U-Net skips on). ``embedding_only``
is a SEPARATE model trained without skips on the same fold, data order and
normalization (``evaluation.embedding_only: true``): a decoder trained with skips and
fed zeros instead at inference is out of its training distribution and would
understate what the embedding carries, so a skip-free model is the fair measure.
If ``model.skip_connections`` is false the configured model is itself embedding-only
and is reported once, as ``embedding_only``.

Determinism and resume: each model gets its own seed derived from ``--seed`` and its
label (``fold-01/with_skips``), set with ``keras.utils.set_random_seed`` right before it
is built, with ``tf.config.experimental.enable_op_determinism()``; the subject order of
every epoch is a function of (seed, epoch) (:func:`mmfusion.learning.shard_data.epoch_orders`). After
every epoch all model variables (weights, BatchNorm statistics, dropout seed states)
and all optimizer variables are saved; ``--resume`` restores them and continues, so on
CPU the final weights equal those of an uninterrupted run (bit for bit across processes
only with ``TF_ENABLE_ONEDNN_OPTS=0``: oneDNN's default mode may order reductions by
thread timing, and one run on a heavily loaded machine differed in the last bits
without it). A fold whose metrics were
written is not redone. Checkpoints from another config/seed/subject set are refused.
For tests, the environment variable ``MMFUSION_KILL_AFTER_EPOCHS=N`` makes the process
SIGKILL itself right after the N-th epoch checkpoint of this process, and
``MMFUSION_SIGNAL_AT_EPOCH=N`` makes it send itself SIGUSR1 as its N-th epoch begins, and
``MMFUSION_HOLD_AT_EPOCH=N`` makes the model's epoch N (counted from the start of training,
so a resumed run does not hold again) wait, up to 10 min, for a stop signal from outside.

Steps (``group --step``, docs/hpc.md): :func:`learn` runs everything in one process; the
same work also runs as independent steps, in separate processes or nodes, each resumable
and writing its outputs atomically: :func:`train_fold_step` (one CV fold, all its
variants; done when ``checkpoints/fold-NN/metrics.json`` holds the fold's hash),
:func:`train_final_step` (the final model; done when ``checkpoints/final/complete.json``
holds its hash) and :func:`finish_from_disk` (the CV tables, fold embeddings, embeddings,
baseline and reconstructions from the steps' files; it refuses with exit 66 while a fold
or the final model is unfinished). Each training step fits its own normalizer on its own
training shards, as :func:`learn` does. The results equal :func:`learn`'s bit for bit on
CPU (same seed; ``TF_ENABLE_ONEDNN_OPTS=0`` as above).

Signals: during training (:func:`stop_on_signals`), SIGUSR1 or SIGTERM lets the current
epoch finish and checkpoint, then ends the run with :class:`TrainingInterrupted` (exit 85),
so that a SLURM job warned before its time limit can requeue itself and continue with
``--resume``; a signal outside an epoch ends the run at once (the last checkpoint stands).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mmfusion.learning import shard_data
from mmfusion.learning import metrics
from mmfusion.report import figures
from mmfusion.io.atomic import atomic_path, write_json, write_text
from mmfusion.io.embeddings import write_embeddings_h5, write_embeddings_tsv, write_ids
from mmfusion.config import config_hash
from mmfusion.errors import MissingInputError, StaleOutputError, TrainingDiverged, TrainingInterrupted
from mmfusion.learning.intensity import PopulationNormalizer
from mmfusion.runlog import get_logger, progress

log = get_logger(__name__)
KILL_ENV = "MMFUSION_KILL_AFTER_EPOCHS"
SIGNAL_ENV = "MMFUSION_SIGNAL_AT_EPOCH"
HOLD_ENV = "MMFUSION_HOLD_AT_EPOCH"
_epochs_this_process = 0
#: Signals that stop training after the current epoch's checkpoint (:func:`stop_on_signals`).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_stop = {"signal": None, "in_epoch": False}


# ----------------------------------------------------------------------------- signals
@contextlib.contextmanager
def stop_on_signals():
    """While in this block, SIGUSR1/SIGTERM stop training (main thread only; elsewhere a no-op).

    Inside an epoch the handler only records the signal: the epoch ends, is checkpointed,
    and :class:`TrainingInterrupted` (exit 85) is raised after it. Outside an epoch
    (evaluation, embeddings) it raises :class:`TrainingInterrupted` at once; the last
    completed epoch's checkpoint is on disk either way. The previous handlers are put
    back on leaving.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop.update(signal=None, in_epoch=False)


def _on_stop_signal(signum, frame) -> None:
    _stop["signal"] = signal.Signals(signum).name
    log.warning("%s received: stopping after the current epoch's checkpoint", _stop["signal"])
    if not _stop["in_epoch"]:
        _raise_interrupted()


def _hold_for_stop_signal(epoch: int, limit_s: float = 600.0) -> None:
    """Test hook: wait inside an epoch until a stop signal arrives (or ``limit_s`` passes)."""
    log.warning("%s: epoch %d waits for a stop signal (test hook)", HOLD_ENV, epoch)
    deadline = time.monotonic() + limit_s
    while not _stop["signal"] and time.monotonic() < deadline:
        time.sleep(0.1)


def _raise_interrupted(label: str = "") -> None:
    where = f" after {label}'s checkpoint" if label else ""
    raise TrainingInterrupted(f"training stopped by {_stop['signal']}{where}; rerun the same command with "
                              "--resume to continue from the last completed epoch")


# ----------------------------------------------------------------------------- setup
def model_seed(seed: int, label: str) -> int:
    """A per-model seed from the run seed and the model's label (order-independent)."""
    return (int(seed) * 1_000_003 + zlib.crc32(label.encode())) % (2**31 - 1)


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; make TF ops deterministic."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def distribution_strategy():
    """The process's strategy, :func:`mmfusion.learning.distribute.make_strategy` (cached there).

    Without ``MMFUSION_TF_STRATEGY``/TF_CONFIG/a multi-node SLURM job: MirroredStrategy
    over all GPUs when there are several, else the default strategy. One per process
    (models cached across folds must live in the same strategy).
    """
    from mmfusion.learning.distribute import make_strategy

    return make_strategy()


def _worker_group_dir(group_dir: Path, resume: bool) -> Path:
    """``group_dir`` for the chief; a private temporary folder for other workers.

    Non-chief workers of a multi-worker run compute the same things but must not write
    under the output folder. With ``resume`` they start from a copy of the chief's
    checkpoints (shared file system), so that all workers resume at the same epoch.
    """
    import shutil
    import tempfile

    from mmfusion.learning.distribute import is_chief, task_info

    if is_chief():
        return group_dir
    task_type, task_id = task_info()
    private = Path(tempfile.mkdtemp(prefix=f"mmfusion-{task_type}{task_id}-"))
    if resume and (group_dir / "checkpoints").is_dir():
        shutil.copytree(group_dir / "checkpoints", private / "checkpoints")
    log.info("%s %s is not the chief: its outputs go to %s", task_type, task_id, private)
    return private


def _set_precision(mixed: bool) -> None:
    import keras
    import tensorflow as tf

    if mixed and not tf.config.list_physical_devices("GPU"):
        log.warning("training.mixed_precision ignored: no GPU")
        mixed = False
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")


# ----------------------------------------------------------------------- checkpoints
def _variables_to_arrays(variables) -> dict[str, np.ndarray]:
    return {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(variables)}


def _assign(variables, arrays) -> None:
    keys = sorted(arrays.files if hasattr(arrays, "files") else arrays)
    if len(keys) != len(variables):
        raise StaleOutputError(f"checkpoint holds {len(keys)} variables, model has {len(variables)}; "
                               "rerun without --resume")
    for var, key in zip(variables, keys):
        var.assign(arrays[key])


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _all_variables(model) -> list:
    return list(model.variables) + list(model.optimizer.variables)


@dataclass
class FitResult:
    """A trained model and its per-epoch history (list of {'epoch', 'loss', ...})."""

    model: object
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    complete: bool = True


class _Checkpointer:
    """Per-epoch checkpoint, early stopping and logging for one model (a Keras callback)."""

    def __init__(self, ckpt_dir: Path, label: str, run_hash: str, epochs: int, patience: int,
                 monitor: str, history: list[dict], best: float, wait: int, stop_after: int | None):
        import keras

        outer = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.started = time.monotonic()
                _stop["in_epoch"] = True
                at = os.environ.get(SIGNAL_ENV)
                if at and _epochs_this_process + 1 == int(at):
                    log.warning("%s=%s: sending SIGUSR1 to this process (test hook)", SIGNAL_ENV, at)
                    os.kill(os.getpid(), signal.SIGUSR1)
                hold = os.environ.get(HOLD_ENV)
                if hold and epoch + 1 == int(hold):
                    _hold_for_stop_signal(epoch + 1)

            def on_epoch_end(self, epoch, logs=None):
                try:
                    outer.epoch_end(self.model, epoch, logs or {})
                finally:
                    _stop["in_epoch"] = False

            def on_train_end(self, logs=None):
                _stop["in_epoch"] = False

        self.callback = _Callback()
        self.dir, self.label, self.run_hash = ckpt_dir, label, run_hash
        self.epochs, self.patience, self.monitor = epochs, patience, monitor
        self.history, self.best, self.wait = history, best, wait
        self.stop_after, self.trained, self.stopped_early = stop_after, 0, False
        self.interrupted = False
        self.started = time.monotonic()

    def epoch_end(self, model, epoch: int, logs: dict) -> None:
        global _epochs_this_process
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        bad = [k for k, v in record.items() if not np.isfinite(v)]
        if bad:  # stop now, keep the last good checkpoint: the remaining epochs would be wasted
            model.stop_training = True
            raise TrainingDiverged(
                f"{self.label} epoch {epoch + 1}: {', '.join(bad)} is NaN/Inf, the model diverged; "
                "check the shards and the training curves in the log, lower training.learning_rate in --config")
        self.history.append(record)
        value = record.get(self.monitor, float("nan"))
        if value < self.best:
            self.best, self.wait = value, 0
            if self.patience:
                _save_npz(self.dir / "best.npz", _variables_to_arrays(model.variables))
        else:
            self.wait += 1
        if self.patience and self.wait >= self.patience:
            self.stopped_early = True
            model.stop_training = True
        _save_npz(self.dir / "variables.npz", _variables_to_arrays(_all_variables(model)))
        self.write_state(done=False)
        losses = " ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "epoch")
        log.info("%s epoch %d/%d: %s (%.1f s)", self.label, epoch + 1, self.epochs, losses,
                 time.monotonic() - self.started)
        self.trained += 1
        _epochs_this_process += 1
        kill_after = os.environ.get(KILL_ENV)
        if kill_after and _epochs_this_process >= int(kill_after):
            log.warning("%s=%s: killing this process after the checkpoint (test hook)", KILL_ENV, kill_after)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.stop_after is not None and self.trained >= self.stop_after:
            model.stop_training = True
        if _stop["signal"]:
            self.interrupted = True
            model.stop_training = True

    def write_state(self, done: bool) -> None:
        write_json(self.dir / "state.json", {
            "label": self.label, "run_hash": self.run_hash, "epoch": len(self.history),
            "history": self.history, "best": self.best, "wait": self.wait,
            "stopped_early": self.stopped_early, "done": done,
        })


def _read_state(ckpt_dir: Path, run_hash: str, resume: bool) -> dict | None:
    path = ckpt_dir / "state.json"
    if not resume or not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("run_hash") != run_hash:
        raise StaleOutputError(
            f"{path}: checkpoint made with another config, seed, modalities or subject set; "
            "rerun without --resume to start over")
    return state


# -------------------------------------------------------------------------- fitting
@dataclass
class TrainingData:
    """What a model is trained on: shard paths, modalities and the fitted normalizer."""

    train: list[Path]
    val: list[Path]
    modalities: list[str]
    normalizer: PopulationNormalizer
    shape: tuple[int, int, int]


def fit_autoencoder(build: Callable[[], object], data: TrainingData, train_cfg: dict, ckpt_dir: Path,
                    seed: int, label: str, run_hash: str, resume: bool = False,
                    stop_after_epochs: int | None = None, cache: dict | None = None,
                    cache_key: str = "model") -> FitResult:
    """Train (or resume) one autoencoder, checkpointing every epoch into ``ckpt_dir``.

    ``build()`` returns an uncompiled Keras model with inputs ``in_<m>`` and outputs
    ``rec_<m>``; it is compiled here (BCE summed over modalities, Adam) inside the
    distribution strategy. ``seed`` seeds weights, dropout and the data order.
    ``stop_after_epochs`` stops after that many epochs in this call (checkpoint kept,
    ``complete=False``), as an interrupted run would. Early stopping
    (``early_stopping_patience`` > 0) monitors ``val_loss`` (``loss`` without a
    validation set) and restores the best weights.

    ``cache`` (a dict kept by the caller) reuses one compiled model per ``cache_key``
    across calls: the freshly built model's initial variables are copied into it, so
    results equal a fresh model's while Keras traces the train step only once (the
    trace of the full model costs minutes; it would otherwise recur per fold).
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    strategy = distribution_strategy()  # first: a multi-worker strategy must precede other TF ops
    state = _read_state(ckpt_dir, run_hash, resume)
    set_determinism(seed)
    model = _compiled_model(build, train_cfg, strategy, cache, cache_key,
                            ckpt_dir / "variables.npz" if state is not None else None)
    if state and (state["done"] or state.get("stopped_early")):
        log.info("%s: already trained (%d epochs), loaded from %s", label, state["epoch"], ckpt_dir)
        return FitResult(model, list(state["history"]), bool(state.get("stopped_early")))
    ckpt = _resume_checkpointer(ckpt_dir, label, run_hash, train_cfg, bool(data.val), state, stop_after_epochs)
    if _stop["signal"]:
        _raise_interrupted()
    start = len(ckpt.history)
    _train_epochs(model, data, int(train_cfg["batch_size"]), ckpt.epochs, start, seed, ckpt)
    result = _end_fit(model, ckpt)
    if ckpt.interrupted and not result.complete:
        _raise_interrupted(f"{label} epoch {len(ckpt.history)}")
    return result


def _resume_checkpointer(ckpt_dir: Path, label: str, run_hash: str, train_cfg: dict, validated: bool,
                         state: dict | None, stop_after_epochs: int | None) -> _Checkpointer:
    """The checkpointer of one fit, carrying on from ``state`` (a resumed run) when given."""
    epochs, patience = int(train_cfg["epochs"]), int(train_cfg["early_stopping_patience"])
    history = list(state["history"]) if state else []
    if history:
        log.info("%s: resuming at epoch %d/%d from %s", label, len(history) + 1, epochs, ckpt_dir)
    return _Checkpointer(ckpt_dir, label, run_hash, epochs, patience, "val_loss" if validated else "loss",
                         history, float(state["best"]) if state else float("inf"),
                         int(state["wait"]) if state else 0, stop_after_epochs)


def _end_fit(model, ckpt: _Checkpointer) -> FitResult:
    """After the epochs: the best weights back on early stopping, the final state written."""
    complete = len(ckpt.history) >= ckpt.epochs or ckpt.stopped_early
    if ckpt.stopped_early:
        log.info("%s: early stopping after epoch %d; restoring the best weights", ckpt.label, len(ckpt.history))
        with np.load(ckpt.dir / "best.npz") as arrays:
            _assign(model.variables, arrays)
    ckpt.write_state(done=complete)
    return FitResult(model, ckpt.history, ckpt.stopped_early, complete)


def _compiled_model(build: Callable[[], object], train_cfg: dict, strategy, cache: dict | None,
                    cache_key: str, variables: Path | None):
    """Build and compile the model inside ``strategy`` (the cached compiled model, given the
    fresh one's initial variables, when ``cache`` holds one for ``cache_key``), then load
    the checkpointed ``variables`` (npz) when resuming."""
    from mmfusion.model.autoencoder import compile_autoencoder

    _set_precision(bool(train_cfg["mixed_precision"]))
    with strategy.scope():
        model = build()
        compile_autoencoder(model, float(train_cfg["learning_rate"]))
        model.optimizer.build(model.trainable_variables)
        if cache is not None:
            cached = cache.setdefault(cache_key, model)
            if cached is not model:
                for dst, src in zip(_all_variables(cached), _all_variables(model)):
                    dst.assign(src)
                model = cached
        if variables is not None:
            with np.load(variables) as arrays:
                _assign(_all_variables(model), arrays)
    _set_precision(False)
    return model


def _train_epochs(model, data: TrainingData, batch: int, epochs: int, start: int, seed: int,
                  ckpt: _Checkpointer) -> None:
    """Epochs ``start`` .. ``epochs`` - 1 of ``model.fit``, each in its seeded subject order;
    ``ckpt.callback`` checkpoints every epoch (and may stop early)."""
    n_batches = -(-len(data.train) // batch)
    orders = shard_data.epoch_orders(len(data.train), epochs, seed)[start:]
    if not len(orders):
        return
    train_ds = shard_data.make_dataset(data.train, data.modalities, data.normalizer, data.shape, batch, orders)
    val_ds = (shard_data.make_dataset(data.val, data.modalities, data.normalizer, data.shape, batch)
              if data.val else None)
    model.fit(train_ds, epochs=epochs, initial_epoch=start, steps_per_epoch=n_batches,
              validation_data=val_ds, validation_steps=-(-len(data.val) // batch) if data.val else None,
              callbacks=[ckpt.callback], shuffle=False, verbose=0)


# ------------------------------------------------------------------------ evaluation
def reconstruct(model, volumes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` on one subject's normalized volumes {m: (X, Y, Z)} -> {m: (X, Y, Z)}."""
    inputs = {f"in_{m}": v[None, ..., None] for m, v in volumes.items()}
    out = model(inputs, training=False)  # eager: no predict-function trace per model
    return {m: np.asarray(out[f"rec_{m}"], np.float32)[0, ..., 0] for m in volumes}


def evaluate_subject(models: dict[str, object], info: shard_data.ShardInfo, modalities: Sequence[str],
                     normalizer: PopulationNormalizer, eval_cfg: dict, seed: int, fold: int) -> list[dict]:
    """Metric rows for one held-out subject: one per (variant, modality, metric)."""
    real = shard_data.load_subject(info.path, modalities, normalizer)
    mask = shard_data.read_mask(info.path) if eval_cfg["background"] == "mask" else None
    roi = tuple(eval_cfg["roi_shape"])
    thr = float(eval_cfg["background_threshold"])
    rows = []
    for variant, model in models.items():
        rec = reconstruct(model, real)
        for m in modalities:
            bg_pairs = metrics.background_mask(real[m], real[m], mask, eval_cfg["background"], thr)
            pairs = metrics.sample_roi_pairs(bg_pairs, roi, int(eval_cfg["cnr_pairs"]), seed, f"{info.key}_{m}")
            bg = metrics.background_mask(real[m], rec[m], mask, eval_cfg["background"], thr)
            for metric, value in metrics.image_metrics(real[m], rec[m], bg, pairs, roi).items():
                rows.append({"metric": metric, "subject": f"sub-{info.subject}", "session": info.session,
                             "fold": fold, "modality": m, "variant": variant, "value": value})
    return rows


def make_folds(infos: Sequence[shard_data.ShardInfo], k: int, seed: int) -> list[np.ndarray]:
    """Fold number (1..k) of every shard; all sessions of a subject share a fold (KFold, seeded)."""
    from sklearn.model_selection import KFold

    subjects = sorted({i.subject for i in infos})
    fold_of = {}
    for f, (_, held) in enumerate(KFold(k, shuffle=True, random_state=seed).split(subjects), start=1):
        fold_of.update({subjects[j]: f for j in held})
    return np.array([fold_of[i.subject] for i in infos])


# ---------------------------------------------------------------------- orchestration
@dataclass
class Learner:
    """Shared state of one group-level learning run (paths, config, hashes)."""

    group_dir: Path
    infos: list[shard_data.ShardInfo]
    modalities: list[str]
    config: dict
    seed: int
    resume: bool
    stats: dict
    builder: Callable | None = None
    cache: dict = field(default_factory=dict)
    reuse_complete: bool = False  # a step run: finished folds/final model are skipped without --resume

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.infos[0].shape

    @property
    def variants(self) -> dict[str, bool]:
        """{variant name: skip_connections} of the models trained per fold."""
        skips = bool(self.config["model"]["skip_connections"])
        if not skips:
            return {"embedding_only": False}
        return {"with_skips": True, **({"embedding_only": False} if self.config["evaluation"]["embedding_only"] else {})}

    @property
    def embedding_variant(self) -> str:
        """The fold variant whose models stand for the final model's embedding (same skips)."""
        return "with_skips" if self.config["model"]["skip_connections"] else "embedding_only"

    def run_hash(self, label: str, paths: Sequence[Path]) -> str:
        cfg = {s: self.config[s] for s in ("model", "training", "normalization")}
        blob = {"cfg": cfg, "modalities": self.modalities, "seed": self.seed, "label": label,
                "subjects": [Path(p).stem for p in paths]}
        return config_hash({"run": blob})

    def build(self, skips: bool) -> Callable[[], object]:
        if self.builder is not None:
            return lambda: self.builder(self.config["model"], self.modalities, skips)
        from mmfusion.learning.distribute import sync_batchnorm
        from mmfusion.model.autoencoder import build_autoencoder

        setting = self.config["model"]["sync_batchnorm"]
        return lambda: build_autoencoder(self.config["model"], self.modalities, skip_connections=skips,
                                         sync_batchnorm=sync_batchnorm(setting, distribution_strategy()))

    def fit_normalizer(self, paths: Sequence[Path]) -> PopulationNormalizer:
        norm = PopulationNormalizer.from_config(self.config["normalization"])
        stats = None if norm.brain_mask else self.stats  # the scan's stats are of whole volumes
        return norm.fit(paths, self.modalities, shard_data.normalizer_reader(norm), stats)

    def train(self, label: str, skips: bool, data: TrainingData) -> FitResult:
        seed = model_seed(self.seed, label)
        result = fit_autoencoder(self.build(skips), data, self.config["training"],
                                 self.group_dir / "checkpoints" / label, seed, label,
                                 self.run_hash(label, data.train), self.resume,
                                 cache=self.cache, cache_key=f"skips={skips}")
        return result


def _fold_rows_path(learner: Learner, fold: int) -> Path:
    return learner.group_dir / "checkpoints" / f"fold-{fold:02d}" / "metrics.json"


def fold_hash(learner: Learner, fold: int, train: Sequence[Path]) -> str:
    """What a fold's saved results depend on: its models' runs, the evaluation settings,
    the variants and the baseline's components."""
    return config_hash({"models": learner.run_hash(f"fold-{fold:02d}", train),
                        "evaluation": learner.config["evaluation"], "variants": learner.variants,
                        "baseline_components": learner.config["stratify"]["baseline_components"]})


def _fold_split(learner: Learner, fold: int, folds: np.ndarray):
    """(training shard paths, held-out ShardInfos) of one fold."""
    train = [i.path for i, f in zip(learner.infos, folds) if f != fold]
    held = [i for i, f in zip(learner.infos, folds) if f == fold]
    return train, held


def saved_fold(learner: Learner, fold: int, folds: np.ndarray) -> dict | None:
    """The fold's saved results ({'run_hash', 'rows', 'histories'}) when they exist and
    were made with this run's settings and subjects (its embeddings too), else None."""
    done = _fold_rows_path(learner, fold)
    if not (done.is_file() and (done.parent / "embeddings.npz").is_file()):
        return None
    saved = json.loads(done.read_text())
    return saved if saved.get("run_hash") == fold_hash(learner, fold, _fold_split(learner, fold, folds)[0]) else None


def run_fold(learner: Learner, fold: int, folds: np.ndarray) -> tuple[list[dict], dict[str, list[dict]]]:
    """Train the fold's models and evaluate its held-out subjects; returns (rows, histories)."""
    train, held = _fold_split(learner, fold, folds)
    done = _fold_rows_path(learner, fold)
    run_hash = fold_hash(learner, fold, train)
    if learner.resume or learner.reuse_complete:
        saved = saved_fold(learner, fold, folds)
        if saved is not None:
            log.info("fold %d: already evaluated, skipped (%s)", fold, "--resume" if learner.resume else "finished")
            return saved["rows"], saved["histories"]
    norm = learner.fit_normalizer(train)
    norm.save(done.parent / "normalization.json")
    data = TrainingData(train, [i.path for i in held], learner.modalities, norm, learner.shape)
    models, histories = {}, {}
    for variant, skips in learner.variants.items():
        label = f"fold-{fold:02d}/{variant}"
        result = learner.train(label, skips, data)
        models[variant], histories[label] = result.model, result.history
    rows = []
    for info in progress(held, f"fold {fold}: evaluating", logger=log):
        rows += evaluate_subject(models, info, learner.modalities, norm, learner.config["evaluation"],
                                 learner.seed, fold)
    write_fold_embeddings(learner, done.parent / "embeddings.npz", models[learner.embedding_variant], norm, train)
    write_json(done, {"run_hash": run_hash, "rows": rows, "histories": histories})
    return rows, histories


def write_fold_embeddings(learner: Learner, path: Path, model, norm: PopulationNormalizer,
                          train: Sequence[Path]) -> Path:
    """Every shard embedded by one fold's model and by the fold's PCA baseline (fitted on
    the fold's training shards, with the fold's normalization) -> ``path`` (npz with
    ``model`` (n, D) and ``baseline`` (n, c) float32), for the stability analysis."""
    from mmfusion.learning.baseline import baseline_embeddings

    paths = [i.path for i in learner.infos]
    emb = embed(model, paths, learner.modalities, norm)
    base = baseline_embeddings(train, paths, learner.modalities, norm,
                               int(learner.config["stratify"]["baseline_components"]), learner.seed)
    _save_npz(path, {"model": emb, "baseline": base.astype(np.float32)})
    return path


def write_folds(learner: Learner) -> np.ndarray:
    """The fold of every shard (:func:`make_folds`) -> ``cv/folds.tsv``; returns them (n,).
    Every step computes the same table (a function of the subjects and the seed)."""
    import pandas as pd

    k = int(learner.config["training"]["cv_folds"])
    folds = make_folds(learner.infos, k, learner.seed)
    _write_tsv(learner.group_dir / "cv" / "folds.tsv", pd.DataFrame({
        "subject": [f"sub-{i.subject}" for i in learner.infos], "session": [i.session for i in learner.infos],
        "fold": folds}))
    return folds


def run_cross_validation(learner: Learner) -> dict[str, Path]:
    """k-fold CV: a model per fold and variant, metrics TSVs, summary and figures."""
    k = int(learner.config["training"]["cv_folds"])
    folds = write_folds(learner)
    rows, histories = [], {}
    for fold in range(1, k + 1):
        fold_rows, fold_hist = run_fold(learner, fold, folds)
        rows += fold_rows
        histories.update(fold_hist)
    return write_cv_outputs(learner, rows, histories)


def write_cv_outputs(learner: Learner, rows: list[dict], histories: dict[str, list[dict]]) -> dict[str, Path]:
    """The folds' metric rows -> ``cv/metrics_*.tsv``, ``cv/summary.tsv``, the figures and
    ``cv/fold_embeddings.h5`` (from each fold's saved embeddings); ``histories`` passed on."""
    import pandas as pd

    k = int(learner.config["training"]["cv_folds"])
    cv_dir = learner.group_dir / "cv"
    table = pd.DataFrame(rows)
    out = {"fold_embeddings": gather_fold_embeddings(learner, k, cv_dir / "fold_embeddings.h5")}
    for metric in metrics.METRICS:
        part = table[table.metric == metric].drop(columns="metric")
        out[f"metrics_{metric}"] = _write_tsv(cv_dir / f"metrics_{metric}.tsv", part)
    summary = metrics.summarize_across_folds(table)
    out["summary"] = _write_tsv(cv_dir / "summary.tsv", summary)
    fig_dir = learner.group_dir / "figures"
    for metric in metrics.METRICS:
        out[f"figure_{metric}"] = figures.plot_cv_boxplots(table[table.metric == metric], summary, metric,
                                                              fig_dir / f"cv_{metric}.png")
    out["histories"] = histories
    return out


def gather_fold_embeddings(learner: Learner, k: int, path: Path) -> Path:
    """The k folds' ``embeddings.npz`` -> one HDF5: ``participant_id`` (n,), ``session``
    (n,), ``model`` (k, n, D) and ``baseline`` (k, n, c) float32; attrs ``variant`` (the
    fold models' variant) and ``folds`` (k)."""
    import h5py

    parts = []
    for fold in range(1, k + 1):
        with np.load(_fold_rows_path(learner, fold).parent / "embeddings.npz") as arrays:
            parts.append((arrays["model"], arrays["baseline"]))
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            write_ids(h5, shard_data.shard_ids(learner.infos))
            h5.create_dataset("model", data=np.stack([m for m, _ in parts]).astype(np.float32))
            h5.create_dataset("baseline", data=np.stack([b for _, b in parts]).astype(np.float32))
            h5.attrs["variant"] = learner.embedding_variant
            h5.attrs["folds"] = k
    return path


def _write_tsv(path: Path, frame) -> Path:
    write_text(path, frame.to_csv(sep="\t", index=False, float_format="%.8g", na_rep="n/a"))
    return path


# ------------------------------------------------------------------- final model etc.
def train_final(learner: Learner) -> tuple[object, PopulationNormalizer, FitResult, dict[str, Path]]:
    """The final model on all subjects; saved with its normalization under group/model."""
    paths = [i.path for i in learner.infos]
    norm = learner.fit_normalizer(paths)
    data = TrainingData(paths, [], learner.modalities, norm, learner.shape)
    skips = bool(learner.config["model"]["skip_connections"])
    result = learner.train("final", skips, data)
    model_dir = learner.group_dir / "model"
    out = {"model_path": model_dir / "final.keras", "weights_path": model_dir / "final.weights.h5",
           "normalization": model_dir / "normalization.json"}
    with atomic_path(out["model_path"], suffix=".keras") as tmp:
        result.model.save(tmp)
    with atomic_path(out["weights_path"], suffix=".weights.h5") as tmp:
        result.model.save_weights(tmp)
    norm.save(out["normalization"])
    write_json(model_dir / "model.json", {
        "modalities": learner.modalities, "input_shape": list(learner.shape), "model": learner.config["model"],
        "training": learner.config["training"], "seed": learner.seed, "trained_on": [i.key for i in learner.infos],
        "epochs_trained": len(result.history), "stopped_early": result.stopped_early,
    })
    write_json(_final_marker(learner), {"run_hash": final_hash(learner), "history": result.history})
    return result.model, norm, result, out


def final_hash(learner: Learner) -> str:
    """What the final model depends on (its run: config, modalities, seed, subjects)."""
    return learner.run_hash("final", [i.path for i in learner.infos])


def _final_marker(learner: Learner) -> Path:
    return learner.group_dir / "checkpoints" / "final" / "complete.json"


def saved_final(learner: Learner) -> dict | None:
    """``checkpoints/final/complete.json`` ({'run_hash', 'history'}) when the final model of
    this run's settings and subjects was written to ``group/model``, else None."""
    marker = _final_marker(learner)
    if not (marker.is_file() and (learner.group_dir / "model" / "final.weights.h5").is_file()):
        return None
    saved = json.loads(marker.read_text())
    return saved if saved.get("run_hash") == final_hash(learner) else None


def load_final_model(model_dir: Path):
    """(model, normalizer, modalities) from ``group/model`` (rebuilt, then weights loaded)."""
    from mmfusion.model.autoencoder import build_autoencoder

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    model = build_autoencoder(meta["model"], meta["modalities"])  # keys it lacks: the defaults
    model.load_weights(Path(model_dir) / "final.weights.h5")
    return model, PopulationNormalizer.load(Path(model_dir) / "normalization.json"), meta["modalities"]


def write_embeddings(learner: Learner, model, norm: PopulationNormalizer) -> tuple[np.ndarray, dict[str, Path]]:
    """Embeddings of every shard (float32 (n, D), returned) -> group/embeddings.tsv and .h5."""
    emb = embed(model, [i.path for i in learner.infos], learner.modalities, norm, progress_label="embeddings")
    ids = shard_data.shard_ids(learner.infos)
    tsv = write_embeddings_tsv(learner.group_dir / "embeddings.tsv", ids, emb)
    h5_path = write_embeddings_h5(learner.group_dir / "embeddings.h5", ids, emb, learner.modalities, learner.seed)
    log.info("embeddings: %d subjects x %d values -> %s", *emb.shape, tsv)
    return emb, {"embeddings_tsv": tsv, "embeddings_h5": h5_path}


def embed(model, paths: Sequence[Path], modalities: Sequence[str], norm: PopulationNormalizer,
          progress_label: str | None = None) -> np.ndarray:
    """float32 (n, D): the flattened joint embedding of each shard (inference mode)."""
    from mmfusion.model.autoencoder import embedding_model

    encoder = embedding_model(model)
    items = progress(paths, progress_label, logger=log) if progress_label else paths
    vectors = []
    for path in items:
        vols = shard_data.load_subject(path, modalities, norm)
        inputs = {f"in_{m}": v[None, ..., None] for m, v in vols.items()}
        vectors.append(np.asarray(encoder(inputs, training=False), np.float32)[0])
    return np.stack(vectors)


def write_baseline(learner: Learner, norm: PopulationNormalizer) -> dict[str, Path]:
    """The final PCA baseline (fitted on all shards, final normalization) ->
    ``group/baseline/embeddings.tsv`` (participant_id, session, emb_0000 ... = PC scores)."""
    from mmfusion.learning.baseline import baseline_embeddings

    paths = [i.path for i in learner.infos]
    scores = baseline_embeddings(paths, paths, learner.modalities, norm,
                                 int(learner.config["stratify"]["baseline_components"]), learner.seed)
    tsv = write_embeddings_tsv(learner.group_dir / "baseline" / "embeddings.tsv", shard_data.shard_ids(learner.infos), scores)
    log.info("baseline: PCA of the normalized images, %d subjects x %d components -> %s", *scores.shape, tsv)
    return {"baseline_tsv": tsv}


def write_reconstructions(learner: Learner, model, norm: PopulationNormalizer) -> list[Path]:
    """NIfTIs (normalized real and reconstructed) of the first few subjects + a figure."""
    import nibabel as nib

    n = int(learner.config["training"]["n_reconstructions"])
    out_dir = learner.group_dir / "reconstructions"
    written, panels = [], []
    for info in learner.infos[:n]:
        real = shard_data.load_subject(info.path, learner.modalities, norm)
        rec = reconstruct(model, real)
        for m in learner.modalities:
            for desc, vol in (("real", real[m]), ("rec", rec[m])):
                path = out_dir / f"{info.key}_desc-{desc}_{m}.nii.gz"
                with atomic_path(path) as tmp:
                    nib.save(nib.Nifti1Image(vol, info.affine), tmp)
                written.append(path)
            panels.append((info.key, m, real[m], rec[m], info.affine))
    if panels:
        figures.plot_reconstructions(panels, learner.group_dir / "figures" / "reconstructions.png")
    return written


@dataclass
class LearningResult:
    """What :func:`learn` produced: ``ids`` (participant_id, session of every shard),
    ``embeddings`` float32 (n, D) in the same order (the exact values of embeddings.h5),
    and ``outputs`` (name -> path of what it wrote; ``result[name]`` reads them)."""

    ids: object
    embeddings: np.ndarray
    outputs: dict

    def __getitem__(self, key: str):
        return self.outputs[key]


def learn(shard_dir: Path, group_dir: Path, modalities: list[str], config: dict, seed: int, resume: bool = False,
          allow_missing: bool = False, participant_labels: Sequence[str] = (), builder: Callable | None = None,
          infos: Sequence[shard_data.ShardInfo] | None = None) -> LearningResult:
    """Cross-validation, final model, embeddings, baseline and reconstructions of the
    shards ``infos`` (already scanned and checked; else those of ``shard_dir``, restricted
    to ``participant_labels``). ``builder`` replaces build_autoencoder in tests."""
    group_dir = _worker_group_dir(Path(group_dir), resume)
    if infos is None:
        paths = shard_data.discover_shards(shard_dir, participant_labels)
        infos = shard_data.scan_and_check(paths, modalities, allow_missing, config)
    with stop_on_signals():
        learner = _start(group_dir, list(infos), modalities, config, seed, resume, builder)
        out = run_cross_validation(learner)
        model, norm, final, paths_out = train_final(learner)
    out.update(paths_out)
    return _finish(learner, out, final.history, model, norm)


def _finish(learner: Learner, out: dict, final_history: list[dict], model, norm: PopulationNormalizer) -> LearningResult:
    """After the models: training curves, embeddings, baseline, reconstructions."""
    out.update(write_training_curves(learner, {**out.pop("histories"), "final": final_history}))
    emb, emb_paths = write_embeddings(learner, model, norm)
    out.update(emb_paths)
    out.update(write_baseline(learner, norm))
    out["reconstructions"] = write_reconstructions(learner, model, norm)
    return LearningResult(shard_data.shard_ids(learner.infos), emb, out)


# ------------------------------------------------------------------------ the steps
def open_step(group_dir: Path, infos: Sequence[shard_data.ShardInfo], modalities: list[str], config: dict,
              seed: int, resume: bool, force: bool = False, builder: Callable | None = None,
              train: bool = True) -> Learner:
    """The :class:`Learner` of one step (``group --step``): nothing is discarded (other
    steps may be running on the same folder); finished folds and final models of the
    same settings are reused unless ``force``; ``resume`` continues a step's checkpoints.
    ``train``: the volume statistics the normalizer fits need are scanned (not for the analysis)."""
    log.info("step on %d shard(s) of %d subject(s), modalities %s, grid %s", len(infos),
             len({i.subject for i in infos}), modalities, infos[0].shape)
    stats = shard_data.scan_volume_stats(infos, modalities) if train else {}
    return Learner(Path(group_dir), list(infos), modalities, config, seed, resume, stats, builder,
                   reuse_complete=not force)


def train_fold_step(learner: Learner, fold: int) -> Path:
    """One CV fold (every variant): trained, evaluated, embedded -> ``checkpoints/fold-NN/``
    (``metrics.json`` last); skipped when finished with the same settings. Returns metrics.json."""
    with stop_on_signals():
        run_fold(learner, fold, write_folds(learner))
    return _fold_rows_path(learner, fold)


def train_final_step(learner: Learner) -> Path:
    """The final model -> ``group/model/`` (``checkpoints/final/complete.json`` last);
    skipped when finished with the same settings. Returns ``group/model``."""
    if learner.reuse_complete and saved_final(learner) is not None:
        log.info("final model: already trained, skipped (finished)")
    else:
        with stop_on_signals():
            train_final(learner)
    return learner.group_dir / "model"


def missing_steps(learner: Learner) -> list[str]:
    """The training steps whose outputs are missing or made with other settings, as
    'fold N' / 'final'."""
    k = int(learner.config["training"]["cv_folds"])
    folds = make_folds(learner.infos, k, learner.seed)
    missing = [f"fold {f}" for f in range(1, k + 1) if saved_fold(learner, f, folds) is None]
    return missing + ([] if saved_final(learner) is not None else ["final"])


def finish_from_disk(learner: Learner) -> LearningResult:
    """What :func:`learn` writes after the models, from the training steps' files: the CV
    tables and figures, the fold embeddings, the training curves, the embeddings, the
    baseline and the reconstructions. Refuses (exit 66) while a fold or the final model
    is missing, unfinished or made with other settings."""
    missing = missing_steps(learner)
    if missing:
        first = missing[0]
        ckpt = learner.group_dir / "checkpoints"
        where, how = ((ckpt / "final" / "complete.json", "--step train-final") if first == "final" else
                      (ckpt / f"fold-{int(first.split()[1]):02d}" / "metrics.json",
                       f"--step train-fold --fold {first.split()[1]}"))
        raise MissingInputError(
            f"{where}: {first if first != 'final' else 'the final model'} is not finished (not finished or made "
            f"with other settings: {', '.join(missing)}); run 'group {how}' (and the others listed) first, "
            "or the plain group level")
    k = int(learner.config["training"]["cv_folds"])
    write_folds(learner)
    rows, histories = [], {}
    for fold in range(1, k + 1):
        saved = json.loads(_fold_rows_path(learner, fold).read_text())
        rows += saved["rows"]
        histories.update(saved["histories"])
    out = write_cv_outputs(learner, rows, histories)
    model_dir = learner.group_dir / "model"
    out.update({"model_path": model_dir / "final.keras", "weights_path": model_dir / "final.weights.h5",
                "normalization": model_dir / "normalization.json"})
    model = learner.build(bool(learner.config["model"]["skip_connections"]))()
    model.load_weights(model_dir / "final.weights.h5")
    norm = PopulationNormalizer.load(model_dir / "normalization.json")
    return _finish(learner, out, saved_final(learner)["history"], model, norm)


def _start(group_dir: Path, infos: list[shard_data.ShardInfo], modalities: list[str], config: dict, seed: int,
           resume: bool, builder: Callable | None) -> Learner:
    """The :class:`Learner` of a run (old checkpoints discarded without ``resume``)."""
    import shutil

    log.info("learning on %d shard(s) of %d subject(s), modalities %s, grid %s", len(infos),
             len({i.subject for i in infos}), modalities, infos[0].shape)
    if not resume and (group_dir / "checkpoints").exists():
        log.info("no --resume: discarding old checkpoints in %s", group_dir / "checkpoints")
        shutil.rmtree(group_dir / "checkpoints")
    stats = shard_data.scan_volume_stats(infos, modalities)
    return Learner(group_dir, infos, modalities, config, seed, resume, stats, builder)


def write_training_curves(learner: Learner, histories: dict[str, list[dict]]) -> dict[str, Path]:
    """cv/training_curves.tsv and figures/training_curves.png of every model trained."""
    group_dir = learner.group_dir
    out = {"training_curves": _write_tsv(group_dir / "cv" / "training_curves.tsv", _curves_frame(histories))}
    out["figure_training_curves"] = figures.plot_training_curves(histories, group_dir / "figures" / "training_curves.png")
    return out


def _curves_frame(histories: dict[str, list[dict]]):
    import pandas as pd

    rows = [{"model": label, **record} for label, hist in histories.items() for record in hist]
    return pd.DataFrame(rows)
