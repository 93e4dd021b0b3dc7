"""Synthetic BIDS datasets with planted strata and ground truth (``mmfusion simulate``).

Every subject is the MNI152 2009 template (shipped inside nilearn, so this works
offline) deformed by a smooth diffeomorphism, plus realistic nuisances. The layout::

    OUT/dataset_description.json, README, participants.tsv/.json, phenotype/*.tsv/.json
    OUT/sub-XX[/ses-Y]/anat/sub-XX[_ses-Y]_T1w.nii.gz (+ .json)
    OUT/derivatives/qsirecon/dataset_description.json
    OUT/derivatives/qsirecon/sub-XX[/ses-Y]/dwi/
        sub-XX[_ses-Y]_space-T1w_model-tensor_param-fa_dwimap.nii.gz
        sub-XX[_ses-Y]_space-T1w_model-noddi_param-icvf_dwimap.nii.gz
    OUT/sourcedata/ground_truth/strata.tsv, latent_factors.tsv, planted.json,
        sites.tsv (only with --n-sites > 1),
        template_T1w.nii.gz, template_mask.nii.gz (template_head_T1w.nii.gz with --whole-head),
        sub-XX_space-template_desc-true_logjac.nii.gz,
        sub-XX_space-template_desc-true_{fa,ndi}.nii.gz (before the warp and the noise)

Deformation convention (matches ANTs with fixed=template, moving=subject): a stationary
velocity field ``v`` (mm, template grid) gives the forward map ``psi = exp(v)`` and the
inverse ``phi = exp(-v)`` (scaling and squaring). The subject image is
``S(y) = T(phi(y))`` and the truth is ``log det D psi(x)`` on the template grid
(> 0 where the subject is larger than the template). A small rigid transform is put in
the subject's NIfTI header afterwards; the truth is the nonlinear part only.

Velocity fields live on a coarse control grid (``CONTROL_SPACING_MM``); the maps are
brought to the image grid with separable cubic B-splines, whose analytic derivatives
give the Jacobian, so the truth is exactly the Jacobian of the map that was applied
(up to the float32 rounding and the spline approximation of ``phi``).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion._version import __version__
from mmfusion.io.atomic import (atomic_dir, check_writable_dir, output_permission_error, write_json,
                                write_text)
from mmfusion.io.bids import BIDS_VERSION, subject_folder, subject_stem
from mmfusion.errors import UsageParser
from mmfusion.errors import MmfusionError, OutputError, UsageError
from mmfusion.runlog import get_logger, progress

log = get_logger(__name__)

CONTROL_SPACING_MM = 4.0  # spacing of the velocity-field control grid
SQUARING_STEPS = 4
T1_SCALE = 1000.0  # template intensities in [0, 1] -> arbitrary scanner units

# Chosen so that the strata carry a sizable share of the between-subject variance of the
# true maps (clustering whole maps recovers them; bench/bench_fdr_calibration.py --ari-only,
# docs/validation.md) while every subject keeps its own deformation (~1.7 mm RMS).
# Individual (non-stratum) deformation: a large-scale part (displacement) and a
# small-scale part (local volume change).
LARGE_SIGMA_MM, LARGE_DISP_RMS_MM = 30.0, 1.6
SMALL_SIGMA_MM, SMALL_DIV_SD = 7.0, 0.04
# Planted stratum regions.
JAC_SIGMA_MM, JAC_EFFECT_RANGE, JAC_REGIONS_PER_STRATUM = 20.0, (0.20, 0.30), 4
MAP_SIGMA_MM, MAP_EFFECT_RANGE, MAP_REGIONS_PER_STRATUM = 16.0, (0.20, 0.30), 4
STRATUM_WEIGHT_SD = 0.15  # subject-to-subject variation of the stratum effect size
# Individual FA/NDI variation: a global scale (a 1-D nuisance, so kept small) and a smooth
# regional multiplicative field.
MAP_SCALE_SD, MAP_FIELD_SIGMA_MM, MAP_FIELD_SD = 0.015, 15.0, 0.04

DESIGN, PHENO, TEXTURE, SUBJECTS, SITES = range(5)
# Scanner (site) effects with --n-sites N > 1: site k (1..N) multiplies the T1w intensities
# by 1 + SITE_T1W_OFFSET * o_k and the NDI by 1 + SITE_NDI_OFFSET * o_k, with o_k evenly
# spaced in [-1, 1] (site1 -1, siteN +1). FA is left alone.
SITE_T1W_OFFSET, SITE_NDI_OFFSET = 0.10, 0.05
SITE_VENDORS = ("mmfusion simulate A", "mmfusion simulate B", "mmfusion simulate C")
DEFAULT_SIDECAR = {"Manufacturer": "mmfusion simulate", "MagneticFieldStrength": 3}
# Whole head (--whole-head): tissue layers outside the brain mask, by distance from it, as
# (outer edge in mm, T1w intensity on the template's [0, 1] scale): CSF, the skull's inner
# table, diploe, outer table, scalp (fat-rich, bright on T1w). A synthetic head: MNI152's
# own head is not shipped offline; the layers are what a brain-only template lacks.
HEAD_LAYERS_MM = ((2.0, 0.10), (3.5, 0.04), (6.0, 0.35), (7.5, 0.04), (13.0, 0.80))


# --------------------------------------------------------------------------- template
@dataclass(frozen=True)
class TemplateGrid:
    """The MNI152 2009 template resampled to ``voxel_size`` mm (axis-aligned grid).

    ``t1``, ``gm``, ``wm``: float32 arrays of shape ``shape`` in [0, 1]; ``mask``: bool.
    ``affine``: 4x4 voxel -> MNI mm, diagonal ``voxel_size`` with the MNI origin.
    """

    voxel_size: float
    shape: tuple[int, int, int]
    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray

    def world(self, index) -> np.ndarray:
        """Voxel index (..., 3) -> MNI mm (..., 3)."""
        return np.asarray(index, float) * self.voxel_size + self.affine[:3, 3]


@functools.lru_cache(maxsize=4)
def load_template_grid(voxel_size: float) -> TemplateGrid:
    """Resample nilearn's 1 mm MNI152 2009 T1/GM/WM/mask to an isotropic grid.

    The grid keeps the 1 mm template's origin and field of view (197 x 233 x 189 mm).
    Downsampling is anti-aliased with a Gaussian matching the voxel-size change.
    """
    from nilearn import datasets
    from scipy import ndimage

    src = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": datasets.load_mni152_brain_mask(resolution=1),
    }
    src_affine = src["t1"].affine
    src_shape = np.array(src["t1"].shape)
    src_vox = float(src_affine[0, 0])
    scale = voxel_size / src_vox
    shape = tuple(int(n) for n in np.floor((src_shape - 1) / scale).astype(int) + 1)
    affine = np.diag([voxel_size] * 3 + [1.0])
    affine[:3, 3] = src_affine[:3, 3]
    sigma = math.sqrt(max(scale**2 - 1.0, 0.0)) / 2.3548
    out = {}
    for name, img in src.items():
        data = np.asarray(img.dataobj, dtype=np.float32)
        if sigma > 0:
            data = ndimage.gaussian_filter(data, sigma)
        out[name] = ndimage.affine_transform(
            data, np.diag([scale] * 3), output_shape=shape, order=1, mode="nearest"
        ).astype(np.float32)
    mask = out["mask"] > 0.5
    t1 = np.clip(out["t1"], 0, 1)
    return TemplateGrid(
        voxel_size=float(voxel_size), shape=shape, affine=affine, t1=t1,
        gm=np.clip(out["gm"], 0, 1) * mask, wm=np.clip(out["wm"], 0, 1) * mask, mask=mask,
    )


def synthetic_head(grid: TemplateGrid) -> np.ndarray:
    """float32 (X, Y, Z) in [0, 1]: ``grid.t1`` inside the brain mask and, outside it, the
    layers of :data:`HEAD_LAYERS_MM` by Euclidean distance (mm) from the mask, edges
    smoothed over half a voxel (partial volume); air (0) beyond the scalp."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~grid.mask, sampling=grid.voxel_size)
    head = np.zeros(grid.shape, np.float32)
    inner = 0.0
    for outer, value in HEAD_LAYERS_MM:
        head[(distance > inner) & (distance <= outer)] = value
        inner = outer
    head = ndimage.gaussian_filter(head, 0.5)
    return np.where(grid.mask, grid.t1, head).astype(np.float32)


