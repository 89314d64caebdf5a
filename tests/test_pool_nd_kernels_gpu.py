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


# ------------------------------------------------------- channels-last and bfloat16 on a GPU

BF16 = ref.BF16
ALL_DTYPES = DTYPES + (BF16,)


def last(a):
    """(N, C, *spatial) -> (N, *spatial, C), contiguous (NumPy or CuPy)."""
    if isinstance(a, np.ndarray):
        return ref.last(a)
    import cupy
    return cupy.ascontiguousarray(cupy.moveaxis(a, 1, -1))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ref.DTYPE_IDS)
@pytest.mark.parametrize("name", list(ref.MAX_CASES)[::2] + list(ref.AVG_CASES)[::2])
def test_channels_last_equals_channels_first(cp, poisoned, rng, name, dtype):
    """Every pooling kernel with channels_last=True, on the transposed arrays (contiguous and
    as transposed views), gives the channels-first kernels' results transposed, bit for bit;
    bfloat16 included (against the loop references too)."""
    op = "max" if name in ref.MAX_CASES else "avg"
    size, pool_param = (ref.MAX_CASES if op == "max" else ref.AVG_CASES)[name]
    geom = pool_geometry((3, 37) + size, pool_param, op=op)   # C = 37: lanes wrap warps
    for kind in KINDS:
        x = ref.data(kind, geom.input_shape, dtype, rng)
        dout = rng.standard_normal(geom.output_shape).astype(dtype)
        where = f"{name}, {kind}, {np.dtype(dtype)}"
        x_gpu, dout_gpu = cp.asarray(x), cp.asarray(dout)
        views = ((last(x_gpu), last(dout_gpu)),
                 (cp.moveaxis(x_gpu, 1, -1), cp.moveaxis(dout_gpu, 1, -1)))
        if op == "max":
            out, off = nk.max_pool_forward_gpu(x_gpu, geom)
            dx = nk.max_pool_backward_gpu(dout_gpu, off, geom)
            if np.dtype(dtype) == BF16:
                ref_out, ref_off = ref.ref_max_forward(x, ref.pool_taps(geom),
                                                       geom.output_shape, geom.offset_dtype)
                same(out, ref_out, f"bfloat16 out: {where}")
                same(off, ref_off, f"bfloat16 offsets: {where}")
            for x_l, dout_l in views:
                out_l, off_l = nk.max_pool_forward_gpu(x_l, geom, channels_last=True)
                same(out_l, backend.to_numpy(last(out)), f"out: {where}")
                same(off_l, backend.to_numpy(last(off)), f"offsets: {where}")
                same(nk.max_pool_backward_gpu(dout_l, off_l, geom, channels_last=True),
                     backend.to_numpy(last(dx)), f"dx: {where}")
        else:
            for options in ref.AVG_OPTIONS:
                out = nk.avg_pool_forward_gpu(x_gpu, geom, *options)
                dx = nk.avg_pool_backward_gpu(dout_gpu, geom, *options)
                for x_l, dout_l in views:
                    same(nk.avg_pool_forward_gpu(x_l, geom, *options, channels_last=True),
                         backend.to_numpy(last(out)), f"out {options}: {where}")
                    same(nk.avg_pool_backward_gpu(dout_l, geom, *options, channels_last=True),
                         backend.to_numpy(last(dx)), f"dx {options}: {where}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ref.DTYPE_IDS)
@pytest.mark.parametrize("name", ref.VEC_CASES)
def test_channels_last_vector_kernels(cp, poisoned, rng, monkeypatch, name, dtype):
    """The vectorised channels-last kernels, forward and backward (C a multiple of V,
    aligned arrays), give the scalar channels-last kernels' results bit for bit; a
    misaligned x or dout (a contiguous view one element into an allocation) and C not a
    multiple of V run the scalar kernels."""
    V = nk.vector_width(dtype)
    size, param = ref.VEC_CASES[name]
    real_vectorised = nk._vectorised
    picked = []
    monkeypatch.setattr(nk, "_vectorised",
                        lambda *a: picked.append(real_vectorised(*a)) or picked[-1])
    for C in (8 * V, 8 * V + 1):
        mgeom = pool_geometry((3, C) + size, param, op="max")
        ageom = pool_geometry((3, C) + size, param, op="avg")
        for kind in KINDS:
            x = last(ref.data(kind, mgeom.input_shape, dtype, rng))
            dout = last(ref.data(kind, mgeom.output_shape, dtype, rng))
            where = f"{name}, C={C}, {kind}, {np.dtype(dtype)}"
            runs = []
            for layout in ("contiguous", "misaligned", "scalar"):
                if layout == "scalar":
                    monkeypatch.setattr(nk, "_vectorised", lambda *a: picked.append(False))
                del picked[:]
                x_gpu = on_device(cp, x, "contiguous" if layout == "scalar" else layout)
                d_gpu = on_device(cp, dout, "contiguous" if layout == "scalar" else layout)
                out, off = nk.max_pool_forward_gpu(x_gpu, mgeom, channels_last=True)
                avg = nk.avg_pool_forward_gpu(x_gpu, ageom, True, None, channels_last=True)
                dx_max = nk.max_pool_backward_gpu(d_gpu, off, mgeom, channels_last=True)
                dx_avg = nk.avg_pool_backward_gpu(d_gpu, ageom, True, None, channels_last=True)
                expect = layout == "contiguous" and C % V == 0
                assert picked == [expect] * 4, (layout, where)
                runs.append([backend.to_numpy(a) for a in (out, off, avg, dx_max, dx_avg)])
            monkeypatch.setattr(nk, "_vectorised",
                                lambda *a: picked.append(real_vectorised(*a)) or picked[-1])
            for got in runs[:2]:
                for what, a, b in zip(("max out", "offsets", "avg out", "max dx", "avg dx"),
                                      got, runs[2]):
                    ref.assert_same(a, b, f"{what}: {where}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ref.DTYPE_IDS)
@pytest.mark.parametrize("name", list(ref.ADAPTIVE_CASES)[::2])
def test_channels_last_adaptive_and_unpool(cp, poisoned, rng, name, dtype):
    size, output_size = ref.ADAPTIVE_CASES[name]
    ageom = adaptive_geometry((2, 40) + size, output_size)
    x = ref.data("ties", ageom.input_shape, dtype, rng)
    dout = rng.standard_normal(ageom.output_shape).astype(dtype)
    x_gpu, dout_gpu = cp.asarray(x), cp.asarray(dout)
    out, off = nk.adaptive_max_pool_forward_gpu(x_gpu, ageom)
    out_l, off_l = nk.adaptive_max_pool_forward_gpu(last(x_gpu), ageom, channels_last=True)
    same(out_l, backend.to_numpy(last(out)), "adaptive max out")
    same(off_l, backend.to_numpy(last(off)), "adaptive max offsets")
    same(nk.adaptive_max_pool_backward_gpu(last(dout_gpu), off_l, ageom, channels_last=True),
         backend.to_numpy(last(nk.adaptive_max_pool_backward_gpu(dout_gpu, off, ageom))),
         "adaptive max dx")
    same(nk.adaptive_avg_pool_forward_gpu(last(x_gpu), ageom, channels_last=True),
         backend.to_numpy(last(nk.adaptive_avg_pool_forward_gpu(x_gpu, ageom))),
         "adaptive avg out")
    same(nk.adaptive_avg_pool_backward_gpu(last(dout_gpu), ageom, channels_last=True),
         backend.to_numpy(last(nk.adaptive_avg_pool_backward_gpu(dout_gpu, ageom))),
         "adaptive avg dx")
    # unpooling with duplicates: targets drawn from a plane smaller than the input's
    out_shape = ageom.output_shape
    idx = cp.asarray(rng.integers(0, int(np.prod(ageom.out)), size=ageom.input_shape))
    up, won = nk.max_unpool_forward_gpu(x_gpu, idx, out_shape, return_winners=True)
    up_l, won_l = nk.max_unpool_forward_gpu(last(x_gpu), last(idx), out_shape,
                                            return_winners=True, channels_last=True)
    same(up_l, backend.to_numpy(last(up)), "unpool out")
    d_up = cp.asarray(rng.standard_normal(out_shape).astype(dtype))
    same(nk.max_unpool_backward_gpu(last(d_up), last(idx), won_l, ageom.input_shape,
                                    channels_last=True),
         backend.to_numpy(last(nk.max_unpool_backward_gpu(d_up, idx, won, ageom.input_shape))),
         "unpool dx")


def _torch_cuda():
    try:
        import torch
    except ImportError:
        pytest.skip("PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    return torch


def _torch_dtype(torch, dtype):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            BF16: torch.bfloat16}[np.dtype(dtype)]


def _to_torch(torch, a, dtype, channels_last):
    """NumPy (N, C, *spatial) ``a`` as a CUDA tensor of ``dtype`` (values exact), in
    PyTorch's channels_last (channels_last_3d) memory format, requiring grad."""
    t = torch.from_numpy(np.asarray(a, np.float64)).cuda().to(_torch_dtype(torch, dtype))
    if channels_last:
        fmt = torch.channels_last if t.ndim == 4 else torch.channels_last_3d
        t = t.contiguous(memory_format=fmt)
    return t.requires_grad_(True)


def _from_torch(t):
    """A CUDA tensor as float64 NumPy (N, C, *spatial)."""
    return t.detach().double().cpu().numpy()


def flat_argmax(off_last, geom):
    """Channels-last compact offsets as PyTorch's indices: (N, C, *out) flat positions in
    each input plane."""
    d = geom.d
    taps = np.unravel_index(np.moveaxis(off_last, -1, 1).astype(np.int64), geom.kernel)
    pos = []
    for a in range(d):
        shape = [1] * (2 + d)
        shape[2 + a] = geom.out[a]
        o = np.arange(geom.out[a]).reshape(shape)
        pos.append(o * geom.stride[a] - geom.pad[a] + taps[a] * geom.dilation[a])
    return np.ravel_multi_index(tuple(pos), geom.size)


@pytest.mark.parametrize("dtype", (np.float32, np.float16, BF16), ids=ref.DTYPE_IDS)
@pytest.mark.parametrize("case", [
    ((4, 32, 15, 17), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
    ((2, 64, 14, 14), dict(kernel_size=2, stride=2)),
    ((2, 16, 5, 9, 11), dict(kernel_size=3, stride=2, pad=1)),
    ((2, 24, 6, 7, 8), dict(kernel_size=(2, 3, 2), stride=(1, 2, 2), pad=(1, 1, 0),
                            dilation=(2, 1, 1))),
], ids=["2d-k3s2p1ceil", "2d-k2s2", "3d-k3s2p1", "3d-dilated"])
def test_channels_last_against_torch(cp, rng, case, dtype):
    """Against PyTorch's channels_last (channels_last_3d) tensors: max pooling's output and
    argmax exactly, its gradient and average pooling (sums in float) to rounding; float16 and
    bfloat16 too."""
    torch = _torch_cuda()
    F = torch.nn.functional
    shape, pool_param = case
    d = len(shape) - 2
    geom = pool_geometry(shape, pool_param)
    x = ref.data("random", shape, dtype, rng)
    dout = rng.standard_normal(geom.output_shape).astype(dtype)
    tx = _to_torch(torch, x, dtype, True)
    max_pool = {2: F.max_pool2d, 3: F.max_pool3d}[d]
    t_out, t_idx = max_pool(tx, geom.kernel, geom.stride, geom.pad, geom.dilation,
                            geom.ceil_mode, return_indices=True)
    t_out.backward(_to_torch(torch, dout, dtype, True).detach())
    out, off = nk.max_pool_forward_gpu(cp.asarray(last(x)), geom, channels_last=True)
    same(out, last(_from_torch(t_out)).astype(dtype), "max out vs torch")
    assert np.array_equal(flat_argmax(backend.to_numpy(off), geom), t_idx.cpu().numpy()), \
        "argmax vs torch's indices"
    dx = nk.max_pool_backward_gpu(cp.asarray(last(dout)), off, geom, channels_last=True)
    tol = {np.dtype(np.float32): 1e-6}.get(np.dtype(dtype), 1e-2)
    assert np.allclose(backend.to_numpy(dx).astype(np.float64), last(_from_torch(tx.grad)),
                       rtol=tol, atol=tol), "max dx vs torch"
    if all(v == 1 for v in geom.dilation):
        avg_pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[d]
        tx.grad = None
        t_avg = avg_pool(tx, geom.kernel, geom.stride, geom.pad, geom.ceil_mode, True)
        avg = nk.avg_pool_forward_gpu(cp.asarray(last(x)), geom, True, None, channels_last=True)
        assert np.allclose(backend.to_numpy(avg).astype(np.float64), last(_from_torch(t_avg)),
                           rtol=tol, atol=tol), "avg out vs torch"
