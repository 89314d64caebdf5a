"""Launchers for the pooling kernels over 1, 2 or 3 spatial axes in ``pool_nd.cu``.

Importable without CuPy or a GPU: CuPy is imported by the launchers.
The kernels are written for 3 axes (D, H, W); a 1-D or 2-D geometry runs as D = H = 1 or
D = 1 (kernel 1, stride 1, pad 0, dilation 1 on the added axes: :func:`axes3`), so compact
offsets and flat indices are those of the lower rank.

Kernels are templates ``<T, Off, Idx>`` (max and adaptive max pooling), ``<T, Idx>`` (average
pooling, adaptive average pooling, unpooling's scatter), ``<Ind, Idx>`` (unpooling's winners)
and ``<T, Ind, Idx>`` (unpooling's backward): value type (``__half``, ``float``, ``double``),
offset type (the geometry's ``offset_dtype``: uint8, uint16 or uint32), index type (``int``, or
``long long`` when a tensor has 2**31 elements or more, see :func:`index_type`) and the unpool
indices' type (``int`` for int32 indices, ``long long`` for every other integer dtype, which the
launcher converts to int64). :data:`NAME_EXPRESSIONS` lists every instantiation; they compile
in groups of one value and index type (:func:`compile_group`), so a program that pools one
dtype compiles only its kernels.

Semantics (what the xp paths must match bit for bit):

- max pooling: the first maximum in row-major tap order, ``v > best or isnan(v)`` (the last
  NaN wins), an all -inf window keeps its first in-range tap; offsets row-major over the
  kernel; backward adds dout, in float32 for float16, over the covering windows in ascending
  tap order;
- average pooling: the in-range taps summed in row-major order from +0 (float32 for float16)
  and divided once by PyTorch's divisor (divisor_override; else with count_include_pad the
  window clipped to the right padding, never the ceil_mode overhang; else the in-range
  count); backward adds dout / divisor over the covering windows in ascending tap order;
  sum pooling is divisor_override=1;
- adaptive pooling: PyTorch's windows ``[floor(i*L/out), ceil((i+1)*L/out))`` per axis; max as
  above with offsets row-major over ``AdaptiveGeometry.window``; average divides the sum once
  by the window's element count; backward adds over the covering windows in ascending window
  order (row-major over the output);
- max unpooling: the last input in row-major order (over its plane) that targets a position
  wins it; every other output element is 0; backward gives each input dout at its target if
  it won, else 0.

Every launcher takes CuPy arrays of any strides (copied to C order when needed; inputs are
never written), allocates its outputs with CuPy on the arrays' device
(``compile.device_of``; arrays on two devices are a ValueError naming them) and compiles and
launches for that device, whichever device is current. Nothing synchronises with the host.
Launch plans (kernel, grid, scalar arguments) are cached per (geometry, dtype, device).
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

from ..shapes import AdaptiveGeometry, PoolGeometry, check_floating
from . import compile as cuda_compile
from .pool_kernels import launch_config

__all__ = ["max_pool_forward_gpu", "max_pool_backward_gpu", "avg_pool_forward_gpu",
           "avg_pool_backward_gpu", "adaptive_avg_pool_forward_gpu",
           "adaptive_avg_pool_backward_gpu", "adaptive_max_pool_forward_gpu",
           "adaptive_max_pool_backward_gpu", "max_unpool_forward_gpu", "max_unpool_backward_gpu",
           "SOURCE", "NAME_EXPRESSIONS", "compile_group", "index_type", "kernel_expression",
           "axes3", "pool_scalars", "adaptive_scalars"]

SOURCE = "pool_nd.cu"

VALUE_TYPES = {np.dtype(np.float16): "__half", np.dtype(np.float32): "float",
               np.dtype(np.float64): "double"}
OFFSET_TYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
                np.dtype(np.uint32): "unsigned int"}
INDEX_TYPES = {"int": np.int32, "long long": np.int64}
# Unpool index arrays the kernels read as they are; other integer dtypes go through int64.
UNPOOL_INDEX_TYPES = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long"}

OFFSET_KERNELS = ("max_pool3d_forward", "max_pool3d_backward", "adaptive_max_pool3d_forward",
                  "adaptive_max_pool3d_backward")          # <T, Off, Idx>
VALUE_KERNELS = ("avg_pool3d_forward", "avg_pool3d_backward", "adaptive_avg_pool3d_forward",
                 "adaptive_avg_pool3d_backward", "max_unpool_forward")   # <T, Idx>
WINNERS_KERNEL = "max_unpool_winners"                      # <Ind, Idx>
UNPOOL_BACKWARD_KERNEL = "max_unpool_backward"             # <T, Ind, Idx>

NAME_EXPRESSIONS = (
    tuple(f"{k}<{v}, {o}, {i}>" for k in OFFSET_KERNELS for v in VALUE_TYPES.values()
          for o in OFFSET_TYPES.values() for i in INDEX_TYPES)
    + tuple(f"{k}<{v}, {i}>" for k in VALUE_KERNELS for v in VALUE_TYPES.values()
            for i in INDEX_TYPES)
    + tuple(f"{WINNERS_KERNEL}<{n}, {i}>" for n in UNPOOL_INDEX_TYPES.values()
            for i in INDEX_TYPES)
    + tuple(f"{UNPOOL_BACKWARD_KERNEL}<{v}, {n}, {i}>" for v in VALUE_TYPES.values()
            for n in UNPOOL_INDEX_TYPES.values() for i in INDEX_TYPES))

_BLOCK = 256
_BLOCKS_PER_SM = 32
_LIMIT = 2**31


def _template_args(expression):
    return [a.strip() for a in expression[expression.index("<") + 1:-1].split(",")]


@functools.lru_cache(maxsize=None)
def compile_group(expression, dtype=None):
    """The name expressions compiled in one module with ``expression``: every one in
    NAME_EXPRESSIONS with the same value type and index type, plus the unpool winners kernels
    of that index type. A winners expression has no value type: ``dtype`` (the values'
    dtype) picks the group; for the others it defaults to the expression's own."""
    if expression not in NAME_EXPRESSIONS:
        raise ValueError(f"{expression!r} is not in NAME_EXPRESSIONS")
    args = _template_args(expression)
    value = VALUE_TYPES[np.dtype(dtype)] if dtype is not None else args[0]
    if value not in VALUE_TYPES.values():
        raise ValueError(f"{expression!r} has no value type: pass the values' dtype")
    index = args[-1]

    def member(e):
        a = _template_args(e)
        return a[-1] == index and (a[0] == value or e.startswith(WINNERS_KERNEL + "<"))
    return tuple(e for e in NAME_EXPRESSIONS if member(e))