# ------------------------------------------------------------------ control grid & maps
@dataclass(frozen=True)
class ControlGrid:
    """Coarse grid for velocity fields, same origin as the template grid.

    ``shape``: control-grid shape; ``spacing``: mm; ``up``/``dup``: per axis, the cubic
    B-spline matrices (n_fine, n_coarse) giving values / d/dx (per mm) on the fine grid.
    ``mask``: brain mask on the control grid (bool).
    """

    shape: tuple[int, int, int]
    spacing: float
    up: tuple[np.ndarray, ...]
    dup: tuple[np.ndarray, ...]
    mask: np.ndarray


@functools.lru_cache(maxsize=4)
def control_grid(voxel_size: float) -> ControlGrid:
    """The control grid covering :func:`load_template_grid` ``(voxel_size)``."""
    from scipy import ndimage
    from scipy.interpolate import make_interp_spline

    grid = load_template_grid(voxel_size)
    spacing = max(CONTROL_SPACING_MM, voxel_size)
    up, dup, shape = [], [], []
    for n_fine in grid.shape:
        extent = (n_fine - 1) * voxel_size
        n_coarse = int(math.ceil(extent / spacing)) + 1
        xc = np.arange(n_coarse) * spacing
        xf = np.arange(n_fine) * voxel_size
        spline = make_interp_spline(xc, np.eye(n_coarse), k=3)
        up.append(spline(xf).astype(np.float32))
        dup.append(spline.derivative()(xf).astype(np.float32))
        shape.append(n_coarse)
    coords = np.indices(shape, dtype=np.float32) * (spacing / voxel_size)
    mask = ndimage.map_coordinates(grid.mask.astype(np.float32), coords, order=1) > 0.5
    return ControlGrid(tuple(shape), spacing, tuple(up), tuple(dup), mask)


def _contract(field: np.ndarray, mat: np.ndarray, axis: int) -> np.ndarray:
    """Multiply one axis of a C-contiguous 3D ``field`` by ``mat`` (n_out, n_in)."""
    n0, n1, n2 = field.shape
    if axis == 0:
        return (mat @ field.reshape(n0, -1)).reshape(mat.shape[0], n1, n2)
    if axis == 1:
        return np.matmul(mat, field)
    return (field.reshape(-1, n2) @ mat.T).reshape(n0, n1, mat.shape[0])


def separable_apply(coarse: np.ndarray, mats) -> np.ndarray:
    """Apply one matrix per axis: (n0c, n1c, n2c) -> (n0f, n1f, n2f) with mats[a] (naf, nac)."""
    out = np.ascontiguousarray(coarse, dtype=np.float32)
    for axis in (2, 1, 0):
        out = _contract(out, mats[axis], axis)
    return out


def exp_velocity(velocity: np.ndarray, spacing: float, steps: int = SQUARING_STEPS) -> np.ndarray:
    """Scaling and squaring: displacement (3, X, Y, Z) mm of ``exp(velocity)``.

    ``velocity``: (3, X, Y, Z) float32 in mm on a grid of ``spacing`` mm, axes = world
    axes. Returns ``u`` with ``exp(v)(x) = x + u(x)``.
    """
    from scipy import ndimage

    disp = (velocity / 2.0**steps).astype(np.float32)
    index = np.indices(disp.shape[1:], dtype=np.float32)
    for _ in range(steps):
        coords = index + disp / spacing
        disp = disp + np.stack([
            ndimage.map_coordinates(disp[c], coords, order=1, mode="nearest") for c in range(3)
        ])
    return disp


def upsample(coarse_field: np.ndarray, cgrid: ControlGrid) -> np.ndarray:
    """(C, Xc, Yc, Zc) control-grid field -> (C, X, Y, Z) float32 on the image grid."""
    return np.stack([separable_apply(f, cgrid.up) for f in coarse_field]).astype(np.float32)


def log_jacobian(coarse_disp: np.ndarray, cgrid: ControlGrid) -> np.ndarray:
    """log det(I + grad u) on the image grid, from the spline of a control-grid displacement.

    ``coarse_disp``: (3, Xc, Yc, Zc) mm. Returns (X, Y, Z) float32; the derivatives are
    analytic derivatives of the same cubic spline that :func:`upsample` evaluates.
    """
    up, dup = cgrid.up, cgrid.dup
    jac = [[None] * 3 for _ in range(3)]
    for c in range(3):
        field = np.ascontiguousarray(coarse_disp[c], dtype=np.float32)
        a_u, a_d = _contract(field, up[2], 2), _contract(field, dup[2], 2)
        b_uu, b_du, b_ud = _contract(a_u, up[1], 1), _contract(a_u, dup[1], 1), _contract(a_d, up[1], 1)
        derivs = (_contract(b_uu, dup[0], 0), _contract(b_du, up[0], 0), _contract(b_ud, up[0], 0))
        for a in range(3):
            jac[c][a] = derivs[a] + np.float32(1.0 if a == c else 0.0)
    det = (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )
    if float(det.min()) <= 0:
        raise RuntimeError("simulated deformation folded (det <= 0); lower the amplitudes")
    return np.log(det).astype(np.float32)


# ------------------------------------------------------------------------- the design
@dataclass(frozen=True)
class Region:
    """A planted Gaussian region: ``center_mm`` (MNI), ``sigma_mm``, signed ``effect``.

    ``kind`` 'jac': log-Jacobian at the centre ~ ``effect``; 'fa'/'ndi': the map is
    multiplied by ``1 + effect * exp(-r^2 / (2 sigma^2))``.
    """

    kind: str
    stratum: int
    center_mm: tuple[float, float, float]
    sigma_mm: float
    effect: float

    def as_dict(self, grid: TemplateGrid) -> dict:
        vox = (np.array(self.center_mm) - grid.affine[:3, 3]) / grid.voxel_size
        return {"kind": self.kind, "stratum": self.stratum,
                "center_mm": [round(float(x), 2) for x in self.center_mm],
                "center_voxel_template_grid": [round(float(x), 2) for x in vox],
                "sigma_mm": self.sigma_mm, "effect": round(self.effect, 4)}


def _pick_centers(rng, candidates_mm: np.ndarray, n: int, min_dist: float) -> list:
    """Greedy random picks from (N, 3) mm candidates, pairwise >= ``min_dist`` apart.

    When the brain is too crowded the separation is relaxed step by step.
    """
    if len(candidates_mm) < n:
        raise UsageError(f"cannot place {n} planted regions in the template at this voxel size; "
                         "use fewer strata or a smaller --voxel-size")
    order = rng.permutation(len(candidates_mm))
    dist = min_dist
    while True:
        picked: list = []
        for i in order:
            c = candidates_mm[i]
            if all(np.linalg.norm(c - o) >= dist for o in picked):
                picked.append(c)
                if len(picked) == n:
                    return picked
        dist *= 0.85  # too crowded: relax the separation and start again


