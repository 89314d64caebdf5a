"""Batch norm and spatial batch norm on every usable backend."""
import numpy as np
import pytest

import gpulayers as G
from gpulayers.gradcheck import eval_numerical_gradient_array


def to_np(a):
    return G.to_numpy(a)


def assert_close(actual, expected, tol):
    """Relative tolerance, with an absolute floor for entries near zero."""
    np.testing.assert_allclose(to_np(actual), to_np(expected), rtol=tol, atol=tol * 1e-2)


def reference_bn(x, gamma, beta, eps, axes):
    """float64 reference of train-mode BN: (out, mean, biased var)."""
    x = x.astype(np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = (x - mean) / np.sqrt(var + eps) * gamma.reshape(shape) + beta.reshape(shape)
    return out, mean.reshape(-1), var.reshape(-1)


CASES = [
    ("spatial", G.spatial_batchnorm_forward, G.spatial_batchnorm_backward, (4, 3, 5, 6), (0, 2, 3)),
    ("spatial_general", G.spatial_batchnorm_forward_general, G.spatial_batchnorm_backward_general,
     (3, 2, 4, 3), (0, 2, 3)),
    ("plain", G.batchnorm_forward, G.batchnorm_backward, (10, 7), (0,)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_forward_matches_reference(xp, rng, case):
    _, fwd, _, shape, axes = case
    x = rng.standard_normal(shape) * 3 + 2
    C = shape[1]
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    out, _ = fwd(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), {"mode": "train", "eps": 1e-5})
    ref, _, _ = reference_bn(x, gamma, beta, 1e-5, axes)
    assert_close(out, ref, 1e-10)


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_numeric_gradients(xp, rng, case, mode):
    _, fwd, bwd, shape, _ = case
    C = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.standard_normal(C) + 1, rng.standard_normal(C)
    base = {"mode": mode, "running_mean": rng.standard_normal(C), "running_var": rng.random(C) + 0.5}
    X, Gm, B = xp.asarray(x), xp.asarray(gamma), xp.asarray(beta)
    param = {k: xp.asarray(v) if hasattr(v, "shape") else v for k, v in base.items()}

    def f(x_, g_=Gm, b_=B):
        return fwd(x_, g_, b_, dict(param))[0]
    out, cache = fwd(X, Gm, B, dict(param))
    dout = xp.asarray(rng.standard_normal(shape))
    dx, dgamma, dbeta = bwd(dout, cache)
    # rel_error is element-wise; dx sums to zero per channel, so some entries are
    # near zero and their numeric estimate has mostly absolute error: atol.
    for grad, num in ((dx, eval_numerical_gradient_array(f, X, dout)),
                      (dgamma, eval_numerical_gradient_array(lambda g: f(X, g), Gm, dout)),
                      (dbeta, eval_numerical_gradient_array(lambda b: f(X, Gm, b), B, dout))):
        np.testing.assert_allclose(to_np(grad), num, rtol=1e-6, atol=1e-8)


def test_train_dx_formula_exact(xp, rng):
    """dx against the closed form, tightly (the numeric check above is only ~1e-7)."""
    x = rng.standard_normal((6, 4, 3, 5))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    out, cache = G.spatial_batchnorm_forward(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta),
                                             {"mode": "train", "eps": 1e-5})
    dout = rng.standard_normal(x.shape)
    dx, dgamma, dbeta = G.spatial_batchnorm_backward(xp.asarray(dout), cache)
    axes, M = (0, 2, 3), 6 * 3 * 5
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    xhat = (x - mean) * invstd
    db = dout.sum(axis=axes, keepdims=True)
    dg = (dout * xhat).sum(axis=axes, keepdims=True)
    ref = gamma.reshape(1, -1, 1, 1) * invstd / M * (M * dout - db - xhat * dg)
    assert_close(dx, ref, 1e-10)
    assert_close(dgamma, dg.reshape(-1), 1e-12)
    assert_close(dbeta, db.reshape(-1), 1e-12)


def test_article_spatial_bn_bugs_fixed(rng):
    """Channels are normalized per channel over (N, H, W), in NCHW order."""
    x = rng.standard_normal((5, 3, 4, 4)) * np.array([1, 10, 100]).reshape(1, 3, 1, 1)
    out, _ = G.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), 1, atol=1e-4)
    # each element keeps its place: the rank order inside a channel is unchanged
    assert np.array_equal(np.argsort(out[:, 1].ravel()), np.argsort(x[:, 1].ravel()))


