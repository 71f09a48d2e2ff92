"""Every CUDA kernel instantiation, run by fastbp's CPU emulator of CUDA, against NumPy references.

Each launch runs three times, with the threads (and blocks) in forward, reverse and random order, and the
three results must be the same bits: a missing __syncthreads or a race inside a block shows up as a
difference, a barrier or shuffle that not every thread reaches as an EmulatorError. Outputs start as NaN,
so an element a kernel forgets to write fails the comparison. Sizes are ragged (1, 31, 33, 255, 257 and a
few thousand) and each kernel runs under several grid and block shapes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import EMULATOR_MISSING, assert_close
from reference import ACT, DACT

from fastbp import optim
from fastbp.activations import ACTIVATIONS, CODES
from fastbp.backends import cuda_sources
from fastbp.backends.base import Backend
from fastbp.backends.update_args import update_args
from fastbp.losses import LOSS_CODES
from fastbp.testing import cuda_emulator

pytestmark = [pytest.mark.emulator, pytest.mark.skipif(
    bool(EMULATOR_MISSING), reason=f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")]

NAMES = {code: name for name, code in CODES.items()}
CTYPES = {"float": np.float32, "double": np.float64, "f16": np.float16}
try:
    import ml_dtypes

    CTYPES["bf16"] = ml_dtypes.bfloat16
except ImportError:  # bf16 instantiations then fail their lookup below, naming what is missing
    pass
HALF = tuple(t for name, t in CTYPES.items() if name in ("bf16", "f16"))


def finfo(dtype):
    return ml_dtypes.finfo(dtype) if "bf16" in CTYPES else np.finfo(dtype)
SIZES = (1, 31, 33, 255, 257, 3000)
ORDERS = ("forward", "reverse", "random")
REFERENCE = Backend()  # the NumPy reference ops


@pytest.fixture(scope="module")
def modules():
    return {f: cuda_emulator.compile_module(cuda_sources.source(f), cuda_sources.name_expressions(f), f)
            for f in cuda_sources.FILES}


def launch(kernel, grid, block, args, outputs, shared_mem=0):
    """Run ``kernel`` in every thread order, each time on fresh copies of the arrays in ``args``; check that
    the arrays at positions ``outputs`` come out bit-identical, and return them (from the forward run)."""
    results = []
    for seed, order in enumerate(ORDERS):
        # every array copied into guarded memory: a write out of bounds raises, a read out of bounds reads NaN
        copies = {}
        run = [copies.setdefault(id(a), cuda_emulator.guarded_copy(a)) if isinstance(a, np.ndarray) else a
               for a in args]  # an array passed twice (A written over Z) stays one array
        kernel.launch(grid, block, run, shared_mem=shared_mem, order=order, seed=seed)
        results.append([run[i].copy() for i in outputs])
    for order, other in zip(ORDERS[1:], results[1:]):
        for i, (a, b) in zip(outputs, zip(results[0], other)):
            assert a.tobytes() == b.tobytes(), f"{kernel.name}: argument {i} differs between forward and {order} order"
    return results[0]


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype)


def rows_and_columns():
    """(rows, n) shapes whose sizes and sides cover SIZES."""
    return [(1, 1), (1, 31), (3, 33), (1, 255), (2, 257), (31, 33), (257, 3), (1000, 3)]


def tolerance(dtype):
    """What a kernel's result may differ from the float64 reference by: the rounding of its dtype (the
    16-bit types compute in float and round once, to within a unit in the last place, so two)."""
    if dtype in HALF:
        eps = float(finfo(dtype).eps)
        return {"rtol": 2 * eps, "atol": 2 * eps}
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-14}


# ------------------------------------------------------------------------------------------------ dense.cu
def check_forward_epilogue(kernel, dtype, act):
    name = NAMES[act]
    keeps_output = ACTIVATIONS[name].keeps == "output"
    rng = np.random.default_rng(act)
    for rows, n in rows_and_columns():
        Z0 = rng.standard_normal((rows, n)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        total = rows * n
        z = Z0.astype(np.float64) + b
        args = (Z0, b, Z0 if keeps_output else poisoned((rows, n), dtype), np.int64(total), np.int32(n))
        for grid, block in [(1, 32), (3, 64), (-(-total // 256), 256)]:
            Z, A = launch(kernel, grid, block, args, [0, 2])
            assert_close(A, ACT[name](z), dtype, **tolerance(dtype), err_msg=f"{kernel.name} {rows}x{n} {grid}x{block}")
            if not keeps_output:  # g' reads z: the pre-activation is kept in Z
                assert_close(Z, z, dtype, **tolerance(dtype))


def check_backward_epilogue(kernel, dtype, act):
    name = NAMES[act]
    acc = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(10 + act)
    for rows, n in rows_and_columns() + [(64, 257)]:
        z = rng.standard_normal((rows, n)).astype(dtype)
        S = ACT[name](z.astype(np.float64)).astype(dtype) if ACTIVATIONS[name].keeps == "output" else z
        delta0 = rng.standard_normal((rows, n)).astype(dtype)
        want = delta0.astype(np.float64) * DACT[name](z.astype(np.float64))
        col_tiles = -(-n // 32)
        for rows_per_slab in sorted({1, 8, 13, rows}):
            slabs = -(-rows // rows_per_slab)

            args = (delta0, S, poisoned((slabs, n), acc), np.int32(rows), np.int32(n), np.int32(rows_per_slab))
            delta, partial = launch(kernel, (col_tiles, slabs), (32, 8), args, [0, 2])
            assert_close(delta, want, dtype, **tolerance(dtype), err_msg=f"{kernel.name} {rows}x{n}")
            slab_sums = np.add.reduceat(delta.astype(np.float64), np.arange(0, rows, rows_per_slab), axis=0)
            assert_close(partial, slab_sums, dtype, rtol=tolerance(dtype)["rtol"], atol=10 * tolerance(dtype)["atol"])


def check_sum_partials(kernel, dtype):
    acc = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(3)
    for slabs, n in [(1, 1), (7, 31), (33, 33), (2, 255), (5, 257), (3, 3000)]:
        partial = rng.standard_normal((slabs, n)).astype(acc)
        for grid, block in [(1, 32), (2, 64), (-(-n // 256), 256)]:
            (db,) = launch(kernel, grid, block, (partial, poisoned(n, dtype), np.int32(slabs), np.int32(n)), [1])
            assert_close(db, partial.astype(np.float64).sum(0), dtype, **tolerance(dtype))


# ------------------------------------------------------------------------------------------------ loss.cu
def loss_shapes():
    return [(1, 1), (31, 10), (33, 33), (5, 70), (257, 3), (1, 257)]


def check_softmax_ce(kernel, dtype):
    acc = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(4)
    for rows, C in loss_shapes():
        Z = (3 * rng.standard_normal((rows, C))).astype(dtype)
        if C > 2:  # ties: the first maximum is the prediction, as NumPy's argmax
            Z[::3, C - 1] = Z[::3, 1] = Z[::3].max(1)
        labels = rng.integers(0, C, rows).astype(np.int64)
        labels[::3] = 1 if C > 2 else labels[::3]
        probs = rng.random((rows, C))
        probs = (probs / probs.sum(1, keepdims=True)).astype(dtype)
        z = Z.astype(np.float64)
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        for soft in (0, 1):
            if soft:
                want_loss = (probs * (lse[:, None] - z)).sum(1)
                target = probs.astype(np.float64)
            else:
                want_loss = lse - z[np.arange(rows), labels]
                target = np.eye(C)[labels]
            p = np.exp(z - lse[:, None])
            want_delta = (p * target.sum(1, keepdims=True) - target) / rows
            want_correct = (Z.argmax(1) == (probs.argmax(1) if soft else labels)).astype(acc)
            for threads in (32, 64, 256):
                blocks = -(-rows * 32 // threads)

                args = (Z, None if soft else labels, probs if soft else None, poisoned((rows, C), dtype),
                        poisoned(2 * rows, acc), np.int32(rows), np.int32(C), np.int32(soft))
                delta, row_stats = launch(kernel, blocks, threads, args, [3, 4])
                assert_close(delta, want_delta, dtype, **tolerance(dtype), err_msg=f"{rows}x{C} soft={soft}")
                assert_close(row_stats[:rows], want_loss, dtype, **tolerance(dtype))
                np.testing.assert_array_equal(row_stats[rows:], want_correct)
        # labels outside [0, C) are never used as an index: NaN loss and delta for their rows alone
        bad = labels.copy()
        bad[0], bad[-1] = -1, C
        args = (Z, bad, None, poisoned((rows, C), dtype), poisoned(2 * rows, acc), np.int32(rows), np.int32(C),
                np.int32(0))
        delta, row_stats = launch(kernel, -(-rows * 32 // 64), 64, args, [3, 4])
        invalid = (bad < 0) | (bad >= C)
        assert np.isnan(delta[invalid]).all() and np.isnan(row_stats[:rows][invalid]).all()
        assert np.isfinite(delta[~invalid]).all() and np.isfinite(row_stats[:rows][~invalid]).all()
        np.testing.assert_array_equal(row_stats[rows:][invalid], 0)


def check_pointwise_loss(kernel, dtype, code):
    acc = np.float64 if dtype == np.float64 else np.float32
    bce = code == LOSS_CODES["binary_cross_entropy"]
    assert bce or code == LOSS_CODES["mse"], code
    rng = np.random.default_rng(5 + code)
    for rows, C in loss_shapes():
        Z = (3 * rng.standard_normal((rows, C))).astype(dtype)
        Y = (rng.integers(0, 2, (rows, C)) if bce else rng.standard_normal((rows, C))).astype(dtype)
        z, y = Z.astype(np.float64), Y.astype(np.float64)
        if bce:  # binary cross-entropy with logits
            elementwise = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
            grad = 1 / (1 + np.exp(-z)) - y
        else:  # squared error
            elementwise = (z - y) ** 2
            grad = 2 * (z - y)
        want_correct = ((Z > 0) == (Y > 0.5)).sum(1) if bce else np.zeros(rows)
        for threads in (32, 128, 256):
            blocks = -(-rows * 32 // threads)
            args = (Z, Y, poisoned((rows, C), dtype), poisoned(2 * rows, acc), np.int32(rows), np.int32(C))
            delta, row_stats = launch(kernel, blocks, threads, args, [2, 3])
            assert_close(delta, grad / (rows * C), dtype, **tolerance(dtype))
            assert_close(row_stats[:rows], elementwise.sum(1), dtype, **tolerance(dtype))
            np.testing.assert_array_equal(row_stats[rows:], want_correct.astype(acc))


def check_reduce_loss(kernel, acc):
    rng = np.random.default_rng(12)
    for rows in SIZES:
        row_stats = np.concatenate([rng.standard_normal(rows), rng.integers(0, 3, rows)]).astype(acc)
        for block in (32, 256, 1024):
            (out,) = launch(kernel, 1, block, (row_stats, np.int32(rows), acc(0.25), poisoned(2, acc)), [3])
            assert_close(out[0], 0.25 * row_stats[:rows].astype(np.float64).sum(), np.dtype(acc).name,
                         **tolerance(acc))
            assert out[1] == row_stats[rows:].sum()


def check_check_batch(kernel, dtype, kind):
    """The device-side batch check's first stage counts exactly what the host checks refuse, each block its
    grid-stride share, whatever the grid."""
    rng = np.random.default_rng(13 + kind)
    C = 5
    for rows in (1, 33, 300):
        X = rng.standard_normal((rows, 7)).astype(dtype)
        if kind == 0:
            y = rng.integers(0, C, rows).astype(np.int64)
        else:
            y = (rng.random((rows, C)) if kind == 2 else rng.standard_normal((rows, C))).astype(dtype)
        for n_bad_x, n_bad_y in ((0, 0), (1, 0), (0, 1), (3, 2)):
            Xb, yb = X.copy(), y.copy()
            Xb.flat[rng.choice(X.size, n_bad_x, replace=False)] = [np.nan, np.inf, -np.inf][:n_bad_x] or []
            spots = rng.choice(y.size, min(n_bad_y, y.size), replace=False)
            bad_values = {0: [C, -1], 1: [np.nan, -np.inf], 2: [1.5, np.nan]}[kind]
            yb.flat[spots] = bad_values[:len(spots)]
            count = n_bad_x + len(spots)
            labels = yb if kind == 0 else np.zeros(0, np.int64)
            targets = Xb if kind == 0 else yb
            for grid, block in ((1, 32), (1, 256), (3, 64), (7, 256)):
                args = (Xb, np.int64(Xb.size), labels, targets, np.int64(yb.size), np.int32(C),
                        poisoned(grid, np.float64))
                (partial,) = launch(kernel, grid, block, args, [6])
                assert partial.sum() == count, f"{rows} rows, grid {grid} x {block}"
                # each block counted its own share: the elements i with i // block % grid == its index
                share = [sum(1 for i in range(Xb.size) if not np.isfinite(Xb.flat[i]) and i // block % grid == b)
                         for b in range(grid)]
                if not len(spots):
                    np.testing.assert_array_equal(partial, np.array(share, np.float64))


def check_check_batch_finish(kernel, acc, kind):
    """The second stage trips the guard with [2, step, count, kind] when the partial counts add up to more
    than zero, unless it is tripped already."""
    for blocks in (1, 5, 1500):
        for count in (0, 1, 7):
            partial = np.zeros(blocks, acc)
            partial[0] += min(count, 1)  # spread over the first and last blocks
            partial[-1] += count - min(count, 1)
            for block in (32, 1024):
                (guard,) = launch(kernel, 1, block, (partial, np.int64(blocks), np.zeros(4), np.int64(5)), [2])
                want = [2, 5, count, kind] if count else [0, 0, 0, 0]
                np.testing.assert_array_equal(guard, np.array(want, np.float64), err_msg=f"{blocks} blocks")
            first = np.array([1.0, 3, np.nan, 2.0])  # tripped already: the first record stays
            (guard,) = launch(kernel, 1, 256, (partial, np.int64(blocks), first, np.int64(5)), [2])
            np.testing.assert_array_equal(guard, first)


def check_ordered_sum(kernel, acc):
    rng = np.random.default_rng(6)
    for n in SIZES:
        values = rng.standard_normal(n).astype(acc)
        for block in (32, 256, 1024):  # block_sum takes any power of two up to 1024
            (out,) = launch(kernel, 1, block, (values, np.int64(n), acc(0.5), poisoned(1, acc)), [3])
            assert_close(out[0], 0.5 * values.astype(np.float64).sum(), np.dtype(acc).name,
                         **tolerance(acc))


# ------------------------------------------------------------------------------------------------ optim.cu
def update_configs(n):
    """Launch shapes for the grid-stride kernels: one small block, a few, and one thread per element."""
    return [(1, 32), (3, 64), (-(-n // 256), 256)]


def check_update(kernel, args, state, want, guard):
    """An optimizer kernel: the arrays at positions ``state`` come out equal to ``want`` (the NumPy
    reference's update, bit for bit) under every launch shape, and unchanged once the guard at position
    ``guard`` is tripped. The update's structure is the argument before the guard's, by value, with a null
    pointer before it (``at``); the same update with the structure in memory at ``at`` and a zeroed one by
    value (what a CUDA graph's replay passes) must come out the same."""
    n = args[state[0]].size
    record = args[guard - 2]
    in_memory = list(args)
    in_memory[guard - 2] = np.zeros(1, record.dtype)[0]
    in_memory[guard - 1] = np.array([record]).view(np.float64)
    for grid, block in update_configs(n):
        for way, each in (("by value", args), ("in memory", tuple(in_memory))):
            got = launch(kernel, grid, block, each, state)
            for i, g, w in zip(state, got, want):
                assert_same(g, w, err_msg=f"{kernel.name} argument {i}, n={n}, {grid}x{block}, structure {way}")
    tripped = list(args)
    tripped[guard] = np.array([1.0, 0, 0, 0])
    for i, g in zip(state, launch(kernel, 2, 64, tuple(tripped), state)):
        assert_same(g, args[i])


def assert_same(a, b, err_msg=""):
    """Equal arrays (NaN where NaN); 16-bit ones bit for bit (NumPy's testing does not know bfloat16's NaN)."""
    if a.dtype in HALF:
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16), err_msg=err_msg)
    else:
        np.testing.assert_array_equal(a, b, err_msg=err_msg)


