#!/usr/bin/env python
"""Benchmark gpulayers' pooling and batch-norm implementations against PyTorch.

    python scripts/bench.py --quick              # < 1 minute on a 2-core CPU
    python scripts/bench.py                      # the CPU target shapes
    python scripts/bench.py --sweep --plot sweep.png
    python scripts/bench.py --device gpu --json benchmarks/results/mine.json
    python scripts/bench.py --small              # public vs general on small inputs (NumPy)
    python scripts/bench.py --crossover          # where BN's CPU kernels start to win
    python scripts/bench.py --nd                 # 1-D / 3-D / adaptive pooling vs PyTorch
    python scripts/bench.py --layouts            # channels_last vs channels_first (NumPy)

How the numbers are made (so they can be trusted):

- every implementation of a case gets the same fresh random data (never zeros);
- each runs ``--warmup`` times untimed, then ``--reps`` rounds alternate the
  implementations round-robin (rotating the start), and the median is shown;
- CPU times are ``perf_counter`` wall times with PyTorch and NumPy on every
  core (``torch.set_num_threads``); GPU times are CUDA events;
- GB/s uses the compulsory byte model of ``harness.compulsory_bytes``
  (each input read once, each output incl. indices written once: our uint8
  offsets, PyTorch's int64 indices), and "% copy" divides it by a copy
  bandwidth measured in the same run (``np.copyto`` / device-to-device copy);
- outputs of every implementation are compared with the first one's before
  timing ("agree" column: max |diff| / max |ref|; pooling should be 0);
- "peak/x" and "kept/x" are tracemalloc's high-water mark during one call and
  what the call's result still holds (output + cache), in units of x's size
  (NumPy only).

The article's naive loops run only on inputs up to ``--naive-max-elems``
elements (3 samples); ``--naive`` runs them everywhere.

``--small`` times the public NumPy calls against their ``_general`` twins on
small inputs (the ratio must stay <= 1.10); ``--crossover`` times each BN op of
``gpulayers.numpy_fast`` with its size threshold forced to 0 (the compiled CPU
kernels) and to infinity (the simple NumPy path), the measurement behind the
thresholds in ``numpy_fast``. Both: NumPy only, no PyTorch, alternating rounds,
medians after warm-up.

``--layouts`` times each CPU case's public NumPy call in channels_first against
the same op with ``data_format='channels_last'`` on the C-contiguous channels-last
copy of the input, and against the default call on PyTorch's channels_last memory
format (that copy viewed channels-first): alternating rounds, medians after
warm-up, a ratio column cl/cf with a verdict against
``harness.LAYOUT_TARGET`` (1.3), and a check that every result,
moved to channels-first, equals the channels-first one (pooling exactly, batch
norm to ``CHECK_TOL``). NumPy only, no PyTorch. Exits 1 when a check fails (a miss
of the ratio target is shown, not an error).

``--nd`` times the pooling cases beyond 2-D, forward and backward, against
PyTorch's functional of the same rank (``F.max_pool3d``, ``F.avg_pool3d``,
``F.max_pool1d``, ``F.adaptive_avg_pool2d``), with the same rounds, medians and
columns; with ``--quick`` / ``--smoke`` on smaller shapes. Before timing, each
case's op is run once on a tiny input of its rank (a case gpulayers cannot run
yet is listed and skipped); after it, our result (forward output or dx) is checked
against PyTorch's (max |ours - torch| / max |torch| within
``harness.CHECK_TOL``). Exits 1 when a case is skipped or fails
its check.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # harness.py

import gpulayers  # noqa: E402
import harness as B  # noqa: E402  (scripts/harness.py)

MP3 = {"pool_height": 3, "pool_width": 3, "stride": 2, "pad": 1}
MP2 = {"pool_height": 2, "pool_width": 2, "stride": 2}
BN = {"eps": 1e-5, "momentum": 0.9}
ALL_OPS = ("max_pool_forward", "max_pool_backward", "avg_pool_forward", "avg_pool_backward",
           "spatial_batchnorm_forward", "spatial_batchnorm_backward",
           "spatial_batchnorm_eval_forward",
           "sum_pool_forward", "sum_pool_backward",
           "adaptive_avg_pool_forward", "adaptive_avg_pool_backward",
           "adaptive_max_pool_forward", "adaptive_max_pool_backward")

# (op, shape, params) per size preset; the CPU preset holds the NumPy targets.
PRESETS = {
    "smoke": [("max_pool_forward", (2, 3, 8, 8), MP3), ("max_pool_backward", (2, 3, 8, 8), MP2),
              ("avg_pool_forward", (2, 3, 8, 8), MP3), ("avg_pool_backward", (2, 3, 8, 8), MP2),
              ("spatial_batchnorm_forward", (2, 3, 8, 8), BN),
              ("spatial_batchnorm_backward", (2, 3, 8, 8), BN),
              ("spatial_batchnorm_eval_forward", (2, 3, 8, 8), BN)],
    "quick": [("max_pool_forward", (8, 32, 28, 28), MP3), ("max_pool_backward", (8, 32, 28, 28), MP3),
              ("max_pool_forward", (8, 32, 28, 28), MP2), ("max_pool_backward", (8, 32, 28, 28), MP2),
              ("avg_pool_forward", (8, 32, 28, 28), MP3), ("avg_pool_backward", (8, 32, 28, 28), MP3),
              ("spatial_batchnorm_forward", (8, 32, 28, 28), BN),
              ("spatial_batchnorm_backward", (8, 32, 28, 28), BN),
              ("spatial_batchnorm_eval_forward", (8, 32, 28, 28), BN)],
    "cpu": [("max_pool_forward", (32, 64, 56, 56), MP3), ("max_pool_backward", (32, 64, 56, 56), MP3),
            ("max_pool_forward", (16, 64, 112, 112), MP2),
            ("max_pool_backward", (16, 64, 112, 112), MP2),
            ("avg_pool_forward", (32, 64, 56, 56), MP3), ("avg_pool_backward", (32, 64, 56, 56), MP3),
            ("spatial_batchnorm_forward", (32, 64, 56, 56), BN),
            ("spatial_batchnorm_backward", (32, 64, 56, 56), BN),
            ("spatial_batchnorm_eval_forward", (32, 64, 56, 56), BN)],
    "gpu": [("max_pool_forward", (256, 64, 112, 112), MP3),
            ("max_pool_backward", (256, 64, 112, 112), MP3),
            ("max_pool_forward", (128, 128, 112, 112), MP2),
            ("max_pool_backward", (128, 128, 112, 112), MP2),
            ("avg_pool_forward", (256, 64, 112, 112), MP3),
            ("avg_pool_backward", (256, 64, 112, 112), MP3),
            ("spatial_batchnorm_forward", (256, 64, 112, 112), BN),
            ("spatial_batchnorm_backward", (256, 64, 112, 112), BN),
            ("spatial_batchnorm_eval_forward", (256, 64, 112, 112), BN)],
}
# --nd: pooling beyond 2-D (issue 11 section 6). PyTorch-style 'kernel_size' for every rank.
K3S2P1 = {"kernel_size": 3, "stride": 2, "pad": 1}
K3S2 = {"kernel_size": 3, "stride": 2}
GLOBAL = {"output_size": (1, 1)}
TO_7X7 = {"output_size": (7, 7)}


def _nd_cases(x3d, x1d, x2d):
    """Forward and backward of: max and avg 3x3x3/2 pad 1 on ``x3d``; max 3/2 on ``x1d``;
    adaptive avg to (1, 1) and to (7, 7) on ``x2d``."""
    rows = []
    for op, shape, params in (("max_pool", x3d, K3S2P1), ("avg_pool", x3d, K3S2P1),
                              ("max_pool", x1d, K3S2), ("adaptive_avg_pool", x2d, GLOBAL),
                              ("adaptive_avg_pool", x2d, TO_7X7)):
        rows += [(f"{op}_forward", shape, params), (f"{op}_backward", shape, params)]
    return rows


ND_PRESETS = {
    "smoke": _nd_cases((2, 3, 5, 8, 8), (2, 3, 33), (2, 4, 9, 9)),
    "quick": _nd_cases((2, 16, 8, 28, 28), (8, 32, 1024), (8, 128, 14, 14)),
    "cpu": _nd_cases((8, 32, 16, 56, 56), (32, 64, 4096), (32, 512, 14, 14)),
}
ND_PRESETS["gpu"] = ND_PRESETS["cpu"]
#: --nd's target: ours / PyTorch at most this on every case
ND_TARGET = 2.0

# --layouts: channels-first vs channels-last on the CPU cases (issue 12)
AVG3 = MP3


def _layout_cases(mp3, mp2, bn, small):
    """max pool 3x3/2 pad 1 on ``mp3`` and 2x2/2 on ``mp2``, forward and backward; BN train
    forward, backward and eval forward on ``bn``; avg pool 3x3/2 pad 1 and adaptive avg to
    (1, 1) on ``small``, forward and backward."""
    return [("max_pool_forward", mp3, MP3), ("max_pool_backward", mp3, MP3),
            ("max_pool_forward", mp2, MP2), ("max_pool_backward", mp2, MP2),
            ("spatial_batchnorm_forward", bn, BN), ("spatial_batchnorm_backward", bn, BN),
            ("spatial_batchnorm_eval_forward", bn, BN),
            ("avg_pool_forward", small, AVG3), ("avg_pool_backward", small, AVG3),
            ("adaptive_avg_pool_forward", small, GLOBAL),
            ("adaptive_avg_pool_backward", small, GLOBAL)]


LAYOUT_PRESETS = {
    "smoke": _layout_cases((2, 3, 8, 8), (2, 3, 8, 8), (2, 3, 8, 8), (2, 5, 7, 7)),
    "quick": _layout_cases((8, 32, 28, 28), (8, 32, 28, 28), (8, 32, 28, 28), (8, 128, 14, 14)),
    "cpu": _layout_cases((32, 64, 56, 56), (16, 64, 112, 112), (32, 64, 56, 56),
                         (32, 512, 14, 14)),
}

SWEEP_OPS = ("max_pool_forward", "max_pool_backward", "spatial_batchnorm_forward",
             "spatial_batchnorm_backward")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes, few reps (< 1 min on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, 2 reps: checks the script runs")
    size.add_argument("--small", action="store_true",
                      help="public vs _general on small NumPy inputs, with a ratio column")
    size.add_argument("--crossover", action="store_true",
                      help="numpy_fast blocked vs simple path by size (behind its thresholds)")
    ap.add_argument("--passes", type=int, default=2, help="--crossover: passes over the sizes")
    ap.add_argument("--nd", action="store_true",
                    help="pooling beyond 2-D vs PyTorch, forward and backward: max/avg 3x3x3/2 "
                         "pad 1 on (8, 32, 16, 56, 56), max 3/2 on (32, 64, 4096), adaptive avg "
                         "to (1, 1) and (7, 7) on (32, 512, 14, 14); with --quick/--smoke on "
                         "smaller shapes; checks every result against PyTorch's")
    ap.add_argument("--layouts", action="store_true",
                    help="NumPy channels_first vs channels_last (C-contiguous NHWC, "
                         "data_format='channels_last') and PyTorch's channels_last memory "
                         "format (default data_format) on the CPU cases: max pool 3x3/2 pad 1 "
                         "(32, 64, 56, 56) and 2x2/2 (16, 64, 112, 112) fwd/bwd, BN train "
                         "fwd/bwd and eval fwd (32, 64, 56, 56), avg pool 3x3/2 pad 1 and "
                         "adaptive avg to (1, 1) fwd/bwd (32, 512, 14, 14); ratio cl/cf vs "
                         f"{B.LAYOUT_TARGET}; checks every result; with --quick/--smoke on "
                         "smaller shapes")
    ap.add_argument("--device", choices=("cpu", "gpu"), default=None,
                    help="cpu (NumPy) or gpu (CuPy); default gpu when CuPy is usable")
    ap.add_argument("--ops", nargs="+", choices=ALL_OPS, default=None, help="ops to run (default all)")
    ap.add_argument("--impls", nargs="+", default=None,
                    help="gpulayers implementations: fast general reshape naive cs231n-transpose "
                         "(default all that apply)")
    ap.add_argument("--dtype", default="float32", choices=("float16", "float32", "float64"))
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 15, --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per implementation first")
    ap.add_argument("--naive", action="store_true", help="run the naive loops on every shape")
    ap.add_argument("--naive-max-elems", type=int, default=16 << 20,
                    help="largest input (elements) the naive loops run on without --naive")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="PyTorch CPU threads (default: every core)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc measurement")
    ap.add_argument("--sweep", action="store_true", help="also grow the batch size and fit time vs work")
    ap.add_argument("--plot", default=None, help="PNG path for the sweep plot (needs matplotlib)")
    ap.add_argument("--json", default=None, help="write the results JSON here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    return ap.parse_args(argv)


class Progress:
    """tqdm when it is installed and wanted, else nothing."""

    def __init__(self, total, disable):
        self.bar = None
        if not disable:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="round", file=sys.stderr, leave=False,
                                dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, text):
        if self.bar is not None:
            self.bar.set_description(text[:40])

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Setup:
    """Where the data live and how time is taken: NumPy + perf_counter, or
    CuPy + CUDA events. The only place bench.py touches CuPy directly."""

    def __init__(self, args):
        want_gpu = args.device == "gpu" or (args.device is None
                                             and "cupy" in gpulayers.available_backends())
        self.torch = None if args.no_torch else B.import_torch(args.threads)
        if want_gpu:
            reason = gpulayers.backend.cupy_unusable_reason()
            if reason:
                sys.exit(f"--device gpu: {reason}")
            import cupy
            self.xp = cupy
            self.gpu = True
            self.clock = B.CupyClock()
            info = gpulayers.backend_info()
            self.device = f"gpu: {info['devices'][0]['name']}" if info["devices"] else "gpu"
            self.cupy_version = cupy.__version__
            if self.torch is not None and not self.torch.cuda.is_available():
                print("note: torch has no CUDA here; no PyTorch peer")
                self.torch = None
            self.torch_clock = B.CupyClock() if self.torch is not None else None
        else:
            self.xp = np
            self.gpu = False
            self.clock = B.CPUClock()
            self.torch_clock = B.CPUClock()
            self.device = f"cpu: {cpu_name()} ({os.cpu_count()} cores, torch threads {args.threads})"
            self.cupy_version = None

    def copy_bandwidth(self, nbytes):
        if self.gpu:
            gbps, detail = B.copy_bandwidth(self.xp, max(nbytes, 256 << 20))
            return gbps, ", ".join(f"{k} {v:.0f}" for k, v in detail.items())
        return B.copy_bandwidth(np, nbytes)[0], "np.copyto"

    def free(self):
        import gc
        gc.collect()
        if self.gpu:
            self.xp.get_default_memory_pool().free_all_blocks()
            if self.torch is not None:
                self.torch.cuda.empty_cache()


def fmt(v, spec):
    if v is not None and np.isfinite(v):
        return format(v, spec)
    width = spec[1:].split(".")[0] if spec.startswith(">") else ""
    return format("-", ">" + width)


def case_table(case, copy_gbps, memory):
    lines = []
    print = lines.append  # noqa: A001 -- collect the table, the caller writes it
    torch_entry = next((e for e in case.entries if e.name.startswith("torch") and e.samples), None)
    t_torch = B.median(torch_entry.samples) if torch_entry else None
    agree = B.agreement(case)
    print(f"\n{case.op} {tuple(case.shape)} {case.dtype}  {case.params_str()}")
    print(f"  {'implementation':<17}{'median ms':>11}{'min ms':>10}{'n':>4}{'/ torch':>9}"
          f"{'GB/s':>8}{'% copy':>8}{'peak/x':>8}{'kept/x':>8}{'agree':>10}")
    for e in case.entries:
        if e.error:
            print(f"  {e.name:<17} ERROR {e.error}")
            continue
        t = B.median(e.samples)
        gbps = case.bytes[e.name] / (t * 1e-3) / 1e9
        peak, kept = memory.get(e.name, (None, None))
        x = case.x_nbytes
        print(f"  {e.name:<17}{t:>11.3f}{min(e.samples):>10.3f}{len(e.samples):>4}"
              f"{fmt(t / t_torch if t_torch else None, '>8.2f')}{'x' if t_torch else ' '}"
              f"{gbps:>8.1f}{100 * gbps / copy_gbps:>7.0f}%"
              f"{fmt(peak / x if peak is not None else None, '>8.2f')}"
              f"{fmt(kept / x if kept is not None else None, '>8.2f')}"
              f"{fmt(agree.get(e.name), '>10.1e')}")
    for note in case.notes:
        print(f"  (skipped {note})")
    return "\n".join(lines)


def measure_memory(case):
    """{label: (peak, kept)} of the timed call of every NumPy implementation."""
    out = {}
    fns = case.backward_fns if case.backward else case.forward_fns
    for label, fn in fns.items():
        if label.startswith("torch"):
            continue
        out[label] = B.peak_memory(fn)
    return out


def make_cases(args, setup):
    preset = "smoke" if args.smoke else "quick" if args.quick else ("gpu" if setup.gpu else "cpu")
    ops = args.ops or ALL_OPS
    table = ND_PRESETS if args.nd else PRESETS
    cases = [B.Case(op, shape, args.dtype, dict(params))
             for op, shape, params in table[preset] if op in ops]
    return ("nd-" + preset if args.nd else preset), cases


def probe_cases(cases):
    """Run each case's op once on a tiny input of its rank (harness.probe_case);
    print what gpulayers cannot run yet. Returns the cases it can run."""
    ok, seen = [], {}
    for case in cases:
        key = (case.op, case.rank, case.params_str())
        if key not in seen:
            seen[key] = B.probe_case(case)
        why = seen[key]
        if why is None:
            ok.append(case)
        else:
            case.notes.append(f"not run: {why}")
    print("N-d support (each op run once on a tiny input of its rank):")
    for (op, rank, pstr), why in seen.items():
        print(f"  {op:<28}{rank}-D {pstr:<17}{'ok' if why is None else 'NOT AVAILABLE: ' + why}")
    return ok


def run_cases(args, setup, cases, reps, warmup, rng, copy_gbps):
    impls = args.impls or (["fast"] if args.nd else
                           ["fast", "general", "reshape", "cs231n-transpose", "naive"])
    progress = Progress(len(cases) * reps, args.no_progress)
    done = []
    for case in cases:
        progress.describe(case.op)
        use = list(impls)
        n_elems = int(np.prod(case.shape))
        if "naive" in use and not args.naive and (setup.gpu or n_elems > args.naive_max_elems):
            use.remove("naive")
            case.notes.append("naive: too slow for this size (use --naive)")
        try:
            B.build_case(case, setup.xp, use, setup.clock, setup.torch, setup.torch_clock,
                         rng=rng, naive_reps=min(3, reps))
            B.round_robin(case.entries, reps, warmup, on_round=progress.update)
            memory = {} if (setup.gpu or args.no_memory) else measure_memory(case)
        except Exception as exc:  # one broken case must not end the run
            case.notes.append(f"case failed: {type(exc).__name__}: {exc}"[:300])
            memory = {}
            progress.update(reps)
        progress.write(case_table(case, copy_gbps, memory))
        case.check = B.check_against(case)
        case.forward_fns.clear()
        case.backward_fns.clear()
        case.outputs.clear()
        for e in case.entries:
            e.fn = None
        done.append(case)
        setup.free()
    progress.close()
    return done


def summary(cases):
    print("\nsummary (fast = gpulayers' public entry point; ratio < 1 beats PyTorch)")
    print(f"  {'op':<31}{'shape':<20}{'params':<16}{'fast ms':>9}{'torch ms':>10}{'ratio':>7}"
          f"{'naive/fast':>11}")
    for case in cases:
        med = {e.name: B.median(e.samples) for e in case.entries if e.samples and not e.error}
        fast = med.get("fast", med.get("cuda-kernels"))
        peer = next((v for k, v in med.items() if k.startswith("torch")), None)
        naive = med.get("naive", med.get("cs231n-transpose"))
        params = case.params_str() if case.is_pool else ""
        print(f"  {case.op:<31}{str(tuple(case.shape)):<20}{params:<16}{fmt(fast, '>9.3f')}"
              f"{fmt(peer, '>10.3f')}{fmt(fast / peer if fast and peer else None, '>7.2f')}"
              f"{fmt(naive / fast if fast and naive else None, '>10.1f')}{'x' if naive and fast else ''}")


def nd_summary(cases, skipped):
    """The --nd table: ours / torch per case, the ratio target, and the check of our
    result against PyTorch's. Returns the number of cases that failed the check or
    were not run."""
    print(f"\n--nd summary (ours = gpulayers' public call; ratio = ours / torch, target <= "
          f"{ND_TARGET:g}; err = max |ours - torch| / max |torch|, ok within "
          f"{B.CHECK_TOL.get(cases[0].dtype if cases else 'float32', 1e-5):g})")
    print(f"  {'op':<28}{'shape':<21}{'params':<17}{'ours ms':>9}{'torch ms':>10}{'ratio':>7}"
          f"{'target':>8}{'err':>10}{'check':>7}")
    bad = 0
    for case in cases:
        med = {e.name: B.median(e.samples) for e in case.entries if e.samples and not e.error}
        ours = med.get("fast", med.get("cuda-kernels"))
        peer = next((v for k, v in med.items() if k.startswith("torch")), None)
        ratio = ours / peer if ours and peer else None
        err, ok = case.check
        target = "-" if ratio is None else "ok" if ratio <= ND_TARGET else "MISS"
        check = "-" if ok is None else "ok" if ok else "FAIL"
        bad += ok is False or ours is None
        print(f"  {case.op:<28}{str(tuple(case.shape)):<21}{case.params_str():<17}"
              f"{fmt(ours, '>9.3f')}{fmt(peer, '>10.3f')}{fmt(ratio, '>7.2f')}{target:>8}"
              f"{fmt(err, '>10.1e')}{check:>7}")
    for case in skipped:
        bad += 1
        print(f"  {case.op:<28}{str(tuple(case.shape)):<21}{case.params_str():<17}  "
              f"{'; '.join(case.notes)[:120]}")
    return bad


def run_sweep(args, setup, rng, reps, warmup):
    """Grow N; fit time = a + b * bytes per implementation; print and plot."""
    ops = [op for op in SWEEP_OPS if op in (args.ops or SWEEP_OPS)] or list(args.ops)
    if args.smoke:
        base, batches = (3, 8, 8), [1, 2, 4]
    elif args.quick:
        base, batches = (32, 28, 28), [1, 2, 4, 8, 16]
    elif setup.gpu:
        base, batches = (64, 112, 112), [8, 16, 32, 64, 128, 256]
    else:
        base, batches = (64, 56, 56), [1, 2, 4, 8, 16, 32]
    results = {}
    progress = Progress(len(ops) * len(batches) * reps, args.no_progress)
    for op in ops:
        params = MP3 if op.startswith("max") else BN
        rows = []
        for n in batches:
            progress.describe(f"sweep {op} N={n}")
            case = B.Case(op, (n,) + base, args.dtype, dict(params))
            try:
                B.build_case(case, setup.xp, ["fast"], setup.clock, setup.torch,
                             setup.torch_clock, rng=rng, check=False)
                B.round_robin(case.entries, reps, warmup, on_round=progress.update)
            except Exception as exc:
                print(f"  sweep {op} N={n} failed: {type(exc).__name__}: {exc}")
                continue
            for e in case.entries:
                if e.samples and not e.error:
                    rows.append((e.name, n, case.bytes[e.name], B.median(e.samples)))
            setup.free()
        results[op] = rows
    progress.close()
    print("\nsweep: time vs work (batch size N grows; linear cost means ms/MB stays flat)")
    for op, rows in results.items():
        print(f"\n{op} (N, {', '.join(map(str, base))})")
        print(f"  {'implementation':<15}{'N':>5}{'MB':>10}{'ms':>10}{'ms/MB':>9}")
        for label in dict.fromkeys(r[0] for r in rows):
            pts = [r for r in rows if r[0] == label]
            for _, n, nbytes, t in pts:
                print(f"  {label:<15}{n:>5}{nbytes / 1e6:>10.2f}{t:>10.3f}{t / (nbytes / 1e6):>9.4f}")
            if len(pts) >= 2:
                x = np.array([p[2] for p in pts], float) / 1e6
                y = np.array([p[3] for p in pts], float)
                slope, icpt = np.polyfit(x, y, 1)
                fit = slope * x + icpt
                r2 = 1 - ((y - fit) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
                print(f"  {label:<15} fit: ms = {icpt:.4f} + {slope:.4f} * MB   R^2 = {r2:.4f}")
    if args.plot:
        plot_sweep(results, base, args.plot)
    return results


def plot_sweep(results, base, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nno plot: matplotlib is not installed (pip install matplotlib); wanted {path}")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (op, rows) in zip(axes[0], results.items()):
        for label in dict.fromkeys(r[0] for r in rows):
            pts = [r for r in rows if r[0] == label]
            mb = [p[2] / 1e6 for p in pts]
            ax.loglog(mb, [p[3] for p in pts], "o-" if not label.startswith("torch") else "s--",
                      label=label)
        if rows:
            mb = np.array(sorted({r[2] / 1e6 for r in rows}))
            t0 = min(r[3] for r in rows if r[2] / 1e6 == mb[-1])
            ax.loglog(mb, t0 * mb / mb[-1], ":", color="gray", label="linear")
        ax.set_title(op, fontsize=9)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # decades only: no overlapping labels
        ax.set_xlabel("compulsory MB")
        ax.set_ylabel("median ms")
        ax.legend(fontsize=7)
    fig.suptitle(f"time vs work, input (N, {', '.join(map(str, base))})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"\nplot written to {path}")


# ------------------------------------------------------- small inputs and crossovers

SMALL_SHAPES = [(2, 3, 4, 5), (2, 3, 8, 8), (4, 16, 14, 14), (8, 32, 28, 28)]
SMALL_OPS = [("max_pool_forward", MP2), ("max_pool_forward", MP3),
             ("max_pool_backward", MP2), ("max_pool_backward", MP3),
             ("spatial_batchnorm_forward", BN), ("spatial_batchnorm_backward", BN),
             ("spatial_batchnorm_eval_forward", BN), ("spatial_batchnorm_eval_backward", BN)]
_NEVER = 1 << 62


def _thresholds():
    from gpulayers import numpy_fast
    return {k: v for k, v in vars(numpy_fast).items()
            if k.endswith(("_MIN", "_WINDOW")) and isinstance(v, int)}


class _Thresholds:
    """Context: set numpy_fast's size thresholds (name -> value), restore them after."""

    def __init__(self, values):
        self.values = values

    def __enter__(self):
        from gpulayers import numpy_fast
        self.saved = _thresholds()
        for k, v in self.values.items():
            setattr(numpy_fast, k, v)

    def __exit__(self, *exc):
        from gpulayers import numpy_fast
        for k, v in self.saved.items():
            setattr(numpy_fast, k, v)


