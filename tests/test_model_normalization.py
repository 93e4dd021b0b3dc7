"""BatchNorm3D: the Keras BatchNormalization with a fused training kernel (TensorFlow)."""
import numpy as np
import keras
import pytest
import tensorflow as tf

from mmfusion.model import BatchNorm3D
from mmfusion.model.autoencoder import build_autoencoder
from mmfusion.config import default_config


SHAPE = (2, 16, 16, 64, 4)   # 65536 values per sample, 4 channels: the fused path


def _pair(channels=4, **kwargs):
    """A BatchNorm3D and a keras BatchNormalization with the same (non-trivial) weights."""
    ours, ref = BatchNorm3D(momentum=0.9, **kwargs), keras.layers.BatchNormalization(momentum=0.9, **kwargs)
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.3, channels),
               rng.normal(0, 0.2, channels), rng.uniform(0.5, 2, channels)]
    for layer in (ours, ref):
        layer.build((None, 6, 5, 4, channels))  # the weights don't depend on the grid
        keep = [kwargs.get("scale", True), kwargs.get("center", True), True, True]
        layer.set_weights([w.astype("float32") for w, k in zip(weights, keep) if k])
    return ours, ref


def _outputs_and_grads(layer, x, dy, training):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(y * dy)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [y.numpy()] + [g.numpy() for g in grads]


def test_fused_path_is_taken_and_matches_keras_in_training():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, SHAPE).astype("float32")
    dy = rng.normal(0, 1, x.shape).astype("float32")
    ours, ref = _pair()
    assert ours._use_fused(tf.constant(x), True, None)
    got = _outputs_and_grads(ours, x, dy, True)
    want = _outputs_and_grads(ref, x, dy, True)
    for name, a, b in zip(["y", "dx", "dgamma", "dbeta"], got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
    # moving statistics: Keras' update with the biased batch variance
    np.testing.assert_allclose(ours.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance.numpy(), ref.moving_variance.numpy(), rtol=1e-5)
    var = x.reshape(-1, 4).var(axis=0)                   # the update itself, independently
    before = _pair()[0].moving_variance.numpy()
    np.testing.assert_allclose(ours.moving_variance.numpy(), 0.9 * before + 0.1 * var, rtol=1e-5)


def test_inference_is_keras_and_training_normalizes_per_channel():
    rng = np.random.default_rng(2)
    x = rng.normal(5.0, 2.0, (1,) + SHAPE[1:]).astype("float32")
    ours, ref = _pair()
    np.testing.assert_array_equal(ours(x, training=False).numpy(), ref(x, training=False).numpy())
    ours, _ = _pair(center=False, scale=False)
    assert ours._use_fused(tf.constant(x), True, None)
    y = ours(x, training=True).numpy().reshape(-1, 4)
    var = x.reshape(-1, 4).var(0)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=0), np.sqrt(var / (var + 1e-3)), rtol=1e-4)


def test_gamma_gradient_more_accurate_than_keras_on_a_large_volume():
    # float32 cancellation in Keras' unfused gradient; the fused kernel keeps more digits
    rng = np.random.default_rng(3)
    x = rng.random((1, 64, 64, 48, 4), dtype=np.float32)
    dy = rng.random(x.shape, dtype=np.float32)
    ours, ref = _pair()
    g_ours = _outputs_and_grads(ours, x, dy, True)[2]
    g_ref = _outputs_and_grads(ref, x, dy, True)[2]
    x64, dy64 = x.astype(np.float64).reshape(-1, 4), dy.astype(np.float64).reshape(-1, 4)
    xhat = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3)
    exact = (dy64 * xhat).sum(0)
    assert np.abs(g_ours - exact).max() < np.abs(g_ref - exact).max()


@pytest.mark.parametrize("kwargs, shape", [
    (dict(synchronized=True), SHAPE),
    (dict(epsilon=1e-6), SHAPE),
    (dict(axis=1), (1, 4, 16, 16, 64)),
    (dict(), (2, 3)),
    (dict(), (1, 16, 16, 64, 2)),          # 2 channels: slower fused
    (dict(), (1, 8, 8, 8, 8)),             # 4096 values: slower fused
])
def test_unsupported_settings_fall_back_to_keras(kwargs, shape):
    layer = BatchNorm3D(**kwargs)
    x = tf.constant(np.random.default_rng(4).normal(size=shape).astype("float32"))
    layer.build(x.shape)
    assert not layer._use_fused(x, True, None)
    ref = keras.layers.BatchNormalization(**kwargs)
    ref.build(x.shape)
    np.testing.assert_allclose(layer(x, training=True).numpy(), ref(x, training=True).numpy(), rtol=1e-6)


def test_autoencoder_uses_it_and_round_trips(tmp_path):
    cfg = dict(default_config()["model"], input_shape=[16, 16, 8], levels=2, filters=[2, 4],
               kernel_size=[3, 3, 3], embedding_filters=4)
    model = build_autoencoder(cfg, ["JAC"])
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(type(layer) is BatchNorm3D for layer in bns)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert all(type(layer) is BatchNorm3D for layer in loaded.layers
               if isinstance(layer, keras.layers.BatchNormalization))
    x = {"in_JAC": np.random.default_rng(5).random((1, 16, 16, 8, 1), dtype=np.float32)}
    np.testing.assert_array_equal(model.predict(x, verbose=0)["rec_JAC"],
                                  loaded.predict(x, verbose=0)["rec_JAC"])
