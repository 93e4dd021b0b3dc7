"""The BIDS-App command line: ``mmfusion bids_dir output_dir {template,participant,group}``.

Follows fMRIPrep/QSIPrep conventions: validate everything early, fail with one line that
says what to do, exit with a documented code (``mmfusion.errors.EXIT_CODES``,
``docs/exit-codes.md``). ``mmfusion simulate OUT_DIR`` writes a synthetic dataset.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmfusion import __version__
from mmfusion.io.bids import MODALITIES
from mmfusion.errors import (BrokenInstallError, MmfusionError, NotImplementedLevelError,
                             OutputError, UnknownLevelError, UsageError, UsageParser)

LEVELS = ("template", "participant", "group")
#: ``group --step``: the whole group level, or one of its steps (mmfusion.levels.group.STEPS).
GROUP_STEPS = ("all", "train-fold", "train-final", "analysis")
#: Options that set a config key: option -> (argparse dest, "section.key"). Applied to the
#: config in one place, :func:`load_run_config`, and checked like the config file.
CONFIG_OPTIONS = {
    "--seed": ("seed", "spatial.random_seed"),
    "--template-subjects": ("template_subjects", "spatial.template_subjects"),
    "--allow-fa-only": ("allow_fa_only", "diffusion.allow_fa_only"),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _memory_gb(text: str) -> float:
    """'16', '16G', '16GB', '16000MB' -> GB (float)."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}.get(t[-1:], None)
    try:
        return float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 16GB, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The BIDS-App parser (every option is documented in docs/usage.md)."""
    p = UsageParser(
        prog="mmfusion",
        description="mmfusion: multimodal 3D brain MRI -> learned embeddings and data-driven "
                    "subject strata (BIDS-App). Also: 'mmfusion simulate OUT_DIR' writes a "
                    "synthetic BIDS dataset with ground truth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="root of the BIDS dataset (holds dataset_description.json)")
    p.add_argument("output_dir", type=Path,
                   help="where outputs go: a folder outside bids_dir, or one directly in "
                        "bids_dir/derivatives/ (e.g. bids_dir/derivatives/mmfusion)")
    p.add_argument("analysis_level", help=f"processing stage: one of {', '.join(LEVELS)}")
    p.add_argument("--version", action="version", version=f"mmfusion {__version__}")

    g = p.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
                   help="subjects to process, space-separated, with or without 'sub-' (default: all)")
    g.add_argument("--session-label", "--session_label", nargs="+", default=[], metavar="LABEL",
                   help="sessions to process, with or without 'ses-' (default: all)")
    g.add_argument("--bids-filter-file", "--bids_filter_file", type=Path, metavar="FILE",
                   help='JSON selecting inputs by entities, e.g. {"t1w": {"acquisition": "mprage"}}; '
                        "keys t1w, fa, ndi, dwi")
    g.add_argument("--derivatives", nargs="+", type=Path, default=[], metavar="PATH",
                   help="derivative datasets holding FA/NDI maps (QSIRecon naming) or preprocessed DWI "
                        "(QSIPrep naming: FA/NDI are then fitted); "
                        "default: every dataset in bids_dir/derivatives/ except mmfusion's own outputs")
    g.add_argument("--dwi-preprocessed", action="store_true",
                   help="participant level: the raw-BIDS dwi/ images are already preprocessed (in the T1w "
                        "space): fit FA/NDI from them where no fitted maps exist (never done without this flag)")
    g.add_argument("--allow-fa-only", action="store_true", default=None,
                   help="participant level: single-shell DWI fits FA alone and leaves NDI missing "
                        "(otherwise an error; diffusion.allow_fa_only)")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not run the BIDS validator on bids_dir")
    g.add_argument("--phenotypes", type=Path, metavar="FILE",
                   help="group level: a TSV/CSV phenotype table with participant_id "
                        "(default: participants.tsv + phenotype/*.tsv of bids_dir)")

    g = p.add_argument_group("method")
    g.add_argument("--config", type=Path, metavar="FILE.yaml",
                   help="YAML overriding the defaults (the paper's settings; see docs/configuration.md); "
                        "unknown keys are an error")
    g.add_argument("--seed", type=int, default=42, help="random seed for every stochastic step")
    g.add_argument("--template", type=Path, metavar="PATH",
                   help="T1w template (NIfTI) to register to; default: the study template built by "
                        "the template level in output_dir, else MNI152 2009 (built in)")
    g.add_argument("--template-subjects", type=_positive_int, metavar="N",
                   help="template level: build from a seeded random subset of N subjects (default: all)")
    g.add_argument("--model", type=Path, metavar="BUNDLE",
                   help="group level: apply the trained-model bundle BUNDLE (output_dir/group/bundle of a "
                        "training run) to this dataset's shards instead of training: embeddings, stratum "
                        "of each subject with a novelty flag, report mmfusion_applied_report.html")
    g.add_argument("--modalities", nargs="+", choices=MODALITIES, default=["jac", "ndi"],
                   help="group level: modalities fed to the autoencoder")

    g = p.add_argument_group("running")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="scratch folder for intermediate files (default: output_dir/work)")
    g.add_argument("--nprocs", "--n_cpus", type=_positive_int, default=None,
                   help="CPUs this run may use in total (default: all available)")
    g.add_argument("--omp-nthreads", type=_positive_int, default=None,
                   help="threads per process for ANTs/TensorFlow (default: --nprocs)")
    g.add_argument("--mem", "--mem_gb", type=_memory_gb, default=None, metavar="GB",
                   help="memory budget, e.g. 16GB (recorded; used to size batches and caches)")
    g.add_argument("--force", action="store_true",
                   help="redo subjects/results that already exist, even if up to date")
    g.add_argument("--resume", action="store_true",
                   help="group level: continue interrupted training from the last checkpoints")
    g.add_argument("--allow-missing", action="store_true",
                   help="group level: run on the subjects whose shards exist even if others failed")
    g.add_argument("--step", choices=GROUP_STEPS, default="all",
                   help="group level: run one independent step (for a cluster: docs/hpc.md): train-fold "
                        "(one CV fold, with --fold), train-final (the final model), analysis (once every "
                        "fold and the final model exist: embeddings, strata, statistics, report); "
                        "'all' runs them in order. A finished step is skipped unless --force")
    g.add_argument("--fold", type=_positive_int, metavar="N",
                   help="group level, --step train-fold: the CV fold to train (1 .. training.cv_folds)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v, -vv)")
    return p


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_location(path: Path, bids_dir: Path, what: str = "output_dir") -> None:
    """Refuse ``path`` inside the raw dataset: allowed are folders outside ``bids_dir`` and
    ``bids_dir/derivatives/<name>`` (the work dir also anywhere below it). Exit 73."""
    if path != bids_dir and not _inside(path, bids_dir):
        return
    parts = path.relative_to(bids_dir).parts
    depth_ok = len(parts) == 2 if what == "output_dir" else len(parts) >= 2
    if parts[:1] == ("derivatives",) and depth_ok:
        return
    raise OutputError(f"{path}: {what} must not be bids_dir or inside its raw data; use "
                      f"{bids_dir / 'derivatives' / 'mmfusion'} or a folder outside {bids_dir}")


def check_output_owner(output_dir: Path, bids_dir: Path) -> None:
    """Refuse an output_dir that is another pipeline's derivative dataset (exit 73): our
    outputs would mix with (and, in bids_dir/derivatives, be searched as) its files."""
    from mmfusion.io.bids import generated_by

    owners = generated_by(output_dir)
    if owners and "mmfusion" not in owners:
        raise OutputError(f"{output_dir}: output_dir holds another pipeline's dataset ({', '.join(owners)}); "
                          f"choose a new folder, e.g. {bids_dir / 'derivatives' / 'mmfusion'}")


def validate_paths(args: argparse.Namespace) -> None:
    """Level known, bids_dir a dataset, output_dir outside the raw data, writable and
    initialised as mmfusion's derivative dataset (dataset_description.json, .bidsignore)."""
    from mmfusion.io.atomic import check_writable_dir
    from mmfusion.io.bids import check_is_bids
    from mmfusion.io.derivatives import init_output_dir

    if args.analysis_level not in LEVELS:
        raise UnknownLevelError(f"unknown analysis level '{args.analysis_level}'; choose one of "
                                f"{', '.join(LEVELS)} (or 'mmfusion simulate OUT_DIR')")
    args.bids_dir = args.bids_dir.resolve()
    args.output_dir = args.output_dir.resolve()
    check_is_bids(args.bids_dir)
    check_output_location(args.output_dir, args.bids_dir)
    check_output_owner(args.output_dir, args.bids_dir)
    if args.work_dir is not None:
        check_output_location(args.work_dir.resolve(), args.bids_dir, "work dir")
    for path, what in ((args.output_dir, "output_dir"), (args.work_dir, "work dir")):
        if path is None:
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create {what} ({exc.strerror}); choose a writable folder") from exc
        check_writable_dir(path, what)
    if args.model is not None:
        check_model_option(args)
    check_step_options(args)
    for path, opt in ((args.config, "--config"), (args.template, "--template"),
                      (args.phenotypes, "--phenotypes"), (args.bids_filter_file, "--bids-filter-file")):
        if path is not None and not path.is_file():
            raise UsageError(f"{path}: file given to {opt} does not exist")
    init_output_dir(args.output_dir, args.bids_dir)


