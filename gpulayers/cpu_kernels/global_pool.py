"""Global average pooling loops: the sum of every (n, c) plane, in one summation order
for both layouts.

Position p of a plane goes to float64 lane p % 8, each lane adds its positions in
order, and the 8 lanes meet in the tree ((0+1)+(2+3))+((4+5)+(6+7)). Both layouts
therefore give the same bits, and the channels-last sum needs no transposed copy.

numba does not vectorise these loops by itself (a lane's chain is a loop-carried float
sum, which LLVM only vectorises when allowed to reorder it), so the hot loops are two
intrinsics that write the vector code out (:func:`_build_rows_cf`, :func:`_build_add_f64`,
with gpulayers.cpu_kernels.simd's IR helpers):

- channels-first: a plane is a row of x. ``ROWS`` rows at a time, each row's 8 lanes
  are one <8 x double> register (8 independent chains, so the adds pipeline); the last
  P % 8 positions come in by a masked load (-0.0 in the other lanes: x + -0.0 == x,
  bits included), and the tree is two shuffles and adds. (32, 512, 14, 14) float32 on
  2 cores: 0.13-0.19 ms, 2.5-3.5x faster than 8 scalar chains (measured 2026-12-01);
- channels-last: a plane is a column. A block of ``CHANNELS`` channels keeps each lane
  as a row of accumulators in L1, adds position p's channels to lane p % 8's row (8
  channels a vector op, a masked one for the rest) and meets the rows in the same tree,
  elementwise. (Eight lanes of 16 channels in registers, walking the positions, was
  slower: 0.22 vs 0.15 ms median on (32, 196, 512), each block a strided pass.)
"""
from __future__ import annotations

import numpy as np

from . import LazyIntrinsic, kernel
from .simd import LANES, ir_helpers

prange = range   # numba.prange at compile time (gpulayers.cpu_kernels.kernel)

# LANES (from simd): the interleaved partial sums per plane, 8 = the width of the vector
# helpers' registers; the tests pin the order with 8

#: channels-first rows one intrinsic call sums (independent register chains)
ROWS = 8
#: channels per channels-last block (its LANES x CHANNELS float64 accumulators: 4 KiB)
CHANNELS = 64


def _build_rows_cf():
    """Intrinsic ``rows_cf(src, base, P, out, o)``: out[o + b] = the plane sum of the row
    of P elements at src[base + b * P], for b < ROWS (src 1-D float32/64, out 1-D float64)."""
    V = ir_helpers()
    ir, i32, i64 = V.ir, V.i32, V.i64

    @V.intrinsic
    def rows_cf(typingctx, src, base, P, out, o):
        if not V.arrays_ok(src, out):
            return None

        def codegen(context, builder, sig, args):
            s, basev, Pv, ov, oi = args
            elt = context.get_value_type(sig.args[0].dtype)
            sp = V.data(context, builder, sig.args[0], s, elt)
            op = V.data(context, builder, sig.args[3], ov, V.f64)
            blocks = builder.udiv(Pv, ir.Constant(i64, LANES))
            full = builder.mul(blocks, ir.Constant(i64, LANES))
            rows = [builder.add(basev, builder.mul(Pv, ir.Constant(i64, b)))
                    for b in range(ROWS)]
            # one <8 x double> per row; allocas, which LLVM keeps in registers
            slots = [V.cgutils.alloca_once(builder, V.v8d) for _ in range(ROWS)]
            for slot in slots:
                builder.store(ir.Constant(V.v8d, [0.0] * LANES), slot)
            with V.cgutils.for_range(builder, blocks) as loop:
                at = builder.mul(loop.index, ir.Constant(i64, LANES))
                for b in range(ROWS):
                    v = V.load_f64(builder, builder.gep(sp, [builder.add(rows[b], at)]), elt)
                    builder.store(builder.fadd(builder.load(slots[b]), v), slots[b])
            mask = V.lanes_below(builder, builder.sub(Pv, full))
            for b in range(ROWS):
                v = V.load_f64(builder, builder.gep(sp, [builder.add(rows[b], full)]), elt,
                               mask)
                acc = builder.fadd(builder.load(slots[b]), v)
                # the tree by shuffles: (0+1, 2+3, 4+5, 6+7), then pairs, then the last add
                lanes = LANES
                while lanes > 1:
                    half = lanes // 2
                    pick = [ir.Constant(ir.VectorType(i32, half),
                                        [2 * j + k for j in range(half)]) for k in (0, 1)]
                    acc = builder.fadd(builder.shuffle_vector(acc, acc, pick[0]),
                                       builder.shuffle_vector(acc, acc, pick[1]))
                    lanes = half
                builder.store(builder.extract_element(acc, ir.Constant(i32, 0)),
                              builder.gep(op, [builder.add(oi, ir.Constant(i64, b))]))
            return context.get_dummy_value()

        return V.types.void(src, base, P, out, o), codegen

    return rows_cf


