"""Which GEMM library is fastest on this machine for a training step's matrix products?

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gemm_libraries.py [--config small]

Times the step's GEMMs (``fastbp.bench.gemm_list``: forward X W, weight gradient A^T delta, input gradient
delta W^T, with those operand layouts) once per library, summed over the step. Libraries, where installed:

- ``numpy``: NumPy's OpenBLAS (``np.matmul`` from Python: the numpy backend's GEMM floor in
  ``fastbp bench``);
- ``scipy``: SciPy's OpenBLAS as the numba backend's kernels call it (Numba's ``np.dot``; the numba
  backend's floor calls it the same way, one product per call from Python);
- ``torch``: PyTorch's CPU matmul (``torch.mm`` with ``out``);
- ``blis``: BLIS through the ``blis`` package (``pip install blis``);
- ``mkl``: Intel MKL's ``cblas_sgemm``/``cblas_dgemm`` from the ``mkl`` package's ``libmkl_rt``
  (``pip install mkl``).

Each library runs in its own process, one after the other, for each of ``--rounds`` rounds: thread pools
of different libraries spin for a while after their work and would slow whichever ran next in the same
process. Reported: per library the median step total, its GEMM rate, and the median of the per-round
ratios to numpy; then per shape the medians in microseconds.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

LIBRARIES = ("numpy", "scipy", "torch", "blis", "mkl")


def _operands(g: dict[str, Any], dtype: Any, rng: np.random.Generator) -> tuple[Any, Any, Any]:
    """(A, B, out) for one of gemm_list's products, with the layouts the training step uses."""
    from fastbp.bench import gemm_operands

    A, B = gemm_operands(g, lambda shape: rng.standard_normal(shape).astype(dtype))
    return A, B, np.empty((g["m"], g["n"]), dtype)


def _mkl_library() -> str | None:
    for prefix in {sys.prefix, sys.base_prefix}:
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[0]
    return None


@functools.lru_cache(maxsize=1)
def _numba_dot() -> Any:
    """Numba's ``np.dot`` into ``out`` (SciPy's BLAS), compiled once per operand layout."""
    from numba import njit

    @njit(cache=False)
    def dot(a, b, c):
        np.dot(a, b, c)

    return dot


def _gemm_fn(lib: str, A: Any, B: Any, out: Any) -> Callable[[], Any]:
    """One call of ``out = A @ B`` through ``lib``; raises ImportError/OSError when it is not installed."""
    if lib == "numpy":
        return lambda: np.matmul(A, B, out=out)
    if lib == "scipy":
        dot = _numba_dot()
        dot(A, B, out)
        return lambda: dot(A, B, out)
    if lib == "torch":
        import torch

        ta, tb, tc = torch.from_numpy(A), torch.from_numpy(B), torch.from_numpy(out)
        return lambda: torch.mm(ta, tb, out=tc)
    if lib == "blis":
        import blis.py

        # blis.py.gemm takes C-contiguous operands and transposition flags.
        a, ta = (A.T, True) if not A.flags.c_contiguous else (A, False)
        b, tb = (B.T, True) if not B.flags.c_contiguous else (B, False)
        return lambda: blis.py.gemm(a, b, out=out, trans1=ta, trans2=tb, beta=0.0)
    if lib == "mkl":
        path = _mkl_library()
        if path is None:
            raise ImportError("no libmkl_rt in this environment (pip install mkl)")
        mkl = ctypes.CDLL(path)
        f = mkl.cblas_sgemm if A.dtype == np.float32 else mkl.cblas_dgemm
        real = ctypes.c_float if A.dtype == np.float32 else ctypes.c_double
        f.restype = None
        f.argtypes = [ctypes.c_int] * 6 + [real, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                           real, ctypes.c_void_p, ctypes.c_int]
        m, k = A.shape
        n = B.shape[1]
        ta = 112 if not A.flags.c_contiguous else 111  # CblasTrans / CblasNoTrans on the row-major data
        tb = 112 if not B.flags.c_contiguous else 111
        lda = m if ta == 112 else k
        ldb = k if tb == 112 else n
        args = (101, ta, tb, m, n, k, 1.0, A.ctypes.data, lda, B.ctypes.data, ldb, 0.0, out.ctypes.data, n)
        return lambda: f(*args)
    raise ValueError(f"unknown library {lib!r}")


