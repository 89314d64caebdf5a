#!/usr/bin/env python
"""Time the CUDA batch norm against PyTorch, with its host overhead and tuning variants.

    PYTHONPATH=. python scripts/tune_bn.py               # CUDA machine; JSON to $OUT/tune_bn.json
    PYTHONPATH=. python scripts/tune_bn.py --shapes 32x64x56x56 --dtypes float16 --reps 50

For every shape and dtype (default: 4 shapes x float32, float16), three operations --
train forward, train backward, eval forward -- each measured four ways:

- ours:     the public API (gpulayers.spatial_batchnorm_forward/backward) incl. its Python work;
- launcher: gpulayers.cuda.bn_kernels' launcher (argument checks, allocation, launches);
- bare:     the kernel launches alone, arguments and outputs prepared beforehand;
- torch:    torch.nn.functional.batch_norm (training=True forward, autograd backward, eval).

Timing: CUDA events around one call (the GPU idles while the host prepares it, as in a
training step that waits on the host), warm-up first, then the series take turns call by
call (alternating), median of --reps. Also per call: host time (perf_counter over 20 calls
without synchronizing) and pipelined time (20 calls between two events, host overlapped).
bw = compulsory bytes (forward and eval 2x the tensor, backward 3x) / time / copy bandwidth
(device-to-device copy of 1 GiB, same run).

Tuning variants (bn_kernels.TUNING knobs of the layout the shape uses) are timed as bare
launches, alternating with the default. Every variant's outputs are checked against a
float64 NumPy reference on a few channels (channels are independent, so this is exact):
normwise relative error <= 1e-5 (float32) / 1e-2 (float16); dx relative to
max|dout*gamma*invstd|. A failing series or variant is reported, not fatal.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # harness.py
import harness  # noqa: E402
from gpulayers import timing  # noqa: E402

SHAPES = ["256x64x112x112", "256x256x56x56", "256x2048x7x7", "32x64x56x56"]
DTYPES = ["float32", "float16"]
OPS = ("train_fwd", "train_bwd", "eval_fwd")
BYTES = {"train_fwd": 2, "train_bwd": 3, "eval_fwd": 2}  # tensor-sized passes that must happen
TOL = {"float32": 1e-5, "float16": 1e-2}
EPS = 1e-5
MOMENTUM = 0.9  # 'cs231n' convention
VARIANTS = {"planes": [{"blocks_per_sm": k} for k in (2, 8, 16)],
            "columns": [{"columns_blocks_per_sm": k} for k in (2, 4, 16, 32)]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is measured.")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated NxCxHxW")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="float32,float16")
    p.add_argument("--reps", type=int, default=25, help="timed calls per series (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--no-variants", action="store_true", help="skip the tuning variants")
    p.add_argument("--budget", type=float, default=50.0,
                   help="seconds; later shapes run without variants, then are skipped")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for tune_bn.json "
                   "(default $OUT; none: no file)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------ timing

def _timed(clock, series, reps, warmup, errors, where):
    """{name: median ms or None}: gpulayers.timing.medians over the series; a series
    that raised is reported in ``errors``."""
    med = timing.medians(series, clock, reps, warmup)
    for name, t in med.items():
        if isinstance(t, str):
            errors.append({"where": f"{where} {name}", "error": t.splitlines()[0][:300]})
            med[name] = None
    return med


def _short(exc):
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


# ------------------------------------------------------------------------ reference

def rel(a, b, scale=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.max(np.abs(b)) if scale is None else scale
    return float(np.max(np.abs(a - b)) / max(den, 1e-300))


def reference(x, dout, gamma, beta, rm, rv):
    """float64 NumPy reference of train forward, running update, backward, eval forward
    (x, dout: (N, c, H, W) host arrays of some channels; gamma...rv: (c,))."""
    s = (1, -1, 1, 1)
    x = x.astype(np.float64)
    d = dout.astype(np.float64)
    M = x.size // x.shape[1]
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(var + EPS)
    xhat = (x - mean.reshape(s)) * invstd.reshape(s)
    y = xhat * gamma.reshape(s) + beta.reshape(s)
    db, dg = d.sum(axis=(0, 2, 3)), (d * xhat).sum(axis=(0, 2, 3))
    dx = (gamma * invstd).reshape(s) / M * (M * d - db.reshape(s) - xhat * dg.reshape(s))
    inv_run = 1 / np.sqrt(rv + EPS)
    y_eval = (x - rm.reshape(s)) * (inv_run * gamma).reshape(s) + beta.reshape(s)
    return {"y": y, "rm": MOMENTUM * rm + (1 - MOMENTUM) * mean,
            "rv": MOMENTUM * rv + (1 - MOMENTUM) * var, "dx": dx, "dgamma": dg, "dbeta": db,
            "y_eval": y_eval, "dx_scale": float(np.max(np.abs(d * (gamma * invstd).reshape(s))))}


def check(cp, ref, idx, dtype, y, rm, rv, dx, dgamma, dbeta, y_eval):
    """{quantity: error} on channels idx, and whether all are within tolerance."""
    h = cp.asnumpy
    tol = TOL[dtype]
    stat_tol = TOL["float32"]
    errs = {"y": rel(h(y[:, idx]), ref["y"]), "running_mean": rel(h(rm[idx]), ref["rm"]),
            "running_var": rel(h(rv[idx]), ref["rv"]),
            "dx": rel(h(dx[:, idx]), ref["dx"], ref["dx_scale"]),
            "dgamma": rel(h(dgamma[idx]), ref["dgamma"]), "dbeta": rel(h(dbeta[idx]), ref["dbeta"]),
            "y_eval": rel(h(y_eval[:, idx]), ref["y_eval"])}
    limits = {"y": tol, "dx": tol, "y_eval": tol}
    ok = all(np.isfinite(e) and e <= limits.get(k, stat_tol) for k, e in errs.items())
    return errs, ok


# ------------------------------------------------------------------------ one shape

def bare_launches(cp, K, x, dout, g, b, rm, rv, out):
    """Prebuilt launch lists (train forward, backward, eval) under the current TUNING,
    writing into the preallocated arrays of ``out``."""
    p = K._prepare(x, dout)
    part = out["part"][:p.part_size]
    st = out["stats"]
    fwd = K._train_forward_launches(p, x, g, b, EPS, rm, rv, 3, MOMENTUM, 1 - MOMENTUM, False,
                                    0.0, part, st, out["y"])
    bwd = K._backward_launches(p, dout, x, g, out["mean"], out["invstd"], True, part, out["dx"],
                               out["dgamma"], out["dbeta"])
    ev = K._eval_forward_launches(p, x, g, b, rm, rv, EPS, out["invstd_eval"], out["y_eval"])
    block = (256,)

    def runner(launches):
        def run():
            for (kernel, _), grid, args in launches:
                kernel(grid, block, args)
        return run
    return p.plan, {"train_fwd": runner(fwd), "train_bwd": runner(bwd), "eval_fwd": runner(ev)}


def run_shape(cp, K, gl, torch, shape, dtype, args, timer, copy_bw, errors, with_variants):
    N, C, H, W = shape
    rng = cp.random.RandomState(0)
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dtype)
    dout = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    sd = np.float32
    g = (rng.standard_normal(C, dtype=np.float32) + 1).astype(sd)
    b = rng.standard_normal(C, dtype=np.float32).astype(sd)
    rm = rng.standard_normal(C, dtype=np.float32).astype(sd)
    rv = (rng.random_sample(C, dtype=np.float32) + 0.5).astype(sd)
    idx = np.array(sorted({0, 1 % C, C // 2, C - 1}))
    h = cp.asnumpy
    ref = reference(h(x[:, idx]), h(dout[:, idx]), h(g)[idx].astype(np.float64),
                    h(b)[idx].astype(np.float64), h(rm)[idx].astype(np.float64),
                    h(rv)[idx].astype(np.float64))
    where = f"{'x'.join(map(str, shape))} {dtype}"
    rows, variants = [], []

    # public API: verify once, then time
    bp = {"mode": "train", "running_mean": rm, "running_var": rv}
    y, cache = gl.spatial_batchnorm_forward(x, g, b, bp)
    dx, dgamma, dbeta = gl.spatial_batchnorm_backward(dout, cache)
    ev = {"mode": "test", "running_mean": rm, "running_var": rv}
    y_eval, eval_cache = gl.spatial_batchnorm_forward(x, g, b, ev)
    errs, ok = check(cp, ref, idx, dtype, y, bp["running_mean"], bp["running_var"], dx, dgamma,
                     dbeta, y_eval)
    if not ok:
        errors.append({"where": f"{where} public API", "error": f"errors above tolerance: {errs}"})
    del y, dx, y_eval, eval_cache
    train_param = {"mode": "train", "running_mean": rm, "running_var": rv}
    ours = {"train_fwd": lambda: gl.spatial_batchnorm_forward(x, g, b, train_param),
            "train_bwd": lambda: gl.spatial_batchnorm_backward(dout, cache),
            "eval_fwd": lambda: gl.spatial_batchnorm_forward(x, g, b, ev)}
    mean, invstd = cache.mean, cache.invstd
    launcher = {"train_fwd": lambda: K.bn_train_forward_update_gpu(x, g, b, EPS, rm, rv, MOMENTUM,
                                                                   "cs231n"),
                "train_bwd": lambda: K.bn_backward_gpu(dout, x, g, mean, invstd, True),
                "eval_fwd": lambda: K.bn_eval_forward_stats_gpu(x, g, b, rm, rv, EPS)}

    # bare launches, default tuning and variants, sharing preallocated outputs
    out = {"y": cp.empty_like(x), "dx": cp.empty_like(x), "y_eval": cp.empty_like(x),
           "part": cp.empty(K.PART_ROWS * C * 260, sd), "stats": cp.empty((len(K.STAT_ROWS), C), sd),
           "dgamma": cp.empty(C, sd), "dbeta": cp.empty(C, sd), "invstd_eval": cp.empty(C, sd)}
    out["mean"], out["invstd"] = out["stats"][0], out["stats"][2]
    default = dict(K.TUNING)
    layout = K.plan_layout(shape, np.dtype(dtype)).layout
    knobs = [None] + (VARIANTS[layout] if with_variants else [])
    bare = {}
    for knob in knobs:
        name = "default" if knob is None else ",".join(f"{k}={v}" for k, v in knob.items())
        try:
            if knob is not None:
                K.set_tuning(**knob)
            plan, runs = bare_launches(cp, K, x, dout, g, b, rm, rv, out)
            for op in OPS:
                runs[op]()
            verrs, vok = check(cp, ref, idx, dtype, out["y"], out["stats"][4], out["stats"][5],
                               out["dx"], out["dgamma"], out["dbeta"], out["y_eval"])
            bare[name] = runs
            variants.append({"shape": list(shape), "dtype": dtype, "variant": name,
                             "layout": plan.layout, "grid": list(plan.grid), "ok": vok,
                             "errors": verrs})
            if not vok:
                errors.append({"where": f"{where} variant {name}",
                               "error": f"errors above tolerance: {verrs}"})
        except Exception as exc:
            errors.append({"where": f"{where} variant {name}", "error": _short(exc)})
        finally:
            K.set_tuning(**default)

    # torch
    tor = {}
    if torch is not None:
        try:
            F = torch.nn.functional
            tx = torch.as_tensor(x, device="cuda").detach().requires_grad_(True)
            td = torch.as_tensor(dout, device="cuda")
            tw = torch.as_tensor(g, device="cuda").detach().clone().requires_grad_(True)
            tb = torch.as_tensor(b, device="cuda").detach().clone().requires_grad_(True)
            trm, trv = torch.as_tensor(rm, device="cuda").clone(), torch.as_tensor(rv, device="cuda").clone()
            ty = F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1, eps=EPS)

            def t_fwd():
                with torch.no_grad():
                    F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1, eps=EPS)

            def t_eval():
                with torch.no_grad():
                    F.batch_norm(tx, trm, trv, tw, tb, training=False, eps=EPS)
            tor = {"train_fwd": t_fwd,
                   "train_bwd": lambda: torch.autograd.grad(ty, (tx, tw, tb), td, retain_graph=True),
                   "eval_fwd": t_eval}
        except Exception as exc:
            errors.append({"where": f"{where} torch setup", "error": _short(exc)})

    for op in OPS:
        series = {"ours": ours[op], "launcher": launcher[op]}
        series.update({f"bare[{name}]": runs[op] for name, runs in bare.items()})
        if op in tor:
            series["torch"] = tor[op]
        med = _timed(timer, series, args.reps, args.warmup, errors, f"{where} {op}")
        row = {"shape": list(shape), "dtype": dtype, "op": op, "ours_ms": med["ours"],
               "launcher_ms": med["launcher"], "bare_ms": med.get("bare[default]"),
               "torch_ms": med.get("torch"), "errors": errs if op == "train_fwd" else None,
               "ok": ok}
        nbytes = BYTES[op] * x.nbytes
        if med["ours"]:
            row["bw"] = nbytes / (med["ours"] * 1e-3) / copy_bw
        if med.get("bare[default]"):
            row["bare_bw"] = nbytes / (med["bare[default]"] * 1e-3) / copy_bw
        if med["ours"] and med.get("torch"):
            row["ratio"] = med["ours"] / med["torch"]
        for who, fn in (("ours", ours[op]), ("torch", tor.get(op))):
            if fn is None:
                continue
            try:
                row[f"{who}_host_us"] = timer.host_us(fn)
                row[f"{who}_pipelined_ms"] = timer.pipelined_ms(fn)
            except Exception as exc:
                errors.append({"where": f"{where} {op} {who} host", "error": _short(exc)})
        rows.append(row)
        for name in bare:
            for v in variants:
                if v["variant"] == name and v["shape"] == list(shape) and v["dtype"] == dtype:
                    v[f"{op}_ms"] = med.get(f"bare[{name}]")
                    if v[f"{op}_ms"]:
                        v[f"{op}_bw"] = nbytes / (v[f"{op}_ms"] * 1e-3) / copy_bw
    return rows, variants


# ------------------------------------------------------------------------ main

def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_tables(res):
    print(f"\n{res['device']}: copy {res['copy_GBps']:.0f} GB/s; times in ms (median, one call "
          "between events); host us/call; pipe = ms/call back to back")
    print(f"{'shape':>16} {'dtype':>7} {'op':>9} | {'ours':>6} {'torch':>6} {'ratio':>5} "
          f"{'bw':>4} | {'launch':>6} {'bare':>6} {'bare bw':>7} | {'host':>5} {'t.host':>6} | "
          f"{'pipe':>6} {'t.pipe':>6} ok")
    for r in res["results"]:
        print(f"{'x'.join(map(str, r['shape'])):>16} {r['dtype']:>7} {r['op']:>9} | "
              f"{_fmt(r['ours_ms'], '6.3f')} {_fmt(r['torch_ms'], '6.3f')} "
              f"{_fmt(r.get('ratio'), '5.2f')} {_fmt(r.get('bw'), '4.2f')} | "
              f"{_fmt(r['launcher_ms'], '6.3f')} {_fmt(r['bare_ms'], '6.3f')} "
              f"{_fmt(r.get('bare_bw'), '7.2f')} | {_fmt(r.get('ours_host_us'), '5.0f')} "
              f"{_fmt(r.get('torch_host_us'), '6.0f')} | {_fmt(r.get('ours_pipelined_ms'), '6.3f')} "
              f"{_fmt(r.get('torch_pipelined_ms'), '6.3f')} {'ok' if r['ok'] else 'FAIL'}")
    if res["variants"]:
        print("\nbare launches per tuning variant (ms; bw):")
        for v in res["variants"]:
            cells = " ".join(f"{op} {_fmt(v.get(op + '_ms'), '6.3f')} ({_fmt(v.get(op + '_bw'), '4.2f')})"
                             for op in OPS)
            print(f"{'x'.join(map(str, v['shape'])):>16} {v['dtype']:>7} {v['layout']:>7} "
                  f"grid {str(tuple(v['grid'])):>12} {v['variant']:>26}: {cells} "
                  f"{'ok' if v['ok'] else 'FAIL'}")
    for e in res["errors"]:
        print(f"ERROR {e['where']}: {e['error']}")


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    import cupy as cp

    import gpulayers as gl
    from gpulayers.cuda import bn_kernels as K
    try:
        import torch
        if not torch.cuda.is_available() or args.no_torch:
            torch = None
    except Exception:
        torch = None
    if torch is not None:
        torch.backends.cudnn.benchmark = False

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    timer = timing.CupyClock()
    copy_bw = harness.copy_bandwidth(cp, 1 << 30)[0] * 1e9   # bytes/s
    res = {"device": name, "sms": props["multiProcessorCount"], "cupy": cp.__version__,
           "torch": getattr(torch, "__version__", None), "python": platform.python_version(),
           "copy_GBps": copy_bw / 1e9, "tuning_default": dict(K.TUNING), "reps": args.reps,
           "results": [], "variants": [], "errors": []}
    t0 = time.perf_counter()
    K.bn_train_forward_gpu(cp.ones((2, 2, 2, 2), np.float32), cp.ones(2, np.float32),
                           cp.zeros(2, np.float32), EPS)  # compile (or load from the disk cache)
    cp.cuda.Device().synchronize()
    res["compile_s"] = time.perf_counter() - t0

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    jobs = [(s, d) for d in dtypes for s in shapes]
    for k, (shape, dtype) in enumerate(jobs):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget:
            res["errors"].append({"where": f"{shape} {dtype}", "error": "skipped: over budget"})
            continue
        with_variants = not args.no_variants and elapsed < 0.6 * args.budget
        try:
            rows, variants = run_shape(cp, K, gl, torch, shape, dtype, args, timer, copy_bw,
                                       res["errors"], with_variants)
            res["results"] += rows
            res["variants"] += variants
        except Exception as exc:
            res["errors"].append({"where": f"{shape} {dtype}", "error": _short(exc),
                                  "traceback": traceback.format_exc()[-2000:]})
        cp.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()
    res["total_s"] = time.perf_counter() - t_start
    print_tables(res)
    print(f"\ntotal {res['total_s']:.1f} s (compile {res['compile_s']:.1f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "tune_bn.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=float)
        print(f"wrote {path}")
    return 1 if any(not r["ok"] for r in res["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
