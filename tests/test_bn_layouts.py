"""Batch norm in channels-last layouts (data_format and PyTorch's channels_last memory
format) and in bfloat16."""
import tracemalloc

import numpy as np
import pytest

import gpulayers as G

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

SHAPES = [(6, 3, 10), (4, 3, 5, 6), (3, 3, 4, 5, 6)]
IDS = ["1d", "2d", "3d"]
TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-12}


def _last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _run(x, dout, gamma, beta, mode, data_format=None, fwd=G.spatial_batchnorm_forward,
         bwd=G.spatial_batchnorm_backward):
    C = gamma.shape[0]
    bp = {"mode": mode, "running_mean": np.full(C, 0.5, np.float32),
          "running_var": np.full(C, 2.0, np.float32), "convention": "torch"}
    if data_format:
        bp["data_format"] = data_format
    out, cache = fwd(x, gamma, beta, bp)
    dx, dgamma, dbeta = bwd(dout, cache)
    return out, dx, dgamma, dbeta, bp["running_mean"], bp["running_var"]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("general", [False, True])
def test_channels_last_equals_channels_first_on_the_transposed_input(rng, shape, dtype, mode,
                                                                     general):
    fwd, bwd = ((G.spatial_batchnorm_forward_general, G.spatial_batchnorm_backward_general)
                if general else (G.spatial_batchnorm_forward, G.spatial_batchnorm_backward))
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    gamma, beta = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    ref = _run(x, dout, gamma, beta, mode, fwd=fwd, bwd=bwd)
    got = _run(_last(x), _last(dout), gamma, beta, mode, "channels_last", fwd, bwd)
    for name, a, b, moved in zip(("out", "dx", "dgamma", "dbeta", "running_mean",
                                  "running_var"), got, ref, (True, True, False, False, False,
                                                             False)):
        assert a.dtype == b.dtype, name
        want = _last(b) if moved else b
        assert a.shape == want.shape, name
        np.testing.assert_allclose(a, want, rtol=TOL[np.dtype(dtype)],
                                   atol=TOL[np.dtype(dtype)] * 10, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_pytorch_channels_last_memory_format_is_kept(rng, shape):
    """A channels-first-shaped array with channels-last strides (what torch's
    channels_last / channels_last_3d hold) is processed in place: out and dx keep its
    memory format, and equal the contiguous result to rounding."""
    x = rng.standard_normal(shape)
    strided = np.moveaxis(_last(x), -1, 1)
    assert strided.shape == x.shape and not strided.flags.c_contiguous
    dout = np.moveaxis(_last(rng.standard_normal(shape)), -1, 1)
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    got = _run(strided, dout, g, b, "train")
    ref = _run(np.ascontiguousarray(x), np.ascontiguousarray(dout), g, b, "train")
    for a, want in zip(got, ref):
        np.testing.assert_allclose(a, want, rtol=1e-12, atol=1e-12)
    for a in got[:2]:
        assert np.moveaxis(a, 1, -1).flags.c_contiguous and not a.flags.c_contiguous


@pytest.mark.parametrize("shape", [(8, 64, 16384), (8, 64, 64, 256)], ids=["1d", "2d"])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_channels_last_memory_format_is_not_copied(rng, shape, mode):
    """A forward on the channels_last-strided input allocates its output and block-sized
    scratch, never a copy of x: peak traced memory minus the output stays well under the
    input's size (tracemalloc, NumPy; x is 32 MiB, a block at most 2 MiB per thread)."""
    x = rng.standard_normal(shape).astype(np.float32)
    strided = np.moveaxis(_last(x), -1, 1)
    g, b = np.ones(64, np.float32), np.zeros(64, np.float32)
    bp = {"mode": mode, "running_mean": np.zeros(64, np.float32),
          "running_var": np.ones(64, np.float32)}
    G.spatial_batchnorm_forward(strided, g, b, dict(bp))  # thread pool and caches warm
    tracemalloc.start()
    try:
        out, cache = G.spatial_batchnorm_forward(strided, g, b, dict(bp))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cache.x.base is not None and np.shares_memory(cache.x, strided)   # x itself
    assert peak - out.nbytes < 0.25 * x.nbytes, (peak, out.nbytes, x.nbytes)


def test_bad_data_format_names_the_value():
    with pytest.raises(ValueError, match="data_format.*'NHWC'"):
        G.spatial_batchnorm_forward(np.ones((2, 3, 4)), np.ones(3), np.zeros(3),
                                    {"mode": "train", "data_format": "NHWC"})
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\)"):
        G.spatial_batchnorm_forward(np.ones((2, 3, 4)), np.ones(3), np.zeros(3),
                                    {"mode": "train", "data_format": "channels_last"})
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        G.spatial_batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3),
                                    {"mode": "train", "data_format": "channels_last"})
    _, cache = G.spatial_batchnorm_forward(np.ones((2, 3, 4)) + np.arange(4), np.ones(4),
                                           np.zeros(4), {"mode": "train",
                                                         "data_format": "channels_last"})
    with pytest.raises(ValueError, match=r"dout has shape \(2, 4, 3\).*\(2, 3, 4\) "
                                         r"\(channels_last\)"):
        G.spatial_batchnorm_backward(np.ones((2, 4, 3)), cache)


