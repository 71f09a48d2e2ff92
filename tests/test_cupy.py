"""Tests of the cupy backend as a device backend (the op, gradient, optimizer and training tests also run
on it through the backend fixture): on a real CUDA device where one is usable (marked gpu; skipped with the
reason elsewhere), and always on the emulated CuPy (marked emulator)."""

import math

import numpy as np
import pytest
from conftest import GPU_PARAMS, assert_close

import fastbp as fb
from fastbp import datasets
from fastbp.backends import resolve_backend


@pytest.fixture(params=GPU_PARAMS)
def gpu(request):
    return resolve_backend(request.param)


def test_every_kernel_instantiation_compiles_and_loads(gpu):
    from fastbp.backends import cuda_sources

    assert gpu.warmup() >= 0
    for file in cuda_sources.FILES:
        module = gpu._modules[file]
        assert module.code == cuda_sources.source(file)  # self-contained: CuPy's cache sees header edits
        for name in cuda_sources.name_expressions(file):
            kernel = module.get_function(name)
            assert callable(kernel)


def test_digits_reach_the_numpy_backends_accuracy(gpu):
    X, y = datasets.load_digits()
    X_tr, X_te, y_tr, y_te = datasets.train_test_split(X / 16, y, test_size=0.25, seed=0)
    scores = {}
    for backend in (gpu, "numpy"):
        model = fb.MLP([64, 128, 64, 10], seed=0, backend=backend)
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-3), batch_size=64, seed=0)
        trainer.fit(X_tr, y_tr, epochs=30, verbose=0)
        scores[backend if isinstance(backend, str) else "gpu"] = trainer.evaluate(X_te, y_te)["accuracy"]
    assert scores["gpu"] >= 0.97
    assert abs(scores["gpu"] - scores["numpy"]) <= 0.01, scores


def test_memory_pool_stays_flat_over_100_steps(gpu):
    rng = np.random.default_rng(0)
    model = fb.MLP([256, 512, 512, 10], seed=0, backend=gpu)
    trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-3))
    Xd, yd = model.prepare_batch(rng.standard_normal((128, 256)), rng.integers(0, 10, 128), "cross_entropy")
    for _ in range(5):
        trainer._step(Xd, yd)
    gpu.synchronize()
    before = gpu.memory_in_use()
    for _ in range(100):
        trainer._step(Xd, yd)
    gpu.synchronize()
    assert gpu.memory_in_use() == before


