"""Launchers for the max-pooling CUDA kernels in ``maxpool.cu``.

Importable without CuPy or a GPU: CuPy is imported by the launchers.
Each kernel is a template ``<T, Off, Idx, ...>``: value type (``__half``, ``__nv_bfloat16``,
``float``, ``double``), offset type (``geom.offset_dtype``), index type (``int``, or
``long long`` when a tensor has 2**31 elements or more, see :func:`index_type`),
then the variant's compile-time knobs. :data:`NAME_EXPRESSIONS` lists every
instantiation; one compile serves them all.

Expressions compile in groups of one value and index type (:func:`compile_group`), so a
program that pools one dtype compiles only its kernels. bfloat16 has the default kernels and
the variant kernels of :data:`DEFAULT_VARIANT`'s plane count only (:data:`BF16_PLANES`); a
bfloat16 plan for another plane count runs the default kernels (same bits).

Variants: :data:`VARIANT` (or a launcher's ``variant=`` argument, merged over it) picks the
kernel and launch shape of each pass; every variant gives the same bits. Forward keys:
``kernel`` ('generic'; 'pairs': 2x2 stride-2 unpadded windows on an even W, read as aligned
pairs), ``taps`` (3; 2 unrolls 2x2 taps when the window is at most 2x2), ``planes`` (1, 2 or 4
planes per thread and loop step), ``block`` (threads per block), ``blocks_per_sm`` (resident
blocks per multiprocessor the grid aims at; None: one y block per plane group). Backward keys:
``kernel`` ('element': one thread per dx element; 'blocks': one thread per 2x2 block of dx, for
stride 2 when at most 2 windows per axis cover a block), ``planes``, ``block``,
``blocks_per_sm``. A variant that does not fit the geometry, or whose vector accesses would
meet a pointer not aligned to 2 elements (a contiguous view at an odd element offset), falls
back to the default kernel with the same launch knobs (see :func:`forward_plan`,
:func:`backward_plan`).

Launches: a plane smaller than a thread block shares the block with others
(:func:`plane_slots`; ``launch_config(..., packed=True)``), so most launched threads have
work on small planes (:func:`thread_utilisation`). That layout is a compile-time choice
(maxpool.cu's template argument Packed, instantiated for PACKED_KERNELS only): a plan takes
it only for a plane smaller than its block; planes of a block or more run the unpacked
kernels, the code and launch of one plane per block. A call on a warmed geometry makes one cache lookup (key: pass,
geometry, dtype, device, the current VARIANT by change count, the ``variant`` argument) that
holds the kernel, grid and packed scalar arguments per alignment; a first call, arrays on
another device than the current one, or a wrong argument take the checked path.

Devices: a launcher runs on the device of its arrays (``compile.device_of``; arrays on two
devices are a ValueError naming them), allocates its outputs there and compiles and launches
for that device, whichever device is current.
"""
from __future__ import annotations

import functools

import numpy as np

from ..shapes import check_floating
from . import compile as cuda_compile

__all__ = ["max_pool_forward_gpu", "max_pool_backward_gpu", "index_type", "kernel_expression",
           "launch_config", "scalar_args", "forward_plan", "backward_plan", "pairs_aligned",
           "VARIANT", "DEFAULT_VARIANT", "SOURCE", "NAME_EXPRESSIONS", "compile_group",
           "plane_slots", "busy_threads", "thread_utilisation"]

SOURCE = "maxpool.cu"

KERNELS = ("max_pool2d_forward", "max_pool2d_backward", "max_pool2d_backward_disjoint")
VALUE_TYPES = cuda_compile.CTypes(float16="__half", bfloat16="__nv_bfloat16", float32="float",
                                  float64="double")
OFFSET_TYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
                np.dtype(np.uint32): "unsigned int"}
INDEX_TYPES = {"int": np.int32, "long long": np.int64}

