"""The main job: ``python -m gpulayers``.

Prints the backends this machine can use (and why CuPy is not usable when it
isn't); on each usable backend runs forward and backward of every layer in
float32 on ResNet's stem shapes with a small batch (plus a 3-D max pool on an
(N, 16, 8, 28, 28) volume, global average pooling and channels-last batch norm),
checks the results against reference implementations, and prints a table of
timings in ms and GB/s with each case's shape and dtype. Exits non-zero when a
check fails.

Shapes per --size (pooling, unpooling and spatial batch norm on x, and on x in
channels-last order; the 3-D max pool on a volume (N, 16, 8, 28, 28); batchnorm
(N, D) on features):

  small  (default)  x (2, 64, 112, 112)    features (32, 512)
  medium            x (8, 64, 112, 112)    features (128, 512)
  large             x (32, 64, 112, 112)   features (512, 512)

--json PATH also writes the results with the gpulayers version, git commit
(null when unknown), date, size and reps; its folder must exist and be
writable, which is checked before any work starts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from . import __version__, backend, batchnorm, pooling, provenance, timing

SIZES = {"small": 2, "medium": 8, "large": 32}
CHANNELS, HW = 64, (112, 112)  # ResNet's stem output, the input of its first pooling
FEATURES = (16, 512)  # batchnorm (N, D): 16 rows per sample, D = 512
DTYPE = np.dtype(np.float32)
POOL = dict(pool_height=3, pool_width=3, stride=2, pad=1)  # ResNet's stem pooling
UNPOOL_POOL = dict(pool_height=2, pool_width=2, stride=2)


def _time(fn, xp, reps):
    """Median time of fn() in ms (CUDA events on CuPy), after a warm-up call."""
    clock = timing.CPUClock() if xp is np else timing.CupyClock()
    (entry,) = timing.round_robin([timing.Timed("main", fn, clock)], reps, warmup=1)
    if entry.error:
        raise RuntimeError(entry.error)
    return timing.median(entry.samples)


def _ref_bn(x, gamma, beta, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)


def _err(a, ref):
    a = backend.to_numpy(a).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def _cases(xp, N, rng):
    """(name, bytes, forward thunk, backward thunk, check) per layer on backend xp."""
    shape = (N, CHANNELS) + HW
    x_h = rng.standard_normal(shape).astype(np.float32)
    x = xp.asarray(x_h)
    itemsize = 4
    nx = x_h.size
    cases = []

    out, cache = pooling.max_pool_forward(x, POOL)
    dout = xp.asarray(rng.standard_normal(out.shape).astype(np.float32))
    no = out.size

    def check_max():
        ref_out, ref_cache = pooling.max_pool_forward_naive(x_h, POOL)
        got_dx = pooling.max_pool_backward(dout, cache)
        ref_dx = pooling.max_pool_backward_naive(backend.to_numpy(dout), ref_cache)
        same_idx = np.array_equal(backend.to_numpy(pooling.max_pool_indices(cache)),
                                  pooling.max_pool_indices(ref_cache))
        return max(_err(out, ref_out), _err(got_dx, ref_dx), 0.0 if same_idx else 1.0)
    cases.append(("max_pool 3x3/2 pad 1", shape, nx * itemsize + no * (itemsize + 1),
                  no * (itemsize + 1) + nx * itemsize,
                  lambda: pooling.max_pool_forward(x, POOL),
                  lambda: pooling.max_pool_backward(dout, cache), check_max, 1e-6))

    aout, acache = pooling.avg_pool_forward(x, POOL)

    def check_avg():
        ref, _ = pooling.avg_pool_forward(x_h.astype(np.float64), POOL)
        ref_dx = pooling.avg_pool_backward(backend.to_numpy(dout).astype(np.float64), acache)
        return max(_err(aout, ref), _err(pooling.avg_pool_backward(dout, acache), ref_dx))
    cases.append(("avg_pool 3x3/2 pad 1", shape, nx * itemsize + no * itemsize,
                  no * itemsize + nx * itemsize,
                  lambda: pooling.avg_pool_forward(x, POOL),
                  lambda: pooling.avg_pool_backward(dout, acache), check_avg, 1e-6))

    p2, c2 = pooling.max_pool_forward(x, UNPOOL_POOL)
    idx = pooling.max_pool_indices(c2)
    up, ucache = pooling.max_unpool_forward(p2, idx, shape[2:])

    def check_unpool():
        flat_idx = backend.to_numpy(idx).reshape(N, CHANNELS, -1)
        ref = np.zeros(shape, np.float32)
        np.put_along_axis(ref.reshape(N, CHANNELS, -1), flat_idx,
                          backend.to_numpy(p2).reshape(N, CHANNELS, -1), axis=2)
        ref_dx = np.take_along_axis(x_h.reshape(N, CHANNELS, -1), flat_idx, axis=2)
        got_dx = backend.to_numpy(pooling.max_unpool_backward(x, ucache))
        return max(_err(up, ref), _err(got_dx.reshape(N, CHANNELS, -1), ref_dx))
    cases.append(("max_unpool 2x2", shape, p2.size * (itemsize + 8) + nx * itemsize,
                  nx * itemsize + p2.size * (8 + itemsize),
                  lambda: pooling.max_unpool_forward(p2, idx, shape[2:]),
                  lambda: pooling.max_unpool_backward(x, ucache), check_unpool, 0.0))

    gamma = xp.asarray(rng.standard_normal(CHANNELS).astype(np.float32))
    beta = xp.asarray(rng.standard_normal(CHANNELS).astype(np.float32))
    bout, bcache = batchnorm.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    bdout = xp.asarray(rng.standard_normal(shape).astype(np.float32))

    def check_bn():
        ref = _ref_bn(x_h, backend.to_numpy(gamma), backend.to_numpy(beta))
        dx, dg, db = batchnorm.spatial_batchnorm_backward(bdout, bcache)
        rdx, rdg, rdb = batchnorm.spatial_batchnorm_backward(
            backend.to_numpy(bdout).astype(np.float64),
            batchnorm.spatial_batchnorm_forward(x_h.astype(np.float64),
                                                backend.to_numpy(gamma).astype(np.float64),
                                                backend.to_numpy(beta).astype(np.float64),
                                                {"mode": "train"})[1])
        return max(_err(bout, ref), _err(dx, rdx), _err(dg, rdg), _err(db, rdb))
    cases.append(("spatial_batchnorm train", shape, 2 * nx * itemsize, 3 * nx * itemsize,
                  lambda: batchnorm.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"}),
                  lambda: batchnorm.spatial_batchnorm_backward(bdout, bcache), check_bn, 1e-5))

    # every rank, the other pooling ops and the channels-last layout (issue 11/12 layers)
    vshape = (N, 16, 8, 28, 28)   # a 3-D volume
    v_h = rng.standard_normal(vshape).astype(np.float32)
    v = xp.asarray(v_h)
    P3 = dict(kernel_size=3, stride=2, pad=1)
    vout, vcache = pooling.max_pool_forward(v, P3)
    vdout = xp.asarray(rng.standard_normal(vout.shape).astype(np.float32))

    def check_max3d():
        ref_out, ref_cache = pooling.max_pool_forward_general(v_h.astype(np.float64), P3)
        ref_dx = pooling.max_pool_backward_general(backend.to_numpy(vdout).astype(np.float64),
                                                   ref_cache)
        return max(_err(vout, ref_out), _err(pooling.max_pool_backward(vdout, vcache), ref_dx))
    cases.append(("max_pool 3-D 3x3x3/2 pad 1", vshape, v_h.nbytes + vout.size * 5,
                  vout.size * 5 + v_h.nbytes, lambda: pooling.max_pool_forward(v, P3),
                  lambda: pooling.max_pool_backward(vdout, vcache), check_max3d, 1e-6))

    gout, gcache = pooling.adaptive_avg_pool_forward(x, 1)
    gdout = xp.asarray(rng.standard_normal(gout.shape).astype(np.float32))

    def check_global():
        ref = x_h.astype(np.float64).mean(axis=(2, 3), keepdims=True)
        ref_dx = np.broadcast_to(backend.to_numpy(gdout).astype(np.float64) / (HW[0] * HW[1]),
                                 shape)
        return max(_err(gout, ref), _err(pooling.adaptive_avg_pool_backward(gdout, gcache),
                                         ref_dx))
    cases.append(("adaptive_avg_pool global", shape, nx * itemsize, nx * itemsize,
                  lambda: pooling.adaptive_avg_pool_forward(x, 1),
                  lambda: pooling.adaptive_avg_pool_backward(gdout, gcache), check_global,
                  1e-6))

    xl_h = np.ascontiguousarray(np.moveaxis(x_h, 1, -1))
    xl = xp.asarray(xl_h)
    LAST = {"mode": "train", "data_format": "channels_last"}
    lout, lcache = batchnorm.spatial_batchnorm_forward(xl, gamma, beta, dict(LAST))
    ldout = xp.asarray(np.ascontiguousarray(np.moveaxis(backend.to_numpy(bdout), 1, -1)))

    def check_bn_last():
        ref = np.moveaxis(_ref_bn(x_h, backend.to_numpy(gamma), backend.to_numpy(beta)), 1, -1)
        dx, _, _ = batchnorm.spatial_batchnorm_backward(ldout, lcache)
        rdx, _, _ = batchnorm.spatial_batchnorm_backward(bdout, bcache)
        return max(_err(lout, ref),
                   _err(dx, np.moveaxis(backend.to_numpy(rdx).astype(np.float64), 1, -1)))
    cases.append(("spatial_batchnorm NHWC", xl_h.shape, 2 * nx * itemsize, 3 * nx * itemsize,
                  lambda: batchnorm.spatial_batchnorm_forward(xl, gamma, beta, dict(LAST)),
                  lambda: batchnorm.spatial_batchnorm_backward(ldout, lcache), check_bn_last,
                  1e-5))

    fshape = (N * FEATURES[0], FEATURES[1])
    D = fshape[1]
    feats = xp.asarray(rng.standard_normal(fshape).astype(np.float32))
    g1 = xp.ones(D, dtype=np.float32)
    b1 = xp.zeros(D, dtype=np.float32)
    fout, fcache = batchnorm.batchnorm_forward(feats, g1, b1, {"mode": "train"})
    fdout = xp.asarray(rng.standard_normal(fshape).astype(np.float32))

    def check_bn1d():
        # float64 reference from the formulas (gamma = 1, beta = 0):
        # dx = (dout - mean(dout) - xhat * mean(dout * xhat)) / std
        f = backend.to_numpy(feats).astype(np.float64)
        d = backend.to_numpy(fdout).astype(np.float64)
        std = np.sqrt(f.var(0) + 1e-5)
        xhat = (f - f.mean(0)) / std
        rdx = (d - d.mean(0) - xhat * (d * xhat).mean(0)) / std
        dx, dg, db = batchnorm.batchnorm_backward(fdout, fcache)
        return max(_err(fout, xhat), _err(dx, rdx), _err(dg, (d * xhat).sum(0)),
                   _err(db, d.sum(0)))
    cases.append(("batchnorm (N, D) train", fshape, 2 * feats.size * itemsize,
                  3 * feats.size * itemsize,
                  lambda: batchnorm.batchnorm_forward(feats, g1, b1, {"mode": "train"}),
                  lambda: batchnorm.batchnorm_backward(fdout, fcache), check_bn1d, 1e-5))
    return cases


def _progress(total, desc):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:  # tqdm is a dependency; keep working without it
        class _Null:
            def update(self, n=1): pass
            def close(self): pass
        return _Null()


def _gbps(nbytes, ms):
    """GB/s of nbytes moved in ms milliseconds; inf when the clock saw no time, NaN without one."""
    if ms > 0:
        return nbytes / ms / 1e6
    return math.inf if ms == 0 else math.nan


def _finite(obj):
    """obj with every non-finite float (NaN, inf) replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _reps(text):
    """argparse type of --reps: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (timed repetitions), got {n}")
    return n


def _json_path_problem(path):
    """Why the results JSON cannot be written to ``path``, or None when it can.

    Checked before any work starts; leaves no file behind (a file that
    exists is opened for appending and left as it was)."""
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        return f"{path} is a directory"
    if not os.path.isdir(folder):
        return (f"folder {folder} does not exist" if not os.path.exists(folder)
                else f"{folder} is not a folder")
    existed = os.path.exists(full)
    try:
        with open(full, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    if not existed:
        os.remove(full)
    return None


def _shape_str(shape):
    return "(" + ", ".join(str(n) for n in shape) + ")"


def run(backends, size, reps):
    rows, failed = [], False
    rng = np.random.default_rng()
    for name in backends:
        xp = backend.backend_module(name)
        cases = _cases(xp, SIZES[size], rng)
        bar = _progress(len(cases), f"{name}")
        for label, shape, fbytes, bbytes, fwd, bwd, check, tol in cases:
            err = check()
            ok = err <= tol
            failed |= not ok
            fms = _time(fwd, xp, reps)
            bms = _time(bwd, xp, reps)
            rows.append({"backend": name, "layer": label, "shape": [int(n) for n in shape],
                         "dtype": DTYPE.name, "forward_ms": fms, "backward_ms": bms,
                         "forward_GBps": _gbps(fbytes, fms), "backward_GBps": _gbps(bbytes, bms),
                         "rel_error": err, "tolerance": tol, "ok": ok})
            bar.update()
        bar.close()
    return rows, failed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpulayers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=backend.BACKENDS,
                        help="run only this backend (default: every usable one)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help=f"batch size N of the (N, {CHANNELS}, {HW[0]}, {HW[1]}) input and "
                             f"the (N*{FEATURES[0]}, {FEATURES[1]}) features: "
                             + ", ".join(f"{k}={v}" for k, v in SIZES.items())
                             + " (default: small)")
    parser.add_argument("--reps", type=_reps, default=5,
                        help="timed repetitions, >= 1 (the median is reported; default 5)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON (its folder must exist)")
    args = parser.parse_args(argv)
    if args.json:
        problem = _json_path_problem(args.json)
        if problem:
            parser.error(f"argument --json: {problem}")

    info = backend.backend_info()
    print(f"gpulayers: numpy {info['numpy']}; usable backends: {', '.join(info['available'])}")
    if info["cupy_unusable_reason"]:
        print(f"  cupy is not usable: {info['cupy_unusable_reason']}")
    for dev in info["devices"]:
        print(f"  cuda device {dev['id']}: {dev['name']} (sm {dev['compute_capability']}, "
              f"{dev['memory_GiB']} GiB), cupy {info['cupy']}")
    if args.backend and args.backend not in info["available"]:
        why = f": {info['cupy_unusable_reason']}" if args.backend == "cupy" else ""
        print(f"error: backend {args.backend!r} is not usable here{why}", file=sys.stderr)
        return 2
    backends = [args.backend] if args.backend else info["available"]
    rows, failed = run(backends, args.size, args.reps)

    print(f"\n{'backend':8} {'layer':26} {'shape':20} {'dtype':8} {'fwd ms':>9} {'fwd GB/s':>9} "
          f"{'bwd ms':>9} {'bwd GB/s':>9} {'rel err':>9}  check")
    for r in rows:
        print(f"{r['backend']:8} {r['layer']:26} {_shape_str(r['shape']):20} {r['dtype']:8} "
              f"{r['forward_ms']:9.2f} {r['forward_GBps']:9.2f} "
              f"{r['backward_ms']:9.2f} {r['backward_GBps']:9.2f} {r['rel_error']:9.1e}  "
              f"{'ok' if r['ok'] else 'FAILED'}")
    if args.json:
        doc = {"gpulayers": __version__, "commit": provenance.package_commit(),
               "date": provenance.today(), "size": args.size, "reps": args.reps,
               "backend_info": info, "rows": rows}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_finite(doc), f, indent=1, allow_nan=False)
            f.write("\n")
        print(f"wrote {args.json}")
    print("all checks passed" if not failed else "SOME CHECKS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
