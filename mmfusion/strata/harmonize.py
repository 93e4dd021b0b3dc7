"""Optional harmonization of the embeddings across sites before clustering (ComBat).

:func:`harmonize` removes the additive and multiplicative effect of a site (scanner,
manufacturer, ...) from every embedding dimension with neuroHarmonize's ComBat
(Johnson et al. 2007; Fortin et al. 2018; Pomponio et al. 2020): the location/scale
model is fitted on the training rows only (``harmonizationLearn``) and then applied,
unchanged, to all rows (``harmonizationApply``), so a row outside the training set
changes no fitted parameter and no other row's result. Numeric covariates (e.g. age)
enter ComBat's design matrix, so their effects are preserved.

:func:`harmonize_for_clustering` is the config-driven wrapper for the group level
(``stratify.harmonize_site``, ``stratify.harmonize_covariates``; off by default). It
removes site differences also where a site coincides with a biological stratum, so it
is no substitute for a balanced design (docs/method.md, section 6, Confounds).

ComBat needs every site to have at least 2 training rows (a within-site variance) and
fails on columns without variance (division by a zero pooled or within-site variance).
Embedding dimensions that are constant on the training rows, or within one site's
training rows (e.g. a dead ReLU unit), are therefore left out of the fit and returned
unchanged. neuroHarmonize's ``print`` output and Python warnings go to our log.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import pandas as pd

from mmfusion.errors import ConfigError, InputDataError
from mmfusion.runlog import get_logger

log = get_logger(__name__)

#: The site column of neuroHarmonize's covariate table (its convention).
SITE = "SITE"


def _site_labels(sites: np.ndarray, n: int) -> np.ndarray:
    """``sites`` as an (n,) array of str; missing labels (None/NaN/'') refused."""
    sites = np.asarray(sites, dtype=object).reshape(-1)
    if sites.shape[0] != n:
        raise InputDataError(f"harmonize: {sites.shape[0]} site labels for {n} embedding rows")
    missing = [i for i, s in enumerate(sites) if s is None or (isinstance(s, float) and np.isnan(s)) or str(s) == ""]
    if missing:
        raise InputDataError(f"harmonize: {len(missing)} row(s) without a site label (rows {missing[:5]})")
    return np.array([str(s) for s in sites], dtype=object)


def _covariate_matrix(covariates: pd.DataFrame | None, n: int, train: np.ndarray) -> pd.DataFrame:
    """The numeric covariates as an (n, k) float frame (k = 0 when None); checked."""
    if covariates is None:
        return pd.DataFrame(index=range(n))
    if len(covariates) != n:
        raise InputDataError(f"harmonize: covariates have {len(covariates)} rows for {n} embedding rows")
    if SITE in covariates.columns:
        raise InputDataError(f"harmonize: pass the site labels as `sites`, not as a covariate column {SITE!r}")
    out = pd.DataFrame(index=range(n))
    for col in covariates.columns:
        values = pd.to_numeric(pd.Series(np.asarray(covariates[col], dtype=object)), errors="coerce").astype(float)
        bad = np.flatnonzero(~np.isfinite(values.to_numpy()))
        if bad.size:
            raise InputDataError(f"harmonize: covariate {col!r} is missing or not numeric in {bad.size} row(s) "
                                 f"(rows {bad[:5].tolist()}); ComBat needs a number for every row")
        if np.ptp(values.to_numpy()[train]) == 0:
            raise InputDataError(f"harmonize: covariate {col!r} is constant on the training rows; "
                                 "it cannot be preserved (drop it from the covariates)")
        out[str(col)] = values.to_numpy()
    return out


def _informative_columns(X: np.ndarray, codes: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(d,) bool: columns that vary on the training rows and within every training site."""
    keep = np.ptp(X[train], axis=0) > 0
    for code in np.unique(codes[train]):
        keep &= np.ptp(X[train & (codes == code)], axis=0) > 0
    return keep


@contextlib.contextmanager
def _into_log(what: str):
    """neuroHarmonize's/neuroCombat's ``print`` lines and Python warnings -> our log (DEBUG; other warnings WARNING)."""
    buffer = io.StringIO()
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buffer):
            warnings.simplefilter("always")
            yield
    finally:  # also when the fit fails: its messages explain why
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("harmonize (%s): %s", what, line.strip())
        for w in caught or []:
            # neuroHarmonize's np.matrix use raises PendingDeprecationWarning on every fit: not news
            level = logging.DEBUG if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)) else logging.WARNING
            log.log(level, "harmonize (%s): %s: %s", what, w.category.__name__, w.message)


