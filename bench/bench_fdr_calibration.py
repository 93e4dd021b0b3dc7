"""Calibration of the group statistics: false positives on null data, power on planted data.

Every dataset goes through the production path of ``mmfusion.levels.group.run_analysis``
minus the file I/O: ``phenotypes.prepare_variables`` + ``phenotypes.factor_analysis``
(default config), then ``stats.run_stats`` (Kruskal-Wallis + Benjamini-Hochberg FDR and
the size-preserving permutation test + BH-FDR, alpha 0.05) and, for planted data,
``ground_truth.match_factors`` (each estimated factor -> latent factor it correlates with
most). Phenotypes come from :func:`mmfusion.simulate.simulate_phenotypes` (no images).
The per-dataset machinery (``run_series``, ``null_summary``, ``planted_summary``) lives in
:mod:`mmfusion.strata.calibration`, so tests/test_fdr_calibration.py imports it from the package.

* Null: ``--datasets`` datasets with ``null=True`` (phenotypes independent of the strata);
  clusters = the strata (near-equal sizes). Reports the family-wise false-positive rate
  (fraction of datasets with >= 1 factor at q < 0.05) for KW-FDR and permutation-FDR,
  the per-test rate after FDR, and the uncorrected p < 0.05 rate (should be ~5%).
* Planted: ``--datasets`` datasets with ``null=False`` (2 of 5 latent factors and one of
  age/BMI shift by 1 SD / 8 y / 3 kg/m2 between consecutive strata); clusters = the strata
  (perfect clustering) and, as further rows, the strata with ``--mislabel`` of the labels
  re-drawn at random. Power = fraction of (dataset, planted latent factor) pairs for which
  some estimated factor matched to it (best match, |r| >= 0.5) is significant; "other
  flagged" = fraction of the remaining estimated factors (not matched to a planted latent
  factor, no |loading| >= 0.3 on the planted demographic) that are significant.
* ARI (``--ari``): one simulated image dataset (6 mm, 30 subjects, 3 strata); the TRUE
  template-space log-Jacobian, FA and NDI maps inside the template mask are used, one
  modality at a time, as "embeddings" for ``stratify.grid_search`` (reduced grid: 5
  dampings x 100 preferences); ARI of the chosen clustering vs the strata (and, as
  references, the strata's share of the maps' variance, k-means told the true k, and both
  on oracle features: the true log-Jacobian at the planted JAC region centres).
  This is an UPPER BOUND (truth maps, not learned embeddings).

Usage: ``OMP_NUM_THREADS=2 python bench/bench_fdr_calibration.py [--datasets 40 --n 150
--strata 3 --permutations 2000 --mislabel 0.3 0.6 --seed 0 --ari]`` (``--ari-only``: just the ARI part)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.strata.calibration import null_summary, planted_summary, run_series


def cluster_scores(X: np.ndarray, truth_labels: np.ndarray, scfg: dict, seed: int, threads: int,
                   source: str) -> dict:
    """AP (``stratify.grid_search``) and k-means (told the true k) on ``X`` (n, features) vs the strata.

    Also the share of the total variance of ``X`` that the strata explain (between-stratum
    sum of squares / total sum of squares).
    """
    from sklearn.cluster import KMeans  # reference only: told the true number of strata
    from sklearn.metrics import adjusted_rand_score

    from mmfusion.strata import ap_grid

    t0 = time.perf_counter()
    grid = ap_grid.grid_search(X, scfg, seed=seed, n_threads=threads, source=source)
    t_grid = time.perf_counter() - t0
    strata = np.unique(truth_labels)
    km = KMeans(len(strata), n_init=10, random_state=seed).fit_predict(X)
    means = np.stack([X[truth_labels == k].mean(axis=0) for k in strata])
    between = ((means[np.searchsorted(strata, truth_labels)] - X.mean(axis=0)) ** 2).sum()
    return {"stratum_r2": float(between / ((X - X.mean(axis=0)) ** 2).sum()),
            "grid_points": len(grid.grid), "valid": int(grid.grid["valid"].sum()),
            "chosen_clusters": int(grid.best["n_clusters"]), "chosen_silhouette": float(grid.best["silhouette"]),
            "ari": float(adjusted_rand_score(truth_labels, grid.labels)),
            "cluster_sizes": np.bincount(grid.labels).tolist(),
            "kmeans_ari": float(adjusted_rand_score(truth_labels, km)), "grid_s": t_grid}


TRUE_MAPS = {"log-JAC": "logjac", "FA": "fa", "NDI": "ndi"}  # label -> desc-true_<x> in ground_truth


def ari_upper_bound(cfg: dict, seed: int, n_subjects: int = 30, n_strata: int = 3, voxel: float = 6.0,
                    damping_n: int = 5, preference_n: int = 100, threads: int = 2) -> dict:
    """ARI of AP (reduced grid) on the true log-Jacobian, FA and NDI maps of a simulated dataset.

    Returns ``{"maps": {label: cluster_scores(...)}, "oracle": ..., "n_subjects", "voxels_in_mask",
    "chance_r2", "sim_s"}``; the oracle features are the true log-Jacobians at the planted
    JAC region centres.
    """
    import nibabel as nib

    from mmfusion.simulate import simulate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = simulate_dataset(Path(tmp) / "sim", n_subjects=n_subjects, n_strata=n_strata,
                                voxel_size=voxel, seed=seed)
        t_sim = time.perf_counter() - t0
        truth = root / "sourcedata" / "ground_truth"
        strata = pd.read_csv(truth / "strata.tsv", sep="\t").sort_values("participant_id")
        mask = np.asarray(nib.load(truth / "template_mask.nii.gz").dataobj) > 0
        maps = {label: np.stack([np.asarray(nib.load(truth / f"{pid}_space-template_desc-true_{key}.nii.gz").dataobj)
                                 for pid in strata["participant_id"]]).astype(np.float64)
                for label, key in TRUE_MAPS.items()}
        regions = json.loads((truth / "planted.json").read_text())["regions"]
    truth_labels = strata["stratum"].to_numpy()
    scfg = dict(cfg["stratify"], damping_n=damping_n, preference_n=preference_n)
    out = {"maps": {label: cluster_scores(m[:, mask], truth_labels, scfg, seed, threads, f"true {label} maps")
                    for label, m in maps.items()}}
    centres = [tuple(int(round(c)) for c in r["center_voxel_template_grid"]) for r in regions if r["kind"] == "jac"]
    X_oracle = np.stack([maps["log-JAC"][(slice(None),) + c] for c in centres], axis=1)  # (n, regions)
    out["oracle"] = cluster_scores(X_oracle, truth_labels, scfg, seed, threads, "planted-centre values")
    out.update(oracle_regions=len(centres), chance_r2=(n_strata - 1) / (n_subjects - 1), n_subjects=n_subjects,
               voxels_in_mask=int(mask.sum()), sim_s=t_sim)
    return out


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", type=int, default=40, help="datasets per condition (>= 20)")
    p.add_argument("--n", type=int, default=150, help="subjects per dataset")
    p.add_argument("--strata", type=int, default=3)
    p.add_argument("--permutations", type=int, default=2000)
    p.add_argument("--mislabel", type=float, nargs="+", default=[0.3, 0.6],
                   help="fractions of cluster labels re-drawn at random (extra planted rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ari", action="store_true", help="also the ARI upper bound on true log-Jacobians")
    p.add_argument("--ari-subjects", type=int, default=30, help="subjects of the 6 mm image dataset")
    p.add_argument("--ari-only", action="store_true", help="only the ARI upper bound")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main():
    args = _parse()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import logging

    from mmfusion.config import default_config

    logging.getLogger("mmfusion").setLevel(logging.ERROR)
    cfg = default_config()
    cfg["stats"]["n_permutations"] = args.permutations
    print(f"datasets/condition={args.datasets} n={args.n} strata={args.strata} "
          f"permutations={args.permutations} alpha={cfg['stats']['alpha']} seed={args.seed} "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    if args.ari_only:
        return _print_ari(cfg, args)
    t0 = time.perf_counter()
    null = null_summary(run_series(args.datasets, args.n, args.strata, True, cfg, args.seed))
    t_null = time.perf_counter() - t0
    print(f"\nNULL (phenotypes independent of strata; clusters = strata) [{t_null:.1f} s]")
    print(f"  {'test':<10} {'FWER (>=1 sig)':>15} {'per-test FPR':>13} {'raw p<0.05':>11} {'tests':>6}")
    for key, name in [("kw", "KW-FDR"), ("perm", "perm-FDR")]:
        print(f"  {name:<10} {null['fwer_' + key]:>15.3f} {null['per_test_' + key]:>13.4f} "
              f"{null['raw_p05_' + key]:>11.3f} {null['tests']:>6d}")
    print(f"  factors per dataset: {null['factors_per_dataset']:.2f}")

    print("\nPLANTED (2 of 5 latent factors + age or BMI shift with the stratum)")
    print(f"  {'clusters':<22} {'test':<9} {'power':>6} {'all planted':>12} {'other flagged':>14} {'others':>7}")
    for frac in (0.0, *args.mislabel):
        t0 = time.perf_counter()
        tables = run_series(args.datasets, args.n, args.strata, False, cfg, args.seed + 1, frac)
        s = planted_summary(tables)
        label = "strata (perfect)" if frac == 0 else f"strata, {frac:.0%} relabelled"
        for key, name in [("kw", "KW-FDR"), ("perm", "perm-FDR")]:
            print(f"  {label:<22} {name:<9} {s['power_' + key]:>6.3f} {s['all_planted_' + key]:>12.3f} "
                  f"{s['other_flagged_' + key]:>14.3f} {s['other_tests']:>7d}")
        print(f"  ({label}: planted factors with a matched estimated factor: {s['planted_matched']:.3f}; "
              f"factors per dataset {s['factors_per_dataset']:.2f}; {time.perf_counter() - t0:.1f} s)")

    if args.ari:
        _print_ari(cfg, args)


def _print_ari(cfg: dict, args) -> None:
    a = ari_upper_bound(cfg, args.seed, n_subjects=args.ari_subjects, n_strata=args.strata,
                        threads=args.threads)
    print("\nARI UPPER BOUND (AP on TRUE template-space maps, not learned embeddings)")
    print(f"  subjects={a['n_subjects']} voxels={a['voxels_in_mask']} strata={args.strata} "
          f"[simulate {a['sim_s']:.1f} s]; chance level of the strata's variance share: {a['chance_r2']:.3f}")
    print(f"  {'maps':<9} {'strata R2':>9} {'AP grid (valid)':>15} {'AP clusters':>11} {'silhouette':>10} "
          f"{'AP ARI':>7} {'k-means ARI':>11}  AP cluster sizes")
    for label, r in [*a["maps"].items(), (f"oracle{a['oracle_regions']}", a["oracle"])]:
        print(f"  {label:<9} {r['stratum_r2']:>9.3f} {r['grid_points']:>8d} ({r['valid']:>4d}) "
              f"{r['chosen_clusters']:>11d} {r['chosen_silhouette']:>10.3f} {r['ari']:>7.3f} "
              f"{r['kmeans_ari']:>11.3f}  {r['cluster_sizes']}")
    print(f"  (oracle{a['oracle_regions']}: the true log-JAC at the {a['oracle_regions']} planted JAC region "
          f"centres; k-means is told k={args.strata})")


if __name__ == "__main__":
    main()
