"""Launchers for the max-pooling CUDA kernels in ``maxpool.cu``.

Importable without CuPy or a GPU: CuPy is imported by the launchers.
Each kernel is a template ``<T, Off, Idx>``: value type (``__half``, ``float``,
``double``), offset type (``geom.offset_dtype``) and index type (``int``, or
``long long`` when a tensor has 2**31 elements or more, see :func:`index_type`).
:data:`NAME_EXPRESSIONS` lists every instantiation; one compile serves them all.
"""
from __future__ import annotations

import functools

import numpy as np

from ..shapes import check_floating
from . import compile as cuda_compile

__all__ = ["max_pool_forward_gpu", "max_pool_backward_gpu", "index_type", "kernel_expression",
           "launch_config", "scalar_args", "SOURCE", "NAME_EXPRESSIONS"]

SOURCE = "maxpool.cu"

KERNELS = ("max_pool2d_forward", "max_pool2d_backward", "max_pool2d_backward_disjoint")
VALUE_TYPES = {np.dtype(np.float16): "__half", np.dtype(np.float32): "float",
               np.dtype(np.float64): "double"}
OFFSET_TYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
                np.dtype(np.uint32): "unsigned int"}
INDEX_TYPES = {"int": np.int32, "long long": np.int64}

NAME_EXPRESSIONS = tuple(f"{kernel}<{value}, {offset}, {index}>"
                         for kernel in KERNELS
                         for value in VALUE_TYPES.values()
                         for offset in OFFSET_TYPES.values()
                         for index in INDEX_TYPES)

_BLOCK = 256
_MAX_GRID_X = 2**22          # keeps blockDim.x * gridDim.x below 2**31
_MAX_GRID_Y = 65535
_BLOCKS_PER_SM = 32          # a few waves of resident blocks; each thread then visits many planes


def index_type(geom):
    """C index type for geom's kernels: ``'long long'`` when the input or the
    output (and offsets) has 2**31 elements or more, else ``'int'``."""
    largest = geom.N * geom.C * max(geom.H * geom.W, geom.Ho * geom.Wo)
    return "long long" if largest >= 2**31 else "int"


def kernel_expression(kernel, dtype, geom):
    """Name expression of ``kernel`` (one of KERNELS) for values of ``dtype`` and geometry geom,
    e.g. ``'max_pool2d_forward<float, unsigned char, int>'``."""
    dtype = np.dtype(dtype)
    if dtype not in VALUE_TYPES:
        raise TypeError(f"max-pool kernels take float16, float32 or float64, got {dtype}")
    return (f"{kernel}<{VALUE_TYPES[dtype]}, {OFFSET_TYPES[geom.offset_dtype]}, "
            f"{index_type(geom)}>")


def scalar_args(geom):
    """The kernels' scalar arguments with their exact C types:
    planes (Idx), then H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw (int)."""
    dims = (geom.H, geom.W, geom.Ho, geom.Wo, geom.kh, geom.kw,
            geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw)
    if max(dims) >= 2**31:
        raise ValueError(f"max-pool kernels take sizes below 2**31: {geom.describe()}")
    planes = INDEX_TYPES[index_type(geom)](geom.N * geom.C)
    return (planes,) + tuple(np.int32(d) for d in dims)


def launch_config(plane, planes, sm_count):
    """(grid, block) for ``planes`` planes of ``plane`` positions each: x walks a plane,
    y the planes, about _BLOCKS_PER_SM blocks per multiprocessor in all."""
    gx = min(-(-plane // _BLOCK), _MAX_GRID_X)
    gy = min(planes, _MAX_GRID_Y, max(1, -(-sm_count * _BLOCKS_PER_SM // gx)))
    return (gx, gy, 1), (_BLOCK, 1, 1)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    import cupy
    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


def _launch(kernel, dtype, geom, plane, arrays):
    planes = geom.N * geom.C
    if planes == 0:
        return
    import cupy
    expression = kernel_expression(kernel, dtype, geom)
    function = cuda_compile.get_kernel(SOURCE, expression, NAME_EXPRESSIONS)
    grid, block = launch_config(plane, planes, _sm_count(cupy.cuda.runtime.getDevice()))
    cuda_compile.launch(function, expression, grid, block, tuple(arrays) + scalar_args(geom))


def _check_cupy(a, name):
    import cupy
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")


def max_pool_forward_gpu(x, geom):
    """Max pooling with the CUDA kernel.

    Inputs:
    - x: cupy array (N, C, H, W), float16/32/64, any strides (not modified)
    - geom: PoolGeometry of x

    Returns a tuple of:
    - out: cupy array (N, C, Ho, Wo), dtype of x
    - offsets: cupy array (N, C, Ho, Wo) of geom.offset_dtype, compact argmax offsets
    """
    import cupy
    _check_cupy(x, "x")
    check_floating(x, "x")
    if tuple(x.shape) != geom.input_shape:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected {geom.input_shape}: "
                         f"{geom.describe()}")
    x = cupy.ascontiguousarray(x)
    out = cupy.empty(geom.output_shape, dtype=x.dtype)
    offsets = cupy.empty(geom.output_shape, dtype=geom.offset_dtype)
    _launch("max_pool2d_forward", x.dtype, geom, geom.Ho * geom.Wo, (x, out, offsets))
    return out, offsets


def max_pool_backward_gpu(dout, offsets, geom):
    """Backward pass of max pooling with the CUDA kernels: deterministic (fixed summation
    order, no atomics) and every element of dx written by the kernel.

    Inputs:
    - dout: cupy array (N, C, Ho, Wo), float16/32/64, any strides (not modified)
    - offsets: cupy array (N, C, Ho, Wo) of geom.offset_dtype, from the forward pass
    - geom: PoolGeometry

    Returns:
    - dx: cupy array (N, C, H, W), dtype of dout
    """
    import cupy
    _check_cupy(dout, "dout")
    _check_cupy(offsets, "offsets")
    check_floating(dout, "dout")
    for name, a in (("dout", dout), ("offsets", offsets)):
        if tuple(a.shape) != geom.output_shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {geom.output_shape}: "
                             f"{geom.describe()}")
    if offsets.dtype != geom.offset_dtype:
        raise TypeError(f"offsets must have dtype {geom.offset_dtype} for a "
                        f"{geom.kh}x{geom.kw} window, got {offsets.dtype}")
    dout = cupy.ascontiguousarray(dout)
    offsets = cupy.ascontiguousarray(offsets)
    dx = cupy.empty(geom.input_shape, dtype=dout.dtype)
    kernel = "max_pool2d_backward" if geom.overlapping else "max_pool2d_backward_disjoint"
    _launch(kernel, dout.dtype, geom, geom.H * geom.W, (dout, offsets, dx))
    return dx
