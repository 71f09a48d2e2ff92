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

#: The 16-bit compute dtypes of mixed precision: GEMMs and activations in them, float32 master weights and
#: optimizer state (backends that run them list them in ``Backend.compute_dtypes``).
HALF_DTYPES = ("bfloat16", "float16")


def half_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a 16-bit compute dtype: float16, or bfloat16 from ml_dtypes (which CuPy uses for
    its bfloat16 arrays); ImportError saying what to install when ml_dtypes is missing."""
    if name == "float16":
        return np.dtype(np.float16)
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ImportError(f"bfloat16 needs ml_dtypes ({exc}): pip install ml_dtypes") from exc
    return np.dtype(ml_dtypes.bfloat16)


def resolve_compute_dtype(compute_dtype: object, dtype: np.dtype, backend: object) -> np.dtype:
    """The dtype a model computes in: ``dtype`` itself when ``compute_dtype`` is None (or the same), else
    'bfloat16' or 'float16' over float32 master weights, on a backend that lists it in ``compute_dtypes``."""
    if compute_dtype is None:
        return dtype
    name = compute_dtype if isinstance(compute_dtype, str) else getattr(compute_dtype, "__name__", None)
    if name is None:
        try:
            name = np.dtype(compute_dtype).name  # type: ignore[call-overload]
        except TypeError:
            name = repr(compute_dtype)
    if name == dtype.name:
        return dtype
    if name not in HALF_DTYPES:
        raise TypeError(f"compute_dtype must be None, {dtype.name!r} or one of {HALF_DTYPES}, got {compute_dtype!r}")
    if dtype.name != "float32":
        raise ValueError(f"compute_dtype={name!r} keeps float32 master weights: dtype must be 'float32', "
                         f"got {dtype.name!r}")
    supported = getattr(backend, "compute_dtypes", FLOAT_DTYPES)
    if name not in supported:
        raise ValueError(f"compute_dtype={name!r} (mixed precision) runs on the cupy backend; the "
                         f"{getattr(backend, 'name', backend)!r} backend computes in {', '.join(supported)}")
    return half_dtype(name)
