"""Participant and template levels end to end (real ANTs, real CLI) and bad-input handling.

Small on purpose: 3 simulated subjects at 4 mm, the 'fast-test' preset, a 32x32x24 grid
of 5 mm voxels, one template iteration.
"""
import json
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import yaml

from mmfusion.io.bids import SubjectRecord
from mmfusion.config import load_config
from mmfusion.context import RunContext
from mmfusion.errors import InputDataError, MissingInputError, StaleOutputError
from mmfusion.levels.participant import run_participant_level
from mmfusion.provenance import Provenance
from mmfusion.runlog import setup_logging
from mmfusion.io.shards import read_attrs, read_shard, shard_path
from mmfusion.simulate import simulate_dataset

SMALL = {"spatial": {"preset": "fast-test", "registration_resolution": 4.0, "grid_voxel_size": 5.0,
                     "grid_shape": [32, 32, 24], "template_iterations": 1},
         "model": {"input_shape": [32, 32, 24], "levels": 3, "filters": [2, 4, 8]}}  # = the grid
ENV = {"OMP_NUM_THREADS": "2", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "2", "MMFUSION_PLAIN_PROGRESS": "1"}


def cli(*args, check=True):
    import os
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-m", "mmfusion.cli", *map(str, args)],
                          capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"mmfusion {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("spatial")
    bids = simulate_dataset(root / "bids", n_subjects=3, n_strata=1, voxel_size=4.0, seed=5)
    cfg = root / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    return bids, cfg, root


@pytest.fixture(scope="module")
def pipeline(dataset):
    """template level, then participant level for two subjects, through the real CLI."""
    bids, cfg, root = dataset
    out = root / "out"
    common = ["--config", cfg, "--omp-nthreads", "2", "--skip-bids-validation"]
    cli(bids, out, "template", *common)
    cli(bids, out, "participant", "--participant-label", "01", "02", *common)
    return bids, cfg, out, common


def test_template_level_writes_study_template(pipeline):
    _, _, out, _ = pipeline
    tpl = out / "template" / "tpl-study_res-4_T1w.nii.gz"
    mask = nib.load(out / "template" / "tpl-study_res-4_desc-brain_mask.nii.gz").get_fdata()
    prov = json.loads((out / "template" / "tpl-study_provenance.json").read_text())
    assert nib.load(tpl).shape == mask.shape
    assert 0.05 < mask.mean() < 0.6, "brain mask should cover part of the field of view"
    assert prov["n_subjects"] == 3 and prov["iterations"] == 1 and len(prov["template_hash"]) == 16


def test_shards_validate_and_record_provenance(pipeline):
    _, _, out, _ = pipeline
    for sub in ("01", "02"):
        shard = read_shard(shard_path(out, sub))
        assert sorted(shard.images) == ["fa", "jac", "ndi", "t1"]
        assert shard.mask.shape == (32, 32, 24) and shard.mask.sum() > 1000
        assert np.allclose(np.abs(np.diag(shard.affine))[:3], 5.0)
        jac = shard.images["jac"][shard.mask]
        assert 0.005 < jac.std() < 1.0, "log-JAC should vary inside the brain"
        assert 0 <= shard.images["fa"].min() and shard.images["fa"].max() <= 1.0 + 1e-3
        meta = shard.meta
        assert meta["template_source"] == "study" and meta["preset"] == "fast-test" and meta["jac_kind"] == "log"
        assert set(meta["input_hashes"]) == {"t1w", "fa", "ndi"} and meta["timings_s"]["reg_syn"] > 0
        assert meta["qc"]["similarity_t1_template"] > 0.5
        assert meta["grid"] == {"shape": [32, 32, 24], "voxel_size_mm": 5.0, "rule": "template-centred",
                                "margin_mm": None}
    assert not shard_path(out, "03").exists()


def test_a_schema_1_shard_is_refused_and_force_remakes_it(pipeline, tmp_path):
    import h5py
    from mmfusion.levels.participant import up_to_date
    _, _, out, _ = pipeline
    old = tmp_path / "sub-01.h5"
    shutil.copyfile(shard_path(out, "01"), old)
    with h5py.File(old, "r+") as h5:  # what mmfusion < 0.3.0 wrote: schema 1, no grid record
        h5.attrs["schema_version"] = 1
        del h5.attrs["grid"]
    with pytest.raises(StaleOutputError, match=rf"^{old}: shard schema 1 .*rerun the participant level with --force"):
        read_attrs(old)
    with pytest.raises(StaleOutputError, match="shard schema 1"):
        up_to_date(old, {}, force=False)
    assert up_to_date(old, {}, force=True) is False  # --force: remade without reading the old one
    with h5py.File(old, "r+") as h5:  # schema 2 must carry its grid record
        h5.attrs["schema_version"] = 2
    with pytest.raises(InputDataError, match=r"not an mmfusion shard \(missing \['grid'\]\)"):
        read_attrs(old)


