"""Data: the bundled digits, loaders for user files, a synthetic generator, scaling and splitting.

Every loader returns ``(X, y)`` as host numpy arrays: X float64 (n, features), y int64 labels (or
float targets where the file holds non-integer values).
"""

from __future__ import annotations

import gzip
import io
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import check_finite, check_nonneg_float, check_positive_int, check_seed


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled UCI optical digits (test part, 1797 images of 8x8 pixels in 0..16), no network.

    Returns X (1797, 64) float64 pixels in 0..16 and y (1797,) int64 labels 0..9.
    License CC BY 4.0; cite E. Alpaydin, C. Kaynak (1998), UCI Machine Learning Repository.
    """
    raw = resources.files("fastbp.data").joinpath("digits.csv.gz").read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.float64), table[:, -1]


def _labels_or_targets(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if np.isfinite(y).all() and np.array_equal(y, np.round(y)):
        return y.astype(np.int64)
    return y.astype(np.float64)


def _existing(path: Any, argument: str = "path") -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{argument} {str(p)!r} does not exist or is not a file")
    return p


def load_npz(path: Any, x_key: str = "X", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """X and y from an .npz file (keys ``x_key`` and ``y_key``), read without pickle."""
    p = _existing(path)
    from .io import open_npz

    try:
        with open_npz(p) as data:
            missing = [k for k in (x_key, y_key) if k not in data.files]
            if missing:
                raise ValueError(f"{str(p)!r} lacks the arrays {missing}; it holds {data.files}")
            X, y = data[x_key], data[y_key]
    except ValueError:
        raise
    except Exception as exc:  # a damaged archive fails in zipfile, zlib or the .npy parser, in many ways
        raise ValueError(f"{str(p)!r} is not a readable .npz file: {type(exc).__name__}: {exc}") from exc
    return _check_xy(X, y, str(p))


def load_csv(path: Any, label_column: int | str = -1, delimiter: str = ",",
             header: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """X and y from a CSV file of numbers (optionally .gz), the labels in ``label_column``.

    Args:
        label_column: the label column's index (negative from the end) or, with a header, its name.
        header: whether the first line holds column names; None: detect (a first line that is not
            all numbers).
    """
    p = _existing(path)
    text = _read_text(p)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{str(p)!r} is empty")
    names = None
    cells = [[c.strip() for c in ln.split(delimiter)] for ln in lines]
    width = len(cells[0])
    if width < 2:
        raise ValueError(f"{str(p)!r} needs rows of at least 2 columns (features and a label)")
    if isinstance(label_column, str):
        header = True
    elif not -width <= int(label_column) < width:
        raise ValueError(f"label_column must be in [-{width}, {width}), got {label_column}")
    if header is None:  # a first line whose feature cells are not all numbers (labels may be words)
        skip = int(label_column) % width
        header = not all(_is_number(c) for i, c in enumerate(cells[0]) if i != skip)
    if header:
        names, cells = cells[0], cells[1:]
    if not cells:
        raise ValueError(f"{str(p)!r} has a header but no rows")
    for i, row in enumerate(cells):
        if len(row) != width:
            raise ValueError(f"{str(p)!r}: line {i + 1 + bool(header)} has {len(row)} columns, the first has {width}")
    if isinstance(label_column, str):
        if names is None or label_column not in names:
            raise ValueError(f"label_column {label_column!r} is not a column name of {str(p)!r} (names: {names})")
        col = names.index(label_column)
    else:
        col = int(label_column) % width
    features = [[c for j, c in enumerate(row) if j != col] for row in cells]
    try:
        X = np.array(features, dtype=np.float64)
    except ValueError:
        line, column, cell = next((i, j, c) for i, row in enumerate(features) for j, c in enumerate(row)
                                  if not _is_number(c))
        raise ValueError(f"{str(p)!r}: line {line + 1 + bool(header)}, feature column {column} holds "
                         f"{cell!r}, not a number") from None
    labels = [row[col] for row in cells]
    y = np.array([float(v) for v in labels]) if all(_is_number(v) for v in labels) else np.array(labels)
    return _check_xy(X, y, str(p))


def _read_text(p: Path) -> str:
    """The text of a (possibly .gz) file, or a ValueError naming it."""
    try:
        return (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()).decode()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(p)!r} is not a readable text file: {exc}") from exc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_IDX_TYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Any) -> np.ndarray:
    """An array from an IDX file (the MNIST format), raw or gzip-compressed."""
    p = _existing(path)
    data = p.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{str(p)!r} is a corrupt gzip file: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] == 0:
        raise ValueError(f"{str(p)!r} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{str(p)!r} is truncated (header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{str(p)!r} holds {len(data) - header} data bytes; its header {shape} says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """X (n, pixels) float64 raw pixel values and y (n,) int64 from a pair of IDX files (MNIST)."""
    X = read_idx(images)
    y = read_idx(labels)
    if X.ndim < 2 or y.ndim != 1:
        raise ValueError(f"IDX images must be (n, ...) and labels (n,), got {X.shape} and {y.shape}")
    return _check_xy(X.reshape(X.shape[0], -1), y, f"{images} / {labels}")


def _check_xy(X: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if X.dtype.kind not in "biuf" or y.dtype.kind not in "biufU":
        raise ValueError(f"{where}: X must be numeric and y numbers or strings, got {X.dtype} and {y.dtype}")
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"{where}: X must be 2-D with at least one row, got {X.shape}")
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"{where}: X has {X.shape[0]} rows but y has {y.shape[0]}")
    X = X.astype(np.float64)
    check_finite(X, f"{where}: X")
    return X, y if y.dtype.kind == "U" else _labels_or_targets(y)


def load_file(path: Any, labels: Any = None, label_column: int | str = -1) -> tuple[np.ndarray, np.ndarray]:
    """Load by extension: .npz, .csv/.csv.gz/.txt, or IDX (needs ``labels``, the label file)."""
    name = str(path).lower()
    if name.endswith(".npz"):
        return load_npz(path)
    if name.endswith((".csv", ".csv.gz", ".txt", ".tsv")):
        return load_csv(path, label_column=label_column, delimiter="\t" if name.endswith(".tsv") else ",")
    if "idx" in name or "ubyte" in name:
        if labels is None:
            raise ValueError("an IDX image file needs its label file as well (labels=...)")
        return load_idx(path, labels)
    raise ValueError(f"path {str(path)!r}: unknown data format; use .npz, .csv or IDX (ubyte) files")


def load_features(path: Any, label_column: int | str | None = None) -> np.ndarray:
    """Features alone, for prediction: X of an .npz file, every column of a CSV file (but
    ``label_column`` when given, a column to leave out) or the images of an IDX file; float64, finite."""
    name = str(path).lower()
    if name.endswith(".npz"):
        p = _existing(path)
        from .io import open_npz

        with open_npz(p) as data:
            if "X" not in data.files:
                raise ValueError(f"{str(p)!r} lacks the array 'X'; it holds {data.files}")
            X = data["X"]
    elif name.endswith((".csv", ".csv.gz", ".txt", ".tsv")):
        if label_column is not None:
            return load_csv(path, label_column=label_column, delimiter="\t" if name.endswith(".tsv") else ",")[0]
        p = _existing(path)
        text = _read_text(p)
        delimiter = "\t" if name.endswith(".tsv") else ","
        rows = [[c.strip() for c in ln.split(delimiter)] for ln in text.splitlines() if ln.strip()]
        if rows and not all(_is_number(c) for c in rows[0]):
            rows = rows[1:]  # a header
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError(f"{str(p)!r} needs rows of numbers of equal length")
        try:
            X = np.array(rows, dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"{str(p)!r} holds a value that is not a number: {exc}") from exc
    elif "idx" in name or "ubyte" in name:
        X = read_idx(path)
        X = X.reshape(X.shape[0], -1) if X.ndim >= 2 else X
    else:
        raise ValueError(f"path {str(path)!r}: unknown data format; use .npz, .csv or IDX (ubyte) files")
    X = np.asarray(X)
    if X.dtype.kind not in "biuf" or X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"{path}: X must be a 2-D numeric array with at least one row, got {X.dtype} {X.shape}")
    X = X.astype(np.float64)
    check_finite(X, f"{path}: X")
    return X


def make_classification(n_samples: int = 1000, n_features: int = 20, n_classes: int = 3,
                        noise: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded synthetic classification set: Gaussian clusters, one centre per class.

    Returns X (n_samples, n_features) float64 and y (n_samples,) int64, balanced over the classes.
    """
    n_samples = check_positive_int(n_samples, "n_samples")
    n_features = check_positive_int(n_features, "n_features")
    n_classes = check_positive_int(n_classes, "n_classes")
    noise = check_nonneg_float(noise, "noise")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, n_features)) * 3.0
    y = np.arange(n_samples) % n_classes
    rng.shuffle(y)
    X = centres[y] + noise * rng.standard_normal((n_samples, n_features))
    return X, y.astype(np.int64)


