"""Max, average, sum and adaptive pooling, and max unpooling, over 1, 2 or 3 spatial
axes: forward and backward passes.

Every function follows the CS231n contract: ``out, cache = *_forward(x, ...)``
and ``dx = *_backward(dout, cache)``, and computes with the array module of
its inputs (NumPy or CuPy). The rank d comes from x: (N, C, L), (N, C, H, W) or
(N, C, D, H, W); pool_param is parsed by :func:`gpulayers.shapes.pool_geometry`.

Max pooling (fixed windows and adaptive) keeps PyTorch's semantics, which the
article's code gets wrong:

- the gradient of a window goes to exactly ONE element, its first maximum in
  row-major window order (the article's backward sends it to every tied
  maximum, so the gradient of ``[1, 1]`` pooled to ``1`` was 2 instead of 1);
- a window holding NaN outputs NaN, and its index is the LAST NaN in window
  order (PyTorch's ``v > best || isnan(v)``);
- an all -inf window outputs -inf with the index of its first in-range element.

The max-pool caches hold neither the input nor the output: one compact
in-window offset per output element (row-major over the kernel, ``i*kw + j`` in
2-D; over ``AdaptiveGeometry.window`` for adaptive pooling; uint8 for windows of
up to 256 elements), from which the backward pass and :func:`max_pool_indices`
recover positions.

Max-pool implementations, all sharing that cache and those semantics:

- ``*_naive``: the article's loop over output positions, fixed;
- ``*_reshape``: the article's reshape trick, when the windows tile the input;
- ``*_general``: plain xp code for every kernel/stride/pad/dilation/ceil_mode,
  looping over the window taps only, so it runs unchanged on CuPy;
- ``*_fast`` and the plain entry points pick the fastest correct one: the CUDA
  kernels for CuPy inputs; on NumPy the compiled CPU loop kernels of
  ``gpulayers.cpu_kernels.pool`` (every rank, layout and float dtype; numba), and the
  general path when those are off (``GPULAYERS_CPU_KERNELS=0``) or numba is missing.

Average and sum pooling sum axis by axis (separable passes of strided views; the CPU
kernels keep that order of sums, bit for bit, in every layout);
adaptive pooling loops over the taps of the largest window per axis, with masks
where the windows of an axis differ in length. Every backward is deterministic
(a fixed order of sums, no atomics) and accumulates float16 in float32.
"""
from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass

import numpy as np

from . import backend, cpu_kernels
from .cpu_kernels import pool as cpu_pool         # imports no numba: it compiles on first call
from .cuda import pool_kernels, pool_nd_kernels   # import no CuPy: their launchers do
from .backend import NO_SCOPE, device_scope, get_array_module
from .shapes import (AdaptiveGeometry, PoolGeometry, acc_dtype, adaptive_geometry,
                     channels_last_strided, check_array, check_data_format, check_floating,
                     check_pool_options, from_channels_first_shape, pool_data_format,
                     pool_geometry, to_channels_first_shape)

__all__ = [
    "MaxPoolCache", "AvgPoolCache", "SumPoolCache", "AdaptiveAvgPoolCache",
    "AdaptiveMaxPoolCache", "UnpoolCache", "UnpoolKernelCache",
    "max_pool_forward", "max_pool_backward",
    "max_pool_forward_naive", "max_pool_backward_naive",
    "max_pool_forward_reshape", "max_pool_backward_reshape",
    "max_pool_forward_general", "max_pool_backward_general",
    "max_pool_forward_fast", "max_pool_backward_fast",
    "max_pool_indices",
    "avg_pool_forward", "avg_pool_backward",
    "sum_pool_forward", "sum_pool_backward",
    "adaptive_avg_pool_forward", "adaptive_avg_pool_backward",
    "adaptive_max_pool_forward", "adaptive_max_pool_backward",
    "max_unpool_forward", "max_unpool_backward",
]


# ----------------------------------------------------------------------------- caches
#
# Every cache records the ``layout`` of its forward pass:
# - 'channels_first': x, out, dout, dx and the cached arrays are (N, C, *spatial);
# - 'channels_last' (data_format='channels_last'): all of them are (N, *spatial, C);
# - 'channels_last_strided': data_format='channels_first' given an x in PyTorch's channels_last
#   memory format (channels_last_strided(x)): the caller's arrays are (N, C, *spatial) with
#   channels-last strides; the cached arrays (offsets, unpool targets) are (N, *spatial, C),
#   the internal representation, and outputs are moveaxis views of channels-last results.
# The geometry is always the (N, C, *spatial) one.

@dataclass(frozen=True)
class MaxPoolCache:
    """What max-pool backward needs: the geometry, the input dtype and the
    compact in-window argmax offsets, array (N, C, *out) of ``geom.offset_dtype``."""

    geom: PoolGeometry
    dtype: np.dtype
    offsets: object
    layout: str = "channels_first"


@dataclass(frozen=True)
class AvgPoolCache:
    """What avg-pool backward needs: the geometry, the input dtype, the divisor of
    each window (float64 array of shape ``geom.out`` on the host, read-only) and the
    options it came from (for the CUDA kernels)."""

    geom: PoolGeometry
    dtype: np.dtype
    divisor: np.ndarray
    count_include_pad: bool = True
    divisor_override: object = None
    layout: str = "channels_first"


@dataclass(frozen=True)
class SumPoolCache:
    """What sum-pool backward needs: the geometry and the input dtype."""

    geom: PoolGeometry
    dtype: np.dtype
    layout: str = "channels_first"


@dataclass(frozen=True)
class AdaptiveAvgPoolCache:
    """What adaptive avg-pool backward needs: the adaptive geometry and the input dtype."""

    geom: AdaptiveGeometry
    dtype: np.dtype
    layout: str = "channels_first"


@dataclass(frozen=True)
class AdaptiveMaxPoolCache:
    """What adaptive max-pool backward needs: the adaptive geometry, the input dtype and
    the compact argmax offsets over ``geom.window`` (row-major), array (N, C, *out) of
    ``geom.offset_dtype``."""

    geom: AdaptiveGeometry
    dtype: np.dtype
    offsets: object
    layout: str = "channels_first"


@dataclass(frozen=True)
class UnpoolCache:
    """What max-unpool backward needs (made by the xp path): input shape and dtype, flat
    target positions (int64, one per input element) and which of them won a shared
    target (bool, same shape)."""

    x_shape: tuple
    dtype: np.dtype
    targets: object
    winners: object
    out_shape: tuple
    layout: str = "channels_first"


@dataclass(frozen=True)
class UnpoolKernelCache:
    """What max-unpool backward needs (made by the CUDA kernel path): input shape and
    dtype, the indices (a contiguous int64 copy, shaped like x), the forward's winners
    (per output element the flat index of the input that won it, or -1: the backward is a
    gather with them, no atomics) and the output shape."""

    x_shape: tuple
    dtype: np.dtype
    indices: object
    winners: object
    out_shape: tuple
    layout: str = "channels_first"


def _cache(cls, **fields):
    """A frozen cache dataclass made without its generated __init__ (which sets each field
    through object.__setattr__): the same object, for a fraction of the host time. Every
    field is given; ``dtype`` must be an np.dtype (an array's .dtype is)."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


# Which forward makes each cache (for the error messages of the backward passes).
_MADE_BY = {MaxPoolCache: "max_pool_forward*", AvgPoolCache: "avg_pool_forward",
            SumPoolCache: "sum_pool_forward", AdaptiveAvgPoolCache: "adaptive_avg_pool_forward",
            AdaptiveMaxPoolCache: "adaptive_max_pool_forward",
            UnpoolCache: "max_unpool_forward", UnpoolKernelCache: "max_unpool_forward"}


# --------------------------------------------------------------------------- checks

def _on_input_device(fn):
    """Run ``fn(a, ...)`` on the CUDA device of its first argument when that is a CuPy
    array on another device than the current one: allocations and launches follow it."""
    @functools.wraps(fn)
    def wrapper(a, *args, **kwargs):
        scope = device_scope(a)
        if scope is NO_SCOPE:
            return fn(a, *args, **kwargs)
        with scope:
            return fn(a, *args, **kwargs)
    return wrapper


# ------------------------------------------------------------------------- layouts

def _layout(x, data_format):
    """The layout of a forward pass (see the caches): data_format, or
    'channels_last_strided' for a channels_first x in the channels_last memory format."""
    if data_format == "channels_last":
        return "channels_last"
    return "channels_last_strided" if channels_last_strided(x) else "channels_first"


def _is_cl(layout):
    """True when the internal arrays of ``layout`` are channels-last (N, *spatial, C)."""
    return layout != "channels_first"


def _internal(a, layout):
    """The caller's array ``a`` in the internal representation of ``layout`` (a view)."""
    if layout == "channels_last_strided":
        return get_array_module(a).moveaxis(a, 1, -1)
    return a


def _external(a, layout):
    """An internal result ``a`` as the caller gets it (a moveaxis view for the strided one:
    channels-first shape, channels-last strides, PyTorch's memory format kept)."""
    if layout == "channels_last_strided":
        return get_array_module(a).moveaxis(a, -1, 1)
    return a


def _caller_shape(shape, layout):
    """The caller-side shape of an (N, C, *spatial) shape in ``layout``."""
    return from_channels_first_shape(shape, "channels_last" if layout == "channels_last"
                                     else "channels_first")


