"""Optional ComBat harmonization of the embedding (mmfusion.strata.harmonize): a planted site
effect is removed, the fit uses the training rows only, bad inputs are refused, and the
config keys are off by default and checked."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

from mmfusion.config import default_config, load_config
from mmfusion.errors import ConfigError, InputDataError
from mmfusion.strata.harmonize import harmonize, harmonize_for_clustering

N, D, GROUPS, SITES = 42, 12, 3, ("A", "B", "C")


def _planted(seed: int = 0):
    """(X, groups, sites, age): 3 planted groups, each balanced over 3 sites; every site
    adds its own offset vector and scales the deviations (site independent of group)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(GROUPS), N // GROUPS)
    site = np.tile(np.arange(len(SITES)), N // len(SITES))  # every group x site cell has rows
    centers = rng.normal(0, 1.5, (GROUPS, D))
    X = centers[groups] + rng.normal(0, 0.6, (N, D))
    shift = rng.normal(0, 4.0, (len(SITES), D))            # additive site effect
    scale = np.array([1.0, 1.8, 0.6])                      # multiplicative site effect
    X = X * scale[site][:, None] + shift[site]
    age = rng.uniform(20, 80, N)
    return X, groups, np.array(SITES, dtype=object)[site], age


def _kmeans_ari(X, groups):
    labels = KMeans(GROUPS, n_init=10, random_state=0).fit_predict(X)
    return adjusted_rand_score(groups, labels)


def test_the_site_effect_is_removed_and_the_groups_come_back():
    X, groups, sites, _ = _planted()
    train = np.ones(N, dtype=bool)
    assert silhouette_score(X, sites) > 0.3            # before: the rows cluster by site
    assert _kmeans_ari(X, groups) < 0.3                 # ... not by group
    H = harmonize(X, sites, train)
    assert H.shape == X.shape and H.dtype == np.float64
    assert silhouette_score(H, sites) < 0.05            # after: no site structure left
    assert _kmeans_ari(H, groups) > 0.9                 # and the planted groups are found
    means = np.array([H[sites == s].mean(axis=0) for s in SITES])
    spread = H.std(axis=0)
    assert np.all(np.abs(means - means.mean(axis=0)) < 0.15 * spread)  # per-site means equal
    sds = np.array([H[sites == s].std(axis=0) for s in SITES])
    assert np.all(np.abs(np.log(sds / sds.mean(axis=0))) < 0.35)       # and per-site scales


def test_fitted_on_the_training_rows_only():
    X, groups, sites, age = _planted(1)
    train = np.zeros(N, dtype=bool)
    train[:30] = True
    cov = pd.DataFrame({"age": age})
    full = harmonize(X, sites, train, cov)
    # the training rows alone give the same training-row output: the other rows change nothing
    alone = harmonize(X[train], sites[train], np.ones(train.sum(), dtype=bool), cov[train].reset_index(drop=True))
    np.testing.assert_allclose(full[train], alone, rtol=1e-10, atol=1e-10)
    # changing a non-training row changes no other row
    X2 = X.copy()
    X2[~train] += 100.0
    again = harmonize(X2, sites, train, cov)
    np.testing.assert_allclose(again[train], full[train], rtol=1e-10, atol=1e-10)
    # ... and a held-out row is adjusted with the training fit (not left as it was)
    assert not np.allclose(full[~train], X[~train])


def test_constant_columns_come_back_unchanged():
    X, _, sites, _ = _planted(2)
    X[:, 3] = 0.0                                  # dead unit
    X[sites == "B", 5] = 1.0                       # constant within one site
    H = harmonize(X, sites, np.ones(N, dtype=bool))
    assert np.all(np.isfinite(H))
    np.testing.assert_array_equal(H[:, [3, 5]], X[:, [3, 5]])
    assert not np.allclose(H[:, 0], X[:, 0])


def test_refusals():
    X, _, sites, _ = _planted(3)
    train = sites != "C"
    with pytest.raises(InputDataError, match=r"site 'C' has no training row"):
        harmonize(X, sites, train)
    one = np.ones(N, dtype=bool)
    lonely = sites.copy()
    lonely[0] = "D"
    with pytest.raises(InputDataError, match=r"site 'D' has 1 training row"):
        harmonize(X, lonely, one)
    with pytest.raises(InputDataError, match=r"at least 2"):
        harmonize(X, np.array(["A"] * N, dtype=object), one)
    gap = sites.copy()
    gap[4] = None
    with pytest.raises(InputDataError, match=r"without a site label"):
        harmonize(X, gap, one)
    with pytest.raises(InputDataError, match=r"covariate 'age' is missing or not numeric"):
        harmonize(X, sites, one, pd.DataFrame({"age": [np.nan] + [1.0] * (N - 1)}))


def _confounds(sites, age):
    return pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(N)], "session": [""] * N,
                         "site": sites, "sex": ["F", "M"] * (N // 2), "age": age})


def test_off_by_default_returns_x_itself():
    cfg = default_config()["stratify"]
    assert cfg["harmonize_site"] is None and cfg["harmonize_covariates"] == []
    X, _, sites, age = _planted(4)
    out, info = harmonize_for_clustering(X, _confounds(sites, age), cfg)
    assert out is X and info == {"status": "off"}


def test_harmonize_for_clustering_from_the_config():
    X, groups, sites, age = _planted(5)
    cfg = {**default_config()["stratify"], "harmonize_site": "site", "harmonize_covariates": ["age"]}
    out, info = harmonize_for_clustering(X, _confounds(sites, age), cfg)
    assert info == {"status": "done", "site_column": "site", "sites": {"A": 14, "B": 14, "C": 14},
                    "covariates": ["age"], "n_train": N}
    np.testing.assert_allclose(out, harmonize(X, sites, np.ones(N, dtype=bool), pd.DataFrame({"age": age})))
    train = np.arange(N) < 33
    _, info = harmonize_for_clustering(X, _confounds(sites, age), cfg, train=train)
    assert info["n_train"] == 33


def test_harmonize_for_clustering_names_the_key_and_the_columns():
    X, _, sites, age = _planted(6)
    base = default_config()["stratify"]
    with pytest.raises(ConfigError, match=r"^stratify.harmonize_site: 'scanner' is not a confound column; "
                                          r"available: site, sex, age"):
        harmonize_for_clustering(X, _confounds(sites, age), {**base, "harmonize_site": "scanner"})
    with pytest.raises(ConfigError, match=r"^stratify.harmonize_covariates: 'bmi' is not a confound column"):
        harmonize_for_clustering(X, _confounds(sites, age), {**base, "harmonize_site": "site",
                                                             "harmonize_covariates": ["bmi"]})
    with pytest.raises(ConfigError, match=r"'sex' is not numeric"):
        harmonize_for_clustering(X, _confounds(sites, age), {**base, "harmonize_site": "site",
                                                             "harmonize_covariates": ["sex"]})
    gap = _confounds(sites, age)
    gap.loc[2, "site"] = None
    with pytest.raises(InputDataError, match=r"'site' is missing for 1 row\(s\) \(sub-02\)"):
        harmonize_for_clustering(X, gap, {**base, "harmonize_site": "site"})


@pytest.mark.parametrize("key, value", [("harmonize_site", 3), ("harmonize_site", ["site"]),
                                        ("harmonize_site", ""), ("harmonize_covariates", "age"),
                                        ("harmonize_covariates", [1])])
def test_the_config_rules_reject_wrong_types(key, value):
    with pytest.raises(ConfigError, match=rf"stratify\.{key}\W"):
        load_config(overrides={"stratify": {key: value}})


def test_the_config_accepts_a_site_column():
    cfg = load_config(overrides={"stratify": {"harmonize_site": "Manufacturer", "harmonize_covariates": ["age"]}})
    assert cfg["stratify"]["harmonize_site"] == "Manufacturer"
