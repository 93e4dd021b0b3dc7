"""Group-level learning: shards -> tf.data, checkpoints/resume, CV, final model, outputs.

Shards are synthetic (smooth subject-specific volumes inside an ellipsoid "brain", written
with mmfusion.io.shards.write_shard on a 32x32x24 grid). Unit tests use a tiny Keras model
with the autoencoder's input/output naming (fast to trace); the end-to-end test runs the
real autoencoder through the CLI's parser and RunContext in subprocesses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from mmfusion.learning import shard_data
from mmfusion.learning import training
from mmfusion.config import default_config
from mmfusion.errors import InputDataError, MissingInputError, UsageError
from mmfusion.learning.intensity import PopulationNormalizer
from mmfusion.io.shards import Shard, shard_path, write_shard

SHAPE = (32, 32, 24)
E2E_SHAPE = (16, 16, 12)
REPO = Path(__file__).resolve().parents[1]


def make_shards(out_dir: Path, n: int = 6, shape=SHAPE, modalities=("jac", "ndi"), sessions=("",),
                config_hash: str = "cfg1", affine=None, seed: int = 0) -> list[Path]:
    """Synthetic shards: smooth structured volumes that differ per subject."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.8
    affine = np.diag([2.5, 2.5, 2.5, 1.0]) if affine is None else affine
    paths = []
    for i in range(n):
        for ses in sessions:
            images = {}
            for j, m in enumerate(modalities):
                wave = np.sin(3 * grid[0] + 0.4 * i + j) + np.cos(2 * grid[1] - j) + grid[2] * (i % 3)
                images[m] = np.where(brain, wave + 0.2 * rng.standard_normal(shape), 0.0).astype(np.float32)
            path = shard_path(out_dir, f"{i:02d}", ses)
            write_shard(path, Shard(f"{i:02d}", ses, images, brain, affine, {"config_hash": config_hash}))
            paths.append(path)
    return paths


def tiny_autoencoder(model_cfg, modalities, skip_connections=True):
    """A small model with the contract's names: in_<m>, rec_<m>, layer 'embedding' (1536 values)."""
    import keras

    layers = keras.layers
    inputs = {f"in_{m}": keras.Input(tuple(model_cfg["input_shape"]) + (1,), name=f"in_{m}") for m in modalities}
    codes = [layers.MaxPooling3D(8)(layers.Conv3D(2, 3, padding="same")(x)) for x in inputs.values()]
    z = layers.Concatenate()(codes) if len(codes) > 1 else codes[0]
    z = layers.Dropout(0.2)(layers.BatchNormalization()(layers.Conv3D(32, 3, padding="same")(z)))
    emb = layers.Activation("elu", name="embedding")(z)
    outputs = {}
    for m in modalities:
        up = layers.UpSampling3D(8)(emb)
        if skip_connections:
            up = layers.Concatenate()([up, inputs[f"in_{m}"]])
        outputs[f"rec_{m}"] = layers.Conv3D(1, 1, activation="sigmoid", name=f"rec_{m}")(up)
    return keras.Model(inputs, outputs)


def small_config(epochs=2, folds=2):
    """The paper's model (skips on, so both variants are trained) at a small size."""
    cfg = default_config()
    cfg["model"].update(input_shape=list(SHAPE), levels=3, filters=[2, 4, 8], skip_connections=True)
    cfg["training"].update(epochs=epochs, cv_folds=folds, n_reconstructions=1)
    cfg["evaluation"].update(cnr_pairs=100)
    return cfg


