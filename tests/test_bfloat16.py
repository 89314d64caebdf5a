"""bfloat16 (ml_dtypes.bfloat16) in every pooling op, rank and layout, on NumPy.

Max pooling returns exactly an input element (the float64 run's on the same values, its
indices too); sums and averages accumulate in float32 and round once to bfloat16 (within
a bfloat16 rounding of the float64 reference); outputs and dx are bfloat16.
"""
import numpy as np
import pytest

import gpulayers.pooling as P
from gpulayers.shapes import acc_dtype, check_floating, is_floating

from conftest import make_input

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = {1: (2, 3, 13), 2: (2, 3, 9, 8), 3: (2, 3, 5, 6, 7)}
LAYOUTS = ["channels_first", "channels_last"]
EPS = 2.0 ** -8     # bfloat16's relative rounding error bound (8 significand bits)


def layout(a, fmt):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if fmt == "channels_last" else a


def close_bf16(got, want, terms=1):
    """got (bfloat16) within one bfloat16 rounding of the float64 ``want`` (plus float32
    accumulation error over ``terms`` terms)."""
    assert got.dtype == BF16
    g = got.astype(np.float64)
    tol = EPS * np.abs(want) + terms * 2.0 ** -23 * np.abs(want) + 1e-30
    assert np.all(np.abs(g - want) <= tol + EPS * 1e-3), np.max(np.abs(g - want) - tol)


def test_dtype_helpers():
    assert is_floating(BF16) and is_floating(np.float16) and not is_floating(np.int8)
    assert acc_dtype(BF16) == np.float32 and acc_dtype(np.float16) == np.float32
    assert acc_dtype(np.float64) == np.float64
    check_floating(np.zeros(2, BF16))
    with pytest.raises(TypeError, match="bfloat16"):
        check_floating(np.zeros(2, np.int32))
    with pytest.raises(TypeError, match="bfloat16"):
        P.max_pool_forward(np.zeros((1, 1, 4), ml_dtypes.float8_e4m3fn), dict(kernel_size=2))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_max_pool_bfloat16_exact(rng, d, fmt, kind):
    x = make_input(kind, SHAPES[d], BF16, rng)
    x64 = x.astype(np.float64)
    for pp in (dict(kernel_size=3, stride=2, pad=1), dict(kernel_size=2, dilation=2)):
        q = dict(pp, data_format=fmt)
        for fwd, bwd in ((P.max_pool_forward, P.max_pool_backward),
                         (P.max_pool_forward_general, P.max_pool_backward_general),
                         (P.max_pool_forward_naive, P.max_pool_backward_naive)):
            out, cache = fwd(layout(x, fmt), q)
            ref, rcache = P.max_pool_forward_general(x64, pp)
            assert out.dtype == BF16
            # exactly the float64 run's element (the same values): bits of x itself
            np.testing.assert_array_equal(out.astype(np.float64), layout(ref, fmt))
            np.testing.assert_array_equal(P.max_pool_indices(cache),
                                          layout(P.max_pool_indices(rcache), fmt))
            dout = rng.standard_normal(ref.shape).astype(BF16)
            dx = bwd(layout(dout, fmt), cache)
            want = P.max_pool_backward_general(dout.astype(np.float64), rcache)
            close_bf16(dx, layout(want, fmt), terms=9)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("op", ["avg", "avg_exclude", "sum"])
