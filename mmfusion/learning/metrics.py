"""Reconstruction quality of the autoencoder: MSE, NormDiff and CNR (docs/method.md#4-cross-validation-and-metrics).

All functions take one subject's real and reconstructed image of one modality, both
float (X, Y, Z) on the normalized [0, 1] scale, plus a boolean ``background`` mask
(X, Y, Z) saying which voxels are background. Choices made here (documented in
``docs`` and the config comments):

* **Background.** ``evaluation.background: mask`` (default): voxels outside the
  template brain mask stored in the shard. ``threshold``: voxels where BOTH the real
  and the reconstructed image are ``<= evaluation.background_threshold``. The mask is
  the default because a sigmoid output is never exactly 0, so a threshold of 0 would
  exclude nothing, and for JAC (log determinant) the background maps to mid-range.
* **NormDiff.** ``(rec - real) / (rec + real)`` per non-background voxel; voxels with
  ``rec + real == 0`` (the 0/0 case, possible only inside the brain when both
  underflow to 0) are excluded as well. Collapsed by the median. NaN if no voxel is left.
* **CNR.** The image is cut into a regular grid of ``roi_shape`` (4x4x3) ROIs starting
  at voxel (0, 0, 0); trailing voxels that do not fill a whole ROI are ignored. An ROI
  is background if more than half of its voxels are background, judged on the REAL
  image only (mask, or real <= threshold), so the pairs do not depend on the model. ``n_pairs`` (1000)
  pairs of two DIFFERENT foreground ROIs are drawn uniformly (pairs drawn
  independently, so a pair can repeat) with a NumPy generator seeded by
  ``(seed, crc32(subject key))``: the same pairs for the real image and every
  reconstruction of that subject, independent of fold order. Per pair
  ``CNR = |mean(ROI1) - mean(ROI2)| / std(ROI1 u ROI2)`` (population std, ddof=0;
  a pair with std 0 has CNR 0). The metric is the NormDiff of the two medians,
  ``(median_rec - median_real) / (median_rec + median_real)`` (0 when both are 0).
"""
from __future__ import annotations

import zlib

import numpy as np

METRICS = ("mse", "normdiff", "cnr")
#: The values of ``evaluation.background`` (see the module docstring).
BACKGROUNDS = ("mask", "threshold")


def mse(real: np.ndarray, rec: np.ndarray) -> float:
    """Mean squared error over the whole image (unitless, normalized intensities^2)."""
    diff = np.asarray(rec, np.float64) - np.asarray(real, np.float64)
    return float(np.mean(diff * diff))


def background_mask(real: np.ndarray, rec: np.ndarray, brain_mask: np.ndarray | None,
                    how: str = "mask", threshold: float = 0.0) -> np.ndarray:
    """Boolean (X, Y, Z): True where a voxel is background (see the module docstring)."""
    if how == "mask":
        if brain_mask is None:
            raise ValueError("background 'mask' needs the shard's brain mask")
        return ~np.asarray(brain_mask, bool)
    if how == "threshold":
        return (real <= threshold) & (rec <= threshold)
    raise ValueError(f"evaluation.background must be one of {BACKGROUNDS}, got {how!r}")


def norm_diff(real: np.ndarray, rec: np.ndarray, background: np.ndarray) -> float:
    """Median over foreground voxels of ``(rec - real) / (rec + real)``, in [-1, 1]."""
    real = np.asarray(real, np.float64)[~background]
    rec = np.asarray(rec, np.float64)[~background]
    total = rec + real
    keep = total != 0
    if not keep.any():
        return float("nan")
    return float(np.median((rec[keep] - real[keep]) / total[keep]))


def _norm_diff_scalar(real: float, rec: float) -> float:
    return 0.0 if rec + real == 0 else (rec - real) / (rec + real)


