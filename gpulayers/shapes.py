"""Pooling geometry: parameter parsing, output sizes and validity checks, for 1, 2
and 3 spatial axes.

This is the one home of the shape rules (PyTorch keeps its equivalents in
``aten/src/ATen/native/Pool.h``). Every pooling implementation -- the naive
loops, the reshape trick, the general xp path and the CUDA kernels -- takes a
:class:`PoolGeometry` (or, for adaptive pooling, an :class:`AdaptiveGeometry`)
built here, so all of them agree on which windows exist. The rank d is taken from
x: (N, C, L), (N, C, H, W) or (N, C, D, H, W).

In 2-D, window ``(oh, ow)`` covers the input rows ``oh*sh - ph + i*dh`` for
``i in range(kh)`` and the columns ``ow*sw - pw + j*dw`` for ``j in range(kw)``.
Its element ``(i, j)`` has the *compact offset* ``i*kw + j``: the number that
the max-pool cache stores per output element. Other ranks likewise, row-major
over the kernel's axes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PoolGeometry",
    "pool_geometry",
    "AdaptiveGeometry",
    "adaptive_geometry",
    "adaptive_bounds",
    "check_pool_options",
    "pool_data_format",
    "pool_output_size",
    "offset_dtype",
    "check_floating",
    "is_floating",
    "is_bfloat16",
    "acc_dtype",
    "FLOATING_NAMES",
    "check_data_format",
    "DATA_FORMATS",
    "channels_last_strided",
    "to_channels_first_shape",
    "from_channels_first_shape",
    "check_array",
]


def _ints(value, name, d):
    """A d-tuple from an int or a d-sequence of ints (NumPy's too); ValueError otherwise."""
    what = "an int" if d == 1 else f"an int or a tuple of {d} ints"
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"pool_param[{name!r}] must be {what}, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return (int(value),) * d
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"pool_param[{name!r}] must be {what}, got {value!r}")
    items = tuple(value)
    if len(items) != d or any(isinstance(v, (bool, np.bool_))
                              or not isinstance(v, (int, np.integer)) for v in items):
        raise ValueError(f"pool_param[{name!r}] must be {what} for {d}-D pooling, got {value!r}")
    return tuple(int(v) for v in items)


def _pair(value, name):
    """Return ``(a, b)`` from an int or a pair of ints; ValueError otherwise."""
    return _ints(value, name, 2)


def _int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"pool_param[{name!r}] must be an int, got {value!r}")
    return int(value)


