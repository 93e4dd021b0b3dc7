"""The group level, stage by stage; every stage returns here.

:func:`run_group_level` calls, in order:

1. the input checks (:func:`check_inputs`): the shards, listed once (:func:`check_shards`),
   scanned and checked against the config (:func:`mmfusion.learning.shard_data.scan_and_check`),
   the phenotype tables, read and checked once (:mod:`mmfusion.strata.phenotypes`), the
   site harmonization (:mod:`mmfusion.strata.harmonize`);
2. the learning (:func:`run_learning` -> :func:`mmfusion.learning.training.learn`): CV,
   final model, embeddings, baseline; returns the ids and the float32 embeddings;
3. the analysis of those embeddings (:func:`analyse`): clustering (:mod:`mmfusion.strata.ap_grid`),
   the checks of the strata (:mod:`mmfusion.strata.validity`: baseline, stability,
   confounds), phenotype factors (:mod:`mmfusion.strata.phenotypes`) and statistics
   (:mod:`mmfusion.strata.stats`), the ground-truth comparison of simulated data
   (:mod:`mmfusion.strata.ground_truth`), the summary (``analysis_summary.json``);
4. the trained-model bundle (:func:`write_model_bundle` -> ``group/bundle/``,
   :mod:`mmfusion.io.bundle`);
5. the report (:mod:`mmfusion.report.group_report`).

With ``--step`` (:data:`STEPS`, docs/hpc.md) one part runs instead, so that the group
level runs as independent jobs (``slurm/submit.sh``): ``train-fold --fold N`` (one CV
fold, every variant), ``train-final`` (the final model), and ``analysis`` (step 2's
remaining outputs from the training steps' files, then 3-5; it refuses with exit 66
while a training step is unfinished). ``--step all``, the default, is the whole level
as above; the results of the steps equal it (:mod:`mmfusion.learning.training`).

With ``--model BUNDLE`` it runs :func:`apply_group_level` instead: the bundle and the shards
checked against it, the embeddings of the stored model, each subject's stratum and novelty
(:mod:`mmfusion.strata.assign`), the new cohort's phenotype statistics, ``group/applied/``
and the report ``mmfusion_applied_report.html`` (:mod:`mmfusion.report.applied_report`).

Analysis outputs, under ``ctx.group_dir`` (docs/method.md#6-clustering,
docs/method.md#7-phenotypes-and-statistics)::

    group/strata/       labels.tsv, ap_grid.tsv, ap_grid.png, ap_selection.json
    group/phenotypes/   variables.tsv, missing.tsv, factors.tsv, loadings.tsv,
                        loadings.png, scores.tsv, summary.json
    group/stats/        kruskal_wallis.tsv, profiles.tsv, profiles_median.tsv,
                        profiles.png, distributions.png, permutation_null.png
    group/baseline/, group/stability/, group/confounds/   :mod:`mmfusion.strata.validity`
    group/ground_truth/ comparison.json, confusion.tsv, factor_match.tsv
                        (only for simulated datasets with sourcedata/ground_truth/)
    group/analysis_summary.json   inputs (with sha256), counts, output paths, caveats

Every embedding row (subject-session) is clustered. Subjects with several sessions enter
the statistics once, with the cluster of their first session (sorted label), since
phenotypes are per participant.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion.errors import MissingInputError
from mmfusion.io.shards import split_stem
from mmfusion.report.group_report import CAVEATS
from mmfusion.runlog import get_logger, terminal_print
from mmfusion.strata import phenotypes as ph

log = get_logger(__name__)
#: The values of ``group --step``: the whole level, or one of its independent steps.
STEPS = ("all", "train-fold", "train-final", "analysis")


def run_group_level(ctx) -> Path | None:
    """Run the whole group level; returns the path of the HTML report (None on a
    non-chief worker of a multi-worker run, which only trains). With ``--model``
    (``ctx.model``) the trained model is applied instead (:func:`apply_group_level`)."""
    from mmfusion.learning import distribute

    if getattr(ctx, "model", None) is not None:
        distribute.set_threads(getattr(ctx, "omp_nthreads", None))  # before any TensorFlow op
        return apply_group_level(ctx)
    step = getattr(ctx, "step", "all")
    if step != "all":
        return run_step(ctx, step)
    inputs = check_inputs(ctx)  # no TensorFlow yet: bad inputs fail in seconds
    log.info("group level on %d subject(s), modalities %s", len(ctx.participant_labels), " ".join(ctx.modalities))
    distribute.set_threads(getattr(ctx, "omp_nthreads", None))  # before any TensorFlow op
    distribute.make_strategy()  # a multi-worker strategy must exist before any other TF op
    learned = run_learning(ctx, inputs.infos)
    if not distribute.is_chief():
        log.info("non-chief worker: training done; the chief writes the analysis and the report")
        return None
    summary = analyse(ctx, learned.ids, learned.embeddings.astype(np.float64), Path(learned["embeddings_tsv"]),
                      inputs.pheno, inputs.confounds)
    write_model_bundle(ctx, inputs.infos, learned.ids, learned.embeddings, summary)
    return write_report(ctx)


def run_step(ctx, step: str) -> Path | None:
    """One step of the group level (``--step``; :data:`STEPS`): the inputs checked as for the
    whole level, then one fold (``ctx.fold``), the final model, or the analysis (the
    learning's remaining outputs from the steps' files, the analysis, the bundle and the
    report; returns the report's path). A finished step is skipped unless ``--force``."""
    from mmfusion.learning import distribute, training

    inputs = check_inputs(ctx)
    distribute.set_threads(getattr(ctx, "omp_nthreads", None))  # before any TensorFlow op
    log.info("group level, step %s%s, on %d subject(s)", step, f" {ctx.fold}" if step == "train-fold" else "",
             len(ctx.participant_labels))
    ctx.provenance.extra["group_step"] = {"step": step, **({"fold": int(ctx.fold)} if step == "train-fold" else {})}
    learner = training.open_step(ctx.group_dir, inputs.infos, list(ctx.modalities), ctx.config, int(ctx.seed),
                                 bool(ctx.resume), bool(ctx.force), train=step != "analysis")
    if step == "train-fold":
        path = training.train_fold_step(learner, int(ctx.fold))
        ctx.provenance.extra["learning"] = {"fold_results": str(path)}
        return None
    if step == "train-final":
        path = training.train_final_step(learner)
        ctx.provenance.extra["learning"] = {"model": str(path)}
        return None
    learned = training.finish_from_disk(learner)
    ctx.provenance.extra["learning"] = {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in learned.outputs.items() if k != "reconstructions"}
    summary = analyse(ctx, learned.ids, learned.embeddings.astype(np.float64), Path(learned["embeddings_tsv"]),
                      inputs.pheno, inputs.confounds)
    write_model_bundle(ctx, inputs.infos, learned.ids, learned.embeddings, summary)
    return write_report(ctx)


# ------------------------------------------------------------------------ 1. inputs
@dataclass
class GroupInputs:
    """What the checks found: the scanned shards, the phenotype tables and the confound
    table (one row per shard, in the order of ``infos``)."""

    infos: list
    pheno: ph.PhenotypeInput
    confounds: pd.DataFrame


def check_inputs(ctx) -> GroupInputs:
    """Everything the group level would otherwise find wrong only after training, checked
    before any model is built: the shards (exit 66 for subjects without one, or a shard
    that lacks a requested modality; their grid vs ``model.input_shape``;
    ``training.cv_folds`` vs the number of subjects, exit 64), the phenotype tables (read
    and type-checked, exit 65 naming the file, column and line of a junk cell) and the
    site harmonization. Sets ``ctx.participant_labels`` to the subjects analysed."""
    from mmfusion.learning import shard_data

    ctx.participant_labels, paths = select_shards(ctx, list_shards(ctx))
    count_phenotype_only(ctx)
    infos = shard_data.scan_and_check(paths, ctx.modalities, ctx.allow_missing, ctx.config)
    participants = [f"sub-{s}" for s in dict.fromkeys(i.subject for i in infos)]
    pheno = ph.check_phenotype_input(ph.load_phenotype_input(ctx.bids_dir, ctx.phenotypes_file), participants,
                                     ctx.config["phenotypes"])
    ctx.provenance.add_inputs(pheno.files)
    confounds = collect_confounds(ctx, infos)
    check_harmonization(ctx, infos, confounds)
    return GroupInputs(infos, pheno, confounds)


def expected_subjects(bids_dir: Path, labels: list[str]) -> list[str]:
    """Subject labels the group level should see: ``labels`` if given, else every
    ``sub-*`` folder of the raw dataset (labels without 'sub-')."""
    if labels:
        return sorted(labels)
    return sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())


