"""What this machine is: versions, the BLAS libraries and their kernels, threads, the GPU."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from .backends import backend_status
from .distributed import mpi_info

_PACKAGES = ("numpy", "scipy", "numba", "cupy-cuda12x", "cupy-cuda13x", "torch", "threadpoolctl", "tqdm")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The SIMD extensions that decide which BLAS kernel runs and how wide the JIT loops are.
_SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_simd() -> list[str]:
    """The SIMD extensions /proc/cpuinfo lists for this CPU (as a VM exposes them), [] where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in _SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return []


def blas_info() -> list[dict[str, Any]]:
    """The BLAS libraries loaded in this process, with kernel (architecture) and thread counts.

    Needs threadpoolctl; returns [] without it. numpy's (and, when numba is available, scipy's, which
    numba's matmul uses) libraries are loaded first so they are listed.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    import numpy  # noqa: F401

    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        pass
    keys = ("internal_api", "version", "architecture", "num_threads", "threading_layer", "filepath")
    return [{k: info.get(k) for k in keys} for info in threadpool_info()]


def numba_blas() -> str | None:
    """Which BLAS the numba backend's kernels call (``fastbp.backends._numba_blas``), when it is available."""
    if backend_status().get("numba") != "available":
        return None
    import numba

    from .backends import (
        _numba_blas,
        _numba_kernels,  # noqa: F401  (registers the route)
        numba_backend,
    )

    mode, layer = numba_backend.SPLIT, numba_backend._threading_layer()
    if _numba_blas.ROUTE != _numba_blas.ROUTE_NUMPY:
        split = "the whole step takes every batch whole (no thread control of this BLAS)"
    elif mode not in numba_backend.SPLIT_MODES:
        split = f"FASTBP_NUMBA_SPLIT={mode} is not 'auto', 'always' or 'never': training refuses it"
    elif mode == "never":
        split = "the whole step takes every batch whole (FASTBP_NUMBA_SPLIT=never)"
    elif mode == "auto" and layer != "omp":
        split = (f"the whole step takes every batch whole on Numba's {layer} threading layer "
                 f"(FASTBP_NUMBA_SPLIT=auto splits on GNU OpenMP's)")
    else:
        user = os.environ.get("OPENBLAS_THREAD_TIMEOUT") or os.environ.get("GOTO_THREAD_TIMEOUT")
        pool = _numba_blas.POOL or (f"OPENBLAS_THREAD_TIMEOUT={user} is kept" if user else
                                    f"the first split makes NumPy's OpenBLAS threads sleep after "
                                    f"2^{_numba_blas.SPIN_EXPONENT} cycles of waiting, not 2^28")
        split = (f"the whole step splits {'small batches' if mode == 'auto' else 'every batch'} over Numba's "
                 f"{numba.get_num_threads()} threads ({layer}, "
                 f"FASTBP_NUMBA_SPLIT={mode}); {pool}")
    return f"{_numba_blas.DESCRIPTION}; {split}"


def gpu_info() -> dict[str, Any] | None:
    """The first CUDA device's name, memory and driver, through CuPy; None when none is usable."""
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        free, total = cupy.cuda.runtime.memGetInfo()
        return {
            "name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "memory_total_gib": round(total / 2**30, 1),
            "memory_free_gib": round(free / 2**30, 1),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "driver": cupy.cuda.runtime.driverGetVersion(),
            "runtime": cupy.cuda.runtime.runtimeGetVersion(),
        }
    except Exception:
        return None


def torch_threads() -> int | None:
    """PyTorch's intra-op thread count, when torch is installed (importing it only then)."""
    if _version("torch") is None:
        return None
    try:
        import torch

        return int(torch.get_num_threads())
    except Exception:
        return None


def environment() -> dict[str, Any]:
    """Everything a benchmark figure needs beside it."""
    from . import __version__

    return {
        "fastbp": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_simd": cpu_simd(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "backends": backend_status(),
        "mixed_precision": mixed_precision(),
        "cuda_graphs": cuda_graphs(),
        "blas": blas_info(),
        "numba_blas": numba_blas(),
        "gpu": gpu_info(),
        "torch_threads": torch_threads(),
        "mpi": mpi_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                               "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_CACHE_DIR")},
    }


