"""Benchmark machinery shared by the scripts (bench.py, gpu_check.py, tune_pool.py,
tune_bn.py); it is not part of the installed package. The clocks and the round-robin
loop are gpulayers.timing's (re-exported here), the one home the main job uses too.

What is here, in the order a benchmark uses it:

- *clocks* (gpulayers.timing): :class:`CPUClock` (``perf_counter``) and
  :class:`CupyClock` (CUDA events on CuPy's current stream; CuPy and PyTorch both
  default to the legacy default stream, so it times PyTorch's CUDA peers too);
- :func:`round_robin`: warm-up, then every implementation once per round in a
  rotating order, so drift (turbo, thermal, other processes) hits all alike;
  :func:`median` of the samples is what gets reported;
- *the compulsory byte model* (:func:`compulsory_bytes`): each input read
  once, each output -- indices included -- written once;
- *copy bandwidth*: the ceiling the byte model is compared with, measured in
  the same run (:func:`copy_bandwidth`);
- :class:`Case` and :func:`build_case`: one op on one shape and dtype, with a
  callable per implementation (ours and PyTorch's) over the *same* data; pooling
  cases take x of any rank the op takes ((N, C, L), (N, C, H, W), (N, C, D, H, W))
  and the PyTorch peer is ``F.max_pool{1,2,3}d`` etc. by rank;
- :func:`nd_support` (which N-d pooling functions gpulayers has) and
  :func:`check_against` (our result against the peer's, with a tolerance per dtype);
- :func:`peak_memory`: tracemalloc peak and retained bytes of a NumPy call;
- the results-JSON format: :func:`results_document`, :func:`validate_results`,
  :func:`write_json`, :func:`git_commit`, :func:`package_commit`, :func:`slug`.

Neither CuPy nor PyTorch is imported at module import time.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

import gpulayers as gl
from gpulayers.backend import is_cupy_array
from gpulayers.shapes import adaptive_geometry, pool_geometry
from gpulayers.provenance import git_commit, package_commit, today
from gpulayers.timing import CPUClock, CupyClock, Timed, median, medians, round_robin

__all__ = [
    "CPUClock", "CupyClock", "Timed", "round_robin", "median", "medians",
    "compulsory_bytes", "copy_bandwidth",
    "Case", "build_case", "OPS", "peak_memory", "import_torch", "nd_support", "check_against",
    "CHECK_TOL",
    "results_document", "validate_results", "write_json", "git_commit", "package_commit",
    "slug", "today",
]

# ------------------------------------------------------------------ compulsory bytes


def _params_bytes(C, itemsize, count):
    return C * itemsize * count


def compulsory_bytes(op, x_shape, out_shape, itemsize, index_itemsize=0, param_itemsize=4):
    """Bytes an ideal implementation moves: each input read once, each output
    (indices included) written once.

    - max_pool_forward: read x; write out and one index per output element
      (``index_itemsize``: 1 for our uint8 offsets, 8 for PyTorch's int64);
    - max_pool_backward: read dout and the indices; write dx;
    - avg_pool_forward / avg_pool_backward, and likewise sum pooling and adaptive
      average pooling: read x (dout), write out (dx);
    - adaptive_max_pool_forward / _backward: as max pooling;
    - spatial_batchnorm_forward (train): read x, gamma, beta, running mean and
      var; write out and the running mean and var;
    - spatial_batchnorm_backward: read dout, x, gamma and the saved mean and
      inverse std; write dx, dgamma, dbeta;
    - spatial_batchnorm_eval_forward: read x, gamma, beta, running mean and var; write out.

    Shapes are (N, C, *spatial) of any rank. Per-channel vectors use
    ``param_itemsize``. A real train forward reads x twice (statistics, then
    normalize) unless x fits in cache, so its bandwidth fraction under this
    model tops out near 2/3.
    """
    n_in = int(np.prod(x_shape))
    n_out = int(np.prod(out_shape))
    C = int(x_shape[1])
    if op in ("max_pool_forward", "adaptive_max_pool_forward"):
        return n_in * itemsize + n_out * (itemsize + index_itemsize)
    if op in ("max_pool_backward", "adaptive_max_pool_backward"):
        return n_out * (itemsize + index_itemsize) + n_in * itemsize
    if op in ("avg_pool_forward", "avg_pool_backward", "sum_pool_forward", "sum_pool_backward",
              "adaptive_avg_pool_forward", "adaptive_avg_pool_backward"):
        return (n_in + n_out) * itemsize
    if op == "spatial_batchnorm_forward":
        return 2 * n_in * itemsize + _params_bytes(C, param_itemsize, 6)
    if op == "spatial_batchnorm_backward":
        return 3 * n_in * itemsize + _params_bytes(C, param_itemsize, 5)
    if op == "spatial_batchnorm_eval_forward":
        return 2 * n_in * itemsize + _params_bytes(C, param_itemsize, 4)
    raise ValueError(f"no byte model for op {op!r}")


# ------------------------------------------------------------------- copy bandwidth


def copy_bandwidth(xp, nbytes, reps=15):
    """The copy bandwidth of ``xp`` (numpy or cupy): GB/s, counting the bytes read and
    the bytes written, of copies between two fresh float32 buffers of ``nbytes``;
    median of ``reps`` after warm-up, timed by :func:`round_robin`.

    NumPy: ``np.copyto``. CuPy: the better of ``cudaMemcpyAsync`` device-to-device and
    an element-wise copy kernel (``cupy.copyto``), CUDA events (:class:`CupyClock`).

    Returns a tuple of:
    - gbps: float
    - detail: {method: GB/s}
    """
    n = max(1, nbytes // 4)
    if xp is np:
        src = np.random.default_rng().standard_normal(n, dtype=np.float32)
        dst = np.empty_like(src)
        entries = [Timed("np.copyto", lambda: np.copyto(dst, src), CPUClock())]
    else:
        src = xp.random.default_rng().standard_normal(n, dtype=xp.float32)
        dst = xp.empty_like(src)
        clock = CupyClock()
        entries = [Timed("memcpy", lambda: dst.data.copy_from_device_async(src.data, src.nbytes),
                         clock),
                   Timed("copyto", lambda: xp.copyto(dst, src), clock)]
    round_robin(entries, reps, warmup=3)
    detail = {e.name: 2 * src.nbytes / (median(e.samples) * 1e-3) / 1e9
              for e in entries if e.error is None}
    del src, dst
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()
    return max(detail.values()), detail


# ------------------------------------------------------------------------- PyTorch


def import_torch(threads=None):
    """PyTorch, or None when it does not import; sets its CPU threads to
    ``threads`` (default: every core)."""
    try:
        import torch
    except Exception:
        return None
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch


def _to_torch(torch, a):
    """A tensor sharing ``a``'s memory (NumPy: from_numpy; CuPy: DLPack)."""
    if is_cupy_array(a):
        return torch.from_dlpack(a)
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------- cases

#: op name -> which family it belongs to and whether it is a backward pass
OPS = {
    "max_pool_forward": ("max", False),
    "max_pool_backward": ("max", True),
    "avg_pool_forward": ("avg", False),
    "avg_pool_backward": ("avg", True),
    "spatial_batchnorm_forward": ("bn", False),
    "spatial_batchnorm_backward": ("bn", True),
    "spatial_batchnorm_eval_forward": ("bn_eval", False),
    "sum_pool_forward": ("sum", False),
    "sum_pool_backward": ("sum", True),
    "adaptive_avg_pool_forward": ("adaptive_avg", False),
    "adaptive_avg_pool_backward": ("adaptive_avg", True),
    "adaptive_max_pool_forward": ("adaptive_max", False),
    "adaptive_max_pool_backward": ("adaptive_max", True),
}

#: families whose params are a pool_param dict (kernel, stride, pad, ...), for x of
#: shape (N, C, L), (N, C, H, W) or (N, C, D, H, W)
POOL_FAMILIES = ("max", "avg", "sum")
#: families whose params are {'output_size': int or d-tuple}, same ranks
ADAPTIVE_FAMILIES = ("adaptive_avg", "adaptive_max")
#: families that keep an argmax per output element (an index in PyTorch's peer)
_ARGMAX_FAMILIES = ("max", "adaptive_max")

# implementation name -> (forward function name, backward function name) in gpulayers
# (looked up in gpulayers, then in gpulayers.pooling: new pooling functions may be
# exported there first). "fast" is the public entry point (max_pool_forward, ...): CUDA
# kernels on CuPy.
_IMPLS = {
    "max": {"fast": ("max_pool_forward", "max_pool_backward"),
            "general": ("max_pool_forward_general", "max_pool_backward_general"),
            "reshape": ("max_pool_forward_reshape", "max_pool_backward_reshape"),
            "naive": ("max_pool_forward_naive", "max_pool_backward_naive")},
    "avg": {"fast": ("avg_pool_forward", "avg_pool_backward")},
    "sum": {"fast": ("sum_pool_forward", "sum_pool_backward")},
    "adaptive_avg": {"fast": ("adaptive_avg_pool_forward", "adaptive_avg_pool_backward")},
    "adaptive_max": {"fast": ("adaptive_max_pool_forward", "adaptive_max_pool_backward")},
    "bn": {"fast": ("spatial_batchnorm_forward", "spatial_batchnorm_backward"),
           "general": ("spatial_batchnorm_forward_general", "spatial_batchnorm_backward_general"),
           "naive": ("spatial_batchnorm_forward_naive", "spatial_batchnorm_backward_naive")},
}


def _bn_forward_transpose(x, gamma, beta, bn_param):
    """The CS231n assignment's spatial BN: move C last, run (N*H*W, C) batch
    norm, move C back (a contiguous copy each way)."""
    N, C, H, W = x.shape
    flat = x.transpose(0, 2, 3, 1).reshape(-1, C)
    out, cache = gl.batchnorm_forward(flat, gamma, beta, bn_param)
    xp = gl.get_array_module(x)
    return xp.ascontiguousarray(out.reshape(N, H, W, C).transpose(0, 3, 1, 2)), (cache, x.shape)


def _bn_backward_transpose(dout, cache):
    inner, (N, C, H, W) = cache
    dx, dgamma, dbeta = gl.batchnorm_backward(dout.transpose(0, 2, 3, 1).reshape(-1, C), inner)
    xp = gl.get_array_module(dout)
    return xp.ascontiguousarray(dx.reshape(N, H, W, C).transpose(0, 3, 1, 2)), dgamma, dbeta


_IMPLS["bn"]["cs231n-transpose"] = (_bn_forward_transpose, _bn_backward_transpose)
_IMPLS["bn_eval"] = _IMPLS["bn"]


def _lookup(fn):
    """A gpulayers function by name (gpulayers first, then gpulayers.pooling; None when
    absent), or the function itself."""
    if fn is None or callable(fn):
        return fn
    found = getattr(gl, fn, None)
    if found is None:
        from gpulayers import pooling
        found = getattr(pooling, fn, None)
    return found


def impl_label(name, xp):
    """How an implementation is shown: 'fast' on CuPy is the CUDA kernels."""
    if name == "fast" and xp is not np:
        return "cuda-kernels"
    if name == "general" and xp is not np:
        return "general(cupy)"
    return name


def _dims(v, d=None):
    """'3x3x3' from 3 (with d = 3) or (3, 3, 3); '3' from 3 without d."""
    if isinstance(v, (int, np.integer)):
        return "x".join([str(int(v))] * d) if d else str(int(v))
    return "x".join(str(int(t)) for t in v)


def pool_params_str(p, d=None):
    """A pool_param dict in one short string: 'k=3x3 s=2 p=1' (CS231n names),
    'k=3x3x3 s=2 p=1' ('kernel_size' with ``d`` = 3 spatial axes), then d=, ceil,
    exclude_pad and div= when they differ from the defaults."""
    if "kernel_size" in p:
        k = p["kernel_size"]
        parts = [f"k={_dims(k, d)}", f"s={p.get('stride', k)}", f"p={p.get('pad', 0)}"]
    else:
        kh, kw = p["pool_height"], p["pool_width"]
        s = p.get("stride", (kh, kw))
        parts = [f"k={kh}x{kw}", f"s={s}", f"p={p.get('pad', 0)}"]
    dil = p.get("dilation", 1)
    if not (dil == 1 or (not isinstance(dil, int) and all(v == 1 for v in dil))):
        parts.append(f"d={p['dilation']}")
    if p.get("ceil_mode"):
        parts.append("ceil")
    if "count_include_pad" in p and not p["count_include_pad"]:
        parts.append("exclude_pad")
    if p.get("divisor_override") is not None:
        parts.append(f"div={p['divisor_override']}")
    return " ".join(parts)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass
class Case:
    """One op on one shape and dtype.

    ``params`` is the pool_param dict (max/avg/sum pooling, x of shape (N, C, L),
    (N, C, H, W) or (N, C, D, H, W)), ``{'output_size': ...}`` (adaptive pooling,
    same ranks) or the bn_param dict (BN ops; 'mode' is set by the op). After
    :func:`build_case`: ``entries`` (one :class:`Timed` per implementation, ours
    first, PyTorch's last), ``bytes`` (implementation name -> compulsory bytes),
    ``notes`` (implementations skipped and why), ``outputs`` (name -> first output,
    for the agreement check) and ``forward_fns`` (name -> zero-argument callable
    running that implementation's forward, for :func:`peak_memory`); ``check``
    (set by the caller from :func:`check_against`).
    """

    op: str
    shape: tuple
    dtype: str = "float32"
    params: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)
    bytes: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    forward_fns: dict = field(default_factory=dict)
    backward_fns: dict = field(default_factory=dict)
    x_nbytes: int = 0
    #: (error, ok) of :func:`check_against`, once a caller has made it
    check: tuple = (None, None)

    @property
    def family(self):
        return OPS[self.op][0]

    @property
    def backward(self):
        return OPS[self.op][1]

    @property
    def rank(self):
        """Number of spatial axes of x (2 for (N, C, H, W))."""
        return len(self.shape) - 2

    @property
    def is_pool(self):
        """A pooling op (windowed or adaptive), not batch norm."""
        return self.family in POOL_FAMILIES + ADAPTIVE_FAMILIES

    def params_str(self):
        if self.family in POOL_FAMILIES:
            return pool_params_str(self.params, self.rank)
        if self.family in ADAPTIVE_FAMILIES:
            out = self.params["output_size"]
            return f"out={_dims(out, self.rank) if isinstance(out, int) else tuple(out)}"
        mode = "eval" if self.family == "bn_eval" else "train"
        p = self.params
        return (f"{mode} eps={p.get('eps', 1e-5):g} momentum={p.get('momentum', 0.9):g} "
                f"convention={p.get('convention', 'cs231n')}")


