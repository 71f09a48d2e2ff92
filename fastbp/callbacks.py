"""Training callbacks.

The protocol: subclass ``Callback`` and override any of its hooks. ``Trainer.fit`` calls them in this
order: ``on_train_begin(trainer)``, then for each epoch ``on_epoch_begin(trainer, epoch)`` and
``on_epoch_end(trainer, epoch, logs)`` where ``logs`` is the epoch's History row (loss, accuracy,
val_loss, val_accuracy, lr, time, ...), and finally ``on_train_end(trainer, history)``. A callback stops
training by setting ``trainer.stop_training = True``; it may read ``trainer.model`` and
``trainer.optimizer`` but should not replace them. Epochs are numbered from 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._checks import check_choice, check_nonneg_float, check_positive_int


class Callback:
    """Base class with no-op hooks."""

    def on_train_begin(self, trainer: Any) -> None:
        pass

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        pass

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: Any, history: Any) -> None:
        pass


class _Monitor:
    """Tracks the best value of one metric ('min' for losses, 'max' for accuracies)."""

    def __init__(self, monitor: str, mode: str, min_delta: float) -> None:
        self.monitor = monitor
        mode = check_choice(mode, ("auto", "min", "max"), "mode")
        self.mode = mode if mode != "auto" else ("max" if "acc" in monitor else "min")
        self.min_delta = check_nonneg_float(min_delta, "min_delta")
        self.best = math.inf if self.mode == "min" else -math.inf

    def value(self, logs: dict[str, Any]) -> float:
        if self.monitor not in logs:
            raise ValueError(f"monitor {self.monitor!r} is not among the logged metrics {sorted(logs)}; "
                             f"val_* metrics need validation_data")
        return float(logs[self.monitor])

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            better = value < self.best - self.min_delta
        else:
            better = value > self.best + self.min_delta
        if better:
            self.best = value
        return better


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs; optionally restore
    the weights of the best epoch."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = True) -> None:
        self._monitor = _Monitor(monitor, mode, min_delta)
        self.patience = check_positive_int(patience, "patience")
        self.restore_best_weights = bool(restore_best_weights)
        self.best_epoch = 0
        self.stopped_epoch = 0
        self._best_weights: list[Any] | None = None
        self._wait = 0

    @property
    def best(self) -> float:
        return self._monitor.best

    def on_train_begin(self, trainer: Any) -> None:
        self._monitor.best = math.inf if self._monitor.mode == "min" else -math.inf
        self._wait, self.best_epoch, self.stopped_epoch, self._best_weights = 0, 0, 0, None

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, Any]) -> None:
        if self._monitor.improved(self._monitor.value(logs)):
            self._wait, self.best_epoch = 0, epoch
            if self.restore_best_weights:
                self._best_weights = trainer.model.get_weights()
            return
        self._wait += 1
        if self._wait >= self.patience:
            trainer.stop_training = True
            self.stopped_epoch = epoch

    def on_train_end(self, trainer: Any, history: Any) -> None:
        if self.restore_best_weights and self._best_weights is not None and self.stopped_epoch:
            trainer.model.set_weights(self._best_weights)


class ModelCheckpoint(Callback):
    """Save the model after an epoch: every epoch, or only when ``monitor`` improved.

    ``path`` may contain ``{epoch}`` (and any logged metric, e.g. ``{val_loss:.3f}``). In data-parallel
    training rank 0 alone writes (every rank holds the same weights and decides alike).
    """

    def __init__(self, path: Any, monitor: str = "val_loss", save_best_only: bool = True,
                 mode: str = "auto") -> None:
        self.path = str(path)
        self.save_best_only = bool(save_best_only)
        self._monitor = _Monitor(monitor, mode, 0.0)
        self.saved: list[Path] = []

    def on_train_begin(self, trainer: Any) -> None:
        self._monitor.best = math.inf if self._monitor.mode == "min" else -math.inf

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, Any]) -> None:
        if self.save_best_only and not self._monitor.improved(self._monitor.value(logs)):
            return
        if getattr(trainer, "is_writer", True):
            self.saved.append(trainer.model.save(self.path.format(**logs)))


class PeriodicCheckpoint(Callback):
    """Write a training checkpoint (``Trainer.save_checkpoint``: model, optimizer, counts, shuffling state)
    every ``every`` epochs, over the same file: what a job killed without warning resumes from (a Ctrl-C
    sent to mpiexec ends the ranks without Python's KeyboardInterrupt)."""

    def __init__(self, path: Any, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of epochs, got {every!r}")
        self.path = path
        self.every = every

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, Any]) -> None:
        if epoch % self.every == 0:
            trainer.save_checkpoint(self.path)
