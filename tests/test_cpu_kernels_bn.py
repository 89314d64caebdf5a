"""The compiled batch-norm loop kernels (gpulayers.cpu_kernels.bn) against float64
references, through the entry points that batchnorm.py calls (numpy_fast for
channels-first planes, bn_rows for (M, C) rows) and the public API."""
import subprocess
import sys

import numpy as np
import pytest

import gpulayers as G
from gpulayers import bn_rows, cpu_kernels, numpy_fast
from gpulayers.cpu_kernels import bn as K

numba = pytest.importorskip("numba")
pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(),
                                reason=f"CPU kernels off: {cpu_kernels.unusable_reason()}")

DTYPES = [np.float32, np.float64]
# odd shapes: C = 1, N = 1, P = 1, large C with small P, small C with large N
PLANE_SHAPES = [(4, 3, 5, 7), (1, 1, 6, 9), (1, 4, 13, 11), (9, 2, 1, 1), (2, 300, 1, 3),
                (257, 2, 2, 3), (3, 5, 40, 41)]
ROW_SHAPES = [(50, 3), (1000, 1), (2, 700), (4099, 16), (7, 64)]


@pytest.fixture(autouse=True)
def kernels_at_every_size(monkeypatch):
    """numpy_fast's entry points take the kernels at every size (test-mode forward
    otherwise leaves small inputs to the general path)."""
    for name in ("BN_TRAIN_FORWARD_MIN", "BN_EVAL_FORWARD_MIN", "BN_BACKWARD_MIN",
                 "BN_EVAL_BACKWARD_MIN"):
        monkeypatch.setattr(numpy_fast, name, 0)


@pytest.fixture
def small_units(monkeypatch):
    """Chunks and row blocks of a few elements, so the merges of many units of unequal
    length run on small inputs."""
    monkeypatch.setattr(K, "PLANE_CHUNK", 16)
    monkeypatch.setattr(K, "ROW_BLOCK", 40)


def _bits(a):
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _sd(dtype):
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


def _ref(x, gamma, beta, dout, axes, eps=1e-5):
    """float64 train-mode BN: out, mean, var, invstd, dx, dgamma, dbeta; and the test-mode
    out and dx for the same statistics."""
    x, dout = x.astype(np.float64), dout.astype(np.float64)
    keep = [1 if a in axes else n for a, n in enumerate(x.shape)]
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    inv = 1 / np.sqrt(var + eps)
    g, b = gamma.astype(np.float64), beta.astype(np.float64)
    xh = (x - mean.reshape(keep)) * inv.reshape(keep)
    out = xh * g.reshape(keep) + b.reshape(keep)
    n = x.size // mean.size
    db, dg = dout.sum(axis=axes), (dout * xh).sum(axis=axes)
    dx = (g * inv).reshape(keep) * (dout - db.reshape(keep) / n - xh * dg.reshape(keep) / n)
    dx_eval = dout * (g * inv).reshape(keep)
    return out, mean, var, inv, dx, dg, db, dx_eval


def _data(rng, shape, C, dtype, loc=1.0, scale=2.0):
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    sd = _sd(dtype)
    gamma = (rng.random(C) + 0.5).astype(sd)
    beta = rng.standard_normal(C).astype(sd)
    return x, dout, gamma, beta, sd


def _tol(dtype):
    return 1e-12 if dtype == np.float64 else 3e-6


def _planes(x, dout, gamma, beta, sd):
    """numpy_fast's four BN entry points on (N, C, H, W)."""
    C = x.shape[1]
    y, mean, var, inv = numpy_fast.bn_train_forward(x, gamma, beta, 1e-5, sd)
    ye = numpy_fast.bn_eval_forward(x, gamma, beta, mean, inv, sd)
    count = x.size // C
    tr = numpy_fast.bn_backward(dout, x, gamma, mean, inv, count, True, sd)
    ev = numpy_fast.bn_backward(dout, x, gamma, mean, inv, count, False, sd)
    return y, mean, var, inv, ye, tr, ev