def _internal_shape(shape, cl):
    """The internal shape of an (N, C, *spatial) shape: (N, *spatial, C) when ``cl``."""
    return from_channels_first_shape(shape, "channels_last" if cl else "channels_first")


def _sp0(cl):
    """Index of the first spatial axis of an internal array."""
    return 1 if cl else 2


# Checked forwards: (type of x, shape, strides, dtype, op, pool_param items) -> (geom, layout,
# pool_param values). Everything _check_x_full decides follows from that key (the layout
# from shape and strides), so a warm call costs the key and one lookup, and the values'
# identity check keeps typed values apart that compare equal (2.0 == 2, True == 1): a hit
# needs the very objects that passed the checks (tuples are immutable; lists are unhashable
# and never make a key). Any other call runs every check.
_CHECKED = {}
_is = operator.is_


def _check_x(x, pool_param, op):
    """(geom, layout) of a pooling forward's x and pool_param."""
    if pool_param.__class__ is dict:
        try:
            key = (x.__class__, x.shape, x.strides, x.dtype, op, tuple(pool_param.items()))
            hit = _CHECKED.get(key)
        except (AttributeError, TypeError):   # not an array, or an unhashable value
            key = hit = None
        if hit is not None and all(map(_is, hit[2], pool_param.values())):
            return hit[0], hit[1]
        geom, layout = _check_x_full(x, pool_param, op)
        if key is not None:
            if len(_CHECKED) >= 1024:
                _CHECKED.clear()
            _CHECKED[key] = (geom, layout, tuple(pool_param.values()))
        return geom, layout
    return _check_x_full(x, pool_param, op)


def _check_x_full(x, pool_param, op):
    check_array(x, "x")
    data_format = pool_data_format(pool_param)
    check_floating(x, "x")
    if data_format == "channels_last" and x.ndim not in (3, 4, 5):
        raise ValueError(f"pooling with data_format='channels_last' expects x of shape (N, L, C), "
                         f"(N, H, W, C) or (N, D, H, W, C), got {x.ndim}-D shape "
                         f"{tuple(x.shape)}")
    geom = pool_geometry(to_channels_first_shape(x.shape, data_format), pool_param, op)
    return geom, _layout(x, data_format)


_DOUT_SHAPES = {}   # (geom, layout) -> the dout shape a backward expects (geom hashes fast)


def _check_dout(dout, geom, layout="channels_first"):
    check_array(dout, "dout")
    check_floating(dout, "dout")
    want = _DOUT_SHAPES.get((geom, layout))
    if want is None:
        want = _caller_shape(geom.output_shape, layout)
        if len(_DOUT_SHAPES) >= 1024:
            _DOUT_SHAPES.clear()
        _DOUT_SHAPES[(geom, layout)] = want
    if tuple(dout.shape) != want:
        where = " (data_format='channels_last')" if layout == "channels_last" else ""
        raise ValueError(f"dout has shape {tuple(dout.shape)} but the forward pass produced "
                         f"{want}{where}: {geom.describe()}")


def _backward_inputs(dout, cache, *classes):
    """Check a backward call's cache (one of ``classes``) and dout; return (geom, xp, dout,
    cl): dout in the forward input's dtype (so dx comes back in it, whatever dout's dtype)
    and in the internal representation (channels-last when ``cl``)."""
    _check_cache(cache, *classes)
    _check_dout(dout, cache.geom, cache.layout)
    offsets = getattr(cache, "offsets", None)
    xp = get_array_module(dout) if offsets is None else get_array_module(dout, offsets)
    if dout.dtype != cache.dtype:
        dout = dout.astype(cache.dtype, copy=False)
    dout = _internal(dout, cache.layout)
    return cache.geom, xp, dout, _is_cl(cache.layout)


def _check_cache(cache, *classes):
    if not isinstance(cache, classes):
        names = " or ".join(c.__name__ for c in classes)
        makers = sorted({_MADE_BY[c] for c in classes})
        got = type(cache).__name__
        if type(cache) in _MADE_BY:
            got += f" (from {_MADE_BY[type(cache)]})"
        raise TypeError(f"cache must be the {names} returned by {' or '.join(makers)}, "
                        f"got {got}")


def _freeze(a):
    """Make a NumPy array read-only, so a cache cannot be modified by accident."""
    if isinstance(a, np.ndarray):
        a.flags.writeable = False
    return a


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


def _at(ndim, axis, index):
    """Index tuple selecting ``index`` along ``axis`` of an ndim-array (all of the others)."""
    key = [slice(None)] * ndim
    key[axis] = index
    return tuple(key)


def _along(v, ndim, axis):
    """Reshape the 1-D host array v to broadcast along ``axis`` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


# ------------------------------------------------------------------- window taps

def _span(n_out, stride, pad, phase, size):
    """Outputs whose tap at ``phase`` (= t*dilation) lies inside the input along one axis:
    (first output, its input position, count); output o + m reads input i0 + m*stride."""
    o0 = max(0, -(-(pad - phase) // stride))
    i0 = o0 * stride - pad + phase
    if o0 >= n_out or i0 >= size:
        return o0, i0, 0
    return o0, i0, min(n_out - o0, (size - 1 - i0) // stride + 1)


def _axis_tap(geom, a, t):
    """(input slice, output slice) of tap t along spatial axis a: the outputs whose tap t is
    in range and the input positions they read; None when no output's is."""
    s = geom.stride[a]
    o0, i0, n = _span(geom.out[a], s, geom.pad[a], t * geom.dilation[a], geom.size[a])
    if n == 0:
        return None
    return slice(i0, i0 + (n - 1) * s + 1, s), slice(o0, o0 + n)


def _taps(geom, cl=False):
    """Every window tap with an in-range input for some window, in row-major order:
    (compact offset, input index, output index), the indices over the spatial axes
    (leading axes: all; with ``cl``, of channels-last arrays (N, *spatial, C))."""
    head = (slice(None),) if cl else (Ellipsis,)
    per_axis = [[_axis_tap(geom, a, t) for t in range(geom.kernel[a])] for a in range(geom.d)]
    for offset, tap in enumerate(itertools.product(*(range(k) for k in geom.kernel))):
        spans = [per_axis[a][t] for a, t in enumerate(tap)]
        if any(sp is None for sp in spans):
            continue
        yield (offset, head + tuple(sp[0] for sp in spans),
               head + tuple(sp[1] for sp in spans))


# ------------------------------------------------------------------ general xp path

def _first_valid(geom, cl):
    """geom.first_valid_offset() shaped to broadcast against internal (N, C, *out) or, with
    ``cl``, (N, *out, C) arrays."""
    first = geom.first_valid_offset().astype(geom.offset_dtype)
    return first[..., None] if cl else first


def _max_pool_forward_xp(x, geom, cl=False):
    """Max pooling in plain xp code: one pass per window tap (row-major order), each over
    the windows whose tap is in range (no padded copy of x). With ``cl`` every array is
    channels-last (N, *spatial, C): each tap is a strided view of contiguous runs of C.

    Inputs:
    - x: array (N, C, *size) (or (N, *size, C) with cl), NumPy or CuPy, d = 1, 2 or 3
    - geom: PoolGeometry of x (the (N, C, *size) one)
    - cl: bool, channels-last arrays

    Returns a tuple of:
    - out: array (N, C, *out) (or (N, *out, C)), dtype of x
    - offsets: array shaped like out, of geom.offset_dtype, compact argmax offsets
    """
    xp = get_array_module(x)
    odt = geom.offset_dtype
    shape = _internal_shape(geom.output_shape, cl)
    out = xp.full(shape, -np.inf, dtype=x.dtype)
    offsets = xp.empty(shape, dtype=odt)
    offsets[...] = xp.asarray(_first_valid(geom, cl))
    for t, src, dst in _taps(geom, cl):
        v = x[src]
        o = out[dst]
        take = (v > o) | xp.isnan(v)
        xp.copyto(o, v, where=take)
        xp.copyto(offsets[dst], xp.asarray(t, dtype=odt), where=take)
    return out, offsets


def _max_pool_backward_xp(dout, offsets, geom, cl=False):
    """Send each window's gradient to its argmax, in plain xp code.

    Deterministic: the windows' contributions are added tap by tap in a fixed
    (row-major) order, from zero (float32 accumulation for float16 and bfloat16).

    Inputs:
    - dout: array (N, C, *out) (or (N, *out, C) with cl)
    - offsets: array shaped like dout, compact argmax offsets from the forward pass
    - geom: PoolGeometry
    - cl: bool, channels-last arrays

    Returns:
    - dx: array (N, C, *size) (or (N, *size, C)), dtype of dout
    """
    xp = get_array_module(dout, offsets)
    acc = acc_dtype(dout.dtype)
    dx = xp.zeros(_internal_shape(geom.input_shape, cl), dtype=acc)
    d = dout.astype(acc, copy=False)
    zero = xp.zeros((), dtype=acc)
    for t, src, dst in _taps(geom, cl):
        hit = offsets[dst] == t
        dx[src] += xp.where(hit, d[dst], zero)
    return dx.astype(dout.dtype, copy=False)


_FALLBACK = {}   # geom -> kernel_fallback_reason(geom) (geometries hash fast, see shapes)


