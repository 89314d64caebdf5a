"""Numeric gradient helpers with CS231n's names, for NumPy and CuPy arrays.

Both compute on the host in float64: arrays from either backend are copied
to NumPy first, so a check never depends on device rounding.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_numpy

__all__ = ["rel_error", "eval_numerical_gradient_array"]


def rel_error(x, y):
    """Maximum relative error max(|x - y| / max(1e-8, |x| + |y|)), in float64.

    Inputs:
    - x, y: arrays of one shape (NumPy or CuPy) or scalars

    Returns:
    - error: float
    """
    a = to_numpy(x).astype(np.float64)
    b = to_numpy(y).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error needs arrays of one shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Centered-difference gradient of ``sum(f(x) * df)`` with respect to x.

    ``f`` is called with float64 arrays on x's backend; x itself is not modified.

    Inputs:
    - f: function taking an array shaped like x and returning an array
    - x: array, the point to differentiate at (NumPy or CuPy)
    - df: array shaped like f(x), the upstream gradient
    - h: step

    Returns:
    - grad: float64 NumPy array shaped like x
    """
    xp = get_array_module(x, df)
    base = to_numpy(x).astype(np.float64)
    dfh = to_numpy(df).astype(np.float64)
    grad = np.zeros_like(base)
    it = np.nditer(base, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        probe = base.copy()
        probe[idx] = base[idx] + h
        pos = to_numpy(f(xp.asarray(probe))).astype(np.float64)
        probe[idx] = base[idx] - h
        neg = to_numpy(f(xp.asarray(probe))).astype(np.float64)
        grad[idx] = np.sum((pos - neg) * dfh) / (2 * h)
    return grad
