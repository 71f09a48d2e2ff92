"""Where the NumPy reference backend's training step spends its time, against the textbook NumPy step:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/numpy_reference_parts.py [--config small]

Times, interleaved in one process (medians over rounds, microseconds, and each one's per-round ratio to
the textbook step; SGD, cross-entropy, relu):

- ``naive``: the textbook NumPy step of ``fastbp bench`` (fresh arrays everywhere; no loss value, no
  checks);
- ``Trainer.step`` (public) and ``Trainer._step`` (internal) on the numpy backend;
- the reference's ops alone: the forward pass, the output delta with its loss, the backward pass, the
  gradient's sum of squares with the host read of it and the loss, the optimizer's update;
- two hand-written steps that do all the work the reference does (the loss value, the gradient's sum of
  squares read with it, SGD on one flat vector, buffers reused) with no library around them: ``lean``
  with the reference's operations, and ``lean, bias folded``, where each layer's input carries a column
  of ones, so the forward GEMM adds the bias (W and b lie together as one (n_in + 1, n_out) block) and the
  weight-gradient GEMM yields the bias gradient. They bound what a NumPy step doing the reference's work
  can reach; both are checked against the reference's loss and gradient before timing;
- ``Trainer.step, folded gradients``: the public step of a numpy backend whose gradient phase is that
  bias-folded pass in one op (``Backend.train_gradients``, plans kept per model and batch size, the loss
  and g' through the reference's own ops): the public step's cost once the per-op dispatch is gone;
- ``Trainer.step, batch not checked``: the public step of a model whose ``prepare_batch`` returns the
  batch as given, unchecked: beside ``Trainer.step (public)``, what the batch check costs inside the step
  (more than the check alone: it runs between two steps' BLAS calls).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

import fastbp as fb
from fastbp.activations import ACTIVATIONS
from fastbp.backends.numpy_backend import NumpyBackend
from fastbp.bench import CONFIGS, naive_candidate
from fastbp.bench.flops import LR
from fastbp.envinfo import blas_info


def blocks(flat: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Per layer the (n_in + 1, n_out) block [W; b] of a flat parameter (or gradient) vector, as views."""
    out, o = [], 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        out.append(flat[o:o + (a + 1) * b].reshape(a + 1, b))
        o += (a + 1) * b
    return out