def list_shards(ctx) -> list[Path]:
    """Every shard of ``output_dir/shards`` (``sub-*.h5``), sorted: the one listing of the run."""
    return sorted((ctx.output_dir / "shards").glob("sub-*.h5"))


def check_shards(ctx) -> list[str]:
    """Return the subjects to analyse; refuse (exit 66) if some have no shard, unless
    ``--allow-missing`` is given, in which case they are listed and skipped."""
    return select_shards(ctx, list_shards(ctx))[0]


def select_shards(ctx, paths: list[Path]) -> tuple[list[str], list[Path]]:
    """(subjects to analyse, their shards) among ``paths``: see :func:`check_shards`."""
    expected = expected_subjects(ctx.bids_dir, ctx.participant_labels)
    present = {split_stem(p.stem)[0] for p in paths}
    missing = [s for s in expected if s not in present]
    available = [s for s in expected if s in present]
    if missing and not ctx.allow_missing:
        listed = " ".join(f"sub-{s}" for s in missing[:30]) + (" ..." if len(missing) > 30 else "")
        raise MissingInputError(
            f"{ctx.output_dir / 'shards'}: no shard for {len(missing)} subject(s): {listed}; run the "
            "participant level for them, or pass --allow-missing to analyse the others")
    if missing:
        log.warning("--allow-missing: skipping %d subject(s) without a shard: %s",
                    len(missing), " ".join(f"sub-{s}" for s in missing))
    if not available:
        raise MissingInputError(f"{ctx.output_dir / 'shards'}: no shards found; run the participant level first")
    ctx.provenance.extra["subjects_missing_shards"] = [f"sub-{s}" for s in missing]
    wanted = set(available)
    shards = [p for p in paths if split_stem(p.stem)[0] in wanted]
    ctx.provenance.add_inputs(shards)
    return available, shards