def _random(xp, shape, dtype, rng):
    """Fresh standard-normal data of ``dtype`` made on the array's own device."""
    if xp is np:
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    g = xp.random.default_rng(int(rng.integers(2**31)))
    return g.standard_normal(shape, dtype=xp.float32).astype(dtype, copy=False)


def case_geometry(case):
    """The shapes.PoolGeometry (max/avg/sum) or AdaptiveGeometry (adaptive ops) of a
    pooling case; ValueError from shapes when the case is not valid."""
    if case.family in POOL_FAMILIES:
        return pool_geometry(tuple(case.shape), case.params, case.family)
    if case.family in ADAPTIVE_FAMILIES:
        return adaptive_geometry(tuple(case.shape), case.params["output_size"])
    raise ValueError(f"{case.op} is not a pooling op")


def _index_itemsize(cache):
    """Bytes per kept argmax in our max-pool cache (its ``offsets``), 0 when it has none."""
    offsets = getattr(cache, "offsets", None)
    return np.dtype(offsets.dtype).itemsize if hasattr(offsets, "dtype") else 0


def build_case(case, xp, impls, clock, torch=None, torch_clock=None, rng=None,
               naive_reps=None, check=True):
    """Make data and one :class:`Timed` per implementation for ``case``.

    Inputs:
    - case: Case (op, shape, dtype, params)
    - xp: numpy or cupy; the data live there
    - impls: implementation names to try, e.g. ('fast', 'general', 'reshape', 'naive');
      one that gpulayers does not have, or whose geometry precondition fails
      (reshape needs tiling windows), is skipped with a note
    - clock: clock for our implementations; torch_clock for PyTorch's
    - torch: the torch module (or None: no peer)
    - naive_reps: cap on the naive implementation's samples

    Returns ``case`` filled in. Every implementation sees the same x (and
    dout, gamma, beta); backward entries time only the backward call, on a
    cache each implementation made with its own forward.
    """
    rng = rng or np.random.default_rng()
    fam, is_bwd = OPS[case.op]
    shape, dtype = tuple(case.shape), np.dtype(case.dtype)
    x = _random(xp, shape, dtype, rng)
    case.x_nbytes = x.nbytes
    C = shape[1]
    pdtype = np.float32 if dtype == np.float16 else dtype
    geom = None
    if case.is_pool:
        geom = case_geometry(case)
        out_shape = geom.output_shape
        gamma = beta = None
    else:
        out_shape = shape
        # float32 scale and shift for float16 input, as mixed precision keeps them (and as
        # the PyTorch peer gets them below)
        gamma = (1.0 + 0.1 * _random(xp, (C,), np.float32, rng)).astype(pdtype)
        beta = (0.1 * _random(xp, (C,), np.float32, rng)).astype(pdtype)
    dout = _random(xp, out_shape, dtype, rng) if is_bwd else None

    def bn_param():
        p = dict(case.params)
        p["mode"] = "test" if fam == "bn_eval" else "train"
        p["running_mean"] = xp.zeros(C, dtype=pdtype) + 0.1
        p["running_var"] = xp.ones(C, dtype=pdtype) * 1.5
        return p

    for name in impls:
        if name not in _IMPLS[fam]:
            continue  # e.g. no reshape trick for BN
        fwd, bwd = (_lookup(f) for f in _IMPLS[fam][name])
        label = impl_label(name, xp)
        if fwd is None or (is_bwd and bwd is None):
            missing = [f for f, g in zip(_IMPLS[fam][name], (fwd, bwd)) if g is None]
            case.notes.append(f"{label}: not in gpulayers ({', '.join(map(str, missing))})")
            continue
        if name == "reshape" and not geom.tiles:
            case.notes.append(f"{label}: windows do not tile the input")
            continue
        if fam in POOL_FAMILIES:
            params = case.params
            run_fwd = (lambda f=fwd, p=params: f(x, p))
        elif fam in ADAPTIVE_FAMILIES:
            size = case.params["output_size"]
            run_fwd = (lambda f=fwd, s=size: f(x, s))
        else:
            bp = bn_param()
            run_fwd = (lambda f=fwd, p=bp: f(x, gamma, beta, p))
        try:
            out, cache = run_fwd()
        except Exception as exc:
            case.notes.append(f"{label}: forward raised {type(exc).__name__}: {exc}"[:300])
            continue
        index_itemsize = _index_itemsize(cache) if fam in _ARGMAX_FAMILIES else 0
        case.bytes[label] = compulsory_bytes(case.op, shape, out_shape, dtype.itemsize,
                                             index_itemsize, np.dtype(pdtype).itemsize)
        case.forward_fns[label] = run_fwd
        if is_bwd:
            fn = (lambda b=bwd, c=cache: b(dout, c))
            case.backward_fns[label] = fn
            if check:
                try:
                    res = fn()
                    case.outputs[label] = res[0] if isinstance(res, tuple) else res
                except Exception as exc:
                    case.notes.append(f"{label}: backward raised {type(exc).__name__}: {exc}"[:300])
                    continue
        else:
            fn = run_fwd
            case.outputs[label] = out
        case.entries.append(Timed(label, fn, clock, reps=naive_reps if name == "naive" else None))
        del out, cache
    if torch is not None:
        try:
            _add_torch(case, torch, torch_clock or clock, x, dout, gamma, beta, out_shape, C)
        except Exception as exc:
            case.notes.append(f"torch: {type(exc).__name__}: {exc}"[:300])
    return case


