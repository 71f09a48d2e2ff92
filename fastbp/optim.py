"""Optimizers with explicit state, and learning-rate schedules.

An optimizer's state is plain data (``OptimizerState``: a step count and named lists of arrays, one per
parameter), so it can be saved, restored and moved between backends. Semantics follow torch.optim (SGD,
Adam, AdamW, RMSprop).

An optimizer is one class: its hyperparameters as a frozen dataclass ``Hyper`` (checked in its
``__post_init__``; the instance's ``hp``), the names of its per-parameter state arrays ``slot_names``, and
``update(xp, p, g, slots, lr, step)``, the reference update written once against the array module ``xp``, in
place. It runs on every backend. A backend may have a fused update for it (``Backend.fused_updates``, by the
class's ``fused`` name): the compiled backends have one for each built-in optimizer, equal to the reference
bit for bit. A tripped non-finite guard leaves an update undone either way, and ``register`` makes an
optimizer known by name (``Trainer(optimizer="name")``; checkpoints find it by class name).
"""

from __future__ import annotations

import dataclasses
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
def _same_shapes(arrays: list[Any], params: list[Any]) -> bool:
    """Whether ``arrays`` match ``params`` one for one in shape (a loop: any() over a generator costs a
    microsecond, and this runs every step)."""
    if len(arrays) != len(params):
        return False
    for a, p in zip(arrays, params):
        if a.shape != p.shape:
            return False
    return True


@dataclass
class OptimizerState:
    """Plain optimizer state: steps taken, and per-parameter slot arrays by name (e.g. 'm', 'v')."""

    step: int = 0
    slots: dict[str, list[Any]] = field(default_factory=dict)