def pool_output_size(size, kernel, stride, pad, dilation, ceil_mode):
    """Output length along one axis, by PyTorch's ``pooling_output_shape``.

    With ``ceil_mode`` a last window that would start in the right padding
    (or beyond) is dropped.
    """
    extent = dilation * (kernel - 1) + 1
    num = size + 2 * pad - extent + ((stride - 1) if ceil_mode else 0)
    out = num // stride + 1  # floor division, like PyTorch's div_rtn
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def offset_dtype(window_size):
    """Smallest unsigned dtype that holds a compact offset in ``[0, window_size)``."""
    if window_size <= 256:
        return np.dtype(np.uint8)
    if window_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def check_array(a, name):
    """TypeError unless ``a`` is an array (NumPy or CuPy): not None, a list or a scalar."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype") or not hasattr(a, "ndim"):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")


# ------------------------------------------------------------------------- dtypes
# The floating dtypes every layer takes. bfloat16 is ml_dtypes.bfloat16 (NumPy dtype
# kind 'V', name 'bfloat16'; CuPy >= 14 uses the same dtype). It is recognised by its
# name, so importing gpulayers never imports ml_dtypes.
FLOATING_NAMES = ("float16", "float32", "float64", "bfloat16")


def is_bfloat16(dtype):
    """True for ml_dtypes.bfloat16 (by dtype name; ml_dtypes is not imported)."""
    try:
        return np.dtype(dtype).name == "bfloat16"
    except TypeError:
        return False


# {np.dtype: bool}: the answers of is_floating for dtype objects, so a call on a warmed
# dtype is one dict lookup (np.dtype(...).name builds a string on every call).
_FLOATING = {}


def is_floating(dtype):
    """True for the floating dtypes the layers take: float16, float32, float64, bfloat16."""
    if dtype.__class__ is not type and isinstance(dtype, np.dtype):
        known = _FLOATING.get(dtype)
        if known is not None:
            return known
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return False
    answer = (dt.kind == "f" and dt.name in FLOATING_NAMES) or dt.name == "bfloat16"
    if isinstance(dtype, np.dtype):
        _FLOATING[dtype] = answer
    return answer


_ACC = {}   # {np.dtype: accumulation dtype}, as _FLOATING


def acc_dtype(dtype):
    """Accumulation dtype: float32 for float16 and bfloat16, else the dtype itself."""
    if isinstance(dtype, np.dtype):
        known = _ACC.get(dtype)
        if known is not None:
            return known
    dt = np.dtype(dtype)
    answer = np.dtype(np.float32) if dt == np.float16 or dt.name == "bfloat16" else dt
    if isinstance(dtype, np.dtype):
        _ACC[dtype] = answer
    return answer


def check_floating(x, name="x"):
    """TypeError unless ``x`` has a floating dtype (float16, float32, float64 or bfloat16)."""
    if _FLOATING.get(x.dtype) is True:   # a dtype seen before: one dict lookup
        return
    dtype = np.dtype(x.dtype)
    if not is_floating(dtype):
        raise TypeError(
            f"{name} must have a floating dtype (float16, float32, float64 or bfloat16), "
            f"got {dtype} with shape {tuple(x.shape)}")


# -------------------------------------------------------------------- data_format
# Keras's name for the layout: 'channels_first' is (N, C, *spatial), 'channels_last' is
# (N, *spatial, C). Geometries are always (N, C, *spatial)-based; a channels_last shape
# is permuted with to_channels_first_shape before it is checked.
DATA_FORMATS = ("channels_first", "channels_last")


def check_data_format(value, where="data_format"):
    """'channels_first' or 'channels_last'; ValueError naming ``value`` (and ``where`` it
    came from, e.g. "pool_param['data_format']") otherwise."""
    if isinstance(value, str) and value in DATA_FORMATS:
        return value
    raise ValueError(f"{where} must be 'channels_first' or 'channels_last', got {value!r}")


def channels_last_strided(x):
    """True for a channels-first-shaped x, (N, C, *spatial) with 1-3 spatial axes, whose
    memory is channels-last (PyTorch's channels_last / channels_last_3d memory formats, and
    the same for 1-D): moveaxis(x, 1, -1) is C-contiguous while x is not. Works for NumPy
    and CuPy arrays (strides only; nothing is copied)."""
    if x.ndim not in (3, 4, 5) or x.flags.c_contiguous:
        return False
    shape, strides = tuple(x.shape), tuple(x.strides)
    order = (0,) + tuple(range(2, x.ndim)) + (1,)
    expect = x.dtype.itemsize
    for axis in reversed(order):   # C-contiguity of the moveaxis view, sizes-1 axes free
        if shape[axis] != 1 and strides[axis] != expect:
            return False
        expect *= shape[axis]
    return True


def to_channels_first_shape(shape, data_format):
    """(N, C, *spatial) from a shape in ``data_format`` (the shape itself for channels_first)."""
    shape = tuple(int(s) for s in shape)
    if data_format == "channels_last" and len(shape) >= 3:
        return (shape[0], shape[-1]) + shape[1:-1]
    return shape


def from_channels_first_shape(shape, data_format):
    """The shape in ``data_format`` of an (N, C, *spatial) shape."""
    shape = tuple(int(s) for s in shape)
    if data_format == "channels_last" and len(shape) >= 3:
        return (shape[0],) + shape[2:] + (shape[1],)
    return shape


_SPATIAL = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
_AXES = {1: "L", 2: "H, W", 3: "D, H, W"}


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


class _Sizes:
    """What every pooling geometry answers from N, C and the spatial ``size``/``out``.

    Geometries are immutable, so what is derived from their fields is computed once per
    object (``functools.cached_property`` writes to the instance ``__dict__``, which a frozen
    dataclass allows), and so is the hash: launch plans are cached per geometry, and a warm
    call then costs a dict lookup, not a hash of nine nested tuples."""

    @property
    def d(self):
        """Number of spatial axes."""
        return len(self.size)

    @functools.cached_property
    def input_shape(self):
        return (self.N, self.C) + tuple(self.size)

    @functools.cached_property
    def output_shape(self):
        return (self.N, self.C) + tuple(self.out)

    def __hash__(self):
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash(self._fields())
        return h

    def _fields(self):
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)


@dataclass(frozen=True)
class PoolGeometry(_Sizes):
    """Everything that decides which input elements each pooling window sees, for
    d = 1, 2 or 3 spatial axes.

    Attributes: ``N, C``; per spatial axis (d-tuples) the input ``size``, ``kernel``,
    ``stride``, ``pad``, ``dilation`` and the output ``out``; ``ceil_mode``.

    Window ``o`` (a d-index) covers, along axis a, the input positions
    ``o[a]*stride[a] - pad[a] + t*dilation[a]`` for taps ``t < kernel[a]``; its tap
    ``(t_0, .., t_{d-1})`` has the *compact offset* ``t`` in row-major order over
    ``kernel`` (``i*kw + j`` in 2-D): the number the max-pool cache stores.

    2-D geometries also answer PyTorch-style scalar names: ``H, W, kh, kw, sh, sw, ph,
    pw, dh, dw, Ho, Wo`` (what the 2-D kernels take); :meth:`as_2d` gives a 1-D
    geometry's equivalent 2-D one (an input row of height 1).
    """

    N: int
    C: int
    size: tuple
    kernel: tuple
    stride: tuple
    pad: tuple
    dilation: tuple
    ceil_mode: bool
    out: tuple

    @classmethod
    def from_2d(cls, N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode, Ho, Wo):
        """A 2-D geometry from the scalar sizes (no checks: see :func:`pool_geometry`)."""
        return cls(N, C, (H, W), (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode, (Ho, Wo))

    def _axis2(self, field, i):
        if self.d != 2:
            raise AttributeError(f"2-D size names are for 2-D geometries; this one is {self.d}-D "
                                 f"(use .{field}, or as_2d() for 1-D): {self.describe()}")
        return getattr(self, field)[i]

    H = property(lambda self: self._axis2("size", 0))
    W = property(lambda self: self._axis2("size", 1))
    kh = property(lambda self: self._axis2("kernel", 0))
    kw = property(lambda self: self._axis2("kernel", 1))
    sh = property(lambda self: self._axis2("stride", 0))
    sw = property(lambda self: self._axis2("stride", 1))
    ph = property(lambda self: self._axis2("pad", 0))
    pw = property(lambda self: self._axis2("pad", 1))
    dh = property(lambda self: self._axis2("dilation", 0))
    dw = property(lambda self: self._axis2("dilation", 1))
    Ho = property(lambda self: self._axis2("out", 0))
    Wo = property(lambda self: self._axis2("out", 1))

    def as_2d(self):
        """This geometry as a 2-D one: itself for d = 2; for d = 1, the same windows over
        an input of shape (N, C, 1, L) (kernel, stride and dilation 1 and no padding along
        the new axis), whose compact offsets and flat indices equal the 1-D ones. None
        for d = 3."""
        if self.d == 2:
            return self
        if self.d != 1:
            return None
        return PoolGeometry(self.N, self.C, (1,) + self.size, (1,) + self.kernel,
                            (1,) + self.stride, (0,) + self.pad, (1,) + self.dilation,
                            self.ceil_mode, (1,) + self.out)

    def __hash__(self):   # explicit, so dataclass keeps it: cached (see _Sizes)
        return _Sizes.__hash__(self)

    @functools.cached_property
    def window_size(self):
        return _prod(self.kernel)

    @functools.cached_property
    def offset_dtype(self):
        return offset_dtype(self.window_size)

    @property
    def padded_shape(self):
        """Per axis, the positions a padded buffer needs so every window fits, including
        the ceil_mode overhang past the right padding."""
        return tuple(max(n + 2 * p, (o - 1) * s + dl * (k - 1) + 1)
                     for n, k, s, p, dl, o in zip(self.size, self.kernel, self.stride,
                                                  self.pad, self.dilation, self.out))

    @property
    def extent(self):
        """Per axis, the span of one window: (kernel - 1)*dilation + 1."""
        return tuple(dl * (k - 1) + 1 for k, dl in zip(self.kernel, self.dilation))

    @functools.cached_property
    def overlapping(self):
        """True when two windows can share an input element."""
        return any(s < e for s, e in zip(self.stride, self.extent))

    @functools.cached_property
    def tiles(self):
        """True when the windows tile the input exactly (the reshape precondition)."""
        return all(k == s and p == 0 and dl == 1 and n % k == 0
                   for n, k, s, p, dl in zip(self.size, self.kernel, self.stride, self.pad,
                                             self.dilation))

    def describe(self):
        d = self.d
        shape = _SPATIAL.get(d, "(N, C, ...)")
        return (f"input {shape} = {self.input_shape}, kernel = {tuple(self.kernel)}, "
                f"stride = {tuple(self.stride)}, pad = {tuple(self.pad)}, "
                f"dilation = {tuple(self.dilation)}, ceil_mode = {self.ceil_mode}, "
                f"output ({_AXES.get(d, '...')}) = {tuple(self.out)}")

    def first_valid_offset(self):
        """int64 array of shape ``out``: compact offset of each window's first tap
        (row-major) that lies inside the input, not in the padding."""
        firsts = [_first_valid(o, s, p, dl, k, n) for n, k, s, p, dl, o in
                  zip(self.size, self.kernel, self.stride, self.pad, self.dilation, self.out)]
        total = np.zeros(tuple(self.out), dtype=np.int64)
        for a, first in enumerate(firsts):
            shape = [1] * self.d
            shape[a] = -1
            total = total + first.reshape(shape) * _prod(self.kernel[a + 1:])
        return total


def _first_valid(n_out, stride, pad, dilation, kernel, size):
    """For each window along one axis, the first tap ``i`` with an in-range
    input position, or ``kernel`` when no tap is in range."""
    start = np.arange(n_out, dtype=np.int64) * stride - pad
    taps = start[:, None] + np.arange(kernel, dtype=np.int64)[None, :] * dilation
    inside = (taps >= 0) & (taps < size)
    first = np.where(inside.any(axis=1), inside.argmax(axis=1), kernel)
    return first.astype(np.int64)


# pool_param keys each op takes (PyTorch's max_pool has dilation, avg_pool
# count_include_pad and divisor_override); a key of another op is an error, not
# silently ignored. 'kernel_size' (PyTorch's name) works for every rank; the CS231n
# names 'pool_height'/'pool_width' for 2-D only.
# 'data_format' (every op) does not change the geometry: pool_geometry takes the
# (N, C, *spatial) shape and ignores it; pool_data_format reads and checks it.
_COMMON_KEYS = ("kernel_size", "pool_height", "pool_width", "stride", "pad", "ceil_mode",
                "data_format")
_POOL_KEYS = {"max": frozenset(_COMMON_KEYS + ("dilation",)),
              "avg": frozenset(_COMMON_KEYS + ("count_include_pad", "divisor_override")),
              "sum": frozenset(_COMMON_KEYS)}
_OP_NAMES = {"max": "max pooling", "avg": "average pooling", "sum": "sum pooling"}


def _hashable(value):
    """A cache key for one pool_param value that keeps its types (so 2.0 or True
    never reuse the result checked for 2 or 1)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_hashable(v) for v in value)
    return (type(value).__name__, value)


