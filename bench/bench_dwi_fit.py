"""FA/NDI fits from simulated DWI: accuracy against the truth, and cost per subject.

    python bench/bench_dwi_fit.py accuracy [--n 3] [--voxel-size 2.5] [--snr 20 30] [--dpar 1.7e-3 2.0e-3]
    python bench/bench_dwi_fit.py cost [--voxel-size 1.25] [--directions 30] [--slab 0] [--threads 2]

``accuracy``: ``mmfusion simulate --dwi`` subjects (NODDI-type synthesis, Rician noise at
each SNR; ``--dpar`` 2.0e-3 synthesizes with another intra-axonal diffusivity than the
one AMICO fits with, 1.7e-3: a model mismatch), fitted as the participant level does
(DIPY tensor on b <= 1000, AMICO NODDI on all shells, in the brain mask); Pearson r
between fitted and true FA/NDI in white matter (true WM partial volume > 0.5) and in the
brain mask, and in brain tissue (grey + white matter partial volume > 0.5: the mask without
CSF, where NODDI's NDI is undefined), per subject. ``cost``: one synthetic brain-sized volume on the MNI grid at
``--voxel-size`` with 3 x ``--directions`` + 6 b=0 volumes; CPU seconds (user + system,
resource.getrusage) and peak resident memory of the DIPY tensor fit and of the AMICO
NODDI fit (kernels built once beforehand, as the cached case; the kernel build is timed
apart), each in its own child process.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import limit_threads  # noqa: E402


def _fit(dwi_file: Path, mask_file: Path, kernels: Path, threads: int, which=("fa", "ndi")) -> dict:
    import nibabel as nib
    import numpy as np

    from mmfusion.diffusion import dwi_checks as checks, fit

    img = nib.load(str(dwi_file))
    data = np.asarray(img.dataobj, np.float32)
    stem = str(dwi_file).replace(".nii.gz", "")
    bvals, bvecs = checks.check_gradients(np.loadtxt(stem + ".bval"), np.loadtxt(stem + ".bvec"),
                                          data.shape[3], stem, 50)
    shells = checks.find_shells(bvals, 50, 100)
    mask = checks.check_mask(np.asanyarray(nib.load(str(mask_file)).dataobj), data.shape[:3], str(mask_file))
    out = {}
    if "fa" in which:
        out["fa"], _ = fit.fit_dti(data, bvals, bvecs, mask, checks.dti_volumes(shells, 1000, stem), 50)
    if "ndi" in which:
        with tempfile.TemporaryDirectory() as tmp:
            out["ndi"] = fit.fit_noddi(data, bvals, bvecs, mask, img.affine, Path(tmp), kernels,
                                       b0_threshold=50, nthreads=threads).ndi
    return out


def accuracy(args) -> list[dict]:
    import nibabel as nib
    import numpy as np

    from mmfusion import simulate as sim

    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_dwi_"))
    for dpar in args.dpar:
        for snr in args.snr:
            root = work / f"sim_snr{snr:g}_dpar{dpar:g}"
            sim.simulate_dataset(root, n_subjects=args.n, n_strata=1, voxel_size=args.voxel_size, seed=args.seed,
                                 dwi={"snr": snr, "dpar": dpar, "directions": args.directions})
            for i in range(1, args.n + 1):
                key = f"sub-{i:02d}"
                folder = root / "derivatives" / "qsiprep" / key / "dwi"
                t0 = time.perf_counter()
                maps = _fit(folder / f"{key}_space-T1w_desc-preproc_dwi.nii.gz",
                            folder / f"{key}_space-T1w_desc-brain_mask.nii.gz", work / "kernels", args.threads)
                seconds = time.perf_counter() - t0
                truth = root / "sourcedata" / "ground_truth"
                mask = np.asanyarray(nib.load(str(folder / f"{key}_space-T1w_desc-brain_mask.nii.gz")).dataobj) > 0
                wm = np.asanyarray(nib.load(str(truth / f"{key}_space-T1w_desc-wm_mask.nii.gz")).dataobj) > 0
                tissue = np.asanyarray(nib.load(str(truth / f"{key}_space-T1w_desc-tissue_mask.nii.gz")).dataobj) > 0
                row = {"subject": key, "snr": snr, "synth_dpar": dpar, "fit_dpar": 1.7e-3, "fit_s": round(seconds, 1),
                       "voxels_wm": int(wm.sum()), "voxels_mask": int(mask.sum())}
                for m in ("fa", "ndi"):
                    true = np.asanyarray(nib.load(str(truth / f"{key}_space-T1w_desc-true_{m}.nii.gz")).dataobj)
                    for name, region in (("wm", wm), ("tissue", tissue), ("mask", mask)):
                        row[f"r_{m}_{name}"] = round(float(np.corrcoef(maps[m][region], true[region])[0, 1]), 4)
                    row[f"bias_{m}_wm"] = round(float(np.mean(maps[m][wm] - true[wm])), 4)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _child(kind: str, dwi: str, mask: str, kernels: str, threads: int) -> None:
    t0 = time.perf_counter()
    _fit(Path(dwi), Path(mask), Path(kernels), threads, (kind,))
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"fit": kind, "wall_s": round(wall, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
                      "peak_rss_gb": round(ru.ru_maxrss / 1e6, 2)}), flush=True)


def cost(args) -> None:
    import subprocess

    import nibabel as nib
    import numpy as np

    from mmfusion.diffusion import synthesis
    from mmfusion.simulate import load_template_grid

    grid = load_template_grid(args.voxel_size)
    if args.slab:  # a brain-sized crop: the central --slab axial slices (the cost scales with the voxels)
        z0 = grid.shape[2] // 2 - args.slab // 2
        cut = (slice(None), slice(None), slice(z0, z0 + args.slab))
        grid = type(grid)(grid.voxel_size, grid.t1[cut].shape, grid.affine,
                          grid.t1[cut], grid.gm[cut], grid.wm[cut], grid.mask[cut])
    rng = np.random.default_rng(0)
    model = synthesis.SignalModel(synthesis.acquisition(rng, synthesis.DEFAULT_SHELLS, args.directions, 6))
    fa = np.clip(0.12 * grid.gm + 0.45 * grid.wm + 0.03, 0, 1)
    ndi = np.clip(0.35 * grid.gm + 0.6 * grid.wm, 0, 1)
    fiso = np.clip(1 - grid.gm - grid.wm, 0, 1)
    t0 = time.perf_counter()
    dwi, _ = synthesis.synthesize(rng, model, fa, ndi, fiso, grid.mask, snr=25)
    print(json.dumps({"volume": list(grid.shape), "volumes": int(dwi.shape[3]), "voxels_mask": int(grid.mask.sum()),
                      "voxel_mm": args.voxel_size, "synthesis_s": round(time.perf_counter() - t0, 1)}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_dwi_cost_"))
    stem = work / "sub-01_space-T1w_desc-preproc_dwi"
    nib.save(nib.Nifti1Image(dwi.astype(np.float32), grid.affine), f"{stem}.nii.gz")
    del dwi
    np.savetxt(f"{stem}.bval", model.acq.bvals[None], fmt="%g")
    np.savetxt(f"{stem}.bvec", model.acq.bvecs.T, fmt="%.6f")
    nib.save(nib.Nifti1Image(grid.mask.astype(np.uint8), grid.affine), work / "mask.nii.gz")
    # kernels once (the cached case is what every subject after the first pays)
    from mmfusion.diffusion import fit
    t0 = time.perf_counter()
    small = np.zeros((4, 4, 4, len(model.acq.bvals)), np.float32) + 1
    m = np.ones((4, 4, 4), bool)
    with tempfile.TemporaryDirectory() as tmp:
        fit.fit_noddi(small, model.acq.bvals, model.acq.bvecs, m, np.eye(4), Path(tmp), work / "kernels",
                      b0_threshold=50, nthreads=args.threads)
    print(json.dumps({"amico_kernels_and_setup_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for kind in ("fa", "ndi"):
        subprocess.run([sys.executable, __file__, "_child", kind, f"{stem}.nii.gz", str(work / "mask.nii.gz"),
                        str(work / "kernels"), str(args.threads)], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--n", type=int, default=3)
    a.add_argument("--voxel-size", type=float, default=2.5)
    a.add_argument("--snr", type=float, nargs="+", default=[20.0, 30.0])
    a.add_argument("--dpar", type=float, nargs="+", default=[1.7e-3, 2.0e-3])
    a.add_argument("--directions", type=int, default=30)
    a.add_argument("--seed", type=int, default=11)
    a.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("cost")
    c.add_argument("--voxel-size", type=float, default=1.25)
    c.add_argument("--directions", type=int, default=30)
    c.add_argument("--slab", type=int, default=0, help="only the central SLAB axial slices (0: the whole volume)")
    c.add_argument("--threads", type=int, default=2)
    ch = sub.add_parser("_child")
    for name in ("kind", "dwi", "mask", "kernels"):
        ch.add_argument(name)
    ch.add_argument("threads", type=int)
    args = p.parse_args()
    limit_threads(getattr(args, "threads", 2))
    if args.cmd == "accuracy":
        accuracy(args)
    elif args.cmd == "cost":
        cost(args)
    else:
        _child(args.kind, args.dwi, args.mask, args.kernels, args.threads)


if __name__ == "__main__":
    main()
