"""The Trainer: minibatch training of an MLP with an optimizer, backend-agnostic.

Data goes to the model's backend once per ``fit``; each step gathers its batch on the backend into a
reused buffer, runs the model's fused forward/backward and the optimizer's in-place update. The loss is
accumulated on the backend and read back once per epoch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import (
    check_choice,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
    check_seed,
    to_host,
)
from .backends.base import invalid_batch_message
from .callbacks import Callback
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import TAIL, Communicator, LocalCommunicator, abort_on_error, check_same, shard
from .divergence import ON_NONFINITE, DivergenceError, DivergenceGuard, divergence_message
from .dtypes import accumulator_dtype
from .graphs import StepGraphs
from .history import History
from .layers import MLP, _on_device
from .losses import CLASSIFICATION_LOSSES, check_loss, check_sample_weight, class_weights, learn_classes
from .optim import OPTIMIZERS, Adam, Optimizer
from .progress import Reporter, resolve_verbose

#: Dynamic loss scaling (float16 models): the first scale, then (growth factor, backoff factor, growth
#: interval in steps), PyTorch GradScaler's defaults.
LOSS_SCALE_INIT = 2.0**16
LOSS_SCALE_RULE = (2.0, 0.5, 2000)

__all__ = ["Trainer", "History", "DivergenceError"]


class Trainer:
    """Trains ``model`` on ``loss`` with ``optimizer`` in minibatches.

    Args:
        model: the MLP to train (updated in place).
        loss: 'cross_entropy', 'binary_cross_entropy' or 'mse'.
        optimizer: an ``fastbp.optim`` optimizer, or its name ('sgd', 'adam', 'adamw', 'rmsprop') for one with
            the default hyperparameters (as torch.optim's); default Adam(lr=1e-3).
        batch_size: rows per step; the last batch of an epoch may be smaller.
        seed: seed of the shuffling generator.
        clip_norm: rescale each step's gradient to this global norm when it is larger (None: never).
        on_nonfinite: what a non-finite loss or gradient does: 'raise' a DivergenceError (the parameters
            and optimizer state stay those of the last finite step), or 'skip' the step and count it.
        comm: a ``fastbp.distributed`` communicator (``fastbp.distributed.init()`` in a job started by
            mpiexec) for data-parallel training: ``batch_size`` is then the global batch, each rank
            computes the gradient of its slice of every batch, and one allreduce per step gives every rank
            the same update (see ``fastbp.distributed``). Rank 0 alone reports progress and writes
            checkpoints. None: this process alone.
        cuda_graphs: on the cupy backend, ``fit`` captures its training step as a CUDA graph per batch size
            and replays it, one launch per step instead of tens (``fastbp.graphs``): for small networks,
            whose steps are bound by launches. Where it cannot (another backend, weights, ...) the steps
            run as without it; ``graph_status`` says why.

    A Trainer (and its model) serves one thread at a time: a second thread that calls ``step`` or ``fit``
    while the first is inside gets a RuntimeError instead of a silent race on shared buffers.
    """

    def __init__(self, model: MLP, loss: str = "cross_entropy", optimizer: Optimizer | str | None = None,
                 batch_size: int = 64, seed: int | None = 0, clip_norm: float | None = None,
                 on_nonfinite: str = "raise", comm: Communicator | None = None, cuda_graphs: bool = False) -> None:
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a fastbp.MLP, got {type(model).__name__}")
        if isinstance(optimizer, str):
            name = check_choice(optimizer, OPTIMIZERS, "optimizer")
            try:
                optimizer = OPTIMIZERS[name]()  # type: ignore[call-arg]
            except TypeError as exc:
                raise TypeError(f"optimizer {name!r} has no defaults for every argument ({exc}): pass an "
                                f"instance, e.g. optimizer={OPTIMIZERS[name].__name__}(lr=...)") from exc
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a fastbp.optim optimizer, got {type(optimizer).__name__}")
        check_seed(seed)
        if comm is not None and not isinstance(comm, Communicator):
            raise TypeError(f"comm must be a fastbp.distributed communicator, got {type(comm).__name__}")
        self.comm: Communicator = comm if comm is not None else LocalCommunicator()
        self.model = model
        self.loss = check_loss(loss)
        self.optimizer = optimizer if optimizer is not None else Adam(lr=1e-3)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.clip_norm = None if clip_norm is None else check_positive_float(clip_norm, "clip_norm")
        self.on_nonfinite = check_choice(on_nonfinite, ON_NONFINITE, "on_nonfinite")
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.steps = 0
        self.skipped_steps = 0
        self.stop_training = False
        self._guard = DivergenceGuard()  # the device-side non-finite check (backends with deferred checks)
        self._scale_state: Any = None  # loss scaling's device state (float16 models), made at the first step
        self._scale_gate: Any = None
        self._sumsq: Any = None  # the last step's squared gradient norm, handed back to be written into
        self._stop_requested = False  # set by SIGINT/SIGTERM in data-parallel training, reduced each step
        self._local_stats: Any = None  # this rank's [loss, correct count] of a data-parallel step
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs = StepGraphs(self)

    @property
    def graph_status(self) -> str:
        """What CUDA graphs did in this trainer's fits (``cuda_graphs=True``), or why they were not used."""
        return self._graphs.status if self.cuda_graphs else "off (Trainer(cuda_graphs=False))"

    def _acquire(self) -> threading.Lock:
        """The model's lock, taken: a RuntimeError when another thread holds it."""
        lock = self.model.lock
        if not lock.acquire(blocking=False):
            raise RuntimeError("this model is being trained in another thread: a Trainer and its model serve "
                               "one thread at a time (use one model per thread)")
        return lock

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        lock = self._acquire()
        try:
            with self.model.backend.device_scope():
                yield
        finally:
            lock.release()

    # ------------------------------------------------------------------ one step
    def step(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """One optimizer step on one batch; returns the batch's loss (before the update).

        ``sample_weight``: a weight per row, multiplying its loss (see ``fit``).
        Device arrays (CuPy arrays on the cupy backend) are checked on the device: a batch with NaN or
        infinite features or invalid labels raises a ValueError from the same read that returns the loss,
        and the step changes nothing."""
        lock = self._acquire()  # not _exclusive: a generator context costs 2 us, a tenth of a small step
        try:
            with self.model.backend.device_scope():  # one device switch for the whole call
                if self.model.classes_ is None or self.model.loss_ != self.loss:
                    self._learn_classes(self.model.backend.adopt(y))
                guard = None if self.distributed else self._deferred_guard()
                Xd, yd = self.model.prepare_batch(X, y, self.loss, guard=guard, step=self.steps + 1)
                weights = None if sample_weight is None else self.model.prepare_weights(sample_weight, Xd.shape[0])
                if self.distributed:  # (X, y) is the global batch; this rank computes its rows of it
                    lo, hi = shard(Xd.shape[0], self.comm.rank, self.comm.size)
                    with abort_on_error(self.comm, self._where):
                        stats = np.zeros(2)
                        taken = self._dist_step(Xd[lo:hi], yd[lo:hi], None if weights is None else weights[lo:hi],
                                                Xd.shape[0], stats)
                    return float(stats[0]) if taken else math.nan
                value, _ = self._step(Xd, yd, weights=weights)
                if value is None:  # skipped as non-finite
                    return math.nan
                if not self._guard.unchecked:  # nothing deferred: the loss alone
                    return self.model.backend.to_float(value)
                return float(self._check_deferred(value)[0])  # the guard and the loss in one read
        finally:
            lock.release()

    @property
    def distributed(self) -> bool:
        """Whether this trainer trains data parallel (its communicator has more than one rank)."""
        return self.comm.size > 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes checkpoints and reports progress: rank 0 (or the only process)."""
        return self.comm.rank == 0

    def _where(self) -> str:
        return f"epoch {self.epoch}, step {self.steps + 1}"

    def _learn_classes(self, y: Any) -> None:
        """Record the loss on the model, and for cross_entropy on labels the classes, when the model has
        none yet (``fastbp.losses.learn_classes``): later labels, and predictions, are in their values.
        Labels on a device are taken as class indices (reading them to learn classes would cost a copy)."""
        model = self.model
        model.loss_ = self.loss
        if self.loss != "cross_entropy" or model.classes_ is not None or _on_device(model.backend, y):
            return
        labels = np.asarray(to_host(y))
        if labels.ndim == 1:
            model.classes_ = learn_classes(labels, model.sizes[-1])

    def _deferred_guard(self) -> Any:
        """The device-side guard of backends with deferred checks in 'raise' mode, else None."""
        bk = self.model.backend
        if not (bk.deferred_checks and self.on_nonfinite == "raise"):
            return None
        return self._guard.array(bk)

    def _step(self, Xd: Any, yd: Any, stats_out: Any = None, weights: Any = None) -> tuple[Any, Any]:
        """One step on prepared arrays: the backend's whole-step op where it has one (and no sample weights
        are given), else its gradient op (``Backend.train_gradients``, without sample weights or loss scaling)
        or the ops one by one, then the update; a non-finite loss or gradient never reaches the parameters.
        Returns (the loss, the output), or (None, None) for a step skipped as non-finite. ``stats_out``:
        receives [loss, correct count]; ``weights``: per-row weights (see ``Backend.output_delta``).

        The check reads (loss, gradient norm) to the host each step, except on backends with deferred
        checks (GPUs) in 'raise' mode: there a guard on the device gates the update off, and
        ``_check_deferred`` reads it every DEFERRED_CHECK_STEPS steps and at each epoch's end."""
        model = self.model
        bk = model.backend
        clip = self.clip_norm or 0.0
        fused = None if weights is not None else bk.train_step(model, Xd, yd, self.loss, self.optimizer, clip,
                                                                stats_out)
        if fused is not None:
            value, output, sumsq, updated = fused
            if not updated:
                self._nonfinite(bk.to_float(value), sumsq)
                return None, None
            self.steps += 1
            return value, output
        scaling = self._loss_scaling()
        # the backend's gradient phase in one op where it has one, else the ops one by one
        gradients = None if weights is not None or scaling is not None else bk.train_gradients(
            model, Xd, yd, self.loss, stats_out)
        if gradients is not None:
            value, output = gradients
        else:
            value, _, output = model._loss_and_grads(Xd, yd, self.loss, stats_out, weights, scaling)
        grad = model.flat_grad()
        sumsq = self._sumsq = bk.sum_of_squares(grad, out=self._sumsq)
        guard = self._deferred_guard()
        if guard is not None:
            # with loss scaling an overflowing gradient is no divergence (it skips the step and lowers the
            # scale, below): the guard looks at the loss alone
            bk.nonfinite_guard(value, value if scaling is not None else sumsq, guard, self.steps + 1)
            self._guard.unchecked += 1
        else:
            loss_value, sq = bk.to_floats(value, sumsq)
            if not (math.isfinite(loss_value) and (scaling is not None or math.isfinite(sq))):
                self._nonfinite(loss_value, sq)
                return None, None
        self.steps += 1
        self._clip_and_update(grad, sumsq, guard, scaling)
        return value, output

    def _clip_and_update(self, grad: Any, sumsq: Any, guard: Any, scaling: Any) -> None:
        """The end of a step, once its gradient (and its sum of squares) passed the checks: with loss
        scaling, the scale's update, which also gates this step off on an overflow (a step gated by
        ``guard`` stays gated); clipping; the optimizer's update, which in mixed precision also writes the
        16-bit copy of the weights."""
        model, bk = self.model, self.model.backend
        gate, unscale = guard, None
        if scaling is not None:
            gate = self._scale_gate
            bk.loss_scale_update(sumsq, scaling, guard, gate, *LOSS_SCALE_RULE)
            sumsq, unscale = scaling[2:3], scaling[1:2]  # the unscaled sum of squares, 1 / the scale used
        if self.clip_norm:
            bk.clip_by_norm(grad, sumsq, self.clip_norm, gate)
        self.optimizer.step([model.flat_parameters()], [grad], bk, guard=gate,
                            copies=[model._flat_compute] if model.mixed else None, unscale=unscale)

    def _loss_scaling(self) -> Any:
        """Dynamic loss scaling's device state for a float16 model (see ``loss_scale``), else None."""
        if self.model.compute_dtype != np.float16:
            return None
        if self._scale_state is None:
            bk = self.model.backend
            with bk.device_scope():
                self._scale_state = bk.asarray(np.array([LOSS_SCALE_INIT, 1 / LOSS_SCALE_INIT, 0, 0, 0], np.float32))
                self._scale_gate = bk.zeros((4,), np.float64)
        return self._scale_state

    def _loss_scaling_state(self) -> list[float] | None:
        """Loss scaling's state as host numbers (for checkpoints): [scale, steps since it changed, overflow
        steps], or None for a model without it."""
        state = self._loss_scaling()
        return None if state is None else [float(v) for v in self.model.backend.to_numpy(state)[[0, 3, 4]]]

    def _set_loss_scaling_state(self, saved: Any) -> None:
        """Restore what ``_loss_scaling_state`` returned (None: nothing saved, keep the default)."""
        state = self._loss_scaling()
        if state is None or saved is None:
            return
        scale, since, overflows = (float(v) for v in saved)
        if not (math.isfinite(scale) and scale > 0 and since >= 0 and overflows >= 0):
            raise ValueError(f"invalid loss scaling state {saved}")
        state[...] = self.model.backend.asarray(np.array([scale, 1 / scale, 0, since, overflows], np.float32))

    @property
    def loss_scale(self) -> float | None:
        """The loss scale of a float16 model's next step (dynamic loss scaling: it starts at 2**16, halves
        on a step whose gradient overflows, which is skipped, and doubles after 2000 steps without one, as
        PyTorch's GradScaler; checkpoints keep it); None for other models. Reading it costs a device read."""
        state = self._loss_scaling()
        return None if state is None else float(self.model.backend.to_numpy(state)[0])

    @property
    def overflow_steps(self) -> int:
        """How many steps loss scaling skipped because their float16 gradient overflowed (0 unless float16)."""
        state = self._loss_scaling()
        return 0 if state is None else int(self.model.backend.to_numpy(state)[4])

    def _dist_step(self, xb: Any, yb: Any, wb: Any, size: int, stats_row: np.ndarray) -> bool:
        """One data-parallel step on a global batch of ``size`` rows, of which this rank holds (xb, yb, wb)
        (its ``shard``, maybe empty): its mean gradient scaled by rows / size, then one allreduce of the
        gradient with [loss x rows, correct count, rows, stop flag] behind it; the checks, clipping and the
        update follow from the reduced values, alike on every rank. Writes [loss, correct count] into
        ``stats_row``; returns whether the step was taken (False: skipped as non-finite)."""
        model, bk, comm = self.model, self.model.backend, self.comm
        rows = xb.shape[0]
        scaling = self._loss_scaling()
        block = model.reduction_buffer(TAIL)
        grad, tail = block[:-TAIL], block[-TAIL:]
        if rows:
            if self._local_stats is None:
                self._local_stats = bk.zeros((2,), accumulator_dtype(model.dtype))
            local = self._local_stats
            if wb is not None or bk.train_gradients(model, xb, yb, self.loss, local) is None:
                model._loss_and_grads(xb, yb, self.loss, local, wb, scaling)
            if model.mixed:  # the 16-bit gradient into the float32 block the ranks sum
                grad[...] = model.flat_grad()
            if rows != size:
                bk.scale(grad, rows / size)
            tail[0] = local[0] * rows
            tail[1] = local[1]
        else:  # no rows here: zeros, so the sum is the other ranks' alone
            grad.fill(0)
            tail[0] = tail[1] = 0
        tail[2] = rows
        tail[3] = 1.0 if self._stop_requested else 0.0
        comm.allreduce(block)
        loss_rows, correct, total, stop = (float(v) for v in bk.to_numpy(tail))
        if total != size:
            raise RuntimeError(f"the ranks' slices of a batch of {size} rows add up to {total:g}: the ranks do not "
                               f"run the same data")
        if stop:
            interrupt = KeyboardInterrupt("stopped by SIGINT or SIGTERM on a rank")
            interrupt.collective = True  # type: ignore[attr-defined]
            raise interrupt
        loss = loss_rows / size
        if model.mixed:  # the sum rounded to 16 bits once, as one process's gradient is; the update reads it
            flat = model.flat_grad()
            flat[...] = grad
            grad = flat
        sumsq = self._sumsq = bk.sum_of_squares(grad, out=self._sumsq)
        # with loss scaling an overflowing gradient is no divergence: the device skips the step (below)
        sq = bk.to_float(sumsq) if scaling is None else math.nan
        if not (math.isfinite(loss) and (scaling is not None or math.isfinite(sq))):
            try:
                self._nonfinite(loss, sq)
            except DivergenceError as exc:
                exc.collective = True  # type: ignore[attr-defined] # decided from reduced values, on every rank
                raise
            return False
        self.steps += 1
        self._clip_and_update(grad, sumsq, None, scaling)  # from the reduced gradient: alike on every rank
        stats_row[:] = loss, correct
        return True

    def _start_distributed(self, Xd: Any, yd: Any, wd: Any) -> None:
        """Before data-parallel training: every rank must run the same configuration on the same data
        shape (a ValueError naming the ranks that differ); then rank 0's parameters, optimizer state,
        counts and shuffling generator become every rank's."""
        comm, model, opt, bk = self.comm, self.model, self.optimizer, self.model.backend
        facts = {"sizes": model.sizes, "activations": model.activations, "dtype": model.dtype.name,
                 "compute_dtype": model.compute_dtype.name,
                 "backend": type(bk).__name__, "loss": self.loss, "batch_size": self.batch_size,
                 "optimizer": type(opt).__name__, "hyperparameters": opt.hyperparameters(),
                 "schedule": opt.schedule.config(), "clip_norm": self.clip_norm, "on_nonfinite": self.on_nonfinite,
                 "data": [list(Xd.shape), list(yd.shape), wd is not None]}
        try:
            check_same(comm, facts)
        except ValueError as exc:
            exc.collective = True  # type: ignore[attr-defined] # every rank saw the same difference
            raise
        flat = model.flat_parameters()
        opt.prepare([flat], bk)
        assert opt.state is not None
        comm.broadcast(flat)
        for arrays in opt.state.slots.values():
            for a in arrays:
                comm.broadcast(a)
        counts = np.array([opt.state.step, self.epoch, self.steps, self.skipped_steps], np.int64)
        comm.broadcast(counts)
        model._sync_compute()  # rank 0's weights, rounded into every rank's 16-bit copy
        scaling = self._loss_scaling()
        if scaling is not None:  # float16: rank 0's loss scale
            comm.broadcast(scaling)
        opt.state.step, self.epoch, self.steps, self.skipped_steps = (int(c) for c in counts)
        state = comm.allgather(json.dumps(self.rng.bit_generator.state).encode())[0]
        self.rng.bit_generator.state = json.loads(state)

    def _check_deferred(self, extra: Any = None) -> np.ndarray:
        """Read the device guard of the steps since the last read (``DivergenceGuard.read``). When one of
        them was non-finite, or its batch invalid (``Backend.check_batch``), its update and every later one
        did nothing; wind the step counts back to it and raise. ``extra``: a backend array read in the same
        transfer and returned as a flat float64 host array (empty when None)."""
        tripped, host = self._guard.read(self.model.backend, extra)
        if tripped is not None:
            undone = self.steps - tripped.step + 1  # the failed step and those after it
            self.steps -= undone
            self.optimizer.rewind(undone)
            if tripped.kind == 2:  # an invalid batch (first: how many values, second: the targets' kind)
                raise ValueError(invalid_batch_message(tripped.first, int(tripped.second), self.model.sizes[-1]))
            self._nonfinite(tripped.first, tripped.second)  # raises ('raise' is the mode with deferred checks)
        return host

    def _nonfinite(self, loss_value: float, sumsq: float) -> None:
        """A non-finite step that changed nothing: count it as skipped, or raise."""
        if self.on_nonfinite == "skip":
            self.steps += 1
            self.skipped_steps += 1
            return
        raise DivergenceError(divergence_message(self.epoch, self.steps + 1, loss_value, sumsq))

    # ------------------------------------------------------------------ many epochs
    def fit(
        self,
        X: Any,
        y: Any,
        epochs: int = 10,
        validation_data: tuple[Any, ...] | None = None,
        callbacks: Sequence[Callback] | None = None,
        shuffle: bool = True,
        verbose: int | str = "auto",
        interrupt_checkpoint: Any = None,
        validation_split: float = 0.0,
        sample_weight: Any = None,
        class_weight: Any = None,
    ) -> History:
        """Train for ``epochs`` passes over (X, y); returns the History of per-epoch metrics.

        Args:
            validation_data: (X_val, y_val), or (X_val, y_val, sample_weight_val), evaluated after each
                epoch (val_loss, val_accuracy).
            validation_split: instead of ``validation_data``, hold out this fraction of the rows, the last
                ones before any shuffling (as Keras does), as validation data (with their sample weights).
            sample_weight: a weight per row of X: each row's loss and gradient are multiplied by it, and
                the loss stays the mean over the rows, sum(w_i c_i) / n (as Keras weighs samples). The
                logged loss is this weighted one; accuracy counts every row alike.
            class_weight: 'balanced' (n_rows / (n_classes * the class's count), as scikit-learn), or a dict
                {label: weight} in the labels' own values (classes left out weigh 1): each row weighs
                its class's weight (times its sample_weight). For cross_entropy, and for
                binary_cross_entropy with one output (labels 0 and 1); not applied to validation data.
            callbacks: ``fastbp.callbacks.Callback`` instances.
            shuffle: reshuffle the rows each epoch with the trainer's seeded generator.
            verbose: 0 silent; 1 a progress bar per epoch, advanced every step, ending with the epoch's
                metrics (tqdm's auto form: a widget in Jupyter; needs tqdm, ``pip install
                'fastbp[progress]'``, else 2 with a warning); 2 one line per epoch (printed); 'auto': 1
                on a terminal or in a notebook with tqdm installed, 2 on a terminal without it, else 0.
            interrupt_checkpoint: where Ctrl-C saves a checkpoint (see ``save_checkpoint``) before fit
                returns. Ctrl-C, or SIGTERM (what job schedulers send before they kill a job; handled
                so when fit runs in the main thread and no other SIGTERM handler is installed), ends fit
                cleanly: it returns the History with ``interrupted=True``; the
                weights keep the interrupted epoch's steps, while the epoch count and the shuffling
                generator are those of the last completed epoch, so a resumed fit redoes that epoch.
        """
        epochs = check_positive_int(epochs, "epochs")
        verbose = resolve_verbose(verbose)
        callbacks = list(callbacks or [])
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fastbp Callback instances, got {type(cb).__name__}")
        model = self.model
        X, y = model.backend.adopt(X), model.backend.adopt(y)  # PyTorch tensors and the like, through DLPack
        if sample_weight is not None:
            sample_weight = model.backend.adopt(sample_weight)
        validation_split = check_nonneg_float(validation_split, "validation_split", upper=1.0)
        if validation_split:
            if validation_data is not None:
                raise ValueError("give validation_data or validation_split, not both")
            n = len(X)
            split = int(n * (1 - validation_split))
            if not 0 < split < n:
                raise ValueError(f"validation_split {validation_split} leaves an empty part of {n} rows")
            held: tuple[Any, ...] = (X[split:], y[split:])
            if sample_weight is not None:
                sample_weight = check_sample_weight(sample_weight, n)
                held, sample_weight = held + (sample_weight[split:],), sample_weight[:split]
            X, y, validation_data = X[:split], y[:split], held
        self._learn_classes(y)
        Xd, yd = model.prepare_batch(X, y, self.loss)
        wd = self._fit_weights(yd, sample_weight, class_weight)
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
                raise TypeError("validation_data must be (X_val, y_val) or (X_val, y_val, sample_weight_val)")
            Xv, yv = model.prepare_batch(validation_data[0], validation_data[1], self.loss)
            val = (Xv, yv, model.prepare_weights(validation_data[2], Xv.shape[0]) if len(validation_data) == 3
                   else None)
        if interrupt_checkpoint is not None:
            from .io import check_writable

            check_writable(interrupt_checkpoint, "interrupt_checkpoint")
        history = History()
        if not self.is_writer:
            verbose = 0  # rank 0 alone reports
        signals = _stop_on_signals(self) if self.distributed else _sigterm_as_interrupt()
        graphs = self._graphs.session(wd) if self.cuda_graphs else _NO_GRAPHS
        with self._exclusive(), signals, abort_on_error(self.comm, self._where), graphs as use_graphs:
            if self.distributed:
                self._start_distributed(Xd, yd, wd)
            self._fit_epochs(Xd, yd, wd, val, epochs, callbacks, shuffle, history, verbose, interrupt_checkpoint,
                             use_graphs)
        for cb in callbacks:
            cb.on_train_end(self, history)
        return history

    def _fit_weights(self, yd: Any, sample_weight: Any, class_weight: Any) -> Any:
        """The rows' weights for ``fit`` (sample_weight times the class weights) as an array of the model's
        backend, or None when neither is given."""
        model = self.model
        n = yd.shape[0]
        w = None if sample_weight is None else check_sample_weight(sample_weight, n)
        if class_weight is not None:
            bk = model.backend
            if self.loss == "cross_entropy":
                n_classes, classes = model.sizes[-1], model.classes_
                with bk.device_scope():
                    index = yd if yd.ndim == 1 else bk.xp.argmax(yd, axis=1)
            elif self.loss == "binary_cross_entropy" and yd.shape[1] == 1:
                n_classes, classes = 2, None
                with bk.device_scope():
                    index = yd[:, 0] > 0.5
            else:
                raise ValueError(f"class_weight is for classification (cross_entropy, or binary_cross_entropy "
                                 f"with one output), not {self.loss!r} with {yd.shape[1:]} targets per row: "
                                 f"use sample_weight")
            index = np.asarray(bk.to_numpy(index), np.int64)  # one read of the labels per fit
            per_row = class_weights(class_weight, index, n_classes, classes)[index]
            w = per_row if w is None else w * per_row
            if not w.any():
                raise ValueError("class_weight (with sample_weight) weighs every row 0: nothing would be learned")
        return None if w is None else model.backend.asarray(w, model.dtype)

    def _fit_epochs(self, Xd: Any, yd: Any, wd: Any, val: Any, epochs: int, callbacks: list[Callback],
                    shuffle: bool, history: History, verbose: int, interrupt_checkpoint: Any, graphs: bool) -> None:
        """The epochs of ``fit``; ``graphs``: its steps are ``StepGraphs.step``'s (inside their session)."""
        bk = self.model.backend
        n = Xd.shape[0]
        bs = min(self.batch_size, n)
        sizes = np.array([min(bs, n - s) for s in range(0, n, bs)], np.float64)
        batches = _BatchBuffers(bk, Xd, yd, wd, self._graphs.batch_buffers if graphs else None)
        dist = self.distributed
        # each step's [loss, correct count]: written by the loss kernel and read once at the epoch's end, or,
        # in data-parallel training, the reduced values that each step reads anyway
        stats = np.zeros((len(sizes), 2)) if dist else bk.zeros((len(sizes), 2), accumulator_dtype(self.model.dtype))
        classify = self.loss in CLASSIFICATION_LOSSES
        reporter = Reporter(verbose, epochs, len(sizes))
        self.stop_training = False
        for cb in callbacks:
            cb.on_train_begin(self)
        epoch_start = (self.epoch, self.rng.bit_generator.state)
        try:
            for _ in range(epochs):
                epoch_start = (self.epoch, self.rng.bit_generator.state)
                self.epoch += 1
                for cb in callbacks:
                    cb.on_epoch_begin(self, self.epoch)
                reporter.epoch_begin()
                start = time.perf_counter()
                skipped = self.skipped_steps
                order = self.rng.permutation(n) if shuffle else np.arange(n)
                idx = bk.asarray(order)
                taken = np.ones(len(sizes), bool)
                for k, s in enumerate(range(0, n, bs)):
                    size = int(sizes[k])
                    if dist:  # this rank's rows of the global batch
                        lo, hi = shard(size, self.comm.rank, self.comm.size)
                        taken[k] = self._dist_step(*batches.take(idx[s + lo:s + hi]), size, stats[k])
                    else:
                        xb, yb, wb = batches.take(idx[s:s + size])
                        value = self._graphs.step(xb, yb, stats[k]) if graphs else self._step(xb, yb, stats[k], wb)[0]
                        taken[k] = value is not None  # a step skipped as non-finite is not in the metrics
                        if self._guard.due():
                            self._check_deferred()
                    if reporter.bar is not None:
                        reporter.bar.update()
                host = stats[taken] if dist else self._check_deferred(stats).reshape(-1, 2)[taken]
                # the epoch's metrics are over the rows of the steps taken (all of them unless skipped)
                rows_taken = float(sizes[taken].sum()) if taken.any() else math.nan
                row: dict[str, Any] = {"epoch": self.epoch, "loss": float(host[:, 0] @ sizes[taken]) / rows_taken}
                if classify:
                    row["accuracy"] = float(host[:, 1].sum()) / _targets_per_row(yd, self.loss) / rows_taken
                if val is not None:
                    row.update({f"val_{k}": v for k, v in self._evaluate(*val).items()})
                if self.on_nonfinite == "skip":
                    row["skipped"] = self.skipped_steps - skipped
                row["lr"] = self.optimizer.lr
                row["time"] = time.perf_counter() - start
                history.epochs.append(row)
                reporter.epoch(row)
                for cb in callbacks:
                    cb.on_epoch_end(self, self.epoch, row)
                if self.stop_training:
                    break
        except KeyboardInterrupt:
            self._check_deferred()  # a divergence before the interrupt is reported, not saved over
            history.interrupted = True
            self.epoch, state = epoch_start
            self.rng.bit_generator.state = state
            if interrupt_checkpoint is not None:
                self.save_checkpoint(interrupt_checkpoint)
        finally:
            reporter.close()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Any) -> Path:
        """Write the model, the optimizer (hyperparameters, schedule, state), the epoch and step counts and
        the shuffling generator's state to one .npz file, atomically; returns the path written. In
        data-parallel training rank 0 writes it (every rank holds the same state); the others write nothing
        and return the path."""
        if not self.is_writer:
            return Path(path)
        return save_checkpoint(self, path)

    @classmethod
    def load_checkpoint(cls, path: Any, backend: Any = None, comm: Communicator | None = None) -> Trainer:
        """A Trainer restored from ``save_checkpoint``, on ``backend`` (None: the active one); training
        resumes exactly where it was saved (bit-identically on the CPU backends). ``comm``: the
        communicator of a data-parallel run (a checkpoint holds the global batch size, not the number of
        ranks, so a run resumes at any number of them)."""
        return load_checkpoint(path, backend, functools.partial(cls, comm=comm))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, X: Any, y: Any, sample_weight: Any = None) -> dict[str, float]:
        """{'loss': mean loss, 'accuracy': fraction correct (classification losses)} on (X, y); the loss
        weighted by ``sample_weight`` when given (as in ``fit``)."""
        Xd, yd = self.model.prepare_batch(X, y, self.loss)
        return self._evaluate(Xd, yd, self.model.prepare_weights(sample_weight, Xd.shape[0]))

    def _evaluate(self, Xd: Any, yd: Any, weights: Any = None) -> dict[str, float]:
        """The metrics on prepared arrays; in data-parallel training each rank evaluates its shard of the
        rows and the sums are reduced, so every rank returns the same metrics."""
        n = Xd.shape[0]
        if not self.distributed:
            value, correct = self._metric_sums(Xd, yd, weights)
        else:
            lo, hi = shard(n, self.comm.rank, self.comm.size)
            sums = np.zeros(2)
            if hi > lo:
                part, sums[1] = self._metric_sums(Xd[lo:hi], yd[lo:hi], None if weights is None else weights[lo:hi])
                sums[0] = part * (hi - lo)
            self.comm.allreduce_host(sums)
            value, correct = sums[0] / n, sums[1]
        metrics = {"loss": value}
        if self.loss in CLASSIFICATION_LOSSES:
            metrics["accuracy"] = correct / _targets_per_row(yd, self.loss) / n
        return metrics

    def _metric_sums(self, Xd: Any, yd: Any, weights: Any) -> tuple[float, float]:
        """(mean loss, correct count) of the rows of Xd, read in one transfer."""
        bk = self.model.backend
        with bk.device_scope():
            out = self.model.forward(Xd)
            stats = bk.empty((2,), accumulator_dtype(self.model.dtype))
            bk.output_delta(out, yd, self.loss, stats_out=stats, weights=weights)
            value, correct = (float(v) for v in bk.to_numpy(stats))  # one read
        return value, correct

    def predict(self, X: Any) -> np.ndarray:
        """Host numpy predictions: class labels for cross_entropy (in the training labels' values),
        0/1 per output for binary_cross_entropy, the outputs for mse (see ``MLP.predict``)."""
        self.model.loss_ = self.loss
        return self.model.predict(X)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within, SIGTERM raises KeyboardInterrupt, so a terminated fit ends as Ctrl-C ends it (checkpoint
    saved). Only in the main thread (where Python runs signal handlers) and only over the default
    handler: a handler the program installed itself is left alone."""
    term = getattr(signal, "SIGTERM", None)
    if term is None or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(term) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

    signal.signal(term, interrupt)
    try:
        yield
    finally:
        signal.signal(term, signal.SIG_DFL)


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """Within (data-parallel training), SIGINT and SIGTERM set a flag that rides in the next step's
    allreduce, so every rank stops at the same step (a KeyboardInterrupt raised on one rank alone would
    leave the others waiting). Only in the main thread, and only over the default handlers."""
    defaults = {signal.SIGINT: signal.default_int_handler, getattr(signal, "SIGTERM", None): signal.SIG_DFL}
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        trainer._stop_requested = True

    replaced = {}
    for sig, default in defaults.items():
        if sig is not None and signal.getsignal(sig) is default:
            replaced[sig] = default
            signal.signal(sig, request_stop)
    trainer._stop_requested = False
    try:
        yield
    finally:
        for sig, default in replaced.items():
            signal.signal(sig, default)


class _BatchBuffers:
    """The reused batch buffers of ``fit``, by row count (one or two sizes; a rank's slices in data-parallel
    training, two or three)."""

    def __init__(self, bk: Any, Xd: Any, yd: Any, wd: Any, kept: dict[tuple, Any] | None = None) -> None:
        """``kept``: where the buffers are kept, by row count and layout (a fit's own dict by default; CUDA
        graphs hand theirs, so that the next fit gathers into the buffers their graphs captured)."""
        self.bk, self.Xd, self.yd, self.wd = bk, Xd, yd, wd
        self._kept: dict[tuple, tuple[Any, Any, Any]] = {} if kept is None else kept
        # the buffers' key but for the row count: what the data's rows look like
        self._rows_like = (Xd.shape[1:], Xd.dtype, yd.shape[1:], yd.dtype, None if wd is None else wd.dtype)

    def take(self, rows_idx: Any) -> tuple[Any, Any, Any]:
        """The rows ``rows_idx`` of X, y and the weights, gathered into the buffers of their count."""
        bk, Xd, yd, wd = self.bk, self.Xd, self.yd, self.wd
        rows = rows_idx.shape[0]
        key = (rows, self._rows_like)
        kept = self._kept.get(key)
        if kept is None:
            kept = self._kept[key] = (bk.empty((rows,) + Xd.shape[1:], Xd.dtype),
                                      bk.empty((rows,) + yd.shape[1:], yd.dtype),
                                      None if wd is None else bk.empty((rows,), wd.dtype))
        xb, yb, wb = kept
        bk.take_rows(Xd, rows_idx, out=xb)
        bk.take_rows(yd, rows_idx, out=yb)
        if wb is not None:
            bk.take_rows(wd, rows_idx, out=wb)
        return kept


_NO_GRAPHS = contextlib.nullcontext(False)  # a fit without CUDA graphs


def _targets_per_row(yd: Any, loss: str) -> int:
    return yd.shape[1] if loss == "binary_cross_entropy" else 1
