"""data_format='channels_last' and PyTorch's channels_last memory format for every pooling op.

- channels_last results (out, dx, indices, unpooling) equal the channels_first results on
  the transposed input bit for bit, for every op, rank (1, 2, 3), dtype (float16/32/64,
  bfloat16) and implementation (naive, reshape, general, fast, the blocked paths);
- a channels-first-shaped input with channels-last strides is pooled without a copy of the
  input (tracemalloc) and its outputs and dx keep that memory format;
- max_pool_indices gives PyTorch's numbers in both layouts (against torch where installed,
  always against a NumPy reference);
- bad data_format values are errors naming the value; dout is checked in the forward's layout;
- the CuPy dispatch passes channels_last=True to the n-D launchers (stand-in launchers).
"""
import tracemalloc

import numpy as np
import pytest

import gpulayers.pooling as P
from gpulayers import numpy_fast
from gpulayers.shapes import channels_last_strided, check_data_format

from conftest import make_input

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), BF16]
SHAPES = {1: (2, 3, 13), 2: (2, 3, 9, 8), 3: (2, 3, 5, 6, 7)}
PARAMS = [dict(kernel_size=3, stride=2, pad=1), dict(kernel_size=2),
          dict(kernel_size=3, stride=1, ceil_mode=True)]
MAX_PATHS = {"fast": (P.max_pool_forward, P.max_pool_backward),
             "general": (P.max_pool_forward_general, P.max_pool_backward_general),
             "naive": (P.max_pool_forward_naive, P.max_pool_backward_naive)}


