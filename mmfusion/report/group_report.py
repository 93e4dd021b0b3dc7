"""The group-level HTML report: one self-contained file, read top to bottom.

:func:`write_report` gathers whatever group outputs exist under ``output_dir`` and writes
``output_dir/mmfusion_report.html``. Figures are embedded as base64 PNG and styles are
inline, so the file can be mailed or archived alone (no network, no side files). A
section whose inputs are absent says "not run" instead of failing. Sections:

1. Inputs and provenance (``group/analysis_summary.json``, newest
   ``logs/*_provenance.json``); 2. cohort summary (``group/phenotypes/summary.json``);
3. CV reconstruction metrics (``group/cv/metrics_*.tsv``: median and MAD of every numeric
   column, per modality when there is a ``modality`` column); 4. figures of the model part
   (``group/figures/*.png``: CV box plots, example reconstructions); 5. the AP grid and the
   chosen clustering (``group/strata/``) with cluster sizes; 6. the PCA baseline
   (``group/baseline/``); 7. stability (``group/stability/``); 8. confounds
   (``group/confounds/``); 9. ground truth (simulated data: ARI, confusion table,
   planted factors; ``group/ground_truth/``); 10. factor loadings
   (``group/phenotypes/``); 11. statistics (``group/stats/kruskal_wallis.tsv``);
   12. cluster profiles, distributions and permutation nulls; 13. caveats. The key
   results above the contents warn in red when the strata are not reproducible or a
   confound differs between them.

Rendering check (documented, not a test, as it needs a browser): ::

    apt-get install -y chromium
    chromium --headless --no-sandbox --disable-gpu --screenshot=/tmp/report.png \\
        --window-size=1280,4000 file:///path/to/output_dir/mmfusion_report.html

The unit tests check the cheap part: the file parses, every ``<img>`` is an inline PNG,
nothing is fetched from outside.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion import __version__
from mmfusion.io.atomic import write_text
from mmfusion.runlog import get_logger

log = get_logger(__name__)

REPORT_NAME = "mmfusion_report.html"
NOT_RUN = "not run"

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.88em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
.notrun{color:#a33;font-style:italic}.muted{color:#666;font-size:0.9em}
img{max-width:100%;border:1px solid #ddd;margin:0.4em 0}
code{background:#f4f4f4;padding:0 3px}
.keyresults{background:#f5f8fc;border:1px solid #b8c8dc;padding:0.2em 1.2em;margin:1em 0}
.keyresults h2{margin-top:0.5em;border:none}
.warn{color:#8a1f11;font-weight:600}
"""


# --------------------------------------------------------------------------- helpers
def _esc(x) -> str:
    return html.escape(str(x))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame, index: bool = False, digits: int = 4) -> str:
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "n/a" if np.isnan(v) else f"{v:.{digits}g}"
        return v
    return df.map(fmt).to_html(index=index, border=0, escape=True, na_rep="n/a")


def _read_tsv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _not_run(why: str) -> str:
    return f'<p class="notrun">{NOT_RUN}: {_esc(why)}</p>'


