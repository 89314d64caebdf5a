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
