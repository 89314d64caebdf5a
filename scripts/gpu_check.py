#!/usr/bin/env python
"""Everything a CUDA machine should tell us, in one call.

    PYTHONPATH=. python scripts/gpu_check.py            # on the GPU machine; output in $OUT
    python scripts/gpu_check.py --dry-run --out /tmp/gc  # here: NumPy + PyTorch CPU, tiny shapes

Stages, each guarded so that one failure is recorded and the rest go on:

1. compare: CUDA kernels vs the general xp path on CuPy vs NumPy, for max
   pooling (exact: outputs, argmax indices, gradients -- dout holds small
   integers, so sums of gradients are exact in any order) and spatial batch
   norm (normwise error against a float64 NumPy reference; tolerance 1e-10
   float64, 1e-5 float32, 1e-2 float16); on a GPU also the pooling kernels over
   1, 2 and 3 axes (gpulayers/cuda/pool_nd_kernels.py): 1-D/2-D max pooling and
   2-D unpooling exactly against the xp path on CuPy and NumPy, 3-D max and
   adaptive max values exactly and average pooling (normwise) against PyTorch; and the
   channels-last kernels (channels_last=True) and bfloat16: bit for bit against the
   channels-first kernels on the transposed input, against PyTorch's channels_last
   (channels_last_3d) tensors (max exactly, average and batch norm normwise), batch norm
   over (N, H, W, C) run as its (N*H*W, C, 1, 1) matrix;
2. timing: CUDA events, warm-up, round-robin, medians, on data larger than L2,
   against PyTorch on the same card; a device-to-device copy bandwidth from
   the same run is the ceiling for the bandwidth fraction; on a GPU a second
   table times the pool_nd kernels against PyTorch ($OUT/pool_nd_timing.json), with
   channels-last rows (ours on (N, *spatial, C) arrays, PyTorch on channels_last tensors)
   and bfloat16 rows; a third times the gpulayers.torch ops against torch's native ops
   on the same CUDA tensors, forward and forward+backward, contiguous and
   channels_last, with the bytes each saves for backward
   ($OUT/torch_bridge_timing.json);
3. the results JSON, written to benchmarks/results/<date>-<gpu>.json and $OUT
   (written once before the test suite runs, and again with its counts);
   without a usable GPU (and without --dry-run) the script says why on
   stderr and exits 1 before it writes anything, anywhere;
4. the test suite with CuPy usable (pytest in a subprocess with a timeout;
   log in $OUT/pytest.log);
5. a short table, printed last.

Only the ``Device`` class knows about CuPy and torch.cuda; ``--dry-run``
swaps it for NumPy, perf_counter and PyTorch CPU, so all the rest runs here.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))   # harness.py

try:
    import gpulayers as gl
    import harness as B
    from gpulayers.distributed import LocalComm
except Exception as _exc:  # still leave a results JSON that says why
    _out = os.environ.get("OUT") or "./gpu_check_out"
    os.makedirs(_out, exist_ok=True)
    with open(os.path.join(_out, "import-failed.json"), "w", encoding="utf-8") as _f:
        json.dump({"device": "unknown", "date": time.strftime("%Y-%m-%d"), "commit":
                   os.environ.get("GPULAYERS_COMMIT", "unknown"), "cupy": "none", "torch": "none",
                   "copy_GBps": None, "tests": {"passed": 0, "failed": 0, "skipped": 0},
                   "cases": [], "error": f"import gpulayers failed: {_exc!r}"}, _f, indent=1)
    traceback.print_exc()
    sys.exit(f"import gpulayers failed: {_exc!r}")

MP3 = {"pool_height": 3, "pool_width": 3, "stride": 2, "pad": 1}
MP2 = {"pool_height": 2, "pool_width": 2, "stride": 2}
BN = {"eps": 1e-5, "momentum": 0.9}
TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2}


def _np_dtype(name):
    """np.dtype of a dtype name; 'bfloat16' is ml_dtypes.bfloat16 (what CuPy >= 14 holds)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _host64(a):
    """float64 NumPy copy of a NumPy/CuPy array or a torch tensor (bfloat16 too)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        return a.detach().double().cpu().numpy()
    return B.to_host(a).astype(np.float64)

# timing shapes: (op family, shape, params)
GPU_POOL = [((256, 64, 112, 112), MP3), ((128, 128, 112, 112), MP2)]
GPU_BN = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7), (32, 64, 56, 56)]
DRY_POOL = [((2, 4, 10, 10), MP3), ((2, 4, 8, 8), MP2)]
DRY_BN = [(2, 4, 6, 6), (3, 8, 5, 5)]

# correctness shapes
CMP_POOL = [((2, 3, 7, 9), MP3), ((4, 8, 16, 16), MP2),
            ((2, 4, 10, 11), {"pool_height": 3, "pool_width": 3, "stride": 2, "pad": 1,
                              "dilation": 2}),
            ((2, 4, 8, 8), {"pool_height": 3, "pool_width": 3, "stride": 2, "ceil_mode": True}),
            ((8, 64, 56, 56), MP3)]
CMP_BN = [(4, 3, 5, 7), (8, 16, 14, 14), (2, 2048, 7, 7), (32, 64, 56, 56)]
DRY_CMP_POOL = CMP_POOL[:4]
DRY_CMP_BN = CMP_BN[:2]
SMOKE_POOL, SMOKE_BN = DRY_POOL[:1], DRY_BN[:1]


class Tee:
    """Write to the terminal and to a log file."""

    def __init__(self, stream, path):
        self.stream = stream
        self.file = open(path, "a", encoding="utf-8")

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()


def say(text=""):
    print(text, flush=True)


# ------------------------------------------------------------------- the device


class Device:
    """The thin device-specific part: array module, clocks, PyTorch device,
    memory release, copy bandwidth, name. ``dry_run``: NumPy and the CPU."""

    def __init__(self, dry_run, no_torch):
        self.dry_run = dry_run
        self.cupy_version = None
        self.notes = []  # said once the log is open
        if not dry_run:  # before importing torch: without a GPU there is nothing to do
            reason = gl.backend.cupy_unusable_reason()
            if reason:
                raise RuntimeError(f"CuPy is not usable: {reason}")
        # dry run: one PyTorch thread (a rehearsal of the logic, not a CPU benchmark;
        # several threads on a busy small machine make tiny ops wait for each other)
        torch = None if no_torch else B.import_torch(1 if dry_run else None)
        if dry_run:
            self.xp = np
            self.clock = B.CPUClock()
            self.name = f"cpu (dry run, {os.cpu_count()} cores)"
            self.torch = torch
            self.torch_clock = B.CPUClock()
            self.ours, self.peer = "fast", "torch-cpu"
            return
        import cupy
        self.xp = cupy
        self.cupy_version = cupy.__version__
        self.clock = B.CupyClock()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.l2_bytes = int(props.get("l2CacheSize", 0))
        if torch is not None and not torch.cuda.is_available():
            self.notes.append("note: torch does not see CUDA; no PyTorch peer")
            torch = None
        self.torch = torch
        self.torch_clock = B.CupyClock() if torch is not None else None
        self.ours, self.peer = "cuda-kernels", "torch-cuda"

    def to_device(self, a):
        return self.xp.asarray(a)

    def free(self):
        gc.collect()
        if not self.dry_run:
            self.xp.cuda.Device().synchronize()
            self.xp.get_default_memory_pool().free_all_blocks()
            self.xp.get_default_pinned_memory_pool().free_all_blocks()
            if self.torch is not None:
                self.torch.cuda.empty_cache()

    def copy_bandwidth(self):
        if self.dry_run:
            return B.copy_bandwidth(np, 16 << 20)[0], "np.copyto 16 MiB"
        gbps, detail = B.copy_bandwidth(self.xp, 1 << 30)
        return gbps, "1 GiB; " + ", ".join(f"{k} {v:.0f} GB/s" for k, v in detail.items())


# ------------------------------------------------------------------- 1. compare


def _exact(a, b):
    """Number of positions where a and b differ (NaN equals NaN)."""
    a, b = B.to_host(a), B.to_host(b)
    if a.shape != b.shape:
        return -1
    if a.dtype.name == "bfloat16" or b.dtype.name == "bfloat16":
        a, b = a.astype(np.float64), b.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else (a == b)
    return int((~same).sum())


def _normwise(a, ref):
    a = B.to_host(a).astype(np.float64)
    ref = B.to_host(ref).astype(np.float64)
    if a.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-300))


def compare_pool(dev, shape, params, dtype, rng, rows):
    x = rng.standard_normal(shape).astype(dtype)
    # ties (values on a coarse grid), NaN and -inf, to test the semantics too
    x[0, 0] = np.round(x[0, 0] * 2) / 2
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, 3, replace=False)] = np.nan
    flat[rng.choice(flat.size, 3, replace=False)] = -np.inf
    xd = dev.to_device(x)
    out_k, cache_k = gl.max_pool_forward(xd, params)
    out_g, cache_g = gl.max_pool_forward_general(xd, params)
    out_n, cache_n = gl.max_pool_forward(x, params)
    dout = rng.integers(-8, 9, size=out_n.shape).astype(dtype)  # exact sums in any order
    dd = dev.to_device(dout)
    dx_k = gl.max_pool_backward(dd, cache_k)
    dx_g = gl.max_pool_backward_general(dd, cache_g)
    dx_n = gl.max_pool_backward(dout, cache_n)
    idx = {k: gl.max_pool_indices(c) for k, c in (("k", cache_k), ("g", cache_g), ("n", cache_n))}
    where = f"max_pool {shape} {dtype} {B.pool_params_str(params)}"
    for what, a, b in (("out kernel vs numpy", out_k, out_n), ("out xp vs numpy", out_g, out_n),
                       ("indices kernel vs numpy", idx["k"], idx["n"]),
                       ("indices xp vs numpy", idx["g"], idx["n"]),
                       ("dx kernel vs numpy", dx_k, dx_n), ("dx xp vs numpy", dx_g, dx_n)):
        bad = _exact(a, b)
        rows.append({"check": where, "quantity": what, "error": bad, "tol": 0, "ok": bad == 0,
                     "unit": "differing elements"})


def _bn_all(fwd, bwd, x, gamma, beta, dout, mode, comm=None):
    p = dict(BN, mode="train")
    if comm is not None:   # synchronized BN: its own kernels (bn_stats_merge, one collective)
        p["comm"] = comm
    out, cache = fwd(x, gamma, beta, p)
    dx, dgamma, dbeta = bwd(dout, cache)
    if mode == "train":
        return {"out": out, "dx": dx, "dgamma": dgamma, "dbeta": dbeta,
                "running_mean": p["running_mean"], "running_var": p["running_var"]}
    p["mode"] = "test"
    out_e, cache_e = fwd(x, gamma, beta, p)
    dx_e, _, _ = bwd(dout, cache_e)
    return {"eval out": out_e, "eval dx": dx_e}


def compare_bn(dev, shape, dtype, rng, rows):
    C = shape[1]
    x64 = rng.standard_normal(shape) * 2.0 + 3.0
    g64 = 1.0 + 0.2 * rng.standard_normal(C)
    b64 = 0.2 * rng.standard_normal(C)
    d64 = rng.standard_normal(shape)
    x, g, b, d = (a.astype(dtype) for a in (x64, g64, b64, d64))
    # reference: the same (rounded) values, computed in float64 on NumPy
    args64 = [a.astype(np.float64) for a in (x, g, b, d)]
    tol = TOL[str(np.dtype(dtype))]
    for mode in ("train", "eval"):
        ref = _bn_all(gl.spatial_batchnorm_forward_general, gl.spatial_batchnorm_backward_general,
                      *args64, mode)
        dev_args = [dev.to_device(a) for a in (x, g, b, d)]
        got = {
            "kernel": _bn_all(gl.spatial_batchnorm_forward, gl.spatial_batchnorm_backward,
                              *dev_args, mode),
            "xp": _bn_all(gl.spatial_batchnorm_forward_general,
                          gl.spatial_batchnorm_backward_general, *dev_args, mode),
            "sync kernel (LocalComm)": _bn_all(
                gl.spatial_batchnorm_forward, gl.spatial_batchnorm_backward, *dev_args, mode,
                comm=LocalComm()),
            "numpy": _bn_all(gl.spatial_batchnorm_forward, gl.spatial_batchnorm_backward,
                             x, g, b, d, mode),
        }
        where = f"spatial_bn {mode} {shape} {dtype}"
        for impl, res in got.items():
            for q, v in res.items():
                err = _normwise(v, ref[q])
                rows.append({"check": where, "quantity": f"{q} {impl} vs float64",
                             "error": err, "tol": tol, "ok": bool(err <= tol),
                             "unit": "max|diff|/max|ref|"})
        for q in got["kernel"]:
            err = _normwise(got["kernel"][q], got["xp"][q])
            rows.append({"check": where, "quantity": f"{q} kernel vs xp", "error": err,
                         "tol": tol, "ok": bool(err <= tol), "unit": "max|diff|/max|ref|"})


# pool_nd kernels (GPU only): (family, x shape, params), checked in float32, float16, float64
CMP_ND = [("max", (2, 3, 11), dict(kernel_size=3, stride=2, pad=1, dilation=2, ceil_mode=True)),
          ("max", (2, 4, 10, 11), dict(kernel_size=3, stride=2, pad=1, dilation=2)),
          ("max", (2, 3, 7, 9, 8), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
          ("avg", (2, 3, 12), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
          ("avg", (2, 3, 6, 8), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
          ("avg", (2, 3, 6, 5, 8), dict(kernel_size=(2, 3, 3), stride=2, pad=1)),
          ("adaptive", (2, 3, 10), 3), ("adaptive", (2, 3, 7, 9), (3, 4)),
          ("adaptive", (2, 3, 5, 6, 7), (2, 3, 4)),
          ("unpool", (4, 8, 16, 16), dict(pool_height=2, pool_width=2, stride=2))]
AVG_ND_OPTIONS = [(True, None), (False, None), (False, 1)]


def _nd_row(rows, where, what, bad, tol=0, unit="differing elements"):
    ok = bad == 0 if tol == 0 else bool(bad <= tol)
    rows.append({"check": where, "quantity": what, "error": bad, "tol": tol, "ok": ok,
                 "unit": unit})


def _normwise_finite(a, ref):
    """_normwise over the positions where ref is finite; inf when the NaN/inf positions (or
    the infinities' signs) differ."""
    a = B.to_host(a).astype(np.float64)
    ref = B.to_host(ref).astype(np.float64)
    if a.shape != ref.shape:
        return float("inf")
    finite = np.isfinite(ref)
    if not (np.array_equal(np.isnan(a), np.isnan(ref))
            and np.array_equal(a[np.isinf(ref)], ref[np.isinf(ref)])):
        return float("inf")
    return _normwise(a[finite], ref[finite]) if finite.any() else 0.0


def compare_pool_nd(dev, family, shape, params, dtype, rng, rows):
    """One pool_nd case: exact against the xp path on CuPy and NumPy where the package has
    one for the rank (1-D/2-D max pooling, 2-D unpooling), against PyTorch otherwise."""
    from gpulayers.cuda import pool_nd_kernels as nk
    from gpulayers.pooling import _max_pool_backward_xp, _max_pool_forward_xp
    xp, torch = dev.xp, dev.torch
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = np.nan
    x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = -np.inf
    xd = dev.to_device(x)
    where = f"pool_nd {family} {shape} {dtype} {params}"

    def t(a):
        return torch.as_tensor(a, device="cuda")
    if family == "unpool":  # indices of a max pool: unique targets, as PyTorch needs them
        out, cache = gl.max_pool_forward(xd, params)
        idx = gl.max_pool_indices(cache)
        ours, winners = nk.max_unpool_forward_gpu(out, idx, xd.shape, return_winners=True)
        ref_d, _ = gl.max_unpool_forward(out, idx, xd.shape)
        ref_n, _ = gl.max_unpool_forward(B.to_host(out), B.to_host(idx), x.shape)
        _nd_row(rows, where, "unpool kernel vs xp", _exact(ours, ref_d))
        _nd_row(rows, where, "unpool kernel vs numpy", _exact(ours, ref_n))
        dx = nk.max_unpool_backward_gpu(xd, idx, winners, out.shape)  # unique targets
        gather = xp.take_along_axis(xd.reshape(out.shape[:2] + (-1,)),
                                    idx.reshape(out.shape[:2] + (-1,)), axis=-1)
        _nd_row(rows, where, "unpool dx kernel vs gather", _exact(dx, gather.reshape(out.shape)))
        return
    if family == "adaptive":
        ageom = gl.shapes.adaptive_geometry(shape, params)
        out, off = nk.adaptive_max_pool_forward_gpu(xd, ageom)
        avg = nk.adaptive_avg_pool_forward_gpu(xd, ageom)
        if torch is not None:
            d = len(shape) - 2
            F = torch.nn.functional
            tmax = getattr(F, f"adaptive_max_pool{d}d")(t(xd), ageom.out)
            tavg = getattr(F, f"adaptive_avg_pool{d}d")(t(xd), ageom.out)
            _nd_row(rows, where, "adaptive max kernel vs torch",
                    _exact(out, tmax.cpu().numpy()))
            _nd_row(rows, where, "adaptive avg kernel vs torch",
                    _normwise_finite(avg, tavg.cpu().numpy()), TOL[dtype], "max|diff|/max|ref|")
        return
    geom = gl.shapes.pool_geometry(shape, params, op=family)
    if family == "max":
        out, off = nk.max_pool_forward_gpu(xd, geom)
        dout = rng.integers(-8, 9, size=geom.output_shape).astype(dtype)
        dx = nk.max_pool_backward_gpu(dev.to_device(dout), off, geom)
        if geom.d <= 2:  # the 2-D xp path; 1-D as an input row of height 1
            g2 = geom.as_2d()
            x2 = x.reshape(g2.input_shape)
            for label, a, dd in (("xp", xd.reshape(g2.input_shape), dev.to_device(dout)),
                                 ("numpy", x2, dout)):
                r_out, r_off = _max_pool_forward_xp(a, g2)
                r_dx = _max_pool_backward_xp(dd.reshape(g2.output_shape), r_off, g2)
                _nd_row(rows, where, f"out kernel vs {label}",
                        _exact(out, r_out.reshape(out.shape)))
                _nd_row(rows, where, f"offsets kernel vs {label}",
                        _exact(off, r_off.reshape(off.shape)))
                _nd_row(rows, where, f"dx kernel vs {label}", _exact(dx, r_dx.reshape(dx.shape)))
        elif torch is not None:
            F = torch.nn.functional
            r = F.max_pool3d(t(xd), geom.kernel, geom.stride, geom.pad, geom.dilation,
                             geom.ceil_mode)
            _nd_row(rows, where, "out kernel vs torch", _exact(out, r.cpu().numpy()))
        return
    if torch is not None:  # avg
        d = geom.d
        for cip, div in AVG_ND_OPTIONS:
            if d == 1 and div is not None:
                continue  # avg_pool1d has no divisor_override
            out = nk.avg_pool_forward_gpu(xd, geom, cip, div)
            r = getattr(torch.nn.functional, f"avg_pool{d}d")(
                t(xd), geom.kernel, geom.stride, geom.pad, geom.ceil_mode, cip,
                **({} if d == 1 else {"divisor_override": div}))
            _nd_row(rows, where, f"avg cip={cip} div={div} kernel vs torch",
                    _normwise_finite(out, r.cpu().numpy()), TOL[dtype], "max|diff|/max|ref|")


# channels-last and bfloat16 (GPU only): (family, channels-first x shape, params)
CMP_LAYOUT = [("max", (4, 40, 15, 17), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
              ("max", (2, 24, 6, 9, 11), dict(kernel_size=3, stride=2, pad=1)),
              ("avg", (4, 40, 15, 17), dict(kernel_size=3, stride=2, pad=1, ceil_mode=True)),
              ("avg", (2, 24, 6, 9, 11), dict(kernel_size=(2, 3, 3), stride=2, pad=1)),
              ("adaptive", (4, 40, 9, 13), (3, 4)), ("adaptive", (2, 24, 5, 6, 7), (2, 3, 4)),
              ("bn", (8, 14, 14, 96), None), ("bn", (4, 7, 7, 2048), None)]
LAYOUT_DTYPES = ("float32", "float16", "bfloat16")


def compare_layouts(dev, family, shape, params, dtype, rng, rows):
    """One channels-last case: our channels_last=True kernels on (N, *spatial, C) data
    against our channels-first kernels on the transposed data (bit for bit) and against
    PyTorch on a channels_last tensor; bfloat16 rows compare our channels-first kernels
    with PyTorch's bfloat16 too. Batch norm: shape is (N, H, W, C), normalised as the
    (N*H*W, C, 1, 1) matrix, against float64 NumPy and PyTorch's channels_last batch_norm."""
    from gpulayers.cuda import bn_kernels
    from gpulayers.cuda import pool_nd_kernels as nk
    xp, torch = dev.xp, dev.torch
    npd = _np_dtype(dtype)
    where = f"layout {family} {shape} {dtype} {params}"

    def last(a):
        return xp.ascontiguousarray(xp.moveaxis(a, 1, -1))

    def t(a, channels_last=True):  # a torch CUDA tensor of the same values
        tt = torch.as_tensor(_host64(a), device="cuda").to(getattr(torch, dtype))
        if channels_last and tt.ndim >= 4:
            tt = tt.contiguous(memory_format=torch.channels_last if tt.ndim == 4
                               else torch.channels_last_3d)
        return tt

    def moved(r):  # a torch result (N, C, *spatial) as (N, *spatial, C) float64
        return np.moveaxis(_host64(r), 1, -1)

    if family == "bn":
        C = shape[-1]
        x = (rng.standard_normal(shape) * 2 + 1).astype(npd)
        gamma = (1 + 0.2 * rng.standard_normal(C)).astype(np.float32)
        beta = (0.2 * rng.standard_normal(C)).astype(np.float32)
        M = x.size // C
        y, mean, var, _ = bn_kernels.bn_train_forward_gpu(
            dev.to_device(x).reshape(M, C, 1, 1), dev.to_device(gamma), dev.to_device(beta),
            BN["eps"])
        x64 = x.astype(np.float64).reshape(M, C)
        ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + BN["eps"]) * gamma + beta
        tol = TOL[dtype]
        _nd_row(rows, where, "bn y kernel vs float64", _normwise(_host64(y).reshape(M, C), ref),
                tol, "max|diff|/max|ref|")
        _nd_row(rows, where, "bn var kernel vs float64", _normwise(var, x64.var(0)),
                TOL["float32"], "max|diff|/max|ref|")
        if torch is not None:
            tx = t(np.moveaxis(x, -1, 1))
            ty = torch.nn.functional.batch_norm(tx, None, None,
                                                torch.as_tensor(gamma, device="cuda"),
                                                torch.as_tensor(beta, device="cuda"), True, 0.1,
                                                BN["eps"])
            _nd_row(rows, where, "bn y kernel vs torch channels_last",
                    _normwise(_host64(y).reshape(shape), moved(ty)), tol, "max|diff|/max|ref|")
        return
    x = rng.standard_normal(shape).astype(npd)
    x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = np.nan
    x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = -np.inf
    xd = dev.to_device(x)
    xl = last(xd)
    F = torch.nn.functional if torch is not None else None
    d = len(shape) - 2
    if family == "adaptive":
        ageom = gl.shapes.adaptive_geometry(shape, params)
        out, off = nk.adaptive_max_pool_forward_gpu(xd, ageom)
        out_l, off_l = nk.adaptive_max_pool_forward_gpu(xl, ageom, channels_last=True)
        avg = nk.adaptive_avg_pool_forward_gpu(xd, ageom)
        avg_l = nk.adaptive_avg_pool_forward_gpu(xl, ageom, channels_last=True)
        _nd_row(rows, where, "adaptive max channels-last vs first", _exact(out_l, last(out)))
        _nd_row(rows, where, "adaptive offsets channels-last vs first", _exact(off_l, last(off)))
        _nd_row(rows, where, "adaptive avg channels-last vs first", _exact(avg_l, last(avg)))
        if F is not None:
            tmax = getattr(F, f"adaptive_max_pool{d}d")(t(x), ageom.out)
            tavg = getattr(F, f"adaptive_avg_pool{d}d")(t(x), ageom.out)
            _nd_row(rows, where, "adaptive max channels-last vs torch",
                    _exact(_host64(out_l), moved(tmax)))
            _nd_row(rows, where, "adaptive avg channels-last vs torch",
                    _normwise_finite(_host64(avg_l), moved(tavg)), TOL[dtype],
                    "max|diff|/max|ref|")
        return
    geom = gl.shapes.pool_geometry(shape, params, op=family)
    dout = rng.integers(-8, 9, size=geom.output_shape).astype(npd)  # exact sums
    dd = dev.to_device(dout)
    if family == "max":
        out, off = nk.max_pool_forward_gpu(xd, geom)
        dx = nk.max_pool_backward_gpu(dd, off, geom)
        out_l, off_l = nk.max_pool_forward_gpu(xl, geom, channels_last=True)
        dx_l = nk.max_pool_backward_gpu(last(dd), off_l, geom, channels_last=True)
        _nd_row(rows, where, "max out channels-last vs first", _exact(out_l, last(out)))
        _nd_row(rows, where, "max offsets channels-last vs first", _exact(off_l, last(off)))
        _nd_row(rows, where, "max dx channels-last vs first", _exact(dx_l, last(dx)))
        if F is not None:
            r = getattr(F, f"max_pool{d}d")(t(x), geom.kernel, geom.stride, geom.pad,
                                            geom.dilation, geom.ceil_mode)
            _nd_row(rows, where, "max out channels-last vs torch",
                    _exact(_host64(out_l), moved(r)))
        return
    for cip, div in AVG_ND_OPTIONS:
        out = nk.avg_pool_forward_gpu(xd, geom, cip, div)
        out_l = nk.avg_pool_forward_gpu(xl, geom, cip, div, channels_last=True)
        dx = nk.avg_pool_backward_gpu(dd, geom, cip, div)
        dx_l = nk.avg_pool_backward_gpu(last(dd), geom, cip, div, channels_last=True)
        _nd_row(rows, where, f"avg cip={cip} div={div} channels-last vs first",
                _exact(out_l, last(out)))
        _nd_row(rows, where, f"avg dx cip={cip} div={div} channels-last vs first",
                _exact(dx_l, last(dx)))
        if F is not None:
            r = getattr(F, f"avg_pool{d}d")(t(x), geom.kernel, geom.stride, geom.pad,
                                            geom.ceil_mode, cip, divisor_override=div)
            _nd_row(rows, where, f"avg cip={cip} div={div} channels-last vs torch",
                    _normwise_finite(_host64(out_l), moved(r)), TOL[dtype],
                    "max|diff|/max|ref|")


def stage_compare(dev, args, rng):
    rows = []
    pools = DRY_CMP_POOL if dev.dry_run else CMP_POOL
    bns = DRY_CMP_BN if dev.dry_run else CMP_BN
    dtypes = ("float32", "float16", "float64")
    if args.smoke:
        pools, bns, dtypes = pools[-1:], bns[:1], ("float32",)
    jobs = [("pool", s, p, dt) for s, p in pools for dt in dtypes]
    jobs += [("bn", s, None, dt) for s in bns for dt in dtypes]
    if not dev.dry_run and not args.smoke:  # the pool_nd kernels need CuPy
        jobs += [(f"nd-{fam}", s, p, dt) for fam, s, p in CMP_ND for dt in dtypes]
        jobs += [(f"layout-{fam}", s, p, dt) for fam, s, p in CMP_LAYOUT
                 for dt in LAYOUT_DTYPES]
    for kind, shape, params, dtype in jobs:
        try:
            if kind == "pool":
                compare_pool(dev, shape, params, dtype, rng, rows)
            elif kind.startswith("layout-"):
                compare_layouts(dev, kind[7:], shape, params, dtype, rng, rows)
            elif kind.startswith("nd-"):
                compare_pool_nd(dev, kind[3:], shape, params, dtype, rng, rows)
            else:
                compare_bn(dev, shape, dtype, rng, rows)
        except Exception as exc:
            rows.append({"check": f"{kind} {shape} {dtype}", "quantity": "ran", "ok": False,
                         "error": f"{type(exc).__name__}: {exc}"[:400], "tol": None, "unit": ""})
            say(traceback.format_exc(limit=4))
        dev.free()
    bad = [r for r in rows if not r["ok"]]
    say(f"\n== compare: {len(rows) - len(bad)}/{len(rows)} checks within tolerance")
    worst = {}
    for r in rows:
        if isinstance(r["error"], (int, float)):
            key = (r["check"].split()[0], r["quantity"].split()[-1] if "float64" in r["quantity"]
                   else r["quantity"])
            worst[key] = max(worst.get(key, 0), r["error"])
    for r in bad:
        say(f"  FAIL {r['check']}: {r['quantity']}: {r['error']} (tol {r['tol']})")
    by_dtype = {}
    for r in rows:
        if r["check"].startswith("spatial_bn") and isinstance(r["error"], float):
            dt = r["check"].split()[-1]
            by_dtype[dt] = max(by_dtype.get(dt, 0.0), r["error"])
    for dt, err in sorted(by_dtype.items()):
        say(f"  spatial BN max normwise error, {dt}: {err:.2e} (tol {TOL[dt]:g})")
    n_pool = [r for r in rows if r["check"].startswith("max_pool")]
    say(f"  max pool exact comparisons: {sum(r['ok'] for r in n_pool)}/{len(n_pool)} identical")
    n_nd = [r for r in rows if r["check"].startswith("pool_nd")]
    say(f"  pool_nd kernel checks: {sum(r['ok'] for r in n_nd)}/{len(n_nd)} ok"
        + ("" if n_nd else " (none: they need CuPy)"))
    n_layout = [r for r in rows if r["check"].startswith("layout")]
    say(f"  channels-last / bfloat16 checks: {sum(r['ok'] for r in n_layout)}/{len(n_layout)} ok"
        + ("" if n_layout else " (none: they need CuPy)"))
    return rows


# -------------------------------------------------------------------- 2. timing


def timing_cases(dev, smoke=False):
    pools = DRY_POOL if dev.dry_run else GPU_POOL
    bns = DRY_BN if dev.dry_run else GPU_BN
    dtypes = ("float32", "float16")
    if smoke:
        pools, bns, dtypes = SMOKE_POOL, SMOKE_BN, ("float32",)
    cases = []
    for dtype in dtypes:
        for shape, params in pools:
            for op in ("max_pool_forward", "max_pool_backward"):
                cases.append(B.Case(op, shape, dtype, dict(params)))
        for shape in bns:
            for op in ("spatial_batchnorm_forward", "spatial_batchnorm_backward",
                       "spatial_batchnorm_eval_forward"):
                cases.append(B.Case(op, shape, dtype, dict(BN)))
    return cases


def stage_timing(dev, args, rng, copy_gbps, errors):
    results = []
    cases = timing_cases(dev, args.smoke)
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        try:
            B.build_case(case, dev.xp, ["fast"], dev.clock, dev.torch, dev.torch_clock,
                         rng=rng, check=False)
            case.outputs.clear()
            B.round_robin(case.entries, args.reps, args.warmup)
            row = B.result_case(case, dev.ours, dev.peer, copy_gbps)
            problems = list(case.notes) + [f"{e.name}: {e.error}" for e in case.entries if e.error]
            if problems:
                errors.append({"case": f"{case.op} {case.shape} {case.dtype}",
                               "error": "; ".join(problems)[:600]})
            if row is not None:
                results.append(row)
                say(f"  [{i + 1}/{len(cases)}] {case.op:<31} {str(case.shape):<20} {case.dtype:<8}"
                    f" ours {row['gpulayers_ms']:8.3f} ms  torch "
                    f"{row['torch_ms'] if row['torch_ms'] is not None else float('nan'):8.3f} ms  "
                    f"bw {row['bandwidth_fraction']:.2f}  ({time.perf_counter() - t0:.1f} s)")
            else:
                say(f"  [{i + 1}/{len(cases)}] {case.op} {case.shape} {case.dtype}: no time "
                    f"({'; '.join(problems)[:300]})")
        except Exception as exc:
            errors.append({"case": f"{case.op} {case.shape} {case.dtype}",
                           "error": f"{type(exc).__name__}: {exc}"[:600]})
            say(f"  [{i + 1}/{len(cases)}] {case.op} {case.shape} {case.dtype} FAILED: "
                f"{type(exc).__name__}: {exc}"[:400])
        for e in case.entries:
            e.fn = None
        case.entries = [B.Timed(e.name, None, None, error=e.error, samples=e.samples)
                        for e in case.entries]
        case.forward_fns.clear()
        case.backward_fns.clear()
        dev.free()
    return results


# pool_nd timing (GPU only): (name, x shape, params, our fn, torch fn), float32 and float16
def _nd_timing_cases():
    from gpulayers.cuda import pool_nd_kernels as nk
    P3 = dict(kernel_size=3, stride=2, pad=1)
    A3 = dict(kernel_size=2, stride=2)

    def max3(torch):
        def make(x):
            geom = gl.shapes.pool_geometry(x.shape, P3)
            out, off = nk.max_pool_forward_gpu(x, geom)
            return {"fwd": lambda: nk.max_pool_forward_gpu(x, geom),
                    "bwd": lambda: nk.max_pool_backward_gpu(out, off, geom)}

        def peer(t):
            out, idx = torch.nn.functional.max_pool3d(t, 3, 2, 1, return_indices=True)
            bwd = torch.ops.aten.max_pool3d_with_indices_backward
            return {"fwd": lambda: torch.nn.functional.max_pool3d(t, 3, 2, 1),
                    "bwd": lambda: bwd(out, t, [3] * 3, [2] * 3, [1] * 3, [1] * 3, False, idx)}
        return make, peer

    def avg3(torch):
        def make(x):
            geom = gl.shapes.pool_geometry(x.shape, A3, op="avg")
            out = nk.avg_pool_forward_gpu(x, geom, True, None)
            return {"fwd": lambda: nk.avg_pool_forward_gpu(x, geom, True, None),
                    "bwd": lambda: nk.avg_pool_backward_gpu(out, geom, True, None)}

        def peer(t):
            out = torch.nn.functional.avg_pool3d(t, 2, 2)
            bwd = torch.ops.aten.avg_pool3d_backward
            return {"fwd": lambda: torch.nn.functional.avg_pool3d(t, 2, 2),
                    "bwd": lambda: bwd(out, t, [2] * 3, [2] * 3, [0] * 3, False, True, None)}
        return make, peer

    def adaptive(kind, size):
        def cases(torch):
            def make(x):
                ageom = gl.shapes.adaptive_geometry(x.shape, size)
                if kind == "avg":
                    out = nk.adaptive_avg_pool_forward_gpu(x, ageom)
                    return {"fwd": lambda: nk.adaptive_avg_pool_forward_gpu(x, ageom),
                            "bwd": lambda: nk.adaptive_avg_pool_backward_gpu(out, ageom)}
                out, off = nk.adaptive_max_pool_forward_gpu(x, ageom)
                return {"fwd": lambda: nk.adaptive_max_pool_forward_gpu(x, ageom),
                        "bwd": lambda: nk.adaptive_max_pool_backward_gpu(out, off, ageom)}

            def peer(t):
                F = torch.nn.functional
                if kind == "avg":
                    out = F.adaptive_avg_pool2d(t, size)
                    bwd = torch.ops.aten._adaptive_avg_pool2d_backward
                    return {"fwd": lambda: F.adaptive_avg_pool2d(t, size),
                            "bwd": lambda: bwd(out, t)}
                out, idx = F.adaptive_max_pool2d(t, size, return_indices=True)
                bwd = torch.ops.aten.adaptive_max_pool2d_backward
                return {"fwd": lambda: F.adaptive_max_pool2d(t, size),
                        "bwd": lambda: bwd(out, t, idx)}
            return make, peer
        return cases

    def unpool(torch):
        def make(x):
            out, cache = gl.max_pool_forward(x, MP2)
            idx = gl.max_pool_indices(cache)
            _, won = nk.max_unpool_forward_gpu(out, idx, x.shape, return_winners=True)
            return {"fwd": lambda: nk.max_unpool_forward_gpu(out, idx, x.shape),
                    "bwd": lambda: nk.max_unpool_backward_gpu(x, idx, won, out.shape)}

        def peer(t):
            out, idx = torch.nn.functional.max_pool2d(t, 2, 2, return_indices=True)
            return {"fwd": lambda: torch.nn.functional.max_unpool2d(out, idx, 2, 2)}
        return make, peer

    def last_pool(kind, d, params):
        """Channels-last pooling: ours on (N, *spatial, C), PyTorch on channels_last."""
        def cases(torch):
            k, st, pd = params

            def make(x):
                cf = gl.shapes.to_channels_first_shape(x.shape, "channels_last")
                geom = gl.shapes.pool_geometry(cf, dict(kernel_size=k, stride=st, pad=pd),
                                               op=kind)
                if kind == "max":
                    out, off = nk.max_pool_forward_gpu(x, geom, channels_last=True)
                    return {"fwd": lambda: nk.max_pool_forward_gpu(x, geom, channels_last=True),
                            "bwd": lambda: nk.max_pool_backward_gpu(out, off, geom,
                                                                    channels_last=True)}
                out = nk.avg_pool_forward_gpu(x, geom, True, None, channels_last=True)
                return {"fwd": lambda: nk.avg_pool_forward_gpu(x, geom, True, None,
                                                               channels_last=True),
                        "bwd": lambda: nk.avg_pool_backward_gpu(out, geom, True, None,
                                                                channels_last=True)}

            def peer(t):
                fn = getattr(torch.nn.functional, f"{kind}_pool{d}d")
                t = t.requires_grad_(True)
                out = fn(t, k, st, pd)
                g = torch.ones_like(out)
                return {"fwd": lambda: fn(t, k, st, pd),
                        "bwd": lambda: torch.autograd.grad(out, t, g, retain_graph=True)}
            return make, peer
        return cases

    def last_adaptive_avg(torch):
        def make(x):
            cf = gl.shapes.to_channels_first_shape(x.shape, "channels_last")
            ageom = gl.shapes.adaptive_geometry(cf, 1)
            out = nk.adaptive_avg_pool_forward_gpu(x, ageom, channels_last=True)
            return {"fwd": lambda: nk.adaptive_avg_pool_forward_gpu(x, ageom,
                                                                    channels_last=True),
                    "bwd": lambda: nk.adaptive_avg_pool_backward_gpu(out, ageom,
                                                                     channels_last=True)}

        def peer(t):
            return {"fwd": lambda: torch.nn.functional.adaptive_avg_pool2d(t, 1)}
        return make, peer

    def last_bn(torch):
        from gpulayers.cuda import bn_kernels

        def make(x):
            import cupy
            C = x.shape[-1]
            m = x.reshape(-1, C, 1, 1)
            g = cupy.ones(C, dtype=np.float32)
            return {"fwd": lambda: bn_kernels.bn_train_forward_gpu(m, g, g, 1e-5)}

        def peer(t):
            C = t.shape[1]
            w = torch.ones(C, device="cuda")
            return {"fwd": lambda: torch.nn.functional.batch_norm(t, None, None, w, w, True,
                                                                  0.1, 1e-5)}
        return make, peer

    CL = "channels_last"
    return [("max_pool3d 3/2/1", (32, 64, 16, 56, 56), max3, None),
            ("avg_pool3d 2/2", (32, 64, 16, 56, 56), avg3, None),
            ("adaptive_avg -> 1", (256, 2048, 7, 7), adaptive("avg", 1), None),
            ("adaptive_max -> 7x7", (64, 256, 56, 56), adaptive("max", (7, 7)), None),
            ("max_unpool2d 2/2", (128, 128, 56, 56), unpool, None),
            ("NHWC max_pool2d 3/2/1", (256, 64, 112, 112), last_pool("max", 2, (3, 2, 1)), CL),
            ("NHWC avg_pool2d 2/2", (128, 128, 112, 112), last_pool("avg", 2, (2, 2, 0)), CL),
            ("NDHWC max_pool3d 3/2/1", (32, 64, 16, 56, 56), last_pool("max", 3, (3, 2, 1)), CL),
            ("NHWC adaptive_avg -> 1", (256, 2048, 7, 7), last_adaptive_avg, CL),
            ("NHWC batch_norm train", (256, 64, 56, 56), last_bn, CL)]


def _time_side_by_side(entries, args, label, errors):
    """Round-robin ``entries`` (ours first, then torch's if any): ({name: median ms or None},
    ours / torch or NaN); each entry's error is appended to ``errors`` under ``label``."""
    B.round_robin(entries, args.reps, args.warmup)
    ms = {e.name: B.median(e.samples) if e.error is None else None for e in entries}
    for e in entries:
        if e.error:
            errors.append({"case": f"{label} {e.name}", "error": e.error})
    ours, theirs = ms.get("ours"), ms.get("torch")
    return ms, (ours / theirs if ours and theirs else float("nan"))


def stage_nd_timing(dev, args, rng, out_dir, errors):
    """Our pool_nd kernels against PyTorch on the same card: median CUDA-event ms."""
    if dev.dry_run or args.smoke:
        say("  pool_nd timing: skipped (the kernels need CuPy)")
        return []
    rows = []
    torch = dev.torch
    for name, shape, cases, layout in _nd_timing_cases():
        for dtype in ("float32", "float16", "bfloat16"):
            if dtype == "bfloat16" and layout is None and "max_pool3d" not in name:
                continue  # bfloat16: the channels-last rows and one channels-first row
            try:
                make, peer = cases(torch)
                ours_shape = gl.shapes.from_channels_first_shape(shape, layout or
                                                                 "channels_first")
                x = dev.xp.random.standard_normal(ours_shape, dtype=np.float32).astype(
                    _np_dtype(dtype))
                ours = make(x)
                theirs = {}
                if torch is not None:
                    t = torch.randn(shape, device="cuda", dtype=getattr(torch, dtype))
                    if layout is not None:
                        t = t.contiguous(memory_format=torch.channels_last if t.ndim == 4
                                         else torch.channels_last_3d)
                    theirs = peer(t)
                for pass_, fn in ours.items():
                    entries = [B.Timed("ours", fn, dev.clock)]
                    if pass_ in theirs:
                        entries.append(B.Timed("torch", theirs[pass_], dev.torch_clock))
                    ms, ratio = _time_side_by_side(entries, args, f"pool_nd {name} {pass_} "
                                                   f"{dtype}", errors)
                    row = {"case": name, "pass": pass_, "shape": list(shape), "dtype": dtype,
                           "layout": layout or "channels_first",
                           "ours_ms": ms["ours"], "torch_ms": ms.get("torch")}
                    rows.append(row)
                    say(f"  {name:<22}{pass_:<4}{str(shape):<22}{dtype:<8}"
                        f" ours {row['ours_ms'] or float('nan'):8.3f} ms  torch "
                        f"{row['torch_ms'] or float('nan'):8.3f} ms  ratio {ratio:.2f}")
            except Exception as exc:
                errors.append({"case": f"pool_nd {name} {dtype}",
                               "error": f"{type(exc).__name__}: {exc}"[:600]})
                say(f"  pool_nd {name} {dtype} FAILED: {type(exc).__name__}: {exc}"[:400])
            dev.free()
    with open(os.path.join(out_dir, "pool_nd_timing.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return rows


def _saved_bytes(torch, fn, x):
    """Bytes autograd saves for backward in fn(x) (saved_tensors_hooks), and the output."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return sum(saved), out


def _torch_bridge_cases(torch):
    """(name, shape, ours(t), theirs(t)) for gpulayers.torch against torch.nn.functional."""
    import gpulayers.torch as GF
    F = torch.nn.functional
    return [
        ("max_pool2d 3x3/2 p1", (32, 64, 112, 112),
         lambda t: GF.max_pool2d(t, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1)),
        ("max_pool3d 3x3x3/2 p1", (8, 32, 16, 56, 56),
         lambda t: GF.max_pool3d(t, 3, 2, 1), lambda t: F.max_pool3d(t, 3, 2, 1)),
        ("avg_pool3d 3x3x3/2 p1", (8, 32, 16, 56, 56),
         lambda t: GF.avg_pool3d(t, 3, 2, 1), lambda t: F.avg_pool3d(t, 3, 2, 1)),
        ("adaptive_avg_pool2d 7", (32, 512, 14, 14),
         lambda t: GF.adaptive_avg_pool2d(t, 7), lambda t: F.adaptive_avg_pool2d(t, 7)),
        ("adaptive_max_pool2d 7", (32, 512, 14, 14),
         lambda t: GF.adaptive_max_pool2d(t, 7), lambda t: F.adaptive_max_pool2d(t, 7)),
        ("max_pool1d 3/2", (32, 64, 4096),
         lambda t: GF.max_pool1d(t, 3, 2), lambda t: F.max_pool1d(t, 3, 2)),
        ("avg_pool1d 3/2 p1", (32, 64, 4096),
         lambda t: GF.avg_pool1d(t, 3, 2, 1), lambda t: F.avg_pool1d(t, 3, 2, 1)),
        ("avg_pool2d 3x3/2 p1", (32, 64, 112, 112),
         lambda t: GF.avg_pool2d(t, 3, 2, 1), lambda t: F.avg_pool2d(t, 3, 2, 1)),
        ("max_pool3d 2x2x2", (8, 32, 16, 56, 56),
         lambda t: GF.max_pool3d(t, 2), lambda t: F.max_pool3d(t, 2)),
        ("adaptive_avg_pool1d 7", (32, 512, 196),
         lambda t: GF.adaptive_avg_pool1d(t, 7), lambda t: F.adaptive_avg_pool1d(t, 7)),
        ("adaptive_max_pool1d 7", (32, 512, 196),
         lambda t: GF.adaptive_max_pool1d(t, 7), lambda t: F.adaptive_max_pool1d(t, 7)),
        ("adaptive_avg_pool3d 4", (8, 64, 8, 28, 28),
         lambda t: GF.adaptive_avg_pool3d(t, 4), lambda t: F.adaptive_avg_pool3d(t, 4)),
        ("adaptive_max_pool3d 4", (8, 64, 8, 28, 28),
         lambda t: GF.adaptive_max_pool3d(t, 4), lambda t: F.adaptive_max_pool3d(t, 4)),
        ("max_pool2d+max_unpool2d 2x2", (32, 64, 112, 112),
         lambda t: GF.max_unpool2d(*GF.max_pool2d(t, 2, return_indices=True), 2),
         lambda t: F.max_unpool2d(*F.max_pool2d(t, 2, return_indices=True), 2)),
        ("max_pool1d+max_unpool1d 2", (32, 64, 4096),
         lambda t: GF.max_unpool1d(*GF.max_pool1d(t, 2, return_indices=True), 2),
         lambda t: F.max_unpool1d(*F.max_pool1d(t, 2, return_indices=True), 2)),
        ("max_pool3d+max_unpool3d 2", (8, 32, 16, 56, 56),
         lambda t: GF.max_unpool3d(*GF.max_pool3d(t, 2, return_indices=True), 2),
         lambda t: F.max_unpool3d(*F.max_pool3d(t, 2, return_indices=True), 2)),
        ("batch_norm train", (32, 64, 56, 56),
         _bn_case(torch, GF.batch_norm), _bn_case(torch, F.batch_norm)),
    ]


def _bn_case(torch, batch_norm):
    """t -> training-mode batch_norm of t with its own running statistics and affine."""
    state = {}

    def run(t):
        C = t.shape[1]
        if not state:
            state.update(rm=torch.zeros(C, device=t.device), rv=torch.ones(C, device=t.device),
                         w=torch.ones(C, device=t.device), b=torch.zeros(C, device=t.device))
        return batch_norm(t, state["rm"], state["rv"], state["w"], state["b"], training=True)
    return run


def stage_torch_timing(dev, args, out_dir, errors):
    """gpulayers.torch ops against torch's native ops on the same CUDA tensors: forward and
    forward+backward medians (CUDA events), contiguous and channels_last, and the bytes
    each saves for backward ($OUT/torch_bridge_timing.json)."""
    torch = dev.torch
    if dev.dry_run or args.smoke or torch is None:
        say("  gpulayers.torch timing: skipped (needs CuPy, a GPU and PyTorch)")
        return []
    rows = []
    for name, shape, ours, theirs in _torch_bridge_cases(torch):
        for layout in ("contiguous", "channels_last"):
            try:
                t = torch.randn(shape, device="cuda")
                if layout == "channels_last":
                    t = t.contiguous(memory_format=torch.channels_last if t.ndim == 4
                                     else torch.channels_last_3d)
                tg = t.detach().clone().requires_grad_()
                saved = {}
                fns = {}
                for who, fn in (("ours", ours), ("torch", theirs)):
                    saved[who], out = _saved_bytes(torch, fn, tg)
                    g = torch.ones_like(out)
                    fns[who] = {"fwd": (lambda fn=fn: fn(t)),
                                "fwd+bwd": (lambda fn=fn, g=g: fn(tg).backward(g))}
                for pass_ in ("fwd", "fwd+bwd"):
                    entries = [B.Timed("ours", fns["ours"][pass_], dev.torch_clock),
                               B.Timed("torch", fns["torch"][pass_], dev.torch_clock)]
                    ms, ratio = _time_side_by_side(entries, args, f"torch bridge {name} "
                                                   f"{layout} {pass_}", errors)
                    row = {"case": name, "pass": pass_, "shape": list(shape), "layout": layout,
                           "ours_ms": ms["ours"], "torch_ms": ms["torch"],
                           "ours_saved_bytes": saved["ours"],
                           "torch_saved_bytes": saved["torch"]}
                    rows.append(row)
                    say(f"  {name:<24}{layout:<14}{pass_:<8} ours {row['ours_ms'] or 0:8.3f} ms"
                        f"  torch {row['torch_ms'] or 0:8.3f} ms  ratio {ratio:.2f}  saved "
                        f"{saved['ours'] / 2**20:.1f} vs {saved['torch'] / 2**20:.1f} MiB")
            except Exception as exc:
                errors.append({"case": f"torch bridge {name} {layout}",
                               "error": f"{type(exc).__name__}: {exc}"[:600]})
                say(f"  torch bridge {name} {layout} FAILED: {type(exc).__name__}: {exc}"[:400])
            dev.free()
    with open(os.path.join(out_dir, "torch_bridge_timing.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return rows


# --------------------------------------------------------------------- 4. tests


def parse_pytest(text):
    """{'passed', 'failed', 'skipped'} from pytest -q output; errors count as
    failed. Without a summary line (timeout), count the progress characters."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    summary = None
    for line in text.splitlines():
        if re.search(r"\b\d+ (passed|failed|skipped|errors?)\b.* in [\d.]+s", line):
            summary = line
    if summary is not None:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary):
            key = {"error": "failed", "errors": "failed", "xfailed": "skipped",
                   "xpassed": "passed"}.get(word, word)
            counts[key] += int(n)
        return counts, True
    for line in text.splitlines():
        m = re.fullmatch(r"([.FEsxX]+)\s*(\[\s*\d+%\])?", line.strip())
        if m:
            s = m.group(1)
            counts["passed"] += s.count(".") + s.count("X")
            counts["failed"] += s.count("F") + s.count("E")
            counts["skipped"] += s.count("s") + s.count("x")
    return counts, False


def stage_tests(dev, args, out_dir):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + args.pytest_args
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    say(f"\n== tests: {' '.join(cmd)} (timeout {args.test_timeout} s)")
    t0 = time.perf_counter()
    timed_out = False
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=args.test_timeout)
        text = proc.stdout + proc.stderr
        rc = proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        err = exc.stderr or b""
        text = (out.decode(errors="replace") if isinstance(out, bytes) else out) + \
               (err.decode(errors="replace") if isinstance(err, bytes) else err)
        text += f"\n[gpu_check] pytest killed after {args.test_timeout} s\n"
        rc, timed_out = None, True
    with open(os.path.join(out_dir, "pytest.log"), "w", encoding="utf-8") as f:
        f.write(text)
    counts, complete = parse_pytest(text)
    say(f"  rc {rc}, {time.perf_counter() - t0:.0f} s, {counts}"
        f"{'' if complete else ' (no summary line: counted progress marks)'}"
        f"{' TIMED OUT' if timed_out else ''}; log in {os.path.join(out_dir, 'pytest.log')}")
    tail = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    for ln in tail[:30]:
        say(f"  {ln[:300]}")
    return counts, {"rc": rc, "timed_out": timed_out, "complete": complete}


# ----------------------------------------------------------------------- output


def write_results(doc, out_dir, results_dir):
    name = f"{doc['date']}-{B.slug(doc['device'])}.json"
    paths = [os.path.join(out_dir, name)]
    if results_dir:
        paths.insert(0, os.path.join(results_dir, name))
    try:
        B.write_json(doc, *paths)
    except Exception as exc:  # a bad field must not lose the run: write it raw
        say(f"results JSON did not validate ({exc}); writing it unvalidated")
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, default=str)
    return paths


