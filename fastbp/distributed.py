"""Data-parallel training over MPI (mpi4py) and NCCL (CuPy): communicators, the batch arithmetic, faults.

N processes with a global batch B train as one process with batch B. Every rank draws the same seeded
order of rows, takes its contiguous slice of each global batch (rows [B*r//N, B*(r+1)//N)), computes the
mean gradient of its rows scaled by rows_r / rows_global, and one allreduce (sum) of the model's flat
gradient, with the loss, correct count, row count and stop flag in four slots behind it, gives every rank
the global batch's mean gradient and metrics. An empty slice contributes zeros: no padding, no duplicated
rows. Every decision (the non-finite check, clipping, early stopping, schedules, a stop on Ctrl-C or
SIGTERM) is taken from reduced values, so every rank takes the same branch.

``init()`` builds the communicator for a job launched by ``mpiexec``; ``Trainer(..., comm=...)`` uses it.
A communicator of size 1 (``LocalCommunicator``, what every run without one uses) changes nothing.

No hang, ever: an exception on one rank aborts the whole job with a message naming the rank and the step
(``abort_on_error``), and a watchdog aborts a collective that has not completed after
``FASTBP_DIST_TIMEOUT`` seconds (default 600).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["Communicator", "LocalCommunicator", "MPICommunicator", "NCCLCommunicator", "init", "shard",
           "DistributedUnavailable", "mpi_info"]

#: Seconds a collective may take before the watchdog aborts the job (``FASTBP_DIST_TIMEOUT``).
DEFAULT_TIMEOUT = 600.0
#: The slots after the gradient in the step's allreduce: loss x rows, correct count, rows, stop flag.
TAIL = 4
INSTALL_HINT = ("pip install 'fastbp[mpi]' (mpi4py and the MPICH runtime from PyPI), or mpi4py built "
                "against your cluster's MPI (see the README, Data-parallel training)")


class DistributedUnavailable(RuntimeError):
    """mpi4py, an MPI library or NCCL is missing or unusable; the message says what to install."""


def shard(total: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of ``total`` that ``rank`` of ``size`` takes: [total*r//N, total*(r+1)//N).
    Every row belongs to exactly one rank; a rank may get none (total < size)."""
    return total * rank // size, total * (rank + 1) // size


