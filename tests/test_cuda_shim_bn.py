"""Batch-norm kernels of gpulayers/cuda/batchnorm.cu run on the CPU through the host shim.

The shim (tests/cuda_shim) runs every thread of a block as an OS thread, so the block
reductions (shared memory, __syncthreads, warp shuffles) run as written: every kernel --
statistics, apply (which merges the statistics partials in train mode), backward reduce, dx
(which merges the backward partials) and the test-mode merge -- is launched here exactly as
bn_kernels.py builds the launches (same plan, grid and argument types), in float32, float64,
bfloat16 (ml_dtypes; the shim's 16-bit __nv_bfloat16) and float16 (when the compiler has
_Float16), for both layouts and vector widths 1 and 16 bytes, and compared with float64
NumPy. Outputs and partials start as NaN, so an element or slot the kernels skip fails.
Channels-last spatial batch norm, (N, *spatial, C), runs as the (N*prod(spatial), C, 1, 1)
columns layout and is checked against the channels-first reference. The 2-launch train
forward and backward are checked bit for bit against the 3-launch path they replaced (its
merge kernels kept here, REFERENCE_SOURCE), and the issue-13 small-plane geometries for
the share of launched threads with work.
"""
import dataclasses
import re
from importlib import resources

import ml_dtypes
import numpy as np
import pytest

from gpulayers.cuda import bn_kernels
from gpulayers.cuda.bn_kernels import plan_layout

cuda_shim = pytest.importorskip("cuda_shim")

THREADS = 256
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, BF16] + ([np.float16] if cuda_shim.has_half() else [])
TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13,
       BF16: 8e-3}  # bfloat16: 8 bits of mantissa, outputs rounded to nearest even
EPS = 1e-5

SHAPES = [
    (4, 3, 5, 6),      # columns, vector width 1, channels straddle tiles
    (2, 5, 8, 16),     # planes, vectors
    (3, 2, 7, 7),      # planes (float32) / columns (float64)
    (8, 2, 32, 32),    # planes, 2 blocks per channel
    (64, 12, 1, 1),    # plain batch norm (N, D): columns, vectors
    (600, 6, 1, 1),    # columns, several row chunks
    (50, 1, 3, 3),     # one channel: a single plane
    (2, 4, 9, 11),     # planes, odd plane size
    (5, 37, 3, 3),     # columns, odd width, several tiles
    (3, 70, 2, 2),     # columns, vectors, several tiles
]


@pytest.fixture(scope="module")
def lib():
    if cuda_shim.compiler() is None:
        pytest.skip("no C++ compiler for the CPU shim")
    source = resources.files("gpulayers.cuda").joinpath(bn_kernels.SOURCE)
    expressions = [e for e in bn_kernels.NAME_EXPRESSIONS
                   if "__half" not in e or cuda_shim.has_half()]
    return cuda_shim.build(str(source), expressions)


def rel(a, b, scale=None):
    """Normwise relative error max|a - b| / max|b| (or / scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.max(np.abs(b)) if scale is None else scale
    return float(np.max(np.abs(a - b)) / max(den, 1e-300))


def stats_tol(dtype):
    """Statistics of float16 input are float32."""
    return TOL[bn_kernels.stats_dtype(dtype)]


def _data(rng, shape, dtype, loc=0.0, scale=1.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def _prepared(shape, dtype, aligned=True):
    """bn_kernels' launch preparation with name expressions for kernel handles."""
    return bn_kernels.prepare(shape, np.dtype(dtype), aligned, 132, lambda e: (None, e))


def _run(lib, launches):
    """Run launches as bn_kernels builds them; the shim checks every argument against the
    kernel's C signature. Returns the expressions run."""
    for (_, expression), grid, args in launches:
        lib.launch(expression, grid, THREADS, args)
    return [expression for (_, expression), _, _ in launches]


def forward(lib, x, gamma, beta, p=None, running=(None, None), keep=1.0, take=0.0,
            unbiased=False, default=0.0):
    """Train forward (stats, then apply with the merge: 2 launches) on the shim; returns
    (y, stats, part)."""
    p = _prepared(x.shape, x.dtype) if p is None else p
    C, A = x.shape[1], bn_kernels.stats_dtype(x.dtype)
    rm, rv = running
    given = (rm is not None) | (rv is not None) << 1
    part = np.full(p.part_size, np.nan, A)
    stats = np.full((len(bn_kernels.STAT_ROWS), C), np.nan, A)
    y = np.full_like(x, np.nan)
    launches = bn_kernels._train_forward_launches(p, x, gamma, beta, EPS, rm, rv, given, keep,
                                                  take, unbiased, default, part, stats, y)
    assert _run(lib, launches) == [p.kernels[k][1] for k in ("stats", "apply_train")]
    return y, stats, part


def backward(lib, dout, x, gamma, mean, invstd, train, mean_lo=None, p=None):
    """Backward (reduce, then dx with the merge (train) or the merge (test): 2 launches) on
    the shim; returns (dx, dgamma, dbeta)."""
    p = _prepared(x.shape, x.dtype) if p is None else p
    C, A = x.shape[1], bn_kernels.stats_dtype(x.dtype)
    part = np.full(p.part_size, np.nan, A)
    dx = np.full_like(x, np.nan)
    dgamma, dbeta = np.full(C, np.nan, A), np.full(C, np.nan, A)
    launches = bn_kernels._backward_launches(p, dout, x, gamma, mean, invstd, train, part, dx,
                                             dgamma, dbeta, mean_lo)
    assert _run(lib, launches) == [p.kernels[k][1] for k in
                                   (("reduce_train", "dx") if train else ("reduce_test",
                                                                          "backward_merge"))]
    return dx, dgamma, dbeta


def ref_forward(x, gamma, beta):
    x = x.astype(np.float64)
    s = (1, -1, 1, 1)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(var + EPS)
    y = (x - mean.reshape(s)) * invstd.reshape(s) * gamma.reshape(s) + beta.reshape(s)
    return y, mean, var, invstd


def ref_backward(dout, x, gamma, mean, invstd, train):
    s = (1, -1, 1, 1)
    d = dout.astype(np.float64)
    xhat = (x.astype(np.float64) - mean.reshape(s)) * invstd.reshape(s)
    dbeta, dgamma = d.sum(axis=(0, 2, 3)), (d * xhat).sum(axis=(0, 2, 3))
    M = x.size // x.shape[1]
    if train:
        dx = (gamma * invstd).reshape(s) / M * (M * d - dbeta.reshape(s) - xhat * dgamma.reshape(s))
    else:
        dx = d * (gamma * invstd).reshape(s)
    return dx, dgamma, dbeta


