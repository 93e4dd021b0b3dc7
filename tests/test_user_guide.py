"""The user guide (docs/*.md, README.md) stays navigable and in step with the code.

- every docs page is reachable from docs/index.md;
- every relative link points to an existing file (and, for the user-guide pages, to an
  existing heading when it carries a #fragment);
- every exit code of mmfusion.errors.EXIT_CODES has its section in troubleshooting.md;
- the HDF5 shard schema documented in outputs.md is exactly what mmfusion.io.shards writes;
- the method is in the repository: no file points at the internal specification that users
  never get, and every ``method.md#<anchor>`` in code, config and docs names a heading of
  docs/method.md.
"""
import inspect
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mmfusion.io import shards
from mmfusion.errors import EXIT_CODES

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
#: pages of the user guide whose headings #fragments are checked
GUIDE = ("index.md", "installation.md", "inputs.md", "outputs.md", "troubleshooting.md",
         "performance.md", "citing.md", "method.md")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (no links live there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(path: Path) -> list[tuple[Path, str]]:
    """(resolved target file, fragment) of every relative link in ``path``."""
    out = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        out.append((resolved, fragment))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.sub(r"^```.*?^```", "", path.read_text(),
                                                               flags=re.S | re.M), flags=re.M)
    return {slug(h) for h in headings}


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_every_page_is_linked_from_the_index():
    index = DOCS / "index.md"
    linked = {target for target, _ in relative_links(index)}
    missing = [p.name for p in doc_pages() if p.name != "index.md" and p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link: {missing}"


@pytest.mark.parametrize("page", [*doc_pages(), REPO / "README.md"], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target, fragment in relative_links(page):
        if not target.exists():
            broken.append(f"{target.relative_to(REPO) if target.is_relative_to(REPO) else target} (missing file)")
        elif fragment and target.parent == DOCS and target.name in GUIDE and slug(fragment) not in anchors(target):
            broken.append(f"{target.name}#{fragment} (no such heading)")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_readme_links_the_user_guide():
    links = {target for target, _ in relative_links(REPO / "README.md")}
    assert {(DOCS / name).resolve() for name in GUIDE} <= links


@pytest.mark.parametrize("code", sorted(EXIT_CODES))
def test_every_exit_code_has_a_troubleshooting_section(code):
    text = (DOCS / "troubleshooting.md").read_text()
    assert re.search(rf"^### Exit {code}:", text, flags=re.M), f"no '### Exit {code}:' section"
    assert re.search(rf"^\| {code} \|", (DOCS / "exit-codes.md").read_text(), flags=re.M)


# ----------------------------------------------------------------- shard schema
def shard_section() -> str:
    text = (DOCS / "outputs.md").read_text()
    match = re.search(r"^## The HDF5 shard\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "outputs.md has no '## The HDF5 shard' section"
    return match.group(1)


def documented_schema() -> dict[str, set[str]]:
    """{'dataset': {...}, 'attribute': {...}} from the schema table rows ``| `name` | kind | ...``."""
    found = {"dataset": set(), "attribute": set()}
    for name, kind in re.findall(r"^\| `/?(\w+)` \| (dataset|attribute) \|", shard_section(), flags=re.M):
        found[kind].add(name)
    return found


def declared_schema() -> dict[str, set[str]]:
    """Names the shard writer declares: modality datasets, 'mask', every attribute."""
    source = inspect.getsource(shards.write_shard)
    datasets = set(shards.MODALITIES) | set(re.findall(r'create_dataset\("(\w+)"', source))
    attrs = set(re.findall(r'h5\.attrs\["(\w+)"\]', source)) | set(shards._STR_ATTRS) | set(shards._JSON_ATTRS)
    return {"dataset": datasets, "attribute": attrs}


def test_shard_schema_table_matches_the_writer():
    documented, declared = documented_schema(), declared_schema()
    assert declared["dataset"] >= {"mask", "t1", "jac", "fa", "ndi"} and "schema_version" in declared["attribute"]
    for kind in ("dataset", "attribute"):
        assert documented[kind] == declared[kind], (
            f"{kind}s: undocumented {sorted(declared[kind] - documented[kind])}, "
            f"documented but not written {sorted(documented[kind] - declared[kind])}")


def test_a_written_shard_has_exactly_the_documented_names(tmp_path):
    shape = (4, 5, 3)
    meta = {key: "x" for key in shards._STR_ATTRS} | {key: {"a": 1} for key in shards._JSON_ATTRS}
    shard = shards.Shard("01", "2", {m: np.ones(shape, np.float32) for m in shards.MODALITIES},
                         np.ones(shape, np.uint8), np.diag([2.5, 2.5, 2.5, 1.0]), meta)
    path = shards.write_shard(shards.shard_path(tmp_path, "01", "2"), shard)
    import h5py

    with h5py.File(path) as h5:
        written = {"dataset": set(h5.keys()), "attribute": set(h5.attrs)}
    assert written == documented_schema()
    assert f"shards/{path.name}" == "shards/sub-01_ses-2.h5"
    assert shards.SCHEMA_VERSION == int(re.search(r"schema version (\d+)", shard_section(), flags=re.I).group(1))


def test_shard_path_pattern_is_documented():
    pattern = "shards/sub-<label>[_ses-<label>].h5"
    assert pattern in shard_section()
    assert shards.shard_path(Path("out"), "<label>").as_posix() == "out/shards/sub-<label>.h5"
    assert shards.shard_path(Path("out"), "<label>", "<label>").as_posix() == "out/shards/sub-<label>_ses-<label>.h5"


# ------------------------------------------------------------ the method specification
#: the internal specification's file name, spelled so that this file does not match itself
INTERNAL_DOC = "SP" + "EC.md"
METHOD_ANCHOR = re.compile(r"method\.md#([A-Za-z0-9_-]+)")
_SKIP_DIRS = {".git", "build", "dist", "node_modules", "__pycache__"}


def tracked_text_files() -> list[Path]:
    """The repository's tracked text files (``git ls-files``; a walk when git is absent)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        paths = [REPO / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith((".", "venv"))
                       and not d.endswith(".egg-info")]
            paths += [Path(root) / f for f in files]
    texts = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:  # a tracked file deleted in the working tree
            continue
        if b"\0" not in data:
            texts.append(path)
    return sorted(texts)


def test_no_file_points_at_the_internal_spec():
    offenders = []
    for path in tracked_text_files():
        rel = path.relative_to(REPO).as_posix()
        if rel == "CHANGELOG.md":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if INTERNAL_DOC in line:
                offenders.append(f"{rel}:{number}")
    assert not offenders, (f"{INTERNAL_DOC} is not in the repository; point at a section of "
                           f"docs/method.md instead: {offenders}")


def test_every_method_anchor_names_a_heading():
    headings = anchors(DOCS / "method.md")
    seen, broken = 0, []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            for anchor in METHOD_ANCHOR.findall(line):
                seen += 1
                if anchor not in headings:
                    broken.append(f"{path.relative_to(REPO).as_posix()}:{number}: method.md#{anchor}")
    assert seen, "found no link into a section of method.md: is the repository readable?"
    assert not broken, f"no such heading in docs/method.md: {broken}"


def test_method_has_the_numbered_sections_code_points_at():
    headings = anchors(DOCS / "method.md")
    for anchor in ("1-spatial-normalization", "2-intensity-normalization", "3-autoencoder",
                   "4-cross-validation-and-metrics", "5-embeddings", "6-clustering",
                   "7-phenotypes-and-statistics", "8-deviations", "9-known-shortfalls"):
        assert anchor in headings, f"docs/method.md lost its section #{anchor}"


# ------------------------------------------------------------ the maintainers' map
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def test_architecture_names_only_what_exists():
    """docs/architecture.md describes the current layout: every repository path it names
    exists, and every Python name it names is defined in the package."""
    spans = CODE_SPAN.findall((DOCS / "architecture.md").read_text())
    paths = [s for s in spans if re.fullmatch(r"(mmfusion|bench|tests|docs|scripts)/[\w/.<>-]*", s)]
    assert len(paths) > 20, "docs/architecture.md names too few modules: was it rewritten?"
    missing = [p for p in paths if "<" not in p and not (REPO / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
    source = "\n".join(p.read_text() for p in (REPO / "mmfusion").rglob("*.py"))
    names = {s for s in spans if re.fullmatch(r"[A-Za-z_]\w*", s)}
    undefined = sorted(n for n in names
                       if not re.search(rf"^\s*(def|class)\s+{n}\b|^\s*{n}\s*(:[^=\n]*)?=", source, re.M))
    assert not undefined, f"docs/architecture.md names what the package does not define: {undefined}"
