"""Spatial batch norm's CPU fast path on NumPy input: which of the compiled loop kernels
(gpulayers.cpu_kernels.bn, float32/64) or the simple single-threaded NumPy paths below
(float16, or the kernels off) runs, by dtype and size. Batch norm keeps ``x`` itself in
the cache instead of a normalized copy.

(Max, average and sum pooling run the compiled loop kernels of gpulayers.cpu_kernels.pool,
or the general xp path without them; the blocked, threaded NumPy code that lived here is
gone: the kernels beat it everywhere, see benchmarks/README_cpu.md.)
"""
from __future__ import annotations

import numpy as np

from . import cpu_kernels
from .cpu_kernels import bn as _bnk   # imports no numba: its kernels compile on first call

__all__ = ["bn_train_forward", "bn_eval_forward", "bn_eval_forward_running", "bn_backward"]

#: BN (all four ops): from the *_FORWARD_MIN / *_BACKWARD_MIN sizes on, float32/64 run the
#: compiled kernels (gpulayers.cpu_kernels.bn) while cpu_kernels.enabled(); below them,
#: and for float16 or without the kernels, _bn_*_small from BN_TRAIN_SMALL_MIN /
#: BN_EVAL_SMALL_MIN on, and None (the caller's general path) below those.
#: Measured 2026-12-01, same machine, numba 0.68.1, float32, load average 0.6-1.6 (other
#: sessions on the cores): public forward and backward calls, kernels vs the code of
#: commit b5b5378 (general path below 65536 elements, _bn_*_small / blocked above),
#: alternating rounds, 31 each, medians after warm-up (/tmp script, kernels / before):
#: train forward 0.66 at (2, 3, 4, 5), 0.64 at 2048, 0.63 at 4096, 0.60 at 16384, 0.34 at
#: 100k; train backward (from that forward's cache) 0.99, 0.86, 0.82, 0.72-0.78, 0.27-0.35:
#: kernels at every size. Test mode, whose general-path backward (dout * scale from the
#: cached xhat) is cheap: forward + backward 29.6 vs 25.7 us at (2, 3, 4, 5), 30.5 vs 28.7
#: at 2048, 32.7 vs 32.0 at 4096, 40.7 vs 46.0 at 16384, 54 vs 144 at 100k: the kernels
#: from 8192 elements on.
BN_TRAIN_FORWARD_MIN = 0
BN_TRAIN_SMALL_MIN = 65_536
BN_EVAL_FORWARD_MIN = 8192
#: the fallback's: BN test-mode forward declines (None: the caller's general path, whose
#: backward from the cached xhat is one pass fewer) below this (measured 2026-12-01 for
#: BN_TRAIN_SMALL_MIN with the NumPy paths, not separately for test mode)
BN_EVAL_SMALL_MIN = BN_TRAIN_SMALL_MIN
#: the backward kernels at every size: a 'numpy_fast' cache of float32/64 comes from a
#: kernel forward while the kernels are on (from the train backward's measurement above)
BN_BACKWARD_MIN = 0
BN_EVAL_BACKWARD_MIN = 0
#: how the thresholds above were measured
SMALL_MEASUREMENT = ("2026-12-01, 2-core AMD EPYC, numpy 2.4.6, float32: "
                     "python scripts/bench.py --crossover")

# --------------------------------------------------------------------- batch norm
#
# The compiled loop kernels (gpulayers.cpu_kernels.bn) are BN's one CPU fast path, for
# float32 and float64 input while ``cpu_kernels.enabled()``. Other dtypes (float16) and
# runs without the kernels take the simple single-threaded _bn_*_small paths below, or
# None (the caller's general path) under BN_TRAIN_SMALL_MIN / BN_EVAL_SMALL_MIN.


_vecdot = getattr(np, "vecdot", None)   # NumPy >= 2.0


def _row_dots(a, b):
    """(n, P), (n, P) -> (n,): per-row dot products in the arrays' dtype (one read pass)."""
    if _vecdot is not None:
        return _vecdot(a, b)
    return np.einsum("ij,ij->i", a, b)


