"""Group-level analysis of the embeddings: strata, phenotype factors, statistics.

Orchestration only (docs/method.md#6-clustering, docs/method.md#7-phenotypes-and-statistics):
:mod:`mmfusion.strata.ap_grid` (AP grid search), :mod:`mmfusion.strata.phenotypes` (tables, PCA + varimax),
:mod:`mmfusion.strata.stats` (Kruskal-Wallis, FDR, permutation test, profiles).
Everything goes to ``ctx.group_dir``::

    group/strata/       labels.tsv, ap_grid.tsv, ap_grid.png, ap_selection.json
    group/phenotypes/   variables.tsv, missing.tsv, factors.tsv, loadings.tsv,
                        loadings.png, scores.tsv, summary.json
    group/stats/        kruskal_wallis.tsv, profiles.tsv, profiles_median.tsv,
                        profiles.png, distributions.png, permutation_null.png
    group/baseline/, group/stability/, group/confounds/   :mod:`mmfusion.strata.validity`
    group/ground_truth/ comparison.json, confusion.tsv, factor_match.tsv
                        (only for simulated datasets with sourcedata/ground_truth/)
    group/analysis_summary.json   inputs (with sha256), counts, output paths, caveats

Embeddings TSV: ``participant_id``, ``session`` (empty or ``n/a`` when the dataset has
no sessions), then ``emb_0000``... floats; one row per subject-session. Every row is
clustered. Subjects with several sessions enter the statistics once, with the cluster of
their first session (sorted label), since phenotypes are per participant.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.strata import phenotypes as ph
from mmfusion.strata import stats
from mmfusion.strata import ap_grid
from mmfusion.strata import validity
from mmfusion.io.atomic import atomic_path, write_json
from mmfusion.errors import InputDataError, MissingInputError
from mmfusion.strata.harmonize import harmonize_for_clustering
from mmfusion.provenance import sha256_file
from mmfusion.runlog import get_logger

log = get_logger(__name__)


def read_embeddings(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(ids with participant_id and session ('' when none), X (n, d) float64)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: embeddings table not found; run the group-level training first")
    df = pd.read_csv(path, sep="\t", dtype={"participant_id": str, "session": str}, keep_default_na=False)
    if "participant_id" not in df.columns:
        raise InputDataError(f"{path}: no 'participant_id' column; the embeddings TSV must start with "
                             "participant_id, session, emb_0000...")
    emb_cols = [c for c in df.columns if c.startswith("emb_")]
    if not emb_cols:
        raise InputDataError(f"{path}: no emb_* columns; regenerate the embeddings")
    X = df[emb_cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(X).all():
        bad = df["participant_id"][~np.isfinite(X).all(axis=1)].tolist()
        raise InputDataError(f"{path}: non-finite embedding values for {', '.join(bad[:5])}; "
                             "regenerate the embeddings (check the model for NaNs)")
    session = df["session"] if "session" in df.columns else pd.Series([""] * len(df))
    session = session.fillna("").astype(str).replace({"n/a": "", "nan": ""})
    pid = [p if p.startswith("sub-") else f"sub-{p}" for p in df["participant_id"].astype(str).str.strip()]
    ids = pd.DataFrame({"participant_id": pid, "session": session.to_numpy()})
    if ids.duplicated().any():
        raise InputDataError(f"{path}: repeated participant_id/session rows; regenerate the embeddings")
    return ids, X


@dataclass
class PhenotypeInput:
    """The phenotype tables of a run: ``raw`` (text cells, index participant_id) and the
    ``files`` read, or ``raw`` None and ``skipped`` saying why (no tables in bids_dir)."""

    raw: pd.DataFrame | None
    files: list[Path] = field(default_factory=list)
    skipped: str = ""


def load_phenotype_input(ctx) -> PhenotypeInput:
    """``--phenotypes`` or participants.tsv + phenotype/*.tsv of bids_dir; without
    ``--phenotypes`` missing tables only skip the statistics (logged), with it they are an error."""
    try:
        raw, files = ph.load_phenotypes(ctx.bids_dir, ctx.phenotypes_file)
    except MissingInputError as exc:
        if ctx.phenotypes_file is not None:
            raise
        log.warning("no phenotypes (%s); skipping factor analysis and statistics", exc)
        return PhenotypeInput(None, skipped=str(exc))
    return PhenotypeInput(raw, files)


def _common_subjects(pheno: PhenotypeInput, participants: list[str]) -> tuple[list[str], dict]:
    """Participants (``sub-`` labels) with both an embedding and phenotypes, and the
    counts of :func:`mmfusion.strata.phenotypes.align_subjects`; refuse fewer than 3."""
    common, counts = ph.align_subjects(participants, list(pheno.raw.index))
    if len(common) < 3:
        raise ph.PhenotypeError(f"{pheno.files[0]}: only {len(common)} subject(s) have both an embedding and "
                                "phenotypes; check that participant_id labels match (e.g. sub-01)")
    return common, counts


def check_phenotype_input(ctx, participants: list[str]) -> PhenotypeInput:
    """Load the phenotype tables and run every check :func:`run_analysis` will run on
    them (variables, junk cells, missing-value policy, enough subjects), for the
    ``participants`` that will get an embedding: called before any model is trained."""
    pheno = load_phenotype_input(ctx)
    if pheno.raw is not None:
        common, _ = _common_subjects(pheno, participants)
        ph.prepare_variables(pheno.raw.loc[common], ctx.config["phenotypes"], str(pheno.files[0]), pheno.files)
    return pheno


def _one_row_per_participant(ids: pd.DataFrame, labels: np.ndarray) -> pd.Series:
    """Cluster label per participant (first session in sorted order)."""
    df = ids.assign(cluster=labels).sort_values(["participant_id", "session"], kind="mergesort")
    return df.drop_duplicates("participant_id").set_index("participant_id")["cluster"]


def run_analysis(ctx, embeddings_tsv: Path, pheno: PhenotypeInput | None = None) -> dict:
    """Strata + phenotype factors + statistics (+ ground truth when simulated).

    ``pheno``: the tables from :func:`check_phenotype_input` (read here when None).
    Returns a dict of output paths and counts (also written as analysis_summary.json).
    """
    group = Path(ctx.group_dir)
    cfg = ctx.config
    ids, X = read_embeddings(embeddings_tsv)
    n_threads = max(1, int(getattr(ctx, "nprocs", 1) or 1), int(getattr(ctx, "omp_nthreads", 1) or 1))
    log.info("analysis of %d embedding(s) of dimension %d on %d thread(s)", X.shape[0], X.shape[1], n_threads)
    summary: dict = {"inputs": {"embeddings": str(embeddings_tsv), "embeddings_sha256": sha256_file(embeddings_tsv)},
                     "n_embeddings": int(X.shape[0]), "embedding_dim": int(X.shape[1]), "seed": int(ctx.seed),
                     "outputs": {}, "caveats": []}
    confound_values = validity.collect_confounds(ctx, ids)
    X, summary["harmonization"] = harmonize_for_clustering(X, confound_values, cfg["stratify"])
    if summary["harmonization"]["status"] == "done":
        log.info("embeddings harmonized across %s (%s) before clustering", cfg["stratify"]["harmonize_site"],
                 ", ".join(f"{k}: {v}" for k, v in summary["harmonization"]["sites"].items()))
    grid = ap_grid.grid_search(X, cfg["stratify"], seed=ctx.seed, n_threads=n_threads,
                                source=str(embeddings_tsv))
    paths = ap_grid.write_outputs(grid, ids, group / "strata")
    summary["outputs"]["strata"] = {k: str(v) for k, v in paths.items()}
    summary["clustering"] = {"best": grid.best, "counts": grid.counts,
                             "cluster_sizes": np.bincount(grid.labels).tolist()}
    if ids["session"].ne("").any() and ids["participant_id"].duplicated().any():
        summary["caveats"].append("several sessions per subject: every session was clustered, the "
                                  "statistics use each subject's first session")
    per_subject = _one_row_per_participant(ids, grid.labels)
    checks = validity.run_checks(ctx, group, ids, X, grid.labels, n_threads, confound_values)
    labelings = checks.pop("labelings")
    summary.update(checks)
    others = {name: _one_row_per_participant(ids, lab) for name, lab in labelings.items()
              if name == "baseline" or name.startswith("fold-") or name.startswith("baseline_fold-")}

    pheno = pheno or load_phenotype_input(ctx)
    if pheno.raw is None:
        summary["phenotypes"] = {"status": f"not run: {pheno.skipped}"}
        return _finish(group, summary, ctx, per_subject, others=others)
    raw, files = pheno.raw, pheno.files
    summary["inputs"]["phenotypes"] = {str(f): sha256_file(f) for f in files}
    common, counts = _common_subjects(pheno, list(per_subject.index))
    table = ph.prepare_variables(raw.loc[common], cfg["phenotypes"], str(files[0]), files)
    fa = ph.factor_analysis(table.data, cfg["phenotypes"]["eigenvalue_threshold"])
    pheno_paths = ph.write_outputs(table, fa, group / "phenotypes", cfg["phenotypes"]["loading_threshold"],
                                   extra_summary={"subject_counts": counts, "files": [str(f) for f in files]})
    summary["outputs"]["phenotypes"] = {k: str(v) for k, v in pheno_paths.items()}
    summary["phenotypes"] = {"status": "done", "subject_counts": {k: (len(v) if isinstance(v, list) else v)
                                                                  for k, v in counts.items()},
                             "n_factors": int(fa.loadings.shape[1]),
                             "explained_variance_ratio": float(fa.factors["explained_variance_ratio"].sum())}
    labels = per_subject.loc[fa.scores.index].to_numpy()
    result = stats.run_stats(fa.scores, labels, cfg["stats"], seed=ctx.seed, source=str(embeddings_tsv))
    stat_paths = stats.write_outputs(result, fa.scores, labels, group / "stats")
    summary["outputs"]["stats"] = {k: str(v) for k, v in stat_paths.items()}
    summary["stats"] = {"n_significant": int(result.table["significant"].sum()),
                        "n_perm_significant": int(result.table["perm_significant"].sum()),
                        "n_permutations": int(cfg["stats"]["n_permutations"])}
    return _finish(group, summary, ctx, per_subject, fa, result, others)


def _finish(group: Path, summary: dict, ctx, per_subject: pd.Series, fa=None, result=None,
            others: dict[str, pd.Series] | None = None) -> dict:
    truth = Path(ctx.bids_dir) / "sourcedata" / "ground_truth"
    if (truth / "strata.tsv").is_file():
        summary["ground_truth"] = compare_ground_truth(truth, per_subject, group / "ground_truth", fa, result,
                                                       others)
    summary["caveats"] += CAVEATS
    write_json(group / "analysis_summary.json", summary)
    return summary


CAVEATS = [
    "Affinity propagation picks the number of clusters through the preference; the chosen fit "
    "maximises the silhouette over the grid, which favours compact, well-separated clusters and "
    "is itself a choice made on the same data that the statistics then test.",
    "The permutation test re-partitions subjects with the observed cluster sizes; it tests the "
    "phenotype differences given the clustering, not the existence of the clusters.",
    "Factor scores come from a PCA with varimax rotation of the available phenotypes; missing "
    "values were handled as stated in the phenotype summary, which changes the scores a little.",
    "With U-Net skip connections (model.skip_connections: true, the paper's model) the decoders "
    "can bypass the joint embedding: reconstruction quality alone does not show that the "
    "embedding is informative; compare the strata with the PCA baseline and their stability.",
]


def compare_ground_truth(truth_dir: Path, clusters: pd.Series, out_dir: Path, fa=None, result=None,
                         others: dict[str, pd.Series] | None = None) -> dict:
    """Compare the clustering (and factors) with a simulator's planted ground truth.

    ``truth_dir`` holds strata.tsv (participant_id, stratum), optionally planted.json and
    latent_factors.tsv. ``clusters``: cluster per participant_id; ``others``: more
    clusterings by name (the PCA baseline, each fold model), whose ARI vs the planted
    strata goes to ``adjusted_rand_index_of``. Writes confusion.tsv (strata x clusters
    counts), factor_match.tsv (each factor's best-correlated latent factor and whether
    that one was planted) and comparison.json; returns the dict.
    """
    from sklearn.metrics import adjusted_rand_score

    truth_dir, out_dir = Path(truth_dir), Path(out_dir)
    strata = pd.read_csv(truth_dir / "strata.tsv", sep="\t", dtype={"participant_id": str})
    strata = strata.set_index("participant_id")["stratum"]
    common = [s for s in clusters.index if s in strata.index]
    out = {"n_subjects_compared": len(common)}
    if not common:
        out["status"] = "no subject in common with the ground truth"
        return out
    planted_labels, found = strata.loc[common].to_numpy(), clusters.loc[common].to_numpy()
    out["adjusted_rand_index"] = float(adjusted_rand_score(planted_labels, found))
    out["n_planted_strata"] = int(len(np.unique(planted_labels)))
    out["n_clusters"] = int(len(np.unique(found)))
    out["adjusted_rand_index_of"] = {name: float(adjusted_rand_score(planted_labels, lab.loc[common].to_numpy()))
                                     for name, lab in (others or {}).items() if pd.Index(common).isin(lab.index).all()}
    confusion = pd.crosstab(pd.Series(planted_labels, name="stratum"), pd.Series(found, name="cluster"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "confusion.tsv") as tmp:
        confusion.to_csv(tmp, sep="\t")
    out["confusion_tsv"] = str(out_dir / "confusion.tsv")
    planted = {}
    if (truth_dir / "planted.json").is_file():
        planted = json.loads((truth_dir / "planted.json").read_text())
        out["planted_latent_factors"] = [f["name"] for f in planted.get("latent_factors", [])
                                         if f.get("depends_on_stratum")]
        out["planted_demographics"] = [k for k, v in planted.get("demographics", {}).items()
                                       if v.get("depends_on_stratum")]
    if fa is not None and (truth_dir / "latent_factors.tsv").is_file():
        match = match_factors(fa, truth_dir / "latent_factors.tsv", planted, result)
        with atomic_path(out_dir / "factor_match.tsv") as tmp:
            match.to_csv(tmp, sep="\t", index=False, float_format="%.4g")
        out["factor_match_tsv"] = str(out_dir / "factor_match.tsv")
    write_json(out_dir / "comparison.json", out)
    log.info("ground truth: ARI %.3f (%d planted strata, %d clusters)", out["adjusted_rand_index"],
             out["n_planted_strata"], out["n_clusters"])
    return out


def match_factors(fa, latent_tsv: Path, planted: dict, result=None) -> pd.DataFrame:
    """Per estimated factor: the latent factor it correlates with most (Pearson r on the
    common subjects), whether that latent factor or a loading (|l| >= 0.3) demographic
    was planted, and the factor's significance."""
    latent = pd.read_csv(latent_tsv, sep="\t", dtype={"participant_id": str}).set_index("participant_id")
    common = [s for s in fa.scores.index if s in latent.index]
    planted_latent = {f["name"] for f in planted.get("latent_factors", []) if f.get("depends_on_stratum")}
    planted_demo = {k for k, v in planted.get("demographics", {}).items() if v.get("depends_on_stratum")}
    rows = []
    for name in fa.scores.columns:
        s = fa.scores.loc[common, name].to_numpy()
        r = {c: float(np.corrcoef(s, latent.loc[common, c].to_numpy(float))[0, 1]) for c in latent.columns}
        best = max(r, key=lambda c: abs(r[c]))
        demo = [v for v in planted_demo if v in fa.loadings.index and abs(fa.loadings.loc[v, name]) >= 0.3]
        row = {"factor": name, "best_latent": best, "r": r[best], "latent_planted": best in planted_latent,
               "planted_demographics_loading": ",".join(sorted(demo))}
        if result is not None:
            t = result.table.set_index("factor").loc[name]
            row.update({"significant": bool(t["significant"]), "perm_significant": bool(t["perm_significant"])})
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- calibration (simulated phenotypes)
# False positives on null data and power on planted data, through the production path
# (prepare_variables + factor_analysis + run_stats + match_factors) minus the file I/O;
# bench/bench_fdr_calibration.py runs many datasets, tests/test_fdr_calibration.py a few.

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
