"""CUDA graphs of the training step (``Trainer(cuda_graphs=True)``, fastbp.graphs) on the emulated CuPy: a
capture there records kernel launches and fastbp's cuBLAS handle's GEMMs, and refuses everything else
(an allocation, a read, a copy, an elementwise op, CuPy's own matmul), so a step that captures is launches
alone; a replay runs them on what the arrays then hold. A fit that replays must end bit for bit where the
same fit without graphs ends. The column-major mapping of fastbp's cuBLAS calls is tested on NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EMULATED, EMULATOR_MISSING

import fastbp as fb
from fastbp.backends._cublas import colmajor_gemm, gemm_args
from fastbp.callbacks import Callback

emulated = pytest.mark.skipif(bool(EMULATOR_MISSING), reason=f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")


# ------------------------------------------------------------------ the cuBLAS handle's argument mapping
@pytest.mark.parametrize("a_layout", ["C", "T"])
@pytest.mark.parametrize("b_layout", ["C", "T"])
@pytest.mark.parametrize("shape", [(5, 3, 4), (1, 6, 2), (7, 1, 3), (4, 5, 1), (64, 128, 10)])
@pytest.mark.parametrize("padded", [False, True])
def test_row_major_products_map_onto_column_major_gemm(a_layout, b_layout, shape, padded):
    """fastbp's cuBLAS call: row-major C = A @ B as the column-major C^T = B^T A^T, for operands that are
    C-contiguous or transposed views (as the training step passes them), rows padded or not, run through
    reference column-major BLAS semantics on the operands' own memory and compared with NumPy's product."""
    m, k, n = shape
    rng = np.random.default_rng(0)

    def operand(rows, cols, layout):
        pad = 3 if padded else 0
        if layout == "C":  # (rows, cols) rows of cols (+ pad) elements
            base = rng.standard_normal((rows, cols + pad))
            return base, base[:, :cols]
        base = rng.standard_normal((cols, rows + pad))  # a transposed view, as A_prev.T or W.T
        return base, base[:, :rows].T

    a_base, A = operand(m, k, a_layout)
    b_base, B = operand(k, n, b_layout)
    c_base = np.zeros((m, n + (2 if padded else 0)))
    C = c_base[:, :n]
    item = 8
    opb, opa, mm, nn, kk, ldb, lda, ldc = gemm_args(A.shape, tuple(s // item for s in A.strides), B.shape,
                                                    tuple(s // item for s in B.strides),
                                                    tuple(s // item for s in C.strides))
    colmajor_gemm(opb, opa, mm, nn, kk, b_base.reshape(-1), ldb, a_base.reshape(-1), lda, c_base.reshape(-1), ldc)
    np.testing.assert_allclose(C, A @ B, rtol=1e-12, atol=1e-12)
    assert not c_base[:, n:].any()  # nothing written into the padding


def test_the_mapping_refuses_operands_without_a_unit_stride():
    with pytest.raises(ValueError, match="unit stride"):
        gemm_args((4, 4), (8, 2), (4, 4), (4, 1), (4, 1))
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm_args((4, 3), (3, 1), (4, 4), (4, 1), (4, 1))


# ------------------------------------------------------------------ fit with graphs against fit without
def data(n=200, features=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


def fit(graphs, make_opt, epochs=3, compute=None, clip=None, callbacks=None, backend=EMULATED, **fit_kw):
    X, y = data()
    model = fb.MLP([8, 16, 16, 3], seed=0, backend=backend, compute_dtype=compute)
    trainer = fb.Trainer(model, optimizer=make_opt(), batch_size=32, clip_norm=clip, cuda_graphs=graphs)
    history = trainer.fit(X, y, epochs=epochs, verbose=0, callbacks=callbacks, **fit_kw)
    return model, trainer, history


def assert_same_fit(a, b):
    (model_a, trainer_a, history_a), (model_b, trainer_b, history_b) = a, b
    bk = model_a.backend
    np.testing.assert_array_equal(bk.to_numpy(model_a.flat_parameters()), bk.to_numpy(model_b.flat_parameters()))
    for slot, arrays in trainer_a.optimizer.state.slots.items():
        for x, z in zip(arrays, trainer_b.optimizer.state.slots[slot]):
            np.testing.assert_array_equal(bk.to_numpy(x), bk.to_numpy(z))
    for row_a, row_b in zip(history_a.epochs, history_b.epochs):
        assert (row_a["loss"], row_a["accuracy"], row_a["lr"]) == (row_b["loss"], row_b["accuracy"], row_b["lr"])
    assert (trainer_a.steps, trainer_a.optimizer.state.step) == (trainer_b.steps, trainer_b.optimizer.state.step)


CASES = {
    "sgd": (lambda: fb.optim.SGD(0.05), None, None),
    # the first step's flag (buf = d) differs from every later step's
    "sgd_momentum_nesterov": (lambda: fb.optim.SGD(0.05, momentum=0.9, nesterov=True), None, None),
    # bias corrections change every step
    "adam": (lambda: fb.optim.Adam(1e-2), None, None),
    # a schedule's learning rate changes every step, weight decay decoupled
    "adamw_scheduled": (lambda: fb.optim.AdamW(fb.optim.LinearWarmup(fb.optim.Cosine(1e-2, 21), 5),
                                               weight_decay=1e-2), None, None),
    "rmsprop_momentum": (lambda: fb.optim.RMSProp(1e-3, momentum=0.5), None, None),
    "sgd_clip": (lambda: fb.optim.SGD(0.05), 0.5, None),
    "bfloat16_adam": (lambda: fb.optim.Adam(1e-2), None, "bfloat16"),
    "float16_loss_scaled_adam": (lambda: fb.optim.Adam(1e-2), None, "float16"),
}


@pytest.mark.emulator
@emulated
@pytest.mark.parametrize("case", list(CASES))
def test_a_fit_with_graphs_replays_its_steps_and_equals_the_fit_without(case):
    """Three epochs of 7 batches (6 of 32 rows, one of 8): each batch size steps eagerly once, is captured,
    then replayed (17 + 2 replays); the parameters, the optimizer state, the epochs' metrics and the step
    counts equal those of the fit without graphs, bit for bit. Adam's bias corrections, a schedule's
    learning rate and SGD's first-step flag are what a replay takes from device memory."""
    from fastbp.testing import fake_cupy

    if CASES[case][2] == "bfloat16" and "bfloat16" not in fb.backends.resolve_backend(EMULATED).compute_dtypes:
        pytest.skip("bfloat16 needs ml_dtypes")
    make_opt, clip, compute = CASES[case]
    eager = fit(False, make_opt, compute=compute, clip=clip)
    launches = fake_cupy.stats.graph_launches
    graphed = fit(True, make_opt, compute=compute, clip=clip)
    assert graphed[1].graph_status == "19 steps replayed from 2 captured graph(s)"
    assert fake_cupy.stats.graph_launches - launches == 19
    assert_same_fit(eager, graphed)
    if compute == "float16":
        assert graphed[1].loss_scale == eager[1].loss_scale


