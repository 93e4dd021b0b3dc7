"""Templates: build the study template (the template level, :mod:`mmfusion.levels.template`,
runs it) and choose the one a subject is registered to (participant level).

Choice, in order: ``--template PATH`` (mask: a sibling ``*desc-brain_mask*`` file, else
derived by registering the MNI mask, once per output directory: see
:func:`user_template_mask`) > the study template in ``output_dir/template/`` >
the built-in MNI152 2009 template that nilearn ships (offline). Every output records
which (``source``), its space label and a content hash.

With ``spatial.n4`` on, the built-in template (bias-free, never N4-corrected) is corrected by
the same N4 as the subjects, once (:func:`n4_corrected_template`). A study template is built
from N4-corrected images already; a user template is used as given (it may be a study
template from a bundle, which must keep its hash). N4 changes the intensities of a bias-free image (its finer levels fit
anatomy), so a corrected subject on an uncorrected template leaves a log-JAC floor
(docs/registration.md, "Whole-head T1w images").
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import ants
import numpy as np

from mmfusion.context import scratch_dir
from mmfusion.io.atomic import atomic_path
from mmfusion.io.derivatives import res_label
from mmfusion.io.images import load_3d
from mmfusion.runlog import get_logger, progress
from mmfusion.spatial import registration as reg

log = get_logger(__name__)

STUDY_SPACE = "study"
MNI_SPACE = "MNI152NLin2009aSym"  # nilearn ships the ICBM 2009a nonlinear symmetric template
USER_SPACE = "custom"


@dataclass
class TemplateInfo:
    """The template a subject is registered to, resampled to the registration resolution.

    ``image``/``mask``: ANTs images on the same grid (mask 0/1). ``source``: 'user',
    'study' or 'builtin'. ``space``: the BIDS space label. ``reference``: SpatialReference
    (path or URI). ``hash``: sha256[:16] of the template voxels + grid.
    """

    image: ants.ANTsImage
    mask: ants.ANTsImage
    source: str
    space: str
    reference: str
    hash: str

    def as_dict(self) -> dict:
        return {"source": self.source, "space": self.space, "reference": self.reference, "hash": self.hash}


def study_template_paths(output_dir: Path, resolution: float) -> dict[str, Path]:
    folder = Path(output_dir) / "template"
    res = res_label(resolution)
    return {"dir": folder, "t1w": folder / f"tpl-{STUDY_SPACE}_res-{res}_T1w.nii.gz",
            "mask": folder / f"tpl-{STUDY_SPACE}_res-{res}_desc-brain_mask.nii.gz",
            "provenance": folder / f"tpl-{STUDY_SPACE}_provenance.json"}


def image_hash(img: ants.ANTsImage) -> str:
    """sha256[:16] of an image's voxels (float32) and grid (spacing, origin, direction)."""
    h = hashlib.sha256(np.ascontiguousarray(img.numpy(), dtype=np.float32).tobytes())
    h.update(np.asarray([*img.spacing, *img.origin, *np.ravel(img.direction)], dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _resample_iso(img: ants.ANTsImage, mm: float, interp: int = 0) -> ants.ANTsImage:
    if np.allclose(img.spacing, mm, atol=1e-3):
        return img
    return ants.resample_image(img, (float(mm),) * 3, use_voxels=False, interp_type=interp)


def builtin_mni(resolution: float) -> tuple[ants.ANTsImage, ants.ANTsImage]:
    """nilearn's MNI152 2009 T1 (x1000, brain-extracted) and brain mask at ``resolution`` mm."""
    from nilearn import datasets
    tpl = ants.from_nibabel_nifti(datasets.load_mni152_template(resolution=1))
    msk = ants.from_nibabel_nifti(datasets.load_mni152_brain_mask(resolution=1))
    tpl = _resample_iso(tpl, resolution, 0)
    tpl = tpl.new_image_like(tpl.numpy().astype(np.float32) * 1000.0)
    msk = _resample_iso(msk, resolution, 1)
    return tpl, msk


def _mask_by_mni(target: ants.ANTsImage, params: dict, workdir: Path) -> ants.ANTsImage:
    """Brain mask for ``target``: register the MNI template to it and carry the MNI mask over."""
    res = float(min(target.spacing))
    mni, mni_mask = builtin_mni(res)
    out = reg.register_to_template(target, mni, params, workdir)
    warped = reg.apply_to_template(target, mni_mask, out, interpolator="linear")
    return ants.threshold_image(warped, 0.5, 1e9, 1, 0)


def resolve_template(ctx, params: dict) -> TemplateInfo:
    """Pick the template for the participant level (see module docstring)."""
    cfg = ctx.config["spatial"]
    res = float(cfg["registration_resolution"])
    if ctx.template is not None:
        path = Path(ctx.template)
        nii = load_3d(path, "template")
        img = _resample_iso(ants.from_nibabel_nifti(nii), res)
        siblings = sorted(path.parent.glob("*desc-brain_mask*.nii*"))
        if siblings:
            mask = _resample_iso(ants.from_nibabel_nifti(load_3d(siblings[0], "template mask")), res, 1)
            mask = ants.threshold_image(ants.resample_image_to_target(mask, img, interp_type="nearestNeighbor"), 0.5, 1e9, 1, 0)
        else:
            mask = user_template_mask(ctx, img, params, res)
        ctx.provenance.add_inputs([path])
        return TemplateInfo(img, mask, "user", USER_SPACE, path.resolve().as_uri(), image_hash(img))
    study = study_template_paths(ctx.output_dir, res)
    if study["t1w"].is_file() and study["mask"].is_file():
        img = ants.image_read(str(study["t1w"]))
        mask = ants.image_read(str(study["mask"]))
        return TemplateInfo(img, mask, "study", STUDY_SPACE,
                            f"bids::template/{study['t1w'].name}", image_hash(img))
    img, mask = builtin_mni(res)
    return TemplateInfo(img, mask, "builtin", MNI_SPACE,
                        "nilearn MNI152 2009 (load_mni152_template)", image_hash(img))


def _computed_once(path: Path, compute, what: str) -> ants.ANTsImage:
    """The image at ``path``, made by ``compute()`` if it is not there yet (``what`` says what
    it is, for the log). An exclusive lock on a ``.lock`` file next to it makes array tasks
    that start together wait for the first one instead of computing it too; the file is
    written atomically and every caller reads it back, so all subjects use the same image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            log.info("%s (once; cached in %s)", what, path)
            image = compute()
            with atomic_path(path) as tmp_path:
                ants.image_write(image, str(tmp_path))
        else:
            log.info("%s: reusing %s", what, path)
    return ants.image_read(str(path))


def n4_corrected_template(ctx, template: TemplateInfo) -> TemplateInfo:
    """``template`` with its image corrected by the subjects' N4 (:func:`reg.n4_correct`), ONCE.

    Cached as ``output_dir/template/tpl-<space>-<hash>_desc-n4_T1w.nii.gz`` (``<hash>``: 12
    hex digits of the uncorrected template's hash; :func:`_computed_once`). The returned hash
    names the uncorrected template plus the correction (not the corrected voxels: N4's result
    varies slightly with ITK's thread count, and two sites must agree on the template of a
    bundle); the mask, grid, source, space and reference are unchanged.
    """
    path = Path(ctx.output_dir) / "template" / f"tpl-{template.space}-{template.hash[:12]}_desc-n4_T1w.nii.gz"
    image = _computed_once(path, lambda: reg.n4_correct(template.image),
                           f"{template.source} template: N4 bias correction as for the subjects")
    corrected_hash = hashlib.sha256(f"{template.hash} n4".encode()).hexdigest()[:16]
    return replace(template, image=image, hash=corrected_hash)


def user_template_mask(ctx, img: ants.ANTsImage, params: dict, res: float) -> ants.ANTsImage:
    """Brain mask of a user template that has none: the MNI mask registered to it, ONCE.

    Cached as ``output_dir/template/tpl-custom<hash>_res-<r>_desc-brain_mask.nii.gz``
    (``<hash>``: 12 hex digits of the resampled template's voxels and grid plus the
    registration parameters; :func:`_computed_once`), so the subjects of an array job
    don't each repeat the registration (~1-2 CPU minutes).
    """
    key = hashlib.sha256((image_hash(img) + json.dumps(params, sort_keys=True)).encode()).hexdigest()[:12]
    path = Path(ctx.output_dir) / "template" / f"tpl-{USER_SPACE}{key}_res-{res_label(res)}_desc-brain_mask.nii.gz"

    def register_mni_mask() -> ants.ANTsImage:
        with tempfile.TemporaryDirectory(prefix="mmf_tplmask_", dir=scratch_dir(ctx)) as tmp:
            return _mask_by_mni(img, params, Path(tmp))

    return _computed_once(path, register_mni_mask,
                          "user template has no brain mask next to it: registering the MNI mask to it")


def _initial_template(images: list[ants.ANTsImage], params: dict, workdir: Path) -> ants.ANTsImage:
    """Average of all images affinely aligned (similarity) to the first one."""
    from mmfusion.spatial.resample import output_grid
    first = images[0]
    ref = ants.resample_image_to_target(first, output_grid(first, float(min(first.spacing)), first.shape))
    acc = ref.clone()
    for k, img in enumerate(images[1:], start=1):
        out = ants.registration(ref, img, type_of_transform="Similarity", outprefix=str(workdir / f"init{k}_"),
                                aff_iterations=tuple(params["aff_iterations"]),
                                aff_shrink_factors=tuple(params["aff_shrink_factors"]),
                                aff_smoothing_sigmas=tuple(params["aff_smoothing_sigmas"]))
        acc = acc + out["warpedmovout"]
    return acc / float(len(images))


def build_study_template(t1w_paths: list[Path], cfg: dict, params: dict, workdir: Path):
    """N4 every T1w, resample to ``registration_resolution``, iterate register-all + average.

    Returns (template image, brain mask) on the template grid.
    """
    res = float(cfg["registration_resolution"])
    images = []
    for path in progress(t1w_paths, "template: N4"):
        img = ants.from_nibabel_nifti(load_3d(path, "T1w"))
        img = reg.n4_correct(img) if cfg["n4"] else img
        img = _resample_iso(img, res)
        images.append(img / float(img.numpy()[img.numpy() > 0].mean()) * 1000.0)
    init = _initial_template(images, params, workdir)
    tpl = ants.build_template(
        initial_template=init, image_list=images, iterations=int(cfg["template_iterations"]),
        output_dir=str(workdir / "build"), type_of_transform="SyN",
        reg_iterations=tuple(params["reg_iterations"]), syn_metric=params["syn_metric"],
        syn_sampling=params["syn_sampling"], aff_metric=params["aff_metric"],
        aff_iterations=tuple(params["aff_iterations"]),
        aff_shrink_factors=tuple(params["aff_shrink_factors"]),
        aff_smoothing_sigmas=tuple(params["aff_smoothing_sigmas"]))
    mask = _mask_by_mni(tpl, params, workdir / "mask")
    return tpl, mask
