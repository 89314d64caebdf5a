"""Batch norm over the rows of an (M, C) matrix on NumPy.

This is the NumPy path of batch norm on (N, D) input and of channels-last spatial batch
norm, whose (N, *spatial, C) input is the (N*prod(spatial), C) matrix of its rows (a
view, also for a channels-first-shaped array in PyTorch's channels_last memory
format). A forward allocates its output and (C,) vectors, not a normalized or centred
copy of x, and the cache keeps x itself (a reference, as PyTorch's saved tensors).

float32 and float64 x run the compiled loop kernels (gpulayers.cpu_kernels.bn, the
``*_rows`` kernels) while ``cpu_kernels.enabled()``: blocks of rows in parallel, float64
statistics (shifted two-pass per block, Chan merges in block order), float64 backward
sums in block order, each output in one pass. The block size is a function of the
shape only, so the results are bitwise repeatable and do not depend on the thread count.

Other dtypes (float16, bfloat16), or runs without the kernels, take the plain NumPy
path below: statistics in the stats dtype, shifted by each channel's first sample, then
centred by the mean (never E[x^2] - E[x]^2); whole-array ufuncs, single-threaded.

Both paths make x C-contiguous first, so every memory layout gives the same bits.
"""
from __future__ import annotations

import numpy as np

from . import cpu_kernels, numpy_fast
from .cpu_kernels import bn as _bnk

__all__ = ["train_forward", "eval_forward", "backward"]


def _kernel_rows(x):
    """True when the compiled kernels take x (and its thread count is set)."""
    if x.dtype not in _bnk.DTYPES or not cpu_kernels.enabled():
        return False
    return True


def train_forward(x, gamma, beta, eps, sd):
    """Train-mode BN of the rows of x.

    Inputs:
    - x: array (M, C), float16/32/64 or bfloat16
    - gamma, beta: (C,) arrays in the stats dtype sd
    - eps: float
    - sd: stats dtype (float32 or float64)

    Returns a tuple of:
    - y: array (M, C), dtype of x
    - mean, var (biased), invstd: (C,) arrays in sd
    - x: the C-contiguous x the statistics were taken from (for the cache)
    """
    x = np.ascontiguousarray(x)
    M, C = x.shape
    if _kernel_rows(x):
        y = np.empty(x.shape, x.dtype)
        mean, var, invstd = np.empty(C, sd), np.empty(C, sd), np.empty(C, sd)
        _bnk.train_forward_rows.run(x.size, x, gamma, beta, float(eps), _bnk.row_block(M, C),
                                    y, mean, var, invstd)
        return y, mean, var, invstd, x
    pivot = x[0].astype(sd)
    t = np.subtract(x, pivot, dtype=sd)
    shift = (np.add.reduce(t, axis=0) / M).astype(sd)
    t -= shift
    var = (np.einsum("ij,ij->j", t, t) / M).astype(sd)
    invstd = (1 / np.sqrt(var.astype(np.float64) + eps)).astype(sd)
    t *= gamma * invstd
    t += beta
    return t.astype(x.dtype, copy=False), pivot + shift, var, invstd, x


def eval_forward(x, gamma, beta, mean, invstd, sd):
    """Test-mode BN of the rows of x with given statistics.

    Inputs: x (M, C); gamma, beta, mean, invstd: (C,) arrays in sd.

    Returns a tuple of:
    - y: array (M, C), dtype of x: (x - mean) * (gamma * invstd) + beta
    - x: the C-contiguous x (for the cache)
    """
    x = np.ascontiguousarray(x)
    M, C = x.shape
    if _kernel_rows(x):
        y = np.empty(x.shape, x.dtype)
        _bnk.eval_forward_rows.run(x.size, x, gamma, beta, mean, invstd, _bnk.row_block(M, C),
                                   y)
        return y, x
    t = np.subtract(x, mean, dtype=sd)
    t *= gamma * invstd
    t += beta
    return t.astype(x.dtype, copy=False), x


def backward(dout, x, gamma, mean, invstd, count, train, sd):
    """BN backward over the rows of x (the forward's C-contiguous x).

    Inputs:
    - dout: array (M, C), dtype of x
    - x, gamma, mean, invstd: as the forward kept them (gamma, mean, invstd (C,) in sd)
    - count: M, the values per channel
    - train: whether the statistics were the batch's (else constants)
    - sd: stats dtype

    Returns a tuple of:
    - dx: array (M, C), dtype of x
    - dgamma, dbeta: (C,) arrays in sd
    """
    dout = np.ascontiguousarray(dout)
    x = np.ascontiguousarray(x)
    M, C = x.shape
    if dout.dtype == x.dtype and _kernel_rows(x):
        if count != M:
            raise ValueError(f"bn_rows.backward: count {count} is not M = {M} for x of "
                             f"shape {x.shape}")
        dx = np.empty(x.shape, x.dtype)
        dgamma, dbeta = np.empty(C, sd), np.empty(C, sd)
        _bnk.backward_rows.run(x.size, dout, x, gamma, mean, invstd, bool(train),
                               _bnk.row_block(M, C), dx, dgamma, dbeta)
        return dx, dgamma, dbeta
    d = dout.astype(sd, copy=False)
    xc = np.subtract(x, mean, dtype=sd)
    dbeta = np.add.reduce(d, axis=0)
    dgamma = (np.einsum("ij,ij->j", d, xc) * invstd).astype(sd)
    a = gamma * invstd
    if train:
        xc *= (-a.astype(np.float64) * invstd * dgamma / count).astype(sd)
        xc += (-a.astype(np.float64) * dbeta / count).astype(sd)
        xc += d * a
        dx = xc
    else:
        dx = d * a
    return dx.astype(x.dtype, copy=False), dgamma, dbeta
