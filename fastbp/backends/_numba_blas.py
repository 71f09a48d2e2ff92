"""The BLAS calls of the numba backend's kernels (GEMM, and the dot of the gradient's norm), through the
faster of the two BLAS libraries in the process.

NumPy and SciPy each bring their own OpenBLAS. Numba's ``np.dot`` calls SciPy's (through
``scipy.linalg.cython_blas``); NumPy's copy is often a newer release, and on the development machine it ran
the training step's products faster (``benchmarks/gemm_libraries.py``; the input-gradient product with its
transposed operand by 5-12%). NumPy >= 2 ships it as scipy-openblas64 with prefixed ILP64 CBLAS symbols
(``scipy_cblas_sgemm64_``): ``install`` registers their addresses with LLVM under fixed names, and the
kernels call them as external functions, so the compiled code, cached on disk, calls NumPy's BLAS by name in
every process.

The route is a kernel argument (``ROUTE_NUMPY`` or ``ROUTE_NUMBA``, Numba's ``np.dot``), not a global, so a
cached kernel never keeps a route from another process. Where NumPy's library or its symbols are not found
(another BLAS, such as Accelerate or MKL, or an older NumPy), the names point at a stub that is never called
and the backend keeps ``np.dot``. ``FASTBP_NUMBA_BLAS=scipy`` chooses ``np.dot`` (for comparisons).
"""

from __future__ import annotations

import ctypes
import glob
import os
from typing import Any

import numpy as np
from numba import njit, types

from ._numba_cache import install as _install_cache

_install_cache()  # before the decorators below: they choose their cache folder when they run

ROUTE_NUMBA, ROUTE_NUMPY = 0, 1
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

_i32, _i64, _ip = types.int32, types.int64, types.intp
_SGEMM = types.ExternalFunction("fastbp_numpy_sgemm", types.void(
    _i32, _i32, _i32, _i64, _i64, _i64, types.float32, _ip, _i64, _ip, _i64, types.float32, _ip, _i64))
_DGEMM = types.ExternalFunction("fastbp_numpy_dgemm", types.void(
    _i32, _i32, _i32, _i64, _i64, _i64, types.float64, _ip, _i64, _ip, _i64, types.float64, _ip, _i64))
_SDOT = types.ExternalFunction("fastbp_numpy_sdot", types.float32(_i64, _ip, _i64, _ip, _i64))
_DDOT = types.ExternalFunction("fastbp_numpy_ddot", types.float64(_i64, _ip, _i64, _ip, _i64))
_SET_THREADS = types.ExternalFunction("fastbp_numpy_set_num_threads", types.void(_i32))
_GET_THREADS = types.ExternalFunction("fastbp_numpy_get_num_threads", _i32())
#: NumPy's OpenBLAS symbols (prefixed ILP64: scipy_cblas_sgemm64_, scipy_openblas_set_num_threads64_, ...)
_ROUTINES = ("cblas_sgemm", "cblas_dgemm", "cblas_sdot", "cblas_ddot", "openblas_set_num_threads",
             "openblas_get_num_threads")

#: Where the GEMMs go: ROUTE_NUMPY when NumPy's CBLAS was found (and not declined), else ROUTE_NUMBA.
ROUTE = ROUTE_NUMBA
#: What ``install`` found, for ``fastbp info``: the library file and symbol, or why not.
DESCRIPTION = "not installed"
_keep: list[Any] = []  # ctypes objects whose addresses LLVM holds
_library: list[Any] = []  # NumPy's OpenBLAS (ctypes.CDLL), once ``install`` found its CBLAS

#: How long NumPy's OpenBLAS threads wait for work, spinning, before they sleep, once ``quiet_pool`` has
#: set it: 2^SPIN_EXPONENT timestamp-counter cycles (2^20, about 0.4 ms at 2.5 GHz). OpenBLAS's default,
#: 2^28, keeps them spinning about 0.1 s after each multi-threaded call.
SPIN_EXPONENT = 20
#: What ``quiet_pool`` did, for ``fastbp info``: "" until it ran, then what it found or set.
POOL = ""
_quiet: list[bool] = []  # [True] once the pool is quiet


