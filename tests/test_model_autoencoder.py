"""The multimodal autoencoder: paper shapes, parameter saving, small-config training,
1..M modalities, skips on/off, config validation, save/load, mixed precision, loss."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from mmfusion.config import default_config
from mmfusion.errors import ConfigError
from mmfusion.model.autoencoder import (
    build_autoencoder,
    compile_autoencoder,
    embedding_model,
)
from mmfusion.model.blocks import BlockSettings, mid_flow_block
from mmfusion.model.layers import SeparableConv3D

SMALL = {"input_shape": [32, 32, 24], "levels": 3, "filters": [2, 4, 8],
         "kernel_size": [3, 3, 3], "embedding_filters": 8}
TINY = {"input_shape": [16, 16, 8], "levels": 2, "filters": [2, 4],
        "kernel_size": [3, 3, 3], "embedding_filters": 4}


def _cfg(**overrides):
    cfg = copy.deepcopy(default_config()["model"])
    cfg.update(overrides)
    return cfg


def _inputs(model, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.random((batch,) + tuple(t.shape[1:]), dtype=np.float32)
            for name, t in model.input.items()}


def test_default_config_is_the_paper_model_shapes():
    model = build_autoencoder(_cfg(), ["JAC", "NDI"])
    assert set(model.input) == {"in_JAC", "in_NDI"}
    assert all(tuple(t.shape) == (None, 96, 128, 96, 1) for t in model.input.values())
    assert set(model.output) == {"rec_JAC", "rec_NDI"}
    assert all(tuple(t.shape) == (None, 96, 128, 96, 1) for t in model.output.values())
    for mod in ("JAC", "NDI"):  # each modality's code: 3x4x3x32 = 1152 values
        code = model.get_layer(f"enc_{mod}_l4_down_pool").output
        assert tuple(code.shape) == (None, 3, 4, 3, 32)
        assert int(np.prod(code.shape[1:])) == 1152
    assert tuple(model.get_layer("embedding").output.shape) == (None, 3, 4, 3, 32)
    assert model.get_layer("fusion_conv").kernel_size == (3, 4, 3)
    assert tuple(embedding_model(model).output.shape) == (None, 1152)
    seps = [layer for layer in model.layers if isinstance(layer, SeparableConv3D)]
    assert len(seps) == 2 * 2 * 5 * 3  # (enc + dec) x modalities x levels x 3
    assert all(layer.kernel_size == (5, 6, 5) for layer in seps)


def _mid_flow_params(separable: bool, channels: int) -> int:
    inp = keras.Input((8, 8, 6, channels))
    settings = BlockSettings(kernel_size=(5, 6, 5), separable=separable)
    return keras.Model(inp, mid_flow_block(inp, settings, "mf")).count_params()


def test_separable_mid_flow_has_20x_fewer_parameters():
    for channels in (32, 64):  # deepest encoder / decoder mid-flow of the paper model
        dense, sep = _mid_flow_params(False, channels), _mid_flow_params(True, channels)
        assert dense / sep >= 20, (channels, dense, sep)
    # the paper's model (with skips): the decoders' mid-flows then see the concatenated skips
    whole_dense = build_autoencoder(_cfg(separable=False, skip_connections=True), ["JAC", "NDI"]).count_params()
    whole_sep = build_autoencoder(_cfg(skip_connections=True), ["JAC", "NDI"]).count_params()
    assert whole_sep < whole_dense / 3  # conv/up/down blocks stay dense (docs/method.md#separable-convolutions)


def _np(tensors):
    return {k: np.asarray(v) for k, v in tensors.items()}


@pytest.mark.parametrize("small,modalities,eager", [
    (SMALL, ["T1w"], False),            # graph mode (tf.function), the real training path
    (TINY, ["JAC", "NDI", "FA"], True),  # eager: no tracing, keeps the suite fast
])
def test_small_model_trains_and_outputs_probabilities(small, modalities, eager):
    model = compile_autoencoder(build_autoencoder(_cfg(**small), modalities), 1e-3)
    model.run_eagerly = eager
    x = _inputs(model, batch=2)
    y = {name.replace("in_", "rec_"): v for name, v in x.items()}
    history = model.fit(x, y, epochs=4, batch_size=2, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    out = _np(model(x, training=False))
    assert set(out) == {f"rec_{m}" for m in modalities}
    for rec in out.values():
        assert rec.shape == (2, *small["input_shape"], 1) and rec.dtype == np.float32
        assert rec.min() >= 0 and rec.max() <= 1
    emb = np.asarray(embedding_model(model)(x, training=False))
    bottom = [d // 2 ** small["levels"] for d in small["input_shape"]]
    assert emb.shape == (2, int(np.prod(bottom)) * small["embedding_filters"])


def test_loss_is_bce_summed_over_modalities():
    model = compile_autoencoder(build_autoencoder(_cfg(**SMALL, l2=0.0), ["A", "B"]))
    x = _inputs(model, seed=1)
    y = {"rec_A": x["in_A"], "rec_B": x["in_B"]}
    model.run_eagerly = True
    pred = _np(model(x, training=False))
    bce = keras.losses.BinaryCrossentropy()
    expected = sum(float(bce(y[k], pred[k])) for k in y)
    loss = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(expected, rel=1e-4)


def test_skip_connections_switch():
    on = build_autoencoder(_cfg(**SMALL, skip_connections=True), ["A", "B"])
    off = build_autoencoder(_cfg(**SMALL, skip_connections=True), ["A", "B"], skip_connections=False)
    off_cfg = build_autoencoder(_cfg(**SMALL), ["A", "B"])  # the default: no skips
    assert default_config()["model"]["skip_connections"] is False
    skip_layers = [layer.name for layer in on.layers if layer.name.endswith("_skip")]
    assert len(skip_layers) == 2 * 3
    assert not [layer for layer in off.layers if layer.name.endswith("_skip")]
    assert off.count_params() == off_cfg.count_params() < on.count_params()
    # without skips the reconstructions depend on the inputs only through the embedding
    emb = off.get_layer("embedding").output
    decoder = keras.Model(emb, off.output)
    assert set(decoder.output) == {"rec_A", "rec_B"}
    with pytest.raises(ValueError):  # with skips the decoders also need the encoders
        keras.Model(on.get_layer("embedding").output, on.output)


def _kernel_initializers(model) -> set[str]:
    names = set()
    for layer in model.layers:
        for attr in ("kernel_initializer", "depthwise_initializer", "pointwise_initializer"):
            init = getattr(layer, attr, None)
            if init is not None:
                names.add(type(init).__name__)
    return names


def test_kernel_initializer_reaches_every_convolution():
    glorot = build_autoencoder(_cfg(**SMALL), ["A", "B"])
    he = build_autoencoder(_cfg(**SMALL, kernel_initializer="he_normal"), ["A", "B"])
    assert default_config()["model"]["kernel_initializer"] == "glorot_uniform"
    assert _kernel_initializers(glorot) == {"GlorotUniform"}
    assert _kernel_initializers(he) == {"HeNormal"}
    assert he.count_params() == glorot.count_params()


def test_fusion_dropout_feeds_the_decoders_not_the_embedding():
    # block dropout off, so in training the fusion Dropout is the only random layer
    plain = build_autoencoder(_cfg(**SMALL, dropout=0.0), ["A", "B"])
    dropped = build_autoencoder(_cfg(**SMALL, dropout=0.0, fusion_dropout=0.5), ["A", "B"])
    assert default_config()["model"]["fusion_dropout"] == 0.0
    assert "fusion_drop" not in [layer.name for layer in plain.layers]
    drop = dropped.get_layer("fusion_drop")
    assert drop.rate == 0.5 and drop.input is dropped.get_layer("embedding").output
    x = _inputs(dropped, seed=3)
    emb = embedding_model(dropped)
    np.testing.assert_array_equal(np.asarray(emb(x, training=True)), np.asarray(emb(x, training=True)))
    assert not np.allclose(_np(dropped(x, training=True))["rec_A"], _np(dropped(x, training=True))["rec_A"])
    np.testing.assert_array_equal(_np(plain(x, training=True))["rec_A"], _np(plain(x, training=True))["rec_A"])


@pytest.mark.parametrize("overrides,match", [
    ({"input_shape": [30, 32, 24]}, "divisible by 2\\*\\*levels"),
    ({"filters": [2, 4]}, "one value per level"),
    ({"kernel_size": [3, 3]}, "3 values"),
    ({"dropout": 1.0}, "dropout"),
    ({"fusion_dropout": -0.1}, "fusion_dropout"),
    ({"kernel_initializer": "zeros"}, "kernel_initializer"),
    ({"levels": 0}, "levels"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_autoencoder(_cfg(**{**SMALL, **overrides}), ["A"])


def test_modality_errors():
    with pytest.raises(ConfigError, match="at least one"):
        build_autoencoder(_cfg(**SMALL), [])
    with pytest.raises(ConfigError, match="only once"):
        build_autoencoder(_cfg(**SMALL), ["A", "A"])
    assert issubclass(ConfigError, Exception)


def test_save_load_round_trip(tmp_path):
    model = build_autoencoder(_cfg(**SMALL), ["JAC", "NDI"])
    x = _inputs(model, seed=2)
    before = _np(model(x))
    path = tmp_path / "ae.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = _np(loaded(x))
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(embedding_model(loaded)(x)),
                               np.asarray(embedding_model(model)(x)), rtol=1e-5, atol=1e-6)
    # a fresh interpreter that only imports mmfusion.model can load it
    code = ("import mmfusion.model, keras; m = keras.models.load_model(r'%s'); "
            "print(m.get_layer('embedding').output.shape)" % path)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(None, 4, 4, 3, 8)" in run.stdout


def test_mixed_bfloat16_trains_with_float32_outputs():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = compile_autoencoder(build_autoencoder(_cfg(**TINY), ["A"]))
        sep = [layer for layer in model.layers if isinstance(layer, SeparableConv3D)][0]
        assert sep.compute_dtype == "bfloat16" and sep.variable_dtype == "float32"
        x = _inputs(model, seed=3)
        model.run_eagerly = True
        out = np.asarray(model(x)["rec_A"])
        assert out.dtype == np.float32 and np.isfinite(out).all()
        history = model.fit(x, {"rec_A": x["in_A"]}, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_builds_float16_layers_and_float32_outputs():
    # TensorFlow has no float16 MaxPool3D kernel on CPU, so mixed_float16 only runs on
    # GPUs; here we check the graph: float16 compute, float32 variables and outputs.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_autoencoder(_cfg(**TINY), ["A", "B"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    seps = [layer for layer in model.layers if isinstance(layer, SeparableConv3D)]
    assert seps and all(layer.compute_dtype == "float16" for layer in seps)
    assert all(w.dtype == "float32" for w in model.weights)
    assert model.get_layer("embedding").output.dtype == "float16"
    assert all(t.dtype == "float32" for t in model.output.values())
