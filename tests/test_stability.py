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
    good = stability.assess(final, same, subs, [3] * 5, threshold=0.75)
    assert good.summary["reproducible"] and good.summary["n_stable_clusters"] == 3
    assert good.summary["ari_folds_vs_final"]["median"] == pytest.approx(1.0)
    assert good.summary["subsample_same_n_clusters"] == 1.0
    assert good.coassignment.shape == (30, 30)
    noise = {f"fold-{i}": rng.integers(0, 3, 30) for i in range(3)}
    bad = stability.assess(final, noise, {}, [], threshold=0.75)
    assert not bad.summary["reproducible"]
    assert (bad.clusters["stability"] < 0.6).all()
    assert set(bad.clusters.columns) == {"cluster", "size", "stability", "jaccard_folds", "jaccard_subsamples",
                                         "stable"}
    assert bad.summary["ari_folds_vs_final"]["median"] < 0.3


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
