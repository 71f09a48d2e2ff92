"""Losses: names, target checks and preparation. The fused math (eq. 1) is the backend's
``output_delta`` op; every loss is the mean over the batch, numerically as PyTorch's:

- 'mse': mean over all elements of (output - y)^2 (torch.nn.MSELoss)
- 'cross_entropy': logits with integer labels or one-hot/probability rows (torch.nn.CrossEntropyLoss)
- 'binary_cross_entropy': logits with targets in [0, 1] (torch.nn.BCEWithLogitsLoss)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import check_choice, check_finite, check_nonneg_float, host_array, to_host

#: The loss names, as ``Trainer(loss=...)`` and every backend's ``output_delta`` take them.
LOSSES = ("mse", "cross_entropy", "binary_cross_entropy")
#: The compiled kernels' codes for a loss with its form of targets (Numba's output_delta and whole step,
#: CUDA's pointwise_loss), one table: kernels/codes.cuh is generated from it.
LOSS_CODES = {"cross_entropy_labels": 0, "cross_entropy_soft": 1, "binary_cross_entropy": 2, "mse": 3}
#: The forms of prepared targets, as ``Backend.check_batch`` (and CUDA's check_batch KIND) numbers them:
#: integer labels in [0, C), targets that must be finite (mse), targets in [0, 1] (the classification losses).
TARGET_KINDS = ("labels", "finite", "unit")


def loss_code(loss: str, labels: bool) -> int:
    """The kernels' code (``LOSS_CODES``) of ``loss`` with labels (1-D integer targets) or target rows."""
    if loss == "cross_entropy":
        return LOSS_CODES["cross_entropy_labels" if labels else "cross_entropy_soft"]
    if loss not in LOSS_CODES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return LOSS_CODES[loss]

CLASSIFICATION_LOSSES = ("cross_entropy", "binary_cross_entropy")


def check_loss(loss: Any) -> str:
    """Validate a loss name."""
    return check_choice(loss, LOSSES, "loss")


def prepare_targets(y: Any, loss: str, n_out: int, n_samples: int, dtype: np.dtype,
                    classes: np.ndarray | None = None) -> np.ndarray:
    """Check the targets for ``loss`` and return them in the form ``Backend.output_delta`` takes.

    Args:
        y: labels or targets (numpy or backend array, list).
        loss: a loss name.
        n_out: the network's output width.
        n_samples: the number of rows of X, which y must match.
        dtype: the model's float dtype.
        classes: the model's ``classes_`` (see ``learn_classes``): cross_entropy labels are encoded as
            their index in it. None: the labels are the class indices.
    Returns:
        int64 labels (B,) for cross_entropy with labels; otherwise float targets (B, n_out) in dtype.
    Raises:
        ValueError, TypeError: naming ``y`` and what was wrong.
    """
    if classes is not None and not is_identity(classes) and loss == "cross_entropy":
        labels = np.asarray(to_host(y))
        if labels.ndim == 1:
            if labels.shape != (n_samples,):
                raise ValueError(f"y must have one row per sample of X ({n_samples}), got shape {labels.shape}")
            return encode_labels(labels, classes)
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
    check_finite(targets, "y")
    if loss in CLASSIFICATION_LOSSES and (targets.min() < 0 or targets.max() > 1):
        raise ValueError(f"y targets for {loss} must lie in [0, 1], got range [{targets.min()}, {targets.max()}]")
    return targets


def is_identity(classes: np.ndarray) -> bool:
    """Whether ``classes`` are 0, 1, ..., n-1: labels that are their own class index."""
    return classes.dtype.kind in "iu" and np.array_equal(classes, np.arange(len(classes)))


