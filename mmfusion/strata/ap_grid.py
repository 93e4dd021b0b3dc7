"""Affinity-propagation (AP) grid search over (damping, preference), chosen by silhouette.

docs/method.md#6-clustering. The similarity is the negative squared Euclidean distance between
embeddings, computed once (:func:`similarity_matrix`). The grid is ``damping_n`` damping
values equally spaced in ``[damping_min, 1)`` times ``preference_n`` preferences equally
spaced between two percentiles of the off-diagonal similarities (config section
``stratify``). Fits that do not converge within ``max_iter`` iterations, and fits with 1 or
n clusters, or that stopped at the first convergence check (:func:`stalled_fits`), are
skipped and counted. The fit with the highest silhouette score (Euclidean
distances, precomputed once) is chosen; ties are broken by fewer clusters, then the smaller
damping, then the smaller preference.

Exactness: every fit reproduces :class:`sklearn.cluster.AffinityPropagation` bit for bit
(same tiny noise added to S from ``random_state=seed``, same update order, same
convergence rule, same final exemplar refinement), so the labels equal scikit-learn's for
the same (damping, preference, random_state). The speed comes from (a) computing S, the
noise and the distances once instead of once per fit, (b) a fused, compiled (numba) update
that passes over the n x n messages (A and R rows interleaved) once per iteration instead
of ~15 times, with two vectorized loops per row, run on ``n_threads`` cores in parallel
over grid points (the kernel: :mod:`mmfusion.strata.ap_kernel`), and (c) a batched silhouette
computed once per distinct partition. Without numba a numpy fallback gives the same labels, slower.

Outputs written by :func:`write_outputs` into ``group/strata/``:

- ``labels.tsv``: participant_id, session, cluster (0..k-1) of the chosen fit.
- ``ap_grid.tsv``: damping, preference, n_clusters, silhouette, converged, n_iter, valid
  (one row per grid point; silhouette empty where invalid).
- ``ap_grid.png``: heat map of the silhouette over the grid (blank = invalid).
- ``ap_selection.json``: the chosen point, counts of skipped fits, the grid bounds.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import euclidean_distances

from mmfusion.io.atomic import atomic_path, write_json
from mmfusion.report import figures
from mmfusion.config_rules import DAMPING_MIN_RANGE
from mmfusion.errors import InputDataError
from mmfusion.runlog import get_logger, progress
from mmfusion.strata.ap_kernel import ap_fits, noised_similarity

log = get_logger(__name__)

class ClusteringError(InputDataError):
    """No usable clustering (every grid point invalid, degenerate embeddings)."""


@dataclass
class GridResult:
    """The outcome of :func:`grid_search`.

    ``grid`` has one row per grid point (columns damping, preference, n_clusters,
    silhouette, converged, n_iter, valid); ``labels`` (n,) int the chosen partition.
    """

    grid: pd.DataFrame
    labels: np.ndarray
    best: dict
    counts: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the grid
def similarity_matrix(X: np.ndarray) -> np.ndarray:
    """S (n, n) float64 = -||x_i - x_j||^2, exactly as scikit-learn's AP computes it."""
    return -euclidean_distances(np.asarray(X, dtype=np.float64), squared=True)


def distance_matrix(S: np.ndarray) -> np.ndarray:
    """Euclidean distances (n, n) from S (zero diagonal, negatives from round-off -> 0)."""
    D = np.sqrt(np.maximum(-S, 0.0))
    np.fill_diagonal(D, 0.0)
    return D


def damping_grid(n: int, damping_min: float = 0.5) -> np.ndarray:
    """``n`` damping values equally spaced in ``[damping_min, 1)`` (1.0 excluded)."""
    low, high = DAMPING_MIN_RANGE
    if not low <= damping_min < high or n < 1:
        raise ValueError(f"damping_min must be in [{low}, {high}) and damping_n >= 1, got {damping_min}, {n}")
    return np.linspace(damping_min, 1.0, n, endpoint=False)


def preference_grid(S: np.ndarray, n: int, percentiles=(1.0, 50.0)) -> np.ndarray:
    """``n`` preferences equally spaced between two percentiles (percent) of off-diagonal S."""
    off = S[~np.eye(S.shape[0], dtype=bool)]
    lo, hi = np.percentile(off, list(percentiles))
    return np.linspace(lo, hi, n)


