"""Batch-norm CUDA kernels (gpulayers/cuda/bn_kernels.py) against float64 NumPy and against
the NumPy path of gpulayers.batchnorm. Needs CuPy and a CUDA device; skips otherwise.
Also: the precision cases (an outlying first sample, mean 1e4 with std 0.1, a constant
channel, backward with mean_lo), misaligned inputs, C > 65535 and two devices.

Errors are normwise, max|a - b| / max|b|: at most 1e-10 for float64, 1e-5 for
float32, 1e-2 for float16. Outputs are poisoned (the memory pool hands back
NaN-filled blocks) so that an unwritten element fails.
"""

import numpy as np
import pytest

from gpulayers import backend
from gpulayers.cuda import bn_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cupy" not in backend.available_backends(),
                       reason=f"CuPy not usable: {backend.cupy_unusable_reason()}"),
]

TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2}
DTYPES = [np.float64, np.float32, np.float16]
EPS = 1e-5

SHAPES = [
    (4, 3, 5, 6),
    (2, 1, 7, 7),          # C = 1
    (5, 1, 1, 1),          # C = 1, H*W = 1
    (3, 4096, 1, 1),       # C = 4096, small N*H*W
    (2, 4096, 2, 3),
    (257, 33, 1, 1),       # plain batch norm (N, D)
    (1024, 512, 1, 1),
    (5, 7, 9, 11),         # odd sizes
    (1, 2, 1, 2),          # two values per channel
    (16, 64, 28, 28),
    (8, 96, 7, 7),
    (3, 5, 65, 1),         # planes, H*W just above the columns limit
    (2, 3, 512, 520),      # several blocks per channel
]


def cupy():
    import cupy as cp
    return cp


def rel(a, b, scale=None):
    """max|a - b| / max|b|, or / ``scale`` when given."""
    a = np.asarray(backend.to_numpy(a), np.float64)
    b = np.asarray(backend.to_numpy(b), np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)) if scale is None else scale, 1e-300))


def dx_scale(dout, gamma, invstd):
    """Size of the terms of dx: max|gamma*invstd*dout| (train dx can cancel to ~0, e.g. for
    two values per channel, where an error relative to dx itself means nothing)."""
    s = (1, -1, 1, 1)
    return float(np.max(np.abs(dout.astype(np.float64) * (gamma * invstd).reshape(s))))


def poison_pool(*shapes_dtypes):
    """Fill pool blocks of these sizes with NaN and free them, so the launchers'
    cupy.empty outputs start as NaN."""
    cp = cupy()
    blocks = [cp.full(shape, np.nan, dtype=dtype) for shape, dtype in shapes_dtypes]
    cp.cuda.Device().synchronize()
    del blocks


