"""The max-pool CUDA kernels on a GPU, against the general xp path on CuPy and on NumPy.

Offsets and outputs must agree bitwise (NaN-aware for float16), dx exactly:
the kernels add the windows' contributions in the xp path's order. Outputs
are allocated poisoned, so an element the kernels skip fails; backward runs
twice and must repeat bitwise; inputs must come back unchanged.
"""
import numpy as np
import pytest

from gpulayers import backend
from gpulayers.cuda import compile as cuda_compile
from gpulayers.cuda import pool_kernels as pk
from gpulayers.pooling import (_max_pool_backward_xp, _max_pool_forward_xp, max_pool_backward,
                               max_pool_forward)
from gpulayers.shapes import pool_geometry

from conftest import make_input

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cupy" not in backend.available_backends(),
                       reason=f"CuPy not usable: {backend.cupy_unusable_reason()}"),
]

DTYPES = (np.float16, np.float32, np.float64)

# (x shape, pool_param): fast and fallback paths, padding, dilation, ceil_mode, uncovered inputs,
# uint16 offsets, and shapes large enough that threads visit many planes.
CASES = {
    "3x3s2p1": ((2, 3, 11, 10), dict(pool_height=3, pool_width=3, stride=2, pad=1)),
    "2x2s2": ((2, 3, 8, 6), dict(pool_height=2, pool_width=2, stride=2)),
    "3x3s1p1": ((2, 3, 7, 9), dict(pool_height=3, pool_width=3, stride=1, pad=1)),
    "3x3s2p2d2": ((2, 3, 11, 12), dict(pool_height=3, pool_width=3, stride=2, pad=2, dilation=2)),
    "3x2s1p3x1d3x2": ((2, 3, 9, 8), dict(pool_height=3, pool_width=2, stride=1, pad=(3, 1),
                                         dilation=(3, 2))),
    "3x3s2p3d3": ((2, 3, 13, 12), dict(pool_height=3, pool_width=3, stride=2, pad=3, dilation=3)),
    "2x3s1x2p1ceil": ((2, 3, 9, 10), dict(pool_height=2, pool_width=3, stride=(1, 2), pad=1,
                                          ceil_mode=True)),
    "2x2s3ceil": ((2, 3, 8, 8), dict(pool_height=2, pool_width=2, stride=3, ceil_mode=True)),
    "2x2s3d2": ((2, 3, 9, 9), dict(pool_height=2, pool_width=2, stride=3, dilation=2)),
    "5x5s1p2": ((2, 3, 8, 8), dict(pool_height=5, pool_width=5, stride=1, pad=2)),
    "17x16s1_uint16": ((1, 2, 20, 18), dict(pool_height=17, pool_width=16, stride=1)),
    # small planes sharing thread blocks: the issue 13 shapes with N*C scaled down
    "small14x14-3x3s2p1": ((4, 23, 14, 14), dict(pool_height=3, pool_width=3, stride=2, pad=1)),
    "small7x7-2x2s2": ((3, 29, 7, 7), dict(pool_height=2, pool_width=2, stride=2)),
    "small8x8-3x3s2p1": ((5, 13, 8, 8), dict(pool_height=3, pool_width=3, stride=2, pad=1)),
    "large3x3s2p1": ((32, 64, 56, 56), dict(pool_height=3, pool_width=3, stride=2, pad=1)),
    "large2x2s2": ((16, 128, 56, 56), dict(pool_height=2, pool_width=2, stride=2)),
}
DATA = ("random", "ties", "nan", "-inf")
LAYOUTS = ("contiguous", "strided", "transposed")
# Large shapes run with random data, contiguous and strided, and against the xp path on CuPy only.
PARAMS = [pytest.param(name, kind, dtype, layout,
                       id=f"{name}-{kind}-{np.dtype(dtype).name}-{layout}")
          for name in CASES for kind in DATA for dtype in DTYPES for layout in LAYOUTS
          if not name.startswith("large") or (kind == "random" and layout != "transposed")]


@pytest.fixture
def cp():
    return backend.backend_module("cupy")


@pytest.fixture
def poisoned(cp, monkeypatch):
    """Make cupy.empty return arrays filled with 0xA5 bytes while the test runs."""
    real_empty = cp.empty

    def empty(shape, dtype=float, order="C"):
        a = real_empty(shape, dtype=dtype, order=order)
        if a.nbytes:
            a.data.memset_async(0xA5, a.nbytes)
        return a

    monkeypatch.setattr(cp, "empty", empty)