def pool_geometry(x_shape, pool_param, op="max"):
    """Check ``x_shape`` and ``pool_param`` and return a :class:`PoolGeometry`.

    Inputs:
    - x_shape: tuple (N, C, H, W)
    - pool_param: dict with 'pool_height', 'pool_width' (required) and the
      optional 'stride' (default: the window), 'pad' (0), 'dilation' (1),
      'ceil_mode' (False), 'count_include_pad' (True, avg only)
    - op: 'max' or 'avg' (avg pooling takes no dilation, like PyTorch)

    Raises ValueError naming the input size, the parameters and the computed
    output size when the combination is not valid.
    """
    if isinstance(pool_param, dict):
        try:
            key = tuple(sorted((k, _hashable(v)) for k, v in pool_param.items()))
            hash(key)
        except TypeError:  # an unhashable value: check it the slow way, which raises
            key = None
        if key is not None:
            return _cached_geometry(tuple(int(s) for s in x_shape), key, pool_param, op)
    return _pool_geometry(x_shape, pool_param, op)


def _cached_geometry(x_shape, key, pool_param, op):
    """pool_geometry through a cache keyed on (shape, typed parameters, op): a layer
    called again on one shape is checked once."""
    geom = _GEOMETRIES.get((x_shape, key, op))
    if geom is None:
        geom = _pool_geometry(x_shape, pool_param, op)
        if len(_GEOMETRIES) >= 1024:
            _GEOMETRIES.clear()
        _GEOMETRIES[(x_shape, key, op)] = geom
    return geom