def _use_kernels(xp, geom=None):
    """True when CuPy inputs should go to the CUDA kernels (GPULAYERS_KERNELS=0 at import, or
    gpulayers.backend.set_kernels(False), disables) and the kernels take ``geom`` (sizes below
    2**31); else the xp path runs."""
    if xp is np or not backend._KERNELS:
        return False
    if geom is None:
        return True
    reason = _FALLBACK.get(geom, False)
    if reason is False:
        reason = kernel_fallback_reason(geom)
        if len(_FALLBACK) >= 1024:
            _FALLBACK.clear()
        _FALLBACK[geom] = reason
    return reason is None


def kernel_fallback_reason(geom):
    """Why the pooling CUDA kernels cannot take ``geom`` (a PoolGeometry or an
    AdaptiveGeometry), or None when they can; such input runs on the xp path instead."""
    if isinstance(geom, AdaptiveGeometry):
        dims = tuple(geom.size) + tuple(geom.out)
    else:  # padded positions are formed in int
        dims = (tuple(n + 2 * p for n, p in zip(geom.size, geom.pad)) + tuple(geom.out)
                + tuple(geom.kernel) + tuple(geom.stride) + tuple(geom.dilation))
    if max(dims) >= 2**31:
        return f"a size or parameter of 2**31 or more: {geom.describe()}"
    return None


def _max_forward(x, pool_param, impl):
    """A max-pool forward: check, run ``impl(x_internal, geom, cl) -> (out, offsets)`` in
    the layout's internal representation, return (out as the caller's layout, cache)."""
    geom, layout = _check_x(x, pool_param, "max")
    out, offsets = impl(_internal(x, layout), geom, _is_cl(layout))
    return _external(out, layout), _cache(MaxPoolCache, geom=geom, dtype=np.dtype(x.dtype),
                                          offsets=_freeze(offsets), layout=layout)


def _max_backward(dout, cache, impl):
    """A max-pool backward: check, run ``impl(dout_internal, offsets, geom, cl) -> dx``,
    return dx in the caller's layout."""
    geom, _, dout, cl = _backward_inputs(dout, cache, MaxPoolCache)
    return _external(impl(dout, cache.offsets, geom, cl), cache.layout)


def _via_channels_first(fn, geom, cl, *arrays):
    """Run the channels-first implementation ``fn(*arrays, geom)`` on internal arrays:
    with ``cl`` on their moveaxis views (N, C, *spatial), results moved back and made
    C-contiguous channels-last (the reference paths: copies are fine)."""
    if not cl:
        return fn(*arrays, geom)
    xp = get_array_module(*arrays)
    res = fn(*(xp.moveaxis(a, -1, 1) for a in arrays), geom)
    back = lambda a: xp.ascontiguousarray(xp.moveaxis(a, 1, -1))  # noqa: E731
    return tuple(back(a) for a in res) if isinstance(res, tuple) else back(res)


@_on_input_device
def max_pool_forward_general(x, pool_param):
    """Max pooling through the general xp path (every geometry and rank; NumPy or CuPy).

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W), float16/32/64
    - pool_param: dict with 'kernel_size' (or, in 2-D, 'pool_height' and 'pool_width')
      and optional 'stride', 'pad', 'dilation', 'ceil_mode', 'data_format' (see
      gpulayers.shapes.pool_geometry and max_pool_forward)

    Returns a tuple of:
    - out: array (N, C, *out)
    - cache: MaxPoolCache (compact argmax offsets; neither x nor out)
    """
    return _max_forward(x, pool_param, _max_pool_forward_xp)