def count_phenotype_only(ctx) -> list[str]:
    """participants.tsv rows without an imaging folder: logged, and recorded in the
    provenance (the report shows their count as "phenotype only")."""
    from mmfusion.io.bids import phenotype_only_subjects

    labels = [f"sub-{s}" for s in phenotype_only_subjects(ctx.bids_dir)]
    if labels:
        log.info("%d participant(s) of participants.tsv are phenotype only (no imaging folder): %s",
                 len(labels), " ".join(labels[:20]) + (" ..." if len(labels) > 20 else ""))
    ctx.provenance.extra["phenotype_only_participants"] = labels
    return labels


def collect_confounds(ctx, infos) -> pd.DataFrame:
    """The confound table of the shards ``infos`` (:func:`mmfusion.strata.validity.collect_confounds`),
    collected once, before training."""
    from mmfusion.learning.shard_data import shard_ids
    from mmfusion.strata import validity

    return validity.collect_confounds(ctx, shard_ids(infos))


def check_harmonization(ctx, infos, confounds: pd.DataFrame | None = None) -> None:
    """With ``stratify.harmonize_site`` set: the column exists, covariates are numeric,
    every shard of ``infos`` has a site and every site >= 2 shards (a ComBat fit on random
    data with the real confound table, ``confounds`` when already collected), before any
    training; exit 64/65 naming the problem."""
    from mmfusion.strata.harmonize import harmonize_for_clustering

    cfg = ctx.config["stratify"]
    if cfg["harmonize_site"] is None:
        return
    confounds = collect_confounds(ctx, infos) if confounds is None else confounds
    trial = np.random.default_rng(0).standard_normal((len(confounds), 3))
    harmonize_for_clustering(trial, confounds, cfg)


# ---------------------------------------------------------------------- 2. learning
def run_learning(ctx, infos=None):
    """The learning stage (:func:`mmfusion.learning.training.learn`; outputs in its module
    docstring) on the shards ``infos`` checked by :func:`check_inputs` (when None: the
    shards of ``ctx.participant_labels``, listed and checked by ``learn``); records the
    output paths in the provenance. Returns the
    :class:`mmfusion.learning.training.LearningResult` (ids, float32 embeddings, paths)."""
    from mmfusion.learning import training

    result = training.learn(ctx.output_dir / "shards", ctx.group_dir, list(ctx.modalities), ctx.config,
                            int(ctx.seed), resume=bool(ctx.resume), allow_missing=bool(ctx.allow_missing),
                            participant_labels=list(ctx.participant_labels), infos=infos)
    ctx.provenance.extra["learning"] = {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in result.outputs.items() if k != "reconstructions"}
    return result


# ---------------------------------------------------------------------- 3. analysis
def run_analysis(ctx, embeddings_tsv: Path, pheno: ph.PhenotypeInput | None = None) -> dict:
    """:func:`analyse` of the embeddings in ``embeddings_tsv`` (a re-analysis of a finished
    training); ``pheno``: the checked tables (read here when None)."""
    from mmfusion.io.embeddings import read_embeddings

    ids, X = read_embeddings(embeddings_tsv)
    return analyse(ctx, ids, X, Path(embeddings_tsv), pheno)