def on_device(cp, a, layout):
    """``a`` on the GPU: contiguous, a strided view, or a transposed view of the same values."""
    if layout == "strided":
        base = cp.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        base[..., ::2] = cp.asarray(a)
        return base[..., ::2]
    if layout == "transposed":
        return cp.asarray(np.ascontiguousarray(a.swapaxes(-1, -2))).swapaxes(-1, -2)
    return cp.asarray(a)


def assert_same_values(a, b, what):
    """Bitwise for float32/64; NaN-aware equality for float16 (compared in float)."""
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.dtype == np.float16:
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        uint = np.dtype(f"u{a.dtype.itemsize}")
        assert np.array_equal(a.view(uint), b.view(uint)), f"{what}: values differ bitwise"


@pytest.mark.parametrize("name, kind, dtype, layout", PARAMS)
def test_kernels_match_xp_on_cupy_and_numpy(cp, poisoned, rng, name, kind, dtype, layout):
    shape, pool_param = CASES[name]
    large = name.startswith("large")
    x = make_input(kind, shape, dtype, rng)
    geom = pool_geometry(x.shape, pool_param)
    dout = rng.standard_normal(geom.output_shape).astype(dtype)
    x_gpu, dout_gpu = on_device(cp, x, layout), on_device(cp, dout, layout)
    x_before, dout_before = x_gpu.copy(), dout_gpu.copy()
    where = f"{geom.describe()}, {kind} data, {np.dtype(dtype)}, {layout}"

    out, offsets = pk.max_pool_forward_gpu(x_gpu, geom)
    xp_out, xp_offsets = _max_pool_forward_xp(cp.ascontiguousarray(x_gpu), geom)
    assert offsets.dtype == geom.offset_dtype and out.dtype == x.dtype
    assert cp.array_equal(offsets, xp_offsets), f"offsets vs xp on CuPy: {where}"
    assert_same_values(out, xp_out, f"out vs xp on CuPy: {where}")
    if not large:
        np_out, np_offsets = _max_pool_forward_xp(x, geom)
        assert np.array_equal(offsets.get(), np_offsets), f"offsets vs NumPy: {where}"
        assert_same_values(out, np_out, f"out vs NumPy: {where}")

    offsets_before = offsets.copy()
    dx = pk.max_pool_backward_gpu(dout_gpu, offsets, geom)
    dx_again = pk.max_pool_backward_gpu(dout_gpu, offsets, geom)
    assert dx.dtype == dout.dtype and dx.shape == geom.input_shape
    assert_same_values(dx, dx_again, f"backward is not repeatable: {where}")
    xp_dx = _max_pool_backward_xp(cp.ascontiguousarray(dout_gpu), offsets, geom)
    assert cp.array_equal(dx, xp_dx), f"dx vs xp on CuPy: {where}"
    if not large:
        np_dx = _max_pool_backward_xp(dout, offsets.get(), geom)
        assert np.array_equal(dx.get(), np_dx), f"dx vs NumPy: {where}"

    assert_same_values(x_gpu, x_before, f"x was modified: {where}")
    assert_same_values(dout_gpu, dout_before, f"dout was modified: {where}")
    assert cp.array_equal(offsets, offsets_before), f"offsets were modified: {where}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["3x3s2p1", "2x2s2", "5x5s1p2"])
def test_64bit_index_instantiations(cp, poisoned, rng, name, dtype):
    """The long long kernels, forced on small data, agree with the int ones."""
    shape, pool_param = CASES[name]
    x = cp.asarray(make_input("ties", shape, dtype, rng))
    geom = pool_geometry(x.shape, pool_param)
    dout = cp.asarray(rng.standard_normal(geom.output_shape).astype(dtype))
    out, offsets = pk.max_pool_forward_gpu(x, geom)
    dx = pk.max_pool_backward_gpu(dout, offsets, geom)
    planes, *dims = pk.scalar_args(geom)
    args = (np.int64(planes), *dims)
    grid, block = (3, 2, 1), (96, 1, 1)
    backward = "max_pool2d_backward" if geom.overlapping else "max_pool2d_backward_disjoint"
    out64, offsets64 = cp.empty(out.shape, out.dtype), cp.empty(offsets.shape, offsets.dtype)
    dx64 = cp.empty(dx.shape, dx.dtype)
    for kernel, arrays in (("max_pool2d_forward", (x, out64, offsets64)),
                           (backward, (dout, offsets, dx64))):
        expression = pk.kernel_expression(kernel, dtype, geom).replace(", int>", ", long long>")
        function = cuda_compile.get_kernel(pk.SOURCE, expression, pk.compile_group(expression))
        cuda_compile.launch(function, expression, grid, block, arrays + args)
    assert cp.array_equal(offsets64, offsets)
    assert_same_values(out64, out, "out, long long indices")
    assert_same_values(dx64, dx, "dx, long long indices")


