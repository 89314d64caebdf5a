"""The NumPy fast paths (batch norm) against the general xp paths and float64, and the
max-pool output signs through the public calls."""
import numpy as np
import pytest

import gpulayers as G
from gpulayers import cpu_kernels, numpy_fast


def _bits(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


_THRESHOLDS = ("BN_TRAIN_SMALL_MIN", "BN_TRAIN_FORWARD_MIN", "BN_EVAL_FORWARD_MIN",
               "BN_BACKWARD_MIN", "BN_EVAL_BACKWARD_MIN")
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


def test_thresholds_are_ordered_sizes():
    for name in _THRESHOLDS:
        assert isinstance(getattr(numpy_fast, name), int) and getattr(numpy_fast, name) >= 0, name
    # the BN kernels take over no later than the simple NumPy path would
    assert numpy_fast.BN_TRAIN_FORWARD_MIN <= numpy_fast.BN_TRAIN_SMALL_MIN
    assert numpy_fast.BN_EVAL_FORWARD_MIN <= numpy_fast.BN_EVAL_SMALL_MIN
    assert "scripts/bench.py" in numpy_fast.SMALL_MEASUREMENT


class _KernelSpy:
    """Stands in for a cpu_kernels.bn kernel: records each run, then runs the kernel."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def run(self, work, *args):
        self.calls.append(self.kernel.__name__)
        return self.kernel.run(work, *args)


def _spy_kernels(monkeypatch):
    calls = []
    bnk = numpy_fast._bnk
    for name in ("train_forward_planes", "eval_forward_planes", "backward_planes"):
        if hasattr(bnk, name):
            monkeypatch.setattr(bnk, name, _KernelSpy(getattr(bnk, name), calls))
    return calls


@pytest.mark.skipif(not cpu_kernels.enabled(), reason=f"CPU kernels unusable: "
                    f"{cpu_kernels.unusable_reason()}")
def test_bn_dispatch_follows_the_thresholds(rng, monkeypatch):
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    sd = np.float32
    calls = _spy_kernels(monkeypatch)
    for name in _THRESHOLDS:
        monkeypatch.setattr(numpy_fast, name, x.size + 1)
    monkeypatch.setattr(numpy_fast, "BN_TRAIN_SMALL_MIN", x.size + 1)
    monkeypatch.setattr(numpy_fast, "BN_EVAL_SMALL_MIN", x.size + 1)
    assert numpy_fast.bn_train_forward(x, g, b, 1e-5, sd) is None   # the caller's general path
    m0, inv0 = np.zeros(4, np.float32), np.ones(4, np.float32)
    assert numpy_fast.bn_eval_forward(x, g, b, m0, inv0, sd) is None  # likewise
    monkeypatch.setattr(numpy_fast, "BN_EVAL_SMALL_MIN", x.size)
    monkeypatch.setattr(numpy_fast, "BN_TRAIN_SMALL_MIN", x.size)
    y, m, v, inv = numpy_fast.bn_train_forward(x, g, b, 1e-5, sd)   # _bn_train_small
    numpy_fast.bn_eval_forward(x, g, b, m, inv, sd)
    numpy_fast.bn_backward(x, x, g, m, inv, x.size // 4, True, sd)
    assert calls == []
    for name in _THRESHOLDS:
        monkeypatch.setattr(numpy_fast, name, x.size)
    y2, m2, v2, inv2 = numpy_fast.bn_train_forward(x, g, b, 1e-5, sd)
    assert calls == ["train_forward_planes"]
    numpy_fast.bn_eval_forward(x, g, b, m, inv, sd)
    numpy_fast.bn_backward(x, x, g, m, inv, x.size // 4, True, sd)
    numpy_fast.bn_backward(x, x, g, m, inv, x.size // 4, False, sd)
    assert calls == ["train_forward_planes", "eval_forward_planes", "backward_planes",
                     "backward_planes"]
    # the kernel and the simple path agree to float32 rounding
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m2, m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v2, v, rtol=1e-5)
    monkeypatch.setattr(numpy_fast, "BN_EVAL_BACKWARD_MIN", x.size + 1)
    numpy_fast.bn_backward(x, x, g, m, inv, x.size // 4, False, sd)
    assert len(calls) == 4


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "numpy"])
def test_public_bn_small_train(rng, kernels):
    # below BN_TRAIN_SMALL_MIN, without the kernels, the public forward is the general path
    # (same bits, xhat cache); with them, the kernel, to float32 rounding of the general path
    shape = (2, 3, 4, 5)
    assert np.prod(shape) < numpy_fast.BN_TRAIN_SMALL_MIN
    x = rng.standard_normal(shape).astype(np.float32)
    g = (rng.random(3) + 0.5).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    old = cpu_kernels.set_enabled(kernels)
    try:
        y, cache = G.spatial_batchnorm_forward(x, g, b, dict(mode="train"))
        y2, cache2 = G.spatial_batchnorm_forward_general(x, g, b, dict(mode="train"))
        dout = rng.standard_normal(shape).astype(np.float32)
        got_all = G.spatial_batchnorm_backward(dout, cache)
        ref_all = G.spatial_batchnorm_backward_general(dout, cache2)
    finally:
        cpu_kernels.set_enabled(old)
    on = kernels and cpu_kernels.enabled()
    assert cache.path == ("numpy_fast" if on else "xp")
    for got, ref in zip((y,) + tuple(got_all), (y2,) + tuple(ref_all)):
        if on:
            np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
        else:
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


# ------------------------------------------- the warmed NumPy test-mode forward (batchnorm)

_KERNELS_ON = pytest.mark.skipif(not cpu_kernels.enabled(), reason=f"CPU kernels unusable: "
                                 f"{cpu_kernels.unusable_reason()}")


def _eval_inputs(rng, shape, dtype):
    C = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    g = (rng.random(C) + 0.5).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    p = {"mode": "test", "eps": 1e-5,
         "running_mean": (0.3 * rng.standard_normal(C)).astype(dtype),
         "running_var": (rng.random(C) + 0.25).astype(dtype)}
    return x, g, b, p


def _spy_running(monkeypatch):
    calls = []
    bnk = numpy_fast._bnk
    monkeypatch.setattr(bnk, "eval_forward_running_planes",
                        _KernelSpy(bnk.eval_forward_running_planes, calls))
    return calls


def _same_cache(a, b):
    assert a._fields == b._fields
    for name, u, v in zip(a._fields, a, b):
        if isinstance(u, np.ndarray):
            assert isinstance(v, np.ndarray) and u.dtype == v.dtype, name
            np.testing.assert_array_equal(_bits(u), _bits(v), err_msg=name)
        else:
            assert u == v, name


@_KERNELS_ON
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 8, 16, 16), (2, 8, 8, 8, 8), (4, 8, 512)],
                         ids=["2d", "3d", "1d"])
def test_warm_eval_forward_is_the_checked_call(rng, monkeypatch, shape, dtype):
    # a repeated NumPy test-mode call runs one kernel straight from the running statistics
    # (batchnorm._forward_warm); output, cache and backward are the checked call's bits
    from gpulayers import batchnorm
    monkeypatch.setattr(batchnorm, "_WARM", {})
    calls = _spy_running(monkeypatch)
    x, g, b, p = _eval_inputs(rng, shape, dtype)
    assert x.size >= numpy_fast.BN_EVAL_FORWARD_MIN
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    y0, c0 = G.spatial_batchnorm_forward(x, g, b, p)    # checked; registers the warm call
    assert calls == []
    y1, c1 = G.spatial_batchnorm_forward(x, g, b, p)    # warm
    assert calls == ["eval_forward_running_planes"]
    y2, c2 = batchnorm._forward_checked(x, g, b, p, "spatial_batchnorm_forward",
                                        "spatial_batchnorm_forward", True)
    for y, c in ((y1, c1), (y2, c2)):
        np.testing.assert_array_equal(_bits(y), _bits(y0))
        _same_cache(c, c0)
    assert c1.path == "numpy_fast" and not c1.train
    dout = rng.standard_normal(shape).astype(dtype)
    d0, d1 = G.spatial_batchnorm_backward(dout, c0), G.spatial_batchnorm_backward(dout, c1)
    for u, v in zip(d0, d1):
        np.testing.assert_array_equal(_bits(u), _bits(v))
    # nothing given was changed, and the cache owns its gamma
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(p[k], v)
            assert p[k].dtype == v.dtype
        else:
            assert p[k] == v
    g_old = g.copy()
    g *= 3
    np.testing.assert_array_equal(c1.gamma, g_old)


@_KERNELS_ON
@pytest.mark.parametrize("key, value, match", [
    ("running_mean", np.nan, "finite running statistics"),
    ("running_mean", -np.inf, "finite running statistics"),
    ("running_var", np.inf, "finite running statistics"),
    ("running_var", np.nan, "finite running statistics"),
    ("running_var", -0.5, r"running_var >= 0"),
])
def test_warm_eval_forward_still_checks_running_values(rng, monkeypatch, key, value, match):
    # the warm call's kernel checks the running statistics' values; on a bad one it writes
    # nothing and the checked call raises its error
    from gpulayers import batchnorm
    monkeypatch.setattr(batchnorm, "_WARM", {})
    calls = _spy_running(monkeypatch)
    x, g, b, p = _eval_inputs(rng, (4, 8, 16, 16), np.float32)
    G.spatial_batchnorm_forward(x, g, b, p)
    G.spatial_batchnorm_forward(x, g, b, p)
    assert len(calls) == 1
    p[key][3] = value
    with pytest.raises(ValueError, match=match):
        G.spatial_batchnorm_forward(x, g, b, p)
    assert len(calls) == 2   # the warm kernel ran, declined, and the checked path raised
    p[key][3] = 1.0
    G.spatial_batchnorm_forward(x, g, b, p)
    assert len(calls) == 3


@_KERNELS_ON
def test_warm_eval_forward_declines_what_it_does_not_take(rng, monkeypatch):
    # kernels switched off, a threshold above x's size, running statistics in another dtype
    # or a non-contiguous x: the checked call runs (and gives its result)
    from gpulayers import batchnorm
    monkeypatch.setattr(batchnorm, "_WARM", {})
    calls = _spy_running(monkeypatch)
    x, g, b, p = _eval_inputs(rng, (4, 8, 16, 16), np.float32)
    G.spatial_batchnorm_forward(x, g, b, p)
    y_ref, _ = G.spatial_batchnorm_forward(x, g, b, p)
    assert len(calls) == 1
    old = cpu_kernels.set_enabled(False)
    try:
        y, c = G.spatial_batchnorm_forward(x, g, b, p)
    finally:
        cpu_kernels.set_enabled(old)
    assert len(calls) == 1
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(numpy_fast, "BN_EVAL_FORWARD_MIN", x.size + 1)
    y, c = G.spatial_batchnorm_forward(x, g, b, p)
    assert len(calls) == 1
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(numpy_fast, "BN_EVAL_FORWARD_MIN", 0)
    p64 = dict(p, running_mean=p["running_mean"].astype(np.float64))
    for _ in range(2):
        y, c = G.spatial_batchnorm_forward(x, g, b, p64)
    assert len(calls) == 1
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    xs = np.asfortranarray(x)
    for _ in range(2):
        y, c = G.spatial_batchnorm_forward(xs, g, b, p)
    assert len(calls) == 1
    np.testing.assert_array_equal(y, y_ref)
