"""Batch norm for (N, D) inputs and spatial batch norm for (N, C, L), (N, C, H, W)
and (N, C, D, H, W) inputs.

Statistics are per feature / channel, over axis 0 for (N, D) and over every axis
but 1 for the spatial inputs ((0, 2, 3) for (N, C, H, W)) -- reduced directly, with
no transposed copies.
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
  statistics and gradients over the whole batch held by all ranks, in one collective per
  train forward (an allgather of every rank's per-channel count, mean and centred M2,
  merged in rank order by Chan's formula, the global count summed in the communicator's
  host header) and one per backward (an allreduce_sum of [dbeta, dgamma]); on CuPy the
  CUDA kernels run, with no device value read on the host.

Statistics are computed in float32 for float16 and float32 input, float64
for float64, by a shifted two-pass method (never E[x^2] - E[x]^2): a constant
channel gives zeros, and large means do not cancel.
"""
from __future__ import annotations

import functools
import math
import operator
import sys
from typing import NamedTuple

import numpy as np

from . import backend, bn_rows, numpy_fast
from .cuda import bn_kernels   # imports no CuPy: its launchers do
from .backend import get_array_module
from .backend import device_scope
from .shapes import (acc_dtype, channels_last_strided, check_array, check_data_format,
                     check_floating, is_floating)

__all__ = [
    "BatchNormCache",
    "batchnorm_forward", "batchnorm_backward",
    "spatial_batchnorm_forward", "spatial_batchnorm_backward",
    "spatial_batchnorm_forward_general", "spatial_batchnorm_backward_general",
]

_CONVENTIONS = {"cs231n": 0.9, "torch": 0.1}
_BN_KEYS = frozenset({"mode", "eps", "momentum", "running_mean", "running_var", "convention", "comm",
            "data_format"})


class BatchNormCache(NamedTuple):
    """What BN backward needs (a named tuple: immutable and cheap to make).

    - op: the forward that made it ('batchnorm_forward' or 'spatial_batchnorm_forward');
      each backward takes only its own forward's cache
    - path: which implementation made it, and so which backward runs: 'xp' (the general
      path; keeps xhat, the normalized input, one full-size array in the stats dtype),
      'numpy_fast', 'numpy_rows' (gpulayers.bn_rows: (N, D) and channels-last input) or
      'cuda' (these keep ``x`` itself and recompute from it)
    - gamma, mean and invstd: (C,) arrays in the stats dtype; count: values per channel
      (over all ranks with a communicator); stats: the CUDA train path's (6, C) block of
      bn_kernels.STAT_ROWS
    - shape: the forward input's shape; layout: 'channels_first', 'channels_last'
      (data_format) or 'channels_last_strided' (a channels-first-shaped input in PyTorch's
      channels_last memory format); the channels-last ones keep x / xhat as the (M, C)
      matrix of x's rows

    The 'numpy_fast' and 'cuda' caches hold a reference to x, as PyTorch's saved tensors
    do: changing x in place between forward and backward changes the gradient.
    """

    op: str
    path: str
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
    stats: object = None
    shape: tuple = None
    layout: str = "channels_first"


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def _stats_dtype(dtype):
    """float64 for float64 input, float32 for float16, bfloat16 and float32."""
    if dtype is _F64 or dtype is _F32:   # the usual dtype objects: no conversion
        return dtype
    return _F64 if np.dtype(dtype) == np.float64 else _F32


def _reshaped(a, shape):
    """``a.reshape(shape)``, or ``a`` itself when it has that shape (a CuPy view costs host
    time)."""
    return a if a.shape == shape else a.reshape(shape)


# Row views (mean, invstd, mean_lo) of the CUDA train caches' stats blocks, made once per block
# by the first backward (the forward leaves them to it): id(stats) -> (stats, views).
_STAT_VIEWS = {}


def _stat_views(stats):
    entry = _STAT_VIEWS.get(id(stats))
    if entry is None or entry[0] is not stats:
        if len(_STAT_VIEWS) >= 16:
            _STAT_VIEWS.clear()
        entry = _STAT_VIEWS[id(stats)] = (stats, (stats[0], stats[2], stats[3]))
    return entry[1]