def final_table(doc, checks, errors, test_info, paths):
    clock = "perf_counter" if "dry run" in doc["device"] else "CUDA-event"
    lines = ["", f"== summary (ms: median of {clock} times; ratio < 1: faster than torch;"
             " bw: fraction of copy bandwidth)",
             f"device {doc['device']}  copy {doc['copy_GBps']} GB/s  cupy {doc['cupy']}  "
             f"torch {doc['torch']}  commit {doc['commit'][:12]}",
             f"{'op':<31}{'shape':<20}{'dtype':<8}{'params':<14}{'ours':>9}{'torch':>9}"
             f"{'ratio':>7}{'bw':>6}"]
    for c in doc["cases"]:
        params = c["params"] if c["op"].startswith("max") else c["params"].split()[0]
        t = c["torch_ms"]
        lines.append(f"{c['op']:<31}{str(tuple(c['shape'])):<20}{c['dtype']:<8}{params[:13]:<14}"
                     f"{c['gpulayers_ms']:>9.3f}{t if t is not None else float('nan'):>9.3f}"
                     f"{c['ratio'] if c['ratio'] is not None else float('nan'):>7.2f}"
                     f"{c['bandwidth_fraction'] or float('nan'):>6.2f}")
    n_ok = sum(1 for r in checks if r["ok"])
    lines.append(f"compare: {n_ok}/{len(checks)} within tolerance; timing errors: {len(errors)}")
    for e in errors[:8]:
        lines.append(f"  error {e['case']}: {e['error'][:200]}")
    t = doc["tests"]
    lines.append(f"tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                 f"{' (TIMED OUT)' if test_info.get('timed_out') else ''}"
                 f"{' (not run)' if test_info.get('skipped') else ''}")
    lines.append("results JSON: " + ", ".join(paths))
    say("\n".join(lines))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="NumPy + PyTorch CPU on tiny shapes (exercises the logic without a GPU)")
    ap.add_argument("--smoke", action="store_true",
                    help="with --dry-run: one shape per op, float32, 2 reps, no test suite "
                         "(what tests/test_scripts.py runs)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./gpu_check_out)")
    ap.add_argument("--results-dir", default=None,
                    help="where the dated results JSON goes (default benchmarks/results; "
                         "'' for $OUT only; --dry-run defaults to $OUT only)")
    ap.add_argument("--reps", type=int, default=20, help="timed rounds per case")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    ap.add_argument("--test-timeout", type=int, default=240, help="seconds for the test suite")
    ap.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[],
                    help="extra pytest arguments (the rest of the command line)")
    ap.add_argument("--no-torch", action="store_true", help="no PyTorch peer")
    ap.add_argument("--seed", type=int, default=None)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.dry_run, args.skip_tests = True, True
        args.reps, args.warmup = min(args.reps, 2), min(args.warmup, 1)
    t_start = time.perf_counter()
    try:
        dev = Device(args.dry_run, args.no_torch)
    except Exception as exc:  # no GPU: say why, write nothing (no log, no results JSON)
        print(f"gpu_check: no usable GPU: {exc}; nothing written "
              "(--dry-run rehearses on the CPU)", file=sys.stderr, flush=True)
        return 1
    out_dir = os.path.abspath(args.out or os.environ.get("OUT") or "./gpu_check_out")
    os.makedirs(out_dir, exist_ok=True)
    stdout = sys.stdout
    sys.stdout = Tee(stdout, os.path.join(out_dir, "gpu_check.log"))
    try:
        return _run(args, dev, out_dir, t_start)
    finally:
        sys.stdout.file.close()
        sys.stdout = stdout


