"""The pooling CPU loop kernels (gpulayers.cpu_kernels.pool) against the general xp paths.

Max pooling bit for bit (values, signed zeros, NaN payloads and offsets) on random, tied,
NaN and -inf data; max backward bit for bit with ties and dout over many magnitudes;
average and sum pooling bit for bit against the general path's separable sums (and close
to a float64 reference); every rank, both layouts and PyTorch's channels_last memory
format; float16 and bfloat16 max-pool forwards over all 65536 bit patterns.
"""
import subprocess
import sys

import numpy as np
import pytest

import gpulayers as G
from gpulayers import cpu_kernels, pooling as P
from gpulayers.cpu_kernels import pool as K

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(),
                                reason=f"CPU kernels off: {cpu_kernels.unusable_reason()}")

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:   # pragma: no cover - ml_dtypes ships with the test extra
    BF16 = None

# (shape, pool_param): every rank; overlapping and disjoint windows, padding, dilation,
# ceil_mode, a window as large as the input, N = 1 and C = 1
MAX_CASES = [
    ((3, 5, 13, 12), dict(kernel_size=3, stride=2, pad=1)),
    ((2, 4, 9, 10), dict(kernel_size=3, stride=1, pad=1)),
    ((2, 3, 12, 10), dict(kernel_size=2, stride=2)),
    ((2, 3, 9, 10), dict(kernel_size=(2, 3), stride=(2, 3))),
    ((2, 3, 8, 9), dict(kernel_size=(3, 2), stride=(1, 2), pad=(1, 0), ceil_mode=True)),
    ((2, 2, 9, 9), dict(kernel_size=2, stride=1, dilation=2)),
    ((2, 3, 11, 7), dict(kernel_size=3, stride=2, dilation=(2, 1), pad=1)),
    ((2, 2, 10, 11), dict(kernel_size=2, stride=3, dilation=2, ceil_mode=True)),
    ((1, 1, 12, 4), dict(kernel_size=(5, 1), stride=(2, 1), pad=(2, 0))),
    ((1, 3, 6, 7), dict(kernel_size=(6, 7))),
    ((3, 4, 37), dict(kernel_size=3, stride=2)),
    ((2, 3, 20), dict(kernel_size=4, stride=3, pad=2, dilation=2, ceil_mode=True)),
    ((2, 3, 5, 9, 8), dict(kernel_size=3, stride=2, pad=1)),
    ((1, 2, 6, 7, 5), dict(kernel_size=(2, 3, 2), stride=(1, 2, 2), dilation=(2, 1, 1),
                           ceil_mode=True)),
]
AVG_CASES = [
    ((3, 5, 13, 12), dict(kernel_size=3, stride=2, pad=1)),
    ((2, 3, 12, 10), dict(kernel_size=2, stride=2)),
    ((2, 3, 8, 9), dict(kernel_size=(3, 2), stride=(1, 2), pad=(1, 0), ceil_mode=True)),
    ((1, 1, 6, 7), dict(kernel_size=(6, 7))),
    ((2, 3, 7, 9), dict(kernel_size=(1, 3), stride=(2, 2), pad=(0, 1))),
    ((2, 3, 5, 9), dict(kernel_size=(1, 2), stride=1)),
    ((3, 4, 37), dict(kernel_size=3, stride=2, pad=1)),
    ((2, 3, 5, 9, 8), dict(kernel_size=3, stride=2, pad=1)),
    ((1, 2, 6, 7, 5), dict(kernel_size=(2, 3, 2), stride=(1, 2, 2), pad=(1, 0, 1),
                           ceil_mode=True)),
    ((2, 2, 5, 4, 6), dict(kernel_size=(3, 1, 2), stride=(2, 1, 3), pad=(1, 0, 1))),
]
AVG_OPTIONS = [{}, dict(count_include_pad=False), dict(divisor_override=3)]


def ids(cases):
    return [f"{len(s) - 2}d-{'x'.join(map(str, s))}-{i}" for i, (s, _) in enumerate(cases)]


