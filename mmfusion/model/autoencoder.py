"""The multimodal fusion autoencoder (docs/method.md#3-autoencoder).

Shapes for the default config (``mmfusion/defaults/model.yaml``: input = the default
brain-fitted grid, 96x128x96; 5 levels, filters 2,4,8,16,32, kernel 5x6x5,
embedding_filters 32), M modalities::

    in_<m>        (B, 96, 128, 96, 1)   values in [0, 1], one input per modality
    encoder <m>   level i (grid G_i = input / 2**i, f_i = filters[i]):
                  conv(f_i) -> mid-flow -> down conv(f_i)  [skip_i = (B, *G_i, f_i)]
                  -> code (B, 3, 4, 3, 32) = 1152 values per modality
    fusion        concat codes (B, 3, 4, 3, 32*M) -> Conv3D(embedding_filters,
                  kernel = the code's grid, 3x4x3, 'same') -> BN -> ELU: layer
                  ``embedding`` (B, 3, 4, 3, 32) = 1152 values
    decoder <m>   level i = L-1 .. 0: up conv(f_i) (B, *G_i, f_i)
                  [-> concat skip_i: (B, *G_i, 2*f_i)] -> mid-flow -> conv(f_i)
                  -> Conv3D(1, 1x1x1, sigmoid, float32): ``rec_<m>`` (B, 96, 128, 96, 1)

Inputs and outputs are dicts keyed by ``in_<m>`` / ``rec_<m>``: feed
``{"in_T1w": x1, "in_FA": x2}`` and targets ``{"rec_T1w": x1, "rec_FA": x2}``.
The skip feature ``skip_i`` is the ``down conv`` block's conv output before pooling.
Fusion has no Dropout by default (``fusion_dropout`` > 0 adds one between the
``embedding`` layer and the decoders, as the reference code; the embedding itself is
never dropped). ``kernel_initializer`` initializes every convolution kernel.
"""
from __future__ import annotations

import re

import keras

from mmfusion.errors import ConfigError
from mmfusion.model.blocks import (
    BlockSettings,
    batch_norm,
    conv_block,
    down_conv_block,
    mid_flow_block,
    up_conv_block,
)
from mmfusion.runlog import get_logger

LOG = get_logger(__name__)
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def validate_model_config(model_cfg: dict, modalities: list[str]) -> dict:
    """Check ``config['model']`` and the modality names; return a normalized copy.

    Keys missing from ``model_cfg`` take their value from ``mmfusion/defaults/model.yaml``.
    The keys are checked by :func:`mmfusion.config_rules.check_model` (the rules
    ``load_config`` applies: input_shape 3 positive ints divisible by ``2**levels``,
    one filter count per level, kernel_size 3 positive ints, dropout in [0, 1), ...);
    raises :class:`~mmfusion.errors.ConfigError` (one line naming the key and the fix)
    for those and for no modalities, duplicated or invalid modality names.
    """
    from mmfusion.config import default_config
    from mmfusion.config_rules import check_model

    cfg = {**default_config()["model"], **model_cfg}
    check_model(cfg, source="config model")
    if not modalities:
        raise ConfigError("no modalities given: the autoencoder needs at least one")
    if len(set(modalities)) != len(modalities):
        raise ConfigError(f"modalities {modalities}: each modality may appear only once")
    bad = [m for m in modalities if not isinstance(m, str) or not _NAME_OK.match(m)]
    if bad:
        raise ConfigError(f"modality names {bad}: use letters, digits, '_', '-', '.' only")
    cfg.update({k: [int(v) for v in cfg[k]] for k in ("input_shape", "kernel_size", "filters")})
    return cfg


def _encoder(x, mod: str, cfg: dict, settings: BlockSettings):
    """Returns (code (B, *G_L, f_{L-1}), [skip_0 .. skip_{L-1}])."""
    skips = []
    for level, filters in enumerate(cfg["filters"]):
        name = f"enc_{mod}_l{level}"
        x = conv_block(x, filters, settings, f"{name}_conv")
        x = mid_flow_block(x, settings, f"{name}_mid")
        skip, x = down_conv_block(x, filters, settings, f"{name}_down")
        skips.append(skip)
    return x, skips


def _decoder(embedding, skips, mod: str, cfg: dict, settings: BlockSettings, skip_on: bool):
    """Returns the reconstruction (B, *input_shape, 1), sigmoid, float32."""
    x = embedding
    for level in reversed(range(cfg["levels"])):
        filters = cfg["filters"][level]
        name = f"dec_{mod}_l{level}"
        x = up_conv_block(x, filters, settings, f"{name}_up")
        if skip_on:
            x = keras.layers.Concatenate(name=f"{name}_skip")([x, skips[level]])
        x = mid_flow_block(x, settings, f"{name}_mid")
        x = conv_block(x, filters, settings, f"{name}_conv")
    return keras.layers.Conv3D(
        1, 1, activation="sigmoid", kernel_initializer=settings.kernel_initializer,
        dtype="float32", name=f"rec_{mod}",
    )(x)


