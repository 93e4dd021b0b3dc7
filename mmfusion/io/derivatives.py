"""The BIDS-derivative side of output_dir: file names, JSON sidecars, dataset_description.json
and .bidsignore.

Layout (one subject, ``<tpl>`` = the template's space label, ``2p5`` = grid voxel size)::

    dataset_description.json             DatasetType 'derivative', GeneratedBy mmfusion
    .bidsignore                          lists the non-BIDS parts below
    sub-X[/ses-Y]/anat/
      sub-X[_ses-Y]_space-<tpl>_res-2p5_desc-preproc_T1w.nii.gz (+ .json)    warped N4 T1w
      sub-X[_ses-Y]_space-<tpl>_res-2p5_desc-brain_mask.nii.gz (+ .json)     template mask
      sub-X[_ses-Y]_space-<tpl>_res-2p5_desc-logjac_jacobian.nii.gz (+ .json)  log-JAC  [bidsignored]
      sub-X[_ses-Y]_space-<tpl>_res-2p5_desc-fa_mdp.nii.gz / desc-ndi_mdp     FA, NDI  [bidsignored]
      sub-X[_ses-Y]_from-T1w_to-<tpl>_mode-image_desc-{affine,warp}_xfm.*     [bidsignored]
    sub-X[/ses-Y]/dwi/sub-X[_ses-Y]_space-T1w_model-{tensor,noddi}_param-{fa,icvf}_dwimap.*
                                         FA/NDI fitted from preprocessed DWI    [bidsignored]
                                         (mmfusion/io/dwi.py; only when the fitted maps were absent)
    sub-X/figures/sub-X[_ses-Y]_desc-registration_qc.png                      [bidsignored]
    sub-X[_ses-Y].html                                                        [bidsignored]
    mmfusion_report.html (group level)                                        [bidsignored]
    shards/ template/ logs/ work/ group/                                      [bidsignored]

Every writer here is atomic; the two shared files are created exactly once even when
many array tasks race (:func:`mmfusion.io.atomic.write_text_once`).
"""
from __future__ import annotations

import json
from pathlib import Path

from mmfusion import __version__
from mmfusion.io.atomic import write_json, write_text_once
from mmfusion.io.bids import BIDS_VERSION, subject_folder, subject_stem

# bids-validator-deno matches these like .gitignore, but a trailing '/' stops a folder matching
BIDSIGNORE = [
    "shards", "template", "logs", "work", "group", "figures", "sub-*.html", "mmfusion_report.html",
    "*_desc-logjac_jacobian.*", "*_mdp.*", "*_xfm.*", "*_dwimap.*",
]

#: modality -> (desc label, suffix) of the derivative NIfTI
MODALITY_NAMES = {
    "t1": ("preproc", "T1w"),
    "jac": ("logjac", "jacobian"),
    "fa": ("fa", "mdp"),
    "ndi": ("ndi", "mdp"),
    "mask": ("brain", "mask"),
}

MODALITY_DESCRIPTIONS = {
    "t1": "N4-corrected T1w warped to the template (arbitrary units)",
    "jac": ("natural log of the Jacobian determinant of the NONLINEAR part of the T1w->template "
            "warp, on the template grid; > 0 where the subject is larger than the template"),
    "fa": "fractional anisotropy (tensor model) warped from T1w space with the T1w transforms",
    "ndi": "neurite density index (NODDI ICVF) warped from T1w space with the T1w transforms",
    "mask": "template brain mask on the output grid",
}


README = """# mmfusion spatial normalization derivatives

Per subject (and session): the N4-corrected T1w, the log Jacobian determinant of the
nonlinear T1w->template warp, FA and NDI, all on one grid in template space, plus the
template brain mask, the forward transforms, a QC figure and an HTML page
(`sub-<label>.html`). `shards/` holds one HDF5 file per subject, the input of the group
level. See the mmfusion documentation (docs/registration.md).
"""


def subject_dir(output_dir: Path, subject: str, session: str = "") -> Path:
    return Path(output_dir) / subject_folder(subject, session) / "anat"


