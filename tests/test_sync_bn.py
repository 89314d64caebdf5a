"""Synchronized batch norm with one collective per forward and one per backward (issue 13 §3).

- In-process ranks (threads with a barrier-based communicator, ThreadComm): K ranks on
  slices of one batch equal one process on the whole batch (float64: 1e-12), every rank
  gets the same bits, each forward makes exactly ONE allgather and each backward ONE
  allreduce_sum; float32 data of mean 1e4 and std 0.1 keep their variance; ranks that
  disagree on C raise ValueError naming C; a communicator with only allreduce_sum still
  works (the zero-padded fallback).
- The CUDA side on the CPU host shim (tests/cuda_shim; the exact batchnorm.cu): each
  simulated rank runs the launches bn_kernels builds for synchronized BN (stats +
  bn_stats_merge -> its record; the gathered records as the apply kernel's partial
  slots; reduce + bn_backward_merge -> its [dbeta, dgamma] shares; dx from the summed
  shares), compared with float64 NumPy on the whole batch.
- On a GPU (marked gpu): NCCLComm on one GPU runs the kernels.
"""
import threading

import numpy as np
import pytest

from gpulayers import batchnorm as B
from gpulayers.backend import cupy_unusable_reason
from gpulayers.cuda import bn_kernels
from gpulayers.distributed import CommSizeError, LocalComm

from conftest import SESSION_SEED