def analyse(ctx, ids: pd.DataFrame, X: np.ndarray, source: Path, pheno: ph.PhenotypeInput | None = None,
            confound_values: pd.DataFrame | None = None) -> dict:
    """Strata + their checks + phenotype factors + statistics (+ ground truth when
    simulated) of the embeddings ``X`` (n, d) of the rows ``ids`` (participant_id,
    session), as saved in ``source`` (the embeddings TSV, hashed into the summary).
    Returns the summary (also written as analysis_summary.json)."""
    from mmfusion.strata import validity

    n_threads = max(1, int(getattr(ctx, "nprocs", 1) or 1), int(getattr(ctx, "omp_nthreads", 1) or 1))
    log.info("analysis of %d embedding(s) of dimension %d on %d thread(s)", X.shape[0], X.shape[1], n_threads)
    summary = _summary_head(ctx, X, source)
    if confound_values is None:  # a re-analysis: collected here
        confound_values = validity.collect_confounds(ctx, ids)
    X = harmonize(ctx, X, confound_values, summary)
    final_labels = cluster(ctx, ids, X, source, n_threads, summary)
    labels, others = check_strata(ctx, ids, X, final_labels, n_threads, confound_values, summary)
    per_subject = one_row_per_participant(ids, labels)
    pheno = pheno or ph.load_phenotype_input(ctx.bids_dir, ctx.phenotypes_file)
    fa = phenotype_factors(ctx, pheno, per_subject, summary)
    result = factor_statistics(ctx, fa, per_subject, source, summary)
    compare_with_ground_truth(ctx, per_subject, fa, result, others, summary)
    return write_summary(ctx, summary)


def _summary_head(ctx, X: np.ndarray, source: Path) -> dict:
    from mmfusion.provenance import sha256_file

    return {"inputs": {"embeddings": str(source), "embeddings_sha256": sha256_file(source)},
            "n_embeddings": int(X.shape[0]), "embedding_dim": int(X.shape[1]), "seed": int(ctx.seed),
            "outputs": {}, "caveats": []}


def harmonize(ctx, X: np.ndarray, confound_values: pd.DataFrame, summary: dict) -> np.ndarray:
    """``X`` harmonized across sites when ``stratify.harmonize_site`` is set (:mod:`mmfusion.strata.harmonize`)."""
    from mmfusion.strata.harmonize import harmonize_for_clustering

    cfg = ctx.config["stratify"]
    X, summary["harmonization"] = harmonize_for_clustering(X, confound_values, cfg)
    if summary["harmonization"]["status"] == "done":
        log.info("embeddings harmonized across %s (%s) before clustering", cfg["harmonize_site"],
                 ", ".join(f"{k}: {v}" for k, v in summary["harmonization"]["sites"].items()))
    return X


def cluster(ctx, ids: pd.DataFrame, X: np.ndarray, source: Path, n_threads: int, summary: dict) -> np.ndarray:
    """The final model's clustering: AP grid search (:mod:`mmfusion.strata.ap_grid`) ->
    group/strata/; returns the labels (n,) (the strata are chosen from them and the
    stability clusterings by :func:`check_strata`)."""
    from mmfusion.strata import ap_grid

    grid = ap_grid.grid_search(X, ctx.config["stratify"], seed=ctx.seed, n_threads=n_threads, source=str(source))
    paths = ap_grid.write_outputs(grid, ids, Path(ctx.group_dir) / "strata")
    summary["outputs"]["strata"] = {k: str(v) for k, v in paths.items()}
    summary["clustering"] = {"best": grid.best, "counts": grid.counts,
                             "cluster_sizes": np.bincount(grid.labels).tolist()}
    if ids["session"].ne("").any() and ids["participant_id"].duplicated().any():
        summary["caveats"].append("several sessions per subject: every session was clustered, the "
                                  "statistics use each subject's first session")
    return grid.labels


def one_row_per_participant(ids: pd.DataFrame, labels: np.ndarray) -> pd.Series:
    """Cluster label per participant (first session in sorted order)."""
    df = ids.assign(cluster=labels).sort_values(["participant_id", "session"], kind="mergesort")
    return df.drop_duplicates("participant_id").set_index("participant_id")["cluster"]


def check_strata(ctx, ids: pd.DataFrame, X: np.ndarray, final_labels: np.ndarray, n_threads: int,
                 confound_values: pd.DataFrame, summary: dict) -> tuple[np.ndarray, dict[str, pd.Series]]:
    """The strata and their checks: baseline, stability and confounds
    (:mod:`mmfusion.strata.validity`) of the final model's clustering ``final_labels`` (n,).
    Writes the strata into group/strata/labels.tsv (column ``cluster``; the final model's
    clustering beside it) and returns them (n,) with the other clusterings per participant
    (final model, baseline, fold models) for the ground truth."""
    from mmfusion.strata import ap_grid, validity

    checks = validity.run_checks(ctx, Path(ctx.group_dir), ids, X, final_labels, n_threads, confound_values)
    labelings, strata = checks.pop("labelings"), checks.pop("strata")
    summary.update(checks)
    summary["clustering"]["strata"] = checks["stability"]["strata"]
    ap_grid.write_labels(Path(ctx.group_dir) / "strata" / "labels.tsv", ids, strata, final_model_cluster=final_labels)
    others = {name: one_row_per_participant(ids, lab) for name, lab in labelings.items()
              if name == "baseline" or name.startswith("fold-") or name.startswith("baseline_fold-")}
    if checks["stability"]["strata"]["source"] == "consensus":
        others["final_model"] = one_row_per_participant(ids, final_labels)
    return strata, others


