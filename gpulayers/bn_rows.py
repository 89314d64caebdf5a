"""Batch norm over the rows of an (M, C) matrix on NumPy, one block of rows at a time.

This is the NumPy path of batch norm on (N, D) input and of channels-last spatial batch
norm, whose (N, *spatial, C) input is the (N*prod(spatial), C) matrix of its rows (a
view, also for a channels-first-shaped array in PyTorch's channels_last memory
format). Working block by block keeps every temporary at one block: a forward allocates
its output and (C,) vectors, not a normalized or centred copy of x, and the cache keeps
x itself (a reference, as PyTorch's saved tensors).

Blocks run in numpy_fast's threads (numpy_fast._run_blocks: its block size and thread
count). Statistics: per block, column sums in the stats dtype; the blocks' sums are added
in float64 in block order. The variance is the sum of squared deviations from that mean
(a second pass), never E[x^2] - E[x]^2 and no shift by one sample. The summation order
is fixed by the block size, so results are deterministic and do not depend on x's
memory layout (x is made C-contiguous first).
"""
from __future__ import annotations

import numpy as np

from . import numpy_fast

__all__ = ["train_forward", "eval_forward", "backward"]

def _rows(x):
    return np.ascontiguousarray(x)


def _each_block(x, sd, work):
    """Run ``work(s, e, t)`` over blocks of rows of x, in numpy_fast's threads; ``t`` is
    a scratch (rows, C) buffer of dtype ``sd`` for the block. Returns the blocks' results
    in block order (so sums of them have a fixed order, whatever thread ran which block)."""
    M, C = x.shape
    results = {}

    def run(s, e, scratch):
        t = scratch.get("t", C, sd).reshape(-1, C)[:e - s]
        results[s] = work(s, e, t)
    numpy_fast._run_blocks(M, C * np.dtype(sd).itemsize, run)
    return [results[s] for s in sorted(results)]


def _sum(parts, C):
    total = np.zeros(C, np.float64)
    for p in parts:
        total += p
    return total


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
    x = _rows(x)
    M, C = x.shape

    def sums(s, e, t):
        return np.add.reduce(x[s:e], axis=0, dtype=sd)
    mean = (_sum(_each_block(x, sd, sums), C) / M).astype(sd)

    def squares(s, e, t):
        np.subtract(x[s:e], mean, out=t, dtype=sd)
        return np.einsum("ij,ij->j", t, t, dtype=sd)
    var = (_sum(_each_block(x, sd, squares), C) / M).astype(sd)
    invstd = (1 / np.sqrt(var.astype(np.float64) + eps)).astype(sd)
    return _affine(x, mean, gamma * invstd, beta, sd), mean, var, invstd, x


def eval_forward(x, gamma, beta, mean, invstd, sd):
    """Test-mode BN of the rows of x with given statistics: (y, x) as train_forward."""
    x = _rows(x)
    return _affine(x, mean, gamma * invstd, beta, sd, invstd), x


def _affine(x, mean, scale, shift, sd, invstd=None):
    """y = (x - mean)*scale + shift. In test mode (invstd given), where every channel's
    |mean|/std is small (numpy_fast's guard), as x*scale + (shift - mean*scale): one pass
    fewer, with the same error bound as numpy_fast's eval path."""
    y = np.empty(x.shape, x.dtype)
    if invstd is not None and numpy_fast._foldable(mean, invstd):
        folded = (shift.astype(np.float64) - mean.astype(np.float64) * scale).astype(sd)

        def work(s, e, t):
            np.multiply(x[s:e], scale, out=t, dtype=sd)
            t += folded
            y[s:e] = t
    else:
        def work(s, e, t):
            np.subtract(x[s:e], mean, out=t, dtype=sd)
            t *= scale
            t += shift
            y[s:e] = t
    _each_block(x, sd, work)
    return y


def backward(dout, x, gamma, mean, invstd, count, train, sd):
    """BN backward over the rows of x (the forward's C-contiguous x).

    Inputs:
    - dout: array (M, C)
    - x, gamma, mean, invstd: as the forward kept them (gamma, mean, invstd (C,) in sd)
    - count: M, the values per channel
    - train: whether the statistics were the batch's (else constants)
    - sd: stats dtype

    Returns a tuple of:
    - dx: array (M, C), dtype of x
    - dgamma, dbeta: (C,) arrays in sd
    """
    dout = np.ascontiguousarray(dout)
    M, C = x.shape

    def sums(s, e, t):
        np.subtract(x[s:e], mean, out=t, dtype=sd)
        return (np.add.reduce(dout[s:e], axis=0, dtype=sd),
                np.einsum("ij,ij->j", dout[s:e], t, dtype=sd))
    parts = _each_block(x, sd, sums)
    dbeta = _sum([p[0] for p in parts], C).astype(sd)
    dgamma = (_sum([p[1] for p in parts], C) * invstd).astype(sd)
    a = gamma * invstd
    if train:
        e_ = (-a.astype(np.float64) * invstd * dgamma / count).astype(sd)
        f_ = (-a.astype(np.float64) * dbeta / count).astype(sd)
    dx = np.empty(x.shape, x.dtype)

    def grad(s, e, t):
        if train:
            np.subtract(x[s:e], mean, out=t, dtype=sd)
            t *= e_
            t += f_
            t += np.multiply(dout[s:e], a, dtype=sd)
        else:
            np.multiply(dout[s:e], a, out=t, dtype=sd)
        dx[s:e] = t
    _each_block(x, sd, grad)
    return dx, dgamma, dbeta