TOL = dict(rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ in-process ranks

class ThreadGroup:
    """What K ThreadComm ranks share: a barrier and one slot per rank."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots = [None] * size


class ThreadComm:
    """Rank ``rank`` of a ThreadGroup: the communicator interface of gpulayers.distributed
    (allreduce_sum, allgather with host numbers, checks_sizes), reduced in rank order in
    float64 (the same bits on every rank); counts its calls."""

    checks_sizes = True

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size
        self.calls = []

    def _exchange(self, value):
        g = self.group
        g.barrier.wait()
        g.slots[self.rank] = value
        g.barrier.wait()
        values = list(g.slots)
        g.barrier.wait()
        sizes = {v[0].size for v in values}
        if len(sizes) > 1:
            mean = sum(v[0].size for v in values) / self.size
            raise CommSizeError(f"rank {self.rank} of {self.size}: different element counts",
                                self.rank, self.size, count=value[0].size, mean_count=mean)
        return values

    def allreduce_sum(self, buf):
        self.calls.append("allreduce_sum")
        values = self._exchange((buf, ()))
        total = np.zeros(buf.size, np.float64)
        for v, _ in values:
            total += v
        return total.astype(buf.dtype)

    def allgather(self, buf, host=None):
        self.calls.append("allgather")
        values = self._exchange((buf, tuple(host or ())))
        out = np.stack([v for v, _ in values]).astype(buf.dtype)
        if host is None:
            return out
        return out, tuple(float(sum(h[i] for _, h in values)) for i in range(len(host)))


class ReduceOnlyComm(ThreadComm):
    """A third-party communicator: allreduce_sum only, no size checks of its own."""

    checks_sizes = False
    allgather = property(lambda self: (_ for _ in ()).throw(AttributeError("allgather")))


def run_ranks(size, fn, comm_class=ThreadComm):
    """fn(comm) on ``size`` threads; the per-rank results (or the exceptions raised)."""
    group = ThreadGroup(size)
    comms = [comm_class(group, r) for r in range(size)]
    results = [None] * size

    def body(r):
        try:
            results[r] = fn(comms[r])
        except BaseException as exc:   # noqa: BLE001  (reported per rank; a rank left
            results[r] = exc           # waiting raises BrokenBarrierError after the timeout)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, comms


def _batch(rng, layout, n, C, loc=3.0, scale=2.0, dtype=np.float64):
    shape = (n, C) if layout == "nd" else (n, C, 3, 4) if layout == "nchw" else (n, C, 5)
    x = rng.normal(loc, scale, size=shape) * (1 + np.arange(C)).reshape((1, C) + (1,) * (len(shape) - 2))
    return x.astype(dtype), rng.normal(size=shape).astype(dtype)


def _functions(layout):
    if layout == "nd":
        return B.batchnorm_forward, B.batchnorm_backward
    return B.spatial_batchnorm_forward, B.spatial_batchnorm_backward


def _steps(x, dout, gamma, beta, convention, comm=None, sl=slice(None), steps=2):
    fwd, bwd = _functions("nd" if x[0].ndim == 2 else "nchw")
    p = {"mode": "train", "convention": convention, "momentum": 0.8}
    if comm is not None:
        p["comm"] = comm
    out = {}
    for step in range(steps):
        xs, ds = x[step][sl], dout[step][sl]
        y, cache = fwd(xs, gamma, beta, p)
        out[f"y{step}"], (out[f"dx{step}"], out[f"dgamma{step}"], out[f"dbeta{step}"]) = (
            y, bwd(ds, cache))
    out["running_mean"], out["running_var"] = p["running_mean"], p["running_var"]
    return out


@pytest.mark.parametrize("layout", ["nd", "nchw", "ncl"])
@pytest.mark.parametrize("convention", ["cs231n", "torch"])
@pytest.mark.parametrize("splits", [[4, 4], [1, 5, 2], [0, 6, 3], [2, 0, 0, 5]])
def test_ranks_equal_one_process_with_one_collective_each_way(layout, convention, splits):
    rng = np.random.default_rng([SESSION_SEED, len(splits), sum(splits)])
    C, n = 3, sum(splits)
    x, dout = zip(*(_batch(rng, layout, n, C) for _ in range(2)))
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    ref = _steps(x, dout, gamma, beta, convention)
    starts = np.cumsum([0] + splits)

    def rank(comm):
        return _steps(x, dout, gamma, beta, convention, comm,
                      slice(starts[comm.rank], starts[comm.rank + 1]))

    results, comms = run_ranks(len(splits), rank)
    for r, got in enumerate(results):
        assert not isinstance(got, BaseException), f"rank {r}: {got!r}"
        # exactly one collective per forward and one per backward
        assert comms[r].calls == ["allgather", "allreduce_sum"] * 2, comms[r].calls
    for key in ref:
        if key[:2] in ("y0", "y1", "dx"):
            got = np.concatenate([res[key] for res in results])
            np.testing.assert_allclose(got, ref[key], **TOL, err_msg=key)
        else:
            for res in results:
                np.testing.assert_allclose(res[key], ref[key], **TOL, err_msg=key)
                np.testing.assert_array_equal(res[key], results[0][key], err_msg=key)


def test_float32_large_mean_small_std_keeps_its_variance():
    """mean 1e4, std 0.1 in float32 over 3 ranks: the variance and the normalized output
    to float32 rounding, as one process gets them."""
    rng = np.random.default_rng([SESSION_SEED, 13])
    C, splits = 4, [7, 2, 5]
    x = (1e4 + 0.1 * rng.standard_normal((sum(splits), C, 6, 6))).astype(np.float32)
    x64 = x.astype(np.float64)
    var = x64.var(axis=(0, 2, 3))
    xhat = (x64 - x64.mean(axis=(0, 2, 3)).reshape(1, -1, 1, 1)) / np.sqrt(var + 1e-5).reshape(1, -1, 1, 1)
    starts = np.cumsum([0] + splits)

    def rank(comm):
        p = {"mode": "train", "comm": comm, "momentum": 0.0}
        y, _ = B.spatial_batchnorm_forward(x[starts[comm.rank]:starts[comm.rank + 1]],
                                           np.ones(C, np.float32), np.zeros(C, np.float32), p)
        return y, p["running_var"]

    results, _ = run_ranks(len(splits), rank)
    y = np.concatenate([r[0] for r in results])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, xhat, atol=2e-3)   # float32 rounding of x itself: 1e4 * 6e-8
    for _, rv in results:
        np.testing.assert_allclose(rv, var, rtol=1e-2)   # the data's own rounding: 5e-4 of 0.1
    # the same sums on one process
    one = {"mode": "train", "momentum": 0.0}
    B.spatial_batchnorm_forward(x, np.ones(C, np.float32), np.zeros(C, np.float32), one)
    np.testing.assert_allclose(results[0][1], one["running_var"], rtol=1e-4)


@pytest.mark.parametrize("layout", ["nd", "nchw"])
def test_ranks_that_disagree_on_channels_raise_value_error_naming_c(layout):
    def rank(comm):
        C = 3 + comm.rank
        x, _ = _batch(np.random.default_rng(comm.rank), layout, 4, C)
        _functions(layout)[0](x, np.ones(C), np.zeros(C), {"mode": "train", "comm": comm})

    results, _ = run_ranks(2, rank)
    for r, exc in enumerate(results):
        assert isinstance(exc, ValueError), (r, exc)
        assert f"ranks disagree on the number of channels (this rank has C = {3 + r}" in str(exc)


def test_reduce_only_communicator_falls_back_to_a_padded_allreduce():
    rng = np.random.default_rng([SESSION_SEED, 17])
    splits, C = [3, 5], 2
    x, dout = zip(*(_batch(rng, "nchw", 8, C) for _ in range(1)))
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    ref = _steps(x, dout, gamma, beta, "torch", steps=1)

    def rank(comm):
        sl = slice(0, 3) if comm.rank == 0 else slice(3, 8)
        return _steps(x, dout, gamma, beta, "torch", comm, sl, steps=1)

    results, comms = run_ranks(2, rank, ReduceOnlyComm)
    for r, got in enumerate(results):
        assert not isinstance(got, BaseException), f"rank {r}: {got!r}"
        # channel check + the padded gather, then the backward's all-reduce
        assert comms[r].calls == ["allreduce_sum"] * 3
    np.testing.assert_allclose(np.concatenate([r["y0"] for r in results]), ref["y0"], **TOL)
    np.testing.assert_allclose(results[1]["running_var"], ref["running_var"], **TOL)


def test_merge_of_records_matches_one_pass():
    """_merge_records (Chan's formula in rank order, with empty ranks) on exact data."""
    rng = np.random.default_rng([SESSION_SEED, 19])
    parts = [rng.normal(5.0, 3.0, size=(n, 4)) for n in (3, 0, 7, 1)]
    records = []
    for a in parts:
        n = a.shape[0]
        mean = a.mean(axis=0) if n else np.zeros(4)
        m2 = ((a - mean) ** 2).sum(axis=0) if n else np.zeros(4)
        records.append(np.stack([np.full(4, float(n)), mean, np.zeros(4), m2]).reshape(-1))
    n, hi, lo, m2 = B._merge_records(np, np.stack(records), 4)
    whole = np.concatenate(parts)
    np.testing.assert_array_equal(n, np.full(4, 11.0))
    np.testing.assert_allclose(hi + lo, whole.mean(axis=0), **TOL)
    np.testing.assert_allclose(m2, ((whole - whole.mean(axis=0)) ** 2).sum(axis=0), **TOL)


def test_local_comm_matches_no_comm_on_the_comm_path():
    rng = np.random.default_rng([SESSION_SEED, 23])
    x, dout = zip(*(_batch(rng, "nchw", 6, 3) for _ in range(2)))
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    ref = _steps(x, dout, gamma, beta, "torch")
    got = _steps(x, dout, gamma, beta, "torch", LocalComm())
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], **TOL, err_msg=key)


