"""Max and average pooling, and max unpooling: forward and backward passes.

Every function follows the CS231n contract: ``out, cache = *_forward(x, ...)``
and ``dx = *_backward(dout, cache)``, and computes with the array module of
its inputs (NumPy or CuPy).

Max pooling keeps PyTorch's semantics, which the article's code gets wrong:

- the gradient of a window goes to exactly ONE element, its first maximum in
  row-major window order (the article's backward sends it to every tied
  maximum, so the gradient of ``[1, 1]`` pooled to ``1`` was 2 instead of 1);
- a window holding NaN outputs NaN, and its index is the LAST NaN in window
  order (PyTorch's ``v > best || isnan(v)``);
- an all -inf window outputs -inf with the index of its first in-range element.

The max-pool cache holds neither the input nor the output: one compact
in-window offset per output element (``i*kw + j``, uint8 for windows of up to
256 elements), from which the backward pass and :func:`max_pool_indices`
recover positions.

Implementations, all sharing that cache and those semantics:

- ``*_naive``: the article's loop over output positions, fixed;
- ``*_reshape``: the article's reshape trick, when the windows tile the input;
- ``*_general``: plain xp code for every kernel/stride/pad/dilation/ceil_mode,
  looping over the kh*kw window taps only, so it runs unchanged on CuPy;
- ``*_fast`` and the plain entry points pick the fastest correct one (the CUDA
  kernels for CuPy inputs).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from . import numpy_fast
from .backend import device_scope, get_array_module
from .shapes import PoolGeometry, check_array, check_floating, pool_geometry

__all__ = [
    "MaxPoolCache", "AvgPoolCache", "UnpoolCache",
    "max_pool_forward", "max_pool_backward",
    "max_pool_forward_naive", "max_pool_backward_naive",
    "max_pool_forward_reshape", "max_pool_backward_reshape",
    "max_pool_forward_general", "max_pool_backward_general",
    "max_pool_forward_fast", "max_pool_backward_fast",
    "max_pool_indices",
    "avg_pool_forward", "avg_pool_backward",
    "max_unpool_forward", "max_unpool_backward",
]


@dataclass(frozen=True)
class MaxPoolCache:
    """What max-pool backward needs: the geometry, the input dtype and the
    compact in-window argmax offsets, array (N, C, Ho, Wo) of ``geom.offset_dtype``."""

    geom: PoolGeometry
    dtype: np.dtype
    offsets: object


@dataclass(frozen=True)
class AvgPoolCache:
    """What avg-pool backward needs: the geometry, the input dtype and the
    divisor of each window, float64 array (Ho, Wo) on the host."""

    geom: PoolGeometry
    dtype: np.dtype
    divisor: np.ndarray


@dataclass(frozen=True)
class UnpoolCache:
    """What max-unpool backward needs: input shape and dtype, flat target
    positions (int64, one per input element) and which of them won a shared
    target (bool, same shape)."""

    x_shape: tuple
    dtype: np.dtype
    targets: object
    winners: object
    out_shape: tuple


# --------------------------------------------------------------------------- checks

def _on_input_device(fn):
    """Run ``fn(a, ...)`` on the CUDA device of its first argument when that is a CuPy
    array on another device than the current one: allocations and launches follow it."""
    @functools.wraps(fn)
    def wrapper(a, *args, **kwargs):
        with device_scope(a):
            return fn(a, *args, **kwargs)
    return wrapper


def _check_x(x, pool_param, op):
    check_array(x, "x")
    check_floating(x, "x")
    return pool_geometry(x.shape, pool_param, op)


def _check_dout(dout, geom):
    check_array(dout, "dout")
    check_floating(dout, "dout")
    if tuple(dout.shape) != geom.output_shape:
        raise ValueError(f"dout has shape {tuple(dout.shape)} but the forward pass produced "
                         f"{geom.output_shape}: {geom.describe()}")


def _backward_inputs(dout, cache, cls):
    """Check a backward call's cache (a ``cls``) and dout; return (geom, xp, dout), dout
    in the forward input's dtype (so dx comes back in it, whatever dout's dtype)."""
    _check_cache(cache, cls)
    _check_dout(dout, cache.geom)
    arrays = (dout, cache.offsets) if cls is MaxPoolCache else (dout,)
    xp = get_array_module(*arrays)
    return cache.geom, xp, dout.astype(cache.dtype, copy=False)


def _check_cache(cache, cls):
    if not isinstance(cache, cls):
        raise TypeError(f"cache must be the {cls.__name__} returned by the forward pass, "
                        f"got {type(cache).__name__}")


def _acc_dtype(dtype):
    """Accumulation dtype: float32 for float16, else the dtype itself."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def _freeze(a):
    """Make a NumPy array read-only, so a cache cannot be modified by accident."""
    if isinstance(a, np.ndarray):
        a.flags.writeable = False
    return a


