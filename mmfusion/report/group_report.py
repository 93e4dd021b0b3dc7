"""The group-level HTML report: one self-contained file, read top to bottom.

:func:`write_report` gathers whatever group outputs exist under ``output_dir`` and writes
``output_dir/mmfusion_report.html``. Figures are embedded as base64 PNG and styles are
inline, so the file can be mailed or archived alone (no network, no side files). A
section whose inputs are absent says "not run" instead of failing. The page is the Jinja2
template ``templates/group_report.html.j2``; each section is a list of blocks (tables,
figures, text) that ``templates/_blocks.html.j2`` renders, where the prose and the
key-result lines live too (Python formats the numbers). Sections:

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

import datetime as _dt
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from markupsafe import Markup

from mmfusion import __version__
from mmfusion.io.atomic import write_text
from mmfusion.report.templating import environment, png_data_uri, render
from mmfusion.runlog import get_logger

log = get_logger(__name__)

REPORT_NAME = "mmfusion_report.html"
NOT_RUN = "not run"

# Method caveats every report states (also written to group/analysis_summary.json).
CAVEATS = [
    "Affinity propagation picks the number of clusters through the preference; the chosen fit "
    "maximises the silhouette over the grid, which favours compact, well-separated clusters and "
    "is itself a choice made on the same data that the statistics then test.",
    "The permutation test re-partitions subjects with the observed cluster sizes; it tests the "
    "phenotype differences given the clustering, not the existence of the clusters.",
    "Factor scores come from a PCA with varimax rotation of the available phenotypes; missing "
    "values were handled as stated in the phenotype summary, which changes the scores a little.",
    "With U-Net skip connections (model.skip_connections: true, the paper's model) the decoders "
    "can bypass the joint embedding: reconstruction quality alone does not show that the "
    "embedding is informative; compare the strata with the PCA baseline and their stability.",
]



# --------------------------------------------------------------------------- helpers
# A section is built as a list of blocks (dicts) that templates/_blocks.html.j2 renders.
def _render(blocks: list[dict]) -> Markup:
    """The HTML of a section's blocks."""
    return Markup(environment().get_template("_blocks.html.j2").module.render(blocks))


def _figure(path: Path, alt: str) -> list[dict]:
    """The PNG at ``path`` embedded as a data: URI, or nothing when it does not exist."""
    return [{"kind": "img", "src": png_data_uri(path), "alt": alt}] if Path(path).is_file() else []


def _table(df: pd.DataFrame, title: str | None = None, index: bool = False, digits: int = 4) -> dict:
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "n/a" if np.isnan(v) else f"{v:.{digits}g}"
        return v
    return {"kind": "table", "title": title,
            "html": Markup(df.map(fmt).to_html(index=index, border=0, escape=True, na_rep="n/a"))}


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


def _not_run(why: str) -> dict:
    return {"kind": "notrun", "why": why}


def _kv(pairs: list[tuple[str, object]]) -> dict:
    return {"kind": "kv", "rows": pairs}


def _prose(name: str, **args) -> dict:
    return {"kind": "prose", "name": name, "args": args}


def _section(needs: str | None = None, why: str = ""):
    """A report section: the function returns blocks, the caller gets their HTML. With
    ``needs`` (a .json or .tsv path under the output folder) the file is read first and
    passed as the second argument; when it is absent or unreadable (or an empty JSON
    object) the section says 'not run: ``why``' instead."""
    def wrap(fn):
        @functools.wraps(fn)
        def section(out, *args, **kwargs):
            if needs is None:
                return _render(fn(out, *args, **kwargs))
            path = Path(out) / needs
            data = _read_json(path) if path.suffix == ".json" else _read_tsv(path)
            if data is None or (isinstance(data, dict) and not data):
                return _render([_not_run(why)])
            return _render(fn(out, data, *args, **kwargs))
        return section
    return wrap


# -------------------------------------------------------------------------- sections
def _group_provenance(out: Path, prov: dict | None) -> dict | None:
    """``prov`` (the running group level passes its own), else the newest
    ``logs/group-*_provenance.json`` (None if there is none)."""
    if prov is None:
        provs = sorted((out / "logs").glob("group-*_provenance.json"), key=lambda p: p.stat().st_mtime)
        prov = _read_json(provs[-1]) if provs else None
    return prov


