"""IR helpers for the CPU kernels' numba intrinsics (LLVM code a kernel calls like a
function, for what numba's own loops do not produce): masked loads and stores of 8 lanes,
float32 -> float64 vector loads (used by gpulayers.cpu_kernels.global_pool).

Not here, measured and rejected (2026-12-01, this 2-core EPYC): non-temporal ("streaming")
stores of large outputs. They skip the read for ownership and keep the input in cache, and
an affine pass over 25.7 MB of float32 into one reused buffer took 0.41 ms streamed against
0.48 regular. But into freshly allocated output, as every layer call writes it (heap
memory the previous call or PyTorch's had just written, so in cache), spatial BN test mode
took 1.6x PyTorch's time streamed against 0.9-1.15x regular: a streaming store to a
cached line pays for evicting it.

numba caches a kernel keyed on its own source file: after editing this module, delete the
``*.nbi`` / ``*.nbc`` files under gpulayers/cpu_kernels/__pycache__ (a fresh clone or
install has none).
"""
from __future__ import annotations

import functools

#: lanes of the vector helpers (<8 x double>: one 512-bit register)
LANES = 8


@functools.lru_cache(maxsize=1)
def ir_helpers():
    """What the intrinsics share, as attributes: llvmlite's ``ir``, numba's ``types``,
    ``cgutils`` and ``intrinsic`` (imported here: only when a kernel using an intrinsic
    first compiles), and small IR helpers."""
    import types as pytypes

    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i1, i32, i64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
    f32, f64 = ir.FloatType(), ir.DoubleType()
    v8d = ir.VectorType(f64, LANES)

    def suffix(elt):
        return "f32" if elt == f32 else "f64"

    def masked_load(builder, ptr, elt, mask, fill):
        """8 elements of elt at ptr, llvm.masked.load: lanes off in ``mask`` read nothing
        and give ``fill``."""
        vt = ir.VectorType(elt, LANES)
        fnty = ir.FunctionType(vt, [vt.as_pointer(), i32, ir.VectorType(i1, LANES), vt])
        fn = cgutils.get_or_insert_function(
            builder.module, fnty, f"llvm.masked.load.v{LANES}{suffix(elt)}.p0v{LANES}"
                                  f"{suffix(elt)}")
        return builder.call(fn, [builder.bitcast(ptr, vt.as_pointer()),
                                 ir.Constant(i32, 4 if elt == f32 else 8), mask,
                                 ir.Constant(vt, [fill] * LANES)])

    def masked_store(builder, value, ptr, mask):
        """<8 x double> value to ptr, llvm.masked.store: lanes off in ``mask`` not written."""
        fnty = ir.FunctionType(ir.VoidType(), [v8d, v8d.as_pointer(), i32,
                                               ir.VectorType(i1, LANES)])
        fn = cgutils.get_or_insert_function(builder.module, fnty,
                                            f"llvm.masked.store.v{LANES}f64.p0v{LANES}f64")
        builder.call(fn, [value, builder.bitcast(ptr, v8d.as_pointer()), ir.Constant(i32, 8),
                          mask])

    def lanes_below(builder, n):
        """<8 x i1>: lane l on where l < n (an i64)."""
        iota = ir.Constant(ir.VectorType(i64, LANES), list(range(LANES)))
        one = builder.insert_element(ir.Constant(ir.VectorType(i64, LANES), None), n,
                                     ir.Constant(i32, 0))
        splat = builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(i32, LANES),
                                                             [0] * LANES))
        return builder.icmp_signed("<", iota, splat)

    def load_f64(builder, ptr, elt, mask=None):
        """8 elements of elt (float or double) at ptr as <8 x double>; with ``mask``, the
        lanes off read nothing and give -0.0 (x + -0.0 == x, bits included)."""
        if mask is None:
            vt = ir.VectorType(elt, LANES)
            v = builder.load(builder.bitcast(ptr, vt.as_pointer()),
                             align=4 if elt == f32 else 8)
        else:
            v = masked_load(builder, ptr, elt, mask, -0.0)
        return builder.fpext(v, v8d) if elt == f32 else v

    def arrays_ok(src, dst):
        """Typing: src a float32/64 array, dst a float64 array."""
        return (isinstance(src, types.Array) and src.dtype in (types.float32, types.float64)
                and isinstance(dst, types.Array) and dst.dtype == types.float64)

    def data(context, builder, ty, value, elt):
        """An array argument's data pointer as elt*."""
        return builder.bitcast(context.make_array(ty)(context, builder, value).data,
                               elt.as_pointer())

    return pytypes.SimpleNamespace(
        ir=ir, types=types, cgutils=cgutils, intrinsic=intrinsic, i32=i32, i64=i64, f64=f64,
        v8d=v8d, masked_load=masked_load, masked_store=masked_store, lanes_below=lanes_below,
        load_f64=load_f64, arrays_ok=arrays_ok, data=data)
