"""Every figure mmfusion draws, in one style, each written atomically by :func:`save_figure`.

The science modules (``learning``, ``strata``) compute and return numbers; the
functions here turn them into PNGs. Importing this module is cheap: matplotlib (with
the non-interactive Agg backend, set here and nowhere else) and nilearn are imported on
the first plot. Figure file names are chosen by the callers.

Subject QC (:func:`registration_figure`) goes through nilearn's plotting, in world
coordinates of the grid's affine, with orientation labels, so a volume stored in any
voxel order shows the same anatomy on the same side.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmfusion.io.atomic import atomic_path

DPI = 100
"""Resolution of every PNG (dots per inch of the figure size)."""

_STYLE = {"savefig.dpi": DPI, "image.interpolation": "nearest"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), with mmfusion's style."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update(_STYLE)
    return plt


def save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (temporary name, then rename); close it."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", facecolor=fig.get_facecolor())
    pyplot().close(fig)
    return path


# ------------------------------------------------------------------ the autoencoder (learning)
def plot_cv_boxplots(table, summary, metric: str, path) -> Path:
    """Per-fold box plots of one metric: a panel per modality, a box per fold and variant."""
    plt = pyplot()
    modalities = sorted(table["modality"].unique())
    variants = sorted(table["variant"].unique(), reverse=True)
    folds = sorted(table["fold"].unique())
    fig, axes = plt.subplots(1, len(modalities), figsize=(max(4, 0.6 * len(folds) * len(variants)) * len(modalities), 3.5),
                             squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green"]
    width = 0.8 / len(variants)
    for ax, m in zip(axes[0], modalities):
        for v_i, variant in enumerate(variants):
            data = [table[(table.modality == m) & (table.variant == variant) & (table.fold == f)]["value"].dropna()
                    for f in folds]
            pos = [f + (v_i - (len(variants) - 1) / 2) * width for f in folds]
            box = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
            for patch in box["boxes"]:
                patch.set_facecolor(colors[v_i % len(colors)])
            row = summary[(summary.metric == metric) & (summary.modality == m) & (summary.variant == variant)]
            label = variant
            if len(row):
                label += f": median {row.median_across_folds.iloc[0]:.3g}, MAD {row.mad_across_folds.iloc[0]:.2g}"
            ax.plot([], [], color=colors[v_i % len(colors)], lw=6, label=label)
        ax.set_xticks(folds)
        ax.set_xlabel("fold")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} - {m}")
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_training_curves(histories: dict, path) -> Path:
    """Loss per epoch of every model (solid: training, dashed: validation)."""
    plt = pyplot()
    groups: dict[str, list] = {}
    for label, hist in histories.items():
        groups.setdefault(label.split("/")[-1], []).append((label, hist))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5), squeeze=False)
    for ax, (name, items) in zip(axes[0], sorted(groups.items())):
        for label, hist in items:
            epochs = [r["epoch"] for r in hist]
            line, = ax.plot(epochs, [r.get("loss", np.nan) for r in hist], label=label.split("/")[0])
            if any("val_loss" in r for r in hist):
                ax.plot(epochs, [r.get("val_loss", np.nan) for r in hist], ls="--", color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_ylabel("BCE summed over modalities")
        ax.set_title(f"{name} (dashed: validation)")
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_reconstructions(panels, path) -> Path:
    """Real vs reconstructed images, one row per (subject, modality). ``panels``:
    [(key, modality, real, rec, affine)], ``real``/``rec`` (X, Y, Z) on the normalized
    [0, 1] scale (the model's input arrays), ``affine`` (4, 4) voxel -> world (RAS+, mm) of
    the shard's grid. Sagittal, coronal and axial cuts through the grid centre, drawn by
    nilearn in world coordinates with orientation labels (as :func:`registration_figure`)."""
    plt = pyplot()
    from nilearn import plotting

    fig = plt.figure(figsize=(12, 2.2 * len(panels)), facecolor="black")
    height = 1.0 / len(panels)
    for r, (key, m, real, rec, affine) in enumerate(panels):
        for c, (what, vol) in enumerate((("real", real), ("reconstructed", rec))):
            img = _canonical(vol, affine)
            ax = fig.add_axes((0.5 * c, 1.0 - (r + 1) * height, 0.5, height * 0.92))
            plotting.plot_img(img, axes=ax, display_mode="ortho", cut_coords=_centre_world(img),
                              annotate=True, draw_cross=False, black_bg=True, cmap="gray", vmin=0, vmax=1,
                              colorbar=False, title=f"{key} {m} {what}")
    return save_figure(fig, path)


# ----------------------------------------------------------------------- the strata
def plot_grid(grid, best: dict, path) -> Path:
    """Heat map of the silhouette over (damping rows, preference columns); blank = invalid."""
    plt = pyplot()
    dampings = np.unique(grid["damping"])
    prefs = np.unique(grid["preference"])
    table = grid.pivot_table(index="damping", columns="preference", values="silhouette",
                             dropna=False).reindex(index=dampings, columns=prefs)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    extent = [prefs[0], prefs[-1] if prefs.size > 1 else prefs[0] + 1, -0.5, dampings.size - 0.5]
    im = ax.imshow(table.to_numpy(float), aspect="auto", origin="lower", extent=extent,
                   cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(dampings.size), [f"{d:.2f}" for d in dampings])
    ax.set_xlabel("preference (diagonal of S)")
    ax.set_ylabel("damping")
    bi = int(np.searchsorted(dampings, best["damping"]))
    ax.plot([best["preference"]], [bi], marker="*", color="red", markersize=12,
            label=f"chosen: {best['n_clusters']} clusters")
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=ax, label="silhouette")
    ax.set_title("Affinity propagation grid (blank: not converged or 1/n clusters)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_projection(train: np.ndarray, train_labels: np.ndarray, exemplar_index: np.ndarray, new: np.ndarray,
                    novel: np.ndarray, path) -> Path:
    """New subjects among the training embeddings in 2-D: a PCA (2 components) fitted on
    the training embeddings ``train`` (n, D) alone, ``new`` (m, D) projected into it.
    Training points coloured by stratum ``train_labels`` (n,), their exemplars
    (``exemplar_index`` (K,)) as large diamonds, new subjects as black crosses, the
    ``novel`` (m,) ones circled in red."""
    from sklearn.decomposition import PCA

    plt = pyplot()
    pca = PCA(n_components=2).fit(np.asarray(train, dtype=np.float64))
    tr, nw = pca.transform(np.asarray(train, dtype=np.float64)), pca.transform(np.asarray(new, dtype=np.float64))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cmap = plt.get_cmap("tab10")
    for k in np.unique(train_labels):
        sel = train_labels == k
        ax.scatter(tr[sel, 0], tr[sel, 1], s=22, color=cmap(int(k) % 10), alpha=0.55, label=f"training, stratum {k}")
    ex = np.asarray(exemplar_index, dtype=int)
    if ex.size:
        ax.scatter(tr[ex, 0], tr[ex, 1], s=110, marker="D", facecolor="none", edgecolor="k", label="exemplars")
    ax.scatter(nw[:, 0], nw[:, 1], s=30, marker="x", color="k", label="new subjects")
    novel = np.asarray(novel, dtype=bool)
    if novel.any():
        ax.scatter(nw[novel, 0], nw[novel, 1], s=120, facecolor="none", edgecolor="red", linewidth=1.5,
                   label=f"novel ({int(novel.sum())})")
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 of the training embeddings ({100 * ratio[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)")
    ax.set_title("New subjects among the training embeddings")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_coassignment(matrix: np.ndarray, final: np.ndarray, names: list[str], path) -> Path:
    """Heat map of the co-assignment matrix, rows and columns ordered by final cluster."""
    plt = pyplot()
    order = np.argsort(final, kind="stable")
    n = len(order)
    size = min(12.0, 3.0 + 0.18 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(matrix[np.ix_(order, order)], vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    bounds = np.flatnonzero(np.diff(np.asarray(final)[order])) + 0.5
    for b in bounds:
        ax.axhline(b, color="white", lw=1.2)
        ax.axvline(b, color="white", lw=1.2)
    if n <= 60:
        ax.set_xticks(range(n), [names[i] for i in order], rotation=90, fontsize=6)
        ax.set_yticks(range(n), [names[i] for i in order], fontsize=6)
    else:
        ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("co-assignment across fold models and subsamples\n(ordered by final cluster; white lines "
                 "separate clusters)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of clusterings together")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loadings(loadings, threshold: float, path) -> Path:
    """Heat map of the rotated loadings (variables x factors); |loading| < threshold blank."""
    plt = pyplot()
    shown = loadings.where(loadings.abs() >= threshold)
    height = max(3.0, 0.22 * len(loadings) + 1.2)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * loadings.shape[1] + 3), height))
    im = ax.imshow(shown.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(loadings.shape[1]), loadings.columns)
    ax.set_yticks(range(len(loadings)), loadings.index, fontsize=7)
    ax.set_title(f"Varimax loadings (|loading| >= {threshold})")
    fig.colorbar(im, ax=ax, label="loading")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_profiles(profiles, path) -> Path:
    """Heat map of log10(quantile) (clusters x factors); 0.5 (the population median) white."""
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm
    logq = np.log10(profiles.to_numpy(float))
    lo = min(float(logq.min()), np.log10(0.5) - 1e-3)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * profiles.shape[1] + 2.5), 0.4 * len(profiles) + 1.8))
    im = ax.imshow(logq, cmap="RdBu_r", norm=TwoSlopeNorm(np.log10(0.5), lo, 0.0), aspect="auto")
    ax.set_xticks(range(profiles.shape[1]), profiles.columns)
    ax.set_yticks(range(len(profiles)), [f"cluster {c}" for c in profiles.index])
    ax.set_title("Cluster profiles: log10 quantile of the cluster median")
    fig.colorbar(im, ax=ax, label="log10 quantile (0.5 = population median)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_distributions(scores, labels: np.ndarray, table, path) -> Path:
    """Box plots of factor scores per cluster for the significant factors (else the
    factor with the smallest p, titled as not significant)."""
    plt = pyplot()
    sig = table[table["significant"]]
    chosen = sig if len(sig) else table.nsmallest(1, "p")
    clusters = np.unique(labels)
    k = len(chosen)
    cols = min(3, k)
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (_, r) in zip(axes.ravel(), chosen.iterrows()):
        data = [scores[r["factor"]].to_numpy()[labels == c] for c in clusters]
        ax.boxplot(data, tick_labels=[str(c) for c in clusters])
        state = "" if r["significant"] else " (not significant)"
        ax.set_title(f"{r['factor']}: H={r['H']:.1f}, q={r['q']:.2g}{state}", fontsize=9)
        ax.set_xlabel("cluster")
        ax.set_ylabel("factor score")
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_null(null: np.ndarray, table, path) -> Path:
    """Histogram of H under permutation per factor, with the observed H as a red line."""
    plt = pyplot()
    k = len(table)
    cols = min(4, k)
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.4 * rows), squeeze=False)
    for f, ax in enumerate(axes.ravel()[:k]):
        r = table.iloc[f]
        ax.hist(null[:, f], bins=50, color="0.6")
        ax.axvline(r["H"], color="red")
        ax.set_title(f"{r['factor']}: perm p={r['perm_p']:.2g}", fontsize=9)
        ax.set_xlabel("H")
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------ subject QC
def edges(template: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gradient-magnitude edge map of ``template`` (X, Y, Z) inside a dilated ``mask``."""
    from scipy import ndimage
    smooth = ndimage.gaussian_filter(template.astype(np.float32), 0.7)
    mag = np.sqrt(sum(ndimage.sobel(smooth, axis=a) ** 2 for a in range(3)))
    inside = ndimage.binary_dilation(mask > 0, iterations=2)
    thr = np.percentile(mag[inside], 85) if inside.any() else mag.max()
    return ((mag > thr) & inside).astype(np.float32)


def _canonical(arr: np.ndarray, affine: np.ndarray):
    """``arr`` with ``affine`` as a NIfTI image in the closest RAS voxel order, so the
    cuts (and what nilearn draws) do not depend on how the volume was stored."""
    import nibabel as nib
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.asarray(affine, float)))