def test_gpu_training_is_bit_identical_from_run_to_run(gpu):
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((512, 40)), rng.integers(0, 5, 512)
    runs = []
    for _ in range(3):
        model = fb.MLP([40, 64, 64, 5], seed=2, backend=gpu)
        fb.Trainer(model, batch_size=64, seed=3).fit(X, y, epochs=2, verbose=0)
        runs.append(model.get_weights())
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_checkpoints_move_between_gpu_and_cpu(gpu, tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((200, 12)), rng.integers(0, 3, 200)
    trainer = fb.Trainer(fb.MLP([12, 16, 3], seed=0, backend=gpu), batch_size=50)
    trainer.fit(X, y, epochs=2, verbose=0)
    path = trainer.save_checkpoint(tmp_path / "gpu.npz")
    on_cpu = fb.Trainer.load_checkpoint(path, backend="numpy")
    back = fb.Trainer.load_checkpoint(path, backend=gpu.name)
    for a, b, c in zip(trainer.model.get_weights(), on_cpu.model.get_weights(), back.model.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # training continues on the CPU from the GPU's state, close to the GPU's own continuation
    on_cpu.fit(X, y, epochs=1, verbose=0)
    back.fit(X, y, epochs=1, verbose=0)
    for a, b in zip(on_cpu.model.get_weights(), back.model.get_weights()):
        assert_close(a, b, "float32", rtol=1e-4, atol=1e-5)  # float32 GEMMs differ by library


def test_out_of_memory_says_what_was_asked(gpu):
    with pytest.raises(MemoryError, match="asked for .* MiB free of"):
        gpu.empty((2**42,), np.float32)


def test_device_choice(gpu):
    assert resolve_backend(f"{gpu.name}:0") is gpu
    with pytest.raises(ValueError, match="does not exist"):
        resolve_backend(f"{gpu.name}:99")


def test_tf32_option(gpu):
    rng = np.random.default_rng(0)
    A = gpu.asarray(rng.standard_normal((512, 512)), np.float32)
    B = gpu.asarray(rng.standard_normal((512, 512)), np.float32)
    exact = gpu.to_numpy(A).astype(np.float64) @ gpu.to_numpy(B).astype(np.float64)
    try:
        gpu.set_tf32(True)
        tf32 = gpu.to_numpy(gpu.matmul(A, B))
    finally:
        gpu.set_tf32(False)
    fp32 = gpu.to_numpy(gpu.matmul(A, B))
    err32 = np.abs(fp32 - exact).max() / np.abs(exact).max()
    err_tf32 = np.abs(tf32 - exact).max() / np.abs(exact).max()
    # TF32 keeps 10 mantissa bits of each input (~5e-4 relative): visibly worse than FP32, so the switch
    # did engage, and switched off again, FP32 is back
    assert err32 < 1e-5 and 30 * err32 < err_tf32 < 1e-2, (err32, err_tf32)


def test_training_steps_read_nothing_back_from_the_gpu(gpu, monkeypatch):
    """The non-finite check runs on the device: a 70-step epoch reads back the guard every
    DEFERRED_CHECK_STEPS steps, and at the epoch's end together with the epoch's metrics, not once per step."""
    from fastbp import divergence

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((70 * 16, 20)), rng.integers(0, 4, 70 * 16)
    model = fb.MLP([20, 32, 4], seed=0, backend=gpu)
    trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-3), batch_size=16, clip_norm=1.0)
    reads = []
    for name in ("to_numpy", "to_float", "to_floats"):
        original = getattr(gpu, name)
        monkeypatch.setattr(gpu, name, lambda *a, _o=original, _n=name: reads.append(_n) or _o(*a))
    trainer.fit(X, y, epochs=1, verbose=0)
    every = divergence.DEFERRED_CHECK_STEPS
    # every 32 steps, then at the epoch's end with the loss and accuracy: nothing else
    assert reads == ["to_numpy"] * (70 // every + (70 % every > 0)), reads


def test_a_diverging_step_on_the_gpu_leaves_the_state_before_it(gpu, monkeypatch):
    from fastbp import divergence

    monkeypatch.setattr(divergence, "DEFERRED_CHECK_STEPS", 1000)  # read the guard at the epoch's end only
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((160, 12)), rng.integers(0, 3, 160)
    bad = X.copy()
    bad[50] *= 1e38  # overflows in float32: the fourth batch of 16 is not finite
    model = fb.MLP([12, 16, 3], seed=0, backend=gpu)
    trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=16)
    with pytest.raises(fb.DivergenceError, match="at epoch 1, step 4 "):
        trainer.fit(bad, y, epochs=1, shuffle=False, verbose=0)
    assert trainer.steps == 3 and trainer.optimizer.state.step == 3
    # the same three clean steps, taken alone, give the very same parameters and moments
    ref = fb.MLP([12, 16, 3], seed=0, backend=gpu)
    ref_trainer = fb.Trainer(ref, optimizer=fb.optim.Adam(1e-2), batch_size=16)
    ref_trainer.fit(X[:48], y[:48], epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(a, b)
    got, want = trainer.optimizer.state_dict(), ref_trainer.optimizer.state_dict()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


# ---------------------------------------------------------------------------------------- found by the emulator
def _second_device_or_skip(gpu):
    count = gpu.xp.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip(f"one CUDA device here ({count}); the emulated CuPy has two")
    return resolve_backend(f"{gpu.name}:1")


def test_a_second_device_runs_the_whole_step_on_it(gpu):
    """Every array operation of fit, step, evaluate, predict, loss_and_grads and Optimizer.step runs with
    the backend's device current (the emulated CuPy refuses an array used from another device)."""
    other = _second_device_or_skip(gpu)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((200, 12)), rng.integers(0, 3, 200)
    results = []
    for backend in (gpu, other):
        model = fb.MLP([12, 16, 3], seed=0, backend=backend)
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=50, clip_norm=1.0)
        trainer.fit(X, y, epochs=2, verbose=0, validation_data=(X[:50], y[:50]))
        trainer.step(X[:10], y[:10])
        loss, grads = model.loss_and_grads(X[:20], y[:20])
        fb.optim.SGD(0.1).step(model.parameters(), grads, backend)
        results.append((trainer.evaluate(X, y), trainer.predict(X[:20]), loss, model.get_weights()))
    assert results[0][0] == results[1][0] and results[0][2] == results[1][2]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    for a, b in zip(results[0][3], results[1][3]):
        np.testing.assert_array_equal(a, b)


