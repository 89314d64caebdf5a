"""The NumPy fast paths: max pooling and spatial batch norm, blocked and threaded.

Plain NumPy loses to a C loop when each step streams a big array through
memory, walks it with strides, or makes a masked copy. These paths avoid all
three:

- **blocks**: the N*C planes are processed a few at a time, so every
  intermediate fits in the core's L2 cache; only the input is read from
  memory and only the results are written back;
- **threads**: the calling thread and a pool take blocks from one queue,
  ``GPULAYERS_NUM_THREADS`` threads in all (default: every core); NumPy
  releases the GIL inside its loops;
- **contiguous steps**: max pooling first splits each block's columns by
  ``col % stride`` (one strided copy), after which every window tap is a
  *flat shift* of a contiguous array: ``np.maximum``/``np.greater`` run
  vectorized over whole blocks;
- **argmax without masked copies**: a window's first maximum is found in
  row-major tap order with strict ``>``, so the winning tap index only grows
  as taps are added: ``offset = max(offset, (tap > best) * tap_index)``, in
  uint8 arithmetic (rows first, then ``i*kw + j`` over rows, which also grows
  with i);
- **exactness guards**: a block whose output holds NaN or -inf (where
  PyTorch's rules -- last NaN, first in-range element -- differ from the
  comparisons above), or whose dout is not finite, is recomputed by the
  general path, so the results are those of the general path bit for bit
  (backward sums in the same tap order); ``np.maximum`` may return either
  operand of a tie, so zeros in the output are taken from the input at their
  argmax (-0.0 and +0.0 keep the first in window order, as the general path);
- **small inputs**: below measured sizes (``MAX_POOL_FORWARD_MIN`` and the
  other ``*_MIN`` constants) the setup of blocks and threads costs more than it
  saves, and each op runs a simple single-threaded vectorised path instead
  (the general xp path itself for small max-pool forwards; BN train forward
  declines the smallest inputs to the caller's general path).

Batch norm keeps ``x`` itself in the cache instead of a normalized copy and
computes per-plane (mean, M2) pairs in cache-sized blocks, merged per channel
with Chan's formula: one pass over memory for the statistics, each plane
centred exactly (pivot-shifted, then mean-centred; M2 as a row dot product),
never E[x^2] - E[x]^2. The affine steps drop the centring
(x * a + (b - mean * a)) only where every channel's |mean| / std <= 8.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from .shapes import acc_dtype

__all__ = ["max_pool_forward", "max_pool_backward", "bn_train_forward", "bn_eval_forward",
           "bn_backward", "num_threads", "BLOCK_BYTES"]

#: target bytes of one block's intermediates (measured best on a 2-core EPYC, 1 MiB L2, 32 MiB L3)
BLOCK_BYTES = int(os.environ.get("GPULAYERS_BLOCK_BYTES", 1 << 21))

# Below these sizes (elements of x, the op's input (N, C, H, W)) the blocked, threaded code
# loses to plain vectorised NumPy: its setup (block plan, scratch buffers, thread hand-off,
# guards) costs tens of microseconds, and a second thread gains nothing until the arrays
# outgrow the caches. Each op then takes its simple single-threaded path, with the general
# xp path's results (bit for bit for pooling; BN within the tests' tolerances).
#
# Measured 2026-12-01 on the 2-core AMD EPYC (1 MiB L2, 32 MiB L3), numpy 2.4.6, float32,
# working tree on commit effaf13, by two runs of
#     python scripts/bench.py --crossover
# (two passes each; load average 0.9-1.1 and 2.1-2.2, other sessions on the cores): per op
# and size the public call with its threshold forced to 0 (blocked) and to infinity
# (simple), alternating rounds, medians after warm-up. The numbers below are blocked /
# simple time, the median of the four passes; each threshold lies between the last size
# where that was above 1 and the first from which it stayed <= 1. Sizes are elements of
# (N, C, 28, 28) and (N, C, 56, 56) inputs; 100k = (8, 16, 28, 28), 6.4M = (32, 64, 56, 56).
#: max-pool forward: the general xp path below, for windows of at most
#: MAX_POOL_FORWARD_SMALL_WINDOW taps (2x2/2: 1.04 at 16 and 120 elements, 1.00 at 384,
#: 0.92 at 2048; also at (2, 3, 4, 5), one ad-hoc run: 1x2/2 1.07, 3x1/1 1.06). Larger
#: windows are blocked at every size (3x3/2: 0.86 at 16; 2x3/2, 3x2/2: 0.94-0.96 at 120)
MAX_POOL_FORWARD_MIN = 2048
MAX_POOL_FORWARD_SMALL_WINDOW = 4
#: max-pool backward: _max_pool_backward_small below (2x2/2: 1.12 at 100k, 0.96 at 200k,
#: 0.40 at 6.4M; 3x3/2: 1.01 at 200k, 0.93 at 400k, 0.51 at 6.4M)
MAX_POOL_BACKWARD_MIN = 300_000
#: BN train forward: _bn_train_small below BN_TRAIN_FORWARD_MIN (1.09 at 800k, 1.03 at
#: 1.6M, 1.01 at 3.2M, 0.98 at 6.4M), and None -- the caller's general path -- below
#: BN_TRAIN_SMALL_MIN, where the general backward from its cached xhat (one pass fewer)
#: beats any backward from x (x-based / general backward: 1.65 at 120, 1.27 at 12.5k,
#: 1.07 at 50k, 1.00 at 75k, 0.96 at 100k, 0.92 at 150k)
BN_TRAIN_FORWARD_MIN = 4_000_000
BN_TRAIN_SMALL_MIN = 65_536
#: BN test-mode forward: _bn_eval_small below (1.21 at 100k, 1.00 at 200k, 0.93 at 400k,
#: 0.59 at 6.4M)
BN_EVAL_FORWARD_MIN = 300_000
#: BN test-mode forward declines (returns None: the caller's general path, whose backward
#: from the cached xhat is one pass fewer) below this, for the reason and at the size of
#: BN_TRAIN_SMALL_MIN (that measurement; not measured separately for test mode)
BN_EVAL_SMALL_MIN = BN_TRAIN_SMALL_MIN
#: BN train-mode backward: _bn_backward_small below (1.19 at 800k, 1.10 at 1.6M, 1.04 at
#: 3.2M, 0.81 at 6.4M)
BN_BACKWARD_MIN = 4_000_000
#: BN test-mode backward: _bn_backward_small below (second run, this simple path: 1.18 at
#: 400k, 0.98 at 800k, 0.85 at 1.6M, 0.80 at 6.4M; first run, a slower simple path, 1.03
#: at 800k, 0.98 at 1.6M)
BN_EVAL_BACKWARD_MIN = 1_200_000
#: how the thresholds above were measured
SMALL_MEASUREMENT = ("2026-12-01, 2-core AMD EPYC, numpy 2.4.6, float32: "
                     "python scripts/bench.py --crossover")

_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def num_threads():
    """Threads the NumPy fast paths use: env GPULAYERS_NUM_THREADS, else every core."""
    try:
        n = int(os.environ.get("GPULAYERS_NUM_THREADS", "0"))
    except ValueError:
        n = 0
    return max(1, n or os.cpu_count() or 1)


def _executor(n):
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gpulayers")
            _pool_size = n
        return _pool


class _Scratch:
    """Per-thread reusable buffers, allocated once for the largest block."""

    def __init__(self, n_max):
        self.n_max = n_max
        self.bufs = {}

    def get(self, name, per_item, dtype, fill=None):
        """Flat buffer for ``n_max`` items of ``per_item`` elements; ``fill``
        is written once, at allocation (callers never overwrite those parts)."""
        buf = self.bufs.get(name)
        if buf is None:
            size = self.n_max * per_item
            buf = np.empty(size, dtype) if fill is None else np.full(size, fill, dtype)
            self.bufs[name] = buf
        return buf


def _run_blocks(n_items, bytes_per_item, work):
    """Call ``work(start, stop, scratch)`` over blocks of items, in threads.

    The calling thread and ``num_threads() - 1`` pool threads take the next
    block from a shared queue until none is left, so a thread slowed down by
    another process on its core (e.g. an OpenMP pool spinning after its last
    parallel region) simply does fewer blocks."""
    per_block = max(1, min(n_items, BLOCK_BYTES // max(1, bytes_per_item)))
    blocks = [(s, min(s + per_block, n_items)) for s in range(0, n_items, per_block)]
    n_threads = min(num_threads(), len(blocks))
    if n_threads <= 1:
        scratch = _Scratch(per_block)
        for s, e in blocks:
            work(s, e, scratch)
        return
    queue = iter(blocks)
    lock = threading.Lock()
    failed = []

    def drain():
        scratch = _Scratch(per_block)
        while not failed:
            with lock:
                block = next(queue, None)
            if block is None:
                return
            try:
                work(block[0], block[1], scratch)
            except BaseException:
                failed.append(True)
                raise

    futures = [_executor(n_threads - 1).submit(drain) for _ in range(n_threads - 1)]
    try:
        drain()
    finally:
        wait(futures)
    for f in futures:
        f.result()  # a pool thread's error


def _span(pad, phase, stride, n_grid, size):
    """Grid cells ``g`` of one phase whose input position ``g*stride + phase - pad``
    lies in ``[0, size)``: (first cell, first input position, number of cells)."""
    g0 = max(0, -(-(pad - phase) // stride))
    first = g0 * stride + phase - pad
    if first >= size or g0 >= n_grid:
        return g0, first, 0
    return g0, first, min(n_grid - g0, (size - 1 - first) // stride + 1)


# ----------------------------------------------------------------------- max pooling


def max_pool_forward(x, geom, general):
    """Max pooling of a NumPy x (N, C, H, W) by blocks; None when the geometry
    has dilation (the caller then uses the general path).

    ``general(xb, geom_b)`` is the exact general implementation, used for
    inputs of fewer than ``MAX_POOL_FORWARD_MIN`` elements with windows of at
    most ``MAX_POOL_FORWARD_SMALL_WINDOW`` taps, and for blocks holding NaN or
    -inf. Returns (out, offsets) like it.

    ``out`` is bitwise the input element at the reported argmax: ``np.maximum``
    may return either operand of a tie, so a block whose output holds zeros
    takes each zero from the input at its argmax (-0.0 and +0.0 tie; the first
    in window order wins, as in the general path).
    """
    if geom.dh != 1 or geom.dw != 1:
        return None
    if x.size < MAX_POOL_FORWARD_MIN and geom.window_size <= MAX_POOL_FORWARD_SMALL_WINDOW:
        return general(x, geom)
    x = np.ascontiguousarray(x)
    N, C, H, W = geom.input_shape
    kh, kw, sh, sw, ph, pw = geom.kh, geom.kw, geom.sh, geom.sw, geom.ph, geom.pw
    Ho, Wo = geom.Ho, geom.Wo
    odt = geom.offset_dtype
    NC = N * C
    xr = x.reshape(NC, H, W)
    out = np.empty((NC, Ho, Wo), x.dtype)
    off = np.empty((NC, Ho, Wo), odt)
    Hr = (Ho - 1) * sh + kh          # padded rows the windows read
    Wq = Wo + (kw - 1) // sw         # columns of one column phase
    nq = min(sw, kw)
    M = Hr * Wq
    rows = _span(ph, 0, 1, Hr, H)    # (first padded row, first x row, count)
    cols = [_span(pw, q, sw, Wq, W) for q in range(nq)]
    item = x.dtype.itemsize
    per_plane = M * (item * (nq + 2) + odt.itemsize * 3 + 1)
    acc = acc_dtype(x.dtype)

    def work(s, e, scr):
        n = e - s
        L = n * M
        ph_flat = []
        for q in range(nq):
            buf = scr.get(("E", q), M, x.dtype, fill=-np.inf)
            (g0, c0, nc), (r0, x0, nr) = cols[q], rows
            if nc and nr:
                b3 = buf[:L].reshape(n, Hr, Wq)
                b3[:, r0:r0 + nr, g0:g0 + nc] = xr[s:e, x0:x0 + nr, c0:c0 + (nc - 1) * sw + 1:sw]
            ph_flat.append(buf[:L])
        g = scr.get("g", M, np.bool_)
        tmp = scr.get("tmp", M, odt)
        # width: running max over taps j of each padded row; rj = first argmax j
        Lw = L - (kw - 1) // sw

        def tap(j):
            d = j // sw
            return ph_flat[j % sw][d:d + Lw]
        if kw == 1:
            rm, rj = ph_flat[0], scr.get("zero", M, odt, fill=0)[:L]
        else:
            rm = scr.get("rm", M, x.dtype, fill=-np.inf)[:L]
            rj = scr.get("rj", M, odt, fill=0)[:L]
            np.greater(tap(1), tap(0), out=g[:Lw])
            np.copyto(rj[:Lw], g[:Lw], casting="unsafe")
            np.maximum(tap(0), tap(1), out=rm[:Lw])
            for j in range(2, kw):
                t = tap(j)
                np.greater(t, rm[:Lw], out=g[:Lw])
                np.multiply(g[:Lw], odt.type(j), out=tmp[:Lw])
                np.maximum(rj[:Lw], tmp[:Lw], out=rj[:Lw])
                np.maximum(rm[:Lw], t, out=rm[:Lw])
        # height, on every padded row (contiguous); offsets i*kw + j grow with i
        Lh = L - (kh - 1) * Wq
        if kh == 1:
            o, of = rm, rj
        else:
            o = scr.get("o", M, x.dtype, fill=-np.inf)[:L]
            of = scr.get("of", M, odt, fill=0)[:L]
            np.greater(rm[Wq:Wq + Lh], rm[:Lh], out=g[:Lh])
            np.add(rj[Wq:Wq + Lh], odt.type(kw), out=tmp[:Lh])
            np.multiply(tmp[:Lh], g[:Lh], out=tmp[:Lh])
            np.maximum(rj[:Lh], tmp[:Lh], out=of[:Lh])
            np.maximum(rm[:Lh], rm[Wq:Wq + Lh], out=o[:Lh])
            for i in range(2, kh):
                t = rm[i * Wq:i * Wq + Lh]
                np.greater(t, o[:Lh], out=g[:Lh])
                np.add(rj[i * Wq:i * Wq + Lh], odt.type(i * kw), out=tmp[:Lh])
                np.multiply(tmp[:Lh], g[:Lh], out=tmp[:Lh])
                np.maximum(of[:Lh], tmp[:Lh], out=of[:Lh])
                np.maximum(o[:Lh], t, out=o[:Lh])
        last = (Ho - 1) * sh + 1
        ob, fb = out[s:e], off[s:e]
        np.copyto(ob, o.reshape(n, Hr, Wq)[:, 0:last:sh, :Wo])
        np.copyto(fb, of.reshape(n, Hr, Wq)[:, 0:last:sh, :Wo])
        _zeros_from_argmax(ob, fb, xr[s:e], geom, scr)
        total = np.add.reduce(ob.reshape(-1), dtype=acc)
        if not np.isfinite(total) and (np.isnan(ob).any() or (ob == -np.inf).any()):
            gb = dataclasses.replace(geom, N=n, C=1)
            o2, f2 = general(xr[s:e].reshape(n, 1, H, W), gb)
            ob[...] = o2.reshape(n, Ho, Wo)
            fb[...] = f2.reshape(n, Ho, Wo)

    _run_blocks(NC, per_plane, work)
    return out.reshape(geom.output_shape), off.reshape(geom.output_shape)


def _zeros_from_argmax(ob, fb, xb, geom, scr):
    """Give every zero of ``ob`` (n, Ho, Wo) the sign of the input element at its
    argmax ``fb`` (compact offsets) in ``xb`` (n, H, W); no dilation. Only zeros can
    differ: a tie of non-zero values is one bit pattern."""
    flat = ob.reshape(-1)
    z = scr.get("zero?", geom.Ho * geom.Wo, np.bool_)[:flat.size]
    np.equal(flat, 0, out=z)
    if not z.any():
        return
    k = np.flatnonzero(z)
    Q = geom.Ho * geom.Wo
    plane, r = np.divmod(k, Q)
    oh, ow = np.divmod(r, geom.Wo)
    t = fb.reshape(-1)[k].astype(np.intp)
    ti, tj = np.divmod(t, geom.kw)
    flat[k] = xb[plane, oh * geom.sh - geom.ph + ti, ow * geom.sw - geom.pw + tj]


def _windows_share(k, s, d):
    """True when two windows ``s`` apart (some multiple) can hold one element
    along an axis: a shift ``m*s`` (m >= 1) equals a tap distance ``t*d``, t < k."""
    return (k - 1) * d >= math.lcm(s, d)


def max_pool_backward(dout, offsets, geom, general=None):
    """dx of max pooling from the compact offsets, by blocks (any geometry).

    Window ``(oh, ow)`` sends its gradient to the flat target ``base[oh, ow] +
    lut[offset]`` of its dx plane, with ``lut[t] = t*dw + (t // kw)*(dh*W - kw*dw)``
    computed in small integers (cheaper than a gather from ``lut``).

    - Windows that can share no element (stride >= dilated window along an
      axis, as in 2x2/2): every target is unique, one fancy assignment of
      ``dout + 0`` (the +0 turns -0.0 into +0.0, as the general path's zero
      start does).
    - Otherwise ``np.add.at`` over the windows in *descending* output order.
      Two windows with a common element see it at taps that grow as the window
      index falls (a later row/column sees it at a smaller ``i``/``j``), so the
      descending order adds each element's contributions in ascending tap order
      ``i*kw + j`` from zero, exactly like the general path
      (``pooling._max_pool_backward_xp``): the results are equal bit for bit,
      NaN/inf in dout included. float16 sums in float32, as there.

    Inputs of fewer than ``MAX_POOL_BACKWARD_MIN`` elements (x's size) take
    :func:`_max_pool_backward_small`: the same targets and sums in one block,
    without the block plan, scratch buffers or threads.
    """
    if int(np.prod(geom.input_shape)) < MAX_POOL_BACKWARD_MIN:
        return _max_pool_backward_small(dout, offsets, geom)
    N, C, H, W = geom.input_shape
    kh, kw, sh, sw, dh, dw = geom.kh, geom.kw, geom.sh, geom.sw, geom.dh, geom.dw
    Ho, Wo = geom.Ho, geom.Wo
    NC, P, Q = N * C, H * W, Ho * Wo
    dr = np.ascontiguousarray(dout).reshape(NC, Q)
    fr = np.ascontiguousarray(offsets).reshape(NC, Q)
    odt = fr.dtype
    acc = acc_dtype(dout.dtype)
    oh = np.arange(Ho, dtype=np.intp)[:, None] * sh - geom.ph
    ow = np.arange(Wo, dtype=np.intp)[None, :] * sw - geom.pw
    base = (oh * W + ow).reshape(-1)
    step = dh * W - kw * dw                        # lut[t] = t*dw + (t // kw) * step
    small = (kh - 1) * abs(step) + (geom.window_size - 1) * dw < 2 ** 15
    vdt = np.dtype(np.int16 if small else np.int32)
    overlap = _windows_share(kh, sh, dh) or _windows_share(kw, sw, dw)
    direct = acc == dout.dtype or not overlap
    per_plane = Q * (8 + 2 * vdt.itemsize + odt.itemsize + dout.dtype.itemsize) + P * (
        0 if direct else acc.itemsize)
    per_block = max(1, min(NC, BLOCK_BYTES // per_plane))
    bb = (base[None, :] + (np.arange(per_block, dtype=np.intp) * P)[:, None]).reshape(-1)
    dx = np.empty((NC, P), dout.dtype)
    zero = dout.dtype.type(0)

    def work(s, e, scr):
        n = e - s
        L = n * Q
        f = fr[s:e].reshape(-1)
        q = scr.get("q", Q, odt)[:L]
        v = scr.get("v", Q, vdt)[:L]
        np.floor_divide(f, odt.type(kw), out=q)
        np.multiply(q, vdt.type(step), out=v, dtype=vdt, casting="unsafe")
        if dw == 1:
            np.add(v, f, out=v, dtype=vdt, casting="unsafe")
        else:
            w = scr.get("w", Q, vdt)[:L]
            np.multiply(f, vdt.type(dw), out=w, dtype=vdt, casting="unsafe")
            v += w
        idx = scr.get("idx", Q, np.intp)[:L]
        np.add(bb[:L], v, out=idx)
        d = dr[s:e].reshape(-1)
        if not overlap:
            vals = scr.get("vals", Q, dout.dtype)[:L]
            np.add(d, zero, out=vals)
            out = dx[s:e].reshape(-1)
            out.fill(0)
            out[idx] = vals
            return
        sums = dx[s:e].reshape(-1) if direct else scr.get("acc", P, acc)[:n * P]
        sums.fill(0)
        np.add.at(sums, idx[::-1], d[::-1])
        if not direct:
            np.copyto(dx[s:e], sums.reshape(n, P), casting="unsafe")

    _run_blocks(NC, per_plane, work)
    return dx.reshape(geom.input_shape)


def _max_pool_backward_small(dout, offsets, geom):
    """max_pool_backward in one block, single-threaded: flat target ``plane*H*W +
    base[oh, ow] + (t // kw) * (dh*W - kw*dw) + t*dw`` of every window's offset t (intp),
    then one fancy assignment (windows share no element) or ``np.add.at`` in descending
    window order (ascending tap order per element, as the general path adds)."""
    N, C, H, W = geom.input_shape
    kh, kw, sh, sw, dh, dw = geom.kh, geom.kw, geom.sh, geom.sw, geom.dh, geom.dw
    NC, P = N * C, H * W
    t = np.asarray(offsets).reshape(-1).astype(np.intp)
    oh = np.arange(geom.Ho, dtype=np.intp)[:, None] * (sh * W) - geom.ph * W
    ow = np.arange(geom.Wo, dtype=np.intp) * sw - geom.pw
    idx = t // kw
    idx *= dh * W - kw * dw
    if dw != 1:
        t *= dw
    idx += t
    planes = idx.reshape(NC, geom.Ho * geom.Wo)
    planes += (oh + ow).reshape(-1)                           # base[oh, ow]
    planes += (np.arange(NC, dtype=np.intp) * P)[:, None]     # plane * H*W
    d = np.asarray(dout).reshape(-1)
    if not (_windows_share(kh, sh, dh) or _windows_share(kw, sw, dw)):
        dx = np.zeros(NC * P, dout.dtype)
        dx[idx] = d + dout.dtype.type(0)   # -0.0 -> +0.0, as the general path's zero start
        return dx.reshape(geom.input_shape)
    acc = acc_dtype(dout.dtype)
    dx = np.zeros(NC * P, acc)
    np.add.at(dx, idx[::-1], d[::-1])
    return dx.reshape(geom.input_shape).astype(dout.dtype, copy=False)


# --------------------------------------------------------------------- batch norm


def _rows(v, N):
    """(C,) -> (N*C, 1): the value of each (n, c) plane's channel."""
    return np.tile(v, N)[:, None]


_vecdot = getattr(np, "vecdot", None)   # NumPy >= 2.0


def _row_dots(a, b):
    """(n, P), (n, P) -> (n,): per-row dot products in the arrays' dtype (one read pass)."""
    if _vecdot is not None:
        return _vecdot(a, b)
    return np.einsum("ij,ij->i", a, b)


#: (x - mean) * a + b is computed as x * a + (b - mean * a) (one ufunc pass fewer) only
#: when every channel's |mean| / std is at most this (the extra rounding is ~this * eps,
#: relative to the output's scale)
_FOLD_MAX = 8.0


def bn_train_forward(x, gamma, beta, eps, sd):
    """Spatial BN train forward of a NumPy x (N, C, H, W).

    Statistics per plane by an exact two-pass method on the block in cache
    (never E[x^2] - E[x]^2): shift by the channel's pivot (its first sample,
    so a constant channel gives exact zeros), sum, subtract the plane mean,
    then the sum of squared deviations as a row dot product (one pass). The
    planes merge per channel by Chan's formula in float64. Memory is read once.

    ``gamma``, ``beta`` are (C,) in the stats dtype ``sd``.

    Below ``BN_TRAIN_FORWARD_MIN`` elements, :func:`_bn_train_small` (the general
    path's arithmetic, single-threaded).

    Returns (out, mean, var, invstd), out in x's dtype; or None -- the caller
    then uses the general path -- below ``BN_TRAIN_SMALL_MIN`` elements (its
    backward from the cached xhat is the faster one there), or when some
    channel's |mean| / std exceeds ``_MEAN_OVER_STD_MAX`` (the general path
    centres without rounding the mean first).

    Every memory layout of x gives the bits of its C-contiguous copy.
    """
    if x.size < BN_TRAIN_SMALL_MIN:
        return None
    if x.size < BN_TRAIN_FORWARD_MIN:
        return _bn_train_small(x, gamma, beta, eps, sd)
    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    P = H * W
    NC = N * C
    xr = x.reshape(NC, P)
    pivot = x[0, :, 0, 0].astype(sd)
    piv_rows = _rows(pivot, N)
    sum_p = np.empty(NC, sd)
    m2_p = np.empty(NC, sd)

    def stats(s, e, scr):
        n = e - s
        t = scr.get("t", P, sd)[:n * P].reshape(n, P)
        np.subtract(xr[s:e], piv_rows[s:e], out=t, dtype=sd)
        sums = np.add.reduce(t, axis=1)
        sum_p[s:e] = sums
        t -= (sums / P)[:, None]
        m2_p[s:e] = _row_dots(t, t)

    _run_blocks(NC, P * (x.dtype.itemsize + np.dtype(sd).itemsize), stats)
    mean_p = (sum_p / P).astype(np.float64).reshape(N, C)   # shifted plane means
    shift_mean = mean_p.mean(axis=0)
    m2 = m2_p.reshape(N, C).sum(axis=0) + P * np.square(mean_p - shift_mean).sum(axis=0)
    var = (m2 / (N * P)).astype(sd)
    mean = (pivot + shift_mean).astype(sd)
    invstd = (1 / np.sqrt(var + eps)).astype(sd)
    if np.any(np.abs(mean) * invstd > _MEAN_OVER_STD_MAX):
        return None
    out = _affine(x, mean, gamma * invstd, beta, sd, invstd)
    return out, mean, var, invstd


#: above this |mean| / std the rounding of the mean to the stats dtype would
#: show in x - mean (relative error ~ eps * ratio): such inputs take the general path
_MEAN_OVER_STD_MAX = 64.0


def _foldable(mean, invstd):
    """True when every channel's |mean| / std is at most ``_FOLD_MAX`` (False on NaN)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.all(np.abs(mean.astype(np.float64)) * invstd <= _FOLD_MAX))


def _affine(x, mean, scale, shift, sd, invstd):
    """(x - mean) * scale + shift per channel, by blocks; dtype of x.

    As x * scale + (shift - mean * scale) (two ufunc passes instead of three)
    when ``_foldable(mean, invstd)``."""
    N, C, H, W = x.shape
    P, NC = H * W, N * C
    xr = np.ascontiguousarray(x).reshape(NC, P)
    out = np.empty((NC, P), x.dtype)
    fold = _foldable(mean, invstd)
    if fold:
        shift = shift.astype(np.float64) - mean.astype(np.float64) * scale.astype(np.float64)
    m, a, b = _rows(mean, N), _rows(scale.astype(sd), N), _rows(shift.astype(sd), N)
    direct = np.dtype(sd) == x.dtype

    def work(s, e, scr):
        n = e - s
        t = out[s:e] if direct else scr.get("t", P, sd)[:n * P].reshape(n, P)
        if fold:
            np.multiply(xr[s:e], a[s:e], out=t, dtype=sd)
        else:
            np.subtract(xr[s:e], m[s:e], out=t, dtype=sd)
            t *= a[s:e]
        t += b[s:e]
        if not direct:
            np.copyto(out[s:e], t, casting="unsafe")

    _run_blocks(NC, P * (x.dtype.itemsize + np.dtype(sd).itemsize), work)
    return out.reshape(x.shape)


def bn_eval_forward(x, gamma, beta, mean, invstd, sd):
    """Spatial BN test-mode forward: (x - mean) * gamma * invstd + beta, dtype of x
    (by :func:`_bn_eval_small` below ``BN_EVAL_FORWARD_MIN`` elements), or None below
    ``BN_EVAL_SMALL_MIN`` elements: then the caller's general path runs."""
    if x.size < BN_EVAL_SMALL_MIN:
        return None
    if x.size < BN_EVAL_FORWARD_MIN:
        return _bn_eval_small(x, gamma, beta, mean, invstd, sd)
    return _affine(x, mean, gamma * invstd, beta, sd, invstd)


def _planes3(a):
    """C-contiguous (N, C, H*W) of a (N, C, H, W) array (so every layout gives the same bits)."""
    N, C, H, W = a.shape
    return np.ascontiguousarray(a).reshape(N, C, H * W)


def _channel_dots(a, b):
    """(N, C, P), (N, C, P) -> (C,): sum over n and p of a * b, as per-plane row dot
    products summed over N (the blocked path's order of operations)."""
    N, C, P = a.shape
    return _row_dots(a.reshape(N * C, P), b.reshape(N * C, P)).reshape(N, C).sum(axis=0)


def _bn_train_small(x, gamma, beta, eps, sd):
    """bn_train_forward single-threaded on the whole array, as the general path computes:
    shift by the pivot (each channel's first sample), subtract the shifted mean, M2 by row
    dot products; out = centred * (gamma * invstd) + beta."""
    x3 = _planes3(x)
    count = x3.shape[0] * x3.shape[2]
    pivot = x3[0, :, 0].astype(sd)
    t = np.subtract(x3, pivot[:, None], dtype=sd)
    shift_mean = (np.add.reduce(t, axis=(0, 2)) / count).astype(sd, copy=False)
    t -= shift_mean[:, None]
    var = (_channel_dots(t, t) / count).astype(sd, copy=False)
    mean = pivot + shift_mean
    invstd = (1 / np.sqrt(var + eps)).astype(sd, copy=False)
    t *= (gamma * invstd)[:, None]
    t += beta[:, None]
    return t.reshape(x.shape).astype(x.dtype, copy=False), mean, var, invstd


def _bn_eval_small(x, gamma, beta, mean, invstd, sd):
    """bn_eval_forward in three single-threaded ufunc passes: (x - mean) * scale + beta."""
    t = np.subtract(_planes3(x), mean[:, None], dtype=sd)
    t *= (gamma * invstd)[:, None]
    t += beta[:, None]
    return t.reshape(x.shape).astype(x.dtype, copy=False)


def _bn_backward_small(dout, x, gamma, mean, invstd, count, train, sd):
    """bn_backward single-threaded on the whole arrays: dbeta = sum(dout), dgamma =
    sum(dout * (x - mean)) * invstd by row dot products, then dx = scale * dout (test) or
    scale * dout + (x - mean) * k2 + k3 (train), k2 = -scale * invstd * dgamma / count,
    k3 = -scale * dbeta / count. In train mode where ``_foldable`` and all dtypes agree,
    without a centred copy, as the blocked path: sum(dout * x) - mean * sum(dout), and
    dx = scale * dout + x * k2 + (k3 - mean * k2); test mode always centres (one pass
    fewer than the folded train form, and no check of the fold's condition)."""
    x3 = _planes3(x)
    d3 = _planes3(dout)
    raw = train and x3.dtype == d3.dtype == np.dtype(sd) and _foldable(mean, invstd)
    if d3.dtype != sd:
        d3 = d3.astype(sd)
    dbeta = np.add.reduce(d3, axis=(0, 2))
    if raw:
        xc = x3
        dgamma = (_channel_dots(d3, x3).astype(np.float64)
                  - mean.astype(np.float64) * dbeta).astype(sd) * invstd
    else:
        xc = np.subtract(x3, mean[:, None], dtype=sd)
        dgamma = _channel_dots(d3, xc) * invstd
    scale = gamma * invstd
    dx = d3 * scale[:, None]
    if train:
        k2 = -scale * invstd * dgamma / count
        k3 = -scale * dbeta / count
        if raw:
            k3 = (k3.astype(np.float64) - mean.astype(np.float64) * k2.astype(np.float64))
        dx += np.multiply(xc, k2.astype(sd)[:, None], out=None if raw else xc)
        dx += k3.astype(sd)[:, None]
    return dx.reshape(dout.shape).astype(dout.dtype, copy=False), dgamma, dbeta


def bn_backward(dout, x, gamma, mean, invstd, count, train, sd):
    """Spatial BN backward from x itself (no normalized copy in the cache).

    Per plane, on blocks in cache: sum(dout) and sum(dout * (x - mean)), the
    latter as sum(dout * x) - mean * sum(dout) (one row dot product, no centred
    copy) when ``_foldable`` and all dtypes agree; merged per channel. Then dx = scale * dout + (x - mean) * k2
    + k3 (train; as scale * dout + x * k2 + (k3 - mean * k2) when
    ``_foldable``) or scale * dout (test), with scale = gamma * invstd.

    Below ``BN_BACKWARD_MIN`` (train) or ``BN_EVAL_BACKWARD_MIN`` (test)
    elements, :func:`_bn_backward_small`. Every memory layout of x and dout
    gives the bits of their C-contiguous copies.

    Returns (dx in dout's dtype, dgamma, dbeta in ``sd``).
    """
    if x.size < (BN_BACKWARD_MIN if train else BN_EVAL_BACKWARD_MIN):
        return _bn_backward_small(dout, x, gamma, mean, invstd, count, train, sd)
    N, C, H, W = x.shape
    P, NC = H * W, N * C
    xr = np.ascontiguousarray(x).reshape(NC, P)
    dr = np.ascontiguousarray(dout).reshape(NC, P)
    m = _rows(mean, N)
    db_p = np.empty(NC, sd)
    dg_p = np.empty(NC, sd)
    item = x.dtype.itemsize + dout.dtype.itemsize + np.dtype(sd).itemsize
    fold = _foldable(mean, invstd)
    raw = fold and x.dtype == dout.dtype == np.dtype(sd)

    def sums(s, e, scr):
        n = e - s
        if raw:  # sum(dout * x), corrected by mean * sum(dout) below: no centred copy
            dg_p[s:e] = _row_dots(xr[s:e], dr[s:e])
            np.add.reduce(dr[s:e], axis=1, out=db_p[s:e])
            return
        t = scr.get("t", P, sd)[:n * P].reshape(n, P)
        np.add.reduce(dr[s:e], axis=1, dtype=sd, out=db_p[s:e])
        np.subtract(xr[s:e], m[s:e], out=t, dtype=sd)
        np.multiply(t, dr[s:e], out=t, dtype=sd)
        np.add.reduce(t, axis=1, out=dg_p[s:e])

    _run_blocks(NC, P * item, sums)
    if raw:
        dg_p = (dg_p.reshape(N, C) - mean.astype(np.float64) * db_p.reshape(N, C)).astype(sd)
    dbeta = db_p.reshape(N, C).sum(axis=0)
    dgamma = dg_p.reshape(N, C).sum(axis=0) * invstd
    scale = gamma * invstd
    a = _rows(scale, N)
    fold = fold and train
    if train:
        k2c = -scale * invstd * dgamma / count
        k3c = -scale * dbeta / count
        if fold:
            k3c = k3c.astype(np.float64) - mean.astype(np.float64) * k2c.astype(np.float64)
        k2, k3 = _rows(k2c.astype(sd), N), _rows(k3c.astype(sd), N)
    dx = np.empty((NC, P), dout.dtype)
    direct = np.dtype(sd) == dout.dtype

    def grad(s, e, scr):
        n = e - s
        o = dx[s:e] if direct else scr.get("o", P, sd)[:n * P].reshape(n, P)
        np.multiply(dr[s:e], a[s:e], out=o, dtype=sd)
        if train:
            t = scr.get("t", P, sd)[:n * P].reshape(n, P)
            if fold:
                np.multiply(xr[s:e], k2[s:e], out=t, dtype=sd)
            else:
                np.subtract(xr[s:e], m[s:e], out=t, dtype=sd)
                t *= k2[s:e]
            o += t
            o += k3[s:e]
        if not direct:
            np.copyto(dx[s:e], o, casting="unsafe")

    _run_blocks(NC, P * (item + np.dtype(sd).itemsize), grad)
    return dx.reshape(dout.shape), dgamma, dbeta
