"""Numba's disk cache for fastbp's kernels, in fastbp's cache folder (``fastbp._cache``) instead of the
``__pycache__`` next to the source, which for an installed fastbp is inside site-packages.

Numba picks a cache folder per function by asking its locator classes in turn. ``install()`` adds one,
after Numba's own NUMBA_CACHE_DIR locator (so that setting wins) and before the in-tree one, that
answers for fastbp's own source files alone: other code keeps Numba's default. Where fastbp's cache
folder cannot be written, it declines and Numba falls back to its own choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._cache import cache_root

_PACKAGE = Path(__file__).resolve().parent.parent


def numba_cache_dir() -> Path:
    """The folder fastbp's Numba kernels are cached in (unless NUMBA_CACHE_DIR is set)."""
    return cache_root() / "numba"


def install() -> None:
    """Register the locator with Numba (once)."""
    from numba.core import caching

    # the names of recent Numba releases, then those of older ones; a Numba without either keeps its own
    # choice of folder (set NUMBA_CACHE_DIR there)
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    user_provided = (getattr(caching, "UserProvidedCacheLocator", None)
                     or getattr(caching, "_UserProvidedCacheLocator", None))
    if impl is None or not hasattr(caching, "_SourceFileBackedLocatorMixin"):
        return
    classes = impl._locator_classes
    if any(getattr(cls, "_fastbp", False) for cls in classes):
        return

    class FastbpCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):  # type: ignore[misc]
        _fastbp = True

        def __init__(self, py_func: Any, py_file: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = str(numba_cache_dir() / self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self) -> str:
            return self._cache_path

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if _PACKAGE not in Path(py_file).resolve().parents:
                return None
            return super().from_function(py_func, py_file)

    classes.insert(classes.index(user_provided) + 1 if user_provided in classes else 0, FastbpCacheLocator)
