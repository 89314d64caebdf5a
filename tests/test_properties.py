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


# ------------------------------------------------------------------ every rank (1-D, 2-D, 3-D)

import itertools  # noqa: E402
from fractions import Fraction  # noqa: E402

from gpulayers import pooling  # noqa: E402
from gpulayers.shapes import adaptive_bounds, adaptive_geometry  # noqa: E402


@st.composite
def nd_geometry(draw, max_size=9):
    """(x shape, pool_param as d-tuples) of a random rank d in 1..3, small sizes."""
    d = draw(st.integers(1, 3))
    axes = [draw(axis_params()) for _ in range(d)]
    size = tuple(min(a[0], max_size) for a in axes)
    pp = dict(kernel_size=tuple(a[1] for a in axes), stride=tuple(a[2] for a in axes),
              pad=tuple(a[3] for a in axes), dilation=tuple(a[4] for a in axes),
              ceil_mode=draw(st.booleans()))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) + size
    return shape, pp


def _valid(shape, pp, op="max"):
    try:
        return pool_geometry(shape, pp, op)
    except ValueError:
        return None


@settings(max_examples=200, deadline=None)
@given(nd_geometry())
def test_nd_output_shape_is_the_window_count_per_axis(case):
    shape, pp = case
    g = _valid(shape, pp)
    expected = tuple(brute_output_size(n, k, s, p, dl, pp["ceil_mode"]) for n, k, s, p, dl in
                     zip(shape[2:], pp["kernel_size"], pp["stride"], pp["pad"], pp["dilation"]))
    if g is None:  # refused: no window fits, or a window covers only padding
        only_padding = any(
            all(not 0 <= o * s - p + t * dl < n for t in range(k))
            for n, k, s, p, dl, n_out in zip(shape[2:], pp["kernel_size"], pp["stride"],
                                             pp["pad"], pp["dilation"], expected)
            for o in range(n_out))
        assert min(expected) < 1 or only_padding
        return
    assert g.out == expected and g.output_shape == shape[:2] + expected
    assert min(expected) >= 1


def _nd_data(rng, shape):
    x = rng.integers(0, 3, size=shape).astype(np.float32)  # ties
    x[rng.random(shape) < 0.05] = np.nan
    x[rng.random(shape) < 0.05] = -np.inf
    return x


@settings(max_examples=60, deadline=None)
@given(nd_geometry(), st.integers(0, 2**32 - 1))
def test_every_max_pool_path_agrees_every_rank(case, seed):
    shape, pp = case
    g = _valid(shape, pp)
    assume(g is not None)
    rng = np.random.default_rng(seed)
    x = _nd_data(rng, shape)
    ref_out, ref_cache = G.max_pool_forward_naive(x, pp)
    dout = rng.integers(-4, 5, size=ref_out.shape).astype(np.float32)  # exact sums
    ref_dx = G.max_pool_backward_naive(dout, ref_cache)
    ref_idx = G.max_pool_indices(ref_cache)
    N, C = shape[:2]
    flat = x.reshape(N, C, -1)
    at = np.take_along_axis(flat, ref_idx.reshape(N, C, -1), 2).reshape(ref_out.shape)
    assert at.tobytes() == ref_out.tobytes()
    paths = [(G.max_pool_forward_general, G.max_pool_backward_general),
             (G.max_pool_forward, G.max_pool_backward)]
    if g.tiles:
        paths.append((G.max_pool_forward_reshape, G.max_pool_backward_reshape))
    for fwd, bwd in paths:
        out, cache = fwd(x, pp)
        assert out.tobytes() == ref_out.tobytes()
        np.testing.assert_array_equal(cache.offsets, ref_cache.offsets)
        np.testing.assert_array_equal(bwd(dout, cache), ref_dx)


