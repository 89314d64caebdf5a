"""The ``torch.ops.gpulayers.*`` custom operators: schemas, CPU/CUDA kernels (gpulayers on
NumPy / CuPy arrays of the tensors' memory), fake (meta) kernels and autograd formulas.

Registered with ``torch.library.Library.define`` / ``impl`` plus ``register_fake`` and
``register_autograd`` (measured: 2 to 3 us a call less than ``torch.library.custom_op``,
whose Python wrapper adds work per call; the schemas are spelled out here instead of
inferred). Every kernel runs gpulayers' public forward or backward; the backward kernels
rebuild the cache the backward needs from what the forward returned and autograd saved:

- max and adaptive max pooling save the compact argmax offsets (uint8 for windows of up
  to 256 elements), never x, out or int64 indices;
- average pooling saves nothing, max unpooling its int64 indices (its gradient is
  PyTorch's: a gather, so every duplicate index receives its target's gradient);
- batch norm saves x, weight and a (4, C) statistics block (mean, invstd, mean_lo,
  unbiased var) in the statistics dtype; the running statistics are updated by a
  separate mutating op, ``update_running_stats`` (autograd formulas need functional ops).

Layouts: a tensor in PyTorch's channels_last / channels_last_3d memory format (see
:func:`_bridge.is_cl`) is processed by gpulayers without a copy; results, offsets and
gradients come back in that memory format, and the fake kernels promise exactly those
strides.
"""
from __future__ import annotations


import numpy as np
import torch

from .. import batchnorm as _bn
from .. import pooling as _pool
from ..backend import get_array_module, kernels_enabled
from ..shapes import adaptive_geometry, channels_last_strided, pool_geometry
from ._bridge import array_scope, empty_like_layout, is_cl, to_array, to_tensor

__all__ = ["lib", "comm_handle", "OPS"]

lib = torch.library.Library("gpulayers", "DEF")

_OFFSET_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16,
                  np.dtype(np.uint32): torch.uint32}

OPS = []   # names of the ops, for the tests


def _define(schema, kernel, fake):
    name = schema.split("(", 1)[0]
    lib.define(schema)
    for key in ("CPU", "CUDA"):
        lib.impl(name, kernel, key)
    torch.library.register_fake(f"gpulayers::{name}", fake, lib=lib)
    OPS.append(name)
    return name


def _layout(cl):
    return "channels_last_strided" if cl else "channels_first"


def _internal(a, cl):
    """gpulayers' internal (N, *spatial, C) view of a channels-last-strided array."""
    return get_array_module(a).moveaxis(a, 1, -1) if cl else a


def _external(a, cl):
    return get_array_module(a).moveaxis(a, -1, 1) if cl else a


def _pool_param(kernel_size, stride, padding, dilation=None, ceil_mode=False, **extra):
    p = {"kernel_size": tuple(kernel_size), "stride": tuple(stride), "pad": tuple(padding),
         "ceil_mode": bool(ceil_mode)}
    if dilation is not None:
        p["dilation"] = tuple(dilation)
    p.update(extra)
    return p


def _avg_param(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _pool_param(kernel_size, stride, padding, None, ceil_mode,
                       count_include_pad=bool(count_include_pad),
                       divisor_override=None if divisor_override is None else int(divisor_override))


def _shape(t):
    return tuple(int(s) for s in t.shape)


# ---------------------------------------------------------------------- max pooling

def _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode):
    cl = is_cl(x)
    with array_scope(x):
        out, cache = _pool.max_pool_forward(
            to_array(x), _pool_param(kernel_size, stride, padding, dilation, ceil_mode))
        offsets = _external(cache.offsets, cl)
        return to_tensor(out, cl, (x,)), to_tensor(offsets, cl, (x,))


def _max_pool_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
    geom = pool_geometry(_shape(x), _pool_param(kernel_size, stride, padding, dilation,
                                                ceil_mode), "max")
    cl = is_cl(x)
    return (empty_like_layout(geom.output_shape, x.dtype, x.device, cl),
            empty_like_layout(geom.output_shape, _OFFSET_DTYPES[np.dtype(geom.offset_dtype)],
                              x.device, cl))


