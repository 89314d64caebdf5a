"""The benchmark scripts run end to end (tiny shapes, NumPy) and write valid results JSON.

scripts/bench.py --smoke and scripts/gpu_check.py --smoke run as users run
them, in a subprocess; neither needs PyTorch (gpu_check uses it as the peer
when it imports). The shared machinery in scripts/harness.py is tested
directly.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import harness as B  # scripts/harness.py (tests/conftest.py puts scripts/ on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_smoke_writes_valid_json(tmp_path):
    path = tmp_path / "bench.json"
    out = run_script("bench.py", "--smoke", "--device", "cpu", "--no-torch", "--no-progress",
                     "--sweep", "--plot", str(tmp_path / "sweep.png"), "--json", str(path))
    doc = B.validate_results(json.loads(path.read_text()))
    ops = {c["op"] for c in doc["cases"]}
    assert {"max_pool_forward", "max_pool_backward", "spatial_batchnorm_forward",
            "spatial_batchnorm_backward", "spatial_batchnorm_eval_forward"} <= ops
    for c in doc["cases"]:
        assert c["gpulayers_ms"] > 0 and c["bytes"] > 0 and c["torch_ms"] is None
    assert "summary" in out and "sweep: time vs work" in out and "fit: ms =" in out
    # every implementation agrees with the public entry point on the pooling cases
    for line in out.splitlines():
        if line.strip().startswith(("general", "reshape", "naive")) and "e+" in line:
            assert line.rstrip().endswith("0.0e+00"), line
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("no_torch", [True, False], ids=["no-torch", "torch-if-installed"])
def test_gpu_check_dry_run(tmp_path, no_torch):
    args = ["--smoke", "--out", str(tmp_path)] + (["--no-torch"] if no_torch else [])
    out = run_script("gpu_check.py", *args)
    files = [p for p in tmp_path.iterdir() if p.suffix == ".json"
             and p.name not in ("checks.json", "errors.json")]
    assert len(files) == 1, files
    doc = B.validate_results(json.loads(files[0].read_text()))
    assert doc["device"].startswith("cpu (dry run")
    assert doc["copy_GBps"] > 0 and len(doc["cases"]) == 5
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert checks and all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    assert json.loads((tmp_path / "errors.json").read_text()) == []
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    assert out.rstrip().splitlines()[-1].startswith("results JSON:")  # the table comes last
    if no_torch or doc["torch"] == "none":
        assert all(c["torch_ms"] is None and c["ratio"] is None for c in doc["cases"])
    else:
        assert all(c["torch_ms"] > 0 for c in doc["cases"])


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check",
                                                  os.path.join(REPO, "scripts", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_pytest_summary_and_timeout():
    parse = _load_gpu_check().parse_pytest
    text = "....F..s\n=== FAILURES ===\nFAILED tests/a.py::t\n3 failed, 70 passed, 4 skipped, 1 error in 12.34s\n"
    assert parse(text) == ({"passed": 70, "failed": 4, "skipped": 4}, True)
    assert parse("..F.s.....   [ 40%]\n.sE\n") == ({"passed": 9, "failed": 2, "skipped": 2}, False)


def test_compulsory_bytes():
    x, o = (2, 3, 8, 8), (2, 3, 4, 4)
    assert B.compulsory_bytes("max_pool_forward", x, o, 4, 1) == 384 * 4 + 96 * 5
    assert B.compulsory_bytes("max_pool_forward", x, o, 4, 8) == 384 * 4 + 96 * 12
    assert B.compulsory_bytes("max_pool_backward", x, o, 2, 1) == 96 * 3 + 384 * 2
    assert B.compulsory_bytes("spatial_batchnorm_backward", x, x, 4, 0, 4) == 3 * 384 * 4 + 3 * 4 * 5
    with pytest.raises(ValueError):
        B.compulsory_bytes("conv", x, o, 4)


def test_round_robin_alternates_and_survives_a_failure():
    order = []

    class Clock(B.CPUClock):
        pass

    def boom():
        raise RuntimeError("broken")

    entries = [B.Timed("a", lambda: order.append("a"), Clock()),
               B.Timed("b", lambda: order.append("b"), Clock()),
               B.Timed("bad", boom, Clock()),
               B.Timed("c", lambda: order.append("c"), Clock(), reps=1)]
    B.round_robin(entries, reps=3, warmup=1)
    assert entries[2].error.startswith("RuntimeError") and entries[2].samples == []
    assert [len(e.samples) for e in entries] == [3, 3, 0, 1]
    timed = order[3:]  # after one warm-up call each
    assert timed[:3] == ["a", "b", "c"] and timed[3:5] == ["b", "a"]  # round 2 starts at b


def test_results_format_is_checked(tmp_path):
    case = {"op": "max_pool_forward", "shape": [1, 2, 3, 4], "dtype": "float32", "params": "k",
            "gpulayers_ms": 1.0, "torch_ms": 2.0, "ratio": 0.5, "bytes": 10,
            "bandwidth_fraction": 0.1}
    doc = B.results_document("dev", 10.0, [case], commit="abc")
    B.write_json(doc, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == doc
    for bad in ({**case, "extra": 1}, {**case, "shape": [1, 2]}, {**case, "op": "conv"}):
        with pytest.raises(ValueError):
            B.validate_results({**doc, "cases": [bad]})
    assert B.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_build_case_same_data_and_agreement():
    case = B.Case("max_pool_forward", (2, 3, 8, 8), "float32",
                  {"pool_height": 2, "pool_width": 2, "stride": 2})
    B.build_case(case, np, ["fast", "general", "reshape", "naive"], B.CPUClock())
    assert [e.name for e in case.entries] == ["fast", "general", "reshape", "naive"]
    assert set(B.agreement(case).values()) == {0.0}
    assert case.bytes["fast"] == 384 * 4 + 96 * 5
    peak, kept = B.peak_memory(case.forward_fns["fast"])
    assert kept >= 96 * 5 and peak >= kept


# ------------------------------------------------- no usable GPU / backend: say why, write nothing


def _fake_modules(root, **modules):
    """A folder to put first on PYTHONPATH that shadows real packages:
    ``modules`` maps a dotted module name to its source."""
    for name, source in modules.items():
        parts = name.split(".")
        folder = root.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text(source)
    return root


NO_CUPY = {"cupy": "raise ImportError('simulated: no CUDA on this machine')\n"}
# CuPy that imports and sees one device, built without NCCL
CUPY_WITHOUT_NCCL = {
    "cupy": "__version__ = '0.0-fake'\nfrom . import cuda\n",
    "cupy.cuda": "from . import runtime\n",
    "cupy.cuda.runtime": "def getDeviceCount():\n    return 1\n",
}
NO_MPI4PY = {"mpi4py": "raise ImportError('simulated: mpi4py not installed')\n"}


def run_script_rc(name, *args, fake=None, cwd=REPO, env_extra=None, timeout=120):
    """(returncode, stdout, stderr) of scripts/<name>; ``fake`` is a folder put first on PYTHONPATH."""
    paths = ([str(fake)] if fake else []) + [REPO] + [os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    env.pop("OUT", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                          cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _snapshot(folder):
    """{name: (size, mtime_ns)} of everything under folder (missing folder: None)."""
    if not os.path.isdir(folder):
        return None
    snap = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.stat(p)
            snap[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return snap


@pytest.mark.parametrize("how", ["--out", "$OUT", "default"])
def test_gpu_check_without_gpu_says_why_and_writes_nothing(tmp_path, how):
    fake = _fake_modules(tmp_path / "fake", **NO_CUPY)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out"
    results = os.path.join(REPO, "benchmarks", "results")
    before = _snapshot(results)
    args = ["--out", str(out)] if how == "--out" else []
    env = {"OUT": str(out)} if how == "$OUT" else None
    rc, stdout, stderr = run_script_rc("gpu_check.py", *args, "--no-torch", fake=fake, cwd=cwd,
                                       env_extra=env)
    assert rc != 0
    assert "CuPy is not usable" in stderr and "simulated: no CUDA on this machine" in stderr, stderr
    assert "Traceback" not in stderr
    assert not out.exists()  # no output folder, no log, no results JSON
    assert os.listdir(cwd) == []  # no ./gpu_check_out either
    assert _snapshot(results) == before  # benchmarks/results/ untouched
    assert sorted(os.listdir(tmp_path)) == ["cwd", "fake"]


def _one_line_refusal(rc, stdout, stderr, *needles):
    assert rc == 2, (rc, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("ddp_example: cannot run here: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert stdout == ""


def test_ddp_example_backend_cupy_without_cupy(tmp_path):
    fake = _fake_modules(tmp_path, **NO_CUPY)
    _one_line_refusal(*run_script_rc("ddp_example.py", "--backend", "cupy", fake=fake),
                      "--backend cupy", "CuPy is not usable", "simulated: no CUDA")
    _one_line_refusal(*run_script_rc("ddp_example.py", "--backend", "cupy", "--comm", "nccl",
                                     fake=fake), "CuPy is not usable")


def test_ddp_example_backend_cupy_here():
    """The real thing on this machine: where CuPy is not usable, one line says why."""
    from gpulayers import backend
    reason = backend.cupy_unusable_reason()
    if reason is None:
        pytest.skip("CuPy is usable here")
    _one_line_refusal(*run_script_rc("ddp_example.py", "--backend", "cupy"), reason)


def test_ddp_example_nccl_without_nccl(tmp_path):
    fake = _fake_modules(tmp_path, **CUPY_WITHOUT_NCCL)
    _one_line_refusal(*run_script_rc("ddp_example.py", "--backend", "cupy", "--comm", "nccl",
                                     fake=fake), "--comm nccl", "no NCCL")


def test_ddp_example_mpi_without_mpi4py(tmp_path):
    fake = _fake_modules(tmp_path, **NO_MPI4PY)
    _one_line_refusal(*run_script_rc("ddp_example.py", "--comm", "mpi", fake=fake),
                      "mpi4py does not import", "simulated: mpi4py not installed")


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "argument --steps"),
    (["--batch", "0"], "argument --batch"),
    (["--channels", "0"], "argument --channels"),
    (["--size", "1"], "argument --size"),
    (["--timeout", "0"], "argument --timeout"),
    (["--batch", "1", "--size", "3"], "more than one value per channel"),
    (["--comm", "nccl"], "--comm nccl needs --backend cupy"),
])
def test_ddp_example_bad_arguments_are_usage_errors(args, needle):
    rc, stdout, stderr = run_script_rc("ddp_example.py", *args)
    assert rc == 2 and "Traceback" not in stderr, stderr
    assert needle in stderr.strip().splitlines()[-1], stderr
