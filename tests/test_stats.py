"""Kruskal-Wallis, FDR, the vectorized permutation test, cluster profiles."""
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from mmfusion.strata import stats


def _data(n=120, k=4, G=3, effect=1.0, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, G, n)
    scores = rng.standard_normal((n, k))
    scores[:, 0] += effect * labels
    if ties:
        scores = np.round(scores, 1)
    return pd.DataFrame(scores, columns=[f"F{i + 1}" for i in range(k)]), labels


@pytest.mark.parametrize("ties", [False, True])
def test_vectorized_h_equals_scipy(ties):
    scores, labels = _data(ties=ties)
    h_obs, _ = stats.permutation_null(scores.to_numpy(), labels, n_permutations=10)
    want = [sps.kruskal(*[scores.iloc[labels == g, f] for g in range(3)]).statistic for f in range(4)]
    np.testing.assert_allclose(h_obs, want, rtol=1e-12)


def test_null_statistics_are_kw_of_size_preserving_repartitions():
    scores, labels = _data(n=60, G=4)
    h_obs, null = stats.permutation_null(scores.to_numpy(), labels, n_permutations=2000, seed=1)
    assert null.shape == (2000, 4)
    # under H0, H is ~ chi2(G - 1): mean ~ 3, and the 95th percentile ~ 7.8
    assert 2.6 < null.mean() < 3.4
    assert 6.8 < np.percentile(null, 95) < 8.8
    # reproducible with the seed
    np.testing.assert_array_equal(null, stats.permutation_null(scores.to_numpy(), labels, 2000, seed=1)[1])


def test_permutation_pvalue_formula():
    h_obs = np.array([5.0, 1.0])
    null = np.array([[1.0, 1.0], [6.0, 0.5], [5.0, 2.0], [2.0, 1.0 - 1e-13]])
    # ties with the observed value count; tiny round-off below it counts too
    np.testing.assert_allclose(stats.permutation_pvalues(h_obs, null), [(1 + 2) / 5, (1 + 3) / 5])


def test_run_stats_detects_the_planted_factor_only():
    scores, labels = _data(n=150, k=5, effect=1.0, seed=3)
    res = stats.run_stats(scores, labels, {"alpha": 0.05, "n_permutations": 999}, seed=0)
    t = res.table.set_index("factor")
    assert t.loc["F1", "significant"] and t.loc["F1", "perm_significant"]
    assert t.loc["F1", "perm_p"] == pytest.approx(1 / 1000)
    assert not t.loc[["F2", "F3", "F4", "F5"], "significant"].any()
    np.testing.assert_allclose(t["q"], multipletests(t["p"], method="fdr_bh")[1])
    np.testing.assert_allclose(t["perm_q"], multipletests(t["perm_p"], method="fdr_bh")[1])
    # permutation and asymptotic p agree roughly on null factors
    assert np.all(np.abs(t["perm_p"] - t["p"]).iloc[1:] < 0.1)


def test_a_single_cluster_is_refused():
    scores, _ = _data()
    with pytest.raises(stats.StatsInputError, match="1 cluster"):
        stats.run_stats(scores, np.zeros(len(scores), int), {"alpha": 0.05, "n_permutations": 10})


def test_profiles_are_quantiles_of_cluster_medians():
    scores = pd.DataFrame({"F1": [1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10]})
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    q, med = stats.cluster_profiles(scores, labels)
    assert med["F1"].tolist() == [3.0, 8.0]
    assert q["F1"].tolist() == [0.3, 0.8]


def test_permutation_test_is_fast():
    scores, labels = _data(n=1000, k=13, G=9)
    t0 = time.perf_counter()
    stats.permutation_null(scores.to_numpy(), labels, n_permutations=2000)
    assert time.perf_counter() - t0 < 5.0     # the bench: 10000 permutations in < 10 s


def test_write_outputs(tmp_path):
    scores, labels = _data(n=90, seed=4)
    res = stats.run_stats(scores, labels, {"alpha": 0.05, "n_permutations": 200})
    paths = stats.write_outputs(res, scores, labels, tmp_path)
    table = pd.read_csv(paths["table"], sep="\t")
    assert list(table.columns[:8]) == ["factor", "H", "p", "q", "significant", "perm_p", "perm_q", "perm_significant"]
    prof = pd.read_csv(paths["profiles"], sep="\t")
    assert prof["size"].sum() == 90
    for key in ("profiles_png", "distributions_png", "null_png"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