def update_operands(dtype, gdtype, n, rng):
    """(p, g, copy, unscale, the gradient the reference update takes) of an update: the gradient in
    ``gdtype``; in mixed precision (16 bits) ``copy`` is a poisoned array the kernel writes the updated
    parameters into, rounded, and the gradient comes scaled by 8 (loss scaling), ``unscale`` = [1/8]; else
    both are None."""
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(gdtype)
    if gdtype == dtype:
        return p, g, None, None, g
    unscale = np.array([0.125], np.float32)
    return p, g, poisoned(n, gdtype), unscale, g.astype(dtype) * dtype(0.125)


def with_copy(state, want, copy_at, copy, gdtype):
    """The positions and values an update must produce, with the 16-bit copy of the parameters (want[0])."""
    if copy is None:
        return state, want
    return state + [copy_at], want + [want[0].astype(gdtype)]


def check_sgd(kernel, dtype, gdtype):
    lr, momentum, wd = 0.05, 0.9, 1e-3
    rng = np.random.default_rng(7)
    for nesterov, first, dampening in [(0, 1, 0.0), (0, 0, 0.1), (1, 0, 0.0)]:
        for n in SIZES:
            p, g, copy, unscale, g_ref = update_operands(dtype, gdtype, n, rng)
            buf = rng.standard_normal(n).astype(dtype)
            want = [p.copy(), buf.copy()]
            opt = optim.SGD(lr, momentum=momentum, dampening=dampening, nesterov=bool(nesterov), weight_decay=wd)
            step = 1 if first else 2
            opt.prepare([want[0]], REFERENCE)  # binds the backend that lends update() its scratch
            opt.update(np, want[0], g_ref, {"momentum": want[1]}, lr, step)
            args = (p, g, buf, np.int64(n), update_args("sgd", lr, step, opt.hp)[0], None, np.zeros(4), copy,
                    unscale)
            check_update(kernel, args, *with_copy([0, 2], want, 7, copy, gdtype), guard=6)