def test_public_entry_points_use_the_kernels(cp, rng):
    x = cp.asarray(make_input("ties", (2, 3, 11, 10), np.float32, rng))
    pool_param = dict(pool_height=3, pool_width=3, stride=2, pad=1)
    out, cache = max_pool_forward(x, pool_param)
    dout = cp.asarray(rng.standard_normal(out.shape).astype(np.float32))
    dx = max_pool_backward(dout, cache)
    geom = cache.geom
    ref_out, ref_offsets = _max_pool_forward_xp(x, geom)
    assert cp.array_equal(cache.offsets, ref_offsets) and cp.array_equal(out, ref_out)
    assert cp.array_equal(dx, _max_pool_backward_xp(dout, ref_offsets, geom))


def test_empty_batch(cp):
    x = cp.zeros((0, 3, 6, 6), np.float32)
    geom = pool_geometry(x.shape, dict(pool_height=2, pool_width=2))
    out, offsets = pk.max_pool_forward_gpu(x, geom)
    dx = pk.max_pool_backward_gpu(cp.zeros(out.shape, np.float32), offsets, geom)
    assert out.shape == offsets.shape == (0, 3, 3, 3) and dx.shape == (0, 3, 6, 6)


def test_launchers_check_arguments(cp):
    x = cp.zeros((1, 1, 4, 4), np.float32)
    geom = pool_geometry(x.shape, dict(pool_height=2, pool_width=2))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        pk.max_pool_forward_gpu(x.get(), geom)
    with pytest.raises(TypeError, match="floating"):
        pk.max_pool_forward_gpu(x.astype(np.int32), geom)
    with pytest.raises(ValueError, match="shape"):
        pk.max_pool_forward_gpu(x[:, :, :3], geom)
    out, offsets = pk.max_pool_forward_gpu(x, geom)
    with pytest.raises(TypeError, match="uint8"):
        pk.max_pool_backward_gpu(out, offsets.astype(np.uint16), geom)
    with pytest.raises(ValueError, match="shape"):
        pk.max_pool_backward_gpu(out[:, :, :1], offsets, geom)


# Every variant (pool_kernels.VARIANT knobs) must give the default kernels' bits.
VARIANTS = [
    {"forward": dict(kernel="pairs", taps=2, planes=planes, block=block, blocks_per_sm=bps),
     "backward": dict(kernel="blocks", planes=planes, block=block, blocks_per_sm=bps)}
    for planes, block, bps in ((1, 128, None), (2, 512, 8), (4, 256, 32))] + [
    {"forward": dict(taps=taps, planes=planes), "backward": dict(planes=planes)}
    for taps, planes in ((2, 2), (3, 4))]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["3x3s2p1", "2x2s2", "3x3s1p1", "2x2s3ceil", "large3x3s2p1",
                                  "large2x2s2"])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_variants_match_default(cp, poisoned, rng, name, dtype, variant):
    shape, pool_param = CASES[name]
    x = cp.asarray(make_input("ties" if name.startswith("large") else "nan", shape, dtype, rng))
    geom = pool_geometry(x.shape, pool_param)
    dout = cp.asarray(rng.standard_normal(geom.output_shape).astype(dtype))
    out, offsets = pk.max_pool_forward_gpu(x, geom, pk.DEFAULT_VARIANT)
    dx = pk.max_pool_backward_gpu(dout, offsets, geom, pk.DEFAULT_VARIANT)
    out_v, offsets_v = pk.max_pool_forward_gpu(x, geom, VARIANTS[variant])
    dx_v = pk.max_pool_backward_gpu(dout, offsets, geom, VARIANTS[variant])
    where = f"variant {VARIANTS[variant]}, {geom.describe()}, {np.dtype(dtype)}"
    assert cp.array_equal(offsets_v, offsets), f"offsets: {where}"
    assert_same_values(out_v, out, f"out: {where}")
    assert_same_values(dx_v, dx, f"dx: {where}")


