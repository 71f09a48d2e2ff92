"""The numba whole-step kernel's gradient phase against the same phase with each hidden layer's delta kept
transposed, as an (n, B) array:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/numba_backward_layout.py [--config small]

The kernel (``_numba_kernels.gradients``) keeps every delta in rows, (B, n), so eq. (2)'s product is
``delta W^T``: a GEMM with a transposed operand, which OpenBLAS runs slower than the plain one (at 32 x 128
times 128 x 128, float32, one thread: 19 us against 10). Kept transposed, the product is ``W delta^T``, a
plain GEMM, but then the weight gradient takes two transposed operands and the pass that applies g' and
sums the bias gradient reads the activations across their rows. This script times both phases, each in a
compiled loop, interleaved, for a config's batch on BLAS's threads and for one part of the split step
(half the batch, BLAS on one thread), after checking that both give the same loss and gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from numba import njit

import fastbp as fb
from fastbp import envinfo
from fastbp.backends import _numba_kernels as k
from fastbp.backends import numba_backend
from fastbp.backends._numba_blas import blas_threads, gemm
from fastbp.bench import CONFIGS


@njit(error_model="numpy")
def transposed_epilogue(deltaT, A, code, db):
    """``backward_epilogue`` on a transposed delta (n, B): deltaT[j, i] *= g'(A[i, j]) and db[j] = its row
    sum, summed in the kernel's order (over the batch, in float64). Rows of A outer, so A is read in order."""
    n, B = deltaT.shape
    acc = np.zeros(n)
    zero = deltaT.dtype.type(0)
    for i in range(B):
        a_row = A[i]
        for j in range(n):
            d = deltaT[j, i] if code != k.RELU or a_row[j] > 0 else zero
            deltaT[j, i] = d
            acc[j] += d
    for j in range(n):
        db[j] = acc[j]


@njit(error_model="numpy")
def gradients_transposed(X, y_labels, Y, loss, flat, grad, layout, codes, ws, top, route, rows):
    """``_numba_kernels.gradients`` (relu or identity hidden layers, two layers or more) with the hidden
    deltas kept as (n, B)."""
    B, L = X.shape[0], layout.shape[0]
    a_at, d_at = k.workspace_offsets(B, layout)
    k.forward_layers(X, flat, layout, codes, ws, a_at, top, route)
    n_top = layout[L - 1, 3]
    top_delta = ws[d_at[L - 1]:d_at[L - 1] + B * n_top].reshape((B, n_top))
    value = k.output_delta(top, y_labels, Y, loss, top_delta, rows)
    b_top = layout[L - 1, 1]
    k.backward_epilogue(top_delta, top_delta, k.IDENTITY, grad[b_top:b_top + n_top])
    # the top layer: its delta stays in rows (the loss pass writes it so); the product below it reads it
    # transposed, a view
    l = L - 1
    w0, n_in, n_out = layout[l, 0], layout[l, 2], layout[l, 3]
    A_in = ws[a_at[l - 1]:a_at[l - 1] + B * n_in].reshape((B, n_in))
    gemm(A_in.T, top_delta, grad[w0:w0 + n_in * n_out].reshape((n_in, n_out)), route)  # eq. (3)
    deltaT = ws[d_at[l - 1]:d_at[l - 1] + B * n_in].reshape((n_in, B))
    gemm(flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)), top_delta.T, deltaT, route)  # eq. (2): W delta^T
    transposed_epilogue(deltaT, A_in, codes[l - 1], grad[layout[l - 1, 1]:layout[l - 1, 1] + n_in])
    for l in range(L - 2, -1, -1):
        w0, n_in, n_out = layout[l, 0], layout[l, 2], layout[l, 3]
        A_in = ws[a_at[l - 1]:a_at[l - 1] + B * n_in].reshape((B, n_in)) if l > 0 else X
        gemm(A_in.T, deltaT.T, grad[w0:w0 + n_in * n_out].reshape((n_in, n_out)), route)  # eq. (3)
        if l > 0:
            belowT = ws[d_at[l - 1]:d_at[l - 1] + B * n_in].reshape((n_in, B))
            gemm(flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)), deltaT, belowT, route)  # eq. (2): W delta^T
            transposed_epilogue(belowT, A_in, codes[l - 1], grad[layout[l - 1, 1]:layout[l - 1, 1] + n_in])
            deltaT = belowT
    return value