def timeout_seconds() -> float:
    """The watchdog's limit from ``FASTBP_DIST_TIMEOUT`` (seconds > 0), else DEFAULT_TIMEOUT."""
    raw = os.environ.get("FASTBP_DIST_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"FASTBP_DIST_TIMEOUT must be a number of seconds > 0, got {raw!r}")
    return value


# ----------------------------------------------------------------------------------------- communicators
class Communicator:
    """What data-parallel training needs of a communication library: ``rank``, ``size``, ``local_rank`` and
    ``local_size`` (this process's rank among those of its machine, which picks the GPU, and how many they
    are), in-place ``allreduce`` (sum) and ``broadcast`` of a backend array, ``allgather`` of a few bytes,
    ``barrier`` and ``abort``."""

    name = "local"
    rank = 0
    size = 1
    local_rank = 0
    local_size = 1

    def allreduce(self, x: Any) -> None:
        """x = the sum of every rank's x, in place (a NumPy or CuPy array)."""

    def allreduce_host(self, x: np.ndarray) -> None:
        """``allreduce`` of a small host NumPy array (metrics)."""

    def broadcast(self, x: Any, root: int = 0) -> None:
        """x = root's x on every rank, in place."""

    def allgather(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order."""
        return [data]

    def barrier(self) -> None:
        """Return when every rank has called it."""

    def abort(self, code: int = 1) -> None:
        """End every process of the job now."""
        os._exit(code)

    def watch(self, what: str) -> contextlib.AbstractContextManager[Any]:
        """A context around one collective that the watchdog ends the job from if it never completes."""
        return contextlib.nullcontext()


class LocalCommunicator(Communicator):
    """The communicator of one process alone: every collective is a no-op."""


class _Watchdog:
    """Aborts the job when one collective has run longer than ``timeout`` seconds: a rank that stalled or
    died without taking the job down would otherwise leave the others waiting forever."""

    def __init__(self, comm: Communicator, timeout: float) -> None:
        self.comm = comm
        self.timeout = timeout
        self._what: str | None = None
        self._since = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, what: str) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fastbp-dist-watchdog", daemon=True)
            self._thread.start()
        with self._lock:
            self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._what = None

    def _run(self) -> None:
        period = min(1.0, self.timeout / 10)
        while True:
            time.sleep(period)
            with self._lock:
                what, since = self._what, self._since
            if what is not None and time.monotonic() - since > self.timeout:
                _report(f"fastbp: rank {self.comm.rank}: {what} did not complete within {self.timeout:g} s "
                        f"(FASTBP_DIST_TIMEOUT): another rank stalled or died; aborting the job")
                self.comm.abort(1)
                return


def _report(message: str) -> None:
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _import_mpi() -> Any:
    """mpi4py's MPI module, initialized (``mpi_info`` may have loaded it without initializing MPI)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:  # mpi4py missing, or its MPI library not found
        raise DistributedUnavailable(f"data-parallel training needs mpi4py and an MPI library ({exc}): "
                                     f"{INSTALL_HINT}") from exc
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)  # the watchdog may call Abort from its thread
        atexit.register(_finalize, MPI)
    return MPI


def _finalize(MPI: Any) -> None:
    if not MPI.Is_finalized():
        MPI.Finalize()


def _on_device(x: Any) -> bool:
    return hasattr(x, "__cuda_array_interface__")


class MPICommunicator(Communicator):
    """MPI through mpi4py's buffer methods (``Allreduce``, ``Bcast``: never the pickle-based lowercase
    ones). CuPy arrays go through pinned host buffers unless the MPI library is CUDA-aware (then it reads
    device memory itself, after the stream is synchronized)."""

    name = "mpi"

    def __init__(self, comm: Any = None, timeout: float | None = None) -> None:
        MPI = _import_mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.cuda_aware = _mpi_cuda_aware(MPI)
        self._staging: dict[tuple, Any] = {}
        self._watchdog = _Watchdog(self, timeout_seconds() if timeout is None else timeout)

    def watch(self, what: str) -> contextlib.AbstractContextManager[Any]:
        return self._watchdog.watch(what)

    def _host(self, x: Any) -> Any:
        """A pinned host buffer shaped like the device array x (kept for reuse)."""
        key = (x.shape, x.dtype.str)
        buf = self._staging.get(key)
        if buf is None:
            try:
                cupyx = importlib.import_module("cupyx")
                buf = cupyx.empty_pinned(x.shape, x.dtype)
            except ImportError:  # an emulated CuPy: pageable memory does the same, slower
                buf = np.empty(x.shape, x.dtype)
            self._staging[key] = buf
        return buf

    def allreduce(self, x: Any) -> None:
        with self.watch("allreduce"):
            if _on_device(x) and not self.cuda_aware:
                host = self._host(x)
                x.get(out=host)  # synchronizes the stream
                self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
                x.set(host)
                return
            if _on_device(x):
                _synchronize()
            self.comm.Allreduce(self.MPI.IN_PLACE, x, op=self.MPI.SUM)

    def allreduce_host(self, x: np.ndarray) -> None:
        with self.watch("allreduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, x, op=self.MPI.SUM)

    def broadcast(self, x: Any, root: int = 0) -> None:
        with self.watch("broadcast"):
            if _on_device(x) and not self.cuda_aware:
                host = self._host(x)
                x.get(out=host)
                self.comm.Bcast(host, root=root)
                x.set(host)
                return
            if _on_device(x):
                _synchronize()
            self.comm.Bcast(x, root=root)

    def allgather(self, data: bytes) -> list[bytes]:
        with self.watch("allgather"):
            sizes = np.zeros(self.size, np.int64)
            self.comm.Allgather(np.array([len(data)], np.int64), sizes)
            out = np.zeros(int(sizes.sum()), np.uint8)
            self.comm.Allgatherv(np.frombuffer(data, np.uint8), (out, sizes))
        ends = np.cumsum(sizes)
        return [out[end - n:end].tobytes() for n, end in zip(sizes, ends)]

    def barrier(self) -> None:
        with self.watch("barrier"):
            self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        # what this rank wrote (the traceback, the reason) must reach mpiexec before the job is killed:
        # flush, and give the launcher's output forwarding a moment (a lost traceback was seen under MPICH)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        time.sleep(0.2)
        self.comm.Abort(code)


def _synchronize() -> None:
    """Wait for the current stream (a CUDA-aware MPI reads device memory the stream may still write)."""
    cupy = importlib.import_module("cupy")

    cupy.cuda.get_current_stream().synchronize()


def _mpi_cuda_aware(MPI: Any) -> bool:
    """Whether the MPI library reads CUDA device memory: ``FASTBP_MPI_CUDA_AWARE=0/1`` decides, else the
    library's own answer (MPIX_Query_cuda_support, where mpi4py exposes it), else False (staging is always
    correct)."""
    forced = os.environ.get("FASTBP_MPI_CUDA_AWARE")
    if forced in ("0", "1"):
        return forced == "1"
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:  # noqa: BLE001 - a library without the extension
        return False


class NCCLCommunicator(Communicator):
    """NCCL through CuPy (``cupy.cuda.nccl``) for the gradients, on the current stream; MPI for the rest
    (the unique id's broadcast, host metrics, allgather, barrier, abort), as ChainerMN does. Each rank uses
    ``device`` (the cupy backend's), else the GPU ``local_device`` picks. NCCL needs one GPU per rank."""

    name = "nccl"
    _DTYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
               "int32": "NCCL_INT32", "int64": "NCCL_INT64"}

    def __init__(self, mpi: Communicator | None = None, nccl: Any = None, cupy: Any = None,
                 device: int | None = None) -> None:
        self.mpi = mpi if mpi is not None else MPICommunicator()
        self.rank, self.size = self.mpi.rank, self.mpi.size
        self.local_rank, self.local_size = self.mpi.local_rank, self.mpi.local_size
        try:
            if cupy is None:
                cupy = importlib.import_module("cupy")
            if nccl is None:
                nccl = importlib.import_module("cupy.cuda.nccl")
            if not getattr(nccl, "available", True):
                raise ImportError("CuPy was built without NCCL")
        except ImportError as exc:
            raise DistributedUnavailable(f"the NCCL communicator needs CuPy with NCCL ({exc}): pip install "
                                         f"'fastbp[cuda12]' (or cuda13) and nvidia-nccl-cu12") from exc
        self.nccl, self.cupy = nccl, cupy
        self.device = local_device(self, cupy.cuda.runtime.getDeviceCount()) if device is None else device
        cupy.cuda.Device(self.device).use()
        # ncclUniqueId: 128 bytes, which CuPy gives as bytes (CuPy 14) or as a tuple of 128 ints (older
        # releases); the last byte of the broadcast says which, for the ranks that did not ask CuPy
        uid = np.zeros(129, np.int8)
        if self.rank == 0:
            made = nccl.get_unique_id()
            as_bytes = isinstance(made, (bytes, bytearray))
            uid[:128] = np.frombuffer(made, np.int8) if as_bytes else np.asarray(made, np.int64).astype(np.int8)
            uid[128] = as_bytes
        self.mpi.broadcast(uid, 0)
        unique_id = uid[:128].tobytes() if uid[128] else tuple(int(v) for v in uid[:128])
        with self.mpi.watch("NCCL setup"):
            self.comm = nccl.NcclCommunicator(self.size, unique_id, self.rank)

    def _nccl_dtype(self, x: Any) -> int:
        name = self._DTYPES.get(np.dtype(x.dtype).name)
        if name is None:
            raise TypeError(f"NCCL cannot reduce {x.dtype} arrays")
        return getattr(self.nccl, name)

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def allreduce(self, x: Any) -> None:
        if not _on_device(x):
            return self.mpi.allreduce(x)
        with self.mpi.watch("NCCL allreduce"):
            self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._nccl_dtype(x), self.nccl.NCCL_SUM,
                                self._stream())
        return None

    def broadcast(self, x: Any, root: int = 0) -> None:
        if not _on_device(x):
            return self.mpi.broadcast(x, root)
        with self.mpi.watch("NCCL broadcast"):
            self.comm.bcast(x.data.ptr, x.size, self._nccl_dtype(x), root, self._stream())
        return None

    def allreduce_host(self, x: np.ndarray) -> None:
        self.mpi.allreduce_host(x)

    def allgather(self, data: bytes) -> list[bytes]:
        return self.mpi.allgather(data)

    def barrier(self) -> None:
        self.mpi.barrier()

    def abort(self, code: int = 1) -> None:
        self.mpi.abort(code)


