"""The pooling kernels over 1, 2 and 3 spatial axes (pool_nd.cu) on a GPU, against the loop
references of tests/test_cuda_shim_pool_nd.py on NumPy and, for 2-D max pooling, the
general xp path on CuPy and NumPy.

Results must agree bit for bit, NaN-aware (the GPU's NaN bits may differ from the CPU's):
the references compute in the kernels' accumulation dtype and order, and CUDA's float
division and addition round as IEEE does. Outputs are allocated poisoned (0xA5 bytes), so
an element a kernel skips fails; inputs come contiguous, strided, transposed and as
contiguous views at an odd element offset (no kernel needs more than element alignment);
backward passes run twice and must repeat bitwise; launch checks are on, so a fault is
raised at the launch that caused it, naming the kernel.
"""
import numpy as np
import pytest

from gpulayers import backend
from gpulayers.cuda import compile as cuda_compile
from gpulayers.cuda import pool_nd_kernels as nk
from gpulayers.pooling import _max_pool_forward_xp
from gpulayers.shapes import adaptive_geometry, pool_geometry

import test_cuda_shim_pool_nd as ref  # the loop references and cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cupy" not in backend.available_backends(),
                       reason=f"CuPy not usable: {backend.cupy_unusable_reason()}"),
]

DTYPES = (np.float16, np.float32, np.float64)
LAYOUTS = ("contiguous", "strided", "transposed", "misaligned")
KINDS = ("random", "ties", "nan", "inf", "zeros")


@pytest.fixture
def cp():
    return backend.backend_module("cupy")


@pytest.fixture(autouse=True)
def checked_launches():
    previous = cuda_compile.set_launch_checks(True)
    yield
    cuda_compile.set_launch_checks(previous)


@pytest.fixture
def poisoned(cp, monkeypatch):
    """cupy.empty returns arrays filled with 0xA5 bytes while the test runs."""
    real_empty = cp.empty

    def empty(shape, dtype=float, order="C"):
        a = real_empty(shape, dtype=dtype, order=order)
        if a.nbytes:
            a.data.memset_async(0xA5, a.nbytes)
        return a

    monkeypatch.setattr(cp, "empty", empty)


def on_device(cp, a, layout):
    """NumPy ``a`` on the GPU, contiguous, strided, transposed (a view with the same values)
    or a contiguous view one element past an allocation."""
    if layout == "strided":
        base = cp.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        base[..., ::2] = cp.asarray(a)
        return base[..., ::2]
    if layout == "transposed":
        return cp.asarray(np.ascontiguousarray(a.swapaxes(-1, -2))).swapaxes(-1, -2)
    if layout == "misaligned":
        base = cp.empty(a.size + 1, dtype=a.dtype)
        view = base[1:].reshape(a.shape)
        view[...] = cp.asarray(a)
        return view
    return cp.asarray(a)


def same(a, b, what):
    """NaN-aware bitwise equality of a (GPU) and b (NumPy)."""
    ref.assert_same(backend.to_numpy(a), np.asarray(b), what)


def cases(table, layouts=LAYOUTS):
    return [pytest.param(name, dtype, layout, id=f"{name}-{np.dtype(dtype).name}-{layout}")
            for name in table for dtype in DTYPES for layout in layouts]


@pytest.mark.parametrize("name, dtype, layout", cases(ref.MAX_CASES))
def test_max_pool(cp, poisoned, rng, name, dtype, layout):
    size, pool_param = ref.MAX_CASES[name]
    geom = pool_geometry((2, 3) + size, pool_param)
    windows = ref.pool_taps(geom)
    for kind in KINDS:
        x = ref.data(kind, geom.input_shape, dtype, rng)
        dout = rng.standard_normal(geom.output_shape).astype(dtype)
        ref_out, ref_off = ref.ref_max_forward(x, windows, geom.output_shape,
                                               geom.offset_dtype)
        ref_dx = ref.ref_max_backward(dout, ref_off, windows, geom.input_shape, "taps")
        x_gpu, dout_gpu = on_device(cp, x, layout), on_device(cp, dout, layout)
        where = f"{name}, {kind}, {np.dtype(dtype)}, {layout}"
        out, off = nk.max_pool_forward_gpu(x_gpu, geom)
        same(off, ref_off, f"offsets: {where}")
        same(out, ref_out, f"out: {where}")
        if geom.d == 2:
            xp_out, xp_off = _max_pool_forward_xp(cp.ascontiguousarray(x_gpu), geom)
            assert cp.array_equal(off, xp_off), f"offsets vs xp on CuPy: {where}"
            same(out, backend.to_numpy(xp_out), f"out vs xp on CuPy: {where}")
        dx = nk.max_pool_backward_gpu(dout_gpu, off, geom)
        same(dx, ref_dx, f"dx: {where}")
        same(nk.max_pool_backward_gpu(dout_gpu, off, geom), backend.to_numpy(dx),
             f"dx repeated: {where}")
        same(x_gpu, x, f"x was modified: {where}")
        same(dout_gpu, dout, f"dout was modified: {where}")