# Variant kernels: (kernel, extra template arguments), instantiated for uint8 offsets only
# (the windows they serve have at most 9 taps).
PLANES = (1, 2, 4)
VARIANT_KERNELS = (
    [("max_pool2d_forward", (taps, planes)) for taps in (2, 3) for planes in PLANES
     if (taps, planes) != (3, 1)]
    + [("max_pool2d_forward_pairs", (planes,)) for planes in PLANES]
    + [(kernel, (planes,)) for kernel in KERNELS[1:] for planes in PLANES if planes > 1]
    + [("max_pool2d_backward_blocks", (2, nw, planes)) for nw in (1, 2) for planes in PLANES])

# bfloat16 instantiates the variants with this many planes per step only (DEFAULT_VARIANT's),
# to keep compile time down; its plans for other counts run the default kernels.
BF16_PLANES = (4,)
_BF16 = "__nv_bfloat16"

NAME_EXPRESSIONS = tuple(f"{kernel}<{value}, {offset}, {index}>"
                         for kernel in KERNELS
                         for value in VALUE_TYPES.values()
                         for offset in OFFSET_TYPES.values()
                         for index in INDEX_TYPES) + tuple(
    f"{kernel}<{value}, unsigned char, {index}, {', '.join(map(str, params))}>"
    for kernel, params in VARIANT_KERNELS
    for value in VALUE_TYPES.values()
    for index in INDEX_TYPES
    if value != _BF16 or params[-1] in BF16_PLANES)

# Packed kernels (maxpool.cu's walk(), template argument Packed = true: planes smaller than a
# thread block share it): the variants of PACKED_PLANES planes per step only (DEFAULT_VARIANT's,
# what the launchers pick for small planes under the default knobs, every dtype), to keep
# compile time down. A plan for a plane smaller than its block takes the packed kernel where
# one is instantiated; every other plan, and every plane of a block or more, runs the
# unpacked kernel (Packed = false, the code of one plane per block).
PACKED_PLANES = (4,)
PACKED_KERNELS = frozenset((kernel, params) for kernel, params in VARIANT_KERNELS
                           if params[-1] in PACKED_PLANES)
NAME_EXPRESSIONS += tuple(
    f"{kernel}<{value}, unsigned char, {index}, {', '.join(map(str, params))}, true>"
    for kernel, params in VARIANT_KERNELS if (kernel, params) in PACKED_KERNELS
    for value in VALUE_TYPES.values()
    for index in INDEX_TYPES)

_BLOCK = 256
_MAX_THREADS_X = 2**30       # blockDim.x * gridDim.x at most this, below 2**31
_MAX_GRID_Y = 65535
_BLOCKS_PER_SM = 32          # a few waves of resident blocks; each thread then visits many planes

# Chosen from scripts/tune_pool.py on an NVIDIA H200, 2026-11-26 (benchmarks/README.md): the
# best single setting over the 3x3/2 pad 1 and 2x2/2 cases in float32 and float16, within
# 1.10x of each case's own best. Where 'pairs', taps 2 or 'blocks' do not fit a geometry,
# the generic kernels run with the same launch knobs.
DEFAULT_VARIANT = {
    "forward": {"kernel": "pairs", "taps": 2, "planes": 4, "block": _BLOCK,
                "blocks_per_sm": _BLOCKS_PER_SM},
    "backward": {"kernel": "blocks", "planes": 4, "block": _BLOCK,
                 "blocks_per_sm": _BLOCKS_PER_SM},
}


class _Knobs(dict):
    """VARIANT's per-pass dicts: plain dicts that count every change (in _Knobs.changes, one
    counter for all), so a launcher's cache key names the current knobs by (id, count) instead
    of a frozen copy made per call."""

    changes = 0

    def _changed(self):
        _Knobs.changes += 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._changed()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def __ior__(self, other):
        super().__ior__(other)
        self._changed()
        return self

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key, default=None):
        value = super().setdefault(key, default)
        self._changed()
        return value

    def pop(self, *args):
        value = super().pop(*args)
        self._changed()
        return value

    def popitem(self):
        item = super().popitem()
        self._changed()
        return item

    def clear(self):
        super().clear()
        self._changed()


# The variant the launchers use; replace entries (e.g. VARIANT["forward"]["planes"] = 2) or pass
# variant={"forward": {...}} to a launcher. Measured choices belong in DEFAULT_VARIANT. (Its
# per-pass dicts count their changes, see _Knobs; a plain dict put in their place also works,
# at the cost of a frozen copy per call.)
VARIANT = {key: _Knobs(value) for key, value in DEFAULT_VARIANT.items()}