def misaligned_view(cp, a):
    """``a`` (NumPy) on the GPU as a contiguous view one element past a fresh allocation, as
    ``cupy.arange(n + 1)[1:].reshape(...)``: its data is not aligned to 2 elements."""
    base = cp.empty(a.size + 1, dtype=a.dtype)
    view = base[1:].reshape(a.shape)
    view[...] = cp.asarray(a)
    assert view.flags.c_contiguous and view.data.ptr % (2 * a.dtype.itemsize) != 0
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["2x2s2", "3x3s2p1", "large2x2s2"])
def test_misaligned_views_match_contiguous_copies(cp, rng, name, dtype):
    """x and dout as contiguous views at an odd element offset, through the public entry
    points: the launchers must not run the pairs kernels on them (a misaligned vector load
    faults and poisons the context), and the results equal those of aligned copies. Launch
    checks are on, so a fault is raised here, naming the kernel."""
    shape, pool_param = CASES[name]
    x_np = make_input("ties", shape, dtype, rng)
    x = misaligned_view(cp, x_np)
    x_copy = cp.array(x)
    assert pk.pairs_aligned(x_copy) and not pk.pairs_aligned(x)
    previous = cuda_compile.set_launch_checks(True)
    try:
        out, cache = max_pool_forward(x, pool_param)
        ref_out, ref_cache = max_pool_forward(x_copy, pool_param)
        dout_np = rng.standard_normal(out.shape).astype(dtype)
        dout = misaligned_view(cp, dout_np)
        dx = max_pool_backward(dout, cache)
        ref_dx = max_pool_backward(cp.asarray(dout_np), ref_cache)
        cp.cuda.Device().synchronize()
    finally:
        cuda_compile.set_launch_checks(previous)
    assert cp.array_equal(cache.offsets, ref_cache.offsets)
    assert_same_values(out, ref_out, f"out of a misaligned view: {name}, {np.dtype(dtype)}")
    assert_same_values(dx, ref_dx, f"dx of a misaligned dout: {name}, {np.dtype(dtype)}")
    assert np.array_equal(cache.offsets.get(), _max_pool_forward_xp(x_np, cache.geom)[1])


@pytest.mark.parametrize("name", ["2x2s2", "3x3s2p1"])
def test_inputs_on_device_1_while_device_0_is_current(cp, rng, name):
    """Arrays on device 1 with device 0 current: outputs on device 1, kernels compiled and
    launched there, device 0 current again afterwards; dout and offsets on two devices are
    a ValueError naming them."""
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 CUDA devices")
    shape, pool_param = CASES[name]
    x_np = make_input("ties", shape, np.float32, rng)
    geom = pool_geometry(x_np.shape, pool_param)
    dout_np = rng.standard_normal(geom.output_shape).astype(np.float32)
    with cp.cuda.Device(1):
        x = on_device(cp, x_np, "strided")
        dout = cp.asarray(dout_np)
    with cp.cuda.Device(0):
        previous = cuda_compile.set_launch_checks(True)
        try:
            out, cache = max_pool_forward(x, pool_param)
            dx = max_pool_backward(dout, cache)
        finally:
            cuda_compile.set_launch_checks(previous)
        assert cp.cuda.runtime.getDevice() == 0
        assert out.device.id == cache.offsets.device.id == dx.device.id == 1
        with pytest.raises(ValueError, match="dout .* on device 0, offsets .* on device 1"):
            pk.max_pool_backward_gpu(cp.asarray(dout_np), cache.offsets, geom)
    np_out, np_offsets = _max_pool_forward_xp(x_np, geom)
    assert np.array_equal(cache.offsets.get(), np_offsets)
    assert_same_values(out, np_out, f"out on device 1: {geom.describe()}")
    assert np.array_equal(dx.get(), _max_pool_backward_xp(dout_np, np_offsets, geom))


# ------------------------------------------------------------------------------- bfloat16

@pytest.mark.parametrize("name", ["3x3s2p1", "2x2s2", "3x3s1p1", "2x3s1x2p1ceil",
                                  "17x16s1_uint16", "large3x3s2p1", "large2x2s2"])
def test_bfloat16_matches_the_shim_references(cp, poisoned, rng, name):
    """bfloat16 (ml_dtypes; CuPy >= 14) through the default variant (pairs / blocks where they
    fit) and a variant that bfloat16 lacks (2 planes: the default kernels run), against the
    loop references of the shim tests (compared in float32)."""
    import test_cuda_shim_pool as ref
    shape, pool_param = CASES[name]
    if name.startswith("large"):
        shape = (2, 8) + shape[2:]
    x = make_input("ties", shape, ref.BF16, rng)
    geom = pool_geometry(x.shape, pool_param)
    dout = rng.standard_normal(geom.output_shape).astype(ref.BF16)
    ref_out, ref_off = ref.reference_forward(x, geom)
    ref_dx = ref.reference_backward(dout, ref_off, geom)
    for variant in (None, {"forward": {"planes": 2}, "backward": {"planes": 2}}):
        out, off = pk.max_pool_forward_gpu(cp.asarray(x), geom, variant)
        assert np.array_equal(off.get(), ref_off), f"offsets: {name} {variant}"
        ref.assert_same_values(out.get(), ref_out, f"out: {name} {variant}")
        dx = pk.max_pool_backward_gpu(cp.asarray(dout), off, geom, variant)
        ref.assert_same_values(dx.get(), ref_dx, f"dx: {name} {variant}")


