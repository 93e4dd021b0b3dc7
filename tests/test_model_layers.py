"""DepthwiseConv3D / SeparableConv3D: equal to dense Conv3D references, gradients too,
every implementation, serialization, mixed precision."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmfusion.model import layers as L
from mmfusion.model.layers import DepthwiseConv3D, SeparableConv3D

IMPLS = ["dense", "sliced", "split", "grouped", "numba"]
TOL = dict(rtol=1e-5, atol=1e-5)


def _block_diag(kernel: np.ndarray) -> np.ndarray:
    kd, kh, kw, c, m = kernel.shape
    dense = np.zeros((kd, kh, kw, c, c * m), kernel.dtype)
    for ch in range(c):
        dense[..., ch, ch * m:(ch + 1) * m] = kernel[..., ch, :]
    return dense


def _data(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).random(shape, dtype=np.float32))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding,mult,kernel", [("same", 1, (5, 6, 5)), ("valid", 2, (3, 4, 3))])
def test_depthwise_equals_block_diagonal_dense_conv_with_gradients(impl, padding, mult, kernel):
    x = _data((2, 7, 8, 6, 3))
    layer = DepthwiseConv3D(kernel, depth_multiplier=mult, padding=padding,
                            bias_initializer="random_normal", implementation=impl)
    layer.build(x.shape)
    dense_kernel = tf.constant(_block_diag(layer.depthwise_kernel.numpy()))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        tape.watch(dense_kernel)
        ours = layer(x)
        ref = tf.nn.conv3d(x, dense_kernel, [1] * 5, padding.upper()) + layer.bias
        weights = tf.reshape(tf.range(tf.size(ref), dtype=tf.float32) % 7 - 3.0, ref.shape)
        loss_ours = tf.reduce_sum(ours * weights)
        loss_ref = tf.reduce_sum(ref * weights)
    assert ours.shape == ref.shape == layer.compute_output_shape(x.shape)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), **TOL)
    np.testing.assert_allclose(tape.gradient(loss_ours, x).numpy(),
                               tape.gradient(loss_ref, x).numpy(), **TOL)
    g_ours = tape.gradient(loss_ours, layer.depthwise_kernel).numpy()
    g_dense = tape.gradient(loss_ref, dense_kernel).numpy()
    # the depthwise kernel's gradient is the dense gradient's block diagonal
    k = layer.depthwise_kernel.shape
    g_ref = np.stack([g_dense[..., c, c * mult:(c + 1) * mult] for c in range(k[3])], axis=3)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_separable_equals_dense_conv_with_folded_kernel_with_gradients(impl):
    x = _data((1, 8, 9, 7, 4), seed=1)
    layer = SeparableConv3D(5, (5, 6, 5), depth_multiplier=2, bias_initializer="random_normal",
                            implementation=impl)
    layer.build(x.shape)
    dw = layer.depthwise_kernel.numpy()
    pw = layer.pointwise_kernel.numpy()[0, 0, 0]
    folded = tf.constant(np.einsum("dhwcj,cjf->dhwcf", dw, pw.reshape(4, 2, 5)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = layer(x)
        ref = tf.nn.conv3d(x, folded, [1] * 5, "SAME") + layer.bias
        loss_ours = tf.reduce_sum(ours ** 2)
        loss_ref = tf.reduce_sum(ref ** 2)
    assert ours.shape == (1, 8, 9, 7, 5)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), **TOL)
    np.testing.assert_allclose(tape.gradient(loss_ours, x).numpy(),
                               tape.gradient(loss_ref, x).numpy(), rtol=1e-5, atol=1e-4)
    # weight gradients agree across implementations: compare with the "split" path
    grads = tape.gradient(loss_ours, layer.trainable_weights)
    ref_layer = SeparableConv3D.from_config({**layer.get_config(), "implementation": "split"})
    ref_layer.build(x.shape)
    ref_layer.set_weights(layer.get_weights())
    with tf.GradientTape() as tape2:
        loss2 = tf.reduce_sum(ref_layer(x) ** 2)
    for g, g2 in zip(grads, tape2.gradient(loss2, ref_layer.trainable_weights)):
        np.testing.assert_allclose(g.numpy(), g2.numpy(), rtol=1e-4, atol=1e-3)


def test_weight_layout_is_identical_across_implementations():
    shapes = set()
    for impl in IMPLS:
        layer = SeparableConv3D(3, (5, 6, 5), implementation=impl)
        layer.build((None, 8, 8, 8, 2))
        shapes.add(tuple(tuple(w.shape) for w in layer.weights))
    assert shapes == {((5, 6, 5, 2, 1), (1, 1, 1, 2, 3), (3,))}


def test_auto_heuristic_numba_on_cpu_float32_else_dense_for_few_channels_sliced_for_many():
    k = (5, 6, 5)
    for shape in [(1, 128, 128, 96, 2), (1, 16, 16, 12, 32), (None, 8, 8, 6, 64)]:
        assert L.choose_implementation(shape, k, 1, shape[-1]) == "numba"
        assert L.choose_implementation(shape, k) == "numba"
    for kwargs in [dict(device="gpu"), dict(dtype="bfloat16"), dict(dtype="float16")]:
        assert L.choose_implementation((1, 128, 128, 96, 2), k, 1, 2, **kwargs) == "dense"
        assert L.choose_implementation((1, 16, 16, 12, 32), k, 1, 32, **kwargs) == "dense"
        assert L.choose_implementation((1, 8, 8, 6, 64), k, 1, 64, **kwargs) == "sliced"
        assert L.choose_implementation((1, 8, 8, 6, 64), k, **kwargs) == "sliced"  # factor C
    assert L.dense_flop_factor(k, 64) == 64.0


def test_auto_heuristic_never_picks_tensorflow_only_path_on_other_backends(monkeypatch):
    k = (5, 6, 5)
    monkeypatch.setattr(L.keras.backend, "backend", lambda: "jax")
    assert L.choose_implementation((1, 8, 8, 6, 64), k, 1, 64) == "grouped"
    assert L.choose_implementation((1, 128, 128, 96, 2), k, 1, 2) == "dense"  # never numba

def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="implementation"):
        DepthwiseConv3D(3, implementation="fast")
    with pytest.raises(ValueError, match="padding"):
        SeparableConv3D(2, 3, padding="causal")
    with pytest.raises(ValueError, match="kernel_size"):
        DepthwiseConv3D((3, 3))


def _round_trip(model, x, tmp_path):
    """Save ``model`` as .keras and load it back: (loaded model, x, model's prediction of x)."""
    before = model.predict(x, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    return keras.models.load_model(path), x, before


def test_keras_file_round_trip(tmp_path):
    inp = keras.Input((8, 8, 6, 2))
    y = DepthwiseConv3D((3, 4, 3), depth_multiplier=2, implementation="sliced",
                        depthwise_regularizer=keras.regularizers.L2(1e-4))(inp)
    y = SeparableConv3D(3, (5, 6, 5), name="sep")(y)
    loaded, x, before = _round_trip(keras.Model(inp, y), _data((2, 8, 8, 6, 2), seed=3), tmp_path)
    assert isinstance(loaded.get_layer("sep"), SeparableConv3D)
    assert loaded.layers[1].implementation == "sliced"
    assert loaded.layers[1].get_config()["depthwise_regularizer"] is not None
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "sliced", "numba", "auto"])
def test_mixed_precision_policy(impl):
    x = _data((1, 8, 8, 6, 2), seed=4)
    ref = SeparableConv3D(4, 3, implementation=impl)
    ref.build(x.shape)
    layer = SeparableConv3D(4, 3, implementation=impl, dtype="mixed_bfloat16")
    layer.build(x.shape)
    layer.set_weights(ref.get_weights())
    out = layer(x)
    assert out.dtype == tf.bfloat16
    assert layer.depthwise_kernel.dtype == "float32"
    np.testing.assert_allclose(out.numpy().astype(np.float32), ref(x).numpy(), rtol=0.05, atol=0.05)


