"""fastbp: fast backpropagation for multilayer perceptrons, one API on NumPy, Numba and CuPy."""

from __future__ import annotations

from . import callbacks, datasets, distributed, optim
from .activations import register as register_activation
from .backends import available_backends, backend_status, get_backend, set_backend, use_backend
from .callbacks import Callback, EarlyStopping, ModelCheckpoint, PeriodicCheckpoint
from .divergence import DivergenceError
from .gradcheck import gradcheck
from .history import History
from .layers import MLP, Dense, load
from .threads import get_num_threads, num_threads, set_num_threads
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "MLP", "Dense", "Trainer", "History", "DivergenceError", "Callback", "EarlyStopping", "ModelCheckpoint",
    "PeriodicCheckpoint",
    "available_backends", "backend_status", "get_backend", "set_backend", "use_backend",
    "gradcheck", "load", "register_activation", "datasets", "optim", "callbacks", "distributed", "__version__",
    "get_num_threads", "set_num_threads", "num_threads",
]
