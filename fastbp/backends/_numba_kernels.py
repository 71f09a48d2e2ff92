"""Numba kernels of the numba backend: each op is one compiled call that runs its GEMMs through BLAS
(``_numba_blas.gemm``: NumPy's OpenBLAS where found, else Numba's ``np.dot`` on SciPy's; the ``route``
argument says which) and does everything else in one fused pass over the GEMM output.

The passes run on the calling thread. BLAS's own threads are then the only pool that works, so the
two never oversubscribe the cores, and every result is the same bit for bit from run to run. The split
step (``train_step_split``) runs whole-step parts on Numba's threads instead, BLAS held to one thread.
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
from numba import prange

from ..activations import CODES
from ..losses import LOSS_CODES
from ._numba_cache import install

install()  # the disk cache goes to fastbp's cache folder, never into site-packages

from . import _numba_blas  # noqa: E402  (after install: its kernels are cached too)
from ._numba_blas import blas_threads, gemm, sumsq  # noqa: E402

_numba_blas.install()  # the names the GEMMs call NumPy's BLAS by (see _numba_blas)

# error_model="numpy": no zero-division checks, so loops vectorize.
njit = functools.partial(_njit, cache=True, error_model="numpy")

IDENTITY, RELU, LEAKY_RELU = CODES["identity"], CODES["relu"], CODES["leaky_relu"]
FUSED = (IDENTITY, RELU, LEAKY_RELU)
CE_LABELS, CE_SOFT = LOSS_CODES["cross_entropy_labels"], LOSS_CODES["cross_entropy_soft"]
BCE, MSE = LOSS_CODES["binary_cross_entropy"], LOSS_CODES["mse"]

_SLOPE = 0.01


# ----------------------------------------------------------------------------------- fused passes
@njit
def forward_epilogue(Z, b, code):
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
def backward_epilogue(delta, A, code, db):
    """eq. (2)'s elementwise part with eq. (4): delta *= g'(z), read from A, and db = column sums of
    delta, in one pass (codes in FUSED; IDENTITY gives the column sums alone).

    The loops run over row views: indexing the 2-D arrays inside the inner loop ran 1.5x slower (64x128
    float32, relu: 3.3 vs 2.2 us)."""
    B, n = delta.shape
    acc = np.zeros(n)
    zero = delta.dtype.type(0)
    if code == RELU:
        for i in range(B):
            d_row, a_row = delta[i], A[i]
            for j in range(n):
                d = d_row[j] if a_row[j] > 0 else zero
                d_row[j] = d
                acc[j] += d
    elif code == LEAKY_RELU:
        for i in range(B):
            d_row, a_row = delta[i], A[i]
            for j in range(n):
                d = d_row[j] if a_row[j] > 0 else d_row[j] * _SLOPE
                d_row[j] = d
                acc[j] += d
    else:
        for i in range(B):
            d_row = delta[i]
            for j in range(n):
                acc[j] += d_row[j]
    for j in range(n):
        db[j] = acc[j]


@njit
def count_invalid(X, labels, Y, kind, n_out):
    """Base.check_batch's count in one pass: features that are not finite, and labels outside [0, n_out)
    (kind 0), targets not finite (1) or outside [0, 1] (2). x - x is 0 for a finite x and NaN otherwise,
    a comparison the loop vectorizes."""
    bad = 0
    x = X.reshape(-1)
    for i in range(x.size):
        bad += (x[i] - x[i]) != 0
    if kind == 0:
        for i in range(labels.size):
            bad += (labels[i] < 0) | (labels[i] >= n_out)
    else:
        t = Y.reshape(-1)
        if kind == 1:
            for i in range(t.size):
                bad += (t[i] - t[i]) != 0
        else:
            for i in range(t.size):
                bad += not (t[i] >= 0 and t[i] <= 1)
    return bad


# ----------------------------------------------------------------------------------- layer ops
@njit
def matmul(A, B, out, route):
    gemm(A, B, out, route)


@njit
def dense_forward(X, W, b, code, Z, route):
    """A = g(X W + b) into Z: the GEMM (BLAS), then bias and activation in one pass."""
    gemm(X, W, Z, route)
    forward_epilogue(Z, b, code)


@njit
def dense_grads(delta, A_prev, dW, db, route):
    gemm(A_prev.T, delta, dW, route)  # eq. (3)
    backward_epilogue(delta, delta, IDENTITY, db)  # eq. (4): the column sums alone


@njit
def backprop_dense(delta_next, W_next, A, A_prev, code, delta, dW, db, route):
    """Eqs. (2), (3), (4): two GEMMs and one fused pass between them."""
    gemm(delta_next, W_next.T, delta, route)  # eq. (2), the product
    backward_epilogue(delta, A, code, db)  # eq. (2) * g'(z), and eq. (4)
    gemm(A_prev.T, delta, dW, route)  # eq. (3)


# ----------------------------------------------------------------------------------- losses, eq. (1)
@njit
def output_delta(Z, y_labels, Y, loss, delta, rows):
    """The loss, and delta = dC/dZ written into ``delta``, in one pass over the logits, for a batch of
    ``rows`` rows of which Z holds some (all of them, or one part of a split batch): the loss and delta are
    means over the whole batch, so the returned loss is these rows' share of its mean.

    loss: CE_LABELS (y_labels int64 (B,)), CE_SOFT, BCE, MSE (Y shaped like Z).
    """
    B, C = Z.shape
    total = 0.0
    if loss == CE_LABELS or loss == CE_SOFT:
        inv_b = 1.0 / rows
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
        return total / rows
    inv_n = 1.0 / (rows * C)
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
# Each update computes in the parameters' dtype with the NumPy reference's operations in its order:
# constants (1 - beta1, lr / bias1, ...) in float64, then rounded once to the dtype, as NumPy rounds a
# Python float scalar. The numba updates therefore equal the reference bit for bit, in float32 too, and
# float32 loops run at float32 SIMD width.
@njit
def _consts(like, values):
    """``values`` (float64) rounded to the dtype of the array ``like``."""
    out = np.empty(len(values), like.dtype)
    for i in range(len(values)):
        out[i] = values[i]
    return out


@njit
def sgd(p, g, buf, args):
    """torch.optim.SGD on a flat vector, one pass; args: update_args.STRUCTS['sgd'], one record."""
    a = args[0]
    c = _consts(p, (a.lr, a.momentum, 1.0 - a.dampening, a.weight_decay))
    lr, mom, damp1, wd = c[0], c[1], c[2], c[3]
    if a.momentum == 0.0 and a.weight_decay == 0.0:  # plain SGD: a loop without branches, so it vectorizes
        for i in range(p.size):
            p[i] -= g[i] * lr
        return
    for i in range(p.size):
        d = p[i] * wd + g[i] if a.weight_decay != 0.0 else g[i]
        if a.momentum != 0.0:
            bi = d if a.first else buf[i] * mom + d * damp1
            buf[i] = bi
            d = bi * mom + d if a.nesterov else bi
        p[i] -= d * lr


@njit
def adam(p, g, m, v, args):
    """torch.optim.Adam / AdamW on a flat vector: m, v and p together in one pass; args:
    update_args.STRUCTS['adam'], one record."""
    a = args[0]
    c = _consts(p, (a.beta1, 1.0 - a.beta1, a.beta2, 1.0 - a.beta2, a.bias2_sqrt, a.eps, a.lr / a.bias1, a.shrink,
                    a.weight_decay))
    b1, omb1, b2, omb2, bias2_sqrt, eps, step_size, shrink, wd = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
    if a.weight_decay == 0.0:  # the common case, without branches in the loop
        for i in range(p.size):
            d = g[i]
            mi = m[i] * b1 + d * omb1
            vi = v[i] * b2 + d * d * omb2
            m[i] = mi
            v[i] = vi
            p[i] -= mi / (np.sqrt(vi) / bias2_sqrt + eps) * step_size
        return
    for i in range(p.size):
        if a.decoupled:
            p[i] *= shrink
            d = g[i]
        else:
            d = p[i] * wd + g[i]
        mi = m[i] * b1 + d * omb1
        vi = v[i] * b2 + d * d * omb2
        m[i] = mi
        v[i] = vi
        p[i] -= mi / (np.sqrt(vi) / bias2_sqrt + eps) * step_size


@njit
def rmsprop(p, g, sq, buf, args):
    """torch.optim.RMSprop (not centered) on a flat vector, one pass; args: update_args.STRUCTS['rmsprop'],
    one record."""
    a = args[0]
    c = _consts(p, (a.lr, a.alpha, 1.0 - a.alpha, a.eps, a.momentum, a.weight_decay))
    lr, alpha, oma, eps, mom, wd = c[0], c[1], c[2], c[3], c[4], c[5]
    for i in range(p.size):
        d = p[i] * wd + g[i] if a.weight_decay != 0.0 else g[i]
        si = sq[i] * alpha + d * d * oma
        sq[i] = si
        u = d / (np.sqrt(si) + eps)
        if a.momentum != 0.0:
            u = buf[i] * mom + u
            buf[i] = u
        p[i] -= u * lr


# ----------------------------------------------------------------------------------- the whole step
# A step runs in one of two ways (numba_backend._Plan chooses; both are bit-identical from run to run):
# - whole: the batch in one pass, each GEMM on BLAS's own thread pool (``train_step``);
# - split: the batch cut into parts of rows, each part's forward and backward on its own thread of Numba's
#   pool with BLAS held to one thread, the parts' gradients summed, then the update, cut into chunks of
#   the flat vector (``train_step_split``). Small products gain little from BLAS's threads (the forward
#   product of 64-128-128-10 at batch 64 took 25 us on one thread, 19 us on two); parts of the batch run
#   the whole step's work side by side, the passes between the GEMMs included.
# One pool works at a time either way: BLAS's, or Numba's with BLAS on one thread.
@njit
def train_step(X, y_labels, Y, loss, flat, grad, layout, codes, ws, top, opt, sgd_args, adam_args, rmsprop_args, s1,
               s2, clip, route):
    """Forward, backward and the optimizer update of one step, in one call (codes in FUSED): ``gradients``
    then ``update``, the two phases that data-parallel training calls apart, with the allreduce between.
    Returns (mean loss, sum of squared gradients, whether the update ran). The output is left in ``top``."""
    value = gradients(X, y_labels, Y, loss, flat, grad, layout, codes, ws, top, route, X.shape[0])
    sumsq = sum_of_squares(grad, route)
    updated = update(flat, grad, value, sumsq, opt, sgd_args, adam_args, rmsprop_args, s1, s2, clip)
    return value, sumsq, updated


@njit
def train_step_split(X, y_labels, Y, loss, flat, grad, extra, layout, codes, ws, top, opt, sgd_args, adam_args,
                     rmsprop_args, s1, s2, clip, route):
    """``train_step`` with the batch split into ``extra.shape[0] + 1`` parts run side by side
    (``gradients_split``), and the update in as many chunks of the flat vector (``update_split``)."""
    value, sumsq = gradients_split(X, y_labels, Y, loss, flat, grad, extra, layout, codes, ws, top, route)
    updated = update_split(flat, grad, value, sumsq, opt, sgd_args, adam_args, rmsprop_args, s1, s2, clip,
                           extra.shape[0] + 1)
    return value, sumsq, updated


@njit
def workspace_offsets(B, layout):
    """Where each layer's A and delta start in the scratch of ``gradients`` for B rows: (a_at, d_at). Per
    layer A (B, n_out), but for the top layer's, which goes to ``top``, then delta (B, n_out)."""
    L = layout.shape[0]
    a_at = np.empty(L, np.int64)
    d_at = np.empty(L, np.int64)
    pos = 0
    for l in range(L):
        a_at[l] = pos
        pos += B * layout[l, 3] if l < L - 1 else 0
        d_at[l] = pos
        pos += B * layout[l, 3]
    return a_at, d_at