def torch_pool_fn(F, case):
    """PyTorch's forward of the pooling ``case``: a function of one tensor, on the
    functional of x's rank (``F.max_pool3d`` for (N, C, D, H, W), ...), with the
    arguments taken from our checked geometry. Max pooling returns (out, indices).

    Average pooling of 1-D input with a divisor_override, and sum pooling of 1-D input
    (``avg_pool*d`` with divisor_override=1), run as 2-D over (N, C, 1, L):
    ``F.avg_pool1d`` has no divisor_override."""
    fam, d, p = case.family, case.rank, case.params
    geom = case_geometry(case)
    if fam in ADAPTIVE_FAMILIES:
        f = getattr(F, f"{fam}_pool{d}d")
        out = tuple(geom.out)
        if fam == "adaptive_max":
            return lambda t: f(t, out, return_indices=True)
        return lambda t: f(t, out)
    k, s, pad, dil = (tuple(v) for v in (geom.kernel, geom.stride, geom.pad, geom.dilation))
    ceil = geom.ceil_mode
    if fam == "max":
        f = getattr(F, f"max_pool{d}d")
        return lambda t: f(t, k, s, pad, dil, ceil_mode=ceil, return_indices=True)
    cip = bool(p.get("count_include_pad", True)) if fam == "avg" else True
    div = p.get("divisor_override") if fam == "avg" else 1
    if d == 1 and div is None:
        return lambda t: F.avg_pool1d(t, k, s, pad, ceil_mode=ceil, count_include_pad=cip)
    if d == 1:
        return lambda t: F.avg_pool2d(t.unsqueeze(2), (1,) + k, (1,) + s, (0,) + pad,
                                      ceil_mode=ceil, count_include_pad=cip,
                                      divisor_override=div).squeeze(2)
    f = getattr(F, f"avg_pool{d}d")
    return lambda t: f(t, k, s, pad, ceil_mode=ceil, count_include_pad=cip,
                       divisor_override=div)


