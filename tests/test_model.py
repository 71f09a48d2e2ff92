"""MLP construction, initialization, moving, saving, and input checks that leave the model unchanged."""

import numpy as np
import pytest
from conftest import BACKENDS, assert_close

import fastbp as fb
from fastbp.io import write_npz_atomic


def test_equal_seeds_give_equal_weights_on_every_backend(dtype):
    ref = fb.MLP([8, 16, 4], dtype=dtype, seed=42, backend="numpy").get_weights()
    for name in BACKENDS:
        weights = fb.MLP([8, 16, 4], dtype=dtype, seed=42, backend=name).get_weights()
        for a, b in zip(weights, ref):
            np.testing.assert_array_equal(a, b)
    other = fb.MLP([8, 16, 4], dtype=dtype, seed=43).get_weights()
    assert not np.array_equal(other[0], ref[0])


@pytest.mark.parametrize("init,act,std", [
    ("auto", "relu", np.sqrt(2 / 400)), ("auto", "tanh", np.sqrt(2 / 600)),
    ("he_uniform", "relu", np.sqrt(2 / 400)), ("glorot_uniform", "relu", np.sqrt(2 / 600)),
])
def test_initializer_scale(init, act, std):
    model = fb.MLP([400, 200, 10], activation=act, init=init, dtype="float64", seed=0)
    W = model.get_weights()[0]
    assert abs(W.std() / std - 1) < 0.02  # 80,000 draws: the sample std is within 1%
    assert abs(W.mean()) < 0.01 * std * 10
    np.testing.assert_array_equal(model.get_weights()[1], np.zeros(200))
    if init.endswith("uniform"):
        assert np.abs(W).max() <= np.sqrt(3) * std


def test_structure_and_parameters(backend):
    model = fb.MLP([5, 7, 3, 2], activation=["tanh", "relu"], backend=backend)
    assert model.sizes == [5, 7, 3, 2]
    assert model.activations == ["tanh", "relu", "identity"]
    assert [p.shape for p in model.parameters()] == [(5, 7), (7,), (7, 3), (3,), (3, 2), (2,)]
    assert model.n_params == 5 * 7 + 7 + 7 * 3 + 3 + 3 * 2 + 2
    assert isinstance(model.layers[0], fb.Dense) and model.layers[0].activation == "tanh"
    out = model.forward(np.ones((4, 5)))
    assert backend.is_array(out) and out.shape == (4, 2)


def test_forward_matches_manual_computation(backend, dtype):
    model = fb.MLP([3, 4, 2], activation="tanh", dtype=dtype, seed=1, backend=backend)
    W1, b1, W2, b2 = [w.astype(np.float64) for w in model.get_weights()]
    X = np.random.default_rng(0).standard_normal((5, 3))
    expected = np.tanh(X.astype(dtype) @ W1 + b1) @ W2 + b2
    assert_close(model.forward(X), expected, dtype, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-6)


def test_save_load_is_bit_exact(backend, dtype, tmp_path):
    model = fb.MLP([6, 9, 3], activation="gelu", dtype=dtype, seed=5, backend=backend)
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = fb.load(path, backend=backend)
    assert loaded.sizes == model.sizes and loaded.activations == model.activations
    assert loaded.dtype == model.dtype and loaded.backend is backend
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary left behind


