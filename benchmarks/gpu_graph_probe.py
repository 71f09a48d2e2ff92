"""Can fastbp's training step run as one CUDA graph here, and what would it save? A probe for the GPU check:

    python3 benchmarks/gpu_graph_probe.py [--config narrow] [--steps 50] [--json FILE]

CuPy refuses every cuBLAS call during stream capture: its bindings set the handle's stream before each
call and raise when that stream is capturing ("calling cuBLAS API during stream capture is currently
unsupported", CuPy 14.2 on the H200). cuBLAS itself supports capture once a handle has its stream and its
workspace set beforehand. This probe calls cuBLAS through ctypes on a handle of its own (the library CuPy
loaded, found in /proc/self/maps; its stream and a workspace set before capture), routes the cupy
backend's matmuls through it, and reports, each step on its own so that one failure does not hide the
rest:

1. whether that GEMM equals ``cupy.matmul`` on the config's products (with the step's operand layouts);
2. the internal training step (SGD, float32) through it, eagerly, against the step through CuPy;
3. whether that step can be captured as a graph, and the error where not;
4. whether replaying the graph ``--steps`` times gives the parameters that as many eager steps give;
5. the time per step: eager through CuPy, eager through the handle, and replayed.

It changes nothing in fastbp; it always exits 0 (the check's log is its result).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
import traceback
from typing import Any

#: cublasOperation_t
OP_N, OP_T = 0, 1


def gemm_args(a_shape: tuple[int, int], a_strides: tuple[int, int], b_shape: tuple[int, int],
              b_strides: tuple[int, int], c_strides: tuple[int, int]) -> tuple[int, ...]:
    """The column-major GEMM that computes the row-major product C = A @ B: (transa, transb, m, n, k, lda,
    ldb, ldc), with A and B swapped (cuBLAS's first operand is B): C^T = B^T A^T. Strides are in elements;
    each operand has one unit stride (C-contiguous rows, or a transposed view: F-contiguous); C must be
    C-contiguous rows."""
    (m, k), (k2, n) = a_shape, b_shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: {a_shape} @ {b_shape}")
    if c_strides[1] != 1:
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
    or X^T for a column-major X with leading dimension ld. For testing ``gemm_args`` without a GPU."""
    import numpy as np

    def view(buf: Any, rows: int, cols: int, ld: int) -> Any:  # column-major (rows x cols)
        return np.lib.stride_tricks.as_strided(buf, (rows, cols), (buf.itemsize, ld * buf.itemsize))

    a = view(A, m, k, lda) if transa == OP_N else view(A, k, m, lda).T
    b = view(B, k, n, ldb) if transb == OP_N else view(B, n, k, ldb).T
    view(C, m, n, ldc)[...] = a @ b


class CublasHandle:
    """A cuBLAS handle through ctypes, bound to ``stream`` with a workspace of its own (set before any capture,
    as cuBLAS asks of graph capture)."""

    def __init__(self, cupy: Any, stream: Any, workspace_bytes: int = 32 << 20) -> None:
        a = cupy.ones((4, 4), cupy.float32)
        (a @ a).sum().get()  # CuPy loads cuBLAS on its first product
        paths = sorted({line.split()[-1] for line in open("/proc/self/maps")
                        if line.split()[-1].rsplit("/", 1)[-1].startswith("libcublas.so")})
        if not paths:
            raise RuntimeError("libcublas is not mapped into this process after a CuPy product")
        self.path = paths[0]
        lib = self.lib = ctypes.CDLL(self.path)
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        lib.cublasSgemm_v2.argtypes = [vp, c_int, c_int, c_int, c_int, c_int, ctypes.POINTER(ctypes.c_float), vp,
                                       c_int, vp, c_int, ctypes.POINTER(ctypes.c_float), vp, c_int]
        for fn in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2, lib.cublasSgemm_v2):
            fn.restype = c_int
        handle = vp()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cupy.empty(workspace_bytes, cupy.uint8)
        self._check(lib.cublasSetStream_v2(handle, vp(stream.ptr)), "cublasSetStream")
        self._check(lib.cublasSetWorkspace_v2(handle, vp(self.workspace.data.ptr), workspace_bytes),
                    "cublasSetWorkspace")
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} returned cuBLAS status {status}")

    def matmul(self, cupy: Any, A: Any, B: Any, out: Any = None) -> Any:
        """out = A @ B for float32 2-d CuPy arrays (each with one unit stride), on the handle's stream."""
        if A.dtype != cupy.float32 or B.dtype != cupy.float32 or A.ndim != 2 or B.ndim != 2:
            return cupy.matmul(A, B, out=out)  # the probe's step is float32 2-d throughout
        if out is None:
            out = cupy.empty((A.shape[0], B.shape[1]), cupy.float32)
        item = A.itemsize
        opb, opa, n, m, k, ldb, lda, ldc = gemm_args(
            A.shape, tuple(s // item for s in A.strides), B.shape, tuple(s // item for s in B.strides),
            tuple(s // item for s in out.strides))
        vp = ctypes.c_void_p
        self._check(self.lib.cublasSgemm_v2(self.handle, opb, opa, n, m, k, ctypes.byref(self.one), vp(B.data.ptr),
                                            ldb, vp(A.data.ptr), lda, ctypes.byref(self.zero), vp(out.data.ptr),
                                            ldc), "cublasSgemm")
        return out


class _Through:
    """The cupy module, with ``matmul`` through a ``CublasHandle`` (the cupy backend's ops call xp.matmul)."""

    def __init__(self, cupy: Any, handle: CublasHandle) -> None:
        self._cupy, self._handle = cupy, handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cupy, name)

    def matmul(self, A: Any, B: Any, out: Any = None) -> Any:
        return self._handle.matmul(self._cupy, A, B, out)


def probe(sizes: list[int], batch: int, steps: int, cupy: Any = None, backend: str = "cupy",
          make_handle: Any = CublasHandle) -> dict[str, Any]:
    """The probe's stages on an MLP of ``sizes`` at ``batch`` rows; ``cupy``, ``backend`` and ``make_handle``
    (stream -> handle) let a test run it on the emulated CuPy with a handle of its own."""
    import numpy as np

    import fastbp as fb
    from fastbp.bench import gemm_list
    from fastbp.bench.candidates import gemm_operands

    if cupy is None:
        import cupy
    report: dict[str, Any] = {"sizes": sizes, "batch": batch, "steps": steps, "cupy": cupy.__version__}
    stream = cupy.cuda.Stream(non_blocking=True)
    handle = make_handle(cupy, stream)
    report["libcublas"] = handle.path

    def stage(name: str, fn: Any) -> Any:
        try:
            result = fn()
            report[name] = result if result is not None else "ok"
            print(f"{name}: {report[name]}")
            return result
        except Exception as exc:  # the probe reports what fails and goes on where it can
            report[name] = f"failed: {type(exc).__name__}: {exc}"
            print(f"{name}: {report[name]}")
            traceback.print_exc()
            return None

    def gemms() -> dict[str, float]:
        rng = np.random.default_rng(0)
        worst = {}
        with stream:
            for g in gemm_list(sizes, batch):
                a, b = gemm_operands(g, lambda s: cupy.asarray(rng.standard_normal(s), cupy.float32))
                mine = handle.matmul(cupy, a, b)
                want = cupy.matmul(a, b)
                key = f"{g['role']} {g['m']}x{g['k']}x{g['n']}"
                worst[key] = float(cupy.abs(mine - want).max() / max(float(cupy.abs(want).max()), 1e-30))
        stream.synchronize()
        return worst

    stage("1 ctypes GEMM vs cupy.matmul (max relative difference per product)", gemms)

    rng = np.random.default_rng(1)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch)
    model = fb.MLP(sizes, seed=0, backend=backend)
    bk = model.backend
    trainer = fb.Trainer(model, optimizer=fb.optim.SGD(lr=1e-3), batch_size=batch)
    Xd, yd = model.prepare_batch(X, y, "cross_entropy")
    start_params = model.flat_parameters().copy()

    def restart() -> None:
        model.flat_parameters()[...] = start_params
        stream.synchronize()

    def eager(n: int) -> None:
        for _ in range(n):
            trainer._step(Xd, yd)

    def timed(fn: Any, n: int) -> float:
        fn(2)
        stream.synchronize()
        t0 = time.perf_counter()
        fn(n)
        stream.synchronize()
        return (time.perf_counter() - t0) / n * 1e3

    times: dict[str, float] = {}
    with stream:
        times["eager through CuPy (ms)"] = timed(eager, steps)  # also makes the workspaces
        restart()
        eager(steps)
        stream.synchronize()
        through_cupy = model.flat_parameters().copy()
        plain_xp = bk.xp
        bk.xp = _Through(cupy, handle)
        try:
            def through() -> str:
                restart()
                eager(steps)
                stream.synchronize()
                diff = float(cupy.abs(model.flat_parameters() - through_cupy).max())
                return f"parameters after {steps} steps differ from CuPy's path by at most {diff:.3g}"

            stage("2 eager step through the handle", through)
            times["eager through the handle (ms)"] = timed(eager, steps)
            restart()
            eager(steps)
            stream.synchronize()
            want = model.flat_parameters().copy()
            restart()
            graph_box: list[Any] = []

            def capture() -> str:
                stream.begin_capture()
                try:
                    trainer._step(Xd, yd)
                except BaseException:  # report the step's error, not end_capture's on an invalidated capture
                    try:
                        stream.end_capture()
                    except Exception:
                        pass
                    raise
                graph_box.append(stream.end_capture())
                return "captured"

            stage("3 capture of the internal step", capture)
            if report["3 capture of the internal step"] == "captured":
                graph = graph_box[0]

                def replay() -> str:
                    restart()
                    for _ in range(steps):
                        graph.launch(stream)
                    stream.synchronize()
                    diff = float(cupy.abs(model.flat_parameters() - want).max())
                    return f"{steps} replays against {steps} eager steps: max difference {diff:.3g}"

                stage("4 replay", replay)
                times["replayed graph (ms)"] = timed(lambda n: [graph.launch(stream) for _ in range(n)], steps)
        finally:
            bk.xp = plain_xp
    report["5 time per step"] = times
    print("5 time per step:", json.dumps(times))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="narrow")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        print(f"no usable GPU through CuPy ({type(exc).__name__}: {exc}): nothing to probe")
        return 0
    from fastbp.bench import CONFIGS

    try:
        report = probe(CONFIGS[args.config]["sizes"], CONFIGS[args.config]["batch"], args.steps)
        report["config"] = args.config
    except Exception as exc:
        traceback.print_exc()
        report = {"failed": f"{type(exc).__name__}: {exc}"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