def ref_forward(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(var + eps)
    s = (1, -1, 1, 1)
    y = (x - mean.reshape(s)) * invstd.reshape(s) * gamma.reshape(s) + beta.reshape(s)
    return y, mean, var, invstd


def ref_backward(dout, x, gamma, mean, invstd, train):
    s = (1, -1, 1, 1)
    d = dout.astype(np.float64)
    xhat = (x.astype(np.float64) - mean.reshape(s)) * invstd.reshape(s)
    dbeta = d.sum(axis=(0, 2, 3))
    dgamma = (d * xhat).sum(axis=(0, 2, 3))
    M = x.size // x.shape[1]
    if train:
        dx = (gamma * invstd).reshape(s) / M * (M * d - dbeta.reshape(s) - xhat * dgamma.reshape(s))
    else:
        dx = d * (gamma * invstd).reshape(s)
    return dx, dgamma, dbeta


def make(rng, shape, dtype, loc=1.0, scale=2.0):
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    C = shape[1]
    sd = bn_kernels.stats_dtype(dtype)
    gamma = (rng.standard_normal(C) + 1).astype(sd)
    beta = rng.standard_normal(C).astype(sd)
    return x, gamma, beta


def to_gpu(*arrays):
    cp = cupy()
    return [cp.asarray(a) for a in arrays]


def stats_tol(dtype):
    """Statistics are float32 for float16 input: judged at float32 accuracy."""
    return TOL[np.dtype(np.float32)] if np.dtype(dtype) == np.float16 else TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_forward(rng, shape, dtype):
    x, gamma, beta = make(rng, shape, dtype)
    X, G, B = to_gpu(x, gamma, beta)
    copies = [a.copy() for a in (X, G, B)]
    C, sd = shape[1], bn_kernels.stats_dtype(dtype)
    poison_pool((shape, dtype), ((C,), sd), ((C,), sd), ((C,), sd))
    y, mean, var, invstd = bn_kernels.bn_train_forward_gpu(X, G, B, EPS)
    ry, rmean, rvar, rinv = ref_forward(x, gamma, beta, EPS)
    assert y.dtype == dtype and y.shape == shape
    assert mean.dtype == var.dtype == invstd.dtype == sd and mean.shape == (C,)
    assert rel(y, ry) < TOL[np.dtype(dtype)]
    assert rel(mean, rmean) < stats_tol(dtype)
    assert rel(var, rvar) < stats_tol(dtype)
    assert rel(invstd, rinv) < stats_tol(dtype)
    for a, b in zip((X, G, B), copies):
        assert bool((a == b).all()), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward(rng, shape, dtype):
    x, gamma, beta = make(rng, shape, dtype)
    C, sd = shape[1], bn_kernels.stats_dtype(dtype)
    rm, rv = rng.standard_normal(C).astype(sd), (rng.random(C) + 0.5).astype(sd)
    X, G, B, RM, RV = to_gpu(x, gamma, beta, rm, rv)
    copies = [a.copy() for a in (X, RM, RV)]
    poison_pool((shape, dtype))
    y = bn_kernels.bn_eval_forward_gpu(X, G, B, RM, RV, EPS)
    s = (1, -1, 1, 1)
    ref = ((x.astype(np.float64) - rm.reshape(s)) / np.sqrt(rv.astype(np.float64) + EPS).reshape(s)
           * gamma.reshape(s) + beta.reshape(s))
    assert y.dtype == dtype and rel(y, ref) < TOL[np.dtype(dtype)]
    for a, b in zip((X, RM, RV), copies):
        assert bool((a == b).all())


@pytest.mark.parametrize("convention", ["cs231n", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:8])
def test_train_forward_update(rng, shape, dtype, convention):
    """Running statistics updated by the train apply kernel (which merges the partials):
    new arrays, inputs unchanged."""
    x, gamma, beta = make(rng, shape, dtype)
    C, sd = shape[1], bn_kernels.stats_dtype(dtype)
    M = x.size // C
    rm, rv = rng.standard_normal(C).astype(sd), (rng.random(C) + 0.5).astype(sd)
    X, G, B, RM, RV = to_gpu(x, gamma, beta, rm, rv)
    copies = [a.copy() for a in (RM, RV)]
    m = 0.9 if convention == "cs231n" else 0.1
    y, mean, var, invstd, nrm, nrv = bn_kernels.bn_train_forward_update_gpu(
        X, G, B, EPS, RM, RV, m, convention)
    ry, rmean, rvar, _ = ref_forward(x, gamma, beta, EPS)
    if convention == "cs231n":
        em, ev = m * rm + (1 - m) * rmean, m * rv + (1 - m) * rvar
    else:
        em, ev = (1 - m) * rm + m * rmean, (1 - m) * rv + m * rvar * M / max(M - 1, 1)
    assert rel(y, ry) < TOL[np.dtype(dtype)]
    assert nrm.dtype == nrv.dtype == sd and nrm.shape == nrv.shape == (C,)
    assert rel(nrm, em) < stats_tol(dtype) and rel(nrv, ev) < stats_tol(dtype)
    for a, b in zip((RM, RV), copies):
        assert bool((a == b).all()), "a running statistic was modified"
    # absent running stats: zeros, and ones for torch's running_var
    _, _, _, _, nrm, nrv = bn_kernels.bn_train_forward_update_gpu(X, G, B, EPS, None, None, m,
                                                                  convention)
    rv0 = 1.0 if convention == "torch" else 0.0
    em = (1 - m) * rmean if convention == "cs231n" else m * rmean
    ev = (m * rv0 + (1 - m) * rvar if convention == "cs231n"
          else (1 - m) * rv0 + m * rvar * M / max(M - 1, 1))
    assert rel(nrm, em) < stats_tol(dtype) and rel(nrv, ev) < stats_tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward_stats(rng, shape, dtype):
    """The eval kernel also returns invstd = 1/sqrt(var + eps), every channel written."""
    x, gamma, beta = make(rng, shape, dtype)
    C, sd = shape[1], bn_kernels.stats_dtype(dtype)
    rm, rv = rng.standard_normal(C).astype(sd), (rng.random(C) + 0.5).astype(sd)
    poison_pool(((C,), sd))
    y, mean, invstd = bn_kernels.bn_eval_forward_stats_gpu(*to_gpu(x, gamma, beta, rm, rv), EPS)
    assert invstd.dtype == sd and mean.dtype == sd
    assert rel(invstd, 1 / np.sqrt(rv.astype(np.float64) + EPS)) < stats_tol(dtype)
    assert rel(mean, rm) == 0


@pytest.mark.parametrize("knobs", [{"blocks_per_sm": 1}, {"blocks_per_sm": 16},
                                   {"columns_blocks_per_sm": 1}, {"columns_blocks_per_sm": 32}])
def test_tuning_variants_agree(rng, knobs):
    before = dict(bn_kernels.TUNING)
    try:
        bn_kernels.set_tuning(**knobs)
        for shape in [(16, 64, 28, 28), (8, 96, 7, 7), (1024, 512, 1, 1)]:
            x, gamma, beta = make(rng, shape, np.float32)
            y, _, _, _ = bn_kernels.bn_train_forward_gpu(*to_gpu(x, gamma, beta), EPS)
            assert rel(y, ref_forward(x, gamma, beta, EPS)[0]) < 1e-5
    finally:
        bn_kernels.set_tuning(**before)


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward(rng, shape, dtype, train):
    x, gamma, _ = make(rng, shape, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    C, sd = shape[1], bn_kernels.stats_dtype(dtype)
    if train:
        _, mean, _, invstd = ref_forward(x, gamma, gamma, EPS)
    else:
        mean, invstd = rng.standard_normal(C), 1 / np.sqrt(rng.random(C) + 0.5)
    mean, invstd = mean.astype(sd), invstd.astype(sd)
    D, X, G, MEAN, INV = to_gpu(dout, x, gamma, mean, invstd)
    copies = [a.copy() for a in (D, X, G, MEAN, INV)]
    poison_pool((shape, dtype), ((C,), sd), ((C,), sd))
    dx, dgamma, dbeta = bn_kernels.bn_backward_gpu(D, X, G, MEAN, INV, train)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, mean, invstd, train)
    assert dx.dtype == dtype and dgamma.dtype == dbeta.dtype == sd
    assert rel(dx, rdx, dx_scale(dout, gamma, invstd)) < TOL[np.dtype(dtype)]
    assert rel(dgamma, rdg) < stats_tol(dtype)
    assert rel(dbeta, rdb) < stats_tol(dtype)
    for a, b in zip((D, X, G, MEAN, INV), copies):
        assert bool((a == b).all()), "an input was modified"


def test_large_mean_float32(rng):
    x = (rng.standard_normal((64, 4, 16, 16)) * 0.1 + 1e4).astype(np.float32)
    x[:, 2] = np.float32(1e4 + 0.5)  # constant channel
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    y, mean, var, invstd = bn_kernels.bn_train_forward_gpu(*to_gpu(x, gamma, beta), EPS)
    ry, rmean, rvar, _ = ref_forward(x, gamma, beta, EPS)
    assert rel(var, rvar) < 1e-4
    y = backend.to_numpy(y).astype(np.float64)
    assert np.all(y[:, 2] == 0)
    assert np.abs(y - ry).max() < 1e-3
    np.testing.assert_allclose(y[:, [0, 1, 3]].std(axis=(0, 2, 3)), 1, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_unaligned_input_uses_scalar_loads(rng, dtype):
    cp = cupy()
    shape = (4, 6, 8, 8)
    x, gamma, beta = make(rng, shape, dtype)
    flat = cp.empty(x.size + 1, dtype=dtype)
    flat[1:] = cp.asarray(x.reshape(-1))
    X = flat[1:].reshape(shape)  # contiguous, 2 or 4 bytes off 16-byte alignment
    assert X.data.ptr % 16 != 0
    y, _, _, _ = bn_kernels.bn_train_forward_gpu(X, *to_gpu(gamma, beta), EPS)
    assert rel(y, ref_forward(x, gamma, beta, EPS)[0]) < TOL[np.dtype(dtype)]


def test_non_contiguous_input(rng):
    x, gamma, beta = make(rng, (6, 4, 5, 7), np.float32)
    X = cupy().asarray(x.transpose(0, 1, 3, 2).copy()).transpose(0, 1, 3, 2)
    y, _, _, _ = bn_kernels.bn_train_forward_gpu(X, *to_gpu(gamma, beta), EPS)
    assert rel(y, ref_forward(x, gamma, beta, EPS)[0]) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (64, 10, 1, 1), (3, 2, 17, 19)])