def _rows(x, dout, gamma, beta, sd):
    """bn_rows' three entry points on (M, C)."""
    y, mean, var, inv, xr = bn_rows.train_forward(x, gamma, beta, 1e-5, sd)
    ye, _ = bn_rows.eval_forward(x, gamma, beta, mean, inv, sd)
    tr = bn_rows.backward(dout, xr, gamma, mean, inv, x.shape[0], True, sd)
    ev = bn_rows.backward(dout, xr, gamma, mean, inv, x.shape[0], False, sd)
    return y, mean, var, inv, ye, tr, ev


def _backward_ref(x, gamma, dout, mean, inv, axes):
    """float64 backward for given (rounded) statistics, as the forward's cache holds them:
    dx (train), dgamma, dbeta, dx (test)."""
    x, dout = x.astype(np.float64), dout.astype(np.float64)
    keep = [1 if a in axes else n for a, n in enumerate(x.shape)]
    mean, inv = mean.astype(np.float64).reshape(keep), inv.astype(np.float64).reshape(keep)
    a = gamma.astype(np.float64).reshape(keep) * inv
    xh = (x - mean) * inv
    n = x.size // mean.size
    db, dg = dout.sum(axis=axes), (dout * xh).sum(axis=axes)
    dx = a * (dout - db.reshape(keep) / n - xh * dg.reshape(keep) / n)
    return dx, dg, db, dout * a