#: (x - mean) * a + b is computed as x * a + (b - mean * a) (one ufunc pass fewer) only
#: when every channel's |mean| / std is at most this (the extra rounding is ~this * eps,
#: relative to the output's scale)
_FOLD_MAX = 8.0

#: above this |mean| / std the rounding of the mean to the stats dtype would
#: show in x - mean (relative error ~ eps * ratio): such inputs take the general path
_MEAN_OVER_STD_MAX = 64.0


def _foldable(mean, invstd):
    """True when every channel's |mean| / std is at most ``_FOLD_MAX`` (False on NaN)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.all(np.abs(mean.astype(np.float64)) * invstd <= _FOLD_MAX))


def _kernel_planes(a, size_min):
    """The compiled kernels' C-contiguous (N, C, H*W) view of a (N, C, H, W) array, or
    None where they do not run (kernels off, a dtype they do not take, fewer than
    ``size_min`` elements)."""
    if a.size < size_min or a.dtype not in _bnk.DTYPES or not cpu_kernels.enabled():
        return None
    N, C, H, W = a.shape
    return np.ascontiguousarray(a).reshape(N, C, H * W)


def bn_train_forward(x, gamma, beta, eps, sd):
    """Spatial BN train forward of a NumPy x (N, C, H, W).

    Inputs:
    - x: array (N, C, H, W), float16/32/64
    - gamma, beta: (C,) arrays in the stats dtype sd
    - eps: float
    - sd: stats dtype (float32 for float16/32 x, float64 for float64)

    From ``BN_TRAIN_FORWARD_MIN`` elements on, float32/64 x runs the compiled kernel
    (cpu_kernels.bn.train_forward_planes: float64 statistics, shifted two-pass per chunk,
    Chan merges in a fixed order; y in one pass). Otherwise :func:`_bn_train_small` (the
    general path's arithmetic, single-threaded) from ``BN_TRAIN_SMALL_MIN`` elements on.

    Returns a tuple of:
    - out: array (N, C, H, W), dtype of x
    - mean, var (biased), invstd: (C,) arrays in sd
    or None -- the caller then uses the general path -- below ``BN_TRAIN_SMALL_MIN``
    elements off the kernel, or when some channel's |mean| / std exceeds
    ``_MEAN_OVER_STD_MAX`` on the kernel (the general path centres without rounding the
    mean first, and its backward keeps that accuracy).

    Every memory layout of x gives the bits of its C-contiguous copy.
    """
    x3 = _kernel_planes(x, BN_TRAIN_FORWARD_MIN)
    if x3 is None:
        if x.size < BN_TRAIN_SMALL_MIN:
            return None
        return _bn_train_small(x, gamma, beta, eps, sd)
    N, C, P = x3.shape
    out = np.empty(x.shape, x.dtype)
    mean, var, invstd = np.empty(C, sd), np.empty(C, sd), np.empty(C, sd)
    if not _bnk.train_forward_planes.run(x.size, x3, gamma, beta, float(eps),
                                         _bnk.plane_chunk(P), _MEAN_OVER_STD_MAX,
                                         out.reshape(N, C, P), mean, var, invstd):
        return None
    return out, mean, var, invstd


def bn_eval_forward(x, gamma, beta, mean, invstd, sd):
    """Spatial BN test-mode forward: (x - mean) * gamma * invstd + beta, dtype of x.

    Inputs: x (N, C, H, W); gamma, beta, mean, invstd: (C,) arrays in sd.

    The compiled kernel (cpu_kernels.bn.eval_forward_planes: one pass, float64
    arithmetic, rounded once) from ``BN_EVAL_FORWARD_MIN`` elements on for float32/64 x;
    otherwise :func:`_bn_eval_small` from ``BN_EVAL_SMALL_MIN`` elements on, and None
    (the caller's general path) below."""
    x3 = _kernel_planes(x, BN_EVAL_FORWARD_MIN)
    if x3 is None:
        if x.size < BN_EVAL_SMALL_MIN:
            return None
        return _bn_eval_small(x, gamma, beta, mean, invstd, sd)
    out = np.empty(x.shape, x.dtype)
    _bnk.eval_forward_planes.run(x.size, x3, gamma, beta, mean, invstd,
                                 _bnk.plane_chunk(x3.shape[2]), out.reshape(x3.shape))
    return out


def bn_eval_forward_running_takes(x):
    """True when :func:`bn_eval_forward_running` would run the kernel on x now (C-contiguous
    float32/64 NumPy x of at least ``BN_EVAL_FORWARD_MIN`` elements, the kernels on)."""
    return (x.__class__ is np.ndarray and x.ndim >= 3 and x.dtype in _bnk.DTYPES
            and x.size >= BN_EVAL_FORWARD_MIN and x.flags.c_contiguous
            and cpu_kernels.enabled())


def bn_eval_forward_running(x, gamma, beta, rm, rv, eps):
    """Spatial BN test-mode forward straight from the running statistics: the warmed call
    (batchnorm._forward_warm) of a forward whose checked call ran bn_eval_forward's kernel.

    Inputs:
    - x: C-contiguous float32/64 array (N, C, *spatial)
    - gamma, beta, rm, rv: (C,) arrays of x's dtype (the stats dtype of these dtypes)
    - eps: float

    Returns a tuple of:
    - out: array shaped like x: the checked path's bits (invstd = 1 / sqrt(rv + eps) in
      x's dtype, then cpu_kernels.bn.eval_forward_planes)
    - invstd: (C,) array
    - gamma: (C,) copy of gamma (for the cache: a later in-place update of gamma must not
      change the backward)
    or None where the kernel does not run now (see :func:`bn_eval_forward_running_takes`)
    or some running statistic is not finite or a running_var is negative: the caller then
    takes the checked path, which raises its error.
    """
    if not bn_eval_forward_running_takes(x):
        return None
    N, C = x.shape[:2]
    P = x.size // (N * C)
    out = np.empty(x.shape, x.dtype)
    g, invstd = np.empty(C, x.dtype), np.empty(C, x.dtype)
    if not _bnk.eval_forward_running_planes.run(
            x.size, x.reshape(N, C, P), gamma, beta, rm, rv, x.dtype.type(eps),
            _bnk.plane_chunk(P), out.reshape(N, C, P), g, invstd):
        return None
    return out, invstd, g


def _planes3(a):
    """C-contiguous (N, C, H*W) of a (N, C, H, W) array (so every layout gives the same bits)."""
    N, C, H, W = a.shape
    return np.ascontiguousarray(a).reshape(N, C, H * W)


def _channel_dots(a, b):
    """(N, C, P), (N, C, P) -> (C,): sum over n and p of a * b, as per-plane row dot
    products summed over N."""
    N, C, P = a.shape
    return _row_dots(a.reshape(N * C, P), b.reshape(N * C, P)).reshape(N, C).sum(axis=0)


def _bn_train_small(x, gamma, beta, eps, sd):
    """bn_train_forward single-threaded on the whole array, as the general path computes:
    shift by the pivot (each channel's first sample), subtract the shifted mean, M2 by row
    dot products; out = centred * (gamma * invstd) + beta."""
    x3 = _planes3(x)
    count = x3.shape[0] * x3.shape[2]
    pivot = x3[0, :, 0].astype(sd)
    t = np.subtract(x3, pivot[:, None], dtype=sd)
    shift_mean = (np.add.reduce(t, axis=(0, 2)) / count).astype(sd, copy=False)
    t -= shift_mean[:, None]
    var = (_channel_dots(t, t) / count).astype(sd, copy=False)
    mean = pivot + shift_mean
    invstd = (1 / np.sqrt(var + eps)).astype(sd, copy=False)
    t *= (gamma * invstd)[:, None]
    t += beta[:, None]
    return t.reshape(x.shape).astype(x.dtype, copy=False), mean, var, invstd


def _bn_eval_small(x, gamma, beta, mean, invstd, sd):
    """bn_eval_forward in three single-threaded ufunc passes: (x - mean) * scale + beta."""
    t = np.subtract(_planes3(x), mean[:, None], dtype=sd)
    t *= (gamma * invstd)[:, None]
    t += beta[:, None]
    return t.reshape(x.shape).astype(x.dtype, copy=False)


def _bn_backward_small(dout, x, gamma, mean, invstd, count, train, sd):
    """bn_backward single-threaded on the whole arrays: dbeta = sum(dout), dgamma =
    sum(dout * (x - mean)) * invstd by row dot products, then dx = scale * dout (test) or
    scale * dout + (x - mean) * k2 + k3 (train), k2 = -scale * invstd * dgamma / count,
    k3 = -scale * dbeta / count. In train mode where ``_foldable`` and all dtypes agree,
    without a centred copy: sum(dout * x) - mean * sum(dout), and
    dx = scale * dout + x * k2 + (k3 - mean * k2); test mode always centres (one pass
    fewer than the folded train form, and no check of the fold's condition)."""
    x3 = _planes3(x)
    d3 = _planes3(dout)
    raw = train and x3.dtype == d3.dtype == np.dtype(sd) and _foldable(mean, invstd)
    if d3.dtype != sd:
        d3 = d3.astype(sd)
    dbeta = np.add.reduce(d3, axis=(0, 2))
    if raw:
        xc = x3
        dgamma = (_channel_dots(d3, x3).astype(np.float64)
                  - mean.astype(np.float64) * dbeta).astype(sd) * invstd
    else:
        xc = np.subtract(x3, mean[:, None], dtype=sd)
        dgamma = _channel_dots(d3, xc) * invstd
    scale = gamma * invstd
    dx = d3 * scale[:, None]
    if train:
        k2 = -scale * invstd * dgamma / count
        k3 = -scale * dbeta / count
        if raw:
            k3 = (k3.astype(np.float64) - mean.astype(np.float64) * k2.astype(np.float64))
        dx += np.multiply(xc, k2.astype(sd)[:, None], out=None if raw else xc)
        dx += k3.astype(sd)[:, None]
    return dx.reshape(dout.shape).astype(dout.dtype, copy=False), dgamma, dbeta


def bn_backward(dout, x, gamma, mean, invstd, count, train, sd):
    """Spatial BN backward from x itself (no normalized copy in the cache).

    Inputs:
    - dout, x: arrays (N, C, H, W), one float dtype
    - gamma, mean, invstd: (C,) arrays in sd, as the forward kept them
    - count: N * H * W, the values per channel
    - train: whether the statistics were the batch's (else constants)
    - sd: stats dtype

    dbeta = sum(dout), dgamma = sum(dout * (x - mean)) * invstd; dx = scale * dout +
    (x - mean) * k2 + k3 (train) or scale * dout (test), scale = gamma * invstd. From
    ``BN_BACKWARD_MIN`` (train) or ``BN_EVAL_BACKWARD_MIN`` (test) elements on, float32/64
    runs the compiled kernel (cpu_kernels.bn.backward_planes: float64 sums in a fixed
    order, dx in one pass); otherwise :func:`_bn_backward_small`. Every memory layout of x
    and dout gives the bits of their C-contiguous copies.

    Returns a tuple of:
    - dx: array (N, C, H, W), dtype of dout
    - dgamma, dbeta: (C,) arrays in sd
    """
    size_min = BN_BACKWARD_MIN if train else BN_EVAL_BACKWARD_MIN
    x3 = _kernel_planes(x, size_min) if dout.dtype == x.dtype else None
    if x3 is None:
        return _bn_backward_small(dout, x, gamma, mean, invstd, count, train, sd)
    N, C, P = x3.shape
    if count != N * P:
        raise ValueError(f"bn_backward: count {count} is not N*H*W = {N * P} for x of shape "
                         f"{x.shape}")
    d3 = np.ascontiguousarray(dout).reshape(N, C, P)
    dx = np.empty(dout.shape, dout.dtype)
    dgamma, dbeta = np.empty(C, sd), np.empty(C, sd)
    _bnk.backward_planes.run(x.size, d3, x3, gamma, mean, invstd, bool(train),
                             _bnk.plane_chunk(P), dx.reshape(N, C, P), dgamma, dbeta)
    return dx, dgamma, dbeta
