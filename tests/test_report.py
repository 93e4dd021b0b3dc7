"""run_analysis end to end on simulated embeddings + phenotypes, and the HTML report."""
import base64
import json
import logging
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from mmfusion import analysis, report
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
    summary = analysis.run_analysis(_ctx(root, out), out / "group" / "embeddings.tsv")
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
    path = report.write_report(out)
    text = path.read_text()
    parser = _Images()
    parser.feed(text)
    assert not parser.external
    assert len(parser.srcs) == 6      # model figure, AP grid, loadings, profiles, distributions, nulls
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    for heading in ("Inputs and provenance", "Cohort", "Cross-validated reconstruction metrics",
                    "Affinity propagation grid", "Cluster sizes", "planted ground truth", "adjusted Rand index",
                    "Phenotype factors", "Between-cluster statistics", "perm_q", "Cluster profiles", "Caveats"):
        assert heading in text, heading
    assert "metrics_folds.tsv" in text and "reconstruction_sub-000" in text
    assert "not run" not in text
    key = text[text.index("Key results"):text.index("<ol>")]
    comparison = json.loads((out / "group" / "ground_truth" / "comparison.json").read_text())
    assert f"adjusted Rand index <b>{comparison['adjusted_rand_index']:.3f}</b>" in key
    assert "clusters</b>" in key and "Kruskal-Wallis + FDR" in key


def test_report_without_outputs_says_not_run(tmp_path):
    text = report.write_report(tmp_path).read_text()
    assert text.count("not run") >= 8
    assert re.search(r"<h2[^>]*>11\. Caveats", text) is None and "Caveats" in text
    assert "Key results" not in text


def test_embeddings_with_nan_are_refused(tmp_path):
    path = tmp_path / "emb.tsv"
    pd.DataFrame({"participant_id": ["sub-1", "sub-2"], "session": ["", ""], "emb_0000": [1.0, "nan"]}).to_csv(
        path, sep="\t", index=False)
    with pytest.raises(InputDataError, match="emb.tsv: non-finite embedding values for sub-2"):
        analysis.read_embeddings(path)


def test_no_common_subjects_is_a_clear_error(tmp_path):
    root, out = tmp_path / "bids", tmp_path / "out"
    _dataset(root, out, n=30)
    pd.DataFrame({"participant_id": ["sub-x1", "sub-x2"], "v": [1, 2]}).to_csv(root / "other.tsv", sep="\t",
                                                                              index=False)
    ctx = _ctx(root, out)
    ctx.phenotypes_file = root / "other.tsv"
    with pytest.raises(InputDataError, match="only 0 subject"):
        analysis.run_analysis(ctx, out / "group" / "embeddings.tsv")
