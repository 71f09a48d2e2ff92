"""The training step as a CUDA graph: ``Trainer(..., cuda_graphs=True)`` on the cupy backend.

A step of a small network is tens of kernel launches and cuBLAS calls, each costing the host a few
microseconds of Python and driver work while the GPU waits. ``fit`` can instead capture one step into a
CUDA graph (``cupy.cuda.Stream.begin_capture``) and replay it with one launch per step:

- **Fixed buffers.** A graph replays the pointers it captured. ``fit`` gathers every batch into the same
  buffers of its row count (kept from one fit to the next, so a later fit replays the graphs an earlier
  one captured), and a model's workspaces, the optimizer's state, the guard and the scratch are
  made by the first (eager) step and stay put (the backend's buffer caches drop nothing during such a fit,
  ``Backend.caches_held``, so the capture that follows finds them all); each step's loss and correct count
  land in a buffer of the graph's, copied to the epoch's statistics after the replay. One graph per batch
  buffer (the last, partial batch of an epoch gets its own).
- **GEMMs on a handle of fastbp's own.** CuPy refuses cuBLAS calls during a capture, so the steps of a
  graph-using fit (eager or replayed alike, so that they compute the same) call cuBLAS through
  ``fastbp.backends._cublas``, on the fit's stream.
- **Per-step numbers in device memory.** A captured launch keeps its arguments, but the learning rate
  (schedules), Adam's bias corrections, SGD's first-step flag and the step number that the divergence guard
  records change every step. Captured, the update kernels and the guard read them from a small device
  array instead, which each replay fills first (one host-to-device copy), from the optimizer's own
  ``advance`` and the backend's ``_update_record``, as an eager step computes them.

A fit uses graphs only where a replay computes what an eager step would: the cupy backend; one process;
``on_nonfinite='raise'`` (the 'skip' mode reads every step's loss on the host); no sample or class weights;
an optimizer with a fused update kernel. Anything else, or a capture that fails (an allocation, a host read
or an op the step cannot capture), and the steps run eagerly: ``Trainer.graph_status`` says which and why
(``fastbp train --cuda-graphs`` prints it). A change that a graph cannot follow (another optimizer, its
state reset, slots changed by ``replace``, ``clip_norm``, the parameters moved) captures a new one.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from .backends.update_args import STRUCTS

#: the device array of per-step numbers: [step number (int64 bits), the update's structure (8-byte fields)]
_ARGS_LEN = 1 + max(len(dtype.names or ()) for _, dtype in STRUCTS.values())


class StepGraphs:
    """The CUDA graphs of one Trainer's fit: ``session`` around the epochs, ``step`` for each batch."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.replays = 0  # steps run by replaying a graph (over the trainer's life)
        self.captures = 0
        self.fallback: str | None = None  # why the last fit ran its steps eagerly, or None
        # batch buffers -> (signature, graph, the device arrays it reads and writes, kept alive with it)
        self._graphs: dict[tuple, tuple[tuple, Any, list[Any]]] = {}
        self._seen: dict[tuple, None] = {}  # batch buffers stepped eagerly once (which makes the workspaces)
        self._stream: Any = None
        self._blas: Any = None
        self._args: Any = None  # the per-step numbers, on the device
        self._host = np.zeros(_ARGS_LEN, np.float64)  # ... and their host copy, refilled per replay
        self._at: dict[str, Any] = {}
        self._stats: Any = None  # [loss, correct count] of a replayed step
        # fit's batch buffers, kept from fit to fit: the next fit gathers into the buffers these graphs read
        self.batch_buffers: dict[tuple, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without what lives on the device or in this process (graphs, the stream, the cuBLAS handle,
        the device buffers): an unpickled trainer captures anew."""
        state = self.__dict__.copy()
        state.update(_graphs={}, _seen={}, _stream=None, _blas=None, _args=None, _stats=None, _at={},
                     batch_buffers={})
        return state

    @property
    def status(self) -> str:
        """What the graphs did, in words."""
        if self.fallback is not None:
            return f"not used: {self.fallback}"
        if not self.captures:
            return "on, nothing captured yet"
        return f"{self.replays} steps replayed from {self.captures} captured graph(s)"

    def unavailable(self, weights: Any) -> str | None:
        """Why a fit with these settings cannot use graphs, or None."""
        tr = self.trainer
        bk = tr.model.backend
        reason = bk.graph_support()
        if reason is not None:
            return reason
        if tr.distributed:
            return "data-parallel training (its steps read the allreduced loss on the host)"
        if tr.on_nonfinite != "raise":
            return f"on_nonfinite={tr.on_nonfinite!r} reads every step's loss on the host; use 'raise'"
        if weights is not None:
            return "sample or class weights"
        opt = tr.optimizer
        if opt.fused is None or opt.fused not in bk.fused_updates:
            return f"{type(opt).__name__} has no fused update kernel on this backend"
        return None

    @contextlib.contextmanager
    def session(self, weights: Any) -> Any:
        """Around a fit's epochs: its steps run on a stream of their own, their GEMMs through fastbp's cuBLAS
        handle (made once), and the stream is waited for at the end. Yields whether graphs are used."""
        self.fallback = self.unavailable(weights)
        if self.fallback is not None:
            yield False
            return
        bk = self.trainer.model.backend
        try:
            if self._stream is None:
                self._stream = bk.graph_stream()
                self._blas = bk.blas_handle(self._stream)
        except Exception as exc:  # no libcublas to call, a handle refused: eager steps, and why
            self._stream = None
            self.fallback = f"fastbp's cuBLAS handle: {type(exc).__name__}: {exc}"
            yield False
            return
        bk.synchronize()  # what the default stream queued (the data, the parameters) comes first
        with self._stream, bk.gemms_through(self._blas), bk.caches_held():
            try:
                yield True
            finally:
                self._stream.synchronize()

    def _signature(self) -> tuple:
        """What a captured graph depends on besides its batch buffers; a change captures a new one."""
        tr, model = self.trainer, self.trainer.model
        opt = tr.optimizer
        slots = opt.state.slots if opt.state is not None else {}
        # slot_names follows the hyperparameters at once (replace); the state's slots only at the next update
        return (id(opt), opt.fused, opt.slot_names, tuple(slots),
                tuple(a.data.ptr for arrays in slots.values() for a in arrays),
                tr.clip_norm, tr.loss, model.flat_parameters().data.ptr, tr._guard.array(model.backend).data.ptr,
                model.compute_dtype, model.backend._tf32, model.backend.epilogues)

    def step(self, Xb: Any, yb: Any, stats_row: Any) -> Any:
        """One training step on the batch buffers (Xb, yb), its [loss, correct count] into ``stats_row``:
        eager the first time these buffers are seen, then captured and replayed. Returns the loss (a
        device scalar), as ``Trainer._step``."""
        tr = self.trainer
        key = (Xb.data.ptr, yb.data.ptr, Xb.shape, yb.shape, Xb.dtype, yb.dtype)
        if self.fallback is not None:
            return tr._step(Xb, yb, stats_row)[0]
        signature = self._signature()
        entry = self._graphs.get(key)
        if entry is not None and entry[0] == signature:
            return self._replay(entry[1], stats_row)
        if entry is not None or key not in self._seen or tr.optimizer.state is None:
            # new buffers, or a change the graph cannot follow: one eager step first, which makes what the
            # step needs (workspaces, optimizer state, scratch), as a capture cannot allocate
            self._graphs.pop(key, None)
            _remember(self._seen, key, None)
            return tr._step(Xb, yb, stats_row)[0]
        captured = self._capture(Xb, yb, stats_row)
        if captured is None:
            return tr._step(Xb, yb, stats_row)[0]
        _remember(self._graphs, key, (signature, *captured))
        return self._replay(captured[0], stats_row)

    def _capture(self, Xb: Any, yb: Any, stats_row: Any) -> tuple[Any, list[Any]] | None:
        """(a graph of ``Trainer._step`` on (Xb, yb), the device arrays it uses), or None with ``fallback``
        saying why. Capturing runs the step's Python but not its work: the host-side counts it advanced are
        put back."""
        tr, bk = self.trainer, self.trainer.model.backend
        opt = tr.optimizer
        if self._args is None:
            self._args = bk.zeros((_ARGS_LEN,), np.float64)
            self._at = {"step": self._args[0:1].view(np.int64),
                        **{name: self._args[1:1 + len(dtype.names or ())] for name, (_, dtype) in STRUCTS.items()}}
        if self._stats is None or self._stats.dtype != stats_row.dtype:
            self._stats = bk.zeros((2,), stats_row.dtype)
        counts = (tr.steps, opt.state.step, tr._guard.unchecked)
        used: set[str] = set()
        kept: list[Any] = []
        stream = self._stream
        graph, problem = None, None
        stream.begin_capture()
        try:
            with bk.capturing(self._at, used, kept):
                tr._step(Xb, yb, self._stats)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            tr.steps, opt.state.step, tr._guard.unchecked = counts
            try:  # ends the capture in every case (a failed one is invalid: this frees the stream)
                graph = stream.end_capture()
            except Exception as exc:
                problem = problem or f"{type(exc).__name__}: {exc}"
        missing = {opt.fused, "step"} - used
        if problem is None and missing:
            problem = f"the step ran without its per-step {' and '.join(sorted(missing))} arguments in device memory"
        if problem is not None:
            self.fallback = f"the step could not be captured ({problem})"
            return None
        self.captures += 1
        return graph, kept

    def _replay(self, graph: Any, stats_row: Any) -> Any:
        """The host's part of a step (the counts, the learning rate, the update's structure), its numbers
        copied to the device, then the graph."""
        tr = self.trainer
        opt = tr.optimizer
        lr = opt.advance()
        tr.steps += 1
        host = self._host
        host[0:1].view(np.int64)[0] = tr.steps
        fields = tr.model.backend._update_record(opt.fused, lr, opt.state.step, opt.hp).view(np.float64)
        host[1:1 + fields.size] = fields
        # on the fit's stream, after the previous replay read the last values: from pageable memory,
        # cudaMemcpyAsync stages the bytes before it returns, so ``host`` can be refilled at once
        self._args.set(host, stream=self._stream)
        graph.launch(self._stream)
        tr._guard.unchecked += 1
        stats_row[...] = self._stats
        self.replays += 1
        return stats_row[0]


def _remember(cache: dict[Any, Any], key: Any, value: Any, size: int = 8) -> None:
    """cache[key] = value, dropping the oldest entries past ``size`` (a fit uses one or two batch sizes)."""
    cache.pop(key, None)
    while len(cache) >= size:
        del cache[next(iter(cache))]
    cache[key] = value
