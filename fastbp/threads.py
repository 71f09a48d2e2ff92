"""CPU thread control: one call for every BLAS library in the process (NumPy's OpenBLAS, and SciPy's,
which Numba's matmul calls) and Numba's own pool, through threadpoolctl."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ._checks import check_positive_int


def _threadpoolctl() -> Any:
    try:
        import threadpoolctl
    except ImportError as exc:
        raise RuntimeError("thread control needs threadpoolctl: pip install 'fastbp[numba]' or threadpoolctl") from exc
    return threadpoolctl


def get_num_threads() -> dict[str, int]:
    """Thread counts per library: each loaded BLAS (by file name) and 'numba' when it is installed."""
    counts = {}
    tc = _threadpoolctl()
    _load_blas_libraries()
    for info in tc.threadpool_info():
        if info.get("user_api") == "blas":
            counts[info["filepath"].rsplit("/", 1)[-1]] = info["num_threads"]
    try:
        import numba

        counts["numba"] = numba.get_num_threads()
    except ImportError:
        pass
    return counts


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in every BLAS library of the process and in Numba's pool, from now on.

    fastbp's Numba kernels run their fused passes on the calling thread and leave the cores to BLAS, or
    (the split step, for small products) run parts of the batch on Numba's threads with BLAS on one; one
    pool works at a time, and this sets how many cores it uses (with one, the step never splits).
    """
    n = check_positive_int(n, "n")
    tc = _threadpoolctl()
    _load_blas_libraries()
    tc.threadpool_limits(limits=n, user_api="blas")
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    except ImportError:
        pass


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """``n`` threads in every BLAS library and in Numba inside the block; restored on exit."""
    n = check_positive_int(n, "n")
    tc = _threadpoolctl()
    _load_blas_libraries()
    with tc.threadpool_limits(limits=n, user_api="blas"):
        try:
            import numba
        except ImportError:
            yield
            return
        before = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        try:
            yield
        finally:
            numba.set_num_threads(before)


def _load_blas_libraries() -> None:
    """Load SciPy's BLAS (Numba's matmul uses it) so the limits reach it too."""
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        pass