def dx_scale(dout, gamma, invstd):
    """max|gamma*invstd*dout|: train dx can cancel to ~0, an error relative to it means little."""
    return float(np.max(np.abs(dout.astype(np.float64) * (gamma * invstd).reshape(1, -1, 1, 1))))


# ------------------------------------------------------------------------ plans (pure Python)

@pytest.mark.parametrize("shape, dtype, layout, vec", [
    ((256, 64, 112, 112), np.float32, "planes", 4),
    ((256, 256, 56, 56), np.float16, "planes", 8),
    ((256, 2048, 7, 7), np.float32, "columns", 4),
    ((256, 2048, 7, 7), np.float16, "columns", 8),
    ((32, 64, 56, 56), np.float64, "planes", 2),
    ((4096, 1024, 1, 1), np.float32, "columns", 4),
    ((1000, 1, 1, 1), np.float32, "planes", 4),
    ((16, 5, 7, 7), np.float32, "planes", 1),   # 49 columns > a tile of 32 scalar loads
    ((3, 5, 7, 7), np.float32, "columns", 1),   # N = 3 < 8 rows of threads: wider tiles
])
def test_plan_layout_choices(shape, dtype, layout, vec):
    plan = plan_layout(shape, dtype, num_sms=132)
    assert (plan.layout, plan.vec) == (layout, vec)
    assert plan.grid[0] >= 1 and plan.slots == (2 if layout == "columns" else 1) * plan.grid[0]
    assert plan.grid[1] <= 65535


def test_plan_uses_several_blocks_when_channels_are_few():
    per_sm = bn_kernels.TUNING["blocks_per_sm"]
    plan = plan_layout((256, 64, 112, 112), np.float32, num_sms=132)
    assert (per_sm - 1) * 132 <= plan.grid[0] * plan.grid[1] <= per_sm * 132
    plan = plan_layout((32, 4, 256, 256), np.float16, num_sms=132)
    assert plan.grid[0] > 1


def test_plan_unaligned_falls_back_to_scalar_loads():
    assert plan_layout((2, 3, 8, 8), np.float32, aligned=False).vec == 1


def test_plan_rejects_huge_channels():
    with pytest.raises(ValueError, match="2\\*\\*31"):
        plan_layout((2**16, 2, 2**8, 2**8), np.float32)


@pytest.mark.parametrize("shape", [(1, 1, 2**15, 2**15 - 1), (2**13, 3, 2**9, 2**8 - 1),
                                   (2**24, 16, 4, 4 + 3), (2**31 - 1, 4, 1, 1)])
def test_plan_partial_slots_hold_fewer_than_2_24_values(shape):
    """Partial counts are float32 in the kernels: exact only below 2**24 values per slot."""
    for dtype in (np.float32, np.float16):
        plan = plan_layout(shape, dtype, num_sms=132)
        if plan.layout == "planes":
            per_slot = int(plan.args[4]) * plan.vec
        else:
            per_slot = int(plan.args[3]) * int(plan.args[0])
        assert per_slot < 2**24
        count = shape[0] * shape[2] * shape[3]
        assert plan.grid[0] * per_slot >= (count if plan.layout == "planes" else 0)


@pytest.mark.parametrize("shape, dtype, vec, grid", [
    ((256 * 56 * 56, 64, 1, 1), np.float32, 4, (128, 1)),   # channels-last (256, 56, 56, 64)
    ((256 * 56 * 56, 64, 1, 1), BF16, 8, (128, 1)),
    ((32 * 7 * 7, 2048, 1, 1), np.float32, 4, (16, 16)),    # channels-last (32, 7, 7, 2048)
    ((32 * 7 * 7, 2048, 1, 1), BF16, 8, (33, 8)),
    ((2**31 - 1, 64, 1, 1), np.float32, 4, (129, 1)),       # the tallest matrix taken
    ((2**31 - 1, 3, 1, 1), BF16, 1, (129, 1)),
])
def test_plan_channels_last_matrices(shape, dtype, vec, grid):
    """Channels-last spatial BN over (N, *spatial, C) is BN over the (M, C) matrix, M =
    N*prod(spatial), run as (M, C, 1, 1): the columns layout, row chunks of fewer than 2**24
    values covering all M rows. (A tall matrix of few channels gets one tile and at most
    _MAX_SLOTS//2 (+1) row chunks: about one 256-thread block per SM, see the report in
    bn_kernels.plan_layout's docstring.)"""
    plan = plan_layout(shape, dtype, num_sms=132)
    assert (plan.layout, plan.vec, plan.grid) == ("columns", vec, grid)
    hw, _, n, chunk = (int(a) for a in plan.args)
    assert hw == 1 and n == shape[0] and chunk * hw < 2**24 and plan.grid[0] * chunk >= n
    assert plan.slots == 2 * plan.grid[0]


def test_plan_many_channels_stride_over_the_grid():
    plan = plan_layout((2, 70000, 9, 9), np.float32, num_sms=132)
    assert plan.layout == "planes" and plan.grid[1] == 65535


@pytest.mark.parametrize("shape, dtype, match", [
    ((0, 3, 4, 4), None, "zero-size"), ((2, 0, 4, 4), None, "zero-size"),
    ((2, 3, 0, 4), None, "zero-size"), ((2**16, 2, 2**8, 2**8), None, "2\\*\\*31"),
    ((2, 3, 4), None, "\\(N, C, H, W\\)"), ((2, 3, 4, 4), np.int32, "float16"),
])
def test_supported_reasons(shape, dtype, match):
    reason = bn_kernels.supported(shape, dtype)
    assert isinstance(reason, str) and re.search(match, reason), reason


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 70000, 9, 9), (2**31 - 1, 1, 1, 1),
                                   (3, 5, 7, 7)])
def test_supported_shapes(shape):
    assert bn_kernels.supported(shape) is None
    assert bn_kernels.supported(shape, np.float16) is None