def roi_blocks(image: np.ndarray, roi_shape=(4, 4, 3)) -> np.ndarray:
    """Cut ``image`` (X, Y, Z) into regular ROIs: (n_rois, prod(roi_shape)) float64."""
    rx, ry, rz = roi_shape
    nx, ny, nz = (s // r for s, r in zip(image.shape, roi_shape))
    cropped = np.asarray(image, np.float64)[: nx * rx, : ny * ry, : nz * rz]
    blocks = cropped.reshape(nx, rx, ny, ry, nz, rz).transpose(0, 2, 4, 1, 3, 5)
    return blocks.reshape(nx * ny * nz, rx * ry * rz)


def sample_roi_pairs(background: np.ndarray, roi_shape, n_pairs: int, seed: int, key: str) -> np.ndarray:
    """Indices (n_pairs, 2) of pairs of different foreground ROIs, seeded by (seed, key).

    Raises ValueError if fewer than 2 foreground ROIs exist.
    """
    frac_bg = roi_blocks(background.astype(np.float64), roi_shape).mean(axis=1)
    foreground = np.flatnonzero(frac_bg <= 0.5)
    if foreground.size < 2:
        raise ValueError(f"{key}: fewer than 2 foreground ROIs of shape {tuple(roi_shape)}")
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    first = rng.integers(0, foreground.size, n_pairs)
    offset = rng.integers(1, foreground.size, n_pairs)  # never 0: the two ROIs differ
    second = (first + offset) % foreground.size
    return np.stack([foreground[first], foreground[second]], axis=1)


def median_cnr(image: np.ndarray, pairs: np.ndarray, roi_shape=(4, 4, 3)) -> float:
    """Median over ROI pairs (n_pairs, 2) of |mean1 - mean2| / std(union)."""
    blocks = roi_blocks(image, roi_shape)
    a, b = blocks[pairs[:, 0]], blocks[pairs[:, 1]]
    union = np.concatenate([a, b], axis=1)
    std = union.std(axis=1)
    contrast = np.abs(a.mean(axis=1) - b.mean(axis=1))
    cnr = np.divide(contrast, std, out=np.zeros_like(contrast), where=std > 0)
    return float(np.median(cnr))


def cnr_norm_diff(real: np.ndarray, rec: np.ndarray, pairs: np.ndarray, roi_shape=(4, 4, 3)) -> float:
    """NormDiff of the median CNRs of ``rec`` and ``real`` over the same ROI ``pairs``."""
    return _norm_diff_scalar(median_cnr(real, pairs, roi_shape), median_cnr(rec, pairs, roi_shape))


def image_metrics(real: np.ndarray, rec: np.ndarray, background: np.ndarray, pairs: np.ndarray,
                  roi_shape=(4, 4, 3)) -> dict[str, float]:
    """All three metrics for one image: {'mse': ..., 'normdiff': ..., 'cnr': ...}."""
    return {
        "mse": mse(real, rec),
        "normdiff": norm_diff(real, rec, background),
        "cnr": cnr_norm_diff(real, rec, pairs, roi_shape),
    }


# ------------------------------------------------------------------ summaries, figures
def summarize_across_folds(table):
    """Median and MAD across folds of the per-fold medians of each metric.

    ``table``: DataFrame with columns metric, fold, modality, variant, value (one row per
    held-out subject). Returns columns metric, modality, variant, n_folds,
    median_across_folds, mad_across_folds (unscaled median absolute deviation).
    """
    import pandas as pd
    from scipy.stats import median_abs_deviation

    per_fold = table.groupby(["metric", "modality", "variant", "fold"])["value"].median().reset_index()
    rows = []
    for (metric, modality, variant), part in per_fold.groupby(["metric", "modality", "variant"]):
        values = part["value"].dropna().to_numpy()
        rows.append({"metric": metric, "modality": modality, "variant": variant, "n_folds": len(values),
                     "median_across_folds": float(np.median(values)) if len(values) else float("nan"),
                     "mad_across_folds": float(median_abs_deviation(values)) if len(values) else float("nan")})
    return pd.DataFrame(rows)
