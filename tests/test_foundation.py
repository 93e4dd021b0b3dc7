"""Config loading/validation, atomic writes, provenance, progress reporting."""
import json
import logging
import multiprocessing as mp

import pytest

from mmfusion import __version__
from mmfusion.io.atomic import atomic_path, write_text_once
from mmfusion.config import config_hash, default_config, load_config
from mmfusion.errors import ConfigError
from mmfusion.provenance import Provenance, sha256_file
from mmfusion.runlog import progress


def test_defaults_are_the_paper():
    cfg = default_config()
    assert cfg["model"]["filters"] == [2, 4, 8, 16, 32]
    assert cfg["model"]["kernel_size"] == [5, 6, 5]
    # the paper's 96x128x96 brain-filling input (its code cropped to the brain's bounding box)
    assert cfg["spatial"]["grid_shape"] == [96, 128, 96] and cfg["spatial"]["grid_voxel_size"] == "auto"
    assert cfg["model"]["input_shape"] == [96, 128, 96]
    assert cfg["normalization"]["lower_percentile"] == 0.1 and cfg["normalization"]["upper_percentile"] == 99.9
    assert cfg["training"]["cv_folds"] == 10 and cfg["training"]["learning_rate"] == 1e-3
    assert cfg["stats"]["n_permutations"] == 10000


def test_user_config_overrides_and_validates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 3\n  learning_rate: 1\n")
    cfg = load_config(path)
    assert cfg["training"]["epochs"] == 3 and cfg["training"]["learning_rate"] == 1
    assert cfg["model"] == default_config()["model"]
    assert config_hash(cfg) != config_hash(default_config())
    path.write_text("nosuchsection:\n  a: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'nosuchsection'"):
        load_config(path)
    path.write_text("training: [1, 2]\n")
    with pytest.raises(ConfigError, match="'training' must be a mapping"):
        load_config(path)
    path.write_text("training:\n  epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz")
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def _race(args):
    path, text = args
    return write_text_once(path, text)


def test_write_text_once_under_concurrency(tmp_path):
    target = tmp_path / "dataset_description.json"
    with mp.get_context("fork").Pool(4) as pool:
        created = pool.map(_race, [(target, f"writer {i}\n" * 1000) for i in range(16)])
    assert sum(created) == 1
    text = target.read_text()
    assert len(set(text.splitlines())) == 1 and len(text.splitlines()) == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["dataset_description.json"]


def test_provenance_records_everything(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("data")
    prov = Provenance("participant-x", "participant", ["mmfusion", "a"], default_config(), 7)
    prov.add_inputs([inp])
    data = json.loads(prov.write(tmp_path / "logs").read_text())
    assert data["mmfusion_version"] == __version__ and data["seed"] == 7
    assert data["inputs"][str(inp.resolve())] == sha256_file(inp)
    assert data["config"]["model"]["filters"] == [2, 4, 8, 16, 32]
    assert data["libraries"]["numpy"] != "not installed"


def test_progress_logs_plain_lines_in_batch(caplog, monkeypatch):
    monkeypatch.setenv("MMFUSION_PLAIN_PROGRESS", "1")
    logger = logging.getLogger("mmfusion.test_progress")
    logger.propagate = True
    with caplog.at_level(logging.INFO, logger="mmfusion.test_progress"):
        assert list(progress(range(5), "steps", every_s=0.0, logger=logger)) == list(range(5))
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[-1].startswith("steps: 5/5 (100%)") and len(msgs) == 5


def test_atomic_outputs_get_umask_permissions_not_mkstemp_0600(tmp_path):
    """Shards, reports and sidecars must be readable by the group like open()'d files."""
    import stat

    from mmfusion.io import atomic

    expected_file = 0o666 & ~atomic.UMASK
    with atomic.atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == expected_file
    assert write_text_once(tmp_path / "b.txt", "y")
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == expected_file
    with atomic.atomic_dir(tmp_path / "d") as folder:
        (folder / "f").write_text("z")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~atomic.UMASK


def test_reuse_existing_skips_redoes_or_refuses(tmp_path):
    from mmfusion.errors import StaleOutputError
    from mmfusion.provenance import reuse_existing

    expected = {"config_hash": "a", "inputs": {"t1": "h1"}}
    out = tmp_path / "shard.h5"
    assert reuse_existing(out, None, expected, False, "fix") is False          # nothing yet
    assert reuse_existing(out, dict(expected), expected, False, "fix") is True  # same: skip
    assert reuse_existing(out, {"config_hash": "b"}, expected, True, "fix") is False  # --force
    with pytest.raises(StaleOutputError, match=r"shard.h5: .*different config_hash, inputs; pass --force"):
        reuse_existing(out, {"config_hash": "b"}, expected, False, "pass --force")
