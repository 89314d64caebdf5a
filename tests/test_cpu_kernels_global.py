"""gpulayers.cpu_kernels.global_pool: the plane sums behind global average pooling on
NumPy. Both layouts must give the same bits, and the sums must match a float64
reference; the public op must keep both properties with the kernels on and off."""
import numpy as np
import pytest

from gpulayers import cpu_kernels, pooling

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(),
                                reason=f"CPU kernels unusable: {cpu_kernels.unusable_reason()}")

from gpulayers.cpu_kernels import global_pool  # noqa: E402  (numba imported lazily anyway)

SHAPES = [(2, 3, 7, 7), (1, 1, 1, 1), (3, 5, 1, 1), (2, 4, 3), (2, 3, 2, 3, 5), (1, 2048, 7, 7),
          (4, global_pool.CHANNELS + 3, 3, 5), (2, 2 * global_pool.CHANNELS, 2, 2),
          (3, 2, 9, 8), (2, 3, 16, 16), (1, 6, 33)]


def _cl(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts_bitwise_and_reference(shape, dtype):
    rng = np.random.default_rng(hash(shape) % 2**32)
    x = (rng.standard_normal(shape) * 10 + rng.standard_normal() * 100).astype(dtype)
    N, C = shape[:2]
    P = int(np.prod(shape[2:]))
    cf = global_pool.plane_sums(x, N, C, P, False)
    cl = global_pool.plane_sums(_cl(x), N, C, P, True)
    assert cf.dtype == np.float64 and cf.shape == (N, C)
    assert np.array_equal(cf, cl)
    ref = x.astype(np.float64).reshape(N, C, P).sum(axis=2)
    scale = np.abs(x.astype(np.float64)).reshape(N, C, P).sum(axis=2)
    assert np.all(np.abs(cf - ref) <= 1e-13 * scale + 1e-300)


def test_lane_order_is_the_documented_one():
    """Position p goes to lane p % 8, lanes add in order, then meet pairwise
    ((0+1)+(2+3))+...: a brute-force emulation in Python floats must agree bitwise."""
    rng = np.random.default_rng(7)
    P = 8 * 5 + 3
    x = (rng.standard_normal((3, 4, P)) * np.exp(rng.uniform(-20, 20, (3, 4, P)))).astype(
        np.float64)
    got = global_pool.plane_sums(x, 3, 4, P, False)
    want = np.empty((3, 4))
    for n in range(3):
        for c in range(4):
            lanes = [0.0] * 8
            for p in range(P):
                lanes[p % 8] += x[n, c, p]
            while len(lanes) > 1:
                lanes = [lanes[2 * j] + lanes[2 * j + 1] for j in range(len(lanes) // 2)]
            want[n, c] = lanes[0]
    assert global_pool.LANES == 8
    assert np.array_equal(got, want)
    assert np.array_equal(global_pool.plane_sums(_cl(x), 3, 4, P, True), want)


def test_nan_and_inf_rules_match_in_both_layouts():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 2, 2] = np.inf
    x[1, 2, 0, 0], x[1, 2, 4, 4] = np.inf, -np.inf
    x[1, 3, 3, 3] = -np.inf
    cf = global_pool.plane_sums(x, 2, 4, 25, False)
    cl = global_pool.plane_sums(_cl(x), 2, 4, 25, True)
    np.testing.assert_array_equal(cf, cl)   # NaN positions equal too
    assert np.isnan(cf[0, 0]) and cf[0, 1] == np.inf and np.isnan(cf[1, 2])
    assert cf[1, 3] == -np.inf and np.isfinite(cf[0, 2])


def test_independent_of_thread_count():
    numba = cpu_kernels.numba_module()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 300, 6, 6)).astype(np.float32)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = [global_pool.plane_sums(x, 5, 300, 36, False),
               global_pool.plane_sums(_cl(x), 5, 300, 36, True)]
        numba.set_num_threads(old)
        many = [global_pool.plane_sums(x, 5, 300, 36, False),
                global_pool.plane_sums(_cl(x), 5, 300, 36, True)]
    finally:
        numba.set_num_threads(old)
    for a, b in zip(one, many):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("enabled", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (2, 5, 9), (1, 4, 3, 2, 5)], ids=str)
