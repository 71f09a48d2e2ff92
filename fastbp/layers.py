"""Dense layers and the MLP that stacks them. Layers hold arrays of their backend and call its ops;
they never do array math of their own."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._checks import check_choice, check_feature_shape, check_features, check_positive_int, check_seed, to_host
from .activations import ACTIVATIONS
from .backends import Backend, resolve_backend
from .backends.base import invalid_batch_message
from .dtypes import HALF_DTYPES, resolve_compute_dtype, resolve_dtype
from .init import INITIALIZERS, initialize
from .io import FORMAT, VERSION, read_npz, write_npz_atomic
from .losses import check_loss, check_sample_weight, is_identity, prepare_targets, target_shape

_MAX_WORKSPACES = 4  # batch sizes whose buffers are kept: the batch, the last partial batch, eval sizes
#: Bytes of one layer's activations per forward pass at inference: bigger inputs go through in chunks of
#: rows, to bound the memory (a chunk is never below _MIN_CHUNK rows).
_INFER_BYTES = 256 * 2**20
_MIN_CHUNK = 1024


class Dense:
    """One fully connected layer: Z = X W + b, A = g(Z).

    Attributes:
        W: weights (n_in, n_out) on the model's backend.
        b: bias (n_out,).
        activation: the activation's name.
    """

    def __init__(self, W: Any, b: Any, activation: str) -> None:
        activation = check_choice(activation, ACTIVATIONS, "activation")
        if W.ndim != 2 or b.shape != (W.shape[1],):
            raise ValueError(f"Dense needs W (n_in, n_out) and b (n_out,), got {W.shape} and {b.shape}")
        self.W = W
        self.b = b
        self.activation = activation

    @property
    def n_in(self) -> int:
        return int(self.W.shape[0])

    @property
    def n_out(self) -> int:
        return int(self.W.shape[1])

    def __repr__(self) -> str:
        return f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r})"


class _Workspace:
    """Buffers of one batch size, reused across steps: Z (or A written over Z), separate A where g'
    needs Z, and delta. (Scratch space inside an op is the backend's own, ``Backend._scratch``.)"""

    def __init__(self, backend: Backend, layers: list[Dense], batch: int, dtype: np.dtype) -> None:
        self.Z: list[Any] = []
        self.A: list[Any] = []  # None where A is written over Z
        self.delta: list[Any] = []
        for layer in layers:
            shape = (batch, layer.n_out)
            self.Z.append(backend.empty(shape, dtype))
            act = ACTIVATIONS[layer.activation]
            self.A.append(backend.empty(shape, dtype) if act.keeps == "preactivation" else None)
            self.delta.append(backend.empty(shape, dtype))


class _Trace:
    """What one training forward pass keeps: the workspace, a = [X, A_1, ..., A_L] (each layer's input,
    then the output) and each layer's Z (the same array as its A where g' reads A)."""

    __slots__ = ("ws", "a", "Z")

    def __init__(self, ws: _Workspace, X: Any) -> None:
        self.ws = ws
        self.a: list[Any] = [X]
        self.Z: list[Any] = []


class MLP:
    """A multilayer perceptron: Dense layers with one hidden activation, an identity output layer.

    Args:
        sizes: layer widths, input first and output last, e.g. [64, 128, 64, 10].
        activation: the hidden layers' activation, or one name per hidden layer.
        dtype: 'float32' or 'float64'.
        seed: seed of the numpy Generator the weights are drawn from (on the host).
        init: 'auto' (He for relu-like activations, Glorot otherwise) or one of
            'he_normal', 'he_uniform', 'glorot_normal', 'glorot_uniform'.
        backend: a backend name, 'auto', a Backend, or None for the active one.
        compute_dtype: None (compute in ``dtype``), or 'bfloat16' / 'float16' for mixed precision on the
            cupy backend: the GEMMs, activations and gradients in 16 bits (GEMMs accumulate in float32),
            the weights and the optimizer's state in float32 (``layers[i].W`` are these master weights),
            updated in float32 from the 16-bit gradients, which also rounds them into the 16-bit copy the
            next step computes with.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Sequence[str] = "relu",
        dtype: Any = "float32",
        seed: int | None = 0,
        init: str = "auto",
        backend: str | Backend | None = None,
        compute_dtype: Any = None,
    ) -> None:
        sizes = _check_sizes(sizes)
        hidden = len(sizes) - 2
        if isinstance(activation, str):
            activations = [activation] * hidden
        else:
            activations = list(activation)
            if len(activations) != hidden:
                raise ValueError(
                    f"activation must be one name or one per hidden layer ({hidden}), got {len(activations)}"
                )
        activations = [check_choice(act, ACTIVATIONS, "activation") for act in activations]
        activations.append("identity")
        if init != "auto":
            init = check_choice(init, INITIALIZERS, "init")
        check_seed(seed)
        self.dtype = resolve_dtype(dtype)
        self.backend = resolve_backend(backend)
        self.compute_dtype = resolve_compute_dtype(compute_dtype, self.dtype, self.backend)
        rng = np.random.default_rng(seed)
        weights = []
        for n_in, n_out, act in zip(sizes[:-1], sizes[1:], activations):
            name = init if init != "auto" else f"{ACTIVATIONS[act].init}_normal"
            weights.append((initialize(name, n_in, n_out, rng), np.zeros(n_out), act))
        self._set_layers(weights)

    # ------------------------------------------------------------------ construction helpers
    def _set_layers(self, weights: list[tuple[np.ndarray, np.ndarray, str]]) -> None:
        """Lay the parameters out as views of one flat buffer, W1, b1, W2, b2, ... in order, so an
        optimizer step is one op over one vector (and the gradients likewise)."""
        bk = self.backend
        host = np.concatenate([np.asarray(a, dtype=self.dtype).ravel() for W, b, _ in weights for a in (W, b)])
        self._flat = bk.asarray(host, self.dtype)  # host is a fresh array: no caller memory is aliased
        shapes = [np.shape(a) for W, b, _ in weights for a in (W, b)]
        views = _views(self._flat, shapes)
        self.layers = [Dense(views[2 * i], views[2 * i + 1], act) for i, (_, _, act) in enumerate(weights)]
        self._lay_out_compute()
        #: Held by a Trainer while it trains this model: one thread at a time (a second gets an error).
        self.lock: threading.Lock = getattr(self, "lock", None) or threading.Lock()
        self.classes_ = getattr(self, "_classes", None)
        #: The loss the model was trained with (set by the Trainer, saved with the model): how ``predict``
        #: and ``predict_proba`` read the outputs.
        self.loss_: str | None = getattr(self, "loss_", None)
        #: How inputs were transformed before training, when the command line trained the model (saved with
        #: it, so that ``fastbp predict`` transforms new data alike); None for models trained in Python.
        self.preprocess_: dict[str, Any] | None = getattr(self, "preprocess_", None)

    @classmethod
    def from_weights(
        cls, weights: Sequence[tuple[Any, Any, str]], dtype: Any = None, backend: str | Backend | None = None
    ) -> MLP:
        """An MLP from (W, b, activation) per layer, arrays of any backend; the last activation must be
        'identity'."""
        if not weights:
            raise ValueError("weights must hold at least one (W, b, activation) layer")
        host = [(np.asarray(to_host(W)), np.asarray(to_host(b)), act) for W, b, act in weights]
        if host[-1][2] != "identity":
            raise ValueError(f"the output layer's activation must be 'identity', got {host[-1][2]!r}")
        for (W, _, _), (W_next, _, _) in zip(host[:-1], host[1:]):
            if W.ndim != 2 or W_next.ndim != 2 or W.shape[1] != W_next.shape[0]:
                raise ValueError(f"layer shapes do not chain: {W.shape} then {W_next.shape}")
        model = cls.__new__(cls)
        model.dtype = resolve_dtype(dtype if dtype is not None else host[0][0].dtype)
        model.compute_dtype = model.dtype
        model.backend = resolve_backend(backend)
        model._set_layers(host)
        return model

    def __getstate__(self) -> dict[str, Any]:
        # The layers' arrays are views of one flat buffer, which pickle would copy apart: keep the weights
        # as host arrays and lay them out anew on unpickling. Locks, workspaces and gradients are not kept.
        skip = ("lock", "layers", "_flat", "_workspaces", "_flat_grad", "_grads", "_grad_block", "_flat_compute",
                "_compute_params", "_reduce_block")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        state["_weights"] = [(self.backend.to_numpy(layer.W), self.backend.to_numpy(layer.b), layer.activation)
                             for layer in self.layers]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        weights = state.pop("_weights")
        state.setdefault("compute_dtype", state["dtype"])  # pickled before mixed precision existed
        self.__dict__.update(state)
        self._set_layers(weights)

    # ------------------------------------------------------------------ introspection
    @property
    def classes_(self) -> np.ndarray | None:
        """The class labels, in output order, of a model trained with cross_entropy on labels (set by the
        Trainer from the training labels, see ``fastbp.losses.learn_classes``; saved with the model).
        ``predict`` answers in these labels. None: the labels are the output indices."""
        return self._classes

    @classes_.setter
    def classes_(self, classes: np.ndarray | None) -> None:
        self._classes = classes
        # whether labels must be encoded (classes other than 0..n-1), decided once, not at every batch
        self._encoded = classes is not None and not is_identity(classes)

    def _lay_out_compute(self) -> None:
        """What the model computes with, anew: the weights the GEMMs read (the master weights, or in mixed
        precision their 16-bit copy, laid out alike and rewritten by every update: Optimizer.step's
        copies), and the buffers in the compute dtype (workspaces, gradients), made on first use."""
        self._flat_compute = self._flat if not self.mixed else self._flat.astype(self.compute_dtype)
        compute = _views(self._flat_compute, [p.shape for p in self.parameters()])
        self._compute_params = [(compute[2 * i], compute[2 * i + 1]) for i in range(len(self.layers))]
        self._workspaces: OrderedDict[int, _Workspace] = OrderedDict()
        self._flat_grad: Any = None
        self._grads: list[Any] | None = None
        self._grad_block: Any = None  # flat_grad() and the slots after it (reduction_buffer)
        self._reduce_block: Any = None  # mixed precision's float32 reduction buffer (reduction_buffer)

    @property
    def mixed(self) -> bool:
        """Whether the model computes in 16 bits over float32 master weights (``compute_dtype``)."""
        return self.compute_dtype != self.dtype

    def _sync_compute(self) -> None:
        """Round the master weights into the compute copy again (after they were written other than by an
        optimizer step, which writes both)."""
        if self.mixed:
            self._flat_compute[...] = self._flat.astype(self.compute_dtype)

    @property
    def sizes(self) -> list[int]:
        return [self.layers[0].n_in] + [layer.n_out for layer in self.layers]

    @property
    def activations(self) -> list[str]:
        return [layer.activation for layer in self.layers]

    @property
    def n_params(self) -> int:
        return sum(layer.n_in * layer.n_out + layer.n_out for layer in self.layers)

    def parameters(self) -> list[Any]:
        """[W1, b1, W2, b2, ...] on the model's backend (the live arrays, updated in place)."""
        return [p for layer in self.layers for p in (layer.W, layer.b)]

    def get_weights(self) -> list[np.ndarray]:
        """Copies of the parameters as host numpy arrays, in ``parameters()`` order."""
        return [np.array(self.backend.to_numpy(p), copy=True) for p in self.parameters()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Overwrite the parameters (in place) from arrays of the same shapes, in ``parameters()`` order."""
        params = self.parameters()
        if len(weights) != len(params):
            raise ValueError(f"weights must hold {len(params)} arrays, got {len(weights)}")
        host = [np.asarray(to_host(w)) for w in weights]
        for i, (w, p) in enumerate(zip(host, params)):
            if w.shape != p.shape:
                raise ValueError(f"weights[{i}] must have shape {p.shape}, got {w.shape}")
            if not np.isfinite(w).all():
                raise ValueError(f"weights[{i}] contains NaN or infinite values")
        for w, p in zip(host, params):
            p[...] = self.backend.asarray(w.astype(self.dtype))
        self._sync_compute()

    def __repr__(self) -> str:
        mixed = f", compute_dtype='{self.compute_dtype.name}'" if self.mixed else ""
        return (f"MLP(sizes={self.sizes}, activations={self.activations[:-1]}, dtype='{self.dtype.name}'{mixed}, "
                f"backend='{self.backend.name}')")

    # ------------------------------------------------------------------ forward and gradients
    def forward(self, X: Any) -> Any:
        """The network's output (logits for classification) as an array of the model's backend."""
        X = self._device_input(X)
        with self.backend.device_scope():
            chunk = self._infer_chunk()
            outputs = [self._forward_rows(X[i:i + chunk]) for i in range(0, X.shape[0], chunk)]
            out = outputs[0] if len(outputs) == 1 else self.backend.xp.concatenate(outputs)
            return out.astype(self.dtype) if self.mixed else out

    def _infer_chunk(self) -> int:
        """Rows per forward pass at inference: as many as keep the widest layer's activations within
        _INFER_BYTES (a narrow network takes a big batch in one pass: each chunk costs a launch per layer
        on a GPU)."""
        row_bytes = max(self.sizes) * np.dtype(self.compute_dtype).itemsize
        return max(_MIN_CHUNK, _INFER_BYTES // row_bytes)

    def __call__(self, X: Any) -> Any:
        """``forward(X)``: the outputs (logits), an array of the model's backend."""
        return self.forward(X)

    def predict(self, X: Any) -> np.ndarray:
        """Predictions as a host array, read from the outputs by the loss the model was trained with
        (``loss_``): class labels for cross_entropy (in the training labels' values, ``classes_``), 0/1 per
        output for binary_cross_entropy, the outputs themselves for mse."""
        loss = self._trained_loss("predict")
        bk = self.backend
        with bk.device_scope():
            out = self.forward(X)
            if loss == "cross_entropy":
                index = bk.to_numpy(bk.xp.argmax(out, axis=1))
                return index if self.classes_ is None else self.classes_[index]
            if loss == "binary_cross_entropy":
                return bk.to_numpy(out > 0).astype(np.int64)
            return np.asarray(bk.to_numpy(out))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities as a host array: the softmax of each row for cross_entropy (columns in
        ``classes_`` order), each output's sigmoid for binary_cross_entropy."""
        loss = self._trained_loss("predict_proba")
        if loss == "mse":
            raise ValueError("predict_proba needs a classifier: this model was trained with mse (use predict)")
        out = np.asarray(self.backend.to_numpy(self.forward(X)), np.float64)
        if loss == "binary_cross_entropy":
            e = np.exp(-np.abs(out))
            return np.where(out >= 0, 1 / (1 + e), e / (1 + e)).astype(self.dtype)
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(self.dtype)

    def _trained_loss(self, what: str) -> str:
        if self.loss_ is None:
            raise ValueError(f"{what} reads the outputs by the loss the model is trained with, and this model "
                             f"has none yet: train it with a Trainer (or set model.loss_), or use forward(X) "
                             f"for the outputs")
        return self.loss_

    def _forward_rows(self, X: Any) -> Any:
        A = self.backend.forward_rows(self, X)
        if A is not None:
            return A
        A = X
        for layer, (W, b) in zip(self.layers, self._compute_params):
            A, _ = self.backend.dense_forward(A, W, b, layer.activation)
        return A

    def loss_and_grads(self, X: Any, y: Any, loss: str = "cross_entropy",
                       sample_weight: Any = None) -> tuple[float, list[Any]]:
        """The mean loss on (X, y) and its gradients, in ``parameters()`` order (fresh arrays).
        ``sample_weight``: a weight per row (see ``Backend.output_delta``)."""
        loss = check_loss(loss)
        Xd, yd = self.prepare_batch(X, y, loss)
        wd = self.prepare_weights(sample_weight, Xd.shape[0])
        with self.backend.device_scope():
            value, grads, _ = self._loss_and_grads(Xd, yd, loss, weights=wd)
            return self.backend.to_float(value), [g.astype(self.dtype) for g in grads]  # fresh arrays

    def prepare_batch(self, X: Any, y: Any, loss: str, guard: Any = None, step: int = 0) -> tuple[Any, Any]:
        """Check (X, y) for this model and ``loss``; return them as arrays of the model's backend.

        Arrays that live on the model's device (CuPy arrays on the cupy backend) are checked there and never
        copied to the host and back: their shapes and dtypes at once, their values by
        ``Backend.check_batch``, whose verdict is read at once (a ValueError), or, when ``guard`` is given,
        joins that guard as step ``step`` (the Trainer reads it with the step's loss, one transfer).
        """
        bk = self.backend
        X, y = bk.adopt(X), bk.adopt(y)
        n_in, n_out = self.layers[0].n_in, self.layers[-1].n_out
        encoded = self._encoded
        if self._ready(X, y, loss, n_in, n_out):
            # arrays of this (CPU) backend in the form the ops take: one pass counts the invalid values, and
            # only a batch that has some takes the full checks below, for their detailed message
            if not bk.count_invalid(X, y, loss, n_out):
                return X, y
        elif _on_device(bk, X) and _on_device(bk, y) and not (loss == "cross_entropy" and y.ndim == 1 and (
                y.dtype.kind == "f" or encoded)):  # float labels, labels to encode: the host path
            with bk.device_scope():
                Xd = bk.asarray(check_feature_shape(X, n_in), self.compute_dtype)
                shape = target_shape(y, loss, n_out, Xd.shape[0])
                yd = bk.asarray(y, np.int64) if shape is None else bk.asarray(y.reshape(shape), self.compute_dtype)
                own = guard is None
                guard = bk.guard_state() if own else guard
                bk.check_batch(Xd, yd, loss, n_out, guard, step)
                if own:
                    tripped, _, count, kind = bk.to_numpy(guard)
                    if tripped:
                        raise ValueError(invalid_batch_message(count, int(kind), n_out))
            return Xd, yd
        X_host = check_features(X, n_in)
        y_host = prepare_targets(y, loss, n_out, X_host.shape[0], self.dtype, self.classes_)
        if self.mixed:  # checked in float32, then rounded (on the device) to the compute dtype
            Xd, yd = bk.asarray(X_host, self.dtype), bk.asarray(y_host)
            return Xd.astype(self.compute_dtype), yd if yd.dtype == np.int64 else yd.astype(self.compute_dtype)
        return bk.asarray(X_host, self.dtype), bk.asarray(y_host)

    def _ready(self, X: Any, y: Any, loss: str, n_in: int, n_out: int) -> bool:
        """Whether (X, y) are host arrays of this backend already prepared: X (B, n_in) C-contiguous in the
        model's dtype; y int64 class indices (B,) for cross_entropy (nothing to encode), or targets (B, n_out)
        in the model's dtype. Their values remain to be checked."""
        if type(X) is not np.ndarray or type(y) is not np.ndarray or not self.backend.is_array(X) or self.mixed:
            return False
        if X.dtype != self.dtype or X.ndim != 2 or X.shape[1] != n_in or not X.flags.c_contiguous \
                or X.shape[0] == 0 or not y.flags.c_contiguous:
            return False
        if y.ndim == 1:
            return loss == "cross_entropy" and y.dtype == np.int64 and y.shape[0] == X.shape[0] and not self._encoded
        return y.dtype == self.dtype and y.shape == (X.shape[0], n_out)

    def prepare_weights(self, sample_weight: Any, n: int) -> Any:
        """Per-row weights checked (``fastbp.losses.check_sample_weight``) and as an array of the model's
        backend and dtype; None stays None."""
        if sample_weight is None:
            return None
        return self.backend.asarray(check_sample_weight(self.backend.adopt(sample_weight), n), self.dtype)

    def _device_input(self, X: Any) -> Any:
        """X checked and as an array of the model's backend and dtype. An array of the backend already in
        the right dtype and shape is checked where it lives (a device array is never copied to the host and
        back): the finite check is one flag read."""
        bk = self.backend
        X = bk.adopt(X)
        if bk.is_array(X) and X.dtype == self.compute_dtype:
            check_feature_shape(X, self.sizes[0])
            with bk.device_scope():
                if not bool(bk.xp.isfinite(X).all()):
                    raise ValueError("X contains NaN or infinite values")
            return X
        Xd = bk.asarray(check_features(X, self.layers[0].n_in), self.dtype)
        return Xd.astype(self.compute_dtype) if self.mixed else Xd

    def _workspace(self, batch: int) -> _Workspace:
        ws = self._workspaces.get(batch)
        if ws is None:
            if len(self._workspaces) >= _MAX_WORKSPACES:
                self._workspaces.popitem(last=False)
            ws = self._workspaces[batch] = _Workspace(self.backend, self.layers, batch, self.compute_dtype)
        else:
            self._workspaces.move_to_end(batch)
        return ws

    def grad_buffers(self) -> list[Any]:
        """The model's gradient buffers, in ``parameters()`` order, reused by every step (views of
        ``flat_grad()``)."""
        if self._grads is None:
            self.reduction_buffer(0)
        assert self._grads is not None
        return self._grads

    def reduction_buffer(self, extra: int) -> Any:
        """One vector: ``flat_grad()`` followed by ``extra`` more slots, so that data-parallel training
        reduces the gradient and its metrics in one collective. The gradient buffers become views of it
        (their values are not kept when ``extra`` changes). Mixed precision: a float32 vector of its own,
        which the caller fills from the 16-bit gradient (a reduction sums in float32, and the metrics keep
        their digits); ``extra == 0`` still gives the 16-bit gradient block."""
        if self.mixed and extra:
            block = self._reduce_block
            if block is None or block.shape[0] != self.n_params + extra:
                block = self._reduce_block = self.backend.zeros((self.n_params + extra,), self.dtype)
            return block
        block = self._grad_block
        if block is None or block.shape[0] != self.n_params + extra:
            block = self._grad_block = self.backend.zeros((self.n_params + extra,), self.compute_dtype)
            self._flat_grad = block[:self.n_params]
            self._grads = _views(self._flat_grad, [p.shape for p in self.parameters()])
        return block

    def flat_parameters(self) -> Any:
        """All parameters as one vector (W1, b1, W2, ... flattened); ``parameters()`` are views of it."""
        return self._flat

    def flat_grad(self) -> Any:
        """All gradients as one vector, laid out like ``flat_parameters()``."""
        self.grad_buffers()
        return self._flat_grad

    def _loss_and_grads(self, X: Any, y: Any, loss: str, stats_out: Any = None,
                        weights: Any = None, loss_scale: Any = None) -> tuple[Any, list[Any], Any]:
        """The training hot path, on prepared backend arrays: forward, eq. (1), then eqs. (2)-(4) top down.

        Returns the loss as a 0-d backend array, the model's gradient buffers and the network's output
        (both overwritten by the next call). ``stats_out``: receives [loss, correct count], see
        ``Backend.output_delta`` (None: not counted); ``weights``: per-row weights, or None;
        ``loss_scale``: loss scaling's device state (its first value scales the output delta, and so every
        gradient; the loss returned is not scaled).
        """
        trace = self._forward_train(X)
        value, delta = self._output_delta(trace, y, loss, stats_out, weights)
        if loss_scale is not None:
            self.backend.scale_by(delta, loss_scale)
        grads = self._backward(trace, delta)
        return value, grads, trace.a[-1]

    def _forward_train(self, X: Any) -> _Trace:
        """Forward pass into the batch size's workspace, keeping what the backward needs."""
        bk = self.backend
        ws = self._workspace(X.shape[0])
        trace = _Trace(ws, X)
        for i, (layer, (W, b)) in enumerate(zip(self.layers, self._compute_params)):
            A, Z = bk.dense_forward(trace.a[-1], W, b, layer.activation, A_out=ws.A[i], Z_out=ws.Z[i])
            trace.a.append(A)
            trace.Z.append(Z)
        return trace

    def _output_delta(self, trace: _Trace, y: Any, loss: str, stats_out: Any = None,
                      weights: Any = None) -> tuple[Any, Any]:
        top = len(self.layers) - 1
        # eq. (1)
        return self.backend.output_delta(trace.a[-1], y, loss, delta_out=trace.ws.delta[top], stats_out=stats_out,
                                         weights=weights)

    def _backward(self, trace: _Trace, delta: Any) -> list[Any]:
        """Eqs. (2)-(4) from the output delta down; returns the gradient buffers."""
        bk, ws, layers = self.backend, trace.ws, self.layers
        grads = self.grad_buffers()
        top = len(layers) - 1
        bk.dense_grads(delta, trace.a[top], dW_out=grads[2 * top], db_out=grads[2 * top + 1])
        for i in range(top - 1, -1, -1):
            delta, _, _ = bk.backprop_dense(
                delta, self._compute_params[i + 1][0], trace.Z[i], trace.a[i + 1], trace.a[i], layers[i].activation,
                delta_out=ws.delta[i], dW_out=grads[2 * i], db_out=grads[2 * i + 1],
            )
        return grads

    # ------------------------------------------------------------------ moving and saving
    def to(self, backend: str | Backend) -> MLP:
        """Move the parameters to another backend (bit-exact); returns self."""
        target = resolve_backend(backend)
        if target is self.backend:
            return self
        host = [(self.backend.to_numpy(layer.W), self.backend.to_numpy(layer.b), layer.activation)
                for layer in self.layers]
        compute = self.compute_dtype.name
        self.backend, self.compute_dtype = target, self.dtype
        self._set_layers(host)
        self._keep_compute_dtype(compute)
        return self

    def _keep_compute_dtype(self, name: str | None) -> None:
        """Compute in the 16-bit ``name`` from now on (see the class's ``compute_dtype``) where the weights
        (float32) and the backend allow it, else in the model's dtype: what a mixed-precision model keeps
        when it is moved, copied or loaded (mixed precision is a GPU setting). The weights stay as they are."""
        keep = name in HALF_DTYPES and self.dtype == np.float32 and name in self.backend.compute_dtypes
        compute = resolve_compute_dtype(name, self.dtype, self.backend) if keep else self.dtype
        if compute != self.compute_dtype:
            self.compute_dtype = compute
            self._lay_out_compute()

    def copy(self, dtype: Any = None, backend: str | Backend | None = None) -> MLP:
        """An independent copy, optionally in another dtype or on another backend."""
        weights = [(layer.W, layer.b, layer.activation) for layer in self.layers]
        model = MLP.from_weights(weights, dtype=dtype if dtype is not None else self.dtype,
                                 backend=backend if backend is not None else self.backend)
        model.classes_ = None if self.classes_ is None else self.classes_.copy()
        model.loss_, model.preprocess_ = self.loss_, self.preprocess_
        model._keep_compute_dtype(self.compute_dtype.name)
        return model

    def to_onnx(self, path: Any = None, opset: int | None = None, probabilities: bool | None = None) -> Any:
        """The model as an ONNX graph (``onnx.ModelProto``), written to ``path`` (.onnx) when given: logits,
        and probabilities for a classifier, with a dynamic batch axis; see ``fastbp.export.to_onnx``."""
        from .export import DEFAULT_OPSET, to_onnx

        return to_onnx(self, path, DEFAULT_OPSET if opset is None else opset, probabilities)

    def save(self, path: Any) -> Any:
        """Write the model to an .npz file atomically (see ``fastbp.io``); returns the path written."""
        arrays, meta = self.to_arrays()
        return write_npz_atomic(path, arrays, meta)

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The host arrays and the metadata that describe the model (what ``save`` writes, bit-exact)."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            arrays[f"W{i}"] = self.backend.to_numpy(layer.W)
            arrays[f"b{i}"] = self.backend.to_numpy(layer.b)
        meta = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name, "activations": self.activations,
                "sizes": self.sizes, "loss": self.loss_, "preprocess": self.preprocess_}
        if self.mixed:
            meta["compute_dtype"] = self.compute_dtype.name
        if self.classes_ is not None:
            arrays["classes"] = np.asarray(self.classes_)  # numbers or fixed-width strings: no pickle needed
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any], backend: Any = None,
                    where: str = "the arrays") -> MLP:
        """The model that ``to_arrays`` describes, after checking that the arrays match the metadata;
        ValueError naming ``where`` (a file) otherwise."""
        acts = meta.get("activations")
        dtype = meta.get("dtype")
        if not isinstance(acts, list) or not acts or dtype not in ("float32", "float64"):
            raise ValueError(f"{where} has invalid model metadata")
        classes = arrays.get("classes")
        loss = meta.get("loss")
        n_out = meta.get("sizes", [None])[-1] if isinstance(meta.get("sizes"), list) else None
        if loss not in (None, "mse", "cross_entropy", "binary_cross_entropy") or (
                classes is not None and (classes.ndim != 1 or len(classes) != n_out)):
            raise ValueError(f"{where} has invalid model metadata (loss or classes)")
        unknown = sorted({a for a in acts if isinstance(a, str) and a not in ACTIVATIONS})
        if unknown:
            raise ValueError(f"{where} uses the activation {', '.join(map(repr, unknown))}, which is not "
                             f"registered in this process: register it (fastbp.register_activation) before loading")
        layers = []
        for i, act in enumerate(acts):
            W, b = arrays.get(f"W{i}"), arrays.get(f"b{i}")
            if W is None or b is None:
                raise ValueError(f"{where} lacks the arrays of layer {i}")
            if W.dtype.name != dtype or b.dtype.name != dtype or W.ndim != 2 or b.shape != (W.shape[1],):
                raise ValueError(f"{where}: layer {i} has shapes {W.shape}, {b.shape} or dtype {W.dtype} "
                                 f"that do not match its metadata")
            layers.append((W, b, act))
        try:
            model = cls.from_weights(layers, dtype=dtype, backend=backend)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} does not describe a valid model: {exc}") from exc
        model.classes_, model.loss_ = classes, loss
        model._keep_compute_dtype(meta.get("compute_dtype"))  # a backend without it computes in float32
        preprocess = meta.get("preprocess")
        model.preprocess_ = preprocess if isinstance(preprocess, dict) else None
        return model


