"""Between-cluster statistics on the phenotype factors (group level). See docs/method.md#7-phenotypes-and-statistics.

- Kruskal-Wallis H per factor across clusters (scipy), Benjamini-Hochberg FDR across
  factors (statsmodels ``multipletests(method='fdr_bh')``), significant at q < ``alpha``.
- Permutation test ("bootstrap" in the paper): M = ``n_permutations`` random
  re-partitions of the subjects into groups of the observed cluster sizes;
  ``p = (1 + #{H_perm >= H_obs}) / (1 + M)``, then FDR across factors. Vectorized: ranks
  (with the tie correction) are computed once per factor; a permutation only changes
  which ranks fall in which group, so H_perm comes from group rank sums obtained by one
  batched matrix product per chunk of permutations. ``H_perm >= H_obs`` is tested with a
  relative tolerance of 1e-9 so that re-partitions equal to the observed one count.
- Cluster profiles: for cluster c and factor f, the quantile of the cluster's median
  score within the whole population's scores (empirical CDF, fraction <= the median).

Outputs of :func:`write_outputs` in ``group/stats/``: ``kruskal_wallis.tsv`` (factor, H,
p, q, significant, perm_p, perm_q, perm_significant, n_subjects, n_clusters),
``profiles.tsv`` (cluster, size, then per factor the quantile; ``profiles_median.tsv``
the medians), ``profiles.png`` (log10-quantile heat map), ``distributions.png`` (factor
scores per cluster, significant factors), ``permutation_null.png`` (null histograms with
the observed H).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from mmfusion.io.atomic import atomic_path
from mmfusion.report import figures
from mmfusion.errors import InputDataError
from mmfusion.runlog import get_logger

log = get_logger(__name__)


class StatsInputError(InputDataError):
    """Statistics impossible on these inputs (e.g. one cluster)."""


@dataclass
class StatsResult:
    """``table``: one row per factor; ``null``: H under permutation (M, k);
    ``profiles``/``medians``: (clusters x factors) quantiles / medians."""

    table: pd.DataFrame
    null: np.ndarray
    profiles: pd.DataFrame
    medians: pd.DataFrame


def _check_labels(labels: np.ndarray, source: str) -> np.ndarray:
    labels = np.asarray(labels)
    uniq, codes = np.unique(labels, return_inverse=True)
    if uniq.size < 2:
        raise StatsInputError(f"{source}: {uniq.size} cluster(s); Kruskal-Wallis needs at least 2 "
                              "(the clustering found no structure - see the AP grid)")
    return codes


def fdr(p: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg: (reject (k,) bool, q (k,))."""
    reject, q, _, _ = multipletests(np.asarray(p, dtype=float), alpha=alpha, method="fdr_bh")
    return reject, q