def phenotype_factors(ctx, pheno: ph.PhenotypeInput, per_subject: pd.Series, summary: dict, root: Path | None = None):
    """Phenotype factors (:mod:`mmfusion.strata.phenotypes`: variables, PCA + varimax) of
    the participants with an embedding -> ``root``/phenotypes/ (``root``: group/ unless
    given); None without phenotypes."""
    from mmfusion.provenance import sha256_file

    if pheno.raw is None:
        summary["phenotypes"] = {"status": f"not run: {pheno.skipped}"}
        return None
    cfg, files = ctx.config["phenotypes"], pheno.files
    summary["inputs"]["phenotypes"] = {str(f): sha256_file(f) for f in files}
    common, counts = ph.common_subjects(pheno, list(per_subject.index))
    table = ph.prepare_variables(pheno.raw.loc[common], cfg, str(files[0]), files)
    fa = ph.factor_analysis(table.data, cfg["eigenvalue_threshold"])
    paths = ph.write_outputs(table, fa, Path(root or ctx.group_dir) / "phenotypes", cfg["loading_threshold"],
                             extra_summary={"subject_counts": counts, "files": [str(f) for f in files]})
    summary["outputs"]["phenotypes"] = {k: str(v) for k, v in paths.items()}
    summary["phenotypes"] = {"status": "done", "subject_counts": {k: (len(v) if isinstance(v, list) else v)
                                                                  for k, v in counts.items()},
                             "n_factors": int(fa.loadings.shape[1]),
                             "explained_variance_ratio": float(fa.factors["explained_variance_ratio"].sum())}
    return fa


def factor_statistics(ctx, fa, per_subject: pd.Series, source: Path, summary: dict, root: Path | None = None):
    """The factors' tests across the strata (:mod:`mmfusion.strata.stats`) -> ``root``/stats/
    (``root``: group/ unless given); None without factors."""
    from mmfusion.strata import stats

    if fa is None:
        return None
    cfg = ctx.config["stats"]
    labels = per_subject.loc[fa.scores.index].to_numpy()
    result = stats.run_stats(fa.scores, labels, cfg, seed=ctx.seed, source=str(source))
    paths = stats.write_outputs(result, fa.scores, labels, Path(root or ctx.group_dir) / "stats")
    summary["outputs"]["stats"] = {k: str(v) for k, v in paths.items()}
    summary["stats"] = {"n_significant": int(result.table["significant"].sum()),
                        "n_perm_significant": int(result.table["perm_significant"].sum()),
                        "n_permutations": int(cfg["n_permutations"])}
    return result


def compare_with_ground_truth(ctx, per_subject: pd.Series, fa, result, others: dict[str, pd.Series],
                              summary: dict, root: Path | None = None) -> None:
    """A simulated dataset (``sourcedata/ground_truth/strata.tsv``): the strata, factors
    and other clusterings vs the planted truth (:mod:`mmfusion.strata.ground_truth`) ->
    ``root``/ground_truth/ (``root``: group/ unless given)."""
    from mmfusion.strata.ground_truth import compare_ground_truth

    truth = Path(ctx.bids_dir) / "sourcedata" / "ground_truth"
    if (truth / "strata.tsv").is_file():
        summary["ground_truth"] = compare_ground_truth(truth, per_subject, Path(root or ctx.group_dir) / "ground_truth",
                                                       fa, result, others)


def write_summary(ctx, summary: dict) -> dict:
    """The caveats appended, ``group/analysis_summary.json`` written; returns ``summary``."""
    from mmfusion.io.atomic import write_json

    summary["caveats"] += CAVEATS
    write_json(Path(ctx.group_dir) / "analysis_summary.json", summary)
    return summary


