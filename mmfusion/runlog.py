"""Logging setup and progress reporting shared by every level.

Every run logs to stderr and to ``output_dir/logs/<run_id>.log``. Long loops use
:func:`progress`, which draws a bar in a terminal and writes plain periodic lines
(through ``logging``) in batch logs, where a bar would be noise.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
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
    console = logging.StreamHandler(sys.stderr)
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
    return logger


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
