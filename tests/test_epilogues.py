"""cuBLASLt's fused epilogues (``backend.set_epilogues('cublaslt')``) against fastbp's kernels, on the cupy
backend: on a GPU (marked gpu: cuBLASLt itself, through ctypes) and on the emulated CuPy (its reference
stand-in, ``fake_cupy.fastbp_cublaslt``: these check the wiring, which layer runs which epilogue on which
buffers, and that the results are those of the kernels within the dtype's rounding)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GPU_PARAMS

import fastbp as fb
from fastbp.backends import resolve_backend

#: per compute dtype: (rtol, atol as a fraction of the largest value) between the two paths: a few roundings
#: apart (cuBLASLt rounds once after the epilogue, the kernels after the GEMM and again after it), each
#: layer's carried to the next (bfloat16 keeps 8 bits, float16 11)
TOL = {None: (2e-5, 2e-6), "bfloat16": (4e-2, 1.6e-2), "float16": (5e-3, 2e-3)}


@pytest.fixture
def epilogues(request):
    """The backend with cuBLASLt epilogues on for the test, set back to the kernels after it."""
    bk = resolve_backend(request.param)
    try:
        bk.set_epilogues("cublaslt")
    except Exception as exc:  # a GPU whose cuBLASLt cannot be called: the check says why
        pytest.fail(f"cuBLASLt epilogues cannot be used here: {exc}")
    yield bk
    bk.set_epilogues("kernels")


def grads(bk, sizes, activation, compute, mode, X, y):
    bk.set_epilogues(mode)
    model = fb.MLP(sizes, activation=activation, seed=0, backend=bk, compute_dtype=compute)
    Xd, yd = model.prepare_batch(X, y, "cross_entropy")
    loss, grads, _ = model._loss_and_grads(Xd, yd, "cross_entropy")
    out = model.forward(Xd)
    return float(bk.to_numpy(loss)), bk.to_numpy(model.flat_grad()).astype(np.float64), bk.to_numpy(out)


@pytest.mark.parametrize("epilogues", GPU_PARAMS, indirect=True)
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("compute", [None, "bfloat16", "float16"])
def test_the_epilogue_path_computes_what_the_kernels_compute(epilogues, activation, compute):
    """One batch's loss, gradient (every layer's dW and db) and output through cuBLASLt's epilogues equal
    the kernels' within the dtype's rounding; relu and gelu layers and the output layer run fused, tanh's
    through the kernels."""
    bk = epilogues
    if compute is not None and compute not in bk.compute_dtypes:
        pytest.skip(f"{compute} is not a compute dtype here")
    rng = np.random.default_rng(3)
    sizes = [24, 32, 40, 5]  # widths: gelu's auxiliary output needs multiples of 8
    X, y = rng.standard_normal((48, sizes[0])), rng.integers(0, sizes[-1], 48)
    lt = bk._cublaslt()
    before = dict(lt.calls) if hasattr(lt, "calls") else None
    fused = grads(bk, sizes, activation, compute, "cublaslt", X, y)
    used = None if before is None else {k: v - before.get(k, 0) for k, v in lt.calls.items() if v > before.get(k, 0)}
    plain = grads(bk, sizes, activation, compute, "kernels", X, y)
    rtol, atol = TOL[compute]
    assert fused[0] == pytest.approx(plain[0], rel=rtol, abs=atol)
    scale = np.abs(plain[1]).max()
    np.testing.assert_allclose(fused[1], plain[1], rtol=rtol, atol=atol * max(scale, 1))
    out = plain[2].astype(np.float64)
    np.testing.assert_allclose(fused[2].astype(np.float64), out, rtol=rtol, atol=atol * max(np.abs(out).max(), 1))
    if used is not None:
        # the emulated stand-in counts what ran: two forwards (the step's, then forward's) of two hidden layers
        # and the output layer, and one backward: each hidden layer's delta, the output layer's dW and db
        hidden = {"relu": {"relu_aux_bias": 4, "drelu_bgrad": 2}, "gelu": {"gelu_aux_bias": 4, "dgelu_bgrad": 2},
                  "tanh": {}}[activation]
        assert used == {"bias": 2, "bgrada": 1, **hidden}, used


@pytest.mark.parametrize("epilogues", GPU_PARAMS, indirect=True)
def test_a_gelu_layer_of_another_width_keeps_the_kernels(epilogues):
    """cuBLASLt wants the GELU input's leading dimension a multiple of 8: a 12-wide gelu layer runs through
    the kernels and still trains as they do."""
    bk = epilogues
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((16, 6)), rng.integers(0, 3, 16)
    assert not bk._fused_epilogue("gelu", np.float32, 12) and bk._fused_epilogue("gelu", np.float32, 16)
    fused = grads(bk, [6, 12, 3], "gelu", None, "cublaslt", X, y)
    plain = grads(bk, [6, 12, 3], "gelu", None, "kernels", X, y)
    np.testing.assert_allclose(fused[1], plain[1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("epilogues", GPU_PARAMS, indirect=True)
def test_training_with_epilogues_and_graphs_together(epilogues):
    """A fit with cuBLASLt epilogues captures and replays as a graph (the epilogue GEMMs on the fit's stream,
    recorded as launches on the emulator), equal bit for bit to the same fit without graphs, and close to
    the kernels' fit."""
    bk = epilogues
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((160, 8)), rng.integers(0, 3, 160)
    runs = {}
    for name, mode, graphs in (("lt", "cublaslt", False), ("lt+graphs", "cublaslt", True),
                               ("kernels", "kernels", False)):
        bk.set_epilogues(mode)
        model = fb.MLP([8, 16, 16, 3], seed=0, backend=bk)
        trainer = fb.Trainer(model, optimizer=fb.optim.SGD(0.05, momentum=0.9), batch_size=32, cuda_graphs=graphs)
        trainer.fit(X, y, epochs=2, verbose=0)
        runs[name] = (bk.to_numpy(model.flat_parameters()), trainer.graph_status)
    assert runs["lt+graphs"][1] == "9 steps replayed from 1 captured graph(s)"  # 10 steps, the first eager
    np.testing.assert_array_equal(runs["lt+graphs"][0], runs["lt"][0])
    np.testing.assert_allclose(runs["lt"][0], runs["kernels"][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("epilogues", GPU_PARAMS, indirect=True)
def test_relu_masks_drop_the_oldest_past_256_except_while_held(epilogues):
    """The ReLU bit-masks, one per layer output buffer, drop the oldest past 256 (buffers long gone), but not
    inside ``caches_held`` (a graph capture cannot make a mask again); after it, the next new mask drops
    the excess."""
    bk = epilogues
    bk._relu_masks.clear()
    outputs = [bk.empty((4, 8), np.float32) for _ in range(300)]  # kept alive: distinct pointers
    for A in outputs[:256]:
        bk._relu_mask(A, create=True)
    bk._relu_mask(outputs[256], create=True)
    assert len(bk._relu_masks) == 256 and bk._relu_mask(outputs[0], create=False) is None
    with bk.caches_held():
        for A in outputs[257:299]:
            bk._relu_mask(A, create=True)
        assert len(bk._relu_masks) == 256 + 42 and bk._relu_mask(outputs[1], create=False) is not None
    bk._relu_mask(outputs[299], create=True)
    assert len(bk._relu_masks) == 256 and bk._relu_mask(outputs[299], create=False) is not None
    bk._relu_masks.clear()


@pytest.mark.parametrize("backend", GPU_PARAMS)
def test_set_epilogues_checks_its_argument(backend):
    bk = resolve_backend(backend)
    with pytest.raises(ValueError, match="'kernels' or 'cublaslt'"):
        bk.set_epilogues("fused")
    assert bk.epilogues == "kernels"


@pytest.mark.emulator
def test_the_command_line_selects_the_epilogues(tmp_path, capsys):
    """fastbp train --epilogues cublaslt trains through them (and says so); fastbp bench labels its rows;
    both refuse a backend without them."""
    import json

    from conftest import EMULATED, EMULATOR_MISSING

    from fastbp.cli import main

    if EMULATOR_MISSING:
        pytest.skip(f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")
    bk = resolve_backend(EMULATED)
    lt = bk._cublaslt()
    before = lt.calls.get("relu_aux_bias", 0)
    try:
        assert main(["train", "--backend", EMULATED, "--epochs", "1", "--epilogues", "cublaslt", "--quiet"]) == 0
        assert "epilogues: cublaslt" in capsys.readouterr().out
        assert lt.calls["relu_aux_bias"] > before
        out = tmp_path / "bench.json"
        assert main(["bench", "--backend", EMULATED, "--sizes", "8,16,4", "--batch", "8", "--reps", "2",
                     "--min-time", "0.0005", "--settle", "0", "--no-peers", "--no-ops", "--epilogues", "cublaslt",
                     "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["results"]
        assert {r["dtype"] for r in rows if r["backend"] == EMULATED} == {"float32+cublaslt"}
    finally:
        bk.set_epilogues("kernels")
    assert main(["train", "--backend", "numpy", "--epochs", "1", "--epilogues", "cublaslt", "--quiet"]) == 2
    assert "needs the cupy backend" in capsys.readouterr().err


@pytest.mark.emulator
@pytest.mark.parametrize("refused", ["relu_aux_bias", "drelu_bgrad", "bgrada", "bias"])
def test_an_epilogue_cublaslt_refuses_runs_through_the_kernels(refused):
    """Where cuBLASLt has no algorithm for a product (the stand-in refuses one epilogue here), that layer's
    step runs through the GEMM and the kernels, into the same buffers: a refused forward leaves no bit-mask
    behind, so its backward runs through the kernels too, and the gradients stay the kernels' own."""
    from conftest import EMULATED, EMULATOR_MISSING

    if EMULATOR_MISSING:
        pytest.skip(f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")
    bk = resolve_backend(EMULATED)
    lt = bk._cublaslt()
    rng = np.random.default_rng(6)
    X, y = rng.standard_normal((32, 8)), rng.integers(0, 3, 32)
    lt.refuse = {refused}
    try:
        before = dict(lt.calls)
        fused = grads(bk, [8, 16, 16, 3], "relu", None, "cublaslt", X, y)
        ran = {k for k, v in lt.calls.items() if v > before.get(k, 0)}
    finally:
        lt.refuse = set()
        bk.set_epilogues("kernels")
    plain = grads(bk, [8, 16, 16, 3], "relu", None, "kernels", X, y)
    np.testing.assert_allclose(fused[1], plain[1], rtol=2e-5, atol=2e-6)
    assert refused not in ran
    if refused == "relu_aux_bias":
        assert "drelu_bgrad" not in ran  # no mask was written, so none is read
