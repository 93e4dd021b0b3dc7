"""Loading and validating input NIfTIs (T1w, FA, NDI) before any expensive work.

Every failure raises one clear line naming the file: :class:`InputDataError` (exit 65)
for unreadable, empty, 4D or mismatched images, :class:`MissingInputError` (exit 66)
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


def check_same_grid(img: nib.Nifti1Image, path: str | Path, ref: nib.Nifti1Image,
                    ref_path: str | Path, what: str) -> None:
    """Raise InputDataError unless ``img`` has ``ref``'s shape and affine (within 1e-3 mm)."""
    if img.shape[:3] != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=GRID_ATOL_MM):
        raise InputDataError(
            f"{path}: {what} grid (shape {img.shape[:3]}, voxel "
            f"{np.round(nib.affines.voxel_sizes(img.affine), 3).tolist()} mm) does not match the T1w "
            f"{ref_path} (shape {ref.shape[:3]}); {what} must be in the subject's T1w space (space-T1w)")


def zero_nonfinite(img: nib.Nifti1Image) -> tuple[nib.Nifti1Image, int]:
    """Replace NaN/Inf voxels by 0; return the cleaned image and how many there were."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        data = np.where(bad, 0.0, data).astype(np.float32)
    return nib.Nifti1Image(data, img.affine, img.header), n_bad


def load_subject_inputs(t1w: str | Path | None, maps: dict[str, str | Path | None],
                        subject_key: str) -> tuple[nib.Nifti1Image, dict[str, nib.Nifti1Image], dict[str, int]]:
    """Load and validate one subject's T1w and its T1w-space maps (e.g. {'fa': p, 'ndi': p}).

    Returns (t1w image, {modality: image with non-finite voxels set to 0},
    {'nonfinite_<modality>': count}). Maps given as None are skipped.
    """
    if t1w is None:
        raise MissingInputError(f"{subject_key}: no T1w image found (expected anat/{subject_key}_T1w.nii.gz); "
                                "add it or exclude the subject with --participant-label")
    t1 = load_3d(t1w, "T1w")
    t1, n_bad_t1 = zero_nonfinite(t1)
    out: dict[str, nib.Nifti1Image] = {}
    qc: dict[str, int] = {"nonfinite_t1": n_bad_t1}
    for modality, path in maps.items():
        if path is None:
            continue
        img = load_3d(path, modality.upper())
        check_same_grid(img, path, t1, t1w, modality.upper())
        out[modality], qc[f"nonfinite_{modality}"] = zero_nonfinite(img)
    return t1, out, qc
