"""The NumPy fast paths against the general xp paths, bit for bit where promised."""
import numpy as np
import pytest

import gpulayers as G
from gpulayers import numpy_fast
from gpulayers.pooling import _max_pool_backward_xp

# (pool_param, input H, W): overlapping and disjoint windows, padding, dilation, ceil_mode
POOL_CASES = [
    (dict(pool_height=3, pool_width=3, stride=2, pad=1), 13, 12),
    (dict(pool_height=3, pool_width=3, stride=1, pad=1), 9, 10),
    (dict(pool_height=2, pool_width=2, stride=2), 12, 10),
    (dict(pool_height=2, pool_width=3, stride=(2, 3)), 9, 10),
    (dict(pool_height=3, pool_width=2, stride=(1, 2), pad=(1, 0), ceil_mode=True), 8, 9),
    (dict(pool_height=2, pool_width=2, stride=1, dilation=2), 9, 9),
    (dict(pool_height=3, pool_width=3, stride=2, dilation=(2, 1), pad=1), 11, 7),
    (dict(pool_height=2, pool_width=2, stride=3, dilation=2, ceil_mode=True), 10, 11),
    (dict(pool_height=5, pool_width=1, stride=(2, 1), pad=(2, 0)), 12, 4),
]


def _bits(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("pp,H,W", POOL_CASES)
def test_max_pool_backward_bitwise_equal_to_general(rng, pp, H, W, dtype):
    # ties (small integers) make many elements the maximum of several windows, and
    # dout spans many magnitudes, so the order of the sums shows in the last bits
    x = rng.integers(0, 4, size=(3, 5, H, W)).astype(dtype)
    out, cache = G.max_pool_forward(x, pp)
    dout = (rng.standard_normal(out.shape) * 10.0 ** rng.integers(-4, 5, out.shape)).astype(dtype)
    dout.flat[::7] = -0.0
    got = numpy_fast.max_pool_backward(dout, cache.offsets, cache.geom)
    ref = _max_pool_backward_xp(dout, cache.offsets, cache.geom)
    assert got.dtype == ref.dtype == dtype
    np.testing.assert_array_equal(_bits(got), _bits(ref))
    np.testing.assert_array_equal(_bits(G.max_pool_backward(dout, cache)), _bits(ref))


def test_max_pool_backward_non_finite_dout_matches_general(rng):
    pp = dict(pool_height=3, pool_width=3, stride=2, pad=1)
    x = rng.integers(0, 3, size=(2, 3, 11, 11)).astype(np.float32)
    out, cache = G.max_pool_forward(x, pp)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dout.flat[rng.choice(dout.size, 20, replace=False)] = [np.nan, np.inf, -np.inf, 3e38] * 5
    with np.errstate(over="ignore", invalid="ignore"):
        got = numpy_fast.max_pool_backward(dout, cache.offsets, cache.geom)
        ref = _max_pool_backward_xp(dout, cache.offsets, cache.geom)
    np.testing.assert_array_equal(got, ref)   # NaN positions equal too


def test_max_pool_backward_blocks_and_threads(rng, monkeypatch):
    # many small blocks spread over threads give the same bits as one block
    pp = dict(pool_height=3, pool_width=3, stride=2, pad=1)
    x = rng.standard_normal((4, 6, 15, 14)).astype(np.float32)
    out, cache = G.max_pool_forward(x, pp)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    ref = _max_pool_backward_xp(dout, cache.offsets, cache.geom)
    monkeypatch.setattr(numpy_fast, "BLOCK_BYTES", 1)
    monkeypatch.setenv("GPULAYERS_NUM_THREADS", "2")
    got = numpy_fast.max_pool_backward(dout, cache.offsets, cache.geom)
    np.testing.assert_array_equal(_bits(got), _bits(ref))


# ------------------------------------------------------------------------ batch norm


def _bn64(x, gamma, beta, dout, eps=1e-5):
    """float64 reference: out, mean, var, dx, dgamma, dbeta of train-mode spatial BN."""
    x, dout = x.astype(np.float64), dout.astype(np.float64)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    inv = 1 / np.sqrt(var + eps)
    xh = (x - mean[:, None, None]) * inv[:, None, None]
    out = xh * gamma[:, None, None] + beta[:, None, None]
    n = x.size // x.shape[1]
    db, dg = dout.sum(axis=(0, 2, 3)), (dout * xh).sum(axis=(0, 2, 3))
    dx = (gamma * inv)[:, None, None] * (dout - db[:, None, None] / n - xh * dg[:, None, None] / n)
    return out, mean, var, dx, dg, db


# |mean| / std around the thresholds of the one-pass moments (4) and the folded affine (8)
@pytest.mark.parametrize("ratio", [0.0, 3.5, 4.5, 7.5, 8.5, 40.0])
def test_bn_fast_paths_match_float64(rng, ratio):
    C = 5
    x = (rng.standard_normal((6, C, 7, 9)) * 2 + 2 * ratio).astype(np.float32)
    gamma = (rng.random(C) + 0.5).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    out, mean, var, dx, dg, db = _bn64(x, gamma, beta, dout)
    y, m, v, inv = numpy_fast.bn_train_forward(x, gamma, beta, 1e-5, np.float32)
    tol = 1e-5 * (1 + ratio)
    np.testing.assert_allclose(y, out, rtol=0, atol=tol)
    np.testing.assert_allclose(v, var, rtol=2e-6)
    np.testing.assert_allclose(numpy_fast.bn_eval_forward(x, gamma, beta, m, inv, np.float32), out,
                               rtol=0, atol=tol)
    gx, gg, gb = numpy_fast.bn_backward(dout, x, gamma, m, inv, x.size // C, True, np.float32)
    np.testing.assert_allclose(gx, dx, rtol=0, atol=1e-5 * np.abs(dx).max())
    np.testing.assert_allclose(gg, dg, rtol=0, atol=1e-5 * np.abs(dout).sum() / C)
    np.testing.assert_allclose(gb, db, rtol=1e-5, atol=1e-3)


def test_bn_constant_planes_exact_zeros_with_inexact_sums():
    # 0.1 is not exact in binary: sum(x)^2 / P and sum(x^2) differ by rounding noise,
    # which must not turn into a variance (the exact pivot pass takes over); |mean| / std
    # stays under 64 (std = sqrt(eps)), so the fast path answers
    x = np.full((3, 2, 11, 13), 0.1, dtype=np.float32)
    x[:, 1] = -0.13
    y, mean, var, _ = numpy_fast.bn_train_forward(x, np.ones(2, np.float32),
                                                  np.zeros(2, np.float32), 1e-5, np.float32)
    assert np.all(var == 0) and np.all(y == 0)


def test_bn_eval_large_running_mean_not_folded(rng):
    # running mean 1e4 with std 0.1: x * a + (b - mean * a) would lose ~1e5 eps
    x = (rng.standard_normal((4, 3, 6, 6)) * 0.1 + 1e4).astype(np.float32)
    mean = np.full(3, 1e4, np.float32)
    inv = np.full(3, 10.0, np.float32)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    y = numpy_fast.bn_eval_forward(x, g, b, mean, inv, np.float32)
    ref = (x.astype(np.float64) - 1e4) * 10
    assert np.abs(y - ref).max() < 1e-2   # float32 ulp of 1e4 is ~1e-3, times 10