def check_adam(kernel, dtype, gdtype):
    lr, b1, b2, eps, step = 1e-3, 0.9, 0.999, 1e-8, 7
    rng = np.random.default_rng(8)
    for wd, decoupled in [(0.0, 0), (1e-2, 0), (1e-2, 1)]:
        for n in SIZES:
            p, g, copy, unscale, g_ref = update_operands(dtype, gdtype, n, rng)
            m = rng.standard_normal(n).astype(dtype)
            v = rng.random(n).astype(dtype)
            want = [p.copy(), m.copy(), v.copy()]
            opt = (optim.AdamW if decoupled else optim.Adam)(lr, betas=(b1, b2), eps=eps, weight_decay=wd)
            opt.prepare([want[0]], REFERENCE)
            opt.update(np, want[0], g_ref, {"m": want[1], "v": want[2]}, lr, step)
            args = (p, g, m, v, np.int64(n), update_args("adam", lr, step, opt.hp)[0], None, np.zeros(4), copy,
                    unscale)
            check_update(kernel, args, *with_copy([0, 2, 3], want, 8, copy, gdtype), guard=7)


def check_rmsprop(kernel, dtype, gdtype):
    lr, alpha, eps = 1e-2, 0.99, 1e-8
    rng = np.random.default_rng(9)
    for momentum, wd in [(0.0, 0.0), (0.9, 1e-3)]:
        for n in SIZES:
            p, g, copy, unscale, g_ref = update_operands(dtype, gdtype, n, rng)
            buf = rng.standard_normal(n).astype(dtype)
            sq = rng.random(n).astype(dtype)
            want = [p.copy(), sq.copy(), buf.copy()]
            opt = optim.RMSProp(lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=wd)
            opt.prepare([want[0]], REFERENCE)
            opt.update(np, want[0], g_ref, {"square_avg": want[1], "momentum": want[2]}, lr, 1)
            args = (p, g, sq, buf, np.int64(n), update_args("rmsprop", lr, 1, opt.hp)[0], None, np.zeros(4),
                    copy, unscale)
            state, expect = ([0, 2, 3], want) if momentum else ([0, 2], want[:2])
            check_update(kernel, args, *with_copy(state, expect, 8, copy, gdtype), guard=7)