def test_the_brain_fitted_rule_on_the_study_template(pipeline):
    """The default rule (grid_voxel_size: auto) on the template level's own mask."""
    from mmfusion.levels.participant import describe_grid
    from mmfusion.spatial.template import TemplateInfo
    _, _, out, _ = pipeline
    import ants
    tpl = ants.image_read(str(out / "template" / "tpl-study_res-4_T1w.nii.gz"))
    mask = ants.image_read(str(out / "template" / "tpl-study_res-4_desc-brain_mask.nii.gz"))
    info = TemplateInfo(tpl, mask, "study", "study", "bids::template", "0")
    fitted = describe_grid(info, {"grid_voxel_size": "auto", "grid_shape": [32, 32, 24], "grid_margin_mm": 4.0})
    centred = describe_grid(info, {"grid_voxel_size": 5.0, "grid_shape": [32, 32, 24], "grid_margin_mm": 4.0})
    assert fitted["rule"] == "brain-fitted" and fitted["mask_inside"] >= 0.999
    assert centred["mask_inside"] < 0.95  # 5 mm x 32x32x24 around the image centre cuts the brain


def test_bids_derivative_outputs(pipeline):
    _, _, out, _ = pipeline
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "mmfusion"
    jac = out / "sub-01" / "anat" / "sub-01_space-study_res-5_desc-logjac_jacobian.nii.gz"
    side = json.loads(jac.with_name(jac.name.replace(".nii.gz", ".json")).read_text())
    assert side["JacobianKind"] == "log" and side["Sources"][0].startswith("bids:raw:sub-01/anat/")
    assert side["SpatialReference"].startswith("bids::template/")
    assert (out / "sub-01" / "figures" / "sub-01_desc-registration_qc.png").stat().st_size > 5000
    assert "sub-01_desc-registration_qc.png" in (out / "sub-01.html").read_text()
    proc = subprocess.run(["bids-validator-deno", "--json", str(out)], capture_output=True, text=True)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [i for i in issues if i.get("severity") == "error"]
    assert errors == [], errors[:3]


def test_second_run_is_a_noop_and_changes_are_detected(pipeline, tmp_path):
    bids, _, out, common = pipeline
    shard = shard_path(out, "01")
    before = shard.stat().st_mtime_ns
    t0 = time.perf_counter()
    proc = cli(bids, out, "participant", "--participant-label", "01", *common)
    assert time.perf_counter() - t0 < 60
    assert "up to date" in proc.stderr and shard.stat().st_mtime_ns == before
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**SMALL, "spatial": {**SMALL["spatial"], "n4": False}}))
    args = [a if a != common[1] else changed for a in common]
    proc = cli(bids, out, "participant", "--participant-label", "01", *args, check=False)
    assert proc.returncode == StaleOutputError.exit_code
    assert str(shard) in proc.stderr and "--force" in proc.stderr and shard.stat().st_mtime_ns == before
    cli(bids, out, "participant", "--participant-label", "01", *args, "--force")
    assert shard.stat().st_mtime_ns != before and read_attrs(shard)["config_hash"] != ""


def test_subject_without_t1w_via_cli(dataset, tmp_path):
    bids, cfg, _ = dataset
    copy = tmp_path / "bids"
    shutil.copytree(bids, copy)
    (copy / "sub-03" / "anat" / "sub-03_T1w.nii.gz").unlink()
    out = tmp_path / "out"
    proc = cli(copy, out, "participant", "--participant-label", "02", "03", "--config", cfg,
               "--skip-bids-validation", check=False)
    assert proc.returncode == MissingInputError.exit_code, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mmfusion: error:") and "sub-03" in last and "T1w" in last
    assert not shard_path(out, "03").exists() and not shard_path(out, "02").exists()


# ------------------------------------------------------------------ bad inputs, in-process
def _ctx(bids, out, record, **kw):
    cfg = load_config(overrides=SMALL)
    return RunContext(level="participant", bids_dir=bids, output_dir=out, work_dir=out / "work", config=cfg,
                      seed=0, provenance=Provenance("t", "participant", [], cfg, 0), logger=setup_logging(0),
                      records=[record], omp_nthreads=2, **kw)


def _inputs(bids, sub="01"):
    d = bids / "derivatives" / "qsirecon" / f"sub-{sub}" / "dwi"
    return (bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz",
            d / f"sub-{sub}_space-T1w_model-tensor_param-fa_dwimap.nii.gz",
            d / f"sub-{sub}_space-T1w_model-noddi_param-icvf_dwimap.nii.gz")


def _bad_copy(tmp_path, src, name, transform):
    img = nib.load(src)
    data, affine = transform(img.get_fdata().astype(np.float32), img.affine)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("case", ["unreadable_t1", "empty_fa", "fa_4d", "ndi_grid_mismatch"])