@njit
def forward_layers(X, flat, layout, codes, ws, a_at, top, route):
    """The forward pass of ``gradients``: each layer's A into the scratch at ``a_at``, the top layer's into
    ``top``."""
    B, L = X.shape[0], layout.shape[0]
    A_prev = X
    for l in range(L):
        w0, b0, n_in, n_out = layout[l, 0], layout[l, 1], layout[l, 2], layout[l, 3]
        A = ws[a_at[l]:a_at[l] + B * n_out].reshape((B, n_out)) if l < L - 1 else top
        dense_forward(A_prev, flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)), flat[b0:b0 + n_out], codes[l], A,
                      route)
        A_prev = A


@njit
def gradients(X, y_labels, Y, loss, flat, grad, layout, codes, ws, top, route, rows):
    """Forward and backward of one step, eqs. (1)-(4), for the rows of X, the gradient written into
    ``grad``; returns the loss. ``rows``: the batch's row count, by which the loss and its gradient are
    averaged (X.shape[0], or more when X is one part of the batch: the loss returned is then this part's
    share of the mean). layout[l] = (offset of W_l in flat, offset of b_l, n_in, n_out). ws: scratch
    holding, per layer, A (written over Z; the top layer's goes to ``top``, (B, n_top)) then delta, each
    (B, n_out). route: the GEMMs' BLAS (``_numba_blas``)."""
    B = X.shape[0]
    L = layout.shape[0]
    a_at, d_at = workspace_offsets(B, layout)
    forward_layers(X, flat, layout, codes, ws, a_at, top, route)
    # ---- eq. (1)
    n_top = layout[L - 1, 3]
    delta = ws[d_at[L - 1]:d_at[L - 1] + B * n_top].reshape((B, n_top))
    value = output_delta(top, y_labels, Y, loss, delta, rows)
    # ---- eqs. (2)-(4), top down; each layer's delta gets g' and yields its bias gradient in one pass
    b_top = layout[L - 1, 1]
    backward_epilogue(delta, delta, IDENTITY, grad[b_top:b_top + n_top])  # eq. (4), top layer
    for l in range(L - 1, -1, -1):
        w0, n_in, n_out = layout[l, 0], layout[l, 2], layout[l, 3]
        A_in = ws[a_at[l - 1]:a_at[l - 1] + B * n_in].reshape((B, n_in)) if l > 0 else X
        gemm(A_in.T, delta, grad[w0:w0 + n_in * n_out].reshape((n_in, n_out)), route)  # eq. (3)
        if l > 0:
            below = ws[d_at[l - 1]:d_at[l - 1] + B * n_in].reshape((B, n_in))
            gemm(delta, flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)).T, below, route)  # eq. (2)
            b0 = layout[l - 1, 1]
            backward_epilogue(below, A_in, codes[l - 1], grad[b0:b0 + n_in])  # eq. (2) * g', eq. (4)
            delta = below
    return value


