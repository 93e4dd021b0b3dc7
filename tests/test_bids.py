"""Input discovery: sessions, QSIRecon/QSIPrep naming, missing modalities, label filters."""
import json

import pytest

from mmfusion import bids
from mmfusion.errors import MissingInputError, NoFilesSelectedError, UsageError
from tests.bids_fixtures import make_dataset


@pytest.mark.parametrize("naming,space", [("param", "T1w"), ("mdp", "T1w"), ("param", "ACPC")])
def test_discovers_t1w_fa_ndi_in_both_namings(tmp_path, naming, space):
    root = make_dataset(tmp_path / "ds", naming=naming, space=space)
    records = bids.discover(root)
    assert [r.key for r in records] == ["sub-01", "sub-02"]
    for rec in records:
        assert rec.t1w.name == f"{rec.key}_T1w.nii.gz"
        assert f"{naming}-fa" in rec.fa.name and f"space-{space}" in rec.fa.name
        assert f"{naming}-icvf" in rec.ndi.name
        assert rec.missing == {}


def test_sessions_give_one_record_each(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), sessions=("pre", "post"))
    records = bids.discover(root)
    assert [(r.subject, r.session) for r in records] == [("01", "post"), ("01", "pre")]
    for rec in records:
        assert f"ses-{rec.session}" in rec.t1w.name and f"ses-{rec.session}" in rec.ndi.name
    only = bids.discover(root, session_labels=["ses-pre"])
    assert [r.key for r in only] == ["sub-01_ses-pre"]


def test_missing_ndi_is_reported_with_expected_pattern(tmp_path):
    root = make_dataset(tmp_path / "ds", missing_ndi=("02",))
    records = {r.subject: r for r in bids.discover(root)}
    assert records["02"].ndi is None and records["02"].fa is not None
    assert "model-noddi_param-icvf_dwimap" in records["02"].missing["ndi"]
    with pytest.raises(MissingInputError, match=r"sub-02: no NDI .*param-icvf"):
        bids.require_modalities(list(records.values()), ["t1w", "ndi"])
    bids.require_modalities([records["01"]], ["t1w", "fa", "ndi"])  # complete subject passes


def test_missing_t1w_is_reported(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01", "02"), missing_t1w=("02",))
    records = {r.subject: r for r in bids.discover(root)}
    assert records["02"].t1w is None and "T1w" in records["02"].missing["t1w"]


def test_unknown_participant_label_lists_existing(tmp_path):
    root = make_dataset(tmp_path / "ds")
    with pytest.raises(NoFilesSelectedError, match=r"label\(s\) 99 not found; existing labels: 01 02"):
        bids.discover(root, participant_labels=["sub-99"])
    assert [r.subject for r in bids.discover(root, participant_labels=["02"])] == ["02"]


def test_filter_file_selects_no_t1w(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ffile = tmp_path / "filter.json"
    ffile.write_text(json.dumps({"t1w": {"acquisition": "nonexistent"}}))
    with pytest.raises(NoFilesSelectedError, match="matched no T1w"):
        bids.discover(root, filters=bids.load_filter_file(ffile))
    ffile.write_text(json.dumps({"bold": {}}))
    with pytest.raises(UsageError, match="filter keys"):
        bids.load_filter_file(ffile)


def test_explicit_derivatives_must_be_datasets(tmp_path):
    root = make_dataset(tmp_path / "ds")
    with pytest.raises(MissingInputError, match="dataset_description.json"):
        bids.discover(root, derivatives=[tmp_path])
