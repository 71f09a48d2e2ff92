"""Gradient check: backpropagation against central differences, in float64."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import check_nonneg_float, check_positive_float, check_positive_int
from .layers import MLP
from .losses import check_loss


def gradcheck(model: MLP, X: Any, y: Any, loss: str = "mse", eps: float = 1e-5,
              max_entries: int | None = 200, seed: int = 0, floor: float = 1e-3) -> float:
    """The largest relative error between backprop gradients and central differences.

    A float64 copy of ``model`` on the same backend is used, so ``model`` is left untouched. For each
    checked entry w: numeric = (C(w + eps) - C(w - eps)) / (2 eps), and the error is
    |analytic - numeric| / max(|analytic|, |numeric|, floor * G), where G is the largest analytic
    gradient magnitude: central differences in float64 resolve a derivative only to about
    1e-16 * |C| / eps absolutely, so entries far below the gradient's scale are compared on that scale.

    Args:
        model: the model to check.
        X, y: a (small) batch and its targets.
        loss: the loss name.
        eps: the finite-difference step.
        max_entries: check at most this many entries per parameter, drawn at random (None: all).
        seed: seed of that draw.
        floor: smallest denominator, relative to G.
    Returns:
        The maximum relative error over the checked entries.
    """
    loss = check_loss(loss)
    eps = check_positive_float(eps, "eps")
    floor = check_nonneg_float(floor, "floor")
    if max_entries is not None:
        max_entries = check_positive_int(max_entries, "max_entries")
    m = model.copy(dtype="float64")
    Xd, yd = m.prepare_batch(X, y, loss)
    bk = m.backend
    _, grads, _ = m._loss_and_grads(Xd, yd, loss)
    analytic = [bk.to_numpy(g).copy() for g in grads]

    def cost() -> float:
        return bk.to_float(bk.loss_value(m.forward(Xd), yd, loss))

    rng = np.random.default_rng(seed)
    scale = floor * max(float(np.max(np.abs(g))) for g in analytic)
    scale = scale if scale > 0 else 1e-12
    worst = 0.0
    for p, g in zip(m.parameters(), analytic):
        host = bk.to_numpy(p).copy()
        flat_idx = np.arange(host.size)
        if max_entries is not None and host.size > max_entries:
            flat_idx = rng.choice(host.size, size=max_entries, replace=False)
        for k in flat_idx:
            idx = np.unravel_index(k, host.shape)
            original = host[idx]
            host[idx] = original + eps
            p[...] = bk.asarray(host)
            plus = cost()
            host[idx] = original - eps
            p[...] = bk.asarray(host)
            minus = cost()
            host[idx] = original
            p[...] = bk.asarray(host)
            numeric = (plus - minus) / (2 * eps)
            a = float(g[idx])
            err = abs(a - numeric) / max(abs(a), abs(numeric), scale)
            worst = max(worst, err)
    return worst