def _run(args, dev, out_dir, t_start):
    if args.results_dir is None:
        args.results_dir = "" if args.dry_run else os.path.join(REPO, "benchmarks", "results")
    rng = np.random.default_rng(args.seed)
    checks, errors, cases = [], [], []
    copy_gbps = None
    test_info = {"skipped": True}
    doc = B.results_document("unknown", None, [], commit=B.git_commit(REPO))
    paths = []
    for note in dev.notes:
        say(note)
    doc.update(device=dev.name, cupy=dev.cupy_version or "none",
               torch=dev.torch.__version__ if dev.torch is not None else "none")
    say(f"device {dev.name}; cupy {doc['cupy']}; torch {doc['torch']}; numpy {np.__version__}; "
        f"python {sys.version.split()[0]}; commit {doc['commit']}")
    if not dev.dry_run and dev.l2_bytes:
        say(f"L2 {dev.l2_bytes / 2**20:.0f} MiB")

    say("\n== compare: kernels vs xp-on-CuPy vs NumPy")
    try:
        checks = stage_compare(dev, args, rng)
    except Exception:
        say(traceback.format_exc())
    with open(os.path.join(out_dir, "checks.json"), "w", encoding="utf-8") as f:
        json.dump(checks, f, indent=1, default=str)

    say("\n== timing")
    try:
        copy_gbps, how = dev.copy_bandwidth()
        say(f"  copy bandwidth {copy_gbps:.1f} GB/s (bytes read + written; {how})")
        doc["copy_GBps"] = round(copy_gbps, 3)
        cases = stage_timing(dev, args, rng, copy_gbps, errors)
    except Exception as exc:
        errors.append({"case": "timing stage", "error": f"{type(exc).__name__}: {exc}"})
        say(traceback.format_exc())
    say("\n== timing: pool_nd kernels vs torch")
    try:
        stage_nd_timing(dev, args, rng, out_dir, errors)
    except Exception as exc:
        errors.append({"case": "pool_nd timing stage", "error": f"{type(exc).__name__}: {exc}"})
        say(traceback.format_exc())
    say("\n== timing: gpulayers.torch vs torch's native ops")
    try:
        stage_torch_timing(dev, args, out_dir, errors)
    except Exception as exc:
        errors.append({"case": "torch bridge timing stage",
                       "error": f"{type(exc).__name__}: {exc}"})
        say(traceback.format_exc())
    doc["cases"] = cases
    with open(os.path.join(out_dir, "errors.json"), "w", encoding="utf-8") as f:
        json.dump(errors, f, indent=1)
    paths = write_results(doc, out_dir, args.results_dir)
    say(f"  results JSON (tests pending) written: {paths}  ({time.perf_counter() - t_start:.0f} s)")

    if not args.skip_tests:
        try:
            dev.free()
            counts, test_info = stage_tests(dev, args, out_dir)
            doc["tests"] = counts
            paths = write_results(doc, out_dir, args.results_dir)
        except Exception:
            say(traceback.format_exc())
    say(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    final_table(doc, checks, errors, test_info, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