def _numpy_openblas() -> str | None:
    """The path of NumPy's bundled OpenBLAS (numpy.libs next to the numpy package), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    found = sorted(glob.glob(os.path.join(root, "numpy.libs", "*openblas*")))
    return found[0] if found else None


def install() -> None:
    """Register NumPy's ILP64 CBLAS and thread-count symbols under fastbp's names (once), or stubs."""
    global ROUTE, DESCRIPTION
    if _keep:
        return
    import llvmlite.binding as ll

    functions: dict[str, Any] = {}
    path = _numpy_openblas()
    if path is not None:
        try:
            lib = ctypes.CDLL(path)
            for routine in _ROUTINES:
                functions[routine] = getattr(lib, f"scipy_{routine}64_")
            _library.append(lib)
        except (OSError, AttributeError) as exc:
            functions, DESCRIPTION = {}, f"NumPy's OpenBLAS has no ILP64 CBLAS ({exc}): Numba's np.dot"
    else:
        DESCRIPTION = "NumPy bundles no OpenBLAS here: Numba's np.dot (SciPy's BLAS)"
    if len(functions) == len(_ROUTINES) and os.environ.get("FASTBP_NUMBA_BLAS", "").lower() != "scipy":
        ROUTE = ROUTE_NUMPY
        DESCRIPTION = f"NumPy's OpenBLAS ({os.path.basename(path or '')}, scipy_cblas_*64_)"
    elif len(functions) == len(_ROUTINES):
        DESCRIPTION = "Numba's np.dot (SciPy's BLAS), chosen by FASTBP_NUMBA_BLAS=scipy"
    for routine in _ROUTINES:
        fn = functions.get(routine)
        if fn is None:  # never called (ROUTE is ROUTE_NUMBA): the name must resolve all the same
            fn = ctypes.CFUNCTYPE(None)(lambda: None)
        _keep.append(fn)
        ll.add_symbol(f"fastbp_numpy_{routine.replace('cblas_', '').replace('openblas_', '')}",
                      ctypes.cast(fn, ctypes.c_void_p).value)


def quiet_pool() -> bool:
    """Make NumPy's OpenBLAS threads sleep within about a millisecond of their last job, not 0.1 s, so
    that they leave the cores to Numba's threads when a step splits its batch. Once per process; returns
    whether the pool is quiet (or the user chose its timeout with OPENBLAS_THREAD_TIMEOUT).

    OpenBLAS's threads spin after every multi-threaded call (a validation pass, the user's own products):
    with 2^28 cycles of spinning, a 0.08 ms split step that ran in that window took up to 40 ms, and fit
    with validation each epoch took 6x longer split than whole. OpenBLAS reads its timeout only when it
    starts its threads, from OPENBLAS_THREAD_TIMEOUT: this stops the threads (blas_thread_shutdown_, as
    OpenBLAS does itself before a fork), rereads the environment with the variable set, restarts them and
    takes the variable back out of the environment (the library keeps its value, across forks too).
    Stopping the threads is only safe when no other thread can be inside NumPy's BLAS, so this declines
    (returns False) while other Python threads run (but those of ``QUIET_THREADS``, such as a Jupyter
    kernel's), and where NumPy's library is not OpenBLAS with these symbols."""
    global POOL
    if _quiet:
        return True
    for name in ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT"):
        if os.environ.get(name):
            POOL = f"the user's: {name}={os.environ[name]}"
            _quiet.append(True)
            return True
    install()
    if not _library:
        POOL = "not NumPy's OpenBLAS: left as it is"
        return False
    lib = _library[0]
    try:
        stop, read_env, start = lib.blas_thread_shutdown_, lib.openblas_read_env, lib.blas_thread_init
    except AttributeError as exc:
        POOL = f"NumPy's OpenBLAS cannot restart its threads ({exc}): left as it is"
        return False
    busy = _threads_that_may_use_blas()
    if busy:
        POOL = f"left spinning: other Python threads were running ({', '.join(busy[:3])})"
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(SPIN_EXPONENT)
    try:
        stop()
        read_env()
        start()
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]
    POOL = f"NumPy's OpenBLAS threads sleep after 2^{SPIN_EXPONENT} cycles of waiting (OpenBLAS: 2^28)"
    _quiet.append(True)
    return True


#: Where the code of threads that never call NumPy's BLAS lives (the class, or the target function, of a
#: ``threading.Thread``): a Jupyter kernel's own threads (heartbeat, control, output, shell channel, parent
#: poller, history; checked in an ipykernel 7 kernel) and tqdm's monitor. ``quiet_pool`` restarts
#: OpenBLAS's threads while they run, and only then.
QUIET_THREADS = ("ipykernel.heartbeat", "ipykernel.control", "ipykernel.iostream", "ipykernel.shellchannel",
                 "ipykernel.parentpoller", "IPython.core.history", "tqdm.")


def _threads_that_may_use_blas() -> list[str]:
    """The names of the other Python threads that might be inside NumPy's BLAS: all but this one and those
    of ``QUIET_THREADS``."""
    import threading

    me, names = threading.current_thread(), []
    for thread in threading.enumerate():
        target = getattr(thread, "_target", None)  # threading.Thread(target=...) keeps it while it runs
        where = getattr(target, "__module__", None) or type(thread).__module__ or ""
        if thread is not me and not where.startswith(QUIET_THREADS):
            names.append(thread.name)
    return names


@njit(cache=True)
def _layout(A):
    """(CBLAS transpose flag, leading dimension) of a 2-D array whose rows or columns are contiguous, or
    (0, 0) for any other layout."""
    isz = A.itemsize
    rows, cols = A.shape
    if (A.strides[1] == isz or cols == 1) and (A.strides[0] >= cols * isz or rows == 1):
        return _NO_TRANS, max(A.strides[0] // isz, cols, 1)
    if (A.strides[0] == isz or rows == 1) and (A.strides[1] >= rows * isz or cols == 1):
        return _TRANS, max(A.strides[1] // isz, rows, 1)
    return 0, 0


@njit(cache=True)
def gemm(A, B, C, route):
    """C = A @ B for float32 or float64 2-D arrays, C C-contiguous; through NumPy's BLAS when ``route`` is
    ROUTE_NUMPY and both operands have contiguous rows or columns (transposed views included), else
    through Numba's np.dot."""
    m, k = A.shape
    n = B.shape[1]
    ta, lda = _layout(A)
    tb, ldb = _layout(B)
    contiguous = C.strides[1] == C.itemsize and (C.strides[0] == n * C.itemsize or m == 1)
    if route != ROUTE_NUMPY or ta == 0 or tb == 0 or not contiguous or m == 0 or n == 0 or k == 0:
        np.dot(A, B, C)
        return
    if A.itemsize == 4:  # float32 (the arguments type alike for both, so both branches compile)
        _SGEMM(_ROW_MAJOR, ta, tb, m, n, k, np.float32(1), A.ctypes.data, lda, B.ctypes.data, ldb,
               np.float32(0), C.ctypes.data, n)
    else:
        _DGEMM(_ROW_MAJOR, ta, tb, m, n, k, 1.0, A.ctypes.data, lda, B.ctypes.data, ldb, 0.0, C.ctypes.data, n)


@njit(cache=True)
def sumsq(x, route):
    """sum(x^2) of a contiguous 1-D float32 or float64 vector through BLAS dot (NumPy's with ROUTE_NUMPY,
    so that one library's thread pool serves the whole step; else Numba's np.dot), as a float64."""
    if route != ROUTE_NUMPY or x.size == 0:
        return np.float64(np.dot(x, x))
    if x.itemsize == 4:
        return np.float64(_SDOT(x.size, x.ctypes.data, 1, x.ctypes.data, 1))
    return np.float64(_DDOT(x.size, x.ctypes.data, 1, x.ctypes.data, 1))


@njit(cache=True)
def blas_threads(n, route):
    """Set the thread count of the GEMMs' BLAS to ``n`` (NumPy's OpenBLAS, with ROUTE_NUMPY) and return the
    count it had; 0 (and nothing set) on the other route or for n <= 0. A global setting, as threadpoolctl's:
    the split step holds BLAS to one thread while its own threads run, and puts the count back."""
    if route != ROUTE_NUMPY or n <= 0:
        return 0
    before = _GET_THREADS()
    if before != n:
        _SET_THREADS(n)
    return before