# ------------------------------------------------------------------------ silhouette
def silhouette_scores(D: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean silhouette (P,) of each row of labels (P, n) on distances D (n, n).

    Same definition as :func:`sklearn.metrics.silhouette_score` (a singleton's sample
    silhouette is 0); NaN where a row has fewer than 2 or n clusters. Distinct partitions
    are scored once.
    """
    labels = np.atleast_2d(labels)
    n = D.shape[0]
    out = np.full(labels.shape[0], np.nan)
    cache: dict[bytes, float] = {}
    for p, lab in enumerate(labels):
        if lab.min() < 0:
            continue
        key = lab.astype(np.int32).tobytes()
        if key not in cache:
            cache[key] = _silhouette_one(D, lab, n)
        out[p] = cache[key]
    return out


def _silhouette_one(D, lab, n):
    k = int(lab.max()) + 1
    if k < 2 or k >= n:
        return np.nan
    onehot = np.zeros((n, k))
    onehot[np.arange(n), lab] = 1.0
    sums = D @ onehot                                   # (n, k) distance sums per cluster
    counts = onehot.sum(axis=0)                         # (k,)
    own = counts[lab]
    a = sums[np.arange(n), lab] / np.maximum(own - 1, 1)
    means = sums / counts
    means[np.arange(n), lab] = np.inf
    b = means.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (b - a) / np.maximum(a, b)
    s = np.where(own > 1, np.nan_to_num(s), 0.0)
    return float(s.mean())


# ---------------------------------------------------------------------- grid search
def grid_search(X: np.ndarray, cfg: dict, seed: int = 0, n_threads: int = 2,
                source: str = "embeddings", chunk: int = 64, quiet: bool = False) -> GridResult:
    """Full AP grid search on embeddings X (n, d); ``cfg`` is the ``stratify`` section.
    ``quiet``: no progress lines, the summary at debug level (for the many reruns of
    the stability analysis).

    Raises :class:`ClusteringError` (one line naming ``source``) when the embeddings are
    degenerate or no grid point gives a valid clustering.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n < 3:
        raise ClusteringError(f"{source}: {n} subject(s); affinity propagation needs at least 3")
    S = similarity_matrix(X)
    off = S[~np.eye(n, dtype=bool)]
    if np.all(off == off[0]):
        raise ClusteringError(f"{source}: all embeddings are equidistant (e.g. identical); "
                              "there is nothing to cluster - check the model's embeddings")
    dampings = damping_grid(int(cfg["damping_n"]), float(cfg["damping_min"]))
    prefs = preference_grid(S, int(cfg["preference_n"]), cfg["preference_percentiles"])
    dd, pp = np.meshgrid(dampings, prefs, indexing="ij")
    dd, pp = dd.ravel(), pp.ravel()
    Sn, zd = noised_similarity(S, seed)
    D = distance_matrix(S)
    P = dd.size
    labels = np.full((P, n), -1, dtype=np.int64)
    n_iter = np.zeros(P, dtype=np.int64)
    conv = np.zeros(P, dtype=bool)
    starts = range(0, P, chunk)
    for s0 in (starts if quiet else progress(starts, "AP grid", total=len(starts), logger=log)):
        sl = slice(s0, min(s0 + chunk, P))
        labels[sl], n_iter[sl], conv[sl] = ap_fits(
            Sn, zd, dd[sl], pp[sl], cfg["max_iter"], cfg["convergence_iter"], n_threads)
    n_clusters = np.where(conv, labels.max(axis=1) + 1, 0)
    stalled = conv & stalled_fits(n_iter, int(cfg["convergence_iter"]))
    sized = (n_clusters > 1) & (n_clusters < n)
    valid = conv & ~stalled & sized
    sil = np.full(P, np.nan)
    sil[valid] = silhouette_scores(D, labels[valid])
    grid = pd.DataFrame({"damping": dd, "preference": pp, "n_clusters": n_clusters,
                         "silhouette": sil, "converged": conv, "n_iter": n_iter, "valid": valid})
    counts = {"grid_points": int(P), "not_converged": int((~conv).sum()), "stalled": int(stalled.sum()),
              "one_or_n_clusters": int((conv & ~stalled & ~sized).sum()), "valid": int(valid.sum())}
    if not valid.any():
        raise ClusteringError(
            f"{source}: no valid AP fit among {P} grid points ({counts['not_converged']} did not converge "
            f"within max_iter={cfg['max_iter']}, {counts['stalled']} stopped at the first convergence check, "
            f"{counts['one_or_n_clusters']} gave 1 or n clusters); "
            "try stratify.max_iter higher, stratify.damping_min nearer 1 (e.g. 0.9), or other "
            f"stratify.preference_percentiles (now {list(cfg['preference_percentiles'])})")
    best_idx = select_best(grid)
    best = {k: (v.item() if hasattr(v, "item") else v) for k, v in grid.loc[best_idx].items()}
    best["grid_index"] = int(best_idx)
    log.log(logging.DEBUG if quiet else logging.INFO, "AP grid: %d valid of %d (%d not converged, %d stalled, %d with 1 or n "
             "clusters); chosen damping %.3f preference %.4g: %d clusters, silhouette %.3f", counts["valid"], P,
             counts["not_converged"], counts["stalled"], counts["one_or_n_clusters"], best["damping"],
             best["preference"], best["n_clusters"], best["silhouette"])
    return GridResult(grid=grid, labels=labels[best_idx].copy(), best=best, counts=counts)


def stalled_fits(n_iter: np.ndarray, convergence_iter: int) -> np.ndarray:
    """(P,) bool: fits that stopped at the first convergence check (``n_iter`` ==
    ``convergence_iter`` + 1), i.e. whose exemplars never changed after the first iteration.

    scikit-learn counts them as converged, but the messages had not settled: each iteration
    moves them by only (1 - damping) of the update, so at damping 0.95 about half of the
    initial (all-zero) messages is still in place after 15 iterations, and the "exemplars"
    are those of the first update. Such a fit can win the silhouette with a partition no
    settled fit gives (a pair split off from the rest: docs/method.md#6-clustering)."""
    return np.asarray(n_iter) <= convergence_iter + 1


def select_best(grid: pd.DataFrame) -> int:
    """Index of the valid row with the highest silhouette (rounded to 1e-10); ties go to
    fewer clusters, then smaller damping, then smaller preference."""
    v = grid[grid["valid"]].copy()
    v["_sil"] = -v["silhouette"].round(10)
    v = v.sort_values(["_sil", "n_clusters", "damping", "preference"], kind="mergesort")
    return int(v.index[0])


# --------------------------------------------------------------------------- outputs
def write_outputs(result: GridResult, ids: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write labels.tsv, ap_grid.tsv, ap_grid.png, ap_selection.json into ``out_dir``.

    ``ids`` (n rows) holds participant_id and session in embedding order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"labels": out_dir / "labels.tsv", "grid": out_dir / "ap_grid.tsv",
             "heatmap": out_dir / "ap_grid.png", "selection": out_dir / "ap_selection.json"}
    write_labels(paths["labels"], ids, result.labels)
    with atomic_path(paths["grid"]) as tmp:
        result.grid.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.10g")
    figures.plot_grid(result.grid, result.best, paths["heatmap"])
    sizes = np.bincount(result.labels).tolist()
    write_json(paths["selection"], {"best": result.best, "counts": result.counts,
                                    "cluster_sizes": sizes})
    return paths


def write_labels(path: Path, ids: pd.DataFrame, labels: np.ndarray, **columns: np.ndarray) -> Path:
    """labels.tsv: participant_id, session (``n/a`` without sessions), cluster (``labels``
    (n,)) and any further ``columns`` (name -> (n,)), rows as ``ids``; written atomically."""
    lab = ids[["participant_id", "session"]].copy()
    lab["session"] = lab["session"].replace("", "n/a")
    lab["cluster"] = np.asarray(labels)
    for name, values in columns.items():
        lab[name] = np.asarray(values)
    with atomic_path(path) as tmp:
        lab.to_csv(tmp, sep="\t", index=False, na_rep="n/a")
    return Path(path)


def sklearn_reference_labels(X, damping, preference, seed, max_iter=1000, convergence_iter=15):
    """scikit-learn's labels for one grid point (for tests and the bench), and converged."""
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    ap = AffinityPropagation(damping=damping, preference=preference, max_iter=max_iter,
                             convergence_iter=convergence_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ap.fit(np.asarray(X, dtype=np.float64))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return ap.labels_, converged, int(ap.n_iter_)
