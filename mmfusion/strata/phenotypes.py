"""Phenotype tables and their factor analysis (group level). See docs/method.md#7-phenotypes-and-statistics.

Loading (:func:`load_phenotypes`)
    Either a user table (``--phenotypes FILE``; ``.csv`` is comma-separated, anything else
    tab-separated) or the BIDS convention: ``participants.tsv`` joined with every
    ``phenotype/*.tsv`` on ``participant_id`` (outer join; a column name present in two
    files is prefixed with the file stem, e.g. ``bp_systolic``). ``n/a``, ``NA``, empty
    and ``NaN`` cells are missing. Labels without ``sub-`` get it. A participant listed
    twice keeps its first row (longitudinal phenotype files: the first session) with a
    warning.

Variable selection and encoding (:func:`prepare_variables`, config ``phenotypes``)
    ``variables: null`` uses every column except ``exclude``. Numeric columns are used as
    they are. Categorical columns are encoded as documented in ``CATEGORICAL_CODES``:
    sex-like values (M/male/man = 1, F/female/woman = 0), handedness-like values
    (R/right = 1, L/left = -1, A/ambidextrous/mixed = 0), yes/no and true/false (1/0); any
    other column with exactly two distinct text values is coded 0/1 in sorted order. Text
    columns with more levels are dropped (logged, listed in the summary) unless named in
    ``variables``, which is an error. A column whose cells are mostly numbers but include
    text (e.g. ``12, 15, ?``) is an error naming the file, column and value. A variable
    with zero variance (or entirely missing) is dropped and reported.

Missing values (``phenotypes.missing``)
    ``median``: each variable's missing cells get that variable's median over the analysed
    subjects; the count per variable is written to ``missing.tsv``. ``drop``: listwise
    deletion; the number of subjects removed is reported. Never silent.

Factor analysis (:func:`factor_analysis`)
    PCA of the standardized variables (correlation matrix), components with eigenvalue >
    ``eigenvalue_threshold`` kept, loadings = eigenvectors * sqrt(eigenvalues), varimax
    rotation (statsmodels ``rotate_factors``), individual scores by the regression method
    ``Z @ R^-1 @ L_rot`` (Z standardized with the population SD, ddof=0, as in
    factor_analyzer). Factors are ordered by explained variance after rotation and signed
    so that their largest-|loading| variable loads positively.

Outputs of :func:`write_outputs` in ``group/phenotypes/``: ``variables.tsv`` (the
encoded, imputed table used), ``missing.tsv``, ``factors.tsv`` (eigenvalue, explained
variance, top variables per factor), ``loadings.tsv``, ``loadings.png`` (|loading| < the
threshold blanked), ``scores.tsv`` (participant_id + one column per factor),
``summary.json`` (counts: subjects, variables used/dropped and why, missing policy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mmfusion.io.atomic import atomic_path, write_json
from mmfusion.report import figures
from mmfusion.errors import InputDataError, MissingInputError
from mmfusion.runlog import get_logger

log = get_logger(__name__)

NA_VALUES = ["n/a", "N/A", "NA", "na", "", "NaN", "nan"]
#: The values of ``phenotypes.missing`` (see "Missing values" above).
MISSING_POLICIES = ("median", "drop")

# Documented encodings of common categorical phenotypes (lower-cased cell -> code).
CATEGORICAL_CODES = {
    "sex": {"m": 1, "male": 1, "man": 1, "f": 0, "female": 0, "woman": 0},
    "handedness": {"r": 1, "right": 1, "l": -1, "left": -1, "a": 0, "ambidextrous": 0, "mixed": 0},
    "boolean": {"yes": 1, "y": 1, "true": 1, "no": 0, "n": 0, "false": 0},
}


class PhenotypeError(InputDataError):
    """A phenotype table that cannot be used as it is (exit code 65)."""


@dataclass
class PhenotypeTable:
    """Encoded, imputed phenotypes: ``data`` (n subjects x p variables, float, indexed by
    participant_id), ``missing`` per-variable counts before imputation, ``summary`` dict."""

    data: pd.DataFrame
    missing: pd.DataFrame
    summary: dict = field(default_factory=dict)


@dataclass
class FactorResult:
    """PCA + varimax: ``loadings`` (p x k), ``scores`` (n x k), ``factors`` (k rows:
    eigenvalue, explained_variance, explained_variance_ratio, top_variables)."""

    loadings: pd.DataFrame
    scores: pd.DataFrame
    factors: pd.DataFrame
    eigenvalues: np.ndarray


# ----------------------------------------------------------------------------- loading
def _read_table(path: Path, keep_duplicates: bool = False) -> pd.DataFrame:
    """One table, text cells, indexed by participant_id (with 'sub-'); first row kept per
    participant unless ``keep_duplicates``."""
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, na_values=NA_VALUES, keep_default_na=False, dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise PhenotypeError(f"{path}: cannot read the table ({type(exc).__name__}); "
                             "save it as tab-separated (.tsv) or comma-separated (.csv) text") from exc
    df.columns = [str(c).strip() for c in df.columns]
    if "participant_id" not in df.columns:
        raise PhenotypeError(f"{path}: no 'participant_id' column (found: {', '.join(df.columns[:8])}); "
                             "add one with the BIDS subject labels, e.g. sub-01")
    df["participant_id"] = df["participant_id"].astype(str).str.strip()
    df["participant_id"] = [p if p.startswith("sub-") else f"sub-{p}" for p in df["participant_id"]]
    if not keep_duplicates and df["participant_id"].duplicated().any():
        dup = int(df["participant_id"].duplicated().sum())
        log.warning("%s: %d repeated participant_id row(s); keeping each participant's first row", path, dup)
        df = df.drop_duplicates("participant_id", keep="first")
    return df.set_index("participant_id")


def load_phenotypes(bids_dir: Path | None = None, phenotypes_file: Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Raw phenotype table (text cells, index participant_id) and the files it came from."""
    if phenotypes_file is not None:
        path = Path(phenotypes_file)
        if not path.is_file():
            raise MissingInputError(f"{path}: phenotype table not found; check --phenotypes")
        return _read_table(path), [path]
    bids_dir = Path(bids_dir)
    files = [bids_dir / "participants.tsv"] if (bids_dir / "participants.tsv").is_file() else []
    files += sorted((bids_dir / "phenotype").glob("*.tsv"))
    if not files:
        raise MissingInputError(f"{bids_dir}: no participants.tsv and no phenotype/*.tsv; add them "
                                "or pass --phenotypes FILE")
    table: pd.DataFrame | None = None
    for path in files:
        df = _read_table(path)
        if table is None:
            table = df
            continue
        clash = [c for c in df.columns if c in table.columns]
        df = df.rename(columns={c: f"{path.stem}_{c}" for c in clash})
        table = table.join(df, how="outer")
    return table, files


