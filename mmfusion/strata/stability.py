"""Are the strata reproducible? Agreement of clusterings across models and subsamples.

docs/method.md#6-clustering ("Stability"). Pure computation on label vectors; the group
level (:mod:`mmfusion.levels.group`) feeds it the final clustering, the clusterings of every
cross-validation fold model's embeddings of all subjects, and the clusterings of random
subsamples of subjects (the whole AP grid search rerun on each), and writes the tables.

A *labeling* is an int array (n,) over the same n rows (subjects/sessions) as the final
clustering; -1 marks rows a labeling does not cover (subjects left out of a subsample).

- :func:`pairwise_ari`: adjusted Rand index between labelings, on the rows both cover.
- :func:`coassignment`: (n, n) fraction of the labelings covering both i and j in which
  i and j share a cluster.
- :func:`cluster_jaccard`: for each cluster of the reference, the Jaccard index with its
  best-matching cluster of another labeling (Hennig 2007, ``clusterboot``): 1 when the
  cluster is found again exactly, near 0 when it dissolves. A cluster's *stability* is
  the mean of that over all other labelings; Hennig reads < 0.5 as "dissolved", 0.6-0.75
  as "a pattern, membership doubtful" and > 0.75 as "valid, stable".
- :func:`consensus_matrix`, :func:`consensus_labels`: the strata as the consensus of the
  clusterings (evidence accumulation, Fred & Jain 2005; Monti et al. 2003): the mean
  co-assignment of the model clusterings and of the subsample clusterings (the two sources
  weigh alike, as in the stability score), cut by average linkage where pairs are
  together in fewer than half of them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

NOT_COVERED = -1
#: Pairs of rows whose (average) co-assignment is below this are not put in one stratum by
#: :func:`consensus_labels`: a stratum is a group of subjects that most clusterings keep together.
CONSENSUS_CUT = 0.5


def _both(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.asarray(a) != NOT_COVERED) & (np.asarray(b) != NOT_COVERED)


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings on the rows both cover (NaN if < 2 rows)."""
    both = _both(a, b)
    if both.sum() < 2:
        return float("nan")
    return float(adjusted_rand_score(np.asarray(a)[both], np.asarray(b)[both]))


