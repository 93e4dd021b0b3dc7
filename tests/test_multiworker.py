"""Multi-worker training (issue 6 item 5) and the strategy choice of mmfusion.distribute.

Two CPU worker processes on 127.0.0.1 (TF_CONFIG, MultiWorkerMirroredStrategy, gRPC
ring collectives) train the small autoencoder (16x16x12, 2 levels, filters [2, 4],
kernel 3x3x3, dropout 0, one modality: the inputs are still a dict) 3 steps with a
global batch of 2 (1 per worker), same seed; a single process (MirroredStrategy over 2 logical CPUs, same global batch and
per-replica batches, see tests/multiworker_worker.py) is the reference.

Tolerance: rtol 1e-5, atol 1e-6. Both runs compute the same per-replica gradients
and sum 2 values (exact in either order); what may differ is the order of float32
operations inside the collective implementations, i.e. last-bit differences that
3 Adam steps keep around 1e-7. Seen here: identical bit for bit.
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

from mmfusion.distribute import strategy_name
from mmfusion.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiworker_worker.py"
TIMEOUT_S = 150


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


def test_two_workers_end_with_the_weights_of_a_single_process_run(tmp_path):
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
    trainable = w0["trainable"]
    n_vars = len(trainable)
    assert n_vars > 50 and trainable.sum() > 20 and (~trainable).sum() > 0  # BN moving stats exist
    assert {k for k in ref if k.endswith("_r1")} and not {k for k in w0 if k.endswith("_r1")}
    np.testing.assert_allclose(w0["loss"], ref["loss"], rtol=1e-5)
    for i in range(n_vars):
        key = f"v{i:05d}_r0"
        if trainable[i]:
            # weights and optimizer-visible state: the same on every worker (all-reduced)
            np.testing.assert_array_equal(w0[key], w1[key], err_msg=f"variable {i} differs between workers")
        # each worker holds what the reference's replica of the same index holds
        # (BatchNormalization moving statistics are per replica: worker k's come from its half of the batch)
        np.testing.assert_allclose(w0[key], ref[f"v{i:05d}_r0"], rtol=1e-5, atol=1e-6, err_msg=f"variable {i}")
        np.testing.assert_allclose(w1[key], ref[f"v{i:05d}_r1"], rtol=1e-5, atol=1e-6, err_msg=f"variable {i}")
    # training moved the weights (the comparison is not between two initial states)
    assert float(w0["moved"]) > 1e-3 and float(ref["moved"]) > 1e-3


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

    from mmfusion import distribute, training

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