def _centre_world(img) -> tuple[float, float, float]:
    """World coordinates (mm) of the centre voxel of the NIfTI ``img``: where the cuts go."""
    centre = np.asarray(img.shape[:3]) // 2
    return tuple(float(c) for c in (img.affine @ np.r_[centre, 1.0])[:3])


def registration_figure(path, warped_t1: np.ndarray, template: np.ndarray, logjac: np.ndarray,
                        mask: np.ndarray, title: str, affine: np.ndarray) -> Path:
    """Write the subject's registration QC PNG atomically.

    All arrays (X, Y, Z) on the output grid, whose voxel -> world (RAS+, mm) ``affine``
    places them. Row 1: the warped T1w (grey) with the template's edges (red contour);
    row 2: log-JAC (blue = smaller, red = larger than the template) inside the brain
    mask over the T1w. Sagittal, coronal and axial cuts through the centre of the grid,
    drawn by nilearn in world coordinates with L/R (and A/P, S/I) labels.
    """
    plt = pyplot()
    from nilearn import plotting

    inside = mask > 0
    vmax = float(np.percentile(np.abs(logjac[inside]), 99)) if inside.any() else 1.0
    vmax = max(vmax, 1e-3)
    t1max = float(np.percentile(warped_t1[inside], 99.5)) if inside.any() else float(warped_t1.max() or 1)
    t1 = _canonical(warped_t1, affine)
    edge = _canonical(edges(template, mask), affine)
    jac = _canonical(np.where(inside, logjac, 0.0), affine)  # 0 (no change) is left transparent
    cut = _centre_world(t1)
    fig = plt.figure(figsize=(10, 6.6), facecolor="black")
    common = dict(display_mode="ortho", cut_coords=cut, annotate=True, draw_cross=False, black_bg=True,
                  figure=fig, vmin=0, vmax=t1max, cmap="gray", colorbar=False)
    top = plotting.plot_img(t1, axes=fig.add_axes((0.0, 0.5, 0.9, 0.44)), **common)
    top.add_contours(edge, levels=[0.5], colors="red", linewidths=0.5)
    bottom = plotting.plot_img(t1, axes=fig.add_axes((0.0, 0.03, 0.9, 0.44)), **common)
    bottom.add_overlay(jac, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    cax = fig.add_axes((0.92, 0.08, 0.02, 0.34))
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    cbar = fig.colorbar(ScalarMappable(Normalize(-vmax, vmax), cmap="RdBu_r"), cax=cax)
    cbar.set_label("log-JAC", color="white")
    cbar.ax.tick_params(colors="white")
    fig.suptitle(title, color="white")
    return save_figure(fig, path)