@dataclass
class PhenotypeInput:
    """The phenotype tables of a run: ``raw`` (text cells, index participant_id) and the
    ``files`` read, or ``raw`` None and ``skipped`` saying why (no tables in bids_dir)."""

    raw: pd.DataFrame | None
    files: list[Path] = field(default_factory=list)
    skipped: str = ""


def load_phenotype_input(bids_dir: Path, phenotypes_file: Path | None = None) -> PhenotypeInput:
    """``phenotypes_file`` (``--phenotypes``) or participants.tsv + phenotype/*.tsv of
    ``bids_dir``; without ``phenotypes_file`` missing tables only skip the statistics
    (logged), with it they are an error."""
    try:
        raw, files = load_phenotypes(bids_dir, phenotypes_file)
    except MissingInputError as exc:
        if phenotypes_file is not None:
            raise
        log.warning("no phenotypes (%s); skipping factor analysis and statistics", exc)
        return PhenotypeInput(None, skipped=str(exc))
    return PhenotypeInput(raw, files)


def common_subjects(pheno: PhenotypeInput, participants: list[str]) -> tuple[list[str], dict]:
    """Participants (``sub-`` labels) with both an embedding and phenotypes, and the
    counts of :func:`align_subjects`; refuse fewer than 3."""
    common, counts = align_subjects(participants, list(pheno.raw.index))
    if len(common) < 3:
        raise PhenotypeError(f"{pheno.files[0]}: only {len(common)} subject(s) have both an embedding and "
                             "phenotypes; check that participant_id labels match (e.g. sub-01)")
    return common, counts


