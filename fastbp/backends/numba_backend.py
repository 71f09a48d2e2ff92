"""The Numba backend: JIT-compiled CPU kernels that fuse everything around the GEMMs.

Each op is one compiled call: its GEMMs go through BLAS (NumPy's OpenBLAS, called by name from the
compiled code, see ``_numba_blas``; else Numba's ``np.dot`` on SciPy's) and the rest (bias, activation,
g', the bias gradient, the loss and its delta, the optimizer update) happens in one pass. Training runs
through a whole-step kernel: forward, backward and update in one call, with no Python between the ops. A
single-pass backprop kernel without BLAS (delta, dW and db row by row; commit 810ad40) was measured too:
it was slower than BLAS + the fused pass at every layer width from 4 up (batch 64: 2.6 vs 1.9 us at width
4, 71 vs 12.5 us at width 32; batch 256: 15.5 vs 8.0 us at width 4), so there is no crossover to switch
at, and only the BLAS path exists.

Threads: where its products are too small for BLAS's threads to pay (``split_parts``; FASTBP_NUMBA_SPLIT,
``SPLIT``, changes the rule), a step splits the batch into parts run side by side on Numba's pool (TBB, GNU
OpenMP or its workqueue; one part a thread), with BLAS held to one thread, and sums the parts' gradients;
else it takes its batch whole, the fused passes on the calling thread and the GEMMs on BLAS's own pool.
Inference splits its rows by the same rule (``forward_rows``).
Only one pool is ever busy, and results are bit-identical from run to run (a split sums its parts in a
fixed order, so it rounds apart from the whole batch's step, within float rounding). A child process
forked from one that split takes its batches whole (GNU OpenMP cannot run in it). Kernels are compiled on
first use and cached on disk in fastbp's cache folder (``_numba_cache``: $FASTBP_CACHE_DIR/numba, else
e.g. ~/.cache/fastbp/numba; NUMBA_CACHE_DIR, where set, wins), never in the installed package;
``warmup()`` compiles them ahead of time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref
from typing import Any

import numpy as np

from ..losses import loss_code
from . import BackendUnavailable
from .base import Backend, target_kind
from .update_args import STRUCTS, update_args

#: Train through the whole-step kernel wherever it applies (relu-like activations; SGD, Adam, AdamW,
#: RMSProp). Measured on the development machine (benchmarks/numba_blas_route.py, SGD, float32, one process
#: per variant, 5 rounds): the ops one by one took 1.066x its time at 64-128-128-10 batch 64 and 1.006x
#: (even) at 784-1024-1024-10 batch 256. False runs the ops one by one (for comparison and tests).
WHOLE_STEP = True



class NumbaBackend(Backend):
    """Fused JIT CPU kernels; inherits numpy's memory ops and the reference for anything not fused."""

    name = "numba"
    xp = np

    def __init__(self) -> None:
        from . import _numba_kernels as k

        self.k: Any = k
        from . import _numba_blas

        #: The GEMMs' BLAS: _numba_blas.ROUTE_NUMPY (NumPy's OpenBLAS) or ROUTE_NUMBA (np.dot, SciPy's).
        self.blas_route = _numba_blas.ROUTE
        self.blas = _numba_blas.DESCRIPTION
        self._plans: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()
        self._last_plan: tuple[Any, int, Any, Any] | None = None
        self._empty_labels = np.zeros(0, np.int64)
        self._empty_2d = {dt: np.zeros((0, 0), dt) for dt in (np.float32, np.float64)}
        self._empty_1d = {dt: np.zeros(0, dt) for dt in (np.float32, np.float64)}

    # ------------------------------------------------------------------ memory
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled by name (its kernels' module, plans and records are this process's): unpickling gives this
        process's numba backend, so a pickled model or Trainer trains on."""
        from . import resolve_backend

        return resolve_backend, (self.name,)

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        return np.ascontiguousarray(x, dtype=dtype)

    def matmul(self, A: Any, B: Any, out: Any = None) -> Any:
        if out is None:
            out = np.empty((A.shape[0], B.shape[1]), dtype=np.result_type(A, B))
        self.k.matmul(A, B, out, self.blas_route)
        return out

    # ------------------------------------------------------------------ layers
    def dense_forward(self, X, W, b, activation, A_out=None, Z_out=None):
        code = self.k.CODES.get(activation)  # None for a user's activation (activations.register)
        if code not in self.k.FUSED:
            return super().dense_forward(X, W, b, activation, A_out, Z_out)
        Z = Z_out if Z_out is not None else np.empty((X.shape[0], W.shape[1]), W.dtype)
        self.k.dense_forward(X, W, b, code, Z, self.blas_route)
        return Z, Z

    def dense_grads(self, delta, A_prev, dW_out=None, db_out=None):
        dW = dW_out if dW_out is not None else np.empty((A_prev.shape[1], delta.shape[1]), delta.dtype)
        db = db_out if db_out is not None else np.empty(delta.shape[1], delta.dtype)
        self.k.dense_grads(delta, A_prev, dW, db, self.blas_route)
        return dW, db

    def backprop_dense(self, delta_next, W_next, Z, A, A_prev, activation, delta_out=None, dW_out=None,
                       db_out=None):
        code = self.k.CODES.get(activation)
        if code not in self.k.FUSED:
            return super().backprop_dense(delta_next, W_next, Z, A, A_prev, activation, delta_out, dW_out, db_out)
        B, n = A.shape
        delta = delta_out if delta_out is not None else np.empty((B, n), A.dtype)
        dW = dW_out if dW_out is not None else np.empty((A_prev.shape[1], n), A.dtype)
        db = db_out if db_out is not None else np.empty(n, A.dtype)
        self.k.backprop_dense(delta_next, W_next, A, A_prev, code, delta, dW, db, self.blas_route)
        return delta, dW, db

    # ------------------------------------------------------------------ losses
    def _loss_args(self, Z, y, loss):
        if loss == "cross_entropy" and y.ndim == 1:
            return np.ascontiguousarray(y, np.int64), self._empty_2d[Z.dtype.type], loss_code(loss, True)
        return self._empty_labels, y, loss_code(loss, False)

    def output_delta(self, Z_L, y, loss, delta_out=None, stats_out=None, weights=None):
        if weights is not None:  # the kernel's delta, weighted by the reference
            return self._weighted_output_delta(Z_L, y, loss, delta_out, stats_out, weights)
        delta = delta_out if delta_out is not None else np.empty_like(Z_L)
        labels, Y, code = self._loss_args(Z_L, y, loss)
        value = self.k.output_delta(Z_L, labels, Y, code, delta, Z_L.shape[0])
        return self._record(stats_out, value, Z_L, y, loss), delta

    # ------------------------------------------------------------------ fused optimizer updates (flat, one pass)
    # Optimizer.step calls them by the optimizer's ``fused`` name (see Backend.fused_updates). A compute copy
    # or a loss scale (mixed precision, which runs on the cupy backend alone) goes to the reference update.
    def _sgd_update(self, p, g, slots, lr, step, hp, guard, copy=None, unscale=None):
        if copy is not None or unscale is not None or not (p.flags.c_contiguous and g.flags.c_contiguous):
            return False
        if not self._guard_tripped(guard):
            buf = slots.get("momentum")
            buf = buf.reshape(-1) if buf is not None else self._empty_1d[p.dtype.type]
            self.k.sgd(p.reshape(-1), g.reshape(-1), buf, self._update_record("sgd", lr, step, hp))
        return True

    def _adam_update(self, p, g, slots, lr, step, hp, guard, copy=None, unscale=None):
        if copy is not None or unscale is not None or not (p.flags.c_contiguous and g.flags.c_contiguous):
            return False
        if not self._guard_tripped(guard):
            self.k.adam(p.reshape(-1), g.reshape(-1), slots["m"].reshape(-1), slots["v"].reshape(-1),
                        self._update_record("adam", lr, step, hp))
        return True

    def _rmsprop_update(self, p, g, slots, lr, step, hp, guard, copy=None, unscale=None):
        if copy is not None or unscale is not None or not (p.flags.c_contiguous and g.flags.c_contiguous):
            return False
        if not self._guard_tripped(guard):
            buf = slots.get("momentum")
            self.k.rmsprop(p.reshape(-1), g.reshape(-1), slots["square_avg"].reshape(-1),
                           buf.reshape(-1) if buf is not None else self._empty_1d[p.dtype.type],
                           self._update_record("rmsprop", lr, step, hp))
        return True

    fused_updates = {"sgd": _sgd_update, "adam": _adam_update, "rmsprop": _rmsprop_update}

    def count_invalid(self, X, y, loss, n_out):
        targets = target_kind(y, loss)
        if targets == 0:
            return int(self.k.count_invalid(X, y, self._empty_2d[X.dtype.type], 0, n_out))
        return int(self.k.count_invalid(X, self._empty_labels, y, targets, n_out))

    # ------------------------------------------------------------------ the whole step
    def train_step(self, model, X, y, loss, optimizer, clip=0.0, stats_out=None):
        """Forward, backward and update in one compiled call, for relu-like networks: the batch whole, or
        split into parts run side by side (``_Plan.parts``)."""
        update = optimizer.fused
        opt = _WHOLE_STEP_UPDATES.get(update) if WHOLE_STEP else None  # type: ignore[arg-type]
        plan = self._whole_step_plan(model, X.shape[0]) if opt is not None else None
        if plan is None:
            return None
        flat, grad = model.flat_parameters(), model.flat_grad()
        optimizer.prepare([flat], self)
        state = optimizer.state
        step = state.step + 1
        records = plan.records  # the update reads its own record, the others none
        update_args(update, optimizer.schedule(step), step, optimizer.hp, out=records[opt])
        empty = self._empty_1d[flat.dtype.type]
        names = optimizer.slot_names
        s1 = state.slots[names[0]][0] if names else empty
        s2 = state.slots[names[1]][0] if len(names) > 1 else empty
        labels, Y, code = self._loss_args(X, y, loss)
        if plan.split():
            with _launch_guard():
                value, sumsq, updated = self.k.train_step_split(X, labels, Y, code, flat, grad, plan.extra,
                                                                plan.layout, plan.codes, plan.ws, plan.output, opt,
                                                                *records, s1, s2, clip, self.blas_route)
        else:
            value, sumsq, updated = self.k.train_step(X, labels, Y, code, flat, grad, plan.layout, plan.codes,
                                                      plan.ws_whole, plan.output, opt, *records, s1, s2, clip,
                                                      self.blas_route)
        if updated:
            state.step += 1
        return self._record(stats_out, value, plan.output, y, loss), plan.output, sumsq, updated

    def forward_rows(self, model, X):
        """Inference with the rows split into parts side by side on Numba's threads, BLAS on one
        (``forward_split``), where the split rule takes a forward pass of this many rows (``forward_parts``);
        None elsewhere (layer by layer, the GEMMs on BLAS's threads). So a validation pass in ``fit``
        leaves OpenBLAS's threads asleep between split steps."""
        rows = X.shape[0]
        parts = self._inference_parts(model, rows) if X.dtype == model.dtype and X.ndim == 2 else 1
        if parts < 2:
            return None
        layout, codes = _layout(model)
        widest = max(model.sizes[1:-1], default=1)
        ws = self._scratch("forward_split", (parts, 2, -(-rows // parts) * widest), model.dtype)
        out = np.empty((rows, model.sizes[-1]), model.dtype)  # returned: the caller's
        with _launch_guard():
            self.k.forward_split(X, model.flat_parameters(), layout, codes, ws, out, self.blas_route)
        return out

    def forward_route(self, model: Any, rows: int) -> str:
        """How a forward pass (inference) of this many rows runs here, in words (``fastbp bench``)."""
        parts = self._inference_parts(model, rows)
        if parts > 1:
            return f"rows split in {parts} parts on Numba's threads, BLAS on one thread"
        return "layer by layer, GEMMs on BLAS's threads"

    def _inference_parts(self, model: Any, rows: int) -> int:
        """How many parts ``forward_rows`` cuts these rows into: 1 where it declines (activations the
        kernels do not fuse, another BLAS, the rule, Numba's threads, a forked child, and under "auto"
        ``_auto_may_split``)."""
        from ._numba_blas import ROUTE_NUMPY

        if not WHOLE_STEP or self.blas_route != ROUTE_NUMPY:
            return 1
        parts = forward_parts(model.sizes, rows)
        if parts < 2 or not _SPLIT_ALLOWED[0] or _numba_threads() < parts:
            return 1
        if not all(self.k.CODES.get(a) in self.k.FUSED for a in model.activations):
            return 1
        if not _auto_may_split() and SPLIT == "auto":  # "always" quiets the pool too
            return 1
        return parts

    def train_gradients(self, model, X, y, loss, stats_out=None):
        """The gradient phase of the whole step alone (forward and backward in one compiled call, into
        ``model.flat_grad()``), for data-parallel training's allreduce to follow; None where the whole step
        does not fuse the model."""
        plan = self._whole_step_plan(model, X.shape[0]) if WHOLE_STEP else None
        if plan is None:
            return None
        labels, Y, code = self._loss_args(X, y, loss)
        if plan.split():
            with _launch_guard():
                value, _ = self.k.gradients_split(X, labels, Y, code, model.flat_parameters(), model.flat_grad(),
                                                  plan.extra, plan.layout, plan.codes, plan.ws, plan.output,
                                                  self.blas_route)
        else:
            value = self.k.gradients(X, labels, Y, code, model.flat_parameters(), model.flat_grad(), plan.layout,
                                     plan.codes, plan.ws_whole, plan.output, self.blas_route, X.shape[0])
        return self._record(stats_out, value, plan.output, y, loss), plan.output

    def _whole_step_plan(self, model: Any, batch: int) -> _Plan | None:
        """The whole-step plan for this model and batch size (kept by this backend while the model lives), or
        None when the model uses activations the kernel does not fuse."""
        last = self._last_plan  # the one the previous step used: most steps need no lookup
        if last is not None and last[0]() is model and last[1] == batch and last[2] is model.dtype:
            return last[3]() if last[3] is not None else None  # alive: the model, which holds it, is
        cache = self._plans.get(model)
        if cache is None:
            cache = self._plans[model] = {}
        entry = cache.get(batch)
        if entry is None or entry[0] is not model.dtype:  # built for another dtype
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            fused = all(self.k.CODES.get(a) in self.k.FUSED for a in model.activations)
            entry = cache[batch] = (model.dtype, _Plan(model, batch, self.blas_route) if fused else None)
        # weak references both: the backend keeps neither a model nor its buffers alive
        self._last_plan = (weakref.ref(model), batch, entry[0], None if entry[1] is None else weakref.ref(entry[1]))
        return entry[1]

    def step_route(self, model: Any, batch: int) -> str:
        """How a training step of this model at this batch size runs here, in words (``fastbp bench``)."""
        plan = self._whole_step_plan(model, batch) if WHOLE_STEP else None
        if plan is None:
            return "ops one by one"
        if plan.split():
            return f"whole-step kernel, batch split in {plan.parts} parts on Numba's threads, BLAS on one thread"
        return "whole-step kernel, batch whole, GEMMs on BLAS's threads"

    def sum_of_squares(self, x, out=None):
        if not x.flags.c_contiguous:
            return super().sum_of_squares(x)
        return self.k.sum_of_squares(x.reshape(-1), self.blas_route)

    def warmup(self, dtypes: Any = ("float32", "float64"), activations: Any = None) -> float:
        """Compile (or load from the disk cache) the kernels for these dtypes and activations (default:
        all): the op-by-op path, the whole-step kernel with every optimizer (and, unless FASTBP_NUMBA_SPLIT
        is never, its split form and the split inference pass), and every loss. Returns the
        seconds it took, which ``fastbp bench`` and ``fastbp train`` report apart from step times."""
        import fastbp as fb

        start = time.perf_counter()
        rng = np.random.default_rng(0)
        acts = list(activations) if activations is not None else list(self.k.CODES)
        for dtype in dtypes:
            for act in acts:
                model = fb.MLP([3, 4, 2], activation=act, dtype=dtype, seed=0, backend=self)
                X = rng.standard_normal((5, 3))
                for loss, y in (("cross_entropy", rng.integers(0, 2, 5)), ("mse", rng.standard_normal((5, 2))),
                                ("binary_cross_entropy", rng.integers(0, 2, (5, 2)).astype(float))):
                    model.loss_and_grads(X, y, loss)  # the ops one by one
                Xd, yd = model.prepare_batch(X, rng.integers(0, 2, 5), "cross_entropy")
                Xd, yd = model.prepare_batch(Xd, yd, "cross_entropy")  # prepared arrays: count_invalid
                onehot = np.eye(2, dtype=dtype)[rng.integers(0, 2, 5)]
                for opt in (fb.optim.SGD(0.1, momentum=0.9), fb.optim.Adam(), fb.optim.RMSProp(momentum=0.5)):
                    trainer = fb.Trainer(model, optimizer=opt)
                    trainer._step(Xd, yd)  # the whole-step kernel (relu-like) or the op-by-op path
                    trainer._step(Xd, onehot)
                    opt.step([model.flat_parameters()], [model.flat_grad()], self)  # the flat update op
            if SPLIT != "never" and _numba_threads() >= 2:  # the split step's kernels, on a plan split in two
                model = fb.MLP([3, 4, 2], dtype=dtype, seed=0, backend=self)
                self._plans[model] = {5: (model.dtype, _Plan(model, 5, self.blas_route, parts=2))}
                Xd, yd = model.prepare_batch(X, rng.integers(0, 2, 5), "cross_entropy")
                trainer = fb.Trainer(model, optimizer=fb.optim.SGD(0.1))
                trainer._step(Xd, yd)
                trainer._step(Xd, np.eye(2, dtype=dtype)[rng.integers(0, 2, 5)])
                self.train_gradients(model, Xd, yd, "cross_entropy")
                layout, codes = _layout(model)  # the split inference pass, in two parts
                self.k.forward_split(Xd, model.flat_parameters(), layout, codes, np.empty((2, 2, 12), dtype),
                                     np.empty((5, 2), dtype), self.blas_route)
            self.matmul(np.zeros((4, 3), dtype), np.zeros((3, 2), dtype))
        return time.perf_counter() - start


#: The whole step's updates by name, and the index of each (``_numba_kernels.update``'s ``opt``).
_WHOLE_STEP_UPDATES = {"sgd": 0, "adam": 1, "rmsprop": 2}


class _Plan:
    """The whole-step kernel's layout, scratch and way of running for one model and batch size."""

    def __init__(self, model: Any, batch: int, route: int, parts: int | None = None) -> None:
        from . import _numba_blas

        self.layout, self.codes = _layout(model)
        if parts is None:  # the rule's (``parts``: forced, for warmup and tests)
            parts = split_parts(model.sizes, batch) if route == _numba_blas.ROUTE_NUMPY else 1
            if parts > 1 and not _auto_may_split() and SPLIT == "auto":  # "always" quiets the pool too
                parts = 1
        self.parts = max(1, min(parts, batch))
        part_rows = -(-batch // self.parts)
        n_top = model.layers[-1].n_out
        # per part: A (written over Z) and delta of each layer, but the top layer's A, which is the output
        scratch = sum(2 * part_rows * layer.n_out for layer in model.layers) - part_rows * n_top
        self.ws = np.empty((self.parts, scratch), model.dtype)
        self.ws_whole = self.ws.reshape(-1)  # the whole batch's scratch (parts x part rows >= batch rows)
        self.output = np.empty((batch, n_top), model.dtype)
        #: the gradients of parts 1, 2, ... (part 0 writes the model's own), summed into it
        self.extra = np.empty((self.parts - 1, model.n_params), model.dtype)
        # the updates' argument records, filled each step (a model trains in one thread at a time)
        self.records = [np.zeros(1, STRUCTS[name][1]) for name in _WHOLE_STEP_UPDATES]

    def split(self) -> bool:
        """Whether this step runs split: the plan says so, Numba's pool has a thread for each part (its
        count, numba.set_num_threads or fastbp.threads, can change between steps) and this process may use
        it (not a child forked from one that did, where GNU OpenMP would abort)."""
        return self.parts > 1 and _SPLIT_ALLOWED[0] and _numba_threads() >= self.parts


#: How the whole step takes its batch: "auto" (``split_parts``' rule; the default), "always" (split wherever
#: Numba's pool has two threads or more), "never" (the batch whole). The environment variable
#: FASTBP_NUMBA_SPLIT sets it at import; plans made after a change follow it. A split step shares the cores
#: with OpenBLAS's threads, which by OpenBLAS's default spin about 0.1 s after any multi-threaded BLAS call
#: (a validation pass, the user's own NumPy products): in that window a 0.08 ms split step took up to 40 ms,
#: and fit with validation_data each epoch (64-128-64-10, digits) took 0.45 s split against 0.071 s whole.
#: So the first plan that splits makes NumPy's OpenBLAS threads sleep within about 0.4 ms instead
#: (``_numba_blas.quiet_pool``), and "auto" keeps the batch whole where that cannot be done (other Python
#: threads running, another BLAS), and where Numba's pool is not GNU OpenMP (``_auto_may_split``).
SPLIT = os.environ.get("FASTBP_NUMBA_SPLIT", "auto").lower()
SPLIT_MODES = ("auto", "always", "never")
#: The "auto" rule: split where the step's average GEMM does between SPLIT_MIN_FLOP and SPLIT_MAX_FLOP flops,
#: into parts of at least SPLIT_MIN_ROWS rows. Measured on the development machine (2 cores, float32, SGD,
#: public step, benchmarks/numba_blas_route.py, split time / whole time): a step too small to pay for the
#: threads' start and join loses (16-32-32-2 batch 32, 38 kflop a GEMM: 1.61); small and medium layers gain
#: (32-64-64-10/64, 0.33 Mflop: 0.96; 64-128-128-10/64, 1.2 Mflop: 0.74; 64-128-128-10/256: 0.46;
#: 784-256-256-10/128, 26 Mflop: 0.77); from 512-wide layers on, BLAS's own threads do as well or better
#: (128-512-512-10/64, 16 Mflop: 1.02; 784-1024-1024-10/64, 90 Mflop: 1.04; /256, 362 Mflop: 1.06).
SPLIT_MIN_FLOP = 250e3
SPLIT_MAX_FLOP = 40e6
SPLIT_MIN_ROWS = 16
_SPLIT_ALLOWED = [True]  # False in a child forked from a process that split (see _forked)


def split_parts(sizes: Any, batch: int) -> int:
    """How many parts of the batch the whole step runs side by side for these layer sizes and this batch,
    by SPLIT and its rule; at most Numba's thread count (NUMBA_NUM_THREADS). 1: the batch whole, its
    GEMMs on BLAS's threads."""
    gemms = 3 * (len(sizes) - 1) - 1  # forward and dW per layer, and delta below the top
    return _parts(6.0 * batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) / gemms, batch)


def forward_parts(sizes: Any, rows: int) -> int:
    """``split_parts`` for a forward pass alone (inference) of ``rows`` rows: by its average GEMM."""
    return _parts(2.0 * rows * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) / (len(sizes) - 1), rows)


def _parts(flop: float, rows: int) -> int:
    """The rule of SPLIT for work whose GEMMs do ``flop`` flops on average, over ``rows`` rows."""
    if SPLIT not in SPLIT_MODES:
        raise ValueError(f"FASTBP_NUMBA_SPLIT / numba_backend.SPLIT must be 'auto', 'always' or 'never', "
                         f"not {SPLIT!r}")
    if SPLIT == "never":
        return 1
    import numba

    threads = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if SPLIT == "always":
        return max(1, min(threads, rows))
    if not SPLIT_MIN_FLOP <= flop <= SPLIT_MAX_FLOP:
        return 1
    return max(1, min(threads, rows // SPLIT_MIN_ROWS))


def _layout(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' view of a model: per layer (offset of W in the flat parameters, offset of b, n_in,
    n_out), and the activation codes (the output layer's last)."""
    from . import _numba_kernels as k

    rows, offset = [], 0
    for layer in model.layers:
        n_in, n_out = layer.n_in, layer.n_out
        rows.append((offset, offset + n_in * n_out, n_in, n_out))
        offset += n_in * n_out + n_out
    return np.array(rows, dtype=np.int64), np.array([k.CODES[a] for a in model.activations], dtype=np.int64)


@functools.cache
def _launch_guard() -> Any:
    """What a kernel on Numba's pool (the split step, its gradient phase, the split inference) runs inside:
    on Numba's workqueue layer, which aborts the process when two Python threads launch at once (two
    threads training a model each), one lock, so that launches take turns; on GNU OpenMP and TBB, which
    take concurrent launches, nothing (with a lock there, each launching thread kept its own OpenMP team
    spinning while the other ran: two threads of 2000 split steps each took 2.4 s, against 0.69 s without
    and 0.57 s one after the other)."""
    return threading.Lock() if _threading_layer() == "workqueue" else contextlib.nullcontext()


@functools.cache
def _threading_layer() -> str:
    """Numba's threading layer: 'omp', 'tbb' or 'workqueue' (starting its pool, which picks it once)."""
    import numba

    _numba_threads()
    return str(numba.threading_layer())  # type: ignore[attr-defined]


def _auto_may_split() -> bool:
    """Whether the "auto" rule may split here at all: on GNU OpenMP, where the split was measured to pay,
    once NumPy's OpenBLAS threads are quiet (``_numba_blas.quiet_pool``). The 64-128-128-10 step at batch
    64 took 0.68 ms split on Numba's workqueue layer against 0.12 ms whole, and on TBB no less than whole."""
    from ._numba_blas import quiet_pool

    return quiet_pool() and _threading_layer() == "omp"  # quiet_pool first: "always" wants it all the same


def _numba_threads() -> int:
    import numba

    return int(numba.get_num_threads())


def _forked() -> None:
    _SPLIT_ALLOWED[0] = False


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_forked)


def create() -> NumbaBackend:
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"numba is not installed ({exc}); pip install 'fastbp[numba]'") from exc
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls BLAS through it)
    except ImportError as exc:
        raise BackendUnavailable(f"numba's matrix products need scipy, which is not installed ({exc}); "
                                 f"pip install 'fastbp[numba]'") from exc
    return NumbaBackend()