def _add_torch(case, torch, clock, x, dout, gamma, beta, out_shape, C):
    """Append PyTorch's implementation of ``case.op`` on the same data."""
    F = torch.nn.functional
    fam, is_bwd = OPS[case.op]
    xt = _to_torch(torch, x)
    dev = xt.device
    label = f"torch-{dev.type}"
    itemsize = xt.element_size()
    if case.is_pool:
        fwd = torch_pool_fn(F, case)
        if not is_bwd:
            fn = lambda: fwd(xt)  # noqa: E731
            first = fwd(xt)
            first = first[0] if isinstance(first, tuple) else first
        else:
            xg = xt.detach().clone().requires_grad_(True)
            res = fwd(xg)
            out = res[0] if isinstance(res, tuple) else res
            dt = _to_torch(torch, dout)
            fn = lambda: torch.autograd.grad(out, xg, dt, retain_graph=True)  # noqa: E731
            first = fn()[0]
        index_itemsize = 8 if fam in _ARGMAX_FAMILIES else 0  # int64 indices
        nbytes = compulsory_bytes(case.op, case.shape, out_shape, itemsize, index_itemsize)
    else:
        wdtype = torch.float32 if xt.dtype == torch.float16 else xt.dtype
        w = _to_torch(torch, gamma).to(wdtype)
        b = _to_torch(torch, beta).to(wdtype)
        rm = torch.full((C,), 0.1, dtype=wdtype, device=dev)
        rv = torch.full((C,), 1.5, dtype=wdtype, device=dev)
        eps = case.params.get("eps", 1e-5)
        # torch's momentum weights the new value; cs231n's weights the old one
        mom = 1.0 - case.params.get("momentum", 0.9)
        if fam == "bn_eval":
            fn = lambda: F.batch_norm(xt, rm, rv, w, b, False, mom, eps)  # noqa: E731
            first = fn()
        elif not is_bwd:
            fn = lambda: F.batch_norm(xt, rm, rv, w, b, True, mom, eps)  # noqa: E731
            first = fn()
        else:
            xg = xt.detach().clone().requires_grad_(True)
            wg = w.detach().clone().requires_grad_(True)
            bg = b.detach().clone().requires_grad_(True)
            out = F.batch_norm(xg, rm, rv, wg, bg, True, mom, eps)
            dt = _to_torch(torch, dout)
            fn = lambda: torch.autograd.grad(out, (xg, wg, bg), dt, retain_graph=True)  # noqa: E731
            first = fn()[0]
        nbytes = compulsory_bytes(case.op, case.shape, out_shape, itemsize, 0,
                                  torch.empty((), dtype=wdtype).element_size())
    case.bytes[label] = nbytes
    case.outputs[label] = first.detach()
    case.entries.append(Timed(label, fn, clock))


