"""Launchers for the pooling kernels over 1, 2 or 3 spatial axes in ``pool_nd.cu``.

Importable without CuPy or a GPU: CuPy is imported by the launchers.
The kernels are written for 3 axes (D, H, W); a 1-D or 2-D geometry runs as D = H = 1 or
D = 1 (kernel 1, stride 1, pad 0, dilation 1 on the added axes: :func:`axes3`), so compact
offsets and flat indices are those of the lower rank.

Kernels are templates ``<T, Off, Idx, L>`` (max and adaptive max pooling), ``<T, Idx, L>``
(average pooling, adaptive average pooling, unpooling's scatter), ``<Ind, Idx, L>``
(unpooling's winners) and ``<T, Ind, Idx, L>`` (unpooling's backward): value type (``__half``,
``__nv_bfloat16``, ``float``, ``double``), offset type (the geometry's ``offset_dtype``: uint8,
uint16 or uint32), index type (``int``, or ``long long`` when a tensor has 2**31 elements or
more, see :func:`index_type`), the unpool indices' type (``int`` for int32 indices, ``long
long`` for every other integer dtype, which the launcher converts to int64) and the layout
``L``: ``ChannelsFirst`` (the default, left out of the name expressions) or ``ChannelsLast``.
:data:`NAME_EXPRESSIONS` lists every instantiation; they compile in groups of one value type,
index type and layout (:func:`compile_group`), so a program that pools one dtype in one layout
compiles only its kernels.

Layouts: every launcher takes ``channels_last=False``. With ``channels_last=True`` every array
argument and result is laid out (N, *spatial, C) -- x, out, offsets, dout, dx and unpool
indices (laid out like x) -- while geometries and the shapes passed (unpool's ``out_shape``
and ``x_shape``) stay (N, C, *spatial). The kernels then map consecutive threads to
consecutive channels (coalesced) and give, bit for bit, the channels-first results of the
transposed tensors: offsets and unpool indices count within each (n, c) plane as for
channels-first. Channels-last max and average pooling, forward and backward, run a
vectorised variant (``max_pool3d_forward_vec``, ``avg_pool3d_forward_vec``,
``max_pool3d_backward_vec``, ``avg_pool3d_backward_vec``: loads and stores of V = 16 bytes /
itemsize consecutive channels, :data:`VECTOR_KERNELS`) when C is a multiple of V and every
array the variant accesses by vectors (:data:`VECTOR_ARRAYS`: x and out forward; dout, dx
and max's offsets backward) is aligned to V of its elements (16 bytes of values, V bytes of
uint8 offsets), else the scalar kernels; the results are the same bit for bit. Any
element-aligned pointer will do.

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
Launch plans (kernel, grid, scalar arguments) are cached per (geometry, dtype, layout, device).
"""
from __future__ import annotations

import functools

import numpy as np

from ..shapes import (AdaptiveGeometry, PoolGeometry, check_floating, from_channels_first_shape,
                      to_channels_first_shape)
from . import compile as cuda_compile
from .pool_kernels import launch_config

__all__ = ["max_pool_forward_gpu", "max_pool_backward_gpu", "avg_pool_forward_gpu",
           "avg_pool_backward_gpu", "adaptive_avg_pool_forward_gpu",
           "adaptive_avg_pool_backward_gpu", "adaptive_max_pool_forward_gpu",
           "adaptive_max_pool_backward_gpu", "max_unpool_forward_gpu", "max_unpool_backward_gpu",
           "SOURCE", "NAME_EXPRESSIONS", "compile_group", "index_type", "kernel_expression",
           "axes3", "pool_scalars", "adaptive_scalars", "array_shape"]

SOURCE = "pool_nd.cu"

VALUE_TYPES = cuda_compile.CTypes(float16="__half", bfloat16="__nv_bfloat16", float32="float",
                                  float64="double")
OFFSET_TYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
                np.dtype(np.uint32): "unsigned int"}
