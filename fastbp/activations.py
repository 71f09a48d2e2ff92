"""Activations and their derivatives, side by side in one table.

Each activation is written against an array module ``xp`` (numpy or cupy) and works in place where it
can. ``forward(xp, Z, out, work)`` writes g(Z) into ``out`` (which may be Z itself), ``work`` being what
its ``forward_work`` asks for.
``backward(xp, delta, Z, A, work, work2)`` multiplies ``delta`` in place by g'(z), using what the forward pass
kept: activations whose derivative is a function of the output (``keeps == 'output'``) let the forward pass
overwrite Z with A, so only one buffer per layer is kept; the others (``keeps == 'preactivation'``) keep Z.

``register`` adds a user's activation from two plain functions of an array, g and g'. It then works on every
backend: the compiled backends run it through this reference path (their fused kernels know only the
activations here), on their own arrays (CuPy arrays on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LEAKY_SLOPE = 0.01
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


@dataclass(frozen=True)
class Activation:
    """One activation: its forward, the in-place multiply by its derivative, and what g' needs."""

    name: str
    forward: Callable[[Any, Any, Any, Any], Any]
    backward: Callable[[Any, Any, Any, Any, Any, Any], Any]
    keeps: str  # what the forward pass keeps for g': 'output' (A, written over Z) or 'preactivation' (Z)
    init: str  # default initializer family: 'he' or 'glorot'
    # what the forward's ``work`` is: None, a scratch buffer shaped like Z ('scratch', its values garbage),
    # or zeros shaped like Z that it only reads ('zeros')
    forward_work: str | None = None
    backward_scratch: int = 1  # scratch buffers the backward needs (0, 1 or 2)
    builtin: bool = True  # False for those added by ``register`` (no compiled kernel knows them)


# ---------------------------------------------------------------- forward: out = g(Z)
def _identity_f(xp, Z, out, work):
    if out is not Z:
        xp.copyto(out, Z)
    return out


def _relu_f(xp, Z, out, work):
    # max(z, 0) against an array of zeros: NumPy's maximum against a scalar runs element by element, three
    # times slower on the CPUs measured (see ``forward_work``)
    return xp.maximum(Z, work, out=out)


def _leaky_f(xp, Z, out, work):
    # max(z, 0.01 z) equals leaky_relu for a slope below 1
    xp.multiply(Z, LEAKY_SLOPE, out=work)
    return xp.maximum(Z, work, out=out)


def _sigmoid_f(xp, Z, out, work):
    # 1 / (1 + exp(-z)); exp overflows to inf for z << 0 which gives the right limit 0
    xp.negative(Z, out=out)
    with _errstate(xp):
        xp.exp(out, out=out)
    out += 1
    return xp.reciprocal(out, out=out)


def _tanh_f(xp, Z, out, work):
    return xp.tanh(Z, out=out)


def _gelu_f(xp, Z, out, work):
    # 0.5 z (1 + tanh(c (z + k z^3)))
    xp.multiply(Z, Z, out=work)
    work *= _GELU_K
    work += 1
    work *= Z
    work *= _GELU_C
    xp.tanh(work, out=work)
    work += 1
    work *= 0.5
    return xp.multiply(Z, work, out=out)


def _silu_f(xp, Z, out, work):
    _sigmoid_f(xp, Z, work, None)
    return xp.multiply(Z, work, out=out)


# ---------------------------------------------------------------- backward: delta *= g'(z)
def _identity_b(xp, delta, Z, A, work, work2):
    return delta


def _relu_b(xp, delta, Z, A, work, work2):
    xp.greater(A, 0, out=work)
    return xp.multiply(delta, work, out=delta)


def _leaky_b(xp, delta, Z, A, work, work2):
    # g'(z) = 1 for z > 0 else 0.01; A > 0 exactly when z > 0
    xp.greater(A, 0, out=work)
    work *= 1 - LEAKY_SLOPE
    work += LEAKY_SLOPE
    return xp.multiply(delta, work, out=delta)


def _sigmoid_b(xp, delta, Z, A, work, work2):
    # g' = a (1 - a)
    xp.subtract(1, A, out=work)
    work *= A
    return xp.multiply(delta, work, out=delta)


def _tanh_b(xp, delta, Z, A, work, work2):
    # g' = 1 - a^2
    xp.multiply(A, A, out=work)
    xp.subtract(1, work, out=work)
    return xp.multiply(delta, work, out=delta)


def _gelu_b(xp, delta, Z, A, work, work2):
    # With u = c (z + k z^3) and t = tanh(u):
    #   g' = 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3k z^2) = 0.5 (1 + t) [1 + (1 - t) c z (1 + 3k z^2)]
    xp.multiply(Z, Z, out=work2)
    work2 *= 3 * _GELU_K
    work2 += 1
    work2 *= Z
    work2 *= _GELU_C  # c z (1 + 3k z^2)
    xp.multiply(Z, Z, out=work)
    work *= _GELU_K
    work += 1
    work *= Z
    work *= _GELU_C
    xp.tanh(work, out=work)  # t
    work += 1  # 1 + t
    delta *= work
    delta *= 0.5
    xp.subtract(2, work, out=work)  # 1 - t
    work *= work2
    work += 1
    return xp.multiply(delta, work, out=delta)


def _silu_b(xp, delta, Z, A, work, work2):
    # s = sigmoid(z); g' = s (1 + z (1 - s))
    _sigmoid_f(xp, Z, work, None)
    delta *= work  # delta * s
    xp.subtract(1, work, out=work)
    work *= Z
    work += 1
    return xp.multiply(delta, work, out=delta)


