"""Tensors to NumPy / CuPy arrays and back, without copies and without host syncs.

- CPU tensors become NumPy arrays by ``Tensor.numpy()`` (the same memory, the tensor's
  strides; bfloat16 through an int16 view and ``ml_dtypes.bfloat16``), and NumPy results
  come back by ``torch.from_numpy`` (the same memory again).
- CUDA tensors become CuPy arrays by ``cupy.from_dlpack`` and CuPy results come back by
  ``torch.from_dlpack``: zero-copy both ways. Inside :func:`array_scope` the work runs on
  the tensor's device and on torch's current stream (``cupy.cuda.ExternalStream``), and
  every CuPy allocation -- outputs and temporaries -- comes from torch's caching
  allocator on that stream (``cupy.cuda.using_allocator``), so outputs are memory that
  torch allocated, freed and reused by torch's rules; nothing synchronises with the host.

Results are checked to have the strides the fake (meta) implementations promise -- the
layout rule of :func:`gpulayers.shapes.channels_last_strided` -- and that they do not
alias an input (custom ops must not); a result failing either check is copied, which
:data:`COPIES` counts (the tests require it to stay 0).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..shapes import channels_last_strided

__all__ = ["to_array", "to_tensor", "array_scope", "is_cl", "empty_like_layout",
           "layout_strides", "COPIES"]

COPIES = {"strides": 0, "alias": 0, "readonly": 0}


# --------------------------------------------------------------------------- layouts

class _Strided:
    """What channels_last_strided reads of an array (ndim, shape, strides in bytes,
    c-contiguity), from a tensor -- real or fake -- without touching its data."""

    __slots__ = ("ndim", "shape", "strides", "flags", "dtype")

    def __init__(self, t):
        self.ndim = t.dim()
        self.shape = tuple(t.shape)
        item = t.element_size()
        self.strides = tuple(s * item for s in t.stride())
        self.flags = _Flags(t.is_contiguous())
        self.dtype = _Item(item)


class _Flags:
    __slots__ = ("c_contiguous",)

    def __init__(self, c):
        self.c_contiguous = c


class _Item:
    __slots__ = ("itemsize",)

    def __init__(self, n):
        self.itemsize = n


def is_cl(t):
    """True when gpulayers processes ``t`` (N, C, *spatial) in its channels-last memory
    layout (PyTorch's channels_last / channels_last_3d, and the same for 1-D): the rule of
    gpulayers.shapes.channels_last_strided, so real and fake tensors agree on it."""
    return channels_last_strided(_Strided(t))


def layout_strides(shape, cl):
    """Element strides of a new array of ``shape``: C-contiguous, or when ``cl`` the
    moveaxis(1, -1) view of a C-contiguous (N, *spatial, C) array -- what gpulayers'
    NumPy and CuPy results have."""
    shape = tuple(int(s) for s in shape)
    order = (0,) + tuple(range(2, len(shape))) + (1,) if cl else tuple(range(len(shape)))
    strides = [0] * len(shape)
    step = 1
    for axis in reversed(order):
        strides[axis] = step
        step *= max(shape[axis], 1)
    return tuple(strides)


def empty_like_layout(shape, dtype, device, cl):
    """An empty tensor with the strides gpulayers gives its results (for fake impls)."""
    return torch.empty_strided(tuple(shape), layout_strides(shape, cl), dtype=dtype,
                               device=device)


def _strides_ok(t, cl):
    if not cl:
        return t.is_contiguous()
    want = layout_strides(t.shape, cl)
    return all(n <= 1 or s == w for n, s, w in zip(t.shape, t.stride(), want))


# ---------------------------------------------------------------------------- CuPy

_cupy = None


def _cp():
    global _cupy
    if _cupy is None:
        import cupy
        _cupy = cupy
    return _cupy


class _TorchBlock:
    """Owner of one block of torch's caching allocator, handed to CuPy as UnownedMemory:
    freed (back to torch's cache, on the stream it was allocated on) when CuPy drops it."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr

    def __del__(self):
        torch.cuda.caching_allocator_delete(self.ptr)


def _torch_malloc(size):
    """CuPy allocator hook: ``size`` bytes from torch's caching allocator on the current
    device and torch's current stream of it."""
    cp = _cp()
    device = cp.cuda.runtime.getDevice()
    if size == 0:
        return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(0, 0, None, device), 0)
    stream = torch.cuda.current_stream(device)
    ptr = torch.cuda.caching_allocator_alloc(size, device, stream)
    return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), device), 0)


