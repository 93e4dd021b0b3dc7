"""FA from a tensor fit (DIPY) and NDI from NODDI (AMICO), inside a brain mask.

Arrays in, arrays out: ``data`` is the preprocessed DWI, float (X, Y, Z, N); ``bvals``
(N,) s/mm^2; ``bvecs`` (N, 3) unit vectors; ``mask`` bool (X, Y, Z). Maps come back as
float32 (X, Y, Z), 0 outside the mask and where a fit gave NaN/Inf (the count is returned).

AMICO works on files in a study folder: :func:`fit_noddi` writes the masked series to a
scratch folder it is given, keeps its high-resolution kernels (which depend on the shells
and the diffusivities only) in ``kernel_dir`` for the next subject, and sends AMICO's
console output to this module's logger (DEBUG), never to the terminal.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfusion.errors import InputDataError
from mmfusion.runlog import get_logger

log = get_logger(__name__)

#: AMICO's NODDI defaults (amico.models.NODDI.set): parallel and isotropic diffusivity, mm^2/s.
AMICO_DPAR, AMICO_DISO = 1.7e-3, 3.0e-3
#: AMICO's rotation order and number of kernel orientations (its defaults).
AMICO_LMAX, AMICO_NDIRS = 12, 500


@dataclass
class NoddiResult:
    """NODDI maps float32 (X, Y, Z): ``ndi`` (AMICO's ``NDI``, the intra-cellular volume
    fraction ICVF), ``odi``, ``fwf`` (isotropic fraction); ``settings`` for the sidecar;
    ``nonfinite``: voxels set to 0."""

    ndi: np.ndarray
    odi: np.ndarray
    fwf: np.ndarray
    settings: dict
    nonfinite: int


def _clean(values: np.ndarray, mask: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> tuple[np.ndarray, int]:
    bad = ~np.isfinite(values) & mask
    out = np.where(mask & np.isfinite(values), np.clip(values, lo, hi), 0.0).astype(np.float32)
    return out, int(bad.sum())


def fit_dti(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray,
            use: np.ndarray, b0_threshold: float, fit_method: str = "WLS") -> tuple[np.ndarray, int]:
    """FA of a DIPY ``TensorModel`` fitted on the volumes ``use`` (N,) bool (b=0 and the
    shells up to ``diffusion.dti_max_bval``). Returns (FA float32 (X, Y, Z) in [0, 1],
    voxels whose FA was not finite and were set to 0)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    gtab = gradient_table(bvals[use], bvecs=bvecs[use], b0_threshold=b0_threshold)
    model = TensorModel(gtab, fit_method=fit_method)
    fa = np.zeros(mask.shape, np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fa[mask] = model.fit(data[mask][:, use]).fa
    return _clean(fa, mask)


def amico_version() -> str:
    import importlib.metadata as md

    return md.version("dmri-amico")


def kernel_key(bvals: np.ndarray, b0_threshold: float, dpar: float, diso: float) -> str:
    """Name of the kernel folder: AMICO's kernels depend on the shells (b-values; not on the
    directions, which are resampled per subject), the diffusivities and its version."""
    shells = sorted({float(np.round(b, -1)) for b in bvals if b > b0_threshold})
    blob = json.dumps({"shells": shells, "dpar": dpar, "diso": diso, "amico": amico_version(),
                       "lmax": AMICO_LMAX, "ndirs": AMICO_NDIRS}, sort_keys=True)
    return "NODDI_" + hashlib.sha256(blob.encode()).hexdigest()[:12]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _amico_quiet(what: str):
    """AMICO prints (and calls sys.exit on errors): capture its output, log it at DEBUG,
    turn its exit into an InputDataError naming ``what``."""
    import amico.util

    amico.util.set_verbose(2)  # messages, no progress bars
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:  # DIPY's deprecation notes about the SH basis AMICO uses, etc.
            log.debug("amico: %s: %s", w.category.__name__, w.message)
    except SystemExit as exc:
        lines = [_ANSI.sub("", line).strip() for line in buf.getvalue().splitlines() if line.strip()]
        reason = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else f"exit {exc.code}")
        raise InputDataError(f"{what}: AMICO refused the data ({reason}); check the series and its .bval/.bvec")
    finally:
        for line in buf.getvalue().splitlines():
            if line.strip():
                log.debug("amico: %s", _ANSI.sub("", line).rstrip())


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder/.lock``: array tasks sharing a kernel cache wait for
    the one that builds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fit_noddi(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray,
              affine: np.ndarray, workdir: Path, kernel_dir: Path, *, b0_threshold: float,
              dpar: float = AMICO_DPAR, diso: float = AMICO_DISO, nthreads: int = 1,
              what: str = "DWI") -> NoddiResult:
    """NODDI by AMICO (``Evaluation``, ``set_model('NODDI')``, ``generate_kernels``,
    ``load_kernels``, ``fit``) with diffusivities ``dpar``/``diso`` (mm^2/s).

    ``workdir``: scratch folder for AMICO's input files (removed by the caller);
    ``kernel_dir``: cache of rotation matrices and kernels (shared by subjects, locked
    while built). ``affine`` (4, 4) only labels AMICO's scratch NIfTI. ``what`` names the
    series in errors.
    """
    import nibabel as nib
    import amico
    import amico.lut

    workdir, kernel_dir = Path(workdir), Path(kernel_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), workdir / "dwi.nii")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), workdir / "mask.nii")
    scheme = np.column_stack([bvecs, bvals])
    np.savetxt(workdir / "dwi.scheme", scheme, fmt="%.6f", header="VERSION: BVECTOR", comments="")
    atoms = kernel_dir / kernel_key(bvals, b0_threshold, dpar, diso)
    amico.lut.dipy_home = str(kernel_dir)  # AMICO keeps its rotation matrices in DIPY's home folder
    with _amico_quiet(what):
        with _locked(kernel_dir):
            if not (kernel_dir / f"AMICO_aux_matrices_lmax={AMICO_LMAX}_ndirs={AMICO_NDIRS}.pickle").is_file():
                amico.lut.precompute_rotation_matrices(AMICO_LMAX, AMICO_NDIRS)
            ae = amico.Evaluation(study_path=str(workdir), subject=".", output_path=str(workdir / "out"))
            ae.set_config("nthreads", int(nthreads))
            ae.set_config("BLAS_nthreads", 1)
            ae.load_data(str(workdir / "dwi.nii"), str(workdir / "dwi.scheme"), mask_filename=str(workdir / "mask.nii"),
                         b0_thr=b0_threshold, replace_bad_voxels=0)
            ae.set_model("NODDI")
            ae.model.set(dPar=dpar, dIso=diso)
            ae.set_solver()
            if not atoms.is_dir():  # built under a temporary name: a crash leaves no partial kernels
                tmp = Path(tempfile.mkdtemp(prefix=f".{atoms.name}.", dir=kernel_dir))
                ae.set_config("ATOMS_path", str(tmp))
                ae.generate_kernels(regenerate=True, lmax=AMICO_LMAX, ndirs=AMICO_NDIRS)
                os.replace(tmp, atoms)
            ae.set_config("ATOMS_path", str(atoms))
            ae.set_config("lmax", AMICO_LMAX)
            ae.set_config("ndirs", AMICO_NDIRS)
            ae.model.scheme = ae.scheme
        ae.load_kernels()
        ae.fit()
    maps = ae.RESULTS["MAPs"]
    ndi, bad_ndi = _clean(maps[..., 0], mask)
    odi, _ = _clean(maps[..., 1], mask)
    fwf, _ = _clean(maps[..., 2], mask)
    params = ae.model.get_params()
    settings = {"Model": "NODDI", "Software": "AMICO (dmri-amico)", "SoftwareVersion": amico_version(),
                "ParallelDiffusivity_mm2_per_s": float(params["dPar"]),
                "IsotropicDiffusivity_mm2_per_s": float(params["dIso"]),
                "IntraCellularVolumeFractionGrid": [round(float(v), 4) for v in params["IC_VFs"]],
                "OrientationDispersionGrid": [round(float(v), 4) for v in params["IC_ODs"]],
                "Solver": {k: float(v) for k, v in ae.get_config("solver_params").items()} or
                          {"lambda1": float(ae.model.solver_params["lambda1"]),
                           "lambda2": float(ae.model.solver_params["lambda2"])},
                "AmicoOutput": "fit_NDI (NDI = intra-cellular volume fraction, ICVF)",
                "KernelLmax": AMICO_LMAX, "KernelDirections": AMICO_NDIRS}
    return NoddiResult(ndi, odi, fwf, settings, bad_ndi)
