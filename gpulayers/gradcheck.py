"""Numeric gradient helpers with CS231n's names and contracts, for NumPy and CuPy arrays.

As in CS231n's ``gradient_check.py``, the evaluators perturb ``x`` **in place**, one
element at a time, call ``f(x)`` and restore the element exactly, so closures that
ignore their argument and read ``x`` from outside (the notebooks' spatial-BN cell:
``fx = lambda a: spatial_batchnorm_forward(x, gamma, beta, bn_param)[0]``) see every
perturbation. ``x`` holds its original values again when they return. Differences are
formed on the host in float64; for float32 or float16 ``x`` the step is rounded to x's
precision, so pass float64 arrays for tight checks (CS231n does).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_numpy
from .shapes import check_array

__all__ = ["rel_error", "eval_numerical_gradient", "eval_numerical_gradient_array"]


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


def _writable_point(x, name):
    """Check that x is an array that can be perturbed in place."""
    check_array(x, name)
    if np.dtype(x.dtype).kind != "f":
        raise TypeError(f"{name} must have a floating dtype to be perturbed, got {x.dtype}")
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        raise ValueError(f"{name} is read-only: the numeric gradient perturbs it in place "
                         "(pass a writable copy)")


def _perturbed(f, x, ix, h):
    """(f at x[ix] + h, f at x[ix] - h) as float64 host arrays; x[ix] restored exactly."""
    old = x[ix].copy() if hasattr(x[ix], "copy") else x[ix]
    try:
        x[ix] = old + h
        pos = np.array(to_numpy(f(x)), dtype=np.float64)
        x[ix] = old - h
        neg = np.array(to_numpy(f(x)), dtype=np.float64)
    finally:
        x[ix] = old
    return pos, neg


def eval_numerical_gradient(f, x, verbose=True, h=1e-5):
    """Centered-difference gradient of a scalar function ``f`` at ``x`` (CS231n's).

    ``x`` is perturbed in place and restored; ``f(x)`` must return a scalar.

    Inputs:
    - f: function of one argument returning a number
    - x: floating array (NumPy or CuPy), the point to differentiate at
    - verbose: print each index and its gradient, as CS231n does
    - h: step

    Returns:
    - grad: float64 NumPy array shaped like x
    """
    _writable_point(x, "x")
    grad = np.zeros(tuple(x.shape), dtype=np.float64)
    for ix in np.ndindex(*x.shape):
        pos, neg = _perturbed(f, x, ix, h)
        grad[ix] = (float(pos) - float(neg)) / (2 * h)
        if verbose:
            print(ix, grad[ix])
    return grad


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Centered-difference gradient of ``sum(f(x) * df)`` with respect to x (CS231n's).

    ``x`` is perturbed in place, one element at a time, and restored, so ``f`` may
    ignore its argument and read x itself; ``f``'s result is copied at once.

    Inputs:
    - f: function taking an array shaped like x and returning an array
    - x: floating array (NumPy or CuPy), the point to differentiate at
    - df: array shaped like f(x), the upstream gradient
    - h: step

    Returns:
    - grad: float64 NumPy array shaped like x
    """
    _writable_point(x, "x")
    get_array_module(x, df)  # TypeError when NumPy and CuPy are mixed
    dfh = np.array(to_numpy(df), dtype=np.float64)
    grad = np.zeros(tuple(x.shape), dtype=np.float64)
    for ix in np.ndindex(*x.shape):
        pos, neg = _perturbed(f, x, ix, h)
        grad[ix] = np.sum((pos - neg) * dfh) / (2 * h)
    return grad
