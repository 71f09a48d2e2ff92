"""Weight initializers, drawn on the host from a seeded numpy Generator so every backend starts from the
same weights for the same seed."""

from __future__ import annotations

import numpy as np

from ._checks import check_choice

INITIALIZERS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform")


def initialize(name: str, n_in: int, n_out: int, rng: np.random.Generator) -> np.ndarray:
    """A float64 (n_in, n_out) weight matrix.

    He (Kaiming): variance 2 / n_in, for relu-like activations. Glorot (Xavier): variance
    2 / (n_in + n_out), for sigmoid, tanh and identity. Uniform variants draw from +-sqrt(3 var).
    """
    check_choice(name, INITIALIZERS, "init")
    var = 2.0 / n_in if name.startswith("he") else 2.0 / (n_in + n_out)
    if name.endswith("normal"):
        return rng.standard_normal((n_in, n_out)) * np.sqrt(var)
    bound = np.sqrt(3.0 * var)
    return rng.uniform(-bound, bound, size=(n_in, n_out))
