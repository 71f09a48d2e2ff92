"""Data-parallel training across processes: each test launches ``mpiexec -n K`` (MPICH from the test extra)
as its own process group, killed whole when it outlives its timeout, so a hang fails the test instead of
stalling the run. The program the ranks run is tests/mpi_worker.py; the same run in this process is the
reference."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mpi_worker
import numpy as np
import pytest
from conftest import EMULATED, EMULATOR_MISSING

HERE = Path(__file__).parent
WORKER = str(HERE / "mpi_worker.py")
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
try:
    import mpi4py  # noqa: F401

    MISSING = "" if MPIEXEC else "no mpiexec on the PATH (pip install 'fastbp[mpi]')"
except ImportError as exc:
    MISSING = f"mpi4py is not installed ({exc}): pip install 'fastbp[mpi]'"
if MISSING and os.environ.get("FASTBP_REQUIRE_MPI") == "1":
    raise RuntimeError(f"FASTBP_REQUIRE_MPI=1 but the data-parallel tests cannot run: {MISSING}")
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(bool(MISSING), reason=MISSING or "mpi available")]


def mpirun(k: int, *args: str, timeout: float = 90, env: dict[str, str] | None = None,
           program: list[str] | None = None) -> tuple[int, str, str, float]:
    """Run ``mpiexec -n k`` (the worker, or ``program``) in a process group of its own; a run that outlives
    ``timeout`` is killed whole and fails the test. Returns (exit code, stdout, stderr, seconds)."""
    command = [MPIEXEC, "-n", str(k), *(program or [sys.executable, WORKER]), *args]
    # Open MPI refuses to start as root (containers, the GPU machine) unless told; MPICH ignores these
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})}, cwd=HERE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not end within {timeout} s (a hang); stderr:\n{err[-3000:]}")
    return proc.returncode, out, err, time.perf_counter() - start


def alone(*args: str) -> dict[str, np.ndarray]:
    """The worker's run in this process, without a communicator: the reference."""
    return mpi_worker.run(mpi_worker.parser().parse_args(list(args)), None)


def together(tmp_path: Path, k: int, *args: str, timeout: float = 90) -> dict[str, np.ndarray]:
    out = tmp_path / f"k{k}.npz"
    code, _, err, _ = mpirun(k, str(out), *args, timeout=timeout)
    assert code == 0, err[-3000:]
    with np.load(out) as f:
        result = dict(f)
    assert int(result["size"]) == k
    # every rank ends with the same parameters, to the byte
    assert all(np.array_equal(result["ranks"][0], r) for r in result["ranks"]), "ranks' parameters differ"
    return result


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("k", [2, 3, 4])
def test_k_ranks_train_as_one_process_does(tmp_path, k):
    """float64, Adam, 2 epochs of 103 rows in global batches of 10: the last batch of 3 rows leaves a rank
    without rows at k=4. Parameters within 1e-12 (relative), metrics too, on every rank the same."""
    want = alone()
    got = together(tmp_path, k)
    assert relative_error(got["flat"], want["flat"]) < 1e-12
    for key in ("loss", "val_loss", "accuracy"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)
    assert int(got["steps"]) == int(want["steps"]) == 22


def test_momentum_and_clipping_decide_alike(tmp_path):
    """Clipping reads the reduced gradient's norm: every rank clips alike, as one process does."""
    args = ("--optimizer", "sgd", "--clip", "0.5", "--epochs", "3")
    assert relative_error(together(tmp_path, 3, *args)["flat"], alone(*args)["flat"]) < 1e-12


def test_sample_weights_weigh_alike(tmp_path):
    """Weighted rows: each rank's weighted mean, scaled by its share of the rows, sums to one process's."""
    got, want = together(tmp_path, 3, "--weights"), alone("--weights")
    assert relative_error(got["flat"], want["flat"]) < 1e-12
    np.testing.assert_allclose(got["val_loss"], want["val_loss"], rtol=1e-12)