def plan_regions(rng, grid: TemplateGrid, n_strata: int) -> list[Region]:
    """Choose each stratum's planted JAC, FA and NDI regions (distinct between strata).

    JAC regions sit in tissue at least one sigma inside the brain; FA/NDI regions in
    deep white matter (>= 6 mm from its edge) so a few mm of deformation does not move
    them across a tissue boundary.
    """
    from scipy import ndimage

    depth_mm = ndimage.distance_transform_edt(grid.mask) * grid.voxel_size
    wm_depth_mm = ndimage.distance_transform_edt(grid.wm > 0.5) * grid.voxel_size
    step = max(1, int(round(4.0 / grid.voxel_size)))  # thin the candidate list (4 mm)
    sub = (slice(None, None, step),) * 3

    def candidates(*conditions):
        """Voxels meeting the first condition that has enough of them, in MNI mm."""
        for cond in conditions:
            idx = np.argwhere(cond[sub]) * step
            if len(idx) >= 4 * n_strata * max(JAC_REGIONS_PER_STRATUM, MAP_REGIONS_PER_STRATUM):
                break
        return grid.world(idx)

    tissue = grid.gm + grid.wm
    jac_cand = candidates((depth_mm >= JAC_SIGMA_MM) & (tissue > 0.5), grid.mask)
    wm_cand = candidates(wm_depth_mm >= 6.0, wm_depth_mm >= 3.0, grid.wm > 0.5, grid.mask)
    regions = []
    jac_centers = _pick_centers(rng, jac_cand, n_strata * JAC_REGIONS_PER_STRATUM, 3 * JAC_SIGMA_MM)
    for i, c in enumerate(jac_centers):
        effect = rng.choice([-1.0, 1.0]) * rng.uniform(*JAC_EFFECT_RANGE)
        regions.append(Region("jac", i // JAC_REGIONS_PER_STRATUM + 1, tuple(float(x) for x in c),
                              JAC_SIGMA_MM, float(effect)))
    for kind in ("fa", "ndi"):
        centers = _pick_centers(rng, wm_cand, n_strata * MAP_REGIONS_PER_STRATUM, 3 * MAP_SIGMA_MM)
        for i, c in enumerate(centers):
            effect = rng.choice([-1.0, 1.0]) * rng.uniform(*MAP_EFFECT_RANGE)
            regions.append(Region(kind, i // MAP_REGIONS_PER_STRATUM + 1, tuple(float(x) for x in c),
                                  MAP_SIGMA_MM, float(effect)))
    return regions


def _control_points_mm(grid: TemplateGrid, cgrid: ControlGrid) -> np.ndarray:
    """(3, Xc, Yc, Zc) MNI mm of the control-grid points."""
    idx = np.indices(cgrid.shape, dtype=np.float64) * cgrid.spacing
    return idx + grid.affine[:3, 3].reshape(3, 1, 1, 1)


def stratum_velocity(regions, stratum: int, grid: TemplateGrid, cgrid: ControlGrid) -> np.ndarray:
    """(3, Xc, Yc, Zc) mm: radial Gaussian expansions/contractions of the stratum's JAC regions.

    ``v = a (x - c) exp(-r^2 / 2 s^2)`` has divergence ``3a`` at the centre, so
    ``a = effect / 3`` plants a log-Jacobian of ~``effect`` there.
    """
    pts = _control_points_mm(grid, cgrid)
    vel = np.zeros((3,) + cgrid.shape, np.float64)
    for r in regions:
        if r.kind != "jac" or r.stratum != stratum:
            continue
        rel = pts - np.reshape(r.center_mm, (3, 1, 1, 1))
        gauss = np.exp(-(rel**2).sum(0) / (2 * r.sigma_mm**2))
        vel += (r.effect / 3.0) * rel * gauss
    return vel.astype(np.float32)


def individual_velocity(rng, cgrid: ControlGrid) -> np.ndarray:
    """(3, Xc, Yc, Zc) mm: random smooth field, large-scale (shift) + small-scale (volume)."""
    from scipy import ndimage

    def smooth_noise(sigma_mm):
        return np.stack([
            ndimage.gaussian_filter(rng.standard_normal(cgrid.shape), sigma_mm / cgrid.spacing)
            for _ in range(3)
        ])

    large = smooth_noise(LARGE_SIGMA_MM)
    large *= LARGE_DISP_RMS_MM / np.sqrt((large**2).sum(0)[cgrid.mask].mean())
    small = smooth_noise(SMALL_SIGMA_MM)
    div = sum(np.gradient(small[a], cgrid.spacing, axis=a) for a in range(3))
    small *= SMALL_DIV_SD / div[cgrid.mask].std()
    return (large + small).astype(np.float32)


def _gaussian_bumps(regions, kind: str, stratum: int, grid: TemplateGrid) -> np.ndarray:
    """Multiplicative map ``prod(1 + effect * G)`` on the template grid (X, Y, Z)."""
    axes = [grid.affine[a, 3] + grid.voxel_size * np.arange(n) for a, n in enumerate(grid.shape)]
    factor = np.ones(grid.shape, np.float32)
    for r in regions:
        if r.kind != kind or r.stratum != stratum:
            continue
        g = [np.exp(-((ax - c) ** 2) / (2 * r.sigma_mm**2)) for ax, c in zip(axes, r.center_mm)]
        factor *= 1.0 + r.effect * (g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :])
    return factor.astype(np.float32)


def subject_maps(rng, maps: dict[str, np.ndarray], grid: TemplateGrid, cgrid: ControlGrid) -> dict[str, np.ndarray]:
    """One subject's FA/NDI on the template grid: its stratum's maps (X, Y, Z) with individual variation.

    Each map is multiplied by a global scale ``1 + MAP_SCALE_SD * N(0, 1)`` and by
    ``exp(MAP_FIELD_SD * f)``, ``f`` a smooth (``MAP_FIELD_SIGMA_MM``) random field with
    SD 1 in the brain. Returns float32 maps clipped to [0, 1].
    """
    from scipy import ndimage

    out = {}
    for name, values in maps.items():
        scale = 1.0 + MAP_SCALE_SD * rng.standard_normal()
        field = separable_apply(ndimage.gaussian_filter(
            rng.standard_normal(cgrid.shape), MAP_FIELD_SIGMA_MM / cgrid.spacing), cgrid.up)
        field = (field - field[grid.mask].mean()) / field[grid.mask].std()
        out[name] = np.clip(values * scale * np.exp(MAP_FIELD_SD * field), 0, 1).astype(np.float32)
    return out


def diffusion_templates(rng, grid: TemplateGrid, cgrid: ControlGrid) -> dict[str, np.ndarray]:
    """FA and NDI maps (X, Y, Z) float32 on the template grid, from the tissue maps.

    WM: FA ~0.45 and NDI ~0.6 with a smooth tract-like texture; GM: FA ~0.12, NDI ~0.35;
    CSF: both ~0.03. Zero outside the brain mask.
    """
    from scipy import ndimage

    tex = ndimage.gaussian_filter(rng.standard_normal(cgrid.shape), 6.0 / cgrid.spacing)
    tex = separable_apply(tex, cgrid.up)
    tex = (tex - tex[grid.mask].mean()) / tex[grid.mask].std()
    csf = np.clip(grid.mask - grid.gm - grid.wm, 0, 1)
    fa = 0.12 * grid.gm + np.clip(0.45 + 0.10 * tex, 0.2, 0.85) * grid.wm + 0.03 * csf
    ndi = 0.35 * grid.gm + np.clip(0.60 + 0.05 * tex, 0.4, 0.8) * grid.wm + 0.03 * csf
    return {"fa": (fa * grid.mask).astype(np.float32), "ndi": (ndi * grid.mask).astype(np.float32)}


# ----------------------------------------------------------------------- phenotypes
FACTORS = ("negative_affect", "processing_speed", "sleep_quality", "social_connectedness",
           "physical_activity")

