// The output delta, eq. (1), fused with the loss: one warp per row of logits Z (rows x C).
// Each writes delta = dC/dZ and its row's loss; reduce_rows then sums the row losses in a fixed order.
#include "common.cuh"

// Softmax cross-entropy, stable (log-sum-exp). Labels y (int64, one per row) when soft == 0, else
// target rows Y (probabilities or one-hot): c = sum_k Y_k (lse - z_k), dc/dz = softmax * sum(Y) - Y.
// delta = dc/dz / rows.
template <typename T>
__global__ void softmax_ce(const T* __restrict__ Z, const long long* __restrict__ y, const T* __restrict__ Y,
                           T* __restrict__ delta, typename Acc<T>::type* __restrict__ row_loss, int rows, int C,
                           int soft) {
    using A = typename Acc<T>::type;
    const long long warp = global_index() / 32;
    const int lane = threadIdx.x % 32;
    if (warp >= rows) {
        return;
    }
    const T* z = Z + warp * C;
    T* d = delta + warp * C;
    A m = static_cast<A>(z[0]);
    for (int c = lane; c < C; c += 32) {
        m = static_cast<A>(z[c]) > m ? static_cast<A>(z[c]) : m;
    }
    m = warp_max(m);
    A s = A(0);
    for (int c = lane; c < C; c += 32) {
        const A e = m_exp(static_cast<A>(z[c]) - m);
        d[c] = static_cast<T>(e);
        s += e;
    }
    s = warp_sum(s);
    const A lse = m_log(s) + m;
    const A inv_rows = A(1) / static_cast<A>(rows);
    if (!soft) {
        const long long t = y[warp];
        for (int c = lane; c < C; c += 32) {
            const A p = static_cast<A>(d[c]) / s;
            d[c] = static_cast<T>((p - (c == t ? A(1) : A(0))) * inv_rows);
        }
        if (lane == 0) {
            row_loss[warp] = lse - static_cast<A>(z[t]);
        }
        return;
    }
    const T* yr = Y + warp * C;
    A ysum = A(0), loss = A(0);
    for (int c = lane; c < C; c += 32) {
        ysum += static_cast<A>(yr[c]);
        loss += static_cast<A>(yr[c]) * (lse - static_cast<A>(z[c]));
    }
    ysum = warp_sum(ysum);
    loss = warp_sum(loss);
    for (int c = lane; c < C; c += 32) {
        const A p = static_cast<A>(d[c]) / s;
        d[c] = static_cast<T>((p * ysum - static_cast<A>(yr[c])) * inv_rows);
    }
    if (lane == 0) {
        row_loss[warp] = loss;
    }
}

// The elementwise losses, one warp per row; delta = dc/dz / (rows C):
//   LOSS 0, binary cross-entropy with logits: c = max(z, 0) - z y + log(1 + exp(-|z|)), dc/dz = sigmoid(z) - y
//   LOSS 1, squared error: c = (z - y)^2, dc/dz = 2 (z - y)
template <typename T, int LOSS>
__global__ void pointwise_loss(const T* __restrict__ Z, const T* __restrict__ Y, T* __restrict__ delta,
                               typename Acc<T>::type* __restrict__ row_loss, int rows, int C) {
    using A = typename Acc<T>::type;
    const long long warp = global_index() / 32;
    const int lane = threadIdx.x % 32;
    if (warp >= rows) {
        return;
    }
    const A inv_n = A(1) / (static_cast<A>(rows) * static_cast<A>(C));
    A loss = A(0);
    for (int c = lane; c < C; c += 32) {
        const long long k = warp * C + c;
        const A z = static_cast<A>(Z[k]), t = static_cast<A>(Y[k]);
        A grad;
        if constexpr (LOSS == 0) {
            const A e = m_exp(z >= A(0) ? -z : z);
            loss += (z > A(0) ? z : A(0)) - z * t + m_log1p(e);
            grad = (z >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e)) - t;
        } else {
            const A diff = z - t;
            loss += diff * diff;
            grad = A(2) * diff;
        }
        delta[k] = static_cast<T>(grad * inv_n);
    }
    loss = warp_sum(loss);
    if (lane == 0) {
        row_loss[warp] = loss;
    }
}

// out[0] = scale * sum(values[0:n]), one block of FASTBP_REDUCE_THREADS threads (at most that many), fixed order.
template <typename A>
__global__ void reduce_rows(const A* __restrict__ values, long long n, A scale, A* __restrict__ out) {
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
