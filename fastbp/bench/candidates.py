"""What is timed: fastbp's steps, forward and ops per backend, the GEMM floors of every BLAS library,
the naive NumPy step and PyTorch."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from ..dtypes import HALF_DTYPES, accumulator_dtype, half_dtype
from .flops import LR, backward_flops, forward_flops, gemm_list, step_flops
from .timing import Candidate


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
    # a 16-bit dtype is mixed precision: float32 master weights, computing in it
    dtype, compute = ("float32", dtype) if dtype in HALF_DTYPES else (dtype, None)
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
        model = fb.MLP(sizes, activation="relu", dtype=dtype, seed=0, backend=backend, compute_dtype=compute)
        trainer = fb.Trainer(model, loss="cross_entropy", optimizer=opt, batch_size=batch)
        Xd, yd = model.prepare_batch(X, y, "cross_entropy")
        trainer._step(Xd, yd)
        trainer._step(Xd, yd)
        info[f"peak_mem_bytes_{opt_name}"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if hasattr(backend, "step_route"):
            info["step_route"] = backend.step_route(model, batch)
        if hasattr(backend, "memory_in_use"):
            backend.synchronize()
            info[f"device_mem_bytes_{opt_name}"] = backend.memory_in_use()

        def step(trainer=trainer, Xd=Xd, yd=yd):
            # the public step, as users call it on a batch held by the backend: checks and the loss read included
            trainer.step(Xd, yd)
            sync()

        cands.append(Candidate(f"step_{opt_name}", backend.name, step, step_flops(sizes, batch), "step"))
        if opt_name == "sgd":
            def internal(trainer=trainer, Xd=Xd, yd=yd):
                trainer._step(Xd, yd)  # the step alone, on prepared arrays
                sync()

            cands.append(Candidate("internal:step_sgd", backend.name, internal, step_flops(sizes, batch), "step"))
    if backend.graph_support() is None:
        cands.append(_graph_step(backend, sizes, batch, X, y, dtype, compute))
    model = fb.MLP(sizes, activation="relu", dtype=dtype, seed=0, backend=backend, compute_dtype=compute)
    Xd, yd = model.prepare_batch(X, y, "cross_entropy")

    if hasattr(backend, "forward_route"):
        info["forward_route"] = backend.forward_route(model, batch)

    def forward():
        model.forward(Xd)
        sync()

    cands.append(Candidate("forward", backend.name, forward, forward_flops(sizes, batch), "forward"))
    if ops:
        cands += _op_candidates(model, backend, Xd, yd, sizes, batch)
    return cands, info


def _graph_step(backend: Any, sizes: list[int], batch: int, X: Any, y: Any, dtype: str, compute: Any) -> Candidate:
    """The Adam step as ``fit`` runs it with ``cuda_graphs=True``: a replay of the captured step (the host's
    per-step numbers copied to the device, one graph launch, the step's statistics copied out), on fit's
    stream, waited for. Its name says so: graph:step_adam."""
    import fastbp as fb

    model = fb.MLP(sizes, activation="relu", dtype=dtype, seed=0, backend=backend, compute_dtype=compute)
    trainer = fb.Trainer(model, loss="cross_entropy", optimizer=fb.optim.Adam(lr=LR), batch_size=batch,
                         cuda_graphs=True)
    Xd, yd = model.prepare_batch(X, y, "cross_entropy")
    graphs = trainer._graphs
    stats = backend.zeros((2,), accumulator_dtype(model.dtype))

    def step() -> None:
        with graphs.session(None):  # waits for the stream at its end
            graphs.step(Xd, yd, stats)

    for _ in range(2):  # an eager step, then the capture and its first replay
        step()
    if not graphs.replays:
        raise RuntimeError(f"the training step did not run as a CUDA graph: {trainer.graph_status}")
    return Candidate("graph:step_adam", backend.name, step, step_flops(sizes, batch), "step")


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
    np_dtype = half_dtype(dtype) if dtype in HALF_DTYPES else np.dtype(dtype)
    for bk in backends:
        if bk.name == "cupy":  # 16-bit operands go over as float32 and are rounded on the device
            libraries.append(("cupy", "cupy", lambda a, bk=bk: bk.asarray(a.astype(np.float32)).astype(np_dtype),
                              bk.matmul, bk.synchronize))
    if any(bk.name != "cupy" for bk in backends) and dtype not in HALF_DTYPES:  # 16 bits: GPUs alone
        libraries.append(("blas:numpy", "numpy", np.asarray, lambda a, b, out: np.matmul(a, b, out=out), _nothing))
        numba_bk = next((bk for bk in backends if bk.name == "numba"), None)
        if numba_bk is not None:
            from ..backends._numba_blas import ROUTE_NUMBA

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
            return rng.standard_normal(shape).astype(np_dtype)

        arrays = []
        for g in gemm_list(sizes, batch):
            a, b = gemm_operands(g, draw)
            arrays.append((g, wrap(a), wrap(b), wrap(np.zeros((g["m"], g["n"]), np_dtype))))

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
    """PyTorch eager (or compiled) steps with SGD and Adam, and the forward, on ``device``; for a 16-bit
    ``dtype``, float32 parameters under autocast to it (PyTorch's mixed precision; GradScaler for float16)."""
    import contextlib

    import torch

    half = dtype in HALF_DTYPES
    tdtype = torch.float32 if half else getattr(torch, dtype)

    def autocast() -> Any:
        return torch.autocast(device, dtype=getattr(torch, dtype)) if half else contextlib.nullcontext()
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
        # float16 scales its loss dynamically, as fastbp's float16 steps do
        scaler = torch.amp.GradScaler(device, enabled=dtype == "float16")

        def step(model=model, opt=opt, scaler=scaler):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(X), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sync()

        cands.append(Candidate(f"step_{opt_name}", label, step, step_flops(sizes, batch), "step", family="torch"))
    fwd_model = build()

    def forward():
        with torch.no_grad(), autocast():
            fwd_model(X)
        sync()

    cands.append(Candidate("forward", label, forward, forward_flops(sizes, batch), "forward", family="torch"))
    return cands


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
