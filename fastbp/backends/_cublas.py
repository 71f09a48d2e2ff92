"""A cuBLAS handle of fastbp's own, called through ctypes, for GEMMs inside a CUDA graph capture.

CuPy refuses every cuBLAS call during stream capture: its bindings set the handle's stream before each
call and raise when that stream is capturing ("calling cuBLAS API during stream capture is currently
unsupported", CuPy 14.2). cuBLAS itself supports capture once a handle has its stream and its workspace
set beforehand (the cuBLAS guide, "CUDA Graphs Support"), which is what this handle does: it calls the
library CuPy loaded (found in /proc/self/maps), with its stream and a workspace of its own set once.

Every product is one ``cublasGemmEx`` on row-major 2-d arrays (``gemm_args`` maps them to cuBLAS's
column-major view): float32 (TF32 tensor cores when the backend allows them), float64, and float16 or
bfloat16 accumulating in float32, as ``cupy.matmul`` computes them.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

#: cublasOperation_t
OP_N, OP_T = 0, 1
#: cudaDataType_t of each dtype cuBLAS multiplies here
_DATA_TYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}
#: cublasComputeType_t
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_GEMM_DEFAULT = -1  # cublasGemmAlgo_t: cuBLAS's heuristics


def gemm_args(a_shape: tuple[int, int], a_strides: tuple[int, int], b_shape: tuple[int, int],
              b_strides: tuple[int, int], c_strides: tuple[int, int]) -> tuple[int, ...]:
    """The column-major GEMM that computes the row-major product C = A @ B: (transa, transb, m, n, k, lda,
    ldb, ldc), with A and B swapped (cuBLAS's first operand is B): C^T = B^T A^T. Strides are in elements;
    each operand has one unit stride (C-contiguous rows, or a transposed view: F-contiguous); C must be
    C-contiguous rows."""
    (m, k), (k2, n) = a_shape, b_shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: {a_shape} @ {b_shape}")
    if c_strides[1] != 1 and n > 1:
        raise ValueError("C must have unit stride along its rows")

    def operand(shape: tuple[int, int], strides: tuple[int, int]) -> tuple[int, int]:
        # a row-major (r, c) array with unit column stride is, column-major, its transpose (c, r) with
        # leading dimension = its row stride: op N gives X^T; with unit row stride it is X itself: op T
        if strides[1] == 1 or shape[1] == 1:
            return OP_N, max(strides[0], shape[1], 1)
        if strides[0] == 1 or shape[0] == 1:
            return OP_T, max(strides[1], shape[0], 1)
        raise ValueError(f"an operand needs one unit stride, got strides {strides}")

    opb, ldb = operand(b_shape, b_strides)
    opa, lda = operand(a_shape, a_strides)
    return opb, opa, n, m, k, ldb, lda, max(c_strides[0], n, 1)


def colmajor_gemm(transa: int, transb: int, m: int, n: int, k: int, A: Any, lda: int, B: Any, ldb: int, C: Any,
                  ldc: int) -> None:
    """Reference BLAS semantics on flat NumPy buffers: C (m x n, column-major, ldc) = op(A) op(B), op(X) = X
    or X^T for a column-major X with leading dimension ld. What the emulated CuPy's handle runs, and what
    tests check ``gemm_args`` against."""

    def view(buf: Any, rows: int, cols: int, ld: int) -> Any:  # column-major (rows x cols)
        return np.lib.stride_tricks.as_strided(buf, (rows, cols), (buf.itemsize, ld * buf.itemsize))

    a = view(A, m, k, lda) if transa == OP_N else view(A, k, m, lda).T
    b = view(B, k, n, ldb) if transb == OP_N else view(B, n, k, ldb).T
    out = view(C, m, n, ldc)
    if np.dtype(C.dtype).itemsize == 2:  # 16 bits: accumulate in float32 and round once, as cuBLAS does
        out[...] = (a.astype(np.float32) @ b.astype(np.float32)).astype(C.dtype)
    else:
        out[...] = a @ b


def element_strides(x: Any) -> tuple[int, int]:
    """The strides of the 2-d array ``x``, in elements."""
    if x.ndim != 2:
        raise ValueError(f"cuBLAS products here take 2-d arrays, got {x.ndim}-d")
    rows, cols = x.strides
    return rows // x.itemsize, cols // x.itemsize


class CublasHandle:
    """A cuBLAS handle through ctypes, bound to ``stream`` with a workspace of its own (both set before any
    capture, as cuBLAS asks of graph capture). ``matmul`` is the backend's product on that stream."""

    def __init__(self, cupy: Any, stream: Any, workspace_bytes: int = 32 << 20) -> None:
        a = cupy.ones((4, 4), cupy.float32)
        (a @ a).sum().get()  # CuPy loads cuBLAS on its first product
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if line.split()[-1].rsplit("/", 1)[-1].startswith("libcublas.so")})
        if not paths:
            raise RuntimeError("libcublas is not mapped into this process after a CuPy product")
        self.path = paths[0]
        lib = self.lib = ctypes.CDLL(self.path)
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasDestroy_v2.argtypes = [vp]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        lib.cublasGemmEx.argtypes = [vp, c_int, c_int, c_int, c_int, c_int, vp, vp, c_int, c_int, vp, c_int, c_int,
                                     vp, vp, c_int, c_int, c_int, c_int]
        for fn in (lib.cublasCreate_v2, lib.cublasDestroy_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2,
                   lib.cublasGemmEx):
            fn.restype = c_int
        handle = vp()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.stream = stream
        self.workspace = cupy.empty(workspace_bytes, cupy.uint8)
        self._check(lib.cublasSetStream_v2(handle, vp(stream.ptr)), "cublasSetStream")
        self._check(lib.cublasSetWorkspace_v2(handle, vp(self.workspace.data.ptr), workspace_bytes),
                    "cublasSetWorkspace")
        # alpha = 1, beta = 0 in the compute type's precision (host memory, read at each call)
        self._scalars = {False: (ctypes.c_float(1.0), ctypes.c_float(0.0)),
                         True: (ctypes.c_double(1.0), ctypes.c_double(0.0))}

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            self.lib.cublasDestroy_v2(handle)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} returned cuBLAS status {status}")

    def matmul(self, A: Any, B: Any, out: Any, tf32: bool = False) -> Any:
        """out = A @ B for 2-d arrays of one dtype (each operand with one unit stride, ``out`` C-contiguous),
        on the handle's stream."""
        dtype = np.dtype(A.dtype)
        if B.dtype != dtype or out.dtype != dtype or dtype.name not in _DATA_TYPES:
            raise TypeError(f"cuBLAS products here take one dtype of {sorted(_DATA_TYPES)}, got {A.dtype} @ "
                            f"{B.dtype} -> {out.dtype}")
        opb, opa, n, m, k, ldb, lda, ldc = gemm_args(A.shape, element_strides(A), B.shape, element_strides(B),
                                                     element_strides(out))
        double = dtype == np.float64
        compute = _COMPUTE_64F if double else _COMPUTE_32F_FAST_TF32 if tf32 and dtype == np.float32 else _COMPUTE_32F
        one, zero = self._scalars[double]
        kind = _DATA_TYPES[dtype.name]
        vp = ctypes.c_void_p
        self._check(self.lib.cublasGemmEx(self.handle, opb, opa, n, m, k, ctypes.byref(one), vp(B.data.ptr), kind,
                                          ldb, vp(A.data.ptr), kind, lda, ctypes.byref(zero), vp(out.data.ptr), kind,
                                          ldc, compute, _GEMM_DEFAULT), "cublasGemmEx")
        return out