def _bcast(v, ndim):
    """(C,) -> shape broadcasting along the channel axis of an ndim-D input."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _real(value):
    """True for a real number (int or float, NumPy's too), False for bools and the rest."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def _param_dtype(x_dtype):
    """What integer gamma/beta are cast to: x's dtype, float32 for float16 and bfloat16 x."""
    return acc_dtype(x_dtype)


def _channel_array(a, name, C, shape):
    """Check one (C,) floating array of bn_param; TypeError / ValueError naming it."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"bn_param[{name!r}] must be a NumPy or CuPy array of shape ({C},), "
                        f"got {type(a).__name__}")
    if not is_floating(a.dtype):
        raise TypeError(f"bn_param[{name!r}] must have a floating dtype, got {a.dtype} "
                        f"(x of shape {shape})")
    if tuple(a.shape) != (C,):
        raise ValueError(f"bn_param[{name!r}] must have shape ({C},) for x of shape {shape}, "
                         f"got {tuple(a.shape)}")


def _check_comm(comm):
    missing = [attr for attr in ("allreduce_sum", "size", "rank") if not hasattr(comm, attr)]
    if missing or not callable(getattr(comm, "allreduce_sum")):
        raise TypeError(f"bn_param['comm'] must be a communicator with allreduce_sum(buf), size "
                        f"and rank (see gpulayers.distributed), got {type(comm).__name__} "
                        f"without {', '.join(missing) or 'a callable allreduce_sum'}")


_LAYOUTS = {2: "(N, D)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
_LAYOUTS_LAST = {3: "(N, L, C)", 4: "(N, H, W, C)", 5: "(N, D, H, W, C)"}
_RANKS = {"batchnorm_forward": (2,), "spatial_batchnorm_forward": (3, 4, 5)}


def _parse(x, gamma, beta, bn_param, op, what):
    """Check every input of a BN forward.

    Returns (xp, mode, eps, momentum, convention, comm, gamma, beta, data_format): integer
    gamma/beta come back cast to x's dtype (float32 for float16 and bfloat16 x).
    """
    for name, a in (("x", x), ("gamma", gamma), ("beta", beta)):
        check_array(a, name)
    check_floating(x, "x")
    if not isinstance(bn_param, dict):
        raise TypeError(f"bn_param must be a dict, got {type(bn_param).__name__}")
    unknown = () if _BN_KEYS.issuperset(bn_param) else set(bn_param) - _BN_KEYS
    if unknown:
        raise ValueError(f"unknown bn_param keys {sorted(unknown)}; known: {sorted(_BN_KEYS)}")
    data_format = bn_param.get("data_format", "channels_first")
    if data_format.__class__ is not str or data_format != "channels_first":
        data_format = check_data_format(data_format, f"bn_param['data_format'] of {what}")
    shape = tuple(x.shape)
    pdt = _param_dtype(x.dtype)
    params = []
    for name, a in (("gamma", gamma), ("beta", beta)):
        if is_floating(a.dtype):
            params.append(a)
            continue
        kind = np.dtype(a.dtype).kind
        if kind in "iu":
            a = a.astype(pdt)
        elif not is_floating(a.dtype):
            raise TypeError(f"{name} must have a floating or integer dtype, got {a.dtype} "
                            f"with shape {tuple(a.shape)}")
        params.append(a)
    gamma, beta = params
    ranks = _RANKS[op]
    last = data_format == "channels_last" and op == _SPATIAL
    layouts_of = _LAYOUTS_LAST if last else _LAYOUTS
    if len(shape) not in ranks:
        layouts = " or ".join(layouts_of[r] for r in ranks)
        raise ValueError(f"{what} expects x of shape {layouts}, got {len(shape)}-D shape {shape}")
    C = shape[-1] if last else shape[1]
    spatial_sizes = shape[1:-1] if last else shape[2:]
    if C == 0 or any(s == 0 for s in spatial_sizes):
        spatial = (layouts_of[len(shape)][len("(N, "):-len(", C)")] if last else
                   _LAYOUTS[len(shape)][len("(N, C, "):-1]) if len(shape) > 2 else ""
        raise ValueError(f"{what} expects non-zero C{spatial and ' and ' + spatial}, "
                         f"got x of shape {shape}")
    for name, a in (("gamma", gamma), ("beta", beta)):
        if tuple(a.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},) for x of shape {shape}, "
                             f"got {tuple(a.shape)}")
    if "mode" not in bn_param:
        raise ValueError("bn_param needs 'mode': 'train' or 'test'")
    mode = bn_param["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f"bn_param['mode'] must be 'train' or 'test', got {mode!r}")
    convention = bn_param.get("convention", "cs231n")
    if convention not in _CONVENTIONS:
        raise ValueError(f"bn_param['convention'] must be 'cs231n' or 'torch', got {convention!r}")
    eps = bn_param.get("eps", 1e-5)
    if eps.__class__ is float:   # the usual case, without NumPy's scalar machinery
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"bn_param['eps'] must be a finite number > 0, got {eps!r}")
    elif not _real(eps) or not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"bn_param['eps'] must be a finite number > 0, got {eps!r}")
    momentum = bn_param.get("momentum", _CONVENTIONS[convention])
    if not _real(momentum) or not 0 <= momentum <= 1:
        raise ValueError(f"bn_param['momentum'] must be a real number in [0, 1], got {momentum!r}")
    rm, rv = bn_param.get("running_mean"), bn_param.get("running_var")
    for key, r in (("running_mean", rm), ("running_var", rv)):
        if r is not None:
            _channel_array(r, key, C, shape)
    comm = bn_param.get("comm")
    if comm is not None:
        _check_comm(comm)
    xp = get_array_module(x, gamma, beta, rm, rv)
    if mode == "test":
        if rm is None or rv is None:
            raise ValueError(f"{what} in test mode needs bn_param['running_mean'] and "
                             "['running_var'] (run a train step first or set them)")
        if xp is np:  # values are checked on the host only: on CuPy it would synchronize
            _check_running_values(rm, rv, what)
    return xp, mode, float(eps), float(momentum), convention, comm, gamma, beta, data_format


def _check_running_values(rm, rv, what):
    """Test mode on NumPy: finite running statistics and running_var >= 0 (every call, also
    when the rest of the checks come from _CHECKED)."""
    if not (np.isfinite(rm).all() and np.isfinite(rv).all()):
        raise ValueError(f"{what} in test mode needs finite running statistics, got "
                         f"running_mean {rm!r} and running_var {rv!r}")
    if (rv < 0).any():
        raise ValueError(f"{what} in test mode needs running_var >= 0, got {rv!r}")


# --------------------------------------------------------------- communicator helpers

def _check_channels_agree(comm, C):
    """ValueError on every rank when the ranks disagree on C: one fixed-size all-reduce of
    the host numbers [1, C, C*C] (a NumPy buffer: no device read). Only for communicators
    that do not check element counts themselves (``checks_sizes``)."""
    ranks, total, squares = (float(v) for v in np.asarray(comm.allreduce_sum(
        np.asarray([1.0, float(C), float(C) * C], dtype=np.float64))).tolist())
    if total * total != ranks * squares:
        raise ValueError(f"synchronized batch norm: ranks disagree on the number of channels "
                         f"(this rank has C = {C}; mean over {int(ranks)} ranks is "
                         f"{total / ranks:g})")


def _gather_stats(comm, xp, record, count, C):
    """Every rank's statistics record in rank order, and the values per channel over all
    ranks, in one collective.

    Inputs:
    - record: float64 array (4*C,) on x's backend: this rank's (count, mean, mean_lo, M2)
      per channel (bn_kernels.RECORD_ROWS)
    - count: this rank's values per channel (host int)

    Returns (gathered (K, 4*C) float64 on x's backend, total: host int). A communicator with
    ``allgather`` sums the counts in its host header (no device read); one without falls back
    to a channel check and an allreduce_sum of a zero-padded buffer (an exact gather), whose
    count it reads back.
    """
    from .distributed import CommSizeError
    if hasattr(comm, "allgather"):
        if not getattr(comm, "checks_sizes", False):
            _check_channels_agree(comm, C)
        try:
            gathered, sums = comm.allgather(record, host=(count,))
        except CommSizeError as exc:
            mean_c = "" if exc.mean_count is None else f"{exc.mean_count / 4:g}"
            raise ValueError(f"synchronized batch norm: ranks disagree on the number of "
                             f"channels (this rank has C = {C}"
                             f"{'; mean over ' + str(comm.size) + ' ranks is ' + mean_c if mean_c else ''})"
                             ) from exc
        return gathered.reshape(comm.size, -1), int(round(sums[0]))
    _check_channels_agree(comm, C)
    K, n = int(comm.size), record.size
    buf = xp.zeros(K * n + 1, dtype=np.float64)
    buf[comm.rank * n:(comm.rank + 1) * n] = record
    buf[-1] = count
    out = comm.allreduce_sum(buf)
    return out[:-1].reshape(K, n), int(round(float(out[-1])))


def _merge_records(xp, gathered, C):
    """Chan's merge of the gathered records in rank order, in float64: the (count, mean hi,
    mean lo, M2) of all ranks, each (C,), the mean as an unevaluated sum hi + lo (every rank
    merges the same numbers in the same order: the same bits everywhere)."""
    g = gathered.reshape(-1, 4, C)
    n, hi, lo, m2 = (g[0, k] for k in range(4))
    for r in range(1, g.shape[0]):
        nb, bhi, blo, bm2 = (g[r, k] for k in range(4))
        tot = n + nb
        w = nb / xp.where(tot > 0, tot, 1.0)      # 0 for an empty rank; 1 after empty ones
        delta = (bhi - hi) + (blo - lo)
        m2 = (m2 + bm2) + delta * delta * (n * w)
        s = hi + (lo + delta * w)                 # two-sum of hi and the new lo
        bb = s - hi
        lo = (hi - (s - bb)) + ((lo + delta * w) - bb)
        hi, n = s, tot
    return n, hi, lo, m2


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
        # This rank's (count, mean = pivot + d + residual, M2) per channel, gathered in one
        # collective and merged in rank order: every rank gets the same statistics.
        C = x.shape[1]
        n = max(count, 1)
        d = local_sum / n
        shifted -= _bcast(d, ndim)
        resid = shifted.sum(axis=axes, dtype=np.float64)
        m2 = xp.square(shifted).sum(axis=axes, dtype=np.float64) - resid * resid / n
        pivot64, d64 = pivot.astype(np.float64), d.astype(np.float64)
        record = xp.stack([xp.full(C, float(count), dtype=np.float64), pivot64,
                           d64 + resid / n, m2]).reshape(-1)
        gathered, total = _gather_stats(comm, xp, record, count, C)
        _, hi, lo, m2_all = _merge_records(xp, gathered, C)
        shifted -= _bcast((((hi - pivot64) + lo) - d64).astype(sd), ndim)   # x - mean
        mean = (hi + lo).astype(sd)
        var = (m2_all / max(total, 1)).astype(sd)
        return mean, var, total, shifted
    shifted -= _bcast(shift_mean, ndim)
    m2 = xp.square(shifted).sum(axis=axes, dtype=sd)
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
    return xp is not np and comm is None and backend._KERNELS


def _as4(shape):
    """The (N, C, H, W) shape the 2-D kernels and fast paths see for BN input of ``shape``:
    itself in 2-D, (N, D, 1, 1) for (N, D), (N, C, 1, L) for (N, C, L) and
    (N, C, 1, D*H*W) for (N, C, D, H, W) (every axis but 1 is reduced, so the spatial axes
    may be flattened)."""
    shape = tuple(shape)
    if len(shape) == 4:
        return shape
    if len(shape) == 2:
        return shape + (1, 1)
    rest = 1
    for n in shape[2:]:
        rest *= int(n)
    return shape[:2] + (1, rest)


_FALLBACK = {}   # shape -> kernel_fallback_reason(shape): a pure function of the shape


def kernel_fallback_reason(shape):
    """Why the CUDA kernels cannot take BN input of ``shape`` ((N, D) or (N, C, H, W)), or
    None when they can. Such input runs on the xp path instead, as on NumPy."""
    reason = _FALLBACK.get(shape, False) if shape.__class__ is tuple else False
    if reason is False:
        reason = bn_kernels.supported(_as4(shape))
        if shape.__class__ is tuple:
            if len(_FALLBACK) >= 1024:
                _FALLBACK.clear()
            _FALLBACK[shape] = reason
    return reason


# Checked forwards: (op, then class, shape, strides and dtype of x, class, shape and dtype of
# gamma and beta, then per bn_param item its key, the value's class and either the value
# (str, bool and number classes: immutable) or, for an array, its shape and dtype) ->
# (mode, eps, momentum, convention, layout). That is everything _parse and the layout
# decision read (the layout follows from shape and strides), so a warm call costs the key,
# one lookup and get_array_module (which still checks the arrays' kinds and devices). Not
# stored: calls with a communicator, integer gamma/beta (cast per call) and any value of
# another class. NumPy test mode is stored; its running statistics' values are still checked
# on every call (_check_running_values).
_CHECKED = {}
_SCALARS = frozenset({str, float, int, bool, np.float64, np.float32, np.float16, np.int64,
                      np.int32})


def _checked_key(x, gamma, beta, bn_param, op):
    """The _CHECKED key of a forward's inputs, or None when they are not cacheable."""
    nd = backend._cupy_ndarray()
    c = x.__class__
    if (c is not np.ndarray and c is not nd) or (gamma.__class__ is not c) or \
            (beta.__class__ is not c):
        return None
    items = []
    for k, v in bn_param.items():
        vc = v.__class__
        if vc in _SCALARS:
            items.append((k, vc, v))
        elif vc is c:
            items.append((k, vc, v.shape, v.dtype))
        elif v is None:
            items.append((k, None))
        else:
            return None
    return (op, c, x.shape, x.strides, x.dtype, gamma.shape, gamma.dtype, beta.shape,
            beta.dtype, tuple(items))


def _checked(x, gamma, beta, bn_param, op, what):
    """_parse, then the layout; (xp, mode, eps, momentum, convention, comm, gamma, beta,
    layout) from _CHECKED when the same kinds of inputs passed before."""
    key = None
    if bn_param.__class__ is dict:
        try:
            key = _checked_key(x, gamma, beta, bn_param, op)
            hit = None if key is None else _CHECKED.get(key)
        except (AttributeError, TypeError):   # not arrays, or an unhashable value
            key = hit = None
        if hit is not None:
            rm, rv = bn_param.get("running_mean"), bn_param.get("running_var")
            xp = get_array_module(x, gamma, beta, rm, rv)
            if xp is np and hit[0] == "test":
                _check_running_values(rm, rv, what)
            return (xp, hit[0], hit[1], hit[2], hit[3], None, gamma, beta, hit[4])
    xp, mode, eps, momentum, convention, comm, g, b, layout = _parse(
        x, gamma, beta, bn_param, op, what)
    if op != _SPATIAL:
        layout = "channels_first"     # (N, D) has one layout
    elif layout == "channels_first" and channels_last_strided(x):
        layout = "channels_last_strided"
    if key is not None and comm is None and g is gamma and b is beta:
        if len(_CHECKED) >= 1024:
            _CHECKED.clear()
        _CHECKED[key] = (mode, eps, momentum, convention, layout)
    return xp, mode, eps, momentum, convention, comm, g, b, layout


def _forward(x, gamma, beta, bn_param, op, what, kernels):
    if kernels and bn_param.__class__ is dict and x.__class__ is not np.ndarray:
        return _forward_warm(x, gamma, beta, bn_param, op, what)   # CuPy: maybe warmed
    return _forward_checked(x, gamma, beta, bn_param, op, what, kernels)


def _forward_checked(x, gamma, beta, bn_param, op, what, kernels):
    xp, mode, eps, momentum, convention, comm, gamma, beta, layout = _checked(
        x, gamma, beta, bn_param, op, what)
    scope = device_scope(x)
    with scope:
        if layout == "channels_first":
            return _forward_on(xp, x, gamma, beta, bn_param, op, what, kernels, mode, eps,
                               momentum, convention, comm, tuple(x.shape), layout)
        # Channels-last: per channel over every other axis is BN over the (M, C) matrix
        # of the rows of x, a view of x (no copy of a C-contiguous channels-last array).
        xl = x if layout == "channels_last" else xp.moveaxis(x, 1, -1)
        y, cache = _forward_on(xp, xl.reshape(-1, xl.shape[-1]), gamma, beta, bn_param, op,
                               what, kernels, mode, eps, momentum, convention, comm,
                               tuple(x.shape), layout)
        y = y.reshape(xl.shape)
        if layout == "channels_last_strided":
            y = xp.moveaxis(y, -1, 1)  # the input's memory format, as PyTorch keeps it
        return y, cache


# Per-geometry constants of the CUDA path: (shape, dtype, gamma's and beta's dtypes) ->
# (axes, stats dtype, values per channel, the kernels' (N, C, H, W) shape, gamma's and beta's
# dtypes as np.dtype), or None where the kernels cannot take the shape.
_CUDA_GEOMETRY = {}


def _cuda_geometry(shape, dtype, gamma_dtype, beta_dtype):
    key = (shape, dtype, gamma_dtype, beta_dtype)
    geo = _CUDA_GEOMETRY.get(key, False)
    if geo is False:
        geo = None
        if kernel_fallback_reason(shape) is None:
            C = shape[1]
            total = 1
            for n in shape:
                total *= n
            geo = ((0,) + tuple(range(2, len(shape))), _stats_dtype(dtype), total // C,
                   _as4(shape), np.dtype(gamma_dtype), np.dtype(beta_dtype))
        if len(_CUDA_GEOMETRY) >= 1024:
            _CUDA_GEOMETRY.clear()
        _CUDA_GEOMETRY[key] = geo
    return geo


_new_cache = tuple.__new__


def _forward_cuda(x, gamma, beta, bn_param, op, what, train, eps, momentum, convention, shape,
                  layout, geo):
    """The CUDA path of _forward_on (same checks, same results), on warmed constants."""
    axes, sd, total, shape4, gamma_dtype, beta_dtype = geo
    if train and total <= 1:
        raise ValueError(f"{what} in train mode needs more than one value per channel, "
                         f"got x of shape {tuple(x.shape)}")
    # statistics, running-stat update and normalization in two kernel launches (train) or
    # one (test, which also returns invstd); no CuPy op in between. The launchers see x as
    # its (N, C, H, W) shape4 (no view made) and return y in x's shape.
    rm, rv = bn_param.get("running_mean"), bn_param.get("running_var")
    if train:
        y, stats = bn_kernels._train_forward_block(x, gamma, beta, eps, rm, rv, momentum,
                                                   convention, shape4)
        bn_param["running_mean"], bn_param["running_var"] = stats[4], stats[5]
        mean = invstd = None  # rows 0 and 2 of stats: views made by the backward pass
    else:
        y, mean, invstd = bn_kernels._eval_forward(x, gamma, beta, rm, rv, eps, shape4)
        stats = None
    cache = _new_cache(BatchNormCache, (
        op, "cuda", axes, train, x.dtype, gamma if gamma.dtype == sd else gamma.astype(sd),
        invstd, total, None, x, mean, None, gamma_dtype, beta_dtype, stats, shape, layout))
    return y, cache


def _forward_cuda_sync(x, gamma, beta, bn_param, op, what, eps, momentum, convention, comm,
                       shape, layout, geo):
    """Train-mode synchronized BN on the CUDA kernels: this rank's statistics record (2
    launches), ONE collective (comm.allgather of the records, the global count summed in its
    host header), then the apply kernel merging the ranks' records in rank order (a copy
    and 1 launch). No device value is read on the host. The cache keeps x and the stats
    block, as _forward_cuda's; its count is the global one."""
    axes, sd, count, shape4, gamma_dtype, beta_dtype = geo
    import cupy
    record = bn_kernels.sync_stats_gpu(x, shape4)
    gathered, total = _gather_stats(comm, cupy, record, count, shape4[1])
    if total <= 1:
        raise ValueError(f"{what} in train mode needs more than one value per channel over "
                         f"all ranks, got {total}")
    y, stats = bn_kernels.sync_train_forward_gpu(
        x, gamma, beta, eps, gathered, total, bn_param.get("running_mean"),
        bn_param.get("running_var"), momentum, convention, shape4)
    bn_param["running_mean"], bn_param["running_var"] = stats[4], stats[5]
    cache = _new_cache(BatchNormCache, (
        op, "cuda", axes, True, x.dtype, gamma if gamma.dtype == sd else gamma.astype(sd),
        None, total, None, x, None, comm, gamma_dtype, beta_dtype, stats, shape, layout))
    return y, cache


def _forward_on(xp, x, gamma, beta, bn_param, op, what, kernels, mode, eps, momentum,
                convention, comm, shape, layout):
    """(y, cache) of one BN forward on x as the implementations see it (channels-first, or
    the (M, C) matrix of a channels-last input); the cache records the caller's ``shape``
    and ``layout``."""
    train = mode == "train"
    if kernels and comm is not None and xp is not np and backend._KERNELS:
        # synchronized BN on the kernels; test mode does not communicate (running stats)
        geo = _cuda_geometry(x.shape, x.dtype, gamma.dtype, beta.dtype)
        if geo is not None:
            if not train:
                return _forward_cuda(x, gamma, beta, bn_param, op, what, False, eps, momentum,
                                     convention, shape, layout, geo)
            return _forward_cuda_sync(x, gamma, beta, bn_param, op, what, eps, momentum,
                                      convention, comm, shape, layout, geo)
    if kernels and comm is None and xp is not np and backend._KERNELS:
        geo = _cuda_geometry(x.shape, x.dtype, gamma.dtype, beta.dtype)
        if geo is not None:
            return _forward_cuda(x, gamma, beta, bn_param, op, what, train, eps, momentum,
                                 convention, shape, layout, geo)
    where = dict(shape=shape, layout=layout)
    ndim = x.ndim
    axes = (0,) + tuple(range(2, ndim))
    C = x.shape[1]
    sd = _stats_dtype(x.dtype)
    total = x.size // C
    dtypes = dict(gamma_dtype=np.dtype(gamma.dtype), beta_dtype=np.dtype(beta.dtype), **where)
    if train and comm is None and total <= 1:
        raise ValueError(f"{what} in train mode needs more than one value per channel, "
                         f"got x of shape {tuple(x.shape)}")
    rm, rv = bn_param.get("running_mean"), bn_param.get("running_var")
    if kernels and _use_kernels(xp, comm) and kernel_fallback_reason(x.shape) is None:
        # CUDA path: statistics, running-stat update and normalization in three kernel
        # launches (train) or one (test, which also returns invstd); no CuPy op in between
        x4 = _reshaped(x, _as4(x.shape))
        if train:
            y, stats = bn_kernels.bn_train_forward_block_gpu(x4, gamma, beta, eps, rm, rv,
                                                             momentum, convention)
            bn_param["running_mean"], bn_param["running_var"] = stats[4], stats[5]
            mean = invstd = None  # rows 0 and 2 of stats: views made by the backward pass
        else:
            y, mean, invstd = bn_kernels.bn_eval_forward_stats_gpu(x4, gamma, beta, rm, rv, eps)
            stats = None
        cache = BatchNormCache(op, "cuda", axes, train, x.dtype,
                               gamma if gamma.dtype == sd else gamma.astype(sd), invstd, total,
                               x=x, mean=mean, stats=stats, **dtypes)
        return _reshaped(y, x.shape), cache
    # Reductions follow memory order: a C-contiguous x makes every layout give the same bits.
    x = xp.ascontiguousarray(x)
    g = gamma.astype(sd)
    b = beta.astype(sd)
    if not train:
        mean = xp.asarray(rm, dtype=sd)
        invstd = 1 / xp.sqrt(xp.asarray(rv, dtype=sd) + eps)

    if kernels and xp is np and ndim == 2 and comm is None:
        # NumPy rows path: (N, D) and channels-last input (gpulayers.bn_rows: the CPU
        # kernels' row blocks, or plain NumPy for 16-bit dtypes); the cache keeps x
        if train:
            y, mean, var, invstd, xr = bn_rows.train_forward(x, g, b, eps, sd)
            _update_running(bn_param, xp, C, sd, mean, var, total, convention, momentum)
        else:
            y, xr = bn_rows.eval_forward(x, g, b, mean, invstd, sd)
        return y, BatchNormCache(op, "numpy_rows", axes, train, np.dtype(x.dtype), g, invstd,
                                 total, x=xr, mean=mean, **dtypes)
    fast = None
    if kernels and xp is np and ndim >= 3 and comm is None and x.dtype.kind == "f":
        # NumPy fast path (gpulayers.numpy_fast: the CPU kernels for float32/64, simple
        # NumPy for float16; bfloat16 takes the general path); the cache keeps x, not a
        # normalized copy
        x4 = x.reshape(_as4(x.shape))
        if train:
            fast = numpy_fast.bn_train_forward(x4, g, b, eps, sd)
        else:
            y = numpy_fast.bn_eval_forward(x4, g, b, mean, invstd, sd)
            fast = None if y is None else (y, mean, None, invstd)
    if fast is not None:
        y, mean, var, invstd = fast
        y = y.reshape(x.shape)
        if train:
            _update_running(bn_param, xp, C, sd, mean, var, total, convention, momentum)
        cache = BatchNormCache(op, "numpy_fast", axes, train, np.dtype(x.dtype), g, invstd,
                               total, x=x, mean=mean, **dtypes)
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
        xhat = (x.astype(sd) - _bcast(mean, ndim)) * _bcast(invstd, ndim)
    out = xhat * _bcast(g, ndim)
    out += _bcast(b, ndim)
    cache = BatchNormCache(op, "xp", axes, train, np.dtype(x.dtype), g, invstd, total, xhat=xhat,
                           comm=comm if train else None, **dtypes)
    return out.astype(x.dtype, copy=False), cache


def _backward(dout, cache, op, what):
    if cache.__class__ is BatchNormCache and dout.__class__ is not np.ndarray:
        return _backward_warm(dout, cache, op, what)   # CuPy: maybe warmed
    return _backward_checked(dout, cache, op, what)


def _backward_checked(dout, cache, op, what):
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"{what}: cache must be the BatchNormCache returned by {op}, "
                        f"got {type(cache).__name__}")
    if cache.op != op:
        raise TypeError(f"{what} needs the cache of {op}, got the cache of {cache.op} "
                        f"(use the backward of the forward that made it)")
    check_array(dout, "dout")
    check_floating(dout, "dout")
    ref = cache.xhat if cache.xhat is not None else cache.x
    if tuple(dout.shape) != cache.shape:
        where = "" if cache.layout == "channels_first" else f" ({cache.layout})"
        raise ValueError(f"{what}: dout has shape {tuple(dout.shape)} but the forward input "
                         f"had shape {cache.shape}{where}")
    xp = get_array_module(dout, ref)
    with device_scope(dout):   # the shared no-op context when no switch is needed
        if cache.layout == "channels_first":
            dx, dgamma, dbeta = _backward_on(xp, dout, cache, len(ref.shape))
        else:
            dl = dout if cache.layout == "channels_last" else xp.moveaxis(dout, 1, -1)
            dx, dgamma, dbeta = _backward_on(xp, dl.reshape(ref.shape), cache, 2)
            dx = dx.reshape(dl.shape)
            if cache.layout == "channels_last_strided":
                dx = xp.moveaxis(dx, -1, 1)
    return (_as_dtype(dx, cache.dtype), _as_dtype(dgamma, cache.gamma_dtype),
            _as_dtype(dbeta, cache.beta_dtype))


