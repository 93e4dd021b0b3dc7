"""Tests of ``mmfusion simulate``: valid BIDS, planted truth really in the data, determinism."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from mmfusion import simulate as sim
from mmfusion.errors import OutputError

VOXEL = 3.0  # mm: coarse for speed
N_SUBJECTS, N_STRATA, SEED = 15, 3, 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "bids"
    return sim.simulate_dataset(out, n_subjects=N_SUBJECTS, n_strata=N_STRATA, voxel_size=VOXEL, seed=SEED)


@pytest.fixture(scope="module")
def small_sessions(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("simses") / "bids"
    return sim.simulate_dataset(out, n_subjects=3, n_strata=2, voxel_size=5.0, seed=3, sessions=2)


def _truth(root: Path):
    truth = root / "sourcedata" / "ground_truth"
    planted = json.loads((truth / "planted.json").read_text())
    strata = pd.read_csv(truth / "strata.tsv", sep="\t")
    return truth, planted, strata


def _validate(path: Path) -> list[dict]:
    """Run the official validator offline; return its issues (fails on a crash)."""
    exe = shutil.which("bids-validator-deno")
    assert exe, "bids-validator-deno must be installed for these tests"
    proc = subprocess.run([exe, str(path), "--format", "json"], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)["issues"]["issues"]


# ------------------------------------------------------------------------- layout
def test_layout_and_bids_names(dataset):
    labels = [f"{i:02d}" for i in range(1, N_SUBJECTS + 1)]
    participants = pd.read_csv(dataset / "participants.tsv", sep="\t")
    assert participants["participant_id"].tolist() == [f"sub-{lab}" for lab in labels]
    assert {"age", "sex", "handedness", "bmi"} <= set(participants.columns)
    assert set(participants["sex"]) <= {"M", "F"} and set(participants["handedness"]) <= {"R", "L", "A"}
    desc = json.loads((dataset / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"] in ("1.9.0", "1.10.0") and desc["Name"]
    deriv = dataset / "derivatives" / "qsirecon"
    ddesc = json.loads((deriv / "dataset_description.json").read_text())
    assert ddesc["DatasetType"] == "derivative" and ddesc["GeneratedBy"][0]["Name"]
    assert not list(dataset.glob("sub-*/ses-*")), "sessions=1 must not create a ses- level"
    for lab in labels:
        t1 = nib.load(dataset / f"sub-{lab}" / "anat" / f"sub-{lab}_T1w.nii.gz")
        for name in ("model-tensor_param-fa", "model-noddi_param-icvf"):
            img = nib.load(deriv / f"sub-{lab}" / "dwi" / f"sub-{lab}_space-T1w_{name}_dwimap.nii.gz")
            assert img.shape == t1.shape and np.allclose(img.affine, t1.affine)
            data = np.asarray(img.dataobj)
            assert data.dtype == np.float32 and 0 <= data.min() and data.max() <= 1 and data.max() > 0.3
    tables = sorted(p.stem for p in (dataset / "phenotype").glob("*.tsv"))
    assert len(tables) >= 2 and all((dataset / "phenotype" / f"{t}.json").is_file() for t in tables)
    n_cols = sum(pd.read_csv(dataset / "phenotype" / f"{t}.tsv", sep="\t").shape[1] - 1 for t in tables)
    assert 15 <= n_cols <= 25
    text = "".join((dataset / "phenotype" / f"{t}.tsv").read_text() for t in tables)
    assert "n/a" in text and "nan" not in text.lower().replace("n/a", "")


def test_sessions_layout(small_sessions):
    for ses in ("1", "2"):
        assert (small_sessions / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_T1w.nii.gz").is_file()
        assert (small_sessions / "derivatives" / "qsirecon" / "sub-03" / f"ses-{ses}" / "dwi"
                / f"sub-03_ses-{ses}_space-T1w_model-noddi_param-icvf_dwimap.nii.gz").is_file()
    a = nib.load(small_sessions / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz")
    b = nib.load(small_sessions / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz")
    assert not np.allclose(a.affine, b.affine), "each session has its own scanner position"


def test_header_transform_is_small_rigid(dataset):
    truth, planted, _ = _truth(dataset)
    template = nib.load(truth / "template_T1w.nii.gz")
    t1 = nib.load(dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert t1.shape == template.shape and t1.get_data_dtype() == np.int16
    world = t1.affine @ np.linalg.inv(template.affine)
    rot = world[:3, :3]
    assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-5) and np.isclose(np.linalg.det(rot), 1, atol=1e-5)
    angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
    assert 0 < angle <= 3 * np.sqrt(3) and 0 < np.abs(world[:3, 3]).max() <= 3
    assert np.allclose(world, planted["subjects"]["sub-01"]["sessions"]["none"]["header_rigid_matrix"], atol=1e-5)


# ---------------------------------------------------------------------- validator
def test_official_validator_no_errors(dataset, small_sessions):
    for root in (dataset, small_sessions):
        issues = _validate(root)
        errors = [i for i in issues if i["severity"] == "error"]
        assert not errors, errors[:3]
        # derivative dataset on its own (its .bidsignore covers the BEP016 dwimap names)
        issues = _validate(root / "derivatives" / "qsirecon")
        assert not [i for i in issues if i["severity"] == "error"]


# ---------------------------------------------------------------- imaging truth
def _sphere_mean(image: np.ndarray, center_vox, radius_vox: float) -> float:
    idx = np.indices(image.shape)
    dist2 = sum((idx[a] - center_vox[a]) ** 2 for a in range(3))
    return float(image[dist2 <= radius_vox**2].mean())


def test_true_logjac_separates_strata_in_planted_regions_only(dataset):
    truth, planted, strata = _truth(dataset)
    mask = nib.load(truth / "template_mask.nii.gz").get_fdata() > 0.5
    logjacs = np.stack([nib.load(truth / planted["deformation"]["true_logjac"][pid]).get_fdata()
                        for pid in strata["participant_id"]])
    assert logjacs.shape[1:] == mask.shape
    labels = strata["stratum"].to_numpy()
    assert sorted(np.unique(labels)) == list(range(1, N_STRATA + 1))
    sds = [lj[mask].std() for lj in logjacs]
    assert 0.04 < np.median(sds) < 0.15  # ~0.07: individual deformation + planted regions
    jac_regions = [r for r in planted["regions"] if r["kind"] == "jac"]
    assert len(jac_regions) >= N_STRATA and {r["stratum"] for r in jac_regions} == set(range(1, N_STRATA + 1))
    recovered, diffs = [], []  # group difference (/ planted effect), per region
    for r in jac_regions:
        radius = 0.5 * r["sigma_mm"] / VOXEL
        means = np.array([_sphere_mean(lj, r["center_voxel_template_grid"], radius) for lj in logjacs])
        diff = means[labels == r["stratum"]].mean() - means[labels != r["stratum"]].mean()
        recovered.append(diff / r["effect"])
        diffs.append(abs(diff))
    # individual variation and overlapping regions blur single regions at n=5 per stratum
    # (test_logjac_effect_sizes_with_many_subjects checks each region's size)
    assert min(recovered) > 0 and np.mean(recovered) > 0.5, recovered
    # far from every planted region, the strata do not differ
    centers = np.array([r["center_voxel_template_grid"] for r in jac_regions])
    idx = np.argwhere(mask)
    far = np.min(np.linalg.norm(idx[:, None, :] - centers[None], axis=2), axis=1) * VOXEL >= 48.0  # 2.4 sigma
    assert far.sum() > 500
    far_means = np.array([lj[tuple(idx[far].T)].mean() for lj in logjacs])
    for k in range(1, N_STRATA + 1):
        assert abs(far_means[labels == k].mean() - far_means[labels != k].mean()) < 0.5 * min(diffs)
    disp = [s["max_displacement_mm"] for s in planted["subjects"].values()]
    assert 2.0 < np.median(disp) < 6.0


def test_fa_ndi_planted_regional_changes(dataset):
    truth, planted, strata = _truth(dataset)
    labels = strata["stratum"].to_numpy()
    deriv = dataset / "derivatives" / "qsirecon"
    names = {"fa": "model-tensor_param-fa", "ndi": "model-noddi_param-icvf"}
    for kind, name in names.items():
        maps = np.stack([nib.load(deriv / pid / "dwi" / f"{pid}_space-T1w_{name}_dwimap.nii.gz").get_fdata()
                         for pid in strata["participant_id"]])
        recovered = []  # (group ratio - 1) / planted effect, per region
        for r in (r for r in planted["regions"] if r["kind"] == kind):
            means = np.array([_sphere_mean(m, r["center_voxel_template_grid"], 4.0 / VOXEL + 0.5) for m in maps])
            ratio = means[labels == r["stratum"]].mean() / means[labels != r["stratum"]].mean()
            recovered.append((ratio - 1) / r["effect"])
        # measured in subject space, so a few mm of deformation blur it
        assert len(recovered) == N_STRATA * sim.MAP_REGIONS_PER_STRATUM, (kind, recovered)
        assert min(recovered) > 0 and np.mean(recovered) > 0.4, (kind, recovered)


def test_strata_recoverable_from_true_template_maps(dataset):
    """Clustering whole true maps (the upper bound of the pipeline) recovers the strata:
    the strata carry a sizable share of the between-subject variance of every modality."""
    from sklearn.metrics import adjusted_rand_score

    from mmfusion.strata import ap_grid
    from mmfusion.config import default_config

    truth, planted, strata = _truth(dataset)
    mask = nib.load(truth / "template_mask.nii.gz").get_fdata() > 0.5
    labels = strata["stratum"].to_numpy()
    files = {"logjac": planted["deformation"]["true_logjac"], **planted["diffusion_maps"]["true_maps"]}
    scfg = dict(default_config()["stratify"], damping_n=3, preference_n=40)
    chance = (N_STRATA - 1) / (N_SUBJECTS - 1)
    for kind, by_subject in files.items():
        X = np.stack([np.asarray(nib.load(truth / by_subject[pid]).dataobj)[mask]
                      for pid in strata["participant_id"]]).astype(np.float64)
        if kind != "logjac":
            assert 0 <= X.min() and X.max() <= 1 and X.max() > 0.3, kind
        means = np.stack([X[labels == k].mean(0) for k in range(1, N_STRATA + 1)])
        share = ((means[labels - 1] - X.mean(0)) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
        assert share > 2 * chance, (kind, share)
        # individual variation remains: no subject equals its stratum's mean
        assert ((X - means[labels - 1]) ** 2).sum(1).min() > 0.1 * ((means[labels - 1] - X.mean(0)) ** 2).sum(1).mean()
        found = ap_grid.grid_search(X, scfg, seed=0, n_threads=1, source=f"true {kind}")
        assert adjusted_rand_score(labels, found.labels) >= 0.8, (kind, found.best)


def test_logjac_effect_sizes_with_many_subjects():
    """With 20 subjects per stratum every planted region shows >= 60% of its effect; far
    (>= 48 mm, 2.4 sigma) from every region the strata do not differ."""
    grid, cgrid = sim.load_template_grid(6.0), sim.control_grid(6.0)
    regions = sim.plan_regions(np.random.default_rng(1), grid, 3)
    rng = np.random.default_rng(2)
    labels = np.repeat([1, 2, 3], 20)
    jac_regions = [r for r in regions if r.kind == "jac"]
    values, far = np.empty((len(labels), len(jac_regions))), np.empty(len(labels))
    centers = np.array([r.center_mm for r in jac_regions])
    brain = np.argwhere(grid.mask)
    far_idx = tuple(brain[np.linalg.norm(grid.world(brain)[:, None] - centers[None], axis=2).min(1) >= 48].T)
    for i, k in enumerate(labels):
        logjac = sim.log_jacobian(sim.subject_deformation(rng, int(k), regions, grid, cgrid, inverse=False)[0], cgrid)
        far[i] = logjac[far_idx].mean()
        for j, r in enumerate(jac_regions):
            center = (np.array(r.center_mm) - grid.affine[:3, 3]) / grid.voxel_size
            values[i, j] = _sphere_mean(logjac, center, 1.0)
    for j, r in enumerate(jac_regions):
        diff = values[labels == r.stratum, j].mean() - values[labels != r.stratum, j].mean()
        assert 0.6 < diff / r.effect < 1.4, (r, diff)
        assert stats.kruskal(*[values[labels == k, j] for k in (1, 2, 3)]).pvalue < 1e-3
    assert stats.kruskal(*[far[labels == k] for k in (1, 2, 3)]).pvalue > 1e-3
    assert max(abs(far[labels == k].mean() - far.mean()) for k in (1, 2, 3)) < 0.015


def test_warp_convention_matches_truth():
    """S = T o phi enlarges a blob where log det D psi > 0, and S o psi gives back T."""
    grid = sim.load_template_grid(VOXEL)
    cgrid = sim.control_grid(VOXEL)
    center = (0.0, -20.0, 10.0)
    region = sim.Region("jac", 1, center, 12.0, 0.25)
    velocity = sim.stratum_velocity([region], 1, grid, cgrid)
    psi, phi = sim.exp_velocity(velocity, cgrid.spacing), sim.exp_velocity(-velocity, cgrid.spacing)
    logjac = sim.log_jacobian(psi, cgrid)
    cvox = (np.array(center) - grid.affine[:3, 3]) / VOXEL
    assert 0.15 < logjac[tuple(np.round(cvox).astype(int))] < 0.35
    blob = (np.sqrt(((np.indices(grid.shape) - cvox[:, None, None, None]) ** 2).sum(0)) * VOXEL <= 8).astype(np.float32)
    index = np.indices(grid.shape, dtype=np.float32)
    warped = ndimage.map_coordinates(blob, index + sim.upsample(phi, cgrid) / VOXEL, order=1)
    predicted = float((np.exp(logjac) * blob).sum())
    assert warped.sum() > blob.sum() * 1.1
    assert abs(warped.sum() - predicted) < 0.05 * predicted
    # finite differences of the upsampled map agree with the analytic log-Jacobian
    disp = sim.upsample(psi, cgrid)
    jac = np.stack([np.stack(np.gradient(disp[c], VOXEL)) for c in range(3)]) + np.eye(3)[:, :, None, None, None]
    fd = np.log(np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))))
    assert np.abs(fd - logjac)[grid.mask].max() < 0.02
    # round trip with a large random deformation: T(phi(psi(x))) ~ T(x), while T(phi(phi(x))) is not
    velocity = velocity + sim.individual_velocity(np.random.default_rng(0), cgrid)
    psi, phi = sim.exp_velocity(velocity, cgrid.spacing), sim.exp_velocity(-velocity, cgrid.spacing)
    to_phi, to_psi = index + sim.upsample(phi, cgrid) / VOXEL, index + sim.upsample(psi, cgrid) / VOXEL
    subject = ndimage.map_coordinates(grid.t1, to_phi, order=3)
    err_back = np.abs(ndimage.map_coordinates(subject, to_psi, order=3) - grid.t1)[grid.mask].mean()
    err_twice = np.abs(ndimage.map_coordinates(subject, to_phi, order=3) - grid.t1)[grid.mask].mean()
    err_none = np.abs(subject - grid.t1)[grid.mask].mean()
    assert err_back < 0.5 * err_none < err_twice


def test_clean_options_give_clean_images(tmp_path):
    out = sim.simulate_dataset(tmp_path / "clean", n_subjects=2, n_strata=2, voxel_size=6.0, seed=1,
                               bias_field=False, noise=False, random_affine=False)
    truth = out / "sourcedata" / "ground_truth"
    template = nib.load(truth / "template_T1w.nii.gz")
    mask = nib.load(truth / "template_mask.nii.gz").get_fdata() > 0.5
    t1 = nib.load(out / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert np.allclose(t1.affine, template.affine)
    data, tdata = t1.get_fdata(), template.get_fdata()
    far = ndimage.distance_transform_edt(tdata < 1) > 4  # far outside the head
    assert np.all(data[far] == 0)
    assert np.corrcoef(data[mask], tdata[mask])[0, 1] > 0.8


def test_whole_head_adds_skull_and_scalp_around_an_unchanged_brain(tmp_path):
    kw = dict(n_subjects=2, n_strata=2, voxel_size=6.0, seed=1, bias_field=False, noise=False, random_affine=False)
    brain = sim.simulate_dataset(tmp_path / "brain", **kw)
    head = sim.simulate_dataset(tmp_path / "head", whole_head=True, **kw)
    truth = head / "sourcedata" / "ground_truth"
    mask = nib.load(truth / "template_mask.nii.gz").get_fdata() > 0.5
    tpl_head = nib.load(truth / "template_head_T1w.nii.gz").get_fdata()
    distance = ndimage.distance_transform_edt(~mask) * 6.0  # mm outside the brain
    scalp = (distance > 9.0) & (distance <= 12.0)
    assert tpl_head[scalp].mean() > 0.5 * sim.T1_SCALE  # bright scalp
    assert tpl_head[distance > 20.0].max() < 0.02 * sim.T1_SCALE  # air beyond it (edges smoothed)
    np.testing.assert_allclose(tpl_head[mask], nib.load(truth / "template_T1w.nii.gz").get_fdata()[mask], atol=1)
    t1_brain = nib.load(brain / "sub-01" / "anat" / "sub-01_T1w.nii.gz").get_fdata()
    t1_head = nib.load(head / "sub-01" / "anat" / "sub-01_T1w.nii.gz").get_fdata()
    deep = ndimage.binary_erosion(t1_brain > 0.2 * sim.T1_SCALE, iterations=2)  # well inside the brain
    diff = np.abs(t1_head[deep] - t1_brain[deep])  # same brain, same deformation (the cubic
    assert np.median(diff) <= 1 and diff.max() <= 0.02 * sim.T1_SCALE  # spline's prefilter is global)
    assert (t1_head > 0.5 * sim.T1_SCALE).sum() > 1.2 * (t1_brain > 0.5 * sim.T1_SCALE).sum()
    for name in ("strata.tsv", "sub-01_space-template_desc-true_logjac.nii.gz"):
        a, b = (root / "sourcedata" / "ground_truth" / name for root in (brain, head))
        assert a.read_bytes() == b.read_bytes()  # the truth is the same
    assert json.loads((truth / "planted.json").read_text())["generator"]["options"]["whole_head"] is True


# --------------------------------------------------------------------- phenotypes
def _kw(values, labels) -> float:
    values = np.asarray(values, float)
    ok = ~np.isnan(values)
    return stats.kruskal(*[values[ok & (labels == k)] for k in np.unique(labels)]).pvalue


def test_planted_phenotypes_differ_noise_does_not():
    rng = np.random.default_rng(11)
    labels = rng.permutation(np.arange(240) % 3 + 1)
    sample = sim.simulate_phenotypes(labels, np.random.default_rng(5))
    factors = sample.planted["latent_factors"]
    planted = [f["name"] for f in factors if f["depends_on_stratum"]]
    assert len(planted) == 2
    for f in factors:
        p = _kw(sample.latent[f["name"]], labels)
        assert (p < 1e-6) if f["depends_on_stratum"] else (p > 1e-3), (f, p)
    table_of = {v["name"]: v["table"] for v in sample.planted["variables"]}
    p_signal = [_kw(sample.tables[table_of[v["name"]]][v["name"]], labels)
                for v in sample.planted["variables"] if v["depends_on_stratum"]]
    p_noise = [_kw(sample.tables[table_of[v["name"]]][v["name"]], labels)
               for v in sample.planted["variables"] if not v["depends_on_stratum"]]
    assert len(p_signal) >= 4 and np.median(p_signal) < 1e-4
    assert len(p_noise) >= 8 and np.mean(p_noise) > 0.2
    demo = sample.planted["demographics"]
    assert sum(demo[k]["depends_on_stratum"] for k in ("age", "bmi")) == 1
    for k in ("age", "bmi"):
        p = _kw(sample.participants[k], labels)
        assert (p < 1e-4) if demo[k]["depends_on_stratum"] else (p > 1e-3)
    cells = sum(df.size for df in sample.tables.values())
    missing = sum(int(df.isna().sum().sum()) for df in sample.tables.values())
    assert 0.005 * cells <= missing <= 0.03 * cells


def test_null_phenotypes_nothing_differs(tmp_path):
    rng = np.random.default_rng(12)
    labels = rng.permutation(np.arange(240) % 3 + 1)
    sample = sim.simulate_phenotypes(labels, np.random.default_rng(6), null=True)
    assert not any(f["depends_on_stratum"] for f in sample.planted["latent_factors"])
    assert not any(v["depends_on_stratum"] for v in sample.planted["variables"])
    pvals = [_kw(df[c], labels) for df in sample.tables.values() for c in df.columns]
    pvals += [_kw(sample.latent[c], labels) for c in sample.latent.columns]
    pvals += [_kw(sample.participants[c], labels) for c in ("age", "bmi")]
    assert min(pvals) > 1e-3 and np.mean(pvals) > 0.3
    out = sim.simulate_dataset(tmp_path / "null", n_subjects=4, n_strata=2, voxel_size=8.0, seed=2,
                               null_phenotypes=True)
    planted = json.loads((out / "sourcedata" / "ground_truth" / "planted.json").read_text())
    assert planted["null_phenotypes"] is True
    assert not any(f["depends_on_stratum"] for f in planted["latent_factors"])
    assert not any(v["depends_on_stratum"] for v in planted["demographics"].values())


# -------------------------------------------------------------- determinism & CLI
def _all_content(root: Path) -> dict:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        out[rel] = np.asarray(nib.load(path).dataobj) if rel.endswith(".nii.gz") else path.read_bytes()
    return out


def test_same_seed_gives_identical_files(tmp_path, small_sessions):
    again = sim.simulate_dataset(tmp_path / "again", n_subjects=3, n_strata=2, voxel_size=5.0, seed=3, sessions=2)
    first, second = _all_content(small_sessions), _all_content(again)
    assert first.keys() == second.keys()
    for rel in first:
        if rel.endswith(".nii.gz"):
            assert first[rel].dtype == second[rel].dtype and np.array_equal(first[rel], second[rel]), rel
        else:
            assert first[rel] == second[rel], rel
    other = sim.simulate_dataset(tmp_path / "other", n_subjects=3, n_strata=2, voxel_size=5.0, seed=4, sessions=2)
    t1 = "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert not np.array_equal(first[t1], _all_content(other)[t1])


def test_cli_refuses_non_empty_out_dir(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = [str(out), "--n-subjects", "2", "--n-strata", "2", "--voxel-size", "8", "--seed", "1"]
    assert sim.main(argv) == 73
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert (out / "keep.txt").is_file()
    with pytest.raises(OutputError):
        sim.simulate_dataset(out, n_subjects=2, n_strata=2, voxel_size=8.0)
    assert sim.main(argv + ["--overwrite", "--no-noise", "--no-bias-field", "--no-affine"]) == 0
    assert not (out / "keep.txt").exists() and (out / "sub-02" / "anat" / "sub-02_T1w.nii.gz").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_cli_bad_option_is_usage_error(tmp_path):
    assert sim.main([str(tmp_path / "x"), "--n-strata", "5", "--n-subjects", "3"]) == 64
    assert sim.main([str(tmp_path / "x"), "--voxel-size", "abc"]) == 64
    assert not (tmp_path / "x").exists()


def test_design_seed_shares_the_design_not_the_subjects(tmp_path, small_sessions):
    """Same --design-seed, other --seed: the same planted regions, other subjects; the
    default (design seed = seed) writes exactly the files of a run without it."""
    same = sim.simulate_dataset(tmp_path / "same", n_subjects=3, n_strata=2, voxel_size=5.0, seed=3, sessions=2,
                                design_seed=3)
    assert _all_content(same).keys() == _all_content(small_sessions).keys()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(_all_content(same).values(), _all_content(small_sessions).values()))
    new = sim.simulate_dataset(tmp_path / "new", n_subjects=3, n_strata=2, voxel_size=5.0, seed=9, sessions=2,
                               design_seed=3)
    planted = [json.loads((d / "sourcedata" / "ground_truth" / "planted.json").read_text())
               for d in (small_sessions, new)]
    assert planted[0]["regions"] == planted[1]["regions"]
    t1 = "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert not np.array_equal(_all_content(small_sessions)[t1], _all_content(new)[t1])
    other = sim.simulate_dataset(tmp_path / "other", n_subjects=3, n_strata=2, voxel_size=5.0, seed=3, sessions=2,
                                 design_seed=8)
    assert json.loads((other / "sourcedata" / "ground_truth" / "planted.json").read_text())["regions"] \
        != planted[0]["regions"]