def test_matches_numpy_path_of_gpulayers(rng, shape, dtype):
    """The kernels against gpulayers.batchnorm's NumPy path (the reference semantics)."""
    from gpulayers import batchnorm
    x, gamma, beta = make(rng, shape, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    for mode in ("train", "test"):
        param = {"mode": mode, "eps": EPS}
        if mode == "test":
            C = shape[1]
            param.update(running_mean=rng.standard_normal(C).astype(np.float32),
                         running_var=(rng.random(C) + 0.5).astype(np.float32))
        out, cache = batchnorm.spatial_batchnorm_forward(x, gamma, beta, dict(param))
        dx, dgamma, dbeta = batchnorm.spatial_batchnorm_backward(dout, cache)
        sd = bn_kernels.stats_dtype(dtype)
        if mode == "train":
            y, mean, _, invstd = bn_kernels.bn_train_forward_gpu(*to_gpu(x, gamma, beta), EPS)
        else:
            rm = param["running_mean"].astype(sd)
            rv = param["running_var"].astype(sd)
            y = bn_kernels.bn_eval_forward_gpu(*to_gpu(x, gamma, beta, rm, rv), EPS)
            mean, invstd = to_gpu(rm, (1 / np.sqrt(rv.astype(np.float64) + EPS)).astype(sd))
        kdx, kdg, kdb = bn_kernels.bn_backward_gpu(*to_gpu(dout, x, gamma), mean, invstd,
                                                   mode == "train")
        tol = TOL[np.dtype(dtype)]
        assert rel(y, out) < tol
        assert rel(kdx, dx, dx_scale(dout, gamma, backend.to_numpy(invstd))) < tol
        assert rel(kdg, dgamma) < 2 * tol and rel(kdb, dbeta) < 2 * tol


# ------------------------------------------------------------------------ precision, alignment,
# devices (the shim tests in test_cuda_shim_bn.py check the same on the CPU)

def test_outlying_first_sample_float32(rng):
    """Centred (Welford/Chan) statistics: a first element 1000 sigma out costs no accuracy."""
    x = (rng.standard_normal((8, 4, 16, 16)) + 0.5).astype(np.float32)
    x[0, 0, 0, 0], x[0, 1, 0, 0] = 1000.0, -1000.0
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    y, mean, var, invstd = bn_kernels.bn_train_forward_gpu(*to_gpu(x, gamma, beta), EPS)
    ry, rmean, rvar, _ = ref_forward(x, gamma, beta, EPS)
    assert np.max(np.abs(backend.to_numpy(var) - rvar) / rvar) < 1e-6
    assert rel(y, ry) < 1e-5


def test_backward_with_mean_lo_large_mean_float32(rng):
    """Mean 1e4, std 0.1: with the forward's mean_lo the backward matches float64."""
    shape = (4, 3, 16, 16)
    x = (rng.standard_normal(shape) * 0.1 + 1e4).astype(np.float32)
    dout = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = (rng.random(3) + 0.5).astype(np.float32), np.zeros(3, np.float32)
    X, G, B, D = to_gpu(x, gamma, beta, dout)
    _, stats = bn_kernels.bn_train_forward_block_gpu(X, G, B, EPS, None, None, 0.9, "cs231n")
    _, rmean, _, rinv = ref_forward(x, gamma, beta, EPS)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, rmean, rinv, True)
    dx, dgamma, dbeta = bn_kernels.bn_backward_gpu(D, X, G, stats[0], stats[2], True,
                                                   mean_lo=stats[3])
    assert rel(dgamma, rdg) < 1e-5 and rel(dbeta, rdb) < 1e-5
    assert rel(dx, rdx, dx_scale(dout, gamma, rinv)) < 1e-5


