"""Sample and class weights: the loss, its gradients, fit, evaluate and their checks, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, torch_or_skip
from test_gradients import LOSSES, _targets

import fastbp as fb


@pytest.mark.parametrize("loss", LOSSES)
def test_integer_weights_equal_repeated_rows(backend, dtype, loss, rng):
    """Weights w are rows repeated w times, the mean then rescaled from sum(w) rows to the B rows given."""
    X = rng.standard_normal((10, 4))
    y = _targets(rng, loss, 10, 3)
    w = rng.integers(0, 4, 10)
    w[0] = 2
    model = fb.MLP([4, 6, 3], activation="tanh", dtype=dtype, seed=1, backend=backend)
    value, grads = model.loss_and_grads(X, y, loss, sample_weight=w)
    rep = np.repeat(np.arange(10), w)
    ref_value, ref_grads = model.loss_and_grads(X[rep], y[rep], loss)
    scale = w.sum() / 10
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == "float32" else {}
    assert_close(value, ref_value * scale, dtype, **tol)
    for g, r in zip(grads, ref_grads):
        assert_close(g, backend.to_numpy(r) * scale, dtype, **tol)


def test_weighted_loss_against_pytorch(rng):
    torch = torch_or_skip()
    X, y, w = rng.standard_normal((9, 5)), rng.integers(0, 3, 9), rng.uniform(0, 2, 9)
    model = fb.MLP([5, 7, 3], dtype="float64", seed=4, backend="numpy")
    value, grads = model.loss_and_grads(X, y, sample_weight=w)
    params = [torch.tensor(p, requires_grad=True) for p in model.get_weights()]
    out = torch.relu(torch.tensor(X) @ params[0] + params[1]) @ params[2] + params[3]
    t_loss = (torch.nn.CrossEntropyLoss(reduction="none")(out, torch.tensor(y)) * torch.tensor(w)).mean()
    t_loss.backward()
    assert_close(value, t_loss.item(), "float64")
    for g, p in zip(grads, params):
        assert_close(g, p.grad.numpy(), "float64", atol=1e-14)


def test_fit_with_weights_matches_the_reference_on_every_backend(backend, rng):
    X, y = rng.standard_normal((50, 4)), rng.integers(0, 3, 50)
    w = rng.uniform(0.1, 3, 50)
    runs = {}
    for name in ("numpy", backend):
        model = fb.MLP([4, 8, 3], dtype="float64", seed=0, backend=name)
        trainer = fb.Trainer(model, optimizer="sgd", batch_size=16, seed=3)
        history = trainer.fit(X, y, epochs=3, sample_weight=w, class_weight={1: 2.0}, verbose=0)
        runs[name] = (history["loss"], model.get_weights(), trainer.evaluate(X, y, sample_weight=w)["loss"])
    assert_close(runs[backend][0], runs["numpy"][0], "float64", rtol=1e-12)
    assert_close(runs[backend][2], runs["numpy"][2], "float64", rtol=1e-12)
    for a, b in zip(runs[backend][1], runs["numpy"][1]):
        assert_close(a, b, "float64", rtol=1e-10, atol=1e-12)


def test_uniform_weights_change_nothing(rng):
    X, y = rng.standard_normal((30, 4)), rng.integers(0, 2, 30)
    results = []
    for kwargs in ({}, {"sample_weight": np.ones(30)}, {"class_weight": {0: 1.0, 1: 1.0}}):
        model = fb.MLP([4, 5, 2], dtype="float64", seed=0, backend="numpy")
        history = fb.Trainer(model, batch_size=8).fit(X, y, epochs=2, verbose=0, **kwargs)
        results.append((history["loss"], model.get_weights()))
    for loss, weights in results[1:]:
        assert_close(loss, results[0][0], "float64", rtol=1e-13)
        for a, b in zip(weights, results[0][1]):
            assert_close(a, b, "float64", rtol=1e-12, atol=1e-15)


def test_zero_weight_rows_are_not_learned(rng):
    """Rows of weight 0 change nothing: training on them with weight 0 equals training without them
    (one full batch, SGD, so the steps see the same rows)."""
    X, y = rng.standard_normal((12, 3)), rng.integers(0, 2, 12)
    w = np.array([1.0] * 8 + [0.0] * 4)
    a = fb.MLP([3, 4, 2], dtype="float64", seed=0, backend="numpy")
    b = fb.MLP([3, 4, 2], dtype="float64", seed=0, backend="numpy")
    fb.Trainer(a, optimizer=fb.optim.SGD(0.1), batch_size=12).fit(X, y, epochs=3, sample_weight=w,
                                                                  verbose=0)
    fb.Trainer(b, optimizer=fb.optim.SGD(0.1 * 8 / 12), batch_size=8).fit(X[:8], y[:8], epochs=3,
                                                                          verbose=0)
    for p, q in zip(a.get_weights(), b.get_weights()):
        assert_close(p, q, "float64", rtol=1e-10, atol=1e-14)


def test_balanced_class_weights_are_scikit_learns(rng):
    from fastbp.losses import class_weights

    index = np.array([0, 0, 0, 0, 1, 2, 2])
    table = class_weights("balanced", index, 4, None)
    # scikit-learn: n_samples / (n_classes * bincount) over the classes present; absent ones weigh 1
    np.testing.assert_allclose(table, [7 / (3 * 4), 7 / (3 * 1), 7 / (3 * 2), 1.0])


def test_class_weight_keys_are_the_users_labels(rng):
    X = rng.standard_normal((20, 3))
    y = np.array(["cat", "dog"] * 10)
    model = fb.MLP([3, 4, 2], dtype="float64", seed=0, backend="numpy")
    trainer = fb.Trainer(model, optimizer=fb.optim.SGD(0.1), batch_size=20, seed=0)
    trainer.fit(X, y, epochs=1, class_weight={"dog": 3.0}, verbose=0)
    other = fb.MLP([3, 4, 2], dtype="float64", seed=0, backend="numpy")
    fb.Trainer(other, optimizer=fb.optim.SGD(0.1), batch_size=20, seed=0).fit(
        X, y, epochs=1, sample_weight=np.where(y == "dog", 3.0, 1.0), verbose=0)
    for p, q in zip(model.get_weights(), other.get_weights()):
        assert_close(p, q, "float64", rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="among the model's classes"):
        trainer.fit(X, y, epochs=1, class_weight={"bird": 2.0}, verbose=0)


def test_binary_class_weights_with_one_output(rng):
    X, y = rng.standard_normal((16, 3)), rng.integers(0, 2, (16, 1)).astype(float)
    a = fb.MLP([3, 4, 1], dtype="float64", seed=0, backend="numpy")
    b = fb.MLP([3, 4, 1], dtype="float64", seed=0, backend="numpy")
    fb.Trainer(a, "binary_cross_entropy", batch_size=16).fit(X, y, epochs=1, class_weight={1: 4.0},
                                                              verbose=0)
    fb.Trainer(b, "binary_cross_entropy", batch_size=16).fit(X, y, epochs=1, sample_weight=1 + 3 * y[:, 0],
                                                              verbose=0)
    for p, q in zip(a.get_weights(), b.get_weights()):
        assert_close(p, q, "float64", rtol=1e-13, atol=1e-15)


def test_validation_split_keeps_the_weights_of_its_rows(rng):
    X, y = rng.standard_normal((20, 3)), rng.integers(0, 2, 20)
    w = rng.uniform(0.5, 2, 20)
    trainer = fb.Trainer(fb.MLP([3, 4, 2], dtype="float64", seed=0, backend="numpy"), batch_size=4)
    history = trainer.fit(X, y, epochs=1, sample_weight=w, validation_split=0.25, verbose=0)
    assert_close(history["val_loss"][-1], trainer.evaluate(X[15:], y[15:], sample_weight=w[15:])["loss"],
                 "float64", rtol=1e-14)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sample_weight": np.ones(5)}, ValueError, r"one weight per row of X, shape \(20,\)"),
    ({"sample_weight": -np.ones(20)}, ValueError, ">= 0"),
    ({"sample_weight": np.zeros(20)}, ValueError, "zero for every row"),
    ({"sample_weight": np.full(20, np.nan)}, ValueError, "NaN"),
    ({"sample_weight": np.array(["a"] * 20)}, TypeError, "numeric"),
    ({"class_weight": "Balanced"}, None, None),
    ({"class_weight": "even"}, ValueError, "class_weight must be one of"),
    ({"class_weight": [1, 2]}, TypeError, "'balanced' or a dict"),
    ({"class_weight": {5: 1.0}}, ValueError, "among the model's classes"),
    ({"class_weight": {0: -1.0}}, ValueError, "finite number >= 0"),
    ({"class_weight": {0: 0.0, 1: 0.0}}, ValueError, "every row 0"),
])
def test_bad_weights_are_refused(kwargs, error, match, rng):
    X, y = rng.standard_normal((20, 3)), rng.integers(0, 2, 20)
    trainer = fb.Trainer(fb.MLP([3, 4, 2], backend="numpy"), batch_size=8)
    if error is None:
        trainer.fit(X, y, epochs=1, verbose=0, **kwargs)
        return
    with pytest.raises(error, match=match):
        trainer.fit(X, y, epochs=1, verbose=0, **kwargs)


def test_class_weight_needs_a_classifier(rng):
    trainer = fb.Trainer(fb.MLP([3, 4, 2], backend="numpy"), "mse")
    with pytest.raises(ValueError, match="class_weight is for classification"):
        trainer.fit(rng.standard_normal((8, 3)), rng.standard_normal((8, 2)), class_weight="balanced",
                    verbose=0)


def test_balanced_weights_lift_the_minority_class(rng):
    """On 95/5 imbalanced, overlapping classes, 'balanced' makes the model predict the rare class far more
    often (its recall rises), as it does in scikit-learn."""
    n = 2000
    y = (rng.uniform(size=n) < 0.05).astype(int)
    X = rng.standard_normal((n, 2)) + y[:, None] * 1.5
    predicted = {}
    for cw in (None, "balanced"):
        model = fb.MLP([2, 8, 2], dtype="float64", seed=0, backend="numpy")
        fb.Trainer(model, batch_size=100, optimizer=fb.optim.Adam(0.01)).fit(X, y, epochs=15, class_weight=cw,
                                                                             verbose=0)
        predicted[cw] = model.predict(X)
    recall = {cw: (p[y == 1] == 1).mean() for cw, p in predicted.items()}
    assert recall["balanced"] > 0.6 > recall[None] + 0.2, recall