def test_out_of_memory_while_converting_a_device_array_says_what_was_asked(gpu, monkeypatch):
    if gpu.name == "cupy":
        pytest.skip("needs the emulated device's adjustable memory size")
    from fastbp.testing import fake_cupy

    x = gpu.asarray(np.ones((1000, 1000)), np.float32)
    monkeypatch.setattr(fake_cupy.settings, "memory_bytes", gpu.memory_in_use() + 2**20)
    with pytest.raises(MemoryError, match=r"asked for 7.6 MiB"):
        gpu.asarray(x, np.float64)  # a device array: its size from its shape, not np.asarray


def test_labels_and_targets_of_any_dtype_reach_the_loss_kernels_as_they_read_them(gpu):
    rng = np.random.default_rng(2)
    Z = rng.standard_normal((6, 4))
    cases = [("cross_entropy", rng.integers(0, 4, 6).astype(np.int32)),
             ("cross_entropy", rng.dirichlet(np.ones(4), 6).astype(np.float32)),
             ("binary_cross_entropy", rng.integers(0, 2, (6, 4)).astype(np.int64)),
             ("mse", rng.standard_normal((6, 4)).astype(np.float32))]
    ref = resolve_backend("numpy")
    for loss, y in cases:
        value, delta = gpu.output_delta(gpu.asarray(Z, np.float64), gpu.asarray(y), loss)
        want_value, want_delta = ref.output_delta(Z, y.astype(np.int64 if y.ndim == 1 else np.float64), loss)
        assert_close(gpu.to_float(value), want_value, "float64", err_msg=f"{loss} {y.dtype}")
        assert_close(gpu.to_numpy(delta), want_delta, "float64")


def test_updates_through_non_contiguous_parameters_are_not_lost(gpu):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 4))
    g = rng.standard_normal((4, 6))
    for make in (lambda: fb.optim.SGD(0.1, momentum=0.9), lambda: fb.optim.Adam(1e-2), lambda: fb.optim.RMSProp(1e-2)):
        Wd = gpu.asarray(W.copy(), np.float64)
        make().step([Wd.T], [gpu.asarray(g, np.float64)], gpu)  # Wd.T is not C-contiguous: a reshape would copy
        P = W.T.copy()  # the same update on a contiguous parameter, on the reference backend
        make().step([P], [g], resolve_backend("numpy"))
        assert not np.array_equal(gpu.to_numpy(Wd), W)
        assert_close(gpu.to_numpy(Wd).T, P, "float64")


