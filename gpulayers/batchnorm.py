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
  statistics and gradients over the whole batch held by all ranks.

Statistics are computed in float32 for float16 and float32 input, float64
for float64, by a shifted two-pass method (never E[x^2] - E[x]^2): a constant
channel gives zeros, and large means do not cancel.
"""
from __future__ import annotations

import math
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
            if not (np.isfinite(rm).all() and np.isfinite(rv).all()):
                raise ValueError(f"{what} in test mode needs finite running statistics, got "
                                 f"running_mean {rm!r} and running_var {rv!r}")
            if (rv < 0).any():
                raise ValueError(f"{what} in test mode needs running_var >= 0, got {rv!r}")
    return xp, mode, float(eps), float(momentum), convention, comm, gamma, beta, data_format


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
# stored: calls with a communicator, integer gamma/beta (cast per call), NumPy test mode
# (its running statistics' values are checked per call) and any value of another class.
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
            xp = get_array_module(x, gamma, beta, bn_param.get("running_mean"),
                                  bn_param.get("running_var"))
            return (xp, hit[0], hit[1], hit[2], hit[3], None, gamma, beta, hit[4])
    xp, mode, eps, momentum, convention, comm, g, b, layout = _parse(
        x, gamma, beta, bn_param, op, what)
    if op != _SPATIAL:
        layout = "channels_first"     # (N, D) has one layout
    elif layout == "channels_first" and channels_last_strided(x):
        layout = "channels_last_strided"
    if (key is not None and comm is None and g is gamma and b is beta
            and not (xp is np and mode == "test")):
        if len(_CHECKED) >= 1024:
            _CHECKED.clear()
        _CHECKED[key] = (mode, eps, momentum, convention, layout)
    return xp, mode, eps, momentum, convention, comm, g, b, layout


def _forward(x, gamma, beta, bn_param, op, what, kernels):
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


def _forward_on(xp, x, gamma, beta, bn_param, op, what, kernels, mode, eps, momentum,
                convention, comm, shape, layout):
    """(y, cache) of one BN forward on x as the implementations see it (channels-first, or
    the (M, C) matrix of a channels-last input); the cache records the caller's ``shape``
    and ``layout``."""
    train = mode == "train"
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
        # NumPy rows path: (N, D) and channels-last input, block by block; the cache keeps x
        if train:
            y, mean, var, invstd, xr = bn_rows.train_forward(x, g, b, eps, sd)
            _update_running(bn_param, xp, C, sd, mean, var, total, convention, momentum)
        else:
            y, xr = bn_rows.eval_forward(x, g, b, mean, invstd, sd)
        return y, BatchNormCache(op, "numpy_rows", axes, train, np.dtype(x.dtype), g, invstd,
                                 total, x=xr, mean=mean, **dtypes)
    fast = None
    if kernels and xp is np and ndim >= 3 and comm is None and x.dtype.kind == "f":
        # NumPy fast path (float16/32/64; bfloat16 takes the general path): blocked and
        # threaded; the cache keeps x, not a normalized copy
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
        dx, dgamma, dbeta = bn_kernels._backward(d, x, cache.gamma, mean, invstd, cache.train,
                                                 mean_lo, _as4(x.shape))
        return _reshaped(dx, dout.shape), dgamma, dbeta
    axes, xhat = cache.axes, cache.xhat
    d = xp.ascontiguousarray(dout).astype(sd, copy=False)
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
    return dx, dgamma, dbeta


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

    Uses the fused CUDA kernels for CuPy inputs (without a communicator).

    Inputs:
    - x: array (N, C, L), (N, C, H, W) or (N, C, D, H, W), float16/32/64
    - gamma: scale, array (C,)
    - beta: shift, array (C,)
    - bn_param: dict, see the module docstring ('mode' required)

    Returns a tuple of:
    - out: array shaped like x, dtype of x
    - cache: BatchNormCache for spatial_batchnorm_backward
    """
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
