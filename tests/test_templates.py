"""The HTML pages come from Jinja2 templates shipped as package data."""
import fnmatch
import tomllib
from pathlib import Path

from mmfusion.report import group_report, subject_qc

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "mmfusion" / "report" / "templates"


def test_the_templates_are_package_data():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mmfusion"]
    files = sorted(p.relative_to(REPO / "mmfusion").as_posix() for p in TEMPLATES.iterdir())
    assert {"report/templates/group_report.html.j2", "report/templates/subject.html.j2"} <= set(files)
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} is not shipped (pyproject package-data)"


def test_subject_page_embeds_the_figure_and_escapes_the_details(tmp_path):
    fig = tmp_path / "sub-01" / "figures" / "sub-01_desc-registration_qc.png"
    fig.parent.mkdir(parents=True)
    fig.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    page = subject_qc.subject_report(tmp_path / "sub-01.html", "sub-01", fig,
                                     {"subject": "01", "template": {"name": "<MNI>"}, "note": "a & b"})
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<h1>sub-01: spatial normalization</h1>" in text
    assert '<img src="data:image/png;base64,iVBORw0KGgo' in text  # one self-contained file
    assert "<figcaption>sub-01/figures/sub-01_desc-registration_qc.png</figcaption>" in text
    assert "<tr><th>note</th><td><pre>a &amp; b</pre></td></tr>" in text and "&lt;MNI&gt;" in text
    assert "{{" not in text and "{%" not in text


def test_group_report_is_rendered_from_the_template(tmp_path):
    text = group_report.write_report(tmp_path, title="a <b> report").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.endswith("</body></html>\n")
    assert "<title>a &lt;b&gt; report</title>" in text and "<h1>a &lt;b&gt; report</h1>" in text
    assert '<h2 id="s12">13. Caveats</h2><ul><li>' in text and "{{" not in text and "{%" not in text
    assert group_report._figure(tmp_path / "absent.png", "x") == []