INDEX_TYPES = {"int": np.int32, "long long": np.int64}
# Unpool index arrays the kernels read as they are; other integer dtypes go through int64.
UNPOOL_INDEX_TYPES = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long"}
# Layout template argument per channels_last; channels-first is the default, left out.
LAYOUTS = {False: (), True: ("ChannelsLast",)}

OFFSET_KERNELS = ("max_pool3d_forward", "max_pool3d_backward", "adaptive_max_pool3d_forward",
                  "adaptive_max_pool3d_backward")          # <T, Off, Idx, L>
VALUE_KERNELS = ("avg_pool3d_forward", "avg_pool3d_backward", "adaptive_avg_pool3d_forward",
                 "adaptive_avg_pool3d_backward", "max_unpool_forward")   # <T, Idx, L>
WINNERS_KERNEL = "max_unpool_winners"                      # <Ind, Idx, L>
UNPOOL_BACKWARD_KERNEL = "max_unpool_backward"             # <T, Ind, Idx, L>
# Vectorised channels-last variants (ChannelsLast only): {kernel: its variant}; the arrays
# each reads or writes with vector accesses of V elements, which must be aligned to V of their
# elements (V = VECTOR_BYTES / the values' itemsize: 16 bytes of values, V offsets).
VECTOR_KERNELS = {"max_pool3d_forward": "max_pool3d_forward_vec",
                  "avg_pool3d_forward": "avg_pool3d_forward_vec",
                  "max_pool3d_backward": "max_pool3d_backward_vec",
                  "avg_pool3d_backward": "avg_pool3d_backward_vec"}
VECTOR_ARRAYS = {"max_pool3d_forward": ("x", "out"), "avg_pool3d_forward": ("x", "out"),
                 "max_pool3d_backward": ("dout", "offsets", "dx"),
                 "avg_pool3d_backward": ("dout", "dx")}
VECTOR_BYTES = 16
# The vector variants with an offset type (<T, Off, Idx, ChannelsLast>).
_VECTOR_OFFSET_KERNELS = tuple(VECTOR_KERNELS[k] for k in OFFSET_KERNELS if k in VECTOR_KERNELS)


def _expressions():
    out = []
    for layout in LAYOUTS.values():
        def name(kernel, *args):
            return f"{kernel}<{', '.join(args + layout)}>"
        out += [name(k, v, o, i) for k in OFFSET_KERNELS for v in VALUE_TYPES.values()
                for o in OFFSET_TYPES.values() for i in INDEX_TYPES]
        out += [name(k, v, i) for k in VALUE_KERNELS for v in VALUE_TYPES.values()
                for i in INDEX_TYPES]
        out += [name(WINNERS_KERNEL, n, i) for n in UNPOOL_INDEX_TYPES.values()
                for i in INDEX_TYPES]
        out += [name(UNPOOL_BACKWARD_KERNEL, v, n, i) for v in VALUE_TYPES.values()
                for n in UNPOOL_INDEX_TYPES.values() for i in INDEX_TYPES]
    # The vector variants exist only channels-last.
    last = LAYOUTS[True]
    for vec in VECTOR_KERNELS.values():
        offsets = OFFSET_TYPES.values() if vec in _VECTOR_OFFSET_KERNELS else (None,)
        out += [f"{vec}<{', '.join(tuple(a for a in (v, o, i) if a) + last)}>"
                for v in VALUE_TYPES.values() for o in offsets for i in INDEX_TYPES]
    return tuple(out)


NAME_EXPRESSIONS = _expressions()

_BLOCK = 256
_BLOCKS_PER_SM = 32
_LIMIT = 2**31


def _template_args(expression):
    return [a.strip() for a in expression[expression.index("<") + 1:-1].split(",")]


def _split_args(expression):
    """(template arguments but the layout, channels_last) of a name expression."""
    args = _template_args(expression)
    last = args[-1] == LAYOUTS[True][0]
    return (args[:-1] if last else args), last