def _ab_entries(case, impl_settings, rng, check=True):
    """One Timed per (label, impl, thresholds): the case built and run under those thresholds."""
    entries = []
    for label, impl, values in impl_settings:
        c = B.Case(case.op, case.shape, case.dtype, dict(case.params))
        with _Thresholds(values):
            B.build_case(c, np, [impl], B.CPUClock(), rng=np.random.default_rng(case.seed),
                         check=check)
        if not c.entries:
            raise RuntimeError(f"{label}: {'; '.join(c.notes)}")
        fn = c.entries[0].fn

        def timed(fn=fn, values=values):
            with _Thresholds(values):
                return fn()
        entries.append(B.Timed(label, timed, B.CPUClock()))
    return entries


def _reps_for(entries, budget_s, lo=21, hi=401):
    t = min(B.CPUClock().time_ms(e.fn) for e in entries) * 1e-3
    return int(min(hi, max(lo, budget_s / max(t, 1e-6) / len(entries))))


def run_small(args):
    """Public NumPy calls against their _general twins on small inputs."""
    rng = np.random.default_rng(args.seed)
    print(f"device: cpu: {cpu_name()} ({os.cpu_count()} cores), numpy {np.__version__}, "
          f"{args.dtype}, load average {os.getloadavg()[0]:.2f}")
    print(f"thresholds: {_thresholds()}")
    print("public = gpulayers.<op> (the CPU kernels / fast paths); general = <op>_general; "
          "ratio = public / general (target <= 1.10)")
    print(f"  {'op':<31}{'shape':<17}{'params':<17}{'public us':>10}{'general us':>11}"
          f"{'ratio':>7}{'n':>5}")
    worst = 0.0
    for op, params in SMALL_OPS:
        if args.ops and op not in args.ops and not (op.endswith("eval_backward")
                                                    and "spatial_batchnorm_backward" in args.ops):
            continue
        for shape in SMALL_SHAPES:
            eval_bwd = op == "spatial_batchnorm_eval_backward"
            case = B.Case("spatial_batchnorm_backward" if eval_bwd else op, shape, args.dtype,
                          dict(params))
            case.seed = int(rng.integers(2**31))
            pair = [("public", "fast", {}), ("general", "general", {})]
            entries = (_eval_backward_entries(case, pair) if eval_bwd
                       else _ab_entries(case, pair, rng))
            reps = args.reps or _reps_for(entries, 0.4)
            B.round_robin(entries, reps, args.warmup if args.warmup is not None else 10)
            pub, gen = (B.median(e.samples) * 1e3 for e in entries)
            worst = max(worst, pub / gen)
            pstr = (case.params_str() if case.family in ("max", "avg")
                    else "eval" if eval_bwd else case.params_str().split()[0])
            print(f"  {op:<31}{str(shape):<17}{pstr:<17}{pub:>10.1f}{gen:>11.1f}{pub / gen:>7.2f}"
                  f"{reps:>5}", flush=True)
    print(f"worst public / general: {worst:.2f}")
    return worst