class Standardizer:
    """Per-feature standardization fitted on training data: (X - mean) / std (std 0 -> 1)."""

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, X: Any) -> Standardizer:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] == 0:
            raise ValueError(f"X must be 2-D with at least one row, got shape {X.shape}")
        self.mean = X.mean(axis=0)
        std = X.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)
        return self

    def transform(self, X: Any) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise ValueError("Standardizer is not fitted: call fit(X) first")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.mean.shape[0]:
            raise ValueError(f"X must have {self.mean.shape[0]} columns, got shape {X.shape}")
        return (X - self.mean) / self.std

    def fit_transform(self, X: Any) -> np.ndarray:
        return self.fit(X).transform(X)


def standardize(X_train: Any, *others: Any) -> tuple[np.ndarray, ...]:
    """Standardize X_train, and any further arrays with X_train's statistics."""
    s = Standardizer().fit(X_train)
    return (s.transform(X_train),) + tuple(s.transform(X) for X in others)


def train_test_split(X: Any, y: Any, test_size: float = 0.25, seed: int = 0,
                     stratify: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded split into (X_train, X_test, y_train, y_test).

    The test part has ceil(test_size * n) rows. With ``stratify`` (integer labels) each class is split in
    proportion. The rows chosen are the same as scikit-learn's
    ``train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)`` (same algorithm and
    legacy ``RandomState`` stream), so results compare directly with scikit-learn's on the same split.
    """
    X, y = np.asarray(X), np.asarray(y)
    n = X.shape[0]
    if y.shape[:1] != (n,) or n < 2:
        raise ValueError(f"X and y must have the same number (>= 2) of rows, got {n} and {y.shape[:1]}")
    test_size = check_nonneg_float(test_size, "test_size", upper=1.0)
    rng = np.random.RandomState(check_seed(seed, allow_none=False))
    n_test = int(np.ceil(test_size * n))
    n_train = n - n_test
    if n_test == 0 or n_train == 0:
        raise ValueError(f"test_size {test_size} leaves an empty part for {n} rows")
    if stratify and y.ndim == 1 and y.dtype.kind in "iubU":
        classes, y_idx = np.unique(y, return_inverse=True)
        counts = np.bincount(y_idx)
        if counts.min() < 2 or n_test < len(classes) or n_train < len(classes):
            raise ValueError(f"a stratified split needs >= 2 rows per class and >= {len(classes)} rows "
                             f"per part; class counts {counts.tolist()}, parts {n_train}/{n_test}")
        class_rows = np.split(np.argsort(y_idx, kind="mergesort"), np.cumsum(counts)[:-1])
        n_i = _approximate_mode(counts, n_train, rng)
        t_i = _approximate_mode(counts - n_i, n_test, rng)
        train: list[int] = []
        test: list[int] = []
        for i in range(len(classes)):
            rows = class_rows[i].take(rng.permutation(counts[i]), mode="clip")
            train.extend(rows[: n_i[i]])
            test.extend(rows[n_i[i]: n_i[i] + t_i[i]])
        train_idx, test_idx = rng.permutation(train), rng.permutation(test)
    else:
        perm = rng.permutation(n)
        test_idx, train_idx = perm[:n_test], perm[n_test:]
    return X[train_idx], X[test_idx], y[train_idx], y[test_idx]


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws proportional to ``counts`` summing to ``n_draws``; ties in the remainders are
    broken at random (scikit-learn's ``_approximate_mode``)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need -= add_now
            if need == 0:
                break
    return floored.astype(int)
