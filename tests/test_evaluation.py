"""Reconstruction metrics: MSE, NormDiff (background rules), CNR (ROI pairs), fold summaries."""
import numpy as np
import pandas as pd
import pytest

from mmfusion.learning import metrics as ev


def test_mse_is_mean_squared_difference():
    real = np.zeros((4, 4, 3))
    rec = np.zeros((4, 4, 3))
    rec[0, 0, 0] = 2.0
    assert ev.mse(real, rec) == pytest.approx(4.0 / 48)


def test_norm_diff_median_excludes_background_and_zero_sum_voxels():
    real = np.full((4, 4, 3), 0.2)
    rec = 2 * real                          # (0.4 - 0.2) / 0.6 = 1/3 everywhere
    brain = np.zeros(real.shape, bool)
    brain[:2] = True
    rec[2:] = 0.9                           # outside the brain: must not count
    real[0, 0, 0] = rec[0, 0, 0] = 0.0      # 0/0 inside the brain: excluded
    bg = ev.background_mask(real, rec, brain, "mask")
    assert ev.norm_diff(real, rec, bg) == pytest.approx(1 / 3)


def test_threshold_background_needs_both_images_low():
    real = np.array([[[0.0, 0.0, 0.5]]])
    rec = np.array([[[0.0, 0.3, 0.0]]])
    bg = ev.background_mask(real, rec, None, "threshold", 0.0)
    assert bg.tolist() == [[[True, False, False]]]
    assert ev.norm_diff(real, rec, bg) == pytest.approx(0.0)  # median of (+1, -1)


def test_norm_diff_all_background_is_nan():
    img = np.ones((2, 2, 2))
    assert np.isnan(ev.norm_diff(img, img, np.ones(img.shape, bool)))


def test_roi_blocks_cut_regular_grid_and_drop_remainder():
    img = np.arange(9 * 8 * 7, dtype=float).reshape(9, 8, 7)
    blocks = ev.roi_blocks(img, (4, 4, 3))
    assert blocks.shape == (2 * 2 * 2, 48)
    np.testing.assert_array_equal(np.sort(blocks[0]), np.sort(img[:4, :4, :3].ravel()))
    np.testing.assert_array_equal(np.sort(blocks[-1]), np.sort(img[4:8, 4:8, 3:6].ravel()))


def test_roi_pairs_are_seeded_distinct_and_avoid_background():
    bg = np.zeros((16, 16, 12), bool)
    bg[:8] = True                            # half the ROIs are background
    pairs = ev.sample_roi_pairs(bg, (4, 4, 3), 500, seed=3, key="sub-01_jac")
    assert pairs.shape == (500, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    frac = ev.roi_blocks(bg.astype(float)).mean(axis=1)
    assert (frac[pairs.ravel()] <= 0.5).all()
    np.testing.assert_array_equal(pairs, ev.sample_roi_pairs(bg, (4, 4, 3), 500, 3, "sub-01_jac"))
    assert not np.array_equal(pairs, ev.sample_roi_pairs(bg, (4, 4, 3), 500, 3, "sub-02_jac"))
    with pytest.raises(ValueError):
        ev.sample_roi_pairs(np.ones_like(bg), (4, 4, 3), 10, 0, "x")


def test_cnr_matches_hand_computation():
    img = np.zeros((8, 4, 3))
    img[:4] = np.tile([0.0, 1.0], 24).reshape(4, 4, 3)   # ROI 0: mean 0.5
    img[4:] = 2.0                                          # ROI 1: constant 2
    pairs = np.array([[0, 1]])
    union = np.concatenate([img[:4].ravel(), img[4:].ravel()])
    assert ev.median_cnr(img, pairs) == pytest.approx(1.5 / union.std())


def test_cnr_norm_diff_zero_for_affine_copy_and_negative_with_noise():
    rng = np.random.default_rng(0)
    real = rng.random((16, 16, 12))
    pairs = ev.sample_roi_pairs(np.zeros(real.shape, bool), (4, 4, 3), 200, 0, "k")
    assert ev.cnr_norm_diff(real, 0.5 * real + 0.2, pairs) == pytest.approx(0.0, abs=1e-12)
    smooth = np.repeat(np.repeat(np.linspace(0, 1, 4), 4), 1)[:, None, None] * np.ones((16, 16, 12))
    noisy = smooth + 0.3 * rng.random(real.shape)      # noise lowers the contrast-to-noise ratio
    assert ev.cnr_norm_diff(smooth, noisy, pairs) < -0.02
    flat = np.full(real.shape, real.mean())
    assert ev.cnr_norm_diff(real, flat, pairs) == pytest.approx(-1.0)   # no contrast left


def test_summary_is_median_and_mad_of_fold_medians():
    rows = []
    for fold, values in {1: [1.0, 2.0, 3.0], 2: [4.0, 4.0], 3: [10.0]}.items():
        rows += [{"metric": "mse", "fold": fold, "modality": "jac", "variant": "with_skips", "value": v}
                 for v in values]
    out = ev.summarize_across_folds(pd.DataFrame(rows))
    assert len(out) == 1
    assert out.median_across_folds.iloc[0] == pytest.approx(4.0)      # fold medians 2, 4, 10
    assert out.mad_across_folds.iloc[0] == pytest.approx(2.0)         # |2-4|, 0, |10-4| -> 2
