"""Stability of the strata (mmfusion.strata.stability) and the PCA baseline (mmfusion.learning.baseline)."""
import numpy as np
import pandas as pd
import pytest

from mmfusion.learning import baseline
from mmfusion.strata import stability
from mmfusion.report import figures


def test_cluster_jaccard_exact_and_dissolved():
    ref = np.array([0, 0, 0, 1, 1, 1])
    assert stability.cluster_jaccard(ref, ref).tolist() == [1.0, 1.0]
    merged = np.zeros(6, dtype=int)  # one cluster: each reference cluster matches it with J = 3/6
    assert stability.cluster_jaccard(ref, merged).tolist() == [0.5, 0.5]
    partial = np.array([0, 0, -1, 1, 1, -1])  # only covered rows count
    assert stability.cluster_jaccard(ref, partial).tolist() == [1.0, 1.0]


def test_coassignment_counts_only_covering_labelings():
    a = np.array([0, 0, 1])
    b = np.array([0, 1, -1])
    co = stability.coassignment([a, b])
    assert co[0, 1] == 0.5 and co[1, 0] == 0.5
    assert co[0, 2] == 0.0  # only a covers both: apart
    assert np.allclose(np.diag(co), 1.0)
    assert np.isnan(stability.coassignment([np.array([0, -1])]))[0, 1]


def test_assess_stable_vs_noise():
    rng = np.random.default_rng(0)
    final = np.repeat([0, 1, 2], 10)
    same = {f"fold-{i}": final.copy() for i in range(3)}
    subs = {}
    for i, idx in enumerate(stability.subsample_indices(30, 5, 0.8, seed=1)):
        subs[f"s{i}"] = stability.expand(final[idx], idx, 30)
    co = stability.consensus_matrix([final, *same.values()], list(subs.values()))
    good = stability.assess(final, same, subs, [3] * 5, threshold=0.75, consensus=co)
    assert good.summary["reproducible"] and good.summary["n_stable_clusters"] == 3
    assert good.summary["ari_folds_vs_strata"]["median"] == pytest.approx(1.0)
    assert good.summary["subsample_same_n_clusters"] == 1.0
    assert good.coassignment.shape == (30, 30)
    noise = {f"fold-{i}": rng.integers(0, 3, 30) for i in range(3)}
    bad = stability.assess(final, noise, {}, [], threshold=0.75, consensus=co)
    assert not bad.summary["reproducible"]
    assert (bad.clusters["stability"] < 0.6).all()
    assert set(bad.clusters.columns) == {"cluster", "size", "stability", "jaccard_models", "jaccard_subsamples",
                                         "stable"}
    assert bad.summary["ari_folds_vs_strata"]["median"] < 0.3


def test_consensus_keeps_what_most_clusterings_keep_together():
    truth = np.repeat([0, 1, 2], 8)
    merged = np.where(truth == 2, 1, truth)  # one clustering merges strata 1 and 2
    models = [merged, truth, truth, truth]
    co = stability.consensus_matrix(models, [])
    assert co[8, 16] == pytest.approx(0.25) and co[0, 1] == 1.0
    assert stability.consensus_labels(co).tolist() == truth.tolist()
    # the subsamples weigh as much as all the models together: 20 subsamples that merge
    # strata 1 and 2 (each covering 80 % of the rows) outvote 3 of 4 models
    subs = [stability.expand(merged[idx], idx, 24) for idx in stability.subsample_indices(24, 20, 0.8, seed=0)]
    co2 = stability.consensus_matrix(models, subs)
    assert co2[8, 16] == pytest.approx((0.25 + 1.0) / 2)
    assert stability.consensus_labels(co2).tolist() == merged.tolist()
    # labels numbered in order of first row; a clustering of one labeling is that labeling
    lab = np.array([2, 2, 0, 0, 1, 1])
    assert stability.consensus_labels(stability.consensus_matrix([lab], [])).tolist() == [0, 0, 1, 1, 2, 2]


