"""Loading and validating input NIfTIs (T1w, FA, NDI) before any expensive work.

Every failure raises one clear line naming the file: :class:`InputDataError` (exit 65)
for unreadable, empty or 4D images and maps not in the T1w space, :class:`MissingInputError` (exit 66)
for absent files. Non-finite voxels in FA/NDI are not an error: they are set to 0 and
counted (the count goes to the QC record).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from mmfusion.errors import InputDataError, MissingInputError

#: Tolerances for "same grid": voxel-to-world affine entries (mm) and shape must match.
GRID_ATOL_MM = 1e-3
#: A map on another grid than the T1w must cover at least this fraction of its field of view.
MIN_FOV_OVERLAP = 0.5


def load_3d(path: str | Path, what: str) -> nib.Nifti1Image:
    """Load ``path`` as a 3D NIfTI (a trailing singleton 4th dimension is dropped).

    ``what`` names the role in messages (e.g. 'T1w', 'FA'). Raises MissingInputError if
    the file is absent, InputDataError if unreadable, empty, not 3D or all zero/non-finite.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: {what} file not found; check the BIDS dataset / derivatives")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputDataError(f"{path}: cannot read {what} NIfTI ({type(exc).__name__}: {exc}); "
                             "replace the file with a valid NIfTI") from exc
    if data.size == 0 or 0 in data.shape:
        raise InputDataError(f"{path}: {what} image is empty (shape {data.shape}); replace the file")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(f"{path}: {what} must be a 3D image, got shape {data.shape}; "
                             "pass a single volume (e.g. extract it with fslroi or nibabel)")
    finite = np.isfinite(data)
    if not finite.any() or not np.any(data[finite] != 0):
        raise InputDataError(f"{path}: {what} image holds no nonzero finite voxel; replace the file")
    return nib.Nifti1Image(np.asarray(data, dtype=np.float32), img.affine, img.header)


def same_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image) -> bool:
    """True when ``img`` has ``ref``'s shape and voxel-to-world affine (within 1e-3 mm)."""
    return img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=GRID_ATOL_MM)


def _world_box(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (mm) of the image's field of view: (lo (3,), hi (3,))."""
    corners = np.array([[i, j, k] for i in (-0.5, img.shape[0] - 0.5) for j in (-0.5, img.shape[1] - 0.5)
                        for k in (-0.5, img.shape[2] - 0.5)])
    world = nib.affines.apply_affine(img.affine, corners)
    return world.min(axis=0), world.max(axis=0)


def fov_overlap(img: nib.Nifti1Image, ref: nib.Nifti1Image) -> float:
    """Fraction (0..1) of ``ref``'s world bounding box covered by ``img``'s."""
    lo_a, hi_a = _world_box(img)
    lo_r, hi_r = _world_box(ref)
    inter = np.clip(np.minimum(hi_a, hi_r) - np.maximum(lo_a, lo_r), 0, None)
    return float(np.prod(inter) / np.prod(hi_r - lo_r))


def check_same_space(img: nib.Nifti1Image, path: str | Path, ref: nib.Nifti1Image,
                     ref_path: str | Path, what: str) -> bool:
    """Check that a map can be read in the T1w's world space; return True if it is on another grid.

    A map on the T1w's own grid is used as is. A map on another grid (QSIRecon writes
    ``space-T1w`` maps at the diffusion resolution) is accepted when its field of view
    covers at least :data:`MIN_FOV_OVERLAP` of the T1w's: the registration then reads it
    through its own affine (world coordinates, mm). Refused, with InputDataError: a
    ``space-ACPC`` map on another grid (AC-PC space is a rigid rotation of the T1w space
    that no header can undo: use the AC-PC T1w it belongs to, or ``space-T1w`` maps), and
    a map whose field of view barely overlaps the T1w's (not in the T1w space).
    """
    if same_grid(img, ref):
        return False
    shape = f"shape {img.shape[:3]}, voxel {np.round(nib.affines.voxel_sizes(img.affine), 3).tolist()} mm"
    if "space-ACPC" in Path(path).name:
        raise InputDataError(
            f"{path}: {what} in space-ACPC is on another grid ({shape}) than the T1w {ref_path}; "
            "use the AC-PC T1w it was computed with, or space-T1w maps")
    overlap = fov_overlap(img, ref)
    if overlap < MIN_FOV_OVERLAP:
        raise InputDataError(
            f"{path}: {what} field of view ({shape}) covers {overlap:.0%} of the T1w {ref_path}; "
            f"{what} must be in the subject's T1w space (space-T1w)")
    return True


def zero_nonfinite(img: nib.Nifti1Image) -> tuple[nib.Nifti1Image, int]:
    """Replace NaN/Inf voxels by 0; return the cleaned image and how many there were."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        data = np.where(bad, 0.0, data).astype(np.float32)
    return nib.Nifti1Image(data, img.affine, img.header), n_bad


def missing_t1w_error(subject_key: str) -> MissingInputError:
    """The error for a subject (``sub-X`` or ``sub-X_ses-Y``) without a T1w image."""
    subject, _, session = subject_key.partition("_")
    folder = f"{subject}/" + (f"{session}/" if session else "")
    return MissingInputError(f"{subject_key}: no T1w image found (expected {folder}anat/{subject_key}_T1w.nii.gz); "
                             "add it or leave the subject out of --participant-label")


def load_subject_inputs(t1w: str | Path | None, maps: dict[str, str | Path | None],
                        subject_key: str) -> tuple[nib.Nifti1Image, dict[str, nib.Nifti1Image], dict[str, int]]:
    """Load and validate one subject's T1w and its T1w-space maps (e.g. {'fa': p, 'ndi': p}).

    Returns (t1w image, {modality: image with non-finite voxels set to 0},
    {'nonfinite_<modality>': count, 'regridded_<modality>': 1 if the map is on another
    grid than the T1w (read through its affine), else 0}). Maps given as None are skipped.
    """
    if t1w is None:
        raise missing_t1w_error(subject_key)
    t1 = load_3d(t1w, "T1w")
    t1, n_bad_t1 = zero_nonfinite(t1)
    out: dict[str, nib.Nifti1Image] = {}
    qc: dict[str, int] = {"nonfinite_t1": n_bad_t1}
    for modality, path in maps.items():
        if path is None:
            continue
        img = load_3d(path, modality.upper())
        qc[f"regridded_{modality}"] = int(check_same_space(img, path, t1, t1w, modality.upper()))
        out[modality], qc[f"nonfinite_{modality}"] = zero_nonfinite(img)
    return t1, out, qc
