"""Preprocessed DWI in, fitted FA/NDI derivatives out (QSIRecon-like names, JSON sidecars).

Reading: the 4D series, its ``.bval``/``.bvec`` (FSL layout) and the brain mask, each
failure one line naming the file (:class:`~mmfusion.errors.InputDataError`, exit 65;
:class:`~mmfusion.errors.MissingInputError`, exit 66). Writing, under
``output_dir/sub-X[/ses-Y]/dwi/``::

    sub-X[_ses-Y]_space-T1w_model-tensor_param-fa_dwimap.nii.gz (+ .json)
    sub-X[_ses-Y]_space-T1w_model-noddi_param-icvf_dwimap.nii.gz (+ .json)

on the DWI's own grid (in the T1w world space), each NIfTI then its sidecar written
atomically. The sidecar's ``FitRecord`` (input hashes, settings, software versions) is the
cache key: a rerun with the same record reuses the maps.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from mmfusion import __version__
from mmfusion.errors import InputDataError, MissingInputError
from mmfusion.io.atomic import atomic_path, write_json
from mmfusion.io.bids import DwiInputs, subject_folder, subject_stem

#: modality -> (model, param) of the fitted map's name
FIT_NAMES = {"fa": ("tensor", "fa"), "ndi": ("noddi", "icvf")}


def fitted_path(output_dir: Path, subject: str, session: str, modality: str) -> Path:
    model, param = FIT_NAMES[modality]
    return (Path(output_dir) / subject_folder(subject, session) / "dwi"
            / f"{subject_stem(subject, session)}_space-T1w_model-{model}_param-{param}_dwimap.nii.gz")


def sidecar(nifti: Path) -> Path:
    return nifti.with_name(nifti.name.replace(".nii.gz", ".json"))


def load_dwi(inputs: DwiInputs) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray | None]:
    """(4D image, b-values (N,), b-vectors as read (3, N) or (N, 3), mask array or None)."""
    for path in inputs.files().values():
        if not Path(path).is_file():
            raise MissingInputError(f"{path}: file of the DWI series not found; add it (QSIPrep writes "
                                    ".nii.gz, .bval, .bvec and the _desc-brain_mask next to each other)")
    try:
        img = nib.load(str(inputs.dwi))
        shape = img.shape
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputDataError(f"{inputs.dwi}: cannot read the DWI NIfTI ({type(exc).__name__}: {exc}); "
                             "replace the file") from exc
    if len(shape) != 4 or shape[3] < 2:
        raise InputDataError(f"{inputs.dwi}: a DWI series must be 4D with one volume per gradient, got shape "
                             f"{shape}; give the preprocessed series")
    if inputs.uses_btable():  # QSIPrep's .b (x, y, z, b per row) when .bval/.bvec are absent
        table = _read_table(inputs.btable, "gradient table")
        if table.shape[1] != 4:
            raise InputDataError(f"{inputs.btable}: an MRtrix .b gradient table has 4 columns (x y z b), got "
                                 f"{table.shape[1]}; give the series' .bval/.bvec instead")
        bvals, bvecs = table[:, 3], table[:, :3]
    else:
        bvals = _read_table(inputs.bval, "b-values")
        bvecs = _read_table(inputs.bvec, "b-vectors")
    mask = None
    if inputs.mask is not None:
        try:
            mimg = nib.load(str(inputs.mask))
            mask = np.asanyarray(mimg.dataobj)
        except Exception as exc:
            raise InputDataError(f"{inputs.mask}: cannot read the brain mask ({type(exc).__name__}); "
                                 "replace the file") from exc
        if not np.allclose(mimg.affine, img.affine, atol=1e-3):
            raise InputDataError(f"{inputs.mask}: brain mask is on another grid than the DWI {inputs.dwi}; "
                                 "use the mask written with this DWI series")
    return img, bvals, bvecs, mask


def _read_table(path: Path, what: str) -> np.ndarray:
    try:
        return np.loadtxt(path, ndmin=1 if what == "b-values" else 2)
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path}: cannot read the {what} ({exc}); give a whitespace-separated FSL "
                             f"{'.bval' if what == 'b-values' else '.bvec'} file (or MRtrix .b)") from exc


def brain_mask_from_b0(mean_b0: np.ndarray) -> np.ndarray:
    """Brain mask (X, Y, Z) bool of the mean b=0 image (DIPY ``median_otsu``, 4 passes of a
    radius-2 median filter): for a raw-BIDS series that comes without one."""
    from dipy.segment.mask import median_otsu

    _, mask = median_otsu(np.asarray(mean_b0, np.float32), median_radius=2, numpass=4)
    return mask.astype(bool)


def recorded_fit(path: Path) -> dict | None:
    """The ``FitRecord`` of a fitted map's sidecar (None when the map or its sidecar is missing)."""
    meta = sidecar(path)
    if not (Path(path).is_file() and meta.is_file()):
        return None
    try:
        return json.loads(meta.read_text()).get("FitRecord")
    except (OSError, ValueError):
        return None


def write_fitted_map(path: Path, data: np.ndarray, affine: np.ndarray, meta: dict) -> None:
    """Write one fitted map (float32 (X, Y, Z)) and then its sidecar, each atomically."""
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    write_json(sidecar(path), {**meta, "GeneratedBy": {"Name": "mmfusion", "Version": __version__}})
