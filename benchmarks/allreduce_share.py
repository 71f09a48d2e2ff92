"""The allreduce's share of a data-parallel step on this machine, for the bench configs.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE mpiexec -n 2 python benchmarks/allreduce_share.py \
        --config small --config mnist

Each rank trains with one thread (the ranks share the machine's cores). Per config, the median over
``--reps`` timed steps (after warm-up) of: the whole data-parallel step (``Trainer.step`` on the global
batch, which computes this rank's slice), the allreduce of the gradient block alone (timed between two
barriers, so no rank's compute is in it). Rank 0 prints the table. For scale, run it without mpiexec: one
process then times its step on the global batch with a thread per core. (Timing that inside the MPI job
is wrong: the waiting ranks spin at full speed and take the cores from it.)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np

import fastbp as fb
from fastbp import distributed
from fastbp.bench import CONFIGS
from fastbp.distributed import TAIL


def median_ms(fn, reps: int, comm: distributed.Communicator) -> float:
    times = []
    for _ in range(reps):
        comm.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", choices=["small", "mnist", "wide"])
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    comm = distributed.init("mpi")
    fb.set_num_threads(1 if comm.size > 1 else os.cpu_count() or 1)
    rows = []
    for name in args.config or ["small", "mnist"]:
        sizes, batch = CONFIGS[name]["sizes"], CONFIGS[name]["batch"]
        rng = np.random.default_rng(0)
        X, y = rng.standard_normal((batch, sizes[0])).astype(args.dtype), rng.integers(0, sizes[-1], batch)
        model = fb.MLP(sizes, dtype=args.dtype, seed=0, backend=args.backend)
        trainer = fb.Trainer(model, optimizer=fb.optim.SGD(lr=1e-4), batch_size=batch, comm=comm)
        for _ in range(3):  # compile and warm up
            trainer.step(X, y)
        block = model.reduction_buffer(TAIL)
        step = median_ms(lambda: trainer.step(X, y), args.reps, comm)  # noqa: B023
        reduce = median_ms(lambda: comm.allreduce(block), args.reps, comm) if comm.size > 1 else math.nan  # noqa: B023
        rows.append((name, batch, block.nbytes, step, reduce))
    if comm.rank == 0:
        threads = "1 thread each" if comm.size > 1 else f"{os.cpu_count()} threads"
        print(f"{comm.size} ranks, {args.backend} {args.dtype}, {threads}; {distributed.mpi_info()}")
        print(f"{'config':8s} {'batch':>6s} {'gradient MB':>12s} {'step ms':>9s} {'allreduce ms':>13s} {'share':>6s}")
        for name, batch, nbytes, step, reduce in rows:
            print(f"{name:8s} {batch:6d} {nbytes / 1e6:12.2f} {step:9.3f} {reduce:13.3f} {reduce / step:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