@functools.lru_cache(maxsize=None)
def compile_group(expression, dtype=None):
    """The name expressions compiled in one module with ``expression``: every one in
    NAME_EXPRESSIONS with the same value type, index type and layout, plus the unpool winners
    kernels of that index type and layout. A winners expression has no value type: ``dtype``
    (the values' dtype) picks the group; for the others it defaults to the expression's
    own."""
    if expression not in NAME_EXPRESSIONS:
        raise ValueError(f"{expression!r} is not in NAME_EXPRESSIONS")
    args, last = _split_args(expression)
    value = VALUE_TYPES[dtype] if dtype is not None else args[0]
    if value not in VALUE_TYPES.values():
        raise ValueError(f"{expression!r} has no value type: pass the values' dtype")
    index = args[-1]

    def member(e):
        a, l = _split_args(e)
        return (a[-1] == index and l == last
                and (a[0] == value or e.startswith(WINNERS_KERNEL + "<")))
    return tuple(e for e in NAME_EXPRESSIONS if member(e))


def index_type(*shapes):
    """C index type for tensors of ``shapes``: ``'long long'`` when one of them has 2**31
    elements or more, else ``'int'``."""
    return "long long" if max(int(np.prod(s, dtype=object)) for s in shapes) >= _LIMIT \
        else "int"


def kernel_expression(kernel, dtype=None, index="int", offset=None, indices=None,
                      channels_last=False):
    """Name expression of ``kernel`` for values of ``dtype``, C index type ``index``, offsets
    of dtype ``offset`` (max kernels), unpool indices of dtype ``indices`` (int32 or int64;
    unpool kernels) and the layout, e.g. ``'max_pool3d_forward<float, unsigned char, int>'``,
    ``'avg_pool3d_forward<__nv_bfloat16, int, ChannelsLast>'``."""
    parts = []
    if kernel != WINNERS_KERNEL:
        if dtype not in VALUE_TYPES:
            raise TypeError(f"pooling kernels take float16, bfloat16, float32 or float64, "
                            f"got {cuda_compile.dtype_name(dtype)}")
        parts.append(VALUE_TYPES[dtype])
    if kernel in OFFSET_KERNELS or kernel in _VECTOR_OFFSET_KERNELS:
        parts.append(OFFSET_TYPES[np.dtype(offset)])
    if kernel in (WINNERS_KERNEL, UNPOOL_BACKWARD_KERNEL):
        parts.append(UNPOOL_INDEX_TYPES[np.dtype(indices)])
    parts.append(index)
    parts += LAYOUTS[bool(channels_last)]
    expression = f"{kernel}<{', '.join(parts)}>"
    if expression not in NAME_EXPRESSIONS:
        raise ValueError(f"{expression!r} is not in NAME_EXPRESSIONS")
    return expression


def array_shape(shape, channels_last=False):
    """The arrays' shape for an (N, C, *spatial) ``shape``: itself, or (N, *spatial, C) with
    ``channels_last``."""
    return from_channels_first_shape(shape, "channels_last" if channels_last else
                                     "channels_first")


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
def _prepared(expression, dtype, items, outer, device_id):
    """(function, grid, block) of ``expression`` (compiled in dtype's group) for ``outer``
    y-items of ``items`` x-items each on device ``device_id``."""
    function = cuda_compile.get_kernel(SOURCE, expression, compile_group(expression, dtype),
                                       device_id=device_id)
    grid, block = launch_config(items, outer, _sm_count(device_id), _BLOCK, _BLOCKS_PER_SM)
    return function, grid, block


def _launch(expression, dtype, items, outer, arrays, scalars, device_id):
    if outer == 0 or items == 0:
        return
    function, grid, block = _prepared(expression, np.dtype(dtype), items, outer, device_id)
    cuda_compile.launch(function, expression, grid, block, tuple(arrays) + scalars,
                        device_id=device_id)


def _layout_work(N, C, positions, index, channels_last):
    """(x-items, y-items, (outer, C) scalar arguments) of a layout: positions of the N*C
    planes, or (position, channel) pairs of the N samples."""
    if C >= _LIMIT:
        raise ValueError(f"pooling kernels take fewer than 2**31 channels, got C = {C}")
    if channels_last:
        items, outer = positions * C, N
    else:
        items, outer = positions, N * C
    return items, outer, (INDEX_TYPES[index](outer), np.int32(C))


