"""Host cost of gpulayers' own Python per public call, on the CPU (issue 13 §1).

A do-nothing stand-in for CuPy is installed as ``sys.modules['cupy']``: its arrays carry
shape, dtype, strides, flags, ``data.ptr`` and ``device.id`` but no memory, allocation and
kernel launches do nothing. So what is timed is gpulayers' Python from the public entry to
the kernel launch -- parameter checks, dispatch, plans, argument packing -- and nothing of
CuPy or the GPU. Each case runs on a warmed geometry (plans and caches filled by earlier
calls); the figure is the median over repeats of the mean time of ``--calls`` calls, in µs.

    PYTHONPATH=. python benchmarks/host_cost.py            # table
    PYTHONPATH=. python benchmarks/host_cost.py --json out.json

The stand-in is also used by tests/test_host_cost.py (the machinery, tiny counts, no timing
asserts) and tests/test_no_sync.py (``strict=True``: every synchronising access raises).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

__all__ = ["make_standin", "installed", "SyncError", "cases", "measure", "main"]

_LIMIT_ALIGN = 256


class SyncError(RuntimeError):
    """A device value was read on the host (stand-in CuPy in strict mode)."""


def make_standin(strict=False, n_devices=1):
    """A module that looks enough like CuPy for gpulayers' kernel paths; nothing runs.

    ``strict``: every synchronising access (.get, .item, .tolist, bool/float/int/index of an
    array, __array__, asnumpy, Stream/Event/Device.synchronize) is recorded in
    ``module.syncs`` and raises SyncError (unless ``module.allow_sync`` is True, then it is
    recorded and returns zeros). ``module.launches`` counts kernel launches.
    """
    cp = types.ModuleType("cupy")
    cp.__version__ = "0.0-standin"
    cp.syncs = []
    cp.launches = [0]
    cp.launched = []
    cp.allow_sync = not strict
    cp.record = strict
    state = {"device": 0, "ptr": 1 << 20}
    _cstrides = {}
    _flags = {}

    def sync(what):
        if cp.record:
            cp.syncs.append(what)
        if not cp.allow_sync:
            raise SyncError(f"host read of a device value: {what}")

    class _Flags:
        __slots__ = ("c_contiguous", "f_contiguous", "owndata")

        def __init__(self, c):
            self.c_contiguous = c
            self.f_contiguous = False
            self.owndata = c

    class _Mem:
        """cupy.cuda.MemoryPointer: ``ptr``, and ``+ offset`` (bytes) for a pointer into the
        same allocation (a kernel takes one as a pointer argument, as CuPy does)."""

        __slots__ = ("ptr",)

        def __init__(self, ptr):
            self.ptr = ptr

        def __add__(self, offset):
            return _Mem(self.ptr + offset)

    class Device:
        def __init__(self, device=None):
            self.id = state["device"] if device is None else int(device)

        def __enter__(self):
            self._previous = state["device"]
            state["device"] = self.id
            return self

        def __exit__(self, *exc):
            state["device"] = self._previous
            return False

        def synchronize(self):
            sync("Device.synchronize")

        def __eq__(self, other):
            return isinstance(other, Device) and other.id == self.id

        def __hash__(self):
            return self.id

    _devices = [Device(i) for i in range(max(1, n_devices))]

    def c_strides(shape, itemsize):
        key = (shape, itemsize)
        s = _cstrides.get(key)
        if s is None:
            s, acc = [], itemsize
            for n in reversed(shape):
                s.append(acc)
                acc *= max(n, 1)
            s = _cstrides[key] = tuple(reversed(s))
        return s

    def is_c(shape, strides, itemsize):
        key = (shape, strides, itemsize)
        c = _flags.get(key)
        if c is None:
            c, acc = True, itemsize
            for n, st in zip(reversed(shape), reversed(strides)):
                if n != 1 and st != acc:
                    c = False
                    break
                acc *= n
            c = _flags[key] = _Flags(c)
        return c

    def _size(shape):
        n = 1
        for s in shape:
            n *= s
        return n

    class ndarray:
        """A CuPy array's metadata; no memory behind it."""

        __slots__ = ("shape", "dtype", "strides", "ndim", "size", "flags", "data", "device")
        __array_priority__ = 1000
        __array_ufunc__ = None

        def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
            if shape.__class__ is not tuple:
                shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
            _fill(self, shape, dtype)
            if memptr is not None:        # a view of existing memory (no allocation)
                self.data = memptr
            if strides is not None:
                self.strides = tuple(strides)
                self.flags = is_c(self.shape, self.strides, self.dtype.itemsize)

        itemsize = property(lambda self: self.dtype.itemsize)
        nbytes = property(lambda self: self.size * self.dtype.itemsize)
        T = property(lambda self: self.transpose())

        def __len__(self):
            return self.shape[0]

        def __repr__(self):
            return f"standin.ndarray(shape={self.shape}, dtype={self.dtype})"

        # ---- views
        def reshape(self, *shape, order="C"):
            if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
                shape = shape[0]
            shape = tuple(int(s) for s in shape)
            if -1 in shape:
                known = _size(s for s in shape if s != -1)
                shape = tuple(self.size // max(known, 1) if s == -1 else s for s in shape)
            if _size(shape) != self.size:
                raise ValueError(f"cannot reshape array of size {self.size} into shape {shape}")
            if shape == self.shape:
                return self
            return _view(self, shape, c_strides(shape, self.dtype.itemsize), 0)

        def ravel(self):
            return self.reshape(-1)

        def transpose(self, *axes):
            if not axes:
                axes = tuple(reversed(range(self.ndim)))
            elif len(axes) == 1 and not isinstance(axes[0], (int, np.integer)):
                axes = tuple(axes[0])
            return _view(self, tuple(self.shape[a] for a in axes),
                         tuple(self.strides[a] for a in axes), 0)

        def __getitem__(self, key):
            if not isinstance(key, tuple):
                key = (key,)
            if any(isinstance(k, ndarray) for k in key):
                return _new(self.shape, self.dtype)   # fancy indexing: a new array
            shape, strides, offset, axis = [], [], 0, 0
            expand = [k for k in key if k is Ellipsis]
            if expand:
                i = key.index(Ellipsis)
                fill = self.ndim - (len(key) - 1 - sum(k is None for k in key))
                key = key[:i] + (slice(None),) * fill + key[i + 1:]
            for k in key:
                if k is None:
                    shape.append(1)
                    strides.append(0)
                    continue
                n, st = self.shape[axis], self.strides[axis]
                if isinstance(k, slice):
                    start, stop, step = k.indices(n)
                    m = len(range(start, stop, step))
                    shape.append(m)
                    strides.append(st * step)
                    offset += start * st
                else:
                    k = int(k)
                    offset += (k + n if k < 0 else k) * st
                axis += 1
            shape += self.shape[axis:]
            strides += self.strides[axis:]
            return _view(self, tuple(shape), tuple(strides), offset)

        def __setitem__(self, key, value):
            pass

        # ---- new arrays
        def astype(self, dtype, copy=True, order="K"):
            dtype = np.dtype(dtype)
            if dtype == self.dtype and not copy:
                return self
            return _new(self.shape, dtype)

        def copy(self, order="C"):
            return _new(self.shape, self.dtype)

        def _reduce(self, axis=None, dtype=None, out=None, keepdims=False):
            dtype = self.dtype if dtype is None else np.dtype(dtype)
            if axis is None:
                return _new((), dtype)
            axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
            axes = {a % self.ndim for a in axes}
            shape = tuple(1 if keepdims else n for i, n in enumerate(self.shape)
                          if i not in axes or keepdims)
            return _new(shape, dtype)

        sum = min = max = mean = _reduce

        def any(self, axis=None):
            return self._reduce(axis, np.bool_)

        all = any

        def fill(self, value):
            pass

        # ---- synchronising reads
        def get(self, stream=None, order="C", out=None):
            sync("ndarray.get")
            return np.zeros(self.shape, self.dtype)

        def item(self):
            sync("ndarray.item")
            return self.dtype.type(0).item()

        def tolist(self):
            sync("ndarray.tolist")
            return np.zeros(self.shape, self.dtype).tolist()

        def __bool__(self):
            sync("ndarray.__bool__")
            return False

        def __float__(self):
            sync("ndarray.__float__")
            return 0.0

        def __int__(self):
            sync("ndarray.__int__")
            return 0

        def __index__(self):
            sync("ndarray.__index__")
            return 0

        def __array__(self, dtype=None, copy=None):
            sync("ndarray.__array__")
            return np.zeros(self.shape, self.dtype if dtype is None else dtype)

        def __iter__(self):
            sync("ndarray.__iter__")
            return iter(())

    def _init(a, shape, dtype, strides, ptr, device):
        a.shape, a.dtype, a.strides, a.ndim = shape, dtype, strides, len(shape)
        a.size = _size(shape)
        a.flags = is_c(shape, strides, dtype.itemsize)
        a.data = _Mem(ptr)
        a.device = device

    _news = {}

    def _new(shape, dtype):
        """A new array: its (shape, dtype) metadata is made once, then only a pointer moves."""
        a = object.__new__(ndarray)
        _fill(a, shape, dtype)
        return a

    def _fill(a, shape, dtype):
        key = (shape, dtype)
        meta = _news.get(key)
        if meta is None:
            shape = tuple(int(s) for s in shape)
            dtype = np.dtype(dtype)
            strides = c_strides(shape, dtype.itemsize)
            size = _size(shape)
            meta = _news[key] = (shape, dtype, strides, len(shape), size,
                                 is_c(shape, strides, dtype.itemsize),
                                 (size * dtype.itemsize // _LIMIT_ALIGN + 1) * _LIMIT_ALIGN)
        a.shape, a.dtype, a.strides, a.ndim, a.size, a.flags, step = meta
        ptr = state["ptr"]
        state["ptr"] = ptr + step
        a.data = _Mem(ptr)
        dev = state["device"]
        a.device = _devices[dev] if dev < len(_devices) else Device(dev)

    def _view(a, shape, strides, offset):
        v = object.__new__(ndarray)
        _init(v, shape, a.dtype, strides, a.data.ptr + offset, a.device)
        return v

    def _binary(op):
        def method(self, other):
            oshape = getattr(other, "shape", ())
            odtype = getattr(other, "dtype", None)
            shape = np.broadcast_shapes(self.shape, tuple(oshape))
            if op in ("eq", "ne", "lt", "le", "gt", "ge", "and", "or"):
                dtype = np.bool_ if op not in ("and", "or") or self.dtype == np.bool_ else \
                    self.dtype
            else:
                dtype = np.result_type(self.dtype, odtype if odtype is not None else
                                       np.min_scalar_type(other) if np.isscalar(other)
                                       else self.dtype)
                if odtype is None and np.isscalar(other):   # NEP 50: a Python scalar is weak
                    dtype = self.dtype if (isinstance(other, int) or self.dtype.kind == "f") \
                        else dtype
            return _new(shape, dtype)
        return method

    for name, op in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("truediv", "div"),
                     ("floordiv", "div"), ("mod", "mod"), ("pow", "pow"), ("and", "and"),
                     ("or", "or"), ("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"),
                     ("gt", "gt"), ("ge", "ge")):
        fn = _binary(op)
        setattr(ndarray, f"__{name}__", fn)
        if name not in ("eq", "ne", "lt", "le", "gt", "ge"):
            setattr(ndarray, f"__r{name}__", fn)
            setattr(ndarray, f"__i{name}__", fn)
    ndarray.__hash__ = None
    ndarray.__neg__ = lambda self: _new(self.shape, self.dtype)
    cp.ndarray = ndarray

    def empty(shape, dtype=float, order="C"):
        if shape.__class__ is not tuple:
            shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
        return _new(shape, dtype)

    def full(shape, fill_value, dtype=None, order="C"):
        return empty(shape, np.asarray(fill_value).dtype if dtype is None else dtype)

    def asarray(a, dtype=None, order=None):
        if isinstance(a, ndarray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        a = np.asarray(a, dtype=dtype)            # host data: an upload, no sync
        return _new(a.shape, a.dtype)

    def ascontiguousarray(a, dtype=None):
        if not isinstance(a, ndarray):
            return asarray(a, dtype)
        if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return _new(a.shape, a.dtype if dtype is None else dtype)

    def moveaxis(a, source, destination):
        order = [i for i in range(a.ndim) if i != source % a.ndim]
        order.insert(destination % a.ndim, source % a.ndim)
        return a.transpose(order)

    def asnumpy(a, stream=None):
        if isinstance(a, ndarray):
            sync("cupy.asnumpy")
            return np.zeros(a.shape, a.dtype)
        return np.asarray(a)

    def get_array_module(*args):
        return cp if any(isinstance(a, ndarray) for a in args) else np

    cp.empty = empty
    cp.empty_like = lambda a, dtype=None: _new(a.shape, a.dtype if dtype is None else dtype)
    cp.zeros = cp.ones = empty
    cp.zeros_like = cp.ones_like = cp.empty_like
    cp.full = full
    cp.asarray = cp.array = asarray
    cp.ascontiguousarray = ascontiguousarray
    cp.moveaxis = moveaxis
    cp.asnumpy = asnumpy
    cp.get_array_module = get_array_module
    cp.arange = lambda n, dtype=np.int64: _new((int(n),), dtype)
    cp.broadcast_to = lambda a, shape: _view(a, tuple(shape), (0,) * len(shape), 0)
    cp.where = lambda c, a, b: _new(np.broadcast_shapes(*(getattr(v, "shape", ())
                                                          for v in (c, a, b))),
                                    np.result_type(*(getattr(v, "dtype", np.float32)
                                                     for v in (a, b))))
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                 "uint16", "uint32", "uint64", "bool_"):
        setattr(cp, name, getattr(np, name))
    cp.dtype = np.dtype

    _arg_types = (ndarray, _Mem, int, float, bool, type(None), np.generic)

    class RawKernel:
        """A kernel that does nothing when launched (counted in ``launches``). In strict mode
        every launch is also recorded in ``launched`` as (name, grid, block, args), and its
        arguments are checked as CuPy's launcher takes them (arrays, memory pointers, None,
        Python and NumPy scalars; a tuple grid and block): TypeError otherwise."""

        def __init__(self, code="", name="", options=(), **kwargs):
            self.name = name

        def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
            cp.launches[0] += 1
            if cp.record:
                if grid.__class__ is not tuple or block.__class__ is not tuple:
                    raise TypeError(f"{self.name}: grid and block must be tuples, got "
                                    f"{grid!r}, {block!r}")
                bad = [type(a).__name__ for a in args if not isinstance(a, _arg_types)]
                if bad:
                    raise TypeError(f"{self.name}: unsupported kernel argument types {bad}")
                cp.launched.append((self.name, grid, block, tuple(args)))

    class RawModule:
        def __init__(self, code=None, options=(), name_expressions=(), **kwargs):
            self.names = tuple(name_expressions)

        def compile(self, *args, **kwargs):
            return None

        def get_function(self, name):
            return RawKernel(name=name)

    cp.RawKernel = RawKernel
    cp.RawModule = RawModule

    class Stream:
        def __init__(self, non_blocking=False, null=False):
            pass

        def synchronize(self):
            sync("Stream.synchronize")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            sync("Event.synchronize")

    _stream = Stream()

    class CompileException(Exception):
        pass

    runtime = types.SimpleNamespace(
        getDevice=lambda: state["device"],
        getDeviceCount=lambda: max(1, n_devices),
        setDevice=lambda i: state.__setitem__("device", int(i)),
        getDeviceProperties=lambda i: {"name": b"stand-in", "major": 9, "minor": 0,
                                       "totalGlobalMem": 2**37, "multiProcessorCount": 132},
        deviceSynchronize=lambda: sync("runtime.deviceSynchronize"))
    cp.cuda = types.SimpleNamespace(
        Device=Device, runtime=runtime, Stream=Stream, Event=Event,
        get_current_stream=lambda: _stream,
        compiler=types.SimpleNamespace(CompileException=CompileException))
    cp.RawKernel = RawKernel
    return cp


_KERNEL_CACHES = ("gpulayers.cuda.pool_kernels:_prepared", "gpulayers.cuda.pool_kernels:_sm_count",
                  "gpulayers.cuda.pool_nd_kernels:_prepared",
                  "gpulayers.cuda.pool_nd_kernels:_sm_count",
                  "gpulayers.cuda.bn_kernels:_prepared", "gpulayers.cuda.bn_kernels:_num_sms")


def _clear_caches():
    import importlib

    from gpulayers import backend
    backend._probe_cupy.cache_clear()
    for spec in _KERNEL_CACHES:
        mod, name = spec.split(":")
        fn = getattr(importlib.import_module(mod), name, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()
    for mod in ("gpulayers.cuda.bn_kernels", "gpulayers.cuda.pool_kernels"):
        for table in getattr(importlib.import_module(mod), "DEPENDENT", ()):
            table.clear()    # prepared calls made from the plans just dropped
    prepared = getattr(importlib.import_module("gpulayers.cuda.compile"), "_PREPARED", None)
    if isinstance(prepared, dict):
        prepared.clear()


@contextlib.contextmanager
def installed(strict=False, n_devices=1):
    """Install a stand-in CuPy (see make_standin) as ``sys.modules['cupy']`` for the block:
    gpulayers' backend probes it as usable, its arrays count as CuPy arrays, and
    ``compile.get_kernel`` hands out kernels that do nothing. Everything is restored after
    (the launch plans made with the stand-in are dropped)."""
    from gpulayers import backend
    from gpulayers.cuda import bn_kernels
    from gpulayers.cuda import compile as cuda_compile
    cp = make_standin(strict=strict, n_devices=n_devices)
    saved_mod = sys.modules.get("cupy", None)
    had_mod = "cupy" in sys.modules
    saved_get = cuda_compile.get_kernel
    saved_bn_get = bn_kernels.get_kernel
    saved_current = backend._current
    saved_checks = cuda_compile.set_launch_checks(False)

    def get_kernel(name, expression, all_expressions, device_id=None):
        return cp.RawKernel(name=expression)

    sys.modules["cupy"] = cp
    cuda_compile.get_kernel = get_kernel
    bn_kernels.get_kernel = get_kernel
    _clear_caches()
    try:
        if backend.cupy_unusable_reason() is not None:
            raise RuntimeError(f"stand-in CuPy is not usable: {backend.cupy_unusable_reason()}")
        yield cp
    finally:
        cuda_compile.get_kernel = saved_get
        bn_kernels.get_kernel = saved_bn_get
        cuda_compile.set_launch_checks(saved_checks)
        if had_mod:
            sys.modules["cupy"] = saved_mod
        else:
            sys.modules.pop("cupy", None)
        backend._current = saved_current
        _clear_caches()


# ----------------------------------------------------------------------------- cases

POOL_SHAPE = (32, 64, 56, 56)
BN_SHAPE = (32, 64, 56, 56)
BN1D_SHAPE = (256, 512)


def cases(cp):
    """{name: zero-argument callable}: one public call each, on a stand-in array, with the
    earlier calls of the same case having warmed its geometry."""
    import gpulayers as G
    from gpulayers import backend
    from gpulayers import layers as L
    x = cp.empty(POOL_SHAPE, np.float32)
    p22 = {"pool_height": 2, "pool_width": 2, "stride": 2}
    p33 = {"pool_height": 3, "pool_width": 3, "stride": 2, "pad": 1}
    out22, c22 = G.max_pool_forward(x, p22)
    out33, c33 = G.max_pool_forward(x, p33)
    d22, d33 = cp.empty(out22.shape, np.float32), cp.empty(out33.shape, np.float32)

    xb = cp.empty(BN_SHAPE, np.float32)
    C = BN_SHAPE[1]
    gamma, beta = cp.empty(C, np.float32), cp.empty(C, np.float32)
    rm, rv = cp.empty(C, np.float32), cp.empty(C, np.float32)
    train = {"mode": "train", "running_mean": rm, "running_var": rv}
    test = {"mode": "test", "running_mean": rm, "running_var": rv}
    _, ctrain = G.spatial_batchnorm_forward(xb, gamma, beta, dict(train))
    _, ctest = G.spatial_batchnorm_forward(xb, gamma, beta, dict(test))
    dy = cp.empty(BN_SHAPE, np.float32)

    x1 = cp.empty(BN1D_SHAPE, np.float32)
    g1, b1 = cp.empty(BN1D_SHAPE[1], np.float32), cp.empty(BN1D_SHAPE[1], np.float32)
    p1 = {"mode": "train"}
    _, c1 = G.batchnorm_forward(x1, g1, b1, dict(p1))
    dy1 = cp.empty(BN1D_SHAPE, np.float32)

    with backend.use_backend("cupy"):
        pool_layer = L.MaxPool2d(3, stride=2, padding=1)
        bn_layer = L.BatchNorm2d(C)
        bn_eval = L.BatchNorm2d(C).eval()
    pool_layer.forward(x)
    bn_layer.forward(xb)
    bn_eval.forward(xb)

    def bn_train_call():
        # a layer-free train call writes the running stats back into its bn_param: use one
        # dict per call, as a training loop reusing one dict would see the same work
        return G.spatial_batchnorm_forward(xb, gamma, beta, train)

    return {
        "max_pool_forward 2x2/2": lambda: G.max_pool_forward(x, p22),
        "max_pool_backward 2x2/2": lambda: G.max_pool_backward(d22, c22),
        "max_pool_forward 3x3/2 p1": lambda: G.max_pool_forward(x, p33),
        "max_pool_backward 3x3/2 p1": lambda: G.max_pool_backward(d33, c33),
        "spatial_batchnorm_forward train": bn_train_call,
        "spatial_batchnorm_backward train": lambda: G.spatial_batchnorm_backward(dy, ctrain),
        "spatial_batchnorm_forward test": lambda: G.spatial_batchnorm_forward(xb, gamma, beta,
                                                                              test),
        "spatial_batchnorm_backward test": lambda: G.spatial_batchnorm_backward(dy, ctest),
        "batchnorm_forward train (N, D)": lambda: G.batchnorm_forward(x1, g1, b1, p1),
        "batchnorm_backward train (N, D)": lambda: G.batchnorm_backward(dy1, c1),
        "MaxPool2d.forward 3x3/2 p1": lambda: pool_layer.forward(x),
        "MaxPool2d.backward 3x3/2 p1": lambda: pool_layer.backward(d33),
        "BatchNorm2d.forward train": lambda: bn_layer.forward(xb),
        "BatchNorm2d.backward train": lambda: bn_layer.backward(dy),
        "BatchNorm2d.forward eval": lambda: bn_eval.forward(xb),
        "BatchNorm2d.backward eval": lambda: bn_eval.backward(dy),
    }


def _launchers(cp):
    """The launchers of gpulayers.cuda called directly (not gpulayers' public Python): what
    of each public row is spent in pool_kernels.py / bn_kernels.py."""
    from gpulayers.cuda import bn_kernels, pool_kernels
    from gpulayers.shapes import pool_geometry
    x = cp.empty(POOL_SHAPE, np.float32)
    g33 = pool_geometry(POOL_SHAPE, {"pool_height": 3, "pool_width": 3, "stride": 2, "pad": 1})
    out, off = pool_kernels.max_pool_forward_gpu(x, g33)
    d33 = cp.empty(out.shape, np.float32)
    C = BN_SHAPE[1]
    xb, dy = cp.empty(BN_SHAPE, np.float32), cp.empty(BN_SHAPE, np.float32)
    gamma, beta = cp.empty(C, np.float32), cp.empty(C, np.float32)
    rm, rv = cp.empty(C, np.float32), cp.empty(C, np.float32)
    _, stats = bn_kernels.bn_train_forward_block_gpu(xb, gamma, beta, 1e-5, rm, rv, 0.9,
                                                     "cs231n")
    mean, invstd, lo = stats[0], stats[2], stats[3]
    return {
        "launcher: pool_kernels.max_pool_forward_gpu 3x3/2 p1":
            lambda: pool_kernels.max_pool_forward_gpu(x, g33),
        "launcher: pool_kernels.max_pool_backward_gpu 3x3/2 p1":
            lambda: pool_kernels.max_pool_backward_gpu(d33, off, g33),
        "launcher: bn_kernels.bn_train_forward_block_gpu":
            lambda: bn_kernels.bn_train_forward_block_gpu(xb, gamma, beta, 1e-5, rm, rv, 0.9,
                                                          "cs231n"),
        "launcher: bn_kernels.bn_eval_forward_stats_gpu":
            lambda: bn_kernels.bn_eval_forward_stats_gpu(xb, gamma, beta, rm, rv, 1e-5),
        "launcher: bn_kernels.bn_backward_gpu train":
            lambda: bn_kernels.bn_backward_gpu(dy, xb, gamma, mean, invstd, True, mean_lo=lo),
        "launcher: bn_kernels.bn_backward_gpu test":
            lambda: bn_kernels.bn_backward_gpu(dy, xb, gamma, rm, invstd, False),
    }


def _floor(cp):
    """What the stand-in itself costs per call of the kind the ops make: an allocation and a
    launch of a kernel with 13 arguments (subtract nothing: this is for reading the table)."""
    k = cp.RawKernel(name="k")
    a = cp.empty((4,), np.float32)
    args = (a, a, a) + tuple(np.int32(i) for i in range(10))
    return {"stand-in: cupy.empty": lambda: cp.empty((32, 64, 28, 28), np.float32),
            "stand-in: launch 13 args": lambda: k((1, 1, 1), (256, 1, 1), args)}


def measure(fn, calls=2000, repeats=15, warmup=50):
    """(median, min) over ``repeats`` of the mean µs per call of ``calls`` calls of fn (the
    min is the steadier figure on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    loop = range(calls)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in loop:
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times), min(times)


def run(calls=2000, repeats=15, warmup=50, only=None):
    """{case: (median, min) µs per call} for every case (and the stand-in's own floor)."""
    with installed() as cp:
        table = {**cases(cp), **_launchers(cp), **_floor(cp)}
        return {name: measure(fn, calls, repeats, warmup) for name, fn in table.items()
                if only is None or any(o in name for o in only)}


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per repeat (default 2000)")
    ap.add_argument("--repeats", type=int, default=15, help="repeats; the median is shown")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--only", nargs="*", help="substrings of case names to run")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--limit", type=float, default=5.0, help="µs budget per call (table mark)")
    args = ap.parse_args(argv)
    if min(args.calls, args.repeats) < 1:
        ap.error("--calls and --repeats must be >= 1")
    results = run(args.calls, args.repeats, args.warmup, args.only)
    width = max(map(len, results))
    print(f"{'case':{width}}  median µs   min µs")
    for name, (us, best) in results.items():
        mark = "" if ":" in name or us <= args.limit else "  > budget"
        print(f"{name:{width}}  {us:9.2f}  {best:7.2f}{mark}")
    if args.json:
        doc = {"commit": _commit(), "python": platform.python_version(),
               "numpy": np.__version__, "machine": platform.machine(),
               "processor": platform.processor() or platform.machine(),
               "calls": args.calls, "repeats": args.repeats, "limit_us": args.limit,
               "us_per_call": {k: v[0] for k, v in results.items()},
               "min_us_per_call": {k: v[1] for k, v in results.items()}}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