def test_kernel_launches_refuse_arrays_they_would_misread(gpu):
    ok = gpu.asarray(np.ones(8), np.float32)
    labels32 = gpu.asarray(np.zeros(4, np.int32))
    strided = gpu.asarray(np.ones(16), np.float32)[::2]
    partial = gpu.asarray(np.zeros(1), np.float32)
    gpu._launch("optim.cu", "sumsq_partial<{T}>", np.float32, (1,), (32,), (ok, np.int64(8), partial))
    np.testing.assert_array_equal(gpu.to_numpy(partial), [8.0])
    with pytest.raises(ValueError, match="argument 0 is not C-contiguous"):
        gpu._launch("optim.cu", "sumsq_partial<{T}>", np.float32, (1,), (32,), (strided, np.int64(8), partial))
    with pytest.raises(ValueError, match="argument 1 is int32; integer arrays must be int64"):
        gpu._launch("loss.cu", "softmax_ce<{T}>", np.float32, (1,), (32,),
                    (ok, labels32, ok, ok, ok, np.int32(1), np.int32(1), np.int32(0)))
    with pytest.raises(TypeError, match="host"):
        gpu._launch("optim.cu", "sumsq_partial<{T}>", np.float32, (1,), (32,),
                    (np.ones(8, np.float32), np.int64(8), partial))


def test_the_kernels_shared_arrays_follow_the_launch_size(gpu, monkeypatch):
    """The block sizes live in cuda_sources alone: the launches read them, and the kernels' shared arrays
    are sized from them (defines prepended to the source), so changing one cannot overflow the other."""
    from fastbp.backends import cuda_sources
    from fastbp.backends.cupy_backend import CupyBackend

    monkeypatch.setattr(cuda_sources, "THREADS", 512)
    monkeypatch.setattr(cuda_sources, "REDUCE_THREADS", 512)
    fresh = CupyBackend(gpu.device_id, gpu.xp)  # compiles the kernels anew
    assert "#define FASTBP_THREADS 512" in cuda_sources.source("optim.cu")
    rng = np.random.default_rng(4)
    x = rng.standard_normal(100_003)
    assert_close(fresh.to_float(fresh.sum_of_squares(fresh.asarray(x, np.float64))), (x**2).sum(), "float64")
    X, y = rng.standard_normal((40, 12)), rng.integers(0, 3, 40)
    value, grads = fb.MLP([12, 16, 3], dtype="float64", seed=0, backend=fresh).loss_and_grads(X, y)
    ref_value, ref_grads = fb.MLP([12, 16, 3], dtype="float64", seed=0, backend="numpy").loss_and_grads(X, y)
    assert_close(value, ref_value, "float64")
    for g, r in zip(grads, ref_grads):
        assert_close(fresh.to_numpy(g), r, "float64")
    monkeypatch.setattr(cuda_sources, "THREADS", 384)  # block_sum needs a power of two
    with pytest.raises(ValueError, match="THREADS must be a power of two up to 1024, got 384"):
        cuda_sources.source("optim.cu")


def test_no_scratch_buffers_are_allocated_on_the_device(gpu):
    """Scratch space belongs to the backend (Backend._scratch): the reference ops and updates ask for theirs
    (activation temporaries, Optimizer.work), the cupy kernels need none, so none is allocated on the
    device (it was about 0.8 GB at the large config when the model and optimizers allocated it)."""
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((64, 30)), rng.integers(0, 5, 64)
    kept = {}
    for backend in (gpu, resolve_backend("numpy")):
        backend.__dict__.pop("_local", None)  # this step's scratch alone, not what earlier tests left
        model = fb.MLP([30, 64, 32, 5], activation="gelu", seed=0, backend=backend)  # gelu has scratch on the CPU
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-3))
        trainer.step(X, y)
        local = backend.__dict__.get("_local")
        cache = getattr(local, "scratch", {}) if local is not None else {}
        kept[backend.name] = sorted({tag for tag, _, _ in cache if tag in ("activation", "activation2", "optimizer")})
    assert kept[gpu.name] == [] and kept["numpy"] == ["activation", "activation2", "optimizer"]