def test_trainer_step_takes_the_global_batch(tmp_path):
    """``Trainer.step(X, y)`` with a communicator: (X, y) is the global batch, each rank computes its slice;
    the returned losses are the batch's, as one process's."""
    got, want = together(tmp_path, 4, "--public-steps"), alone("--public-steps")
    assert int(got["steps"]) == 5 and relative_error(got["flat"], want["flat"]) < 1e-12
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-12)


def test_float32_after_one_step(tmp_path):
    args = ("--dtype", "float32", "--epochs", "1", "--batch", "103")  # one step over every row
    got, want = together(tmp_path, 2, *args), alone(*args)
    assert int(got["steps"]) == 1
    assert relative_error(got["flat"].astype(np.float64), want["flat"].astype(np.float64)) < 1e-5


def test_the_numba_backend_trains_data_parallel(tmp_path):
    args = ("--backend", "numba")
    assert relative_error(together(tmp_path, 2, *args, timeout=240)["flat"], alone(*args)["flat"]) < 1e-12


@pytest.mark.emulator
@pytest.mark.skipif(bool(EMULATOR_MISSING), reason=EMULATOR_MISSING or "emulator available")
def test_cupy_arrays_go_through_host_staging(tmp_path):
    """The cupy backend's own code on the emulated CuPy: device arrays are reduced and broadcast through
    host buffers (get(out=), MPI, set), as with an MPI that is not CUDA-aware."""
    args = ("--backend", EMULATED, "--epochs", "1")
    got = together(tmp_path, 2, *args, timeout=240)
    assert relative_error(got["flat"], alone(*args)["flat"]) < 1e-12


@pytest.mark.emulator
@pytest.mark.skipif(bool(EMULATOR_MISSING), reason=EMULATOR_MISSING or "emulator available")
@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_16_bit_ranks_sum_their_gradients_in_float32(tmp_path, compute):
    """Mixed precision across ranks: each rank's 16-bit gradient is summed in float32 with the metrics, then
    rounded to 16 bits once for the update (float16: scaled by the loss scale, which every rank updates alike
    from the summed gradient; a first scale of 1024 overflows on no rank, so the steps match one process's).
    The ranks end byte-identical (``together``); against one process, whose gradient over the whole batch
    rounds otherwise, within 16-bit precision."""
    args = ("--backend", EMULATED, "--compute-dtype", compute, "--epochs", "1", "--clip", "1.0")
    args += ("--loss-scale", "1024") if compute == "float16" else ()
    got, want = together(tmp_path, 2, *args, timeout=240), alone(*args)
    assert got["flat"].dtype == np.float32
    assert int(got["overflow_steps"]) == int(want["overflow_steps"]) == 0
    assert relative_error(got["flat"], want["flat"]) < 2e-3  # measured 1e-4 (bfloat16 against float32: 7e-4)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-3)


@pytest.mark.emulator
@pytest.mark.skipif(bool(EMULATOR_MISSING), reason=EMULATOR_MISSING or "emulator available")
def test_a_float16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """At a first loss scale of 2**16 a rank's gradient (the mean over its own rows) overflows where one
    process's over the whole batch may not, as with PyTorch's DDP and GradScaler: every rank skips that step
    and halves its scale alike, and they end byte-identical (``together`` checks)."""
    got = together(tmp_path, 2, "--backend", EMULATED, "--compute-dtype", "float16", "--public-steps", timeout=240)
    assert int(got["overflow_steps"]) >= 1


def test_a_run_resumes_at_another_rank_count(tmp_path):
    """A checkpoint holds the global batch size, not the rank count: 1 epoch at k=2, then 1 more at k=3 from
    its checkpoint, equals 2 epochs in one process."""
    checkpoint = str(tmp_path / "ck.npz")
    together(tmp_path, 2, "--epochs", "1", "--checkpoint", checkpoint)
    resumed = together(tmp_path, 3, "--epochs", "1", "--resume", checkpoint)
    want = alone("--epochs", "2")
    assert int(resumed["epoch"]) == 2 and int(resumed["steps"]) == 22
    assert relative_error(resumed["flat"], want["flat"]) < 1e-12


