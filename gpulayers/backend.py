"""Which array module computes: NumPy always, CuPy when it imports and a device is usable.

CuPy is imported lazily, the first time anyone asks, and a failure is kept as
a reason string rather than raised: ``import gpulayers`` never needs CUDA.

Layer functions compute with the array module of their inputs
(:func:`get_array_module`); the backend setting here decides where
:func:`asarray`, the layer classes' parameters and the scripts put data.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import numpy

__all__ = [
    "available_backends", "backend_info", "get_backend", "set_backend", "use_backend",
    "get_array_module", "asarray", "to_numpy", "cupy_unusable_reason", "is_cupy_array",
    "backend_module", "device_scope", "BACKENDS", "kernels_enabled", "set_kernels",
]

BACKENDS = ("numpy", "cupy")


@functools.lru_cache(maxsize=1)
def _probe_cupy():
    """(cupy module or None, reason it is unusable or None). Probed once."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, f"cupy does not import ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"cupy {cupy.__version__} imports but finds no CUDA device ({type(exc).__name__}: {exc})"
    if count <= 0:
        return None, f"cupy {cupy.__version__} imports but reports {count} CUDA devices"
    return cupy, None


def _cupy():
    return _probe_cupy()[0]


def cupy_unusable_reason():
    """Why CuPy cannot be used here, or None when it can."""
    return _probe_cupy()[1]


def available_backends():
    """Usable backend names: ``['numpy']`` or ``['numpy', 'cupy']``."""
    return ["numpy"] + (["cupy"] if _cupy() is not None else [])


def backend_info():
    """Dict with versions, devices and, when CuPy is unusable, the reason."""
    info = {"backend": get_backend(), "available": available_backends(),
            "numpy": numpy.__version__, "cupy": None, "devices": [],
            "cupy_unusable_reason": cupy_unusable_reason()}
    cp = _cupy()
    if cp is not None:
        info["cupy"] = cp.__version__
        for i in range(cp.cuda.runtime.getDeviceCount()):
            props = cp.cuda.runtime.getDeviceProperties(i)
            name = props["name"]
            info["devices"].append({
                "id": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                "compute_capability": f"{props['major']}.{props['minor']}",
                "memory_GiB": round(props["totalGlobalMem"] / 2**30, 1)})
    return info


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; usable backends: {available_backends()}"
                         + _reason_suffix())
    if name not in available_backends():
        raise ValueError(f"backend {name!r} is not usable here; usable backends: "
                         f"{available_backends()}" + _reason_suffix())
    return name


def _reason_suffix():
    reason = cupy_unusable_reason()
    return f" (cupy is not usable: {reason})" if reason else ""


_current = None

# GPULAYERS_KERNELS=0 (read once, at import, like GPULAYERS_CHECK_LAUNCHES): CuPy inputs take
# the plain xp path instead of the CUDA kernels. set_kernels changes it at run time.
_KERNELS = os.environ.get("GPULAYERS_KERNELS", "1") != "0"


def kernels_enabled():
    """Whether CuPy inputs go to the CUDA kernels (GPULAYERS_KERNELS at import, or the last
    set_kernels)."""
    return _KERNELS


def set_kernels(on):
    """Send CuPy inputs to the CUDA kernels (True) or the plain xp path (False); returns the
    previous setting. The environment variable GPULAYERS_KERNELS=0 sets False at import."""
    global _KERNELS
    previous, _KERNELS = _KERNELS, bool(on)
    return previous


def get_backend():
    """The current backend name; on first use from env GPULAYERS_BACKEND, else 'numpy'."""
    global _current
    if _current is None:
        _current = _check_name(os.environ.get("GPULAYERS_BACKEND", "numpy") or "numpy")
    return _current


def set_backend(name):
    """Make ``name`` ('numpy' or 'cupy') the current backend."""
    global _current
    _current = _check_name(name)


