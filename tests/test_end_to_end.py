"""The whole chain through the real CLI on a small simulated cohort:
simulate -> template -> participant -> group; every stage's outputs exist and validate.

Real ANTs registrations and real TensorFlow training (tiny config: 4 mm data, a 32x40x32
grid at 5 mm, a 3-level model, 2 folds, 2 epochs). Takes a few minutes on 2 cores.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest

from mmfusion.io.shards import read_shard

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "data" / "tiny_config.yaml"
N_SUBJECTS = 6
TERMINAL: dict[str, subprocess.CompletedProcess] = {}  # level -> its CLI run (stdout, stderr)


OUR_LINE = re.compile(r"^(\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +mmfusion[\w.]*: |mmfusion report: )")


def mmfusion(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP_")}  # TF's chatter left on
    proc = subprocess.run([sys.executable, "-m", "mmfusion.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**env, "MMFUSION_PLAIN_PROGRESS": "1"})
    assert proc.returncode == 0, f"{args[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    bids, out = root / "bids", root / "out"
    mmfusion("simulate", bids, "--n-subjects", N_SUBJECTS, "--n-strata", 2, "--voxel-size", 4, "--seed", 3)
    common = ["--config", TINY, "--seed", 3, "--omp-nthreads", 2]
    TERMINAL["template"] = mmfusion(bids, out, "template", *common)
    TERMINAL["participant"] = mmfusion(bids, out, "participant", *common, "--skip-bids-validation")
    group = mmfusion(bids, out, "group", "--modalities", "jac", "ndi", *common, "--skip-bids-validation")
    TERMINAL["group"] = group
    return bids, out, group


def test_the_terminal_shows_only_mmfusion_lines(pipeline):
    """ANTs/ITK and TensorFlow print from C++; that goes to the run's log file, not the terminal."""
    assert sorted(TERMINAL) == ["group", "participant", "template"]
    for level, proc in TERMINAL.items():
        foreign = [line for line in (proc.stdout + proc.stderr).splitlines() if not OUR_LINE.match(line)]
        assert not foreign, f"{level}: {len(foreign)} terminal line(s) not from mmfusion, e.g. {foreign[:5]}"


def test_template_and_shards(pipeline):
    _, out, _ = pipeline
    assert sorted(p.name for p in (out / "template").glob("*.nii.gz"))
    shards = sorted((out / "shards").glob("sub-*.h5"))
    assert len(shards) == N_SUBJECTS
    for path in shards:
        shard = read_shard(path)  # validates schema and finiteness
        assert set(shard.images) == {"t1", "jac", "fa", "ndi"}
        assert shard.mask.shape == (32, 40, 32) and shard.mask.any()
        assert shard.meta["template_source"] == "study"


def test_group_outputs(pipeline):
    _, out, group = pipeline
    report = out / "mmfusion_report.html"
    assert f"mmfusion report: {report}" in group.stdout
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    emb = pd.read_csv(out / "group" / "embeddings.tsv", sep="\t")
    assert len(emb) == N_SUBJECTS and emb.filter(like="emb_").shape[1] == 4 * 5 * 4 * 8
    assert emb.filter(like="emb_").std().gt(0).any()
    with h5py.File(out / "group" / "embeddings.h5") as h5:
        assert N_SUBJECTS in h5[list(h5.keys())[0]].shape or any(
            N_SUBJECTS in ds.shape for ds in h5.values() if hasattr(ds, "shape"))
    for metric in ("mse", "normdiff", "cnr"):
        table = pd.read_csv(out / "group" / "cv" / f"metrics_{metric}.tsv", sep="\t")
        assert set(table["modality"]) == {"jac", "ndi"} and table["value"].notna().all()
    labels = pd.read_csv(out / "group" / "strata" / "labels.tsv", sep="\t")
    assert len(labels) == N_SUBJECTS
    stats = pd.read_csv(out / "group" / "stats" / "kruskal_wallis.tsv", sep="\t")
    assert {"H", "p", "q", "perm_p", "perm_q"} <= set(stats.columns)
    truth = json.loads((out / "group" / "ground_truth" / "comparison.json").read_text())
    assert -1 <= truth["adjusted_rand_index"] <= 1 and truth["n_planted_strata"] == 2
    # the checks of the strata: baseline, stability, confounds, and their key-result lines
    base = pd.read_csv(out / "group" / "baseline" / "embeddings.tsv", sep="\t")
    assert len(base) == N_SUBJECTS and base.filter(like="emb_").shape[1] == N_SUBJECTS - 1  # capped at n - 1
    assert (out / "group" / "baseline" / "strata" / "labels.tsv").is_file()
    stability = json.loads((out / "group" / "stability" / "stability.json").read_text())
    consensus = stability["strata"]["source"] == "consensus"  # the default; the final model's when no partition
    assert consensus or "no partition" in stability["strata"]["fallback"]
    assert set(truth["adjusted_rand_index_of"]) == {"baseline", "fold-01", "fold-02", "baseline_fold-01",
                                                    "baseline_fold-02", *(["final_model"] if consensus else [])}
    assert labels["cluster"].max() + 1 == stability["n_clusters"] and "final_model_cluster" in labels
    with h5py.File(out / "group" / "cv" / "fold_embeddings.h5") as h5:
        assert h5["model"].shape == (2, N_SUBJECTS, 4 * 5 * 4 * 8) and h5.attrs["variant"] == "embedding_only"
    assert stability["n_fold_labelings"] == 2 and stability["n_subsamples"] > 0
    clusters = pd.read_csv(out / "group" / "stability" / "clusters.tsv", sep="\t")
    assert clusters["stability"].between(0, 1).all() and clusters["size"].sum() == N_SUBJECTS
    assert (out / "group" / "stability" / "coassignment.png").stat().st_size > 1000
    tests = pd.read_csv(out / "group" / "confounds" / "confound_tests.tsv", sep="\t")
    assert {"age", "sex", "head_scale", "registration_similarity"} <= set(tests["confound"])
    key = html[html.index("Key results"):html.index("<ol>")]
    assert "Baseline (PCA of the images" in key and "Stability: fold models vs strata" in key


def test_every_level_wrote_provenance(pipeline):
    _, out, _ = pipeline
    records = [json.loads(p.read_text()) for p in (out / "logs").glob("*_provenance.json")]
    assert sorted(r["level"] for r in records) == ["group", "participant", "template"]
    for rec in records:
        assert rec["status"] == "success" and rec["seed"] == 3 and rec["inputs"]
        assert rec["mmfusion_version"] == (REPO / "version").read_text().strip()
        assert all(len(h) == 64 for h in rec["inputs"].values())
    assert len(list((out / "logs").glob("*.log"))) == 3


def test_rerunning_template_is_a_noop_and_a_changed_config_is_refused(pipeline, tmp_path):
    bids, out, _ = pipeline
    tpl = next((out / "template").glob("*_T1w.nii.gz"))
    before = tpl.stat().st_mtime_ns
    proc = mmfusion(bids, out, "template", "--config", TINY, "--seed", 3, "--skip-bids-validation")
    assert "study template up to date" in proc.stderr and tpl.stat().st_mtime_ns == before
    changed = tmp_path / "changed.yaml"
    changed.write_text(TINY.read_text().replace("template_iterations: 1", "template_iterations: 2"))
    refused = subprocess.run([sys.executable, "-m", "mmfusion.cli", str(bids), str(out), "template",
                              "--config", str(changed), "--skip-bids-validation"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 75 and "--force" in refused.stderr
    assert tpl.stat().st_mtime_ns == before