@njit
def _part(n, p, parts, align):
    """The bounds [lo, hi) of part p of ``parts`` of range(n), cut at multiples of ``align``."""
    lo = 0 if p == 0 else (p * n // parts) // align * align
    hi = n if p == parts - 1 else ((p + 1) * n // parts) // align * align
    return lo, hi


@_njit(cache=True, error_model="numpy", parallel=True)
def gradients_split(X, y_labels, Y, loss, flat, grad, extra, layout, codes, ws, top, route):
    """``gradients`` with the batch cut into P = extra.shape[0] + 1 parts of rows, each on its own thread
    (Numba's pool) with BLAS held to one thread (``_numba_blas.blas_threads``): part p writes its
    gradient into ``grad`` (p = 0) or ``extra[p - 1]``, its scratch is ws[p], its output rows go to
    ``top``. The parts' gradients are then summed into ``grad`` in P chunks of the flat vector side by
    side, each chunk's sum of squares with it. Returns (the loss, the gradient's sum of squares)."""
    parts = extra.shape[0] + 1
    B = X.shape[0]
    values = np.zeros(parts)
    threads = blas_threads(1, route)
    for p in prange(parts):
        lo, hi = _part(B, p, parts, 1)
        g = grad if p == 0 else extra[p - 1]
        values[p] = gradients(X[lo:hi], y_labels[lo:hi], Y[lo:hi], loss, flat, g, layout, codes, ws[p], top[lo:hi],
                              route, B)
    squares = np.zeros(parts)
    for c in prange(parts):
        lo, hi = _part(grad.size, c, parts, 16)
        g = grad[lo:hi]
        for q in range(parts - 1):
            e = extra[q, lo:hi]
            for i in range(g.size):
                g[i] += e[i]
        squares[c] = sumsq(g, route)
    blas_threads(threads, route)
    return values.sum(), squares.sum()


@_njit(cache=True, error_model="numpy", parallel=True)
def forward_split(X, flat, layout, codes, ws, out, route):
    """The network's output for the rows of X (inference), its rows cut into P = ws.shape[0] parts, each
    on its own thread (Numba's pool) with BLAS held to one thread, as the split step's forward: part p
    computes layer by layer in the two halves of ws[p] in turn (each holds part rows x the widest hidden
    layer) and writes its output rows into ``out``, through ``dense_forward`` layer after layer, as the
    ops one by one."""
    parts = ws.shape[0]
    B = X.shape[0]
    L = layout.shape[0]
    threads = blas_threads(1, route)
    for p in prange(parts):
        lo, hi = _part(B, p, parts, 1)
        rows = hi - lo
        A_prev = X[lo:hi]
        for l in range(L):
            w0, b0, n_in, n_out = layout[l, 0], layout[l, 1], layout[l, 2], layout[l, 3]
            A = ws[p, l % 2, :rows * n_out].reshape((rows, n_out)) if l < L - 1 else out[lo:hi]
            dense_forward(A_prev, flat[w0:w0 + n_in * n_out].reshape((n_in, n_out)), flat[b0:b0 + n_out], codes[l],
                          A, route)
            A_prev = A
    blas_threads(threads, route)


@njit
def update(flat, grad, value, sumsq, opt, sgd_args, adam_args, rmsprop_args, s1, s2, clip):
    """The update phase of a step over the whole flat vector, given the gradient's sum of squares: the
    non-finite check (a non-finite loss ``value`` or gradient leaves the parameters and the optimizer state
    untouched), clipping (clip > 0 rescales the gradient to that global norm when it is larger, as torch's
    clip_grad_norm_), then the update: ``opt`` is 0 sgd, 1 adam, 2 rmsprop (numba_backend's
    _WHOLE_STEP_UPDATES), which reads its arguments (update_args.STRUCTS, one record each; the others are
    not read); s1, s2 are its state vectors (slot_names order). Returns whether the update ran."""
    if not (math.isfinite(value) and math.isfinite(sumsq)):
        return False
    _update_range(flat, grad, sumsq, opt, sgd_args, adam_args, rmsprop_args, s1, s2, clip)
    return True


@_njit(cache=True, error_model="numpy", parallel=True)
def update_split(flat, grad, value, sumsq, opt, sgd_args, adam_args, rmsprop_args, s1, s2, clip, parts):
    """``update`` in ``parts`` chunks of the flat vector side by side: every operation is elementwise, so
    the result is the same bit for bit."""
    if not (math.isfinite(value) and math.isfinite(sumsq)):
        return False
    for c in prange(parts):
        lo, hi = _part(flat.size, c, parts, 16)
        _update_range(flat[lo:hi], grad[lo:hi], sumsq, opt, sgd_args, adam_args, rmsprop_args, s1[lo:hi],
                      s2[lo:hi], clip)
    return True


@njit
def _update_range(flat, grad, sumsq, opt, sgd_args, adam_args, rmsprop_args, s1, s2, clip):
    """Clipping and the update on a range of the flat vector (s1, s2: the same range, or empty)."""
    if clip > 0:
        clip_grad(grad, sumsq, clip)
    if opt == 0:
        sgd(flat, grad, s1, sgd_args)
    elif opt == 1:
        adam(flat, grad, s1, s2, adam_args)
    else:
        rmsprop(flat, grad, s1, s2, rmsprop_args)


@njit
def sum_of_squares(g, route):
    """sum(g^2) of a flat vector, through BLAS (dot, on the GEMMs' library): a plain running sum is one
    long dependency chain that cannot vectorize and costs several times more. In float32 a norm above ~1e19
    overflows to inf, which the divergence check then reports."""
    return sumsq(g, route)


@njit
def clip_grad(g, sumsq, max_norm):
    """Scale g to global norm max_norm when its norm is larger: coef = max_norm / (norm + 1e-6)."""
    coef = max_norm / (math.sqrt(sumsq) + 1e-6)
    if coef < 1.0:
        c = _consts(g, (coef,))[0]  # rounded to g's dtype, as the op-by-op path's scale does
        for i in range(g.size):
            g[i] *= c