_STREAMS = {}


def _external_stream(device):
    """A CuPy ExternalStream for torch's current stream of ``device`` (kept per pointer)."""
    ptr = torch.cuda.current_stream(device).cuda_stream
    stream = _STREAMS.get((device, ptr))
    if stream is None:
        stream = _cp().cuda.ExternalStream(ptr, device)
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        _STREAMS[(device, ptr)] = stream
    return stream


def array_scope(t):
    """Context for gpulayers work on tensor ``t``: nothing on the CPU; for a CUDA tensor its
    device, torch's current stream of that device as CuPy's current stream, and torch's
    caching allocator as CuPy's allocator."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    cp = _cp()
    device = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stack = contextlib.ExitStack()
    stack.enter_context(cp.cuda.Device(device))
    stack.enter_context(_external_stream(device))
    stack.enter_context(cp.cuda.using_allocator(_torch_malloc))
    return stack


# ------------------------------------------------------------------------ conversion

def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def to_array(t):
    """The NumPy (CPU) or CuPy (CUDA) array of tensor ``t``'s memory: no copy, t's strides."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cuda":
        return _cp().from_dlpack(t)
    if t.device.type != "cpu":
        raise TypeError(f"gpulayers.torch runs on CPU and CUDA tensors, got one on {t.device}")
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bf16())
    return t.numpy()


def _writeable(a):
    """Make a frozen NumPy result (gpulayers freezes what it caches) writeable again, so
    torch.from_numpy shares it; False when NumPy refuses."""
    chain = []
    b = a
    while isinstance(b, np.ndarray):
        chain.append(b)
        b = b.base
    try:
        for arr in reversed(chain):
            if not arr.flags.writeable:
                arr.flags.writeable = True
    except ValueError:
        return False
    return True


def _ranges(t):
    """(start, end) byte range of a tensor's elements."""
    if t.numel() == 0:
        return None
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    start = t.data_ptr()
    return start, start + span * t.element_size()


def _overlaps(t, inputs):
    r = _ranges(t)
    if r is None:
        return False
    for i in inputs:
        if i is None or i.device != t.device:
            continue
        q = _ranges(i)
        if q is not None and r[0] < q[1] and q[0] < r[1]:
            return True
    return False


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def to_tensor(a, cl=False, inputs=()):
    """Tensor of gpulayers result ``a`` (NumPy or CuPy), zero-copy; with the strides of
    :func:`layout_strides` (``cl``) and aliasing none of ``inputs`` -- copied otherwise
    (counted in COPIES). A NumPy result whose memory NumPy allocated (its root array owns
    its data) cannot alias a tensor, so only other results are range-checked."""
    fresh = False
    if isinstance(a, np.ndarray):
        if not a.flags.writeable and not _writeable(a):
            COPIES["readonly"] += 1
            a = a.copy()
        fresh = _root(a).flags.owndata
        if a.dtype.kind == "V" and a.dtype == _bf16():
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
    else:
        t = torch.from_dlpack(a)
    if not _strides_ok(t, cl):
        COPIES["strides"] += 1
        t = empty_like_layout(t.shape, t.dtype, t.device, cl).copy_(t)
    elif inputs and not fresh and _overlaps(t, inputs):
        COPIES["alias"] += 1
        t = empty_like_layout(t.shape, t.dtype, t.device, cl).copy_(t)
    return t