@settings(max_examples=60, deadline=None)
@given(nd_geometry(), st.booleans(), st.integers(0, 2**32 - 1))
def test_sum_and_avg_pool_every_rank_exact_on_integers(case, cip, seed):
    shape, pp = case
    pp = {k: v for k, v in pp.items() if k != "dilation"}
    g = _valid(shape, pp, "sum")
    assume(g is not None)
    rng = np.random.default_rng(seed)
    x = rng.integers(-8, 9, size=shape).astype(np.float64)  # sums exact in float64
    out, cache = pooling.sum_pool_forward(x, pp)
    ref = np.zeros(g.output_shape)
    for o in itertools.product(*(range(n) for n in g.out)):
        for tap in itertools.product(*(range(k) for k in g.kernel)):
            pos = tuple(o[a] * g.stride[a] - g.pad[a] + tap[a] for a in range(g.d))
            if all(0 <= p < n for p, n in zip(pos, g.size)):
                ref[(Ellipsis,) + o] += x[(Ellipsis,) + pos]
    np.testing.assert_array_equal(out, ref)
    aout, acache = pooling.avg_pool_forward(x, dict(pp, count_include_pad=cip,
                                                    divisor_override=1))
    assert aout.tobytes() == out.tobytes()
    dout = rng.integers(-4, 5, size=out.shape).astype(np.float64)
    dx = pooling.sum_pool_backward(dout, cache)
    assert dx.tobytes() == pooling.avg_pool_backward(dout, acache).tobytes()
    # the adjoint: <sum_pool(x), dout> == <x, dx>
    assert float((out * dout).sum()) == float((x * dx).sum())


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40))
def test_adaptive_windows_follow_pytorchs_rule(n, o):
    start, end = adaptive_bounds(n, o)
    for i in range(o):
        assert start[i] == (Fraction(i * n, o)).__floor__()
        assert end[i] == (Fraction((i + 1) * n, o)).__ceil__()
    assert start[0] == 0 and end[-1] == n
    assert np.all(end - start >= 1) and np.all(np.diff(start) >= 0) and np.all(np.diff(end) >= 0)
    covered = np.zeros(n, bool)
    for s, e in zip(start, end):
        covered[s:e] = True
    assert covered.all()
    assert adaptive_geometry((1, 1, n), o).window == (int((end - start).max()),)
    assert (end - start).max() <= -(-n // o) + 1


@st.composite
def adaptive_case(draw):
    d = draw(st.integers(1, 3))
    size = tuple(draw(st.integers(1, 9)) for _ in range(d))
    out = tuple(draw(st.one_of(st.none(), st.integers(1, 10))) for _ in range(d))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 2))) + size, out


@settings(max_examples=80, deadline=None)
@given(adaptive_case(), st.integers(0, 2**32 - 1))
def test_adaptive_pooling_brute_force_every_rank(case, seed):
    shape, size = case
    rng = np.random.default_rng(seed)
    x = _nd_data(rng, shape)
    geom = adaptive_geometry(shape, size)
    out, cache = pooling.adaptive_max_pool_forward(x, size)
    idx = pooling.max_pool_indices(cache)
    bounds = [geom.bounds(a) for a in range(geom.d)]
    xi = rng.integers(-8, 9, size=shape).astype(np.float64)
    aout, acache = pooling.adaptive_avg_pool_forward(xi, size)
    for o in itertools.product(*(range(k) for k in geom.out)):
        spans = [range(bounds[a][0][o[a]], bounds[a][1][o[a]]) for a in range(geom.d)]
        positions = list(itertools.product(*spans))
        flat = [np.ravel_multi_index(p, geom.size) for p in positions]
        for n, c in itertools.product(range(shape[0]), range(shape[1])):
            vals = x[n, c].reshape(-1)[flat]
            nan = np.flatnonzero(np.isnan(vals))
            want = flat[nan[-1]] if nan.size else flat[int(np.argmax(vals))]
            assert idx[(n, c) + o] == want
            total = xi[n, c].reshape(-1)[flat].sum()
            assert aout[(n, c) + o] == total / len(flat)
    # gradients: max sends each window's dout to its index; avg spreads it evenly
    dout = rng.integers(-4, 5, size=out.shape).astype(np.float32)
    dx = pooling.adaptive_max_pool_backward(dout, cache)
    ref = np.zeros((shape[0] * shape[1], int(np.prod(shape[2:]))), np.float32)
    for p in range(ref.shape[0]):
        np.add.at(ref[p], idx.reshape(ref.shape[0], -1)[p], dout.reshape(ref.shape[0], -1)[p])
    np.testing.assert_array_equal(dx, ref.reshape(shape))
    # paths: the general xp code gives the dispatched path's bits
    g_out, g_off = pooling._adaptive_max_xp(x, geom)
    assert g_out.tobytes() == out.tobytes()
    np.testing.assert_array_equal(g_off, cache.offsets)
