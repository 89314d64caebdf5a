"""A training step of max pooling + spatial batch norm, forward and backward, captured into
a CUDA graph (``cupy.cuda.Stream.begin_capture``) and replayed: the replay must give the
eager results bit for bit, also after new data is copied into the captured input buffer.
Capture fails on any host synchronisation or device-to-host copy, so this also checks that
no op reads the device (issue 13 §2). Needs a GPU (marked gpu; skips with the reason)."""
import numpy as np
import pytest

import gpulayers as G
from gpulayers import backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    backend.cupy_unusable_reason() is not None,
    reason=f"CuPy not usable: {backend.cupy_unusable_reason()}")]

POOL = {"kernel_size": 3, "stride": 2, "pad": 1}


def _step(x, dy, gamma, beta, bn_param, fmt):
    """max pool -> BN (train) forward, then backward; returns every result."""
    p, pcache = G.max_pool_forward(x, dict(POOL, data_format=fmt))
    y, bcache = G.spatial_batchnorm_forward(p, gamma, beta, dict(bn_param, data_format=fmt))
    dp, dgamma, dbeta = G.spatial_batchnorm_backward(dy, bcache)
    dx = G.max_pool_backward(dp, pcache)
    return p, y, dp, dgamma, dbeta, dx


def _bits(a):
    a = backend.to_numpy(a)
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_max_pool_bn_step_replays_like_eager(fmt, dtype):
    import cupy
    rng = np.random.default_rng(2026)
    shape = (4, 16, 15, 13) if fmt == "channels_first" else (4, 15, 13, 16)
    pooled = (4, 16, 8, 7) if fmt == "channels_first" else (4, 8, 7, 16)
    x = cupy.asarray(rng.standard_normal(shape).astype(dtype))
    dy = cupy.asarray(rng.standard_normal(pooled).astype(dtype))
    gamma = cupy.asarray(rng.uniform(0.5, 1.5, 16).astype(np.float32))
    beta = cupy.asarray(rng.standard_normal(16).astype(np.float32))
    rm, rv = cupy.zeros(16, cupy.float32), cupy.ones(16, cupy.float32)
    bn_param = {"mode": "train", "running_mean": rm, "running_var": rv}

    _step(x, dy, gamma, beta, bn_param, fmt)        # warm: compiles and plans
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            captured = _step(x, dy, gamma, beta, bn_param, fmt)
        finally:
            graph = stream.end_capture()

    for trial in range(2):
        new_x = rng.standard_normal(shape).astype(dtype)
        x[...] = cupy.asarray(new_x)                # same buffer, new data
        rm[...], rv[...] = 0, 1
        cupy.cuda.Device().synchronize()
        with stream:
            graph.launch()
        stream.synchronize()
        replay = [backend.to_numpy(a).copy() for a in captured]
        rm_replay, rv_replay = backend.to_numpy(rm).copy(), backend.to_numpy(rv).copy()
        rm[...], rv[...] = 0, 1
        eager = _step(cupy.asarray(new_x), dy, gamma, beta, bn_param, fmt)
        for name, a, b in zip(("pooled", "y", "dpooled", "dgamma", "dbeta", "dx"), replay, eager):
            assert np.array_equal(_bits(a), _bits(b)), f"{name} differs (trial {trial})"
        assert np.array_equal(rm_replay, backend.to_numpy(rm))
        assert np.array_equal(rv_replay, backend.to_numpy(rv))
