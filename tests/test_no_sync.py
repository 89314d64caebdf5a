"""No op reads a device value on the host: no .item(), .get(), bool() of a device array or
other device-to-host copy (issue 13 §1).

On any machine: a stand-in CuPy (benchmarks/host_cost.py, strict mode) whose arrays raise on
every synchronising access (.get, .item, .tolist, __bool__, __float__, __int__, __index__,
__array__, iteration, cupy.asnumpy, Stream/Event/Device.synchronize) and whose kernels do
nothing; every public op runs with the CUDA kernels on, in every rank and layout, and must
launch a kernel without synchronising.

Known exception (asserted, so it cannot silently change): max_unpool_forward checks its
indices' range on the host (``int(idx.min())``, ``int(idx.max())``) to raise its clear
ValueError naming the range; a kernel cannot raise that error without a host read either.

On a GPU (marked gpu): the same ops under CUDA stream capture
(``cupy.cuda.Stream.begin_capture``), where any synchronisation or D2H copy fails.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import gpulayers as G
from gpulayers import backend

ROOT = Path(__file__).resolve().parents[1]


def _host_cost():
    spec = importlib.util.spec_from_file_location("host_cost", ROOT / "benchmarks" /
                                                  "host_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _host_cost()

SPATIAL = {1: (9,), 2: (9, 10), 3: (5, 6, 7)}
LAYOUTS = ("channels_first", "channels_last", "channels_last_strided")


@pytest.fixture
def cp():
    previous = backend.set_kernels(True)
    with H.installed(strict=True) as cp:
        yield cp
    backend.set_kernels(previous)


def _x(cp, d, layout, N=2, C=3, dtype=np.float32):
    size = SPATIAL[d]
    if layout == "channels_first":
        return cp.empty((N, C) + size, dtype)
    last = cp.empty((N,) + size + (C,), dtype)
    return last if layout == "channels_last" else cp.moveaxis(last, -1, 1)


def _fmt(layout):
    return "channels_last" if layout == "channels_last" else "channels_first"


def _like(cp, a):
    """A fresh stand-in array laid out like ``a`` (same shape and strides)."""
    return cp.ndarray(a.shape, a.dtype, strides=a.strides)


def _ran(cp, before, what):
    assert cp.syncs == [], f"{what} synchronised: {cp.syncs}"
    assert cp.launches[0] > before, f"{what} launched no kernel (not the kernel path?)"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_pooling_ops_do_not_sync(cp, d, layout):
    x = _x(cp, d, layout)
    fmt = _fmt(layout)
    k = {1: 3, 2: (3, 2), 3: (2, 3, 2)}[d]
    for name, fwd, bwd, param in (
            ("max", G.max_pool_forward, G.max_pool_backward,
             {"kernel_size": k, "stride": 2, "pad": 1, "data_format": fmt}),
            ("max 2x2", G.max_pool_forward, G.max_pool_backward,
             {"kernel_size": 2, "data_format": fmt}),
            ("avg", G.avg_pool_forward, G.avg_pool_backward,
             {"kernel_size": k, "stride": 2, "pad": 1, "count_include_pad": False,
              "data_format": fmt}),
            ("sum", G.sum_pool_forward, G.sum_pool_backward,
             {"kernel_size": k, "stride": 1, "data_format": fmt})):
        before = cp.launches[0]
        out, cache = fwd(x, param)
        _ran(cp, before, f"{name}_pool_forward {d}-D {layout}")
        before = cp.launches[0]
        bwd(_like(cp, out), cache)
        _ran(cp, before, f"{name}_pool_backward {d}-D {layout}")
        if name.startswith("max"):
            G.max_pool_indices(cache)     # index arithmetic on the device, no kernel
            assert cp.syncs == [], f"max_pool_indices {d}-D {layout}: {cp.syncs}"
    for name, fwd, bwd in (("adaptive_avg", G.adaptive_avg_pool_forward,
                            G.adaptive_avg_pool_backward),
                           ("adaptive_max", G.adaptive_max_pool_forward,
                            G.adaptive_max_pool_backward)):
        for size in (1, 4):
            before = cp.launches[0]
            out, cache = fwd(x, size, data_format=fmt)
            _ran(cp, before, f"{name}_pool_forward {d}-D {layout} -> {size}")
            before = cp.launches[0]
            bwd(_like(cp, out), cache)
            _ran(cp, before, f"{name}_pool_backward {d}-D {layout}")
            if name == "adaptive_max":
                G.max_pool_indices(cache)
                assert cp.syncs == [], f"max_pool_indices (adaptive) {d}-D: {cp.syncs}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_max_unpool_syncs_only_for_its_index_range_check(cp, d, layout):
    x = _x(cp, d, layout)
    fmt = _fmt(layout)
    out, cache = G.max_pool_forward(x, {"kernel_size": 2, "data_format": fmt})
    idx = G.max_pool_indices(cache)
    # The known exception: the range check reads idx.min() and idx.max() on the host.
    with pytest.raises(H.SyncError, match="__int__|__index__|item"):
        G.max_unpool_forward(out, idx, x.shape, data_format=fmt)
    cp.syncs.clear()
    cp.allow_sync = True                 # let that check pass to reach the rest
    before = cp.launches[0]
    y, ucache = G.max_unpool_forward(out, idx, x.shape, data_format=fmt)
    assert cp.syncs and set(cp.syncs) <= {"ndarray.__int__", "ndarray.__index__"}, cp.syncs
    assert cp.launches[0] > before
    cp.allow_sync = False
    cp.syncs.clear()
    before = cp.launches[0]
    G.max_unpool_backward(_like(cp, y), ucache)
    _ran(cp, before, f"max_unpool_backward {d}-D {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_batchnorm_does_not_sync(cp, ndim, layout, mode):
    if ndim == 2 and layout != "channels_first":
        pytest.skip("(N, D) has one layout")
    C = 3
    x = cp.empty((8, C), np.float32) if ndim == 2 else _x(cp, ndim - 2, layout, C=C)
    gamma, beta = cp.empty(C, np.float32), cp.empty(C, np.float32)
    param = {"mode": mode, "running_mean": cp.empty(C, np.float32),
             "running_var": cp.empty(C, np.float32)}
    if ndim > 2:
        param["data_format"] = _fmt(layout)
    fwd, bwd = ((G.batchnorm_forward, G.batchnorm_backward) if ndim == 2 else
                (G.spatial_batchnorm_forward, G.spatial_batchnorm_backward))
    for convention in ("cs231n", "torch"):
        before = cp.launches[0]
        y, cache = fwd(x, gamma, beta, dict(param, convention=convention))
        _ran(cp, before, f"{fwd.__name__} {mode} {ndim}-D {layout} {convention}")
        before = cp.launches[0]
        bwd(_like(cp, y), cache)
        _ran(cp, before, f"{bwd.__name__} {mode} {ndim}-D {layout}")


def test_layers_do_not_sync(cp):
    from gpulayers import layers as L
    x = cp.empty((2, 3, 8, 8), np.float32)
    with backend.use_backend("cupy"):
        made = [L.MaxPool2d(3, 2, 1, return_indices=True), L.AvgPool2d(2),
                L.AdaptiveAvgPool2d(1), L.AdaptiveMaxPool2d(2), L.BatchNorm2d(3),
                L.BatchNorm2d(3).eval()]
    for layer in made:
        before = cp.launches[0]
        out = layer.forward(x)
        layer.backward(_like(cp, out))
        _ran(cp, before, type(layer).__name__)


# ------------------------------------------------------------------------------ on a GPU

def _cupy_usable():
    return backend.cupy_unusable_reason() is None


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_usable(), reason=f"CuPy not usable: "
                    f"{backend.cupy_unusable_reason()}")
def test_ops_run_under_stream_capture():
    """Under stream capture a synchronisation or a D2H copy is an error (cudaErrorStream-
    CaptureUnsupported / ...Invalidated), so each op must run through without one. Each op is
    warmed first (compiles and plans happen outside the capture)."""
    import cupy
    x = cupy.random.standard_normal((2, 4, 10, 12), dtype=cupy.float32)
    xl = cupy.ascontiguousarray(cupy.moveaxis(x, 1, -1))
    g, b = cupy.ones(4, cupy.float32), cupy.zeros(4, cupy.float32)
    rm, rv = cupy.zeros(4, cupy.float32), cupy.ones(4, cupy.float32)

    def ops():
        for xin, fmt in ((x, "channels_first"), (xl, "channels_last"),
                         (cupy.moveaxis(xl, -1, 1), "channels_first")):
            for fwd, bwd, param in (
                    (G.max_pool_forward, G.max_pool_backward,
                     {"kernel_size": 3, "stride": 2, "pad": 1, "data_format": fmt}),
                    (G.avg_pool_forward, G.avg_pool_backward,
                     {"kernel_size": 2, "data_format": fmt}),
                    (G.sum_pool_forward, G.sum_pool_backward,
                     {"kernel_size": 2, "data_format": fmt})):
                out, cache = fwd(xin, param)
                bwd(out, cache)
                if fwd is G.max_pool_forward:
                    G.max_pool_indices(cache)
            for fwd, bwd in ((G.adaptive_avg_pool_forward, G.adaptive_avg_pool_backward),
                             (G.adaptive_max_pool_forward, G.adaptive_max_pool_backward)):
                out, cache = fwd(xin, 3, data_format=fmt)
                bwd(out, cache)
            for mode in ("train", "test"):
                p = {"mode": mode, "running_mean": rm, "running_var": rv, "data_format": fmt}
                y, cache = G.spatial_batchnorm_forward(xin, g, b, p)
                G.spatial_batchnorm_backward(y, cache)
        y, cache = G.batchnorm_forward(x.reshape(8, -1)[:, :4].copy(), g, b, {"mode": "train"})
        G.batchnorm_backward(y, cache)

    ops()                                   # warm: compiles, plans
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            ops()
        finally:
            graph = stream.end_capture()
    assert graph is not None
