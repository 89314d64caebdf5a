"""Max, average and sum pooling and max unpooling over 1, 2 and 3 spatial axes, against
float64 NumPy references written as loops over windows and taps (and PyTorch, where it is
installed)."""
import itertools

import numpy as np
import pytest
from conftest import make_input

import gpulayers.pooling as P
from gpulayers.backend import to_numpy
from gpulayers.gradcheck import eval_numerical_gradient_array, rel_error
from gpulayers.shapes import pool_geometry

MAX_PATHS = {
    "naive": (P.max_pool_forward_naive, P.max_pool_backward_naive),
    "general": (P.max_pool_forward_general, P.max_pool_backward_general),
    "fast": (P.max_pool_forward_fast, P.max_pool_backward_fast),
    "default": (P.max_pool_forward, P.max_pool_backward),
}

# (x shape, pool_param): padding, dilation, ceil_mode, uneven and overlapping windows
MAX_CASES = [
    ((2, 3, 11), dict(kernel_size=3, stride=2, pad=1)),
    ((2, 3, 10), dict(kernel_size=2)),
    ((2, 3, 12), dict(kernel_size=4, stride=3, pad=2, ceil_mode=True)),
    ((2, 2, 13), dict(kernel_size=3, stride=1, dilation=3, pad=2)),
    ((2, 2, 9), dict(kernel_size=(2,), stride=(3,), dilation=(2,), ceil_mode=True)),
    ((2, 2, 7, 9), dict(kernel_size=(3, 2), stride=(2, 1), pad=(1, 1), ceil_mode=True)),
    ((2, 2, 7, 9, 8), dict(kernel_size=3, stride=2, pad=1)),
    ((2, 2, 6, 8, 4), dict(kernel_size=2)),
    ((1, 3, 7, 9, 8), dict(kernel_size=(2, 3, 2), stride=(1, 2, 3), pad=(1, 1, 0),
                           ceil_mode=True)),
    ((2, 2, 7, 8, 9), dict(kernel_size=2, stride=1, dilation=(2, 1, 3))),
    ((1, 2, 5, 6, 7), dict(kernel_size=(3, 1, 3), stride=(2, 1, 1), pad=(1, 0, 1),
                           dilation=(1, 1, 2), ceil_mode=True)),
    ((2, 1, 4, 5, 6), dict(kernel_size=1)),
    ((2, 2, 9, 6, 5), dict(kernel_size=2, stride=(1, 2, 1), dilation=(3, 1, 1), pad=(1, 0, 1),
                           ceil_mode=True)),
]

AVG_CASES = [
    ((2, 3, 11), dict(kernel_size=3, stride=2, pad=1)),
    ((2, 3, 12), dict(kernel_size=4, stride=3, pad=2, ceil_mode=True)),
    ((2, 2, 7, 9), dict(kernel_size=(3, 2), stride=(2, 1), pad=(1, 1), ceil_mode=True)),
    ((2, 2, 7, 9, 8), dict(kernel_size=3, stride=2, pad=1)),
    ((1, 3, 7, 9, 8), dict(kernel_size=(2, 3, 2), stride=(1, 2, 3), pad=(1, 1, 0),
                           ceil_mode=True)),
    ((2, 2, 5, 6, 7), dict(kernel_size=(3, 2, 3), stride=2, pad=(1, 1, 0), ceil_mode=True)),
]
AVG_OPTIONS = [dict(), dict(count_include_pad=False), dict(divisor_override=3),
               dict(count_include_pad=False, divisor_override=1)]


