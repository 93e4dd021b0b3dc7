"""Output folders the process may not write: every level and ``mmfusion simulate`` end with
the one-line exit-73 error (no traceback) and write nothing.

The folders are really unwritable for the process under test, also when the suite runs as
root (as CI does, where ``chmod`` stops nobody): then the CLI runs in a private mount
namespace (``unshare --mount``) in which the folder is bind-mounted read-only, the way a
container sees a read-only or foreign-owned bind mount. A normal user gets ``chmod 555``.
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@contextlib.contextmanager
def _unwritable(folders: list[Path]):
    """Yield a command prefix that runs a command with ``folders`` unwritable for it."""
    if ROOT:
        mounts = "".join(f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}" && ' for d in folders)
        yield ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts + 'exec "$@"', "sh"]
        return
    modes = {d: d.stat().st_mode for d in folders}
    for d in folders:
        d.chmod(0o555)
    try:
        yield []
    finally:
        for d, mode in modes.items():
            d.chmod(mode)


def _run(args, unwritable: list[Path]) -> subprocess.CompletedProcess:
    before = {d: _listing(d) for d in unwritable}
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMFUSION_PLAIN_PROGRESS": "1"}
    with _unwritable(unwritable) as prefix:
        proc = subprocess.run([*prefix, sys.executable, "-m", "mmfusion.cli", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=120)
    for d in unwritable:
        assert _listing(d) == before[d], f"{d}: the refused run wrote {set(_listing(d)) - set(before[d])}"
    return proc


def _assert_exit_73(proc: subprocess.CompletedProcess, prefix: str, *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 73, f"exit {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(prefix), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def bids(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    return root


@pytest.mark.parametrize("level", ["template", "participant", "group"])
def test_every_level_refuses_an_unwritable_output_dir(tmp_path, bids, level):
    out = tmp_path / "out"
    out.mkdir()
    proc = _run([bids, out, level, "--skip-bids-validation"], [out])
    line = _assert_exit_73(proc, "mmfusion: error: ", str(out), "output_dir is not writable by this user",
                           "--user $(id -u):$(id -g)")
    assert ("Read-only file system" if ROOT else "Permission denied") in line


def test_an_output_dir_that_cannot_be_created_and_an_unwritable_work_dir(tmp_path, bids):
    parent, work = tmp_path / "parent", tmp_path / "work"
    parent.mkdir()
    work.mkdir()
    proc = _run([bids, parent / "out", "participant", "--skip-bids-validation"], [parent])
    _assert_exit_73(proc, "mmfusion: error: ", str(parent / "out"), "cannot create output_dir")
    out = tmp_path / "out"
    proc = _run([bids, out, "participant", "--skip-bids-validation", "-w", work], [work])
    _assert_exit_73(proc, "mmfusion: error: ", str(work), "work dir is not writable")


def test_a_foreign_owned_folder_inside_output_dir_is_exit_73_too(tmp_path, bids):
    """output_dir writable, its logs/ not (left by a container run as another user): the
    write that fails during the run gives the one line too, naming the file."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    proc = _run([bids, out, "template", "--skip-bids-validation"], [out / "logs"])
    _assert_exit_73(proc, "mmfusion: error: ", str(out / "logs"), f"cannot write inside {out}")


def test_simulate_refuses_an_unwritable_folder(tmp_path):
    parent = tmp_path / "mount"
    parent.mkdir()
    proc = _run(["simulate", parent / "sim", "--n-subjects", 2, "--n-strata", 1, "--voxel-size", 8], [parent])
    _assert_exit_73(proc, "error: ", str(parent), "the folder OUT_DIR goes into is not writable by this user")
    # deeper: the first existing folder above OUT_DIR is the one that must be writable
    proc = _run(["simulate", parent / "a" / "sim", "--n-subjects", 2, "--n-strata", 1], [parent])
    _assert_exit_73(proc, "error: ", str(parent), "is not writable")


def test_simulate_into_a_mount_point_says_to_use_a_folder_inside_it(tmp_path):
    """A bind mount (docker run -v HOST:/out) cannot be replaced by the finished dataset."""
    mount = tmp_path / "out"
    mount.mkdir()
    if ROOT:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount --bind "{mount}" "{mount}" && exec "$@"', "sh"]
    else:  # a normal user cannot mount: the check itself, on a real mount point
        cmd = []
        mount = Path("/proc")
    proc = subprocess.run([*cmd, sys.executable, "-m", "mmfusion.cli", "simulate", str(mount), "--overwrite",
                           "--n-subjects", "2", "--n-strata", "1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    _assert_exit_73(proc, "error: ", f"{mount} is a mount point", str(mount / "sim"))
