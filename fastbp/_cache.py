"""Where fastbp keeps what it compiles: Numba's machine code and the CUDA emulator's libraries.

Never inside the installed package: a cache written into site-packages outlives a ``pip uninstall`` and
then shadows the next install of fastbp (an empty ``fastbp/backends`` left behind is imported as a
namespace package), and site-packages may be read-only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """$FASTBP_CACHE_DIR, else the user's cache folder: $XDG_CACHE_HOME/fastbp or ~/.cache/fastbp on Linux,
    ~/Library/Caches/fastbp on macOS, %LOCALAPPDATA%\\fastbp\\Cache on Windows."""
    root = os.environ.get("FASTBP_CACHE_DIR")
    if root:
        return Path(root)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return Path(base) / "fastbp" / "Cache"
    if sys.platform == "darwin":
        return Path(os.path.expanduser("~")) / "Library" / "Caches" / "fastbp"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "fastbp"