def ids(cases):
    return [f"{s}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for s, p in cases]


def tie_free(rng, shape, dtype=np.float64):
    """Distinct values (a shuffled linspace), so every window has one maximum."""
    n = int(np.prod(shape))
    return rng.permutation(np.linspace(-3, 3, n)).reshape(shape).astype(dtype)


def window_positions(g, o):
    """Yield (compact offset, input position or None) of every tap of window o."""
    for off, tap in enumerate(itertools.product(*(range(k) for k in g.kernel))):
        pos = tuple(o[a] * g.stride[a] - g.pad[a] + tap[a] * g.dilation[a] for a in range(g.d))
        inside = all(0 <= p < n for p, n in zip(pos, g.size))
        yield off, (pos if inside else None)


def ref_max_pool(x, pp):
    """float64 reference over every rank: taps in row-major order, PyTorch's rule
    v > best || isnan(v), starting at the first in-range tap; vectorised over (N, C) only."""
    g = pool_geometry(x.shape, pp, "max")
    x = x.astype(np.float64)
    out = np.empty(g.output_shape)
    off = np.empty(g.output_shape, dtype=np.int64)
    for o in itertools.product(*(range(n) for n in g.out)):
        best = arg = None
        for t, pos in window_positions(g, o):
            if pos is None:
                continue
            v = x[(Ellipsis,) + pos]
            if best is None:
                best, arg = np.full(v.shape, -np.inf), np.full(v.shape, t)
            take = (v > best) | np.isnan(v)
            best, arg = np.where(take, v, best), np.where(take, t, arg)
        out[(Ellipsis,) + o], off[(Ellipsis,) + o] = best, arg
    return out, off


def ref_max_backward(dout, off, pp, shape):
    g = pool_geometry(shape, pp, "max")
    dx = np.zeros(shape)
    for o in itertools.product(*(range(n) for n in g.out)):
        for t, pos in window_positions(g, o):
            if pos is not None:
                dx[(Ellipsis,) + pos] += np.where(off[(Ellipsis,) + o] == t,
                                                  dout[(Ellipsis,) + o], 0.0)
    return dx


def ref_flat_indices(off, pp, shape):
    """PyTorch's return_indices numbers from compact offsets, by brute force."""
    g = pool_geometry(shape, pp, "max")
    idx = np.empty(off.shape, dtype=np.int64)
    for n, c in itertools.product(range(g.N), range(g.C)):
        for o in itertools.product(*(range(k) for k in g.out)):
            pos = dict(window_positions(g, o))[off[(n, c) + o]]
            idx[(n, c) + o] = np.ravel_multi_index(pos, g.size)
    return idx


def ref_avg_pool(x, pp, op="avg"):
    """float64 reference: window sums over in-range taps; divisor by PyTorch's rules (the
    window clipped to the padded input, or to the input without count_include_pad;
    divisor_override replaces it; sum pooling divides by nothing)."""
    g = pool_geometry(x.shape, pp, op)
    cip = pp.get("count_include_pad", True)
    div = pp.get("divisor_override")
    x = x.astype(np.float64)
    out = np.empty(g.output_shape)
    for o in itertools.product(*(range(n) for n in g.out)):
        total = 0.0
        for _, pos in window_positions(g, o):
            if pos is not None:
                total = total + x[(Ellipsis,) + pos]
        padded = inside = 1
        for a in range(g.d):
            start = o[a] * g.stride[a] - g.pad[a]
            end = min(start + g.kernel[a], g.size[a] + g.pad[a])
            padded *= end - start
            inside *= min(end, g.size[a]) - max(start, 0)
        divisor = 1 if op == "sum" else (div if div is not None else (padded if cip else inside))
        out[(Ellipsis,) + o] = total / divisor
    return out


def to_np(a):
    return to_numpy(a)


def torch_max_pool(x, pp):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    d = x.ndim - 2
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d]
    out, idx = fn(torch.from_numpy(np.ascontiguousarray(x)), pp["kernel_size"],
                  pp.get("stride"), pp.get("pad", 0), pp.get("dilation", 1),
                  ceil_mode=pp.get("ceil_mode", False), return_indices=True)
    return out.numpy(), idx.numpy()


def torch_pad_ok(pp, d):
    """PyTorch 2.13 refuses pad > kernel // 2 whatever the dilation (README)."""
    k = pp["kernel_size"]
    k = (k,) * d if isinstance(k, int) else k
    p = pp.get("pad", 0)
    p = (p,) * d if isinstance(p, int) else p
    return all(pi <= ki // 2 for pi, ki in zip(p, k))


# ---------------------------------------------------------------------- max pooling

@pytest.mark.parametrize("kind", ["random", "ties", "nan", "-inf"])
@pytest.mark.parametrize("shape,pp", MAX_CASES, ids=ids(MAX_CASES))
def test_max_pool_every_path_matches_reference(xp, rng, shape, pp, kind):
    x = make_input(kind, shape, np.float64, rng)
    ref_out, ref_off = ref_max_pool(x, pp)
    for name, (fwd, _) in MAX_PATHS.items():
        out, cache = fwd(xp.asarray(x), pp)
        assert out.shape == ref_out.shape, name
        np.testing.assert_array_equal(to_np(out), ref_out, err_msg=name)
        np.testing.assert_array_equal(to_np(cache.offsets).astype(np.int64), ref_off,
                                      err_msg=name)
        assert cache.offsets.dtype == cache.geom.offset_dtype


@pytest.mark.parametrize("shape,pp", MAX_CASES, ids=ids(MAX_CASES))
def test_max_pool_indices_brute_force_and_torch(xp, rng, shape, pp):
    x = make_input("ties", shape, np.float64, rng)
    x[rng.random(shape) < 0.1] = np.nan
    out, cache = P.max_pool_forward(xp.asarray(x), pp)
    idx = to_np(P.max_pool_indices(cache))
    assert idx.dtype == np.int64 and idx.shape == out.shape
    np.testing.assert_array_equal(idx, ref_flat_indices(to_np(cache.offsets), pp, shape))
    N, C = shape[:2]
    at = np.take_along_axis(x.reshape(N, C, -1), idx.reshape(N, C, -1), axis=2)
    np.testing.assert_array_equal(at.reshape(out.shape), to_np(out))
    pytest.importorskip("torch")
    if torch_pad_ok(pp, len(shape) - 2):
        t_out, t_idx = torch_max_pool(x, pp)
        np.testing.assert_array_equal(to_np(out), t_out)
        np.testing.assert_array_equal(idx, t_idx)


def test_torch_indices_with_neg_inf_windows(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 6, 7, 5))
    x[rng.random(x.shape) < 0.6] = -np.inf
    x[0, 0] = -np.inf
    pp = dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)
    _, cache = P.max_pool_forward(x, pp)
    t_out, t_idx = torch_max_pool(x, pp)
    np.testing.assert_array_equal(P.max_pool_indices(cache), t_idx)
    assert torch.isinf(torch.from_numpy(t_out[0, 0])).all()


def test_signed_zeros_first_in_window_order(rng):
    for shape, pp in [((3, 4, 16), dict(kernel_size=2)), ((2, 3, 6, 8, 8), dict(kernel_size=2)),
                      ((2, 3, 7, 9, 8), dict(kernel_size=3, stride=2, pad=1))]:
        x = rng.choice(np.array([-0.0, 0.0, -1.0]), size=shape)
        ref_out, ref_off = ref_max_pool(x, pp)
        for name, (fwd, _) in MAX_PATHS.items():
            out, cache = fwd(x, pp)
            np.testing.assert_array_equal(cache.offsets, ref_off, err_msg=name)
            idx = P.max_pool_indices(cache)
            at = np.take_along_axis(x.reshape(shape[0], shape[1], -1),
                                    idx.reshape(shape[0], shape[1], -1), axis=2)
            assert out.tobytes() == at.reshape(out.shape).tobytes(), name
        assert np.signbit(out).any() and (~np.signbit(out) & (out == 0)).any()