# ------------------------------------------------------------------ 4. the bundle
def write_model_bundle(ctx, infos, ids: pd.DataFrame, embeddings: np.ndarray, analysis: dict) -> Path:
    """The trained-model bundle (:mod:`mmfusion.io.bundle`) -> ``group/bundle/``: the final
    model, its normalizer, the config, the grid and template of the shards ``infos``, the
    training embeddings (n, D) of the rows ``ids`` with their strata and exemplars, the
    novelty threshold, the model card and the manifest. ``analysis``: the summary
    :func:`analyse` returned."""
    from mmfusion import __version__
    from mmfusion.config import config_hash
    from mmfusion.io import bundle as bd
    from mmfusion.report.model_card import card_markdown, model_card
    from mmfusion.strata import assign

    g = Path(ctx.group_dir)
    labels = pd.read_csv(g / "strata" / "labels.tsv", sep="\t")["cluster"].to_numpy()
    harmonized = (analysis.get("harmonization") or {}).get("status") == "done"
    best = analysis["clustering"]["best"]
    X = np.asarray(embeddings, dtype=np.float64)
    if harmonized:  # the strata live in the harmonized space: no exemplars new subjects could use
        index, exemplars, own, threshold = np.zeros(0, int), np.zeros((0, X.shape[1])), np.full(len(X), np.nan), None
    elif strata_source(analysis) == "consensus":  # not one AP fit: each stratum's medoid is its exemplar
        index = assign.medoids(X, labels)
        exemplars = X[index].copy()
    else:
        ex = assign.training_exemplars(X, labels, best, ctx.config["stratify"], int(ctx.seed), log_only=True)
        index, exemplars = ex.index, ex.embeddings
    if not harmonized:
        own = assign.own_exemplar_distance(X, labels, exemplars)
        threshold = assign.novelty_threshold(own)
    meta = bundle_meta(ctx, infos, labels, best, harmonized, threshold, config_hash(ctx.config), __version__,
                       strata_source(analysis))
    template_files = bundle_template_files(ctx.output_dir, meta["template"]["source"],
                                           float(ctx.config["spatial"]["registration_resolution"]))
    meta["template"]["files"] = sorted(template_files)
    cv = g / "cv" / "summary.tsv"
    card = model_card(len({i.subject for i in infos}), len(infos), list(ctx.modalities), meta["grid"],
                      meta["template"], meta["provenance"], ctx.config["training"],
                      pd.read_csv(cv, sep="\t") if cv.is_file() else None, meta["strata"]["sizes"], best,
                      analysis, meta["novelty"])
    strata = {"ids": ids, "embeddings": embeddings, "stratum": labels, "own_distance": own,
              "exemplar_index": index, "exemplar_embedding": exemplars}
    path = bd.write_bundle(g / "bundle", g / "model", meta, ctx.config, strata, card, card_markdown(card), __version__,
                           extra_files=template_files)
    log.info("trained-model bundle: %s (apply it with group --model %s)", path, path)
    return path


def strata_source(analysis: dict) -> str:
    """How the strata of an analysis summary were made: 'consensus' or 'final_model'."""
    return ((analysis.get("clustering") or {}).get("strata") or {}).get("source", "final_model")


def bundle_template_files(output_dir: Path, source: str, resolution: float) -> dict[str, Path]:
    """The template the shards were registered to, for the bundle ({bundle path: file}): the
    study template and its brain mask (``source`` 'study'), so another site makes its shards
    with ``--template BUNDLE/template/tpl-study_res-<r>_T1w.nii.gz``; nothing for the
    built-in template (every installation has it) or a user template (the user has it)."""
    from mmfusion.spatial.template import study_template_paths

    if source != "study":
        return {}
    paths = study_template_paths(output_dir, resolution)
    if not (paths["t1w"].is_file() and paths["mask"].is_file()):
        log.warning("the study template %s is missing: the bundle is written without it", paths["t1w"])
        return {}
    return {f"template/{paths[k].name}": paths[k] for k in ("t1w", "mask")}


def bundle_meta(ctx, infos, labels: np.ndarray, best: dict, harmonized: bool, threshold: float | None,
                cfg_hash: str, version: str, source: str = "final_model") -> dict:
    """bundle.json: modalities, template, grid, provenance, strata, novelty rule."""
    from mmfusion.io.shards import read_attrs
    from mmfusion.strata.assign import NOVELTY_PERCENTILE

    attrs = read_attrs(infos[0].path)
    affine = np.asarray(infos[0].affine, dtype=np.float64)
    return {
        "modalities": list(ctx.modalities),
        "template": {"hash": str(attrs.get("template_hash")), "source": str(attrs.get("template_source"))},
        "grid": {"shape": [int(v) for v in infos[0].shape], "affine": affine.tolist(),
                 "voxel_size_mm": float(np.linalg.norm(affine[:3, 0]))},
        "shard_config_hash": str(attrs.get("config_hash")),
        "provenance": {"mmfusion_version": version, "seed": int(ctx.seed), "config_hash": cfg_hash,
                       "run_id": ctx.provenance.run_id, "trained": ctx.provenance.started},
        "strata": {"n_strata": int(labels.max()) + 1, "sizes": np.bincount(labels).tolist(),
                   "n_training_rows": int(len(labels)), "harmonized": bool(harmonized),
                   "source": source,
                   "ap_fit": {k: best.get(k) for k in ("damping", "preference", "silhouette", "n_clusters")}},
        "novelty": {"rule": f"distance to the nearest exemplar > the {NOVELTY_PERCENTILE:g}th percentile of the "
                            "training subjects' distances to their own exemplar",
                    "percentile": NOVELTY_PERCENTILE, "threshold": threshold},
    }


