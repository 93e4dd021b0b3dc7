"""Tiny hand-made BIDS datasets for CLI and discovery tests (no simulation, no ANTs)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def _nifti(path: Path, shape=(6, 6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape, dtype=np.float32), np.eye(4)), path)


def add_files(root: Path, *relpaths: str) -> None:
    """Add small files under ``root``: NIfTIs for ``.nii[.gz]`` names, one-line text otherwise."""
    for rel in relpaths:
        path = Path(root) / rel
        if rel.endswith((".nii", ".nii.gz")):
            _nifti(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("onset\tduration\n" if rel.endswith(".tsv") else "{}\n")


def make_dataset(root: Path, subjects=("01", "02"), sessions=(), naming="param", space="T1w",
                 missing_ndi=(), missing_t1w=()) -> Path:
    """Raw dataset + a QSIRecon-like derivative dataset under ``root/derivatives/qsirecon``.

    ``naming`` is 'param' (QSIRecon) or 'mdp' (older QSIPrep); ``space`` 'T1w' or 'ACPC'.
    Subjects in ``missing_t1w`` get a raw ``dwi/`` image instead of the T1w.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    deriv = root / "derivatives" / "qsirecon"
    deriv.mkdir(parents=True, exist_ok=True)
    (deriv / "dataset_description.json").write_text(json.dumps({
        "Name": "qsirecon", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsirecon"}]}))
    for sub in subjects:
        for ses in (sessions or ("",)):
            sdir = f"sub-{sub}" + (f"/ses-{ses}" if ses else "")
            stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
            if sub not in missing_t1w:
                _nifti(root / sdir / "anat" / f"{stem}_T1w.nii.gz")
            else:  # imaged, but without a T1w: a raw diffusion series only
                _nifti(root / sdir / "dwi" / f"{stem}_dwi.nii.gz")
            _nifti(deriv / sdir / "dwi" / f"{stem}_space-{space}_model-tensor_{naming}-fa_dwimap.nii.gz")
            if sub not in missing_ndi:
                _nifti(deriv / sdir / "dwi" / f"{stem}_space-{space}_model-noddi_{naming}-icvf_dwimap.nii.gz")
    return root
