"""ONNX export: the graph passes onnx's checker and ONNX Runtime computes what MLP.forward computes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastbp as fb
from fastbp.activations import ACTIVATIONS, unregister
from fastbp.cli import main

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fastbp[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

BUILTIN = [name for name, act in ACTIVATIONS.items() if act.builtin and name != "identity"]
TOL = {"float32": {"rtol": 1e-6, "atol": 1e-6}, "float64": {"rtol": 1e-12, "atol": 1e-13}}


def _run(path, X):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"X": X})))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sizes", [[5, 3], [5, 8, 3], [5, 8, 7, 6, 3]], ids=["no hidden", "1 hidden", "3 hidden"])
@pytest.mark.parametrize("act", BUILTIN)
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_onnx_runtime_computes_forward(tmp_path, act, sizes, dtype, loss):
    rng = np.random.default_rng(0)
    model = fb.MLP(sizes, activation=act, dtype=dtype, seed=3, backend="numpy")
    model.loss_ = loss
    path = tmp_path / "m.onnx"
    proto = model.to_onnx(path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert [o.name for o in proto.graph.output] == (["logits"] if loss == "mse" else ["logits", "probabilities"])
    for rows in (1, 37):  # the batch axis is dynamic
        X = (3 * rng.standard_normal((rows, sizes[0]))).astype(dtype)
        out = _run(path, X)
        assert out["logits"].dtype == np.dtype(dtype)
        np.testing.assert_allclose(out["logits"], model.forward(X), **TOL[dtype])
        if loss != "mse":
            np.testing.assert_allclose(out["probabilities"], model.predict_proba(X), **TOL[dtype])


def test_metadata_carries_what_a_server_needs(tmp_path):
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((40, 4)), np.array(["cat", "dog", "emu", "cat"] * 10)
    model = fb.MLP([4, 6, 3], backend="numpy")
    fb.Trainer(model, batch_size=8).fit(X, y, epochs=1, verbose=0)
    model.preprocess_ = {"mode": "scale", "divisor": 16.0}
    path = tmp_path / "m.onnx"
    model.to_onnx(path, opset=13)
    loaded = onnx.load(str(path))
    meta = {p.key: p.value for p in loaded.metadata_props}
    assert json.loads(meta["classes"]) == ["cat", "dog", "emu"]
    assert json.loads(meta["preprocess"]) == {"mode": "scale", "divisor": 16.0}
    assert json.loads(meta["loss"]) == "cross_entropy" and meta["fastbp_version"] == fb.__version__
    assert loaded.opset_import[0].version == 13 and loaded.ir_version == 7  # loadable by older runtimes
    probabilities = _run(path, X.astype(np.float32))["probabilities"]
    classes = np.array(json.loads(meta["classes"]))
    np.testing.assert_array_equal(classes[probabilities.argmax(axis=1)], model.predict(X))


def test_export_refusals(tmp_path):
    model = fb.MLP([3, 4, 2], backend="numpy")
    model.loss_ = "mse"
    with pytest.raises(ValueError, match="probabilities need a model trained with cross_entropy"):
        model.to_onnx(probabilities=True)
    with pytest.raises(ValueError, match="opset must be an integer"):
        model.to_onnx(opset=12)
    with pytest.raises(ValueError, match="is a folder"):
        model.to_onnx(tmp_path)
    fb.register_activation("cube", lambda xp, z: z ** 3, lambda xp, z, a: 3 * z ** 2)
    try:
        with pytest.raises(ValueError, match="'cube' was registered in Python and has no ONNX form"):
            fb.MLP([3, 4, 2], activation="cube", backend="numpy").to_onnx()
    finally:
        unregister("cube")
    assert not list(tmp_path.iterdir())


def test_cli_export(tmp_path, capsys, monkeypatch):
    model_file, onnx_file = tmp_path / "m.npz", tmp_path / "m.onnx"
    assert main(["train", "--epochs", "2", "--quiet", "--backend", "numpy", "--save", str(model_file)]) == 0
    capsys.readouterr()
    assert main(["export", "--model", str(model_file), "--onnx", str(onnx_file)]) == 0
    assert "outputs logits and probabilities, opset 17" in capsys.readouterr().out
    model = fb.load(model_file)
    X = np.random.default_rng(0).uniform(0, 1, (5, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(onnx_file, X)["probabilities"], model.predict_proba(X), rtol=1e-6, atol=1e-6)
    assert main(["export", "--model", str(model_file), "--onnx", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else object())
    assert main(["export", "--model", str(model_file), "--onnx", str(onnx_file)]) == 2
    assert "pip install 'fastbp[onnx]'" in capsys.readouterr().err