def check_phenotype_input(pheno: PhenotypeInput, participants: list[str], cfg: dict) -> PhenotypeInput:
    """Run every check the group level's statistics will run on the tables (variables, junk
    cells, missing-value policy, enough subjects) for the ``participants`` that will get
    an embedding (``cfg``: ``config['phenotypes']``); called before any model is trained."""
    if pheno.raw is not None:
        common, _ = common_subjects(pheno, participants)
        prepare_variables(pheno.raw.loc[common], cfg, str(pheno.files[0]), pheno.files)
    return pheno


def locate_cell(files: Sequence[Path], column: str, participant: str) -> tuple[Path, int] | None:
    """(file, line number) of ``participant``'s cell in ``column`` of the joined table
    (``column`` may carry the file-stem prefix :func:`load_phenotypes` adds on a clash);
    None if not found. Reads the files again: meant for error messages only."""
    for path in files:
        df = _read_table(path, keep_duplicates=True)
        names = [column] + ([column[len(path.stem) + 1:]] if column.startswith(f"{path.stem}_") else [])
        rows = [i for i, pid in enumerate(df.index) if pid == participant]
        if rows and any(n in df.columns for n in names):
            return path, rows[0] + 2  # line 1 is the header
    return None


# ------------------------------------------------------------------ selection/encoding
def _encode_text(col: pd.Series) -> pd.Series | None:
    """Documented code for a text column, or None when it is not a usable categorical."""
    values = col.dropna().str.strip().str.lower()
    levels = set(values.unique())
    for codes in CATEGORICAL_CODES.values():
        if levels and levels <= set(codes):
            return col.str.strip().str.lower().map(codes).astype(float)
    if len(levels) == 2:
        order = {v: i for i, v in enumerate(sorted(levels))}
        return col.str.strip().str.lower().map(order).astype(float)
    return None


def prepare_variables(raw: pd.DataFrame, cfg: dict, source: str = "phenotypes",
                      files: Sequence[Path] = ()) -> PhenotypeTable:
    """Select, encode, check and impute the variables (``cfg`` = config ``phenotypes``).

    ``raw``: text cells, one row per participant (only the analysed subjects). Returns a
    :class:`PhenotypeTable` with float data. Raises :class:`PhenotypeError` for junk in a
    numeric column (naming the file and line among ``files``, the tables ``raw`` was
    read from, else ``source``), unknown requested variables, or nothing usable left.
    """
    exclude = set(cfg["exclude"] or []) | {"participant_id"}
    requested = cfg["variables"]
    if requested:
        unknown = [v for v in requested if v not in raw.columns]
        if unknown:
            raise PhenotypeError(f"{source}: phenotypes.variables names unknown column(s) "
                                 f"{', '.join(unknown)}; available: {', '.join(raw.columns[:20])}")
        columns = list(requested)
    else:
        columns = [c for c in raw.columns if c not in exclude]
    data, dropped = {}, {}
    for name in columns:
        col = raw[name]
        numeric = pd.to_numeric(col, errors="coerce")
        junk = col.notna() & numeric.isna()
        if not junk.any():
            data[name] = numeric.astype(float)
            continue
        if numeric.notna().sum() >= junk.sum():
            raise _junk_error(col[junk], name, source, files)
        encoded = _encode_text(col)
        if encoded is None:
            if requested:
                raise PhenotypeError(f"{source}: variable '{name}' is text with {col.nunique()} levels; "
                                     "only numeric and two-level/sex/handedness columns can be used")
            dropped[name] = f"text with {col.nunique()} levels (not encodable)"
            continue
        data[name] = encoded
    df = pd.DataFrame(data, index=raw.index)
    for name in list(df.columns):
        if df[name].notna().sum() == 0:
            dropped[name] = "no values"
        elif df[name].nunique(dropna=True) < 2:
            dropped[name] = "zero variance"
    df = df.drop(columns=[c for c in dropped if c in df.columns])
    for name, why in dropped.items():
        log.warning("%s: variable '%s' dropped: %s", source, name, why)
    if df.shape[1] < 2:
        raise PhenotypeError(f"{source}: {df.shape[1]} usable phenotype variable(s) after checks "
                             f"(dropped: {dropped}); factor analysis needs at least 2")
    return _impute(df, cfg["missing"], dropped, source)