def vector_width(dtype):
    """Channels per vector access of the *_vec kernels for values of dtype."""
    return VECTOR_BYTES // np.dtype(dtype).itemsize


def _vectorised(kernel, C, dtype, arrays, channels_last):
    """Whether ``kernel`` runs as its vector variant: channels-last, C a multiple of the
    width V and every array of ``arrays`` ({name: array}) that VECTOR_ARRAYS[kernel] names
    aligned to V of its elements."""
    if not channels_last or kernel not in VECTOR_KERNELS:
        return False
    V = vector_width(dtype)
    return C % V == 0 and all(arrays[n].data.ptr % (arrays[n].itemsize * V) == 0
                              for n in VECTOR_ARRAYS[kernel])


@functools.lru_cache(maxsize=512)
def _pool_plan(kernel, geom, dtype, extra=(), channels_last=False, vector=False):
    """(expression, x-items, y-items, scalar arguments) of a pooling kernel for geom, dtype
    and layout; ``extra`` are trailing int arguments (avg pooling's options); ``vector``: its
    vector variant (x-items of V channels)."""
    index = index_type(geom.input_shape, geom.output_shape)
    offset = geom.offset_dtype if kernel in OFFSET_KERNELS else None
    expression = kernel_expression(VECTOR_KERNELS[kernel] if vector else kernel, dtype, index,
                                   offset=offset, channels_last=channels_last)
    positions = int(np.prod(geom.out if kernel.endswith("forward") else geom.size,
                            dtype=object))
    items, outer, layout = _layout_work(geom.N, geom.C, positions, index, channels_last)
    if vector:
        items //= vector_width(dtype)
    scalars = layout + pool_scalars(geom) + tuple(np.int32(v) for v in extra)
    return expression, items, outer, scalars


@functools.lru_cache(maxsize=512)
def _adaptive_plan(kernel, ageom, dtype, channels_last=False):
    index = index_type(ageom.input_shape, ageom.output_shape)
    offsets = kernel in OFFSET_KERNELS
    expression = kernel_expression(kernel, dtype, index,
                                   offset=ageom.offset_dtype if offsets else None,
                                   channels_last=channels_last)
    positions = int(np.prod(ageom.out if kernel.endswith("forward") else ageom.size,
                            dtype=object))
    items, outer, layout = _layout_work(ageom.N, ageom.C, positions, index, channels_last)
    return expression, items, outer, layout + adaptive_scalars(ageom, offsets=offsets)


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
#
# Shapes in the docstrings are channels-first; with channels_last=True every array is
# (N, *spatial, C) instead (see the module docstring).

def _check_layout(channels_last):
    if not isinstance(channels_last, (bool, np.bool_)):
        raise TypeError(f"channels_last must be a bool, got {channels_last!r}")
    return bool(channels_last)


def _pool(kernel, geom, inputs, outputs, extra=(), channels_last=False, adaptive=False):
    """Checks the named ``inputs`` ({name: (array, geometry shape)}; the first one's dtype is
    the values') against geom in the layout, launches ``kernel`` on them (made C-contiguous)
    and on new ``outputs`` ({name: (geometry shape, dtype or None for the values')}); returns
    the outputs in order."""
    import cupy
    channels_last = _check_layout(channels_last)
    _check_geometry(geom, AdaptiveGeometry if adaptive else PoolGeometry)
    where = geom.describe() + (" (arrays channels-last)" if channels_last else "")
    for name, (a, shape) in inputs.items():
        _check(a, name, array_shape(shape, channels_last), where)
    name, (values, _) = next(iter(inputs.items()))
    check_floating(values, name)
    dtype = np.dtype(values.dtype)
    if kernel in OFFSET_KERNELS and kernel.endswith("backward"):
        _check_offsets(inputs["offsets"][0], geom)
    if adaptive:
        expression, items, outer, scalars = _adaptive_plan(kernel, geom, dtype, channels_last)
    else:
        expression, items, outer, scalars = _pool_plan(kernel, geom, dtype, extra,
                                                       channels_last)
    device_id = cuda_compile.device_of(**{n: a for n, (a, _) in inputs.items()})
    with cuda_compile.on_device(device_id):
        arrays = [cupy.ascontiguousarray(a) for a, _ in inputs.values()]
        results = [cupy.empty(array_shape(shape, channels_last),
                              dtype=dtype if out_dtype is None else out_dtype)
                   for shape, out_dtype in outputs.values()]
        if not adaptive and _vectorised(kernel, geom.C, dtype,
                                        dict(zip(list(inputs) + list(outputs),
                                                 arrays + results)), channels_last):
            expression, items, outer, scalars = _pool_plan(kernel, geom, dtype, extra,
                                                           channels_last, True)
        _launch(expression, dtype, items, outer, arrays + results, scalars, device_id)
    return results