def test_inherited_reference_ops_read_nothing_back_from_the_device(gpu):
    """An op the cupy backend does not override (a new optimizer's update, clipping) runs the reference's
    code: under a guard it must neither read the guard nor the norm back to the host (a sync per parameter
    per step), yet skip exactly when the guard is tripped and equal the reference when it is not."""
    if gpu.name == "cupy":
        pytest.skip("host reads are counted by the emulated CuPy")
    from fastbp.backends.base import Backend
    from fastbp.testing import fake_cupy

    ref = resolve_backend("numpy")
    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal(50) for _ in range(3)] + [rng.random(50)]  # p, g, a moment, a square average
    sgd = fb.optim.SGD(momentum=0.9, nesterov=True, weight_decay=1e-2)
    adam = fb.optim.AdamW(weight_decay=1e-2)
    rmsprop = fb.optim.RMSProp(momentum=0.5, weight_decay=1e-2)
    def reference(opt, slots, lr, step):
        def op(bk, a, guard):
            opt.prepare([a[0]], bk)  # binds the backend that lends the update its scratch
            opt._reference_update(bk, a[0], a[1], {name: a[i] for name, i in slots.items()}, lr, step, guard)
        return op

    ops = {  # the optimizers' reference updates (their fused kernels are tested against them elsewhere)
        "sgd": reference(sgd, {"momentum": 2}, 0.1, 2),
        "adam": reference(adam, {"m": 2, "v": 3}, 1e-2, 3),
        "rmsprop": reference(rmsprop, {"square_avg": 3, "momentum": 2}, 1e-2, 1),
        "clip": lambda bk, a, guard: Backend.clip_by_norm(bk, a[0], bk.sum_of_squares(a[0]), 0.5, guard=guard),
    }
    for name, op in ops.items():
        for tripped in (False, True):
            dev = [gpu.asarray(a.copy(), np.float64) for a in arrays]
            guard = gpu.asarray(np.array([float(tripped), 0, 0, 0]))
            fake_cupy.stats.reset()
            op(gpu, dev, guard)
            assert fake_cupy.stats.device_to_host == 0, f"{name}: read back from the device"
            host = [a.copy() for a in arrays]
            if not tripped:
                op(ref, host, None)
            for d, h in zip(dev, host):
                np.testing.assert_array_equal(gpu.to_numpy(d), h, err_msg=f"{name}, guard tripped: {tripped}")


def test_a_step_on_a_second_device_switches_devices_once(gpu):
    """Training on device 1 makes it current once per public call (in, then back out), not once per op."""
    if gpu.name == "cupy":
        pytest.skip("device switches are counted by the emulated CuPy")
    from fastbp.testing import fake_cupy

    other = _second_device_or_skip(gpu)
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((160, 20)), rng.integers(0, 4, 160)
    trainer = fb.Trainer(fb.MLP([20, 32, 32, 4], seed=0, backend=other), optimizer=fb.optim.Adam(1e-3),
                         batch_size=16, clip_norm=1.0)
    trainer.fit(X, y, epochs=1, verbose=0)
    fake_cupy.stats.reset()
    trainer.step(X[:16], y[:16])
    assert fake_cupy.stats.device_switches == 2, fake_cupy.stats
    fake_cupy.stats.reset()
    trainer.fit(X, y, epochs=1, verbose=0)  # 10 steps
    assert fake_cupy.stats.device_switches <= 6, fake_cupy.stats