# (op, params, which thresholds the blocked/simple pair sets, sizes)
_XO_LARGE = [(8, 16, 28, 28), (8, 32, 28, 28), (16, 32, 28, 28), (16, 64, 28, 28),
             (32, 64, 28, 28), (16, 64, 56, 56), (32, 64, 56, 56)]
_XO_DECLINE = [(2, 3, 4, 5), (4, 16, 14, 14), (4, 32, 14, 14), (4, 16, 28, 28),
               (6, 16, 28, 28), (8, 16, 28, 28), (12, 16, 28, 28)]
CROSSOVER = [
    ("spatial_batchnorm_forward", BN, "BN_TRAIN_FORWARD_MIN", _XO_LARGE),
    ("spatial_batchnorm_backward", BN, "BN_BACKWARD_MIN", _XO_LARGE),
    ("spatial_batchnorm_eval_forward", BN, "BN_EVAL_FORWARD_MIN", _XO_LARGE),
    ("spatial_batchnorm_eval_backward", BN, "BN_EVAL_BACKWARD_MIN", _XO_LARGE),
    ("spatial_batchnorm_backward", BN, "BN_TRAIN_SMALL_MIN", _XO_DECLINE),
]


def _crossover_pair(op, name):
    """(label, impl, thresholds) of the two sides compared for threshold ``name``."""
    off = {k: _NEVER for k in _thresholds()}
    off["BN_TRAIN_SMALL_MIN"] = 0          # the simple BN paths answer, no general fallback
    if name == "BN_TRAIN_SMALL_MIN":       # backward from x (simple) vs general from xhat
        return [("x-based", "fast", off), ("general", "general", off)]
    on = dict(off, **{name: 0})
    if name.startswith("BN") and "BACKWARD" in name:   # caches made by the kernel forward
        on = dict(on, BN_TRAIN_FORWARD_MIN=0, BN_EVAL_FORWARD_MIN=0)
    return [("kernels", "fast", on), ("simple", "fast", off)]


