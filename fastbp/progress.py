"""fit's progress display (``verbose``): silent, a tqdm bar per epoch advanced by the steps, or a line per
epoch, as Keras's verbose levels."""

from __future__ import annotations

import sys
from typing import Any

from ._checks import check_choice

#: fit's ``verbose`` levels, as Keras's: silent, a progress bar per epoch (steps), one line per epoch.
VERBOSE = (0, 1, 2, "auto")


class Reporter:
    """fit's progress (``verbose``): nothing (0), a tqdm bar per epoch advanced by the steps (1), or a
    printed line per epoch (2)."""

    def __init__(self, verbose: int, epochs: int, steps: int) -> None:
        self.verbose = verbose
        self.epochs = epochs
        self.steps = steps
        self.bar: Any = None
        self.done = 0  # epochs of this fit begun (numbered from 1 in each fit, as Keras's)

    def epoch_begin(self) -> None:
        self.done += 1
        if self.verbose == 1:
            from tqdm.auto import tqdm

            width = len(str(self.epochs))
            self.bar = tqdm(total=self.steps, desc=f"epoch {self.done:>{width}}/{self.epochs}", unit="step",
                            leave=True, dynamic_ncols=True)

    def epoch(self, row: dict[str, Any]) -> None:
        metrics = {k: v for k, v in row.items() if k not in ("epoch", "time", "lr")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)
            self.close()
        elif self.verbose == 2:
            text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"epoch {self.done:>{len(str(self.epochs))}}/{self.epochs}  {text}  ({row['time']:.3f} s)",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resolve_verbose(verbose: Any) -> int:
    """fit's ``verbose`` as 0, 1 or 2 (see ``Trainer.fit``)."""
    if isinstance(verbose, str):
        check_choice(verbose, ("auto",), "verbose")
        if not (sys.stderr.isatty() or _in_notebook()):
            return 0
        return 1 if _has_tqdm() else 2
    if verbose not in (0, 1, 2) or isinstance(verbose, float):
        raise ValueError(f"verbose must be 0 (silent), 1 (a progress bar), 2 (a line per epoch) or 'auto', "
                         f"got {verbose!r}")
    if verbose == 1 and not _has_tqdm():
        import warnings

        warnings.warn("verbose=1 draws its progress bar with tqdm, which is not installed (pip install "
                      "'fastbp[progress]'): printing a line per epoch instead", stacklevel=3)
        return 2
    return int(verbose)


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where tqdm.auto draws a widget)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True
