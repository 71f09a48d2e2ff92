"""Foreign arrays (PyTorch tensors) in and out through DLPack, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import fastbp as fb

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the DLPack tests need its tensors")


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((48, 5)).astype(np.float32), rng.integers(0, 3, 48), rng.uniform(0.5, 2, 48)


def test_tensors_train_and_predict_as_arrays_do(backend, data):
    """fit, step, evaluate, predict, forward and loss_and_grads take CPU tensors (X, labels, sample weights,
    validation data) and give what the same values as NumPy arrays give."""
    X, y, w = data
    results = []
    for wrap in (np.asarray, torch.from_numpy):
        model = fb.MLP([5, 8, 3], seed=0, backend=backend)
        trainer = fb.Trainer(model, batch_size=16, seed=1)
        history = trainer.fit(wrap(X), wrap(y), epochs=2, verbose=0, sample_weight=wrap(w),
                              validation_data=(wrap(X[:8]), wrap(y[:8])))
        step = trainer.step(wrap(X[:16]), wrap(y[:16]))
        loss, grads = model.loss_and_grads(wrap(X), wrap(y))
        results.append((history["loss"], history["val_loss"], step, trainer.evaluate(wrap(X), wrap(y))["loss"],
                        model.predict(wrap(X)), backend.to_numpy(model.forward(wrap(X))), loss,
                        [backend.to_numpy(g) for g in grads]))
    for a, b in zip(*results):
        if isinstance(a, list) and a and not np.isscalar(a[0]):
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_cpu_tensors_are_read_without_a_copy(name, data):
    if name not in fb.available_backends():
        pytest.skip(f"{name} is not available")
    X, y, _ = data
    model = fb.MLP([5, 8, 3], backend=name)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    Xd, yd = model.prepare_batch(Xt, yt, "cross_entropy")
    assert np.shares_memory(Xd, X) and np.shares_memory(yd, y)
    assert np.shares_memory(model._device_input(Xt), X)


def test_outputs_go_back_to_torch_without_a_copy(data):
    X, _, _ = data
    model = fb.MLP([5, 8, 3], backend="numpy")
    out = model(X)
    tensor = torch.from_dlpack(out)
    assert tensor.data_ptr() == out.ctypes.data
    assert_close(tensor.numpy(), out, "float32")


def test_a_tensor_that_requires_grad_is_refused_with_the_fix(data):
    X, y, _ = data
    model = fb.MLP([5, 8, 3], backend="numpy")
    with pytest.raises(TypeError, match=r"through DLPack.*detach"):
        model.forward(torch.from_numpy(X).requires_grad_())
    with pytest.raises(TypeError, match=r"through DLPack.*detach"):
        fb.Trainer(model).fit(torch.from_numpy(X).requires_grad_(), y, epochs=1, verbose=0)


def test_a_dataloader_feeds_training(data):
    """The README's example: batches from a PyTorch DataLoader straight into Trainer.step."""
    X, y, _ = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y)),
                                         batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = fb.MLP([5, 8, 3], backend="numpy", dtype="float32")
    trainer = fb.Trainer(model, optimizer=fb.optim.Adam(0.05))
    first = trainer.evaluate(X, y)["loss"]
    for _ in range(10):
        for xb, yb in loader:
            trainer.step(xb, yb)
    assert trainer.evaluate(X, y)["loss"] < 0.8 * first


@pytest.mark.gpu
def test_cuda_tensors_stay_on_the_gpu(data):
    if "cupy" not in fb.available_backends() or not torch.cuda.is_available():
        pytest.skip("needs the cupy backend and PyTorch with CUDA")
    import cupy

    X, y, _ = data
    model = fb.MLP([5, 8, 3], backend="cupy")
    Xt, yt = torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda()
    Xd, yd = model.prepare_batch(Xt, yt, "cross_entropy")
    assert isinstance(Xd, cupy.ndarray) and Xd.data.ptr == Xt.data_ptr()
    fb.Trainer(model).fit(Xt, yt, epochs=1, verbose=0)
    assert_close(cupy.asnumpy(model.forward(Xt)), model.copy(backend="numpy").forward(X), "float32", rtol=1e-4)
