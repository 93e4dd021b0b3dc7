"""A simulated dataset's planted ground truth vs what the group level found.

Used by the group level (:mod:`mmfusion.levels.group`) when ``bids_dir/sourcedata/ground_truth/``
holds ``strata.tsv`` (written by :mod:`mmfusion.simulate`); outputs in ``group/ground_truth/``:
comparison.json, confusion.tsv, factor_match.tsv.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.io.atomic import atomic_path, write_json
from mmfusion.runlog import get_logger

log = get_logger(__name__)


def compare_ground_truth(truth_dir: Path, clusters: pd.Series, out_dir: Path, fa=None, result=None,
                         others: dict[str, pd.Series] | None = None) -> dict:
    """Compare the clustering (and factors) with a simulator's planted ground truth.

    ``truth_dir`` holds strata.tsv (participant_id, stratum), optionally planted.json and
    latent_factors.tsv. ``clusters``: cluster per participant_id; ``others``: more
    clusterings by name (the PCA baseline, each fold model), whose ARI vs the planted
    strata goes to ``adjusted_rand_index_of``. Writes confusion.tsv (strata x clusters
    counts), factor_match.tsv (each factor's best-correlated latent factor and whether
    that one was planted) and comparison.json; returns the dict.
    """
    from sklearn.metrics import adjusted_rand_score

    truth_dir, out_dir = Path(truth_dir), Path(out_dir)
    strata = pd.read_csv(truth_dir / "strata.tsv", sep="\t", dtype={"participant_id": str})
    strata = strata.set_index("participant_id")["stratum"]
    common = [s for s in clusters.index if s in strata.index]
    out = {"n_subjects_compared": len(common)}
    if not common:
        out["status"] = "no subject in common with the ground truth"
        return out
    planted_labels, found = strata.loc[common].to_numpy(), clusters.loc[common].to_numpy()
    out["adjusted_rand_index"] = float(adjusted_rand_score(planted_labels, found))
    out["n_planted_strata"] = int(len(np.unique(planted_labels)))
    out["n_clusters"] = int(len(np.unique(found)))
    out["adjusted_rand_index_of"] = {name: float(adjusted_rand_score(planted_labels, lab.loc[common].to_numpy()))
                                     for name, lab in (others or {}).items() if pd.Index(common).isin(lab.index).all()}
    confusion = pd.crosstab(pd.Series(planted_labels, name="stratum"), pd.Series(found, name="cluster"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "confusion.tsv") as tmp:
        confusion.to_csv(tmp, sep="\t")
    out["confusion_tsv"] = str(out_dir / "confusion.tsv")
    planted = {}
    if (truth_dir / "planted.json").is_file():
        planted = json.loads((truth_dir / "planted.json").read_text())
        out["planted_latent_factors"] = [f["name"] for f in planted.get("latent_factors", [])
                                         if f.get("depends_on_stratum")]
        out["planted_demographics"] = [k for k, v in planted.get("demographics", {}).items()
                                       if v.get("depends_on_stratum")]
    if fa is not None and (truth_dir / "latent_factors.tsv").is_file():
        match = match_factors(fa, truth_dir / "latent_factors.tsv", planted, result)
        with atomic_path(out_dir / "factor_match.tsv") as tmp:
            match.to_csv(tmp, sep="\t", index=False, float_format="%.4g")
        out["factor_match_tsv"] = str(out_dir / "factor_match.tsv")
    write_json(out_dir / "comparison.json", out)
    log.info("ground truth: ARI %.3f (%d planted strata, %d clusters)", out["adjusted_rand_index"],
             out["n_planted_strata"], out["n_clusters"])
    return out


def match_factors(fa, latent_tsv: Path, planted: dict, result=None) -> pd.DataFrame:
    """Per estimated factor: the latent factor it correlates with most (Pearson r on the
    common subjects), whether that latent factor or a loading (|l| >= 0.3) demographic
    was planted, and the factor's significance."""
    latent = pd.read_csv(latent_tsv, sep="\t", dtype={"participant_id": str}).set_index("participant_id")
    common = [s for s in fa.scores.index if s in latent.index]
    planted_latent = {f["name"] for f in planted.get("latent_factors", []) if f.get("depends_on_stratum")}
    planted_demo = {k for k, v in planted.get("demographics", {}).items() if v.get("depends_on_stratum")}
    rows = []
    for name in fa.scores.columns:
        s = fa.scores.loc[common, name].to_numpy()
        r = {c: float(np.corrcoef(s, latent.loc[common, c].to_numpy(float))[0, 1]) for c in latent.columns}
        best = max(r, key=lambda c: abs(r[c]))
        demo = [v for v in planted_demo if v in fa.loadings.index and abs(fa.loadings.loc[v, name]) >= 0.3]
        row = {"factor": name, "best_latent": best, "r": r[best], "latent_planted": best in planted_latent,
               "planted_demographics_loading": ",".join(sorted(demo))}
        if result is not None:
            t = result.table.set_index("factor").loc[name]
            row.update({"significant": bool(t["significant"]), "perm_significant": bool(t["perm_significant"])})
        rows.append(row)
    return pd.DataFrame(rows)
