"""Spatial batch norm over 1, 2 and 3 spatial axes: (N, C, L), (N, C, H, W), (N, C, D, H, W)."""
import numpy as np
import pytest

import gpulayers as G
from gpulayers import layers, numpy_fast
from gpulayers.distributed import LocalComm
from gpulayers.gradcheck import eval_numerical_gradient_array

SHAPES = [(6, 3, 10), (4, 3, 5, 6), (3, 3, 4, 5, 6)]
IDS = ["1d", "2d", "3d"]


def reference(x, gamma, beta, eps):
    """float64 train-mode BN over every axis but 1: (out, mean, biased var)."""
    x = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = (x - mean) / np.sqrt(var + eps) * gamma.reshape(shape) + beta.reshape(shape)
    return out, mean.ravel(), var.ravel()


def _forwards():
    return [("public", G.spatial_batchnorm_forward, G.spatial_batchnorm_backward),
            ("general", G.spatial_batchnorm_forward_general, G.spatial_batchnorm_backward_general)]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("name,fwd,bwd", _forwards(), ids=["public", "general"])
def test_train_forward_and_running_stats_match_reference(xp, rng, shape, name, fwd, bwd):
    x = rng.standard_normal(shape) * 3 + 2
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    bp = {"mode": "train", "convention": "torch"}
    out, cache = fwd(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), bp)
    ref, mean, var = reference(x, gamma, beta, 1e-5)
    np.testing.assert_allclose(G.to_numpy(out), ref, rtol=1e-10, atol=1e-12)
    M = x.size // 3
    np.testing.assert_allclose(G.to_numpy(bp["running_mean"]), 0.1 * mean, rtol=1e-10)
    np.testing.assert_allclose(G.to_numpy(bp["running_var"]), 0.9 + 0.1 * var * M / (M - 1),
                               rtol=1e-10)
    assert out.shape == shape and bwd(xp.ones_like(out), cache)[0].shape == shape


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "test"])
def test_numeric_gradients(rng, shape, mode):
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.standard_normal(3) + 1, rng.standard_normal(3)
    base = {"mode": mode, "running_mean": rng.standard_normal(3),
            "running_var": rng.random(3) + 0.5}
    dout = rng.standard_normal(shape)

    def f(x_=x, g_=gamma, b_=beta):
        return G.spatial_batchnorm_forward(x_, g_, b_, dict(base))[0]
    _, cache = G.spatial_batchnorm_forward(x, gamma, beta, dict(base))
    dx, dgamma, dbeta = G.spatial_batchnorm_backward(dout, cache)
    for grad, num in ((dx, eval_numerical_gradient_array(lambda a: f(a), x, dout)),
                      (dgamma, eval_numerical_gradient_array(lambda g: f(x, g), gamma, dout)),
                      (dbeta, eval_numerical_gradient_array(lambda b: f(x, gamma, b), beta, dout))):
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(6, 3, 10), (3, 3, 4, 5, 6)], ids=["1d", "3d"])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_equal_to_2d_on_flattened_spatial_axes(rng, shape, mode):
    """Every axis but 1 is reduced, so (N, C, *spatial) is BN on (N, C, 1, prod(spatial)):
    bit for bit, on the fast and the general path."""
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dout = rng.standard_normal(shape).astype(np.float32)
    g, b = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    flat = (shape[0], 3, 1, int(np.prod(shape[2:])))
    for fwd, bwd in [(G.spatial_batchnorm_forward, G.spatial_batchnorm_backward),
                     (G.spatial_batchnorm_forward_general, G.spatial_batchnorm_backward_general)]:
        def run(xv, dv):
            bp = {"mode": mode, "running_mean": np.zeros(3, np.float32),
                  "running_var": np.ones(3, np.float32)}
            out, cache = fwd(xv, g, b, bp)
            return [np.ascontiguousarray(a).tobytes()
                    for a in (out, *bwd(dv, cache), bp["running_mean"], bp["running_var"])]
        assert run(x, dout) == run(x.reshape(flat), dout.reshape(flat))


@pytest.mark.parametrize("shape", [(16, 8, 4096), (4, 8, 8, 32, 32)], ids=["1d", "3d"])
def test_fast_numpy_path_serves_large_inputs(rng, shape, monkeypatch):
    calls = []
    real = numpy_fast.bn_train_forward
    monkeypatch.setattr(numpy_fast, "bn_train_forward",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    out, cache = G.spatial_batchnorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32),
                                             {"mode": "train"})
    assert calls and len(calls[0]) == 4
    ref, _, _ = reference(x, np.ones(8), np.zeros(8), 1e-5)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)
    dout = rng.standard_normal(shape).astype(np.float32)
    dx, dgamma, _ = G.spatial_batchnorm_backward(dout, cache)
    _, gcache = G.spatial_batchnorm_forward_general(x, np.ones(8, np.float32),
                                                    np.zeros(8, np.float32), {"mode": "train"})
    gdx, gdgamma, _ = G.spatial_batchnorm_backward_general(dout, gcache)
    np.testing.assert_allclose(dx, gdx, rtol=0, atol=1e-4 * np.abs(gdx).max())
    np.testing.assert_allclose(dgamma, gdgamma, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_with_a_communicator(rng, shape):
    x = rng.standard_normal(shape)
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    out, cache = G.spatial_batchnorm_forward(x, g, b, {"mode": "train", "comm": LocalComm()})
    ref, _, _ = reference(x, g, b, 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert G.spatial_batchnorm_backward(np.ones(shape), cache)[0].shape == shape


def test_float16_keeps_float32_statistics(rng):
    x = (rng.standard_normal((4, 3, 4, 5, 6)) + 3).astype(np.float16)
    bp = {"mode": "train"}
    out, cache = G.spatial_batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32),
                                             bp)
    assert out.dtype == np.float16 and bp["running_mean"].dtype == np.float32
    dx, dgamma, _ = G.spatial_batchnorm_backward(np.ones_like(out), cache)
    assert dx.dtype == np.float16 and dgamma.dtype == np.float32


@pytest.mark.parametrize("cls,shape", [(layers.BatchNorm1d, (8, 3)), (layers.BatchNorm1d, (8, 3, 10)),
                                       (layers.BatchNorm2d, (4, 3, 5, 6)),
                                       (layers.BatchNorm3d, (3, 3, 4, 5, 6))])
def test_batchnorm_layers_take_their_ranks(rng, cls, shape):
    x = rng.standard_normal(shape) * 2 + 1
    bn = cls(3, dtype=np.float64)
    out = bn.forward(x)
    ref, mean, _ = reference(x, np.ones(3), np.zeros(3), 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.1 * mean, rtol=1e-10)
    assert bn.backward(np.ones(shape)).shape == shape
    bn.eval()
    np.testing.assert_allclose(bn.forward(x), (x - bn.buffers["running_mean"].reshape(
        (1, -1) + (1,) * (x.ndim - 2))) / np.sqrt(bn.buffers["running_var"].reshape(
            (1, -1) + (1,) * (x.ndim - 2)) + 1e-5), rtol=1e-10)


@pytest.mark.parametrize("cls,shape", [(layers.BatchNorm1d, (8, 3, 4, 4)),
                                       (layers.BatchNorm2d, (8, 3, 10)),
                                       (layers.BatchNorm3d, (4, 3, 5, 6))])
def test_batchnorm_layers_refuse_other_ranks(cls, shape):
    with pytest.raises(ValueError, match=f"{cls.__name__}.*{len(shape)}-D"):
        cls(3).forward(np.ones(shape, np.float32))