# ------------------------------------------------------------------ CUDA kernels on the shim

THREADS = 256
EPS = 1e-5
# (per-rank shapes of one batch split along N), dtype, loc, scale
SHIM_CASES = [
    ([(3, 3, 5, 5), (1, 3, 5, 5), (4, 3, 5, 5)], np.float64, 3.0, 2.0),      # columns
    ([(2, 2, 16, 16), (3, 2, 16, 16)], np.float64, -1.0, 0.5),               # planes
    ([(40, 5, 1, 1), (25, 5, 1, 1), (7, 5, 1, 1)], np.float64, 0.0, 1.0),    # (N, D)
    ([(2, 2, 16, 16), (3, 2, 16, 16), (1, 2, 16, 16)], np.float32, 1e4, 0.1),
    ([(30, 6, 1, 1), (34, 6, 1, 1)], np.float32, 1e4, 0.1),
]


def _prepared(shape, dtype):
    return bn_kernels.prepare(shape, np.dtype(dtype), True, 132, lambda e: (None, e))


def _merge(dtype):
    return (None, f"bn_stats_merge<{bn_kernels._CTYPE[bn_kernels.stats_dtype(dtype)]}>")


@pytest.fixture(scope="module")
def shim():
    cuda_shim = pytest.importorskip("cuda_shim")
    if cuda_shim.compiler() is None:
        pytest.skip("no C++ compiler for the CPU shim")
    from importlib import resources
    expressions = set()
    for shapes, dtype, _, _ in SHIM_CASES:
        expressions.add(_merge(dtype)[1])
        for shape in shapes:
            p = _prepared(shape, dtype)
            expressions.update(p.kernels[k][1] for k in
                               ("stats", "apply_train", "reduce_train", "backward_merge", "dx"))
    source = resources.files("gpulayers.cuda").joinpath(bn_kernels.SOURCE)
    return cuda_shim.build(str(source), sorted(expressions))


