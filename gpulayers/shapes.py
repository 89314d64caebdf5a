"""Pooling geometry: parameter parsing, output sizes and validity checks.

This is the one home of the shape rules (PyTorch keeps its equivalents in
``aten/src/ATen/native/Pool.h``). Every pooling implementation -- the naive
loops, the reshape trick, the general xp path and the CUDA kernels -- takes a
:class:`PoolGeometry` built here, so all of them agree on which windows exist.

Window ``(oh, ow)`` covers the input rows ``oh*sh - ph + i*dh`` for
``i in range(kh)`` and the columns ``ow*sw - pw + j*dw`` for ``j in range(kw)``.
Its element ``(i, j)`` has the *compact offset* ``i*kw + j``: the number that
the max-pool cache stores per output element.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PoolGeometry",
    "pool_geometry",
    "pool_output_size",
    "offset_dtype",
    "check_floating",
    "check_array",
]


def _pair(value, name):
    """Return ``(a, b)`` from an int or a pair of ints; ValueError otherwise."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"pool_param[{name!r}] must be an int or a pair of ints, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(
            f"pool_param[{name!r}] must be an int or a pair of ints, got {value!r}") from None
    for v in (a, b):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(
                f"pool_param[{name!r}] must be an int or a pair of ints, got {value!r}")
    return int(a), int(b)


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


def check_floating(x, name="x"):
    """TypeError unless ``x`` has a floating dtype (float16/32/64)."""
    dtype = np.dtype(x.dtype)
    if dtype.kind != "f":
        raise TypeError(
            f"{name} must have a floating dtype (float16, float32 or float64), "
            f"got {dtype} with shape {tuple(x.shape)}")


@dataclass(frozen=True)
class PoolGeometry:
    """Everything that decides which input elements each pooling window sees.

    Attributes: input ``N, C, H, W``; kernel ``kh, kw``; stride ``sh, sw``;
    padding ``ph, pw``; dilation ``dh, dw``; ``ceil_mode``; output ``Ho, Wo``.
    """

    N: int
    C: int
    H: int
    W: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    ceil_mode: bool
    Ho: int
    Wo: int

    @property
    def input_shape(self):
        return (self.N, self.C, self.H, self.W)

    @property
    def output_shape(self):
        return (self.N, self.C, self.Ho, self.Wo)

    @property
    def window_size(self):
        return self.kh * self.kw

    @property
    def offset_dtype(self):
        return offset_dtype(self.window_size)

    @property
    def padded_shape(self):
        """(Hp, Wp): rows/cols a padded buffer needs so every window fits,
        including the ceil_mode overhang past the right padding."""
        hp = max(self.H + 2 * self.ph, (self.Ho - 1) * self.sh + self.dh * (self.kh - 1) + 1)
        wp = max(self.W + 2 * self.pw, (self.Wo - 1) * self.sw + self.dw * (self.kw - 1) + 1)
        return hp, wp

    @property
    def overlapping(self):
        """True when two windows can share an input element."""
        return (self.sh < self.dh * (self.kh - 1) + 1) or (self.sw < self.dw * (self.kw - 1) + 1)

    @property
    def tiles(self):
        """True when the windows tile the input exactly (the reshape precondition)."""
        return (self.kh == self.sh and self.kw == self.sw and self.ph == 0 and self.pw == 0
                and self.dh == 1 and self.dw == 1
                and self.H % self.kh == 0 and self.W % self.kw == 0)

    def describe(self):
        return (f"input (N, C, H, W) = {self.input_shape}, kernel = ({self.kh}, {self.kw}), "
                f"stride = ({self.sh}, {self.sw}), pad = ({self.ph}, {self.pw}), "
                f"dilation = ({self.dh}, {self.dw}), ceil_mode = {self.ceil_mode}, "
                f"output (Ho, Wo) = ({self.Ho}, {self.Wo})")

    def first_valid_offset(self):
        """int64 array (Ho, Wo): compact offset of each window's first element
        (row-major) that lies inside the input, not in the padding."""
        i0 = _first_valid(self.Ho, self.sh, self.ph, self.dh, self.kh, self.H)
        j0 = _first_valid(self.Wo, self.sw, self.pw, self.dw, self.kw, self.W)
        return i0[:, None] * self.kw + j0[None, :]


