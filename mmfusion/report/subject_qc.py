"""Per-subject quality control: the registration similarity and the HTML page (fMRIPrep-style).

The figure itself (warped T1w with the template's edges, and log-JAC, in world
coordinates with orientation labels) is drawn by
:func:`mmfusion.report.figures.registration_figure`.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from mmfusion.io.atomic import write_text


def similarity(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` inside ``mask`` (warped T1w vs template)."""
    m = mask > 0
    if m.sum() < 3:
        return float("nan")
    return float(np.corrcoef(a[m], b[m])[0, 1])


def subject_report(path: Path, key: str, figure: Path, meta: dict) -> Path:
    """Write the subject's HTML page (atomic): figure + a table of ``meta`` entries."""
    rel = os.path.relpath(figure, path.parent)
    rows = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td><pre>{html.escape(v if isinstance(v, str) else json.dumps(v, indent=1, default=str))}</pre></td></tr>"
        for k, v in meta.items())
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mmfusion: {html.escape(key)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} th{{text-align:left;vertical-align:top;padding-right:1em}}
pre{{margin:0;white-space:pre-wrap}} img{{max-width:100%}}</style></head>
<body><h1>{html.escape(key)}: spatial normalization</h1>
<h2>Registration</h2>
<p>Top: the subject's N4-corrected T1w warped to the template, with the template's edges in red.
Bottom: log Jacobian determinant of the nonlinear warp (red = subject larger than the template).</p>
<img src="{html.escape(rel)}" alt="registration QC figure">
<h2>Details</h2><table>{rows}</table></body></html>
"""
    write_text(path, text)
    return path
