"""``fastbp bench``: training-step speed against the GEMM floor, a naive NumPy step and PyTorch.

Every figure is a median over interleaved repetitions (rounds): each round times every candidate once,
in turn, so a slow moment of a shared machine hits all of them alike. Ratios are medians of the per-round
ratios between figures of the same run.

The GEMM floor (DESIGN section 1) is the time of exactly the step's matrix products, with the same
library, dtype and operand layouts as the step, called one by one: forward X W per layer; backward
A_prev^T delta per layer and delta W^T for every layer but the first. No implementation of the same math
can train the step faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Named configs: layer sizes (input first) and batch. GPU-only configs are run only on a GPU backend.
CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"sizes": [64, 128, 128, 10], "batch": 64},
    "mnist": {"sizes": [784, 1024, 1024, 10], "batch": 256},
    "wide": {"sizes": [2048, 2048, 2048, 2048, 2048], "batch": 1024},
    "large": {"sizes": [4096, 4096, 4096, 4096, 4096], "batch": 8192, "gpu_only": True},
    "narrow": {"sizes": [64, 64, 64, 64, 64, 10], "batch": 65536, "gpu_only": True},
}

LR = 1e-3


# ------------------------------------------------------------------------------------------ FLOPs
def gemm_list(sizes: Sequence[int], batch: int) -> list[dict[str, Any]]:
    """The matrix products of one training step, per layer, as (m, k, n) with their role.

    Layer l (1-based) maps n_{l-1} -> n_l. Forward: (B, n_{l-1}) @ (n_{l-1}, n_l). Backward: the weight
    gradient (n_{l-1}, B) @ (B, n_l) for every layer, and the input gradient (B, n_l) @ (n_l, n_{l-1})
    for every layer but the first, whose input needs no gradient.
    """
    gemms = []
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        gemms.append({"layer": l, "role": "forward", "m": batch, "k": n_in, "n": n_out})
        gemms.append({"layer": l, "role": "weight_grad", "m": n_in, "k": batch, "n": n_out})
        if l > 1:
            gemms.append({"layer": l, "role": "input_grad", "m": batch, "k": n_out, "n": n_in})
    return gemms


def gemm_flops(g: dict[str, Any]) -> int:
    return 2 * g["m"] * g["k"] * g["n"]


def step_flops(sizes: Sequence[int], batch: int) -> int:
    """FLOPs of one training step: 6 B n_in n_out per layer, 4 B n_in n_out for the first."""
    return sum(gemm_flops(g) for g in gemm_list(sizes, batch))


def forward_flops(sizes: Sequence[int], batch: int) -> int:
    return sum(2 * batch * a * b for a, b in zip(sizes[:-1], sizes[1:]))


def backward_flops(sizes: Sequence[int], batch: int) -> int:
    return step_flops(sizes, batch) - forward_flops(sizes, batch)


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Candidate:
    """One thing to time: ``fn`` runs one unit of work (it synchronizes a GPU itself)."""

    name: str
    backend: str  # a fastbp backend, 'numpy-naive' or 'torch-cpu' / 'torch-cuda'
    fn: Callable[[], Any]
    flops: int
    floor: str | None = None  # the floor this one is compared with: 'step', 'forward', 'backward'
    family: str = ""  # the thread pools it keeps busy; defaults to ``backend``
    inner: int = 1
    samples: list[float] = field(default_factory=list)
    first_call_s: float | None = None


def _calibrate(c: Candidate, min_time: float) -> None:
    start = time.perf_counter()
    c.fn()
    c.first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    c.fn()
    once = max(time.perf_counter() - start, 1e-7)
    c.inner = max(1, min(1000, int(min_time / once)))


def run_interleaved(cands: list[Candidate], reps: int, min_time: float, settle: float = 0.25) -> None:
    """Calibrate each candidate, then time them in turn, ``reps`` rounds.

    Candidates are grouped by thread-pool family. Idle pool threads keep spinning for a while after their
    last job (OpenBLAS for about 0.1 s, OpenMP runtimes likewise) and steal the cores from whichever
    library runs next, so the run pauses ``settle`` seconds whenever the family changes.
    """
    cands = sorted(cands, key=lambda c: c.family or c.backend)
    last = None
    for c in cands:
        if last is not None and (c.family or c.backend) != last:
            time.sleep(settle)
        _calibrate(c, min_time)
        last = c.family or c.backend
    for _ in range(reps):
        for c in cands:
            family = c.family or c.backend
            if family != last:
                time.sleep(settle)
                last = family
            start = time.perf_counter()
            for _ in range(c.inner):
                c.fn()
            c.samples.append((time.perf_counter() - start) / c.inner)


def summarize(c: Candidate, batch: int) -> dict[str, Any]:
    med = statistics.median(c.samples)
    return {
        "name": c.name, "backend": c.backend, "median_s": med, "min_s": min(c.samples), "max_s": max(c.samples),
        "reps": len(c.samples), "inner": c.inner, "first_call_s": c.first_call_s, "flops": c.flops,
        "gflops": c.flops / med / 1e9 if c.flops else None, "samples_per_s": batch / med, "floor": c.floor,
        "samples_s": list(c.samples),
    }


# ------------------------------------------------------------------------------------------ candidates
def _labels(rng: np.random.Generator, batch: int, n_out: int) -> np.ndarray:
    return rng.integers(0, n_out, batch)


def fastbp_candidates(backend: Any, sizes: list[int], batch: int, dtype: str,
                      ops: bool = True) -> tuple[list[Candidate], dict[str, Any]]:
    """The fastbp candidates for one backend and dtype, and the compile/first-call facts."""
    import fastbp as fb

    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0]))
    y = _labels(rng, batch, sizes[-1])
    sync = backend.synchronize
    info: dict[str, Any] = {}
    warmup = getattr(backend, "warmup", None)
    if warmup is not None:
        start = time.perf_counter()
        warmup()
        info["compile_s"] = time.perf_counter() - start
    cands = []
    for opt_name, opt in (("sgd", fb.optim.SGD(lr=LR)), ("adam", fb.optim.Adam(lr=LR))):
        # peak host memory of building the model and trainer and taking two steps (tracemalloc sees
        # numpy's buffers; a GPU backend's device memory is its own pool)
        tracemalloc.start()
        model = fb.MLP(sizes, activation="relu", dtype=dtype, seed=0, backend=backend)
        trainer = fb.Trainer(model, loss="cross_entropy", optimizer=opt, batch_size=batch)
        Xd, yd = model.prepare_batch(X, y, "cross_entropy")
        trainer._step(Xd, yd)
        trainer._step(Xd, yd)
        info[f"peak_mem_bytes_{opt_name}"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if hasattr(backend, "memory_in_use"):
            backend.synchronize()
            info[f"device_mem_bytes_{opt_name}"] = backend.memory_in_use()

        Xb, yb = backend.asarray(X, dtype), backend.asarray(y)  # the batch as the backend holds it

        def step(trainer=trainer, Xb=Xb, yb=yb):
            trainer.step(Xb, yb)  # the public step, as users call it: checks and the loss read included
            sync()

        cands.append(Candidate(f"step_{opt_name}", backend.name, step, step_flops(sizes, batch), "step"))
        if opt_name == "sgd":
            def internal(trainer=trainer, Xd=Xd, yd=yd):
                trainer._step(Xd, yd)  # the step alone, on prepared arrays
                sync()

            cands.append(Candidate("internal:step_sgd", backend.name, internal, step_flops(sizes, batch), "step"))
    model = fb.MLP(sizes, activation="relu", dtype=dtype, seed=0, backend=backend)
    Xd, yd = model.prepare_batch(X, y, "cross_entropy")

    def forward():
        model.forward(Xd)
        sync()

    cands.append(Candidate("forward", backend.name, forward, forward_flops(sizes, batch), "forward"))
    if ops:
        cands += _op_candidates(model, backend, Xd, yd, sizes, batch)
    return cands, info


def _op_candidates(model: Any, backend: Any, Xd: Any, yd: Any, sizes: list[int], batch: int) -> list[Candidate]:
    """The step split per op: dense_forward over all layers, the output delta, backprop_dense over all
    layers (with the top layer's dense_grads), and the optimizer updates."""
    import fastbp as fb

    sync = backend.synchronize
    trace = model._forward_train(Xd)
    _, delta = model._output_delta(trace, yd, "cross_entropy")
    model._backward(trace, delta)
    # The updates run on a copy of the flat parameter vector (what the Trainer updates), so the model's
    # weights, which the other ops read, stay put.
    copies, grads = [model.flat_parameters().copy()], [model.flat_grad()]
    sgd, adam = fb.optim.SGD(lr=LR), fb.optim.Adam(lr=LR)

    def op_forward():
        model._forward_train(Xd)
        sync()

    def op_delta():
        model._output_delta(trace, yd, "cross_entropy")
        sync()

    def op_backward():
        model._backward(trace, delta)
        sync()

    def op_sgd():
        sgd.step(copies, grads, backend)
        sync()

    def op_adam():
        adam.step(copies, grads, backend)
        sync()

    name = backend.name
    return [
        Candidate("op:dense_forward", name, op_forward, forward_flops(sizes, batch), "forward"),
        Candidate("op:output_delta", name, op_delta, 0),
        Candidate("op:backprop_dense", name, op_backward, backward_flops(sizes, batch), "backward"),
        Candidate("op:update_sgd", name, op_sgd, 0),
        Candidate("op:update_adam", name, op_adam, 0),
    ]


def gemm_operands(g: dict[str, Any], make: Callable[[tuple[int, int]], Any]) -> tuple[Any, Any]:
    """(A, B) for one of ``gemm_list``'s products, laid out as the training step has them: weight_grad
    multiplies a transposed activation view (A_prev^T), input_grad a transposed weight view (W^T).
    ``make(shape)`` returns a new row-major array; it is called for A, then for B."""
    m, k, n = g["m"], g["k"], g["n"]
    if g["role"] == "weight_grad":
        return make((k, m)).T, make((k, n))
    if g["role"] == "input_grad":
        return make((m, k)), make((n, k)).T
    return make((m, k)), make((k, n))


def floor_candidates(backends: list[Any], sizes: list[int], batch: int, dtype: str) -> list[Candidate]:
    """The GEMM floors (step, forward, backward): the step's products with its operand layouts, one call
    each. On the CPU, one set per BLAS library in the process, whichever backend uses it: NumPy's OpenBLAS
    (``np.matmul``), SciPy's (through the numba backend's matmul kernel, as its step calls it) and PyTorch's
    (``torch.mm``), backend 'blas:<library>'; ``add_ratios`` compares CPU times with the fastest. A GPU
    backend has its own floor (its matmul), under its own name."""
    libraries: list[tuple[str, str, Any, Callable[..., Any], Callable[[], None]]] = []
    for bk in backends:
        if bk.name == "cupy":
            libraries.append(("cupy", "cupy", bk.asarray, bk.matmul, bk.synchronize))
    if any(bk.name != "cupy" for bk in backends):
        libraries.append(("blas:numpy", "numpy", np.asarray, lambda a, b, out: np.matmul(a, b, out=out), _nothing))
        numba_bk = next((bk for bk in backends if bk.name == "numba"), None)
        if numba_bk is not None:
            from .backends._numba_blas import ROUTE_NUMBA

            def scipy_matmul(a: Any, b: Any, out: Any, k: Any = numba_bk.k) -> None:
                k.matmul(a, b, out, ROUTE_NUMBA)  # Numba's np.dot, as a compiled kernel calls it

            libraries.append(("blas:scipy", "scipy", np.asarray, scipy_matmul, _nothing))
        if _torch_available():
            import torch

            libraries.append(("blas:torch", "torch", torch.from_numpy,
                              lambda a, b, out: torch.mm(a, b, out=out), _nothing))
    cands = []
    for name, family, wrap, matmul, sync in libraries:
        rng = np.random.default_rng(1)

        def draw(shape: tuple[int, int], rng: np.random.Generator = rng) -> np.ndarray:
            return rng.standard_normal(shape).astype(dtype)

        arrays = []
        for g in gemm_list(sizes, batch):
            a, b = gemm_operands(g, draw)
            arrays.append((g, wrap(a), wrap(b), wrap(np.empty((g["m"], g["n"]), dtype))))

        def make(roles: tuple[str, ...], arrays=arrays, matmul=matmul, sync=sync) -> Callable[[], None]:
            chosen = [(a, b, out) for g, a, b, out in arrays if g["role"] in roles]

            def run():
                for a, b, out in chosen:
                    matmul(a, b, out=out)
                sync()

            return run

        cands += [
            Candidate("floor:step", name, make(("forward", "weight_grad", "input_grad")), step_flops(sizes, batch),
                      family=family),
            Candidate("floor:forward", name, make(("forward",)), forward_flops(sizes, batch), family=family),
            Candidate("floor:backward", name, make(("weight_grad", "input_grad")), backward_flops(sizes, batch),
                      family=family),
        ]
    return cands


def _nothing() -> None:
    pass


def naive_numpy_step(weights: list[list[np.ndarray]], X: np.ndarray, y: np.ndarray, lr: float) -> None:
    """The textbook NumPy step (relu hidden, softmax cross-entropy, SGD), fresh arrays everywhere."""
    acts = [X]
    for i, (W, b) in enumerate(weights):
        z = acts[-1] @ W + b
        acts.append(np.maximum(z, 0) if i < len(weights) - 1 else z)
    z = acts[-1]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1
    delta = (p - onehot) / len(y)
    for i in range(len(weights) - 1, -1, -1):
        W, b = weights[i]
        dW = acts[i].T @ delta
        db = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ W.T) * (acts[i] > 0)
        weights[i][0] = W - lr * dW
        weights[i][1] = b - lr * db