@pytest.mark.parametrize("activation,loss", [("relu", "cross_entropy"), ("gelu", "mse")])
def test_a_step_allocates_nothing_after_its_first_run(gpu, activation, loss):
    """After the first step of a batch size, a training step takes no memory from the pool: reduction
    partials and row losses are kept per shape, the loss and the gradient norm written into last step's."""
    if gpu.name == "cupy":
        pytest.skip("allocations are counted by the emulated CuPy's pool")
    from fastbp.testing import fake_cupy

    rng = np.random.default_rng(8)
    model = fb.MLP([20, 32, 32, 4], activation=activation, seed=0, backend=gpu)
    trainer = fb.Trainer(model, loss=loss, optimizer=fb.optim.Adam(1e-3), clip_norm=1.0)
    y = rng.integers(0, 4, 16) if loss == "cross_entropy" else rng.standard_normal((16, 4))
    Xd, yd = model.prepare_batch(rng.standard_normal((16, 20)), y, loss)
    trainer._step(Xd, yd)
    pool = fake_cupy.get_default_memory_pool()
    before = pool.malloc_count
    losses = [gpu.to_float(trainer._step(Xd, yd)[0]) for _ in range(20)]
    assert pool.malloc_count == before
    assert losses[-1] < losses[0]  # and it still trains


def test_predicting_on_a_device_array_copies_nothing_back_and_forth(gpu):
    """Trainer.predict and MLP.forward check a device X where it lives (one flag read for finiteness)
    instead of copying it to the host and back."""
    if gpu.name == "cupy":
        pytest.skip("transfers are counted by the emulated CuPy")
    from fastbp.testing import fake_cupy

    rng = np.random.default_rng(9)
    X = rng.standard_normal((50, 12))
    trainer = fb.Trainer(fb.MLP([12, 16, 3], seed=0, backend=gpu))
    want = trainer.predict(X)
    Xd = gpu.asarray(X, np.float32)
    fake_cupy.stats.reset()
    got = trainer.predict(Xd)
    assert fake_cupy.stats.host_to_device == 0 and fake_cupy.stats.device_to_host == 2  # the flag, the labels
    np.testing.assert_array_equal(got, want)
    bad = gpu.asarray(np.where(np.arange(50)[:, None] == 7, np.nan, X), np.float32)
    with pytest.raises(ValueError, match="X contains NaN or infinite values"):
        trainer.predict(bad)


def test_a_public_step_on_the_device_reads_back_once(gpu):
    """Trainer.step returns the batch's loss: that read carries the non-finite guard too (one transfer)."""
    if gpu.name == "cupy":
        pytest.skip("transfers are counted by the emulated CuPy")
    from fastbp.testing import fake_cupy

    rng = np.random.default_rng(10)
    trainer = fb.Trainer(fb.MLP([12, 16, 3], seed=0, backend=gpu), optimizer=fb.optim.Adam(1e-3))
    X, y = rng.standard_normal((32, 12)), rng.integers(0, 3, 32)
    first = trainer.step(X, y)
    fake_cupy.stats.reset()
    second = trainer.step(X, y)
    assert fake_cupy.stats.device_to_host == 1
    assert math.isfinite(first) and second < first
    bad = X.copy()
    bad[3] = 1e39  # finite as given (float64), infinite in the model's float32: caught by the guard read
    with pytest.raises(fb.DivergenceError, match="non-finite (loss|gradient) at epoch 0, step 3"):
        trainer.step(bad, y)
    assert trainer.steps == 2



