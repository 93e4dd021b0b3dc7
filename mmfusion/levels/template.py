"""The template level: a study-specific T1w template from (a seeded subset of) the subjects.

Orchestration only: choose the subjects, reuse an up-to-date template or build one with
:func:`mmfusion.spatial.template.build_study_template`, write it atomically with its
provenance JSON (written last). The template science (building, masks, the choice of
template at the participant level) is in :mod:`mmfusion.spatial.template`.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ants
import numpy as np

from mmfusion import __version__
from mmfusion.config import spatial_hash
from mmfusion.context import scratch_dir
from mmfusion.errors import MissingInputError
from mmfusion.io.atomic import atomic_path, write_json
from mmfusion.provenance import reuse_existing
from mmfusion.spatial import registration as reg
from mmfusion.spatial.presets import resolve_preset
from mmfusion.spatial.template import build_study_template, image_hash, study_template_paths


def select_template_subjects(records, n: int | None, seed: int):
    """Records with a T1w; a seeded random subset of ``n`` of them (all if n is None)."""
    usable = [r for r in records if r.t1w is not None]
    if not usable:
        raise MissingInputError("template level: no subject has a T1w image; check bids_dir and --participant-label")
    if n is None or n >= len(usable):
        return usable
    idx = np.random.default_rng(seed).choice(len(usable), size=int(n), replace=False)
    return [usable[i] for i in sorted(idx)]


def run_template_level(ctx) -> Path:
    """Template level: build ``output_dir/template/tpl-study_res-<r>_T1w.nii.gz`` + mask +
    provenance JSON. Returns the template folder."""
    cfg = ctx.config["spatial"]
    reg.set_ants_threads(ctx.omp_nthreads, cfg["random_seed"])
    params = resolve_preset(cfg["preset"], cfg["registration_overrides"])
    n = cfg["template_subjects"]  # --template-subjects sets it (mmfusion.cli.config_overrides)
    chosen = select_template_subjects(ctx.records, n, ctx.seed)
    paths = study_template_paths(ctx.output_dir, float(cfg["registration_resolution"]))
    ctx.logger.info("template level: %d subjects, %d iterations, preset %s",
                    len(chosen), cfg["template_iterations"], cfg["preset"])
    ctx.provenance.add_inputs([r.t1w for r in chosen])
    if _up_to_date(ctx, paths, chosen):
        ctx.logger.info("study template up to date (same inputs and spatial config): %s; --force rebuilds it",
                        paths["t1w"])
        return paths["dir"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmf_template_", dir=scratch_dir(ctx)) as tmp:
        tpl, mask = build_study_template([r.t1w for r in chosen], cfg, params, Path(tmp))
        paths["dir"].mkdir(parents=True, exist_ok=True)
        with atomic_path(paths["t1w"]) as out:
            ants.image_write(tpl, str(out))
        with atomic_path(paths["mask"]) as out:
            ants.image_write(mask.astype("uint8"), str(out))
    record = {
        "Name": "mmfusion study-specific T1w template",
        "GeneratedBy": {"Name": "mmfusion", "Version": __version__},
        "subjects": [r.key for r in chosen],
        "n_subjects": len(chosen),
        "seed": ctx.seed,
        "iterations": cfg["template_iterations"],
        "resolution_mm": cfg["registration_resolution"],
        "n4": cfg["n4"],
        "preset": cfg["preset"],
        "registration_params": params,
        "config_hash": spatial_hash(ctx.config),
        "template_hash": image_hash(ants.image_read(str(paths["t1w"]))),
        "inputs": _input_record(ctx, chosen),
        "mask": "MNI152 2009 brain mask (nilearn) registered to the template and thresholded at 0.5",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(paths["provenance"], record)
    ctx.provenance.extra["template"] = {"path": str(paths["t1w"]), "hash": record["template_hash"]}
    ctx.logger.info("template written: %s (%.0f s)", paths["t1w"], record["wall_s"])
    return paths["dir"]


def _input_record(ctx, chosen: list) -> dict[str, str]:
    """{T1w path: sha256} of the subjects the template is built from."""
    return {str(r.t1w): ctx.provenance.inputs.get(str(Path(r.t1w).resolve()), "") for r in chosen}


def _up_to_date(ctx, paths: dict, chosen: list) -> bool:
    """True if a finished template (its provenance JSON is written last) was built from the
    same T1w files (sha256) with the same spatial config. A different one is refused
    (exit 75) unless ``--force``: rebuilding would make every existing shard stale."""
    finished = paths["provenance"].is_file() and paths["t1w"].is_file()
    recorded = json.loads(paths["provenance"].read_text()) if finished else None
    expected = {"config_hash": spatial_hash(ctx.config),
                "inputs": _input_record(ctx, chosen)}
    return reuse_existing(paths["t1w"], recorded, expected, ctx.force,
                          "rerun with --force to rebuild it (then also rerun the participant level with "
                          "--force), or use a new output_dir")