def index_type(*shapes):
    """C index type for tensors of ``shapes``: ``'long long'`` when one of them has 2**31
    elements or more, else ``'int'``."""
    return "long long" if max(int(np.prod(s, dtype=object)) for s in shapes) >= _LIMIT \
        else "int"


def kernel_expression(kernel, dtype=None, index="int", offset=None, indices=None):
    """Name expression of ``kernel`` for values of ``dtype``, C index type ``index``, offsets
    of dtype ``offset`` (max kernels) and unpool indices of dtype ``indices`` (int32 or int64;
    unpool kernels), e.g. ``'max_pool3d_forward<float, unsigned char, int>'``."""
    parts = []
    if kernel != WINNERS_KERNEL:
        dtype = np.dtype(dtype)
        if dtype not in VALUE_TYPES:
            raise TypeError(f"pooling kernels take float16, float32 or float64, got {dtype}")
        parts.append(VALUE_TYPES[dtype])
    if kernel in OFFSET_KERNELS:
        parts.append(OFFSET_TYPES[np.dtype(offset)])
    if kernel in (WINNERS_KERNEL, UNPOOL_BACKWARD_KERNEL):
        parts.append(UNPOOL_INDEX_TYPES[np.dtype(indices)])
    parts.append(index)
    expression = f"{kernel}<{', '.join(parts)}>"
    if expression not in NAME_EXPRESSIONS:
        raise ValueError(f"{expression!r} is not in NAME_EXPRESSIONS")
    return expression


