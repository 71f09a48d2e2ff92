"""Model files: .npz archives of plain arrays plus JSON metadata, written atomically, read without pickle.

Layout: ``W0, b0, W1, b1, ...`` and ``__meta__`` (JSON text as uint8 bytes) holding the format name and
version, the activations and the dtype. A file is written to a temporary file in the target folder,
fsynced and moved into place with os.replace, so a crash never leaves a partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "fastbp-model"
VERSION = 1
_META = "__meta__"


def check_writable(path: Any, argument: str = "path", suffix: str = ".npz") -> Path:
    """The path a file will be written to (``suffix`` added when missing); ValueError when its folder does
    not exist or it names a folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a file path, got {type(path).__name__}")
    text = os.fspath(path)
    if Path(text).is_dir() or text.endswith(("/", os.sep)):
        example = os.path.join(text, "model" + suffix)
        raise ValueError(f"{argument} {text!r} is a folder: give a file name in it, e.g. {example!r}")
    path = Path(path)
    if path.suffix != suffix:
        path = path.with_name(path.name + suffix)
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{argument} {str(path)!r}: folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{argument} {str(path)!r} is a folder, not a file")
    return path


def write_npz_atomic(path: Any, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write ``arrays`` and ``meta`` to ``path`` (.npz added when missing) atomically; returns the final
    path."""
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return write_atomic(path, lambda f: np.savez(f, **payload), ".npz")  # type: ignore[arg-type]


def write_atomic(path: Any, write: Any, suffix: str, argument: str = "path") -> Path:
    """Write a file through ``write(binary file)`` atomically: a temporary file in the same folder, fsync,
    os.replace, so a reader never sees half a file. ``suffix`` is added to ``path`` when missing; the file
    gets the mode any new file gets (the umask). Returns the final path."""
    path = check_writable(path, argument, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes it 0600: give it the mode any new file gets (umask)
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (reading it means setting it: done under a lock, restored at once)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def open_npz(path: Any, what: str = ".npz") -> Any:
    """``np.load`` of an existing .npz file, without pickle, or a ValueError naming the file and what is
    wrong with it (``what``: the kind of file expected, for the message)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file {str(path)!r} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive (an empty one ends at once)
        raise ValueError(f"{str(path)!r} is not a {what} file: an .npz file is a zip archive of NumPy arrays, this one "
                         f"starts with {head!r}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # a damaged archive fails in zipfile, zlib or the .npy parser, in many ways
        raise ValueError(f"{str(path)!r} is not a readable {what} file: {type(exc).__name__}: {exc}") from exc


def read_npz(path: Any, expected_format: str | tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an archive written by ``write_npz_atomic`` (no pickle); check its format and version.

    Raises:
        ValueError: for a missing, truncated, corrupt or foreign file.
    """
    path = Path(path)
    try:
        with open_npz(path, "fastbp") as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError:
        raise
    except Exception as exc:  # a damaged archive fails in zipfile, zlib or the .npy parser, in many ways
        raise ValueError(f"{str(path)!r} is not a readable fastbp file: {type(exc).__name__}: {exc}") from exc
    raw = arrays.pop(_META, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{str(path)!r} is not a fastbp file: no metadata")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} has corrupt metadata: {exc}") from exc
    formats = (expected_format,) if isinstance(expected_format, str) else expected_format
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} has corrupt metadata")
    if meta.get("format") not in formats:
        raise ValueError(f"{str(path)!r} is not a {' or '.join(formats)} file (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} has format version {meta.get('version')!r}; this fastbp reads {VERSION}")
    return arrays, meta
