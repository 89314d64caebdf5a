"""Batch-norm loop kernels (numba): train / test forward and backward, two layouts.

- **planes**: a C-contiguous (N, C, P) array (channels-first input, its spatial axes
  flattened). One unit of work is one chunk of one (n, c) plane: ``K = ceil(P / chunk)``
  chunks of ``chunk`` elements (the last one shorter); ``prange`` runs over the
  ``N * C * K`` units, so small C and even N = C = 1 still keep every thread busy.
- **rows**: a C-contiguous (M, C) array (the rows of (N, D) and channels-last input).
  One unit is one block of ``R`` consecutive rows (the last block shorter); its loops run
  along the rows, vectorised over the channels.

Every unit writes its own partial results (count, mean, M2 or the backward sums) into its
own slot, and the partials are merged per channel in unit order by one thread. A unit's
work and the merge order depend only on the shape (``chunk`` and ``R`` are fixed by the
caller from the shape), never on the thread count or on scheduling: the results are
bitwise repeatable and the same with 1 thread or 16.

Statistics are float64: per unit two passes over the unit while it is in cache, the sum
of ``x - pivot`` (``pivot`` = the channel's first sample, so a constant channel gives
exact zeros and a large mean does not cancel), then the sum of squared deviations from the
unit's mean; the units merge by Chan's formula for (count, mean, M2). The affine and
gradient passes compute in float64 and round once to the output dtype. Backward sums
(of dout and of dout * (x - mean)) are float64, merged in unit order.

Sums inside a planes unit run in ``LANES`` interleaved float64 accumulators (element j
into accumulator j % LANES), added in order at the end; the rows kernels accumulate per
channel along the rows. Both are fixed orders, vectorised without reassociation (no
fastmath).

The kernels take float32 and float64 arrays; gamma, beta, mean, invstd and the (C,)
outputs are in the stats dtype (float32 for float32 input, float64 for float64).
"""
from __future__ import annotations

import math

import numpy as np

from . import kernel

prange = range   # numba.prange once compiled (see gpulayers.cpu_kernels)

__all__ = ["DTYPES", "PLANE_CHUNK", "ROW_BLOCK", "plane_chunk", "row_block",
           "train_forward_planes", "eval_forward_planes", "eval_forward_running_planes",
           "backward_planes",
           "train_forward_rows", "eval_forward_rows", "backward_rows"]

#: the array dtypes the kernels take
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: elements of one planes unit (16384 float32 = 64 KiB: both statistics passes in L2)
PLANE_CHUNK = 16384
#: interleaved float64 accumulators of the sums inside one planes unit: element j of the
#: unit goes into accumulator j % LANES, and the accumulators are added in order 0, 1, ...
#: (a fixed order; with 64 the compiler vectorises the loop without reassociating)
LANES = 64
#: elements of one rows unit, at most (R = ROW_BLOCK // C rows; 512 KiB of float32: measured
#: best of 8192, 32768, 131072 and 524288 elements on (M, C) = (100352, 64), (401408, 16),
#: (12544, 512) and (64, 4096) float32, train forward, 2-core EPYC, 1 MiB L2)
ROW_BLOCK = 131072
#: rows units per call, at least (where M allows): R is also at most ceil(M / ROW_UNITS)
ROW_UNITS = 16


def plane_chunk(P):
    """The chunk length of the planes kernels for planes of P elements."""
    return max(1, min(P, PLANE_CHUNK))