_define("max_pool(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "bool ceil_mode) -> (Tensor, Tensor)", _max_pool, _max_pool_fake)


def _max_cache(offsets, x_shape, kernel_size, stride, padding, dilation, ceil_mode, cl, dtype):
    geom = pool_geometry(tuple(int(s) for s in x_shape),
                         _pool_param(kernel_size, stride, padding, dilation, ceil_mode), "max")
    return _pool.MaxPoolCache(geom, np.dtype(dtype), _internal(to_array(offsets), cl),
                              _layout(cl))


def _max_pool_backward(grad, offsets, x_shape, kernel_size, stride, padding, dilation,
                       ceil_mode, channels_last):
    with array_scope(grad):
        g = to_array(grad)
        cache = _max_cache(offsets, x_shape, kernel_size, stride, padding, dilation, ceil_mode,
                           channels_last, g.dtype)
        return to_tensor(_pool.max_pool_backward(g, cache), channels_last, (grad, offsets))


def _max_pool_backward_fake(grad, offsets, x_shape, kernel_size, stride, padding, dilation,
                            ceil_mode, channels_last):
    return empty_like_layout(x_shape, grad.dtype, grad.device, channels_last)


_define("max_pool_backward(Tensor grad, Tensor offsets, SymInt[] x_shape, int[] kernel_size, "
        "int[] stride, int[] padding, int[] dilation, bool ceil_mode, bool channels_last) "
        "-> Tensor", _max_pool_backward, _max_pool_backward_fake)


def _max_pool_indices(offsets, x_shape, kernel_size, stride, padding, dilation, ceil_mode,
                      channels_last):
    with array_scope(offsets):
        cache = _max_cache(offsets, x_shape, kernel_size, stride, padding, dilation, ceil_mode,
                           channels_last, np.float32)
        return to_tensor(_pool.max_pool_indices(cache), channels_last, (offsets,))


def _max_pool_indices_fake(offsets, x_shape, kernel_size, stride, padding, dilation, ceil_mode,
                           channels_last):
    return empty_like_layout(offsets.shape, torch.int64, offsets.device, channels_last)


_define("max_pool_indices(Tensor offsets, SymInt[] x_shape, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, bool ceil_mode, bool channels_last) -> Tensor",
        _max_pool_indices, _max_pool_indices_fake)


def _max_pool_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, ceil_mode = inputs
    ctx.save_for_backward(output[1])
    ctx.args = (list(x.shape), kernel_size, stride, padding, dilation, ceil_mode, is_cl(x))


def _max_pool_grad(ctx, grad, _grad_offsets):
    (offsets,) = ctx.saved_tensors
    dx = torch.ops.gpulayers.max_pool_backward.default(grad, offsets, *ctx.args)
    return dx, None, None, None, None, None


torch.library.register_autograd("gpulayers::max_pool", _max_pool_grad,
                                setup_context=_max_pool_setup, lib=lib)


# ---------------------------------------------------------------------- avg pooling

def _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    cl = is_cl(x)
    with array_scope(x):
        out, _ = _pool.avg_pool_forward(to_array(x), _avg_param(
            kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override))
        return to_tensor(out, cl, (x,))


