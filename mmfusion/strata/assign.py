"""New subjects placed in trained strata: nearest exemplar, distance, novelty.

The strata come from affinity propagation on the similarity ``-||x_i - x_j||^2``
(:mod:`mmfusion.strata.ap_grid`); every training subject's label is the exemplar with the
highest similarity, i.e. the nearest exemplar in Euclidean distance. A new subject is
placed the same way (:func:`nearest_exemplar`). It is *novel* when its distance to that
nearest exemplar exceeds the ``NOVELTY_PERCENTILE``-th percentile of the training
subjects' distances to their own exemplar (:func:`novelty_threshold`): farther from every
exemplar than 95 % of the training cohort was from its own. docs/method.md section 6.3.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmfusion.runlog import get_logger

log = get_logger(__name__)

#: Percentile (percent) of the training subjects' exemplar distances beyond which a new
#: subject is flagged novel.
NOVELTY_PERCENTILE = 95.0


@dataclass
class Exemplars:
    """The trained strata: ``index`` (K,) row of each exemplar in the training embeddings,
    ``embeddings`` float64 (K, D) their embeddings, stratum k at row k (labels 0..K-1)."""

    index: np.ndarray
    embeddings: np.ndarray


def training_exemplars(X: np.ndarray, labels: np.ndarray, best: dict, cfg: dict, seed: int,
                       log_only: bool = False) -> Exemplars:
    """The exemplars of the chosen AP fit, recovered by refitting it: the fit of
    :func:`mmfusion.strata.ap_grid.grid_search` at ``best`` (its ``damping`` and
    ``preference``) on ``X`` (n, D) with the same noise (``seed``) and ``cfg`` (the
    ``stratify`` section). Checked against ``labels`` (n,) of that search: if the refit
    differs (it is the same arithmetic, so it should not), raises RuntimeError, or with
    ``log_only`` logs a warning and falls back on :func:`medoids`."""
    from mmfusion.strata.ap_grid import similarity_matrix
    from mmfusion.strata.ap_kernel import ap_exemplars, noised_similarity

    X = np.asarray(X, dtype=np.float64)
    Sn, zd = noised_similarity(similarity_matrix(X), int(seed))
    refit, index = ap_exemplars(Sn, zd, float(best["damping"]), float(best["preference"]),
                                int(cfg["max_iter"]), int(cfg["convergence_iter"]))
    if not np.array_equal(refit, np.asarray(labels)):
        if not log_only:
            raise RuntimeError("the refit of the chosen AP grid point does not reproduce the strata")
        log.warning("the refit of the chosen AP grid point does not reproduce the strata; the bundle's "
                    "exemplars are the strata's medoids instead")
        index = medoids(X, np.asarray(labels))
    return Exemplars(index=index, embeddings=X[index].copy())


def medoids(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Row index (K,) of each stratum's member with the highest summed similarity
    (-squared distance) to the other members: AP's exemplar refinement on the final strata."""
    out = []
    for k in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == k)
        d2 = ((X[members, None, :] - X[None, members, :]) ** 2).sum(-1)
        out.append(members[np.argmin(d2.sum(0))])
    return np.asarray(out, dtype=np.int64)


def nearest_exemplar(X: np.ndarray, exemplars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratum (n,) int = index of the nearest row of ``exemplars`` (K, D), and the
    Euclidean distance (n,) float64 to it, for embeddings ``X`` (n, D) (embedding units)."""
    X = np.asarray(X, dtype=np.float64)
    E = np.asarray(exemplars, dtype=np.float64)
    sq = (X * X).sum(1)[:, None] - 2.0 * X @ E.T + (E * E).sum(1)[None, :]
    sq = np.maximum(sq, 0.0)
    label = np.argmin(sq, axis=1)
    # distances recomputed directly (no cancellation) for the chosen exemplar
    dist = np.linalg.norm(X - E[label], axis=1)
    return label.astype(np.int64), dist


def own_exemplar_distance(X: np.ndarray, labels: np.ndarray, exemplars: np.ndarray) -> np.ndarray:
    """Distance (n,) of each training embedding ``X`` (n, D) to the exemplar of its own
    stratum ``labels`` (n,) (rows of ``exemplars`` (K, D))."""
    X = np.asarray(X, dtype=np.float64)
    return np.linalg.norm(X - np.asarray(exemplars, dtype=np.float64)[np.asarray(labels)], axis=1)


def novelty_threshold(train_distances: np.ndarray, percentile: float = NOVELTY_PERCENTILE) -> float:
    """The novelty threshold (embedding units): the ``percentile``-th percentile (numpy's
    linear interpolation) of the training subjects' own-exemplar distances (n,)."""
    return float(np.percentile(np.asarray(train_distances, dtype=np.float64), percentile))


@dataclass
class Assignment:
    """New subjects in the trained strata: ``stratum`` (m,) int, ``distance`` (m,) to the
    nearest exemplar, ``novel`` (m,) bool (distance > ``threshold``)."""

    stratum: np.ndarray
    distance: np.ndarray
    novel: np.ndarray
    threshold: float


def assign(X_new: np.ndarray, exemplars: np.ndarray, threshold: float) -> Assignment:
    """Place the embeddings ``X_new`` (m, D) in the strata of ``exemplars`` (K, D)."""
    stratum, distance = nearest_exemplar(X_new, exemplars)
    novel = distance > float(threshold)
    log.info("assigned %d subject(s) to %d strata; %d novel (distance > %.4g)", len(stratum),
             len(exemplars), int(novel.sum()), threshold)
    return Assignment(stratum, distance, novel, float(threshold))