def learn_classes(y: Any, n_out: int) -> np.ndarray:
    """The classes of a network with ``n_out`` outputs trained with cross_entropy on labels ``y``.

    Integer labels that all lie in [0, n_out) are class indices already: the classes are 0..n_out-1 (a
    batch need not hold every class). Any other labels (strings, {1, 2, 3}, {0, 10, 20}) are encoded as
    scikit-learn encodes them, by their sorted order, and must then number exactly n_out.
    """
    labels = np.asarray(to_host(y))
    if labels.ndim != 1:
        raise ValueError(f"class labels must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind not in "biufUS":
        raise TypeError(f"y must hold class labels (integers or strings), got dtype {labels.dtype}")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise TypeError("y must hold integer class labels for cross_entropy, got non-integer floats")
        labels = labels.astype(np.int64)
    if labels.dtype.kind == "b":
        raise TypeError("y must hold integer class labels for cross_entropy, got bool")
    values = np.unique(labels)
    if labels.dtype.kind in "iu" and values[0] >= 0 and values[-1] < n_out:
        return np.arange(n_out)
    if len(values) != n_out:
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise ValueError(f"y holds {len(values)} distinct labels ({shown}) for a network with {n_out} outputs: "
                         f"labels are either class indices in [0, {n_out}) or exactly {n_out} distinct values, "
                         f"encoded in sorted order (set model.classes_ to choose the classes)")
    return values


def encode_labels(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each label's index in ``classes`` (sorted), int64; ValueError naming labels that are not classes."""
    if labels.dtype.kind not in "biufUS" or (labels.dtype.kind in "US") != (classes.dtype.kind in "US"):
        raise TypeError(f"y labels of dtype {labels.dtype} cannot be the model's classes {list(classes[:8])}")
    index = np.searchsorted(classes, labels)
    index = np.minimum(index, len(classes) - 1)
    unknown = classes[index] != labels
    if unknown.any():
        extra = np.unique(labels[unknown])[:5]
        raise ValueError(f"y holds labels that are not among the model's classes {list(classes[:10])}: "
                         f"{', '.join(map(str, extra))}")
    return index.astype(np.int64)


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


def check_sample_weight(sample_weight: Any, n: int) -> np.ndarray:
    """Per-row weights as a float64 host array: one finite, non-negative number per row of X (``n``), not
    all zero."""
    w = host_array(sample_weight, "sample_weight")
    if w.dtype.kind not in "biuf":
        raise TypeError(f"sample_weight must be numeric, got dtype {w.dtype}")
    if w.shape != (n,):
        raise ValueError(f"sample_weight must hold one weight per row of X, shape ({n},), got {w.shape}")
    w = w.astype(np.float64)
    check_finite(w, "sample_weight")
    if (w < 0).any():
        raise ValueError(f"sample_weight must be >= 0, got {w.min()} at row {int(np.argmin(w))}")
    if not w.any():
        raise ValueError("sample_weight is zero for every row: nothing would be learned")
    return w


def class_weights(class_weight: Any, index: np.ndarray, n_classes: int, classes: np.ndarray | None) -> np.ndarray:
    """The weight of each class (n_classes,), float64, from ``class_weight``: 'balanced' (n_rows /
    (classes present * the class's count), as scikit-learn's compute_class_weight) or a dict {label:
    weight}, labels in the user's values (``classes``, when the model has them; else class indices);
    classes it leaves out weigh 1. ``index``: each training row's class index."""
    if isinstance(class_weight, str):
        check_choice(class_weight, ("balanced",), "class_weight")
        counts = np.bincount(index, minlength=n_classes).astype(np.float64)
        present = counts > 0
        table = np.ones(n_classes)
        table[present] = len(index) / (present.sum() * counts[present])
        return table
    if not isinstance(class_weight, dict):
        raise TypeError(f"class_weight must be 'balanced' or a dict {{label: weight}}, got "
                        f"{type(class_weight).__name__}")
    table = np.ones(n_classes)
    if not class_weight:
        return table
    labels = np.asarray(list(class_weight))
    if classes is not None:
        try:
            keys = encode_labels(labels, classes)
        except (TypeError, ValueError):
            raise ValueError(f"class_weight keys must be among the model's classes {list(classes[:10])}, got "
                             f"{list(labels)}") from None
    else:
        if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(f"class_weight keys must be class indices in [0, {n_classes}), got {list(labels)}")
        keys = labels.astype(np.int64)
    values = np.array([check_nonneg_float(v, f"class_weight[{k!r}]") for k, v in class_weight.items()])
    table[keys] = values
    return table
