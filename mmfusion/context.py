"""RunContext: the validated inputs of one CLI run, handed to every analysis level."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from mmfusion.io.bids import SubjectRecord
from mmfusion.provenance import Provenance


@dataclass
class RunContext:
    """What a level needs; built by :mod:`mmfusion.cli` after validation.

    Paths are absolute. ``records`` holds the selected subjects/sessions (participant
    and template levels). ``config`` is the validated nested config dict with
    the command-line options of ``mmfusion.cli.CONFIG_OPTIONS`` already applied (``--seed``
    is ``config['spatial']['random_seed']``, ``--template-subjects``
    ``config['spatial']['template_subjects']``).
    """

    level: str
    bids_dir: Path
    output_dir: Path
    work_dir: Path
    config: dict
    seed: int
    provenance: Provenance
    logger: logging.Logger
    records: list[SubjectRecord] = field(default_factory=list)
    participant_labels: list[str] = field(default_factory=list)  # without 'sub-'; empty = all
    session_labels: list[str] = field(default_factory=list)
    derivatives: list[Path] = field(default_factory=list)
    modalities: list[str] = field(default_factory=lambda: ["jac", "ndi"])
    template: Path | None = None          # --template
    phenotypes_file: Path | None = None   # --phenotypes
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    force: bool = False
    resume: bool = False
    allow_missing: bool = False
    model: Path | None = None             # --model: a trained-model bundle to apply (group level)
    step: str = "all"                     # --step: the whole group level or one of its steps
    fold: int | None = None               # --fold: the CV fold of --step train-fold (1-based)

    @property
    def logs_dir(self) -> Path:
        return self.output_dir / "logs"

    @property
    def log_file(self) -> Path:
        """This run's log file, ``output_dir/logs/<run_id>.log`` (also gets the C++ libraries' output)."""
        return self.logs_dir / f"{self.provenance.run_id}.log"

    @property
    def group_dir(self) -> Path:
        """Where group-level outputs go: ``output_dir/group``."""
        return self.output_dir / "group"


def scratch_dir(ctx) -> Path:
    """``ctx.work_dir``, created if missing: where a level's temporary folders go."""
    Path(ctx.work_dir).mkdir(parents=True, exist_ok=True)
    return Path(ctx.work_dir)