def _kv(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


# -------------------------------------------------------------------------- sections
def _group_provenance(out: Path, prov: dict | None) -> dict | None:
    """``prov`` (the running group level passes its own), else the newest
    ``logs/group-*_provenance.json`` (None if there is none)."""
    if prov is None:
        provs = sorted((out / "logs").glob("group-*_provenance.json"), key=lambda p: p.stat().st_mtime)
        prov = _read_json(provs[-1]) if provs else None
    return prov


def _section_provenance(out: Path, summary: dict | None, prov: dict | None) -> str:
    """The group run's provenance (see :func:`_group_provenance`) and the analysis inputs."""
    parts = []
    if prov:
        libs = prov.get("libraries", {})
        parts.append(_kv([("run id", prov.get("run_id")), ("command line", " ".join(map(str, prov.get("command_line", [])))),
                          ("config hash", prov.get("config_hash")), ("seed", prov.get("seed")),
                          ("libraries", ", ".join(f"{k} {v}" for k, v in libs.items()))]))
    else:
        parts.append('<p class="muted">No provenance file in logs/ (the CLI writes one per run).</p>')
    if summary:
        inputs = summary.get("inputs", {})
        rows = [("embeddings", f"{inputs.get('embeddings')} (sha256 {str(inputs.get('embeddings_sha256'))[:16]}...)")]
        rows += [(f"phenotypes: {Path(k).name}", f"{k} (sha256 {v[:16]}...)") for k, v in inputs.get("phenotypes", {}).items()]
        parts.append(_kv(rows))
    return "".join(parts)


def _section_cohort(out: Path, summary: dict | None, prov: dict | None = None) -> str:
    """Subject counts; ``prov`` adds the phenotype-only participants (participants.tsv rows
    without imaging data), which are among 'phenotypes but no embedding'."""
    if not summary:
        return _not_run("no group/analysis_summary.json (the analysis did not run)")
    pheno = _read_json(out / "group" / "phenotypes" / "summary.json") or {}
    counts = pheno.get("subject_counts", {})
    rows = [("subject-sessions with an embedding", summary.get("n_embeddings")),
            ("embedding dimension", summary.get("embedding_dim"))]
    if counts:
        rows += [("participants with phenotypes", counts.get("phenotypes")),
                 ("participants with both (analysed)", counts.get("both")),
                 ("embedding but no phenotypes", len(counts.get("only_embeddings", []))),
                 ("phenotypes but no embedding", len(counts.get("only_phenotypes", [])))]
    pheno_only = (prov or {}).get("phenotype_only_participants")
    if pheno_only is not None:
        rows.append(("phenotype only (in participants.tsv, never imaged)", len(pheno_only)))
    if pheno:
        rows += [("phenotype variables used", len(pheno.get("variables_used", []))),
                 ("missing values", f"{pheno.get('missing_policy')}: "
                  + (f"{pheno.get('cells_imputed', 0)} cell(s) imputed with the variable's median"
                     if pheno.get("missing_policy") == "median"
                     else f"{len(pheno.get('subjects_dropped_missing', []))} subject(s) removed (listwise)")),
                 ("subjects in the statistics", pheno.get("subjects_used"))]
        dropped = pheno.get("variables_dropped", {})
        if dropped:
            rows.append(("variables dropped", "; ".join(f"{k} ({v})" for k, v in dropped.items())))
    else:
        rows.append(("phenotypes", (summary.get("phenotypes") or {}).get("status", NOT_RUN)))
    return _kv(rows)


def _section_cv(out: Path) -> str:
    files = sorted((out / "group" / "cv").glob("metrics_*.tsv"))
    if not files:
        return _not_run("no group/cv/metrics_*.tsv (cross-validation of the autoencoder)")
    parts = []
    for f in files:
        df = _read_tsv(f)
        if df is None or df.empty:
            parts.append(_not_run(f"{f.name} is empty or unreadable"))
            continue
        num = df.select_dtypes("number").drop(columns=[c for c in ("fold", "session") if c in df.columns],
                                              errors="ignore")
        keys = [k for k in ("modality", "variant") if k in df.columns]
        grouped = df.groupby(keys)[list(num.columns)] if keys else None
        med = grouped.median() if keys else num.median().to_frame().T
        mad = (grouped.agg(lambda s: float(np.median(np.abs(s - s.median())))) if keys
               else num.apply(lambda s: float(np.median(np.abs(s - s.median())))).to_frame().T)
        table = med.round(6).astype(str) + " &plusmn; " + mad.round(6).astype(str)
        parts.append(f"<h3>{_esc(f.name)}</h3><p class='muted'>median &plusmn; MAD over "
                     f"{len(df)} row(s)</p>" + table.to_html(border=0, escape=False, index=bool(keys)))
    return "".join(parts)


def _section_figures(out: Path) -> str:
    figs = sorted((out / "group" / "figures").glob("*.png"))
    if not figs:
        return _not_run("no group/figures/*.png (CV box plots, example reconstructions)")
    return "".join(f"<h3>{_esc(p.stem)}</h3>{_img(p, p.stem)}" for p in figs)


def _section_strata(out: Path) -> str:
    d = out / "group" / "strata"
    sel = _read_json(d / "ap_selection.json")
    if not sel:
        return _not_run("no group/strata/ap_selection.json (the AP grid search)")
    best, counts = sel["best"], sel["counts"]
    parts = [_kv([("grid points", counts["grid_points"]), ("not converged (skipped)", counts["not_converged"]),
                  ("1 or n clusters (skipped)", counts["one_or_n_clusters"]), ("valid", counts["valid"]),
                  ("chosen damping", f"{best['damping']:.3f}"), ("chosen preference", f"{best['preference']:.6g}"),
                  ("clusters", best["n_clusters"]), ("silhouette", f"{best['silhouette']:.4f}"),
                  ("iterations", best.get("n_iter"))])]
    if (d / "ap_grid.png").is_file():
        parts.append(_img(d / "ap_grid.png", "AP grid silhouette"))
    sizes = pd.DataFrame({"cluster": range(len(sel["cluster_sizes"])), "subjects": sel["cluster_sizes"]})
    parts.append("<h3>Cluster sizes</h3>" + _table(sizes))
    return "".join(parts)


def _section_truth(out: Path) -> str:
    d = out / "group" / "ground_truth"
    comp = _read_json(d / "comparison.json")
    if not comp:
        return _not_run("no ground truth (only simulated datasets have sourcedata/ground_truth/)")
    parts = [_kv([("subjects compared", comp.get("n_subjects_compared")),
                  ("adjusted Rand index", f"{comp.get('adjusted_rand_index', float('nan')):.3f}"),
                  ("planted strata", comp.get("n_planted_strata")), ("clusters found", comp.get("n_clusters")),
                  ("planted latent factors", ", ".join(comp.get("planted_latent_factors", [])) or "none"),
                  ("planted demographics", ", ".join(comp.get("planted_demographics", [])) or "none")])]
    conf = _read_tsv(d / "confusion.tsv")
    if conf is not None:
        parts.append("<h3>Confusion (planted strata x clusters)</h3>" + _table(conf))
    match = _read_tsv(d / "factor_match.tsv")
    if match is not None:
        parts.append("<h3>Estimated factors vs planted latent factors</h3>" + _table(match))
    return "".join(parts)


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _range(d: dict | None) -> str:
    """'0.812 (0.700-1.000, 3)' from a stability median/min/max/n record."""
    if not d or d.get("median") is None:
        return "n/a"
    return f"{d['median']:.3f} (range {d['min']:.3f} to {d['max']:.3f}, {d['n']} clusterings)"


def _truth_of(out: Path) -> dict:
    """{clustering name: ARI vs the planted strata} of the baseline and fold clusterings."""
    return (_read_json(out / "group" / "ground_truth" / "comparison.json") or {}).get("adjusted_rand_index_of", {})


def _section_baseline(out: Path) -> str:
    d = out / "group" / "baseline"
    comp = _read_json(d / "comparison.json")
    if not comp:
        return _not_run("no group/baseline/comparison.json (the PCA baseline)")
    truth = _truth_of(out)
    pairs = [("what", f"PCA of the normalized input images (in-mask voxels, modalities concatenated), "
                      f"{comp['components']} components, clustered with the same AP grid search"),
             ("clusters", f"{comp['n_clusters']} (sizes {', '.join(map(str, comp['cluster_sizes']))})"),
             ("silhouette", _fmt(comp.get("silhouette"))),
             ("ARI with the learned embedding's strata", _fmt(comp.get("ari_with_strata")))]
    if "baseline" in truth:
        pairs.append(("ARI vs planted strata", _fmt(truth["baseline"])))
    parts = [_kv(pairs)]
    if (d / "strata" / "ap_grid.png").is_file():
        parts.append(_img(d / "strata" / "ap_grid.png", "baseline AP grid silhouette"))
    return "".join(parts)


def _section_stability(out: Path) -> str:
    d = out / "group" / "stability"
    summ = _read_json(d / "stability.json")
    if not summ:
        return _not_run("no group/stability/stability.json")
    truth = _truth_of(out)
    parts = [f"<p>Each cross-validation fold's model embeds every subject and is clustered with the same grid "
             f"search; {summ['n_subsamples']} random subsamples of the subjects are re-clustered too. A stratum's "
             f"stability is the mean Jaccard index of its best match in the other clusterings (stable: &ge; "
             f"{summ['threshold']:.2f}; Hennig 2007).</p>",
             _kv([("fold clusterings vs final, ARI", _range(summ.get("ari_folds_vs_final"))),
                  ("between fold clusterings, ARI", _range(summ.get("ari_between_folds"))),
                  ("subsamples vs final, ARI", _range(summ.get("ari_subsamples_vs_final"))),
                  ("subsamples choosing the same number of clusters",
                   "n/a" if summ.get("subsample_same_n_clusters") is None
                   else f"{100 * summ['subsample_same_n_clusters']:.0f}% ({summ['subsample_n_clusters']})"),
                  ("stable strata", f"{summ['n_stable_clusters']} of {summ['n_clusters']}")])]
    clusters = _read_tsv(d / "clusters.tsv")
    if clusters is not None:
        parts.append("<h3>Per-stratum stability</h3>" + _table(clusters))
    folds = {k: v for k, v in truth.items() if k.startswith("fold-") or k.startswith("baseline_fold-")}
    if folds:
        parts.append("<h3>Fold clusterings vs planted strata (ARI)</h3>"
                     + _table(pd.DataFrame({"clustering": list(folds), "ARI": list(folds.values())})))
    if (d / "coassignment.png").is_file():
        parts.append(_img(d / "coassignment.png", "co-assignment matrix"))
    return "".join(parts)


def _section_confounds(out: Path) -> str:
    tests = _read_tsv(out / "group" / "confounds" / "confound_tests.tsv")
    if tests is None:
        return _not_run("no group/confounds/confound_tests.tsv")
    return ("<p>Are the strata explained by a confound? Kruskal-Wallis (numeric; effect size epsilon&sup2;) or "
            "chi-squared (categorical; Cram&eacute;r's V) across strata, q: Benjamini-Hochberg across the "
            "confounds tested.</p>" + _table(tests))


def _section_factors(out: Path) -> str:
    d = out / "group" / "phenotypes"
    factors = _read_tsv(d / "factors.tsv")
    if factors is None:
        return _not_run("no group/phenotypes/factors.tsv (no phenotypes, or the analysis stopped)")
    total = factors["explained_variance_ratio"].sum()
    parts = [f"<p>{len(factors)} factor(s) with eigenvalue &gt; threshold, explaining "
             f"{100 * total:.1f}% of the variance after varimax rotation.</p>", _table(factors)]
    if (d / "loadings.png").is_file():
        parts.append(_img(d / "loadings.png", "factor loadings"))
    return "".join(parts)


def _section_stats(out: Path) -> str:
    d = out / "group" / "stats"
    table = _read_tsv(d / "kruskal_wallis.tsv")
    if table is None:
        return _not_run("no group/stats/kruskal_wallis.tsv")
    cols = [c for c in ["factor", "H", "p", "q", "significant", "perm_p", "perm_q", "perm_significant"] if c in table]
    n_perm = ""
    summ = _read_json(out / "group" / "analysis_summary.json") or {}
    if summ.get("stats"):
        n_perm = f" with M = {summ['stats']['n_permutations']} permutations"
    return (f"<p>Kruskal-Wallis across clusters per factor; q: Benjamini-Hochberg across factors; "
            f"perm_p: permutation test{_esc(n_perm)}, p = (1 + #H_perm &ge; H_obs)/(1 + M).</p>"
            + _table(table[cols]))


def _section_profiles(out: Path) -> str:
    d = out / "group" / "stats"
    prof = _read_tsv(d / "profiles.tsv")
    if prof is None:
        return _not_run("no group/stats/profiles.tsv")
    parts = ["<p>Quantile of each cluster's median factor score within the whole population "
             "(0.5 = the population median).</p>", _table(prof)]
    for name, alt in [("profiles.png", "log quantile heat map"), ("distributions.png", "factor scores per cluster"),
                      ("permutation_null.png", "permutation null distributions")]:
        if (d / name).is_file():
            parts.append(_img(d / name, alt))
    return "".join(parts)


def _section_caveats(summary: dict | None) -> str:
    from mmfusion.levels.group import CAVEATS
    caveats = (summary or {}).get("caveats") or CAVEATS
    return "<ul>" + "".join(f"<li>{_esc(c)}</li>" for c in dict.fromkeys(caveats)) + "</ul>"


def _key_validity(out: Path, truth_of: dict) -> list[str]:
    """Key-result lines of the baseline, the stability and the confounds (warnings in red)."""
    items = []
    base = _read_json(out / "group" / "baseline" / "comparison.json")
    if base:
        vs = f"; vs planted strata ARI {truth_of['baseline']:.3f}" if "baseline" in truth_of else ""
        items.append(f"Baseline (PCA of the images, {base['components']} components, same grid search): "
                     f"{base['n_clusters']} clusters; ARI with the learned strata <b>{_fmt(base.get('ari_with_strata'))}"
                     f"</b>{vs}.")
    summ = _read_json(out / "group" / "stability" / "stability.json")
    if summ:
        clusters = _read_tsv(out / "group" / "stability" / "clusters.tsv")
        per = "" if clusters is None else "; per stratum " + ", ".join(
            f"{int(r.cluster)}: {r.stability:.2f}" for r in clusters.itertuples())
        same = summ.get("subsample_same_n_clusters")
        line = (f"Stability: fold models vs final, median ARI {_range(summ.get('ari_folds_vs_final'))}; "
                f"the same number of clusters won in "
                f"{'n/a' if same is None else f'{100 * same:.0f}%'} of {summ['n_subsamples']} subsamples; "
                f"{summ['n_stable_clusters']} of {summ['n_clusters']} strata stable (Jaccard &ge; "
                f"{summ['threshold']:.2f}{per}).")
        items.append(line)
        if not summ.get("reproducible"):
            unstable = [] if clusters is None else [str(int(r.cluster)) for r in clusters.itertuples() if not r.stable]
            items.append(f"<span class='warn'>Warning: the strata are not reproducible: stratum "
                         f"{', '.join(unstable) or '?'} dissolve(s) across fold models and subsamples. Do not "
                         f"read them as findings.</span>")
    tests = _read_tsv(out / "group" / "confounds" / "confound_tests.tsv")
    if tests is not None and len(tests):
        sig = tests[tests["significant"].astype(str).str.lower() == "true"]
        if len(sig):
            for r in sig.itertuples():
                items.append(f"<span class='warn'>Warning: the strata differ in {_esc(r.confound)} ({_esc(r.test)}, "
                             f"{_esc(r.effect_measure)} {r.effect_size:.2f}, q = {r.q:.3g}): they may reflect "
                             f"{_esc(r.confound)} rather than biology.</span>")
        else:
            tested = tests[tests["test"] != "not run"]["confound"].astype(str).tolist()
            items.append(f"Confounds: none differs between strata (q &ge; 0.05; tested {_esc(', '.join(tested)) or 'none'}).")
    return items


def _key_results(out: Path) -> str:
    """The answer in a few lines, above the table of contents (empty when nothing ran)."""
    items = []
    sel = _read_json(out / "group" / "strata" / "ap_selection.json")
    if sel:
        best = sel["best"]
        items.append(f"<b>{best['n_clusters']} clusters</b> (sizes {', '.join(map(str, sel['cluster_sizes']))}; "
                     f"silhouette {best['silhouette']:.3f}) chosen among {sel['counts']['valid']} valid "
                     f"affinity-propagation fits.")
    truth = _read_json(out / "group" / "ground_truth" / "comparison.json")
    if truth:
        items.append(f"Against the <b>{truth.get('n_planted_strata')} planted strata</b>: adjusted Rand index "
                     f"<b>{truth.get('adjusted_rand_index', float('nan')):.3f}</b> "
                     f"({truth.get('n_subjects_compared')} subjects; 1 = identical partition, 0 = chance).")
    items += _key_validity(out, (truth or {}).get("adjusted_rand_index_of", {}))
    stats = _read_tsv(out / "group" / "stats" / "kruskal_wallis.tsv")
    if stats is not None and len(stats):
        kw = [str(f) for f in stats.loc[stats["significant"].astype(bool), "factor"]]
        perm = [str(f) for f in stats.loc[stats["perm_significant"].astype(bool), "factor"]]
        items.append(f"Phenotype factors differing between clusters (q &lt; 0.05): Kruskal-Wallis + FDR "
                     f"<b>{', '.join(kw) or 'none'}</b>, permutation + FDR <b>{', '.join(perm) or 'none'}</b> "
                     f"(of {len(stats)} factors).")
    match = _read_tsv(out / "group" / "ground_truth" / "factor_match.tsv")
    if match is not None and len(match):
        planted = [f"{r.factor} (~{r.best_latent}, r={r.r:.2f})" for r in match.itertuples() if bool(r.latent_planted)]
        items.append(f"Factors matching a planted stratum-dependent latent factor: {', '.join(planted) or 'none'}.")
    if not items:
        return ""
    return "<div class='keyresults'><h2>Key results</h2><ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul></div>"


# ------------------------------------------------------------------------------ main
def write_report(output_dir: Path, title: str = "mmfusion group report",
                 provenance: dict | None = None) -> Path:
    """Write ``output_dir/mmfusion_report.html`` from the group outputs; return its path.

    ``provenance`` is the running group level's record (``Provenance.as_dict()``); without
    it the newest group provenance file in ``logs/`` is shown.
    """
    out = Path(output_dir)
    summary = _read_json(out / "group" / "analysis_summary.json")
    provenance = _group_provenance(out, provenance)
    sections = [
        ("Inputs and provenance", _section_provenance(out, summary, provenance)),
        ("Cohort", _section_cohort(out, summary, provenance)),
        ("Cross-validated reconstruction metrics", _section_cv(out)),
        ("Model figures and example reconstructions", _section_figures(out)),
        ("Affinity propagation grid and the chosen clustering", _section_strata(out)),
        ("Baseline: PCA of the images", _section_baseline(out)),
        ("Stability of the strata", _section_stability(out)),
        ("Confounds", _section_confounds(out)),
        ("Comparison with the planted ground truth", _section_truth(out)),
        ("Phenotype factors (PCA + varimax)", _section_factors(out)),
        ("Between-cluster statistics", _section_stats(out)),
        ("Cluster profiles", _section_profiles(out)),
        ("Caveats", _section_caveats(summary)),
    ]
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    toc = "".join(f'<li><a href="#s{i}">{_esc(t)}</a></li>' for i, (t, _) in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{i + 1}. {_esc(t)}</h2>{c}' for i, (t, c) in enumerate(sections))
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
           f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>"
           f"<p class='muted'>mmfusion {_esc(__version__)}, written {_esc(stamp)} from {_esc(out)}</p>"
           f"{_key_results(out)}<ol>{toc}</ol>{body}</body></html>\n")
    path = out / REPORT_NAME
    write_text(path, doc)
    log.info("report written: %s", path)
    return path