def _as_dtype(a, dtype):
    """``a.astype(dtype, copy=False)``, without the call when it already has that dtype."""
    return a if a.dtype == dtype else a.astype(dtype, copy=False)


def _backward_on(xp, dout, cache, ndim):
    sd = cache.gamma.dtype
    if cache.path == "numpy_rows":
        return bn_rows.backward(dout.astype(cache.dtype, copy=False), cache.x, cache.gamma,
                                cache.mean, cache.invstd, cache.count, cache.train, sd)
    if cache.path == "numpy_fast":
        shape4 = _as4(cache.x.shape)
        dout = np.ascontiguousarray(dout, dtype=cache.dtype).reshape(shape4)
        dx, dgamma, dbeta = numpy_fast.bn_backward(dout, cache.x.reshape(shape4), cache.gamma,
                                                   cache.mean, cache.invstd, cache.count,
                                                   cache.train, sd)
        return dx.reshape(cache.x.shape), dgamma, dbeta
    if cache.path == "cuda":
        # the launcher sees x and dout (of x's shape) as (N, C, H, W): no views made; dx
        # comes back in x's shape
        x = cache.x
        d = dout if dout.dtype == cache.dtype else dout.astype(cache.dtype, copy=False)
        d = _reshaped(d, x.shape)
        if cache.stats is None:
            mean, invstd, mean_lo = cache.mean, cache.invstd, None
        else:
            mean, invstd, mean_lo = _stat_views(cache.stats)
        if cache.comm is not None:
            # synchronized: this rank's [dbeta, dgamma] shares (2 launches), ONE all-reduce,
            # then dx from the sums (1 launch)
            shape4 = _as4(x.shape)
            shares = bn_kernels.sync_backward_shares_gpu(d, x, cache.gamma, mean, invstd,
                                                         mean_lo, shape4)
            totals = cache.comm.allreduce_sum(shares)
            dx = bn_kernels.sync_backward_dx_gpu(d, x, cache.gamma, mean, invstd, mean_lo,
                                                 totals, cache.count, shape4)
            C = shape4[1]
            return _reshaped(dx, dout.shape), totals[C:], totals[:C]
        dx, dgamma, dbeta = bn_kernels._backward(d, x, cache.gamma, mean, invstd, cache.train,
                                                 mean_lo, _as4(x.shape))
        return _reshaped(dx, dout.shape), dgamma, dbeta
    axes, xhat = cache.axes, cache.xhat
    d = xp.ascontiguousarray(dout).astype(sd, copy=False)
    dbeta = d.sum(axis=axes, dtype=sd)
    dgamma = (d * xhat).sum(axis=axes, dtype=sd)
    if cache.comm is not None:   # ONE all-reduce of [dbeta, dgamma] (the CUDA path's too)
        C = dbeta.shape[0]
        totals = cache.comm.allreduce_sum(xp.concatenate([dbeta, dgamma]))
        dbeta, dgamma = totals[:C], totals[C:]
    scale = cache.gamma * cache.invstd
    if cache.train:
        M = cache.count
        dx = d - _bcast(dbeta / M, ndim)
        dx -= xhat * _bcast(dgamma / M, ndim)
        dx *= _bcast(scale, ndim)
    else:
        dx = d * _bcast(scale, ndim)
    return dx, dgamma, dbeta


