"""The group level: shards -> model + embeddings -> strata + phenotype statistics -> report.

Orchestration only; the work is in :mod:`mmfusion.learning.training`, :mod:`mmfusion.strata.analysis`
and :mod:`mmfusion.report.group_report`.
"""
from __future__ import annotations

from pathlib import Path

from mmfusion.errors import MissingInputError
from mmfusion.runlog import get_logger, terminal_print
from mmfusion.io.shards import split_stem

log = get_logger(__name__)


def expected_subjects(bids_dir: Path, labels: list[str]) -> list[str]:
    """Subject labels the group level should see: ``labels`` if given, else every
    ``sub-*`` folder of the raw dataset (labels without 'sub-')."""
    if labels:
        return sorted(labels)
    return sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())


def subjects_with_shards(output_dir: Path) -> set[str]:
    """Subject labels that have at least one shard in ``output_dir/shards``."""
    return {split_stem(p.stem)[0] for p in (output_dir / "shards").glob("sub-*.h5")}


def check_shards(ctx) -> list[str]:
    """Return the subjects to analyse; refuse (exit 66) if some have no shard, unless
    ``--allow-missing`` is given, in which case they are listed and skipped."""
    expected = expected_subjects(ctx.bids_dir, ctx.participant_labels)
    present = subjects_with_shards(ctx.output_dir)
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
    shards = sorted(p for s in available for p in (ctx.output_dir / "shards").glob(f"sub-{s}[._]*h5"))
    ctx.provenance.add_inputs(shards)
    return available


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


def check_late_inputs(ctx):
    """Everything the group level would otherwise find wrong only after training, checked
    before any model is built: the shards (exit 66 naming a shard that lacks a requested
    modality; their grid vs ``model.input_shape``; ``training.cv_folds`` vs the number of
    subjects, exit 64) and the phenotype tables (read and type-checked, exit 65 naming the
    file, column and line of a junk cell). Returns (shard infos, phenotype input)."""
    from mmfusion.strata import analysis
    from mmfusion.learning import shard_data

    paths = shard_data.discover_shards(ctx.output_dir / "shards", ctx.participant_labels)
    infos = shard_data.scan_shards(paths, ctx.modalities, ctx.allow_missing)
    shard_data.check_grid(infos, ctx.config["model"]["input_shape"])
    shard_data.check_folds(infos, ctx.config["training"]["cv_folds"])
    participants = [f"sub-{s}" for s in dict.fromkeys(i.subject for i in infos)]
    pheno = analysis.check_phenotype_input(ctx, participants)
    ctx.provenance.add_inputs(pheno.files)
    check_harmonization(ctx, infos)
    return infos, pheno


def check_harmonization(ctx, infos) -> None:
    """With ``stratify.harmonize_site`` set: the column exists, covariates are numeric,
    every shard has a site and every site >= 2 shards (a ComBat fit on random data with
    the real confound table), before any training; exit 64/65 naming the problem."""
    import numpy as np
    import pandas as pd

    from mmfusion.strata.harmonize import harmonize_for_clustering
    from mmfusion.strata.validity import collect_confounds

    cfg = ctx.config["stratify"]
    if cfg["harmonize_site"] is None:
        return
    ids = pd.DataFrame({"participant_id": [f"sub-{i.subject}" for i in infos], "session": [i.session for i in infos]})
    trial = np.random.default_rng(0).standard_normal((len(infos), 3))
    harmonize_for_clustering(trial, collect_confounds(ctx, ids), cfg)


def run_group_level(ctx) -> Path | None:
    """Run the whole group level; returns the path of the HTML report (None on a
    non-chief worker of a multi-worker run, which only trains)."""
    from mmfusion.strata import analysis
    from mmfusion.learning import distribute
    from mmfusion.report import group_report
    from mmfusion.learning import training

    ctx.participant_labels = check_shards(ctx)
    count_phenotype_only(ctx)
    infos, pheno = check_late_inputs(ctx)
    log.info("group level on %d subject(s), modalities %s", len(ctx.participant_labels), " ".join(ctx.modalities))
    distribute.make_strategy()  # a multi-worker strategy must exist before any other TF op
    learning = training.run_learning(ctx, infos)
    if not distribute.is_chief():
        log.info("non-chief worker: training done; the chief writes the analysis and the report")
        return None
    analysis.run_analysis(ctx, Path(learning["embeddings_tsv"]), pheno)
    path = group_report.write_report(ctx.output_dir, provenance=ctx.provenance.as_dict())
    log.info("report: %s", path)
    terminal_print(f"mmfusion report: {path}")
    return path