@_on_input_device
def max_pool_backward_general(dout, cache):
    """Backward pass of max pooling through the general xp path.

    Inputs:
    - dout: array (N, C, *out), upstream derivatives
    - cache: MaxPoolCache from any max_pool_forward_* function

    Returns:
    - dx: array (N, C, *size), the forward input's dtype
    """
    return _max_backward(dout, cache, _max_pool_backward_xp)


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
    - x: array (N, C, *size), d = 1, 2 or 3 spatial axes
    - pool_param: dict, see max_pool_forward_general

    Returns a tuple of:
    - out: array (N, C, *out)
    - cache: MaxPoolCache
    """
    return _max_forward(x, pool_param, lambda x, g, cl: _via_channels_first(
        _max_pool_forward_naive_cf, g, cl, x))


def _max_pool_forward_naive_cf(x, geom):
    xp = get_array_module(x)
    N, C, d = geom.N, geom.C, geom.d
    mult = [_prod(geom.kernel[a + 1:]) for a in range(d)]
    out = xp.empty(geom.output_shape, dtype=x.dtype)
    offsets = xp.empty(geom.output_shape, dtype=geom.offset_dtype)
    for o in itertools.product(*(range(n) for n in geom.out)):
        firsts, slices = zip(*(_window_taps(o[a], geom.stride[a], geom.pad[a],
                                            geom.dilation[a], geom.kernel[a], geom.size[a])
                               for a in range(d)))
        win = x[(Ellipsis,) + slices]
        wshape = win.shape[2:]
        K = _prod(wshape)
        flat = win.reshape(N, C, K)
        local = xp.argmax(flat, axis=2) if flat.size else xp.zeros((N, C), dtype=np.int64)
        nan = xp.isnan(flat)
        last_nan = K - 1 - xp.argmax(nan[:, :, ::-1], axis=2) if flat.size else local
        local = xp.where(nan.any(axis=2), last_nan, local)
        key = (Ellipsis,) + o
        out[key] = xp.take_along_axis(flat, local[:, :, None], axis=2)[:, :, 0]
        comp = 0
        for a in reversed(range(d)):
            comp = comp + (firsts[a] + local % wshape[a]) * mult[a]
            local = local // wshape[a]
        offsets[key] = comp
    return out, offsets


def _decode(offsets, geom_kernel):
    """Per-axis taps (a list of int64 arrays) of compact offsets over a row-major kernel."""
    rem = offsets.astype(np.int64)
    taps = []
    for k in reversed(geom_kernel):
        taps.append(rem % k)
        rem = rem // k
    return taps[::-1]


@_on_input_device
def max_pool_backward_naive(dout, cache):
    """The article's naive max-pool backward, fixed: each window's gradient
    goes to its one recorded argmax, not to every tied maximum.

    Inputs:
    - dout: array (N, C, *out)
    - cache: MaxPoolCache

    Returns:
    - dx: array (N, C, *size)
    """
    return _max_backward(dout, cache, lambda d, o, g, cl: _via_channels_first(
        _max_pool_backward_naive_cf, g, cl, d, o))


def _max_pool_backward_naive_cf(dout, offsets, geom):
    xp = get_array_module(dout, offsets)
    acc = acc_dtype(dout.dtype)
    dx = xp.zeros(geom.input_shape, dtype=acc)
    n_idx = xp.arange(geom.N)[:, None]
    c_idx = xp.arange(geom.C)[None, :]
    for o in itertools.product(*(range(n) for n in geom.out)):
        key = (Ellipsis,) + o
        taps = _decode(offsets[key], geom.kernel)
        pos = tuple(o[a] * geom.stride[a] - geom.pad[a] + taps[a] * geom.dilation[a]
                    for a in range(geom.d))
        dx[(n_idx, c_idx) + pos] += dout[key].astype(acc)
    return dx.astype(dout.dtype, copy=False)


# ---------------------------------------------------------------------- reshape path

def _check_tiles(geom):
    if not geom.tiles:
        raise ValueError(
            "the reshape max pool needs windows that tile the input exactly: "
            "stride == kernel, no padding, no dilation, and every spatial size divisible by "
            f"the kernel; got {geom.describe()}")


def _tile_layout(geom):
    """(split shape, permutation) taking x (N, C, *size) to (N, C, *out, *kernel)."""
    d = geom.d
    split = (geom.N, geom.C) + sum(((o, k) for o, k in zip(geom.out, geom.kernel)), ())
    perm = (0, 1) + tuple(2 + 2 * a for a in range(d)) + tuple(3 + 2 * a for a in range(d))
    return split, perm


@_on_input_device
def max_pool_forward_reshape(x, pool_param):
    """The article's reshape max pooling, for windows that tile the input.

    Inputs:
    - x: array (N, C, *size)
    - pool_param: dict; stride must equal the window, no pad/dilation, and
      the window must divide every spatial size (ValueError otherwise)

    Returns a tuple of:
    - out: array (N, C, *size/kernel)
    - cache: MaxPoolCache
    """
    geom, _ = _check_x(x, pool_param, "max")
    _check_tiles(geom)
    return _max_forward(x, pool_param, lambda x, g, cl: _via_channels_first(
        _max_pool_forward_reshape_cf, g, cl, x))


def _max_pool_forward_reshape_cf(x, geom):
    xp = get_array_module(x)
    K = geom.window_size
    split, perm = _tile_layout(geom)
    windows = x.reshape(split).transpose(perm).reshape(geom.output_shape + (K,))
    local = xp.argmax(windows, axis=-1)
    nan = xp.isnan(windows)
    local = xp.where(nan.any(axis=-1), K - 1 - xp.argmax(nan[..., ::-1], axis=-1), local)
    out = xp.take_along_axis(windows, local[..., None], axis=-1)[..., 0]
    return out, local.astype(geom.offset_dtype)


@_on_input_device
def max_pool_backward_reshape(dout, cache):
    """Backward pass of the reshape max pool: one-hot of the recorded argmax
    times dout, reshaped back (exactly one element per window gets gradient).

    Inputs:
    - dout: array (N, C, *out)
    - cache: MaxPoolCache of a tiling geometry

    Returns:
    - dx: array (N, C, *size)
    """
    _check_cache(cache, MaxPoolCache)
    _check_tiles(cache.geom)
    return _max_backward(dout, cache, lambda d, o, g, cl: _via_channels_first(
        _max_pool_backward_reshape_cf, g, cl, d, o))


def _max_pool_backward_reshape_cf(dout, offsets, geom):
    xp = get_array_module(dout, offsets)
    K = geom.window_size
    hit = offsets[..., None] == xp.arange(K, dtype=offsets.dtype)
    dwin = xp.where(hit, dout[..., None], xp.zeros((), dtype=dout.dtype))
    _, perm = _tile_layout(geom)
    dwin = dwin.reshape(geom.output_shape + tuple(geom.kernel))
    return xp.ascontiguousarray(dwin.transpose(tuple(np.argsort(perm)))).reshape(
        geom.input_shape)


# --------------------------------------------------------- rank and CPU-kernel helpers

def _as_2d_input(a, geom):
    """(a as (N, C, 1, L) for 1-D or itself for 2-D, the 2-D geometry)."""
    g2 = geom.as_2d()
    return a.reshape(g2.input_shape), g2


def _as_2d_output(a, geom):
    """(a, shaped like the output of geom, as the output of the 2-D geometry, that one)."""
    g2 = geom.as_2d()
    return a.reshape(g2.output_shape), g2


# ------------------------------------------------------------------------- dispatch

def _max_pool_forward_kernels(x, geom, cl=False):
    if geom.d == 3 or cl:
        if cl:   # the tuned 2-D kernels are channels-first only
            return pool_nd_kernels.max_pool_forward_gpu(x, geom, channels_last=True)
        return pool_nd_kernels.max_pool_forward_gpu(x, geom)
    if geom.d == 2:   # the 2-D kernels' own shapes: no reshapes (views cost host time)
        return pool_kernels.max_pool_forward_gpu(x, geom)
    x4, g2 = _as_2d_input(x, geom)
    out, offsets = pool_kernels.max_pool_forward_gpu(x4, g2)
    return out.reshape(geom.output_shape), offsets.reshape(geom.output_shape)


# Warmed calls (issue 13 §1): a CuPy max-pool call whose kind of inputs ran the 2-D kernels
# before -- same class, shape, strides and dtype of x (C-contiguous, channels-first), the very
# pool_param values that passed the checks (as _CHECKED) -- makes one lookup here and runs
# pool_kernels' prepared launch, which checks devices, alignment and VARIANT and returns None
# if any differ. Anything else, and every first call, takes the checked path.
_WARM_FORWARD = {}    # (x class, shape, strides, dtype, pool_param items) -> (values, geom, run)
_WARM_BACKWARD = {}   # id(geom) -> (geom, (cache dtype, layout, dout and offsets metas), run)
pool_kernels.DEPENDENT += [_WARM_FORWARD, _WARM_BACKWARD]


def _max_forward_warm(x, pool_param):
    try:
        key = (x.__class__, x.shape, x.strides, x.dtype, tuple(pool_param.items()))
        hit = _WARM_FORWARD.get(key)
    except (AttributeError, TypeError):   # not an array, or an unhashable value
        return max_pool_forward_fast(x, pool_param)
    if hit is not None and backend._KERNELS and all(map(_is, hit[0], pool_param.values())):
        res = hit[2](x)
        if res is not None:
            cache = object.__new__(MaxPoolCache)
            cache.__dict__.update(geom=hit[1], dtype=x.dtype, offsets=res[1],
                                  layout="channels_first")
            return res[0], cache
    out = max_pool_forward_fast(x, pool_param)
    cache = out[1]
    geom = cache.geom
    if (cache.layout == "channels_first" and geom.d == 2 and backend._KERNELS
            and x.__class__ is backend._cupy_ndarray() and x.flags.c_contiguous
            and _use_kernels(None, geom)):
        device = x.device.id
        run = pool_kernels.ready_forward(geom, cache.dtype, device,
                                         x.data.ptr % (2 * x.dtype.itemsize) == 0)
        if run is not None and device == get_array_module(x).cuda.runtime.getDevice():
            if len(_WARM_FORWARD) >= 256:
                _WARM_FORWARD.clear()
            _WARM_FORWARD[key] = (tuple(pool_param.values()), geom, run)
    return out


def _max_backward_warm(dout, cache):
    geom = cache.geom
    hit = _WARM_BACKWARD.get(id(geom))
    offsets = cache.offsets
    try:
        meta = (cache.dtype, cache.layout, dout.__class__, dout.shape, dout.strides,
                dout.dtype, offsets.__class__, offsets.shape, offsets.strides, offsets.dtype)
    except AttributeError:
        return max_pool_backward_fast(dout, cache)
    if hit is not None and hit[0] is geom and hit[1] == meta and backend._KERNELS:
        dx = hit[2](dout, offsets)
        if dx is not None:
            return dx
    dx = max_pool_backward_fast(dout, cache)
    nd = backend._cupy_ndarray()
    if (cache.layout == "channels_first" and geom.d == 2 and backend._KERNELS
            and dout.__class__ is nd and offsets.__class__ is nd
            and dout.dtype == cache.dtype and dout.flags.c_contiguous
            and offsets.flags.c_contiguous and offsets.dtype == geom.offset_dtype
            and tuple(dout.shape) == geom.output_shape and _use_kernels(None, geom)):
        device = dout.device.id
        run = pool_kernels.ready_backward(geom, cache.dtype, device)
        if (run is not None and offsets.device.id == device
                and device == get_array_module(dout).cuda.runtime.getDevice()):
            if len(_WARM_BACKWARD) >= 256:
                _WARM_BACKWARD.clear()
            _WARM_BACKWARD[id(geom)] = (geom, meta, run)
    return dx


def _max_pool_backward_kernels(dout, offsets, geom, cl=False):
    if geom.d == 3 or cl:
        if cl:
            return pool_nd_kernels.max_pool_backward_gpu(dout, offsets, geom,
                                                         channels_last=True)
        return pool_nd_kernels.max_pool_backward_gpu(dout, offsets, geom)
    if geom.d == 2:
        return pool_kernels.max_pool_backward_gpu(dout, offsets, geom)
    d4, g2 = _as_2d_output(dout, geom)
    o4 = offsets.reshape(g2.output_shape)
    return pool_kernels.max_pool_backward_gpu(d4, o4, g2).reshape(geom.input_shape)


def _max_pool_forward_any(x, geom, cl=False):
    """(out, offsets) of the fastest path for x's backend, internal arrays."""
    xp = get_array_module(x)
    if _use_kernels(xp, geom):
        return _max_pool_forward_kernels(x, geom, cl)
    if xp is np:
        return _max_pool_forward_np(x, geom, cl)
    return _max_pool_forward_xp(x, geom, cl)


@_on_input_device
def max_pool_forward_fast(x, pool_param):
    """Max pooling by the fastest correct implementation for x's backend:
    the CUDA kernels for CuPy arrays (the 2-D kernels for channels-first 1-D and 2-D input,
    the n-D kernels for 3-D and every channels-last input); on NumPy the CPU loop kernels
    of gpulayers.cpu_kernels.pool (every rank, layout and geometry), or the general path
    without them (GPULAYERS_CPU_KERNELS=0, or no numba); on CuPy with the kernels turned
    off (GPULAYERS_KERNELS=0), the general path (its backward: the reshape trick where the
    windows tile the input).

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W) (channels-last shapes with
      pool_param['data_format'] = 'channels_last')
    - pool_param: dict, see max_pool_forward

    Returns a tuple of:
    - out: array (N, C, *out) (or (N, *out, C))
    - cache: MaxPoolCache
    """
    return _max_forward(x, pool_param, _max_pool_forward_any)


def _cpu_kernels_take(dtype):
    """True when NumPy max, avg and sum pooling of ``dtype`` run the CPU loop kernels (on,
    numba there, a float dtype), at every size: measured 2026-12-01 on the 2-core AMD EPYC,
    numba 0.68.1, float32, load average 0.8-0.9, alternating rounds (201), medians, kernel
    launcher vs general path, 3x3/2 pad 1 and 2x2/2, forward and backward: 4-13 us vs
    20-83 us at (2, 3, 4, 5), (2, 3, 64) and (1, 2, 3, 4, 5); 7-28 vs 38-256 at
    (4, 16, 14, 14); 56-220 vs 208-3834 at (8, 32, 28, 28). No size threshold, then."""
    return cpu_kernels.enabled() and cpu_pool.takes(dtype)


def _max_pool_forward_np(x, geom, cl=False):
    """(out, offsets) of max pooling a NumPy x (internal layout): the CPU kernels, else
    the general path."""
    if _cpu_kernels_take(x.dtype):
        return cpu_pool.max_pool_forward(x, geom, cl)
    return _max_pool_forward_xp(x, geom, cl)


def _max_pool_backward_np_fast(dout, offsets, geom, cl=False):
    """dx of max pooling on NumPy (internal layout): the CPU kernels, else the general
    path."""
    if _cpu_kernels_take(dout.dtype):
        return cpu_pool.max_pool_backward(dout, offsets, geom, cl)
    return _max_pool_backward_xp(dout, offsets, geom, cl)


