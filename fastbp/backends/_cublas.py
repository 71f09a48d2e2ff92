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


def product_dtype(A: Any, B: Any, out: Any, library: str) -> np.dtype:
    """The one dtype of a product's operands and result, which ``library`` multiplies here; TypeError
    otherwise. (The emulated CuPy's stand-ins check alike.)"""
    dtype = np.dtype(A.dtype)
    if B.dtype != dtype or out.dtype != dtype or dtype.name not in _DATA_TYPES:
        raise TypeError(f"{library} products here take one dtype of {sorted(_DATA_TYPES)}, got {A.dtype} @ "
                        f"{B.dtype} -> {out.dtype}")
    return dtype


def _compute_type(dtype: np.dtype, tf32: bool) -> int:
    """cublasComputeType_t of a product in ``dtype``: float64 in double, float32 on TF32 tensor cores when
    allowed, the rest (16-bit operands too) accumulating in float32."""
    if dtype == np.float64:
        return _COMPUTE_64F
    return _COMPUTE_32F_FAST_TF32 if tf32 and dtype == np.float32 else _COMPUTE_32F


def element_strides(x: Any) -> tuple[int, int]:
    """The strides of the 2-d array ``x``, in elements."""
    if x.ndim != 2:
        raise ValueError(f"cuBLAS products here take 2-d arrays, got {x.ndim}-d")
    rows, cols = x.strides
    return rows // x.itemsize, cols // x.itemsize


_VP, _INT, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t


class _Library:
    """What fastbp's two handles share: the library CuPy loaded (``prefix``: its file name's start, found in
    /proc/self/maps once CuPy has run a product, which loads cuBLAS and with it cuBLASLt), its functions'
    ctypes signatures, a handle made by ``create`` and freed by ``destroy``, a workspace of the handle's
    own, and the GEMM's alpha = 1, beta = 0 per precision (host memory, read at each call)."""

    def __init__(self, cupy: Any, prefix: str, create: str, destroy: str, signatures: dict[str, list[Any]],
                 workspace_bytes: int) -> None:
        a = cupy.ones((4, 4), cupy.float32)
        (a @ a).sum().get()
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if line.split()[-1].rsplit("/", 1)[-1].startswith(prefix + ".so")})
        if not paths:
            raise RuntimeError(f"{prefix} is not mapped into this process after a CuPy product")
        self.path = paths[0]
        lib = self.lib = ctypes.CDLL(self.path)
        for name, argtypes in {create: [ctypes.POINTER(_VP)], destroy: [_VP], **signatures}.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, _INT
        handle = _VP()
        self._check(getattr(lib, create)(ctypes.byref(handle)), create)
        self.handle, self._destroy = handle, getattr(lib, destroy)
        self.workspace = cupy.empty(workspace_bytes, cupy.uint8)
        self.workspace_bytes = workspace_bytes
        self._scalars = {False: (ctypes.c_float(1.0), ctypes.c_float(0.0)),
                         True: (ctypes.c_double(1.0), ctypes.c_double(0.0))}

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            self._destroy(handle)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} returned cuBLAS status {status}")


class CublasHandle(_Library):
    """A cuBLAS handle through ctypes, bound to ``stream`` with a workspace of its own (both set before any
    capture, as cuBLAS asks of graph capture). ``matmul`` is the backend's product on that stream."""

    def __init__(self, cupy: Any, stream: Any, workspace_bytes: int = 32 << 20) -> None:
        gemm = [_VP, _INT, _INT, _INT, _INT, _INT, _VP, _VP, _INT, _INT, _VP, _INT, _INT, _VP, _VP, _INT, _INT, _INT,
                _INT]
        super().__init__(cupy, "libcublas", "cublasCreate_v2", "cublasDestroy_v2",
                         {"cublasSetStream_v2": [_VP, _VP], "cublasSetWorkspace_v2": [_VP, _VP, _SIZE],
                          "cublasGemmEx": gemm}, workspace_bytes)
        self.stream = stream
        self._check(self.lib.cublasSetStream_v2(self.handle, _VP(stream.ptr)), "cublasSetStream")
        self._check(self.lib.cublasSetWorkspace_v2(self.handle, _VP(self.workspace.data.ptr), workspace_bytes),
                    "cublasSetWorkspace")

    def matmul(self, A: Any, B: Any, out: Any, tf32: bool = False) -> Any:
        """out = A @ B for 2-d arrays of one dtype (each operand with one unit stride, ``out`` C-contiguous),
        on the handle's stream."""
        dtype = product_dtype(A, B, out, "cuBLAS")
        opb, opa, n, m, k, ldb, lda, ldc = gemm_args(A.shape, element_strides(A), B.shape, element_strides(B),
                                                     element_strides(out))
        compute = _compute_type(dtype, tf32)
        one, zero = self._scalars[dtype == np.float64]
        kind = _DATA_TYPES[dtype.name]
        vp = ctypes.c_void_p
        self._check(self.lib.cublasGemmEx(self.handle, opb, opa, n, m, k, ctypes.byref(one), vp(B.data.ptr), kind,
                                          ldb, vp(A.data.ptr), kind, lda, ctypes.byref(zero), vp(out.data.ptr), kind,
                                          ldc, compute, _GEMM_DEFAULT), "cublasGemmEx")
        return out