def _tap_view(padded, geom, i, j):
    """View of ``padded`` (N, C, Hp, Wp) holding tap (i, j) of every window:
    shape (N, C, Ho, Wo)."""
    h0, w0 = i * geom.dh, j * geom.dw
    return padded[:, :, h0:h0 + geom.sh * (geom.Ho - 1) + 1:geom.sh,
                  w0:w0 + geom.sw * (geom.Wo - 1) + 1:geom.sw]


def _padded(x, geom, fill, dtype=None):
    """x inside a buffer of ``geom.padded_shape`` filled with ``fill``;
    x itself when no padding or overhang is needed."""
    xp = get_array_module(x)
    hp, wp = geom.padded_shape
    if hp == geom.H and wp == geom.W and (dtype is None or dtype == x.dtype):
        return x
    buf = xp.full((geom.N, geom.C, hp, wp), fill, dtype=dtype or x.dtype)
    buf[:, :, geom.ph:geom.ph + geom.H, geom.pw:geom.pw + geom.W] = x
    return buf


def _crop(padded, geom):
    return padded[:, :, geom.ph:geom.ph + geom.H, geom.pw:geom.pw + geom.W]


# ------------------------------------------------------------------ general xp path

def _max_pool_forward_xp(x, geom):
    """Max pooling in plain xp code: one pass per window tap.

    Inputs:
    - x: array (N, C, H, W), NumPy or CuPy
    - geom: PoolGeometry of x

    Returns a tuple of:
    - out: array (N, C, Ho, Wo), dtype of x
    - offsets: array (N, C, Ho, Wo) of geom.offset_dtype, compact argmax offsets
    """
    xp = get_array_module(x)
    padded = _padded(x, geom, -np.inf)
    out = xp.full(geom.output_shape, -np.inf, dtype=x.dtype)
    first = xp.asarray(geom.first_valid_offset().astype(geom.offset_dtype))
    offsets = xp.empty(geom.output_shape, dtype=geom.offset_dtype)
    offsets[...] = first
    for i in range(geom.kh):
        for j in range(geom.kw):
            v = _tap_view(padded, geom, i, j)
            take = (v > out) | xp.isnan(v)
            xp.copyto(out, v, where=take)
            xp.copyto(offsets, xp.asarray(i * geom.kw + j, dtype=geom.offset_dtype), where=take)
    return out, offsets


def _max_pool_backward_xp(dout, offsets, geom):
    """Send each window's gradient to its argmax, in plain xp code.

    Deterministic: the windows' contributions are added tap by tap in a fixed
    order (float32 accumulation for float16).

    Inputs:
    - dout: array (N, C, Ho, Wo)
    - offsets: array (N, C, Ho, Wo), compact argmax offsets from the forward pass
    - geom: PoolGeometry

    Returns:
    - dx: array (N, C, H, W), dtype of dout
    """
    xp = get_array_module(dout, offsets)
    hp, wp = geom.padded_shape
    acc = _acc_dtype(dout.dtype)
    dpad = xp.zeros((geom.N, geom.C, hp, wp), dtype=acc)
    zero = xp.zeros((), dtype=acc)
    for i in range(geom.kh):
        for j in range(geom.kw):
            hit = offsets == (i * geom.kw + j)
            _tap_view(dpad, geom, i, j)[...] += xp.where(hit, dout.astype(acc, copy=False), zero)
    return xp.ascontiguousarray(_crop(dpad, geom)).astype(dout.dtype, copy=False)