# ------------------------------------------------- small planes share thread blocks (issue 13)

def _one_plane_function(cp, expression):
    """``expression`` compiled with GPULAYERS_MAXPOOL_ONE_PLANE_PER_BLOCK: the kernels with
    one plane per block, the launch layout before planes shared blocks."""
    options = cuda_compile.OPTIONS + ("-DGPULAYERS_MAXPOOL_ONE_PLANE_PER_BLOCK",)
    group = list(pk.compile_group(expression))
    try:
        module = cp.RawModule(code=cuda_compile.source(pk.SOURCE), options=options,
                              name_expressions=group)
        module.compile()
    except cp.cuda.compiler.CompileException:
        include = cuda_compile.cuda_include_dir()
        if include is None:
            raise
        module = cp.RawModule(code=cuda_compile.source(pk.SOURCE),
                              options=options + (f"-I{include}",), name_expressions=group)
    return module.get_function(expression)


def _median_ms(cp, fn, reps=20):
    fn()
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        times.append((start, stop))
    stop.synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in times]))


@pytest.mark.parametrize("dtype", (np.float16, np.float32), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("pool", ["3x3s2p1", "2x2s2"])
@pytest.mark.parametrize("shape", [(256, 512, 14, 14), (256, 2048, 7, 7), (1024, 64, 8, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_small_planes_match_one_plane_per_block(cp, rng, shape, pool, dtype):
    """The issue's full shapes: the launchers (planes sharing blocks, >= 75% of threads busy)
    give the bits of the same kernels with one plane per block under the launch they had;
    both kernels' times are printed (``pytest -s``; CUDA events, no assertion)."""
    geom = pool_geometry(shape, CASES[pool][1])
    assert min(pk.thread_utilisation(geom, p, dtype=dtype) for p in ("forward", "backward")) >= 0.75
    x = cp.random.randint(-40, 40, size=shape, dtype=cp.int32).astype(dtype)
    x.ravel()[::99991] = np.nan
    out, offsets = pk.max_pool_forward_gpu(x, geom)
    dout = cp.random.standard_normal(geom.output_shape, dtype=cp.float32).astype(dtype)
    dx = pk.max_pool_backward_gpu(dout, offsets, geom)
    sm_count = pk._sm_count(cp.cuda.runtime.getDevice())
    for pass_, inputs, expected in (("forward", (x,), (out, offsets)),
                                    ("backward", (dout, offsets), (dx,))):
        plan = (pk.forward_plan if pass_ == "forward" else pk.backward_plan)(geom, dtype=dtype)
        expression = pk.kernel_expression(plan["kernel"], dtype, geom, plan["params"])
        args = (plan["plane"], geom.N * geom.C, sm_count, plan["block"], plan["blocks_per_sm"],
                plan["planes_per_step"])
        old = _one_plane_function(cp, expression)
        new = cuda_compile.get_kernel(pk.SOURCE, expression, pk.compile_group(expression))
        old_grid, block = pk.launch_config(*args)
        new_grid, _ = pk.launch_config(*args, packed=plan["packed"])
        assert plan["packed"], plan
        outputs = tuple(cp.empty(a.shape, a.dtype) for a in expected)
        for o in outputs:
            o.data.memset_async(0xA5, o.nbytes)
        launch_args = inputs + outputs + pk.scalar_args(geom)
        old(old_grid, block, launch_args)
        for got, want in zip(outputs, expected):
            assert_same_values(got, want, f"{pass_} {expression}: one plane per block")
        ms_old = _median_ms(cp, lambda: old(old_grid, block, launch_args))
        ms_new = _median_ms(cp, lambda: new(new_grid, block, launch_args))
        print(f"\n{pass_} {shape} {pool} {np.dtype(dtype).name}: {expression} "
              f"one plane per block {old_grid} {ms_old:.3f} ms, shared {new_grid} "
              f"{ms_new:.3f} ms ({ms_old / ms_new:.2f}x)")