def harmonize(X: np.ndarray, sites: np.ndarray, train: np.ndarray,
              covariates: pd.DataFrame | None = None) -> np.ndarray:
    """ComBat-harmonize the embeddings ``X`` across ``sites``, fitted on the ``train`` rows.

    Parameters
    ----------
    X : (n, d) float array
        Embeddings, one row per subject/session.
    sites : (n,) array
        Site (scanner, manufacturer, ...) label per row; compared as str.
    train : (n,) bool array
        The rows ComBat is fitted on (``harmonizationLearn``); the fitted model is then
        applied to all n rows (``harmonizationApply``). Rows outside ``train`` do not
        change the model, so they change no training row's result.
    covariates : (n, k) DataFrame, optional
        Numeric columns (e.g. age) whose effects ComBat preserves (they enter its design
        matrix). Row order as ``X``; the index is ignored.

    Returns
    -------
    (n, d) float64 array
        The harmonized embeddings. Columns that are constant on the training rows or
        within one site's training rows are left out of the fit and returned unchanged.

    Raises
    ------
    InputDataError
        Shapes disagree; a site label, a covariate value or an embedding value is missing
        or not finite; fewer than 2 sites among the training rows; a site with fewer than
        2 training rows; a row whose site has no training row (ComBat has no parameters
        for it); a covariate constant on the training rows.
    """
    from neuroHarmonize import harmonizationApply, harmonizationLearn

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise InputDataError(f"harmonize: the embedding must be (n, d), got shape {X.shape}")
    n, d = X.shape
    if not np.all(np.isfinite(X)):
        raise InputDataError("harmonize: the embedding has NaN or infinite values")
    train = np.asarray(train, dtype=bool).reshape(-1)
    if train.shape[0] != n:
        raise InputDataError(f"harmonize: `train` has {train.shape[0]} values for {n} embedding rows")
    labels = _site_labels(sites, n)
    train_levels, train_counts = np.unique(labels[train], return_counts=True)
    unseen = sorted(set(labels) - set(train_levels))
    if unseen:
        raise InputDataError(f"harmonize: site {unseen[0]!r} has no training row ("
                             f"{int(np.sum(labels == unseen[0]))} row(s)); ComBat cannot harmonize a site it "
                             f"was not fitted on (training sites: {', '.join(train_levels)})")
    if len(train_levels) < 2:
        raise InputDataError(f"harmonize: the training rows have {len(train_levels)} site(s) "
                             f"({', '.join(train_levels) or 'none'}); harmonization needs at least 2")
    small = [(s, c) for s, c in zip(train_levels, train_counts) if c < 2]
    if small:
        raise InputDataError(f"harmonize: site {small[0][0]!r} has {small[0][1]} training row(s); ComBat needs "
                             "at least 2 per site (a within-site variance): merge or drop that site")
    covars = _covariate_matrix(covariates, n, train)
    # Integer site codes (sorted training levels): neuroHarmonize's label handling then does
    # not depend on the pandas string dtype.
    codes = np.searchsorted(train_levels, labels).astype(int)
    keep = _informative_columns(X, codes, train)
    if not keep.any():
        log.warning("harmonize: no embedding column varies within every training site; nothing harmonized")
        return X.copy()
    if not keep.all():
        log.info("harmonize: %d of %d embedding column(s) constant on the training rows or within a site: "
                 "left unchanged", int(d - keep.sum()), d)
    table = pd.concat([pd.DataFrame({SITE: codes}), covars], axis=1)
    with _into_log("fit"):
        # seed=0: neuroHarmonize 2.4.x re-seeds NumPy's global generator from entropy when
        # seed is None; without smoothing terms the fit is deterministic anyway
        model, _ = harmonizationLearn(X[train][:, keep], table[train].reset_index(drop=True), seed=0)
    with _into_log("apply"):
        adjusted = harmonizationApply(X[:, keep], table, model)
    adjusted = np.asarray(adjusted, dtype=np.float64)
    if not np.all(np.isfinite(adjusted)):
        raise InputDataError("harmonize: ComBat returned NaN or infinite values (near-constant embedding "
                             "columns within a site?)")
    out = X.copy()
    out[:, keep] = adjusted
    log.info("harmonize: ComBat over %d site(s) (%s), %d training row(s) of %d, %d column(s)%s",
             len(train_levels), ", ".join(f"{s}: {c}" for s, c in zip(train_levels, train_counts)),
             int(train.sum()), n, int(keep.sum()),
             f", covariates {', '.join(covars.columns)}" if len(covars.columns) else "")
    return out


