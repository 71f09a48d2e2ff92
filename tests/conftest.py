"""Shared fixtures: every op test runs over each available backend, the emulated CuPy one, and both dtypes."""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastbp as fb
from fastbp.backends import resolve_backend
from fastbp.testing import cuda_emulator, fake_cupy

# The cupy backend's own code over the emulated CuPy (CUDA kernels run by fastbp's CPU emulator): never
# listed by available_backends(), so it joins the parametrization here. Where g++ >= 12 is missing it is
# skipped, unless FASTBP_REQUIRE_EMULATOR=1 (CI sets it), which makes that an error.
try:
    EMULATED = fake_cupy.register()
    EMULATOR_MISSING = ""
except cuda_emulator.EmulatorUnavailable as exc:
    if os.environ.get("FASTBP_REQUIRE_EMULATOR") == "1":
        raise RuntimeError(f"FASTBP_REQUIRE_EMULATOR=1 but the CUDA emulator cannot run here: {exc}") from exc
    EMULATED, EMULATOR_MISSING = fake_cupy.BACKEND_NAME, str(exc)

#: Every backend the parametrized tests run on: the available ones, then the emulated CuPy.
BACKENDS = fb.available_backends() + ([] if EMULATOR_MISSING else [EMULATED])

# On a GPU machine (benchmarks/gpu_check.sh) a GPU that CuPy cannot use must fail the run, not skip every
# GPU test quietly (a CuPy wheel newer than the driver, say).
if os.environ.get("FASTBP_REQUIRE_GPU") == "1" and "cupy" not in BACKENDS:
    raise RuntimeError(f"FASTBP_REQUIRE_GPU=1 but the cupy backend is unavailable: {fb.backend_status()['cupy']}")
DTYPES = ["float32", "float64"]

#: The cupy backend on a real CUDA device (marked gpu; skipped with the reason where none is usable) and
#: on the emulated CuPy (marked emulator).
GPU_PARAMS = [
    pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
        "cupy" not in fb.available_backends(), reason=f"cupy backend unavailable: {fb.backend_status()['cupy']}")]),
    pytest.param(EMULATED, marks=[pytest.mark.emulator, pytest.mark.skipif(
        bool(EMULATOR_MISSING), reason=f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")]),
]

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




def backend_param(name: str) -> object:
    """A pytest param for a backend name, with its marker: gpu for cupy (a CUDA device), emulator for the
    emulated CuPy (`pytest -m "not emulator"` leaves those out)."""
    if name == "cupy":
        return pytest.param(name, marks=pytest.mark.gpu)
    if name == EMULATED:
        return pytest.param(name, marks=pytest.mark.emulator)
    return name


BACKEND_PARAMS = [backend_param(b) for b in BACKENDS]
if EMULATOR_MISSING:
    BACKEND_PARAMS.append(pytest.param(EMULATED, marks=[pytest.mark.emulator, pytest.mark.skip(
        reason=f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")]))


@pytest.fixture(autouse=True)
def _restore_the_default_backend():
    """A test that sets the process-wide default backend leaves it as it found it, so which backend (and
    device) later tests use never depends on which tests ran before them."""
    import fastbp.backends as backends

    saved = backends._default
    yield
    backends._default = saved


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


def graph_probe():
    """benchmarks/gpu_graph_probe.py as a module (its GEMM mapping and stages are tested without a GPU)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_graph_probe.py"
    spec = importlib.util.spec_from_file_location("gpu_graph_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