def max_pool_forward_gpu(x, geom, channels_last=False):
    """Max pooling over 1, 2 or 3 spatial axes with the CUDA kernel.

    Inputs:
    - x: cupy array (N, C, *size), float16/bfloat16/float32/float64, any strides (not
      modified); (N, *size, C) with channels_last
    - geom: PoolGeometry of x (any d; channels-first shapes in either layout)
    - channels_last: arrays in (N, *spatial, C) layout

    Returns a tuple of:
    - out: cupy array (N, C, *out), dtype of x, on x's device
    - offsets: cupy array (N, C, *out) of geom.offset_dtype: each window's argmax as its
      compact offset (row-major over geom.kernel), on x's device
    """
    out, offsets = _pool("max_pool3d_forward", geom, {"x": (x, geom.input_shape)},
                         {"out": (geom.output_shape, None),
                          "offsets": (geom.output_shape, geom.offset_dtype)},
                         channels_last=channels_last)
    return out, offsets


def max_pool_backward_gpu(dout, offsets, geom, channels_last=False):
    """Backward pass of max pooling: a gather per dx element over the windows that cover it
    (ascending tap order, float32 sums for float16 and bfloat16, no atomics); every element of
    dx is written by the kernel. Channels-last, with C a multiple of the vector width and dout
    and offsets aligned for it, the vector variant runs (the same bits; see the module doc).

    Inputs:
    - dout: cupy array (N, C, *out), float16/bfloat16/float32/float64, any strides (not
      modified)
    - offsets: cupy array (N, C, *out) of geom.offset_dtype from the forward pass, on dout's
      device
    - geom: PoolGeometry
    - channels_last: arrays in (N, *spatial, C) layout

    Returns:
    - dx: cupy array (N, C, *size), dtype of dout, on dout's device
    """
    (dx,) = _pool("max_pool3d_backward", geom,
                  {"dout": (dout, geom.output_shape), "offsets": (offsets, geom.output_shape)},
                  {"dx": (geom.input_shape, None)}, channels_last=channels_last)
    return dx


def avg_pool_forward_gpu(x, geom, count_include_pad, divisor_override, channels_last=False):
    """Average pooling over 1, 2 or 3 spatial axes (PyTorch's avg_pool semantics; sum
    pooling is divisor_override=1).

    Inputs:
    - x: cupy array (N, C, *size), float16/bfloat16/float32/float64, any strides (not
      modified)
    - geom: PoolGeometry of x, without dilation
    - count_include_pad: bool: the divisor counts the padding (never the ceil_mode overhang)
    - divisor_override: positive int that replaces the divisor, or None
    - channels_last: arrays in (N, *spatial, C) layout

    Returns:
    - out: cupy array (N, C, *out), dtype of x, on x's device
    """
    _check_geometry(geom, PoolGeometry)
    options = _avg_options(geom, count_include_pad, divisor_override)
    (out,) = _pool("avg_pool3d_forward", geom, {"x": (x, geom.input_shape)},
                   {"out": (geom.output_shape, None)}, options, channels_last)
    return out