def make(kind, shape, dtype, rng):
    """'random', 'ties' (small integers and signed zeros), 'nan' (NaN of several payloads,
    +-inf) or '-inf' (mostly -inf) data in ``dtype``."""
    x = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)
    if kind == "ties":
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
        x[rng.random(shape) < 0.2] = -0.0
    elif kind == "nan":
        x[rng.random(shape) < 0.15] = np.nan
        x[rng.random(shape) < 0.1] = np.inf
        x[rng.random(shape) < 0.15] = -np.inf
    elif kind == "-inf":
        x[rng.random(shape) < 0.8] = -np.inf
    x = x.astype(dtype)
    if kind == "nan" and x.dtype.itemsize == 4:   # NaNs of other payloads and signs
        bits = x.view(np.uint32)
        nan = np.isnan(x)
        bits[nan] |= rng.integers(0, 1 << 22, size=int(nan.sum()), dtype=np.uint32)
        bits[nan & (rng.random(shape) < 0.5)] |= np.uint32(1 << 31)
    return x


def bits(a):
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return np.ascontiguousarray(a).view(width)


def assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(bits(got), bits(want))


class kernels_off:
    """Context: the CPU kernels turned off (every NumPy call then takes the general path)."""

    def __enter__(self):
        self.old = cpu_kernels.set_enabled(False)

    def __exit__(self, *exc):
        cpu_kernels.set_enabled(self.old)


def layouts(x, pp):
    """(label, x, pool_param, to_cf): channels_first; data_format='channels_last' on the
    channels-last copy; the default data_format on PyTorch's channels_last memory format
    (a channels-first-shaped view of that copy). to_cf maps a result back to (N, C, ...)."""
    cl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    yield "channels_first", x, pp, lambda a: a
    yield "channels_last", cl, dict(pp, data_format="channels_last"), \
        lambda a: np.moveaxis(a, -1, 1)
    yield "strided", np.moveaxis(cl, -1, 1), pp, lambda a: a


DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])


# ------------------------------------------------------------------------- max pooling

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,pp", MAX_CASES, ids=ids(MAX_CASES))
def test_max_pool_bitwise_equal_general(rng, shape, pp, dtype):
    for kind in ("random", "ties", "nan", "-inf"):
        x0 = make(kind, shape, dtype, rng)
        ref_out, ref_cache = G.max_pool_forward_general(x0, pp)
        dout0 = (rng.standard_normal(ref_out.shape)
                 * 10.0 ** rng.integers(-4, 5, ref_out.shape)).astype(dtype)
        dout0.flat[::7] = -0.0
        ref_dx = G.max_pool_backward_general(dout0, ref_cache)
        for label, x, p, to_cf in layouts(x0, pp):
            keep = x.copy()
            out, cache = G.max_pool_forward(x, p)
            assert_same(to_cf(out), ref_out)
            offsets = np.asarray(cache.offsets)   # internal layout: channels-last unless cf
            if cache.layout != "channels_first":
                offsets = np.moveaxis(offsets, -1, 1)
            np.testing.assert_array_equal(offsets, ref_cache.offsets)
            dout = np.ascontiguousarray(np.moveaxis(dout0, 1, -1)) if label == "channels_last" \
                else (np.moveaxis(np.ascontiguousarray(np.moveaxis(dout0, 1, -1)), -1, 1)
                      if label == "strided" else dout0)
            dkeep = dout.copy()
            dx = G.max_pool_backward(dout, cache)
            assert_same(to_cf(dx), ref_dx)
            assert_same(x, keep)          # inputs untouched
            assert_same(dout, dkeep)


@pytest.mark.parametrize("cl", [False, True], ids=["channels_first", "channels_last"])
def test_max_pool_kernels_direct_equal_general(rng, cl):
    """The launchers on internal arrays against the general path, both layouts."""
    pp = dict(kernel_size=3, stride=2, pad=1)
    for shape in [(2, 3, 11, 9), (2, 3, 4, 11, 9), (2, 3, 33)]:
        x = make("ties", shape, np.float32, rng)
        geom = P._check_x(x, pp, "max")[0]
        xi = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if cl else x
        out, off = K.max_pool_forward(xi, geom, cl)
        ref_out, ref_off = P._max_pool_forward_xp(xi, geom, cl)
        assert_same(out, ref_out)
        np.testing.assert_array_equal(off, ref_off)
        assert off.dtype == geom.offset_dtype
        dout = make("random", out.shape, np.float32, rng)
        assert_same(K.max_pool_backward(dout, off, geom, cl),
                    P._max_pool_backward_xp(dout, off, geom, cl))


