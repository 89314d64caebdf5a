"""Compile the package's ``.cu`` sources with CuPy, once per device, and launch them.

Nothing here imports CuPy at module import time: the first call does.
Kernels are C++ templates instantiated through ``RawModule(name_expressions=...)``;
a module is compiled on first use and kept per (source, expressions, device), and CuPy's
own disk cache (``CUPY_CACHE_DIR``) keeps the binaries across processes. A module that
failed to compile is not compiled again: the failure is kept and raised again on every
later request, as the same :class:`KernelLaunchError`.

Launches run on the device of their arrays (:func:`device_of`, checked by the
launchers) and on that device's current stream, with no host synchronisation. A
kernel that faults does so asynchronously, and CUDA reports it at some later call;
with launch checks on (:func:`set_launch_checks`, or ``GPULAYERS_CHECK_LAUNCHES=1``
in the environment at import) every launch is followed by a stream synchronisation,
so a fault is raised at once as a KernelLaunchError naming the kernel. That is for
debugging: it costs a round trip per launch.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from importlib import resources
from pathlib import Path

__all__ = ["source", "get_kernel", "launch", "launch_here", "launch_error", "device_of",
           "on_device", "KernelLaunchError", "OPTIONS", "cuda_include_dir", "set_launch_checks",
           "launch_checks", "CTypes", "dtype_name"]

# Options used for every compile; the NVRTC check in the tests uses the same.
OPTIONS = ("-std=c++17",)


_DTYPE_NAMES = {}   # {np.dtype: name}: np.dtype(...).name builds the string on every call


def dtype_name(dtype):
    """NumPy's name of ``dtype`` ('float32', 'bfloat16', ...); a str is taken as a name, so
    'bfloat16' needs no ml_dtypes import."""
    if isinstance(dtype, str):
        return dtype
    name = _DTYPE_NAMES.get(dtype) if dtype.__class__ is not type else None
    if name is None:
        import numpy as np
        name = np.dtype(dtype).name
        if isinstance(dtype, np.dtype):
            _DTYPE_NAMES[dtype] = name
    return name


class CTypes(dict):
    """{dtype name: C type}, looked up by a dtype, a type or a name (see :func:`dtype_name`):
    ``CTypes(float32="float")[np.float32] == "float"``; bfloat16 (ml_dtypes.bfloat16, which
    CuPy >= 14 holds) is found by its name, without importing ml_dtypes."""

    def __getitem__(self, dtype):
        return super().__getitem__(dtype_name(dtype))

    def __contains__(self, dtype):
        try:
            return super().__contains__(dtype_name(dtype))
        except TypeError:
            return False

    def get(self, dtype, default=None):
        return self[dtype] if dtype in self else default


class KernelLaunchError(RuntimeError):
    """A CUDA kernel failed to compile or launch; the message names the kernel."""


_CHECK_LAUNCHES = os.environ.get("GPULAYERS_CHECK_LAUNCHES", "0") not in ("", "0")


def set_launch_checks(on):
    """Synchronise after every launch and raise a fault at once, naming the kernel (True),
    or launch asynchronously (False, the default). Returns the previous setting."""
    global _CHECK_LAUNCHES
    previous, _CHECK_LAUNCHES = _CHECK_LAUNCHES, bool(on)
    return previous


def launch_checks():
    """Whether every launch is followed by a synchronisation (see set_launch_checks)."""
    return _CHECK_LAUNCHES


@functools.lru_cache(maxsize=None)
def source(name):
    """Text of ``gpulayers/cuda/<name>`` (a .cu file shipped as package data)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def cuda_include_dir():
    """Include folder of NVIDIA's pip wheels that holds cuda_fp16.h, or None.

    CuPy normally finds the CUDA headers itself (CUDA_PATH); this is the
    fallback when it does not, and the folder the NVRTC check in CI uses.
    """
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:  # a namespace package: cu13/include, or cuda_runtime/include
        for pattern in ("cu*/include/cuda_fp16.h", "cuda_runtime/include/cuda_fp16.h"):
            for header in sorted(Path(root).glob(pattern)):
                return header.parent
    return None


def device_of(*arrays, **named):
    """The id of the one CUDA device that holds every CuPy array of ``arrays`` and
    ``named`` (other entries, None and NumPy arrays, are ignored); the current device when
    there is none.

    Raises ValueError when they sit on different devices, naming the arrays: by position
    (``arrays``) or by their keyword (``named``), with their shapes and devices.
    """
    cupy = _cupy()
    nd = cupy.ndarray
    device = None
    for a in arrays + tuple(named.values()):   # the usual case in one pass
        if isinstance(a, nd):
            d = a.device.id
            if device is None:
                device = d
            elif d != device:
                break
    else:
        return cupy.cuda.runtime.getDevice() if device is None else device
    if named:
        where = ", ".join(f"{name} {tuple(a.shape)} on device {a.device.id}"
                          for name, a in named.items() if isinstance(a, nd))
    else:
        seen = {}
        for i, a in enumerate(arrays):
            if isinstance(a, nd):
                seen.setdefault(a.device.id, (i, tuple(a.shape)))
        where = ", ".join(f"argument {i} of shape {shape} on device {d}"
                          for d, (i, shape) in sorted(seen.items()))
    raise ValueError(f"arrays on different CUDA devices in one call: {where}; "
                     "move them to one device first")