@pytest.mark.parametrize("convention", ["cs231n", "torch"])
def test_running_stats_conventions(xp, rng, convention):
    x = rng.standard_normal((8, 3, 4, 4)) * 2 + 5
    bp = {"mode": "train", "convention": convention}
    for _ in range(2):
        G.spatial_batchnorm_forward(xp.asarray(x), xp.ones(3), xp.zeros(3), bp)
    M = 8 * 16
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    if convention == "cs231n":
        rm, rv = np.zeros(3), np.zeros(3)
        for _ in range(2):
            rm, rv = 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var
    else:
        rm, rv = np.zeros(3), np.ones(3)
        for _ in range(2):
            rm, rv = 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var * M / (M - 1)
    assert type(bp["running_mean"]) is type(xp.zeros(1))
    np.testing.assert_allclose(to_np(bp["running_mean"]), rm, rtol=1e-12)
    np.testing.assert_allclose(to_np(bp["running_var"]), rv, rtol=1e-12)


def test_running_stats_given_arrays_are_not_modified(rng):
    rm, rv = rng.standard_normal(3), rng.random(3)
    rm0, rv0 = rm.copy(), rv.copy()
    bp = {"mode": "train", "running_mean": rm, "running_var": rv, "momentum": 0.5}
    G.spatial_batchnorm_forward(rng.standard_normal((2, 3, 2, 2)), np.ones(3), np.zeros(3), bp)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert not np.array_equal(bp["running_mean"], rm0)


def test_test_mode_uses_running_stats(xp, rng):
    x = rng.standard_normal((4, 3, 2, 2))
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.1
    bp = {"mode": "test", "running_mean": xp.asarray(rm), "running_var": xp.asarray(rv), "eps": 1e-3}
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    out, cache = G.spatial_batchnorm_forward(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), bp)
    s = (1, 3, 1, 1)
    ref = (x - rm.reshape(s)) / np.sqrt(rv.reshape(s) + 1e-3) * gamma.reshape(s) + beta.reshape(s)
    assert_close(out, ref, 1e-12)
    dout = rng.standard_normal(x.shape)
    dx, _, _ = G.spatial_batchnorm_backward(xp.asarray(dout), cache)
    assert_close(dx, dout * (gamma / np.sqrt(rv + 1e-3)).reshape(s), 1e-12)


def test_test_mode_without_running_stats_raises():
    with pytest.raises(ValueError, match="running_mean"):
        G.batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2), {"mode": "test"})


def test_large_mean_float32_is_stable(xp, rng):
    x = (rng.standard_normal((64, 4, 8, 8)) * 0.1 + 1e4).astype(np.float32)
    out, _ = G.spatial_batchnorm_forward(xp.asarray(x), xp.ones(4, dtype=np.float32),
                                         xp.zeros(4, dtype=np.float32), {"mode": "train"})
    ref, _, _ = reference_bn(x.astype(np.float64), np.ones(4), np.zeros(4), 1e-5, (0, 2, 3))
    out = to_np(out).astype(np.float64)
    assert np.abs(out - ref).max() < 1e-3
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-3)


def test_constant_channel_gives_zeros_not_nan(xp):
    x = np.full((4, 2, 3, 3), 7.25, dtype=np.float32)
    x[:, 1] = -3.5
    out, cache = G.spatial_batchnorm_forward(xp.asarray(x), xp.ones(2, dtype=np.float32),
                                             xp.zeros(2, dtype=np.float32), {"mode": "train"})
    assert np.all(to_np(out) == 0)
    dx, dg, db = G.spatial_batchnorm_backward(xp.asarray(np.ones_like(x)), cache)
    assert np.all(np.isfinite(to_np(dx)))


@pytest.mark.parametrize("fwd", [G.spatial_batchnorm_forward, G.spatial_batchnorm_forward_general])
def test_float16_stats_in_float32(xp, rng, fwd):
    x = (rng.standard_normal((8, 3, 6, 6)) * 4 + 3).astype(np.float16)
    bp = {"mode": "train"}
    out, cache = fwd(xp.asarray(x), xp.ones(3, dtype=np.float16), xp.zeros(3, dtype=np.float16), bp)
    assert out.dtype == np.float16
    assert bp["running_mean"].dtype == np.float32 and bp["running_var"].dtype == np.float32
    ref, _, _ = reference_bn(x, np.ones(3), np.zeros(3), 1e-5, (0, 2, 3))
    assert np.abs(to_np(out).astype(np.float64) - ref).max() < 1e-2
    dx, dg, db = G.spatial_batchnorm_backward(xp.asarray(np.ones_like(x)), cache)
    assert dx.dtype == np.float16 and dg.dtype == np.float16