def _check(got, ref, dtype, x, gamma, dout, axes):
    y, mean, var, inv, ye, (dx, dg, db), (dxe, dge, dbe) = got
    out, rmean, rvar, rinv = ref[:4]
    # the backward from the statistics the forward returned (the cache's, in sd)
    rdx, rdg, rdb, rdxe = _backward_ref(x, gamma, dout, mean, inv, axes)
    tol = _tol(dtype)
    for a in (y, mean, var, inv, ye, dx, dg, db, dxe, dge, dbe):
        assert a.dtype == (dtype if a.ndim > 1 else _sd(dtype))
    scale = np.abs(out).max()
    np.testing.assert_allclose(y, out, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(mean, rmean, rtol=tol, atol=tol)
    np.testing.assert_allclose(var, rvar, rtol=tol * 4)
    np.testing.assert_allclose(inv, rinv, rtol=tol * 4)
    # test mode with the batch's (rounded) statistics
    np.testing.assert_allclose(ye, out, rtol=0, atol=tol * 4 * scale)
    np.testing.assert_allclose(dx, rdx, rtol=0, atol=tol * 10 * np.abs(rdx).max())
    gscale = np.abs(rdb).max() + np.abs(rdg).max() + 1
    np.testing.assert_allclose(dg, rdg, rtol=0, atol=tol * 10 * gscale)
    np.testing.assert_allclose(db, rdb, rtol=0, atol=tol * 10 * gscale)
    np.testing.assert_allclose(dxe, rdxe, rtol=0, atol=tol * 4 * np.abs(rdxe).max())
    np.testing.assert_allclose(dge, rdg, rtol=0, atol=tol * 10 * gscale)
    np.testing.assert_allclose(dbe, rdb, rtol=0, atol=tol * 10 * gscale)


# the two entry points with their reduction axes, and the shapes each runs
ENTRY_POINTS = {"planes": (_planes, (0, 2, 3)), "rows": (_rows, (0,))}
SHAPES = [("planes", s) for s in PLANE_SHAPES] + [("rows", s) for s in ROW_SHAPES]


@pytest.mark.parametrize("units", ["default", "small"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, shape", SHAPES,
                         ids=[f"{layout}-{'x'.join(map(str, s))}" for layout, s in SHAPES])
def test_entry_points_match_float64(rng, layout, shape, dtype, units, request):
    if units == "small":
        request.getfixturevalue("small_units")
    run, axes = ENTRY_POINTS[layout]
    x, dout, gamma, beta, sd = _data(rng, shape, shape[1], dtype)
    _check(run(x, dout, gamma, beta, sd), _ref(x, gamma, beta, dout, axes), dtype,
           x, gamma, dout, axes)


@pytest.mark.parametrize("layout", ["planes", "rows"])
def test_large_mean_small_std_float32(rng, layout, small_units):
    # mean 1e4, std 0.1: E[x^2] - E[x]^2 in float32 would be all rounding noise. The planes
    # entry point declines such input (|mean| / std > 64) to the general path; its kernel
    # is checked directly here
    shape = (64, 4, 8, 8) if layout == "planes" else (4096, 4)
    x, dout, gamma, beta, sd = _data(rng, shape, 4, np.float32, loc=1e4, scale=0.1)
    axes = (0, 2, 3) if layout == "planes" else (0,)
    out, rmean, rvar, _, _, _, _, _ = _ref(x, gamma, beta, dout, axes)
    if layout == "planes":
        assert numpy_fast.bn_train_forward(x, gamma, beta, 1e-5, sd) is None
        y = np.empty_like(x)
        mean, var, inv = (np.empty(4, sd) for _ in range(3))
        assert K.train_forward_planes(x.reshape(64, 4, 64), gamma, beta, 1e-5,
                                      K.plane_chunk(64), np.inf, y.reshape(64, 4, 64),
                                      mean, var, inv)
    else:
        y, mean, var, inv, _ = bn_rows.train_forward(x, gamma, beta, 1e-5, sd)
        dx, dg, db = bn_rows.backward(dout, x, gamma, mean, inv, x.shape[0], True, sd)
        rdx, rdg, rdb, _ = _backward_ref(x, gamma, dout, mean, inv, axes)
        np.testing.assert_allclose(dg, rdg, rtol=0, atol=1e-4 * np.abs(rdg).max())
        np.testing.assert_allclose(dx, rdx, rtol=0, atol=1e-4 * np.abs(rdx).max())
    np.testing.assert_allclose(mean, rmean, rtol=1e-7)         # float32 rounding of 1e4
    np.testing.assert_allclose(var, rvar, rtol=1e-5)
    # y from the float64 mean: far below the float32 ulp of 1e4 (~1e-3) over std 0.1
    assert np.abs(y - out).max() < 1e-5 * np.abs(out).max() + 1e-6


@pytest.mark.parametrize("layout", ["planes", "rows"])
def test_constant_channels_give_exact_zeros(layout, small_units):
    # 0.1 is inexact in binary: the sums round, the pivot-shifted sums do not
    x = np.full((6, 2, 5, 7) if layout == "planes" else (300, 2), 0.1, np.float32)
    x[:, 1] = -0.13
    g, b = np.ones(2, np.float32), np.zeros(2, np.float32)
    if layout == "planes":
        y, mean, var, _ = numpy_fast.bn_train_forward(x, g, b, 1e-5, np.float32)
    else:
        y, mean, var, _, _ = bn_rows.train_forward(x, g, b, 1e-5, np.float32)
    assert np.all(var == 0) and np.all(y == 0)
    np.testing.assert_array_equal(mean, [np.float32(0.1), np.float32(-0.13)])


def test_large_mean_over_std_declines_to_the_general_path(rng):
    # |mean| / std > 64: the cache's float32 mean would cost the backward accuracy
    x = (rng.standard_normal((4, 3, 6, 6)) * 0.1 + 1e3).astype(np.float32)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    assert numpy_fast.bn_train_forward(x, g, b, 1e-5, np.float32) is None
    y, cache = G.spatial_batchnorm_forward(x, g, b, {"mode": "train"})
    assert cache.path == "xp"


def _all_outputs(x, dout, gamma, beta, sd, layout):
    got = (_planes if layout == "planes" else _rows)(x, dout, gamma, beta, sd)
    y, mean, var, inv, ye, tr, ev = got
    return [y, mean, var, inv, ye, *tr, *ev]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,shape", [("planes", (5, 3, 48, 50)), ("planes", (1, 1, 150, 200)),
                                          ("rows", (9000, 5)), ("rows", (40, 3000))])
