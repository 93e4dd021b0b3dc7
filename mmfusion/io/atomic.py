"""Atomic file writes: write under a temporary name in the same folder, then rename.

A crash (or a SLURM time limit) never leaves a half-written file under the final name,
and concurrent writers of *different* files never see each other's partial output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mmfusion.errors import OutputError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""The process umask at import; temporary files (mode 0600 from ``mkstemp``) get
``0o666 & ~UMASK`` (folders ``0o777 & ~UMASK``) before they take their final name, like
files created with ``open()``, so group members can read shared outputs."""


def _publish_mode(path: Path, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    The temporary name keeps ``suffix`` (default: the final file's full suffix, e.g.
    ``.nii.gz``) so libraries that dispatch on the extension still work. On error the
    temporary file is removed and the final path is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish_mode(tmp_path, directory=tmp_path.is_dir())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_once(path: str | Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists; safe when many processes race.

    Uses a hard link from a complete temporary file, which fails if the target exists,
    so the file is written exactly once and never seen partially. Returns True if this
    call created it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    _publish_mode(Path(tmp))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable_dir(path: str | Path, what: str) -> None:
    """Raise ``OutputError`` (exit 73, one line) unless this process can create files in
    the existing folder ``path``: a read-only mount, a folder owned by another user (a
    container's bind mount owned by root, say), ACLs, root squash. Tried for real with an
    anonymous temporary file (removed at once), since ``os.access`` misjudges some of these.
    """
    path = Path(path)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OutputError(f"{path}: {what} is not writable by this user (uid {os.geteuid()}: "
                          f"{exc.strerror}); choose a writable folder, or make it writable for uid "
                          f"{os.geteuid()} (containers: run with --user $(id -u):$(id -g))") from exc


def output_permission_error(exc: OSError, roots) -> OutputError | None:
    """The one-line ``OutputError`` for a write refused (permission denied, read-only file
    system) on a path inside one of the output folders ``roots``; None for any other error."""
    import errno

    if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not exc.filename:
        return None
    failed = Path(os.path.abspath(exc.filename))
    for root in roots:
        if root is not None and (failed == Path(root) or Path(root) in failed.parents):
            return OutputError(f"{failed}: cannot write inside {root} ({exc.strerror}); make the folder "
                               f"and what is in it writable for uid {os.geteuid()} (containers: run with "
                               f"--user $(id -u):$(id -g)), or choose another folder")
    return None
