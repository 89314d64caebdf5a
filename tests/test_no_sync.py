"""No op reads a device value on the host: no .item(), .get(), bool() of a device array or
other device-to-host copy (issue 13 §1).

On any machine: a stand-in CuPy (benchmarks/host_cost.py, strict mode) whose arrays raise on
every synchronising access (.get, .item, .tolist, __bool__, __float__, __int__, __index__,
__array__, iteration, cupy.asnumpy, Stream/Event/Device.synchronize) and whose kernels do
nothing; every public op runs with the CUDA kernels on, in every rank and layout, and must
launch a kernel without synchronising.

There is no exception: max_unpool_forward checks its indices' range on NumPy only (on
CuPy an out-of-range index targets nothing; see tests/test_cuda_shim_pool_nd.py).

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
def test_max_unpool_does_not_sync(cp, d, layout):
    """On CuPy the index range is not checked on the host (out-of-range indices target
    nothing in the kernels), so max unpooling reads nothing back either."""
    x = _x(cp, d, layout)
    fmt = _fmt(layout)
    out, cache = G.max_pool_forward(x, {"kernel_size": 2, "data_format": fmt})
    idx = G.max_pool_indices(cache)
    cp.syncs.clear()
    before = cp.launches[0]
    y, ucache = G.max_unpool_forward(out, idx, x.shape, data_format=fmt)
    _ran(cp, before, f"max_unpool_forward {d}-D {layout}")
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
                    idx = G.max_pool_indices(cache)
                    y, ucache = G.max_unpool_forward(out, idx, xin.shape, data_format=fmt)
                    G.max_unpool_backward(y, ucache)
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


# ------------------------------------------------- synchronized batch norm (a communicator)

class StandinComm:
    """A two-rank communicator on stand-in arrays: allgather / allreduce_sum return new
    stand-in arrays (nothing is read), host numbers are summed on the host; calls counted."""

    rank, size, checks_sizes = 0, 2, True

    def __init__(self, cp):
        self.cp, self.calls = cp, []

    def allgather(self, buf, host=None):
        self.calls.append("allgather")
        out = self.cp.empty((self.size, buf.size), buf.dtype)
        return out if host is None else (out, tuple(float(h) * self.size for h in host))

    def allreduce_sum(self, buf):
        self.calls.append("allreduce_sum")
        return self.cp.empty(buf.shape, buf.dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_synchronized_batchnorm_does_not_sync(cp, ndim, layout):
    """With a comm, BN runs the kernels (no xp path), makes ONE collective per forward and
    one per backward, and reads nothing from the device (the global count comes from the
    communicator's host sums)."""
    if ndim == 2 and layout != "channels_first":
        pytest.skip("(N, D) has one layout")
    C = 3
    x = cp.empty((8, C), np.float32) if ndim == 2 else _x(cp, ndim - 2, layout, C=C)
    gamma, beta = cp.empty(C, np.float32), cp.empty(C, np.float32)
    fwd, bwd = ((G.batchnorm_forward, G.batchnorm_backward) if ndim == 2 else
                (G.spatial_batchnorm_forward, G.spatial_batchnorm_backward))
    for convention in ("cs231n", "torch"):
        comm = StandinComm(cp)
        param = {"mode": "train", "comm": comm, "convention": convention,
                 "running_mean": cp.empty(C, np.float32), "running_var": cp.empty(C, np.float32)}
        if ndim > 2:
            param["data_format"] = _fmt(layout)
        before = cp.launches[0]
        y, cache = fwd(x, gamma, beta, param)
        _ran(cp, before, f"synchronized {fwd.__name__} {ndim}-D {layout} {convention}")
        assert cache.path == "cuda" and cache.count == 2 * (x.size // C)
        assert cp.launches[0] - before == 3, "stats, record merge, apply"
        assert comm.calls == ["allgather"]
        before = cp.launches[0]
        bwd(_like(cp, y), cache)
        _ran(cp, before, f"synchronized {bwd.__name__} {ndim}-D {layout}")
        assert cp.launches[0] - before == 3, "reduce, shares merge, dx"
        assert comm.calls == ["allgather", "allreduce_sum"]


class _FakeNccl:
    """cupy.cuda.nccl's constants and a communicator that records its calls."""

    NCCL_SUM = 0
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
    NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5

    def __init__(self):
        self.calls = []

    def allReduce(self, send, recv, count, dtype, op, stream):
        self.calls.append(("allReduce", count, dtype, stream))

    def allGather(self, send, recv, count, dtype, stream):
        self.calls.append(("allGather", count, dtype, stream))


class _HostHeader:
    """The host side of a two-rank header exchange (the peer mirrors this rank)."""

    def __init__(self):
        self.headers = []

    def _reduce(self, header):
        self.headers.append(header.copy())
        return 2 * header


def _nccl_comm(cp, host):
    from gpulayers.distributed import NCCLComm
    comm = object.__new__(NCCLComm)
    fake = _FakeNccl()
    comm._cupy, comm._nccl, comm.comm = cp, fake, fake
    comm.rank, comm.size, comm.device_id, comm.timeout, comm._host = 0, 2, 0, None, host
    return comm, fake


def test_nccl_comm_collectives_run_on_the_current_stream_without_sync(cp):
    stream = cp.cuda.get_current_stream()
    stream.ptr = 0xabc
    host = _HostHeader()
    comm, fake = _nccl_comm(cp, host)
    record = cp.empty(12, np.float64)
    out, sums = comm.allgather(record, host=(5,))
    assert out.shape == (2, 12) and out.dtype == np.float64 and sums == (10.0,)
    shares = cp.empty(6, np.float32)
    total = comm.allreduce_sum(shares)
    assert total.shape == (6,) and total.dtype == np.float32
    assert cp.syncs == []
    # in the buffers' own dtypes (no conversion kernels), on the current stream
    assert fake.calls == [("allGather", 12, fake.NCCL_FLOAT64, 0xabc),
                          ("allReduce", 6, fake.NCCL_FLOAT32, 0xabc)]
    np.testing.assert_array_equal(host.headers[0], [0.0, 12.0, 144.0, 5.0])


def test_nccl_comm_without_a_host_comm_reads_its_header_back(cp):
    """The documented cost of NCCLComm without host_comm / from_mpi: the header crosses
    through NCCL and is read back (a synchronisation)."""
    from gpulayers.distributed import CommError
    cp.cuda.get_current_stream().ptr = 0xabc
    comm, fake = _nccl_comm(cp, None)
    with pytest.raises(CommError, match="SyncError: host read of a device value: ndarray.get"):
        comm.allreduce_sum(cp.empty(4, np.float64))
    assert fake.calls == [("allReduce", 4, fake.NCCL_FLOAT64, 0xabc)]   # the header's
