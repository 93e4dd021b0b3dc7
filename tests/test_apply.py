"""The trained-model bundle and ``group --model``: assignment, novelty, refusals.

A small real autoencoder (untrained weights: the apply path needs a model, not a good
one) embeds tiny synthetic shards with three planted groups; the group analysis clusters
them and the training path's bundle writer packs the result. Applying the bundle to the
same shards must give back the training strata exactly; every refusal is checked before
anything is written.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from mmfusion import cli
from mmfusion.config import load_config
from mmfusion.context import RunContext
from mmfusion.errors import InputDataError, MissingInputError, UsageError
from mmfusion.io import bundle as bd
from mmfusion.io.shards import Shard, shard_path, write_shard
from mmfusion.levels import group
from mmfusion.provenance import Provenance, sha256_file
from mmfusion.strata import assign

SHAPE = (16, 16, 12)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
N = 9


def _shards(out: Path, n: int = N, template_hash: str = "tplA", shape=SHAPE, affine=AFFINE, modalities=("jac", "ndi"),
            shift: float = 0.0) -> list[Path]:
    """``n`` shards in three groups (i % 3): each group a different smooth pattern."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.9
    paths = []
    for i in range(n):
        k = i % 3
        images = {m: np.where(brain, np.sin((2 + k) * grid[k] + j) + shift + 0.1 * rng.standard_normal(shape), 0)
                  .astype(np.float32) for j, m in enumerate(modalities)}
        path = shard_path(out, f"{i:02d}")
        write_shard(path, Shard(f"{i:02d}", "", images, brain, affine,
                                {"config_hash": "cfg", "template_hash": template_hash, "template_source": "study"}))
        paths.append(path)
    return paths


def _config():
    return load_config(overrides={
        "spatial": {"grid_shape": list(SHAPE)},
        "model": {"input_shape": list(SHAPE), "levels": 2, "filters": [2, 4], "skip_connections": True},
        "stratify": {"damping_n": 2, "preference_n": 10, "subsamples": 2}, "stats": {"n_permutations": 100}})


def _ctx(root: Path, out: Path, model: Path | None = None, modalities=("jac", "ndi")) -> RunContext:
    config = _config()
    return RunContext(level="group", bids_dir=root, output_dir=out, work_dir=out / "work", config=config, seed=3,
                      provenance=Provenance("t", "group", [], config, 3), logger=logging.getLogger("t"),
                      participant_labels=[f"{i:02d}" for i in range(N)], modalities=list(modalities), model=model)