# ------------------------------------------------------------------------ 5. report
def write_report(ctx, applied: bool = False) -> Path:
    """The HTML report of the group outputs (:mod:`mmfusion.report.group_report`), or of an
    applied run (:mod:`mmfusion.report.applied_report`); its path is the terminal's last line."""
    from mmfusion.report import applied_report, group_report

    writer = applied_report if applied else group_report
    path = writer.write_report(ctx.output_dir, provenance=ctx.provenance.as_dict())
    log.info("report: %s", path)
    terminal_print(f"mmfusion report: {path}")
    return path


# ----------------------------------------------------------- applying a trained model
def apply_group_level(ctx) -> Path:
    """``group --model BUNDLE``: the trained model applied to this dataset's shards.

    Every check first (:func:`check_apply_inputs`: the bundle, the modalities, each
    shard's template and grid, the phenotype tables), then the embeddings, the stratum of
    each subject (:mod:`mmfusion.strata.assign`), the phenotype statistics of the new
    cohort, the ground truth of simulated data, ``group/applied/summary.json`` and the
    report ``mmfusion_applied_report.html``. Outputs under ``group/applied/``:
    embeddings.tsv/.h5, labels.tsv + labels.json, projection.png, phenotypes/, stats/,
    ground_truth/, summary.json. Returns the report's path."""
    bundle, paths, pheno = check_apply_inputs(ctx)
    root = Path(ctx.group_dir) / "applied"
    ids, X, seconds = embed_with_bundle(bundle, paths, root)
    assignment = place_in_strata(bundle, ids, X, root)
    summary = applied_summary(ctx, bundle, ids, assignment, seconds)
    per_subject = one_row_per_participant(ids, assignment.stratum)
    source = root / "embeddings.tsv"
    fa = phenotype_factors(ctx, pheno, per_subject, summary, root=root)
    result = None
    if fa is not None and per_subject.loc[fa.scores.index].nunique() < 2:
        summary["stats"] = {"status": "not run: the new subjects with phenotypes fall in fewer than 2 strata"}
    else:
        result = factor_statistics(ctx, fa, per_subject, source, summary, root=root)
    compare_with_ground_truth(ctx, per_subject, fa, result, {}, summary, root=root)
    from mmfusion.io.atomic import write_json

    write_json(root / "summary.json", summary)
    return write_report(ctx, applied=True)


def check_apply_inputs(ctx):
    """(bundle, shard paths, phenotype input), all checked before any model is loaded:
    the bundle (:func:`mmfusion.io.bundle.read_bundle`: schema, files, sha256), the
    modalities, a bundle whose strata were harmonized (exit 64), every shard vs the
    bundle's template and grid (:func:`mmfusion.io.bundle.check_shard`), the phenotypes."""
    from mmfusion.errors import UsageError
    from mmfusion.io import bundle as bd
    from mmfusion.io.shards import read_attrs

    bundle = bd.read_bundle(ctx.model)
    bd.check_modalities(bundle, list(ctx.modalities))
    if bundle.meta["strata"].get("harmonized"):
        raise UsageError(f"{bundle.root / 'bundle.json'}: its strata were found on site-harmonized embeddings "
                         "(stratify.harmonize_site), which new subjects cannot be mapped into; retrain without "
                         "harmonization to apply the model")
    ctx.participant_labels, paths = select_shards(ctx, list_shards(ctx))
    other_config = []
    for path in paths:
        attrs = read_attrs(path)
        bd.check_shard(attrs, path, bundle)
        if str(attrs.get("config_hash")) != str(bundle.meta.get("shard_config_hash")):
            other_config.append(path.name)
    if other_config:
        log.warning("%d shard(s) were made with another spatial config than the training cohort's (same template "
                    "and grid): %s", len(other_config), " ".join(other_config[:10]))
    participants = [f"sub-{s}" for s in dict.fromkeys(ctx.participant_labels)]
    pheno = ph.check_phenotype_input(ph.load_phenotype_input(ctx.bids_dir, ctx.phenotypes_file), participants,
                                     ctx.config["phenotypes"])
    ctx.provenance.add_inputs(pheno.files)
    ctx.provenance.extra["model_bundle"] = {"path": str(bundle.root), **bundle.meta["provenance"]}
    log.info("applying the model of %s (trained on %d rows, mmfusion %s) to %d shard(s)", bundle.root,
             bundle.meta["strata"]["n_training_rows"], bundle.meta["provenance"]["mmfusion_version"], len(paths))
    return bundle, paths, pheno


