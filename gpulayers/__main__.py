"""The main job: ``python -m gpulayers``.

Prints the backends this machine can use (and why CuPy is not usable when it
isn't); on each usable backend runs forward and backward of every layer on a
realistic batch (ResNet's first pooling and BN shapes), checks the results
against reference implementations, and prints a table of timings in ms and
GB/s. Exits non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import backend, batchnorm, benchmarking, pooling

SIZES = {"small": 2, "medium": 8, "large": 32}
POOL = dict(pool_height=3, pool_width=3, stride=2, pad=1)  # ResNet's stem pooling
UNPOOL_POOL = dict(pool_height=2, pool_width=2, stride=2)


def _time(fn, xp, reps):
    """Median time of fn() in ms (CUDA events on CuPy), after a warm-up call."""
    clock = benchmarking.CPUClock() if xp is np else benchmarking.CupyClock()
    (entry,) = benchmarking.round_robin([benchmarking.Timed("main", fn, clock)], reps, warmup=1)
    if entry.error:
        raise RuntimeError(entry.error)
    return benchmarking.median(entry.samples)


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
    shape = (N, 64, 112, 112)
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
        ref = np.zeros(shape, np.float32)
        np.put_along_axis(ref.reshape(N, 64, -1), backend.to_numpy(idx).reshape(N, 64, -1),
                          backend.to_numpy(p2).reshape(N, 64, -1), axis=2)
        return _err(up, ref)
    cases.append(("max_unpool 2x2", shape, p2.size * (itemsize + 8) + nx * itemsize,
                  nx * itemsize + p2.size * (8 + itemsize),
                  lambda: pooling.max_unpool_forward(p2, idx, shape[2:]),
                  lambda: pooling.max_unpool_backward(x, ucache), check_unpool, 0.0))

    gamma = xp.asarray(rng.standard_normal(64).astype(np.float32))
    beta = xp.asarray(rng.standard_normal(64).astype(np.float32))
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

    feats = xp.asarray(rng.standard_normal((N * 16, 512)).astype(np.float32))
    g1 = xp.ones(512, dtype=np.float32)
    b1 = xp.zeros(512, dtype=np.float32)
    fout, fcache = batchnorm.batchnorm_forward(feats, g1, b1, {"mode": "train"})

    def check_bn1d():
        f = backend.to_numpy(feats).astype(np.float64)
        ref = (f - f.mean(0)) / np.sqrt(f.var(0) + 1e-5)
        return _err(fout, ref)
    cases.append(("batchnorm (N, D) train", (N * 16, 512), 2 * feats.size * itemsize,
                  3 * feats.size * itemsize,
                  lambda: batchnorm.batchnorm_forward(feats, g1, b1, {"mode": "train"}),
                  lambda: batchnorm.batchnorm_backward(feats, fcache), check_bn1d, 1e-5))
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
            rows.append({"backend": name, "layer": label, "shape": list(shape),
                         "forward_ms": fms, "backward_ms": bms,
                         "forward_GBps": fbytes / fms / 1e6, "backward_GBps": bbytes / bms / 1e6,
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
                        help="batch size N of the (N, 64, 112, 112) input: "
                             + ", ".join(f"{k}={v}" for k, v in SIZES.items()))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    info = backend.backend_info()
    print(f"gpulayers: numpy {info['numpy']}; usable backends: {', '.join(info['available'])}")
    if info["cupy_unusable_reason"]:
        print(f"  cupy is not usable: {info['cupy_unusable_reason']}")
    for dev in info["devices"]:
        print(f"  cuda device {dev['id']}: {dev['name']} (sm {dev['compute_capability']}, "
              f"{dev['memory_GiB']} GiB), cupy {info['cupy']}")
    if args.backend and args.backend not in info["available"]:
        print(f"error: backend {args.backend!r} is not usable here", file=sys.stderr)
        return 2
    backends = [args.backend] if args.backend else info["available"]
    rows, failed = run(backends, args.size, args.reps)

    print(f"\n{'backend':8} {'layer':26} {'fwd ms':>9} {'fwd GB/s':>9} {'bwd ms':>9} "
          f"{'bwd GB/s':>9} {'rel err':>9}  check")
    for r in rows:
        print(f"{r['backend']:8} {r['layer']:26} {r['forward_ms']:9.2f} {r['forward_GBps']:9.2f} "
              f"{r['backward_ms']:9.2f} {r['backward_GBps']:9.2f} {r['rel_error']:9.1e}  "
              f"{'ok' if r['ok'] else 'FAILED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend_info": info, "size": args.size, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    print("all checks passed" if not failed else "SOME CHECKS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
