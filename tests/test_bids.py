"""Input discovery: sessions, QSIRecon/QSIPrep naming, missing modalities, label filters,
sessions without anat, phenotype-only rows, several T1w images, our own outputs."""
import json

import pytest

from mmfusion.io import bids
from mmfusion.io.derivatives import init_output_dir
from mmfusion.errors import MissingInputError, NoFilesSelectedError, UsageError
from tests.bids_fixtures import add_files, make_dataset


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


# ------------------------------------------------------------- 6a: sessions without anat
def test_session_without_anat_is_skipped_unless_requested(tmp_path, caplog):
    root = make_dataset(tmp_path / "ds", subjects=("01", "02"), sessions=("pre",))
    add_files(root, "sub-01/ses-meg/meg/sub-01_ses-meg_task-rest_channels.tsv",
              "sub-01/ses-beh/beh/sub-01_ses-beh_task-nback_beh.tsv",
              "sub-01/ses-fmri/func/sub-01_ses-fmri_task-rest_bold.nii.gz")
    with caplog.at_level("INFO", logger="mmfusion.io.bids"):
        records = bids.discover(root)
    assert [r.key for r in records] == ["sub-01_ses-pre", "sub-02_ses-pre"]
    skipped = [m for m in caplog.messages if "skipped, the session has no T1w image" in m]
    assert sorted(m.split(":")[0] for m in skipped) == ["sub-01_ses-beh", "sub-01_ses-fmri", "sub-01_ses-meg"]
    assert all(r.levelname == "INFO" for r in caplog.records if "skipped" in r.getMessage())
    with pytest.raises(MissingInputError, match=r"sub-01_ses-meg: no T1w image in the session given with "
                                                r"--session-label"):
        bids.discover(root, participant_labels=["01"], session_labels=["meg"])


def test_subject_whose_sessions_all_lack_anat_is_kept_as_missing_t1w(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), sessions=("pre",))
    add_files(root, "sub-02/ses-meg/meg/sub-02_ses-meg_task-rest_channels.tsv")
    records = {r.key: r for r in bids.discover(root)}
    assert records["sub-02_ses-meg"].t1w is None and "t1w" in records["sub-02_ses-meg"].missing


# ------------------------------------------------------------ 6b: phenotype-only rows
def test_phenotype_only_rows_are_ignored(tmp_path, caplog):
    root = make_dataset(tmp_path / "ds")
    (root / "participants.tsv").write_text("age\tparticipant_id\n30\tsub-01\n31\tsub-02\n40\tsub-03\n41\t04\n")
    with caplog.at_level("INFO", logger="mmfusion.io.bids"):
        assert [r.subject for r in bids.discover(root)] == ["01", "02"]
    assert any("2 participant(s) of participants.tsv have no imaging folder (phenotype only)" in m
               for m in caplog.messages)
    assert bids.participants_tsv_labels(root) == ["01", "02", "03", "04"]
    assert bids.phenotype_only_subjects(root) == ["03", "04"]
    with pytest.raises(NoFilesSelectedError, match=r"sub-03: listed in participants.tsv but has no imaging "
                                                   r"folder \(phenotype only\)"):
        bids.discover(root, participant_labels=["01", "sub-03"])


