"""Trainer: steps, fit, history, callbacks, evaluation, determinism."""

import numpy as np
import pytest
from conftest import assert_close

import fastbp as fb
from fastbp import datasets, optim


@pytest.fixture
def blobs():
    X, y = datasets.make_classification(n_samples=300, n_features=8, n_classes=3, seed=0)
    return datasets.standardize(X)[0], y


def test_step_returns_the_loss_before_the_update_and_updates(backend, dtype, blobs):
    X, y = blobs
    model = fb.MLP([8, 16, 3], dtype=dtype, seed=0, backend=backend)
    expected, grads = model.loss_and_grads(X[:32], y[:32], "cross_entropy")
    before = model.get_weights()
    trainer = fb.Trainer(model, optimizer=optim.SGD(lr=0.5), batch_size=32)
    value = trainer.step(X[:32], y[:32])
    assert_close(value, expected, dtype)
    # plain SGD: p_new = p - lr * grad, exactly what the optimizer op computes
    for b, a, g in zip(before, model.get_weights(), grads):
        assert_close(a, b - 0.5 * backend.to_numpy(g), dtype, atol=1e-7 if dtype == "float32" else 1e-15)


def test_fit_learns_and_reports_history(backend, dtype, blobs):
    X, y = blobs
    model = fb.MLP([8, 16, 3], dtype=dtype, seed=0, backend=backend)
    trainer = fb.Trainer(model, optimizer=optim.Adam(lr=1e-2), batch_size=64, seed=0)
    history = trainer.fit(X, y, epochs=8, validation_data=(X[:50], y[:50]), verbose=0)
    assert len(history) == 8
    assert history.keys() == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "time"]
    assert history["epoch"] == list(range(1, 9))
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["accuracy"][-1] > 0.95
    result = trainer.evaluate(X, y)
    assert result["accuracy"] > 0.95
    assert set(result) == {"loss", "accuracy"}
    # the epoch loss is the sample-weighted mean of the batch losses; evaluated after the epoch it is lower
    assert result["loss"] <= history["loss"][-1] * 1.5
    pred = trainer.predict(X)
    assert pred.dtype == np.int64 and pred.shape == (300,)
    assert np.mean(pred == y) == pytest.approx(result["accuracy"])


def test_partial_last_batch_covers_every_sample(backend):
    # 10 samples, batch 4: batches of 4, 4, 2. With SGD and a zero-initialized net the epoch's summed
    # update equals lr times the sum of the three batch gradients, taken at the weights of each step.
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    model = fb.MLP([3, 2], dtype="float64", seed=0, backend=backend)
    mirror = model.copy()
    trainer = fb.Trainer(model, loss="mse", optimizer=optim.SGD(lr=0.1), batch_size=4)
    trainer.fit(X, y, epochs=1, shuffle=False, verbose=0)
    for rows in (slice(0, 4), slice(4, 8), slice(8, 10)):
        _, grads = mirror.loss_and_grads(X[rows], y[rows], "mse")
        mirror.set_weights([w - 0.1 * mirror.backend.to_numpy(g) for w, g in zip(mirror.get_weights(), grads)])
    for a, b in zip(model.get_weights(), mirror.get_weights()):
        assert_close(a, b, "float64")


def test_training_is_deterministic_for_a_seed(backend, blobs):
    X, y = blobs
    runs = []
    for _ in range(2):
        model = fb.MLP([8, 16, 3], seed=3, backend=backend)
        fb.Trainer(model, batch_size=32, seed=7).fit(X, y, epochs=3, verbose=0)
        runs.append(model.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_restores_the_best_weights(backend, blobs):
    X, y = blobs
    model = fb.MLP([8, 16, 3], seed=0, backend=backend)
    trainer = fb.Trainer(model, optimizer=optim.SGD(lr=5.0), batch_size=300)  # lr so large it diverges

    class Record(fb.Callback):
        def __init__(self):
            self.weights = {}

        def on_epoch_end(self, trainer, epoch, logs):
            self.weights[epoch] = trainer.model.get_weights()

    rec = Record()
    stop = fb.EarlyStopping(monitor="loss", patience=2)
    history = trainer.fit(X, y, epochs=50, callbacks=[rec, stop], verbose=0)
    assert len(history) < 50 and stop.stopped_epoch == len(history)
    best = int(np.argmin(history["loss"])) + 1
    assert stop.best_epoch == best
    for a, b in zip(model.get_weights(), rec.weights[best]):
        np.testing.assert_array_equal(a, b)


def test_model_checkpoint_saves_best(tmp_path, blobs):
    X, y = blobs
    model = fb.MLP([8, 16, 3], seed=0)
    ckpt = fb.ModelCheckpoint(tmp_path / "best-{epoch}.npz", monitor="val_accuracy")
    trainer = fb.Trainer(model, batch_size=32)
    trainer.fit(X, y, epochs=4, validation_data=(X, y), callbacks=[ckpt], verbose=0)
    assert ckpt.saved and all(p.exists() for p in ckpt.saved)
    last = fb.load(ckpt.saved[-1])
    assert trainer.evaluate(X, y)["accuracy"] >= fb.Trainer(last).evaluate(X, y)["accuracy"] - 1e-12


def test_callback_protocol_order(blobs):
    X, y = blobs
    calls = []

    class Spy(fb.Callback):
        def on_train_begin(self, trainer):
            calls.append("begin")

        def on_epoch_begin(self, trainer, epoch):
            calls.append(f"e{epoch}")

        def on_epoch_end(self, trainer, epoch, logs):
            calls.append(f"end{epoch}:{logs['epoch']}")
            trainer.stop_training = epoch == 2

        def on_train_end(self, trainer, history):
            calls.append(f"done{len(history)}")

    fb.Trainer(fb.MLP([8, 4, 3])).fit(X, y, epochs=5, callbacks=[Spy()], verbose=0)
    assert calls == ["begin", "e1", "end1:1", "e2", "end2:2", "done2"]


def test_binary_and_regression_losses(backend):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 4))
    y_bin = (X[:, :2] > 0).astype(float)
    model = fb.MLP([4, 16, 2], seed=0, backend=backend)
    trainer = fb.Trainer(model, loss="binary_cross_entropy", optimizer=optim.Adam(1e-2), batch_size=32)
    trainer.fit(X, y_bin, epochs=20, verbose=0)
    assert trainer.evaluate(X, y_bin)["accuracy"] > 0.9
    assert set(np.unique(trainer.predict(X))) <= {0, 1}
    y_reg = X @ np.array([[1.0], [-2.0], [0.5], [0.0]])
    reg = fb.Trainer(fb.MLP([4, 16, 1], seed=0, backend=backend), loss="mse", optimizer=optim.Adam(1e-2))
    history = reg.fit(X, y_reg, epochs=30, verbose=0)
    assert history["loss"][-1] < 0.05 * history["loss"][0]
    assert "accuracy" not in reg.evaluate(X, y_reg)
    assert reg.predict(X).shape == (200, 1)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"batch_size": 0}, ValueError, "batch_size"), ({"batch_size": 2.5}, TypeError, "batch_size"),
    ({"loss": "l1"}, ValueError, "loss"), ({"optimizer": "adan"}, ValueError, "did you mean .adam."),
    ({"optimizer": 3}, TypeError, "optimizer"),
])
def test_bad_trainer_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fb.Trainer(fb.MLP([2, 2]), **kwargs)


