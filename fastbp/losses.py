"""Losses: names, target checks and preparation. The fused math (eq. 1) is the backend's
``output_delta`` op; every loss is the mean over the batch, numerically as PyTorch's:

- 'mse': mean over all elements of (output - y)^2 (torch.nn.MSELoss)
- 'cross_entropy': logits with integer labels or one-hot/probability rows (torch.nn.CrossEntropyLoss)
- 'binary_cross_entropy': logits with targets in [0, 1] (torch.nn.BCEWithLogitsLoss)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import check_choice, host_array
from .backends import LOSSES

CLASSIFICATION_LOSSES = ("cross_entropy", "binary_cross_entropy")


def check_loss(loss: Any) -> str:
    """Validate a loss name."""
    return check_choice(loss, LOSSES, "loss")


def prepare_targets(y: Any, loss: str, n_out: int, n_samples: int, dtype: np.dtype) -> np.ndarray:
    """Check the targets for ``loss`` and return them in the form ``Backend.output_delta`` takes.

    Args:
        y: labels or targets (numpy or backend array, list).
        loss: a loss name.
        n_out: the network's output width.
        n_samples: the number of rows of X, which y must match.
        dtype: the model's float dtype.
    Returns:
        int64 labels (B,) for cross_entropy with labels; otherwise float targets (B, n_out) in dtype.
    Raises:
        ValueError, TypeError: naming ``y`` and what was wrong.
    """
    arr = host_array(y, "y")
    shape = target_shape(arr, loss, n_out, n_samples)
    if shape is None:
        if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr))):
            raise TypeError("y must hold integer class labels for cross_entropy, got non-integer floats")
        labels = arr.astype(np.int64)
        if labels.min() < 0 or labels.max() >= n_out:
            raise ValueError(
                f"y labels must lie in [0, {n_out}) for a network with {n_out} outputs, "
                f"got range [{labels.min()}, {labels.max()}]"
            )
        return labels
    targets = arr.reshape(shape).astype(dtype)
    if not np.isfinite(targets).all():
        raise ValueError("y contains NaN or infinite values")
    if loss in CLASSIFICATION_LOSSES and (targets.min() < 0 or targets.max() > 1):
        raise ValueError(f"y targets for {loss} must lie in [0, 1], got range [{targets.min()}, {targets.max()}]")
    return targets


def target_shape(y: Any, loss: str, n_out: int, n_samples: int) -> tuple[int, int] | None:
    """Check the shape and dtype of targets ``y`` (any array, host or device) for ``loss``: None when they
    are class labels (cross_entropy, 1-D), else the (n_samples, n_out) shape the targets take."""
    if y.dtype.kind not in "biuf":
        raise TypeError(f"y must be a numeric (bool, int or float) array, got dtype {y.dtype}")
    if y.shape[:1] != (n_samples,):
        raise ValueError(f"y must have one row per sample of X ({n_samples}), got shape {y.shape}")
    if loss == "cross_entropy" and y.ndim == 1:
        if y.dtype.kind == "b":
            raise TypeError("y must hold integer class labels for cross_entropy, got bool")
        return None
    shape = (n_samples, n_out)
    if y.shape != shape and not (y.ndim == 1 and n_out == 1):
        expected = f"({n_samples},) labels or {shape}" if loss == "cross_entropy" else f"{shape}"
        raise ValueError(f"y must have shape {expected} for loss {loss!r}, got {y.shape}")
    return shape