@pytest.mark.parametrize("d", [1, 2, 3, 7, 49, 196, 3136, 12544, 2**20 + 1, 2**31 - 1])
def test_divider_magic(rng, d):
    magic, shift = bn_kernels._divider(d)
    assert 0 < magic < 2**32
    n = np.concatenate([rng.integers(0, 2**31, 2000), [0, d - 1, d, 2**31 - 1]]).astype(np.uint64)
    hi = (n * np.uint64(magic)) >> np.uint64(32)
    assert np.array_equal((hi + n) >> np.uint64(shift), n // np.uint64(d))


def test_test_shapes_cover_both_layouts_and_vector_widths():
    for dtype in DTYPES:
        seen = {(p.plan.layout, p.plan.vec > 1) for shape in SHAPES for aligned in (True, False)
                for p in [_prepared(shape, dtype, aligned)]}
        assert seen == {("planes", False), ("planes", True), ("columns", False),
                        ("columns", True)}, (dtype, seen)


# ------------------------------------------------------------------------ the shim itself

SYNC_SOURCE = r"""
// One block: out[0..blockDim) = inclusive prefix sums within each warp (shuffles up),
// out2[b] = block sum (shared memory + __syncthreads + shuffles down), xor and broadcast.
template <typename T>
__global__ void block_ops(const T* x, T* scan, T* sums, T* bcast, T* butterfly) {
    __shared__ T sm[32];
    const unsigned t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + t;
    T v = x[i], s = v;
    for (int o = 1; o < 32; o <<= 1) {
        const T up = __shfl_up_sync(0xffffffffu, s, o);
        if ((int)lane >= o) s += up;
    }
    scan[i] = s;
    T b = v;
    for (int o = 16; o > 0; o >>= 1) b += __shfl_xor_sync(0xffffffffu, b, o);
    butterfly[i] = b;
    bcast[i] = __shfl_sync(0xffffffffu, v, 3);
    T r = v;
    for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
    if (lane == 0) sm[warp] = r;
    __syncthreads();
    if (warp == 0) {
        r = lane < blockDim.x / 32 ? sm[lane] : T(0);
        for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
        if (lane == 0) sums[blockIdx.x] = r;
    }
}

__global__ void elementwise(const float* x, float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        y[i] = 2 * x[i];
}

// The shim's bfloat16 conversions: y = x rounded to bfloat16, back = y as float.
__global__ void bf16_round(const float* x, __nv_bfloat16* y, float* back, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = __float2bfloat16_rn(x[i]);
        back[i] = __bfloat162float(y[i]);
    }
}

// Lanes 0-15 shuffle while 16-31 wait in __syncthreads: a deadlock on a GPU too.
__global__ void deadlock(int* out) {
    if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
    else __syncthreads();
}
"""


@pytest.fixture(scope="module")
def sync_lib(tmp_path_factory):
    path = tmp_path_factory.mktemp("shim") / "sync.cu"
    path.write_text(SYNC_SOURCE)
    return cuda_shim.build(str(path), ["block_ops<double>", "block_ops<int>", "elementwise",
                                       "bf16_round", "deadlock"])


@pytest.mark.parametrize("ctype, dtype", [("double", np.float64), ("int", np.int32)])
def test_shim_runs_shared_memory_barriers_and_shuffles(sync_lib, rng, ctype, dtype):
    blocks, threads = 3, 128
    x = rng.integers(-50, 50, blocks * threads).astype(dtype)
    out = [np.zeros_like(x) for _ in range(3)]
    sums = np.zeros(blocks, dtype)
    for _ in range(2):  # the second launch, too, runs threaded (the kernel synchronises)
        sync_lib.launch(f"block_ops<{ctype}>", blocks, threads, (x, out[0], sums, out[1], out[2]))
        warps = x.reshape(-1, 32)
        assert np.array_equal(out[0], np.cumsum(warps, axis=1).reshape(-1))
        assert np.array_equal(sums, x.reshape(blocks, threads).sum(axis=1))
        assert np.array_equal(out[1], np.repeat(warps[:, 3], 32))
        assert np.array_equal(out[2], np.repeat(warps.sum(axis=1), 32))


def test_shim_fast_path_for_kernels_without_sync(sync_lib):
    x = np.arange(1000, dtype=np.float32)
    for _ in range(3):  # first launch probes block 0 threaded, the rest runs sequentially
        y = np.zeros_like(x)
        sync_lib.launch("elementwise", 3, 64, (x, y, np.int32(x.size)))
        assert np.array_equal(y, 2 * x)


def test_shim_bfloat16_rounds_to_nearest_even(sync_lib, rng):
    """__float2bfloat16_rn on the shim is ml_dtypes' float32 -> bfloat16 (round to nearest
    even) bit for bit on random bit patterns, ties, signed zeros, subnormals and infinities;
    a NaN stays a NaN (CUDA's canonical 0x7fff); __bfloat162float is exact."""
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**16, 2000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    special = np.array([0, 0x80000000, 0x7f800000, 0xff800000, 0x7f7fffff, 0x00000001,
                        0x7f7f8000, 0x3f808000, 0x3f818000, 0x7fc00000, 0xffc00001],
                       np.uint32)
    x = np.concatenate([bits, ties, special]).view(np.float32)
    y, back = np.empty(x.size, BF16), np.empty(x.size, np.float32)
    sync_lib.launch("bf16_round", 4, 64, (x, y, back, np.int32(x.size)))
    nan = np.isnan(x)
    with np.errstate(invalid="ignore"):
        expected = x.astype(BF16)
    assert np.array_equal(y.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
    assert np.all(y.view(np.uint16)[nan] == 0x7fff)
    assert np.array_equal(back.view(np.uint32), y.astype(np.float32).view(np.uint32))


def test_shim_reports_deadlock(sync_lib, monkeypatch):
    monkeypatch.setenv("CUDA_SHIM_DEADLOCK_SECONDS", "1")
    with pytest.raises(cuda_shim.KernelFault, match="deadlock"):
        sync_lib.launch("deadlock", 1, 64, (np.zeros(64, np.int32),))


# ------------------------------------------------------------------------ kernels end to end

@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_forward(lib, rng, shape, dtype, aligned):
    """stats (real block reductions), merge and apply against float64 NumPy."""
    x = _data(rng, shape, dtype, loc=2.0, scale=1.5)
    C, A = shape[1], bn_kernels.stats_dtype(dtype)
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    x0 = x.copy()
    p = _prepared(shape, dtype, aligned)
    y, stats, part = forward(lib, x, gamma, beta, p)
    ry, mean64, var64, inv64 = ref_forward(x, gamma, beta)
    assert not np.isnan(part).any(), "a partial slot is never written"
    assert not np.isnan(y).any() and not np.isnan(stats).any(), "outputs left unwritten"
    assert rel(y, ry) < TOL[np.dtype(dtype)] * (5 if dtype in (np.float16, BF16) else 10)
    assert rel(stats[0], mean64) < stats_tol(dtype)
    assert rel(stats[0].astype(np.float64) + stats[3], mean64) < stats_tol(dtype)
    assert rel(stats[1], var64) < 5 * stats_tol(dtype)
    assert rel(stats[2], inv64) < 5 * stats_tol(dtype)
    assert np.array_equal(x, x0)
    # deterministic: the same bits again
    y2, stats2, _ = forward(lib, x, gamma, beta, p)
    assert np.array_equal(y, y2) and np.array_equal(stats, stats2)


@pytest.mark.parametrize("convention, given", [("cs231n", 3), ("torch", 3), ("torch", 0),
                                               ("cs231n", 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 5, 8, 16), (64, 12, 1, 1)])
def test_train_forward_running_stats(lib, rng, shape, dtype, convention, given):
    """The merge's running rows follow gpulayers.batchnorm's conventions (the factors
    bn_kernels.bn_train_forward_update_gpu passes), absent running stats as 0 / 0 or 1."""
    x = _data(rng, shape, dtype, loc=1.5, scale=2.0)
    C, A = shape[1], np.dtype(dtype)
    M = x.size // C
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    rm, rv = _data(rng, C, A), (rng.random(C) + 0.5).astype(A)
    m = 0.9 if convention == "cs231n" else 0.1
    keep, take, unbiased, default = ((m, 1 - m, False, 0.0) if convention == "cs231n"
                                     else (1 - m, m, True, 1.0))
    _, stats, _ = forward(lib, x, gamma, beta, running=(rm if given & 1 else None,
                                                        rv if given & 2 else None),
                          keep=keep, take=take, unbiased=unbiased, default=default)
    _, mean64, var64, _ = ref_forward(x, gamma, beta)
    rm0 = rm.astype(np.float64) if given & 1 else np.zeros(C)
    rv0 = rv.astype(np.float64) if given & 2 else np.full(C, default)
    factor = M / (M - 1) if unbiased else 1.0
    assert rel(stats[4], keep * rm0 + take * mean64) < 10 * TOL[A]
    assert rel(stats[5], keep * rv0 + take * var64 * factor) < 10 * TOL[A]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward(lib, rng, shape, dtype):
    """The apply kernel in test mode: y and the invstd that backward needs."""
    x = _data(rng, shape, dtype, loc=-1.0, scale=2.0)
    C, A = shape[1], bn_kernels.stats_dtype(dtype)
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    mean, var = _data(rng, C, A), (rng.random(C) + 0.2).astype(A)
    p = _prepared(shape, dtype)
    y, invstd = np.full_like(x, np.nan), np.full(C, np.nan, A)
    launches = bn_kernels._eval_forward_launches(p, x, gamma, beta, mean, var, EPS, invstd, y)
    assert _run(lib, launches) == [p.kernels["apply"][1]]
    inv64 = 1 / np.sqrt(var.astype(np.float64) + EPS)
    s = (1, -1, 1, 1)
    ref = (x.astype(np.float64) - mean.reshape(s)) * (inv64 * gamma).reshape(s) + beta.reshape(s)
    assert rel(y, ref) < TOL[np.dtype(dtype)]
    assert rel(invstd, inv64) < stats_tol(dtype)


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward(lib, rng, shape, dtype, aligned, train):
    """backward reduce (real block reductions), merge and dx against float64 NumPy."""
    x = _data(rng, shape, dtype, loc=0.5, scale=2.0)
    dout = _data(rng, shape, dtype)
    C, A = shape[1], bn_kernels.stats_dtype(dtype)
    gamma = _data(rng, C, A)
    if train:
        _, mean, _, invstd = ref_forward(x, gamma, gamma)
    else:
        mean, invstd = rng.standard_normal(C), 1 / np.sqrt(rng.random(C) + 0.5)
    mean, invstd = mean.astype(A), invstd.astype(A)
    inputs = [a.copy() for a in (dout, x)]
    dx, dgamma, dbeta = backward(lib, dout, x, gamma, mean, invstd, train,
                                 p=_prepared(shape, dtype, aligned))
    rdx, rdg, rdb = ref_backward(dout, x, gamma, mean, invstd, train)
    assert not np.isnan(dx).any(), "outputs left unwritten"
    tol = TOL[np.dtype(dtype)]
    assert rel(dx, rdx, dx_scale(dout, gamma, invstd)) < 10 * tol
    assert rel(dgamma, rdg) < 10 * stats_tol(dtype) and rel(dbeta, rdb) < 10 * stats_tol(dtype)
    assert np.array_equal(dout, inputs[0]) and np.array_equal(x, inputs[1])


@pytest.mark.parametrize("shape", [(2, 5, 8, 16), (3, 5, 9, 11)])
def test_planes_stride_over_channels(lib, rng, shape):
    """Planes kernels with fewer grid rows than channels (as for C > 65535) cover them all."""
    x = _data(rng, shape, np.float32, loc=1.0, scale=2.0)
    dout = _data(rng, shape, np.float32)
    C = shape[1]
    gamma, beta = _data(rng, C, np.float32), _data(rng, C, np.float32)
    p = _prepared(shape, np.float32)
    assert p.plan.layout == "planes"
    p = dataclasses.replace(p, plan=dataclasses.replace(p.plan, grid=(p.plan.grid[0], 2)))
    y, stats, _ = forward(lib, x, gamma, beta, p)
    ry, mean64, var64, _ = ref_forward(x, gamma, beta)
    assert rel(y, ry) < 1e-5 and rel(stats[1], var64) < 1e-5
    dx, dgamma, dbeta = backward(lib, dout, x, gamma, stats[0], stats[2], True, stats[3], p)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, mean64, 1 / np.sqrt(var64 + EPS), True)
    assert rel(dx, rdx, dx_scale(dout, gamma, stats[2])) < 1e-5
    assert rel(dgamma, rdg) < 1e-5 and rel(dbeta, rdb) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 6, 16), (3, 4, 4, 70), (2, 3, 3, 5), (40, 6)],
                         ids=["c16", "c70", "c5", "2d"])
