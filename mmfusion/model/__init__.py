"""The multimodal autoencoder (docs/method.md#3-autoencoder) and its fast separable 3D layers.

Importing this package registers the custom layers (package ``mmfusion``) so that
``keras.models.load_model("model.keras")`` works.
"""
from mmfusion.model.autoencoder import (
    build_autoencoder,
    compile_autoencoder,
    embedding_model,
    validate_model_config,
)
from mmfusion.model.layers import DepthwiseConv3D, SeparableConv3D
from mmfusion.model.batchnorm import BatchNorm3D

__all__ = [
    "BatchNorm3D",
    "DepthwiseConv3D",
    "SeparableConv3D",
    "build_autoencoder",
    "compile_autoencoder",
    "embedding_model",
    "validate_model_config",
]