def test_large_mean_constant_channel_var_is_zero(rng):
    x = (rng.standard_normal((16, 3, 8, 8)) * 0.1 + 1e4).astype(np.float32)
    x[:, 1] = np.float32(1e4 + 0.5)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, stats = bn_kernels.bn_train_forward_block_gpu(*to_gpu(x, gamma, beta), EPS, None, None,
                                                     0.9, "cs231n")
    stats = backend.to_numpy(stats)
    _, rmean, rvar, _ = ref_forward(x, gamma, beta, EPS)
    assert stats[1, 1] == 0 and np.isfinite(stats).all()
    assert np.abs(stats[0].astype(np.float64) + stats[3] - rmean).max() < 1e-6
    assert np.max(np.abs(stats[1, [0, 2]] - rvar[[0, 2]]) / rvar[[0, 2]]) < 1e-6
    assert np.all(backend.to_numpy(y)[:, 1] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_unaligned_backward_uses_scalar_loads(rng, dtype):
    cp = cupy()
    shape = (4, 6, 8, 8)
    x, gamma, _ = make(rng, shape, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    flat = cp.empty(x.size + 1, dtype=dtype)
    flat[1:] = cp.asarray(dout.reshape(-1))
    D = flat[1:].reshape(shape)
    assert D.data.ptr % 16 != 0 and not bn_kernels.vectors_allowed(D)
    _, mean, _, invstd = ref_forward(x, gamma, gamma, EPS)
    sd = bn_kernels.stats_dtype(dtype)
    mean, invstd = mean.astype(sd), invstd.astype(sd)
    dx, dgamma, dbeta = bn_kernels.bn_backward_gpu(D, *to_gpu(x, gamma, mean, invstd), True)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, mean, invstd, True)
    assert rel(dx, rdx, dx_scale(dout, gamma, invstd)) < TOL[np.dtype(dtype)]
    assert rel(dgamma, rdg) < stats_tol(dtype)


def test_supported_and_shapes_beyond_the_grid(rng):
    assert bn_kernels.supported((2, 3, 4, 4)) is None
    assert "zero-size" in bn_kernels.supported((0, 3, 4, 4))
    # more channels than gridDim.y takes: the planes kernels stride over them
    shape = (1, 65537, 9, 9)
    x, gamma, beta = make(rng, shape, np.float32)
    y, mean, var, _ = bn_kernels.bn_train_forward_gpu(*to_gpu(x, gamma, beta), EPS)
    ry, rmean, rvar, _ = ref_forward(x, gamma, beta, EPS)
    assert rel(y, ry) < 1e-5 and rel(var, rvar) < 1e-5


def test_arrays_on_two_devices_are_rejected(rng):
    cp = cupy()
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one CUDA device")
    x, gamma, beta = make(rng, (2, 3, 4, 4), np.float32)
    X = cp.asarray(x)
    with cp.cuda.Device(1):
        G, B = cp.asarray(gamma), cp.asarray(beta)
    with pytest.raises(ValueError, match="different CUDA devices"):
        bn_kernels.bn_train_forward_gpu(X, G, B, EPS)
    with cp.cuda.Device(1):  # the arrays' device, not the current one, decides
        X1 = cp.asarray(x)
    y, _, _, _ = bn_kernels.bn_train_forward_gpu(X1, G, B, EPS)
    assert y.device.id == 1 and rel(y, ref_forward(x, gamma, beta, EPS)[0]) < 1e-5


# ----------------------------------------------------------- bfloat16 and channels-last

def _bf16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (16, 64, 28, 28), (257, 33, 1, 1),
                                   (8, 96, 7, 7), (2, 3, 512, 520)])