def build_autoencoder(
    model_cfg: dict, modalities: list[str], skip_connections: bool | None = None,
    sync_batchnorm: bool | None = None,
) -> keras.Model:
    """Build the (uncompiled) multimodal autoencoder.

    Args:
        model_cfg: ``config['model']`` (keys of ``mmfusion/defaults/model.yaml``).
        modalities: modality names, e.g. ``["JAC", "NDI"]`` (1..M).
        skip_connections: overrides ``model_cfg['skip_connections']`` when not None.
        sync_batchnorm: BatchNormalization over all replicas (the caller resolves
            ``model.sync_batchnorm`` for its strategy: the training passes
            :func:`mmfusion.learning.distribute.sync_batchnorm`); when None,
            ``model_cfg['sync_batchnorm']`` true/false as set, null/auto: whether the
            strategy in scope has more than one replica.

    Returns:
        ``keras.Model`` named ``mmfusion_autoencoder``; inputs dict ``in_<m>``
        ``(B, *input_shape, 1)``, outputs dict ``rec_<m>`` (same shape, sigmoid,
        float32); layer ``embedding`` outputs ``(B, *input_shape/2**levels,
        embedding_filters)``. Honors the global Keras dtype policy (mixed precision).
    """
    cfg = validate_model_config(model_cfg, modalities)
    skip_on = cfg["skip_connections"] if skip_connections is None else skip_connections
    settings = BlockSettings(
        kernel_size=tuple(cfg["kernel_size"]),
        dropout=float(cfg["dropout"]),
        l2=float(cfg["l2"]),
        separable=bool(cfg["separable"]),
        implementation=str(cfg["depthwise_implementation"]),
        sync_batchnorm=_sync_default(cfg["sync_batchnorm"]) if sync_batchnorm is None else bool(sync_batchnorm),
        kernel_initializer=str(cfg["kernel_initializer"]),
    )
    inputs, codes, all_skips = {}, [], {}
    for mod in modalities:
        inp = keras.Input(shape=tuple(cfg["input_shape"]) + (1,), name=f"in_{mod}")
        inputs[f"in_{mod}"] = inp
        code, all_skips[mod] = _encoder(inp, mod, cfg, settings)
        codes.append(code)
    fused = codes[0] if len(codes) == 1 else keras.layers.Concatenate(name="fusion_concat")(codes)
    bottom = tuple(int(d) for d in fused.shape[1:4])
    x = keras.layers.Conv3D(
        cfg["embedding_filters"], bottom, padding="same", kernel_initializer=settings.kernel_initializer,
        kernel_regularizer=settings.regularizer(), name="fusion_conv",
    )(fused)
    x = batch_norm(settings, "fusion_bn")(x)
    embedding = keras.layers.Activation("elu", name="embedding")(x)
    decoded = embedding
    if cfg["fusion_dropout"] > 0:  # the decoders see it; the embedding layer's output is not dropped
        decoded = keras.layers.Dropout(float(cfg["fusion_dropout"]), name="fusion_drop")(embedding)
    outputs = {
        f"rec_{mod}": _decoder(decoded, all_skips[mod], mod, cfg, settings, bool(skip_on))
        for mod in modalities
    }
    model = keras.Model(inputs=inputs, outputs=outputs, name="mmfusion_autoencoder")
    LOG.debug("built autoencoder: %d modalities, %d parameters, skips=%s, separable=%s",
              len(modalities), model.count_params(), skip_on, settings.separable)
    return model


def _sync_default(setting) -> bool:
    """``model.sync_batchnorm`` (already checked by :func:`validate_model_config`) when the
    caller passed no flag: true/false as set; null/auto: several replicas in the strategy in scope."""
    if str(setting).strip().lower() in ("true", "false"):
        return str(setting).strip().lower() == "true"
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync) > 1


def embedding_model(model: keras.Model) -> keras.Model:
    """Same inputs as ``model``; output the flattened joint embedding (B, prod(bottom)*E).

    (B, 1536) for the default config.
    """
    flat = keras.layers.Flatten(name="embedding_flat")(model.get_layer("embedding").output)
    return keras.Model(inputs=model.input, outputs=flat, name="mmfusion_embedding")


def compile_autoencoder(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Compile with Adam(learning_rate) and binary cross-entropy summed over modalities.

    Each ``rec_<m>`` output gets ``BinaryCrossentropy`` (mean over voxels and batch);
    Keras adds the per-output losses (weight 1 each) plus the L2 penalties.
    With a mixed-precision policy, wrap the optimizer yourself in
    ``keras.optimizers.LossScaleOptimizer`` (Keras does it automatically in ``fit``
    for ``mixed_float16``).
    """
    names = list(model.output) if isinstance(model.output, dict) else model.output_names
    losses = {name: keras.losses.BinaryCrossentropy() for name in names}
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=losses)
    return model