def test_float64_stays_float64(xp, rng):
    bp = {"mode": "train"}
    out, cache = G.batchnorm_forward(xp.asarray(rng.standard_normal((5, 3))), xp.ones(3), xp.zeros(3), bp)
    assert out.dtype == np.float64 and bp["running_var"].dtype == np.float64


def test_hw_one_after_global_pooling(xp, rng):
    x = rng.standard_normal((16, 5, 1, 1))
    out, _ = G.spatial_batchnorm_forward(xp.asarray(x), xp.ones(5), xp.zeros(5), {"mode": "train"})
    out2, _ = G.batchnorm_forward(xp.asarray(x[:, :, 0, 0]), xp.ones(5), xp.zeros(5), {"mode": "train"})
    np.testing.assert_allclose(to_np(out)[:, :, 0, 0], to_np(out2), rtol=1e-12, atol=1e-12)


def test_nothing_mutated_and_backward_repeatable(xp, rng):
    x = xp.asarray(rng.standard_normal((4, 3, 5, 5)))
    gamma, beta = xp.asarray(rng.standard_normal(3)), xp.asarray(rng.standard_normal(3))
    copies = [to_np(a).copy() for a in (x, gamma, beta)]
    out, cache = G.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    dout = xp.asarray(rng.standard_normal(x.shape))
    d0 = to_np(dout).copy()
    first = [to_np(a) for a in G.spatial_batchnorm_backward(dout, cache)]
    second = [to_np(a) for a in G.spatial_batchnorm_backward(dout, cache)]
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
    for a, c in zip((x, gamma, beta), copies):
        np.testing.assert_array_equal(to_np(a), c)
    np.testing.assert_array_equal(to_np(dout), d0)


def test_non_contiguous_input(xp, rng):
    base = rng.standard_normal((6, 3, 8, 10))
    v = base[::2, :, ::-1, 1::2]
    out, _ = G.spatial_batchnorm_forward(xp.asarray(v) if xp is np else xp.asarray(base)[::2, :, ::-1, 1::2],
                                         xp.ones(3), xp.zeros(3), {"mode": "train"})
    ref, _ = G.spatial_batchnorm_forward(np.ascontiguousarray(v), np.ones(3), np.zeros(3), {"mode": "train"})
    np.testing.assert_allclose(to_np(out), ref, rtol=1e-12, atol=1e-12)


BAD = [
    (dict(x=(2, 3)), "spatial", "\\(N, C, L\\) or \\(N, C, H, W\\) or \\(N, C, D, H, W\\), got 2-D"),
    (dict(x=(2, 3, 4, 4, 1, 1)), "spatial", "6-D"),
    (dict(x=(2, 3, 0)), "spatial", "non-zero C and L"),
    (dict(x=(2, 3, 4)), "plain", "3-D"),
    (dict(gamma=(4,)), "spatial", "gamma must have shape \\(3,\\)"),
    (dict(beta=(3, 1)), "spatial", "beta must have shape"),
    (dict(mode="eval"), "spatial", "'train' or 'test'"),
    (dict(convention="keras"), "spatial", "'cs231n' or 'torch'"),
    (dict(x=(1, 3, 1, 1)), "spatial", "more than one value"),
    (dict(x=(1, 3)), "plain", "more than one value"),
    (dict(x=(2, 0, 4, 4)), "spatial", "non-zero"),
    (dict(running_mean=(2,)), "spatial", "running_mean"),
    (dict(momentum=2.0), "spatial", "momentum"),
]


@pytest.mark.parametrize("spec,which,match", BAD)
def test_bad_input(spec, which, match):
    shape = spec.get("x", (2, 3, 4, 4) if which == "spatial" else (2, 3))
    C = 3
    x = np.ones(shape)
    gamma = np.ones(spec.get("gamma", (C,)))
    beta = np.zeros(spec.get("beta", (C,)))
    bp = {"mode": spec.get("mode", "train"), "convention": spec.get("convention", "cs231n")}
    if "running_mean" in spec:
        bp["running_mean"] = np.zeros(spec["running_mean"])
    if "momentum" in spec:
        bp["momentum"] = spec["momentum"]
    fwd = G.spatial_batchnorm_forward if which == "spatial" else G.batchnorm_forward
    with pytest.raises(ValueError, match=match):
        fwd(x, gamma, beta, bp)


def test_type_errors():
    with pytest.raises(TypeError, match="floating"):
        G.batchnorm_forward(np.ones((3, 2), dtype=np.int64), np.ones(2), np.zeros(2), {"mode": "train"})
    with pytest.raises(TypeError, match="cache"):
        G.batchnorm_backward(np.ones((3, 2)), None)
    with pytest.raises(ValueError, match="mode"):
        G.batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2), {})