def _bids(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.9.0"}')
    return root


def _fake_training(ctx: RunContext, paths: list[Path]):
    """What the training path leaves before the bundle: group/model (an untrained model of
    the configured architecture, its normalizer), embeddings, the analysis."""
    import keras

    from mmfusion.io.atomic import write_json
    from mmfusion.io.embeddings import write_embeddings_tsv
    from mmfusion.learning import shard_data, training
    from mmfusion.learning.intensity import PopulationNormalizer
    from mmfusion.model.autoencoder import build_autoencoder

    infos = shard_data.scan_shards(paths, ctx.modalities, False)
    keras.utils.set_random_seed(0)
    model = build_autoencoder(ctx.config["model"], ctx.modalities)
    model_dir = ctx.group_dir / "model"
    model_dir.mkdir(parents=True)
    model.save_weights(model_dir / "final.weights.h5")
    norm = PopulationNormalizer.from_config(ctx.config["normalization"])
    norm.fit(paths, ctx.modalities, shard_data.normalizer_reader(norm))
    norm.save(model_dir / "normalization.json")
    write_json(model_dir / "model.json", {"modalities": ctx.modalities, "model": ctx.config["model"]})
    X = training.embed(model, paths, ctx.modalities, norm)
    ids = shard_data.shard_ids(infos)
    tsv = write_embeddings_tsv(ctx.group_dir / "embeddings.tsv", ids, X)
    summary = group.analyse(ctx, ids, X.astype(np.float64), tsv)
    return infos, ids, X, summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apply")
    root, out = _bids(tmp / "bids"), tmp / "train"
    paths = _shards(out)
    ctx = _ctx(root, out)
    infos, ids, X, summary = _fake_training(ctx, paths)
    path = group.write_model_bundle(ctx, infos, ids, X, summary)
    return tmp, root, out, path, X


def _apply_dir(tmp: Path, name: str, **shard_opts) -> Path:
    out = tmp / name
    if out.exists():
        shutil.rmtree(out)
    _shards(out, **shard_opts)
    return out


# ------------------------------------------------------------------- the bundle
def test_bundle_is_complete_hashed_and_has_no_absolute_paths(trained):
    tmp, _, out, path, X = trained
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["bundle_schema_version"] == bd.BUNDLE_SCHEMA_VERSION
    expected = {"bundle.json", "config.json", "model_card.json", "MODEL_CARD.md", "strata.h5",
                "model/model.json", "model/final.weights.h5", "model/normalization.json"}
    assert set(manifest["files"]) == expected
    for rel, digest in manifest["files"].items():
        assert sha256_file(path / rel) == digest
    for rel in ("bundle.json", "model_card.json", "MODEL_CARD.md", "config.json"):
        assert str(tmp) not in (path / rel).read_text(), rel
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["grid"]["shape"] == list(SHAPE) and meta["template"]["hash"] == "tplA"
    assert meta["modalities"] == ["jac", "ndi"] and meta["novelty"]["percentile"] == 95
    with h5py.File(path / "strata.h5") as h5:
        np.testing.assert_array_equal(h5["embedding"][...], X)
        labels = pd.read_csv(out / "group" / "strata" / "labels.tsv", sep="\t")["cluster"].to_numpy()
        np.testing.assert_array_equal(h5["stratum"][...], labels)
        assert h5["exemplar_embedding"].shape == (labels.max() + 1, X.shape[1])
        if meta["strata"]["source"] == "consensus":  # the default: each stratum's medoid is its exemplar
            from mmfusion.strata.assign import medoids
            np.testing.assert_array_equal(h5["exemplar_index"][...], medoids(X.astype(np.float64), labels))
    card = json.loads((path / "model_card.json").read_text())
    assert card["trained_on"]["n_subjects"] == N and card["strata"]["sizes"] == np.bincount(labels).tolist()
    assert "Intended use" in (path / "MODEL_CARD.md").read_text()
    assert not list(path.parent.glob(".bundle.*"))  # the temporary folder is gone


def test_copied_bundle_gives_back_the_training_strata(trained):
    tmp, root, out, path, X = trained
    copy = tmp / "elsewhere" / "bundle"
    shutil.copytree(path, copy)
    new = _apply_dir(tmp, "same")
    report = group.run_group_level(_ctx(root, new, model=copy))
    applied = new / "group" / "applied"
    labels = pd.read_csv(applied / "labels.tsv", sep="\t")
    assert list(labels.columns) == ["participant_id", "session", "stratum", "distance", "novel"]
    train = pd.read_csv(out / "group" / "strata" / "labels.tsv", sep="\t")
    np.testing.assert_array_equal(labels["stratum"], train["cluster"])
    with h5py.File(copy / "strata.h5") as h5:
        np.testing.assert_allclose(labels["distance"], h5["own_distance"][...], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pd.read_csv(applied / "embeddings.tsv", sep="\t").iloc[:, 2:].to_numpy(np.float32), X)
    sidecar = json.loads((applied / "labels.json").read_text())
    assert set(labels.columns) <= set(sidecar) and "Levels" in sidecar["novel"]
    summary = json.loads((applied / "summary.json").read_text())
    assert summary["stratum_sizes"]["applied"] == summary["stratum_sizes"]["training"]
    html = report.read_text()
    assert report.name == "mmfusion_applied_report.html" and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    assert (applied / "projection.png").is_file()


def test_shifted_subjects_are_novel(trained):
    tmp, root, _, path, _ = trained
    new = _apply_dir(tmp, "shifted", shift=3.0)
    group.run_group_level(_ctx(root, new, model=path))
    labels = pd.read_csv(new / "group" / "applied" / "labels.tsv", sep="\t")
    assert labels["novel"].astype(str).str.lower().eq("true").all()


def test_nearest_exemplar_and_threshold():
    E = np.array([[0.0, 0.0], [10.0, 0.0]])
    X = np.array([[1.0, 0.0], [9.0, 1.0], [30.0, 0.0]])
    stratum, dist = assign.nearest_exemplar(X, E)
    np.testing.assert_array_equal(stratum, [0, 1, 1])
    np.testing.assert_allclose(dist, [1.0, np.sqrt(2), 20.0])
    assert assign.novelty_threshold(np.arange(101.0)) == 95.0
    a = assign.assign(X, E, threshold=2.0)
    np.testing.assert_array_equal(a.novel, [False, False, True])
    np.testing.assert_array_equal(assign.medoids(np.array([[0.0], [1.0], [5.0], [9.0], [10.0], [11.0]]),
                                                 np.array([0, 0, 0, 1, 1, 1])), [1, 4])


# ------------------------------------------------------------------- refusals
def _refused(tmp, root, name, model, exc, match, modalities=("jac", "ndi"), **shard_opts):
    new = _apply_dir(tmp, name, **shard_opts)
    with pytest.raises(exc, match=match):
        group.run_group_level(_ctx(root, new, model=model, modalities=modalities))
    assert not (new / "group").exists()  # refused before anything was written


def test_shards_of_another_template_or_grid_are_refused(trained):
    tmp, root, _, path, _ = trained
    _refused(tmp, root, "tpl", path, InputDataError, r"sub-00\.h5: made with template tplB.*--template",
             template_hash="tplB")
    _refused(tmp, root, "shape", path, InputDataError, r"sub-00\.h5: grid \(16, 16, 10\)", shape=(16, 16, 10))
    _refused(tmp, root, "affine", path, InputDataError, r"sub-00\.h5: grid affine differs",
             affine=np.diag([3.0, 3.0, 3.0, 1.0]))


def test_modality_the_model_lacks_is_a_usage_error(trained):
    tmp, root, _, path, _ = trained
    _refused(tmp, root, "fa", path, UsageError, r"the model has no fa input.*--modalities jac ndi",
             modalities=("jac", "fa"))


def _tampered(tmp: Path, path: Path, name: str) -> Path:
    copy = tmp / "tampered" / name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(path, copy)
    return copy


def test_other_schema_missing_or_altered_files_are_refused(trained):
    tmp, root, _, path, _ = trained
    other = _tampered(tmp, path, "schema")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["bundle_schema_version"] = 99
    (other / "manifest.json").write_text(json.dumps(manifest))
    _refused(tmp, root, "schema", other, InputDataError, r"manifest\.json: bundle schema 99.*reads schema 1")
    missing = _tampered(tmp, path, "missing")
    (missing / "model" / "final.weights.h5").unlink()
    _refused(tmp, root, "missing", missing, MissingInputError, r"final\.weights\.h5: file of the bundle missing")
    altered = _tampered(tmp, path, "altered")
    with h5py.File(altered / "strata.h5", "a") as h5:
        h5["own_distance"][0] = 1e9
    _refused(tmp, root, "altered", altered, InputDataError, r"strata\.h5: altered \(sha256")


def test_cli_refuses_a_bad_model_path_early(tmp_path, capsys):
    root = _bids(tmp_path / "bids")
    out = tmp_path / "out"
    code = cli.main([str(root), str(out), "group", "--model", str(tmp_path / "nope"), "--skip-bids-validation"])
    assert code == 64 and "--model does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = cli.main([str(root), str(out), "group", "--model", str(tmp_path / "empty"), "--skip-bids-validation"])
    assert code == 64 and "no manifest.json" in capsys.readouterr().err
    code = cli.main([str(root), str(out), "participant", "--model", str(tmp_path / "empty"), "--skip-bids-validation"])
    assert code == 64 and "at the group level" in capsys.readouterr().err


def test_bundle_of_harmonized_strata_is_refused(trained):
    tmp, root, _, path, _ = trained
    harmonized = _tampered(tmp, path, "harmonized")
    meta = json.loads((harmonized / "bundle.json").read_text())
    meta["strata"]["harmonized"] = True
    (harmonized / "bundle.json").write_text(json.dumps(meta))
    bd.write_manifest(harmonized, "test")  # a consistent bundle, only harmonized
    _refused(tmp, root, "harmonized", harmonized, UsageError, r"site-harmonized embeddings.*retrain without")


def test_the_study_template_travels_with_the_bundle(tmp_path):
    """Shards registered to a study template: the bundle carries it and its brain mask, so a
    new site makes its shards with --template BUNDLE/template/...; the built-in template is
    not copied (every installation has it)."""
    from mmfusion.levels.group import bundle_template_files
    from mmfusion.spatial.template import study_template_paths

    paths = study_template_paths(tmp_path, 3.0)
    assert bundle_template_files(tmp_path, "study", 3.0) == {}  # missing: nothing (and a warning)
    paths["dir"].mkdir()
    for k in ("t1w", "mask"):
        paths[k].write_bytes(b"nifti")
    files = bundle_template_files(tmp_path, "study", 3.0)
    assert files == {"template/tpl-study_res-3_T1w.nii.gz": paths["t1w"],
                     "template/tpl-study_res-3_desc-brain_mask.nii.gz": paths["mask"]}
    assert bundle_template_files(tmp_path, "builtin", 3.0) == {}