def _avg_pool_fake(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override):
    p = _avg_param(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    geom = pool_geometry(_shape(x), p, "avg")
    return empty_like_layout(geom.output_shape, x.dtype, x.device, is_cl(x))


_define("avg_pool(Tensor x, int[] kernel_size, int[] stride, int[] padding, bool ceil_mode, "
        "bool count_include_pad, int? divisor_override) -> Tensor", _avg_pool, _avg_pool_fake)


def _avg_pool_backward(grad, x_shape, kernel_size, stride, padding, ceil_mode,
                       count_include_pad, divisor_override, channels_last):
    p = _avg_param(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    geom = pool_geometry(tuple(int(s) for s in x_shape), p, "avg")
    cip, div = p["count_include_pad"], p["divisor_override"]
    with array_scope(grad):
        g = to_array(grad)
        # the cache avg_pool_forward makes (its divisor table is shared, read-only)
        cache = _pool.AvgPoolCache(geom, np.dtype(g.dtype), _pool._avg_divisor(geom, cip, div),
                                   cip, div, _layout(channels_last))
        return to_tensor(_pool.avg_pool_backward(g, cache), channels_last, (grad,))


def _avg_pool_backward_fake(grad, x_shape, kernel_size, stride, padding, ceil_mode,
                            count_include_pad, divisor_override, channels_last):
    return empty_like_layout(x_shape, grad.dtype, grad.device, channels_last)


_define("avg_pool_backward(Tensor grad, SymInt[] x_shape, int[] kernel_size, int[] stride, "
        "int[] padding, bool ceil_mode, bool count_include_pad, int? divisor_override, "
        "bool channels_last) -> Tensor", _avg_pool_backward, _avg_pool_backward_fake)


def _avg_pool_setup(ctx, inputs, output):
    x = inputs[0]
    ctx.args = (list(x.shape),) + tuple(inputs[1:]) + (is_cl(x),)


def _avg_pool_grad(ctx, grad):
    dx = torch.ops.gpulayers.avg_pool_backward.default(grad, *ctx.args)
    return (dx,) + (None,) * 6


torch.library.register_autograd("gpulayers::avg_pool", _avg_pool_grad,
                                setup_context=_avg_pool_setup, lib=lib)


# ----------------------------------------------------------------- adaptive pooling

def _adaptive_avg_pool(x, output_size):
    cl = is_cl(x)
    with array_scope(x):
        out, _ = _pool.adaptive_avg_pool_forward(to_array(x), tuple(output_size))
        return to_tensor(out, cl, (x,))


def _adaptive_fake_shape(x, output_size):
    return adaptive_geometry(_shape(x), tuple(int(s) for s in output_size))


def _adaptive_avg_pool_fake(x, output_size):
    geom = _adaptive_fake_shape(x, output_size)
    return empty_like_layout(geom.output_shape, x.dtype, x.device, is_cl(x))


_define("adaptive_avg_pool(Tensor x, int[] output_size) -> Tensor", _adaptive_avg_pool,
        _adaptive_avg_pool_fake)


def _adaptive_avg_pool_backward(grad, x_shape, channels_last):
    geom = adaptive_geometry(tuple(int(s) for s in x_shape), tuple(int(s) for s in grad.shape[2:]))
    with array_scope(grad):
        g = to_array(grad)
        cache = _pool.AdaptiveAvgPoolCache(geom, np.dtype(g.dtype), _layout(channels_last))
        return to_tensor(_pool.adaptive_avg_pool_backward(g, cache), channels_last, (grad,))


def _adaptive_avg_pool_backward_fake(grad, x_shape, channels_last):
    return empty_like_layout(x_shape, grad.dtype, grad.device, channels_last)


_define("adaptive_avg_pool_backward(Tensor grad, SymInt[] x_shape, bool channels_last) -> Tensor",
        _adaptive_avg_pool_backward, _adaptive_avg_pool_backward_fake)


def _adaptive_avg_setup(ctx, inputs, output):
    ctx.args = (list(inputs[0].shape), is_cl(inputs[0]))


def _adaptive_avg_grad(ctx, grad):
    return torch.ops.gpulayers.adaptive_avg_pool_backward.default(grad, *ctx.args), None


torch.library.register_autograd("gpulayers::adaptive_avg_pool", _adaptive_avg_grad,
                                setup_context=_adaptive_avg_setup, lib=lib)


def _adaptive_max_pool(x, output_size):
    cl = is_cl(x)
    with array_scope(x):
        out, cache = _pool.adaptive_max_pool_forward(to_array(x), tuple(output_size))
        return to_tensor(out, cl, (x,)), to_tensor(_external(cache.offsets, cl), cl, (x,))


def _adaptive_max_pool_fake(x, output_size):
    geom = _adaptive_fake_shape(x, output_size)
    cl = is_cl(x)
    return (empty_like_layout(geom.output_shape, x.dtype, x.device, cl),
            empty_like_layout(geom.output_shape, _OFFSET_DTYPES[np.dtype(geom.offset_dtype)],
                              x.device, cl))


_define("adaptive_max_pool(Tensor x, int[] output_size) -> (Tensor, Tensor)",
        _adaptive_max_pool, _adaptive_max_pool_fake)


def _adaptive_max_cache(offsets, x_shape, cl, dtype):
    geom = adaptive_geometry(tuple(int(s) for s in x_shape),
                             tuple(int(s) for s in offsets.shape[2:]))
    return _pool.AdaptiveMaxPoolCache(geom, np.dtype(dtype), _internal(to_array(offsets), cl),
                                      _layout(cl))


def _adaptive_max_pool_backward(grad, offsets, x_shape, channels_last):
    with array_scope(grad):
        g = to_array(grad)
        cache = _adaptive_max_cache(offsets, x_shape, channels_last, g.dtype)
        return to_tensor(_pool.adaptive_max_pool_backward(g, cache), channels_last,
                         (grad, offsets))


def _adaptive_max_pool_backward_fake(grad, offsets, x_shape, channels_last):
    return empty_like_layout(x_shape, grad.dtype, grad.device, channels_last)


_define("adaptive_max_pool_backward(Tensor grad, Tensor offsets, SymInt[] x_shape, "
        "bool channels_last) -> Tensor", _adaptive_max_pool_backward,
        _adaptive_max_pool_backward_fake)


def _adaptive_max_pool_indices(offsets, x_shape, channels_last):
    with array_scope(offsets):
        cache = _adaptive_max_cache(offsets, x_shape, channels_last, np.float32)
        return to_tensor(_pool.max_pool_indices(cache), channels_last, (offsets,))


def _adaptive_max_pool_indices_fake(offsets, x_shape, channels_last):
    return empty_like_layout(offsets.shape, torch.int64, offsets.device, channels_last)


_define("adaptive_max_pool_indices(Tensor offsets, SymInt[] x_shape, bool channels_last) "
        "-> Tensor", _adaptive_max_pool_indices, _adaptive_max_pool_indices_fake)


def _adaptive_max_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.args = (list(inputs[0].shape), is_cl(inputs[0]))


def _adaptive_max_grad(ctx, grad, _grad_offsets):
    (offsets,) = ctx.saved_tensors
    return (torch.ops.gpulayers.adaptive_max_pool_backward.default(grad, offsets, *ctx.args),
            None)


torch.library.register_autograd("gpulayers::adaptive_max_pool", _adaptive_max_grad,
                                setup_context=_adaptive_max_setup, lib=lib)


# -------------------------------------------------------------------- max unpooling

def _max_unpool(x, indices, output_size):
    cl = is_cl(x)
    if 0 in tuple(output_size):   # torch returns the empty plane; gpulayers wants sizes > 0
        return empty_like_layout(tuple(x.shape[:2]) + tuple(output_size), x.dtype, x.device, cl)
    with array_scope(x):
        out, _ = _pool.max_unpool_forward(to_array(x), to_array(indices),
                                          tuple(int(s) for s in output_size))
        return to_tensor(out, cl, (x, indices))


def _max_unpool_fake(x, indices, output_size):
    shape = tuple(x.shape[:2]) + tuple(output_size)
    return empty_like_layout(shape, x.dtype, x.device, is_cl(x))


_define("max_unpool(Tensor x, Tensor indices, SymInt[] output_size) -> Tensor", _max_unpool,
        _max_unpool_fake)


def unpool_grad(grad, indices):
    """PyTorch's max_unpool gradient: a gather of grad at every index (each duplicate gets
    its target's gradient), in the memory format of indices (channels-last views when
    indices are in it: no copy of grad or indices when they share that format)."""
    N, C = indices.shape[:2]
    if indices.dtype != torch.int64:
        indices = indices.long()
    if grad.numel() == 0:   # an empty output plane: nothing reaches the inputs
        return grad.new_zeros(indices.shape)
    if is_cl(indices):
        g = grad.movedim(1, -1).reshape(N, -1, C)
        i = indices.movedim(1, -1).reshape(N, -1, C)
        dx = g.gather(1, i).reshape((N,) + tuple(indices.shape[2:]) + (C,)).movedim(-1, 1)
    else:
        dx = grad.reshape(N, C, -1).gather(2, indices.reshape(N, C, -1)).reshape(indices.shape)
    return dx


def _max_unpool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _max_unpool_grad(ctx, grad):
    (indices,) = ctx.saved_tensors
    return unpool_grad(grad, indices), None, None


torch.library.register_autograd("gpulayers::max_unpool", _max_unpool_grad,
                                setup_context=_max_unpool_setup, lib=lib)


# ----------------------------------------------------------------------- batch norm
#
# stats block rows (the statistics dtype: float64 for float64 x, float32 otherwise)
_MEAN, _INVSTD, _MEAN_LO, _VAR = range(4)

_COMMS = {}


def comm_handle(comm):
    """An int naming ``comm`` (kept alive here) for the sync ops' ``comm`` argument."""
    _COMMS[id(comm)] = comm
    return id(comm)


def _sd(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np_sd(a):
    return np.dtype(np.float64) if a.dtype == np.float64 else np.dtype(np.float32)


def _bn_forward_fn(x):
    return _bn.batchnorm_forward if x.ndim == 2 else _bn.spatial_batchnorm_forward


def _bn_forward(x, weight, bias, running_mean, running_var, training, eps, comm=None):
    """gpulayers batch norm of x; returns (out, stats block, count). In train mode the
    batch mean and unbiased variance come out of gpulayers' own running-stat update, run
    with momentum 1 on fresh (zeros, ones): exactly the mean, the unbiased variance."""
    cl = is_cl(x)
    C = x.shape[1]
    xa = to_array(x)
    xp = get_array_module(xa)
    sd = _np_sd(xa)
    gamma = xp.ones(C, sd) if weight is None else to_array(weight)
    beta = xp.zeros(C, sd) if bias is None else to_array(bias)
    p = {"mode": "train" if training else "test", "eps": float(eps), "convention": "torch"}
    if training:
        p.update(momentum=1.0, running_mean=xp.zeros(C, sd), running_var=xp.ones(C, sd))
        if comm is not None:
            p["comm"] = comm
    else:
        p.update(running_mean=to_array(running_mean), running_var=to_array(running_var))
    out, cache = _bn_forward_fn(xa)(xa, gamma, beta, p)
    if cache.invstd is not None:
        invstd = cache.invstd
    else:   # the CUDA train path keeps its (6, C) block: rows mean, var, invstd, mean_lo, ...
        invstd = cache.stats[2]
    if training:
        mean = p["running_mean"].astype(sd, copy=False)
        var = p["running_var"].astype(sd, copy=False)
    else:
        mean = xp.asarray(p["running_mean"], dtype=sd)
        var = xp.zeros(C, sd)
    lo = cache.stats[3] if cache.stats is not None else xp.zeros(C, sd)
    stats = xp.stack([mean, invstd.astype(sd, copy=False), lo, var])
    return to_tensor(out, cl, (x,)), to_tensor(stats), cache.count


def _batch_norm(x, weight, bias, running_mean, running_var, training, eps):
    with array_scope(x):
        out, stats, _ = _bn_forward(x, weight, bias, running_mean, running_var, training, eps)
        return out, stats


def _bn_fake(x, weight, bias, running_mean, running_var, training, eps):
    return (empty_like_layout(x.shape, x.dtype, x.device, is_cl(x)),
            torch.empty((4, x.shape[1]), dtype=_sd(x.dtype), device=x.device))


_define("batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor)",
        _batch_norm, _bn_fake)


class _LocalShare:
    """A communicator wrapper that keeps what this rank sent: batch norm's backward sends
    its local [dbeta, dgamma] (C each) in one allreduce_sum, and PyTorch's SyncBatchNorm
    leaves those local shares in weight.grad / bias.grad."""

    def __init__(self, comm):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.sent = []

    def allreduce_sum(self, buf):
        self.sent.append(buf)
        return self.comm.allreduce_sum(buf)


def _bn_cache(xa, w, stats, training, count, comm):
    """The BatchNormCache gpulayers' forward made for x (the path its dispatch picks for
    x's backend, dtype, rank and layout), rebuilt from x, weight and the stats block."""
    xp = get_array_module(xa)
    sd = _np_sd(xa)
    C = xa.shape[1]
    spatial = xa.ndim > 2
    op = "spatial_batchnorm_forward" if spatial else "batchnorm_forward"
    cl = spatial and channels_last_strided(xa)
    layout = "channels_last_strided" if cl else "channels_first"
    gamma = xp.ones(C, sd) if w is None else w.astype(sd, copy=False)
    wdt = sd if w is None else np.dtype(w.dtype)
    mean, invstd, lo = stats[_MEAN], stats[_INVSTD], stats[_MEAN_LO]
    ref = xp.moveaxis(xa, 1, -1).reshape(-1, C) if cl else xa   # the forward's view
    axes = (0,) + tuple(range(2, ref.ndim))
    common = dict(op=op, axes=axes, train=training, dtype=np.dtype(xa.dtype), gamma=gamma,
                  invstd=invstd, count=int(count), gamma_dtype=wdt, beta_dtype=wdt,
                  shape=tuple(xa.shape), layout=layout)
    bshape = (1, C) + (1,) * (ref.ndim - 2)
    if comm is None and xp is np and ref.ndim == 2:
        return _bn.BatchNormCache(path="numpy_rows", x=np.ascontiguousarray(ref), mean=mean,
                                  **common)
    if comm is None and xp is np and xa.dtype.kind == "f":
        return _bn.BatchNormCache(path="numpy_fast", x=np.ascontiguousarray(ref), mean=mean,
                                  **common)
    if (comm is None and xp is not np and kernels_enabled()
            and _bn.kernel_fallback_reason(ref.shape) is None):
        block = xp.stack([mean, mean, invstd, lo]) if training else None
        return _bn.BatchNormCache(path="cuda", x=ref, mean=mean, stats=block, **common)
    xhat = (ref.astype(sd) - mean.reshape(bshape)) * invstd.reshape(bshape)
    return _bn.BatchNormCache(path="xp", xhat=xhat, comm=comm if training else None, **common)


def _bn_backward(grad, x, weight, stats, training, count=None, comm=None):
    xa = to_array(x)
    g = to_array(grad)
    w = to_array(weight)
    C = xa.shape[1]
    cache = _bn_cache(xa, w, to_array(stats), training,
                      xa.size // max(C, 1) if count is None else count, comm)
    backward = _bn.spatial_batchnorm_backward if xa.ndim > 2 else _bn.batchnorm_backward
    dx, dgamma, dbeta = backward(g, cache)
    if comm is not None:   # this rank's shares, as PyTorch's SyncBatchNorm leaves them
        sent = [b for b in cache.comm.sent if b.size == 2 * C][-1]
        dbeta = sent[:C].astype(dbeta.dtype)
        dgamma = sent[C:].astype(dgamma.dtype)
    cl = is_cl(x)
    return (to_tensor(dx, cl, (grad, x)), to_tensor(dgamma, False, (weight,)),
            to_tensor(dbeta, False, (weight,)))


def _batch_norm_backward(grad, x, weight, stats, training):
    with array_scope(x):
        return _bn_backward(grad, x, weight, stats, training)


def _bn_backward_fake(grad, x, weight, stats, training):
    wdt = _sd(x.dtype) if weight is None else weight.dtype
    C = x.shape[1]
    return (empty_like_layout(x.shape, x.dtype, x.device, is_cl(x)),
            torch.empty(C, dtype=wdt, device=x.device), torch.empty(C, dtype=wdt, device=x.device))


_define("batch_norm_backward(Tensor grad, Tensor x, Tensor? weight, Tensor stats, "
        "bool training) -> (Tensor, Tensor, Tensor)", _batch_norm_backward, _bn_backward_fake)


def _bn_setup(ctx, inputs, output):
    x, weight, bias, _, _, training, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.training = training
    ctx.affine = (weight is not None, bias is not None)


def _bn_grad(ctx, grad, _grad_stats):
    x, weight, stats = ctx.saved_tensors
    dx, dw, db = torch.ops.gpulayers.batch_norm_backward.default(grad, x, weight, stats,
                                                                 ctx.training)
    return (dx, dw if ctx.affine[0] else None, db if ctx.affine[1] else None,
            None, None, None, None)


torch.library.register_autograd("gpulayers::batch_norm", _bn_grad, setup_context=_bn_setup,
                                lib=lib)


def _update_running_stats(running_mean, running_var, stats, momentum):
    """running = (1 - momentum) * running + momentum * batch (unbiased var), in place, in
    the statistics dtype, as PyTorch updates them."""
    with array_scope(stats):
        st = to_array(stats)
        m = float(momentum)
        for t, row in ((running_mean, _MEAN), (running_var, _VAR)):
            if t is None:
                continue
            r = to_array(t)
            r[...] = ((1 - m) * r.astype(st.dtype) + m * st[row]).astype(r.dtype, copy=False)


def _update_running_stats_fake(running_mean, running_var, stats, momentum):
    return None


_define("update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor stats, "
        "float momentum) -> ()", _update_running_stats, _update_running_stats_fake)


# ---------------------------------------------------------- synchronized batch norm

def _sync_batch_norm(x, weight, bias, eps, comm):
    with array_scope(x):
        out, stats, count = _bn_forward(x, weight, bias, None, None, True, eps,
                                        comm=_COMMS[comm])
        return out, stats, torch.tensor(count, dtype=torch.int64)


def _sync_bn_fake(x, weight, bias, eps, comm):
    return (empty_like_layout(x.shape, x.dtype, x.device, is_cl(x)),
            torch.empty((4, x.shape[1]), dtype=_sd(x.dtype), device=x.device),
            torch.empty((), dtype=torch.int64))


_define("sync_batch_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, int comm) "
        "-> (Tensor, Tensor, Tensor)", _sync_batch_norm, _sync_bn_fake)


def _sync_batch_norm_backward(grad, x, weight, stats, count, comm):
    with array_scope(x):
        return _bn_backward(grad, x, weight, stats, True, int(count),
                            _LocalShare(_COMMS[comm]))


def _sync_bn_backward_fake(grad, x, weight, stats, count, comm):
    return _bn_backward_fake(grad, x, weight, stats, True)


_define("sync_batch_norm_backward(Tensor grad, Tensor x, Tensor? weight, Tensor stats, "
        "Tensor count, int comm) -> (Tensor, Tensor, Tensor)", _sync_batch_norm_backward,
        _sync_bn_backward_fake)


def _sync_bn_setup(ctx, inputs, output):
    x, weight, bias, _, comm = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.comm = comm
    ctx.affine = (weight is not None, bias is not None)


def _sync_bn_grad(ctx, grad, _gs, _gc):
    x, weight, stats, count = ctx.saved_tensors
    dx, dw, db = torch.ops.gpulayers.sync_batch_norm_backward.default(grad, x, weight, stats,
                                                                      count, ctx.comm)
    return dx, dw if ctx.affine[0] else None, db if ctx.affine[1] else None, None, None


torch.library.register_autograd("gpulayers::sync_batch_norm", _sync_bn_grad,
                                setup_context=_sync_bn_setup, lib=lib)