@pytest.mark.parametrize("options", ref.AVG_OPTIONS, ids=lambda o: f"cip{int(o[0])}-div{o[1]}")
@pytest.mark.parametrize("name, dtype, layout", cases(ref.AVG_CASES, ("strided", "misaligned")))
def test_avg_pool(cp, poisoned, rng, name, dtype, layout, options):
    size, pool_param = ref.AVG_CASES[name]
    geom = pool_geometry((2, 3) + size, pool_param, op="avg")
    windows = ref.pool_taps(geom)
    divisor = ref.avg_divisors(geom, *options)
    for kind in KINDS:
        x = ref.data(kind, geom.input_shape, dtype, rng)
        dout = rng.standard_normal(geom.output_shape).astype(dtype)
        where = f"{name}, {options}, {kind}, {np.dtype(dtype)}, {layout}"
        x_gpu, dout_gpu = on_device(cp, x, layout), on_device(cp, dout, layout)
        same(nk.avg_pool_forward_gpu(x_gpu, geom, *options),
             ref.ref_avg_forward(x, windows, geom.output_shape, divisor), f"out: {where}")
        dx = nk.avg_pool_backward_gpu(dout_gpu, geom, *options)
        same(dx, ref.ref_avg_backward(dout, windows, geom.input_shape, divisor, "taps"),
             f"dx: {where}")
        same(nk.avg_pool_backward_gpu(dout_gpu, geom, *options), backend.to_numpy(dx),
             f"dx repeated: {where}")


@pytest.mark.parametrize("name, dtype, layout", cases(ref.ADAPTIVE_CASES, ("strided",
                                                                          "misaligned")))
def test_adaptive_pool(cp, poisoned, rng, name, dtype, layout):
    size, output_size = ref.ADAPTIVE_CASES[name]
    ageom = adaptive_geometry((2, 3) + size, output_size)
    windows = ref.adaptive_taps(ageom)
    count = {o: len(taps) for o, taps in windows}
    for kind in KINDS:
        x = ref.data(kind, ageom.input_shape, dtype, rng)
        dout = rng.standard_normal(ageom.output_shape).astype(dtype)
        ref_out, ref_off = ref.ref_max_forward(x, windows, ageom.output_shape,
                                               ageom.offset_dtype)
        where = f"{name}, {kind}, {np.dtype(dtype)}, {layout}"
        x_gpu, dout_gpu = on_device(cp, x, layout), on_device(cp, dout, layout)
        out, off = nk.adaptive_max_pool_forward_gpu(x_gpu, ageom)
        same(off, ref_off, f"offsets: {where}")
        same(out, ref_out, f"max out: {where}")
        dx = nk.adaptive_max_pool_backward_gpu(dout_gpu, off, ageom)
        same(dx, ref.ref_max_backward(dout, ref_off, windows, ageom.input_shape, "windows"),
             f"max dx: {where}")
        same(nk.adaptive_max_pool_backward_gpu(dout_gpu, off, ageom), backend.to_numpy(dx),
             f"max dx repeated: {where}")
        same(nk.adaptive_avg_pool_forward_gpu(x_gpu, ageom),
             ref.ref_avg_forward(x, windows, ageom.output_shape, count), f"avg out: {where}")
        dx = nk.adaptive_avg_pool_backward_gpu(dout_gpu, ageom)
        same(dx, ref.ref_avg_backward(dout, windows, ageom.input_shape, count, "windows"),
             f"avg dx: {where}")
        same(nk.adaptive_avg_pool_backward_gpu(dout_gpu, ageom), backend.to_numpy(dx),
             f"avg dx repeated: {where}")


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32, np.uint8], ids=ref.DTYPE_IDS)
@pytest.mark.parametrize("name, dtype, layout", cases(ref.UNPOOL_CASES, ("strided",
                                                                        "misaligned")))
def test_max_unpool(cp, poisoned, rng, name, dtype, layout, index_dtype):
    size, out_size = ref.UNPOOL_CASES[name]
    x_shape, out_shape = (2, 3) + size, (2, 3) + out_size
    for kind in ("random", "nan", "zeros"):
        x = ref.data(kind, x_shape, dtype, rng)
        indices = rng.integers(0, int(np.prod(out_size)), size=x_shape).astype(index_dtype)
        dout = rng.standard_normal(out_shape).astype(dtype)
        ref_out, won = ref.ref_unpool(x, indices, out_shape)
        where = f"{name}, {kind}, {np.dtype(dtype)}, {np.dtype(index_dtype)}, {layout}"
        idx_gpu = on_device(cp, indices, layout)
        out, winners = nk.max_unpool_forward_gpu(on_device(cp, x, layout), idx_gpu, out_shape,
                                                 return_winners=True)
        same(out, ref_out, f"out: {where}")
        dx = nk.max_unpool_backward_gpu(on_device(cp, dout, layout), idx_gpu, winners, x_shape)
        same(dx, ref.ref_unpool_backward(dout, indices, won), f"dx: {where}")


