"""The terminal shows mmfusion's own lines; C++ chatter goes to the run's log file; a
dependency that does not import is named, with the fix (exit 78)."""
import os
import subprocess
import sys
from pathlib import Path

from mmfusion.runlog import native_output_to, setup_logging, terminal_print
from tests.bids_fixtures import make_dataset

REPO = Path(__file__).resolve().parent.parent


def test_native_output_goes_to_the_log_file_and_python_output_to_the_terminal(tmp_path, capfd):
    log_file = tmp_path / "logs" / "run.log"
    logger = setup_logging(0, log_file)
    with native_output_to(log_file):
        os.write(1, b"itk stdout chatter\n")
        os.write(2, b"tensorflow stderr chatter\n")
        subprocess.run(["echo", "child process chatter"], check=True)
        print("a library's print()")
        logger.info("our own line")
        terminal_print("mmfusion report: somewhere")
    os.write(2, b"after the block\n")
    out, err = capfd.readouterr()
    text = log_file.read_text()
    for chatter in ("itk stdout chatter", "tensorflow stderr chatter", "child process chatter", "a library's print()"):
        assert chatter in text and chatter not in out + err
    assert "our own line" in err and "our own line" in text  # terminal and log
    assert "mmfusion report: somewhere" in out
    assert "after the block" in err and "after the block" not in text  # descriptors restored


def test_native_output_to_none_changes_nothing(capfd):
    with native_output_to(None):
        os.write(2, b"visible with -vv\n")
    assert "visible with -vv" in capfd.readouterr().err


def test_python_warnings_go_to_the_log_file_only(tmp_path):
    """In a subprocess: pytest records warnings itself, which would hide the routing."""
    log_file = tmp_path / "run.log"
    code = ("import warnings\nfrom mmfusion.runlog import setup_logging\n"
            f"setup_logging(0, {str(log_file)!r})\nwarnings.warn('a library deprecation', UserWarning)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "a library deprecation" in log_file.read_text()
    assert "a library deprecation" not in proc.stderr


def test_a_dependency_that_does_not_import_is_named_with_the_fix(tmp_path):
    """A broken ANTsPy (simulated: its import raises) -> exit 78 naming `ants`, not 'not implemented'."""
    bids = tmp_path / "bids"
    make_dataset(bids, subjects=("01",))
    code = ("import sys; sys.modules['ants'] = None\n"
            "from mmfusion.cli import main\n"
            f"sys.exit(main([{str(bids)!r}, {str(tmp_path / 'out')!r}, 'participant', '--skip-bids-validation']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 78, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mmfusion: error:")]
    assert len(errors) == 1 and "cannot import ants" in errors[0] and "requirements.lock" in errors[0]
    assert "not implemented" not in proc.stderr