def test_reshape_path_for_every_rank(xp, rng):
    for shape, pp in [((2, 3, 12), dict(kernel_size=3)), ((2, 3, 4, 6), dict(kernel_size=2)),
                      ((2, 2, 4, 6, 9), dict(kernel_size=(2, 3, 3)))]:
        x = make_input("ties", shape, np.float64, rng)
        x[rng.random(shape) < 0.1] = np.nan
        out, cache = P.max_pool_forward_reshape(xp.asarray(x), pp)
        ref_out, ref_off = ref_max_pool(x, pp)
        np.testing.assert_array_equal(to_np(out), ref_out)
        np.testing.assert_array_equal(to_np(cache.offsets), ref_off)
        dout = rng.standard_normal(out.shape)
        dx = P.max_pool_backward_reshape(xp.asarray(dout), cache)
        np.testing.assert_array_equal(to_np(dx), ref_max_backward(dout, ref_off, pp, shape))
    with pytest.raises(ValueError, match=r"tile the input.*\(2, 2, 5, 6, 9\)"):
        P.max_pool_forward_reshape(np.ones((2, 2, 5, 6, 9)), dict(kernel_size=2))


@pytest.mark.parametrize("shape,pp", MAX_CASES, ids=ids(MAX_CASES))
def test_max_pool_backward_matches_reference(xp, rng, shape, pp):
    x = make_input("ties", shape, np.float64, rng)
    dout = rng.standard_normal(pool_geometry(shape, pp).output_shape)
    _, ref_off = ref_max_pool(x, pp)
    ref = ref_max_backward(dout, ref_off, pp, shape)
    dxs = {}
    for name, (fwd, bwd) in MAX_PATHS.items():
        _, cache = fwd(xp.asarray(x), pp)
        dxs[name] = to_np(bwd(xp.asarray(dout), cache))
        np.testing.assert_allclose(dxs[name], ref, rtol=1e-13, atol=1e-13, err_msg=name)
        # each window's gradient goes to exactly one element
        np.testing.assert_allclose(dxs[name].sum(axis=tuple(range(2, len(shape)))),
                                   dout.sum(axis=tuple(range(2, len(shape)))), rtol=1e-12,
                                   atol=1e-12)
    # the fast paths add in the general path's order: the same bits
    assert dxs["fast"].tobytes() == dxs["general"].tobytes()


@pytest.mark.parametrize("shape,pp", [c for c in MAX_CASES if c[1] != dict(kernel_size=1)],
                         ids=ids([c for c in MAX_CASES if c[1] != dict(kernel_size=1)]))
def test_max_pool_numeric_gradient(xp, rng, shape, pp):
    x = tie_free(rng, shape)
    for name, (fwd, bwd) in MAX_PATHS.items():
        if name == "naive" and len(shape) == 5:
            continue  # slow; the naive backward is checked against the reference above
        out, cache = fwd(xp.asarray(x), pp)
        dout = rng.standard_normal(out.shape)
        dx = bwd(xp.asarray(dout), cache)
        num = eval_numerical_gradient_array(lambda a: fwd(a, pp)[0], xp.asarray(x),
                                            xp.asarray(dout))
        assert rel_error(dx, num) < 1e-8, name


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,pp", [MAX_CASES[0], MAX_CASES[6], MAX_CASES[9]],
                         ids=ids([MAX_CASES[0], MAX_CASES[6], MAX_CASES[9]]))