_NO_SWITCH = contextlib.nullcontext()   # reusable: nullcontext keeps no state


def on_device(device_id):
    """Context that makes ``device_id`` current: a shared no-op when it already is (the
    usual case, and cheaper than entering cupy.cuda.Device)."""
    cupy = _cupy()
    if device_id == cupy.cuda.runtime.getDevice():
        return _NO_SWITCH
    return cupy.cuda.Device(device_id)


def _cupy():
    """The imported cupy module (imported here if nobody has yet): ``sys.modules`` first, as
    a launch needs it on every call and an ``import`` statement costs more than the lookup."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        import cupy
    return cupy


def _compile(name, name_expressions, device_id):
    import cupy
    with cupy.cuda.Device(device_id):
        try:
            mod = cupy.RawModule(code=source(name), options=OPTIONS,
                                 name_expressions=list(name_expressions))
            mod.compile()
        except cupy.cuda.compiler.CompileException as exc:
            include = cuda_include_dir()
            if not ("cuda_fp16.h" in str(exc) or "cuda_bf16.h" in str(exc)) or include is None:
                raise
            mod = cupy.RawModule(code=source(name), options=OPTIONS + (f"-I{include}",),
                                 name_expressions=list(name_expressions))
            mod.compile()
    return mod


_MODULES = {}   # (source, expressions, device) -> compiled RawModule
_FAILED = {}    # (source, expressions, device) -> KernelLaunchError of the failed compile


def _module(name, name_expressions, device_id):
    key = (name, name_expressions, device_id)
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    failed = _FAILED.get(key)
    if failed is not None:
        raise failed
    try:
        mod = _compile(name, name_expressions, device_id)
    except Exception as exc:  # compile errors come as CuPy's CompileException
        error = KernelLaunchError(f"could not compile {name} for device {device_id} "
                                  f"({len(name_expressions)} kernels, e.g. "
                                  f"{name_expressions[0]}): {exc}")
        error.__cause__ = exc
        _FAILED[key] = error
        raise error from exc
    _MODULES[key] = mod
    return mod


def get_kernel(name, expression, all_expressions, device_id=None):
    """The ``cupy.RawKernel`` for template instantiation ``expression`` of
    source ``name`` on device ``device_id`` (default: the current device);
    ``all_expressions`` (a tuple) lists every instantiation the module is
    compiled with, so one compile serves all of them.

    Raises KernelLaunchError naming the source when compiling failed, now or on an
    earlier call (a failed compile is not retried), or naming the kernel when the
    module has no such instantiation.
    """
    if device_id is None:
        import cupy
        device_id = cupy.cuda.runtime.getDevice()
    mod = _module(name, tuple(all_expressions), device_id)
    try:
        return mod.get_function(expression)
    except Exception as exc:
        raise KernelLaunchError(f"kernel {expression} of {name} is not available on device "
                                f"{device_id}: {exc}") from exc


def launch(kernel, name, grid, block, args, device_id=None):
    """Launch ``kernel`` on the current stream of device ``device_id`` (default: the
    current device) and turn a launch failure into KernelLaunchError naming it.

    With launch checks on (see set_launch_checks) the stream is synchronised after the
    launch, so an asynchronous fault of this kernel is raised here, naming it.
    """
    if device_id is not None:
        cupy = _cupy()
        if device_id != cupy.cuda.runtime.getDevice():
            try:
                with cupy.cuda.Device(device_id):
                    _launch(kernel, grid, block, args)
            except Exception as exc:
                raise launch_error(name, grid, block, device_id, exc) from exc
            return
    launch_here(kernel, name, grid, block, args, device_id)


def launch_here(kernel, name, grid, block, args, device_id):
    """:func:`launch` for a caller that has made ``device_id`` current (a prepared call that
    checked its arrays' devices): no device query; the same error, naming the kernel and
    ``device_id``."""
    try:
        kernel(grid, block, args)
        if _CHECK_LAUNCHES:
            _cupy().cuda.get_current_stream().synchronize()
    except Exception as exc:
        raise launch_error(name, grid, block, device_id, exc) from exc


def launch_error(name, grid, block, device_id, exc):
    """The KernelLaunchError of a failed launch (or of the synchronisation after it)."""
    where = "" if device_id is None else f" on device {device_id}"
    return KernelLaunchError(f"CUDA kernel {name} failed{where} "
                             f"(grid={grid}, block={block}): {exc}")


def _launch(kernel, grid, block, args):
    kernel(grid, block, args)
    if _CHECK_LAUNCHES:
        _cupy().cuda.get_current_stream().synchronize()
