"""fastbp's ctypes calls into cuBLAS and cuBLASLt (fastbp/backends/_cublas.py), run on the CPU: a stand-in
library (tests/stubs/cublas_stub.cpp, built with g++) implements the functions fastbp calls, with their
C signatures, on host memory, which is what the emulated CuPy's device arrays are. This checks the Python
side of the calls (argument types and order, what is passed by reference, the descriptors' attributes
and sizes, the layouts, the algorithm handed back) and the whole epilogue path of the cupy backend
through it. What the real libraries do with those calls is for a GPU to show (gpu_check.sh)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import EMULATED, EMULATOR_MISSING

import fastbp as fb
from fastbp.backends import resolve_backend
from fastbp.backends._cublas import CublasHandle, CublasLtHandle, relu_mask_ld

pytestmark = [pytest.mark.emulator, pytest.mark.skipif(
    bool(EMULATOR_MISSING) or shutil.which("g++") is None,
    reason=f"needs g++ and the CUDA emulator: {EMULATOR_MISSING or 'no g++'}")]

STUB = Path(__file__).parent / "stubs" / "cublas_stub.cpp"


@pytest.fixture(scope="module")
def stub_libraries(tmp_path_factory):
    """The stand-in built as libcublas.so.13 and libcublasLt.so.13 and loaded, so that the handles find them
    among the process's mapped libraries, as they find CuPy's."""
    folder = tmp_path_factory.mktemp("cublas_stub")
    loaded = []
    for name in ("libcublas.so.13", "libcublasLt.so.13"):
        path = folder / name
        subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(path),
                        str(STUB)], check=True, capture_output=True, timeout=120)
        loaded.append(ctypes.CDLL(str(path)))
    return loaded


@pytest.fixture
def cp(stub_libraries):
    from fastbp.testing import fake_cupy

    return fake_cupy


def layouts(rng, m, k, n, dtype):
    """(A, B) as the step passes them: C-contiguous, or transposed views, each way."""
    def operand(rows, cols, transposed):
        return rng.standard_normal((cols, rows)).astype(dtype).T if transposed else \
            rng.standard_normal((rows, cols)).astype(dtype)

    return [(operand(m, k, ta), operand(k, n, tb)) for ta in (False, True) for tb in (False, True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_cublas_handle_computes_row_major_products(cp, dtype):
    stream = cp.cuda.Stream(non_blocking=True)
    handle = CublasHandle(cp, stream)
    assert handle.path.endswith("libcublas.so.13")
    rng = np.random.default_rng(0)
    for m, k, n in [(5, 3, 4), (1, 6, 2), (33, 17, 9)]:
        for a, b in layouts(rng, m, k, n, dtype):
            out = cp.empty((m, n), dtype)
            handle.matmul(device(cp, a), device(cp, b), out)
            tol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(out.get(), a @ b, rtol=tol, atol=tol)
    with pytest.raises(TypeError, match="one dtype"):
        handle.matmul(cp.zeros((2, 2), np.float32), cp.zeros((2, 2), np.float64), cp.zeros((2, 2), np.float32))


def device(cp, a):
    """``a`` on the emulated device, keeping its layout (a transposed view stays one)."""
    return cp.asarray(a) if a.flags.c_contiguous else cp.asarray(np.ascontiguousarray(a.T)).T


@pytest.mark.parametrize("epilogue", ["bias", "relu_aux_bias", "gelu_aux_bias", "bgrada"])
def test_the_cublaslt_handle_computes_what_the_emulated_stand_in_computes(cp, epilogue):
    """Each epilogue through ctypes (on the stand-in library) against the emulated CuPy's reference stand-in
    for the handle, on every operand layout: the result, the bias gradient and the GELU input; the ReLU
    bit-mask of each is read back by its own drelu_bgrad, which must give the same delta and bias gradient."""
    lt, ref = CublasLtHandle(cp), cp.fastbp_cublaslt()
    rng = np.random.default_rng(1)
    m, k, n = 12, 10, 16
    for a, b in layouts(rng, m, k, n, np.float32):
        got, want = {}, {}
        for name, handle in (("ctypes", lt), ("reference", ref)):
            A, B = device(cp, a), device(cp, b)
            out = cp.empty((m, n), np.float32)
            bias = np.random.default_rng(7).standard_normal(n).astype(np.float32)  # the same for both
            vector = cp.asarray(bias) if epilogue != "bgrada" else cp.zeros(n, np.float32)
            aux, ld = None, 0
            if epilogue == "relu_aux_bias":
                ld = relu_mask_ld(n)
                aux = cp.zeros(m * ld // 8, np.uint8)
            elif epilogue == "gelu_aux_bias":
                aux, ld = cp.empty((m, n), np.float32), n
            handle.matmul(A, B, out, epilogue, bias=vector, aux=aux, aux_ld=ld)
            result = {"out": out.get(), "bias": vector.get()}
            if epilogue == "gelu_aux_bias":
                result["aux"] = aux.get()
            if epilogue == "relu_aux_bias":  # the mask, through the backward epilogue that reads it
                delta, db = cp.empty((m, n), np.float32), cp.empty(n, np.float32)
                upstream = cp.asarray(np.linspace(-1, 1, m * 5, dtype=np.float32).reshape(m, 5))
                weights = cp.asarray(np.linspace(-2, 2, n * 5, dtype=np.float32).reshape(n, 5))
                handle.matmul(upstream, weights.T, delta, "drelu_bgrad", bias=db, aux=aux, aux_ld=ld)
                result.update(delta=delta.get(), db=db.get())
            (got if name == "ctypes" else want).update(result)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-6, err_msg=f"{epilogue} {key}")


def test_the_backend_trains_through_the_ctypes_cublaslt_handle(cp, monkeypatch):
    """The cupy backend on the emulated CuPy with its cuBLASLt stand-in taken away builds the ctypes handle
    (on the stand-in library): a training step through every epilogue it has equals the kernels' step."""
    bk = resolve_backend(EMULATED)
    monkeypatch.delattr(cp, "fastbp_cublaslt")
    bk._lt = None
    try:
        bk.set_epilogues("cublaslt")
        assert isinstance(bk._cublaslt(), CublasLtHandle)
        rng = np.random.default_rng(2)
        X, y = rng.standard_normal((40, 16)), rng.integers(0, 4, 40)
        results = {}
        for mode in ("cublaslt", "kernels"):
            bk.set_epilogues(mode)
            for activation in ("relu", "gelu"):
                model = fb.MLP([16, 24, 32, 4], activation=activation, seed=0, backend=bk)
                trainer = fb.Trainer(model, optimizer=fb.optim.SGD(0.1), batch_size=40)
                trainer.fit(X, y, epochs=3, verbose=0)
                results[mode, activation] = bk.to_numpy(model.flat_parameters())
        for activation in ("relu", "gelu"):
            np.testing.assert_allclose(results["cublaslt", activation], results["kernels", activation],
                                       rtol=1e-4, atol=1e-5)
    finally:
        bk.set_epilogues("kernels")
        bk._lt = None