# ------------------------------------------------------------------------- bfloat16

def _ref(x, gamma, beta, axes, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    shape = [1] * x.ndim
    shape[1 if axes[0] == 0 and 1 not in axes else -1] = -1
    return (x - mean) / np.sqrt(var + eps) * gamma.reshape(shape) + beta.reshape(shape)


@pytest.mark.parametrize("which", ["plain", "spatial", "spatial_general", "spatial_last"])
def test_bfloat16_against_float64(rng, which):
    shape = (32, 6) if which == "plain" else (4, 6, 5, 7)
    fwd, bwd = {"plain": (G.batchnorm_forward, G.batchnorm_backward),
                "spatial": (G.spatial_batchnorm_forward, G.spatial_batchnorm_backward),
                "spatial_last": (G.spatial_batchnorm_forward, G.spatial_batchnorm_backward),
                "spatial_general": (G.spatial_batchnorm_forward_general,
                                    G.spatial_batchnorm_backward_general)}[which]
    x64 = rng.standard_normal(shape) * 2 + 3
    bp = {"mode": "train"}
    if which == "spatial_last":
        x64 = _last(x64)
        bp["data_format"] = "channels_last"
    x = x64.astype(BF16)
    g, b = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    out, cache = fwd(x, g, b, bp)
    assert out.dtype == BF16 and bp["running_mean"].dtype == np.float32
    axes = (0,) if which == "plain" else ((0, 1, 2) if which == "spatial_last" else (0, 2, 3))
    ref = _ref(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64), axes)
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2e-2, atol=3e-2)
    dout = rng.standard_normal(x.shape).astype(BF16)
    dx, dgamma, dbeta = bwd(dout, cache)
    assert dx.dtype == BF16 and dgamma.dtype == np.float32 and dbeta.dtype == np.float32
    np.testing.assert_allclose(dbeta, dout.astype(np.float64).sum(axis=axes), rtol=1e-5,
                               atol=1e-4)
    assert np.isfinite(dx.astype(np.float32)).all()


def test_bfloat16_gamma_and_running_stats_accepted(rng):
    x = (rng.standard_normal((8, 3, 4, 4)) + 1).astype(BF16)
    bp = {"mode": "test", "running_mean": np.zeros(3, BF16), "running_var": np.ones(3, BF16)}
    out, _ = G.spatial_batchnorm_forward(x, np.ones(3, BF16), np.zeros(3, BF16), bp)
    np.testing.assert_allclose(out.astype(np.float64), x.astype(np.float64) / np.sqrt(1 + 1e-5),
                               rtol=1e-2)


def test_channels_last_eval_with_a_large_running_mean_is_not_folded(rng):
    """x*a + (b - mean*a) would lose ~1e5 ulps at mean 1e4, std 0.1 in float32: the rows
    path folds the affine only under numpy_fast's |mean|/std guard."""
    x = (rng.standard_normal((4, 6, 6, 3)) * 0.1 + 1e4).astype(np.float32)
    bp = {"mode": "test", "data_format": "channels_last",
          "running_mean": np.full(3, 1e4, np.float32), "running_var": np.full(3, 0.01, np.float32)}
    out, _ = G.spatial_batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), bp)
    ref = (x.astype(np.float64) - 1e4) / np.sqrt(0.01 + 1e-5)
    assert np.abs(out - ref).max() < 2e-2