# ------------------------------------------------------- N-d support and the peer check

#: largest max |ours - peer| / max |peer| that :func:`check_against` accepts, per dtype:
#: a few units in the last place of the largest value (sums of overlapping windows and
#: averages may add in another order than PyTorch's)
CHECK_TOL = {"float16": 1e-2, "float32": 1e-5, "float64": 1e-12}


def check_against(case, ours=None, peer=None):
    """Our result against the peer's: ``(error, ok)`` with error = max |ours - peer| /
    max |peer| over the forward output (forward ops) or dx (backward ops), and ok when
    it is within :data:`CHECK_TOL` of the case's dtype. ``ours`` defaults to the first
    implementation, ``peer`` to the first 'torch-*' output; ``(None, None)`` when
    either is missing (no peer, or ours did not run)."""
    labels = list(case.outputs)
    peer = peer or next((k for k in labels if k.startswith("torch")), None)
    ours = ours or next((k for k in labels if not k.startswith("torch")), None)
    if peer is None or ours is None or ours not in case.outputs:
        return None, None
    err = agreement(case, reference=peer)[ours]
    return err, bool(err <= CHECK_TOL.get(str(case.dtype), 1e-5))


def _probe_params(fam, d):
    if fam in ADAPTIVE_FAMILIES:
        return {"output_size": (3,) * d}
    return {"kernel_size": 3, "stride": 2, "pad": 1}