def _derive(sizes, ratios):
    """Smallest size from which the median ratio over the passes is <= 1 at it and at
    every larger size (None: not even at the largest)."""
    ok = None
    for size in sorted(sizes, reverse=True):
        if B.median(ratios[size]) > 1.0:
            break
        ok = size
    return ok


def run_crossover(args):
    """BN's compiled kernels vs the simple NumPy path by size (numpy_fast's thresholds):
    the measurement behind them."""
    rng = np.random.default_rng(args.seed)
    print(f"device: cpu: {cpu_name()} ({os.cpu_count()} cores), numpy {np.__version__}, "
          f"{args.dtype}, {args.passes} passes, load average {os.getloadavg()[0]:.2f}")
    print("ratio = first / second (medians of alternating rounds); crossover = smallest size "
          "from which the median ratio over the passes is <= 1 at it and every larger size")
    results = {}
    for p in range(args.passes):
        print(f"\npass {p + 1} (load average {os.getloadavg()[0]:.2f})")
        for op, params, name, sizes in CROSSOVER:
            eval_bwd = op == "spatial_batchnorm_eval_backward"
            for shape in sizes:
                real_op = "spatial_batchnorm_backward" if eval_bwd else op
                case = B.Case(real_op, shape, args.dtype, dict(params))
                case.seed = int(rng.integers(2**31))
                pair = _crossover_pair(op, name)
                if eval_bwd:
                    entries = _eval_backward_entries(case, pair)
                else:
                    entries = _ab_entries(case, pair, rng, check=False)
                reps = args.reps or _reps_for(entries, 0.8, lo=15)
                B.round_robin(entries, reps, args.warmup if args.warmup is not None else 3)
                a, b = (B.median(e.samples) for e in entries)
                key = (op, B.pool_params_str(params) if op.startswith("max") else "", name)
                results.setdefault(key, {}).setdefault(int(np.prod(shape)), []).append(a / b)
                print(f"  {op:<32}{key[1]:<15}{str(shape):<18}{entries[0].name} {a:9.3f} ms  "
                      f"{entries[1].name} {b:9.3f} ms  ratio {a / b:5.2f}", flush=True)
    print("\ncrossover (median ratio per size over the passes; current threshold in numpy_fast)")
    current = _thresholds()
    for (op, pstr, name), ratios in results.items():
        found = _derive(ratios.keys(), ratios)
        meds = " ".join(f"{B.median(ratios[k]):.2f}" for k in sorted(ratios))
        print(f"  {name:<23}{op:<32}{pstr:<15}at {found if found else '> largest size'}"
              f"  (now {current.get(name)}; {meds})")
    return results


