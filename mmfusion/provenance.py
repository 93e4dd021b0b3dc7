"""Provenance records: what ran, on what, with which settings, so a result can be redone.

Every level writes ``output_dir/logs/<run_id>_provenance.json`` with: mmfusion version,
run id, level, command line, full config, config hash, seed, input files with sha256,
library versions, host and timings. Outputs that carry their own metadata (shards,
sidecars) reuse :func:`sha256_file` and :func:`library_versions`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as md
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfusion import __version__
from mmfusion.io.atomic import write_json
from mmfusion.config import config_hash

LIBRARIES = (
    "tensorflow", "keras", "antspyx", "nibabel", "pybids", "h5py", "numpy", "scipy",
    "scikit-learn", "statsmodels", "nilearn", "pyyaml", "pandas", "matplotlib", "dipy", "dmri-amico",
)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes the results."""
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class Provenance:
    """Collects a run's provenance; :meth:`write` saves it atomically as JSON."""

    run_id: str
    level: str
    argv: list[str]
    config: dict
    seed: int
    inputs: dict[str, str] = field(default_factory=dict)  # path -> sha256
    extra: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))

    def add_inputs(self, paths) -> None:
        """Hash and record input files (each hashed once per run)."""
        for path in paths:
            key = str(Path(path).resolve())
            if key not in self.inputs:
                self.inputs[key] = sha256_file(path)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mmfusion_version": __version__,
            "run_id": self.run_id,
            "level": self.level,
            "command_line": self.argv,
            "seed": self.seed,
            "config_hash": config_hash(self.config),
            "config": self.config,
            "inputs": self.inputs,
            "libraries": library_versions(),
            "host": {"node": platform.node(), "platform": platform.platform()},
            "started": self.started,
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            **self.extra,
        }

    def write(self, logs_dir: str | Path) -> Path:
        path = Path(logs_dir) / f"{self.run_id}_provenance.json"
        write_json(path, self.as_dict())
        return path


def reuse_existing(path: str | Path, recorded: dict | None, expected: dict[str, Any],
                   force: bool, fix: str) -> bool:
    """The skip / refuse / redo rule for a finished output (shard, study template).

    ``recorded``: the record stored with the output at ``path`` (None when there is no
    finished output); ``expected``: what this run would record (hashes of the config,
    template, inputs ...). Returns True when the output can be reused as is (skip), False
    when it must be (re)made (none yet, or ``force``). Raises StaleOutputError (exit 75),
    naming ``path``, the differing entries and ``fix``, when it exists but differs: silently
    replacing it would make everything computed from it stale.
    """
    from mmfusion.errors import StaleOutputError

    if force or recorded is None:
        return False
    diffs = [key for key, value in expected.items() if recorded.get(key) != value]
    if not diffs:
        return True
    raise StaleOutputError(f"{path}: exists but was made with a different {', '.join(diffs)}; {fix}")
