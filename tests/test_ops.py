"""Every backend op against the float64 re-derivation in reference.py (and so against each other)."""

import numpy as np
import pytest
import reference as ref
from conftest import assert_close

from fastbp.activations import ACTIVATIONS
from fastbp.losses import prepare_targets

ACTS = sorted(ACTIVATIONS)


def _data(rng, dtype, B=7, n_in=5, n_out=6):
    X = rng.standard_normal((B, n_in)).astype(dtype)
    W = rng.standard_normal((n_in, n_out)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    return X, W, b


def _gemm_tol(dtype, ref_values):
    # float32 GEMMs accumulate rounding over the inner dimension; compare relative to the largest value
    if dtype == "float32":
        return {"rtol": 1e-5, "atol": 1e-5 * float(np.max(np.abs(ref_values)))}
    return {}


@pytest.mark.parametrize("act", ACTS)
def test_dense_forward(backend, dtype, rng, act):
    X, W, b = _data(rng, dtype)
    A, Z = backend.dense_forward(backend.asarray(X), backend.asarray(W), backend.asarray(b), act)
    z_ref = X.astype(np.float64) @ W.astype(np.float64) + b
    a_ref = ref.ACT[act](z_ref)
    assert A.dtype == np.dtype(dtype)
    assert_close(A, a_ref, dtype, **_gemm_tol(dtype, z_ref))
    if ACTIVATIONS[act].keeps == "preactivation":
        assert_close(Z, z_ref, dtype, **_gemm_tol(dtype, z_ref))


@pytest.mark.parametrize("act", ACTS)
def test_dense_forward_into_buffers_reuses_them(backend, dtype, rng, act):
    X, W, b = _data(rng, dtype)
    bufs = {k: backend.empty((7, 6), dtype) for k in ("A_out", "Z_out")}
    args = (backend.asarray(X), backend.asarray(W), backend.asarray(b), act)
    A1, _ = backend.dense_forward(*args, **bufs)
    first = backend.to_numpy(A1).copy()
    A2, Z2 = backend.dense_forward(*args, **bufs)
    np.testing.assert_array_equal(backend.to_numpy(A2), first)  # same bits on a rerun
    expected_out = bufs["Z_out"] if ACTIVATIONS[act].keeps == "output" else bufs["A_out"]
    assert A2 is expected_out or A2.data == expected_out.data


@pytest.mark.parametrize("act", ACTS)
def test_backprop_dense(backend, dtype, rng, act):
    B, n_in, n, n_next = 7, 5, 6, 4
    X, W, b = _data(rng, dtype, B, n_in, n)
    W_next = rng.standard_normal((n, n_next)).astype(dtype)
    delta_next = rng.standard_normal((B, n_next)).astype(dtype)
    A, Z = backend.dense_forward(backend.asarray(X), backend.asarray(W), backend.asarray(b), act)
    delta, dW, db = backend.backprop_dense(backend.asarray(delta_next), backend.asarray(W_next), Z, A,
                                           backend.asarray(X), act)
    z_ref = X.astype(np.float64) @ W.astype(np.float64) + b
    delta_ref = (delta_next.astype(np.float64) @ W_next.T.astype(np.float64)) * ref.DACT[act](z_ref)  # eq. (2)
    dW_ref = X.T.astype(np.float64) @ delta_ref  # eq. (3)
    db_ref = delta_ref.sum(0)  # eq. (4)
    # float32: g'(z) is evaluated at a z that carries GEMM rounding; compare relative to the largest value
    tol = {"rtol": 1e-4, "atol": 1e-4 * float(np.max(np.abs(delta_ref)))} if dtype == "float32" else {"rtol": 1e-9}
    assert_close(delta, delta_ref, dtype, **tol)
    tol_w = ({"rtol": 1e-4, "atol": 1e-4 * float(np.max(np.abs(dW_ref)))} if dtype == "float32" else {"rtol": 1e-9})
    assert_close(dW, dW_ref, dtype, **tol_w)
    assert_close(db, db_ref, dtype, **tol_w)


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_output_delta(backend, dtype, rng, loss):
    B, n_out = 9, 4
    Z = (3 * rng.standard_normal((B, n_out))).astype(dtype)
    if loss == "cross_entropy":
        y = rng.integers(0, n_out, B)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, (B, n_out)).astype(float)
    else:
        y = rng.standard_normal((B, n_out))
    yp = prepare_targets(y, loss, n_out, B, np.dtype(dtype))
    value, delta = backend.output_delta(backend.asarray(Z), backend.asarray(yp), loss)
    assert_close(backend.to_float(value), ref.loss(Z, yp, loss), dtype, rtol=1e-5 if dtype == "float32" else 1e-12)
    assert_close(delta, ref.loss_grad(Z, yp, loss), dtype, rtol=1e-5 if dtype == "float32" else 1e-12,
                 atol=1e-7 if dtype == "float32" else 1e-15)
    assert_close(backend.to_float(backend.loss_value(backend.asarray(Z), backend.asarray(yp), loss)),
                 ref.loss(Z, yp, loss), dtype)