def worker(lib: str, config: str, dtype: str, min_time: float) -> dict[str, Any]:
    """Time the step's GEMMs through ``lib`` in this process; returns per-shape medians (seconds)."""
    from fastbp.bench import CONFIGS, gemm_list

    sizes, batch = CONFIGS[config]["sizes"], CONFIGS[config]["batch"]
    rng = np.random.default_rng(0)
    times, checks = [], []
    for g in gemm_list(sizes, batch):
        A, B, out = _operands(g, np.dtype(dtype), rng)
        fn = _gemm_fn(lib, A, B, out)
        fn()
        checks.append((g, A, B, out.copy()))
        start = time.perf_counter()
        fn()
        inner = max(1, int(min_time / max(time.perf_counter() - start, 1e-7)))
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - start) / inner)
        times.append({**g, "s": statistics.median(samples)})
    # Checked after the timing: NumPy's BLAS threads would spin on after its products and slow the
    # library under test.
    for g, A, B, got in checks:
        ref = A @ B
        if not np.allclose(got, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max())):
            raise AssertionError(f"{lib} computed a wrong product for {g}")
    return {"lib": lib, "gemms": times, "blas": _blas_info()}


def _blas_info() -> list[str]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} {i.get('num_threads')} threads "
            f"({os.path.basename(i.get('filepath', ''))})" for i in threadpool_info()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", choices=("small", "mnist", "wide"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--lib", action="append", choices=LIBRARIES, help="library (repeatable); default: all installed")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.01, help="seconds per timed sample (default 0.01)")
    p.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.dtype, args.min_time)))
        return
    libs = args.lib or list(LIBRARIES)
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in list(runs):
            cmd = [sys.executable, __file__, "--worker", lib, "--config", args.config, "--dtype", args.dtype,
                   "--min-time", str(args.min_time)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{lib}: not timed ({last})")
                del runs[lib]
                continue
            runs[lib].append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not runs:
        return
    from fastbp.bench import CONFIGS, step_flops

    cfg = CONFIGS[args.config]
    flops = step_flops(cfg["sizes"], cfg["batch"])
    print(f"config {args.config}: sizes {cfg['sizes']}, batch {cfg['batch']}, {args.dtype}; {args.rounds} rounds, "
          f"one process per library and round")
    for lib, rs in runs.items():
        for line in rs[0]["blas"]:
            print(f"  {lib}: BLAS loaded: {line}")
    totals = {lib: [sum(g["s"] for g in r["gemms"]) for r in rs] for lib, rs in runs.items()}
    base = totals.get("numpy")
    for lib, t in totals.items():
        ratio = (f"  {statistics.median(a / b for a, b in zip(t, base)):.2f}x numpy's time"
                 if base is not None and lib != "numpy" else "")
        med = statistics.median(t)
        print(f"  {lib:6s} step GEMMs {med * 1e6:10.1f} us  {flops / med / 1e9:6.1f} GFLOP/s{ratio}")
    print("  per product, medians (us):")
    shapes = runs[next(iter(runs))][0]["gemms"]
    print("    " + f"{'role':12s} {'m x k x n':>16s}" + "".join(f"{lib:>10s}" for lib in runs))
    for i, g in enumerate(shapes):
        cells = "".join(f"{statistics.median(r['gemms'][i]['s'] for r in rs) * 1e6:10.1f}" for rs in runs.values())
        print(f"    {g['role']:12s} {g['m']:>4d}x{g['k']:>5d}x{g['n']:>5d}{cells}")


if __name__ == "__main__":
    main()
