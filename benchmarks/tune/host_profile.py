"""Where the host time of one public call goes on a CUDA machine (cProfile + CuPy primitives).

    PYTHONPATH=. python benchmarks/tune/host_profile.py
"""
import cProfile
import pstats
import time

import cupy
import numpy as np

import gpulayers as G


def host_us(fn, n=300):
    """Host time per call with the GPU kept busy elsewhere: launches only."""
    fn()
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    cupy.cuda.Device().synchronize()
    return t


def main():
    x = cupy.random.standard_normal((32, 64, 56, 56), dtype=cupy.float32)
    g = cupy.ones(64, cupy.float32)
    b = cupy.zeros(64, cupy.float32)
    bp = {"mode": "train"}
    y, cache = G.spatial_batchnorm_forward(x, g, b, bp)
    pp = dict(pool_height=3, pool_width=3, stride=2, pad=1)
    out, pcache = G.max_pool_forward(x, pp)
    dout = cupy.random.standard_normal(out.shape, dtype=cupy.float32)
    calls = {
        "bn train fwd": lambda: G.spatial_batchnorm_forward(x, g, b, bp),
        "bn train bwd": lambda: G.spatial_batchnorm_backward(x, cache),
        "bn eval fwd": lambda: G.spatial_batchnorm_forward(x, g, b, dict(bp, mode="test")),
        "pool fwd": lambda: G.max_pool_forward(x, pp),
        "pool bwd": lambda: G.max_pool_backward(dout, pcache),
    }
    small = cupy.empty(64, cupy.float32)
    stats = cupy.empty((6, 64), cupy.float32)
    k = cupy.RawKernel(r'extern "C" __global__ void k(float* a, int n, double e, double f,'
                       r' float* b, float* c, int g, double h) {}', "k")
    prims = {
        "cupy.ndarray((N,), f32)": lambda: cupy.ndarray((1000,), cupy.float32),
        "cupy.empty(x.shape)": lambda: cupy.empty(x.shape, x.dtype),
        "stats[0] view": lambda: stats[0],
        "RawKernel 8 args": lambda: k((1,), (32,), (small, np.int32(64), np.float64(1), np.float64(2),
                                                    small, small, np.int32(1), np.float64(3))),
        "x.flags.c_contiguous": lambda: x.flags.c_contiguous,
        "x.data.ptr": lambda: x.data.ptr,
        "getDevice": lambda: cupy.cuda.runtime.getDevice(),
    }
    print("host us per call (launch-only loop)")
    for name, fn in {**calls, **prims}.items():
        print(f"  {name:28} {host_us(fn):8.1f}")
    for name in ("bn train fwd", "pool fwd"):
        prof = cProfile.Profile()
        fn = calls[name]
        prof.enable()
        for _ in range(300):
            fn()
        prof.disable()
        cupy.cuda.Device().synchronize()
        print(f"\n== {name}: top functions by own time (300 calls)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
