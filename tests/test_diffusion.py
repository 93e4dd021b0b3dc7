"""FA/NDI fitted from preprocessed DWI: the checks, the discovery precedence, the fits
against a known truth, the cache, ``mmfusion simulate --dwi`` and (extended) a cohort
that has only DWI through participant -> group with the real CLI."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from mmfusion.config import load_config
from mmfusion.context import RunContext
from mmfusion.diffusion import dwi_checks as checks
from mmfusion.diffusion import fit, synthesis
from mmfusion.errors import InputDataError, StaleOutputError
from mmfusion.io import bids
from mmfusion.io import dwi as dwi_io
from mmfusion.levels.participant import maps_from_dwi
from mmfusion.provenance import Provenance
from mmfusion.runlog import setup_logging
from tests.bids_fixtures import make_dataset

SHAPE = (10, 10, 8)
NODDI_SHELLS = (1000.0, 2000.0)  # one acquisition's shells for the NODDI tests: AMICO's kernels built once


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory) -> Path:
    """A work folder whose AMICO kernel cache the NODDI tests share (built once, ~10 s)."""
    return tmp_path_factory.mktemp("work")


# ------------------------------------------------------------------ tiny DWI series
def _acq(shells=(1000.0, 2000.0), n_dirs=12, n_b0=2, seed=0):
    return synthesis.acquisition(np.random.default_rng(seed), shells, n_dirs, n_b0)


def _phantom(acq, seed=0, dpar=1.7e-3, snr=40.0, shape=SHAPE):
    """A WM-like phantom: smooth true FA and NDI, fibres along a smooth field; (dwi, fa, ndi)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    smooth = [ndimage.gaussian_filter(rng.standard_normal(shape), 2) for _ in range(2)]
    fa = np.clip(0.5 + 0.2 * smooth[0] / smooth[0].std(), 0.2, 0.8)
    ndi = np.clip(0.55 + 0.1 * smooth[1] / smooth[1].std(), 0.35, 0.75)
    model = synthesis.SignalModel(acq, dpar=dpar)
    dwi, _ = synthesis.synthesize(rng, model, fa, ndi, np.zeros(shape), np.ones(shape, bool), snr=snr)
    return dwi, fa, ndi


def _write_series(folder: Path, stem: str, dwi, bvals, bvecs, affine=np.eye(4), mask=True):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(dwi.astype(np.float32), affine), folder / f"{stem}_desc-preproc_dwi.nii.gz")
    np.savetxt(folder / f"{stem}_desc-preproc_dwi.bval", np.atleast_2d(bvals), fmt="%g")
    np.savetxt(folder / f"{stem}_desc-preproc_dwi.bvec", np.asarray(bvecs).T, fmt="%.6f")
    if mask:
        nib.save(nib.Nifti1Image(np.ones(dwi.shape[:3], np.uint8), affine), folder / f"{stem}_desc-brain_mask.nii.gz")


def _subject(tmp_path, dwi=None, bvals=None, bvecs=None, affine=np.eye(4), work=None, **cfg):
    """A raw dataset with one T1w (the DWI grid) and a QSIPrep-style series; (ctx, record)."""
    acq = _acq()
    if dwi is None:
        dwi, _, _ = _phantom(acq)
    bvals = acq.bvals if bvals is None else bvals
    bvecs = acq.bvecs if bvecs is None else bvecs
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    nib.save(nib.Nifti1Image(dwi[..., 0].astype(np.float32), np.eye(4)), root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    deriv = root / "derivatives" / "qsiprep"
    deriv.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "qsiprep", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "qsiprep"}]}))
    _write_series(deriv / "sub-01" / "dwi", "sub-01_space-T1w", dwi, bvals, bvecs, affine)
    (record,) = bids.discover(root)
    config = load_config(overrides={"diffusion": cfg} if cfg else None)
    out = tmp_path / "out"
    ctx = RunContext(level="participant", bids_dir=root, output_dir=out, work_dir=work or out / "work", config=config,
                     seed=0, provenance=Provenance("t", "participant", [], config, 0), logger=setup_logging(0),
                     records=[record], omp_nthreads=1)
    return ctx, record


def _fitted(ctx) -> list[str]:
    folder = ctx.output_dir / "sub-01" / "dwi"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ------------------------------------------------------------------------ checks
def test_gradient_count_must_match_the_volumes(tmp_path):
    acq = _acq()
    ctx, record = _subject(tmp_path, bvals=acq.bvals[:-1], bvecs=acq.bvecs[:-1])
    with pytest.raises(InputDataError, match=r"desc-preproc_dwi\.bval.*25 b-values and 25 b-vectors for 26 volumes"):
        maps_from_dwi(ctx, record)
    assert _fitted(ctx) == [] and InputDataError.exit_code == 65