def test_an_exception_on_one_rank_ends_the_job_quickly_naming_it():
    code, _, err, seconds = mpirun(2, "--scenario", "raise", timeout=60)
    assert code != 0 and seconds < 10, (code, seconds)
    assert re.search(r"fastbp: rank 1 of 2 failed at epoch 1, step \d+: RuntimeError: a fault injected", err), err


def test_an_uncaught_exception_outside_fit_ends_the_job_too():
    """init() installs an excepthook that aborts the job (as python -m mpi4py does): rank 0, waiting in a
    barrier for rank 1, does not hang."""
    code, _, err, seconds = mpirun(2, "--scenario", "uncaught", "--epochs", "1", timeout=60)
    assert code != 0 and seconds < 10, (code, seconds)
    assert "KeyError: 'a fault outside fit'" in err and "fastbp: rank 1 of 2: uncaught KeyError; aborting" in err, err


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The stop flag rides in the step's allreduce: rank 1 gets SIGTERM after epoch 1, and every rank ends
    fit at the same step (parameters byte-identical), interrupted, with rank 0's checkpoint of epoch 1."""
    checkpoint = tmp_path / "stop.npz"
    got = together(tmp_path, 2, "--scenario", "sigterm", "--epochs", "3", "--checkpoint", str(checkpoint))
    assert bool(got["interrupted"]) and int(got["epoch"]) == 1
    assert int(got["steps"]) == 11  # epoch 1's; the step whose allreduce carried the flag updated nothing
    import fastbp as fb

    resumed = fb.Trainer.load_checkpoint(checkpoint, backend="numpy")
    assert resumed.epoch == 1 and resumed.steps == 11


def test_a_stalled_rank_trips_the_watchdog():
    code, _, err, seconds = mpirun(2, "--scenario", "stall", timeout=60, env={"FASTBP_DIST_TIMEOUT": "2"})
    assert code != 0 and seconds < 30, (code, seconds)
    assert "allreduce did not complete within 2 s (FASTBP_DIST_TIMEOUT)" in err, err


def test_a_configuration_mismatch_names_the_ranks():
    code, _, err, _ = mpirun(3, "--scenario", "mismatch", timeout=60)
    assert code != 0
    assert "ranks [1] differ from rank 0 in sizes (rank 0: sizes=[6, 8, 3]; rank 1: sizes=[6, 9, 3])" in err, err


def test_the_command_line_trains_digits_data_parallel_to_the_same_accuracy(tmp_path):
    """``mpiexec -n 2 fastbp train --distributed`` prints one report, and its test accuracy is within 0.01 of
    one process's."""
    fastbp = [sys.executable, "-m", "fastbp"]
    options = ["train", "--backend", "numpy", "--epochs", "8", "--quiet"]
    one = subprocess.run([*fastbp, *options], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    code, out, err, _ = mpirun(2, *options, "--distributed", program=fastbp, timeout=120)
    assert code == 0, err[-3000:]
    assert out.count("test accuracy") == 1 and "data-parallel: 2 ranks over mpi" in out, out

    def accuracy(text):
        return float(re.search(r"test accuracy: ([0-9.]+)", text).group(1))

    assert abs(accuracy(out) - accuracy(one.stdout)) <= 0.01, (out, one.stdout)


@pytest.mark.gpu
def test_two_ranks_share_one_gpu_through_mpi_staging(tmp_path):
    """CuPy arrays through pinned host memory and MPI (NCCL needs a GPU per rank): the same training as one
    process on the GPU."""
    import fastbp as fb

    if "cupy" not in fb.available_backends():
        pytest.skip("needs the cupy backend")
    args = ("--backend", "cupy")
    got = together(tmp_path, 2, *args, timeout=240)
    assert relative_error(got["flat"], alone(*args)["flat"]) < 1e-12
