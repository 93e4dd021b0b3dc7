"""The BIDS-App CLI through the real entry point: options, early validation, exit codes."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmfusion.errors import EXIT_CODES
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


def test_output_inside_bids_dir_exits_73(dataset):
    code, _, err = run_cli(dataset, dataset / "derivatives" / "mmfusion", "participant")
    assert code == 73
    assert_one_line_error(err, "must not be bids_dir or inside it")
    assert not (dataset / "derivatives" / "mmfusion").exists()


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
