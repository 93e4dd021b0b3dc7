"""Calibration of the phenotype statistics on simulated phenotypes.

False positives on null data and power on planted data, through the production path
(prepare_variables + factor_analysis + run_stats + match_factors) minus the file I/O;
bench/bench_fdr_calibration.py runs many datasets, tests/test_fdr_calibration.py a few.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.strata import phenotypes as ph
from mmfusion.strata import stats
from mmfusion.strata.ground_truth import match_factors


def _raw_table(pheno) -> pd.DataFrame:
    """participants + phenotype tables as text cells (what load_phenotypes returns)."""
    df = pd.concat([pheno.participants] + list(pheno.tables.values()), axis=1)
    df.index = pd.Index([f"sub-{i + 1:03d}" for i in range(len(df))], name="participant_id")
    return df.astype(object).where(df.notna(), None).map(lambda v: None if v is None else str(v))


def evaluate_dataset(strata: np.ndarray, labels: np.ndarray, pheno_seed: int, null: bool, cfg: dict,
                     stats_seed: int = 0) -> pd.DataFrame:
    """Simulate phenotypes for ``strata`` (n,) ints 1..K, test them across ``labels`` (n,).

    Returns one row per estimated factor: p, q, significant, perm_p, perm_q,
    perm_significant, best_latent, r, latent_planted, planted_demographics_loading,
    planted_latents (comma-joined names of the planted latent factors, same on every row).
    """
    from mmfusion.simulate import simulate_phenotypes

    pheno = simulate_phenotypes(np.asarray(strata), np.random.default_rng(pheno_seed), null=null)
    raw = _raw_table(pheno)
    table = ph.prepare_variables(raw, cfg["phenotypes"], source="simulated")
    fa = ph.factor_analysis(table.data, cfg["phenotypes"]["eigenvalue_threshold"])
    result = stats.run_stats(fa.scores, np.asarray(labels), cfg["stats"], seed=stats_seed)
    with tempfile.TemporaryDirectory() as tmp:
        latent_tsv = Path(tmp) / "latent_factors.tsv"
        pheno.latent.assign(participant_id=raw.index).to_csv(latent_tsv, sep="\t", index=False)
        match = match_factors(fa, latent_tsv, pheno.planted, result)
    cols = ["factor", "p", "q", "significant", "perm_p", "perm_q", "perm_significant"]
    out = result.table[cols].merge(match.drop(columns=["significant", "perm_significant"]), on="factor")
    out["planted_latents"] = ",".join(f["name"] for f in pheno.planted["latent_factors"] if f["depends_on_stratum"])
    return out


def balanced_strata(rng, n: int, n_strata: int) -> np.ndarray:
    """(n,) labels 1..K in near-equal numbers, random order (as simulate_dataset does)."""
    return rng.permutation(np.arange(n) % n_strata + 1)


def mislabel(rng, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Copy of labels with ``fraction`` of them re-drawn uniformly from the label set."""
    out = labels.copy()
    idx = rng.choice(len(out), int(round(fraction * len(out))), replace=False)
    out[idx] = rng.choice(np.unique(labels), len(idx))
    return out


def run_series(n_datasets: int, n: int, n_strata: int, null: bool, cfg: dict, seed: int,
               mislabel_fraction: float = 0.0) -> list[pd.DataFrame]:
    """``n_datasets`` independent datasets (seeded by ``seed``); one table per dataset."""
    seeds = np.random.SeedSequence(seed).spawn(n_datasets)
    out = []
    for i, ss in enumerate(seeds):
        rng = np.random.default_rng(ss)
        strata = balanced_strata(rng, n, n_strata)
        pheno_seed = int(rng.integers(2**31))
        labels = mislabel(rng, strata, mislabel_fraction) if mislabel_fraction else strata
        out.append(evaluate_dataset(strata, labels, pheno_seed, null, cfg, stats_seed=i))
    return out


def null_summary(tables: list[pd.DataFrame]) -> dict:
    """Family-wise and per-test false-positive rates over null datasets."""
    all_rows = pd.concat(tables)
    return {
        "datasets": len(tables),
        "factors_per_dataset": float(np.mean([len(t) for t in tables])),
        "fwer_kw": float(np.mean([t["significant"].any() for t in tables])),
        "fwer_perm": float(np.mean([t["perm_significant"].any() for t in tables])),
        "per_test_kw": float(all_rows["significant"].mean()),
        "per_test_perm": float(all_rows["perm_significant"].mean()),
        "raw_p05_kw": float((all_rows["p"] < 0.05).mean()),
        "raw_p05_perm": float((all_rows["perm_p"] < 0.05).mean()),
        "tests": len(all_rows),
    }


MATCH_R = 0.5  # |r| with its best latent factor for an estimated factor to represent it


def planted_summary(tables: list[pd.DataFrame]) -> dict:
    """Power for the planted latent factors and the rate of other factors flagged.

    An estimated factor represents latent factor f when f is its best match
    (:func:`match_factors`) with |r| >= ``MATCH_R``; weaker matches count as "other".
    """
    planted = [[f for f in t["planted_latents"].iloc[0].split(",") if f] for t in tables]
    tables = [t.assign(best_latent=t["best_latent"].where(t["r"].abs() >= MATCH_R, ""),
                       latent_planted=t["latent_planted"] & (t["r"].abs() >= MATCH_R)) for t in tables]
    out = {"datasets": len(tables), "factors_per_dataset": float(np.mean([len(t) for t in tables]))}
    for col, key in [("significant", "kw"), ("perm_significant", "perm")]:
        hits = [any(t.loc[t["best_latent"] == f, col].any() for f in names) for t, names in zip(tables, planted)]
        per_factor = [bool(t.loc[t["best_latent"] == f, col].any()) for t, names in zip(tables, planted)
                      for f in names]
        all_found = [all(t.loc[t["best_latent"] == f, col].any() for f in names)
                     for t, names in zip(tables, planted)]
        other = pd.concat([t[(~t["latent_planted"]) & (t["planted_demographics_loading"].fillna("") == "")]
                           for t in tables])
        out[f"power_{key}"] = float(np.mean(per_factor))
        out[f"all_planted_{key}"] = float(np.mean(all_found))
        out[f"any_planted_{key}"] = float(np.mean(hits))
        out[f"other_flagged_{key}"] = float(other[col].mean()) if len(other) else float("nan")
        out["other_tests"] = len(other)
    out["planted_matched"] = float(np.mean([sum(f in set(t["best_latent"]) for f in names) / len(names)
                                            for t, names in zip(tables, planted)]))
    return out
