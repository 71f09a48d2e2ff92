"""The fused training pass of the cupy backend (``set_fused_mlp``; kernels/mlp.cu): forward, softmax
cross-entropy and backward of a tile of rows through every layer in one kernel. On a GPU (marked gpu) and on
the emulated CuPy (marked emulator), against the layer-by-layer path and the NumPy reference: the loss, the
correct count, every gradient and the output, within the dtype's rounding (the fused pass sums its products
in its own order); where it applies and why not elsewhere; the shared memory it asks for; training with it,
with CUDA graphs too."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GPU_PARAMS

import fastbp as fb
from fastbp.backends import resolve_backend
from fastbp.backends.cupy_backend import SHARED_DEFAULT, mlp_shared_bytes
from fastbp.testing import fake_cupy

TOL = {"float32": (2e-5, 2e-6), "float64": (1e-12, 1e-13)}  # rtol, atol as a fraction of the largest value


@pytest.fixture
def fused(request, monkeypatch):
    """The backend with the fused pass on for the test, and off after it; one SM, so a grid of at most 4
    blocks (a block then runs several tiles of a test's batch, as on a GPU at 65536 rows)."""
    bk = resolve_backend(request.param)
    monkeypatch.setattr(bk, "_sm_count", 1)
    bk.set_fused_mlp(True)
    yield bk
    bk.set_fused_mlp(False)


def step_results(bk, sizes, activation, dtype, X, y, on):
    """One training step's (stats, gradient, output, parameters after SGD) with the fused pass on or off."""
    bk.set_fused_mlp(on)
    model = fb.MLP(sizes, activation=activation, dtype=dtype, seed=0, backend=bk)
    Xd, yd = model.prepare_batch(X, y, "cross_entropy")
    stats = bk.zeros((2,), np.float64 if dtype == "float64" else np.float32)
    trainer = fb.Trainer(model, optimizer=fb.optim.SGD(0.1), batch_size=X.shape[0])
    _, out = trainer._step(Xd, yd, stats)
    return [bk.to_numpy(a).astype(np.float64) for a in (stats, model.flat_grad(), out, model.flat_parameters())]


CASES = [  # sizes, activation, rows: tiles of 32 rows, a partial last one, a block running several
    ([8, 16, 16, 3], "relu", 150),
    ([5, 12, 7, 4], "gelu", 77),  # g' reads Z: the pass keeps every hidden layer's Z too
    ([6, 9, 9, 9, 10], "tanh", 40),
    ([7, 20, 2], "leaky_relu", 33),
    ([6, 4], "relu", 9),  # no hidden layer: the output layer alone
    ([3, 64, 64, 64, 64, 10], "silu", 65),
]


@pytest.mark.parametrize("fused", GPU_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_fused_pass_computes_what_the_layers_compute(fused, dtype, case):
    bk = fused
    sizes, activation, rows = CASES[case]
    rng = np.random.default_rng(case)
    X, y = rng.standard_normal((rows, sizes[0])), rng.integers(0, sizes[-1], rows)
    model = fb.MLP(sizes, activation=activation, dtype=dtype, seed=0, backend=bk)
    assert bk.fused_mlp_route(model) is None
    emulated = bk.xp is fake_cupy
    fake_cupy.stats.reset()
    on = step_results(bk, sizes, activation, dtype, X, y, True)
    if emulated:  # one launch of the fused pass did the forward and backward
        assert sum(n for k, n in fake_cupy.stats.kernels.items() if k.startswith("mlp_fused_pass")) == 1
        assert not any(k.startswith(("forward_epilogue", "backward_epilogue", "softmax_ce"))
                       for k in fake_cupy.stats.kernels)
    off = step_results(bk, sizes, activation, dtype, X, y, False)
    reference = fb.MLP(sizes, activation=activation, dtype=dtype, seed=0, backend="numpy")
    loss, grads = reference.loss_and_grads(X, y)
    rtol, atol = TOL[dtype]
    for name, a, b in zip(("stats", "gradient", "output", "parameters"), on, off):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * np.abs(b).max(), err_msg=name)
    np.testing.assert_allclose(on[0][0], loss, rtol=rtol)
    want = np.concatenate([g.ravel() for g in grads])
    np.testing.assert_allclose(on[1], want, rtol=rtol, atol=atol * np.abs(want).max())
    again = step_results(bk, sizes, activation, dtype, X, y, True)
    for a, b in zip(on, again):  # fixed tiles and summation orders: the same bits
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fused", GPU_PARAMS, indirect=True)
def test_bfloat16_compute_runs_fused(fused):
    """Mixed precision in bfloat16 runs fused too: the 16-bit compute copy of the weights in, the 16-bit
    gradient out (float32 sums inside), the float32 master weights updated from it; within bfloat16's
    rounding of the layer-by-layer step."""
    bk = fused
    if "bfloat16" not in bk.compute_dtypes:
        pytest.skip("bfloat16 needs ml_dtypes")
    sizes, rows = [8, 32, 32, 5], 70
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((rows, sizes[0])), rng.integers(0, sizes[-1], rows)
    results = {}
    for on in (True, False):
        bk.set_fused_mlp(on)
        model = fb.MLP(sizes, seed=0, backend=bk, compute_dtype="bfloat16")
        assert (bk.fused_mlp_route(model) is None) == on
        Xd, yd = model.prepare_batch(X, y, "cross_entropy")
        stats = bk.zeros((2,), np.float32)
        fake_cupy.stats.reset()
        _, out = fb.Trainer(model, optimizer=fb.optim.SGD(0.1), batch_size=rows)._step(Xd, yd, stats)
        if bk.xp is fake_cupy:
            assert sum(n for k, n in fake_cupy.stats.kernels.items() if k.startswith("mlp_fused_pass<bf16")) == on
        results[on] = [bk.to_numpy(a).astype(np.float64)
                       for a in (stats, model.flat_grad(), out, model.flat_parameters())]
    for name, a, b in zip(("stats", "gradient", "output", "parameters"), results[True], results[False]):
        np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("fused", GPU_PARAMS, indirect=True)
def test_where_the_fused_pass_does_not_apply_the_layers_run_and_it_says_why(fused):
    bk = fused
    assert bk.fused_mlp_route(fb.MLP([4, 8, 3], backend=bk)) is None
    cases = {
        "more than one hidden activation": fb.MLP([4, 8, 8, 3], activation=["relu", "tanh"], backend=bk),
        "fit no block": fb.MLP([4, 2048, 3], backend=bk),  # [W; b] alone is 2049 x 3 + ... rows of 2048
    }
    if "float16" in bk.compute_dtypes:
        cases["float16 compute"] = fb.MLP([4, 8, 3], backend=bk, compute_dtype="float16")
    for why, model in cases.items():
        assert why in bk.fused_mlp_route(model)
        X = np.random.default_rng(0).standard_normal((16, 4))
        Xd, yd = model.prepare_batch(X, np.arange(16) % 3, "cross_entropy")
        assert bk.train_gradients(model, Xd, yd, "cross_entropy") is None
    model = fb.MLP([4, 8, 3], backend=bk)
    Xd, yd = model.prepare_batch(np.ones((6, 4)), np.arange(6) % 3, "cross_entropy")
    assert bk.train_gradients(model, Xd, yd, "mse") is None  # cross-entropy on labels alone
    bk.set_fused_mlp(False)
    assert bk.fused_mlp_route(model).startswith("off")
    assert bk.train_gradients(model, Xd, yd, "cross_entropy") is None


@pytest.mark.parametrize("fused", GPU_PARAMS, indirect=True)
def test_past_48_kib_the_kernel_opts_in_to_more_shared_memory(fused):
    """Widths of 128 in float32 need more shared memory than any block has by default: the backend raises
    the kernel's limit first (the emulated CuPy refuses a launch over it, as CUDA does)."""
    bk = fused
    sizes = [16, 128, 128, 10]
    assert mlp_shared_bytes(sizes, np.float32, 8, False) > SHARED_DEFAULT
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((20, 16)), rng.integers(0, 10, 20)
    on = step_results(bk, sizes, "relu", "float32", X, y, True)
    off = step_results(bk, sizes, "relu", "float32", X, y, False)
    np.testing.assert_allclose(on[1], off[1], rtol=2e-5, atol=2e-6 * np.abs(off[1]).max())
    if bk.xp is fake_cupy:
        kernel = bk._kernel("mlp.cu", "mlp_fused_pass<{T}, {ACT}>", np.float32, act=fb.activations.CODES["relu"])
        assert kernel.max_dynamic_shared_size_bytes >= mlp_shared_bytes(sizes, np.float32, 8, False)
        kernel.max_dynamic_shared_size_bytes = SHARED_DEFAULT
        with pytest.raises(Exception, match="max_dynamic_shared_size_bytes"):
            kernel((1,), (128,), (), shared_mem=SHARED_DEFAULT + 1)
        bk._mlp_shared_set.clear()  # the backend sets it again at its next launch


@pytest.mark.parametrize("fused", GPU_PARAMS, indirect=True)
def test_a_label_outside_the_classes_gives_a_nan_loss(fused):
    """Labels handed over on the device are checked there: a label the kernel cannot index with makes its
    row's loss and delta NaN, which the non-finite guard turns into an error."""
    bk = fused
    model = fb.MLP([4, 8, 3], backend=bk)
    X = bk.asarray(np.ones((5, 4), np.float32))
    y = bk.asarray(np.array([0, 1, 7, 2, 1], np.int64))
    value, _ = bk.train_gradients(model, X, y, "cross_entropy")
    assert np.isnan(bk.to_float(value))
    with pytest.raises(ValueError, match="invalid"):
        fb.Trainer(model, batch_size=5).step(X, y)


@pytest.mark.parametrize("fused", GPU_PARAMS, indirect=True)
@pytest.mark.parametrize("graphs", [False, True])
def test_training_with_the_fused_pass(fused, graphs):
    """A fit with the fused pass ends close to the fit without it; with CUDA graphs too, where its replayed
    steps equal its eager ones bit for bit."""
    bk = fused
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((200, 8)), rng.integers(0, 3, 200)
    runs = {}
    for name, on, cuda_graphs in (("plain", False, False), ("fused", True, False), ("fused+graphs", True, graphs)):
        bk.set_fused_mlp(on)
        model = fb.MLP([8, 16, 16, 3], seed=0, backend=bk)
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=32, cuda_graphs=cuda_graphs)
        history = trainer.fit(X, y, epochs=2, verbose=0)
        runs[name] = (bk.to_numpy(model.flat_parameters()), history.epochs[-1]["loss"], trainer.graph_status)
    np.testing.assert_allclose(runs["fused"][0], runs["plain"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(runs["fused+graphs"][0], runs["fused"][0])
    assert runs["fused+graphs"][1] == runs["fused"][1]
    if graphs:
        assert runs["fused+graphs"][2] == "12 steps replayed from 2 captured graph(s)"


@pytest.mark.emulator
def test_the_command_line_selects_the_fused_pass(tmp_path, capsys):
    """fastbp train --fused-mlp trains through it and says whether the model runs fused; fastbp bench labels
    its rows; both refuse a backend without it."""
    import json

    from conftest import EMULATED, EMULATOR_MISSING

    from fastbp.cli import main

    if EMULATOR_MISSING:
        pytest.skip(f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")
    bk = resolve_backend(EMULATED)
    try:
        fake_cupy.stats.reset()
        assert main(["train", "--backend", EMULATED, "--epochs", "1", "--fused-mlp", "--quiet"]) == 0
        assert "fused mlp: on" in capsys.readouterr().out
        # 1347 training rows at batch 64: 22 steps, each one launch of the fused pass
        assert sum(n for k, n in fake_cupy.stats.kernels.items() if k.startswith("mlp_fused_pass")) == 22
        assert main(["train", "--backend", EMULATED, "--epochs", "1", "--fused-mlp", "--quiet", "--loss", "mse"]) == 0
        assert "fused mlp: not used: the loss is mse" in capsys.readouterr().out
        out = tmp_path / "bench.json"
        assert main(["bench", "--backend", EMULATED, "--sizes", "8,16,4", "--batch", "8", "--reps", "2",
                     "--min-time", "0.0005", "--settle", "0", "--no-peers", "--no-ops", "--fused-mlp",
                     "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["results"]
        assert {r["dtype"] for r in rows if r["backend"] == EMULATED} == {"float32+fused"}
    finally:
        bk.set_fused_mlp(False)
    capsys.readouterr()
    assert main(["train", "--backend", "numpy", "--epochs", "1", "--fused-mlp", "--quiet"]) == 2
    assert "--fused-mlp needs the cupy backend" in capsys.readouterr().err