@_section()
def _section_provenance(out: Path, summary: dict | None, prov: dict | None) -> list[dict]:
    """The group run's provenance (see :func:`_group_provenance`) and the analysis inputs."""
    parts = []
    if prov:
        libs = prov.get("libraries", {})
        parts.append(_kv([("run id", prov.get("run_id")), ("command line", " ".join(map(str, prov.get("command_line", [])))),
                          ("config hash", prov.get("config_hash")), ("seed", prov.get("seed")),
                          ("libraries", ", ".join(f"{k} {v}" for k, v in libs.items()))]))
    else:
        parts.append({"kind": "muted", "text": "No provenance file in logs/ (the CLI writes one per run)."})
    if summary:
        inputs = summary.get("inputs", {})
        rows = [("embeddings", f"{inputs.get('embeddings')} (sha256 {str(inputs.get('embeddings_sha256'))[:16]}...)")]
        rows += [(f"phenotypes: {Path(k).name}", f"{k} (sha256 {v[:16]}...)") for k, v in inputs.get("phenotypes", {}).items()]
        parts.append(_kv(rows))
    return parts


@_section()
def _section_cohort(out: Path, summary: dict | None, prov: dict | None = None) -> list[dict]:
    """Subject counts; ``prov`` adds the phenotype-only participants (participants.tsv rows
    without imaging data), which are among 'phenotypes but no embedding'."""
    if not summary:
        return [_not_run("no group/analysis_summary.json (the analysis did not run)")]
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
    return [_kv(rows)]


@_section()
def _section_cv(out: Path) -> list[dict]:
    files = sorted((out / "group" / "cv").glob("metrics_*.tsv"))
    if not files:
        return [_not_run("no group/cv/metrics_*.tsv (cross-validation of the autoencoder)")]
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
        parts += [{"kind": "h3", "text": f.name}, {"kind": "muted", "text": Markup(f"median &plusmn; MAD over {len(df)} row(s)")},
                  {"kind": "table", "title": None, "html": Markup(table.to_html(border=0, escape=False, index=bool(keys)))}]
    return parts


@_section()
def _section_figures(out: Path) -> list[dict]:
    figs = sorted((out / "group" / "figures").glob("*.png"))
    if not figs:
        return [_not_run("no group/figures/*.png (CV box plots, example reconstructions)")]
    return [block for p in figs for block in [{"kind": "h3", "text": p.stem}, *_figure(p, p.stem)]]


@_section("group/strata/ap_selection.json", "no group/strata/ap_selection.json (the AP grid search)")
def _section_strata(out: Path, sel: dict) -> list[dict]:
    best, counts = sel["best"], sel["counts"]
    sizes = pd.DataFrame({"cluster": range(len(sel["cluster_sizes"])), "subjects": sel["cluster_sizes"]})
    return [_kv([("grid points", counts["grid_points"]), ("not converged (skipped)", counts["not_converged"]),
                 ("stopped at the first convergence check (skipped)", counts.get("stalled", 0)),
                 ("1 or n clusters (skipped)", counts["one_or_n_clusters"]), ("valid", counts["valid"]),
                 ("chosen damping", f"{best['damping']:.3f}"), ("chosen preference", f"{best['preference']:.6g}"),
                 ("clusters", best["n_clusters"]), ("silhouette", f"{best['silhouette']:.4f}"),
                 ("iterations", best.get("n_iter"))]),
            *_figure(out / "group" / "strata" / "ap_grid.png", "AP grid silhouette"),
            _table(sizes, "Cluster sizes")]


@_section("group/ground_truth/comparison.json",
          "no ground truth (only simulated datasets have sourcedata/ground_truth/)")
def _section_truth(out: Path, comp: dict) -> list[dict]:
    d = out / "group" / "ground_truth"
    parts = [_kv([("subjects compared", comp.get("n_subjects_compared")),
                  ("adjusted Rand index", f"{comp.get('adjusted_rand_index', float('nan')):.3f}"),
                  ("planted strata", comp.get("n_planted_strata")), ("clusters found", comp.get("n_clusters")),
                  ("planted latent factors", ", ".join(comp.get("planted_latent_factors", [])) or "none"),
                  ("planted demographics", ", ".join(comp.get("planted_demographics", [])) or "none")])]
    for name, title in [("confusion.tsv", "Confusion (planted strata x clusters)"),
                        ("factor_match.tsv", "Estimated factors vs planted latent factors")]:
        table = _read_tsv(d / name)
        if table is not None:
            parts.append(_table(table, title))
    return parts


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


@_section("group/baseline/comparison.json", "no group/baseline/comparison.json (the PCA baseline)")
def _section_baseline(out: Path, comp: dict) -> list[dict]:
    truth = _truth_of(out)
    pairs = [("what", f"PCA of the normalized input images (in-mask voxels, modalities concatenated), "
                      f"{comp['components']} components, clustered with the same AP grid search"),
             ("clusters", f"{comp['n_clusters']} (sizes {', '.join(map(str, comp['cluster_sizes']))})"),
             ("silhouette", _fmt(comp.get("silhouette"))),
             ("ARI with the learned embedding's strata", _fmt(comp.get("ari_with_strata")))]
    if "baseline" in truth:
        pairs.append(("ARI vs planted strata", _fmt(truth["baseline"])))
    return [_kv(pairs), *_figure(out / "group" / "baseline" / "strata" / "ap_grid.png", "baseline AP grid silhouette")]