def to_last(a):
    """The channels-last (C-contiguous) copy of a channels-first array."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def memory_format(a):
    """A channels-first-shaped view with channels-last strides (PyTorch's channels_last
    memory format): the transpose of a C-contiguous channels-last copy."""
    return to_last(a).transpose((0, a.ndim - 1) + tuple(range(1, a.ndim - 1)))


def assert_bitwise(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


def cl(pp):
    return dict(pp, data_format="channels_last")


def random_dout(shape, dtype, rng):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------ bitwise layout equality

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_max_pool_channels_last_bitwise(rng, dtype, d, kind):
    x = make_input(kind, SHAPES[d], dtype, rng)
    for pp in PARAMS + [dict(kernel_size=2, stride=1, dilation=2)]:
        for name, (fwd, bwd) in MAX_PATHS.items():
            out, cache = fwd(x, pp)
            out_l, cache_l = fwd(to_last(x), cl(pp))
            assert cache_l.layout == "channels_last"
            assert_bitwise(out_l, to_last(out))
            assert_bitwise(cache_l.offsets, to_last(cache.offsets))
            idx = P.max_pool_indices(cache)
            assert_bitwise(P.max_pool_indices(cache_l), to_last(idx))
            dout = random_dout(out.shape, dtype, rng)
            dx = bwd(dout, cache)
            dx_l = bwd(to_last(dout), cache_l)
            assert dx_l.dtype == dtype
            assert_bitwise(dx_l, to_last(dx))
            # any MaxPoolCache works with any backward, in either layout (the naive one sums
            # overlapping windows in another order: layouts compared per backward)
            for _, other in MAX_PATHS.values():
                assert_bitwise(other(to_last(dout), cache_l), to_last(other(dout, cache)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_max_pool_reshape_channels_last_bitwise(rng, dtype, d):
    x = make_input("ties", (2, 3) + (4,) * d, dtype, rng)
    pp = dict(kernel_size=2)
    out, cache = P.max_pool_forward_reshape(x, pp)
    out_l, cache_l = P.max_pool_forward_reshape(to_last(x), cl(pp))
    assert_bitwise(out_l, to_last(out))
    dout = random_dout(out.shape, dtype, rng)
    assert_bitwise(P.max_pool_backward_reshape(to_last(dout), cache_l),
                   to_last(P.max_pool_backward_reshape(dout, cache)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=str)
@pytest.mark.parametrize("shape", [(5, 16, 21, 20), (3, 8, 40), (3, 4, 6, 9, 10)])
@pytest.mark.parametrize("kind", ["random", "ties", "nan", "-inf", "zeros"])
def test_blocked_channels_last_path_bitwise(monkeypatch, rng, dtype, shape, kind):
    """The channels-last NumPy fast path (the compiled kernels, or the general path
    without them): the general path's bits (first maximum, last NaN, -inf rule, signed
    zeros) and the channels-first fast path's, forward and backward (overlapping
    windows: np.add.at order)."""
    monkeypatch.setenv("GPULAYERS_NUM_THREADS", "2")
    if kind == "zeros":   # +-0.0 ties: the first in window order must be returned
        x = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
        x[rng.random(shape) < 0.05] = -1.0
        x = x.astype(dtype)
    else:
        x = make_input(kind, shape, dtype, rng)
    for pp in PARAMS + [dict(kernel_size=3, stride=2, dilation=2, ceil_mode=True)]:
        out_g, cache_g = P.max_pool_forward_general(to_last(x), cl(pp))
        out_l, cache_l = P.max_pool_forward(to_last(x), cl(pp))
        out, cache = P.max_pool_forward(x, pp)
        assert_bitwise(out_l, out_g)
        assert_bitwise(cache_l.offsets, cache_g.offsets)
        assert_bitwise(out_l, to_last(out))
        dout = (rng.standard_normal(out.shape) * 10.0 ** rng.integers(-4, 5, out.shape))
        dout = dout.astype(dtype)
        dx_l = P.max_pool_backward(to_last(dout), cache_l)
        assert_bitwise(dx_l, P.max_pool_backward_general(to_last(dout), cache_l))
        assert_bitwise(dx_l, to_last(P.max_pool_backward(dout, cache)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("op", ["avg", "avg_exclude", "avg_divisor", "sum"])
def test_avg_sum_pool_channels_last_bitwise(rng, dtype, d, op):
    x = make_input("random", SHAPES[d], dtype, rng)
    fwd, bwd = ((P.sum_pool_forward, P.sum_pool_backward) if op == "sum"
                else (P.avg_pool_forward, P.avg_pool_backward))
    extra = {"avg_exclude": dict(count_include_pad=False),
             "avg_divisor": dict(divisor_override=3)}.get(op, {})
    for pp in PARAMS:
        pp = dict(pp, **extra)
        out, cache = fwd(x, pp)
        out_l, cache_l = fwd(to_last(x), cl(pp))
        assert cache_l.layout == "channels_last"
        assert_bitwise(out_l, to_last(out))
        dout = random_dout(out.shape, dtype, rng)
        dx_l = bwd(to_last(dout), cache_l)
        assert dx_l.dtype == dtype
        assert_bitwise(dx_l, to_last(bwd(dout, cache)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_adaptive_channels_last_bitwise(rng, dtype, d, kind):
    x = make_input(kind, SHAPES[d], dtype, rng)
    for output_size in (1, 2, 3, 4, (None,) * d):
        for fwd, bwd in ((P.adaptive_avg_pool_forward, P.adaptive_avg_pool_backward),
                         (P.adaptive_max_pool_forward, P.adaptive_max_pool_backward)):
            out, cache = fwd(x, output_size)
            out_l, cache_l = fwd(to_last(x), output_size, data_format="channels_last")
            assert_bitwise(out_l, to_last(out))
            if hasattr(cache, "offsets"):
                assert_bitwise(P.max_pool_indices(cache_l), to_last(P.max_pool_indices(cache)))
            dout = random_dout(out.shape, dtype, rng)
            dx_l = bwd(to_last(dout), cache_l)
            assert dx_l.dtype == dtype
            assert_bitwise(dx_l, to_last(bwd(dout, cache)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_unpool_channels_last_bitwise(rng, dtype, d):
    x = make_input("ties", SHAPES[d], dtype, rng)
    for pp in (dict(kernel_size=2), dict(kernel_size=3, stride=1)):   # the second shares targets
        out, cache = P.max_pool_forward(x, pp)
        idx = P.max_pool_indices(cache)
        out_l, cache_l = P.max_pool_forward(to_last(x), cl(pp))
        idx_l = P.max_pool_indices(cache_l)
        for size in (SHAPES[d][2:], None):
            up, ucache = P.max_unpool_forward(out, idx, size or x.shape)
            full = size or to_last(x).shape   # the full shape, in the layout's order
            up_l, ucache_l = P.max_unpool_forward(out_l, idx_l.astype(np.int32), full,
                                                  data_format="channels_last")
            assert ucache_l.layout == "channels_last"
            assert_bitwise(up_l, to_last(up))
            dout = random_dout(up.shape, dtype, rng)
            dx_l = P.max_unpool_backward(to_last(dout), ucache_l)
            assert dx_l.dtype == dtype
            assert_bitwise(dx_l, to_last(P.max_unpool_backward(dout, ucache)))


def test_unpool_channels_last_reference(rng):
    """max_unpool_forward in channels_last against a loop: the last input of a plane in
    row-major order wins a shared target."""
    N, L, C, Lo = 2, 9, 3, 5
    x = rng.standard_normal((N, L, C))
    idx = rng.integers(0, Lo, (N, L, C))
    want = np.zeros((N, Lo, C))
    for n in range(N):
        for c in range(C):
            for i in range(L):
                want[n, idx[n, i, c], c] = x[n, i, c]
    got, _ = P.max_unpool_forward(x, idx, (Lo,), data_format="channels_last")
    assert_bitwise(got, want)


# ------------------------------------------------- PyTorch's channels_last memory format

def _ops(d):
    """(name, forward(x) -> (out, cache), backward) of every op, channels_first default."""
    pp = dict(kernel_size=2)
    ops = [(f"max_{k}", (lambda f: lambda x: f(x, pp))(f), b) for k, (f, b) in MAX_PATHS.items()]
    ops += [("avg", lambda x: P.avg_pool_forward(x, dict(kernel_size=3, stride=2, pad=1)),
             P.avg_pool_backward),
            ("sum", lambda x: P.sum_pool_forward(x, pp), P.sum_pool_backward),
            ("adaptive_avg", lambda x: P.adaptive_avg_pool_forward(x, 3),
             P.adaptive_avg_pool_backward),
            ("adaptive_avg_global", lambda x: P.adaptive_avg_pool_forward(x, 1),
             P.adaptive_avg_pool_backward),
            ("adaptive_max", lambda x: P.adaptive_max_pool_forward(x, 3),
             P.adaptive_max_pool_backward),
            ("adaptive_max_global", lambda x: P.adaptive_max_pool_forward(x, 1),
             P.adaptive_max_pool_backward)]
    return ops


def _cl_strides(a):
    """The strides a C-contiguous channels-last array of a's (channels-first) shape has,
    moved to a's axes (None for axes of size 1, whose stride means nothing)."""
    want = memory_format(np.empty(a.shape, a.dtype)).strides
    return tuple(s if n > 1 else None for s, n in zip(want, a.shape))