def avg_pool_backward_gpu(dout, geom, count_include_pad, divisor_override, channels_last=False):
    """Backward pass of average pooling: a gather per dx element of dout / divisor over the
    windows that cover it (ascending tap order, float32 sums for float16 and bfloat16, no
    atomics). Channels-last, with C a multiple of the vector width and dout aligned for it,
    the vector variant runs (the same bits; see the module doc).

    Inputs:
    - dout: cupy array (N, C, *out), float16/bfloat16/float32/float64, any strides (not
      modified)
    - geom, count_include_pad, divisor_override, channels_last: as for the forward pass

    Returns:
    - dx: cupy array (N, C, *size), dtype of dout, on dout's device
    """
    _check_geometry(geom, PoolGeometry)
    options = _avg_options(geom, count_include_pad, divisor_override)
    (dx,) = _pool("avg_pool3d_backward", geom, {"dout": (dout, geom.output_shape)},
                  {"dx": (geom.input_shape, None)}, options, channels_last)
    return dx


# ------------------------------------------------------------------ adaptive pooling

def adaptive_avg_pool_forward_gpu(x, ageom, channels_last=False):
    """Adaptive average pooling over 1, 2 or 3 spatial axes (PyTorch's windows).

    Inputs:
    - x: cupy array (N, C, *size), float16/bfloat16/float32/float64, any strides (not
      modified)
    - ageom: AdaptiveGeometry of x
    - channels_last: arrays in (N, *spatial, C) layout

    Returns:
    - out: cupy array (N, C, *out): each window's sum (row-major, float32 for float16 and
      bfloat16) divided by its element count, dtype of x, on x's device
    """
    (out,) = _pool("adaptive_avg_pool3d_forward", ageom, {"x": (x, ageom.input_shape)},
                   {"out": (ageom.output_shape, None)}, channels_last=channels_last,
                   adaptive=True)
    return out


def adaptive_avg_pool_backward_gpu(dout, ageom, channels_last=False):
    """Backward pass of adaptive average pooling: a gather per dx element of dout / count
    over the windows that cover it (ascending window order, no atomics).

    Inputs:
    - dout: cupy array (N, C, *out), float16/bfloat16/float32/float64, any strides (not
      modified)
    - ageom: AdaptiveGeometry
    - channels_last: arrays in (N, *spatial, C) layout

    Returns:
    - dx: cupy array (N, C, *size), dtype of dout, on dout's device
    """
    (dx,) = _pool("adaptive_avg_pool3d_backward", ageom, {"dout": (dout, ageom.output_shape)},
                  {"dx": (ageom.input_shape, None)}, channels_last=channels_last,
                  adaptive=True)
    return dx


def adaptive_max_pool_forward_gpu(x, ageom, channels_last=False):
    """Adaptive max pooling over 1, 2 or 3 spatial axes (PyTorch's windows and max rule).

    Inputs:
    - x: cupy array (N, C, *size), float16/bfloat16/float32/float64, any strides (not
      modified)
    - ageom: AdaptiveGeometry of x
    - channels_last: arrays in (N, *spatial, C) layout

    Returns a tuple of:
    - out: cupy array (N, C, *out), dtype of x, on x's device
    - offsets: cupy array (N, C, *out) of ageom.offset_dtype: the argmax's offset inside its
      window, row-major over ageom.window, on x's device
    """
    out, offsets = _pool("adaptive_max_pool3d_forward", ageom, {"x": (x, ageom.input_shape)},
                         {"out": (ageom.output_shape, None),
                          "offsets": (ageom.output_shape, ageom.offset_dtype)},
                         channels_last=channels_last, adaptive=True)
    return out, offsets


def adaptive_max_pool_backward_gpu(dout, offsets, ageom, channels_last=False):
    """Backward pass of adaptive max pooling: a gather per dx element over the windows that
    cover it (ascending window order, float32 sums for float16 and bfloat16, no atomics).

    Inputs:
    - dout: cupy array (N, C, *out), float16/bfloat16/float32/float64, any strides (not
      modified)
    - offsets: cupy array (N, C, *out) of ageom.offset_dtype from the forward pass, on dout's
      device
    - ageom: AdaptiveGeometry
    - channels_last: arrays in (N, *spatial, C) layout

    Returns:
    - dx: cupy array (N, C, *size), dtype of dout, on dout's device
    """
    (dx,) = _pool("adaptive_max_pool3d_backward", ageom,
                  {"dout": (dout, ageom.output_shape),
                   "offsets": (offsets, ageom.output_shape)},
                  {"dx": (ageom.input_shape, None)}, channels_last=channels_last,
                  adaptive=True)
    return dx