def axes3(geom):
    """(size, out, kernel, stride, pad, dilation) of geom as 3-tuples over (D, H, W): a 1-D
    or 2-D geometry gets leading axes of size 1, kernel 1, stride 1, pad 0, dilation 1."""
    lead = 3 - geom.d
    if lead < 0:
        raise ValueError(f"pooling kernels take 1 to 3 spatial axes: {geom.describe()}")
    return ((1,) * lead + tuple(geom.size), (1,) * lead + tuple(geom.out),
            (1,) * lead + tuple(geom.kernel), (1,) * lead + tuple(geom.stride),
            (0,) * lead + tuple(geom.pad), (1,) * lead + tuple(geom.dilation))


def pool_scalars(geom):
    """The pooling kernels' geometry arguments with their exact C types (int): D, H, W, Do,
    Ho, Wo, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw.

    Raises ValueError when a size, padded size plus a stride and a window extent (the kernels
    form window bounds in int) is 2**31 or more, when the window has 2**32 taps or more, or
    when a window lies wholly in the padding (what pool_geometry rejects)."""
    size, out, kernel, stride, pad, dilation = axes3(geom)
    for n, o, k, s, p, d in zip(size, out, kernel, stride, pad, dilation):
        if n + 2 * p + s + (k - 1) * d + 1 >= _LIMIT or o >= _LIMIT:
            raise ValueError(f"pooling kernels take sizes and padded sizes below 2**31: "
                             f"{geom.describe()}")
        # Windows that start left of the input (at most pad // stride + 1 of them): their
        # first tap at or right of position 0 must exist and lie inside; later ones start
        # inside if the last one does.
        start = np.arange(min(o, p // s + 1), dtype=np.int64) * s - p
        first = np.where(start < 0, -(start // d), 0)
        if ((first >= k) | (start + first * d >= n)).any() or (o - 1) * s - p >= n:
            raise ValueError(f"a pooling window covers only padding: {geom.describe()}")
    if geom.window_size >= 2**32:
        raise ValueError(f"pooling kernels take windows of fewer than 2**32 taps: "
                         f"{geom.describe()}")
    return tuple(np.int32(v) for v in size + out + kernel + stride + pad + dilation)


def adaptive_scalars(ageom, offsets=False):
    """The adaptive kernels' arguments (int): D, H, W, Do, Ho, Wo and, for the max kernels
    (``offsets``), the largest window's lengths wh, ww along H and W."""
    lead = 3 - ageom.d
    if lead < 0:
        raise ValueError(f"pooling kernels take 1 to 3 spatial axes: {ageom.describe()}")
    size = (1,) * lead + tuple(ageom.size)
    out = (1,) * lead + tuple(ageom.out)
    window = (1,) * lead + tuple(ageom.window)
    if max(size + out) >= _LIMIT:
        raise ValueError(f"adaptive pooling kernels take sizes below 2**31: {ageom.describe()}")
    if ageom.window_size >= 2**32:
        raise ValueError(f"adaptive pooling kernels take windows of fewer than 2**32 "
                         f"elements: {ageom.describe()}")
    extra = window[1:] if offsets else ()
    return tuple(np.int32(v) for v in size + out + extra)


# ------------------------------------------------------------------ plans and launches

@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    import cupy
    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


@functools.lru_cache(maxsize=512)
def _prepared(expression, dtype, plane, planes, device_id):
    """(function, grid, block) of ``expression`` (compiled in dtype's group) for ``planes``
    planes of ``plane`` positions on device ``device_id``."""
    function = cuda_compile.get_kernel(SOURCE, expression, compile_group(expression, dtype),
                                       device_id=device_id)
    grid, block = launch_config(plane, planes, _sm_count(device_id), _BLOCK, _BLOCKS_PER_SM)
    return function, grid, block


def _launch(expression, dtype, plane, planes, arrays, scalars, device_id):
    if planes == 0 or plane == 0:
        return
    function, grid, block = _prepared(expression, np.dtype(dtype), plane, planes, device_id)
    cuda_compile.launch(function, expression, grid, block, tuple(arrays) + scalars,
                        device_id=device_id)


@functools.lru_cache(maxsize=512)
def _pool_plan(kernel, geom, dtype, extra=()):
    """(expression, positions per plane, scalar arguments) of a pooling kernel for geom and
    dtype; ``extra`` are trailing int arguments (avg pooling's options)."""
    index = index_type(geom.input_shape, geom.output_shape)
    offset = geom.offset_dtype if kernel in OFFSET_KERNELS else None
    expression = kernel_expression(kernel, dtype, index, offset=offset)
    positions = geom.out if kernel.endswith("forward") else geom.size
    scalars = ((INDEX_TYPES[index](geom.N * geom.C),) + pool_scalars(geom)
               + tuple(np.int32(v) for v in extra))
    return expression, int(np.prod(positions, dtype=object)), scalars


@functools.lru_cache(maxsize=512)
def _adaptive_plan(kernel, ageom, dtype):
    index = index_type(ageom.input_shape, ageom.output_shape)
    offsets = kernel in OFFSET_KERNELS
    expression = kernel_expression(kernel, dtype, index,
                                   offset=ageom.offset_dtype if offsets else None)
    positions = ageom.out if kernel.endswith("forward") else ageom.size
    scalars = ((INDEX_TYPES[index](ageom.N * ageom.C),)
               + adaptive_scalars(ageom, offsets=offsets))
    return expression, int(np.prod(positions, dtype=object)), scalars


def _device(**arrays):
    """The device of the named CuPy arrays (see compile.device_of); ValueError naming them and
    their devices when they differ."""
    try:
        return cuda_compile.device_of(*arrays.values())
    except ValueError as exc:
        where = ", ".join(f"{name} {tuple(a.shape)} on device {a.device.id}"
                          for name, a in arrays.items())
        raise ValueError(f"arrays on different CUDA devices: {where}; "
                         "move them to one device first") from exc


def _on_device(device_id):
    """Context that makes device_id current; nothing to do when it already is."""
    import cupy
    if device_id == cupy.cuda.runtime.getDevice():
        return contextlib.nullcontext()
    return cupy.cuda.Device(device_id)


def _check(a, name, shape, what):
    import cupy
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}: {what}")


def _check_geometry(geom, cls):
    if not isinstance(geom, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(geom).__name__}")


def _check_offsets(offsets, geom):
    if np.dtype(offsets.dtype) != geom.offset_dtype:
        raise TypeError(f"offsets must have dtype {geom.offset_dtype} for a window of "
                        f"{geom.window_size} elements, got {offsets.dtype}")


def _avg_options(geom, count_include_pad, divisor_override):
    if not isinstance(count_include_pad, (bool, np.bool_)):
        raise TypeError(f"count_include_pad must be a bool, got {count_include_pad!r}")
    if divisor_override is not None and (
            isinstance(divisor_override, (bool, np.bool_))
            or not isinstance(divisor_override, (int, np.integer))
            or not 0 < divisor_override < _LIMIT):
        raise ValueError(f"divisor_override must be a positive int below 2**31 or None, got "
                         f"{divisor_override!r}")
    if any(d != 1 for d in geom.dilation):
        raise ValueError(f"average pooling takes no dilation: {geom.describe()}")
    return (int(bool(count_include_pad)), int(divisor_override or 0))


# --------------------------------------------------------------------------- pooling

def max_pool_forward_gpu(x, geom):
    """Max pooling over 1, 2 or 3 spatial axes with the CUDA kernel.

    Inputs:
    - x: cupy array (N, C, *size), float16/32/64, any strides (not modified)
    - geom: PoolGeometry of x (any d)

    Returns a tuple of:
    - out: cupy array (N, C, *out), dtype of x, on x's device
    - offsets: cupy array (N, C, *out) of geom.offset_dtype: each window's argmax as its
      compact offset (row-major over geom.kernel), on x's device
    """
    import cupy
    _check_geometry(geom, PoolGeometry)
    _check(x, "x", geom.input_shape, geom.describe())
    check_floating(x, "x")
    expression, plane, scalars = _pool_plan("max_pool3d_forward", geom, np.dtype(x.dtype))
    device_id = _device(x=x)
    with _on_device(device_id):
        x = cupy.ascontiguousarray(x)
        out = cupy.empty(geom.output_shape, dtype=x.dtype)
        offsets = cupy.empty(geom.output_shape, dtype=geom.offset_dtype)
        _launch(expression, x.dtype, plane, geom.N * geom.C, (x, out, offsets), scalars,
                device_id)
    return out, offsets


def max_pool_backward_gpu(dout, offsets, geom):
    """Backward pass of max pooling: a gather per dx element over the windows that cover it
    (ascending tap order, float32 sums for float16, no atomics); every element of dx is
    written by the kernel.

    Inputs:
    - dout: cupy array (N, C, *out), float16/32/64, any strides (not modified)
    - offsets: cupy array (N, C, *out) of geom.offset_dtype from the forward pass, on dout's
      device
    - geom: PoolGeometry

    Returns:
    - dx: cupy array (N, C, *size), dtype of dout, on dout's device
    """
    import cupy
    _check_geometry(geom, PoolGeometry)
    _check(dout, "dout", geom.output_shape, geom.describe())
    _check(offsets, "offsets", geom.output_shape, geom.describe())
    check_floating(dout, "dout")
    _check_offsets(offsets, geom)
    expression, plane, scalars = _pool_plan("max_pool3d_backward", geom, np.dtype(dout.dtype))
    device_id = _device(dout=dout, offsets=offsets)
    with _on_device(device_id):
        dout = cupy.ascontiguousarray(dout)
        offsets = cupy.ascontiguousarray(offsets)
        dx = cupy.empty(geom.input_shape, dtype=dout.dtype)
        _launch(expression, dout.dtype, plane, geom.N * geom.C, (dout, offsets, dx), scalars,
                device_id)
    return dx


def avg_pool_forward_gpu(x, geom, count_include_pad, divisor_override):
    """Average pooling over 1, 2 or 3 spatial axes (PyTorch's avg_pool semantics; sum
    pooling is divisor_override=1).

    Inputs:
    - x: cupy array (N, C, *size), float16/32/64, any strides (not modified)
    - geom: PoolGeometry of x, without dilation
    - count_include_pad: bool: the divisor counts the padding (never the ceil_mode overhang)
    - divisor_override: positive int that replaces the divisor, or None

    Returns:
    - out: cupy array (N, C, *out), dtype of x, on x's device
    """
    import cupy
    _check_geometry(geom, PoolGeometry)
    _check(x, "x", geom.input_shape, geom.describe())
    check_floating(x, "x")
    options = _avg_options(geom, count_include_pad, divisor_override)
    expression, plane, scalars = _pool_plan("avg_pool3d_forward", geom, np.dtype(x.dtype),
                                            options)
    device_id = _device(x=x)
    with _on_device(device_id):
        x = cupy.ascontiguousarray(x)
        out = cupy.empty(geom.output_shape, dtype=x.dtype)
        _launch(expression, x.dtype, plane, geom.N * geom.C, (x, out), scalars, device_id)
    return out


def avg_pool_backward_gpu(dout, geom, count_include_pad, divisor_override):
    """Backward pass of average pooling: a gather per dx element of dout / divisor over the
    windows that cover it (ascending tap order, float32 sums for float16, no atomics).

    Inputs:
    - dout: cupy array (N, C, *out), float16/32/64, any strides (not modified)
    - geom, count_include_pad, divisor_override: as for the forward pass

    Returns:
    - dx: cupy array (N, C, *size), dtype of dout, on dout's device
    """
    import cupy
    _check_geometry(geom, PoolGeometry)
    _check(dout, "dout", geom.output_shape, geom.describe())
    check_floating(dout, "dout")
    options = _avg_options(geom, count_include_pad, divisor_override)
    expression, plane, scalars = _pool_plan("avg_pool3d_backward", geom, np.dtype(dout.dtype),
                                            options)
    device_id = _device(dout=dout)
    with _on_device(device_id):
        dout = cupy.ascontiguousarray(dout)
        dx = cupy.empty(geom.input_shape, dtype=dout.dtype)
        _launch(expression, dout.dtype, plane, geom.N * geom.C, (dout, dx), scalars,
                device_id)
    return dx


# ------------------------------------------------------------------ adaptive pooling

def adaptive_avg_pool_forward_gpu(x, ageom):
    """Adaptive average pooling over 1, 2 or 3 spatial axes (PyTorch's windows).

    Inputs:
    - x: cupy array (N, C, *size), float16/32/64, any strides (not modified)
    - ageom: AdaptiveGeometry of x

    Returns:
    - out: cupy array (N, C, *out): each window's sum (row-major, float32 for float16)
      divided by its element count, dtype of x, on x's device
    """
    import cupy
    _check_geometry(ageom, AdaptiveGeometry)
    _check(x, "x", ageom.input_shape, ageom.describe())
    check_floating(x, "x")
    expression, plane, scalars = _adaptive_plan("adaptive_avg_pool3d_forward", ageom,
                                                np.dtype(x.dtype))
    device_id = _device(x=x)
    with _on_device(device_id):
        x = cupy.ascontiguousarray(x)
        out = cupy.empty(ageom.output_shape, dtype=x.dtype)
        _launch(expression, x.dtype, plane, ageom.N * ageom.C, (x, out), scalars, device_id)
    return out


def adaptive_avg_pool_backward_gpu(dout, ageom):
    """Backward pass of adaptive average pooling: a gather per dx element of dout / count
    over the windows that cover it (ascending window order, no atomics).

    Inputs:
    - dout: cupy array (N, C, *out), float16/32/64, any strides (not modified)
    - ageom: AdaptiveGeometry

    Returns:
    - dx: cupy array (N, C, *size), dtype of dout, on dout's device
    """
    import cupy
    _check_geometry(ageom, AdaptiveGeometry)
    _check(dout, "dout", ageom.output_shape, ageom.describe())
    check_floating(dout, "dout")
    expression, plane, scalars = _adaptive_plan("adaptive_avg_pool3d_backward", ageom,
                                                np.dtype(dout.dtype))
    device_id = _device(dout=dout)
    with _on_device(device_id):
        dout = cupy.ascontiguousarray(dout)
        dx = cupy.empty(ageom.input_shape, dtype=dout.dtype)
        _launch(expression, dout.dtype, plane, ageom.N * ageom.C, (dout, dx), scalars,
                device_id)
    return dx


def adaptive_max_pool_forward_gpu(x, ageom):
    """Adaptive max pooling over 1, 2 or 3 spatial axes (PyTorch's windows and max rule).

    Inputs:
    - x: cupy array (N, C, *size), float16/32/64, any strides (not modified)
    - ageom: AdaptiveGeometry of x

    Returns a tuple of:
    - out: cupy array (N, C, *out), dtype of x, on x's device
    - offsets: cupy array (N, C, *out) of ageom.offset_dtype: the argmax's offset inside its
      window, row-major over ageom.window, on x's device
    """
    import cupy
    _check_geometry(ageom, AdaptiveGeometry)
    _check(x, "x", ageom.input_shape, ageom.describe())
    check_floating(x, "x")
    expression, plane, scalars = _adaptive_plan("adaptive_max_pool3d_forward", ageom,
                                                np.dtype(x.dtype))
    device_id = _device(x=x)
    with _on_device(device_id):
        x = cupy.ascontiguousarray(x)
        out = cupy.empty(ageom.output_shape, dtype=x.dtype)
        offsets = cupy.empty(ageom.output_shape, dtype=ageom.offset_dtype)
        _launch(expression, x.dtype, plane, ageom.N * ageom.C, (x, out, offsets), scalars,
                device_id)
    return out, offsets


def adaptive_max_pool_backward_gpu(dout, offsets, ageom):
    """Backward pass of adaptive max pooling: a gather per dx element over the windows that
    cover it (ascending window order, float32 sums for float16, no atomics).

    Inputs:
    - dout: cupy array (N, C, *out), float16/32/64, any strides (not modified)
    - offsets: cupy array (N, C, *out) of ageom.offset_dtype from the forward pass, on dout's
      device
    - ageom: AdaptiveGeometry

    Returns:
    - dx: cupy array (N, C, *size), dtype of dout, on dout's device
    """
    import cupy
    _check_geometry(ageom, AdaptiveGeometry)
    _check(dout, "dout", ageom.output_shape, ageom.describe())
    _check(offsets, "offsets", ageom.output_shape, ageom.describe())
    check_floating(dout, "dout")
    _check_offsets(offsets, ageom)
    expression, plane, scalars = _adaptive_plan("adaptive_max_pool3d_backward", ageom,
                                                np.dtype(dout.dtype))
    device_id = _device(dout=dout, offsets=offsets)
    with _on_device(device_id):
        dout = cupy.ascontiguousarray(dout)
        offsets = cupy.ascontiguousarray(offsets)
        dx = cupy.empty(ageom.input_shape, dtype=dout.dtype)
        _launch(expression, dout.dtype, plane, ageom.N * ageom.C, (dout, offsets, dx),
                scalars, device_id)
    return dx


# ---------------------------------------------------------------------- max unpooling

def _unpool_shapes(in_shape, out_shape, what):
    in_shape, out_shape = tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape)
    if (len(in_shape) != len(out_shape) or len(in_shape) not in (3, 4, 5)
            or in_shape[:2] != out_shape[:2] or min(out_shape[2:]) <= 0):
        raise ValueError(f"max unpooling needs input and output shapes (N, C, *spatial) of one "
                         f"rank (1 to 3 spatial axes) with the same N, C and non-empty output "
                         f"planes, got {what}")
    planes = in_shape[0] * in_shape[1]
    in_plane = int(np.prod(in_shape[2:], dtype=object))
    out_plane = int(np.prod(out_shape[2:], dtype=object))
    return planes, in_plane, out_plane, index_type(in_shape, out_shape)


def _unpool_indices(indices):
    import cupy
    if np.dtype(indices.dtype).kind not in "iu":
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if np.dtype(indices.dtype) not in UNPOOL_INDEX_TYPES:
        return cupy.ascontiguousarray(indices.astype(np.int64))
    return cupy.ascontiguousarray(indices)


def _winners(indices, dtype, planes, in_plane, out_plane, index, device_id):
    """int32/int64 (Idx) array of planes * out_plane: per output element the flat index of the
    last input (row-major) that targets it, or -1. Compiled in the group of the values'
    dtype."""
    import cupy
    winners = cupy.full(planes * out_plane, -1, dtype=INDEX_TYPES[index])
    expression = kernel_expression(WINNERS_KERNEL, index=index, indices=indices.dtype)
    scalars = tuple(INDEX_TYPES[index](v) for v in (planes, in_plane, out_plane))
    _launch(expression, dtype, in_plane, planes, (indices, winners), scalars, device_id)
    return winners


def max_unpool_forward_gpu(x, indices, out_shape, return_winners=False):
    """Max unpooling over 1, 2 or 3 spatial axes: each input written at its target, the
    last one in row-major order winning where several inputs of a plane share a target
    (deterministic: an integer atomicMax of the inputs' flat indices picks the winners, then
    a second kernel writes every output element: the winner's value or 0).

    Indices are assumed in range, [0, prod(out_shape[2:])): the caller checks them on the
    host (the launcher never synchronises).

    Inputs:
    - x: cupy array (N, C, *in), float16/32/64, any strides (not modified)
    - indices: integer cupy array of x's shape: flat index into each output plane (L, H*W or
      D*H*W), on x's device
    - out_shape: (N, C, *out), the full output shape
    - return_winners: also return the winners (what the backward pass needs)

    Returns:
    - out: cupy array of out_shape, dtype of x, on x's device
    - winners (with return_winners): int32/int64 cupy array of prod(out_shape): per output
      element the flat index of the input that won it, or -1
    """
    import cupy
    out_shape = tuple(int(s) for s in out_shape)
    what = f"x {tuple(x.shape)}, output {out_shape}"
    _check(x, "x", x.shape, what)
    _check(indices, "indices", x.shape, what)
    check_floating(x, "x")
    planes, in_plane, out_plane, index = _unpool_shapes(x.shape, out_shape, what)
    device_id = _device(x=x, indices=indices)
    with _on_device(device_id):
        x = cupy.ascontiguousarray(x)
        indices = _unpool_indices(indices)
        out = cupy.empty(out_shape, dtype=x.dtype)
        winners = cupy.full(0, -1, dtype=INDEX_TYPES[index])
        if planes:
            winners = _winners(indices, x.dtype, planes, in_plane, out_plane, index, device_id)
            expression = kernel_expression("max_unpool_forward", x.dtype, index)
            scalars = (INDEX_TYPES[index](planes), INDEX_TYPES[index](out_plane))
            _launch(expression, x.dtype, out_plane, planes, (x, winners, out), scalars,
                    device_id)
    return (out, winners) if return_winners else out


def max_unpool_backward_gpu(dout, indices, winners, x_shape):
    """Backward pass of max unpooling: dx[i] = dout at input i's target if i won it (the last
    input in row-major order with that target), else 0: a gather, without atomics (the
    winners come from the forward pass).

    Indices are assumed in range (see max_unpool_forward_gpu).

    Inputs:
    - dout: cupy array (N, C, *out), float16/32/64, any strides (not modified)
    - indices: integer cupy array of x_shape, as given to the forward pass, on dout's device
    - winners: what max_unpool_forward_gpu(..., return_winners=True) returned
    - x_shape: (N, C, *in), the forward input's shape

    Returns:
    - dx: cupy array of x_shape, dtype of dout, on dout's device
    """
    import cupy
    x_shape = tuple(int(s) for s in x_shape)
    what = f"x {x_shape}, dout {tuple(dout.shape)}"
    _check(dout, "dout", dout.shape, what)
    _check(indices, "indices", x_shape, what)
    check_floating(dout, "dout")
    planes, in_plane, out_plane, index = _unpool_shapes(x_shape, dout.shape, what)
    device_id = _device(dout=dout, indices=indices)
    with _on_device(device_id):
        dout = cupy.ascontiguousarray(dout)
        indices = _unpool_indices(indices)
        dx = cupy.empty(x_shape, dtype=dout.dtype)
        if planes:
            if winners.dtype != INDEX_TYPES[index] or winners.size != planes * out_plane:
                raise ValueError(f"winners must be the {np.dtype(INDEX_TYPES[index])} array of "
                                 f"{planes * out_plane} elements that max_unpool_forward_gpu "
                                 f"returned, got {winners.dtype} of {winners.size}: {what}")
            expression = kernel_expression(UNPOOL_BACKWARD_KERNEL, dout.dtype, index,
                                           indices=indices.dtype)
            scalars = tuple(INDEX_TYPES[index](v) for v in (planes, in_plane, out_plane))
            _launch(expression, dout.dtype, in_plane, planes, (dout, indices, winners, dx),
                    scalars, device_id)
    return dx