def index_type(geom):
    """C index type for geom's kernels: ``'long long'`` when the input or the
    output (and offsets) has 2**31 elements or more, else ``'int'``."""
    largest = geom.N * geom.C * max(geom.H * geom.W, geom.Ho * geom.Wo)
    return "long long" if largest >= 2**31 else "int"


def kernel_expression(kernel, dtype, geom, params=()):
    """Name expression of ``kernel`` for values of ``dtype`` and geometry geom, with the extra
    template arguments ``params`` of a variant, e.g.
    ``'max_pool2d_forward<float, unsigned char, int>'``,
    ``'max_pool2d_backward_blocks<float, unsigned char, int, 2, 2, 4>'``."""
    dtype = np.dtype(dtype)
    if dtype not in VALUE_TYPES:
        raise TypeError(f"max-pool kernels take float16, bfloat16, float32 or float64, "
                        f"got {dtype}")
    extra = "".join(f", {p}" for p in params)
    return (f"{kernel}<{VALUE_TYPES[dtype]}, {OFFSET_TYPES[geom.offset_dtype]}, "
            f"{index_type(geom)}{extra}>")


def _options(pass_, variant):
    """Knobs of pass_ ('forward' or 'backward'): VARIANT's, updated by variant[pass_]."""
    options = dict(VARIANT[pass_])
    extra = (variant or {}).get(pass_, {})
    unknown = set(extra) - set(DEFAULT_VARIANT[pass_])
    if unknown:
        raise ValueError(f"unknown {pass_} variant keys {sorted(unknown)}; "
                         f"known: {sorted(DEFAULT_VARIANT[pass_])}")
    options.update(extra)
    if options["planes"] not in PLANES:
        raise ValueError(f"planes must be one of {PLANES}, got {options['planes']!r}")
    if not (isinstance(options["block"], int) and 32 <= options["block"] <= 1024
            and options["block"] % 32 == 0):
        raise ValueError(f"block must be a multiple of 32 in [32, 1024], "
                         f"got {options['block']!r}")
    return options


def _plan(kernel, params, plane, planes, options):
    """A plan; packed (params gain the template argument 'true') when the plane is smaller
    than the block and the kernel has a packed instantiation (PACKED_KERNELS)."""
    params = tuple(params)
    packed = 0 < plane < options["block"] and (kernel, params) in PACKED_KERNELS
    return {"kernel": kernel, "params": params + ("true",) if packed else params,
            "plane": plane, "planes_per_step": planes, "block": options["block"],
            "blocks_per_sm": options["blocks_per_sm"], "packed": packed}


def _variant_planes(dtype, planes):
    """Whether dtype has the variant kernels of ``planes`` planes per step (see BF16_PLANES)."""
    return dtype is None or VALUE_TYPES[dtype] != _BF16 or planes in BF16_PLANES


