"""Per-subject quality control: a registration figure and an HTML page (fMRIPrep-style).

Figure: row 1 = warped T1w (grey) with the template's edges (red contour) in the three
planes through the grid centre; row 2 = log-JAC (blue = smaller, red = larger than the
template) inside the brain mask.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from mmfusion.io.atomic import atomic_path, write_text


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    """Central sagittal, coronal, axial slices of (X, Y, Z), rotated for display."""
    x, y, z = (s // 2 for s in vol.shape)
    return [np.rot90(vol[x, :, :]), np.rot90(vol[:, y, :]), np.rot90(vol[:, :, z])]


def edges(template: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gradient-magnitude edge map of ``template`` (X, Y, Z) inside a dilated ``mask``."""
    from scipy import ndimage
    smooth = ndimage.gaussian_filter(template.astype(np.float32), 0.7)
    mag = np.sqrt(sum(ndimage.sobel(smooth, axis=a) ** 2 for a in range(3)))
    inside = ndimage.binary_dilation(mask > 0, iterations=2)
    thr = np.percentile(mag[inside], 85) if inside.any() else mag.max()
    return ((mag > thr) & inside).astype(np.float32)


def registration_figure(path: Path, warped_t1: np.ndarray, template: np.ndarray, logjac: np.ndarray,
                        mask: np.ndarray, title: str) -> Path:
    """Write the QC PNG atomically. All arrays (X, Y, Z) on the output grid."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    edge = edges(template, mask)
    inside = mask > 0
    vmax = float(np.percentile(np.abs(logjac[inside]), 99)) if inside.any() else 1.0
    vmax = max(vmax, 1e-3)
    t1max = float(np.percentile(warped_t1[inside], 99.5)) if inside.any() else float(warped_t1.max() or 1)
    jac = np.where(inside, logjac, np.nan)
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.6), facecolor="black")
    for col, (t1s, es, js) in enumerate(zip(_slices(warped_t1), _slices(edge), _slices(jac))):
        ax = axes[0, col]
        ax.imshow(t1s, cmap="gray", vmin=0, vmax=t1max, interpolation="nearest")
        ax.contour(es, levels=[0.5], colors="red", linewidths=0.5)
        ax = axes[1, col]
        ax.imshow(t1s, cmap="gray", vmin=0, vmax=t1max, interpolation="nearest")
        im = ax.imshow(js, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    for ax in axes.ravel():
        ax.axis("off")
    cbar = fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.7)
    cbar.set_label("log-JAC", color="white")
    cbar.ax.tick_params(colors="white")
    fig.suptitle(title, color="white")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, facecolor="black")
    plt.close(fig)
    return path


def similarity(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` inside ``mask`` (warped T1w vs template)."""
    m = mask > 0
    if m.sum() < 3:
        return float("nan")
    return float(np.corrcoef(a[m], b[m])[0, 1])


def subject_report(path: Path, key: str, figure: Path, meta: dict) -> Path:
    """Write the subject's HTML page (atomic): figure + a table of ``meta`` entries."""
    rel = os.path.relpath(figure, path.parent)
    rows = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td><pre>{html.escape(v if isinstance(v, str) else json.dumps(v, indent=1, default=str))}</pre></td></tr>"
        for k, v in meta.items())
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mmfusion: {html.escape(key)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} th{{text-align:left;vertical-align:top;padding-right:1em}}
pre{{margin:0;white-space:pre-wrap}} img{{max-width:100%}}</style></head>
<body><h1>{html.escape(key)}: spatial normalization</h1>
<h2>Registration</h2>
<p>Top: the subject's N4-corrected T1w warped to the template, with the template's edges in red.
Bottom: log Jacobian determinant of the nonlinear warp (red = subject larger than the template).</p>
<img src="{html.escape(rel)}" alt="registration QC figure">
<h2>Details</h2><table>{rows}</table></body></html>
"""
    write_text(path, text)
    return path
