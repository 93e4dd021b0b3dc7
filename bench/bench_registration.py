"""Registration accuracy and cost against planted truth (docs/method.md#1-spatial-normalization, issue 3).

Each subject is the template deformed by a known smooth diffeomorphic warp plus a small
affine, times a smooth multiplicative bias field, plus Gaussian noise. The pipeline
(N4 -> rigid/similarity/affine -> SyN, :mod:`mmfusion.spatial.registration`) recovers
log-JAC of the nonlinear warp; we compare it with the planted true log-JAC inside the
template brain mask on the default output grid (brain-fitted, 96x128x96 at ~1.7 mm) and,
side by side from the same registration, on the template-centred 2.5 mm 128x128x96 grid
of mmfusion < 0.3.0: Pearson r, regression slope of recovered on true, MAE; plus the
warped-T1w vs template correlation. Each subject's
registration runs in a fresh process so its wall time and peak RSS are its own.

Usage:
    python bench/bench_registration.py --presets default --n-subjects 8 --threads 2
    python bench/bench_registration.py --presets paper --n-subjects 1
    python bench/bench_registration.py --source simulate --whole-head --brain-extraction 3 --data DIR
    python bench/bench_registration.py --source simulate --whole-head --self-check --data DIR

``--whole-head`` simulates T1w with a synthetic skull and scalp; ``--brain-extraction M``
registers as ``spatial.brain_extraction`` with margin M mm; ``--self-check`` registers the
simulator's undeformed (head) template to its brain-only template, where the true log-JAC
is 0 everywhere, and prints the in-mask SD of the recovered one (``sd``).
Data: ``mmfusion.simulate.simulate_dataset`` when available (``--source simulate``),
else the built-in generator here (``--source builtin``, the default).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------- synthetic data
def _smooth_field(rng, shape, sigma_vox, n=3):
    from scipy.ndimage import gaussian_filter
    return np.stack([gaussian_filter(rng.standard_normal(shape), sigma_vox) for _ in range(n)])


def _upsample(field, shape):
    from scipy.ndimage import zoom
    factors = [s / c for s, c in zip(shape, field.shape[1:])]
    return np.stack([zoom(c, factors, order=1) for c in field])


def make_subject(template: np.ndarray, seed: int, max_disp_vox: float = 3.0,
                 bias: float = 0.15, noise: float = 0.03):
    """Deform ``template`` (X, Y, Z) by a smooth warp + affine; return (subject, true log-JAC).

    subject(y) = template(psi(A y)), psi(z) = z + v(z) (voxels). The registration's
    nonlinear warp on the template grid estimates psi^-1, so the true log-JAC is
    log det(I + grad w) with w = psi^-1 - id, obtained by fixed-point inversion.
    ``bias``: peak-to-peak fraction of the multiplicative bias field; ``noise``: SD as a
    fraction of the brain mean intensity.
    """
    from scipy.ndimage import map_coordinates
    rng = np.random.default_rng(seed)
    shape = template.shape
    coarse = tuple(max(4, s // 6) for s in shape)
    v = _upsample(_smooth_field(rng, coarse, 1.5), shape)
    v *= max_disp_vox / np.abs(v).max()
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    # inverse displacement w(x) = -v(x + w(x))
    w = -v.copy()
    for _ in range(12):
        w = -np.stack([map_coordinates(v[i], grid + w, order=1, mode="nearest") for i in range(3)])
    grads = np.stack([np.stack(np.gradient(w[i]), 0) for i in range(3)])  # (3, 3, X, Y, Z)
    jac = np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3)
    true_logjac = np.log(np.clip(np.linalg.det(jac), 1e-3, None)).astype(np.float32)
    # small affine about the centre: rotation <= 3 deg, scale <= 3 %, shift <= 2 vox
    ang = np.deg2rad(rng.uniform(-3, 3, 3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    mat = rot * rng.uniform(0.97, 1.03)
    centre = (np.asarray(shape) - 1) / 2
    shift = rng.uniform(-2, 2, 3)
    ay = np.einsum("ij,j...->i...", mat, grid - centre[:, None, None, None]) + (centre + shift)[:, None, None, None]
    vz = np.stack([map_coordinates(v[i], ay, order=1, mode="nearest") for i in range(3)])
    subject = map_coordinates(template, ay + vz, order=3, mode="constant").astype(np.float32)
    # bias field and noise
    b = _upsample(_smooth_field(rng, tuple(max(3, s // 20) for s in shape), 1.0, 1), shape)[0]
    b = (b - b.min()) / (np.ptp(b) + 1e-9) - 0.5
    subject *= np.exp(np.log1p(bias) * b * 2 / 2).astype(np.float32) if bias else 1
    brain_mean = float(template[template > 0.1 * template.max()].mean())
    subject += rng.normal(0, noise * brain_mean, shape).astype(np.float32)
    subject = np.clip(subject, 0, None)
    return subject, true_logjac


def builtin_dataset(out: Path, n_subjects: int, voxel: float, seed: int) -> list[dict]:
    """Write template + subjects at ``voxel`` mm; return [{t1w, truth, template, mask}]."""
    import ants
    from nilearn import datasets
    out.mkdir(parents=True, exist_ok=True)
    tpl = ants.from_nibabel_nifti(datasets.load_mni152_template(resolution=1))
    msk = ants.from_nibabel_nifti(datasets.load_mni152_brain_mask(resolution=1))
    tpl = ants.resample_image(tpl, (voxel,) * 3, use_voxels=False, interp_type=0)
    msk = ants.resample_image(msk, (voxel,) * 3, use_voxels=False, interp_type=1)
    tpl_arr = tpl.numpy() * 1000.0
    tpl = tpl.new_image_like(tpl_arr)
    tpl_path, msk_path = out / "template_T1w.nii.gz", out / "template_mask.nii.gz"
    ants.image_write(tpl, str(tpl_path))
    ants.image_write(msk, str(msk_path))
    rows = []
    for i in range(n_subjects):
        subj, truth = make_subject(tpl_arr, seed + i)
        s_path, t_path = out / f"sub-{i + 1:02d}_T1w.nii.gz", out / f"sub-{i + 1:02d}_truth_logjac.nii.gz"
        ants.image_write(tpl.new_image_like(subj), str(s_path))
        ants.image_write(tpl.new_image_like(truth), str(t_path))
        rows.append({"subject": f"{i + 1:02d}", "t1w": s_path, "truth": t_path,
                     "template": tpl_path, "mask": msk_path})
    return rows


def simulate_rows(out: Path, n_subjects: int, voxel: float, seed: int, whole_head: bool = False) -> list[dict]:
    from mmfusion.simulate import simulate_dataset
    if not (out / "dataset_description.json").is_file():
        simulate_dataset(out, n_subjects=n_subjects, n_strata=min(2, n_subjects), voxel_size=voxel, seed=seed,
                         bias_field=True, noise=True, random_affine=True, whole_head=whole_head)
    gt = out / "sourcedata" / "ground_truth"
    rows = []
    for sub in sorted(p.name for p in out.glob("sub-*") if p.is_dir())[:n_subjects]:
        truth = sorted(gt.glob(f"{sub}*log*jac*.nii*")) or sorted(gt.glob(f"{sub}/*log*jac*.nii*"))
        rows.append({"subject": sub[4:], "t1w": next((out / sub).rglob("*_T1w.nii.gz")), "truth": truth[0],
                     "template": gt / "template_T1w.nii.gz", "mask": gt / "template_mask.nii.gz"})
    return rows


def self_check_row(data: Path, whole_head: bool) -> dict:
    """The template-to-itself check: the simulator's undeformed template T1w (with its
    synthetic head when ``whole_head``) as the subject, an all-zero log-JAC as the truth."""
    import ants
    gt = data / "sourcedata" / "ground_truth"
    tpl = ants.image_read(str(gt / "template_T1w.nii.gz"))
    zero = data / "self_check_truth_logjac.nii.gz"
    if not zero.is_file():
        ants.image_write(tpl.new_image_like(np.zeros(tpl.shape, np.float32)), str(zero))
    return {"subject": "template" + ("-head" if whole_head else ""), "truth": zero,
            "t1w": gt / ("template_head_T1w.nii.gz" if whole_head else "template_T1w.nii.gz"),
            "template": gt / "template_T1w.nii.gz", "mask": gt / "template_mask.nii.gz"}


# ----------------------------------------------------------------- one subject
def run_one(row: dict, preset: str, threads: int, n4: bool, seed: int, queue, overrides=None,
            brain_margin: float | None = None, n4_levels: int = 4, template_n4: bool = False) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants
    from mmfusion.spatial import registration as reg
    from mmfusion.spatial.presets import resolve_preset
    from mmfusion.spatial.registration import n4_correct
    from mmfusion.config import default_config
    from mmfusion.spatial.resample import grid_for_template, output_grid, to_grid
    reg.set_ants_threads(threads, seed)
    params = resolve_preset(preset, overrides)
    tpl = ants.image_read(str(row["template"]))
    if template_n4:  # as the participant level does for the built-in template
        tpl = n4_correct(tpl, levels=n4_levels)
    mask = ants.image_read(str(row["mask"]))
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    moving = ants.image_read(str(row["t1w"]))
    if n4:
        moving = n4_correct(moving, levels=n4_levels)
    t_n4 = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="benchreg_") as tmp:
        res = reg.register_t1w(tpl, mask, moving, params, tmp, brain_margin)
        logjac = reg.log_jacobian(tpl, res)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        truth = ants.image_read(str(row["truth"]))
        grids = {"": grid_for_template(tpl, mask, default_config()["spatial"])[0],
                 "old_": output_grid(tpl, 2.5, (128, 128, 96))}
        scores = {}
        for prefix, grid in grids.items():
            rec, true = to_grid(logjac, grid).numpy(), to_grid(truth, grid).numpy()
            m = to_grid(mask, grid, "nearestNeighbor").numpy() > 0.5
            warped, tplg = to_grid(res.warped, grid).numpy(), to_grid(tpl, grid).numpy()
            x, y = true[m], rec[m]
            flat = np.ptp(x) == 0  # the self-check's all-zero truth: no r or slope
            scores.update({f"{prefix}r": float("nan") if flat else float(np.corrcoef(x, y)[0, 1]),
                           f"{prefix}slope": float("nan") if flat else float(np.polyfit(x, y, 1)[0]),
                           f"{prefix}sd": float(y.std()), f"{prefix}p1_p99": np.percentile(y, [1, 99]).round(3).tolist(),
                           f"{prefix}mae": float(np.abs(x - y).mean()),
                           f"{prefix}t1_r": float(np.corrcoef(warped[m], tplg[m])[0, 1])})
        scores["grid"] = f"{'x'.join(map(str, grids[''].shape))} at {grids[''].spacing[0]:.2f} mm"
    queue.put({
        "subject": row["subject"], "preset": preset, "n4": n4, "n4_levels": n4_levels if n4 else None,
        "template_n4": template_n4, **scores,
        "wall_s": wall, "cpu_s": cpu, "n4_s": t_n4, "stages_s": res.timings_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
    })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="default")
    ap.add_argument("--n-subjects", type=int, default=8)
    ap.add_argument("--voxel", type=float, default=1.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-n4", action="store_true")
    ap.add_argument("--n4-levels", type=int, default=4, help="N4 fitting levels (the participant level uses 4)")
    ap.add_argument("--raw-template", action="store_true",
                    help="do not run the subjects' N4 on the template (the participant level corrects a built-in "
                         "template since 0.3.0; before, it did not)")
    ap.add_argument("--source", choices=["builtin", "simulate"], default="builtin")
    ap.add_argument("--data", type=Path, default=None, help="reuse/keep data here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--overrides", type=json.loads, default=None,
                    help='JSON preset overrides, e.g. \'{"syn_metric": "CC", "syn_sampling": 2}\'')
    ap.add_argument("--jobs", type=int, default=1,
                    help="subjects registered at the same time (each with --threads); >1 inflates wall times")
    ap.add_argument("--only", default=None, help="comma-separated subject labels to run (default: all)")
    ap.add_argument("--whole-head", action="store_true",
                    help="with --source simulate: T1w with a synthetic skull and scalp (mmfusion simulate --whole-head)")
    ap.add_argument("--brain-extraction", type=float, default=None, metavar="MARGIN_MM",
                    help="skull-strip every T1w first, as spatial.brain_extraction with this margin")
    ap.add_argument("--self-check", action="store_true",
                    help="with --whole-head: register the undeformed head template itself (truth: log-JAC 0) "
                         "instead of the subjects; prints the in-mask SD of the recovered log-JAC")
    args = ap.parse_args(argv)
    if (args.whole_head or args.self_check) and args.source != "simulate":
        ap.error("--whole-head and --self-check need --source simulate")
    data = args.data or Path(tempfile.mkdtemp(prefix="benchreg_data_"))
    t0 = time.perf_counter()
    rows = (simulate_rows(data, args.n_subjects, args.voxel, args.seed, args.whole_head)
            if args.source == "simulate" else builtin_dataset(data, args.n_subjects, args.voxel, args.seed))
    if args.self_check:
        rows = [self_check_row(data, args.whole_head)]
    print(f"data: {len(rows)} subjects at {args.voxel} mm ({args.source}), {time.perf_counter() - t0:.0f}s; "
          f"load average={' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if args.only:
        rows = [r for r in rows if r["subject"] in args.only.split(",")]
    results = []
    ctx = mp.get_context("spawn")
    jobs = [(preset, row) for preset in args.presets.split(",") for row in rows]
    running: list = []  # (process, queue); --jobs > 1 shares the cores: compare CPU seconds then
    while jobs or running:
        while jobs and len(running) < args.jobs:
            preset, row = jobs.pop(0)
            q = ctx.Queue()
            p = ctx.Process(target=run_one, args=(row, preset, args.threads, not args.no_n4, args.seed, q,
                                                  args.overrides, args.brain_extraction, args.n4_levels,
                                                  not (args.no_n4 or args.raw_template)))
            p.start()
            running.append((p, q))
        out = None
        while out is None:
            for p, q in running:
                try:
                    out = q.get(timeout=1)
                except Exception:  # queue.Empty
                    if p.exitcode not in (None, 0):
                        raise RuntimeError(f"registration process failed (exit {p.exitcode})")
                    continue
                p.join()
                running.remove((p, q))
                break
        results.append(out)
        print(f"{out['preset']:10s} sub-{out['subject']} r={out['r']:.3f} slope={out['slope']:.3f} "
              f"sd={out['sd']:.4f} p1/p99={out['p1_p99']} "
              f"mae={out['mae']:.4f} t1_r={out['t1_r']:.3f} (grid {out['grid']}; old 2.5 mm grid: "
              f"r={out['old_r']:.3f} slope={out['old_slope']:.3f}) wall={out['wall_s']:.0f}s cpu={out['cpu_s']:.0f}s "
              f"peak={out['peak_rss_gb']:.2f}GB stages={ {k: round(v) for k, v in out['stages_s'].items()} }",
              flush=True)
    print("\npreset      n  median_r  median_slope  median_mae  median_t1_r  median_wall_s  median_cpu_s  max_peak_GB")
    for preset in args.presets.split(","):
        rs = [r for r in results if r["preset"] == preset]
        med = lambda k: float(np.median([r[k] for r in rs]))  # noqa: E731
        print(f"{preset:10s} {len(rs):2d}  {med('r'):.3f}     {med('slope'):.3f}         {med('mae'):.4f}      "
              f"{med('t1_r'):.3f}        {med('wall_s'):.0f}            {med('cpu_s'):.0f}           {max(r['peak_rss_gb'] for r in rs):.2f}")
        print(f"{preset:10s} min/max r={min(r['r'] for r in rs):.3f}/{max(r['r'] for r in rs):.3f} "
              f"slope={min(r['slope'] for r in rs):.3f}/{max(r['slope'] for r in rs):.3f} "
              f"cpu={min(r['cpu_s'] for r in rs):.0f}/{max(r['cpu_s'] for r in rs):.0f}s")
        print(f"{preset:10s} old 2.5 mm grid, same registrations: median r={med('old_r'):.3f} "
              f"slope={med('old_slope'):.3f} mae={med('old_mae'):.4f} t1_r={med('old_t1_r'):.3f}")
    print(f"threads={args.threads} jobs={args.jobs} cores={os.cpu_count()} "
          f"load average at the end={' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
