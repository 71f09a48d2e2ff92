"""Optimizers with explicit state, and learning-rate schedules.

An optimizer's state is plain data (``OptimizerState``: a step count and named lists of arrays, one per
parameter), so it can be saved, restored and moved between backends. The built-in updates are the
backend's fused in-place ops, one call per parameter; semantics follow torch.optim (SGD, Adam, AdamW,
RMSprop).

Your own optimizer is one subclass: its hyperparameters as ``__init__`` arguments (stored under the same
names), ``slot_names``, and ``update(xp, p, g, slots, lr, step)``, the update written once against the array
module ``xp`` in place. It runs on every backend (the compiled ones run it through their arrays, as the
reference path), a tripped non-finite guard leaves it undone as it does the built-in ones, and
``register`` makes it known by name (``Trainer(optimizer="name")``, checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._checks import check_nonneg_float, check_positive_float, check_positive_int
from .backends import Backend, get_backend

__all__ = [
    "SGD", "Adam", "AdamW", "RMSProp", "Optimizer", "OptimizerState", "OPTIMIZERS", "register", "unregister",
    "Schedule", "Constant", "StepDecay", "Cosine", "LinearWarmup",
]


# ---------------------------------------------------------------------------------------- schedules
class Schedule:
    """A learning rate as a function of the optimizer step (1 for the first step)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Plain description, enough to rebuild it with ``schedule_from_config``."""
        return {"type": type(self).__name__, **{k: v for k, v in vars(self).items()
                                                if not isinstance(v, Schedule)},
                **{k: v.config() for k, v in vars(self).items() if isinstance(v, Schedule)}}


class Constant(Schedule):
    """lr at every step."""

    def __init__(self, lr: float) -> None:
        self.lr = check_positive_float(lr, "lr")

    def __call__(self, step: int) -> float:
        return self.lr


class StepDecay(Schedule):
    """lr * gamma ** ((step - 1) // step_size): multiply by gamma every step_size steps."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1) -> None:
        self.lr = check_positive_float(lr, "lr")
        self.step_size = check_positive_int(step_size, "step_size")
        self.gamma = check_positive_float(gamma, "gamma")

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma ** ((step - 1) // self.step_size)


class Cosine(Schedule):
    """Cosine annealing from lr to min_lr over total_steps, then min_lr."""

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0) -> None:
        self.lr = check_positive_float(lr, "lr")
        self.total_steps = check_positive_int(total_steps, "total_steps")
        self.min_lr = check_nonneg_float(min_lr, "min_lr")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must not exceed lr ({self.lr}), got {self.min_lr}")

    def __call__(self, step: int) -> float:
        t = min(step - 1, self.total_steps) / self.total_steps
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))