def test_bad_input_fails_cleanly(dataset, tmp_path, case):
    bids, _, _ = dataset
    t1, fa, ndi = _inputs(bids)
    if case == "unreadable_t1":
        t1 = tmp_path / "sub-01_T1w.nii.gz"
        t1.write_bytes(b"\x1f\x8b garbage")
        bad = t1
    elif case == "empty_fa":
        fa = bad = _bad_copy(tmp_path, fa, "fa_empty.nii.gz", lambda d, a: (np.zeros_like(d), a))
    elif case == "fa_4d":
        fa = bad = _bad_copy(tmp_path, fa, "fa_4d.nii.gz", lambda d, a: (np.stack([d, d], -1), a))
    else:
        def shift(d, a):  # a map in another space: its field of view misses the T1w's
            a = a.copy()
            a[:3, 3] += 0.8 * np.array(d.shape) * np.abs(np.diag(a)[:3])
            return d, a
        ndi = bad = _bad_copy(tmp_path, ndi, "ndi_shifted.nii.gz", shift)
    out = tmp_path / "out"
    ctx = _ctx(bids, out, SubjectRecord("01", "", t1, fa, ndi))
    with pytest.raises(InputDataError) as err:
        run_participant_level(ctx)
    assert err.value.exit_code == 65 and str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not shard_path(out, "01").exists() and not list((out / "shards").glob("*")) if (out / "shards").exists() else True


def test_nan_in_ndi_is_zeroed_and_counted(dataset, tmp_path):
    bids, _, _ = dataset
    t1, fa, ndi = _inputs(bids, "02")

    def poke(d, a):
        d = d.copy()
        d[d.shape[0] // 2, d.shape[1] // 2, :5] = np.nan
        d[d.shape[0] // 2 + 1, d.shape[1] // 2, :2] = np.inf
        return d, a
    ndi = _bad_copy(tmp_path, ndi, "ndi_nan.nii.gz", poke)
    out = tmp_path / "out"
    [path] = run_participant_level(_ctx(bids, out, SubjectRecord("02", "", t1, None, ndi)))
    shard = read_shard(path)  # check_finite: raises on NaN
    assert sorted(shard.images) == ["jac", "ndi", "t1"], "no FA given -> no FA dataset"
    assert shard.meta["qc"]["nonfinite_ndi"] == 7 and shard.meta["template_source"] == "builtin"
    # the built-in template was N4-corrected like the subject, once, and the shard says so
    from mmfusion.spatial.template import builtin_mni, image_hash
    assert len(list((out / "template").glob("tpl-MNI152NLin2009aSym-*_desc-n4_T1w.nii.gz"))) == 1
    assert shard.meta["template_hash"] != image_hash(builtin_mni(SMALL["spatial"]["registration_resolution"])[0])


def test_map_on_a_coarser_grid_in_t1w_space_is_resampled(dataset, tmp_path):
    """QSIRecon's space-T1w maps come at the diffusion resolution: read through their affine."""
    bids, _, _ = dataset
    t1, fa, ndi = _inputs(bids, "03")

    def coarsen(d, a):  # every other voxel, 2x the voxel size, same world coordinates
        return np.ascontiguousarray(d[::2, ::2, ::2]), a @ np.diag([2.0, 2.0, 2.0, 1.0])
    coarse = _bad_copy(tmp_path, ndi, "sub-03_space-T1w_ndi_coarse.nii.gz", coarsen)
    [ref_path] = run_participant_level(_ctx(bids, tmp_path / "ref", SubjectRecord("03", "", t1, None, ndi)))
    [path] = run_participant_level(_ctx(bids, tmp_path / "out", SubjectRecord("03", "", t1, None, coarse)))
    ref, shard = read_shard(ref_path), read_shard(path)
    assert shard.meta["qc"]["regridded_ndi"] == 1 and ref.meta["qc"]["regridded_ndi"] == 0
    inside = shard.mask > 0
    r = np.corrcoef(ref.images["ndi"][inside], shard.images["ndi"][inside])[0, 1]
    assert r > 0.9, r


def test_identical_records_give_identical_shards_single_threaded(tmp_path):
    """Two sessions holding the same T1w/FA/NDI files, registered in one participant call
    with --omp-nthreads 1 (the deterministic setting, docs/registration.md), give the same
    shard arrays: a record's result depends only on its inputs, config and seed."""
    bids = simulate_dataset(tmp_path / "bids", n_subjects=1, n_strata=1, voxel_size=4.0, seed=5, sessions=2)
    for first in sorted(bids.rglob("*ses-1_*.nii.gz")):
        shutil.copyfile(first, first.parent.parent.parent / "ses-2" / first.parent.name /
                        first.name.replace("ses-1_", "ses-2_"))
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    cli(bids, out, "participant", "--config", cfg, "--omp-nthreads", "1", "--skip-bids-validation")
    one, two = (read_shard(shard_path(out, "01", s)) for s in ("1", "2"))
    assert sorted(one.images) == sorted(two.images) == ["fa", "jac", "ndi", "t1"]
    for name in one.images:
        assert np.array_equal(one.images[name], two.images[name]), f"{name} differs between identical records"
