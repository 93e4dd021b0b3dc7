"""T1w -> template registration with ANTsPy: presets, the stage chain, log-Jacobian.

Convention (measured while scoping, see docs/registration.md): fixed = template,
moving = subject. The forward transforms ``[<prefix>1Warp.nii.gz, <prefix>0GenericAffine.mat]``
map subject intensities onto the template grid; the Jacobian determinant of the WARP
alone (the nonlinear part) on the template grid is > 1 where the subject is larger.

Stage chain: centre-of-mass initialisation -> rigid -> similarity -> affine (each
stage starts from the previous one; ANTs collapses them into one affine) -> SyN.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
import ants
import numpy as np

from mmfusion.runlog import get_logger

log = get_logger(__name__)

def set_ants_threads(n_threads: int, seed: int | None) -> None:
    """Limit ITK to ``n_threads`` and fix ANTs' random seed (registration sampling)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(n_threads)))
    ants.config._random_seed = None if seed is None else int(seed)


@dataclass
class RegistrationResult:
    """Outputs of :func:`register_to_template`.

    ``affine`` (.mat) and ``warp`` (displacement field NIfTI, template grid) are the
    forward transforms; apply as ``[warp, affine]``. ``warped`` is the moving image on the
    fixed grid. ``timings_s`` maps stage -> seconds.
    """

    affine: Path
    warp: Path
    inverse_warp: Path | None
    warped: ants.ANTsImage
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def fwdtransforms(self) -> list[str]:
        return [str(self.warp), str(self.affine)]


def _linear_chain(fixed, moving, params: dict, workdir: Path,
                  fixed_mask: ants.ANTsImage | None = None) -> tuple[str, dict]:
    """Rigid -> similarity -> affine from a centre-of-mass start; returns the affine .mat.
    ``fixed_mask`` (0/1 on ``fixed``'s grid): the metric is evaluated inside it only."""
    timings: dict[str, float] = {}
    fixed_lin, moving_lin = fixed, moving
    res = params.get("linear_resolution")
    if res:  # linear stages do not need full resolution
        spacing = (float(res),) * fixed.dimension
        if min(fixed.spacing) < res:
            fixed_lin = ants.resample_image(fixed, spacing, use_voxels=False, interp_type=0)
        if min(moving.spacing) < res:
            moving_lin = ants.resample_image(moving, spacing, use_voxels=False, interp_type=0)
    mask_lin = None
    if fixed_mask is not None:
        mask_lin = ants.resample_image_to_target(fixed_mask, fixed_lin, interp_type="nearestNeighbor")
    init = None  # None -> ANTs' centre-of-mass initialisation "[fixed,moving,1]"
    for i, stage in enumerate(params["linear_stages"]):
        t0 = time.perf_counter()
        reg = ants.registration(
            fixed_lin, moving_lin, type_of_transform=stage, initial_transform=init,
            outprefix=str(workdir / f"lin{i}_"),
            aff_metric=params["aff_metric"], aff_sampling=params["aff_sampling"],
            aff_random_sampling_rate=params["aff_random_sampling_rate"],
            aff_iterations=tuple(params["aff_iterations"]),
            aff_shrink_factors=tuple(params["aff_shrink_factors"]),
            aff_smoothing_sigmas=tuple(params["aff_smoothing_sigmas"]),
            use_legacy_histogram_matching=bool(params["histogram_matching"]),
            mask=mask_lin, mask_all_stages=mask_lin is not None,
        )
        init = reg["fwdtransforms"][0]
        timings[stage.lower()] = time.perf_counter() - t0
    return init, timings


