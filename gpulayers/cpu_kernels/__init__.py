"""Compiled CPU loop kernels (numba), the CPU counterpart of gpulayers.cuda.

Kernels are written as plain Python loops over planes, rows and windows, the
same shape as the CUDA kernels: one ``prange`` iteration is the work of one
thread block. They are compiled by numba the first time they are called, with
``cache=True`` (a second process loads the machine code instead of compiling).

``import gpulayers`` does not import numba: :func:`kernel` wraps a function
lazily, and numba is imported on the first call of a kernel. Without numba (or
with ``GPULAYERS_CPU_KERNELS=0`` in the environment at import time, or after
``set_enabled(False)``) the layer functions take their NumPy paths; the reason
is given by :func:`unusable_reason`.
"""
from __future__ import annotations

import functools
import os
import types

__all__ = ["kernel", "LazyIntrinsic", "enabled", "set_enabled", "unusable_reason",
           "numba_module", "SERIAL_BELOW", "threads"]

#: below this many elements of work, :meth:`_LazyKernel.run` keeps a kernel on the calling
#: thread. On a quiet machine a parallel region costs under a microsecond more (plane sums,
#: 2 cores: 2.7 us parallel vs 3.4 serial at 1.6k elements, 3.4 vs 4.7 at 6k); on one
#: whose cores are all busy it waits about a scheduler slice (8 ms, measured here with two
#: busy processes) for its worker thread, a loss small inputs should not risk.
SERIAL_BELOW = 1 << 13

_ENABLED = os.environ.get("GPULAYERS_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def _probe():
    """(numba module or None, reason it is unusable or None); probed once."""
    try:
        import numba
    except Exception as exc:  # ImportError, or a broken llvmlite
        return None, f"numba does not import ({type(exc).__name__}: {exc})"
    return numba, None


def numba_module():
    """The numba module (imported on first use), or None when it does not import."""
    return _probe()[0]


def unusable_reason():
    """Why the CPU kernels are not used, or None when they are."""
    if not _ENABLED:
        return "disabled (GPULAYERS_CPU_KERNELS=0 or gpulayers.cpu_kernels.set_enabled(False))"
    return _probe()[1]


def enabled():
    """True when layer functions run the compiled CPU kernels for NumPy inputs."""
    return _ENABLED and _probe()[0] is not None


def set_enabled(flag=True):
    """Turn the compiled CPU kernels on or off for this process; returns the old setting."""
    global _ENABLED
    old, _ENABLED = _ENABLED, bool(flag)
    return old


class _LazyKernel:
    """A loop function compiled by numba on its first call.

    The function's module may use ``prange`` (bound to ``range`` until compile
    time, then to ``numba.prange``) for its parallel loops. Kernels it calls are
    compiled first, and the module's name for each is rebound to its numba dispatcher.
    """

    def __init__(self, fn, options):
        self.py_func = fn
        self._options = options
        self._compiled = None
        functools.update_wrapper(self, fn)

    def compiled(self):
        if self._compiled is None:
            numba = numba_module()
            if numba is None:
                raise RuntimeError(f"gpulayers CPU kernel {self.py_func.__name__}: {unusable_reason()}")
            fn = self.py_func
            g = fn.__globals__
            g["prange"] = numba.prange
            # kernels calling kernels (or intrinsics): numba must see the callee's dispatcher
            # (or the made intrinsic). It compiles a twin of the function whose globals name
            # them, so the module keeps its lazy objects (callers outside use their .run)
            callees = {name: g[name].compiled() for name in fn.__code__.co_names
                       if isinstance(g.get(name), (_LazyKernel, LazyIntrinsic))}
            if callees:
                fn = types.FunctionType(fn.__code__, {**g, **callees}, fn.__name__,
                                        fn.__defaults__, fn.__closure__)
                fn.__qualname__ = self.py_func.__qualname__
                fn.__module__ = self.py_func.__module__
            self._compiled = numba.njit(cache=True, nogil=True, **self._options)(fn)
        return self._compiled

    def __call__(self, *args):
        """Run on numba's thread pool (numba.set_num_threads decides how many)."""
        return (self._compiled or self.compiled())(*args)

    def run(self, work, *args):
        """Run with ``work`` elements of work: on the calling thread alone below
        SERIAL_BELOW, else on :func:`threads` threads; numba's per-thread setting is
        restored afterwards."""
        f = self._compiled or self.compiled()
        n = 1 if work < SERIAL_BELOW else threads()
        get, put = _thread_count_calls()
        old = get()
        if old == n:
            return f(*args)
        put(n)
        try:
            return f(*args)
        finally:
            put(old)


class LazyIntrinsic:
    """A numba intrinsic (LLVM code a kernel calls like a function), made by ``build()``
    -- which may import numba and llvmlite -- when the first kernel calling it compiles.
    A module defines it (and its builder) beside the kernels that call it, so numba's cache
    of those kernels is invalidated with the builder's source; the IR helpers the builders
    share live in gpulayers.cpu_kernels.simd (see its note on the cache)."""

    def __init__(self, build):
        self._build = build
        self._made = None

    def compiled(self):
        if self._made is None:
            self._made = self._build()
        return self._made


_THREADS = {}   # GPULAYERS_NUM_THREADS's value -> the thread count


def threads():
    """Threads the CPU kernels use: env GPULAYERS_NUM_THREADS, else every core, at most
    numba's pool (NUMBA_NUM_THREADS); looked up once per value of the variable (os.cpu_count
    costs microseconds). Results never depend on it: every kernel's order is fixed."""
    env = os.environ.get("GPULAYERS_NUM_THREADS")
    n = _THREADS.get(env)
    if n is None:
        try:
            n = int(env or 0)
        except ValueError:
            n = 0
        n = max(1, min(n or os.cpu_count() or 1, numba_module().config.NUMBA_NUM_THREADS))
        _THREADS[env] = n
    return n


@functools.lru_cache(maxsize=1)
def _thread_count_calls():
    """(get, set) of the calling thread's numba thread count: numba's own ctypes entry
    points (0.1-0.2 us a call here) where they exist, else the public functions (0.5-1.2)."""
    numba = numba_module()
    numba.get_num_threads()   # launches the pool
    try:
        from numba.np.ufunc import parallel
        return parallel._get_num_threads, parallel._set_num_threads
    except (ImportError, AttributeError):
        return numba.get_num_threads, numba.set_num_threads


def kernel(fn=None, *, parallel=True, **options):
    """Decorator: ``@kernel`` or ``@kernel(parallel=False)``; numba options pass through."""
    def wrap(f):
        return _LazyKernel(f, dict(parallel=parallel, **options))
    return wrap(fn) if fn is not None else wrap