# ------------------------------------------------------ warmed CUDA (and NumPy test-mode) calls
#
# Issue 13 §1: a few µs of Python per call on the GPU. A CuPy call whose kind of inputs ran
# the CUDA kernels before -- same classes, shapes, strides and dtypes of every array, same
# bn_param keys, value classes and (for str, bool and number values) values -- passed every
# check then, with nothing converted (x C-contiguous, gamma, beta and the running statistics
# contiguous in the stats dtype) and no communicator; such a call is looked up by one key and
# runs a prepared bn_kernels closure, which checks what may still differ (devices, alignment)
# and returns None if anything does. Every other call, and every first call, takes the
# checked path (_forward_checked, _backward_checked), so errors are exactly the checked
# path's. Float parameters equal to zero are never warmed (0.0 and -0.0 compare equal).
#
# NumPy test mode (spatial_batchnorm_forward) is warmed the same way where its checked call
# ran the CPU kernel (numpy_fast.bn_eval_forward_running_takes): the closure runs one kernel
# from the running statistics themselves (their value checks, invstd, gamma's copy for the
# cache and y), which declines -- and the checked path then runs or raises -- on a
# non-finite or negative value, with the kernels off, or below BN_EVAL_FORWARD_MIN. Its
# Python cost is ~14 us instead of ~31 (a (2, 64, 8, 8) call, warm caches), and ~40-150 us
# less right after a large kernel has streamed its data through the caches (measured
# 2026-12-01, 2-core EPYC). The warmed NumPy call does not look at alignment.