class LinearWarmup(Schedule):
    """Linear ramp from after(1)/warmup_steps up to ``after`` over warmup_steps, then ``after``."""

    def __init__(self, after: Schedule | float, warmup_steps: int) -> None:
        self.after = after if isinstance(after, Schedule) else Constant(after)
        self.warmup_steps = check_positive_int(warmup_steps, "warmup_steps")

    def __call__(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.after(1) * step / self.warmup_steps
        return self.after(step - self.warmup_steps)


_SCHEDULES = {cls.__name__: cls for cls in (Constant, StepDecay, Cosine, LinearWarmup)}


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from ``Schedule.config()``."""
    kwargs = dict(config)
    cls = _SCHEDULES.get(kwargs.pop("type", None))
    if cls is None:
        raise ValueError(f"unknown schedule config {config!r}")
    if "after" in kwargs:
        kwargs["after"] = schedule_from_config(kwargs["after"])
    return cls(**kwargs)


def _as_schedule(lr: Schedule | float) -> Schedule:
    if isinstance(lr, Schedule):
        return lr
    return Constant(lr)


# ---------------------------------------------------------------------------------------- state
@dataclass
class OptimizerState:
    """Plain optimizer state: steps taken, and per-parameter slot arrays by name (e.g. 'm', 'v')."""

    step: int = 0
    slots: dict[str, list[Any]] = field(default_factory=dict)


class Optimizer:
    """Base optimizer: holds the hyperparameters and the state; subclasses define
    ``slot_names`` and ``update`` (or, for a fused backend op, ``_update``)."""

    slot_names: tuple[str, ...] = ()

    def __init__(self, lr: Schedule | float) -> None:
        self.schedule = _as_schedule(lr)
        self.state: OptimizerState | None = None
        self._backend: Backend | None = None
        self._dtype: Any = None

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.schedule((self.state.step if self.state else 0) + 1)

    def hyperparameters(self) -> dict[str, Any]:
        hidden = ("state", "schedule", "slot_names")
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in hidden}

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}(lr={self.schedule.config()}, {hp})"

    # -------------------------------------------------------------- state management
    def _init_state(self, params: list[Any], backend: Backend) -> None:
        dtype = params[0].dtype
        self.state = OptimizerState(
            step=0, slots={name: [backend.zeros(p.shape, dtype) for p in params] for name in self.slot_names}
        )
        self._bind(params, backend)

    def _bind(self, params: list[Any], backend: Backend) -> None:
        self._backend = backend
        self._dtype = params[0].dtype

    def prepare(self, params: list[Any], backend: Backend) -> None:
        """Ready the state for ``params`` on ``backend`` before an update: created (zeros) on the first call,
        checked against the parameters' shapes, moved when the backend or dtype changed. ``step`` calls it;
        a backend's fused whole step calls it before reading ``state``."""
        if self.state is None:
            self._init_state(params, backend)
            return
        first = next(iter(self.state.slots.values()), None)
        if first is not None:
            if len(first) != len(params) or any(s.shape != p.shape for s, p in zip(first, params)):
                raise ValueError("params do not match the optimizer's state: use a new optimizer or reset()")
        if backend is not self._backend or self._dtype != params[0].dtype:
            self.to(backend, params[0].dtype)
            self._bind(params, backend)

    def rewind(self, steps: int) -> None:
        """Take back the step count of ``steps`` updates that a tripped guard turned into no-ops (their
        moments were left untouched on the device), so the next update's bias corrections are right."""
        if self.state is not None:
            self.state.step -= steps

    def reset(self) -> None:
        """Forget the state (moments, step count)."""
        self.state = None
        self._backend = None
        self._dtype = None

    def to(self, backend: str | Backend, dtype: Any = None) -> Optimizer:
        """Move the state to another backend (and dtype); returns self."""
        from .backends import resolve_backend

        target = resolve_backend(backend)
        if self.state is not None and self._backend is not None:
            src = self._backend
            for name, arrays in self.state.slots.items():
                self.state.slots[name] = [
                    target.asarray(src.to_numpy(a), dtype if dtype is not None else a.dtype) for a in arrays
                ]
        self._backend = target
        return self

    def state_dict(self) -> dict[str, Any]:
        """The state as host numpy arrays and plain values."""
        out: dict[str, Any] = {"step": self.state.step if self.state else 0}
        if self.state is not None and self._backend is not None:
            for name, arrays in self.state.slots.items():
                for i, a in enumerate(arrays):
                    out[f"{name}.{i}"] = np.array(self._backend.to_numpy(a), copy=True)
        return out

    def load_state_dict(self, state: dict[str, Any], params: list[Any], backend: Backend | None = None) -> None:
        """Restore a state from ``state_dict()`` for ``params``; checks every shape first."""
        backend = backend or get_backend()
        step = state.get("step")
        if isinstance(step, np.ndarray):
            step = step.item()
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"optimizer state 'step' must be a non-negative integer, got {step!r}")
        slots: dict[str, list[Any]] = {}
        if step > 0:
            for name in self.slot_names:
                arrays = []
                for i, p in enumerate(params):
                    a = state.get(f"{name}.{i}")
                    if a is None or np.shape(a) != tuple(p.shape):
                        raise ValueError(f"optimizer state {name}.{i} is missing or not of shape {p.shape}")
                    arrays.append(a)
                slots[name] = arrays
        self.state = OptimizerState(step=int(step), slots={
            name: [backend.asarray(np.asarray(a), params[0].dtype) for a in arrays]
            for name, arrays in slots.items()
        })
        if step == 0:
            self.state.slots = {name: [backend.zeros(p.shape, params[0].dtype) for p in params]
                                for name in self.slot_names}
        self._bind(params, backend)

    # -------------------------------------------------------------- the step
    def step(self, params: list[Any], grads: list[Any], backend: Backend | None = None, guard: Any = None) -> None:
        """Update ``params`` in place from ``grads`` (same order and shapes).

        ``guard``: the array ``backend.nonfinite_guard`` trips; when it is tripped the update kernels do nothing
        (the step count still advances: the Trainer winds it back when it reads the guard)."""
        if len(params) != len(grads) or not params:
            raise ValueError(f"params and grads must be non-empty lists of equal length, "
                             f"got {len(params)} and {len(grads)}")
        backend = backend or get_backend()
        self.prepare(params, backend)
        state = self.state
        assert state is not None
        state.step += 1
        lr = self.schedule(state.step)
        with backend.device_scope():
            for i, (p, g) in enumerate(zip(params, grads)):
                self._update(backend, i, p, g, lr, state, guard)

    def update(self, xp: Any, p: Any, g: Any, slots: dict[str, Any], lr: float, step: int) -> None:
        """The update of one parameter ``p`` (in place) from its gradient ``g``, written with the array
        module ``xp`` (numpy, or cupy on a GPU): ``slots`` maps each of ``slot_names`` to this parameter's
        state array (updated in place too, zeros before the first step); ``lr`` is this step's learning
        rate, ``step`` the step number (1 for the first). Subclasses without a fused backend op define it."""
        raise NotImplementedError(f"{type(self).__name__} defines neither update() nor _update()")

    def _update(self, bk: Backend, i: int, p: Any, g: Any, lr: float, state: OptimizerState, guard: Any) -> None:
        """One parameter's update on ``bk``: by default ``update`` through the backend's arrays, undone
        where ``guard`` (a tripped non-finite guard) says so, as the fused ops are."""
        slots = {name: state.slots[name][i] for name in self.slot_names}
        saved = bk._guard_open(guard, p, *slots.values())
        if saved is None:
            return
        self.update(bk.xp, p, g, slots, lr, state.step)
        bk._guard_restore(guard, saved, p, *slots.values())


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay."""

    def __init__(self, lr: Schedule | float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        self.momentum = check_nonneg_float(momentum, "momentum", upper=1.0)
        self.dampening = check_nonneg_float(dampening, "dampening", upper=1.0)
        self.weight_decay = check_nonneg_float(weight_decay, "weight_decay")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        self.nesterov = bool(nesterov)
        self.slot_names = ("momentum",) if self.momentum else ()

    def _update(self, bk, i, p, g, lr, state, guard):
        buf = state.slots["momentum"][i] if self.momentum else None
        bk.sgd_update(p, g, buf, lr, self.momentum, self.dampening, self.nesterov,
                      self.weight_decay, first=state.step == 1, guard=guard)


class Adam(Optimizer):
    """Adam (Kingma & Ba), with optional L2 weight decay added to the gradient."""

    slot_names = ("m", "v")
    _decoupled = False

    @property
    def decoupled(self) -> bool:
        """Whether the weight decay is decoupled from the gradient (AdamW) rather than added to it."""
        return self._decoupled

    def __init__(self, lr: Schedule | float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (check_nonneg_float(betas[0], "betas[0]", upper=1.0),
                      check_nonneg_float(betas[1], "betas[1]", upper=1.0))
        self.eps = check_positive_float(eps, "eps")
        self.weight_decay = check_nonneg_float(weight_decay, "weight_decay")

    def _update(self, bk, i, p, g, lr, state, guard):
        bk.adam_update(p, g, state.slots["m"][i], state.slots["v"][i], lr, self.betas[0], self.betas[1],
                       self.eps, state.step, self.weight_decay, self.decoupled, guard=guard)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * weight_decay each step."""

    _decoupled = True

    def __init__(self, lr: Schedule | float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(lr, betas, eps, weight_decay)


class RMSProp(Optimizer):
    """RMSProp (Hinton), as torch.optim.RMSprop (not centered)."""

    def __init__(self, lr: Schedule | float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        self.alpha = check_nonneg_float(alpha, "alpha", upper=1.0)
        self.eps = check_positive_float(eps, "eps")
        self.momentum = check_nonneg_float(momentum, "momentum", upper=1.0)
        self.weight_decay = check_nonneg_float(weight_decay, "weight_decay")
        self.slot_names = ("square_avg", "momentum") if self.momentum else ("square_avg",)

    def _update(self, bk, i, p, g, lr, state, guard):
        buf = state.slots["momentum"][i] if self.momentum else None
        bk.rmsprop_update(p, g, state.slots["square_avg"][i], buf, lr, self.alpha, self.eps,
                          self.momentum, self.weight_decay, guard=guard)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSProp}


def register(name: str, cls: type[Optimizer], replace: bool = False) -> type[Optimizer]:
    """Make an Optimizer subclass known by ``name``: ``Trainer(optimizer=name)`` builds one with its
    defaults, and checkpoints of it load (by its class name; its ``__init__`` must take its
    ``hyperparameters()`` as keyword arguments, and ``lr``). Returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError(f"cls must be a fastbp.optim.Optimizer subclass, got {cls!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an optimizer name must be an identifier such as 'lion', got {name!r}")
    key = name.lower()
    if key in OPTIMIZERS and OPTIMIZERS[key] is not cls:
        if key in _BUILTIN or not replace:
            raise ValueError(f"optimizer {name!r} is {'built in' if key in _BUILTIN else 'registered already'}")
    if cls.__name__ in {c.__name__ for k, c in OPTIMIZERS.items() if k != key and c is not cls}:
        raise ValueError(f"another registered optimizer's class is named {cls.__name__} too: checkpoints name "
                         f"optimizers by class name")
    OPTIMIZERS[key] = cls
    return cls


def unregister(name: str) -> None:
    """Forget an optimizer added by ``register``."""
    key = name.lower()
    if key in _BUILTIN or key not in OPTIMIZERS:
        raise ValueError(f"{name!r} is not a registered (user) optimizer")
    del OPTIMIZERS[key]


_BUILTIN = frozenset(OPTIMIZERS)
