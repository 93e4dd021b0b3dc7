"""The embeddings tables: ``group/embeddings.tsv`` (and ``.h5``) written by the group-level
learning, read back by a re-analysis and by the baseline check.

TSV: ``participant_id``, ``session`` (empty or ``n/a`` when the dataset has no sessions),
then ``emb_0000``... floats, one row per subject-session; written with ``%.9g`` for float32
values and ``%.17g`` for float64 ones (the PCA baseline), so every value reads back exactly. HDF5: ``participant_id`` (n,), ``session`` (n,) strings and
``embedding`` (n, D) float32, attrs ``modalities`` (JSON) and ``seed``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mmfusion.errors import InputDataError, MissingInputError
from mmfusion.io.atomic import atomic_path, write_text

EXACT_FORMATS = {np.dtype(np.float32): "%.9g", np.dtype(np.float64): "%.17g"}  # digits that read back exactly


def embedding_frame(ids: pd.DataFrame, values: np.ndarray, prefix: str = "emb") -> pd.DataFrame:
    """participant_id, session, then ``<prefix>_0000`` ... columns (one row per row of ``ids``)."""
    frame = pd.DataFrame(values, columns=[f"{prefix}_{j:04d}" for j in range(values.shape[1])])
    frame.insert(0, "session", list(ids["session"]))
    frame.insert(0, "participant_id", list(ids["participant_id"]))
    return frame


def write_embeddings_tsv(path: Path, ids: pd.DataFrame, values: np.ndarray, prefix: str = "emb") -> Path:
    """``ids`` + ``values`` (n, D) float32 or float64 -> ``path`` (TSV, see the module docstring)."""
    values = np.asarray(values)
    frame = embedding_frame(ids, values, prefix)
    write_text(path, frame.to_csv(sep="\t", index=False, float_format=EXACT_FORMATS.get(values.dtype, "%.17g"), na_rep="n/a"))
    return Path(path)


def write_ids(h5, ids: pd.DataFrame) -> None:
    """``participant_id`` and ``session`` string datasets of an open HDF5 file."""
    import h5py

    for key in ("participant_id", "session"):
        h5.create_dataset(key, data=np.array(list(ids[key]), dtype=object), dtype=h5py.string_dtype())


def write_embeddings_h5(path: Path, ids: pd.DataFrame, values: np.ndarray, modalities: Sequence[str],
                        seed: int) -> Path:
    """``ids`` + ``values`` (n, D) float32 -> ``path`` (HDF5, see the module docstring)."""
    import h5py

    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            write_ids(h5, ids)
            h5.create_dataset("embedding", data=values)
            h5.attrs["modalities"] = json.dumps(list(modalities))
            h5.attrs["seed"] = seed
    return Path(path)


def read_embeddings(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(ids with participant_id and session ('' when none), X (n, d) float64)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: embeddings table not found; run the group-level training first")
    df = pd.read_csv(path, sep="\t", dtype={"participant_id": str, "session": str}, keep_default_na=False)
    if "participant_id" not in df.columns:
        raise InputDataError(f"{path}: no 'participant_id' column; the embeddings TSV must start with "
                             "participant_id, session, emb_0000...")
    emb_cols = [c for c in df.columns if c.startswith("emb_")]
    if not emb_cols:
        raise InputDataError(f"{path}: no emb_* columns; regenerate the embeddings")
    X = df[emb_cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(X).all():
        bad = df["participant_id"][~np.isfinite(X).all(axis=1)].tolist()
        raise InputDataError(f"{path}: non-finite embedding values for {', '.join(bad[:5])}; "
                             "regenerate the embeddings (check the model for NaNs)")
    session = df["session"] if "session" in df.columns else pd.Series([""] * len(df))
    session = session.fillna("").astype(str).replace({"n/a": "", "nan": ""})
    pid = [p if p.startswith("sub-") else f"sub-{p}" for p in df["participant_id"].astype(str).str.strip()]
    ids = pd.DataFrame({"participant_id": pid, "session": session.to_numpy()})
    if ids.duplicated().any():
        raise InputDataError(f"{path}: repeated participant_id/session rows; regenerate the embeddings")
    return ids, X
