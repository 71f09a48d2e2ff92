"""Divergence, clipping, checkpoints (atomic, validated, resumable), interrupts, memory, threads."""

import gc
import threading
import tracemalloc

import numpy as np
import pytest
from conftest import BACKENDS, assert_close

import fastbp as fb
from fastbp import datasets, optim
from fastbp.io import write_npz_atomic


@pytest.fixture
def data():
    X, y = datasets.make_classification(n_samples=200, n_features=6, n_classes=3, seed=1)
    return datasets.standardize(X)[0], y


def _all_finite(arrays):
    return all(np.isfinite(a).all() for a in arrays)


# ---------------------------------------------------------------------------------------- divergence
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy reference warns as it overflows, by design
def test_divergence_raises_and_keeps_the_last_finite_parameters(backend, data):
    X, y = data
    model = fb.MLP([6, 16, 3], seed=0, backend=backend)
    trainer = fb.Trainer(model, optimizer=optim.SGD(lr=1e30), batch_size=50)
    with pytest.raises(fb.DivergenceError, match="non-finite .* at epoch 1"):
        trainer.fit(X, y, epochs=5, verbose=0)
    weights = model.get_weights()
    state = trainer.optimizer.state_dict()
    assert _all_finite(weights)
    # training on diverges again, and each rejected step leaves parameters and state finite
    with pytest.raises(fb.DivergenceError):
        trainer.fit(X, y, epochs=5, verbose=0)
    assert _all_finite(model.get_weights())
    assert _all_finite([v for k, v in trainer.optimizer.state_dict().items() if k != "step"])
    assert trainer.optimizer.state_dict()["step"] >= state["step"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy reference warns as it overflows, by design
def test_divergence_can_skip_and_count(backend, data):
    X, y = data
    model = fb.MLP([6, 16, 3], seed=0, backend=backend)
    trainer = fb.Trainer(model, optimizer=optim.Adam(lr=1e-3), batch_size=50, on_nonfinite="skip")
    before = model.get_weights()
    bad = X.copy()
    bad[:50] *= 1e38  # float32 overflow: this batch's loss is not finite
    history = trainer.fit(bad, y, epochs=2, shuffle=False, verbose=0)
    assert history["skipped"] == [1, 1]
    assert all(np.isfinite(history["loss"])) and all(np.isfinite(history["accuracy"]))  # over the steps taken
    assert trainer.skipped_steps == 2
    assert trainer.optimizer.state.step == 6  # 8 batches, 2 skipped
    after = model.get_weights()
    assert _all_finite(after) and not np.array_equal(after[0], before[0])
    assert np.isnan(trainer.step(bad[:50], y[:50]))  # a skipped step reports a nan loss
    assert trainer.skipped_steps == 3


# The deferred check (GPU backends): the guard trips on the device and gates the updates off; the host reads
# it every few steps. These tests run it on the NumPy reference, whose guard and gates follow the same
# contract, against the per-step check.
def _deferred(monkeypatch, on):
    backend = fb.backends.resolve_backend("numpy")
    monkeypatch.setattr(backend, "deferred_checks", on)
    return backend


DEFERRED_OPTIMIZERS = {
    "sgd_momentum": lambda: optim.SGD(lr=0.05, momentum=0.9),
    "adam": lambda: optim.Adam(lr=0.01),
    "rmsprop": lambda: optim.RMSProp(lr=0.01, momentum=0.5),
}


@pytest.mark.parametrize("opt", sorted(DEFERRED_OPTIMIZERS))
def test_deferred_checks_train_exactly_like_per_step_checks(monkeypatch, data, opt):
    X, y = data
    results = []
    for on in (False, True):
        backend = _deferred(monkeypatch, on)
        model = fb.MLP([6, 16, 3], seed=0, backend=backend)
        trainer = fb.Trainer(model, optimizer=DEFERRED_OPTIMIZERS[opt](), batch_size=16, clip_norm=0.5, seed=3)
        history = trainer.fit(X, y, epochs=2, verbose=0)
        results.append((model.get_weights(), history["loss"], trainer.steps, trainer.optimizer.state.step))
    (w_sync, loss_sync, steps_sync, opt_sync), (w_def, loss_def, steps_def, opt_def) = results
    for a, b in zip(w_sync, w_def):
        np.testing.assert_array_equal(a, b)
    assert loss_sync == loss_def and steps_sync == steps_def == opt_sync == opt_def == 26


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("opt", sorted(DEFERRED_OPTIMIZERS))
def test_deferred_divergence_reports_the_step_and_keeps_the_state_before_it(monkeypatch, data, opt):
    """A non-finite batch at step 4 of 13: the guard is read only at the epoch's end, after 9 more steps
    ran gated; the error, the parameters, the optimizer state and the step counts are those of the
    per-step check."""
    from fastbp import divergence

    monkeypatch.setattr(divergence, "DEFERRED_CHECK_STEPS", 1000)
    X, y = data
    bad = X.copy()
    bad[50] *= 1e38  # float32 overflow in row 50, which is in the fourth batch of 16 (no shuffling)
    outcomes = []
    for on in (False, True):
        backend = _deferred(monkeypatch, on)
        model = fb.MLP([6, 16, 3], seed=0, backend=backend)
        trainer = fb.Trainer(model, optimizer=DEFERRED_OPTIMIZERS[opt](), batch_size=16)
        trainer.fit(X, y, epochs=1, verbose=0)
        with pytest.raises(fb.DivergenceError) as error:
            trainer.fit(bad, y, epochs=1, shuffle=False, verbose=0)
        outcomes.append((str(error.value), model.get_weights(), trainer.optimizer.state_dict(), trainer.steps))
        # training goes on from there once the data is clean again
        trainer.fit(X, y, epochs=1, verbose=0)
        assert trainer.steps == 13 + 3 + 13 and _all_finite(model.get_weights())
    (msg_sync, w_sync, st_sync, steps_sync), (msg_def, w_def, st_def, steps_def) = outcomes
    assert "at epoch 2, step 17" in msg_sync and msg_def == msg_sync
    assert steps_sync == steps_def == 16 and st_sync["step"] == st_def["step"] == 16
    for a, b in zip(w_sync, w_def):
        np.testing.assert_array_equal(a, b)
    for key in st_sync:
        np.testing.assert_array_equal(st_sync[key], st_def[key])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_deferred_check_reads_the_guard_after_a_single_step(monkeypatch, data):
    X, y = data
    backend = _deferred(monkeypatch, True)
    model = fb.MLP([6, 16, 3], seed=0, backend=backend)
    trainer = fb.Trainer(model, optimizer=optim.Adam(), batch_size=16)
    before = model.get_weights()
    with pytest.raises(fb.DivergenceError, match="step 1 "):
        trainer.step(np.full((4, 6), 1e38), y[:4])  # overflows in float32
    assert trainer.steps == 0 and trainer.optimizer.state.step == 0
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(trainer.step(X[:16], y[:16])) and trainer.steps == 1


def test_gradient_clipping_matches_torch_semantics(backend, data):
    X, y = data
    model = fb.MLP([6, 8, 3], dtype="float64", seed=0, backend=backend)
    _, grads = model.loss_and_grads(X[:32], y[:32], "cross_entropy")
    norm = np.sqrt(sum(float(np.sum(backend.to_numpy(g) ** 2)) for g in grads))
    before = model.get_weights()
    clip = norm / 4
    trainer = fb.Trainer(model, optimizer=optim.SGD(lr=1.0), batch_size=32, clip_norm=clip)
    trainer.step(X[:32], y[:32])
    coef = clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_
    for w0, w1, g in zip(before, model.get_weights(), grads):
        assert_close(w1, w0 - coef * backend.to_numpy(g), "float64", atol=1e-14)
    # a norm under the limit leaves the gradient alone
    model2 = fb.MLP([6, 8, 3], dtype="float64", seed=0, backend=backend)
    fb.Trainer(model2, optimizer=optim.SGD(lr=1.0), clip_norm=norm * 2).step(X[:32], y[:32])
    for w0, w1, g in zip(before, model2.get_weights(), grads):
        assert_close(w1, w0 - backend.to_numpy(g), "float64", atol=1e-14)


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("make_opt", [
    lambda: optim.Adam(lr=optim.LinearWarmup(optim.Cosine(1e-2, 40), 5)),
    lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
    lambda: optim.RMSProp(lr=1e-3, momentum=0.5),
], ids=["adam_schedule", "sgd_nesterov", "rmsprop"])
def test_resume_is_bit_identical(backend, data, tmp_path, make_opt):
    X, y = data
    straight = fb.MLP([6, 16, 3], seed=4, backend=backend)
    t1 = fb.Trainer(straight, optimizer=make_opt(), batch_size=32, seed=9)
    h1 = t1.fit(X, y, epochs=4, verbose=0)

    first = fb.MLP([6, 16, 3], seed=4, backend=backend)
    t2 = fb.Trainer(first, optimizer=make_opt(), batch_size=32, seed=9)
    t2.fit(X, y, epochs=2, verbose=0)
    path = t2.save_checkpoint(tmp_path / "ckpt.npz")
    resumed = fb.Trainer.load_checkpoint(path, backend=backend)
    assert resumed.epoch == 2 and resumed.steps == t2.steps
    h2 = resumed.fit(X, y, epochs=2, verbose=0)
    for a, b in zip(straight.get_weights(), resumed.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert h2["loss"] == h1["loss"][2:]
    assert h2["epoch"] == [3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]
    # the model alone loads from a checkpoint too
    for a, b in zip(fb.load(path).get_weights(), first.get_weights()):
        np.testing.assert_array_equal(a, b)


def _checkpoint(tmp_path):
    model = fb.MLP([4, 5, 2], seed=0)
    trainer = fb.Trainer(model, batch_size=8)
    rng = np.random.default_rng(0)
    trainer.fit(rng.standard_normal((16, 4)), rng.integers(0, 2, 16), epochs=1, verbose=0)
    return trainer.save_checkpoint(tmp_path / "good.npz")


def test_corrupt_checkpoints_are_rejected(tmp_path):
    good = _checkpoint(tmp_path)
    raw = good.read_bytes()
    cases = {
        "truncated.npz": raw[: len(raw) // 2],
        "empty.npz": b"",
        "garbage.npz": bytes(range(256)) * 10,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError):
            fb.Trainer.load_checkpoint(tmp_path / name)
    with pytest.raises(ValueError, match="fastbp-checkpoint"):
        fb.Trainer.load_checkpoint(fb.MLP([2, 2]).save(tmp_path / "model.npz") or tmp_path / "model.npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, __meta__=np.array([object()], dtype=object))
    with pytest.raises(ValueError):
        fb.Trainer.load_checkpoint(pickled)
    # valid archive, inconsistent content
    with np.load(good) as d:
        arrays = {k: d[k] for k in d.files}
    import json

    meta = json.loads(arrays.pop("__meta__").tobytes())
    for mutate, match in [
        (lambda a, m: a.update({"opt.m.0": a["opt.m.0"][:-1]}), "optimizer state"),
        (lambda a, m: m.update({"version": 99}), "version"),
        (lambda a, m: m["optimizer"].update({"type": "Lion"}), "Lion"),
        (lambda a, m: m.update({"rng": {"bit_generator": "MT19937", "state": 3}}), "checkpoint"),
        (lambda a, m: m["trainer"].update({"epoch": -1}), "counts"),
        (lambda a, m: a.pop("W1"), "layer 1"),
    ]:
        a2, m2 = dict(arrays), json.loads(json.dumps(meta))
        mutate(a2, m2)
        bad = write_npz_atomic(tmp_path / "bad.npz", a2, m2)
        with pytest.raises(ValueError, match=match):
            fb.Trainer.load_checkpoint(bad)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    good = _checkpoint(tmp_path)
    before = good.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    model = fb.MLP([4, 5, 2], seed=1)
    with pytest.raises(OSError, match="disk full"):
        fb.Trainer(model).save_checkpoint(good)
    assert good.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz"]  # no temporary left
    with pytest.raises(ValueError, match="folder"):
        fb.Trainer(model).save_checkpoint(tmp_path / "missing" / "c.npz")


# ---------------------------------------------------------------------------------------- interrupts
def test_ctrl_c_ends_fit_cleanly_with_a_checkpoint(backend, data, tmp_path, monkeypatch):
    X, y = data
    model = fb.MLP([6, 16, 3], seed=0, backend=backend)
    trainer = fb.Trainer(model, batch_size=20, seed=3)
    real_step = trainer._step
    calls = {"n": 0}

    def step(Xd, yd, *rest, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:  # in the third epoch (10 steps an epoch)
            raise KeyboardInterrupt
        return real_step(Xd, yd, *rest, **kwargs)

    monkeypatch.setattr(trainer, "_step", step)
    history = trainer.fit(X, y, epochs=5, verbose=0, interrupt_checkpoint=tmp_path / "int.npz")
    assert history.interrupted and len(history) == 2 and trainer.epoch == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int.npz"]
    resumed = fb.Trainer.load_checkpoint(tmp_path / "int.npz", backend=backend)
    assert resumed.epoch == 2
    for a, b in zip(resumed.model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert resumed.fit(X, y, epochs=1, verbose=0)["epoch"] == [3]
    # the model is free again after the interrupt
    trainer.step(X[:5], y[:5])


def test_sigterm_ends_fit_as_ctrl_c_does(data, tmp_path):
    """What a job scheduler sends before it kills a job: the checkpoint is written, fit returns, and the
    default handler is back afterwards."""
    import os
    import signal

    X, y = data

    class Terminate(fb.callbacks.Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = fb.Trainer(fb.MLP([6, 16, 3], seed=0), batch_size=20, seed=3)
    history = trainer.fit(X, y, epochs=5, callbacks=[Terminate()], verbose=0,
                          interrupt_checkpoint=tmp_path / "term.npz")
    assert history.interrupted and (tmp_path / "term.npz").is_file()
    assert fb.Trainer.load_checkpoint(tmp_path / "term.npz").epoch == 1  # the epoch it interrupted is redone
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ---------------------------------------------------------------------------------------- memory
# Host memory of the CPU backends; device memory is checked through the memory pool in tests/test_cupy.py.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if not b.startswith("cupy")], indirect=True)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_steady_state_training_allocates_nothing_new(backend, opt):
    rng = np.random.default_rng(0)
    model = fb.MLP([30, 64, 32, 5], seed=0, backend=backend)
    trainer = fb.Trainer(model, optimizer=optim.SGD(0.01, momentum=0.9) if opt == "sgd" else optim.Adam())
    Xd, yd = model.prepare_batch(rng.standard_normal((64, 30)), rng.integers(0, 5, 64), "cross_entropy")
    for _ in range(20):
        trainer._step(Xd, yd)
    gc.collect()
    tracemalloc.start()
    for _ in range(100):
        trainer._step(Xd, yd)
    gc.collect()  # count what is still referenced, not garbage waiting for the cycle collector
    current_1, peak_1 = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    for _ in range(100):
        trainer._step(Xd, yd)
    gc.collect()
    current_2, peak_2 = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 200 steps: above where each hundred started, the second's peak is no higher than the first's
    # (tracing started at 0 for the first), and nothing accumulates from one hundred to the next
    assert peak_2 - current_1 <= peak_1 + 1024, (peak_1, current_1, peak_2)
    assert current_2 - current_1 < 1024, (current_1, current_2)
    # and the per-step temporaries are small next to the model's buffers
    assert peak_2 - current_1 < 64 * 1024


# ---------------------------------------------------------------------------------------- threads
def test_a_trainer_refuses_a_second_thread(data):
    X, y = data
    model = fb.MLP([6, 8, 3], seed=0)
    trainer = fb.Trainer(model, batch_size=50)
    inside, release = threading.Event(), threading.Event()

    class Hold(fb.Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=lambda: trainer.fit(X, y, epochs=1, callbacks=[Hold()], verbose=0))
    worker.start()
    assert inside.wait(10)
    before = model.get_weights()
    with pytest.raises(RuntimeError, match="another thread"):
        trainer.step(X[:10], y[:10])
    with pytest.raises(RuntimeError, match="another thread"):
        fb.Trainer(model).fit(X, y, epochs=1, verbose=0)  # a second Trainer on the same model too
    release.set()
    worker.join(10)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # the refused calls changed nothing
    trainer.step(X[:10], y[:10])  # and it works again afterwards


def test_separate_models_train_in_parallel_threads(data):
    X, y = data
    results = {}

    def train(seed):
        with fb.use_backend("numpy"):
            model = fb.MLP([6, 8, 3], seed=seed)
            fb.Trainer(model, batch_size=20).fit(X, y, epochs=2, verbose=0)
            results[seed] = model.get_weights()

    threads = [threading.Thread(target=train, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for seed in (0, 1):
        model = fb.MLP([6, 8, 3], seed=seed, backend="numpy")
        fb.Trainer(model, batch_size=20).fit(X, y, epochs=2, verbose=0)
        for a, b in zip(results[seed], model.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_trainer_argument_checks():
    model = fb.MLP([2, 2])
    with pytest.raises(ValueError, match="clip_norm"):
        fb.Trainer(model, clip_norm=0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        fb.Trainer(model, on_nonfinite="ignore")
    with pytest.raises(TypeError, match="seed"):
        fb.Trainer(model, seed="zero")
    with pytest.raises(ValueError, match="interrupt_checkpoint"):
        fb.Trainer(model).fit(np.ones((2, 2)), [0, 1], interrupt_checkpoint="/nonexistent/dir/c.npz")
