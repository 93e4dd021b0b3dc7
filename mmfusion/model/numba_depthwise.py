"""Depthwise 3D convolution (stride 1) as numba CPU kernels, forward and both gradients.

Arrays stay channels-last (no transposes): a row ``x[b, d, h]`` of ``W*C`` contiguous
floats is treated as one vector, and a kernel tap ``(i, j, k)`` shifts it by ``k*C``
elements and multiplies it elementwise by the tap's kernel values tiled along the row
(``tiled[i, j, k, w*C + c] = kernel[i, j, k, c]``). The innermost loop is therefore a
contiguous multiply-add over one row (SIMD), with the output row in L1 while every tap
is added to it. Out-of-grid taps are skipped (no padded copy): ``pad`` voxels of
implicit zeros precede each axis.

* :func:`correlate`: ``out[b, o, c] = sum_t src[b, o + t - pad, c] * kernel[t, c]``:
  the forward pass (``src = x``) and the input gradient (``src = upstream``, flipped
  kernel, ``pad = k - 1 - pad_forward``).
* :func:`kernel_gradient`: ``dk[t, c] = sum_{b, o} x[b, o + t - pad, c] * g[b, o, c]``;
  partial sums per output depth slab are added in a fixed order, so the result does
  not depend on the thread count or scheduling (bit-identical run to run).

Only ``depth_multiplier`` 1 and float32 (callers repeat input channels for m > 1).
"""
from __future__ import annotations

import numba
import numpy as np

from mmfusion.numba_jit import njit_cached

_JIT = dict(parallel=True, fastmath=False, nogil=True)
_ROW_BLOCK = 8  # output rows accumulated together (8 rows of 96x4 floats: 12 KiB, in L1)


_ROW = dict(fastmath=False, nogil=True, inline="always")


@njit_cached(**_ROW)
def _fma_row(acc, src, weights):
    """acc[e] += src[e] * weights[e] for three equally long contiguous 1D views (SIMD)."""
    for e in range(acc.shape[0]):
        acc[e] += src[e] * weights[e]


@njit_cached(**_ROW)
def _fma_row2(acc, x0, k0, x1, k1):
    """Two taps in one pass over ``acc`` (fewer loads/stores of the accumulator)."""
    for e in range(acc.shape[0]):
        acc[e] = acc[e] + x0[e] * k0[e] + x1[e] * k1[e]


@njit_cached(**_ROW)
def _fma_row4(acc, x0, k0, x1, k1, x2, k2, x3, k3):
    """Four products in one pass over ``acc``."""
    for e in range(acc.shape[0]):
        acc[e] = acc[e] + x0[e] * k0[e] + x1[e] * k1[e] + x2[e] * k2[e] + x3[e] * k3[e]


@njit_cached(**_ROW)
def _fma_row3(acc, x0, k0, x1, k1, x2, k2):
    """Three taps in one pass over ``acc``."""
    for e in range(acc.shape[0]):
        acc[e] = acc[e] + x0[e] * k0[e] + x1[e] * k1[e] + x2[e] * k2[e]


@njit_cached(**_ROW)
def _taps_row(acc, xrow, ker, channels):
    """acc[e] += sum_k xrow[e + k*C] * ker[k, e]: the kw taps of one kernel row.

    acc (Wo*C,), xrow ((Wo+kw-1)*C,) (zero-padded along W), ker (kw, Wo*C). Taps go
    three (or two) per pass over ``acc``.
    """
    kw, n = ker.shape
    k = 0
    while k < kw:
        a = k * channels
        if kw - k >= 3 and kw - k != 4:
            _fma_row3(acc, xrow[a:a + n], ker[k], xrow[a + channels:a + channels + n], ker[k + 1],
                      xrow[a + 2 * channels:a + 2 * channels + n], ker[k + 2])
            k += 3
        elif kw - k >= 2:
            _fma_row2(acc, xrow[a:a + n], ker[k], xrow[a + channels:a + channels + n], ker[k + 1])
            k += 2
        else:
            _fma_row(acc, xrow[a:a + n], ker[k])
            k += 1