def load(path: Any, backend: str | Backend | None = None) -> MLP:
    """Load a model saved with ``MLP.save`` (or the model of a training checkpoint) onto ``backend``
    (None: the active backend)."""
    arrays, meta = read_npz(path, (FORMAT, "fastbp-checkpoint"))
    if meta["format"] == "fastbp-checkpoint":
        model_meta = meta.get("model")
        if not isinstance(model_meta, dict):
            raise ValueError(f"{str(path)!r} has invalid checkpoint metadata")
        arrays = {k: v for k, v in arrays.items() if not k.startswith("opt.")}
        meta = dict(model_meta, format=FORMAT)
    return MLP.from_arrays(arrays, meta, backend, repr(str(path)))


def _views(flat: Any, shapes: list[tuple[int, ...]]) -> list[Any]:
    """Consecutive views of ``flat`` with the given shapes."""
    views, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        views.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return views


def _check_sizes(sizes: Any) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
        raise TypeError(f"sizes must be a sequence of layer widths, got {type(sizes).__name__}")
    if len(sizes) < 2:
        raise ValueError(f"sizes must name at least the input and output widths, got {list(sizes)}")
    return [check_positive_int(n, f"sizes[{i}]") for i, n in enumerate(sizes)]


def _on_device(bk: Backend, x: Any) -> bool:
    """Whether ``x`` is an array of ``bk`` that lives on a device (not a host NumPy array)."""
    return bk.is_array(x) and not isinstance(x, np.ndarray)
