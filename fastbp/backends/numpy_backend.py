"""The NumPy backend: the reference every other backend is tested against."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    """The base op set on numpy arrays, unchanged: the reference semantics."""

    name = "numpy"
    xp = np

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled by name: unpickling gives this process's numpy backend (its caches are its own)."""
        from . import resolve_backend

        return resolve_backend, (self.name,)


def create() -> NumpyBackend:
    return NumpyBackend()