def _eval_backward_entries(case, pair):
    """Test-mode BN backward (bench.py's ops time only train mode's): caches from the
    test-mode forward (impl 'general': spatial_batchnorm_forward_general, else the public
    one), data made as build_case makes them."""
    entries = []
    r = np.random.default_rng(case.seed)
    x = B._random(np, case.shape, np.dtype(case.dtype), r)
    C = case.shape[1]
    g = (1.0 + 0.1 * B._random(np, (C,), np.float32, r))
    b = 0.1 * B._random(np, (C,), np.float32, r)
    dout = B._random(np, case.shape, np.dtype(case.dtype), r)
    bp = dict(mode="test", running_mean=np.full(C, 0.1, np.float32),
              running_var=np.full(C, 1.5, np.float32))
    for label, impl, values in pair:
        general = impl == "general"
        fwd = (gpulayers.spatial_batchnorm_forward_general if general
               else gpulayers.spatial_batchnorm_forward)
        bwd = (gpulayers.spatial_batchnorm_backward_general if general
               else gpulayers.spatial_batchnorm_backward)
        with _Thresholds(values):
            _, cache = fwd(x, g, b, dict(bp))

        def fn(cache=cache, values=values, bwd=bwd):
            with _Thresholds(values):
                return bwd(dout, cache)
        entries.append(B.Timed(label, fn, B.CPUClock()))
    return entries


