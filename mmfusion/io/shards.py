"""The HDF5 shard: one file per subject/session, the hand-off from participant to group.

Schema (version 2), file ``output_dir/shards/sub-<label>[_ses-<label>].h5``::

    /<modality>      float32 (X, Y, Z), one per modality in MODALITIES that was produced,
                     chunked (one z-slab per chunk), gzip level 4, on the output grid.
                     t1: N4-corrected T1w warped to the template (arbitrary units)
                     jac: log Jacobian determinant of the NONLINEAR warp (natural log,
                          > 0 where the subject is larger than the template)
                     fa: fractional anisotropy (0..1); ndi: neurite density index (0..1)
    /mask            uint8 (X, Y, Z), template brain mask on the output grid
    attrs:
      schema_version  int (2; version 1, mmfusion < 0.3.0, is refused: rerun the participant level)
      subject         str, label without 'sub-'
      session         str, label without 'ses-' ('' if none)
      affine          float64 (4, 4), voxel -> world (mm, RAS+) of the output grid
      voxel_size_mm   float
      grid            JSON str (version 2): {"shape": [X, Y, Z], "voxel_size_mm": float,
                      "rule": "brain-fitted" | "template-centred", "margin_mm": float | null}
      modalities      list[str], datasets present
      mmfusion_version, config_hash, template_hash, template_source, preset  str
      jac_kind        'log' (natural log of the determinant)
      input_hashes    JSON str: {path: sha256}
      timings_s       JSON str: {step: seconds}
      qc              JSON str: {e.g. 'nonfinite_fa': count, ...}

Shards are written atomically (temporary name, then rename): a shard that exists is
complete.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmfusion.io.atomic import atomic_path
from mmfusion.io.bids import MODALITIES, subject_stem
from mmfusion.errors import InputDataError, MissingInputError, StaleOutputError

SCHEMA_VERSION = 2
_STR_ATTRS = ("subject", "session", "mmfusion_version", "config_hash", "template_hash",
              "template_source", "preset", "jac_kind")
_JSON_ATTRS = ("input_hashes", "timings_s", "qc", "grid")
#: The attributes every shard of a schema version has (what :func:`read_attrs` checks).
REQUIRED_ATTRS = {1: ("schema_version", "subject", "affine", "modalities"),
                  2: ("schema_version", "subject", "affine", "modalities", "grid")}


@dataclass
class Shard:
    """In-memory content of one shard. ``images[m]`` is float32 (X, Y, Z)."""

    subject: str
    session: str
    images: dict[str, np.ndarray]
    mask: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``sub-X`` or ``sub-X_ses-Y``: the file stem and the group-level subject id."""
        return subject_stem(self.subject, self.session)


def split_stem(stem: str) -> tuple[str, str]:
    """``'sub-01_ses-2'`` -> ``('01', '2')``; ``'sub-01'`` -> ``('01', '')`` (inverse of bids.subject_stem)."""
    subject, _, session = stem.removeprefix("sub-").partition("_ses-")
    return subject, session


def shard_path(output_dir: str | Path, subject: str, session: str = "") -> Path:
    return Path(output_dir) / "shards" / f"{subject_stem(subject, session)}.h5"


def write_shard(path: str | Path, shard: Shard) -> Path:
    """Write ``shard`` atomically to ``path``. Returns ``path``."""
    path = Path(path)
    shape = shard.mask.shape
    for name, img in shard.images.items():
        if name not in MODALITIES:
            raise ValueError(f"unknown modality {name!r}; expected one of {MODALITIES}")
        if img.shape != shape:
            raise ValueError(f"modality {name} has shape {img.shape}, mask has {shape}")
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            chunks = (shape[0], shape[1], 1)
            for name, img in shard.images.items():
                h5.create_dataset(name, data=np.asarray(img, dtype=np.float32),
                                  chunks=chunks, compression="gzip", compression_opts=4)
            h5.create_dataset("mask", data=shard.mask.astype(np.uint8), chunks=chunks,
                              compression="gzip", compression_opts=4)
            h5.attrs["schema_version"] = SCHEMA_VERSION
            h5.attrs["subject"] = shard.subject
            h5.attrs["session"] = shard.session
            h5.attrs["affine"] = np.asarray(shard.affine, dtype=np.float64)
            h5.attrs["voxel_size_mm"] = float(np.linalg.norm(shard.affine[:3, 0]))
            h5.attrs["modalities"] = json.dumps(sorted(shard.images))
            for key in _STR_ATTRS:
                if key in shard.meta:
                    h5.attrs[key] = str(shard.meta[key])
            for key in _JSON_ATTRS:
                h5.attrs[key] = json.dumps(shard.meta.get(key, {}), sort_keys=True)
    return path


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Read and validate a shard's attributes only (cheap: no image data)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: shard not found; run the participant level for it first")
    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: h5.attrs[k] for k in h5.attrs}
            datasets = set(h5.keys())
            shape = h5["mask"].shape if "mask" in h5 else None
    except OSError as exc:
        raise InputDataError(f"{path}: not a readable HDF5 shard ({exc}); delete it and rerun the participant level") from exc
    version = int(attrs["schema_version"]) if "schema_version" in attrs else None
    missing = [k for k in REQUIRED_ATTRS.get(version, REQUIRED_ATTRS[SCHEMA_VERSION]) if k not in attrs]
    if missing or shape is None:
        raise InputDataError(f"{path}: not an mmfusion shard (missing {missing or ['mask']}); rerun the participant level")
    if version == 1:
        raise StaleOutputError(f"{path}: shard schema 1 (made by mmfusion < 0.3.0, on the old 2.5 mm grid); "
                               "rerun the participant level with --force to remake it")
    if version != SCHEMA_VERSION:
        raise InputDataError(f"{path}: shard schema {version} is not one this version reads ({SCHEMA_VERSION}); "
                             "rerun the participant level with this version")
    out: dict[str, Any] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    out["modalities"] = json.loads(out["modalities"])
    for key in _JSON_ATTRS:
        out[key] = json.loads(out.get(key, "{}"))
    out["shape"] = tuple(shape)
    missing_ds = [m for m in out["modalities"] if m not in datasets]
    if missing_ds:
        raise InputDataError(f"{path}: modalities {missing_ds} listed but absent; rerun the participant level")
    out["session"] = out.get("session", "")
    return out


def read_shard(path: str | Path, modalities: list[str] | None = None, check_finite: bool = True) -> Shard:
    """Read a shard (all modalities, or the listed ones), validating the schema.

    Raises MissingInputError if a requested modality is absent and InputDataError if
    an image holds NaN/Inf (when ``check_finite``).
    """
    attrs = read_attrs(path)
    wanted = list(attrs["modalities"]) if modalities is None else list(modalities)
    absent = [m for m in wanted if m not in attrs["modalities"]]
    if absent:
        raise MissingInputError(f"{path}: modality {absent} not in shard (has {attrs['modalities']}); rerun the participant level with those inputs")
    images = {}
    with h5py.File(path, "r") as h5:
        for m in wanted:
            img = h5[m][...]
            if check_finite and not np.isfinite(img).all():
                raise InputDataError(f"{path}: modality {m} holds {int((~np.isfinite(img)).sum())} NaN/Inf voxels; rerun the participant level")
            images[m] = img
        mask = h5["mask"][...].astype(bool)
    meta = {k: v for k, v in attrs.items() if k not in ("subject", "session", "affine", "modalities", "shape")}
    return Shard(attrs["subject"], attrs["session"], images, mask, np.asarray(attrs["affine"]), meta)
