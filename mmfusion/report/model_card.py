"""The model card of a trained-model bundle: ``model_card.json`` and ``MODEL_CARD.md``.

:func:`model_card` gathers, from the group outputs of the training run (already read into
dicts and frames by the caller), what the model was trained on and how well it did;
:func:`card_markdown` writes the same as a short page. No absolute path goes in.
"""
from __future__ import annotations

import pandas as pd

INTENDED_USE = (
    "Embed new subjects whose shards were made by the participant level with the training cohort's "
    "template and spatial config, and place them in the training strata (nearest exemplar, with a "
    "novelty flag). For research use on cohorts like the training cohort.")
LIMITS = [
    "The strata are those of the training cohort; a new cohort's own structure may differ. Novel "
    "subjects (farther from every exemplar than 95% of the training subjects were from their own) "
    "are outside what the model saw and their stratum is a guess.",
    "A different scanner, protocol, preprocessing or population shifts the embeddings; the bundle "
    "cannot detect this except through the novelty rate.",
    "The model was trained on few subjects; its strata inherit the caveats of the training report "
    "(stability, baseline, confounds).",
    "Not a diagnostic tool.",
]


def model_card(n_subjects: int, n_shards: int, modalities: list[str], grid: dict, template: dict,
               provenance: dict, training_cfg: dict, cv_summary: pd.DataFrame | None, sizes: list[int],
               best: dict, analysis: dict, novelty: dict) -> dict:
    """The card as a JSON-ready dict. ``cv_summary``: group/cv/summary.tsv (or None);
    ``sizes`` (K,): stratum sizes; ``best``: the chosen AP fit; ``analysis``:
    group/analysis_summary.json (its stability, baseline and ground_truth lines are used
    when present); ``novelty``: the rule and threshold (embedding units)."""
    card = {
        "trained_on": {"n_subjects": int(n_subjects), "n_shards": int(n_shards), "modalities": list(modalities),
                       "grid_shape": list(grid["shape"]), "voxel_size_mm": grid["voxel_size_mm"],
                       "template_hash": template["hash"], "template_source": template.get("source")},
        "training": {"epochs": training_cfg.get("epochs"), "cv_folds": training_cfg.get("cv_folds"),
                     "seed": provenance.get("seed")},
        "provenance": provenance,
        "cv_metrics": [] if cv_summary is None else cv_summary.to_dict(orient="records"),
        "strata": {"n_strata": len(sizes), "sizes": list(map(int, sizes)),
                   "silhouette": best.get("silhouette"), "damping": best.get("damping"),
                   "preference": best.get("preference")},
        "novelty": novelty,
        "intended_use": INTENDED_USE,
        "limits": LIMITS,
    }
    stab = analysis.get("stability") or {}
    if stab.get("status", "done") == "done" and "n_stable_clusters" in stab:
        card["stability"] = {k: stab.get(k) for k in ("ari_folds_vs_strata", "n_stable_clusters", "n_clusters",
                                                      "reproducible", "threshold", "strata")}
    base = analysis.get("baseline") or {}
    if base.get("status") == "done":
        card["baseline"] = {k: base.get(k) for k in ("components", "n_clusters", "ari_with_strata")}
    truth = analysis.get("ground_truth") or {}
    if "adjusted_rand_index" in truth:
        card["ground_truth"] = {"adjusted_rand_index": truth["adjusted_rand_index"],
                                "n_planted_strata": truth.get("n_planted_strata")}
    return card


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def card_markdown(card: dict) -> str:
    """MODEL_CARD.md: the card in a few lines."""
    t, tr, st, prov = card["trained_on"], card["training"], card["strata"], card["provenance"]
    lines = [
        "# Model card: mmfusion trained-model bundle", "",
        f"- **Trained on**: {t['n_subjects']} subjects ({t['n_shards']} shards), modalities "
        f"{' '.join(t['modalities'])}, grid {'x'.join(map(str, t['grid_shape']))} at {_fmt(t['voxel_size_mm'])} mm, "
        f"template {t['template_hash']} ({t['template_source']}).",
        f"- **Training**: {tr['epochs']} epochs, {tr['cv_folds']}-fold cross-validation, seed {tr['seed']}; "
        f"mmfusion {prov.get('mmfusion_version')}, config hash {prov.get('config_hash')}.",
        f"- **Strata**: {st['n_strata']} (sizes {', '.join(map(str, st['sizes']))}; silhouette "
        f"{_fmt(st['silhouette'])}).",
        f"- **Novelty**: {card['novelty']['rule']} (threshold {_fmt(card['novelty']['threshold'])}).",
    ]
    if "stability" in card:
        s = card["stability"]
        ari = (s.get("ari_folds_vs_strata") or {}).get("median")
        source = (s.get("strata") or {}).get("source", "final_model").replace("_", " ")
        lines.append(f"- **Stability**: strata from the {source} clustering; {s['n_stable_clusters']} of "
                     f"{s['n_clusters']} strata stable; fold models vs strata median ARI {_fmt(ari)}; "
                     f"reproducible: {s['reproducible']}.")
    if "baseline" in card:
        b = card["baseline"]
        lines.append(f"- **Baseline** (PCA of the images, {b['components']} components): {b['n_clusters']} clusters, "
                     f"ARI with the strata {_fmt(b['ari_with_strata'])}.")
    if "ground_truth" in card:
        lines.append(f"- **Ground truth** (simulated): ARI {_fmt(card['ground_truth']['adjusted_rand_index'])} "
                     f"against {card['ground_truth']['n_planted_strata']} planted strata.")
    if card["cv_metrics"]:
        lines += ["", "## Cross-validated reconstruction (median across folds)", "",
                  "| metric | modality | variant | median | MAD |", "|---|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['modality']} | {r['variant']} | {_fmt(r['median_across_folds'])} | "
                  f"{_fmt(r['mad_across_folds'])} |" for r in card["cv_metrics"]]
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Limits", ""]
    lines += [f"- {x}" for x in card["limits"]]
    return "\n".join(lines) + "\n"