def res_label(voxel_size_mm: float) -> str:
    """2.5 -> '2p5', 2.0 -> '2' (BIDS labels are alphanumeric)."""
    text = f"{voxel_size_mm:g}"
    return text.replace(".", "p")


def modality_path(output_dir: Path, subject: str, session: str, modality: str, space: str,
                  voxel_size_mm: float) -> Path:
    desc, suffix = MODALITY_NAMES[modality]
    name = (f"{subject_stem(subject, session)}_space-{space}_res-{res_label(voxel_size_mm)}"
            f"_desc-{desc}_{suffix}.nii.gz")
    return subject_dir(output_dir, subject, session) / name


def transform_paths(output_dir: Path, subject: str, session: str, space: str) -> dict[str, Path]:
    stem = f"{subject_stem(subject, session)}_from-T1w_to-{space}_mode-image"
    folder = subject_dir(output_dir, subject, session)
    return {"affine": folder / f"{stem}_desc-affine_xfm.mat", "warp": folder / f"{stem}_desc-warp_xfm.nii.gz"}


def figure_path(output_dir: Path, subject: str, session: str) -> Path:
    return Path(output_dir) / f"sub-{subject}" / "figures" / f"{subject_stem(subject, session)}_desc-registration_qc.png"


def report_path(output_dir: Path, subject: str, session: str) -> Path:
    return Path(output_dir) / f"{subject_stem(subject, session)}.html"


def sidecar_path(nifti: Path) -> Path:
    return nifti.with_name(nifti.name.replace(".nii.gz", ".json"))


def write_sidecar(nifti: Path, modality: str, sources: list[str], template: dict, extra: dict | None = None) -> Path:
    """Write the JSON sidecar of a derivative NIfTI (atomic). ``template`` is the template
    info dict (space, source, reference, hash)."""
    meta = {
        "Description": MODALITY_DESCRIPTIONS[modality],
        "Sources": sources,
        "SpatialReference": template["reference"],
        "TemplateSource": template["source"],
        "TemplateHash": template["hash"],
        "GeneratedBy": {"Name": "mmfusion", "Version": __version__},
    }
    if "res" in nifti.name:
        res = nifti.name.split("_res-")[1].split("_")[0]
        meta["Resolution"] = {res: f"{res.replace('p', '.')} mm isotropic grid in template space"}
    if modality == "t1":
        meta["SkullStripped"] = False
    if modality == "jac":
        meta["JacobianKind"] = "log"
    if modality == "mask":
        meta["Type"] = "Brain"
    meta.update(extra or {})
    path = sidecar_path(nifti)
    write_json(path, meta)
    return path


def dataset_description(bids_dir: Path | None) -> dict:
    desc = {
        "Name": "mmfusion spatial normalization",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "mmfusion", "Version": __version__,
                         "Description": "N4 + ANTs registration to a T1w template; log-JAC, FA, NDI on a 2.5 mm grid"}],
    }
    if bids_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(bids_dir).resolve().as_uri()}]
        desc["DatasetLinks"] = {"raw": Path(bids_dir).resolve().as_uri()}
    return desc


def init_output_dir(output_dir: Path, bids_dir: Path | None) -> None:
    """Create dataset_description.json and .bidsignore once (safe under concurrent tasks)."""
    output_dir = Path(output_dir)
    write_text_once(output_dir / "dataset_description.json", json.dumps(dataset_description(bids_dir), indent=2) + "\n")
    write_text_once(output_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")
    write_text_once(output_dir / "README.md", README)


def bids_uri(path: Path, root: Path | None, dataset: str = "raw") -> str:
    """'bids:raw:sub-01/anat/...' when ``path`` is inside ``root``, else a file:// URI."""
    path = Path(path).resolve()
    if root is not None:
        try:
            return f"bids:{dataset}:{path.relative_to(Path(root).resolve()).as_posix()}"
        except ValueError:
            pass
    return path.as_uri()