def kruskal_wallis(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's Kruskal-Wallis per column of scores (n, k) across label groups: (H, p)."""
    codes = _check_labels(labels, "kruskal_wallis")
    groups = [codes == g for g in range(codes.max() + 1)]
    out = [sps.kruskal(*[scores[m, f] for m in groups]) for f in range(scores.shape[1])]
    return np.array([o.statistic for o in out]), np.array([o.pvalue for o in out])


def _rank_terms(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (n, k) (average for ties) and the tie correction (k,) per factor."""
    ranks = sps.rankdata(scores, axis=0)
    n = scores.shape[0]
    ties = np.empty(scores.shape[1])
    for f in range(scores.shape[1]):
        _, counts = np.unique(scores[:, f], return_counts=True)
        ties[f] = 1.0 - (counts ** 3 - counts).sum() / (n ** 3 - n)
    return ranks, ties


def _h_from_rank_sums(rank_sums: np.ndarray, sizes: np.ndarray, n: int, ties: np.ndarray) -> np.ndarray:
    """H from group rank sums (..., G, k) and group sizes (G,)."""
    h = 12.0 / (n * (n + 1)) * (rank_sums ** 2 / sizes[:, None]).sum(axis=-2) - 3.0 * (n + 1)
    return h / ties


def permutation_null(scores: np.ndarray, labels: np.ndarray, n_permutations: int = 10000,
                     seed: int = 0, chunk: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """H of the observed partition (k,) and of M re-partitions with the same sizes (M, k).

    scores (n, k); labels (n,). Ranks are computed once; each chunk of permutations is one
    one-hot (chunk, G, n) @ ranks (n, k) product.
    """
    codes = _check_labels(labels, "permutation_null")
    scores = np.asarray(scores, dtype=np.float64)
    n, G = codes.size, int(codes.max()) + 1
    ranks, ties = _rank_terms(scores)
    sizes = np.bincount(codes, minlength=G).astype(float)
    onehot = np.eye(G)[codes].T                                  # (G, n)
    h_obs = _h_from_rank_sums(onehot @ ranks, sizes, n, ties)
    rng = np.random.default_rng(seed)
    null = np.empty((n_permutations, scores.shape[1]))
    eye = np.eye(G)
    for s0 in range(0, n_permutations, chunk):
        m = min(chunk, n_permutations - s0)
        perm = rng.permuted(np.broadcast_to(codes, (m, n)), axis=1)   # same cluster sizes
        oh = eye[perm].transpose(0, 2, 1)                              # (m, G, n)
        null[s0:s0 + m] = _h_from_rank_sums(oh @ ranks, sizes, n, ties)
    return h_obs, null


def permutation_pvalues(h_obs: np.ndarray, null: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """p = (1 + #{H_perm >= H_obs}) / (1 + M) per factor."""
    count = (null >= h_obs[None, :] * (1 - rtol)).sum(axis=0)
    return (1.0 + count) / (1.0 + null.shape[0])


def cluster_profiles(scores: pd.DataFrame, labels: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(quantiles, medians): per cluster (rows) and factor (columns), the cluster median
    and its quantile within the whole population (fraction of scores <= the median)."""
    labels = np.asarray(labels)
    clusters = np.unique(labels)
    values = scores.to_numpy(float)
    med = np.array([np.median(values[labels == c], axis=0) for c in clusters])
    sorted_vals = np.sort(values, axis=0)
    q = np.stack([np.searchsorted(sorted_vals[:, f], med[:, f], side="right") / len(values)
                  for f in range(values.shape[1])], axis=1)
    index = pd.Index(clusters, name="cluster")
    return (pd.DataFrame(q, index=index, columns=scores.columns),
            pd.DataFrame(med, index=index, columns=scores.columns))


def run_stats(scores: pd.DataFrame, labels: np.ndarray, cfg: dict, seed: int = 0,
              source: str = "scores") -> StatsResult:
    """All statistics for factor scores (n x k, index participant_id) and cluster labels (n,)."""
    _check_labels(labels, source)
    alpha = float(cfg["alpha"])
    values = scores.to_numpy(float)
    H, p = kruskal_wallis(values, labels)
    sig, q = fdr(p, alpha)
    h_obs, null = permutation_null(values, labels, int(cfg["n_permutations"]), seed)
    pp = permutation_pvalues(h_obs, null)
    psig, pq = fdr(pp, alpha)
    table = pd.DataFrame({"factor": scores.columns, "H": H, "p": p, "q": q, "significant": sig,
                          "perm_p": pp, "perm_q": pq, "perm_significant": psig,
                          "n_subjects": len(values), "n_clusters": len(np.unique(labels))})
    prof, med = cluster_profiles(scores, labels)
    log.info("Kruskal-Wallis: %d of %d factor(s) significant at q < %g (permutation: %d)",
             int(sig.sum()), len(sig), alpha, int(psig.sum()))
    return StatsResult(table=table, null=null, profiles=prof, medians=med)


# --------------------------------------------------------------------------- outputs
def write_outputs(result: StatsResult, scores: pd.DataFrame, labels: np.ndarray, out_dir: Path) -> dict[str, Path]:
    """Write the statistics tables and figures into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {k: out_dir / v for k, v in {
        "table": "kruskal_wallis.tsv", "profiles": "profiles.tsv", "medians": "profiles_median.tsv",
        "profiles_png": "profiles.png", "distributions_png": "distributions.png",
        "null_png": "permutation_null.png"}.items()}
    sizes = pd.Series(np.bincount(np.unique(labels, return_inverse=True)[1]),
                      index=result.profiles.index, name="size")
    with atomic_path(paths["table"]) as tmp:
        result.table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    for key, df in [("profiles", result.profiles), ("medians", result.medians)]:
        with atomic_path(paths[key]) as tmp:
            pd.concat([sizes, df], axis=1).to_csv(tmp, sep="\t", float_format="%.6g")
    figures.plot_profiles(result.profiles, paths["profiles_png"])
    figures.plot_distributions(scores, labels, result.table, paths["distributions_png"])
    figures.plot_null(result.null, result.table, paths["null_png"])
    return paths