def embed_with_bundle(bundle, paths: list[Path], root: Path) -> tuple[pd.DataFrame, np.ndarray, float]:
    """The bundle's model and normalizer on the shards ``paths``: (ids, float32 (n, D)
    embeddings, seconds spent embedding), written to ``root``/embeddings.tsv and .h5."""
    import time

    from mmfusion.io.embeddings import write_embeddings_h5, write_embeddings_tsv
    from mmfusion.io.shards import split_stem
    from mmfusion.learning.training import embed, load_final_model

    start = time.perf_counter()
    model, norm, modalities = load_final_model(bundle.model_dir)
    loaded = time.perf_counter()
    X = embed(model, paths, modalities, norm, progress_label="embeddings")
    seconds = time.perf_counter() - loaded
    log.info("model loaded in %.1f s", loaded - start)
    stems = [split_stem(p.stem) for p in paths]
    ids = pd.DataFrame({"participant_id": [f"sub-{s}" for s, _ in stems], "session": [e for _, e in stems]})
    write_embeddings_tsv(root / "embeddings.tsv", ids, X)
    write_embeddings_h5(root / "embeddings.h5", ids, X, modalities, int(bundle.meta["provenance"]["seed"]))
    log.info("embedded %d shard(s) in %.1f s (%.2f s per shard)", len(paths), seconds,
             seconds / max(len(paths), 1))
    return ids, X, seconds


LABELS_SIDECAR = {
    "participant_id": {"Description": "participant label (sub-<label>)"},
    "session": {"Description": "session label without 'ses-' ('n/a' when the dataset has no sessions)"},
    "stratum": {"Description": "trained stratum whose exemplar is nearest in the embedding space used for "
                               "clustering (Euclidean distance), numbered as in the training run's "
                               "group/strata/labels.tsv (column cluster)"},
    "distance": {"Description": "Euclidean distance of the subject's embedding to that exemplar",
                 "Units": "embedding units (the model's embedding values, not mm)"},
    "novel": {"Description": "true when distance exceeds the novelty threshold: the 95th percentile of the "
                             "training subjects' distances to their own exemplar (see NoveltyThreshold)",
              "Levels": {"true": "farther from every exemplar than 95% of the training subjects were from "
                                 "their own: outside the training distribution",
                         "false": "within the training distribution"}},
}


def place_in_strata(bundle, ids: pd.DataFrame, X: np.ndarray, root: Path):
    """Each embedding (n, D) in the bundle's strata (:func:`mmfusion.strata.assign.assign`)
    -> ``root``/labels.tsv (participant_id, session, stratum, distance, novel) and its
    sidecar labels.json; also projection.png. Returns the Assignment."""
    from mmfusion.io.atomic import atomic_path, write_json
    from mmfusion.report import figures
    from mmfusion.strata import assign

    strata = bundle.strata()
    a = assign.assign(X, strata["exemplar_embedding"], float(bundle.meta["novelty"]["threshold"]))
    table = ids.assign(session=ids["session"].replace("", "n/a"), stratum=a.stratum,
                       distance=a.distance, novel=np.where(a.novel, "true", "false"))
    with atomic_path(root / "labels.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    write_json(root / "labels.json", {**LABELS_SIDECAR, "NoveltyThreshold": {
        "Value": a.threshold, "Units": "embedding units", "Percentile": bundle.meta["novelty"]["percentile"]}})
    figures.plot_projection(strata["embedding"], strata["stratum"], strata["exemplar_index"], X, a.novel,
                            root / "projection.png")
    return a


def applied_summary(ctx, bundle, ids: pd.DataFrame, a, seconds: float) -> dict:
    """summary.json of an applied run (its first part): the bundle, the counts, timing."""
    k = int(bundle.meta["strata"]["n_strata"])
    return {"bundle": {"path": str(bundle.root), "provenance": bundle.meta["provenance"],
                       "template": bundle.meta["template"], "n_training_rows": bundle.meta["strata"]["n_training_rows"],
                       "n_training_subjects": bundle.card["trained_on"]["n_subjects"]},
            "n_embeddings": int(len(ids)), "modalities": bundle.modalities,
            "stratum_sizes": {"training": bundle.meta["strata"]["sizes"],
                              "applied": np.bincount(a.stratum, minlength=k).tolist()},
            "novelty": {"threshold": a.threshold, "percentile": bundle.meta["novelty"]["percentile"],
                        "n_novel": int(a.novel.sum()), "fraction_novel": float(a.novel.mean())},
            "seconds_embedding": seconds, "seconds_per_shard": seconds / max(len(ids), 1),
            "seed": int(ctx.seed), "inputs": {}, "outputs": {}, "caveats": []}

