"""scripts/bench.py --nd: pooling beyond 2-D (1-D, 3-D, adaptive) against PyTorch.

No PyTorch needed: the peer is a small fake ``torch`` (tensors over NumPy arrays, a
tape for ``autograd.grad``, and ``F.max_pool1d/2d/3d``, ``avg_pool*d``,
``adaptive_*_pool*d`` computed by the NumPy reference below) that records which
functional it was called with. Where gpulayers does not have an N-d op yet
(``harness.probe_case`` says why), the same reference stands in for it, so the
machinery -- probes, cases, peer dispatch by rank, the check against the peer, the
summary table and the results JSON -- is tested either way; once gpulayers has the
op, the real one runs. No timing is asserted.
"""
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import gpulayers
import harness as B  # scripts/harness.py (tests/conftest.py puts scripts/ on sys.path)
from gpulayers import pooling
from gpulayers.shapes import adaptive_geometry, pool_geometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------- NumPy reference (N-d)


def _tap_slices(geom, tap):
    """Per axis, the positions of tap ``tap`` of every window in the padded input."""
    return (Ellipsis,) + tuple(slice(t * dl, t * dl + (o - 1) * s + 1, s) for t, dl, s, o in
                               zip(tap, geom.dilation, geom.stride, geom.out))


def _padded(x, geom, fill):
    buf = np.full((geom.N, geom.C) + geom.padded_shape, fill, dtype=x.dtype)
    buf[(Ellipsis,) + tuple(slice(p, p + n) for p, n in zip(geom.pad, geom.size))] = x
    return buf


def _crop(buf, geom):
    return buf[(Ellipsis,) + tuple(slice(p, p + n) for p, n in zip(geom.pad, geom.size))]


def ref_pool_forward(x, pool_param, op):
    """Max (first maximum in row-major tap order), average (count_include_pad, no
    ceil_mode) or sum pooling of any rank; cache (geom, op, offsets)."""
    geom = pool_geometry(x.shape, pool_param, op)
    taps = list(itertools.product(*(range(k) for k in geom.kernel)))
    if op == "max":
        buf = _padded(x, geom, -np.inf)
        out = np.full(geom.output_shape, -np.inf, dtype=x.dtype)
        offsets = np.zeros(geom.output_shape, dtype=np.uint8)
        for i, tap in enumerate(taps):
            v = buf[_tap_slices(geom, tap)]
            better = v > out
            out = np.where(better, v, out)
            offsets[better] = i
        return out, SimpleNamespace(geom=geom, op=op, offsets=offsets)
    buf = _padded(x, geom, 0)
    acc = np.zeros(geom.output_shape, dtype=np.float64)
    for tap in taps:
        acc += buf[_tap_slices(geom, tap)]
    if op == "avg":
        acc /= pool_param.get("divisor_override") or geom.window_size
    return acc.astype(x.dtype), SimpleNamespace(geom=geom, op=op)


def ref_pool_backward(dout, cache):
    geom = cache.geom
    taps = list(itertools.product(*(range(k) for k in geom.kernel)))
    buf = np.zeros((geom.N, geom.C) + geom.padded_shape, dtype=np.float64)
    for i, tap in enumerate(taps):
        if cache.op == "max":
            buf[_tap_slices(geom, tap)] += np.where(cache.offsets == i, dout, 0)
        else:
            buf[_tap_slices(geom, tap)] += dout
    if cache.op == "avg":
        buf /= geom.window_size
    return _crop(buf, geom).astype(dout.dtype)


def _adaptive_windows(geom):
    for o in itertools.product(*(range(n) for n in geom.out)):
        win = []
        for a, i in enumerate(o):
            start, end = geom.bounds(a)
            win.append(slice(int(start[i]), int(end[i])))
        yield (Ellipsis,) + o, (Ellipsis,) + tuple(win)


def ref_adaptive_avg_forward(x, output_size):
    geom = adaptive_geometry(x.shape, output_size)
    out = np.empty(geom.output_shape, dtype=x.dtype)
    axes = tuple(range(2, x.ndim))
    for o, win in _adaptive_windows(geom):
        out[o] = x[win].astype(np.float64).mean(axis=axes)
    return out, SimpleNamespace(geom=geom)


def ref_adaptive_avg_backward(dout, cache):
    geom = cache.geom
    dx = np.zeros(geom.input_shape, dtype=np.float64)
    for o, win in _adaptive_windows(geom):
        n = np.prod([s.stop - s.start for s in win[1:]])
        dx[win] += (dout[o] / n)[(Ellipsis,) + (None,) * geom.d]
    return dx.astype(dout.dtype)