_WARM = {}            # forward key (see _forward_warm) -> (pick, {scalar values: _WarmForward})
_WARM_BACKWARD = {}   # backward key (see _backward_warm) -> _WarmBackward
_CACHE_FIELDS = ("op", "path", "axes", "train", "dtype", "gamma", "invstd", "count", "xhat",
                 "x", "mean", "comm", "gamma_dtype", "beta_dtype", "stats", "shape", "layout")
# The warm backward unpacks caches by position: off (every call checked) if the fields change.
_WARM_BACKWARD_ON = BatchNormCache._fields == _CACHE_FIELDS
_RUNNING = ("running_mean", "running_var")


class _ForgetWarm:
    """In bn_kernels.DEPENDENT (emptied with bn_kernels' launch plans): empties the warm
    tables and the prepared closures of their entries, which layers may still hold."""

    def clear(self):
        for _, entries in _WARM.values():
            for w in entries.values():
                w.ready[:] = [None, None]
        for w in _WARM_BACKWARD.values():
            w.ready[:] = [None, None]
        _WARM.clear()
        _WARM_BACKWARD.clear()


bn_kernels.DEPENDENT.append(_ForgetWarm())


class _WarmForward:
    """The prepared state of one forward key and bn_param's scalar values (which
    ``pick(tuple(bn_param.values()))`` takes): where the running statistics are; ``row``, the
    (class, shape, strides, dtype) every running-statistics array must have; ``ready``, the
    bn_kernels closures for an element-aligned and a 16-byte aligned x on ``device`` (None:
    NumPy test mode, one closure of numpy_fast in both slots); what the BatchNormCache holds
    besides the call's arrays."""

    __slots__ = ("mean_at", "var_at", "row", "train", "device", "ready",
                 "head", "total", "shape", "gamma_dtype", "beta_dtype")


