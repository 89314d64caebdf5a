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
  (backward sums in the same tap order).

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

__all__ = ["max_pool_forward", "max_pool_backward", "bn_train_forward", "bn_eval_forward",
           "bn_backward", "num_threads", "BLOCK_BYTES"]

#: target bytes of one block's intermediates (measured best on a 2-core EPYC, 1 MiB L2, 32 MiB L3)
BLOCK_BYTES = int(os.environ.get("GPULAYERS_BLOCK_BYTES", 1 << 21))

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
    blocks holding NaN or -inf. Returns (out, offsets) like it.
    """
    if geom.dh != 1 or geom.dw != 1:
        return None
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
    acc = np.float32 if x.dtype == np.float16 else x.dtype

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
        total = np.add.reduce(ob.reshape(-1), dtype=acc)
        if not np.isfinite(total) and (np.isnan(ob).any() or (ob == -np.inf).any()):
            gb = dataclasses.replace(geom, N=n, C=1)
            o2, f2 = general(xr[s:e].reshape(n, 1, H, W), gb)
            ob[...] = o2.reshape(n, Ho, Wo)
            fb[...] = f2.reshape(n, Ho, Wo)

    _run_blocks(NC, per_plane, work)
    return out.reshape(geom.output_shape), off.reshape(geom.output_shape)


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
    """
    N, C, H, W = geom.input_shape
    kh, kw, sh, sw, dh, dw = geom.kh, geom.kw, geom.sh, geom.sw, geom.dh, geom.dw
    Ho, Wo = geom.Ho, geom.Wo
    NC, P, Q = N * C, H * W, Ho * Wo
    dr = np.ascontiguousarray(dout).reshape(NC, Q)
    fr = np.ascontiguousarray(offsets).reshape(NC, Q)
    odt = fr.dtype
    acc = np.dtype(np.float32) if dout.dtype == np.float16 else dout.dtype
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

    Returns (out, mean, var, invstd), out in x's dtype; or None when some
    channel's |mean| / std exceeds ``_MEAN_OVER_STD_MAX`` (the caller then
    uses the general path, which centres without rounding the mean first).
    """
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
    """Spatial BN test-mode forward: (x - mean) * gamma * invstd + beta."""
    return _affine(x, mean, gamma * invstd, beta, sd, invstd)


def bn_backward(dout, x, gamma, mean, invstd, count, train, sd):
    """Spatial BN backward from x itself (no normalized copy in the cache).

    Per plane, on blocks in cache: sum(dout) and sum(dout * (x - mean)), the
    latter as sum(dout * x) - mean * sum(dout) (one row dot product, no centred
    copy) when ``_foldable`` and all dtypes agree; merged per channel. Then dx = scale * dout + (x - mean) * k2
    + k3 (train; as scale * dout + x * k2 + (k3 - mean * k2) when
    ``_foldable``) or scale * dout (test), with scale = gamma * invstd.

    Returns (dx in dout's dtype, dgamma, dbeta in ``sd``).
    """
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