def check_model_option(args: argparse.Namespace) -> None:
    """``--model``: group level only, a folder holding a bundle manifest (exit 64 otherwise;
    its content is verified by the group level before any work)."""
    if args.analysis_level != "group":
        raise UsageError(f"--model applies a trained model at the group level, not the {args.analysis_level} "
                         "level; run 'mmfusion BIDS_DIR OUT_DIR group --model BUNDLE'")
    if not args.model.is_dir():
        raise UsageError(f"{args.model}: folder given to --model does not exist; give the bundle folder "
                         "(output_dir/group/bundle of a training group run)")
    if not (args.model / "manifest.json").is_file():
        raise UsageError(f"{args.model}: not a trained-model bundle (no manifest.json); give the bundle folder "
                         "(output_dir/group/bundle of a training group run)")
    args.model = args.model.resolve()


def check_step_options(args: argparse.Namespace) -> None:
    """``--step``/``--fold``: group level only, not with ``--model``; ``--fold`` exactly with
    ``--step train-fold`` (exit 64; its range is checked with the config, :func:`check_fold`)."""
    if args.step != "all" and args.analysis_level != "group":
        raise UsageError(f"--step runs one step of the group level, not of the {args.analysis_level} level")
    if args.step != "all" and args.model is not None:
        raise UsageError("--step trains a model in steps; --model applies a trained one: give one of them")
    if (args.fold is not None) != (args.step == "train-fold"):
        raise UsageError("--fold N goes with --step train-fold (and --step train-fold needs --fold N)")


