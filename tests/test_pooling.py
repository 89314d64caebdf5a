"""Max/avg pooling and unpooling on every usable backend."""
import itertools

import numpy as np
import pytest

import gpulayers as G
from gpulayers.gradcheck import eval_numerical_gradient_array, rel_error
from gpulayers.shapes import pool_geometry

MAX_FORWARDS = {
    "naive": (G.max_pool_forward_naive, G.max_pool_backward_naive),
    "general": (G.max_pool_forward_general, G.max_pool_backward_general),
    "fast": (G.max_pool_forward_fast, G.max_pool_backward_fast),
    "default": (G.max_pool_forward, G.max_pool_backward),
}


def tie_free(rng, shape, dtype=np.float64):
    """Distinct values (a shuffled linspace), so every window has one maximum."""
    n = int(np.prod(shape))
    return rng.permutation(np.linspace(-3, 3, n)).reshape(shape).astype(dtype)


def loop_max_pool(x, pp):
    """Reference: scalar loops over windows and taps, PyTorch's rule v > best || isnan(v)."""
    g = pool_geometry(x.shape, pp)
    out = np.empty(g.output_shape, dtype=x.dtype)
    off = np.empty(g.output_shape, dtype=np.int64)
    for n, c, oh, ow in itertools.product(range(g.N), range(g.C), range(g.Ho), range(g.Wo)):
        best, arg = -np.inf, None
        for i, j in itertools.product(range(g.kh), range(g.kw)):
            h, w = oh * g.sh - g.ph + i * g.dh, ow * g.sw - g.pw + j * g.dw
            if 0 <= h < g.H and 0 <= w < g.W:
                v = x[n, c, h, w]
                if arg is None:
                    arg = i * g.kw + j
                if v > best or np.isnan(v):
                    best, arg = v, i * g.kw + j
        out[n, c, oh, ow], off[n, c, oh, ow] = best, arg
    return out, off


def loop_avg_pool(x, pp):
    """Reference: PyTorch's avg_pool2d divisor rules, in scalar loops."""
    g = pool_geometry(x.shape, pp, "avg")
    cip = pp.get("count_include_pad", True)
    out = np.empty(g.output_shape)
    for n, c, oh, ow in itertools.product(range(g.N), range(g.C), range(g.Ho), range(g.Wo)):
        hs, ws = oh * g.sh - g.ph, ow * g.sw - g.pw
        he, we = min(hs + g.kh, g.H + g.ph), min(ws + g.kw, g.W + g.pw)
        size = (he - hs) * (we - ws)
        hs2, ws2, he2, we2 = max(hs, 0), max(ws, 0), min(he, g.H), min(we, g.W)
        s = x[n, c, hs2:he2, ws2:we2].sum()
        out[n, c, oh, ow] = s / (size if cip else (he2 - hs2) * (we2 - ws2))
    return out


GEOMETRIES = [
    dict(pool_height=2, pool_width=2, stride=2),
    dict(pool_height=3, pool_width=3, stride=2, pad=1),
    dict(pool_height=3, pool_width=3, stride=1, pad=1),
    dict(pool_height=3, pool_width=2, stride=(2, 1), pad=(1, 0)),
    dict(pool_height=2, pool_width=3, stride=2, ceil_mode=True),
    dict(pool_height=3, pool_width=3, stride=2, pad=1, ceil_mode=True),
    dict(pool_height=2, pool_width=2, stride=1, dilation=2),
    dict(pool_height=3, pool_width=2, stride=(1, 2), pad=(2, 1), dilation=(2, 3), ceil_mode=True),
    dict(pool_height=1, pool_width=1),
    dict(pool_height=4, pool_width=4, stride=3, pad=2, ceil_mode=True),
]


def to_np(a):
    return G.to_numpy(a)


# ---------------------------------------------------------------- forward semantics

@pytest.mark.parametrize("pp", GEOMETRIES)
@pytest.mark.parametrize("impl", sorted(MAX_FORWARDS))
def test_max_pool_matches_loops_with_ties_nan_inf(xp, rng, pp, impl):
    x = rng.integers(0, 3, size=(2, 3, 7, 8)).astype(np.float64)  # many ties
    x[0, 0, rng.integers(0, 7, 3), rng.integers(0, 8, 3)] = np.nan
    x[1, 1] = -np.inf
    x[1, 2, :3] = -np.inf
    fwd, _ = MAX_FORWARDS[impl]
    out, cache = fwd(xp.asarray(x), pp)
    ref_out, ref_off = loop_max_pool(x, pp)
    np.testing.assert_array_equal(to_np(out), ref_out)
    np.testing.assert_array_equal(to_np(cache.offsets).astype(np.int64), ref_off)