def test_avg_sum_pool_bfloat16_vs_float64(rng, d, fmt, op):
    x = make_input("random", SHAPES[d], BF16, rng)
    x64 = x.astype(np.float64)
    fwd, bwd = ((P.sum_pool_forward, P.sum_pool_backward) if op == "sum"
                else (P.avg_pool_forward, P.avg_pool_backward))
    pp = dict(kernel_size=3, stride=2, pad=1)
    if op == "avg_exclude":
        pp["count_include_pad"] = False
    out, cache = fwd(layout(x, fmt), dict(pp, data_format=fmt))
    ref, rcache = fwd(x64, pp)
    # a sum of terms of either sign: compare against the sum of magnitudes' rounding
    mag, _ = fwd(np.abs(x64), pp)
    assert out.dtype == BF16
    err = np.abs(out.astype(np.float64) - layout(ref, fmt))
    assert np.all(err <= EPS * np.abs(layout(ref, fmt)) + 2.0 ** -20 * layout(mag, fmt))
    dout = rng.standard_normal(ref.shape).astype(BF16)
    dx = bwd(layout(dout, fmt), cache)
    want = bwd(dout.astype(np.float64), rcache)
    wmag = bwd(np.abs(dout.astype(np.float64)), rcache)
    assert dx.dtype == BF16
    err = np.abs(dx.astype(np.float64) - layout(want, fmt))
    assert np.all(err <= EPS * np.abs(layout(want, fmt)) + 2.0 ** -20 * layout(wmag, fmt))


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_sums_accumulate_in_float32(fmt):
    """300 ones: a bfloat16 running sum stalls at 256 (257 rounds back to 256); float32
    accumulation gives 300, which bfloat16 holds exactly."""
    x = np.ones((1, 2, 300), BF16)
    pp = dict(kernel_size=300, data_format=fmt)
    out, cache = P.sum_pool_forward(layout(x, fmt), pp)
    assert out.dtype == BF16 and np.all(out.astype(np.float64) == 300.0)
    out, _ = P.avg_pool_forward(layout(x, fmt), dict(pp, divisor_override=1))
    assert np.all(out.astype(np.float64) == 300.0)
    # max-pool backward with overlapping windows: 300 windows send 1 to one element
    x = np.zeros((1, 2, 599), BF16)
    x[..., 299] = 1
    out, cache = P.max_pool_forward(layout(x, fmt), dict(kernel_size=300, stride=1,
                                                         data_format=fmt))
    dx = P.max_pool_backward(np.ones(out.shape, BF16), cache)
    assert dx.dtype == BF16
    assert float(layout(dx, fmt)[0, 0, 299].astype(np.float64)) == 300.0


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_adaptive_bfloat16(rng, d, fmt):
    x = make_input("ties", SHAPES[d], BF16, rng)
    x64 = x.astype(np.float64)
    for output_size in (1, 3, 4):
        out, cache = P.adaptive_max_pool_forward(layout(x, fmt), output_size, data_format=fmt)
        ref, rcache = P.adaptive_max_pool_forward(x64, output_size)
        assert out.dtype == BF16
        np.testing.assert_array_equal(out.astype(np.float64), layout(ref, fmt))
        np.testing.assert_array_equal(P.max_pool_indices(cache),
                                      layout(P.max_pool_indices(rcache), fmt))
        dout = rng.standard_normal(ref.shape).astype(BF16)
        close_bf16(P.adaptive_max_pool_backward(layout(dout, fmt), cache),
                   layout(P.adaptive_max_pool_backward(dout.astype(np.float64), rcache), fmt),
                   terms=8)
        out, cache = P.adaptive_avg_pool_forward(layout(x, fmt), output_size, data_format=fmt)
        ref, rcache = P.adaptive_avg_pool_forward(x64, output_size)
        mag, _ = P.adaptive_avg_pool_forward(np.abs(x64), output_size)
        assert out.dtype == BF16
        err = np.abs(out.astype(np.float64) - layout(ref, fmt))
        assert np.all(err <= EPS * np.abs(layout(ref, fmt)) + 2.0 ** -20 * layout(mag, fmt))
        dx = P.adaptive_avg_pool_backward(layout(dout, fmt), cache)
        assert dx.dtype == BF16
        want = P.adaptive_avg_pool_backward(dout.astype(np.float64), rcache)
        wmag = P.adaptive_avg_pool_backward(np.abs(dout.astype(np.float64)), rcache)
        err = np.abs(dx.astype(np.float64) - layout(want, fmt))
        assert np.all(err <= EPS * np.abs(layout(want, fmt)) + 2.0 ** -20 * layout(wmag, fmt))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_unpool_bfloat16_exact(rng, d, fmt):
    x = make_input("random", SHAPES[d], BF16, rng)
    out, cache = P.max_pool_forward(layout(x, fmt), dict(kernel_size=2, data_format=fmt))
    idx = P.max_pool_indices(cache)
    up, ucache = P.max_unpool_forward(out, idx, SHAPES[d][2:], data_format=fmt)
    assert up.dtype == BF16
    ref, rc = P.max_pool_forward(x.astype(np.float64), dict(kernel_size=2))
    rup, _ = P.max_unpool_forward(ref, P.max_pool_indices(rc), SHAPES[d][2:])
    np.testing.assert_array_equal(up.astype(np.float64), layout(rup, fmt))
    dx = P.max_unpool_backward(np.ones(up.shape, np.float32), ucache)
    assert dx.dtype == BF16 and np.all(dx.astype(np.float64) == 1.0)


def test_bfloat16_dout_of_another_dtype(rng):
    """dx in the forward input's dtype (bfloat16) whatever dout's dtype; a float32 forward
    given a bfloat16 dout returns float32."""
    x = make_input("random", (2, 3, 6, 6), BF16, rng)
    out, cache = P.avg_pool_forward(x, dict(kernel_size=2))
    assert P.avg_pool_backward(np.ones(out.shape, np.float64), cache).dtype == BF16
    out, cache = P.max_pool_forward(x.astype(np.float32), dict(kernel_size=2))
    assert P.max_pool_backward(np.ones(out.shape, BF16), cache).dtype == np.float32