def test_channels_last_as_columns(lib, rng, shape, dtype):
    """(N, *spatial, C) channels-last data normalised as its (M, C, 1, 1) matrix: forward,
    statistics and backward against the reference of the channels-first transpose; y and dx
    come back in the channels-last layout (a reshape, no copy)."""
    x_last = _data(rng, shape, dtype, loc=1.0, scale=2.0)
    dout_last = _data(rng, shape, dtype)
    C, A = shape[-1], bn_kernels.stats_dtype(dtype)
    M = x_last.size // C
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    x, dout = x_last.reshape(M, C, 1, 1), dout_last.reshape(M, C, 1, 1)
    p = _prepared(x.shape, dtype)
    assert p.plan.layout == "columns"
    y, stats, _ = forward(lib, x, gamma, beta, p)
    first = (lambda a: np.moveaxis(a, -1, 1)[..., None, None] if a.ndim == 2
             else np.moveaxis(a, -1, 1))
    x_first = first(x_last)
    ry, mean64, var64, inv64 = ref_forward(x_first.reshape(x_first.shape[:2] + (-1, 1)),
                                           gamma, beta)
    tol = TOL[np.dtype(dtype)]
    assert rel(first(y.reshape(shape)).reshape(ry.shape), ry) < 10 * tol
    assert rel(stats[0], mean64) < stats_tol(dtype) and rel(stats[1], var64) < 5 * stats_tol(dtype)
    dx, dgamma, dbeta = backward(lib, dout, x, gamma, stats[0], stats[2], True, stats[3], p)
    d_first = first(dout_last)
    rdx, rdg, rdb = ref_backward(d_first.reshape(ry.shape), x_first.reshape(ry.shape), gamma,
                                 mean64, inv64, True)
    scale = dx_scale(d_first.reshape(ry.shape), gamma, inv64)
    assert rel(first(dx.reshape(shape)).reshape(ry.shape), rdx, scale) < 10 * tol
    assert rel(dgamma, rdg) < 10 * stats_tol(dtype) and rel(dbeta, rdb) < 10 * stats_tol(dtype)


