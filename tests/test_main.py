"""The main job, python -m gpulayers: runs, checks, reports, and says why CuPy is unusable."""
import json

import pytest

from gpulayers import __main__ as main_job
from gpulayers import backend


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
    assert "not usable" in capsys.readouterr().err


def test_main_job_fails_when_a_check_fails(monkeypatch, capsys):
    monkeypatch.setattr(main_job, "_err", lambda a, ref: 1.0)
    assert main_job.main(["--backend", "numpy", "--size", "small", "--reps", "1"]) == 1
    assert "SOME CHECKS FAILED" in capsys.readouterr().out