def test_max_pool_large_window_offsets(rng):
    # a window of more than 256 taps: uint16 offsets
    x = make("ties", (2, 2, 7, 7, 7), np.float32, rng)
    pp = dict(kernel_size=7, stride=1, pad=3)
    out, cache = G.max_pool_forward(x, pp)
    ref_out, ref_cache = G.max_pool_forward_general(x, pp)
    assert cache.offsets.dtype == np.uint16
    assert_same(out, ref_out)
    np.testing.assert_array_equal(cache.offsets, ref_cache.offsets)
    dout = make("random", out.shape, np.float32, rng)
    assert_same(G.max_pool_backward(dout, cache), G.max_pool_backward_general(dout, ref_cache))


def test_max_pool_first_max_last_nan_signed_zero():
    # hand-made windows: ties keep the first, NaN the last, -0.0 before +0.0 keeps -0.0
    x = np.array([[[[1, 3, 3, 0], [-0.0, 0.0, 0.0, -0.0],
                    [np.nan, 1, -np.inf, -np.inf], [2, np.nan, -np.inf, -np.inf]]]], np.float32)
    x.view(np.uint32)[0, 0, 3, 1] |= 5   # a second NaN payload
    out, cache = G.max_pool_forward(x, dict(kernel_size=2, stride=2))
    np.testing.assert_array_equal(cache.offsets[0, 0], [[1, 0], [3, 0]])
    assert np.signbit(out[0, 0, 0, 0]) == np.False_ and out[0, 0, 0, 0] == 3
    assert out.view(np.uint32)[0, 0, 1, 0] == x.view(np.uint32)[0, 0, 3, 1]   # the last NaN
    assert out[0, 0, 1, 1] == -np.inf and cache.offsets[0, 0, 1, 1] == 0
    y, c2 = G.max_pool_forward(x[:, :, 1:2, :], dict(kernel_size=(1, 2), stride=(1, 2)))
    assert np.signbit(y[0, 0, 0, 0]) and not np.signbit(y[0, 0, 0, 1])   # first zero wins


@pytest.mark.parametrize("dtype", [np.float16] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: np.dtype(d).name)
def test_max_pool_16bit_every_bit_pattern(dtype):
    """Every pattern against every one of a set of partners, in both orders, and in windows
    of three (random order): the kernels' table-of-float32 comparison gives the general
    path's bits and offsets (NaN of every payload, signed zeros, infinities, subnormals)."""
    allp = np.arange(1 << 16, dtype=np.uint16)
    partners = [0x0000, 0x8000, 0x0001, 0x8001, 0x3C00, 0xBC00, 0x3F80, 0xBF80,
                0x7C00, 0xFC00, 0x7F80, 0xFF80, 0x7E00, 0xFE00, 0x7C01, 0x7FC1, 0xFFFF, 0x7FFF]
    rows = []
    for p in partners:
        rows += [np.stack([allp, np.full_like(allp, p)]), np.stack([np.full_like(allp, p), allp])]
    rng = np.random.default_rng(0)
    for _ in range(4):
        rows.append(rng.permutation(allp).reshape(2, -1)[:, :1 << 15].repeat(2, axis=1))
    x = np.stack(rows)[None].view(dtype)          # (1, R, 2, 65536)
    for pp in (dict(kernel_size=(2, 1), stride=1), dict(kernel_size=(2, 3), stride=(1, 2),
                                                       pad=(0, 1))):
        for xin, p, to_cf in [(x, pp, lambda a: a),
                              (np.ascontiguousarray(np.moveaxis(x, 1, -1)),
                               dict(pp, data_format="channels_last"),
                               lambda a: np.moveaxis(a, -1, 1))]:
            out, cache = G.max_pool_forward(xin, p)
            ref_out, ref_cache = G.max_pool_forward_general(x, pp)
            assert_same(to_cf(out), ref_out)
            np.testing.assert_array_equal(to_cf(cache.offsets), ref_cache.offsets)