# ------------------------------------------------------------------------ data input
def test_masking_normalizer_fits_on_brain_and_zeroes_the_background(tmp_path):
    paths = make_shards(tmp_path, n=4)
    mask = shard_data.read_mask(paths[0])
    assert 0 < mask.mean() < 1
    norm = PopulationNormalizer(brain_mask=True)
    norm.fit(paths, ["jac"], shard_data.normalizer_reader(norm))
    brain = np.concatenate([shard_data.read_volume(p, "jac")[mask] for p in paths]).astype(np.float64)
    assert norm.ranges["jac"] == pytest.approx(tuple(np.percentile(brain, [0.1, 99.9])), rel=1e-12)
    assert norm.n_voxels["jac"] == brain.size
    whole = PopulationNormalizer().fit(paths, ["jac"], shard_data.read_volume)
    assert whole.ranges["jac"] != norm.ranges["jac"]          # the background changes the percentiles
    x = shard_data.load_subject(paths[1], ["jac"], norm)["jac"]
    assert np.all(x[~mask] == 0.0) and x[mask].max() > 0.5
    np.testing.assert_array_equal(x[mask], norm.transform(shard_data.read_volume(paths[1], "jac"), "jac", mask)[mask])
    with pytest.raises(ValueError, match="brain mask"):
        norm.transform(shard_data.read_volume(paths[1], "jac"), "jac")
    ds = shard_data.make_dataset(paths, ["jac"], norm, SHAPE, 1)
    np.testing.assert_array_equal(next(ds.as_numpy_iterator())[0]["in_jac"][0, ..., 0],
                                  shard_data.load_subject(paths[0], ["jac"], norm)["jac"])
    again = PopulationNormalizer.load(norm.save(tmp_path / "normalization.json"))
    assert again.brain_mask and again.ranges == norm.ranges
    legacy = json.loads((tmp_path / "normalization.json").read_text())
    del legacy["brain_mask"]                                      # a 0.3.0 model: unmasked
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert not PopulationNormalizer.load(tmp_path / "legacy.json").brain_mask


def test_masking_is_the_default_and_a_config_key():
    assert default_config()["normalization"]["brain_mask"] is True
    assert PopulationNormalizer.from_config(default_config()["normalization"]).brain_mask


def test_read_volume_matches_h5py_and_dataset_streams_normalized_batches(tmp_path):
    paths = make_shards(tmp_path, n=5)
    with h5py.File(paths[0]) as h5:
        np.testing.assert_array_equal(shard_data.read_volume(paths[0], "ndi"), h5["ndi"][...])
    infos = shard_data.scan_shards(paths, ["jac", "ndi"])
    norm = PopulationNormalizer().fit(paths, ["jac", "ndi"], shard_data.read_volume)
    orders = shard_data.epoch_orders(5, 2, seed=7)
    ds = shard_data.make_dataset([i.path for i in infos], ["jac", "ndi"], norm, SHAPE, 2, orders)
    batches = list(ds.as_numpy_iterator())
    assert [b[0]["in_jac"].shape[0] for b in batches] == [2, 2, 1, 2, 2, 1]   # no batch spans epochs
    x, y = batches[0]
    assert set(x) == {"in_jac", "in_ndi"} and set(y) == {"rec_jac", "rec_ndi"}
    assert x["in_jac"].shape == (2, *SHAPE, 1) and 0.0 <= x["in_jac"].min() and x["in_jac"].max() <= 1.0
    expected = norm.transform(shard_data.read_volume(paths[orders[0][0]], "jac"), "jac")
    np.testing.assert_array_equal(x["in_jac"][0, ..., 0], expected)
    np.testing.assert_array_equal(y["rec_jac"], x["in_jac"])


def test_epoch_orders_are_seeded_permutations():
    a = shard_data.epoch_orders(10, 3, seed=1)
    assert a.shape == (3, 10) and all(sorted(r) == list(range(10)) for r in a)
    assert not np.array_equal(a[0], a[1])
    np.testing.assert_array_equal(a, shard_data.epoch_orders(10, 3, seed=1))
    np.testing.assert_array_equal(a[:2], shard_data.epoch_orders(10, 2, seed=1))   # prefix-stable