@pytest.mark.parametrize("pp", GEOMETRIES)
def test_max_pool_indices_are_flat_plane_positions(xp, rng, pp):
    x = rng.standard_normal((2, 2, 7, 8))
    out, cache = G.max_pool_forward(xp.asarray(x), pp)
    idx = to_np(G.max_pool_indices(cache))
    assert idx.dtype == np.int64 and idx.shape == out.shape
    flat = x.reshape(2, 2, -1)
    np.testing.assert_array_equal(np.take_along_axis(flat, idx.reshape(2, 2, -1), 2).reshape(out.shape),
                                  to_np(out))


def test_max_pool_indices_match_pytorch_numbers():
    # torch.nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True) on this x (ties on
    # purpose) gives these indices: first maximum in row-major window order.
    x = np.array([[[[1., 3., 3., 0.],
                    [3., 2., 1., 3.],
                    [0., 3., 3., 1.],
                    [2., 1., 0., 2.]]]])
    _, cache = G.max_pool_forward(x, dict(pool_height=3, pool_width=3, stride=2, pad=1))
    np.testing.assert_array_equal(G.max_pool_indices(cache), [[[[1, 1], [4, 7]]]])


def test_cache_holds_compact_offsets_only(rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    for fwd in (G.max_pool_forward, G.max_pool_forward_general, G.max_pool_forward_naive,
                G.max_pool_forward_reshape):
        _, cache = fwd(x, dict(pool_height=2, pool_width=2, stride=2))
        arrays = [v for v in vars(cache).values() if hasattr(v, "shape") and not isinstance(v, np.dtype)]
        assert len(arrays) == 1 and cache.offsets.dtype == np.uint8
        assert cache.offsets.shape == (2, 3, 4, 4)
    _, cache = G.max_pool_forward(rng.standard_normal((1, 1, 40, 40)),
                                  dict(pool_height=17, pool_width=17, stride=1))
    assert cache.offsets.dtype == np.uint16


# ------------------------------------------------------------------------ backward

@pytest.mark.parametrize("pp", GEOMETRIES)
@pytest.mark.parametrize("impl", sorted(MAX_FORWARDS))
def test_max_pool_numeric_gradient(xp, rng, pp, impl):
    fwd, bwd = MAX_FORWARDS[impl]
    x = tie_free(rng, (2, 2, 7, 6))
    out, cache = fwd(xp.asarray(x), pp)
    dout = rng.standard_normal(out.shape)
    dx = bwd(xp.asarray(dout), cache)
    num = eval_numerical_gradient_array(lambda a: fwd(a, pp)[0], xp.asarray(x), xp.asarray(dout))
    assert rel_error(dx, num) < 1e-8


@pytest.mark.parametrize("pp", GEOMETRIES)
def test_max_pool_backward_one_element_per_window_on_ties(xp, rng, pp):
    x = np.ones((2, 2, 7, 8))  # every window is one big tie
    out, cache = G.max_pool_forward(xp.asarray(x), pp)
    dout = rng.standard_normal(out.shape)
    for impl in sorted(MAX_FORWARDS):
        fwd, bwd = MAX_FORWARDS[impl]
        if impl != "default":
            _, cache = fwd(xp.asarray(x), pp)
        dx = to_np(bwd(xp.asarray(dout), cache))
        # the gradient sums are conserved: each window gives dout to exactly one element
        np.testing.assert_allclose(dx.sum(axis=(2, 3)), dout.sum(axis=(2, 3)), rtol=1e-12, atol=1e-12)
        ref = np.zeros_like(x)
        _, off = loop_max_pool(x, pp)
        g = pool_geometry(x.shape, pp)
        for n, c, oh, ow in itertools.product(range(2), range(2), range(g.Ho), range(g.Wo)):
            i, j = divmod(off[n, c, oh, ow], g.kw)
            ref[n, c, oh * g.sh - g.ph + i * g.dh, ow * g.sw - g.pw + j * g.dw] += dout[n, c, oh, ow]
        np.testing.assert_allclose(dx, ref, rtol=1e-12, atol=1e-12)


def test_article_tie_bug_is_fixed():
    # The article's backward gave both tied maxima the gradient: dx = [[1, 1]].
    x = np.array([[[[1.0, 1.0]]]])
    out, cache = G.max_pool_forward_reshape(x, dict(pool_height=1, pool_width=2, stride=(1, 2)))
    np.testing.assert_array_equal(G.max_pool_backward_reshape(np.ones((1, 1, 1, 1)), cache),
                                  [[[[1.0, 0.0]]]])
    out, cache = G.max_pool_forward_naive(x, dict(pool_height=1, pool_width=2, stride=(1, 2)))
    np.testing.assert_array_equal(G.max_pool_backward_naive(np.ones((1, 1, 1, 1)), cache),
                                  [[[[1.0, 0.0]]]])


@pytest.mark.parametrize("pp", GEOMETRIES[:4])
def test_paths_agree(xp, rng, pp):
    x = xp.asarray(rng.standard_normal((3, 4, 9, 10)).astype(np.float32))
    outs = {k: f(x, pp) for k, (f, _) in MAX_FORWARDS.items()}
    dout = xp.asarray(rng.standard_normal(outs["naive"][0].shape).astype(np.float32))
    base_out = to_np(outs["naive"][0])
    base_dx = to_np(G.max_pool_backward_naive(dout, outs["naive"][1]))
    for k, (out, cache) in outs.items():
        np.testing.assert_array_equal(to_np(out), base_out)
        # overlapping windows may add in another order: float32 rounding only
        np.testing.assert_allclose(to_np(MAX_FORWARDS[k][1](dout, cache)), base_dx,
                                   rtol=1e-6, atol=1e-6)


def test_reshape_path_agrees_where_it_applies(xp, rng):
    pp = dict(pool_height=2, pool_width=3, stride=(2, 3))
    x = xp.asarray(rng.integers(0, 3, (2, 3, 8, 9)).astype(np.float64))
    out, cache = G.max_pool_forward_reshape(x, pp)
    out2, cache2 = G.max_pool_forward_general(x, pp)
    np.testing.assert_array_equal(to_np(out), to_np(out2))
    np.testing.assert_array_equal(to_np(cache.offsets), to_np(cache2.offsets))
    dout = xp.asarray(rng.standard_normal(out.shape))
    np.testing.assert_array_equal(to_np(G.max_pool_backward_reshape(dout, cache)),
                                  to_np(G.max_pool_backward_general(dout, cache2)))


def test_reshape_precondition_error():
    x = np.random.default_rng().standard_normal((1, 1, 5, 4))
    with pytest.raises(ValueError, match="tile the input"):
        G.max_pool_forward_reshape(x, dict(pool_height=2, pool_width=2, stride=2))
    with pytest.raises(ValueError, match="tile the input"):
        G.max_pool_forward_reshape(x[:, :, :4], dict(pool_height=2, pool_width=2, stride=1))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_preserved_and_float16_matches(xp, rng, dtype):
    x = rng.standard_normal((2, 3, 9, 9)).astype(dtype)
    pp = dict(pool_height=3, pool_width=3, stride=2, pad=1)
    out, cache = G.max_pool_forward(xp.asarray(x), pp)
    assert out.dtype == dtype
    ref, _ = loop_max_pool(x.astype(np.float64), pp)
    np.testing.assert_array_equal(to_np(out).astype(np.float64), ref)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = G.max_pool_backward(xp.asarray(dout), cache)
    assert dx.dtype == dtype
    dx64 = G.max_pool_backward(dout.astype(np.float64), G.max_pool_forward(x.astype(np.float64), pp)[1])
    np.testing.assert_allclose(to_np(dx).astype(np.float64), dx64, rtol=2e-3, atol=2e-3)


def test_nan_window_takes_last_nan_and_all_neg_inf_first_element():
    x = np.array([[[[np.nan, 5.0, np.nan, 1.0]]]])
    out, cache = G.max_pool_forward(x, dict(pool_height=1, pool_width=4))
    assert np.isnan(out).all() and cache.offsets[0, 0, 0, 0] == 2
    x = np.full((1, 1, 3, 3), -np.inf)
    out, cache = G.max_pool_forward(x, dict(pool_height=3, pool_width=3, stride=1, pad=1))
    assert np.all(out == -np.inf)
    # window (0, 0) starts in the padding: its first in-range element is tap (1, 1)
    assert G.max_pool_indices(cache)[0, 0, 0, 0] == 0 and cache.offsets[0, 0, 0, 0] == 4


def test_backward_deterministic_and_nothing_mutated(xp, rng):
    pp = dict(pool_height=3, pool_width=3, stride=1, pad=1)
    x = xp.asarray(rng.standard_normal((2, 3, 8, 8)))
    x0 = to_np(x).copy()
    out, cache = G.max_pool_forward(x, pp)
    off0 = to_np(cache.offsets).copy()
    dout = xp.asarray(rng.standard_normal(out.shape))
    d0 = to_np(dout).copy()
    a = to_np(G.max_pool_backward(dout, cache))
    b = to_np(G.max_pool_backward(dout, cache))
    assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(to_np(x), x0)
    np.testing.assert_array_equal(to_np(dout), d0)
    np.testing.assert_array_equal(to_np(cache.offsets), off0)


def test_non_contiguous_inputs(xp, rng):
    base = rng.standard_normal((3, 4, 12, 10))
    views = [base[:, :, ::2, :], base.transpose(0, 1, 3, 2), base[:, :, ::-1, ::-1], base[1:, 1:3]]
    pp = dict(pool_height=3, pool_width=2, stride=2, pad=1)
    for v in views:
        out, cache = G.max_pool_forward(xp.asarray(v) if xp is np else xp.asarray(np.ascontiguousarray(v)), pp)
        out_c, cache_c = G.max_pool_forward(xp.asarray(np.ascontiguousarray(v)), pp)
        np.testing.assert_array_equal(to_np(out), to_np(out_c))
        a, _ = G.avg_pool_forward(v, pp)
        b, _ = G.avg_pool_forward(np.ascontiguousarray(v), pp)
        np.testing.assert_array_equal(a, b)
    if xp is not np:
        v = xp.asarray(base)[:, :, ::2, ::-1]
        out, _ = G.max_pool_forward(v, pp)
        out_c, _ = G.max_pool_forward(xp.ascontiguousarray(v), pp)
        np.testing.assert_array_equal(to_np(out), to_np(out_c))


# --------------------------------------------------------------------- output sizes

# (H, k, stride, pad, dilation, ceil_mode) -> output size, from PyTorch's rules
SIZE_TABLE = [
    (7, 2, 2, 0, 1, False, 3), (7, 2, 2, 0, 1, True, 4),
    (6, 2, 2, 0, 1, True, 3), (5, 3, 2, 1, 1, False, 3), (5, 3, 2, 1, 1, True, 3),
    (6, 3, 2, 1, 1, True, 4), (6, 3, 2, 1, 1, False, 3),
    (112, 3, 2, 1, 1, False, 56), (112, 2, 2, 0, 1, False, 56),
    (10, 3, 3, 1, 1, True, 4), (10, 3, 3, 0, 1, True, 4), (9, 3, 3, 1, 1, True, 4),
    (8, 2, 1, 0, 2, False, 6), (8, 3, 2, 2, 2, True, 5), (8, 3, 2, 2, 2, False, 4),
    (1, 1, 1, 0, 1, False, 1), (4, 4, 3, 2, 1, True, 2),
]


@pytest.mark.parametrize("H,k,s,p,d,ceil,expected", SIZE_TABLE)
def test_output_size_table(H, k, s, p, d, ceil, expected):
    g = pool_geometry((1, 1, H, H), dict(pool_height=k, pool_width=k, stride=s, pad=p,
                                         dilation=d, ceil_mode=ceil))
    assert (g.Ho, g.Wo) == (expected, expected)


# ------------------------------------------------------------------------ avg pooling

AVG_GEOMETRIES = [
    dict(pool_height=2, pool_width=2, stride=2),
    dict(pool_height=3, pool_width=3, stride=2, pad=1),
    dict(pool_height=3, pool_width=3, stride=2, pad=1, count_include_pad=False),
    dict(pool_height=3, pool_width=3, stride=2, pad=1, ceil_mode=True),
    dict(pool_height=3, pool_width=3, stride=2, pad=1, ceil_mode=True, count_include_pad=False),
    dict(pool_height=2, pool_width=3, stride=(3, 2), ceil_mode=True),
]


@pytest.mark.parametrize("pp", AVG_GEOMETRIES)
def test_avg_pool_forward_and_gradient(xp, rng, pp):
    x = rng.standard_normal((2, 2, 7, 8))
    out, cache = G.avg_pool_forward(xp.asarray(x), pp)
    np.testing.assert_allclose(to_np(out), loop_avg_pool(x, pp), rtol=1e-12, atol=1e-14)
    dout = rng.standard_normal(out.shape)
    dx = G.avg_pool_backward(xp.asarray(dout), cache)
    num = eval_numerical_gradient_array(lambda a: G.avg_pool_forward(a, pp)[0], xp.asarray(x),
                                        xp.asarray(dout))
    # element-wise: entries near zero carry the difference quotient's absolute error
    np.testing.assert_allclose(to_np(dx), num, rtol=1e-7, atol=1e-9)


def test_avg_pool_float16(xp, rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float16)
    pp = dict(pool_height=3, pool_width=3, stride=2, pad=1)
    out, cache = G.avg_pool_forward(xp.asarray(x), pp)
    assert out.dtype == np.float16
    np.testing.assert_allclose(to_np(out), loop_avg_pool(x.astype(np.float64), pp), atol=2e-3)
    assert G.avg_pool_backward(xp.asarray(np.ones(out.shape, np.float16)), cache).dtype == np.float16


def test_avg_pool_rejects_dilation():
    with pytest.raises(ValueError, match="dilation"):
        G.avg_pool_forward(np.ones((1, 1, 4, 4)), dict(pool_height=2, pool_width=2, dilation=2))


# --------------------------------------------------------------------- max unpooling

def test_unpool_round_trip_and_gradient(xp, rng):
    x = tie_free(rng, (2, 3, 8, 8))
    pp = dict(pool_height=2, pool_width=2, stride=2)
    out, cache = G.max_pool_forward(xp.asarray(x), pp)
    idx = G.max_pool_indices(cache)
    up, ucache = G.max_unpool_forward(out, idx, (8, 8))
    up = to_np(up)
    kept = up != 0
    np.testing.assert_array_equal(up[kept], x[kept])
    assert kept.sum() == out.size
    dout = rng.standard_normal(up.shape)
    dx = G.max_unpool_backward(xp.asarray(dout), ucache)
    num = eval_numerical_gradient_array(lambda a: G.max_unpool_forward(a, idx, (8, 8))[0],
                                        out, xp.asarray(dout))
    assert rel_error(dx, num) < 1e-9


def test_unpool_duplicate_targets_last_wins(xp):
    x = xp.asarray(np.array([[[[1.0, 2.0, 3.0]]]]))
    idx = xp.asarray(np.array([[[[1, 1, 0]]]]))
    out, cache = G.max_unpool_forward(x, idx, (1, 2))
    np.testing.assert_array_equal(to_np(out), [[[[3.0, 2.0]]]])
    dx = G.max_unpool_backward(xp.asarray(np.array([[[[10.0, 20.0]]]])), cache)
    np.testing.assert_array_equal(to_np(dx), [[[[0.0, 20.0, 10.0]]]])


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "xp"])
def test_unpool_out_of_range(xp, kernels):
    """NumPy raises naming the range; CuPy (kernels or xp path) reads nothing back: an
    out-of-range input targets nothing and gets no gradient."""
    x = xp.asarray(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    idx = xp.asarray(np.array([[[[0, 16], [-1, 5]]]]))
    if xp is np:
        with pytest.raises(ValueError, match=r"out of range: indices span \[-1, 16\]"):
            G.max_unpool_forward(x, idx, (4, 4))
        return
    from gpulayers import backend
    old = backend.set_kernels(kernels)
    try:
        out, cache = G.max_unpool_forward(x, idx, (4, 4))
        dx = G.max_unpool_backward(xp.asarray(np.arange(16.0).reshape(1, 1, 4, 4)), cache)
    finally:
        backend.set_kernels(old)
    want = np.zeros((1, 1, 4, 4))
    want[0, 0, 0, 0], want[0, 0, 1, 1] = 1.0, 4.0
    np.testing.assert_array_equal(to_np(out), want)
    np.testing.assert_array_equal(to_np(dx), [[[[0.0, 0.0], [0.0, 5.0]]]])


def test_unpool_errors():
    x = np.ones((1, 1, 2, 2))
    with pytest.raises(ValueError, match="out of range"):
        G.max_unpool_forward(x, np.array([[[[0, 1], [2, 16]]]]), (4, 4))
    with pytest.raises(ValueError, match="out of range"):
        G.max_unpool_forward(x, np.array([[[[0, -1], [2, 3]]]]), (4, 4))
    with pytest.raises(TypeError, match="integer"):
        G.max_unpool_forward(x, np.zeros((1, 1, 2, 2)), (4, 4))
    with pytest.raises(ValueError, match="do not match"):
        G.max_unpool_forward(x, np.zeros((1, 1, 2, 1), dtype=np.int64), (4, 4))
    with pytest.raises(ValueError, match="output_size"):
        G.max_unpool_forward(x, np.zeros((1, 1, 2, 2), dtype=np.int64), (4,))


# ----------------------------------------------------------------------- bad input

BAD = [
    ((2, 3, 8, 8, 8, 8), {}, "\\(N, C, L\\), \\(N, C, H, W\\) or \\(N, C, D, H, W\\), got 6-D"),
    ((2, 3, 8), {}, "name a 2-D window.*1 spatial axes.*kernel_size"),
    ((2, 0, 8, 8), {}, "non-zero"),
    ((2, 3, 0, 8), {}, "non-zero"),
    ((2, 3, 8, 8), dict(pool_height=0), "kernel size"),
    ((2, 3, 8, 8), dict(stride=0), "stride"),
    ((2, 3, 8, 8), dict(dilation=0), "dilation"),
    ((2, 3, 8, 8), dict(pad=2), "at most half"),
    ((2, 3, 2, 2), dict(pool_height=3, pool_width=3), "too small"),
    ((1, 1, 1, 1), dict(pool_height=2, pool_width=2, stride=1, pad=2, dilation=3), "only padding"),
    ((2, 3, 8, 8), dict(pool_size=2), "unknown pool_param"),
    ((2, 3, 8, 8), dict(ceil_mode="yes"), "ceil_mode"),
]


@pytest.mark.parametrize("shape,update,match", BAD)
def test_bad_input_raises_value_error_with_sizes(shape, update, match):
    pp = dict(pool_height=2, pool_width=2)
    pp.update(update)
    x = np.ones(shape)
    for fwd in (G.max_pool_forward, G.max_pool_forward_naive, G.max_pool_forward_general):
        with pytest.raises(ValueError, match=match) as err:
            fwd(x, pp)
        assert str(shape[-1]) in str(err.value)


def test_error_messages_name_sizes():
    with pytest.raises(ValueError) as err:
        G.max_pool_forward(np.ones((2, 3, 2, 2)), dict(pool_height=3, pool_width=3))
    msg = str(err.value)
    assert "(2, 3, 2, 2)" in msg and "kernel = (3, 3)" in msg and "output (H, W) = (0, 0)" in msg


def test_non_floating_dtype_raises_type_error():
    with pytest.raises(TypeError, match="floating"):
        G.max_pool_forward(np.ones((1, 1, 4, 4), dtype=np.int32), dict(pool_height=2, pool_width=2))
    with pytest.raises(TypeError, match="floating"):
        G.avg_pool_forward(np.ones((1, 1, 4, 4), dtype=bool), dict(pool_height=2, pool_width=2))


def test_dout_shape_and_cache_type_checked():
    out, cache = G.max_pool_forward(np.ones((1, 1, 4, 4)), dict(pool_height=2, pool_width=2))
    with pytest.raises(ValueError, match="dout has shape"):
        G.max_pool_backward(np.ones((1, 1, 3, 2)), cache)
    with pytest.raises(TypeError, match="MaxPoolCache"):
        G.max_pool_backward(np.ones((1, 1, 2, 2)), (1, 2))


def test_numpy_cache_is_read_only(rng):
    _, cache = G.max_pool_forward(rng.standard_normal((1, 1, 4, 4)), dict(pool_height=2, pool_width=2))
    with pytest.raises(ValueError):
        cache.offsets[0, 0, 0, 0] = 1
