"""Confounds of the strata (mmfusion.strata.confounds) and the simulator's sites (--n-sites)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mmfusion.strata import confounds as cf
from mmfusion import simulate as sim
from mmfusion.errors import UsageError
from mmfusion.io.shards import Shard, shard_path, write_shard

SIM = dict(n_subjects=6, n_strata=2, voxel_size=6.0, seed=0)
OLD_SIDECAR = {"Manufacturer": "mmfusion simulate", "MagneticFieldStrength": 3}


@pytest.fixture(scope="module")
def one_site(tmp_path_factory) -> Path:
    return sim.simulate_dataset(tmp_path_factory.mktemp("one") / "bids", **SIM)


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> Path:
    return sim.simulate_dataset(tmp_path_factory.mktemp("two") / "bids", **SIM, n_sites=2,
                                site_follows_stratum=True)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _table(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    df = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(n)], "session": [""] * n,
                       "site": [f"site{k + 1}" for k in labels],
                       "noise": rng.standard_normal(n)})
    return df, labels


# ------------------------------------------------------------------ test_confounds
def test_confound_equal_to_labels_is_flagged_independent_one_is_not():
    df, labels = _table(60)
    tests = cf.test_confounds(df, labels).set_index("confound")
    site, noise = tests.loc["site"], tests.loc["noise"]
    assert (site["kind"], site["test"], site["effect_measure"]) == ("categorical", "chi-squared", "Cramér's V")
    assert site["effect_size"] == pytest.approx(1.0)
    assert site["q"] < 0.05 and bool(site["significant"])
    assert (noise["kind"], noise["test"], noise["effect_measure"]) == ("numeric", "Kruskal-Wallis", "epsilon^2")
    assert noise["p"] > 0.2 and not bool(noise["significant"])
    assert noise["effect_size"] == pytest.approx(noise["statistic"] / (60 - 1))
    assert 0 <= noise["effect_size"] < 0.1
    lines = cf.flagged(tests.reset_index())
    assert len(lines) == 1 and lines[0].startswith("site: chi-squared, Cramér's V 1.00, q = ")
    assert "the strata may reflect site rather than biology" in lines[0]


def test_missing_values_are_dropped_and_counted():
    df, labels = _table(30)
    df.loc[[0, 1, 2], "noise"] = np.nan
    df.loc[[5], "site"] = None
    tests = cf.test_confounds(df, labels).set_index("confound")
    assert tests.loc["noise", "n"] == 27 and tests.loc["site", "n"] == 29


def test_one_cluster_is_not_run():
    df, _ = _table(12)
    tests = cf.test_confounds(df, np.zeros(12, int))
    assert (tests["test"] == "not run").all()
    assert tests[["statistic", "effect_size", "p", "q"]].isna().all().all()
    assert not tests["significant"].any() and cf.flagged(tests) == []


def test_labels_must_match_rows():
    df, _ = _table(6)
    with pytest.raises(ValueError, match="one per confound row"):
        cf.test_confounds(df, np.zeros(5, int))


def test_write_outputs(tmp_path):
    df, labels = _table(9)
    tests = cf.test_confounds(df, labels)
    paths = cf.write_outputs(df, tests, tmp_path / "group" / "confounds")
    assert paths == {"values": tmp_path / "group/confounds/confounds.tsv",
                     "tests": tmp_path / "group/confounds/confound_tests.tsv"}
    back = pd.read_csv(paths["tests"], sep="\t")
    assert list(back.columns) == list(cf.TEST_COLUMNS) and list(back["confound"]) == ["site", "noise"]
    assert len(pd.read_csv(paths["values"], sep="\t")) == 9


# ---------------------------------------------------------------- collect_confounds
def _write_outputs_dir(out: Path, ids: list[str]) -> dict[str, float]:
    """Real shards (with a qc attribute) for every subject, real affine .mat for two."""
    similarity = {}
    for i, pid in enumerate(ids):
        sub = pid.removeprefix("sub-")
        similarity[pid] = 0.5 + 0.01 * i
        write_shard(shard_path(out, sub), Shard(
            sub, "", images={"t1": np.zeros((2, 2, 2), np.float32)}, mask=np.ones((2, 2, 2), np.uint8),
            affine=np.eye(4), meta={"qc": {"similarity_t1_template": similarity[pid]}}))
    for pid, scale in ((ids[0], 1.1), (ids[1], 0.9)):
        matrix = np.diag([scale, scale * 1.02, scale / 1.02]) + 0.01 * np.eye(3)[::-1]
        tr = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=matrix,
                                        translation=(1.0, -2.0, 3.0))
        folder = out / pid / "anat"
        folder.mkdir(parents=True, exist_ok=True)
        ants.write_transform(tr, str(folder / f"{pid}_from-T1w_to-MNI152NLin2009cAsym_mode-image_desc-affine_xfm.mat"))
        similarity[f"{pid}_det"] = float(np.linalg.det(matrix))
    return similarity


def test_collect_confounds_on_a_simulated_dataset(two_sites, tmp_path):
    truth = pd.read_csv(two_sites / "sourcedata/ground_truth/sites.tsv", sep="\t")
    ids = list(truth["participant_id"])
    keys = [(pid, "") for pid in reversed(ids)]  # keys order, not file order
    written = _write_outputs_dir(tmp_path / "derivatives", ids)
    df = cf.collect_confounds(two_sites, tmp_path / "derivatives", keys)

    assert list(df["participant_id"]) == [k[0] for k in keys] and (df["session"] == "").all()
    assert list(df.index) == list(range(len(keys)))
    # sex is 'F' for all 6 at seed 0 and MagneticFieldStrength is 3 everywhere: constant, dropped
    assert list(df.columns) == ["participant_id", "session", "age", "site", "Manufacturer",
                                "ManufacturersModelName", "StationName", "head_scale",
                                "registration_similarity"]
    part = pd.read_csv(two_sites / "participants.tsv", sep="\t").set_index("participant_id")
    by_id = df.set_index("participant_id")
    assert by_id["age"].to_dict() == part["age"].astype(float).to_dict()
    assert by_id["site"].to_dict() == truth.set_index("participant_id")["site"].to_dict()
    assert (by_id["StationName"] == by_id["site"]).all()
    assert by_id["registration_similarity"].to_dict() == pytest.approx({p: written[p] for p in ids})
    assert by_id.loc[ids[0], "head_scale"] == pytest.approx(written[f"{ids[0]}_det"] ** (1 / 3), rel=1e-6)
    assert by_id.loc[ids[1], "head_scale"] == pytest.approx(written[f"{ids[1]}_det"] ** (1 / 3), rel=1e-6)
    assert by_id["head_scale"].isna().sum() == 4

    strata = pd.read_csv(two_sites / "sourcedata/ground_truth/strata.tsv", sep="\t").set_index("participant_id")
    labels = strata.loc[df["participant_id"], "stratum"].to_numpy()
    tests = cf.test_confounds(df, labels).set_index("confound")
    assert tests.loc["site", "effect_size"] == pytest.approx(1.0) and bool(tests.loc["site", "significant"])
    assert tests.loc["head_scale", "n"] == 2
    assert any(line.startswith("site: chi-squared") for line in cf.flagged(tests.reset_index()))


def test_collect_confounds_sessions_prefixes_and_inheritance(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tAge\tsex\tcentre\n01\t30\tM\tA\n02\tn/a\tF\tB\n03\t50\tF\tB\n")
    (bids / "T1w.json").write_text(json.dumps({"Manufacturer": "X", "MagneticFieldStrength": 3.0}))
    for sub, ses, field in (("01", "1", 1.5), ("01", "2", 3), ("02", "1", 3), ("03", "1", 3)):
        anat = bids / f"sub-{sub}" / f"ses-{ses}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{sub}_ses-{ses}_T1w.json").write_text(json.dumps({"MagneticFieldStrength": field}))
    df = cf.collect_confounds(bids, tmp_path / "none", [("sub-01", "1"), ("01", "ses-2"), ("sub-02", "1"), ("sub-03", "1")])
    assert list(df["participant_id"]) == ["sub-01", "sub-01", "sub-02", "sub-03"]
    assert list(df["session"]) == ["1", "2", "1", "1"]
    # Manufacturer (inherited, constant), head_scale and similarity (no outputs) dropped
    assert list(df.columns) == ["participant_id", "session", "age", "sex", "centre", "MagneticFieldStrength"]
    assert list(df["MagneticFieldStrength"]) == ["1.5", "3", "3", "3"]
    assert list(df["centre"]) == ["A", "A", "B", "B"]
    assert df["age"].tolist()[:2] == [30.0, 30.0] and np.isnan(df["age"].iloc[2]) and df["age"].iloc[3] == 50.0
    tests = cf.test_confounds(df, np.array([0, 1, 1, 0])).set_index("confound")
    assert tests.loc["age", "test"] == "Kruskal-Wallis" and tests.loc["age", "n"] == 3
    assert tests.loc["centre", "n"] == 4


# ------------------------------------------------------------------------ simulator
def test_one_site_writes_the_files_of_before(one_site, tmp_path):
    part = pd.read_csv(one_site / "participants.tsv", sep="\t")
    assert list(part.columns) == ["participant_id", "age", "sex", "handedness", "bmi"]
    assert "site" not in json.loads((one_site / "participants.json").read_text())
    for side in one_site.glob("sub-*/anat/*_T1w.json"):
        assert json.loads(side.read_text()) == OLD_SIDECAR
    truth = one_site / "sourcedata" / "ground_truth"
    assert not (truth / "sites.tsv").exists()
    planted = json.loads((truth / "planted.json").read_text())
    assert "sites" not in planted and "n_sites" not in planted["generator"]["options"]
    again = sim.simulate_dataset(tmp_path / "again", **SIM, n_sites=1)
    assert _hashes(again) == _hashes(one_site)


def test_sites_follow_strata_and_carry_the_scanner_gain(one_site, two_sites):
    truth = two_sites / "sourcedata" / "ground_truth"
    sites = pd.read_csv(truth / "sites.tsv", sep="\t")
    strata = pd.read_csv(truth / "strata.tsv", sep="\t")
    assert list(sites["site"]) == [f"site{k}" for k in strata["stratum"]]
    part = pd.read_csv(two_sites / "participants.tsv", sep="\t")
    assert list(part["site"]) == list(sites["site"])
    planted = json.loads((truth / "planted.json").read_text())["sites"]
    assert planted["n_sites"] == 2 and planted["follows_stratum"] is True
    gains = {k: v["ndi_gain"] for k, v in planted["sites"].items()}
    assert gains == {"site1": pytest.approx(0.95), "site2": pytest.approx(1.05)}
    ratio_truth = {}
    for pid, site in zip(sites["participant_id"], sites["site"]):
        side = json.loads(next((two_sites / pid / "anat").glob("*_T1w.json")).read_text())
        assert side == planted["sites"][site]["sidecar"]
        name = f"{pid}_space-T1w_model-noddi_param-icvf_dwimap.nii.gz"
        ndi = nib.load(two_sites / "derivatives/qsirecon" / pid / "dwi" / name).get_fdata()
        plain = nib.load(one_site / "derivatives/qsirecon" / pid / "dwi" / name).get_fdata()
        true = nib.load(truth / f"{pid}_space-template_desc-true_ndi.nii.gz").get_fdata()
        # same seed, same draws: the site run is the one-site run times the gain (up to noise clipping)
        assert ndi.sum() / plain.sum() == pytest.approx(gains[site], abs=0.005)
        ratio_truth.setdefault(site, []).append(ndi.sum() / true.sum())
    # loosely against the truth (which excludes the site effect): the planted 1.05 / 0.95
    assert np.mean(ratio_truth["site2"]) / np.mean(ratio_truth["site1"]) == pytest.approx(1.05 / 0.95, abs=0.04)


def test_random_sites_are_balanced(tmp_path):
    rng = np.random.default_rng(0)
    sites = sim.assign_sites(rng, np.array([1, 2, 3] * 4), 3, follows_stratum=False)
    assert sorted(np.bincount(sites)[1:]) == [4, 4, 4]
    assert list(sim.assign_sites(rng, np.array([1, 2, 3, 4]), 2, follows_stratum=True)) == [1, 2, 1, 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_sites=0), "--n-sites must be between 1"),
    (dict(n_sites=7), "--n-sites must be between 1"),
    (dict(n_sites=1, site_follows_stratum=True), "--site-follows-stratum needs"),
    (dict(n_sites=3, site_follows_stratum=True), "--site-follows-stratum needs"),
])
def test_bad_site_options_are_usage_errors(tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        sim.simulate_dataset(tmp_path / "x", **SIM, **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_site_options(tmp_path, capsys):
    assert sim.main([str(tmp_path / "x"), "--n-subjects", "4", "--n-strata", "2", "--n-sites", "5"]) == 64
    assert "--n-sites must be between 1" in capsys.readouterr().err
