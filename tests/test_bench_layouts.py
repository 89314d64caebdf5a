"""bench.py --layouts (issue 12): channels_first vs channels_last on NumPy. Tiny shapes,
no timing assertions, no torch."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import harness as B  # scripts/harness.py (tests/conftest.py puts scripts/ on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_layouts_under_test",
                                                  os.path.join(REPO, "scripts", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_preset_holds_the_issue_cases():
    bench = _load_bench()
    got = [(op, tuple(s), B.Case(op, s, "float32", dict(p)).params_str())
           for op, s, p in bench.LAYOUT_PRESETS["cpu"]]
    assert got == [
        ("max_pool_forward", (32, 64, 56, 56), "k=3x3 s=2 p=1"),
        ("max_pool_backward", (32, 64, 56, 56), "k=3x3 s=2 p=1"),
        ("max_pool_forward", (16, 64, 112, 112), "k=2x2 s=2 p=0"),
        ("max_pool_backward", (16, 64, 112, 112), "k=2x2 s=2 p=0"),
        ("spatial_batchnorm_forward", (32, 64, 56, 56), got[4][2]),
        ("spatial_batchnorm_backward", (32, 64, 56, 56), got[5][2]),
        ("spatial_batchnorm_eval_forward", (32, 64, 56, 56), got[6][2]),
        ("avg_pool_forward", (32, 512, 14, 14), "k=3x3 s=2 p=1"),
        ("avg_pool_backward", (32, 512, 14, 14), "k=3x3 s=2 p=1"),
        ("adaptive_avg_pool_forward", (32, 512, 14, 14), "out=(1, 1)"),
        ("adaptive_avg_pool_backward", (32, 512, 14, 14), "out=(1, 1)"),
    ]
    for preset in ("smoke", "quick"):  # same ops and params, smaller shapes
        assert [(op, p) for op, _, p in bench.LAYOUT_PRESETS[preset]] == \
            [(op, p) for op, _, p in bench.LAYOUT_PRESETS["cpu"]]


@pytest.mark.parametrize("op, params", [
    ("max_pool_forward", {"pool_height": 3, "pool_width": 3, "stride": 2, "pad": 1}),
    ("max_pool_backward", {"pool_height": 2, "pool_width": 2, "stride": 2}),
    ("avg_pool_backward", {"pool_height": 3, "pool_width": 3, "stride": 2, "pad": 1}),
    ("adaptive_avg_pool_backward", {"output_size": (1, 1)}),
    ("spatial_batchnorm_forward", {"eps": 1e-5, "momentum": 0.9}),
    ("spatial_batchnorm_backward", {"eps": 1e-5, "momentum": 0.9}),
    ("spatial_batchnorm_eval_forward", {"eps": 1e-5, "momentum": 0.9}),
])
def test_layout_case_inputs_and_checks(op, params):
    case = B.Case(op, (2, 3, 6, 6), "float32", dict(params))
    entries, checks = B.build_layout_case(case, np.random.default_rng(0))
    assert [e.name for e in entries] == list(B.LAYOUTS) == ["cf", "cl", "pt"]
    assert set(checks) == {"cl", "pt"}
    for layout, (err, ok) in checks.items():
        assert ok, (layout, err)
        if case.is_pool:
            assert err == 0.0
    B.round_robin(entries, reps=2, warmup=1)
    assert all(len(e.samples) == 2 and e.error is None for e in entries)


def test_layout_inputs_are_the_layouts():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    cl = B.to_channels_last(x)
    assert cl.shape == (2, 4, 5, 3) and cl.flags.c_contiguous
    pt = B.to_channels_first(cl)      # PyTorch channels_last memory format
    assert pt.shape == x.shape and not pt.flags.c_contiguous and np.array_equal(pt, x)
    assert np.shares_memory(pt, cl)


def test_layout_check_catches_a_wrong_result(monkeypatch):
    case = B.Case("max_pool_forward", (2, 3, 6, 6), "float32",
                  {"pool_height": 2, "pool_width": 2, "stride": 2})
    real = B._layout_call

    def wrong(case, layout, *a):
        fn, res = real(case, layout, *a)
        return fn, (res + 1 if layout == "cl" else res)
    monkeypatch.setattr(B, "_layout_call", wrong)
    _, checks = B.build_layout_case(case, np.random.default_rng(1))
    assert checks["cl"][1] is False and checks["pt"][1] is True


def test_bench_layouts_smoke_main(capsys):
    bench = _load_bench()
    rc = bench.main(["--layouts", "--smoke", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    header = next(r for r in out.splitlines() if "cf ms" in r)
    assert all(w in header for w in ("cl ms", "pt ms", "cl/cf", "pt/cf", "verdict", "check"))
    rows = [r for r in out.splitlines()
            if r.startswith("  ") and r.split()[0].endswith(("_forward", "_backward"))]
    assert len(rows) == 11
    for r in rows:
        assert r.rstrip().endswith(" ok"), r                 # layout check passed
        assert r.split()[-2] in ("ok", "MISS"), r            # verdict vs 1.3 (not asserted)
        assert float(r.split()[-5]) > 0                      # cl/cf ratio
    assert "worst cl/cf" in out


def test_bench_layouts_fails_on_a_wrong_result(monkeypatch, capsys):
    bench = _load_bench()
    real = B._layout_call
    monkeypatch.setattr(B, "_layout_call", lambda case, layout, *a: (
        lambda fn, res: (fn, res * 2 if layout == "pt" else res))(*real(case, layout, *a)))
    rc = bench.main(["--layouts", "--smoke", "--ops", "max_pool_forward"])
    out = capsys.readouterr()
    assert rc == 1 and "FAIL" in out.out and "pt err" in out.out
    assert "failing the layout check" in out.err


def test_help_lists_layouts_and_subprocess_smoke():
    script = os.path.join(REPO, "scripts", "bench.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--layouts" in out.stdout and "channels_last" in out.stdout
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, script, "--layouts", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "worst cl/cf" in proc.stdout
    bad = subprocess.run([sys.executable, script, "--layouts", "--nd"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "does not combine" in bad.stderr
