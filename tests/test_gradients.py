"""Backprop against central differences, a hand-worked example, and PyTorch autograd."""

import numpy as np
import pytest
import reference as ref
from conftest import assert_close, torch_or_skip

import fastbp as fb
from fastbp.activations import ACTIVATIONS

ACTS = sorted(ACTIVATIONS)
LOSSES = ["mse", "cross_entropy", "binary_cross_entropy"]


def _targets(rng, loss, B, n_out):
    if loss == "cross_entropy":
        return rng.integers(0, n_out, B)
    if loss == "binary_cross_entropy":
        return rng.integers(0, 2, (B, n_out)).astype(float)
    return rng.standard_normal((B, n_out))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_every_activation_and_loss(backend, act, loss):
    rng = np.random.default_rng(7)
    model = fb.MLP([4, 5, 4, 3], activation=act, dtype="float64", seed=3, backend=backend)
    X = rng.standard_normal((6, 4))
    y = _targets(rng, loss, 6, 3)
    err = fb.gradcheck(model, X, y, loss=loss, max_entries=None)
    assert err < 1e-6, f"{act}/{loss}: max relative error {err:.2e}"


def test_gradcheck_detects_a_wrong_gradient(backend, monkeypatch):
    """The check must be able to fail: break eq. (4) and it must notice."""
    rng = np.random.default_rng(0)
    model = fb.MLP([3, 4, 2], dtype="float64", backend=backend)
    X, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    original = type(backend).dense_grads

    def broken(self, delta, A_prev, dW_out=None, db_out=None):
        dW, db = original(self, delta, A_prev, dW_out, db_out)
        db *= 1.01
        return dW, db

    monkeypatch.setattr(type(backend), "dense_grads", broken)
    assert fb.gradcheck(model, X, y, loss="mse", max_entries=None) > 1e-3


def test_hand_worked_two_layer_example(backend, dtype):
    # Two samples, a 2-2-1 network, relu hidden, mse. Forward:
    #   x1 = [1, 2]:  z1 = [1*1 + 2*0, 1*(-1) + 2*1] = [1, 1], a1 = [1, 1], z2 = 1*1 + 1*2 + 0.5 = 3.5, y = 3
    #   x2 = [-1, 0]: z1 = [-1, 1], a1 = [0, 1], z2 = 0 + 2 + 0.5 = 2.5, y = 0
    #   C = ((3.5 - 3)^2 + (2.5 - 0)^2) / 2 = (0.25 + 6.25) / 2 = 3.25
    # Backward: delta2 = 2 (z2 - y) / 2 = [0.5, 2.5]
    #   dW2 = a1^T delta2 = [1*0.5 + 0*2.5, 1*0.5 + 1*2.5] = [0.5, 3.0], db2 = 3.0
    #   delta1 = delta2 W2^T * relu'(z1) = [0.5*[1, 2]*[1, 1], 2.5*[1, 2]*[0, 1]] = [[0.5, 1], [0, 5]]
    #   dW1 = X^T delta1 = [[1*0.5 - 1*0, 1*1 - 1*5], [2*0.5 + 0, 2*1 + 0]] = [[0.5, -4], [1, 2]]
    #   db1 = [0.5, 6]
    W1 = np.array([[1.0, -1.0], [0.0, 1.0]])
    W2 = np.array([[1.0], [2.0]])
    model = fb.MLP.from_weights([(W1, np.zeros(2), "relu"), (W2, np.array([0.5]), "identity")],
                                dtype=dtype, backend=backend)
    X = np.array([[1.0, 2.0], [-1.0, 0.0]])
    y = np.array([[3.0], [0.0]])
    loss, grads = model.loss_and_grads(X, y, loss="mse")
    assert_close(loss, 3.25, dtype)
    expected = [[[0.5, -4.0], [1.0, 2.0]], [0.5, 6.0], [[0.5], [3.0]], [3.0]]
    for g, e in zip(grads, expected):
        assert_close(g, np.array(e), dtype)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_model_gradients_match_the_reference(backend, dtype, act, loss):
    rng = np.random.default_rng(11)
    model = fb.MLP([6, 8, 5, 4], activation=act, dtype=dtype, seed=1, backend=backend)
    X = rng.standard_normal((10, 6))
    y = _targets(rng, loss, 10, 4)
    value, grads = model.loss_and_grads(X, y, loss)
    weights = [(w.astype(np.float64), b.astype(np.float64))
               for w, b in zip(model.get_weights()[::2], model.get_weights()[1::2])]
    y_ref = y if loss != "binary_cross_entropy" else y
    ref_value, ref_grads = ref.mlp_loss_and_grads(weights, model.activations, X.astype(dtype), y_ref, loss)
    tol = {"rtol": 2e-4, "atol": 2e-6} if dtype == "float32" else {"rtol": 1e-9, "atol": 1e-13}
    assert_close(value, ref_value, dtype, **tol)
    for g, r in zip(grads, ref_grads):
        # float32: compared relative to the gradient's scale, since rounding accumulates over the layers
        scale = {"atol": 2e-5 * float(np.max(np.abs(r)) + 1e-30)} if dtype == "float32" else {}
        assert_close(g, r, dtype, **{**tol, **scale})


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_against_pytorch_autograd(backend, act, loss):
    torch = torch_or_skip()
    rng = np.random.default_rng(5)
    model = fb.MLP([6, 7, 5, 3], activation=act, dtype="float64", seed=2, backend=backend)
    X = rng.standard_normal((9, 6))
    y = _targets(rng, loss, 9, 3)
    value, grads = model.loss_and_grads(X, y, loss)

    params = [torch.tensor(w, requires_grad=True) for w in model.get_weights()]
    torch_act = {
        "identity": lambda t: t, "relu": torch.relu,
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.01), "sigmoid": torch.sigmoid,
        "tanh": torch.tanh, "gelu": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
        "silu": torch.nn.functional.silu,
    }[act]
    a = torch.tensor(X)
    for i in range(0, len(params), 2):
        a = a @ params[i] + params[i + 1]
        if i + 2 < len(params):
            a = torch_act(a)
    if loss == "cross_entropy":
        t_loss = torch.nn.CrossEntropyLoss()(a, torch.tensor(y))
    elif loss == "binary_cross_entropy":
        t_loss = torch.nn.BCEWithLogitsLoss()(a, torch.tensor(y))
    else:
        t_loss = torch.nn.MSELoss()(a, torch.tensor(y))
    t_loss.backward()
    assert_close(value, t_loss.item(), "float64")
    for g, p in zip(grads, params):
        assert_close(g, p.grad.numpy(), "float64", atol=1e-14)