def _use_kernels(xp, geom=None):
    """True when CuPy inputs should go to the CUDA kernels (GPULAYERS_KERNELS=0 disables)
    and the kernels take ``geom`` (padded sizes of one axis below 2**31); else the xp path
    runs."""
    if xp is np or os.environ.get("GPULAYERS_KERNELS", "1") == "0":
        return False
    return geom is None or kernel_fallback_reason(geom) is None


def kernel_fallback_reason(geom):
    """Why the max-pool CUDA kernels cannot take ``geom``, or None when they can; such
    input runs on the xp path instead."""
    dims = (geom.H + 2 * geom.ph, geom.W + 2 * geom.pw, geom.Ho, geom.Wo, geom.kh, geom.kw,
            geom.sh, geom.sw, geom.dh, geom.dw)  # padded positions are formed in int
    if max(dims) >= 2**31:
        return f"a size or parameter of 2**31 or more: {geom.describe()}"
    return None


@_on_input_device
def max_pool_forward_general(x, pool_param):
    """Max pooling through the general xp path (every geometry; NumPy or CuPy).

    Inputs:
    - x: array (N, C, H, W), float16/32/64
    - pool_param: dict with 'pool_height', 'pool_width' and optional 'stride',
      'pad', 'dilation', 'ceil_mode' (see gpulayers.shapes.pool_geometry)

    Returns a tuple of:
    - out: array (N, C, Ho, Wo)
    - cache: MaxPoolCache (compact argmax offsets; neither x nor out)
    """
    geom = _check_x(x, pool_param, "max")
    out, offsets = _max_pool_forward_xp(x, geom)
    return out, MaxPoolCache(geom, np.dtype(x.dtype), _freeze(offsets))


@_on_input_device
def max_pool_backward_general(dout, cache):
    """Backward pass of max pooling through the general xp path.

    Inputs:
    - dout: array (N, C, Ho, Wo), upstream derivatives
    - cache: MaxPoolCache from any max_pool_forward_* function

    Returns:
    - dx: array (N, C, H, W)
    """
    geom, _, dout = _backward_inputs(dout, cache, MaxPoolCache)
    return _max_pool_backward_xp(dout, cache.offsets, geom)


# ------------------------------------------------------------------------ naive path

def _window_taps(o, stride, pad, dilation, kernel, size):
    """(first in-range tap, slice of in-range input positions) of window o along one axis."""
    start = o * stride - pad
    taps = [t for t in range(kernel) if 0 <= start + t * dilation < size]
    t0, t1 = taps[0], taps[-1]
    return t0, slice(start + t0 * dilation, start + t1 * dilation + 1, dilation)