class _WarmBackward:
    __slots__ = ("device", "ready")


def _forward_warm(x, gamma, beta, bn_param, op, what):
    try:
        values = tuple(bn_param.values())
        key = (op, x.__class__, x.shape, x.strides, x.dtype, gamma.__class__, gamma.shape,
               gamma.strides, gamma.dtype, beta.__class__, beta.shape, beta.strides,
               beta.dtype, tuple(bn_param), tuple(map(type, values)))
        warm = _WARM.get(key)
        w = None if warm is None else warm[1].get(warm[0](values))
    except (AttributeError, TypeError):   # not arrays, or an unhashable value
        return _forward_checked(x, gamma, beta, bn_param, op, what, True)
    if w is not None and (w.device is None or backend._KERNELS):
        out = _warm_run(w, x, gamma, beta, None if w.mean_at is None else values[w.mean_at],
                        None if w.var_at is None else values[w.var_at])
        if out is not None:
            if w.train:
                bn_param["running_mean"], bn_param["running_var"] = out[2], out[3]
            return out[0], out[1]
    out = _forward_checked(x, gamma, beta, bn_param, op, what, True)
    _warm_forward_register(key, values, x, gamma, beta, out[1], w)
    return out


def _warm_entry(x, gamma, beta, bn_param, op):
    """The _WarmForward of a forward on these inputs (bn_param as it was before the call),
    or None: for a layer, which keeps it (see layers._BatchNorm.forward)."""
    try:
        values = tuple(bn_param.values())
        warm = _WARM.get((op, x.__class__, x.shape, x.strides, x.dtype, gamma.__class__,
                          gamma.shape, gamma.strides, gamma.dtype, beta.__class__, beta.shape,
                          beta.strides, beta.dtype, tuple(bn_param), tuple(map(type, values))))
        return None if warm is None else warm[1].get(warm[0](values))
    except (AttributeError, TypeError):
        return None


