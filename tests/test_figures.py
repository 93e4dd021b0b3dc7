"""mmfusion/report/figures.py: one place for the plots; the subject QC figure is drawn in
world coordinates, so the voxel order of a volume does not flip what it shows."""
import ast
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

from mmfusion.report import figures

REPO = Path(__file__).resolve().parents[1]
SHAPE = (20, 24, 18)
AFFINE = np.array([[4.0, 0, 0, -40], [0, 4.0, 0, -48], [0, 0, 4.0, -36], [0, 0, 0, 1]])  # RAS, 4 mm


def _subject():
    """An ellipsoid 'brain' with a bright blob in its left hemisphere (low x = left in RAS)."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    c = np.array(SHAPE) / 2
    brain = ((x - c[0]) / 8) ** 2 + ((y - c[1]) / 10) ** 2 + ((z - c[2]) / 7) ** 2 < 1
    blob = (x - 5) ** 2 + (y - 14) ** 2 + (z - 10) ** 2 < 8
    t1 = (brain + 2.0 * blob).astype(np.float32)
    jac = np.where(brain, 0.2 * (y - c[1]) / 10, 0).astype(np.float32)
    return t1, brain.astype(np.uint8), jac


def _flip_x(arrays, affine):
    """The same anatomy stored with the first voxel axis reversed: data flipped, and the
    affine changed so every voxel keeps its world position."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, SHAPE[0] - 1
    return [a[::-1] for a in arrays], affine @ flip


def _qc_png(path, arrays, affine):
    t1, mask, jac = arrays
    figures.registration_figure(path, t1, t1, jac, mask, "sub-01", affine=affine)
    return mpimg.imread(path)[..., :3]


def _rot90_png(path, arrays):
    """The former drawing: mid slices of the voxel arrays, rot90, the affine ignored."""
    plt = figures.pyplot()
    vol = arrays[0]
    x, y, z = (s // 2 for s in vol.shape)
    fig, axes = plt.subplots(1, 3, figsize=(6, 2))
    for ax, sl in zip(axes, [vol[x, :, :], vol[:, y, :], vol[:, :, z]]):
        ax.imshow(np.rot90(sl), cmap="gray")
        ax.axis("off")
    figures.save_figure(fig, path)
    return mpimg.imread(path)[..., :3]


def _differ(a, b) -> float:
    """Mean absolute RGB difference of two rendered PNGs (1.0 if their sizes differ)."""
    return 1.0 if a.shape != b.shape else float(np.abs(a - b).mean())


def test_a_subject_stored_left_right_flipped_shows_the_same_anatomy_on_the_same_side(tmp_path):
    subject = _subject()
    flipped, flipped_affine = _flip_x(subject, AFFINE)
    normal = _qc_png(tmp_path / "normal.png", subject, AFFINE)
    assert _differ(normal, _qc_png(tmp_path / "flipped.png", flipped, flipped_affine)) < 1e-3
    # the comparison catches a real flip: the mirrored brain (blob in the right hemisphere)
    mirrored = _qc_png(tmp_path / "mirrored.png", flipped, AFFINE)
    assert _differ(normal, mirrored) > 5e-3
    # and the former voxel-order rot90 drawing fails it: it shows the flipped storage mirrored
    assert _differ(_rot90_png(tmp_path / "old_normal.png", subject),
                   _rot90_png(tmp_path / "old_flipped.png", flipped)) > 5e-3


def test_save_figure_is_atomic_and_closes_the_figure(tmp_path):
    plt = figures.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = figures.save_figure(fig, tmp_path / "sub" / "line.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and sorted(p.name for p in path.parent.iterdir()) == ["line.png"]
    assert not plt.fignum_exists(fig.number)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_report_package_plots():
    """The science modules compute; matplotlib and the Agg backend live in report/figures.py."""
    for path in sorted((REPO / "mmfusion").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "mmfusion/report/figures.py":
            continue
        assert not any(m.split(".")[0] == "matplotlib" for m in _imports(path)), f"{rel} imports matplotlib"
        assert "savefig(" not in path.read_text(), f"{rel} saves a figure itself"
