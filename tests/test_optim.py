"""Optimizers against independent re-derivations over several steps, and against torch.optim."""

import math

import numpy as np
import pytest
from conftest import assert_close, torch_or_skip

import fastbp as fb
from fastbp import optim

STEPS = 5


def _problem(rng, dtype):
    params = [rng.standard_normal((4, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)]
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in params] for _ in range(STEPS)]
    return params, grads


def _run(backend, opt, params, grads):
    dev = [backend.asarray(p.copy()) for p in params]
    for g in grads:
        opt.step(dev, [backend.asarray(x) for x in g], backend)
    return [backend.to_numpy(p) for p in dev]


# Each re-derivation keeps its own state and follows the published update rule step by step.
def sgd_ref(params, grads, lr, momentum=0.0, dampening=0.0, nesterov=False, wd=0.0):
    p = [x.astype(np.float64) for x in params]
    buf = [None] * len(p)
    for gs in grads:
        for i, g in enumerate(gs):
            d = g + wd * p[i]
            if momentum:
                buf[i] = d.copy() if buf[i] is None else momentum * buf[i] + (1 - dampening) * d
                d = d + momentum * buf[i] if nesterov else buf[i]
            p[i] = p[i] - lr * d
    return p


def adam_ref(params, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False):
    p = [x.astype(np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            if decoupled:
                p[i] = p[i] * (1 - lr * wd)
                d = g
            else:
                d = g + wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            v[i] = b2 * v[i] + (1 - b2) * d * d
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            p[i] = p[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def rmsprop_ref(params, grads, lr, alpha=0.99, eps=1e-8, momentum=0.0, wd=0.0):
    p = [x.astype(np.float64) for x in params]
    sq = [np.zeros_like(x) for x in p]
    buf = [np.zeros_like(x) for x in p]
    for gs in grads:
        for i, g in enumerate(gs):
            d = g + wd * p[i]
            sq[i] = alpha * sq[i] + (1 - alpha) * d * d
            step = d / (np.sqrt(sq[i]) + eps)
            if momentum:
                buf[i] = momentum * buf[i] + step
                step = buf[i]
            p[i] = p[i] - lr * step
    return p


CASES = [
    ("sgd", lambda: optim.SGD(lr=0.1), lambda p, g: sgd_ref(p, g, 0.1)),
    ("sgd_momentum", lambda: optim.SGD(lr=0.1, momentum=0.9),
     lambda p, g: sgd_ref(p, g, 0.1, momentum=0.9)),
    ("sgd_dampening_wd", lambda: optim.SGD(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
     lambda p, g: sgd_ref(p, g, 0.05, momentum=0.8, dampening=0.3, wd=0.01)),
    ("sgd_nesterov_wd", lambda: optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
     lambda p, g: sgd_ref(p, g, 0.1, momentum=0.9, nesterov=True, wd=0.05)),
    ("adam", lambda: optim.Adam(lr=0.01), lambda p, g: adam_ref(p, g, 0.01)),
    ("adam_wd", lambda: optim.Adam(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
     lambda p, g: adam_ref(p, g, 0.01, b1=0.8, b2=0.99, wd=0.1)),
    ("adamw", lambda: optim.AdamW(lr=0.01, weight_decay=0.1),
     lambda p, g: adam_ref(p, g, 0.01, wd=0.1, decoupled=True)),
    ("rmsprop", lambda: optim.RMSProp(lr=0.01), lambda p, g: rmsprop_ref(p, g, 0.01)),
    ("rmsprop_momentum_wd", lambda: optim.RMSProp(lr=0.01, momentum=0.9, weight_decay=0.01),
     lambda p, g: rmsprop_ref(p, g, 0.01, momentum=0.9, wd=0.01)),
]


@pytest.mark.parametrize("name,make,reference", CASES, ids=[c[0] for c in CASES])
def test_optimizer_matches_its_rederivation(backend, dtype, rng, name, make, reference):
    params, grads = _problem(rng, dtype)
    got = _run(backend, make(), params, grads)
    expected = reference(params, grads)
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-13}
    for g, e in zip(got, expected):
        assert g.dtype == np.dtype(dtype)
        assert_close(g, e, dtype, **tol)
        # the update really moved the parameter: a no-op optimizer could not pass
    assert not np.allclose(got[0], params[0])


@pytest.mark.parametrize("name,make", [c[:2] for c in CASES], ids=[c[0] for c in CASES])
def test_updates_equal_the_numpy_reference_bit_for_bit(backend, dtype, name, make):
    """Every backend's fused one-pass update computes in the parameters' dtype with the reference's
    operations in its order (constants rounded once, no fused multiply-add), so 7 steps give the very
    same bits as the NumPy backend."""
    if backend.name == "numpy":
        pytest.skip("the NumPy backend is the reference")
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(1003).astype(dtype)  # not a multiple of any vector width
    grads = [rng.standard_normal(1003).astype(dtype) for _ in range(7)]
    results = []
    for bk in (backend, fb.backends.resolve_backend("numpy")):
        p, opt = bk.asarray(p0.copy()), make()
        for g in grads:
            opt.step([p], [bk.asarray(g)], bk)
        results.append(bk.to_numpy(p))
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], p0)


def _random_optimizers(rng, count):
    """Optimizers with random hyperparameters: round values can hide a constant computed another way (an
    FMA-contracted ``1 - lr * wd`` rounds as the reference's two operations for most pairs, not all)."""
    def log_uniform(low, high):
        return float(np.exp(rng.uniform(np.log(low), np.log(high))))

    made = []
    for _ in range(count):
        lr, wd = log_uniform(1e-4, 0.3), log_uniform(1e-4, 0.3)
        made += [optim.AdamW(lr=lr, weight_decay=wd, betas=(rng.uniform(0.5, 0.99), rng.uniform(0.9, 0.9999))),
                 optim.Adam(lr=lr, weight_decay=wd),
                 optim.SGD(lr=lr, momentum=rng.uniform(0.1, 0.99), dampening=rng.uniform(0, 0.5), weight_decay=wd),
                 optim.RMSProp(lr=lr, alpha=rng.uniform(0.5, 0.999), momentum=rng.uniform(0, 0.9), weight_decay=wd)]
    return made


def _fma_sensitive_pairs(rng, count):
    """(lr, wd) pairs for which 1 - lr * wd rounded once (a fused multiply-add) differs from the reference's
    two roundings (the product, then the difference): exact rational arithmetic tells them apart."""
    from fractions import Fraction

    pairs = []
    while len(pairs) < count:
        lr, wd = (float(np.exp(rng.uniform(np.log(1e-4), np.log(0.3)))) for _ in range(2))
        if float(1 - Fraction(lr) * Fraction(wd)) != 1 - lr * wd:
            pairs.append((lr, wd))
    return pairs


def test_updates_equal_the_reference_bit_for_bit_with_random_hyperparameters(backend, dtype):
    if backend.name == "numpy":
        pytest.skip("the NumPy backend is the reference")
    rng = np.random.default_rng(11)
    p0 = rng.standard_normal(7).astype(dtype)
    grads = [rng.standard_normal(7).astype(dtype) for _ in range(2)]
    ref = fb.backends.resolve_backend("numpy")
    mismatched = []
    sensitive = [optim.AdamW(lr=lr, weight_decay=wd) for lr, wd in _fma_sensitive_pairs(rng, 40)]
    for opt in _random_optimizers(rng, 100) + sensitive:
        results = []
        for bk, o in ((backend, opt), (ref, type(opt).from_hyperparameters(opt.lr, opt.hyperparameters()))):
            p = bk.asarray(p0.copy())
            for g in grads:
                o.step([p], [bk.asarray(g)], bk)
            results.append(bk.to_numpy(p))
        if not np.array_equal(results[0], results[1]):
            mismatched.append(repr(opt))
    assert not mismatched, f"{len(mismatched)} settings differ from the reference, e.g. {mismatched[:3]}"


def _denormal_problem(dtype):
    """Parameters that mix normal numbers with denormals (below the smallest normal), and gradients."""
    tiny = np.finfo(dtype).tiny
    p = np.array([1.5, -2.0, tiny / 4, -tiny / 3, tiny * 0.75, 0.25, -tiny / 1000, 3.0] * 4, dtype)
    g = np.array([0.0, tiny / 2, 1e-3, -tiny / 5, 0.0, 2.0, 0.0, -tiny / 7] * 4, dtype)
    return p, g


def _denormal(a):
    return (a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)


def _sgd_step(backend, p, g):
    pd = backend.asarray(p.copy())
    optim.SGD(lr=0.5).step([pd], [backend.asarray(g)], backend)
    return backend.to_numpy(pd)


def test_denormals_are_kept_bit_for_bit_on_the_cpu_backends(backend, dtype):
    """On the CPU backends and the emulated CuPy, updates keep denormal numbers exactly as the NumPy
    reference does (a real GPU flushes float32 ones to zero: see the gpu test below)."""
    if backend.name == "numpy":
        pytest.skip("the NumPy backend is the reference")
    if backend.name == "cupy":
        pytest.skip("a real GPU flushes float32 denormals: test_float32_denormals_flush_to_zero_on_the_gpu")
    p, g = _denormal_problem(dtype)
    want = _sgd_step(fb.backends.resolve_backend("numpy"), p, g)
    assert (want[_denormal(p)] != 0).all()  # the reference keeps denormals
    np.testing.assert_array_equal(_sgd_step(backend, p, g), want)


@pytest.mark.gpu
@pytest.mark.skipif("cupy" not in fb.available_backends(), reason="needs a CUDA device")
def test_float32_denormals_flush_to_zero_on_the_gpu():
    """CuPy compiles every kernel with -ftz=true (it cannot be turned off): in float32 the GPU reads and
    writes denormals as zero, so updates equal the NumPy reference's bit for bit except at denormals; in
    float64 (no flushing) they equal it everywhere."""
    gpu, ref = fb.backends.resolve_backend("cupy"), fb.backends.resolve_backend("numpy")
    for dtype in ("float64", "float32"):
        p, g = _denormal_problem(dtype)
        got, want = _sgd_step(gpu, p, g), _sgd_step(ref, p, g)
        if dtype == "float64":
            np.testing.assert_array_equal(got, want)
            continue
        clean = ~_denormal(p) & ~_denormal(g) & ~_denormal(want)
        np.testing.assert_array_equal(got[clean], want[clean])  # no denormal involved: the same bits
        assert (got[_denormal(want)] == 0).all()  # what NumPy keeps as a denormal, the GPU flushes to zero


TORCH_CASES = [
    ("sgd_nesterov", lambda: optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
     lambda t, ps: t.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", lambda: optim.Adam(lr=0.01, weight_decay=0.01),
     lambda t, ps: t.optim.Adam(ps, lr=0.01, weight_decay=0.01)),
    ("adamw", lambda: optim.AdamW(lr=0.01, weight_decay=0.1),
     lambda t, ps: t.optim.AdamW(ps, lr=0.01, weight_decay=0.1)),
    ("rmsprop", lambda: optim.RMSProp(lr=0.01, momentum=0.5),
     lambda t, ps: t.optim.RMSprop(ps, lr=0.01, momentum=0.5)),
]


@pytest.mark.parametrize("name,make,make_torch", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_optimizer_matches_torch(backend, rng, name, make, make_torch):
    torch = torch_or_skip()
    params, grads = _problem(rng, "float64")
    got = _run(backend, make(), params, grads)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = make_torch(torch, tparams)
    for gs in grads:
        for tp, g in zip(tparams, gs):
            tp.grad = torch.tensor(g)
        topt.step()
    for g, tp in zip(got, tparams):
        assert_close(g, tp.detach().numpy(), "float64", rtol=1e-12, atol=1e-14)


def test_state_is_plain_and_moves(backend, rng):
    params, grads = _problem(rng, "float64")
    opt = optim.Adam(lr=0.01)
    dev = [backend.asarray(p.copy()) for p in params]
    for g in grads[:3]:
        opt.step(dev, [backend.asarray(x) for x in g], backend)
    state = opt.state_dict()
    assert state["step"] == 3 and set(state) == {"step", "m.0", "m.1", "v.0", "v.1"}
    # a new optimizer restored from the state continues exactly like the original
    clone = optim.Adam(lr=0.01)
    dev2 = [backend.asarray(backend.to_numpy(p).copy()) for p in dev]
    clone.load_state_dict(state, dev2, backend)
    for g in grads[3:]:
        opt.step(dev, [backend.asarray(x) for x in g], backend)
        clone.step(dev2, [backend.asarray(x) for x in g], backend)
    for a, b in zip(dev, dev2):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_load_state_dict_rejects_wrong_shapes(rng):
    params, _ = _problem(rng, "float64")
    opt = optim.Adam()
    with pytest.raises(ValueError, match="m.0"):
        opt.load_state_dict({"step": 2, "m.0": np.zeros((2, 2))}, params, fb.get_backend())
    assert opt.state is None


def test_schedules():
    assert optim.Constant(0.1)(100) == 0.1
    s = optim.StepDecay(1.0, step_size=10, gamma=0.5)
    assert [s(1), s(10), s(11), s(21)] == [1.0, 1.0, 0.5, 0.25]
    c = optim.Cosine(1.0, total_steps=10, min_lr=0.1)
    assert c(1) == 1.0 and math.isclose(c(6), 0.55) and math.isclose(c(11), 0.1) and math.isclose(c(50), 0.1)
    w = optim.LinearWarmup(optim.Constant(0.2), warmup_steps=4)
    assert [w(1), w(2), w(4), w(5), w(100)] == [0.05, 0.1, 0.2, 0.2, 0.2]
    rebuilt = optim.schedule_from_config(optim.LinearWarmup(optim.Cosine(1.0, 10), 3).config())
    assert isinstance(rebuilt, optim.LinearWarmup) and rebuilt(8) == optim.Cosine(1.0, 10)(5)


def test_schedule_drives_the_update(backend):
    p = [backend.asarray(np.zeros(2))]
    g = [backend.asarray(np.ones(2))]
    opt = optim.SGD(lr=optim.StepDecay(1.0, step_size=1, gamma=0.5))
    for _ in range(3):
        opt.step(p, g, backend)
    np.testing.assert_allclose(backend.to_numpy(p[0]), [-1.75, -1.75])  # -(1 + 0.5 + 0.25)


@pytest.mark.parametrize("bad,match", [
    (lambda: optim.SGD(lr=-1), "lr"), (lambda: optim.SGD(lr=0.1, momentum=1.5), "momentum"),
    (lambda: optim.SGD(lr=0.1, nesterov=True), "nesterov"), (lambda: optim.Adam(betas=(0.9,)), "betas"),
    (lambda: optim.Adam(eps=0), "eps"), (lambda: optim.RMSProp(alpha=1.0), "alpha"),
    (lambda: optim.Adam(lr=float("nan")), "lr"), (lambda: optim.Cosine(0.1, 0), "total_steps"),
])
def test_bad_hyperparameters_are_rejected(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_hyperparameters_are_a_frozen_dataclass_changed_through_replace(backend):
    """opt.hp holds them; reading opt.momentum works, assigning it is refused with the way to change it, and
    replace() checks the new values and takes effect at the next step, slots following (momentum on)."""
    opt = optim.SGD(lr=0.1)
    assert opt.hp == optim.SGD.Hyper() and opt.momentum == 0.0 and opt.slot_names == ()
    with pytest.raises(AttributeError, match=r"opt.replace\(momentum=0.9\)"):
        opt.momentum = 0.9
    with pytest.raises(ValueError, match="momentum must be"):
        opt.replace(momentum=1.5)
    rng = np.random.default_rng(3)
    p0, g = rng.standard_normal(6), rng.standard_normal(6)
    p = backend.asarray(p0.copy())
    opt.step([p], [backend.asarray(g)], backend)
    opt.replace(momentum=0.9)
    assert opt.slot_names == ("momentum",)
    opt.step([p], [backend.asarray(g)], backend)  # a new zero buffer: 0.9 * 0 + g
    np.testing.assert_allclose(backend.to_numpy(p), p0 - 0.1 * g - 0.1 * g, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(opt.state.slots["momentum"][0]), g, rtol=1e-12)


def test_checkpoints_rebuild_optimizers_from_their_hyperparameters():
    for opt in (optim.AdamW(lr=3e-4, betas=(0.8, 0.99), weight_decay=0.05), optim.SGD(momentum=0.5, nesterov=True),
                optim.RMSProp(alpha=0.9, momentum=0.1)):
        back = type(opt).from_hyperparameters(opt.schedule, opt.hyperparameters())
        assert back.hp == opt.hp and type(back) is type(opt) and back.lr == opt.lr
    # JSON gives a list for a tuple: the dataclass's check makes it a pair again
    assert optim.Adam.from_hyperparameters(1e-3, {"betas": [0.5, 0.9]}).hp.betas == (0.5, 0.9)
    assert optim.AdamW().decoupled and not optim.Adam().decoupled


def test_a_subclass_with_its_own_update_leaves_the_fused_one(backend):
    """Adam's fused kernels must not run for a subclass that rewrites the update (here: no bias correction)."""
    class NoBiasAdam(optim.Adam):
        def update(self, xp, p, g, slots, lr, step):
            m, v = slots["m"], slots["v"]
            beta1, beta2 = self.hp.betas
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * (g * g)
            p -= lr * m / (xp.sqrt(v) + self.hp.eps)

    assert optim.Adam.fused == "adam" and optim.AdamW.fused == "adam" and NoBiasAdam.fused is None
    p0, g = np.full(4, 1.0), np.full(4, 0.5)
    p = backend.asarray(p0.copy())
    NoBiasAdam(lr=0.1).step([p], [backend.asarray(g)], backend)
    m, v = 0.1 * g, 0.001 * g * g
    np.testing.assert_allclose(backend.to_numpy(p), p0 - 0.1 * m / (np.sqrt(v) + 1e-8), rtol=1e-12)