def _max_pool_backward_any(dout, offsets, geom, cl=False):
    xp = get_array_module(dout, offsets)
    if _use_kernels(xp, geom):
        return _max_pool_backward_kernels(dout, offsets, geom, cl)
    if xp is np:
        return _max_pool_backward_np_fast(dout, offsets, geom, cl)
    if geom.tiles and not cl:
        return _max_pool_backward_reshape_cf(dout, offsets, geom)
    return _max_pool_backward_xp(dout, offsets, geom, cl)


@_on_input_device
def max_pool_backward_fast(dout, cache):
    """Backward pass matching max_pool_forward_fast (any MaxPoolCache works).

    Inputs:
    - dout: array (N, C, *out) (or (N, *out, C), the forward's layout)
    - cache: MaxPoolCache

    Returns:
    - dx: array (N, C, *size) (or (N, *size, C)), the forward input's dtype
    """
    return _max_backward(dout, cache, _max_pool_backward_any)


def max_pool_forward(x, pool_param):
    """Forward pass of max pooling, by the fastest correct implementation.

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W), float16/32/64 or bfloat16,
      NumPy or CuPy; with data_format='channels_last': (N, L, C), (N, H, W, C) or
      (N, D, H, W, C)
    - pool_param: dict with 'kernel_size' (int or d-tuple; in 2-D also 'pool_height' and
      'pool_width'), 'stride' (int or d-tuple, default the window), 'pad' (int or
      d-tuple, 0), 'dilation' (int or d-tuple, 1), 'ceil_mode' (False), 'data_format'
      ('channels_first', the default, or 'channels_last')

    A channels_first x in PyTorch's channels_last memory format (channels-first shape,
    channels-last strides, e.g. ``y.transpose(0, 3, 1, 2)`` of a C-contiguous NHWC y) is
    pooled without a copy and out keeps that memory format, as in PyTorch.

    Returns a tuple of:
    - out: array (N, C, *out) (or (N, *out, C)), sizes by PyTorch's max_pool{1,2,3}d rules
    - cache: MaxPoolCache (compact argmax offsets only)
    """
    if x.__class__ is not np.ndarray and pool_param.__class__ is dict:
        return _max_forward_warm(x, pool_param)   # CuPy: maybe a warmed call
    return max_pool_forward_fast(x, pool_param)


def max_pool_backward(dout, cache):
    """Backward pass of max pooling: each window's gradient goes to its first
    maximum (the last NaN where the window holds NaN). Deterministic.

    Inputs:
    - dout: array (N, C, *out) (or (N, *out, C): the forward's layout)
    - cache: MaxPoolCache

    Returns:
    - dx: array (N, C, *size) (or (N, *size, C)); in the channels_last memory format when
      the forward's x was
    """
    if cache.__class__ is MaxPoolCache and dout.__class__ is not np.ndarray:
        return _max_backward_warm(dout, cache)   # CuPy: maybe a warmed call
    return max_pool_backward_fast(dout, cache)


def max_pool_indices(cache):
    """Flat indices of each window's argmax into its input volume (L, H*W or D*H*W).

    Inputs:
    - cache: MaxPoolCache from a max_pool_forward_* function, or AdaptiveMaxPoolCache
      from adaptive_max_pool_forward

    Returns:
    - indices: int64 array laid out like the forward's output ((N, C, *out), or
      (N, *out, C) for data_format='channels_last'), the numbers PyTorch's
      ``max_pool{1,2,3}d(..., return_indices=True)`` (or ``adaptive_max_pool{1,2,3}d``)
      returns, whatever the layout
    """
    _check_cache(cache, MaxPoolCache, AdaptiveMaxPoolCache)
    with device_scope(cache.offsets):
        return _external(_indices(cache.geom, cache.offsets, _is_cl(cache.layout)),
                         cache.layout)


def _indices(geom, offsets, cl=False):
    xp = get_array_module(offsets)
    d = geom.d
    nd = d + 1 if cl else d   # (*out) against (N, C, *out); (*out, 1) against (N, *out, C)
    adaptive = isinstance(geom, AdaptiveGeometry)
    kernel = geom.window if adaptive else geom.kernel
    taps = _decode(offsets, kernel)
    flat = 0
    for a in range(d):
        if adaptive:
            start = xp.asarray(_along(geom.bounds(a)[0], nd, a))
            pos = start + taps[a]
        else:
            o = xp.asarray(_along(np.arange(geom.out[a], dtype=np.int64), nd, a))
            pos = o * geom.stride[a] - geom.pad[a] + taps[a] * geom.dilation[a]
        flat = flat * geom.size[a] + pos
    return flat


# -------------------------------------------------------------------- avg / sum pooling

@functools.lru_cache(maxsize=256)
def _avg_divisor(geom, count_include_pad, divisor_override):
    """float64 array of shape geom.out (read-only): PyTorch's avg_pool divisor of each
    window. The ceil_mode overhang past the right padding is never counted;
    divisor_override replaces it everywhere."""
    if divisor_override is not None:
        return _freeze(np.full(tuple(geom.out), float(divisor_override)))
    total = np.ones((), dtype=np.float64)
    for n_out, stride, pad, kernel, size in zip(geom.out, geom.stride, geom.pad,
                                                geom.kernel, geom.size):
        start = np.arange(n_out) * stride - pad
        end = np.minimum(start + kernel, size + pad)
        count = (end - start) if count_include_pad else (
            np.minimum(end, size) - np.maximum(start, 0))
        total = total[..., None] * count
    return _freeze(total.astype(np.float64))


def _sum_pool_xp(x, geom, divisor, cl=False):
    """Window sums (divided by ``divisor``, shape geom.out, when given) in x's accumulation
    dtype, one separable pass per axis: each output sums its in-range taps in order. With
    ``cl`` x is channels-last (N, *size, C) and so is the result."""
    xp = get_array_module(x)
    acc = acc_dtype(x.dtype)
    a = x.astype(acc, copy=False)
    for ax in range(geom.d):
        axis = _sp0(cl) + ax
        shape = list(a.shape)
        shape[axis] = geom.out[ax]
        total = xp.zeros(tuple(shape), dtype=acc)
        for t in range(geom.kernel[ax]):
            sp = _axis_tap(geom, ax, t)
            if sp is not None:
                total[_at(a.ndim, axis, sp[1])] += a[_at(a.ndim, axis, sp[0])]
        a = total
    if divisor is not None:
        a /= xp.asarray(divisor[..., None] if cl else divisor, dtype=acc)
    return a


def _sum_pool_backward_xp(dout, geom, divisor, cl=False):
    """dx of the window sums (divided by ``divisor`` when given): dout spread back over
    each window, one separable pass per axis in reverse (fixed order); channels-last
    arrays with ``cl``."""
    xp = get_array_module(dout)
    acc = acc_dtype(dout.dtype)
    g = dout.astype(acc)
    if divisor is not None:
        g /= xp.asarray(divisor[..., None] if cl else divisor, dtype=acc)
    for ax in reversed(range(geom.d)):
        axis = _sp0(cl) + ax
        shape = list(g.shape)
        shape[axis] = geom.size[ax]
        dx = xp.zeros(tuple(shape), dtype=acc)
        for t in range(geom.kernel[ax]):
            sp = _axis_tap(geom, ax, t)
            if sp is not None:
                dx[_at(g.ndim, axis, sp[0])] += g[_at(g.ndim, axis, sp[1])]
        g = dx
    return g.astype(dout.dtype, copy=False)


@_on_input_device
def avg_pool_forward(x, pool_param):
    """Forward pass of average pooling (PyTorch's avg_pool{1,2,3}d semantics).

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W)
    - pool_param: dict with 'kernel_size' (or, in 2-D, 'pool_height' and 'pool_width')
      and optional 'stride', 'pad', 'ceil_mode', 'count_include_pad' (True) and
      'divisor_override' (a positive int that replaces every window's divisor, or None),
      'data_format' ('channels_first' or 'channels_last', see max_pool_forward); no
      dilation

    Returns a tuple of:
    - out: array (N, C, *out) (or (N, *out, C))
    - cache: AvgPoolCache
    """
    geom, layout = _check_x(x, pool_param, "avg")
    cip, div = check_pool_options(pool_param, "avg", tuple(x.shape))
    divisor = _avg_divisor(geom, cip, div)
    cache = AvgPoolCache(geom, np.dtype(x.dtype), divisor, cip, div, layout)
    return _external(_avg_forward(_internal(x, layout), geom, _is_cl(layout), cip, div,
                                  divisor), layout), cache


def _kernel_kw(cl):
    """The launchers' layout keyword: only passed for channels-last arrays."""
    return {"channels_last": True} if cl else {}


def _avg_forward(x, geom, cl, cip, div, divisor):
    xp = get_array_module(x)
    if _use_kernels(xp, geom):
        return pool_nd_kernels.avg_pool_forward_gpu(x, geom, cip, div, **_kernel_kw(cl))
    if xp is np and _cpu_kernels_take(x.dtype):   # the general path's sums, bit for bit
        return cpu_pool.sum_pool_forward(x, geom, divisor, cl)
    return _sum_pool_xp(x, geom, divisor, cl).astype(x.dtype, copy=False)


def _avg_backward(dout, geom, cl, cip, div, divisor):
    xp = get_array_module(dout)
    if _use_kernels(xp, geom):
        return pool_nd_kernels.avg_pool_backward_gpu(dout, geom, cip, div, **_kernel_kw(cl))
    if xp is np and _cpu_kernels_take(dout.dtype):
        return cpu_pool.sum_pool_backward(dout, geom, divisor, cl)
    return _sum_pool_backward_xp(dout, geom, divisor, cl)