def lean_steps(model: fb.MLP, X: np.ndarray, y: np.ndarray, lr: float) -> dict[str, Callable[[], float]]:
    """The two hand-written steps on copies of ``model``'s parameters: name -> step (returns the loss)."""
    sizes, B, dt = model.sizes, X.shape[0], model.dtype
    L, n_out = len(sizes) - 1, sizes[-1]
    starts = np.arange(B) * n_out
    D = [np.empty((B, s), dt) for s in sizes[1:]]
    masks = [np.empty((B, s), dt) for s in sizes[1:]]
    zeros = [np.zeros((B, s), dt) for s in sizes[1:]]
    ones_b, ones_c = np.ones(B, dt), np.ones((n_out, 1), dt)
    T = np.empty((n_out, B), dt)

    def top_delta(z: np.ndarray) -> tuple[float, np.ndarray]:
        if n_out > 32 or B < 32:
            m = z.max(axis=1, keepdims=True)
        else:
            np.copyto(T, z.T)
            m = T.max(axis=0)[:, None]
        E = np.subtract(z, m, out=D[-1])
        np.exp(E, out=E)
        s = np.matmul(E, ones_c)
        at = y + starts
        rows = np.log(s).reshape(-1)
        rows += m.reshape(-1)
        rows -= z.take(at)
        value = rows.sum() / B
        E *= np.divide(1.0 / B, s, out=s)
        E.reshape(-1)[at] -= 1.0 / B
        return value, E

    def finish(value: float, P: np.ndarray, G: np.ndarray, work: np.ndarray) -> float:
        sq = np.vdot(G, G)
        value, sq = float(value), float(sq)  # the host read of both, as the reference's check
        np.multiply(G, lr, out=work)
        P -= work
        return value

    # ---- lean: the reference's layout and operations
    P1, G1 = model.flat_parameters().copy(), np.empty(model.n_params, dt)
    work1 = np.empty_like(P1)
    PB, GB = blocks(P1, sizes), blocks(G1, sizes)
    A = [X] + [np.empty((B, s), dt) for s in sizes[1:]]

    def lean() -> float:
        for i in range(L):
            Z = np.matmul(A[i], PB[i][:-1], out=A[i + 1])
            Z += PB[i][-1]
            if i < L - 1:
                np.maximum(Z, zeros[i], out=Z)
        value, delta = top_delta(A[-1])
        for i in range(L - 1, -1, -1):
            np.matmul(A[i].T, delta, out=GB[i][:-1])
            np.matmul(ones_b, delta, out=GB[i][-1])
            if i > 0:
                below = np.matmul(delta, PB[i][:-1].T, out=D[i - 1])
                np.greater(A[i], 0, out=masks[i - 1])
                below *= masks[i - 1]
                delta = below
        return finish(value, P1, G1, work1)

    # ---- lean, bias folded: inputs [A | 1] times [W; b]
    P2, G2 = model.flat_parameters().copy(), np.empty(model.n_params, dt)
    work2 = np.empty_like(P2)
    WB, GW = blocks(P2, sizes), blocks(G2, sizes)
    Aa = [np.ones((B, s + 1), dt) for s in sizes[:-1]]
    Z = [np.empty((B, s), dt) for s in sizes[1:]]

    def folded() -> float:
        Aa[0][:, :-1] = X
        for i in range(L):
            np.matmul(Aa[i], WB[i], out=Z[i])
            if i < L - 1:
                np.maximum(Z[i], zeros[i], out=Aa[i + 1][:, :-1])
        value, delta = top_delta(Z[-1])
        for i in range(L - 1, -1, -1):
            np.matmul(Aa[i].T, delta, out=GW[i])
            if i > 0:
                below = np.matmul(delta, WB[i][:-1].T, out=D[i - 1])
                np.greater(Aa[i][:, :-1], 0, out=masks[i - 1])
                below *= masks[i - 1]
                delta = below
        return finish(value, P2, G2, work2)

    # both must compute the reference's loss and gradient (then put the parameters back)
    want_loss, want_grads = model.loss_and_grads(X, y, "cross_entropy")
    want = np.concatenate([g.ravel() for g in want_grads])
    tol = 1e-4 if dt == np.float32 else 1e-10
    for name, fn, P, G in (("lean", lean, P1, G1), ("lean, bias folded", folded, P2, G2)):
        before = P.copy()
        loss = fn()
        np.testing.assert_allclose(loss, want_loss, rtol=tol, err_msg=name)
        np.testing.assert_allclose(G, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=name)
        P[...] = before
    return {"lean": lean, "lean, bias folded": folded}


