"""Compile the package's ``.cu`` sources with CuPy, once per device, and launch them.

Nothing here imports CuPy at module import time: the first call does.
Kernels are C++ templates instantiated through ``RawModule(name_expressions=...)``;
a module is compiled on first use and cached per (source, device), and CuPy's
own disk cache (``CUPY_CACHE_DIR``) keeps the binaries across processes.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

__all__ = ["source", "get_kernel", "launch", "KernelLaunchError", "OPTIONS", "cuda_include_dir"]

# Options used for every compile; the NVRTC check in the tests uses the same.
OPTIONS = ("-std=c++17",)


class KernelLaunchError(RuntimeError):
    """A CUDA kernel failed to compile or launch; the message names the kernel."""


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


@functools.lru_cache(maxsize=None)
def _module(name, name_expressions, device_id):
    import cupy
    with cupy.cuda.Device(device_id):
        try:
            mod = cupy.RawModule(code=source(name), options=OPTIONS,
                                 name_expressions=list(name_expressions))
            mod.compile()
        except cupy.cuda.compiler.CompileException as exc:
            include = cuda_include_dir()
            if "cuda_fp16.h" not in str(exc) or include is None:
                raise
            mod = cupy.RawModule(code=source(name), options=OPTIONS + (f"-I{include}",),
                                 name_expressions=list(name_expressions))
            mod.compile()
    return mod


def get_kernel(name, expression, all_expressions):
    """The ``cupy.RawKernel`` for template instantiation ``expression`` of
    source ``name``; ``all_expressions`` (a tuple) lists every instantiation the
    module is compiled with, so one compile serves all of them."""
    import cupy
    device_id = cupy.cuda.runtime.getDevice()
    try:
        mod = _module(name, tuple(all_expressions), device_id)
        return mod.get_function(expression)
    except Exception as exc:  # compile errors come as CuPy's CompileException
        raise KernelLaunchError(f"could not compile kernel {expression} from {name}: {exc}") from exc


def launch(kernel, name, grid, block, args):
    """Launch ``kernel`` and turn a launch failure into KernelLaunchError naming it."""
    try:
        kernel(grid, block, args)
    except Exception as exc:
        raise KernelLaunchError(f"CUDA kernel {name} failed to launch "
                                f"(grid={grid}, block={block}): {exc}") from exc