#: cublasLtEpilogue_t of the fused epilogues fastbp uses (cublasLt.h)
EPILOGUES = {"bias": 4, "relu_aux_bias": 134, "gelu_aux_bias": 164, "drelu_bgrad": 152, "dgelu_bgrad": 208,
             "bgrada": 256}
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_PREF_MAX_WORKSPACE_BYTES = 1


def relu_mask_ld(rows: int) -> int:
    """The leading dimension, in bits, of cuBLASLt's ReLU bit-mask for a result of ``rows`` (column-major)
    rows: a multiple of 128 (cublasLt.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD)."""
    return -(-rows // 128) * 128


class Unsupported(Exception):
    """cuBLASLt has no algorithm for this product and epilogue, or its operands' layout cannot be mapped:
    the caller runs the GEMM and fastbp's kernels instead."""


def lt_dims(A: Any, B: Any, out: Any) -> tuple[int, ...]:
    """``gemm_args`` of out = A @ B, in cuBLASLt's order (its A is the row-major B): (opa, opb, m, n, k, lda,
    ldb, ldd); Unsupported where an operand has no unit stride."""
    try:
        return gemm_args(A.shape, element_strides(A), B.shape, element_strides(B), element_strides(out))
    except ValueError as exc:
        raise Unsupported(str(exc)) from exc


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtHandle(_Library):
    """cuBLASLt through ctypes, for GEMMs with a fused epilogue (the library that cuBLAS itself loads, found
    in /proc/self/maps), on CuPy's current stream, with a workspace of its own. ``matmul`` takes the row-major product
    and maps it as ``gemm_args`` does: the column-major result D (m x n) is the row-major one's transpose,
    so D's rows are the row-major columns: a bias (and a bias gradient) is one value per row-major column,
    and an auxiliary matrix (the GELU input, or the ReLU bit-mask) is laid out as the row-major result is,
    with leading dimension ``aux_ld``. Plans (descriptors, layouts and the heuristic's algorithm) are kept
    per shape, strides, dtype and epilogue."""

    def __init__(self, cupy: Any, workspace_bytes: int = 32 << 20) -> None:
        u64, i64 = ctypes.c_uint64, ctypes.c_int64
        super().__init__(cupy, "libcublasLt", "cublasLtCreate", "cublasLtDestroy", {
            "cublasLtMatmulDescCreate": [ctypes.POINTER(_VP), _INT, _INT],
            "cublasLtMatmulDescSetAttribute": [_VP, _INT, _VP, _SIZE],
            "cublasLtMatrixLayoutCreate": [ctypes.POINTER(_VP), _INT, u64, u64, i64],
            "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(_VP)],
            "cublasLtMatmulPreferenceSetAttribute": [_VP, _INT, _VP, _SIZE],
            "cublasLtMatmulAlgoGetHeuristic": [_VP, _VP, _VP, _VP, _VP, _VP, _VP, _INT,
                                               ctypes.POINTER(_HeuristicResult), ctypes.POINTER(_INT)],
            "cublasLtMatmul": [_VP] * 14 + [_SIZE, _VP],
        }, workspace_bytes)
        self._current_stream = cupy.cuda.get_current_stream
        self._plans: dict[tuple, tuple[Any, ...] | None] = {}  # None: cuBLASLt has no algorithm for it

    def _set(self, desc: Any, attr: int, value: Any) -> None:
        self._check(self.lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
                    "cublasLtMatmulDescSetAttribute")

    def _plan(self, key: tuple, dims: tuple[int, ...], kind: int, compute: int, epilogue: int, aux_ld: int,
              pointers: tuple[int, int]) -> tuple[Any, ...]:
        """(desc, A layout, B layout, D layout, algo) for one product, made once per key."""
        if key in self._plans:
            plan = self._plans[key]
            if plan is None:
                raise Unsupported(f"cuBLASLt has no algorithm for epilogue {epilogue} on {dims}")
            return plan
        lib, vp = self.lib, ctypes.c_void_p
        opa, opb, m, n, k, lda, ldb, ldd = dims
        double = compute == _COMPUTE_64F
        desc = vp()
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), compute, 1 if double else 0),
                    "cublasLtMatmulDescCreate")
        self._set(desc, _DESC_TRANSA, ctypes.c_int32(opa))
        self._set(desc, _DESC_TRANSB, ctypes.c_int32(opb))
        self._set(desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        # the heuristic looks at the pointers' alignment: set them (each call sets them again)
        self._set(desc, _DESC_BIAS_POINTER, vp(pointers[0]))
        if aux_ld:
            self._set(desc, _DESC_AUX_POINTER, vp(pointers[1]))
            self._set(desc, _DESC_AUX_LD, ctypes.c_int64(aux_ld))
        layouts = []
        for rows, cols, ld in ((m, k, lda) if opa == OP_N else (k, m, lda), (k, n, ldb) if opb == OP_N else (n, k, ldb),
                               (m, n, ldd)):
            layout = vp()
            self._check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), kind, rows, cols, ld),
                        "cublasLtMatrixLayoutCreate")
            layouts.append(layout)
        pref = vp()
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        limit = ctypes.c_uint64(self.workspace_bytes)
        status = lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(limit),
                                                          ctypes.sizeof(limit))
        self._check(status, "cublasLtMatmulPreferenceSetAttribute")
        result, count = _HeuristicResult(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, layouts[0], layouts[1], layouts[2], layouts[2],
                                                    pref, 1, ctypes.byref(result), ctypes.byref(count))
        if status != 0:  # NOT_SUPPORTED (15), or an invalid combination of types and epilogue (7)
            count.value = 0
        if count.value < 1:
            self._plans[key] = None  # asked once: later calls fall back at once
            raise Unsupported(f"cuBLASLt has no algorithm for epilogue {epilogue} on {dims}")
        plan = self._plans[key] = (desc, layouts[0], layouts[1], layouts[2], result)
        return plan

    def matmul(self, A: Any, B: Any, out: Any, epilogue: str, bias: Any = None, aux: Any = None, aux_ld: int = 0,
               tf32: bool = False) -> Any:
        """out = epilogue(A @ B) for row-major 2-d arrays of one dtype. ``bias``: the bias read ('bias',
        'relu_aux_bias', 'gelu_aux_bias') or the bias gradient written ('drelu_bgrad', 'dgelu_bgrad',
        'bgrada': the column sums of the result, or of B for 'bgrada'), one value per column of ``out``;
        ``aux`` with ``aux_ld``: the ReLU bit-mask or the GELU input, written by the forward epilogues and
        read by the backward ones. Unsupported (nothing computed) where cuBLASLt has no algorithm for it."""
        dtype = product_dtype(A, B, out, "cuBLASLt")
        dims = lt_dims(A, B, out)
        compute = _compute_type(dtype, tf32)
        code = EPILOGUES[epilogue]
        bias_ptr = bias.data.ptr if bias is not None else 0
        aux_ptr = aux.data.ptr if aux is not None else 0
        key = (dims, dtype.name, compute, code, aux_ld, bias_ptr % 16, aux_ptr % 16)
        desc, a_layout, b_layout, d_layout, result = self._plan(key, dims, _DATA_TYPES[dtype.name], compute, code,
                                                                aux_ld, (bias_ptr, aux_ptr))
        vp = ctypes.c_void_p
        self._set(desc, _DESC_BIAS_POINTER, vp(bias_ptr))
        if aux_ld:
            self._set(desc, _DESC_AUX_POINTER, vp(aux_ptr))
        one, zero = self._scalars[dtype == np.float64]
        self._check(self.lib.cublasLtMatmul(self.handle, desc, ctypes.byref(one), vp(B.data.ptr), a_layout,
                                            vp(A.data.ptr), b_layout, ctypes.byref(zero), vp(out.data.ptr), d_layout,
                                            vp(out.data.ptr), d_layout, ctypes.byref(result.algo),
                                            vp(self.workspace.data.ptr), self.workspace_bytes,
                                            vp(self._current_stream().ptr)),
                    "cublasLtMatmul")
        return out