def forward_plan(geom, variant=None, *, aligned=True, dtype=None):
    """What the forward launcher runs for geom under VARIANT updated by ``variant``: a dict
    with kernel, params (extra template arguments), plane (positions per plane),
    planes_per_step, block, blocks_per_sm and packed (the kernel shares blocks between planes:
    a plane smaller than the block and a kernel in PACKED_KERNELS; then params end with
    'true', maxpool.cu's Packed). Variants need uint8 offsets; 'pairs' needs
    2x2 stride-2 unpadded undilated windows, an even W, 2 * Ho <= H and ``aligned`` (x's data
    aligned to 2 elements: the launcher passes what it sees, see :func:`pairs_aligned`); taps
    2 needs a window of at most 2x2; otherwise the default kernel (with the launch knobs)
    runs. ``dtype`` (the values'; None: any) matters for bfloat16, which has the variants of
    BF16_PLANES only: its other plane counts run the default kernel."""
    options = _options("forward", variant)
    plane = geom.Ho * geom.Wo
    if options["kernel"] not in ("generic", "pairs"):
        raise ValueError(f"forward kernel must be 'generic' or 'pairs', "
                         f"got {options['kernel']!r}")
    if geom.offset_dtype != np.uint8 or not _variant_planes(dtype, options["planes"]):
        return _plan("max_pool2d_forward", (), plane, 1, options)
    planes = options["planes"]
    if (options["kernel"] == "pairs" and aligned
            and (geom.kh, geom.kw, geom.sh, geom.sw) == (2, 2, 2, 2)
            and (geom.ph, geom.pw, geom.dh, geom.dw) == (0, 0, 1, 1) and geom.W % 2 == 0
            and 2 * geom.Ho <= geom.H and 2 * geom.Wo <= geom.W):
        return _plan("max_pool2d_forward_pairs", (planes,), plane, planes, options)
    if options["taps"] not in (2, 3):
        raise ValueError(f"taps must be 2 or 3, got {options['taps']!r}")
    taps = 2 if options["taps"] == 2 and geom.kh <= 2 and geom.kw <= 2 else 3
    params = () if (taps, planes) == (3, 1) else (taps, planes)
    return _plan("max_pool2d_forward", params, plane, planes, options)


def _block_windows(kernel, stride, pad, dilation):
    """Windows along one axis that cover a stride-aligned block of `stride` input positions."""
    return (pad + stride - 1) // stride + (-(pad - (kernel - 1) * dilation) // stride) + 1