class Optimizer:
    """Base optimizer: the learning rate (a schedule), the hyperparameters ``hp`` (an instance of the
    subclass's frozen dataclass ``Hyper``) and the state. A subclass defines ``Hyper``, ``slot_names`` and
    ``update``, the reference update; ``fused`` names the fused update a backend may have for it."""

    @dataclass(frozen=True)
    class Hyper:
        """No hyperparameters besides the learning rate."""

    slot_names: tuple[str, ...] = ()
    #: The name of the fused in-place update a backend may register for this optimizer (see
    #: ``Backend.fused_updates``); None: the reference ``update`` runs everywhere. A subclass that writes its
    #: own ``update`` loses its parent's fused update.
    fused: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "update" in cls.__dict__ and "fused" not in cls.__dict__:
            cls.fused = None

    def __init__(self, lr: Schedule | float = 1e-3, **hyper: Any) -> None:
        self.schedule = _as_schedule(lr)
        self.hp: Any = self.Hyper(**hyper)  # a frozen dataclass: replace() changes it
        self.state: OptimizerState | None = None
        self._backend: Backend | None = None
        self._dtype: Any = None

    @classmethod
    def from_hyperparameters(cls, lr: Schedule | float, hyperparameters: dict[str, Any]) -> Optimizer:
        """An optimizer of this class with ``hyperparameters`` (as ``hyperparameters()`` gives them), not
        through ``__init__``: what a checkpoint restores."""
        opt = cls.__new__(cls)
        Optimizer.__init__(opt, lr, **hyperparameters)
        return opt

    def __getattr__(self, name: str) -> Any:  # opt.momentum reads opt.hp.momentum
        hp = self.__dict__.get("hp")
        if hp is not None and name in _field_names(hp):
            return getattr(hp, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        hp = self.__dict__.get("hp")
        if hp is not None and name in _field_names(hp):
            raise AttributeError(f"hyperparameters are frozen: use opt.replace({name}={value!r})")
        super().__setattr__(name, value)

    def replace(self, **changes: Any) -> Optimizer:
        """Change hyperparameters between steps (checked as in the constructor); returns self."""
        self.hp = dataclasses.replace(self.hp, **changes)
        return self

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.schedule((self.state.step if self.state else 0) + 1)

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters besides the learning rate, by name."""
        return {f.name: getattr(self.hp, f.name) for f in dataclasses.fields(self.hp)}

    def __repr__(self) -> str:
        hp = "".join(f", {k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}(lr={self.schedule.config()}{hp})"

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
        checked against the parameters' shapes, moved when the backend or dtype changed, a slot added (zeros)
        or dropped when changed hyperparameters changed ``slot_names``. ``step`` calls it; a backend's fused
        whole step calls it before reading ``state``."""
        if self.state is None:
            self._init_state(params, backend)
            return
        first = next(iter(self.state.slots.values()), None)
        if first is not None and not _same_shapes(first, params):
            raise ValueError("params do not match the optimizer's state: use a new optimizer or reset()")
        if backend is not self._backend or self._dtype != params[0].dtype:
            self.to(backend, params[0].dtype)
            self._bind(params, backend)
        if len(self.state.slots) != len(self.slot_names):  # changed hyperparameters (replace) changed the slots
            self.state.slots = {name: self.state.slots.get(name) or [backend.zeros(p.shape, params[0].dtype)
                                                                     for p in params]
                                for name in self.slot_names}

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
    def step(self, params: list[Any], grads: list[Any], backend: Backend | None = None, guard: Any = None,
             copies: list[Any] | None = None, unscale: Any = None) -> None:
        """Update ``params`` in place from ``grads`` (same order and shapes).

        ``guard``: the array ``backend.nonfinite_guard`` trips; when it is tripped the update does nothing
        (the step count still advances: the Trainer winds it back when it reads the guard).
        ``copies``: for mixed precision, one array per parameter (its 16-bit compute copy) that receives the
        updated values, rounded to its dtype; the gradients may be in that dtype. ``unscale``: loss scaling's
        one-element float32 device array holding 1 / the loss scale, which multiplies every gradient first."""
        if len(params) != len(grads) or not params:
            raise ValueError(f"params and grads must be non-empty lists of equal length, "
                             f"got {len(params)} and {len(grads)}")
        backend = backend or get_backend()
        self.prepare(params, backend)
        state = self.state
        assert state is not None
        lr = self.advance()
        fused = backend.fused_updates.get(self.fused) if self.fused else None
        with backend.device_scope():
            for i, (p, g) in enumerate(zip(params, grads)):
                slots = {name: state.slots[name][i] for name in self.slot_names}
                copy = None if copies is None else copies[i]
                if fused is None or not fused(backend, p, g, slots, lr, state.step, self.hp, guard, copy, unscale):
                    g = g.astype(p.dtype, copy=unscale is not None)
                    if unscale is not None:
                        g *= unscale.astype(p.dtype)
                    self._reference_update(backend, p, g, slots, lr, state.step, guard)
                    if copy is not None:  # after a skipped update too: p is then as it was
                        copy[...] = p.astype(copy.dtype)

    def advance(self) -> float:
        """Count a step and return its learning rate: what ``step`` does before it updates, and what a
        replayed CUDA graph of the training step needs from the host (``fastbp.graphs``)."""
        assert self.state is not None
        self.state.step += 1
        return self.schedule(self.state.step)

    def update(self, xp: Any, p: Any, g: Any, slots: dict[str, Any], lr: float, step: int) -> None:
        """The update of one parameter ``p`` (in place) from its gradient ``g``, written with the array
        module ``xp`` (numpy, or cupy on a GPU): ``slots`` maps each of ``slot_names`` to this parameter's
        state array (updated in place too, zeros before the first step); ``lr`` is this step's learning
        rate, ``step`` the step number (1 for the first); the hyperparameters are ``self.hp``."""
        raise NotImplementedError(f"{type(self).__name__} defines no update()")

    def work(self, like: Any) -> Any:
        """A scratch array shaped like ``like`` (its values are garbage), owned by the backend and reused by
        every step: an update that computes through it with ``out=`` and in-place operators allocates
        nothing per step (a temporary of a large parameter costs page faults on every step)."""
        assert self._backend is not None, "work() is for update(), after prepare()"
        return self._backend._scratch("optimizer", tuple(like.shape), like.dtype)

    def _reference_update(self, bk: Backend, p: Any, g: Any, slots: dict[str, Any], lr: float, step: int,
                          guard: Any) -> None:
        """``update`` through the backend's arrays, undone where ``guard`` (a tripped non-finite guard)
        says so, as the fused updates are."""
        saved = bk._guard_open(guard, p, *slots.values())
        if saved is None:
            return
        self.update(bk.xp, p, g, slots, lr, step)
        bk._guard_restore(guard, saved, p, *slots.values())


def _field_names(hp: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(hp)}


def _checked(hp: Any, **values: Any) -> None:
    """Store checked (converted) values in a frozen dataclass from its ``__post_init__``."""
    for name, value in values.items():
        object.__setattr__(hp, name, value)


# The built-in optimizers. Each ``update`` is the reference, in the order of operations the fused updates
# of the compiled backends follow (kernels/optim.cu, fastbp/backends/_numba_kernels.py), so that they agree
# bit for bit: change one, change all (tests/test_optim.py compares them).
class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay, as
    torch.optim.SGD."""

    @dataclass(frozen=True)
    class Hyper:
        momentum: float = 0.0
        dampening: float = 0.0
        nesterov: bool = False
        weight_decay: float = 0.0

        def __post_init__(self) -> None:
            _checked(self, momentum=check_nonneg_float(self.momentum, "momentum", upper=1.0),
                     dampening=check_nonneg_float(self.dampening, "dampening", upper=1.0),
                     nesterov=bool(self.nesterov),
                     weight_decay=check_nonneg_float(self.weight_decay, "weight_decay"))
            if self.nesterov and (self.momentum == 0 or self.dampening != 0):
                raise ValueError("nesterov needs momentum > 0 and dampening = 0")

    fused = "sgd"

    def __init__(self, lr: Schedule | float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)

    @property
    def slot_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("momentum",) if self.hp.momentum else ()

    def update(self, xp, p, g, slots, lr, step):
        # d = g + wd p; buf = momentum buf + (1 - dampening) d (buf = d at the first step);
        # d = d + momentum buf (Nesterov) or buf; p -= lr d. Through one scratch array, in place.
        hp, work = self.hp, self.work(p)
        if hp.weight_decay:
            xp.multiply(p, hp.weight_decay, out=work)
            work += g
            g = work
        if hp.momentum:
            buf = slots["momentum"]
            if step == 1:
                xp.copyto(buf, g)
            else:
                buf *= hp.momentum
                buf += (1 - hp.dampening) * g if hp.dampening else g
            if hp.nesterov:
                if g is not work:
                    xp.copyto(work, g)
                work += hp.momentum * buf
                g = work
            else:
                g = buf
        xp.multiply(g, lr, out=work)
        p -= work


class Adam(Optimizer):
    """Adam (Kingma & Ba), with optional L2 weight decay added to the gradient, as torch.optim.Adam."""

    @dataclass(frozen=True)
    class Hyper:
        betas: tuple[float, float] = (0.9, 0.999)
        eps: float = 1e-8
        weight_decay: float = 0.0
        decoupled: bool = False  # AdamW's decay (p *= 1 - lr * weight_decay) instead of the L2 term

        def __post_init__(self) -> None:
            betas = self.betas
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
            _checked(self, betas=(check_nonneg_float(betas[0], "betas[0]", upper=1.0),
                                  check_nonneg_float(betas[1], "betas[1]", upper=1.0)),
                     eps=check_positive_float(self.eps, "eps"),
                     weight_decay=check_nonneg_float(self.weight_decay, "weight_decay"),
                     decoupled=bool(self.decoupled))

    slot_names = ("m", "v")
    fused = "adam"

    def __init__(self, lr: Schedule | float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def update(self, xp, p, g, slots, lr, step):
        # m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2;
        # p -= m / (sqrt(v) / sqrt(1 - beta2^step) + eps) * (lr / (1 - beta1^step)), as torch.
        # Through one scratch array, in place (g may live in it after the L2 term).
        hp, work = self.hp, self.work(p)
        beta1, beta2 = hp.betas
        m, v = slots["m"], slots["v"]
        if hp.weight_decay:
            if hp.decoupled:
                p *= 1 - lr * hp.weight_decay
            else:
                xp.multiply(p, hp.weight_decay, out=work)
                work += g
                g = work
        m *= beta1
        v *= beta2
        if g is work:
            v += (1 - beta2) * (g * g)
            m += (1 - beta1) * g
        else:
            xp.multiply(g, 1 - beta1, out=work)
            m += work
            xp.multiply(g, g, out=work)
            work *= 1 - beta2
            v += work
        bias1 = 1 - beta1**step
        bias2_sqrt = math.sqrt(1 - beta2**step)
        xp.sqrt(v, out=work)
        work /= bias2_sqrt
        work += hp.eps
        xp.divide(m, work, out=work)
        work *= lr / bias1
        p -= work


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * weight_decay each step."""

    @dataclass(frozen=True)
    class Hyper(Adam.Hyper):
        weight_decay: float = 0.01
        decoupled: bool = True

    def __init__(self, lr: Schedule | float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(lr, betas, eps, weight_decay)


class RMSProp(Optimizer):
    """RMSProp (Hinton), as torch.optim.RMSprop (not centered)."""

    @dataclass(frozen=True)
    class Hyper:
        alpha: float = 0.99
        eps: float = 1e-8
        momentum: float = 0.0
        weight_decay: float = 0.0

        def __post_init__(self) -> None:
            _checked(self, alpha=check_nonneg_float(self.alpha, "alpha", upper=1.0),
                     eps=check_positive_float(self.eps, "eps"),
                     momentum=check_nonneg_float(self.momentum, "momentum", upper=1.0),
                     weight_decay=check_nonneg_float(self.weight_decay, "weight_decay"))

    fused = "rmsprop"

    def __init__(self, lr: Schedule | float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay)

    @property
    def slot_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("square_avg", "momentum") if self.hp.momentum else ("square_avg",)

    def update(self, xp, p, g, slots, lr, step):
        # d = g + wd p; sq = alpha sq + (1 - alpha) d^2; u = d / (sqrt(sq) + eps);
        # buf = momentum buf + u (with momentum: u = buf); p -= lr u. Through one scratch array, in place.
        hp, work = self.hp, self.work(p)
        sq = slots["square_avg"]
        if hp.weight_decay:
            xp.multiply(p, hp.weight_decay, out=work)
            work += g
            g = work
        sq *= hp.alpha
        sq += (1 - hp.alpha) * (g * g)
        if g is work:  # divide in the order that keeps g until it is read
            work /= xp.sqrt(sq) + hp.eps
        else:
            xp.sqrt(sq, out=work)
            work += hp.eps
            xp.divide(g, work, out=work)
        if hp.momentum:
            buf = slots["momentum"]
            buf *= hp.momentum
            buf += work
            xp.multiply(buf, lr, out=work)
        else:
            work *= lr
        p -= work


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