@njit_cached(**_JIT)
def _correlate(src, tiled, pads, channels, out):
    """src (B, D, H, (Wo+kw-1)*C) W-padded, tiled (kd, kh, kw, Wo*C), pads (2,) int64 (D, H),
    out (B, Do, Ho, Wo*C) (overwritten)."""
    nb, d_in, h_in, _ = src.shape
    kd, kh, kw, row_out = tiled.shape
    d_out, h_out = out.shape[1], out.shape[2]
    pad_d, pad_h = pads[0], pads[1]
    for slab in numba.prange(nb * d_out):
        b = slab // d_out
        d = slab % d_out
        acc = np.empty((_ROW_BLOCK, row_out), np.float32)
        for h0 in range(0, h_out, _ROW_BLOCK):  # a block of output rows stays in L1 ...
            rows = min(_ROW_BLOCK, h_out - h0)
            acc[:] = 0.0
            for i in range(kd):
                di = d + i - pad_d
                if di < 0 or di >= d_in:
                    continue
                for j in range(kh):  # ... while the kernel row (i, j) is applied to all of it
                    ker = tiled[i, j]
                    for r in range(rows):
                        hi = h0 + r + j - pad_h
                        if hi < 0 or hi >= h_in:
                            continue
                        _taps_row(acc[r], src[b, di, hi], ker, channels)
            out[b, d, h0:h0 + rows, :] = acc[:rows]


@njit_cached(**_ROW)
def _grad_taps_row(acc, xrow, grow, channels):
    """acc[k, e] += xrow[e + k*C] * grow[e] for the kw taps of one kernel row.

    acc (kw, Wo*C), xrow ((Wo+kw-1)*C,) zero-padded along W, grow (Wo*C,).
    """
    kw, n = acc.shape
    for k in range(kw):
        _fma_row(acc[k], xrow[k * channels:k * channels + n], grow)


@njit_cached(**_ROW)
def _grad_taps_row4(acc, x0, g0, x1, g1, x2, g2, x3, g3, channels):
    """:func:`_grad_taps_row` for four (x row, upstream row) pairs in one pass over ``acc``."""
    kw, n = acc.shape
    for k in range(kw):
        a = k * channels
        _fma_row4(acc[k], x0[a:a + n], g0, x1[a:a + n], g1, x2[a:a + n], g2, x3[a:a + n], g3)


@njit_cached(**_JIT)
def _kernel_grad_slabs(x, g, pads, channels, partial):
    """x (B, D, H, (Wo+kw-1)*C) W-padded, g (B, Do, Ho, Wo*C), pads (2,) (D, H)
    -> partial (B*Do, kd, kh, kw, C) (overwritten): the kernel gradient of each output slab."""
    nb, d_in, h_in, _ = x.shape
    d_out, h_out, row_out = g.shape[1], g.shape[2], g.shape[3]
    kd, kh, kw = partial.shape[1], partial.shape[2], partial.shape[3]
    pad_d, pad_h = pads[0], pads[1]
    for slab in numba.prange(nb * d_out):
        b = slab // d_out
        d = slab % d_out
        acc = np.empty((kw, row_out), np.float32)  # one kernel row's taps: in L1
        for i in range(kd):
            di = d + i - pad_d
            for j in range(kh):
                acc[:] = 0.0
                if 0 <= di < d_in:
                    h_first, h_end = max(0, pad_h - j), min(h_out, h_in + pad_h - j)
                    h = h_first
                    while h + 4 <= h_end:  # four output rows per pass over acc
                        s = h + j - pad_h
                        _grad_taps_row4(acc, x[b, di, s], g[b, d, h], x[b, di, s + 1], g[b, d, h + 1],
                                        x[b, di, s + 2], g[b, d, h + 2], x[b, di, s + 3], g[b, d, h + 3],
                                        channels)
                        h += 4
                    while h < h_end:
                        _grad_taps_row(acc, x[b, di, h + j - pad_h], g[b, d, h], channels)
                        h += 1
                for k in range(kw):
                    for c in range(channels):
                        total = np.float32(0.0)
                        for e in range(c, row_out, channels):
                            total += acc[k, e]
                        partial[slab, i, j, k, c] = total