def test_public_op_layouts_bitwise(enabled, dtype, shape):
    import ml_dtypes
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape).astype(dt)
    x_copy = x.copy()
    old = cpu_kernels.set_enabled(enabled)
    try:
        out, _ = pooling.adaptive_avg_pool_forward(x, 1)
        out_cl, _ = pooling.adaptive_avg_pool_forward(_cl(x), 1, data_format="channels_last")
        # PyTorch's channels_last memory format: channels-first shape, channels-last strides
        out_mf, _ = pooling.adaptive_avg_pool_forward(np.moveaxis(_cl(x), -1, 1), 1)
    finally:
        cpu_kernels.set_enabled(old)
    assert out.dtype == dt and out.shape == shape[:2] + (1,) * (len(shape) - 2)
    assert np.array_equal(out.reshape(shape[:2]).view(np.uint8),
                          np.ascontiguousarray(out_cl.reshape(shape[:2])).view(np.uint8))
    assert np.array_equal(np.ascontiguousarray(out_mf).reshape(shape[:2]).view(np.uint8),
                          out.reshape(shape[:2]).view(np.uint8))
    ref = x.astype(np.float64).reshape(shape[:2] + (-1,)).mean(axis=2)
    tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6, "float64": 1e-14}[dtype]
    np.testing.assert_allclose(out.astype(np.float64).reshape(shape[:2]), ref, rtol=tol,
                               atol=tol)
    assert np.array_equal(x.view(np.uint8), x_copy.view(np.uint8))


def _emulated(x):
    """The documented order in Python floats: x (R, P) -> (R,) float64."""
    out = np.empty(x.shape[0])
    for r, row in enumerate(x.astype(np.float64)):
        lanes = [0.0] * 8
        for p, v in enumerate(row):
            lanes[p % 8] += float(v)
        while len(lanes) > 1:
            lanes = [lanes[2 * j] + lanes[2 * j + 1] for j in range(len(lanes) // 2)]
        out[r] = lanes[0]
    return out


@pytest.mark.parametrize("R", [1, 7, global_pool.ROWS, global_pool.ROWS + 1,
                               2 * global_pool.ROWS + 3])
@pytest.mark.parametrize("P", [1, 7, 8, 9, 43])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_paths_follow_the_order(R, P, dtype):
    # the channels-first vector intrinsic (ROWS rows a call, a masked tail of P % 8) and
    # its scalar remainder rows, and the channels-last blocks (a masked channel tail): every
    # sum is the emulated order's bits
    rng = np.random.default_rng(R * 100 + P)
    x = (rng.standard_normal((1, R, P)) * np.exp(rng.uniform(-15, 15, (1, R, P)))).astype(dtype)
    want = _emulated(x[0])
    assert np.array_equal(global_pool.plane_sums(x, 1, R, P, False)[0], want)
    assert np.array_equal(global_pool.plane_sums(_cl(x), 1, R, P, True)[0], want)


@pytest.mark.parametrize("P", [15, 16])
def test_signed_zero_planes(P):
    # the lanes start at +0.0, so a plane of -0.0 sums to +0.0 (as the emulated order),
    # whatever the masked loads put in the lanes they leave out
    R = 2 * global_pool.ROWS + 1
    x = np.full((1, R, P), -0.0, np.float32)
    x[0, 1::2, P // 2] = 0.0
    for s in (global_pool.plane_sums(x, 1, R, P, False)[0],
              global_pool.plane_sums(_cl(x), 1, R, P, True)[0]):
        assert np.array_equal(s, _emulated(x[0])) and not np.signbit(s).any()
