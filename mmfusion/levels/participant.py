"""Participant level: one subject (and session) per record, as one SLURM array task runs it.

Per record: validate inputs -> skip if an up-to-date shard exists -> N4 -> register T1w
to the template (preset) -> log-JAC of the nonlinear warp -> warp FA/NDI with the same
transforms -> resample all to the output grid -> BIDS-derivative NIfTIs + sidecars +
transforms -> QC figure + HTML -> the HDF5 shard, written LAST (its existence means the
subject is complete). Every file is written atomically.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ants
import numpy as np

from mmfusion import __version__
from mmfusion.io import derivatives
from mmfusion.report import figures, subject_qc
from mmfusion.io.atomic import atomic_path
from mmfusion.config import config_hash
from mmfusion.context import scratch_dir
from mmfusion.io.images import load_subject_inputs, missing_t1w_error
from mmfusion.provenance import reuse_existing, sha256_file
from mmfusion.runlog import get_logger, progress
from mmfusion.io.shards import Shard, read_attrs, shard_path, write_shard
from mmfusion.spatial import registration as reg
from mmfusion.spatial.presets import resolve_preset
from mmfusion.spatial.resample import grid_coverage, grid_for_template, ras_affine, to_grid
from mmfusion.spatial.template import TemplateInfo, resolve_template

log = get_logger(__name__)

MAP_MODALITIES = ("fa", "ndi")


@dataclass
class GridImages:
    """One subject's images resampled to the output grid (what the shard and the
    derivatives hold). Arrays are (X, Y, Z)."""

    images: dict[str, np.ndarray]  # 't1', 'jac' and the maps present, float32 (the shard's images)
    template: np.ndarray           # the template on the grid, float32 (QC only)
    mask: np.ndarray               # template brain mask, uint8
    affine: np.ndarray             # (4, 4) RAS affine of the grid
    grid: ants.ANTsImage           # the grid as an ANTs image, the reference for writing NIfTIs
    record: dict                   # shape, voxel size, rule, margin (grid_record): stored in the shard


def spatial_hash(config: dict) -> str:
    """Hash of the config sections that shape a shard (``spatial``)."""
    return config_hash(config, ["spatial"])


def run_participant_level(ctx) -> list[Path]:
    """Process every record in ``ctx.records``; return the shard paths written or kept."""
    cfg = ctx.config["spatial"]
    reg.set_ants_threads(ctx.omp_nthreads, cfg["random_seed"])
    params = resolve_preset(cfg["preset"], cfg["registration_overrides"])
    for record in ctx.records:  # fail fast, before any subject is processed
        if record.t1w is None:
            raise missing_t1w_error(record.key)
    derivatives.init_output_dir(ctx.output_dir, ctx.bids_dir)
    template = resolve_template(ctx, params)
    ctx.logger.info("template: %s (space-%s, hash %s); preset %s",
                    template.source, template.space, template.hash, cfg["preset"])
    ctx.provenance.extra["template"] = template.as_dict()
    ctx.provenance.extra["grid"] = describe_grid(template, cfg)
    ctx.provenance.extra["preset"] = {"name": cfg["preset"], "params": params}
    out = []
    for record in progress(ctx.records, "participant"):
        out.append(process_subject(ctx, record, template, params))
    return out


def grid_record(grid: ants.ANTsImage, rule: str, spatial: dict) -> dict:
    """What a shard records of its grid: shape, voxel size (mm), rule, margin (mm)."""
    return {"shape": [int(d) for d in grid.shape], "voxel_size_mm": round(float(grid.spacing[0]), 6),
            "rule": rule, "margin_mm": float(spatial["grid_margin_mm"]) if rule == "brain-fitted" else None}


def describe_grid(template: TemplateInfo, spatial: dict) -> dict:
    """The output grid for ``template`` (:func:`grid_record`) plus how well it holds the
    brain mask (``mask_inside``, ``brain_fill``: fractions); logged once per run."""
    grid, rule = grid_for_template(template.image, template.mask, spatial)
    described = {**grid_record(grid, rule, spatial), **grid_coverage(template.mask, grid)}
    log.info("output grid: %s voxels at %.2f mm (%s): %.2f %% of the template brain mask inside, "
             "brain %.1f %% of the grid", "x".join(map(str, described["shape"])), described["voxel_size_mm"],
             rule, 100 * described["mask_inside"], 100 * described["brain_fill"])
    if described["mask_inside"] < 0.999:
        log.warning("the output grid cuts off %.2f %% of the template brain mask: enlarge spatial.grid_shape "
                    "or spatial.grid_voxel_size, or use grid_voxel_size: auto", 100 * (1 - described["mask_inside"]))
    return described


def _input_hashes(ctx, paths: dict[str, Path]) -> dict[str, str]:
    ctx.provenance.add_inputs(paths.values())
    return {m: f"{Path(p).name}:{ctx.provenance.inputs.get(str(Path(p).resolve())) or sha256_file(p)}"
            for m, p in sorted(paths.items())}


def up_to_date(path: Path, expected: dict, force: bool) -> bool:
    """True if the shard at ``path`` matches ``expected`` (config/template/input hashes).

    Raises StaleOutputError when it exists but differs and ``force`` is False.
    """
    recorded = read_attrs(path) if path.is_file() and not force else None
    return reuse_existing(path, recorded, expected, force,
                          "pass --force to redo it, or use another output_dir")


def process_subject(ctx, record, template: TemplateInfo, params: dict) -> Path:
    """Run the whole participant pipeline for one SubjectRecord; return its shard path."""
    cfg = ctx.config["spatial"]
    key = record.key
    shard_file = shard_path(ctx.output_dir, record.subject, record.session)
    t1_nii, maps, qc_counts = load_subject_inputs(
        record.t1w, {m: getattr(record, m) for m in MAP_MODALITIES}, key)
    inputs = {"t1w": record.t1w, **{m: getattr(record, m) for m in MAP_MODALITIES if getattr(record, m)}}
    expected = {"config_hash": spatial_hash(ctx.config), "template_hash": template.hash,
                "input_hashes": _input_hashes(ctx, inputs)}
    if up_to_date(shard_file, expected, ctx.force):
        ctx.logger.info("%s: up to date (%s), skipping; --force redoes it", key, shard_file)
        return shard_file
    ctx.logger.info("%s: registering to the %s template", key, template.source)
    with tempfile.TemporaryDirectory(prefix=f"mmf_{key}_", dir=scratch_dir(ctx)) as tmp:
        grids, timings, reg_out = _register_and_resample(cfg, t1_nii, maps, template, params, Path(tmp))
        outputs = _write_derivatives(ctx, record, template, grids, reg_out, inputs, timings)
    grids_qc = {**qc_counts, "similarity_t1_template": outputs["similarity"],
                "template_space": template.space}
    shard = Shard(record.subject, record.session,
                  images=dict(grids.images), mask=grids.mask.astype(np.uint8), affine=grids.affine,
                  meta={"mmfusion_version": __version__, "config_hash": expected["config_hash"],
                        "template_hash": template.hash, "template_source": template.source,
                        "preset": cfg["preset"], "jac_kind": "log",
                        "input_hashes": expected["input_hashes"], "timings_s": timings, "qc": grids_qc,
                        "grid": grids.record})
    write_shard(shard_file, shard)
    ctx.logger.info("%s: shard %s (%.0f s)", key, shard_file, sum(timings.values()))
    return shard_file


def _register_and_resample(cfg, t1_nii, maps, template: TemplateInfo, params,
                           workdir: Path) -> tuple[GridImages, dict, reg.RegistrationResult]:
    """N4, register, log-JAC, warp maps, resample to the output grid.

    Returns (:class:`GridImages`, timings, registration result).
    """
    timings = {}
    t0 = time.perf_counter()
    t1 = ants.from_nibabel_nifti(t1_nii)
    if cfg["n4"]:
        t1 = reg.n4_correct(t1)
    timings["n4"] = time.perf_counter() - t0
    result = reg.register_to_template(template.image, t1, params, workdir / "reg")
    timings.update({f"reg_{k}": v for k, v in result.timings_s.items()})
    t0 = time.perf_counter()
    in_template = {"t1": result.warped, "jac": reg.log_jacobian(template.image, result)}
    for m, nii in maps.items():
        in_template[m] = reg.apply_to_template(template.image, ants.from_nibabel_nifti(nii), result)
    timings["jac_and_warp_maps"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid, rule = grid_for_template(template.image, template.mask, cfg)
    images = {m: to_grid(img, grid).numpy().astype(np.float32) for m, img in in_template.items()}
    tpl = to_grid(template.image, grid).numpy().astype(np.float32)
    mask = (to_grid(template.mask, grid, "nearestNeighbor").numpy() > 0.5).astype(np.uint8)
    for m in MAP_MODALITIES:
        if m in images:
            images[m] = np.nan_to_num(images[m], nan=0.0, posinf=0.0, neginf=0.0)
    grids = GridImages(images, tpl, mask, ras_affine(grid), grid, grid_record(grid, rule, cfg))
    timings["resample"] = time.perf_counter() - t0
    return grids, {k: round(v, 2) for k, v in timings.items()}, result


def _write_nifti(path: Path, grid: ants.ANTsImage, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        ants.image_write(grid.new_image_like(arr.astype(np.float32)), str(tmp))


def _write_derivatives(ctx, record, template: TemplateInfo, grids: GridImages, reg_out, inputs, timings) -> dict:
    """NIfTIs + sidecars + transforms + QC figure + HTML. Returns {'similarity': r}."""
    cfg = ctx.config["spatial"]
    out_dir, sub, ses = ctx.output_dir, record.subject, record.session
    vox = grids.record["voxel_size_mm"]
    sources = {m: derivatives.bids_uri(p, ctx.bids_dir) for m, p in inputs.items()}
    t1_src = [sources["t1w"]]
    written = {}
    arrays = {**grids.images, "mask": grids.mask}
    for m in ("t1", "jac", "fa", "ndi", "mask"):
        if m not in arrays:
            continue
        path = derivatives.modality_path(out_dir, sub, ses, m, template.space, vox)
        _write_nifti(path, grids.grid, arrays[m])
        src = t1_src + ([sources[m]] if m in MAP_MODALITIES else [])
        derivatives.write_sidecar(path, m, src, template.as_dict(),
                                  {"Preset": cfg["preset"], "VoxelSizeMM": vox} if m != "mask" else None)
        written[m] = path
    if cfg["keep_transforms"]:
        for kind, dst in derivatives.transform_paths(out_dir, sub, ses, template.space).items():
            src = reg_out.affine if kind == "affine" else reg_out.warp
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
    similarity = subject_qc.similarity(grids.images["t1"], grids.template, grids.mask)
    fig = derivatives.figure_path(out_dir, sub, ses)
    figures.registration_figure(fig, grids.images["t1"], grids.template, grids.images["jac"], grids.mask,
                                f"{record.key}  template: {template.source} (space-{template.space})  r(T1w, template) = {similarity:.3f}",
                                affine=grids.affine)
    meta = {"subject": sub, "session": ses or "(none)", "template": template.as_dict(), "preset": cfg["preset"],
            "similarity (Pearson r, warped T1w vs template, in mask)": f"{similarity:.4f}",
            "jac": "natural log of the Jacobian determinant of the nonlinear warp",
            "outputs": {m: str(p.relative_to(out_dir)) for m, p in written.items()},
            "inputs": {m: str(p) for m, p in inputs.items()}, "timings_s": timings,
            "mmfusion_version": __version__}
    subject_qc.subject_report(derivatives.report_path(out_dir, sub, ses), record.key, fig, meta)
    return {"similarity": similarity}