def pairwise_ari(labelings: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per unordered pair of labelings: columns ``a``, ``b``, ``ari``, ``n`` (rows
    both cover)."""
    names = list(labelings)
    rows = [{"a": x, "b": y, "ari": ari(labelings[x], labelings[y]),
             "n": int(_both(labelings[x], labelings[y]).sum())}
            for i, x in enumerate(names) for y in names[i + 1:]]
    return pd.DataFrame(rows, columns=["a", "b", "ari", "n"])


def coassignment(labelings: list[np.ndarray]) -> np.ndarray:
    """(n, n) float: for each pair of rows, the fraction of the labelings covering both in
    which they share a cluster (NaN where no labeling covers both; 1 on the diagonal)."""
    L = np.stack([np.asarray(lab) for lab in labelings])  # (m, n)
    covered = (L != NOT_COVERED).astype(np.float64)
    together = np.zeros((L.shape[1], L.shape[1]))
    for lab, cov in zip(L, covered):
        together += (lab[:, None] == lab[None, :]) * cov[:, None] * cov[None, :]
    both = covered.T @ covered
    with np.errstate(invalid="ignore", divide="ignore"):
        out = together / both
    out[both == 0] = np.nan
    return out


def consensus_matrix(models: list[np.ndarray], subsamples: list[np.ndarray]) -> np.ndarray:
    """(n, n) float in [0, 1]: the mean of :func:`coassignment` over the ``models``
    labelings (the final and each fold model's clustering of all rows) and over the
    ``subsamples`` labelings (-1 for rows left out), the two sources weighing alike; one
    source alone where the other is empty or covers no pair."""
    sources = [coassignment(labs) for labs in (models, subsamples) if len(labs)]
    with warnings.catch_warnings():  # a pair no subsample covers: the models' value alone
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(sources), axis=0)


def consensus_labels(consensus: np.ndarray, cut: float = CONSENSUS_CUT) -> np.ndarray:
    """Labels (n,) 0..k-1, numbered in order of first row, of the average-linkage tree of
    the distance ``1 - consensus`` (n, n) cut at ``1 - cut``: two groups are merged while
    their members' mean co-assignment is >= ``cut``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    D = 1.0 - np.nan_to_num(np.asarray(consensus, dtype=np.float64), nan=0.0)
    np.fill_diagonal(D, 0.0)
    tree = linkage(squareform((D + D.T) / 2, checks=False), method="average")
    raw = fcluster(tree, t=1.0 - cut, criterion="distance")
    _, first = np.unique(raw, return_index=True)
    order = {c: i for i, c in enumerate(raw[np.sort(first)])}
    return np.array([order[c] for c in raw], dtype=np.int64)


def cluster_jaccard(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """(k,) for each cluster 0..k-1 of ``reference``: the highest Jaccard index between it
    and a cluster of ``other``, both restricted to the rows ``other`` covers (NaN for a
    reference cluster with no covered row)."""
    reference, other = np.asarray(reference), np.asarray(other)
    k = int(reference.max()) + 1
    covered = other != NOT_COVERED
    out = np.full(k, np.nan)
    for c in range(k):
        members = covered & (reference == c)
        if not members.any():
            continue
        best = 0.0
        for d in np.unique(other[covered]):
            found = other == d
            best = max(best, (members & found).sum() / (members | found).sum())
        out[c] = best
    return out


@dataclass
class StabilityResult:
    """What :func:`assess` found.

    ``clusters``: one row per stratum (cluster, size, stability, jaccard_models,
    jaccard_subsamples, stable); ``agreement``: :func:`pairwise_ari` of all labelings;
    ``coassignment`` (n, n): the :func:`consensus_matrix`; ``summary``: JSON-ready numbers and the verdict.
    """

    clusters: pd.DataFrame
    agreement: pd.DataFrame
    coassignment: np.ndarray
    summary: dict = field(default_factory=dict)


def median_range(values) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not v.size:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def assess(strata: np.ndarray, models: dict[str, np.ndarray], subsamples: dict[str, np.ndarray],
           subsample_clusters: list[int], threshold: float, consensus: np.ndarray) -> StabilityResult:
    """Stability of the ``strata`` (n,) against the model clusterings (``models``: name ->
    (n,), the fold models'; names starting with ``fold-`` count as folds) and the subsample clusterings (``subsamples``: name -> (n,) with -1 for rows left out;
    ``subsample_clusters``: the number of clusters each chose; ``consensus``: the (n, n)
    :func:`consensus_matrix` of all of them, kept for the figure).

    A stratum's stability is the mean of two means of its best-match Jaccard index: over
    the model labelings and over the subsamples (so 20 subsamples do not outvote 4 models;
    one source alone when the other is empty). It is ``stable`` when that is >=
    ``threshold``; the strata are called reproducible when every stratum is stable.
    """
    strata = np.asarray(strata)
    others = {**models, **subsamples}
    k = int(strata.max()) + 1
    jac_m = np.array([cluster_jaccard(strata, lab) for lab in models.values()]).reshape(len(models), k)
    jac_s = np.array([cluster_jaccard(strata, lab) for lab in subsamples.values()]).reshape(len(subsamples), k)
    with warnings.catch_warnings():  # an empty source or a stratum no labeling covers: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_m = np.nanmean(jac_m, axis=0) if len(jac_m) else np.full(k, np.nan)
        mean_s = np.nanmean(jac_s, axis=0) if len(jac_s) else np.full(k, np.nan)
        stability = np.nanmean(np.vstack([mean_m, mean_s]), axis=0)  # the two sources weigh alike
    clusters = pd.DataFrame({"cluster": np.arange(k), "size": np.bincount(strata, minlength=k),
                             "stability": stability, "jaccard_models": mean_m, "jaccard_subsamples": mean_s,
                             "stable": stability >= threshold})
    agreement = pairwise_ari({"strata": strata, **others})
    folds = {name for name in models if name.startswith("fold-")}
    vs_strata = agreement[agreement.a == "strata"].set_index("b")["ari"]
    fold_fold = agreement[agreement.a.isin(folds) & agreement.b.isin(folds)]["ari"]
    same_k = [c == k for c in subsample_clusters]
    n_stable = int(clusters["stable"].sum())
    summary = {
        "threshold": float(threshold),
        "n_clusters": k,
        "n_stable_clusters": n_stable,
        "reproducible": bool(n_stable == k and len(others) > 0),
        "n_fold_labelings": len(folds),
        "n_subsamples": len(subsamples),
        "ari_folds_vs_strata": median_range(vs_strata[vs_strata.index.isin(folds)]),
        "ari_between_folds": median_range(fold_fold),
        "ari_subsamples_vs_strata": median_range(vs_strata[vs_strata.index.isin(set(subsamples))]),
        "subsample_same_n_clusters": float(np.mean(same_k)) if same_k else None,
        "subsample_n_clusters": {str(c): int(n) for c, n in
                                 zip(*np.unique(np.asarray(subsample_clusters, int), return_counts=True))},
        "median_stability": float(np.nanmedian(stability)) if np.isfinite(stability).any() else None,
    }
    return StabilityResult(clusters, agreement, np.asarray(consensus), summary)


def subsample_indices(n: int, n_resamples: int, fraction: float, seed: int) -> list[np.ndarray]:
    """``n_resamples`` sorted random subsets of range(n), each of round(fraction * n) rows
    (at least 3), drawn without replacement (seeded)."""
    rng = np.random.default_rng([int(seed), 0x5AB])
    size = max(3, int(round(fraction * n)))
    return [np.sort(rng.choice(n, size, replace=False)) for _ in range(n_resamples)]


def round_robin(models: list[str], n: int) -> list[str]:
    """The model whose embedding each of ``n`` subsamples is drawn from: ``models`` in
    turn (final, fold-01, fold-02, ..., final, ...), so each model's embedding is
    re-clustered about equally often and no single model decides the consensus."""
    return [models[i % len(models)] for i in range(n)]


def expand(labels: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Labels of a subsample (len(rows),) as a labeling of all n rows (-1 elsewhere)."""
    out = np.full(n, NOT_COVERED, dtype=np.int64)
    out[rows] = labels
    return out