def probe_case(case, impl="fast"):
    """None when gpulayers can run ``case``'s op with ``impl`` on x of its rank, else
    why not (a missing function, or the forward or backward raising or returning the
    wrong shape). Runs the op once on a tiny NumPy input of the case's rank
    (shape (1, 2, 7, ...)) with the case's own parameters (kernel 3, stride 2, pad 1 /
    output 3 per axis for a case whose parameters do not fit 7)."""
    fam = case.family
    names = _IMPLS.get(fam, {}).get(impl)
    if names is None:
        return f"{impl} has no {case.op}"
    fwd, bwd = (_lookup(f) for f in names)
    missing = [n for n, f in zip(names, (fwd, bwd)) if f is None]
    if missing:
        return f"gpulayers has no {', '.join(map(str, missing))}"
    tiny = Case(case.op, (1, 2) + (7,) * case.rank, case.dtype, dict(case.params))
    try:
        geom = case_geometry(tiny)
    except ValueError:
        tiny.params = _probe_params(fam, case.rank)
        try:
            geom = case_geometry(tiny)
        except ValueError as exc:
            return f"shapes refuses {tiny.shape} {tiny.params}: {exc}"[:300]
    x = np.random.default_rng(0).standard_normal(tiny.shape).astype(case.dtype)
    what = f"{names[0]} on x of shape {tiny.shape} ({tiny.params_str()})"
    try:
        arg = tiny.params["output_size"] if fam in ADAPTIVE_FAMILIES else tiny.params
        out, cache = fwd(x, arg)
        if tuple(out.shape) != tuple(geom.output_shape):
            return f"{what} returned shape {tuple(out.shape)}, not {geom.output_shape}"
        dx = bwd(np.ones_like(out), cache)
        dx = dx[0] if isinstance(dx, tuple) else dx
        if tuple(dx.shape) != tuple(tiny.shape):
            return f"{names[1]} returned shape {tuple(dx.shape)}, not {tiny.shape}"
    except Exception as exc:
        return f"{what} raised {type(exc).__name__}: {exc}"[:300]
    return None


def nd_support(impl="fast"):
    """{'max_pool 3-D': None or why not, ...}: which pooling ops gpulayers runs on
    x of each rank (1-D, 2-D, 3-D), by :func:`probe_case`."""
    out = {}
    for fam, op in (("max", "max_pool"), ("avg", "avg_pool"), ("sum", "sum_pool"),
                    ("adaptive_avg", "adaptive_avg_pool"), ("adaptive_max", "adaptive_max_pool")):
        for d in (1, 2, 3):
            case = Case(f"{op}_backward", (1, 2) + (7,) * d, "float32", _probe_params(fam, d))
            out[f"{op} {d}-D"] = probe_case(case, impl)
    return out


