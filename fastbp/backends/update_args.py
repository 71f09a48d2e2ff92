"""The fused optimizer updates' hyperparameters as named structures, one per update, shared by the compiled
backends: the Numba kernels read them as record arrays, the CUDA kernels as structs passed by value
(kernels/codes.cuh declares the same structs, generated from ``STRUCTS``).

Every field is 8 bytes (flags as int64), so no structure has padding and the C layout equals NumPy's.
Constants with a product in them (bias1, shrink = 1 - lr * weight_decay) are computed here, in Python, as
the reference computes them: a compiler would contract them into an FMA, rounded otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: The structure of each fused update (by ``Optimizer.fused`` name): its C name and its fields.
STRUCTS: dict[str, tuple[str, np.dtype]] = {
    "sgd": ("SgdArgs", np.dtype([("lr", "f8"), ("momentum", "f8"), ("dampening", "f8"), ("weight_decay", "f8"),
                                 ("nesterov", "i8"), ("first", "i8")])),
    "adam": ("AdamArgs", np.dtype([("lr", "f8"), ("beta1", "f8"), ("beta2", "f8"), ("eps", "f8"),
                                   ("weight_decay", "f8"), ("bias1", "f8"), ("bias2_sqrt", "f8"), ("shrink", "f8"),
                                   ("decoupled", "i8")])),
    "rmsprop": ("RmspropArgs", np.dtype([("lr", "f8"), ("alpha", "f8"), ("eps", "f8"), ("momentum", "f8"),
                                         ("weight_decay", "f8")])),
}


def _sgd(lr: float, step: int, hp: Any) -> tuple:
    return lr, hp.momentum, hp.dampening, hp.weight_decay, hp.nesterov, step == 1


def _adam(lr: float, step: int, hp: Any) -> tuple:
    beta1, beta2 = hp.betas
    return (lr, beta1, beta2, hp.eps, hp.weight_decay, 1 - beta1**step, math.sqrt(1 - beta2**step),
            1 - lr * hp.weight_decay, hp.decoupled)


def _rmsprop(lr: float, step: int, hp: Any) -> tuple:
    return lr, hp.alpha, hp.eps, hp.momentum, hp.weight_decay


_VALUES = {"sgd": _sgd, "adam": _adam, "rmsprop": _rmsprop}


def update_args(update: str, lr: float, step: int, hp: Any, out: np.ndarray | None = None) -> np.ndarray:
    """The structure of the fused update ``update`` for this step (learning rate ``lr``, step number
    ``step`` from 1, the optimizer's hyperparameters ``hp``), as a one-element structured array: ``out``
    when given (filling one costs a fifth of making one, ~0.5 us against ~2.4 us)."""
    values = _VALUES[update](lr, step, hp)
    if out is None:
        return np.array([values], STRUCTS[update][1])
    out[0] = values
    return out


def c_struct(update: str) -> str:
    """The C declaration of the structure of ``update``, with a check of its size."""
    name, dtype = STRUCTS[update]
    c_types = {"f8": "double", "i8": "long long"}
    fields = "".join(f"    {c_types[dtype[f].str[1:]]} {f};\n" for f in dtype.names or ())
    return (f"struct {name} {{\n{fields}}};\n"
            f'static_assert(sizeof({name}) == {dtype.itemsize}, "{name} differs from its NumPy structure");\n')