def test_bvecs_must_be_unit_norm(tmp_path):
    acq = _acq()
    bvecs = acq.bvecs.copy()
    bvecs[3] *= 1.5 if acq.bvals[3] > 0 else 1
    bvecs[5] *= 1.5
    ctx, record = _subject(tmp_path, bvecs=bvecs)
    with pytest.raises(InputDataError, match=r"\.bvec: \d+ diffusion-weighted b-vector\(s\) not of unit norm"):
        maps_from_dwi(ctx, record)
    assert _fitted(ctx) == []


def test_a_series_without_b0_is_refused(tmp_path):
    acq = _acq(n_b0=1)
    weighted = acq.bvals > 0
    dwi, _, _ = _phantom(acq)
    ctx, record = _subject(tmp_path, dwi=dwi[..., weighted], bvals=acq.bvals[weighted], bvecs=acq.bvecs[weighted])
    with pytest.raises(InputDataError, match=r"no b=0 volume \(no b-value <= 50"):
        maps_from_dwi(ctx, record)
    assert _fitted(ctx) == []


def test_single_shell_stops_unless_fa_only_is_allowed(tmp_path, capfd):
    acq = _acq(shells=(1000.0,), n_dirs=20)
    dwi, fa, _ = _phantom(acq)
    ctx, record = _subject(tmp_path / "a", dwi=dwi, bvals=acq.bvals, bvecs=acq.bvecs)
    with pytest.raises(InputDataError, match=r"NODDI needs 2 or more non-zero shells, found b=1000 \(20\).*--allow-fa-only"):
        maps_from_dwi(ctx, record)
    assert _fitted(ctx) == []
    ctx, record = _subject(tmp_path / "b", dwi=dwi, bvals=acq.bvals, bvecs=acq.bvecs, allow_fa_only=True)
    got = maps_from_dwi(ctx, record)
    assert sorted(got) == ["fa"] and "fitting FA only" in capfd.readouterr().err
    assert _fitted(ctx) == ["sub-01_space-T1w_model-tensor_param-fa_dwimap.json",
                            "sub-01_space-T1w_model-tensor_param-fa_dwimap.nii.gz"]
    assert ctx.provenance.extra["map_sources"]["sub-01"]["ndi"] == "absent"


def test_a_dwi_outside_the_t1w_space_is_refused(tmp_path):
    far = np.eye(4)
    far[:3, 3] = 500.0
    ctx, record = _subject(tmp_path, affine=far)
    with pytest.raises(InputDataError, match=r"DWI field of view .* covers 0% of the T1w .*space-T1w"):
        maps_from_dwi(ctx, record)
    assert _fitted(ctx) == []


def test_a_mask_on_another_grid_is_refused(tmp_path):
    ctx, record = _subject(tmp_path)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), record.dwi.mask)
    with pytest.raises(InputDataError, match=r"brain_mask\.nii\.gz: brain mask shape \(4, 4, 4\) differs"):
        maps_from_dwi(ctx, record)


def test_the_mrtrix_b_table_stands_in_for_missing_bval_bvec(tmp_path):
    ctx, record = _subject(tmp_path, allow_fa_only=True)
    acq = _acq()
    np.savetxt(record.dwi.bval.with_suffix(".b"), np.column_stack([acq.bvecs, acq.bvals]), fmt="%.6f")
    record.dwi.bval.unlink()
    (record,) = bids.discover(ctx.bids_dir)
    assert record.dwi.uses_btable() and sorted(record.dwi.files()) == ["btable", "dwi", "dwi_mask"]
    np.savetxt(record.dwi.btable, np.column_stack([acq.bvecs, acq.bvals])[:-2], fmt="%.6f")
    with pytest.raises(InputDataError, match=r"desc-preproc_dwi\.b: 24 b-values and 24 b-vectors for 26 volumes"):
        maps_from_dwi(ctx, record)


def test_shells_group_nearby_bvalues():
    shells = checks.find_shells(np.array([0, 5, 990, 1010, 1000, 1995, 2005, 3000]), 50, 100)
    assert shells.values == (1000.0, 2000.0, 3000.0) and shells.counts == (3, 2, 1)
    assert shells.b0.sum() == 2


# -------------------------------------------------------------------- precedence
def _add_qsiprep(root: Path, sub: str):
    deriv = root / "derivatives" / "qsiprep"
    deriv.mkdir(parents=True, exist_ok=True)
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "qsiprep", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "qsiprep"}]}))
    acq = _acq()
    _write_series(deriv / f"sub-{sub}" / "dwi", f"sub-{sub}_acq-multi_space-T1w", np.ones((6, 6, 5, len(acq.bvals))),
                  acq.bvals, acq.bvecs)