# ---------------------------------------------------------------------- max unpooling

def _unpool_shapes(in_shape, out_shape, what):
    """(N, C, in_plane, out_plane, index type) of channels-first in_shape and out_shape."""
    in_shape, out_shape = tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape)
    if (len(in_shape) != len(out_shape) or len(in_shape) not in (3, 4, 5)
            or in_shape[:2] != out_shape[:2] or min(out_shape[2:]) <= 0):
        raise ValueError(f"max unpooling needs input and output shapes (N, C, *spatial) of one "
                         f"rank (1 to 3 spatial axes) with the same N, C and non-empty output "
                         f"planes, got {what}")
    in_plane = int(np.prod(in_shape[2:], dtype=object))
    out_plane = int(np.prod(out_shape[2:], dtype=object))
    return in_shape[0], in_shape[1], in_plane, out_plane, index_type(in_shape, out_shape)


def _unpool_indices(indices):
    import cupy
    if np.dtype(indices.dtype).kind not in "iu":
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if np.dtype(indices.dtype) not in UNPOOL_INDEX_TYPES:
        return cupy.ascontiguousarray(indices.astype(np.int64))
    return cupy.ascontiguousarray(indices)


def _winners(indices, dtype, N, C, in_plane, out_plane, index, device_id, channels_last):
    """int32/int64 (Idx) array of N*C*out_plane, laid out like the output: per output element
    the flat index (in x's layout) of the last input of its plane (row-major) that targets
    it, or -1. Compiled in the group of the values' dtype."""
    import cupy
    winners = cupy.full(N * C * out_plane, -1, dtype=INDEX_TYPES[index])
    expression = kernel_expression(WINNERS_KERNEL, index=index, indices=indices.dtype,
                                   channels_last=channels_last)
    items, outer, layout = _layout_work(N, C, in_plane, index, channels_last)
    scalars = layout + (INDEX_TYPES[index](in_plane), INDEX_TYPES[index](out_plane))
    _launch(expression, dtype, items, outer, (indices, winners), scalars, device_id)
    return winners


def max_unpool_forward_gpu(x, indices, out_shape, return_winners=False, channels_last=False):
    """Max unpooling over 1, 2 or 3 spatial axes: each input written at its target, the
    last one in row-major order winning where several inputs of a plane share a target
    (deterministic: an integer atomicMax of the inputs' flat indices picks the winners, then
    a second kernel writes every output element: the winner's value or 0).

    An index outside [0, prod(out_shape[2:])) targets nothing: its value is dropped and its
    gradient is 0 (the launcher never synchronises, so it cannot check them on the host).

    Inputs:
    - x: cupy array (N, C, *in), float16/bfloat16/float32/float64, any strides (not
      modified); (N, *in, C) with channels_last
    - indices: integer cupy array of x's shape (and layout): flat index into each output
      plane (L, H*W or D*H*W, row-major over the spatial axes in either layout), on x's
      device
    - out_shape: (N, C, *out), the full output shape, channels-first in either layout
    - return_winners: also return the winners (what the backward pass needs)
    - channels_last: x, indices and out in (N, *spatial, C) layout

    Returns:
    - out: cupy array of out_shape ((N, *out, C) with channels_last), dtype of x, on x's
      device
    - winners (with return_winners): int32/int64 cupy array of prod(out_shape), laid out like
      out: per output element the flat index (in x's layout) of the input that won it, or -1
    """
    import cupy
    channels_last = _check_layout(channels_last)
    out_shape = tuple(int(s) for s in out_shape)
    what = (f"x {tuple(x.shape)}, output {out_shape}"
            + (" (x channels-last, output shape channels-first)" if channels_last else ""))
    _check(x, "x", x.shape, what)
    _check(indices, "indices", x.shape, what)
    check_floating(x, "x")
    x_shape = to_channels_first_shape(x.shape, "channels_last") if channels_last else x.shape
    N, C, in_plane, out_plane, index = _unpool_shapes(x_shape, out_shape, what)
    device_id = cuda_compile.device_of(x=x, indices=indices)
    with cuda_compile.on_device(device_id):
        x = cupy.ascontiguousarray(x)
        indices = _unpool_indices(indices)
        out = cupy.empty(array_shape(out_shape, channels_last), dtype=x.dtype)
        winners = cupy.full(0, -1, dtype=INDEX_TYPES[index])
        if N * C:
            winners = _winners(indices, x.dtype, N, C, in_plane, out_plane, index, device_id,
                               channels_last)
            expression = kernel_expression("max_unpool_forward", x.dtype, index,
                                           channels_last=channels_last)
            items, outer, layout = _layout_work(N, C, out_plane, index, channels_last)
            _launch(expression, x.dtype, items, outer, (x, winners, out),
                    layout + (INDEX_TYPES[index](out_plane),), device_id)
    return (out, winners) if return_winners else out


