"""Fail fast on configuration: every wrong value exits 64 when the config is loaded, and
the group level checks its late inputs (phenotypes, shards, folds) before any model."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from mmfusion import cli, config_rules
from mmfusion.config import default_config, load_config
from mmfusion.errors import ConfigError
from mmfusion.io.shards import Shard, shard_path, write_shard

FAST_S = 2.0  # a wrong value must be reported within this many seconds (process start included)

# (section, config, the key named, the value shown): one case per section at least; the
# first three are the values that used to fail hours into a run (issue #12)
BAD = [
    ("evaluation", {"evaluation": {"background": "masks"}}, "evaluation.background", "'masks'"),
    ("stratify", {"stratify": {"damping_min": 0.3}}, "stratify.damping_min", "0.3"),
    ("phenotypes", {"phenotypes": {"missing": "mean"}}, "phenotypes.missing", "'mean'"),
    ("model", {"model": {"levels": 4}}, "model.filters", "[2, 4, 8, 16, 32]"),
    ("model-grid", {"model": {"input_shape": [64, 64, 48], "levels": 4, "filters": [2, 4, 8, 16]}},
     "model.input_shape", "[64, 64, 48]"),
    ("training", {"training": {"cv_folds": 1}}, "training.cv_folds", "1"),
    ("normalization", {"normalization": {"lower_percentile": 99.95}}, "normalization.lower_percentile", "99.95"),
    ("stats", {"stats": {"alpha": 1.5}}, "stats.alpha", "1.5"),
    ("spatial", {"spatial": {"preset": "quick"}}, "spatial.preset", "'quick'"),
]


@pytest.fixture()
def bids(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    return root


def run_cli(*args) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of ``python -m mmfusion.cli ARGS`` (a fresh process)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mmfusion.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, proc.stderr, time.perf_counter() - t0


@pytest.mark.parametrize("section,config,key,value", BAD, ids=[b[0] for b in BAD])
def test_a_wrong_value_exits_64_at_once_naming_file_key_value(bids, tmp_path, section, config, key, value):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    code, err, seconds = run_cli(bids, out, "group", "--config", path, "--skip-bids-validation")
    assert code == 64, err
    line = err.strip()
    assert "\n" not in line and line.startswith(f"mmfusion: error: {path}: {key}: {value}"), line
    assert seconds < FAST_S, f"{seconds:.2f} s: {line}"
    assert not (out / "logs").exists()  # before logging, discovery or training


def test_allowed_values_are_listed(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("evaluation:\n  background: masks\n")
    with pytest.raises(ConfigError, match=r"use one of 'mask', 'threshold'$"):
        load_config(path)
    path.write_text("stratify:\n  damping_min: 0.3\n")
    with pytest.raises(ConfigError, match=r"use a number in \[0.5, 1\)$"):
        load_config(path)


def test_a_bad_command_line_value_is_checked_like_the_config(bids, tmp_path):
    code, err, seconds = run_cli(bids, tmp_path / "out", "group", "--seed", "-1", "--skip-bids-validation")
    assert code == 64 and seconds < FAST_S
    assert "command line (--seed): spatial.random_seed: -1 is not allowed; use an integer in [0, " in err


def test_command_line_options_are_applied_in_one_place(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("spatial:\n  random_seed: 1\n  template_subjects: 3\n")
    args = cli.build_parser().parse_args(["b", "o", "template", "--config", str(path), "--seed", "7"])
    cfg = cli.load_run_config(args)
    assert cfg["spatial"]["random_seed"] == 7 and cfg["spatial"]["template_subjects"] == 3
    args = cli.build_parser().parse_args(["b", "o", "template", "--template-subjects", "5"])
    assert cli.load_run_config(args)["spatial"]["template_subjects"] == 5


def test_every_key_has_a_rule_and_the_defaults_pass():
    defaults = default_config()
    assert {s: set(keys) for s, keys in defaults.items()} == {s: set(r) for s, r in config_rules.RULES.items()}
    config_rules.check_config(defaults)


def test_a_rule_between_keys_names_every_place_that_set_them(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("spatial:\n  grid_shape: [64, 64, 32]\nmodel:\n  input_shape: [64, 64, 64]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model.input_shape: \[64, 64, 64\] differs from "
                                          r"spatial.grid_shape \[64, 64, 32\]"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^override: stratify.convergence_iter: 20 exceeds stratify.max_iter"):
        load_config(overrides={"stratify": {"max_iter": 10, "convergence_iter": 20}})


def test_the_model_input_shape_follows_the_grid_unless_set(tmp_path):
    assert default_config()["model"]["input_shape"] == default_config()["spatial"]["grid_shape"]
    path = tmp_path / "cfg.yaml"
    path.write_text("spatial:\n  grid_shape: [64, 96, 64]\n")
    assert load_config(path)["model"]["input_shape"] == [64, 96, 64]
    path.write_text("spatial:\n  grid_shape: [64, 96, 64]\nmodel:\n  input_shape: [64, 96, 64]\n")
    assert load_config(path)["model"]["input_shape"] == [64, 96, 64]
    path.write_text("spatial:\n  grid_shape: [64, 96, 60]\n")  # the grid's shape must suit the model too
    with pytest.raises(ConfigError, match=rf"^{path}: model.input_shape: \[64, 96, 60\]: every dimension must be divisible"):
        load_config(path)


@pytest.mark.parametrize("value", ["automatic", 0, -1.5])
def test_grid_voxel_size_is_auto_or_a_positive_number(value):
    with pytest.raises(ConfigError, match=r"spatial.grid_voxel_size: .* use 'auto' or a number > 0"):
        load_config(overrides={"spatial": {"grid_voxel_size": value}})
    assert load_config(overrides={"spatial": {"grid_voxel_size": 1.5}})["spatial"]["grid_voxel_size"] == 1.5


# --------------------------------------------------- late inputs of the group level
SHAPE = (8, 8, 8)
TINY = {"spatial": {"grid_shape": list(SHAPE)}, "model": {"input_shape": list(SHAPE), "levels": 1, "filters": [2]},
        "training": {"cv_folds": 2}}


def _group_dataset(tmp_path, ages, modalities=("jac", "ndi"), lacking=()):
    """bids_dir (sub-00.. folders, participants.tsv with age and score) and tiny shards."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tage\tscore"] + [f"sub-{i:02d}\t{a}\t{i * 3 % 5}" for i, a in enumerate(ages)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    mask = np.zeros(SHAPE, bool)
    mask[2:6, 2:6, 2:6] = True
    for i in range(len(ages)):
        (root / f"sub-{i:02d}").mkdir()
        mods = [m for m in modalities if not (i in lacking and m == modalities[-1])]
        images = {m: rng.random(SHAPE, dtype=np.float32) for m in mods}
        write_shard(shard_path(out, f"{i:02d}"), Shard(f"{i:02d}", "", images, mask, np.eye(4), {"config_hash": "c"}))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return root, out, config


@pytest.fixture()
def no_training(monkeypatch):
    """Fail the test if the group level gets as far as building a model."""
    from mmfusion.learning import distribute
    from mmfusion.levels import group

    def refuse(*args, **kwargs):
        raise AssertionError("the group level went on to build/train a model")

    monkeypatch.setattr(group, "run_learning", refuse)
    monkeypatch.setattr(distribute, "make_strategy", refuse)


def _group(root, out, config, *extra) -> tuple[int, float]:
    t0 = time.perf_counter()
    code = cli.main([str(root), str(out), "group", "--config", str(config), "--skip-bids-validation", *extra])
    return code, time.perf_counter() - t0


def test_junk_phenotype_cell_fails_before_any_model(tmp_path, no_training, capsys):
    root, out, config = _group_dataset(tmp_path, [20, "abc", 40, 50, 60])
    code, seconds = _group(root, out, config)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines
    assert code == 65, err
    assert err == (f"mmfusion: error: {root / 'participants.tsv'}: column 'age' is numeric but has non-numeric "
                   "value 'abc' (participant sub-01, line 3; 1 such cell(s)); fix it or mark missing values as n/a")
    assert not (out / "group").exists() and seconds < 10


def test_missing_modality_and_too_many_folds_fail_before_any_model(tmp_path, no_training, capsys):
    root, out, config = _group_dataset(tmp_path, [20, 30, 40, 50, 60], lacking=(3,))
    code, _ = _group(root, out, config)
    err = capsys.readouterr().err
    assert code == 66 and "sub-03.h5 lacks ndi" in err and "--allow-missing" in err
    config.write_text(yaml.safe_dump({**TINY, "training": {"cv_folds": 6}}))
    code, _ = _group(root, out, config, "--modalities", "jac")
    err = capsys.readouterr().err
    assert code == 64 and "5 subject(s) but training.cv_folds is 6; set training.cv_folds <= 5" in err


def test_spatial_hash_ignores_brain_extraction_keys_while_it_is_off():
    import copy

    from mmfusion.config import config_hash, default_config, spatial_hash

    cfg = default_config()
    before = copy.deepcopy(cfg)
    for key in ("brain_extraction", "brain_extraction_margin_mm"):
        before["spatial"].pop(key)
    # the hash of a config written before the keys existed: old shards stay valid
    assert spatial_hash(cfg) == config_hash(before, ["spatial"])
    cfg["spatial"]["brain_extraction_margin_mm"] = 5.0
    assert spatial_hash(cfg) == config_hash(before, ["spatial"])
    cfg["spatial"]["brain_extraction"] = True
    on = spatial_hash(cfg)
    assert on != config_hash(before, ["spatial"])
    cfg["spatial"]["brain_extraction_margin_mm"] = 3.0
    assert spatial_hash(cfg) != on