_GEOMETRIES = {}


def _kernel(pool_param, d, shape):
    """The d-tuple kernel from 'kernel_size' or, in 2-D, 'pool_height'/'pool_width'."""
    cs231n = [k for k in ("pool_height", "pool_width") if k in pool_param]
    if "kernel_size" in pool_param and cs231n:
        raise ValueError(f"pool_param gives the window twice: 'kernel_size' and {cs231n}; "
                         f"use one spelling (input of shape {shape})")
    if cs231n:
        if d != 2:
            raise ValueError(f"pool_param {cs231n} name a 2-D window, but x of shape {shape} "
                             f"has {d} spatial axes: use 'kernel_size' (an int or a tuple of "
                             f"{d} ints)")
        for key in ("pool_height", "pool_width"):
            if key not in pool_param:
                raise ValueError(f"pool_param needs {key!r} with {cs231n} (or 'kernel_size'); "
                                 f"got keys {sorted(pool_param)}")
        return (_int(pool_param["pool_height"], "pool_height"),
                _int(pool_param["pool_width"], "pool_width"))
    if "kernel_size" not in pool_param:
        names = "'kernel_size'" + (" (or 'pool_height' and 'pool_width')" if d == 2 else "")
        raise ValueError(f"pool_param needs {names}; got keys {sorted(pool_param)} for x of "
                         f"shape {shape}")
    return _ints(pool_param["kernel_size"], "kernel_size", d)


