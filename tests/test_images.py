"""Input validation: unreadable/empty/4D/NaN/mismatched NIfTIs, missing T1w."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from mmfusion.errors import InputDataError, MissingInputError
from mmfusion.io.images import check_same_space, fov_overlap, load_3d, load_subject_inputs, zero_nonfinite


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def t1(tmp_path):
    rng = np.random.default_rng(0)
    return _save(tmp_path / "sub-01_T1w.nii.gz", rng.uniform(1, 2, (8, 9, 10)))


def test_valid_3d_loads_as_float32(t1):
    img = load_3d(t1, "T1w")
    assert img.shape == (8, 9, 10) and img.get_data_dtype() == np.float32


def test_trailing_singleton_4th_dim_is_accepted(tmp_path):
    img = load_3d(_save(tmp_path / "a.nii.gz", np.ones((4, 4, 4, 1))), "FA")
    assert img.shape == (4, 4, 4)


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "sub-01_T1w.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti"))
    with pytest.raises(InputDataError, match="sub-01_T1w.nii.gz: cannot read T1w") as err:
        load_3d(bad, "T1w")
    assert err.value.exit_code == 65 and "\n" not in str(err.value)


def test_zero_byte_file_is_unreadable(tmp_path):
    bad = tmp_path / "empty.nii.gz"
    bad.write_bytes(b"")
    with pytest.raises(InputDataError, match="empty.nii.gz"):
        load_3d(bad, "T1w")


def test_empty_image(tmp_path):
    with pytest.raises(InputDataError, match="no nonzero finite voxel"):
        load_3d(_save(tmp_path / "zeros.nii.gz", np.zeros((4, 4, 4))), "T1w")


def test_4d_image_is_refused(tmp_path):
    with pytest.raises(InputDataError, match="must be a 3D image, got shape \\(4, 4, 4, 3\\)"):
        load_3d(_save(tmp_path / "dwi.nii.gz", np.ones((4, 4, 4, 3))), "FA")


def test_missing_file(tmp_path):
    with pytest.raises(MissingInputError, match="nope.nii.gz: FA file not found") as err:
        load_3d(tmp_path / "nope.nii.gz", "FA")
    assert err.value.exit_code == 66


def test_nonfinite_set_to_zero_and_counted():
    data = np.ones((3, 3, 3), np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    clean, n = zero_nonfinite(nib.Nifti1Image(data, np.eye(4)))
    assert n == 3
    arr = clean.get_fdata()
    assert np.isfinite(arr).all() and arr[0, 0, 0] == 0 and arr[0, 1, 0] == 1


def test_map_outside_the_t1w_space_names_both_files(tmp_path, t1):
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[:3, 3] = [6.0, 0.0, 0.0]  # 6 of 8 mm along x: 25% overlap
    fa = _save(tmp_path / "fa.nii.gz", np.ones((8, 9, 10)), shifted)
    with pytest.raises(InputDataError, match="fa.nii.gz: FA field of view .* covers 25% of the T1w .*sub-01_T1w"):
        check_same_space(load_3d(fa, "FA"), fa, load_3d(t1, "T1w"), t1, "FA")


def test_coarser_map_in_t1w_space_is_accepted_and_flagged(tmp_path, t1):
    """QSIRecon space-T1w maps come at the diffusion resolution: same world box, other grid."""
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 0.5  # voxel centres of a 2 mm grid over the 1 mm T1w box
    fa = _save(tmp_path / "sub-01_space-T1w_fa.nii.gz", np.ones((4, 5, 5)), coarse)
    assert fov_overlap(load_3d(fa, "FA"), load_3d(t1, "T1w")) > 0.9
    assert check_same_space(load_3d(fa, "FA"), fa, load_3d(t1, "T1w"), t1, "FA") is True
    _, _, qc = load_subject_inputs(t1, {"fa": fa}, "sub-01")
    assert qc["regridded_fa"] == 1


def test_acpc_map_on_another_grid_is_refused(tmp_path, t1):
    fa = _save(tmp_path / "sub-01_space-ACPC_fa.nii.gz", np.ones((4, 5, 5)), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(InputDataError, match="space-ACPC .* use the AC-PC T1w"):
        check_same_space(load_3d(fa, "FA"), fa, load_3d(t1, "T1w"), t1, "FA")


def test_subject_inputs_count_nonfinite_maps(tmp_path, t1):
    fa = np.full((8, 9, 10), 0.5, np.float32)
    fa[:2, 0, 0] = np.nan
    path = _save(tmp_path / "fa.nii.gz", fa)
    _, maps, qc = load_subject_inputs(t1, {"fa": path, "ndi": None}, "sub-01")
    assert set(maps) == {"fa"} and qc["nonfinite_fa"] == 2 and qc["nonfinite_t1"] == 0
    assert qc["regridded_fa"] == 0
    assert np.isfinite(maps["fa"].get_fdata()).all()


def test_no_t1w_is_missing_input():
    with pytest.raises(MissingInputError, match="sub-07: no T1w image found"):
        load_subject_inputs(None, {}, "sub-07")
