"""The exact maxpool.cu source, run on the CPU through the host shim (tests/cuda_shim).

Kernels are compared with a loop reference written here and with the general
xp path of gpulayers.pooling: offsets and outputs bitwise, dx exactly (both
references add the windows' contributions in ascending tap order, as the
kernels do). Every case also runs with 64-bit indices and under launch grids
smaller and larger than the work, with a block size that is no multiple of
the plane. Outputs are poisoned first, so an element the kernels skip fails.
"""
import itertools
import json
import sys
import time
import types
from importlib import resources
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gpulayers.cuda import pool_kernels as pk
from gpulayers.pooling import _max_pool_backward_xp, _max_pool_forward_xp
from gpulayers.shapes import PoolGeometry, pool_geometry

sys.path.insert(0, str(Path(__file__).parent))  # tests/cuda_shim is a helper package here
import cuda_shim  # noqa: E402
from conftest import make_input  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_shim.compiler() is None,
                                reason="no C++ compiler (g++ or $CXX) for the CUDA host shim")

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, BF16] + ([np.float16] if cuda_shim.has_half() else [])

# (input H, W; pool_param): the benchmark geometries, padding, dilation, ceil_mode, windows that
# leave input elements uncovered, and windows too large for the unrolled fast paths.
GEOMETRIES = {
    "3x3s2p1": ((11, 10), dict(pool_height=3, pool_width=3, stride=2, pad=1)),
    "2x2s2": ((8, 6), dict(pool_height=2, pool_width=2, stride=2)),
    "3x3s1p1": ((7, 9), dict(pool_height=3, pool_width=3, stride=1, pad=1)),
    "3x3s2p2d2": ((11, 12), dict(pool_height=3, pool_width=3, stride=2, pad=2, dilation=2)),
    "3x2s1p3x1d3x2": ((9, 8), dict(pool_height=3, pool_width=2, stride=1, pad=(3, 1),
                                   dilation=(3, 2))),
    "2x2s1p1d2ceil": ((7, 8), dict(pool_height=2, pool_width=2, stride=1, pad=1, dilation=2,
                                   ceil_mode=True)),
    "3x3s2p3d3": ((13, 12), dict(pool_height=3, pool_width=3, stride=2, pad=3, dilation=3)),
    "2x3s1x2p1ceil": ((9, 10), dict(pool_height=2, pool_width=3, stride=(1, 2), pad=1,
                                    ceil_mode=True)),
    "3x3s2ceil": ((10, 10), dict(pool_height=3, pool_width=3, stride=2, ceil_mode=True)),
    "2x2s3ceil": ((8, 8), dict(pool_height=2, pool_width=2, stride=3, ceil_mode=True)),
    "2x2s3d2": ((9, 9), dict(pool_height=2, pool_width=2, stride=3, dilation=2)),
    "1x1s2": ((10, 7), dict(pool_height=1, pool_width=1, stride=2)),
    "5x5s1p2": ((8, 8), dict(pool_height=5, pool_width=5, stride=1, pad=2)),
    "4x4s3p1ceil": ((11, 11), dict(pool_height=4, pool_width=4, stride=3, pad=1,
                                   ceil_mode=True)),
    "3x3s2p1d1x3": ((5, 13), dict(pool_height=3, pool_width=3, stride=2, pad=(1, 3),
                                  dilation=(1, 3), ceil_mode=True)),
    "17x16s1_uint16": ((20, 18), dict(pool_height=17, pool_width=16, stride=1)),
    # stride-2 variants: partial last windows/blocks, odd widths
    "2x2s2ceil": ((7, 10), dict(pool_height=2, pool_width=2, stride=2, ceil_mode=True)),
    "3x3s2p1odd": ((9, 7), dict(pool_height=3, pool_width=3, stride=2, pad=1)),
    "2x2s2p1": ((6, 8), dict(pool_height=2, pool_width=2, stride=2, pad=1)),
}

# Every kernel variant's knobs (pool_kernels.VARIANT); launch knobs vary independently.
FORWARD_VARIANTS = [dict(kernel=kernel, taps=taps, planes=planes)
                    for kernel in ("generic", "pairs") for taps in (2, 3) for planes in pk.PLANES]
BACKWARD_VARIANTS = [dict(kernel=kernel, planes=planes)
                     for kernel in ("element", "blocks") for planes in pk.PLANES]

DATA = ("random", "ties", "nan", "-inf")


@pytest.fixture(scope="module")
def lib():
    """maxpool.cu built for the CPU with every instantiation the shim can run."""
    expressions = [e for e in pk.NAME_EXPRESSIONS if "__half" not in e or cuda_shim.has_half()]
    with resources.as_file(resources.files("gpulayers.cuda") / pk.SOURCE) as path:
        return cuda_shim.build(path, expressions)


def reference_forward(x, geom):
    """Loop reference: per window, its in-range taps in row-major order, PyTorch's rule
    (bfloat16 compared in float32, as the kernels do; the maximum converts back exactly)."""
    out = np.empty(geom.output_shape, x.dtype)
    offsets = np.empty(geom.output_shape, geom.offset_dtype)
    x = x.astype(np.float32) if x.dtype == BF16 else x
    for oh, ow in np.ndindex(geom.Ho, geom.Wo):
        best = np.full(x.shape[:2], -np.inf, x.dtype)
        arg = np.full(x.shape[:2], -1)
        for i, j in np.ndindex(geom.kh, geom.kw):
            h, w = oh * geom.sh - geom.ph + i * geom.dh, ow * geom.sw - geom.pw + j * geom.dw
            if not (0 <= h < geom.H and 0 <= w < geom.W):
                continue
            v = x[:, :, h, w]
            take = (v > best) | np.isnan(v) | (arg < 0)
            best, arg = np.where(take, v, best), np.where(take, i * geom.kw + j, arg)
        out[:, :, oh, ow], offsets[:, :, oh, ow] = best, arg
    return out, offsets


def reference_backward(dout, offsets, geom):
    """Loop reference: taps in ascending offset order add dout to the element they name,
    in float32 for float16 and bfloat16."""
    acc = np.float32 if dout.dtype in (np.float16, BF16) else dout.dtype
    dx = np.zeros(geom.input_shape, acc)
    for k in range(geom.window_size):
        i, j = divmod(k, geom.kw)
        for oh, ow in np.ndindex(geom.Ho, geom.Wo):
            h, w = oh * geom.sh - geom.ph + i * geom.dh, ow * geom.sw - geom.pw + j * geom.dw
            hit = offsets[:, :, oh, ow] == k
            if hit.any():
                dx[:, :, h, w] += np.where(hit, dout[:, :, oh, ow].astype(acc), 0)
    return dx.astype(dout.dtype)


