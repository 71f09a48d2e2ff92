"""ONNX export: an MLP as an ONNX graph that ONNX Runtime (or any ONNX runtime) serves without fastbp.

The graph computes what ``MLP.forward`` computes: per layer a ``Gemm`` (X W + b), then the layer's
activation, written with standard operators as fastbp computes it (leaky_relu as max(z, 0.01 z), gelu in
its tanh form, silu as z * sigmoid(z)). Its input ``X`` is (batch, n_in) with a dynamic batch axis; its
outputs are ``logits`` and, for a classifier, ``probabilities`` (the softmax of each row for
cross_entropy, each output's sigmoid for binary_cross_entropy). The model's facts travel as metadata:
the fastbp version, the loss, the classes (JSON) and the input preprocessing of a model trained by the
command line (JSON), so a server can map outputs to labels and prepare inputs alike.

Needs the ``onnx`` package (``pip install 'fastbp[onnx]'``); ``onnxruntime`` runs the result.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .activations import _GELU_K, ACTIVATIONS, LEAKY_SLOPE

#: The opset written by default: 17 (ONNX 1.12, 2022) runs on every maintained ONNX Runtime.
DEFAULT_OPSET = 17
MIN_OPSET = 13  # Softmax over one axis, as used here, has these semantics from opset 13


def to_onnx(model: Any, path: Any = None, opset: int = DEFAULT_OPSET, probabilities: bool | None = None) -> Any:
    """The model as an ``onnx.ModelProto``, also written to ``path`` when given.

    Args:
        model: a ``fastbp.MLP``.
        path: where to write the .onnx file (None: only return the model).
        opset: the ONNX opset version to target (>= 13).
        probabilities: add the ``probabilities`` output: softmax rows for cross_entropy, sigmoids for
            binary_cross_entropy. None: when the model was trained with one of those (``model.loss_``).
    Raises:
        ImportError: onnx is not installed.
        ValueError: an activation has no ONNX form (a user-registered one), or probabilities were asked of a
            model without a classification loss.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx package ({exc}): pip install 'fastbp[onnx]'") from exc
    from . import __version__

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {newest}] (this onnx's newest), got {opset!r}")
    loss = model.loss_
    if probabilities is None:
        probabilities = loss in ("cross_entropy", "binary_cross_entropy")
    elif probabilities and loss not in ("cross_entropy", "binary_cross_entropy"):
        raise ValueError(f"probabilities need a model trained with cross_entropy or binary_cross_entropy; this "
                         f"one's loss is {loss!r} (train it with a Trainer, or set model.loss_)")
    for act in model.activations:
        if not ACTIVATIONS[act].builtin:
            raise ValueError(f"activation {act!r} was registered in Python and has no ONNX form; only the "
                             f"built-in activations can be exported")
    dtype = np.dtype(model.dtype)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    graph = _Graph(helper, numpy_helper, dtype)
    a = "X"
    weights = model.get_weights()
    for i, act in enumerate(model.activations):
        W, b = weights[2 * i], weights[2 * i + 1]
        z = graph.node("Gemm", [a, graph.const(f"W{i}", W), graph.const(f"b{i}", b)], f"z{i}")
        a = graph.activation(act, z, i)
    graph.rename(a, "logits")
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch", model.sizes[-1]])]
    if probabilities:
        op = ("Softmax", {"axis": 1}) if loss == "cross_entropy" else ("Sigmoid", {})
        graph.node(op[0], ["logits"], "probabilities", **op[1])
        outputs.append(helper.make_tensor_value_info("probabilities", elem, ["batch", model.sizes[-1]]))
    inputs = [helper.make_tensor_value_info("X", elem, ["batch", model.sizes[0]])]
    onnx_graph = helper.make_graph(graph.nodes, "fastbp_mlp", inputs, outputs, graph.initializers)
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="fastbp", producer_version=__version__)
    proto.ir_version = min(proto.ir_version, _IR_FOR_OPSET.get(opset, proto.ir_version))
    meta = {"fastbp_version": __version__, "sizes": json.dumps(model.sizes),
            "activations": json.dumps(model.activations), "loss": json.dumps(loss)}
    if model.classes_ is not None:
        meta["classes"] = json.dumps(np.asarray(model.classes_).tolist())
    if model.preprocess_ is not None:
        meta["preprocess"] = json.dumps(model.preprocess_)
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        from .io import write_atomic

        data = proto.SerializeToString()
        write_atomic(path, lambda f: f.write(data), ".onnx")
    return proto


#: The newest IR version each opset's ONNX release wrote, so that older runtimes can load the file.
_IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self, helper: Any, numpy_helper: Any, dtype: np.dtype) -> None:
        self.helper, self.numpy_helper, self.dtype = helper, numpy_helper, dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._scalars: dict[float, str] = {}

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=f"{op}_{len(self.nodes)}", **attrs))
        return output

    def const(self, name: str, value: Any) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value, self.dtype), name))
        return name

    def scalar(self, value: float) -> str:
        name = self._scalars.get(value)
        if name is None:
            name = self._scalars[value] = self.const(f"c{len(self._scalars)}", np.asarray(value, self.dtype))
        return name

    def rename(self, old: str, new: str) -> None:
        """Make the node that writes ``old`` write ``new`` instead (the graph's named output)."""
        for n in self.nodes:
            if n.output[0] == old:
                n.output[0] = new

    def sigmoid(self, z: str, out: str) -> str:
        """1 / (1 + exp(-z)) as fastbp computes it (ONNX Runtime's Sigmoid approximates: float32 results
        differed by up to 3e-6 after three silu layers)."""
        e = self.node("Exp", [self.node("Neg", [z], f"{out}_neg")], f"{out}_exp")
        return self.node("Reciprocal", [self.node("Add", [e, self.scalar(1.0)], f"{out}_den")], out)

    def activation(self, act: str, z: str, i: int) -> str:
        """Nodes computing ``act`` of ``z`` as fastbp computes it; returns the output's name."""
        out = f"a{i}"
        if act == "identity":
            return z
        if act == "relu":
            return self.node("Relu", [z], out)
        if act == "leaky_relu":  # max(z, 0.01 z) as fastbp computes it (LeakyRelu's alpha is a float32)
            return self.node("Max", [z, self.node("Mul", [z, self.scalar(LEAKY_SLOPE)], f"l{i}")], out)
        if act == "sigmoid":
            return self.sigmoid(z, out)
        if act == "tanh":
            return self.node("Tanh", [z], out)
        if act == "silu":
            return self.node("Mul", [z, self.sigmoid(z, f"s{i}")], out)
        if act == "gelu":
            # 0.5 z (1 + tanh(c z (1 + k z^2))), in the order of fastbp.activations._gelu_f
            zz = self.node("Mul", [z, z], f"g{i}_zz")
            u = self.node("Mul", [zz, self.scalar(_GELU_K)], f"g{i}_kzz")
            u = self.node("Add", [u, self.scalar(1.0)], f"g{i}_1kzz")
            u = self.node("Mul", [u, z], f"g{i}_u")
            u = self.node("Mul", [u, self.scalar(math.sqrt(2.0 / math.pi))], f"g{i}_cu")
            t = self.node("Tanh", [u], f"g{i}_t")
            t = self.node("Add", [t, self.scalar(1.0)], f"g{i}_1t")
            t = self.node("Mul", [t, self.scalar(0.5)], f"g{i}_h")
            return self.node("Mul", [z, t], out)
        raise ValueError(f"activation {act!r} has no ONNX form")