def test_bfloat16_outputs_round_to_nearest_even(lib):
    """The apply kernel's bfloat16 output is the float32 result rounded to nearest even (what
    ml_dtypes' astype does), the shim's __float2bfloat16_rn included; NaN stays NaN."""
    C = 4
    base = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -1.0 - 2**-8, 1.0 + 2**-9, 0.0,
                     -0.0, np.inf, -np.inf, np.nan, 3.0e38, 1e-40], np.float32)
    x = np.resize(base, 16 * C).reshape(16, C, 1, 1).astype(BF16)
    # invstd 1: y = x*gamma, with ties (1 + 2**-8 is halfway between bfloat16 neighbours)
    gamma = np.array([1.0, 1 + 2**-8, 1 + 2**-9 + 2**-11, 0.7], np.float32)
    beta = np.zeros(C, np.float32)
    mean, var = np.zeros(C, np.float32), np.full(C, 1 - EPS, np.float32)
    scale = (1 / np.sqrt(np.float64(var[0]) + EPS)).astype(np.float32)
    for aligned in (True, False):
        p = _prepared(x.shape, BF16, aligned)
        y, invstd = np.full_like(x, np.nan), np.full(C, np.nan, np.float32)
        _run(lib, bn_kernels._eval_forward_launches(p, x, gamma, beta, mean, var, EPS, invstd,
                                                    y))
        ref = (((x.astype(np.float32) - mean.reshape(1, -1, 1, 1)) * 1)
               * (gamma * invstd).reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1))
        assert np.array_equal(np.isnan(y.astype(np.float32)), np.isnan(ref))
        assert np.array_equal(y.astype(np.float32), ref.astype(BF16).astype(np.float32),
                              equal_nan=True)
        assert float(invstd[0]) == float(scale) == 1.0


# ------------------------------------------------------------------------ precision

PRECISION_SHAPES = [(4, 3, 16, 16), (64, 3, 1, 1), (20, 3, 3, 3)]  # planes, columns, columns


@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("shape", PRECISION_SHAPES)
def test_stats_independent_of_an_outlying_first_sample(lib, rng, shape, aligned):
    """A channel whose first element is 1000 sigma out: the old shift by x[0, c, 0, 0] lost
    ~1e-4 of the variance in float32; centred (Welford/Chan) merges keep it to 1e-6."""
    x = _data(rng, shape, np.float32, loc=0.5, scale=1.0)
    x[0, 0, 0, 0] = 1000.0
    x[0, 1, 0, 0] = -1000.0
    C = shape[1]
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    y, stats, _ = forward(lib, x, gamma, beta, _prepared(shape, np.float32, aligned))
    ry, mean64, var64, _ = ref_forward(x, gamma, beta)
    assert np.max(np.abs(stats[1] - var64) / var64) < 1e-6
    assert np.max(np.abs(stats[0] + stats[3].astype(np.float64) - mean64)
                  / np.sqrt(var64)) < 1e-6
    assert rel(y, ry) < 1e-5


@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("shape", PRECISION_SHAPES)
def test_large_mean_and_constant_channel(lib, rng, shape, aligned):
    """float32 data of mean 1e4 and std 0.1 keeps its variance and (mean + mean_lo) its mean;
    a constant channel has var 0 exactly, y 0, no NaN."""
    x = _data(rng, shape, np.float32, loc=1e4, scale=0.1)
    x[:, 1] = np.float32(1e4 + 0.5)
    C = shape[1]
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    y, stats, _ = forward(lib, x, gamma, beta, _prepared(shape, np.float32, aligned))
    ry, mean64, var64, _ = ref_forward(x, gamma, beta)
    assert np.isfinite(stats).all() and np.isfinite(y).all()
    assert stats[1, 1] == 0 and stats[3, 1] == 0 and np.all(y[:, 1] == 0)
    live = [0, 2]
    assert np.max(np.abs(stats[1, live] - var64[live]) / var64[live]) < 1e-6
    # mean + mean_lo keeps what a float32 mean of 1e4 rounds off (up to 5e-4)
    assert np.abs(stats[0].astype(np.float64) + stats[3] - mean64).max() < 1e-6
    assert np.abs(y - ry).max() < 1e-4