def launches(geom, plane):
    """(grid, block) triples: the launcher's own, a grid smaller than the work with a block of
    7 threads, and a grid larger than the work with 33-thread blocks."""
    planes = geom.N * geom.C
    yield pk.launch_config(plane, planes, sm_count=1, packed=True)
    yield (2, 2, 1), (7, 1, 1)
    yield (-(-plane // 33) + 1, planes + 2, 1), (33, 1, 1)


def expression(kernel, dtype, geom, index, params=()):
    extra = "".join(f", {p}" for p in params)
    return (f"{kernel}<{pk.VALUE_TYPES[np.dtype(dtype)]}, "
            f"{pk.OFFSET_TYPES[geom.offset_dtype]}, {index}{extra}>")


def scalars(geom, index):
    planes, *dims = pk.scalar_args(geom)
    return (pk.INDEX_TYPES[index](planes), *dims)


def run_forward(lib, x, geom, index, grid, block, plan=None):
    plan = plan or pk.forward_plan(geom, {"forward": pk.DEFAULT_VARIANT["forward"]},
                                   dtype=x.dtype)
    out = np.full(geom.output_shape, 1234.5, x.dtype)
    offsets = np.full(geom.output_shape, np.iinfo(geom.offset_dtype).max, geom.offset_dtype)
    lib.launch(expression(plan["kernel"], x.dtype, geom, index, plan["params"]), grid, block,
               (x, out, offsets) + scalars(geom, index))
    return out, offsets


def run_backward(lib, dout, offsets, geom, index, grid, block, plan=None):
    plan = plan or pk.backward_plan(geom, {"backward": pk.DEFAULT_VARIANT["backward"]},
                                    dtype=dout.dtype)
    dx = np.full(geom.input_shape, 1234.5, dout.dtype)
    lib.launch(expression(plan["kernel"], dout.dtype, geom, index, plan["params"]), grid, block,
               (dout, offsets, dx) + scalars(geom, index))
    return dx


def variant_launches(geom, plan):
    """The plan's own launch (one SM), a grid smaller than the work (7-thread blocks, so the
    plane groups and positions wrap), and one larger than the work."""
    planes = geom.N * geom.C
    yield pk.launch_config(plan["plane"], planes, 1, 64, plan["blocks_per_sm"],
                           plan["planes_per_step"], packed=plan["packed"])
    yield (2, 1, 1), (7, 1, 1)
    yield (-(-plan["plane"] // 33) + 1, planes + 2, 1), (33, 1, 1)


def variant_plans(geom, dtype=None):
    """{what: plan} of every distinct non-default forward and backward kernel for geom (and
    dtype: bfloat16 has fewer)."""
    plans = {}
    defaults = (pk.forward_plan(geom, {"forward": pk.DEFAULT_VARIANT["forward"]}, dtype=dtype),
                pk.backward_plan(geom, {"backward": pk.DEFAULT_VARIANT["backward"]},
                                 dtype=dtype))
    for pass_, variants, plan_of in (("forward", FORWARD_VARIANTS, pk.forward_plan),
                                     ("backward", BACKWARD_VARIANTS, pk.backward_plan)):
        for variant in variants:
            plan = plan_of(geom, {pass_: variant}, dtype=dtype)
            if (plan["kernel"], plan["params"]) not in [(d["kernel"], d["params"])
                                                        for d in defaults]:
                plans[pass_, plan["kernel"], plan["params"]] = plan
    return plans


def assert_same_values(a, b, what):
    """Bitwise for float32/64 (NaN payloads included); NaN-aware equality for float16 and
    bfloat16, whose kernels compare in float (a NaN comes back as float's NaN, rounded)."""
    if a.dtype == BF16:
        np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32), err_msg=what)
    elif a.dtype == np.float16:
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        uint = np.dtype(f"u{a.dtype.itemsize}")
        assert np.array_equal(a.view(uint), b.view(uint)), f"{what}: values differ bitwise"


def check_case(lib, geom, x, dout):
    """Kernels vs both references, for each index type and launch grid; inputs unchanged."""
    x_copy, dout_copy = x.copy(), dout.copy()
    ref_out, ref_offsets = reference_forward(x, geom)
    xp_out, xp_offsets = _max_pool_forward_xp(x, geom)
    assert np.array_equal(ref_offsets, xp_offsets), "loop reference and xp path disagree"
    ref_dx = reference_backward(dout, ref_offsets, geom)
    assert np.array_equal(ref_dx, _max_pool_backward_xp(dout, ref_offsets, geom))
    for index in pk.INDEX_TYPES:
        for grid, block in launches(geom, geom.Ho * geom.Wo):
            where = f"{geom.describe()}, {index} indices, grid {grid}, block {block}"
            out, offsets = run_forward(lib, x, geom, index, grid, block)
            assert np.array_equal(offsets, ref_offsets), f"offsets differ: {where}"
            assert_same_values(out, ref_out, f"out: {where}")
            assert_same_values(out, xp_out, f"out vs xp path: {where}")
        for grid, block in launches(geom, geom.H * geom.W):
            where = f"{geom.describe()}, {index} indices, grid {grid}, block {block}"
            dx = run_backward(lib, dout, ref_offsets, geom, index, grid, block)
            assert np.array_equal(dx, ref_dx), f"dx differs: {where}"
    assert_same_values(x, x_copy, "x was modified")
    assert_same_values(dout, dout_copy, "dout was modified")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_variants_match_references(lib, name, dtype, rng):
    """Every variant kernel that serves the geometry, on ties and NaN/-inf data, with both
    index types and three launch grids, against the loop references."""
    (H, W), pool_param = GEOMETRIES[name]
    geom = pool_geometry((2, 3, H, W), pool_param)
    plans = variant_plans(geom, dtype)
    if geom.offset_dtype == np.uint8:
        assert any(what[0] == "forward" for what in plans), "no forward variant ran"
    for kind in ("ties", "nan"):
        x = make_input(kind, geom.input_shape, dtype, rng)
        dout = rng.standard_normal(geom.output_shape).astype(dtype)
        ref_out, ref_offsets = reference_forward(x, geom)
        ref_dx = reference_backward(dout, ref_offsets, geom)
        for (pass_, kernel, params), plan in plans.items():
            for index in pk.INDEX_TYPES:
                for grid, block in variant_launches(geom, plan):
                    where = (f"{kernel}{list(params)}, {geom.describe()}, {kind}, {index}, "
                             f"grid {grid}, block {block}")
                    if pass_ == "forward":
                        out, offsets = run_forward(lib, x, geom, index, grid, block, plan)
                        assert np.array_equal(offsets, ref_offsets), f"offsets differ: {where}"
                        assert_same_values(out, ref_out, f"out: {where}")
                    else:
                        dx = run_backward(lib, dout, ref_offsets, geom, index, grid, block, plan)
                        assert np.array_equal(dx, ref_dx), f"dx differs: {where}"


def test_variant_plans_cover_the_benchmark_geometries():
    """The stride-2 benchmark geometries get the vector kernels; others fall back."""
    def plans(shape, **pool_param):
        geom = pool_geometry(shape, pool_param)
        fwd = pk.forward_plan(geom, {"forward": dict(kernel="pairs", taps=2, planes=4)})
        bwd = pk.backward_plan(geom, {"backward": dict(kernel="blocks", planes=2)})
        return (fwd["kernel"], fwd["params"]), (bwd["kernel"], bwd["params"], bwd["plane"])
    assert plans((2, 3, 112, 112), pool_height=2, pool_width=2, stride=2) == (
        ("max_pool2d_forward_pairs", (4,)), ("max_pool2d_backward_blocks", (2, 1, 2), 56 * 56))
    assert plans((2, 3, 112, 112), pool_height=3, pool_width=3, stride=2, pad=1) == (
        ("max_pool2d_forward", (3, 4)), ("max_pool2d_backward_blocks", (2, 2, 2), 56 * 56))
    # small planes: packed kernels ('true') where instantiated (4 planes per step), else not
    assert plans((2, 3, 11, 11), pool_height=2, pool_width=2, stride=2, pad=1) == (
        ("max_pool2d_forward", (2, 4, "true")), ("max_pool2d_backward_blocks", (2, 2, 2), 36))
    assert plans((2, 3, 9, 9), pool_height=3, pool_width=3, stride=1, pad=1) == (
        ("max_pool2d_forward", (3, 4, "true")), ("max_pool2d_backward", (2,), 81))
    assert plans((2, 3, 20, 18), pool_height=17, pool_width=16) == (   # uint16 offsets
        ("max_pool2d_forward", ()), ("max_pool2d_backward_disjoint", (), 360))
    for geom in (pool_geometry((1, 1, 9, 9), dict(pool_height=3, pool_width=3, stride=2)),):
        for variant in FORWARD_VARIANTS:
            plan = pk.forward_plan(geom, {"forward": variant})
            assert pk.kernel_expression(plan["kernel"], np.float32, geom,
                                        plan["params"]) in pk.NAME_EXPRESSIONS
    with pytest.raises(ValueError, match="planes"):
        pk.forward_plan(geom, {"forward": dict(planes=3)})
    with pytest.raises(ValueError, match="unknown"):
        pk.backward_plan(geom, {"backward": dict(taps=2)})
    with pytest.raises(ValueError, match="kernel"):
        pk.backward_plan(geom, {"backward": dict(kernel="pairs")})


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_kernels_match_references(lib, name, kind, dtype, rng):
    (H, W), pool_param = GEOMETRIES[name]
    x = make_input(kind, (2, 3, H, W), dtype, rng)
    geom = pool_geometry(x.shape, pool_param)
    dout = rng.standard_normal(geom.output_shape).astype(dtype)
    check_case(lib, geom, x, dout)


def test_uint32_offsets(lib, rng):
    """A window of more than 65536 elements stores uint32 offsets."""
    x = make_input("ties", (1, 2, 257, 256), np.float32, rng)
    geom = pool_geometry(x.shape, dict(pool_height=257, pool_width=256))
    assert geom.offset_dtype == np.uint32
    dout = rng.standard_normal(geom.output_shape).astype(np.float32)
    xp_out, xp_offsets = _max_pool_forward_xp(x, geom)
    xp_dx = _max_pool_backward_xp(dout, xp_offsets, geom)
    for index in pk.INDEX_TYPES:
        out, offsets = run_forward(lib, x, geom, index, (3, 1), (64, 1))
        assert np.array_equal(offsets, xp_offsets) and np.array_equal(out, xp_out)
        dx = run_backward(lib, dout, offsets, geom, index, (50, 2), (96, 1))
        assert np.array_equal(dx, xp_dx)


def test_empty_batch_runs_nothing(lib):
    x = np.zeros((0, 3, 6, 6), np.float32)
    geom = pool_geometry(x.shape, dict(pool_height=2, pool_width=2))
    out, offsets = run_forward(lib, x, geom, "int", (1, 1), (32, 1))
    assert out.shape == (0, 3, 3, 3) and offsets.shape == (0, 3, 3, 3)


def test_shim_checks_argument_types(lib):
    """The shim rejects what a RawKernel would misread: wrong scalar widths, wrong arrays."""
    x = np.zeros((1, 1, 4, 4), np.float32)
    geom = pool_geometry(x.shape, dict(pool_height=2, pool_width=2))
    out, offsets = np.empty((1, 1, 2, 2), np.float32), np.empty((1, 1, 2, 2), np.uint8)
    name = expression("max_pool2d_forward", np.float32, geom, "int")
    args = (x, out, offsets) + scalars(geom, "int")
    with pytest.raises(TypeError, match="argument 3"):
        lib.launch(name, 1, 32, args[:3] + (np.int64(1),) + args[4:])
    with pytest.raises(TypeError, match="argument 0"):
        lib.launch(name, 1, 32, (x.astype(np.float64),) + args[1:])
    with pytest.raises(TypeError, match="argument 0"):
        lib.launch(name, 1, 32, (x[..., ::2],) + args[1:])
    with pytest.raises(TypeError, match="takes 16 arguments"):
        lib.launch(name, 1, 32, args[:-1])


def misaligned(a):
    """A C-contiguous copy of NumPy array a whose data sits one element off 2-element alignment
    (like cupy.arange(n + 1)[1:].reshape(...)): what a vector access of pairs must not meet."""
    item = a.dtype.itemsize
    buffer = np.empty(a.nbytes + 4 * item, np.uint8)
    start = (-buffer.ctypes.data) % (2 * item) + item
    out = buffer[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % (2 * item) == item
    return out


class FakeCupyArray(np.ndarray):
    """NumPy array standing in for cupy.ndarray: ``.device.id`` (``device_id``, which views and
    copies inherit) and ``.data`` with ``ptr`` and the two methods tune_pool uses."""

    device_id = 0

    def __array_finalize__(self, obj):
        self.device_id = getattr(obj, "device_id", 0)

    @property
    def device(self):
        return types.SimpleNamespace(id=self.device_id)

    @property
    def data(self):
        array = self

        class Pointer:
            ptr = array.ctypes.data

            def memset_async(self, value, nbytes):
                array.reshape(-1).view(np.uint8)[:nbytes] = value

            def copy_from_device_async(self, src, nbytes):
                array.reshape(-1).view(np.uint8)[:nbytes] = \
                    src.array.reshape(-1).view(np.uint8)[:nbytes]
        pointer = Pointer()
        pointer.array = self
        return pointer


class FakeCupy:
    """A cupy stand-in on NumPy with ``devices`` fake devices: its arrays are FakeCupyArray on
    the current device (``current``); ``cuda.Device(i)`` makes device i current while entered
    (each entry recorded in ``switches``); ascontiguousarray returns a C-contiguous array
    itself, as CuPy does (same pointer); with ``misaligned_empty`` set, empty returns arrays
    one element off 2-element alignment. Enough for the launchers and scripts/tune_pool.py."""

    ndarray = FakeCupyArray
    uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
    int32, float32 = np.int32, np.float32
    array_equal = staticmethod(np.array_equal)

    def __init__(self, devices=1):
        import time
        self.current, self.switches, self.misaligned_empty = 0, [], False
        fake = self

        class Device:
            def __init__(self, device_id=None):
                self.id = fake.current if device_id is None else device_id

            def __enter__(self):
                assert 0 <= self.id < devices, f"no device {self.id}"
                self.previous, fake.current = fake.current, self.id
                fake.switches.append(self.id)
                return self

            def __exit__(self, *exc):
                fake.current = self.previous

            def synchronize(self):
                pass

        class Event:
            def record(self):
                self.t = time.perf_counter()

            def synchronize(self):
                pass

        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: devices, getDevice=lambda: fake.current,
            getDeviceProperties=lambda i: {"multiProcessorCount": 2, "name": b"cpu shim"})
        self.cuda = types.SimpleNamespace(
            runtime=runtime, Device=Device, Event=Event,
            get_elapsed_time=lambda a, b: 1e3 * (b.t - a.t))
        rng = np.random.default_rng(0)
        self.random = types.SimpleNamespace(
            randint=lambda low, high, size, dtype: self.on(rng.integers(low, high, size, dtype)),
            standard_normal=lambda size, dtype: self.on(rng.standard_normal(size).astype(dtype)))

    def on(self, a, device_id=None):
        """A copy of a (C-contiguous) on device_id (default: the current device)."""
        out = np.array(a, order="C").view(FakeCupyArray)
        out.device_id = self.current if device_id is None else device_id
        return out

    def empty(self, shape, dtype=np.float64):
        a = np.empty(shape, dtype)
        out = (misaligned(a) if self.misaligned_empty else a).view(FakeCupyArray)
        out.device_id = self.current
        return out

    def empty_like(self, a):
        return self.empty(a.shape, a.dtype)

    def ascontiguousarray(self, a):
        return a if a.flags.c_contiguous else self.on(a)

    def get_default_memory_pool(self):
        return types.SimpleNamespace(free_all_blocks=lambda: None)


@pytest.fixture
def shim_launchers(lib, monkeypatch):
    """pool_kernels' own launchers, running the shim build, with two fake devices: a FakeCupy
    stands in for cupy (the fixture's value), get_kernel records (expression, device_id) in
    its ``kernels`` and hands the name expression on, launch checks that every array is on
    the current device, records (expression, device_id) in ``launches`` and runs the shim."""
    fake = FakeCupy(devices=2)
    fake.kernels, fake.launches = [], []
    monkeypatch.setitem(sys.modules, "cupy", fake)

    def get_kernel(source, expression, all_expressions, device_id=None):
        assert source == pk.SOURCE and expression in all_expressions
        fake.kernels.append((expression, device_id))
        return expression

    def launch(kernel, name, grid, block, args, device_id=None):
        devices = {a.device_id for a in args if isinstance(a, np.ndarray)}
        assert devices == {fake.current}, f"{name}: arrays on {devices}, current {fake.current}"
        fake.launches.append((name, device_id))
        lib.launch(kernel, grid, block, args)
    monkeypatch.setattr(pk.cuda_compile, "get_kernel", get_kernel)
    monkeypatch.setattr(pk.cuda_compile, "launch", launch)
    pk._sm_count.cache_clear()
    pk._prepared.cache_clear()
    yield fake
    pk._sm_count.cache_clear()
    pk._prepared.cache_clear()


LAUNCH_VARIANTS = [
    None,
    {"forward": dict(kernel="pairs", taps=2, planes=4, block=64, blocks_per_sm=None),
     "backward": dict(kernel="blocks", planes=4, block=128, blocks_per_sm=1)},
    {"forward": dict(taps=2, planes=2, blocks_per_sm=3), "backward": dict(planes=2, block=32)},
]


@pytest.mark.parametrize("variant", range(len(LAUNCH_VARIANTS)))
@pytest.mark.parametrize("name", ["3x3s2p1", "2x2s2", "5x5s1p2", "2x2s3d2", "17x16s1_uint16"])
def test_launchers_through_the_shim(shim_launchers, rng, name, variant):
    """Argument order and C types, kernel choice, strided inputs: the launchers end to end."""
    cp = shim_launchers
    (H, W), pool_param = GEOMETRIES[name]
    x = cp.on(make_input("ties", (3, 2, W, H), np.float32, rng)).swapaxes(2, 3)  # strided
    geom = pool_geometry(x.shape, pool_param)
    dout = cp.on(rng.standard_normal(geom.output_shape).astype(np.float32))[..., ::-1]
    assert not x.flags.c_contiguous and not dout.flags.c_contiguous
    x_copy, dout_copy = np.array(x), np.array(dout)
    variant = LAUNCH_VARIANTS[variant]
    out, offsets = pk.max_pool_forward_gpu(x, geom, variant)
    ref_out, ref_offsets = _max_pool_forward_xp(x_copy, geom)
    assert np.array_equal(offsets, ref_offsets) and np.array_equal(out, ref_out)
    dx = pk.max_pool_backward_gpu(dout, offsets, geom, variant)
    assert np.array_equal(dx, _max_pool_backward_xp(dout_copy, np.asarray(offsets), geom))
    assert np.array_equal(x, x_copy) and np.array_equal(dout, dout_copy)
    assert cp.switches == [] and {d for _, d in cp.kernels + cp.launches} == {0}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_vector_kernels_fault_on_misaligned_pointers(lib, rng, dtype):
    """The pairs forward kernel on an x one element off alignment, and the blocks backward
    kernel on such a dx, fault (cudaErrorMisalignedAddress on a GPU); the default kernels take
    the same arrays and match the references."""
    x = make_input("ties", (2, 3, 8, 6), dtype, rng)
    geom = pool_geometry(x.shape, dict(pool_height=2, pool_width=2, stride=2))
    dout = rng.standard_normal(geom.output_shape).astype(dtype)
    ref_out, ref_offsets = reference_forward(x, geom)
    ref_dx = reference_backward(dout, ref_offsets, geom)
    bad_x = misaligned(x)
    grid, block = (2, 2, 1), (7, 1, 1)
    all_planes = pk.BF16_PLANES if np.dtype(dtype) == BF16 else pk.PLANES
    for planes in all_planes:
        plan = pk.forward_plan(geom, {"forward": dict(kernel="pairs", planes=planes)},
                               dtype=dtype)
        assert plan["kernel"] == "max_pool2d_forward_pairs"
        out, offsets = run_forward(lib, x, geom, "int", grid, block, plan)  # aligned: fine
        assert np.array_equal(offsets, ref_offsets) and np.array_equal(out, ref_out)
        with pytest.raises(cuda_shim.KernelFault, match="misaligned address: load_pair"):
            run_forward(lib, bad_x, geom, "int", grid, block, plan)
    out, offsets = run_forward(lib, bad_x, geom, "int", grid, block,
                               pk.forward_plan(geom, {"forward": dict(kernel="generic")}))
    assert np.array_equal(offsets, ref_offsets) and np.array_equal(out, ref_out)

    name = expression("max_pool2d_backward_blocks", dtype, geom, "int", (2, 1, all_planes[-1]))
    for dx in (np.full(geom.input_shape, 1234.5, dtype), misaligned(np.zeros(x.shape, dtype))):
        args = (dout, ref_offsets, dx) + scalars(geom, "int")
        if dx.ctypes.data % (2 * dx.dtype.itemsize) == 0:
            lib.launch(name, grid, block, args)
            assert np.array_equal(dx, ref_dx)
        else:
            with pytest.raises(cuda_shim.KernelFault, match="misaligned address: store_pair"):
                lib.launch(name, grid, block, args)
    dx = misaligned(np.zeros(x.shape, dtype))
    lib.launch(expression("max_pool2d_backward_disjoint", dtype, geom, "int"), grid, block,
               (dout, ref_offsets, dx) + scalars(geom, "int"))
    assert np.array_equal(dx, ref_dx)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["2x2s2", "3x3s2p1", "3x3s2p1odd"])
def test_launchers_use_scalar_kernels_on_misaligned_pointers(shim_launchers, rng, name, dtype):
    """A contiguous x one element off alignment takes the generic forward kernel, a dx
    allocated so takes the element backward kernel (where W is even), with the default
    variant's launch knobs, and both match the NumPy path exactly; aligned arrays of the same
    geometry (the same cache entries but for alignment) still take the vector kernels."""
    cp = shim_launchers
    (H, W), pool_param = GEOMETRIES[name]
    x_np = make_input("ties", (2, 3, H, W), dtype, rng)
    geom = pool_geometry(x_np.shape, pool_param)
    dout_np = rng.standard_normal(geom.output_shape).astype(dtype)
    ref_out, ref_offsets = _max_pool_forward_xp(x_np, geom)
    ref_dx = _max_pool_backward_xp(dout_np, ref_offsets, geom)
    pairs = geom.kh == geom.kw == 2  # the geometries where the default plan reads pairs
    for aligned in (True, False, True):
        x = cp.on(x_np) if aligned else misaligned(x_np).view(FakeCupyArray)
        assert pk.pairs_aligned(x) == aligned and x.flags.c_contiguous
        del cp.launches[:]
        out, offsets = pk.max_pool_forward_gpu(x, geom)
        assert np.array_equal(offsets, ref_offsets) and np.array_equal(out, ref_out)
        cp.misaligned_empty = not aligned
        dx = pk.max_pool_backward_gpu(cp.on(dout_np), cp.on(ref_offsets), geom)
        cp.misaligned_empty = False
        assert pk.pairs_aligned(dx) == aligned
        assert np.array_equal(dx, ref_dx)
        (forward, _), (backward, _) = cp.launches
        assert ("max_pool2d_forward_pairs" in forward) == (pairs and aligned), forward
        assert ("max_pool2d_backward_blocks" in backward) == (aligned or W % 2 == 1), backward
        if not aligned:
            plan = pk.forward_plan(geom, aligned=False)
            assert plan["block"] == pk.VARIANT["forward"]["block"]
            assert plan["planes_per_step"] == pk.VARIANT["forward"]["planes"]


def test_bfloat16_has_the_default_variants_only():
    """bfloat16 instantiates the variant kernels of BF16_PLANES (the default variant's 4
    planes) only: its plans for another plane count run the default kernels, every plan's
    expression is instantiated, and the default variant still gets pairs / blocks (packed:
    the planes are smaller than the block)."""
    geom = pool_geometry((2, 3, 8, 6), dict(pool_height=2, pool_width=2, stride=2))
    fwd = pk.forward_plan(geom, dtype=BF16)
    bwd = pk.backward_plan(geom, dtype=BF16)
    assert (fwd["kernel"], fwd["params"]) == ("max_pool2d_forward_pairs", (4, "true"))
    assert (bwd["kernel"], bwd["params"]) == ("max_pool2d_backward_blocks", (2, 1, 4, "true"))
    for planes in (1, 2):
        fwd = pk.forward_plan(geom, {"forward": dict(planes=planes)}, dtype=BF16)
        bwd = pk.backward_plan(geom, {"backward": dict(planes=planes)}, dtype=BF16)
        assert (fwd["kernel"], fwd["params"], fwd["planes_per_step"]) == (
            "max_pool2d_forward", (), 1)
        assert (bwd["kernel"], bwd["params"]) == ("max_pool2d_backward_disjoint", ())
    assert sum("__nv_bfloat16" in e for e in pk.NAME_EXPRESSIONS) == 3 * 3 * 2 + 7 * 2 + 7 * 2
    assert pk.forward_plan(geom, {"forward": dict(planes=2)})["planes_per_step"] == 2


def test_plans_fall_back_for_unaligned_pointers():
    geom = pool_geometry((2, 3, 8, 6), dict(pool_height=2, pool_width=2, stride=2))
    fwd = pk.forward_plan(geom, {"forward": dict(kernel="pairs", taps=2, planes=2, block=64)},
                          aligned=False)
    assert (fwd["kernel"], fwd["params"], fwd["block"]) == ("max_pool2d_forward", (2, 2), 64)
    bwd = pk.backward_plan(geom, {"backward": dict(kernel="blocks", planes=4)}, aligned=False)
    assert (bwd["kernel"], bwd["params"]) == ("max_pool2d_backward_disjoint", (4, "true"))
    odd = pool_geometry((2, 3, 9, 7), dict(pool_height=3, pool_width=3, stride=2, pad=1))
    bwd = pk.backward_plan(odd, {"backward": dict(kernel="blocks", planes=4)}, aligned=False)
    assert bwd["kernel"] == "max_pool2d_backward_blocks"  # odd W: dx goes out element-wise


def test_launchers_run_on_the_arrays_device(shim_launchers, rng):
    """Inputs on device 1 while device 0 is current: outputs are allocated on device 1, the
    kernels are compiled for and launched on device 1 (the prepared launch is cached per
    device, not per current device), and device 0 is current again afterwards; inputs on
    the current device switch nothing."""
    cp = shim_launchers
    x_np = make_input("ties", (2, 3, 11, 10), np.float32, rng)
    geom = pool_geometry(x_np.shape, GEOMETRIES["3x3s2p1"][1])
    dout_np = rng.standard_normal(geom.output_shape).astype(np.float32)
    ref_out, ref_offsets = _max_pool_forward_xp(x_np, geom)
    ref_dx = _max_pool_backward_xp(dout_np, ref_offsets, geom)
    for device_id, current in ((0, 0), (1, 0), (1, 1), (0, 1)):
        cp.current = device_id
        x = cp.on(x_np.swapaxes(2, 3)).swapaxes(2, 3)  # strided: copied by the launcher
        dout = cp.on(dout_np)
        cp.current = current
        del cp.kernels[:], cp.launches[:], cp.switches[:]
        out, offsets = pk.max_pool_forward_gpu(x, geom)
        dx = pk.max_pool_backward_gpu(dout, offsets, geom)
        assert np.array_equal(out, ref_out) and np.array_equal(offsets, ref_offsets)
        assert np.array_equal(dx, ref_dx)
        assert out.device_id == offsets.device_id == dx.device_id == device_id
        assert cp.current == current
        assert cp.switches == ([] if device_id == current else [device_id, device_id])
        assert [d for _, d in cp.launches] == [device_id, device_id]
        first_on_device = current == 0  # (1, 1) and (0, 1) reuse the cache of (1, 0), (0, 0)
        assert [d for _, d in cp.kernels] == ([device_id] * 2 if first_on_device else [])


def test_launchers_reject_arrays_on_two_devices(shim_launchers, rng):
    cp = shim_launchers
    x = cp.on(make_input("random", (2, 3, 8, 6), np.float32, rng))
    geom = pool_geometry(x.shape, GEOMETRIES["2x2s2"][1])
    out, offsets = pk.max_pool_forward_gpu(x, geom)
    dout = cp.on(out, device_id=1)
    del cp.launches[:]
    with pytest.raises(ValueError, match=r"dout \(2, 3, 4, 3\) on device 1, "
                                         r"offsets \(2, 3, 4, 3\) on device 0"):
        pk.max_pool_backward_gpu(dout, offsets, geom)
    assert cp.launches == []


# ---------------------------------------------------------------- launcher helpers, no data

def fake_geometry(N, C, H, W, k=2, s=2, p=0):
    """A PoolGeometry without an array behind it, for sizes too large to allocate."""
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    return PoolGeometry.from_2d(N, C, H, W, k, k, s, s, p, p, 1, 1, False, Ho, Wo)


@pytest.mark.parametrize("geom, expected", [
    (fake_geometry(1, 1, 8, 8), "int"),
    (fake_geometry(2**15, 2**8, 2**4, 2**4 - 1), "int"),            # 2**31 - 2**27 elements
    (fake_geometry(2**16 - 1, 2**8, 2**3, 2**4), "int"),            # 2**31 - 2**15
    (fake_geometry(2**16, 2**8, 2**3, 2**4), "long long"),          # exactly 2**31
    (fake_geometry(2**20, 2**10, 2**4, 2**4), "long long"),         # 2**38
    (fake_geometry(2**15, 2**8, 15, 15, k=2, s=1, p=1), "long long"),  # input < 2**31 = output
], ids=["small", "below", "just-below", "2**31", "2**38", "output-larger"])
def test_index_type(geom, expected):
    assert pk.index_type(geom) == expected
    planes = pk.scalar_args(geom)[0]
    assert planes.dtype == pk.INDEX_TYPES[expected] and int(planes) == geom.N * geom.C


def test_output_larger_than_input_geometry():
    geom = fake_geometry(2**15, 2**8, 15, 15, k=2, s=1, p=1)
    assert geom.N * geom.C * geom.H * geom.W < 2**31 <= geom.N * geom.C * geom.Ho * geom.Wo


def test_scalar_args_have_exact_c_types():
    args = pk.scalar_args(fake_geometry(2, 3, 9, 8, k=3, s=2, p=1))
    assert [type(a) for a in args] == [np.int32] * 13
    assert [int(a) for a in args] == [6, 9, 8, 5, 4, 3, 3, 2, 2, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="below 2\\*\\*31"):
        pk.scalar_args(fake_geometry(1, 1, 1, 2**31))


def test_scalar_args_keep_padded_sizes_in_int():
    """The kernels form padded positions (h + ph, window starts) in int: a size of 2**31 - 1
    is taken with no padding, refused once the padding takes it to 2**31 or more."""
    edge = fake_geometry(1, 1, 1, 2**31 - 1, k=1, s=1)
    assert pk.index_type(edge) == "int" and int(pk.scalar_args(edge)[2]) == 2**31 - 1
    for geom in (fake_geometry(1, 1, 1, 2**31 - 2, k=3, s=1, p=1),
                 fake_geometry(1, 1, 2**31 - 2, 1, k=3, s=1, p=1)):
        assert max(geom.H, geom.W, geom.Ho, geom.Wo) < 2**31
        with pytest.raises(ValueError, match="padded sizes below 2\\*\\*31"):
            pk.scalar_args(geom)


def test_every_kernel_expression_is_instantiated():
    for dtype in pk.VALUE_TYPES:
        for geom in (fake_geometry(1, 1, 8, 8), fake_geometry(1, 1, 300, 300, k=20, s=20),
                     fake_geometry(2**16, 2**8, 2**3, 2**4, k=300, s=300),
                     fake_geometry(2**16, 2**8, 2**3, 2**4, k=3, s=2, p=1)):
            for kernel in pk.KERNELS:
                assert pk.kernel_expression(kernel, dtype, geom) in pk.NAME_EXPRESSIONS
            for variant in FORWARD_VARIANTS + BACKWARD_VARIANTS:
                pass_ = "forward" if "taps" in variant else "backward"
                plan = (pk.forward_plan if "taps" in variant else pk.backward_plan)(
                    geom, {pass_: variant}, dtype=dtype)
                expression = pk.kernel_expression(plan["kernel"], dtype, geom, plan["params"])
                assert expression in pk.compile_group(expression)
    with pytest.raises(TypeError, match="int32"):
        pk.kernel_expression(pk.KERNELS[0], np.int32, fake_geometry(1, 1, 8, 8))


@pytest.mark.parametrize("plane, planes, sm_count", [
    (3136, 32768, 132), (12544, 16384, 132), (1, 1, 132), (5, 10**6, 8), (2**31 - 1, 1, 132)])
@pytest.mark.parametrize("block, blocks_per_sm, per_step", [
    (256, 32, 1), (128, None, 1), (1024, 8, 4), (512, 1, 2)])
def test_launch_config(plane, planes, sm_count, block, blocks_per_sm, per_step):
    for packed in (False, True):
        (gx, gy, gz), threads = pk.launch_config(plane, planes, sm_count, block, blocks_per_sm,
                                                 per_step, packed=packed)
        assert threads == (block, 1, 1) and gz == 1
        assert gx * block >= min(plane, 2**29)  # grid-stride covers the rest
        assert gx * block < 2**31
        runs = -(-planes // per_step)
        if packed:
            runs = -(-runs // pk.plane_slots(plane, block))
        assert 1 <= gy <= min(runs, 65535)
        if blocks_per_sm is None:
            assert gy == min(runs, 65535)
    if plane >= block:  # large planes: the launch shape of one plane per block
        assert pk.launch_config(plane, planes, sm_count, block, blocks_per_sm, per_step,
                                packed=True) == pk.launch_config(plane, planes, sm_count, block,
                                                                 blocks_per_sm, per_step)


# ---------------------------------------------------------------- scripts/tune_pool.py, no GPU

def test_tune_pool_script_through_the_shim(lib, monkeypatch, tmp_path, capsys):
    """scripts/tune_pool.py end to end on tiny cases: every variant verified and timed, a broken
    variant reported, the JSON written."""
    import importlib.util
    path = Path(__file__).parents[1] / "scripts" / "tune_pool.py"
    spec = importlib.util.spec_from_file_location("tune_pool", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    monkeypatch.setattr(tune, "CASES", {
        name: (pass_, (2, 3) + ((12, 10) if "3x3" in name else (8, 6)), dtype, pool_param)
        for name, (pass_, shape, dtype, pool_param) in tune.CASES.items()
        if "float16" not in dtype or cuda_shim.has_half()})
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy())
    monkeypatch.setattr(tune.harness, "copy_bandwidth", lambda xp, nbytes, reps=15: (1.0, {}))

    def get_kernel(source, expression, group, device_id=None):
        assert expression in group and device_id in (None, 0)
        if "pairs" in expression and "float" in expression and expression.endswith(", 1>"):
            raise RuntimeError("broken on purpose")  # a variant, not the default (4 planes)
        return lambda grid, block, args: lib.launch(expression, grid, block, args)
    monkeypatch.setattr(pk.cuda_compile, "get_kernel", get_kernel)
    monkeypatch.setattr(pk.cuda_compile, "launch",
                        lambda function, name, grid, block, args, device_id=None:
                        function(grid, block, args))
    pk._sm_count.cache_clear()
    pk._prepared.cache_clear()
    monkeypatch.setenv("OUT", str(tmp_path))
    try:
        rc = tune.main(["--reps", "2", "--warmup", "1", "--blocks", "32,64", "--no-torch",
                        "--cases", ",".join(tune.CASES)])
    finally:
        pk._sm_count.cache_clear()
        pk._prepared.cache_clear()
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "tune_pool.json").read_text())
    assert [c["case"] for c in doc["cases"]] == list(tune.CASES)
    for case in doc["cases"]:
        statuses = {r["label"]: r["status"] for r in case["rows"]}
        broken = {k for k, v in statuses.items() if v.startswith("ERROR")}
        assert broken == ({k for k in statuses if k.startswith("pairs") and " p1 " in k}
                          if case["case"].startswith("fwd-2x2-f32") else set()), statuses
        assert all(v == "ok" for k, v in statuses.items() if k not in broken), statuses
        assert case["best"] and case["default_ms"] > 0
        assert len([r for r in case["rows"] if "ms" in r]) >= 8
    assert "winners" in out and "one forward default" in out


# --------------------------------------------- small planes share thread blocks (issue 13 §4)

P33 = dict(pool_height=3, pool_width=3, stride=2, pad=1)
P22 = dict(pool_height=2, pool_width=2, stride=2)

# The shapes (256, 512, 14, 14), (256, 2048, 7, 7), (1024, 64, 8, 8) with N*C scaled
# down (same planes; N*C leaves the last run of planes partial), and awkward planes: 1x1, 3x5,
# planes of 64 and 65 positions (64-thread blocks below: plane == block, just over a block).
SMALL_PLANES = {
    "14x14-3x3s2p1": ((2, 23, 14, 14), P33), "14x14-2x2s2": ((2, 23, 14, 14), P22),
    "7x7-3x3s2p1": ((3, 13, 7, 7), P33), "7x7-2x2s2": ((3, 13, 7, 7), P22),
    "8x8-3x3s2p1": ((5, 9, 8, 8), P33), "8x8-2x2s2": ((5, 9, 8, 8), P22),
    "1x1-2x2s2": ((3, 7, 2, 2), P22), "1x1in-3x3s2p1": ((3, 7, 1, 1), P33),
    "3x5-2x2s2": ((2, 9, 6, 10), P22), "3x5-3x3s2p1": ((2, 9, 5, 9), P33),
    "64-2x2s2": ((2, 5, 16, 16), P22), "65-2x2s2": ((2, 5, 10, 26), P22),
    "65-3x3s1p1": ((1, 3, 5, 13), dict(pool_height=3, pool_width=3, stride=1, pad=1)),
}
THREE_SHAPES = [(256, 512, 14, 14), (256, 2048, 7, 7), (1024, 64, 8, 8)]


@pytest.fixture(scope="module")
def lib_one_plane():
    """maxpool.cu built with GPULAYERS_MAXPOOL_ONE_PLANE_PER_BLOCK: every plane in its own
    blocks, the launch layout before planes shared blocks ("today's kernels")."""
    expressions = [e for e in pk.NAME_EXPRESSIONS if "__half" not in e or cuda_shim.has_half()]
    with resources.as_file(resources.files("gpulayers.cuda") / pk.SOURCE) as path:
        return cuda_shim.build(path, expressions, defines=["GPULAYERS_MAXPOOL_ONE_PLANE_PER_BLOCK"])


def walk_threads(plane, planes, grid, block, per_step):
    """Python copy of maxpool.cu's walk(): {(plane, position): visits} over every thread of the
    launch, and how many threads have work."""
    (gx, gy, _), (bx, _, _) = grid, block
    shared = plane < bx
    slots = bx // plane if shared else 1
    visits, busy = {}, 0
    for by, bxi, t in itertools.product(range(gy), range(gx), range(bx)):
        slot = t // plane if shared else 0
        p = bxi * bx + t - slot * plane if slot < slots else plane
        nc = (by * slots + slot) * per_step
        busy += p < plane and nc < planes
        while p < plane:
            g = nc
            while g < planes:
                for u in range(per_step):
                    if g + u < planes:
                        visits[g + u, p] = visits.get((g + u, p), 0) + 1
                g += gy * slots * per_step
            p += bx * gx
    return visits, busy


@pytest.mark.parametrize("plane, planes, block, per_step", [
    (49, 46, 256, 4), (16, 37, 256, 4), (9, 100, 256, 2), (1, 7, 64, 1), (15, 18, 64, 4),
    (64, 10, 64, 4), (65, 10, 64, 2), (65, 10, 128, 1), (33, 5, 100, 1), (6, 12, 7, 4)])
def test_walk_visits_every_element_once(plane, planes, block, per_step):
    """The layout: each (plane, position) pair visited by exactly one thread, for the packed
    launch, a grid with one y block (plane runs wrap) and one larger than the work; and
    busy_threads counts the threads with work."""
    for grid, threads in (pk.launch_config(plane, planes, 1, block, None, per_step, packed=True),
                          pk.launch_config(plane, planes, 1, block, 1, per_step, packed=True),
                          ((3, planes + 2, 1), (block, 1, 1))):
        visits, busy = walk_threads(plane, planes, grid, threads, per_step)
        assert sorted(visits) == list(itertools.product(range(planes), range(plane)))
        assert set(visits.values()) == {1}, (grid, threads)
        assert pk.busy_threads(plane, planes, grid, threads, per_step) == busy


def _one_plane_utilisation(geom, pass_, dtype, aligned=True):
    """Share of busy threads of the launch before planes shared blocks (same plan)."""
    plan = (pk.forward_plan if pass_ == "forward" else pk.backward_plan)(
        geom, aligned=aligned, dtype=dtype)
    planes, plane = geom.N * geom.C, plan["plane"]
    (gx, gy, _), (bx, _, _) = pk.launch_config(plane, planes, 132, plan["block"],
                                               plan["blocks_per_sm"], plan["planes_per_step"])
    groups = -(-planes // plan["planes_per_step"])
    return min(gx * bx, plane) * min(gy, groups) / (gx * gy * bx)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("pool", ["3x3s2p1", "2x2s2"])
@pytest.mark.parametrize("shape", THREE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_small_planes_keep_three_quarters_of_the_threads_busy(shape, pool, dtype):
    """Issue 13 §4: at least 75% of the launched threads have work on the small-plane shapes,
    forward and backward, with the default variant (and with the element backward kernels
    that a misaligned dx gets); one plane per block had 3.5% to 19%."""
    geom = pool_geometry(shape, P33 if pool == "3x3s2p1" else P22)
    for pass_ in ("forward", "backward"):
        for aligned in (True, False):
            share = pk.thread_utilisation(geom, pass_, dtype=dtype, aligned=aligned)
            assert share >= 0.75, (pass_, aligned, share)
            plan = (pk.forward_plan if pass_ == "forward" else pk.backward_plan)(
                geom, aligned=aligned, dtype=dtype)
            assert plan["packed"] and plan["params"][-1] == "true", plan
        assert _one_plane_utilisation(geom, pass_, dtype) < 0.2


@pytest.mark.parametrize("shape", [(256, 64, 112, 112), (128, 128, 112, 112), (32, 64, 56, 56),
                                   (32, 64, 112, 112)])
def test_large_planes_keep_the_tuned_launch_shapes(shape):
    """Planes of a block or more: the launch of one plane per block, unchanged."""
    for pool_param in (P33, P22):
        geom = pool_geometry(shape, pool_param)
        for plan in (pk.forward_plan(geom), pk.backward_plan(geom)):
            assert plan["plane"] >= plan["block"]
            assert not plan["packed"] and "true" not in plan["params"], plan
            args = (plan["plane"], geom.N * geom.C, 132, plan["block"], plan["blocks_per_sm"],
                    plan["planes_per_step"])
            assert pk.launch_config(*args, packed=True) == pk.launch_config(*args)
    geom = pool_geometry((256, 64, 112, 112), P33)
    assert pk.launch_config(56 * 56, 256 * 64, 132, 256, 32, 4, packed=True) == (
        (13, 325, 1), (256, 1, 1))
    assert pk.thread_utilisation(geom, "forward") == pytest.approx(3136 / (13 * 256))


def small_plane_launches(plan, planes):
    """The launcher's own launch (one SM, the plan's blocks_per_sm), the same with one y block
    (plane runs wrap), 64- and 128-thread blocks (plane == block, just over one), and a
    33-thread block on a grid larger than the work."""
    plane, per_step = plan["plane"], plan["planes_per_step"]
    yield pk.launch_config(plane, planes, 1, plan["block"], plan["blocks_per_sm"], per_step,
                           packed=plan["packed"])
    yield pk.launch_config(plane, planes, 1, plan["block"], 1, per_step, packed=plan["packed"])
    for block in (64, 128):
        yield pk.launch_config(plane, planes, 1, block, None, per_step, packed=True)
    yield (-(-plane // 33) + 1, planes + 2, 1), (33, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", SMALL_PLANES)
def test_small_planes_match_references_and_one_plane_per_block(lib, lib_one_plane, rng, name,
                                                               dtype):
    """Planes sharing blocks: every kernel variant that serves the geometry, both index
    types, several launches; outputs bitwise equal to the loop references and to the same
    kernels with one plane per block (the layout before) under the same launch."""
    shape, pool_param = SMALL_PLANES[name]
    geom = pool_geometry(shape, pool_param)
    planes = geom.N * geom.C
    plans = dict(variant_plans(geom, dtype))
    for pass_, plan_of in (("forward", pk.forward_plan), ("backward", pk.backward_plan)):
        for aligned in (True, False):
            plan = plan_of(geom, aligned=aligned, dtype=dtype)
            plans[pass_, plan["kernel"], plan["params"]] = plan
    for kind in ("ties", "nan"):
        x = make_input(kind, geom.input_shape, dtype, rng)
        dout = rng.standard_normal(geom.output_shape).astype(dtype)
        ref_out, ref_offsets = reference_forward(x, geom)
        ref_dx = reference_backward(dout, ref_offsets, geom)
        for (pass_, kernel, params), plan in plans.items():
            for index in pk.INDEX_TYPES:
                for grid, block in small_plane_launches(plan, planes):
                    where = (f"{kernel}{list(params)}, {geom.describe()}, {kind}, {index}, "
                             f"grid {grid}, block {block}")
                    # the plan's kernel, the same with one plane per block, and for a packed
                    # plan the unpacked kernel (Packed = false, what large planes run)
                    runs = [(lib, plan), (lib_one_plane, plan)]
                    if plan["packed"]:
                        runs.append((lib, dict(plan, params=plan["params"][:-1], packed=False)))
                    for library, run_plan in runs:
                        if pass_ == "forward":
                            out, offsets = run_forward(library, x, geom, index, grid, block,
                                                       run_plan)
                            assert np.array_equal(offsets, ref_offsets), f"offsets: {where}"
                            assert_same_values(out, ref_out, f"out: {where}")
                        else:
                            dx = run_backward(library, dout, ref_offsets, geom, index, grid,
                                              block, run_plan)
                            assert np.array_equal(dx, ref_dx), f"dx differs: {where}"


@pytest.mark.parametrize("name", ["14x14-3x3s2p1", "7x7-2x2s2", "8x8-2x2s2", "3x5-3x3s2p1"])
def test_small_planes_through_the_launchers(shim_launchers, rng, name):
    """The launchers end to end on small planes (packed launches, float32, strided x)."""
    cp = shim_launchers
    shape, pool_param = SMALL_PLANES[name]
    x_np = make_input("nan", shape, np.float32, rng)
    geom = pool_geometry(shape, pool_param)
    dout_np = rng.standard_normal(geom.output_shape).astype(np.float32)
    ref_out, ref_offsets = _max_pool_forward_xp(x_np, geom)
    x = cp.on(x_np.swapaxes(2, 3)).swapaxes(2, 3)
    for _ in range(2):  # the first call fills the launch cache, the second uses it
        out, offsets = pk.max_pool_forward_gpu(x, geom)
        assert np.array_equal(offsets, ref_offsets)
        assert_same_values(out, ref_out, name)
        dx = pk.max_pool_backward_gpu(cp.on(dout_np), offsets, geom)
        assert np.array_equal(dx, _max_pool_backward_xp(dout_np, ref_offsets, geom))


# ------------------------------------------------------- launcher per-call cost (issue 13 §1)

def test_launchers_see_every_variant_change(shim_launchers, rng, monkeypatch):
    """Warmed calls make one cache lookup keyed by the current VARIANT: a knob changed in
    place, a knob dict replaced by a plain dict (and that dict changed), and a variant=
    argument each take effect on the next call; restoring them brings the old kernels back."""
    cp = shim_launchers
    x_np = make_input("ties", (2, 3, 8, 6), np.float32, rng)
    geom = pool_geometry(x_np.shape, P22)
    ref_out, ref_offsets = _max_pool_forward_xp(x_np, geom)
    x = cp.on(x_np)

    def forward_kernel(variant=None):
        del cp.launches[:]
        out, offsets = pk.max_pool_forward_gpu(x, geom, variant)
        assert np.array_equal(out, ref_out) and np.array_equal(offsets, ref_offsets)
        (name, _), = cp.launches
        return name

    assert forward_kernel().startswith("max_pool2d_forward_pairs") and forward_kernel().endswith(
        ", 4, true>")  # packed: the planes are smaller than a block
    kernels = len(cp.kernels)
    forward_kernel()
    assert len(cp.kernels) == kernels  # warmed: no get_kernel
    with monkeypatch.context() as m:
        m.setitem(pk.VARIANT["forward"], "planes", 2)
        assert forward_kernel().endswith(", 2>")
        m.setitem(pk.VARIANT["forward"], "kernel", "generic")
        assert forward_kernel() == "max_pool2d_forward<float, unsigned char, int, 2, 2>"
        plain = dict(pk.VARIANT["forward"])
        m.setitem(pk.VARIANT, "forward", plain)
        assert forward_kernel() == "max_pool2d_forward<float, unsigned char, int, 2, 2>"
        plain["taps"] = 3
        assert forward_kernel() == "max_pool2d_forward<float, unsigned char, int, 3, 2>"
        assert forward_kernel({"forward": {"planes": 1}}) == (
            "max_pool2d_forward<float, unsigned char, int>")
    kernels = len(cp.kernels)
    assert forward_kernel().startswith("max_pool2d_forward_pairs")
    assert len(cp.kernels) == kernels + 1  # planned once more: the key counts changes
    forward_kernel()
    assert len(cp.kernels) == kernels + 1
    dout = cp.on(rng.standard_normal(geom.output_shape).astype(np.float32))
    for variant in (None, {"backward": {"kernel": "element"}}):
        del cp.launches[:]
        dx = pk.max_pool_backward_gpu(dout, cp.on(ref_offsets), geom, variant)
        assert np.array_equal(dx, _max_pool_backward_xp(np.asarray(dout), ref_offsets, geom))
        assert ("blocks" in cp.launches[0][0]) == (variant is None)


def test_variant_knobs_count_their_changes():
    knobs = pk._Knobs(a=1)
    mutations = [lambda: knobs.__setitem__("b", 2), lambda: knobs.__delitem__("b"),
                 lambda: knobs.update(c=3), lambda: knobs.setdefault("d", 4),
                 lambda: knobs.pop("d"), lambda: knobs.popitem(), lambda: knobs.__ior__({"e": 5}),
                 lambda: knobs.clear()]
    for mutate in mutations:
        before = pk._Knobs.changes
        mutate()
        assert pk._Knobs.changes > before
    assert knobs == {} and isinstance(pk.VARIANT["forward"], pk._Knobs)
    assert pk.VARIANT == pk.DEFAULT_VARIANT


class NullArray:
    """A do-nothing CuPy array: shape, dtype, data.ptr, device.id and nothing behind them."""

    __slots__ = ("shape", "dtype", "data", "device")
    _device = types.SimpleNamespace(id=0)
    _data = types.SimpleNamespace(ptr=1 << 20)

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.data, self.device = self._data, self._device


class NullCupy:
    """A do-nothing cupy for timing the launchers' own Python: arrays are NullArray, every
    one contiguous, on device 0, aligned; nothing is allocated or launched."""

    ndarray = NullArray
    cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0))

    @staticmethod
    def empty(shape, dtype=np.float64):
        return NullArray(shape, dtype)

    @staticmethod
    def ascontiguousarray(a):
        return a


def _per_call_us(fn, calls=3000, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def test_launcher_per_call_cost(monkeypatch, capsys):
    """Micro-benchmark, no timing assertions (``pytest -s`` prints it): µs per warmed call of
    max_pool_forward_gpu / max_pool_backward_gpu with a do-nothing cupy and kernel, i.e. the
    launchers' own Python plus compile.launch; against the checked path that a first call
    takes (_forward / _backward: every check, then the cache). A warmed call compiles
    nothing and plans nothing."""
    monkeypatch.setitem(sys.modules, "cupy", NullCupy())
    launched = []
    monkeypatch.setattr(pk.cuda_compile, "get_kernel",
                        lambda source, expression, group, device_id=None:
                        lambda grid, block, args: launched.append(len(args)))
    monkeypatch.setattr(pk, "_sm_count", lambda device_id: 132)
    pk._prepared.cache_clear()
    try:
        rows = []
        for shape, pool_param in (((32, 64, 56, 56), P33), ((256, 512, 14, 14), P22)):
            geom = pool_geometry(shape, pool_param)
            x = NullArray(shape, np.float32)
            out, offsets = pk.max_pool_forward_gpu(x, geom)
            offsets = NullArray(offsets.shape, geom.offset_dtype)
            pk.max_pool_backward_gpu(out, offsets, geom)
            plans = [len(call.launches) for call in pk._prepared.values()]
            del launched[:]
            planned = monkeypatch.context()
            with planned as m:
                m.setattr(pk, "_plan_launch", lambda *a: pytest.fail("a warmed call planned"))
                fwd = _per_call_us(lambda: pk.max_pool_forward_gpu(x, geom))
                bwd = _per_call_us(lambda: pk.max_pool_backward_gpu(out, offsets, geom))
            assert launched and set(launched) == {16}
            fwd_checked = _per_call_us(lambda: pk._forward(x, geom, None), calls=1000)
            bwd_checked = _per_call_us(lambda: pk._backward(out, offsets, geom, None),
                                       calls=1000)
            rows.append((shape, fwd, bwd, fwd_checked, bwd_checked))
            assert plans
    finally:
        pk._prepared.cache_clear()
    with capsys.disabled():
        print("\nmax-pool launchers, µs per warmed call (do-nothing cupy and kernel; "
              "checked path in brackets)")
        for shape, fwd, bwd, fwd_checked, bwd_checked in rows:
            print(f"  {str(shape):<20} forward {fwd:6.2f} ({fwd_checked:6.2f})  "
                  f"backward {bwd:6.2f} ({bwd_checked:6.2f})")


def test_packed_kernels_only_where_planes_are_smaller_than_the_block():
    """Packed is a compile-time choice: NAME_EXPRESSIONS holds packed instantiations ('true'
    last) of PACKED_KERNELS only; every plan takes one exactly when its plane is smaller
    than its block and its kernel has one; large planes keep the unpacked expressions."""
    packed = [e for e in pk.NAME_EXPRESSIONS if e.endswith(", true>")]
    assert len(packed) == len(pk.PACKED_KERNELS) * len(pk.VALUE_TYPES) * len(pk.INDEX_TYPES)
    assert all(e.replace(", true>", ">") in pk.NAME_EXPRESSIONS for e in packed)
    for shape in [(2, 3, 14, 14), (2, 3, 112, 112), (2, 3, 32, 32), (2, 3, 31, 31)]:
        for pool_param in (P33, P22):
            geom = pool_geometry(shape, pool_param)
            for dtype in DTYPES:
                for variant in FORWARD_VARIANTS + BACKWARD_VARIANTS:
                    pass_ = "forward" if "taps" in variant else "backward"
                    for aligned in (True, False):
                        plan = (pk.forward_plan if pass_ == "forward" else pk.backward_plan)(
                            geom, {pass_: variant}, aligned=aligned, dtype=dtype)
                        params = plan["params"]
                        base = params[:-1] if plan["packed"] else params
                        assert plan["packed"] == (plan["plane"] < plan["block"] and (
                            plan["kernel"], base) in pk.PACKED_KERNELS), plan
                        assert ("true" in params) == plan["packed"]
                        assert pk.kernel_expression(plan["kernel"], dtype, geom, params) in (
                            pk.NAME_EXPRESSIONS)