def check_pool_options(pool_param, op, shape):
    """The op's options that do not change which windows exist: (count_include_pad,
    divisor_override) for 'avg' (True, None by default); ValueError naming them."""
    cip = pool_param.get("count_include_pad", True)
    if not isinstance(cip, (bool, np.bool_)):
        raise ValueError(f"pool_param['count_include_pad'] must be a bool, got {cip!r} "
                         f"(input of shape {shape})")
    div = pool_param.get("divisor_override")
    if div is not None and (isinstance(div, (bool, np.bool_))
                            or not isinstance(div, (int, np.integer)) or div <= 0):
        raise ValueError(f"pool_param['divisor_override'] must be a positive int or None, got "
                         f"{div!r} (input of shape {shape})")
    return bool(cip), (None if div is None else int(div))


def pool_data_format(pool_param):
    """pool_param['data_format'] checked: 'channels_first' (the default) or
    'channels_last'; ValueError naming the value otherwise (TypeError for a non-dict)."""
    if not isinstance(pool_param, dict):
        raise TypeError(f"pool_param must be a dict, got {type(pool_param).__name__}")
    return check_data_format(pool_param.get("data_format", "channels_first"),
                             "pool_param['data_format']")


def _pool_geometry(x_shape, pool_param, op):
    shape = tuple(int(s) for s in x_shape)
    if not isinstance(pool_param, dict):
        raise TypeError(f"pool_param must be a dict, got {type(pool_param).__name__}")
    if op not in _POOL_KEYS:
        raise ValueError(f"op must be one of {sorted(_POOL_KEYS)}, got {op!r}")
    keys = _POOL_KEYS[op]
    unknown = set(pool_param) - keys
    if unknown:
        other = sorted(k for k in unknown if any(k in v for v in _POOL_KEYS.values()))
        why = (f"{other} belong to another pooling op, not {_OP_NAMES[op]}; " if other else "")
        raise ValueError(f"unknown pool_param keys {sorted(unknown)} for {_OP_NAMES[op]} of an "
                         f"input of shape {shape}: {why}{_OP_NAMES[op]} takes {sorted(keys)}")
    if len(shape) not in (3, 4, 5):
        raise ValueError(f"pooling expects x of shape (N, C, L), (N, C, H, W) or "
                         f"(N, C, D, H, W), got {len(shape)}-D shape {shape}")
    d = len(shape) - 2
    N, C, size = shape[0], shape[1], shape[2:]
    if C <= 0 or min(size) <= 0:
        raise ValueError(f"pooling expects non-zero C and {_AXES[d]}, got x of shape {shape}")
    kernel = _kernel(pool_param, d, shape)
    stride = pool_param.get("stride")
    stride = kernel if stride is None else _ints(stride, "stride", d)
    pad = _ints(pool_param.get("pad", 0), "pad", d)
    dilation = _ints(pool_param.get("dilation", 1), "dilation", d)
    ceil_mode = pool_param.get("ceil_mode", False)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise ValueError(f"pool_param['ceil_mode'] must be a bool, got {ceil_mode!r} "
                         f"(input of shape {shape})")
    ceil_mode = bool(ceil_mode)
    if op == "avg":
        check_pool_options(pool_param, op, shape)

    where = (f"input {_SPATIAL[d]} = {shape}, kernel = {kernel}, stride = {stride}, "
             f"pad = {pad}, dilation = {dilation}, ceil_mode = {ceil_mode}")
    if min(kernel) <= 0:
        raise ValueError(f"kernel size must be > 0: {where}")
    if min(stride) <= 0:
        raise ValueError(f"stride must be > 0: {where}")
    if min(dilation) <= 0:
        raise ValueError(f"dilation must be > 0: {where}")
    if min(pad) < 0:
        raise ValueError(f"pad must be >= 0: {where}")
    extent = tuple(dl * (k - 1) + 1 for k, dl in zip(kernel, dilation))
    if any(p > e // 2 for p, e in zip(pad, extent)):
        raise ValueError(
            f"pad should be at most half of the effective kernel size "
            f"{tuple(e // 2 for e in extent)} = ((k-1)*dilation+1)//2: {where}")
    out = tuple(pool_output_size(n, k, st, p, dl, ceil_mode)
                for n, k, st, p, dl in zip(size, kernel, stride, pad, dilation))
    if min(out) < 1:
        raise ValueError(f"output size is too small: {where}, output ({_AXES[d]}) = {out}")
    geom = PoolGeometry(N, C, size, kernel, stride, pad, dilation, ceil_mode, out)
    for a in range(d):
        first = _first_valid(out[a], stride[a], pad[a], dilation[a], kernel[a], size[a])
        if (first == kernel[a]).any():
            raise ValueError(
                f"a pooling window covers only padding (axis {a}, output positions "
                f"{np.flatnonzero(first == kernel[a]).tolist()}): {geom.describe()}")
    return geom


# --------------------------------------------------------------------- adaptive pooling

def adaptive_bounds(size, out):
    """int64 arrays (start, end) of the ``out`` windows along an axis of ``size``
    positions, by PyTorch's rule: start = floor(i*size/out), end = ceil((i+1)*size/out)."""
    i = np.arange(out, dtype=np.int64)
    return (i * size) // out, -((-(i + 1) * size) // out)


@dataclass(frozen=True)
class AdaptiveGeometry(_Sizes):
    """Windows of adaptive pooling over d = 1, 2 or 3 spatial axes.

    Output position ``o`` covers, along axis a, the input positions
    ``[start_a(o[a]), end_a(o[a]))`` (:func:`adaptive_bounds`); windows of one axis
    may differ in length by one and may overlap. ``window`` is the largest window per
    axis; a tap ``t`` of window o (``t[a] < end - start``) has the compact offset ``t`` in
    row-major order over ``window``: what the adaptive max-pool cache stores, in
    ``offset_dtype``.

    Attributes: ``N, C``, input ``size`` and output ``out`` (d-tuples).
    """

    N: int
    C: int
    size: tuple
    out: tuple

    def __hash__(self):   # explicit, so dataclass keeps it: cached (see _Sizes)
        return _Sizes.__hash__(self)

    def bounds(self, axis):
        """(start, end) int64 arrays of the windows along spatial axis ``axis``."""
        return adaptive_bounds(self.size[axis], self.out[axis])

    @functools.cached_property
    def window(self):
        """Largest window length per axis."""
        out = []
        for a in range(self.d):
            start, end = self.bounds(a)
            out.append(int((end - start).max()))
        return tuple(out)

    @functools.cached_property
    def window_size(self):
        return _prod(self.window)

    @functools.cached_property
    def offset_dtype(self):
        return offset_dtype(self.window_size)

    def describe(self):
        d = self.d
        return (f"input {_SPATIAL.get(d, '(N, C, ...)')} = {self.input_shape}, "
                f"output ({_AXES.get(d, '...')}) = {tuple(self.out)}")


def adaptive_geometry(x_shape, output_size):
    """Check ``x_shape`` and ``output_size`` and return an :class:`AdaptiveGeometry`.

    Inputs:
    - x_shape: (N, C, L), (N, C, H, W) or (N, C, D, H, W)
    - output_size: an int (every axis) or a d-tuple of ints and None (None keeps that
      axis's input size); global pooling is output_size=1

    Raises TypeError for output sizes that are not ints or None, ValueError naming the
    sizes otherwise. A tuple shape of ints with an int or a tuple of ints and None as
    output_size is checked once: its geometry is kept (as pool_geometry keeps its own).
    """
    key = None
    if x_shape.__class__ is tuple and all(v.__class__ is int for v in x_shape):
        oc = output_size.__class__
        if oc is int or (oc is tuple and all(v is None or v.__class__ is int
                                             for v in output_size)):
            key = (x_shape, output_size)
            geom = _ADAPTIVE_GEOMETRIES.get(key)
            if geom is not None:
                return geom
    geom = _adaptive_geometry(x_shape, output_size)
    if key is not None:
        if len(_ADAPTIVE_GEOMETRIES) >= 1024:
            _ADAPTIVE_GEOMETRIES.clear()
        _ADAPTIVE_GEOMETRIES[key] = geom
    return geom


_ADAPTIVE_GEOMETRIES = {}


def _adaptive_geometry(x_shape, output_size):
    shape = tuple(int(s) for s in x_shape)
    if len(shape) not in (3, 4, 5):
        raise ValueError(f"adaptive pooling expects x of shape (N, C, L), (N, C, H, W) or "
                         f"(N, C, D, H, W), got {len(shape)}-D shape {shape}")
    d = len(shape) - 2
    size = shape[2:]
    if shape[1] <= 0 or min(size) <= 0:
        raise ValueError(f"adaptive pooling expects non-zero C and {_AXES[d]}, got x of "
                         f"shape {shape}")

    def entry(v):
        return v is None or (isinstance(v, (int, np.integer))
                             and not isinstance(v, (bool, np.bool_)))
    if entry(output_size) and output_size is not None:
        out = (int(output_size),) * d
    elif (not isinstance(output_size, (str, bytes)) and hasattr(output_size, "__len__")
          and all(entry(v) for v in output_size)):
        if len(output_size) != d:
            raise ValueError(f"output_size {tuple(output_size)} must give {d} sizes for x of "
                             f"shape {shape}")
        out = tuple(n if v is None else int(v) for v, n in zip(output_size, size))
    else:
        raise TypeError(f"output_size must be an int or a tuple of {d} ints or None, got "
                        f"{output_size!r} for x of shape {shape}")
    if min(out) <= 0:
        raise ValueError(f"output_size must be positive, got {out} for x of shape {shape}")
    return AdaptiveGeometry(shape[0], shape[1], size, out)
