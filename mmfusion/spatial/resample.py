"""The output grid: template space, ``grid_voxel_size`` mm, cropped/padded to ``grid_shape``.

The grid keeps the template's orientation and is centred on the template's centre, so
cropping/padding is symmetric. Downsampling smooths first (Gaussian, FWHM =
sqrt(out^2 - in^2) mm) so the coarser voxels average rather than alias.
"""
from __future__ import annotations

import ants
import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_centre(img: ants.ANTsImage) -> np.ndarray:
    """Physical (LPS, mm) coordinates of the centre of ``img``'s voxel grid, shape (3,)."""
    direction = np.asarray(img.direction)
    half = (np.asarray(img.shape[:3], float) - 1.0) / 2.0
    return np.asarray(img.origin) + direction @ (np.asarray(img.spacing) * half)


def output_grid(template: ants.ANTsImage, voxel_size: float, shape) -> ants.ANTsImage:
    """A zero float image: ``shape`` voxels of ``voxel_size`` mm, centred on ``template``.

    Axis-aligned: the direction is ``template``'s rounded to the nearest signed
    permutation, so an oblique template (e.g. built from tilted T1w) still gives a grid
    whose affine is diagonal.
    """
    shape = tuple(int(s) for s in shape)
    direction = np.round(np.asarray(template.direction, dtype=float))
    half = (np.asarray(shape, float) - 1.0) / 2.0
    origin = image_centre(template) - direction @ (np.full(3, float(voxel_size)) * half)
    return ants.make_image(shape, voxval=0.0, spacing=(float(voxel_size),) * 3,
                           origin=tuple(origin), direction=direction, pixeltype="float")


def to_grid(img: ants.ANTsImage, grid: ants.ANTsImage, interpolator: str = "linear",
            antialias: bool = True) -> ants.ANTsImage:
    """Resample ``img`` (any grid, physical space shared with ``grid``) onto ``grid``.

    ``interpolator``: 'linear' for continuous maps, 'nearestNeighbor' for masks.
    """
    src = img
    coarse, fine = float(min(grid.spacing)), float(min(img.spacing))
    if antialias and interpolator == "linear" and coarse > fine * 1.01:
        fwhm = float(np.sqrt(coarse ** 2 - fine ** 2))
        src = ants.smooth_image(img, fwhm, sigma_in_physical_coordinates=True, FWHM=True)
    return ants.resample_image_to_target(src, grid, interp_type=interpolator)


def ras_affine(img: ants.ANTsImage) -> np.ndarray:
    """Voxel -> world (RAS+, mm) 4x4 affine of ``img``, as nibabel would report it."""
    direction = np.asarray(img.direction)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.spacing)[None, :]
    lps[:3, 3] = np.asarray(img.origin)
    return _LPS_TO_RAS @ lps
