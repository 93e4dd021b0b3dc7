"""Fast depthwise and depthwise-separable 3D convolutions (Keras 3 layers).

Keras 3 has no ``SeparableConv3D`` and ``Conv3D(groups=C)`` on the TensorFlow backend
runs through XLA on CPU, far slower than a dense ``Conv3D`` with C times the FLOPs
(docs/method.md#separable-convolutions; measured: docs/performance.md, "Separable
convolution layers"). This module computes the depthwise 3D convolution in one of
four mathematically identical ways, all reading the SAME weights
(``depthwise_kernel`` ``(kd, kh, kw, C, depth_multiplier)``; SeparableConv3D adds
``pointwise_kernel`` ``(1, 1, 1, C*m, filters)``), so the choice never changes a saved
model:

``"dense"``
    One dense conv3d: DepthwiseConv3D uses the block-diagonal kernel
    ``(kd, kh, kw, C, C*m)``; SeparableConv3D folds depthwise and pointwise into one
    ``(kd, kh, kw, C, filters)`` kernel (exact: both are linear). Costs the FLOPs of a
    dense ``Conv3D`` but runs on oneDNN/cuDNN's best kernels: fastest on CPU for the
    channel counts of the paper model up to C = 32.
``"sliced"``
    Sum over the kernel's first-axis taps of 2D depthwise convolutions: the input is
    padded explicitly, and for tap ``k`` the slice ``x[:, k:k+D]`` is reshaped to
    ``(B*D, H, W, C)`` and convolved ('valid') with ``kernel[k]``
    (``depthwise_conv2d``). ``kd`` native depthwise ops, no wasted FLOPs, and (for
    depth_multiplier 1) a hand-written gradient that avoids TF's slow depthwise
    filter gradient where it can. Wins when channels are many (C = 64 here).
``"split"``
    One conv3d (1 input channel, ``depth_multiplier`` filters) per channel, outputs
    concatenated (the reference code's approach).
``"grouped"``
    conv3d with ``groups = C`` (what ``keras.layers.Conv3D(groups=C)`` does).
    Very slow on CPU (XLA); provided for GPUs (cuDNN grouped conv) and as a reference.
``"numba"``
    TensorFlow backend on CPU, float32 only: compiled numba kernels
    (:mod:`mmfusion.model.numba_depthwise`) called through ``tf.numpy_function``, with
    a ``tf.custom_gradient`` whose input gradient (correlation of the upstream gradient
    with the flipped kernel) and kernel gradient (per tap and channel dot products,
    fixed summation order: bit-identical run to run) are numba kernels too. Only the
    depthwise FLOPs, channels-last rows as SIMD vectors. ``depth_multiplier`` m > 1
    repeats each input channel m times first. The layers fall back (with a warning)
    to the choice "auto" would make without numba under other dtypes (mixed
    precision) and other backends; :func:`depthwise_conv3d` raises ``TypeError``.
    Not exportable as a SavedModel / XLA (``tf.numpy_function``); ``.keras`` files are
    unaffected (weights and config only). The first call compiles the kernels (cached
    on disk by numba afterwards).

``implementation="auto"`` (default) picks per call from the static input shape with
:func:`choose_implementation`, a heuristic fitted to measurements on a 2-core CPU
(``bench/bench_layers.py``; its numbers are in docs/performance.md). Pass an explicit
``implementation=`` to override.

Only stride 1 is supported (the paper uses stride 1 everywhere); padding is
``"same"`` (TensorFlow convention: for an even kernel the extra pad goes after) or
``"valid"``.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from mmfusion.config_rules import DEPTHWISE_IMPLEMENTATIONS as IMPLEMENTATIONS
from mmfusion.runlog import get_logger

log = get_logger(__name__)


def _triple(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    return value  # type: ignore[return-value]


DENSE_MAX_FLOP_FACTOR = 32.0
"""Use the dense path while it costs fewer than this many times the separable FLOPs."""


def dense_flop_factor(kernel_size, channels: int, depth_multiplier: int = 1,
                      filters: int | None = None) -> float:
    """FLOPs of the dense path / FLOPs of the depthwise(-separable) path, per voxel.

    Depthwise only (``filters=None``): block-diagonal ``K*C*C*m`` vs ``K*C*m`` = C.
    Separable: folded ``K*C*F`` vs ``K*C*m + C*m*F`` (K = kd*kh*kw).
    """
    taps = 1
    for k in kernel_size:
        taps *= int(k)
    if filters is None:
        return float(channels)
    return taps * channels * filters / (taps * channels * depth_multiplier
                                        + channels * depth_multiplier * filters)


def choose_implementation(input_shape, kernel_size, depth_multiplier: int = 1,
                          filters: int | None = None, device: str = "cpu",
                          dtype: str = "float32") -> str:
    """Pick the fastest depthwise implementation for a layer call (heuristic).

    Args:
        input_shape: ``(batch, d1, d2, d3, C)``; batch may be ``None``.
        kernel_size: ``(kd, kh, kw)`` voxels.
        depth_multiplier: ``m``.
        filters: pointwise filters of a SeparableConv3D; ``None`` for DepthwiseConv3D.
        device: ``"cpu"`` or ``"gpu"``.
        dtype: compute dtype of the call (``"float32"``, ``"bfloat16"``, ...).

    Returns:
        On CPU with the TensorFlow backend and float32: ``"numba"``. Why: on a 2-core
        CPU the forward + backward of a SeparableConv3D with it was faster than with
        the folded dense conv3d at every shape of the paper model, because it
        computes only the depthwise FLOPs (``bench/bench_layers.py``).
        Otherwise (GPU, other backends, mixed precision): ``"dense"`` when
        :func:`dense_flop_factor` < :data:`DENSE_MAX_FLOP_FACTOR`, else ``"sliced"``
        (``"grouped"`` on a non-TensorFlow backend). Why: on the same CPU, forward +
        backward of the folded dense conv3d was as fast as or faster than the sliced
        depthwise path up to C = 32 despite its C-fold FLOPs (TF's depthwise kernels
        reach a small fraction of oneDNN's dense throughput), and slower at C = 64.
        The same rule holds on GPU: on an NVIDIA H200 the folded dense path was faster
        than the grouped one at every paper shape except 16x16x12x32
        (``bench/bench_gpu_throughput.py --layers``). The grid size does not enter.
        "sliced" and "numba" are TensorFlow-only. The measurements: docs/performance.md
        ("Separable convolution layers", "Earlier layer measurements", "GPU training
        throughput").
    """
    if device == "cpu" and _numba_usable(dtype):
        return "numba"
    channels = int(input_shape[-1])
    factor = dense_flop_factor(kernel_size, channels, depth_multiplier, filters)
    if factor < DENSE_MAX_FLOP_FACTOR:
        return "dense"
    # "sliced" is written with TensorFlow ops; other backends get the grouped conv
    return "sliced" if keras.backend.backend() == "tensorflow" else "grouped"


def _device() -> str:
    """``"gpu"`` or ``"cpu"``: where the Keras backend computes (for choose_implementation)."""
    return "gpu" if _on_gpu() else "cpu"


def _on_gpu() -> bool:
    """True when the Keras backend computes on a GPU (TensorFlow, JAX or PyTorch)."""
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return jax.default_backend() == "gpu"
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    except Exception:  # pragma: no cover - backend without device queries
        return False


def _same_pad(size: int) -> tuple[int, int]:
    before = (size - 1) // 2
    return before, size - 1 - before


def _sliced_valid(x_padded, kernel):
    """Valid depthwise 3D correlation of a padded input, as kd depthwise 2D convs.

    x_padded: (B, D+kd-1, H+kh-1, W+kw-1, C) -> (B, D, H, W, C*m).
    """
    import tensorflow as tf

    kd = int(kernel.shape[0])
    shape = tf.shape(x_padded)
    batch, depth_out = shape[0], shape[1] - kd + 1
    height, width, channels = shape[2], shape[3], shape[4]
    total = None
    for tap in range(kd):
        sl = tf.reshape(x_padded[:, tap : tap + depth_out], (batch * depth_out, height, width, channels))
        y = tf.nn.depthwise_conv2d(sl, kernel[tap], strides=[1, 1, 1, 1], padding="VALID")
        total = y if total is None else total + y
    out = tf.shape(total)
    return tf.reshape(total, (batch, depth_out, out[1], out[2], out[3]))


#: Up to this many channels the depthwise kernel's gradient is taken from oneDNN's dense
#: conv3d filter gradient (all C x C pairs, diagonal kept): faster than TF's
#: DepthwiseConv2dNativeBackpropFilter at C <= 16 on CPU (bench/bench_layers.py).
FILTER_GRAD_DENSE_MAX_CHANNELS = 16


def _depthwise_sliced(x, kernel, padding: str):
    """Depthwise 3D conv as a sum over first-axis taps of depthwise 2D convs.

    x: (B, D, H, W, C); kernel: (kd, kh, kw, C, m) -> (B, D', H', W', C*m). The input
    is padded explicitly, then for tap ``k`` the slice ``x[:, k:k+D']`` is reshaped to
    ``(B*D', H, W, C)`` and convolved ('valid') with ``kernel[k]``. With m = 1 the
    gradient is hand-written: input gradient = the same sliced correlation of the
    upstream gradient with the flipped kernel; kernel gradient = oneDNN's dense conv3d
    filter gradient's diagonal (C <= 16) or per-tap depthwise filter gradients.
    """
    import tensorflow as tf

    ksize = [int(k) for k in kernel.shape[:3]]
    pads = [_same_pad(k) if padding == "same" else (0, 0) for k in ksize]
    paddings = [(0, 0)] + pads + [(0, 0)]
    if int(kernel.shape[4]) != 1:
        return _sliced_valid(tf.pad(x, paddings), kernel)
    flipped_pads = [(0, 0)] + [(k - 1 - p0, k - 1 - p1) for k, (p0, p1) in zip(ksize, pads)] + [(0, 0)]
    channels = int(kernel.shape[3])

    @tf.custom_gradient
    def conv(inp, ker):
        inp_padded = tf.pad(inp, paddings)
        out = _sliced_valid(inp_padded, ker)

        def grad(upstream):
            flipped = tf.reverse(ker, axis=[0, 1, 2])
            d_inp = _sliced_valid(tf.pad(upstream, flipped_pads), flipped)
            if channels <= FILTER_GRAD_DENSE_MAX_CHANNELS:
                full = tf.raw_ops.Conv3DBackpropFilterV2(
                    input=inp_padded, filter_sizes=ksize + [channels, channels],
                    out_backprop=upstream, strides=[1] * 5, padding="VALID",
                )
                d_ker = tf.linalg.diag_part(full)[..., None]
            else:
                d_ker = _sliced_filter_grad(inp_padded, upstream, ksize)
            return d_inp, d_ker

        return out, grad

    return conv(x, kernel)


def _sliced_filter_grad(inp_padded, upstream, ksize):
    """Depthwise kernel gradient (kd, kh, kw, C, 1) from per-tap depthwise 2D gradients."""
    import tensorflow as tf

    kd, kh, kw = ksize
    shape = tf.shape(upstream)
    batch, depth, height, width, channels = (shape[i] for i in range(5))
    grad2d = tf.reshape(upstream, (batch * depth, height, width, channels))
    in_shape = tf.shape(inp_padded)
    taps = []
    for tap in range(kd):
        sl = tf.reshape(inp_padded[:, tap : tap + depth],
                        (batch * depth, in_shape[2], in_shape[3], in_shape[4]))
        taps.append(tf.nn.depthwise_conv2d_backprop_filter(
            sl, [kh, kw, int(inp_padded.shape[-1]), 1], grad2d,
            strides=[1, 1, 1, 1], padding="VALID",
        ))
    return tf.stack(taps, axis=0)


def _block_diagonal(kernel):
    """(kd, kh, kw, C, m) depthwise kernel -> (kd, kh, kw, C, C*m) dense kernel."""
    kd, kh, kw, channels, mult = (int(s) for s in kernel.shape)
    eye = ops.cast(ops.eye(channels), kernel.dtype)
    dense = kernel[:, :, :, :, None, :] * eye[:, :, None]
    return ops.reshape(dense, (kd, kh, kw, channels, channels * mult))


def _depthwise_dense(x, kernel, padding: str):
    """Depthwise 3D conv as one dense conv3d with a block-diagonal kernel."""
    return ops.conv(x, _block_diagonal(kernel), strides=1, padding=padding)


def _depthwise_split(x, kernel, padding: str):
    """Depthwise 3D conv as one dense conv3d per input channel, concatenated."""
    channels = int(kernel.shape[3])
    outs = [
        ops.conv(x[..., c : c + 1], kernel[:, :, :, c : c + 1, :], strides=1, padding=padding)
        for c in range(channels)
    ]
    return outs[0] if channels == 1 else ops.concatenate(outs, axis=-1)


def _depthwise_grouped(x, kernel, padding: str):
    """Depthwise 3D conv as a grouped conv3d (groups = C), like Conv3D(groups=C)."""
    kd, kh, kw, channels, mult = (int(s) for s in kernel.shape)
    grouped = ops.reshape(kernel, (kd, kh, kw, 1, channels * mult))
    return ops.conv(x, grouped, strides=1, padding=padding)


def _numba_usable(dtype) -> bool:
    """True where the "numba" path can run: TensorFlow backend, float32, numba importable."""
    if keras.backend.backend() != "tensorflow" or keras.backend.standardize_dtype(dtype) != "float32":
        return False
    try:
        import numba  # noqa: F401
    except ImportError:  # pragma: no cover - numba is a dependency
        return False
    return True


def _thread_limit() -> int | None:
    """Threads for the numba kernels: TensorFlow's intra-op setting, else OMP_NUM_THREADS."""
    import os

    import tensorflow as tf

    threads = tf.config.threading.get_intra_op_parallelism_threads()
    if threads:
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def _depthwise_numba(x, kernel, padding: str):
    """Depthwise 3D conv with numba kernels (TensorFlow, CPU, float32), custom gradient.

    x: (B, D, H, W, C) float32; kernel: (kd, kh, kw, C, m) -> (B, D', H', W', C*m).
    """
    import tensorflow as tf

    from mmfusion.model import numba_depthwise as nd

    kd, kh, kw, channels, mult = (int(s) for s in kernel.shape)
    if x.dtype != tf.float32 or kernel.dtype != tf.float32:
        raise TypeError(f"implementation 'numba' needs float32, got {x.dtype.name}/{kernel.dtype.name}; "
                        "use implementation='auto' or 'dense' under mixed precision")
    ksize = (kd, kh, kw)
    pads = tuple(_same_pad(k)[0] if padding == "same" else 0 for k in ksize)
    grad_pads = tuple(k - 1 - p for k, p in zip(ksize, pads))
    threads = _thread_limit()
    if mult > 1:  # output channel c*m + j = input channel c with kernel[..., c, j]
        x = tf.repeat(x, mult, axis=-1)
    kernel = tf.reshape(kernel, ksize + (channels * mult,))
    in_spatial = tuple(x.shape[1:4])
    out_spatial = tuple(
        None if d is None else (d if padding == "same" else d - k + 1) for d, k in zip(in_spatial, ksize)
    )

    def forward(inp, ker):
        nd.set_threads(threads)
        shape = inp.shape[1:4]
        out = shape if padding == "same" else tuple(d - k + 1 for d, k in zip(shape, ksize))
        return nd.correlate(inp, ker, pads, out)

    def input_grad(upstream, ker, inp_shape):
        nd.set_threads(threads)
        flipped = np.ascontiguousarray(ker[::-1, ::-1, ::-1])
        return nd.correlate(upstream, flipped, grad_pads, tuple(inp_shape[1:4]))

    def kernel_grad(inp, upstream):
        nd.set_threads(threads)
        return nd.kernel_gradient(inp, upstream, ksize, pads)

    @tf.custom_gradient
    def conv(inp, ker):
        out = tf.numpy_function(forward, [inp, ker], tf.float32, stateful=False)
        out.set_shape((inp.shape[0],) + out_spatial + (channels * mult,))

        def grad(upstream):
            upstream = tf.cast(upstream, tf.float32)
            d_inp = tf.numpy_function(input_grad, [upstream, ker, tf.shape(inp, out_type=tf.int64)],
                                      tf.float32, stateful=False)
            d_inp.set_shape(inp.shape)
            d_ker = tf.numpy_function(kernel_grad, [inp, upstream], tf.float32, stateful=False)
            d_ker.set_shape(ker.shape)
            return d_inp, d_ker

        return out, grad

    return conv(x, kernel)


_FUNCS = {"dense": _depthwise_dense, "sliced": _depthwise_sliced, "split": _depthwise_split,
          "grouped": _depthwise_grouped, "numba": _depthwise_numba}


def depthwise_conv3d(x, kernel, padding: str = "same", implementation: str = "auto"):
    """Functional depthwise 3D convolution, stride 1.

    Args:
        x: ``(B, d1, d2, d3, C)`` tensor (channels last).
        kernel: ``(kd, kh, kw, C, m)``; output channel ``c*m + j`` is input channel
            ``c`` convolved with ``kernel[..., c, j]`` (TensorFlow's convention).
        padding: ``"same"`` or ``"valid"``.
        implementation: one of :data:`IMPLEMENTATIONS`.

    Returns:
        ``(B, d1', d2', d3', C*m)`` tensor.
    """
    if implementation == "auto":
        implementation = choose_implementation(
            x.shape, kernel.shape[:3], int(kernel.shape[4]), None, _device(),
            dtype=keras.backend.standardize_dtype(x.dtype),
        )
    return _FUNCS[implementation](x, kernel, padding)


class _DepthwiseBase(keras.layers.Layer):
    """Shared argument handling and the depthwise kernel of the two layers."""

    def __init__(
        self,
        kernel_size,
        depth_multiplier: int = 1,
        padding: str = "same",
        use_bias: bool = True,
        depthwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        bias_regularizer=None,
        implementation: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.depth_multiplier = int(depth_multiplier)
        padding = padding.lower()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.padding = padding
        self.use_bias = bool(use_bias)
        self.implementation = implementation
        self.depthwise_initializer = keras.initializers.get(depthwise_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.depthwise_regularizer = keras.regularizers.get(depthwise_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.input_spec = keras.layers.InputSpec(ndim=5)

    def _build_depthwise(self, input_shape) -> int:
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("the channel dimension of the input must be known")
        self.depthwise_kernel = self.add_weight(
            name="depthwise_kernel",
            shape=self.kernel_size + (int(channels), self.depth_multiplier),
            initializer=self.depthwise_initializer,
            regularizer=self.depthwise_regularizer,
        )
        return int(channels)

    def _resolve(self, input_shape, filters=None) -> str:
        device = _device()
        if self.implementation == "numba" and not _numba_usable(self.compute_dtype):
            fallback = choose_implementation(input_shape, self.kernel_size, self.depth_multiplier,
                                             filters, device, dtype=self.compute_dtype)
            log.warning("%s: implementation 'numba' needs the TensorFlow backend and float32 "
                        "(compute dtype %s); using %r", self.name, self.compute_dtype, fallback)
            return fallback
        if self.implementation != "auto":
            return self.implementation
        return choose_implementation(input_shape, self.kernel_size, self.depth_multiplier,
                                     filters, device, dtype=self.compute_dtype)

    def _depthwise(self, inputs, implementation: str):
        kernel = ops.cast(self.depthwise_kernel, self.compute_dtype)
        return depthwise_conv3d(inputs, kernel, self.padding, implementation)

    def _out_spatial(self, input_shape):
        if self.padding == "same":
            return tuple(input_shape[1:4])
        return tuple(
            None if d is None else d - k + 1 for d, k in zip(input_shape[1:4], self.kernel_size)
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            kernel_size=self.kernel_size,
            depth_multiplier=self.depth_multiplier,
            padding=self.padding,
            use_bias=self.use_bias,
            depthwise_initializer=keras.initializers.serialize(self.depthwise_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            depthwise_regularizer=keras.regularizers.serialize(self.depthwise_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
            implementation=self.implementation,
        )
        return config


@keras.saving.register_keras_serializable(package="mmfusion")
class DepthwiseConv3D(_DepthwiseBase):
    """Depthwise 3D convolution: each input channel convolved with its own kernel(s).

    Input ``(B, d1, d2, d3, C)`` -> output ``(B, d1', d2', d3', C*depth_multiplier)``
    (``d' = d`` with ``padding="same"``). Weights: ``depthwise_kernel``
    ``(kd, kh, kw, C, depth_multiplier)`` and ``bias`` ``(C*depth_multiplier,)``.
    Equal to a dense ``Conv3D`` whose kernel is block-diagonal in (in, out) channels.
    ``implementation``: see the module docstring.
    """

    def build(self, input_shape):
        channels = self._build_depthwise(input_shape)
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(channels * self.depth_multiplier,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )

    def call(self, inputs):
        out = self._depthwise(inputs, self._resolve(inputs.shape))
        if self.use_bias:
            out = out + ops.cast(self.bias, self.compute_dtype)
        return out

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self._out_spatial(input_shape) + (
            input_shape[-1] * self.depth_multiplier,
        )


@keras.saving.register_keras_serializable(package="mmfusion")
class SeparableConv3D(_DepthwiseBase):
    """Depthwise-separable 3D convolution: depthwise ``kernel_size`` then pointwise 1x1x1.

    Input ``(B, d1, d2, d3, C)`` -> output ``(B, d1', d2', d3', filters)``.
    Weights: ``depthwise_kernel`` ``(kd, kh, kw, C, depth_multiplier)``,
    ``pointwise_kernel`` ``(1, 1, 1, C*depth_multiplier, filters)`` (Keras
    ``SeparableConv2D`` layout) and ``bias`` ``(filters,)``. Parameters:
    ``kd*kh*kw*C*m + C*m*filters (+ filters)`` instead of ``kd*kh*kw*C*filters``.
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        pointwise_initializer="glorot_uniform",
        pointwise_regularizer=None,
        **kwargs,
    ):
        super().__init__(kernel_size, **kwargs)
        self.filters = int(filters)
        self.pointwise_initializer = keras.initializers.get(pointwise_initializer)
        self.pointwise_regularizer = keras.regularizers.get(pointwise_regularizer)

    def build(self, input_shape):
        channels = self._build_depthwise(input_shape)
        self.pointwise_kernel = self.add_weight(
            name="pointwise_kernel",
            shape=(1, 1, 1, channels * self.depth_multiplier, self.filters),
            initializer=self.pointwise_initializer,
            regularizer=self.pointwise_regularizer,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )

    def call(self, inputs):
        implementation = self._resolve(inputs.shape, self.filters)
        pointwise = ops.cast(self.pointwise_kernel, self.compute_dtype)
        pointwise = ops.reshape(pointwise, pointwise.shape[3:])  # (C*m, filters)
        if implementation == "dense":
            # fold depthwise and pointwise into one (kd, kh, kw, C, filters) kernel
            depthwise = ops.cast(self.depthwise_kernel, self.compute_dtype)
            channels = int(depthwise.shape[3])
            if self.depth_multiplier == 1:  # broadcast product: cheaper than einsum
                folded = depthwise * pointwise  # (kd,kh,kw,C,1) * (C,F)
            else:
                folded = ops.einsum(
                    "dhwcj,cjf->dhwcf",
                    depthwise,
                    ops.reshape(pointwise, (channels, self.depth_multiplier, self.filters)),
                )
            out = ops.conv(inputs, folded, strides=1, padding=self.padding)
        else:
            out = ops.matmul(self._depthwise(inputs, implementation), pointwise)
        if self.use_bias:
            out = out + ops.cast(self.bias, self.compute_dtype)
        return out

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self._out_spatial(input_shape) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            pointwise_initializer=keras.initializers.serialize(self.pointwise_initializer),
            pointwise_regularizer=keras.regularizers.serialize(self.pointwise_regularizer),
        )
        return config
