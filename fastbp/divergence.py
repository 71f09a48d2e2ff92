"""The divergence protocol: what a Trainer does when a step's loss or gradient is not finite.

On CPU backends the Trainer reads each step's loss and gradient norm (a read costs nothing there) and,
before any update, raises a DivergenceError or skips the step. On backends with deferred checks (GPUs) a
read per step would stall the device's queue: there a ``DivergenceGuard`` on the device is tripped by the
first non-finite step (or invalid batch, ``Backend.check_batch``), every later update is gated off, and the
Trainer reads the guard every DEFERRED_CHECK_STEPS steps and at each epoch's end, in the same transfer as
the epoch's metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: On a backend with deferred checks (a GPU), how many steps may pass between reads of the non-finite
#: guard. Steps after a non-finite one change nothing (their updates are gated off on the device), so a
#: longer interval costs only wasted work after a divergence, never correctness.
DEFERRED_CHECK_STEPS = 32
#: What a non-finite step does: raise a DivergenceError, or skip the step and count it.
ON_NONFINITE = ("raise", "skip")


class DivergenceError(FloatingPointError):
    """Training met a non-finite loss or gradient; the parameters are those before that step."""


def divergence_message(epoch: int, step: int, loss: float, sumsq: float) -> str:
    """The DivergenceError's text for a non-finite ``loss`` or squared gradient norm ``sumsq``."""
    what = "loss" if not math.isfinite(loss) else "gradient"
    return (f"non-finite {what} at epoch {epoch}, step {step} (loss {loss}, squared gradient norm {sumsq}); "
            f"the parameters and optimizer state are those before this step. Lower the learning rate, set "
            f"clip_norm, or pass on_nonfinite='skip' to skip such steps.")


@dataclass
class Tripped:
    """What a tripped guard recorded: ``kind`` 1 for a non-finite step (``first``: its loss, ``second``: its
    squared gradient norm), 2 for an invalid batch (``first``: how many values, ``second``: the targets'
    kind); ``step`` the step number."""

    kind: int
    step: int
    first: float
    second: float


class DivergenceGuard:
    """The device-side guard of one Trainer (backends with deferred checks, 'raise' mode): the array the
    backend's ``nonfinite_guard`` and ``check_batch`` trip and the update kernels read as their guard, the
    count of steps since it was last read, and the read."""

    def __init__(self) -> None:
        self._array: Any = None
        self._backend: Any = None
        self.unchecked = 0  # steps taken since the guard was last read

    def array(self, backend: Any) -> Any:
        """The guard on ``backend`` (a fresh one for a new backend, or after a trip)."""
        if self._array is None or self._backend is not backend:
            self._array, self._backend = backend.guard_state(), backend
        return self._array

    def due(self) -> bool:
        """Whether DEFERRED_CHECK_STEPS steps have passed since the last read."""
        return self.unchecked >= DEFERRED_CHECK_STEPS

    def read(self, backend: Any, extra: Any = None) -> tuple[Tripped | None, np.ndarray]:
        """Read the guard, with ``extra`` (a backend array) in the same transfer: (what tripped it, or None;
        ``extra`` as a flat float64 host array, empty when None). Without steps since the last read only
        ``extra`` is read."""
        if not self.unchecked:
            return None, (np.zeros(0) if extra is None else np.asarray(backend.to_numpy(extra), np.float64).reshape(-1))
        self.unchecked = 0
        xp = backend.xp
        parts = [self._array] + ([] if extra is None else [xp.asarray(extra, dtype=np.float64).reshape(-1)])
        host = backend.to_numpy(xp.concatenate(parts))
        kind, step, first, second = (float(v) for v in host[:4])
        if not kind:
            return None, host[4:]
        self._array = None  # a fresh guard for any training after the error
        return Tripped(int(kind), int(step), first, second), host[4:]