@njit
def _loop(n, transposed, X, y_labels, Y, flat, grad, layout, codes, ws, top, route):
    for _ in range(n):
        if transposed:
            gradients_transposed(X, y_labels, Y, 0, flat, grad, layout, codes, ws, top, route, X.shape[0])
        else:
            k.gradients(X, y_labels, Y, 0, flat, grad, layout, codes, ws, top, route, X.shape[0])


def compare(sizes: list[int], batch: int, dtype: str, threads: int, rounds: int) -> tuple[float, float, float, bool]:
    """(rows-layout us, transposed us, median per-round ratio transposed / rows, bit-identical gradients)."""
    model = fb.MLP(sizes, dtype=dtype, seed=0, backend="numba")
    if len(sizes) < 3 or any(layer.activation not in ("relu", "identity") for layer in model.layers):
        raise SystemExit("this comparison covers two layers or more, relu or identity")
    route = model.backend.blas_route
    layout, codes = numba_backend._layout(model)
    ws = numba_backend._Plan(model, batch, route, parts=1).ws[0]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    labels = rng.integers(0, sizes[-1], batch)
    Y = np.empty((0, 0), dtype)
    flat, grad, top = model.flat_parameters(), model.flat_grad(), np.empty((batch, sizes[-1]), dtype)
    before = blas_threads(threads, route)  # a compiled function, callable from Python
    try:
        want = k.gradients(X, labels, Y, 0, flat, grad, layout, codes, ws, top, route, batch)
        want_grad = grad.copy()
        got = gradients_transposed(X, labels, Y, 0, flat, grad, layout, codes, ws, top, route, batch)
        tol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol)
        np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol * np.abs(want_grad).max())
        same = bool(np.array_equal(grad, want_grad))
        start = time.perf_counter()
        _loop(1, False, X, labels, Y, flat, grad, layout, codes, ws, top, route)
        inner = max(1, int(2e-2 / max(1e-6, time.perf_counter() - start)))
        samples: dict[bool, list[float]] = {False: [], True: []}
        for transposed in (False, True):
            _loop(inner, transposed, X, labels, Y, flat, grad, layout, codes, ws, top, route)
        for _ in range(rounds):
            for transposed in (False, True):
                start = time.perf_counter()
                _loop(inner, transposed, X, labels, Y, flat, grad, layout, codes, ws, top, route)
                samples[transposed].append((time.perf_counter() - start) / inner * 1e6)
    finally:
        blas_threads(before, route)
    ratio = statistics.median(t / r for r, t in zip(samples[False], samples[True]))
    return statistics.median(samples[False]), statistics.median(samples[True]), ratio, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpu = [c for c in CONFIGS if not CONFIGS[c].get("gpu_only")]
    parser.add_argument("--config", action="append", choices=cpu, help="repeatable (default: small and mnist)")
    parser.add_argument("--dtype", action="append", choices=("float32", "float64"), help="repeatable (float32)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    for b in envinfo.blas_info():
        print(f"BLAS loaded: {b['internal_api']} {b['version']} kernel={b['architecture']} threads={b['num_threads']}")
    print(f"the numba kernels' BLAS: {envinfo.numba_blas()}")
    print(f"{'config':8s} {'dtype':8s} {'rows':>5s} {'BLAS':>8s} {'rows us':>10s} {'transposed us':>14s} "
          f"{'transposed / rows':>18s}  gradient")
    for name in args.config or ["small", "mnist"]:
        sizes, batch = CONFIGS[name]["sizes"], CONFIGS[name]["batch"]
        for dtype in args.dtype or ["float32"]:
            # the batch whole on BLAS's threads, and one half of the split step (BLAS on one thread)
            for rows, threads, label in ((batch, 0, "threads"), (batch // 2, 1, "1 thread")):
                rows_us, t_us, ratio, same = compare(sizes, rows, dtype, threads, args.rounds)
                print(f"{name:8s} {dtype:8s} {rows:5d} {label:>8s} {rows_us:10.1f} {t_us:14.1f} {ratio:18.3f}  "
                      f"{'bit-identical' if same else 'within tolerance'}")


if __name__ == "__main__":
    main()
