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


def test_prediction_without_a_trainer_in_the_users_labels(tmp_path):
    """model.predict answers in the training labels (encoded as scikit-learn encodes them, classes_),
    predict_proba gives the softmax in classes_ order, the model called gives the logits; all survive
    save and load."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((90, 2)) + np.repeat([[0, 0], [4, 0], [0, 4]], 30, axis=0)
    y = np.repeat(["cat", "dog", "emu"], 30)
    model = fb.MLP([2, 8, 3], seed=0)
    with pytest.raises(ValueError, match="train it with a Trainer"):
        model.predict(X)
    fb.Trainer(model, optimizer="adam", batch_size=16).fit(X, y, epochs=60, verbose=0)
    assert list(model.classes_) == ["cat", "dog", "emu"]
    assert (model.predict(X) == y).mean() > 0.9
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(model.classes_[proba.argmax(1)], model.predict(X))
    np.testing.assert_array_equal(model(X), model.forward(X))
    model.save(tmp_path / "m.npz")
    again = fb.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(again.predict(X), model.predict(X))
    with pytest.raises(ValueError, match="not among the model's classes"):
        fb.Trainer(again).evaluate(X[:3], ["cat", "dog", "yak"])
    with pytest.raises(ValueError, match="3 distinct labels"):
        fb.Trainer(fb.MLP([2, 8, 4])).fit(X, y, epochs=1, verbose=0)
    # integer labels that are class indices stay indices; others are encoded by sorted order
    for labels, classes in (([0, 1, 2], [0, 1, 2]), ([1, 2, 3], [1, 2, 3]), ([0, 10, 20], [0, 10, 20])):
        m = fb.MLP([2, 8, 3], seed=0)
        fb.Trainer(m).fit(X, np.repeat(labels, 30), epochs=1, verbose=0)
        assert list(m.classes_) == classes
    bce = fb.MLP([2, 4, 2], seed=0)
    fb.Trainer(bce, loss="binary_cross_entropy").step(X[:8], np.eye(2)[np.arange(8) % 2])
    assert set(np.unique(bce.predict(X))) <= {0, 1} and 0 < bce.predict_proba(X).min() < 1


def test_files_follow_the_umask_and_a_folder_is_refused(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        path = fb.MLP([2, 3]).save(tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # 0666 & ~umask, not mkstemp's 0600
    with pytest.raises(ValueError, match="is a folder"):
        fb.MLP([2, 3]).save(tmp_path)
    assert not (tmp_path.parent / (tmp_path.name + ".npz")).exists()


def test_messages_name_what_users_of_other_libraries_meant(tmp_path):
    assert fb.MLP([2, 4, 3], activation="ReLU").activations[0] == "relu"
    assert fb.Trainer(fb.MLP([2, 3]), loss="Cross_Entropy", optimizer="SGD").loss == "cross_entropy"
    for name, meant in (("categorical_crossentropy", "cross_entropy"), ("BCEWithLogitsLoss", "binary_cross_entropy"),
                        ("mean_squared_error", "mse")):
        with pytest.raises(ValueError, match=f"did you mean '{meant}'"):
            fb.Trainer(fb.MLP([2, 3]), loss=name)
    X = np.zeros((4, 2))
    X[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"1 of them, the first \(inf\) at row 2, column 1"):
        fb.MLP([2, 3]).forward(X)
    (tmp_path / "x.npz").write_text("a text file")
    with pytest.raises(ValueError, match="is not a fastbp file: an .npz file is a zip archive"):
        fb.load(tmp_path / "x.npz")


@pytest.mark.parametrize("loss, kind", [("cross_entropy", "labels"), ("mse", "finite"),
                                        ("binary_cross_entropy", "unit"), ("cross_entropy", "unit")])
def test_count_invalid_counts_every_bad_value(backend, dtype, loss, kind, rng):
    """The one-pass check of prepared batches counts what the host checks would refuse."""
    X = rng.standard_normal((40, 7)).astype(dtype)
    X.reshape(-1)[[3, 50, 51]] = [np.nan, np.inf, -np.inf]
    if kind == "labels":
        y = rng.integers(0, 5, 40)
        y[[0, 9]] = [5, -1]
        expected = 5
    else:
        y = rng.uniform(0, 1, (40, 5)).astype(dtype)
        y[1, 2], y[4, 4] = np.nan, (np.inf if kind == "finite" else 1.5)
        y[7, 0] = -0.5 if kind == "unit" else 0.0
        expected = 3 + (2 if kind == "finite" else 3)
    Xd, yd = backend.asarray(X), backend.asarray(y)
    assert backend.count_invalid(Xd, yd, loss, 5) == expected
    X[~np.isfinite(X)] = 0
    assert backend.count_invalid(backend.asarray(X), yd, loss, 5) == expected - 3


@pytest.mark.parametrize("bad", ["nan", "inf", "label", "negative label", "target"])
def test_batches_ready_for_the_ops_are_still_checked(backend, dtype, bad, rng):
    """X already in the model's dtype and layout, int64 labels or targets in its dtype: the public step
    takes them as they are, yet still refuses invalid values with the full message, changing nothing."""
    loss = "binary_cross_entropy" if bad == "target" else "cross_entropy"
    model = fb.MLP([6, 5, 3], dtype=dtype, backend=backend)
    trainer = fb.Trainer(model, loss=loss)
    X = rng.standard_normal((8, 6)).astype(dtype)
    y = rng.integers(0, 2, (8, 3)).astype(dtype) if loss == "binary_cross_entropy" else rng.integers(0, 3, 8)
    trainer.step(X, y)  # a valid batch passes
    before = model.get_weights()
    match = {"nan": r"X contains NaN or infinite values: 1 of them, the first \(nan\) at row 2, column 4",
             "inf": r"X contains NaN or infinite values: 1 of them, the first \(inf\) at row 2, column 4",
             "label": r"labels must lie in \[0, 3\)", "negative label": r"labels must lie in \[0, 3\)",
             "target": r"must lie in \[0, 1\]"}[bad]
    if bad in ("nan", "inf"):
        X[2, 4] = np.nan if bad == "nan" else np.inf
    elif bad == "target":
        y[3, 1] = 2.0
    else:
        y[5] = 3 if bad == "label" else -1
    with pytest.raises(ValueError, match=match):
        trainer.step(X, y)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", [b for b in fb.available_backends() if b != "cupy"])  # cupy: test_cupy.py
def test_a_trained_model_pickles_with_a_lock_of_its_own(name, rng):
    import pickle

    backend = fb.backends.resolve_backend(name)
    model = fb.MLP([3, 4, 2], dtype="float64", backend=backend)
    fb.Trainer(model).fit(rng.standard_normal((16, 3)), rng.integers(0, 2, 16), epochs=1, verbose=0)
    copy = pickle.loads(pickle.dumps(model))
    assert copy.backend is backend  # by name: this process's backend (numba's holds its kernels' module)
    X = rng.standard_normal((5, 3))
    np.testing.assert_array_equal(copy.forward(X), model.forward(X))
    assert copy.lock is not model.lock and copy.lock.acquire(blocking=False)
    copy.lock.release()
    # the copy trains: its layers are views of its flat parameters again (pickle copies views apart)
    fb.Trainer(copy, optimizer=fb.optim.SGD(lr=0.5)).fit(rng.standard_normal((16, 3)), rng.integers(0, 2, 16),
                                                         epochs=1, verbose=0)
    assert np.shares_memory(copy.layers[0].W, copy.flat_parameters())
    assert not np.array_equal(copy.forward(X), model.forward(X))


def test_forward_goes_through_big_inputs_in_chunks_sized_by_the_widest_layer(monkeypatch):
    """Inference bounds each layer's activations to a byte budget: a narrow network takes a big batch in
    one pass, a wide one in chunks of rows, and the chunks' outputs are the one pass's, row for row."""
    from fastbp import layers

    narrow = fb.MLP([8, 64, 64, 3], backend="numpy", seed=0)
    wide = fb.MLP([8, 4096, 3], backend="numpy", seed=0)
    assert narrow._infer_chunk() == layers._INFER_BYTES // (64 * 4) and wide._infer_chunk() == 16384
    X = np.random.default_rng(0).standard_normal((2500, 8))
    whole = narrow.forward(X)
    calls = []
    forward_rows = narrow._forward_rows
    monkeypatch.setattr(narrow, "_forward_rows", lambda A: calls.append(A.shape[0]) or forward_rows(A))
    monkeypatch.setattr(layers, "_INFER_BYTES", 1024 * 64 * 4)  # 1024 rows of the widest layer
    np.testing.assert_array_equal(narrow.forward(X), whole)
    assert calls == [1024, 1024, 452]
