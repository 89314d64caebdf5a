"""gpulayers as PyTorch operators: ``torch.nn.functional``'s names, signatures and semantics.

    import gpulayers.torch as GF          # instead of: import torch.nn.functional as F
    y = GF.max_pool2d(x, 3, stride=2, padding=1)
    y = GF.batch_norm(x, running_mean, running_var, weight, bias, training=True)

    from gpulayers.torch import nn as gnn  # instead of: from torch import nn
    model = torch.nn.Sequential(conv, gnn.BatchNorm2d(64), torch.nn.ReLU(), gnn.MaxPool2d(2))

Every function here dispatches ``torch.ops.gpulayers.*`` custom operators (registered in
``gpulayers.torch._ops`` with fake kernels and autograd formulas), so they work under
autograd, ``torch.compile(fullgraph=True)`` (the graph shows the gpulayers ops),
``torch.library.opcheck`` and ``torch.use_deterministic_algorithms(True)`` -- every
backward is deterministic, on the CPU and on CUDA. CPU tensors run on NumPy, CUDA tensors
on CuPy and gpulayers' CUDA kernels, on the tensor's device and torch's current stream;
tensors cross by DLPack / ``Tensor.numpy()`` without copies (``gpulayers.torch._bridge``).

Results equal ``torch.nn.functional``'s for every input it accepts: values and indices
bit for bit for pooling (ties: the first maximum; a window with NaN: its last NaN), to
rounding for averages and batch norm; gradients likewise; batch norm updates
``running_mean`` / ``running_var`` in place. Inputs may be unbatched (no N axis), and a
tensor in the channels_last / channels_last_3d memory format gives results and gradients
in that format. Max pooling keeps 1-byte argmax offsets for its backward (int64 indices
only with ``return_indices=True``).

``import gpulayers`` never imports torch; this module needs it.
"""
from __future__ import annotations

try:
    import torch
except ImportError as _exc:   # includes sys.modules['torch'] = None
    raise ImportError(
        "gpulayers.torch needs PyTorch, which is not installed (or failed to import: "
        f"{_exc}). Install it with `pip install torch` (see https://pytorch.org for CUDA "
        "builds); the rest of gpulayers works without it.") from _exc

import numbers

from . import _ops

__all__ = [
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_unpool1d", "max_unpool2d", "max_unpool3d", "batch_norm", "sync_batch_norm", "nn",
]

_OPS = torch.ops.gpulayers


# --------------------------------------------------------------------------- arguments

def _ints(value, d, name, fn):
    """A d-list of ints from an int or a sequence of 1 or d ints, as torch takes them."""
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int or a tuple of {d} ints, got {value!r}")
    if isinstance(value, numbers.Integral) or isinstance(value, torch.SymInt):
        return [int(value)] * d
    try:
        items = [v for v in value]
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int or a tuple of {d} ints, got "
                        f"{value!r}") from None
    if len(items) == 1:
        items = items * d
    if len(items) != d or any(isinstance(v, bool) or not isinstance(v, (numbers.Integral,
                                                                         torch.SymInt))
                              for v in items):
        raise ValueError(f"{fn}: {name} must be an int or a tuple of {d} ints, got {value!r}")
    return [int(v) for v in items]


def _batched(input, d, fn):
    """(input with an N axis, whether one was added): (C, *spatial) gets N = 1 (a view)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() == d + 2:
        return input, False
    if input.dim() == d + 1:
        return input.unsqueeze(0), True
    raise ValueError(f"{fn}: expected a {d + 1}-D (unbatched) or {d + 2}-D (batched) input, "
                     f"got shape {tuple(input.shape)}")


def _pool_args(d, fn, kernel_size, stride, padding, dilation=1):
    k = _ints(kernel_size, d, "kernel_size", fn)
    s = k if stride is None or (not isinstance(stride, numbers.Integral) and len(stride) == 0) \
        else _ints(stride, d, "stride", fn)
    return k, s, _ints(padding, d, "padding", fn), _ints(dilation, d, "dilation", fn)


def _unbatch(squeeze, *tensors):
    out = tuple(t.squeeze(0) if squeeze else t for t in tensors)
    return out if len(out) > 1 else out[0]


def _channels_last_format(x):
    """torch.channels_last(_3d) when torch itself takes batched x as channels_last (its
    suggest_memory_format, which also decides the ambiguous strides of size-1 axes), else
    None."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is None:
        return None
    try:
        from torch._prims_common import suggest_memory_format
        wants = suggest_memory_format(x) == fmt
    except (ImportError, AttributeError):
        wants = x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
    return fmt if wants else None


