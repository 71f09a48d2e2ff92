"""Mixed precision on the cupy backend (``MLP(compute_dtype='bfloat16')`` or 'float16', with dynamic loss
scaling): 16-bit GEMMs, activations and gradients over float32 master weights and optimizer state; on a
real GPU (marked gpu) and on the emulated CuPy (marked emulator). The kernels' 16-bit instantiations
themselves are tested one by one in test_emulated_kernels.py."""

import numpy as np
import pytest
from conftest import GPU_PARAMS

import fastbp as fb
from fastbp import datasets
from fastbp.backends import resolve_backend


@pytest.fixture(params=GPU_PARAMS)
def gpu(request):
    return resolve_backend(request.param)


def digits():
    X, y = datasets.load_digits()
    return datasets.train_test_split((X / 16).astype(np.float32), y, test_size=0.25, seed=0)


HALF = ["bfloat16", "float16"]


@pytest.mark.parametrize("compute", HALF)
def test_16_bits_train_digits_to_within_a_hundredth_of_float32(gpu, compute):
    X_tr, X_te, y_tr, y_te = digits()
    scores = {}
    for dtype in (None, compute):
        model = fb.MLP([64, 128, 64, 10], seed=0, backend=gpu, compute_dtype=dtype)
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-3), batch_size=64, seed=0)
        trainer.fit(X_tr, y_tr, epochs=30, verbose=0)
        scores[dtype] = trainer.evaluate(X_te, y_te)["accuracy"]
    assert scores[compute] >= 0.96
    assert abs(scores[compute] - scores[None]) <= 0.01, scores


def test_float16_loss_scaling_skips_overflowing_steps_and_backs_off(gpu):
    """A loss scale that overflows float16 skips the step (the weights stay) and halves the scale, until
    steps go through; the loss reported is not scaled."""
    X_tr, _, y_tr, _ = digits()
    model = fb.MLP([64, 32, 10], seed=1, backend=gpu, compute_dtype="float16")
    trainer = fb.Trainer(model, optimizer=fb.optim.SGD(0.1), batch_size=32)
    plain = fb.Trainer(fb.MLP([64, 32, 10], seed=1, backend=gpu), optimizer=fb.optim.SGD(0.1), batch_size=32)
    assert trainer.loss_scale == 2.0**16 and plain.loss_scale is None
    trainer._loss_scaling()[0:1] = gpu.asarray(np.array([2.0**40], np.float32))
    before = model.get_weights()
    loss = trainer.step(X_tr[:32], y_tr[:32])
    assert abs(loss - plain.step(X_tr[:32], y_tr[:32])) < 0.05 * loss  # unscaled
    assert trainer.overflow_steps == 1 and trainer.loss_scale == 2.0**39
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    for _ in range(40):
        trainer.step(X_tr[:32], y_tr[:32])
    skipped = trainer.overflow_steps
    assert 1 < skipped < 41 and trainer.loss_scale == 2.0 ** (40 - skipped)
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("compute", HALF)
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop", "user"])
def test_master_weights_and_state_stay_float32_and_the_copy_is_them_rounded(gpu, optimizer, compute):
    """After every step the 16-bit copy the GEMMs read equals the float32 master weights rounded to
    nearest even, whether the fused update writes it or the reference update of a user's optimizer."""
    class Plain(fb.optim.SGD):  # a user's optimizer: overriding update() leaves the fused kernel out
        def update(self, xp, p, g, slots, lr, step):
            p -= lr * g

    make = {"sgd": lambda: fb.optim.SGD(0.1, momentum=0.9), "adam": lambda: fb.optim.Adam(1e-2),
            "rmsprop": lambda: fb.optim.RMSProp(1e-3, momentum=0.5), "user": lambda: Plain(0.1)}[optimizer]
    X_tr, _, y_tr, _ = digits()
    model = fb.MLP([64, 32, 10], seed=1, backend=gpu, compute_dtype=compute)
    opt = make()
    trainer = fb.Trainer(model, optimizer=opt, batch_size=32, clip_norm=1.0)
    before = model.get_weights()
    for i in range(3):
        trainer.step(X_tr[32 * i:32 * (i + 1)], y_tr[32 * i:32 * (i + 1)])
        master = gpu.to_numpy(model.flat_parameters())
        copy = gpu.to_numpy(model._flat_compute)
        assert master.dtype == np.float32 and copy.dtype.name == compute
        np.testing.assert_array_equal(copy.view(np.uint16), master.astype(copy.dtype).view(np.uint16))
    assert all(w.dtype == np.float32 for w in model.get_weights())
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert all(a.dtype == np.float32 for arrays in opt.state.slots.values() for a in arrays)