@_section("group/stability/stability.json", "no group/stability/stability.json")
def _section_stability(out: Path, summ: dict) -> list[dict]:
    d = out / "group" / "stability"
    truth = _truth_of(out)
    parts = [_prose("stability", n_subsamples=summ["n_subsamples"], threshold=f"{summ['threshold']:.2f}"),
             _kv([("strata", _strata_source(summ)),
                  ("final model's clustering vs strata, ARI", _fmt(summ.get("ari_final_model_vs_strata"))),
                  ("fold clusterings vs strata, ARI", _range(summ.get("ari_folds_vs_strata"))),
                  ("between fold clusterings, ARI", _range(summ.get("ari_between_folds"))),
                  ("subsamples vs strata, ARI", _range(summ.get("ari_subsamples_vs_strata"))),
                  ("subsamples choosing the same number of clusters",
                   "n/a" if summ.get("subsample_same_n_clusters") is None
                   else f"{100 * summ['subsample_same_n_clusters']:.0f}% ({summ['subsample_n_clusters']})"),
                  ("stable strata", f"{summ['n_stable_clusters']} of {summ['n_clusters']}")])]
    clusters = _read_tsv(d / "clusters.tsv")
    if clusters is not None:
        parts.append(_table(clusters, "Per-stratum stability"))
    folds = {k: v for k, v in truth.items() if k.startswith("fold-") or k.startswith("baseline_fold-")}
    if folds:
        parts.append(_table(pd.DataFrame({"clustering": list(folds), "ARI": list(folds.values())}),
                            "Fold clusterings vs planted strata (ARI)"))
    return parts + _figure(d / "coassignment.png", "co-assignment matrix")


def _strata_source(summ: dict) -> str:
    """In words, where the strata of a stability summary came from."""
    how = summ.get("strata") or {}
    if how.get("source") == "consensus":
        return (f"consensus of the final model's, the fold models' and the subsamples' clusterings "
                f"(the final model's alone: {how.get('final_model_n_clusters')} clusters)")
    return "the final model's clustering" + (f" ({how['fallback']})" if how.get("fallback") else "")


@_section("group/confounds/confound_tests.tsv", "no group/confounds/confound_tests.tsv")
def _section_confounds(out: Path, tests: pd.DataFrame) -> list[dict]:
    return [_prose("confounds"), _table(tests)]


@_section("group/phenotypes/factors.tsv", "no group/phenotypes/factors.tsv (no phenotypes, or the analysis stopped)")
def _section_factors(out: Path, factors: pd.DataFrame) -> list[dict]:
    total = factors["explained_variance_ratio"].sum()
    return [_prose("factors", n=len(factors), percent=f"{100 * total:.1f}"), _table(factors),
            *_figure(out / "group" / "phenotypes" / "loadings.png", "factor loadings")]


@_section("group/stats/kruskal_wallis.tsv", "no group/stats/kruskal_wallis.tsv")
def _section_stats(out: Path, table: pd.DataFrame) -> list[dict]:
    cols = [c for c in ["factor", "H", "p", "q", "significant", "perm_p", "perm_q", "perm_significant"] if c in table]
    n_perm = ""
    summ = _read_json(out / "group" / "analysis_summary.json") or {}
    if summ.get("stats"):
        n_perm = f" with M = {summ['stats']['n_permutations']} permutations"
    return [_prose("stats", n_perm=n_perm), _table(table[cols])]


@_section("group/stats/profiles.tsv", "no group/stats/profiles.tsv")
def _section_profiles(out: Path, prof: pd.DataFrame) -> list[dict]:
    d = out / "group" / "stats"
    parts = [_prose("profiles"), _table(prof)]
    for name, alt in [("profiles.png", "log quantile heat map"), ("distributions.png", "factor scores per cluster"),
                      ("permutation_null.png", "permutation null distributions")]:
        parts += _figure(d / name, alt)
    return parts


@_section()
def _section_caveats(out: Path, summary: dict | None) -> list[dict]:
    caveats = (summary or {}).get("caveats") or CAVEATS
    return [{"kind": "list", "entries": list(dict.fromkeys(caveats))}]


def _line(name: str, **args) -> dict:
    """A key-result line: the macro ``name`` of templates/_blocks.html.j2 with ``args``."""
    return {"name": name, "args": args}