def _strides(a):
    return tuple(s if n > 1 else None for s, n in zip(a.strides, a.shape))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=str)
def test_memory_format_results_and_strides(rng, d, dtype):
    """A channels-first-shaped x with channels-last strides: the same values as the
    contiguous x, and out, dx, indices and unpooling keep the channels-last strides."""
    x = make_input("random", (2, 5) + (6,) * d, dtype, rng)
    xs = memory_format(x)
    assert channels_last_strided(xs) and xs.shape == x.shape
    for name, fwd, bwd in _ops(d):
        out, cache = fwd(x)
        out_s, cache_s = fwd(xs)
        assert cache_s.layout == "channels_last_strided", name
        assert_bitwise(out_s, out)
        assert _strides(out_s) == _cl_strides(out_s), name
        dout = random_dout(out.shape, dtype, rng)
        dx_s = bwd(memory_format(dout), cache_s)
        assert_bitwise(dx_s, bwd(dout, cache))
        assert _strides(dx_s) == _cl_strides(dx_s), name
        assert_bitwise(bwd(dout, cache_s), dx_s)   # a contiguous dout works too
        if hasattr(cache_s, "offsets"):
            idx_s = P.max_pool_indices(cache_s)
            assert_bitwise(idx_s, P.max_pool_indices(cache))
            assert _strides(idx_s) == _cl_strides(idx_s)
    out_s, cache_s = P.max_pool_forward(xs, dict(kernel_size=2))
    idx_s = P.max_pool_indices(cache_s)
    up_s, ucache_s = P.max_unpool_forward(out_s, idx_s, x.shape[2:])
    out, cache = P.max_pool_forward(x, dict(kernel_size=2))
    up, ucache = P.max_unpool_forward(out, P.max_pool_indices(cache), x.shape[2:])
    assert ucache_s.layout == "channels_last_strided"
    assert_bitwise(up_s, up)
    assert _strides(up_s) == _cl_strides(up_s)
    dx_s = P.max_unpool_backward(memory_format(up), ucache_s)
    assert_bitwise(dx_s, P.max_unpool_backward(up, ucache))
    assert _strides(dx_s) == _cl_strides(dx_s)


