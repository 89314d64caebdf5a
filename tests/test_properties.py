"""Property tests (hypothesis): random geometries and data against brute-force rules."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gpulayers as G
from gpulayers.shapes import pool_geometry, pool_output_size


@st.composite
def axis_params(draw):
    """(size, kernel, stride, pad, dilation) along one axis, pad within the limit."""
    k = draw(st.integers(1, 5))
    d = draw(st.integers(1, 3))
    s = draw(st.integers(1, 4))
    p = draw(st.integers(0, (d * (k - 1) + 1) // 2))
    size = draw(st.integers(1, 14))
    return size, k, s, p, d


def brute_output_size(size, k, s, p, d, ceil):
    """Count the windows by PyTorch's definition instead of its formula: a window starts at
    o*s in padded coordinates; floor mode keeps those that fit in the padded input, ceil mode
    also keeps a partial last one, unless it starts in the right padding."""
    eff = d * (k - 1) + 1
    count = 0
    for o in range(size + 2 * p + 1):
        start = o * s
        fits = start + eff <= size + 2 * p
        partial = ceil and start < size + p and start <= size + 2 * p - eff + s - 1
        if fits or partial:
            count = o + 1
    return count


@settings(max_examples=300, deadline=None)
@given(axis_params(), st.booleans())
def test_output_size_matches_window_count(params, ceil):
    size, k, s, p, d = params
    expected = brute_output_size(size, k, s, p, d, ceil)
    got = pool_output_size(size, k, s, p, d, ceil)
    if expected == 0:  # no window fits: the formula may go negative; pool_geometry rejects it
        assert got < 1
    else:
        assert got == expected


@settings(max_examples=60, deadline=None)
@given(axis_params(), axis_params(), st.booleans(), st.integers(0, 2**32 - 1))
def test_every_max_pool_path_agrees_with_naive(rows, cols, ceil, seed):
    (H, kh, sh, ph, dh), (W, kw, sw, pw, dw) = rows, cols
    pp = dict(pool_height=kh, pool_width=kw, stride=(sh, sw), pad=(ph, pw),
              dilation=(dh, dw), ceil_mode=ceil)
    try:
        pool_geometry((1, 1, H, W), pp)
    except ValueError:
        assume(False)  # an invalid combination: its errors are tested elsewhere
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(2, 2, H, W)).astype(np.float32)  # ties
    x[rng.random(x.shape) < 0.05] = np.nan
    x[rng.random(x.shape) < 0.05] = -np.inf
    ref_out, ref_cache = G.max_pool_forward_naive(x, pp)
    dout = rng.integers(-4, 5, size=ref_out.shape).astype(np.float32)  # exact sums
    ref_dx = G.max_pool_backward_naive(dout, ref_cache)
    for fwd, bwd in ((G.max_pool_forward_general, G.max_pool_backward_general),
                     (G.max_pool_forward, G.max_pool_backward)):
        out, cache = fwd(x, pp)
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(cache.offsets, ref_cache.offsets)
        np.testing.assert_array_equal(bwd(dout, cache), ref_dx)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5),
       st.sampled_from(["cs231n", "torch"]), st.integers(0, 2**32 - 1))
def test_batchnorm_train_invariants(N, C, H, W, convention, seed):
    assume(N * H * W > 1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)) * rng.uniform(0.1, 10) + rng.uniform(-100, 100)
    out, cache = G.spatial_batchnorm_forward(x, np.ones(C), np.zeros(C),
                                             {"mode": "train", "convention": convention})
    # normalized per channel: mean 0, variance var/(var + eps) <= 1
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-9)
    assert np.all(out.var(axis=(0, 2, 3)) <= 1 + 1e-9)
    dx, dgamma, dbeta = G.spatial_batchnorm_backward(np.ones_like(x), cache)
    # a constant upstream gradient moves nothing: shifting x does not change out
    np.testing.assert_allclose(dx, 0, atol=1e-9)
    np.testing.assert_allclose(dbeta, N * H * W)
    np.testing.assert_allclose(dgamma, 0, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_unpool_inverts_pool_positions(dtype, N, C, size, seed):
    rng = np.random.default_rng(seed)
    x = rng.permutation(np.arange(N * C * size * size)).reshape(N, C, size, size).astype(dtype)
    pp = dict(pool_height=2, pool_width=2, stride=2, ceil_mode=True)
    out, cache = G.max_pool_forward(x, pp)
    up, _ = G.max_unpool_forward(out, G.max_pool_indices(cache), (size, size))
    kept = up != 0
    np.testing.assert_array_equal(up[kept], x[kept])
    assert kept.sum() == np.count_nonzero(out)