class FoldedGradients(NumpyBackend):
    """The numpy backend with the gradient phase as one bias-folded pass: each layer's input carries a
    column of ones, times the (n_in + 1, n_out) block [W; b] of the flat parameters (the weight-gradient
    GEMM gives [dW; db] into the flat gradient's block); the output delta and each g' are the reference's."""

    name = "numpy-folded"

    def __init__(self) -> None:
        self._plans: dict[tuple[int, int], dict[str, list[np.ndarray]]] = {}

    def _plan(self, model: fb.MLP, B: int) -> dict[str, list[np.ndarray]]:
        plan = self._plans.get((id(model), B))
        if plan is None:
            sizes, dt = model.sizes, model.dtype
            Aa = [np.ones((B, s + 1), dt) for s in sizes[:-1]]
            plan = self._plans[(id(model), B)] = {
                "WB": blocks(model.flat_parameters(), sizes), "GB": blocks(model.flat_grad(), sizes), "Aa": Aa,
                "A": [a[:, :-1] for a in Aa], "Z": [np.empty((B, s), dt) for s in sizes[1:]],
                "D": [np.empty((B, s), dt) for s in sizes[1:]]}
        return plan

    def train_gradients(self, model, X, y, loss, stats_out=None):  # type: ignore[no-untyped-def]
        p = self._plan(model, X.shape[0])
        WB, Aa, A, Z, D = p["WB"], p["Aa"], p["A"], p["Z"], p["D"]
        L = len(WB)
        A[0][...] = X
        for i, layer in enumerate(model.layers):
            z = np.matmul(Aa[i], WB[i], out=Z[i])
            if i < L - 1:
                act = ACTIVATIONS[layer.activation]
                act.forward(np, z, A[i + 1], self._forward_work(act, z))
        value, delta = self.output_delta(Z[-1], y, loss, delta_out=D[-1], stats_out=stats_out)
        for i in range(L - 1, -1, -1):
            np.matmul(Aa[i].T, delta, out=p["GB"][i])
            if i > 0:
                below = np.matmul(delta, WB[i][:-1].T, out=D[i - 1])
                act = ACTIVATIONS[model.layers[i - 1].activation]
                act.backward(np, below, Z[i - 1], A[i], self._scratch("activation", below.shape, below.dtype),
                             self._scratch("activation2", below.shape, below.dtype))
                delta = below
        return value, Z[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=[c for c in CONFIGS if not CONFIGS[c].get("gpu_only")])
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    sizes, batch = CONFIGS[args.config]["sizes"], CONFIGS[args.config]["batch"]
    rng = np.random.default_rng(0)
    model = fb.MLP(sizes, dtype=args.dtype, seed=0, backend="numpy")
    X = rng.standard_normal((batch, sizes[0])).astype(args.dtype)
    y = rng.integers(0, sizes[-1], batch)
    Xd, yd = model.prepare_batch(X, y, "cross_entropy")
    lean = lean_steps(model, Xd, yd, LR)
    trainer = fb.Trainer(model, optimizer=fb.optim.SGD(lr=LR), batch_size=batch)
    trainer.step(Xd, yd)
    bk = model.backend
    trace = model._forward_train(Xd)
    value, delta = model._output_delta(trace, yd, "cross_entropy")
    model._backward(trace, delta)
    grad, params, opt = model.flat_grad(), [model.flat_parameters().copy()], fb.optim.SGD(lr=LR)
    folded = fb.MLP(sizes, dtype=args.dtype, seed=0, backend=FoldedGradients())
    folded_trainer = fb.Trainer(folded, optimizer=fb.optim.SGD(lr=LR), batch_size=batch)
    unchecked = fb.MLP(sizes, dtype=args.dtype, seed=0, backend="numpy")
    unchecked.prepare_batch = lambda X, y, loss, guard=None, step=0: (X, y)  # type: ignore[method-assign]
    unchecked_trainer = fb.Trainer(unchecked, optimizer=fb.optim.SGD(lr=LR), batch_size=batch)
    want_loss, want_grads = fb.MLP(sizes, dtype=args.dtype, seed=0).loss_and_grads(Xd, yd, "cross_entropy")
    got_loss, _ = folded.backend.train_gradients(folded, Xd, yd, "cross_entropy")
    tol = 1e-4 if args.dtype == "float32" else 1e-10
    want = np.concatenate([g.ravel() for g in want_grads])
    np.testing.assert_allclose(float(got_loss), want_loss, rtol=tol)
    np.testing.assert_allclose(folded.flat_grad(), want, rtol=tol, atol=tol * np.abs(want).max())
    parts: dict[str, Callable[[], object]] = {
        "naive (textbook step)": naive_candidate(sizes, batch, args.dtype).fn,
        "Trainer.step (public)": lambda: trainer.step(Xd, yd),
        "Trainer._step (internal)": lambda: trainer._step(Xd, yd),
        "  forward": lambda: model._forward_train(Xd),
        "  output delta + loss": lambda: model._output_delta(trace, yd, "cross_entropy"),
        "  backward": lambda: model._backward(trace, delta),
        "  sum of squares + host read": lambda: bk.to_floats(value, bk.sum_of_squares(grad)),
        "  SGD update": lambda: opt.step(params, [grad], bk),
        **{name: fn for name, fn in lean.items()},
        "Trainer.step, folded gradients": lambda: folded_trainer.step(Xd, yd),
        "Trainer.step, batch not checked": lambda: unchecked_trainer.step(Xd, yd),
    }
    first = parts["Trainer._step (internal)"]
    start = time.perf_counter()
    first()
    inner = max(1, int(2e-2 / max(1e-6, time.perf_counter() - start)))
    samples: dict[str, list[float]] = {name: [] for name in parts}
    for fn in parts.values():
        for _ in range(inner):
            fn()
    for _ in range(args.rounds):
        for name, fn in parts.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner * 1e6)
    print(f"config {args.config}: sizes {sizes}, batch {batch}, {args.dtype}; medians of {args.rounds} rounds")
    for lib in blas_info():
        print(f"  BLAS: {lib.get('internal_api')} {lib.get('version')} kernel={lib.get('architecture')} "
              f"threads={lib.get('num_threads')} ({lib.get('filepath', '').rsplit('/', 1)[-1]})")
    naive = samples["naive (textbook step)"]
    print(f"  {'':34s} {'median us':>10s} {'min us':>9s}  naive / this")
    for name, v in samples.items():
        ratio = statistics.median(a / b for a, b in zip(naive, v))
        print(f"  {name:34s} {statistics.median(v):10.1f} {min(v):9.1f}  {ratio:6.3f}")


if __name__ == "__main__":
    main()
