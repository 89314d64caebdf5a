"""The exact pool_nd.cu source, run on the CPU through the host shim (tests/cuda_shim), through
pool_nd_kernels' own launchers over a stand-in for CuPy on NumPy.

Every kernel, for 1, 2 and 3 spatial axes, against brute-force loop references written here:
per window (or per output element) the taps in row-major order, per gradient the windows in
the kernels' documented order. The references compute in the kernels' accumulation dtype
(float64 for float64 data, float32 for float32 and float16), so results must agree bit for
bit (NaN-aware: NaN where the reference has NaN, the same bits elsewhere, signed zeros
included). Outputs are allocated poisoned, so an element a kernel skips fails; every case
runs with 32- and 64-bit indices and under launch grids smaller and larger than the work
(7- and 33-thread blocks), backward passes twice (bitwise repeatable), inputs strided (the
launchers copy them) and checked unchanged afterwards. bfloat16 (ml_dtypes) runs everywhere,
against references in float32 rounded to bfloat16 to nearest even.

Channels-last: every kernel also runs with ``channels_last=True`` on the transposed arrays,
(N, *spatial, C), contiguous and as transposed views, in three of the launch runs (the
launcher's grid with 32-bit indices, the small grid with 64-bit ones, the large grid), and
must give the channels-first kernels' results transposed, bit for bit (offsets and the
winners' elements too). The vectorised channels-last kernels (max and average pooling,
forward and backward) must give the scalar channels-last kernels' results bit for bit (the
backward ones also the brute-force references and the NumPy xp path), run only when C is a
multiple of the vector width and the arrays they access by vectors are aligned to it (the
stand-in's arrays are 64-byte aligned, as CuPy's), and fault on a misaligned array when
launched directly.
"""
import sys
import types
from importlib import resources
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gpulayers.cuda import instantiations
from gpulayers.cuda import pool_nd_kernels as nk
from gpulayers.shapes import (AdaptiveGeometry, PoolGeometry, adaptive_geometry,
                              pool_geometry)

sys.path.insert(0, str(Path(__file__).parent))  # tests/cuda_shim is a helper package here
import cuda_shim  # noqa: E402
from conftest import make_input  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_shim.compiler() is None,
                                reason="no C++ compiler (g++ or $CXX) for the CUDA host shim")

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, BF16] + ([np.float16] if cuda_shim.has_half() else [])
DTYPE_IDS = lambda d: np.dtype(d).name  # noqa: E731
DATA = ("random", "ties", "nan", "inf", "zeros")

