"""Logging setup and progress reporting shared by every level.

Every run logs to stderr and to ``output_dir/logs/<run_id>.log``. Long loops use
:func:`progress`, which draws a bar in a terminal and writes plain periodic lines
(through ``logging``) in batch logs, where a bar would be noise.

The C++ libraries (ANTs/ITK, TensorFlow) print to the process's file descriptors 1 and 2
directly, and some Python libraries (ANTsPy) ``print()``. :func:`native_output_to` points
both descriptors and ``sys.stdout`` at the run's log file while a level runs, and keeps
``sys.stderr`` (our log lines, progress bars, the one-line error) on the terminal;
:func:`terminal_print` writes a result line to the terminal's standard output.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_terminal_stdout = None  # the terminal's stdout while native_output_to is active
LOGGER_NAME = "mmfusion"
_FMT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def new_run_id(level: str) -> str:
    """A sortable, unique run id, e.g. ``participant-20261125T211800-1a2b3c``."""
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    return f"{level}-{stamp}-{uuid.uuid4().hex[:6]}"


def setup_logging(verbosity: int = 0, log_file: str | Path | None = None) -> logging.Logger:
    """Configure the ``mmfusion`` logger: stderr (INFO, or DEBUG with ``-v``) + a file."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = _ConsoleHandler()
    console.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    console.setFormatter(logging.Formatter(_FMT, "%H:%M:%S"))
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter(_FMT))
        logger.addHandler(fh)
    logger.propagate = False
    _route_python_warnings(logger.handlers, verbosity)
    return logger


class _ConsoleHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever ``sys.stderr`` is at emit time (so it
    follows :func:`native_output_to` swapping the terminal stream in and out)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it; ignored
        pass


def _route_python_warnings(handlers: list[logging.Handler], verbosity: int) -> None:
    """Python ``warnings`` (Keras, pybids, nilearn deprecations) go to the log file; to the
    terminal as well only with ``-v``."""
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    for handler in list(py_warnings.handlers):
        py_warnings.removeHandler(handler)
    for handler in handlers:
        if verbosity > 0 or not isinstance(handler, _ConsoleHandler):
            py_warnings.addHandler(handler)
    if not py_warnings.handlers:
        py_warnings.addHandler(logging.NullHandler())
    py_warnings.propagate = False


def terminal_print(text: str) -> None:
    """Print a result line (e.g. the report's path) to the terminal's standard output, also
    while :func:`native_output_to` sends ``sys.stdout`` to the log file."""
    print(text, file=_terminal_stdout or sys.stdout, flush=True)


@contextlib.contextmanager
def native_output_to(log_file: str | Path | None) -> Iterator[None]:
    """While inside, file descriptors 1 and 2 (what C/C++ code and child processes write
    to) and ``sys.stdout`` (third-party ``print``) append to ``log_file``; ``sys.stderr``
    (logging's console handler, progress) keeps writing to the original terminal.
    ``log_file=None`` leaves everything as it is (``-vv``). Restored on exit."""
    global _terminal_stdout
    if log_file is None:
        yield
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal_out = os.fdopen(os.dup(saved_fds[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    terminal_err = os.fdopen(os.dup(saved_fds[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    log_out = os.fdopen(os.dup(log_fd), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout, sys.stderr, _terminal_stdout = log_out, terminal_err, terminal_out
        yield
    finally:
        for stream in (log_out, terminal_out, terminal_err):
            stream.flush()
        sys.stdout, sys.stderr = saved_streams
        _terminal_stdout = None
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in (*saved_fds, log_fd):
            os.close(fd)
        for stream in (log_out, terminal_out, terminal_err):
            stream.close()


def get_logger(name: str) -> logging.Logger:
    """A child of the ``mmfusion`` logger (``name`` is usually ``__name__``)."""
    if name.startswith(LOGGER_NAME):
        return logging.getLogger(name)
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    every_s: float = 30.0,
    logger: logging.Logger | None = None,
) -> Iterator[T]:
    """Yield ``items``, reporting progress.

    In a terminal (stderr is a TTY and ``MMFUSION_PLAIN_PROGRESS`` unset) a one-line
    bar is redrawn; otherwise a log line ``desc: i/total (pct) elapsed, ETA`` is written
    at most every ``every_s`` seconds plus one at the end.
    """
    log = logger or get_logger("progress")
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    tty = sys.stderr.isatty() and not os.environ.get("MMFUSION_PLAIN_PROGRESS")
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if tty:
            _draw_bar(desc, done, total, now - start)
        elif now - last >= every_s or done == total:
            log.info("%s: %s", desc, _status(done, total, now - start))
            last = now
    if tty:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _status(done: int, total: int | None, elapsed: float) -> str:
    if not total:
        return f"{done} done, {elapsed:.0f}s"
    eta = elapsed / done * (total - done) if done else float("nan")
    return f"{done}/{total} ({100 * done / total:.0f}%), {elapsed:.0f}s elapsed, ETA {eta:.0f}s"


def _draw_bar(desc: str, done: int, total: int | None, elapsed: float) -> None:
    width = 30
    frac = done / total if total else 0.0
    bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
    sys.stderr.write(f"\r{desc} [{bar}] {_status(done, total, elapsed)}")
    sys.stderr.flush()
