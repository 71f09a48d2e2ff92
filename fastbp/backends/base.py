"""The Backend base class: the op set of DESIGN section 3, written against ``self.xp``.

With ``xp = numpy`` this is the reference implementation. An accelerated backend subclasses it, sets
``xp`` and overrides only the ops it makes faster; every other op is inherited and so stays correct.

Ops that produce arrays take optional ``out`` buffers. The model passes buffers it keeps across steps,
so a training step allocates nothing large; called without them, an op allocates what it returns.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..activations import ACTIVATIONS, Activation
from ..losses import LOSSES
from .update_args import STRUCTS, update_args


def target_kind(y: Any, loss: str) -> int:
    """The TARGET_KINDS index of prepared targets ``y`` for ``loss``."""
    if y.dtype.kind in "iu":
        return 0
    return 1 if loss == "mse" else 2


def invalid_batch_message(count: float, kind: int, n_out: int) -> str:
    """What ``check_batch`` found, in words."""
    targets = (f"labels outside [0, {n_out})", "targets that are NaN or infinite", "targets outside [0, 1]")[kind]
    return (f"the batch holds {int(count)} invalid values: features (X) that are NaN or infinite, or y {targets}; "
            f"the step changed nothing")


_NO_SCOPE = contextlib.nullcontext()  # stateless, so one serves every call (and nested ones)


class Backend:
    """One array library and the training ops written against it."""

    #: Registry name ('numpy', 'numba', 'cupy').
    name: str = "base"
    #: The array module the ops are written against.
    xp: Any = np

    def __repr__(self) -> str:
        return f"<fastbp backend {self.name!r}>"

    def _thread_state(self) -> threading.local:
        """This backend's per-thread state (scratch buffers, update records): never shared between threads,
        never pickled."""
        local = self.__dict__.get("_local")
        if local is None:
            local = self.__dict__.setdefault("_local", threading.local())
        return local

    def _update_record(self, update: str, lr: float, step: int, hp: Any) -> Any:
        """The argument record of the fused update ``update`` for this step (``update_args``), filled into a
        one-element structured array this thread reuses (making one costs ~2.4 us, filling one ~0.5 us)."""
        local = self._thread_state()
        records = getattr(local, "update_records", None)
        if records is None:
            records = local.update_records = {name: np.zeros(1, dtype) for name, (_, dtype) in STRUCTS.items()}
        return update_args(update, lr, step, hp, out=records[update])

    def _scratch(self, tag: str, shape: tuple, dtype: Any, fill: float | None = None) -> Any:
        """A buffer for intermediate values that never leave an op (an activation's or an update's
        temporaries, reduction partials), owned by this backend and kept per thread and per (tag, shape,
        dtype), so that a training step allocates nothing after its first run and callers never hand
        scratch space in. Ops use it only within one call (a device's queue runs in order, so a later use
        waits for the earlier one); threads each get their own.

        ``fill``: a constant instead (``_constant``), filled once and then only read: read-only on the host.
        Its tag must be its own."""
        local = self._thread_state()
        cache = getattr(local, "scratch", None)
        if cache is None:
            cache = local.scratch = {}
        key = (tag, shape, dtype)  # as given (shape a tuple): a hit costs one lookup (a step asks ~3 times)
        buf = cache.get(key)
        if buf is None:
            key = (tag, tuple(shape), np.dtype(dtype))  # the same buffer for a list shape or a dtype's type
            buf = cache.get(key)
            if buf is None:
                # a few shapes per batch size and layer: past 64, drop the oldest (none while held)
                while len(cache) >= 64 and not getattr(local, "held", False):
                    del cache[next(iter(cache))]
                buf = cache[key] = self.empty(key[1], key[2])
                if fill is not None:
                    buf.fill(fill)
                    if isinstance(buf, np.ndarray):
                        buf.flags.writeable = False
        return buf

    def _constant(self, value: float, shape: tuple, dtype: Any) -> Any:
        """An array of ``value`` that ops only read, kept with the scratch buffers: the zeros relu's forward
        takes its maximum against, the ones vectors that write a sum over an axis as a product (see
        ``dense_grads``)."""
        return self._scratch(f"constant {value}", shape, dtype, fill=value)

    @contextlib.contextmanager
    def caches_held(self) -> Iterator[None]:
        """Inside the block, this thread's scratch buffers (and the backend's other buffer caches) drop
        nothing to make room. A CUDA graph capture cannot allocate, so it must find every buffer the eager
        step before it made; dropping the oldest entry is no guarantee, as that step may have read an old
        entry and then dropped it for a new one (``fastbp.graphs`` holds them for a fit's steps). The caches
        grow past their size meanwhile (a fit has few shapes) and shrink back at their next miss after it."""
        local = self._thread_state()
        before = getattr(local, "held", False)
        local.held = True
        try:
            yield
        finally:
            local.held = before

    def _caches_held(self) -> bool:
        """Whether this thread is inside ``caches_held``."""
        return bool(getattr(self._thread_state(), "held", False))

    # ------------------------------------------------------------------ memory
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """Return ``x`` as an array of this backend (no copy when it already is one of that dtype)."""
        return self.xp.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        """Return ``x`` as a host numpy array."""
        return np.asarray(x)

    def adopt(self, x: Any) -> Any:
        """A foreign array (any object with ``__dlpack__`` that is neither a NumPy array nor this backend's:
        a PyTorch tensor, a JAX array, ...) as an array this backend reads: without a copy through DLPack
        where it lives where this backend computes (a CPU tensor on a CPU backend, a CUDA tensor on the
        cupy backend's device), copied there otherwise. Anything else is returned as it is."""
        if isinstance(x, np.ndarray) or self.is_array(x) or not hasattr(x, "__dlpack__"):
            return x
        return self._from_dlpack(x)

    def _from_dlpack(self, x: Any) -> Any:
        """A host array of a foreign one: a view where it lives on the host, else a copy (DLPack 1.0)."""
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            first = exc
        try:
            return np.from_dlpack(x, device="cpu", copy=True)  # on a device: DLPack 1.0 copies it over
        except Exception:
            raise TypeError(f"could not read a {type(x).__name__} through DLPack: {first}") from first

    def empty(self, shape: Any, dtype: Any) -> Any:
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape: Any, dtype: Any) -> Any:
        return self.xp.zeros(shape, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued work to finish (a no-op on synchronous CPU backends)."""

    def device_scope(self) -> contextlib.AbstractContextManager[Any]:
        """A context inside which every array operation runs on this backend's device: a GPU backend makes
        its device current, CPU backends do nothing. The Trainer, MLP and Optimizer enter it once per public
        call, so the arithmetic they do between backend ops (metrics, views, sums) stays on the device."""
        return _NO_SCOPE

    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend."""
        return isinstance(x, self.xp.ndarray)

    def to_float(self, x: Any) -> float:
        """A 0-d array (or scalar) of this backend as a Python float: the one device-to-host read."""
        return float(x)

    def take_rows(self, X: Any, idx: Any, out: Any = None) -> Any:
        """Rows ``X[idx]``, into ``out`` when given (the minibatch gather)."""
        return self.xp.take(X, idx, axis=0, out=out)

    def matmul(self, A: Any, B: Any, out: Any = None) -> Any:
        return self.xp.matmul(A, B, out=out)

    # ------------------------------------------------------------------ layers
    def dense_forward(
        self,
        X: Any,
        W: Any,
        b: Any,
        activation: str,
        A_out: Any = None,
        Z_out: Any = None,
    ) -> tuple[Any, Any]:
        """Z = X W + b, A = g(Z); returns (A, Z).

        When g' can be computed from A (``Activation.keeps == 'output'``), A is written over Z and the
        same array is returned twice; otherwise Z is kept in ``Z_out`` and A is written to ``A_out``.
        """
        act = ACTIVATIONS[activation]
        xp = self.xp
        Z = xp.matmul(X, W, out=Z_out)
        Z += b
        work = self._forward_work(act, Z)
        if act.keeps == "output":
            A = act.forward(xp, Z, Z, work)
            return A, A
        if A_out is None:
            A_out = xp.empty_like(Z)
        A = act.forward(xp, Z, A_out, work)
        return A, Z

    def _forward_work(self, act: Activation, Z: Any) -> Any:
        """The ``work`` argument of ``act.forward`` for pre-activations ``Z``, as its ``forward_work`` asks."""
        if act.forward_work == "zeros":
            return self._constant(0, Z.shape, Z.dtype)
        if act.forward_work == "scratch":
            return self._scratch("activation", Z.shape, Z.dtype)
        return None

    def dense_grads(self, delta: Any, A_prev: Any, dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any]:
        """Parameter gradients of a layer from its delta."""
        xp = self.xp
        dW = xp.matmul(A_prev.T, delta, out=dW_out)  # eq. (3): sum over the batch of outer products
        # eq. (4) as 1^T delta: on NumPy a GEMV runs 1.3-5x faster than a sum over an axis at every size
        # measured (8 to 4096 rows, 10 to 1024 columns), and the softmax's row sums are products too
        db = xp.matmul(self._constant(1, delta.shape[:1], delta.dtype), delta, out=db_out)
        return dW, db

    def backprop_dense(
        self,
        delta_next: Any,
        W_next: Any,
        Z: Any,
        A: Any,
        A_prev: Any,
        activation: str,
        delta_out: Any = None,
        dW_out: Any = None,
        db_out: Any = None,
    ) -> tuple[Any, Any, Any]:
        """Eqs. (2), (3), (4) for one hidden layer: returns (delta, dW, db).

        Args:
            delta_next: delta of the layer above, (B, n_next).
            W_next: weights of the layer above, (n_out, n_next).
            Z, A: what ``dense_forward`` returned for this layer.
            A_prev: this layer's input, (B, n_in).
            activation: this layer's activation name.
        """
        act: Activation = ACTIVATIONS[activation]
        xp = self.xp
        delta = xp.matmul(delta_next, W_next.T, out=delta_out)
        if act.name != "identity":
            work = self._scratch("activation", delta.shape, delta.dtype) if act.backward_scratch else None
            work2 = self._scratch("activation2", delta.shape, delta.dtype) if act.backward_scratch == 2 else None
            act.backward(xp, delta, Z, A, work, work2)  # eq. (2): delta *= g'(z)
        dW, db = self.dense_grads(delta, A_prev, dW_out, db_out)
        return delta, dW, db

    # ------------------------------------------------------------------ losses
    def output_delta(self, Z_L: Any, y: Any, loss: str, delta_out: Any = None,
                     stats_out: Any = None, weights: Any = None) -> tuple[Any, Any]:
        """Eq. (1) fused with the loss: returns (loss as a 0-d array, delta_L = dC/dZ_L), the delta written
        into ``delta_out`` (C-contiguous, shaped like Z_L) when given.

        ``y`` is prepared by ``fastbp.losses.prepare_targets``: integer labels (B,) or targets shaped
        like Z_L, in Z_L's dtype. ``stats_out``: a (2,) array of this backend in the accumulator dtype
        (``fastbp.dtypes.accumulator_dtype``) that receives [the loss, the number of correct predictions]
        (0 for mse): a step's metrics, written where they are computed (on a GPU by the loss kernel itself)
        and read back once per epoch. A device backend returns the loss as a view of it.

        ``weights``: per-row (sample) weights (B,) in Z_L's dtype, or None. Each row's loss, and its delta
        row, is multiplied by its weight, and the mean stays over the rows (sum(w_i c_i) / B for
        cross_entropy, / (B * C) for the elementwise losses), as Keras weighs samples; the correct count is
        not weighted.
        """
        if weights is not None:
            return self._weighted_output_delta(Z_L, y, loss, delta_out, stats_out, weights)
        xp = self.xp
        B = Z_L.shape[0]
        if loss == "cross_entropy":
            # (softmax(z) - onehot(y)) / B, stably: exp(z - max z) / sum, each row scaled once by 1 / (B sum)
            m = self._row_max(Z_L)
            E = xp.subtract(Z_L, m, out=delta_out)
            xp.exp(E, out=E)
            s = xp.matmul(E, self._constant(1, (E.shape[1], 1), E.dtype))  # row sums (B, 1), as in dense_grads
            if y.ndim == 1:
                # c = mean over rows of lse - z_y, with lse = log(s) + m; the labels' places in the flattened
                # rows (a flat index is a third of the cost of a (rows, y) one)
                at = self._label_places(y, Z_L.shape[1])
                rows = xp.log(s).reshape(-1)
                rows += m.reshape(-1)
                rows -= Z_L.take(at)
                value = rows.sum() / B
                E *= xp.divide(1.0 / B, s, out=s)
                E.reshape(-1)[at] -= 1.0 / B
            else:
                # soft or one-hot targets: c = sum_k y_k (lse - z_k); dc/dz = softmax * sum(y) - y
                logsum = xp.log(s)
                logsum += m
                value = xp.sum(y * (logsum - Z_L)) / B
                E *= xp.sum(y, axis=1, keepdims=True) / s
                E -= y
                E /= B
            return self._record(stats_out, value, Z_L, y, loss), E
        if loss == "binary_cross_entropy":
            # c = max(z, 0) - z y + log(1 + exp(-|z|)); dc/dz = sigmoid(z) - y
            n = Z_L.size
            e = xp.exp(-xp.abs(Z_L))
            value = xp.sum(xp.maximum(Z_L, 0) - Z_L * y + xp.log1p(e)) / n
            delta = xp.add(e, 1, out=delta_out)
            xp.reciprocal(delta, out=delta)  # 1 / (1 + e)
            neg = Z_L < 0
            # sigmoid(z) = 1/(1+e) for z >= 0 and e/(1+e) for z < 0
            delta[neg] *= e[neg]
            delta -= y
            delta /= n
            return self._record(stats_out, value, Z_L, y, loss), delta
        if loss == "mse":
            n = Z_L.size
            diff = xp.subtract(Z_L, y, out=delta_out)
            value = xp.vdot(diff.ravel(), diff.ravel()) / n
            diff *= 2.0 / n
            return self._record(stats_out, value, Z_L, y, loss), diff
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    def _row_max(self, Z: Any) -> Any:
        """The maximum of each row of a 2-d array, (B, 1). NumPy reduces a short row element by element, row
        after row: for up to 32 columns and more rows it is 1.4-5x faster (10 columns: 64 rows to 1024) to
        reduce down the columns of a transposed copy, vector-wide. The same values either way."""
        rows, cols = Z.shape
        if cols > 32 or rows < 32:
            return Z.max(axis=1, keepdims=True)  # reductions as methods: np.max/np.sum add ~1 us each
        T = self._scratch("transpose", (cols, rows), Z.dtype)
        self.xp.copyto(T, Z.T)
        return T.max(axis=0)[:, None]

    def _rows(self, n: int) -> Any:
        """arange(n) of this backend, kept for the last n (the cross-entropy's row index at every step; only
        ever read, so threads may share it)."""
        cached = self.__dict__.get("_rows_cache")
        if cached is None or cached.shape[0] != n:
            cached = self.__dict__["_rows_cache"] = self.xp.arange(n)
        return cached

    def _label_places(self, y: Any, n_out: int) -> Any:
        """The flat positions ``row * n_out + y`` of integer labels ``y`` in a C-ordered (B, n_out) array."""
        key = (y.shape[0], n_out)
        cached = self.__dict__.get("_row_starts")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_row_starts"] = (key, self.xp.arange(0, y.shape[0] * n_out, n_out))
        return y + cached[1]

    def _weighted_output_delta(self, Z_L: Any, y: Any, loss: str, delta_out: Any, stats_out: Any,
                               weights: Any) -> tuple[Any, Any]:
        """``output_delta`` with sample weights: this backend's unweighted delta with its rows scaled, and
        the weighted mean of the row losses (``row_losses``)."""
        _, delta = self.output_delta(Z_L, y, loss, delta_out)
        xp = self.xp
        delta *= weights[:, None]
        n = Z_L.shape[0] if loss == "cross_entropy" else Z_L.size
        value = xp.vdot(weights, self.row_losses(Z_L, y, loss)) / n
        return self._record(stats_out, value, Z_L, y, loss), delta

    def row_losses(self, Z_L: Any, y: Any, loss: str) -> Any:
        """Each row's loss, summed over its outputs (B,): the terms whose mean ``output_delta`` returns."""
        xp = self.xp
        if loss == "cross_entropy":
            m = self._row_max(Z_L)
            lse = xp.log(xp.matmul(xp.exp(Z_L - m), self._constant(1, (Z_L.shape[1], 1), Z_L.dtype))) + m
            if y.ndim == 1:
                return lse[:, 0] - Z_L[self._rows(Z_L.shape[0]), y]
            return xp.sum(y * (lse - Z_L), axis=1)
        if loss == "binary_cross_entropy":
            return xp.sum(xp.maximum(Z_L, 0) - Z_L * y + xp.log1p(xp.exp(-xp.abs(Z_L))), axis=1)
        if loss == "mse":
            diff = Z_L - y
            return xp.sum(diff * diff, axis=1)
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    def _record(self, stats_out: Any, value: Any, Z_L: Any, y: Any, loss: str) -> Any:
        """Write [value, correct count] into ``stats_out`` (see ``output_delta``) when given; return value."""
        if stats_out is not None:
            stats_out[0] = value
            stats_out[1] = self.correct_count(Z_L, y, loss) if loss != "mse" else 0
        return value

    def loss_value(self, Z_L: Any, y: Any, loss: str) -> Any:
        """The mean loss alone, as a 0-d array (evaluation: no delta)."""
        value, _ = self.output_delta(Z_L, y, loss)
        return value

    def correct_count(self, Z_L: Any, y: Any, loss: str) -> Any:
        """Number of correct predictions, as a 0-d array (classification losses): the first maximum of
        each row against its label (or its target row's first maximum); for binary cross-entropy, each
        output's sign against its target rounded at 0.5."""
        xp = self.xp
        if loss == "cross_entropy":
            pred = Z_L.argmax(axis=1)
            target = y if y.ndim == 1 else y.argmax(axis=1)
            return (pred == target).sum()
        if loss == "binary_cross_entropy":
            return xp.sum((Z_L > 0) == (y > 0.5))
        raise ValueError(f"accuracy is defined for classification losses, not {loss!r}")

    def graph_support(self) -> str | None:
        """Why this backend cannot run training steps as CUDA graphs (``Trainer(cuda_graphs=True)``), or None
        when it can (the cupy backend: see ``fastbp.graphs``)."""
        return f"the {self.name} backend runs no CUDA graphs (they are the cupy backend's)"

    def train_step(self, model: Any, X: Any, y: Any, loss: str, optimizer: Any,
                   clip: float = 0.0, stats_out: Any = None) -> tuple[Any, Any, float, bool] | None:
        """A whole training step (forward, backward, update) in one op, or None where this backend has
        none for this model and optimizer (the Trainer then runs the ops one by one).

        ``clip`` > 0 rescales the gradient to that global norm when larger; ``stats_out`` as for
        ``output_delta``. Returns (the loss, the network's output, the sum of squared gradients, whether
        the update ran); a non-finite loss or gradient must leave the parameters and the optimizer state
        untouched.
        """
        return None

    def forward_rows(self, model: Any, X: Any) -> Any | None:
        """The network's output for the rows of X (inference: no buffers kept for a backward pass) in one
        op, or None where this backend has no such op for the model and these rows (``MLP`` then runs
        ``dense_forward`` layer by layer)."""
        return None

    def train_gradients(self, model: Any, X: Any, y: Any, loss: str,
                        stats_out: Any = None) -> tuple[Any, Any] | None:
        """The gradient phase of a step in one op, into ``model.flat_grad()``: (the loss, the output), or None
        where this backend has no such op for the model (the Trainer then runs the ops one by one). The
        Trainer calls it where ``train_step`` declines (the update then runs on its own), and in
        data-parallel training, which reduces the gradient before the update."""
        return None

    def to_floats(self, *xs: Any) -> tuple[float, ...]:
        """Several 0-d arrays as Python floats, read back together (one transfer on a GPU)."""
        return tuple(self.to_float(x) for x in xs)

    def scale(self, x: Any, alpha: float) -> None:
        """x *= alpha, in place."""
        x *= alpha

    # ------------------------------------------------------------------ fused optimizer updates
    #: Fused in-place updates by optimizer (``Optimizer.fused`` names them): ``fn(backend, p, g, slots, lr,
    #: step, hp, guard, copy=None, unscale=None)`` updates the parameter ``p`` and its ``slots`` (see
    #: ``Optimizer.update``) with the optimizer's hyperparameters ``hp``, writes the updated ``p`` into
    #: ``copy`` in copy's dtype when given (a mixed-precision model's 16-bit compute copy), multiplies the
    #: gradient by ``unscale[0]`` first when given (loss scaling), does nothing when ``guard`` is tripped,
    #: and returns False when it cannot take these arrays (then the reference runs). The reference backend
    #: has none: every optimizer's ``update`` is the reference.
    def scale_by(self, x: Any, state: Any) -> None:
        """Loss scaling (float16 mixed precision): x *= state[0], in place. Only backends that list float16
        in ``compute_dtypes`` have it."""
        raise NotImplementedError(f"the {self.name} backend has no loss scaling (float16 runs on cupy)")

    def loss_scale_update(self, sumsq: Any, state: Any, guard: Any, gate: Any, growth: float, backoff: float,
                          interval: int) -> None:
        """One step of dynamic loss scaling on the device, after the scaled gradient's sum of squares
        ``sumsq``: ``state`` is [scale, 1 / the scale used, the unscaled sum of squares, steps since the scale
        changed, overflow steps skipped]; ``gate[0]`` becomes 1 (the update skips) on an overflow or when
        ``guard`` is tripped. See kernels/optim.cu ``loss_scale_update``."""
        raise NotImplementedError(f"the {self.name} backend has no loss scaling (float16 runs on cupy)")

    #: The dtypes this backend computes in: the model dtypes, and on GPUs the 16-bit compute dtypes of
    #: mixed precision (``MLP(compute_dtype=...)``).
    compute_dtypes: tuple[str, ...] = ("float32", "float64")

    fused_updates: Mapping[str, Callable[..., bool]] = {}

    def sum_of_squares(self, x: Any, out: Any = None) -> Any:
        """sum(x^2) as a 0-d array (for global-norm clipping). ``out``: a 0-d array from an earlier call
        that a device backend writes the result into (so a step allocates nothing); CPU backends return
        their own."""
        flat = x.ravel()
        return self.xp.vdot(flat, flat)

    def clip_by_norm(self, grad: Any, sumsq: Any, max_norm: float, guard: Any = None) -> None:
        """Scale ``grad`` to global norm ``max_norm`` when its norm sqrt(sumsq) is larger, by
        max_norm / (norm + 1e-6) as torch.nn.utils.clip_grad_norm_; nothing when ``guard`` is tripped."""
        if not self.deferred_checks:
            if self._guard_tripped(guard):
                return
            coef = max_norm / (math.sqrt(self.to_float(sumsq)) + 1e-6)
            if coef < 1.0:
                self.scale(grad, coef)
            return
        # On the device, without reading anything back: the same roundings (sqrt, + and / in float64, then
        # the coefficient rounded to the gradient's dtype), and a factor of exactly 1 where nothing is done.
        xp = self.xp
        coef = max_norm / (xp.sqrt(xp.asarray(sumsq, dtype=np.float64)) + 1e-6)
        unchanged = coef >= 1.0 if guard is None else (coef >= 1.0) | (guard[0] != 0)
        grad *= xp.where(unchanged, 1.0, coef).astype(grad.dtype)

    def check_batch(self, X: Any, y: Any, loss: str, n_out: int, guard: Any, step: int) -> None:
        """Check the values of a prepared batch where it lives (for arrays handed over on a device, which
        the host checks would copy back and forth): count the features that are not finite and the
        targets wrong for ``loss`` (see TARGET_KINDS); unless ``guard`` (see ``guard_state``) is tripped
        already, trip it as [2, step, count, kind] when the count is not 0. No host read."""
        xp = self.xp
        kind = target_kind(y, loss)
        bad = self._invalid(X, y, kind, n_out)
        record = xp.stack([xp.asarray(v, dtype=np.float64) for v in (2.0, step, bad, kind)])
        xp.copyto(guard, record, where=(guard[0] == 0) & (bad > 0))

    def count_invalid(self, X: Any, y: Any, loss: str, n_out: int) -> int:
        """How many values of a prepared batch are invalid (see ``check_batch``), read at once: the check
        of the public step on CPU backends, where a read costs nothing."""
        return int(self._invalid(X, y, target_kind(y, loss), n_out))

    def _invalid(self, X: Any, y: Any, kind: int, n_out: int) -> Any:
        """The count of ``check_batch`` as a 0-d array of this backend."""
        xp = self.xp
        bad = X.size - xp.count_nonzero(xp.isfinite(X))
        if kind == 0:  # as unsigned, a negative label is larger than any class count
            return bad + xp.count_nonzero(y.astype(np.uint64) >= n_out)
        if kind == 1:
            return bad + (y.size - xp.count_nonzero(xp.isfinite(y)))
        return bad + (y.size - xp.count_nonzero((y >= 0) & (y <= 1)))  # NaN compares false

    # ------------------------------------------------------------------ the deferred non-finite check
    #: Whether the Trainer checks each step's loss and gradient for non-finite values on the backend,
    #: reading the verdict back every few steps, instead of reading both to the host every step. True on
    #: GPU backends, where a read per step would stall the queue; on the CPU a read costs nothing.
    deferred_checks: bool = False

    def guard_state(self) -> Any:
        """A fresh guard for ``nonfinite_guard``: float64 [tripped, step, loss, sum of squares], zeros."""
        return self.zeros((4,), np.float64)

    def nonfinite_guard(self, value: Any, sumsq: Any, guard: Any, step: int) -> None:
        """Trip ``guard``, unless it is tripped already, when the loss ``value`` or the gradient's sum of
        squares ``sumsq`` is not finite, and record the step number and both values. Updates gated by a
        tripped guard do nothing. A device backend does this on the device, without a host read."""
        if guard[0] == 0:
            loss, sq = self.to_floats(value, sumsq)
            if not (math.isfinite(loss) and math.isfinite(sq)):
                guard[:] = (1.0, step, loss, sq)

    def _guard_tripped(self, guard: Any) -> bool:
        return guard is not None and bool(guard[0] != 0)

    def _guard_open(self, guard: Any, *state: Any) -> list[Any] | None:
        """Before a reference update under ``guard``: None when it must not run, else copies of ``state``
        (the arrays it updates; None entries ignored) to put back afterwards where the guard is tripped.
        CPU backends read the guard (free there) and skip a tripped update. Backends with deferred checks
        must not read it (a sync per parameter per step): they run the update, then ``_guard_restore``
        puts the state back on the device if the guard was tripped."""
        if guard is None:
            return []
        if not self.deferred_checks:
            return None if self._guard_tripped(guard) else []
        return [a.copy() for a in state if a is not None]

    def _guard_restore(self, guard: Any, saved: list[Any], *state: Any) -> None:
        if saved:
            tripped = guard[0] != 0
            for a, before in zip([a for a in state if a is not None], saved):
                self.xp.copyto(a, before, where=tripped)
