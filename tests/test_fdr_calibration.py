"""Calibration machinery of bench/bench_fdr_calibration.py (mmfusion.strata.calibration) on a few small datasets.

The bench runs the production path (prepare_variables + factor_analysis + run_stats +
match_factors) over many simulated datasets; here a handful checks that the bookkeeping
is right: null data rarely gives significance, a strong planted effect is found and
attributed to the planted latent factors, and labels unrelated to the strata give nothing.
"""
from __future__ import annotations

import numpy as np
import pytest

from mmfusion.strata import calibration
from mmfusion.config import default_config


@pytest.fixture(scope="module")
def bench():
    """The calibration helpers the bench uses (in mmfusion.strata.calibration)."""
    return calibration


@pytest.fixture(scope="module")
def cfg():
    c = default_config()
    c["stats"]["n_permutations"] = 500
    return c


@pytest.fixture(scope="module")
def null_tables(bench, cfg):
    return bench.run_series(5, 90, 3, True, cfg, seed=11)


def test_null_pvalues_valid_and_rarely_significant(bench, null_tables):
    for t in null_tables:
        assert len(t) >= 2
        assert ((t["p"] > 0) & (t["p"] <= 1)).all()
        assert ((t["perm_p"] >= 1 / 501 - 1e-12) & (t["perm_p"] <= 1)).all()
        assert (t["q"] >= t["p"] - 1e-12).all() and (t["perm_q"] >= t["perm_p"] - 1e-12).all()
        assert not t["latent_planted"].any()  # nothing is planted under the null
    s = bench.null_summary(null_tables)
    assert s["datasets"] == 5 and s["tests"] == sum(len(t) for t in null_tables)
    # 5% nominal FWER: 3 or more of 5 datasets flagged would be a broken test (p < 0.002).
    assert s["fwer_kw"] <= 0.4 and s["fwer_perm"] <= 0.4
    assert s["raw_p05_kw"] < 0.25 and s["raw_p05_perm"] < 0.25
    # the two tests see the same data: their uncorrected p-values must agree closely
    allp = np.concatenate([t["p"] for t in null_tables])
    allpp = np.concatenate([t["perm_p"] for t in null_tables])
    assert np.corrcoef(allp, allpp)[0, 1] > 0.95


def test_planted_effect_detected_and_attributed(bench, cfg):
    tables = bench.run_series(2, 90, 3, False, cfg, seed=12)
    s = bench.planted_summary(tables)
    assert s["planted_matched"] == 1.0
    assert s["power_kw"] == 1.0 and s["power_perm"] == 1.0
    for t in tables:
        assert len(t["planted_latents"].iloc[0].split(",")) == 2
        for name in t["planted_latents"].iloc[0].split(","):
            assert t.loc[t["best_latent"] == name, "r"].abs().max() > 0.6


def test_labels_unrelated_to_strata_give_no_power(bench, cfg):
    rng = np.random.default_rng(5)
    strata = bench.balanced_strata(rng, 90, 3)
    labels = rng.permutation(strata)  # same sizes, independent of the planted strata
    t = bench.evaluate_dataset(strata, labels, pheno_seed=7, null=False, cfg=cfg)
    assert t["latent_planted"].sum() >= 2  # the planted factors are there...
    assert not t["significant"].all()      # ...but the clusters do not carry them
    assert t.loc[t["latent_planted"], "q"].min() > 0.05


def test_mislabel_changes_the_requested_fraction(bench):
    rng = np.random.default_rng(0)
    labels = bench.balanced_strata(rng, 300, 3)
    out = bench.mislabel(rng, labels, 0.3)
    changed = float(np.mean(out != labels))
    assert 0.12 < changed < 0.3  # 30% re-drawn, a third of them to the same label
    assert np.array_equal(np.unique(out), [1, 2, 3])
