"""run_analysis end to end on simulated embeddings + phenotypes, and the HTML report."""
import base64
import json
import logging
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from mmfusion.io import embeddings
from mmfusion.levels import group
from mmfusion.report import group_report
from mmfusion.config import load_config
from mmfusion.context import RunContext
from mmfusion.errors import InputDataError
from mmfusion.provenance import Provenance


def _dataset(root, out, n=60, K=3, seed=0, extra_embedding=True, extra_pheno=True):
    rng = np.random.default_rng(seed)
    strata = np.repeat(np.arange(1, K + 1), n // K)
    ids = [f"sub-{i:03d}" for i in range(n)]
    X = rng.standard_normal((K, 32))[strata - 1] * 3 + rng.standard_normal((n, 32))
    emb_ids = ids + (["sub-999"] if extra_embedding else [])
    if extra_embedding:
        X = np.vstack([X, X[:1] + 0.1])
    emb = pd.DataFrame(X, columns=[f"emb_{j:04d}" for j in range(32)])
    emb.insert(0, "session", "n/a")
    emb.insert(0, "participant_id", emb_ids)
    (out / "group").mkdir(parents=True)
    emb.to_csv(out / "group" / "embeddings.tsv", sep="\t", index=False)
    (out / "group" / "baseline").mkdir()  # a weaker baseline: 4 of the 32 dimensions, more noise
    base = emb.iloc[:, :6].copy()
    base.iloc[:, 2:] += rng.standard_normal((len(base), 4)) * 2
    base.to_csv(out / "group" / "baseline" / "embeddings.tsv", sep="\t", index=False)
    lat = rng.standard_normal((n, 3))
    lat[:, 0] += (strata - 2) * 1.5
    pheno_ids = ids + (["sub-888"] if extra_pheno else [])
    m = len(pheno_ids)
    lat = np.vstack([lat, np.zeros((m - n, 3))])
    (root / "phenotype").mkdir(parents=True)
    pd.DataFrame({"participant_id": pheno_ids, "age": np.round(40 + 10 * lat[:, 1]),
                  "sex": rng.choice(["M", "F"], m)}).to_csv(root / "participants.tsv", sep="\t", index=False)
    tab = {"participant_id": pheno_ids}
    for f in range(3):
        for v in range(3):
            tab[f"v{f}{v}"] = 0.85 * lat[:, f] + 0.5 * rng.standard_normal(m)
    pd.DataFrame(tab).to_csv(root / "phenotype" / "tests.tsv", sep="\t", index=False)
    truth = root / "sourcedata" / "ground_truth"
    truth.mkdir(parents=True)
    pd.DataFrame({"participant_id": ids, "stratum": strata}).to_csv(truth / "strata.tsv", sep="\t", index=False)
    pd.DataFrame({"participant_id": ids, "a": lat[:n, 0], "b": lat[:n, 1], "c": lat[:n, 2]}).to_csv(
        truth / "latent_factors.tsv", sep="\t", index=False)
    (truth / "planted.json").write_text(json.dumps({
        "latent_factors": [{"name": "a", "depends_on_stratum": True}, {"name": "b", "depends_on_stratum": False},
                           {"name": "c", "depends_on_stratum": False}], "demographics": {}}))


def _ctx(root, out, **cfg):
    overrides = {"stratify": {"damping_n": 2, "preference_n": 10}, "stats": {"n_permutations": 300}}
    for k, v in cfg.items():
        overrides.setdefault(k, {}).update(v)
    config = load_config(overrides=overrides)
    return RunContext(level="group", bids_dir=root, output_dir=out, work_dir=out / "work", config=config,
                      seed=0, provenance=Provenance("t", "group", [], config, 0), logger=logging.getLogger("t"))


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    root, out = tmp / "bids", tmp / "out"
    _dataset(root, out)
    summary = group.run_analysis(_ctx(root, out), out / "group" / "embeddings.tsv")
    return root, out, summary


def test_analysis_recovers_planted_strata_and_factor(analysed):
    _, out, summary = analysed
    gt = summary["ground_truth"]
    assert gt["adjusted_rand_index"] > 0.95 and gt["n_clusters"] == 3
    match = pd.read_csv(out / "group" / "ground_truth" / "factor_match.tsv", sep="\t")
    planted = match[match["latent_planted"]]
    assert len(planted) == 1 and planted["significant"].all() and planted["perm_significant"].all()
    assert match.loc[~match["latent_planted"], "significant"].sum() <= 1


def test_subjects_missing_on_either_side_are_counted(analysed):
    _, out, summary = analysed
    counts = summary["phenotypes"]["subject_counts"]
    assert counts["only_embeddings"] == 1 and counts["only_phenotypes"] == 1 and counts["both"] == 60
    pheno = json.loads((out / "group" / "phenotypes" / "summary.json").read_text())
    assert pheno["subject_counts"]["only_embeddings"] == ["sub-999"]
    assert pheno["subject_counts"]["only_phenotypes"] == ["sub-888"]
    labels = pd.read_csv(out / "group" / "strata" / "labels.tsv", sep="\t")
    assert len(labels) == 61                          # every embedding is clustered


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.external = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")) or (tag == "link" and key == "href"):
                self.external.append(a[key])


def test_report_is_self_contained_and_complete(analysed):
    _, out, _ = analysed
    (out / "group" / "cv").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"fold": [0, 0, 1, 1], "modality": ["jac", "ndi"] * 2, "mse": [0.01, 0.02, 0.03, 0.04],
                  "normdiff": [0.1, 0.2, 0.3, 0.4]}).to_csv(out / "group" / "cv" / "metrics_folds.tsv",
                                                             sep="\t", index=False)
    (out / "group" / "figures").mkdir(exist_ok=True)
    (out / "group" / "figures" / "reconstruction_sub-000.png").write_bytes(
        (out / "group" / "strata" / "ap_grid.png").read_bytes())
    path = group_report.write_report(out)
    text = path.read_text()
    parser = _Images()
    parser.feed(text)
    assert not parser.external
    # model figure, AP grid, baseline AP grid, co-assignment, loadings, profiles, distributions, nulls
    assert len(parser.srcs) == 8
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    for heading in ("Inputs and provenance", "Cohort", "Cross-validated reconstruction metrics",
                    "Affinity propagation grid", "Cluster sizes", "planted ground truth", "adjusted Rand index",
                    "Phenotype factors", "Between-cluster statistics", "perm_q", "Cluster profiles", "Caveats",
                    "Baseline: PCA of the images", "Stability of the strata", "Per-stratum stability",
                    "Confounds", "Cram&eacute;r"):
        assert heading in text, heading
    assert "metrics_folds.tsv" in text and "reconstruction_sub-000" in text
    assert "not run" not in text
    key = text[text.index("Key results"):text.index("<ol>")]
    comparison = json.loads((out / "group" / "ground_truth" / "comparison.json").read_text())
    assert f"adjusted Rand index <b>{comparison['adjusted_rand_index']:.3f}</b>" in key
    assert "strata</b>" in key and "keep together" in key and "Kruskal-Wallis + FDR" in key
    assert "Baseline (PCA of the images" in key and "Stability: fold models vs strata" in key
    assert "3 of 3 strata stable" in key and "not reproducible" not in key
    assert "Confounds: none differs between strata" in key and "age" in key  # age and sex are not planted