def naive_candidate(sizes: list[int], batch: int, dtype: str) -> Candidate:
    import fastbp as fb

    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    y = _labels(rng, batch, sizes[-1])
    w = fb.MLP(sizes, dtype=dtype, seed=0, backend="numpy").get_weights()
    weights = [[w[2 * i], w[2 * i + 1]] for i in range(len(w) // 2)]
    return Candidate("step_sgd", "numpy-naive", lambda: naive_numpy_step(weights, X, y, LR),
                     step_flops(sizes, batch), "step", family="numpy")


def torch_candidates(sizes: list[int], batch: int, dtype: str, device: str,
                     compile_model: bool = False) -> list[Candidate]:
    """PyTorch eager (or compiled) steps with SGD and Adam, and the forward, on ``device``."""
    import torch

    tdtype = getattr(torch, dtype)
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.standard_normal((batch, sizes[0])), dtype=tdtype, device=device)
    y = torch.tensor(_labels(rng, batch, sizes[-1]), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    label = f"torch-{device}" + ("-compiled" if compile_model else "")

    def build():
        layers: list[Any] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*layers).to(device=device, dtype=tdtype)
        return torch.compile(model) if compile_model else model

    cands = []
    for opt_name, make_opt in (("sgd", lambda ps: torch.optim.SGD(ps, lr=LR)),
                               ("adam", lambda ps: torch.optim.Adam(ps, lr=LR))):
        model = build()
        opt = make_opt(model.parameters())

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
            sync()

        cands.append(Candidate(f"step_{opt_name}", label, step, step_flops(sizes, batch), "step", family="torch"))
    fwd_model = build()

    def forward():
        with torch.no_grad():
            fwd_model(X)
        sync()

    cands.append(Candidate("forward", label, forward, forward_flops(sizes, batch), "forward", family="torch"))
    return cands


# ------------------------------------------------------------------------------------------ the run
def run_config(config: str, sizes: list[int], batch: int, backends: list[Any], dtypes: list[str],
               reps: int, min_time: float, peers: bool = True, torch_compile: bool = False,
               ops: bool = True, settle: float = 0.25, tf32: bool = False) -> list[dict[str, Any]]:
    """Time every candidate of one config; returns the result rows with their ratios."""
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        groups: list[tuple[str, list[Candidate]]] = []
        extra: dict[str, dict[str, Any]] = {}
        for bk in backends:
            cands, info = fastbp_candidates(bk, sizes, batch, dtype, ops=ops)
            groups.append((bk.name, cands))
            extra[bk.name] = info
        groups.append(("floors", floor_candidates(backends, sizes, batch, dtype)))
        peer_cands: list[Candidate] = []
        on_cpu = any(bk.name != "cupy" for bk in backends)
        on_gpu = any(bk.name == "cupy" for bk in backends)
        if peers:
            if on_cpu:
                peer_cands.append(naive_candidate(sizes, batch, dtype))
            if _torch_available():
                devices = (["cpu"] if on_cpu else []) + (["cuda"] if on_gpu and _torch_cuda() else [])
                for device in devices:
                    peer_cands += torch_candidates(sizes, batch, dtype, device)
                    if torch_compile:
                        peer_cands += torch_candidates(sizes, batch, dtype, device, compile_model=True)
        everything = [c for _, cs in groups for c in cs] + peer_cands
        run_interleaved(everything, reps, min_time, settle)
        label = f"{dtype}+tf32" if tf32 and dtype == "float32" else dtype
        summaries = [dict(summarize(c, batch), config=config, dtype=label, sizes=sizes, batch=batch,
                          **extra.get(c.backend, {})) for c in everything]
        rows += add_ratios(summaries)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add, for one config and dtype: ratio_to_floor (this time over its floor: on the CPU the fastest
    BLAS library's, named in floor_library, with the ratio to every library's in ratio_to_floors; on a
    GPU its backend's own), speedup_vs_naive and speedup_vs_torch (the peer's time over this time).

    Each ratio is the median of the per-round ratios where both rows carry their interleaved samples
    (a round times every candidate once, so a slow moment of the machine hits both sides of a ratio
    alike), else the ratio of the medians. ratio_to_floor_iqr is the 25th-75th percentile of the
    per-round ratios to the floor: how far the ratio moved during the run."""
    by_key = {(r["backend"], r["name"]): r for r in rows}
    cpu_floors: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["backend"].startswith("blas:"):
            cpu_floors.setdefault(r["name"], []).append(r)
    for r in rows:
        floor, others = None, []
        if r.get("floor"):
            name = f"floor:{r['floor']}"
            if r["backend"] == "cupy" or r["backend"].startswith("torch-cuda"):
                floor = by_key.get((r["backend"], name))
            elif cpu_floors.get(name):
                others = cpu_floors[name]
                floor = min(others, key=lambda f: f["median_s"])
        r["ratio_to_floor"] = _ratio(r, floor) if floor else None
        r["ratio_to_floor_iqr"] = _paired_quartiles(r, floor) if floor else None
        r["floor_library"] = floor["backend"] if floor else None
        r["ratio_to_floors"] = {f["backend"]: _ratio(r, f) for f in others} or None
        naive = by_key.get(("numpy-naive", "step_sgd"))
        r["speedup_vs_naive"] = (_ratio(naive, r)
                                 if naive and r["name"] == "step_sgd" and r["backend"] != "numpy-naive" else None)
        torch_peer = by_key.get(("torch-cuda" if r["backend"] == "cupy" else "torch-cpu", r["name"]))
        r["speedup_vs_torch"] = (_ratio(torch_peer, r)
                                 if torch_peer and not r["backend"].startswith("torch") else None)
    return rows


def _per_round(a: dict[str, Any], b: dict[str, Any]) -> list[float] | None:
    sa, sb = a.get("samples_s"), b.get("samples_s")
    if not sa or not sb or len(sa) != len(sb):
        return None
    return [x / y for x, y in zip(sa, sb)]


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """a's time over b's: the median of the per-round ratios, or the ratio of medians without samples."""
    ratios = _per_round(a, b)
    return statistics.median(ratios) if ratios else a["median_s"] / b["median_s"]


def _paired_quartiles(row: dict[str, Any], base: dict[str, Any]) -> list[float] | None:
    """The 25th and 75th percentiles of row's time over base's, round by round."""
    ratios = _per_round(row, base)
    if not ratios or len(ratios) < 4:
        return None
    q = statistics.quantiles(ratios, n=4)
    return [q[0], q[2]]


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# ------------------------------------------------------------------------------------------ output
def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'config':7s} {'dtype':7s} {'backend':18s} {'measure':18s} {'median ms':>10s} {'min-max ms':>17s} "
            f"{'samples/s':>10s} {'GFLOP/s':>8s} {'x floor (IQR)':>20s} {'vs naive':>8s} {'vs torch':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"
        lines.append(
            f"{r['config']:7s} {r['dtype']:7s} {r['backend']:18s} {r['name']:18s} {r['median_s'] * 1e3:10.3f} "
            f"{r['min_s'] * 1e3:8.3f}-{r['max_s'] * 1e3:<8.3f} {r['samples_per_s']:10.0f} "
            f"{fmt(r['gflops'], '8.1f')} {_ratio_cell(r):>20s} {fmt(r['speedup_vs_naive'], '8.2f')} "
            f"{fmt(r['speedup_vs_torch'], '8.2f')}")
    import importlib.util

    notes = floor_notes(rows) + table_notes(rows, importlib.util.find_spec("torch") is not None)
    return "\n".join(lines + ([""] + notes if notes else []))


def floor_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Per config and dtype, the CPU floors of each BLAS library: which one is the 'x floor' column's base
    (the fastest), and the public SGD step's ratio to each."""
    notes = []
    for key in dict.fromkeys((r["config"], r["dtype"]) for r in rows):
        floors = [r for r in rows if (r["config"], r["dtype"]) == key and r["backend"].startswith("blas:")
                  and r["name"] == "floor:step"]
        if not floors:
            continue
        fastest = min(floors, key=lambda f: f["median_s"])
        text = ", ".join(f"{f['backend'][5:]} {f['median_s'] * 1e3:.3f}" for f in floors)
        notes.append(f"{key[0]} {key[1]}: CPU GEMM floors of the step (median ms): {text}; "
                     f"x floor is against the fastest, {fastest['backend'][5:]}")
        for r in rows:
            if (r["config"], r["dtype"]) == key and r["name"] == "step_sgd" and r.get("ratio_to_floors") \
                    and not r["backend"].startswith(("torch", "numpy-naive")):
                each = ", ".join(f"{lib[5:]} {v:.3f}" for lib, v in r["ratio_to_floors"].items())
                notes.append(f"  {r['backend']} step_sgd x each floor: {each}")
    return notes


def table_notes(rows: list[dict[str, Any]], torch_installed: bool) -> list[str]:
    """What a reader of the table must know: a time below its GEMM floor (which only a busy or noisy
    machine produces: the floor is part of the step), and why the torch column is empty."""
    notes = []
    below = [r for r in rows if r.get("ratio_to_floor") is not None and r["ratio_to_floor"] < 1.0]
    if below:
        names = ", ".join(sorted({f"{r['config']} {r['backend']} {r['name']}" for r in below})[:4])
        notes.append(f"warning: {len(below)} rows ran below their GEMM floor (x floor < 1.0: {names}); the floor "
                     f"is part of each step, so the machine was busy or the timings noisy: rerun on a quiet "
                     f"machine, with more --reps")
    if not torch_installed:
        notes.append("vs torch: '-' because PyTorch is not installed (pip install torch to compare)")
    return notes


def _ratio_cell(r: dict[str, Any]) -> str:
    if r.get("ratio_to_floor") is None:
        return "-"
    iqr = r.get("ratio_to_floor_iqr")
    return f"{r['ratio_to_floor']:.3f}" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")


def format_latency(rows: list[dict[str, Any]]) -> str:
    """JIT compile time (a backend's warmup) and the first step's latency, apart from steady state."""
    lines = ["compile and first-call latency (not in the figures above), peak host memory of model + step:"]
    for r in rows:
        if r["name"] != "step_sgd" or r["backend"].startswith(("torch", "numpy-naive")):
            continue
        compile_s = f"compile {r['compile_s']:.2f} s, " if r.get("compile_s") is not None else ""
        peak = f", peak host memory {r['peak_mem_bytes_sgd'] / 2**20:.1f} MiB" if "peak_mem_bytes_sgd" in r else ""
        if r.get("device_mem_bytes_sgd") is not None:
            peak += f", device pool {r['device_mem_bytes_sgd'] / 2**20:.1f} MiB"
        lines.append(f"  {r['config']:7s} {r['dtype']:7s} {r['backend']:8s} {compile_s}first step "
                     f"{r['first_call_s'] * 1e3:.1f} ms (steady {r['median_s'] * 1e3:.3f} ms){peak}")
    return "\n".join(lines)


def warnings_for(env: dict[str, Any]) -> list[str]:
    warns = []
    if env["env"].get("OPENBLAS_CORETYPE"):
        warns.append(f"OPENBLAS_CORETYPE={env['env']['OPENBLAS_CORETYPE']} is set: it forces that OpenBLAS kernel "
                     "instead of the best one for this CPU, which slows BLAS and makes timings erratic. Run "
                     "benchmarks as `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE fastbp bench ...`.")
    if env["env"].get("OPENBLAS_L2_SIZE"):
        warns.append(f"OPENBLAS_L2_SIZE={env['env']['OPENBLAS_L2_SIZE']} is set: it overrides OpenBLAS's cache "
                     "blocking; unset it for benchmarks.")
    if not env["blas"]:
        warns.append("threadpoolctl is not installed: the BLAS library and kernel are not reported "
                     "(pip install 'fastbp[bench]').")
    return warns


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """A bar chart of each step's and forward's ratio to its GEMM floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["ratio_to_floor"] is not None and not r["name"].startswith("op:")]
    labels = [f"{r['config']}/{r['dtype'][5:]}\n{r['backend']}\n{r['name']}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(shown)), 4.5))
    ax.bar(range(len(shown)), [r["ratio_to_floor"] for r in shown], color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shown)), labels, fontsize=7)
    ax.set_ylabel("time / GEMM floor (lower is better)")
    ax.set_title("fastbp bench: step and forward time relative to the GEMM floor")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI
def add_bench_parser(sub: Any, sizes_type: Callable[[str], list[int]]) -> None:
    p = sub.add_parser("bench", help="benchmark training steps against the GEMM floor and PyTorch")
    p.add_argument("--config", action="append", choices=sorted(CONFIGS),
                   help="named config (repeatable); default: small and mnist (+ large, narrow on a GPU)")
    p.add_argument("--sizes", type=sizes_type, help="custom layer sizes, e.g. 784,512,10 (with --batch)")
    p.add_argument("--batch", type=int, help="custom batch size")
    p.add_argument("--backend", action="append", help="backend (repeatable); default: every available one")
    p.add_argument("--dtype", action="append", choices=("float32", "float64"), help="default: float32")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per timed sample (default 0.02)")
    p.add_argument("--settle", type=float, default=0.25,
                   help="pause between libraries' thread pools, seconds (default 0.25)")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op split")
    p.add_argument("--no-peers", action="store_true", help="skip the naive NumPy step and PyTorch")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd PyTorch")
    p.add_argument("--tf32", action="store_true",
                   help="float32 GEMMs on TF32 tensor cores (cupy and torch-cuda; the floor too)")
    p.add_argument("--json", metavar="FILE", help="write every figure and the environment as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG chart of the ratios to the floor")


def cmd_bench(args: argparse.Namespace) -> int:
    import fastbp as fb

    from .envinfo import environment, format_environment

    if args.reps < 1 or args.min_time <= 0:
        raise ValueError(f"--reps must be >= 1 and --min-time > 0, got {args.reps} and {args.min_time}")
    names = args.backend or fb.available_backends()
    backends = [fb.backends.resolve_backend(n) for n in names]
    on_gpu = any(bk.name == "cupy" for bk in backends)
    configs: list[tuple[str, list[int], int]] = []
    if args.sizes or args.batch:
        if not (args.sizes and args.batch):
            raise ValueError("--sizes and --batch go together")
        if len(args.sizes) < 2 or args.batch < 1:
            raise ValueError(f"--sizes needs >= 2 widths and --batch > 0, got {args.sizes} and {args.batch}")
        configs.append(("custom", args.sizes, args.batch))
    chosen = args.config or ([] if configs else ["small", "mnist"] + (["large", "narrow"] if on_gpu else []))
    for name in chosen:
        cfg = CONFIGS[name]
        if cfg.get("gpu_only") and not on_gpu:
            raise ValueError(f"config {name!r} is sized for a GPU; run it with the cupy backend")
        configs.append((name, cfg["sizes"], cfg["batch"]))
    dtypes = args.dtype or ["float32"]
    if args.tf32:
        if not on_gpu:
            raise ValueError("--tf32 needs the cupy backend")
        for bk in backends:
            if hasattr(bk, "set_tf32"):
                bk.set_tf32(True)
        if _torch_available():
            import torch

            torch.backends.cuda.matmul.allow_tf32 = True

    env = environment()
    print(format_environment(env))
    warns = warnings_for(env)
    for w in warns:
        print(f"warning: {w}")
    rows: list[dict[str, Any]] = []
    for name, sizes, batch in configs:
        print(f"\nconfig {name}: sizes {sizes}, batch {batch}, dtypes {dtypes}, backends {names} ...", flush=True)
        rows += run_config(name, sizes, batch, backends, dtypes, args.reps, args.min_time,
                           peers=not args.no_peers, torch_compile=args.torch_compile, ops=not args.no_ops,
                           settle=args.settle, tf32=args.tf32)
    print()
    print(format_table(rows))
    print()
    print(format_latency(rows))
    if args.json:
        payload = {"schema": "fastbp-bench/1", "command": "fastbp bench", "argv": vars(args),
                   "environment": env, "warnings": warns, "results": rows}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"\nwrote {os.path.abspath(args.json)}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {os.path.abspath(args.plot)}")
    return 0


__all__ = ["CONFIGS", "Candidate", "gemm_list", "step_flops", "forward_flops", "backward_flops",
           "add_ratios", "run_config", "format_table", "naive_numpy_step"]
