"""Data-parallel training in one process: the size-1 communicator, the slice arithmetic, the NCCL path's
wiring against a recording fake, and what a missing MPI says. The multi-process runs are in test_mpi.py."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import EMULATED, EMULATOR_MISSING

import fastbp as fb
from fastbp import distributed
from fastbp.distributed import Communicator, LocalCommunicator, NCCLCommunicator, shard


@pytest.mark.parametrize("total,size", [(10, 1), (10, 3), (3, 4), (0, 2), (1, 2), (103, 4), (64, 7)])
def test_shards_cover_every_row_once_contiguously(total, size):
    parts = [shard(total, r, size) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # contiguous, in rank order
    counts = [hi - lo for lo, hi in parts]
    assert max(counts) - min(counts) <= 1 and sum(counts) == total
    if total < size:
        assert counts.count(0) == size - total  # empty slices: no padding, no repeated rows


def test_the_size_one_communicator_changes_nothing_bit_for_bit(backend):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((53, 5)), rng.integers(0, 3, 53)
    results = []
    for comm in (None, LocalCommunicator()):
        model = fb.MLP([5, 7, 3], dtype="float32", seed=1, backend=backend)
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=8, seed=2, comm=comm)
        history = trainer.fit(X, y, epochs=2, validation_data=(X[:20], y[:20]), verbose=0)
        results.append((model.backend.to_numpy(model.flat_parameters()), history["loss"], history["val_loss"]))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1:] == results[1][1:]


def test_the_scaled_slices_sum_to_the_global_mean_gradient(backend):
    """rows_r / rows_global times each rank's mean gradient, summed over the ranks (an empty slice
    contributing zeros), is the gradient of the whole batch: the arithmetic of each data-parallel step."""
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((7, 4)), rng.integers(0, 3, 7)
    model = fb.MLP([4, 5, 3], dtype="float64", seed=0, backend=backend)
    _, whole = model.loss_and_grads(X, y)
    whole = np.concatenate([np.ravel(model.backend.to_numpy(g)) for g in whole])
    for size in (2, 3, 8):  # 8 ranks for 7 rows: one has none
        total = np.zeros_like(whole)
        for r in range(size):
            lo, hi = shard(7, r, size)
            if hi > lo:
                _, grads = model.loss_and_grads(X[lo:hi], y[lo:hi])
                total += (hi - lo) / 7 * np.concatenate([np.ravel(model.backend.to_numpy(g)) for g in grads])
        np.testing.assert_allclose(total, whole, rtol=1e-12, atol=1e-15)


class _RecordingMPI(Communicator):
    """An MPI side for the NCCL communicator: rank and size of our choosing, broadcasts recorded."""

    name = "fake-mpi"

    def __init__(self, rank, size, local_rank):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.broadcasts = []

    def broadcast(self, x, root=0):
        self.broadcasts.append((np.array(x, copy=True), root))


class _RecordingNCCL:
    """cupy.cuda.nccl's interface, recording every call: the wiring is what we check (NCCL itself needs
    one GPU per rank)."""

    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT32, NCCL_INT64, NCCL_SUM = 6, 7, 8, 2, 4, 0
    available = True

    def __init__(self, as_bytes=False):
        self.calls = []
        self.as_bytes = as_bytes

    def get_unique_id(self):
        # 128 bytes: CuPy 14 gives bytes, older CuPy a tuple of 128 signed ints
        return np.arange(-64, 64, dtype=np.int8).tobytes() if self.as_bytes else tuple(range(-64, 64))

    def NcclCommunicator(self, size, uid, rank):
        self.calls.append(("init", size, uid, rank))
        outer = self

        class Comm:
            def allReduce(self, send, recv, count, dtype, op, stream):
                outer.calls.append(("allReduce", send, recv, count, dtype, op, stream))

            def bcast(self, buf, count, dtype, root, stream):
                outer.calls.append(("bcast", buf, count, dtype, root, stream))

        return Comm()


@pytest.mark.emulator
@pytest.mark.skipif(bool(EMULATOR_MISSING), reason=EMULATOR_MISSING or "emulator available")
@pytest.mark.parametrize("as_bytes", [False, True], ids=["tuple-id", "bytes-id"])
def test_the_nccl_path_passes_device_pointers_counts_dtypes_and_the_stream(as_bytes):
    from fastbp.backends import resolve_backend
    from fastbp.testing import fake_cupy

    gpu = resolve_backend(EMULATED)
    nccl = _RecordingNCCL(as_bytes)
    before = fake_cupy.settings.device_count
    fake_cupy.settings.device_count = 2
    try:
        mpi = _RecordingMPI(rank=0, size=3, local_rank=3)
        comm = NCCLCommunicator(mpi, nccl=nccl, cupy=fake_cupy)
        assert comm.device == 1 and fake_cupy.cuda.runtime.getDevice() == 1  # local rank 3, 2 GPUs
    finally:
        fake_cupy.settings.device_count = before
        fake_cupy.cuda.Device(0).use()
    (uid, root), = mpi.broadcasts  # rank 0's unique id, over MPI
    assert root == 0 and uid.dtype == np.int8 and list(uid) == list(range(-64, 64)) + [as_bytes]
    # the other ranks hand NCCL the id in the form rank 0's CuPy gave it
    assert nccl.calls[0] == ("init", 3, nccl.get_unique_id(), 0)
    stream = fake_cupy.get_current_stream().ptr
    for dtype, code in (("float32", 7), ("float64", 8)):
        x = gpu.asarray(np.arange(10), dtype)
        comm.allreduce(x)
        assert nccl.calls[-1] == ("allReduce", x.data.ptr, x.data.ptr, 10, code, 0, stream)
        comm.broadcast(x, root=2)
        assert nccl.calls[-1] == ("bcast", x.data.ptr, 10, code, 2, stream)
    host = np.zeros(4)
    comm.broadcast(host)  # host arrays go over MPI
    assert mpi.broadcasts[-1][0] is not host and len(nccl.calls) == 5
    with pytest.raises(TypeError, match="NCCL cannot reduce"):
        comm.allreduce(gpu.asarray(np.zeros(3), "float64").astype(np.complex128))


def test_without_mpi4py_the_error_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if it were not installed
    with pytest.raises(distributed.DistributedUnavailable, match=r"pip install 'fastbp\[mpi\]'"):
        distributed.init()
    assert "unavailable" in distributed.mpi_info()
    from fastbp.cli import main

    assert main(["train", "--distributed", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fastbp[mpi]" in err[0], err


def test_a_bad_watchdog_limit_is_refused(monkeypatch):
    monkeypatch.setenv("FASTBP_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FASTBP_DIST_TIMEOUT"):
        distributed.timeout_seconds()
    monkeypatch.setenv("FASTBP_DIST_TIMEOUT", "2.5")
    assert distributed.timeout_seconds() == 2.5


def test_a_trainer_refuses_what_is_not_a_communicator():
    with pytest.raises(TypeError, match="communicator"):
        fb.Trainer(fb.MLP([2, 2]), comm="mpi")


@pytest.mark.gpu
def test_nccl_allreduce_and_broadcast_with_one_rank():
    """The real NCCL on one GPU, one rank (no MPI needed: the local communicator stands in for it)."""
    if "cupy" not in fb.available_backends() or not distributed.nccl_usable():
        pytest.skip("needs the cupy backend and CuPy with NCCL")
    import cupy

    comm = NCCLCommunicator(LocalCommunicator())
    for dtype in ("float32", "float64"):
        x = cupy.arange(1000, dtype=dtype)
        comm.allreduce(x)  # the sum over one rank
        comm.broadcast(x, 0)
        cupy.cuda.get_current_stream().synchronize()
        np.testing.assert_array_equal(cupy.asnumpy(x), np.arange(1000, dtype=dtype))


@pytest.mark.emulator
@pytest.mark.skipif(bool(EMULATOR_MISSING), reason=EMULATOR_MISSING or "emulator available")
def test_each_rank_of_a_machine_trains_on_its_own_gpu():
    """train --distributed on a GPU backend without a device named: local rank r uses GPU r % count."""
    from fastbp.backends import resolve_backend
    from fastbp.cli import _rank_device
    from fastbp.testing import fake_cupy

    gpu = resolve_backend(EMULATED)
    assert fake_cupy.settings.device_count == 2
    assert _rank_device(EMULATED, gpu, _RecordingMPI(rank=5, size=8, local_rank=3)) == f"{EMULATED}:1"
    assert _rank_device(EMULATED, gpu, _RecordingMPI(rank=4, size=8, local_rank=2)) is gpu  # device 0
    assert _rank_device(f"{EMULATED}:0", gpu, _RecordingMPI(rank=1, size=2, local_rank=1)) is gpu  # named
    cpu = resolve_backend("numpy")
    assert _rank_device("numpy", cpu, _RecordingMPI(rank=1, size=2, local_rank=1)) is cpu