def _warm_run(w, x, gamma, beta, running_mean, running_var):
    """(y, cache, new running_mean, new running_var (None in test mode)) of a warmed forward
    whose x, gamma and beta match w's key, or None (then take the checked path)."""
    cls, shape, strides, dtype = w.row
    if running_mean is not None and (
            running_mean.__class__ is not cls or running_mean.shape != shape
            or running_mean.strides != strides or running_mean.dtype != dtype):
        return None
    if running_var is not None and (
            running_var.__class__ is not cls or running_var.shape != shape
            or running_var.strides != strides or running_var.dtype != dtype):
        return None
    run = w.ready[0 if w.device is None else x.data.ptr % 16 == 0]
    out = None if run is None else run(x, gamma, beta, running_mean, running_var)
    if out is None:
        return None
    if w.train:
        return (out[0], _new_cache(BatchNormCache, w.head + (
            gamma, None, w.total, None, x, None, None, w.gamma_dtype, w.beta_dtype, out[1],
            w.shape, "channels_first")), out[2], out[3])
    # test mode: the CUDA closure returns (y, invstd), the NumPy one (y, invstd, gamma's copy)
    return (out[0], _new_cache(BatchNormCache, w.head + (
        gamma if len(out) < 3 else out[2], out[1], w.total, None, x, running_mean, None,
        w.gamma_dtype, w.beta_dtype, None, w.shape, "channels_first")), None, None)


def _current_device():
    return sys.modules["cupy"].cuda.runtime.getDevice()


def _warm_forward_register(key, values, x, gamma, beta, cache, w):
    """After a checked forward with ``key``: prepare the warm path for such calls when this
    one ran the CUDA kernels on the current device with nothing converted."""
    numpy_eval = (cache.path == "numpy_fast" and not cache.train
                  and numpy_fast.bn_eval_forward_running_takes(x))
    if (cache.path != "cuda" and not numpy_eval) or cache.layout != "channels_first" or \
            cache.comm is not None:
        return
    names, types = key[-2], key[-1]
    params = dict(zip(names, values))
    if params.get("comm") is not None or not x.flags.c_contiguous:
        return
    sd = _stats_dtype(x.dtype)
    cls = x.__class__
    row = (cls, (x.shape[1],), (sd.itemsize,), sd)
    rm, rv = params.get("running_mean"), params.get("running_var")
    arrays = [a for a in (gamma, beta, rm, rv) if a is not None]
    if any((a.__class__, a.shape, a.strides, a.dtype) != row for a in arrays):
        return
    device = None if numpy_eval else x.device.id
    if not numpy_eval and (device != _current_device()
                           or any(a.device.id != device for a in arrays)):
        return
    at = [i for i, name in enumerate(names) if name not in _RUNNING and name != "comm"]
    for i in at:
        v = values[i]
        if types[i] not in _SCALARS or (isinstance(v, (float, np.floating)) and v == 0):
            return
    if w is None or w.device != device:
        warm = _WARM.get(key)
        if warm is None:
            if len(_WARM) >= 256:
                _WARM.clear()
            warm = _WARM[key] = (operator.itemgetter(*at), {})
        if len(warm[1]) >= 16:
            warm[1].clear()
        w = warm[1][warm[0](values)] = _WarmForward()
        w.mean_at = names.index("running_mean") if "running_mean" in params else None
        w.var_at = names.index("running_var") if "running_var" in params else None
        w.row, w.train, w.device, w.ready = row, cache.train, device, [None, None]
        w.head, w.total, w.shape = cache[:5], cache.count, cache.shape
        w.gamma_dtype, w.beta_dtype = cache.gamma_dtype, cache.beta_dtype
    eps = float(params.get("eps", 1e-5))
    if numpy_eval:
        # the NumPy kernels do not care about alignment: one closure for both slots
        w.ready[:] = [functools.partial(numpy_fast.bn_eval_forward_running, eps=eps)] * 2
        return
    aligned = x.data.ptr % 16 == 0
    shape4 = _as4(x.shape)
    if w.train:
        convention = params.get("convention", "cs231n")
        terms = bn_kernels.running_terms(
            float(params.get("momentum", _CONVENTIONS[convention])), convention)
        w.ready[aligned] = bn_kernels.ready_train_forward(
            shape4, x.shape, x.dtype, aligned, device,
            (rm is not None) | (rv is not None) << 1, *terms, eps)
    else:
        w.ready[aligned] = bn_kernels.ready_eval_forward(shape4, x.shape, x.dtype, aligned,
                                                         device, eps)