def harmonize_for_clustering(X: np.ndarray, confounds: pd.DataFrame, cfg: dict,
                             train: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The embedding to cluster: ``X`` harmonized when ``stratify.harmonize_site`` is set.

    Parameters
    ----------
    X : (n, d) float array
        The embedding, rows aligned with ``confounds``.
    confounds : (n, 2 + c) DataFrame
        :func:`mmfusion.strata.confounds.collect_confounds`' table: ``participant_id``,
        ``session``, then the confound columns (e.g. ``site``, ``age``).
    cfg : dict
        The ``stratify`` config section (``harmonize_site``: a column name or None;
        ``harmonize_covariates``: a list of numeric column names).
    train : (n,) bool array, optional
        The rows ComBat is fitted on; None = all rows (the final model's embedding, where
        every subject is a training subject).

    Returns
    -------
    (X, info)
        ``X`` unchanged and ``{'status': 'off'}`` when ``harmonize_site`` is null; else the
        harmonized (n, d) array and ``{'status': 'done', 'site_column': str, 'sites':
        {level: rows}, 'covariates': [str], 'n_train': int}``.

    Raises
    ------
    ConfigError
        A configured column is not in ``confounds`` (collect_confounds drops columns that
        are constant or missing for every subject), or a covariate is not numeric.
    InputDataError
        As :func:`harmonize` (site missing for a subject, unseen site, ...).
    """
    site_col = cfg.get("harmonize_site")
    if site_col is None:
        return X, {"status": "off"}
    covariates = list(cfg.get("harmonize_covariates") or [])
    available = [c for c in confounds.columns if c not in ("participant_id", "session")]
    for key, col in [("harmonize_site", site_col)] + [("harmonize_covariates", c) for c in covariates]:
        if col not in available:
            raise ConfigError(f"stratify.{key}: {col!r} is not a confound column; available: "
                              f"{', '.join(available) or 'none'} (columns constant or missing for every "
                              "subject are dropped)")
    for col in covariates:
        if col == site_col:
            raise ConfigError(f"stratify.harmonize_covariates: {col!r} is the site column (stratify.harmonize_site)")
        if not (pd.api.types.is_numeric_dtype(confounds[col]) and not pd.api.types.is_bool_dtype(confounds[col])):
            raise ConfigError(f"stratify.harmonize_covariates: {col!r} is not numeric; ComBat preserves numeric "
                              "covariates only")
    if len(confounds) != len(X):
        raise InputDataError(f"harmonize: {len(confounds)} confound rows for {len(X)} embedding rows")
    n = len(X)
    train = np.ones(n, dtype=bool) if train is None else np.asarray(train, dtype=bool)
    site_values = confounds[site_col].to_numpy(dtype=object)
    missing = [i for i, s in enumerate(site_values) if s is None or (isinstance(s, float) and np.isnan(s))]
    if missing:
        who = [f"{confounds['participant_id'].iloc[i]}"
               + (f" ses-{confounds['session'].iloc[i]}" if "session" in confounds and confounds['session'].iloc[i]
                  else "") for i in missing[:5]] if "participant_id" in confounds else [str(i) for i in missing[:5]]
        raise InputDataError(f"harmonize: {site_col!r} is missing for {len(missing)} row(s) ({', '.join(who)}); "
                             "ComBat needs a site for every subject")
    sites = np.array([str(s) for s in site_values], dtype=object)
    cov = confounds[covariates].reset_index(drop=True) if covariates else None
    Xh = harmonize(X, sites, train, cov)
    levels, counts = np.unique(sites, return_counts=True)
    return Xh, {"status": "done", "site_column": site_col,
                "sites": {str(s): int(c) for s, c in zip(levels, counts)},
                "covariates": covariates, "n_train": int(train.sum())}
