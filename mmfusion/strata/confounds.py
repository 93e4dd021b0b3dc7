"""Are the strata explained by confounds? Age, sex, site/scanner, head size, registration quality.

Three steps, science in the middle and I/O at the edges:

- :func:`collect_confounds` reads one value per subject/session and confound from the
  BIDS dataset (``participants.tsv``, the T1w JSON sidecars) and from the participant
  level's outputs (the affine registration transform, the shard's QC attribute);
- :func:`test_confounds` tests each confound against the cluster labels (Kruskal-Wallis
  for numeric confounds, chi-squared for categorical ones), with an effect size and
  Benjamini-Hochberg q-values across the confounds tested;
- :func:`write_outputs` writes both tables; :func:`flagged` turns the significant
  confounds into one-line warnings for the report.

Head size (``head_scale``): the registration's affine transform (fixed = template,
moving = subject, ANTs/ITK convention) maps template coordinates (mm) to subject
coordinates (mm), so a template volume ``V`` corresponds to a subject volume
``|det A| V``, ``A`` the 3x3 linear part. ``head_scale = |det A| ** (1/3)`` is the
subject/template linear size ratio: > 1 when the subject's head is larger than the
template (the inverse of FreeSurfer's atlas scaling factor).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from mmfusion.io.atomic import atomic_path
from mmfusion.io.bids import subject_folder, subject_stem
from mmfusion.io.derivatives import subject_dir
from mmfusion.errors import MmfusionError
from mmfusion.runlog import get_logger
from mmfusion.io.shards import read_attrs, shard_path
from mmfusion.strata.stats import fdr

log = get_logger(__name__)

PARTICIPANT_NUMERIC = ("age",)
PARTICIPANT_CATEGORICAL = ("sex", "site", "scanner", "center", "centre")
SIDECAR_KEYS = ("Manufacturer", "ManufacturersModelName", "StationName", "MagneticFieldStrength")
ID_COLUMNS = ("participant_id", "session")
KW, CHI2, NOT_RUN = "Kruskal-Wallis", "chi-squared", "not run"
EPSILON2, CRAMERS_V = "epsilon^2", "Cramér's V"
TEST_COLUMNS = ("confound", "kind", "test", "n", "statistic", "effect_size", "effect_measure",
                "p", "q", "significant")


# --------------------------------------------------------------------------- collect
def _sub_id(value) -> str:
    value = str(value).strip()
    return value if value.startswith("sub-") else f"sub-{value}"


def _participants(bids_dir: Path) -> pd.DataFrame:
    """participants.tsv as a frame indexed by 'sub-X', with the confound columns (lower-case names)."""
    path = bids_dir / "participants.tsv"
    if not path.is_file():
        log.info("confounds: no %s; age, sex and site columns not collected", path)
        return pd.DataFrame()
    raw = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a", "N/A", ""], keep_default_na=False)
    if "participant_id" not in raw.columns:
        log.warning("confounds: %s has no participant_id column; not used", path)
        return pd.DataFrame()
    raw.index = [_sub_id(v) for v in raw["participant_id"]]
    if raw.index.duplicated().any():
        log.warning("confounds: %s lists %s more than once; the first row is used", path,
                    sorted(set(raw.index[raw.index.duplicated()])))
        raw = raw[~raw.index.duplicated()]
    by_lower = {c.lower(): c for c in raw.columns}
    out = {}
    for name in PARTICIPANT_NUMERIC:
        if name in by_lower:
            out[name] = pd.to_numeric(raw[by_lower[name]], errors="coerce")
    for name in PARTICIPANT_CATEGORICAL:
        if name in by_lower:
            out[name] = raw[by_lower[name]].str.strip()
    return pd.DataFrame(out, index=raw.index)


def _sidecar_value(value) -> str | None:
    """A sidecar value as a categorical level: numbers without a trailing '.0' (3 and 3.0 are one level)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{float(value):g}"
    return str(value).strip() or None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("confounds: cannot read %s (%s); ignored", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _t1w_sidecar(bids_dir: Path, participant_id: str, session: str) -> dict:
    """The T1w sidecar of one subject/session, with BIDS inheritance from the dataset root.

    Reads ``bids_dir/T1w.json``, then ``sub-X[_ses-Y]_T1w.json`` at the subject and
    session levels, then the first (sorted) ``anat/*_T1w.json``; later files win.
    """
    stem = subject_stem(participant_id.removeprefix("sub-"), session)
    sub_dir = bids_dir / participant_id
    ses_dir = bids_dir / subject_folder(participant_id.removeprefix("sub-"), session)
    candidates = [bids_dir / "T1w.json", sub_dir / f"{participant_id}_T1w.json"]
    if session:
        candidates.append(ses_dir / f"{stem}_T1w.json")
    anat = sorted((ses_dir / "anat").glob(f"{stem}*_T1w.json"))
    if len(anat) > 1:
        log.info("confounds: %s has %d T1w sidecars; using %s", stem, len(anat), anat[0].name)
    merged: dict = {}
    for path in [p for p in candidates if p.is_file()] + anat[:1]:
        merged.update(_read_json(path))
    return merged


def head_scale(affine_mat: Path) -> float:
    """Cube root of |det| of the 3x3 linear part of an ANTs affine ``.mat`` (dimensionless).

    The transform maps template mm to subject mm (fixed = template), so the value is the
    subject/template linear size ratio (> 1: the head is larger than the template).
    """
    import ants

    params = np.asarray(ants.read_transform(str(affine_mat)).parameters, dtype=float)
    if params.size < 9:
        raise ValueError(f"{affine_mat}: {params.size} parameters, not a 3-D affine transform")
    return float(abs(np.linalg.det(params[:9].reshape(3, 3))) ** (1.0 / 3.0))


def _head_scale(output_dir: Path, participant_id: str, session: str) -> float:
    folder = subject_dir(output_dir, participant_id.removeprefix("sub-"), session)
    stem = subject_stem(participant_id.removeprefix("sub-"), session)
    mats = sorted(folder.glob(f"{stem}_*desc-affine_xfm.mat"))
    if not mats:
        return math.nan
    if len(mats) > 1:
        log.info("confounds: %s has %d affine transforms; head size from %s", stem, len(mats), mats[0].name)
    try:
        return head_scale(mats[0])
    except Exception as exc:  # an unreadable transform: that value is unknown, the rest goes on
        log.warning("confounds: cannot read %s (%s); head_scale unknown for %s", mats[0], exc, stem)
        return math.nan


def _similarity(output_dir: Path, participant_id: str, session: str) -> float:
    path = shard_path(output_dir, participant_id.removeprefix("sub-"), session)
    if not path.is_file():
        return math.nan
    try:
        value = read_attrs(path).get("qc", {}).get("similarity_t1_template")
    except MmfusionError as exc:
        log.warning("confounds: %s; registration_similarity unknown", exc)
        return math.nan
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _drop_uninformative(df: pd.DataFrame) -> pd.DataFrame:
    """Drop confound columns that are entirely missing or constant (logged)."""
    drop = []
    for col in df.columns:
        if col in ID_COLUMNS:
            continue
        levels = df[col].dropna().nunique()
        if levels == 0:
            drop.append(col)
            log.info("confounds: %s dropped (missing for every subject)", col)
        elif levels == 1:
            drop.append(col)
            log.info("confounds: %s dropped (constant: %s)", col, df[col].dropna().iloc[0])
    return df.drop(columns=drop)


def collect_confounds(bids_dir: Path, output_dir: Path, keys: list[tuple[str, str]]) -> pd.DataFrame:
    """Confound values per subject/session, in ``keys`` order.

    ``keys``: ``(participant_id, session)`` pairs, participant_id ``'sub-X'`` (the prefix
    is added if missing), session ``''`` or its label without ``'ses-'``. Returns a frame
    with a RangeIndex, columns ``participant_id``, ``session``, then the confounds found:

    - ``age`` (float, years as in participants.tsv), ``sex`` and any of ``site``,
      ``scanner``, ``center``, ``centre`` (str) from ``bids_dir/participants.tsv``
      (column names matched case-insensitively; a subject's values apply to all its sessions);
    - ``Manufacturer``, ``ManufacturersModelName``, ``StationName``,
      ``MagneticFieldStrength`` (str; numbers as ``'3'``, ``'1.5'``) from the T1w
      sidecar, when present for at least one subject;
    - ``head_scale`` (float, dimensionless): subject/template linear size ratio from
      ``output_dir/sub-X[/ses-Y]/anat/*_desc-affine_xfm.mat`` (see the module docstring);
    - ``registration_similarity`` (float): the shard's ``qc['similarity_t1_template']``.

    Unknown values are NaN (numeric) or None (categorical). Columns that are constant or
    entirely missing are dropped (logged).
    """
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    keys = [(_sub_id(p), str(s or "").removeprefix("ses-")) for p, s in keys]
    part = _participants(bids_dir)
    missing = sorted({p for p, _ in keys} - set(part.index)) if not part.empty else []
    if missing:
        log.warning("confounds: %d subject(s) not in participants.tsv (%s)", len(missing), ", ".join(missing[:5]))
    rows = []
    for pid, ses in keys:
        row: dict = {"participant_id": pid, "session": ses}
        for col in part.columns:
            row[col] = part.at[pid, col] if pid in part.index else None
        sidecar = _t1w_sidecar(bids_dir, pid, ses)
        for key in SIDECAR_KEYS:
            row[key] = _sidecar_value(sidecar.get(key))
        row["head_scale"] = _head_scale(output_dir, pid, ses)
        row["registration_similarity"] = _similarity(output_dir, pid, ses)
        rows.append(row)
    columns = [*ID_COLUMNS, *part.columns, *SIDECAR_KEYS, "head_scale", "registration_similarity"]
    df = pd.DataFrame(rows, columns=columns)
    for col in part.columns:
        if col in PARTICIPANT_NUMERIC:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
        else:
            df[col] = df[col].astype(object).where(df[col].notna(), None)
    for col in SIDECAR_KEYS:
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    df = _drop_uninformative(df)
    log.info("confounds: %d rows, columns %s", len(df), [c for c in df.columns if c not in ID_COLUMNS])
    return df.reset_index(drop=True)


# ------------------------------------------------------------------------------ test
def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def _kruskal(values: np.ndarray, labels: np.ndarray) -> tuple[float, float, float] | None:
    """(H, epsilon^2 = H / (n - 1), p), or None when fewer than 2 clusters or all values tie."""
    groups = [values[labels == g] for g in np.unique(labels)]
    if len(groups) < 2 or np.unique(values).size < 2:
        return None
    res = sps.kruskal(*groups)
    n = values.size
    return float(res.statistic), float(res.statistic) / (n - 1), float(res.pvalue)


def _chi2(values: np.ndarray, labels: np.ndarray) -> tuple[float, float, float] | None:
    """(chi2, Cramér's V, p) on the cluster x level table; None with < 2 clusters or levels.

    No Yates correction, so V is 1 for a perfect association even in a 2 x 2 table. The
    p-value is the asymptotic one (optimistic when expected counts are below ~5).
    """
    table = pd.crosstab(labels, values)
    if min(table.shape) < 2:
        return None
    chi2, p, _, _ = sps.chi2_contingency(table.to_numpy(), correction=False)
    n = int(table.to_numpy().sum())
    v = math.sqrt(chi2 / (n * (min(table.shape) - 1)))
    return float(chi2), float(v), float(p)


def test_confounds(confounds: pd.DataFrame, labels: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
    """Test every confound column of ``confounds`` against the cluster ``labels``.

    ``labels``: (n,) int, the cluster of each row of ``confounds`` (several rows per
    participant, one per session, are each used). Per confound (rows with a missing value
    dropped): numeric columns get a Kruskal-Wallis test (effect size epsilon^2 =
    H / (n - 1), 0..1), other columns a chi-squared test of the cluster x level table
    (``scipy.stats.chi2_contingency``, no continuity correction; effect size Cramér's V,
    0..1). With fewer than 2 clusters or 2 distinct values among the rows used the test
    is ``'not run'`` (statistic, effect size, p, q NaN). ``q``: Benjamini-Hochberg over the
    confounds actually tested; ``significant`` is ``q < alpha``.

    Returns one row per confound, columns ``confound``, ``kind`` ('numeric' |
    'categorical'), ``test``, ``n``, ``statistic``, ``effect_size``, ``effect_measure``,
    ``p``, ``q``, ``significant``.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(confounds),):
        raise ValueError(f"labels has shape {labels.shape}; expected ({len(confounds)},), one per confound row")
    rows = []
    for col in [c for c in confounds.columns if c not in ID_COLUMNS]:
        series = confounds[col]
        numeric = _is_numeric(series)
        used = series.notna().to_numpy()
        values, lab = series.to_numpy()[used], labels[used]
        if numeric:
            result = _kruskal(values.astype(float), lab)
        else:
            result = _chi2(np.array([str(v) for v in values], dtype=object), lab)
        stat, effect, p = result if result is not None else (math.nan, math.nan, math.nan)
        rows.append({"confound": col, "kind": "numeric" if numeric else "categorical",
                     "test": NOT_RUN if result is None else (KW if numeric else CHI2),
                     "n": int(used.sum()), "statistic": stat, "effect_size": effect,
                     "effect_measure": EPSILON2 if numeric else CRAMERS_V, "p": p,
                     "q": math.nan, "significant": False})
    out = pd.DataFrame(rows, columns=list(TEST_COLUMNS))
    tested = (out["test"] != NOT_RUN).to_numpy()
    if tested.any():
        _, q = fdr(out.loc[tested, "p"].to_numpy(dtype=float), alpha)
        out.loc[tested, "q"] = q
        out.loc[tested, "significant"] = q < alpha
    out["significant"] = out["significant"].astype(bool)
    out["n"] = out["n"].astype(int)
    for row in out.itertuples():
        log.info("confounds: %s %s n=%d %s=%.3g p=%.3g q=%.3g", row.confound, row.test, row.n,
                 row.effect_measure, row.effect_size, row.p, row.q)
    return out


# ------------------------------------------------------------------------ outputs
def write_outputs(confounds: pd.DataFrame, tests: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/confounds.tsv`` (values) and ``out_dir/confound_tests.tsv`` atomically.

    Missing values are written as ``n/a``, floats with 6 significant digits. Returns
    ``{'values': path, 'tests': path}``.
    """
    out_dir = Path(out_dir)
    paths = {"values": out_dir / "confounds.tsv", "tests": out_dir / "confound_tests.tsv"}
    for key, df in (("values", confounds), ("tests", tests)):
        with atomic_path(paths[key]) as tmp:
            df.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g", lineterminator="\n")
    return paths


def flagged(tests: pd.DataFrame) -> list[str]:
    """One line per significant confound (smallest q first), for the report's key results.

    e.g. ``"site: chi-squared, Cramér's V 0.92, q = 0.0003 — the strata may reflect site
    rather than biology"``.
    """
    sig = tests[tests["significant"].astype(bool)].sort_values("q")
    return [f"{r.confound}: {r.test}, {r.effect_measure} {r.effect_size:.2f}, q = {r.q:.2g} "
            f"— the strata may reflect {r.confound} rather than biology" for r in sig.itertuples()]


test_confounds.__test__ = False  # a library function, not a pytest test