def test_fitted_maps_win_over_preprocessed_dwi(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01", "02"), missing_ndi=("02",))
    for sub in ("01", "02"):
        _add_qsiprep(root, sub)
    recs = {r.subject: r for r in bids.discover(root)}
    assert recs["01"].fa.name.endswith("param-fa_dwimap.nii.gz") and recs["01"].ndi is not None
    assert recs["01"].dwi is None  # both maps exist: the DWI is not even looked at
    assert recs["02"].fa is not None and recs["02"].ndi is None
    assert recs["02"].dwi.dwi.name == "sub-02_acq-multi_space-T1w_desc-preproc_dwi.nii.gz"
    assert recs["02"].dwi.mask.name == "sub-02_acq-multi_space-T1w_desc-brain_mask.nii.gz"
    assert recs["02"].dwi.source == "qsiprep" and "to be fitted from" in recs["02"].missing["ndi"]


def test_raw_dwi_is_fitted_only_when_declared_preprocessed(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), missing_ndi=("01",))
    folder = root / "sub-01" / "dwi"
    acq = _acq()
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((6, 6, 5, len(acq.bvals)), np.float32), np.eye(4)), folder / "sub-01_dwi.nii.gz")
    np.savetxt(folder / "sub-01_dwi.bval", acq.bvals[None], fmt="%g")
    np.savetxt(folder / "sub-01_dwi.bvec", acq.bvecs.T, fmt="%.6f")
    (rec,) = bids.discover(root)
    assert rec.dwi is None
    (rec,) = bids.discover(root, dwi_preprocessed=True)
    assert rec.dwi.source == "bids" and rec.dwi.bval.name == "sub-01_dwi.bval" and rec.dwi.mask is None


# ----------------------------------------------------------- fits against truth
def test_tensor_fa_matches_the_truth():
    acq = _acq(shells=(1000.0, 2000.0), n_dirs=30, n_b0=4)
    dwi, fa, _ = _phantom(acq, shape=(12, 12, 10), snr=30)
    shells = checks.find_shells(acq.bvals, 50, 100)
    mask = np.ones(fa.shape, bool)
    got, bad = fit.fit_dti(dwi, acq.bvals, acq.bvecs, mask, checks.dti_volumes(shells, 1000, "x"), 50)
    assert bad == 0 and got.dtype == np.float32 and 0 <= got.min() and got.max() <= 1
    assert np.corrcoef(got.ravel(), fa.ravel())[0, 1] > 0.9


def test_noddi_ndi_matches_the_truth_and_caches_kernels(tmp_path, shared_work):
    acq = _acq(shells=NODDI_SHELLS, n_dirs=30, n_b0=4)
    dwi, _, ndi = _phantom(acq, shape=(8, 8, 6), snr=30)
    mask = np.ones(ndi.shape, bool)
    mask[0, 0, 0] = False
    res = fit.fit_noddi(dwi, acq.bvals, acq.bvecs, mask, np.eye(4), tmp_path / "w", shared_work / "amico_kernels",
                        b0_threshold=50)
    assert np.corrcoef(res.ndi[mask], ndi[mask])[0, 1] > 0.8 and res.ndi[0, 0, 0] == 0
    assert res.settings["ParallelDiffusivity_mm2_per_s"] == 1.7e-3 and res.settings["IsotropicDiffusivity_mm2_per_s"] == 3e-3
    kernels = [p for p in (shared_work / "amico_kernels").iterdir() if p.name.startswith("NODDI_")]
    assert len(kernels) == 1 and len(list(kernels[0].glob("A_*.npy"))) == 145


# ----------------------------------------------------------------- cache, rerun
def test_fitted_maps_are_reused_and_a_changed_setting_is_refused(tmp_path, capfd, shared_work):
    acq = _acq(shells=NODDI_SHELLS, n_dirs=16, n_b0=2)
    dwi, _, _ = _phantom(acq, shape=(6, 6, 5))
    ctx, record = _subject(tmp_path, dwi=dwi, bvals=acq.bvals, bvecs=acq.bvecs, work=shared_work)
    first = maps_from_dwi(ctx, record)
    assert sorted(first) == ["fa", "ndi"]
    meta = json.loads(dwi_io.sidecar(first["ndi"]).read_text())
    assert meta["Model"] == "NODDI" and meta["ParallelDiffusivity_mm2_per_s"] == 1.7e-3
    assert meta["ShellsUsed"] == ["0", "1000", "2000"] and meta["Mask"].endswith("desc-brain_mask.nii.gz")
    fa_meta = json.loads(dwi_io.sidecar(first["fa"]).read_text())
    assert fa_meta["ShellsUsed"] == ["0", "1000"] and fa_meta["Software"].startswith("DIPY")
    stamp = first["ndi"].stat().st_mtime_ns
    capfd.readouterr()
    again = maps_from_dwi(ctx, record)
    assert again == first and first["ndi"].stat().st_mtime_ns == stamp and "reused" in capfd.readouterr().err
    ctx.config["diffusion"]["noddi_dpar"] = 2.0e-3
    with pytest.raises(StaleOutputError, match="different settings; pass --force"):
        maps_from_dwi(ctx, record)