def run_layouts(args):
    """channels_first vs channels_last (and PyTorch's channels_last memory format) of the
    public NumPy calls. Returns the number of cases failing a check (a miss of the cl/cf
    target is reported, not counted: timings are not a pass/fail of the script)."""
    preset = "smoke" if args.smoke else "quick" if args.quick else "cpu"
    rng = np.random.default_rng(args.seed)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    print(f"device: cpu: {cpu_name()} ({os.cpu_count()} cores), numpy {np.__version__}, "
          f"{args.dtype}, preset layouts-{preset}, load average {_load()}")
    print("cf = channels_first (C-contiguous NCHW); cl = data_format='channels_last' on the "
          "C-contiguous NHWC copy;\npt = PyTorch channels_last memory format (NCHW shape, NHWC "
          "strides), default data_format;\nalternating rounds after "
          f"{warmup} warm-up calls each, medians; verdict: cl/cf <= {B.LAYOUT_TARGET}; check: "
          "result moved to channels-first == cf's (pooling exactly, BN to "
          f"{B.CHECK_TOL.get(args.dtype, 0):g})")
    print(f"  {'op':<31}{'shape':<19}{'params':<16}{'cf ms':>9}{'cl ms':>9}{'pt ms':>9}"
          f"{'cl/cf':>7}{'pt/cf':>7}{'n':>5}  {'verdict':<8}{'check'}")
    bad = misses = 0
    worst = 0.0
    for op, shape, params in LAYOUT_PRESETS[preset]:
        if args.ops and op not in args.ops:
            continue
        case = B.Case(op, shape, args.dtype, dict(params))
        entries, checks = B.build_layout_case(case, np.random.default_rng(int(rng.integers(2**31))))
        reps = args.reps or (2 if args.smoke else _reps_for(entries, 1.5 if args.quick else 6.0,
                                                            lo=9, hi=61))
        B.round_robin(entries, reps, warmup)
        errors = [f"{e.name}: {e.error}" for e in entries if e.error]
        cf, cl, pt = (B.median(e.samples) for e in entries)
        r_cl, r_pt = cl / cf, pt / cf
        worst = max(worst, r_cl)
        ok = all(c[1] for c in checks.values()) and not errors
        verdict = "ok" if r_cl <= B.LAYOUT_TARGET else "MISS"
        bad += not ok
        misses += verdict != "ok"
        check = "ok" if ok else "FAIL " + "; ".join(
            errors + [f"{k} err {v[0]:.1e}" for k, v in checks.items() if not v[1]])
        pstr = case.params_str().split()[0] if case.family.startswith("bn") else case.params_str()
        if case.family == "bn_eval":
            pstr = "eval"
        print(f"  {op:<31}{str(tuple(shape)):<19}{pstr:<16}{cf:>9.3f}{cl:>9.3f}{pt:>9.3f}"
              f"{r_cl:>7.2f}{r_pt:>7.2f}{reps:>5}  {verdict:<8}{check}", flush=True)
        del entries
    print(f"worst cl/cf: {worst:.2f} (target <= {B.LAYOUT_TARGET}); {misses} miss(es), {bad} "
          f"failed check(s); load average {_load()} (end)")
    return bad


