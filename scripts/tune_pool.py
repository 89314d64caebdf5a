#!/usr/bin/env python
"""Time every max-pooling kernel variant on the benchmark cases and pick a winner per case.

    PYTHONPATH=. python scripts/tune_pool.py            # CUDA machine; JSON to $OUT/tune_pool.json
    PYTHONPATH=. python scripts/tune_pool.py --list     # no GPU needed: cases and variants
    PYTHONPATH=. python scripts/tune_pool.py --cases fwd-3x3-f32,bwd-3x3-f32 --reps 50

Variants are gpulayers.cuda.pool_kernels knobs (see its docstring): for each pass, every
kernel variant (forward: generic with 3 or 2 unrolled taps, 'pairs'; backward: 'element',
'blocks'; each with 1, 2 or 4 planes per loop step) crossed with the launch knobs (block
size, blocks per SM). Variants that resolve to the same kernel and launch for a case are
timed once. Every variant runs first into outputs poisoned with 0xA5 bytes, which must then
equal the default variant's bitwise (forward: out and offsets; backward: dx), on random
integer data with many ties and a few NaNs. A failing or mismatching variant is reported,
never fatal.

Timing: bare kernel launches (arguments, outputs and grid prepared beforehand), CUDA events
around each launch, warm-up first, then the variants take turns launch by launch
(round-robin) without host synchronization, median of --reps per variant. bw = compulsory
bytes (forward: x read, out and offsets written; backward: dout and offsets read, dx written)
/ time / copy bandwidth (device-to-device copy of about 1 GB in the same run, read + write).
PyTorch (when it imports with CUDA) is timed on the same data for reference.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # harness.py
import harness  # noqa: E402
from gpulayers import timing  # noqa: E402

# name: (pass, shape, dtype, pool_param); e.g. "fwd-3x3-f32"
_GEOMETRIES = {"3x3": ((256, 64, 112, 112), dict(pool_height=3, pool_width=3, stride=2, pad=1)),
               "2x2": ((128, 128, 112, 112), dict(pool_height=2, pool_width=2, stride=2))}
CASES = {f"{short}-{geo}-f{dtype[-2:]}": (pass_, shape, dtype, dict(pool_param))
         for dtype in ("float32", "float16")
         for geo, (shape, pool_param) in _GEOMETRIES.items()
         for short, pass_ in (("fwd", "forward"), ("bwd", "backward"))}
KERNEL_VARIANTS = {
    "forward": [dict(kernel=k, taps=t, planes=p)
                for k, t in (("generic", 3), ("generic", 2), ("pairs", 2)) for p in (1, 2, 4)],
    "backward": [dict(kernel=k, planes=p) for k in ("element", "blocks") for p in (1, 2, 4)],
}
BLOCKS = (128, 256, 512)
BLOCKS_PER_SM = (32, None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is measured.")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--reps", type=int, default=25, help="timed launches per variant (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed launches per variant first")
    p.add_argument("--blocks", default=",".join(map(str, BLOCKS)),
                   help="block sizes to try (comma-separated)")
    p.add_argument("--blocks-per-sm", default=",".join(map(str, BLOCKS_PER_SM)),
                   help="blocks_per_sm values to try ('None': one y block per plane group)")
    p.add_argument("--top", type=int, default=6, help="rows printed per case (JSON has all)")
    p.add_argument("--budget", type=float, default=50.0,
                   help="seconds; once passed, remaining cases time the default only")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--json", default=None,
                   help="results JSON path (default: $OUT/tune_pool.json when OUT is set)")
    p.add_argument("--list", action="store_true",
                   help="print the cases and variants and exit (needs no CuPy)")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {list(CASES)}")
    args.blocks = [int(b) for b in args.blocks.split(",")]
    args.blocks_per_sm = [None if b == "None" else int(b) for b in args.blocks_per_sm.split(",")]
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


def variants(pass_, blocks, blocks_per_sm):
    """Every variant dict of pass_: the default first, then kernel variants x launch knobs."""
    from gpulayers.cuda import pool_kernels as pk
    default = dict(pk.DEFAULT_VARIANT[pass_])
    out = [default]
    for kernel, block, bps in itertools.product(KERNEL_VARIANTS[pass_], blocks, blocks_per_sm):
        v = dict(default, **kernel, block=block, blocks_per_sm=bps)
        if v not in out:
            out.append(v)
    return out


def label(v):
    """Short name of a variant dict, e.g. 'pairs t2 p4 b256 s32'."""
    taps = f" t{v['taps']}" if "taps" in v else ""
    bps = "all" if v["blocks_per_sm"] is None else v["blocks_per_sm"]
    return f"{v['kernel']}{taps} p{v['planes']} b{v['block']} s{bps}"


def plan_key(plan):
    return (plan["kernel"], plan["params"], plan["block"], plan["blocks_per_sm"])


def list_cases(args):
    from gpulayers.cuda import pool_kernels as pk
    from gpulayers.shapes import pool_geometry
    for name in args.cases:
        pass_, shape, dtype, pool_param = CASES[name]
        geom = pool_geometry(shape, pool_param)
        plan_of = pk.forward_plan if pass_ == "forward" else pk.backward_plan
        seen = {}
        for v in variants(pass_, args.blocks, args.blocks_per_sm):
            plan = plan_of(geom, {pass_: v})
            seen.setdefault(plan_key(plan), (v, plan))
        print(f"{name}: {shape} {dtype} {pool_param}: {len(seen)} distinct variants")
        for v, plan in seen.values():
            expr = pk.kernel_expression(plan["kernel"], dtype, geom, plan["params"])
            print(f"  {label(v):<26} {expr}")


def prepared(cp, pk, cuda_compile, pass_, geom, dtype, variant, inputs):
    """(make, expression): make(outputs) is a zero-argument bare launch of the variant's kernel
    that reads ``inputs`` and writes ``outputs`` (see :func:`new_outputs`)."""
    plan = (pk.forward_plan if pass_ == "forward" else pk.backward_plan)(geom, {pass_: variant})
    expression = pk.kernel_expression(plan["kernel"], dtype, geom, plan["params"])
    function = cuda_compile.get_kernel(pk.SOURCE, expression, pk.compile_group(expression))
    sm_count = pk._sm_count(cp.cuda.runtime.getDevice())
    grid, block = pk.launch_config(plan["plane"], geom.N * geom.C, sm_count, plan["block"],
                                   plan["blocks_per_sm"], plan["planes_per_step"],
                                   packed=plan["packed"])

    def make(outputs):
        args = tuple(inputs) + tuple(outputs) + pk.scalar_args(geom)

        def launch():
            function(grid, block, args)
        return launch
    return make, expression


def new_outputs(cp, pass_, geom, dtype, poison=False):
    """Output arrays of one pass: (out, offsets) forward, (dx,) backward; poisoned with 0xA5
    bytes on request."""
    if pass_ == "forward":
        outputs = (cp.empty(geom.output_shape, dtype),
                   cp.empty(geom.output_shape, geom.offset_dtype))
    else:
        outputs = (cp.empty(geom.input_shape, dtype),)
    for o in outputs if poison else ():
        o.data.memset_async(0xA5, o.nbytes)
    return outputs


def same_bits(cp, a, b):
    if a.dtype.kind == "f":
        view = {2: cp.uint16, 4: cp.uint32, 8: cp.uint64}[a.dtype.itemsize]
        a, b = a.view(view), b.view(view)
    return bool(cp.array_equal(a, b))


def torch_time(torch, pass_, x, dout, pool_param, reps, warmup):
    """Median ms of PyTorch's max_pool2d forward (with indices) or its backward kernel
    (gpulayers.timing's CUDA-event clock: PyTorch works on the same legacy default stream)."""
    import torch.nn.functional as F
    k = [pool_param["pool_height"], pool_param["pool_width"]]
    s, p = [pool_param.get("stride", 1)] * 2, [pool_param.get("pad", 0)] * 2
    xt = torch.from_dlpack(x)
    out, idx = F.max_pool2d(xt, k, s, p, return_indices=True)
    if pass_ == "forward":
        def fn():
            return F.max_pool2d(xt, k, s, p, return_indices=True)
    else:
        gt = torch.from_dlpack(dout)

        def fn():
            return torch.ops.aten.max_pool2d_with_indices_backward(gt, xt, k, s, p, [1, 1],
                                                                   False, idx)
    ms = timing.medians({"torch": fn}, timing.CupyClock(), reps, warmup)["torch"]
    if isinstance(ms, str):
        raise RuntimeError(ms)
    del out, idx
    torch.cuda.empty_cache()
    return ms


def run_case(cp, pk, cuda_compile, torch, name, args, timer, copy_bw, with_variants):
    from gpulayers.shapes import pool_geometry
    pass_, shape, dtype, pool_param = CASES[name]
    dtype = np.dtype(dtype)
    geom = pool_geometry(shape, pool_param)
    rows, notes = [], []
    # random integers: many ties; a few NaNs
    x = cp.random.randint(-40, 40, size=shape, dtype=cp.int32).astype(dtype)
    x.ravel()[::99991] = np.nan
    base_out, base_offsets = pk.max_pool_forward_gpu(x, geom, pk.DEFAULT_VARIANT)
    dout = None
    if pass_ == "forward":
        inputs = (x,)
        nbytes = x.nbytes + base_out.nbytes + base_offsets.nbytes
    else:
        dout = cp.random.standard_normal(geom.output_shape, dtype=cp.float32).astype(dtype)
        inputs = (dout, base_offsets)
        nbytes = dout.nbytes + base_offsets.nbytes + x.nbytes
    candidates = variants(pass_, args.blocks, args.blocks_per_sm)
    if not with_variants:
        candidates = candidates[:1]
        notes.append("budget spent: default only")
    seen, fns = {}, {}
    if pass_ == "forward":
        expected = (base_out, base_offsets)
    else:
        expected = (pk.max_pool_backward_gpu(dout, base_offsets, geom, pk.DEFAULT_VARIANT),)
    scratch = new_outputs(cp, pass_, geom, dtype)  # every timed launch writes here
    for v in candidates:
        row = {"case": name, "variant": v, "label": label(v)}
        try:
            plan = (pk.forward_plan if pass_ == "forward" else pk.backward_plan)(
                geom, {pass_: v})
            if plan_key(plan) in seen:
                continue  # same kernel and launch as an earlier variant
            seen[plan_key(plan)] = row
            make, expression = prepared(cp, pk, cuda_compile, pass_, geom, dtype, v, inputs)
            row["kernel"] = expression
            outputs = new_outputs(cp, pass_, geom, dtype, poison=True)
            make(outputs)()
            # bitwise equal to the default launcher's results (the default itself included)
            ok = all(same_bits(cp, a, b) for a, b in zip(outputs, expected))
            del outputs
            row["status"] = "ok" if ok else "MISMATCH"
            if ok:
                fns[row["label"]] = make(scratch)
        except Exception as exc:  # report, go on with the next variant
            row["status"] = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(limit=2)
        rows.append(row)
    times = timing.medians(fns, timer, args.reps, args.warmup) if fns else {}
    for row in rows:
        t = times.get(row["label"])
        if isinstance(t, str):   # the error of a variant that raised while timed
            row["status"] = f"ERROR {t.splitlines()[0][:200]}"
        elif t is not None:
            row["ms"] = t
            row["bw"] = nbytes / (t * 1e-3) / copy_bw
    torch_ms = None
    if torch is not None:
        try:
            torch_ms = torch_time(torch, pass_, x, dout, pool_param, args.reps, args.warmup)
        except Exception as exc:
            notes.append(f"torch failed: {type(exc).__name__}: {exc}")
    timed = [r for r in rows if "ms" in r]
    default_ms = rows[0].get("ms") if rows else None
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    del x, dout, inputs, base_out, base_offsets, expected, scratch, fns
    cp.get_default_memory_pool().free_all_blocks()
    return {"case": name, "pass": pass_, "shape": list(shape), "dtype": dtype.name,
            "pool_param": pool_param, "bytes": nbytes, "torch_ms": torch_ms,
            "default_ms": default_ms, "best": best and {k: best[k] for k in
                                                        ("label", "variant", "ms", "bw")},
            "rows": rows, "notes": notes}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_case(res, top):
    rows = res["rows"]
    timed = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    shown = timed[:top]
    if rows and rows[0] not in shown and "ms" in rows[0]:
        shown.append(rows[0])
    torch_ms = res["torch_ms"]
    print(f"\n{res['case']}  {tuple(res['shape'])} {res['dtype']}  "
          f"({len(timed)} timed variants; torch {_fmt(torch_ms, '.3f')} ms)")
    print(f"  {'variant':<26} {'ms':>7} {'bw':>5} {'vs dflt':>7} {'vs torch':>8}")
    for r in shown:
        mark = " *" if r is rows[0] else ""
        print(f"  {r['label']:<26} {r['ms']:7.3f} {r['bw']:5.2f} "
              f"{res['default_ms'] / r['ms'] if res['default_ms'] else 0:6.2f}x "
              f"{_fmt(r['ms'] / torch_ms if torch_ms else None, '8.2f')}{mark}")
    for r in rows:
        if r.get("status", "ok") != "ok":
            print(f"  {r['label']:<26} {r['status']}")
    for note in res["notes"]:
        print(f"  note: {note}")


def summary(results):
    """Per pass: the variant with the smallest geometric mean time over its cases, relative to
    each case's best (only variants timed in every case of the pass)."""
    out = {}
    for pass_ in ("forward", "backward"):
        cases = [r for r in results if r["pass"] == pass_ and r["best"]]
        if not cases:
            continue
        scores = {}
        for res in cases:
            for row in res["rows"]:
                if "ms" in row:
                    scores.setdefault(row["label"], []).append(row["ms"] / res["best"]["ms"])
        full = {k: float(np.exp(np.mean(np.log(v)))) for k, v in scores.items()
                if len(v) == len(cases)}
        if full:
            label_ = min(full, key=full.get)
            variant = next(row["variant"] for res in cases for row in res["rows"]
                           if row["label"] == label_)
            out[pass_] = {"label": label_, "variant": variant, "slowdown_vs_best": full[label_]}
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        list_cases(args)
        return 0
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        print(f"tune_pool needs CuPy and a CUDA device: {type(exc).__name__}: {exc}")
        return 2
    from gpulayers.cuda import compile as cuda_compile
    from gpulayers.cuda import pool_kernels as pk
    torch = None
    if not args.no_torch:
        try:
            import torch as torch_
            if torch_.cuda.is_available():
                torch = torch_
        except Exception as exc:
            print(f"(no PyTorch: {type(exc).__name__}: {exc})")
    t_start = time.perf_counter()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
    device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    timer = timing.CupyClock()
    copy_bw = harness.copy_bandwidth(cp, 1 << 30)[0] * 1e9   # bytes/s
    print(f"{device}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    # compile both dtypes' groups up front, so the compile time is visible
    for dtype in sorted({CASES[c][2] for c in args.cases}):
        t0 = time.perf_counter()
        e = f"max_pool2d_forward<{pk.VALUE_TYPES[np.dtype(dtype)]}, unsigned char, int>"
        cuda_compile.get_kernel(pk.SOURCE, e, pk.compile_group(e))
        print(f"compiled {len(pk.compile_group(e))} {dtype} kernels in "
              f"{time.perf_counter() - t0:.1f} s")
    results = []
    for name in args.cases:
        elapsed = time.perf_counter() - t_start
        try:
            res = run_case(cp, pk, cuda_compile, torch, name, args, timer, copy_bw,
                           with_variants=elapsed < args.budget)
        except Exception as exc:
            traceback.print_exc()
            res = {"case": name, "pass": CASES[name][0], "best": None, "rows": [],
                   "notes": [f"case failed: {type(exc).__name__}: {exc}"], "torch_ms": None,
                   "default_ms": None, "shape": list(CASES[name][1]), "dtype": CASES[name][2]}
            cp.get_default_memory_pool().free_all_blocks()
        results.append(res)
        print_case(res, args.top)
    print(f"\nwinners (bw = fraction of copy bandwidth; {time.perf_counter() - t_start:.1f} s)")
    print(f"  {'case':<13} {'default ms':>10} {'best ms':>8} {'bw':>5} {'speedup':>7} "
          f"{'vs torch':>8}  variant")
    for res in results:
        b = res["best"]
        if not b:
            print(f"  {res['case']:<13} (nothing timed)")
            continue
        t = res["torch_ms"]
        print(f"  {res['case']:<13} {_fmt(res['default_ms'], '10.3f')} {b['ms']:8.3f} "
              f"{b['bw']:5.2f} {res['default_ms'] / b['ms'] if res['default_ms'] else 0:6.2f}x "
              f"{_fmt(b['ms'] / t if t else None, '8.2f')}  {b['label']}")
    overall = summary(results)
    for pass_, s in overall.items():
        print(f"  one {pass_} default for all its cases: {s['label']} "
              f"({s['slowdown_vs_best']:.3f}x the per-case best, geometric mean): {s['variant']}")
    doc = {"device": device, "copy_bytes_per_s": copy_bw, "reps": args.reps,
           "warmup": args.warmup, "cases": results, "one_default": overall,
           "seconds": time.perf_counter() - t_start}
    path = args.json or (os.path.join(os.environ["OUT"], "tune_pool.json")
                         if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
