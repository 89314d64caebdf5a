"""Max, average and sum pooling as compiled CPU loop kernels (numba), forward and backward:
every rank as one (D, H, W) traversal with size-1 leading axes (kernel 1, stride 1, no
padding, as gpulayers/cuda/pool_nd.cu does), both memory layouts, padding, dilation and
ceil_mode (whatever PoolGeometry describes).

Arrays reach the kernels C-contiguous and four-dimensional, (outer, D, H, W*C), the CUDA
kernels' layout functor made concrete:

- channels-first (N, C, *spatial): outer = the N*C planes, C = 1;
- channels-last (N, *spatial, C): outer = the N samples, C lanes, channel fastest. PyTorch's
  channels_last memory format arrives as its channels-last internal view (pooling's
  ``_internal``), which is C-contiguous already: no copy.

A row ``a[o, d, h]`` holds W positions of C lanes; position w, lane c is ``w*C + c``.
Geometry goes in as one int64 vector (:func:`geometry_vector`), never as compile-time
constants, so each kernel compiles once per dtype (and offset dtype). Work is split into
``n_chunks`` contiguous ranges of items (one ``prange`` iteration each, with its own
scratch); every item is computed by one thread in a fixed order and no two items write one
element, so results depend neither on the chunking nor on the thread count.

Semantics, bit for bit those of pooling's general xp paths:

- max forward: taps in row-major order with ``take = v > best or isnan(v)`` from -inf and
  the first in-range tap's offset: the first maximum, the last NaN, an all -inf window -inf
  with its first in-range element; the output is the argmax element's bits. The
  channels-first kernel takes the maximum axis by axis (W, then H, then D, each pass with
  the same rule, carrying the later axes' offsets), which finds the same element: the
  row-major first maximum (last NaN) of a box is the first (last) over the slower axis of
  the faster axes' ones;
- max backward: every input element adds, from +0, the dout of each window whose offset
  names it, in ascending compact offset (the general path's tap order);
- avg / sum forward: ``sum_tw(sum_th(sum_td x))`` over the in-range taps, each level from
  +0 in tap order (the general path's separable passes, first axis first), then divided by
  the divisor in the array's dtype; backward ``sum_td(sum_th(sum_tw dout / divisor))`` over
  the covering windows in ascending tap order (its passes, last axis first). A level over a
  size-1 axis is skipped: ``0 + s`` then changes only the sign of a zero s, and a -0 term
  added to a sum that started at +0 leaves its bits unchanged.

Speed (measured 2026-12-01 on the 2-core AMD EPYC, numba 0.68.1, float32):

- inner loops index with unsigned integers: numba then drops its negative-index wraparound
  branch, which otherwise keeps LLVM from vectorising them (the max rule on a row of 2000:
  1.4 ns per element signed, 0.16 unsigned);
- a select in a short or strided loop becomes a data-dependent branch: a per-row max-pool
  forward over channels-first (32, 64, 56, 56), 3x3/2, took 46 ms on one thread, the flat
  per-plane passes of :func:`max_forward_planes` 5 ms. The channels-first sums and the
  channels-first max backward are flat per plane for the same reason;
- the long flat loops read shifted views (``v = a[s:]``, then ``v[u]``), which vectorise
  where ``a[s + u]`` did not (an expanded-row max backward: 9.5 vs 4.5 us a row of 4096);
  the short per-position lane loops of the channels-last kernels keep index arithmetic,
  since a view costs more there than it saves (max 3x3/2 on (32, 56, 56, 64): 2.6 vs
  3.1 ms);
- small inputs (PARALLEL_MIN) run serially on the calling thread.

dtypes: float32 and float64; float16 and bfloat16 max-pool forwards read their uint16 bit
patterns and compare the exact float32 values from a 65536-entry table, writing the argmax
element's bits. Sums of 16-bit data (avg, sum, max backward) run on float32 copies that the
launchers make and round back, the general path's own conversions: the same bits.
"""
from __future__ import annotations

import functools

import numpy as np

from . import kernel, threads

prange = range   # numba.prange at compile time (gpulayers.cpu_kernels.kernel)
U = np.uint64    # unsigned loop indices (see the module docstring)

#: what the geometry vector holds, in order (leading axes padded to 3; C = lanes)
GEOMETRY_FIELDS = ("D", "H", "W", "Do", "Ho", "Wo", "kd", "kh", "kw", "sd", "sh", "sw",
                   "pd", "ph", "pw", "dd", "dh", "dw", "C")


@functools.lru_cache(maxsize=1024)
def geometry_vector(geom, lanes):
    """int64 (19,) vector (read-only; fields GEOMETRY_FIELDS) of a PoolGeometry padded to
    3 axes (leading axes of size 1, kernel 1, stride 1, no pad, dilation 1), then ``lanes``
    (C for channels-last, 1 otherwise)."""
    pad = 3 - geom.d
    one = (1,) * pad
    size, out = one + tuple(geom.size), one + tuple(geom.out)
    kern, stride = one + tuple(geom.kernel), one + tuple(geom.stride)
    pads, dil = (0,) * pad + tuple(geom.pad), one + tuple(geom.dilation)
    g = np.array(size + out + kern + stride + pads + dil + (lanes,), dtype=np.int64)
    g.flags.writeable = False
    return g


# ------------------------------------------------------------------ serial helpers
# Plain loop functions the kernels call (compiled before their first caller, which sees
# their numba dispatchers: gpulayers.cpu_kernels' kernels calling kernels). The ``*_items``
# ones are each parallel kernel's work on a range of items: the launchers call them
# directly, on the calling thread, for small inputs (PARALLEL_MIN).


def _helper(fn=None, **options):
    """``@_helper`` (or ``@_helper(inline="always")`` for the small ones numba should inline
    into their callers): a serial kernel."""
    return kernel(fn, parallel=False, **options) if fn is not None else (
        lambda f: kernel(f, parallel=False, **options))


