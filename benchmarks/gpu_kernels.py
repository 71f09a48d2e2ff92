"""Where a GPU step's time goes around its GEMMs: the cupy backend's ops timed one by one on the step's own
arrays (CUDA events, the median of rounds), each with the bytes it must move and the bandwidth that makes,
against a device-to-device copy of the largest activation (the memory speed a pass can reach).

An op's kernels are its time less its GEMMs' (each GEMM is timed alone, with the same operands): the
forward epilogue (bias + activation), the backward epilogue (g' and the bias gradient), the output delta,
the gradient's sum of squares, the update (with the 16-bit copy in mixed precision) and the batch check.

    PYTHONPATH=. python3 benchmarks/gpu_kernels.py --config large --compute-dtype bfloat16
    PYTHONPATH=. python3 benchmarks/gpu_kernels.py --sizes 784,1024,10 --batch 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastbp as fb  # noqa: E402
from fastbp.bench.flops import CONFIGS  # noqa: E402


def timer(bk: Any, reps: int, rounds: int) -> Callable[[Callable[[], Any]], float]:
    """A function timing ``fn`` in milliseconds per call: CUDA events where CuPy has them, else the host
    clock around a synchronize (the emulated CuPy)."""
    cuda = bk.xp.cuda
    events = hasattr(cuda, "Event") and hasattr(cuda, "get_elapsed_time")

    def run(fn: Callable[[], Any]) -> float:
        fn()
        bk.synchronize()
        times = []
        for _ in range(rounds):
            if events:
                start, end = cuda.Event(), cuda.Event()
                start.record()
                for _ in range(reps):
                    fn()
                end.record()
                end.synchronize()
                times.append(cuda.get_elapsed_time(start, end) / reps)
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                bk.synchronize()
                times.append((time.perf_counter() - t0) * 1e3 / reps)
        return statistics.median(times)

    return run


def measure(backend: str, sizes: list[int], batch: int, compute: str | None, optimizer: str, reps: int,
            rounds: int) -> list[dict[str, Any]]:
    bk = fb.backends.resolve_backend(backend)
    model = fb.MLP(sizes, activation="relu", dtype="float32", seed=0, backend=bk, compute_dtype=compute)
    opt = fb.optim.Adam(1e-3) if optimizer == "adam" else fb.optim.SGD(1e-3)
    trainer = fb.Trainer(model, optimizer=opt, batch_size=batch)
    rng = np.random.default_rng(0)
    Xd, yd = model.prepare_batch(rng.standard_normal((batch, sizes[0])), rng.integers(0, sizes[-1], batch),
                                 "cross_entropy")
    trainer._step(Xd, yd)
    time_ms = timer(bk, reps, rounds)
    item = np.dtype(model.compute_dtype).itemsize
    rows: list[dict[str, Any]] = []

    def add(name: str, ms: float, nbytes: float | None) -> None:
        rows.append({"name": name, "ms": ms, "bytes": nbytes})

    widest = max(sizes[1:])
    a, b = bk.empty((batch, widest), model.compute_dtype), bk.empty((batch, widest), model.compute_dtype)
    add("copy (memory speed)", time_ms(lambda: bk.xp.copyto(b, a)), 2 * a.size * item)
    add("step (internal)", time_ms(lambda: trainer._step(Xd, yd)), None)

    trace = model._forward_train(Xd)
    params = model._compute_params
    ws = trace.ws
    for i, layer in enumerate(model.layers):
        X_in, (W, bias) = trace.a[i], params[i]
        gemm = time_ms(lambda X_in=X_in, W=W, i=i: bk.matmul(X_in, W, out=ws.Z[i]))
        whole = time_ms(lambda X_in=X_in, W=W, bias=bias, i=i, act=layer.activation: bk.dense_forward(
            X_in, W, bias, act, A_out=ws.A[i], Z_out=ws.Z[i]))
        add(f"layer {i} forward GEMM", gemm, None)
        add(f"layer {i} forward epilogue", whole - gemm, 2 * batch * layer.n_out * item)
    trace = model._forward_train(Xd)
    _, delta = model._output_delta(trace, yd, "cross_entropy")
    add("output delta + loss", time_ms(lambda: model._output_delta(trace, yd, "cross_entropy")),
        2 * delta.size * item)
    grads = model.grad_buffers()
    top = len(model.layers) - 1
    for i in range(top - 1, -1, -1):
        W_next = params[i + 1][0]
        d_next = trace.ws.delta[i + 1] if i + 1 < top else delta
        gemms = time_ms(lambda d_next=d_next, W_next=W_next, i=i: (
            bk.matmul(d_next, W_next.T, out=trace.ws.delta[i]),
            bk.matmul(trace.a[i].T, trace.ws.delta[i], out=grads[2 * i])))
        whole = time_ms(lambda d_next=d_next, W_next=W_next, i=i: bk.backprop_dense(
            d_next, W_next, trace.Z[i], trace.a[i + 1], trace.a[i], model.layers[i].activation,
            delta_out=trace.ws.delta[i], dW_out=grads[2 * i], db_out=grads[2 * i + 1]))
        add(f"layer {i} backward GEMMs", gemms, None)
        add(f"layer {i} backward epilogue", whole - gemms, 3 * batch * model.layers[i].n_out * item)
    grad = model.flat_grad()
    add("gradient sum of squares", time_ms(lambda: bk.sum_of_squares(grad)), grad.size * item)
    flat = model.flat_parameters()
    copies = [model._flat_compute] if model.mixed else None
    slots = {"sgd": 0, "adam": 2}[optimizer]
    update_bytes = flat.size * (8 + item + 8 * slots + (item if model.mixed else 0))
    add(f"{optimizer} update", time_ms(lambda: opt.step([flat], [grad], bk, copies=copies)), update_bytes)
    guard = bk.guard_state()
    add("batch check", time_ms(lambda: bk.check_batch(Xd, yd, "cross_entropy", sizes[-1], guard, 1)),
        Xd.size * item + yd.size * 8)
    speed = rows[0]["bytes"] / rows[0]["ms"]
    for row in rows:
        if row["bytes"]:
            row["GB/s"] = row["bytes"] / row["ms"] / 1e6
            row["of copy speed"] = row["bytes"] / row["ms"] / speed
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="large")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], help="instead of --config")
    p.add_argument("--batch", type=int)
    p.add_argument("--compute-dtype", choices=("bfloat16", "float16"), default=None)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--backend", default="cupy")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.backend.startswith("cupy-emulated"):
        from fastbp.testing import fake_cupy

        fake_cupy.register()
    sizes = args.sizes or CONFIGS[args.config]["sizes"]
    batch = args.batch or CONFIGS[args.config]["batch"]
    rows = measure(args.backend, sizes, batch, args.compute_dtype, args.optimizer, args.reps, args.rounds)
    print(f"sizes {sizes}, batch {batch}, float32 weights computing in {args.compute_dtype or 'float32'}, "
          f"{args.optimizer}, backend {args.backend}")
    print(f"{'kernel(s)':32s} {'ms':>9s} {'MB moved':>10s} {'GB/s':>8s} {'of copy':>8s}")
    for r in rows:
        moved = f"{r['bytes'] / 1e6:10.1f}" if r["bytes"] else f"{'':10s}"
        speed = f"{r['GB/s']:8.0f} {r['of copy speed']:8.2f}" if r["bytes"] else ""
        print(f"{r['name']:32s} {r['ms']:9.4f} {moved} {speed}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "batch": batch, "compute_dtype": args.compute_dtype,
                                               "optimizer": args.optimizer, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