@_on_input_device
def max_pool_forward_naive(x, pool_param):
    """The article's naive max pooling (a Python loop over output positions), fixed.

    Inputs:
    - x: array (N, C, H, W)
    - pool_param: dict, see max_pool_forward_general

    Returns a tuple of:
    - out: array (N, C, Ho, Wo)
    - cache: MaxPoolCache
    """
    geom = _check_x(x, pool_param, "max")
    xp = get_array_module(x)
    N, C = geom.N, geom.C
    out = xp.empty(geom.output_shape, dtype=x.dtype)
    offsets = xp.empty(geom.output_shape, dtype=geom.offset_dtype)
    for oh in range(geom.Ho):
        i0, hs = _window_taps(oh, geom.sh, geom.ph, geom.dh, geom.kh, geom.H)
        for ow in range(geom.Wo):
            j0, ws = _window_taps(ow, geom.sw, geom.pw, geom.dw, geom.kw, geom.W)
            win = x[:, :, hs, ws]
            nh, nw = win.shape[2], win.shape[3]
            flat = win.reshape(N, C, nh * nw)
            local = xp.argmax(flat, axis=2) if flat.size else xp.zeros((N, C), dtype=np.int64)
            nan = xp.isnan(flat)
            last_nan = nh * nw - 1 - xp.argmax(nan[:, :, ::-1], axis=2) if flat.size else local
            local = xp.where(nan.any(axis=2), last_nan, local)
            out[:, :, oh, ow] = xp.take_along_axis(flat, local[:, :, None], axis=2)[:, :, 0]
            offsets[:, :, oh, ow] = (i0 + local // nw) * geom.kw + (j0 + local % nw)
    return out, MaxPoolCache(geom, np.dtype(x.dtype), _freeze(offsets))


@_on_input_device
def max_pool_backward_naive(dout, cache):
    """The article's naive max-pool backward, fixed: each window's gradient
    goes to its one recorded argmax, not to every tied maximum.

    Inputs:
    - dout: array (N, C, Ho, Wo)
    - cache: MaxPoolCache

    Returns:
    - dx: array (N, C, H, W)
    """
    geom, xp, dout = _backward_inputs(dout, cache, MaxPoolCache)
    acc = _acc_dtype(dout.dtype)
    dx = xp.zeros(geom.input_shape, dtype=acc)
    n_idx = xp.arange(geom.N)[:, None]
    c_idx = xp.arange(geom.C)[None, :]
    for oh in range(geom.Ho):
        for ow in range(geom.Wo):
            off = cache.offsets[:, :, oh, ow].astype(np.int64)
            h = oh * geom.sh - geom.ph + (off // geom.kw) * geom.dh
            w = ow * geom.sw - geom.pw + (off % geom.kw) * geom.dw
            dx[n_idx, c_idx, h, w] += dout[:, :, oh, ow].astype(acc)
    return dx.astype(dout.dtype, copy=False)


# ---------------------------------------------------------------------- reshape path

def _check_tiles(geom):
    if not geom.tiles:
        raise ValueError(
            "the reshape max pool needs windows that tile the input exactly: "
            "stride == kernel, no padding, no dilation, and H, W divisible by the kernel; "
            f"got {geom.describe()}")


@_on_input_device
def max_pool_forward_reshape(x, pool_param):
    """The article's reshape max pooling, for windows that tile the input.

    Inputs:
    - x: array (N, C, H, W)
    - pool_param: dict; stride must equal the window, no pad/dilation, and
      the window must divide H and W (ValueError otherwise)

    Returns a tuple of:
    - out: array (N, C, H/kh, W/kw)
    - cache: MaxPoolCache
    """
    geom = _check_x(x, pool_param, "max")
    _check_tiles(geom)
    xp = get_array_module(x)
    K = geom.window_size
    windows = x.reshape(geom.N, geom.C, geom.Ho, geom.kh, geom.Wo, geom.kw)
    windows = windows.transpose(0, 1, 2, 4, 3, 5).reshape(geom.output_shape + (K,))
    local = xp.argmax(windows, axis=-1)
    nan = xp.isnan(windows)
    local = xp.where(nan.any(axis=-1), K - 1 - xp.argmax(nan[..., ::-1], axis=-1), local)
    out = xp.take_along_axis(windows, local[..., None], axis=-1)[..., 0]
    return out, MaxPoolCache(geom, np.dtype(x.dtype), _freeze(local.astype(geom.offset_dtype)))


@_on_input_device
def max_pool_backward_reshape(dout, cache):
    """Backward pass of the reshape max pool: one-hot of the recorded argmax
    times dout, reshaped back (exactly one element per window gets gradient).

    Inputs:
    - dout: array (N, C, Ho, Wo)
    - cache: MaxPoolCache of a tiling geometry

    Returns:
    - dx: array (N, C, H, W)
    """
    geom, xp, dout = _backward_inputs(dout, cache, MaxPoolCache)
    _check_tiles(geom)
    K = geom.window_size
    hit = cache.offsets[..., None] == xp.arange(K, dtype=cache.offsets.dtype)
    dwin = xp.where(hit, dout[..., None], xp.zeros((), dtype=dout.dtype))
    dwin = dwin.reshape(geom.N, geom.C, geom.Ho, geom.Wo, geom.kh, geom.kw)
    return xp.ascontiguousarray(dwin.transpose(0, 1, 2, 4, 3, 5)).reshape(geom.input_shape)


# ------------------------------------------------------------------------- dispatch

@_on_input_device
def max_pool_forward_fast(x, pool_param):
    """Max pooling by the fastest correct implementation for x's backend:
    the CUDA kernels for CuPy arrays; on NumPy the blocked, threaded path of
    gpulayers.numpy_fast (the general path for dilated windows); on CuPy with
    the kernels turned off (GPULAYERS_KERNELS=0), the reshape trick where the
    windows tile the input, else the general path.

    Inputs:
    - x: array (N, C, H, W)
    - pool_param: dict, see max_pool_forward_general

    Returns a tuple of:
    - out: array (N, C, Ho, Wo)
    - cache: MaxPoolCache
    """
    geom = _check_x(x, pool_param, "max")
    xp = get_array_module(x)
    if _use_kernels(xp, geom):
        from .cuda import pool_kernels
        out, offsets = pool_kernels.max_pool_forward_gpu(x, geom)
        return out, MaxPoolCache(geom, np.dtype(x.dtype), offsets)
    fast = numpy_fast.max_pool_forward(x, geom, _max_pool_forward_xp) if xp is np else None
    if fast is not None:  # blocked, threaded NumPy (no dilation)
        return fast[0], MaxPoolCache(geom, np.dtype(x.dtype), _freeze(fast[1]))
    out, offsets = _max_pool_forward_xp(x, geom)
    return out, MaxPoolCache(geom, np.dtype(x.dtype), _freeze(offsets))


@_on_input_device
def max_pool_backward_fast(dout, cache):
    """Backward pass matching max_pool_forward_fast (any MaxPoolCache works).

    Inputs:
    - dout: array (N, C, Ho, Wo)
    - cache: MaxPoolCache

    Returns:
    - dx: array (N, C, H, W)
    """
    geom, xp, dout = _backward_inputs(dout, cache, MaxPoolCache)
    if _use_kernels(xp, geom):
        from .cuda import pool_kernels
        return pool_kernels.max_pool_backward_gpu(dout, cache.offsets, geom)
    if xp is np:
        return numpy_fast.max_pool_backward(dout, cache.offsets, geom)  # blocked np.add.at
    if geom.tiles:
        return max_pool_backward_reshape(dout, cache)
    return _max_pool_backward_xp(dout, cache.offsets, geom)


def max_pool_forward(x, pool_param):
    """Forward pass of max pooling, by the fastest correct implementation.

    Inputs:
    - x: array (N, C, H, W), float16/32/64, NumPy or CuPy
    - pool_param: dict with 'pool_height', 'pool_width' (required), 'stride'
      (int or pair, default the window), 'pad' (int or pair, 0), 'dilation'
      (int or pair, 1), 'ceil_mode' (False)

    Returns a tuple of:
    - out: array (N, C, Ho, Wo), sizes by PyTorch's max_pool2d rules
    - cache: MaxPoolCache (compact argmax offsets only)
    """
    return max_pool_forward_fast(x, pool_param)


def max_pool_backward(dout, cache):
    """Backward pass of max pooling: each window's gradient goes to its first
    maximum (the last NaN where the window holds NaN). Deterministic.

    Inputs:
    - dout: array (N, C, Ho, Wo)
    - cache: MaxPoolCache

    Returns:
    - dx: array (N, C, H, W)
    """
    return max_pool_backward_fast(dout, cache)


def max_pool_indices(cache):
    """Flat indices of each window's argmax into its H*W input plane.

    Inputs:
    - cache: MaxPoolCache from a max_pool_forward_* function

    Returns:
    - indices: int64 array (N, C, Ho, Wo), the numbers PyTorch's
      ``max_pool2d(..., return_indices=True)`` returns
    """
    _check_cache(cache, MaxPoolCache)
    with device_scope(cache.offsets):
        return _indices(cache.geom, cache.offsets)


def _indices(geom, offsets):
    xp = get_array_module(offsets)
    off = offsets.astype(np.int64)
    oh = xp.arange(geom.Ho, dtype=np.int64)[:, None]
    ow = xp.arange(geom.Wo, dtype=np.int64)[None, :]
    h = oh * geom.sh - geom.ph + (off // geom.kw) * geom.dh
    w = ow * geom.sw - geom.pw + (off % geom.kw) * geom.dw
    return h * geom.W + w


# ------------------------------------------------------------------------ avg pooling

def _avg_divisor(geom, count_include_pad):
    """float64 (Ho, Wo): PyTorch's avg_pool2d divisor of each window. The
    ceil_mode overhang past the right padding is never counted."""
    def axis(n_out, stride, pad, kernel, size):
        start = np.arange(n_out) * stride - pad
        end = np.minimum(start + kernel, size + pad)
        full = end - start
        inside = np.minimum(end, size) - np.maximum(start, 0)
        return full, inside
    fh, ih = axis(geom.Ho, geom.sh, geom.ph, geom.kh, geom.H)
    fw, iw = axis(geom.Wo, geom.sw, geom.pw, geom.kw, geom.W)
    if count_include_pad:
        return (fh[:, None] * fw[None, :]).astype(np.float64)
    return (ih[:, None] * iw[None, :]).astype(np.float64)


@_on_input_device
def avg_pool_forward(x, pool_param):
    """Forward pass of average pooling (PyTorch's avg_pool2d semantics).

    Inputs:
    - x: array (N, C, H, W)
    - pool_param: dict with 'pool_height', 'pool_width' and optional 'stride',
      'pad', 'ceil_mode', 'count_include_pad' (True); no dilation

    Returns a tuple of:
    - out: array (N, C, Ho, Wo)
    - cache: AvgPoolCache
    """
    geom = _check_x(x, pool_param, "avg")
    xp = get_array_module(x)
    divisor = _freeze(_avg_divisor(geom, pool_param.get("count_include_pad", True)))
    acc = _acc_dtype(x.dtype)
    padded = _padded(x, geom, 0, dtype=acc)
    total = xp.zeros(geom.output_shape, dtype=acc)
    for i in range(geom.kh):
        for j in range(geom.kw):
            total += _tap_view(padded, geom, i, j)
    total /= xp.asarray(divisor, dtype=acc)
    return total.astype(x.dtype, copy=False), AvgPoolCache(geom, np.dtype(x.dtype), divisor)


@_on_input_device
def avg_pool_backward(dout, cache):
    """Backward pass of average pooling: dout / divisor spread over each window.

    Inputs:
    - dout: array (N, C, Ho, Wo)
    - cache: AvgPoolCache

    Returns:
    - dx: array (N, C, H, W)
    """
    geom, xp, dout = _backward_inputs(dout, cache, AvgPoolCache)
    acc = _acc_dtype(dout.dtype)
    share = dout.astype(acc) / xp.asarray(cache.divisor, dtype=acc)
    hp, wp = geom.padded_shape
    dpad = xp.zeros((geom.N, geom.C, hp, wp), dtype=acc)
    for i in range(geom.kh):
        for j in range(geom.kw):
            _tap_view(dpad, geom, i, j)[...] += share
    return xp.ascontiguousarray(_crop(dpad, geom)).astype(dout.dtype, copy=False)


# ---------------------------------------------------------------------- max unpooling

def _unpool_output_shape(x_shape, output_size):
    N, C = x_shape[:2]
    if isinstance(output_size, (str, bytes)) or not hasattr(output_size, "__len__"):
        raise TypeError(f"output_size must be a tuple of ints (H, W) or (N, C, H, W), got "
                        f"{output_size!r} ({type(output_size).__name__}) for x of shape {x_shape}")
    if any(isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer))
           for s in output_size):
        raise TypeError(f"output_size must hold ints only, got {tuple(output_size)!r} for x of "
                        f"shape {x_shape}")
    size = tuple(int(s) for s in output_size)
    if len(size) == 4:
        if size[:2] != (N, C):
            raise ValueError(f"output_size {size} does not match x of shape {x_shape}")
        size = size[2:]
    if len(size) != 2 or size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"output_size must be (H, W) or (N, C, H, W) with H, W > 0, "
                         f"got {tuple(output_size)} for x of shape {x_shape}")
    return (N, C) + size