def test_to_moves_between_backends_bit_exactly(dtype):
    model = fb.MLP([4, 5, 2], dtype=dtype, seed=9, backend="numpy")
    before = model.get_weights()
    for name in BACKENDS + ["numpy"]:
        assert model.to(name) is model
        assert model.backend.name == name
        for a, b in zip(before, model.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_copy_is_independent():
    model = fb.MLP([3, 4, 2], seed=0)
    twin = model.copy(dtype="float64")
    assert twin.dtype == np.float64
    twin.parameters()[0][...] = 0
    assert np.abs(model.get_weights()[0]).sum() > 0


@pytest.mark.parametrize("make,exc,match", [
    (lambda: fb.MLP([4]), ValueError, "sizes"),
    (lambda: fb.MLP([4, 0, 2]), ValueError, r"sizes\[1\]"),
    (lambda: fb.MLP([4, 2.5, 2]), TypeError, r"sizes\[1\]"),
    (lambda: fb.MLP("42"), TypeError, "sizes"),
    (lambda: fb.MLP([4, 3, 2], activation="relux"), ValueError, "did you mean 'relu'"),
    (lambda: fb.MLP([4, 3, 3, 2], activation=["relu"]), ValueError, "one per hidden layer"),
    (lambda: fb.MLP([4, 3, 2], dtype="int32"), TypeError, "dtype"),
    (lambda: fb.MLP([4, 3, 2], dtype="float16"), TypeError, "dtype"),
    (lambda: fb.MLP([4, 3, 2], init="zeros"), ValueError, "init"),
    (lambda: fb.MLP([4, 3, 2], backend="jax"), ValueError, "backend"),
])
def test_bad_construction_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("X,y,loss,exc,match", [
    (np.ones((3, 5)), np.array([0, 1, 2]), "cross_entropy", ValueError, "X must have 4 features"),
    (np.ones(4), np.array([0]), "cross_entropy", ValueError, "X must be 2-D"),
    (np.ones((0, 4)), np.array([], dtype=int), "cross_entropy", ValueError, "empty"),
    (np.full((2, 4), np.nan), np.array([0, 1]), "cross_entropy", ValueError, "NaN"),
    (np.full((2, 4), np.inf), np.array([0, 1]), "cross_entropy", ValueError, "infinite"),
    (np.array([["a"] * 4] * 2), np.array([0, 1]), "cross_entropy", TypeError, "numeric"),
    (np.ones((2, 4)), np.array([0, 3]), "cross_entropy", ValueError, r"labels must lie in \[0, 3\)"),
    (np.ones((2, 4)), np.array([0, -1]), "cross_entropy", ValueError, "labels must lie"),
    (np.ones((2, 4)), np.array([0.5, 1.0]), "cross_entropy", TypeError, "integer class labels"),
    (np.ones((2, 4)), np.array([0, 1, 2]), "cross_entropy", ValueError, "one row per sample"),
    (np.ones((2, 4)), np.ones((2, 2)), "mse", ValueError, r"y must have shape \(2, 3\)"),
    (np.ones((2, 4)), np.full((2, 3), 2.0), "binary_cross_entropy", ValueError, r"\[0, 1\]"),
    (np.ones((2, 4)), np.full((2, 3), np.nan), "mse", ValueError, "NaN"),
    (np.ones((2, 4)), np.array([0, 1]), "hinge", ValueError, "loss must be one of"),
])
def test_bad_batches_raise_and_change_nothing(backend, X, y, loss, exc, match):
    model = fb.MLP([4, 5, 3], seed=0, backend=backend)
    before = model.get_weights()
    with pytest.raises(exc, match=match):
        model.loss_and_grads(X, y, loss)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_integer_inputs_are_cast(backend):
    model = fb.MLP([3, 4, 2], dtype="float64", seed=0, backend=backend)
    out_int = backend.to_numpy(model.forward(np.array([[1, 2, 3]])))
    out_float = backend.to_numpy(model.forward(np.array([[1.0, 2.0, 3.0]])))
    np.testing.assert_array_equal(out_int, out_float)


def test_set_weights_checks_before_writing():
    model = fb.MLP([3, 4, 2], seed=0)
    before = model.get_weights()
    bad = [w.copy() for w in before]
    bad[-1] = np.zeros(5)
    with pytest.raises(ValueError, match=r"weights\[3\]"):
        model.set_weights(bad)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04truncated"])
def test_load_rejects_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.npz"):
        fb.load(path)


def test_load_rejects_foreign_and_pickled_files(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, W0=np.ones((2, 2)))
    with pytest.raises(ValueError, match="no metadata"):
        fb.load(foreign)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, W0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        fb.load(pickled)
    wrong = tmp_path / "wrong.npz"
    write_npz_atomic(wrong, {"W0": np.ones((2, 3)), "b0": np.ones(2)},
                     {"format": "fastbp-model", "version": 1, "dtype": "float64", "activations": ["identity"]})
    with pytest.raises(ValueError, match="layer 0"):
        fb.load(wrong)
    with pytest.raises(ValueError, match="does not exist"):
        fb.load(tmp_path / "missing.npz")


def test_forward_checks_arrays_of_the_backend_too(backend, dtype):
    """An array already of the model's backend, dtype and width takes the fast path, which still refuses
    NaN and infinities (it used to return a result computed from them)."""
    model = fb.MLP([3, 4, 2], dtype=dtype, seed=0, backend=backend)
    X = np.ones((5, 3), dtype)
    X[2, 1] = np.nan
    for bad in (X, np.where(np.isnan(X), np.inf, X)):
        with pytest.raises(ValueError, match="X contains NaN or infinite values"):
            model.forward(backend.asarray(bad, dtype))
    assert_close(backend.to_numpy(model.forward(backend.asarray(np.ones((5, 3)), dtype))),
                 fb.MLP([3, 4, 2], dtype=dtype, seed=0, backend="numpy").forward(np.ones((5, 3))), dtype)