def test_bfloat16(rng, shape, train):
    """bfloat16 input (statistics in float32), both layouts, against float64 NumPy: y and dx
    within bfloat16 rounding (2e-2 normwise), the statistics at float32 accuracy."""
    bf16 = _bf16()
    x, gamma, beta = make(rng, shape, bf16)
    dout = rng.standard_normal(shape).astype(bf16)
    X, G, B, D = to_gpu(x, gamma, beta, dout)
    y, mean, var, invstd = bn_kernels.bn_train_forward_gpu(X, G, B, EPS)
    ry, rmean, rvar, rinv = ref_forward(x, gamma, beta, EPS)
    assert y.dtype == bf16 and mean.dtype == np.float32
    assert rel(y, ry) < 2e-2
    assert rel(mean, rmean) < 1e-5 and rel(var, rvar) < 1e-5
    dx, dgamma, dbeta = bn_kernels.bn_backward_gpu(D, X, G, mean, invstd, train)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, rmean, rinv, train)
    assert dx.dtype == bf16
    assert rel(dx, rdx, dx_scale(dout, gamma, rinv)) < 2e-2
    assert rel(dgamma, rdg) < 1e-4 and rel(dbeta, rdb) < 1e-4


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(8, 14, 14, 96), (4, 7, 7, 2048), (64, 56, 56, 64)])
def test_channels_last_against_torch(rng, shape, dtype):
    """(N, H, W, C) data normalised as its (N*H*W, C, 1, 1) matrix (the columns layout)
    against PyTorch's batch_norm on the same values in the channels_last memory format."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    npd = _bf16() if dtype == "bfloat16" else np.dtype(dtype)
    cp = cupy()
    C = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(npd)
    gamma = (rng.standard_normal(C) + 1).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    M = x.size // C
    y, mean, var, invstd = bn_kernels.bn_train_forward_gpu(cp.asarray(x).reshape(M, C, 1, 1),
                                                           cp.asarray(gamma), cp.asarray(beta),
                                                           EPS)
    tx = torch.from_numpy(np.moveaxis(x.astype(np.float64), -1, 1).copy()).cuda()
    tx = tx.to(getattr(torch, dtype)).contiguous(memory_format=torch.channels_last)
    ty = torch.nn.functional.batch_norm(tx, None, None, torch.from_numpy(gamma).cuda(),
                                        torch.from_numpy(beta).cuda(), True, 0.1, EPS)
    ref = np.moveaxis(ty.detach().double().cpu().numpy(), 1, -1)
    tol = {"float32": 1e-5}.get(dtype, 2e-2)
    assert rel(y.reshape(shape), ref) < tol
    x64 = x.astype(np.float64).reshape(M, C)
    assert rel(var, x64.var(0)) < 1e-5


ISSUE_SHAPES = [(256, 512, 14, 14), (256, 2048, 7, 7), (1024, 64, 8, 8), (1, 2048, 7, 7)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", ISSUE_SHAPES)
def test_small_planes_and_merge_in_every_block(rng, shape, dtype):
    """Issue 13's small-plane shapes (and N = 1): 2-launch train forward and backward against
    float64 NumPy on a few channels, deterministic bit for bit, and the merges inside the apply
    and dx blocks give the bits of the test-mode merge kernel (dgamma, dbeta)."""
    cp = cupy()
    C = shape[1]
    sd = bn_kernels.stats_dtype(dtype)
    X = (cp.random.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dtype)
    D = cp.random.standard_normal(shape, dtype=np.float32).astype(dtype)
    gamma, beta = (rng.standard_normal(C) + 1).astype(sd), rng.standard_normal(C).astype(sd)
    G, B = to_gpu(gamma, beta)
    y, stats = bn_kernels.bn_train_forward_block_gpu(X, G, B, EPS, None, None, 0.9, "cs231n")
    y2, stats2 = bn_kernels.bn_train_forward_block_gpu(X, G, B, EPS, None, None, 0.9, "cs231n")
    assert cp.array_equal(y, y2) and cp.array_equal(stats, stats2)
    mean, invstd, lo = stats[0], stats[2], stats[3]
    dx, dgamma, dbeta = bn_kernels.bn_backward_gpu(D, X, G, mean, invstd, True, mean_lo=lo)
    _, tdgamma, tdbeta = bn_kernels.bn_backward_gpu(D, X, G, mean, invstd, False, mean_lo=lo)
    assert cp.array_equal(dgamma, tdgamma) and cp.array_equal(dbeta, tdbeta)
    idx = np.array(sorted({0, 1 % C, C // 2, C - 1}))
    x, d = cp.asnumpy(X[:, idx]), cp.asnumpy(D[:, idx])
    ry, rmean, rvar, rinv = ref_forward(x, gamma[idx], beta[idx], EPS)
    tol = TOL[np.dtype(dtype)]
    assert rel(y[:, idx], ry) < 10 * tol and rel(stats[1][idx], rvar) < 10 * stats_tol(dtype)
    rdx, rdg, rdb = ref_backward(d, x, gamma[idx], rmean, rinv, True)
    assert rel(dx[:, idx], rdx, dx_scale(d, gamma[idx], rinv)) < 10 * tol
    assert rel(dgamma[idx], rdg) < 10 * stats_tol(dtype)
    assert rel(dbeta[idx], rdb) < 10 * stats_tol(dtype)