@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("shape", PRECISION_SHAPES)
def test_backward_uses_mean_lo(lib, rng, shape, aligned):
    """Mean 1e4, std 0.1, float32: with the forward's mean_lo, dx, dgamma and dbeta match the
    float64 reference to float32 accuracy (with the rounded mean alone dgamma was off by
    up to ~1e-2 relative)."""
    x = _data(rng, shape, np.float32, loc=1e4, scale=0.1)
    dout = _data(rng, shape, np.float32)
    C = shape[1]
    gamma, beta = (rng.random(C) + 0.5).astype(np.float32), np.zeros(C, np.float32)
    p = _prepared(shape, np.float32, aligned)
    _, stats, _ = forward(lib, x, gamma, beta, p)
    _, mean64, var64, inv64 = ref_forward(x, gamma, beta)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, mean64, inv64, True)
    dx, dgamma, dbeta = backward(lib, dout, x, gamma, stats[0], stats[2], True, stats[3], p)
    assert rel(dgamma, rdg) < 1e-5 and rel(dbeta, rdb) < 1e-5
    assert rel(dx, rdx, dx_scale(dout, gamma, inv64)) < 1e-5
    # test mode with mean_lo: dgamma uses mean + mean_lo too
    _, dgamma, _ = backward(lib, dout, x, gamma, stats[0], stats[2], False, stats[3], p)
    assert rel(dgamma, rdg) < 1e-5


# ------------------------------------------------------------------------ alignment

def _misaligned(a):
    """A C-contiguous copy of ``a`` at an address one element past a 16-byte boundary."""
    flat = np.empty(a.size + 16 // a.itemsize + 1, a.dtype)
    skip = (-flat.ctypes.data % 16) // a.itemsize + 1
    view = flat[skip:skip + a.size].reshape(a.shape)
    view[...] = a
    assert view.ctypes.data % 16 == a.itemsize
    return view


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16])
@pytest.mark.parametrize("shape", [(2, 5, 8, 16), (64, 16, 1, 1)], ids=["planes", "columns"])
def test_misaligned_input(lib, rng, shape, dtype):
    """The vector kernels fault on a misaligned view (every vector load and store checks);
    vectors_allowed sends such input to the scalar kernels, which give the right results."""
    x, dout = _data(rng, shape, dtype, 1.0, 2.0), _data(rng, shape, dtype)
    C, S = shape[1], bn_kernels.stats_dtype(dtype)
    A = np.dtype(dtype)
    gamma, beta = _data(rng, C, S), _data(rng, C, S)
    xm, dm = _misaligned(x), _misaligned(dout)
    vec = _prepared(shape, dtype, True)
    assert vec.plan.vec > 1
    with pytest.raises(cuda_shim.KernelFault, match="misaligned address: bn::load"):
        forward(lib, xm, gamma, beta, vec)
    _, stats, _ = forward(lib, x, gamma, beta, vec)
    with pytest.raises(cuda_shim.KernelFault, match="misaligned address: bn::load"):
        backward(lib, dm, x, gamma, stats[0], stats[2], True, stats[3], vec)
    # a misaligned output is caught at the store
    y = _misaligned(np.zeros_like(x))
    with pytest.raises(cuda_shim.KernelFault, match="misaligned address: bn::store"):
        _run(lib, bn_kernels._eval_forward_launches(vec, x, gamma, beta, stats[0], stats[1],
                                                    EPS, np.zeros(C, S), y))
    # the launchers' choice
    assert bn_kernels.vectors_allowed(x) and bn_kernels.vectors_allowed(x, dout)
    assert not bn_kernels.vectors_allowed(xm) and not bn_kernels.vectors_allowed(x, dm)
    scalar = _prepared(shape, dtype, bn_kernels.vectors_allowed(xm, dm))
    assert scalar.plan.vec == 1
    y, stats, _ = forward(lib, xm, gamma, beta, scalar)
    ry, mean64, var64, inv64 = ref_forward(x, gamma, beta)
    assert rel(y, ry) < 10 * TOL[A] and rel(stats[1], var64) < 10 * TOL[S]
    dx, dgamma, dbeta = backward(lib, dm, xm, gamma, stats[0], stats[2], True, stats[3], scalar)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, mean64, inv64, True)
    assert rel(dx, rdx, dx_scale(dout, gamma, inv64)) < 10 * TOL[A]
    assert rel(dgamma, rdg) < 10 * TOL[S]


def test_vectors_allowed():
    x = np.zeros(8, np.float32)
    assert bn_kernels.vectors_allowed(x, None) is True  # NumPy's data are 16-byte aligned
    assert bn_kernels.vectors_allowed(x[1:]) is False
    assert bn_kernels.vectors_allowed(x, x[2:]) is False


# ------------------------------------------------------------------------ tuning

def test_tuning_knobs():
    plan = plan_layout((256, 2048, 7, 7), np.float16, num_sms=132, columns_blocks_per_sm=8)
    assert plan.layout == "columns" and plan.grid == (2, 392)
    plan = plan_layout((256, 64, 112, 112), np.float32, num_sms=132, blocks_per_sm=8)
    assert 7 * 132 <= plan.grid[0] * plan.grid[1] <= 8 * 132
    before = dict(bn_kernels.TUNING)
    try:
        bn_kernels.set_tuning(blocks_per_sm=2)
        assert plan_layout((256, 64, 112, 112), np.float32, num_sms=132).grid[0] == 4
        with pytest.raises(ValueError, match="unknown tuning knobs"):
            bn_kernels.set_tuning(threads=128)
        with pytest.raises(ValueError, match="positive int"):
            bn_kernels.set_tuning(blocks_per_sm=0)
    finally:
        bn_kernels.set_tuning(**before)
    assert bn_kernels.TUNING == before


# ------------------------------------------------------------------------ 2 launches = 3 launches