def _first_valid(n_out, stride, pad, dilation, kernel, size):
    """For each window along one axis, the first tap ``i`` with an in-range
    input position, or ``kernel`` when no tap is in range."""
    start = np.arange(n_out, dtype=np.int64) * stride - pad
    taps = start[:, None] + np.arange(kernel, dtype=np.int64)[None, :] * dilation
    inside = (taps >= 0) & (taps < size)
    first = np.where(inside.any(axis=1), inside.argmax(axis=1), kernel)
    return first.astype(np.int64)


# pool_param keys each op takes (PyTorch's max_pool2d has dilation, avg_pool2d
# count_include_pad); a key of another op is an error, not silently ignored.
_COMMON_KEYS = ("pool_height", "pool_width", "stride", "pad", "ceil_mode")
_POOL_KEYS = {"max": frozenset(_COMMON_KEYS + ("dilation",)),
              "avg": frozenset(_COMMON_KEYS + ("count_include_pad",))}
_OP_NAMES = {"max": "max pooling", "avg": "average pooling"}


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
    if len(shape) != 4:
        raise ValueError(f"pooling expects x of shape (N, C, H, W), got {len(shape)}-D shape {shape}")
    N, C, H, W = shape
    if C <= 0 or H <= 0 or W <= 0:
        raise ValueError(f"pooling expects non-zero C, H and W, got x of shape {shape}")
    for key in ("pool_height", "pool_width"):
        if key not in pool_param:
            raise ValueError(f"pool_param needs {key!r}; got keys {sorted(pool_param)}")
    kh = _int(pool_param["pool_height"], "pool_height")
    kw = _int(pool_param["pool_width"], "pool_width")
    stride = pool_param.get("stride")
    sh, sw = (kh, kw) if stride is None else _pair(stride, "stride")
    ph, pw = _pair(pool_param.get("pad", 0), "pad")
    dh, dw = _pair(pool_param.get("dilation", 1), "dilation")
    ceil_mode = pool_param.get("ceil_mode", False)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise ValueError(f"pool_param['ceil_mode'] must be a bool, got {ceil_mode!r} "
                         f"(input of shape {shape})")
    ceil_mode = bool(ceil_mode)
    cip = pool_param.get("count_include_pad", True)  # only avg gets here with the key
    if not isinstance(cip, (bool, np.bool_)):
        raise ValueError(f"pool_param['count_include_pad'] must be a bool, got {cip!r} "
                         f"(input of shape {shape})")

    params = (f"kernel = ({kh}, {kw}), stride = ({sh}, {sw}), pad = ({ph}, {pw}), "
              f"dilation = ({dh}, {dw}), ceil_mode = {ceil_mode}")
    where = f"input (N, C, H, W) = {shape}, {params}"
    if kh <= 0 or kw <= 0:
        raise ValueError(f"kernel size must be > 0: {where}")
    if sh <= 0 or sw <= 0:
        raise ValueError(f"stride must be > 0: {where}")
    if dh <= 0 or dw <= 0:
        raise ValueError(f"dilation must be > 0: {where}")
    if ph < 0 or pw < 0:
        raise ValueError(f"pad must be >= 0: {where}")
    if op == "avg" and (dh != 1 or dw != 1):
        raise ValueError(f"avg pooling takes no dilation (it must be 1): {where}")
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if ph > eh // 2 or pw > ew // 2:
        raise ValueError(
            f"pad should be at most half of the effective kernel size "
            f"({eh // 2}, {ew // 2}) = ((k-1)*dilation+1)//2: {where}")
    Ho = pool_output_size(H, kh, sh, ph, dh, ceil_mode)
    Wo = pool_output_size(W, kw, sw, pw, dw, ceil_mode)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"output size is too small: {where}, output (Ho, Wo) = ({Ho}, {Wo})")
    geom = PoolGeometry(N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode, Ho, Wo)
    i0 = _first_valid(Ho, sh, ph, dh, kh, H)
    j0 = _first_valid(Wo, sw, pw, dw, kw, W)
    if (i0 == kh).any() or (j0 == kw).any():
        rows = np.flatnonzero(i0 == kh).tolist()
        cols = np.flatnonzero(j0 == kw).tolist()
        raise ValueError(
            f"a pooling window covers only padding (output rows {rows}, output cols {cols}): "
            f"{geom.describe()}")
    return geom