@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_16_bit_conversions_round_as_numpy_and_ml_dtypes(modules, half):
    """Every 16-bit pattern loads to the float NumPy (ml_dtypes) reads it as, and float32 values of every
    kind store as NumPy rounds them (ties to even, subnormals, overflow to infinity, NaN): through sgd with
    a plain step, p = p - 1 * g gives -load(g) from p = 0, and lr = 0 keeps p, whose copy is store(p)."""
    dtype = CTYPES.get(half)
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    kernel = modules["optim.cu"].get_function(f"sgd<float, {half}>")
    plain = optim.SGD(1.0).hp
    every = np.arange(2**16, dtype=np.uint16).view(dtype)
    args = (np.zeros(every.size, np.float32), every, np.zeros(1, np.float32), np.int64(every.size),
            update_args("sgd", 1.0, 1, plain)[0], None, np.zeros(4), poisoned(every.size, dtype), None)
    (p,) = launch(kernel, 64, 256, args, [0])
    with np.errstate(invalid="ignore"):
        want = np.float32(0) - every.astype(np.float32)  # as the kernel subtracts: 0 - (+0) is +0
    np.testing.assert_array_equal(p.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(p[np.isnan(want)]).all()
    rng = np.random.default_rng(14)
    info = finfo(dtype)
    with np.errstate(all="ignore"):
        values, want = conversion_cases(every, info, rng, dtype)
    args = (values, np.zeros(values.size, dtype), np.zeros(1, np.float32), np.int64(values.size),
            update_args("sgd", 0.0, 1, plain)[0], None, np.zeros(4), poisoned(values.size, dtype), None)
    (copy,) = launch(kernel, 64, 256, args, [7])
    finite = ~np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(copy.view(np.uint16)[finite], want.view(np.uint16)[finite])
    assert np.isnan(copy.astype(np.float32)[~finite]).all()


def conversion_cases(every, info, rng, dtype):
    """float32 values of every kind, and what NumPy (ml_dtypes) rounds them to in ``dtype``."""
    values = np.concatenate([
        rng.standard_normal(4000), rng.standard_normal(2000) * float(info.max) / 2,  # overflow too
        rng.standard_normal(2000) * float(info.smallest_subnormal) * 8,  # subnormals and underflow
        every.astype(np.float32).astype(np.float64) * (1 + 2.0 ** -(info.nmant + 1)),  # ties
        [0.0, -0.0, np.inf, -np.inf, np.nan, float(info.max), 65519.99, 65520.0],
    ]).astype(np.float32)
    return values, values.astype(dtype)


def check_sumsq_partial(kernel, dtype):
    acc = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(8)
    for n in SIZES:
        x = rng.standard_normal(n).astype(dtype)
        for grid, block in [(1, 32), (7, 128), (19, 256)]:
            (partial,) = launch(kernel, grid, block, (x, np.int64(n), poisoned(grid, acc)), [2])
            owner = (np.arange(n) // block) % grid  # the block whose grid-stride loop reads element i
            want = np.bincount(owner, weights=x.astype(np.float64) ** 2, minlength=grid)
            assert_close(partial, want, dtype, **tolerance(dtype))


def check_nonfinite_guard(kernel, dtype):
    cases = [(1.5, 4.0, [0, 0, 0, 0]), (np.nan, 4.0, [1, 7, np.nan, 4.0]), (1.5, np.inf, [1, 7, 1.5, np.inf]),
             (-np.inf, np.nan, [1, 7, -np.inf, np.nan])]
    for loss, sumsq, want in cases:
        for grid, block in [(1, 1), (2, 64)]:  # thread 0 of block 0 alone acts
            # the step number by value, or in memory (step_at, a CUDA graph's replay) over a wrong one
            for step, step_at in ((np.int64(7), None), (np.int64(-1), np.array([7], np.int64))):
                args = (np.array([loss], dtype), np.array([sumsq], dtype), np.zeros(4), step, step_at)
                (guard,) = launch(kernel, grid, block, args, [2])
                np.testing.assert_array_equal(guard, np.array(want, np.float64))
    # a tripped guard keeps the first record
    first = np.array([1.0, 3, np.nan, 2.0])
    (guard,) = launch(kernel, 1, 1, (np.array([np.inf], dtype), np.array([1.0], dtype), first, np.int64(9), None),
                      [2])
    np.testing.assert_array_equal(guard, first)


def check_clip_by_norm(kernel, dtype):
    rng = np.random.default_rng(11)
    for n in SIZES:
        x = rng.standard_normal(n).astype(dtype)
        compute = np.float32 if dtype in HALF else dtype  # what the kernel multiplies in
        sumsq = np.array([float(np.sum(x.astype(np.float64) ** 2))], np.float64 if dtype == np.float64 else np.float32)
        for max_norm in (0.5, 1e9):
            coef = max_norm / (math.sqrt(float(sumsq[0])) + 1e-6)
            want = (x.astype(compute) * compute(coef)).astype(dtype) if coef < 1 else x
            for grid, block in update_configs(n):
                (out,) = launch(kernel, grid, block, (x, np.int64(n), sumsq, max_norm, np.zeros(4)), [0])
                np.testing.assert_array_equal(out, want)
        (out,) = launch(kernel, 2, 64, (x, np.int64(n), sumsq, 0.5, np.ones(4)), [0])
        np.testing.assert_array_equal(out, x)  # guard tripped: untouched


def check_scale_by(kernel, dtype):
    """x *= scale (a power of two) in the 16-bit type: exact, but where it overflows to infinity."""
    rng = np.random.default_rng(15)
    for n in SIZES:
        x = rng.standard_normal(n).astype(dtype)
        for scale in (2.0**-3, 1.0, 2.0**10):
            state = np.array([scale, 0, 0, 0, 0], np.float32)
            for grid, block in update_configs(n):
                (out,) = launch(kernel, grid, block, (x, np.int64(n), state), [0])
                with np.errstate(over="ignore"):
                    want = (x.astype(np.float32) * np.float32(scale)).astype(dtype)
                assert_same(out, want)


def check_loss_scale_update(kernel, acc):
    """One step of dynamic loss scaling: [scale, 1/scale used, unscaled sum of squares, steps since the
    scale changed, overflow steps]; the update gate closes on an overflow or a tripped guard."""
    def step(state, sumsq, guard=(0.0, 0, 0, 0), interval=3):
        args = (np.array([sumsq], acc), np.array(state, acc), np.array(guard), np.full(4, np.nan), acc(2.0),
                acc(0.5), np.int64(interval))
        return launch(kernel, 1, 1, args, [1, 3])

    state, gate = step([8.0, 0, 0, 0, 0], 128.0)  # finite: the norm unscaled, the count on
    np.testing.assert_array_equal(state, [8.0, 0.125, 2.0, 1, 0])
    assert gate[0] == 0
    state, gate = step([8.0, 0, 0, 2, 0], 64.0)  # the interval reached: the scale doubles
    np.testing.assert_array_equal(state, [16.0, 0.125, 1.0, 0, 0])
    assert gate[0] == 0
    state, gate = step([8.0, 0, 0, 2, 4], np.inf)  # an overflow: halve, skip, count it
    np.testing.assert_array_equal(state[[0, 1, 3, 4]], [4.0, 0.125, 0, 5])
    assert gate[0] == 1
    state, gate = step([8.0, 0, 0, 1, 0], 64.0, guard=(1.0, 3, np.nan, 1))  # diverged: gated, scale kept
    np.testing.assert_array_equal(state[[0, 3, 4]], [8.0, 1, 0])
    assert gate[0] == 1


# ------------------------------------------------------------------------------------------------ mlp.cu
def mlp_reference(X, y, flat, sizes, name, rnd=lambda v: v):
    """The fused pass's results in float64: the output, each row's loss and whether its first maximum is
    its label, and the mean loss's gradient laid out as the flat parameters (W then b per layer). ``rnd``
    rounds where the kernel stores (for 16-bit data): each product, each Z, A and delta."""
    layers, rows, at = len(sizes) - 1, X.shape[0], np.arange(X.shape[0])
    params, o = [], 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        params.append((flat[o:o + a * b].reshape(a, b), flat[o + a * b:o + (a + 1) * b]))
        o += (a + 1) * b
    acts, zs = [X], []
    for l, (W, b) in enumerate(params):
        zs.append(rnd(rnd(acts[-1] @ W) + b))
        acts.append(rnd(ACT[name](zs[-1])) if l < layers - 1 else zs[-1])
    z = acts[-1]
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    delta = e / s
    delta[at, y] -= 1
    delta = rnd(delta / rows)
    grads = []
    for l in range(layers - 1, -1, -1):
        grads = [acts[l].T @ delta, delta.sum(axis=0)] + grads
        if l:
            delta = rnd(rnd(delta @ params[l][0].T) * DACT[name](zs[l - 1]))
    loss = (np.log(s) + m)[:, 0] - z[at, y]
    return z, loss, (z.argmax(axis=1) == y).astype(np.float64), np.concatenate([g.ravel() for g in grads])


def check_mlp_fused_pass(kernel, dtype, act):
    from fastbp.backends.cupy_backend import mlp_shared_bytes

    name = NAMES[act]
    acc = np.float64 if dtype == np.float64 else np.float32
    keeps = ACTIVATIONS[name].keeps == "preactivation"
    half = dtype in HALF
    # 16 bits: the reference rounds where the kernel stores; a rounding that falls the other way (sums in
    # another order) carries a unit of the last place (2**-8 in bfloat16) into the next layers
    tol = {"rtol": 2e-2, "atol": 2e-2} if half else (
        {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12})
    rnd = (lambda v: v.astype(dtype).astype(np.float64)) if half else (lambda v: v)
    rng = np.random.default_rng(20 + act)
    for sizes, rows in [([5, 7, 3], 37), ([4, 3], 10), ([6, 33, 17, 9, 12], 50), ([3, 8, 8, 8, 2], 1)]:
        n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
        flat = (0.5 * rng.standard_normal(n_params)).astype(dtype)
        X = rng.standard_normal((rows, sizes[0])).astype(dtype)
        y = rng.integers(0, sizes[-1], rows).astype(np.int64)
        want = mlp_reference(X.astype(np.float64), y, flat.astype(np.float64), sizes, name, rnd)
        # one block running every tile, or several; tiles of 8 and 32 rows; 128 threads (the backend's) or 96
        for tile, grid, block in [(8, 1, 128), (32, 1, 96), (8, 3, 128)]:
            grid = min(grid, -(-rows // tile))
            args = (X, y, flat, np.array(sizes, np.int64), np.int32(len(sizes) - 1), np.int32(rows), np.int32(tile),
                    poisoned((rows, sizes[-1]), dtype), poisoned(2 * rows, acc), poisoned((grid, n_params), acc),
                    np.int64(n_params))
            out, stats, partial = launch(kernel, grid, block, args, [7, 8, 9],
                                         shared_mem=mlp_shared_bytes(sizes, dtype, tile, keeps))
            where = f"{kernel.name} {sizes} x {rows} rows, tiles of {tile}, {grid} x {block}"
            for got, ref in ((out, want[0]), (stats[:rows], want[1])):
                assert_close(got, ref, dtype, rtol=tol["rtol"], atol=tol["atol"] * np.abs(ref).max(), err_msg=where)
            top2 = np.sort(want[0], axis=1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] > 0.1 if half else np.ones(rows, bool)  # no near-ties in 16 bits
            np.testing.assert_array_equal(stats[rows:][clear], want[2][clear], err_msg=where)
            grad = partial.astype(np.float64).sum(axis=0)
            scale = np.abs(want[3]).max()
            assert_close(grad, want[3], dtype, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=where)
    # a label outside [0, C): its row's loss is NaN (and so is every gradient), the others are computed
    sizes, rows = [4, 6, 3], 5
    n_params = 5 * 6 + 7 * 3
    y = np.array([0, 1, 3, 2, 1], np.int64)
    args = (rng.standard_normal((rows, 4)).astype(dtype), y, rng.standard_normal(n_params).astype(dtype),
            np.array(sizes, np.int64), np.int32(2), np.int32(rows), np.int32(8), poisoned((rows, 3), dtype),
            poisoned(2 * rows, acc), poisoned((1, n_params), acc), np.int64(n_params))
    stats, partial = launch(kernel, 1, 128, args, [8, 9], shared_mem=mlp_shared_bytes(sizes, dtype, 8, keeps))
    assert np.isnan(stats[2]) and stats[7] == 0 and np.isfinite(stats[[0, 1, 3, 4]]).all()
    assert np.isnan(partial).any()


CHECKS = {
    "mlp_fused_pass": check_mlp_fused_pass,
    "forward_epilogue": check_forward_epilogue, "backward_epilogue": check_backward_epilogue,
    "sum_partials": check_sum_partials,
    "softmax_ce": check_softmax_ce, "pointwise_loss": check_pointwise_loss, "ordered_sum": check_ordered_sum,
    "reduce_loss": check_reduce_loss, "check_batch": check_check_batch,
    "check_batch_finish": check_check_batch_finish,
    "sgd": check_sgd, "adam": check_adam, "rmsprop": check_rmsprop, "sumsq_partial": check_sumsq_partial,
    "nonfinite_guard": check_nonfinite_guard, "clip_by_norm": check_clip_by_norm,
    "scale_by": check_scale_by, "loss_scale_update": check_loss_scale_update,
}

INSTANTIATIONS = [(f, name) for f in cuda_sources.FILES for name in cuda_sources.name_expressions(f)]


@pytest.mark.parametrize("file,name", INSTANTIATIONS, ids=[n for _, n in INSTANTIATIONS])
def test_kernel_instantiation_matches_the_numpy_reference(modules, file, name):
    base, _, rest = name.partition("<")
    template_args = [a.strip() for a in rest.rstrip(">").split(",")]
    kernel = modules[file].get_function(name)
    check = CHECKS.get(base)
    assert check is not None, f"no emulated test for the kernel {base} (add a check_{base} here)"
    assert template_args[0] in CTYPES, f"{template_args[0]}: its NumPy dtype is missing (ml_dtypes for bf16)"
    dtype = CTYPES[template_args[0]]
    extra = [CTYPES[a] if a in CTYPES else int(a) for a in template_args[1:]]
    check(kernel, dtype, *extra)