@_helper(inline="always")
def _first_tap(start, size, k, dil):
    """First tap t < k of a window starting at ``start`` whose position start + t*dil lies
    in [0, size); k when none does (gpulayers.shapes' first-valid rule)."""
    for t in range(k):
        if 0 <= start + t * dil < size:
            return t
    return k


@_helper(inline="always")
def _span(q, stride, n_in, n_out):
    """(lo, hi): the windows o in [0, n_out) whose position o*stride - q lies in [0, n_in)."""
    lo = 0 if q <= 0 else (q + stride - 1) // stride
    hi = 0 if n_in - 1 + q < 0 else min(n_out, (n_in - 1 + q) // stride + 1)
    return lo, max(lo, hi)


@_helper(inline="always")
def _cover(pos, pad, tap, stride, n_out):
    """The window o in [0, n_out) whose tap at distance ``tap`` (t*dilation) is position
    ``pos`` (o*stride - pad + tap == pos), or -1; -2 once no later (larger) tap can have one."""
    r = pos + pad - tap
    if r < 0:
        return -2
    o = r // stride
    return o if r - o * stride == 0 and o < n_out else -1


@_helper
def _max_pass(src, sarg, dst, darg, n, k, shift, kstep):
    """dst[u], darg[u] = the first maximum (last NaN) over taps t < k of src[u + t*shift]
    and its offset t*kstep + sarg[u + t*shift], for u < n."""
    for u in range(U(n)):
        dst[u] = src[u]
        darg[u] = sarg[u]
    for t in range(1, k):
        ss, sa = src[t * shift:], sarg[t * shift:]   # views indexed from 0 (module docstring)
        kt = darg.dtype.type(t * kstep)
        for u in range(U(n)):
            v = ss[u]
            a = sa[u]
            b = dst[u]
            take = (v > b) | (v != v)
            dst[u] = v if take else b
            darg[u] = kt + a if take else darg[u]


@_helper
def _max_pass_first(src, dst, darg, n, k, shift):
    """_max_pass of the first axis: the offsets are the taps t themselves."""
    s0 = darg.dtype.type(0)
    for u in range(U(n)):
        dst[u] = src[u]
        darg[u] = s0
    for t in range(1, k):
        ss = src[t * shift:]
        kt = darg.dtype.type(t)
        for u in range(U(n)):
            v = ss[u]
            b = dst[u]
            take = (v > b) | (v != v)
            dst[u] = v if take else b
            darg[u] = kt if take else darg[u]


# ------------------------------------------------------------------ max pooling forward

@_helper
def _max_forward_planes_items(x, out, off, g, band_rows, lut, pos_lut, work, lo, hi):
    """Items [lo, hi) of max_forward_planes (one chunk, serial)."""
    D, H, W, Do, Ho, Wo = g[0], g[1], g[2], g[3], g[4], g[5]
    kd, kh, kw, sd, sh, sw = g[6], g[7], g[8], g[9], g[10], g[11]
    pd, ph, pw, dd, dh, dw = g[12], g[13], g[14], g[15], g[16], g[17]
    n_bands = (Ho + band_rows - 1) // band_rows
    Wp = (Wo - 1) * sw + (kw - 1) * dw + 1             # padded columns the windows read
    M = ((band_rows - 1) * sh + (kh - 1) * dh + 1) * Wp
    tail = (kw - 1) * dw                               # the W pass reads past the last row
    A = np.empty(M + tail, work.dtype)
    ninf = work.dtype.type(-np.inf)
    Bv, Ba = np.empty(M, A.dtype), np.empty(M, off.dtype)
    Cv, Ca = np.empty(M, A.dtype), np.empty(M, off.dtype)
    Dv, Da = np.empty(M, A.dtype), np.empty(M, off.dtype)
    for j in range(U(M), U(M + tail)):
        A[j] = ninf
    for it in range(lo, hi):
        p, od, b = it // (Do * n_bands), (it // n_bands) % Do, it % n_bands
        oh0 = b * band_rows
        rows = min(band_rows, Ho - oh0)
        hb = (rows - 1) * sh + (kh - 1) * dh + 1
        n2 = (hb - (kh - 1) * dh) * Wp
        j0, j1 = min(pw, Wp), max(min(pw, Wp), min(Wp, pw + W))
        first = -1
        for td in range(kd):
            i_d = od * sd - pd + td * dd
            if i_d < 0 or i_d >= D:
                continue
            for r in range(hb):
                ih = oh0 * sh - ph + r
                a0 = U(r * Wp)
                if ih < 0 or ih >= H:
                    for j in range(U(Wp)):
                        A[a0 + j] = ninf
                    continue
                for j in range(U(j0)):
                    A[a0 + j] = ninf
                xs = x[p, i_d, ih]
                if lut is None:
                    for j in range(U(j1 - j0)):
                        A[a0 + U(j0) + j] = xs[j]
                else:
                    for j in range(U(j1 - j0)):
                        A[a0 + U(j0) + j] = lut[xs[j]]
                for j in range(U(j1), U(Wp)):
                    A[a0 + j] = ninf
            _max_pass_first(A, Bv, Ba, hb * Wp, kw, dw)
            if first < 0:
                _max_pass(Bv, Ba, Dv if kd > 1 else Cv, Da if kd > 1 else Ca,
                          n2, kh, dh * Wp, kw)
                if kd > 1:
                    kt = off.dtype.type(td * kh * kw)
                    for u in range(U(n2)):
                        Da[u] += kt
                first = td
                continue
            _max_pass(Bv, Ba, Cv, Ca, n2, kh, dh * Wp, kw)
            kt = off.dtype.type(td * kh * kw)
            for u in range(U(n2)):
                v = Cv[u]
                bb = Dv[u]
                take = (v > bb) | (v != v)
                Dv[u] = v if take else bb
                Da[u] = kt + Ca[u] if take else Da[u]
        Rv, Ra = (Dv, Da) if kd > 1 else (Cv, Ca)
        d0 = od * sd - pd
        xf = x[p].reshape(-1)
        for i in range(rows):
            oh = oh0 + i
            h0 = oh * sh - ph
            orow, frow = out[p, od, oh], off[p, od, oh]
            r0 = U(i * sh * Wp)
            kdh = (first * kh + _first_tap(h0, H, kh, dh)) * kw
            for ow in range(Wo):
                u = r0 + U(ow * sw)
                v = Rv[u]
                t = Ra[u]
                if v == ninf:
                    t = kdh + _first_tap(ow * sw - pw, W, kw, dw)
                frow[ow] = t
                if lut is None:
                    orow[ow] = v
                else:
                    orow[ow] = xf[U((d0 * H + h0) * W + ow * sw - pw + pos_lut[U(t)])]


@kernel
def max_forward_planes(x, out, off, g, band_rows, lut, pos_lut, work, n_chunks):
    """Channels-first max pooling (C = 1), one item = one band of ``band_rows`` output rows
    of one output depth od of one plane; x (outer, D, H, W), out and off (outer, Do, Ho, Wo).

    Per in-range depth tap td (ascending): the band's input rows are copied into a padded
    buffer A (-inf outside x; 16-bit patterns through ``lut`` to float32), then flat passes
    over every padded position: W (taps tw, shift tw*dw), H (taps th, shift th*dh rows),
    and over the depth taps a running combine; all with the max rule (module docstring).
    The outputs are read off at rows oh*sh, columns ow*sw. A -inf output keeps its window's
    first in-range offset (its padded cells are -inf too, but never in range). With ``lut``
    (uint16 x and out) the output is the bit pattern at the argmax, via ``pos_lut`` (each
    offset's distance in x from the window's first position)."""
    items = x.shape[0] * g[3] * ((g[4] + band_rows - 1) // band_rows)
    for chunk in prange(n_chunks):
        _max_forward_planes_items(x, out, off, g, band_rows, lut, pos_lut, work,
                                  chunk * items // n_chunks, (chunk + 1) * items // n_chunks)


@_helper
def _max_forward_lanes_items(x, out, off, g, lut, ninf_bits, work, lo, hi):
    """Items [lo, hi) of max_forward_lanes (one chunk, serial)."""
    D, H, W, Do, Ho, Wo = g[0], g[1], g[2], g[3], g[4], g[5]
    kd, kh, kw, sd, sh, sw = g[6], g[7], g[8], g[9], g[10], g[11]
    pd, ph, pw, dd, dh, dw, C = g[12], g[13], g[14], g[15], g[16], g[17], g[18]
    best = np.empty(0 if lut is None else Wo * C, work.dtype)
    for it in range(lo, hi):
        o, od, oh = it // (Do * Ho), (it // Ho) % Do, it % Ho
        orow, frow = out[o, od, oh], off[o, od, oh]
        d0, h0 = od * sd - pd, oh * sh - ph
        kdh = (_first_tap(d0, D, kd, dd) * kh + _first_tap(h0, H, kh, dh)) * kw
        for ow in range(Wo):
            k0 = off.dtype.type(kdh + _first_tap(ow * sw - pw, W, kw, dw))
            ob = U(ow * C)
            for c in range(U(C)):
                frow[ob + c] = k0
                if lut is None:
                    orow[ob + c] = -np.inf
                else:
                    best[ob + c] = -np.inf
                    orow[ob + c] = ninf_bits
        for td in range(kd):
            i_d = d0 + td * dd
            if i_d < 0 or i_d >= D:
                continue
            for th in range(kh):
                ih = h0 + th * dh
                if ih < 0 or ih >= H:
                    continue
                xrow = x[o, i_d, ih]
                for tw in range(kw):
                    kk = off.dtype.type((td * kh + th) * kw + tw)
                    w0, w1 = _span(pw - tw * dw, sw, W, Wo)
                    for ow in range(w0, w1):
                        xb, ob = U((ow * sw - pw + tw * dw) * C), U(ow * C)
                        if lut is None:
                            for c in range(U(C)):
                                v = xrow[xb + c]
                                b = orow[ob + c]
                                take = (v > b) | (v != v)
                                orow[ob + c] = v if take else b
                                frow[ob + c] = kk if take else frow[ob + c]
                        else:
                            for c in range(U(C)):
                                bits = xrow[xb + c]
                                v = lut[bits]
                                b = best[ob + c]
                                take = (v > b) | (v != v)
                                best[ob + c] = v if take else b
                                orow[ob + c] = bits if take else orow[ob + c]
                                frow[ob + c] = kk if take else frow[ob + c]


@kernel
def max_forward_lanes(x, out, off, g, lut, ninf_bits, work, n_chunks):
    """Channels-last max pooling, one item = one output row (o, od, oh): out and off
    (outer, Do, Ho, Wo*C) from x (outer, D, H, W*C). The row starts at -inf with each
    window's first in-range offset; then every tap (td, th, tw) in row-major order updates
    the windows whose tap is in range, lane by lane (the innermost, contiguous loop), with
    the max rule. With ``lut`` x and out are uint16 patterns: values compared as the table's
    float32 (the best kept in a scratch row), the winner's pattern written (``ninf_bits``,
    the pattern of -inf, where none is)."""
    rows = x.shape[0] * g[3] * g[4]
    for chunk in prange(n_chunks):
        _max_forward_lanes_items(x, out, off, g, lut, ninf_bits, work,
                                 chunk * rows // n_chunks, (chunk + 1) * rows // n_chunks)


# ----------------------------------------------------------------- max pooling backward

@_helper
def _max_backward_planes_items(dout, off, dx, g, pos_lut, lo, hi):
    """Items [lo, hi) of max_backward_planes (one chunk, serial)."""
    D, H, W, Do, Ho, Wo = g[0], g[1], g[2], g[3], g[4], g[5]
    sd, sh, sw, pd, ph, pw = g[9], g[10], g[11], g[12], g[13], g[14]
    P = D * H * W
    zero = dx.dtype.type(0)
    for p in range(lo, hi):
        plane, drow, frow = dx[p], dout[p], off[p]
        for j in range(U(P)):
            plane[j] = zero
        for od in range(Do - 1, -1, -1):
            for oh in range(Ho - 1, -1, -1):
                row = ((od * sd - pd) * H + oh * sh - ph) * W - pw
                q = (od * Ho + oh) * Wo
                for ow in range(Wo - 1, -1, -1):
                    at = row + ow * sw + pos_lut[U(frow[U(q + ow)])]
                    if U(at) < U(P):   # always, for offsets made by the forward pass
                        plane[U(at)] += drow[U(q + ow)]


@kernel
def max_backward_planes(dout, off, dx, g, pos_lut, n_chunks):
    """Channels-first dx of max pooling, one item = one plane: dx (outer, D*H*W) from dout
    and off (outer, Do*Ho*Wo). The plane starts at +0; then every window, in descending
    row-major order, adds its dout at its argmax (window start + ``pos_lut[offset]``).
    Two windows holding one element see it at taps that grow as the window index falls, so
    each element sums its contributions in ascending tap order, as the general path."""
    items = dx.shape[0]
    for chunk in prange(n_chunks):
        _max_backward_planes_items(dout, off, dx, g, pos_lut,
                                   chunk * items // n_chunks, (chunk + 1) * items // n_chunks)


@_helper
def _max_backward_lanes_items(dout, off, dx, g, lo, hi):
    """Items [lo, hi) of max_backward_lanes (one chunk, serial)."""
    D, H, W, Do, Ho, Wo = g[0], g[1], g[2], g[3], g[4], g[5]
    kd, kh, kw, sd, sh, sw = g[6], g[7], g[8], g[9], g[10], g[11]
    pd, ph, pw, dd, dh, dw, C = g[12], g[13], g[14], g[15], g[16], g[17], g[18]
    zero = dx.dtype.type(0)
    for it in range(lo, hi):
        o, i_d, ih = it // (D * H), (it // H) % D, it % H
        xrow = dx[o, i_d, ih]
        for j in range(U(W * C)):
            xrow[j] = zero
        for td in range(kd):
            od = _cover(i_d, pd, td * dd, sd, Do)
            if od == -2:
                break
            if od < 0:
                continue
            for th in range(kh):
                oh = _cover(ih, ph, th * dh, sh, Ho)
                if oh == -2:
                    break
                if oh < 0:
                    continue
                drow, frow = dout[o, od, oh], off[o, od, oh]
                for tw in range(kw):
                    kk = off.dtype.type((td * kh + th) * kw + tw)
                    w0, w1 = _span(pw - tw * dw, sw, W, Wo)
                    for ow in range(w0, w1):
                        xb, ob = U((ow * sw - pw + tw * dw) * C), U(ow * C)
                        for c in range(U(C)):
                            v = drow[ob + c]   # loaded unconditionally: a select, vectorised
                            xrow[xb + c] += v if frow[ob + c] == kk else zero


@kernel
def max_backward_lanes(dout, off, dx, g, n_chunks):
    """Channels-last dx of max pooling, one item = one input row (o, i_d, ih): dx (outer,
    D, H, W*C) from dout and off (outer, Do, Ho, Wo*C). The row starts at +0; the output
    rows covering it are visited in ascending (td, th), each by ascending tw, lane by lane
    adding dout where the stored offset is that tap (+0 elsewhere, as the general path:
    no change to a sum that started at +0): ascending compact offset per element."""
    rows = dx.shape[0] * g[0] * g[1]
    for chunk in prange(n_chunks):
        _max_backward_lanes_items(dout, off, dx, g,
                                  chunk * rows // n_chunks, (chunk + 1) * rows // n_chunks)


# ------------------------------------------------------------ average and sum pooling

@_helper
def _sum_forward_items(x, out, div, g, divide, lo, hi):
    """Items [lo, hi) of sum_forward (one chunk, serial)."""
    D, H, W, Do, Ho, Wo = g[0], g[1], g[2], g[3], g[4], g[5]
    kd, kh, kw, sd, sh, sw = g[6], g[7], g[8], g[9], g[10], g[11]
    pd, ph, pw, C = g[12], g[13], g[14], g[18]
    zero = out.dtype.type(0)
    direct = kh == 1 and kd == 1    # no H or D level: the W level reads the x row itself
    col = np.empty(0 if direct else W * C, out.dtype)
    dsum = np.empty(0 if kd == 1 else W * C, out.dtype)
    for it in range(lo, hi):
        o, od, oh = it // (Do * Ho), (it // Ho) % Do, it % Ho
        d0, h0 = od * sd - pd, oh * sh - ph
        orow = out[o, od, oh]
        for j in range(U(Wo * C)):
            orow[j] = zero
        if direct:
            if 0 <= d0 < D and 0 <= h0 < H:
                _sum_w_level(x[o, d0, h0], orow, C, W, Wo, kw, sw, pw)
        else:
            _sum_hd_levels(x, o, d0, h0, col, dsum, C, D, H, kd, kh)
            _sum_w_level(col, orow, C, W, Wo, kw, sw, pw)
        if divide:
            drow = div[od, oh]
            for ow in range(Wo):
                ob = U(ow * C)
                for c in range(U(C)):
                    orow[ob + c] = orow[ob + c] / drow[ow]


@_helper
def _sum_hd_levels(x, o, d0, h0, col, dsum, C, D, H, kd, kh):
    """col = sum_th(sum_td x[o, d0 + td, h0 + th]) over the in-range taps, each level from
    +0 (the D level only when kd > 1), every lane of every position in one loop."""
    zero = col.dtype.type(0)
    WC = U(col.size)
    for j in range(WC):
        col[j] = zero
    for th in range(kh):
        ih = h0 + th
        if ih < 0 or ih >= H:
            continue
        if kd == 1:
            if 0 <= d0 < D:
                xrow = x[o, d0, ih]
                for j in range(WC):
                    col[j] += xrow[j]
            continue
        for j in range(WC):
            dsum[j] = zero
        for td in range(kd):
            if 0 <= d0 + td < D:
                xrow = x[o, d0 + td, ih]
                for j in range(WC):
                    dsum[j] += xrow[j]
        for j in range(WC):
            col[j] += dsum[j]


@_helper
def _sum_w_level(col, orow, C, W, Wo, kw, sw, pw):
    """orow (+0 already) += sum over tw of col at position ow*sw - pw + tw, tap by tap."""
    for tw in range(kw):
        w0, w1 = _span(pw - tw, sw, W, Wo)
        if C == 1:
            for ow in range(w0, w1):
                orow[U(ow)] += col[U(ow * sw - pw + tw)]
        else:
            for ow in range(w0, w1):
                xb, ob = U((ow * sw - pw + tw) * C), U(ow * C)
                for c in range(U(C)):
                    orow[ob + c] += col[xb + c]


@_helper
def _sum_forward_planes_items(x, out, div, g, divide, Hp, Pw, lo, hi):
    """Items [lo, hi) of sum_forward_planes (one chunk, serial)."""
    H, W, Ho, Wo = g[1], g[2], g[4], g[5]
    kh, kw, sh, sw, ph, pw = g[7], g[8], g[10], g[11], g[13], g[14]
    zero = out.dtype.type(0)
    rows = (Ho - 1) * sh + 1                  # padded rows where windows start
    A = np.zeros(Hp * Pw + Pw, out.dtype)     # zero padding around x, a row of slack
    S1 = np.empty(rows * Pw + Pw, out.dtype)
    S2 = np.empty(rows * Pw, out.dtype)
    n = U(rows * Pw)
    for p in range(lo, hi):
        plane = x[p, 0]
        for ih in range(H):
            a0 = U((ih + ph) * Pw + pw)
            for w in range(U(W)):
                A[a0 + w] = plane[ih, w]
        # H level (the first axis), then W level, over every padded row: flat loops
        for u in range(n):
            S1[u] = zero + A[u]
        for th in range(1, kh):
            a_s = A[th * Pw:]
            for u in range(n):
                S1[u] += a_s[u]
        for u in range(n):
            S2[u] = zero + S1[u]
        for tw in range(1, kw):
            s_s = S1[tw:]
            for u in range(n):
                S2[u] += s_s[u]
        orow = out[p, 0]
        for oh in range(Ho):
            s0 = oh * sh * Pw
            for ow in range(Wo):
                v = S2[U(s0 + ow * sw)]
                orow[oh, ow] = v / div[0, oh, ow] if divide else v


@kernel
def sum_forward_planes(x, out, div, g, divide, Hp, Pw, n_chunks):
    """Channels-first window sums without a depth axis (1-D and 2-D), one item = one plane:
    out (outer, 1, Ho, Wo) from x (outer, 1, H, W), the sums of sum_forward in flat loops:
    x copied into a zero-padded plane (row pitch Pw), the H level (kh row shifts) and then
    the W level (kw column shifts) over every padded row, each from +0 in tap order (the
    zeros of the padding add nothing to a sum from +0); window (oh, ow) is read off at row
    oh*sh, column ow*sw, and divided by ``div`` when ``divide``."""
    for chunk in prange(n_chunks):
        _sum_forward_planes_items(x, out, div, g, divide, Hp, Pw,
                                  chunk * x.shape[0] // n_chunks,
                                  (chunk + 1) * x.shape[0] // n_chunks)


@kernel
def sum_forward(x, out, div, g, divide, n_chunks):
    """Window sums, one item = one output row (o, od, oh): out (outer, Do, Ho, Wo*C) from x
    (outer, D, H, W*C), divided by ``div`` (Do, Ho, Wo, x's dtype) when ``divide``.

    col = sum_th(sum_td x) over the row's in-range taps (a D level only when kd > 1; the x
    row itself when kh = kd = 1), each lane of every position in one contiguous loop; then
    out = sum_tw col[ow*sw - pw + tw]; every level from +0 in tap order (module docstring).
    No dilation (avg pooling has none)."""
    rows = x.shape[0] * g[3] * g[4]
    for chunk in prange(n_chunks):
        _sum_forward_items(x, out, div, g, divide,
                           chunk * rows // n_chunks, (chunk + 1) * rows // n_chunks)


@_helper
def _sum_backward_items(dout, dx, div, g, divide, band_rows, lo, hi):
    """Items [lo, hi) of sum_backward (one chunk, serial)."""
    D, H, W, Do, Ho, Wo = g[0], g[1], g[2], g[3], g[4], g[5]
    kd, kh, kw, sd, sh, sw = g[6], g[7], g[8], g[9], g[10], g[11]
    pd, ph, pw, C = g[12], g[13], g[14], g[18]
    WC = W * C
    n_bands = (H + band_rows - 1) // band_rows
    n_oh = (band_rows + kh - 2) // sh + 2            # output rows that can cover one band
    Ep = max(W + pw + kw - 1, (Wo - 1) * sw + kw)    # positions of the expanded row E
    flat = D == 1 and Do == 1 and kd == 1            # no D level: H sums go straight to dx
    direct = flat and kh == 1 and sh == 1            # one output row per input row: W sums
    zero = dx.dtype.type(0)
    E = np.zeros(Ep * C, dx.dtype)
    wbuf = np.empty((0 if direct else n_oh, WC), dx.dtype)
    hbuf = np.empty((0 if flat else Do, band_rows, WC), dx.dtype)
    for it in range(lo, hi):
        o, b = it // n_bands, it % n_bands
        ih0 = b * band_rows
        rows = min(band_rows, H - ih0)
        oh_lo = max(0, (ih0 + ph - kh + 1 + sh - 1) // sh)
        oh_hi = min(Ho - 1, (ih0 + rows - 1 + ph) // sh)
        for od in range(Do):
            for oh in range(oh_lo, oh_hi + 1):
                # E: this output row's dout / divisor at positions ow*sw (+ kw - 1), zeros
                # between; then W level: wrow[w] = sum over tw of E[w + pw - tw + kw - 1]
                drow = dout[o, od, oh]
                for ow in range(Wo):
                    eb, ob = U((ow * sw + kw - 1) * C), U(ow * C)
                    if divide:
                        q = div[od, oh, ow]
                        for c in range(U(C)):
                            E[eb + c] = drow[ob + c] / q
                    else:
                        for c in range(U(C)):
                            E[eb + c] = drow[ob + c]
                wrow = dx[o, 0, oh * sh - ph] if direct else wbuf[oh - oh_lo]
                for j in range(U(WC)):
                    wrow[j] = zero
                for tw in range(kw):
                    es = E[(pw - tw + kw - 1) * C:]   # a view: the loop indexes from 0
                    for j in range(U(WC)):
                        wrow[j] += es[j]
            if direct:
                continue
            # H level: every input row of the band sums its covering rows, ascending th
            for i in range(rows):
                ih = ih0 + i
                hrow = dx[o, 0, ih] if flat else hbuf[od, i]
                for j in range(U(WC)):
                    hrow[j] = zero
                for th in range(kh):
                    oh = _cover(ih, ph, th, sh, Ho)
                    if oh == -2:
                        break
                    if oh >= 0:
                        wrow = wbuf[oh - oh_lo]
                        for j in range(U(WC)):
                            hrow[j] += wrow[j]
        if flat:
            continue
        # D level: dx[i_d] = sum over td of the H sums of the covering output depth
        for i_d in range(D):
            for i in range(rows):
                xrow = dx[o, i_d, ih0 + i]
                for j in range(U(WC)):
                    xrow[j] = zero
                for td in range(kd):
                    od = _cover(i_d, pd, td, sd, Do)
                    if od == -2:
                        break
                    if od >= 0:
                        hrow = hbuf[od, i]
                        for j in range(U(WC)):
                            xrow[j] += hrow[j]


@_helper
def _sum_backward_planes_items(dout, dx, div, g, divide, Hp, Pw, lo, hi):
    """Items [lo, hi) of sum_backward_planes (one chunk, serial)."""
    H, W, Ho, Wo = g[1], g[2], g[4], g[5]
    kh, kw, sh, sw, ph, pw = g[7], g[8], g[10], g[11], g[13], g[14]
    zero = dx.dtype.type(0)
    E = np.zeros((Hp + 1) * Pw, dx.dtype)     # a row of slack: the W level reads past the end
    B1 = np.empty(Hp * Pw, dx.dtype)
    B2 = np.empty(H * Pw, dx.dtype)
    n1, n2 = U(Hp * Pw), U(H * Pw)
    for p in range(lo, hi):
        drow = dout[p, 0]
        for oh in range(Ho):
            e0 = (oh * sh + kh - 1) * Pw + kw - 1
            for ow in range(Wo):
                q = drow[oh, ow] / div[0, oh, ow] if divide else drow[oh, ow]
                E[U(e0 + ow * sw)] = q
        # W level over every expanded row, then H level over every input row: flat loops
        es = E[pw + kw - 1:]
        for u in range(n1):
            B1[u] = zero + es[u]
        for tw in range(1, kw):
            es = E[pw - tw + kw - 1:]
            for u in range(n1):
                B1[u] += es[u]
        bs = B1[(ph + kh - 1) * Pw:]
        for u in range(n2):
            B2[u] = zero + bs[u]
        for th in range(1, kh):
            bs = B1[(ph - th + kh - 1) * Pw:]
            for u in range(n2):
                B2[u] += bs[u]
        plane = dx[p, 0]
        for ih in range(H):
            b0 = U(ih * Pw)
            for w in range(U(W)):
                plane[ih, w] = B2[b0 + w]


@kernel
def sum_backward_planes(dout, dx, div, g, divide, Hp, Pw, n_chunks):
    """Channels-first dx of the window sums without a depth axis (1-D and 2-D), one item =
    one plane: dx (outer, 1, H, W) from dout (outer, 1, Ho, Wo), the sums of sum_backward in
    flat loops over the whole plane. The quotients dout / div go to an expanded plane E
    (window (oh, ow) at row oh*sh + kh - 1, column ow*sw + kw - 1, zeros elsewhere, row
    pitch Pw); the W level sums kw column shifts of E over every row, the H level kh row
    shifts of that over every input row, each from +0 in ascending tap order (a zero added
    to a sum from +0 leaves it as it is), then the W columns of each row go to dx."""
    for chunk in prange(n_chunks):
        _sum_backward_planes_items(dout, dx, div, g, divide, Hp, Pw,
                                   chunk * dx.shape[0] // n_chunks,
                                   (chunk + 1) * dx.shape[0] // n_chunks)


@kernel
def sum_backward(dout, dx, div, g, divide, band_rows, n_chunks):
    """dx of the window sums (of dout / ``div`` when ``divide``), one item = one band of
    ``band_rows`` input rows (every depth) of one plane or sample: dx (outer, D, H, W*C) from
    dout (outer, Do, Ho, Wo*C); no dilation (avg pooling has none).

    dx = sum_td(sum_th(sum_tw dout / div)) over the covering windows in ascending tap order,
    the quotient rounded once per window, each level from +0: per output depth, the W level
    of every output row covering the band (its quotients spread at their positions with
    zeros between, then kw contiguous shifted adds: the zeros leave a sum from +0 as it
    is), the H level per input row; then the D level per input depth (skipped without a
    depth axis)."""
    items = dx.shape[0] * ((g[1] + band_rows - 1) // band_rows)
    for chunk in prange(n_chunks):
        _sum_backward_items(dout, dx, div, g, divide, band_rows,
                            chunk * items // n_chunks, (chunk + 1) * items // n_chunks)


# ------------------------------------------------------------------------- launchers

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_BITS16 = ("float16", "bfloat16")
_LUTS = {}

#: the scratch size unit of the band and plane kernels (max_forward_planes: six buffers
#: of at most this; the sums' and max backward's plane or band buffers: 4-8 of it), so
#: that one thread's buffers fit its core's L2 cache (1 MiB here); not tuned
BAND_BYTES = 1 << 16

#: below this many elements (input plus output) a kernel runs serially in the calling
#: thread: a parallel region costs more than it saves there (and waits for a thread that
#: another process keeps off its core). Measured 2026-12-01, 2-core AMD EPYC, numba 0.68.1,
#: float32, load average 0.8-1.3 (other sessions on the cores), two runs: public calls,
#: 3x3/2 pad 1 max and avg, forward and backward, both layouts, with this threshold at 0
#: against infinity, alternating rounds (31-101), medians: parallel / serial 0.87-1.63 at
#: 15680 elements, 0.75-1.44 at 31360, 0.63-0.94 at 125440, 0.52-0.77 at 2007040.
PARALLEL_MIN = 1 << 16


def takes(dtype):
    """True when the kernels take arrays of ``dtype``: float32 and float64; float16 and
    bfloat16 (max-pool forward as bit patterns, the sums through float32 copies)."""
    dtype = np.dtype(dtype)
    return dtype in _FLOATS or dtype.name in _BITS16


def _lut(dtype):
    """float32 value of each of the 65536 bit patterns of a 16-bit float dtype (exact)."""
    lut = _LUTS.get(dtype)
    if lut is None:
        lut = _ro(np.arange(1 << 16, dtype=np.uint16).view(dtype).astype(np.float32))
        _LUTS[dtype] = lut
    return lut


def _launch(parallel, serial, items, size, *args):
    """Run a kernel over ``items`` items: ``serial(*args, 0, items)`` in this thread when
    ``size`` (elements touched) is below PARALLEL_MIN or one thread is allowed, else
    ``parallel(*args, n_chunks)`` on cpu_kernels.threads() threads (numba's count for this thread is
    set to it for the call when it differs), a few chunks per thread so a thread slowed by
    another process does fewer."""
    if items == 0:   # an empty batch (N or C = 0): nothing to compute
        return
    n = threads()
    if size < PARALLEL_MIN or items < 2 or n == 1:
        serial(*args, 0, items)
        return
    from . import _thread_count_calls
    get, put = _thread_count_calls()
    old = get()
    if old == n:
        parallel(*args, min(items, 8 * n))
        return
    put(n)
    try:
        parallel(*args, min(items, 8 * n))
    finally:
        put(old)


def _ro(a):
    """``a`` as a read-only view (itself when read-only already): kernel inputs are always
    read-only, so a writable and a read-only caller's array share one compiled version."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def _internal_shape(shape_cf, cl):
    return (shape_cf[0],) + tuple(shape_cf[2:]) + (shape_cf[1],) if cl else tuple(shape_cf)


def _as4(a, shape_cf, cl):
    """A C-contiguous internal array of (N, C, *spatial) shape ``shape_cf`` as (outer, D, H,
    W*C): outer = N*C planes (channels-first) or N samples (channels-last)."""
    a = np.ascontiguousarray(a)
    N, C = shape_cf[:2]
    D, H, W = (1,) * (5 - len(shape_cf)) + tuple(shape_cf[2:])
    return a.reshape((N, D, H, W * C) if cl else (N * C, D, H, W))


@functools.lru_cache(maxsize=256)
def _pos_lut(geom):
    """int64 (window_size,): each compact offset's distance in x (C = 1) from its window's
    first position, (td*dd*H + th*dh)*W + tw*dw over the padded 3-axis geometry."""
    g = geometry_vector(geom, 1)
    H, W = int(g[1]), int(g[2])
    td, th, tw = np.unravel_index(np.arange(geom.window_size), tuple(int(v) for v in g[6:9]))
    lut = ((td * int(g[15]) * H + th * int(g[16])) * W + tw * int(g[17])).astype(np.int64)
    lut.flags.writeable = False
    return lut


def max_pool_forward(x, geom, cl=False):
    """Max pooling of an internal NumPy x ((N, C, *size), or (N, *size, C) with ``cl``),
    float32/64, float16 or bfloat16 (``takes``).

    Returns a tuple of:
    - out: array laid out like x, (N, C, *out) (or (N, *out, C)), x's dtype
    - offsets: array shaped like out, ``geom.offset_dtype``, compact argmax offsets
    """
    g = geometry_vector(geom, geom.C if cl else 1)
    xr = _ro(_as4(x, geom.input_shape, cl))
    shape = _internal_shape(geom.output_shape, cl)
    out = np.empty(shape, x.dtype)
    off = np.empty(shape, geom.offset_dtype)
    o4 = _as4(out, geom.output_shape, cl)
    f4 = _as4(off, geom.output_shape, cl)
    bits = x.dtype.name in _BITS16
    lut = _lut(x.dtype) if bits else None
    work = np.empty(0, np.float32 if bits else x.dtype)   # the dtype values compare in
    if bits:
        xr, o4 = xr.view(np.uint16), o4.view(np.uint16)
    size = x.size + out.size
    if cl:
        ninf = int(np.array(-np.inf, x.dtype).view(np.uint16)) if bits else 0
        _launch(max_forward_lanes, _max_forward_lanes_items,
                o4.shape[0] * o4.shape[1] * o4.shape[2], size, xr, o4, f4, g, lut, ninf, work)
        return out, off
    Ho, Wo = int(g[4]), int(g[5])
    Wp = (Wo - 1) * int(g[11]) + (int(g[8]) - 1) * int(g[17]) + 1
    band = max(1, min(Ho, BAND_BYTES // max(1, int(g[10]) * Wp * work.itemsize)))
    _launch(max_forward_planes, _max_forward_planes_items,
            o4.shape[0] * o4.shape[1] * (-(-Ho // band)), size, xr, o4, f4, g, band, lut,
            _pos_lut(geom) if bits else None, work)
    return out, off


def max_pool_backward(dout, offsets, geom, cl=False):
    """dx of max pooling from dout and the compact offsets (internal layouts, as
    max_pool_forward); 16-bit dout summed in float32 (converted here and rounded at the end:
    the general path's conversions).

    Returns:
    - dx: array (N, C, *size) (or (N, *size, C)), dout's dtype
    """
    dt = dout.dtype
    d = dout if dt in _FLOATS else dout.astype(np.float32)
    g = geometry_vector(geom, geom.C if cl else 1)
    dx = np.empty(_internal_shape(geom.input_shape, cl), d.dtype)
    size = dx.size + d.size
    if cl:
        x4 = _as4(dx, geom.input_shape, True)
        _launch(max_backward_lanes, _max_backward_lanes_items,
                x4.shape[0] * x4.shape[1] * x4.shape[2], size,
                _ro(_as4(d, geom.output_shape, True)),
                _ro(_as4(offsets, geom.output_shape, True)), x4, g)
    else:
        NC = geom.N * geom.C
        _launch(max_backward_planes, _max_backward_planes_items, NC, size,
                _ro(np.ascontiguousarray(d).reshape(NC, d.size // max(1, NC))),
                _ro(np.ascontiguousarray(offsets).reshape(NC, d.size // max(1, NC))),
                dx.reshape(NC, dx.size // max(1, NC)), g,
                _pos_lut(geom))
    return dx if d is dout else dx.astype(dt)


def _divisor3(divisor, dtype, g):
    """The divisor as a (Do, Ho, Wo) array of ``dtype`` (the general path divides in the
    accumulation dtype); a (1, 1, 1) dummy when there is none."""
    if divisor is None:
        return _ro(np.ones((1, 1, 1), dtype))
    return _ro(np.asarray(divisor, dtype=dtype).reshape(tuple(int(v) for v in g[3:6])))


def sum_pool_forward(x, geom, divisor=None, cl=False):
    """Window sums of an internal NumPy x, divided by ``divisor`` (float64, shape geom.out)
    when given; 16-bit x summed in float32 (a float32 copy here, the result rounded back:
    the general path's conversions).

    Returns:
    - out: array (N, C, *out) (or (N, *out, C)), x's dtype
    """
    a = x if x.dtype in _FLOATS else x.astype(np.float32)
    g = geometry_vector(geom, geom.C if cl else 1)
    xr = _ro(_as4(a, geom.input_shape, cl))
    out = np.empty(_internal_shape(geom.output_shape, cl), a.dtype)
    o4 = _as4(out, geom.output_shape, cl)
    div = _divisor3(divisor, a.dtype, g)
    if not cl and geom.d < 3:
        Hp = max(int(g[1]) + 2 * int(g[13]), (int(g[4]) - 1) * int(g[10]) + int(g[7]))
        Pw = max(int(g[2]) + 2 * int(g[14]), (int(g[5]) - 1) * int(g[11]) + int(g[8]))
        if 3 * (Hp + 1) * Pw * a.itemsize <= 8 * BAND_BYTES:    # its three scratch planes
            _launch(sum_forward_planes, _sum_forward_planes_items, o4.shape[0],
                    x.size + out.size, xr, o4, div, g, divisor is not None, Hp, Pw)
            return out if a is x else out.astype(x.dtype)
    _launch(sum_forward, _sum_forward_items, o4.shape[0] * o4.shape[1] * o4.shape[2],
            x.size + out.size, xr, o4, div, g, divisor is not None)
    return out if a is x else out.astype(x.dtype)


def sum_pool_backward(dout, geom, divisor=None, cl=False):
    """dx of the window sums (of dout / ``divisor`` when given); 16-bit dout summed in
    float32 as in sum_pool_forward.

    Returns:
    - dx: array (N, C, *size) (or (N, *size, C)), dout's dtype
    """
    d = dout if dout.dtype in _FLOATS else dout.astype(np.float32)
    g = geometry_vector(geom, geom.C if cl else 1)
    dr = _ro(_as4(d, geom.output_shape, cl))
    dx = np.empty(_internal_shape(geom.input_shape, cl), d.dtype)
    x4 = _as4(dx, geom.input_shape, cl)
    D, H, WC, Do = x4.shape[1], x4.shape[2], x4.shape[3], int(g[3])
    if not cl and D == Do == 1:
        Hp = max(H + int(g[13]) + int(g[7]) - 1, (int(g[4]) - 1) * int(g[10]) + int(g[7]))
        Pw = max(WC + int(g[14]) + int(g[8]) - 1, (int(g[5]) - 1) * int(g[11]) + int(g[8]))
        if (2 * Hp + H + 1) * Pw * d.itemsize <= 8 * BAND_BYTES:   # its three scratch planes
            _launch(sum_backward_planes, _sum_backward_planes_items, x4.shape[0],
                    dx.size + d.size, dr, x4, _divisor3(divisor, d.dtype, g), g,
                    divisor is not None, Hp, Pw)
            return dx if d is dout else dx.astype(dout.dtype)
    row = WC * d.itemsize * (1 if D == Do == 1 else Do + 1)   # hbuf and wbuf per input row
    band = max(1, min(H, 4 * BAND_BYTES // max(1, row)))
    _launch(sum_backward, _sum_backward_items, x4.shape[0] * (-(-H // band)), dx.size + d.size,
            dr, x4, _divisor3(divisor, d.dtype, g), g, divisor is not None, band)
    return dx if d is dout else dx.astype(dout.dtype)