def test_device_batches_are_checked_on_the_device(gpu):
    """Trainer.step and fit take device arrays as they are: shapes at once, values by one kernel whose
    verdict joins the non-finite guard, so a step still reads back once and copies nothing to the device;
    an invalid batch raises from that read and changes nothing."""
    if gpu.name == "cupy":
        pytest.skip("transfers are counted by the emulated CuPy")
    from fastbp.testing import fake_cupy

    rng = np.random.default_rng(11)
    X, y = rng.standard_normal((32, 12)), rng.integers(0, 3, 32)
    host = fb.Trainer(fb.MLP([12, 16, 3], seed=0, backend=gpu), optimizer=fb.optim.Adam(1e-3))
    trainer = fb.Trainer(fb.MLP([12, 16, 3], seed=0, backend=gpu), optimizer=fb.optim.Adam(1e-3))
    Xd, yd = gpu.asarray(X), gpu.asarray(y.astype(np.int32))  # float64 features, int32 labels: converted there
    want = [host.step(X, y) for _ in range(3)]
    assert trainer.step(Xd, yd) == want[0]
    fake_cupy.stats.reset()
    assert trainer.step(Xd, yd) == want[1]
    assert fake_cupy.stats.host_to_device == 0 and fake_cupy.stats.device_to_host == 1, fake_cupy.stats
    before = gpu.to_numpy(trainer.model.flat_parameters()).copy()
    for bad_X, bad_y, what in [(np.where(np.arange(32)[:, None] == 5, np.nan, X), y, "labels outside"),
                               (X, np.where(np.arange(32) == 9, 3, y), r"labels outside \[0, 3\)"),
                               (X, np.where(np.arange(32) == 0, -1, y), "holds 1 invalid")]:
        fake_cupy.stats.reset()
        with pytest.raises(ValueError, match=f"{what}.*the step changed nothing"):
            trainer.step(gpu.asarray(bad_X), gpu.asarray(bad_y))
        assert fake_cupy.stats.device_to_host == 1
        assert trainer.steps == 2 and trainer.optimizer.state.step == 2
        np.testing.assert_array_equal(gpu.to_numpy(trainer.model.flat_parameters()), before)
    assert trainer.step(Xd, yd) == want[2]  # and training goes on as if nothing had happened
    for loss, targets, what in [("mse", np.full((32, 3), np.inf), "targets that are NaN or infinite"),
                                ("binary_cross_entropy", np.full((32, 3), 1.5), r"targets outside \[0, 1\]")]:
        other = fb.Trainer(fb.MLP([12, 16, 3], seed=0, backend=gpu), loss=loss)
        with pytest.raises(ValueError, match=what):
            other.step(Xd, gpu.asarray(targets))
        with pytest.raises(ValueError, match=what):  # fit reads the verdict at once
            other.fit(Xd, gpu.asarray(targets), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="must have 12 features"):
        trainer.step(gpu.asarray(X[:, :5]), yd)


def test_fit_keeps_its_metrics_on_the_device(gpu):
    """The epoch's loss and correct count come from the loss kernel (one row of statistics per step, read
    at the epoch's end): the steps of fit allocate nothing and launch no kernel beyond the step's own, and
    the metrics equal the NumPy reference's."""
    if gpu.name == "cupy":
        pytest.skip("allocations and launches are counted by the emulated CuPy")
    from fastbp.testing import fake_cupy

    rng = np.random.default_rng(12)
    X, y = rng.standard_normal((16 * 9, 10)), rng.integers(0, 4, 16 * 9)

    def fit(rows, backend, loss="cross_entropy", targets=y):
        trainer = fb.Trainer(fb.MLP([10, 16, 4], seed=0, backend=backend, dtype="float64"), loss=loss,
                             optimizer=fb.optim.SGD(0.1), batch_size=16)
        trainer.step(X[:16], targets[:16])  # the batch size's buffers and kernels
        pool = fake_cupy.get_default_memory_pool()
        before_allocs, before_launches = pool.malloc_count, fake_cupy.stats.launches
        history = trainer.fit(X[:rows], targets[:rows], epochs=1, shuffle=False, verbose=0)
        return history.epochs[0], pool.malloc_count - before_allocs, fake_cupy.stats.launches - before_launches

    short, allocs_short, launches_short = fit(16 * 2, gpu)
    long, allocs_long, launches_long = fit(16 * 9, gpu)
    assert allocs_long == allocs_short  # no step allocates
    step_launches = (launches_long - launches_short) / 7
    fake_cupy.stats.reset()
    trainer = fb.Trainer(fb.MLP([10, 16, 4], seed=0, backend=gpu, dtype="float64"), optimizer=fb.optim.SGD(0.1))
    Xd, yd = trainer.model.prepare_batch(X[:16], y[:16], "cross_entropy")
    trainer._step(Xd, yd)
    fake_cupy.stats.reset()
    trainer._step(Xd, yd)
    assert step_launches == fake_cupy.stats.launches  # the step's kernels, nothing for the metrics
    reference, _, _ = fit(16 * 9, "numpy")
    assert_close(long["loss"], reference["loss"], "float64")
    assert long["accuracy"] == reference["accuracy"]
    targets = (rng.random((16 * 9, 4)) > 0.5).astype(float)
    got, _, _ = fit(16 * 9, gpu, "binary_cross_entropy", targets)
    want, _, _ = fit(16 * 9, "numpy", "binary_cross_entropy", targets)
    assert_close(got["loss"], want["loss"], "float64")
    assert got["accuracy"] == want["accuracy"]