def test_gradients_come_back_float32_and_near_the_float32_models(gpu):
    X_tr, _, y_tr, _ = digits()
    mixed = fb.MLP([64, 48, 10], seed=2, backend=gpu, compute_dtype="bfloat16")
    full = fb.MLP([64, 48, 10], seed=2, backend=gpu)
    loss_m, grads_m = mixed.loss_and_grads(X_tr[:128], y_tr[:128])
    loss_f, grads_f = full.loss_and_grads(X_tr[:128], y_tr[:128])
    assert abs(loss_m - loss_f) <= 2e-2 * abs(loss_f)
    for gm, gf in zip(grads_m, grads_f):
        gm, gf = gpu.to_numpy(gm), gpu.to_numpy(gf)
        assert gm.dtype == np.float32
        # bfloat16 keeps 8 bits: each gradient within a few percent of the largest of its array
        np.testing.assert_allclose(gm, gf, atol=5e-2 * np.abs(gf).max(), rtol=0)
    out = mixed.forward(X_tr[:5])
    assert out.dtype == np.float32 and out.shape == (5, 10)


def test_the_setting_is_saved_and_kept_where_the_backend_has_it(gpu, tmp_path):
    model = fb.MLP([64, 16, 10], seed=0, backend=gpu, compute_dtype="bfloat16")
    assert "compute_dtype='bfloat16'" in repr(model)
    model.save(tmp_path / "m.npz")
    again = fb.load(tmp_path / "m.npz", backend=gpu)
    assert again.compute_dtype.name == "bfloat16" and again.mixed
    on_cpu = fb.load(tmp_path / "m.npz", backend="numpy")  # float32 where mixed precision does not run
    assert not on_cpu.mixed and on_cpu.compute_dtype == np.float32
    X = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(gpu.to_numpy(model.forward(X)), on_cpu.forward(X), rtol=0.1, atol=0.1)
    moved = model.copy().to("numpy")
    assert not moved.mixed


def test_mixed_precision_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="runs on the cupy backend"):
        fb.MLP([4, 3], backend="numpy", compute_dtype="bfloat16")
    with pytest.raises(TypeError, match="compute_dtype must be"):
        fb.MLP([4, 3], backend="numpy", compute_dtype="int8")
    with pytest.raises(ValueError, match="dtype must be 'float32'"):
        fb.MLP([4, 3], dtype="float64", backend="numpy", compute_dtype="bfloat16")
    model = fb.MLP([4, 3], backend="numpy", compute_dtype="float32")  # the model's own dtype: not mixed
    assert not model.mixed


@pytest.mark.parametrize("compute", HALF)
def test_sample_weights_and_validation_in_16_bits(gpu, compute):
    X_tr, X_te, y_tr, y_te = digits()
    weights = np.where(y_tr == 3, 2.0, 1.0)
    model = fb.MLP([64, 32, 10], seed=0, backend=gpu, compute_dtype=compute)
    history = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=64).fit(
        X_tr, y_tr, epochs=3, sample_weight=weights, validation_data=(X_te, y_te), verbose=0)
    assert np.isfinite(history.history["loss"]).all() and history.history["val_accuracy"][-1] > 0.8


@pytest.mark.parametrize("compute", HALF)
def test_a_resumed_checkpoint_trains_on_as_if_never_stopped(gpu, compute, tmp_path):
    """The checkpoint keeps the compute dtype and (float16) the loss scale: resuming equals not stopping."""
    X_tr, _, y_tr, _ = digits()
    model = fb.MLP([64, 32, 10], seed=0, backend=gpu, compute_dtype=compute)
    trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=64, seed=0)
    trainer.fit(X_tr[:640], y_tr[:640], epochs=1, verbose=0)
    if compute == "float16":  # a scale of its own, so that restoring it shows
        trainer._set_loss_scaling_state([1024.0, 5, 2])
    trainer.save_checkpoint(tmp_path / "run.npz")
    resumed = fb.Trainer.load_checkpoint(tmp_path / "run.npz", backend=gpu)
    assert resumed.model.compute_dtype.name == compute
    assert resumed.loss_scale == trainer.loss_scale and resumed.overflow_steps == trainer.overflow_steps
    for t in (trainer, resumed):
        t.fit(X_tr[:640], y_tr[:640], epochs=1, verbose=0)
    for a, b in zip(trainer.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_an_update_with_a_copy_its_kernels_cannot_take_runs_the_reference(gpu):
    """A float32 gradient with a bfloat16 copy (no kernel has that pair): the reference update runs, and
    the copy is still the updated parameters rounded."""
    rng = np.random.default_rng(3)
    p = gpu.asarray(rng.standard_normal(50), np.float32)
    g = gpu.asarray(rng.standard_normal(50), np.float32)
    copy = p.astype(fb.dtypes.half_dtype("bfloat16"))
    want = gpu.to_numpy(p) - np.float32(0.1) * gpu.to_numpy(g)
    fb.optim.SGD(0.1).step([p], [g], gpu, copies=[copy])
    np.testing.assert_array_equal(gpu.to_numpy(p), want)
    np.testing.assert_array_equal(gpu.to_numpy(copy).view(np.uint16), want.astype(copy.dtype).view(np.uint16))