@pytest.mark.gpu
@pytest.mark.skipif("cupy" not in fb.available_backends(), reason="no usable GPU through CuPy")
@pytest.mark.parametrize("case", list(CASES))
def test_a_fit_with_graphs_on_a_gpu_replays_and_ends_where_the_eager_fit_ends(case):
    """On a GPU: the capture succeeds (fastbp's cuBLAS handle, the per-step arguments copied before each
    replay), the same steps are replayed as on the emulator, and the fit ends where the eager one ends, up
    to the GEMMs: the eager fit's go through CuPy's cuBLAS calls, which may pick other kernels."""
    make_opt, clip, compute = CASES[case]
    if compute is not None and compute not in fb.backends.resolve_backend("cupy").compute_dtypes:
        pytest.skip(f"{compute} is not a compute dtype here")
    eager = fit(False, make_opt, compute=compute, clip=clip, backend="cupy")
    graphed = fit(True, make_opt, compute=compute, clip=clip, backend="cupy")
    assert graphed[1].graph_status == "19 steps replayed from 2 captured graph(s)"
    bk = eager[0].backend
    rtol = 1e-4 if compute is None else 5e-2
    np.testing.assert_allclose(bk.to_numpy(graphed[0].flat_parameters()), bk.to_numpy(eager[0].flat_parameters()),
                               rtol=rtol, atol=rtol / 10)
    assert (graphed[1].steps, graphed[1].optimizer.state.step) == (eager[1].steps, eager[1].optimizer.state.step)