@_on_input_device
def max_unpool_forward(x, indices, output_size):
    """Max unpooling: put each value back at its pooled position (PyTorch's max_unpool2d).

    Where several inputs of one plane point at the same position, the last one
    in row-major order wins (as PyTorch on the CPU; deterministic here on
    every backend), and only it receives gradient in the backward pass.

    Inputs:
    - x: array (N, C, Ho, Wo), e.g. a max pool's output
    - indices: integer array (N, C, Ho, Wo) of flat indices into each H*W
      output plane, e.g. from max_pool_indices
    - output_size: (H, W) or (N, C, H, W)

    Returns a tuple of:
    - out: array (N, C, H, W), zeros except at the indexed positions
    - cache: UnpoolCache
    """
    check_array(x, "x")
    check_array(indices, "indices")
    check_floating(x, "x")
    if x.ndim != 4:
        raise ValueError(f"max unpooling expects x of shape (N, C, Ho, Wo), got shape {tuple(x.shape)}")
    if np.dtype(indices.dtype).kind not in "iu":
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if tuple(indices.shape) != tuple(x.shape):
        raise ValueError(f"indices of shape {tuple(indices.shape)} do not match x of shape "
                         f"{tuple(x.shape)}")
    xp = get_array_module(x, indices)
    out_shape = _unpool_output_shape(tuple(x.shape), output_size)
    N, C, H, W = out_shape
    idx = indices.astype(np.int64).reshape(N * C, -1)
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= H * W:
            raise ValueError(f"max unpooling index out of range: indices span [{lo}, {hi}] but "
                             f"the output plane has {H}x{W} = {H * W} positions "
                             f"(x shape {tuple(x.shape)}, output {out_shape})")
    targets = (idx + xp.arange(N * C, dtype=np.int64)[:, None] * (H * W)).reshape(-1)
    order = xp.argsort(targets, kind="stable")
    sorted_t = targets[order]
    last = xp.ones(sorted_t.shape, dtype=bool)
    if sorted_t.size > 1:
        last[:-1] = sorted_t[1:] != sorted_t[:-1]
    winners = xp.zeros(targets.shape, dtype=bool)
    winners[order[last]] = True
    out = xp.zeros(N * C * H * W, dtype=x.dtype)
    out[targets[winners]] = x.reshape(-1)[winners]
    cache = UnpoolCache(tuple(x.shape), np.dtype(x.dtype), _freeze(targets), _freeze(winners),
                        out_shape)
    return out.reshape(out_shape), cache


@_on_input_device
def max_unpool_backward(dout, cache):
    """Backward pass of max unpooling: gather dout at each input's position.

    Inputs:
    - dout: array (N, C, H, W)
    - cache: UnpoolCache

    Returns:
    - dx: array (N, C, Ho, Wo)
    """
    _check_cache(cache, UnpoolCache)
    check_array(dout, "dout")
    check_floating(dout, "dout")
    if tuple(dout.shape) != cache.out_shape:
        raise ValueError(f"dout has shape {tuple(dout.shape)} but max unpooling produced "
                         f"{cache.out_shape}")
    xp = get_array_module(dout, cache.targets)
    dout = dout.astype(cache.dtype, copy=False)
    dx = xp.where(cache.winners, dout.reshape(-1)[cache.targets], xp.zeros((), dtype=dout.dtype))
    return dx.reshape(cache.x_shape)
