"""Multi-worker training (issue 6 items 5 and 6) and the strategy choice of mmfusion.learning.distribute.

Two CPU worker processes on 127.0.0.1 (TF_CONFIG, MultiWorkerMirroredStrategy, gRPC
ring collectives) train the small autoencoder (16x16x12, 2 levels, filters [2, 4],
kernel 3x3x3, dropout 0, one modality: the inputs are still a dict) 3 steps with a
global batch of 2 (1 per worker), same seed, ``model.sync_batchnorm: auto`` (so
synchronized BatchNormalization: statistics of the global batch). The reference is a
single process, one replica, the same global batch of 2 and seed (plain BatchNorm).

Asserted: EVERY variable (weights, BatchNorm moving mean/variance, Adam's moments and
step) is identical bit for bit between the two workers, and equal to the reference's
within TOLERANCE; the chief's saved model (synchronized layers) loads in this
one-CPU process and gives the reference's reconstructions and embeddings.

Tolerance: the runs differ only in float32 rounding: the synchronized layer computes the
variance as E[x^2] - E[x]^2 from all-reduced sums, the plain layer in two passes; the
loss is summed per replica, then over replicas. 3 Adam steps (lr 1e-2) keep those
differences at the level measured here (see ``TOLERANCE``'s comment).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmfusion.learning.distribute import strategy_name, sync_batchnorm
from mmfusion.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiworker_worker.py"
TIMEOUT_S = 150
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # largest difference seen: 1.4e-6 (embedding), 4.4e-7 (weights)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CONFIG", "MMFUSION_TF_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="2",
               TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return env


def _run_all(jobs: list[tuple[Path, dict]], tmp_path: Path) -> None:
    """Start every (out_path, env) job, wait at most TIMEOUT_S, kill whatever is left."""
    procs = []
    try:
        for i, (out, env) in enumerate(jobs):
            log = open(tmp_path / f"job{i}.log", "wb")
            procs.append((subprocess.Popen([sys.executable, str(WORKER), str(out), env.pop("_MODE")],
                                           env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log))
        deadline = time.monotonic() + TIMEOUT_S
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            log.close()
    for i, ((out, _), (proc, _)) in enumerate(zip(jobs, procs)):
        tail = (tmp_path / f"job{i}.log").read_text(errors="replace")[-3000:]
        assert proc.returncode == 0 and out.is_file(), f"job {i} failed (rc {proc.returncode}):\n{tail}"


def test_two_workers_end_with_the_variables_of_a_single_process_run(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    outs = [tmp_path / "worker0.npz", tmp_path / "worker1.npz", tmp_path / "reference.npz"]
    jobs = [(outs[i], _env(_MODE="multiworker",
                           TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})))
            for i in range(2)]
    jobs.append((outs[2], _env(_MODE="reference")))
    _run_all(jobs, tmp_path)
    w0, w1, ref = (dict(np.load(p)) for p in outs)

    assert (int(w0["chief"]), int(w1["chief"]), int(ref["chief"])) == (1, 0, 1)
    assert w0["synchronized"].size > 10 and w0["synchronized"].all() and w1["synchronized"].all()
    assert not ref["synchronized"].any()  # auto: one replica keeps the plain layer
    trainable = w0["trainable"]
    assert len(trainable) > 50 and trainable.sum() > 20 and (~trainable).sum() > 10  # BN moving stats exist
    names = sorted(k for k in ref if k[0] in "vo" and k[1:].isdigit())
    assert names == sorted(k for k in w0 if k[0] in "vo" and k[1:].isdigit())
    assert sum(k.startswith("o") for k in names) > 2 * trainable.sum()  # Adam: m and v per weight
    np.testing.assert_allclose(w0["loss"], ref["loss"], rtol=1e-5)
    for key in names:
        # all-reduced: every worker holds the same value, BatchNorm moving statistics included
        np.testing.assert_array_equal(w0[key], w1[key], err_msg=f"{key} differs between workers")
        np.testing.assert_allclose(w0[key], ref[key], **TOLERANCE, err_msg=f"{key}: workers vs single process")
    # training moved the weights and the moving statistics (not a comparison of initial states)
    assert float(w0["moved"]) > 1e-3 and float(ref["moved"]) > 1e-3
    assert float(w0["moved_stats"]) > 1e-3 and float(ref["moved_stats"]) > 1e-3
    _check_saved_model_on_one_cpu(tmp_path / "worker0.keras", ref)


def _check_saved_model_on_one_cpu(path, ref: dict) -> None:
    """The chief's model (synchronized BatchNorm) reloads here and infers like the reference."""
    import keras

    import mmfusion.model  # noqa: F401  (registers SeparableConv3D)
    from mmfusion.model.autoencoder import embedding_model
    from tests.multiworker_worker import synthetic_data

    loaded = keras.models.load_model(path)
    bns = [layer for layer in loaded.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(layer.synchronized for layer in bns)
    inputs, _ = synthetic_data()
    recs = loaded.predict(inputs, batch_size=2, verbose=0)
    for key, rec in recs.items():
        assert rec.shape == ref[key].shape
        np.testing.assert_allclose(rec, ref[key], **TOLERANCE, err_msg=key)
    emb = embedding_model(loaded).predict(inputs, batch_size=2, verbose=0)
    assert emb.shape == ref["embedding"].shape == (6, 192)
    np.testing.assert_allclose(emb, ref["embedding"], **TOLERANCE, err_msg="embedding")


@pytest.mark.parametrize("env, gpus, expected", [
    ({}, 0, "default"),
    ({}, 2, "mirrored"),
    ({"MMFUSION_NUM_GPUS": "4"}, 0, "default"),  # n_gpus given explicitly wins
    ({"SLURM_JOB_NUM_NODES": "1"}, 1, "default"),
    ({"SLURM_JOB_NUM_NODES": "3"}, 0, "multiworker"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}})},
     0, "multiworker"),
    ({"MMFUSION_TF_STRATEGY": "Default", "SLURM_JOB_NUM_NODES": "3"}, 2, "default"),
    ({"MMFUSION_TF_STRATEGY": "mirrored"}, 0, "mirrored"),
])
def test_strategy_name_follows_environment(env, gpus, expected):
    assert strategy_name(env, n_gpus=gpus) == expected


