"""The NumPy fast paths against the general xp paths, bit for bit where promised."""
import numpy as np
import pytest

import gpulayers as G
from gpulayers import numpy_fast
from gpulayers.pooling import _max_pool_backward_xp, _max_pool_forward_xp

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


_THRESHOLDS = ("MAX_POOL_FORWARD_MIN", "MAX_POOL_BACKWARD_MIN", "BN_TRAIN_SMALL_MIN",
               "BN_TRAIN_FORWARD_MIN", "BN_EVAL_FORWARD_MIN", "BN_BACKWARD_MIN",
               "BN_EVAL_BACKWARD_MIN")
_NEVER = 1 << 62


def _force(monkeypatch, path):
    """Make every numpy_fast op take its blocked path ('blocked') or its simple path
    ('small'; BN train forward answers, by _bn_train_small, instead of declining)."""
    for name in _THRESHOLDS:
        monkeypatch.setattr(numpy_fast, name, 0 if path == "blocked" else _NEVER)
    monkeypatch.setattr(numpy_fast, "BN_EVAL_SMALL_MIN", 0)   # BN eval forward answers
    if path == "small":
        monkeypatch.setattr(numpy_fast, "BN_TRAIN_SMALL_MIN", 0)


@pytest.fixture(params=["blocked", "small"])
def path(request, monkeypatch):
    """Each test below runs once through the blocked, threaded code and once through
    the simple single-threaded code that serves inputs under the thresholds."""
    _force(monkeypatch, request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("pp,H,W", POOL_CASES)
def test_max_pool_backward_bitwise_equal_to_general(rng, pp, H, W, dtype, path):
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


def test_max_pool_backward_non_finite_dout_matches_general(rng, path):
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
    _force(monkeypatch, "blocked")
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
def test_bn_fast_paths_match_float64(rng, ratio, path):
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


def test_bn_constant_planes_exact_zeros_with_inexact_sums(path):
    # 0.1 is not exact in binary: sum(x)^2 / P and sum(x^2) differ by rounding noise,
    # which must not turn into a variance (the exact pivot pass takes over); |mean| / std
    # stays under 64 (std = sqrt(eps)), so the fast path answers
    x = np.full((3, 2, 11, 13), 0.1, dtype=np.float32)
    x[:, 1] = -0.13
    y, mean, var, _ = numpy_fast.bn_train_forward(x, np.ones(2, np.float32),
                                                  np.zeros(2, np.float32), 1e-5, np.float32)
    assert np.all(var == 0) and np.all(y == 0)


def test_bn_eval_large_running_mean_not_folded(rng, path):
    # running mean 1e4 with std 0.1: x * a + (b - mean * a) would lose ~1e5 eps
    x = (rng.standard_normal((4, 3, 6, 6)) * 0.1 + 1e4).astype(np.float32)
    mean = np.full(3, 1e4, np.float32)
    inv = np.full(3, 10.0, np.float32)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    y = numpy_fast.bn_eval_forward(x, g, b, mean, inv, np.float32)
    ref = (x.astype(np.float64) - 1e4) * 10
    assert np.abs(y - ref).max() < 1e-2   # float32 ulp of 1e4 is ~1e-3, times 10


# ------------------------------------------------------- dispatch by size (no timing)


def _no_blocks(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the blocked, threaded path ran below its threshold")
    monkeypatch.setattr(numpy_fast, "_run_blocks", fail)


def _count_blocks(monkeypatch):
    calls = []
    real = numpy_fast._run_blocks

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(numpy_fast, "_run_blocks", spy)
    return calls


def test_thresholds_are_ordered_sizes():
    for name in _THRESHOLDS:
        assert isinstance(getattr(numpy_fast, name), int) and getattr(numpy_fast, name) >= 0, name
    assert numpy_fast.BN_TRAIN_SMALL_MIN <= numpy_fast.BN_TRAIN_FORWARD_MIN
    assert "scripts/bench.py" in numpy_fast.SMALL_MEASUREMENT


def test_small_inputs_skip_the_blocked_path(rng, monkeypatch):
    # the sizes through the public calls, default thresholds: neither reaches the
    # blocked code, except max-pool forward, where the blocked path is faster from
    # MAX_POOL_FORWARD_MIN on, and for windows of more than MAX_POOL_FORWARD_SMALL_WINDOW
    # taps at every size
    _no_blocks(monkeypatch)
    for shape in [(2, 3, 4, 5), (8, 32, 28, 28)]:
        n = int(np.prod(shape))
        assert n < min(numpy_fast.MAX_POOL_BACKWARD_MIN, numpy_fast.BN_TRAIN_FORWARD_MIN,
                       numpy_fast.BN_EVAL_FORWARD_MIN, numpy_fast.BN_BACKWARD_MIN,
                       numpy_fast.BN_EVAL_BACKWARD_MIN)
        x = rng.standard_normal(shape).astype(np.float32)
        for pp in (dict(pool_height=2, pool_width=2), dict(pool_height=3, pool_width=3,
                                                           stride=2, pad=1)):
            small = (n < numpy_fast.MAX_POOL_FORWARD_MIN and pp["pool_height"] * pp["pool_width"]
                     <= numpy_fast.MAX_POOL_FORWARD_SMALL_WINDOW)
            out, cache = (G.max_pool_forward if small else G.max_pool_forward_general)(x, pp)
            G.max_pool_backward(np.ones_like(out), cache)
        g, b = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
        for mode in ("train", "test"):
            y, cache = G.spatial_batchnorm_forward(x, g, b, dict(mode=mode, running_mean=g * 0,
                                                                 running_var=g))
            G.spatial_batchnorm_backward(np.ones_like(y), cache)


@pytest.mark.parametrize("pp,small_window", [
    (dict(pool_height=2, pool_width=2), True),
    (dict(pool_height=2, pool_width=2, stride=1, pad=1), True),
    (dict(pool_height=3, pool_width=3, stride=2, pad=1), False)])
def test_max_pool_dispatch_follows_the_thresholds(rng, monkeypatch, pp, small_window):
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    geom = G.max_pool_forward_general(x, pp)[1].geom
    assert (geom.window_size <= numpy_fast.MAX_POOL_FORWARD_SMALL_WINDOW) == small_window
    general_calls = []

    def general(xb, gb):
        general_calls.append(xb.shape)
        return _max_pool_forward_xp(xb, gb)
    ref_out, ref_off = _max_pool_forward_xp(x, geom)
    dout = rng.standard_normal(geom.output_shape).astype(np.float32)
    ref_dx = _max_pool_backward_xp(dout, ref_off, geom)
    blocks = _count_blocks(monkeypatch)
    monkeypatch.setattr(numpy_fast, "MAX_POOL_FORWARD_MIN", x.size + 1)
    monkeypatch.setattr(numpy_fast, "MAX_POOL_BACKWARD_MIN", x.size + 1)
    out, off = numpy_fast.max_pool_forward(x, geom, general)
    dx = numpy_fast.max_pool_backward(dout, off, geom)
    # below the thresholds: the general forward (small windows only), no blocks in backward
    assert blocks == ([] if small_window else [6])
    assert general_calls == ([x.shape] if small_window else [])
    monkeypatch.setattr(numpy_fast, "MAX_POOL_FORWARD_MIN", x.size)
    monkeypatch.setattr(numpy_fast, "MAX_POOL_BACKWARD_MIN", x.size)
    out2, off2 = numpy_fast.max_pool_forward(x, geom, general)
    dx2 = numpy_fast.max_pool_backward(dout, off2, geom)
    # at the thresholds: both by blocks of the N*C planes
    assert blocks == ([6, 6] if small_window else [6, 6, 6])
    assert general_calls == ([x.shape] if small_window else [])
    for a, b in [(out, ref_out), (out2, ref_out), (dx, ref_dx), (dx2, ref_dx)]:
        np.testing.assert_array_equal(_bits(a), _bits(b))
    np.testing.assert_array_equal(off, ref_off)
    np.testing.assert_array_equal(off2, ref_off)


def test_bn_dispatch_follows_the_thresholds(rng, monkeypatch):
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    sd = np.float32
    blocks = _count_blocks(monkeypatch)
    for name in _THRESHOLDS:
        monkeypatch.setattr(numpy_fast, name, x.size + 1)
    assert numpy_fast.bn_train_forward(x, g, b, 1e-5, sd) is None   # the caller's general path
    m0, inv0 = np.zeros(4, np.float32), np.ones(4, np.float32)
    monkeypatch.setattr(numpy_fast, "BN_EVAL_SMALL_MIN", x.size + 1)
    assert numpy_fast.bn_eval_forward(x, g, b, m0, inv0, sd) is None  # likewise
    monkeypatch.setattr(numpy_fast, "BN_EVAL_SMALL_MIN", x.size)
    monkeypatch.setattr(numpy_fast, "BN_TRAIN_SMALL_MIN", x.size)
    y, m, v, inv = numpy_fast.bn_train_forward(x, g, b, 1e-5, sd)   # _bn_train_small
    numpy_fast.bn_eval_forward(x, g, b, m, inv, sd)
    numpy_fast.bn_backward(x, x, g, m, inv, x.size // 4, True, sd)
    assert blocks == []
    for name in _THRESHOLDS:
        monkeypatch.setattr(numpy_fast, name, x.size)
    assert numpy_fast.bn_train_forward(x, g, b, 1e-5, sd) is not None
    assert len(blocks) == 2                                   # statistics, affine
    numpy_fast.bn_eval_forward(x, g, b, m, inv, sd)
    assert len(blocks) == 3
    numpy_fast.bn_backward(x, x, g, m, inv, x.size // 4, True, sd)
    assert len(blocks) == 5                                   # sums, gradient
    numpy_fast.bn_backward(x, x, g, m, inv, x.size // 4, False, sd)
    assert len(blocks) == 7
    monkeypatch.setattr(numpy_fast, "BN_EVAL_BACKWARD_MIN", x.size + 1)
    numpy_fast.bn_backward(x, x, g, m, inv, x.size // 4, False, sd)
    assert len(blocks) == 7


def test_public_bn_small_train_takes_the_general_path(rng):
    # below BN_TRAIN_SMALL_MIN the public forward is the general path: same bits, xhat cache
    shape = (2, 3, 4, 5)
    assert np.prod(shape) < numpy_fast.BN_TRAIN_SMALL_MIN
    x = rng.standard_normal(shape).astype(np.float32)
    g = (rng.random(3) + 0.5).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    y, cache = G.spatial_batchnorm_forward(x, g, b, dict(mode="train"))
    y2, cache2 = G.spatial_batchnorm_forward_general(x, g, b, dict(mode="train"))
    np.testing.assert_array_equal(_bits(y), _bits(y2))
    dout = rng.standard_normal(shape).astype(np.float32)
    for got, ref in zip(G.spatial_batchnorm_backward(dout, cache),
                        G.spatial_batchnorm_backward_general(dout, cache2)):
        np.testing.assert_array_equal(_bits(got), _bits(ref))


# ---------------------------------------------------------------------- signed zero


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("pp", [dict(pool_height=2, pool_width=2),
                                dict(pool_height=3, pool_width=3, stride=2, pad=1),
                                dict(pool_height=3, pool_width=2, stride=1),
                                dict(pool_height=1, pool_width=3, stride=(1, 2))])
def test_max_pool_output_is_the_argmax_element_signed_zero(rng, pp, dtype, path):
    # -0.0 == +0.0: the first in window order wins, and out carries that element's sign
    x = rng.choice(np.array([-0.0, 0.0, -1.0, -2.5]), size=(3, 4, 9, 10)).astype(dtype)
    x[0, 0, :2, :2] = [[-0.0, 0.0], [0.0, -0.0]]      # first window: -0.0 first
    x[0, 1, :2, :2] = [[0.0, -0.0], [-0.0, 0.0]]      # +0.0 first
    out, cache = G.max_pool_forward(x, pp)
    ref, ref_cache = G.max_pool_forward_general(x, pp)
    np.testing.assert_array_equal(cache.offsets, ref_cache.offsets)
    np.testing.assert_array_equal(_bits(out), _bits(ref))
    idx = G.max_pool_indices(cache)
    at_argmax = np.take_along_axis(x.reshape(3, 4, -1), idx.reshape(3, 4, -1), axis=2)
    np.testing.assert_array_equal(_bits(out), _bits(at_argmax.reshape(out.shape)))
    assert np.signbit(out[0, 0, 0, 0]) and not np.signbit(out[0, 1, 0, 0])
    zeros = out[out == 0]
    assert np.signbit(zeros).any() and (~np.signbit(zeros)).any()


# ------------------------------------------------------------------- memory layout


def _layouts(a):
    """The same (N, C, H, W) values in other memory orders: Fortran order, a transposed
    view of an NHWC array, a view with negative strides, a strided slice."""
    nhwc = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    flipped = np.ascontiguousarray(a[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
    wide = np.zeros(a.shape[:3] + (2 * a.shape[3],), a.dtype)
    wide[..., ::2] = a
    return {"fortran": np.asfortranarray(a), "nhwc-view": nhwc.transpose(0, 3, 1, 2),
            "negative-strides": flipped, "strided": wide[..., ::2]}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_bn_results_independent_of_memory_layout(rng, dtype, path):
    shape = (4, 3, 6, 7)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    sd = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    g = (rng.random(3) + 0.5).astype(sd)
    b = rng.standard_normal(3).astype(sd)

    def run(xv, dv):
        y, m, v, inv = numpy_fast.bn_train_forward(xv, g, b, 1e-5, sd)
        ye = numpy_fast.bn_eval_forward(xv, g, b, m, inv, sd)
        grads = [numpy_fast.bn_backward(dv, xv, g, m, inv, x.size // 3, train, sd)
                 for train in (True, False)]
        return [y, m, v, inv, ye] + [a for gr in grads for a in gr]
    ref = run(x, dout)
    for name, xv in _layouts(x).items():
        for dname, dv in (("C", dout), (name, _layouts(dout)[name])):
            for got, want in zip(run(xv, dv), ref):
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(_bits(got), _bits(want),
                                              err_msg=f"x {name}, dout {dname}")
