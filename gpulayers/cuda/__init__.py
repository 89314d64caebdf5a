"""CUDA kernels (``*.cu`` package data) and the small modules that compile and launch them.

Importing this package needs neither CuPy nor a GPU: CuPy is imported by the
first launch. :data:`KERNEL_MODULES` lists the launcher modules; each exposes
``SOURCE`` (its .cu file name) and ``NAME_EXPRESSIONS`` (every template
instantiation), which the NVRTC compile check in the tests walks through.
"""
import importlib

KERNEL_MODULES = ("gpulayers.cuda.pool_kernels", "gpulayers.cuda.bn_kernels",
                  "gpulayers.cuda.pool_nd_kernels")


def instantiations():
    """{source file name: tuple of name expressions} for every launcher module present."""
    out = {}
    for name in KERNEL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        out[mod.SOURCE] = tuple(mod.NAME_EXPRESSIONS)
    return out