def _backward_warm(dout, cache, op, what):
    if _WARM_BACKWARD_ON:
        (op_, path, _, train, dtype, gamma, invstd, _, xhat, x, mean, comm, gamma_dtype,
         beta_dtype, stats, shape, layout) = cache
        if (op_ == op and path == "cuda" and comm is None and xhat is None
                and layout == "channels_first"):
            a, b = (stats, None) if train else (mean, invstd)
            try:
                key = (op, train, dtype, gamma_dtype, beta_dtype, shape, dout.__class__,
                       dout.shape, dout.strides, dout.dtype, x.__class__, x.shape, x.strides,
                       x.dtype, gamma.__class__, gamma.shape, gamma.strides, gamma.dtype,
                       a.__class__, a.shape, a.strides, a.dtype,
                       None if b is None else (b.__class__, b.shape, b.strides, b.dtype))
                w = _WARM_BACKWARD.get(key)
            except (AttributeError, TypeError):
                return _backward_checked(dout, cache, op, what)
            if w is not None and backend._KERNELS:
                run = w.ready[x.data.ptr % 16 == 0 and dout.data.ptr % 16 == 0]
                out = None if run is None else run(dout, x, gamma, a, b)
                if out is not None:
                    return out
            out = _backward_checked(dout, cache, op, what)
            _warm_backward_register(key, dout, x, gamma, a, b, w)
            return out
    return _backward_checked(dout, cache, op, what)


def _warm_backward_register(key, dout, x, gamma, a, b, w):
    """After a checked backward with ``key`` (whose cache passed _backward_warm's tests):
    prepare the warm path for such calls when every array is of x's class on the current
    device and nothing was converted."""
    _, train, dtype, gamma_dtype, beta_dtype, shape = key[:6]
    cls, sd = x.__class__, _stats_dtype(x.dtype)
    C = shape[1] if len(shape) > 1 else 0
    row = (cls, (C,), (sd.itemsize,), sd)
    block = (cls, (len(bn_kernels.STAT_ROWS), C), (C * sd.itemsize, sd.itemsize), sd)
    if (dout.__class__ is not cls or dtype != x.dtype or dout.dtype != x.dtype
            or gamma_dtype != sd or beta_dtype != sd or tuple(x.shape) != shape
            or tuple(dout.shape) != shape or not x.flags.c_contiguous
            or not dout.flags.c_contiguous
            or (gamma.__class__, gamma.shape, gamma.strides, gamma.dtype) != row
            or (a.__class__, a.shape, a.strides, a.dtype) != (block if train else row)
            or (not train and (b.__class__, b.shape, b.strides, b.dtype) != row)):
        return
    device = x.device.id
    if (device != _current_device() or dout.device.id != device
            or gamma.device.id != device or a.device.id != device
            or (not train and b.device.id != device)):
        return
    if w is None or w.device != device:
        if len(_WARM_BACKWARD) >= 256:
            _WARM_BACKWARD.clear()
        w = _WARM_BACKWARD[key] = _WarmBackward()
        w.device, w.ready = device, [None, None]
    aligned = x.data.ptr % 16 == 0 and dout.data.ptr % 16 == 0
    w.ready[aligned] = bn_kernels.ready_backward(_as4(shape), shape, x.dtype, aligned, device,
                                                 bool(train))


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
    if bn_param.__class__ is dict and x.__class__ is not np.ndarray:
        return _forward_warm(x, gamma, beta, bn_param, "batchnorm_forward",
                             "batchnorm_forward")   # CuPy: maybe a warmed call
    return _forward(x, gamma, beta, bn_param, "batchnorm_forward", "batchnorm_forward",
                    kernels=True)


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
    return _backward(dout, cache, "batchnorm_forward", "batchnorm_backward")


_SPATIAL = "spatial_batchnorm_forward"


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Forward pass of spatial batch norm: per channel, over every axis but 1
    (N and the 1, 2 or 3 spatial axes).

    Uses the fused CUDA kernels for CuPy inputs (with a communicator too).

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W), float16/32/64
    - gamma: scale, array (C,)
    - beta: shift, array (C,)
    - bn_param: dict, see the module docstring ('mode' required)

    Returns a tuple of:
    - out: array shaped like x, dtype of x
    - cache: BatchNormCache for spatial_batchnorm_backward
    """
    if bn_param.__class__ is dict and (
            x.__class__ is not np.ndarray
            or (bn_param.get("mode") == "test" and x.size >= numpy_fast.BN_EVAL_FORWARD_MIN)):
        # CuPy, or NumPy test mode on the CPU kernel's sizes: maybe a warmed call
        return _forward_warm(x, gamma, beta, bn_param, _SPATIAL, _SPATIAL)
    return _forward(x, gamma, beta, bn_param, _SPATIAL, _SPATIAL, kernels=True)


def spatial_batchnorm_backward(dout, cache):
    """Backward pass of spatial batch norm.

    Inputs:
    - dout: array shaped like the forward input x
    - cache: BatchNormCache from spatial_batchnorm_forward(_general)

    Returns a tuple of:
    - dx: array shaped like x, dtype of x
    - dgamma: array (C,)
    - dbeta: array (C,)
    """
    return _backward(dout, cache, "spatial_batchnorm_forward", "spatial_batchnorm_backward")


def spatial_batchnorm_forward_general(x, gamma, beta, bn_param):
    """spatial_batchnorm_forward through the xp path only (no CUDA kernels,
    also on CuPy): the reference the kernels are checked against.

    Inputs and returns as spatial_batchnorm_forward.
    """
    return _forward(x, gamma, beta, bn_param, _SPATIAL, _SPATIAL, kernels=False)


def spatial_batchnorm_backward_general(dout, cache):
    """Backward pass for spatial_batchnorm_forward_general (same as
    spatial_batchnorm_backward, which follows the cache it is given).

    Inputs and returns as spatial_batchnorm_backward.
    """
    return _backward(dout, cache, "spatial_batchnorm_forward", "spatial_batchnorm_backward")