def mixed_precision() -> dict[str, list[str]]:
    """The 16-bit compute dtypes (``MLP(compute_dtype=...)``) of each available backend that has any."""
    from .backends import available_backends, resolve_backend
    from .dtypes import HALF_DTYPES

    out = {}
    for name in available_backends():
        halves = [d for d in getattr(resolve_backend(name), "compute_dtypes", ()) if d in HALF_DTYPES]
        if halves:
            out[name] = halves
    return out


def cuda_graphs() -> dict[str, str]:
    """Whether ``Trainer(cuda_graphs=True)`` can capture steps on each available GPU backend: 'available'
    (with fastbp's cuBLAS library), or why not. The cupy backend's answer makes its cuBLAS handle, so a
    library that cannot be found or called shows here; whether a given step captures, a fit's
    ``Trainer.graph_status`` says."""
    from .backends import available_backends, resolve_backend

    out = {}
    for name in available_backends():
        bk: Any = resolve_backend(name)
        if not hasattr(bk, "graph_stream"):  # a CPU backend
            continue
        reason = bk.graph_support()
        if reason is None:
            try:
                reason = f"available (cuBLAS: {bk.blas_handle(bk.graph_stream()).path})"
            except Exception as exc:  # no libcublas to call, a handle refused
                reason = f"unavailable: fastbp's cuBLAS handle: {type(exc).__name__}: {exc}"
        out[name] = reason
    return out


def format_environment(env: dict[str, Any]) -> str:
    simd = " ".join(env.get("cpu_simd") or []) or "unknown"
    lines = [
        f"fastbp {env['fastbp']}  python {env['python']}  {env['platform']}",
        f"cpu: {env['cpu']} ({env['cpu_count']} logical cores; SIMD: {simd})",
        "packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
        "backends:",
    ]
    mixed = env.get("mixed_precision") or {}
    lines += [f"  {name:6s} {why}" + (f" (mixed precision: {', '.join(mixed[name])})" if mixed.get(name) else "")
              for name, why in env["backends"].items()]
    if env["blas"]:
        lines.append("BLAS:")
        for b in env["blas"]:
            lines.append(f"  {b['internal_api']} {b['version']} kernel={b['architecture']} "
                         f"threads={b['num_threads']} ({os.path.basename(str(b['filepath']))})")
    else:
        lines.append("BLAS: unknown (pip install threadpoolctl to see the library and its kernel)")
    if env.get("numba_blas"):
        lines.append(f"numba kernels' BLAS: {env['numba_blas']}")
    if env.get("torch_threads") is not None:
        lines.append(f"torch threads: {env['torch_threads']}")
    if env.get("mpi"):
        lines.append(f"data-parallel: {env['mpi']}")
    graphs = env.get("cuda_graphs") or {}
    lines += [f"cuda graphs ({name}): {why}" for name, why in graphs.items()] or [
        "cuda graphs: no GPU backend available (Trainer(cuda_graphs=True) runs eager steps)"]
    gpu = env["gpu"]
    lines.append(f"gpu: {gpu['name']}, {gpu['memory_total_gib']} GiB, cc {gpu['compute_capability']}, "
                 f"driver {gpu['driver']}" if gpu else "gpu: none usable")
    set_vars = {k: v for k, v in env["env"].items() if v is not None}
    shown = ", ".join(f"{k}={v}" for k, v in set_vars.items()) or "no BLAS/thread variables set"
    lines.append(f"environment: {shown}")
    if env["env"].get("OPENBLAS_CORETYPE"):
        lines.append("warning: OPENBLAS_CORETYPE is set; it forces an older OpenBLAS kernel and slows BLAS. "
                     "Unset it (and OPENBLAS_L2_SIZE) for benchmarks.")
    return "\n".join(lines)
