"""BatchNormalization for 5D volumes with one fused kernel in training (TensorFlow).

Keras 3's :class:`keras.layers.BatchNormalization` computes the batch statistics and the
normalization with separate element-wise ops (mean, squared difference, mean, multiply,
add) and differentiates through all of them, and the float32 gradient of ``gamma``
loses most of its digits to cancellation (sum over 1.6 M voxels at 128x128x96).
TensorFlow's ``FusedBatchNormV3`` does the same computation in one forward and one
backward kernel (oneDNN on CPU, cuDNN on GPU), faster and with a more accurate ``gamma``
gradient, but only for 4D tensors on oneDNN. A 5D tensor (B, d1, d2, d3, C) is reshaped, without a copy, to the 4D
(B, d1*d2, d3, C): the statistics are over every axis but C in both, so the result is the
same. ``bench/bench_batchnorm.py`` prints both timings side by side at every shape of
the paper model: the fused kernel wins from 4 channels and 65536 values per sample and
loses below (oneDNN pads the channels to its vector width; on the smallest grids the
fixed per-call cost dominates), so it is used only there (numbers: docs/performance.md,
"Fused BatchNorm").

:class:`BatchNorm3D` is a ``keras.layers.BatchNormalization`` (same weights, same
config, same inference path, same moving-average update with the biased batch variance);
only its training forward on the TensorFlow backend changes. Anything the fused kernel
doesn't cover falls back to the Keras code: other backends (JAX, torch), inference,
``synchronized=True`` (statistics over all replicas), masks, renorm, a channel axis other
than the last, epsilon < 1.001e-5 (the fused kernel's minimum), inputs that are not 5D,
fewer than 4 channels or 65536 values per sample (where the fused kernel is slower).
"""
from __future__ import annotations

import math

import keras

_FUSED_MIN_EPSILON = 1.001e-5  # tf.nn.fused_batch_norm raises smaller epsilons to this
_FUSED_MIN_CHANNELS = 4        # measured (bench/bench_batchnorm.py): slower below
_FUSED_MIN_VALUES = 65536      # d1*d2*d3*C per sample; measured: slower below


@keras.saving.register_keras_serializable(package="mmfusion")
class BatchNorm3D(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` over the last axis of (B, d1, d2, d3, C).

    Same arguments and weights (gamma, beta, moving_mean, moving_variance: (C,)) as the
    Keras layer. In training on the TensorFlow backend the output is computed by one
    fused kernel (see the module docstring); the moving statistics are updated exactly
    like Keras does: ``moving = moving * momentum + batch * (1 - momentum)`` with the
    biased (divide by N) batch variance, N = B*d1*d2*d3 voxels.
    """

    def _use_fused(self, inputs, training, mask) -> bool:
        rank = len(inputs.shape)
        return (
            keras.backend.backend() == "tensorflow"
            and bool(training)
            and self.trainable
            and mask is None
            and not self.synchronized
            and not self.renorm
            and rank == 5
            and self.axis in (-1, rank - 1)
            and self.epsilon >= _FUSED_MIN_EPSILON
            and None not in inputs.shape[1:]
            and int(inputs.shape[-1]) >= _FUSED_MIN_CHANNELS
            and math.prod(int(v) for v in inputs.shape[1:]) >= _FUSED_MIN_VALUES
        )

    def call(self, inputs, training=None, mask=None):
        if not self._use_fused(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        channels = int(inputs.shape[-1])
        x = tf.cast(inputs, "float32")
        shape = tf.shape(x)
        x4 = tf.reshape(x, [shape[0], shape[1] * shape[2], shape[3], channels])
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
        y4, mean, unbiased_var = tf.compat.v1.nn.fused_batch_norm(
            x4, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
        )
        count = tf.cast(tf.size(x4) // channels, "float32")
        variance = unbiased_var * (count - 1.0) / count  # Keras' moments: divide by N
        self.moving_mean.assign(
            tf.cast(self.moving_mean, "float32") * self.momentum + mean * (1.0 - self.momentum)
        )
        self.moving_variance.assign(
            tf.cast(self.moving_variance, "float32") * self.momentum
            + variance * (1.0 - self.momentum)
        )
        return tf.cast(tf.reshape(y4, shape), self.compute_dtype)