class _errstate:
    """numpy.errstate(over='ignore') where xp supports it; a no-op elsewhere."""

    def __init__(self, xp):
        self._ctx = xp.errstate(over="ignore") if hasattr(xp, "errstate") else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


#: Integer codes of the activations, shared by the compiled kernels (Numba and CUDA).
CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "gelu": 5, "silu": 6}

ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", _identity_f, _identity_b, keeps="output", init="glorot", backward_scratch=0),
        Activation("relu", _relu_f, _relu_b, keeps="output", init="he", forward_work="zeros"),
        Activation("leaky_relu", _leaky_f, _leaky_b, keeps="output", init="he", forward_work="scratch"),
        Activation("sigmoid", _sigmoid_f, _sigmoid_b, keeps="output", init="glorot"),
        Activation("tanh", _tanh_f, _tanh_b, keeps="output", init="glorot"),
        Activation("gelu", _gelu_f, _gelu_b, keeps="preactivation", init="he", forward_work="scratch",
                   backward_scratch=2),
        Activation("silu", _silu_f, _silu_b, keeps="preactivation", init="he", forward_work="scratch"),
    )
}


#: Points where ``register`` compares a derivative with the slope of its forward (away from 0 and +-1,
#: where piecewise activations have their kinks).
_PROBE = (-2.7, -1.3, -0.6, -0.2, 0.3, 0.8, 1.6, 3.1)


def register(name: str, forward: Callable[[Any, Any], Any], derivative: Callable[[Any, Any, Any], Any], *,
             init: str = "he", check: bool = True, replace: bool = False) -> Activation:
    """Add an activation that every model and backend can then use by ``name``.

    Args:
        name: the name layers use, e.g. ``MLP([4, 16, 3], activation=name)``; a built-in name cannot be
            taken.
        forward: ``forward(xp, z) -> g(z)``, elementwise, written with the array module ``xp`` it is given
            (numpy on the CPU backends, cupy on a GPU), returning an array shaped like ``z``.
        derivative: ``derivative(xp, z, a) -> g'(z)``, given both z and a = g(z).
        init: the weight initialization family for layers with it by default, 'he' or 'glorot'.
        check: compare ``derivative`` with the numerical slope of ``forward`` at a few points and refuse
            it when they disagree (a wrong derivative would otherwise train silently wrong).
        replace: allow registering ``name`` again (e.g. re-running a notebook cell).
    Returns:
        the Activation, also in ``ACTIVATIONS[name]``.

    Models that use it can be saved; loading them needs it registered again, under the same name.
    """
    from ._checks import check_choice

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an activation name must be an identifier such as 'my_act', got {name!r}")
    taken = {n.lower(): a for n, a in ACTIVATIONS.items()}
    existing = taken.get(name.lower())
    if existing is not None and (existing.builtin or not replace):
        why = "a built-in activation" if existing.builtin else "registered already (pass replace=True)"
        raise ValueError(f"activation {name!r} is {why}")
    if not callable(forward) or not callable(derivative):
        raise TypeError("forward and derivative must be functions: forward(xp, z) and derivative(xp, z, a)")
    init = check_choice(init, ("he", "glorot"), "init")
    if check:
        _check_derivative(name, forward, derivative)

    def forward_(xp, Z, out, work):
        out[...] = forward(xp, Z)
        return out

    def backward_(xp, delta, Z, A, work, work2):
        delta *= derivative(xp, Z, A)
        return delta

    if existing is not None:
        del ACTIVATIONS[next(n for n in ACTIVATIONS if n.lower() == name.lower())]
    act = ACTIVATIONS[name] = Activation(name, forward_, backward_, keeps="preactivation", init=init,
                                         backward_scratch=0, builtin=False)
    return act


def unregister(name: str) -> None:
    """Remove an activation added by ``register``."""
    act = ACTIVATIONS.get(name)
    if act is None or act.builtin:
        raise ValueError(f"{name!r} is not a registered (user) activation")
    del ACTIVATIONS[name]


def _check_derivative(name: str, forward: Callable, derivative: Callable) -> None:
    """Refuse a forward that is not elementwise and finite, or a derivative that is not its slope."""
    import numpy as np

    z = np.array(_PROBE)
    h = 1e-6
    try:
        with np.errstate(all="ignore"):
            a = np.asarray(forward(np, z.copy()), dtype=np.float64)
            slope = (np.asarray(forward(np, z + h), np.float64) - np.asarray(forward(np, z - h), np.float64)) / (2 * h)
            d = np.asarray(derivative(np, z.copy(), a.copy()), dtype=np.float64)
    except Exception as exc:
        raise ValueError(f"activation {name!r}: calling forward(np, z) and derivative(np, z, a) on a float64 "
                         f"array failed: {type(exc).__name__}: {exc}") from exc
    for what, value in (("forward", a), ("derivative", d)):
        if value.shape != z.shape:
            raise ValueError(f"activation {name!r}: {what} must return an array shaped like z {z.shape}, "
                             f"got {value.shape}")
        if not np.isfinite(value).all():
            raise ValueError(f"activation {name!r}: {what} is not finite at z in {list(z)}: {list(value)}")
    bad = np.abs(d - slope) > 1e-4 * np.maximum(1.0, np.abs(slope))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"activation {name!r}: derivative({z[i]}) = {d[i]:.6g}, but forward's slope there is "
                         f"{slope[i]:.6g}; fix the derivative, or pass check=False")
