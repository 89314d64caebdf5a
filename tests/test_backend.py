"""Backend selection: works without CuPy, says why CuPy is unusable."""
import subprocess
import sys

import numpy as np
import pytest

import gpulayers as G
from gpulayers import backend


def test_numpy_always_available():
    assert G.available_backends()[0] == "numpy"
    info = G.backend_info()
    assert info["numpy"] == np.__version__
    if "cupy" not in G.available_backends():
        assert info["cupy_unusable_reason"]
    else:
        assert info["devices"]


def test_set_and_use_backend():
    before = G.get_backend()
    with G.use_backend("numpy"):
        assert G.get_backend() == "numpy"
        assert isinstance(G.asarray([1.0, 2.0]), np.ndarray)
    assert G.get_backend() == before
    G.set_backend("numpy")
    assert G.get_backend() == "numpy"


def test_unknown_or_unusable_backend_raises_with_reason():
    with pytest.raises(ValueError, match="usable backends: \\['numpy'"):
        G.set_backend("tensorflow")
    if "cupy" not in G.available_backends():
        with pytest.raises(ValueError, match="cupy is not usable"):
            G.set_backend("cupy")


def test_env_variable_sets_default():
    code = "import gpulayers; print(gpulayers.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"GPULAYERS_BACKEND": "numpy", "PATH": ""}, check=True)
    assert out.stdout.strip() == "numpy"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"GPULAYERS_BACKEND": "opencl", "PATH": ""})
    assert bad.returncode != 0 and "unknown backend 'opencl'" in bad.stderr


def test_import_needs_no_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import gpulayers, numpy as np\n"
            "print(gpulayers.available_backends(), gpulayers.backend_info()['cupy_unusable_reason'])\n"
            "out, c = gpulayers.max_pool_forward(np.ones((1, 1, 2, 2)), {'pool_height': 2, 'pool_width': 2})\n"
            "print(out.ravel())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "['numpy'] cupy does not import" in out.stdout


def test_get_array_module_and_conversions(xp):
    a = xp.ones(3)
    assert backend.get_array_module(a, None) is xp
    assert isinstance(G.to_numpy(a), np.ndarray)


def test_mixing_backends_raises_type_error(monkeypatch):
    if "cupy" not in G.available_backends():
        class FakeCupy:  # stands in for a cupy.ndarray
            shape, dtype = (3,), np.float64
        monkeypatch.setattr(backend, "_cupy_ndarray", lambda: FakeCupy)
        with pytest.raises(TypeError, match="numpy ndarray and a cupy FakeCupy"):
            backend.get_array_module(np.ones(3), FakeCupy())
    else:
        import cupy
        with pytest.raises(TypeError, match="different backends"):
            G.max_pool_backward(cupy.ones((1, 1, 1, 1)),
                                G.max_pool_forward(np.ones((1, 1, 2, 2)), {"pool_height": 2, "pool_width": 2})[1])
