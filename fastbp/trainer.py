"""The Trainer: minibatch training of an MLP with an optimizer, backend-agnostic.

Data goes to the model's backend once per ``fit``; each step gathers its batch on the backend into a
reused buffer, runs the model's fused forward/backward and the optimizer's in-place update. The loss is
accumulated on the backend and read back once per epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._checks import check_choice, check_features, check_positive_int
from .callbacks import Callback
from .layers import MLP
from .losses import CLASSIFICATION_LOSSES, check_loss
from .optim import Adam, Optimizer

PROGRESS = ("auto", "bar", "lines", "none")


@dataclass
class History:
    """Per-epoch metrics of a ``fit``: ``history['loss']`` is the list of epoch losses, and so on."""

    epochs: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, key: str) -> list[Any]:
        if not self.epochs or key not in self.epochs[0]:
            raise KeyError(f"{key!r} is not a logged metric; logged: {self.keys()}")
        return [row[key] for row in self.epochs]

    def keys(self) -> list[str]:
        return list(self.epochs[0]) if self.epochs else []

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def history(self) -> dict[str, list[Any]]:
        """The metrics as a dict of lists (Keras style)."""
        return {k: self[k] for k in self.keys()}


class Trainer:
    """Trains ``model`` on ``loss`` with ``optimizer`` in minibatches.

    Args:
        model: the MLP to train (updated in place).
        loss: 'cross_entropy', 'binary_cross_entropy' or 'mse'.
        optimizer: an ``fastbp.optim`` optimizer; default Adam(lr=1e-3).
        batch_size: rows per step; the last batch of an epoch may be smaller.
        seed: seed of the shuffling generator.
    """

    def __init__(self, model: MLP, loss: str = "cross_entropy", optimizer: Optimizer | None = None,
                 batch_size: int = 64, seed: int | None = 0) -> None:
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a fastbp.MLP, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a fastbp.optim optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.loss = check_loss(loss)
        self.optimizer = optimizer if optimizer is not None else Adam(lr=1e-3)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.stop_training = False

    # ------------------------------------------------------------------ one step
    def step(self, X: Any, y: Any) -> float:
        """One optimizer step on one batch; returns the batch's loss (before the update)."""
        Xd, yd = self.model.prepare_batch(X, y, self.loss)
        value, _ = self._step(Xd, yd)
        return self.model.backend.to_float(value)

    def _step(self, Xd: Any, yd: Any) -> tuple[Any, Any]:
        model = self.model
        fused = model.backend.train_step(model, Xd, yd, self.loss, self.optimizer)
        if fused is not None:
            return fused
        value, _, output = model._loss_and_grads(Xd, yd, self.loss)
        self.optimizer.step([model.flat_parameters()], [model.flat_grad()], model.backend)
        return value, output

    # ------------------------------------------------------------------ many epochs
    def fit(
        self,
        X: Any,
        y: Any,
        epochs: int = 10,
        validation_data: tuple[Any, Any] | None = None,
        callbacks: Sequence[Callback] | None = None,
        shuffle: bool = True,
        progress: str = "auto",
    ) -> History:
        """Train for ``epochs`` passes over (X, y); returns the History of per-epoch metrics.

        Args:
            validation_data: (X_val, y_val) evaluated after each epoch (val_loss, val_accuracy).
            callbacks: ``fastbp.callbacks.Callback`` instances.
            shuffle: reshuffle the rows each epoch with the trainer's seeded generator.
            progress: 'auto' (a bar on a terminal when tqdm is installed, else a line per epoch on a
                terminal, nothing otherwise), 'bar', 'lines' or 'none'.
        """
        epochs = check_positive_int(epochs, "epochs")
        check_choice(progress, PROGRESS, "progress")
        callbacks = list(callbacks or [])
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fastbp Callback instances, got {type(cb).__name__}")
        model, bk = self.model, self.model.backend
        Xd, yd = model.prepare_batch(X, y, self.loss)
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise TypeError("validation_data must be a pair (X_val, y_val)")
            val = model.prepare_batch(validation_data[0], validation_data[1], self.loss)

        n = Xd.shape[0]
        bs = min(self.batch_size, n)
        batches = {size: (bk.empty((size,) + Xd.shape[1:], Xd.dtype), bk.empty((size,) + yd.shape[1:], yd.dtype))
                   for size in {bs, n % bs or bs}}
        classify = self.loss in CLASSIFICATION_LOSSES
        history = History()
        reporter = _Reporter(progress, epochs)
        self.stop_training = False
        for cb in callbacks:
            cb.on_train_begin(self)
        try:
            for _ in range(epochs):
                self.epoch += 1
                for cb in callbacks:
                    cb.on_epoch_begin(self, self.epoch)
                start = time.perf_counter()
                order = self.rng.permutation(n) if shuffle else np.arange(n)
                idx = bk.asarray(order)
                total_loss, correct = 0.0, 0
                for s in range(0, n, bs):
                    size = min(bs, n - s)
                    xb, yb = batches[size]
                    bk.take_rows(Xd, idx[s:s + size], out=xb)
                    bk.take_rows(yd, idx[s:s + size], out=yb)
                    value, output = self._step(xb, yb)
                    total_loss = total_loss + value * size
                    if classify:
                        correct = correct + bk.correct_count(output, yb, self.loss)
                row: dict[str, Any] = {"epoch": self.epoch, "loss": bk.to_float(total_loss) / n}
                if classify:
                    row["accuracy"] = bk.to_float(correct) / _targets_per_row(yd, self.loss) / n
                if val is not None:
                    row.update({f"val_{k}": v for k, v in self._evaluate(*val).items()})
                row["lr"] = self.optimizer.lr
                row["time"] = time.perf_counter() - start
                history.epochs.append(row)
                reporter.epoch(row)
                for cb in callbacks:
                    cb.on_epoch_end(self, self.epoch, row)
                if self.stop_training:
                    break
        finally:
            reporter.close()
        for cb in callbacks:
            cb.on_train_end(self, history)
        return history

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, X: Any, y: Any) -> dict[str, float]:
        """{'loss': mean loss, 'accuracy': fraction correct (classification losses)} on (X, y)."""
        return self._evaluate(*self.model.prepare_batch(X, y, self.loss))

    def _evaluate(self, Xd: Any, yd: Any) -> dict[str, float]:
        bk = self.model.backend
        out = self.model.forward(Xd)
        metrics = {"loss": bk.to_float(bk.loss_value(out, yd, self.loss))}
        if self.loss in CLASSIFICATION_LOSSES:
            metrics["accuracy"] = (bk.to_float(bk.correct_count(out, yd, self.loss))
                                   / _targets_per_row(yd, self.loss) / Xd.shape[0])
        return metrics

    def predict(self, X: Any) -> np.ndarray:
        """Host numpy predictions: class labels for cross_entropy, 0/1 per output for
        binary_cross_entropy, the outputs for mse."""
        X = check_features(X, self.model.sizes[0])
        bk = self.model.backend
        out = self.model.forward(X)
        if self.loss == "cross_entropy":
            return bk.to_numpy(bk.xp.argmax(out, axis=1))
        if self.loss == "binary_cross_entropy":
            return bk.to_numpy(out > 0).astype(np.int64)
        return bk.to_numpy(out)


def _targets_per_row(yd: Any, loss: str) -> int:
    return yd.shape[1] if loss == "binary_cross_entropy" else 1


class _Reporter:
    """Progress per epoch: a tqdm bar, a printed line, or nothing."""

    def __init__(self, progress: str, epochs: int) -> None:
        tty = sys.stderr.isatty()
        if progress == "auto":
            progress = ("bar" if _has_tqdm() else "lines") if tty else "none"
        if progress == "bar" and not _has_tqdm():
            progress = "lines"
        self.mode = progress
        self.epochs = epochs
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=epochs, unit="epoch", file=sys.stderr, leave=True)

    def epoch(self, row: dict[str, Any]) -> None:
        metrics = {k: v for k, v in row.items() if k not in ("epoch", "time", "lr")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)
            self.bar.update(1)
        elif self.mode == "lines":
            text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"epoch {row['epoch']:>3}/{self.epochs}  {text}  ({row['time']:.3f} s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True
