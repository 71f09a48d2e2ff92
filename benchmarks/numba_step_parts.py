"""Where the numba whole-step kernel's time goes beyond its GEMMs (SGD, float32, relu, cross-entropy),
with the batch whole (not split into parts run side by side; ``benchmarks/numba_blas_route.py`` compares):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/numba_step_parts.py [--config small]

Times, interleaved (medians over rounds, microseconds): the kernel's whole step in a compiled loop; its
GEMMs alone in the same order, in a compiled loop; the same GEMMs called one by one from Python (the
GEMM floor of ``fastbp bench``); the kernel called once per step from Python, the Trainer's internal
step and its public ``Trainer.step`` (what Python adds); and each fused pass alone on buffers of the
step's shapes. The step minus its GEMMs is what the passes cost inside the step, next to what they cost
alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from numba import njit

import fastbp as fb
from fastbp.backends import _numba_kernels as k
from fastbp.backends import numba_backend
from fastbp.backends._numba_blas import gemm
from fastbp.backends.update_args import STRUCTS
from fastbp.bench import CONFIGS, floor_candidates


@njit
def _steps(n, X, labels, Y, flat, grad, layout, codes, ws, top, sgd_args, adam_args, rmsprop_args, empty, route):
    for _ in range(n):
        k.train_step(X, labels, Y, 0, flat, grad, layout, codes, ws, top, 0, sgd_args, adam_args, rmsprop_args,
                     empty, empty, 0.0, route)


@njit
def _gemms(n, X, flat, grad, layout, ws, top, route):
    """The kernel's GEMMs on its buffers and in its order (forward; then per layer, top down, eq. (3) and
    eq. (2)), and nothing else."""
    B, L = X.shape[0], layout.shape[0]
    a_at, d_at = k.workspace_offsets(B, layout)
    for _ in range(n):
        A_prev = X
        for l in range(L):
            w0, n_in, n_out = layout[l, 0], layout[l, 2], layout[l, 3]
            A = ws[a_at[l]:a_at[l] + B * n_out].reshape((B, n_out)) if l < L - 1 else top
            gemm(A_prev, flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)), A, route)
            A_prev = A
        n_top = layout[L - 1, 3]
        delta = ws[d_at[L - 1]:d_at[L - 1] + B * n_top].reshape((B, n_top))
        for l in range(L - 1, -1, -1):
            w0, n_in, n_out = layout[l, 0], layout[l, 2], layout[l, 3]
            A_in = ws[a_at[l - 1]:a_at[l - 1] + B * n_in].reshape((B, n_in)) if l > 0 else X
            gemm(A_in.T, delta, grad[w0:w0 + n_in * n_out].reshape((n_in, n_out)), route)
            if l > 0:
                below = ws[d_at[l - 1]:d_at[l - 1] + B * n_in].reshape((B, n_in))
                gemm(delta, flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)).T, below, route)
                delta = below


@njit
def _forward_epilogue(n, Z, b):
    for _ in range(n):
        k.forward_epilogue(Z, b, k.RELU)


@njit
def _backward_epilogue(n, D, A, db):
    for _ in range(n):
        k.backward_epilogue(D, A, k.RELU, db)


@njit
def _output_delta(n, Z, labels, Y, D):
    for _ in range(n):
        k.output_delta(Z, labels, Y, 0, D, Z.shape[0])


@njit
def _sumsq(n, g, route):
    s = 0.0
    for _ in range(n):
        s += k.sum_of_squares(g, route)
    return s


@njit
def _sgd(n, p, g, empty, args):
    for _ in range(n):
        k.sgd(p, g, empty, args)


def main() -> None:
    numba_backend.SPLIT = "never"  # the batch whole (benchmarks/numba_blas_route.py compares it with the split)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=[c for c in CONFIGS if not CONFIGS[c].get("gpu_only")])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    sizes, batch = CONFIGS[args.config]["sizes"], CONFIGS[args.config]["batch"]
    backend = fb.backends.resolve_backend("numba")
    rng = np.random.default_rng(0)
    model = fb.MLP(sizes, seed=0, backend=backend)
    X, y = model.prepare_batch(rng.standard_normal((batch, sizes[0])), rng.integers(0, sizes[-1], batch),
                               "cross_entropy")
    plan = backend._whole_step_plan(model, batch)
    assert plan is not None and plan.parts == 1
    ws = plan.ws_whole
    flat, grad = model.flat_parameters(), model.flat_grad()
    labels, Y = np.ascontiguousarray(y, np.int64), np.zeros((0, 0), np.float32)
    empty = np.zeros(0, np.float32)
    # SGD with lr 0: the weights stay put
    records = [np.zeros(1, STRUCTS[name][1]) for name in ("sgd", "adam", "rmsprop")]
    hidden, n_out = sizes[1], sizes[-1]
    Z = rng.standard_normal((batch, hidden)).astype(np.float32)
    b, db = np.zeros(hidden, np.float32), np.zeros(hidden, np.float32)
    A = np.maximum(Z, 0)
    logits, D = rng.standard_normal((batch, n_out)).astype(np.float32), np.empty((batch, n_out), np.float32)
    p = flat.copy()
    route = backend.blas_route  # the kernels' BLAS, and the floor's library to match
    floors = {c.backend: c.fn for c in floor_candidates([backend], sizes, batch, "float32") if c.name == "floor:step"}
    floor = floors["blas:numpy" if route == 1 else "blas:scipy"]  # fastbp bench's floor:step

    def floor_step(n):
        for _ in range(n):
            floor()

    def kernel_from_python(n):  # one compiled call per step, as the backend makes it
        for _ in range(n):
            k.train_step(X, labels, Y, 0, flat, grad, plan.layout, plan.codes, ws, plan.output, 0, *records, empty,
                         empty, 0.0, route)

    # the Trainer's steps, on a model of their own (their SGD moves its weights)
    trainer = fb.Trainer(fb.MLP(sizes, seed=0, backend=backend), optimizer=fb.optim.SGD(lr=1e-6), batch_size=batch)

    def internal_step(n):
        for _ in range(n):
            trainer._step(X, y)

    def public_step(n):
        for _ in range(n):
            trainer.step(X, y)

    parts = {
        "whole step (compiled loop)": lambda n: _steps(n, X, labels, Y, flat, grad, plan.layout, plan.codes,
                                                       ws, plan.output, *records, empty, route),
        "its GEMMs alone (compiled loop)": lambda n: _gemms(n, X, flat, grad, plan.layout, ws, plan.output, route),
        "GEMM floor (from Python)": floor_step,
        "whole step, called from Python": kernel_from_python,
        "Trainer._step (internal)": internal_step,
        "Trainer.step (public)": public_step,
        f"forward_epilogue ({batch}x{hidden})": lambda n: _forward_epilogue(n, Z, b),
        f"backward_epilogue ({batch}x{hidden})": lambda n: _backward_epilogue(n, Z.copy(), A, db),
        f"output_delta ({batch}x{n_out})": lambda n: _output_delta(n, logits, labels, Y, D),
        f"sum_of_squares ({grad.size})": lambda n: _sumsq(n, grad, route),
        f"sgd update ({grad.size})": lambda n: _sgd(n, p, grad, empty, records[0]),
    }
    inner = max(1, int(2e-2 / max(1e-6, _once(parts["whole step (compiled loop)"]))))
    for fn in parts.values():
        fn(2)
    samples: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.rounds):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn(inner)
            samples[name].append((time.perf_counter() - start) / inner * 1e6)
    print(f"config {args.config}: sizes {sizes}, batch {batch}, float32; medians of {args.rounds} rounds")
    for name, v in samples.items():
        print(f"  {name:34s} {statistics.median(v):9.1f} us")
    step, gemms = (statistics.median(samples[k_]) for k_ in list(parts)[:2])
    print(f"  step minus its GEMMs: {step - gemms:.1f} us")


def _once(fn) -> float:
    fn(1)
    start = time.perf_counter()
    fn(1)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