@contextlib.contextmanager
def use_backend(name):
    """Context manager: the backend is ``name`` inside the block, restored after."""
    previous = get_backend()
    set_backend(name)
    try:
        yield name
    finally:
        set_backend(previous)


def _cupy_ndarray():
    """``cupy.ndarray`` when CuPy has been imported (by anyone) and is usable, else None.

    Never imports CuPy itself: an array of a module nobody imported cannot exist.
    """
    if "cupy" not in sys.modules:
        return None
    cp = _cupy()
    return None if cp is None else cp.ndarray


def is_cupy_array(a):
    """True when ``a`` is a cupy.ndarray."""
    nd = _cupy_ndarray()
    return nd is not None and isinstance(a, nd)


def get_array_module(*arrays):
    """``numpy`` or ``cupy``, from the arrays given (None entries are ignored).

    Raises TypeError when NumPy and CuPy arrays are mixed, and ValueError naming
    the devices when CuPy arrays sit on different devices.
    """
    nd = _cupy_ndarray()
    if nd is None:  # the common CPU case: no CuPy at all
        return numpy
    # The usual calls (all CuPy on one device, or no CuPy array at all) in two short passes;
    # the loops below find what is wrong otherwise and word the error (kinds before devices).
    gpu = cpu = False
    for a in arrays:
        if a is not None:
            if isinstance(a, nd):
                gpu = True
            else:
                cpu = True
    if not gpu:
        return numpy
    if not cpu:
        device = None
        for a in arrays:
            if a is not None:
                d = a.device.id
                if device is None:
                    device = d
                elif d != device:
                    break
        else:
            return _cupy()
    kinds = {}
    on_gpu = []
    for a in arrays:
        if a is not None:
            if isinstance(a, nd):
                kinds.setdefault("cupy", type(a).__name__)
                on_gpu.append(a)
            else:
                kinds.setdefault("numpy", type(a).__name__)
    if len(kinds) > 1:
        raise TypeError("arrays of different backends in one call: a numpy "
                        f"{kinds['numpy']} and a cupy {kinds['cupy']}; move them to one "
                        "backend with gpulayers.asarray or gpulayers.to_numpy")
    devices = {}
    for a in on_gpu:
        devices.setdefault(a.device.id, tuple(a.shape))
    if len(devices) > 1:
        where = ", ".join(f"an array of shape {shape} on device {d}"
                          for d, shape in sorted(devices.items()))
        raise ValueError(f"arrays on different CUDA devices in one call: {where}; "
                         "move them to one device first (cupy.asarray under cupy.cuda.Device)")
    return _cupy() if "cupy" in kinds else numpy


NO_SCOPE = contextlib.nullcontext()   # reusable: what device_scope returns for "no switch"


def device_scope(a):
    """Context in which work on array ``a`` runs: its CUDA device for a CuPy array on
    another device than the current one, else a no-op (the shared :data:`NO_SCOPE`, which
    callers may test for with ``is`` and skip). Layer functions run under it, so
    their allocations and kernel launches follow the inputs, not the current device."""
    nd = _cupy_ndarray()
    if nd is None or not isinstance(a, nd):
        return NO_SCOPE
    if a.device.id == _cupy().cuda.runtime.getDevice():
        return NO_SCOPE
    return a.device


def backend_module(name=None):
    """The array module of backend ``name`` (default: the current one)."""
    name = _check_name(name or get_backend())
    return _cupy() if name == "cupy" else numpy


def asarray(a, dtype=None):
    """``a`` as an array of the current backend (copied across devices when needed)."""
    xp = backend_module()
    if xp is numpy and is_cupy_array(a):
        a = a.get()
    return xp.asarray(a, dtype=dtype)


def to_numpy(a):
    """``a`` as a NumPy array (copied from the device for CuPy arrays)."""
    if is_cupy_array(a):
        return a.get()
    return numpy.asarray(a)
