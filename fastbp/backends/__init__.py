"""Backend registry: which array libraries work here, and which one is active.

The active backend is a process-wide default (``set_backend``) that a ``use_backend`` block overrides
for the current context only (a ContextVar), so threads and async tasks can each choose their own.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from .base import LOSSES, Backend

__all__ = [
    "Backend",
    "BackendUnavailable",
    "LOSSES",
    "available_backends",
    "backend_status",
    "get_backend",
    "register_unlisted_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
]

#: Every backend fastbp knows, best first: 'auto' picks the first available.
#: Each entry is the module whose ``create()`` returns the backend or raises BackendUnavailable.
_MODULES: dict[str, str] = {
    "numpy": "fastbp.backends.numpy_backend",
    "numba": "fastbp.backends.numba_backend",
    "cupy": "fastbp.backends.cupy_backend",
}
_PREFERENCE = ("cupy", "numba", "numpy")

#: Backends registered at run time that resolve by name but are never listed by available_backends()
#: nor chosen by 'auto' (the tests' emulated CuPy). Each factory takes a device number.
_UNLISTED: dict[str, Callable[[int], Backend]] = {}


class BackendUnavailable(RuntimeError):
    """A known backend that cannot run here; the message says why."""


_instances: dict[str, Backend] = {}
_reasons: dict[str, str] = {}
_default: Backend | None = None
_override: ContextVar[Backend | None] = ContextVar("fastbp_backend", default=None)


def _load(name: str) -> Backend | None:
    """Create (once) and return the backend ('cupy:1' names a device), or None with the reason recorded."""
    if name in _instances:
        return _instances[name]
    if name in _reasons:
        return None
    base, _, device = name.partition(":")
    try:
        if base in _UNLISTED:
            backend = _UNLISTED[base](int(device or 0))
        else:
            module = importlib.import_module(_MODULES[base])
            backend = module.create(int(device)) if device else module.create()
    except BackendUnavailable as exc:
        _reasons[name] = str(exc)
        return None
    except ImportError as exc:
        _reasons[name] = f"import failed: {exc}"
        return None
    _instances[name] = backend
    return backend


def available_backends() -> list[str]:
    """Names of the backends that work on this machine, best first."""
    return [name for name in _PREFERENCE if name in _MODULES and _load(name) is not None]


def backend_status() -> dict[str, str]:
    """For every known backend name: 'available' or the reason it is not."""
    status = {}
    for name in _PREFERENCE:
        if name not in _MODULES:
            status[name] = "not implemented in this version of fastbp"
        elif _load(name) is not None:
            status[name] = "available"
        else:
            status[name] = _reasons[name]
    return status


def resolve_backend(backend: str | Backend | None) -> Backend:
    """The Backend for a name, 'auto', a Backend instance, or None (the active one).

    Raises:
        ValueError: for an unknown name, or a known backend that is not available here (with why).
    """
    if backend is None:
        return get_backend()
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(backend).__name__}")
    name = backend.strip().lower()
    if name == "auto":
        return _load(available_backends()[0])  # type: ignore[return-value]
    base, _, device = name.partition(":")
    if (base == "cupy" or base in _UNLISTED) and device:
        if not device.isdigit():
            raise ValueError(f"backend '{base}:N' needs a device number N >= 0, got {backend!r}")
        name = base if int(device) == 0 else f"{base}:{int(device)}"
    elif name not in _PREFERENCE and name not in _UNLISTED:
        from .._checks import suggest

        raise ValueError(f"backend must be one of {list(_PREFERENCE) + ['auto', 'cupy:N']}, got {backend!r}"
                         f"{suggest(name, _PREFERENCE)}")
    loaded = _load(name)
    if loaded is None:
        raise ValueError(f"backend {name!r} is not available: {_reasons[name]}")
    return loaded


def register_unlisted_backend(name: str, factory: Callable[[int], Backend]) -> None:
    """Make ``name`` (and ``name:N``) resolve to ``factory(N)``'s backend, created once per device, without
    listing it in available_backends() or letting 'auto' choose it. For test doubles such as the
    emulated CuPy (``fastbp.testing.fake_cupy``)."""
    if name in _MODULES or ":" in name:
        raise ValueError(f"cannot register {name!r}: it is a listed backend's name or has a ':'")
    _UNLISTED[name] = factory
    for key in [k for k in (*_instances, *_reasons) if k.partition(":")[0] == name]:
        _instances.pop(key, None)
        _reasons.pop(key, None)


def set_backend(backend: str | Backend = "auto") -> Backend:
    """Set the process-wide default backend ('numpy', 'numba', 'cupy' or 'auto'); returns it."""
    global _default
    _default = resolve_backend(backend)
    return _default


def get_backend() -> Backend:
    """The active backend: the innermost ``use_backend`` block's, else the default ('auto' at first)."""
    active = _override.get()
    if active is not None:
        return active
    if _default is None:
        return set_backend("auto")
    return _default


@contextlib.contextmanager
def use_backend(backend: str | Backend) -> Iterator[Backend]:
    """Make ``backend`` active inside the block, for this context only; restored on exit."""
    token = _override.set(resolve_backend(backend))
    try:
        yield _override.get()  # type: ignore[misc]
    finally:
        _override.reset(token)
