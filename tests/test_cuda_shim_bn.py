"""Batch-norm kernels of gpulayers/cuda/batchnorm.cu run on the CPU through the host shim.

The shim (tests/cuda_shim) runs kernels without block-level synchronisation, so
this covers the elementwise kernels (normalize, train-mode dx) and the two merge
kernels (statistics, running-statistics update, gradients), in float32 and float64, launched exactly as bn_kernels.py launches them
(same plan, grid and argument types). The block reductions use shared memory
and run only on a GPU (tests/test_bn_kernels_gpu.py); here a Python model of
their partial sums (which block writes which slot) feeds the merge kernels.
"""
from importlib import resources

import numpy as np
import pytest

from gpulayers.cuda import bn_kernels
from gpulayers.cuda.bn_kernels import plan_layout

cuda_shim = pytest.importorskip("cuda_shim")

THREADS = 256
CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
VEC = {np.dtype(np.float32): 4, np.dtype(np.float64): 2}
DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13}

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


def _expressions():
    out = []
    for ctype, vec in (("float", 4), ("double", 2)):
        for v in (1, vec):
            for layout in ("planes", "columns"):
                out += [f"bn_apply_{layout}<{ctype}, {v}>", f"bn_backward_dx_{layout}<{ctype}, {v}>"]
        out += [f"bn_stats_merge<{ctype}>", f"bn_backward_merge<{ctype}>"]
    return out


@pytest.fixture(scope="module")
def lib():
    if cuda_shim.compiler() is None:
        pytest.skip("no C++ compiler for the CPU shim")
    source = resources.files("gpulayers.cuda").joinpath(bn_kernels.SOURCE)
    expressions = _expressions()
    assert set(expressions) <= set(bn_kernels.NAME_EXPRESSIONS)
    return cuda_shim.build(str(source), expressions)


