"""Global average pooling loops: the sum of every (n, c) plane, in one summation order
for both layouts.

Position p of a plane goes to float64 lane p % 8, each lane adds its positions in
order, and the 8 lanes meet in the tree ((0+1)+(2+3))+((4+5)+(6+7)). Channels-first
planes are rows of x (the lanes are 8 independent chains in registers); channels-last
planes are columns (the same lanes, vectorised across channels). Both layouts therefore give the same bits, and the channels-last sum needs
no transposed copy.
"""
from __future__ import annotations

import numpy as np

from . import kernel

prange = range   # numba.prange at compile time (gpulayers.cpu_kernels.kernel)

#: interleaved partial sums per plane
LANES = 8
#: channels per channels-last block: a block's LANES x CHANNELS accumulators stay in L1
CHANNELS = 256


@kernel
def _plane_sums_cf(x, out):
    """x: (R, P) planes as rows; out: (R,) float64. One iteration sums one row: lane j
    (a register) adds positions j, j + 8, ... in order, then the lanes meet in the tree
    ((0+1)+(2+3))+((4+5)+(6+7))."""
    R, P = x.shape
    full = P - P % LANES
    for r in prange(R):
        row = x[r]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        for i in range(full // LANES):
            p0 = i * LANES
            s0 += row[p0]
            s1 += row[p0 + 1]
            s2 += row[p0 + 2]
            s3 += row[p0 + 3]
            s4 += row[p0 + 4]
            s5 += row[p0 + 5]
            s6 += row[p0 + 6]
            s7 += row[p0 + 7]
        t = P - full   # the tail: position full + j goes to lane j
        if t > 0:
            s0 += row[full]
        if t > 1:
            s1 += row[full + 1]
        if t > 2:
            s2 += row[full + 2]
        if t > 3:
            s3 += row[full + 3]
        if t > 4:
            s4 += row[full + 4]
        if t > 5:
            s5 += row[full + 5]
        if t > 6:
            s6 += row[full + 6]
        out[r] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@kernel
def _plane_sums_cl(x, out):
    """x: (N, P, C) channels-last samples; out: (N, C) float64. One iteration sums one
    block of CHANNELS channels of one sample, with the lanes and tree of the
    channels-first loop, vectorised across channels."""
    N, P, C = x.shape
    nb = (C + CHANNELS - 1) // CHANNELS
    full = P - P % LANES
    for t in prange(N * nb):
        n = t // nb
        c0 = (t % nb) * CHANNELS
        w = min(C - c0, CHANNELS)
        acc = np.zeros((LANES, w), np.float64)
        if w == C:
            # the whole sample in one block: 8 positions are one contiguous run of 8 * C
            # values, added to the flat accumulators in one loop
            flat = acc.reshape(LANES * C)
            xs = x[n].reshape(P * C)
            for p0 in range(0, full, LANES):
                seg = xs[p0 * C:(p0 + LANES) * C]
                for k in range(LANES * C):
                    flat[k] += seg[k]
            for p in range(full, P):
                a = acc[p - full]
                row = x[n, p]
                for k in range(C):
                    a[k] += row[k]
        else:
            for p in range(P):
                a = acc[p % LANES]
                row = x[n, p, c0:c0 + w]
                for k in range(w):
                    a[k] += row[k]
        o = out[n, c0:c0 + w]
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        a4, a5, a6, a7 = acc[4], acc[5], acc[6], acc[7]
        for k in range(w):
            o[k] = ((a0[k] + a1[k]) + (a2[k] + a3[k])) + ((a4[k] + a5[k]) + (a6[k] + a7[k]))


def plane_sums(x, N, C, P, channels_last):
    """Sum of each (n, c) plane of a C-contiguous float32/float64 x.

    Inputs:
    - x: C-contiguous array of N * C * P elements: (N, C, *spatial) or, with
      channels_last, (N, *spatial, C)
    - N, C, P: samples, channels, spatial positions per plane

    Returns:
    - sums: float64 array (N, C); the same bits for both layouts of the same values
    """
    out = np.empty((N, C), np.float64)
    if channels_last:
        _plane_sums_cl.run(x.size, x.reshape(N, P, C), out)
    else:
        _plane_sums_cf.run(x.size, x.reshape(N * C, P), out.reshape(N * C))
    return out