# --------------------------------------------------------------------- fake torch


class FakeTensor:
    """A NumPy array with what harness's peer uses of a torch tensor."""

    def __init__(self, a, back=None):
        self.a = a
        self.back = back  # dout array -> (parent FakeTensor, grad array)
        self.device = SimpleNamespace(type="cpu")
        self.dtype = a.dtype

    def element_size(self):
        return self.a.itemsize

    def detach(self):
        return FakeTensor(self.a)

    def clone(self):
        return FakeTensor(self.a.copy())

    def requires_grad_(self, flag=True):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a

    def unsqueeze(self, dim):
        return FakeTensor(np.expand_dims(self.a, dim), lambda g: (self, g.squeeze(dim)))

    def squeeze(self, dim):
        return FakeTensor(self.a.squeeze(dim), lambda g: (self, np.expand_dims(g, dim)))


class FakeFunctional:
    """F.max_pool{1,2,3}d, F.avg_pool{1,2,3}d, F.adaptive_avg_pool{1,2,3}d by the
    reference; each call is recorded as (name, input ndim, arguments). ``bias`` is
    added to every output (a peer that disagrees)."""

    def __init__(self, bias=0.0):
        self.calls = []
        self.bias = bias
        for d in (1, 2, 3):
            setattr(self, f"max_pool{d}d", self._max(d))
            setattr(self, f"avg_pool{d}d", self._avg(d))
            setattr(self, f"adaptive_avg_pool{d}d", self._adaptive(d))

    def _wrap(self, t, out, cache, backward):
        res = FakeTensor(out + np.asarray(self.bias, out.dtype),
                         lambda g: (t, backward(g.astype(out.dtype), cache)))
        return res

    def _max(self, d):
        def f(t, k, s, pad, dil, ceil_mode=False, return_indices=False):
            assert t.a.ndim == d + 2 and len(k) == len(s) == len(pad) == len(dil) == d
            self.calls.append((f"max_pool{d}d", t.a.ndim, (k, s, pad, dil, ceil_mode)))
            p = dict(kernel_size=k, stride=s, pad=pad, dilation=dil, ceil_mode=ceil_mode)
            out, cache = ref_pool_forward(t.a, p, "max")
            res = self._wrap(t, out, cache, ref_pool_backward)
            return (res, FakeTensor(cache.offsets.astype(np.int64))) if return_indices else res
        return f

    def _avg(self, d):
        def f(t, k, s, pad, ceil_mode=False, count_include_pad=True, divisor_override=None):
            assert t.a.ndim == d + 2 and len(k) == len(s) == len(pad) == d
            self.calls.append((f"avg_pool{d}d", t.a.ndim,
                               (k, s, pad, ceil_mode, count_include_pad, divisor_override)))
            p = dict(kernel_size=k, stride=s, pad=pad, ceil_mode=ceil_mode,
                     divisor_override=divisor_override)
            out, cache = ref_pool_forward(t.a, p, "avg")
            return self._wrap(t, out, cache, ref_pool_backward)
        return f

    def _adaptive(self, d):
        def f(t, output_size):
            assert t.a.ndim == d + 2 and len(output_size) == d
            self.calls.append((f"adaptive_avg_pool{d}d", t.a.ndim, (tuple(output_size),)))
            out, cache = ref_adaptive_avg_forward(t.a, output_size)
            return self._wrap(t, out, cache, ref_adaptive_avg_backward)
        return f


def fake_torch(bias=0.0):
    F = FakeFunctional(bias)

    def grad(out, inputs, dout, retain_graph=False):
        g, t = dout.a, out
        while t is not inputs:
            t, g = t.back(g)
        return (FakeTensor(g),)

    return SimpleNamespace(__version__="0.0-fake", nn=SimpleNamespace(functional=F),
                           from_numpy=FakeTensor, from_dlpack=FakeTensor,
                           autograd=SimpleNamespace(grad=grad), F=F)


# ------------------------------------------- our N-d ops: the real ones, or the reference

def _rank_wrapper(real, ref, op):
    """gpulayers' own call; the reference where it raises (a rank it does not take yet)."""
    def fwd(x, p):
        try:
            return real(x, p)
        except Exception:
            return ref(x, p, op)
    fwd._nd_ref = True
    return fwd


def _backward_wrapper(real):
    def bwd(dout, cache):
        if isinstance(cache, SimpleNamespace):
            return ref_pool_backward(dout, cache)
        return real(dout, cache)
    return bwd