def rel(a, b):
    """Normwise relative error max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _data(rng, shape, dtype, loc=0.0, scale=1.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def _expr(kind, plan, dtype):
    return f"bn_{kind}_{plan.layout}<{CTYPE[np.dtype(dtype)]}, {plan.vec}>"


def _plan(shape, dtype, aligned=True):
    return plan_layout(shape, dtype, aligned=aligned, num_sms=132)


def _partials(shape, plan, a, b):
    """Python model of a block reduction's partial sums: part[0/1][c][slot] = sums of a and
    of b over the elements each block covers, placed in the slots the kernel writes.

    a, b: float64 arrays of the tensor's shape (N, C, H, W).
    """
    N, C, H, W = shape
    hw = H * W
    if C == 1:
        N, hw = 1, N * hw
    a, b = a.reshape(N, C, hw), b.reshape(N, C, hw)
    S = plan.grid[0]
    part = np.full((2, C, plan.slots), np.nan)
    if plan.layout == "planes":
        chunk = int(plan.args[4]) * plan.vec
        for c in range(C):
            fa, fb = a[:, c, :].reshape(-1), b[:, c, :].reshape(-1)
            for blk in range(S):
                part[0, c, blk] = fa[blk * chunk:(blk + 1) * chunk].sum()
                part[1, c, blk] = fb[blk * chunk:(blk + 1) * chunk].sum()
        return part
    tx = 1 << int(plan.args[1])
    chunk, width = int(plan.args[3]), C * hw
    span = tx * plan.vec
    ma, mb = a.reshape(N, width), b.reshape(N, width)
    for blk in range(S):
        rows = slice(blk * chunk, (blk + 1) * chunk)
        for tile in range(plan.grid[1]):
            t0, t1 = tile * span, min(tile * span + span, width)
            for c in range(t0 // hw, (t1 - 1) // hw + 1):
                lo, hi = max(c * hw, t0), min((c + 1) * hw, t1)
                which = 0 if c * hw >= t0 else 1
                slot = 2 * blk + which
                assert np.isnan(part[0, c, slot]), "slot written twice"
                part[0, c, slot] = ma[rows, lo:hi].sum()
                part[1, c, slot] = mb[rows, lo:hi].sum()
                if which == 0 and (c + 1) * hw <= t1:
                    part[:, c, slot + 1] = 0.0
    return part


def _stats(x):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3))
    return mean, var


# ------------------------------------------------------------------------ plans (pure Python)

@pytest.mark.parametrize("shape, dtype, layout, vec", [
    ((256, 64, 112, 112), np.float32, "planes", 4),
    ((256, 256, 56, 56), np.float16, "planes", 8),
    ((256, 2048, 7, 7), np.float32, "columns", 4),
    ((256, 2048, 7, 7), np.float16, "columns", 8),
    ((32, 64, 56, 56), np.float64, "planes", 2),
    ((4096, 1024, 1, 1), np.float32, "columns", 4),
    ((1000, 1, 1, 1), np.float32, "planes", 4),
    ((3, 5, 7, 7), np.float32, "planes", 1),
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


@pytest.mark.parametrize("d", [1, 2, 3, 7, 49, 196, 3136, 12544, 2**20 + 1, 2**31 - 1])
def test_divider_magic(rng, d):
    magic, shift = bn_kernels._divider(d)
    assert 0 < magic < 2**32
    n = np.concatenate([rng.integers(0, 2**31, 2000), [0, d - 1, d, 2**31 - 1]]).astype(np.uint64)
    hi = (n * np.uint64(magic)) >> np.uint64(32)
    assert np.array_equal((hi + n) >> np.uint64(shift), n // np.uint64(d))


# ------------------------------------------------------------------------ kernels on the CPU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_matches_numpy(lib, rng, shape, dtype):
    x = _data(rng, shape, dtype, loc=3.0, scale=2.0)
    C = shape[1]
    A = np.dtype(dtype)
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    mean, var = _data(rng, C, A), (rng.random(C) + 0.2).astype(A)
    eps = 1e-5
    mean_lo = (rng.standard_normal(C) * 1e-3).astype(A)
    invstd = (1 / np.sqrt(var.astype(np.float64) + eps)).astype(A)
    bcast = (1, C, 1, 1)
    x0 = x.copy()
    plan = _plan(shape, dtype)
    # train: mean, mean_lo and invstd from the merge's stats block (the other rows and the
    # running-stat pointers are NaN: read, they would show); invstd_out is not written
    stats = np.full((len(bn_kernels.STAT_ROWS), C), np.nan, dtype=A)
    stats[0], stats[2], stats[3] = mean, invstd, mean_lo
    nans = np.full(C, np.nan, dtype=A)
    ref = ((x.astype(np.float64) - mean.reshape(bcast) - mean_lo.reshape(bcast))
           * invstd.reshape(bcast) * gamma.reshape(bcast) + beta.reshape(bcast))
    y, invstd_out = np.full_like(x, np.nan), nans.copy()
    lib.launch(_expr("apply", plan, dtype), plan.grid, THREADS,
               (x, gamma, beta, stats, nans, nans, np.int32(1), np.float64(eps), invstd_out,
                y, np.int32(C)) + plan.args)
    assert not np.isnan(y).any(), "outputs left unwritten"
    assert rel(y, ref) < TOL[A]
    assert np.isnan(invstd_out).all(), "train mode wrote invstd_out"
    # test: running mean and var; invstd = 1/sqrt(var + eps) comes back in invstd_out
    ref = ((x.astype(np.float64) - mean.reshape(bcast))
           * invstd.reshape(bcast) * gamma.reshape(bcast) + beta.reshape(bcast))
    y, invstd_out = np.full_like(x, np.nan), nans.copy()
    stats[:] = np.nan
    lib.launch(_expr("apply", plan, dtype), plan.grid, THREADS,
               (x, gamma, beta, stats, mean, var, np.int32(0), np.float64(eps), invstd_out,
                y, np.int32(C)) + plan.args)
    assert not np.isnan(y).any(), "outputs left unwritten"
    assert rel(y, ref) < TOL[A]
    assert rel(invstd_out, 1 / np.sqrt(var.astype(np.float64) + eps)) < TOL[A]
    assert np.array_equal(x, x0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_dx_matches_numpy(lib, rng, shape, dtype):
    x = _data(rng, shape, dtype, loc=-1.0, scale=3.0)
    dout = _data(rng, shape, dtype)
    C = shape[1]
    A = np.dtype(dtype)
    M = x.size // C
    gamma = _data(rng, C, A)
    mean64, var64 = _stats(x)
    mean, invstd = mean64.astype(A), (1 / np.sqrt(var64 + 1e-5)).astype(A)
    bcast = (1, C, 1, 1)
    xhat = (x.astype(np.float64) - mean.reshape(bcast)) * invstd.reshape(bcast)
    d64 = dout.astype(np.float64)
    dbeta, dgamma = d64.sum(axis=(0, 2, 3)), (d64 * xhat).sum(axis=(0, 2, 3))
    ref = ((gamma * invstd).reshape(bcast) / M
           * (M * d64 - dbeta.reshape(bcast) - xhat * dgamma.reshape(bcast)))
    inputs = [a.copy() for a in (dout, x)]
    plan = _plan(shape, dtype)
    dx = np.full_like(x, np.nan)
    lib.launch(_expr("backward_dx", plan, dtype), plan.grid, THREADS,
               (dout, x, gamma, mean, invstd, dgamma.astype(A), dbeta.astype(A),
                np.float64(M), dx, np.int32(C)) + plan.args)
    assert not np.isnan(dx).any(), "outputs left unwritten"
    assert rel(dx, ref) < 10 * TOL[A]
    assert np.array_equal(dout, inputs[0]) and np.array_equal(x, inputs[1])


def _merge_stats(lib, x, plan, part, running=(None, None), keep=1.0, take=0.0, var_factor=1.0,
                 var_default=0.0):
    """The merge kernel as bn_kernels launches it; returns its (6, C) block of STAT_ROWS."""
    N, C, H, W = x.shape
    A = np.dtype(x.dtype)
    stats = np.full((len(bn_kernels.STAT_ROWS), C), np.nan, dtype=A)
    rm, rv = running
    given = (rm is not None) | (rv is not None) << 1
    dummy = np.full(C, np.nan, dtype=A)  # passed for an absent running stat: never read
    lib.launch(f"bn_stats_merge<{CTYPE[A]}>", -(-C // THREADS), THREADS,
               (x, part.astype(A), np.int32(C), np.int32(plan.slots), np.int64(H * W),
                np.float64(x.size // C), np.float64(1e-5),
                dummy if rm is None else rm, dummy if rv is None else rv, np.int32(given),
                np.float64(keep), np.float64(take), np.float64(var_factor),
                np.float64(var_default), stats))
    return stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_two_level_stats_merge(lib, rng, shape, dtype):
    """Partial sums of (x - K) and (x - K)**2 per block (K = x[0, c, 0, 0]), as the stats
    kernels write them, merged by the merge kernel, give the float64 statistics."""
    x = _data(rng, shape, dtype, loc=2.0, scale=1.5)
    C = shape[1]
    shifted = x.astype(np.float64) - x[0, :, 0, 0].astype(np.float64).reshape(1, C, 1, 1)
    part = _partials(shape, plan := _plan(shape, dtype), shifted, shifted ** 2)
    assert not np.isnan(part).any(), "a partial slot is never written"
    mean, var, invstd, mean_lo, _, _ = _merge_stats(lib, x, plan, part)
    mean64, var64 = _stats(x)
    assert rel(mean, mean64) < TOL[np.dtype(dtype)]
    assert rel(mean.astype(np.float64) + mean_lo, mean64) < TOL[np.dtype(dtype)]
    assert rel(var, var64) < 10 * TOL[np.dtype(dtype)]
    assert rel(invstd, 1 / np.sqrt(var64 + 1e-5)) < 10 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_large_mean_and_constant_channel(lib, rng, dtype):
    """float32 data of mean 1e4 and std 0.1 keeps its variance; a constant channel has var 0."""
    shape = (16, 3, 6, 6)
    x = _data(rng, shape, dtype, loc=1e4, scale=0.1)
    x[:, 1] = np.asarray(7.25, dtype)
    C = shape[1]
    plan = _plan(shape, dtype)
    # the kernels sum in the stats dtype: model that rounding per element
    shifted = x - x[0, :, 0, 0].reshape(1, C, 1, 1)
    part = _partials(shape, plan, shifted.astype(np.float64),
                     (shifted * shifted).astype(np.float64))
    mean, var, invstd, mean_lo, _, _ = _merge_stats(lib, x, plan, part)
    mean64, var64 = _stats(x)
    assert var[1] == 0 and mean_lo[1] == 0 and np.isfinite(invstd).all()
    assert rel(var, var64) < 1e-5
    # mean + mean_lo keeps what a float32 mean of 1e4 rounds off (up to 5e-4)
    assert np.abs(mean.astype(np.float64) + mean_lo - mean64).max() < 1e-9 * 1e4


@pytest.mark.parametrize("given", [0, 1, 2, 3])
@pytest.mark.parametrize("convention", ["cs231n", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_updates_running_stats(lib, rng, dtype, convention, given):
    """The merge's running rows follow gpulayers.batchnorm's conventions (the factors
    bn_kernels.bn_train_forward_update_gpu passes), with absent running stats as 0 / 0 or 1."""
    shape = (6, 5, 3, 4)
    x = _data(rng, shape, dtype, loc=-2.0, scale=3.0)
    C, M = shape[1], x.size // shape[1]
    A = np.dtype(dtype)
    shifted = x.astype(np.float64) - x[0, :, 0, 0].astype(np.float64).reshape(1, C, 1, 1)
    plan = _plan(shape, dtype)
    part = _partials(shape, plan, shifted, shifted ** 2)
    rm, rv = _data(rng, C, A), (rng.random(C) + 0.5).astype(A)
    m = 0.9 if convention == "cs231n" else 0.1
    if convention == "cs231n":
        keep, take, factor, default = m, 1 - m, 1.0, 0.0
    else:
        keep, take, factor, default = 1 - m, m, M / (M - 1), 1.0
    running = (rm if given & 1 else None, rv if given & 2 else None)
    stats = _merge_stats(lib, x, plan, part, running, keep, take, factor, default)
    assert not np.isnan(stats).any()
    mean64, var64 = _stats(x)
    rm0 = rm.astype(np.float64) if given & 1 else np.zeros(C)
    rv0 = rv.astype(np.float64) if given & 2 else np.full(C, default)
    if convention == "cs231n":
        ref_m, ref_v = m * rm0 + (1 - m) * mean64, m * rv0 + (1 - m) * var64
    else:
        ref_m, ref_v = (1 - m) * rm0 + m * mean64, (1 - m) * rv0 + m * var64 * M / (M - 1)
    assert rel(stats[4], ref_m) < 10 * TOL[A]
    assert rel(stats[5], ref_v) < 10 * TOL[A]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:6])
def test_backward_merge(lib, rng, shape, dtype):
    x = _data(rng, shape, dtype)
    dout = _data(rng, shape, dtype)
    C = shape[1]
    A = np.dtype(dtype)
    mean64, var64 = _stats(x)
    mean, invstd = mean64.astype(A), (1 / np.sqrt(var64 + 1e-5)).astype(A)
    d64 = dout.astype(np.float64)
    centered = x.astype(np.float64) - mean.reshape(1, C, 1, 1)
    plan = _plan(shape, dtype)
    part = _partials(shape, plan, d64, d64 * centered).astype(A)
    dgamma, dbeta = np.full(C, np.nan, A), np.full(C, np.nan, A)
    lib.launch(f"bn_backward_merge<{CTYPE[A]}>", -(-C // THREADS), THREADS,
               (part, np.int32(C), np.int32(plan.slots), invstd, dgamma, dbeta))
    xhat = centered * invstd.reshape(1, C, 1, 1)
    assert rel(dbeta, d64.sum(axis=(0, 2, 3))) < TOL[A]
    assert rel(dgamma, (d64 * xhat).sum(axis=(0, 2, 3))) < TOL[A]


# ------------------------------------------------------------------------ launchers' arguments

def _prepared(shape, dtype):
    """bn_kernels' launch preparation with name expressions for kernel handles."""
    return bn_kernels.prepare(shape, np.dtype(dtype), True, 132, lambda e: (None, e))


