"""Is the stratification real? The checks every group run makes on its strata.

docs/method.md#6-clustering ("Baseline", "Stability", "Confounds"). Orchestration of
:mod:`mmfusion.strata.ap_grid` (the same AP grid search as the strata), :mod:`mmfusion.strata.stability`
and :mod:`mmfusion.strata.confounds`; called by the group level (:mod:`mmfusion.levels.group`) with the
final model's clustering, it returns the strata (``stratify.strata_from``: by default the
consensus of the final and fold models' and the subsamples' clusterings,
:func:`choose_strata`) and their checks. Outputs::

    group/baseline/    embeddings.tsv (written by training), strata/ (labels.tsv, ap_grid.*),
                       comparison.json (ARI baseline vs learned strata)
    group/stability/   labelings.tsv (participant_id, session, strata, final, fold-NN, subsample-NN,
                       baseline, baseline_fold-NN; -1 = left out), agreement.tsv (a, b, ari, n),
                       clusters.tsv (cluster, size, stability, jaccard_models,
                       jaccard_subsamples, stable), coassignment.tsv, coassignment.png,
                       stability.json
    group/confounds/   confounds.tsv, confound_tests.tsv
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.strata import stability
from mmfusion.strata import ap_grid
from mmfusion.report import figures
from mmfusion.io.atomic import atomic_path, write_json
from mmfusion.io.embeddings import read_embeddings
from mmfusion.runlog import get_logger, progress

log = get_logger(__name__)


def _read_fold_embeddings(path: Path, ids: pd.DataFrame) -> dict[str, np.ndarray] | None:
    """{'model': (k, n, D), 'baseline': (k, n, c)} from cv/fold_embeddings.h5, rows in the
    order of ``ids``; None when the file is absent or holds other subjects."""
    import h5py

    if not path.is_file():
        return None
    with h5py.File(path, "r") as h5:
        keys = [(p.decode() if isinstance(p, bytes) else str(p), s.decode() if isinstance(s, bytes) else str(s))
                for p, s in zip(h5["participant_id"][...], h5["session"][...])]
        arrays = {k: h5[k][...] for k in ("model", "baseline")}
    where = {k: i for i, k in enumerate(keys)}
    wanted = list(zip(ids["participant_id"], ids["session"]))
    if set(wanted) - set(where):
        log.warning("%s holds other subjects than the embeddings; fold stability skipped", path)
        return None
    order = [where[k] for k in wanted]
    return {k: v[:, order] for k, v in arrays.items()}


def _cluster(X: np.ndarray, cfg: dict, seed: int, n_threads: int, source: str) -> np.ndarray | None:
    """Labels (n,) of the product's AP grid search (quiet); None (logged) when no grid
    point gives a valid clustering of these rows."""
    try:
        return ap_grid.grid_search(X, cfg, seed=seed, n_threads=n_threads, source=source, quiet=True).labels
    except ap_grid.ClusteringError as exc:
        log.info("stability: %s; that clustering is left out", exc)
        return None


def run_baseline(group: Path, ids: pd.DataFrame, cfg: dict, seed: int, n_threads: int, prepare=None) -> dict:
    """Cluster the PCA baseline (group/baseline/embeddings.tsv) with the same grid search;
    returns {'labels' (n,), 'n_clusters', ...} or {'status': 'not run: ...'}
    (:func:`write_baseline_comparison` adds the ARI with the strata)."""
    tsv = group / "baseline" / "embeddings.tsv"
    if not tsv.is_file():
        return {"status": f"not run: {tsv} not found (written by the group-level training)"}
    base_ids, B = read_embeddings(tsv)
    if list(base_ids.itertuples(index=False)) != list(ids.itertuples(index=False)):
        return {"status": f"not run: {tsv} holds other subjects than the embeddings"}
    B = prepare(B) if prepare else B
    log.info("baseline: AP grid search on the %d-component PCA of the images", B.shape[1])
    try:
        grid = ap_grid.grid_search(B, cfg, seed=seed, n_threads=n_threads, source=str(tsv))
    except ap_grid.ClusteringError as exc:
        log.warning("baseline not clustered: %s", exc)
        return {"status": f"not run: {exc}"}
    paths = ap_grid.write_outputs(grid, ids, group / "baseline" / "strata")
    out = {"status": "done", "components": int(B.shape[1]), "n_clusters": int(grid.best["n_clusters"]),
           "silhouette": float(grid.best["silhouette"]), "cluster_sizes": np.bincount(grid.labels).tolist(),
           "outputs": {k: str(v) for k, v in paths.items()}}
    return {**out, "labels": grid.labels}


def write_baseline_comparison(group: Path, base: dict, strata: np.ndarray) -> dict:
    """The baseline summary ``base`` (from :func:`run_baseline`, without its labels) with
    its ARI with the ``strata`` (n,) -> group/baseline/comparison.json."""
    labels = base.pop("labels", None)
    if labels is None:
        return base
    base["ari_with_strata"] = stability.ari(strata, labels)
    write_json(group / "baseline" / "comparison.json", base)
    log.info("baseline: %d clusters; ARI with the learned strata %.3f", base["n_clusters"], base["ari_with_strata"])
    return base


def choose_strata(final: np.ndarray, consensus: np.ndarray, strata_from: str) -> tuple[np.ndarray, dict]:
    """The strata (n,) and how they were made: the final model's clustering ``final`` (n,)
    (``strata_from`` 'final_model'), or the :func:`mmfusion.strata.stability.consensus_labels`
    of the ``consensus`` (n, n) matrix ('consensus'); the final model's clustering when the
    consensus puts every row in one stratum or each in its own (no partition to test)."""
    n = len(final)
    if strata_from == "final_model":
        return np.asarray(final), {"source": "final_model"}
    labels = stability.consensus_labels(consensus)
    k = int(labels.max()) + 1
    if 1 < k < n:
        return labels, {"source": "consensus"}
    why = (f"the consensus of the clusterings found no partition ({k} stratum for {n} rows)" if k == 1 else
           f"the consensus of the clusterings found no partition (every one of the {n} rows on its own)")
    log.warning("%s; the strata are the final model's clustering", why)
    return np.asarray(final), {"source": "final_model", "fallback": why}


def run_stability(group: Path, ids: pd.DataFrame, X: np.ndarray, final: np.ndarray, cfg: dict, seed: int,
                  n_threads: int, baseline_labels: np.ndarray | None = None, prepare=None) -> dict:
    """The fold models' and subsamples' clusterings, the strata chosen from them and the
    final model's clustering ``final`` (n,) (:func:`choose_strata`), and their stability
    (:func:`mmfusion.strata.stability.assess`); writes group/stability/ and returns the
    summary (with ``strata`` (n,) and the labelings). ``prepare`` (optional) maps each fold
    embedding before clustering, as the final one was (harmonization)."""
    out_dir = group / "stability"
    n = len(final)
    folds: dict[str, np.ndarray] = {}
    baseline_folds: dict[str, np.ndarray] = {}
    embeddings = {"final": X}  # each model's embedding of all rows, as clustered
    fold_emb = _read_fold_embeddings(group / "cv" / "fold_embeddings.h5", ids)
    if fold_emb is not None:
        for f in progress(range(fold_emb["model"].shape[0]), "stability: fold models", logger=log):
            name = f"fold-{f + 1:02d}"
            embeddings[name] = prepare(fold_emb["model"][f]) if prepare else fold_emb["model"][f]
            baseline_X = prepare(fold_emb["baseline"][f]) if prepare else fold_emb["baseline"][f]
            for group_of, key, X_fold in ((folds, name, embeddings[name]),
                                          (baseline_folds, f"baseline_{name}", baseline_X)):
                lab = _cluster(X_fold, cfg, seed, n_threads, f"{key} embeddings")
                if lab is not None:
                    group_of[key] = lab
    subsamples, sub_k, sub_models = {}, [], {}
    rows = stability.subsample_indices(n, int(cfg["subsamples"]), float(cfg["subsample_fraction"]), seed)
    for i, (idx, model) in enumerate(progress(list(zip(rows, stability.round_robin(list(embeddings), len(rows)))),
                                              "stability: subsamples", logger=log)):
        lab = _cluster(embeddings[model][idx], cfg, seed, n_threads, f"subsample {i + 1} of the {model} embeddings")
        if lab is not None:
            subsamples[f"subsample-{i + 1:02d}"] = stability.expand(lab, idx, n)
            sub_k.append(int(lab.max()) + 1)
            sub_models[f"subsample-{i + 1:02d}"] = model
    consensus = stability.consensus_matrix([final, *folds.values()], list(subsamples.values()))
    strata, how = choose_strata(final, consensus, cfg["strata_from"])
    # the final model's clustering is not evidence for strata made from it: only the fold
    # models (trained without a share of the subjects) and the subsamples are compared
    result = stability.assess(strata, folds, subsamples, sub_k, float(cfg["stability_threshold"]), consensus)
    result.summary["strata"] = {**how, "n_strata": int(strata.max()) + 1, "sizes": np.bincount(strata).tolist(),
                                "final_model_n_clusters": int(final.max()) + 1}
    result.summary["ari_final_model_vs_strata"] = stability.ari(final, strata)
    result.summary["subsample_models"] = sub_models
    if baseline_labels is not None:
        base = {"baseline": baseline_labels, **baseline_folds}
        result.summary["baseline_folds_vs_baseline"] = stability.median_range(
            [stability.ari(baseline_labels, lab) for lab in baseline_folds.values()])
    else:
        base = baseline_folds
    labelings = {"strata": strata, "final": final, **folds, **subsamples, **base}
    _write_stability(out_dir, ids, labelings, result)
    log.info("strata: %d (%s; the final model's clustering alone: %d clusters, ARI with the strata %s)",
             result.summary["n_clusters"], how["source"].replace("_", " "), int(final.max()) + 1,
             _fmt(stability.ari(final, strata)))
    log.info("stability: %d of %d strata stable (Jaccard >= %.2f); fold models vs strata: median ARI %s; "
             "same number of clusters in %s of %d subsamples", result.summary["n_stable_clusters"],
             result.summary["n_clusters"], result.summary["threshold"],
             _fmt(result.summary["ari_folds_vs_strata"]["median"]),
             _fmt(result.summary["subsample_same_n_clusters"], pct=True), len(subsamples))
    return {**result.summary, "clusters": result.clusters.to_dict(orient="records"), "labelings": labelings,
            "strata_labels": strata}


def _fmt(x, pct: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def _write_stability(out_dir: Path, ids: pd.DataFrame, labelings: dict[str, np.ndarray],
                     result: stability.StabilityResult) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = ids[["participant_id", "session"]].assign(**{k: np.asarray(v) for k, v in labelings.items()})
    names = [f"{p}_ses-{s}" if s else p for p, s in zip(ids["participant_id"], ids["session"])]
    co = pd.DataFrame(result.coassignment, index=pd.Index(names, name="subject"), columns=names)
    for name, frame, index in (("labelings.tsv", table, False), ("agreement.tsv", result.agreement, False),
                               ("clusters.tsv", result.clusters, False), ("coassignment.tsv", co, True)):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, sep="\t", index=index, float_format="%.4g", na_rep="n/a")
    figures.plot_coassignment(result.coassignment, labelings["strata"], names, out_dir / "coassignment.png")
    write_json(out_dir / "stability.json", result.summary)


def collect_confounds(ctx, ids: pd.DataFrame) -> pd.DataFrame:
    """The confound table (:func:`mmfusion.strata.confounds.collect_confounds`), rows as ``ids``."""
    from mmfusion.strata import confounds

    keys = list(zip(ids["participant_id"], ids["session"]))
    return confounds.collect_confounds(Path(ctx.bids_dir), Path(ctx.output_dir), keys)


def run_confounds(ctx, group: Path, values: pd.DataFrame, strata: np.ndarray) -> dict:
    """Confound tests (:mod:`mmfusion.strata.confounds`) of the ``strata`` (n,) on ``values``."""
    from mmfusion.strata import confounds

    tests = confounds.test_confounds(values, np.asarray(strata), float(ctx.config["stats"]["alpha"]))
    paths = confounds.write_outputs(values, tests, group / "confounds")
    flags = confounds.flagged(tests)
    for line in flags:
        log.warning("confound: %s", line)
    return {"status": "done", "n_tested": int((tests["test"] != "not run").sum()) if len(tests) else 0,
            "flags": flags, "outputs": {k: str(v) for k, v in paths.items()}}


def run_checks(ctx, group: Path, ids: pd.DataFrame, X: np.ndarray, final: np.ndarray, n_threads: int,
               confound_values: pd.DataFrame) -> dict:
    """The strata, chosen from the final model's clustering ``final`` (n,) and the
    stability clusterings, and their checks: baseline, stability and confounds (``X``: the
    embedding as clustered, harmonized when configured; the baseline and the fold
    embeddings are harmonized the same way). Returns the JSON-ready summaries, the
    ``strata`` (n,) and the labelings (``labelings``, for the ground-truth comparison)."""
    from mmfusion.strata.harmonize import harmonize_for_clustering

    cfg, seed = ctx.config["stratify"], int(ctx.seed)
    prepare = None
    if cfg["harmonize_site"] is not None:
        def prepare(Z):
            return harmonize_for_clustering(Z, confound_values, cfg)[0]
    base = run_baseline(group, ids, cfg, seed, n_threads, prepare)
    stab = run_stability(group, ids, X, final, cfg, seed, n_threads, base.get("labels"), prepare)
    strata, labelings = stab.pop("strata_labels"), stab.pop("labelings")
    base = write_baseline_comparison(group, base, strata)
    conf = run_confounds(ctx, group, confound_values, strata)
    return {"baseline": base, "stability": stab, "confounds": conf, "labelings": labelings, "strata": strata}