REFERENCE_SOURCE = r"""
// The merge kernels of the 3-launch path (batchnorm.cu until 2026-12), verbatim but renamed:
// stats -> bn_stats_merge_ref -> apply, and reduce -> bn_backward_merge_ref -> dx.
template <typename A>
__global__ void bn_stats_merge_ref(
        const A* __restrict__ part, int C, int slots, double eps,
        const A* __restrict__ running_mean, const A* __restrict__ running_var, int given,
        double keep, double take, double var_factor, double var_default,
        A* __restrict__ stats) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const unsigned long long row = (unsigned long long)C * slots;
    const A* p = part + (unsigned long long)c * slots;
    double n[4] = {0.0, 0.0, 0.0, 0.0};
    bn::Moments<double> acc[4] = {};
    int k = 0;
    for (; k + 4 <= slots; k += 4)
        for (int u = 0; u < 4; ++u) bn::merge_slot(n[u], acc[u], p, row, k + u);
    for (; k < slots; ++k) bn::merge_slot(n[0], acc[0], p, row, k);
    bn::merge_double(n[0], acc[0], n[1], acc[1]);
    bn::merge_double(n[2], acc[2], n[3], acc[3]);
    bn::merge_double(n[0], acc[0], n[2], acc[2]);
    const double mu = acc[0].hi + acc[0].lo, v = n[0] > 0.0 ? acc[0].m2 / n[0] : 0.0;
    const A m = (A)mu;
    const double rm = (given & 1) ? (double)running_mean[c] : 0.0;
    const double rv = (given & 2) ? (double)running_var[c] : var_default;
    stats[bn::kMean * C + c] = m;
    stats[bn::kVar * C + c] = (A)v;
    stats[bn::kInvstd * C + c] = (A)(1.0 / sqrt(v + eps));
    stats[bn::kMeanLo * C + c] = (A)((acc[0].hi - (double)m) + acc[0].lo);
    stats[bn::kRunMean * C + c] = (A)(keep * rm + take * mu);
    stats[bn::kRunVar * C + c] = (A)(keep * rv + take * (v * var_factor));
}

template <typename A>
__global__ void bn_backward_merge_ref(
        const A* __restrict__ part, int C, int slots, const A* __restrict__ invstd,
        A* __restrict__ dgamma, A* __restrict__ dbeta) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const A* p1 = part + (unsigned long long)c * slots;
    const A* p2 = p1 + (unsigned long long)C * slots;
    double s1[4] = {0.0, 0.0, 0.0, 0.0}, s2[4] = {0.0, 0.0, 0.0, 0.0};
    int k = 0;
    for (; k + 4 <= slots; k += 4)
        for (int u = 0; u < 4; ++u) {
            s1[u] += (double)p1[k + u];
            s2[u] += (double)p2[k + u];
        }
    for (; k < slots; ++k) {
        s1[0] += (double)p1[k];
        s2[0] += (double)p2[k];
    }
    dbeta[c] = (A)((s1[0] + s1[1]) + (s1[2] + s1[3]));
    dgamma[c] = (A)((double)invstd[c] * ((s2[0] + s2[1]) + (s2[2] + s2[3])));
}
"""


@pytest.fixture(scope="module")
def ref_lib(tmp_path_factory):
    """batchnorm.cu (its text, so the shim's cache follows it) plus REFERENCE_SOURCE."""
    if cuda_shim.compiler() is None:
        pytest.skip("no C++ compiler for the CPU shim")
    text = resources.files("gpulayers.cuda").joinpath(bn_kernels.SOURCE).read_text()
    path = tmp_path_factory.mktemp("ref") / "batchnorm_ref.cu"
    path.write_text(text + REFERENCE_SOURCE)
    return cuda_shim.build(str(path), [f"bn_{k}_merge_ref<{t}>" for k in ("stats", "backward")
                                       for t in ("float", "double")])


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _ctype(A):
    return "double" if A == np.float64 else "float"


def reference_forward(lib, ref_lib, x, gamma, beta, p, running=(None, None), keep=1.0, take=0.0,
                      factor=1.0, default=0.0):
    """The 3-launch train forward: bn_stats_* (lib), bn_stats_merge_ref, and the apply
    arithmetic of those kernels in NumPy, op by op in the stats dtype (the shim compiles
    without FMA contraction, so this is bit for bit). Returns (y, stats)."""
    C, A = x.shape[1], bn_kernels.stats_dtype(x.dtype)
    part = np.full(p.part_size, np.nan, A)
    lib.launch(p.kernels["stats"][1], p.plan.grid, THREADS, (x, part, p.C) + p.plan.args)
    rm, rv = running
    given = (rm is not None) | (rv is not None) << 1
    stats = np.full((len(bn_kernels.STAT_ROWS), C), np.nan, A)
    ref_lib.launch(f"bn_stats_merge_ref<{_ctype(A)}>", -(-C // THREADS), THREADS,
                   (part, p.C, p.slots, np.float64(EPS), part if rm is None else rm,
                    part if rv is None else rv, np.int32(given), np.float64(keep),
                    np.float64(take), np.float64(factor), np.float64(default), stats))
    s = (1, -1, 1, 1)
    m, lo = stats[0].reshape(s), stats[3].reshape(s)
    y = ((x.astype(A) - m) - lo) * (gamma * stats[2]).reshape(s) + beta.reshape(s)
    return y.astype(x.dtype), stats


def reference_backward(lib, ref_lib, dout, x, gamma, mean, invstd, mean_lo, train, p):
    """The 3-launch backward: reduce (lib), bn_backward_merge_ref, and (train) the dx
    arithmetic of the dx kernels in NumPy, op by op. Returns (dx, dgamma, dbeta)."""
    C, A = x.shape[1], bn_kernels.stats_dtype(x.dtype)
    part = np.full(p.part_size, np.nan, A)
    dx = np.full_like(x, np.nan)
    with_lo = np.int32(mean_lo is not None)
    lo = mean if mean_lo is None else mean_lo
    lib.launch(p.kernels["reduce_train" if train else "reduce_test"][1], p.plan.grid, THREADS,
               (dout, x, gamma, mean, lo, invstd, part, dx, with_lo, p.C) + p.plan.args)
    dgamma, dbeta = np.full(C, np.nan, A), np.full(C, np.nan, A)
    ref_lib.launch(f"bn_backward_merge_ref<{_ctype(A)}>", -(-C // THREADS), THREADS,
                   (part, p.C, p.slots, invstd, dgamma, dbeta))
    if train:
        s = (1, -1, 1, 1)
        a = gamma * invstd
        count = float(p.count)
        e = (-a.astype(np.float64) * invstd.astype(np.float64) * dgamma.astype(np.float64)
             / count).astype(A)
        f = (-a.astype(np.float64) * dbeta.astype(np.float64) / count).astype(A)
        lo = lo if mean_lo is not None else np.zeros(C, A)
        xc = (x.astype(A) - mean.reshape(s)) - lo.reshape(s)
        dx = ((a.reshape(s) * dout.astype(A) + e.reshape(s) * xc) + f.reshape(s)).astype(x.dtype)
    return dx, dgamma, dbeta


BIT_SHAPES = SHAPES + [
    (40, 2, 32, 32),   # planes, 10 slots (10 % 4 = 2: chain 0 takes the last two)
    (16, 512, 1, 1),   # columns, 64 to 256 channels per tile (tile_constants' passes)
    (1, 3, 40, 40),    # planes, N = 1
]


@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BIT_SHAPES)
def test_two_launch_forward_is_the_three_launch_result(lib, ref_lib, rng, shape, dtype, aligned):
    """Train forward: stats + apply (merging in every block) gives the bits of stats + merge
    kernel + apply: y and the whole stats block (running rows included)."""
    x = _data(rng, shape, dtype, loc=2.0, scale=1.5)
    C, A = shape[1], bn_kernels.stats_dtype(dtype)
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    rm, rv = _data(rng, C, A), (rng.random(C) + 0.5).astype(A)
    p = _prepared(shape, dtype, aligned)
    y, stats, _ = forward(lib, x, gamma, beta, p, (rm, rv), 0.9, 0.1, True, 1.0)
    ry, rstats = reference_forward(lib, ref_lib, x, gamma, beta, p, (rm, rv), 0.9, 0.1,
                                   p.unbiased, 1.0)
    assert same_bits(stats, rstats)
    assert same_bits(y, ry)


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BIT_SHAPES)
def test_two_launch_backward_is_the_three_launch_result(lib, ref_lib, rng, shape, dtype, train):
    """Backward: reduce + dx (merging in every block) gives the bits of reduce + merge
    kernel + dx; the test-mode merge (4 lanes per channel) those of the old merge kernel."""
    x, dout = _data(rng, shape, dtype, loc=0.5, scale=2.0), _data(rng, shape, dtype)
    C, A = shape[1], bn_kernels.stats_dtype(dtype)
    gamma = _data(rng, C, A)
    p = _prepared(shape, dtype)
    _, stats, _ = forward(lib, x, gamma, gamma, p)
    mean, invstd, lo = (np.ascontiguousarray(stats[r]) for r in (0, 2, 3))
    got = backward(lib, dout, x, gamma, mean, invstd, train, lo, p)
    want = reference_backward(lib, ref_lib, dout, x, gamma, mean, invstd, lo, train, p)
    for g, w in zip(got, want):
        assert same_bits(g, w)


