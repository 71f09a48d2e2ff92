// The output delta, eq. (1), fused with the loss: one warp per row of logits Z (rows x C).
// Each writes delta = dC/dZ and its row's statistics into row_stats (2 x rows): the row's loss, then how
// many of its predictions are correct (the argmax for cross-entropy, each output's sign for binary
// cross-entropy, 0 for squared error). reduce_loss then sums both in a fixed order, so a training step
// gets its loss and its correct count from the one kernel pair, with no separate metric kernels.
#include "common.cuh"

// The index of the first maximum of row z[0:C] (as NumPy's argmax), given its maximum m; every lane
// of the warp gets it.
template <typename T, typename A> __device__ __forceinline__ int warp_argmax(const T* z, int C, A m) {
    int first = C;
    for (int c = threadIdx.x % 32; c < C; c += 32) {
        if (load(z[c]) == m && c < first) {
            first = c;
        }
    }
    return warp_min(first);
}

// Softmax cross-entropy, stable (log-sum-exp). Labels y (int64, one per row) when soft == 0, else
// target rows Y (probabilities or one-hot): c = sum_k Y_k (lse - z_k), dc/dz = softmax * sum(Y) - Y.
// delta = dc/dz / rows. A label outside [0, C) is never used as an index: its row's loss and delta are
// NaN, which the non-finite guard turns into an error (labels handed over on the device are checked
// there, not on the host).
template <typename T>
__global__ void softmax_ce(const T* __restrict__ Z, const long long* __restrict__ y, const T* __restrict__ Y,
                           T* __restrict__ delta, typename Acc<T>::type* __restrict__ row_stats, int rows, int C,
                           int soft) {
    using A = typename Acc<T>::type;
    const long long warp = global_index() / 32;
    const int lane = threadIdx.x % 32;
    if (warp >= rows) {
        return;
    }
    const T* z = Z + warp * C;
    T* d = delta + warp * C;
    A m = load(z[0]);
    for (int c = lane; c < C; c += 32) {
        m = load(z[c]) > m ? load(z[c]) : m;
    }
    m = warp_max(m);
    A s = A(0);
    for (int c = lane; c < C; c += 32) {
        s += m_exp(load(z[c]) - m);  // the exponentials are computed again below, not kept in T
    }
    s = warp_sum(s);
    const A lse = m_log(s) + m;
    const A inv_rows = A(1) / static_cast<A>(rows);
    const int predicted = warp_argmax(z, C, m);
    if (!soft) {
        const long long t = y[warp];
        if (t < 0 || t >= C) {
            for (int c = lane; c < C; c += 32) {
                d[c] = quiet_nan<T>();
            }
            if (lane == 0) {
                row_stats[warp] = quiet_nan<A>();
                row_stats[rows + warp] = A(0);
            }
            return;
        }
        for (int c = lane; c < C; c += 32) {
            const A p = m_exp(load(z[c]) - m) / s;
            d[c] = store<T>((p - (c == t ? A(1) : A(0))) * inv_rows);
        }
        if (lane == 0) {
            row_stats[warp] = lse - load(z[t]);
            row_stats[rows + warp] = predicted == t ? A(1) : A(0);
        }
        return;
    }
    const T* yr = Y + warp * C;
    A ysum = A(0), loss = A(0);
    for (int c = lane; c < C; c += 32) {
        ysum += load(yr[c]);
        loss += load(yr[c]) * (lse - load(z[c]));
    }
    ysum = warp_sum(ysum);
    loss = warp_sum(loss);
    A ymax = load(yr[0]);
    for (int c = lane; c < C; c += 32) {
        ymax = load(yr[c]) > ymax ? load(yr[c]) : ymax;
    }
    const int target = warp_argmax(yr, C, warp_max(ymax));
    for (int c = lane; c < C; c += 32) {
        const A p = m_exp(load(z[c]) - m) / s;
        d[c] = store<T>((p * ysum - load(yr[c])) * inv_rows);
    }
    if (lane == 0) {
        row_stats[warp] = loss;
        row_stats[rows + warp] = predicted == target ? A(1) : A(0);
    }
}