def _junk_error(junk: pd.Series, name: str, source: str, files: Sequence[Path]) -> PhenotypeError:
    """The one-line error for the non-numeric cells ``junk`` of numeric column ``name``."""
    participant = junk.index[0]
    found = locate_cell(files, name, participant) if files else None
    where, line = (str(found[0]), f", line {found[1]}") if found else (source, "")
    return PhenotypeError(f"{where}: column '{name}' is numeric but has non-numeric value '{junk.iloc[0]}' "
                          f"(participant {participant}{line}; {len(junk)} such cell(s)); "
                          "fix it or mark missing values as n/a")


def _impute(df: pd.DataFrame, policy: str, dropped: dict, source: str) -> PhenotypeTable:
    n_missing = df.isna().sum()
    missing = pd.DataFrame({"variable": df.columns, "n_missing": n_missing.to_numpy(int),
                            "fraction_missing": (n_missing / len(df)).to_numpy(float)})
    summary = {"missing_policy": policy, "variables_used": list(df.columns),
               "variables_dropped": dropped, "subjects_in": int(len(df))}
    if policy == "median":
        medians = df.median()
        missing["imputed_value"] = medians.to_numpy(float)
        df = df.fillna(medians)
        summary["cells_imputed"] = int(n_missing.sum())
        log.info("%s: median imputation of %d missing cell(s) in %d variable(s)", source,
                 int(n_missing.sum()), int((n_missing > 0).sum()))
    elif policy == "drop":
        keep = df.notna().all(axis=1)
        summary["subjects_dropped_missing"] = sorted(df.index[~keep])
        log.info("%s: listwise deletion removed %d of %d subject(s)", source, int((~keep).sum()), len(df))
        df = df[keep]
        if len(df) < 3:
            raise PhenotypeError(f"{source}: listwise deletion left {len(df)} subject(s); "
                                 "set phenotypes.missing: median or choose fewer variables")
    else:
        raise PhenotypeError(f"{source}: phenotypes.missing must be one of {MISSING_POLICIES}, got '{policy}'")
    constant = [c for c in df.columns if df[c].nunique() < 2]
    for c in constant:
        dropped[c] = "zero variance after missing-value handling"
    df = df.drop(columns=constant)
    summary["subjects_used"] = int(len(df))
    summary["variables_used"] = list(df.columns)
    return PhenotypeTable(data=df.astype(float), missing=missing, summary=summary)


# ------------------------------------------------------------------------ alignment
def align_subjects(embedding_ids: list[str], pheno_ids: list[str]) -> tuple[list[str], dict]:
    """Subjects present in both (in embedding order) and the counts of those in only one."""
    pheno_set = set(pheno_ids)
    emb_set = set(embedding_ids)
    common = [s for s in dict.fromkeys(embedding_ids) if s in pheno_set]
    counts = {"embeddings": len(emb_set), "phenotypes": len(pheno_set), "both": len(common),
              "only_embeddings": sorted(emb_set - pheno_set), "only_phenotypes": sorted(pheno_set - emb_set)}
    if counts["only_embeddings"]:
        log.warning("%d subject(s) have embeddings but no phenotypes (left out of the statistics): %s",
                    len(counts["only_embeddings"]), " ".join(counts["only_embeddings"][:20]))
    if counts["only_phenotypes"]:
        log.info("%d subject(s) have phenotypes but no embedding (ignored)", len(counts["only_phenotypes"]))
    return common, counts