def _run(lib, launches):
    for (_, expression), grid, args in launches:
        lib.launch(expression, grid, THREADS, args)


@pytest.mark.parametrize("case", range(len(SHIM_CASES)))
def test_sync_launches_on_the_shim_equal_the_whole_batch(shim, case):
    shapes, dtype, loc, scale = SHIM_CASES[case]
    rng = np.random.default_rng([SESSION_SEED, 29, case])
    A = bn_kernels.stats_dtype(dtype)
    C = shapes[0][1]
    xs = [(rng.standard_normal(s) * scale + loc).astype(dtype) for s in shapes]
    ds = [rng.standard_normal(s).astype(dtype) for s in shapes]
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(A), rng.normal(size=C).astype(A)
    rm, rv = rng.normal(size=C).astype(A), rng.uniform(0.5, 2, C).astype(A)
    total = sum(s[0] * s[2] * s[3] for s in shapes)
    # forward: every rank's record, gathered in rank order
    records = []
    for x in xs:
        p = _prepared(x.shape, dtype)
        part = np.full(p.part_size, np.nan, A)
        record = np.full(4 * C, np.nan)
        _run(shim, bn_kernels._sync_stats_launches(p, _merge(dtype), x, part, record))
        records.append(record)
    gathered = np.stack(records)
    np.testing.assert_array_equal(gathered.reshape(-1, 4, C)[:, 0, 0],
                                  [s[0] * s[2] * s[3] for s in shapes])
    ys, blocks = [], []
    slots = np.ascontiguousarray(gathered.reshape(len(xs), 4, C).transpose(1, 2, 0), dtype=A)
    factor = total / (total - 1)
    for x in xs:
        p = _prepared(x.shape, dtype)
        y, stats = np.full_like(x, np.nan), np.full((6, C), np.nan, A)
        _run(shim, bn_kernels._sync_apply_launches(p, x, gamma, beta, EPS, rm, rv, 3, 0.9, 0.1,
                                                   factor, 1.0, slots, len(xs), stats, y))
        ys.append(y)
        blocks.append(stats)
    for stats in blocks[1:]:
        np.testing.assert_array_equal(stats, blocks[0])   # the same bits on every rank
    x64 = np.concatenate(xs).astype(np.float64)
    mean, var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(var + EPS)
    s4 = (1, -1, 1, 1)
    xhat = (x64 - mean.reshape(s4)) * invstd.reshape(s4)
    y_ref = xhat * gamma.reshape(s4) + beta.reshape(s4)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    stats = blocks[0].astype(np.float64)
    # the mean to rounding of the spread (mean_lo keeps what rounding the mean lost)
    np.testing.assert_allclose(stats[0] + stats[3], mean, rtol=0,
                               atol=(1e-14 if dtype == np.float64 else 1e-5) * (abs(loc) + scale))
    np.testing.assert_allclose(stats[1], var, rtol=tol if dtype == np.float64 else 1e-4)
    np.testing.assert_allclose(stats[5], 0.9 * rv + 0.1 * var * factor,
                               rtol=tol if dtype == np.float64 else 1e-4)
    np.testing.assert_allclose(stats[4], 0.9 * rm + 0.1 * mean, rtol=tol)
    np.testing.assert_allclose(np.concatenate(ys), y_ref, atol=tol * 10 if dtype != np.float64 else tol,
                               rtol=tol if dtype == np.float64 else 1e-3)
    # backward: every rank's [dbeta, dgamma] shares, summed (a comm), then dx
    mean_a, invstd_a, lo_a = blocks[0][0], blocks[0][2], blocks[0][3]
    shares = []
    for x, d in zip(xs, ds):
        p = _prepared(x.shape, dtype)
        part = np.full(p.part_size, np.nan, A)
        sh = np.full((2, C), np.nan, A)
        _run(shim, bn_kernels._sync_backward_launches(p, d, x, gamma, mean_a, lo_a, invstd_a,
                                                      part, sh))
        shares.append(sh.astype(np.float64))
    totals = np.sum(shares, axis=0).astype(A)
    sums = np.stack([totals[0], totals[1] / invstd_a]).astype(A)
    dxs = []
    for x, d in zip(xs, ds):
        p = _prepared(x.shape, dtype)
        dx, scratch = np.full_like(x, np.nan), np.full((2, C), np.nan, A)
        _run(shim, bn_kernels._sync_dx_launches(p, d, x, gamma, mean_a, lo_a, invstd_a, sums,
                                                total, scratch, dx))
        dxs.append(dx)
    d64 = np.concatenate(ds).astype(np.float64)
    dbeta, dgamma = d64.sum(axis=(0, 2, 3)), (d64 * xhat).sum(axis=(0, 2, 3))
    dx_ref = ((gamma * invstd).reshape(s4) / total
              * (total * d64 - dbeta.reshape(s4) - xhat * dgamma.reshape(s4)))
    np.testing.assert_allclose(totals[0], dbeta, rtol=tol, atol=tol * total)
    np.testing.assert_allclose(totals[1], dgamma, rtol=tol if dtype == np.float64 else 1e-3,
                               atol=tol * total)
    scale_dx = float(np.max(np.abs(d64 * (gamma * invstd).reshape(s4))))
    err = np.max(np.abs(np.concatenate(dxs) - dx_ref)) / scale_dx
    assert err < (1e-12 if dtype == np.float64 else 1e-3), err


