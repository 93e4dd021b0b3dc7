"""Population robust min-max: exact streaming percentiles, fit on training subjects only."""
import json

import numpy as np
import pytest

from mmfusion.learning import intensity as nm
from mmfusion.errors import InputDataError


def _volumes(n=5, shape=(12, 10, 8), seed=0):
    rng = np.random.default_rng(seed)
    vols = []
    for i in range(n):
        v = rng.gamma(2.0, 3.0 + i, shape).astype(np.float32)
        v[rng.random(shape) < 0.4] = 0.0      # many ties at 0, like background
        vols.append(v)
    return vols


@pytest.mark.parametrize("bins,collect_max", [(65536, 1 << 22), (16, 1 << 22), (16, 50), (4, 1)])
def test_streaming_percentiles_equal_numpy(monkeypatch, bins, collect_max):
    monkeypatch.setattr(nm, "_COLLECT_MAX", collect_max)
    vols = _volumes()
    allv = np.concatenate([v.ravel() for v in vols]).astype(np.float64)
    ps = [0.0, 0.1, 37.5, 50.0, 99.9, 100.0]
    got = nm.streaming_percentiles(lambda: iter(vols), ps, allv.size, allv.min(), allv.max(), bins)
    np.testing.assert_allclose(got, np.percentile(allv, ps), rtol=1e-12, atol=0)


def test_streaming_percentiles_reads_one_volume_at_a_time_in_few_passes():
    vols = _volumes(n=4)
    passes = []

    def chunks():
        passes.append(1)
        for v in vols:
            yield v

    allv = np.concatenate([v.ravel() for v in vols])
    nm.streaming_percentiles(chunks, [0.1, 99.9], allv.size, float(allv.min()), float(allv.max()))
    assert 1 <= len(passes) <= 3


def _fit(vols, names, **kw):
    store = {(f"/x/sub-{i:02d}.h5", m): v for i, v in enumerate(vols) for m in ("jac",)}
    paths = [f"/x/sub-{i:02d}.h5" for i in names]
    norm = nm.PopulationNormalizer(**kw).fit(paths, ["jac"], lambda p, m: store[(str(p), m)])
    return norm


def test_fit_uses_only_the_given_training_subjects_and_maps_percentiles():
    vols = _volumes(n=4)
    vols[3] = vols[3] * 100.0                 # an outlier subject kept out of training
    norm = _fit(vols, [0, 1, 2])
    train = np.concatenate([v.ravel() for v in vols[:3]]).astype(np.float64)
    low, high = np.percentile(train, [0.1, 99.9])
    assert norm.ranges["jac"] == pytest.approx((low, high), rel=1e-12)
    assert norm.fitted_on == ["sub-00", "sub-01", "sub-02"]
    out = norm.transform(vols[3], "jac")
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() == 1.0
    probe = np.array([low, high, (low + high) / 2, high * 10, low - 5], np.float32)
    np.testing.assert_allclose(norm.transform(probe, "jac"), [0, 1, 0.5, 1, 0], atol=1e-6)


def test_save_load_roundtrip(tmp_path):
    norm = _fit(_volumes(n=2), [0, 1])
    path = norm.save(tmp_path / "normalization.json")
    again = nm.PopulationNormalizer.load(path)
    assert again.ranges == norm.ranges and again.fitted_on == norm.fitted_on
    assert json.loads(path.read_text())["lower_percentile"] == 0.1
    x = _volumes(n=1, seed=5)[0]
    np.testing.assert_array_equal(again.transform(x, "jac"), norm.transform(x, "jac"))


def test_constant_modality_is_refused_and_bad_file_named(tmp_path):
    with pytest.raises(InputDataError, match="jac"):
        _fit([np.ones((4, 4, 4), np.float32)] * 2, [0, 1])
    bad = tmp_path / "normalization.json"
    bad.write_text("{}")
    with pytest.raises(InputDataError, match="normalization.json"):
        nm.PopulationNormalizer.load(bad)
