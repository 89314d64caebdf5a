"""The main job, python -m gpulayers: runs, checks, reports, and says why CuPy is unusable."""
import datetime
import json
import os
import re
import subprocess

import pytest

import gpulayers
from gpulayers import __main__ as main_job
from gpulayers import backend, pooling, provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict_json(text):
    """json.loads that refuses NaN, Infinity and -Infinity (not JSON)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_main_job_checks_every_layer(tmp_path, capsys):
    out = tmp_path / "main.json"
    rc = main_job.main(["--backend", "numpy", "--size", "small", "--reps", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "all checks passed" in text
    rows = json.loads(out.read_text())["rows"]
    assert {r["layer"] for r in rows} >= {"max_pool 3x3/2 pad 1", "avg_pool 3x3/2 pad 1",
                                          "max_unpool 2x2", "spatial_batchnorm train"}
    assert all(r["ok"] and r["forward_ms"] > 0 and r["backward_GBps"] > 0 for r in rows)
    if backend.cupy_unusable_reason():
        assert "cupy is not usable" in text


def test_main_job_refuses_an_unusable_backend(capsys):
    if "cupy" in backend.available_backends():
        pytest.skip("CuPy is usable here")
    assert main_job.main(["--backend", "cupy"]) == 2
    err = capsys.readouterr().err
    assert "not usable" in err and backend.cupy_unusable_reason() in err


def test_main_job_fails_when_a_check_fails(monkeypatch, capsys):
    monkeypatch.setattr(main_job, "_err", lambda a, ref: 1.0)
    assert main_job.main(["--backend", "numpy", "--size", "small", "--reps", "1"]) == 1
    assert "SOME CHECKS FAILED" in capsys.readouterr().out


def test_table_shows_shape_and_dtype_of_every_case(capsys):
    assert main_job.main(["--backend", "numpy", "--reps", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if ln.startswith("numpy ")]
    assert len(lines) == 8
    assert any(ln.split()[:4] == ["backend", "layer", "shape", "dtype"] for ln in out)
    for ln in lines:
        assert "float32" in ln, ln
    pooled = [ln for ln in lines if ("pool" in ln or "spatial" in ln)
              and "3-D" not in ln and "NHWC" not in ln]
    assert len(pooled) == 5 and all("(2, 64, 112, 112)" in ln for ln in pooled), pooled
    assert any("3-D" in ln and "(2, 16, 8, 28, 28)" in ln for ln in lines), lines
    assert any("NHWC" in ln and "(2, 112, 112, 64)" in ln for ln in lines), lines
    assert any("batchnorm (N, D)" in ln and "(32, 512)" in ln for ln in lines), lines


def test_default_size_and_shapes_are_documented(tmp_path, capsys):
    """The default is --size small: N=2, x (2, 64, 112, 112); --help says so, and says the shapes."""
    with pytest.raises(SystemExit):
        main_job.main(["--help"])
    text = capsys.readouterr().out
    for size, n in main_job.SIZES.items():
        assert f"x ({n}, 64, 112, 112)" in text and f"features ({16 * n}, 512)" in text, size
    assert "small  (default)" in text and "default: small" in text
    assert "realistic batch" not in text
    out = tmp_path / "m.json"
    assert main_job.main(["--backend", "numpy", "--reps", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["size"] == "small"
    assert {tuple(r["shape"]) for r in doc["rows"]} == {(2, 64, 112, 112), (32, 512),
                                                       (2, 16, 8, 28, 28), (2, 112, 112, 64)}


@pytest.mark.parametrize("reps", ["0", "-3", "two"])
def test_reps_must_be_at_least_one(reps, monkeypatch, capsys):
    monkeypatch.setattr(main_job, "run", lambda *a: pytest.fail("ran with a bad --reps"))
    with pytest.raises(SystemExit) as exc:
        main_job.main(["--backend", "numpy", "--reps", reps])
    assert exc.value.code == 2
    assert "argument --reps" in capsys.readouterr().err


def _bad_json_paths(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    return {"missing folder": (tmp_path / "missing" / "r.json", "does not exist"),
            "path is a folder": (tmp_path / "a_dir", "is a directory"),
            "parent is a file": (tmp_path / "a_file" / "r.json", "is not a folder")}


@pytest.mark.parametrize("which", ["missing folder", "path is a folder", "parent is a file"])
def test_json_path_is_checked_before_any_work(which, tmp_path, monkeypatch, capsys):
    path, why = _bad_json_paths(tmp_path)[which]
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(main_job, "run", lambda *a: pytest.fail("computed before checking --json"))
    monkeypatch.setattr(backend, "backend_info",
                        lambda: pytest.fail("probed backends before checking --json"))
    with pytest.raises(SystemExit) as exc:
        main_job.main(["--backend", "numpy", "--reps", "1", "--json", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --json" in err and why in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_json_path_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("permissions do not bind here (root)")
        monkeypatch.setattr(main_job, "run", lambda *a: pytest.fail("computed before checking"))
        with pytest.raises(SystemExit) as exc:
            main_job.main(["--backend", "numpy", "--json", str(folder / "r.json")])
        assert exc.value.code == 2 and "cannot write" in capsys.readouterr().err
    finally:
        folder.chmod(0o700)


def test_json_path_check_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    assert main_job._json_path_problem(str(tmp_path / "new.json")) is None
    assert not (tmp_path / "new.json").exists()
    (tmp_path / "old.json").write_text("keep")
    assert main_job._json_path_problem(str(tmp_path / "old.json")) is None
    assert (tmp_path / "old.json").read_text() == "keep"


def test_json_carries_version_commit_date_reps_and_is_strict(tmp_path, monkeypatch):
    out = tmp_path / "m.json"
    # a clock that saw nothing (0 ms -> infinite GB/s) and one that failed (NaN)
    times = iter([0.0, float("nan")] * 10)
    monkeypatch.setattr(main_job, "_time", lambda fn, xp, reps: next(times))
    assert main_job.main(["--backend", "numpy", "--reps", "3", "--json", str(out)]) == 0
    text = out.read_text()
    doc = _strict_json(text)
    assert doc["gpulayers"] == gpulayers.__version__
    assert doc["date"] == datetime.date.today().isoformat()
    assert doc["reps"] == 3 and doc["size"] == "small"
    assert doc["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", doc["commit"])
    assert doc["commit"] == provenance.package_commit()
    for r in doc["rows"]:
        assert r["forward_ms"] == 0.0 and r["forward_GBps"] is None  # inf -> null
        assert r["backward_ms"] is None and r["backward_GBps"] is None  # NaN -> null
        assert r["dtype"] == "float32"


def test_package_commit(tmp_path, monkeypatch):
    fake = tmp_path / "site" / "gpulayers" / "__init__.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    monkeypatch.setattr(provenance, "__file__", str(fake))
    monkeypatch.delenv("GPULAYERS_COMMIT", raising=False)
    assert provenance.package_commit() is None  # an installed copy: no git, no env
    monkeypatch.setenv("GPULAYERS_COMMIT", "abc123")
    assert provenance.package_commit() == "abc123"
    monkeypatch.undo()
    if os.path.exists(os.path.join(REPO, ".git")):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True)
        if head.returncode == 0:
            assert provenance.package_commit() == head.stdout.strip()


@pytest.mark.parametrize("what, layer", [
    ("max_unpool_backward", "max_unpool 2x2"),
    ("batchnorm_backward", "batchnorm (N, D) train"),
])
def test_backward_of_unpool_and_bn1d_are_checked(what, layer, monkeypatch, capsys):
    module = pooling if what.startswith("max_unpool") else main_job.batchnorm
    real = getattr(module, what)

    def wrong(*args):
        res = real(*args)
        return tuple(r * 0 + 1 for r in res) if isinstance(res, tuple) else res * 0 + 1
    monkeypatch.setattr(module, what, wrong)
    assert main_job.main(["--backend", "numpy", "--reps", "1"]) == 1
    bad = [ln for ln in capsys.readouterr().out.splitlines()
           if ln.startswith("numpy ") and ln.endswith("FAILED")]
    assert len(bad) == 1 and layer in bad[0], bad