def backward_plan(geom, variant=None, *, aligned=True, dtype=None):
    """What the backward launcher runs for geom (see :func:`forward_plan`). 'blocks' needs
    uint8 offsets, stride 2 on both axes, at most 2 windows per axis covering a 2x2 block
    (e.g. 3x3 stride 2 with any padding, 2x2 stride 2) and, for an even W (where it stores dx
    rows as pairs), ``aligned`` (dx's data aligned to 2 elements; it reads dout and offsets
    element by element); otherwise the 'element' kernels run: max_pool2d_backward for
    overlapping windows, max_pool2d_backward_disjoint otherwise (``dtype``: as for
    forward_plan)."""
    options = _options("backward", variant)
    if options["kernel"] not in ("element", "blocks"):
        raise ValueError(f"backward kernel must be 'element' or 'blocks', "
                         f"got {options['kernel']!r}")
    element = "max_pool2d_backward" if geom.overlapping else "max_pool2d_backward_disjoint"
    if geom.offset_dtype != np.uint8 or not _variant_planes(dtype, options["planes"]):
        return _plan(element, (), geom.H * geom.W, 1, options)
    planes = options["planes"]
    if options["kernel"] == "blocks" and geom.sh == geom.sw == 2 and (aligned or geom.W % 2):
        nw = max(_block_windows(geom.kh, 2, geom.ph, geom.dh),
                 _block_windows(geom.kw, 2, geom.pw, geom.dw))
        if nw <= 2:
            blocks = -(-geom.H // 2) * -(-geom.W // 2)
            return _plan("max_pool2d_backward_blocks", (2, nw, planes), blocks, planes, options)
    return _plan(element, (planes,) if planes > 1 else (), geom.H * geom.W, planes, options)


def scalar_args(geom):
    """The kernels' scalar arguments with their exact C types:
    planes (Idx), then H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw (int).

    Raises ValueError when a size or a padded size (H + 2*ph, W + 2*pw: the kernels form
    padded positions in int) is 2**31 or more."""
    dims = (geom.H, geom.W, geom.Ho, geom.Wo, geom.kh, geom.kw,
            geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw)
    if max(dims + (geom.H + 2 * geom.ph, geom.W + 2 * geom.pw)) >= 2**31:
        raise ValueError(f"max-pool kernels take sizes and padded sizes below 2**31: "
                         f"{geom.describe()}")
    planes = INDEX_TYPES[index_type(geom)](geom.N * geom.C)
    return (planes,) + tuple(np.int32(d) for d in dims)


def plane_slots(plane, block):
    """Planes that share one thread block in maxpool.cu's kernels (walk()): block // plane
    when a plane has fewer positions than the block has threads, else 1."""
    return block // plane if 0 < plane < block else 1


def launch_config(plane, planes, sm_count, block=_BLOCK, blocks_per_sm=_BLOCKS_PER_SM,
                  planes_per_step=1, *, packed=False):
    """(grid, block) for ``planes`` planes of ``plane`` positions each, a thread taking
    ``planes_per_step`` planes per loop step: x walks a plane, y the plane groups, about
    ``blocks_per_sm`` blocks per multiprocessor in all (None: one y block per group).

    ``packed``: the kernel puts :func:`plane_slots` planes into one block when a plane is
    smaller than a block (maxpool.cu's kernels do; pool_nd.cu's do not), so y counts runs of
    that many plane groups. A plane of a block or more gets the same launch either way."""
    gx = min(-(-plane // block), _MAX_THREADS_X // block)
    groups = -(-planes // planes_per_step)
    if packed:
        groups = -(-groups // plane_slots(plane, block))
    gy = min(groups, _MAX_GRID_Y)
    if blocks_per_sm is not None:
        gy = min(gy, max(1, -(-sm_count * blocks_per_sm // gx)))
    return (gx, gy, 1), (block, 1, 1)


def busy_threads(plane, planes, grid, block, planes_per_step=1, *, packed=True):
    """Threads of a launch of maxpool.cu's kernels (``grid``, ``block`` as launch_config gives
    them) that have work, i.e. whose first (position, plane) is in range (see walk());
    ``packed``: of the packed kernels (else one plane per block)."""
    (gx, gy, _), (bx, _, _) = grid, block
    slots = plane_slots(plane, bx) if packed else 1
    groups = -(-planes // planes_per_step)         # slot s of y block b starts at group b*slots+s
    busy_slots = min(gy * slots, groups)
    return min(gx * bx, plane) * busy_slots


def thread_utilisation(geom, pass_, variant=None, *, dtype=None, aligned=True, sm_count=132):
    """Share of the launched threads that have work in pass_ ('forward' or 'backward') for
    geom, under VARIANT updated by ``variant`` (``dtype``, ``aligned``: as for forward_plan;
    ``sm_count``: multiprocessors, 132 on an H200). 1.0 for an empty batch."""
    if pass_ not in ("forward", "backward"):
        raise ValueError(f"pass_ must be 'forward' or 'backward', got {pass_!r}")
    plan_of = forward_plan if pass_ == "forward" else backward_plan
    plan = plan_of(geom, variant, aligned=aligned, dtype=dtype)
    planes = geom.N * geom.C
    if planes == 0:
        return 1.0
    grid, block = launch_config(plan["plane"], planes, sm_count, plan["block"],
                                plan["blocks_per_sm"], plan["planes_per_step"],
                                packed=plan["packed"])
    launched = grid[0] * grid[1] * block[0]
    return busy_threads(plan["plane"], planes, grid, block, plan["planes_per_step"],
                        packed=plan["packed"]) / launched


@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    import cupy
    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


@functools.lru_cache(maxsize=None)
def compile_group(expression):
    """The name expressions compiled in one module with ``expression``: every one in
    NAME_EXPRESSIONS with the same value type and index type."""
    def key(e):
        args = [a.strip() for a in e[e.index("<") + 1:-1].split(",")]
        return args[0], args[2]
    group = tuple(e for e in NAME_EXPRESSIONS if key(e) == key(expression))
    if expression not in group:
        raise ValueError(f"{expression!r} is not in NAME_EXPRESSIONS")
    return group


def _frozen(knobs):
    return tuple(sorted(knobs.items())) if knobs else ()


def pairs_aligned(*arrays):
    """True when every array's data pointer is a multiple of 2 elements (``.data.ptr`` of a
    CuPy array): what the vector kernels need of the arrays they read or write as pairs."""
    return all(a.data.ptr % (2 * a.dtype.itemsize) == 0 for a in arrays)


def _plan_launch(pass_, geom, dtype, extra, device_id, aligned):
    """(function, expression, grid, block, scalar args) of pass_ for geom and dtype under the
    current VARIANT[pass_] updated by ``extra`` (frozen), on device ``device_id``, with the
    vector kernels' arrays ``aligned`` (see :func:`pairs_aligned`): what a launch needs beyond
    its arrays. Compiles on first use (compile.get_kernel keeps the module)."""
    plan_of = forward_plan if pass_ == "forward" else backward_plan
    plan = plan_of(geom, {pass_: dict(extra)}, aligned=aligned, dtype=dtype)
    expression = kernel_expression(plan["kernel"], dtype, geom, plan["params"])
    function = cuda_compile.get_kernel(SOURCE, expression, compile_group(expression),
                                       device_id=device_id)
    grid, block = launch_config(plan["plane"], geom.N * geom.C, _sm_count(device_id),
                                plan["block"], plan["blocks_per_sm"], plan["planes_per_step"],
                                packed=plan["packed"])
    return function, expression, grid, block, scalar_args(geom)


class _Prepared(dict):
    """The launchers' cache: {key: _Call}, key = (pass_, geom, dtype, device id, knobs, extra)
    where knobs names the current VARIANT[pass_] (``(id, _Knobs.changes)``, or its frozen items
    when it is a plain dict) and extra is the frozen ``variant[pass_]`` of the call (None without
    one). A warmed call makes one lookup here. Cleared whole when it passes _CACHE_SIZE entries
    (e.g. after many VARIANT changes); ``cache_clear()`` empties it (the tests do, after
    swapping compile.get_kernel)."""

    def cache_clear(self):
        self.clear()

    def clear(self):
        super().clear()
        for table in DEPENDENT:   # prepared calls made from the entries (see ready_forward)
            table.clear()


_CACHE_SIZE = 512
_prepared = _Prepared()


class _Call:
    """What a launch of one cache key needs beyond its arrays: the shapes and offset dtype the
    arrays must have, and per alignment of the vector kernels' arrays (index 0: not aligned, 1:
    aligned) the (function, expression, grid, block, scalar args) of _plan_launch, made on
    first use. (An empty batch, N*C == 0, launches nothing and has no entry.)"""

    __slots__ = ("input_shape", "output_shape", "offset_dtype", "launches")

    def __init__(self, geom):
        self.input_shape = geom.input_shape
        self.output_shape = geom.output_shape
        self.offset_dtype = geom.offset_dtype
        self.launches = [None, None]


def _key(pass_, geom, dtype, device_id, variant):
    knobs = VARIANT[pass_]
    return (pass_, geom, dtype, device_id,
            (id(knobs), _Knobs.changes) if knobs.__class__ is _Knobs else _frozen(knobs),
            _frozen(variant.get(pass_)) if variant else None)


def _launch(pass_, variant, dtype, geom, arrays, device_id, aligned):
    """Launch pass_ on ``arrays`` (checked by the caller), filling the cache entry: the path
    of a call that missed the cache."""
    if geom.N * geom.C == 0:
        return
    key = _key(pass_, geom, dtype, device_id, variant)
    call = _prepared.get(key)
    if call is None:
        if len(_prepared) >= _CACHE_SIZE:
            _prepared.clear()
        call = _Call(geom)
        _prepared[key] = call
    launch = call.launches[aligned]
    if launch is None:
        launch = _plan_launch(pass_, geom, dtype, _frozen((variant or {}).get(pass_)),
                              device_id, aligned)
        call.launches[aligned] = launch
    function, expression, grid, block, scalars = launch
    cuda_compile.launch(function, expression, grid, block, tuple(arrays) + scalars,
                        device_id=device_id)


def _check_cupy(a, name):
    import cupy
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")


def max_pool_forward_gpu(x, geom, variant=None):
    """Max pooling with the CUDA kernel.

    Inputs:
    - x: cupy array (N, C, H, W), float16/bfloat16/float32/float64, any strides (not
      modified)
    - geom: PoolGeometry of x
    - variant: optional {"forward": {knob: value}} over VARIANT (see the module docstring)

    Returns a tuple of:
    - out: cupy array (N, C, Ho, Wo), dtype of x, on x's device
    - offsets: cupy array (N, C, Ho, Wo) of geom.offset_dtype, compact argmax offsets, on x's
      device
    """
    import cupy
    # Warmed geometry, x on the current device: one cache lookup, then allocate and launch.
    # Anything else (first call, another device, a wrong argument) takes the checked path.
    if isinstance(x, cupy.ndarray):
        device_id = x.device.id
        if device_id == cupy.cuda.runtime.getDevice():
            x = cupy.ascontiguousarray(x)
            dtype = x.dtype
            knobs = VARIANT["forward"]
            call = _prepared.get((
                "forward", geom, dtype, device_id,
                (id(knobs), _Knobs.changes) if knobs.__class__ is _Knobs else _frozen(knobs),
                _frozen(variant.get("forward")) if variant else None))
            if call is not None and x.shape == call.input_shape:
                launch = call.launches[x.data.ptr % (2 * dtype.itemsize) == 0]
                if launch is not None:
                    out = cupy.empty(call.output_shape, dtype=dtype)
                    offsets = cupy.empty(call.output_shape, dtype=call.offset_dtype)
                    function, expression, grid, block, scalars = launch
                    cuda_compile.launch(function, expression, grid, block,
                                        (x, out, offsets) + scalars, device_id=device_id)
                    return out, offsets
    return _forward(x, geom, variant)


def _forward(x, geom, variant):
    """max_pool_forward_gpu with every check, filling the launch cache."""
    import cupy
    _check_cupy(x, "x")
    check_floating(x, "x")
    if tuple(x.shape) != geom.input_shape:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected {geom.input_shape}: "
                         f"{geom.describe()}")
    device_id = cuda_compile.device_of(x=x)
    with cuda_compile.on_device(device_id):
        x = cupy.ascontiguousarray(x)
        out = cupy.empty(geom.output_shape, dtype=x.dtype)
        offsets = cupy.empty(geom.output_shape, dtype=geom.offset_dtype)
        _launch("forward", variant, x.dtype, geom, (x, out, offsets), device_id,
                pairs_aligned(x))
    return out, offsets


def max_pool_backward_gpu(dout, offsets, geom, variant=None):
    """Backward pass of max pooling with the CUDA kernels: deterministic (fixed summation
    order, no atomics) and every element of dx written by the kernel.

    Inputs:
    - dout: cupy array (N, C, Ho, Wo), float16/bfloat16/float32/float64, any strides (not
      modified)
    - offsets: cupy array (N, C, Ho, Wo) of geom.offset_dtype, from the forward pass, on
      dout's device (else ValueError)
    - geom: PoolGeometry
    - variant: optional {"backward": {knob: value}} over VARIANT (see the module docstring)

    Returns:
    - dx: cupy array (N, C, H, W), dtype of dout, on dout's device
    """
    import cupy
    # As max_pool_forward_gpu: a warmed geometry with both arrays on the current device makes
    # one cache lookup; anything else takes the checked path.
    ndarray = cupy.ndarray
    if isinstance(dout, ndarray) and isinstance(offsets, ndarray):
        device_id = dout.device.id
        if device_id == offsets.device.id and device_id == cupy.cuda.runtime.getDevice():
            dout = cupy.ascontiguousarray(dout)
            offsets = cupy.ascontiguousarray(offsets)
            dtype = dout.dtype
            knobs = VARIANT["backward"]
            call = _prepared.get((
                "backward", geom, dtype, device_id,
                (id(knobs), _Knobs.changes) if knobs.__class__ is _Knobs else _frozen(knobs),
                _frozen(variant.get("backward")) if variant else None))
            if (call is not None and dout.shape == call.output_shape
                    and offsets.shape == call.output_shape
                    and offsets.dtype == call.offset_dtype):
                dx = cupy.empty(call.input_shape, dtype=dtype)
                launch = call.launches[dx.data.ptr % (2 * dtype.itemsize) == 0]
                if launch is not None:
                    function, expression, grid, block, scalars = launch
                    cuda_compile.launch(function, expression, grid, block,
                                        (dout, offsets, dx) + scalars, device_id=device_id)
                    return dx
    return _backward(dout, offsets, geom, variant)


def _backward(dout, offsets, geom, variant):
    """max_pool_backward_gpu with every check, filling the launch cache."""
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
    device_id = cuda_compile.device_of(dout=dout, offsets=offsets)
    with cuda_compile.on_device(device_id):
        dout = cupy.ascontiguousarray(dout)
        offsets = cupy.ascontiguousarray(offsets)
        dx = cupy.empty(geom.input_shape, dtype=dout.dtype)
        _launch("backward", variant, dout.dtype, geom, (dout, offsets, dx), device_id,
                pairs_aligned(dx))
    return dx


# ------------------------------------------------------------------ prepared calls
#
# What a warmed call of gpulayers.pooling runs (issue 13 §1): per (pass, geometry, dtype,
# device, alignment) a closure that allocates the outputs and makes the launch of the cache
# entry above, checking only what may differ between calls whose arrays passed every check
# before (same classes, shapes, strides, dtypes): the devices, the alignment, and that
# VARIANT is unchanged. It returns None when any differs (the caller then takes the checked
# path). Tables of such closures are listed in DEPENDENT and emptied with _prepared.

DEPENDENT = []


def _ready(pass_, geom, dtype, device_id, aligned):
    """(knobs, changes, the launch entry's (function, expression, grid, block, scalars)) of
    pass_ on the current VARIANT, or None when VARIANT[pass_] is not a _Knobs (unversioned)
    or the entry is not made yet."""
    knobs = VARIANT[pass_]
    if knobs.__class__ is not _Knobs:
        return None
    call = _prepared.get(_key(pass_, geom, dtype, device_id, None))
    launch = None if call is None else call.launches[aligned]
    return None if launch is None else (knobs, _Knobs.changes, launch)


def ready_forward(geom, dtype, device_id, aligned):
    """``run(x) -> (out, offsets)``, or None (see above), for a C-contiguous x of
    geom.input_shape and ``dtype`` on ``device_id`` whose pointer is (``aligned``) or is not a
    multiple of 2 elements; None when there is no warmed launch for it yet."""
    import cupy
    ready = _ready("forward", geom, dtype, device_id, aligned)
    if ready is None or geom.N * geom.C == 0:
        return None
    knobs, changes, (function, expression, grid, block, scalars) = ready
    nd, get_device, variant = cupy.ndarray, cupy.cuda.runtime.getDevice, VARIANT
    shape, offset_dtype, pair = geom.output_shape, geom.offset_dtype, 2 * dtype.itemsize
    launch = cuda_compile.launch_here

    def run(x):
        if (variant["forward"] is not knobs or _Knobs.changes != changes
                or x.device.id != device_id or get_device() != device_id
                or (x.data.ptr % pair == 0) is not aligned):
            return None
        out = nd(shape, dtype)
        offsets = nd(shape, offset_dtype)
        launch(function, expression, grid, block, (x, out, offsets) + scalars, device_id)
        return out, offsets
    return run


def ready_backward(geom, dtype, device_id):
    """``run(dout, offsets) -> dx``, or None (see above), for C-contiguous dout and offsets of
    geom.output_shape (dout of ``dtype``, offsets of geom.offset_dtype) on ``device_id``; None
    when there is no warmed launch for them yet (dx's alignment picks the launch)."""
    import cupy
    entries = [_ready("backward", geom, dtype, device_id, aligned) for aligned in (0, 1)]
    if entries == [None, None] or geom.N * geom.C == 0:
        return None
    knobs = next(e[0] for e in entries if e is not None)
    changes = next(e[1] for e in entries if e is not None)
    launches = [None if e is None else e[2] for e in entries]
    nd, get_device, variant = cupy.ndarray, cupy.cuda.runtime.getDevice, VARIANT
    shape, pair = geom.input_shape, 2 * dtype.itemsize
    launch = cuda_compile.launch_here

    def run(dout, offsets):
        if (variant["backward"] is not knobs or _Knobs.changes != changes
                or dout.device.id != device_id or offsets.device.id != device_id
                or get_device() != device_id):
            return None
        dx = nd(shape, dtype)
        entry = launches[dx.data.ptr % pair == 0]
        if entry is None:
            return None
        function, expression, grid, block, scalars = entry
        launch(function, expression, grid, block, (dout, offsets, dx) + scalars, device_id)
        return dx
    return run