@_on_input_device
def avg_pool_backward(dout, cache):
    """Backward pass of average pooling: dout / divisor spread over each window.

    Inputs:
    - dout: array (N, C, *out)
    - cache: AvgPoolCache

    Returns:
    - dx: array (N, C, *size), the forward input's dtype
    """
    geom, _, dout, cl = _backward_inputs(dout, cache, AvgPoolCache)
    return _external(_avg_backward(dout, geom, cl, cache.count_include_pad,
                                   cache.divisor_override, cache.divisor), cache.layout)


@_on_input_device
def sum_pool_forward(x, pool_param):
    """Forward pass of sum pooling: the sum over each window, padding counting as zero
    (average pooling with divisor_override=1, the same bits).

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W)
    - pool_param: dict with 'kernel_size' (or, in 2-D, 'pool_height' and 'pool_width')
      and optional 'stride', 'pad', 'ceil_mode', 'data_format'

    Returns a tuple of:
    - out: array (N, C, *out) (or (N, *out, C))
    - cache: SumPoolCache
    """
    geom, layout = _check_x(x, pool_param, "sum")
    cache = SumPoolCache(geom, np.dtype(x.dtype), layout)
    return _external(_avg_forward(_internal(x, layout), geom, _is_cl(layout), True, 1, None),
                     layout), cache


@_on_input_device
def sum_pool_backward(dout, cache):
    """Backward pass of sum pooling: dout added to every element of its window.

    Inputs:
    - dout: array (N, C, *out)
    - cache: SumPoolCache

    Returns:
    - dx: array (N, C, *size), the forward input's dtype
    """
    geom, _, dout, cl = _backward_inputs(dout, cache, SumPoolCache)
    return _external(_avg_backward(dout, geom, cl, True, 1, None), cache.layout)


# ------------------------------------------------------------------ adaptive pooling

@dataclass(frozen=True)
class _AdaptiveAxis:
    """The windows of one axis: starts, lengths (int64 host arrays), whether they are
    evenly spaced with one length (then tap t is the strided slice
    ``start[0] + t :: step``), and for the backward passes, for each input position the
    first and last window holding it."""

    size: int
    out: int
    start: np.ndarray
    length: np.ndarray
    even: bool
    step: int
    first: np.ndarray
    last: np.ndarray

    @property
    def longest(self):
        return int(self.length.max())

    @property
    def cover(self):
        """Most windows holding one input position."""
        return int((self.last - self.first).max()) + 1


@functools.lru_cache(maxsize=256)
def _adaptive_axes(geom):
    axes = []
    for a in range(geom.d):
        start, end = geom.bounds(a)
        length = end - start
        n, o = geom.size[a], geom.out[a]
        step = int(start[1] - start[0]) if o > 1 else 1
        even = bool((length == length[0]).all()
                    and (o == 1 or (start == start[0] + step * np.arange(o)).all())
                    and step > 0)
        p = np.arange(n)
        first = np.searchsorted(end, p, side="right")
        last = np.searchsorted(start, p, side="right") - 1
        axes.append(_AdaptiveAxis(n, o, start, length, even, step, first, last))
    return tuple(axes)


@functools.lru_cache(maxsize=256)
def _adaptive_as_pool(geom):
    """The PoolGeometry with the same windows (kernel = window length, stride = the
    starts' step, no padding) when every axis has evenly spaced windows of one length,
    else None. Its compact offsets are the adaptive ones (the kernel is geom.window)."""
    axes = _adaptive_axes(geom)
    if not all(ax.even for ax in axes):
        return None
    kernel = tuple(ax.longest for ax in axes)
    stride = tuple(ax.step if ax.out > 1 else ax.longest for ax in axes)
    if any((o - 1) * s + k != n for o, s, k, n in zip(geom.out, stride, kernel, geom.size)):
        return None
    d = geom.d
    return PoolGeometry(geom.N, geom.C, tuple(geom.size), kernel, stride, (0,) * d, (1,) * d,
                        False, tuple(geom.out))


def _adaptive_tap(xp, a, axis, ax, t):
    """Tap t of every window along ``axis`` of a: (values, mask), mask None where every
    window has tap t, else a bool array broadcasting along ``axis`` (False: no tap t)."""
    if ax.even:
        s0 = int(ax.start[0]) + t
        return a[_at(a.ndim, axis, slice(s0, s0 + ax.step * (ax.out - 1) + 1, ax.step))], None
    idx = np.minimum(ax.start + t, ax.size - 1)
    v = xp.take(a, xp.asarray(idx), axis=axis)
    mask = ax.length > t
    if mask.all():
        return v, None
    return v, xp.asarray(_along(mask, a.ndim, axis))


def _adaptive_count(geom, axes):
    total = np.ones((), dtype=np.float64)
    for ax in axes:
        total = total[..., None] * ax.length
    return total


def _check_adaptive_x(x, output_size, data_format):
    """(geom, layout) of an adaptive pooling forward."""
    check_array(x, "x")
    data_format = check_data_format(data_format, "data_format")
    check_floating(x, "x")
    if data_format == "channels_last" and x.ndim not in (3, 4, 5):
        raise ValueError(f"adaptive pooling with data_format='channels_last' expects x of shape "
                         f"(N, L, C), (N, H, W, C) or (N, D, H, W, C), got {x.ndim}-D shape "
                         f"{tuple(x.shape)}")
    geom = adaptive_geometry(to_channels_first_shape(x.shape, data_format), output_size)
    return geom, _layout(x, data_format)


@_on_input_device
def adaptive_avg_pool_forward(x, output_size, data_format="channels_first"):
    """Forward pass of adaptive average pooling (PyTorch's adaptive_avg_pool{1,2,3}d):
    output position o averages the input window ``[floor(o*n/out), ceil((o+1)*n/out))``
    of each axis (gpulayers.shapes.adaptive_bounds).

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W), float16/32/64 or bfloat16
      (channels-last shapes (N, *spatial, C) with data_format='channels_last')
    - output_size: an int (every axis) or a d-tuple of ints and None (None: that axis's
      input size); 1 is global average pooling
    - data_format: 'channels_first' (default) or 'channels_last' (see max_pool_forward; an
      x in PyTorch's channels_last memory format is pooled without a copy)

    Every window sums its taps axis by axis in order; global pooling on NumPy sums each
    plane in one fixed order (float64 lanes with the CPU kernels; see _global_avg); both
    layouts give the same bits either way.

    Returns a tuple of:
    - out: array (N, C, *output_size) (or (N, *output_size, C)), dtype of x
    - cache: AdaptiveAvgPoolCache
    """
    geom, layout = _check_adaptive_x(x, output_size, data_format)
    cache = AdaptiveAvgPoolCache(geom, np.dtype(x.dtype), layout)
    return _external(_adaptive_avg_forward(_internal(x, layout), geom, _is_cl(layout)),
                     layout), cache


def _global_avg(x, geom, cl):
    """Global average pooling of a NumPy x (the sum of each plane, divided by P).

    With the CPU kernels (gpulayers.cpu_kernels.global_pool): every plane summed in
    float64 by one fixed order of lanes for both layouts, channels-last without a
    transposed copy (16-bit inputs are converted to float32 first). Without them: each
    plane as one contiguous row by np.einsum('ij->i') in the accumulation dtype
    (channels-last planes transposed one sample at a time into such rows). Either way
    both layouts give the same bits."""
    N, C = geom.N, geom.C
    P = _prod(geom.size)
    shape = (N, C) + (1,) * geom.d if not cl else (N,) + (1,) * geom.d + (C,)
    if cpu_kernels.enabled():
        from .cpu_kernels import global_pool
        a = np.ascontiguousarray(x)
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32)
        total = global_pool.plane_sums(a, N, C, P, cl)
        total /= P
        return total.astype(x.dtype).reshape(shape)
    acc = acc_dtype(x.dtype)
    if not cl:
        rows = np.ascontiguousarray(x).reshape(N * C, P)
        if x.dtype != acc:
            rows = rows.astype(acc)
        total = np.einsum("ij->i", rows).reshape(N, C)
    else:
        total = np.empty((N, C), acc)
        for n in range(N):   # one (P, C) sample at a time: a transposed copy of one sample
            rows = np.ascontiguousarray(x[n].reshape(P, C).T, dtype=acc)
            total[n] = np.einsum("ij->i", rows)
    total /= acc.type(P)
    return total.reshape(shape).astype(x.dtype, copy=False)


def _adaptive_avg_forward(x, geom, cl):
    xp = get_array_module(x)
    if _use_kernels(xp, geom):
        return pool_nd_kernels.adaptive_avg_pool_forward_gpu(x, geom, **_kernel_kw(cl))
    if xp is np and all(o == 1 for o in geom.out):
        return _global_avg(x, geom, cl)
    acc = acc_dtype(x.dtype)
    axes = _adaptive_axes(geom)
    a = x.astype(acc, copy=False)
    for i, ax in enumerate(axes):
        axis = _sp0(cl) + i
        shape = list(a.shape)
        shape[axis] = ax.out
        total = xp.zeros(tuple(shape), dtype=acc)
        for t in range(ax.longest):
            v, mask = _adaptive_tap(xp, a, axis, ax, t)
            total += v if mask is None else xp.where(mask, v, acc.type(0))
        a = total
    count = _adaptive_count(geom, axes)
    a /= xp.asarray(count[..., None] if cl else count, dtype=acc)
    return a.astype(x.dtype, copy=False)