def test_bad_fit_arguments_change_nothing(blobs):
    X, y = blobs
    model = fb.MLP([8, 4, 3], seed=0)
    trainer = fb.Trainer(model)
    before = model.get_weights()
    for kwargs, exc in [({"epochs": 0}, ValueError), ({"validation_data": X}, TypeError),
                        ({"verbose": "fancy"}, ValueError), ({"callbacks": [print]}, TypeError)]:
        with pytest.raises(exc):
            trainer.fit(X, y, **kwargs)
    with pytest.raises(ValueError, match="labels must lie"):
        trainer.fit(X, y + 5, epochs=1)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert trainer.optimizer.state is None


def test_validation_split_holds_out_the_last_rows():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((100, 4)), rng.integers(0, 3, 100)

    def fit(**kwargs):
        trainer = fb.Trainer(fb.MLP([4, 8, 3], seed=0), batch_size=16, seed=1)
        return trainer.fit(*kwargs.pop("data"), epochs=3, verbose=0, **kwargs)

    split = fit(data=(X, y), validation_split=0.2)
    explicit = fit(data=(X[:80], y[:80]), validation_data=(X[80:], y[80:]))
    assert split["val_loss"] == explicit["val_loss"] and split["loss"] == explicit["loss"]
    with pytest.raises(ValueError, match="not both"):
        fit(data=(X, y), validation_split=0.2, validation_data=(X, y))
    with pytest.raises(ValueError, match="validation_split"):
        fit(data=(X, y), validation_split=1.0)


def test_verbose_levels(blobs, capsys, monkeypatch):
    """0 prints nothing, 2 a line per epoch on stdout, 1 a bar per epoch on stderr that counts the steps
    and ends with the epoch's metrics; 'auto' is silent where nobody watches (not a terminal)."""
    pytest.importorskip("tqdm", reason="tqdm is not installed")
    X, y = blobs
    trainer = fb.Trainer(fb.MLP([8, 4, 3], backend="numpy"), batch_size=64)  # 300 rows: 5 steps an epoch
    for verbose in (0, "auto"):
        trainer.fit(X, y, epochs=2, verbose=verbose)
        assert capsys.readouterr() == ("", "")
    trainer.fit(X, y, epochs=3, verbose=2)
    out, err = capsys.readouterr()
    assert [line.split()[:2] for line in out.splitlines()] == [["epoch", "1/3"], ["epoch", "2/3"], ["epoch", "3/3"]]
    assert "accuracy" in out and err == ""
    trainer.fit(X, y, epochs=2, verbose=1)
    out, err = capsys.readouterr()
    assert out == ""
    finals = [part.strip() for part in err.split("\r") if "5/5" in part]
    assert any(f.startswith("epoch 1/2") for f in finals) and any(f.startswith("epoch 2/2") for f in finals)
    assert all("loss=" in f and "accuracy=" in f for f in finals), finals
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # as if tqdm were not installed
    with pytest.warns(UserWarning, match="tqdm, which is not installed"):
        trainer.fit(X, y, epochs=1, verbose=1)
    assert capsys.readouterr().out.startswith("epoch 1/1")


@pytest.mark.parametrize("verbose", [3, -1, 1.0, "yes", None])
def test_bad_verbose_is_refused(blobs, verbose):
    X, y = blobs
    with pytest.raises((ValueError, TypeError), match="verbose"):
        fb.Trainer(fb.MLP([8, 4, 3], backend="numpy")).fit(X, y, epochs=1, verbose=verbose)
