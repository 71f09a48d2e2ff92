"""Input checks shared by the public entry points. Messages name the argument, what was expected and
what came; every check runs before anything is changed."""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np

#: What users of other libraries call fastbp's names (Keras, PyTorch), for the suggestion in an error.
#: Keys are normalized by ``_normalize``.
ALIASES = {
    "categoricalcrossentropy": "cross_entropy", "sparsecategoricalcrossentropy": "cross_entropy",
    "crossentropyloss": "cross_entropy", "crossentropy": "cross_entropy", "ce": "cross_entropy",
    "nll": "cross_entropy", "logloss": "cross_entropy", "softmax": "cross_entropy",
    "binarycrossentropy": "binary_cross_entropy", "bce": "binary_cross_entropy",
    "bcewithlogits": "binary_cross_entropy", "bcewithlogitsloss": "binary_cross_entropy",
    "meansquarederror": "mse", "mseloss": "mse", "l2": "mse", "squarederror": "mse",
    "linear": "identity", "none": "identity", "swish": "silu", "logistic": "sigmoid", "leakyrelu": "leaky_relu",
    "rmsprop": "rmsprop", "adamw": "adamw",
}


def _normalize(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def suggest(name: str, choices: Any) -> str:
    """' (did you mean 'x'?)' for a known alias of a choice or the nearest choice, or ''."""
    choices = [str(c) for c in choices]
    alias = ALIASES.get(_normalize(str(name)))
    if alias in choices:
        return f" (did you mean {alias!r}?)"
    by_normal = {_normalize(c): c for c in choices}
    if _normalize(str(name)) in by_normal:
        return f" (did you mean {by_normal[_normalize(str(name))]!r}?)"
    close = difflib.get_close_matches(str(name).lower(), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(value: Any, choices: Any, argument: str) -> str:
    """``value`` as the choice it names, matched without regard to case ('ReLU' is 'relu')."""
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a string, one of {list(choices)}, got {type(value).__name__}")
    if value in choices:
        return value
    lowered = {str(c).lower(): c for c in choices}
    if value.lower() in lowered:
        return str(lowered[value.lower()])
    raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}{suggest(value, choices)}")


def check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{argument} must be a positive integer, got {value!r}")
    return int(value)


def check_nonneg_float(value: Any, argument: str, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{argument} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (upper is not None and value >= upper):
        bound = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{argument} must be a finite number {bound}, got {value!r}")
    return value


def check_positive_float(value: Any, argument: str) -> float:
    value = check_nonneg_float(value, argument)
    if value == 0:
        raise ValueError(f"{argument} must be > 0, got {value!r}")
    return value


def to_host(x: Any) -> Any:
    """A device (CuPy) array copied back to the host; anything else as it is."""
    if hasattr(x, "__cuda_array_interface__") and hasattr(x, "get"):
        return x.get()
    return x


def host_array(x: Any, argument: str) -> np.ndarray:
    """``x`` as a host numpy array (device arrays are copied back), rejecting non-numeric dtypes."""
    x = to_host(x)
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{argument} must be a numeric array, could not convert: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{argument} must be a numeric (bool, int or float) array, got dtype {arr.dtype}")
    return arr


def check_features(X: Any, n_in: int, argument: str = "X") -> np.ndarray:
    """A (B, n_in) array of finite numbers, B >= 1, as a host numpy array.

    Integer and bool X are accepted and cast to the model's float dtype by the caller.
    """
    arr = check_feature_shape(host_array(X, argument), n_in, argument)
    check_finite(arr, argument)
    return arr


def check_finite(arr: np.ndarray, argument: str) -> None:
    """ValueError when a float array holds NaN or infinite values, saying how many and where the first is."""
    if arr.dtype.kind != "f" or np.isfinite(arr).all():
        return
    bad = ~np.isfinite(arr)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"row {first[0]}, column {first[1]}" if len(first) == 2 else f"index {first}"
    raise ValueError(f"{argument} contains NaN or infinite values: {int(bad.sum())} of them, the first "
                     f"({arr[first]}) at {where}")


def check_feature_shape(X: Any, n_in: int, argument: str = "X") -> Any:
    """``X`` (any array, host or device) when its dtype and shape fit (B, n_in) features, B >= 1; its
    values are not looked at."""
    if X.dtype.kind not in "biuf" and X.dtype.name != "bfloat16":  # ml_dtypes' bfloat16 is of kind 'V'
        raise TypeError(f"{argument} must be a numeric (bool, int or float) array, got dtype {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"{argument} must be 2-D (samples, {n_in} features), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"{argument} is empty: it has 0 samples")
    if X.shape[1] != n_in:
        raise ValueError(f"{argument} must have {n_in} features (columns), got shape {X.shape}")
    return X


def check_seed(seed: Any, argument: str = "seed", allow_none: bool = True) -> int | None:
    """An integer seed in [0, 2**32) (or None where allowed)."""
    if seed is None and allow_none:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{argument} must be an integer{' or None' if allow_none else ''}, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"{argument} must be in [0, 2**32), got {seed}")
    return int(seed)