# name, table, factor (None = pure noise), mean, sd, lo, hi, decimals, log-scale, units, description
VARIABLES = (
    ("anxiety_score", "mood", "negative_affect", 7, 4, 0, 21, 0, False, None, "Anxiety scale, sum of 7 items scored 0-3"),
    ("depression_score", "mood", "negative_affect", 6, 5, 0, 27, 0, False, None, "Depression scale, sum of 9 items scored 0-3"),
    ("stress_score", "mood", "negative_affect", 15, 6, 0, 40, 0, False, None, "Perceived stress, sum of 10 items scored 0-4"),
    ("rumination_score", "mood", "negative_affect", 22, 6, 10, 40, 0, False, None, "Rumination, sum of 10 items scored 1-4"),
    ("loneliness_score", "mood", "social_connectedness", 40, 10, 20, 80, 0, False, None, "Loneliness, sum of 20 items scored 1-4"),
    ("perceived_support", "mood", "social_connectedness", 60, 12, 12, 84, 0, False, None, "Perceived social support, sum of 12 items scored 1-7"),
    ("friends_contacts_week", "mood", "social_connectedness", 5, 3, 0, 30, 0, False, None, "Contacts with friends per week"),
    ("life_satisfaction", "mood", None, 24, 6, 5, 35, 0, False, None, "Life satisfaction, sum of 5 items scored 1-7"),
    ("simple_rt", "cognition", "processing_speed", 300, 0.15, 150, 1000, 1, True, "ms", "Median simple reaction time"),
    ("choice_rt", "cognition", "processing_speed", 480, 0.15, 250, 1500, 1, True, "ms", "Median choice reaction time"),
    ("symbol_digit_correct", "cognition", "processing_speed", 55, 10, 10, 110, 0, False, None, "Symbol-digit substitution, correct in 90 s"),
    ("trail_making_b", "cognition", "processing_speed", 65, 0.3, 20, 300, 1, True, "s", "Trail making test part B, completion time"),
    ("digit_span", "cognition", None, 6, 1.2, 3, 9, 0, False, None, "Longest digit span forward"),
    ("vocabulary_score", "cognition", None, 30, 6, 0, 50, 0, False, None, "Picture vocabulary, correct items"),
    ("sleep_hours", "lifestyle", "sleep_quality", 7, 1, 3, 11, 1, False, "h", "Usual sleep duration per night"),
    ("sleep_latency", "lifestyle", "sleep_quality", 15, 0.6, 1, 120, 0, True, "min", "Usual time to fall asleep"),
    ("psqi_global", "lifestyle", "sleep_quality", 5, 3, 0, 21, 0, False, None, "Sleep quality index, global score (higher is worse)"),
    ("exercise_minutes_week", "lifestyle", "physical_activity", 150, 0.7, 0, 1500, 0, True, "min", "Moderate or vigorous exercise per week"),
    ("steps_per_day", "lifestyle", "physical_activity", 7500, 2500, 500, 25000, 0, False, None, "Average steps per day (wearable)"),
    ("sedentary_hours", "lifestyle", "physical_activity", 8, 2.5, 1, 16, 1, False, "h", "Hours sitting per day"),
    ("alcohol_units_week", "lifestyle", None, 6, 0.8, 0, 60, 0, True, None, "Alcohol units per week"),
    ("caffeine_mg_day", "lifestyle", None, 200, 0.6, 0, 1000, 0, True, "mg", "Caffeine intake per day"),
)
TABLE_DESCRIPTIONS = {
    "mood": "Questionnaires on mood, stress and social life (synthetic)",
    "cognition": "Computerised cognitive tests (synthetic)",
    "lifestyle": "Lifestyle, sleep and activity questionnaire (synthetic)",
}
N_PLANTED_FACTORS = 2
FACTOR_STEP_SD = 1.0  # mean shift between consecutive strata, in factor SDs
MISSING_FRACTION = 0.015


@dataclass
class PhenotypeSample:
    """Simulated non-imaging data for ``n`` subjects (rows in subject order).

    ``participants``: age, sex, handedness, bmi; ``tables``: phenotype table name ->
    DataFrame of its variables (NaN = missing); ``latent``: (n, n_factors) true factor
    scores; ``planted``: the design, JSON-ready.
    """

    participants: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    latent: pd.DataFrame
    planted: dict


def _stratum_means(rng, n_strata: int, step: float) -> np.ndarray:
    """Distinct means, ``step`` apart, centred on 0, in random order over strata."""
    return rng.permutation((np.arange(n_strata) - (n_strata - 1) / 2.0) * step)


def simulate_phenotypes(strata: np.ndarray, rng, null: bool = False) -> PhenotypeSample:
    """Demographics and questionnaire-like variables driven by latent factors.

    ``strata``: (n,) int labels 1..K. Two of the five factors (random) and one of
    age/BMI shift with the stratum unless ``null``; each variable loads on one factor
    (|loading| 0.6-0.85) or on nothing (pure noise). About 1.5% of the phenotype cells
    are set missing.
    """
    strata = np.asarray(strata)
    n, n_strata = len(strata), int(strata.max())
    idx = strata - 1
    planted_factors = [] if null or n_strata < 2 else sorted(
        rng.choice(len(FACTORS), N_PLANTED_FACTORS, replace=False).tolist())
    latent, factor_info = {}, []
    for f, name in enumerate(FACTORS):
        means = _stratum_means(rng, n_strata, FACTOR_STEP_SD) if f in planted_factors else np.zeros(n_strata)
        latent[name] = means[idx] + rng.standard_normal(n)
        factor_info.append({"name": name, "depends_on_stratum": f in planted_factors,
                            "stratum_means_sd": [round(float(m), 3) for m in means]})

    demo_planted = None if null or n_strata < 2 else str(rng.choice(["age", "bmi"]))
    age_means = 42 + (_stratum_means(rng, n_strata, 8.0) if demo_planted == "age" else np.zeros(n_strata))
    bmi_means = 25 + (_stratum_means(rng, n_strata, 3.0) if demo_planted == "bmi" else np.zeros(n_strata))
    participants = pd.DataFrame({
        "age": np.clip(np.round(age_means[idx] + 12 * rng.standard_normal(n)), 18, 90).astype(int),
        "sex": rng.choice(["M", "F"], n),
        "handedness": rng.choice(["R", "L", "A"], n, p=[0.88, 0.09, 0.03]),
        "bmi": np.round(np.clip(bmi_means[idx] + 3.5 * rng.standard_normal(n), 16, 50), 1),
    })

    tables: dict[str, dict] = {}
    var_info = []
    for name, table, factor, mean, sd, lo, hi, dec, logscale, units, desc in VARIABLES:
        loading = 0.0
        if factor is not None:
            loading = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 0.85))
        z = loading * (latent[factor] if factor else 0) + math.sqrt(1 - loading**2) * rng.standard_normal(n)
        values = np.exp(np.log(mean) + sd * z) if logscale else mean + sd * z
        values = np.round(np.clip(values, lo, hi), dec)
        tables.setdefault(table, {})[name] = values
        var_info.append({"name": name, "table": table, "factor": factor, "loading": round(loading, 3),
                         "depends_on_stratum": factor is not None and FACTORS.index(factor) in planted_factors})
    frames = {t: pd.DataFrame(cols) for t, cols in tables.items()}
    _insert_missing(rng, frames)

    planted = {
        "latent_factors": factor_info,
        "variables": var_info,
        "demographics": {
            "age": {"depends_on_stratum": demo_planted == "age",
                    "stratum_means_years": [round(float(m), 2) for m in age_means]},
            "bmi": {"depends_on_stratum": demo_planted == "bmi",
                    "stratum_means_kg_m2": [round(float(m), 2) for m in bmi_means]},
            "sex": {"depends_on_stratum": False}, "handedness": {"depends_on_stratum": False},
        },
        "missing_fraction": MISSING_FRACTION,
        "null_phenotypes": bool(null),
    }
    return PhenotypeSample(participants, frames, pd.DataFrame(latent), planted)