def _build_add_f64():
    """Intrinsic ``add_f64(acc, a, src, s, n)``: acc[a + k] += src[s + k] for k < n, in
    float64 (acc float64, src float32/64, both 1-D), 8 elements a vector op, the last
    n % 8 by masked loads and a masked store."""
    V = ir_helpers()
    ir, i64 = V.ir, V.i64

    @V.intrinsic
    def add_f64(typingctx, acc, a, src, s, n):
        if not V.arrays_ok(src, acc):
            return None

        def codegen(context, builder, sig, args):
            av, ai, sv, si, nv = args
            elt = context.get_value_type(sig.args[2].dtype)
            ap = builder.gep(V.data(context, builder, sig.args[0], av, V.f64), [ai])
            sp = builder.gep(V.data(context, builder, sig.args[2], sv, elt), [si])
            blocks = builder.udiv(nv, ir.Constant(i64, LANES))
            with V.cgutils.for_range(builder, blocks) as loop:
                at = builder.mul(loop.index, ir.Constant(i64, LANES))
                x = V.load_f64(builder, builder.gep(sp, [at]), elt)
                pa = builder.bitcast(builder.gep(ap, [at]), V.v8d.as_pointer())
                builder.store(builder.fadd(builder.load(pa, align=8), x), pa, align=8)
            full = builder.mul(blocks, ir.Constant(i64, LANES))
            tail = builder.sub(nv, full)
            # only where there is a tail: a masked store, even of no lane, is a store to
            # its address for the CPU, which a later load of it (the next lane's row,
            # here) may wait for
            with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(i64, 0))):
                mask = V.lanes_below(builder, tail)
                x = V.load_f64(builder, builder.gep(sp, [full]), elt, mask)
                pa = builder.gep(ap, [full])
                old = V.masked_load(builder, pa, V.f64, mask, 0.0)
                V.masked_store(builder, builder.fadd(old, x), pa, mask)
            return context.get_dummy_value()

        return V.types.void(acc, a, src, s, n), codegen

    return add_f64


_rows_cf = LazyIntrinsic(_build_rows_cf)
_add_f64 = LazyIntrinsic(_build_add_f64)


@kernel
def _plane_sums_cf(x, out):
    """x: (R, P) planes as rows; out: (R,) float64. One iteration sums ROWS rows (the
    vector intrinsic), the last R % ROWS rows one at a time as 8 scalar lanes."""
    R, P = x.shape
    xf = x.reshape(R * P)
    groups = R // ROWS
    for t in prange(groups):
        _rows_cf(xf, t * ROWS * P, P, out, t * ROWS)
    full = P - P % LANES
    for r in range(groups * ROWS, R):
        row = x[r]
        acc = np.zeros(LANES)
        for p in range(full):
            acc[p % LANES] += row[p]
        for p in range(full, P):
            acc[p - full] += row[p]
        out[r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) +
                                                            (acc[6] + acc[7]))


@kernel
def _plane_sums_cl(x, out):
    """x: (N, P, C) channels-last samples; out: (N, C) float64. One iteration sums one
    block of CHANNELS channels of one sample: position p's channels are added to lane
    p % 8's row of accumulators (the vector intrinsic), then the rows meet in the tree."""
    N, P, C = x.shape
    nb = (C + CHANNELS - 1) // CHANNELS
    xf = x.reshape(N * P * C)
    for t in prange(N * nb):
        n = t // nb
        c0 = (t % nb) * CHANNELS
        w = min(C - c0, CHANNELS)
        acc = np.zeros(LANES * w)
        base = n * P * C + c0
        for p in range(P):
            _add_f64(acc, (p % LANES) * w, xf, base + p * C, w)
        o = out[n, c0:c0 + w]
        a0, a1, a2, a3 = acc[:w], acc[w:2 * w], acc[2 * w:3 * w], acc[3 * w:4 * w]
        a4, a5, a6, a7 = acc[4 * w:5 * w], acc[5 * w:6 * w], acc[6 * w:7 * w], acc[7 * w:]
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