# ------------------------------------------------------------------- factor analysis
def standardize(X: np.ndarray) -> np.ndarray:
    """(X - mean) / SD per column, SD with ddof=0. X (n, p) -> (n, p)."""
    X = np.asarray(X, dtype=np.float64)
    return (X - X.mean(axis=0)) / X.std(axis=0)


def factor_analysis(data: pd.DataFrame, eigenvalue_threshold: float = 1.0) -> FactorResult:
    """PCA (correlation matrix) + varimax; regression-method scores. data (n, p) floats."""
    from statsmodels.multivariate.factor_rotation import rotate_factors

    Z = standardize(data.to_numpy())
    corr = np.corrcoef(Z, rowvar=False)
    eigval, eigvec = np.linalg.eigh(corr)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    k = int(np.sum(eigval > eigenvalue_threshold))
    k = max(k, 1)
    loadings = eigvec[:, :k] * np.sqrt(eigval[:k])
    if k > 1:
        loadings, _ = rotate_factors(loadings, "varimax", tol=1e-10, max_tries=5000)
    ss = (loadings ** 2).sum(axis=0)
    order = np.argsort(-ss, kind="stable")
    loadings, ss = loadings[:, order], ss[order]
    signs = np.sign(loadings[np.abs(loadings).argmax(axis=0), np.arange(k)])
    loadings = loadings * np.where(signs == 0, 1, signs)
    weights = np.linalg.lstsq(corr, loadings, rcond=None)[0]   # R^-1 L (least squares if singular)
    scores = Z @ weights
    names = [f"F{i + 1}" for i in range(k)]
    variables = list(data.columns)
    top = [", ".join(np.array(variables)[np.argsort(-np.abs(loadings[:, i]))[:3]]) for i in range(k)]
    factors = pd.DataFrame({"factor": names, "eigenvalue": eigval[:k], "explained_variance": ss,
                            "explained_variance_ratio": ss / len(variables), "top_variables": top})
    return FactorResult(loadings=pd.DataFrame(loadings, index=variables, columns=names),
                        scores=pd.DataFrame(scores, index=data.index, columns=names),
                        factors=factors, eigenvalues=eigval)


# --------------------------------------------------------------------------- outputs
def write_outputs(table: PhenotypeTable, fa: FactorResult, out_dir: Path, threshold: float = 0.3,
                  extra_summary: dict | None = None) -> dict[str, Path]:
    """Write the phenotype tables and the loadings heat map into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {k: out_dir / v for k, v in {
        "variables": "variables.tsv", "missing": "missing.tsv", "factors": "factors.tsv",
        "loadings": "loadings.tsv", "loadings_png": "loadings.png", "scores": "scores.tsv",
        "summary": "summary.json"}.items()}
    for key, df, index in [("variables", table.data, True), ("missing", table.missing, False),
                           ("factors", fa.factors, False), ("loadings", fa.loadings, True),
                           ("scores", fa.scores, True)]:
        with atomic_path(paths[key]) as tmp:
            df.to_csv(tmp, sep="\t", index=index, index_label="variable" if key == "loadings" else "participant_id",
                      float_format="%.6g", na_rep="n/a")
    figures.plot_loadings(fa.loadings, threshold, paths["loadings_png"])
    summary = dict(table.summary)
    summary["n_factors"] = int(fa.loadings.shape[1])
    summary["total_explained_variance_ratio"] = float(fa.factors["explained_variance_ratio"].sum())
    summary.update(extra_summary or {})
    write_json(paths["summary"], summary)
    return paths
