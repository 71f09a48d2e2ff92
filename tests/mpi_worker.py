"""The program the multi-process tests (tests/test_mpi.py) run under ``mpiexec -n K``; also imported by them,
to train the same run in one process for the comparison. Not a test module itself.

python tests/mpi_worker.py OUT.npz [--dtype float64] [--epochs 2] [--batch 10] [--scenario train] ...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

import fastbp as fb
from fastbp import distributed


def data(n: int = 103, features: int = 6, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable-ish rows; 103 rows in batches of 10 leave a last batch of 3, which 4 ranks split unevenly
    (one of them gets none)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.standard_normal((n, features)) + y[:, None] * 0.7
    return X, y


def build(args: argparse.Namespace, comm: distributed.Communicator | None) -> fb.Trainer:
    if args.resume:
        return fb.Trainer.load_checkpoint(args.resume, backend=args.backend, comm=comm)
    dtype = "float32" if args.compute_dtype else args.dtype  # mixed precision keeps float32 weights
    model = fb.MLP([6, args.hidden, 3], dtype=dtype, seed=1, backend=args.backend, compute_dtype=args.compute_dtype)
    optimizer = fb.optim.Adam(lr=1e-2) if args.optimizer == "adam" else fb.optim.SGD(lr=0.1, momentum=0.9)
    trainer = fb.Trainer(model, optimizer=optimizer, batch_size=args.batch, seed=2, comm=comm, clip_norm=args.clip)
    if args.loss_scale:  # float16: a first loss scale of the test's choosing
        trainer._set_loss_scaling_state([args.loss_scale, 0, 0])
    return trainer


class _Fault(fb.Callback):
    """Raises, stalls, or gets SIGTERM, on one rank at the end of an epoch."""

    def __init__(self, scenario: str, rank: int) -> None:
        self.scenario, self.rank = scenario, rank

    def on_epoch_end(self, trainer, epoch, logs):
        if trainer.comm.rank != self.rank:
            return
        if self.scenario == "raise":
            raise RuntimeError("a fault injected on one rank")
        if self.scenario == "stall":
            time.sleep(120)
        if self.scenario == "sigterm" and epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler sends it


def run(args: argparse.Namespace, comm: distributed.Communicator | None) -> dict[str, np.ndarray]:
    X, y = data()
    trainer = build(args, comm)
    callbacks = [_Fault(args.scenario, 1)] if args.scenario in ("raise", "stall", "sigterm") else []
    if args.checkpoint and args.scenario != "sigterm":
        callbacks.append(fb.PeriodicCheckpoint(args.checkpoint, 1))
    if args.public_steps:  # Trainer.step on batches the caller makes: each is the global batch
        losses = [trainer.step(X[s:s + 13], y[s:s + 13]) for s in range(0, 65, 13)]
        return {"flat": trainer.model.backend.to_numpy(trainer.model.flat_parameters()).copy(),
                "loss": np.array(losses), "steps": np.array(trainer.steps),
                "overflow_steps": np.array(trainer.overflow_steps)}
    weights = np.linspace(0.2, 2.0, len(y)) if args.weights else None  # per-row weights, and on validation
    validation = (X[:40], y[:40]) if weights is None else (X[:40], y[:40], weights[:40])
    history = trainer.fit(X, y, epochs=args.epochs, validation_data=validation, verbose=0, callbacks=callbacks,
                          sample_weight=weights, interrupt_checkpoint=args.checkpoint if args.scenario == "sigterm"
                          else None)
    return {"flat": trainer.model.backend.to_numpy(trainer.model.flat_parameters()).copy(),
            "loss": np.array(history["loss"]), "val_loss": np.array(history["val_loss"]),
            "accuracy": np.array(history["accuracy"]), "steps": np.array(trainer.steps),
            "epoch": np.array(trainer.epoch), "interrupted": np.array(history.interrupted),
            "overflow_steps": np.array(trainer.overflow_steps)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--compute-dtype", default=None, help="mixed precision (the cupy backend)")
    p.add_argument("--loss-scale", type=float, default=None, help="float16's first loss scale")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--weights", action="store_true", help="train with sample weights")
    p.add_argument("--public-steps", action="store_true", help="Trainer.step on 5 batches of 13 rows, no fit")
    p.add_argument("--scenario", default="train",
                   choices=("train", "raise", "stall", "mismatch", "uncaught", "sigterm"))
    p.add_argument("--checkpoint")
    p.add_argument("--resume")
    return p


def main() -> int:
    args = parser().parse_args()
    if args.backend.startswith("cupy-emulated"):  # the cupy backend's code on fastbp's CUDA emulator
        from fastbp.testing import fake_cupy

        fake_cupy.register()
    comm = distributed.init("mpi")
    if args.scenario == "mismatch" and comm.rank == 1:
        args.hidden += 1
    result = run(args, comm)
    if args.scenario == "uncaught":  # after training, outside fastbp: rank 1 fails, rank 0 waits for it
        if comm.rank == 1:
            raise KeyError("a fault outside fit")
        comm.barrier()
    # every rank's parameters, gathered, so the test can check they are byte-identical
    every = comm.allgather(result["flat"].tobytes())
    if comm.rank == 0 and args.out:
        np.savez(args.out, ranks=np.stack([np.frombuffer(b, result["flat"].dtype) for b in every]), size=comm.size,
                 **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
