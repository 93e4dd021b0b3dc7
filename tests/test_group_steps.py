"""The group level as independent steps (``group --step``): the same results as the plain
run, cheap skips of finished steps, the analysis' refusal while a step is unfinished, the
options' checks, and training stopped by SIGUSR1 then resumed to the same weights.

The step/sequential comparison here runs in one process with the tiny Keras model of
tests/test_training.py; the SLURM DAG test (tests/test_hpc.py, extended) runs the real
model's steps as separate jobs and compares them with a sequential ``group`` run.
"""
from __future__ import annotations

import json
import signal

import h5py
import numpy as np
import pytest

from mmfusion import cli
from mmfusion.errors import MissingInputError, TrainingInterrupted, UsageError
from mmfusion.learning import shard_data, training
from mmfusion.levels import group
from tests.test_training import _fit, _weights, make_shards, small_config, tiny_autoencoder

MODALITIES = ["jac", "ndi"]


def _step_learner(tmp_path, cfg, infos, **kw):
    return training.open_step(tmp_path / "steps", infos, MODALITIES, cfg, 3, resume=False,
                              builder=tiny_autoencoder, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 subjects: the plain learn() and the steps (fold 2 before fold 1, then the final model)."""
    tmp_path = tmp_path_factory.mktemp("steps")
    make_shards(tmp_path, n=4)
    cfg = small_config()
    plain = training.learn(tmp_path / "shards", tmp_path / "plain", MODALITIES, cfg, 3, builder=tiny_autoencoder)
    infos = shard_data.scan_and_check(shard_data.discover_shards(tmp_path / "shards", []), MODALITIES, False, cfg)
    learner = _step_learner(tmp_path, cfg, infos)
    refusals = []
    for step in (lambda: training.train_fold_step(learner, 2), lambda: training.train_fold_step(learner, 1),
                 lambda: training.train_final_step(learner)):
        with pytest.raises(MissingInputError) as err:
            training.finish_from_disk(learner)
        refusals.append(str(err.value))
        step()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "steps" / "checkpoints").rglob("*.json")}
    steps = training.finish_from_disk(learner)
    return {"tmp": tmp_path, "plain": plain, "steps": steps, "refusals": refusals, "cfg": cfg, "infos": infos,
            "stamps": stamps}


def _h5_arrays(path):
    with h5py.File(path) as h5:
        return {k: h5[k][...] for k in h5}


@pytest.mark.extended
def test_steps_give_the_plain_runs_results_bit_for_bit(runs):
    plain, steps = runs["plain"], runs["steps"]
    np.testing.assert_array_equal(plain.embeddings, steps.embeddings)
    for name in ("metrics_mse", "metrics_normdiff", "metrics_cnr", "summary", "training_curves", "baseline_tsv",
                 "embeddings_tsv"):
        assert plain[name].read_bytes() == steps[name].read_bytes(), name
    for name in ("fold_embeddings", "embeddings_h5"):
        a, b = _h5_arrays(plain[name]), _h5_arrays(steps[name])
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert (runs["tmp"] / "plain" / "cv" / "folds.tsv").read_bytes() == \
        (runs["tmp"] / "steps" / "cv" / "folds.tsv").read_bytes()


@pytest.mark.extended
def test_analysis_refuses_while_a_step_is_unfinished_and_names_it(runs):
    first, second, third = runs["refusals"]
    assert "fold-01/metrics.json: fold 1 is not finished" in first and "fold 1, fold 2, final" in first
    assert "'group --step train-fold --fold 1'" in first
    assert "fold 1, final" in second
    assert "final/complete.json: the final model is not finished" in third and "'group --step train-final'" in third
    assert MissingInputError.exit_code == 66


@pytest.mark.extended
def test_a_finished_step_is_skipped_and_force_redoes_it(runs, caplog):
    learner = _step_learner(runs["tmp"], runs["cfg"], runs["infos"])
    with caplog.at_level("INFO"):
        training.train_fold_step(learner, 1)
        training.train_final_step(learner)
    assert "fold 1: already evaluated, skipped (finished)" in caplog.text
    assert "final model: already trained, skipped (finished)" in caplog.text
    assert not any(f"{label} epoch" in caplog.text for label in ("fold-01/with_skips", "final"))
    assert {p: p.stat().st_mtime_ns for p in runs["stamps"]} == runs["stamps"]
    # another seed is another run: its fold is not "finished"
    other = training.open_step(runs["tmp"] / "steps", runs["infos"], MODALITIES, runs["cfg"], 4, resume=False,
                               builder=tiny_autoencoder)
    assert training.missing_steps(other) == ["fold 1", "fold 2", "final"]
    forced = _step_learner(runs["tmp"], runs["cfg"], runs["infos"], force=True)
    assert not forced.reuse_complete and learner.reuse_complete


def test_step_names_agree_between_the_cli_and_the_level():
    assert cli.GROUP_STEPS == group.STEPS


@pytest.mark.parametrize("argv, message", [
    (["group", "--fold", "2"], "--fold N goes with --step train-fold"),
    (["group", "--step", "train-fold"], "--step train-fold needs --fold N"),
    (["participant", "--step", "analysis"], "not of the participant level"),
])
def test_step_options_are_checked(tmp_path, argv, message):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    args = cli.build_parser().parse_args([str(bids), str(tmp_path / "out"), *argv])
    with pytest.raises(UsageError, match=message):
        cli.validate_paths(args)


def test_fold_beyond_the_configs_folds_is_a_usage_error():
    cfg = small_config(folds=3)
    cli.check_fold(3, cfg)
    with pytest.raises(UsageError, match=r"--fold 4: the config has training.cv_folds = 3"):
        cli.check_fold(4, cfg)


def test_sigusr1_ends_the_epoch_checkpoints_and_resume_gives_the_same_weights(tmp_path, monkeypatch):
    straight = _fit(tmp_path, "straight", epochs=2)
    monkeypatch.setattr(training, "_epochs_this_process", 0)
    monkeypatch.setenv(training.SIGNAL_ENV, "1")  # SIGUSR1 arrives while epoch 1 runs
    previous = {s: signal.getsignal(s) for s in training.STOP_SIGNALS}
    with training.stop_on_signals():
        with pytest.raises(TrainingInterrupted, match=r"SIGUSR1 after interrupted epoch 1's checkpoint.*--resume"):
            _fit(tmp_path, "interrupted", epochs=2)
    assert {s: signal.getsignal(s) for s in training.STOP_SIGNALS} == previous  # handlers put back
    assert training._stop == {"signal": None, "in_epoch": False}
    state = json.loads((tmp_path / "interrupted" / "state.json").read_text())
    assert state["epoch"] == 1 and not state["done"]  # the epoch under way was finished and saved
    monkeypatch.delenv(training.SIGNAL_ENV)
    resumed = _fit(tmp_path, "interrupted", resume=True, epochs=2)
    assert resumed.complete and resumed.history == straight.history
    for a, b in zip(_weights(straight.model), _weights(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert TrainingInterrupted.exit_code == 85


def test_a_signal_outside_an_epoch_stops_at_once():
    training._stop.update(signal=None, in_epoch=False)
    try:
        with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM; rerun"):
            training._on_stop_signal(signal.SIGTERM, None)
    finally:
        training._stop.update(signal=None, in_epoch=False)