@pytest.mark.emulator
@emulated
def test_a_change_the_graph_cannot_follow_captures_a_new_one():
    """A callback that gives SGD momentum after the first epoch (a new slot) and sets clip_norm after the
    second: the graph of the old settings is not replayed; the fit captures again (after one eager step)
    and still equals the fit without graphs."""

    class Change(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1:
                trainer.optimizer.replace(momentum=0.9)
            if epoch == 2:
                trainer.clip_norm = 0.3

    eager = fit(False, lambda: fb.optim.SGD(0.05), callbacks=[Change()])
    graphed = fit(True, lambda: fb.optim.SGD(0.05), callbacks=[Change()])
    assert_same_fit(eager, graphed)
    # epoch 1: 32 rows eager once, captured, 5 replays; 8 rows eager (first seen). Epoch 2 (momentum): 32
    # rows eager (the old graph is not replayed), captured, 5 replays; 8 rows captured, replayed. Epoch 3
    # (clipping): 32 rows eager, captured, 5 replays; 8 rows eager.
    assert (graphed[1]._graphs.captures, graphed[1]._graphs.replays) == (4, 16)


@pytest.mark.emulator
@emulated
def test_a_divergence_in_a_replayed_step_raises_with_its_step_number():
    """SGD at lr 1000 overflows at step 4, a replayed one: the guard records its number from device memory,
    the DivergenceError (read at the epoch's end) names the same step as without graphs, the step counts
    are wound back to it alike, and the parameters are those before it in both."""
    X, y = data()
    ends = []
    for graphs in (False, True):
        model = fb.MLP([8, 16, 16, 3], seed=0, backend=EMULATED)
        trainer = fb.Trainer(model, optimizer=fb.optim.SGD(1e3), batch_size=32, cuda_graphs=graphs)
        with pytest.raises(fb.DivergenceError) as info:
            trainer.fit(X, y, epochs=3, verbose=0)
        ends.append((str(info.value), trainer.steps, trainer.optimizer.state.step,
                     model.backend.to_numpy(model.flat_parameters())))
    assert ends[1][0] == ends[0][0] and "epoch 1, step 4 " in ends[0][0]
    assert ends[0][1:3] == ends[1][1:3] == (3, 3)
    np.testing.assert_array_equal(ends[0][3], ends[1][3])


class _Plain(fb.optim.Optimizer):
    """An optimizer of the user's: a reference update and no fused kernel."""

    slot_names = ()

    def update(self, xp, p, g, slots, lr, step):
        p -= lr * g


@pytest.mark.emulator
@emulated
@pytest.mark.parametrize("why", ["skip", "weights", "optimizer", "activation"])
def test_a_fit_that_cannot_use_graphs_runs_eagerly_and_says_why(why):
    """on_nonfinite='skip' (a host read per step), sample weights, an optimizer without a fused kernel, and a
    user's activation (an elementwise op the capture refuses): the fit runs its steps eagerly, equal to the
    fit without graphs, and graph_status says why."""
    X, y = data()
    kw, fit_kw, opt = {}, {}, (lambda: fb.optim.SGD(0.05))
    activation = "relu"
    if why == "skip":
        kw["on_nonfinite"] = "skip"
    elif why == "weights":
        fit_kw["sample_weight"] = np.linspace(0.5, 1.5, len(X))
    elif why == "optimizer":
        opt = _Plain
    else:
        activation = "graphs_test_softsign"
        if activation not in fb.activations.ACTIVATIONS:
            fb.activations.register(activation, lambda xp, z: z / (1 + xp.abs(z)),
                                    lambda xp, z, a: 1 / (1 + xp.abs(z)) ** 2)
    runs = []
    for graphs in (False, True):
        model = fb.MLP([8, 16, 16, 3], activation=activation, seed=0, backend=EMULATED)
        trainer = fb.Trainer(model, optimizer=opt(), batch_size=32, cuda_graphs=graphs, **kw)
        runs.append((model, trainer, trainer.fit(X, y, epochs=2, verbose=0, **fit_kw)))
    assert_same_fit(*runs)
    status = runs[1][1].graph_status
    expected = {"skip": "on_nonfinite='skip'", "weights": "sample or class weights",
                "optimizer": "_Plain has no fused update kernel", "activation": "could not be captured"}[why]
    assert status.startswith("not used: ") and expected in status, status
    assert runs[1][1]._graphs.replays == 0


def test_other_backends_say_they_have_no_graphs():
    X, y = data()
    model = fb.MLP([8, 16, 3], seed=0, backend="numpy")
    trainer = fb.Trainer(model, batch_size=32, cuda_graphs=True)
    trainer.fit(X, y, epochs=1, verbose=0)
    assert trainer.graph_status == "not used: the numpy backend runs no CUDA graphs (they are the cupy backend's)"
    assert fb.Trainer(model).graph_status.startswith("off")


# ------------------------------------------------------------------ where users see it
@pytest.mark.emulator
@emulated
def test_fastbp_train_cuda_graphs_reports_what_the_graphs_did(capsys):
    from fastbp.cli import main

    assert main(["train", "--backend", EMULATED, "--epochs", "2", "--cuda-graphs", "--quiet"]) == 0
    out = capsys.readouterr().out
    # 1347 training rows at batch 64: 21 full batches and one of 3 rows an epoch, each size eager once
    assert "cuda graphs: 42 steps replayed from 2 captured graph(s)" in out, out  # all of it, if it fails
    assert main(["train", "--backend", "numpy", "--epochs", "1", "--cuda-graphs", "--quiet"]) == 0
    assert "cuda graphs: not used: the numpy backend runs no CUDA graphs" in capsys.readouterr().out


@pytest.mark.emulator
@emulated
def test_fastbp_info_says_whether_graphs_can_be_captured(monkeypatch):
    import fastbp.backends
    from fastbp.envinfo import cuda_graphs, environment, format_environment

    monkeypatch.setattr(fastbp.backends, "available_backends", lambda: ["numpy", EMULATED])
    assert cuda_graphs() == {EMULATED: "available (cuBLAS: cuBLAS (emulated))"}
    env = environment()
    assert f"cuda graphs ({EMULATED}): available" in format_environment(env)
    monkeypatch.setattr(fastbp.backends, "available_backends", lambda: ["numpy"])
    assert "cuda graphs: no GPU backend available" in format_environment(environment())


@pytest.mark.emulator
@emulated
def test_fastbp_bench_times_the_replayed_step_against_the_floor(tmp_path, capsys):
    import json

    from fastbp.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--backend", EMULATED, "--sizes", "8,16,4", "--batch", "8", "--reps", "2", "--min-time",
                 "0.0005", "--settle", "0", "--no-peers", "--no-ops", "--json", str(out)]) == 0
    rows = {(r["backend"], r["name"]): r for r in json.loads(out.read_text())["results"]}
    replay = rows[(EMULATED, "graph:step_adam")]
    assert replay["ratio_to_floor"] > 0 and replay["flops"] == rows[(EMULATED, "step_adam")]["flops"]
    assert "graph:step_adam" in capsys.readouterr().out