@_on_input_device
def adaptive_avg_pool_backward(dout, cache):
    """Backward pass of adaptive average pooling: dout / window size spread over each
    window (separable passes of gathers: deterministic, no atomics).

    Inputs:
    - dout: array (N, C, *output_size) (or (N, *output_size, C): the forward's layout)
    - cache: AdaptiveAvgPoolCache

    Returns:
    - dx: array (N, C, *size) (or (N, *size, C)), the forward input's dtype
    """
    geom, _, dout, cl = _backward_inputs(dout, cache, AdaptiveAvgPoolCache)
    return _external(_adaptive_avg_backward(dout, geom, cl), cache.layout)


def _adaptive_avg_backward(dout, geom, cl):
    xp = get_array_module(dout)
    if _use_kernels(xp, geom):
        return pool_nd_kernels.adaptive_avg_pool_backward_gpu(dout, geom, **_kernel_kw(cl))
    acc = acc_dtype(dout.dtype)
    axes = _adaptive_axes(geom)
    g = dout.astype(acc)
    count = _adaptive_count(geom, axes)
    g /= xp.asarray(count[..., None] if cl else count, dtype=acc)
    if all(o == 1 for o in geom.out):
        return xp.ascontiguousarray(xp.broadcast_to(
            g, _internal_shape(geom.input_shape, cl))).astype(dout.dtype, copy=False)
    for i in reversed(range(geom.d)):
        ax, axis = axes[i], _sp0(cl) + i
        if ax.even and ax.step == ax.longest and ax.out * ax.step == ax.size:
            g = xp.repeat(g, ax.step, axis=axis)  # windows tile the axis
            continue
        shape = list(g.shape)
        shape[axis] = ax.size
        dx = xp.zeros(tuple(shape), dtype=acc)
        for u in range(ax.cover):
            w = ax.first + u
            valid = w <= ax.last
            v = xp.take(g, xp.asarray(np.minimum(w, ax.out - 1)), axis=axis)
            dx += v if valid.all() else xp.where(xp.asarray(_along(valid, g.ndim, axis)), v,
                                                 acc.type(0))
        g = dx
    return g.astype(dout.dtype, copy=False)


def _adaptive_max_xp(x, geom, cl=False):
    """Adaptive max pooling in xp code, axis by axis from the last one: per axis, tap by
    tap of the longest window (masked where a window is shorter), strict > and the NaN
    rule, carrying the later axes' offsets. The same element as one row-major scan of
    each window: first maximum, last NaN, first element when all are -inf. Channels-last
    arrays with ``cl``."""
    xp = get_array_module(x)
    axes = _adaptive_axes(geom)
    odt = geom.offset_dtype
    window = geom.window
    vals, offs = x, None
    for i in reversed(range(geom.d)):
        ax, axis = axes[i], _sp0(cl) + i
        mult = _prod(window[i + 1:])
        shape = list(vals.shape)
        shape[axis] = ax.out
        best = xp.full(tuple(shape), -np.inf, dtype=x.dtype)
        boff = xp.zeros(tuple(shape), dtype=odt)
        for t in range(ax.longest):
            v, mask = _adaptive_tap(xp, vals, axis, ax, t)
            take = (v > best) | xp.isnan(v)
            if mask is not None:
                take &= mask
            xp.copyto(best, v, where=take)
            step = odt.type(t * mult)
            cand = xp.asarray(step) if offs is None else (
                _adaptive_tap(xp, offs, axis, ax, t)[0] + step)
            xp.copyto(boff, cand, where=take)
        vals, offs = best, boff
    return vals, offs


def _adaptive_max_backward_xp(dout, offsets, geom, cl=False):
    """dx of adaptive max pooling by gathers: input position p adds, from zero, the dout
    of the windows holding it whose argmax it is, in descending window order (so in
    ascending tap order, as max pooling's general path). Channels-last with ``cl``."""
    xp = get_array_module(dout, offsets)
    acc = acc_dtype(dout.dtype)
    axes = _adaptive_axes(geom)
    window = geom.window
    ndim, sp0 = dout.ndim, _sp0(cl)
    g = dout.astype(acc, copy=False)
    dx = xp.zeros(_internal_shape(geom.input_shape, cl), dtype=acc)
    zero = xp.zeros((), dtype=acc)
    for u in itertools.product(*(range(ax.cover) for ax in axes)):
        G, O = g, offsets
        valid = np.ones((1,) * ndim, dtype=bool)
        tap = np.zeros((1,) * ndim, dtype=np.int64)
        for i, ax in enumerate(axes):
            w = ax.last - u[i]
            ok = w >= ax.first
            w = np.maximum(w, 0)
            wi = xp.asarray(w)
            G = xp.take(G, wi, axis=sp0 + i)
            O = xp.take(O, wi, axis=sp0 + i)
            valid = valid & _along(ok, ndim, sp0 + i)
            tap = tap + _along((np.arange(ax.size) - ax.start[w]) * _prod(window[i + 1:]),
                               ndim, sp0 + i)
        hit = O == xp.asarray(np.where(valid, tap, -1))
        dx += xp.where(hit, G, zero)
    return dx.astype(dout.dtype, copy=False)


@_on_input_device
def adaptive_max_pool_forward(x, output_size, data_format="channels_first"):
    """Forward pass of adaptive max pooling (PyTorch's adaptive_max_pool{1,2,3}d), with
    max pooling's semantics: first maximum in row-major window order, a window with NaN
    gives NaN and its last NaN, an all -inf window -inf and its first element.

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W), float16/32/64 or bfloat16
      (channels-last shapes (N, *spatial, C) with data_format='channels_last')
    - output_size: an int or a d-tuple of ints and None (see adaptive_avg_pool_forward)
    - data_format: 'channels_first' (default) or 'channels_last'

    Returns a tuple of:
    - out: array (N, C, *output_size) (or (N, *output_size, C))
    - cache: AdaptiveMaxPoolCache (compact offsets over geom.window, laid out like the
      internal output; neither x nor out); max_pool_indices(cache) gives PyTorch's
      return_indices numbers, laid out like out
    """
    geom, layout = _check_adaptive_x(x, output_size, data_format)
    xi, cl = _internal(x, layout), _is_cl(layout)
    xp = get_array_module(x)
    if _use_kernels(xp, geom):
        out, offsets = pool_nd_kernels.adaptive_max_pool_forward_gpu(xi, geom, **_kernel_kw(cl))
    elif xp is np and all(o == 1 for o in geom.out):
        out, offsets = _global_max(xi, geom, cl)
    elif xp is np and _adaptive_as_pool(geom) is not None:  # evenly spaced: max pooling
        out, offsets = _max_pool_forward_np(xi, _adaptive_as_pool(geom), cl)
    else:  # the general path (CuPy with the kernels off: a pass per tap of each axis)
        out, offsets = _adaptive_max_xp(xi, geom, cl)
    return _external(out, layout), AdaptiveMaxPoolCache(geom, np.dtype(x.dtype),
                                                        _freeze(offsets), layout)