def init(kind: str = "auto", backend: Any = None, mpi: MPICommunicator | None = None) -> Communicator:
    """The communicator of this process in a job launched by ``mpiexec``: 'mpi', 'nccl', or 'auto' (NCCL
    for the cupy backend when CuPy has it and there is more than one rank, else MPI). ``mpi``: an MPI
    communicator made already. Raises DistributedUnavailable, with what to install, when mpi4py or its
    MPI library is missing."""
    if kind not in ("auto", "mpi", "nccl"):
        raise ValueError(f"kind must be 'auto', 'mpi' or 'nccl', got {kind!r}")
    mpi = mpi if mpi is not None else MPICommunicator()
    abort_on_uncaught(mpi)
    on_gpu = backend is not None and getattr(backend, "name", "").startswith("cupy")
    if kind == "nccl" or (kind == "auto" and on_gpu and mpi.size > 1 and nccl_usable()):
        return NCCLCommunicator(mpi, device=getattr(backend, "device_id", None))
    return mpi


def local_device(comm: Communicator, count: int) -> int:
    """The GPU of this rank among the ``count`` of its machine: its local rank modulo ``count``, so the ranks
    of a machine spread over its GPUs (NCCL needs one GPU per rank)."""
    return comm.local_rank % count


def abort_on_uncaught(comm: Communicator) -> None:
    """Make an exception that nothing catches, on any rank, abort the whole job after its traceback (as
    ``python -m mpi4py`` does): otherwise the other ranks wait for this one in their next collective
    forever. Installed by ``init`` for jobs of more than one rank."""
    if comm.size <= 1 or getattr(sys.excepthook, "fastbp_abort", False):
        return
    previous = sys.excepthook

    def hook(kind: Any, value: Any, tb: Any) -> None:
        previous(kind, value, tb)
        _report(f"fastbp: rank {comm.rank} of {comm.size}: uncaught {kind.__name__}; aborting the job")
        comm.abort(1)

    hook.fastbp_abort = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def nccl_usable() -> bool:
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", False))


