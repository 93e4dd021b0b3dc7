"""Participant level: one subject (and session) per record, as one SLURM array task runs it.

Per record: FA/NDI fitted from preprocessed DWI where the fitted maps are absent (or
reused from an earlier run) -> validate inputs -> skip if an up-to-date shard exists -> N4 -> register T1w
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

from mmfusion.errors import InputDataError

from mmfusion import __version__
from mmfusion.io import derivatives
from mmfusion.io import dwi as dwi_io
from mmfusion.report import figures, subject_qc
from mmfusion.io.atomic import atomic_path
from mmfusion.config import spatial_hash  # the hash of what shapes a shard
from mmfusion.context import scratch_dir
from mmfusion.io.images import check_same_space, load_3d, load_subject_inputs, missing_t1w_error
from mmfusion.provenance import library_versions, reuse_existing, sha256_file
from mmfusion.runlog import get_logger, progress
from mmfusion.io.shards import Shard, read_attrs, shard_path, write_shard
from mmfusion.spatial import registration as reg
from mmfusion.spatial.presets import resolve_preset
from mmfusion.spatial.resample import grid_coverage, grid_for_template, ras_affine, to_grid
from mmfusion.spatial.template import TemplateInfo, n4_corrected_template, resolve_template

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
    if cfg["n4"] and template.source == "builtin":  # like with like: the subjects are N4-corrected
        template = n4_corrected_template(ctx, template)
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
    map_paths = {m: getattr(record, m) for m in MAP_MODALITIES}
    map_paths.update(maps_from_dwi(ctx, record))
    t1_nii, maps, qc_counts = load_subject_inputs(record.t1w, map_paths, key)
    inputs = {"t1w": record.t1w, **{m: p for m, p in map_paths.items() if p}}
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


def maps_from_dwi(ctx, record) -> dict[str, Path]:
    """FA/NDI fitted from the record's preprocessed DWI for the maps it lacks (fitted maps
    win). The cheap checks (gradients, shells, grid) run first; the maps are reused when
    an earlier run fitted them from the same files with the same settings (their sidecars'
    ``FitRecord``), else fitted and written. Returns {modality: fitted map path}."""
    from mmfusion.diffusion import dwi_checks as checks

    cfg = ctx.config["diffusion"]
    need = [m for m in MAP_MODALITIES if getattr(record, m) is None]
    if not need or record.dwi is None or not cfg["fit_missing"]:
        _log_sources(ctx, record, {})
        return {}
    inp = record.dwi
    img, bvals, bvecs, mask = dwi_io.load_dwi(inp)
    t1 = load_3d(record.t1w, "T1w")
    regridded = check_same_space(img.slicer[..., 0], inp.dwi, t1, record.t1w, "DWI")
    grads = str(inp.btable) if inp.uses_btable() else f"{inp.bval} / {inp.bvec}"
    bvals, bvecs = checks.check_gradients(bvals, bvecs, img.shape[3], grads, cfg["b0_threshold"])
    shells = checks.find_shells(bvals, cfg["b0_threshold"], cfg["shell_tolerance"])
    plan = list(need)
    if "ndi" in need and not checks.noddi_possible(shells):
        if not cfg["allow_fa_only"]:
            raise InputDataError(checks.single_shell_message(shells, str(inp.dwi)))
        ctx.logger.warning("%s: single-shell DWI (%s): fitting FA only, NDI stays missing (diffusion.allow_fa_only)",
                           record.key, inp.dwi.name)
        plan.remove("ndi")
    use = checks.dti_volumes(shells, cfg["dti_max_bval"], grads) if "fa" in plan else None
    if mask is not None:
        mask = checks.check_mask(mask, img.shape[:3], str(inp.mask))
    versions = library_versions()
    expected = {"inputs": _input_hashes(ctx, {**inp.files(), "t1w": record.t1w}), "settings": dict(cfg),
                "software": {k: versions[k] for k in ("dipy", "dmri-amico", "nibabel")} | {"mmfusion": __version__}}
    paths = {m: dwi_io.fitted_path(ctx.output_dir, record.subject, record.session, m) for m in plan}
    if paths and all(reuse_existing(p, dwi_io.recorded_fit(p), expected, ctx.force,
                                    "pass --force to refit it, or use another output_dir")
                     for p in paths.values()):
        ctx.logger.info("%s: %s fitted earlier from %s with these settings, reused", record.key,
                        "/".join(m.upper() for m in paths), inp.dwi.name)
        _log_sources(ctx, record, paths)
        return paths
    with tempfile.TemporaryDirectory(prefix=f"mmf_dwi_{record.key}_", dir=scratch_dir(ctx)) as tmp:
        fitted = _fit_dwi(ctx, record, img, bvals, bvecs, mask, shells, use, paths, expected, regridded, Path(tmp))
    _log_sources(ctx, record, fitted)
    return fitted


def _log_sources(ctx, record, fitted: dict[str, Path]) -> None:
    """Per modality, where its map came from: the log and ``provenance.map_sources``."""
    out = {}
    for m in MAP_MODALITIES:
        if getattr(record, m) is not None:
            out[m] = f"fitted map (derivative) {getattr(record, m)}"
        elif m in fitted:
            out[m] = f"fitted by mmfusion from {record.dwi.dwi} -> {fitted[m]}"
        else:
            out[m] = "absent"
    ctx.provenance.extra.setdefault("map_sources", {})[record.key] = out
    ctx.logger.info("%s: %s", record.key, "; ".join(f"{m.upper()}: {v}" for m, v in out.items()))


def _fit_dwi(ctx, record, img, bvals, bvecs, mask, shells, use, paths: dict[str, Path], expected: dict,
             regridded: bool, tmp: Path) -> dict[str, Path]:
    """Fit the maps of ``paths`` (DIPY tensor for FA, AMICO NODDI for NDI) and write them,
    each whole or not at all, its sidecar last."""
    from mmfusion.diffusion import dwi_checks as checks
    from mmfusion.diffusion import fit

    cfg, inp = ctx.config["diffusion"], record.dwi
    data = np.asarray(img.dataobj, dtype=np.float32)
    if mask is not None:
        mask_desc = derivatives.bids_uri(inp.mask, ctx.bids_dir)
    else:
        mask = dwi_io.brain_mask_from_b0(np.nan_to_num(data[..., shells.b0].mean(axis=-1)))
        mask = checks.check_mask(mask, img.shape[:3], f"{inp.dwi} (mask from its b=0 volumes)")
        mask_desc = "DIPY median_otsu of the mean b=0 volume (median radius 2, 4 passes)"
    data, mask, n_nonfinite = checks.finite_voxels(data, mask)
    common = {"Sources": [derivatives.bids_uri(p, ctx.bids_dir) for p in inp.files().values()],
              "Mask": mask_desc, "SpatialReference": "T1w (on the DWI's own grid)" if regridded else "T1w",
              "NonfiniteInputVoxelsExcluded": n_nonfinite, "Acquisition": shells.as_dict()}
    out: dict[str, tuple[np.ndarray, dict]] = {}
    if "fa" in paths:
        t0 = time.perf_counter()
        fa, bad = fit.fit_dti(data, bvals, bvecs, mask, use, cfg["b0_threshold"], cfg["dti_fit_method"])
        used = sorted({float(v) for v in shells.shell_of[use]})
        out["fa"] = (fa, {"Description": "fractional anisotropy of a diffusion tensor fitted by mmfusion",
                          "Model": "tensor", "Software": "DIPY (dipy.reconst.dti.TensorModel)",
                          "SoftwareVersion": library_versions()["dipy"], "FitMethod": cfg["dti_fit_method"],
                          "ShellsUsed": [f"{v:g}" for v in used], "VolumesUsed": int(use.sum()),
                          "NonfiniteFitVoxelsSetToZero": bad, **common})
        ctx.logger.info("%s: tensor fit (DIPY %s, b <= %g s/mm^2: %d volumes) %.1f s", record.key,
                        cfg["dti_fit_method"], cfg["dti_max_bval"], int(use.sum()), time.perf_counter() - t0)
    if "ndi" in paths:
        t0 = time.perf_counter()
        res = fit.fit_noddi(data, bvals, bvecs, mask, img.affine, tmp / "amico", Path(ctx.work_dir) / "amico_kernels",
                            b0_threshold=cfg["b0_threshold"], dpar=cfg["noddi_dpar"], diso=cfg["noddi_diso"],
                            nthreads=ctx.omp_nthreads, what=str(inp.dwi))
        out["ndi"] = (res.ndi, {"Description": "neurite density index (NODDI intra-cellular volume fraction, "
                                               "ICVF) fitted by mmfusion", **res.settings,
                                "ShellsUsed": ["0"] + [f"{v:g}" for v in shells.values],
                                "NonfiniteFitVoxelsSetToZero": res.nonfinite, **common})
        ctx.logger.info("%s: NODDI fit (AMICO, dPar %g, dIso %g mm^2/s) %.1f s", record.key, cfg["noddi_dpar"],
                        cfg["noddi_diso"], time.perf_counter() - t0)
    for m, (arr, meta) in out.items():
        dwi_io.write_fitted_map(paths[m], arr, img.affine, {**meta, "FitRecord": expected})
    return dict(paths)


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
    margin = float(cfg["brain_extraction_margin_mm"]) if cfg["brain_extraction"] else None
    result = reg.register_t1w(template.image, template.mask, t1, params, workdir, margin)
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