def test_folds_keep_sessions_together_and_are_seeded(tmp_path):
    infos = shard_data.scan_shards(make_shards(tmp_path, n=6, sessions=("1", "2")), ["jac"])
    folds = training.make_folds(infos, 3, seed=4)
    by_subject = {}
    for info, f in zip(infos, folds):
        by_subject.setdefault(info.subject, set()).add(f)
    assert all(len(s) == 1 for s in by_subject.values())
    assert sorted(np.bincount(folds)[1:]) == [4, 4, 4]
    np.testing.assert_array_equal(folds, training.make_folds(infos, 3, seed=4))


# ------------------------------------------------------------------------- bad input
def test_shards_with_other_grid_or_config_hash_are_refused_by_name(tmp_path):
    paths = make_shards(tmp_path / "a", n=3)
    odd = make_shards(tmp_path / "b", n=4, shape=(32, 32, 16))[3]
    with pytest.raises(InputDataError, match=r"grid.*sub-03\.h5"):
        shard_data.scan_shards(paths + [odd], ["jac"])
    moved = make_shards(tmp_path / "c", n=4, affine=np.diag([2.5, 2.5, 2.5, 1.0]) + np.eye(4) * 0)[3]
    with h5py.File(moved, "a") as h5:
        h5.attrs["affine"] = np.diag([2.0, 2.5, 2.5, 1.0])
    with pytest.raises(InputDataError, match=r"sub-03\.h5"):
        shard_data.scan_shards(paths + [moved], ["jac"])
    other = make_shards(tmp_path / "d", n=4, config_hash="cfg2")[3]
    with pytest.raises(InputDataError, match=r"config_hash.*sub-03\.h5"):
        shard_data.scan_shards(paths + [other], ["jac"])


def test_missing_modality_lists_shards_and_allow_missing_skips(tmp_path):
    paths = make_shards(tmp_path / "a", n=3)
    lacking = make_shards(tmp_path / "b", n=5, modalities=("jac",))[3:]
    with pytest.raises(MissingInputError, match=r"sub-03\.h5 lacks ndi.*sub-04\.h5 lacks ndi"):
        shard_data.scan_shards(paths + lacking, ["jac", "ndi"])
    kept = shard_data.scan_shards(paths + lacking, ["jac", "ndi"], allow_missing=True)
    assert [i.key for i in kept] == ["sub-00", "sub-01", "sub-02"]


def test_fewer_subjects_than_folds_and_wrong_grid_are_usage_errors(tmp_path):
    infos = shard_data.scan_shards(make_shards(tmp_path, n=3, sessions=("1", "2")), ["jac"])
    with pytest.raises(UsageError, match=r"3 subject\(s\) but training.cv_folds is 4"):
        shard_data.check_folds(infos, 4)
    with pytest.raises(UsageError, match=r"model.input_shape: \[32, 32, 24\]"):
        shard_data.check_grid(infos, [128, 128, 96])


def test_nan_in_a_shard_is_refused_by_name(tmp_path):
    paths = make_shards(tmp_path, n=3)
    with h5py.File(paths[1], "a") as h5:
        data = h5["ndi"][...]
        data[3, 4, 5] = np.nan
        del h5["ndi"]
        h5.create_dataset("ndi", data=data, chunks=(32, 32, 1), compression="gzip")
    infos = shard_data.scan_shards(paths, ["jac", "ndi"])
    with pytest.raises(InputDataError, match=r"sub-01\.h5 \(ndi: 1 NaN/Inf\)"):
        shard_data.scan_volume_stats(infos, ["jac", "ndi"])