def test_validity_outputs_have_their_columns_and_values_in_range(analysed):
    _, out, summary = analysed
    g = out / "group"
    base = json.loads((g / "baseline" / "comparison.json").read_text())
    assert base["components"] == 4 and -1 <= base["ari_with_strata"] <= 1
    assert 0 <= summary["ground_truth"]["adjusted_rand_index_of"]["baseline"] <= 1
    lab = pd.read_csv(g / "stability" / "labelings.tsv", sep="\t")
    assert list(lab.columns[:4]) == ["participant_id", "session", "strata", "final"] and len(lab) == 61
    strata = pd.read_csv(g / "strata" / "labels.tsv", sep="\t")  # the strata, the final model's beside them
    assert list(strata.columns) == ["participant_id", "session", "cluster", "final_model_cluster"]
    assert strata["cluster"].tolist() == lab["strata"].tolist()
    assert strata["final_model_cluster"].tolist() == lab["final"].tolist()
    assert summary["clustering"]["strata"]["source"] == "consensus"
    assert summary["clustering"]["strata"]["sizes"] == np.bincount(lab["strata"]).tolist()
    subs = [c for c in lab.columns if c.startswith("subsample-")]
    assert len(subs) == 20 and ((lab[subs] == -1).sum() == 61 - 49).all()  # 80% of 61 = 49 kept
    clusters = pd.read_csv(g / "stability" / "clusters.tsv", sep="\t")
    assert clusters["stability"].between(0, 1).all() and clusters["size"].sum() == 61
    co = pd.read_csv(g / "stability" / "coassignment.tsv", sep="\t", index_col=0)
    assert co.shape == (61, 61) and np.allclose(np.diag(co.to_numpy()), 1)
    stab = json.loads((g / "stability" / "stability.json").read_text())
    assert stab["reproducible"] and stab["subsample_same_n_clusters"] >= 0.8
    assert 0 <= stab["ari_final_model_vs_strata"] <= 1 and stab["strata"]["source"] == "consensus"
    tests = pd.read_csv(g / "confounds" / "confound_tests.tsv", sep="\t")
    assert {"age", "sex"} <= set(tests["confound"]) and tests["q"].between(0, 1).all()
    assert summary["confounds"]["flags"] == []


