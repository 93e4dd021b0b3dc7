"""The recovery ladder: where along the pipeline is the planted structure kept or lost?

Each stage of a finished run on ``mmfusion simulate`` data is clustered with the
product's own AP grid search (the run's ``stratify`` config) and with k-means at the true
k; the adjusted Rand index (ARI) of each against the planted strata is printed per
stage and dataset (seed), then the median and range over datasets. Stages:

  true maps        the simulator's true log-JAC and NDI (template grid, in-mask voxels,
                   each map scaled to [0, 1] by its population 0.1/99.9 percentiles)
  shard maps       the recovered log-JAC and NDI of the shards, normalized as the final
                   model saw them (group/model/normalization.json), in-mask voxels
  PCA baseline     group/baseline/embeddings.tsv (what every run reports beside the strata)
  embedding        group/embeddings.tsv (the product's default embedding: the final model)
  fold-NN          cv/fold_embeddings.h5: each fold's model embedding all subjects
  with skips       (``--with-skips``) a final model with U-Net skips (the paper's model),
                   trained here on the same shards, config and seed
  run's strata     group/strata/labels.tsv as the run wrote it (by default the consensus
                   of the final, fold and subsample clusterings; no k-means)

Usage (datasets prepared through the real CLI, see ``prepare``)::

    python bench/bench_recovery_ladder.py prepare WORK --n-subjects 36 --seeds 1 2 3 \\
        --config scripts/demo_config.yaml
    python bench/bench_recovery_ladder.py ladder WORK/seed-1 WORK/seed-2 WORK/seed-3 [--with-skips]
    python bench/bench_recovery_ladder.py epochs DEMO_DIR --config scripts/demo_config.yaml \\
        --epochs 20 --seeds 1 2 3 --model-overrides kernel_initializer=he_normal

``epochs`` trains final models on one finished run's shards for each (model variant,
epochs, learning rate, seed) and prints the final model's AP and k-means ARI.

``prepare`` runs ``mmfusion simulate`` (3 strata, 3 mm), then the template, participant
and group levels into ``WORK/seed-S/{bids,out}`` and prints each dataset's wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))


def prepare(work: Path, n_subjects: int, seeds: list[int], config: Path, extra: list[str]) -> None:
    """simulate -> template -> participant -> group through the CLI, one dataset per seed."""
    for seed in seeds:
        d = work / f"seed-{seed}"
        bids, out = d / "bids", d / "out"
        common = ["--config", str(config), "--seed", str(seed), "--skip-bids-validation"]
        steps = [] if bids.is_dir() else [["mmfusion", "simulate", str(bids), "--n-subjects", str(n_subjects),
                                           "--n-strata", "3", "--voxel-size", "3", "--seed", str(seed), *extra]]
        steps += [["mmfusion", str(bids), str(out), level, *common] for level in ("template", "participant")]
        steps += [["mmfusion", str(bids), str(out), "group", "--modalities", "jac", "ndi", *common]]
        start = time.monotonic()
        for cmd in steps:
            t0 = time.monotonic()
            subprocess.run(cmd, check=True)
            print(f"seed {seed}: {cmd[1] if cmd[1] == 'simulate' else cmd[3]} {time.monotonic() - t0:.0f} s",
                  flush=True)
        print(f"seed {seed}: prepared in {time.monotonic() - start:.0f} s", flush=True)


def _scaled(values: np.ndarray) -> np.ndarray:
    """(n, V) scaled to [0, 1] by the population 0.1/99.9 percentiles (as the normalizer)."""
    lo, hi = np.percentile(values, [0.1, 99.9])
    return np.clip((values - lo) / (hi - lo), 0, 1)


def true_maps(bids: Path, subjects: list[str]) -> np.ndarray:
    import nibabel as nib

    truth = bids / "sourcedata" / "ground_truth"
    mask = np.asarray(nib.load(truth / "template_mask.nii.gz").dataobj) > 0
    parts = []
    for kind in ("logjac", "ndi"):
        parts.append(_scaled(np.stack([np.asarray(nib.load(truth / f"{s}_space-template_desc-true_{kind}.nii.gz")
                                                  .dataobj)[mask] for s in subjects])))
    return np.hstack(parts)


def shard_maps(out: Path, modalities: list[str]) -> tuple[list[str], np.ndarray]:
    from mmfusion.learning import baseline
    from mmfusion.learning import shard_data
    from mmfusion.learning.intensity import PopulationNormalizer

    infos = shard_data.scan_shards(shard_data.discover_shards(out / "shards"), modalities)
    paths = [i.path for i in infos]
    norm = PopulationNormalizer.load(out / "group" / "model" / "normalization.json")
    return [f"sub-{i.subject}" for i in infos], baseline.image_matrix(paths, modalities, norm,
                                                                       baseline.union_mask(paths))


def final_embedding(out: Path, config: dict, modalities: list[str], seed: int,
                    history: list | None = None) -> np.ndarray:
    """A final model on all of ``out``'s shards (the product's training code, ``config``'s
    model and training sections, ``seed``), trained in a temporary folder, embedded (n, D);
    its per-epoch history is appended to ``history`` when given."""
    import tempfile

    from mmfusion.learning import shard_data
    from mmfusion.learning import training

    infos = shard_data.scan_shards(shard_data.discover_shards(out / "shards"), modalities)
    with tempfile.TemporaryDirectory() as tmp:
        learner = training.Learner(Path(tmp), infos, modalities, config, seed, False,
                                   shard_data.scan_volume_stats(infos, modalities))
        model, norm, fit, _ = training.train_final(learner)
        if history is not None:
            history.extend(fit.history)
        return training.embed(model, [i.path for i in infos], modalities, norm)


def with_skips_embedding(out: Path, config: dict, modalities: list[str], seed: int) -> np.ndarray:
    """A final model with skips on all shards (the paper's model), embedded."""
    return final_embedding(out, {**config, "model": {**config["model"], "skip_connections": True}},
                           modalities, seed)


def _derivatives(d: Path) -> Path:
    """A dataset's output folder: ``d/out`` (``prepare``) or ``d/derivatives`` (the demo's)."""
    return d / "out" if (d / "out").is_dir() else d / "derivatives"


def _model_variants(overrides: list[str]) -> list[tuple[str, dict]]:
    """``["kernel_initializer=he_normal", "fusion_dropout=0.1,kernel_initializer=he_normal"]``
    -> [(label, model-section overrides)], the config's own model first ("config")."""
    import yaml

    variants = [("config", {})]
    for item in overrides:
        pairs = [kv.split("=", 1) for kv in item.split(",")]
        variants.append((item, {k: yaml.safe_load(v) for k, v in pairs}))
    return variants


def score_embedding(X: np.ndarray, y: np.ndarray, stratify: dict, seed: int, threads: int) -> dict:
    """The product's AP grid search and k-means at the planted k on ``X`` (subjects x
    features), each against the planted strata ``y``: ``ap_clusters``, ``ap_ari``, ``kmeans_ari``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from mmfusion.strata import ap_grid

    grid = ap_grid.grid_search(X, stratify, seed=seed, n_threads=threads, quiet=True)
    km = KMeans(len(np.unique(y)), n_init=10, random_state=0).fit_predict(X)
    return {"ap_clusters": int(grid.best["n_clusters"]), "ap_ari": adjusted_rand_score(y, grid.labels),
            "kmeans_ari": adjusted_rand_score(y, km)}


def epochs_sweep(d: Path, config_path: Path, epochs: list[int], learning_rates: list[float | None],
                 seeds: list[int], threads: int, model_overrides: list[str] = ()) -> pd.DataFrame:
    """Final models on one dataset's shards for every (model variant, epochs, learning rate,
    seed): AP and k-means ARI of each embedding against the planted strata, the embedding's
    median per-dimension SD across subjects, the last epoch's loss and the training time (s).
    ``model_overrides`` adds model variants (``KEY=VALUE[,KEY=VALUE]`` of the model section)
    beside the config's own model."""
    from mmfusion.config import load_config
    from mmfusion.learning import shard_data

    out, modalities = _derivatives(d), ["jac", "ndi"]
    truth = pd.read_csv(d / "bids" / "sourcedata" / "ground_truth" / "strata.tsv", sep="\t")
    infos = shard_data.scan_shards(shard_data.discover_shards(out / "shards"), modalities)
    y = truth.set_index("participant_id").loc[[f"sub-{i.subject}" for i in infos], "stratum"].to_numpy()
    rows = []
    for label, model in _model_variants(list(model_overrides)):
        for n_epochs in epochs:
            for lr in learning_rates:
                training = {"epochs": n_epochs, **({"learning_rate": lr} if lr is not None else {})}
                config = load_config(config_path, {"training": training, "model": model})
                for seed in seeds:
                    t0, history = time.monotonic(), []
                    X = final_embedding(out, config, modalities, seed, history)
                    seconds = time.monotonic() - t0
                    rows.append({"model": label, "epochs": n_epochs, "learning_rate": config["training"]["learning_rate"],
                                 "steps": n_epochs * len(infos), "seed": seed,
                                 **score_embedding(X, y, config["stratify"], seed, threads),
                                 "median_sd": float(np.median(X.std(axis=0))),
                                 "final_loss": float(history[-1]["loss"]), "train_s": seconds})
                    r = rows[-1]
                    print(f"{label} epochs {n_epochs:4d} lr {r['learning_rate']:.4g} ({r['steps']} steps) seed {seed}: "
                          f"AP ARI {r['ap_ari']:6.3f} ({r['ap_clusters']} clusters)  k-means ARI {r['kmeans_ari']:6.3f}  "
                          f"median SD {r['median_sd']:.4f}  loss {r['final_loss']:.4f}  {seconds:.0f} s", flush=True)
    return pd.DataFrame(rows)


