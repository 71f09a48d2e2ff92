// Dense-layer kernels around the cuBLAS GEMMs: the fused forward epilogue and the fused backward pass.
#include "common.cuh"

// Forward, one pass over the GEMM output Z = X W (rows x n, row-major): Z += b, A = g(Z).
// For activations whose g' reads A, the caller passes A == Z and the output is written over Z.
// The column j of idx is kept up to date as idx strides: one 64-bit modulo per thread, not per element.
// T is the data's type; the arithmetic is in Compute<T> (float for 16-bit data, rounded once on store).
template <typename T, int ACT>
__global__ void forward_epilogue(T* Z, const T* __restrict__ b, T* A, long long total, int n) {
    using C = typename Compute<T>::type;
    const long long stride = grid_stride();
    const int step = static_cast<int>(stride % n);
    long long idx = global_index();
    int j = static_cast<int>(idx % n);
    for (; idx < total; idx += stride) {
        const C z = load(Z[idx]) + load(b[j]);
        if constexpr (keeps_preactivation<ACT>) {
            Z[idx] = store<T>(z);  // g' reads Z
        }
        A[idx] = store<T>(act_forward<C, ACT>(z));
        j += step;  // step < n and j < n: one subtraction wraps it
        if (j >= n) {
            j -= n;
        }
    }
}

// Backward, one pass over delta (rows x n), which holds delta_next W_next^T (cuBLAS):
//   eq. (2): delta *= g'(S), S being what the forward kept (A, or Z for gelu and silu);
//   eq. (4): per-column sums of the new delta over one slab of rows, into partial[slab * n + j].
// Block (32, 8): x over 32 consecutive columns (coalesced), y over 8 row lanes; grid (column tiles,
// slabs). The slab partition and the summation order are fixed, so db is the same bits every run.
template <typename T, int ACT>
__global__ void backward_epilogue(T* delta, const T* S, typename Acc<T>::type* partial, int rows, int n,
                            int rows_per_slab) {
    using A = typename Acc<T>::type;
    using C = typename Compute<T>::type;
    __shared__ A tile[8][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_slab;
    const int r1 = min(rows, r0 + rows_per_slab);
    A acc = A(0);
    if (j < n) {
        for (int i = r0 + threadIdx.y; i < r1; i += 8) {
            const long long k = static_cast<long long>(i) * n + j;
            C d = load(delta[k]);
            if constexpr (ACT != IDENTITY) {
                d = d * act_grad<C, ACT>(load(S[k]));
                const T stored = store<T>(d);
                delta[k] = stored;
                d = load(stored);  // the bias gradient sums what the weight gradient's GEMM reads
            }
            acc += static_cast<A>(d);
        }
    }
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        A s = A(0);
        for (int y = 0; y < 8; ++y) {
            s += tile[y][threadIdx.x];
        }
        partial[static_cast<long long>(blockIdx.y) * n + j] = s;
    }
}

// eq. (4), second stage: db[j] = sum over slabs of partial[slab * n + j], in slab order.
template <typename T>
__global__ void sum_partials(const typename Acc<T>::type* __restrict__ partial, T* __restrict__ db, int slabs,
                             int n) {
    using A = typename Acc<T>::type;
    for (long long j = global_index(); j < n; j += grid_stride()) {
        A s = A(0);
        for (int q = 0; q < slabs; ++q) {
            s += partial[static_cast<long long>(q) * n + j];
        }
        db[j] = store<T>(s);
    }
}