@pytest.mark.parametrize("shape", [(64, 10), (33, 32), (40, 33), (256, 2)])
def test_cross_entropy_at_batch_shapes(backend, dtype, rng, shape):
    # batches of 32 rows or more with up to 32 classes take the reference's row maxima through a
    # transposed copy (``Backend._row_max``); every shape the sums over rows as products with ones
    B, n_out = shape
    Z = (3 * rng.standard_normal(shape)).astype(dtype)
    Z[0, :] = 50.0  # a tie across a whole row
    Z[1, -1] = 1e4  # a logit only a shift by the row's maximum keeps finite, in the last column
    Z[2, :] = -1e4
    y = rng.integers(0, n_out, B)
    soft = rng.random(shape)
    soft /= soft.sum(1, keepdims=True)
    tol = {"rtol": 1e-5 if dtype == "float32" else 1e-12, "atol": 1e-7 if dtype == "float32" else 1e-15}
    for targets in (y, soft):
        yp = prepare_targets(targets, "cross_entropy", n_out, B, np.dtype(dtype))
        value, delta = backend.output_delta(backend.asarray(Z), backend.asarray(yp), "cross_entropy")
        assert_close(backend.to_float(value), ref.loss(Z, yp, "cross_entropy"), dtype, rtol=tol["rtol"])
        assert_close(delta, ref.loss_grad(Z, yp, "cross_entropy"), dtype, **tol)
        rows = backend.to_numpy(backend.row_losses(backend.asarray(Z), backend.asarray(yp), "cross_entropy"))
        assert_close(rows.mean(), ref.loss(Z, yp, "cross_entropy"), dtype, rtol=tol["rtol"])


@pytest.mark.parametrize("shape", [(7, 6), (64, 10), (32, 32), (31, 10), (64, 33), (1024, 3)])
def test_row_max_takes_either_route_to_the_same_values(shape, rng):
    from fastbp.backends import resolve_backend

    bk = resolve_backend("numpy")
    Z = rng.standard_normal(shape).astype(np.float32)
    Z[0] = -np.inf
    Z[1, 0], Z[2, -1] = np.nan, np.inf
    for _ in range(2):  # the second call reuses the transposed copy
        m = bk._row_max(Z)
        assert m.shape == (shape[0], 1)
        np.testing.assert_array_equal(m, Z.max(axis=1, keepdims=True))


