"""Batch norm for (N, D) inputs and spatial batch norm for (N, C, H, W) inputs.

Statistics are per feature / channel, over axis 0 for (N, D) and over axes
(0, 2, 3) for (N, C, H, W) -- reduced directly, with no transposed copies.
(The article's spatial BN normalized the un-reshaped x and transposed back
with ``(0, 1, 2, 3)``, which is no transpose at all; both bugs are gone.)

bn_param keys:

- 'mode': 'train' or 'test' (required);
- 'eps': added to the variance, default 1e-5;
- 'momentum': default 0.9 ('cs231n') or 0.1 ('torch');
- 'running_mean', 'running_var': (C,) arrays, written back after each train step;
- 'convention': 'cs231n' (default) or 'torch':

  ============  ===================================  =====================================
  convention    running update                       running_var holds
  ============  ===================================  =====================================
  'cs231n'      running = m*running + (1-m)*batch    the biased batch variance
  'torch'       running = (1-m)*running + m*batch    the unbiased one, times M/(M-1)
  ============  ===================================  =====================================

  Running stats start at zeros, except 'torch''s running_var at ones.
- 'comm': optional communicator (gpulayers.distributed) for synchronized BN:
  statistics and gradients over the whole batch held by all ranks.

Statistics are computed in float32 for float16 and float32 input, float64
for float64, by a shifted two-pass method (never E[x^2] - E[x]^2): a constant
channel gives zeros, and large means do not cancel.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from . import numpy_fast
from .backend import get_array_module
from .shapes import check_floating

__all__ = [
    "BatchNormCache",
    "batchnorm_forward", "batchnorm_backward",
    "spatial_batchnorm_forward", "spatial_batchnorm_backward",
    "spatial_batchnorm_forward_general", "spatial_batchnorm_backward_general",
]

_CONVENTIONS = {"cs231n": 0.9, "torch": 0.1}
_BN_KEYS = {"mode", "eps", "momentum", "running_mean", "running_var", "convention", "comm"}


class BatchNormCache(NamedTuple):
    """What BN backward needs (a named tuple: immutable and cheap to make).

    xhat is the normalized input (one full-size array, in the stats dtype) for
    the general xp path; the CUDA and NumPy fast paths keep ``x`` itself
    instead and recompute it.
    gamma, mean and invstd are (C,) arrays in the stats dtype; count is the
    number of values per channel (over all ranks with a communicator).
    """

    axes: tuple
    train: bool
    dtype: np.dtype
    gamma: object
    invstd: object
    count: int
    xhat: object = None
    x: object = None
    mean: object = None
    comm: object = None
    gamma_dtype: np.dtype = None
    beta_dtype: np.dtype = None
    stats: object = None  # CUDA train path: the (6, C) block of bn_kernels.STAT_ROWS


def _stats_dtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _bcast(v, ndim):
    """(C,) -> shape broadcasting along the channel axis of an ndim-D input."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _parse(x, gamma, beta, bn_param, ndim, what):
    """Check every input of a BN forward; return (xp, mode, eps, momentum, convention, comm)."""
    for name, a in (("x", x), ("gamma", gamma), ("beta", beta)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
    check_floating(x, "x")
    check_floating(gamma, "gamma")
    check_floating(beta, "beta")
    shape = tuple(x.shape)
    layout = "(N, D)" if ndim == 2 else "(N, C, H, W)"
    if len(shape) != ndim:
        raise ValueError(f"{what} expects x of shape {layout}, got {len(shape)}-D shape {shape}")
    C = shape[1]
    if C == 0 or any(s == 0 for s in shape[2:]):
        raise ValueError(f"{what} expects non-zero C{', H and W' if ndim == 4 else ''}, "
                         f"got x of shape {shape}")
    for name, a in (("gamma", gamma), ("beta", beta)):
        if tuple(a.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},) for x of shape {shape}, "
                             f"got {tuple(a.shape)}")
    if not isinstance(bn_param, dict):
        raise TypeError(f"bn_param must be a dict, got {type(bn_param).__name__}")
    unknown = set(bn_param) - _BN_KEYS
    if unknown:
        raise ValueError(f"unknown bn_param keys {sorted(unknown)}; known: {sorted(_BN_KEYS)}")
    if "mode" not in bn_param:
        raise ValueError("bn_param needs 'mode': 'train' or 'test'")
    mode = bn_param["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f"bn_param['mode'] must be 'train' or 'test', got {mode!r}")
    convention = bn_param.get("convention", "cs231n")
    if convention not in _CONVENTIONS:
        raise ValueError(f"bn_param['convention'] must be 'cs231n' or 'torch', got {convention!r}")
    eps = bn_param.get("eps", 1e-5)
    if not isinstance(eps, (int, float, np.floating, np.integer)) or not eps >= 0:
        raise ValueError(f"bn_param['eps'] must be a number >= 0, got {eps!r}")
    momentum = bn_param.get("momentum", _CONVENTIONS[convention])
    if not isinstance(momentum, (int, float, np.floating, np.integer)) or not 0 <= momentum <= 1:
        raise ValueError(f"bn_param['momentum'] must be a number in [0, 1], got {momentum!r}")
    for key in ("running_mean", "running_var"):
        r = bn_param.get(key)
        if r is not None and tuple(getattr(r, "shape", ())) != (C,):
            raise ValueError(f"bn_param[{key!r}] must have shape ({C},) for x of shape {shape}, "
                             f"got {tuple(getattr(r, 'shape', ()))}")
    xp = get_array_module(x, gamma, beta, bn_param.get("running_mean"), bn_param.get("running_var"))
    return xp, mode, float(eps), float(momentum), convention, bn_param.get("comm")


# --------------------------------------------------------------- communicator helpers

def _allreduce(comm, xp, values, sd):
    """All-reduce-sum a list of same-length 1-D arrays through ``comm``; returns
    them reduced, on x's backend, in dtype ``sd``."""
    buf = xp.concatenate([xp.asarray(v, dtype=np.float64).reshape(-1) for v in values])
    out = comm.allreduce_sum(buf)
    n = values[0].size
    return [xp.asarray(out[k * n:(k + 1) * n], dtype=sd) for k in range(len(values))]


def _check_channels_agree(comm, xp, C):
    """ValueError on every rank when the ranks disagree on C (one fixed-size all-reduce)."""
    ranks, total, squares = (float(v) for v in comm.allreduce_sum(
        xp.asarray([1.0, float(C), float(C) * C], dtype=np.float64)).tolist())
    if total * total != ranks * squares:
        raise ValueError(f"synchronized batch norm: ranks disagree on the number of channels "
                         f"(this rank has C = {C}; mean over {int(ranks)} ranks is "
                         f"{total / ranks:g})")


# ------------------------------------------------------------------------ xp path

def _train_stats(x, axes, sd, comm):
    """Per-channel (mean, biased var, count, centered) by a shifted two-pass method.

    ``centered`` is x minus the mean, in dtype ``sd``, shape of x.
    """
    xp = get_array_module(x)
    ndim = x.ndim
    count = int(np.prod([x.shape[a] for a in axes]))
    # Shift by one sample of each channel: x - pivot is exact for values near
    # the pivot, so a large mean does not cancel the small deviations.
    if count:
        pivot = x[(0, slice(None)) + (0,) * (ndim - 2)].astype(sd)
    else:
        pivot = xp.zeros(x.shape[1], dtype=sd)
    shifted = x.astype(sd) - _bcast(pivot, ndim)
    local_sum = shifted.sum(axis=axes, dtype=sd)
    if comm is None:
        total = count
        shift_mean = local_sum / max(count, 1)
        mean = pivot + shift_mean
    else:
        # (count, sum) over all ranks, in float64; every rank gets the same mean.
        _check_channels_agree(comm, xp, x.shape[1])
        n_all, sums = _allreduce(comm, xp, [
            xp.full(x.shape[1], count, dtype=np.float64),
            local_sum.astype(np.float64) + count * pivot.astype(np.float64)], np.float64)
        total = int(round(float(n_all[0])))
        mean64 = sums / max(total, 1)
        shift_mean = (mean64 - pivot).astype(sd)
        mean = mean64.astype(sd)
    shifted -= _bcast(shift_mean, ndim)
    m2 = xp.square(shifted).sum(axis=axes, dtype=sd)
    if comm is not None:
        (m2,) = _allreduce(comm, xp, [m2], sd)
    var = m2 / max(total, 1)
    return mean, var, total, shifted


def _update_running(bn_param, xp, C, sd, mean, var, total, convention, momentum):
    """Write the new running stats into bn_param (new arrays; the old ones are not modified)."""
    rm = bn_param.get("running_mean")
    rv = bn_param.get("running_var")
    rm = xp.zeros(C, dtype=sd) if rm is None else xp.asarray(rm, dtype=sd)
    rv = (xp.ones(C, dtype=sd) if convention == "torch" else xp.zeros(C, dtype=sd)) \
        if rv is None else xp.asarray(rv, dtype=sd)
    if convention == "cs231n":
        bn_param["running_mean"] = momentum * rm + (1 - momentum) * mean
        bn_param["running_var"] = momentum * rv + (1 - momentum) * var
    else:
        unbiased = var * (total / (total - 1))
        bn_param["running_mean"] = (1 - momentum) * rm + momentum * mean
        bn_param["running_var"] = (1 - momentum) * rv + momentum * unbiased


def _use_kernels(xp, comm):
    return xp is not np and comm is None and os.environ.get("GPULAYERS_KERNELS", "1") != "0"


def _forward(x, gamma, beta, bn_param, ndim, what, kernels):
    xp, mode, eps, momentum, convention, comm = _parse(x, gamma, beta, bn_param, ndim, what)
    if kernels and _use_kernels(xp, comm):
        # CUDA path: statistics, running-stat update and normalization in three kernel
        # launches (train) or one (test, which also returns invstd); no CuPy op in between
        from .cuda import bn_kernels
        x4 = x if ndim == 4 else x.reshape(x.shape + (1, 1))
        total = x.size // x.shape[1]
        rm, rv = bn_param.get("running_mean"), bn_param.get("running_var")
        if mode == "train":
            if total <= 1:
                raise ValueError(f"{what} in train mode needs more than one value per channel, "
                                 f"got x of shape {tuple(x.shape)}")
            y, stats = bn_kernels.bn_train_forward_block_gpu(x4, gamma, beta, eps, rm, rv,
                                                             momentum, convention)
            bn_param["running_mean"], bn_param["running_var"] = stats[4], stats[5]
            mean = invstd = None  # rows 0 and 2 of stats: views made by the backward pass
        else:
            if rm is None or rv is None:
                raise ValueError(f"{what} in test mode needs bn_param['running_mean'] and "
                                 "['running_var'] (run a train step first or set them)")
            y, mean, invstd = bn_kernels.bn_eval_forward_stats_gpu(x4, gamma, beta, rm, rv, eps)
            stats = None
        sd = _stats_dtype(x.dtype)
        cache = BatchNormCache((0,) if ndim == 2 else (0, 2, 3), mode == "train",
                               np.dtype(x.dtype), gamma if gamma.dtype == sd else gamma.astype(sd),
                               invstd, total, x=x, mean=mean, gamma_dtype=np.dtype(gamma.dtype),
                               beta_dtype=np.dtype(beta.dtype), stats=stats)
        return (y if ndim == 4 else y.reshape(x.shape)), cache
    axes = (0,) if ndim == 2 else (0, 2, 3)
    C = x.shape[1]
    sd = _stats_dtype(x.dtype)
    g = gamma.astype(sd)
    b = beta.astype(sd)
    train = mode == "train"
    dtypes = dict(gamma_dtype=np.dtype(gamma.dtype), beta_dtype=np.dtype(beta.dtype))
    if train:
        local = int(np.prod([x.shape[a] for a in axes]))
        if comm is None and local <= 1:
            raise ValueError(f"{what} in train mode needs more than one value per channel, "
                             f"got x of shape {tuple(x.shape)}")
    else:
        rm, rv = bn_param.get("running_mean"), bn_param.get("running_var")
        if rm is None or rv is None:
            raise ValueError(f"{what} in test mode needs bn_param['running_mean'] and "
                             "['running_var'] (run a train step first or set them)")
        mean = xp.asarray(rm, dtype=sd)
        invstd = 1 / xp.sqrt(xp.asarray(rv, dtype=sd) + eps)

    fast = None
    if kernels and xp is np and ndim == 4 and comm is None:
        # NumPy fast path: blocked and threaded; the cache keeps x, not a normalized copy
        fast = (numpy_fast.bn_train_forward(x, g, b, eps, sd) if train
                else (numpy_fast.bn_eval_forward(x, g, b, mean, invstd, sd), mean, None, invstd))
    if fast is not None:
        y, mean, var, invstd = fast
        total = int(np.prod([x.shape[a] for a in axes]))
        if train:
            _update_running(bn_param, xp, C, sd, mean, var, total, convention, momentum)
        cache = BatchNormCache(axes, train, np.dtype(x.dtype), g, invstd, total, x=x, mean=mean,
                               **dtypes)
        return y, cache

    if train:
        mean, var, total, centered = _train_stats(x, axes, sd, comm)
        if total <= 1:
            raise ValueError(f"{what} in train mode needs more than one value per channel "
                             f"over all ranks, got {total}")
        invstd = 1 / xp.sqrt(var + eps)
        centered *= _bcast(invstd, ndim)
        xhat = centered
        _update_running(bn_param, xp, C, sd, mean, var, total, convention, momentum)
    else:
        total = int(np.prod([x.shape[a] for a in axes]))
        xhat = (x.astype(sd) - _bcast(mean, ndim)) * _bcast(invstd, ndim)
    out = xhat * _bcast(g, ndim)
    out += _bcast(b, ndim)
    cache = BatchNormCache(axes, train, np.dtype(x.dtype), g, invstd, total, xhat=xhat,
                           comm=comm if train else None, **dtypes)
    return out.astype(x.dtype, copy=False), cache


def _backward(dout, cache, ndim, what):
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be the BatchNormCache returned by the forward pass, "
                        f"got {type(cache).__name__}")
    if not hasattr(dout, "shape") or not hasattr(dout, "dtype"):
        raise TypeError(f"dout must be a NumPy or CuPy array, got {type(dout).__name__}")
    check_floating(dout, "dout")
    ref = cache.xhat if cache.xhat is not None else cache.x
    if tuple(dout.shape) != tuple(ref.shape) or dout.ndim != ndim:
        raise ValueError(f"{what}: dout has shape {tuple(dout.shape)} but the forward input "
                         f"had shape {tuple(ref.shape)}")
    xp = get_array_module(dout, ref)
    sd = cache.gamma.dtype
    if cache.xhat is None and xp is np:  # NumPy fast path
        dx, dgamma, dbeta = numpy_fast.bn_backward(dout, cache.x, cache.gamma, cache.mean,
                                                   cache.invstd, cache.count, cache.train, sd)
    elif cache.xhat is None:  # CUDA path
        from .cuda import bn_kernels
        x4 = cache.x if ndim == 4 else cache.x.reshape(cache.x.shape + (1, 1))
        d4 = dout if ndim == 4 else dout.reshape(x4.shape)
        mean, invstd = ((cache.mean, cache.invstd) if cache.stats is None
                        else (cache.stats[0], cache.stats[2]))
        dx, dgamma, dbeta = bn_kernels.bn_backward_gpu(d4, x4, cache.gamma, mean, invstd,
                                                        cache.train)
        if ndim != 4:
            dx = dx.reshape(dout.shape)
    else:
        axes, xhat = cache.axes, cache.xhat
        d = dout.astype(sd, copy=False)
        dbeta = d.sum(axis=axes, dtype=sd)
        dgamma = (d * xhat).sum(axis=axes, dtype=sd)
        if cache.comm is not None:
            dbeta, dgamma = _allreduce(cache.comm, xp, [dbeta, dgamma], sd)
        scale = cache.gamma * cache.invstd
        if cache.train:
            M = cache.count
            dx = d - _bcast(dbeta / M, ndim)
            dx -= xhat * _bcast(dgamma / M, ndim)
            dx *= _bcast(scale, ndim)
        else:
            dx = d * _bcast(scale, ndim)
    return (dx.astype(cache.dtype, copy=False), dgamma.astype(cache.gamma_dtype, copy=False),
            dbeta.astype(cache.beta_dtype, copy=False))


