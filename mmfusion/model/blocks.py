"""The building blocks of the autoencoder (docs/method.md#blocks), as functional helpers.

Every helper takes a 5D tensor ``(B, d1, d2, d3, C)`` and returns one, creating
standard Keras layers (plus :class:`~mmfusion.model.layers.SeparableConv3D`) named
``<name>_<part>`` so a saved model reloads with plain ``keras.models.load_model``.

* ``conv``      Conv3D(filters, kernel, 'same') -> BatchNorm -> ELU [-> Dropout]
* ``sep conv``  the same with SeparableConv3D (depthwise kernel, pointwise 1x1x1)
* ``mid-flow``  three ``sep conv`` (C -> C) in sequence + identity residual
* ``down conv`` ``conv`` + MaxPool3D(2): every spatial dimension halves
* ``up conv``   UpSampling3D(2) + ``conv``: every spatial dimension doubles

:class:`BlockSettings` carries what every block shares (kernel, dropout, L2, separable,
synchronized BatchNorm). :func:`batch_norm` is the one BatchNormalization every block
(and the fusion block) uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras

from mmfusion.model.layers import SeparableConv3D
from mmfusion.model.batchnorm import BatchNorm3D


@dataclass(frozen=True)
class BlockSettings:
    """Shared block options.

    Attributes:
        kernel_size: ``(kd, kh, kw)`` voxels of every convolution.
        dropout: dropout rate after each block's ELU (0 = no Dropout layer).
        l2: L2 weight-decay factor on every kernel (0 = none).
        separable: mid-flow blocks use separable (True) or dense (False) convolutions.
        implementation: depthwise implementation of the separable layers (``"auto"``).
        kernel_initializer: Keras initializer name of every convolution kernel
            (``"glorot_uniform"``, Keras' default, or ``"he_normal"``, the reference code's).
        sync_batchnorm: BatchNormalization statistics over the global batch, i.e. all
            replicas of a ``tf.distribute`` strategy (``synchronized=True``), instead
            of each replica's share; see :func:`mmfusion.learning.distribute.sync_batchnorm`.
    """

    kernel_size: tuple[int, int, int] = (5, 6, 5)
    dropout: float = 0.1
    l2: float = 5e-5
    separable: bool = True
    implementation: str = "auto"
    sync_batchnorm: bool = False
    kernel_initializer: str = "glorot_uniform"

    def regularizer(self):
        return keras.regularizers.L2(self.l2) if self.l2 > 0 else None


def batch_norm(settings: BlockSettings, name: str) -> BatchNorm3D:
    """BatchNormalization over the channel axis, named ``name``.

    A :class:`~mmfusion.model.batchnorm.BatchNorm3D`: Keras' layer with a fused
    training kernel on TensorFlow (same weights, same results up to float rounding).

    ``synchronized=settings.sync_batchnorm``: in training under a strategy with several
    replicas the mean and variance (per channel, over batch and the 3 spatial axes) are
    those of the global batch; at inference the layer uses its moving statistics and
    the flag changes nothing (a saved model loads and runs on one device).
    """
    return BatchNorm3D(synchronized=bool(settings.sync_batchnorm), name=name)


def _norm_act(x, settings: BlockSettings, name: str, dropout: bool = True):
    x = batch_norm(settings, f"{name}_bn")(x)
    x = keras.layers.Activation("elu", name=f"{name}_elu")(x)
    if dropout and settings.dropout > 0:
        x = keras.layers.Dropout(settings.dropout, name=f"{name}_drop")(x)
    return x


def conv_block(x, filters: int, settings: BlockSettings, name: str, kernel_size=None,
               dropout: bool = True):
    """``conv``: (B, d1, d2, d3, C) -> (B, d1, d2, d3, filters).

    ``kernel_size`` overrides ``settings.kernel_size`` (the fusion block uses the
    bottom grid's size). ``dropout=False`` omits the Dropout layer.
    """
    x = keras.layers.Conv3D(
        filters,
        kernel_size or settings.kernel_size,
        padding="same",
        kernel_initializer=settings.kernel_initializer,
        kernel_regularizer=settings.regularizer(),
        name=f"{name}_conv",
    )(x)
    return _norm_act(x, settings, name, dropout)


def sep_conv_block(x, filters: int, settings: BlockSettings, name: str):
    """``sep conv``: (B, d1, d2, d3, C) -> (B, d1, d2, d3, filters), separable conv."""
    reg = settings.regularizer()
    x = SeparableConv3D(
        filters,
        settings.kernel_size,
        padding="same",
        depthwise_initializer=settings.kernel_initializer,
        pointwise_initializer=settings.kernel_initializer,
        depthwise_regularizer=reg,
        pointwise_regularizer=reg,
        implementation=settings.implementation,
        name=f"{name}_sepconv",
    )(x)
    return _norm_act(x, settings, name)


def mid_flow_block(x, settings: BlockSettings, name: str):
    """``mid-flow``: three (sep) conv blocks C -> C plus the input: shape unchanged.

    With ``settings.separable=False`` the three blocks are dense ``conv`` blocks (the
    baseline the paper's ~20x parameter saving is measured against).
    """
    channels = int(x.shape[-1])
    block = sep_conv_block if settings.separable else conv_block
    y = x
    for i in range(3):
        y = block(y, channels, settings, f"{name}_{i}")
    return keras.layers.Add(name=f"{name}_add")([x, y])


def down_conv_block(x, filters: int, settings: BlockSettings, name: str):
    """``down conv``: returns ``(features, pooled)``.

    ``features`` (B, d1, d2, d3, filters) is the conv block's output (the U-Net skip);
    ``pooled`` (B, d1/2, d2/2, d3/2, filters) is it after 2x2x2 max pooling.
    """
    features = conv_block(x, filters, settings, name)
    pooled = keras.layers.MaxPooling3D(2, name=f"{name}_pool")(features)
    return features, pooled


def up_conv_block(x, filters: int, settings: BlockSettings, name: str):
    """``up conv``: (B, d1, d2, d3, C) -> (B, 2*d1, 2*d2, 2*d3, filters)."""
    x = keras.layers.UpSampling3D(2, name=f"{name}_up")(x)
    return conv_block(x, filters, settings, name)