def to_host(a):
    """NumPy copy of a NumPy/CuPy array or a torch tensor."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        return a.detach().cpu().numpy()
    return gl.to_numpy(a)


def agreement(case, reference=None):
    """{label: max |a - ref| / max |ref|} of every output against the first
    implementation's (or ``reference``'s). 0.0 means bit-identical."""
    if not case.outputs:
        return {}
    labels = list(case.outputs)
    ref_label = reference or labels[0]
    ref = to_host(case.outputs[ref_label]).astype(np.float64)
    scale = max(float(np.nanmax(np.abs(ref))) if ref.size else 0.0, 1e-30)
    out = {}
    for label in labels:
        a = to_host(case.outputs[label]).astype(np.float64)
        if a.shape != ref.shape:
            out[label] = float("inf")
            continue
        same_nan = np.isnan(a) == np.isnan(ref)
        diff = np.where(np.isnan(a) & np.isnan(ref), 0.0, np.abs(a - ref))
        out[label] = float(np.max(diff)) / scale if same_nan.all() else float("inf")
    return out


# ------------------------------------------------------------------------- memory


def peak_memory(fn):
    """(peak, retained) bytes that ``fn()`` allocates through tracemalloc
    (NumPy reports its array buffers there): the high-water mark above the
    memory in use before the call, and what is still held by its result."""
    gc.collect()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        current, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        if started:
            tracemalloc.stop()
    return peak - base, current - base


# -------------------------------------------------------------------- results JSON

#: the ops a results JSON may hold: every op of :data:`OPS`
RESULT_OPS = tuple(OPS)


def slug(text):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s or "unknown"


def result_case(case, ours, peer, copy_gbps, params=None):
    """One entry of the results JSON ``cases`` list, from the medians (ms)
    of our implementation ``ours`` and the peer ``peer`` (labels), or None
    when ours has no time."""
    t_ours = median(_entry(case, ours).samples) if _entry(case, ours) else float("nan")
    if not np.isfinite(t_ours):
        return None
    t_peer = median(_entry(case, peer).samples) if peer and _entry(case, peer) else float("nan")
    nbytes = int(case.bytes[ours])
    return {
        "op": case.op, "shape": [int(s) for s in case.shape], "dtype": str(case.dtype),
        "params": params or case.params_str(),
        "gpulayers_ms": round(t_ours, 5),
        "torch_ms": round(t_peer, 5) if np.isfinite(t_peer) else None,
        "ratio": round(t_ours / t_peer, 4) if np.isfinite(t_peer) and t_peer > 0 else None,
        "bytes": nbytes,
        "bandwidth_fraction": round(nbytes / (t_ours * 1e-3) / (copy_gbps * 1e9), 4)
        if copy_gbps else None,
    }


def _entry(case, label):
    for e in case.entries:
        if e.name == label and e.error is None and e.samples:
            return e
    return None


def results_document(device, copy_gbps, cases, tests=None, cupy_version=None,
                     torch_version=None, commit=None, date=None):
    """The results JSON as a dict (see benchmarks/results/)."""
    tests = tests or {"passed": 0, "failed": 0, "skipped": 0}
    return {
        "device": str(device), "date": date or today(), "commit": commit or git_commit(),
        "cupy": str(cupy_version) if cupy_version else "none",
        "torch": str(torch_version) if torch_version else "none",
        "copy_GBps": round(float(copy_gbps), 3) if copy_gbps else None,
        "tests": {k: int(tests.get(k, 0)) for k in ("passed", "failed", "skipped")},
        "cases": list(cases),
    }


def validate_results(doc):
    """ValueError naming the first field that breaks the results format."""
    top = {"device": str, "date": str, "commit": str, "cupy": str, "torch": str,
           "copy_GBps": (float, int, type(None)), "tests": dict, "cases": list}
    for key, typ in top.items():
        if key not in doc:
            raise ValueError(f"results JSON lacks {key!r}")
        if not isinstance(doc[key], typ):
            raise ValueError(f"results JSON {key!r} has type {type(doc[key]).__name__}")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc["date"]):
        raise ValueError(f"date {doc['date']!r} is not YYYY-MM-DD")
    for k in ("passed", "failed", "skipped"):
        if not isinstance(doc["tests"].get(k), int):
            raise ValueError(f"tests[{k!r}] must be an int")
    keys = ("op", "shape", "dtype", "params", "gpulayers_ms", "torch_ms", "ratio", "bytes",
            "bandwidth_fraction")
    for i, c in enumerate(doc["cases"]):
        if set(c) != set(keys):
            raise ValueError(f"cases[{i}] keys {sorted(c)} != {sorted(keys)}")
        if c["op"] not in RESULT_OPS:
            raise ValueError(f"cases[{i}] op {c['op']!r} unknown")
        shape = c["shape"]
        if (not isinstance(shape, list) or not 3 <= len(shape) <= 5
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            raise ValueError(f"cases[{i}] shape {shape!r} is not [N, C, L], [N, C, H, W] or "
                             f"[N, C, D, H, W]")
        if not isinstance(c["gpulayers_ms"], (int, float)) or not isinstance(c["bytes"], int):
            raise ValueError(f"cases[{i}] gpulayers_ms/bytes have wrong types")
    return doc


def write_json(doc, *paths):
    """Validate ``doc`` and write it to every path (folders made as needed)."""
    validate_results(doc)
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    # one line per shape list: [256, 64, 112, 112], [8, 32, 16, 56, 56]
    text = re.sub(r"\[\s+(\d+(?:,\s+\d+)*)\s+\]",
                  lambda m: "[" + ", ".join(re.split(r",\s+", m.group(1))) + "]", text)
    for path in paths:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return paths


# ------------------------------------------------- channels-first vs channels-last (issue 12)

#: the layouts --layouts times: channels-first input, C-contiguous channels-last input with
#: data_format='channels_last', and PyTorch's channels_last memory format (channels-first
#: shape, channels-last strides) with the default data_format
LAYOUTS = ("cf", "cl", "pt")
#: --layouts' target: channels-last / channels-first at most this on every case
LAYOUT_TARGET = 1.3


def to_channels_last(a):
    """The C-contiguous channels-last copy of a channels-first array."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def to_channels_first(a):
    """The channels-first view of a channels-last array (no copy)."""
    return np.moveaxis(a, -1, 1)