def ladder(dirs: list[Path], with_skips: bool, threads: int) -> pd.DataFrame:
    from sklearn.metrics import adjusted_rand_score

    from mmfusion.io.embeddings import read_embeddings

    rows = []
    for d in dirs:
        bids, out = d / "bids", _derivatives(d)
        prov = sorted((out / "logs").glob("group-*_provenance.json"))[-1]
        record = json.loads(prov.read_text())
        config, seed = record["config"], int(record["seed"])  # the group run's own config and seed
        modalities = ["jac", "ndi"]
        truth = pd.read_csv(bids / "sourcedata" / "ground_truth" / "strata.tsv", sep="\t").set_index("participant_id")
        subjects, shard_X = shard_maps(out, modalities)
        y = truth.loc[subjects, "stratum"].to_numpy()
        stages = {"true maps": true_maps(bids, subjects), "shard maps": shard_X}
        for name, tsv in (("PCA baseline", out / "group" / "baseline" / "embeddings.tsv"),
                          ("embedding", out / "group" / "embeddings.tsv")):
            ids, X = read_embeddings(tsv)
            assert ids["participant_id"].tolist() == subjects, tsv
            stages[name] = X
        import h5py
        with h5py.File(out / "group" / "cv" / "fold_embeddings.h5", "r") as h5:
            for f, X in enumerate(h5["model"][...]):
                stages[f"fold-{f + 1:02d} ({h5.attrs['variant']})"] = X
        if with_skips:
            stages["with skips (paper)"] = with_skips_embedding(out, config, modalities, seed)
        for stage, X in stages.items():
            rows.append({"dataset": d.name, "stage": stage, "dim": X.shape[1], "n": X.shape[0],
                         **score_embedding(X, y, config["stratify"], seed, threads)})
            r = rows[-1]
            print(f"{d.name:10s} {stage:28s} dim {r['dim']:6d}  AP ARI {r['ap_ari']:6.3f} "
                  f"({r['ap_clusters']} clusters)  k-means ARI {r['kmeans_ari']:6.3f}", flush=True)
        strata = pd.read_csv(out / "group" / "strata" / "labels.tsv", sep="\t").drop_duplicates("participant_id")
        strata = strata.set_index("participant_id").loc[subjects, "cluster"].to_numpy()
        rows.append({"dataset": d.name, "stage": "run's strata", "dim": 0, "n": len(strata),
                     "ap_clusters": int(strata.max()) + 1, "ap_ari": adjusted_rand_score(y, strata),
                     "kmeans_ari": float("nan")})
        stage = "run's strata"
        print(f"{d.name:10s} {stage:28s}             ARI    {rows[-1]['ap_ari']:6.3f} "
              f"({rows[-1]['ap_clusters']} strata)", flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("work", type=Path)
    prep.add_argument("--n-subjects", type=int, default=36)
    prep.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    prep.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "scripts" / "demo_config.yaml")
    prep.add_argument("--simulate-args", nargs=argparse.REMAINDER, default=[])
    lad = sub.add_parser("ladder")
    lad.add_argument("dirs", type=Path, nargs="+")
    lad.add_argument("--with-skips", action="store_true")
    lad.add_argument("--threads", type=int, default=2)
    ep = sub.add_parser("epochs")
    ep.add_argument("dir", type=Path)
    ep.add_argument("--config", type=Path, required=True)
    ep.add_argument("--epochs", type=int, nargs="+", default=[20, 40])
    ep.add_argument("--learning-rates", type=float, nargs="+", default=[None])
    ep.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ep.add_argument("--threads", type=int, default=2)
    ep.add_argument("--model-overrides", nargs="+", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="further model variants beside the config's (e.g. kernel_initializer=he_normal)")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.work, args.n_subjects, args.seeds, args.config, args.simulate_args)
        return
    if args.cmd == "epochs":
        table = epochs_sweep(args.dir, args.config, args.epochs, args.learning_rates, args.seeds, args.threads,
                             args.model_overrides)
        summary = table.groupby(["model", "epochs", "learning_rate"], sort=False).agg(
            ap_median=("ap_ari", "median"), ap_min=("ap_ari", "min"), kmeans_median=("kmeans_ari", "median"),
            kmeans_min=("kmeans_ari", "min"), median_sd=("median_sd", "median"), final_loss=("final_loss", "median"),
            train_s=("train_s", "median"))
        print("\nmedian (min) over seeds")
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
        return
    table = ladder(args.dirs, args.with_skips, args.threads)
    summary = table.groupby("stage", sort=False).agg(
        ap_median=("ap_ari", "median"), ap_min=("ap_ari", "min"), ap_max=("ap_ari", "max"),
        kmeans_median=("kmeans_ari", "median"), datasets=("ap_ari", "size"))
    print("\nmedian and range over datasets")
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
