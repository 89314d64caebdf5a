"""Launchers of the batch-norm CUDA kernels in ``batchnorm.cu``.

Importable without CuPy: CuPy is imported by the first launch. Every launcher
takes x of shape (N, C, H, W) (plain batch norm on (N, D) is passed as
(N, D, 1, 1)), makes the arrays it reads C-contiguous, never writes to its
inputs and returns new arrays. Statistics are in the stats dtype: float32 for
float16 and float32 input, float64 for float64.

Passes over memory (x and dout are read, y and dx written, all full-size):

==================  ===================================================
train forward       stats (read x), merge (tiny), apply (read x, write y)
eval forward        apply (read x, write y)
train backward      reduce (read dout, x), merge, dx (read dout, x, write dx)
test backward       reduce + dx (read dout, x, write dx), merge
==================  ===================================================

:func:`plan_layout` picks the kernels' layout, vector width and grid; see the
header of ``batchnorm.cu`` for what the layouts mean.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .compile import get_kernel, launch

__all__ = [
    "SOURCE", "NAME_EXPRESSIONS", "LayoutPlan", "plan_layout",
    "bn_train_forward_gpu", "bn_eval_forward_gpu", "bn_backward_gpu",
]

SOURCE = "batchnorm.cu"

_CTYPE = {np.dtype(np.float16): "__half", np.dtype(np.float32): "float",
          np.dtype(np.float64): "double"}
_THREADS = 256   # bn::kThreads
_UNROLL = 4      # bn::kUnroll
_MAX_SLOTS = 256  # at most this many partial sums per channel (the merge is one thread per channel)
_MAX_COLUMN_HW = 64  # larger planes use the planes layout


def _expressions():
    out = []
    for ctype in _CTYPE.values():
        for vec in (1, 16 // {"__half": 2, "float": 4, "double": 8}[ctype]):
            for layout in ("planes", "columns"):
                out += [f"bn_stats_{layout}<{ctype}, {vec}>",
                        f"bn_apply_{layout}<{ctype}, {vec}>",
                        f"bn_backward_reduce_{layout}<{ctype}, {vec}, false>",
                        f"bn_backward_reduce_{layout}<{ctype}, {vec}, true>",
                        f"bn_backward_dx_{layout}<{ctype}, {vec}>"]
        out.append(f"bn_stats_merge<{ctype}>")
    out += ["bn_backward_merge<float>", "bn_backward_merge<double>"]
    return tuple(out)


NAME_EXPRESSIONS = _expressions()


def stats_dtype(dtype):
    """float64 for float64 input, float32 for float16 and float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@dataclass(frozen=True)
class LayoutPlan:
    """How the kernels walk one (N, C, H, W) tensor.

    - layout: 'planes' (grid (S, C)) or 'columns' (grid (S, tiles))
    - vec: elements per load (16 bytes, or 1)
    - grid: CUDA grid (S, C) or (S, tiles); blocks of 256 threads
    - slots: partial sums per channel (S, or 2*S for 'columns')
    - args: the layout's trailing kernel arguments, exact C types:
      planes (hwv, magic, shift, mv, chunk), columns (hw, tx_log2, n, chunk)
    """

    layout: str
    vec: int
    grid: tuple
    slots: int
    args: tuple


def _divider(d):
    """(magic, shift) with n // d == (umulhi(n, magic) + n) >> shift for n, d < 2**31."""
    shift = max(0, (d - 1).bit_length())
    magic = ((1 << 32) * ((1 << shift) - d)) // d + 1
    return magic, shift