def _finish(x, squeeze, *tensors):
    """The outputs of an op on batched input x: in x's channels_last memory format where
    torch takes x as channels_last (a no-op for the outputs gpulayers already gives that
    layout; a copy only for ambiguous strides, e.g. 1x1 planes), then unbatched."""
    fmt = _channels_last_format(x)
    if fmt is not None:
        tensors = tuple(t if t.is_contiguous(memory_format=fmt)
                        else t.contiguous(memory_format=fmt) for t in tensors)
    return _unbatch(squeeze, *tensors)


# ------------------------------------------------------------------------ max pooling

def _max_pool(d, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    fn = f"max_pool{d}d"
    x, squeeze = _batched(input, d, fn)
    k, s, p, dl = _pool_args(d, fn, kernel_size, stride, padding, dilation)
    out, offsets = _OPS.max_pool.default(x, k, s, p, dl, bool(ceil_mode))
    if not return_indices:
        return _finish(x, squeeze, out)
    from ._bridge import is_cl
    idx = _OPS.max_pool_indices.default(offsets, list(x.shape), k, s, p, dl, bool(ceil_mode),
                                        is_cl(x))
    return _finish(x, squeeze, out, idx)


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool1d: input (N, C, L) or (C, L)."""
    return _max_pool(1, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool2d: input (N, C, H, W) or (C, H, W)."""
    return _max_pool(2, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool3d: input (N, C, D, H, W) or (C, D, H, W)."""
    return _max_pool(3, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


# ------------------------------------------------------------------------ avg pooling

def _avg_pool(d, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override):
    fn = f"avg_pool{d}d"
    x, squeeze = _batched(input, d, fn)
    k, s, p, _ = _pool_args(d, fn, kernel_size, stride, padding)
    if divisor_override is not None:
        if isinstance(divisor_override, bool) or not isinstance(divisor_override,
                                                                numbers.Integral):
            raise TypeError(f"{fn}: divisor_override must be an int or None, got "
                            f"{divisor_override!r}")
        divisor_override = int(divisor_override)
        if divisor_override == 0:
            raise ValueError(f"{fn}: divisor must be not zero")
    out = _OPS.avg_pool.default(x, k, s, p, bool(ceil_mode), bool(count_include_pad),
                                divisor_override)
    return _finish(x, squeeze, out)


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True):
    """torch.nn.functional.avg_pool1d (no divisor_override, as in torch)."""
    return _avg_pool(1, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     None)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """torch.nn.functional.avg_pool2d: input (N, C, H, W) or (C, H, W)."""
    return _avg_pool(2, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def avg_pool3d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """torch.nn.functional.avg_pool3d: input (N, C, D, H, W) or (C, D, H, W)."""
    return _avg_pool(3, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


# ------------------------------------------------------------------- adaptive pooling

def _output_size(d, x, output_size, fn):
    """A d-list of ints; None entries keep the input's size, as in torch."""
    if output_size is None or isinstance(output_size, numbers.Integral):
        items = [output_size] * d
    else:
        items = list(output_size)
        if len(items) == 1:
            items = items * d
    if len(items) != d:
        raise ValueError(f"{fn}: output_size must be an int or a tuple of {d} ints or None, "
                         f"got {output_size!r}")
    return [int(x.shape[2 + a]) if v is None else int(v) for a, v in enumerate(items)]


def _adaptive(d, kind, input, output_size, return_indices=False):
    fn = f"adaptive_{kind}_pool{d}d"
    x, squeeze = _batched(input, d, fn)
    size = _output_size(d, x, output_size, fn)
    if kind == "avg":
        return _finish(x, squeeze, _OPS.adaptive_avg_pool.default(x, size))
    out, offsets = _OPS.adaptive_max_pool.default(x, size)
    if not return_indices:
        return _finish(x, squeeze, out)
    from ._bridge import is_cl
    idx = _OPS.adaptive_max_pool_indices.default(offsets, list(x.shape), is_cl(x))
    return _finish(x, squeeze, out, idx)


def adaptive_avg_pool1d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool1d."""
    return _adaptive(1, "avg", input, output_size)


def adaptive_avg_pool2d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool2d (None in output_size keeps that size)."""
    return _adaptive(2, "avg", input, output_size)


def adaptive_avg_pool3d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool3d."""
    return _adaptive(3, "avg", input, output_size)


def adaptive_max_pool1d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool1d."""
    return _adaptive(1, "max", input, output_size, return_indices)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool2d."""
    return _adaptive(2, "max", input, output_size, return_indices)


def adaptive_max_pool3d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool3d."""
    return _adaptive(3, "max", input, output_size, return_indices)


# ---------------------------------------------------------------------- max unpooling

def _unpool_size(d, x, k, s, p, output_size, fn):
    """torch's _unpool_output_size: the default (in - 1)*stride - 2*padding + kernel, or
    output_size (d sizes, or d + 2 with N and C) within a stride of it."""
    default = [(int(x.shape[2 + a]) - 1) * s[a] + k[a] - 2 * p[a] for a in range(d)]
    if output_size is None:
        return default
    size = [int(v) for v in output_size]
    if len(size) == d + 2:
        size = size[2:]
    if len(size) != d:
        raise ValueError(f"{fn}: output_size should be a sequence containing {d} or {d + 2} "
                         f"elements, but it has a length of {len(size)}")
    for a in range(d):
        lo, hi = default[a] - s[a], default[a] + s[a]
        if not lo < size[a] < hi:
            raise ValueError(f"{fn}: invalid output_size {tuple(output_size)} (dim {a} must "
                             f"be between {lo} and {hi})")
    return size


def _max_unpool(d, input, indices, kernel_size, stride, padding, output_size):
    fn = f"max_unpool{d}d"
    x, squeeze = _batched(input, d, fn)
    idx = indices.unsqueeze(0) if squeeze else indices
    k, s, p, _ = _pool_args(d, fn, kernel_size, stride, padding)
    size = _unpool_size(d, x, k, s, p, output_size, fn)
    return _finish(x, squeeze, _OPS.max_unpool.default(x, idx, size))


def max_unpool1d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """torch.nn.functional.max_unpool1d; duplicate indices: the last input in row-major
    order wins the value, every duplicate gets its target's gradient (torch's gather)."""
    return _max_unpool(1, input, indices, kernel_size, stride, padding, output_size)


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """torch.nn.functional.max_unpool2d (see max_unpool1d for duplicate indices)."""
    return _max_unpool(2, input, indices, kernel_size, stride, padding, output_size)


def max_unpool3d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """torch.nn.functional.max_unpool3d (see max_unpool1d for duplicate indices)."""
    return _max_unpool(3, input, indices, kernel_size, stride, padding, output_size)


# ------------------------------------------------------------------------- batch norm

def _check_bn(input, training, fn):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2 or input.dim() > 5:
        raise ValueError(f"{fn}: expected a 2-D to 5-D input (N, C, *), got shape "
                         f"{tuple(input.shape)}")
    if training:
        per_channel = input.numel() // max(int(input.shape[1]), 1)
        if per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input size {input.size()}")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """torch.nn.functional.batch_norm over (N, C) or (N, C, *spatial) with 1-3 spatial
    axes. In training mode running_mean / running_var (when given) are updated in place:
    (1 - momentum) * running + momentum * batch statistic (unbiased variance)."""
    _check_bn(input, training, "batch_norm")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must be defined in "
                         "evaluation mode")
    out, stats = _OPS.batch_norm.default(input, weight, bias, running_mean, running_var,
                                         bool(training), float(eps))
    if training and (running_mean is not None or running_var is not None):
        _OPS.update_running_stats.default(running_mean, running_var, stats, float(momentum))
    return out


def sync_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps, comm):
    """Train-mode batch norm over the batch held by all ranks of ``comm`` (a gpulayers
    communicator: TorchDistComm, MPIComm, NCCLComm, LocalComm). Statistics and dx use the
    whole batch; weight.grad / bias.grad get this rank's share (DDP reduces them), as in
    torch.nn.SyncBatchNorm; running stats (when given) are updated in place with the
    global statistics on every rank."""
    _check_bn(input, False, "sync_batch_norm")
    out, stats, _ = _OPS.sync_batch_norm.default(input, weight, bias, float(eps),
                                                 _ops.comm_handle(comm))
    if running_mean is not None or running_var is not None:
        _OPS.update_running_stats.default(running_mean, running_var, stats, float(momentum))
    return out


from . import nn  # noqa: E402  (gpulayers.torch.nn as an attribute)
