"""Per-subject quality control: the registration similarity and the HTML page (fMRIPrep-style).

The figure itself (warped T1w with the template's edges, and log-JAC, in world
coordinates with orientation labels) is drawn by
:func:`mmfusion.report.figures.registration_figure`; the page is the Jinja2 template
``templates/subject.html.j2`` and embeds it next to a table of the run's details.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mmfusion.io.atomic import write_text
from mmfusion.report.templating import png_data_uri, render


def similarity(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` inside ``mask`` (warped T1w vs template)."""
    m = mask > 0
    if m.sum() < 3:
        return float("nan")
    return float(np.corrcoef(a[m], b[m])[0, 1])


def subject_report(path: Path, key: str, figure: Path, meta: dict) -> Path:
    """Write the subject's HTML page (atomic): the figure embedded (one self-contained file;
    its PNG beside it is named in the caption) + a table of ``meta`` entries."""
    details = [(str(k), v if isinstance(v, str) else json.dumps(v, indent=1, default=str)) for k, v in meta.items()]
    write_text(path, render("subject.html.j2", key=key, figure=os.path.relpath(figure, path.parent),
                            figure_data=png_data_uri(figure), details=details))
    return path
