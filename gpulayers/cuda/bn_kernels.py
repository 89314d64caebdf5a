"""Launchers of the batch-norm CUDA kernels in ``batchnorm.cu``.

Importable without CuPy: CuPy is imported by the first launch. Every launcher
takes x of shape (N, C, H, W) (plain batch norm on (N, D) is passed as
(N, D, 1, 1)), makes the arrays it reads C-contiguous, never writes to its
inputs and returns new arrays. Statistics are in the stats dtype: float32 for
float16, bfloat16 and float32 input, float64 for float64. :func:`supported` says whether
the kernels take a shape at all (None) or why not.

Statistics are centred everywhere (Welford / Chan merges, as PyTorch's
batch_norm_collect_statistics): every thread merges the count, mean and M2 of
its loaded chunks, then threads, warps and blocks merge theirs, and every block
of the apply kernel merges the blocks' partials of its channels in double, in
one fixed order (so all of them get the same bits; one per channel writes the
stats block). No single sample is a pivot,
so an outlier or a large mean costs no accuracy. The mean comes back rounded
(``mean``) plus what rounding lost (``mean_lo``, a row of the stats block);
the apply kernels and, given ``mean_lo``, the backward kernels use
mean + mean_lo.

Devices: every launcher runs on the one device that holds its arrays
(:func:`gpulayers.cuda.compile.device_of`; ValueError when they are on
several), allocating and launching there, with plans and kernels cached per
device. Vector (16-byte) loads are used only when x (and dout) are 16-byte
aligned; a misaligned view gets the scalar kernels.

Passes over memory (x and dout are read, y and dx written, all full-size):

==================  ===================================================
train forward       2 launches: stats (read x), apply (merges the partials,
                    writes the stats block with the running statistics; read
                    x, write y)
eval forward        1 launch: apply (read x, write y; also invstd for backward)
train backward      2 launches: reduce (read dout, x), dx (merges the
                    partials, writes dgamma, dbeta; read dout, x, write dx)
test backward       2 launches: reduce + dx (read dout, x, write dx), merge
==================  ===================================================

(Until 2026-12 the train forward and backward ran a separate merge kernel
between the two passes: 3 launches each, same results bit for bit.)

:func:`plan_layout` picks the kernels' layout, vector width and grid; see the
header of ``batchnorm.cu`` for what the layouts mean.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np

from . import compile as compile_module
from .compile import (CTypes, device_of, get_kernel, launch, launch_error, launch_here,
                      on_device)

__all__ = [
    "SOURCE", "NAME_EXPRESSIONS", "LayoutPlan", "plan_layout", "TUNING", "set_tuning",
    "STAT_ROWS", "PART_ROWS", "supported", "vectors_allowed", "bn_train_forward_gpu",
    "bn_train_forward_update_gpu",
    "bn_train_forward_block_gpu", "bn_eval_forward_gpu",
    "bn_eval_forward_stats_gpu", "bn_backward_gpu", "thread_utilisation",
    "RECORD_ROWS", "sync_stats_gpu", "sync_train_forward_gpu", "sync_backward_shares_gpu",
    "sync_backward_dx_gpu",
]

SOURCE = "batchnorm.cu"

_CTYPE = CTypes(float16="__half", bfloat16="__nv_bfloat16", float32="float", float64="double")
_THREADS = 256   # bn::kThreads
_UNROLL = 4      # bn::kUnroll
_MAX_SLOTS = 256  # about this many partial slots per channel at most (merged by 4 lanes per
                  # channel at the start of every apply / dx block, so chains of <= 64 slots);
                  # huge channels may take up to 2 more to respect _MAX_PART_COUNT
_MAX_PART_COUNT = 2**24  # values behind one partial slot: its count is exact in float32
_MAX_COLUMN_HW = 64  # larger planes use the planes layout
_MAX_GRID_Y = 65535  # CUDA's limit of gridDim.y; planes kernels stride over the channels beyond
PART_ROWS = 4    # rows of the statistics partials (bn::PartRow): count, mean hi, mean lo, M2

# Launch-plan knobs (scripts/tune_bn.py times variants of them); change them with set_tuning.
# blocks_per_sm: grid target of the planes layout (blocks of all channels per SM);
# columns_blocks_per_sm: the same for the columns layout (row chunks per tile follow).
# From scripts/tune_bn.py on an NVIDIA H200, 2026-11-26 (geometric mean over the four
# benchmark shapes, float32 and float16, train/eval forward and backward): 8 blocks per SM
# for the planes layout (0.95x the time of 4), 2 for the columns layout (0.93x of 8).
TUNING = {"blocks_per_sm": 8, "columns_blocks_per_sm": 2}

# Rows of the (len(STAT_ROWS), C) block that the train apply kernels write (bn::StatRow).
STAT_ROWS = ("mean", "var", "invstd", "mean_lo", "running_mean", "running_var")


def _expressions():
    out = []
    for ctype in _CTYPE.values():
        for vec in (1, 16 // {"__half": 2, "__nv_bfloat16": 2, "float": 4, "double": 8}[ctype]):
            for layout in ("planes", "columns"):
                out += [f"bn_stats_{layout}<{ctype}, {vec}>",
                        f"bn_apply_{layout}<{ctype}, {vec}, false>",
                        f"bn_apply_{layout}<{ctype}, {vec}, true>",
                        f"bn_backward_reduce_{layout}<{ctype}, {vec}, false>",
                        f"bn_backward_reduce_{layout}<{ctype}, {vec}, true>",
                        f"bn_backward_dx_{layout}<{ctype}, {vec}>"]
    out += ["bn_backward_merge<float>", "bn_backward_merge<double>",
            "bn_stats_merge<float>", "bn_stats_merge<double>"]
    return tuple(out)


NAME_EXPRESSIONS = _expressions()


def stats_dtype(dtype):
    """float64 for float64 input, float32 for float16, bfloat16 and float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def supported(shape, dtype=None):
    """Whether the kernels can take an (N, C, H, W) tensor: None when they can, else a short
    reason (the caller then uses the array-module path).

    Inputs:
    - shape: (N, C, H, W)
    - dtype: optional; float16, bfloat16, float32 and float64 are supported

    The limits: a non-empty tensor (C >= 1 and N*H*W >= 1), N*H*W < 2**31 values per
    channel and C < 2**31. Any number of channels fits the grid (the planes kernels stride
    over channels beyond 65535).
    """
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        return f"shape must be a tuple of ints (N, C, H, W), got {shape!r}"
    if len(dims) != 4:
        return f"the batch-norm kernels take (N, C, H, W) tensors, got shape {dims}"
    if dtype is not None and np.dtype(dtype) not in _CTYPE:
        return (f"the batch-norm kernels take float16, bfloat16, float32 or float64, "
                f"got {np.dtype(dtype)}")
    N, C, H, W = dims
    if min(dims) < 0:
        return f"negative size in shape {dims}"
    count = N * H * W
    if C < 1 or count < 1:
        return f"zero-size channel data: C = {C}, N*H*W = {count} (shape {dims})"
    if count >= 2**31:
        return (f"N*H*W = {count} values per channel: the batch-norm kernels support "
                f"N*H*W < 2**31 (shape {dims})")
    if C >= 2**31:
        return f"C = {C} channels: the batch-norm kernels support C < 2**31 (shape {dims})"
    return None