// The elementwise losses, one warp per row; delta = dc/dz / (rows C):
//   LOSS_BINARY_CROSS_ENTROPY, with logits: c = max(z, 0) - z y + log(1 + exp(-|z|)), dc/dz = sigmoid(z) - y;
//           an output is correct when (z > 0) == (y > 0.5)
//   LOSS_MSE, squared error: c = (z - y)^2, dc/dz = 2 (z - y); no correct count (0)
template <typename T, int LOSS>
__global__ void pointwise_loss(const T* __restrict__ Z, const T* __restrict__ Y, T* __restrict__ delta,
                               typename Acc<T>::type* __restrict__ row_stats, int rows, int C) {
    using A = typename Acc<T>::type;
    const long long warp = global_index() / 32;
    const int lane = threadIdx.x % 32;
    if (warp >= rows) {
        return;
    }
    const A inv_n = A(1) / (static_cast<A>(rows) * static_cast<A>(C));
    A loss = A(0), correct = A(0);
    for (int c = lane; c < C; c += 32) {
        const long long k = warp * C + c;
        const A z = load(Z[k]), t = load(Y[k]);
        A grad;
        if constexpr (LOSS == LOSS_BINARY_CROSS_ENTROPY) {
            const A e = m_exp(z >= A(0) ? -z : z);
            loss += (z > A(0) ? z : A(0)) - z * t + m_log1p(e);
            grad = (z >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e)) - t;
            correct += (z > A(0)) == (t > A(0.5)) ? A(1) : A(0);
        } else {
            const A diff = z - t;
            loss += diff * diff;
            grad = A(2) * diff;
        }
        delta[k] = store<T>(grad * inv_n);
    }
    loss = warp_sum(loss);
    correct = warp_sum(correct);
    if (lane == 0) {
        row_stats[warp] = loss;
        row_stats[rows + warp] = correct;
    }
}

// out[0] = scale * (the sum of the row losses row_stats[0:rows]), out[1] = the sum of the correct counts
// row_stats[rows:2 rows]; one block of FASTBP_REDUCE_THREADS threads (at most that many), fixed order.
template <typename A>
__global__ void reduce_loss(const A* __restrict__ row_stats, int rows, A scale, A* __restrict__ out) {
    __shared__ A shared[FASTBP_REDUCE_THREADS];
    A loss = A(0), correct = A(0);
    for (int i = threadIdx.x; i < rows; i += blockDim.x) {
        loss += row_stats[i];
        correct += row_stats[rows + i];
    }
    loss = block_sum(loss, shared);
    __syncthreads();  // every thread has read the first sum before the second overwrites shared
    correct = block_sum(correct, shared);
    if (threadIdx.x == 0) {
        out[0] = loss * scale;
        out[1] = correct;
    }
}

// The check of a batch handed over as device arrays, where it lives, in two stages (a batch of 8192 x 4096
// takes one block 12 ms on an H200, the step itself 11 ms; a grid of blocks reads it at the memory's speed).
// Stage one counts, block by block over a grid-stride share, the features X[0:nx] that are not finite and
// the targets that are wrong for the loss: TARGETS_LABELS, labels y[0:ny] outside [0, C); TARGETS_FINITE,
// targets Y[0:ny] that are not finite; TARGETS_UNIT, targets outside [0, 1] (or NaN); each block's count
// goes to partial[block].
template <typename T, int KIND>
__global__ void check_batch(const T* __restrict__ X, long long nx, const long long* __restrict__ y,
                            const T* __restrict__ Y, long long ny, int C, double* __restrict__ partial) {
    __shared__ double shared[FASTBP_THREADS];
    double bad = 0.0;
    for (long long i = global_index(); i < nx; i += grid_stride()) {
        bad += isfinite(static_cast<double>(load(X[i]))) ? 0.0 : 1.0;
    }
    for (long long i = global_index(); i < ny; i += grid_stride()) {
        if constexpr (KIND == TARGETS_LABELS) {
            bad += (y[i] < 0 || y[i] >= C) ? 1.0 : 0.0;
        } else if constexpr (KIND == TARGETS_FINITE) {
            bad += isfinite(static_cast<double>(load(Y[i]))) ? 0.0 : 1.0;
        } else {
            bad += (load(Y[i]) >= 0.0f && load(Y[i]) <= 1.0f) ? 0.0 : 1.0;
        }
    }
    bad = block_sum(bad, shared);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = bad;
    }
}

// Stage two, one block of FASTBP_REDUCE_THREADS threads: the count is the sum of partial[0:blocks] (whole
// numbers, exact in any order); unless guard is tripped already, a nonzero count trips it as
// [2, step, count, KIND], so the step's update does nothing and the Trainer's next read of the guard raises
// (a host check would cost a copy there and back).
template <typename A, int KIND>
__global__ void check_batch_finish(const A* __restrict__ partial, long long blocks, double* __restrict__ guard,
                                   long long step) {
    __shared__ A shared[FASTBP_REDUCE_THREADS];
    A bad = A(0);
    for (long long i = threadIdx.x; i < blocks; i += blockDim.x) {
        bad += partial[i];
    }
    bad = block_sum(bad, shared);
    if (threadIdx.x == 0 && bad > A(0) && guard[0] == 0.0) {
        guard[0] = 2.0;
        guard[1] = static_cast<double>(step);
        guard[2] = static_cast<double>(bad);
        guard[3] = static_cast<double>(KIND);
    }
}

// out[0] = scale * sum(values[0:n]), one block of FASTBP_REDUCE_THREADS threads (at most that many), fixed order.
template <typename A>
__global__ void ordered_sum(const A* __restrict__ values, long long n, A scale, A* __restrict__ out) {
    __shared__ A shared[FASTBP_REDUCE_THREADS];
    A s = A(0);
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        s += values[i];
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) {
        out[0] = s * scale;
    }
}