def _global_max(x, geom, cl=False):
    """Max over each whole plane of a NumPy x: np.argmax (its first maximum, the first NaN;
    0 for a plane of -inf), then the last NaN for the planes whose maximum is NaN. With
    ``cl`` x is (N, *size, C): the planes are the columns of (N, K, C)."""
    K = _prod(geom.size)
    if cl:   # chunks of positions (np.argmax over a strided axis copies its input)
        planes = x.reshape(geom.N, K, geom.C)
        step = max(1, (1 << 20) // max(1, geom.N * geom.C * x.dtype.itemsize))
        out = local = None
        for k0 in range(0, K, step):
            chunk = planes[:, k0:k0 + step]
            arg = np.argmax(chunk, axis=1)
            val = np.take_along_axis(chunk, arg[:, None, :], axis=1)[:, 0, :]
            if out is None:
                out, local = val, arg
                continue
            take = (val > out) | np.isnan(val)   # the first maximum; NaN fixed below
            np.copyto(out, val, where=take)
            np.copyto(local, arg + k0, where=take)
        nan = np.isnan(out)
        if nan.any():
            n_i, c_i = np.nonzero(nan)
            local[nan] = K - 1 - np.argmax(np.isnan(planes[n_i, ::-1, c_i]), axis=1)
        shape = _internal_shape(geom.output_shape, True)
        return out.reshape(shape), local.astype(geom.offset_dtype).reshape(shape)
    planes = x.reshape(geom.N * geom.C, K)
    local = np.argmax(planes, axis=1)
    out = np.take_along_axis(planes, local[:, None], axis=1)[:, 0]
    nan = np.isnan(out)
    if nan.any():
        local[nan] = K - 1 - np.argmax(np.isnan(planes[nan][:, ::-1]), axis=1)
    return (out.reshape(geom.output_shape),
            local.astype(geom.offset_dtype).reshape(geom.output_shape))


@_on_input_device
def adaptive_max_pool_backward(dout, cache):
    """Backward pass of adaptive max pooling: each window's gradient goes to its recorded
    argmax; deterministic (fixed order of sums where windows overlap).

    Inputs:
    - dout: array (N, C, *output_size) (or (N, *output_size, C): the forward's layout)
    - cache: AdaptiveMaxPoolCache

    Returns:
    - dx: array (N, C, *size) (or (N, *size, C)), the forward input's dtype
    """
    geom, xp, dout, cl = _backward_inputs(dout, cache, AdaptiveMaxPoolCache)
    if _use_kernels(xp, geom):
        dx = pool_nd_kernels.adaptive_max_pool_backward_gpu(dout, cache.offsets, geom,
                                                            **_kernel_kw(cl))
        return _external(dx, cache.layout)
    pgeom = _adaptive_as_pool(geom) if xp is np else None
    if pgeom is not None:  # evenly spaced windows: max pooling's backward (the same bits)
        return _external(_max_pool_backward_np_fast(dout, cache.offsets, pgeom, cl),
                         cache.layout)
    return _external(_adaptive_max_backward_xp(dout, cache.offsets, geom, cl), cache.layout)


# ---------------------------------------------------------------------- max unpooling

_UNPOOL_SIZES = {1: "(L,) or (N, C, L)", 2: "(H, W) or (N, C, H, W)",
                 3: "(D, H, W) or (N, C, D, H, W)"}


def _unpool_output_shape(x_shape, output_size):
    N, C = x_shape[:2]
    d = len(x_shape) - 2
    if isinstance(output_size, (str, bytes)) or not hasattr(output_size, "__len__"):
        raise TypeError(f"output_size must be a tuple of ints {_UNPOOL_SIZES[d]}, got "
                        f"{output_size!r} ({type(output_size).__name__}) for x of shape {x_shape}")
    if any(isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer))
           for s in output_size):
        raise TypeError(f"output_size must hold ints only, got {tuple(output_size)!r} for x of "
                        f"shape {x_shape}")
    size = tuple(int(s) for s in output_size)
    if len(size) == d + 2:
        if size[:2] != (N, C):
            raise ValueError(f"output_size {size} does not match x of shape {x_shape}")
        size = size[2:]
    if len(size) != d or min(size) <= 0:
        raise ValueError(f"output_size must be {_UNPOOL_SIZES[d]} with sizes > 0, "
                         f"got {tuple(output_size)} for x of shape {x_shape}")
    return (N, C) + size


@_on_input_device
def max_unpool_forward(x, indices, output_size, data_format="channels_first"):
    """Max unpooling: put each value back at its pooled position (PyTorch's
    max_unpool{1,2,3}d).

    Where several inputs of one plane point at the same position, the last one
    in row-major order wins (as PyTorch on the CPU; deterministic here on
    every backend), and only it receives gradient in the backward pass.

    An index outside the output plane raises ValueError on NumPy. On CuPy it is not
    checked (that would read the device on the host): such an input targets nothing,
    its value is dropped and its gradient is 0 (PyTorch's CUDA op raises a device-side
    assert instead).

    Inputs:
    - x: array (N, C, *in) with 1, 2 or 3 spatial axes, e.g. a max pool's output
      ((N, *in, C) with data_format='channels_last')
    - indices: integer array shaped like x of flat indices into each output volume
      (L, H*W or D*H*W), e.g. from max_pool_indices (PyTorch's numbers in either layout)
    - output_size: the d spatial sizes or the full output shape (in data_format's order);
      ints only
    - data_format: 'channels_first' (default) or 'channels_last'; an x (and indices) in
      PyTorch's channels_last memory format is unpooled without a copy of x, out keeps it

    Returns a tuple of:
    - out: array (N, C, *output_size) (or (N, *output_size, C)), zeros except at the
      indexed positions
    - cache: UnpoolCache (xp path) or UnpoolKernelCache (CUDA kernels)
    """
    check_array(x, "x")
    check_array(indices, "indices")
    data_format = check_data_format(data_format, "data_format")
    check_floating(x, "x")
    if x.ndim not in (3, 4, 5):
        shapes = ("(N, L, C), (N, H, W, C) or (N, D, H, W, C)" if data_format == "channels_last"
                  else "(N, C, L), (N, C, H, W) or (N, C, D, H, W)")
        raise ValueError(f"max unpooling expects x of shape {shapes}, got shape "
                         f"{tuple(x.shape)}")
    if np.dtype(indices.dtype).kind not in "iu":
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if tuple(indices.shape) != tuple(x.shape):
        raise ValueError(f"indices of shape {tuple(indices.shape)} do not match x of shape "
                         f"{tuple(x.shape)}")
    xp = get_array_module(x, indices)
    layout = _layout(x, data_format)
    cl = _is_cl(layout)
    x_cf = to_channels_first_shape(x.shape, data_format)
    if (data_format == "channels_last" and not isinstance(output_size, (str, bytes))
            and hasattr(output_size, "__len__") and len(output_size) == x.ndim):
        output_size = to_channels_first_shape(tuple(output_size), "channels_last")
    out_cf = _unpool_output_shape(x_cf, output_size)
    N, C = out_cf[:2]
    P = _prod(out_cf[2:])
    Pin = _prod(x_cf[2:])
    xi = _internal(x, layout)
    ii = _internal(indices, layout)
    idx = ii.astype(np.int64)           # (N, C, *in) or (N, *in, C)
    valid = None
    if xp is not np:
        # no host read on CuPy: an index out of range targets nothing (value dropped,
        # gradient 0), in the kernels and on the xp path alike
        valid = (idx >= 0) & (idx < P)
    elif idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= P:
            raise ValueError(f"max unpooling index out of range: indices span [{lo}, {hi}] but "
                             f"the output plane has {'x'.join(map(str, out_cf[2:]))} = {P} "
                             f"positions (x shape {tuple(x.shape)}, output "
                             f"{_caller_shape(out_cf, layout)})")
    x_shape, out_shape = tuple(x.shape), _caller_shape(out_cf, layout)
    out_int = _internal_shape(out_cf, cl)
    if _use_kernels(xp) and max(out_cf + (P,)) < 2**31:
        idx = xp.ascontiguousarray(idx)
        # with channels_last=True the arrays are channels-last, out_shape stays (N, C, *out)
        out, won = pool_nd_kernels.max_unpool_forward_gpu(
            xi, idx, out_cf, return_winners=True, **_kernel_kw(cl))
        return _external(out, layout), UnpoolKernelCache(x_shape, np.dtype(x.dtype), idx, won,
                                                         out_shape, layout)
    if valid is not None:
        idx = xp.where(valid, idx, 0)
    if cl:   # target of (n, p, c): (n*P + index)*C + c
        targets = (idx.reshape(N, Pin, C) + (xp.arange(N, dtype=np.int64) * P)[:, None, None])
        targets = targets * C + xp.arange(C, dtype=np.int64)
    else:
        targets = idx.reshape(N * C, Pin) + xp.arange(N * C, dtype=np.int64)[:, None] * P
    targets = targets.reshape(-1)
    if valid is not None:   # out-of-range inputs sort last and never win
        targets = xp.where(valid.reshape(-1), targets, N * C * P)
    order = xp.argsort(targets, kind="stable")
    sorted_t = targets[order]
    last = xp.ones(sorted_t.shape, dtype=bool)
    if sorted_t.size > 1:
        last[:-1] = sorted_t[1:] != sorted_t[:-1]
    winners = xp.zeros(targets.shape, dtype=bool)
    winners[order[last]] = True
    if valid is not None:
        winners &= targets < N * C * P
        targets = xp.where(winners | (targets < N * C * P), targets, 0)
    out = xp.zeros(N * C * P, dtype=x.dtype)
    out[targets[winners]] = xi.reshape(-1)[winners]
    cache = UnpoolCache(x_shape, np.dtype(x.dtype), _freeze(targets), _freeze(winners),
                        out_shape, layout)
    return _external(out.reshape(out_int), layout), cache


@_on_input_device
def max_unpool_backward(dout, cache):
    """Backward pass of max unpooling: gather dout at each input's position (zero for an
    input that lost its shared position to a later one).

    Inputs:
    - dout: array (N, C, *output_size) (or (N, *output_size, C): the forward's layout)
    - cache: UnpoolCache or UnpoolKernelCache

    Returns:
    - dx: array (N, C, *in) (or (N, *in, C)), the forward input's dtype
    """
    _check_cache(cache, UnpoolCache, UnpoolKernelCache)
    check_array(dout, "dout")
    check_floating(dout, "dout")
    if tuple(dout.shape) != cache.out_shape:
        raise ValueError(f"dout has shape {tuple(dout.shape)} but max unpooling produced "
                         f"{cache.out_shape} (from x of shape {cache.x_shape})")
    layout = cache.layout
    cl = _is_cl(layout)
    dout = _internal(dout.astype(cache.dtype, copy=False), layout)
    x_cf = cache.x_shape if layout != "channels_last" else to_channels_first_shape(
        cache.x_shape, "channels_last")
    x_int = _internal_shape(x_cf, cl)
    if isinstance(cache, UnpoolKernelCache):
        get_array_module(dout, cache.indices)
        return _external(pool_nd_kernels.max_unpool_backward_gpu(   # x_shape: (N, C, *in)
            dout, cache.indices, cache.winners, x_cf, **_kernel_kw(cl)), layout)
    xp = get_array_module(dout, cache.targets)
    dx = xp.where(cache.winners, dout.reshape(-1)[cache.targets], xp.zeros((), dtype=dout.dtype))
    return _external(dx.reshape(x_int), layout)