# --------------------------------------------------------------- 6c: several T1w images
def _several_t1w(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",))
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").unlink()
    add_files(root, *(f"sub-01/anat/sub-01_{e}_T1w.nii.gz" for e in
                      ("run-10", "run-2", "rec-norm", "acq-mprage_run-1", "acq-highres")))
    return root


def test_several_t1w_choice_rule_is_deterministic_and_logged(tmp_path, caplog):
    root = _several_t1w(tmp_path)
    with caplog.at_level("WARNING", logger="mmfusion.io.bids"):
        [rec] = bids.discover(root)
    # acq, ce, rec, run, echo, part in turn: without the entity first, numbers numerically
    order = ["run-2", "run-10", "rec-norm", "acq-highres", "acq-mprage_run-1"]
    assert [p.name for p in rec.choices["t1w"]] == [f"sub-01_{e}_T1w.nii.gz" for e in order]
    assert rec.t1w.name == "sub-01_run-2_T1w.nii.gz"
    assert any("5 candidate T1w images" in m and "using sub-01_run-2_T1w.nii.gz" in m
               and "--bids-filter-file" in m for m in caplog.messages)
    assert bids.choices_summary([rec]) == {"sub-01": {"t1w": {
        "used": "sub-01_run-2_T1w.nii.gz", "not_used": [f"sub-01_{e}_T1w.nii.gz" for e in order[1:]]}}}
    assert [bids.discover(root)[0].t1w for _ in range(2)] == [rec.t1w] * 2  # same answer every time


@pytest.mark.parametrize("query,chosen", [({"acquisition": "mprage"}, "acq-mprage_run-1"),
                                          ({"run": 10}, "run-10"),
                                          ({"acquisition": None, "reconstruction": "norm"}, "rec-norm")])
def test_filter_file_overrides_the_t1w_choice(tmp_path, query, chosen):
    root = _several_t1w(tmp_path)
    ffile = tmp_path / "filter.json"
    ffile.write_text(json.dumps({"t1w": query}))
    [rec] = bids.discover(root, filters=bids.load_filter_file(ffile))
    assert rec.t1w.name == f"sub-01_{chosen}_T1w.nii.gz"
    assert rec.choices == {}


# ----------------------------------------------- 7: mmfusion's own outputs are never inputs
def _own_output(root, name="mmfusion"):
    """An mmfusion output dataset in bids_dir/derivatives/<name> with decoy files whose names
    match what discovery looks for (T1w, QSIRecon FA), in the tree and under work/."""
    out = root / "derivatives" / name
    init_output_dir(out, root)
    add_files(out, "sub-01/anat/sub-01_space-study_res-2p5_desc-preproc_T1w.nii.gz",
              "sub-01/anat/sub-01_space-study_res-2p5_desc-fa_mdp.nii.gz",
              "sub-01/dwi/sub-01_space-T1w_model-tensor_param-fa_dwimap.nii.gz",
              "work/sub-03/anat/sub-03_T1w.nii.gz", "shards/sub-01.h5")
    return out


def test_discovery_never_uses_own_outputs(tmp_path):
    root = make_dataset(tmp_path / "ds")
    out = _own_output(root)
    other = _own_output(root, "mmfusion-old")
    qsirecon = (root / "derivatives" / "qsirecon").resolve()
    assert bids.find_derivative_datasets(root, None, out) == [qsirecon]
    assert bids.find_derivative_datasets(root, None) == [qsirecon]  # GeneratedBy mmfusion is enough
    records = bids.discover(root, output_dir=out)
    assert [r.key for r in records] == ["sub-01", "sub-02"]
    for rec in records:
        assert rec.t1w.parent == (root / f"sub-{rec.subject}" / "anat").resolve()
        assert qsirecon in rec.fa.parents and rec.choices == {}
    for given in (out, other):
        with pytest.raises(UsageError, match="is \\(or holds\\) mmfusion's own output, not an input"):
            bids.discover(root, derivatives=[given], output_dir=out)


def test_own_output_dataset_passes_the_validator_in_and_out_of_bids_dir(tmp_path):
    root = make_dataset(tmp_path / "ds")
    out = root / "derivatives" / "mmfusion"
    init_output_dir(out, root)
    add_files(out, "mmfusion_report.html", "sub-01.html", "shards/sub-01.h5", "logs/x_provenance.json",
              "group/embeddings.tsv", "work/sub-01/anat/sub-01_T1w.nii.gz")
    bids.run_validator(root)  # raises ValidationError on any error; derivatives/ is not validated
    bids.run_validator(out)   # the .bidsignore covers the non-BIDS parts, the report included
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "mmfusion"
