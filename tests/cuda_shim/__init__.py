"""Run CUDA kernel sources on the CPU, for tests on machines without a GPU.

:func:`build` compiles a ``.cu`` file unchanged with the system C++ compiler
against the host shim ``cuda_shim.h`` (next to this file; its header comment
lists what is emulated) and exports the requested template instantiations
through ``extern "C"`` entry points. :meth:`Library.launch` then runs one the
way ``cuLaunchKernel`` would: every thread of ``grid x block`` in turn, with
arguments passed by address; a fault the kernel reports (``cuda_shim::fault``, e.g. a
misaligned vector access seen by ``cuda_shim::check_aligned``) is raised as
:class:`KernelFault`. Blocks run one after another; the threads of a block run
as OS threads, so ``__shared__`` memory, ``__syncthreads()`` and the warp
shuffles (``__shfl_down_sync`` and kin, every lane of a warp calling them
together) work; kernels that never synchronise take a faster single-thread path
after their first launch (``CUDA_SHIM_THREADS=1`` forces threads). The header
comment of ``cuda_shim.h`` has the details. The .cu file guards its CUDA-only
includes with ``#ifndef GPULAYERS_CPU_SHIM``.

Arguments are checked against the kernel's C signature: a pointer parameter
takes a C-contiguous NumPy array whose itemsize is the pointee's size, a
scalar parameter a NumPy scalar of the same kind and size (``np.int32`` for
``int``, ``np.int64`` for ``long long``, ``np.float32`` for ``float``), as a
CuPy RawKernel needs them.

Example, for ``template <typename T> __global__ void scale(const T* x, T* y, T a, int n)``::

    lib = build("kernels.cu", ["scale<float>"])
    x = np.arange(5, dtype=np.float32)
    y = np.empty_like(x)
    lib.launch("scale<float>", grid=1, block=32, args=(x, y, np.float32(2), np.int32(5)))

Libraries are cached by the hash of the shim, the source, the instantiations
and the compiler command, in ``$TMPDIR/cuda_shim/``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["build", "compiler", "has_half", "Library", "KernelFault", "SHIM_HEADER"]

SHIM_HEADER = Path(__file__).with_name("cuda_shim.h")
_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")


class KernelFault(RuntimeError):
    """A kernel run through the shim did what faults on a GPU (e.g. a misaligned vector
    load); the message names the kernel and the fault."""


def compiler():
    """Path of the C++ compiler ($CXX, else g++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def has_half():
    """True when the compiler has _Float16, so the shim's __half kernels can run."""
    cxx = compiler()
    if cxx is None:
        return False
    probe = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-x", "c++", "-"],
                           input="#ifndef __FLT16_MAX__\n#error no _Float16\n#endif\n",
                           capture_output=True, text=True)
    return probe.returncode == 0


def build(source, expressions, defines=()):
    """Compile ``source`` (path of a .cu file) for the CPU and export ``expressions``.

    Inputs:
    - source: path of the .cu file, included unchanged
    - expressions: kernel instantiations, e.g. ``["scale<float>", "scale<double>"]``
    - defines: extra preprocessor definitions, e.g. ``["NDEBUG"]``

    Returns a Library. Raises RuntimeError with the compiler output when compiling fails.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler: set $CXX or install g++")
    source = Path(source).resolve()
    expressions = tuple(expressions)
    wrapper = "".join([f'#include "{SHIM_HEADER}"\n', f'#include "{source}"\n'] + [
        f"CUDA_SHIM_EXPORT(shim_kernel_{i}, {e})\n" for i, e in enumerate(expressions)])
    command = [cxx, *_FLAGS, *(f"-D{d}" for d in defines)]
    digest = hashlib.sha256("\0".join([
        SHIM_HEADER.read_text(), source.read_text(), wrapper, " ".join(command)]).encode())
    folder = Path(tempfile.gettempdir()) / "cuda_shim" / digest.hexdigest()[:24]
    library = folder / f"{source.stem}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "wrapper.cpp").write_text(wrapper)
        partial = folder / f"{source.stem}.{os.getpid()}.so"  # renamed when complete
        result = subprocess.run(command + [str(folder / "wrapper.cpp"), "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} with the CPU shim failed:\n"
                               f"{' '.join(command)}\n{result.stderr}")
        os.replace(partial, library)
    return Library(library, expressions)


class Library:
    """Kernels of one shim build, launched by their name expression."""

    def __init__(self, path, expressions):
        self._dll = ctypes.CDLL(str(path))
        self._index = {e: i for i, e in enumerate(expressions)}

    def signature(self, expression):
        """List of (kind, size) per kernel parameter: kind 'p' (pointer; size of the pointee),
        'i'/'u' (signed/unsigned integer), 'f' (floating point), 'V' (other)."""
        fn = getattr(self._dll, f"shim_kernel_{self._index[expression]}_signature")
        kinds, sizes = ctypes.create_string_buffer(64), (ctypes.c_int * 64)()
        n = fn(kinds, sizes, 64)
        return [(kinds.raw[i:i + 1].decode(), sizes[i]) for i in range(n)]

    def launch(self, expression, grid, block, args):
        """Run kernel ``expression`` over ``grid`` x ``block`` (ints or up to 3-tuples).

        Inputs:
        - args: one per kernel parameter: NumPy arrays for pointers, NumPy scalars otherwise
        """
        params = self.signature(expression)
        if len(args) != len(params):
            raise TypeError(f"{expression} takes {len(params)} arguments, got {len(args)}")
        keep, pointers = [], (ctypes.c_void_p * max(len(args), 1))()
        for i, (arg, (kind, size)) in enumerate(zip(args, params)):
            if kind == "p":
                if not isinstance(arg, np.ndarray) or not arg.flags.c_contiguous:
                    raise TypeError(f"{expression}: argument {i} must be a C-contiguous "
                                    f"NumPy array, got {type(arg).__name__}")
                if arg.dtype.itemsize != size:
                    raise TypeError(f"{expression}: argument {i} points to {size}-byte "
                                    f"elements, got a {arg.dtype} array")
                cell = ctypes.c_void_p(arg.ctypes.data)
            else:
                if not isinstance(arg, np.generic) or arg.dtype.kind != kind \
                        or arg.dtype.itemsize != size:
                    raise TypeError(f"{expression}: argument {i} must be a NumPy scalar of kind "
                                    f"{kind!r} and {size} bytes, got {arg!r} "
                                    f"({type(arg).__name__})")
                cell = np.array(arg)
            keep.append(cell)
            pointers[i] = ctypes.addressof(cell) if kind == "p" else cell.ctypes.data
        getattr(self._dll, f"shim_kernel_{self._index[expression]}")(
            _dims(grid), _dims(block), pointers)
        fault = self._fault()
        if fault:
            raise KernelFault(f"{expression}: {fault}")

    def _fault(self):
        getter = self._dll.cuda_shim_fault
        getter.restype = ctypes.c_char_p
        return getter().decode()


def _dims(value):
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise ValueError(f"grid and block take 1 to 3 positive sizes, got {value!r}")
    return (ctypes.c_uint * 3)(*(tuple(int(d) for d in dims) + (1, 1))[:3])