def test_strategy_name_without_gpu_count_reads_mmfusion_num_gpus():
    assert strategy_name({"MMFUSION_NUM_GPUS": "2"}) == "mirrored"
    assert strategy_name({"MMFUSION_NUM_GPUS": "1"}) == "default"


@pytest.mark.parametrize("env, word", [
    ({"MMFUSION_TF_STRATEGY": "horovod"}, "MMFUSION_TF_STRATEGY"),
    ({"TF_CONFIG": "{not json"}, "TF_CONFIG"),
])
def test_bad_environment_is_a_config_error_naming_the_variable(env, word):
    with pytest.raises(ConfigError, match=word):
        strategy_name(env, n_gpus=0)


def test_only_the_chief_writes_under_the_group_folder(tmp_path, monkeypatch):
    import shutil

    from mmfusion.learning import distribute
    from mmfusion.learning import training

    group = tmp_path / "group"
    (group / "checkpoints" / "fold-01").mkdir(parents=True)
    (group / "checkpoints" / "fold-01" / "state.json").write_text("{}")
    assert training._worker_group_dir(group, resume=True) == group  # default strategy: the chief
    monkeypatch.setattr(distribute, "is_chief", lambda strategy=None: False)
    monkeypatch.setattr(distribute, "task_info", lambda strategy=None: ("worker", 1))
    private = training._worker_group_dir(group, resume=True)
    try:
        assert not private.is_relative_to(tmp_path) and "worker1" in private.name
        assert (private / "checkpoints" / "fold-01" / "state.json").read_text() == "{}"
        fresh = training._worker_group_dir(group, resume=False)
        assert fresh != private and not any(fresh.iterdir())
        shutil.rmtree(fresh)
    finally:
        shutil.rmtree(private)


@pytest.mark.parametrize("setting, expected", [
    (None, False), ("auto", False), (" AUTO ", False), (True, True), ("true", True), (False, False), ("False", False),
])
def test_sync_batchnorm_setting_with_one_replica(setting, expected):
    assert sync_batchnorm(setting) is expected  # the default strategy has one replica


@pytest.mark.parametrize("setting", ["yes", 1, 0.5, ["auto"]])
def test_bad_sync_batchnorm_is_a_config_error_naming_the_key(setting):
    with pytest.raises(ConfigError, match="model.sync_batchnorm"):
        sync_batchnorm(setting)


def test_model_builds_synchronized_batchnorm_only_when_asked_or_distributed():
    import keras

    from mmfusion.config import default_config
    from mmfusion.model.autoencoder import build_autoencoder
    from tests.multiworker_worker import MODEL_CFG

    assert default_config()["model"]["sync_batchnorm"] is None  # auto
    flags = {}
    for setting in (None, True):
        model = build_autoencoder({**MODEL_CFG, "sync_batchnorm": setting}, ["a", "b"])
        bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert "fusion_bn" in {layer.name for layer in bns}
        flags[setting] = {layer.synchronized for layer in bns}
    assert flags == {None: {False}, True: {True}}
