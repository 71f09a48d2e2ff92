"""Numba kernels of the numba backend: each op is one compiled call that runs its GEMMs through BLAS
(``np.dot`` with ``out``, which Numba routes to SciPy's OpenBLAS) and does everything else in one fused
pass over the GEMM output.

The passes run on the calling thread. BLAS's own threads are then the only pool that works, so the
two never oversubscribe the cores, and every result is the same bit for bit from run to run.
Sums (bias gradients, losses) accumulate in float64 whatever the dtype.

Activation codes are ints (``CODES``). Fused loops exist for the piecewise-linear activations (identity,
relu, leaky_relu): each has its own loop, so LLVM vectorizes it, and g' is read from the output A, which
the forward pass writes over Z. Numba's scalar exp and tanh run far slower than NumPy's SIMD ufuncs, so
the backend leaves sigmoid, tanh, gelu and silu to the inherited ufunc ops (``FUSED`` lists the codes
these kernels take).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit as _njit

from ..activations import CODES

# error_model="numpy": no zero-division checks, so loops vectorize.
njit = functools.partial(_njit, cache=True, error_model="numpy")

IDENTITY, RELU, LEAKY_RELU = CODES["identity"], CODES["relu"], CODES["leaky_relu"]
FUSED = (IDENTITY, RELU, LEAKY_RELU)
CE_LABELS, CE_SOFT, BCE, MSE = range(4)

_SLOPE = 0.01


# ----------------------------------------------------------------------------------- fused passes
@njit
def bias_act(Z, b, code):
    """Z = g(Z + b) in place, one pass (codes in FUSED)."""
    B, n = Z.shape
    if code == RELU:
        for i in range(B):
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z if z > 0 else 0
    elif code == LEAKY_RELU:
        for i in range(B):
            for j in range(n):
                z = Z[i, j] + b[j]
                Z[i, j] = z if z > 0 else z * _SLOPE
    else:
        for i in range(B):
            for j in range(n):
                Z[i, j] += b[j]


@njit
def dact_colsum(delta, A, code, db):
    """eq. (2)'s elementwise part with eq. (4): delta *= g'(z), read from A, and db = column sums of
    delta, in one pass (codes in FUSED; IDENTITY gives the column sums alone)."""
    B, n = delta.shape
    acc = np.zeros(n)
    if code == RELU:
        for i in range(B):
            for j in range(n):
                d = delta[i, j] if A[i, j] > 0 else 0
                delta[i, j] = d
                acc[j] += d
    elif code == LEAKY_RELU:
        for i in range(B):
            for j in range(n):
                d = delta[i, j] if A[i, j] > 0 else delta[i, j] * _SLOPE
                delta[i, j] = d
                acc[j] += d
    else:
        for i in range(B):
            for j in range(n):
                acc[j] += delta[i, j]
    for j in range(n):
        db[j] = acc[j]


# ----------------------------------------------------------------------------------- layer ops
@njit
def matmul(A, B, out):
    np.dot(A, B, out)


@njit
def dense_forward(X, W, b, code, Z):
    """A = g(X W + b) into Z: the GEMM (BLAS), then bias and activation in one pass."""
    np.dot(X, W, Z)
    bias_act(Z, b, code)


@njit
def dense_grads(delta, A_prev, dW, db):
    np.dot(A_prev.T, delta, dW)  # eq. (3)
    dact_colsum(delta, delta, IDENTITY, db)  # eq. (4): the column sums alone


@njit
def backprop_dense(delta_next, W_next, A, A_prev, code, delta, dW, db):
    """Eqs. (2), (3), (4): two GEMMs and one fused pass between them."""
    np.dot(delta_next, W_next.T, delta)  # eq. (2), the product
    dact_colsum(delta, A, code, db)  # eq. (2) * g'(z), and eq. (4)
    np.dot(A_prev.T, delta, dW)  # eq. (3)


# ----------------------------------------------------------------------------------- losses, eq. (1)
@njit
def output_delta(Z, y_labels, Y, loss, delta):
    """The mean loss, and delta = dC/dZ written into ``delta``, in one pass over the logits.

    loss: CE_LABELS (y_labels int64 (B,)), CE_SOFT, BCE, MSE (Y shaped like Z).
    """
    B, C = Z.shape
    total = 0.0
    if loss == CE_LABELS or loss == CE_SOFT:
        inv_b = 1.0 / B
        for i in range(B):
            m = Z[i, 0]
            for j in range(1, C):
                if Z[i, j] > m:
                    m = Z[i, j]
            s = 0.0
            for j in range(C):
                e = math.exp(Z[i, j] - m)
                delta[i, j] = e
                s += e
            lse = math.log(s) + m
            if loss == CE_LABELS:
                t = y_labels[i]
                total += lse - Z[i, t]
                r = inv_b / s
                for j in range(C):
                    delta[i, j] = delta[i, j] * r
                delta[i, t] -= inv_b
            else:
                ysum = 0.0
                for j in range(C):
                    ysum += Y[i, j]
                    total += Y[i, j] * (lse - Z[i, j])
                r = ysum / s
                for j in range(C):
                    delta[i, j] = (delta[i, j] * r - Y[i, j]) * inv_b
        return total / B
    inv_n = 1.0 / (B * C)
    if loss == BCE:
        for i in range(B):
            for j in range(C):
                z = Z[i, j]
                y = Y[i, j]
                e = math.exp(-abs(z))
                total += max(z, 0.0) - z * y + math.log1p(e)
                sg = 1.0 / (1.0 + e) if z >= 0 else e / (1.0 + e)
                delta[i, j] = (sg - y) * inv_n
        return total * inv_n
    for i in range(B):  # MSE
        for j in range(C):
            d = Z[i, j] - Y[i, j]
            total += d * d
            delta[i, j] = 2.0 * d * inv_n
    return total * inv_n


# ----------------------------------------------------------------------------------- optimizers
@njit
def sgd(p, g, buf, lr, momentum, dampening, nesterov, wd, first):
    """torch.optim.SGD on a flat vector, one pass."""
    if momentum == 0.0 and wd == 0.0:  # plain SGD: a loop without branches, so it vectorizes
        for i in range(p.size):
            p[i] -= lr * g[i]
        return
    for i in range(p.size):
        d = g[i] + wd * p[i] if wd != 0.0 else g[i]
        if momentum != 0.0:
            bi = d if first else momentum * buf[i] + (1.0 - dampening) * d
            buf[i] = bi
            d = d + momentum * bi if nesterov else bi
        p[i] -= lr * d


@njit
def adam(p, g, m, v, lr, beta1, beta2, eps, step, wd, decoupled):
    """torch.optim.Adam / AdamW on a flat vector: m, v and p together in one pass."""
    bias1 = 1.0 - beta1**step
    bias2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = lr / bias1
    shrink = 1.0 - lr * wd
    if wd == 0.0:  # the common case, without branches in the loop
        for i in range(p.size):
            d = g[i]
            mi = beta1 * m[i] + (1.0 - beta1) * d
            vi = beta2 * v[i] + (1.0 - beta2) * d * d
            m[i] = mi
            v[i] = vi
            p[i] -= step_size * mi / (math.sqrt(vi) / bias2_sqrt + eps)
        return
    for i in range(p.size):
        if decoupled:
            p[i] *= shrink
            d = g[i]
        else:
            d = g[i] + wd * p[i]
        mi = beta1 * m[i] + (1.0 - beta1) * d
        vi = beta2 * v[i] + (1.0 - beta2) * d * d
        m[i] = mi
        v[i] = vi
        p[i] -= step_size * mi / (math.sqrt(vi) / bias2_sqrt + eps)


@njit
def rmsprop(p, g, sq, buf, lr, alpha, eps, momentum, wd):
    """torch.optim.RMSprop (not centered) on a flat vector, one pass."""
    for i in range(p.size):
        d = g[i] + wd * p[i]
        si = alpha * sq[i] + (1.0 - alpha) * d * d
        sq[i] = si
        u = d / (math.sqrt(si) + eps)
        if momentum != 0.0:
            u = momentum * buf[i] + u
            buf[i] = u
        p[i] -= lr * u


# ----------------------------------------------------------------------------------- the whole step
@njit
def train_step(X, y_labels, Y, loss, flat, grad, layout, codes, ws, opt, hyper, s1, s2, step, first, clip):
    """Forward, backward and the optimizer update of one step, in one call (codes in FUSED).

    layout[l] = (offset of W_l in flat, offset of b_l, n_in, n_out). ws: one flat scratch vector holding,
    per layer, A (written over Z) then delta, each (B, n_out).
    opt: 0 SGD, 1 Adam (decoupled weight decay when hyper[5] != 0), 2 RMSProp; hyper: its hyperparameters.
    clip > 0 rescales the gradient to that global norm when it is larger (as torch's clip_grad_norm_).
    Returns (mean loss, sum of squared gradients, whether the update ran): a non-finite loss or gradient
    leaves the parameters and the optimizer state untouched. The output is left in the top layer's A.
    """
    B = X.shape[0]
    L = layout.shape[0]
    a_at = np.empty(L, np.int64)
    d_at = np.empty(L, np.int64)
    pos = 0
    for l in range(L):
        a_at[l] = pos
        d_at[l] = pos + B * layout[l, 3]
        pos += 2 * B * layout[l, 3]
    # ---- forward
    A_prev = X
    for l in range(L):
        w0, b0, n_in, n_out = layout[l, 0], layout[l, 1], layout[l, 2], layout[l, 3]
        A = ws[a_at[l]:a_at[l] + B * n_out].reshape((B, n_out))
        np.dot(A_prev, flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)), A)
        bias_act(A, flat[b0:b0 + n_out], codes[l])
        A_prev = A
    # ---- eq. (1)
    n_top = layout[L - 1, 3]
    delta = ws[d_at[L - 1]:d_at[L - 1] + B * n_top].reshape((B, n_top))
    value = output_delta(A_prev, y_labels, Y, loss, delta)
    # ---- eqs. (2)-(4), top down; each layer's delta gets g' and yields its bias gradient in one pass
    b_top = layout[L - 1, 1]
    dact_colsum(delta, delta, IDENTITY, grad[b_top:b_top + n_top])  # eq. (4), top layer
    for l in range(L - 1, -1, -1):
        w0, n_in, n_out = layout[l, 0], layout[l, 2], layout[l, 3]
        A_in = ws[a_at[l - 1]:a_at[l - 1] + B * n_in].reshape((B, n_in)) if l > 0 else X
        np.dot(A_in.T, delta, grad[w0:w0 + n_in * n_out].reshape((n_in, n_out)))  # eq. (3)
        if l > 0:
            below = ws[d_at[l - 1]:d_at[l - 1] + B * n_in].reshape((B, n_in))
            np.dot(delta, flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)).T, below)  # eq. (2)
            b0 = layout[l - 1, 1]
            dact_colsum(below, A_in, codes[l - 1], grad[b0:b0 + n_in])  # eq. (2) * g', eq. (4)
            delta = below
    sumsq = sum_of_squares(grad)
    if not (math.isfinite(value) and math.isfinite(sumsq)):
        return value, sumsq, False
    if clip > 0:
        clip_grad(grad, sumsq, clip)
    # ---- the update, over the whole flat vector
    if opt == 0:
        sgd(flat, grad, s1, hyper[0], hyper[1], hyper[2], hyper[3] != 0.0, hyper[4], first)
    elif opt == 1:
        adam(flat, grad, s1, s2, hyper[0], hyper[1], hyper[2], hyper[3], step, hyper[4], hyper[5] != 0.0)
    else:
        rmsprop(flat, grad, s1, s2, hyper[0], hyper[1], hyper[2], hyper[3], hyper[4])
    return value, sumsq, True


@njit
def sum_of_squares(g):
    """sum(g^2) of a flat vector, through BLAS (dot): a plain running sum is one long dependency chain
    that cannot vectorize and costs several times more. In float32 a norm above ~1e19 overflows to inf,
    which the divergence check then reports."""
    return np.float64(np.dot(g, g))


@njit
def clip_grad(g, sumsq, max_norm):
    """Scale g to global norm max_norm when its norm is larger: coef = max_norm / (norm + 1e-6)."""
    coef = max_norm / (math.sqrt(sumsq) + 1e-6)
    if coef < 1.0:
        for i in range(g.size):
            g[i] *= coef