def _insert_missing(rng, frames: dict[str, pd.DataFrame]) -> None:
    """Set ~``MISSING_FRACTION`` of all phenotype cells (at least one) to NaN, in place."""
    cells = [(t, c, r) for t, df in frames.items() for c in df.columns for r in range(len(df))]
    n_missing = max(1, int(round(MISSING_FRACTION * len(cells))))
    for i in rng.choice(len(cells), n_missing, replace=False):
        t, c, r = cells[i]
        frames[t][c] = frames[t][c].astype(float)
        frames[t].loc[r, c] = np.nan


# ------------------------------------------------------------------ per-subject images
@dataclass
class SubjectImages:
    """One session's images on the subject grid (X, Y, Z) float32 and its header affine."""

    t1w: np.ndarray
    fa: np.ndarray
    ndi: np.ndarray
    affine: np.ndarray
    info: dict


def random_rigid(rng, max_rot_deg: float = 3.0, max_shift_mm: float = 3.0) -> tuple[np.ndarray, dict]:
    """A 4x4 world-to-world rigid transform (rotations about the MNI origin)."""
    from scipy.spatial.transform import Rotation

    angles = rng.uniform(-max_rot_deg, max_rot_deg, 3)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    mat = np.eye(4)
    mat[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    mat[:3, 3] = shift
    return mat, {"rotation_xyz_deg": [round(float(a), 3) for a in angles],
                 "translation_mm": [round(float(s), 3) for s in shift]}


def bias_field(rng, grid: TemplateGrid, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(b), b a random quadratic, max|b| in brain = ``strength``."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in grid.shape]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    terms = [x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    coef = rng.standard_normal(len(terms))
    b = sum(c * t for c, t in zip(coef, terms))
    b = b - b[grid.mask].mean()
    b *= strength / np.abs(b[grid.mask]).max()
    return np.exp(b).astype(np.float32)


def render_session(rng, grid: TemplateGrid, t1_coeffs: np.ndarray, maps: dict, coords: np.ndarray,
                   *, bias: bool, noise: bool, affine: bool, site: Site | None = None) -> SubjectImages:
    """Sample the (deformed) template at ``coords`` and add the acquisition nuisances.

    ``coords``: (3, X, Y, Z) template voxel coordinates of phi(y) for each subject voxel;
    ``t1_coeffs``: cubic-spline coefficients of the template T1; ``maps``: this subject's
    FA/NDI on the template grid; ``site``: its scanner gains (T1w, NDI) are applied
    before the noise (None: no site effect). Draws nothing from ``rng`` for the site.
    """
    from scipy import ndimage

    t1 = ndimage.map_coordinates(t1_coeffs, coords, order=3, mode="nearest", prefilter=False)
    t1 = np.clip(t1, 0, None) * T1_SCALE
    mask = ndimage.map_coordinates(grid.mask.astype(np.float32), coords, order=1) > 0.5
    out = {k: ndimage.map_coordinates(v, coords, order=1) for k, v in maps.items()}
    info = {}
    if bias:
        strength = float(rng.uniform(0.10, 0.20))
        gain = float(rng.uniform(0.9, 1.1))
        t1 = t1 * bias_field(rng, grid, strength) * gain
        info.update(bias_field_max_log=round(strength, 4), gain=round(gain, 4))
    if site is not None:
        t1 = t1 * site.t1w_gain
        out["ndi"] = out["ndi"] * site.ndi_gain
    if noise:
        sigma = 0.025 * T1_SCALE
        t1 = np.sqrt((t1 + sigma * rng.standard_normal(t1.shape)) ** 2
                     + (sigma * rng.standard_normal(t1.shape)) ** 2)
        for k in out:
            out[k] = out[k] + 0.02 * rng.standard_normal(out[k].shape)
        info["rician_sigma"] = sigma
    for k in out:
        out[k] = np.clip(out[k], 0, 1) * mask
    world = np.eye(4)
    if affine:
        world, rigid = random_rigid(rng)
        info["header_rigid"] = rigid
        info["header_rigid_matrix"] = np.round(world, 6).tolist()
    return SubjectImages(t1.astype(np.float32), out["fa"].astype(np.float32),
                         out["ndi"].astype(np.float32), world @ grid.affine, info)


# ---------------------------------------------------------------------------- writing
def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, code: int = 1,
                dtype=np.float32) -> None:
    """Write ``data`` (X, Y, Z) with ``affine`` (4x4, mm); sform/qform code 1 scanner, 4 MNI."""
    import nibabel as nib

    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.round(data), info.min, info.max)
    img = nib.Nifti1Image(np.asarray(data, dtype), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_tsv(path: Path, df: pd.DataFrame, decimals: dict | None = None) -> None:
    """TSV with 'n/a' for missing values and fixed decimals per column."""
    decimals = decimals or {}
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        values = df[col]
        if col in decimals:
            fmt = f"{{:.{decimals[col]}f}}"
            out[col] = [("n/a" if pd.isna(v) else fmt.format(v)) for v in values]
        else:
            out[col] = ["n/a" if pd.isna(v) else str(v) for v in values]
    write_text(path, out.to_csv(sep="\t", index=False, lineterminator="\n"))


README = """# Synthetic mmfusion dataset

Generated by `mmfusion simulate` (mmfusion {version}) with seed {seed}: {n} subjects in
{k} planted strata, {vs} mm voxels, built from the MNI152 2009 template shipped with
nilearn. Every T1w is the template deformed by a smooth diffeomorphism (a
stratum-specific regional pattern plus an individual part){extras}.

- `derivatives/qsirecon/`: FA (tensor) and NDI (NODDI ICVF) maps on each T1w grid.
- `phenotype/`: questionnaire-like tables generated from latent factors.
- `sourcedata/ground_truth/`: the truth (strata, planted regions and variables, true
  log-Jacobians and FA/NDI maps on the template grid, the template grid itself). Not
  for analysis.

All data are synthetic; no real person is described.
"""


DERIVATIVE_README = """# Synthetic QSIRecon-style diffusion maps

FA (`model-tensor_param-fa`) and NDI (`model-noddi_param-icvf`) maps, one per T1w, on
the same voxel grid and with the same header affine as that T1w. File names follow
QSIRecon (BIDS extension proposal BEP016), listed in `.bidsignore` until the BIDS
schema includes them.
"""


def _description(name: str, dataset_type: str, generated_by: dict) -> dict:
    return {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": dataset_type,
            "License": "CC0", "Authors": ["mmfusion developers", "mmfusion simulate"], "GeneratedBy": [generated_by]}


def _write_metadata(root: Path, labels, pheno: PhenotypeSample, opts: dict, site_of=None) -> None:
    generated = {"Name": "mmfusion simulate", "Version": __version__,
                 "Description": f"synthetic dataset, seed {opts['seed']}"}
    write_json(root / "dataset_description.json",
                _description("mmfusion synthetic dataset", "raw", generated))
    extras = ", ".join(x for x, on in (("bias field", opts["bias_field"]), ("Rician noise", opts["noise"]),
                                       ("random rigid header transform", opts["random_affine"])) if on)
    readme = README.format(version=__version__, seed=opts["seed"], n=len(labels), k=opts["n_strata"],
                           vs=opts["voxel_size"], extras=f", with {extras}" if extras else "")
    if opts.get("n_sites", 1) > 1:
        how = "site = stratum" if opts["site_follows_stratum"] else "assigned at random"
        readme += (f"\nSubjects come from {opts['n_sites']} simulated sites ({how}; `site` in "
                   "participants.tsv), each with a scanner effect on T1w and NDI intensities.\n")
    write_text(root / "README", readme)
    ids = [f"sub-{lab}" for lab in labels]
    participants = pd.concat([pd.DataFrame({"participant_id": ids}), pheno.participants], axis=1)
    sidecar = {
        "participant_id": {"Description": "Unique participant identifier"},
        "age": {"Description": "Age at the first scan", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
        "handedness": {"Description": "Handedness",
                       "Levels": {"R": "right", "L": "left", "A": "ambidextrous"}},
        "bmi": {"Description": "Body mass index", "Units": "kg/m^2"},
    }
    if site_of is not None:  # only with more than one site
        participants["site"] = [f"site{k}" for k in site_of]
        sidecar["site"] = {"Description": "Acquisition site (scanner) of all the participant's sessions",
                           "Levels": {f"site{k}": f"simulated site {k}" for k in sorted(set(site_of))}}
    _write_tsv(root / "participants.tsv", participants, {"bmi": 1})
    write_json(root / "participants.json", sidecar)
    decimals = {v[0]: v[7] for v in VARIABLES}
    meta = {v[0]: v for v in VARIABLES}
    for table, df in pheno.tables.items():
        _write_tsv(root / "phenotype" / f"{table}.tsv",
                   pd.concat([pd.DataFrame({"participant_id": ids}), df], axis=1), decimals)
        sidecar = {"MeasurementToolMetadata": {"Description": TABLE_DESCRIPTIONS[table]},
                   "participant_id": {"Description": "Unique participant identifier"}}
        for col in df.columns:
            entry = {"Description": meta[col][10]}
            if meta[col][9]:
                entry["Units"] = meta[col][9]
            sidecar[col] = entry
        write_json(root / "phenotype" / f"{table}.json", sidecar)
    if "dwi" in opts:
        from mmfusion import simulate_dwi
        simulate_dwi.write_metadata(root, _description)
        return
    deriv = root / "derivatives" / "qsirecon"
    write_json(deriv / "dataset_description.json", _description(
        "QSIRecon-style synthetic diffusion maps", "derivative",
        {"Name": "mmfusion simulate", "Version": __version__,
         "Description": "synthetic FA (tensor) and NDI (NODDI ICVF) maps in T1w space"}))
    write_text(deriv / "README", DERIVATIVE_README)
    # QSIRecon's *_dwimap names follow BEP016, not yet in the BIDS schema.
    write_text(deriv / ".bidsignore", "*_dwimap.nii.gz\n")


@dataclass(frozen=True)
class Site:
    """One simulated site: its label, scanner gains (dimensionless) and T1w sidecar fields."""

    label: str
    t1w_gain: float
    ndi_gain: float
    sidecar: dict

    def as_dict(self) -> dict:
        return {"t1w_gain": self.t1w_gain, "ndi_gain": self.ndi_gain, "sidecar": self.sidecar}


def plan_sites(n_sites: int) -> list[Site]:
    """The ``n_sites`` (> 1) sites ``site1..siteN`` with their scanner effects (deterministic)."""
    offsets = np.linspace(-1.0, 1.0, n_sites)
    return [Site(label=f"site{k + 1}", t1w_gain=round(1.0 + SITE_T1W_OFFSET * float(o), 6),
                 ndi_gain=round(1.0 + SITE_NDI_OFFSET * float(o), 6),
                 sidecar={"Manufacturer": SITE_VENDORS[k % len(SITE_VENDORS)],
                          "ManufacturersModelName": f"Virtual Scanner {k + 1}",
                          "StationName": f"site{k + 1}", "MagneticFieldStrength": 3})
            for k, o in enumerate(offsets)]


def assign_sites(rng, strata: np.ndarray, n_sites: int, follows_stratum: bool) -> np.ndarray:
    """(n,) int site per subject, 1..``n_sites``.

    At random in near-equal numbers (``rng``: the SITES stream), or, with
    ``follows_stratum``, site = ((stratum - 1) mod n_sites) + 1 (site k holds stratum k).
    """
    strata = np.asarray(strata)
    if follows_stratum:
        return (strata - 1) % n_sites + 1
    return rng.permutation(np.arange(len(strata)) % n_sites + 1)


def _check_options(n_subjects, n_strata, voxel_size, sessions, n_sites=1, site_follows_stratum=False) -> None:
    if n_strata < 1 or n_subjects < n_strata:
        raise UsageError(f"need n_subjects >= n_strata >= 1 (got {n_subjects} subjects, {n_strata} strata)")
    if not 1 <= n_sites <= n_subjects:
        raise UsageError(f"--n-sites must be between 1 and --n-subjects ({n_subjects}) (got {n_sites})")
    if site_follows_stratum and not 2 <= n_sites <= n_strata:
        raise UsageError(f"--site-follows-stratum needs 2 <= --n-sites <= --n-strata "
                         f"(got {n_sites} sites, {n_strata} strata)")
    if not 0.5 <= voxel_size <= 8.0:
        raise UsageError(f"--voxel-size must be between 0.5 and 8 mm (got {voxel_size})")
    if sessions < 1:
        raise UsageError(f"--sessions must be >= 1 (got {sessions})")


def _is_mount_point(path: Path) -> bool:
    """``os.path.ismount``, plus bind mounts within one file system (Linux: /proc/self/mountinfo)."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo") as fh:  # field 5: the mount point, with octal escapes
            points = {line.split()[4].encode().decode("unicode_escape") for line in fh if line.strip()}
    except OSError:
        return False
    return str(path) in points


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """OUT_DIR must be new or empty (or ``overwrite``), and its parent writable: the dataset
    is written into a temporary folder next to OUT_DIR, then renamed to it (exit 73)."""
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir} is not empty; choose an empty or new OUT_DIR or pass --overwrite")
    if _is_mount_point(out_dir):
        raise OutputError(f"{out_dir} is a mount point, which cannot be replaced by the finished dataset; "
                          f"give a new folder inside it, e.g. {out_dir / 'sim'}")
    parent = out_dir.parent
    while not parent.exists():  # the folders simulate would create (mkdir -p)
        parent = parent.parent
    check_writable_dir(parent, "the folder OUT_DIR goes into")


def simulate_dataset(out_dir, n_subjects: int = 12, n_strata: int = 3, voxel_size: float = 1.25,
                     seed: int = 0, bias_field: bool = True, noise: bool = True,
                     random_affine: bool = True, sessions: int = 1, null_phenotypes: bool = False,
                     overwrite: bool = False, n_sites: int = 1, site_follows_stratum: bool = False,
                     design_seed: int | None = None, dwi: dict | None = None,
                     whole_head: bool = False) -> Path:
    """Write a complete synthetic BIDS dataset to ``out_dir`` (atomically) and return it.

    Subjects are assigned to strata 1..``n_strata`` in near-equal numbers. With
    ``n_sites`` > 1 they are also assigned to sites ``site1..siteN`` (at random in
    near-equal numbers, or site = stratum mod N with ``site_follows_stratum``, which
    needs 2 <= N <= n_strata), each with a scanner effect (T1w and NDI gains, see
    :func:`plan_sites`) and its own T1w sidecar fields; ``n_sites == 1`` writes exactly
    the files of a run without sites. Same arguments (seed included) give identical
    files. ``design_seed`` (default: ``seed``) seeds the population design alone: the
    planted regions, the stratum of each subject and the diffusion texture shared by all
    subjects; two datasets with the same ``design_seed`` and different ``seed`` are two
    samples of one population (same strata, different subjects). ``dwi`` (keys of
    :data:`mmfusion.simulate_dwi.DEFAULTS`, ``{}`` for the defaults) writes multi-shell DWI
    in QSIPrep naming instead of the QSIRecon FA/NDI maps (``mmfusion.simulate_dwi``).
    ``whole_head`` renders the T1w with a synthetic skull and scalp around the brain
    (:func:`synthetic_head`, deformed with the subject), as real T1w images come; FA, NDI
    and the truth are unchanged, and ``ground_truth/template_head_T1w.nii.gz`` holds the
    undeformed head. Raises ``UsageError`` (exit 64) for impossible options and ``OutputError``
    (exit 73) if ``out_dir`` is not empty and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    _check_options(n_subjects, n_strata, voxel_size, sessions, n_sites, site_follows_stratum)
    _check_out_dir(out_dir, overwrite)
    opts = dict(n_subjects=n_subjects, n_strata=n_strata, voxel_size=voxel_size, seed=seed,
                bias_field=bias_field, noise=noise, random_affine=random_affine, sessions=sessions,
                null_phenotypes=null_phenotypes)
    if n_sites > 1:  # only then: a run with one site writes the same planted.json as before sites existed
        opts.update(n_sites=n_sites, site_follows_stratum=site_follows_stratum)
    if dwi is not None:  # only then: a run without it writes the same planted.json as before
        from mmfusion.simulate_dwi import DEFAULTS as DWI_DEFAULTS
        unknown = set(dwi) - set(DWI_DEFAULTS)
        if unknown:
            raise UsageError(f"unknown DWI option(s) {sorted(unknown)}; valid: {sorted(DWI_DEFAULTS)}")
        opts["dwi"] = {**DWI_DEFAULTS, **dwi, "acq_seed": int(seed)}
        if not (opts["dwi"]["snr"] > 0 and opts["dwi"]["directions"] >= 6 and opts["dwi"]["factor"] >= 1):
            raise UsageError("--dwi-snr must be > 0, --dwi-directions >= 6 and --dwi-factor >= 1")
    if whole_head:  # only then: a run without it writes the same planted.json as before
        opts["whole_head"] = True
    design_seed = seed if design_seed is None else int(design_seed)
    if design_seed != seed:  # only then: a run without it writes the same planted.json as before
        opts.update(design_seed=design_seed)
    # Children 0-3 of spawn(5) equal those of spawn(4), so the SITES stream leaves the others unchanged.
    seeds = np.random.SeedSequence(seed).spawn(5)
    design_seeds = np.random.SeedSequence(design_seed).spawn(5)
    design_rng = np.random.default_rng(design_seeds[DESIGN])
    grid = load_template_grid(float(voxel_size))
    cgrid = control_grid(float(voxel_size))
    regions = plan_regions(design_rng, grid, n_strata)
    strata = design_rng.permutation(np.arange(n_subjects) % n_strata + 1)
    sites = plan_sites(n_sites) if n_sites > 1 else []
    site_of = (assign_sites(np.random.default_rng(seeds[SITES]), strata, n_sites, site_follows_stratum)
               if sites else None)
    pheno = simulate_phenotypes(strata, np.random.default_rng(seeds[PHENO]), null=null_phenotypes)
    base_maps = diffusion_templates(np.random.default_rng(design_seeds[TEXTURE]), grid, cgrid)
    stratum_maps = {k: {m: base_maps[m] * _gaussian_bumps(regions, m, k, grid) for m in base_maps}
                    for k in range(1, n_strata + 1)}
    from scipy import ndimage
    t1_template = synthetic_head(grid) if whole_head else grid.t1
    t1_coeffs = ndimage.spline_filter(t1_template, order=3, mode="nearest").astype(np.float32)

    width = max(2, len(str(n_subjects)))
    labels = [f"{i + 1:0{width}d}" for i in range(n_subjects)]
    subject_seeds = seeds[SUBJECTS].spawn(n_subjects)
    log.info("simulating %d subjects (%d strata, %.2f mm grid %s) into %s",
             n_subjects, n_strata, voxel_size, grid.shape, out_dir)
    with atomic_dir(out_dir) as root:
        truth_dir = root / "sourcedata" / "ground_truth"
        _write_metadata(root, labels, pheno, opts, site_of)
        subjects_info = {}
        for i in progress(range(n_subjects), "simulate subjects", total=n_subjects, logger=log):
            subjects_info[f"sub-{labels[i]}"] = _simulate_subject(
                root, labels[i], int(strata[i]), np.random.default_rng(subject_seeds[i]),
                grid, cgrid, regions, stratum_maps, t1_coeffs, opts,
                site=sites[site_of[i] - 1] if sites else None,
                dwi_seed=np.random.SeedSequence(seed, spawn_key=(SITES + 1, i)) if dwi is not None else None)
        _write_truth(truth_dir, grid, labels, strata, regions, pheno, subjects_info, opts, sites, site_of)
        if whole_head:
            _save_nifti(truth_dir / "template_head_T1w.nii.gz", t1_template * T1_SCALE, grid.affine, code=4)
    return out_dir


def subject_deformation(rng, stratum: int, regions, grid: TemplateGrid, cgrid: ControlGrid,
                        inverse: bool = True):
    """One subject's maps on the control grid: ``(psi, phi, weight)``.

    ``psi = exp(v)``, ``phi = exp(-v)`` (None unless ``inverse``): (3, Xc, Yc, Zc)
    displacements in mm, with ``v`` = individual part + ``weight`` x the stratum's
    pattern (weight ~ N(1, 0.15)).
    """
    weight = float(1.0 + STRATUM_WEIGHT_SD * rng.standard_normal())
    velocity = individual_velocity(rng, cgrid) + weight * stratum_velocity(regions, stratum, grid, cgrid)
    phi = exp_velocity(-velocity, cgrid.spacing) if inverse else None
    return exp_velocity(velocity, cgrid.spacing), phi, weight


def _simulate_subject(root: Path, label: str, stratum: int, rng, grid, cgrid, regions,
                      stratum_maps, t1_coeffs, opts, site: Site | None = None, dwi_seed=None) -> dict:
    """Deform, render and write one subject (all sessions); return its truth record.

    ``site``: the subject's site (all its sessions), or None for the one-site default.
    """
    psi, phi, weight = subject_deformation(rng, stratum, regions, grid, cgrid)
    logjac = log_jacobian(psi, cgrid)
    coords = np.indices(grid.shape, dtype=np.float32) + upsample(phi, cgrid) / grid.voxel_size
    maps = subject_maps(rng, stratum_maps[stratum], grid, cgrid)
    truth_dir = root / "sourcedata" / "ground_truth"
    _save_nifti(truth_dir / f"sub-{label}_space-template_desc-true_logjac.nii.gz", logjac, grid.affine, code=4)
    for m, values in maps.items():
        _save_nifti(truth_dir / f"sub-{label}_space-template_desc-true_{m}.nii.gz", values, grid.affine, code=4)
    disp_mm = np.sqrt((psi**2).sum(0))  # on the control grid
    info = {"stratum": stratum, "stratum_weight": round(weight, 4),
            "max_displacement_mm": round(float(disp_mm[cgrid.mask].max()), 3),
            "logjac_sd_in_mask": round(float(logjac[grid.mask].std()), 4), "sessions": {}}
    if site is not None:
        info["site"] = site.label
    session_labels = [""] if opts["sessions"] == 1 else [str(s + 1) for s in range(opts["sessions"])]
    dwi_seeds = dwi_seed.spawn(len(session_labels)) if dwi_seed is not None else None
    for j, ses in enumerate(session_labels):
        img = render_session(rng, grid, t1_coeffs, maps, coords, bias=opts["bias_field"],
                             noise=opts["noise"], affine=opts["random_affine"], site=site)
        key = subject_stem(label, ses)
        rel = subject_folder(label, ses)
        _save_nifti(root / rel / "anat" / f"{key}_T1w.nii.gz", img.t1w, img.affine, dtype=np.int16)
        write_json(root / rel / "anat" / f"{key}_T1w.json",
                    dict(site.sidecar) if site is not None else dict(DEFAULT_SIDECAR))
        if "dwi" in opts:  # preprocessed DWI (QSIPrep naming) instead of fitted maps
            from mmfusion import simulate_dwi
            img.info["dwi"] = simulate_dwi.write_subject(
                root, key, rel, grid, maps, coords, img.affine, dwi_seeds[j], opts["dwi"], _save_nifti)
        else:
            dwi = root / "derivatives" / "qsirecon" / rel / "dwi"
            _save_nifti(dwi / f"{key}_space-T1w_model-tensor_param-fa_dwimap.nii.gz", img.fa, img.affine)
            _save_nifti(dwi / f"{key}_space-T1w_model-noddi_param-icvf_dwimap.nii.gz", img.ndi, img.affine)
        info["sessions"][ses or "none"] = img.info
    return info


def _write_truth(truth_dir: Path, grid, labels, strata, regions, pheno, subjects_info, opts,
                 sites=(), site_of=None) -> None:
    ids = [f"sub-{lab}" for lab in labels]
    _write_tsv(truth_dir / "strata.tsv", pd.DataFrame({"participant_id": ids, "stratum": strata}))
    if sites:
        _write_tsv(truth_dir / "sites.tsv", pd.DataFrame(
            {"participant_id": ids, "site": [sites[k - 1].label for k in site_of]}))
    _write_tsv(truth_dir / "latent_factors.tsv",
               pd.concat([pd.DataFrame({"participant_id": ids}), pheno.latent], axis=1),
               {f: 4 for f in FACTORS})
    _save_nifti(truth_dir / "template_T1w.nii.gz", grid.t1 * T1_SCALE, grid.affine, code=4)
    _save_nifti(truth_dir / "template_mask.nii.gz", grid.mask, grid.affine, code=4, dtype=np.uint8)
    planted = {
        "generator": {"name": "mmfusion simulate", "version": __version__, "options": opts},
        "template": {"source": "MNI152 2009 (nilearn.datasets.load_mni152_template, resolution=1)",
                     "shape": list(grid.shape), "affine": grid.affine.tolist(),
                     "T1w": "template_T1w.nii.gz", "mask": "template_mask.nii.gz"},
        "deformation": {
            "convention": "velocity v on the template grid; psi = exp(v), phi = exp(-v); "
                          "subject S(y) = T(phi(y)); truth = log det D psi(x) on the template grid "
                          "(> 0 where the subject is larger); header rigid transform excluded",
            "control_spacing_mm": max(CONTROL_SPACING_MM, grid.voxel_size),
            "squaring_steps": SQUARING_STEPS,
            "individual": {"large_sigma_mm": LARGE_SIGMA_MM, "large_disp_rms_mm": LARGE_DISP_RMS_MM,
                           "small_sigma_mm": SMALL_SIGMA_MM, "small_divergence_sd": SMALL_DIV_SD},
            "stratum_weight_sd": STRATUM_WEIGHT_SD,
            "true_logjac": {i: f"{i}_space-template_desc-true_logjac.nii.gz" for i in ids},
            "sessions_share_anatomy": True,  # sessions differ only in bias, noise and header transform
        },
        "diffusion_maps": {
            "individual": {"scale_sd": MAP_SCALE_SD, "field_sigma_mm": MAP_FIELD_SIGMA_MM,
                           "field_sd": MAP_FIELD_SD},
            "true_maps": {m: {i: f"{i}_space-template_desc-true_{m}.nii.gz" for i in ids} for m in ("fa", "ndi")},
            "true_maps_note": "FA/NDI on the template grid before the warp to subject space, "
                              "the acquisition noise and the subject's brain-mask cut",
        },
        "regions": [r.as_dict(grid) for r in regions],
        "strata_file": "strata.tsv",
        "latent_factors_file": "latent_factors.tsv",
        **pheno.planted,
        "subjects": subjects_info,
    }
    if sites:
        planted["sites"] = {
            "n_sites": len(sites), "follows_stratum": bool(opts["site_follows_stratum"]),
            "assignment_file": "sites.tsv",
            "effect": "per site, T1w intensities x t1w_gain and NDI x ndi_gain in the subject images "
                      "(before the noise); the true maps exclude it (a scanner effect, not biology)",
            "sites": {s.label: s.as_dict() for s in sites},
        }
    write_json(truth_dir / "planted.json", planted)


# -------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="mmfusion simulate",
                description="Write a synthetic BIDS dataset with planted strata and ground truth.")
    p.add_argument("out_dir", type=Path, help="output folder (must be empty or new)")
    p.add_argument("--n-subjects", type=int, default=12, help="number of subjects (default 12)")
    p.add_argument("--n-strata", type=int, default=3, help="number of planted strata (default 3)")
    p.add_argument("--voxel-size", type=float, default=1.25, help="isotropic voxel size in mm (default 1.25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--design-seed", type=int, default=None,
                   help="seed of the population design alone (planted regions, strata, texture; "
                        "default: --seed): same --design-seed, other --seed = new subjects of the same strata")
    p.add_argument("--sessions", type=int, default=1, help="sessions per subject (default 1: no ses- level)")
    p.add_argument("--no-bias-field", dest="bias_field", action="store_false", help="no T1w bias field")
    p.add_argument("--no-noise", dest="noise", action="store_false", help="no image noise")
    p.add_argument("--no-affine", dest="random_affine", action="store_false",
                   help="no random rigid transform in the image headers")
    p.add_argument("--n-sites", type=int, default=1,
                   help="number of acquisition sites, each with a scanner effect (default 1: none)")
    p.add_argument("--site-follows-stratum", action="store_true",
                   help="site = stratum (mod --n-sites): strata confounded with site; needs 2 <= --n-sites <= --n-strata")
    p.add_argument("--null-phenotypes", action="store_true",
                   help="no phenotype depends on the stratum (to measure false positives)")
    p.add_argument("--dwi", action="store_true",
                   help="write multi-shell DWI (QSIPrep naming, b = 0/1000/2000/3000) synthesized from the "
                        "true FA/NDI instead of the QSIRecon FA/NDI maps")
    p.add_argument("--dwi-snr", type=float, default=25.0, help="with --dwi: SNR of the b=0 signal (default 25)")
    p.add_argument("--dwi-directions", type=int, default=30, help="with --dwi: directions per shell (default 30)")
    p.add_argument("--dwi-factor", type=int, default=1,
                   help="with --dwi: DWI voxel = this many T1w voxels per axis (default 1: the T1w grid)")
    p.add_argument("--whole-head", action="store_true",
                   help="T1w with a synthetic skull and scalp around the brain (as real T1w images come; "
                        "default: skull-stripped)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """``mmfusion simulate`` entry point; returns the exit code."""
    from mmfusion.runlog import setup_logging

    try:
        args = build_parser().parse_args(argv)
        if not log.parent.handlers and not log.handlers:
            setup_logging(args.verbose)
        simulate_dataset(args.out_dir, n_subjects=args.n_subjects, n_strata=args.n_strata,
                         voxel_size=args.voxel_size, seed=args.seed, bias_field=args.bias_field,
                         noise=args.noise, random_affine=args.random_affine, sessions=args.sessions,
                         null_phenotypes=args.null_phenotypes, overwrite=args.overwrite,
                         n_sites=args.n_sites, site_follows_stratum=args.site_follows_stratum,
                         design_seed=args.design_seed,
                         dwi={"snr": args.dwi_snr, "directions": args.dwi_directions, "factor": args.dwi_factor}
                         if args.dwi else None, whole_head=args.whole_head)
    except OSError as exc:  # a write refused inside the folder OUT_DIR goes into
        err = output_permission_error(exc, (Path(os.path.abspath(args.out_dir)).parent,))
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except MmfusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