@pytest.fixture
def nd_ops(monkeypatch):
    """Make every op of bench.py --nd runnable: where gpulayers' op does not run on a
    rank yet (probe_case), the reference stands in. Returns the ops replaced."""
    replaced = []
    for op, shape, params in _load_bench().ND_PRESETS["smoke"]:
        case = B.Case(op, shape, "float32", dict(params))
        if B.probe_case(case) is None:
            continue
        replaced.append((case.op, case.rank))
        if case.family in ("max", "avg"):
            fwd_name, bwd_name = f"{case.family}_pool_forward", f"{case.family}_pool_backward"
            real_f, real_b = getattr(gpulayers, fwd_name), getattr(gpulayers, bwd_name)
            monkeypatch.setattr(gpulayers, fwd_name, _rank_wrapper(real_f, ref_pool_forward,
                                                                   case.family))
            monkeypatch.setattr(gpulayers, bwd_name, _backward_wrapper(real_b))
        else:
            _use(monkeypatch, "adaptive_avg_pool_forward", ref_adaptive_avg_forward)
            _use(monkeypatch, "adaptive_avg_pool_backward", ref_adaptive_avg_backward)
        assert B.probe_case(case) is None
    return replaced


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_nd_under_test",
                                                  os.path.join(REPO, "scripts", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ tests


def test_nd_preset_holds_the_issue_cases():
    bench = _load_bench()
    want = {
        ("max_pool", (8, 32, 16, 56, 56), "k=3x3x3 s=2 p=1"),
        ("avg_pool", (8, 32, 16, 56, 56), "k=3x3x3 s=2 p=1"),
        ("max_pool", (32, 64, 4096), "k=3 s=2 p=0"),
        ("adaptive_avg_pool", (32, 512, 14, 14), "out=(1, 1)"),
        ("adaptive_avg_pool", (32, 512, 14, 14), "out=(7, 7)"),
    }
    got = [B.Case(op, shape, "float32", dict(p)) for op, shape, p in bench.ND_PRESETS["cpu"]]
    for suffix in ("_forward", "_backward"):
        rows = {(c.op[:-len(suffix)], tuple(c.shape), c.params_str())
                for c in got if c.op.endswith(suffix)}
        assert rows == want
    assert len(got) == 10
    for preset in ("smoke", "quick"):  # same ops and ranks, smaller shapes
        small = bench.ND_PRESETS[preset]
        assert [(op, len(s), p) for op, s, p in small] == \
            [(op, len(s), p) for op, s, p in bench.ND_PRESETS["cpu"]]


def test_help_lists_nd():
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--nd" in out.stdout and "adaptive avg" in out.stdout


def test_params_str_and_bytes_over_ranks():
    c3 = B.Case("max_pool_forward", (2, 3, 4, 8, 8), "float32",
                {"kernel_size": 3, "stride": 2, "pad": 1})
    assert c3.rank == 3 and c3.params_str() == "k=3x3x3 s=2 p=1"
    c1 = B.Case("avg_pool_backward", (2, 3, 9), "float32",
                {"kernel_size": (3,), "stride": 2, "divisor_override": 2})
    assert c1.params_str() == "k=3 s=2 p=0 div=2"
    ca = B.Case("adaptive_avg_pool_forward", (2, 3, 9, 9), "float32", {"output_size": 7})
    assert ca.params_str() == "out=7x7" and ca.is_pool
    assert B.pool_params_str({"pool_height": 3, "pool_width": 3, "stride": 2, "pad": 1}) == \
        "k=3x3 s=2 p=1"  # the 2-D spelling is unchanged
    x, o = (2, 3, 4, 8, 8), (2, 3, 2, 4, 4)
    assert B.compulsory_bytes("max_pool_forward", x, o, 4, 1) == 1536 * 4 + 192 * 5
    assert B.compulsory_bytes("adaptive_avg_pool_backward", (2, 3, 9, 9), (2, 3, 1, 1), 4) == \
        (486 + 6) * 4
    assert B.compulsory_bytes("adaptive_max_pool_forward", (2, 3, 9), (2, 3, 3), 4, 8) == \
        54 * 4 + 18 * 12


def _use(monkeypatch, name, fn):
    """gpulayers.pooling.<name> = fn for this test (gpulayers.<name> hidden: the lookup
    tries gpulayers first); fn None: neither has it."""
    monkeypatch.delattr(gpulayers, name, raising=False)
    if fn is None:
        monkeypatch.delattr(pooling, name, raising=False)
    else:
        monkeypatch.setattr(pooling, name, fn, raising=False)


def test_probe_says_what_is_missing(monkeypatch):
    case = B.Case("adaptive_avg_pool_backward", (2, 3, 9, 9), "float32", {"output_size": (7, 7)})
    _use(monkeypatch, "adaptive_avg_pool_forward", None)
    assert "adaptive_avg_pool_forward" in B.probe_case(case)

    def broken(x, output_size):
        raise NotImplementedError("rank 2 only")
    _use(monkeypatch, "adaptive_avg_pool_forward", broken)
    _use(monkeypatch, "adaptive_avg_pool_backward", ref_adaptive_avg_backward)
    assert "NotImplementedError: rank 2 only" in B.probe_case(case)

    _use(monkeypatch, "adaptive_avg_pool_forward", lambda x, s: (x[..., :1, :1], None))
    assert "returned shape" in B.probe_case(case)
    _use(monkeypatch, "adaptive_avg_pool_forward", ref_adaptive_avg_forward)
    assert B.probe_case(case) is None
    support = B.nd_support()
    assert "max_pool 2-D" in support and support["max_pool 2-D"] is None  # 2-D runs today
    assert support["adaptive_avg_pool 2-D"] is None


@pytest.mark.parametrize("op, shape, params, functional, args", [
    ("max_pool_forward", (2, 3, 5, 8, 8), {"kernel_size": 3, "stride": 2, "pad": 1}, "max_pool3d",
     ((3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), False)),
    ("max_pool_backward", (2, 3, 33), {"kernel_size": 3, "stride": 2}, "max_pool1d",
     ((3,), (2,), (0,), (1,), False)),
    ("avg_pool_backward", (2, 3, 5, 8, 8), {"kernel_size": 3, "stride": 2, "pad": 1}, "avg_pool3d",
     ((3, 3, 3), (2, 2, 2), (1, 1, 1), False, True, None)),
    ("avg_pool_forward", (2, 3, 9), {"kernel_size": 3, "stride": 2, "divisor_override": 2},
     "avg_pool2d", ((1, 3), (1, 2), (0, 0), False, True, 2)),   # 1-D with a divisor: as 2-D
    ("adaptive_avg_pool_forward", (2, 4, 9, 9), {"output_size": (7, 7)}, "adaptive_avg_pool2d",
     ((7, 7),)),
    ("adaptive_avg_pool_backward", (2, 4, 9, 9), {"output_size": 1}, "adaptive_avg_pool2d",
     ((1, 1),)),
])
def test_peer_is_the_functional_of_the_rank(nd_ops, monkeypatch, op, shape, params, functional,
                                            args):
    torch = fake_torch()
    case = B.Case(op, shape, "float32", dict(params))
    B.build_case(case, np, ["fast"], B.CPUClock(), torch=torch)
    assert [e.name for e in case.entries] == ["fast", "torch-cpu"], case.notes
    name, ndim, got = torch.F.calls[0]
    via_2d = functional == "avg_pool2d" and len(shape) == 3   # (N, C, 1, L)
    assert (name, ndim, got) == (functional, len(shape) + via_2d, args)
    err, ok = B.check_against(case)
    assert ok and err <= B.CHECK_TOL["float32"], (err, case.notes)
    B.round_robin(case.entries, reps=2, warmup=1)
    assert all(len(e.samples) == 2 and e.error is None for e in case.entries)
    index = 8 if case.family == "max" else 0
    geom = B.case_geometry(case)
    assert case.bytes["torch-cpu"] == B.compulsory_bytes(op, shape, geom.output_shape, 4, index)


def test_check_fails_on_a_peer_that_disagrees(nd_ops):
    case = B.Case("adaptive_avg_pool_backward", (2, 4, 9, 9), "float32", {"output_size": (7, 7)})
    B.build_case(case, np, ["fast"], B.CPUClock(), torch=fake_torch())
    assert B.check_against(case)[1] is True
    fwd = B.Case("max_pool_forward", (2, 3, 5, 8, 8), "float32",
                 {"kernel_size": 3, "stride": 2, "pad": 1})
    B.build_case(fwd, np, ["fast"], B.CPUClock(), torch=fake_torch(bias=1e-3))
    err, ok = B.check_against(fwd)
    assert ok is False and err > 1e-4
    none = B.Case("max_pool_forward", (2, 3, 33), "float32", {"kernel_size": 3, "stride": 2})
    B.build_case(none, np, ["fast"], B.CPUClock())
    assert B.check_against(none) == (None, None)  # no peer: nothing to check


def _run_main(bench, argv, capsys):
    rc = bench.main(argv)
    return rc, capsys.readouterr()


def test_bench_nd_table_and_json(nd_ops, monkeypatch, tmp_path, capsys):
    bench = _load_bench()
    torch = fake_torch()
    monkeypatch.setattr(B, "import_torch", lambda threads=None: torch)
    path = tmp_path / "nd.json"
    rc, out = _run_main(bench, ["--nd", "--smoke", "--device", "cpu", "--no-progress",
                                "--no-memory", "--json", str(path)], capsys)
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    text = out.out
    assert "N-d support" in text and "NOT AVAILABLE" not in text
    table = text[text.index("--nd summary"):].splitlines()
    assert "ours ms" in table[1] and "torch ms" in table[1] and "ratio" in table[1]
    rows = [r for r in table[2:] if r.startswith("  ") and "_pool_" in r]
    assert len(rows) == 10
    for r in rows:
        assert r.rstrip().endswith(" ok"), r   # checked against the peer
        assert float(r.split()[-5]) > 0        # a ratio
    assert {c[0] for c in torch.F.calls} >= {"max_pool3d", "avg_pool3d", "max_pool1d",
                                             "adaptive_avg_pool2d"}
    doc = B.validate_results(json.loads(path.read_text()))
    assert sorted({len(c["shape"]) for c in doc["cases"]}) == [3, 4, 5]
    assert len(doc["cases"]) == 10 and doc["torch"] == "0.0-fake"
    assert all(c["torch_ms"] > 0 and c["ratio"] > 0 for c in doc["cases"])
    assert '"shape": [2, 3, 5, 8, 8]' in path.read_text()  # one line per shape


def test_bench_nd_fails_on_mismatch_and_missing(nd_ops, monkeypatch, capsys):
    bench = _load_bench()
    monkeypatch.setattr(B, "import_torch", lambda threads=None: fake_torch(bias=0.5))
    rc, out = _run_main(bench, ["--nd", "--smoke", "--device", "cpu", "--no-progress",
                                "--no-memory", "--ops", "max_pool_forward"], capsys)
    assert rc == 1 and "FAIL" in out.out and "not matching PyTorch" in out.err
    # an op gpulayers does not have: listed, skipped, exit 1, the others still run
    monkeypatch.setattr(B, "import_torch", lambda threads=None: fake_torch())
    _use(monkeypatch, "adaptive_avg_pool_forward", None)
    rc, out = _run_main(bench, ["--nd", "--smoke", "--device", "cpu", "--no-progress",
                                "--no-memory", "--ops", "adaptive_avg_pool_forward",
                                "max_pool_backward"], capsys)
    assert rc == 1 and "NOT AVAILABLE: gpulayers has no adaptive_avg_pool_forward" in out.out
    summary = out.out[out.out.index("--nd summary"):]
    assert "not run: gpulayers has no adaptive_avg_pool_forward" in summary
    assert sum(r.rstrip().endswith(" ok") for r in summary.splitlines()) == 2  # 3-D and 1-D


def test_bench_nd_no_torch_subprocess():
    """As users run it, with gpulayers' own N-d ops (skipped until they all run)."""
    bench = _load_bench()
    missing = {op: why for op, shape, p in bench.ND_PRESETS["smoke"]
               if (why := B.probe_case(B.Case(op, shape, "float32", dict(p)))) is not None}
    if missing:
        pytest.skip(f"gpulayers does not run these yet: {missing}")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--nd",
                           "--smoke", "--device", "cpu", "--no-torch", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("--nd summary"):].splitlines()
    assert sum("_pool_" in r for r in summary) == 10