# (input spatial size, pool_param) per case; ceil_mode cases with even sizes have windows that
# overhang the right padding; strides past the window leave inputs uncovered.
MAX_CASES = {
    "1d-k3s2p1": ((11,), dict(kernel_size=3, stride=2, pad=1)),
    "1d-k2s1p1d2ceil": ((10,), dict(kernel_size=2, stride=1, pad=1, dilation=2, ceil_mode=True)),
    "1d-k4s3p2ceil": ((9,), dict(kernel_size=4, stride=3, pad=2, ceil_mode=True)),
    "2d-k3s1p1": ((7, 9), dict(kernel_size=3, stride=1, pad=1)),
    "2d-k3x2p3x1d3x2": ((9, 8), dict(kernel_size=(3, 2), stride=1, pad=(3, 1),
                                     dilation=(3, 2))),
    "2d-k3s2ceil": ((10, 10), dict(kernel_size=3, stride=2, ceil_mode=True)),
    "2d-k2s3ceil": ((8, 8), dict(kernel_size=2, stride=3, ceil_mode=True)),
    "3d-k3s2p1": ((5, 6, 7), dict(kernel_size=3, stride=2, pad=1)),
    "3d-mixed-ceil": ((4, 5, 6), dict(kernel_size=(2, 3, 2), stride=(1, 2, 2), pad=(1, 1, 0),
                                      dilation=(2, 1, 1), ceil_mode=True)),
    "3d-k2s2": ((6, 5, 4), dict(kernel_size=2, stride=2)),
    "3d-k3x2x2s1d1x2x1": ((5, 5, 5), dict(kernel_size=(3, 2, 2), stride=1, pad=(1, 0, 1),
                                          dilation=(1, 2, 1))),
    "3d-uint16": ((5, 9, 10), dict(kernel_size=(4, 8, 9), stride=(1, 1, 2))),
}
AVG_CASES = {
    "1d-k3s2p1ceil": ((8,), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
    "1d-k4s1p2": ((7,), dict(kernel_size=4, stride=1, pad=2)),
    "2d-k3s2p1ceil": ((6, 8), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
    "2d-k2s2": ((8, 7), dict(kernel_size=2, stride=2)),
    "2d-k3x2s1x2p1ceil": ((6, 7), dict(kernel_size=(3, 2), stride=(1, 2), pad=1,
                                       ceil_mode=True)),
    "3d-k3s2p1ceil": ((6, 5, 8), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
    "3d-mixed": ((4, 5, 6), dict(kernel_size=(2, 3, 2), stride=(2, 1, 3), pad=(1, 1, 0))),
}
# (count_include_pad, divisor_override): PyTorch's default, in-range count, override, sum.
AVG_OPTIONS = [(True, None), (False, None), (True, 3), (False, 1)]
ADAPTIVE_CASES = {
    "1d-10to3": ((10,), 3), "1d-7to7": ((7,), 7), "1d-3to8": ((3,), 8), "1d-5to1": ((5,), 1),
    "1d-600to2-uint16": ((600,), 2),
    "2d-7x9to3x4": ((7, 9), (3, 4)), "2d-5x4to8x6": ((5, 4), (8, 6)),
    "2d-6x6to1": ((6, 6), 1), "2d-5x7to5x3": ((5, 7), (5, 3)),
    "3d-5x6x7to2x3x4": ((5, 6, 7), (2, 3, 4)), "3d-3x4x2to5x2x3": ((3, 4, 2), (5, 2, 3)),
    "3d-4to3": ((4, 4, 4), 3),
}
# (x spatial size, output spatial size): more outputs than inputs, fewer (many duplicates).
UNPOOL_CASES = {
    "1d": ((5,), (7,)), "1d-dups": ((9,), (3,)),
    "2d": ((3, 4), (4, 5)), "2d-dups": ((4, 4), (2, 3)),
    "3d": ((2, 3, 2), (3, 2, 2)), "3d-dups": ((2, 2, 3), (1, 2, 2)),
}


def acc_dtype(dtype):
    return np.dtype(np.float32) if np.dtype(dtype) in (np.float16, BF16) else np.dtype(dtype)


def is_float(a):
    return a.dtype.kind == "f" or a.dtype == BF16


def data(kind, shape, dtype, rng):
    """make_input's kinds (random, ties, nan) plus 'inf' (+-inf among small integers) and
    'zeros' (+0, -0 and a few +-1)."""
    if kind == "inf":
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
        x[rng.random(shape) < 0.25] = np.inf
        x[rng.random(shape) < 0.25] = -np.inf
        return x.astype(dtype)
    if kind == "zeros":
        x = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
        x[rng.random(shape) < 0.1] = rng.choice([-1.0, 1.0])
        return x.astype(dtype)
    return make_input(kind, shape, dtype, rng)


def assert_same(a, b, what):
    """NaN where b has NaN, the same bits elsewhere (signed zeros included)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs " \
                                                      f"{b.dtype}{b.shape}"
    nan = np.isnan(b.astype(np.float64)) if is_float(b) else np.zeros(b.shape, bool)
    if is_float(b):
        assert np.array_equal(np.isnan(a.astype(np.float64)), nan), f"{what}: NaN positions differ"
    uint = np.dtype(f"u{a.dtype.itemsize}")
    bad = (a.view(uint) != b.view(uint)) & ~nan
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements differ, first at "
                           f"{np.argwhere(bad)[0].tolist()}: {a[bad][:4]} vs {b[bad][:4]}")


# ------------------------------------------------------------------------ references

def pool_taps(geom):
    """[(window index tuple, [(compact offset, input position tuple)])]: every window's
    in-range taps in row-major order."""
    out = []
    for o in np.ndindex(*geom.out):
        taps = []
        for k, t in enumerate(np.ndindex(*geom.kernel)):
            pos = tuple(o[a] * geom.stride[a] - geom.pad[a] + t[a] * geom.dilation[a]
                        for a in range(geom.d))
            if all(0 <= pos[a] < geom.size[a] for a in range(geom.d)):
                taps.append((k, pos))
        out.append((o, taps))
    return out


def adaptive_taps(ageom):
    """As pool_taps for adaptive windows; offsets row-major over ageom.window."""
    out = []
    for o in np.ndindex(*ageom.out):
        start = [(o[a] * ageom.size[a]) // ageom.out[a] for a in range(ageom.d)]
        end = [-(-(o[a] + 1) * ageom.size[a] // ageom.out[a]) for a in range(ageom.d)]
        taps = [(int(np.ravel_multi_index(t, ageom.window)),
                 tuple(s + ti for s, ti in zip(start, t)))
                for t in np.ndindex(*[e - s for s, e in zip(start, end)])]
        out.append((o, taps))
    return out


def ix(pos):
    return (slice(None), slice(None)) + tuple(pos)


def ref_max_forward(x, windows, out_shape, offset_dtype):
    """Per window: PyTorch's rule over its taps in row-major order (compared in the
    accumulation dtype; the maximum converts back exactly)."""
    out = np.empty(out_shape, x.dtype)
    offsets = np.empty(out_shape, offset_dtype)
    xa = x.astype(acc_dtype(x.dtype))
    for o, taps in windows:
        best = np.full(x.shape[:2], -np.inf, xa.dtype)
        arg = np.full(x.shape[:2], -1)
        for k, pos in taps:
            v = xa[ix(pos)]
            take = (v > best) | np.isnan(v) | (arg < 0)
            best, arg = np.where(take, v, best), np.where(take, k, arg)
        out[ix(o)], offsets[ix(o)] = best.astype(x.dtype), arg
    return out, offsets


def ref_max_backward(dout, offsets, windows, in_shape, order):
    """dout added (in the accumulation dtype, from +0) to the tap each window's offset names;
    order 'taps': per dx element in ascending tap order (max pooling), 'windows': in
    ascending window order (adaptive)."""
    acc = acc_dtype(dout.dtype)
    dx = np.zeros(in_shape, acc)
    if order == "taps":
        ks = sorted({k for _, taps in windows for k, _ in taps})
        visits = [(o, k, pos) for k0 in ks for o, taps in windows for k, pos in taps if k == k0]
    else:
        visits = [(o, k, pos) for o, taps in windows for k, pos in taps]
    for o, k, pos in visits:
        hit = offsets[ix(o)] == k
        if hit.any():
            dx[ix(pos)] += np.where(hit, dout[ix(o)].astype(acc), acc.type(0))
    return dx.astype(dout.dtype)


def ref_avg_forward(x, windows, out_shape, divisor):
    acc = acc_dtype(x.dtype)
    out = np.empty(out_shape, x.dtype)
    with np.errstate(invalid="ignore"):  # inf - inf
        for o, taps in windows:
            total = np.zeros(x.shape[:2], acc)
            for _, pos in taps:
                total = total + x[ix(pos)].astype(acc)
            out[ix(o)] = (total / acc.type(divisor[o])).astype(x.dtype)
    return out


def ref_avg_backward(dout, windows, in_shape, divisor, order):
    acc = acc_dtype(dout.dtype)
    dx = np.zeros(in_shape, acc)
    if order == "taps":
        ks = sorted({k for _, taps in windows for k, _ in taps})
        visits = [(o, pos) for k0 in ks for o, taps in windows for k, pos in taps if k == k0]
    else:
        visits = [(o, pos) for o, taps in windows for k, pos in taps]
    for o, pos in visits:
        dx[ix(pos)] += dout[ix(o)].astype(acc) / acc.type(divisor[o])
    return dx.astype(dout.dtype)


def avg_divisors(geom, count_include_pad, divisor_override):
    """{window: PyTorch's avg_pool divisor}."""
    out = {}
    for o in np.ndindex(*geom.out):
        full = inside = 1
        for a in range(geom.d):
            start = o[a] * geom.stride[a] - geom.pad[a]
            end = min(start + geom.kernel[a], geom.size[a] + geom.pad[a])
            full *= end - start
            inside *= min(end, geom.size[a]) - max(start, 0)
        out[o] = divisor_override or (full if count_include_pad else inside)
    return out


def ref_unpool(x, indices, out_shape):
    """(out, won): each plane's inputs written in row-major order (the last wins)."""
    planes = x.shape[0] * x.shape[1]
    xs, idx = x.reshape(planes, -1), indices.reshape(planes, -1).astype(np.int64)
    out = np.zeros((planes, int(np.prod(out_shape[2:]))), x.dtype)
    winner = np.full(out.shape, -1)
    for p in range(planes):
        for i in range(xs.shape[1]):
            out[p, idx[p, i]] = xs[p, i]
            winner[p, idx[p, i]] = i
    won = np.zeros(xs.shape, bool)
    for p in range(planes):
        won[p, winner[p][winner[p] >= 0]] = True
    return out.reshape(out_shape), won.reshape(x.shape)


def ref_unpool_backward(dout, indices, won):
    planes = dout.shape[0] * dout.shape[1]
    d, idx = dout.reshape(planes, -1), indices.reshape(planes, -1).astype(np.int64)
    g = np.take_along_axis(d, idx, axis=1).reshape(indices.shape)
    return np.where(won, g, dout.dtype.type(0))


# -------------------------------------------------------------- CuPy stand-in + shim

class FakeArray(np.ndarray):
    """NumPy array standing in for cupy.ndarray: ``.device.id`` and ``.data.ptr``."""

    device_id = 0

    def __array_finalize__(self, obj):
        self.device_id = getattr(obj, "device_id", 0)

    @property
    def device(self):
        return types.SimpleNamespace(id=self.device_id)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


class FakeCupy:
    """cupy on NumPy with ``devices`` fake devices: arrays are FakeArray on the current device;
    ``cuda.Device(i)`` makes device i current while entered (entries recorded in
    ``switches``); empty returns poisoned arrays (0xA5 bytes)."""

    ndarray = FakeArray

    def __init__(self, devices=2):
        self.current, self.switches = 0, []
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

        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: devices, getDevice=lambda: fake.current,
            getDeviceProperties=lambda i: {"multiProcessorCount": 2})
        self.cuda = types.SimpleNamespace(runtime=runtime, Device=Device)

    def on(self, a, device_id=None):
        a = np.asarray(a)
        out = self.empty(a.shape, a.dtype)
        out[...] = a
        out.device_id = self.current if device_id is None else device_id
        return out

    def empty(self, shape, dtype=np.float64):
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.empty(n + 64, np.uint8)  # 64-byte aligned, as CuPy's allocations
        start = -raw.ctypes.data % 64
        a = raw[start:start + n].view(dtype).reshape(shape)
        a.reshape(-1).view(np.uint8)[:] = 0xA5
        out = a.view(FakeArray)
        out.device_id = self.current
        return out

    def full(self, shape, value, dtype=np.float64):
        out = self.empty(shape, dtype)
        out[...] = value
        return out

    def ascontiguousarray(self, a):
        return a if a.flags.c_contiguous else self.on(a)


@pytest.fixture(scope="module")
def lib():
    """pool_nd.cu built for the CPU with every instantiation the shim can run."""
    expressions = [e for e in nk.NAME_EXPRESSIONS if "__half" not in e or cuda_shim.has_half()]
    with resources.as_file(resources.files("gpulayers.cuda") / nk.SOURCE) as path:
        return cuda_shim.build(path, expressions)


# (index type, launch): the launcher's own grid, a grid smaller than the work (7-thread
# blocks, so positions and planes wrap), and one larger than the work (33-thread blocks).
RUNS = (("int", "own"), ("long long", "small"), ("int", "large"), ("long long", "own"))


def _clear_caches():
    for f in (nk._sm_count, nk._prepared, nk._pool_plan, nk._adaptive_plan):
        f.cache_clear()


@pytest.fixture
def cp(lib, monkeypatch):
    """pool_nd_kernels' launchers over a FakeCupy (the fixture's value), running the shim
    build. get_kernel records (expression, group, device_id) in ``kernels``; launch checks
    that every array is on the current device, records (expression, device_id) in
    ``launches`` and runs the shim under the grid ``fake.run`` asks for; ``fake.index``
    forces the index type."""
    fake = FakeCupy()
    fake.kernels, fake.launches, fake.run, fake.index = [], [], "own", None
    monkeypatch.setitem(sys.modules, "cupy", fake)

    def get_kernel(source, expression, all_expressions, device_id=None):
        assert source == nk.SOURCE and expression in all_expressions
        fake.kernels.append((expression, all_expressions, device_id))
        return expression

    def launch(kernel, name, grid, block, args, device_id=None):
        devices = {a.device_id for a in args if isinstance(a, np.ndarray)}
        assert devices == {fake.current}, f"{name}: arrays on {devices}, current {fake.current}"
        assert device_id == fake.current
        fake.launches.append((name, device_id))
        if fake.run == "small":
            grid, block = (2, 2, 1), (7, 1, 1)
        elif fake.run == "large":
            grid, block = (grid[0] * 8 + 1, grid[1] + 2, 1), (33, 1, 1)
        lib.launch(kernel, grid, block, args)

    real_index_type = nk.index_type
    monkeypatch.setattr(nk, "index_type", lambda *shapes: fake.index or real_index_type(*shapes))
    monkeypatch.setattr(nk.cuda_compile, "get_kernel", get_kernel)
    monkeypatch.setattr(nk.cuda_compile, "launch", launch)
    _clear_caches()
    yield fake
    _clear_caches()


def runs(cp):
    """Set cp up for each of RUNS in turn (caches cleared, so plans are made again)."""
    for index, run in RUNS:
        _clear_caches()
        cp.index, cp.run = (None if index == "int" else index), run
        del cp.launches[:]
        yield f"{index} indices, {run} grid"
    cp.index, cp.run = None, "own"


# Runs (indices into RUNS) that also run the channels-last kernels.
LAST_RUNS = (0, 1, 2)


def last(a):
    """(N, C, *spatial) -> (N, *spatial, C), C-contiguous NumPy."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), 1, -1))


def last_views(cp, *arrays):
    """Channels-last device copies of channels-first NumPy arrays: contiguous, then as
    transposed (non-contiguous) views of channels-first device arrays."""
    yield tuple(cp.on(last(a)) for a in arrays)
    yield tuple(np.moveaxis(cp.on(a), 1, -1) for a in arrays)


def launched_last(cp, start):
    """The kernels launched since cp.launches[start] are all channels-last ones."""
    names = [n for n, _ in cp.launches[start:]]
    assert names and all(n.endswith(", ChannelsLast>") for n in names), names


def strided(cp, a):
    """a on the fake device as a non-contiguous view (every other element of a wider array)."""
    base = cp.on(np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype))
    view = base[..., ::2]
    view[...] = a
    assert not view.flags.c_contiguous
    return view


def frozen(a):
    return np.array(a, copy=True)


def geometry(case_size, pool_param, op):
    return pool_geometry((2, 3) + case_size, pool_param, op=op)


# ------------------------------------------------------------------------- max pooling

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", MAX_CASES)
def test_max_pool(cp, rng, name, dtype):
    geom = geometry(*MAX_CASES[name], op="max")
    windows = pool_taps(geom)
    for kind in DATA:
        x = data(kind, geom.input_shape, dtype, rng)
        dout = rng.standard_normal(geom.output_shape).astype(dtype)
        ref_out, ref_off = ref_max_forward(x, windows, geom.output_shape, geom.offset_dtype)
        ref_dx = ref_max_backward(dout, ref_off, windows, geom.input_shape, "taps")
        x_dev, dout_dev = strided(cp, x), strided(cp, dout)
        for run, where in enumerate(runs(cp)):
            where = f"{name}, {kind}, {np.dtype(dtype)}, {where}"
            out, off = nk.max_pool_forward_gpu(x_dev, geom)
            assert off.dtype == geom.offset_dtype
            assert_same(off, ref_off, f"offsets: {where}")
            assert_same(out, ref_out, f"out: {where}")
            dx = nk.max_pool_backward_gpu(dout_dev, off, geom)
            assert_same(dx, ref_dx, f"dx: {where}")
            assert_same(nk.max_pool_backward_gpu(dout_dev, off, geom), dx,
                        f"dx repeated: {where}")
            assert [n for n, _ in cp.launches] == [
                nk.kernel_expression(k, dtype, cp.index or "int", offset=geom.offset_dtype)
                for k in ("max_pool3d_forward", "max_pool3d_backward", "max_pool3d_backward")]
            if run in LAST_RUNS:
                start = len(cp.launches)
                for x_l, dout_l in last_views(cp, x, dout):
                    out_l, off_l = nk.max_pool_forward_gpu(x_l, geom, channels_last=True)
                    assert_same(off_l, last(off), f"channels-last offsets: {where}")
                    assert_same(out_l, last(out), f"channels-last out: {where}")
                    dx_l = nk.max_pool_backward_gpu(dout_l, off_l, geom, channels_last=True)
                    assert_same(dx_l, last(dx), f"channels-last dx: {where}")
                launched_last(cp, start)
        assert_same(x_dev, x, "x was modified")
        assert_same(dout_dev, dout, "dout was modified")


def test_max_pool_1d_equals_2d_row(cp, rng):
    """A 1-D geometry gives the 2-D results of its as_2d() geometry (an input row of H = 1)."""
    geom = geometry(*MAX_CASES["1d-k2s1p1d2ceil"], op="max")
    x = data("ties", geom.input_shape, np.float32, rng)
    out, off = nk.max_pool_forward_gpu(cp.on(x), geom)
    out2, off2 = nk.max_pool_forward_gpu(cp.on(x[:, :, None, :]), geom.as_2d())
    assert_same(out, out2[:, :, 0], "out")
    assert_same(off, off2[:, :, 0], "offsets")


# ------------------------------------------------------------------------- avg pooling

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", AVG_OPTIONS, ids=lambda o: f"cip{int(o[0])}-div{o[1]}")
@pytest.mark.parametrize("name", AVG_CASES)
def test_avg_pool(cp, rng, name, options, dtype):
    geom = geometry(*AVG_CASES[name], op="avg")
    windows = pool_taps(geom)
    divisor = avg_divisors(geom, *options)
    kinds = DATA if options == AVG_OPTIONS[0] else ("random", "zeros")
    for kind in kinds:
        x = data(kind, geom.input_shape, dtype, rng)
        dout = rng.standard_normal(geom.output_shape).astype(dtype)
        ref_out = ref_avg_forward(x, windows, geom.output_shape, divisor)
        ref_dx = ref_avg_backward(dout, windows, geom.input_shape, divisor, "taps")
        x_dev, dout_dev = strided(cp, x), strided(cp, dout)
        for run, where in enumerate(runs(cp)):
            where = f"{name}, options {options}, {kind}, {np.dtype(dtype)}, {where}"
            out = nk.avg_pool_forward_gpu(x_dev, geom, *options)
            assert_same(out, ref_out, f"out: {where}")
            dx = nk.avg_pool_backward_gpu(dout_dev, geom, *options)
            assert_same(dx, ref_dx, f"dx: {where}")
            assert_same(nk.avg_pool_backward_gpu(dout_dev, geom, *options), dx,
                        f"dx repeated: {where}")
            if run in LAST_RUNS:
                start = len(cp.launches)
                for x_l, dout_l in last_views(cp, x, dout):
                    assert_same(nk.avg_pool_forward_gpu(x_l, geom, *options, channels_last=True),
                                last(out), f"channels-last out: {where}")
                    assert_same(nk.avg_pool_backward_gpu(dout_l, geom, *options,
                                                         channels_last=True),
                                last(dx), f"channels-last dx: {where}")
                launched_last(cp, start)
        assert_same(x_dev, x, "x was modified")
        assert_same(dout_dev, dout, "dout was modified")


def test_avg_pool_divisors_are_pytorchs():
    """The reference divisors on a hand-checked 1-D case: L = 6, kernel 3, stride 2, pad 1,
    ceil_mode: windows start at -1, 1, 3, 5; the last overhangs the right padding (7)."""
    geom = pool_geometry((1, 1, 6), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True),
                         op="avg")
    assert geom.out == (4,)
    assert list(avg_divisors(geom, True, None).values()) == [3, 3, 3, 2]
    assert list(avg_divisors(geom, False, None).values()) == [2, 3, 3, 1]
    assert list(avg_divisors(geom, False, 5).values()) == [5] * 4


def test_avg_pool_rejects_bad_options(cp):
    geom = geometry((6, 6), dict(kernel_size=2), op="avg")
    x = cp.on(np.zeros(geom.input_shape, np.float32))
    with pytest.raises(ValueError, match="divisor_override"):
        nk.avg_pool_forward_gpu(x, geom, True, 0)
    with pytest.raises(TypeError, match="count_include_pad"):
        nk.avg_pool_forward_gpu(x, geom, 1, None)
    dilated = geometry((6, 6), dict(kernel_size=2, dilation=2), op="max")
    with pytest.raises(ValueError, match="dilation"):
        nk.avg_pool_backward_gpu(cp.on(np.zeros(dilated.output_shape, np.float32)), dilated,
                                 True, None)
    assert cp.launches == []


# -------------------------------------------------------------------- adaptive pooling

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ADAPTIVE_CASES)
def test_adaptive_pool(cp, rng, name, dtype):
    size, output_size = ADAPTIVE_CASES[name]
    ageom = adaptive_geometry((2, 3) + size, output_size)
    windows = adaptive_taps(ageom)
    count = {o: len(taps) for o, taps in windows}
    for kind in DATA:
        x = data(kind, ageom.input_shape, dtype, rng)
        dout = rng.standard_normal(ageom.output_shape).astype(dtype)
        ref_out, ref_off = ref_max_forward(x, windows, ageom.output_shape, ageom.offset_dtype)
        ref_dx = ref_max_backward(dout, ref_off, windows, ageom.input_shape, "windows")
        ref_avg = ref_avg_forward(x, windows, ageom.output_shape, count)
        ref_avg_dx = ref_avg_backward(dout, windows, ageom.input_shape, count, "windows")
        x_dev, dout_dev = strided(cp, x), strided(cp, dout)
        for run, where in enumerate(runs(cp)):
            where = f"{name}, {kind}, {np.dtype(dtype)}, {where}"
            out, off = nk.adaptive_max_pool_forward_gpu(x_dev, ageom)
            assert off.dtype == ageom.offset_dtype
            assert_same(off, ref_off, f"offsets: {where}")
            assert_same(out, ref_out, f"max out: {where}")
            dx = nk.adaptive_max_pool_backward_gpu(dout_dev, off, ageom)
            assert_same(dx, ref_dx, f"max dx: {where}")
            assert_same(nk.adaptive_max_pool_backward_gpu(dout_dev, off, ageom), dx,
                        f"max dx repeated: {where}")
            assert_same(nk.adaptive_avg_pool_forward_gpu(x_dev, ageom), ref_avg,
                        f"avg out: {where}")
            avg_dx = nk.adaptive_avg_pool_backward_gpu(dout_dev, ageom)
            assert_same(avg_dx, ref_avg_dx, f"avg dx: {where}")
            assert_same(nk.adaptive_avg_pool_backward_gpu(dout_dev, ageom), avg_dx,
                        f"avg dx repeated: {where}")
            if run in LAST_RUNS:
                start = len(cp.launches)
                for x_l, dout_l in last_views(cp, x, dout):
                    out_l, off_l = nk.adaptive_max_pool_forward_gpu(x_l, ageom,
                                                                    channels_last=True)
                    assert_same(off_l, last(off), f"channels-last offsets: {where}")
                    assert_same(out_l, last(out), f"channels-last max out: {where}")
                    assert_same(nk.adaptive_max_pool_backward_gpu(dout_l, off_l, ageom,
                                                                  channels_last=True),
                                last(dx), f"channels-last max dx: {where}")
                    assert_same(nk.adaptive_avg_pool_forward_gpu(x_l, ageom, channels_last=True),
                                last(ref_avg), f"channels-last avg out: {where}")
                    assert_same(nk.adaptive_avg_pool_backward_gpu(dout_l, ageom,
                                                                  channels_last=True),
                                last(avg_dx), f"channels-last avg dx: {where}")
                launched_last(cp, start)
        assert_same(x_dev, x, "x was modified")
        assert_same(dout_dev, dout, "dout was modified")


def test_adaptive_windows_overlap_and_outnumber_inputs():
    """The cases include overlapping windows (non-divisible sizes), more windows than inputs
    and uint16 offsets, so the covers' ranges and order are exercised."""
    overlap = adaptive_geometry((1, 1, 10), 3)
    assert [t[-1][1][0] - t[0][1][0] + 1 for _, t in adaptive_taps(overlap)] == [4, 4, 4]
    assert adaptive_geometry((1, 1, 3), 8).window == (2,)  # 8 windows over 3 inputs
    assert adaptive_geometry((1, 1, 600), 2).offset_dtype == np.uint16


# ----------------------------------------------------------------------- max unpooling

@pytest.mark.parametrize("index_dtype", [np.int64, np.int32, np.int16, np.uint8],
                         ids=DTYPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", UNPOOL_CASES)
def test_max_unpool(cp, rng, name, dtype, index_dtype):
    size, out_size = UNPOOL_CASES[name]
    x_shape, out_shape = (2, 3) + size, (2, 3) + out_size
    out_plane = int(np.prod(out_size))
    for kind in ("random", "nan", "zeros"):
        x = data(kind, x_shape, dtype, rng)
        indices = rng.integers(0, out_plane, size=x_shape).astype(index_dtype)
        dout = rng.standard_normal(out_shape).astype(dtype)
        ref_out, won = ref_unpool(x, indices, out_shape)
        ref_dx = ref_unpool_backward(dout, indices, won)
        x_dev, idx_dev, dout_dev = strided(cp, x), strided(cp, indices), strided(cp, dout)
        for run, where in enumerate(runs(cp)):
            where = f"{name}, {kind}, {np.dtype(dtype)}, {np.dtype(index_dtype)}, {where}"
            out, winners = nk.max_unpool_forward_gpu(x_dev, idx_dev, out_shape,
                                                     return_winners=True)
            assert_same(out, ref_out, f"out: {where}")
            dx = nk.max_unpool_backward_gpu(dout_dev, idx_dev, winners, x_shape)
            assert_same(dx, ref_dx, f"dx: {where}")
            # the backward takes the forward's winners: a gather, no atomic kernel
            assert [n.split("<")[0] for n, _ in cp.launches] == [
                "max_unpool_winners", "max_unpool_forward", "max_unpool_backward"]
            if run in LAST_RUNS:
                start = len(cp.launches)
                for x_l, idx_l, dout_l in last_views(cp, x, indices, dout):
                    out_l, won_l = nk.max_unpool_forward_gpu(x_l, idx_l, out_shape,
                                                             return_winners=True,
                                                             channels_last=True)
                    assert_same(out_l, last(out), f"channels-last out: {where}")
                    # winners: flat indices in x's layout, laid out like out; the same
                    # elements as the channels-first winners
                    w = np.asarray(won_l)
                    cf_index = last(np.arange(x.size).reshape(x_shape)).reshape(-1)
                    won_cf = np.where(w >= 0, cf_index[np.maximum(w, 0)], -1)
                    assert_same(won_cf.astype(w.dtype).reshape(out_l.shape),
                                last(np.asarray(winners).reshape(out_shape)),
                                f"channels-last winners: {where}")
                    assert_same(nk.max_unpool_backward_gpu(dout_l, idx_l, won_l, x_shape,
                                                           channels_last=True),
                                last(dx), f"channels-last dx: {where}")
                launched_last(cp, start)
        assert_same(x_dev, x, "x was modified")
        assert_same(idx_dev, indices, "indices were modified")
        assert_same(dout_dev, dout, "dout was modified")


@pytest.mark.parametrize("index_dtype", [np.int64, np.int16, np.uint8], ids=DTYPE_IDS)
def test_max_unpool_out_of_range_indices_target_nothing(cp, rng, index_dtype):
    """CuPy callers do not check the index range (a host read): an index outside the output
    plane targets nothing, its value is dropped and its gradient is 0, in both layouts."""
    x_shape, out_shape = (2, 3, 4, 5), (2, 3, 6, 5)
    out_plane = 30
    x = rng.standard_normal(x_shape).astype(np.float32)
    indices = rng.integers(0, out_plane, size=x_shape).astype(np.int64)
    bad = rng.random(x_shape) < 0.3
    wild = rng.choice([out_plane, out_plane + 7, 200, -1, -30], size=x_shape)
    if np.dtype(index_dtype).kind == "u":
        wild = np.abs(wild) + out_plane
    indices = np.where(bad, wild, indices).astype(index_dtype)
    valid = (indices.astype(np.int64) >= 0) & (indices.astype(np.int64) < out_plane)
    dout = rng.standard_normal(out_shape).astype(np.float32)
    # the reference: only the in-range inputs, the last of a plane winning
    planes = 6
    xs, idx = x.reshape(planes, -1), np.where(valid, indices, 0).astype(np.int64).reshape(
        planes, -1)
    vs = valid.reshape(planes, -1)
    out = np.zeros((planes, out_plane), np.float32)
    winner = np.full(out.shape, -1)
    for p in range(planes):
        for i in range(xs.shape[1]):
            if vs[p, i]:
                out[p, idx[p, i]] = xs[p, i]
                winner[p, idx[p, i]] = i
    won = np.zeros(xs.shape, bool)
    for p in range(planes):
        won[p, winner[p][winner[p] >= 0]] = True
    won = won.reshape(x_shape)
    ref_dx = np.where(won, ref_unpool_backward(dout, np.where(valid, indices, 0), won), 0)
    got, winners = nk.max_unpool_forward_gpu(cp.on(x), cp.on(indices), out_shape,
                                             return_winners=True)
    assert_same(got, out.reshape(out_shape), "out")
    assert_same(nk.max_unpool_backward_gpu(cp.on(dout), cp.on(indices), winners, x_shape),
                ref_dx.astype(np.float32), "dx")
    got_l, won_l = nk.max_unpool_forward_gpu(cp.on(last(x)), cp.on(last(indices)), out_shape,
                                             return_winners=True, channels_last=True)
    assert_same(got_l, last(out.reshape(out_shape)), "channels-last out")
    assert_same(nk.max_unpool_backward_gpu(cp.on(last(dout)), cp.on(last(indices)), won_l,
                                           x_shape, channels_last=True),
                last(ref_dx.astype(np.float32)), "channels-last dx")


def test_max_unpool_inverts_max_pool(cp, rng):
    """Unpooling a 3-D max pool's output at its argmax positions (flat over each D*H*W plane)
    puts every maximum back; the gradient of unpooling is dout at those positions."""
    geom = geometry((4, 6, 6), dict(kernel_size=2, stride=2), op="max")
    x = data("random", geom.input_shape, np.float64, rng)
    out, off = nk.max_pool_forward_gpu(cp.on(x), geom)
    d, h, w = np.unravel_index(np.asarray(off, np.int64), geom.kernel)
    od, oh, ow = np.meshgrid(*[np.arange(n) for n in geom.out], indexing="ij")
    flat = np.ravel_multi_index((2 * od + d, 2 * oh + h, 2 * ow + w), geom.size)
    up, won = nk.max_unpool_forward_gpu(out, cp.on(flat), geom.input_shape, return_winners=True)
    assert_same(np.take_along_axis(np.asarray(up).reshape(6, -1), flat.reshape(6, -1), 1),
                np.asarray(out).reshape(6, -1), "unpooled maxima")
    assert np.count_nonzero(np.asarray(up)) == out.size
    dx = nk.max_unpool_backward_gpu(up, cp.on(flat), won, geom.output_shape)
    assert_same(dx, out, "gradient at the argmax positions")


def test_max_unpool_rejects_mismatched_shapes(cp):
    x = cp.on(np.zeros((2, 3, 4), np.float32))
    idx = cp.on(np.zeros((2, 3, 4), np.int64))
    with pytest.raises(ValueError, match="same N, C"):
        nk.max_unpool_forward_gpu(x, idx, (2, 4, 8))
    with pytest.raises(ValueError, match="one rank"):
        nk.max_unpool_forward_gpu(x, idx, (2, 3, 4, 4))
    with pytest.raises(ValueError, match="indices has shape"):
        nk.max_unpool_forward_gpu(x, idx[..., :2], (2, 3, 8))
    with pytest.raises(TypeError, match="integer"):
        nk.max_unpool_forward_gpu(x, idx.astype(np.float32), (2, 3, 8))
    assert cp.launches == []


# ------------------------------------------------------------- launchers: the plumbing

def test_empty_batches_launch_nothing(cp):
    geom = geometry((6, 6), dict(kernel_size=2), op="max")
    geom0 = PoolGeometry(0, 3, geom.size, geom.kernel, geom.stride, geom.pad, geom.dilation,
                         False, geom.out)
    out, off = nk.max_pool_forward_gpu(cp.on(np.zeros(geom0.input_shape, np.float32)), geom0)
    dx = nk.max_pool_backward_gpu(out, off, geom0)
    ageom = AdaptiveGeometry(0, 2, (5,), (3,))
    a = nk.adaptive_avg_pool_forward_gpu(cp.on(np.zeros((0, 2, 5), np.float32)), ageom)
    up = nk.max_unpool_forward_gpu(cp.on(np.zeros((0, 2, 3), np.float32)),
                                   cp.on(np.zeros((0, 2, 3), np.int64)), (0, 2, 5))
    assert out.shape == off.shape == (0, 3, 3, 3) and dx.shape == (0, 3, 6, 6)
    assert a.shape == (0, 2, 3) and up.shape == (0, 2, 5)
    assert cp.launches == []


def test_launchers_run_on_the_arrays_device(cp, rng):
    """Arrays on device 1 while device 0 is current: outputs on device 1, kernels compiled
    and launched for device 1, device 0 current again afterwards; arrays on two devices are a
    ValueError naming them, before any launch."""
    geom = geometry((4, 5, 6), dict(kernel_size=2, stride=1), op="max")
    ageom = adaptive_geometry((2, 3, 4, 5, 6), (3, 2, 4))
    x_np = data("random", geom.input_shape, np.float32, rng)
    cp.current = 1
    x = cp.on(x_np)
    idx = cp.on(rng.integers(0, 120, size=geom.input_shape))
    cp.current = 0
    results = [*nk.max_pool_forward_gpu(x, geom), nk.avg_pool_forward_gpu(x, geom, True, None),
               *nk.adaptive_max_pool_forward_gpu(x, ageom),
               nk.adaptive_avg_pool_forward_gpu(x, ageom),
               *nk.max_unpool_forward_gpu(x, idx, (2, 3, 4, 5, 6), return_winners=True)]
    up, won = results[-2], results[-1]
    results.append(nk.max_pool_backward_gpu(results[0], results[1], geom))
    results.append(nk.max_unpool_backward_gpu(up, idx, won, geom.input_shape))
    assert {r.device_id for r in results} == {1} and cp.current == 0
    assert {d for _, d in cp.launches} == {1} and {d for *_, d in cp.kernels} == {1}
    with pytest.raises(ValueError, match=r"dout \(2, 3, 3, 4, 5\) on device 0, "
                                         r"offsets \(2, 3, 3, 4, 5\) on device 1"):
        nk.max_pool_backward_gpu(cp.on(np.asarray(results[0]), device_id=0), results[1], geom)
    with pytest.raises(ValueError, match="different CUDA devices"):
        nk.max_unpool_forward_gpu(cp.on(x_np, device_id=0), idx, (2, 3, 4, 5, 6))


def test_launchers_check_arguments(cp):
    geom = geometry((4, 4), dict(kernel_size=2), op="max")
    x = cp.on(np.zeros(geom.input_shape, np.float32))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        nk.max_pool_forward_gpu(np.zeros(geom.input_shape, np.float32), geom)
    with pytest.raises(TypeError, match="floating"):
        nk.max_pool_forward_gpu(x.astype(np.int32), geom)
    with pytest.raises(ValueError, match="shape"):
        nk.max_pool_forward_gpu(x[:, :, :3], geom)
    with pytest.raises(TypeError, match="PoolGeometry"):
        nk.max_pool_forward_gpu(x, adaptive_geometry(x.shape, 2))
    out, off = nk.max_pool_forward_gpu(x, geom)
    with pytest.raises(TypeError, match="uint8"):
        nk.max_pool_backward_gpu(out, off.astype(np.uint16), geom)
    ageom = adaptive_geometry(x.shape, 3)
    with pytest.raises(TypeError, match="uint8"):
        nk.adaptive_max_pool_backward_gpu(cp.on(np.zeros(ageom.output_shape, np.float32)),
                                          cp.on(np.zeros(ageom.output_shape, np.uint16)), ageom)


def test_plans_are_cached_per_geometry_dtype_and_device(cp, rng):
    geom = geometry((5, 6), dict(kernel_size=3, stride=2, pad=1), op="max")
    x = cp.on(data("random", geom.input_shape, np.float32, rng))
    for _ in range(3):
        nk.max_pool_forward_gpu(x, geom)
    assert len(cp.kernels) == 1 and len(cp.launches) == 3
    nk.max_pool_forward_gpu(x.astype(np.float64), geom)
    assert len(cp.kernels) == 2
    with cp.cuda.Device(1):
        nk.max_pool_forward_gpu(cp.on(x), geom)
    assert [d for *_, d in cp.kernels] == [0, 0, 1]


# ------------------------------------------------------------------ helpers, no data

def fake_geometry(size, kernel, stride, pad=None, N=1, C=1):
    d = len(size)
    pad = pad or (0,) * d
    out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, stride, pad))
    return PoolGeometry(N, C, tuple(size), tuple(kernel), tuple(stride), pad, (1,) * d, False,
                        out)


def test_index_type():
    assert nk.index_type((2, 3, 4)) == "int"
    assert nk.index_type((2**15, 2**8, 2**4, 2**4 - 1)) == "int"
    assert nk.index_type((2**16, 2**8, 2**3, 2**4)) == "long long"          # exactly 2**31
    assert nk.index_type((1, 1, 5), (2**16, 2**15, 1)) == "long long"      # the output
    assert nk.index_type((2**10, 2**10, 2**4, 2**4, 2**4)) == "long long"  # 3-D, 2**36


def test_pool_scalars_pad_to_three_axes_with_exact_types():
    geom = geometry((11,), dict(kernel_size=3, stride=2, pad=1, dilation=2), op="max")
    args = nk.pool_scalars(geom)
    assert all(type(a) is np.int32 for a in args)
    assert [int(a) for a in args] == [1, 1, 11, 1, 1, 5, 1, 1, 3, 1, 1, 2, 0, 0, 1, 1, 1, 2]
    ageom = adaptive_geometry((2, 3, 7, 9), (3, 4))
    assert [int(a) for a in nk.adaptive_scalars(ageom, offsets=True)] == [1, 7, 9, 1, 3, 4, 3,
                                                                          3]


def test_pool_scalars_reject_what_the_kernels_cannot_take():
    with pytest.raises(ValueError, match="below 2\\*\\*31"):
        nk.pool_scalars(fake_geometry((1, 2**31 - 2), (1, 3), (1, 1), (0, 1)))
    for out in ((5,), (6,)):  # unchecked geometries: window -1 (and window 4) all padding
        with pytest.raises(ValueError, match="only padding"):
            nk.pool_scalars(PoolGeometry(1, 1, (4,), (1,), (1,), (1,), (1,), False, out))
    with pytest.raises(ValueError, match="only padding"):  # the taps of window 0 skip 0..3
        nk.pool_scalars(PoolGeometry(1, 1, (4,), (2,), (1,), (2,), (6,), False, (1,)))
    assert nk.pool_scalars(fake_geometry((1, 2**30), (1, 2), (1, 2)))[2] == 2**30


def test_name_expressions_and_compile_groups():
    """Every launcher's expression is listed; a group holds one value type, index type and
    layout (plus the winners kernels of that index type and layout); the NVRTC check covers
    this module."""
    assert nk.SOURCE in instantiations()
    # 4 value types, 2 index types, 2 layouts: 4*3 offset kernels... per (value, index, layout)
    # ... plus the channels-last vector variants of max (4*3*2) and avg (4*2), forward and
    # backward.
    assert len(set(nk.NAME_EXPRESSIONS)) == len(nk.NAME_EXPRESSIONS) == 2 * (
        4 * 4 * 3 * 2 + 5 * 4 * 2 + 2 * 2 + 4 * 2 * 2) + 2 * (4 * 3 * 2 + 4 * 2) == 376
    for last in (False, True):
        for dtype, value in nk.VALUE_TYPES.items():
            for index in nk.INDEX_TYPES:
                group = nk.compile_group(nk.kernel_expression("avg_pool3d_forward", dtype, index,
                                                              channels_last=last))
                winners = nk.kernel_expression("max_unpool_winners", index=index,
                                               indices=np.int64, channels_last=last)
                assert winners in group and nk.compile_group(winners, dtype) == group
                for e in group:
                    args = [a.strip() for a in e[e.index("<") + 1:-1].split(",")]
                    assert (args[-1] == "ChannelsLast") == last
                    args = args[:-1] if last else args
                    assert args[-1] == index
                    assert args[0] == value or e.startswith("max_unpool_winners")
                assert len(group) == 4 * 3 + 5 + 2 + 2 + (2 * (3 + 1) if last else 0)
    assert sum(len(nk.compile_group(nk.kernel_expression("avg_pool3d_forward", d, i,
                                                         channels_last=last)))
               for d in nk.VALUE_TYPES for i in nk.INDEX_TYPES
               for last in (False, True)) == 376 + 8 * 3
    assert nk.kernel_expression("max_pool3d_forward", BF16, "long long", offset=np.uint16,
                                channels_last=True) == (
        "max_pool3d_forward<__nv_bfloat16, unsigned short, long long, ChannelsLast>")
    with pytest.raises(ValueError, match="no value type"):
        nk.compile_group(nk.kernel_expression("max_unpool_winners", index="int",
                                              indices=np.int32))
    with pytest.raises(TypeError, match="float16"):
        nk.kernel_expression("avg_pool3d_forward", np.int32)


def test_channels_last_launchers_check_shapes(cp):
    """Channels-last arrays must be (N, *spatial, C) of the channels-first geometry; the
    channels-first shape is refused (unless it happens to be the same)."""
    geom = geometry((4, 6), dict(kernel_size=2), op="max")
    x = cp.on(np.zeros(geom.input_shape, np.float32))
    with pytest.raises(ValueError, match=r"expected \(2, 4, 6, 3\).*channels-last"):
        nk.max_pool_forward_gpu(x, geom, channels_last=True)
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        nk.max_pool_forward_gpu(x, geom, channels_last=1)
    x_l = cp.on(np.zeros((2, 4, 6, 3), np.float32))
    out, off = nk.max_pool_forward_gpu(x_l, geom, channels_last=True)
    assert out.shape == off.shape == (2, 2, 3, 3)
    with pytest.raises(ValueError, match="offsets has shape"):
        nk.max_pool_backward_gpu(out, off[:, :1], geom, channels_last=True)
    with pytest.raises(ValueError, match="same N, C"):  # out_shape is channels-first
        nk.max_unpool_forward_gpu(x_l, cp.on(np.zeros((2, 4, 6, 3), np.int64)), (2, 6, 5, 3),
                                  channels_last=True)
    up = nk.max_unpool_forward_gpu(x_l, cp.on(np.zeros((2, 4, 6, 3), np.int64)), (2, 3, 5, 7),
                                   channels_last=True)
    assert up.shape == (2, 5, 7, 3)


def test_every_kernel_runs_somewhere():
    """Each kernel name of the module is one the tests above launch."""
    kernels = {e.split("<")[0] for e in nk.NAME_EXPRESSIONS}
    assert kernels == set(nk.OFFSET_KERNELS + nk.VALUE_KERNELS) | {
        "max_unpool_winners", "max_unpool_backward"} | set(nk.VECTOR_KERNELS.values())
    assert all(e.endswith(", ChannelsLast>") for e in nk.NAME_EXPRESSIONS
               if e.split("<")[0] in nk.VECTOR_KERNELS.values())


# ------------------------------------------------------- vectorised channels-last kernels

VEC_CASES = {
    "1d-k3s2p1": ((9,), dict(kernel_size=3, stride=2, pad=1)),
    "2d-k3s2p1ceil": ((5, 6), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
    "3d-k2s1p1": ((3, 4, 3), dict(kernel_size=2, stride=1, pad=1)),
}


def _forward_last(cp, x_l, mgeom, ageom):
    """(max out, offsets, avg out, names launched) of the channels-last forward kernels."""
    start = len(cp.launches)
    out, off = nk.max_pool_forward_gpu(x_l, mgeom, channels_last=True)
    avg = nk.avg_pool_forward_gpu(x_l, ageom, False, None, channels_last=True)
    return out, off, avg, [n for n, _ in cp.launches[start:]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", VEC_CASES)
def test_channels_last_vector_kernels(cp, lib, rng, monkeypatch, name, dtype):
    """max_pool3d_forward_vec and avg_pool3d_forward_vec run for C a multiple of V on
    aligned arrays and give the scalar channels-last kernels' results bit for bit (random,
    ties, NaN, +-inf, signed zeros; 32- and 64-bit indices, own and small grids); C not a
    multiple of V, and a misaligned x, run the scalar kernels; the vector kernel launched
    on a misaligned x faults."""
    V = nk.vector_width(dtype)
    size, param = VEC_CASES[name]
    real_vectorised = nk._vectorised
    forward = [k for k in nk.VECTOR_KERNELS if k.endswith("forward")]
    for C in (2 * V, V + 1):
        mgeom = pool_geometry((2, C) + size, param, op="max")
        ageom = pool_geometry((2, C) + size, param, op="avg")
        for kind in DATA:
            x_l = cp.on(last(data(kind, mgeom.input_shape, dtype, rng)))
            for index, run in (("int", "own"), ("long long", "small")):
                where = f"{name}, C={C}, {kind}, {np.dtype(dtype)}, {index}, {run}"
                _clear_caches()
                cp.index, cp.run = (None if index == "int" else index), run
                monkeypatch.setattr(nk, "_vectorised", real_vectorised)
                got = _forward_last(cp, x_l, mgeom, ageom)
                monkeypatch.setattr(nk, "_vectorised", lambda *a: False)
                ref = _forward_last(cp, x_l, mgeom, ageom)
                assert not any("_vec<" in n for n in ref[3]), ref[3]
                vec = [n.split("<")[0] for n in got[3]]
                assert vec == ([nk.VECTOR_KERNELS[k] for k in forward]
                               if C % V == 0 else forward), (vec, where)
                for what, a, b in zip(("max out", "offsets", "avg out"), got, ref):
                    assert_same(a, b, f"vector {what}: {where}")
    cp.index, cp.run = None, "own"
    monkeypatch.setattr(nk, "_vectorised", real_vectorised)

    # A contiguous view one element into an aligned buffer: misaligned for V > 1.
    mgeom = pool_geometry((2, 2 * V) + size, param, op="max")
    x = last(data("random", mgeom.input_shape, dtype, rng))
    base = cp.on(np.zeros(x.size + 1, x.dtype))
    x_mis = base[1:].reshape(x.shape)
    x_mis[...] = x
    assert x_mis.flags.c_contiguous and x_mis.data.ptr % 16 != 0
    ageom = pool_geometry(mgeom.input_shape, param, op="avg")
    got = _forward_last(cp, x_mis, mgeom, ageom)
    assert not any("_vec<" in n for n in got[3]), got[3]
    ref = _forward_last(cp, cp.on(x), mgeom, ageom)
    assert any("_vec<" in n for n in ref[3]), ref[3]
    for what, a, b in zip(("max out", "offsets", "avg out"), got, ref):
        assert_same(a, b, f"misaligned {what}: {name}, {np.dtype(dtype)}")
    expression, _, _, scalars = nk._pool_plan("max_pool3d_forward", mgeom,
                                              np.dtype(dtype), (), True, True)
    out = cp.empty(mgeom.output_shape[:1] + mgeom.output_shape[2:] + mgeom.output_shape[1:2],
                   dtype)
    off = cp.empty(out.shape, mgeom.offset_dtype)
    with pytest.raises(cuda_shim.KernelFault, match="misaligned address: Vec load"):
        lib.launch(expression, (2, 1, 1), (32, 1, 1), (x_mis, out, off) + scalars)
    lib.launch(expression, (2, 1, 1), (32, 1, 1), (cp.on(x), out, off) + scalars)
    assert_same(out, ref[0], f"direct vector launch: {name}, {np.dtype(dtype)}")


# Backward cases: overlapping windows, dilation (max only), ceil_mode, 1 to 3 axes, uint16
# offsets (a window of 272 taps), windows overlapping along one axis of two.
VEC_BACKWARD_CASES = {
    "1d-k3s2p1": ((9,), dict(kernel_size=3, stride=2, pad=1)),
    "1d-k2s1p1d2ceil": ((10,), dict(kernel_size=2, stride=1, pad=1, dilation=2,
                                    ceil_mode=True)),
    "2d-k3s2p1": ((7, 8), dict(kernel_size=3, stride=2, pad=1)),
    "2d-k3x2s1p1d2x1": ((8, 7), dict(kernel_size=(3, 2), stride=1, pad=1, dilation=(2, 1))),
    "2d-k3s2p1ceil": ((6, 8), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
    "2d-k3x2s2p1x0": ((7, 8), dict(kernel_size=(3, 2), stride=2, pad=(1, 0))),
    "2d-uint16": ((17, 18), dict(kernel_size=(16, 17), stride=1)),
    "3d-k3s2p1ceil": ((4, 5, 6), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
    "3d-k2s1p1": ((3, 4, 3), dict(kernel_size=2, stride=1, pad=1)),
}
VEC_BACKWARD_RUNS = (("int", "own"), ("long long", "small"), ("int", "large"))


def misaligned(cp, a):
    """a on the fake device as a C-contiguous view one element into an aligned buffer: not
    aligned to 2 of its elements, so not to any vector of them."""
    base = cp.on(np.zeros(a.size + 1, a.dtype))
    view = base[1:].reshape(a.shape)
    view[...] = a
    assert view.flags.c_contiguous and view.data.ptr % (2 * a.itemsize) != 0
    return view


# Units in the last place of each dtype (the xp path's rounding, see _assert_xp_dx).
ULP = {np.dtype(np.float16): 2.0**-10, BF16: 2.0**-7, np.dtype(np.float32): 2.0**-23,
       np.dtype(np.float64): 2.0**-52}


def _xp_dx_bound(geom, dout, windows, options):
    """How far the xp path's average-pooling dx may be from the kernels' (see _assert_xp_dx):
    per dx element, n units in the last place of S, the sum of its n terms' magnitudes (n is
    how many windows cover it), plus n of the smallest subnormal; in float64, channels-last.
    A bound on max |dout| alone is not one: n terms of up to max |dout| each (divisor 1 at a
    padded corner) can sum to n times that."""
    d64 = dout.astype(np.float64)
    magnitudes = np.where(np.isfinite(d64), np.abs(d64), 0.0)
    S = ref_avg_backward(magnitudes, windows, geom.input_shape, avg_divisors(geom, *options),
                         "taps")
    n = ref_avg_backward(np.ones_like(d64), windows, geom.input_shape,
                         avg_divisors(geom, False, 1), "taps")
    dt = np.dtype(dout.dtype)
    tiny = float(np.finfo(np.float32 if dt == BF16 else dt).smallest_subnormal)
    return last(n * (ULP[dt] * S + tiny))


def _assert_xp_dx(got, xp_dx, geom, op, bound, what):
    """The kernels' dx against the NumPy xp path's: bit for bit for max pooling, and for
    average pooling when windows overlap along at most one axis; else the xp path sums a
    dx element's (up to 2**d) quotients in another grouping (one separable pass per axis,
    gpulayers.pooling._sum_pool_backward_xp), so there: NaN and infinities at the same
    places, the rest within ``bound`` (_xp_dx_bound: two orders of summing the same terms)."""
    overlapping = sum(k > s for k, s in zip(geom.kernel, geom.stride))
    if op == "max" or overlapping <= 1:
        assert_same(got, xp_dx, what)
        return
    a, b = np.asarray(got).astype(np.float64), np.asarray(xp_dx).astype(np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: NaN positions differ"
    inf = np.isinf(b)
    assert np.array_equal(a[inf], b[inf]), f"{what}: infinities differ"
    ok = np.isfinite(b)
    excess = np.abs(a[ok] - b[ok]) - bound[ok]
    if not (excess <= 0).all():
        worst = excess.argmax()
        raise AssertionError(
            f"{what}: {np.count_nonzero(excess > 0)} of {ok.sum()} elements beyond the bound; "
            f"worst by {excess[worst]:.3g} (got {a[ok][worst]!r}, xp path {b[ok][worst]!r})")


def _xp_backward(op, x_l, dout_l, param, options=None):
    """dx of the NumPy xp path (gpulayers' public functions) on channels-last arrays."""
    import gpulayers as G
    param = dict(param, data_format="channels_last")
    if op == "max":
        _, cache = G.max_pool_forward(x_l, param)
        return G.max_pool_backward(dout_l, cache)
    if options == (False, 1):  # sum pooling: the avg kernels with divisor_override = 1
        _, cache = G.sum_pool_forward(x_l, param)
        return G.sum_pool_backward(dout_l, cache)
    param.update(count_include_pad=options[0], divisor_override=options[1])
    _, cache = G.avg_pool_forward(x_l, param)
    return G.avg_pool_backward(dout_l, cache)


def _backward_names(cp, start):
    return [n.split("<")[0] for n, _ in cp.launches[start:]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", VEC_BACKWARD_CASES)
def test_channels_last_vector_backward_kernels(cp, rng, monkeypatch, name, dtype):
    """max_pool3d_backward_vec and avg_pool3d_backward_vec (sum pooling too) run for C = V,
    2V, 3V on aligned arrays and give, bit for bit, the scalar channels-last kernels' dx, the
    brute-force references' (transposed) and the NumPy xp path's (random, ties, NaN, +-inf,
    signed zeros in x and dout; 32- and 64-bit indices; the launcher's, a small and a large
    grid), twice the same; C = V + 1 runs the scalar kernels."""
    V = nk.vector_width(dtype)
    size, param = VEC_BACKWARD_CASES[name]
    real_vectorised = nk._vectorised
    for op in ("max",) if "dilation" in param else ("max", "avg"):
        for C in (V, 2 * V, 3 * V, V + 1):
            geom = pool_geometry((2, C) + size, param, op=op)
            windows = pool_taps(geom)
            kernel = f"{op}_pool3d_backward"
            expect = nk.VECTOR_KERNELS[kernel] if C % V == 0 else kernel
            for kind in DATA if C % V == 0 else ("random",):
                x = data(kind, geom.input_shape, dtype, rng)
                dout = data(kind, geom.output_shape, dtype, rng)
                x_l, dout_l = cp.on(last(x)), cp.on(last(dout))
                with np.errstate(invalid="ignore"):  # inf - inf
                    if op == "max":
                        _, ref_off = ref_max_forward(x, windows, geom.output_shape,
                                                     geom.offset_dtype)
                        cases = {None: ref_max_backward(dout, ref_off, windows,
                                                        geom.input_shape, "taps")}
                    else:
                        options = AVG_OPTIONS if kind == "random" else AVG_OPTIONS[:1]
                        cases = {o: ref_avg_backward(dout, windows, geom.input_shape,
                                                     avg_divisors(geom, *o), "taps")
                                 for o in options}
                    xp = {o: _xp_backward(op, last(x), last(dout), param, o) for o in cases}
                    bounds = {o: _xp_dx_bound(geom, dout, windows, o) for o in cases
                              if o and sum(k > s for k, s in zip(geom.kernel, geom.stride)) > 1}
                for options, ref_dx in cases.items():
                    for index, run in VEC_BACKWARD_RUNS:
                        where = (f"{name}, {op} {options}, C={C}, {kind}, "
                                 f"{np.dtype(dtype)}, {index}, {run}")
                        _clear_caches()
                        cp.index, cp.run = (None if index == "int" else index), run
                        monkeypatch.setattr(nk, "_vectorised", real_vectorised)
                        if op == "max":
                            _, off_l = nk.max_pool_forward_gpu(x_l, geom, channels_last=True)
                            assert_same(off_l, last(ref_off), f"offsets: {where}")

                            def backward():
                                return nk.max_pool_backward_gpu(dout_l, off_l, geom,
                                                                channels_last=True)
                        else:
                            def backward():
                                return nk.avg_pool_backward_gpu(dout_l, geom, *options,
                                                                channels_last=True)
                        start = len(cp.launches)
                        got = [backward(), backward()]
                        monkeypatch.setattr(nk, "_vectorised", lambda *a: False)
                        scalar = backward()
                        assert _backward_names(cp, start) == [expect] * 2 + [kernel], where
                        assert_same(got[0], scalar, f"vector vs scalar dx: {where}")
                        assert_same(got[1], got[0], f"vector dx repeated: {where}")
                        assert_same(got[0], last(ref_dx), f"vector dx vs reference: {where}")
                        _assert_xp_dx(got[0], xp[options], geom, op, bounds.get(options),
                                      f"vector dx vs xp path: {where}")
                assert_same(x_l, last(x), "x was modified")
                assert_same(dout_l, last(dout), "dout was modified")
    cp.index, cp.run = None, "own"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["1d-k3s2p1", "2d-uint16", "3d-k3s2p1ceil"])
def test_channels_last_vector_backward_misaligned(cp, lib, rng, name, dtype):
    """A misaligned dout (or max's offsets) makes the launcher run the scalar backward
    kernel, with the same dx; the vector kernel launched directly on a misaligned dout,
    offsets or dx faults in the shim, and on aligned arrays gives the same dx."""
    V = nk.vector_width(dtype)
    size, param = VEC_BACKWARD_CASES[name]
    for op in ("max", "avg"):
        geom = pool_geometry((2, 2 * V) + size, param, op=op)
        kernel = f"{op}_pool3d_backward"
        x = cp.on(last(data("random", geom.input_shape, dtype, rng)))
        dout = cp.on(last(data("random", geom.output_shape, dtype, rng)))
        if op == "max":
            _, off = nk.max_pool_forward_gpu(x, geom, channels_last=True)
            extra = ()

            def backward(d, o=off):
                return nk.max_pool_backward_gpu(d, o, geom, channels_last=True)
            inputs = {"dout": dout, "offsets": off}
        else:
            extra = nk._avg_options(geom, True, None)

            def backward(d, o=None):
                return nk.avg_pool_backward_gpu(d, geom, True, None, channels_last=True)
            inputs = {"dout": dout}
        start = len(cp.launches)
        ref = backward(dout)
        assert _backward_names(cp, start) == [nk.VECTOR_KERNELS[kernel]]
        for bad in inputs:
            start = len(cp.launches)
            args = dict(inputs, **{bad: misaligned(cp, inputs[bad])})
            assert_same(backward(args["dout"], args.get("offsets")), ref,
                        f"misaligned {bad}: {op}, {name}, {np.dtype(dtype)}")
            assert _backward_names(cp, start) == [kernel], bad
        expression, _, _, scalars = nk._pool_plan(kernel, geom, np.dtype(dtype), extra, True,
                                                  True)
        dx_shape = nk.array_shape(geom.input_shape, True)
        for bad in list(inputs) + ["dx"]:
            args = dict(inputs, dx=cp.empty(dx_shape, dtype))
            args[bad] = misaligned(cp, args[bad])
            with pytest.raises(cuda_shim.KernelFault,
                               match="misaligned address: Vec "
                                     + ("store" if bad == "dx" else "load")):
                lib.launch(expression, (2, 1, 1), (32, 1, 1), tuple(args.values()) + scalars)
        dx = cp.empty(dx_shape, dtype)
        lib.launch(expression, (2, 1, 1), (32, 1, 1), tuple(inputs.values()) + (dx,) + scalars)
        assert_same(dx, ref, f"direct vector launch: {op}, {name}, {np.dtype(dtype)}")
