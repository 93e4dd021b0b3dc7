"""``mmfusion simulate --dwi``: multi-shell DWI of each simulated subject, in QSIPrep naming.

Replaces the QSIRecon-style FA/NDI maps by what they would be fitted from::

    OUT/derivatives/qsiprep/dataset_description.json
    OUT/derivatives/qsiprep/sub-XX[/ses-Y]/dwi/
        sub-XX[_ses-Y]_space-T1w_desc-preproc_dwi.nii.gz (+ .bval, .bvec, .json)
        sub-XX[_ses-Y]_space-T1w_desc-brain_mask.nii.gz
    OUT/sourcedata/ground_truth/
        sub-XX[_ses-Y]_space-T1w_desc-true_{fa,ndi}.nii.gz, _desc-{wm,tissue}_mask.nii.gz  (on the DWI grid;
        WM: white-matter partial volume > 0.5; tissue: grey + white > 0.5)

The DWI grid is the subject's T1w grid subsampled by ``factor`` (same world space, the
T1w's header transform). The signal model is :mod:`mmfusion.diffusion.synthesis`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from mmfusion._version import __version__
from mmfusion.diffusion import synthesis
from mmfusion.io.atomic import write_json, write_text

DEFAULTS = {"snr": synthesis.DEFAULT_SNR, "directions": synthesis.DEFAULT_DIRECTIONS,
            "shells": list(synthesis.DEFAULT_SHELLS), "b0": synthesis.DEFAULT_B0, "dpar": 1.7e-3,
            "factor": 1}


@functools.lru_cache(maxsize=2)
def _model(seed: int, shells: tuple, directions: int, b0: int, dpar: float) -> synthesis.SignalModel:
    """One acquisition (and its forward-model tables) for the whole dataset."""
    acq = synthesis.acquisition(np.random.default_rng(seed), shells, directions, b0)
    return synthesis.SignalModel(acq, dpar=dpar)


def write_metadata(root: Path, description) -> None:
    """``derivatives/qsiprep/`` dataset files; the dataset README names it instead of qsirecon."""
    readme = root / "README"
    if readme.is_file():
        write_text(readme, readme.read_text().replace(
            "- `derivatives/qsirecon/`: FA (tensor) and NDI (NODDI ICVF) maps on each T1w grid.",
            "- `derivatives/qsiprep/`: preprocessed multi-shell DWI (+ .bval/.bvec, brain mask) in each\n"
            "  T1w space, synthesized from the true FA/NDI (no fitted maps: mmfusion fits them)."))
    deriv = root / "derivatives" / "qsiprep"
    write_json(deriv / "dataset_description.json", description(
        "QSIPrep-style synthetic preprocessed DWI", "derivative",
        {"Name": "mmfusion simulate", "Version": __version__,
         "Description": "synthetic multi-shell DWI in T1w space (NODDI-type signal, Rician noise)"}))
    write_text(deriv / "README", "# Synthetic QSIPrep-style preprocessed DWI\n\nMulti-shell DWI in each "
               "subject's T1w space with .bval/.bvec and the brain mask, synthesized from the true FA and "
               "NDI (sourcedata/ground_truth/*_space-T1w_desc-true_*).\n")


def write_subject(root: Path, key: str, rel: Path, grid, maps: dict, coords: np.ndarray, affine: np.ndarray,
                  seed_seq, opts: dict, save_nifti) -> dict:
    """Synthesize and write one session's DWI; return its info for planted.json.

    ``maps``: the subject's true FA/NDI on the template grid; ``coords`` (3, X, Y, Z) the
    template voxel coordinates of each T1w voxel; ``affine`` the T1w's header affine."""
    from scipy import ndimage

    k = int(opts["factor"])
    idx = np.indices(tuple(int(np.ceil(n / k)) for n in grid.shape), dtype=np.float32) * k + (k - 1) / 2.0
    sub = np.stack([ndimage.map_coordinates(c, idx, order=1, mode="nearest") for c in coords]) if k > 1 else coords
    mask = ndimage.map_coordinates(grid.mask.astype(np.float32), sub, order=1) > 0.5
    true = {m: np.clip(ndimage.map_coordinates(maps[m], sub, order=1), 0, 1) * mask for m in ("fa", "ndi")}
    wm = ndimage.map_coordinates(grid.wm, sub, order=1)
    gm = ndimage.map_coordinates(grid.gm, sub, order=1)
    fiso = np.clip(1.0 - wm - gm, 0, 1) * mask
    model = _model(int(opts["acq_seed"]), tuple(float(b) for b in opts["shells"]), int(opts["directions"]),
                   int(opts["b0"]), float(opts["dpar"]))
    dwi, info = synthesis.synthesize(np.random.default_rng(seed_seq), model, true["fa"], true["ndi"], fiso, mask,
                                     snr=float(opts["snr"]))
    dwi_affine = affine @ _shift((k - 1) / 2.0) @ np.diag([k, k, k, 1.0])
    dwi = np.where(mask[..., None], dwi, 0.0)  # preprocessed, skull-stripped series: zero background
    folder = root / "derivatives" / "qsiprep" / rel / "dwi"
    stem = f"{key}_space-T1w"
    save_nifti(folder / f"{stem}_desc-preproc_dwi.nii.gz", dwi, dwi_affine, dtype=np.int16)
    save_nifti(folder / f"{stem}_desc-brain_mask.nii.gz", mask, dwi_affine, dtype=np.uint8)
    write_text(folder / f"{stem}_desc-preproc_dwi.bval", " ".join(f"{b:g}" for b in model.acq.bvals) + "\n")
    write_text(folder / f"{stem}_desc-preproc_dwi.bvec",
               "\n".join(" ".join(f"{x:.6f}" for x in row) for row in model.acq.bvecs.T) + "\n")
    write_json(folder / f"{stem}_desc-preproc_dwi.json", {"SkullStripped": True, "synthetic": info})
    truth = root / "sourcedata" / "ground_truth"
    for m, values in true.items():
        save_nifti(truth / f"{key}_space-T1w_desc-true_{m}.nii.gz", values, dwi_affine)
    save_nifti(truth / f"{key}_space-T1w_desc-wm_mask.nii.gz", (wm > 0.5) & mask, dwi_affine, dtype=np.uint8)
    save_nifti(truth / f"{key}_space-T1w_desc-tissue_mask.nii.gz", (wm + gm > 0.5) & mask, dwi_affine, dtype=np.uint8)
    return info


def _shift(offset: float) -> np.ndarray:
    """Voxel-index translation by ``offset`` (4, 4)."""
    out = np.eye(4)
    out[:3, 3] = offset
    return out