# --------------------------------------------------------------- checkpoint / resume
def _fit(tmp_path, name, stop_after=None, resume=False, cache=None, seed=11, patience=0, epochs=3, lr=1e-3):
    paths = make_shards(tmp_path / "shards_src", n=5) if not (tmp_path / "shards_src").exists() else \
        sorted((tmp_path / "shards_src" / "shards").glob("*.h5"))
    norm = PopulationNormalizer().fit(paths[:4], ["jac", "ndi"], shard_data.read_volume)
    data = training.TrainingData(paths[:4], paths[4:], ["jac", "ndi"], norm, SHAPE)
    cfg = small_config(epochs=epochs)["training"]
    cfg["early_stopping_patience"] = patience
    cfg["learning_rate"] = lr
    build = lambda: tiny_autoencoder({"input_shape": list(SHAPE)}, ["jac", "ndi"])  # noqa: E731
    return training.fit_autoencoder(build, data, cfg, tmp_path / name, seed, name, "h1", resume,
                                    stop_after_epochs=stop_after, cache=cache)


def _weights(model):
    return [v.numpy().copy() for v in training._all_variables(model)]


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    straight = _fit(tmp_path, "straight")
    assert straight.complete and [r["epoch"] for r in straight.history] == [1, 2, 3]
    first = _fit(tmp_path, "interrupted", stop_after=1)
    assert not first.complete and json.loads((tmp_path / "interrupted" / "state.json").read_text())["epoch"] == 1
    resumed = _fit(tmp_path, "interrupted", resume=True)
    assert resumed.complete and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(_weights(straight.model), _weights(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert resumed.history == straight.history
    # a model reused from the cache (one trace per variant) trains to the same weights
    cache = {}
    _fit(tmp_path, "warm", cache=cache, seed=99, epochs=1)
    reused = _fit(tmp_path, "reused", cache=cache)
    for a, b in zip(_weights(straight.model), _weights(reused.model)):
        np.testing.assert_array_equal(a, b)
    # and a different seed gives different weights (the comparison can fail)
    assert not all(np.array_equal(a, b) for a, b in zip(_weights(straight.model), _weights(_fit(tmp_path, "s2", seed=12).model)))


def test_resume_refuses_checkpoint_of_another_run(tmp_path):
    _fit(tmp_path, "run", stop_after=1)
    paths = sorted((tmp_path / "shards_src" / "shards").glob("*.h5"))
    norm = PopulationNormalizer().fit(paths, ["jac"], shard_data.read_volume)
    data = training.TrainingData(paths, [], ["jac"], norm, SHAPE)
    from mmfusion.errors import StaleOutputError
    with pytest.raises(StaleOutputError, match="state.json"):
        training.fit_autoencoder(lambda: tiny_autoencoder({"input_shape": list(SHAPE)}, ["jac"]), data,
                                 small_config()["training"], tmp_path / "run", 1, "run", "other-hash", True)


def test_a_nan_loss_stops_training_at_once_without_checkpointing_it(tmp_path):
    from mmfusion.errors import TrainingDiverged

    class Model:
        stop_training, variables = False, []

    ckpt = training._Checkpointer(tmp_path, "fold-01/embedding_only", "h", 5, 0, "val_loss", [],
                                  float("inf"), 0, None)
    model = Model()
    with pytest.raises(TrainingDiverged, match=r"fold-01/embedding_only epoch 3: val_loss is NaN/Inf") as err:
        ckpt.epoch_end(model, 2, {"loss": 0.5, "val_loss": float("nan")})
    assert err.value.exit_code == 65 and model.stop_training
    assert ckpt.history == [] and not (tmp_path / "state.json").exists()


def test_early_stopping_restores_best_weights(tmp_path):
    result = _fit(tmp_path, "es", patience=1, epochs=30, lr=0.5)   # a large step: val loss soon rises
    assert result.stopped_early and len(result.history) < 30
    best = min(r["val_loss"] for r in result.history)
    assert result.history[-1]["val_loss"] >= best
    assert json.loads((tmp_path / "es" / "state.json").read_text())["stopped_early"]
    with np.load(tmp_path / "es" / "best.npz") as best_vars:
        for var, key in zip(result.model.variables, sorted(best_vars.files)):
            np.testing.assert_array_equal(var.numpy(), best_vars[key])


# ------------------------------------------------------------------ learn (tiny model)
def test_learn_writes_cv_tables_model_embeddings_and_reconstructions(tmp_path):
    make_shards(tmp_path, n=4, sessions=("1", "2"))
    out = training.learn(tmp_path / "shards", tmp_path / "group", ["jac", "ndi"], small_config(), 3,
                         builder=tiny_autoencoder)
    for metric in ("mse", "normdiff", "cnr"):
        table = pd.read_csv(out[f"metrics_{metric}"], sep="\t", dtype={"session": str})
        assert list(table.columns) == ["subject", "session", "fold", "modality", "variant", "value"]
        assert len(table) == 8 * 2 * 2 and set(table.variant) == {"with_skips", "embedding_only"}
        assert table.value.notna().all()
    emb = pd.read_csv(out["embeddings_tsv"], sep="\t", dtype={"session": str})
    assert emb.shape == (8, 2 + 1536) and list(emb.columns[:3]) == ["participant_id", "session", "emb_0000"]
    with h5py.File(out["embeddings_h5"]) as h5:
        np.testing.assert_allclose(h5["embedding"][...], emb.iloc[:, 2:].to_numpy(), rtol=1e-6)
        assert [s.decode() for s in h5["session"][...]] == list(emb.session)
    assert len(out["reconstructions"]) == 4 and all(p.is_file() for p in out["reconstructions"])
    assert json.loads((tmp_path / "group" / "model" / "normalization.json").read_text())["fitted_on"][0] == "sub-00_ses-1"
    for name in ("cv_mse", "cv_normdiff", "cv_cnr", "training_curves", "reconstructions"):
        assert (tmp_path / "group" / "figures" / f"{name}.png").stat().st_size > 1000
    with h5py.File(out["fold_embeddings"]) as h5:  # every fold model embeds every shard (stability)
        assert h5["model"].shape == (2, 8, 1536) and h5["baseline"].shape == (2, 8, 3)  # PCA: n_train - 1
        assert h5.attrs["variant"] == "with_skips" and [p.decode() for p in h5["participant_id"]] == list(emb.participant_id)
        assert np.isfinite(h5["baseline"][...]).all() and h5["baseline"][...].std(axis=1).min() > 0
    base = pd.read_csv(out["baseline_tsv"], sep="\t", dtype={"session": str})
    assert base.shape == (8, 2 + 7) and list(base.participant_id) == list(emb.participant_id)  # 8 shards: 7 PCs


def test_default_model_is_skip_free_and_its_folds_embed_everyone(tmp_path):
    make_shards(tmp_path, n=4)
    cfg = small_config()
    cfg["model"]["skip_connections"] = default_config()["model"]["skip_connections"]
    assert cfg["model"]["skip_connections"] is False
    out = training.learn(tmp_path / "shards", tmp_path / "group", ["jac", "ndi"], cfg, 3, builder=tiny_autoencoder)
    assert set(pd.read_csv(out["metrics_mse"], sep="\t").variant) == {"embedding_only"}
    with h5py.File(out["fold_embeddings"]) as h5:
        assert h5.attrs["variant"] == "embedding_only" and h5["model"].shape == (2, 4, 1536)
        folds = h5["model"][...]
    assert not np.allclose(folds[0], folds[1])  # two different models


# ------------------------------------------------------- end to end, real model, CLI
_LEARN = textwrap.dedent("""
    import sys
    from mmfusion import cli
    from mmfusion.levels import group
    argv = sys.argv[1:]
    args = cli.build_parser().parse_args(argv)
    cli.validate_paths(args)
    ctx = cli.make_context(args, ["mmfusion", *argv])
    group.run_learning(ctx)
""")


def _cli_learn(bids: Path, out: Path, config: Path, *extra, env=None):
    argv = [str(bids), str(out), "group", "--modalities", "jac", "ndi", "--config", str(config), "--seed", "5",
            "--skip-bids-validation", *extra]
    # oneDNN's default (non-deterministic) mode may order reductions by thread timing; a
    # run under heavy load once differed in the last bits without this
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0",
           **(env or {})}
    return subprocess.run([sys.executable, "-c", _LEARN, *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.extended
def test_end_to_end_real_model_and_resume_after_kill(tmp_path):
    import yaml

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.9.0"}')
    # 16x16x12 grid, 2 levels: the embedding is still 4x4x3x32 = 1536 values; the real
    # model's train-step trace (the dominant cost, once per process and variant) is ~40% shorter
    small = {"spatial": {"grid_shape": list(E2E_SHAPE)},
             "model": {"input_shape": list(E2E_SHAPE), "levels": 2, "filters": [2, 4], "skip_connections": True},
             "training": {"epochs": 2, "cv_folds": 2, "n_reconstructions": 1},
             "evaluation": {"cnr_pairs": 200}}
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(small))
    # the killed/resumed run skips the embedding-only models (one train-step trace fewer per
    # process, the costly part); they do not enter the final model or the with-skips metrics
    small["evaluation"]["embedding_only"] = False
    config_skips_only = tmp_path / "small_skips_only.yaml"
    config_skips_only.write_text(yaml.safe_dump(small))
    for out in (tmp_path / "straight", tmp_path / "killed"):
        make_shards(out, n=4, shape=E2E_SHAPE)
    straight = _cli_learn(bids, tmp_path / "straight", config)
    assert straight.returncode == 0, straight.stderr[-3000:]
    group = tmp_path / "straight" / "group"
    for metric in ("mse", "normdiff", "cnr"):
        table = pd.read_csv(group / "cv" / f"metrics_{metric}.tsv", sep="\t")
        assert len(table) == 4 * 2 * 2 and table.value.notna().all()
        assert (group / "figures" / f"cv_{metric}.png").is_file()
    assert (group / "figures" / "training_curves.png").is_file() and (group / "model" / "final.keras").is_file()
    emb = pd.read_csv(group / "embeddings.tsv", sep="\t")
    assert emb.shape == (4, 2 + 1536)

    assert set(pd.read_csv(group / "cv" / "metrics_mse.tsv", sep="\t").variant) == {"with_skips", "embedding_only"}

    killed = _cli_learn(bids, tmp_path / "killed", config_skips_only, env={training.KILL_ENV: "1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    state = json.loads((tmp_path / "killed" / "group" / "checkpoints" / "fold-01" / "with_skips" / "state.json").read_text())
    assert state["epoch"] == 1 and not state["done"]
    assert not (tmp_path / "killed" / "group" / "embeddings.tsv").exists()
    resumed = _cli_learn(bids, tmp_path / "killed", config_skips_only, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2/2" in resumed.stderr
    with h5py.File(group / "model" / "final.weights.h5") as a, \
            h5py.File(tmp_path / "killed" / "group" / "model" / "final.weights.h5") as b:
        arrays_a, arrays_b = [], []
        a.visititems(lambda n, o: arrays_a.append((n, o[...])) if isinstance(o, h5py.Dataset) else None)
        b.visititems(lambda n, o: arrays_b.append((n, o[...])) if isinstance(o, h5py.Dataset) else None)
    assert len(arrays_a) > 10 and [n for n, _ in arrays_a] == [n for n, _ in arrays_b]
    for (_, x), (_, y) in zip(arrays_a, arrays_b):
        np.testing.assert_array_equal(x, y)
    for metric in ("mse", "normdiff", "cnr"):
        a = pd.read_csv(group / "cv" / f"metrics_{metric}.tsv", sep="\t")
        b = pd.read_csv(tmp_path / "killed" / "group" / "cv" / f"metrics_{metric}.tsv", sep="\t")
        pd.testing.assert_frame_equal(a[a.variant == "with_skips"].reset_index(drop=True), b)