@pytest.mark.emulator
@emulated
def test_a_graph_keeps_the_memory_it_uses_alive():
    """A captured graph writes the buffers it captured at every replay: the trainer keeps each device array
    the step's kernels and GEMMs were given (the batch buffers, the parameters, the per-step numbers, the
    model's workspace, the backend's scratch), so that one dropped from its cache mid-fit (evicted
    workspaces and scratch, emptied here after every epoch) is never handed to another array while the
    graph still writes it; the fit still equals the fit without graphs."""

    class Evict(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            trainer.model._workspaces.clear()
            trainer.model.backend._thread_state().scratch.clear()

    eager = fit(False, lambda: fb.optim.Adam(1e-2), callbacks=[Evict()])
    graphed = fit(True, lambda: fb.optim.Adam(1e-2), callbacks=[Evict()])
    assert_same_fit(eager, graphed)
    graphs = graphed[1]._graphs
    (signature, graph, kept), = [entry for key, entry in graphs._graphs.items() if key[2][0] == 32]
    pointers = {a.data.ptr for a in kept}
    model = graphed[0]
    for needed in (model.flat_parameters(), graphs._stats, graphs._at["adam"], graphs._at["step"],
                   model.flat_grad()):
        assert needed.data.ptr in pointers
    assert len(kept) > 20


@pytest.mark.emulator
@emulated
def test_a_full_scratch_cache_does_not_stop_the_capture():
    """A process that has run many fits has a full scratch cache (``Backend._scratch``), oldest entries first.
    An eager step can read an old entry and then drop it to make room for a new one, and the capture that
    follows cannot allocate it again: during a fit with graphs the caches drop nothing
    (``Backend.caches_held``). A full test run showed it: ``fastbp train --cuda-graphs`` now and then fell
    back to eager steps, "an allocation of 320 bytes during stream capture"."""
    X, y = data()
    model = fb.MLP([8, 16, 16, 3], seed=0, backend=EMULATED)
    bk = model.backend
    local = bk._thread_state()
    saved = local.__dict__.pop("scratch", None)
    try:
        prepared = model.prepare_batch(X[:32], y[:32], "cross_entropy")
        fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=32)._step(*prepared)
        keys = list(local.scratch)  # what a step of 32 rows asks for, in order
        assert len(keys) >= 3
        # the step's first miss drops "old 0"; it then reads keys[1], which its next miss (keys[2]) drops
        local.scratch = {}
        bk._scratch("old", (0,), np.float64)
        bk._scratch(*keys[1])
        while len(local.scratch) < 64:
            bk._scratch("old", (len(local.scratch),), np.float64)
        model = fb.MLP([8, 16, 16, 3], seed=0, backend=EMULATED)
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=32, cuda_graphs=True)
        trainer.fit(X, y, epochs=2, verbose=0)
        # 200 rows: 6 batches of 32 and one of 8 an epoch; each size eager once, then captured and replayed
        assert trainer.graph_status == "12 steps replayed from 2 captured graph(s)"
        assert len(local.scratch) > 64  # held during the fit; shrinks back at the next miss
        bk._scratch("new", (1,), np.float64)
        assert len(local.scratch) == 64
    finally:
        local.__dict__.pop("scratch", None)
        if saved is not None:
            local.scratch = saved


