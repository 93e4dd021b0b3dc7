"""The report of an applied run (``group --model BUNDLE``): one self-contained HTML file.

:func:`write_report` reads ``output_dir/group/applied/`` and writes
``output_dir/mmfusion_applied_report.html`` (a distinct name: a training report in the same
folder is kept), with the page template and blocks of the group report
(``templates/group_report.html.j2``, ``templates/_blocks.html.j2``). Sections: 1. the
trained model (its provenance, training cohort, config and template hashes, model card
lines); 2. this run; 3. strata: the new cohort's sizes next to the training sizes, the
novelty counts and the 2-D projection (``projection.png``); 4. ground truth (simulated
data); 5. phenotype factors and 6. statistics of the new cohort; 7. caveats.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import pandas as pd

from mmfusion import __version__
from mmfusion.io.atomic import write_text
from mmfusion.report.group_report import (_figure, _kv, _line, _not_run, _read_json, _read_tsv, _render, _table)
from mmfusion.report.templating import render
from mmfusion.runlog import get_logger

log = get_logger(__name__)

REPORT_NAME = "mmfusion_applied_report.html"
APPLIED = Path("group") / "applied"
CAVEATS = [
    "The strata are the training cohort's: each new subject goes to the nearest training exemplar "
    "whether or not the new cohort has the same structure; novel subjects are outside what the model saw.",
    "The phenotype factors are refitted on the new cohort (PCA + varimax of its own phenotypes), so "
    "they need not match the training factors one to one; the tests ask whether the assigned strata "
    "differ in the new cohort's phenotypes.",
    "The assigned strata were not chosen on the new cohort, so its statistics do not reuse the data "
    "that formed the strata (unlike the training report's).",
]


def _model_section(summary: dict, card: dict) -> list[dict]:
    b = summary["bundle"]
    prov = b["provenance"]
    rows = [("bundle", b["path"]), ("mmfusion (training)", prov.get("mmfusion_version")),
            ("training run", prov.get("run_id")), ("trained", prov.get("trained")), ("seed", prov.get("seed")),
            ("config hash", prov.get("config_hash")),
            ("template hash", f"{b['template'].get('hash')} ({b['template'].get('source')})"),
            ("training cohort", f"{b['n_training_subjects']} subjects ({b['n_training_rows']} shards)"),
            ("modalities", " ".join(summary.get("modalities", [])))]
    stab = card.get("stability")
    if stab:
        rows.append(("training stability", f"{stab['n_stable_clusters']} of {stab['n_clusters']} strata stable; "
                                           f"reproducible: {stab['reproducible']}"))
    if card.get("baseline"):
        rows.append(("training baseline", f"ARI with the strata {card['baseline']['ari_with_strata']:.3f}"))
    if card.get("ground_truth"):
        rows.append(("training ground truth", f"ARI {card['ground_truth']['adjusted_rand_index']:.3f}"))
    return [_kv(rows)]


def _run_section(prov: dict | None, summary: dict) -> list[dict]:
    rows = [("subject-sessions embedded", summary["n_embeddings"]),
            ("embedding time", f"{summary['seconds_embedding']:.1f} s ({summary['seconds_per_shard']:.2f} s per shard)")]
    if prov:
        rows = [("run id", prov.get("run_id")), ("command line", " ".join(map(str, prov.get("command_line", []))))] + rows
    return [_kv(rows)]


def _strata_section(out: Path, summary: dict) -> list[dict]:
    sizes, nov = summary["stratum_sizes"], summary["novelty"]
    labels = _read_tsv(out / APPLIED / "labels.tsv")
    k = len(sizes["training"])
    novel = [0] * k
    if labels is not None:
        flags = labels["novel"].astype(str).str.lower() == "true"
        novel = labels[flags].groupby("stratum").size().reindex(range(k), fill_value=0).tolist()
    table = pd.DataFrame({"stratum": range(k), "training subjects": sizes["training"],
                          "new subjects": sizes["applied"], "of which novel": novel})
    return [_kv([("novelty threshold", f"{nov['threshold']:.4g} (embedding units; the {nov['percentile']:g}th "
                                       "percentile of the training subjects' distances to their own exemplar)"),
                 ("novel subjects", f"{nov['n_novel']} of {summary['n_embeddings']} "
                                    f"({100 * nov['fraction_novel']:.0f}%)")]),
            _table(table, "Stratum sizes"),
            *_figure(out / APPLIED / "projection.png", "new subjects among the training embeddings")]


def _truth_section(out: Path) -> list[dict]:
    comp = _read_json(out / APPLIED / "ground_truth" / "comparison.json")
    if not comp:
        return [_not_run("no ground truth (only simulated datasets have sourcedata/ground_truth/)")]
    parts = [_kv([("subjects compared", comp.get("n_subjects_compared")),
                  ("adjusted Rand index", f"{comp.get('adjusted_rand_index', float('nan')):.3f}"),
                  ("planted strata", comp.get("n_planted_strata")), ("strata assigned", comp.get("n_clusters"))])]
    table = _read_tsv(out / APPLIED / "ground_truth" / "confusion.tsv")
    if table is not None:
        parts.append(_table(table, "Confusion (planted strata x assigned strata)"))
    return parts


def _factors_section(out: Path, summary: dict) -> list[dict]:
    factors = _read_tsv(out / APPLIED / "phenotypes" / "factors.tsv")
    if factors is None:
        return [_not_run((summary.get("phenotypes") or {}).get("status", "no phenotypes"))]
    return [_table(factors), *_figure(out / APPLIED / "phenotypes" / "loadings.png", "factor loadings")]


def _stats_section(out: Path, summary: dict) -> list[dict]:
    table = _read_tsv(out / APPLIED / "stats" / "kruskal_wallis.tsv")
    if table is None:
        return [_not_run((summary.get("stats") or {}).get("status", "no factor statistics"))]
    cols = [c for c in ["factor", "H", "p", "q", "significant", "perm_p", "perm_q", "perm_significant"] if c in table]
    parts = [_table(table[cols])]
    for name, alt in [("profiles.png", "log quantile heat map"), ("distributions.png", "factor scores per stratum")]:
        parts += _figure(out / APPLIED / "stats" / name, alt)
    return parts


def _key_results(summary: dict, out: Path) -> list[dict]:
    nov, b = summary["novelty"], summary["bundle"]
    items = [_line("applied", n=summary["n_embeddings"], n_train=b["n_training_subjects"],
                   sizes=", ".join(map(str, summary["stratum_sizes"]["applied"])),
                   train_sizes=", ".join(map(str, summary["stratum_sizes"]["training"])),
                   n_novel=nov["n_novel"], percent=f"{100 * nov['fraction_novel']:.0f}")]
    comp = _read_json(out / APPLIED / "ground_truth" / "comparison.json")
    if comp and "adjusted_rand_index" in comp:
        items.append(_line("truth", n_planted=comp.get("n_planted_strata"),
                           ari=f"{comp['adjusted_rand_index']:.3f}", n_subjects=comp.get("n_subjects_compared")))
    return items


def write_report(output_dir: Path, title: str = "mmfusion: trained model applied",
                 provenance: dict | None = None) -> Path:
    """Write ``output_dir/mmfusion_applied_report.html`` from ``group/applied/``; return its path."""
    out = Path(output_dir)
    summary = _read_json(out / APPLIED / "summary.json") or {}
    card = _read_json(Path(summary["bundle"]["path"]) / "model_card.json") or {}
    sections = [
        ("The trained model", _model_section(summary, card)),
        ("This run", _run_section(provenance, summary)),
        ("Strata of the new subjects", _strata_section(out, summary)),
        ("Comparison with the planted ground truth", _truth_section(out)),
        ("Phenotype factors of the new cohort (PCA + varimax, refitted)", _factors_section(out, summary)),
        ("Between-stratum statistics of the new cohort", _stats_section(out, summary)),
        ("Caveats", [{"kind": "list", "entries": CAVEATS}]),
    ]
    doc = render("group_report.html.j2", title=title, version=__version__,
                 stamp=_dt.datetime.now().isoformat(timespec="seconds"), output_dir=str(out),
                 key_results=_key_results(summary, out),
                 sections=[{"title": t, "body": _render(blocks)} for t, blocks in sections])
    path = out / REPORT_NAME
    write_text(path, doc)
    log.info("applied report written: %s", path)
    return path
