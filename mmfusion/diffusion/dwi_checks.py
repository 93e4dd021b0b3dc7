"""Checks of a preprocessed DWI series before any fit: gradients, shells, b=0, mask.

Every check raises :class:`~mmfusion.errors.InputDataError` (exit 65) with one line that
names the file (``source``) and the fix; nothing is fitted or written before they pass.
Units: b-values in s/mm^2, b-vectors dimensionless (unit norm for diffusion-weighted
volumes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmfusion.errors import InputDataError

#: A diffusion-weighted b-vector may differ from unit norm by this much (DIPY's default atol).
BVEC_NORM_ATOL = 1e-2
#: NODDI needs at least this many non-zero shells (one shell cannot separate the compartments).
NODDI_MIN_SHELLS = 2


@dataclass(frozen=True)
class Shells:
    """The acquisition's shells: ``b0`` (N,) bool; ``shell_of`` (N,) float, the shell's
    b-value (s/mm^2) of each volume (0 for b=0 volumes); ``values``: the non-zero shells,
    ascending; ``counts``: volumes per shell."""

    b0: np.ndarray
    shell_of: np.ndarray
    values: tuple[float, ...]
    counts: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"b0_volumes": int(self.b0.sum()),
                "shells": {f"{v:g}": c for v, c in zip(self.values, self.counts)}}


def check_gradients(bvals: np.ndarray, bvecs: np.ndarray, n_volumes: int, source: str,
                    b0_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Check b-values (N,) and b-vectors ((3, N) FSL layout or (N, 3)) against a series of
    ``n_volumes`` volumes; return them as float64 ``(N,)`` and ``(N, 3)``.

    Refused: a count that differs from the number of volumes, negative or non-finite
    b-values, diffusion-weighted b-vectors that are not unit norm (within
    :data:`BVEC_NORM_ATOL`), and a series without any b=0 volume (b <= ``b0_threshold``).
    """
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvecs.ndim != 2 or 3 not in bvecs.shape:
        raise InputDataError(f"{source}: b-vectors must be 3 rows (FSL .bvec) or 3 columns, got shape "
                             f"{bvecs.shape}; write one x, y and z row per volume")
    if bvecs.shape[0] == 3 and bvecs.shape[1] != 3:
        bvecs = bvecs.T
    elif bvecs.shape == (3, 3) and n_volumes == 3:
        bvecs = bvecs.T  # FSL layout (rows x, y, z) also for 3 volumes
    if not (len(bvals) == len(bvecs) == n_volumes):
        raise InputDataError(f"{source}: {len(bvals)} b-values and {len(bvecs)} b-vectors for {n_volumes} "
                             "volumes; give one b-value and one b-vector per volume (the files of this series)")
    if not np.all(np.isfinite(bvals)) or not np.all(np.isfinite(bvecs)) or np.any(bvals < 0):
        raise InputDataError(f"{source}: b-values/b-vectors hold negative or non-finite entries; "
                             "replace them with the series' own .bval/.bvec")
    weighted = bvals > b0_threshold
    norms = np.linalg.norm(bvecs, axis=1)
    bad = np.flatnonzero(weighted & (np.abs(norms - 1.0) > BVEC_NORM_ATOL))
    if bad.size:
        raise InputDataError(f"{source}: {bad.size} diffusion-weighted b-vector(s) not of unit norm (e.g. volume "
                             f"{bad[0]}: norm {norms[bad[0]]:.3f}); normalise them (a scaled b-vector usually "
                             "means its b-value needs rescaling too: use the preprocessing tool's own files)")
    if not np.any(~weighted):
        raise InputDataError(f"{source}: no b=0 volume (no b-value <= {b0_threshold:g} s/mm^2); the fits "
                             "normalise by b=0: use a series that keeps its b=0 volumes")
    return bvals, bvecs


def find_shells(bvals: np.ndarray, b0_threshold: float, tolerance: float) -> Shells:
    """Group b-values (N,) s/mm^2 into shells: values within ``tolerance`` of a shell's
    first (smallest) b-value belong to it; b <= ``b0_threshold`` is b=0."""
    bvals = np.asarray(bvals, dtype=np.float64)
    b0 = bvals <= b0_threshold
    shell_of = np.zeros_like(bvals)
    values: list[float] = []
    for b in np.sort(bvals[~b0]):
        if not values or b - values[-1] > tolerance:
            values.append(float(b))
    for v in values:
        members = (~b0) & (np.abs(bvals - v) <= tolerance) & (shell_of == 0)
        shell_of[members] = v
    # the shell's value: the rounded mean of its members (990..1010 -> 1000)
    centres = tuple(float(np.round(bvals[shell_of == v].mean(), -1)) for v in values)
    for v, c in zip(values, centres):
        shell_of[shell_of == v] = c
    counts = tuple(int(np.sum(shell_of == c)) for c in centres)
    return Shells(b0, shell_of, centres, counts)


def dti_volumes(shells: Shells, max_bval: float, source: str) -> np.ndarray:
    """(N,) bool: the b=0 volumes and the shells with b <= ``max_bval`` (the tensor fit's volumes).
    Refused when no shell is that low or it has fewer than 6 directions."""
    low = [v for v in shells.values if v <= max_bval]
    if not low:
        raise InputDataError(f"{source}: no shell with b <= {max_bval:g} s/mm^2 for the tensor fit (shells: "
                             f"{', '.join(f'{v:g}' for v in shells.values)}); set diffusion.dti_max_bval")
    use = shells.b0 | np.isin(shells.shell_of, low)
    if int(np.sum(use & ~shells.b0)) < 6:
        raise InputDataError(f"{source}: {int(np.sum(use & ~shells.b0))} directions with b <= {max_bval:g} "
                             "s/mm^2; a tensor needs at least 6: use a series with more directions")
    return use


def noddi_possible(shells: Shells) -> bool:
    """Whether the series has the :data:`NODDI_MIN_SHELLS` non-zero shells NODDI needs."""
    return len(shells.values) >= NODDI_MIN_SHELLS


def single_shell_message(shells: Shells, source: str) -> str:
    """The one line for a series NODDI cannot be fitted on (without 'allow FA only')."""
    found = ", ".join(f"b={v:g} ({c})" for v, c in zip(shells.values, shells.counts)) or "none"
    return (f"{source}: NODDI needs {NODDI_MIN_SHELLS} or more non-zero shells, found {found}; "
            "give multi-shell data, or pass --allow-fa-only (diffusion.allow_fa_only) to fit FA alone "
            "and leave NDI missing")


def check_mask(mask: np.ndarray, shape: tuple, source: str) -> np.ndarray:
    """The brain mask (X, Y, Z) as bool; refused when its shape differs from the DWI's or it is empty."""
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[3] == 1:
        mask = mask[..., 0]
    if mask.shape != tuple(shape):
        raise InputDataError(f"{source}: brain mask shape {mask.shape} differs from the DWI grid {tuple(shape)}; "
                             "use the mask written with this DWI series")
    mask = np.nan_to_num(mask) > 0
    if not mask.any():
        raise InputDataError(f"{source}: brain mask is empty; use the mask written with this DWI series")
    return mask


def finite_voxels(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Zero NaN/Inf signal (X, Y, Z, N) (on a copy) and drop those voxels from the mask.

    Returns (data float32, mask without non-finite voxels, how many voxels had any)."""
    bad = ~np.all(np.isfinite(data), axis=-1)
    n_bad = int(np.sum(bad & mask))
    if bad.any():
        data = np.where(np.isfinite(data), data, 0.0)
    return np.asarray(data, dtype=np.float32), mask & ~bad, n_bad
