"""The BIDS-App CLI through the real entry point: options, early validation, exit codes."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmfusion.cli import check_output_location
from mmfusion.errors import EXIT_CODES, OutputError
from tests.bids_fixtures import make_dataset

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=REPO):
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(stderr: str, pattern: str):
    lines = [l for l in stderr.strip().splitlines() if l.startswith("mmfusion: error:")]
    assert len(lines) == 1, stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_version_is_the_version_file():
    code, out, _ = run_cli("--version")
    assert code == 0
    assert out.strip() == f"mmfusion {(REPO / 'version').read_text().strip()}"


def test_help_documents_every_option():
    code, out, _ = run_cli("--help")
    assert code == 0
    for opt in ["--participant-label", "--participant_label", "--session-label", "--skip-bids-validation",
                "--work-dir", "-w", "--nprocs", "--omp-nthreads", "--mem", "--config", "--seed",
                "--derivatives", "--template", "--modalities", "--verbose", "--version",
                "--bids-filter-file", "--force", "--resume", "--allow-missing", "--phenotypes",
                "--template-subjects", "bids_dir", "output_dir", "analysis_level"]:
        assert opt in out, opt


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds")


def test_unknown_level_exits_17(dataset, tmp_path):
    code, _, err = run_cli(dataset, tmp_path / "out", "subject")
    assert code == 17
    assert_one_line_error(err, "unknown analysis level 'subject'; choose one of template, participant, group")


@pytest.mark.parametrize("rel,what,ok", [
    ("derivatives/mmfusion", "output_dir", True), ("derivatives/mmfusion-0.2", "output_dir", True),
    ("derivatives/mmfusion/work", "work dir", True), ("derivatives/a/b/work", "work dir", True),
    (".", "output_dir", False), ("derivatives", "output_dir", False), ("sub-01/mmfusion", "output_dir", False),
    ("sourcedata/mmfusion", "output_dir", False), ("derivatives/qsirecon/mmfusion", "output_dir", False),
    ("derivatives", "work dir", False), ("sub-01/work", "work dir", False)])
def test_output_locations_inside_bids_dir(tmp_path, rel, what, ok):
    bids_dir = tmp_path / "ds"
    path = (bids_dir / rel).resolve()
    if ok:
        check_output_location(path, bids_dir, what)
    else:
        with pytest.raises(OutputError, match=rf"{what} must not be bids_dir or inside its raw data; "
                                              rf"use {bids_dir}/derivatives/mmfusion or a folder outside"):
            check_output_location(path, bids_dir, what)
    check_output_location(tmp_path / "elsewhere" / "out", bids_dir, what)  # outside: always fine


def test_output_inside_raw_data_exits_73(dataset):
    code, _, err = run_cli(dataset, dataset / "sub-01" / "mmfusion", "participant")
    assert code == 73
    assert_one_line_error(err, rf"must not be bids_dir or inside its raw data; use {dataset}/derivatives/mmfusion")
    assert not (dataset / "sub-01" / "mmfusion").exists()


def test_output_in_another_pipelines_dataset_exits_73(dataset):
    code, _, err = run_cli(dataset, dataset / "derivatives" / "qsirecon", "participant")
    assert code == 73
    assert_one_line_error(err, r"qsirecon: output_dir holds another pipeline's dataset \(qsirecon\); "
                               r"choose a new folder, e\.g\. .*derivatives/mmfusion")


def test_output_in_bids_derivatives_is_accepted_and_a_derivative_dataset(dataset):
    out = dataset / "derivatives" / "mmfusion"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "sub-01.h5").write_bytes(b"x")
    (out / "mmfusion_report.html").write_text("<html></html>")
    code, _, err = run_cli(dataset, out, "group")  # the validator runs on bids_dir and passes
    assert code == 66  # past the path checks and the validator: sub-02 has no shard
    assert_one_line_error(err, r"no shard for 1 subject\(s\): sub-02")
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "mmfusion"
    assert "mmfusion_report.html" in (out / ".bidsignore").read_text().split()


def test_t1w_choice_is_recorded_in_provenance(tmp_path):
    root = make_dataset(tmp_path / "ds", missing_t1w=("02",))
    anat = root / "sub-01" / "anat"
    (anat / "sub-01_run-2_T1w.nii.gz").write_bytes((anat / "sub-01_T1w.nii.gz").read_bytes())
    out = root / "derivatives" / "mmfusion"
    code, _, err = run_cli(root, out, "participant", "--skip-bids-validation")
    assert code == 66  # sub-02 has no T1w: refused before any subject is processed
    assert "using sub-01_T1w.nii.gz by the choice rule" in err
    [prov] = (out / "logs").glob("participant-*_provenance.json")
    assert json.loads(prov.read_text())["input_choices"] == {
        "sub-01": {"t1w": {"used": "sub-01_T1w.nii.gz", "not_used": ["sub-01_run-2_T1w.nii.gz"]}}}


def test_output_equal_to_bids_dir_exits_73(dataset):
    code, _, err = run_cli(dataset, dataset, "participant")
    assert code == 73


def test_uncreatable_output_exits_73(dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(dataset, blocker / "out", "participant", "--skip-bids-validation")
    assert code == 73
    assert_one_line_error(err, "cannot create output_dir")


def test_missing_bids_dir_exits_66(tmp_path):
    code, _, err = run_cli(tmp_path / "nope", tmp_path / "out", "participant")
    assert code == 66
    assert_one_line_error(err, "nope: bids_dir does not exist")


def test_not_a_bids_dataset_exits_66(tmp_path):
    (tmp_path / "raw").mkdir()
    code, _, err = run_cli(tmp_path / "raw", tmp_path / "out", "participant")
    assert code == 66
    assert_one_line_error(err, "no dataset_description.json")


def test_unknown_option_exits_64(dataset, tmp_path):
    code, _, err = run_cli(dataset, tmp_path / "out", "participant", "--bogus")
    assert code == 64
    assert_one_line_error(err, "unrecognized arguments: --bogus")


def test_bad_option_value_exits_64(dataset, tmp_path):
    code, _, err = run_cli(dataset, tmp_path / "out", "group", "--modalities", "dti")
    assert code == 64
    assert_one_line_error(err, "invalid choice: 'dti'")


def test_unknown_config_key_exits_64(dataset, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  filtres: [1, 2]\n")
    code, _, err = run_cli(dataset, tmp_path / "out", "participant", "--config", cfg, "--skip-bids-validation")
    assert code == 64
    assert_one_line_error(err, r"cfg.yaml: unknown config key 'model.filtres' \(valid keys here: .*filters")


def test_config_wrong_type_exits_64(dataset, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("training:\n  epochs: many\n")
    code, _, err = run_cli(dataset, tmp_path / "out", "participant", "--config", cfg, "--skip-bids-validation")
    assert code == 64
    assert_one_line_error(err, "'training.epochs' must be of type int")


def test_unknown_participant_label_exits_18_listing_labels(dataset, tmp_path):
    code, _, err = run_cli(dataset, tmp_path / "out", "participant", "--participant-label", "sub-07", "03",
                           "--skip-bids-validation")
    assert code == 18
    assert_one_line_error(err, r"label\(s\) 07 03 not found; existing labels: 01 02")


def test_filter_selecting_nothing_exits_18(dataset, tmp_path):
    ffile = tmp_path / "f.json"
    ffile.write_text(json.dumps({"t1w": {"acquisition": "none"}}))
    code, _, err = run_cli(dataset, tmp_path / "out", "participant", "--bids-filter-file", ffile,
                           "--skip-bids-validation")
    assert code == 18
    assert_one_line_error(err, "matched no T1w")


def test_invalid_bids_exits_16_unless_skipped(dataset, tmp_path):
    (dataset / "sub-01" / "anat" / "sub-01_notasuffix.nii.gz").write_bytes(
        (dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz").read_bytes())
    code, _, err = run_cli(dataset, tmp_path / "out", "participant", "--participant-label", "01")
    assert code == 16
    assert_one_line_error(err, r"BIDS validation found \d+ error\(s\) \(.*NOT_INCLUDED")


def test_missing_template_file_exits_64(dataset, tmp_path):
    code, _, err = run_cli(dataset, tmp_path / "out", "participant", "--template", tmp_path / "tpl.nii.gz")
    assert code == 64
    assert_one_line_error(err, "tpl.nii.gz: file given to --template does not exist")


def test_exit_codes_are_documented():
    doc = (REPO / "docs" / "exit-codes.md").read_text()
    for code in EXIT_CODES:
        assert re.search(rf"^\| {code} \|", doc, re.M), f"exit code {code} missing from docs/exit-codes.md"