def max_unpool_backward_gpu(dout, indices, winners, x_shape, channels_last=False):
    """Backward pass of max unpooling: dx[i] = dout at input i's target if i won it (the last
    input in row-major order with that target), else 0: a gather, without atomics (the
    winners come from the forward pass).

    Indices are assumed in range (see max_unpool_forward_gpu).

    Inputs:
    - dout: cupy array (N, C, *out), float16/bfloat16/float32/float64, any strides (not
      modified); (N, *out, C) with channels_last
    - indices: integer cupy array as given to the forward pass (x's shape and layout), on
      dout's device
    - winners: what max_unpool_forward_gpu(..., return_winners=True) returned (same layout)
    - x_shape: (N, C, *in), the forward input's shape, channels-first in either layout
    - channels_last: dout, indices and dx in (N, *spatial, C) layout

    Returns:
    - dx: cupy array of x_shape ((N, *in, C) with channels_last), dtype of dout, on dout's
      device
    """
    import cupy
    channels_last = _check_layout(channels_last)
    x_shape = tuple(int(s) for s in x_shape)
    what = (f"x {x_shape}, dout {tuple(dout.shape)}"
            + (" (x shape channels-first, arrays channels-last)" if channels_last else ""))
    _check(dout, "dout", dout.shape, what)
    _check(indices, "indices", array_shape(x_shape, channels_last), what)
    check_floating(dout, "dout")
    dout_shape = (to_channels_first_shape(dout.shape, "channels_last") if channels_last
                  else dout.shape)
    N, C, in_plane, out_plane, index = _unpool_shapes(x_shape, dout_shape, what)
    device_id = cuda_compile.device_of(dout=dout, indices=indices)
    with cuda_compile.on_device(device_id):
        dout = cupy.ascontiguousarray(dout)
        indices = _unpool_indices(indices)
        dx = cupy.empty(array_shape(x_shape, channels_last), dtype=dout.dtype)
        if N * C:
            if winners.dtype != INDEX_TYPES[index] or winners.size != N * C * out_plane:
                raise ValueError(f"winners must be the {np.dtype(INDEX_TYPES[index])} array of "
                                 f"{N * C * out_plane} elements that max_unpool_forward_gpu "
                                 f"returned, got {winners.dtype} of {winners.size}: {what}")
            expression = kernel_expression(UNPOOL_BACKWARD_KERNEL, dout.dtype, index,
                                           indices=indices.dtype, channels_last=channels_last)
            items, outer, layout = _layout_work(N, C, in_plane, index, channels_last)
            scalars = layout + (INDEX_TYPES[index](in_plane), INDEX_TYPES[index](out_plane))
            _launch(expression, dout.dtype, items, outer, (dout, indices, winners, dx),
                    scalars, device_id)
    return dx