def _layout_call(case, layout, x, dout, gamma, beta):
    """(fn, result) of ``case``'s public NumPy call on ``x`` in ``layout``: fn() runs the
    timed call (the forward, or the backward on a cache from one forward)."""
    fam, is_bwd = OPS[case.op]
    fwd, bwd = (_lookup(f) for f in _IMPLS[fam]["fast"])
    df = "channels_last" if layout == "cl" else "channels_first"
    if fam in POOL_FAMILIES:
        p = dict(case.params, data_format=df)
        run_fwd = (lambda: fwd(x, p))
    elif fam in ADAPTIVE_FAMILIES:
        size = case.params["output_size"]
        run_fwd = (lambda: fwd(x, size, data_format=df))
    else:
        C = case.shape[1]
        p = dict(case.params, data_format=df, mode="test" if fam == "bn_eval" else "train",
                 running_mean=np.full(C, 0.1, gamma.dtype), running_var=np.full(C, 1.5, gamma.dtype))
        run_fwd = (lambda: fwd(x, gamma, beta, p))
    out, cache = run_fwd()
    if not is_bwd:
        return run_fwd, out
    fn = (lambda: bwd(dout, cache))
    return fn, fn()


def _as_first(res, layout):
    """A result (array or tuple: dx first) in channels-first layout."""
    res = res if isinstance(res, tuple) else (res,)
    first = to_channels_first(res[0]) if layout == "cl" else res[0]
    return (first,) + tuple(res[1:])


def layout_error(case, ref, got):
    """max |got - ref| / max |ref| over the arrays of two channels-first results."""
    err = 0.0
    for r, g in zip(ref, got):
        if r is None or not hasattr(r, "shape"):
            continue
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r64.shape != g64.shape:
            return float("inf")
        scale = float(np.max(np.abs(r64))) if r64.size else 0.0
        diff = float(np.max(np.abs(g64 - r64))) if r64.size else 0.0
        err = max(err, diff / scale if scale else diff)
    return err


def build_layout_case(case, rng=None, layouts=LAYOUTS):
    """One :class:`Timed` per layout for ``case`` (NumPy), all on the same data: the
    channels-first x, its C-contiguous channels-last copy (``data_format='channels_last'``),
    and that copy viewed channels-first (PyTorch's channels_last memory format, default
    data_format). Each layout's result, moved to channels-first, is checked against the
    channels-first one: pooling bit for bit, batch norm to ``CHECK_TOL``.

    Returns ``(entries, checks)``: checks maps each layout but 'cf' to
    ``(error, ok)``."""
    rng = rng or np.random.default_rng()
    fam, is_bwd = OPS[case.op]
    dtype = np.dtype(case.dtype)
    x = _random(np, tuple(case.shape), dtype, rng)
    C = case.shape[1]
    gamma = beta = None
    if case.is_pool:
        out_shape = case_geometry(case).output_shape
    else:
        out_shape = tuple(case.shape)
        pdtype = np.float32 if dtype == np.float16 else dtype
        gamma = (1.0 + 0.1 * _random(np, (C,), np.float32, rng)).astype(pdtype)
        beta = (0.1 * _random(np, (C,), np.float32, rng)).astype(pdtype)
    dout = _random(np, out_shape, dtype, rng) if is_bwd else None
    case.x_nbytes = x.nbytes
    x_cl = to_channels_last(x)
    d_cl = to_channels_last(dout) if is_bwd else None
    data = {"cf": (x, dout), "cl": (x_cl, d_cl),
            "pt": (to_channels_first(x_cl), to_channels_first(d_cl) if is_bwd else None)}
    entries, results = [], {}
    for layout in layouts:
        xi, di = data[layout]
        fn, res = _layout_call(case, layout, xi, di, gamma, beta)
        results[layout] = _as_first(res, layout)
        entries.append(Timed(layout, fn, CPUClock()))
    checks = {}
    ref = results.get("cf")
    for layout in layouts:
        if layout == "cf" or ref is None:
            continue
        got = results[layout]
        if case.is_pool:
            ok = all(np.array_equal(r, g) for r, g in zip(ref, got) if hasattr(r, "shape"))
            checks[layout] = (layout_error(case, ref, got), ok)
        else:
            err = layout_error(case, ref, got)
            checks[layout] = (err, err <= CHECK_TOL[case.dtype])
    return entries, checks