# Shapes where threads visit many planes and positions (grid-stride loops on a real grid).
LARGE = {
    "max3d": ((16, 32, 12, 28, 28), dict(kernel_size=3, stride=2, pad=1)),
    "max1d": ((64, 64, 1000), dict(kernel_size=4, stride=3, pad=2, dilation=2,
                                   ceil_mode=True)),
    "avg3d": ((8, 32, 10, 30, 30), dict(kernel_size=(2, 3, 3), stride=2, pad=1,
                                        ceil_mode=True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=ref.DTYPE_IDS)
@pytest.mark.parametrize("name", LARGE)
def test_large_shapes_and_64bit_instantiations(cp, poisoned, rng, monkeypatch, name, dtype):
    """Large shapes against the references (vectorised over N*C), and the long long kernels,
    forced, against the int ones."""
    shape, pool_param = LARGE[name]
    op = name[:3]
    geom = pool_geometry(shape, pool_param, op=op)
    windows = ref.pool_taps(geom)
    x = ref.data("ties", shape, dtype, rng)
    dout = rng.standard_normal(geom.output_shape).astype(dtype)
    x_gpu, dout_gpu = cp.asarray(x), cp.asarray(dout)

    def run():
        if op == "max":
            out, off = nk.max_pool_forward_gpu(x_gpu, geom)
            return out, off, nk.max_pool_backward_gpu(dout_gpu, off, geom)
        return (nk.avg_pool_forward_gpu(x_gpu, geom, False, None), None,
                nk.avg_pool_backward_gpu(dout_gpu, geom, False, None))
    out, off, dx = run()
    if op == "max":
        ref_out, ref_off = ref.ref_max_forward(x, windows, geom.output_shape, geom.offset_dtype)
        same(off, ref_off, "offsets")
        ref_dx = ref.ref_max_backward(dout, ref_off, windows, geom.input_shape, "taps")
    else:
        divisor = ref.avg_divisors(geom, False, None)
        ref_out = ref.ref_avg_forward(x, windows, geom.output_shape, divisor)
        ref_dx = ref.ref_avg_backward(dout, windows, geom.input_shape, divisor, "taps")
    same(out, ref_out, "out")
    same(dx, ref_dx, "dx")
    monkeypatch.setattr(nk, "index_type", lambda *shapes: "long long")
    nk._pool_plan.cache_clear()
    try:
        out64, off64, dx64 = run()
    finally:
        nk._pool_plan.cache_clear()
    same(out64, backend.to_numpy(out), "out, long long indices")
    same(dx64, backend.to_numpy(dx), "dx, long long indices")
    if off is not None:
        assert cp.array_equal(off64, off)


def test_a_tensor_of_2_31_elements(cp):
    """x of 2**31 + 16 float16 elements (4 GiB): the long long kernels on a real one, max
    pooling forward and backward."""
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < 32 * 2**30:
        pytest.skip(f"needs 32 GiB of free device memory, has {free / 2**30:.1f}")
    n = 2**30 + 8
    x = cp.random.standard_normal((2, 1, n), dtype=cp.float32).astype(cp.float16)
    geom = pool_geometry(x.shape, dict(kernel_size=2, stride=2))
    assert nk.index_type(geom.input_shape, geom.output_shape) == "long long"
    out, off = nk.max_pool_forward_gpu(x, geom)
    pairs = x.reshape(2, 1, -1, 2)
    assert cp.array_equal(out, pairs.max(axis=-1))
    assert cp.array_equal(off, (pairs[..., 1] > pairs[..., 0]).astype(cp.uint8))
    dx = nk.max_pool_backward_gpu(out, off, geom)
    del pairs
    hit = off.repeat(2, axis=-1) == cp.tile(cp.arange(2, dtype=cp.uint8), n // 2)
    assert cp.array_equal(dx, cp.where(hit, x, cp.float16(0)))


def test_inputs_on_device_1_while_device_0_is_current(cp, rng):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 CUDA devices")
    geom = pool_geometry((2, 3, 4, 5, 6), dict(kernel_size=2, stride=1))
    x_np = ref.data("ties", geom.input_shape, np.float32, rng)
    with cp.cuda.Device(1):
        x = on_device(cp, x_np, "strided")
    with cp.cuda.Device(0):
        out, off = nk.max_pool_forward_gpu(x, geom)
        dx = nk.max_pool_backward_gpu(out, off, geom)
        assert cp.cuda.runtime.getDevice() == 0
        assert out.device.id == off.device.id == dx.device.id == 1
    ref_out, ref_off = ref.ref_max_forward(x_np, ref.pool_taps(geom), geom.output_shape,
                                           geom.offset_dtype)
    same(out, ref_out, "out on device 1")
    same(off, ref_off, "offsets on device 1")
