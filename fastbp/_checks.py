"""Input checks shared by the public entry points. Messages name the argument, what was expected and
what came; every check runs before anything is changed."""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np


def suggest(name: str, choices: Any) -> str:
    """' (did you mean 'x'?)' for the nearest choice, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(value: Any, choices: Any, argument: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a string, one of {list(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}{suggest(value, choices)}")
    return value


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
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{argument} contains NaN or infinite values")
    return arr


def check_feature_shape(X: Any, n_in: int, argument: str = "X") -> Any:
    """``X`` (any array, host or device) when its dtype and shape fit (B, n_in) features, B >= 1; its
    values are not looked at."""
    if X.dtype.kind not in "biuf":
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
