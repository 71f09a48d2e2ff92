import gzip
import hashlib
from importlib import resources

import numpy as np
import pytest

from fastbp import datasets


def test_bundled_digits():
    X, y = datasets.load_digits()
    assert X.shape == (1797, 64) and y.shape == (1797,)
    assert X.dtype == np.float64 and y.dtype == np.int64
    assert X.min() == 0 and X.max() == 16
    assert set(np.unique(y)) == set(range(10))
    raw = resources.files("fastbp.data").joinpath("digits.csv.gz").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
    assert "CC BY 4.0" in resources.files("fastbp.data").joinpath("README.md").read_text()


def test_stratified_split_keeps_class_proportions():
    X, y = datasets.load_digits()
    X_tr, X_te, y_tr, y_te = datasets.train_test_split(X, y, test_size=0.25, seed=0)
    assert len(y_te) == 450 and len(y_tr) == 1347  # ceil(0.25 * 1797) rows held out
    for cls in range(10):
        assert abs(np.mean(y_te == cls) - np.mean(y == cls)) < 0.01
    # every row lands in exactly one part
    rows = {tuple(r) + (int(c),) for r, c in zip(np.vstack([X_tr, X_te]), np.concatenate([y_tr, y_te]))}
    assert len(rows) == len({tuple(r) + (int(c),) for r, c in zip(X, y)})
    again = datasets.train_test_split(X, y, test_size=0.25, seed=0)
    np.testing.assert_array_equal(again[3], y_te)
    other = datasets.train_test_split(X, y, test_size=0.25, seed=1)
    assert not np.array_equal(other[3], y_te)


def test_split_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.model_selection", reason="scikit-learn is not installed")
    X, y = datasets.load_digits()
    for seed in (0, 3):
        ours = datasets.train_test_split(X, y, test_size=0.25, seed=seed)
        theirs = sk.train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)


def test_standardize():
    rng = np.random.default_rng(0)
    X = rng.normal(5, 3, (100, 4))
    X[:, 2] = 7.0  # constant column: std 0 is treated as 1
    Xs, X2 = datasets.standardize(X, X[:10])
    np.testing.assert_allclose(Xs[:, [0, 1, 3]].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(Xs[:, [0, 1, 3]].std(0), 1, atol=1e-12)
    np.testing.assert_array_equal(Xs[:, 2], 0)
    np.testing.assert_array_equal(X2, Xs[:10])
    np.testing.assert_array_equal(datasets.Standardizer().fit_transform(X), Xs)
    with pytest.raises(ValueError, match="not fitted"):
        datasets.Standardizer().transform(X)


def test_make_classification_is_seeded_and_balanced():
    X, y = datasets.make_classification(90, 5, 3, seed=4)
    X2, y2 = datasets.make_classification(90, 5, 3, seed=4)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    assert np.bincount(y).tolist() == [30, 30, 30]
    with pytest.raises(ValueError, match="n_classes"):
        datasets.make_classification(10, 2, 0)


def test_npz_roundtrip(tmp_path):
    X = np.arange(12.0).reshape(4, 3)
    y = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "d.npz", X=X, y=y)
    X2, y2 = datasets.load_npz(tmp_path / "d.npz")
    np.testing.assert_array_equal(X2, X)
    np.testing.assert_array_equal(y2, y)
    np.savez(tmp_path / "other.npz", data=X)
    with pytest.raises(ValueError, match="lacks the arrays"):
        datasets.load_npz(tmp_path / "other.npz")


def test_csv_with_header_label_column_and_gzip(tmp_path):
    text = "a,label,b\n1,0,2\n3,1,4\n5,2,6\n"
    (tmp_path / "d.csv").write_text(text)
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("d.csv", "d.csv.gz"):
        X, y = datasets.load_csv(tmp_path / name, label_column="label")
        np.testing.assert_array_equal(X, [[1, 2], [3, 4], [5, 6]])
        np.testing.assert_array_equal(y, [0, 1, 2])
    X, y = datasets.load_csv(tmp_path / "d.csv", label_column=0)
    np.testing.assert_array_equal(y, [1, 3, 5])
    (tmp_path / "bad.csv").write_text("1,2\nx,3\n")
    with pytest.raises(ValueError, match="line 2, feature column 0 holds 'x', not a number"):
        datasets.load_csv(tmp_path / "bad.csv")
    (tmp_path / "words.csv").write_text("1,2,cat\n3,4,dog\n5,6,cat\n")  # labels may be words
    X, y = datasets.load_csv(tmp_path / "words.csv")
    np.testing.assert_array_equal(X, [[1, 2], [3, 4], [5, 6]])
    assert list(y) == ["cat", "dog", "cat"]
    (tmp_path / "nan.csv").write_text("1,2,0\n3,nan,1\n")
    with pytest.raises(ValueError, match=r"X contains NaN or infinite values: 1 of them, the first \(nan\) at row 1, "
                                         r"column 1"):
        datasets.load_csv(tmp_path / "nan.csv")
    (tmp_path / "ragged.csv").write_text("1,2,3\n3,4\n")
    with pytest.raises(ValueError, match="columns"):
        datasets.load_csv(tmp_path / "ragged.csv")
    with pytest.raises(ValueError, match="label_column"):
        datasets.load_csv(tmp_path / "d.csv", label_column="nope")


def _idx(arr, code):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return header + arr.tobytes()


def test_idx_raw_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    labels = np.array([7, 1], dtype=np.uint8)
    (tmp_path / "img-idx3-ubyte").write_bytes(_idx(images, 0x08))
    (tmp_path / "lbl-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels, 0x08)))
    X, y = datasets.load_idx(tmp_path / "img-idx3-ubyte", tmp_path / "lbl-idx1-ubyte.gz")
    np.testing.assert_array_equal(X, images.reshape(2, 9))
    np.testing.assert_array_equal(y, [7, 1])
    big_endian = np.array([[1.5, -2.0]], dtype=">f4")
    (tmp_path / "f.idx").write_bytes(_idx(big_endian, 0x0D))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "f.idx"), [[1.5, -2.0]])
    (tmp_path / "short.idx").write_bytes(_idx(images, 0x08)[:-1])
    with pytest.raises(ValueError, match="header"):
        datasets.read_idx(tmp_path / "short.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        datasets.read_idx(tmp_path / "magic.idx")


def test_load_file_dispatch(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        datasets.load_file(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="unknown data format"):
        datasets.load_file(tmp_path / "data.parquet")
    with pytest.raises(ValueError, match="label file"):
        datasets.load_file(tmp_path / "train-images-idx3-ubyte")