def test_bitwise_repeatable_and_independent_of_thread_count(rng, layout, shape, dtype,
                                                            small_units, monkeypatch):
    C = shape[1]
    x, dout, gamma, beta, sd = _data(rng, shape, C, dtype)
    assert x.size >= cpu_kernels.SERIAL_BELOW    # large enough for the thread pool
    runs = []
    for threads in ("1", "2", "2"):
        monkeypatch.setenv("GPULAYERS_NUM_THREADS", threads)
        runs.append(_all_outputs(x, dout, gamma, beta, sd, layout))
        assert cpu_kernels.threads() == min(int(threads), numba.config.NUMBA_NUM_THREADS)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("layout", ["planes", "rows"])
def test_inputs_not_mutated(rng, layout):
    shape = (4, 3, 9, 10) if layout == "planes" else (97, 6)
    x, dout, gamma, beta, sd = _data(rng, shape, shape[1], np.float32)
    before = [a.copy() for a in (x, dout, gamma, beta)]
    y, mean, var, inv, *_ = _all_outputs(x, dout, gamma, beta, sd, layout)
    stats = [a.copy() for a in (mean, inv)]
    _all_outputs(x, dout, gamma, beta, sd, layout)
    for a, b in zip((x, dout, gamma, beta), before):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    for a, b in zip((mean, inv), stats):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_runs_the_kernels(rng, data_format, dtype, monkeypatch):
    calls = []
    for name in ("train_forward_planes", "backward_planes", "train_forward_rows",
                 "backward_rows"):
        real = getattr(K, name)

        class Spy:
            def __init__(self, real, name):
                self.real, self.name = real, name

            def run(self, *args):
                calls.append(self.name)
                return self.real.run(*args)
        monkeypatch.setattr(K, name, Spy(real, name))
    shape = (6, 5, 7, 4) if data_format == "channels_first" else (6, 7, 4, 5)
    x, dout, gamma, beta, sd = _data(rng, shape, 5, dtype)
    out, cache = G.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train",
                                                              "data_format": data_format})
    dx, dg, db = G.spatial_batchnorm_backward(dout, cache)
    kind = "planes" if data_format == "channels_first" else "rows"
    assert calls == [f"train_forward_{kind}", f"backward_{kind}"]
    axes = (0, 2, 3) if data_format == "channels_first" else (0, 1, 2)
    ref = _ref(x, gamma, beta, dout, axes)
    tol = _tol(dtype)
    np.testing.assert_allclose(out, ref[0], rtol=0, atol=tol * np.abs(ref[0]).max())
    np.testing.assert_allclose(dx, ref[4], rtol=0, atol=tol * 10 * np.abs(ref[4]).max())


def test_float16_keeps_the_numpy_path(rng, monkeypatch):
    def fail(*args):
        raise AssertionError("a kernel ran on float16")
    for name in ("train_forward_planes", "eval_forward_planes", "backward_planes"):
        monkeypatch.setattr(getattr(K, name), "run", fail)
    monkeypatch.setattr(numpy_fast, "BN_TRAIN_SMALL_MIN", 0)
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float16)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, mean, var, inv = numpy_fast.bn_train_forward(x, g, b, 1e-5, np.float32)
    assert y.dtype == np.float16
    dx, dg, db = numpy_fast.bn_backward(x, x, g, mean, inv, x.size // 3, True, np.float32)
    assert dx.dtype == np.float16


def test_import_does_not_load_numba():
    code = "import sys, gpulayers; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not cpu_kernels.enabled(), reason=f"CPU kernels unusable: "
                    f"{cpu_kernels.unusable_reason()}")
def test_a_callee_stays_callable_after_its_caller_compiles(rng):
    # eval_forward_running_planes calls eval_forward_planes: compiling the caller must leave
    # the module's eval_forward_planes a lazy kernel with its .run (callers outside use it)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y0, y1 = np.empty_like(x), np.empty_like(x)
    gc, inv = np.empty(3, np.float32), np.empty(3, np.float32)
    assert K.eval_forward_running_planes.run(x.size, x, g, b, rm, rv, np.float32(1e-5), 40,
                                             y0, gc, inv)
    assert isinstance(K.eval_forward_planes, cpu_kernels._LazyKernel)
    K.eval_forward_planes.run(x.size, x, g, b, rm, inv, 40, y1)
    np.testing.assert_array_equal(y0, y1)
