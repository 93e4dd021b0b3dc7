"""Jinja2 rendering of the HTML pages from the templates shipped in ``mmfusion/report/templates/``."""
from __future__ import annotations

import base64
import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def environment():
    """The Jinja2 environment: package templates, HTML autoescaping, no stray whitespace."""
    import jinja2
    return jinja2.Environment(loader=jinja2.PackageLoader("mmfusion.report", "templates"),
                              autoescape=True, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def render(name: str, **context) -> str:
    """Render the template ``name`` with ``context``."""
    return environment().get_template(name).render(**context)


def png_data_uri(path: Path) -> str:
    """``data:image/png;base64,...`` of the PNG at ``path`` (figures embedded in the page)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