# ------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(cupy_unusable_reason() is not None, reason=f"needs CuPy: {cupy_unusable_reason()}")
def test_nccl_one_gpu_runs_the_kernels():
    """NCCLComm on one GPU (host header over MPI.COMM_SELF when mpi4py is there): the
    synchronized path takes the kernels ("cuda" cache), makes one collective each way and
    equals plain BN."""
    import cupy
    from cupy.cuda import nccl
    from gpulayers.distributed import NCCLComm
    if not getattr(nccl, "available", True):
        pytest.skip("this CuPy build has no NCCL")
    try:
        from mpi4py import MPI
        host = MPI.COMM_SELF
    except ImportError:
        host = None
    comm = NCCLComm((1, nccl.get_unique_id(), 0), host_comm=host)
    calls = []

    class Counting:
        rank, size, checks_sizes = 0, 1, True

        def allgather(self, buf, host=None):
            calls.append("allgather")
            return comm.allgather(buf, host=host)

        def allreduce_sum(self, buf):
            calls.append("allreduce_sum")
            return comm.allreduce_sum(buf)

    rng = np.random.default_rng([SESSION_SEED, 31])
    x = cupy.asarray(rng.normal(3, 2, (8, 16, 12, 12)).astype(np.float32))
    dout = cupy.asarray(rng.standard_normal(x.shape).astype(np.float32))
    g, b = cupy.ones(16, cupy.float32), cupy.zeros(16, cupy.float32)
    synced, plain = {"mode": "train", "comm": Counting()}, {"mode": "train"}
    y_s, c_s = B.spatial_batchnorm_forward(x, g, b, synced)
    y_p, c_p = B.spatial_batchnorm_forward(x, g, b, plain)
    assert c_s.path == "cuda" and c_s.count == 8 * 12 * 12
    cupy.testing.assert_allclose(y_s, y_p, rtol=1e-5, atol=1e-5)
    for a, e in zip(B.spatial_batchnorm_backward(dout, c_s), B.spatial_batchnorm_backward(dout, c_p)):
        cupy.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)
    assert calls == ["allgather", "allreduce_sum"]
