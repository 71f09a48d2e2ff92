"""An optimizer written in a test module (no library file edited), with a user activation, on every backend."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from conftest import assert_close

import fastbp as fb
from fastbp import optim
from fastbp.activations import unregister as unregister_activation


class Lion(optim.Optimizer):
    """Lion (Chen et al. 2023): p -= lr * (sign(beta1 m + (1 - beta1) g) + wd p); m = beta2 m + (1 - beta2) g."""

    @dataclass(frozen=True)
    class Hyper:
        beta1: float = 0.9
        beta2: float = 0.99
        weight_decay: float = 0.0

        def __post_init__(self):
            if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
                raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")

    slot_names = ("m",)

    def update(self, xp, p, g, slots, lr, step):
        hp, m = self.hp, slots["m"]
        direction = xp.sign(m * hp.beta1 + g * (1 - hp.beta1))
        if hp.weight_decay:
            direction += hp.weight_decay * p
        p -= lr * direction
        m *= hp.beta2
        m += (1 - hp.beta2) * g


def lion_reference(params, grads, ms, lr, beta1, beta2):
    """The same update in plain float64 NumPy, for the comparison."""
    for p, g, m in zip(params, grads, ms):
        p -= lr * np.sign(beta1 * m + (1 - beta1) * g)
        m[:] = beta2 * m + (1 - beta2) * g


@pytest.fixture
def registered():
    optim.register("lion", Lion)
    fb.register_activation("softsign", lambda xp, z: z / (1 + xp.abs(z)),
                           lambda xp, z, a: 1 / (1 + xp.abs(z)) ** 2)
    yield
    optim.unregister("lion")
    unregister_activation("softsign")


def test_a_user_optimizer_and_activation_train_on_every_backend(backend, registered):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((32, 5)), rng.integers(0, 3, 32)
    model = fb.MLP([5, 7, 3], activation="softsign", dtype="float64", seed=1, backend=backend)
    start = model.get_weights()
    trainer = fb.Trainer(model, optimizer="lion", batch_size=8, seed=2)
    assert isinstance(trainer.optimizer, Lion)
    # the same steps by hand: the reference's gradients (numpy backend) and the update in plain NumPy
    mirror = model.copy(backend="numpy")
    ms = [np.zeros_like(w) for w in start]
    history = trainer.fit(X, y, epochs=2, shuffle=False, verbose=0)
    for _ in range(2):
        for s in range(0, 32, 8):
            _, grads = mirror.loss_and_grads(X[s:s + 8], y[s:s + 8])
            weights = mirror.get_weights()
            lion_reference(weights, [np.asarray(g) for g in grads], ms, 1e-3, 0.9, 0.99)
            mirror.set_weights(weights)
    for a, b in zip(model.get_weights(), mirror.get_weights()):
        assert_close(a, b, "float64", rtol=1e-9, atol=1e-12)
    assert history["loss"][-1] < history["loss"][0]


def test_a_user_optimizer_leaves_a_diverged_step_undone(backend, registered):
    """A non-finite step changes neither the parameters nor the optimizer's slots, on every backend (on a
    GPU through the deferred guard that gates the fused updates too)."""
    rng = np.random.default_rng(1)
    model = fb.MLP([4, 6, 2], dtype="float64", backend=backend)
    trainer = fb.Trainer(model, optimizer=Lion(lr=1e-2), loss="mse")
    X, y = rng.standard_normal((8, 4)), rng.standard_normal((8, 2))
    trainer.step(X, y)
    before = model.get_weights()
    m_before = [backend.to_numpy(m).copy() for m in trainer.optimizer.state.slots["m"]]
    huge = np.full((8, 2), 1e300)
    with pytest.raises(fb.DivergenceError):
        trainer.step(X, huge)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(trainer.optimizer.state.slots["m"], m_before):
        np.testing.assert_array_equal(backend.to_numpy(a), b)
    assert trainer.optimizer.state.step == 1


def test_a_user_optimizer_checkpoints_and_resumes(registered, tmp_path):
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((24, 3)), rng.integers(0, 2, 24)
    trainer = fb.Trainer(fb.MLP([3, 4, 2], dtype="float64", backend="numpy"), optimizer=Lion(beta2=0.95),
                         batch_size=8)
    trainer.fit(X, y, epochs=1, verbose=0)
    trainer.save_checkpoint(tmp_path / "c.npz")
    resumed = fb.Trainer.load_checkpoint(tmp_path / "c.npz")
    assert isinstance(resumed.optimizer, Lion) and resumed.optimizer.beta2 == 0.95
    trainer.fit(X, y, epochs=1, verbose=0)
    resumed.fit(X, y, epochs=1, verbose=0)
    for a, b in zip(trainer.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_registration_refusals(registered):
    with pytest.raises(ValueError, match="built in"):
        optim.register("adam", Lion)
    with pytest.raises(ValueError, match="registered already"):
        optim.register("lion", type("Other", (Lion,), {}))
    with pytest.raises(TypeError, match="Optimizer subclass"):
        optim.register("x", dict)
    with pytest.raises(ValueError, match="not a registered"):
        optim.unregister("sgd")

    class NeedsLr(optim.Optimizer):
        def __init__(self, lr):
            super().__init__(lr)

    optim.register("needs_lr", NeedsLr)
    try:
        with pytest.raises(TypeError, match="pass an instance"):
            fb.Trainer(fb.MLP([2, 2]), optimizer="needs_lr")
    finally:
        optim.unregister("needs_lr")