def test_noise_strata_are_flagged_not_reproducible(tmp_path):
    root, out = tmp_path / "bids", tmp_path / "out"
    _dataset(root, out, n=36, K=1, extra_embedding=False, extra_pheno=False)  # one stratum: pure noise
    group.run_analysis(_ctx(root, out, stratify={"subsamples": 10}), out / "group" / "embeddings.tsv")
    stab = json.loads((out / "group" / "stability" / "stability.json").read_text())
    clusters = pd.read_csv(out / "group" / "stability" / "clusters.tsv", sep="\t")
    assert not stab["reproducible"] and clusters["stability"].min() < 0.75 and not clusters["stable"].all()
    key = group_report.write_report(out).read_text()
    assert "Warning: the strata are not reproducible" in key


def test_a_confound_that_follows_the_strata_is_flagged(tmp_path):
    root, out = tmp_path / "bids", tmp_path / "out"
    _dataset(root, out, n=30, extra_embedding=False, extra_pheno=False)
    part = pd.read_csv(root / "participants.tsv", sep="\t")
    part["site"] = np.repeat(["A", "B", "C"], 10)  # rows follow the planted strata, as do the clusters
    part.to_csv(root / "participants.tsv", sep="\t", index=False)
    summary = group.run_analysis(_ctx(root, out, phenotypes={"exclude": ["participant_id", "site"]},
                                         stratify={"subsamples": 2}), out / "group" / "embeddings.tsv")
    assert any(f.startswith("site") for f in summary["confounds"]["flags"])
    key = group_report.write_report(out).read_text()
    assert "Warning: the strata differ in site" in key


def test_report_without_outputs_says_not_run(tmp_path):
    text = group_report.write_report(tmp_path).read_text()
    assert text.count("not run") >= 8
    assert re.search(r"<h2[^>]*>11\. Caveats", text) is None and "Caveats" in text
    assert "Key results" not in text


def test_embeddings_with_nan_are_refused(tmp_path):
    path = tmp_path / "emb.tsv"
    pd.DataFrame({"participant_id": ["sub-1", "sub-2"], "session": ["", ""], "emb_0000": [1.0, "nan"]}).to_csv(
        path, sep="\t", index=False)
    with pytest.raises(InputDataError, match="emb.tsv: non-finite embedding values for sub-2"):
        embeddings.read_embeddings(path)


def test_no_common_subjects_is_a_clear_error(tmp_path):
    root, out = tmp_path / "bids", tmp_path / "out"
    _dataset(root, out, n=30)
    pd.DataFrame({"participant_id": ["sub-x1", "sub-x2"], "v": [1, 2]}).to_csv(root / "other.tsv", sep="\t",
                                                                              index=False)
    ctx = _ctx(root, out)
    ctx.phenotypes_file = root / "other.tsv"
    with pytest.raises(InputDataError, match="only 0 subject"):
        group.run_analysis(ctx, out / "group" / "embeddings.tsv")


def test_harmonization_removes_a_site_offset_before_clustering(tmp_path):
    root, out = tmp_path / "bids", tmp_path / "out"
    _dataset(root, out, n=36, extra_embedding=False, extra_pheno=False)
    rng = np.random.default_rng(5)
    sites = rng.permutation(np.repeat(["A", "B"], 18))  # independent of the strata
    emb = pd.read_csv(out / "group" / "embeddings.tsv", sep="\t")
    cols = [c for c in emb.columns if c.startswith("emb_")]
    emb.loc[sites == "B", cols] += 12.0  # a site offset larger than the strata's separation
    emb.to_csv(out / "group" / "embeddings.tsv", sep="\t", index=False)
    part = pd.read_csv(root / "participants.tsv", sep="\t").assign(site=sites)
    part.to_csv(root / "participants.tsv", sep="\t", index=False)
    common = {"phenotypes": {"exclude": ["participant_id", "site"]}}
    raw = group.run_analysis(_ctx(root, out, **common, stratify={"subsamples": 2}), out / "group" / "embeddings.tsv")
    assert raw["harmonization"] == {"status": "off"} and raw["ground_truth"]["adjusted_rand_index"] < 0.5
    harmonized = group.run_analysis(_ctx(root, out, **common, stratify={"subsamples": 2, "harmonize_site": "site"}),
                                       out / "group" / "embeddings.tsv")
    assert harmonized["harmonization"]["status"] == "done" and harmonized["harmonization"]["sites"] == {"A": 18, "B": 18}
    assert harmonized["ground_truth"]["adjusted_rand_index"] > 0.9


def test_a_harmonization_column_that_does_not_exist_is_refused_before_training(tmp_path):
    from mmfusion.levels import group
    from mmfusion.errors import ConfigError

    root, out = tmp_path / "bids", tmp_path / "out"
    _dataset(root, out, n=6, extra_embedding=False, extra_pheno=False)

    class Info:
        def __init__(self, s):
            self.subject, self.session = s, ""
    infos = [Info(f"{i:03d}") for i in range(6)]
    with pytest.raises(ConfigError, match="stratify.harmonize_site: 'scanner' is not a confound column"):
        group.check_harmonization(_ctx(root, out, stratify={"harmonize_site": "scanner"}), infos)