def row_block(M, C):
    """The rows per unit of the rows kernels for an (M, C) input (a function of the shape
    only, so results do not depend on the thread count)."""
    return max(1, min(ROW_BLOCK // max(1, C), -(-M // ROW_UNITS)))


@kernel(parallel=False, inline="always", error_model="numpy")
def _finish_channel(c, mc, vc, eps, gamma, mean, var, invstd, m64, a64):
    """A train forward's channel c from its float64 mean mc and (biased) variance vc:
    writes mean[c], var[c], invstd[c] (their dtype) and the float64 terms m64[c] = mc,
    a64[c] = gamma[c] * invstd of y = (x - m64) * a64 + b; returns invstd in float64."""
    ic = 1.0 / math.sqrt(vc + eps)
    mean[c] = mc
    var[c] = vc
    invstd[c] = ic
    m64[c] = mc
    a64[c] = np.float64(gamma[c]) * ic
    return ic


# ------------------------------------------------------------------------------- planes


@kernel(parallel=False, inline="always")
def _unit(u, K, C, P, chunk):
    """(n, c, start, stop) of planes unit u: chunk u % K of plane u // K = n*C + c."""
    i = u // K
    s = (u - i * K) * chunk
    return i // C, i % C, s, min(P, s + chunk)


@kernel(error_model="numpy")
def train_forward_planes(x, gamma, beta, eps, chunk, ratio_max, y, mean, var, invstd):
    """Train-mode BN of x (N, C, P) into y (N, C, P), one prange iteration per chunk.

    Writes mean, var (biased) and invstd (C,); y only when every channel's
    |mean| * invstd <= ratio_max (NaN passes). Returns that condition.
    """
    N, C, P = x.shape
    K = (P + chunk - 1) // chunk
    U = N * C * K
    cnt = np.empty(U)
    mu = np.empty(U)
    m2 = np.empty(U)
    for u in prange(U):
        n, c, s, e = _unit(u, K, C, P, chunk)
        piv = np.float64(x[0, c, 0])
        row = x[n, c, s:e]
        L = e - s
        body = L - L % LANES
        acc = np.zeros(LANES)
        for j in range(0, body, LANES):
            seg = row[j:j + LANES]
            for l in range(LANES):
                acc[l] += seg[l] - piv
        tail = row[body:]
        for l in range(L - body):
            acc[l] += tail[l] - piv
        t = 0.0
        for l in range(LANES):
            t += acc[l]
        m = t / L
        acc[:] = 0.0
        for j in range(0, body, LANES):
            seg = row[j:j + LANES]
            for l in range(LANES):
                dv = (seg[l] - piv) - m
                acc[l] += dv * dv
        for l in range(L - body):
            dv = (tail[l] - piv) - m
            acc[l] += dv * dv
        q = 0.0
        for l in range(LANES):
            q += acc[l]
        cnt[u] = L
        mu[u] = m
        m2[u] = q
    m64 = np.empty(C)
    a64 = np.empty(C)
    ok = True
    for c in range(C):
        na = 0.0
        ma = 0.0
        qa = 0.0
        for n in range(N):
            for k in range(K):
                u = (n * C + c) * K + k
                nb = cnt[u]
                nt = na + nb
                d = mu[u] - ma
                ma += d * (nb / nt)
                qa += m2[u] + d * d * (na * nb / nt)
                na = nt
        mc = np.float64(x[0, c, 0]) + ma
        ic = _finish_channel(c, mc, qa / na, eps, gamma, mean, var, invstd, m64, a64)
        if abs(mc) * ic > ratio_max:
            ok = False
    if not ok:
        return False
    b64 = np.empty(C)
    for c in range(C):
        b64[c] = beta[c]
    _affine_planes(x, m64, a64, b64, chunk, y)
    return True


@kernel(parallel=False, error_model="numpy")
def _eval_terms(gamma, beta, mean, invstd):
    """Test mode's per-channel float64 (mean, gamma * invstd, beta) of y = (x - mean) * a + b."""
    C = gamma.shape[0]
    m64 = np.empty(C)
    a64 = np.empty(C)
    b64 = np.empty(C)
    for c in range(C):
        m64[c] = mean[c]
        a64[c] = np.float64(gamma[c]) * np.float64(invstd[c])
        b64[c] = beta[c]
    return m64, a64, b64


@kernel(error_model="numpy")
def _affine_planes(x, m64, a64, b64, chunk, y):
    """y = (x - m64) * a64 + b64 per channel over x (N, C, P), in float64, rounded once;
    one prange iteration per chunk of a plane."""
    N, C, P = x.shape
    K = (P + chunk - 1) // chunk
    for u in prange(N * C * K):
        n, c, s, e = _unit(u, K, C, P, chunk)
        mc = m64[c]
        ac = a64[c]
        bc = b64[c]
        row = x[n, c, s:e]
        out = y[n, c, s:e]
        for j in range(e - s):
            out[j] = (row[j] - mc) * ac + bc


@kernel(parallel=False, error_model="numpy")   # the parallel loop is the callee's
def eval_forward_planes(x, gamma, beta, mean, invstd, chunk, y):
    """Test-mode BN of x (N, C, P) into y: (x - mean) * (gamma * invstd) + beta."""
    m64, a64, b64 = _eval_terms(gamma, beta, mean, invstd)
    _affine_planes(x, m64, a64, b64, chunk, y)


@kernel(parallel=False, error_model="numpy")   # the parallel loop is the callee's
def eval_forward_running_planes(x, gamma, beta, rm, rv, eps, chunk, y, g, invstd):
    """Test-mode BN of x (N, C, P) into y from the running statistics themselves: when
    every rm and rv is finite and rv >= 0, writes invstd = 1 / sqrt(rv + eps) in rv's
    dtype (``eps`` a scalar of that dtype: NumPy's own rounding steps), g = a copy of
    gamma and y as eval_forward_planes, and returns True; otherwise writes nothing and
    returns False."""
    C = gamma.shape[0]
    for c in range(C):
        if not (np.isfinite(rm[c]) and np.isfinite(rv[c])) or rv[c] < 0:
            return False
    one = rv.dtype.type(1)
    for c in range(C):
        invstd[c] = one / np.sqrt(rv[c] + eps)
        g[c] = gamma[c]
    eval_forward_planes(x, gamma, beta, rm, invstd, chunk, y)
    return True


@kernel(error_model="numpy")
def backward_planes(d, x, gamma, mean, invstd, train, chunk, dx, dgamma, dbeta):
    """BN backward of d, x (N, C, P) into dx (N, C, P), dgamma, dbeta (C,).

    dbeta = sum(d), dgamma = sum(d * (x - mean)) * invstd (float64 sums per chunk, added
    in chunk order); dx = a*d + (x - mean)*k2 + k3 (train) or a*d (test), with a = gamma *
    invstd, k2 = -a * invstd * dgamma / count, k3 = -a * dbeta / count, count = N * P.
    """
    N, C, P = x.shape
    K = (P + chunk - 1) // chunk
    U = N * C * K
    sb = np.empty(U)
    sg = np.empty(U)
    for u in prange(U):
        n, c, s, e = _unit(u, K, C, P, chunk)
        mc = np.float64(mean[c])
        xr = x[n, c, s:e]
        dr = d[n, c, s:e]
        L = e - s
        body = L - L % LANES
        ab = np.zeros(LANES)
        ag = np.zeros(LANES)
        for j in range(0, body, LANES):
            xs = xr[j:j + LANES]
            ds = dr[j:j + LANES]
            for l in range(LANES):
                dv = np.float64(ds[l])
                ab[l] += dv
                ag[l] += dv * (xs[l] - mc)
        xs = xr[body:]
        ds = dr[body:]
        for l in range(L - body):
            dv = np.float64(ds[l])
            ab[l] += dv
            ag[l] += dv * (xs[l] - mc)
        tb = 0.0
        tg = 0.0
        for l in range(LANES):
            tb += ab[l]
            tg += ag[l]
        sb[u] = tb
        sg[u] = tg
    count = np.float64(N * P)
    a64 = np.empty(C)
    k2 = np.empty(C)
    k3 = np.empty(C)
    for c in range(C):
        tb = 0.0
        tg = 0.0
        for n in range(N):
            for k in range(K):
                u = (n * C + c) * K + k
                tb += sb[u]
                tg += sg[u]
        ic = np.float64(invstd[c])
        tg *= ic
        dbeta[c] = tb
        dgamma[c] = tg
        a = np.float64(gamma[c]) * ic
        a64[c] = a
        k2[c] = -a * ic * tg / count
        k3[c] = -a * tb / count
    for u in prange(U):
        n, c, s, e = _unit(u, K, C, P, chunk)
        a = a64[c]
        dr = d[n, c, s:e]
        out = dx[n, c, s:e]
        if train:
            mc = np.float64(mean[c])
            c2 = k2[c]
            c3 = k3[c]
            xr = x[n, c, s:e]
            for j in range(e - s):
                out[j] = a * dr[j] + (xr[j] - mc) * c2 + c3
        else:
            for j in range(e - s):
                out[j] = a * dr[j]


# --------------------------------------------------------------------------------- rows


@kernel(error_model="numpy")
def _affine_rows(x, m64, a64, b64, R, y):
    """y = (x - m64) * a64 + b64 per channel over the rows of x (M, C), in float64,
    rounded once; one prange iteration per block of R rows."""
    M, C = x.shape
    for b in prange((M + R - 1) // R):
        lo = b * R
        hi = min(M, lo + R)
        xb = x[lo:hi]
        yb = y[lo:hi]
        for r in range(hi - lo):
            xr = xb[r]
            yr = yb[r]
            for c in range(C):
                yr[c] = (xr[c] - m64[c]) * a64[c] + b64[c]


@kernel(error_model="numpy")
def train_forward_rows(x, gamma, beta, eps, R, y, mean, var, invstd):
    """Train-mode BN of the rows of x (M, C) into y (M, C), one prange iteration per
    block of R rows; writes mean, var (biased), invstd (C,)."""
    M, C = x.shape
    B = (M + R - 1) // R
    piv = np.empty(C)
    for c in range(C):
        piv[c] = x[0, c]
    mu = np.zeros((B, C))
    m2 = np.zeros((B, C))
    for b in prange(B):
        xb = x[b * R:min(M, (b + 1) * R)]
        acc = mu[b]
        for r in range(xb.shape[0]):
            xr = xb[r]
            for c in range(C):
                acc[c] += xr[c] - piv[c]
        inv_n = 1.0 / xb.shape[0]
        for c in range(C):
            acc[c] *= inv_n
        q = m2[b]
        for r in range(xb.shape[0]):
            xr = xb[r]
            for c in range(C):
                t = (xr[c] - piv[c]) - acc[c]
                q[c] += t * t
    m64 = np.zeros(C)
    q64 = np.zeros(C)
    na = 0.0
    for b in range(B):
        nb = np.float64(min(M, (b + 1) * R) - b * R)
        nt = na + nb
        w1 = nb / nt
        w2 = na * nb / nt
        for c in range(C):
            dl = mu[b, c] - m64[c]
            m64[c] += dl * w1
            q64[c] += m2[b, c] + dl * dl * w2
        na = nt
    a64 = np.empty(C)
    b64 = np.empty(C)
    for c in range(C):
        _finish_channel(c, piv[c] + m64[c], q64[c] / na, eps, gamma, mean, var, invstd,
                        m64, a64)
        b64[c] = np.float64(beta[c])
    _affine_rows(x, m64, a64, b64, R, y)


@kernel(parallel=False, error_model="numpy")   # the parallel loop is the callee's
def eval_forward_rows(x, gamma, beta, mean, invstd, R, y):
    """Test-mode BN of the rows of x (M, C) into y: (x - mean) * (gamma * invstd) + beta."""
    m64, a64, b64 = _eval_terms(gamma, beta, mean, invstd)
    _affine_rows(x, m64, a64, b64, R, y)


@kernel(error_model="numpy")
def backward_rows(d, x, gamma, mean, invstd, train, R, dx, dgamma, dbeta):
    """BN backward of the rows: d, x (M, C) into dx (M, C), dgamma, dbeta (C,); the
    formulas of backward_planes, count = M; float64 sums per block, added in block order."""
    M, C = x.shape
    B = (M + R - 1) // R
    m64 = np.empty(C)
    for c in range(C):
        m64[c] = mean[c]
    sb = np.zeros((B, C))
    sg = np.zeros((B, C))
    for b in prange(B):
        lo = b * R
        hi = min(M, lo + R)
        xb = x[lo:hi]
        db_ = d[lo:hi]
        pb = sb[b]
        pg = sg[b]
        for r in range(hi - lo):
            xr = xb[r]
            dr = db_[r]
            for c in range(C):
                dv = np.float64(dr[c])
                pb[c] += dv
                pg[c] += dv * (xr[c] - m64[c])
    tb = np.zeros(C)
    tg = np.zeros(C)
    for b in range(B):
        for c in range(C):
            tb[c] += sb[b, c]
            tg[c] += sg[b, c]
    count = np.float64(M)
    a64 = np.empty(C)
    k2 = np.empty(C)
    k3 = np.empty(C)
    for c in range(C):
        ic = np.float64(invstd[c])
        g = tg[c] * ic
        dbeta[c] = tb[c]
        dgamma[c] = g
        a = np.float64(gamma[c]) * ic
        a64[c] = a
        k2[c] = -a * ic * g / count
        k3[c] = -a * tb[c] / count
    for b in prange(B):
        lo = b * R
        hi = min(M, lo + R)
        xb = x[lo:hi]
        db_ = d[lo:hi]
        ob = dx[lo:hi]
        for r in range(hi - lo):
            dr = db_[r]
            orow = ob[r]
            if train:
                xr = xb[r]
                for c in range(C):
                    orow[c] = a64[c] * dr[c] + (xr[c] - m64[c]) * k2[c] + k3[c]
            else:
                for c in range(C):
                    orow[c] = a64[c] * dr[c]
