"""Shared fixtures: every backend through one fixture, fresh random data per case.

The random data differ on every run; the run's seed is printed in pytest's
header, and ``GPULAYERS_TEST_SEED=<seed> pytest`` replays a run.
"""
import os
import secrets
import sys
import zlib

import numpy as np
import pytest

from gpulayers import backend

# the scripts' benchmark harness (scripts/harness.py) is not part of the package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))

SESSION_SEED = int(os.environ.get("GPULAYERS_TEST_SEED", secrets.randbits(32)))


def pytest_report_header(config):
    return f"gpulayers: GPULAYERS_TEST_SEED={SESSION_SEED}; backends {backend.available_backends()}" + (
        f"; cupy not usable: {backend.cupy_unusable_reason()}" if backend.cupy_unusable_reason() else "")


def _backend_params():
    params = [pytest.param("numpy", id="numpy")]
    reason = backend.cupy_unusable_reason()
    params.append(pytest.param("cupy", id="cupy", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(reason is not None, reason=f"CuPy not usable: {reason}")]))
    return params


@pytest.fixture(params=_backend_params())
def xp(request):
    """The array module of each usable backend (CuPy cases skip with the reason)."""
    return backend.backend_module(request.param)


@pytest.fixture
def rng(request):
    """A random generator per test: fresh data on every run, replayable from the seed."""
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


def make_input(kind, shape, dtype, rng):
    """Pooling test data of one kind: 'random', 'ties' (small integers), 'nan' (NaN and
    -inf sprinkled in) or '-inf' (mostly -inf), in ``dtype``."""
    x = rng.standard_normal(shape)
    if kind == "ties":
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
    elif kind == "nan":
        x[rng.random(shape) < 0.2] = np.nan
        x[rng.random(shape) < 0.2] = -np.inf
    elif kind == "-inf":
        x[rng.random(shape) < 0.7] = -np.inf
    return x.astype(dtype)