def check_fold(fold: int | None, config: dict) -> None:
    """``--fold`` within 1 .. ``training.cv_folds`` of the loaded config (exit 64)."""
    k = int(config["training"]["cv_folds"])
    if fold is not None and fold > k:
        raise UsageError(f"--fold {fold}: the config has training.cv_folds = {k}; give a fold from 1 to {k}")


def config_overrides(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The config keys set by command-line options: ({section: {key: value}}, options used).

    An option left unset (None) does not override the config file.
    """
    overrides: dict[str, dict] = {}
    used = []
    for option, (dest, key) in CONFIG_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None:
            section, name = key.split(".")
            overrides.setdefault(section, {})[name] = value
            used.append(option)
    return overrides, used


def load_run_config(args: argparse.Namespace) -> dict:
    """``--config`` (or the defaults) with the command-line options applied, all checked
    (exit 64 naming the file or the option, the key, the value and what is allowed)."""
    from mmfusion.config import load_config

    overrides, used = config_overrides(args)
    return load_config(args.config, overrides, override_source=f"command line ({', '.join(used)})")


def make_context(args: argparse.Namespace, argv: list[str]):
    """Validate the remaining inputs and build the RunContext (logging, provenance, records)."""
    from mmfusion.io import bids
    from mmfusion.context import RunContext
    from mmfusion.provenance import Provenance
    from mmfusion.runlog import new_run_id, setup_logging

    cfg = load_run_config(args)
    check_fold(args.fold, cfg)
    run_id = new_run_id(args.analysis_level)
    logger = setup_logging(args.verbose, args.output_dir / "logs" / f"{run_id}.log")
    logger.info("mmfusion %s, %s level, run %s", __version__, args.analysis_level, run_id)
    nprocs = args.nprocs or len(os.sched_getaffinity(0))
    prov = Provenance(run_id, args.analysis_level, argv, cfg, args.seed)
    ctx = RunContext(
        level=args.analysis_level, bids_dir=args.bids_dir, output_dir=args.output_dir,
        work_dir=(args.work_dir or args.output_dir / "work").resolve(), config=cfg, seed=args.seed,
        provenance=prov, logger=logger,
        participant_labels=[bids.strip_prefix(x, "sub-") for x in args.participant_label],
        session_labels=[bids.strip_prefix(x, "ses-") for x in args.session_label],
        derivatives=[d.resolve() for d in args.derivatives], modalities=list(dict.fromkeys(args.modalities)),
        template=args.template.resolve() if args.template else None,
        phenotypes_file=args.phenotypes.resolve() if args.phenotypes else None,
        nprocs=nprocs, omp_nthreads=args.omp_nthreads or nprocs, mem_gb=args.mem,
        force=args.force, resume=args.resume, allow_missing=args.allow_missing, model=args.model,
        step=args.step, fold=args.fold,
    )
    if not args.skip_bids_validation:
        logger.info("validating %s with bids-validator-deno", args.bids_dir)
        bids.run_validator(args.bids_dir)
    if ctx.level in ("template", "participant"):
        filters = bids.load_filter_file(args.bids_filter_file)
        ctx.records = bids.discover(args.bids_dir, ctx.derivatives, ctx.participant_labels,
                                    ctx.session_labels, filters, output_dir=args.output_dir,
                                    dwi_preprocessed=args.dwi_preprocessed)
        prov.extra["input_choices"] = bids.choices_summary(ctx.records)
    return ctx


def run_level(ctx) -> int:
    """Dispatch to the analysis level; write provenance at the end (also on failure)."""
    import importlib

    entry = {
        "template": ("mmfusion.levels.template", "run_template_level"),
        "participant": ("mmfusion.levels.participant", "run_participant_level"),
        "group": ("mmfusion.levels.group", "run_group_level"),
    }[ctx.level]
    try:
        module = importlib.import_module(entry[0])
    except ImportError as exc:
        raise _import_failure(exc, ctx.level) from exc
    func = getattr(module, entry[1], None)
    if func is None:
        raise NotImplementedLevelError(f"the {ctx.level} level is not implemented yet in mmfusion {__version__}")
    status = "failed"
    try:
        func(ctx)
        status = "success"
    except ImportError as exc:  # a dependency imported lazily inside the level
        raise _import_failure(exc, ctx.level) from exc
    finally:
        ctx.provenance.extra["status"] = status
        path = ctx.provenance.write(ctx.logs_dir)
        ctx.logger.info("provenance: %s", path)
    return 0


def _import_failure(exc: ImportError, level: str) -> BrokenInstallError:
    """The one-line error for a dependency that does not import: which module, and how to
    repair the environment (reinstalling from the lock brings the tested versions back)."""
    module = exc.name or "a dependency"
    return BrokenInstallError(
        f"the {level} level cannot import {module} ({exc}); the installation is broken or incomplete: "
        f"reinstall with `python -m pip install --force-reinstall -c requirements.lock -e .` "
        f"from the mmfusion checkout (or use the container image); see docs/installation.md")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        return _run_guarded(lambda: _simulate(argv[1:]))
    return _run_guarded(lambda: _bids_app(argv))


def _simulate(argv: list[str]) -> int:
    from mmfusion import simulate

    return simulate.main(argv)


def _bids_app(argv: list[str]) -> int:
    from mmfusion.runlog import native_output_to

    from mmfusion.io.atomic import output_permission_error

    args = build_parser().parse_args(argv)
    try:
        validate_paths(args)
        ctx = make_context(args, ["mmfusion", *argv])
        # ANTs/ITK and TensorFlow print from C++: into the log file, unless -vv
        with native_output_to(ctx.log_file if args.verbose < 2 else None):
            return run_level(ctx)
    except OSError as exc:  # a file or folder inside the outputs that this user may not write
        err = output_permission_error(exc, (args.output_dir, args.work_dir))
        if err is None:
            raise
        raise err from exc


def _run_guarded(func) -> int:
    try:
        return func()
    except MmfusionError as err:
        sys.stderr.write(f"mmfusion: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("mmfusion: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