def _peak_during(fn):
    """Peak bytes traced by tracemalloc while fn() runs (NumPy reports its data buffers)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak - before


@pytest.mark.parametrize("d,shape", [(1, (8, 64, 4096)), (2, (8, 64, 64, 64)),
                                     (3, (4, 32, 16, 32, 32))])
def test_memory_format_forward_makes_no_copy_of_x(rng, d, shape):
    """What is measured: the peak of the bytes NumPy allocates (tracemalloc) during each
    forward pass of an x (float32, 8 MiB) in the channels_last memory format, for windows
    with stride 2 on every axis (4 for 1-D max and sum pooling; outputs at most half of x,
    the separable passes' intermediates at most 1/2 + 1/4 + 1/8 of x, the blocked path's
    per-thread buffers a few MiB). It stays below x's size, so no copy of x (in any layout)
    is made: a transposed copy of x alone would reach x's size (checked below).""" 
    x = memory_format(rng.standard_normal(shape).astype(np.float32))
    pp = dict(kernel_size=4 if d == 1 else 2)   # 1-D: out and the blocks' buffers < x/2
    for name, fwd in [("max", lambda: P.max_pool_forward(x, pp)),
                      ("max_general", lambda: P.max_pool_forward_general(x, pp)),
                      ("avg", lambda: P.avg_pool_forward(x, dict(kernel_size=3, stride=2,
                                                                 pad=1))),
                      ("sum", lambda: P.sum_pool_forward(x, pp)),
                      ("adaptive_avg", lambda: P.adaptive_avg_pool_forward(
                          x, tuple(n // pp["kernel_size"] for n in shape[2:]))),
                      ("adaptive_avg_global", lambda: P.adaptive_avg_pool_forward(x, 1)),
                      ("adaptive_max", lambda: P.adaptive_max_pool_forward(
                          x, tuple(n // pp["kernel_size"] for n in shape[2:]))),
                      ("adaptive_max_global", lambda: P.adaptive_max_pool_forward(x, 1))]:
        fwd()   # warm caches (geometry, thread pool)
        (out, cache), peak = _peak_during(fwd)
        assert cache.layout == "channels_last_strided"
        assert peak < x.nbytes, (name, peak, x.nbytes)
    # the measurement sees a copy: a transposed copy of x is x's size
    _, peak = _peak_during(lambda: np.ascontiguousarray(x))
    assert peak >= x.nbytes


# ----------------------------------------------------------------- indices vs PyTorch

def _indices_reference(x, pp):
    """Flat argmax indices of max pooling by a loop over windows (first maximum), NumPy."""
    N, C = x.shape[:2]
    size = x.shape[2:]
    d = len(size)
    k = (pp["kernel_size"],) * d
    s = (pp.get("stride", pp["kernel_size"]),) * d
    p = (pp.get("pad", 0),) * d
    out_sizes = [(n + 2 * pp_ - kk) // ss + 1 for n, kk, ss, pp_ in zip(size, k, s, p)]
    idx = np.zeros((N, C) + tuple(out_sizes), np.int64)
    for o in np.ndindex(*out_sizes):
        best = np.full((N, C), -np.inf)
        arg = np.zeros((N, C), np.int64)
        for t in np.ndindex(*k):
            pos = [o[a] * s[a] - p[a] + t[a] for a in range(d)]
            if any(q < 0 or q >= n for q, n in zip(pos, size)):
                continue
            v = x[(Ellipsis,) + tuple(pos)]
            take = v > best
            best = np.where(take, v, best)
            arg = np.where(take, np.ravel_multi_index(pos, size), arg)
        idx[(Ellipsis,) + o] = arg
    return idx


@pytest.mark.parametrize("d", [1, 2, 3])
def test_indices_both_layouts_reference_and_torch(rng, d):
    x = rng.permutation(np.prod(SHAPES[d])).reshape(SHAPES[d]).astype(np.float64)  # no ties
    pp = dict(kernel_size=3, stride=2, pad=1)
    want = _indices_reference(x, pp)
    _, cache = P.max_pool_forward(x, pp)
    _, cache_l = P.max_pool_forward(to_last(x), cl(pp))
    _, cache_s = P.max_pool_forward(memory_format(x), pp)
    assert_bitwise(P.max_pool_indices(cache), want)
    assert_bitwise(P.max_pool_indices(cache_l), to_last(want))
    assert_bitwise(P.max_pool_indices(cache_s), want)
    try:
        import torch
    except ImportError:
        return
    pool = getattr(torch.nn.functional, f"max_pool{d}d")
    tx = torch.from_numpy(x)
    if d > 1:
        tx = tx.contiguous(memory_format=torch.channels_last if d == 2
                           else torch.channels_last_3d)
    _, ti = pool(tx, 3, 2, 1, return_indices=True)
    assert_bitwise(P.max_pool_indices(cache_s), ti.contiguous().numpy())
    assert_bitwise(P.max_pool_indices(cache_l), to_last(ti.contiguous().numpy()))
    adaptive = getattr(torch.nn.functional, f"adaptive_max_pool{d}d")
    _, ti = adaptive(torch.from_numpy(x), 3, return_indices=True)
    _, ac = P.adaptive_max_pool_forward(to_last(x), 3, data_format="channels_last")
    assert_bitwise(P.max_pool_indices(ac), to_last(ti.numpy()))


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", ["NHWC", "channels-last", "", None, 1, True, "CHANNELS_LAST"])
def test_bad_data_format_names_the_value(rng, bad):
    x = rng.standard_normal((2, 3, 6, 6))
    for fwd in (P.max_pool_forward, P.max_pool_forward_naive, P.max_pool_forward_general,
                P.avg_pool_forward, P.sum_pool_forward):
        with pytest.raises(ValueError, match="data_format") as err:
            fwd(x, dict(kernel_size=2, data_format=bad))
        assert repr(bad) in str(err.value)
    for call in (lambda: P.adaptive_avg_pool_forward(x, 2, data_format=bad),
                 lambda: P.adaptive_max_pool_forward(x, 2, data_format=bad),
                 lambda: P.max_unpool_forward(x, np.zeros(x.shape, np.int64), (6, 6),
                                              data_format=bad)):
        with pytest.raises(ValueError, match="data_format") as err:
            call()
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="NHWC"):
        check_data_format("NHWC")


def test_data_format_is_a_key_of_every_op_and_not_geometry(rng):
    x = rng.standard_normal((2, 3, 8, 8))
    for fwd in (P.max_pool_forward, P.avg_pool_forward, P.sum_pool_forward):
        a, _ = fwd(x, dict(kernel_size=2))
        b, _ = fwd(x, dict(kernel_size=2, data_format="channels_first"))
        assert_bitwise(a, b)


def test_backward_checks_dout_in_the_forward_layout(rng):
    x = rng.standard_normal((2, 3, 8, 6))
    out_l, cache_l = P.max_pool_forward(to_last(x), cl(dict(kernel_size=2)))
    assert out_l.shape == (2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\).*channels_last"):
        P.max_pool_backward(np.ones((2, 3, 4, 3)), cache_l)
    _, acache = P.adaptive_avg_pool_forward(to_last(x), 2, data_format="channels_last")
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 3\)"):
        P.adaptive_avg_pool_backward(np.ones((2, 3, 2, 2)), acache)
    up, ucache = P.max_unpool_forward(out_l, P.max_pool_indices(cache_l), (8, 6),
                                      data_format="channels_last")
    assert up.shape == (2, 8, 6, 3)
    with pytest.raises(ValueError, match="dout has shape"):
        P.max_unpool_backward(np.ones((2, 3, 8, 6)), ucache)


def test_channels_last_rank_errors(rng):
    for shape in [(2, 3), (2, 3, 4, 5, 6, 7)]:
        x = rng.standard_normal(shape)
        with pytest.raises(ValueError, match="channels_last"):
            P.max_pool_forward(x, dict(kernel_size=1, data_format="channels_last"))
        with pytest.raises(ValueError, match="channels_last"):
            P.adaptive_avg_pool_forward(x, 1, data_format="channels_last")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_dtypes_every_op_channels_last(rng, dtype):
    """dx in the forward input's dtype, whatever dout's dtype, in channels_last."""
    x = to_last(make_input("random", (2, 3, 6, 6), dtype, rng))
    pp = cl(dict(kernel_size=2))
    ops = [(f, b, pp) for f, b in MAX_PATHS.values()]
    ops += [(P.avg_pool_forward, P.avg_pool_backward, pp),
            (P.sum_pool_forward, P.sum_pool_backward, pp)]
    for fwd, bwd, q in ops:
        out, cache = fwd(x, q)
        assert out.dtype == dtype
        for ddt in (np.float64, np.float32):
            assert bwd(np.ones(out.shape, ddt), cache).dtype == dtype
    for fwd, bwd in ((P.adaptive_avg_pool_forward, P.adaptive_avg_pool_backward),
                     (P.adaptive_max_pool_forward, P.adaptive_max_pool_backward)):
        out, cache = fwd(x, 3, data_format="channels_last")
        assert out.dtype == dtype
        assert bwd(np.ones(out.shape, np.float64), cache).dtype == dtype


# ------------------------------------------------------------- CuPy dispatch (stand-ins)

def test_kernel_dispatch_channels_last(monkeypatch, rng):
    """The CuPy kernel branches for channels-last input, run on NumPy with stand-in
    launchers: every op calls the n-D launchers (2-D max pooling too) with
    channels_last=True and channels-last arrays (unpooling's out_shape / x_shape stay
    channels-first, as the launchers take them); channels-first input never passes the
    keyword. Results equal the NumPy path's."""
    from gpulayers.cuda import pool_kernels, pool_nd_kernels
    calls = []

    def note(name, kw, *arrays):
        cl_ = kw.get("channels_last", False)
        calls.append((name, cl_))
        for a in arrays:
            assert isinstance(a, np.ndarray)
        return cl_

    def fwd(x, g, **kw):
        cl_ = note("max fwd", kw, x)
        assert x.shape == (P._internal_shape(g.input_shape, cl_))
        return P._max_pool_forward_xp(x, g, cl_)

    def bwd(dout, off, g, **kw):
        cl_ = note("max bwd", kw, dout, off)
        assert dout.shape == off.shape == P._internal_shape(g.output_shape, cl_)
        return P._max_pool_backward_xp(dout, off, g, cl_)

    def fwd2(x, g):
        calls.append(("2d fwd", False))
        return P._max_pool_forward_xp(x, g)

    def bwd2(dout, off, g):
        calls.append(("2d bwd", False))
        return P._max_pool_backward_xp(dout, off, g)

    def avg_fwd(x, g, cip, div, **kw):
        cl_ = note("avg fwd", kw, x)
        return P._sum_pool_xp(x, g, P._avg_divisor(g, cip, div), cl_).astype(x.dtype)

    def avg_bwd(dout, g, cip, div, **kw):
        cl_ = note("avg bwd", kw, dout)
        return P._sum_pool_backward_xp(dout, g, P._avg_divisor(g, cip, div), cl_)

    def aavg_fwd(x, ag, **kw):
        cl_ = note("aavg fwd", kw, x)
        with monkeypatch.context() as m:
            m.setattr(P, "_use_kernels", lambda xp, geom=None: False)
            return P._adaptive_avg_forward(x, ag, cl_)

    def aavg_bwd(dout, ag, **kw):
        cl_ = note("aavg bwd", kw, dout)
        with monkeypatch.context() as m:
            m.setattr(P, "_use_kernels", lambda xp, geom=None: False)
            return P._adaptive_avg_backward(dout, ag, cl_)

    def amax_fwd(x, ag, **kw):
        return P._adaptive_max_xp(x, ag, note("amax fwd", kw, x))

    def amax_bwd(dout, off, ag, **kw):
        return P._adaptive_max_backward_xp(dout, off, ag, note("amax bwd", kw, dout, off))

    def unpool_fwd(x, indices, out_shape, return_winners=False, **kw):
        cl_ = note("unpool fwd", kw, x, indices)
        assert return_winners and indices.dtype == np.int64 and indices.flags.c_contiguous
        assert indices.shape == x.shape and len(out_shape) == x.ndim
        xf = np.moveaxis(x, -1, 1) if cl_ else x
        inf = np.moveaxis(indices, -1, 1) if cl_ else indices
        N, C = xf.shape[:2]
        assert tuple(out_shape[:2]) == (N, C)   # out_shape channels-first in either layout
        shape_cf = tuple(out_shape)
        out = np.zeros((N * C, int(np.prod(shape_cf[2:]))), x.dtype)
        for p in range(N * C):
            for i, v in zip(inf.reshape(N * C, -1)[p], xf.reshape(N * C, -1)[p]):
                out[p, i] = v
        out = out.reshape(shape_cf)
        return (np.ascontiguousarray(np.moveaxis(out, 1, -1)) if cl_ else out), np.zeros(1)

    def unpool_bwd(dout, indices, winners, x_shape, **kw):
        cl_ = note("unpool bwd", kw, dout, indices)
        # x_shape channels-first in either layout
        assert tuple(np.moveaxis(indices, -1, 1).shape if cl_ else indices.shape) == tuple(x_shape)
        df = np.moveaxis(dout, -1, 1) if cl_ else dout
        inf = np.moveaxis(indices, -1, 1) if cl_ else indices
        N, C = df.shape[:2]
        flat = inf.reshape(N * C, -1)
        dx = np.take_along_axis(df.reshape(N * C, -1), flat, axis=1)
        last = np.zeros_like(flat, dtype=bool)
        for p in range(N * C):
            seen = set()
            for j in range(flat.shape[1] - 1, -1, -1):
                last[p, j] = flat[p, j] not in seen
                seen.add(flat[p, j])
        dx = np.where(last, dx, 0).reshape(inf.shape)
        return np.ascontiguousarray(np.moveaxis(dx, 1, -1)) if cl_ else dx

    for mod, name, fn in [(pool_kernels, "max_pool_forward_gpu", fwd2),
                          (pool_kernels, "max_pool_backward_gpu", bwd2),
                          (pool_nd_kernels, "max_pool_forward_gpu", fwd),
                          (pool_nd_kernels, "max_pool_backward_gpu", bwd),
                          (pool_nd_kernels, "avg_pool_forward_gpu", avg_fwd),
                          (pool_nd_kernels, "avg_pool_backward_gpu", avg_bwd),
                          (pool_nd_kernels, "adaptive_avg_pool_forward_gpu", aavg_fwd),
                          (pool_nd_kernels, "adaptive_avg_pool_backward_gpu", aavg_bwd),
                          (pool_nd_kernels, "adaptive_max_pool_forward_gpu", amax_fwd),
                          (pool_nd_kernels, "adaptive_max_pool_backward_gpu", amax_bwd),
                          (pool_nd_kernels, "max_unpool_forward_gpu", unpool_fwd),
                          (pool_nd_kernels, "max_unpool_backward_gpu", unpool_bwd)]:
        monkeypatch.setattr(mod, name, fn)

    inputs = [make_input("ties", s, np.float32, rng) for s in SHAPES.values()]

    def run(layout):
        results = []
        for x in inputs:
            xin = {"first": x, "last": to_last(x), "strided": memory_format(x)}[layout]
            fmt = {"data_format": "channels_last"} if layout == "last" else {}
            pp = dict(kernel_size=3, stride=2, pad=1, **fmt)
            out, cache = P.max_pool_forward(xin, pp)
            idx = P.max_pool_indices(cache)
            up, ucache = P.max_unpool_forward(out, idx, x.shape[2:], **fmt)
            results += [out, P.max_pool_backward(np.ones_like(out), cache), idx, up,
                        P.max_unpool_backward(np.ones_like(up), ucache)]
            for f, b, q in ((P.avg_pool_forward, P.avg_pool_backward,
                             dict(pp, count_include_pad=False)),
                            (P.sum_pool_forward, P.sum_pool_backward, pp)):
                out, cache = f(xin, q)
                results += [out, b(np.ones_like(out), cache)]
            for f, b in ((P.adaptive_avg_pool_forward, P.adaptive_avg_pool_backward),
                         (P.adaptive_max_pool_forward, P.adaptive_max_pool_backward)):
                out, cache = f(xin, 3, **fmt)
                results += [out, b(np.ones_like(out), cache)]
        if layout == "last":
            results = [np.moveaxis(r, -1, 1) for r in results]
        return [np.ascontiguousarray(r) for r in results]

    ref = run("first")
    monkeypatch.setattr(P, "_use_kernels", lambda xp, geom=None: True)
    for layout in ("first", "last", "strided"):
        calls.clear()
        got = run(layout)
        for a, b in zip(ref, got):
            assert_bitwise(b, a)
        names = {n for n, _ in calls}
        if layout == "first":
            assert all(not c for _, c in calls)
            assert "2d fwd" in names
        else:
            assert all(c for _, c in calls), calls
            assert "2d fwd" not in names and "2d bwd" not in names
            assert {"max fwd", "max bwd", "avg fwd", "avg bwd", "aavg fwd", "aavg bwd",
                    "amax fwd", "amax bwd", "unpool fwd", "unpool bwd"} <= names
