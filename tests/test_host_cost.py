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