@pytest.mark.emulator
@emulated
def test_a_trainer_that_replayed_graphs_pickles_and_captures_anew():
    """Graphs, the stream, the cuBLAS handle and the device buffers are this process's: a pickled trainer
    leaves them behind, and the unpickled one captures its own and trains as the original goes on."""
    import pickle

    X, y = data()
    model, trainer, _ = fit(True, lambda: fb.optim.Adam(1e-2), epochs=1)
    state = trainer._graphs.__getstate__()
    assert state["_graphs"] == {} and state["_stream"] is None and state["_blas"] is None
    again = pickle.loads(pickle.dumps(trainer))
    assert again._graphs.replays == trainer._graphs.replays
    trainer.fit(X, y, epochs=1, verbose=0)
    again.fit(X, y, epochs=1, verbose=0)
    # the original replays the graph its first fit captured (its batch buffers are kept: the 6 full batches
    # replay) and captures the last batch's (seen once already); the copy, whose buffers stayed behind,
    # steps its first full batch eagerly, captures it, and steps the last batch eagerly (seen first)
    assert (trainer._graphs.captures, again._graphs.captures) == (2, 2)
    assert trainer._graphs.replays - again._graphs.replays == 7 - 5
    bk = model.backend
    np.testing.assert_array_equal(bk.to_numpy(again.model.flat_parameters()), bk.to_numpy(model.flat_parameters()))