def test_max_pool_backward_non_finite_dout(rng):
    pp = dict(kernel_size=3, stride=2, pad=1)
    x = rng.integers(0, 3, size=(2, 3, 11, 11)).astype(np.float32)
    out, cache = G.max_pool_forward(x, pp)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dout.flat[rng.choice(dout.size, 20, replace=False)] = [np.nan, np.inf, -np.inf, 3e38] * 5
    with np.errstate(over="ignore", invalid="ignore"):
        assert_same(G.max_pool_backward(dout, cache), G.max_pool_backward_general(dout, cache))


def test_other_memory_orders_equal_general(rng):
    """Fortran order, negative strides and a strided slice (copied to C order first) give
    the general path's bits, for max, avg and sum pooling, forward and backward."""
    pp = dict(kernel_size=3, stride=2, pad=1)
    x = make("ties", (2, 3, 9, 10), np.float32, rng)
    wide = np.zeros(x.shape[:3] + (2 * x.shape[3],), x.dtype)
    wide[..., ::2] = x
    flipped = np.ascontiguousarray(x[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
    for xin in (np.asfortranarray(x), flipped, wide[..., ::2]):
        out, cache = G.max_pool_forward(xin, pp)
        ref, ref_cache = G.max_pool_forward_general(x, pp)
        assert_same(out, ref)
        d = make("random", out.shape, np.float32, rng)
        assert_same(G.max_pool_backward(np.asfortranarray(d), cache),
                    G.max_pool_backward_general(d, ref_cache))
        for fwd, bwd in ((G.avg_pool_forward, G.avg_pool_backward),
                         (G.sum_pool_forward, G.sum_pool_backward)):
            out, cache = fwd(xin, pp)
            dx = bwd(d[:, :, ::-1][:, :, ::-1], cache)
            with kernels_off():
                ref, ref_cache = fwd(x, pp)
                ref_dx = bwd(d, ref_cache)
            assert_same(out, ref)
            assert_same(dx, ref_dx)


# ------------------------------------------------------------------- avg / sum pooling

def _avg64(x, pp, opts):
    """float64 reference: torch's avg_pool rules, one window at a time (channels-first)."""
    geom = P._check_x(x, pp, "avg")[0]
    div = P._avg_divisor(geom, opts.get("count_include_pad", True), opts.get("divisor_override"))
    x64 = x.astype(np.float64)
    out = np.zeros(geom.output_shape)
    for o in np.ndindex(*geom.out):
        sl = tuple(slice(max(0, oi * s - p), max(0, min(n, oi * s - p + k)))
                   for oi, s, p, k, n in zip(o, geom.stride, geom.pad, geom.kernel, geom.size))
        out[(Ellipsis,) + o] = x64[(Ellipsis,) + sl].sum(axis=tuple(range(2, x.ndim))) / div[o]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("opts", AVG_OPTIONS, ids=["default", "no-pad-count", "override"])
@pytest.mark.parametrize("shape,pp", AVG_CASES, ids=ids(AVG_CASES))
def test_avg_sum_pool_bitwise_equal_general(rng, shape, pp, opts, dtype):
    x0 = make("random", shape, dtype, rng)
    x0.flat[::5] = -0.0
    x0[0, 0] = -0.0        # windows of -0.0 alone: their sums start at +0 (the general path)
    p0 = dict(pp, **opts)
    with kernels_off():
        ref_out, ref_cache = G.avg_pool_forward(x0, p0)
        dout0 = make("random", ref_out.shape, dtype, rng)
        ref_dx = G.avg_pool_backward(dout0, ref_cache)
        ref_sum, ref_scache = G.sum_pool_forward(x0, pp)
        ref_sdx = G.sum_pool_backward(dout0, ref_scache)
    want, scale = _avg64(x0, p0, opts), _avg64(np.abs(x0), p0, opts)
    eps = 2.0 ** -7 if x0.dtype.itemsize == 2 else np.finfo(x0.dtype).eps
    tiny = 2.0 ** -24 if x0.dtype.itemsize == 2 else 1e-300   # float16's subnormal spacing
    assert np.all(np.abs(ref_out.astype(np.float64) - want) <= 4 * eps * scale + tiny)
    for label, x, p, to_cf in layouts(x0, p0):
        dout = np.ascontiguousarray(np.moveaxis(dout0, 1, -1)) if label == "channels_last" \
            else (np.moveaxis(np.ascontiguousarray(np.moveaxis(dout0, 1, -1)), -1, 1)
                  if label == "strided" else dout0)
        keep, dkeep = x.copy(), dout.copy()
        out, cache = G.avg_pool_forward(x, p)
        assert_same(to_cf(out), ref_out)
        assert_same(to_cf(G.avg_pool_backward(dout, cache)), ref_dx)
        sp = {k: v for k, v in p.items() if k not in opts}
        s, scache = G.sum_pool_forward(x, sp)
        assert_same(to_cf(s), ref_sum)
        assert_same(to_cf(G.sum_pool_backward(dout, scache)), ref_sdx)
        assert_same(x, keep)
        assert_same(dout, dkeep)


def test_sum_pool_backward_is_the_adjoint(rng):
    # <sum_pool(x), d> == <x, sum_pool_backward(d)> in float64
    for shape, pp in AVG_CASES:
        x = rng.standard_normal(shape)
        s, cache = G.sum_pool_forward(x, pp)
        d = rng.standard_normal(s.shape)
        np.testing.assert_allclose(np.vdot(s, d), np.vdot(x, G.sum_pool_backward(d, cache)),
                                   rtol=1e-12)


# ------------------------------------------------------- threads, repeatability, switches

@pytest.mark.parametrize("op", ["max", "avg"])
def test_thread_count_and_repeatability(rng, monkeypatch, op):
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(K, "PARALLEL_MIN", 0)         # the parallel path at this size
    x = make("ties", (3, 7, 17, 15), np.float32, rng)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    pp = dict(kernel_size=3, stride=2, pad=1)
    fwd = G.max_pool_forward if op == "max" else G.avg_pool_forward
    bwd = G.max_pool_backward if op == "max" else G.avg_pool_backward
    results = []
    old = numba.get_num_threads()
    try:
        for threads in ("1", "2", "2"):
            monkeypatch.setenv("GPULAYERS_NUM_THREADS", threads)
            got = []
            for xin, p in ((x, pp), (xl, dict(pp, data_format="channels_last"))):
                out, cache = fwd(xin, p)
                got += [out, bwd(np.ones_like(out) * np.float32(0.1), cache)]
            results.append(got)
    finally:
        numba.set_num_threads(old)
    for later in results[1:]:
        for a, b in zip(later, results[0]):
            assert_same(a, b)


def test_kernels_off_gives_the_general_path(rng):
    x = make("nan", (2, 3, 9, 8), np.float32, rng)
    pp = dict(kernel_size=3, stride=2, pad=1)
    on = G.max_pool_forward(x, pp)
    with kernels_off():
        assert not P._cpu_kernels_take(x.dtype)
        off = G.max_pool_forward(x, pp)
    assert_same(on[0], off[0])
    np.testing.assert_array_equal(on[1].offsets, off[1].offsets)


def test_read_only_inputs(rng):
    x = make("random", (2, 3, 9, 8), np.float64, rng)
    x.flags.writeable = False
    for fwd, bwd in ((G.max_pool_forward, G.max_pool_backward),
                     (G.avg_pool_forward, G.avg_pool_backward)):
        out, cache = fwd(x, dict(kernel_size=2))
        d = np.ones_like(out)
        d.flags.writeable = False
        assert bwd(d, cache).shape == x.shape


def test_import_does_not_import_numba():
    code = ("import sys, numpy as np, gpulayers as G; assert 'numba' not in sys.modules; "
            "G.max_pool_forward(np.ones((1, 1, 4, 4), np.float32), dict(kernel_size=2)); "
            "assert 'numba' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