@njit_cached(nogil=True)
def _sum_slabs(partial, out):
    """Sequential (fixed-order) sum over the first axis: (S, ...) -> out (...)."""
    flat_out = out.reshape(-1)
    flat = partial.reshape(partial.shape[0], -1)
    flat_out[:] = 0.0
    for s in range(flat.shape[0]):
        for e in range(flat.shape[1]):
            flat_out[e] += flat[s, e]


def set_threads(threads: int | None) -> None:
    """Limit numba's parallel loops in the calling thread to ``threads`` (None: all)."""
    limit = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(limit if not threads else max(1, min(int(threads), limit)))


def _tile(kernel: np.ndarray, width: int) -> np.ndarray:
    """(kd, kh, kw, C) -> (kd, kh, kw, width*C) with ``[..., w*C + c] = kernel[..., c]``."""
    return np.ascontiguousarray(np.tile(kernel, (1, 1, 1, width)), dtype=np.float32)


def _pad_rows(src: np.ndarray, before: int, width: int) -> np.ndarray:
    """(B, D, H, W, C) -> (B, D, H, width*C) float32: ``before`` zero voxels, the row, zeros
    up to ``width`` voxels (the row is cut where ``width`` is shorter)."""
    nb, d, h, w, channels = src.shape
    out = np.empty((nb, d, h, width * channels), np.float32)
    keep = max(0, min(w, width - before))
    out[..., : before * channels] = 0.0
    out[..., before * channels:(before + keep) * channels] = src.reshape(nb, d, h, w * channels)[..., : keep * channels]
    out[..., (before + keep) * channels:] = 0.0
    return out


def correlate(src: np.ndarray, kernel: np.ndarray, pad_before, out_spatial) -> np.ndarray:
    """Per-channel 3D correlation with implicit zero padding.

    Args:
        src: ``(B, D, H, W, C)`` float32.
        kernel: ``(kd, kh, kw, C)`` float32.
        pad_before: zeros before each spatial axis, 3 ints (voxels).
        out_spatial: ``(Do, Ho, Wo)`` output grid.

    Returns:
        ``(B, Do, Ho, Wo, C)`` float32 with
        ``out[b, o, c] = sum_t src[b, o + t - pad_before, c] * kernel[t, c]``.
    """
    nb, d, h, w, channels = src.shape
    do, ho, wo = (int(v) for v in out_spatial)
    padded = _pad_rows(src, int(pad_before[2]), wo + int(kernel.shape[2]) - 1)
    out = np.empty((nb, do, ho, wo * channels), np.float32)
    _correlate(padded, _tile(kernel, wo), np.asarray(pad_before[:2], np.int64), channels, out)
    return out.reshape(nb, do, ho, wo, channels)


def kernel_gradient(x: np.ndarray, upstream: np.ndarray, ksize, pad_before) -> np.ndarray:
    """Gradient of ``correlate(x, kernel, pad_before, upstream.shape[1:4])`` wrt ``kernel``.

    Args:
        x: ``(B, D, H, W, C)`` float32 forward input.
        upstream: ``(B, Do, Ho, Wo, C)`` float32 gradient of the loss wrt the output.
        ksize: ``(kd, kh, kw)``.
        pad_before: the forward pass's zeros before each spatial axis (voxels).

    Returns:
        ``(kd, kh, kw, C)`` float32, deterministic (fixed summation order).
    """
    nb, d, h, w, channels = x.shape
    _, do, ho, wo, _ = upstream.shape
    kd, kh, kw = (int(k) for k in ksize)
    padded = _pad_rows(x, int(pad_before[2]), wo + kw - 1)
    g2 = np.ascontiguousarray(upstream, dtype=np.float32).reshape(nb, do, ho, wo * channels)
    partial = np.empty((nb * do, kd, kh, kw, channels), np.float32)
    _kernel_grad_slabs(padded, g2, np.asarray(pad_before[:2], np.int64), channels, partial)
    out = np.empty(partial.shape[1:], np.float32)
    _sum_slabs(partial, out)
    return out