def test_choose_strata_consensus_final_model_and_fallback():
    from mmfusion.strata.validity import choose_strata

    truth = np.repeat([0, 1, 2], 8)
    final = np.where(truth == 2, 1, truth)
    co = stability.consensus_matrix([final, truth, truth, truth], [])
    strata, how = choose_strata(final, co, "consensus")
    assert strata.tolist() == truth.tolist() and how == {"source": "consensus"}
    strata, how = choose_strata(final, co, "final_model")
    assert strata.tolist() == final.tolist() and how == {"source": "final_model"}
    for apart_or_together in (np.arange(24), np.zeros(24, int)):  # every row alone / all in one
        co_none = stability.consensus_matrix([apart_or_together], [])
        strata, how = choose_strata(final, co_none, "consensus")
        assert strata.tolist() == final.tolist() and how["source"] == "final_model"
        assert "no partition" in how["fallback"]


def test_subsamples_are_seeded_and_without_replacement():
    a = stability.subsample_indices(20, 4, 0.8, seed=3)
    b = stability.subsample_indices(20, 4, 0.8, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(len(np.unique(x)) == 16 for x in a)
    assert not np.array_equal(a[0], stability.subsample_indices(20, 4, 0.8, seed=4)[0])


def test_pca_baseline_separates_planted_groups():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 500)) * 2
    X = np.vstack([c + rng.standard_normal((8, 500)) for c in centers]).astype(np.float32)
    train = X[::2]
    scores = baseline.pca_scores(train, X, components=5, seed=0)
    assert scores.shape == (24, 5)
    assert baseline.n_components(10, 4) == 3
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    labels = KMeans(3, n_init=10, random_state=0).fit_predict(scores)
    assert adjusted_rand_score(np.repeat([0, 1, 2], 8), labels) == 1.0


def test_plot_coassignment(tmp_path):
    final = np.array([1, 0, 1, 0])
    co = stability.coassignment([final, np.array([1, 1, 0, 0])])
    path = figures.plot_coassignment(co, final, ["a", "b", "c", "d"], tmp_path / "co.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_subsamples_come_from_every_model_so_one_model_does_not_decide(tmp_path):
    """The final embedding merges planted strata 1 and 2, the three fold models keep them
    apart: with the subsamples drawn from the models' embeddings in turn the consensus keeps
    the three strata (drawn from the final embedding alone, half the consensus would merge them)."""
    import h5py
    from mmfusion.config import default_config
    from mmfusion.strata import validity

    rng = np.random.default_rng(3)
    truth = np.repeat([0, 1, 2], 8)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    separate = [centres[truth] + rng.normal(0, 0.4, (24, 2)) for _ in range(3)]
    final = np.where(truth[:, None] == 2, centres[1], centres[truth]) + rng.normal(0, 0.4, (24, 2))
    ids = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(24)], "session": [""] * 24})
    (tmp_path / "cv").mkdir()
    with h5py.File(tmp_path / "cv" / "fold_embeddings.h5", "w") as h5:
        h5["participant_id"] = ids["participant_id"].to_numpy().astype("S")
        h5["session"] = ids["session"].to_numpy().astype("S")
        h5["model"] = np.stack(separate)
        h5["baseline"] = np.stack(separate)
    cfg = {**default_config()["stratify"], "damping_n": 3, "preference_n": 40, "subsamples": 8}
    final_labels = (truth > 0).astype(int)  # the final model's AP fit: strata 1 and 2 merged
    out = validity.run_stability(tmp_path, ids, final, final_labels, cfg, seed=0, n_threads=1)
    assert list(out["subsample_models"].values()) == ["final", "fold-01", "fold-02", "fold-03"] * 2
    assert stability.ari(out["strata_labels"], truth) == pytest.approx(1.0)
    assert (tmp_path / "stability" / "stability.json").is_file()
