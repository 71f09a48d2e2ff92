"""The NumPy backend: the reference every other backend is tested against."""

from __future__ import annotations

import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    """The base op set on numpy arrays, unchanged: the reference semantics."""

    name = "numpy"
    xp = np


def create() -> NumpyBackend:
    return NumpyBackend()
