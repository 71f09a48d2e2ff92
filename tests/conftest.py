"""Shared fixtures: every op test runs over each available backend and both dtypes."""

from __future__ import annotations

import numpy as np
import pytest

import fastbp as fb
from fastbp.backends import resolve_backend

BACKENDS = fb.available_backends()
DTYPES = ["float32", "float64"]

# Relative tolerances per dtype (STYLE.md): float64 ~1e-10, float32 ~1e-5.
RTOL = {"float32": 1e-5, "float64": 1e-10}
ATOL = {"float32": 1e-6, "float64": 1e-12}


def assert_close(actual, expected, dtype="float64", rtol=None, atol=None, err_msg=""):
    """Compare a backend array (or number) with a reference, with per-dtype tolerances."""
    dtype = np.dtype(dtype).name
    if hasattr(actual, "get"):
        actual = actual.get()
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=RTOL[dtype] if rtol is None else rtol,
        atol=ATOL[dtype] if atol is None else atol,
        err_msg=err_msg,
    )


# cupy runs only where a CUDA device is usable; its cases carry the gpu marker (`pytest -m gpu`).
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.gpu) if b == "cupy" else b for b in BACKENDS]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    return resolve_backend(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def torch_or_skip():
    return pytest.importorskip("torch", reason="PyTorch is not installed: the autograd cross-check is skipped")
