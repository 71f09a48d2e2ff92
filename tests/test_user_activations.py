"""Activations registered by users (fastbp.register_activation): every backend, checked on registration."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import assert_close, torch_or_skip

import fastbp as fb
from fastbp.activations import ACTIVATIONS, unregister


def _softplus(xp, z):
    return xp.logaddexp(0, z)


def _softplus_grad(xp, z, a):
    return 1 / (1 + xp.exp(-z))


@pytest.fixture
def softplus():
    fb.register_activation("softplus", _softplus, _softplus_grad)
    ref.ACT["softplus"] = lambda z: np.logaddexp(0, z)
    ref.DACT["softplus"] = ref.sigmoid
    yield "softplus"
    unregister("softplus")
    del ref.ACT["softplus"], ref.DACT["softplus"]


def test_a_user_activation_matches_the_reference_on_every_backend(backend, dtype, softplus, rng):
    model = fb.MLP([5, 9, 7, 3], activation=["softplus", "relu"], dtype=dtype, seed=3, backend=backend)
    X = rng.standard_normal((11, 5))
    y = rng.integers(0, 3, 11)
    value, grads = model.loss_and_grads(X, y)
    w = model.get_weights()
    ref_value, ref_grads = ref.mlp_loss_and_grads(list(zip(w[::2], w[1::2])), model.activations,
                                                  X.astype(dtype), y, "cross_entropy")
    tol = {"rtol": 2e-4, "atol": 2e-6} if dtype == "float32" else {"rtol": 1e-9, "atol": 1e-13}
    assert_close(value, ref_value, dtype, **tol)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, dtype, **tol)
    out = model.forward(X)  # the inference path too
    assert_close(out, ref.mlp_forward(list(zip(w[::2], w[1::2])), model.activations, X), dtype, **tol)


def test_a_user_activation_trains_alike_on_every_backend(backend, softplus, rng):
    X = rng.standard_normal((40, 4))
    y = rng.integers(0, 2, 40)
    losses = {}
    for name in ("numpy", backend):
        model = fb.MLP([4, 6, 2], activation="softplus", dtype="float64", seed=1, backend=name)
        history = fb.Trainer(model, batch_size=8, optimizer="sgd").fit(X, y, epochs=3, verbose=0)
        losses[name] = history["loss"]
    assert_close(losses[backend], losses["numpy"], "float64", rtol=1e-12)
    assert losses["numpy"][-1] < losses["numpy"][0]


def test_a_user_activation_passes_gradcheck(softplus, rng):
    model = fb.MLP([3, 5, 2], activation="softplus", dtype="float64", seed=0, backend="numpy")
    assert fb.gradcheck(model, rng.standard_normal((6, 3)), rng.standard_normal((6, 2)), "mse") < 1e-6


def test_a_user_activation_against_pytorch_autograd(softplus, rng):
    torch = torch_or_skip()
    model = fb.MLP([4, 6, 3], activation="softplus", dtype="float64", seed=2, backend="numpy")
    X, y = rng.standard_normal((7, 4)), rng.integers(0, 3, 7)
    value, grads = model.loss_and_grads(X, y)
    params = [torch.tensor(w, requires_grad=True) for w in model.get_weights()]
    hidden = torch.nn.functional.softplus(torch.tensor(X) @ params[0] + params[1])
    t_loss = torch.nn.CrossEntropyLoss()(hidden @ params[2] + params[3], torch.tensor(y))
    t_loss.backward()
    assert_close(value, t_loss.item(), "float64")
    for g, p in zip(grads, params):
        assert_close(g, p.grad.numpy(), "float64", atol=1e-14)


def test_a_wrong_derivative_is_refused():
    with pytest.raises(ValueError, match="derivative.*slope"):
        fb.register_activation("bad_tanh", lambda xp, z: xp.tanh(z), lambda xp, z, a: 1 - a)
    assert "bad_tanh" not in ACTIVATIONS
    fb.register_activation("bad_tanh", lambda xp, z: xp.tanh(z), lambda xp, z, a: 1 - a, check=False)
    unregister("bad_tanh")


@pytest.mark.parametrize("name, forward, derivative, match", [
    ("relu", _softplus, _softplus_grad, "built-in"),
    ("ReLU", _softplus, _softplus_grad, "built-in"),
    ("my act", _softplus, _softplus_grad, "identifier"),
    ("scalar", lambda xp, z: 1.0, lambda xp, z, a: 0.0, "shaped like z"),
    ("nan", lambda xp, z: xp.log(z), lambda xp, z, a: 1 / z, "not finite"),
    ("typo", lambda xp, z: xp.softplus(z), _softplus_grad, "failed: AttributeError"),
])
def test_bad_registrations_are_refused(name, forward, derivative, match):
    with pytest.raises(ValueError, match=match):
        fb.register_activation(name, forward, derivative)
    assert name not in ACTIVATIONS or ACTIVATIONS[name].builtin


def test_registering_again_needs_replace(softplus):
    with pytest.raises(ValueError, match="replace=True"):
        fb.register_activation("softplus", _softplus, _softplus_grad)
    fb.register_activation("softplus", _softplus, _softplus_grad, replace=True)
    with pytest.raises(ValueError, match="not a registered"):
        unregister("relu")


def test_a_saved_model_needs_its_activation_registered_to_load(softplus, tmp_path):
    model = fb.MLP([3, 4, 2], activation="softplus", backend="numpy")
    path = model.save(tmp_path / "m.npz")
    loaded = fb.load(path)
    assert loaded.activations == ["softplus", "identity"]
    unregister("softplus")
    try:
        with pytest.raises(ValueError, match="'softplus', which is not registered.*register_activation"):
            fb.load(path)
    finally:
        fb.register_activation("softplus", _softplus, _softplus_grad)