# ------------------------------------------------------------------------ small planes (issue 13)

ISSUE_SHAPES = [(256, 512, 14, 14), (256, 2048, 7, 7), (1024, 64, 8, 8)]


@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
@pytest.mark.parametrize("shape", ISSUE_SHAPES)
def test_thread_utilisation_of_issue_shapes(shape, dtype, aligned):
    """At least 75% of the launched threads of every kernel have work on the issue's shapes."""
    share = bn_kernels.thread_utilisation(shape, np.dtype(dtype), aligned)
    assert set(share) == {"stats", "apply", "backward_reduce", "backward_dx", "backward_merge"}
    assert min(share.values()) >= 0.75, share


def test_thread_utilisation_values():
    """Known shares: 49 vectors of a (1, 512, 14, 14) float32 channel for a 256-thread block
    (the planes layout's small-batch limit); the test-mode merge at 4 threads per channel
    (C = 64: all 256 threads; the old one-thread-per-channel merge had 64 of 256); one row of
    (1, 2048, 7, 7) on 256-column-wide blocks (the old 32 x 8 blocks had 1 row in 8)."""
    share = bn_kernels.thread_utilisation((1, 512, 14, 14), np.float32)
    assert share["stats"] == 49 / 256
    assert bn_kernels.thread_utilisation((1024, 64, 8, 8), np.float32)["backward_merge"] == 1
    assert bn_kernels.thread_utilisation((2, 3, 4, 4), np.float32)["backward_merge"] == 12 / 256
    plan = plan_layout((1, 2048, 7, 7), np.float32)
    assert plan.layout == "columns" and int(plan.args[1]) == 8  # 256 x 1 threads
    assert bn_kernels.thread_utilisation((1, 2048, 7, 7), np.float32)["stats"] == 1


# the issue's plane sizes, N (and C, for the shim's time) scaled down: 14x14 planes, 7x7
# columns with channels straddling 1024-column tiles, 8x8 columns
SMALL_PLANE_SHAPES = [(4, 64, 14, 14), (2, 512, 7, 7), (4, 64, 8, 8)]


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("shape", SMALL_PLANE_SHAPES, ids=["14x14", "7x7", "8x8"])
def test_small_planes(lib, ref_lib, rng, shape, dtype):
    """The issue's plane sizes with N scaled down for the shim: the layout of the full-size
    shape, >= 75% of launched threads with work, and train forward and backward right
    (float64 reference) and bit for bit the 3-launch result."""
    full = next(s for s in ISSUE_SHAPES if s[2:] == shape[2:])
    assert plan_layout(shape, dtype).layout == plan_layout(full, dtype).layout
    assert min(bn_kernels.thread_utilisation(shape, dtype).values()) >= 0.75
    x, dout = _data(rng, shape, dtype, loc=1.0, scale=2.0), _data(rng, shape, dtype)
    C, A = shape[1], bn_kernels.stats_dtype(dtype)
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    p = _prepared(shape, dtype)
    y, stats, _ = forward(lib, x, gamma, beta, p)
    ry, mean64, var64, inv64 = ref_forward(x, gamma, beta)
    tol = TOL[np.dtype(dtype)]
    assert rel(y, ry) < 10 * tol and rel(stats[1], var64) < 5 * stats_tol(dtype)
    y3, stats3 = reference_forward(lib, ref_lib, x, gamma, beta, p)
    assert same_bits(y, y3) and same_bits(stats, stats3)
    mean, invstd, lo = (np.ascontiguousarray(stats[r]) for r in (0, 2, 3))
    dx, dgamma, dbeta = backward(lib, dout, x, gamma, mean, invstd, True, lo, p)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, mean64, inv64, True)
    assert rel(dx, rdx, dx_scale(dout, gamma, inv64)) < 10 * tol
    assert rel(dgamma, rdg) < 10 * stats_tol(dtype) and rel(dbeta, rdb) < 10 * stats_tol(dtype)
    want = reference_backward(lib, ref_lib, dout, x, gamma, mean, invstd, lo, True, p)
    assert all(same_bits(g, w) for g, w in zip((dx, dgamma, dbeta), want))