def register_to_template(fixed: ants.ANTsImage, moving: ants.ANTsImage, params: dict,
                         workdir: str | Path) -> RegistrationResult:
    """Register ``moving`` (subject T1w, N4-corrected) to ``fixed`` (template).

    ``params`` is a resolved preset (:func:`resolve_preset`). Transforms are written
    under ``workdir`` (must be unique per registration and free of '[' ']').
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if "[" in str(workdir) or "]" in str(workdir):
        raise ValueError(f"{workdir}: ANTs cannot use paths containing '[' or ']'")
    moving_orig = moving
    flatten = params.get("flatten_sigma_mm")
    if flatten:  # the same local-mean normalisation of both images: smooth bias cancels
        fixed, moving = flatten_intensity(fixed, flatten), flatten_intensity(moving, flatten)
    affine, timings = _linear_chain(fixed, moving, params, workdir)
    t0 = time.perf_counter()
    fixed_syn = fixed
    margin = params.get("crop_margin_mm")
    if margin is not None:  # SyN's cost is per voxel of the fixed grid: skip the empty background
        fixed_syn = crop_to_foreground(fixed, margin)
    reg = ants.registration(
        fixed_syn, moving, type_of_transform="SyNOnly", initial_transform=affine,
        outprefix=str(workdir / "syn_"),
        syn_metric=params["syn_metric"], syn_sampling=params["syn_sampling"],
        reg_iterations=tuple(params["reg_iterations"]), grad_step=params["grad_step"],
        flow_sigma=params["flow_sigma"], total_sigma=params["total_sigma"],
        use_legacy_histogram_matching=bool(params["histogram_matching"]),
    )
    fwd = reg["fwdtransforms"]
    warp = next(Path(f) for f in fwd if f.endswith("Warp.nii.gz"))
    mat = next(Path(f) for f in fwd if f.endswith(".mat"))
    inv = next((Path(f) for f in reg["invtransforms"] if f.endswith("InverseWarp.nii.gz")), None)
    if fixed_syn is not fixed:
        for path in (warp, inv):
            if path is not None:
                ants.image_write(pad_field_to(ants.image_read(str(path)), fixed), str(path))
    timings["syn"] = time.perf_counter() - t0
    warped = reg["warpedmovout"]
    if flatten or fixed_syn is not fixed:
        warped = ants.apply_transforms(fixed, moving_orig, transformlist=[str(warp), str(mat)])
    return RegistrationResult(affine=mat, warp=warp, inverse_warp=inv, warped=warped, timings_s=timings)


def dilate_mask(mask: ants.ANTsImage, margin_mm: float) -> ants.ANTsImage:
    """0/1 ``mask`` grown by ``margin_mm`` (Euclidean distance, mm) on its own grid."""
    from scipy import ndimage

    inside = mask.numpy() > 0.5
    distance = ndimage.distance_transform_edt(~inside, sampling=mask.spacing)
    return mask.new_image_like((distance <= float(margin_mm)).astype(np.float32))


def extract_brain(fixed: ants.ANTsImage, fixed_mask: ants.ANTsImage, moving: ants.ANTsImage,
                  params: dict, workdir: str | Path, margin_mm: float) -> tuple[ants.ANTsImage, ants.ANTsImage]:
    """Skull-strip a whole-head ``moving`` T1w with the template's brain mask.

    The linear chain (rigid -> similarity -> affine, :func:`_linear_chain`) aligns
    ``moving`` to ``fixed`` with the metric restricted to the template brain mask grown by
    ``margin_mm``, so skull and scalp outside it do not pull the alignment; that grown
    mask, carried into ``moving``'s space by the inverse affine, keeps the brain. Returns
    (``moving`` x mask, the 0/1 mask on ``moving``'s grid).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    grown = dilate_mask(fixed_mask, margin_mm)
    affine, _ = _linear_chain(fixed, moving, params, workdir, fixed_mask=grown)
    mask = ants.apply_transforms(moving, grown, transformlist=[affine], whichtoinvert=[True],
                                 interpolator="nearestNeighbor")
    return moving * mask, mask


def register_t1w(template: ants.ANTsImage, template_mask: ants.ANTsImage, t1: ants.ANTsImage,
                 params: dict, workdir: str | Path, brain_margin_mm: float | None = None) -> RegistrationResult:
    """The participant level's registration of an (N4-corrected) T1w to the template.

    With ``brain_margin_mm`` (``spatial.brain_extraction``), ``t1`` is skull-stripped first
    (:func:`extract_brain`) and the template masked by the same grown mask, so brain is
    registered to brain; the result's timings gain ``brain_extraction`` (s).
    """
    workdir = Path(workdir)
    if brain_margin_mm is None:
        return register_to_template(template, t1, params, workdir / "reg")
    t0 = time.perf_counter()
    t1, _ = extract_brain(template, template_mask, t1, params, workdir / "brain", brain_margin_mm)
    fixed = template * dilate_mask(template_mask, brain_margin_mm)
    seconds = time.perf_counter() - t0
    result = register_to_template(fixed, t1, params, workdir / "reg")
    result.timings_s = {"brain_extraction": seconds, **result.timings_s}
    return result


def crop_to_foreground(image: ants.ANTsImage, margin_mm: float) -> ants.ANTsImage:
    """Sub-image of ``image`` (same voxel grid) bounding its foreground (``ants.get_mask``)
    plus ``margin_mm`` on every side, clipped to the image. Shape <= image.shape."""
    fg = np.argwhere(ants.get_mask(image, cleanup=2).numpy() > 0)
    if fg.size == 0:
        return image
    pad = np.ceil(float(margin_mm) / np.asarray(image.spacing)).astype(int)
    lower = np.maximum(fg.min(0) - pad, 0)
    upper = np.minimum(fg.max(0) + pad, np.asarray(image.shape) - 1)
    return ants.crop_indices(image, [int(i) for i in lower], [int(i) + 1 for i in upper])


def pad_field_to(field: ants.ANTsImage, domain: ants.ANTsImage) -> ants.ANTsImage:
    """Place a displacement ``field`` (vector image on a sub-grid of ``domain``, e.g. from
    :func:`crop_to_foreground`) on ``domain``'s full grid, zero displacement outside.

    ANTs keeps SyN displacements zero at the domain boundary, so the padded field is
    continuous. Returns a vector image of shape domain.shape with field.components (mm).
    """
    step = np.asarray(domain.direction) * np.asarray(domain.spacing)  # index -> mm, per column
    offset = np.linalg.solve(step, np.asarray(field.origin) - np.asarray(domain.origin))
    lo = np.rint(offset).astype(int)
    data = field.numpy()  # (X, Y, Z, C)
    if np.abs(offset - lo).max() > 1e-3 or np.any(lo < 0) or np.any(lo + data.shape[:3] > domain.shape):
        raise ValueError("pad_field_to: the field is not on a sub-grid of the domain")
    full = np.zeros(tuple(domain.shape) + (data.shape[-1],), np.float32)
    full[lo[0]:lo[0] + data.shape[0], lo[1]:lo[1] + data.shape[1], lo[2]:lo[2] + data.shape[2]] = data
    return ants.from_numpy(full, origin=domain.origin, spacing=domain.spacing,
                           direction=domain.direction, has_components=True)


def flatten_intensity(image: ants.ANTsImage, sigma_mm: float) -> ants.ANTsImage:
    """Divide ``image`` by its local foreground mean (normalised Gaussian convolution,
    ``sigma_mm``), inside an Otsu-type foreground mask; 0 outside.

    A smooth multiplicative bias field varies little within ``sigma_mm`` and cancels;
    applied identically to subject and template, it keeps their contrasts comparable.
    """
    mask = ants.get_mask(image, cleanup=2)
    num = ants.smooth_image(image * mask, sigma_mm, sigma_in_physical_coordinates=True)
    den = ants.smooth_image(mask, sigma_mm, sigma_in_physical_coordinates=True)
    local = num.numpy() / np.maximum(den.numpy(), 1e-3)
    ratio = np.where((mask.numpy() > 0) & (local > 0), image.numpy() / np.maximum(local, 1e-6), 0.0)
    return image.new_image_like(ratio.astype(np.float32))


def log_jacobian(fixed: ants.ANTsImage, result: RegistrationResult) -> ants.ANTsImage:
    """Natural log of the Jacobian determinant of the NONLINEAR warp, on ``fixed``'s grid.

    > 0 where the subject is locally larger than the template. Shape = fixed.shape.
    """
    return ants.create_jacobian_determinant_image(fixed, str(result.warp), do_log=True)


def apply_to_template(fixed: ants.ANTsImage, image: ants.ANTsImage, result: RegistrationResult,
                      interpolator: str = "linear") -> ants.ANTsImage:
    """Warp ``image`` (subject T1w space) onto ``fixed``'s grid with the forward transforms."""
    return ants.apply_transforms(fixed, image, transformlist=result.fwdtransforms,
                                 interpolator=interpolator)


def n4_correct(image: ants.ANTsImage, shrink_factor: int = 4, levels: int = 4) -> ants.ANTsImage:
    """N4 bias-field correction inside a foreground mask (Otsu-like, ``ants.get_mask``).

    ANTsPy's initial B-spline mesh (one span per axis), 50 iterations at each of ``levels``
    fitting levels; each level doubles the mesh, so 4 levels fit a field with knots every 1/8
    of the image's extent (~25 mm for a head). Intensities are positive-clipped first; the
    result keeps the input's grid and units.
    """
    image = ants.threshold_image(image, 0, None, 1, 0) * image if image.min() < 0 else image
    mask = ants.get_mask(image, cleanup=2)
    return ants.n4_bias_field_correction(image, mask=mask, shrink_factor=shrink_factor,
                                         convergence={"iters": [50] * int(levels), "tol": 1e-7})