def mpi_info() -> str:
    """One line for ``fastbp info``: the MPI library and version, and whether NCCL is usable."""
    try:
        import mpi4py

        if "mpi4py.MPI" not in sys.modules:
            mpi4py.rc.initialize = False  # these queries need no MPI_Init (a job's init() does it later)
        from mpi4py import MPI

        library = " ".join(MPI.Get_library_version().split()[:3]).rstrip(",")
        mpi = f"mpi4py {mpi4py.__version__} on {library} (MPI {'.'.join(map(str, MPI.Get_version()))})"
    except Exception as exc:  # noqa: BLE001 - any failure to load is "not available"
        mpi = f"unavailable ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    return f"{mpi}; NCCL {'usable' if nccl_usable() else 'not usable (needs CuPy with NCCL)'}"


# ----------------------------------------------------------------------------------------- start and faults
def check_same(comm: Communicator, facts: dict[str, Any]) -> None:
    """Allgather ``facts``' fingerprint; a ValueError naming the ranks that differ from rank 0, and what."""
    mine = json.dumps(facts, sort_keys=True, default=str)
    gathered = comm.allgather(mine.encode())
    first = json.loads(gathered[0])
    differ = [r for r, data in enumerate(gathered) if data != gathered[0]]
    if differ:
        theirs = json.loads(gathered[differ[0]])
        keys = [k for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k)]
        raise ValueError(f"ranks {differ} differ from rank 0 in {', '.join(keys)} (rank 0: "
                         f"{', '.join(f'{k}={first.get(k)!r}' for k in keys)}; rank {differ[0]}: "
                         f"{', '.join(f'{k}={theirs.get(k)!r}' for k in keys)}): every rank must run the same "
                         f"model, optimizer, batch size and data shape")


@contextlib.contextmanager
def abort_on_error(comm: Communicator, where: Any) -> Iterator[None]:
    """Within, an exception on this rank alone aborts the whole job (after a message naming the rank and
    ``where()``, e.g. the step), since the other ranks would wait for it in their next collective forever.
    Exceptions every rank raises together (``collective``: a divergence decided from reduced values, the
    stop after Ctrl-C or SIGTERM) pass through."""
    try:
        yield
    except BaseException as exc:
        if comm.size > 1 and not getattr(exc, "collective", False):
            _report(f"fastbp: rank {comm.rank} of {comm.size} failed at {where()}: {type(exc).__name__}: {exc}; "
                    f"aborting the job")
            comm.abort(1)
        raise