# -------------------------------------------------------------- simulate --dwi
def test_simulate_dwi_writes_qsiprep_series_and_truth(tmp_path):
    from mmfusion.simulate import main

    out = tmp_path / "sim"
    assert main([str(out), "--n-subjects", "1", "--n-strata", "1", "--voxel-size", "6", "--dwi",
                 "--dwi-directions", "10", "--dwi-snr", "20"]) == 0
    folder = out / "derivatives" / "qsiprep" / "sub-01" / "dwi"
    img = nib.load(folder / "sub-01_space-T1w_desc-preproc_dwi.nii.gz")
    bvals = np.loadtxt(folder / "sub-01_space-T1w_desc-preproc_dwi.bval")
    bvecs = np.loadtxt(folder / "sub-01_space-T1w_desc-preproc_dwi.bvec")
    assert img.shape[3] == len(bvals) == bvecs.shape[1] == 3 * 10 + synthesis.DEFAULT_B0
    assert sorted(set(bvals.tolist())) == [0, 1000, 2000, 3000]
    t1 = nib.load(out / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert np.allclose(img.affine, t1.affine) and img.shape[:3] == t1.shape
    truth = out / "sourcedata" / "ground_truth"
    for name in ("true_fa", "true_ndi", "wm_mask"):
        assert (truth / f"sub-01_space-T1w_desc-{name}.nii.gz").is_file()
    assert not (out / "derivatives" / "qsirecon").exists()
    planted = json.loads((truth / "planted.json").read_text())
    assert planted["generator"]["options"]["dwi"]["snr"] == 20
    # the signal falls with b in the brain
    data = np.asarray(img.dataobj, np.float32)
    mask = np.asanyarray(nib.load(folder / "sub-01_space-T1w_desc-brain_mask.nii.gz").dataobj) > 0
    means = [data[mask][:, bvals == b].mean() for b in (0, 1000, 2000, 3000)]
    assert means == sorted(means, reverse=True)


# ------------------------------------------------- a cohort with only DWI, CLI
SMALL = {"spatial": {"preset": "fast-test", "registration_resolution": 4.0, "grid_voxel_size": 5.0,
                     "grid_shape": [32, 32, 24], "template_iterations": 1},
         "model": {"input_shape": [32, 32, 24], "levels": 3, "filters": [2, 4, 8]},
         "training": {"epochs": 1, "batch_size": 2, "cv_folds": 2, "n_reconstructions": 0},
         "stratify": {"damping_n": 2, "preference_n": 2, "subsamples": 0}}


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MMFUSION_PLAIN_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mmfusion.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, f"{args[:3]} -> {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.extended  # ~6 min on 2 shared cores (participant ~2 min for 4 subjects, group the rest)
def test_a_cohort_with_only_dwi_runs_participant_to_group(tmp_path):
    from mmfusion.io.shards import read_shard, shard_path

    bids_dir, out, cfg = tmp_path / "bids", tmp_path / "out", tmp_path / "small.yaml"
    _cli("simulate", bids_dir, "--n-subjects", 4, "--n-strata", 2, "--voxel-size", 4, "--seed", 3, "--dwi",
         "--dwi-directions", 15)
    cfg.write_text(yaml.safe_dump(SMALL))
    common = ["--config", cfg, "--omp-nthreads", 2, "--skip-bids-validation"]
    part = _cli(bids_dir, out, "participant", *common)
    assert "fitted by mmfusion from" in part.stderr
    ours = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) +mmfusion[\w.]*: ")
    assert all(ours.match(line) for line in part.stderr.splitlines() if line.strip()), part.stderr[-2000:]
    for sub in ("01", "02", "03", "04"):
        shard = read_shard(shard_path(out, sub))
        assert {"fa", "ndi"} <= set(shard.images) and shard.images["ndi"][shard.mask > 0].mean() > 0.1
        assert (out / f"sub-{sub}" / "dwi" / f"sub-{sub}_space-T1w_model-noddi_param-icvf_dwimap.json").is_file()
    prov = [json.loads(p.read_text()) for p in (out / "logs").glob("*participant*_provenance.json")]
    assert prov and "fitted by mmfusion" in prov[0]["map_sources"]["sub-01"]["ndi"]
    _cli(bids_dir, out, "group", "--modalities", "jac", "fa", "ndi", *common)
    assert (out / "group" / "embeddings.tsv").is_file() and (out / "mmfusion_report.html").is_file()
