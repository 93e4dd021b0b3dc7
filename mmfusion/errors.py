"""Errors that end a run with a documented exit code and one clear line.

Exit codes follow the BIDS-Apps execution specification where it has one, and the
BSD ``sysexits.h`` conventions otherwise. ``docs/exit-codes.md`` lists them; keep the
two in step (a test compares them).
"""
import argparse

EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (a bug: please report it with the log file)",
    16: "BIDS validation failed (fix the dataset or pass --skip-bids-validation)",
    17: "unknown analysis level",
    18: "the filters (participant/session labels, --bids-filter-file) selected no files",
    64: "command-line usage error (bad option or option value, bad config file)",
    65: "bad input data (unreadable/empty/4D/mismatched image, bad DWI gradients or shells, NaN in a shard, bad table)",
    66: "required input missing (no bids_dir, no T1w, missing modality or shards)",
    69: "analysis level or feature not implemented yet",
    73: "cannot create or write an output (output_dir not writable, or inside bids_dir's raw data)",
    75: "refused: outputs exist from a different config/template (use --force)",
    78: "broken installation: a dependency fails to import (reinstall from requirements.lock)",
    85: "training stopped by SIGUSR1/SIGTERM after a checkpoint (rerun with --resume; SLURM jobs requeue)",
    130: "interrupted (Ctrl-C / SIGINT)",
}


class MmfusionError(Exception):
    """Base class: ``str(err)`` is the one-line message, ``err.exit_code`` the code."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(MmfusionError):
    exit_code = 64


class ConfigError(UsageError):
    """A bad ``--config`` file: unknown key, wrong type, impossible value."""


class ValidationError(MmfusionError):
    exit_code = 16


class UnknownLevelError(MmfusionError):
    exit_code = 17


class NoFilesSelectedError(MmfusionError):
    exit_code = 18


class InputDataError(MmfusionError):
    exit_code = 65


class TrainingDiverged(InputDataError):
    """A training loss became NaN/Inf (the epoch is not checkpointed; the run stops at once)."""


class MissingInputError(MmfusionError):
    exit_code = 66


class NotImplementedLevelError(MmfusionError):
    exit_code = 69


class OutputError(MmfusionError):
    exit_code = 73


class StaleOutputError(MmfusionError):
    exit_code = 75


class TrainingInterrupted(MmfusionError):
    """Training stopped by SIGUSR1/SIGTERM after its last epoch checkpoint (resume it)."""

    exit_code = 85


class BrokenInstallError(MmfusionError):
    """A dependency (TensorFlow, ANTsPy, ...) is installed but does not import."""

    exit_code = 78


class UsageParser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 64) instead of exiting with code 2 (also ``mmfusion simulate``)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see {self.prog} --help)")
