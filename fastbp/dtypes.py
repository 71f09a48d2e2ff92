"""The dtype policy, in one place: which dtypes compute, and how names resolve."""

from __future__ import annotations

import numpy as np

#: Compute dtypes every backend supports (master weights and arithmetic).
FLOAT_DTYPES = ("float32", "float64")


def accumulator_dtype(dtype: object) -> np.dtype:
    """The dtype sums of ``dtype`` data accumulate in (a loss, a reduction): float64 for float64 data,
    float32 otherwise, on every backend alike."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)  # type: ignore[call-overload]


def resolve_dtype(dtype: object, argument: str = "dtype") -> np.dtype:
    """Return the numpy dtype for a name or dtype-like, accepting only float32 and float64.

    Args:
        dtype: 'float32', 'float64', np.float32, np.dtype('float64'), ...
        argument: the argument name quoted in the error message.
    Returns:
        The numpy dtype.
    Raises:
        TypeError: if dtype is not a supported float dtype.
    """
    try:
        resolved = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise TypeError(f"{argument} must be one of {FLOAT_DTYPES}, got {dtype!r}") from exc
    if resolved.name not in FLOAT_DTYPES:
        raise TypeError(f"{argument} must be one of {FLOAT_DTYPES}, got {resolved.name!r}")
    return resolved