@pytest.mark.parametrize("compute", [None, "bfloat16"])
def test_a_gpu_model_pickles_and_trains_on_after_unpickling(gpu, compute):
    """The backend pickles by name and device (not its CuPy module or kernels): an unpickled model is on
    the same backend, computes the same outputs and trains on."""
    import pickle

    X, y = datasets.load_digits()
    X = (X[:256] / 16).astype(np.float32)
    model = fb.MLP([64, 16, 10], seed=0, backend=gpu, compute_dtype=compute)
    fb.Trainer(model, optimizer="adam", batch_size=64).fit(X, y[:256], epochs=1, verbose=0)
    again = pickle.loads(pickle.dumps(model))
    assert again.backend is gpu and again.compute_dtype == model.compute_dtype
    np.testing.assert_array_equal(gpu.to_numpy(again.forward(X)), gpu.to_numpy(model.forward(X)))
    fb.Trainer(again, optimizer="adam", batch_size=64).fit(X, y[:256], epochs=1, verbose=0)
    assert not np.array_equal(gpu.to_numpy(again.forward(X)), gpu.to_numpy(model.forward(X)))


@pytest.mark.emulator
def test_the_emulated_cupy_captures_kernel_launches_and_replays_them():
    """Stream capture as CUDA graphs record it: launches between begin_capture and end_capture are recorded,
    not run; each Graph.launch runs them on what the arrays hold then. What the emulator cannot defer raises
    inside a capture, CuPy's own matmul as CuPy does (it refuses cuBLAS calls while a stream captures)."""
    from conftest import EMULATED, EMULATOR_MISSING

    if EMULATOR_MISSING:
        pytest.skip(f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")
    from fastbp.testing import fake_cupy as cp

    bk = resolve_backend(EMULATED)
    x = bk.asarray(np.arange(6, dtype=np.float32))
    out = bk.sum_of_squares(x)  # its scratch and result made outside the capture
    out[...] = 0
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        assert stream.is_capturing()
        bk.sum_of_squares(x, out=out)  # two launches, recorded
        with pytest.raises(NotImplementedError, match="cuBLAS API during stream capture"):
            cp.matmul(x.reshape(2, 3), x.reshape(3, 2))
        with pytest.raises(cp.CUDARuntimeError, match="StreamCaptureUnsupported"):
            x * 2  # an elementwise op: not deferred by the emulator
        with pytest.raises(cp.CUDARuntimeError, match="StreamCaptureUnsupported"):
            cp.empty(4, cp.float32)
        with pytest.raises(cp.CUDARuntimeError, match="StreamCaptureUnsupported"):
            float(out)  # a read: not allowed while capturing
        graph = stream.end_capture()
        assert not stream.is_capturing()
    assert float(out) == 0.0  # nothing ran during the capture
    graph.launch(stream)
    assert float(out) == 55.0
    x[...] = 1.0
    graph.launch(stream)  # replays read the arrays' contents at launch
    assert float(out) == 6.0
    with pytest.raises(cp.CUDARuntimeError, match="no capture"):
        stream.end_capture()