def _split(total, parts, align):
    """Chunk length (a multiple of ``align``) and count covering ``total`` in about ``parts``."""
    chunk = -(-total // max(parts, 1))
    chunk = -(-chunk // align) * align
    return chunk, -(-total // chunk)


def plan_layout(shape, dtype, aligned=True, num_sms=132):
    """Layout, vector width and grid for the kernels on a tensor.

    Inputs:
    - shape: (N, C, H, W)
    - dtype: float16, float32 or float64
    - aligned: whether every pointer involved is 16-byte aligned
    - num_sms: streaming multiprocessors of the device; grids of few channels or tiles
      get several blocks per channel, about 4 blocks per SM in all (one wave)

    Returns a LayoutPlan. A channel's N*H*W values must be fewer than 2**31.
    """
    N, C, H, W = (int(s) for s in shape)
    hw = H * W
    if C == 1:  # one channel is one contiguous plane
        N, hw = 1, N * hw
    count = N * hw
    if count < 1 or C < 1:
        raise ValueError(f"batch norm kernels need a non-empty tensor, got shape {tuple(shape)}")
    if count >= 2**31 or C > 65535:
        raise ValueError(f"batch norm kernels support N*H*W < 2**31 and C <= 65535, got shape "
                         f"{tuple(shape)} (N*H*W = {count})")
    vmax = 16 // np.dtype(dtype).itemsize
    target = 4 * num_sms

    width = C * hw
    vec = vmax if aligned and width % vmax == 0 else 1
    tx = min(32, 1 << max(0, (-(-width // vec) - 1).bit_length()))
    tiles = -(-width // (tx * vec))
    if C > 1 and hw <= min(_MAX_COLUMN_HW, tx * vec) and tiles <= 65535:
        ty = _THREADS // tx
        parts = min(target // tiles, -(-N // (ty * _UNROLL)), _MAX_SLOTS // 2)
        chunk, S = _split(N, parts, ty)
        args = (np.uint32(hw), np.int32(tx.bit_length() - 1), np.uint32(N), np.uint32(chunk))
        return LayoutPlan("columns", vec, (S, tiles), 2 * S, args)

    vec = vmax if aligned and hw % vmax == 0 else 1
    hwv = hw // vec
    mv = N * hwv
    parts = min(target // C, -(-mv // (_THREADS * _UNROLL)), _MAX_SLOTS)
    chunk, S = _split(mv, parts, _THREADS)
    magic, shift = _divider(hwv)
    args = (np.uint32(hwv), np.uint32(magic), np.uint32(shift), np.uint32(mv), np.uint32(chunk))
    return LayoutPlan("planes", vec, (S, C), S, args)


# ------------------------------------------------------------------------ launching

@functools.lru_cache(maxsize=None)
def _num_sms(device_id):
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


def _kernel(name):
    return get_kernel(SOURCE, name, NAME_EXPRESSIONS), name


def _run(name, grid, block, args):
    kernel, name = _kernel(name)
    launch(kernel, name, grid, block, args)


def _check_x(x, what):
    import cupy
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"{what} must be a cupy.ndarray, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{what} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _CTYPE:
        raise TypeError(f"{what} must be float16, float32 or float64, got {x.dtype}")
    return cupy.ascontiguousarray(x)


def _channel_param(a, C, sd, what):
    """``a`` as a contiguous (C,) array of dtype ``sd`` (the original when it already is)."""
    import cupy
    a = cupy.asarray(a)
    if a.shape != (C,):
        raise ValueError(f"{what} must have shape ({C},), got {tuple(a.shape)}")
    return cupy.ascontiguousarray(a.astype(sd, copy=False))


def _plan_for(x, *arrays):
    import cupy
    aligned = all(a.data.ptr % 16 == 0 for a in (x,) + arrays)
    return plan_layout(x.shape, x.dtype, aligned, _num_sms(cupy.cuda.runtime.getDevice()))


def _expr(kind, plan, x, *extra):
    params = ", ".join([_CTYPE[x.dtype], str(plan.vec)] + list(extra))
    return f"bn_{kind}_{plan.layout}<{params}>"


def bn_train_forward_gpu(x, gamma, beta, eps):
    """Train-mode batch norm forward: batch statistics, then normalization.

    Inputs:
    - x: cupy array (N, C, H, W), float16/32/64
    - gamma, beta: arrays (C,)
    - eps: float, added to the variance

    Returns a tuple of:
    - y: array (N, C, H, W), dtype of x
    - mean, var, invstd: arrays (C,) in the stats dtype; var is biased,
      invstd = 1/sqrt(var + eps)
    """
    import cupy
    x = _check_x(x, "x")
    C = x.shape[1]
    sd = stats_dtype(x.dtype)
    gamma = _channel_param(gamma, C, sd, "gamma")
    beta = _channel_param(beta, C, sd, "beta")
    y = cupy.empty_like(x)
    plan = _plan_for(x, y)
    part = cupy.empty(2 * C * plan.slots, dtype=sd)
    mean, var, invstd, mean_lo = (cupy.empty(C, dtype=sd) for _ in range(4))
    count = x.size // C
    hw = x.shape[2] * x.shape[3]  # the merge's shift is the channel's first value, x[c*hw]
    block = (_THREADS,)
    _run(_expr("stats", plan, x), plan.grid, block, (x, part, np.int32(C)) + plan.args)
    _run(f"bn_stats_merge<{_CTYPE[x.dtype]}>", (-(-C // _THREADS),), block,
         (x, part, np.int32(C), np.int32(plan.slots), np.int64(hw), np.float64(count),
          np.float64(eps), mean, var, invstd, mean_lo))
    _run(_expr("apply", plan, x), plan.grid, block,
         (x, gamma, beta, mean, mean_lo, invstd, np.int32(1), np.float64(eps), y, np.int32(C))
         + plan.args)
    return y, mean, var, invstd


def bn_eval_forward_gpu(x, gamma, beta, mean, var, eps):
    """Test-mode batch norm forward with given statistics.

    Inputs:
    - x: cupy array (N, C, H, W), float16/32/64
    - gamma, beta: arrays (C,)
    - mean, var: arrays (C,), the running statistics
    - eps: float, added to var

    Returns y: array (N, C, H, W), dtype of x, (x - mean)/sqrt(var + eps)*gamma + beta.
    """
    import cupy
    x = _check_x(x, "x")
    C = x.shape[1]
    sd = stats_dtype(x.dtype)
    gamma, beta, mean, var = (_channel_param(a, C, sd, name) for a, name in
                              ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var")))
    y = cupy.empty_like(x)
    plan = _plan_for(x, y)
    _run(_expr("apply", plan, x), plan.grid, (_THREADS,),
         (x, gamma, beta, mean, mean, var, np.int32(0), np.float64(eps), y, np.int32(C))
         + plan.args)
    return y


def bn_backward_gpu(dout, x, gamma, mean, invstd, train):
    """Batch norm backward.

    Inputs:
    - dout: cupy array (N, C, H, W), upstream gradient, dtype of x
    - x: cupy array (N, C, H, W), the forward input
    - gamma: array (C,)
    - mean, invstd: arrays (C,): the batch statistics (train) or the running
      mean and 1/sqrt(running_var + eps) (test)
    - train: bool; in test mode the statistics are constants

    Returns a tuple of:
    - dx: array (N, C, H, W), dtype of x
    - dgamma, dbeta: arrays (C,) in the stats dtype
    """
    import cupy
    x = _check_x(x, "x")
    dout = _check_x(dout, "dout")
    if dout.shape != x.shape or dout.dtype != x.dtype:
        raise ValueError(f"dout must match x: got dout {tuple(dout.shape)} {dout.dtype}, "
                         f"x {tuple(x.shape)} {x.dtype}")
    C = x.shape[1]
    sd = stats_dtype(x.dtype)
    gamma, mean, invstd = (_channel_param(a, C, sd, name) for a, name in
                           ((gamma, "gamma"), (mean, "mean"), (invstd, "invstd")))
    dx = cupy.empty_like(x)
    plan = _plan_for(x, dout, dx)
    part = cupy.empty(2 * C * plan.slots, dtype=sd)
    dgamma, dbeta = cupy.empty(C, dtype=sd), cupy.empty(C, dtype=sd)
    block = (_THREADS,)
    write_dx = "false" if train else "true"
    _run(_expr("backward_reduce", plan, x, write_dx), plan.grid, block,
         (dout, x, gamma, mean, invstd, part, dx, np.int32(C)) + plan.args)
    _run(f"bn_backward_merge<{_CTYPE[sd]}>", (-(-C // _THREADS),), block,
         (part, np.int32(C), np.int32(plan.slots), invstd, dgamma, dbeta))
    if train:
        _run(_expr("backward_dx", plan, x), plan.grid, block,
             (dout, x, gamma, mean, invstd, dgamma, dbeta, np.float64(x.size // C), dx,
              np.int32(C)) + plan.args)
    return dx, dgamma, dbeta