def _run_on_shim(lib, launches, skip):
    """Run the launches (as bn_kernels builds them) on the shim, but the block reductions
    ``skip`` (their partial sums are modelled by the caller); the shim checks every
    argument against the kernel's C signature."""
    ran = []
    for (_, expression), grid, args in launches:
        if expression.startswith(skip):
            continue
        lib.launch(expression, grid, THREADS, args)
        ran.append(expression)
    return ran


@pytest.mark.parametrize("convention, given", [("cs231n", 3), ("torch", 3), ("torch", 0),
                                               ("cs231n", 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:6])
def test_train_forward_launches(lib, rng, shape, dtype, convention, given):
    """bn_kernels._train_forward_launches, run on the shim after modelled stats partials:
    y, batch statistics and the running-statistics update of either convention."""
    x = _data(rng, shape, dtype, loc=1.5, scale=2.0)
    C, A = shape[1], np.dtype(dtype)
    M = x.size // C
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    rm, rv = _data(rng, C, A), (rng.random(C) + 0.5).astype(A)
    m = 0.9 if convention == "cs231n" else 0.1
    keep, take, unbiased, default = ((m, 1 - m, False, 0.0) if convention == "cs231n"
                                     else (1 - m, m, True, 1.0))
    p = _prepared(shape, dtype)
    part = np.full(p.part_size, np.nan, A)
    stats = np.full((len(bn_kernels.STAT_ROWS), C), np.nan, A)
    y = np.full_like(x, np.nan)
    launches = bn_kernels._train_forward_launches(
        p, x, gamma, beta, 1e-5, rm if given & 1 else None, rv if given & 2 else None, given,
        keep, take, unbiased, default, part, stats, y)
    assert [k[1] for k, _, _ in launches] == [p.kernels[n][1] for n in ("stats", "merge", "apply")]
    shifted = x.astype(np.float64) - x[0, :, 0, 0].astype(np.float64).reshape(1, C, 1, 1)
    part[:] = _partials(shape, p.plan, shifted, shifted ** 2).ravel()
    assert len(_run_on_shim(lib, launches, "bn_stats_" + p.plan.layout)) == 2
    mean64, var64 = _stats(x)
    ref, _, _, _ = _ref_forward(x, gamma, beta)
    assert rel(y, ref) < 10 * TOL[A]
    assert rel(stats[0], mean64) < TOL[A] and rel(stats[1], var64) < 10 * TOL[A]
    rm0 = rm.astype(np.float64) if given & 1 else np.zeros(C)
    rv0 = rv.astype(np.float64) if given & 2 else np.full(C, default)
    factor = M / (M - 1) if unbiased else 1.0
    assert rel(stats[4], keep * rm0 + take * mean64) < 10 * TOL[A]
    assert rel(stats[5], keep * rv0 + take * var64 * factor) < 10 * TOL[A]


def _ref_forward(x, gamma, beta, eps=1e-5):
    mean64, var64 = _stats(x)
    s = (1, -1, 1, 1)
    invstd = 1 / np.sqrt(var64 + eps)
    xhat = (x.astype(np.float64) - mean64.reshape(s)) * invstd.reshape(s)
    return xhat * gamma.reshape(s) + beta.reshape(s), mean64, var64, invstd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward_launches(lib, rng, shape, dtype):
    """bn_kernels._eval_forward_launches on the shim: y and the invstd that backward needs."""
    x = _data(rng, shape, dtype, loc=-1.0, scale=2.0)
    C, A = shape[1], np.dtype(dtype)
    gamma, beta = _data(rng, C, A), _data(rng, C, A)
    mean, var = _data(rng, C, A), (rng.random(C) + 0.2).astype(A)
    p = _prepared(shape, dtype)
    y, invstd = np.full_like(x, np.nan), np.full(C, np.nan, A)
    launches = bn_kernels._eval_forward_launches(p, x, gamma, beta, mean, var, 1e-5, invstd, y)
    assert _run_on_shim(lib, launches, "none") == [p.kernels["apply"][1]]
    inv64 = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    s = (1, -1, 1, 1)
    ref = (x.astype(np.float64) - mean.reshape(s)) * (inv64 * gamma).reshape(s) + beta.reshape(s)
    assert rel(y, ref) < TOL[A]
    assert rel(invstd, inv64) < TOL[A]


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:6])
def test_backward_launches(lib, rng, shape, dtype, train):
    """bn_kernels._backward_launches on the shim after modelled reduce partials: dgamma,
    dbeta and (train) dx."""
    x = _data(rng, shape, dtype, loc=0.5, scale=2.0)
    dout = _data(rng, shape, dtype)
    C, A = shape[1], np.dtype(dtype)
    M = x.size // C
    gamma = _data(rng, C, A)
    mean64, var64 = _stats(x)
    mean, invstd = mean64.astype(A), (1 / np.sqrt(var64 + 1e-5)).astype(A)
    p = _prepared(shape, dtype)
    part = np.full(p.part_size, np.nan, A)
    dx = np.full_like(x, np.nan)
    dgamma, dbeta = np.full(C, np.nan, A), np.full(C, np.nan, A)
    launches = bn_kernels._backward_launches(p, dout, x, gamma, mean, invstd, train, part, dx,
                                             dgamma, dbeta)
    assert len(launches) == (3 if train else 2)
    s = (1, -1, 1, 1)
    d64 = dout.astype(np.float64)
    centered = x.astype(np.float64) - mean.reshape(s)
    part[:] = _partials(shape, p.plan, d64, d64 * centered).ravel()
    _run_on_shim(lib, launches, "bn_backward_reduce_")
    xhat = centered * invstd.reshape(s)
    db, dg = d64.sum(axis=(0, 2, 3)), (d64 * xhat).sum(axis=(0, 2, 3))
    assert rel(dbeta, db) < TOL[A] and rel(dgamma, dg) < TOL[A]
    if train:
        ref = (gamma * invstd).reshape(s) / M * (M * d64 - db.reshape(s) - xhat * dg.reshape(s))
        scale = np.abs(d64 * (gamma * invstd).reshape(s)).max()
        assert np.abs(dx - ref).max() / scale < 10 * TOL[A]


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
