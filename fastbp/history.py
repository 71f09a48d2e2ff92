"""The History of a ``Trainer.fit``: per-epoch metrics, as Keras's History."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    """Per-epoch metrics of a ``fit``: ``history['loss']`` is the list of epoch losses, and so on."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    #: True when Ctrl-C ended the fit early (the last row is the last completed epoch).
    interrupted: bool = False

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