def test_max_pool_dtypes(xp, rng, shape, pp, dtype):
    x = make_input("nan", shape, dtype, rng)
    ref_out, ref_off = ref_max_pool(x.astype(np.float64), pp)
    for name, (fwd, bwd) in MAX_PATHS.items():
        out, cache = fwd(xp.asarray(x), pp)
        assert out.dtype == dtype, name
        np.testing.assert_array_equal(to_np(out).astype(np.float64), ref_out, err_msg=name)
        np.testing.assert_array_equal(to_np(cache.offsets), ref_off, err_msg=name)
        dout = rng.standard_normal(out.shape)
        for ddt in (np.float16, np.float32, np.float64):
            dx = bwd(xp.asarray(dout.astype(ddt)), cache)
            assert dx.dtype == dtype, name
        ref = ref_max_backward(dout.astype(dtype).astype(np.float64), ref_off, pp, shape)
        tol = {np.float16: 3e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
        np.testing.assert_allclose(to_np(bwd(xp.asarray(dout.astype(dtype)), cache)), ref,
                                   rtol=tol, atol=tol, err_msg=name)


def test_float16_backward_accumulates_in_float32():
    # one element is the maximum of 200 windows: its 200 gradients summed in float16
    # would drift by several float16 steps; summed in float32, one rounding at the end
    x = np.zeros((1, 1, 400), np.float16)
    x[0, 0, 199] = 1.0
    pp = dict(kernel_size=200, stride=1)
    _, cache = P.max_pool_forward(x, pp)
    dout = np.full(cache.geom.output_shape, 0.1, np.float16)  # 201 windows, 200 see x[199]
    for fwd, bwd in MAX_PATHS.values():
        _, cache = fwd(x, pp)
        dx = bwd(dout, cache)
        wins = int(np.sum(P.max_pool_indices(cache) == 199))
        exact = np.float32(np.float16(0.1)) * wins
        assert abs(float(dx[0, 0, 199]) - exact) <= 0.02, float(dx[0, 0, 199])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,pp", MAX_CASES, ids=ids(MAX_CASES))
def test_public_max_pool_bitwise_equal_general(rng, shape, pp, dtype):
    """The public calls (on NumPy: the CPU loop kernels, gpulayers.cpu_kernels.pool, or the
    general path without them) against the general path at every rank."""
    for kind in ("ties", "nan", "-inf"):
        x = make_input(kind, shape, dtype, rng)
        x.flat[::5] = -0.0
        out, cache = P.max_pool_forward(x, pp)
        g_out, g_cache = P.max_pool_forward_general(x, pp)
        assert out.tobytes() == g_out.tobytes()
        np.testing.assert_array_equal(cache.offsets, g_cache.offsets)
        dout = (rng.standard_normal(out.shape) * 10.0 ** rng.integers(-4, 5, out.shape))
        dout = dout.astype(dtype)
        dout.flat[::7] = -0.0
        assert (P.max_pool_backward(dout, cache).tobytes()
                == P.max_pool_backward_general(dout, cache).tobytes())


# ---------------------------------------------------------------- avg / sum pooling

@pytest.mark.parametrize("opts", AVG_OPTIONS, ids=lambda o: str(o))
@pytest.mark.parametrize("shape,pp", AVG_CASES, ids=ids(AVG_CASES))
def test_avg_pool_matches_reference_and_gradient(xp, rng, shape, pp, opts):
    pp = dict(pp, **opts)
    x = rng.standard_normal(shape)
    out, cache = P.avg_pool_forward(xp.asarray(x), pp)
    assert isinstance(cache, P.AvgPoolCache)
    np.testing.assert_allclose(to_np(out), ref_avg_pool(x, pp), rtol=1e-12, atol=1e-14)
    dout = rng.standard_normal(out.shape)
    dx = P.avg_pool_backward(xp.asarray(dout), cache)
    num = eval_numerical_gradient_array(lambda a: P.avg_pool_forward(a, pp)[0],
                                        xp.asarray(x), xp.asarray(dout))
    np.testing.assert_allclose(to_np(dx), num, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape,pp", AVG_CASES, ids=ids(AVG_CASES))
def test_sum_pool_is_avg_with_divisor_one(xp, rng, shape, pp):
    x = rng.standard_normal(shape).astype(np.float32)
    out, cache = P.sum_pool_forward(xp.asarray(x), pp)
    assert isinstance(cache, P.SumPoolCache)
    np.testing.assert_allclose(to_np(out), ref_avg_pool(x, pp, "sum"), rtol=1e-5, atol=1e-5)
    for cip in (True, False):
        ref, rcache = P.avg_pool_forward(xp.asarray(x), dict(pp, divisor_override=1,
                                                             count_include_pad=cip))
        assert to_np(out).tobytes() == to_np(ref).tobytes()
        dout = xp.asarray(rng.standard_normal(out.shape).astype(np.float32))
        assert (to_np(P.sum_pool_backward(dout, cache)).tobytes()
                == to_np(P.avg_pool_backward(dout, rcache)).tobytes())
    x64 = rng.standard_normal(shape)
    dout = rng.standard_normal(out.shape)
    out, cache = P.sum_pool_forward(xp.asarray(x64), pp)
    num = eval_numerical_gradient_array(lambda a: P.sum_pool_forward(a, pp)[0],
                                        xp.asarray(x64), xp.asarray(dout))
    np.testing.assert_allclose(to_np(P.sum_pool_backward(xp.asarray(dout), cache)), num,
                               rtol=1e-7, atol=1e-9)


def test_sum_pool_padding_counts_as_zero():
    x = np.arange(1.0, 6.0).reshape(1, 1, 5)
    out, _ = P.sum_pool_forward(x, dict(kernel_size=3, stride=2, pad=1, ceil_mode=True))
    np.testing.assert_array_equal(out, [[[3.0, 9.0, 9.0]]])


def test_sum_pool_takes_no_avg_options():
    with pytest.raises(ValueError, match="divisor_override.*sum pooling"):
        P.sum_pool_forward(np.ones((1, 1, 4)), dict(kernel_size=2, divisor_override=1))


@pytest.mark.parametrize("shape,pp", AVG_CASES, ids=ids(AVG_CASES))
def test_avg_pool_matches_torch(rng, shape, pp):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    d = len(shape) - 2
    x = rng.standard_normal(shape)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[d]
    for opts in AVG_OPTIONS:
        if d == 1 and "divisor_override" in opts:
            continue  # avg_pool1d has none
        q = dict(pp, **opts)
        kw = dict(ceil_mode=q.get("ceil_mode", False),
                  count_include_pad=q.get("count_include_pad", True))
        if "divisor_override" in q:
            kw["divisor_override"] = q["divisor_override"]
        tx = torch.from_numpy(x).requires_grad_()
        ref = fn(tx, q["kernel_size"], q.get("stride"), q.get("pad", 0), **kw)
        out, cache = P.avg_pool_forward(x, q)
        np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-14)
        dout = rng.standard_normal(out.shape)
        ref.backward(torch.from_numpy(dout))
        np.testing.assert_allclose(P.avg_pool_backward(dout, cache), tx.grad.numpy(),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_avg_and_sum_dtypes(xp, rng, dtype):
    shape, pp = AVG_CASES[3]
    x = rng.standard_normal(shape).astype(dtype)
    for fwd, bwd, op in ((P.avg_pool_forward, P.avg_pool_backward, "avg"),
                         (P.sum_pool_forward, P.sum_pool_backward, "sum")):
        out, cache = fwd(xp.asarray(x), pp)
        assert out.dtype == dtype
        tol = {np.float16: 3e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
        ref = ref_avg_pool(x.astype(np.float64), pp, op)
        np.testing.assert_allclose(to_np(out), ref, rtol=tol, atol=tol * (27 if op == "sum" else 1))
        for ddt in (np.float16, np.float32, np.float64):
            assert bwd(xp.asarray(np.ones(out.shape, ddt)), cache).dtype == dtype


def test_avg_divisor_never_counts_ceil_overhang():
    # L = 5, k = 3, s = 2, pad 1, ceil: windows [-1, 2), [1, 4), [3, 6): the last one's
    # position 5 lies beyond the right padding (5 + 1 = 6 positions padded), so its divisor
    # is 3 with count_include_pad (padding 5 counted), 2 without
    x = np.ones((1, 1, 5))
    pp = dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)
    np.testing.assert_allclose(P.avg_pool_forward(x, pp)[0], [[[2 / 3, 1, 2 / 3]]])
    np.testing.assert_allclose(P.avg_pool_forward(x, dict(pp, count_include_pad=False))[0],
                               [[[1, 1, 1]]])
    x = np.ones((1, 1, 6))
    pp = dict(kernel_size=3, stride=2, ceil_mode=True)  # last window [4, 7): overhang only
    np.testing.assert_allclose(P.avg_pool_forward(x, pp)[0], [[[1, 1, 1]]])


# ----------------------------------------------------------------------- unpooling

@pytest.mark.parametrize("shape,pp", [((2, 3, 12), dict(kernel_size=2)),
                                      ((2, 3, 11), dict(kernel_size=3, stride=2, pad=1)),
                                      ((2, 2, 6, 8, 4), dict(kernel_size=2)),
                                      ((2, 2, 7, 9, 8), dict(kernel_size=3, stride=2, pad=1))])
def test_unpool_inverts_pool_every_rank(xp, rng, shape, pp):
    x = tie_free(rng, shape)
    out, cache = P.max_pool_forward(xp.asarray(x), pp)
    idx = P.max_pool_indices(cache)
    for size in (shape[2:], shape):
        up, ucache = P.max_unpool_forward(out, idx, size)
        up = to_np(up)
        assert up.shape == shape
        kept = up != 0
        np.testing.assert_array_equal(up[kept], x[kept])
        # each kept position is one of the pooled maxima
        assert kept.sum() == len(np.unique(to_np(idx).reshape(shape[0] * shape[1], -1)
                                           + np.arange(shape[0] * shape[1])[:, None] * 10**6))
    dout = rng.standard_normal(up.shape)
    dx = P.max_unpool_backward(xp.asarray(dout), ucache)
    assert dx.shape == out.shape
    num = eval_numerical_gradient_array(lambda a: P.max_unpool_forward(a, idx, shape[2:])[0],
                                        out, xp.asarray(dout))
    assert rel_error(dx, num) < 1e-9


def test_unpool_duplicates_last_wins_1d_3d(xp):
    x = xp.asarray(np.array([[[1.0, 2.0, 3.0, 4.0]]]))
    idx = xp.asarray(np.array([[[2, 0, 2, 1]]]))
    out, cache = P.max_unpool_forward(x, idx, (3,))
    np.testing.assert_array_equal(to_np(out), [[[2.0, 4.0, 3.0]]])
    dx = P.max_unpool_backward(xp.asarray(np.array([[[10.0, 20.0, 30.0]]])), cache)
    np.testing.assert_array_equal(to_np(dx), [[[0.0, 10.0, 30.0, 20.0]]])
    x = xp.asarray(np.arange(1.0, 9.0).reshape(1, 1, 2, 2, 2))
    idx = xp.asarray(np.array([0, 7, 7, 3, 0, 1, 7, 2]).reshape(1, 1, 2, 2, 2))
    out, cache = P.max_unpool_forward(x, idx, (1, 1, 2, 2, 2))
    np.testing.assert_array_equal(to_np(out).reshape(-1), [5, 6, 8, 4, 0, 0, 0, 7])
    dx = P.max_unpool_backward(xp.asarray(np.arange(10.0, 18.0).reshape(1, 1, 2, 2, 2)), cache)
    np.testing.assert_array_equal(to_np(dx).reshape(-1), [0, 0, 0, 13, 10, 11, 17, 12])


def test_unpool_errors_name_sizes():
    x = np.ones((1, 2, 3))
    with pytest.raises(ValueError, match=r"indices span \[0, 8\].*8 = 8 positions"):
        P.max_unpool_forward(x, np.array([[[0, 1, 2], [3, 4, 8]]]), (8,))
    with pytest.raises(ValueError, match=r"\(L,\) or \(N, C, L\).*\(1, 2, 3\)"):
        P.max_unpool_forward(x, np.zeros((1, 2, 3), np.int64), (4, 4))
    with pytest.raises(ValueError, match=r"\(D, H, W\) or \(N, C, D, H, W\)"):
        P.max_unpool_forward(np.ones((1, 1, 2, 2, 2)), np.zeros((1, 1, 2, 2, 2), np.int64),
                             (4, 4))
    with pytest.raises(ValueError, match=r"does not match x of shape \(1, 2, 3\)"):
        P.max_unpool_forward(x, np.zeros((1, 2, 3), np.int64), (1, 3, 8))
    with pytest.raises(TypeError, match="ints only"):
        P.max_unpool_forward(x, np.zeros((1, 2, 3), np.int64), (8.0,))
    with pytest.raises(ValueError, match=r"\(N, C, L\), \(N, C, H, W\) or \(N, C, D, H, W\)"):
        P.max_unpool_forward(np.ones((2, 3)), np.zeros((2, 3), np.int64), (4,))
    _, cache = P.max_unpool_forward(x, np.zeros((1, 2, 3), np.int64), (8,))
    with pytest.raises(ValueError, match=r"dout has shape \(1, 2, 7\).*\(1, 2, 8\)"):
        P.max_unpool_backward(np.ones((1, 2, 7)), cache)
    with pytest.raises(TypeError, match="UnpoolCache or UnpoolKernelCache"):
        P.max_unpool_backward(np.ones((1, 2, 8)), P.max_pool_forward(x, dict(kernel_size=1))[1])


# ------------------------------------------------------------------------ contracts

def _all_forwards(x):
    pp = dict(kernel_size=3, stride=2, pad=1)
    yield "max", P.max_pool_forward(x, pp), P.max_pool_backward
    yield "general", P.max_pool_forward_general(x, pp), P.max_pool_backward_general
    yield "avg", P.avg_pool_forward(x, dict(pp, count_include_pad=False)), P.avg_pool_backward
    yield "sum", P.sum_pool_forward(x, pp), P.sum_pool_backward


@pytest.mark.parametrize("shape", [(3, 4, 13), (2, 3, 7, 9, 8)])
def test_non_contiguous_inputs_bitwise(rng, shape):
    base = rng.standard_normal(shape)
    views = [np.asfortranarray(base), np.ascontiguousarray(base[..., ::-1])[..., ::-1],
             np.moveaxis(np.ascontiguousarray(np.moveaxis(base, 0, -1)), -1, 0)]
    wide = np.zeros(shape[:-1] + (2 * shape[-1],))
    wide[..., ::2] = base
    views.append(wide[..., ::2])
    ref = {name: (out, bwd(np.ones_like(out) * 0.5, cache))
           for name, (out, cache), bwd in _all_forwards(base)}
    for v in views:
        assert not v.flags.c_contiguous
        for name, (out, cache), bwd in _all_forwards(v):
            assert np.ascontiguousarray(out).tobytes() == ref[name][0].tobytes(), name
            dx = bwd(np.ones_like(out) * 0.5, cache)
            assert np.ascontiguousarray(dx).tobytes() == ref[name][1].tobytes(), name


@pytest.mark.parametrize("shape", [(2, 3, 13), (2, 3, 7, 9, 8)])
def test_nothing_mutated_deterministic_frozen(xp, rng, shape):
    x = xp.asarray(rng.standard_normal(shape))
    x0 = to_np(x).copy()
    for name, (out, cache), bwd in _all_forwards(x):
        arrays = {k: to_np(v).copy() for k, v in vars(cache).items() if hasattr(v, "shape")
                  and not isinstance(v, np.dtype)}
        dout = xp.asarray(rng.standard_normal(out.shape))
        d0 = to_np(dout).copy()
        a, b = to_np(bwd(dout, cache)), to_np(bwd(dout, cache))
        assert a.tobytes() == b.tobytes(), name
        np.testing.assert_array_equal(to_np(x), x0)
        np.testing.assert_array_equal(to_np(dout), d0)
        for k, v in arrays.items():
            np.testing.assert_array_equal(to_np(getattr(cache, k)), v)
            if xp is np:
                with pytest.raises(ValueError):
                    getattr(cache, k).flat[0] = 1


def test_max_cache_holds_offsets_only(rng):
    for shape, pp, dt in [((2, 3, 20), dict(kernel_size=4), np.uint8),
                          ((1, 2, 8, 8, 8), dict(kernel_size=7, stride=1), np.uint16),
                          ((1, 1, 300), dict(kernel_size=257, stride=1), np.uint16)]:
        for fwd, _ in MAX_PATHS.values():
            _, cache = fwd(rng.standard_normal(shape), pp)
            arrays = [v for v in vars(cache).values() if hasattr(v, "shape")
                      and not isinstance(v, np.dtype)]
            assert len(arrays) == 1 and cache.offsets.dtype == dt


def test_backward_checks_dout_and_cache_type(rng):
    x = rng.standard_normal((2, 3, 5, 6, 7))
    pp = dict(kernel_size=2)
    caches = {name: c for name, (_, c), _ in _all_forwards(x)}
    with pytest.raises(ValueError, match=r"dout has shape \(2, 3, 2, 3, 3\) but the forward "
                                         r"pass produced \(2, 3, 3, 3, 4\).*\(2, 3, 5, 6, 7\)"):
        P.avg_pool_backward(np.ones((2, 3, 2, 3, 3)), caches["avg"])
    with pytest.raises(TypeError, match="AvgPoolCache returned by avg_pool_forward, got "
                                        r"SumPoolCache \(from sum_pool_forward\)"):
        P.avg_pool_backward(np.ones((2, 3, 3, 3, 4)), caches["sum"])
    with pytest.raises(TypeError, match="SumPoolCache.*got AvgPoolCache"):
        P.sum_pool_backward(np.ones((2, 3, 3, 3, 4)), caches["avg"])
    with pytest.raises(TypeError, match="MaxPoolCache.*got SumPoolCache"):
        P.max_pool_backward(np.ones((2, 3, 3, 3, 4)), caches["sum"])
    with pytest.raises(TypeError, match="floating"):
        P.sum_pool_backward(np.ones((2, 3, 3, 3, 4), np.int64), caches["sum"])
    with pytest.raises(TypeError, match="dout must be a NumPy or CuPy array"):
        P.sum_pool_backward([[1.0]], caches["sum"])
    out, cache = P.max_pool_forward(x, pp)
    with pytest.raises(ValueError, match=r"dout has shape"):
        P.max_pool_backward(np.ones((2, 3, 2, 3)), cache)


@pytest.mark.parametrize("shape,pp,match", [
    ((2, 3, 4), dict(kernel_size=5), r"output size is too small.*\(2, 3, 4\).*\(0,\)"),
    ((2, 3, 4, 4, 4), dict(kernel_size=(2, 2)), r"tuple of 3 ints for 3-D pooling"),
    ((2, 3, 4, 4, 4), dict(kernel_size=2, pad=2), r"at most half.*\(2, 3, 4, 4, 4\)"),
    ((2, 3, 4, 4, 4), dict(pool_height=2, pool_width=2), r"2-D window.*3 spatial axes"),
    ((2, 3, 9), dict(kernel_size=2, stride=0), r"stride must be > 0.*\(2, 3, 9\)"),
])
def test_bad_parameters_name_sizes(shape, pp, match):
    for fwd in (P.max_pool_forward, P.max_pool_forward_general, P.avg_pool_forward,
                P.sum_pool_forward):
        with pytest.raises(ValueError, match=match):
            fwd(np.ones(shape), pp)


def test_avg_option_errors():
    x = np.ones((1, 1, 4, 4, 4))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"divisor_override.*positive int.*\(1, 1, 4, 4, 4\)"):
            P.avg_pool_forward(x, dict(kernel_size=2, divisor_override=bad))
    with pytest.raises(ValueError, match="dilation"):
        P.avg_pool_forward(x, dict(kernel_size=2, dilation=2))


def test_kernel_fallback_reason_every_rank():
    from gpulayers.shapes import PoolGeometry, adaptive_geometry
    assert P.kernel_fallback_reason(pool_geometry((2, 3, 8, 8, 8), dict(kernel_size=2))) is None
    huge = PoolGeometry(1, 1, (2**31,), (2,), (2,), (0,), (1,), False, (2**30,))
    assert "2**31" in P.kernel_fallback_reason(huge)
    assert P.kernel_fallback_reason(adaptive_geometry((1, 1, 5), 3)) is None


def test_kernel_dispatch_wiring(monkeypatch, rng):
    """The CuPy kernel branches, run on NumPy with stand-in launchers that check what they
    are given (the 2-D kernels for 1-D and 2-D max pooling, the n-D ones for the rest) and
    answer with the general path: the results must be the NumPy path's."""
    from gpulayers.cuda import pool_kernels, pool_nd_kernels
    from gpulayers.shapes import PoolGeometry, AdaptiveGeometry
    calls = []

    def check(name, arrays, geom, d=None):
        for a in arrays:
            assert isinstance(a, np.ndarray)
        if d is not None:
            assert isinstance(geom, PoolGeometry) and geom.d == d, name
        calls.append(name)

    def fwd2(x, g):
        check("2d fwd", [x], g, 2)
        assert x.shape == g.input_shape
        return P._max_pool_forward_xp(x, g)

    def bwd2(dout, off, g):
        check("2d bwd", [dout, off], g, 2)
        assert dout.shape == off.shape == g.output_shape and off.dtype == g.offset_dtype
        return P._max_pool_backward_xp(dout, off, g)

    def fwd3(x, g):
        check("nd fwd", [x], g, 3)
        assert x.shape == g.input_shape
        return P._max_pool_forward_xp(x, g)

    def bwd3(dout, off, g):
        check("nd bwd", [dout, off], g, 3)
        return P._max_pool_backward_xp(dout, off, g)

    def avg_fwd(x, g, cip, div):
        check("avg fwd", [x], g)
        assert isinstance(cip, bool) and (div is None or isinstance(div, int))
        return P._sum_pool_xp(x, g, P._avg_divisor(g, cip, div)).astype(x.dtype)

    def avg_bwd(dout, g, cip, div):
        check("avg bwd", [dout], g)
        return P._sum_pool_backward_xp(dout, g, P._avg_divisor(g, cip, div))

    def aavg_fwd(x, ag):
        assert isinstance(ag, AdaptiveGeometry)
        calls.append("aavg fwd")
        with monkeypatch.context() as m:
            m.setattr(P, "_use_kernels", lambda xp, geom=None: False)
            return P.adaptive_avg_pool_forward(x, ag.out)[0]

    def aavg_bwd(dout, ag):
        calls.append("aavg bwd")
        with monkeypatch.context() as m:
            m.setattr(P, "_use_kernels", lambda xp, geom=None: False)
            return P.adaptive_avg_pool_backward(dout, P.AdaptiveAvgPoolCache(ag, dout.dtype))

    def amax_fwd(x, ag):
        calls.append("amax fwd")
        return P._adaptive_max_xp(x, ag)

    def amax_bwd(dout, off, ag):
        calls.append("amax bwd")
        assert off.dtype == ag.offset_dtype
        return P._adaptive_max_backward_xp(dout, off, ag)

    def unpool_fwd(x, indices, out_shape, return_winners=False):
        calls.append("unpool fwd")
        assert return_winners
        assert indices.dtype == np.int64 and indices.flags.c_contiguous
        assert indices.shape == x.shape and len(out_shape) == x.ndim
        N, C = x.shape[:2]
        out = np.zeros((N * C, int(np.prod(out_shape[2:]))), x.dtype)
        for p in range(N * C):  # in row-major order: the last duplicate wins
            for i, v in zip(indices.reshape(N * C, -1)[p], x.reshape(N * C, -1)[p]):
                out[p, i] = v
        return out.reshape(out_shape), np.zeros(out.size, np.int64)

    def unpool_bwd(dout, indices, winners, x_shape):
        assert winners.size == dout.size
        calls.append("unpool bwd")
        N, C = x_shape[:2]
        flat = indices.reshape(N * C, -1)
        dx = np.take_along_axis(dout.reshape(N * C, -1), flat, axis=1)
        last = np.zeros_like(flat, dtype=bool)
        for p in range(N * C):
            seen = set()
            for j in range(flat.shape[1] - 1, -1, -1):
                last[p, j] = flat[p, j] not in seen
                seen.add(flat[p, j])
        return np.where(last, dx, 0).reshape(x_shape)

    for mod, name, fn in [(pool_kernels, "max_pool_forward_gpu", fwd2),
                          (pool_kernels, "max_pool_backward_gpu", bwd2),
                          (pool_nd_kernels, "max_pool_forward_gpu", fwd3),
                          (pool_nd_kernels, "max_pool_backward_gpu", bwd3),
                          (pool_nd_kernels, "avg_pool_forward_gpu", avg_fwd),
                          (pool_nd_kernels, "avg_pool_backward_gpu", avg_bwd),
                          (pool_nd_kernels, "adaptive_avg_pool_forward_gpu", aavg_fwd),
                          (pool_nd_kernels, "adaptive_avg_pool_backward_gpu", aavg_bwd),
                          (pool_nd_kernels, "adaptive_max_pool_forward_gpu", amax_fwd),
                          (pool_nd_kernels, "adaptive_max_pool_backward_gpu", amax_bwd),
                          (pool_nd_kernels, "max_unpool_forward_gpu", unpool_fwd),
                          (pool_nd_kernels, "max_unpool_backward_gpu", unpool_bwd)]:
        monkeypatch.setattr(mod, name, fn)

    inputs = [make_input("ties", shape, np.float32, rng)
              for shape in [(2, 3, 11), (2, 3, 7, 9), (2, 2, 7, 9, 8)]]

    def run():
        results = []
        for x in inputs:
            shape = x.shape
            pp = dict(kernel_size=3, stride=2, pad=1)
            out, cache = P.max_pool_forward(x, pp)
            dout = np.linspace(-1, 1, out.size, dtype=np.float32).reshape(out.shape)
            idx = P.max_pool_indices(cache)
            up, ucache = P.max_unpool_forward(out, idx, shape[2:])
            results += [out, cache.offsets, P.max_pool_backward(dout, cache), idx, up,
                        P.max_unpool_backward(np.ones_like(up), ucache)]
            for fwd, bwd, q in ((P.avg_pool_forward, P.avg_pool_backward,
                                 dict(pp, count_include_pad=False)),
                                (P.avg_pool_forward, P.avg_pool_backward,
                                 dict(pp, divisor_override=2)),
                                (P.sum_pool_forward, P.sum_pool_backward, pp)):
                out, cache = fwd(x, q)
                results += [out, bwd(np.ones_like(out), cache)]
            for fwd, bwd in ((P.adaptive_avg_pool_forward, P.adaptive_avg_pool_backward),
                             (P.adaptive_max_pool_forward, P.adaptive_max_pool_backward)):
                out, cache = fwd(x, 3)
                results += [out, bwd(np.ones_like(out), cache)]
                if hasattr(cache, "offsets"):
                    results.append(P.max_pool_indices(cache))
        return results

    ref = run()
    monkeypatch.setattr(P, "_use_kernels", lambda xp, geom=None: True)
    got = run()
    for a, b in zip(ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for name in ("2d fwd", "2d bwd", "nd fwd", "nd bwd", "avg fwd", "avg bwd", "aavg fwd",
                 "aavg bwd", "amax fwd", "amax bwd", "unpool fwd", "unpool bwd"):
        assert name in calls, name
    assert calls.count("2d fwd") == 2 and calls.count("nd fwd") == 1


@pytest.mark.parametrize("shape", [(0, 3, 8), (0, 2, 6, 6), (0, 2, 4, 6, 6)])
def test_empty_batch_every_op(xp, shape):
    x = xp.ones(shape, np.float32)
    pp = dict(kernel_size=3, stride=1, pad=1)
    ops = [(fwd, bwd, pp) for fwd, bwd in MAX_PATHS.values()]
    ops += [(P.avg_pool_forward, P.avg_pool_backward, pp),
            (P.sum_pool_forward, P.sum_pool_backward, pp)]
    ops += [(P.adaptive_avg_pool_forward, P.adaptive_avg_pool_backward, s) for s in (1, 3)]
    ops += [(P.adaptive_max_pool_forward, P.adaptive_max_pool_backward, s) for s in (1, 3, 5)]
    for fwd, bwd, arg in ops:
        out, cache = fwd(x, arg)
        assert out.shape[0] == 0
        assert bwd(xp.ones_like(out), cache).shape == shape
        if hasattr(cache, "offsets"):
            assert P.max_pool_indices(cache).shape == out.shape
    out, cache = P.max_pool_forward(x, dict(kernel_size=2))
    up, ucache = P.max_unpool_forward(out, P.max_pool_indices(cache), shape[2:])
    assert up.shape == shape and P.max_unpool_backward(up, ucache).shape == out.shape