@dataclass(frozen=True)
class LayoutPlan:
    """How the kernels walk one (N, C, H, W) tensor.

    - layout: 'planes' (grid (S, min(C, 65535))) or 'columns' (grid (S, tiles))
    - vec: elements per load (16 bytes, or 1)
    - grid: CUDA grid (S, min(C, 65535)) or (S, tiles); blocks of 256 threads
    - slots: partial slots per channel (S, or 2*S for 'columns'); each covers fewer than
      2**24 values
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


def plan_layout(shape, dtype, aligned=True, num_sms=132, blocks_per_sm=None,
                columns_blocks_per_sm=None):
    """Layout, vector width and grid for the kernels on a tensor.

    Inputs:
    - shape: (N, C, H, W)
    - dtype: float16, bfloat16, float32 or float64
    - aligned: whether every pointer involved is 16-byte aligned
    - num_sms: streaming multiprocessors of the device; grids of few channels or tiles
      get several blocks per channel, about ``blocks_per_sm`` blocks per SM in all
    - blocks_per_sm, columns_blocks_per_sm: that target for the planes and the columns
      layout (default: TUNING's)

    Returns a LayoutPlan. Raises ValueError with supported()'s reason for a shape the kernels
    cannot take.

    Channels-last spatial batch norm over (N, *spatial, C) is batch norm over the (M, C)
    matrix, M = N*prod(spatial), passed as (M, C, 1, 1): the columns layout, for any M below
    2**31 (rows are unsigned, row offsets 64-bit, every slot's count below 2**24). Untuned
    for very tall matrices of few channels: with one tile (C*vec <= 128 columns, e.g.
    (256*56*56, 64, 1, 1)) the grid is at most _MAX_SLOTS//2 (+1) row chunks, about one
    256-thread block per SM on an H200 (2 per SM from columns_blocks_per_sm only when there
    are more tiles); C = 3 or another width that is no multiple of the vector runs scalar
    loads of 4 threads per row. (32*7*7, 2048, 1, 1) gets 16 tiles x 16 chunks (float32),
    as (32, 2048, 7, 7) would. Measure on a GPU before retuning (scripts/tune_bn.py).

    Small batches: tiles are 32 threads wide (8 rows of threads) unless N is below 8, when
    they widen (up to 256 x 1) so that the rows of threads have rows to walk
    (:func:`thread_utilisation`: (1, 2048, 7, 7) has all threads busy, not 1 in 8; a tile
    still holds at most 256 channels). The planes layout gives a block one channel's N*H*W
    values, so its threads idle only when a channel has fewer than 256 vectors (e.g.
    (1, 512, 14, 14): 49 of 256); not changed yet, untimed.
    """
    reason = supported(shape)
    if reason is not None:
        raise ValueError(reason)
    N, C, H, W = (int(s) for s in shape)
    hw = H * W
    if C == 1:  # one channel is one contiguous plane
        N, hw = 1, N * hw
    vmax = 16 // np.dtype(dtype).itemsize
    blocks_per_sm = TUNING["blocks_per_sm"] if blocks_per_sm is None else blocks_per_sm
    columns_blocks_per_sm = (TUNING["columns_blocks_per_sm"] if columns_blocks_per_sm is None
                             else columns_blocks_per_sm)

    width = C * hw
    vec = vmax if aligned and width % vmax == 0 else 1
    cols = -(-width // vec)
    tx = min(32, 1 << max(0, (cols - 1).bit_length()))
    # fewer rows than rows of threads (N < 256/tx): wider tiles, so that the threads of a
    # block have rows to walk (and hw up to 64 fits a tile of scalar loads); a tile still
    # holds at most 256 channels
    while (_THREADS // tx > N and tx < _THREADS and 2 * tx <= cols
           and 2 * tx * vec <= (256 if hw == 1 else 255 * hw)):
        tx *= 2
    tiles = -(-width // (tx * vec))
    if C > 1 and hw <= min(_MAX_COLUMN_HW, tx * vec) and tiles <= 65535:
        ty = _THREADS // tx
        parts = min(columns_blocks_per_sm * num_sms // tiles, -(-N // (ty * _UNROLL)),
                    _MAX_SLOTS // 2)
        chunk, S = _split(N, parts, ty)
        if chunk * hw >= _MAX_PART_COUNT:  # a slot holds chunk rows of at most hw columns
            chunk = (_MAX_PART_COUNT - 1) // hw // ty * ty
            S = -(-N // chunk)
        args = (np.uint32(hw), np.int32(tx.bit_length() - 1), np.uint32(N), np.uint32(chunk))
        return LayoutPlan("columns", vec, (S, tiles), 2 * S, args)

    vec = vmax if aligned and hw % vmax == 0 else 1
    hwv = hw // vec
    mv = N * hwv
    parts = min(blocks_per_sm * num_sms // C, -(-mv // (_THREADS * _UNROLL)), _MAX_SLOTS)
    chunk, S = _split(mv, parts, _THREADS)
    if chunk * vec >= _MAX_PART_COUNT:
        chunk = (_MAX_PART_COUNT - 1) // vec // _THREADS * _THREADS
        S = -(-mv // chunk)
    magic, shift = _divider(hwv)
    args = (np.uint32(hwv), np.uint32(magic), np.uint32(shift), np.uint32(mv), np.uint32(chunk))
    return LayoutPlan("planes", vec, (S, min(C, _MAX_GRID_Y)), S, args)


def thread_utilisation(shape, dtype, aligned=True, num_sms=132):
    """Share of launched threads that have work, per kernel of the launches on one tensor:
    a thread has work when it reads at least one element (planes: a vector of its block's
    chunk of a channel; columns: a row of the chunk in one of the tile's columns; the merge:
    a channel). The merge phases inside the apply and dx kernels are not counted.

    Inputs:
    - shape, dtype, aligned, num_sms: as plan_layout

    Returns a dict {kernel: share in [0, 1]} with keys 'stats', 'apply' (train and eval),
    'backward_reduce', 'backward_dx' (all on the plan's grid, so equal) and
    'backward_merge' (test-mode backward only; 4 threads per channel).
    """
    plan = plan_layout(shape, dtype, aligned, num_sms)
    C = int(shape[1])
    S, other = plan.grid
    if plan.layout == "planes":
        mv, chunk = int(plan.args[3]), int(plan.args[4])
        busy = sum(min(_THREADS, min(chunk, mv - b * chunk)) for b in range(S))
        share = busy / (_THREADS * S)
    else:
        hw, tx_log2, n, chunk = (int(a) for a in plan.args)
        tx = 1 << tx_log2
        ty = _THREADS // tx
        cols = C * hw // plan.vec
        rows = sum(min(ty, min(chunk, n - b * chunk)) for b in range(S))
        live = sum(min(tx, cols - t * tx) for t in range(other))
        share = rows * live / (_THREADS * S * other)
    merge = 4 * C / (_THREADS * -(-4 * C // _THREADS))
    return {"stats": share, "apply": share, "backward_reduce": share, "backward_dx": share,
            "backward_merge": merge}


# ------------------------------------------------------------------------ launching
#
# For tensors of a few MB the host time of a call matters as much as the kernels: all that
# depends only on (shape, dtype, alignment, device, TUNING) -- plan, kernel handles, grids,
# scalar arguments -- is computed once (_prepared); a call checks its arguments, finds their
# device, allocates its outputs there and launches. No call synchronizes with the device.

_BLOCK = (_THREADS,)


def set_tuning(**knobs):
    """Set launch-plan knobs of TUNING (positive ints), e.g. ``set_tuning(blocks_per_sm=8)``;
    later launches use them."""
    unknown = set(knobs) - set(TUNING)
    if unknown:
        raise ValueError(f"unknown tuning knobs {sorted(unknown)}; known: {sorted(TUNING)}")
    for name, value in knobs.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"tuning knob {name} must be a positive int, got {value!r}")
    TUNING.update({name: int(value) for name, value in knobs.items()})
    forget_prepared()


def forget_prepared():
    """Drop every launch plan and kernel handle kept (_prepared) and the prepared calls made
    from them (the tables in DEPENDENT): the next calls plan, and get their kernels, again."""
    _prepared.cache_clear()
    for table in DEPENDENT:
        table.clear()


@functools.lru_cache(maxsize=None)
def _num_sms(device_id):
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


def _function(expression, device_id):
    """(RawKernel, expression) of one instantiation on device ``device_id`` (compile.py keeps
    the compiled module per device; _prepared keeps the handles)."""
    return get_kernel(SOURCE, expression, NAME_EXPRESSIONS, device_id=device_id), expression


@dataclass(frozen=True)
class _Prepared:
    """Everything a launch on one (shape, dtype, alignment, device) needs but the arrays."""

    plan: LayoutPlan
    C: np.int32
    slots: np.int32
    count: np.float64    # values per channel
    unbiased: float      # count/(count - 1), torch's running-variance factor (1 if count == 1)
    merge_grid: tuple    # grid of bn_backward_merge (test mode): 4 threads per channel
    part_size: int       # PART_ROWS*C*slots partials (statistics; backward uses 2*C*slots)
    kernels: dict        # kind -> (kernel handle, name expression)


@functools.lru_cache(maxsize=512)
def _prepared(shape, dtype, aligned, device_id):
    return prepare(shape, dtype, aligned, _num_sms(device_id),
                   lambda expression: _function(expression, device_id))


def prepare(shape, dtype, aligned, num_sms, get_kernel):
    """Plan, scalar arguments and kernels of launches on one tensor (see _Prepared);
    ``get_kernel(expression)`` gives a kernel's handle (tests pass their own)."""
    N, C, H, W = shape
    plan = plan_layout(shape, dtype, aligned, num_sms)
    ctype = _CTYPE[np.dtype(dtype)]

    def expr(kind, *extra):
        return f"bn_{kind}_{plan.layout}<{', '.join([ctype, str(plan.vec), *extra])}>"
    stats_ctype = _CTYPE[stats_dtype(dtype)]
    names = {"stats": expr("stats"), "apply_train": expr("apply", "true"),
             "apply": expr("apply", "false"),
             "reduce_train": expr("backward_reduce", "false"),
             "reduce_test": expr("backward_reduce", "true"),
             "backward_merge": f"bn_backward_merge<{stats_ctype}>",
             "dx": expr("backward_dx")}
    count = N * H * W
    return _Prepared(plan, np.int32(C), np.int32(plan.slots), np.float64(count),
                     count / (count - 1) if count > 1 else 1.0, (-(-4 * C // _THREADS),),
                     PART_ROWS * C * plan.slots,
                     {kind: get_kernel(name) for kind, name in names.items()})


def _address(a):
    """Data pointer of a CuPy or NumPy array (NumPy's through ctypes: ``.data`` of a
    bfloat16 array cannot be made)."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


def vectors_allowed(*arrays):
    """Whether the kernels may read every array of ``arrays`` (x, and dout for backward) with
    16-byte vector loads: every data pointer is a multiple of 16. Outputs come from CuPy's
    pool, 256-byte aligned; the planes' row pitch (H*W) and the columns' (C*H*W) are checked
    by plan_layout. CuPy or NumPy arrays (the CPU shim tests use NumPy); None is skipped.

    Raises ValueError when a pointer is not even a multiple of the element size (no kernel
    can read that array).
    """
    ok = True
    for a in arrays:
        if a is None:
            continue
        address = _address(a)
        if address % a.dtype.itemsize:
            raise ValueError(f"array of shape {tuple(a.shape)} and dtype {a.dtype} starts at "
                             f"address {address:#x}, not a multiple of its element size")
        ok = ok and address % 16 == 0
    return ok


def _prepare(x, dout=None, device_id=None):
    """_Prepared for input x (and dout) on device ``device_id`` (default: theirs); only the
    inputs decide whether 16-byte vector loads are allowed (vectors_allowed)."""
    if device_id is None:
        device_id = device_of(x, dout)
    return _prepared(x.shape, x.dtype, vectors_allowed(x, dout), device_id)


def _device(*arrays):
    """(device id of the arrays, context that makes it current): compile's device_of and
    on_device."""
    dev = device_of(*arrays)
    return dev, on_device(dev)


def _run(launches, device_id):
    """Launch each (kernel, grid, args) of ``launches`` in order, 256-thread blocks, on device
    ``device_id`` (the current one)."""
    for kernel, grid, args in launches:
        launch(kernel[0], kernel[1], grid, _BLOCK, args, device_id=device_id)


_SUPPORTED = {}   # shape -> supported(shape): a pure function of the shape
_KERNEL_DTYPES = {}   # dtype -> (dtype in _CTYPE, stats_dtype(dtype))


def _supported(shape):
    reason = _SUPPORTED.get(shape, False)
    if reason is False:
        reason = supported(shape)
        if len(_SUPPORTED) >= 1024:
            _SUPPORTED.clear()
        _SUPPORTED[shape] = reason
    return reason


def _kernel_dtype(dtype):
    """(whether the kernels take dtype, its stats dtype or None), memoized per dtype."""
    entry = _KERNEL_DTYPES.get(dtype)
    if entry is None:
        ok = dtype in _CTYPE
        entry = (ok, stats_dtype(dtype) if ok else None)
        if isinstance(dtype, np.dtype):
            _KERNEL_DTYPES[dtype] = entry
    return entry


def _check_x(x, what, shape4=None):
    """x's type, rank and dtype checked (not its device or contiguity); returns x's stats
    dtype. ``shape4``: the (N, C, H, W) shape the kernels see x as (batchnorm.py passes
    _as4(x.shape) for x of another rank, sparing the views); default x's own."""
    import cupy
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"{what} must be a cupy.ndarray, got {type(x).__name__}")
    if shape4 is None:
        if x.ndim != 4:
            raise ValueError(f"{what} must have shape (N, C, H, W), got shape "
                             f"{tuple(x.shape)}")
        shape4 = x.shape
    ok, sd = _kernel_dtype(x.dtype)
    if not ok:
        raise TypeError(f"{what} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    reason = _supported(shape4)
    if reason is not None:
        raise ValueError(f"{what}: {reason}")
    return sd


def _contiguous(x):
    """x, or a C-contiguous copy on the current device."""
    import cupy
    return x if x.flags.c_contiguous else cupy.ascontiguousarray(x)


def _channel_param(a, C, sd, what, nd=None):
    """``a`` as a contiguous (C,) array of dtype ``sd`` (the original when it already is);
    ``nd``: cupy.ndarray, when the caller has it at hand."""
    if a.__class__ is nd and a.dtype == sd and a.flags.c_contiguous and a.shape == (C,):
        return a                         # the usual case: nothing to convert
    import cupy
    if not isinstance(a, cupy.ndarray):
        a = cupy.asarray(a)
    if a.shape != (C,):
        raise ValueError(f"{what} must have shape ({C},), got {tuple(a.shape)}")
    if a.dtype != sd or not a.flags.c_contiguous:
        a = cupy.ascontiguousarray(a, dtype=sd)
    return a


def _train_forward(x, gamma, beta, eps, running_mean=None, running_var=None, keep=1.0, take=0.0,
                   unbiased=False, var_default=0.0, shape4=None):
    """Two launches (stats, apply with the merge); returns (y, stats), stats the (6, C) block
    of STAT_ROWS. The running rows are keep*running + take*batch (var: unbiased if asked).
    ``shape4``: as _check_x (y then has x's shape)."""
    import cupy
    sd = _check_x(x, "x", shape4)
    if shape4 is None:
        shape4 = x.shape
    nd = cupy.ndarray
    dev, on_device = _device(x, gamma, beta, running_mean, running_var)
    with on_device:
        x = _contiguous(x)
        C = shape4[1]
        gamma = _channel_param(gamma, C, sd, "gamma", nd)
        beta = _channel_param(beta, C, sd, "beta", nd)
        p = _prepared(shape4, x.dtype, vectors_allowed(x), dev)
        part = cupy.ndarray((p.part_size,), sd)
        given = 0
        if running_mean is not None:
            running_mean, given = _channel_param(running_mean, C, sd, "running_mean", nd), 1
        if running_var is not None:
            running_var, given = _channel_param(running_var, C, sd, "running_var", nd), given | 2
        y = cupy.ndarray(x.shape, x.dtype)
        stats = cupy.ndarray((len(STAT_ROWS), C), sd)
        _run(_train_forward_launches(p, x, gamma, beta, eps, running_mean, running_var, given,
                                     keep, take, unbiased, var_default, part, stats, y), dev)
    return y, stats


def _train_forward_launches(p, x, gamma, beta, eps, running_mean, running_var, given, keep, take,
                            unbiased, var_default, part, stats, y):
    """The (kernel, grid, args) of a train forward (2 launches: stats, then apply, whose
    blocks merge the partials and write ``stats``); arrays checked and allocated."""
    scalars = _train_scalars(given, keep, take, p.unbiased if unbiased else 1.0, var_default,
                             eps)
    return ((p.kernels["stats"], p.plan.grid, (x, part, p.C) + p.plan.args),
            (p.kernels["apply_train"], p.plan.grid,
             (x, gamma, beta, part, p.slots,
              part if running_mean is None else running_mean,   # not read unless given
              part if running_var is None else running_var) + scalars
             + (stats, y, p.C) + p.plan.args))


# Packed scalar arguments, by value: (given, keep, take, factor, var_default, eps) -> the
# kernel's (int32, float64 x 5); eps -> the test-mode apply's. Zeros are never keys (0.0 and
# -0.0 compare equal but are different arguments).
_SCALARS = {}
_EVAL_SCALARS = {}


def _train_scalars(given, keep, take, factor, var_default, eps):
    key = (given, keep, take, factor, var_default, eps)
    try:
        packed = _SCALARS.get(key)
    except TypeError:   # an unhashable value: packed per call
        packed, key = None, None
    if packed is None:
        packed = (np.int32(given), np.float64(keep), np.float64(take), np.float64(factor),
                  np.float64(var_default), np.float64(eps))
        if key is not None and keep and take and eps:   # see above; var_default is 0 or 1
            if len(_SCALARS) >= 256:
                _SCALARS.clear()
            _SCALARS[key] = packed
    return packed


_ZERO = np.float64(0.0)
_EVAL_HEAD = (np.int32(0),)
_GIVEN_BOTH = np.int32(3)
_WITH_LO = (np.int32(0), np.int32(1))


def bn_train_forward_gpu(x, gamma, beta, eps):
    """Train-mode batch norm forward: batch statistics, then normalization.

    Inputs:
    - x: cupy array (N, C, H, W), float16/bfloat16/float32/float64
    - gamma, beta: arrays (C,)
    - eps: float, added to the variance

    Returns a tuple of:
    - y: array (N, C, H, W), dtype of x
    - mean, var, invstd: arrays (C,) in the stats dtype; var is biased,
      invstd = 1/sqrt(var + eps)
    """
    y, stats = _train_forward(x, gamma, beta, eps)
    return y, stats[0], stats[1], stats[2]


def running_terms(momentum, convention):
    """(keep, take, unbiased, var_default) of the running-statistics update of
    ``convention``: running = keep*running + take*batch, the batch variance unbiased or not,
    an absent running_var taken as var_default. ValueError for another convention."""
    if convention == "cs231n":
        return momentum, 1 - momentum, False, 0.0
    if convention == "torch":
        return 1 - momentum, momentum, True, 1.0
    raise ValueError(f"convention must be 'cs231n' or 'torch', got {convention!r}")


def bn_train_forward_block_gpu(x, gamma, beta, eps, running_mean, running_var, momentum,
                               convention):
    """bn_train_forward_gpu plus the running-statistics update, in the same two launches,
    with the per-channel results left in one block (no row views made: cheaper on the host).

    Inputs:
    - x, gamma, beta, eps: as bn_train_forward_gpu
    - running_mean, running_var: arrays (C,) or None (None: zeros; running_var under
      'torch': ones); read, never written
    - momentum: float in [0, 1]
    - convention: 'cs231n' (running = m*running + (1-m)*batch, biased var) or 'torch'
      (running = (1-m)*running + m*batch, var times count/(count - 1))

    Returns a tuple of:
    - y: array (N, C, H, W), dtype of x
    - stats: array (6, C) in the stats dtype, rows STAT_ROWS: mean, var (biased), invstd,
      mean_lo, new running_mean, new running_var
    """
    keep, take, unbiased, var_default = running_terms(momentum, convention)
    return _train_forward(x, gamma, beta, eps, running_mean, running_var, keep, take,
                          unbiased, var_default)


def _train_forward_block(x, gamma, beta, eps, running_mean, running_var, momentum, convention,
                         shape4):
    """bn_train_forward_block_gpu on x seen as ``shape4`` (see _check_x): y has x's shape."""
    keep, take, unbiased, var_default = running_terms(momentum, convention)
    return _train_forward(x, gamma, beta, eps, running_mean, running_var, keep, take,
                          unbiased, var_default, shape4)


def bn_train_forward_update_gpu(x, gamma, beta, eps, running_mean, running_var, momentum,
                                convention):
    """bn_train_forward_block_gpu with the rows of its stats block returned separately.

    Returns a tuple of:
    - y, mean, var, invstd: as bn_train_forward_gpu
    - running_mean, running_var: new arrays (C,) in the stats dtype
    """
    y, stats = bn_train_forward_block_gpu(x, gamma, beta, eps, running_mean, running_var,
                                          momentum, convention)
    mean, var, invstd, _, new_mean, new_var = stats
    return y, mean, var, invstd, new_mean, new_var


def bn_eval_forward_stats_gpu(x, gamma, beta, mean, var, eps):
    """Test-mode batch norm forward with given statistics, in one launch.

    Inputs:
    - x: cupy array (N, C, H, W), float16/bfloat16/float32/float64
    - gamma, beta: arrays (C,)
    - mean, var: arrays (C,), the running statistics
    - eps: float, added to var

    Returns a tuple of:
    - y: array (N, C, H, W), dtype of x, (x - mean)/sqrt(var + eps)*gamma + beta
    - mean: the running mean as a contiguous (C,) array in the stats dtype (``mean``
      itself when it already is one)
    - invstd: new array (C,), 1/sqrt(var + eps) in the stats dtype
    """
    return _eval_forward(x, gamma, beta, mean, var, eps)


def _eval_forward(x, gamma, beta, mean, var, eps, shape4=None):
    """bn_eval_forward_stats_gpu; ``shape4`` as _check_x (y then has x's shape)."""
    import cupy
    sd = _check_x(x, "x", shape4)
    if shape4 is None:
        shape4 = x.shape
    nd = cupy.ndarray
    dev, on_device = _device(x, gamma, beta, mean, var)
    with on_device:
        x = _contiguous(x)
        C = shape4[1]
        gamma = _channel_param(gamma, C, sd, "gamma", nd)
        beta = _channel_param(beta, C, sd, "beta", nd)
        mean = _channel_param(mean, C, sd, "mean", nd)
        var = _channel_param(var, C, sd, "var", nd)
        p = _prepared(shape4, x.dtype, vectors_allowed(x), dev)
        y = cupy.ndarray(x.shape, x.dtype)
        invstd = cupy.ndarray((C,), sd)
        _run(_eval_forward_launches(p, x, gamma, beta, mean, var, eps, invstd, y), dev)
    return y, mean, invstd


def _eval_forward_launches(p, x, gamma, beta, mean, var, eps, invstd, y):
    """The (kernel, grid, args) of a test-mode forward: one launch, writing y and invstd
    (the train-mode arguments part, slots, given, keep, take, factors are not read)."""
    try:
        e = _EVAL_SCALARS.get(eps)
        cache = True
    except TypeError:   # an unhashable value: packed per call
        e, cache = None, False
    if e is None:
        e = np.float64(eps)
        if cache and eps:
            if len(_EVAL_SCALARS) >= 256:
                _EVAL_SCALARS.clear()
            _EVAL_SCALARS[eps] = e
    zero = _ZERO
    return ((p.kernels["apply"], p.plan.grid,
             (x, gamma, beta, mean, _EVAL_HEAD[0], mean, var, _GIVEN_BOTH, zero, zero, zero,
              zero, e, invstd, y, p.C) + p.plan.args),)


def bn_eval_forward_gpu(x, gamma, beta, mean, var, eps):
    """Test-mode batch norm forward with given statistics.

    Inputs:
    - x: cupy array (N, C, H, W), float16/bfloat16/float32/float64
    - gamma, beta: arrays (C,)
    - mean, var: arrays (C,), the running statistics
    - eps: float, added to var

    Returns y: array (N, C, H, W), dtype of x, (x - mean)/sqrt(var + eps)*gamma + beta.
    """
    return bn_eval_forward_stats_gpu(x, gamma, beta, mean, var, eps)[0]


def bn_backward_gpu(dout, x, gamma, mean, invstd, train, mean_lo=None):
    """Batch norm backward.

    Inputs:
    - dout: cupy array (N, C, H, W), upstream gradient, dtype of x
    - x: cupy array (N, C, H, W), the forward input
    - gamma: array (C,)
    - mean, invstd: arrays (C,): the batch statistics (train) or the running
      mean and 1/sqrt(running_var + eps) (test)
    - train: bool; in test mode the statistics are constants
    - mean_lo: None (no correction) or array (C,): what rounding ``mean`` lost, the
      forward's mean_lo row (STAT_ROWS); the kernels then use mean + mean_lo, as the
      forward's apply does (a float32 mean of 1e4 is off by up to 5e-4, which with a
      small std shows in dgamma and dx)

    Returns a tuple of:
    - dx: array (N, C, H, W), dtype of x
    - dgamma, dbeta: arrays (C,) in the stats dtype
    """
    return _backward(dout, x, gamma, mean, invstd, train, mean_lo)


def _check_dout_x(dout, x, shape4):
    """(stats dtype, shape4) of a backward launcher's x and dout (one shape and dtype), or
    the checks' errors; shape4 as _check_x (None: x's own shape)."""
    sd = _check_x(x, "x", shape4)
    _check_x(dout, "dout", shape4)
    if dout.shape != x.shape or dout.dtype != x.dtype:
        raise ValueError(f"dout must match x: got dout {tuple(dout.shape)} {dout.dtype}, "
                         f"x {tuple(x.shape)} {x.dtype}")
    return sd, (x.shape if shape4 is None else shape4)


def _stat_params(C, sd, nd, gamma, mean, invstd, mean_lo):
    """gamma, mean, invstd and mean_lo (None stays None) as _channel_param makes them."""
    return tuple(None if a is None else _channel_param(a, C, sd, name, nd)
                 for name, a in (("gamma", gamma), ("mean", mean), ("invstd", invstd),
                                 ("mean_lo", mean_lo)))


def _backward(dout, x, gamma, mean, invstd, train, mean_lo=None, shape4=None):
    """bn_backward_gpu; ``shape4`` as _check_x, for x and dout (dx then has x's shape)."""
    import cupy
    sd, shape4 = _check_dout_x(dout, x, shape4)
    nd = cupy.ndarray
    dev, on_device = _device(dout, x, gamma, mean, invstd, mean_lo)
    with on_device:
        x, dout = _contiguous(x), _contiguous(dout)
        C = shape4[1]
        gamma, mean, invstd, mean_lo = _stat_params(C, sd, nd, gamma, mean, invstd, mean_lo)
        p = _prepared(shape4, x.dtype, vectors_allowed(x, dout), dev)
        dx = cupy.ndarray(x.shape, x.dtype)
        part = cupy.ndarray((p.part_size,), sd)
        dgamma, dbeta = cupy.ndarray((C,), sd), cupy.ndarray((C,), sd)
        _run(_backward_launches(p, dout, x, gamma, mean, invstd, train, part, dx, dgamma, dbeta,
                                mean_lo), dev)
    return dx, dgamma, dbeta


def _backward_launches(p, dout, x, gamma, mean, invstd, train, part, dx, dgamma, dbeta,
                       mean_lo=None):
    """The (kernel, grid, args) of a backward, 2 launches: reduce, then (train) dx, whose
    blocks merge the partials and write dgamma and dbeta, or (test: reduce wrote dx) the
    merge; mean_lo (or None: not read, mean is passed in its place) corrects mean."""
    with_lo = _WITH_LO[mean_lo is not None]
    lo = mean if mean_lo is None else mean_lo
    reduce = (p.kernels["reduce_train" if train else "reduce_test"], p.plan.grid,
              (dout, x, gamma, mean, lo, invstd, part, dx, with_lo, p.C) + p.plan.args)
    if train:
        return (reduce, (p.kernels["dx"], p.plan.grid,
                         (dout, x, gamma, mean, lo, invstd, part, p.slots, dgamma, dbeta, p.count,
                          dx, with_lo, p.C) + p.plan.args))
    return (reduce, (p.kernels["backward_merge"], p.merge_grid,
                     (part, p.C, p.slots, invstd, dgamma, dbeta)))


# ------------------------------------------------------------------ prepared calls
#
# What a warmed call runs (issue 13 §1: a few µs of Python per call). batchnorm.py keeps, per
# kind of call that passed every check before (same classes, shapes, strides and dtypes of
# every array, same parameters), one of these closures; it allocates the outputs and makes
# the launches the checked path (_train_forward, _eval_forward, _backward) makes for such a
# call, with the same arguments -- tests/test_host_cost.py compares them. It checks only what
# may differ between such calls: the arrays' devices (all the closure's, and current) and the
# alignment of x (and dout), and returns None when they differ (the caller then takes the
# checked path). No row views are made: the new running statistics are arrays over rows 4
# and 5 of the stats block (``memptr``), and the backward passes rows 2 and 3 of a train
# cache's block as memory pointers (CuPy takes a MemoryPointer as a pointer argument).

DEPENDENT = []   # tables of prepared calls (batchnorm.py's), emptied by forget_prepared


def _ready_common(shape4, dtype, aligned, device_id):
    import cupy
    p = _prepared(shape4, dtype, aligned, device_id)
    return cupy.ndarray, cupy.cuda.runtime.getDevice, p, p.plan.grid, (p.C,) + p.plan.args


def ready_train_forward(shape4, shape, dtype, aligned, device_id, given, keep, take, unbiased,
                        var_default, eps):
    """``run(x, gamma, beta, running_mean, running_var) -> (y, stats, new_running_mean,
    new_running_var)``, or None (see above), for x of ``shape`` (seen as ``shape4``) and
    ``dtype`` whose pointer is 16-byte ``aligned`` (or only element-aligned), on
    ``device_id``; ``given`` as _train_forward (bit 0: running_mean, bit 1: running_var;
    absent ones are not read and may be None); keep, take, unbiased, var_default as
    running_terms; eps a float."""
    nd, get_device, p, grid, tail = _ready_common(shape4, dtype, aligned, device_id)
    sd = stats_dtype(dtype)
    C = int(shape4[1])
    (k1, n1), (k2, n2) = p.kernels["stats"], p.kernels["apply_train"]
    scalars = _train_scalars(given, keep, take, p.unbiased if unbiased else 1.0, var_default,
                             eps)
    slots, part_shape, stats_shape, row = p.slots, (p.part_size,), (len(STAT_ROWS), C), (C,)
    mean_at = STAT_ROWS.index("running_mean") * C * sd.itemsize
    var_at = STAT_ROWS.index("running_var") * C * sd.itemsize
    itemsize = np.dtype(dtype).itemsize
    has_mean, has_var = bool(given & 1), bool(given & 2)
    block = _BLOCK
    get_stream = sys.modules["cupy"].cuda.get_current_stream

    def run(x, gamma, beta, running_mean, running_var):
        if (x.device.id != device_id or gamma.device.id != device_id
                or beta.device.id != device_id or get_device() != device_id
                or (has_mean and running_mean.device.id != device_id)
                or (has_var and running_var.device.id != device_id)):
            return None
        ptr = x.data.ptr
        if (ptr % 16 == 0) is not aligned or ptr % itemsize:
            return None
        part = nd(part_shape, sd)
        stats = nd(stats_shape, sd)
        y = nd(shape, dtype)
        try:   # launch_here, inlined
            k1(grid, block, (x, part) + tail)
            if compile_module._CHECK_LAUNCHES:
                get_stream().synchronize()
        except Exception as exc:
            raise launch_error(n1, grid, block, device_id, exc) from exc
        try:
            k2(grid, block, (x, gamma, beta, part, slots, running_mean if has_mean else part,
                             running_var if has_var else part) + scalars + (stats, y) + tail)
            if compile_module._CHECK_LAUNCHES:
                get_stream().synchronize()
        except Exception as exc:
            raise launch_error(n2, grid, block, device_id, exc) from exc
        mem = stats.data
        return y, stats, nd(row, sd, memptr=mem + mean_at), nd(row, sd, memptr=mem + var_at)
    return run


def ready_eval_forward(shape4, shape, dtype, aligned, device_id, eps):
    """``run(x, gamma, beta, mean, var) -> (y, invstd)``, or None (see above): the test-mode
    forward (mean and var the running statistics, contiguous (C,) arrays of the stats
    dtype); arguments as ready_train_forward."""
    nd, get_device, p, grid, tail = _ready_common(shape4, dtype, aligned, device_id)
    sd = stats_dtype(dtype)
    kernel, name = p.kernels["apply"]
    e = np.float64(eps)
    zero = _ZERO
    scalars = (_GIVEN_BOTH, zero, zero, zero, zero, e)
    head = _EVAL_HEAD[0]
    row = (int(shape4[1]),)
    itemsize = np.dtype(dtype).itemsize
    block = _BLOCK

    def run(x, gamma, beta, mean, var):
        if (x.device.id != device_id or gamma.device.id != device_id
                or beta.device.id != device_id or mean.device.id != device_id
                or var.device.id != device_id or get_device() != device_id):
            return None
        ptr = x.data.ptr
        if (ptr % 16 == 0) is not aligned or ptr % itemsize:
            return None
        y = nd(shape, dtype)
        invstd = nd(row, sd)
        launch_here(kernel, name, grid, block,
                    (x, gamma, beta, mean, head, mean, var) + scalars + (invstd, y) + tail,
                    device_id)
        return y, invstd
    return run


def ready_backward(shape4, shape, dtype, aligned, device_id, train):
    """``run(dout, x, gamma, a, b) -> (dx, dgamma, dbeta)``, or None (see above): the
    backward of a train cache (``a`` its (6, C) stats block, whose rows mean, invstd and
    mean_lo are read; ``b`` unused) or of a test cache (``a`` the running mean, ``b``
    invstd); ``aligned``: x and dout both 16-byte aligned; else as ready_train_forward."""
    nd, get_device, p, grid, tail = _ready_common(shape4, dtype, aligned, device_id)
    sd = stats_dtype(dtype)
    C = int(shape4[1])
    part_shape, row, slots, count = (p.part_size,), (C,), p.slots, p.count
    invstd_at = STAT_ROWS.index("invstd") * C * sd.itemsize
    lo_at = STAT_ROWS.index("mean_lo") * C * sd.itemsize
    itemsize = np.dtype(dtype).itemsize
    block = _BLOCK
    merge_grid = p.merge_grid
    if train:
        (k1, n1), (k2, n2) = p.kernels["reduce_train"], p.kernels["dx"]
        with_lo = _WITH_LO[True]
    else:
        (k1, n1), (k2, n2) = p.kernels["reduce_test"], p.kernels["backward_merge"]
        with_lo = _WITH_LO[False]
    head = (with_lo,) + tail
    merge_tail = (p.C, slots)

    def run(dout, x, gamma, a, b):
        if (dout.device.id != device_id or x.device.id != device_id
                or gamma.device.id != device_id or a.device.id != device_id
                or (not train and b.device.id != device_id) or get_device() != device_id):
            return None
        px, pd = x.data.ptr, dout.data.ptr
        if (px % 16 == 0 and pd % 16 == 0) is not aligned or px % itemsize or pd % itemsize:
            return None
        dx = nd(shape, dtype)
        part = nd(part_shape, sd)
        dgamma = nd(row, sd)
        dbeta = nd(row, sd)
        if train:
            mem = a.data
            lo, invstd = mem + lo_at, mem + invstd_at
            launch_here(k1, n1, grid, block, (dout, x, gamma, a, lo, invstd, part, dx) + head,
                        device_id)
            launch_here(k2, n2, grid, block,
                        (dout, x, gamma, a, lo, invstd, part, slots, dgamma, dbeta, count, dx)
                        + head, device_id)
        else:
            launch_here(k1, n1, grid, block, (dout, x, gamma, a, a, b, part, dx) + head,
                        device_id)
            launch_here(k2, n2, merge_grid, block, (part,) + merge_tail + (b, dgamma, dbeta),
                        device_id)
        return dx, dgamma, dbeta
    return run


# ------------------------------------------------------- synchronized batch norm (a comm)
#
# With a communicator the statistics cross ranks in one all-gather of per-rank records
# (gpulayers.batchnorm does the collective; these launchers never talk to other ranks):
#
#   forward   stats (this rank's partials) -> bn_stats_merge (this rank's record, (4, C)
#             float64: RECORD_ROWS) -> [all-gather: (K, 4, C)] -> the records as K partial
#             slots (one copy to (4, C, K) in the stats dtype) -> apply (merges the K slots
#             in its fixed order, writes the stats block and y)
#   backward  reduce -> bn_backward_merge (this rank's [dbeta, dgamma], (2, C)) ->
#             [all-reduce] -> dx (the summed shares as one slot; dgamma, dbeta are the sums)
#
# No launcher reads a device value on the host; the global count is a host number (the
# communicator sums the ranks' counts in its host header).

RECORD_ROWS = ("count", "mean", "mean_lo", "m2")   # rows of a rank's statistics record


_MERGE_KERNELS = {}   # (stats dtype, device, get_kernel) -> (handle, expression)


def _merge_kernel(sd, device_id):
    """(handle, expression) of bn_stats_merge for stats dtype ``sd`` on a device (kept per
    get_kernel too: a test that swaps it in does not leave its handles behind)."""
    key = (sd, device_id, get_kernel)
    entry = _MERGE_KERNELS.get(key)
    if entry is None:
        if len(_MERGE_KERNELS) >= 64:
            _MERGE_KERNELS.clear()
        entry = _MERGE_KERNELS[key] = _function(f"bn_stats_merge<{_CTYPE[sd]}>", device_id)
    return entry


def _sync_stats_launches(p, merge, x, part, record):
    """The (kernel, grid, args) of a rank's statistics record: stats (partials), then
    bn_stats_merge (``merge``: its kernel handle) writing ``record`` (4, C) float64."""
    return ((p.kernels["stats"], p.plan.grid, (x, part, p.C) + p.plan.args),
            (merge, p.merge_grid, (part, p.C, p.slots, record)))


def _sync_apply_launches(p, x, gamma, beta, eps, running_mean, running_var, given, keep, take,
                         factor, var_default, slots, ranks, stats, y):
    """The (kernel, grid, args) of the apply with the gathered records as partial slots
    (``slots``: (4, C, ranks) in the stats dtype); ``factor`` multiplies the batch variance
    in the running update (count/(count - 1) over all ranks, or 1)."""
    scalars = _train_scalars(given, keep, take, factor, var_default, eps)
    return ((p.kernels["apply_train"], p.plan.grid,
             (x, gamma, beta, slots, np.int32(ranks),
              slots if running_mean is None else running_mean,
              slots if running_var is None else running_var) + scalars
             + (stats, y, p.C) + p.plan.args),)


def _sync_backward_launches(p, dout, x, gamma, mean, mean_lo, invstd, part, shares):
    """The (kernel, grid, args) of this rank's gradient shares: reduce (train), then
    bn_backward_merge writing ``shares`` (2, C): row 0 sum(dout) (dbeta), row 1
    invstd*sum(dout*(x - mean - mean_lo)) (dgamma)."""
    return ((p.kernels["reduce_train"], p.plan.grid,
             (dout, x, gamma, mean, mean_lo, invstd, part, x, _WITH_LO[1], p.C)   # dx: not written
             + p.plan.args),
            (p.kernels["backward_merge"], p.merge_grid,
             (part, p.C, p.slots, invstd, shares[1], shares[0])))


def _sync_dx_launches(p, dout, x, gamma, mean, mean_lo, invstd, sums, count, scratch, dx):
    """The (kernel, grid, args) of dx from the summed shares: ``sums`` (2, C) holds
    sum(dout) and sum(dout*(x - mean - mean_lo)) over all ranks, read as one partial slot;
    ``count`` the values per channel over all ranks; the kernel's dgamma and dbeta go to
    ``scratch`` (2, C)."""
    return ((p.kernels["dx"], p.plan.grid,
             (dout, x, gamma, mean, mean_lo, invstd, sums, np.int32(1), scratch[0], scratch[1],
              np.float64(count), dx, _WITH_LO[1], p.C) + p.plan.args),)


def sync_stats_gpu(x, shape4=None):
    """This rank's statistics record for synchronized batch norm, in two launches.

    Inputs:
    - x: cupy array (N, C, H, W) (or of another shape seen as ``shape4``, see _check_x),
      float16/bfloat16/float32/float64, at least one value per channel

    Returns:
    - record: new float64 array (4*C,), rows RECORD_ROWS of a (4, C) block: per channel the
      count, the mean rounded to the stats dtype, what that rounding lost (in the stats
      dtype) and M2 (centred sum of squares), from the kernels' Chan merges
    """
    import cupy
    sd = _check_x(x, "x", shape4)
    if shape4 is None:
        shape4 = x.shape
    dev, on_device = _device(x)
    with on_device:
        x = _contiguous(x)
        p = _prepared(shape4, x.dtype, vectors_allowed(x), dev)
        part = cupy.ndarray((p.part_size,), sd)
        record = cupy.ndarray((len(RECORD_ROWS) * shape4[1],), np.float64)
        _run(_sync_stats_launches(p, _merge_kernel(sd, dev), x, part, record), dev)
    return record


def sync_train_forward_gpu(x, gamma, beta, eps, records, total, running_mean, running_var,
                           momentum, convention, shape4=None):
    """Normalize x with the statistics of all ranks, from their gathered records.

    Inputs:
    - x, gamma, beta, eps: as bn_train_forward_gpu (x possibly seen as ``shape4``)
    - records: float64 array (K, 4*C) (or (K*4*C,)): every rank's sync_stats_gpu record,
      in rank order
    - total: int, values per channel over all ranks (host number, > 1)
    - running_mean, running_var, momentum, convention: as bn_train_forward_block_gpu (the
      'torch' running variance uses total/(total - 1))

    Returns a tuple of:
    - y: array of x's shape and dtype
    - stats: array (6, C) in the stats dtype, rows STAT_ROWS, the same on every rank
    """
    import cupy
    sd = _check_x(x, "x", shape4)
    if shape4 is None:
        shape4 = x.shape
    if convention == "cs231n":
        keep, take, factor, var_default = momentum, 1 - momentum, 1.0, 0.0
    elif convention == "torch":
        keep, take, var_default = 1 - momentum, momentum, 1.0
        factor = total / (total - 1) if total > 1 else 1.0
    else:
        raise ValueError(f"convention must be 'cs231n' or 'torch', got {convention!r}")
    nd = cupy.ndarray
    C = shape4[1]
    rows = len(RECORD_ROWS)
    if records.size % (rows * C):
        raise ValueError(f"records must hold {rows}*C = {rows * C} values per rank, got "
                         f"shape {tuple(records.shape)}")
    ranks = records.size // (rows * C)
    dev, on_device = _device(x, gamma, beta, records, running_mean, running_var)
    with on_device:
        x = _contiguous(x)
        gamma = _channel_param(gamma, C, sd, "gamma", nd)
        beta = _channel_param(beta, C, sd, "beta", nd)
        given = 0
        if running_mean is not None:
            running_mean, given = _channel_param(running_mean, C, sd, "running_mean", nd), 1
        if running_var is not None:
            running_var, given = _channel_param(running_var, C, sd, "running_var", nd), given | 2
        # the records as the apply kernels' partial slots: (4, C, ranks) in the stats dtype
        slots = cupy.ascontiguousarray(records.reshape(ranks, rows, C).transpose(1, 2, 0),
                                       dtype=sd)
        p = _prepared(shape4, x.dtype, vectors_allowed(x), dev)
        y = cupy.ndarray(x.shape, x.dtype)
        stats = cupy.ndarray((len(STAT_ROWS), C), sd)
        _run(_sync_apply_launches(p, x, gamma, beta, eps, running_mean, running_var, given,
                                  keep, take, factor, var_default, slots, ranks, stats, y), dev)
    return y, stats


def sync_backward_shares_gpu(dout, x, gamma, mean, invstd, mean_lo, shape4=None):
    """This rank's shares of dbeta and dgamma for synchronized batch norm, in two launches.

    Inputs:
    - dout, x: cupy arrays of one shape (seen as ``shape4``) and dtype
    - gamma, mean, invstd, mean_lo: arrays (C,): the statistics of all ranks (the
      forward's stats rows mean, invstd and mean_lo)

    Returns:
    - shares: new array (2*C,) in the stats dtype: [sum(dout), invstd*sum(dout*(x - mean -
      mean_lo))] over this rank's values, per channel (dbeta, dgamma)
    """
    import cupy
    sd, shape4 = _check_dout_x(dout, x, shape4)
    nd = cupy.ndarray
    C = shape4[1]
    dev, on_device = _device(dout, x, gamma, mean, invstd, mean_lo)
    with on_device:
        x, dout = _contiguous(x), _contiguous(dout)
        gamma, mean, invstd, mean_lo = _stat_params(C, sd, nd, gamma, mean, invstd, mean_lo)
        p = _prepared(shape4, x.dtype, vectors_allowed(x, dout), dev)
        part = cupy.ndarray((p.part_size,), sd)
        shares = cupy.ndarray((2, C), sd)
        _run(_sync_backward_launches(p, dout, x, gamma, mean, mean_lo, invstd, part, shares),
             dev)
    return shares.reshape(-1)


def sync_backward_dx_gpu(dout, x, gamma, mean, invstd, mean_lo, totals, count, shape4=None):
    """Train-mode dx of synchronized batch norm from the summed shares, in one launch (and
    one small division).

    Inputs:
    - dout, x, gamma, mean, invstd, mean_lo: as sync_backward_shares_gpu
    - totals: array (2*C,): sync_backward_shares_gpu's shares summed over all ranks
      ([dbeta, dgamma] of the whole batch)
    - count: int, values per channel over all ranks

    Returns:
    - dx: array of x's shape and dtype
    """
    import cupy
    sd = _check_x(x, "x", shape4)
    if shape4 is None:
        shape4 = x.shape
    nd = cupy.ndarray
    C = shape4[1]
    dev, on_device = _device(dout, x, gamma, mean, invstd, mean_lo, totals)
    with on_device:
        x, dout = _contiguous(x), _contiguous(dout)
        gamma, mean, invstd, mean_lo = _stat_params(C, sd, nd, gamma, mean, invstd, mean_lo)
        t = totals.reshape(2, C)
        sums = cupy.ndarray((2, C), sd)   # the dx kernel's one slot: sum(dout), sum(dout*xmu)
        sums[0] = t[0]
        sums[1] = t[1] / invstd
        p = _prepared(shape4, x.dtype, vectors_allowed(x, dout), dev)
        dx = cupy.ndarray(x.shape, x.dtype)
        scratch = cupy.ndarray((2, C), sd)
        _run(_sync_dx_launches(p, dout, x, gamma, mean, mean_lo, invstd, sums, count, scratch,
                               dx), dev)
    return dx