def _load():
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv=None):
    args = parse_args(argv)
    if args.layouts:
        if args.nd or args.small or args.crossover or args.device == "gpu":
            sys.exit("--layouts times the NumPy layouts on its own cases; it does not combine "
                     "with --nd, --small, --crossover or --device gpu")
        bad = run_layouts(args)
        if bad:
            print(f"\n{bad} case(s) failing the layout check", file=sys.stderr)
        return 1 if bad else 0
    if args.nd and (args.small or args.crossover):
        sys.exit("--nd times the N-d cases against PyTorch; it does not combine with "
                 "--small or --crossover")
    if args.small or args.crossover:
        if args.device == "gpu":
            sys.exit("--small and --crossover time the NumPy paths; use --device cpu")
        (run_small if args.small else run_crossover)(args)
        return 0
    setup = Setup(args)
    rng = np.random.default_rng(args.seed)
    preset, cases = make_cases(args, setup)
    reps = args.reps or (2 if args.smoke else 5 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    copy_mb = 4 if args.smoke else 32 if args.quick else 128
    copy_gbps, how = setup.copy_bandwidth(copy_mb << 20)
    torch_v = setup.torch.__version__ if setup.torch is not None else "not installed/skipped"
    print(f"device: {setup.device}\nnumpy {np.__version__}, cupy {setup.cupy_version or '-'}, "
          f"torch {torch_v}\npreset {preset}: {reps} timed rounds after {warmup} warm-up "
          f"calls, median shown\ncopy bandwidth: {copy_gbps:.1f} GB/s (read + write; {how})"
          f"\nload average {_load()}")
    skipped = []
    if args.nd:
        runnable = probe_cases(cases)
        skipped = [c for c in cases if all(c is not r for r in runnable)]
        cases = runnable
    cases = run_cases(args, setup, cases, reps, warmup, rng, copy_gbps)
    summary(cases)
    bad = nd_summary(cases, skipped) if args.nd else 0
    print(f"load average {_load()} (end)")
    if args.sweep:
        run_sweep(args, setup, rng, reps, warmup)
    if args.json:
        label = "cuda-kernels" if setup.gpu else "fast"
        peer = "torch-cuda" if setup.gpu else "torch-cpu"
        rows = [B.result_case(c, label, peer, copy_gbps) for c in cases]
        doc = B.results_document(setup.device, copy_gbps, [r for r in rows if r],
                                 cupy_version=setup.cupy_version,
                                 torch_version=setup.torch.__version__ if setup.torch else None)
        B.write_json(doc, args.json)
        print(f"\nresults JSON written to {args.json}")
    if bad:
        print(f"\n{bad} case(s) not run or not matching PyTorch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