def test_constants_are_read_only_and_kept(dtype):
    from fastbp.backends import resolve_backend

    bk = resolve_backend("numpy")
    ones, zeros = bk._constant(1, (5, 3), dtype), bk._constant(0, (5, 3), dtype)
    np.testing.assert_array_equal(ones, np.ones((5, 3)))
    np.testing.assert_array_equal(zeros, np.zeros((5, 3)))
    assert ones.dtype == zeros.dtype == np.dtype(dtype)
    assert bk._constant(1, (5, 3), dtype) is ones  # kept, not refilled
    assert bk._scratch("activation", (5, 3), dtype) is not zeros  # a scratch buffer of the shape is another
    with pytest.raises(ValueError, match="read-only"):
        zeros[0, 0] = 1.0


def test_cross_entropy_with_probability_targets(backend, dtype, rng):
    B, n_out = 6, 5
    Z = rng.standard_normal((B, n_out)).astype(dtype)
    y = rng.random((B, n_out))
    y /= y.sum(1, keepdims=True)
    yp = prepare_targets(y, "cross_entropy", n_out, B, np.dtype(dtype))
    value, delta = backend.output_delta(backend.asarray(Z), backend.asarray(yp), "cross_entropy")
    assert_close(backend.to_float(value), ref.loss(Z, yp, "cross_entropy"), dtype)
    assert_close(delta, ref.loss_grad(Z, yp, "cross_entropy"), dtype, atol=1e-7 if dtype == "float32" else 1e-15)
    # one-hot rows give exactly what integer labels give
    labels = rng.integers(0, n_out, B)
    onehot = np.eye(n_out)[labels].astype(dtype)
    v1, d1 = backend.output_delta(backend.asarray(Z), backend.asarray(labels), "cross_entropy")
    v2, d2 = backend.output_delta(backend.asarray(Z), backend.asarray(onehot), "cross_entropy")
    assert_close(backend.to_float(v1), backend.to_float(v2), dtype)
    assert_close(d1, backend.to_numpy(d2), dtype, atol=1e-7 if dtype == "float32" else 1e-15)


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_losses_stay_finite_at_extreme_logits(backend, dtype, loss):
    Z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [-1e4, -1e4, -1e4]], dtype=dtype)
    if loss == "cross_entropy":
        y = np.array([1, 1, 2])
    else:
        y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    yp = prepare_targets(y, loss, 3, 3, np.dtype(dtype))
    value, delta = backend.output_delta(backend.asarray(Z), backend.asarray(yp), loss)
    value = backend.to_float(value)
    delta = backend.to_numpy(delta)
    assert np.isfinite(value) and np.isfinite(delta).all()
    if loss == "cross_entropy":
        # row 0: lse = 1e4, z_y = -1e4 -> 2e4; row 1: lse = 1e4 + log 2, z_y = 1e4 -> log 2;
        # row 2: all equal -> log 3
        assert_close(value, (2e4 + np.log(2) + np.log(3)) / 3, dtype)
        assert_close(delta[0], np.array([1.0, -1.0, 0.0]) / 3, dtype)
        assert_close(delta[1], np.array([0.0, -0.5, 0.5]) / 3, dtype)
    elif loss == "binary_cross_entropy":
        # a confident right answer costs 0, a confident wrong one |z| = 1e4, z = 0 costs log 2:
        # (0,2) z=0 -> log 2; wrong: (1,2) z=1e4, y=0; (2,0) and (2,1) z=-1e4, y=1 -> 3e4
        assert_close(value, (np.log(2) + 3e4) / 9, dtype)


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy"])
def test_correct_count(backend, loss):
    Z = np.array([[2.0, 1.0, -1.0], [0.0, 3.0, -2.0], [-1.0, -2.0, 0.5]])
    if loss == "cross_entropy":
        y = np.array([0, 0, 2])  # predictions 0, 1, 2: two right
        expected = 2
    else:
        y = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
        # predictions z > 0: [1,1,0], [0,1,0] (0.0 is not > 0), [0,0,1]: 3 + 3 + 2 right
        expected = 8
    assert backend.to_float(backend.correct_count(backend.asarray(Z), backend.asarray(y), loss)) == expected
