"""The version string. Single source: the top-level ``version`` file.

In a source checkout it is read from ``<repo>/version``; in an installed package it
comes from the distribution metadata (which setuptools filled from the same file).
"""
from importlib import metadata
from pathlib import Path

_REPO_VERSION_FILE = Path(__file__).resolve().parent.parent / "version"


def _read_version() -> str:
    if _REPO_VERSION_FILE.is_file():
        return _REPO_VERSION_FILE.read_text().strip()
    try:
        return metadata.version("mmfusion")
    except metadata.PackageNotFoundError:  # pragma: no cover - broken install
        return "0+unknown"


__version__ = _read_version()