# ------------------------------------------------------------------------ public API

def batchnorm_forward(x, gamma, beta, bn_param):
    """Forward pass of batch norm over the batch axis.

    Inputs:
    - x: array (N, D), float16/32/64
    - gamma: scale, array (D,)
    - beta: shift, array (D,)
    - bn_param: dict, see the module docstring ('mode' required)

    Returns a tuple of:
    - out: array (N, D), dtype of x
    - cache: BatchNormCache for batchnorm_backward
    """
    return _forward(x, gamma, beta, bn_param, 2, "batchnorm_forward", kernels=True)


def batchnorm_backward(dout, cache):
    """Backward pass of batch norm.

    Inputs:
    - dout: array (N, D)
    - cache: BatchNormCache from batchnorm_forward

    Returns a tuple of:
    - dx: array (N, D)
    - dgamma: array (D,)
    - dbeta: array (D,)
    """
    return _backward(dout, cache, 2, "batchnorm_backward")


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Forward pass of spatial batch norm: per channel, over N, H and W.

    Uses the fused CUDA kernels for CuPy inputs (without a communicator).

    Inputs:
    - x: array (N, C, H, W), float16/32/64
    - gamma: scale, array (C,)
    - beta: shift, array (C,)
    - bn_param: dict, see the module docstring ('mode' required)

    Returns a tuple of:
    - out: array (N, C, H, W), dtype of x
    - cache: BatchNormCache for spatial_batchnorm_backward
    """
    return _forward(x, gamma, beta, bn_param, 4, "spatial_batchnorm_forward", kernels=True)


def spatial_batchnorm_backward(dout, cache):
    """Backward pass of spatial batch norm.

    Inputs:
    - dout: array (N, C, H, W)
    - cache: BatchNormCache from spatial_batchnorm_forward(_general)

    Returns a tuple of:
    - dx: array (N, C, H, W)
    - dgamma: array (C,)
    - dbeta: array (C,)
    """
    return _backward(dout, cache, 4, "spatial_batchnorm_backward")


def spatial_batchnorm_forward_general(x, gamma, beta, bn_param):
    """spatial_batchnorm_forward through the xp path only (no CUDA kernels,
    also on CuPy): the reference the kernels are checked against.

    Inputs and returns as spatial_batchnorm_forward.
    """
    return _forward(x, gamma, beta, bn_param, 4, "spatial_batchnorm_forward", kernels=False)


def spatial_batchnorm_backward_general(dout, cache):
    """Backward pass for spatial_batchnorm_forward_general (same as
    spatial_batchnorm_backward, which follows the cache it is given).

    Inputs and returns as spatial_batchnorm_backward.
    """
    return _backward(dout, cache, 4, "spatial_batchnorm_backward")
