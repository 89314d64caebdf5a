"""benchmarks/host_cost.py keeps working: its stand-in CuPy, every case once, tiny counts.
No timing is asserted (the benchmark is a benchmark, not a timed test)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from gpulayers import backend

ROOT = Path(__file__).resolve().parents[1]


def _host_cost():
    spec = importlib.util.spec_from_file_location("host_cost", ROOT / "benchmarks" /
                                                  "host_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_case_runs_and_launches(tmp_path):
    H = _host_cost()
    had = "cupy" in sys.modules
    with H.installed() as cp:
        assert backend.is_cupy_array(cp.empty((2, 3), np.float32))
        table = H.cases(cp)
        assert len(table) == 16
        for name, fn in table.items():
            before = cp.launches[0]
            fn()
            assert cp.launches[0] > before, name   # each call reached a (no-op) kernel launch
        median, best = H.measure(table["max_pool_forward 2x2/2"], calls=3, repeats=2, warmup=1)
        assert 0 < best <= median
    assert ("cupy" in sys.modules) == had          # the stand-in is gone again
    out = tmp_path / "hc.json"
    assert H.main(["--calls", "2", "--repeats", "1", "--warmup", "0", "--only", "2x2",
                   "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["us_per_call"]) == {"max_pool_forward 2x2/2", "max_pool_backward 2x2/2"}


# ------------------------------------------------------------ warmed calls (issue 13 §1)
#
# A warmed call (the same kind of inputs as an earlier call that passed every check) runs a
# prepared launch instead of the checked path. It must launch exactly what the checked path
# launches (same kernels, grids, blocks, scalar arguments, and pointers to the same places in
# the same arrays), return the same kind of results, and leave every error as it was.

import pytest

import gpulayers as G
from gpulayers import batchnorm as BN
from gpulayers import layers as L
from gpulayers import pooling as P

H = _host_cost()


@pytest.fixture
def cp():
    previous = backend.set_kernels(True)
    with H.installed(strict=True, n_devices=2) as cp:
        yield cp
    backend.set_kernels(previous)


def _labeler(cp, known):
    """label(array or memory pointer) -> ('in', name, byte offset) for places in the named
    input arrays, ('new', k, byte offset) for the k-th other array met, in order of use."""
    spans = [(name, a.data.ptr, a.nbytes) for name, a in known.items()]
    new = []

    def label(a):
        ptr = a.ptr if not isinstance(a, cp.ndarray) else a.data.ptr
        for name, base, n in spans:
            if base <= ptr < base + max(n, 1):
                return ("in", name, ptr - base)
        for k, (base, n) in enumerate(new):
            if base <= ptr < base + max(n, 1):
                return ("new", k, ptr - base)
        if not isinstance(a, cp.ndarray):
            return ("unknown pointer",)
        new.append((ptr, a.nbytes))
        return ("new", len(new) - 1, 0)
    return label


def _run(cp, fn, known, outputs):
    """(launches, outputs) of fn() with every pointer labelled; or the exception raised."""
    start = len(cp.launched)
    try:
        result = fn()
    except Exception as exc:   # noqa: BLE001 -- compared, type and message
        return ("raised", type(exc), str(exc))
    label = _labeler(cp, known)

    def norm(a):
        if isinstance(a, (cp.ndarray, type(cp.empty(1).data))):
            return label(a)
        if isinstance(a, np.generic):
            return (type(a), a.item())
        return a
    launches = [(name, grid, block, tuple(norm(a) for a in args))
                for name, grid, block, args in cp.launched[start:]]
    outs = []
    for a in outputs(result):
        outs.append(None if a is None else (label(a), a.shape, a.strides, a.dtype)
                    if isinstance(a, cp.ndarray) else a)
    return launches, outs


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls


def _bn_outputs(bp):
    def outputs(result):
        y, cache = result
        return [y, cache.stats, cache.mean, cache.invstd, cache.gamma, cache.x, bp.get(
            "running_mean"), bp.get("running_var"), cache.op, cache.path, cache.axes,
            cache.train, cache.dtype, cache.count, cache.shape, cache.layout,
            cache.gamma_dtype, cache.beta_dtype, cache.xhat, cache.comm]
    return outputs


BN_CASES = [
    ("spatial_batchnorm_forward", (4, 6, 5, 7), np.float32, {"mode": "train"}),
    ("spatial_batchnorm_forward", (4, 6, 5, 8), np.float64,
     {"mode": "train", "convention": "torch", "momentum": 0.2, "eps": 1e-3}),
    ("spatial_batchnorm_forward", (4, 6, 9), np.float32, {"mode": "test"}),
    ("spatial_batchnorm_forward", (3, 6, 2, 3, 4), np.float32, {"mode": "train"}),
    ("batchnorm_forward", (16, 6), np.float32, {"mode": "train", "eps": 2e-5}),
    ("batchnorm_forward", (16, 6), np.float64, {"mode": "test"}),
]


@pytest.mark.parametrize("op, shape, dtype, param", BN_CASES)
def test_warm_bn_launches_what_the_checked_path_launches(cp, monkeypatch, op, shape, dtype,
                                                         param):
    fwd = getattr(G, op)
    bwd = getattr(G, op.replace("forward", "backward"))
    C = shape[1]
    sd = np.float64 if dtype == np.float64 else np.float32
    x, dout = cp.empty(shape, dtype), cp.empty(shape, dtype)
    gamma, beta, rm, rv = (cp.empty(C, sd) for _ in range(4))
    checked = _spy(monkeypatch, BN, "_forward_checked")
    checked_back = _spy(monkeypatch, BN, "_backward_checked")

    def bp():
        return dict(param, running_mean=rm, running_var=rv)
    known = {"x": x, "gamma": gamma, "beta": beta, "rm": rm, "rv": rv, "dout": dout}
    runs = []
    for i in range(3):
        p = bp()
        out = _run(cp, lambda: fwd(x, gamma, beta, p), known, _bn_outputs(p))
        assert out[0] and out[0][0] != "raised", out
        runs.append(out)
    assert checked == ["_forward_checked"]          # the first call only: then warmed
    assert runs[0] == runs[1] == runs[2]
    _, cache = fwd(x, gamma, beta, bp())
    known_b = dict(known, stats=cache.stats if cache.stats is not None else cp.empty(1),
                   mean=cache.mean if cache.mean is not None else cp.empty(1),
                   invstd=cache.invstd if cache.invstd is not None else cp.empty(1))
    back = [_run(cp, lambda: bwd(dout, cache), known_b, lambda r: list(r)) for _ in range(3)]
    assert checked_back == ["_backward_checked"]
    assert back[0] == back[1] == back[2] and len(back[0][0]) == 2


def _outcome(cp, fn, known):
    out = _run(cp, fn, known, lambda r: [])
    return out if out[0] == "raised" else ("ok", out[0])


@pytest.mark.parametrize("change", [
    "gamma shape", "gamma dtype", "x dtype", "eps", "eps zero", "momentum", "mode",
    "unknown key", "running_mean dtype", "running_var shape", "gamma device", "x device",
    "kernels off", "convention", "eps int", "x strides"])
def test_warm_bn_keeps_every_check(cp, monkeypatch, change):
    """After warming, a changed input gives exactly what the checked path gives for it."""
    shape, C = (4, 6, 5, 7), 6
    x = cp.empty(shape, np.float32)
    gamma, beta, rm, rv = (cp.empty(C, np.float32) for _ in range(4))
    base = {"mode": "train", "eps": 1e-5, "momentum": 0.9, "running_mean": rm,
            "running_var": rv}
    for _ in range(2):
        G.spatial_batchnorm_forward(x, gamma, beta, dict(base))
    args = {"x": x, "gamma": gamma, "beta": beta}
    p = dict(base)
    if change == "gamma shape":
        args["gamma"] = cp.empty(C + 1, np.float32)
    elif change == "gamma dtype":
        args["gamma"] = cp.empty(C, np.float64)
    elif change == "x dtype":
        args["x"] = cp.empty(shape, np.float16)
    elif change == "x strides":
        args["x"] = cp.empty(shape[:3] + (14,), np.float32)[..., ::2]
    elif change == "eps":
        p["eps"] = -1e-5
    elif change == "eps zero":
        p["eps"] = 0.0
    elif change == "eps int":
        p["eps"] = 1
    elif change == "momentum":
        p["momentum"] = 1.5
    elif change == "mode":
        p["mode"] = "eval"
    elif change == "convention":
        p["convention"] = "keras"
    elif change == "unknown key":
        p["epsilon"] = 1e-5
    elif change == "running_mean dtype":
        p["running_mean"] = cp.empty(C, np.float64)
    elif change == "running_var shape":
        p["running_var"] = cp.empty(C + 2, np.float32)
    elif change in ("gamma device", "x device"):
        with cp.cuda.Device(1):
            args[change.split()[0]] = cp.empty(args[change.split()[0]].shape, np.float32)
    elif change == "kernels off":
        backend.set_kernels(False)
    known = dict(args, rm=rm, rv=rv)
    op = "spatial_batchnorm_forward"
    public = _outcome(cp, lambda: G.spatial_batchnorm_forward(args["x"], args["gamma"],
                                                              args["beta"], dict(p)), known)
    checked = _outcome(cp, lambda: BN._forward_checked(args["x"], args["gamma"], args["beta"],
                                                       dict(p), op, op, True), known)
    assert public == checked


def test_warm_layers_launch_what_the_checked_path_launches(cp, monkeypatch):
    checked = _spy(monkeypatch, BN, "_forward_checked")
    with backend.use_backend("cupy"):
        bn = L.BatchNorm2d(6)
        pool = L.MaxPool2d(3, stride=2, padding=1)
    x = cp.empty((4, 6, 9, 10), np.float32)
    known = {"x": x, "gamma": bn.params["gamma"], "beta": bn.params["beta"]}

    def step():
        y = bn.forward(x)
        return [y, bn.cache.stats, bn.buffers["running_mean"], bn.buffers["running_var"],
                bn.cache.x, bn.cache.gamma]
    runs = [_run(cp, step, known, lambda r: r) for _ in range(3)]
    assert runs[1] == runs[2] and len(checked) == 1
    # the first call read the initial buffers, later ones the block rows written back
    assert runs[0][0][0][:2] == runs[1][0][0][:2]
    for change in ("eps", "eval", "momentum"):
        if change == "eps":
            bn.eps = -1.0
            with pytest.raises(ValueError, match="eps"):
                bn.forward(x)
            bn.eps = 1e-5
        elif change == "eval":
            bn.eval()
            bn.forward(x)
            assert bn.cache.train is False
            bn.train()
        else:
            bn.momentum = 2
            with pytest.raises(ValueError, match="momentum"):
                bn.forward(x)
            bn.momentum = None
    bn.forward(x)
    assert bn.cache.train is True
    pruns = [_run(cp, lambda: pool.forward(x), {"x": x}, lambda r: [r]) for _ in range(3)]
    assert pruns[0] == pruns[1] == pruns[2]
    pool.pool_param["stride"] = 3           # a changed parameter is seen at once
    assert pool.forward(x).shape == (4, 6, 3, 4)


@pytest.mark.parametrize("param", [{"pool_height": 2, "pool_width": 2, "stride": 2},
                                   {"kernel_size": 3, "stride": 2, "pad": 1}])
def test_warm_max_pool_launches_what_the_checked_path_launches(cp, monkeypatch, param):
    checked = _spy(monkeypatch, P, "max_pool_forward_fast")
    checked_back = _spy(monkeypatch, P, "max_pool_backward_fast")
    x = cp.empty((4, 6, 9, 10), np.float32)
    runs = [_run(cp, lambda: G.max_pool_forward(x, dict(param)), {"x": x},
                 lambda r: [r[0], r[1].offsets, r[1].geom, r[1].dtype, r[1].layout])
            for _ in range(3)]
    assert runs[0] == runs[1] == runs[2] and checked == ["max_pool_forward_fast"]
    out, cache = G.max_pool_forward(x, dict(param))
    dout = cp.empty(out.shape, np.float32)
    known = {"dout": dout, "offsets": cache.offsets}
    back = [_run(cp, lambda: G.max_pool_backward(dout, cache), known, lambda r: [r])
            for _ in range(3)]
    assert back[0] == back[1] == back[2] and checked_back == ["max_pool_backward_fast"]
    # after warming, changed inputs get the checked path's answer
    for bad in (dict(param, stride=0), dict(param, pad=7), dict(param, dilation=0.5)):
        public = _outcome(cp, lambda: G.max_pool_forward(x, bad), {"x": x})
        ref = _outcome(cp, lambda: P.max_pool_forward_fast(x, bad), {"x": x})
        assert public == ref and public[0] == "raised"
    for d in (cp.empty(out.shape, np.float64), cp.empty(out.shape[:3] + (1,), np.float32)):
        public = _outcome(cp, lambda: G.max_pool_backward(d, cache), known)
        assert public == _outcome(cp, lambda: P.max_pool_backward_fast(d, cache), known)
    with cp.cuda.Device(1):
        d1 = cp.empty(out.shape, np.float32)
    assert _outcome(cp, lambda: G.max_pool_backward(d1, cache), known)[0] == "raised"


def test_set_tuning_drops_the_prepared_calls(cp):
    from gpulayers.cuda import bn_kernels
    with backend.use_backend("cupy"):
        bn = L.BatchNorm2d(6)
    x = cp.empty((4, 6, 9, 10), np.float32)
    bn.forward(x)
    bn.forward(x)
    held = bn._warm[7]
    assert held.ready[1] is not None
    before = dict(bn_kernels.TUNING)
    try:
        bn_kernels.set_tuning(blocks_per_sm=before["blocks_per_sm"])
        assert held.ready == [None, None] and not BN._WARM   # re-planned on the next call
        bn.forward(x)
    finally:
        bn_kernels.set_tuning(**before)
