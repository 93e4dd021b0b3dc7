"""A user template without a brain mask: the MNI mask is registered to it once per output dir."""
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import ants
import numpy as np

from mmfusion.spatial import presets
from mmfusion.spatial import registration as reg
from mmfusion.spatial import template as tp


class _Inputs:
    def __init__(self):
        self.paths = []

    def add_inputs(self, paths):
        self.paths.extend(paths)


def _ctx(tmp_path: Path, template: Path):
    return SimpleNamespace(config={"spatial": {"registration_resolution": 4.0}}, template=template,
                           output_dir=tmp_path / "out", work_dir=tmp_path / "work", provenance=_Inputs())


def _as_two_tasks(call) -> list:
    """``call()`` in two threads started together (two array tasks at once); their results."""
    results = [None, None]

    def run(k):
        results[k] = call()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_user_template_mask_is_computed_once_and_shared(tmp_path, monkeypatch):
    reg.set_ants_threads(2, 1)
    mni, mni_mask = tp.builtin_mni(4.0)
    path = tmp_path / "tpl" / "mytemplate_T1w.nii.gz"
    path.parent.mkdir()
    ants.image_write(mni, str(path))
    calls = []
    real = tp._mask_by_mni

    def counting(*args, **kwargs):
        calls.append(time.time())
        return real(*args, **kwargs)

    monkeypatch.setattr(tp, "_mask_by_mni", counting)
    params = presets.resolve_preset("fast-test")
    results = _as_two_tasks(lambda: tp.resolve_template(_ctx(tmp_path, path), params))
    assert len(calls) == 1
    cached = list((tmp_path / "out" / "template").glob("tpl-custom*_res-4_desc-brain_mask.nii.gz"))
    assert len(cached) == 1
    a, b = (r.mask.numpy() for r in results)
    np.testing.assert_array_equal(a, b)
    # the registered MNI mask on the MNI image itself: close to the MNI mask
    m = mni_mask.numpy() > 0.5
    dice = 2 * (m & (a > 0.5)).sum() / (m.sum() + (a > 0.5).sum())
    assert dice > 0.9, dice
    # a later run reuses the file; other registration parameters get their own mask
    tp.resolve_template(_ctx(tmp_path, path), params)
    assert len(calls) == 1
    tp.resolve_template(_ctx(tmp_path, path), dict(params, reg_iterations=[2, 0]))
    assert len(calls) == 2
    assert len(list((tmp_path / "out" / "template").glob("tpl-custom*_desc-brain_mask.nii.gz"))) == 2


def test_a_builtin_template_is_n4_corrected_once_and_shared(tmp_path, monkeypatch):
    """Subjects are N4-corrected, so the bias-free built-in template is too: once per output
    directory, the same file for every array task, a new hash, the mask and grid unchanged."""
    reg.set_ants_threads(2, 1)
    mni, mni_mask = tp.builtin_mni(4.0)
    raw = tp.TemplateInfo(mni, mni_mask, "builtin", tp.MNI_SPACE, "nilearn", tp.image_hash(mni))
    calls = []
    real = reg.n4_correct

    def counting(img):
        calls.append(time.time())
        return real(img)

    monkeypatch.setattr(reg, "n4_correct", counting)
    ctx = SimpleNamespace(output_dir=tmp_path / "out")
    results = _as_two_tasks(lambda: tp.n4_corrected_template(ctx, raw))
    assert len(calls) == 1
    assert len(list((tmp_path / "out" / "template").glob("tpl-MNI152NLin2009aSym-*_desc-n4_T1w.nii.gz"))) == 1
    a, b = results
    np.testing.assert_array_equal(a.image.numpy(), b.image.numpy())
    assert a.hash == b.hash != raw.hash and a.mask is raw.mask and (a.source, a.space) == ("builtin", tp.MNI_SPACE)
    assert a.image.shape == mni.shape and np.allclose(a.image.spacing, mni.spacing)
    brain = (mni_mask.numpy() > 0.5) & (mni.numpy() > 0.1 * mni.numpy().max())
    ratio = a.image.numpy()[brain] / mni.numpy()[brain]  # N4 also rescales: compare the shape
    assert np.ptp(np.percentile(ratio / np.median(ratio), [5, 95])) > 0.05  # N4 changed it (0.87-1.17 measured)
    tp.n4_corrected_template(ctx, raw)  # a later run reuses the file
    assert len(calls) == 1