def test_sliced_custom_gradient_per_tap_filter_path_for_many_channels():
    channels = L.FILTER_GRAD_DENSE_MAX_CHANNELS + 2  # beyond the dense filter-gradient path
    x = _data((1, 6, 7, 5, channels), seed=5)
    kernel = tf.constant(np.random.default_rng(6).standard_normal((3, 4, 3, channels, 1)), tf.float32)
    dense_kernel = tf.constant(_block_diag(kernel.numpy()))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel, dense_kernel])
        ours = L.depthwise_conv3d(x, kernel, "same", "sliced")
        ref = tf.nn.conv3d(x, dense_kernel, [1] * 5, "SAME")
        loss_ours, loss_ref = tf.reduce_sum(ours ** 2), tf.reduce_sum(ref ** 2)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(loss_ours, x).numpy(),
                               tape.gradient(loss_ref, x).numpy(), rtol=1e-5, atol=1e-4)
    g_dense = tape.gradient(loss_ref, dense_kernel).numpy()
    g_ref = np.stack([g_dense[..., c, c] for c in range(channels)], axis=3)[..., None]
    np.testing.assert_allclose(tape.gradient(loss_ours, kernel).numpy(), g_ref, rtol=1e-4, atol=1e-3)


def test_numba_refuses_non_float32_in_the_functional_form():
    x = tf.cast(_data((1, 6, 6, 5, 2), seed=7), tf.bfloat16)
    kernel = tf.cast(tf.ones((3, 3, 3, 2, 1)), tf.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        L.depthwise_conv3d(x, kernel, "same", "numba")
    assert L.choose_implementation(x.shape, (3, 3, 3), 1, 4, dtype="bfloat16") == "dense"


def test_numba_forward_and_gradients_are_bit_identical_run_to_run(monkeypatch):
    """Fixed summation order: the same result twice, also with another thread count."""
    x = _data((2, 9, 10, 8, 4), seed=8)
    kernel = tf.constant(np.random.default_rng(9).standard_normal((5, 6, 5, 4, 1)), tf.float32)

    def run():
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            out = L.depthwise_conv3d(x, kernel, "same", "numba")
            loss = tf.reduce_sum(out * out)
        return [out.numpy()] + [g.numpy() for g in tape.gradient(loss, [x, kernel])]

    first = run()
    monkeypatch.setattr(L, "_thread_limit", lambda: 1)
    second = run()
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
    assert np.abs(first[2]).sum() > 0


def test_numba_layer_keras_file_round_trip(tmp_path):
    inp = keras.Input((8, 9, 6, 3))
    y = SeparableConv3D(4, (5, 6, 5), depth_multiplier=2, implementation="numba", name="sep")(inp)
    loaded, x, before = _round_trip(keras.Model(inp, y), _data((2, 8, 9, 6, 3), seed=10), tmp_path)
    assert loaded.get_layer("sep").implementation == "numba"
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