def test_results_json_takes_every_rank(tmp_path):
    case = {"op": "adaptive_avg_pool_backward", "shape": [8, 32, 16, 56, 56], "dtype": "float32",
            "params": "out=(1, 1, 1)", "gpulayers_ms": 1.0, "torch_ms": None, "ratio": None,
            "bytes": 10, "bandwidth_fraction": None}
    for op in B.OPS:
        for shape in ([2, 3, 7], [2, 3, 7, 7], [2, 3, 4, 7, 7]):
            B.validate_results(B.results_document("dev", 1.0, [{**case, "op": op, "shape": shape}],
                                                  commit="abc"))
    doc = B.results_document("dev", 1.0, [case], commit="abc")
    for bad in ([2, 3], [1, 2, 3, 4, 5, 6], [2, 3, 7.0], [2, True, 7], "2, 3, 7"):
        with pytest.raises(ValueError, match="shape"):
            B.validate_results({**doc, "cases": [{**case, "shape": bad}]})
    with pytest.raises(ValueError, match="unknown"):
        B.validate_results({**doc, "cases": [{**case, "op": "max_pool3d"}]})
    B.write_json(doc, str(tmp_path / "r.json"))
    assert '"shape": [8, 32, 16, 56, 56]' in (tmp_path / "r.json").read_text()
    assert json.loads((tmp_path / "r.json").read_text()) == doc