def _key_validity(out: Path, truth_of: dict) -> list[dict]:
    """Key-result lines of the baseline, the stability and the confounds (warnings in red)."""
    items = []
    base = _read_json(out / "group" / "baseline" / "comparison.json")
    if base:
        items.append(_line("baseline", components=base["components"], n_clusters=base["n_clusters"],
                           ari_with_strata=_fmt(base.get("ari_with_strata")),
                           ari_truth=f"{truth_of['baseline']:.3f}" if "baseline" in truth_of else None))
    summ = _read_json(out / "group" / "stability" / "stability.json")
    if summ:
        clusters = _read_tsv(out / "group" / "stability" / "clusters.tsv")
        per = None if clusters is None else ", ".join(f"{int(r.cluster)}: {r.stability:.2f}" for r in clusters.itertuples())
        same = summ.get("subsample_same_n_clusters")
        items.append(_line("stability", folds_vs_strata=_range(summ.get("ari_folds_vs_strata")),
                           same="n/a" if same is None else f"{100 * same:.0f}%", n_subsamples=summ["n_subsamples"],
                           n_stable=summ["n_stable_clusters"], n_clusters=summ["n_clusters"],
                           threshold=f"{summ['threshold']:.2f}", per_stratum=per))
        if not summ.get("reproducible"):
            unstable = [] if clusters is None else [str(int(r.cluster)) for r in clusters.itertuples() if not r.stable]
            items.append(_line("not_reproducible", unstable=", ".join(unstable) or "?"))
    tests = _read_tsv(out / "group" / "confounds" / "confound_tests.tsv")
    if tests is not None and len(tests):
        sig = tests[tests["significant"].astype(str).str.lower() == "true"]
        if len(sig):
            for r in sig.itertuples():
                items.append(_line("confound", confound=r.confound, test=r.test, effect_measure=r.effect_measure,
                                   effect_size=f"{r.effect_size:.2f}", q=f"{r.q:.3g}"))
        else:
            tested = tests[tests["test"] != "not run"]["confound"].astype(str).tolist()
            items.append(_line("no_confound", tested=", ".join(tested) or "none"))
    return items


def _key_results(out: Path) -> list[dict]:
    """The answer in a few lines, above the table of contents (none when nothing ran)."""
    items = []
    sel = _read_json(out / "group" / "strata" / "ap_selection.json")
    if sel:
        best = sel["best"]
        how = (_read_json(out / "group" / "stability" / "stability.json") or {}).get("strata") or {}
        consensus = how.get("source") == "consensus"
        items.append(_line("clusters", n_clusters=how["n_strata"] if consensus else best["n_clusters"],
                           sizes=", ".join(map(str, how["sizes"] if consensus else sel["cluster_sizes"])),
                           silhouette=f"{best['silhouette']:.3f}", valid=sel["counts"]["valid"],
                           final_model_clusters=best["n_clusters"] if consensus else None))
    truth = _read_json(out / "group" / "ground_truth" / "comparison.json")
    if truth:
        items.append(_line("truth", n_planted=truth.get("n_planted_strata"),
                           ari=f"{truth.get('adjusted_rand_index', float('nan')):.3f}",
                           n_subjects=truth.get("n_subjects_compared")))
    items += _key_validity(out, (truth or {}).get("adjusted_rand_index_of", {}))
    stats = _read_tsv(out / "group" / "stats" / "kruskal_wallis.tsv")
    if stats is not None and len(stats):
        kw = [str(f) for f in stats.loc[stats["significant"].astype(bool), "factor"]]
        perm = [str(f) for f in stats.loc[stats["perm_significant"].astype(bool), "factor"]]
        items.append(_line("factors", kw=", ".join(kw) or "none", perm=", ".join(perm) or "none",
                           n_factors=len(stats)))
    match = _read_tsv(out / "group" / "ground_truth" / "factor_match.tsv")
    if match is not None and len(match):
        planted = [f"{r.factor} (~{r.best_latent}, r={r.r:.2f})" for r in match.itertuples() if bool(r.latent_planted)]
        items.append(_line("planted_factors", planted=", ".join(planted) or "none"))
    return items


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
        ("Caveats", _section_caveats(out, summary)),
    ]
    doc = render("group_report.html.j2", title=title, version=__version__,
                 stamp=_dt.datetime.now().isoformat(timespec="seconds"), output_dir=str(out),
                 key_results=_key_results(out), sections=[{"title": t, "body": body} for t, body in sections])
    path = out / REPORT_NAME
    write_text(path, doc)
    log.info("report written: %s", path)
    return path
